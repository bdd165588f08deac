//! LLaMA for causal LM: RMSNorm, RoPE (θ from config), grouped-query attention with a causal
//! mask, SwiGLU MLP, tied or separate `lm_head`. Batches are right-padded, so the causal mask
//! alone keeps real tokens from attending to padding.

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{Arch, ArchEntry, Architecture, Batch, KvCache, MlpKind, ParamShape, Task};
use crate::nn::fused::{rope_heads, scaled_masked_softmax, swiglu, MaskRows};
use crate::nn::{rope_tables, Ctx, Param, Weights};
use crate::serve::RowGroups;
use crate::{Error, Result};

pub const ENTRY: ArchEntry = ArchEntry {
    model_type: "llama",
    canonical_name: |n| {
        super::canonical_under(
            n,
            PREFIX,
            &["embed_tokens.", "layers.", "norm."],
            &[LM_HEAD],
        )
    },
    parse: |raw| {
        let c: LlamaConfig = super::parse_json(raw)?;
        c.validate()?;
        Ok(Box::new(c))
    },
    tiny_config: || {
        json!({
            "model_type": "llama", "vocab_size": 50, "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": false,
            "max_position_embeddings": 64
        })
    },
};

const PREFIX: &str = "model";
const EMBED: &str = "model.embed_tokens.weight";
const FINAL_NORM: &str = "model.norm";
const LM_HEAD: &str = "lm_head.weight";

// Submodules of one block (relative to `model.layers.{i}`): written once, used by the forward
// pass, the expected parameters and the linear lists alike.
const Q: &str = "self_attn.q_proj";
const K: &str = "self_attn.k_proj";
const V: &str = "self_attn.v_proj";
const O: &str = "self_attn.o_proj";
const GATE: &str = "mlp.gate_proj";
const UP: &str = "mlp.up_proj";
const DOWN: &str = "mlp.down_proj";
const INPUT_NORM: &str = "input_layernorm";
const POST_NORM: &str = "post_attention_layernorm";
const ATTENTION: [&str; 4] = [Q, K, V, O];
const MLP: [(&str, MlpKind); 3] = [
    (GATE, MlpKind::Gate),
    (UP, MlpKind::Up),
    (DOWN, MlpKind::Down),
];

/// The output projection's weight: `lm_head`, or the embedding when they are tied.
fn head_name(w: &Weights) -> &'static str {
    if w.contains(LM_HEAD) {
        LM_HEAD
    } else {
        EMBED
    }
}

fn layer(i: usize, sub: &str) -> String {
    format!("{PREFIX}.layers.{i}.{sub}")
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

impl LlamaConfig {
    /// The final hidden states `(B·T, H)` and the output projection's name (the embedding
    /// when tied).
    fn hidden_and_head(
        &self,
        w: &Weights,
        batch: &Batch,
        ctx: &mut Ctx,
    ) -> Result<(Tensor, &'static str)> {
        self.hidden(w, &batch.input_ids, ctx, None)
    }

    /// The final hidden states of `ids (B, T)` and the output projection's name. With a
    /// cache, `ids` follow the `cache.len` tokens it holds: their keys and values are reused
    /// (positions continue from there) and the new ones appended.
    fn hidden(
        &self,
        w: &Weights,
        ids: &Tensor,
        ctx: &mut Ctx,
        mut cache: Option<&mut KvCache>,
    ) -> Result<(Tensor, &'static str)> {
        let (b, t) = ids.dims2()?;
        let (nh, nkv, hd) = (self.num_attention_heads, self.kv_heads(), self.head_dim());
        let dev = ids.device();
        let dtype = w.dtype;
        let past = cache.as_ref().map_or(0, |c| c.len);
        let (cos, sin) = rope_tables(past + t, hd, self.rope_theta, dtype, dev)?;
        let (cos, sin) = if past > 0 {
            (cos.narrow(0, past, t)?, sin.narrow(0, past, t)?)
        } else {
            (cos, sin)
        };
        // Grouped-query attention without repeating K and V (see `attend`): the causal mask is
        // tiled `rep` times.
        let rep = nh / nkv;
        let mask = causal_mask(t, past, rep, dtype, dev)?;
        let eps = self.rms_norm_eps;
        let mut h = w.embedding(EMBED, ids)?;
        for i in 0..self.num_hidden_layers {
            let l = |sub: &str| layer(i, sub);
            let x = w.rms_norm(&l(INPUT_NORM), &h, eps)?;
            let q = w.linear(&l(Q), &x, ctx)?;
            let k = w.linear(&l(K), &x, ctx)?;
            let v = w.linear(&l(V), &x, ctx)?;
            let q = rope_heads(&q.reshape((b, t, nh, hd))?, &cos, &sin)?;
            let k = rope_heads(&k.reshape((b, t, nkv, hd))?, &cos, &sin)?;
            let v = v.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
            let (k, v) = match cache.as_deref_mut() {
                None => (k, v),
                Some(c) => c.append(i, k, v)?,
            };
            let a = self.attend(&q, &k, &v, &mask)?;
            let a = w.linear(&l(O), &a, ctx)?;
            h = (h + a)?;
            let x = w.rms_norm(&l(POST_NORM), &h, eps)?;
            let g = w.linear(&l(GATE), &x, ctx)?;
            let u = w.linear(&l(UP), &x, ctx)?;
            let m = w.linear(&l(DOWN), &swiglu(&g, &u)?, ctx)?;
            h = (h + m)?;
        }
        if let Some(c) = cache {
            c.len += t;
        }
        let h = w.rms_norm(FINAL_NORM, &h, eps)?;
        let head = head_name(w);
        let hidden = h.dim(D::Minus1)?;
        Ok((h.reshape(((), hidden))?, head))
    }

    /// One decoding step over sequences of different overlays and context lengths: every
    /// sequence's new tokens are rows of one `(N, H)` activation, so each linear layer runs
    /// once per distinct weight tensor (see [`RowGroups`]); attention, which reads each
    /// sequence's own cache, runs per sequence. The logits after each one's last new token.
    fn step(&self, seqs: &mut [crate::serve::StepSeq<'_>]) -> Result<Tensor> {
        let (nh, nkv, hd) = (self.num_attention_heads, self.kv_heads(), self.head_dim());
        let rep = nh / nkv;
        let first = &seqs[0].model.weights;
        let (dev, dtype) = (first.device.clone(), first.dtype);
        let groups = RowGroups::new(seqs.iter().map(|s| (s.ids.len(), &s.model.weights)));
        let ids: Vec<u32> = seqs.iter().flat_map(|s| s.ids.iter().copied()).collect();
        let span: Vec<(usize, usize, usize)> = seqs
            .iter()
            .scan(0, |row, s| {
                let r = *row;
                *row += s.ids.len();
                Some((r, s.ids.len(), s.cache.len))
            })
            .collect();
        let longest = span.iter().map(|&(_, t, past)| past + t).max().unwrap_or(0);
        let (cos, sin) = rope_tables(longest, hd, self.rope_theta, dtype, &dev)?;
        let eps = self.rms_norm_eps;
        let n = ids.len();
        let mut h = groups.embedding(EMBED, &Tensor::from_vec(ids, n, &dev)?)?;
        for i in 0..self.num_hidden_layers {
            let l = |sub: &str| layer(i, sub);
            let x = groups.rms_norm(&l(INPUT_NORM), &h, eps)?;
            let q = groups.linear(&l(Q), &x)?;
            let k = groups.linear(&l(K), &x)?;
            let v = groups.linear(&l(V), &x)?;
            let mut attended = Vec::with_capacity(seqs.len());
            for (s, &(r, t, past)) in seqs.iter_mut().zip(&span) {
                let (cos, sin) = (cos.narrow(0, past, t)?, sin.narrow(0, past, t)?);
                let q = rope_heads(&q.narrow(0, r, t)?.reshape((1, t, nh, hd))?, &cos, &sin)?;
                let k = rope_heads(&k.narrow(0, r, t)?.reshape((1, t, nkv, hd))?, &cos, &sin)?;
                let v = v
                    .narrow(0, r, t)?
                    .reshape((1, t, nkv, hd))?
                    .transpose(1, 2)?
                    .contiguous()?;
                let (k, v) = s.cache.append(i, k, v)?;
                let mask = causal_mask(t, past, rep, dtype, &dev)?;
                attended.push(self.attend(&q, &k, &v, &mask)?.reshape((t, nh * hd))?);
            }
            let a = groups.linear(&l(O), &Tensor::cat(&attended, 0)?)?;
            h = (h + a)?;
            let x = groups.rms_norm(&l(POST_NORM), &h, eps)?;
            let g = groups.linear(&l(GATE), &x)?;
            let u = groups.linear(&l(UP), &x)?;
            let m = groups.linear(&l(DOWN), &swiglu(&g, &u)?)?;
            h = (h + m)?;
        }
        for s in seqs.iter_mut() {
            s.cache.len += s.ids.len();
        }
        let last: Vec<u32> = span.iter().map(|&(r, t, _)| (r + t - 1) as u32).collect();
        let h = h.index_select(&Tensor::from_vec(last, seqs.len(), &dev)?, 0)?;
        let lasts = RowGroups::new(seqs.iter().map(|s| (1, &s.model.weights)));
        let h = lasts.rms_norm(FINAL_NORM, &h, eps)?;
        lasts.project(head_name(first), &h)
    }

    /// Grouped-query attention of RoPE'd queries `(B, heads, T, D)` over keys and values
    /// `(B, KV heads, T', D)`: the `rep` query heads that share a KV head are stacked along the
    /// rows, `(B, KV, rep·T, D)`, so one matmul per KV head serves them all (`mask` is tiled
    /// to match, see [`causal_mask`]). `(B, T, heads·D)`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, nh, t, hd) = q.dims4()?;
        let nkv = self.kv_heads();
        let scale = 1.0 / (hd as f64).sqrt();
        let q = q.reshape((b, nkv, nh / nkv * t, hd))?;
        let probs = scaled_masked_softmax(&q.matmul(&k.t()?)?, scale, mask, MaskRows::PerQuery)?;
        Ok(probs
            .matmul(v)?
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?)
    }

    /// The logits of `(B·T, H)` hidden states through the output projection.
    fn project(&self, w: &Weights, h2: &Tensor, head: &str) -> Result<Tensor> {
        Ok(match w.params.get(head) {
            Some(Param::Trainable(v)) => h2.matmul(&v.as_tensor().t()?)?,
            Some(Param::Frozen(t)) => crate::nn::frozen_linear(h2, t, None)?,
            None => return Err(Error::Model("missing lm_head".into())),
        })
    }
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }
    pub fn validate(&self) -> Result<()> {
        if self.num_attention_heads == 0 || self.kv_heads() == 0 {
            return Err(Error::Model(
                "num_attention_heads and num_key_value_heads must be at least 1".into(),
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return Err(Error::Model(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.kv_heads()
            )));
        }
        if let Some(a) = &self.hidden_act {
            if a != "silu" {
                return Err(Error::Model(format!(
                    "unsupported hidden_act `{a}` for llama (silu)"
                )));
            }
        }
        Ok(())
    }
}

/// The causal mask for `t` new queries after `past` cached tokens, `rep` query heads stacked
/// along the rows: `(rep·t, past + t)`; query `i` sees keys `0..=past + i`.
fn causal_mask(
    t: usize,
    past: usize,
    rep: usize,
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let tk = past + t;
    let m: Vec<f32> = (0..rep * t)
        .flat_map(|r| {
            let i = past + r % t;
            (0..tk).map(move |j| if j > i { -1e9 } else { 0.0 })
        })
        .collect();
    Ok(Tensor::from_vec(m, (rep * t, tk), device)?.to_dtype(dtype)?)
}

impl Architecture for LlamaConfig {
    fn arch(&self) -> Arch {
        Arch::Llama
    }
    fn num_layers(&self) -> usize {
        self.num_hidden_layers
    }
    fn pad_id(&self) -> u32 {
        self.pad_token_id.unwrap_or(0)
    }
    fn supports(&self, task: &Task) -> bool {
        *task == Task::CausalLm
    }
    fn default_task(&self) -> Option<Task> {
        Some(Task::CausalLm)
    }
    fn expected_params(&self, _task: &Task) -> Vec<(String, Vec<usize>)> {
        let (h, f, hd) = (self.hidden_size, self.intermediate_size, self.head_dim());
        let (qd, kvd) = (self.num_attention_heads * hd, self.kv_heads() * hd);
        let mut out = vec![(EMBED.to_string(), vec![self.vocab_size, h])];
        for i in 0..self.num_hidden_layers {
            let linears = [
                (Q, qd, h, self.attention_bias),
                (K, kvd, h, self.attention_bias),
                (V, kvd, h, self.attention_bias),
                (O, h, qd, self.attention_bias),
                (GATE, f, h, self.mlp_bias),
                (UP, f, h, self.mlp_bias),
                (DOWN, h, f, self.mlp_bias),
            ];
            for (sub, o, inp, bias) in linears {
                out.push((layer(i, &format!("{sub}.weight")), vec![o, inp]));
                if bias {
                    out.push((layer(i, &format!("{sub}.bias")), vec![o]));
                }
            }
            for norm in [INPUT_NORM, POST_NORM] {
                out.push((layer(i, &format!("{norm}.weight")), vec![h]));
            }
        }
        out.push((format!("{FINAL_NORM}.weight"), vec![h]));
        if !self.tie_word_embeddings {
            out.push((LM_HEAD.into(), vec![self.vocab_size, h]));
        }
        out
    }
    fn tied_params(&self) -> Vec<String> {
        if self.tie_word_embeddings {
            vec![LM_HEAD.into()]
        } else {
            Vec::new()
        }
    }
    fn head_linears(&self) -> Vec<String> {
        Vec::new()
    }
    fn mlp_linears(&self) -> Vec<(String, MlpKind, usize)> {
        (0..self.num_hidden_layers)
            .flat_map(|i| MLP.map(|(sub, kind)| (layer(i, sub), kind, i)))
            .collect()
    }
    fn attention_linears(&self) -> Vec<String> {
        (0..self.num_hidden_layers)
            .flat_map(|i| ATTENTION.map(|sub| layer(i, sub)))
            .collect()
    }
    /// Next-token logits `(B, T, V)`.
    fn forward(&self, w: &Weights, _task: &Task, batch: &Batch, ctx: &mut Ctx) -> Result<Tensor> {
        let (b, t) = batch.input_ids.dims2()?;
        let (h2, head) = self.hidden_and_head(w, batch, ctx)?;
        Ok(self.project(w, &h2, head)?.reshape((b, t, ()))?)
    }
    fn decode(&self, w: &Weights, ids: &Tensor, cache: &mut KvCache) -> Result<Option<Tensor>> {
        let (b, t) = ids.dims2()?;
        let (h2, head) = self.hidden(w, ids, &mut Ctx::inference(), Some(cache))?;
        Ok(Some(self.project(w, &h2, head)?.reshape((b, t, ()))?))
    }
    fn decode_rows(&self, seqs: &mut [crate::serve::StepSeq<'_>]) -> Result<Option<Tensor>> {
        self.step(seqs).map(Some)
    }
    fn lm_hidden(
        &self,
        w: &Weights,
        batch: &Batch,
        ctx: &mut Ctx,
    ) -> Result<Option<(Tensor, &'static str)>> {
        self.hidden_and_head(w, batch, ctx).map(Some)
    }
    fn merged_config(&self, raw: &Value, _task: &Task, _labels: Option<&[String]>) -> Value {
        let mut c = raw.clone();
        if let Some(obj) = c.as_object_mut() {
            obj.insert("architectures".into(), json!(["LlamaForCausalLM"]));
        }
        c
    }
    fn shape(&self) -> ParamShape {
        let h = self.hidden_size as u64;
        ParamShape {
            vocab: self.vocab_size as u64,
            hidden: h,
            layers: self.num_hidden_layers as u64,
            ffn: self.intermediate_size as u64,
            kv_dim: (self.head_dim() * self.kv_heads()) as u64,
            mlp_matrices: MLP.len() as u64,
            heads: self.num_attention_heads as u64,
            head: 0,
        }
    }
}
