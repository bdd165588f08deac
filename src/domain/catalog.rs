//! Base models: folders under the configured models directory (shared by every tenant) and
//! models a tenant registered in object storage (which `storage::local_copy` brings to a
//! local cache before loading).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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
    /// When it appeared (unix seconds): a folder's `config.json` modification time, a
    /// registered model's registration.
    pub created: Option<i64>,
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
    if super::request::check_model_name(name, "model").is_err() {
        return None;
    }
    from_dir(&dir.join(name), name)
}

fn from_dir(path: &Path, name: &str) -> Option<BaseModel> {
    let (arch, config) = sparsegrad_engine::pretrained::read_config(path).ok()?;
    let created = std::fs::metadata(path.join("config.json"))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs() as i64);
    Some(BaseModel {
        created,
        id: name.to_string(),
        architecture: arch.as_str().into(),
        config,
        source: ModelSource::Dir {
            path: path.to_path_buf(),
        },
    })
}
