//! Putting jobs on the queue: fine-tunes (idempotent per tenant and key) and merges (one per
//! fine-tune), each with its `queued` event in the same transaction.

use sqlx::PgExecutor;

use super::{QueueError, QueuedJob, Result, JOB_COLS};
use crate::domain::{EventLevel, EventType, JobKind, JobStatus};

/// A job to enqueue.
#[derive(Clone, Debug)]
pub struct NewJob {
    pub id: String,
    pub tenant_id: String,
    pub kind: JobKind,
    pub spec: serde_json::Value,
    pub idempotency_key: Option<String>,
    pub priority: i32,
    pub max_attempts: i32,
    /// The fine-tune a merge belongs to.
    pub parent_id: Option<String>,
    /// The base model's name, for history-based estimates.
    pub model: Option<String>,
    /// The dry-run estimate of its duration, for queue ETAs.
    pub estimate_secs: Option<f64>,
    /// Most jobs the tenant may have queued or running at once, this one included (`None`:
    /// no limit).
    pub active_limit: Option<i64>,
}

impl NewJob {
    pub fn fine_tune(id: &str, tenant_id: &str, spec: serde_json::Value) -> Self {
        NewJob {
            id: id.into(),
            tenant_id: tenant_id.into(),
            kind: JobKind::FineTune,
            spec,
            idempotency_key: None,
            priority: 0,
            max_attempts: 3,
            parent_id: None,
            model: None,
            estimate_secs: None,
            active_limit: None,
        }
    }

    pub fn merge(id: &str, tenant_id: &str, parent_id: &str, spec: serde_json::Value) -> Self {
        NewJob {
            kind: JobKind::Merge,
            parent_id: Some(parent_id.into()),
            ..NewJob::fine_tune(id, tenant_id, spec)
        }
    }
}

/// How a repeated request finds the job it repeats.
enum Dedupe {
    /// The same tenant's Idempotency-Key.
    IdempotencyKey,
    /// A fine-tune's one live merge (a failed or cancelled one may be asked for again).
    MergeOf,
}

/// Inserts the job with its `queued` event, or returns the job it repeats (`false`).
async fn insert_once(db: &sqlx::PgPool, job: &NewJob, dedupe: Dedupe) -> Result<(QueuedJob, bool)> {
    let (conflict, existing) = match dedupe {
        Dedupe::IdempotencyKey => (
            "on conflict on constraint jobs_idempotency_key do nothing",
            "tenant_id = $1 and idempotency_key = $2",
        ),
        Dedupe::MergeOf => (
            "on conflict (parent_id) where kind = 'merge' and status not in ('failed', 'cancelled')
             do nothing",
            "parent_id = $3 and kind = 'merge' and status not in ('failed', 'cancelled')",
        ),
    };
    let repeated_sql = format!("select {JOB_COLS} from jobs where {existing}");
    async fn repeated(
        tx: &mut sqlx::PgConnection,
        sql: &str,
        job: &NewJob,
    ) -> sqlx::Result<Option<QueuedJob>> {
        sqlx::query_as::<_, QueuedJob>(sql)
            .bind(&job.tenant_id)
            .bind(&job.idempotency_key)
            .bind(&job.parent_id)
            .fetch_optional(tx)
            .await
    }
    let mut tx = db.begin().await?;
    if let Some(limit) = job.active_limit {
        // One tenant's creates in turn: the count and the insert cannot interleave.
        sqlx::query("select pg_advisory_xact_lock(hashtextextended($1, 7))")
            .bind(&job.tenant_id)
            .execute(&mut *tx)
            .await?;
        // A repeated request is answered with its job, at the limit or not.
        if let Some(j) = repeated(&mut tx, &repeated_sql, job).await? {
            tx.commit().await?;
            return Ok((j, false));
        }
        let (active,): (i64,) = sqlx::query_as(
            "select count(*) from jobs
              where tenant_id = $1 and status in ('queued', 'running', 'cancelling', 'paused')",
        )
        .bind(&job.tenant_id)
        .fetch_one(&mut *tx)
        .await?;
        if active >= limit {
            // Ended here, not on drop: a dropped transaction holds the lock until its
            // connection is next used.
            tx.rollback().await?;
            return Err(QueueError::Quota { active, limit });
        }
    }
    let inserted: Option<QueuedJob> = sqlx::query_as(&format!(
        "insert into jobs (id, tenant_id, status, spec, idempotency_key, priority, max_attempts,
                           kind, parent_id, model, estimate_secs)
         values ($1, $2, 'queued', $3, $4, $5, $6, $7, $8, $9, $10)
         {conflict}
         returning {JOB_COLS}"
    ))
    .bind(&job.id)
    .bind(&job.tenant_id)
    .bind(&job.spec)
    .bind(&job.idempotency_key)
    .bind(job.priority)
    .bind(job.max_attempts)
    .bind(job.kind)
    .bind(&job.parent_id)
    .bind(&job.model)
    .bind(job.estimate_secs)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(j) = inserted {
        log(
            &mut *tx,
            &j.id,
            EventType::Status,
            JobStatus::Queued.as_str(),
        )
        .await?;
        tx.commit().await?;
        return Ok((j, true));
    }
    // The conflict was with a committed row: it is there to read.
    let repeated = repeated(&mut tx, &repeated_sql, job)
        .await?
        .ok_or(sqlx::Error::RowNotFound)?;
    tx.commit().await?;
    Ok((repeated, false))
}

/// Enqueues a job. With an idempotency key already used by this tenant, returns the existing
/// job instead (`false` in the second field).
pub async fn enqueue(db: &sqlx::PgPool, job: &NewJob) -> Result<(QueuedJob, bool)> {
    insert_once(db, job, Dedupe::IdempotencyKey).await
}

/// Queues the merge of a succeeded fine-tune (one live merge per fine-tune: a second request
/// returns it, with `false`; after a failed or cancelled one, a new one is queued).
pub async fn enqueue_merge(db: &sqlx::PgPool, job: &NewJob) -> Result<(QueuedJob, bool)> {
    let merge = NewJob {
        kind: JobKind::Merge,
        ..job.clone()
    };
    insert_once(db, &merge, Dedupe::MergeOf).await
}

/// An event written on the job's behalf by the service (not by a worker; unfenced).
pub(super) async fn log(
    db: impl PgExecutor<'_>,
    job_id: &str,
    kind: EventType,
    message: &str,
) -> Result<()> {
    sqlx::query("insert into job_events (job_id, level, type, message) values ($1, $2, $3, $4)")
        .bind(job_id)
        .bind(EventLevel::Info)
        .bind(kind)
        .bind(message)
        .execute(db)
        .await?;
    Ok(())
}
