//! Artifacts: what a method trained, as one safetensors file (`delta.safetensors`) plus a
//! JSON descriptor (`delta.json`, also embedded in the safetensors metadata). `apply` puts a
//! delta onto a loaded base model in memory; `merge` writes a Hugging Face-layout folder.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{read_config, read_tensors};
use crate::data::LabelMap;
use crate::methods::DeltaEntry;
use crate::models::{Arch, Model, Task};
use crate::nn::Param;
use crate::{Error, Result};

pub const FORMAT: &str = "sparsegrad-delta";
pub const FORMAT_VERSION: u32 = 1;
pub const TENSORS_FILE: &str = "delta.safetensors";
pub const DESCRIPTOR_FILE: &str = "delta.json";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Descriptor {
    pub format: String,
    pub format_version: u32,
    pub arch: Arch,
    pub task: Task,
    pub method: String,
    pub hyperparameters: serde_json::Value,
    /// sha256 of the base model's weight files (see `checkpoint::sha256_files`).
    pub base_model_sha256: String,
    /// Where the base model came from, as given (informational).
    #[serde(default)]
    pub base_model: Option<String>,
    #[serde(default)]
    pub labels: Option<LabelMap>,
    pub entries: BTreeMap<String, DeltaEntry>,
    #[serde(default)]
    pub training: serde_json::Value,
}

pub struct Artifact {
    pub descriptor: Descriptor,
    pub tensors: BTreeMap<String, Tensor>,
}

impl Artifact {
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let desc = serde_json::to_string(&self.descriptor).expect("serialisable");
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), FORMAT.to_string());
        meta.insert("format_version".to_string(), FORMAT_VERSION.to_string());
        meta.insert("method".to_string(), self.descriptor.method.clone());
        meta.insert(
            "base_model_sha256".to_string(),
            self.descriptor.base_model_sha256.clone(),
        );
        meta.insert("descriptor".to_string(), desc);
        write_safetensors(&self.tensors, Some(meta), &dir.join(TENSORS_FILE))?;
        let pretty = serde_json::to_vec_pretty(&self.descriptor).expect("serialisable");
        let p = dir.join(DESCRIPTOR_FILE);
        std::fs::write(&p, pretty).map_err(|e| Error::io(&p, e))
    }

    /// Loads from a folder holding `delta.safetensors` (the descriptor is read from its
    /// metadata, so the file alone is enough).
    pub fn load(path: &Path) -> Result<Artifact> {
        let file = if path.is_dir() {
            path.join(TENSORS_FILE)
        } else {
            path.to_path_buf()
        };
        let bytes = std::fs::read(&file).map_err(|e| Error::io(&file, e))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| Error::Artifact(format!("{}: {e}", file.display())))?;
        let md = meta.metadata().clone().unwrap_or_default();
        if md.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(Error::Artifact(format!(
                "{} is not a {FORMAT} file",
                file.display()
            )));
        }
        let ver: u32 = md
            .get("format_version")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if ver == 0 || ver > FORMAT_VERSION {
            return Err(Error::Artifact(format!(
                "unsupported format_version {ver} (this build reads ≤ {FORMAT_VERSION})"
            )));
        }
        let descriptor: Descriptor =
            serde_json::from_str(md.get("descriptor").map(String::as_str).unwrap_or("null"))
                .map_err(|e| Error::Artifact(format!("descriptor: {e}")))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
        Ok(Artifact {
            descriptor,
            tensors: tensors.into_iter().collect(),
        })
    }

    /// Applies the delta to a base model loaded for the same task, in memory.
    pub fn apply(&self, model: &mut Model) -> Result<()> {
        let w = &mut model.weights;
        let (dev, dtype) = (w.device.clone(), w.dtype);
        let mut lora: BTreeMap<String, (Option<Tensor>, Option<Tensor>, f64)> = BTreeMap::new();
        for (name, entry) in &self.descriptor.entries {
            let t = self.tensors.get(name).ok_or_else(|| {
                Error::Artifact(format!("descriptor names `{name}` but the file lacks it"))
            })?;
            match entry {
                DeltaEntry::Dense { param } => {
                    let base = w.get(param)?;
                    if base.dims() != t.dims() {
                        return Err(Error::Artifact(format!(
                            "`{param}` has shape {:?} in the artifact but {:?} in the base model",
                            t.dims(),
                            base.dims()
                        )));
                    }
                    w.insert(
                        param.clone(),
                        Param::Frozen(t.to_device(&dev)?.to_dtype(dtype)?),
                    );
                }
                DeltaEntry::Lora { linear, scale } => {
                    let e = lora.entry(linear.clone()).or_insert((None, None, *scale));
                    if name.ends_with("lora_A.weight") {
                        e.0 = Some(t.clone());
                    } else {
                        e.1 = Some(t.clone());
                    }
                }
            }
        }
        for (linear, (a, b, scale)) in lora {
            let (Some(a), Some(b)) = (a, b) else {
                return Err(Error::Artifact(format!(
                    "LoRA pair for `{linear}` is incomplete"
                )));
            };
            let wn = format!("{linear}.weight");
            let base = w.get(&wn)?.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
            let delta = (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * scale)?;
            if delta.dims() != base.dims() {
                return Err(Error::Artifact(format!(
                    "LoRA delta for `{linear}` does not fit its weight"
                )));
            }
            let merged = (base + delta)?.to_dtype(dtype)?.to_device(&dev)?;
            w.insert(wn, Param::Frozen(merged));
        }
        Ok(())
    }
}

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

/// Files a merged folder copies from the base so it loads with the same tokenizer.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "merges.txt",
    "vocab.json",
    "chat_template.jinja",
    "generation_config.json",
];

/// Writes `base + delta` as a Hugging Face-layout folder (`config.json`,
/// `model.safetensors`, tokenizer files). Checks the base model's identity first.
pub fn merge(base_dir: &Path, artifact: &Artifact, out: &Path, seed: u64) -> Result<()> {
    let d = &artifact.descriptor;
    let files = crate::checkpoint::weight_files(base_dir)?;
    let sha = crate::checkpoint::sha256_files(&files)?;
    if sha != d.base_model_sha256 {
        return Err(Error::Artifact(format!(
            "base model mismatch: the artifact was trained on sha256 {} but {} has {}",
            d.base_model_sha256,
            base_dir.display(),
            sha
        )));
    }
    let (arch, raw) = read_config(base_dir)?;
    if arch != d.arch {
        return Err(Error::Artifact(format!(
            "artifact is for {} but the base is {}",
            d.arch.as_str(),
            arch.as_str()
        )));
    }
    let (tensors, _, _) = read_tensors(base_dir, arch)?;
    let dtype = tensors
        .values()
        .next()
        .map(|t| t.dtype())
        .unwrap_or(DType::F32);
    let opts = crate::checkpoint::LoadOptions {
        task: d.task.clone(),
        dtype,
        device: Device::Cpu,
        seed,
    };
    let mut report = Default::default();
    let mut model = crate::checkpoint::build_model(arch, raw, tensors, &opts, &mut report)?;
    artifact.apply(&mut model)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let cfg = model.merged_config(d.labels.as_ref().map(|l| l.names.as_slice()));
    let p = out.join("config.json");
    std::fs::write(&p, serde_json::to_vec_pretty(&cfg).expect("json"))
        .map_err(|e| Error::io(&p, e))?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    write_safetensors(
        &model.weights.snapshot(),
        Some(meta),
        &out.join("model.safetensors"),
    )?;
    for f in TOKENIZER_FILES {
        let src = base_dir.join(f);
        if src.exists() {
            std::fs::copy(&src, out.join(f)).map_err(|e| Error::io(&src, e))?;
        }
    }
    Ok(())
}
