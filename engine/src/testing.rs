//! Tiny random models for fast unit tests, gradient checks and shape benchmarks.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use rand_distr::{Distribution, Normal};
use serde_json::json;

use crate::checkpoint::{build_model, LoadOptions, LoadReport};
use crate::models::{Arch, Model, Task};
use crate::Result;

/// A config.json for a tiny model of the given architecture.
pub fn tiny_config(arch: Arch) -> serde_json::Value {
    match arch {
        Arch::Bert => json!({
            "model_type": "bert", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 24, "hidden_act": "gelu",
            "max_position_embeddings": 32, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
            "pad_token_id": 0
        }),
        Arch::Roberta => json!({
            "model_type": "roberta", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 24, "hidden_act": "gelu",
            "max_position_embeddings": 40, "type_vocab_size": 1, "layer_norm_eps": 1e-5,
            "pad_token_id": 1
        }),
        Arch::Llama => json!({
            "model_type": "llama", "vocab_size": 50, "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": false,
            "max_position_embeddings": 64
        }),
    }
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
    let mut shapes = BTreeMap::new();
    let cfg = crate::checkpoint::parse_config(arch, config)?;
    for (name, shape) in crate::checkpoint::expected_params(arch, &cfg, task) {
        shapes.insert(name, shape);
    }
    let mut rng = crate::rng::stream(seed, "tiny-model", 0);
    let normal = Normal::new(0.0f32, std).expect("valid");
    let mut out = BTreeMap::new();
    for (name, shape) in shapes {
        let n: usize = shape.iter().product();
        let is_norm = shape.len() == 1 && (name.contains("LayerNorm") || name.contains("norm"));
        let vals: Vec<f32> = (0..n)
            .map(|_| {
                let r = normal.sample(&mut rng);
                if is_norm && name.ends_with(".weight") {
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
