//! Tiny random models for fast unit tests, gradient checks and shape benchmarks.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use rand_distr::{Distribution, Normal};
use serde_json::json;

use crate::models::{Arch, Model, Task};
use crate::pretrained::{build_model, LoadOptions, LoadReport};
use crate::Result;

/// A config.json for a tiny model of the given architecture.
pub fn tiny_config(arch: Arch) -> serde_json::Value {
    arch.tiny_config()
}

/// The task a tiny model of `arch` is built for: its own (a causal LM's), else two classes.
pub fn tiny_task(arch: Arch) -> Task {
    arch.parse(&arch.tiny_config())
        .ok()
        .and_then(|a| a.default_task())
        .unwrap_or(Task::Classification { num_labels: 2 })
}

/// A norm layer's scale: drawn around 1, not 0.
fn is_norm_scale(name: &str, shape: &[usize]) -> bool {
    shape.len() == 1
        && (name.contains("LayerNorm") || name.contains("norm"))
        && name.ends_with(".weight")
}

/// Random weights (normal, std `std`; norm weights near 1) for every parameter the config
/// and task need, by canonical name.
pub fn random_tensors(
    arch: Arch,
    config: &serde_json::Value,
    task: &Task,
    std: f32,
    seed: u64,
) -> Result<BTreeMap<String, Tensor>> {
    let shapes: BTreeMap<String, Vec<usize>> = arch
        .parse(config)?
        .expected_params(task)
        .into_iter()
        .collect();
    let mut rng = crate::rng::stream(seed, "tiny-model", 0);
    let normal = Normal::new(0.0f32, std).expect("valid");
    let mut out = BTreeMap::new();
    for (name, shape) in shapes {
        let n: usize = shape.iter().product();
        let scale = is_norm_scale(&name, &shape);
        let vals: Vec<f32> = (0..n)
            .map(|_| {
                let r = normal.sample(&mut rng);
                if scale {
                    1.0 + r
                } else {
                    r
                }
            })
            .collect();
        out.insert(
            name,
            Tensor::from_vec(vals, shape.as_slice(), &Device::Cpu)?,
        );
    }
    Ok(out)
}

/// Like [`random_tensors`] but drawn on `device` in `dtype` (fast for billion-parameter shapes;
/// not reproducible across devices — for timing, not for comparisons).
pub fn random_tensors_on(
    arch: Arch,
    config: &serde_json::Value,
    task: &Task,
    std: f32,
    device: &Device,
    dtype: DType,
) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for (name, shape) in arch.parse(config)?.expected_params(task) {
        let mean = if is_norm_scale(&name, &shape) {
            1.0f32
        } else {
            0.0
        };
        let t = Tensor::randn(mean, std, shape.as_slice(), device)?.to_dtype(dtype)?;
        out.insert(name, t);
    }
    Ok(out)
}

pub fn tiny_model(arch: Arch, task: Task, dtype: DType, seed: u64) -> Result<Model> {
    let cfg = tiny_config(arch);
    let tensors = random_tensors(arch, &cfg, &task, 0.3, seed)?;
    let opts = LoadOptions {
        task,
        dtype,
        device: Device::Cpu,
        seed,
    };
    let mut report = LoadReport::default();
    build_model(arch, cfg, tensors, &opts, &mut report)
}

/// Words of the tiny test vocabulary (ids follow the five special tokens).
pub const TINY_WORDS: &[&str] = &[
    "good", "bad", "great", "awful", "fine", "movie", "film", "plot", "acting", "the", "a", "is",
    "was", "not", "very", "really", "boring", "fun", "love", "hate", "hello", "how", "are", "you",
    "i", "am", "well", "thanks", "what", "time", "it", "now", "yes", "no", "maybe", "story",
    "ending", "music", "cast", "and", "but", "so", "too", "much", "little",
];

/// A WordLevel `tokenizer.json` over `[CLS] [PAD] [SEP] [UNK] <eos>` + [`TINY_WORDS`]
/// (BERT-style `[CLS] … [SEP]` for classifiers, nothing added for a causal LM).
pub fn tiny_tokenizer_json(arch: Arch) -> serde_json::Value {
    let specials = ["[CLS]", "[PAD]", "[SEP]", "[UNK]", "<eos>"];
    let mut vocab = serde_json::Map::new();
    for (i, t) in specials.iter().chain(TINY_WORDS.iter()).enumerate() {
        vocab.insert(t.to_string(), json!(i));
    }
    let added: Vec<_> = specials
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let post = match tiny_task(arch) {
        Task::CausalLm => serde_json::Value::Null,
        _ => json!({"type": "BertProcessing", "sep": ["[SEP]", 2], "cls": ["[CLS]", 0]}),
    };
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": {"type": "Lowercase"}, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": post, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    })
}

/// Writes a complete tiny model folder (config, random weights without a task head,
/// tokenizer) so the whole pipeline can run in milliseconds.
pub fn write_tiny_model_dir(dir: &std::path::Path, arch: Arch, seed: u64) -> Result<()> {
    let mut cfg = tiny_config(arch);
    cfg["vocab_size"] = json!(5 + TINY_WORDS.len());
    cfg["pad_token_id"] = json!(1);
    let task = tiny_task(arch);
    if task == Task::CausalLm {
        cfg["eos_token_id"] = json!(4);
    }
    let mut tensors = random_tensors(arch, &cfg, &task, 0.3, seed)?;
    // Pretrained checkpoints come without a task head: loading initialises one.
    let head = arch.parse(&cfg)?.head_linears();
    tensors.retain(|k, _| !head.iter().any(|h| k.starts_with(&format!("{h}."))));
    std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
    crate::io::write_json(&dir.join("config.json"), &cfg)?;
    crate::io::write_json(&dir.join("tokenizer.json"), &tiny_tokenizer_json(arch))?;
    crate::io::write_json(
        &dir.join("tokenizer_config.json"),
        &json!({"eos_token": "<eos>", "pad_token": "[PAD]"}),
    )?;
    crate::io::write_safetensors(&tensors, None, &dir.join("model.safetensors"))
}

/// Largest absolute difference between two tensors of the same shape, as f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    a.sub(b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_dtype(DType::F64))
        .and_then(|d| d.to_scalar::<f64>())
        .expect("tensors of the same shape and device")
}
