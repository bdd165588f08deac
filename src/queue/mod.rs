//! The job queue on Postgres.
//!
//! - **Claim** in one statement: the oldest runnable queued job (`FOR UPDATE SKIP LOCKED`, so
//!   concurrent claimers never block on or double-claim a row) becomes `running` under this
//!   worker with a lease and `attempt + 1`.
//! - **Heartbeat** renews the lease and tells the worker whether cancellation was requested.
//! - **Fencing**: every write after the claim names `(worker_id, attempt)`; a worker whose lease
//!   expired and whose job was handed to someone else matches no row and learns it lost the job.
//! - **Reap** returns jobs with expired leases to the queue with exponential backoff and jitter,
//!   or fails them after `max_attempts`.
//! - **Retry policy**: user errors (bad data, impossible hyperparameters) fail at once;
//!   infrastructure errors go back to the queue while attempts remain.
//! - **Cancel**: a queued job is cancelled at once; a running one is flagged (`cancelling`) and a
//!   `NOTIFY job_cancel` wakes its worker, which stops within seconds and confirms.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::{FromRow, PgExecutor};

/// Postgres channel on which cancellations are announced (payload: job id).
pub const CANCEL_CHANNEL: &str = "job_cancel";

/// A job as the queue sees it.
#[derive(Clone, Debug, FromRow, Serialize, Deserialize, PartialEq)]
pub struct QueuedJob {
    pub id: String,
    pub tenant_id: String,
    /// `fine_tune` or `merge`.
    pub kind: String,
    pub status: String,
    pub spec: serde_json::Value,
    pub attempt: i32,
    pub max_attempts: i32,
    pub cancel_requested: bool,
    pub error: Option<serde_json::Value>,
}

/// Proof of a claim: the fence every later write of this worker carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub job_id: String,
    pub worker_id: String,
    pub attempt: i32,
}

#[derive(Clone, Copy, Debug)]
pub struct QueueConfig {
    /// How long a claim (or heartbeat) holds a job.
    pub lease: Duration,
    /// Backoff before attempt n+1 is `min(base · 2^(n-1), max)`, times a jitter in [0.5, 1).
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            lease: Duration::from_secs(30),
            backoff_base: Duration::from_secs(10),
            backoff_max: Duration::from_secs(600),
        }
    }
}

/// The fenced write found no row: the job is no longer this worker's (lease expired and the
/// job was re-queued or re-assigned, or it was finished or cancelled).
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("lease on job {0} lost")]
    LeaseLost(String),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

pub type Result<T> = std::result::Result<T, QueueError>;

/// `run_after` for the next attempt: `min(base · 2^(attempt-1), max)` seconds times a jitter
/// in [0.5, 1); `{base}` and `{max}` name the bind parameters.
fn backoff(base: &str, max: &str) -> String {
    format!("now() + make_interval(secs => least({base} * power(2, attempt - 1), {max}) * (0.5 + random() * 0.5))")
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Claims the next runnable job for `worker_id`, or `None` when nothing is runnable.
pub async fn claim(
    db: impl PgExecutor<'_>,
    worker_id: &str,
    cfg: &QueueConfig,
) -> Result<Option<(QueuedJob, Lease)>> {
    let job: Option<QueuedJob> = sqlx::query_as(
        "update jobs set status = 'running', worker_id = $1, attempt = attempt + 1,
                lease_expires_at = now() + make_interval(secs => $2),
                heartbeat_at = now(), started_at = coalesce(started_at, now())
          where id = (select id from jobs
                       where status = 'queued' and run_after <= now()
                       order by priority desc, run_after, created_at, id
                       for update skip locked
                       limit 1)
         returning id, tenant_id, kind, status, spec, attempt, max_attempts, cancel_requested, error",
    )
    .bind(worker_id)
    .bind(secs(cfg.lease))
    .fetch_optional(db)
    .await?;
    Ok(job.map(|j| {
        let lease = Lease {
            job_id: j.id.clone(),
            worker_id: worker_id.to_string(),
            attempt: j.attempt,
        };
        (j, lease)
    }))
}

/// What a heartbeat learned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Beat {
    pub cancel_requested: bool,
}

/// Renews the lease (and records progress, if given).
pub async fn heartbeat(
    db: impl PgExecutor<'_>,
    lease: &Lease,
    cfg: &QueueConfig,
    progress: Option<&serde_json::Value>,
) -> Result<Beat> {
    let row: Option<(bool,)> = sqlx::query_as(
        "update jobs set lease_expires_at = now() + make_interval(secs => $4),
                heartbeat_at = now(), progress = coalesce($5, progress)
          where id = $1 and worker_id = $2 and attempt = $3
            and status in ('running', 'cancelling')
         returning cancel_requested",
    )
    .bind(&lease.job_id)
    .bind(&lease.worker_id)
    .bind(lease.attempt)
    .bind(secs(cfg.lease))
    .bind(progress)
    .fetch_optional(db)
    .await?;
    match row {
        Some((cancel_requested,)) => Ok(Beat { cancel_requested }),
        None => Err(QueueError::LeaseLost(lease.job_id.clone())),
    }
}

/// Marks the job succeeded with its result.
pub async fn complete(
    db: impl PgExecutor<'_>,
    lease: &Lease,
    result: &serde_json::Value,
) -> Result<()> {
    fenced(
        sqlx::query(
            "update jobs set status = 'succeeded', result = $4, finished_at = now(),
                    worker_id = null, lease_expires_at = null, progress = null
              where id = $1 and worker_id = $2 and attempt = $3
                and status in ('running', 'cancelling')",
        )
        .bind(&lease.job_id)
        .bind(&lease.worker_id)
        .bind(lease.attempt)
        .bind(result)
        .execute(db)
        .await?
        .rows_affected(),
        lease,
    )
}

/// Confirms a requested cancellation once the worker has stopped.
pub async fn confirm_cancel(db: impl PgExecutor<'_>, lease: &Lease) -> Result<()> {
    fenced(
        sqlx::query(
            "update jobs set status = 'cancelled', finished_at = now(),
                    worker_id = null, lease_expires_at = null
              where id = $1 and worker_id = $2 and attempt = $3
                and status in ('running', 'cancelling')",
        )
        .bind(&lease.job_id)
        .bind(&lease.worker_id)
        .bind(lease.attempt)
        .execute(db)
        .await?
        .rows_affected(),
        lease,
    )
}

/// Whether a failure is worth another attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Bad data or impossible hyperparameters: another attempt fails the same way.
    User,
    /// Storage down, worker crash, out of memory: retried while attempts remain.
    Infrastructure,
}

/// Records a failed attempt; returns the job's new status (`queued` for a retry, `failed`).
pub async fn fail(
    db: impl PgExecutor<'_>,
    lease: &Lease,
    kind: Failure,
    error: &serde_json::Value,
    cfg: &QueueConfig,
) -> Result<String> {
    let row: Option<(String,)> = sqlx::query_as(&format!(
        "update jobs set
                status = case when $5 and attempt < max_attempts and not cancel_requested
                              then 'queued'
                              when cancel_requested then 'cancelled'
                              else 'failed' end,
                run_after = {},
                finished_at = case when $5 and attempt < max_attempts and not cancel_requested
                                   then null else now() end,
                error = $4, worker_id = null, lease_expires_at = null
          where id = $1 and worker_id = $2 and attempt = $3
            and status in ('running', 'cancelling')
         returning status",
        backoff("$6", "$7")
    ))
    .bind(&lease.job_id)
    .bind(&lease.worker_id)
    .bind(lease.attempt)
    .bind(error)
    .bind(kind == Failure::Infrastructure)
    .bind(secs(cfg.backoff_base))
    .bind(secs(cfg.backoff_max))
    .fetch_optional(db)
    .await?;
    row.map(|r| r.0)
        .ok_or_else(|| QueueError::LeaseLost(lease.job_id.clone()))
}

/// Returns running jobs whose lease expired to the queue (with backoff), or fails them when
/// they have used `max_attempts`. Returns how many jobs it touched.
pub async fn reap(db: impl PgExecutor<'_>, cfg: &QueueConfig) -> Result<u64> {
    let r = sqlx::query(&format!(
        "update jobs set
                status = case when cancel_requested then 'cancelled'
                              when attempt >= max_attempts then 'failed'
                              else 'queued' end,
                error = case when cancel_requested then error
                             when attempt >= max_attempts then jsonb_build_object(
                               'code', 'lease_expired',
                               'message', format('the worker stopped responding (attempt %s of %s)',
                                                 attempt, max_attempts),
                               'param', null)
                             else error end,
                finished_at = case when cancel_requested or attempt >= max_attempts
                                   then now() else null end,
                run_after = {},
                worker_id = null, lease_expires_at = null
          where status in ('running', 'cancelling') and lease_expires_at < now()",
        backoff("$1", "$2")
    ))
    .bind(secs(cfg.backoff_base))
    .bind(secs(cfg.backoff_max))
    .execute(db)
    .await?;
    Ok(r.rows_affected())
}

/// What a cancel request did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cancelled {
    /// It was queued: now `cancelled`.
    Now,
    /// It is running: flagged `cancelling`; its worker stops and confirms.
    Requested,
    /// Already finished (or already cancelling): nothing changed.
    AlreadyFinal,
    NotFound,
}

/// Cancels a tenant's job. Running jobs are woken through `NOTIFY job_cancel`.
pub async fn cancel(db: &sqlx::PgPool, tenant_id: &str, job_id: &str) -> Result<Cancelled> {
    let mut tx = db.begin().await?;
    let row: Option<(String,)> =
        sqlx::query_as("select status from jobs where id = $1 and tenant_id = $2 for update")
            .bind(job_id)
            .bind(tenant_id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((status,)) = row else {
        return Ok(Cancelled::NotFound);
    };
    let out = match status.as_str() {
        "queued" | "validating_files" => {
            sqlx::query(
                "update jobs set status = 'cancelled', cancel_requested = true,
                        finished_at = now() where id = $1",
            )
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
            log(&mut *tx, job_id, "status", "cancelled").await?;
            Cancelled::Now
        }
        "running" => {
            sqlx::query(
                "update jobs set status = 'cancelling', cancel_requested = true where id = $1",
            )
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
            sqlx::query("select pg_notify($1, $2)")
                .bind(CANCEL_CHANNEL)
                .bind(job_id)
                .execute(&mut *tx)
                .await?;
            log(&mut *tx, job_id, "status", "cancelling").await?;
            Cancelled::Requested
        }
        _ => Cancelled::AlreadyFinal,
    };
    tx.commit().await?;
    Ok(out)
}

/// A job to enqueue.
#[derive(Clone, Debug)]
pub struct NewJob {
    pub id: String,
    pub tenant_id: String,
    pub spec: serde_json::Value,
    pub idempotency_key: Option<String>,
    pub priority: i32,
    pub max_attempts: i32,
    /// `fine_tune` or `merge`.
    pub kind: &'static str,
    /// The fine-tune a merge belongs to.
    pub parent_id: Option<String>,
}

impl NewJob {
    pub fn fine_tune(id: &str, tenant_id: &str, spec: serde_json::Value) -> Self {
        NewJob {
            id: id.into(),
            tenant_id: tenant_id.into(),
            spec,
            idempotency_key: None,
            priority: 0,
            max_attempts: 3,
            kind: "fine_tune",
            parent_id: None,
        }
    }
}

/// Enqueues a job. With an idempotency key already used by this tenant, returns the existing
/// job instead (`false` in the second field).
pub async fn enqueue(db: &sqlx::PgPool, job: &NewJob) -> Result<(QueuedJob, bool)> {
    let mut tx = db.begin().await?;
    let inserted: Option<QueuedJob> = sqlx::query_as(
        "insert into jobs (id, tenant_id, status, spec, idempotency_key, priority, max_attempts,
                           kind, parent_id)
         values ($1, $2, 'queued', $3, $4, $5, $6, $7, $8)
         on conflict on constraint jobs_idempotency_key do nothing
         returning id, tenant_id, kind, status, spec, attempt, max_attempts, cancel_requested, error",
    )
    .bind(&job.id)
    .bind(&job.tenant_id)
    .bind(&job.spec)
    .bind(&job.idempotency_key)
    .bind(job.priority)
    .bind(job.max_attempts)
    .bind(job.kind)
    .bind(&job.parent_id)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(j) = inserted {
        log(&mut *tx, &j.id, "status", "queued").await?;
        tx.commit().await?;
        return Ok((j, true));
    }
    let existing: QueuedJob = sqlx::query_as(
        "select id, tenant_id, kind, status, spec, attempt, max_attempts, cancel_requested, error
           from jobs where tenant_id = $1 and idempotency_key = $2",
    )
    .bind(&job.tenant_id)
    .bind(&job.idempotency_key)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((existing, false))
}

/// An event written on the job's behalf by the service (not by a worker; unfenced).
async fn log(db: impl PgExecutor<'_>, job_id: &str, kind: &str, message: &str) -> Result<()> {
    sqlx::query(
        "insert into job_events (job_id, level, type, message) values ($1, 'info', $2, $3)",
    )
    .bind(job_id)
    .bind(kind)
    .bind(message)
    .execute(db)
    .await?;
    Ok(())
}

/// Jobs ahead of this one in claim order (0 = next), or `None` if it is not queued.
pub async fn queue_position(db: impl PgExecutor<'_>, job_id: &str) -> Result<Option<i64>> {
    // q is ahead of j in claim order (priority desc, then run_after, created_at, id asc).
    let row: Option<(i64,)> = sqlx::query_as(
        "select (select count(*) from jobs q
                  where q.status = 'queued'
                    and (q.priority, j.run_after, j.created_at, j.id) >
                        (j.priority, q.run_after, q.created_at, q.id))
           from jobs j where j.id = $1 and j.status = 'queued'",
    )
    .bind(job_id)
    .fetch_optional(db)
    .await?;
    Ok(row.map(|r| r.0))
}

/// Queues the merge of a succeeded fine-tune (one per fine-tune: a second request returns
/// the first, with `false`).
pub async fn enqueue_merge(db: &sqlx::PgPool, job: &NewJob) -> Result<(QueuedJob, bool)> {
    let inserted: Option<QueuedJob> = sqlx::query_as(
        "insert into jobs (id, tenant_id, status, spec, priority, max_attempts, kind, parent_id)
         values ($1, $2, 'queued', $3, $4, $5, 'merge', $6)
         on conflict (parent_id) where kind = 'merge' do nothing
         returning id, tenant_id, kind, status, spec, attempt, max_attempts, cancel_requested, error",
    )
    .bind(&job.id)
    .bind(&job.tenant_id)
    .bind(&job.spec)
    .bind(job.priority)
    .bind(job.max_attempts)
    .bind(&job.parent_id)
    .fetch_optional(db)
    .await?;
    if let Some(j) = inserted {
        log(db, &j.id, "status", "queued").await?;
        return Ok((j, true));
    }
    let existing: QueuedJob = sqlx::query_as(
        "select id, tenant_id, kind, status, spec, attempt, max_attempts, cancel_requested, error
           from jobs where parent_id = $1 and kind = 'merge'",
    )
    .bind(&job.parent_id)
    .fetch_one(db)
    .await?;
    Ok((existing, false))
}

// Every write below names the lease: a worker that lost its job matches no job row, writes
// nothing and learns it (`LeaseLost`).

/// Appends an event to the job's log.
pub async fn event(
    db: impl PgExecutor<'_>,
    lease: &Lease,
    level: &str,
    kind: &str,
    message: &str,
    data: Option<&serde_json::Value>,
) -> Result<()> {
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
    fenced(r.rows_affected(), lease)
}

/// Records a training (`train`) or evaluation (`eval`) point.
pub async fn metric(
    db: impl PgExecutor<'_>,
    lease: &Lease,
    kind: &str,
    step: usize,
    data: &serde_json::Value,
) -> Result<()> {
    let r = sqlx::query(
        "insert into job_metrics (job_id, attempt, kind, step, data)
         select $1, $3, $4, $5, $6 from jobs
          where id = $1 and worker_id = $2 and attempt = $3
         on conflict (job_id, kind, step, attempt) do update set data = excluded.data",
    )
    .bind(&lease.job_id)
    .bind(&lease.worker_id)
    .bind(lease.attempt)
    .bind(kind)
    .bind(step as i32)
    .bind(data)
    .execute(db)
    .await?;
    fenced(r.rows_affected(), lease)
}

/// Records a checkpoint whose objects (and completion marker) are stored under `prefix`.
pub async fn checkpoint(
    db: impl PgExecutor<'_>,
    lease: &Lease,
    step: usize,
    prefix: &str,
    bytes: u64,
) -> Result<()> {
    let r = sqlx::query(
        "insert into job_checkpoints (id, job_id, attempt, step, object_prefix, bytes)
         select $4, $1, $3, $5, $6, $7 from jobs
          where id = $1 and worker_id = $2 and attempt = $3",
    )
    .bind(&lease.job_id)
    .bind(&lease.worker_id)
    .bind(lease.attempt)
    .bind(crate::db::new_id("ckpt"))
    .bind(step as i32)
    .bind(prefix)
    .bind(bytes as i64)
    .execute(db)
    .await?;
    fenced(r.rows_affected(), lease)
}

/// A stored result file.
#[derive(Clone, Debug, PartialEq)]
pub struct NewArtifact {
    pub id: String,
    /// `delta` or `merged`.
    pub kind: &'static str,
    pub name: String,
    pub object_key: String,
    pub bytes: u64,
    pub sha256: String,
}

/// Records the artifacts and marks the job succeeded, in one transaction: a job is never
/// `succeeded` without its files listed, nor are files listed for a job that did not succeed.
pub async fn complete_with_artifacts(
    db: &sqlx::PgPool,
    lease: &Lease,
    result: &serde_json::Value,
    artifacts: &[NewArtifact],
) -> Result<()> {
    let mut tx = db.begin().await?;
    for a in artifacts {
        let r = sqlx::query(
            "insert into job_artifacts (id, job_id, kind, name, object_key, bytes, sha256)
             select $4, $1, $5, $6, $7, $8, $9 from jobs
              where id = $1 and worker_id = $2 and attempt = $3
             on conflict (job_id, kind, name) do update set id = excluded.id,
                object_key = excluded.object_key, bytes = excluded.bytes,
                sha256 = excluded.sha256, created_at = now()",
        )
        .bind(&lease.job_id)
        .bind(&lease.worker_id)
        .bind(lease.attempt)
        .bind(&a.id)
        .bind(a.kind)
        .bind(&a.name)
        .bind(&a.object_key)
        .bind(a.bytes as i64)
        .bind(&a.sha256)
        .execute(&mut *tx)
        .await?;
        fenced(r.rows_affected(), lease)?;
    }
    complete(&mut *tx, lease, result).await?;
    tx.commit().await?;
    Ok(())
}

fn fenced(rows: u64, lease: &Lease) -> Result<()> {
    if rows == 1 {
        Ok(())
    } else {
        Err(QueueError::LeaseLost(lease.job_id.clone()))
    }
}
