//! What the API reads about jobs: the job rows, their events, metrics, checkpoints and
//! artifacts (the queue module owns every write to a job's lifecycle, and where queued jobs
//! stand).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{FromRow, PgExecutor};

use super::Page;
use crate::domain::{ArtifactKind, EventLevel, EventType, JobKind, JobStatus, MetricKind};

#[derive(Clone, Debug, FromRow)]
pub struct JobRow {
    pub id: String,
    pub tenant_id: String,
    pub kind: JobKind,
    pub parent_id: Option<String>,
    pub status: JobStatus,
    pub spec: serde_json::Value,
    pub attempt: i32,
    pub max_attempts: i32,
    pub progress: Option<serde_json::Value>,
    pub error: Option<serde_json::Value>,
    pub result: Option<serde_json::Value>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub heartbeat_at: Option<DateTime<Utc>>,
}

const COLS: &str =
    "id, tenant_id, kind, parent_id, status, spec, attempt, max_attempts, progress, \
                    error, result, created_at, started_at, finished_at, heartbeat_at";

pub async fn get(
    db: impl PgExecutor<'_>,
    tenant: &str,
    id: &str,
    kind: JobKind,
) -> sqlx::Result<Option<JobRow>> {
    sqlx::query_as(&format!(
        "select {COLS} from jobs where id = $1 and tenant_id = $2 and kind = $3"
    ))
    .bind(id)
    .bind(tenant)
    .bind(kind)
    .fetch_optional(db)
    .await
}

/// A tenant's fine-tuning jobs whose metadata holds every pair of `page.filter` (an object,
/// or none); `(rows, has_more)`.
pub async fn list(db: &sqlx::PgPool, tenant: &str, page: &Page) -> super::PageResult<JobRow> {
    let filter =
        "kind = 'fine_tune' and ($4::jsonb is null or spec->'api'->'metadata' @> $4::jsonb)";
    super::keyset_page(db, ("jobs", COLS, filter), tenant, page).await
}

/// The latest merge asked for a fine-tune, if any.
pub async fn merge_of(db: impl PgExecutor<'_>, parent: &str) -> sqlx::Result<Option<JobRow>> {
    sqlx::query_as(&format!(
        "select {COLS} from jobs where parent_id = $1 and kind = 'merge'
          order by created_at desc, id desc limit 1"
    ))
    .bind(parent)
    .fetch_optional(db)
    .await
}

#[derive(Clone, Debug, FromRow)]
pub struct EventRow {
    pub id: i64,
    pub created_at: DateTime<Utc>,
    pub level: EventLevel,
    #[sqlx(rename = "type")]
    pub kind: EventType,
    pub message: String,
    pub data: Option<serde_json::Value>,
}

/// Whether event `id` is one of the job's (a list cursor must name one).
pub async fn has_event(db: impl PgExecutor<'_>, job_id: &str, id: i64) -> sqlx::Result<bool> {
    let row: Option<(i32,)> =
        sqlx::query_as("select 1 from job_events where job_id = $1 and id = $2")
            .bind(job_id)
            .bind(id)
            .fetch_optional(db)
            .await?;
    Ok(row.is_some())
}

/// Events of a job in either order: `newest_first` for the cursor list (ids below `after`),
/// oldest first for streaming (ids above `after`).
pub async fn events(
    db: impl PgExecutor<'_>,
    job_id: &str,
    after: Option<i64>,
    limit: i64,
    newest_first: bool,
) -> sqlx::Result<(Vec<EventRow>, bool)> {
    let sql = if newest_first {
        "select id, created_at, level, type, message, data from job_events
          where job_id = $1 and ($2::bigint is null or id < $2)
          order by id desc limit $3"
    } else {
        "select id, created_at, level, type, message, data from job_events
          where job_id = $1 and ($2::bigint is null or id > $2)
          order by id limit $3"
    };
    let rows: Vec<EventRow> = sqlx::query_as(sql)
        .bind(job_id)
        .bind(after)
        .bind(limit + 1)
        .fetch_all(db)
        .await?;
    Ok(super::cut_page(rows, limit))
}

#[derive(Clone, Debug, FromRow, Serialize)]
pub struct MetricRow {
    pub kind: MetricKind,
    pub step: i32,
    pub data: serde_json::Value,
}

/// Training and evaluation points in step order; a step logged by several attempts (after a
/// resume) counts once, from the latest attempt.
pub async fn metrics(db: impl PgExecutor<'_>, job_id: &str) -> sqlx::Result<Vec<MetricRow>> {
    sqlx::query_as(
        "select kind, step, data from (
            select distinct on (kind, step) kind, step, data from job_metrics
             where job_id = $1 order by kind, step, attempt desc) m
          order by step, kind desc",
    )
    .bind(job_id)
    .fetch_all(db)
    .await
}

#[derive(Clone, Debug, FromRow)]
pub struct CheckpointRow {
    pub id: String,
    pub step: i32,
    pub attempt: i32,
    pub bytes: i64,
    pub created_at: DateTime<Utc>,
}

/// The job's latest recorded checkpoint: its step and object prefix.
pub async fn latest_checkpoint(
    db: impl PgExecutor<'_>,
    job_id: &str,
) -> sqlx::Result<Option<(i32, String)>> {
    sqlx::query_as(
        "select step, object_prefix from job_checkpoints
          where job_id = $1 order by step desc, created_at desc limit 1",
    )
    .bind(job_id)
    .fetch_optional(db)
    .await
}

pub async fn checkpoints(
    db: impl PgExecutor<'_>,
    job_id: &str,
) -> sqlx::Result<Vec<CheckpointRow>> {
    sqlx::query_as(
        "select id, step, attempt, bytes, created_at from job_checkpoints
          where job_id = $1 order by step desc, created_at desc",
    )
    .bind(job_id)
    .fetch_all(db)
    .await
}

#[derive(Clone, Debug, FromRow)]
pub struct ArtifactRow {
    pub id: String,
    pub job_id: String,
    pub kind: ArtifactKind,
    pub name: String,
    pub object_key: String,
    pub bytes: i64,
    pub sha256: String,
    pub created_at: DateTime<Utc>,
}

const ART_COLS: &str = "id, job_id, kind, name, object_key, bytes, sha256, created_at";

pub async fn artifacts(db: impl PgExecutor<'_>, job_id: &str) -> sqlx::Result<Vec<ArtifactRow>> {
    sqlx::query_as(&format!(
        "select {ART_COLS} from job_artifacts where job_id = $1 order by kind, name"
    ))
    .bind(job_id)
    .fetch_all(db)
    .await
}

pub async fn artifact(
    db: impl PgExecutor<'_>,
    job_id: &str,
    id: &str,
) -> sqlx::Result<Option<ArtifactRow>> {
    sqlx::query_as(&format!(
        "select {ART_COLS} from job_artifacts where job_id = $1 and id = $2"
    ))
    .bind(job_id)
    .bind(id)
    .fetch_optional(db)
    .await
}

/// Seconds per trained token measured on this service for a base model (mean of its last 20
/// successful fine-tunes), for estimates.
pub async fn secs_per_token(db: impl PgExecutor<'_>, model: &str) -> sqlx::Result<Option<f64>> {
    let row: (Option<f64>,) = sqlx::query_as(
        "select avg(wall_secs / trained_tokens) from (
            select wall_secs, trained_tokens from jobs
             where kind = 'fine_tune' and status = 'succeeded' and model = $1
               and trained_tokens > 0
             order by finished_at desc limit 20) h",
    )
    .bind(model)
    .fetch_one(db)
    .await?;
    Ok(row.0)
}

/// The latest merge of each of the fine-tunes among `ids`.
pub async fn merges_of(db: impl PgExecutor<'_>, ids: &[String]) -> sqlx::Result<Vec<JobRow>> {
    sqlx::query_as(&format!(
        "select distinct on (parent_id) {COLS} from jobs
          where parent_id = any($1) and kind = 'merge'
          order by parent_id, created_at desc, id desc"
    ))
    .bind(ids)
    .fetch_all(db)
    .await
}

/// Jobs per status, and the queued jobs runnable now (for `/metrics`).
pub async fn status_counts(
    db: impl PgExecutor<'_>,
) -> sqlx::Result<Vec<(JobKind, JobStatus, i64)>> {
    sqlx::query_as("select kind, status, count(*) from jobs group by kind, status order by 1, 2")
        .fetch_all(db)
        .await
}

pub async fn runnable_now(db: impl PgExecutor<'_>) -> sqlx::Result<i64> {
    let r: (i64,) =
        sqlx::query_as("select count(*) from jobs where status = 'queued' and run_after <= now()")
            .fetch_one(db)
            .await?;
    Ok(r.0)
}
