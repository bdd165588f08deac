//! RoBERTa: BERT's encoder with position ids offset past `padding_idx` (padding tokens keep
//! `padding_idx`), one token type, and a `dense → tanh → out_proj` head on `<s>`.

use candle_core::{DType, Tensor};

use super::bert::{encoder, finish_head, EncoderConfig};
use super::{Batch, Task};
use crate::nn::{Ctx, Weights};
use crate::Result;

/// `padding_idx + cumsum(mask) * mask`, as transformers' `create_position_ids_from_input_ids`.
pub fn position_ids(input_ids: &Tensor, padding_idx: u32) -> Result<Tensor> {
    let (b, t) = input_ids.dims2()?;
    let ids = input_ids.to_vec2::<u32>()?;
    let mut out = Vec::with_capacity(b * t);
    for row in ids {
        let mut c = 0u32;
        for id in row {
            if id != padding_idx {
                c += 1;
                out.push(padding_idx + c);
            } else {
                out.push(padding_idx);
            }
        }
    }
    Ok(Tensor::from_vec(out, (b, t), input_ids.device())?.to_dtype(DType::U32)?)
}

/// Last hidden states `(B, T, H)`.
pub fn hidden_states(
    cfg: &EncoderConfig,
    w: &Weights,
    batch: &Batch,
    ctx: &mut Ctx,
) -> Result<Tensor> {
    let pos = position_ids(&batch.input_ids, cfg.pad_token_id)?;
    encoder(cfg, w, "roberta", batch, &pos, ctx)
}

pub fn forward(
    cfg: &EncoderConfig,
    w: &Weights,
    task: &Task,
    batch: &Batch,
    ctx: &mut Ctx,
) -> Result<Tensor> {
    let h = hidden_states(cfg, w, batch, ctx)?;
    let cls = h.narrow(1, 0, 1)?.squeeze(1)?;
    let x = ctx.dropout(&cls, cfg.head_dropout())?;
    let x = w.linear("classifier.dense", &x, ctx)?.tanh()?;
    let x = ctx.dropout(&x, cfg.head_dropout())?;
    let logits = w.linear("classifier.out_proj", &x, ctx)?;
    finish_head(logits, task)
}
