//! Loading pretrained Hugging Face checkpoints from a folder: `config.json` plus `model.safetensors` or a
//! sharded `model.safetensors.index.json`. Parameter names are normalised to the canonical
//! task-model names (with or without `bert.` / `roberta.` / `model.` prefixes, old
//! `gamma`/`beta` LayerNorm names); a missing task head is initialised as transformers does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand_distr::{Distribution, Normal};

use crate::io::{read_json, sha256_files, write_json, write_safetensors};
use crate::models::{check_task, Arch, Model, Task};
use crate::nn::Weights;
use crate::{Error, Result};

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct LoadReport {
    /// Head parameters absent from the checkpoint (or of the wrong shape), newly initialised.
    pub initialised: Vec<String>,
    /// Checkpoint tensors the task model does not use.
    pub ignored: Vec<String>,
    /// sha256 over the weight files' bytes, in file-name order: the base model's identity.
    pub base_sha256: String,
}

pub struct LoadOptions {
    pub task: Task,
    pub dtype: DType,
    pub device: Device,
    /// Seeds the initialisation of a missing head.
    pub seed: u64,
}

pub fn read_config(dir: &Path) -> Result<(Arch, serde_json::Value)> {
    let raw = read_json(&dir.join("config.json"))?;
    Ok((Arch::of_config(&raw)?, raw))
}

/// The safetensors files of a checkpoint, sorted.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let idx = read_json(&index)?;
        let map = idx
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::Model("index has no weight_map".into()))?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|v| v.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    Err(Error::Model(format!(
        "{}: no model.safetensors or model.safetensors.index.json",
        dir.display()
    )))
}

/// Assembles a model from canonical tensors (already named), initialising a missing head.
pub fn build_model(
    arch: Arch,
    raw_config: serde_json::Value,
    mut tensors: BTreeMap<String, Tensor>,
    opts: &LoadOptions,
    report: &mut LoadReport,
) -> Result<Model> {
    let architecture = arch.parse(&raw_config)?;
    check_task(architecture.as_ref(), &opts.task)?;
    for tied in architecture.tied_params() {
        if tensors.remove(&tied).is_some() {
            report.ignored.push(format!("{tied} (tied)"));
        }
    }
    let exp = architecture.expected_params(&opts.task);
    let head = architecture.head_linears();
    let mut missing = Vec::new();
    let mut rng = crate::rng::stream(opts.seed, "head-init", 0);
    let normal = Normal::new(0.0f32, 0.02).expect("valid normal");
    let mut params = BTreeMap::new();
    for (name, shape) in &exp {
        let found = tensors.remove(name);
        let ok = found
            .as_ref()
            .map(|t| t.dims() == shape.as_slice())
            .unwrap_or(false);
        if ok {
            params.insert(
                name.clone(),
                found
                    .unwrap()
                    .to_dtype(opts.dtype)?
                    .to_device(&opts.device)?,
            );
            continue;
        }
        let is_head = head.iter().any(|h| name.starts_with(&format!("{h}.")));
        if !is_head {
            match found {
                Some(t) => missing.push(format!(
                    "{name} (shape {:?}, expected {:?})",
                    t.dims(),
                    shape
                )),
                None => missing.push(name.clone()),
            }
            continue;
        }
        let n: usize = shape.iter().product();
        let vals: Vec<f32> = if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            (0..n).map(|_| normal.sample(&mut rng)).collect()
        };
        let t = Tensor::from_vec(vals, shape.as_slice(), &opts.device)?.to_dtype(opts.dtype)?;
        report.initialised.push(name.clone());
        params.insert(name.clone(), t);
    }
    if !missing.is_empty() {
        return Err(Error::Model(format!(
            "checkpoint lacks {} parameter(s): {}",
            missing.len(),
            missing
                .iter()
                .take(8)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    report.ignored.extend(tensors.into_keys());
    Ok(Model {
        arch,
        task: opts.task.clone(),
        architecture,
        raw_config,
        weights: Weights::new(params, opts.device.clone(), opts.dtype),
        fingerprint: None,
    })
}

/// Canonical tensors, the names of ignored tensors, and the weight files read.
pub type CheckpointTensors = (BTreeMap<String, Tensor>, Vec<String>, Vec<PathBuf>);

/// Reads every tensor of a checkpoint folder under its canonical name.
pub fn read_tensors(dir: &Path, arch: Arch) -> Result<CheckpointTensors> {
    let files = weight_files(dir)?;
    let mut out = BTreeMap::new();
    let mut ignored = Vec::new();
    for f in &files {
        let ts = candle_core::safetensors::load(f, &Device::Cpu)
            .map_err(|e| Error::Model(format!("{}: {e}", f.display())))?;
        for (k, v) in ts {
            match arch.canonical_name(&k) {
                Some(c) => {
                    out.insert(c, v);
                }
                None => ignored.push(k),
            }
        }
    }
    Ok((out, ignored, files))
}

pub fn load_model(dir: &Path, opts: &LoadOptions) -> Result<(Model, LoadReport)> {
    let (arch, raw) = read_config(dir)?;
    let (tensors, ignored, files) = read_tensors(dir, arch)?;
    let mut report = LoadReport {
        ignored,
        base_sha256: sha256_files(&files)?,
        ..Default::default()
    };
    let mut model = build_model(arch, raw, tensors, opts, &mut report)?;
    model.fingerprint = Some(report.base_sha256.clone());
    Ok((model, report))
}

/// Files a model folder carries besides its config and weights, copied along wherever a
/// model folder is derived from another (merges, cut-down copies) so it loads with the same
/// tokenizer.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "merges.txt",
    "vocab.json",
    "chat_template.jinja",
    "generation_config.json",
];

/// Copies the tokenizer files `dir` has into `out`.
pub fn copy_tokenizer_files(dir: &Path, out: &Path) -> Result<()> {
    for f in TOKENIZER_FILES {
        let src = dir.join(f);
        if src.exists() {
            std::fs::copy(&src, out.join(f)).map_err(|e| Error::io(&src, e))?;
        }
    }
    Ok(())
}

/// Writes a copy of a checkpoint folder cut to its first `n` layers (quick tests on real
/// weights). Tokenizer files are copied along.
pub fn write_first_layers(dir: &Path, n: usize, out: &Path) -> Result<()> {
    let (arch, mut raw) = read_config(dir)?;
    let (tensors, _, _) = read_tensors(dir, arch)?;
    let full = arch.parse(&raw)?;
    raw["num_hidden_layers"] = n.into();
    let cut = arch.parse(&raw)?;
    // Head names are the same for every task; only their shapes differ.
    let task = full
        .default_task()
        .unwrap_or(Task::Classification { num_labels: 2 });
    let names = |a: &dyn crate::models::Architecture| -> std::collections::BTreeSet<String> {
        a.expected_params(&task)
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    };
    let (all, kept_names) = (names(full.as_ref()), names(cut.as_ref()));
    // What the cut model expects, and whatever the checkpoint has beyond the model's own.
    let kept: BTreeMap<String, Tensor> = tensors
        .into_iter()
        .filter(|(k, _)| kept_names.contains(k) || !all.contains(k))
        .collect();
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    write_json(&out.join("config.json"), &raw)?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    write_safetensors(&kept, Some(meta), &out.join("model.safetensors"))?;
    copy_tokenizer_files(dir, out)
}
