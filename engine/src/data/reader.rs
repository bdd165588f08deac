//! Reading a dataset file: the format (JSONL or CSV with a header row) from its first byte,
//! then row by row with line numbers, rows that must all have one shape.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::labels::TaskEvidence;
use super::records::{parse_json_record, parse_jsonl_line, raw_label_from_csv, Record};
use crate::models::Task;
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    Jsonl,
    Csv,
}

/// Looks at the first non-blank byte (after a UTF-8 byte-order mark): `{` (or `[`, a JSON
/// value that is not an object, answered as such) means JSONL, anything else CSV with a header
/// row.
pub fn detect_format(bytes: &[u8]) -> FileFormat {
    let bytes = bytes.strip_prefix(BOM).unwrap_or(bytes);
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') | Some(b'[') => FileFormat::Jsonl,
        _ => FileFormat::Csv,
    }
}

/// The UTF-8 byte-order mark some editors write first.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Longest row (a JSONL line, or a CSV record with its quoted line breaks): the reader holds
/// at most one unfinished row, so this bounds its memory whatever the file's size.
pub const MAX_ROW_BYTES: usize = 8 << 20;

/// Streaming validator: feed bytes in any chunking, get every record (or the first error).
/// The CLI feeds it files, the service an upload's body.
///
/// Linear in the input: bytes already scanned are not scanned again (a row's end is searched
/// from where the last search stopped, with the CSV quote state kept), and the buffer is
/// compacted once per chunk, not once per row.
pub struct RecordReader {
    format: Option<FileFormat>,
    buf: Vec<u8>,
    /// `buf[..scan]` holds no end of the current row.
    scan: usize,
    /// Inside a quoted CSV field at `scan`.
    quoted: bool,
    line: usize,
    csv_header: Option<Vec<String>>,
    csv: csv_core::Reader,
    csv_out: Vec<u8>,
    csv_ends: Vec<usize>,
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
            scan: 0,
            quoted: false,
            line: 0,
            csv_header: None,
            csv: csv_core::Reader::new(),
            csv_out: Vec::new(),
            csv_ends: Vec::new(),
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
            if self.buf.len() < BOM.len() && BOM.starts_with(&self.buf) {
                return Ok(());
            }
            if self.buf.starts_with(BOM) {
                self.buf.drain(..BOM.len());
            }
            if self.buf.iter().all(|b| b.is_ascii_whitespace()) {
                return Ok(());
            }
            self.format = Some(detect_format(&self.buf));
        }
        self.drain(false, sink)?;
        if self.buf.len() > MAX_ROW_BYTES {
            return Err(Error::data(
                self.line + 1,
                None,
                format!("row is longer than {MAX_ROW_BYTES} bytes"),
            ));
        }
        Ok(())
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
        let mut buf = std::mem::take(&mut self.buf);
        let mut start = 0;
        let result = self.rows(&buf, &mut start, eof, sink);
        if start > 0 {
            // Only the unfinished row moves: each byte at most once or twice overall.
            buf.drain(..start);
            self.scan -= start;
        }
        self.buf = buf;
        result
    }

    /// Where the current row ends, searching on from where the last search stopped.
    fn row_end(&mut self, buf: &[u8]) -> Option<usize> {
        let from = self.scan;
        let found = if self.format == Some(FileFormat::Csv) {
            let mut end = None;
            for (i, &b) in buf[from..].iter().enumerate() {
                match b {
                    b'"' => self.quoted = !self.quoted,
                    b'\n' if !self.quoted => {
                        end = Some(from + i);
                        break;
                    }
                    _ => {}
                }
            }
            end
        } else {
            buf[from..]
                .iter()
                .position(|&b| b == b'\n')
                .map(|i| from + i)
        };
        self.scan = found.map_or(buf.len(), |i| i + 1);
        found
    }

    /// Parses the complete rows of `buf` from `start` on, advancing `start` past each.
    fn rows(
        &mut self,
        buf: &[u8],
        start: &mut usize,
        eof: bool,
        sink: &mut dyn FnMut(usize, Record) -> Result<()>,
    ) -> Result<()> {
        loop {
            let (row, next) = match self.row_end(buf) {
                Some(i) => (&buf[*start..i], i + 1),
                None if eof && *start < buf.len() => (&buf[*start..], buf.len()),
                None => return Ok(()),
            };
            *start = next;
            self.line += 1;
            let start_line = self.line;
            // A quoted CSV field may span lines; keep counting physical lines.
            self.line += row.iter().filter(|&&b| b == b'\n').count();
            let rec = match self.format {
                Some(FileFormat::Csv) => self.parse_csv_row(row, start_line)?,
                _ => parse_jsonl_line(row, start_line)?,
            };
            if let Some(r) = rec {
                self.records += 1;
                sink(start_line, r)?;
            }
        }
    }

    /// The fields of one CSV row (valid UTF-8), with a parser built once: building one per
    /// row cost more than the parsing.
    fn csv_fields(&mut self, row: &[u8], line: usize) -> Result<Vec<String>> {
        use csv_core::ReadRecordResult as R;
        self.csv.reset();
        // Unquoting only shrinks a row, and a row has at most one field more than bytes.
        self.csv_out.resize(row.len() + 1, 0);
        self.csv_ends.resize(row.len() + 2, 0);
        let (mut input, mut nout, mut nend) = (row, 0, 0);
        loop {
            let (res, i, o, e) =
                self.csv
                    .read_record(input, &mut self.csv_out[nout..], &mut self.csv_ends[nend..]);
            input = &input[i..];
            nout += o;
            nend += e;
            match res {
                // An empty input next time is the end of the row.
                R::InputEmpty => continue,
                R::Record | R::End => break,
                R::OutputFull | R::OutputEndsFull => {
                    return Err(Error::data(line, None, "malformed CSV row"))
                }
            }
        }
        let mut fields = Vec::with_capacity(nend);
        let mut from = 0;
        for &end in &self.csv_ends[..nend] {
            let f = std::str::from_utf8(&self.csv_out[from..end])
                .map_err(|_| Error::data(line, None, "invalid UTF-8 in a field"))?;
            fields.push(f.to_string());
            from = end;
        }
        Ok(fields)
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
        let fields = self.csv_fields(row, line)?;
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
    let mut ev = TaskEvidence::new();
    for (line, r) in recs {
        ev.add(*line, r)?;
    }
    Ok(())
}

/// What checking a whole file found.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckedFile {
    pub format: FileFormat,
    pub task: Task,
    pub rows: usize,
}

/// A dataset file checked as it streams in: every row parsed and held to the first row's
/// shape and label type, keeping nothing but the unfinished row and the class names, so
/// memory does not grow with the file and each byte is looked at a bounded number of times.
#[derive(Default)]
pub struct StreamingCheck {
    reader: RecordReader,
    evidence: TaskEvidence,
}

impl StreamingCheck {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn feed(&mut self, chunk: &[u8]) -> Result<()> {
        let ev = &mut self.evidence;
        self.reader.feed(chunk, &mut |line, r| ev.add(line, &r))
    }

    pub fn finish(mut self) -> Result<CheckedFile> {
        let ev = &mut self.evidence;
        self.reader.finish(&mut |line, r| ev.add(line, &r))?;
        let (task, _) = self.evidence.task(None)?;
        Ok(CheckedFile {
            format: self.reader.format().unwrap_or(FileFormat::Jsonl),
            task,
            rows: self.evidence.rows(),
        })
    }
}
