//! Local copies of base models kept in object storage: workers and predictions load models
//! from a folder, so a storage prefix is downloaded once into a cache and reused.

use std::path::{Path, PathBuf};

use super::{Storage, StorageError};
use crate::domain::ModelSource;

#[derive(Debug, thiserror::Error)]
pub enum MaterializeError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("local I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("no objects under `{0}`")]
    Empty(String),
}

/// A local folder with the model's files: the folder itself, or a cached copy of a storage
/// prefix (downloaded once into a fresh folder and renamed into place, so concurrent callers
/// never see half a model).
pub async fn materialize(
    storage: &Storage,
    source: &ModelSource,
    cache: &Path,
) -> Result<PathBuf, MaterializeError> {
    let prefix = match source {
        ModelSource::Dir { path } => return Ok(path.clone()),
        ModelSource::Storage { prefix } => prefix,
    };
    let local = cache.join(sparsegrad_engine::io::sha256_bytes(prefix.as_bytes()));
    if local.join("config.json").exists() {
        return Ok(local);
    }
    let keys = storage.list(prefix).await?;
    if keys.is_empty() {
        return Err(MaterializeError::Empty(prefix.clone()));
    }
    tokio::fs::create_dir_all(cache).await?;
    let tmp = cache.join(format!(".tmp-{}", crate::db::new_id("dl")));
    for k in &keys {
        let rel = k.strip_prefix(prefix.as_str()).unwrap_or(k);
        let rel = rel.trim_start_matches('/');
        if rel.is_empty() || rel.contains("..") {
            continue;
        }
        storage.download(k, &tmp.join(rel)).await?;
    }
    match tokio::fs::rename(&tmp, &local).await {
        Ok(()) => {}
        // Someone else finished first: theirs is complete too.
        Err(_) if local.join("config.json").exists() => {
            let _ = tokio::fs::remove_dir_all(&tmp).await;
        }
        Err(e) => return Err(e.into()),
    }
    Ok(local)
}
