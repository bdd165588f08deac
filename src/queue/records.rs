//! What a worker writes besides the job's status, every row under its fence: a worker that
//! lost its job matches no job row, writes nothing and learns it (`LeaseLost`).

use sqlx::PgExecutor;

use super::lifecycle::complete_with;
use super::{fenced, Lease, Result, FENCE};
use crate::domain::{ArtifactKind, EventLevel, EventType, JobStatus, MetricKind};

/// Appends an event to the job's log.
pub async fn event(
    db: impl PgExecutor<'_>,
    lease: &Lease,
    level: EventLevel,
    kind: EventType,
    message: &str,
    data: Option<&serde_json::Value>,
) -> Result<()> {
    let r = sqlx::query(&format!(
        "insert into job_events (job_id, level, type, message, data)
         select $1, $4, $5, $6, $7 from jobs where {FENCE}"
    ))
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

/// Records a training or evaluation point.
pub async fn metric(
    db: impl PgExecutor<'_>,
    lease: &Lease,
    kind: MetricKind,
    step: usize,
    data: &serde_json::Value,
) -> Result<()> {
    let r = sqlx::query(&format!(
        "insert into job_metrics (job_id, attempt, kind, step, data)
         select $1, $3, $4, $5, $6 from jobs where {FENCE}
         on conflict (job_id, kind, step, attempt) do update set data = excluded.data"
    ))
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
    let r = sqlx::query(&format!(
        "insert into job_checkpoints (id, job_id, attempt, step, object_prefix, bytes)
         select $4, $1, $3, $5, $6, $7 from jobs where {FENCE}"
    ))
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
    pub kind: ArtifactKind,
    pub name: String,
    pub object_key: String,
    pub bytes: u64,
    pub sha256: String,
}

/// How a job succeeded: its result, and the figures the database keeps as columns.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    pub result: serde_json::Value,
    pub wall_secs: Option<f64>,
    pub trained_tokens: Option<i64>,
}

/// Records the artifacts, marks the job succeeded and logs its `succeeded` event (with the
/// result), in one transaction: a job is never `succeeded` without its files listed, nor are
/// files listed for a job that did not succeed, and a worker killed before the commit leaves
/// no success event behind (a job shows exactly one, however many attempts it took).
pub async fn complete_with_artifacts(
    db: &sqlx::PgPool,
    lease: &Lease,
    done: &Completion,
    artifacts: &[NewArtifact],
) -> Result<()> {
    let mut tx = db.begin().await?;
    for a in artifacts {
        let r = sqlx::query(&format!(
            "insert into job_artifacts (id, job_id, kind, name, object_key, bytes, sha256)
             select $4, $1, $5, $6, $7, $8, $9 from jobs where {FENCE}
             on conflict (job_id, kind, name) do update set id = excluded.id,
                object_key = excluded.object_key, bytes = excluded.bytes,
                sha256 = excluded.sha256, created_at = now()"
        ))
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
    event(
        &mut *tx,
        lease,
        EventLevel::Info,
        EventType::Status,
        JobStatus::Succeeded.as_str(),
        Some(&done.result),
    )
    .await?;
    complete_with(
        &mut *tx,
        lease,
        &done.result,
        done.wall_secs,
        done.trained_tokens,
    )
    .await?;
    tx.commit().await?;
    Ok(())
}
