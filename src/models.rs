//! Base models: folders under the configured models directory (shared by every tenant) and
//! models a tenant registered in object storage, which workers and the predict endpoint copy
//! to a local cache before loading.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::storage::{Storage, StorageError};

/// Where a base model's files are.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ModelSource {
    /// A Hugging Face-layout folder the workers can read.
    Dir { path: PathBuf },
    /// The same layout under an object-storage prefix.
    Storage { prefix: String },
}

/// A base model as `GET /v1/models` shows it.
#[derive(Clone, Debug)]
pub struct BaseModel {
    pub id: String,
    pub architecture: String,
    pub config: serde_json::Value,
    pub source: ModelSource,
}

/// The model folders under `dir` (each with a readable `config.json`), sorted by name.
pub fn list_dir(dir: &Path) -> Vec<BaseModel> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<BaseModel> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| from_dir(&e.path(), &e.file_name().to_string_lossy()))
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// The folder `dir/name` as a base model, if it is one.
pub fn in_dir(dir: &Path, name: &str) -> Option<BaseModel> {
    if crate::jobs::check_model_name(name, "model").is_err() {
        return None;
    }
    from_dir(&dir.join(name), name)
}

fn from_dir(path: &Path, name: &str) -> Option<BaseModel> {
    let (arch, config) = sparsegrad_engine::checkpoint::read_config(path).ok()?;
    Some(BaseModel {
        id: name.to_string(),
        architecture: arch.as_str().into(),
        config,
        source: ModelSource::Dir {
            path: path.to_path_buf(),
        },
    })
}

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
    let local = cache.join(sparsegrad_engine::checkpoint::sha256_bytes(
        prefix.as_bytes(),
    ));
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
