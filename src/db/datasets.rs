//! Uploaded dataset files (`/v1/files`): one row per stored, validated file.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{FromRow, PgExecutor};

use super::Page;

#[derive(Clone, Debug, FromRow, Serialize)]
pub struct FileRow {
    pub id: String,
    #[serde(skip)]
    pub tenant_id: String,
    pub filename: String,
    pub purpose: String,
    pub bytes: i64,
    pub format: String,
    pub task: String,
    pub rows: i64,
    #[serde(skip)]
    pub object_key: String,
    pub created_at: DateTime<Utc>,
}

const FILE_COLS: &str =
    "id, tenant_id, filename, purpose, bytes, format, task, rows, object_key, created_at";

pub async fn insert(db: impl PgExecutor<'_>, f: &FileRow) -> sqlx::Result<FileRow> {
    sqlx::query_as(&format!(
        "insert into files (id, tenant_id, filename, purpose, bytes, format, task, rows, object_key)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9) returning {FILE_COLS}"
    ))
    .bind(&f.id)
    .bind(&f.tenant_id)
    .bind(&f.filename)
    .bind(&f.purpose)
    .bind(f.bytes)
    .bind(&f.format)
    .bind(&f.task)
    .bind(f.rows)
    .bind(&f.object_key)
    .fetch_one(db)
    .await
}

/// Bytes a tenant keeps in storage: its files and its jobs' artifacts.
pub async fn stored_bytes(db: impl PgExecutor<'_>, tenant: &str) -> sqlx::Result<i64> {
    let (n,): (i64,) = sqlx::query_as(
        "select (coalesce((select sum(bytes) from files where tenant_id = $1), 0)
               + coalesce((select sum(a.bytes) from job_artifacts a
                             join jobs j on j.id = a.job_id where j.tenant_id = $1), 0))::bigint",
    )
    .bind(tenant)
    .fetch_one(db)
    .await?;
    Ok(n)
}

/// Inserts the row if the tenant's stored bytes stay within `quota` with it (`None`
/// otherwise), decided under a per-tenant lock so concurrent uploads cannot together pass it.
pub async fn insert_within_quota(
    db: &sqlx::PgPool,
    f: &FileRow,
    quota: i64,
) -> sqlx::Result<Option<FileRow>> {
    let mut tx = db.begin().await?;
    sqlx::query("select pg_advisory_xact_lock(hashtextextended($1, 11))")
        .bind(&f.tenant_id)
        .execute(&mut *tx)
        .await?;
    if stored_bytes(&mut *tx, &f.tenant_id)
        .await?
        .saturating_add(f.bytes)
        > quota
    {
        // Ended here, not on drop: a dropped transaction holds the lock until its connection
        // is next used.
        tx.rollback().await?;
        return Ok(None);
    }
    let row = insert(&mut *tx, f).await?;
    tx.commit().await?;
    Ok(Some(row))
}

pub async fn get(db: impl PgExecutor<'_>, tenant: &str, id: &str) -> sqlx::Result<Option<FileRow>> {
    sqlx::query_as(&format!(
        "select {FILE_COLS} from files where id = $1 and tenant_id = $2"
    ))
    .bind(id)
    .bind(tenant)
    .fetch_optional(db)
    .await
}

/// What deleting a file did.
#[derive(Debug)]
pub enum Deleted {
    Gone(FileRow),
    NotFound,
    /// A queued or running job reads it: the job's id.
    InUse(String),
}

/// Deletes a tenant's file unless a queued or running job reads it.
pub async fn delete(db: &sqlx::PgPool, tenant: &str, id: &str) -> sqlx::Result<Deleted> {
    let mut tx = db.begin().await?;
    // The file row first, locked: a job checked against it meanwhile waits.
    let found: Option<(String,)> =
        sqlx::query_as("select id from files where id = $1 and tenant_id = $2 for update")
            .bind(id)
            .bind(tenant)
            .fetch_optional(&mut *tx)
            .await?;
    if found.is_none() {
        tx.rollback().await?;
        return Ok(Deleted::NotFound);
    }
    let user: Option<(String,)> = sqlx::query_as(
        "select id from jobs
          where tenant_id = $2 and kind = 'fine_tune'
            and status in ('queued', 'running', 'cancelling', 'paused')
            and (spec->'training_file'->>'id' = $1 or spec->'validation_file'->>'id' = $1)
          limit 1",
    )
    .bind(id)
    .bind(tenant)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((job,)) = user {
        tx.rollback().await?;
        return Ok(Deleted::InUse(job));
    }
    let row: FileRow = sqlx::query_as(&format!(
        "delete from files where id = $1 and tenant_id = $2 returning {FILE_COLS}"
    ))
    .bind(id)
    .bind(tenant)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Deleted::Gone(row))
}

/// A tenant's files, newest first; `(rows, has_more)`.
/// A tenant's files of purpose `page.filter` (a JSON string, or none).
pub async fn list(db: &sqlx::PgPool, tenant: &str, page: &Page) -> super::PageResult<FileRow> {
    let filter = "($4::jsonb is null or purpose = $4::jsonb #>> '{}')";
    super::keyset_page(db, ("files", FILE_COLS, filter), tenant, page).await
}
