//! Datasets: JSONL or CSV rows for classification / regression (`text`, or `text_a` +
//! `text_b`, and `label`) and causal-LM SFT (`prompt` + `completion`, or chat `messages`);
//! tokenisation with truncation; seeded shuffling and dynamically padded batches.
//! Every rejected row names its line, its field and the reason.

use std::collections::BTreeSet;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::models::{Batch, Labels, Task};
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    Jsonl,
    Csv,
}

/// Looks at the first non-blank byte: `{` means JSONL, anything else CSV with a header row.
pub fn detect_format(bytes: &[u8]) -> FileFormat {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => FileFormat::Jsonl,
        _ => FileFormat::Csv,
    }
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

fn json_type(v: &Value) -> &'static str {
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

fn raw_label_from_csv(s: &str, line: usize) -> Result<RawLabel> {
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

/// Streaming validator: feed bytes in any chunking, get every record (or the first error).
/// Used by the CLI on files and by the service on uploads as they stream in.
pub struct RecordReader {
    format: Option<FileFormat>,
    buf: Vec<u8>,
    line: usize,
    csv_header: Option<Vec<String>>,
    pub records: usize,
}

impl Default for RecordReader {
    fn default() -> Self {
        Self::new()
    }
}

impl RecordReader {
    pub fn new() -> Self {
        RecordReader {
            format: None,
            buf: Vec::new(),
            line: 0,
            csv_header: None,
            records: 0,
        }
    }

    pub fn format(&self) -> Option<FileFormat> {
        self.format
    }

    /// Feeds a chunk; complete rows are parsed and handed to `sink`.
    pub fn feed(
        &mut self,
        chunk: &[u8],
        sink: &mut dyn FnMut(usize, Record) -> Result<()>,
    ) -> Result<()> {
        self.buf.extend_from_slice(chunk);
        if self.format.is_none() {
            if self.buf.iter().all(|b| b.is_ascii_whitespace()) {
                return Ok(());
            }
            self.format = Some(detect_format(&self.buf));
        }
        self.drain(false, sink)
    }

    /// Ends the input: parses the last row and rejects an empty file.
    pub fn finish(&mut self, sink: &mut dyn FnMut(usize, Record) -> Result<()>) -> Result<()> {
        self.drain(true, sink)?;
        if self.records == 0 {
            return Err(Error::data(0, None, "the file is empty: no rows"));
        }
        Ok(())
    }

    fn drain(
        &mut self,
        eof: bool,
        sink: &mut dyn FnMut(usize, Record) -> Result<()>,
    ) -> Result<()> {
        loop {
            let end = match self.format {
                Some(FileFormat::Csv) => csv_record_end(&self.buf),
                _ => self.buf.iter().position(|&b| b == b'\n'),
            };
            let (row, consumed) = match end {
                Some(i) => (self.buf[..i].to_vec(), i + 1),
                None if eof && !self.buf.is_empty() => (std::mem::take(&mut self.buf), 0),
                None => return Ok(()),
            };
            if consumed > 0 {
                self.buf.drain(..consumed);
            }
            self.line += 1;
            let start_line = self.line;
            // A quoted CSV field may span lines; keep counting physical lines.
            self.line += row.iter().filter(|&&b| b == b'\n').count();
            let rec = match self.format {
                Some(FileFormat::Csv) => self.parse_csv_row(&row, start_line)?,
                _ => parse_jsonl_line(&row, start_line)?,
            };
            if let Some(r) = rec {
                self.records += 1;
                sink(start_line, r)?;
            }
            if consumed == 0 {
                return Ok(());
            }
        }
    }

    fn parse_csv_row(&mut self, row: &[u8], line: usize) -> Result<Option<Record>> {
        let row = row.strip_suffix(b"\r").unwrap_or(row);
        if row.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(None);
        }
        std::str::from_utf8(row).map_err(|e| {
            Error::data(
                line,
                None,
                format!("invalid UTF-8 at byte {}", e.valid_up_to()),
            )
        })?;
        let mut rdr = csv::ReaderBuilder::new()
            .has_headers(false)
            .from_reader(row);
        let rec = match rdr.records().next() {
            Some(Ok(r)) => r,
            Some(Err(e)) => return Err(Error::data(line, None, format!("malformed CSV: {e}"))),
            None => return Ok(None),
        };
        let fields: Vec<String> = rec.iter().map(str::to_string).collect();
        let Some(header) = &self.csv_header else {
            let h: Vec<String> = fields.iter().map(|f| f.trim().to_lowercase()).collect();
            let known = ["text", "text_a", "text_b", "label", "prompt", "completion"];
            if !h.iter().any(|c| known.contains(&c.as_str())) {
                return Err(Error::data(
                    line,
                    None,
                    "CSV header must name the columns (`text`,`label` / `text_a`,`text_b`,`label` / `prompt`,`completion`)",
                ));
            }
            self.csv_header = Some(h);
            return Ok(None);
        };
        if fields.len() != header.len() {
            return Err(Error::data(
                line,
                None,
                format!(
                    "has {} fields, the header has {}",
                    fields.len(),
                    header.len()
                ),
            ));
        }
        let mut obj = serde_json::Map::new();
        let mut label = None;
        for (k, v) in header.iter().zip(fields) {
            if k == "label" {
                label = Some(v);
            } else {
                obj.insert(k.clone(), Value::String(v));
            }
        }
        if let Some(l) = &label {
            // Give parse_json_record a placeholder and substitute the CSV-typed label.
            obj.insert("label".into(), Value::String(l.clone()));
        }
        let rec = parse_json_record(&obj, line)?;
        Ok(Some(match (rec, label) {
            (Record::Text { text, text_b, .. }, Some(l)) => Record::Text {
                text,
                text_b,
                label: raw_label_from_csv(&l, line)?,
            },
            (r, _) => r,
        }))
    }
}

/// End of the first CSV record (a newline outside quotes).
fn csv_record_end(buf: &[u8]) -> Option<usize> {
    let mut quoted = false;
    for (i, &b) in buf.iter().enumerate() {
        match b {
            b'"' => quoted = !quoted,
            b'\n' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

/// Reads and validates a whole dataset file: `(line, record)` pairs.
pub fn read_records(path: &Path) -> Result<Vec<(usize, Record)>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_records(&bytes)
}

pub fn parse_records(bytes: &[u8]) -> Result<Vec<(usize, Record)>> {
    let mut out = Vec::new();
    let mut r = RecordReader::new();
    let mut sink = |l: usize, rec: Record| {
        out.push((l, rec));
        Ok(())
    };
    r.feed(bytes, &mut sink)?;
    r.finish(&mut sink)?;
    check_consistent(&out)?;
    Ok(out)
}

fn kind_of(r: &Record) -> &'static str {
    match r {
        Record::Text { text_b: None, .. } => "text/label",
        Record::Text {
            text_b: Some(_), ..
        } => "text_a/text_b/label",
        Record::PromptCompletion { .. } => "prompt/completion",
        Record::Chat { .. } => "messages",
    }
}

/// All rows must share one shape, and labels one type.
pub fn check_consistent(recs: &[(usize, Record)]) -> Result<()> {
    let Some((_, first)) = recs.first() else {
        return Ok(());
    };
    let k0 = kind_of(first);
    let mut label_kind: Option<(&'static str, usize)> = None;
    for (line, r) in recs {
        if kind_of(r) != k0 {
            return Err(Error::data(
                *line,
                None,
                format!("row is {} but earlier rows are {k0}", kind_of(r)),
            ));
        }
        if let Record::Text { label, .. } = r {
            let lk = match label {
                RawLabel::Str(_) => "string",
                RawLabel::Int(_) | RawLabel::Float(_) => "number",
            };
            match label_kind {
                None => label_kind = Some((lk, *line)),
                Some((k, l)) if k != lk => {
                    return Err(Error::data(
                        *line,
                        Some("label"),
                        format!("is a {lk} but line {l} has a {k} label"),
                    ))
                }
                _ => {}
            }
        }
    }
    Ok(())
}

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

/// A plain chat template used when the model ships none. Each turn is `<|role|>\n` + content
/// + `\n`; assistant turns end with the EOS token.
pub const DEFAULT_CHAT_TEMPLATE: &str = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}";

/// A `tokenizer.json` tokenizer with padding and truncation switched off (batches are padded
/// dynamically), plus what SFT needs: EOS and the chat template.
pub struct TextTokenizer {
    pub inner: tokenizers::Tokenizer,
    pub eos_id: Option<u32>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub chat_template: String,
}

fn special_token(cfg: &Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let mut inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let tc = dir.join("tokenizer_config.json");
        let tcfg = if tc.exists() {
            crate::checkpoint::read_json(&tc)?
        } else {
            Value::Null
        };
        let eos_token = special_token(&tcfg, "eos_token");
        let bos_token = special_token(&tcfg, "bos_token");
        let template_file = dir.join("chat_template.jinja");
        let chat_template = if let Some(t) = tcfg.get("chat_template").and_then(|t| t.as_str()) {
            t.to_string()
        } else if template_file.exists() {
            std::fs::read_to_string(&template_file).map_err(|e| Error::io(&template_file, e))?
        } else {
            DEFAULT_CHAT_TEMPLATE.to_string()
        };
        let eos_id = eos_token.as_deref().and_then(|t| inner.token_to_id(t));
        Ok(TextTokenizer {
            inner,
            eos_id,
            bos_token,
            eos_token,
            chat_template,
        })
    }

    fn encode(&self, text: &str, special: bool) -> Result<tokenizers::Encoding> {
        self.inner
            .encode(text, special)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut env = minijinja::Environment::new();
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", &self.chat_template)
            .map_err(|e| Error::Tokenizer(format!("chat template: {e}")))?;
        let tmpl = env.get_template("chat").expect("just added");
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| Error::Tokenizer(format!("chat template: {e}")))
    }
}

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

/// A fully prepared dataset.
pub struct Dataset {
    pub examples: Vec<Example>,
    pub task: Task,
    pub labels: Option<LabelMap>,
    pub stats: EncodeStats,
}

/// The batches of one epoch: a permutation drawn from the seed and the epoch number, so the
/// same seed gives the same batches and a resumed run continues the same sequence.
pub fn epoch_order(n: usize, seed: u64, epoch: u64, shuffle: bool) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng = crate::rng::stream(seed, "shuffle", epoch);
        idx.shuffle(&mut rng);
    }
    idx
}

/// Pads a batch to its longest example.
pub fn collate(examples: &[&Example], pad_id: u32, dtype: DType, device: &Device) -> Result<Batch> {
    let b = examples.len();
    let t = examples
        .iter()
        .map(|e| e.ids.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let mut ids = vec![pad_id; b * t];
    let mut types = vec![0u32; b * t];
    let mut mask = vec![0f32; b * t];
    let mut num_tokens = 0;
    for (i, e) in examples.iter().enumerate() {
        for (j, &id) in e.ids.iter().enumerate() {
            ids[i * t + j] = id;
            types[i * t + j] = e.type_ids.get(j).copied().unwrap_or(0);
            mask[i * t + j] = 1.0;
        }
        num_tokens += e.ids.len();
    }
    let labels = match examples.first().map(|e| &e.target) {
        Some(Target::Class(_)) => {
            let y: Vec<u32> = examples
                .iter()
                .map(|e| match e.target {
                    Target::Class(c) => c,
                    _ => 0,
                })
                .collect();
            Labels::Class(Tensor::from_vec(y, b, device)?)
        }
        Some(Target::Value(_)) => {
            let y: Vec<f32> = examples
                .iter()
                .map(|e| match e.target {
                    Target::Value(v) => v,
                    _ => 0.0,
                })
                .collect();
            Labels::Value(Tensor::from_vec(y, b, device)?.to_dtype(dtype)?)
        }
        Some(Target::Tokens(_)) => {
            let mut targets = vec![0u32; b * t];
            let mut lm = vec![0f32; b * t];
            for (i, e) in examples.iter().enumerate() {
                if let Target::Tokens(m) = &e.target {
                    for j in 0..e.ids.len().saturating_sub(1) {
                        targets[i * t + j] = e.ids[j + 1];
                        lm[i * t + j] = m[j + 1] as f32;
                    }
                }
            }
            Labels::NextToken {
                targets: Tensor::from_vec(targets, (b, t), device)?,
                mask: Tensor::from_vec(lm, (b, t), device)?.to_dtype(dtype)?,
            }
        }
        None => Labels::None,
    };
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (b, t), device)?,
        token_type_ids: Tensor::from_vec(types, (b, t), device)?,
        attention_mask: Tensor::from_vec(mask, (b, t), device)?.to_dtype(dtype)?,
        labels,
        num_tokens,
        batch_size: b,
    })
}
