//! The task a training file asks for, and its classes.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::records::{RawLabel, Record};
use crate::models::Task;
use crate::{Error, Result};

/// Class names in index order. Strings sort lexically, integers numerically.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LabelMap {
    pub names: Vec<String>,
}

impl LabelMap {
    pub fn index(&self, l: &RawLabel, line: usize) -> Result<u32> {
        let key = match l {
            RawLabel::Str(s) => s.clone(),
            RawLabel::Int(i) => i.to_string(),
            RawLabel::Float(_) => {
                return Err(Error::data(
                    line,
                    Some("label"),
                    "is a float but the task is classification",
                ))
            }
        };
        self.names
            .iter()
            .position(|n| *n == key)
            .map(|i| i as u32)
            .ok_or_else(|| {
                Error::data(
                    line,
                    Some("label"),
                    format!("`{key}` is not a class of the training set"),
                )
            })
    }
}

/// Infers the task (and label map) from training rows. `forced` overrides the inference where
/// the rows allow it.
pub fn infer_task(
    recs: &[(usize, Record)],
    forced: Option<&str>,
) -> Result<(Task, Option<LabelMap>)> {
    let Some((_, first)) = recs.first() else {
        return Err(Error::data(0, None, "the file is empty: no rows"));
    };
    if matches!(first, Record::PromptCompletion { .. } | Record::Chat { .. }) {
        return match forced {
            None | Some("causal-lm") => Ok((Task::CausalLm, None)),
            Some(t) => Err(Error::param(
                "task",
                format!("rows are SFT rows but the task is `{t}`"),
            )),
        };
    }
    let labels: Vec<(usize, &RawLabel)> = recs
        .iter()
        .filter_map(|(l, r)| match r {
            Record::Text { label, .. } => Some((*l, label)),
            _ => None,
        })
        .collect();
    let any_float = labels.iter().any(|(_, l)| matches!(l, RawLabel::Float(_)));
    let regression = match forced {
        Some("regression") => true,
        Some("classification") => {
            if let Some((line, _)) = labels.iter().find(|(_, l)| matches!(l, RawLabel::Float(_))) {
                return Err(Error::data(
                    *line,
                    Some("label"),
                    "is a float but the task is classification",
                ));
            }
            false
        }
        Some("causal-lm") => {
            return Err(Error::param(
                "task",
                "causal-lm needs prompt/completion or messages rows",
            ))
        }
        Some(t) => return Err(Error::param("task", format!("unknown task `{t}`"))),
        None => any_float,
    };
    if regression {
        if let Some((line, _)) = labels.iter().find(|(_, l)| matches!(l, RawLabel::Str(_))) {
            return Err(Error::data(
                *line,
                Some("label"),
                "is a string but the task is regression",
            ));
        }
        return Ok((Task::Regression, None));
    }
    let names: Vec<String> = if labels.iter().all(|(_, l)| matches!(l, RawLabel::Int(_))) {
        let set: BTreeSet<i64> = labels
            .iter()
            .map(|(_, l)| match l {
                RawLabel::Int(i) => *i,
                _ => unreachable!(),
            })
            .collect();
        set.into_iter().map(|i| i.to_string()).collect()
    } else {
        let set: BTreeSet<String> = labels
            .iter()
            .map(|(_, l)| match l {
                RawLabel::Str(s) => s.clone(),
                RawLabel::Int(i) => i.to_string(),
                RawLabel::Float(f) => f.to_string(),
            })
            .collect();
        set.into_iter().collect()
    };
    if names.len() < 2 {
        return Err(Error::data(
            0,
            Some("label"),
            format!("needs at least two classes, found {}", names.len()),
        ));
    }
    let n = names.len();
    Ok((
        Task::Classification { num_labels: n },
        Some(LabelMap { names }),
    ))
}
