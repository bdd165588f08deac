//! Datasets: JSONL or CSV rows for classification / regression (`text`, or `text_a` +
//! `text_b`, and `label`) and causal-LM SFT (`prompt` + `completion`, or chat `messages`);
//! tokenisation with truncation; seeded shuffling and dynamically padded batches.
//!
//! [`records`] (one row) → [`reader`] (a file) → [`labels`] (the task) → [`encode`] (token ids,
//! with the [`tokenizer`]) → [`batch`].

pub mod batch;
pub mod encode;
pub mod labels;
pub mod reader;
pub mod records;
pub mod tokenizer;

pub use batch::{collate, epoch_order, Dataset};
pub use encode::{encode_records, EncodeStats, Example, Target};
pub use labels::{infer_task, LabelMap, TaskEvidence, MAX_CLASSES};
pub use reader::{
    check_consistent, detect_format, parse_records, read_records, CheckedFile, FileFormat,
    RecordReader, StreamingCheck, MAX_ROW_BYTES,
};
pub use records::{parse_json_record, parse_jsonl_line, Message, RawLabel, Record};
pub use tokenizer::{check_chat_template, ChatTemplate, TextTokenizer, DEFAULT_CHAT_TEMPLATE};
