//! Every row that names a stored object: what `sparsegrad fsck` checks the store against,
//! and what a finished job keeps when its losing attempts' objects are collected.

use sqlx::{FromRow, PgExecutor};

#[derive(Clone, Debug, FromRow)]
pub struct StoredFile {
    pub id: String,
    pub tenant_id: String,
    pub object_key: String,
    pub bytes: i64,
}

#[derive(Clone, Debug, FromRow)]
pub struct StoredArtifact {
    pub id: String,
    pub job_id: String,
    pub object_key: String,
    pub bytes: i64,
    pub sha256: String,
}

#[derive(Clone, Debug, FromRow)]
pub struct StoredPrefix {
    /// The checkpoint's id, or the model's `tenant/id`.
    pub id: String,
    pub object_prefix: String,
}

pub async fn files(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<StoredFile>> {
    sqlx::query_as("select id, tenant_id, object_key, bytes from files order by object_key")
        .fetch_all(db)
        .await
}

pub async fn artifacts(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<StoredArtifact>> {
    sqlx::query_as(
        "select id, job_id, object_key, bytes, sha256 from job_artifacts order by object_key",
    )
    .fetch_all(db)
    .await
}

pub async fn checkpoints(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<StoredPrefix>> {
    sqlx::query_as("select id, object_prefix from job_checkpoints order by object_prefix")
        .fetch_all(db)
        .await
}

pub async fn models(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<StoredPrefix>> {
    sqlx::query_as(
        "select tenant_id || '/' || id as id, object_prefix from models order by object_prefix",
    )
    .fetch_all(db)
    .await
}

/// `(job, attempt)` of every attempt a worker holds now: it may be writing objects it has not
/// recorded yet.
pub async fn held_attempts(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<(String, i32)>> {
    sqlx::query_as("select id, attempt from jobs where status in ('running', 'cancelling')")
        .fetch_all(db)
        .await
}

/// What rows name under one job: its artifacts' keys and its checkpoints' prefixes.
pub async fn job_objects(
    db: &sqlx::PgPool,
    job_id: &str,
) -> sqlx::Result<(Vec<String>, Vec<String>)> {
    let keys: Vec<(String,)> =
        sqlx::query_as("select object_key from job_artifacts where job_id = $1")
            .bind(job_id)
            .fetch_all(db)
            .await?;
    let prefixes: Vec<(String,)> =
        sqlx::query_as("select object_prefix from job_checkpoints where job_id = $1")
            .bind(job_id)
            .fetch_all(db)
            .await?;
    Ok((
        keys.into_iter().map(|r| r.0).collect(),
        prefixes.into_iter().map(|r| r.0).collect(),
    ))
}
