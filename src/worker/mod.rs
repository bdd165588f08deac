//! The worker: claims a job, fetches its inputs from storage, runs the engine on a dedicated
//! thread (never on the async runtime), turns engine progress into events, honours
//! cancellation as soon as it is announced (`LISTEN job_cancel`; at the latest at the next
//! heartbeat), uploads checkpoints and the artifact, and on a retry resumes from the last
//! uploaded checkpoint.
//!
//! [`try_run_one`] is one step of the loop — claim, run to the end, report — so tests drive it
//! directly and never sleep. [`hold`] keeps the lease (one heartbeat task per attempt, through
//! every phase) and holds fenced writes through a database outage; [`fine_tune`] and [`merge`]
//! run the two kinds of job, [`progress`] records what training reports, [`transfer`] moves
//! files to and from storage.

mod fine_tune;
mod hold;
mod merge;
mod progress;
mod transfer;

use std::path::PathBuf;
use std::time::Duration;

use sqlx::PgPool;
use tracing::Instrument;

use crate::domain::{EventLevel, EventType, JobKind, JobStatus, UserFacing};
use crate::queue::{self, Completion, Failure, NewArtifact, QueueConfig, QueueError};
use crate::storage::local_copy::MaterializeError;
use crate::storage::{Storage, StorageError};
use hold::Held;

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
    /// Cancellations announced on `job_cancel`: a running job hears of its own at once,
    /// not at its next heartbeat. One per process, shared by its workers.
    pub cancels: crate::db::listen::JobSignals,
    /// Turns true when the process is shutting down: a running fine-tune checkpoints at its
    /// next step and is handed back to the queue ([`Outcome::Released`]).
    pub drain: tokio::sync::watch::Receiver<bool>,
    /// Where SparseGrad bases are cached between jobs.
    pub cache_dir: Option<PathBuf>,
    /// Local copies of base models registered in object storage.
    pub model_cache: PathBuf,
    /// Where fine-tunes train (merges run on the CPU: they read and write whole models).
    pub device: candle_core::Device,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing was runnable.
    Empty,
    /// A job ran to an end: its new status.
    Ran { job_id: String, status: JobStatus },
    /// The lease was lost mid-run (another worker owns the job now); nothing was written.
    LostLease { job_id: String },
    /// Shutting down, the job was checkpointed and handed back to the queue.
    Released { job_id: String },
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
    /// The submitter's to fix: the message and the request field it is about.
    User(String, Option<String>),
    Infra(String),
    Cancelled,
    Lost,
    /// Stopped for shutdown after this many steps, all of them checkpointed.
    Drained(usize),
}

impl Stop {
    /// An engine error: the submitter's (with the field it is about) or worth a retry.
    fn engine(e: sparsegrad_engine::Error, data_field: &str) -> Stop {
        match e {
            sparsegrad_engine::Error::Cancelled => return Stop::Cancelled,
            sparsegrad_engine::Error::Drained { step } => return Stop::Drained(step),
            _ => {}
        }
        let f = UserFacing::from(&e);
        if !f.user_error {
            return Stop::Infra(f.message);
        }
        let param = if f.data_error {
            Some(data_field.to_string())
        } else {
            f.param.clone()
        };
        Stop::User(f.message, param)
    }
}

/// A job's spec as its kind reads it (the API's own part, `api`, is ignored); one that does
/// not parse is the submitter's.
fn spec_of<T: serde::de::DeserializeOwned>(spec: &serde_json::Value) -> Result<T, Stop> {
    T::deserialize(spec).map_err(|e| Stop::User(format!("job spec: {e}"), None))
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
            // Only creating a job can meet the limit; nothing a worker writes does.
            e @ QueueError::Quota { .. } => Stop::Infra(e.to_string()),
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

/// Appends an event (fenced like every other write after the claim; held back while the
/// database is away, see [`Held::persist`]).
async fn event(
    db: &PgPool,
    lease: &Held,
    level: EventLevel,
    kind: EventType,
    message: &str,
    data: Option<serde_json::Value>,
) -> Result<(), Stop> {
    let data = data.as_ref();
    let write = || queue::event(db, lease.lease(), level, kind, message, data);
    Ok(lease.persist("event", write).await?)
}

/// A status event: the job's new status, or why an attempt failed.
async fn status(
    ctx: &WorkerCtx,
    lease: &Held,
    level: EventLevel,
    message: &str,
    data: Option<serde_json::Value>,
) -> Result<(), Stop> {
    event(&ctx.db, lease, level, EventType::Status, message, data).await
}

/// The event of a status change.
async fn became(
    ctx: &WorkerCtx,
    lease: &Held,
    s: JobStatus,
    data: Option<serde_json::Value>,
) -> Result<(), Stop> {
    status(ctx, lease, EventLevel::Info, s.as_str(), data).await
}

/// What a successful attempt leaves: the result to record and the stored files.
type Done = (Completion, Vec<NewArtifact>);

/// Claims and runs one job.
pub async fn try_run_one(ctx: &WorkerCtx) -> Result<Outcome, WorkerError> {
    queue::reap(&ctx.db, &ctx.queue).await?;
    let sent_at = tokio::time::Instant::now();
    let Some((job, lease)) = queue::claim(&ctx.db, &ctx.worker_id, &ctx.queue).await? else {
        return Ok(Outcome::Empty);
    };
    let lease = Held::new(lease, ctx.queue.lease, sent_at);
    let db = &ctx.db;
    let span = tracing::info_span!("job", job_id = %job.id, attempt = job.attempt);
    let dir = ctx
        .work_dir
        .join(&job.id)
        .join(format!("attempt-{}", job.attempt));
    let attempt = async {
        tokio::fs::create_dir_all(&dir).await?;
        match job.kind {
            JobKind::FineTune => fine_tune::run(ctx, &lease, spec_of(&job.spec)?, &dir).await,
            JobKind::Merge => merge::run(ctx, &lease, spec_of(&job.spec)?, &dir).await,
        }
    };
    // Instrumented, not entered: a span guard held across awaits tags other tasks' logs.
    let mut attempt = std::pin::pin!(attempt.instrument(span));
    // The lease is renewed through every phase (downloads, training, uploads, merging). Should
    // the job be lost, the keeper returns and the attempt, told through `Held::standing`,
    // stops at its next chance and writes nothing more.
    let keeper = lease.keep(&ctx.db, &ctx.queue, ctx.heartbeat, &ctx.cancels);
    let result = tokio::select! {
        r = &mut attempt => r,
        () = keeper => attempt.await,
    };
    let result = match result {
        Ok(_) | Err(Stop::Infra(_)) if lease.standing().borrow().lost => Err(Stop::Lost),
        r => r,
    };
    let _ = tokio::fs::remove_dir_all(&dir).await;
    let settled = match result {
        Ok((done, artifacts)) => {
            let recorded = lease
                .persist("completion", || {
                    queue::complete_with_artifacts(db, &lease, &done, &artifacts)
                })
                .await;
            if recorded.is_ok() {
                let collected =
                    transfer::collect_losing_attempts(db, &ctx.storage, &lease.job_id).await;
                match collected {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(job = %lease.job_id, "removed {n} objects of losing attempts")
                    }
                    Err(_) => {
                        tracing::warn!(job = %lease.job_id, "losing attempts' objects not collected; fsck --fix will")
                    }
                }
            }
            recorded.map(|()| JobStatus::Succeeded)
        }
        Err(Stop::Lost) => return Ok(Outcome::LostLease { job_id: job.id }),
        Err(Stop::Drained(step)) => {
            let paused = lease.standing().borrow().pause_requested;
            let (msg, data) = if paused {
                // A status event's message is the new status, as the queue logs them.
                (
                    "paused".to_string(),
                    Some(serde_json::json!({"after_step": step})),
                )
            } else {
                let m = format!(
                    "handed back at shutdown after step {step}; the next worker resumes from there"
                );
                (m, None)
            };
            let _ = status(ctx, &lease, EventLevel::Info, &msg, data).await;
            return match lease
                .persist("release", || queue::release(db, &lease))
                .await
            {
                Ok(()) => Ok(Outcome::Released { job_id: job.id }),
                Err(QueueError::LeaseLost(_)) => Ok(Outcome::LostLease { job_id: job.id }),
                Err(e) => Err(e.into()),
            };
        }
        Err(Stop::Cancelled) => {
            let _ = became(ctx, &lease, JobStatus::Cancelled, None).await;
            lease
                .persist("cancellation", || queue::confirm_cancel(db, &lease))
                .await
                .map(|()| JobStatus::Cancelled)
        }
        Err(Stop::User(message, param)) => {
            let err =
                serde_json::json!({"code": "invalid_job", "message": message, "param": param});
            let _ = status(ctx, &lease, EventLevel::Error, &message, None).await;
            let q = &ctx.queue;
            let write = || queue::fail(db, &lease, Failure::User, &err, q);
            lease.persist("failure", write).await
        }
        Err(Stop::Infra(message)) => {
            let err = serde_json::json!({"code": "infrastructure_error", "message": message, "param": null});
            let _ = status(ctx, &lease, EventLevel::Warn, &message, None).await;
            let q = &ctx.queue;
            let write = || queue::fail(db, &lease, Failure::Infrastructure, &err, q);
            lease.persist("failure", write).await
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
