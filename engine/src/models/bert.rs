//! BERT: embeddings (word + position + token type), post-LN encoder, pooler, classifier.
//! The encoder is shared with RoBERTa, which differs only in position ids and head.

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use super::{Batch, Task};
use crate::nn::fused::{scaled_masked_softmax, MaskRows};
use crate::nn::{Ctx, Weights};
use crate::{Error, Result};

fn default_eps() -> f64 {
    1e-12
}
fn default_dropout() -> f64 {
    0.1
}
fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EncoderConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: u32,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    #[serde(default)]
    pub classifier_dropout: Option<f64>,
}

impl EncoderConfig {
    pub fn validate(&self) -> Result<()> {
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(Error::Model(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        activation(&self.hidden_act)?;
        Ok(())
    }
    pub fn head_dropout(&self) -> f64 {
        self.classifier_dropout.unwrap_or(self.hidden_dropout_prob)
    }
}

#[derive(Clone, Copy)]
pub enum Activation {
    GeluErf,
    GeluTanh,
    Relu,
    Silu,
}

pub fn activation(name: &str) -> Result<Activation> {
    match name {
        "gelu" => Ok(Activation::GeluErf),
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
        "relu" => Ok(Activation::Relu),
        "silu" | "swish" => Ok(Activation::Silu),
        other => Err(Error::Model(format!("unsupported hidden_act `{other}`"))),
    }
}

pub fn apply_activation(a: Activation, x: &Tensor) -> Result<Tensor> {
    Ok(match a {
        Activation::GeluErf => crate::nn::gelu_erf(x)?,
        Activation::GeluTanh => crate::nn::gelu_tanh(x)?,
        Activation::Relu => x.relu()?,
        Activation::Silu => x.silu()?,
    })
}

/// `(B, T)` 0/1 mask → additive `(B, T)` bias: 0 for keys to attend, a large negative number
/// for padding.
pub fn additive_key_mask(mask: &Tensor) -> Result<Tensor> {
    let neg = match mask.dtype() {
        DType::F16 => -6e4,
        _ => -1e9,
    };
    Ok(((mask.ones_like()? - mask)? * neg)?)
}

/// The shared encoder: returns the last hidden states `(B, T, H)`.
pub fn encoder(
    cfg: &EncoderConfig,
    w: &Weights,
    prefix: &str,
    batch: &Batch,
    position_ids: &Tensor,
    ctx: &mut Ctx,
) -> Result<Tensor> {
    let act = activation(&cfg.hidden_act)?;
    let e = format!("{prefix}.embeddings");
    let mut h = w.embedding(&format!("{e}.word_embeddings.weight"), &batch.input_ids)?;
    h = h.broadcast_add(&w.embedding(&format!("{e}.position_embeddings.weight"), position_ids)?)?;
    if let Some(tt) = w.get_opt(&format!("{e}.token_type_embeddings.weight")) {
        let ids = if tt.dim(0)? == 1 {
            batch.token_type_ids.zeros_like()?
        } else {
            batch.token_type_ids.clone()
        };
        h = (h + w.embedding(&format!("{e}.token_type_embeddings.weight"), &ids)?)?;
    }
    h = w.layer_norm(&format!("{e}.LayerNorm"), &h, cfg.layer_norm_eps)?;
    h = ctx.dropout(&h, cfg.hidden_dropout_prob)?;

    let (b, t, hidden) = h.dims3()?;
    let heads = cfg.num_attention_heads;
    let hd = hidden / heads;
    let mask = additive_key_mask(&batch.attention_mask)?;
    let scale = 1.0 / (hd as f64).sqrt();
    for i in 0..cfg.num_hidden_layers {
        let l = format!("{prefix}.encoder.layer.{i}");
        let split = |x: Tensor| -> Result<Tensor> {
            Ok(x.reshape((b, t, heads, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split(w.linear(&format!("{l}.attention.self.query"), &h, ctx)?)?;
        let k = split(w.linear(&format!("{l}.attention.self.key"), &h, ctx)?)?;
        let v = split(w.linear(&format!("{l}.attention.self.value"), &h, ctx)?)?;
        let probs = scaled_masked_softmax(&q.matmul(&k.t()?)?, scale, &mask, MaskRows::PerBatch)?;
        let probs = ctx.dropout(&probs, cfg.attention_probs_dropout_prob)?;
        let a = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, hidden))?;
        let a = w.linear(&format!("{l}.attention.output.dense"), &a, ctx)?;
        let a = ctx.dropout(&a, cfg.hidden_dropout_prob)?;
        let h1 = w.layer_norm(
            &format!("{l}.attention.output.LayerNorm"),
            &(a + &h)?,
            cfg.layer_norm_eps,
        )?;
        let m = w.linear(&format!("{l}.intermediate.dense"), &h1, ctx)?;
        let m = apply_activation(act, &m)?;
        let m = w.linear(&format!("{l}.output.dense"), &m, ctx)?;
        let m = ctx.dropout(&m, cfg.hidden_dropout_prob)?;
        h = w.layer_norm(
            &format!("{l}.output.LayerNorm"),
            &(m + h1)?,
            cfg.layer_norm_eps,
        )?;
    }
    Ok(h)
}

/// Last hidden states `(B, T, H)`.
pub fn hidden_states(
    cfg: &EncoderConfig,
    w: &Weights,
    batch: &Batch,
    ctx: &mut Ctx,
) -> Result<Tensor> {
    let (b, t) = batch.input_ids.dims2()?;
    let pos: Vec<u32> = (0..t as u32).collect();
    let pos = Tensor::from_vec(pos, (1, t), batch.input_ids.device())?
        .broadcast_as((b, t))?
        .contiguous()?;
    encoder(cfg, w, "bert", batch, &pos, ctx)
}

/// Classification logits `(B, C)`, or `(B,)` for regression.
pub fn forward(
    cfg: &EncoderConfig,
    w: &Weights,
    task: &Task,
    batch: &Batch,
    ctx: &mut Ctx,
) -> Result<Tensor> {
    let h = hidden_states(cfg, w, batch, ctx)?;
    let cls = h.narrow(1, 0, 1)?.squeeze(1)?;
    let pooled = w.linear("bert.pooler.dense", &cls, ctx)?.tanh()?;
    let pooled = ctx.dropout(&pooled, cfg.head_dropout())?;
    let logits = w.linear("classifier", &pooled, ctx)?;
    finish_head(logits, task)
}

pub fn finish_head(logits: Tensor, task: &Task) -> Result<Tensor> {
    match task {
        Task::Regression => Ok(logits.squeeze(D::Minus1)?),
        _ => Ok(logits),
    }
}
