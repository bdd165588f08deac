//! Reading a dataset file: the format (JSONL or CSV with a header row) from its first byte,
//! then row by row with line numbers, rows that must all have one shape.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::records::{
    kind_of, parse_json_record, parse_jsonl_line, raw_label_from_csv, RawLabel, Record,
};
use crate::{Error, Result};

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

/// Streaming validator: feed bytes in any chunking, get every record (or the first error).
/// The CLI feeds it files, the service an upload's body.
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
