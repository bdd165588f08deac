//! Files between the worker's scratch space and object storage: checkpoints up and back
//! down (for a resumed attempt), result files up with their sizes and digests.

use std::path::Path;

use super::Stop;
use crate::domain::ArtifactKind;
use crate::queue::NewArtifact;
use crate::storage::{keys, Storage};

/// Where a job's checkpoint for `step` is stored.
pub(super) fn checkpoint_prefix(job_id: &str, step: usize) -> String {
    format!("{}/checkpoints/step-{step}", keys::job_prefix(job_id))
}

/// The marker written after a checkpoint's files: a checkpoint without it is incomplete.
pub(super) const COMPLETE_MARKER: &str = "complete";

/// The latest complete checkpoint uploaded for a job: `(step, keys)`.
pub(super) async fn latest_checkpoint(
    st: &Storage,
    job_id: &str,
) -> Result<Option<(usize, Vec<String>)>, Stop> {
    let prefix = format!("{}/checkpoints", keys::job_prefix(job_id));
    let all = st.list(&prefix).await?;
    let mut best: Option<usize> = None;
    for k in &all {
        if let Some(step) = k
            .strip_prefix(&format!("{prefix}/step-"))
            .and_then(|r| r.strip_suffix(&format!("/{COMPLETE_MARKER}")))
            .and_then(|s| s.parse().ok())
        {
            best = best.max(Some(step));
        }
    }
    Ok(best.map(|s| {
        let p = format!("{}/", checkpoint_prefix(job_id, s));
        (
            s,
            all.iter().filter(|k| k.starts_with(&p)).cloned().collect(),
        )
    }))
}

/// Uploads the files of a folder; their total size.
pub(super) async fn upload_dir(st: &Storage, dir: &Path, prefix: &str) -> Result<u64, Stop> {
    let mut rd = tokio::fs::read_dir(dir).await?;
    let mut total = 0;
    while let Some(e) = rd.next_entry().await? {
        if e.file_type().await?.is_file() {
            let name = e.file_name().to_string_lossy().to_string();
            total += st.put_file(&format!("{prefix}/{name}"), &e.path()).await?;
        }
    }
    Ok(total)
}

/// Uploads result files under the job's artifact prefix, with their sizes and digests.
pub(super) async fn store_artifacts(
    st: &Storage,
    job_id: &str,
    kind: ArtifactKind,
    dir: &Path,
    names: &[String],
) -> Result<Vec<NewArtifact>, Stop> {
    let mut out = Vec::new();
    for name in names {
        let path = dir.join(name);
        let p = vec![path.clone()];
        let sha256 = tokio::task::spawn_blocking(move || sparsegrad_engine::io::sha256_files(&p))
            .await
            .map_err(|e| Stop::Infra(format!("hashing: {e}")))?
            .map_err(|e| Stop::Infra(format!("hashing: {e}")))?;
        let key = keys::artifact(job_id, &format!("{kind}/{name}"));
        let bytes = st.put_file(&key, &path).await?;
        out.push(NewArtifact {
            id: crate::db::new_id("art"),
            kind,
            name: name.clone(),
            object_key: key,
            bytes,
            sha256,
        });
    }
    Ok(out)
}
