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

/// How a causal LM picks each next token: the most likely at `temperature` 0 (the default,
/// greedy), else a draw from `softmax(logits / temperature)` restricted to the most likely
/// tokens whose probabilities reach `top_p`, from a stream seeded by `seed` (the same seed,
/// the same completion). Generation ends at the first of `stop` (not included).
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    pub stop: Vec<String>,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: Vec::new(),
        }
    }
}

impl Sampling {
    /// Checks the settings' ranges (as OpenAI's: temperature in [0, 2], top_p in (0, 1], at
    /// most 4 stop sequences of 1-256 bytes each).
    pub fn check(&self) -> Result<()> {
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err(Error::param("temperature", "must be between 0 and 2"));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::param("top_p", "must be in (0, 1]"));
        }
        if self.stop.len() > 4 || self.stop.iter().any(|s| s.is_empty() || s.len() > 256) {
            return Err(Error::param(
                "stop",
                "at most 4 sequences of 1-256 bytes each",
            ));
        }
        Ok(())
    }

    /// Where the first stop sequence begins in `text`, if any.
    pub fn stop_at(&self, text: &str) -> Option<usize> {
        self.stop.iter().filter_map(|s| text.find(s.as_str())).min()
    }

    /// The next token from `logits` (one vocabulary row).
    pub fn pick(&self, logits: &[f32], rng: &mut impl rand::Rng) -> u32 {
        let argmax = || argmax(logits) as u32;
        if self.temperature <= 0.0 {
            return argmax();
        }
        let t = self.temperature as f32;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut p: Vec<(usize, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i, ((l - max) / t).exp()))
            .collect();
        let total: f32 = p.iter().map(|x| x.1).sum();
        if !total.is_finite() || total <= 0.0 {
            return argmax();
        }
        if self.top_p >= 1.0 {
            // Nothing is cut: draw in index order, without sorting the vocabulary.
            let mut u = rng.random::<f32>() * total;
            for &(i, w) in &p {
                if u < w {
                    return i as u32;
                }
                u -= w;
            }
            return argmax();
        }
        // Most likely first (ties by index, so the order is the same on every run).
        p.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut kept = 0.0f32;
        let mut n = 0;
        for &(_, w) in &p {
            kept += w / total;
            n += 1;
            if f64::from(kept) >= self.top_p {
                break;
            }
        }
        let mass: f32 = p[..n].iter().map(|x| x.1).sum();
        let mut u = rng.random::<f32>() * mass;
        for &(i, w) in &p[..n] {
            if u < w {
                return i as u32;
            }
            u -= w;
        }
        p[n - 1].0 as u32
    }
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
    predict_with(
        model,
        tok,
        labels,
        inputs,
        max_seq_len,
        max_new_tokens,
        &Sampling::default(),
    )
}

/// [`predict`] with completions sampled as `sampling` says.
pub fn predict_with(
    model: &Model,
    tok: &TextTokenizer,
    labels: Option<&LabelMap>,
    inputs: &[PredictInput],
    max_seq_len: usize,
    max_new_tokens: usize,
    sampling: &Sampling,
) -> Result<Vec<Prediction>> {
    sampling.check()?;
    let pad = model.pad_id();
    let (dtype, device) = (model.dtype(), model.weights.device.clone());
    let mut out = Vec::with_capacity(inputs.len());
    let mut encoded: Vec<Example> = Vec::new();
    for (n, input) in inputs.iter().enumerate() {
        let mut rng = crate::rng::stream(sampling.seed, "sampling", n as u64);
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
            let decode = |ids: &[u32]| {
                tok.inner
                    .decode(ids, true)
                    .map_err(|e| Error::Tokenizer(e.to_string()))
            };
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
                let row: Vec<f32> = logits
                    .narrow(1, last, 1)?
                    .flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1()?;
                let next = sampling.pick(&row, &mut rng);
                ids.push(next);
                unseen = vec![next];
                if Some(next) == tok.eos_id {
                    break;
                }
                if !sampling.stop.is_empty()
                    && sampling.stop_at(&decode(&ids[prompt_len..])?).is_some()
                {
                    break;
                }
            }
            let mut completion = decode(&ids[prompt_len..])?;
            if let Some(at) = sampling.stop_at(&completion) {
                completion.truncate(at);
            }
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
        encoded.push(Example {
            ids,
            type_ids: types,
            target: crate::data::Target::Class(0),
            line: 0,
        });
    }
    // Classifier inputs run as padded batches (the attention mask keeps padding out).
    for chunk in encoded.chunks(PREDICT_BATCH) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = collate(&refs, pad, dtype, &device)?;
        let logits = model.forward(&batch, &mut Ctx::inference())?.detach();
        let logits = logits.to_dtype(DType::F32)?;
        match model.task {
            Task::Regression => {
                for value in logits.flatten_all()?.to_vec1::<f32>()? {
                    out.push(Prediction::Value { value });
                }
            }
            _ => {
                let probs = crate::nn::softmax_last_dim(&logits)?.to_vec2::<f32>()?;
                for probabilities in probs {
                    let index = argmax(&probabilities);
                    let label = labels
                        .and_then(|l| l.names.get(index).cloned())
                        .unwrap_or_else(|| index.to_string());
                    out.push(Prediction::Class {
                        label,
                        index: index as u32,
                        probabilities,
                    });
                }
            }
        }
    }
    Ok(out)
}

/// Classifier inputs per forward pass.
const PREDICT_BATCH: usize = 32;

/// The index of the largest value (the first of equal ones; 0 for an empty slice).
fn argmax(xs: &[f32]) -> usize {
    xs.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0
}

#[cfg(test)]
mod sampling_tests {
    use super::Sampling;

    #[test]
    fn temperature_zero_is_greedy_and_a_seed_repeats_its_draws() {
        let logits = [0.1f32, 2.0, 1.9, -1.0];
        let mut rng = crate::rng::stream(1, "t", 0);
        assert_eq!(Sampling::default().pick(&logits, &mut rng), 1);
        let s = Sampling {
            temperature: 1.0,
            ..Default::default()
        };
        let draw = |seed| {
            let mut r = crate::rng::stream(seed, "t", 0);
            (0..64).map(|_| s.pick(&logits, &mut r)).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
        // Both near-equal favourites are drawn; top_p that keeps one token is greedy again.
        let d = draw(5);
        assert!(d.contains(&1) && d.contains(&2), "{d:?}");
        let narrow = Sampling {
            temperature: 1.0,
            top_p: 0.3,
            ..Default::default()
        };
        let mut r = crate::rng::stream(9, "t", 0);
        assert!((0..64).all(|_| narrow.pick(&logits, &mut r) == 1));
    }

    #[test]
    fn settings_out_of_range_are_refused() {
        for bad in [
            Sampling {
                temperature: 2.5,
                ..Default::default()
            },
            Sampling {
                temperature: -0.1,
                ..Default::default()
            },
            Sampling {
                top_p: 0.0,
                ..Default::default()
            },
            Sampling {
                top_p: f64::NAN,
                ..Default::default()
            },
            Sampling {
                stop: vec![String::new()],
                ..Default::default()
            },
            Sampling {
                stop: vec!["x".into(); 5],
                ..Default::default()
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
        assert!(Sampling::default().check().is_ok());
    }
}
