//! The worker: claims a job, fetches its inputs from storage, runs the engine on a dedicated
//! thread (never on the async runtime), turns engine progress into events and heartbeats,
//! honours cancellation within a heartbeat, uploads checkpoints and the artifact, and on a
//! retry resumes from the last uploaded checkpoint.
//!
//! [`try_run_one`] is one step of the loop — claim, run to the end, report — so tests drive it
//! directly and never sleep.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sparsegrad_engine::methods::MethodSpec;
use sparsegrad_engine::pipeline::{run_job, JobSpec as EngineJob};
use sparsegrad_engine::train::{Event, TrainConfig, TrainIo};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::models::{materialize, MaterializeError, ModelSource};
use crate::queue::{self, Failure, Lease, NewArtifact, QueueConfig, QueueError};
use crate::storage::{keys, Storage, StorageError};

/// A stored input file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FileRef {
    pub id: String,
    pub object_key: String,
}

/// What a queued job asks for (the API writes it into `jobs.spec`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct JobSpec {
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

impl JobSpec {
    /// What the engine runs for this job once its inputs are local files.
    pub fn engine_job(
        &self,
        model_dir: PathBuf,
        train_file: PathBuf,
        valid_file: Option<PathBuf>,
    ) -> EngineJob {
        EngineJob {
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

fn default_len() -> usize {
    128
}

#[derive(Clone)]
pub struct WorkerCtx {
    pub db: PgPool,
    pub storage: Storage,
    pub queue: QueueConfig,
    pub worker_id: String,
    /// Local scratch space for inputs, checkpoints and artifacts.
    pub work_dir: PathBuf,
    /// How often the lease is renewed (and cancellation polled); well under the lease.
    pub heartbeat: Duration,
    /// Where SparseGrad bases are cached between jobs.
    pub cache_dir: Option<PathBuf>,
    /// Local copies of base models registered in object storage.
    pub model_cache: PathBuf,
    /// Where fine-tunes train (merges run on the CPU: they read and write whole models).
    pub device: candle_core::Device,
}

/// What a merge job asks for: the fine-tune's base model and delta.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MergeSpec {
    pub base: ModelSource,
    pub model: String,
    /// The fine-tune's `delta.safetensors`.
    pub delta_key: String,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing was runnable.
    Empty,
    /// A job ran to an end: its new status.
    Ran { job_id: String, status: String },
    /// The lease was lost mid-run (another worker owns the job now); nothing was written.
    LostLease { job_id: String },
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Why an attempt ended without success.
enum Stop {
    User(String, Option<String>),
    Infra(String),
    Cancelled,
    Lost,
}

impl From<StorageError> for Stop {
    fn from(e: StorageError) -> Self {
        Stop::Infra(e.to_string())
    }
}
impl From<std::io::Error> for Stop {
    fn from(e: std::io::Error) -> Self {
        Stop::Infra(format!("local I/O: {e}"))
    }
}
impl From<QueueError> for Stop {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::LeaseLost(_) => Stop::Lost,
            QueueError::Db(e) => Stop::Infra(format!("database: {e}")),
        }
    }
}
impl From<MaterializeError> for Stop {
    fn from(e: MaterializeError) -> Self {
        match e {
            MaterializeError::Empty(p) => Stop::User(
                format!("the base model's storage prefix `{p}` holds no objects"),
                Some("model".into()),
            ),
            other => Stop::Infra(format!("fetching the base model: {other}")),
        }
    }
}
impl From<sqlx::Error> for Stop {
    fn from(e: sqlx::Error) -> Self {
        Stop::Infra(format!("database: {e}"))
    }
}

/// Appends an event (fenced like every other write after the claim).
async fn event(
    db: &PgPool,
    lease: &Lease,
    level: &str,
    kind: &str,
    message: &str,
    data: Option<serde_json::Value>,
) -> Result<(), Stop> {
    Ok(queue::event(db, lease, level, kind, message, data.as_ref()).await?)
}

/// Claims and runs one job.
pub async fn try_run_one(ctx: &WorkerCtx) -> Result<Outcome, WorkerError> {
    queue::reap(&ctx.db, &ctx.queue).await?;
    let Some((job, lease)) = queue::claim(&ctx.db, &ctx.worker_id, &ctx.queue).await? else {
        return Ok(Outcome::Empty);
    };
    let span = tracing::info_span!("job", job_id = %job.id, attempt = job.attempt);
    let dir = ctx
        .work_dir
        .join(&job.id)
        .join(format!("attempt-{}", job.attempt));
    // Instrumented, not entered: a span guard held across awaits tags other tasks' logs.
    let result = match job.kind.as_str() {
        "merge" => {
            run_merge(ctx, &lease, &job.spec, &dir)
                .instrument(span)
                .await
        }
        _ => run(ctx, &lease, &job.spec, &dir).instrument(span).await,
    };
    let _ = tokio::fs::remove_dir_all(&dir).await;
    let settled = match result {
        Ok((summary, artifacts)) => {
            // Like every ending's event: a lost lease shows in the fenced completion below.
            let data = Some(summary.clone());
            let _ = event(&ctx.db, &lease, "info", "status", "succeeded", data).await;
            queue::complete_with_artifacts(&ctx.db, &lease, &summary, &artifacts)
                .await
                .map(|()| "succeeded".to_string())
        }
        Err(Stop::Lost) => return Ok(Outcome::LostLease { job_id: job.id }),
        Err(Stop::Cancelled) => {
            let _ = event(&ctx.db, &lease, "info", "status", "cancelled", None).await;
            queue::confirm_cancel(&ctx.db, &lease)
                .await
                .map(|()| "cancelled".to_string())
        }
        Err(Stop::User(message, param)) => {
            let err =
                serde_json::json!({"code": "invalid_job", "message": message, "param": param});
            let _ = event(&ctx.db, &lease, "error", "status", &message, None).await;
            queue::fail(&ctx.db, &lease, Failure::User, &err, &ctx.queue).await
        }
        Err(Stop::Infra(message)) => {
            let err = serde_json::json!({"code": "infrastructure_error", "message": message, "param": null});
            let _ = event(&ctx.db, &lease, "warn", "status", &message, None).await;
            queue::fail(&ctx.db, &lease, Failure::Infrastructure, &err, &ctx.queue).await
        }
    };
    match settled {
        Ok(status) => Ok(Outcome::Ran {
            job_id: job.id,
            status,
        }),
        Err(QueueError::LeaseLost(_)) => Ok(Outcome::LostLease { job_id: job.id }),
        Err(e) => Err(e.into()),
    }
}

/// The latest checkpoint uploaded for a job: `(step, keys)`.
async fn latest_checkpoint(
    st: &Storage,
    job_id: &str,
) -> Result<Option<(usize, Vec<String>)>, Stop> {
    let prefix = format!("{}/checkpoints", keys::job_prefix(job_id));
    let all = st.list(&prefix).await?;
    let mut best: Option<usize> = None;
    for k in &all {
        // A checkpoint counts once its marker (written last) is there.
        if let Some(step) = k
            .strip_prefix(&format!("{prefix}/step-"))
            .and_then(|r| r.strip_suffix("/complete"))
            .and_then(|s| s.parse().ok())
        {
            best = best.max(Some(step));
        }
    }
    Ok(best.map(|s| {
        let p = format!("{prefix}/step-{s}/");
        (
            s,
            all.iter().filter(|k| k.starts_with(&p)).cloned().collect(),
        )
    }))
}

/// Uploads the files of a folder; their total size.
async fn upload_dir(st: &Storage, dir: &Path, prefix: &str) -> Result<u64, Stop> {
    let mut rd = tokio::fs::read_dir(dir).await?;
    let mut total = 0;
    while let Some(e) = rd.next_entry().await? {
        if e.file_type().await?.is_file() {
            let name = e.file_name().to_string_lossy().to_string();
            total += st.put_file(&format!("{prefix}/{name}"), &e.path()).await?;
        }
    }
    Ok(total)
}

/// Uploads result files under the job's artifact prefix, with their sizes and digests.
async fn store_artifacts(
    st: &Storage,
    job_id: &str,
    kind: &'static str,
    dir: &Path,
    names: &[String],
) -> Result<Vec<NewArtifact>, Stop> {
    let mut out = Vec::new();
    for name in names {
        let path = dir.join(name);
        let p = vec![path.clone()];
        let sha256 =
            tokio::task::spawn_blocking(move || sparsegrad_engine::checkpoint::sha256_files(&p))
                .await
                .map_err(|e| Stop::Infra(format!("hashing: {e}")))?
                .map_err(|e| Stop::Infra(format!("hashing: {e}")))?;
        let key = keys::artifact(job_id, &format!("{kind}/{name}"));
        let bytes = st.put_file(&key, &path).await?;
        out.push(NewArtifact {
            id: crate::db::new_id("art"),
            kind,
            name: name.clone(),
            object_key: key,
            bytes,
            sha256,
        });
    }
    Ok(out)
}

type Done = (serde_json::Value, Vec<NewArtifact>);

async fn run(
    ctx: &WorkerCtx,
    lease: &Lease,
    spec: &serde_json::Value,
    dir: &Path,
) -> Result<Done, Stop> {
    let spec: JobSpec = serde_json::from_value(spec.clone())
        .map_err(|e| Stop::User(format!("job spec: {e}"), None))?;
    tokio::fs::create_dir_all(dir).await?;
    let model_dir = materialize(&ctx.storage, &spec.base, &ctx.model_cache).await?;
    let train_path = dir.join("train.data");
    ctx.storage
        .download(&spec.training_file.object_key, &train_path)
        .await?;
    let valid_path = match &spec.validation_file {
        Some(f) => {
            let p = dir.join("valid.data");
            ctx.storage.download(&f.object_key, &p).await?;
            Some(p)
        }
        None => None,
    };
    let ckpt_dir = dir.join("checkpoints");
    let resume_from = match latest_checkpoint(&ctx.storage, &lease.job_id).await? {
        Some((step, objs)) => {
            let local = ckpt_dir.join(format!("step-{step}"));
            for k in objs {
                let name = k.rsplit('/').next().unwrap_or_default().to_string();
                if name != "complete" {
                    ctx.storage.download(&k, &local.join(name)).await?;
                }
            }
            event(
                &ctx.db,
                lease,
                "info",
                "message",
                &format!("resuming from step {step}"),
                None,
            )
            .await?;
            Some(local)
        }
        None => None,
    };
    let engine = spec.engine_job(model_dir, train_path, valid_path);

    let cancel = Arc::new(AtomicBool::new(false));
    // Checkpoint events carry an acknowledgement: training waits until the checkpoint is
    // uploaded, so the local copy cannot be pruned under the upload.
    let (tx, mut rx) = mpsc::unbounded_channel::<(Event, Option<std::sync::mpsc::Sender<()>>)>();
    let out_dir = dir.join("artifact");
    let thread_cancel = cancel.clone();
    let thread_ckpt = ckpt_dir.clone();
    let cache_dir = ctx.cache_dir.clone();
    let thread_out = out_dir.clone();
    let device = ctx.device.clone();
    let device_label = sparsegrad_engine::device::device_name(&device);
    // Training owns a whole thread: it would starve the runtime's workers.
    let handle = std::thread::Builder::new()
        .name(format!("train-{}", lease.job_id))
        .spawn(move || {
            let mut on_event = |e: &Event| {
                if matches!(e, Event::Checkpoint { .. }) {
                    let (ack, done) = std::sync::mpsc::channel();
                    if tx.send((e.clone(), Some(ack))).is_ok() {
                        let _ = done.recv();
                    }
                } else {
                    let _ = tx.send((e.clone(), None));
                }
            };
            let out = run_job(
                &engine,
                &device,
                TrainIo {
                    on_event: &mut on_event,
                    cancel: &thread_cancel,
                    cache_dir,
                    checkpoint_dir: Some(thread_ckpt),
                    resume_from,
                },
            )?;
            out.artifact.save(&thread_out)?;
            Ok::<_, sparsegrad_engine::Error>(out.summary)
        })
        .map_err(|e| Stop::Infra(format!("cannot start the training thread: {e}")))?;

    let mut beat = tokio::time::interval(ctx.heartbeat);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_progress: Option<serde_json::Value> = None;
    // The first reason to stop; training is told to cancel and drained to its end.
    let running = serde_json::json!({
        "device": device_label,
        "attempt": lease.attempt,
        "worker": lease.worker_id,
    });
    let mut abort: Option<Stop> =
        match event(&ctx.db, lease, "info", "status", "running", Some(running)).await {
            Ok(()) => None,
            Err(s) => {
                cancel.store(true, Ordering::SeqCst);
                Some(s)
            }
        };
    loop {
        tokio::select! {
            e = rx.recv() => {
                let Some((e, ack)) = e else { break };
                if abort.is_none() {
                    if let Err(s) = on_event(ctx, lease, &e, &mut last_progress).await {
                        cancel.store(true, Ordering::SeqCst);
                        abort = Some(s);
                    }
                }
                drop(ack);
            }
            _ = beat.tick() => {
                if abort.is_some() {
                    continue;
                }
                match queue::heartbeat(&ctx.db, lease, &ctx.queue, last_progress.as_ref()).await {
                    Ok(b) if b.cancel_requested => cancel.store(true, Ordering::SeqCst),
                    Ok(_) => {}
                    Err(QueueError::LeaseLost(_)) => {
                        cancel.store(true, Ordering::SeqCst);
                        abort = Some(Stop::Lost);
                    }
                    // A database hiccup: keep training; the lease has slack for it.
                    Err(QueueError::Db(e)) => tracing::warn!("heartbeat failed: {e}"),
                }
            }
        }
    }
    let result = tokio::task::spawn_blocking(move || handle.join())
        .await
        .map_err(|e| Stop::Infra(format!("training thread: {e}")))?
        .map_err(|_| Stop::Infra("the training thread panicked".into()))?;
    if let Some(s) = abort {
        return Err(s);
    }
    let summary = match result {
        Ok(s) => s,
        Err(sparsegrad_engine::Error::Cancelled) => return Err(Stop::Cancelled),
        Err(e) if e.is_user_error() => {
            let param = match &e {
                sparsegrad_engine::Error::Param { param, .. } => Some(param.clone()),
                sparsegrad_engine::Error::Data { .. } => Some("training_file".to_string()),
                _ => None,
            };
            return Err(Stop::User(e.to_string(), param));
        }
        Err(e) => return Err(Stop::Infra(e.to_string())),
    };
    let names = ["delta.safetensors", "delta.json"].map(String::from);
    let artifacts = store_artifacts(&ctx.storage, &lease.job_id, "delta", &out_dir, &names).await?;
    let summary = serde_json::json!({
        "device": device_label,
        "result_files": artifacts.iter().map(|a| &a.id).collect::<Vec<_>>(),
        "trained_steps": summary.steps,
        "trained_tokens": summary.tokens,
        "final_loss": summary.final_loss,
        "eval": summary.eval,
        "wall_secs": summary.wall_secs,
        "peak_rss_bytes": summary.peak_rss_bytes,
        "trainable_params": summary.trainable_params,
        "optimizer_state": summary.optimizer_state,
        "method_stats": summary.method_stats,
    });
    Ok((summary, artifacts))
}

/// Merges a fine-tune's delta into its base model and stores the Hugging Face-layout folder.
async fn run_merge(
    ctx: &WorkerCtx,
    lease: &Lease,
    spec: &serde_json::Value,
    dir: &Path,
) -> Result<Done, Stop> {
    let spec: MergeSpec = serde_json::from_value(spec.clone())
        .map_err(|e| Stop::User(format!("merge spec: {e}"), None))?;
    tokio::fs::create_dir_all(dir).await?;
    let running =
        serde_json::json!({"device": "cpu", "attempt": lease.attempt, "worker": lease.worker_id});
    event(&ctx.db, lease, "info", "status", "running", Some(running)).await?;
    let model_dir = materialize(&ctx.storage, &spec.base, &ctx.model_cache).await?;
    let delta = dir.join("delta.safetensors");
    ctx.storage.download(&spec.delta_key, &delta).await?;
    let out = dir.join("merged");
    let thread_out = out.clone();
    // Merging reads and writes a whole model: a blocking thread, not a runtime worker.
    let merged = tokio::task::spawn_blocking(move || {
        let art = sparsegrad_engine::artifact::Artifact::load(&delta)?;
        sparsegrad_engine::artifact::merge(&model_dir, &art, &thread_out, 0)
    })
    .await
    .map_err(|e| Stop::Infra(format!("merge thread: {e}")))?;
    match merged {
        Ok(()) => {}
        Err(e) if e.is_user_error() => return Err(Stop::User(e.to_string(), None)),
        Err(e) => return Err(Stop::Infra(e.to_string())),
    }
    let mut names = Vec::new();
    let mut rd = tokio::fs::read_dir(&out).await?;
    while let Some(e) = rd.next_entry().await? {
        if e.file_type().await?.is_file() {
            names.push(e.file_name().to_string_lossy().to_string());
        }
    }
    names.sort();
    let artifacts = store_artifacts(&ctx.storage, &lease.job_id, "merged", &out, &names).await?;
    let summary = serde_json::json!({
        "device": "cpu",
        "files": names,
        "result_files": artifacts.iter().map(|a| &a.id).collect::<Vec<_>>(),
        "bytes": artifacts.iter().map(|a| a.bytes).sum::<u64>(),
    });
    Ok((summary, artifacts))
}

/// Records one engine event (and uploads checkpoints).
async fn on_event(
    ctx: &WorkerCtx,
    lease: &Lease,
    e: &Event,
    last_progress: &mut Option<serde_json::Value>,
) -> Result<(), Stop> {
    match e {
        Event::Step(p) => {
            *last_progress = Some(serde_json::to_value(p).unwrap_or_default());
            if let Some(d) = last_progress.as_ref() {
                queue::metric(&ctx.db, lease, "train", p.step, d).await?;
            }
            let msg = format!("step {}/{}: loss {:.4}", p.step, p.total_steps, p.loss);
            event(
                &ctx.db,
                lease,
                "info",
                "metrics",
                &msg,
                last_progress.clone(),
            )
            .await
        }
        Event::Eval { step, metrics } => {
            let msg = format!("eval at step {step}: loss {:.4}", metrics.loss);
            let data = serde_json::json!({"step": step, "eval": metrics});
            queue::metric(
                &ctx.db,
                lease,
                "eval",
                *step,
                &serde_json::to_value(metrics).unwrap_or_default(),
            )
            .await?;
            event(&ctx.db, lease, "info", "metrics", &msg, Some(data)).await
        }
        Event::Started {
            total_steps,
            start_step,
            trainable_params,
            total_params,
            examples,
        } => {
            let msg = format!(
                "training on {examples} examples for {total_steps} steps from step {start_step}; \
                 {trainable_params} of {total_params} parameters trained"
            );
            let data = serde_json::to_value(e).unwrap_or_default();
            event(&ctx.db, lease, "info", "message", &msg, Some(data)).await
        }
        Event::Checkpoint { step, path } => {
            let prefix = format!(
                "{}/checkpoints/step-{step}",
                keys::job_prefix(&lease.job_id)
            );
            let stored = async {
                let bytes = upload_dir(&ctx.storage, path, &prefix).await?;
                // Written last: a checkpoint without it is incomplete and ignored.
                ctx.storage
                    .put(&format!("{prefix}/complete"), "".into())
                    .await?;
                Ok::<_, Stop>(bytes)
            }
            .await;
            match stored {
                Ok(bytes) => {
                    queue::checkpoint(&ctx.db, lease, *step, &prefix, bytes).await?;
                    let msg = format!("checkpoint at step {step}");
                    event(&ctx.db, lease, "info", "message", &msg, None).await
                }
                // A checkpoint that cannot be stored only costs progress on a retry.
                Err(Stop::Infra(m)) => {
                    let msg = format!("checkpoint at step {step} not stored: {m}");
                    event(&ctx.db, lease, "warn", "message", &msg, None).await
                }
                Err(other) => Err(other),
            }
        }
    }
}
