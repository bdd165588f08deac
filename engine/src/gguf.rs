//! GGUF import for LLaMA-architecture models: dequantise every tensor to f32 or bf16, undo
//! llama.cpp's rotary permutation of `q`/`k`, and write a Hugging Face-layout folder
//! (`config.json`, `model.safetensors`, `tokenizer.json` + `tokenizer_config.json` built from
//! the GGUF tokenizer metadata, with its chat template).

use std::collections::BTreeMap;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::{Error, Result};

/// What an import may cost: a file is untrusted input, and importing dequantises every
/// tensor into memory.
#[derive(Clone, Copy, Debug)]
pub struct ImportLimits {
    /// Most parameters (tensor elements) a model may have.
    pub max_params: u64,
}

impl ImportLimits {
    /// No cap (the operator's own command line).
    pub const NONE: ImportLimits = ImportLimits {
        max_params: u64::MAX,
    };
}

fn bad(why: impl Into<String>) -> Error {
    Error::Model(format!("malformed GGUF: {}", why.into()))
}

/// Reads the GGUF header with every count, length and size bounded by what the file can
/// hold — before candle's reader, which trusts them (a zero alignment divides by zero, a
/// huge array length allocates it, tensor sizes overflow) — and checks the tensors: known
/// types, 1-4 dimensions, element counts without overflow and within `limits`, data inside
/// the file.
pub fn check_header(path: &Path, limits: &ImportLimits) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut r = Bounded {
        r: BufReader::new(file),
        pos: 0,
        len,
    };
    if r.bytes::<4>()? != *b"GGUF" {
        return Err(bad("not a GGUF file (no GGUF magic)"));
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(bad(format!("version {version} (2 and 3 are read)")));
    }
    let tensors = r.count(24)?;
    let kvs = r.count(13)?;
    let mut alignment = 32u64;
    for _ in 0..kvs {
        let key = r.string()?;
        let ty = r.u32()?;
        if key == "general.alignment" {
            alignment = match ty {
                4 => r.u32()? as u64,
                10 => r.u64()?,
                _ => return Err(bad("`general.alignment` is not an unsigned integer")),
            };
            if alignment == 0 || !alignment.is_power_of_two() || alignment > 1 << 20 {
                return Err(bad(format!(
                    "`general.alignment` is {alignment}: a power of two up to 1 MiB"
                )));
            }
        } else {
            r.skip_value(ty, 0)?;
        }
    }
    let mut infos = Vec::with_capacity(tensors.min(1 << 16) as usize);
    let mut params: u64 = 0;
    for _ in 0..tensors {
        let name = r.string()?;
        let n_dims = r.u32()?;
        if !(1..=4).contains(&n_dims) {
            return Err(bad(format!("tensor `{name}` has {n_dims} dimensions")));
        }
        let mut elems: u64 = 1;
        for _ in 0..n_dims {
            let d = r.u64()?;
            elems = elems.checked_mul(d).filter(|&e| e > 0).ok_or_else(|| {
                bad(format!(
                    "tensor `{name}` has dimensions that overflow or are 0"
                ))
            })?;
        }
        let ty = ggml_type(r.u32()?)
            .ok_or_else(|| bad(format!("tensor `{name}` has an unknown type")))?;
        let offset = r.u64()?;
        let block = ty.block_size() as u64;
        if !elems.is_multiple_of(block) {
            return Err(bad(format!(
                "tensor `{name}` is not a whole number of blocks"
            )));
        }
        let bytes = (elems / block)
            .checked_mul(ty.type_size() as u64)
            .ok_or_else(|| bad(format!("tensor `{name}` is too large")))?;
        params = params
            .checked_add(elems)
            .ok_or_else(|| bad("the parameter count overflows"))?;
        infos.push((name, offset, bytes));
    }
    if params > limits.max_params {
        return Err(Error::Model(format!(
            "the model has {params} parameters; imports are limited to {}",
            limits.max_params
        )));
    }
    let data = r.pos.div_ceil(alignment) * alignment;
    for (name, offset, bytes) in infos {
        let end = data
            .checked_add(offset)
            .and_then(|o| o.checked_add(bytes))
            .ok_or_else(|| bad(format!("tensor `{name}` lies outside the file")))?;
        if end > len {
            return Err(bad(format!("tensor `{name}` lies outside the file")));
        }
    }
    Ok(())
}

fn ggml_type(t: u32) -> Option<GgmlDType> {
    use GgmlDType::*;
    Some(match t {
        0 => F32,
        1 => F16,
        2 => Q4_0,
        3 => Q4_1,
        6 => Q5_0,
        7 => Q5_1,
        8 => Q8_0,
        9 => Q8_1,
        10 => Q2K,
        11 => Q3K,
        12 => Q4K,
        13 => Q5K,
        14 => Q6K,
        15 => Q8K,
        30 => BF16,
        _ => return None,
    })
}

/// A reader that knows how many bytes are left, so no length read from the file can ask for
/// more than the file has.
struct Bounded<R> {
    r: R,
    pos: u64,
    len: u64,
}

impl<R: Read + Seek> Bounded<R> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.r
            .read_exact(&mut b)
            .map_err(|_| bad("the file ends inside its header"))?;
        self.pos += N as u64;
        Ok(b)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes::<4>()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes::<8>()?))
    }
    /// A count of items of at least `min_size` bytes each: no more than the rest can hold.
    fn count(&mut self, min_size: u64) -> Result<u64> {
        let n = self.u64()?;
        if n.saturating_mul(min_size) > self.len.saturating_sub(self.pos) {
            return Err(bad(format!("a count of {n} items exceeds the file")));
        }
        Ok(n)
    }
    fn skip(&mut self, n: u64) -> Result<()> {
        if n > self.len.saturating_sub(self.pos) {
            return Err(bad("a value runs past the end of the file"));
        }
        self.r
            .seek(SeekFrom::Current(n as i64))
            .map_err(|_| bad("seek failed"))?;
        self.pos += n;
        Ok(())
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()?;
        if n > 1 << 20 || n > self.len.saturating_sub(self.pos) {
            return Err(bad(format!("a string of {n} bytes")));
        }
        let mut b = vec![0u8; n as usize];
        self.r
            .read_exact(&mut b)
            .map_err(|_| bad("the file ends inside its header"))?;
        self.pos += n;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }
    fn skip_value(&mut self, ty: u32, depth: u32) -> Result<()> {
        let fixed = match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => {
                let n = self.u64()?;
                return self.skip(n);
            }
            9 => {
                if depth > 2 {
                    return Err(bad("arrays nested too deep"));
                }
                let elem = self.u32()?;
                let n = self.count(1)?;
                for _ in 0..n {
                    self.skip_value(elem, depth + 1)?;
                }
                return Ok(());
            }
            t => return Err(bad(format!("unknown metadata type {t}"))),
        };
        self.skip(fixed)
    }
}

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

/// Imports `gguf_path` into `out_dir` with weights in `dtype` (f32 or bf16). The file is
/// untrusted: its header is checked first ([`check_header`]), every model size read from it
/// is bounded, and the chat template it carries must render within its limits.
pub fn import_gguf(
    gguf_path: &Path,
    out_dir: &Path,
    dtype: DType,
    limits: &ImportLimits,
) -> Result<ImportReport> {
    if !matches!(dtype, DType::F32 | DType::BF16) {
        return Err(Error::param("dtype", "GGUF import writes f32 or bf16"));
    }
    check_header(gguf_path, limits)?;
    let mut f = std::fs::File::open(gguf_path).map_err(|e| Error::io(gguf_path, e))?;
    let c = Content::read(&mut f).map_err(|e| bad(e.to_string()))?;
    let arch = md_str(&c, "general.architecture").unwrap_or_default();
    if arch != "llama" {
        return Err(Error::Model(format!(
            "GGUF architecture `{arch}` is not supported (llama only)"
        )));
    }
    let k = |s: &str| format!("llama.{s}");
    // Every size is bounded (and a default computed only when the key is absent).
    let sized = |key: &str, max: usize| -> Result<usize> {
        let v = md_u(&c, &k(key))?;
        if v == 0 || v > max {
            return Err(Error::Model(format!(
                "GGUF `{}` is {v}: expected 1 to {max}",
                k(key)
            )));
        }
        Ok(v)
    };
    let hidden = sized("embedding_length", 1 << 16)?;
    let layers = sized("block_count", 1024)?;
    let ffn = sized("feed_forward_length", 1 << 18)?;
    let heads = sized("attention.head_count", 1024)?;
    let kv_heads = match c.metadata.get(&k("attention.head_count_kv")) {
        Some(_) => sized("attention.head_count_kv", heads)?,
        None => heads,
    };
    if heads % kv_heads != 0 {
        return Err(Error::Model(format!(
            "GGUF head counts: {heads} attention heads are not a multiple of {kv_heads} KV heads"
        )));
    }
    let eps = md_f(&c, &k("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5);
    let theta = md_f(&c, &k("rope.freq_base")).unwrap_or(10000.0);
    let ctx_len = match c.metadata.get(&k("context_length")) {
        Some(_) => sized("context_length", 1 << 24)?,
        None => 2048,
    };
    let head_dim = match c.metadata.get(&k("rope.dimension_count")) {
        Some(_) => sized("rope.dimension_count", 1 << 12)?,
        None => hidden / heads,
    };
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(Error::Model(format!(
            "GGUF head size {head_dim} (from {hidden} / {heads}) must be even and at least 2"
        )));
    }
    let chat_template = md_str(&c, "tokenizer.chat_template");
    if let Some(t) = &chat_template {
        // The template is code from the file: refused now rather than at training time.
        crate::data::check_chat_template(t)
            .map_err(|e| Error::Model(format!("GGUF `tokenizer.chat_template`: {e}")))?;
    }

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
