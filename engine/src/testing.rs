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

/// GGUF files built byte by byte: a minimal valid LLaMA ([`gguf::base`] + [`gguf::build`]) to
/// break one field at a time in tests of the importer.
pub mod gguf {
    /// A metadata value.
    pub enum V {
        U32(u32),
        U64(u64),
        F32(f32),
        Bool(bool),
        Str(&'static str),
        Strs(Vec<String>),
        /// An array header claiming `n` strings, with nothing behind it.
        ClaimedStrs(u64),
    }

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    fn value(out: &mut Vec<u8>, v: &V) {
        match v {
            V::U32(x) => {
                out.extend(4u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            V::U64(x) => {
                out.extend(10u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            V::F32(x) => {
                out.extend(6u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            V::Bool(b) => {
                out.extend(7u32.to_le_bytes());
                out.push(*b as u8);
            }
            V::Str(s) => {
                out.extend(8u32.to_le_bytes());
                string(out, s);
            }
            V::Strs(v) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((v.len() as u64).to_le_bytes());
                for s in v {
                    string(out, s);
                }
            }
            V::ClaimedStrs(n) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend(n.to_le_bytes());
            }
        }
    }

    /// A tiny LLaMA (hidden 8, one layer, FFN 16, 2 heads / 1 KV head, 6 tokens), f32 tensors.
    /// Metadata pairs and `(tensor name, dimensions)` of a file.
    pub type Parts = (Vec<(&'static str, V)>, Vec<(String, Vec<u64>)>);

    pub fn base() -> Parts {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "<s>", "</s>"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let kvs = vec![
            ("general.architecture", V::Str("llama")),
            ("llama.embedding_length", V::U32(8)),
            ("llama.block_count", V::U32(1)),
            ("llama.feed_forward_length", V::U32(16)),
            ("llama.attention.head_count", V::U32(2)),
            ("llama.attention.head_count_kv", V::U32(1)),
            ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
            ("tokenizer.ggml.model", V::Str("gpt2")),
            ("tokenizer.ggml.tokens", V::Strs(tokens)),
            ("tokenizer.ggml.merges", V::Strs(vec!["a b".into()])),
            ("tokenizer.ggml.bos_token_id", V::U32(4)),
            ("tokenizer.ggml.eos_token_id", V::U32(5)),
            ("tokenizer.ggml.add_bos_token", V::Bool(false)),
        ];
        let (h, f, kv, v) = (8u64, 16u64, 4u64, 6u64);
        let tensors = vec![
            ("token_embd.weight".into(), vec![h, v]),
            ("output_norm.weight".into(), vec![h]),
            ("blk.0.attn_norm.weight".into(), vec![h]),
            ("blk.0.ffn_norm.weight".into(), vec![h]),
            ("blk.0.attn_q.weight".into(), vec![h, h]),
            ("blk.0.attn_k.weight".into(), vec![h, kv]),
            ("blk.0.attn_v.weight".into(), vec![h, kv]),
            ("blk.0.attn_output.weight".into(), vec![h, h]),
            ("blk.0.ffn_gate.weight".into(), vec![h, f]),
            ("blk.0.ffn_up.weight".into(), vec![h, f]),
            ("blk.0.ffn_down.weight".into(), vec![f, h]),
        ];
        (kvs, tensors)
    }

    /// Serialises a GGUF v3 file (f32 tensors, alignment 32 unless a kv sets another).
    pub fn build(kvs: &[(&str, V)], tensors: &[(String, Vec<u64>)]) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        out.extend((kvs.len() as u64).to_le_bytes());
        for (k, v) in kvs {
            string(&mut out, k);
            value(&mut out, v);
        }
        let mut offset = 0u64;
        let mut sizes = Vec::new();
        for (name, dims) in tensors {
            string(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(0u32.to_le_bytes());
            out.extend(offset.to_le_bytes());
            let bytes = dims
                .iter()
                .fold(4u64, |a, &d| a.saturating_mul(d))
                .min(1 << 20);
            sizes.push(bytes);
            offset += bytes.div_ceil(32) * 32;
        }
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        for b in sizes {
            let n = b.div_ceil(32) * 32;
            out.extend(std::iter::repeat_n(0u8, n as usize));
        }
        out
    }

    /// The minimal model with metadata `key` set to `v` (added or replaced).
    pub fn with(key: &'static str, v: V) -> Vec<u8> {
        let (mut kvs, tensors) = base();
        kvs.retain(|(k, _)| *k != key);
        kvs.push((key, v));
        build(&kvs, &tensors)
    }
}
