//! One fine-tuning job end to end — load the base model and tokenizer, read and validate the
//! data, prepare the method, train, evaluate, build the artifact — shared by the CLI and the
//! service's worker.

use std::path::{Path, PathBuf};

use candle_core::DType;
use serde::{Deserialize, Serialize};

use crate::artifact::{Artifact, Descriptor, FORMAT, FORMAT_VERSION};
use crate::data::{encode_records, infer_task, read_records, Dataset, LabelMap, TextTokenizer};
use crate::methods::MethodSpec;
use crate::models::{Model, Task};
use crate::optim::AdamConfig;
use crate::pretrained::{load_model, read_config, LoadOptions, LoadReport};
use crate::train::{train, TrainConfig, TrainIo, TrainSummary};
use crate::{Error, Result};

fn default_max_len() -> usize {
    crate::train::config::DEFAULT_MAX_SEQ_LEN
}

/// One run of the engine on local files (what a service job becomes once its inputs are
/// downloaded).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunSpec {
    pub model_dir: PathBuf,
    /// How the user named the base model (a path or hub id), recorded in the artifact.
    #[serde(default)]
    pub model_name: Option<String>,
    pub train_file: PathBuf,
    #[serde(default)]
    pub valid_file: Option<PathBuf>,
    /// `classification`, `regression` or `causal-lm`; inferred from the rows when absent.
    #[serde(default)]
    pub task: Option<String>,
    pub method: MethodSpec,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default = "default_max_len")]
    pub max_seq_len: usize,
    /// `f32` or `bf16`.
    #[serde(default)]
    pub dtype: Option<String>,
    /// Use only the first N training rows (quick runs).
    #[serde(default)]
    pub limit_train: Option<usize>,
    #[serde(default)]
    pub limit_valid: Option<usize>,
}

pub struct JobOutput {
    pub artifact: Artifact,
    pub summary: TrainSummary,
    pub load_report: LoadReport,
    pub train_stats: crate::data::EncodeStats,
    pub model: Model,
}

pub fn parse_dtype(s: Option<&str>) -> Result<DType> {
    match s.unwrap_or("f32") {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f64" => Ok(DType::F64),
        o => Err(Error::param(
            "dtype",
            format!("unknown dtype `{o}` (f32, bf16)"),
        )),
    }
}

/// Reads a dataset file and encodes it. `labels`/`task` come from the training set when this
/// is the validation set.
pub fn load_dataset(
    path: &Path,
    tok: &TextTokenizer,
    forced_task: Option<&str>,
    known: Option<(&Task, Option<&LabelMap>)>,
    max_seq_len: usize,
    limit: Option<usize>,
) -> Result<Dataset> {
    let mut recs = read_records(path)?;
    if let Some(l) = limit {
        recs.truncate(l);
    }
    let (task, labels) = match known {
        Some((t, l)) => (t.clone(), l.cloned()),
        None => infer_task(&recs, forced_task)?,
    };
    let (examples, stats) = encode_records(&recs, tok, &task, labels.as_ref(), max_seq_len)?;
    Ok(Dataset {
        examples,
        task,
        labels,
        stats,
    })
}

pub fn run_job(spec: &RunSpec, device: &candle_core::Device, io: TrainIo<'_>) -> Result<JobOutput> {
    let tok = TextTokenizer::from_dir(&spec.model_dir)?;
    let train_set = load_dataset(
        &spec.train_file,
        &tok,
        spec.task.as_deref(),
        None,
        spec.max_seq_len,
        spec.limit_train,
    )?;
    let valid = match &spec.valid_file {
        Some(v) => Some(load_dataset(
            v,
            &tok,
            None,
            Some((&train_set.task, train_set.labels.as_ref())),
            spec.max_seq_len,
            spec.limit_valid,
        )?),
        None => None,
    };
    let dtype = parse_dtype(spec.dtype.as_deref())?;
    let opts = LoadOptions {
        task: train_set.task.clone(),
        dtype,
        device: device.clone(),
        seed: spec.train.seed,
    };
    let (mut model, load_report) = load_model(&spec.model_dir, &opts)?;
    let adam = AdamConfig {
        weight_decay: spec.train.weight_decay,
        ..Default::default()
    };
    let mut method = spec.method.build(adam)?;
    method.prepare(&mut model, spec.train.seed)?;
    let summary = train(
        &mut model,
        method.as_mut(),
        &spec.train,
        &train_set,
        valid.as_ref(),
        io,
    )?;
    let (tensors, entries) = method.delta(&model)?;
    let descriptor = Descriptor {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        arch: model.arch,
        task: model.task.clone(),
        method: method.name().into(),
        hyperparameters: method.hyperparameters(),
        base_model_sha256: load_report.base_sha256.clone(),
        base_model: spec
            .model_name
            .clone()
            .or_else(|| Some(spec.model_dir.display().to_string())),
        labels: train_set.labels.clone(),
        entries,
        training: serde_json::json!({
            "config": spec.train,
            "max_seq_len": spec.max_seq_len,
            "dtype": format!("{dtype:?}").to_lowercase(),
            "steps": summary.steps,
            "tokens": summary.tokens,
            "final_loss": summary.final_loss,
            "eval": summary.eval,
            "initialised": load_report.initialised,
        }),
    };
    Ok(JobOutput {
        artifact: Artifact {
            descriptor,
            tensors,
        },
        summary,
        load_report,
        train_stats: train_set.stats,
        model,
    })
}

/// A base model with an optional artifact applied, ready for `evaluate` / `predict`.
pub fn load_for_inference(
    model_dir: &Path,
    artifact: Option<&Artifact>,
    task: Option<Task>,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<(Model, TextTokenizer, Option<LabelMap>)> {
    let tok = TextTokenizer::from_dir(model_dir)?;
    // A merged folder (the service's merge, or a client's) says its head in config.json.
    let mut folder_labels = None;
    let task = match (artifact, task) {
        (Some(a), _) => a.descriptor.task.clone(),
        (None, Some(t)) => t,
        (None, None) => {
            let (arch, raw) = read_config(model_dir)?;
            match crate::models::head_of_config(&raw) {
                Some((t, labels)) => {
                    folder_labels = labels;
                    t
                }
                None => arch.parse(&raw)?.default_task().ok_or_else(|| {
                    Error::param("task", "give a task (or an artifact) for an encoder model")
                })?,
            }
        }
    };
    let opts = LoadOptions {
        task,
        dtype,
        device: device.clone(),
        seed: 0,
    };
    let (mut model, report) = load_model(model_dir, &opts)?;
    if let Some(a) = artifact {
        if a.descriptor.base_model_sha256 != report.base_sha256 {
            return Err(Error::Artifact(format!(
                "base model mismatch: the artifact was trained on sha256 {} but {} has {}",
                a.descriptor.base_model_sha256,
                model_dir.display(),
                report.base_sha256
            )));
        }
        a.apply(&mut model)?;
    }
    let labels = artifact
        .and_then(|a| a.descriptor.labels.clone())
        .or(folder_labels);
    Ok((model, tok, labels))
}
