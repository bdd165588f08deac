//! Predictions for a few inputs with a trained (or merged) model.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::{collate, Example, LabelMap, Message, TextTokenizer};
use crate::models::{Labels, Model, Task};
use crate::nn::Ctx;
use crate::{Error, Result};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PredictInput {
    Pair { text_a: String, text_b: String },
    Text { text: String },
    Prompt { prompt: String },
    Chat { messages: Vec<Message> },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Prediction {
    Class {
        label: String,
        index: u32,
        probabilities: Vec<f32>,
    },
    Value {
        value: f32,
    },
    Text {
        completion: String,
    },
}

/// Predictions for a few inputs: class + probabilities, a regression value, or a greedy
/// completion of at most `max_new_tokens` tokens.
pub fn predict(
    model: &Model,
    tok: &TextTokenizer,
    labels: Option<&LabelMap>,
    inputs: &[PredictInput],
    max_seq_len: usize,
    max_new_tokens: usize,
) -> Result<Vec<Prediction>> {
    let pad = model.pad_id();
    let (dtype, device) = (model.dtype(), model.weights.device.clone());
    let mut out = Vec::with_capacity(inputs.len());
    for input in inputs {
        if model.task == Task::CausalLm {
            let text = match input {
                PredictInput::Prompt { prompt } => prompt.clone(),
                PredictInput::Text { text } => text.clone(),
                PredictInput::Chat { messages } => tok.render_chat(messages, true)?,
                PredictInput::Pair { .. } => {
                    return Err(Error::param(
                        "inputs",
                        "a causal LM takes `prompt`, `text` or `messages`",
                    ))
                }
            };
            let special = !matches!(input, PredictInput::Chat { .. });
            let enc = tok
                .inner
                .encode(text.as_str(), special)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            let mut ids = enc.get_ids().to_vec();
            if ids.is_empty() {
                return Err(Error::param("inputs", "the prompt has no tokens"));
            }
            let prompt_len = ids.len();
            // Each token is computed once: the cache keeps the keys and values of what came
            // before (the whole sequence is recomputed per token only for an architecture
            // without one).
            let mut cache = crate::models::KvCache::default();
            let mut unseen = ids.clone();
            for _ in 0..max_new_tokens {
                if ids.len() >= max_seq_len {
                    break;
                }
                let step = Tensor::from_vec(unseen.clone(), (1, unseen.len()), &device)?;
                let logits = match model.decode(&step, &mut cache)? {
                    Some(l) => l,
                    None => {
                        let t = ids.len();
                        let batch = crate::models::Batch {
                            input_ids: Tensor::from_vec(ids.clone(), (1, t), &device)?,
                            token_type_ids: Tensor::zeros((1, t), DType::U32, &device)?,
                            attention_mask: Tensor::ones((1, t), dtype, &device)?,
                            labels: Labels::None,
                            num_tokens: t,
                            batch_size: 1,
                        };
                        model.forward(&batch, &mut Ctx::inference())?
                    }
                }
                .detach();
                let last = logits.dim(1)? - 1;
                let next = logits
                    .narrow(1, last, 1)?
                    .flatten_all()?
                    .argmax(0)?
                    .to_scalar::<u32>()?;
                ids.push(next);
                unseen = vec![next];
                if Some(next) == tok.eos_id {
                    break;
                }
            }
            let completion = tok
                .inner
                .decode(&ids[prompt_len..], true)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            out.push(Prediction::Text { completion });
            continue;
        }
        let enc = match input {
            PredictInput::Text { text } => tok.inner.encode(text.as_str(), true),
            PredictInput::Pair { text_a, text_b } => {
                tok.inner.encode((text_a.as_str(), text_b.as_str()), true)
            }
            _ => {
                return Err(Error::param(
                    "inputs",
                    "a classifier takes `text` or `text_a`/`text_b`",
                ))
            }
        }
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        let mut types = enc.get_type_ids().to_vec();
        ids.truncate(max_seq_len);
        types.truncate(max_seq_len);
        let ex = Example {
            ids,
            type_ids: types,
            target: crate::data::Target::Class(0),
            line: 0,
        };
        let batch = collate(&[&ex], pad, dtype, &device)?;
        let logits = model.forward(&batch, &mut Ctx::inference())?.detach();
        match model.task {
            Task::Regression => {
                let v = logits.to_dtype(DType::F32)?.to_vec1::<f32>()?[0];
                out.push(Prediction::Value { value: v });
            }
            _ => {
                let probs = crate::nn::softmax_last_dim(&logits.to_dtype(DType::F32)?)?
                    .squeeze(0)?
                    .to_vec1::<f32>()?;
                let (index, _) =
                    probs
                        .iter()
                        .enumerate()
                        .fold(
                            (0, f32::MIN),
                            |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) },
                        );
                let label = labels
                    .and_then(|l| l.names.get(index).cloned())
                    .unwrap_or_else(|| index.to_string());
                out.push(Prediction::Class {
                    label,
                    index: index as u32,
                    probabilities: probs,
                });
            }
        }
    }
    Ok(out)
}
