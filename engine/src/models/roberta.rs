//! RoBERTa: BERT's encoder with position ids offset past `padding_idx` (padding tokens keep
//! `padding_idx`), one token type, and a `dense → tanh → out_proj` head on `<s>`.

use candle_core::{DType, Tensor};
use serde_json::json;

use super::bert::{encoder_canonical_name, Encoder, EncoderConfig, EncoderNames, Flavour};
use super::{Arch, ArchEntry};
use crate::Result;

pub const ENTRY: ArchEntry = ArchEntry {
    model_type: "roberta",
    canonical_name: |n| encoder_canonical_name(ROBERTA.names.prefix, n),
    parse: |raw| {
        Ok(Box::new(Encoder {
            cfg: EncoderConfig::parse(raw)?,
            flavour: &ROBERTA,
        }))
    },
    tiny_config: || {
        json!({
            "model_type": "roberta", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 24, "hidden_act": "gelu",
            "max_position_embeddings": 40, "type_vocab_size": 1, "layer_norm_eps": 1e-5,
            "pad_token_id": 1
        })
    },
};

pub const ROBERTA: Flavour = Flavour {
    arch: Arch::Roberta,
    names: EncoderNames { prefix: "roberta" },
    head: ["classifier.dense", "classifier.out_proj"],
    dropout_before_dense: true,
    class_name: "RobertaForSequenceClassification",
    position_ids,
};

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
