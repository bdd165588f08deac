//! A job, typed: its kind and status (stored as text, checked by the schema), the spec the API
//! writes and the worker reads, and the result the worker writes and the API reads. Figures
//! the database sorts or sums are columns too (see `migrations/…_typed_jobs.sql`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sparsegrad_engine::methods::registry::DEFAULT_MAX_SEQ_LEN;
use sparsegrad_engine::methods::MethodSpec;
use sparsegrad_engine::pipeline::RunSpec;
use sparsegrad_engine::train::{EvalMetrics, TrainConfig};

use super::catalog::ModelSource;
use super::estimate::Estimate;

/// An enum stored as one of a fixed set of text values: serde and sqlx both use those values,
/// and decoding anything else is an error (never a silent default).
macro_rules! text_enum {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(format!(
                        "unknown {} `{other}`",
                        stringify!($name)
                    )),
                }
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }

        impl sqlx::Type<sqlx::Postgres> for $name {
            fn type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::Type<sqlx::Postgres>>::type_info()
            }
            fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <&str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
            }
        }

        impl sqlx::Encode<'_, sqlx::Postgres> for $name {
            fn encode_by_ref(
                &self,
                buf: &mut sqlx::postgres::PgArgumentBuffer,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<sqlx::Postgres>>::encode_by_ref(&self.as_str(), buf)
            }
        }

        impl<'r> sqlx::Decode<'r, sqlx::Postgres> for $name {
            fn decode(
                value: sqlx::postgres::PgValueRef<'r>,
            ) -> Result<Self, sqlx::error::BoxDynError> {
                let s = <&str as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
                Ok(s.parse::<$name>()?)
            }
        }
    };
}

text_enum! {
    /// Where a job is in its life. Files are validated at upload, so a job starts `queued`.
    pub enum JobStatus {
        Queued = "queued",
        Running = "running",
        /// Cancellation was requested while it ran; its worker stops and confirms.
        Cancelling = "cancelling",
        /// Held out of the queue with its latest checkpoint until it is resumed.
        Paused = "paused",
        Succeeded = "succeeded",
        Failed = "failed",
        Cancelled = "cancelled",
    }
}

impl JobStatus {
    /// Nothing will change any more.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
    }
    /// A worker holds it.
    pub fn is_running(self) -> bool {
        matches!(self, JobStatus::Running | JobStatus::Cancelling)
    }
}

text_enum! {
    /// What a job does. Every kind runs on the same queue and workers.
    pub enum JobKind {
        FineTune = "fine_tune",
        /// Writes a succeeded fine-tune's base + delta as a model folder.
        Merge = "merge",
    }
}

text_enum! {
    pub enum EventLevel {
        Info = "info",
        Warn = "warn",
        Error = "error",
    }
}

text_enum! {
    /// What an event reports: a status change, a note, or training figures.
    pub enum EventType {
        Status = "status",
        Message = "message",
        Metrics = "metrics",
    }
}

text_enum! {
    /// A point on a job's curves.
    pub enum MetricKind {
        Train = "train",
        Eval = "eval",
    }
}

text_enum! {
    pub enum ArtifactKind {
        /// `delta.safetensors` + `delta.json`.
        Delta = "delta",
        /// A whole Hugging Face-layout model (a merge's output).
        Merged = "merged",
    }
}

/// A stored input file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FileRef {
    pub id: String,
    pub object_key: String,
}

/// What a fine-tune trains: the worker's part of the spec.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FineTune {
    /// Where the base model's files are.
    pub base: ModelSource,
    /// How the user named the model.
    pub model: String,
    pub training_file: FileRef,
    #[serde(default)]
    pub validation_file: Option<FileRef>,
    pub method: MethodSpec,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default = "default_len")]
    pub max_seq_len: usize,
    #[serde(default)]
    pub task: Option<String>,
}

fn default_len() -> usize {
    DEFAULT_MAX_SEQ_LEN
}

impl FineTune {
    /// What the engine runs for this job once its inputs are local files.
    pub fn run_spec(
        &self,
        model_dir: PathBuf,
        train_file: PathBuf,
        valid_file: Option<PathBuf>,
    ) -> RunSpec {
        RunSpec {
            model_dir,
            model_name: Some(self.model.clone()),
            train_file,
            valid_file,
            task: self.task.clone(),
            method: self.method.clone(),
            train: self.train.clone(),
            max_seq_len: self.max_seq_len,
            dtype: None,
            limit_train: None,
            limit_valid: None,
        }
    }
}

/// The method as the job object shows it: its name and every resolved hyperparameter.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MethodEcho {
    #[serde(rename = "type")]
    pub kind: String,
    pub hyperparameters: serde_json::Value,
}

/// What the API keeps of the request, for the job object and idempotent replays.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ApiMeta {
    pub method: MethodEcho,
    pub seed: u64,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    pub estimate: Estimate,
    /// Identifies the request body: the same Idempotency-Key with another body is a conflict.
    pub request_sha256: String,
}

/// `jobs.spec` of a fine-tune: what runs, plus what the API keeps (under `api`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct JobSpec {
    #[serde(flatten)]
    pub run: FineTune,
    pub api: ApiMeta,
}

impl JobSpec {
    /// The model name a succeeded fine-tune is served under (OpenAI's form):
    /// `ft:{model}[:{suffix}]:{job id}`. The job id is always the last segment.
    pub fn fine_tuned_model(&self, job_id: &str) -> String {
        match &self.api.suffix {
            Some(s) => format!("ft:{}:{s}:{job_id}", self.run.model),
            None => format!("ft:{}:{job_id}", self.run.model),
        }
    }
}

/// `jobs.spec` of a merge: the fine-tune's base model and delta.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MergeSpec {
    pub base: ModelSource,
    pub model: String,
    /// The fine-tune's `delta.safetensors`.
    pub delta_key: String,
}

/// `jobs.result` of a succeeded fine-tune.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FineTuneResult {
    /// Where it trained (`cpu`, `cuda:0`).
    pub device: String,
    /// Ids of the stored artifacts.
    pub result_files: Vec<String>,
    pub trained_steps: usize,
    pub trained_tokens: usize,
    pub final_loss: f64,
    pub eval: Option<EvalMetrics>,
    pub wall_secs: f64,
    pub peak_rss_bytes: Option<u64>,
    pub trainable_params: usize,
    pub optimizer_state: usize,
    #[serde(default)]
    pub method_stats: serde_json::Value,
}

/// `jobs.result` of a succeeded merge.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MergeResult {
    pub device: String,
    /// The model folder's file names.
    pub files: Vec<String>,
    pub result_files: Vec<String>,
    pub bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_enums_round_trip_and_refuse_unknown_values() {
        for s in JobStatus::ALL {
            assert_eq!(s.as_str().parse::<JobStatus>().unwrap(), *s);
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        for k in JobKind::ALL {
            assert_eq!(k.as_str().parse::<JobKind>().unwrap(), *k);
        }
        assert!("validating_files".parse::<JobStatus>().is_err());
        assert!("train".parse::<JobKind>().is_err());
        assert!(serde_json::from_value::<JobKind>("fine-tune".into()).is_err());
    }
}
