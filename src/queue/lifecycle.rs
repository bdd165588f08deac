//! A job's state changes: claim, heartbeat, completion, failure with retry, reaping of expired
//! leases, cancellation.

use serde_json::Value;
use sqlx::PgExecutor;

use super::enqueue::log;
use super::retry::now_sql;
use super::{
    fenced, Lease, QueueConfig, QueueError, QueuedJob, Result, CANCEL_CHANNEL, CLAIM_ORDER, FENCE,
    HELD, JOB_COLS,
};
use crate::domain::{EventType, JobStatus};

fn secs(d: std::time::Duration) -> f64 {
    d.as_secs_f64()
}

/// Claims the next runnable job for `worker_id`, or `None` when nothing is runnable.
pub async fn claim(
    db: impl PgExecutor<'_>,
    worker_id: &str,
    cfg: &QueueConfig,
) -> Result<Option<(QueuedJob, Lease)>> {
    let now = now_sql(3);
    let job: Option<QueuedJob> = sqlx::query_as(&format!(
        "update jobs set status = 'running', worker_id = $1, attempt = attempt + 1,
                lease_expires_at = {now} + make_interval(secs => $2),
                heartbeat_at = {now}, started_at = coalesce(started_at, {now})
          where id = (select id from jobs
                       where status = 'queued' and run_after <= {now}
                       order by {CLAIM_ORDER}
                       for update skip locked
                       limit 1)
         returning {JOB_COLS}"
    ))
    .bind(worker_id)
    .bind(secs(cfg.lease))
    .bind(cfg.clock.offset_secs())
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
    /// Checkpoint at the next step and hand the job back as `paused` ([`release`]).
    pub pause_requested: bool,
}

/// Renews the lease (and records progress, if given).
pub async fn heartbeat(
    db: impl PgExecutor<'_>,
    lease: &Lease,
    cfg: &QueueConfig,
    progress: Option<&Value>,
) -> Result<Beat> {
    let now = now_sql(6);
    let row: Option<(bool, bool)> = sqlx::query_as(&format!(
        "update jobs set lease_expires_at = {now} + make_interval(secs => $4),
                heartbeat_at = {now}, progress = coalesce($5, progress)
          where {FENCE} and {HELD}
         returning cancel_requested, pause_requested"
    ))
    .bind(&lease.job_id)
    .bind(&lease.worker_id)
    .bind(lease.attempt)
    .bind(secs(cfg.lease))
    .bind(progress)
    .bind(cfg.clock.offset_secs())
    .fetch_optional(db)
    .await?;
    match row {
        Some((cancel_requested, pause_requested)) => Ok(Beat {
            cancel_requested,
            pause_requested,
        }),
        None => Err(QueueError::LeaseLost(lease.job_id.clone())),
    }
}

/// Marks the job succeeded with its result.
pub async fn complete(db: impl PgExecutor<'_>, lease: &Lease, result: &Value) -> Result<()> {
    complete_with(db, lease, result, None, None).await
}

/// Marks the job succeeded with its result and the figures the database keeps as columns.
pub(super) async fn complete_with(
    db: impl PgExecutor<'_>,
    lease: &Lease,
    result: &Value,
    wall_secs: Option<f64>,
    trained_tokens: Option<i64>,
) -> Result<()> {
    let r = sqlx::query(&format!(
        "update jobs set status = 'succeeded', result = $4, finished_at = now(),
                wall_secs = $5, trained_tokens = $6,
                worker_id = null, lease_expires_at = null, progress = null
          where {FENCE} and {HELD}"
    ))
    .bind(&lease.job_id)
    .bind(&lease.worker_id)
    .bind(lease.attempt)
    .bind(result)
    .bind(wall_secs)
    .bind(trained_tokens)
    .execute(db)
    .await?;
    fenced(r.rows_affected(), lease)
}

/// Confirms a requested cancellation once the worker has stopped.
pub async fn confirm_cancel(db: impl PgExecutor<'_>, lease: &Lease) -> Result<()> {
    let r = sqlx::query(&format!(
        "update jobs set status = 'cancelled', finished_at = now(),
                worker_id = null, lease_expires_at = null
          where {FENCE} and {HELD}"
    ))
    .bind(&lease.job_id)
    .bind(&lease.worker_id)
    .bind(lease.attempt)
    .execute(db)
    .await?;
    fenced(r.rows_affected(), lease)
}

/// Whether a failure is worth another attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Bad data or impossible hyperparameters: another attempt fails the same way.
    User,
    /// Storage down, worker crash, out of memory: retried while attempts remain.
    Infrastructure,
}

/// Records a failed attempt; returns the job's new status (`queued` for a retry — `paused`
/// when a pause was requested meanwhile —, `failed`, or `cancelled` when cancellation was
/// requested meanwhile).
pub async fn fail(
    db: impl PgExecutor<'_>,
    lease: &Lease,
    kind: Failure,
    error: &Value,
    cfg: &QueueConfig,
) -> Result<JobStatus> {
    let retry = "$5 and attempt < max_attempts and not cancel_requested";
    let now = now_sql(7);
    let row: Option<(JobStatus,)> = sqlx::query_as(&format!(
        "update jobs set
                status = case when {retry} and pause_requested then 'paused'
                              when {retry} then 'queued'
                              when cancel_requested then 'cancelled'
                              else 'failed' end,
                pause_requested = false,
                run_after = {now} + make_interval(secs => $6),
                finished_at = case when {retry} then null else now() end,
                error = $4, worker_id = null, lease_expires_at = null
          where {FENCE} and {HELD}
         returning status"
    ))
    .bind(&lease.job_id)
    .bind(&lease.worker_id)
    .bind(lease.attempt)
    .bind(error)
    .bind(kind == Failure::Infrastructure)
    .bind(secs(cfg.retry.delay(lease.attempt)))
    .bind(cfg.clock.offset_secs())
    .fetch_optional(db)
    .await?;
    row.map(|r| r.0)
        .ok_or_else(|| QueueError::LeaseLost(lease.job_id.clone()))
}

/// Hands a running job back to the queue at once, runnable now: its worker is shutting down
/// (or was asked to pause) and checkpointed what it did. The attempt is not held against the
/// job (`max_attempts` grows by one; attempt numbers keep rising, so the fence still tells
/// attempts apart); a job whose cancellation was requested ends cancelled instead, one whose
/// pause was requested waits `paused`.
pub async fn release(db: impl PgExecutor<'_>, lease: &Lease) -> Result<()> {
    let row: Option<(String,)> = sqlx::query_as(&format!(
        "update jobs set
                status = case when cancel_requested then 'cancelled'
                              when pause_requested then 'paused' else 'queued' end,
                max_attempts = case when cancel_requested then max_attempts
                                    else max_attempts + 1 end,
                finished_at = case when cancel_requested then now() else null end,
                pause_requested = false,
                run_after = now(), worker_id = null, lease_expires_at = null
          where {FENCE} and {HELD}
          returning id"
    ))
    .bind(&lease.job_id)
    .bind(&lease.worker_id)
    .bind(lease.attempt)
    .fetch_optional(db)
    .await?;
    row.map(|_| ())
        .ok_or_else(|| QueueError::LeaseLost(lease.job_id.clone()))
}

/// Returns running jobs whose lease expired to the queue (with backoff), or fails them when
/// they have used `max_attempts`; a job whose cancellation was requested ends cancelled.
/// Returns how many jobs it touched.
pub async fn reap(db: &sqlx::PgPool, cfg: &QueueConfig) -> Result<u64> {
    let mut tx = db.begin().await?;
    // One reaper at a time across every process on this database: the others skip this pass
    // (reaping twice would be harmless, only wasted).
    let (mine,): (bool,) =
        sqlx::query_as("select pg_try_advisory_xact_lock(hashtextextended('sparsegrad:reap', 0))")
            .fetch_one(&mut *tx)
            .await?;
    // Every way out ends the transaction here: one merely dropped is rolled back only when
    // its connection is next used, and until then it would keep holding the lock.
    if !mine {
        tx.rollback().await?;
        return Ok(0);
    }
    // `no key update`: a worker's event and metric inserts hold key-share locks on its job
    // row (their foreign keys), which must not hide the job from the reaper; rows another
    // reaper or a heartbeat is updating right now are left to that one / the next pass.
    let expired: Vec<(String, i32)> = sqlx::query_as(&format!(
        "select id, attempt from jobs
          where {HELD} and lease_expires_at < {}
          for no key update skip locked",
        now_sql(1)
    ))
    .bind(cfg.clock.offset_secs())
    .fetch_all(&mut *tx)
    .await?;
    if expired.is_empty() {
        tx.rollback().await?;
        return Ok(0);
    }
    let (ids, delays): (Vec<String>, Vec<f64>) = expired
        .into_iter()
        .map(|(id, attempt)| (id, secs(cfg.retry.delay(attempt))))
        .unzip();
    let r = sqlx::query(&format!(
        "update jobs set
                status = case when cancel_requested then 'cancelled'
                              when attempt >= max_attempts then 'failed'
                              when pause_requested then 'paused'
                              else 'queued' end,
                pause_requested = false,
                error = case when cancel_requested then error
                             when attempt >= max_attempts then jsonb_build_object(
                               'code', 'lease_expired',
                               'message', format('the worker stopped responding (attempt %s of %s)',
                                                 attempt, max_attempts),
                               'param', null)
                             else error end,
                finished_at = case when cancel_requested or attempt >= max_attempts
                                   then now() else null end,
                run_after = {} + make_interval(secs => d.delay),
                worker_id = null, lease_expires_at = null
           from unnest($1::text[], $2::float8[]) as d(id, delay)
          where jobs.id = d.id",
        now_sql(3)
    ))
    .bind(&ids)
    .bind(&delays)
    .bind(cfg.clock.offset_secs())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
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

/// Cancels a tenant's job. A running job's cancellation is announced on [`CANCEL_CHANNEL`].
pub async fn cancel(db: &sqlx::PgPool, tenant_id: &str, job_id: &str) -> Result<Cancelled> {
    let mut tx = db.begin().await?;
    let row: Option<(JobStatus,)> =
        sqlx::query_as("select status from jobs where id = $1 and tenant_id = $2 for update")
            .bind(job_id)
            .bind(tenant_id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((status,)) = row else {
        tx.rollback().await?;
        return Ok(Cancelled::NotFound);
    };
    // A queued job stops here; a running one is flagged and its worker confirms.
    let (to, out) = match status {
        JobStatus::Queued | JobStatus::Paused => (JobStatus::Cancelled, Cancelled::Now),
        JobStatus::Running => (JobStatus::Cancelling, Cancelled::Requested),
        JobStatus::Cancelling | JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled => {
            tx.rollback().await?;
            return Ok(Cancelled::AlreadyFinal);
        }
    };
    sqlx::query(
        "update jobs set status = $2, cancel_requested = true,
                finished_at = case when $2 = 'cancelled' then now() else finished_at end
         where id = $1",
    )
    .bind(job_id)
    .bind(to)
    .execute(&mut *tx)
    .await?;
    if to == JobStatus::Cancelling {
        sqlx::query("select pg_notify($1, $2)")
            .bind(CANCEL_CHANNEL)
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
    }
    log(&mut *tx, job_id, EventType::Status, to.as_str()).await?;
    tx.commit().await?;
    Ok(out)
}

/// What a pause or resume request did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Paused {
    /// The job is now paused (it was queued), or queued again (it was paused).
    Now,
    /// It is running: its worker checkpoints at the next step and hands it back paused (or,
    /// for a resume, the pause it had not reached yet is withdrawn).
    Requested,
    /// Nothing to do: already paused (pause) or already queued or running (resume).
    Already,
    /// It is finished or being cancelled (the status is returned).
    Conflict(JobStatus),
    NotFound,
}

/// Pauses a tenant's fine-tune: a queued one at once, a running one through its worker (which
/// learns of it at its next heartbeat, at once through [`CANCEL_CHANNEL`]).
pub async fn pause(db: &sqlx::PgPool, tenant_id: &str, job_id: &str) -> Result<Paused> {
    pause_or_resume(db, tenant_id, job_id, true).await
}

/// Resumes a paused fine-tune: queued again, runnable now; its next worker resumes from the
/// latest checkpoint. A running job whose pause is still pending keeps running.
pub async fn resume(db: &sqlx::PgPool, tenant_id: &str, job_id: &str) -> Result<Paused> {
    pause_or_resume(db, tenant_id, job_id, false).await
}

async fn pause_or_resume(
    db: &sqlx::PgPool,
    tenant_id: &str,
    job_id: &str,
    pause: bool,
) -> Result<Paused> {
    let mut tx = db.begin().await?;
    let row: Option<(JobStatus, bool)> = sqlx::query_as(
        "select status, pause_requested from jobs
          where id = $1 and tenant_id = $2 and kind = 'fine_tune' for update",
    )
    .bind(job_id)
    .bind(tenant_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((status, requested)) = row else {
        tx.rollback().await?;
        return Ok(Paused::NotFound);
    };
    let (sql, to, out) = match (status, pause) {
        (JobStatus::Queued, true) => (
            "update jobs set status = 'paused' where id = $1",
            Some(JobStatus::Paused),
            Paused::Now,
        ),
        (JobStatus::Paused, false) => (
            "update jobs set status = 'queued', run_after = now() where id = $1",
            Some(JobStatus::Queued),
            Paused::Now,
        ),
        (JobStatus::Running, true) if !requested => (
            "update jobs set pause_requested = true where id = $1",
            None,
            Paused::Requested,
        ),
        (JobStatus::Running, false) if requested => (
            "update jobs set pause_requested = false where id = $1",
            None,
            Paused::Requested,
        ),
        (JobStatus::Paused, true) | (JobStatus::Queued | JobStatus::Running, _) => {
            tx.rollback().await?;
            return Ok(Paused::Already);
        }
        (s, _) => {
            tx.rollback().await?;
            return Ok(Paused::Conflict(s));
        }
    };
    sqlx::query(sql).bind(job_id).execute(&mut *tx).await?;
    match to {
        Some(to) => log(&mut *tx, job_id, EventType::Status, to.as_str()).await?,
        // The worker learns at once, as of a cancellation.
        None => {
            sqlx::query("select pg_notify($1, $2)")
                .bind(CANCEL_CHANNEL)
                .bind(job_id)
                .execute(&mut *tx)
                .await?;
            let msg = if pause {
                "pause requested: the job stops at its next step"
            } else {
                "pause withdrawn: the job keeps running"
            };
            log(&mut *tx, job_id, EventType::Message, msg).await?;
        }
    }
    tx.commit().await?;
    Ok(out)
}
