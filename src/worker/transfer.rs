//! Files between the worker's scratch space and object storage: checkpoints up and back
//! down (for a resumed attempt), result files up with their sizes and digests.

use std::path::Path;

use super::Stop;
use crate::domain::ArtifactKind;
use crate::queue::NewArtifact;
use crate::storage::{keys, Storage};

/// The marker written after a checkpoint's files: a checkpoint without it is incomplete.
pub(super) const COMPLETE_MARKER: &str = "complete";

/// The job's latest recorded checkpoint, `(step, keys)`: the row names the prefix (rows are
/// fenced, so only attempts that held the lease recorded one), and the objects there must be
/// complete.
pub(super) async fn latest_checkpoint(
    db: &sqlx::PgPool,
    st: &Storage,
    job_id: &str,
) -> Result<Option<(usize, Vec<String>)>, Stop> {
    let Some((step, prefix)) = crate::db::job_records::latest_checkpoint(db, job_id)
        .await
        .map_err(|e| Stop::Infra(format!("reading checkpoints: {e}")))?
    else {
        return Ok(None);
    };
    let keys = st.list(&prefix).await?;
    if !keys
        .iter()
        .any(|k| k.ends_with(&format!("/{COMPLETE_MARKER}")))
    {
        return Ok(None);
    }
    Ok(Some((step.max(0) as usize, keys)))
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

/// Uploads result files under the attempt's artifact prefix, with their sizes and digests.
pub(super) async fn store_artifacts(
    st: &Storage,
    lease: &crate::queue::Lease,
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
        let key = keys::artifact(&lease.job_id, lease.attempt, &format!("{kind}/{name}"));
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

/// Deletes what a succeeded job's other attempts left that no row names (a killed or zombie
/// attempt's artifact, a checkpoint it uploaded but never recorded). Best effort: what this
/// misses (a zombie still writing, a storage error) is `sparsegrad fsck --fix`'s to collect.
pub(super) async fn collect_losing_attempts(
    db: &sqlx::PgPool,
    st: &Storage,
    job_id: &str,
) -> Result<usize, Stop> {
    let (artifacts, checkpoints) = crate::db::inventory::job_objects(db, job_id).await?;
    let mut removed = 0;
    for k in st.list(&format!("jobs/{job_id}")).await? {
        let named = artifacts.contains(&k)
            || checkpoints.iter().any(|p| {
                k.strip_prefix(p.as_str())
                    .is_some_and(|r| r.starts_with('/'))
            });
        if !named {
            st.delete(&k).await?;
            removed += 1;
        }
    }
    Ok(removed)
}
