use std::path::PathBuf;

/// Engine errors. `is_user_error` separates what the submitter must fix (bad data, impossible
/// hyperparameters, an unusable model) from failures worth retrying.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("model: {0}")]
    Model(String),
    #[error("{}", fmt_data(*.line, .field, .reason))]
    Data {
        /// 1-based line (JSONL) or record (CSV) number; 0 when the file as a whole is wrong.
        line: usize,
        field: Option<String>,
        reason: String,
    },
    #[error("invalid value for `{param}`: {reason}")]
    Param { param: String, reason: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("artifact: {0}")]
    Artifact(String),
    #[error("training was cancelled")]
    Cancelled,
    /// Stopped at a step boundary to hand the run over (the process is shutting down); the
    /// steps done are in the last checkpoint.
    #[error("training stopped after step {step} to be resumed elsewhere")]
    Drained { step: usize },
    #[error("{0}")]
    Other(String),
}

fn fmt_data(line: usize, field: &Option<String>, reason: &str) -> String {
    match (line, field) {
        (0, None) => reason.to_string(),
        (0, Some(f)) => format!("field `{f}`: {reason}"),
        (l, None) => format!("line {l}: {reason}"),
        (l, Some(f)) => format!("line {l}: field `{f}`: {reason}"),
    }
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn data(line: usize, field: Option<&str>, reason: impl Into<String>) -> Self {
        Error::Data {
            line,
            field: field.map(str::to_string),
            reason: reason.into(),
        }
    }
    pub fn param(param: &str, reason: impl Into<String>) -> Self {
        Error::Param {
            param: param.to_string(),
            reason: reason.into(),
        }
    }
    /// Errors that retrying cannot fix.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            Error::Model(_) | Error::Data { .. } | Error::Param { .. } | Error::Tokenizer(_)
        )
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
