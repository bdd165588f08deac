//! One merge attempt: a succeeded fine-tune's delta written into its base model as a Hugging
//! Face-layout folder, stored as the merge's artifacts.

use std::path::Path;

use super::hold::Held;
use super::transfer::store_artifacts;
use super::{became, Done, Stop, WorkerCtx};
use crate::domain::{ArtifactKind, JobStatus, MergeResult, MergeSpec};
use crate::queue::Completion;
use crate::storage::local_copy::materialize;

pub(super) async fn run(
    ctx: &WorkerCtx,
    lease: &Held,
    spec: MergeSpec,
    dir: &Path,
) -> Result<Done, Stop> {
    let running =
        serde_json::json!({"device": "cpu", "attempt": lease.attempt, "worker": lease.worker_id});
    became(ctx, lease, JobStatus::Running, Some(running)).await?;
    let model_dir = materialize(&ctx.storage, &spec.base, &ctx.model_cache).await?;
    let delta = dir.join("delta.safetensors");
    ctx.storage.download(&spec.delta_key, &delta).await?;
    let out = dir.join("merged");
    let thread_out = out.clone();
    // Merging reads and writes a whole model: a blocking thread, not a runtime worker.
    let merged = tokio::task::spawn_blocking(move || {
        let art = sparsegrad_engine::artifact::Artifact::load(&delta)?;
        sparsegrad_engine::artifact::merge(&model_dir, &art, &thread_out, 0)
    })
    .await
    .map_err(|e| Stop::Infra(format!("merge thread: {e}")))?;
    merged.map_err(|e| Stop::engine(e, "fine_tuning_job_id"))?;
    // A merge cannot stop half-way; what the heartbeats learned meanwhile counts now.
    let standing = *lease.standing().borrow();
    if standing.lost {
        return Err(Stop::Lost);
    }
    if standing.cancel_requested {
        return Err(Stop::Cancelled);
    }
    let mut names = Vec::new();
    let mut rd = tokio::fs::read_dir(&out).await?;
    while let Some(e) = rd.next_entry().await? {
        if e.file_type().await?.is_file() {
            names.push(e.file_name().to_string_lossy().to_string());
        }
    }
    names.sort();
    let artifacts =
        store_artifacts(&ctx.storage, lease, ArtifactKind::Merged, &out, &names).await?;
    let result = MergeResult {
        device: "cpu".into(),
        files: names,
        result_files: artifacts.iter().map(|a| a.id.clone()).collect(),
        bytes: artifacts.iter().map(|a| a.bytes).sum(),
    };
    let done = Completion {
        result: serde_json::to_value(&result).expect("serialisable"),
        wall_secs: None,
        trained_tokens: None,
    };
    Ok((done, artifacts))
}
