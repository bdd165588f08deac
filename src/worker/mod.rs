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

use crate::queue::{self, Failure, Lease, QueueConfig, QueueError};
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
    /// A base-model folder the worker can read.
    pub model_dir: PathBuf,
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
impl From<sqlx::Error> for Stop {
    fn from(e: sqlx::Error) -> Self {
        Stop::Infra(format!("database: {e}"))
    }
}

/// Appends an event, fenced like every other write after the claim.
async fn event(
    db: &PgPool,
    lease: &Lease,
    level: &str,
    kind: &str,
    message: &str,
    data: Option<serde_json::Value>,
) -> Result<(), Stop> {
    let r = sqlx::query(
        "insert into job_events (job_id, level, type, message, data)
         select $1, $4, $5, $6, $7 from jobs
          where id = $1 and worker_id = $2 and attempt = $3",
    )
    .bind(&lease.job_id)
    .bind(&lease.worker_id)
    .bind(lease.attempt)
    .bind(level)
    .bind(kind)
    .bind(message)
    .bind(data)
    .execute(db)
    .await?;
    if r.rows_affected() == 1 {
        Ok(())
    } else {
        Err(Stop::Lost)
    }
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
    let result = run(ctx, &lease, &job.spec, &dir).instrument(span).await;
    let _ = tokio::fs::remove_dir_all(&dir).await;
    let settled = match result {
        Ok(summary) => queue::complete(&ctx.db, &lease, &summary)
            .await
            .map(|()| "succeeded".to_string()),
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

async fn upload_dir(st: &Storage, dir: &Path, prefix: &str) -> Result<(), Stop> {
    let mut rd = tokio::fs::read_dir(dir).await?;
    while let Some(e) = rd.next_entry().await? {
        if e.file_type().await?.is_file() {
            let name = e.file_name().to_string_lossy().to_string();
            st.put_file(&format!("{prefix}/{name}"), &e.path()).await?;
        }
    }
    Ok(())
}

async fn run(
    ctx: &WorkerCtx,
    lease: &Lease,
    spec: &serde_json::Value,
    dir: &Path,
) -> Result<serde_json::Value, Stop> {
    let spec: JobSpec = serde_json::from_value(spec.clone())
        .map_err(|e| Stop::User(format!("job spec: {e}"), None))?;
    tokio::fs::create_dir_all(dir).await?;
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
    let engine = EngineJob {
        model_dir: spec.model_dir.clone(),
        model_name: Some(spec.model.clone()),
        train_file: train_path,
        valid_file: valid_path,
        task: spec.task.clone(),
        method: spec.method.clone(),
        train: spec.train.clone(),
        max_seq_len: spec.max_seq_len,
        dtype: None,
        limit_train: None,
        limit_valid: None,
    };

    let cancel = Arc::new(AtomicBool::new(false));
    // Checkpoint events carry an acknowledgement: training waits until the checkpoint is
    // uploaded, so the local copy cannot be pruned under the upload.
    let (tx, mut rx) = mpsc::unbounded_channel::<(Event, Option<std::sync::mpsc::Sender<()>>)>();
    let out_dir = dir.join("artifact");
    let thread_cancel = cancel.clone();
    let thread_ckpt = ckpt_dir.clone();
    let cache_dir = ctx.cache_dir.clone();
    let thread_out = out_dir.clone();
    // Training owns a whole thread: it would starve the runtime's workers.
    let handle = std::thread::Builder::new()
        .name(format!("train-{}", lease.job_id))
        .spawn(move || {
            let device = candle_core::Device::Cpu;
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
    let mut abort: Option<Stop> =
        match event(&ctx.db, lease, "info", "status", "running", None).await {
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
    let mut artifact_keys = Vec::new();
    for name in ["delta.safetensors", "delta.json"] {
        let key = keys::artifact(&lease.job_id, name);
        ctx.storage.put_file(&key, &out_dir.join(name)).await?;
        artifact_keys.push(key);
    }
    let summary = serde_json::json!({
        "artifacts": artifact_keys,
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
    event(
        &ctx.db,
        lease,
        "info",
        "status",
        "succeeded",
        Some(summary.clone()),
    )
    .await?;
    Ok(summary)
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
                upload_dir(&ctx.storage, path, &prefix).await?;
                // Written last: a checkpoint without it is incomplete and ignored.
                ctx.storage
                    .put(&format!("{prefix}/complete"), "".into())
                    .await?;
                Ok::<_, Stop>(())
            }
            .await;
            match stored {
                Ok(()) => {
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
