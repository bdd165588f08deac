//! Training checkpoints: a `step-N/` folder with the method's trained values and optimizer
//! state (`state.safetensors`) and where the loop was (`trainer.json`), written to a temporary
//! folder and renamed, so a folder that exists is complete.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::methods::Method;
use crate::models::Model;
use crate::{Error, Result};

/// What the trainer reads back from a checkpoint folder besides tensors.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub step: usize,
    pub optimizer_t: u64,
    pub tokens: usize,
    pub method: String,
    pub total_steps: usize,
    pub seed: u64,
}

pub fn save_checkpoint(
    dir: &Path,
    method: &dyn Method,
    model: &Model,
    meta: &CheckpointMeta,
) -> Result<PathBuf> {
    let final_dir = dir.join(format!("step-{}", meta.step));
    let tmp = dir.join(format!(".tmp-step-{}", meta.step));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let (tensors, t) = method.state(model)?;
    let meta = CheckpointMeta {
        optimizer_t: t,
        ..meta.clone()
    };
    let map: HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&map, tmp.join("state.safetensors"))?;
    let j = serde_json::to_vec_pretty(&meta).expect("serialisable");
    std::fs::write(tmp.join("trainer.json"), j).map_err(|e| Error::io(&tmp, e))?;
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    Ok(final_dir)
}

pub fn read_checkpoint(dir: &Path) -> Result<(CheckpointMeta, BTreeMap<String, Tensor>)> {
    let p = dir.join("trainer.json");
    let meta: CheckpointMeta =
        serde_json::from_slice(&std::fs::read(&p).map_err(|e| Error::io(&p, e))?)
            .map_err(|e| Error::Artifact(format!("{}: {e}", p.display())))?;
    let tensors =
        candle_core::safetensors::load(dir.join("state.safetensors"), &candle_core::Device::Cpu)?;
    Ok((meta, tensors.into_iter().collect()))
}

pub(crate) fn prune_checkpoints(dir: &Path, keep: usize) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut steps: Vec<(usize, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            n.strip_prefix("step-")
                .and_then(|s| s.parse().ok())
                .map(|s| (s, e.path()))
        })
        .collect();
    steps.sort();
    let drop = steps.len().saturating_sub(keep.max(1));
    for (_, p) in steps.into_iter().take(drop) {
        let _ = std::fs::remove_dir_all(p);
    }
}
