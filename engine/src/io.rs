//! The engine's file primitives, below everything that reads or writes a model: JSON files,
//! safetensors written atomically, and sha256 digests (a base model's identity, cache keys).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let s = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&s).map_err(|e| Error::Model(format!("{}: {e}", path.display())))
}

pub fn sha256_bytes(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// One digest over the files' bytes in the order given.
pub fn sha256_files(files: &[PathBuf]) -> Result<String> {
    let mut h = Sha256::new();
    for f in files {
        let mut file = std::fs::File::open(f).map_err(|e| Error::io(f, e))?;
        std::io::copy(&mut file, &mut h).map_err(|e| Error::io(f, e))?;
    }
    Ok(hex::encode(h.finalize()))
}

/// Writes tensors (from any device) to `path` through a temporary file and a rename, so a
/// reader never sees half a file.
pub fn write_safetensors(
    tensors: &BTreeMap<String, Tensor>,
    metadata: Option<HashMap<String, String>>,
    path: &Path,
) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    let data: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    safetensors::tensor::serialize_to_file(
        data.iter().map(|(k, v)| (k.as_str(), v)),
        metadata,
        &tmp,
    )
    .map_err(|e| Error::Artifact(format!("{}: {e}", path.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Writes `value` as pretty JSON.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).expect("serialisable");
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}
