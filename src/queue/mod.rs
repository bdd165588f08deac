//! The job queue on Postgres. Everything that changes a job's lifecycle is here, and so is
//! every rule the queue keeps:
//!
//! - **Claim order** ([`CLAIM_ORDER`]): priority, then when it became runnable, then age. The
//!   claim and queue positions both use it; the `jobs_claim` index (migrations) matches it.
//! - **Claim** in one statement: the first runnable queued job (`FOR UPDATE SKIP LOCKED`, so
//!   concurrent claimers never block on or double-claim a row) becomes `running` under this
//!   worker with a lease and `attempt + 1`.
//! - **Heartbeat** renews the lease and tells the worker whether cancellation was requested.
//! - **Fencing** ([`FENCE`]): every write after the claim names `(worker_id, attempt)`; a
//!   worker whose lease expired and whose job was handed to someone else matches no row and
//!   learns it lost the job.
//! - **Retry** ([`RetryPolicy`]): user errors (bad data, impossible hyperparameters) fail at
//!   once; infrastructure errors and expired leases go back to the queue with exponential
//!   backoff and jitter while attempts remain. The queue's time is a [`Clock`] tests can move.
//! - **Reap** returns jobs with expired leases to the queue, or fails them after
//!   `max_attempts`; one pass at a time (an advisory lock), run by a task in every process
//!   (`server::reaper_loop`) and before each claim.
//! - **Cancel**: a queued job is cancelled at once; a running one is flagged (`cancelling`)
//!   and a `NOTIFY job_cancel` announces it; its worker, listening, heartbeats at once, sees
//!   the flag, stops and confirms (a lost notification costs at most one heartbeat interval).
//! - **Pause / resume**: a queued job is paused at once; a running one is flagged
//!   (`pause_requested`, announced like a cancellation): its worker checkpoints at the next step
//!   and [`release`]s it as `paused`. Resume queues a paused job again (its next worker resumes
//!   from the checkpoint), or withdraws a pause not yet reached.
//!
//! [`lifecycle`] holds the state changes, [`enqueue`] the inserts, [`records`] what a worker
//! writes under its fence besides, [`positions`] where queued jobs stand.

pub mod enqueue;
pub mod lifecycle;
pub mod positions;
pub mod records;
pub mod retry;

use std::time::Duration;

use serde::Serialize;
use sqlx::FromRow;

use crate::domain::{JobKind, JobStatus};

pub use enqueue::{enqueue, enqueue_merge, NewJob};
pub use lifecycle::{
    cancel, claim, complete, confirm_cancel, fail, heartbeat, pause, reap, release, resume, Beat,
    Cancelled, Failure, Paused,
};
pub use positions::queue_positions;
pub use records::{checkpoint, complete_with_artifacts, event, metric, Completion, NewArtifact};
pub use retry::{Clock, RetryPolicy};

/// Postgres channel on which cancellations are announced (payload: job id).
pub const CANCEL_CHANNEL: &str = "job_cancel";

/// Postgres channel on which a job that became runnable now is announced (by a trigger, see
/// the migrations), with the payload [`QUEUED_KEY`]: idle workers claim at once, not at their
/// next poll.
pub const QUEUED_CHANNEL: &str = "job_queued";
pub const QUEUED_KEY: &str = "any";

/// The order jobs are claimed in.
pub const CLAIM_ORDER: &str = "priority desc, run_after, created_at, id";

/// The fence of every write after a claim: the job, the worker and the attempt, bound as
/// `$1`, `$2`, `$3` from the [`Lease`].
pub const FENCE: &str = "id = $1 and worker_id = $2 and attempt = $3";

/// A worker holds the job.
const HELD: &str = "status in ('running', 'cancelling')";

/// A job as the queue sees it.
#[derive(Clone, Debug, FromRow, Serialize, PartialEq)]
pub struct QueuedJob {
    pub id: String,
    pub tenant_id: String,
    pub kind: JobKind,
    pub status: JobStatus,
    pub spec: serde_json::Value,
    pub attempt: i32,
    pub max_attempts: i32,
    pub cancel_requested: bool,
    pub error: Option<serde_json::Value>,
}

const JOB_COLS: &str =
    "id, tenant_id, kind, status, spec, attempt, max_attempts, cancel_requested, error";

/// Proof of a claim: the fence every later write of this worker carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub job_id: String,
    pub worker_id: String,
    pub attempt: i32,
}

#[derive(Clone, Debug)]
pub struct QueueConfig {
    /// How long a claim (or heartbeat) holds a job.
    pub lease: Duration,
    pub retry: RetryPolicy,
    pub clock: Clock,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            lease: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            clock: Clock::default(),
        }
    }
}

/// The fenced write found no row: the job is no longer this worker's (lease expired and the
/// job was re-queued or re-assigned, or it was finished or cancelled).
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("lease on job {0} lost")]
    LeaseLost(String),
    /// The tenant already has `limit` jobs queued or running.
    #[error("{active} jobs are queued or running; the limit is {limit}")]
    Quota { active: i64, limit: i64 },
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

pub type Result<T> = std::result::Result<T, QueueError>;

fn fenced(rows: u64, lease: &Lease) -> Result<()> {
    if rows == 1 {
        Ok(())
    } else {
        Err(QueueError::LeaseLost(lease.job_id.clone()))
    }
}
