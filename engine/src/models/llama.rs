//! LLaMA for causal LM: RMSNorm, RoPE (θ from config), grouped-query attention with a causal
//! mask, SwiGLU MLP, tied or separate `lm_head`. Batches are right-padded, so the causal mask
//! alone keeps real tokens from attending to padding.

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use super::Batch;
use crate::nn::fused::{scaled_masked_softmax, MaskRows};
use crate::nn::{rope, rope_tables, Ctx, Param, Weights};
use crate::{Error, Result};

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
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }
    pub fn validate(&self) -> Result<()> {
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

fn repeat_kv(x: Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x);
    }
    let (b, h, t, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .broadcast_as((b, h, n_rep, t, d))?
        .contiguous()?
        .reshape((b, h * n_rep, t, d))?)
}

/// Additive causal mask `(T, T)`: 0 on and below the diagonal, large negative above.
fn causal_mask(
    t: usize,
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let m: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { -1e9 } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(m, (t, t), device)?.to_dtype(dtype)?)
}

/// Next-token logits `(B, T, V)`.
pub fn forward(cfg: &LlamaConfig, w: &Weights, batch: &Batch, ctx: &mut Ctx) -> Result<Tensor> {
    let (b, t) = batch.input_ids.dims2()?;
    let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
    let dev = batch.input_ids.device();
    let dtype = w.dtype;
    let (cos, sin) = rope_tables(t, hd, cfg.rope_theta, dtype, dev)?;
    let mask = causal_mask(t, dtype, dev)?;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut h = w.embedding("model.embed_tokens.weight", &batch.input_ids)?;
    for i in 0..cfg.num_hidden_layers {
        let l = format!("model.layers.{i}");
        let x = w.rms_norm(&format!("{l}.input_layernorm"), &h, cfg.rms_norm_eps)?;
        let q = w.linear(&format!("{l}.self_attn.q_proj"), &x, ctx)?;
        let k = w.linear(&format!("{l}.self_attn.k_proj"), &x, ctx)?;
        let v = w.linear(&format!("{l}.self_attn.v_proj"), &x, ctx)?;
        let q = q.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?;
        let k = k.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let v = v.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let q = rope(&q, &cos, &sin)?;
        let k = rope(&k, &cos, &sin)?;
        let k = repeat_kv(k, nh / nkv)?;
        let v = repeat_kv(v, nh / nkv)?;
        let probs = scaled_masked_softmax(&q.matmul(&k.t()?)?, scale, &mask, MaskRows::PerQuery)?;
        let a = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        let a = w.linear(&format!("{l}.self_attn.o_proj"), &a, ctx)?;
        h = (h + a)?;
        let x = w.rms_norm(
            &format!("{l}.post_attention_layernorm"),
            &h,
            cfg.rms_norm_eps,
        )?;
        let g = w.linear(&format!("{l}.mlp.gate_proj"), &x, ctx)?;
        let u = w.linear(&format!("{l}.mlp.up_proj"), &x, ctx)?;
        let m = w.linear(&format!("{l}.mlp.down_proj"), &(g.silu()? * u)?, ctx)?;
        h = (h + m)?;
    }
    let h = w.rms_norm("model.norm", &h, cfg.rms_norm_eps)?;
    let head = if w.contains("lm_head.weight") {
        "lm_head.weight"
    } else {
        "model.embed_tokens.weight"
    };
    let hidden = h.dim(D::Minus1)?;
    let h2 = h.reshape(((), hidden))?;
    let logits = match w.params.get(head) {
        Some(Param::Trainable(v)) => h2.matmul(&v.as_tensor().t()?)?,
        Some(Param::Frozen(t)) => crate::nn::frozen_linear(&h2, t, None)?,
        None => return Err(Error::Model("missing lm_head".into())),
    };
    Ok(logits.reshape((b, t, ()))?)
}
