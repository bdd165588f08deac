//! The task a training file asks for, and its classes.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::records::{kind_of, RawLabel, Record};
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

/// Most classes a classification file may have.
pub const MAX_CLASSES: usize = 4096;
/// Most bytes all class names together may take.
pub const MAX_CLASS_NAME_BYTES: usize = 1 << 20;

/// What the rows seen so far say about the task: fed one row at a time (an upload is
/// validated while it streams), it checks that every row has the first row's shape and every
/// label one type, and keeps only the distinct class names — bounded by [`MAX_CLASSES`] and
/// [`MAX_CLASS_NAME_BYTES`] — never the rows.
#[derive(Debug)]
pub struct TaskEvidence {
    rows: usize,
    kind: Option<&'static str>,
    sft: bool,
    /// The label type (`string` / `number`) and the line that set it.
    label_kind: Option<(&'static str, usize)>,
    first_float: Option<usize>,
    first_str: Option<usize>,
    ints: BTreeSet<i64>,
    strs: BTreeSet<String>,
    name_bytes: usize,
    /// The line whose label went past the class limits.
    too_many: Option<usize>,
}

impl Default for TaskEvidence {
    fn default() -> Self {
        Self::new()
    }
}

impl TaskEvidence {
    pub fn new() -> Self {
        TaskEvidence {
            rows: 0,
            kind: None,
            sft: false,
            label_kind: None,
            first_float: None,
            first_str: None,
            ints: BTreeSet::new(),
            strs: BTreeSet::new(),
            name_bytes: 0,
            too_many: None,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Takes one row; a row of another shape, or a label of another type, is an error.
    pub fn add(&mut self, line: usize, r: &Record) -> Result<()> {
        let k = kind_of(r);
        match self.kind {
            None => {
                self.kind = Some(k);
                self.sft = matches!(r, Record::PromptCompletion { .. } | Record::Chat { .. });
            }
            Some(k0) if k0 != k => {
                return Err(Error::data(
                    line,
                    None,
                    format!("row is {k} but earlier rows are {k0}"),
                ))
            }
            _ => {}
        }
        self.rows += 1;
        let Record::Text { label, .. } = r else {
            return Ok(());
        };
        let lk = match label {
            RawLabel::Str(_) => "string",
            RawLabel::Int(_) | RawLabel::Float(_) => "number",
        };
        match self.label_kind {
            None => self.label_kind = Some((lk, line)),
            Some((k, l)) if k != lk => {
                return Err(Error::data(
                    line,
                    Some("label"),
                    format!("is a {lk} but line {l} has a {k} label"),
                ))
            }
            _ => {}
        }
        match label {
            RawLabel::Float(_) => {
                self.first_float.get_or_insert(line);
            }
            RawLabel::Int(i) => {
                if !self.ints.contains(i) && !self.full(line, 8) {
                    self.ints.insert(*i);
                }
            }
            RawLabel::Str(s) => {
                self.first_str.get_or_insert(line);
                if !self.strs.contains(s) && !self.full(line, s.len()) {
                    self.strs.insert(s.clone());
                }
            }
        }
        Ok(())
    }

    /// Whether one more class of `bytes` would pass the limits (noting the line once).
    fn full(&mut self, line: usize, bytes: usize) -> bool {
        let n = self.ints.len() + self.strs.len();
        if self.too_many.is_some()
            || n >= MAX_CLASSES
            || self.name_bytes + bytes > MAX_CLASS_NAME_BYTES
        {
            self.too_many.get_or_insert(line);
            return true;
        }
        self.name_bytes += bytes;
        false
    }

    /// The task the rows ask for; `forced` overrides the inference where the rows allow it.
    pub fn task(&self, forced: Option<&str>) -> Result<(Task, Option<LabelMap>)> {
        if self.rows == 0 {
            return Err(Error::data(0, None, "the file is empty: no rows"));
        }
        if self.sft {
            return match forced {
                None | Some("causal-lm") => Ok((Task::CausalLm, None)),
                Some(t) => Err(Error::param(
                    "task",
                    format!("rows are SFT rows but the task is `{t}`"),
                )),
            };
        }
        let regression = match forced {
            Some("regression") => true,
            Some("classification") => {
                if let Some(line) = self.first_float {
                    return Err(Error::data(
                        line,
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
            None => self.first_float.is_some(),
        };
        if regression {
            if let Some(line) = self.first_str {
                return Err(Error::data(
                    line,
                    Some("label"),
                    "is a string but the task is regression",
                ));
            }
            return Ok((Task::Regression, None));
        }
        if let Some(line) = self.too_many {
            return Err(Error::data(
                line,
                Some("label"),
                format!(
                    "more than {MAX_CLASSES} classes (or {MAX_CLASS_NAME_BYTES} bytes of class names)"
                ),
            ));
        }
        // Labels are all numbers or all strings (checked row by row): integers sort
        // numerically, strings lexically.
        let names: Vec<String> = if self.strs.is_empty() {
            self.ints.iter().map(|i| i.to_string()).collect()
        } else {
            self.strs.iter().cloned().collect()
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
}

/// Infers the task (and label map) from training rows. `forced` overrides the inference where
/// the rows allow it.
pub fn infer_task(
    recs: &[(usize, Record)],
    forced: Option<&str>,
) -> Result<(Task, Option<LabelMap>)> {
    let mut ev = TaskEvidence::new();
    for (line, r) in recs {
        ev.add(*line, r)?;
    }
    ev.task(forced)
}
