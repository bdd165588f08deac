//! Loading Hugging Face checkpoints from a folder: `config.json` plus `model.safetensors` or a
//! sharded `model.safetensors.index.json`. Parameter names are normalised to the canonical
//! task-model names (with or without `bert.` / `roberta.` / `model.` prefixes, old
//! `gamma`/`beta` LayerNorm names); a missing task head is initialised as transformers does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand_distr::{Distribution, Normal};
use sha2::{Digest, Sha256};

use crate::models::{bert::EncoderConfig, llama::LlamaConfig, Arch, Config, Model, Task};
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

pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let s = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&s).map_err(|e| Error::Model(format!("{}: {e}", path.display())))
}

pub fn read_config(dir: &Path) -> Result<(Arch, serde_json::Value)> {
    let raw = read_json(&dir.join("config.json"))?;
    let mt = raw
        .get("model_type")
        .and_then(|v| v.as_str())
        .ok_or_else(|| Error::Model("config.json has no model_type".into()))?;
    Ok((Arch::from_model_type(mt)?, raw))
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

pub fn sha256_bytes(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

pub fn sha256_files(files: &[PathBuf]) -> Result<String> {
    let mut h = Sha256::new();
    for f in files {
        let mut file = std::fs::File::open(f).map_err(|e| Error::io(f, e))?;
        std::io::copy(&mut file, &mut h).map_err(|e| Error::io(f, e))?;
    }
    Ok(hex::encode(h.finalize()))
}

/// Maps a checkpoint tensor name to the canonical name, or `None` for tensors the task model
/// does not use (pre-training heads, buffers).
pub fn canonical_name(arch: Arch, name: &str) -> Option<String> {
    let mut n = name.to_string();
    if n.contains("LayerNorm.gamma") || n.contains("LayerNorm.beta") {
        n = n
            .replace("LayerNorm.gamma", "LayerNorm.weight")
            .replace("LayerNorm.beta", "LayerNorm.bias");
    }
    if n.ends_with("position_ids") || n.ends_with("rotary_emb.inv_freq") {
        return None;
    }
    match arch {
        Arch::Bert | Arch::Roberta => {
            let p = arch.backbone_prefix();
            if n.starts_with(&format!("{p}.")) {
                Some(n)
            } else if ["embeddings.", "encoder.", "pooler."]
                .iter()
                .any(|s| n.starts_with(s))
            {
                Some(format!("{p}.{n}"))
            } else if n.starts_with("classifier.") {
                Some(n)
            } else {
                None
            }
        }
        Arch::Llama => {
            if n.starts_with("model.") || n == "lm_head.weight" {
                Some(n)
            } else if ["embed_tokens.", "layers.", "norm."]
                .iter()
                .any(|s| n.starts_with(s))
            {
                Some(format!("model.{n}"))
            } else {
                None
            }
        }
    }
}

/// Expected canonical parameters and their shapes.
pub fn expected_params(arch: Arch, cfg: &Config, task: &Task) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    match cfg {
        Config::Encoder(c) => {
            let p = arch.backbone_prefix();
            let (h, f) = (c.hidden_size, c.intermediate_size);
            let e = format!("{p}.embeddings");
            out.push((format!("{e}.word_embeddings.weight"), vec![c.vocab_size, h]));
            out.push((
                format!("{e}.position_embeddings.weight"),
                vec![c.max_position_embeddings, h],
            ));
            out.push((
                format!("{e}.token_type_embeddings.weight"),
                vec![c.type_vocab_size, h],
            ));
            out.push((format!("{e}.LayerNorm.weight"), vec![h]));
            out.push((format!("{e}.LayerNorm.bias"), vec![h]));
            for i in 0..c.num_hidden_layers {
                let l = format!("{p}.encoder.layer.{i}");
                for (s, o, inp) in [
                    ("attention.self.query", h, h),
                    ("attention.self.key", h, h),
                    ("attention.self.value", h, h),
                    ("attention.output.dense", h, h),
                    ("intermediate.dense", f, h),
                    ("output.dense", h, f),
                ] {
                    out.push((format!("{l}.{s}.weight"), vec![o, inp]));
                    out.push((format!("{l}.{s}.bias"), vec![o]));
                }
                for s in ["attention.output.LayerNorm", "output.LayerNorm"] {
                    out.push((format!("{l}.{s}.weight"), vec![h]));
                    out.push((format!("{l}.{s}.bias"), vec![h]));
                }
            }
            let n = task.head_width().unwrap_or(1);
            match arch {
                Arch::Bert => {
                    out.push(("bert.pooler.dense.weight".into(), vec![h, h]));
                    out.push(("bert.pooler.dense.bias".into(), vec![h]));
                    out.push(("classifier.weight".into(), vec![n, h]));
                    out.push(("classifier.bias".into(), vec![n]));
                }
                _ => {
                    out.push(("classifier.dense.weight".into(), vec![h, h]));
                    out.push(("classifier.dense.bias".into(), vec![h]));
                    out.push(("classifier.out_proj.weight".into(), vec![n, h]));
                    out.push(("classifier.out_proj.bias".into(), vec![n]));
                }
            }
        }
        Config::Llama(c) => {
            let (h, f, hd) = (c.hidden_size, c.intermediate_size, c.head_dim());
            let (qd, kvd) = (c.num_attention_heads * hd, c.kv_heads() * hd);
            out.push(("model.embed_tokens.weight".into(), vec![c.vocab_size, h]));
            for i in 0..c.num_hidden_layers {
                let l = format!("model.layers.{i}");
                for (s, o, inp) in [
                    ("self_attn.q_proj", qd, h),
                    ("self_attn.k_proj", kvd, h),
                    ("self_attn.v_proj", kvd, h),
                    ("self_attn.o_proj", h, qd),
                ] {
                    out.push((format!("{l}.{s}.weight"), vec![o, inp]));
                    if c.attention_bias {
                        out.push((format!("{l}.{s}.bias"), vec![o]));
                    }
                }
                for (s, o, inp) in [
                    ("mlp.gate_proj", f, h),
                    ("mlp.up_proj", f, h),
                    ("mlp.down_proj", h, f),
                ] {
                    out.push((format!("{l}.{s}.weight"), vec![o, inp]));
                    if c.mlp_bias {
                        out.push((format!("{l}.{s}.bias"), vec![o]));
                    }
                }
                out.push((format!("{l}.input_layernorm.weight"), vec![h]));
                out.push((format!("{l}.post_attention_layernorm.weight"), vec![h]));
            }
            out.push(("model.norm.weight".into(), vec![h]));
            if !c.tie_word_embeddings {
                out.push(("lm_head.weight".into(), vec![c.vocab_size, h]));
            }
        }
    }
    out
}

pub fn parse_config(arch: Arch, raw: &serde_json::Value) -> Result<Config> {
    let bad = |e: serde_json::Error| Error::Model(format!("config.json: {e}"));
    Ok(match arch {
        Arch::Bert | Arch::Roberta => {
            let c: EncoderConfig = serde_json::from_value(raw.clone()).map_err(bad)?;
            c.validate()?;
            Config::Encoder(c)
        }
        Arch::Llama => {
            let c: LlamaConfig = serde_json::from_value(raw.clone()).map_err(bad)?;
            c.validate()?;
            Config::Llama(c)
        }
    })
}

fn check_task(arch: Arch, task: &Task) -> Result<()> {
    match (arch, task) {
        (Arch::Llama, Task::CausalLm) => Ok(()),
        (Arch::Bert | Arch::Roberta, Task::Classification { num_labels }) if *num_labels >= 2 => {
            Ok(())
        }
        (Arch::Bert | Arch::Roberta, Task::Regression) => Ok(()),
        (Arch::Bert | Arch::Roberta, Task::Classification { .. }) => Err(Error::param(
            "task",
            "classification needs at least two labels",
        )),
        (a, t) => Err(Error::param(
            "task",
            format!(
                "{} models are not supported for {} here",
                a.as_str(),
                t.name()
            ),
        )),
    }
}

/// Assembles a model from canonical tensors (already named), initialising a missing head.
pub fn build_model(
    arch: Arch,
    raw_config: serde_json::Value,
    mut tensors: BTreeMap<String, Tensor>,
    opts: &LoadOptions,
    report: &mut LoadReport,
) -> Result<Model> {
    check_task(arch, &opts.task)?;
    let config = parse_config(arch, &raw_config)?;
    if let Config::Llama(c) = &config {
        if c.tie_word_embeddings && tensors.remove("lm_head.weight").is_some() {
            report
                .ignored
                .push("lm_head.weight (tied to embed_tokens)".into());
        }
    }
    let exp = expected_params(arch, &config, &opts.task);
    let head: Vec<String> = match arch {
        Arch::Bert => vec!["bert.pooler.dense", "classifier"],
        Arch::Roberta => vec!["classifier.dense", "classifier.out_proj"],
        Arch::Llama => vec![],
    }
    .into_iter()
    .map(String::from)
    .collect();
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
        config,
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
            match canonical_name(arch, &k) {
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

/// Writes a copy of a checkpoint folder cut to its first `n` layers (quick tests on real
/// weights). Tokenizer files are copied along.
pub fn write_first_layers(dir: &Path, n: usize, out: &Path) -> Result<()> {
    let (arch, mut raw) = read_config(dir)?;
    let (tensors, _, _) = read_tensors(dir, arch)?;
    let layer_of = |name: &str| -> Option<usize> {
        let rest = name
            .split(".layer.")
            .nth(1)
            .or_else(|| name.split(".layers.").nth(1))?;
        rest.split('.').next()?.parse().ok()
    };
    let kept: BTreeMap<String, Tensor> = tensors
        .into_iter()
        .filter(|(k, _)| layer_of(k).is_none_or(|l| l < n))
        .collect();
    raw["num_hidden_layers"] = n.into();
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let p = out.join("config.json");
    std::fs::write(&p, serde_json::to_vec_pretty(&raw).expect("json"))
        .map_err(|e| Error::io(&p, e))?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    crate::artifact::write_safetensors(&kept, Some(meta), &out.join("model.safetensors"))?;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
        "chat_template.jinja",
    ] {
        let src = dir.join(f);
        if src.exists() {
            std::fs::copy(&src, out.join(f)).map_err(|e| Error::io(&src, e))?;
        }
    }
    Ok(())
}
