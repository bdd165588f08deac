//! GGUF import for LLaMA-architecture models: dequantise every tensor to f32 or bf16, undo
//! llama.cpp's rotary permutation of `q`/`k`, and write a Hugging Face-layout folder
//! (`config.json`, `model.safetensors`, `tokenizer.json` + `tokenizer_config.json` built from
//! the GGUF tokenizer metadata, with its chat template).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::{Error, Result};

#[derive(Clone, Debug, serde::Serialize)]
pub struct ImportReport {
    pub tensors: usize,
    pub parameters: usize,
    pub vocab_size: usize,
    pub tied_embeddings: bool,
    pub chat_template: bool,
}

fn md<'a>(c: &'a Content, key: &str) -> Result<&'a Value> {
    c.metadata
        .get(key)
        .ok_or_else(|| Error::Model(format!("GGUF metadata lacks `{key}`")))
}

fn md_u(c: &Content, key: &str) -> Result<usize> {
    let v = md(c, key)?;
    v.to_u32()
        .map(|x| x as usize)
        .or_else(|_| v.to_u64().map(|x| x as usize))
        .or_else(|_| v.to_i32().map(|x| x as usize))
        .map_err(|_| Error::Model(format!("GGUF `{key}` is not an integer")))
}

fn md_f(c: &Content, key: &str) -> Option<f64> {
    let v = c.metadata.get(key)?;
    v.to_f32().map(|x| x as f64).or_else(|_| v.to_f64()).ok()
}

fn md_str(c: &Content, key: &str) -> Option<String> {
    c.metadata
        .get(key)
        .and_then(|v| v.to_string().ok().cloned())
}

fn md_strs(c: &Content, key: &str) -> Result<Vec<String>> {
    md(c, key)?
        .to_vec()
        .map_err(|_| Error::Model(format!("GGUF `{key}` is not an array")))?
        .iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|_| Error::Model(format!("GGUF `{key}` holds a non-string")))
        })
        .collect()
}

/// Inverse of llama.cpp's `permute(w, n_head)`: rows are stored as (head, pair, half) and
/// transformers expects (head, half, pair).
fn unpermute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    Ok(w.reshape((heads, out / heads / 2, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

fn hf_name(gguf: &str) -> Option<String> {
    if gguf == "token_embd.weight" {
        return Some("model.embed_tokens.weight".into());
    }
    if gguf == "output_norm.weight" {
        return Some("model.norm.weight".into());
    }
    if gguf == "output.weight" {
        return Some("lm_head.weight".into());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, name) = rest.split_once('.')?;
    let mapped = match name {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{mapped}"))
}

/// Builds a `tokenizer.json` for a GPT-2 style byte-level BPE vocabulary.
fn tokenizer_json(c: &Content) -> Result<(serde_json::Value, Vec<String>)> {
    let model = md_str(c, "tokenizer.ggml.model").unwrap_or_default();
    if model != "gpt2" {
        return Err(Error::Model(format!(
            "GGUF tokenizer model `{model}` is not supported (only GPT-2 style byte-level BPE is imported)"
        )));
    }
    let tokens = md_strs(c, "tokenizer.ggml.tokens")?;
    let merges = md_strs(c, "tokenizer.ggml.merges")?;
    let types: Vec<i32> = match c.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|_| Error::Model("token_type is not an array".into()))?
            .iter()
            .map(|x| x.to_i32().unwrap_or(1))
            .collect(),
        None => vec![1; tokens.len()],
    };
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    // Token type 3 = control, 4 = user-defined: both are matched as whole added tokens.
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": types[i] == 3})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre = match md_str(c, "tokenizer.ggml.pre").as_deref() {
        Some("smollm") | Some("qwen2") | Some("starcoder") => {
            json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level]})
        }
        Some("llama-bpe") | Some("llama3") => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
             "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}),
        _ => byte_level,
    };
    let add_bos = c
        .metadata
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(false);
    let bos = md_u(c, "tokenizer.ggml.bos_token_id").ok();
    let post = match (add_bos, bos) {
        (true, Some(b)) => {
            let bt = tokens.get(b).cloned().unwrap_or_default();
            json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bt, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bt, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bt.clone(): {"id": bt, "ids": [b], "tokens": [bt]}}})
        }
        _ => {
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
        }
    };
    let tj = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": pre, "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges}
    });
    Ok((tj, tokens))
}

/// Imports `gguf_path` into `out_dir` with weights in `dtype` (f32 or bf16).
pub fn import_gguf(gguf_path: &Path, out_dir: &Path, dtype: DType) -> Result<ImportReport> {
    if !matches!(dtype, DType::F32 | DType::BF16) {
        return Err(Error::param("dtype", "GGUF import writes f32 or bf16"));
    }
    let mut f = std::fs::File::open(gguf_path).map_err(|e| Error::io(gguf_path, e))?;
    let c =
        Content::read(&mut f).map_err(|e| Error::Model(format!("{}: {e}", gguf_path.display())))?;
    let arch = md_str(&c, "general.architecture").unwrap_or_default();
    if arch != "llama" {
        return Err(Error::Model(format!(
            "GGUF architecture `{arch}` is not supported (llama only)"
        )));
    }
    let k = |s: &str| format!("llama.{s}");
    let hidden = md_u(&c, &k("embedding_length"))?;
    let layers = md_u(&c, &k("block_count"))?;
    let ffn = md_u(&c, &k("feed_forward_length"))?;
    let heads = md_u(&c, &k("attention.head_count"))?;
    let kv_heads = md_u(&c, &k("attention.head_count_kv")).unwrap_or(heads);
    let eps = md_f(&c, &k("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5);
    let theta = md_f(&c, &k("rope.freq_base")).unwrap_or(10000.0);
    let ctx_len = md_u(&c, &k("context_length")).unwrap_or(2048);
    let head_dim = md_u(&c, &k("rope.dimension_count")).unwrap_or(hidden / heads);

    let (tok_json, tokens) = tokenizer_json(&c)?;
    let tied = !c.tensor_infos.contains_key("output.weight");

    let mut tensors = BTreeMap::new();
    let mut names: Vec<&String> = c.tensor_infos.keys().collect();
    names.sort();
    let mut parameters = 0;
    for name in names {
        let Some(hf) = hf_name(name) else {
            // rope_freqs and similar derived tensors are recomputed from the config.
            continue;
        };
        let q = c.tensor(&mut f, name, &Device::Cpu)?;
        let mut t = q.dequantize(&Device::Cpu)?;
        if hf.ends_with("q_proj.weight") {
            t = unpermute(&t, heads)?;
        } else if hf.ends_with("k_proj.weight") {
            t = unpermute(&t, kv_heads)?;
        }
        parameters += t.elem_count();
        tensors.insert(hf, t.to_dtype(dtype)?);
    }
    let vocab_size = tensors
        .get("model.embed_tokens.weight")
        .ok_or_else(|| Error::Model("GGUF has no token_embd.weight".into()))?
        .dim(0)?;

    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let tok_name = |key: &str| md_u(&c, key).ok().and_then(|i| tokens.get(i).cloned());
    let bos_id = md_u(&c, "tokenizer.ggml.bos_token_id").ok();
    let eos_id = md_u(&c, "tokenizer.ggml.eos_token_id").ok();
    let pad_id = md_u(&c, "tokenizer.ggml.padding_token_id").ok();
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "rms_norm_eps": eps, "rope_theta": theta, "vocab_size": vocab_size,
        "max_position_embeddings": ctx_len, "tie_word_embeddings": tied, "hidden_act": "silu",
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
        "torch_dtype": if dtype == DType::BF16 { "bfloat16" } else { "float32" },
        "imported_from": gguf_path.file_name().map(|s| s.to_string_lossy().to_string()),
    });
    let chat_template = md_str(&c, "tokenizer.chat_template");
    let tok_cfg = json!({
        "bos_token": tok_name("tokenizer.ggml.bos_token_id"),
        "eos_token": tok_name("tokenizer.ggml.eos_token_id"),
        "pad_token": tok_name("tokenizer.ggml.padding_token_id"),
        "unk_token": tok_name("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": c.metadata.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false),
        "chat_template": chat_template,
        "model_max_length": ctx_len,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    let write = |name: &str, v: &serde_json::Value| crate::io::write_json(&out_dir.join(name), v);
    write("config.json", &config)?;
    write("tokenizer.json", &tok_json)?;
    write("tokenizer_config.json", &tok_cfg)?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    crate::io::write_safetensors(&tensors, Some(meta), &out_dir.join("model.safetensors"))?;
    Ok(ImportReport {
        tensors: tensors.len(),
        parameters,
        vocab_size,
        tied_embeddings: tied,
        chat_template: chat_template.is_some(),
    })
}
