//! RoBERTa: BERT's encoder with position ids offset past `padding_idx` (padding tokens keep
//! `padding_idx`), one token type, and a `dense → tanh → out_proj` head on `<s>`.

use candle_core::{DType, Tensor};
use serde_json::{json, Value};

use super::bert::{
    encoder, encoder_attention_linears, encoder_canonical_name, encoder_mlp_linears,
    encoder_params, encoder_shape, encoder_supports, finish_head, head_param, EncoderConfig,
    EncoderNames,
};
use super::{Arch, ArchEntry, Architecture, Batch, MlpKind, ParamShape, Task};
use crate::nn::{Ctx, Weights};
use crate::Result;

pub const ENTRY: ArchEntry = ArchEntry {
    model_type: "roberta",
    canonical_name: |n| encoder_canonical_name(NAMES.prefix, n),
    parse: |raw| Ok(Box::new(Roberta(EncoderConfig::parse(raw)?))),
    tiny_config: || {
        json!({
            "model_type": "roberta", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 24, "hidden_act": "gelu",
            "max_position_embeddings": 40, "type_vocab_size": 1, "layer_norm_eps": 1e-5,
            "pad_token_id": 1
        })
    },
};

const NAMES: EncoderNames = EncoderNames { prefix: "roberta" };
const DENSE: &str = "classifier.dense";
const OUT_PROJ: &str = "classifier.out_proj";

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

pub struct Roberta(pub EncoderConfig);

impl Architecture for Roberta {
    fn arch(&self) -> Arch {
        Arch::Roberta
    }
    fn num_layers(&self) -> usize {
        self.0.num_hidden_layers
    }
    fn pad_id(&self) -> u32 {
        self.0.pad_token_id
    }
    fn supports(&self, task: &Task) -> bool {
        encoder_supports(task)
    }
    fn expected_params(&self, task: &Task) -> Vec<(String, Vec<usize>)> {
        let h = self.0.hidden_size;
        let mut out = encoder_params(&self.0, NAMES);
        out.extend(head_param(DENSE, h, h));
        out.extend(head_param(OUT_PROJ, task.head_width().unwrap_or(1), h));
        out
    }
    fn head_linears(&self) -> Vec<String> {
        vec![DENSE.into(), OUT_PROJ.into()]
    }
    fn mlp_linears(&self) -> Vec<(String, MlpKind, usize)> {
        encoder_mlp_linears(&self.0, NAMES)
    }
    fn attention_linears(&self) -> Vec<String> {
        encoder_attention_linears(&self.0, NAMES)
    }
    fn hidden_states(&self, w: &Weights, batch: &Batch, ctx: &mut Ctx) -> Result<Tensor> {
        let pos = position_ids(&batch.input_ids, self.0.pad_token_id)?;
        encoder(&self.0, w, NAMES, batch, &pos, ctx)
    }
    fn forward(&self, w: &Weights, task: &Task, batch: &Batch, ctx: &mut Ctx) -> Result<Tensor> {
        let h = self.hidden_states(w, batch, ctx)?;
        let cls = h.narrow(1, 0, 1)?.squeeze(1)?;
        let x = ctx.dropout(&cls, self.0.head_dropout())?;
        let x = w.linear(DENSE, &x, ctx)?.tanh()?;
        let x = ctx.dropout(&x, self.0.head_dropout())?;
        let logits = w.linear(OUT_PROJ, &x, ctx)?;
        finish_head(logits, task)
    }
    fn merged_config(&self, raw: &Value, task: &Task, labels: Option<&[String]>) -> Value {
        super::classifier_config(raw, "RobertaForSequenceClassification", task, labels)
    }
    fn shape(&self) -> ParamShape {
        encoder_shape(&self.0)
    }
}
