//! Queries per aggregate. Functions take `impl PgExecutor` so callers choose the transaction.
//! Plain `query_as` with runtime-checked SQL (see Cargo.toml); every statement runs in tests.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{FromRow, PgExecutor};

pub fn new_id(prefix: &str) -> String {
    let mut b = [0u8; 12];
    rand::Rng::fill(&mut rand::rng(), &mut b[..]);
    format!("{prefix}_{}", hex::encode(b))
}

/// A cursor page: `limit` rows after `after` (newest first), and whether more follow.
#[derive(Clone, Debug)]
pub struct Page {
    pub after: Option<String>,
    pub limit: i64,
}

#[derive(Clone, Debug, FromRow, Serialize)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

pub async fn create_tenant(db: impl PgExecutor<'_>, name: &str) -> sqlx::Result<Tenant> {
    sqlx::query_as("insert into tenants (id, name) values ($1, $2) returning id, name, created_at")
        .bind(new_id("tenant"))
        .bind(name)
        .fetch_one(db)
        .await
}

#[derive(Clone, Debug, FromRow, Serialize)]
pub struct ApiKey {
    pub id: String,
    pub tenant_id: String,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

pub fn key_hash(secret: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Creates a key for a tenant; the secret is returned once and only its hash is stored.
/// `None` when the tenant does not exist.
pub async fn create_api_key(
    db: impl PgExecutor<'_>,
    tenant_id: &str,
) -> sqlx::Result<Option<(ApiKey, String)>> {
    let mut raw = [0u8; 24];
    rand::Rng::fill(&mut rand::rng(), &mut raw[..]);
    let secret = format!("sg-{}", hex::encode(raw));
    let key: Option<ApiKey> = sqlx::query_as(
        "insert into api_keys (id, tenant_id, prefix, key_sha256)
         select $1, id, $3, $4 from tenants where id = $2
         returning id, tenant_id, prefix, created_at, revoked_at",
    )
    .bind(new_id("key"))
    .bind(tenant_id)
    .bind(&secret[..10])
    .bind(key_hash(&secret))
    .fetch_optional(db)
    .await?;
    Ok(key.map(|k| (k, secret)))
}

pub async fn revoke_api_key(db: impl PgExecutor<'_>, key_id: &str) -> sqlx::Result<Option<ApiKey>> {
    sqlx::query_as(
        "update api_keys set revoked_at = coalesce(revoked_at, now()) where id = $1
         returning id, tenant_id, prefix, created_at, revoked_at",
    )
    .bind(key_id)
    .fetch_optional(db)
    .await
}

/// The tenant a live key belongs to.
pub async fn tenant_for_key(db: impl PgExecutor<'_>, secret: &str) -> sqlx::Result<Option<String>> {
    let row: Option<(String,)> = sqlx::query_as(
        "select tenant_id from api_keys where key_sha256 = $1 and revoked_at is null",
    )
    .bind(key_hash(secret))
    .fetch_optional(db)
    .await?;
    Ok(row.map(|r| r.0))
}

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

pub async fn insert_file(db: impl PgExecutor<'_>, f: &FileRow) -> sqlx::Result<FileRow> {
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

pub async fn get_file(
    db: impl PgExecutor<'_>,
    tenant: &str,
    id: &str,
) -> sqlx::Result<Option<FileRow>> {
    sqlx::query_as(&format!(
        "select {FILE_COLS} from files where id = $1 and tenant_id = $2"
    ))
    .bind(id)
    .bind(tenant)
    .fetch_optional(db)
    .await
}

pub async fn delete_file(
    db: impl PgExecutor<'_>,
    tenant: &str,
    id: &str,
) -> sqlx::Result<Option<FileRow>> {
    sqlx::query_as(&format!(
        "delete from files where id = $1 and tenant_id = $2 returning {FILE_COLS}"
    ))
    .bind(id)
    .bind(tenant)
    .fetch_optional(db)
    .await
}

/// A tenant's files, newest first; `(rows, has_more)`.
pub async fn list_files(
    db: impl PgExecutor<'_>,
    tenant: &str,
    page: &Page,
) -> sqlx::Result<(Vec<FileRow>, bool)> {
    let mut rows: Vec<FileRow> = sqlx::query_as(&format!(
        "select {FILE_COLS} from files f
          where tenant_id = $1
            and ($2::text is null or (created_at, id) <
                 (select created_at, id from files where id = $2 and tenant_id = $1))
          order by created_at desc, id desc
          limit $3"
    ))
    .bind(tenant)
    .bind(&page.after)
    .bind(page.limit + 1)
    .fetch_all(db)
    .await?;
    let more = rows.len() as i64 > page.limit;
    rows.truncate(page.limit as usize);
    Ok((rows, more))
}

pub mod jobs;
pub mod models;
