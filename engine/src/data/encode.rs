//! Rows to token ids: truncation, targets (a class, a value, or which tokens an SFT row
//! learns from), and the counts a job reports.

use serde::Serialize;

use super::labels::LabelMap;
use super::records::{kind_of, RawLabel, Record};
use super::tokenizer::TextTokenizer;
use crate::models::Task;
use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    Class(u32),
    Value(f32),
    /// 1 where the token is a training target (completion / assistant tokens).
    Tokens(Vec<u8>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    pub target: Target,
    pub line: usize,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct EncodeStats {
    pub rows: usize,
    pub tokens: usize,
    pub truncated: usize,
    /// SFT rows whose completion was truncated away entirely (they contribute no loss).
    pub without_targets: usize,
}

pub fn encode_records(
    recs: &[(usize, Record)],
    tok: &TextTokenizer,
    task: &Task,
    labels: Option<&LabelMap>,
    max_seq_len: usize,
) -> Result<(Vec<Example>, EncodeStats)> {
    if max_seq_len < 4 {
        return Err(Error::param("max_seq_len", "must be at least 4"));
    }
    let mut stats = EncodeStats::default();
    let mut out = Vec::with_capacity(recs.len());
    for (line, r) in recs {
        let line = *line;
        let ex = match (r, task) {
            (
                Record::Text {
                    text,
                    text_b,
                    label,
                },
                Task::Classification { .. } | Task::Regression,
            ) => {
                let enc = match text_b {
                    None => tok.inner.encode(text.as_str(), true),
                    Some(b) => tok.inner.encode((text.as_str(), b.as_str()), true),
                }
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
                let (ids, types, trunc) = truncate_pair(
                    &enc,
                    text_b.is_some(),
                    max_seq_len,
                    tok,
                    text,
                    text_b.as_deref(),
                )?;
                if trunc {
                    stats.truncated += 1;
                }
                let target = match task {
                    Task::Regression => match label {
                        RawLabel::Int(i) => Target::Value(*i as f32),
                        RawLabel::Float(f) => Target::Value(*f as f32),
                        RawLabel::Str(_) => {
                            return Err(Error::data(
                                line,
                                Some("label"),
                                "is a string but the task is regression",
                            ))
                        }
                    },
                    _ => Target::Class(
                        labels
                            .ok_or_else(|| {
                                Error::Other("classification without a label map".into())
                            })?
                            .index(label, line)?,
                    ),
                };
                Example {
                    ids,
                    type_ids: types,
                    target,
                    line,
                }
            }
            (Record::PromptCompletion { prompt, completion }, Task::CausalLm) => {
                let p = tok.encode(prompt, true)?;
                let c = tok.encode(completion, false)?;
                let mut ids = p.get_ids().to_vec();
                let mut mask = vec![0u8; ids.len()];
                ids.extend_from_slice(c.get_ids());
                mask.extend(std::iter::repeat_n(1u8, c.get_ids().len()));
                if let Some(e) = tok.eos_id {
                    ids.push(e);
                    mask.push(1);
                }
                lm_example(ids, mask, line, max_seq_len, &mut stats)
            }
            (Record::Chat { messages }, Task::CausalLm) => {
                let full = tok.render_chat(messages, false)?;
                // Assistant spans: the text each assistant turn adds after its generation prompt.
                let mut spans = Vec::new();
                for (i, m) in messages.iter().enumerate() {
                    if m.role == "assistant" {
                        let start = tok.render_chat(&messages[..i], true)?.len();
                        let end = tok.render_chat(&messages[..=i], false)?.len();
                        spans.push((start, end));
                    }
                }
                let enc = tok.encode(&full, false)?;
                let ids = enc.get_ids().to_vec();
                let mask = enc
                    .get_offsets()
                    .iter()
                    .map(|&(s, e)| spans.iter().any(|&(a, b)| s >= a && s < b && e > s) as u8)
                    .collect();
                lm_example(ids, mask, line, max_seq_len, &mut stats)
            }
            (r, t) => {
                return Err(Error::data(
                    line,
                    None,
                    format!("a {} row cannot train a {} task", kind_of(r), t.name()),
                ))
            }
        };
        stats.rows += 1;
        stats.tokens += ex.ids.len();
        out.push(ex);
    }
    Ok((out, stats))
}

fn lm_example(
    mut ids: Vec<u32>,
    mut mask: Vec<u8>,
    line: usize,
    max: usize,
    stats: &mut EncodeStats,
) -> Example {
    if ids.len() > max {
        ids.truncate(max);
        mask.truncate(max);
        stats.truncated += 1;
    }
    // Position 0 is never a target (nothing predicts it).
    if let Some(m) = mask.first_mut() {
        *m = 0;
    }
    if !mask.contains(&1) {
        stats.without_targets += 1;
    }
    let n = ids.len();
    Example {
        ids,
        type_ids: vec![0; n],
        target: Target::Tokens(mask),
        line,
    }
}

/// Truncates to `max` tokens with the longest-first strategy, keeping the special tokens the
/// post-processor adds.
fn truncate_pair(
    enc: &tokenizers::Encoding,
    pair: bool,
    max: usize,
    tok: &TextTokenizer,
    a: &str,
    b: Option<&str>,
) -> Result<(Vec<u32>, Vec<u32>, bool)> {
    if enc.get_ids().len() <= max {
        return Ok((enc.get_ids().to_vec(), enc.get_type_ids().to_vec(), false));
    }
    let mut t = tok.inner.clone();
    t.with_truncation(Some(tokenizers::TruncationParams {
        max_length: max,
        strategy: tokenizers::TruncationStrategy::LongestFirst,
        ..Default::default()
    }))
    .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let enc = if pair {
        t.encode((a, b.unwrap_or_default()), true)
    } else {
        t.encode(a, true)
    }
    .map_err(|e| Error::Tokenizer(e.to_string()))?;
    Ok((enc.get_ids().to_vec(), enc.get_type_ids().to_vec(), true))
}
