//! One dataset row: what a JSON object (a JSONL line, or a CSV row read into one) says, checked
//! field by field. Classification / regression rows carry `text` (or `text_a` + `text_b`) and
//! `label`; SFT rows `prompt` + `completion` or chat `messages`. Every rejected row names its
//! line, its field and the reason.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Error, Result};

/// A label as written in the file, before the label map is known.
#[derive(Clone, Debug, PartialEq)]
pub enum RawLabel {
    Str(String),
    Int(i64),
    Float(f64),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    Text {
        text: String,
        text_b: Option<String>,
        label: RawLabel,
    },
    PromptCompletion {
        prompt: String,
        completion: String,
    },
    Chat {
        messages: Vec<Message>,
    },
}

fn get_str(
    obj: &serde_json::Map<String, Value>,
    line: usize,
    field: &str,
) -> Result<Option<String>> {
    get_str_named(obj, field, line, field)
}

/// Reads `key`, reporting problems under the (possibly qualified) name `field`.
fn get_str_named(
    obj: &serde_json::Map<String, Value>,
    key: &str,
    line: usize,
    field: &str,
) -> Result<Option<String>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(Error::data(
            line,
            Some(field),
            format!("expected a string, found {}", json_type(other)),
        )),
    }
}

pub(crate) fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn non_empty(s: String, line: usize, field: &str) -> Result<String> {
    if s.trim().is_empty() {
        Err(Error::data(line, Some(field), "is empty"))
    } else {
        Ok(s)
    }
}

fn raw_label_from_json(v: &Value, line: usize) -> Result<RawLabel> {
    match v {
        Value::String(s) if !s.trim().is_empty() => Ok(RawLabel::Str(s.clone())),
        Value::String(_) => Err(Error::data(line, Some("label"), "is empty")),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Ok(RawLabel::Int(i)),
            None => match n.as_f64() {
                Some(f) if f.is_finite() => Ok(RawLabel::Float(f)),
                _ => Err(Error::data(line, Some("label"), "is not a finite number")),
            },
        },
        other => Err(Error::data(
            line,
            Some("label"),
            format!(
                "unsupported label type: {} (use a string or integer class, or a float for regression)",
                json_type(other)
            ),
        )),
    }
}

pub(crate) fn raw_label_from_csv(s: &str, line: usize) -> Result<RawLabel> {
    let t = s.trim();
    if t.is_empty() {
        return Err(Error::data(line, Some("label"), "is empty"));
    }
    if let Ok(i) = t.parse::<i64>() {
        return Ok(RawLabel::Int(i));
    }
    if t.contains(['.', 'e', 'E']) {
        if let Ok(f) = t.parse::<f64>() {
            if f.is_finite() {
                return Ok(RawLabel::Float(f));
            }
        }
    }
    Ok(RawLabel::Str(t.to_string()))
}

/// Parses one JSON object (one JSONL line).
pub fn parse_json_record(obj: &serde_json::Map<String, Value>, line: usize) -> Result<Record> {
    if let Some(m) = obj.get("messages") {
        let arr = m.as_array().ok_or_else(|| {
            Error::data(
                line,
                Some("messages"),
                format!("expected an array, found {}", json_type(m)),
            )
        })?;
        if arr.is_empty() {
            return Err(Error::data(line, Some("messages"), "is empty"));
        }
        let mut messages = Vec::with_capacity(arr.len());
        for (i, mv) in arr.iter().enumerate() {
            let field = format!("messages[{i}]");
            let mo = mv.as_object().ok_or_else(|| {
                Error::data(
                    line,
                    Some(&field),
                    "expected an object with `role` and `content`",
                )
            })?;
            let role = get_str_named(mo, "role", line, &format!("{field}.role"))?
                .ok_or_else(|| Error::data(line, Some(&format!("{field}.role")), "missing"))?;
            if !matches!(role.as_str(), "system" | "user" | "assistant") {
                return Err(Error::data(
                    line,
                    Some(&format!("{field}.role")),
                    format!("unknown role `{role}` (system, user or assistant)"),
                ));
            }
            let content = match mo.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(other) => {
                    return Err(Error::data(
                        line,
                        Some(&format!("{field}.content")),
                        format!("expected a string, found {}", json_type(other)),
                    ))
                }
                None => {
                    return Err(Error::data(
                        line,
                        Some(&format!("{field}.content")),
                        "missing",
                    ))
                }
            };
            messages.push(Message { role, content });
        }
        if !messages.iter().any(|m| m.role == "assistant") {
            return Err(Error::data(
                line,
                Some("messages"),
                "has no assistant message to learn from",
            ));
        }
        return Ok(Record::Chat { messages });
    }
    if obj.contains_key("prompt") || obj.contains_key("completion") {
        let prompt = get_str(obj, line, "prompt")?
            .ok_or_else(|| Error::data(line, Some("prompt"), "missing"))?;
        let completion = get_str(obj, line, "completion")?
            .ok_or_else(|| Error::data(line, Some("completion"), "missing"))?;
        let completion = non_empty(completion, line, "completion")?;
        return Ok(Record::PromptCompletion { prompt, completion });
    }
    let (text, text_b) = if obj.contains_key("text_a") {
        let a = get_str(obj, line, "text_a")?
            .ok_or_else(|| Error::data(line, Some("text_a"), "missing"))?;
        let b = get_str(obj, line, "text_b")?
            .ok_or_else(|| Error::data(line, Some("text_b"), "missing"))?;
        (
            non_empty(a, line, "text_a")?,
            Some(non_empty(b, line, "text_b")?),
        )
    } else {
        let t = get_str(obj, line, "text")?.ok_or_else(|| {
            Error::data(
                line,
                Some("text"),
                "missing (expected `text` or `text_a`/`text_b` with `label`, `prompt`/`completion`, or `messages`)",
            )
        })?;
        (non_empty(t, line, "text")?, None)
    };
    let label = match obj.get("label") {
        None | Some(Value::Null) => return Err(Error::data(line, Some("label"), "missing")),
        Some(v) => raw_label_from_json(v, line)?,
    };
    Ok(Record::Text {
        text,
        text_b,
        label,
    })
}

/// Parses one JSONL line (1-based `line`).
pub fn parse_jsonl_line(bytes: &[u8], line: usize) -> Result<Option<Record>> {
    let s = std::str::from_utf8(bytes).map_err(|e| {
        Error::data(
            line,
            None,
            format!("invalid UTF-8 at byte {}", e.valid_up_to()),
        )
    })?;
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    let v: Value = serde_json::from_str(s)
        .map_err(|e| Error::data(line, None, format!("malformed JSON: {e}")))?;
    let obj = v.as_object().ok_or_else(|| {
        Error::data(
            line,
            None,
            format!("expected a JSON object, found {}", json_type(&v)),
        )
    })?;
    parse_json_record(obj, line).map(Some)
}

pub(crate) fn kind_of(r: &Record) -> &'static str {
    match r {
        Record::Text { text_b: None, .. } => "text/label",
        Record::Text {
            text_b: Some(_), ..
        } => "text_a/text_b/label",
        Record::PromptCompletion { .. } => "prompt/completion",
        Record::Chat { .. } => "messages",
    }
}
