//! Tenants and their API keys (stored as sha256 hashes; a key is shown once, at creation).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{FromRow, PgExecutor};

use super::new_id;

#[derive(Clone, Debug, FromRow, Serialize)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

pub async fn create(db: impl PgExecutor<'_>, name: &str) -> sqlx::Result<Tenant> {
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
pub async fn create_key(
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

pub async fn revoke_key(db: impl PgExecutor<'_>, key_id: &str) -> sqlx::Result<Option<ApiKey>> {
    sqlx::query_as(
        "update api_keys set revoked_at = coalesce(revoked_at, now()) where id = $1
         returning id, tenant_id, prefix, created_at, revoked_at",
    )
    .bind(key_id)
    .fetch_optional(db)
    .await
}

/// The tenant a live key belongs to.
pub async fn for_key(db: impl PgExecutor<'_>, secret: &str) -> sqlx::Result<Option<String>> {
    let row: Option<(String,)> = sqlx::query_as(
        "select tenant_id from api_keys where key_sha256 = $1 and revoked_at is null",
    )
    .bind(key_hash(secret))
    .fetch_optional(db)
    .await?;
    Ok(row.map(|r| r.0))
}
