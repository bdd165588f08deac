//! Base models a tenant registered from object storage.

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgExecutor};

#[derive(Clone, Debug, FromRow)]
pub struct ModelRow {
    pub id: String,
    pub tenant_id: String,
    pub object_prefix: String,
    pub architecture: String,
    pub config: serde_json::Value,
    pub source: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

const COLS: &str = "id, tenant_id, object_prefix, architecture, config, source, created_at";

/// Inserts a model; `None` when the tenant already has one of that name.
pub async fn insert(db: impl PgExecutor<'_>, m: &ModelRow) -> sqlx::Result<Option<ModelRow>> {
    sqlx::query_as(&format!(
        "insert into models (id, tenant_id, object_prefix, architecture, config, source)
         values ($1, $2, $3, $4, $5, $6) on conflict do nothing returning {COLS}"
    ))
    .bind(&m.id)
    .bind(&m.tenant_id)
    .bind(&m.object_prefix)
    .bind(&m.architecture)
    .bind(&m.config)
    .bind(&m.source)
    .fetch_optional(db)
    .await
}

pub async fn get(
    db: impl PgExecutor<'_>,
    tenant: &str,
    id: &str,
) -> sqlx::Result<Option<ModelRow>> {
    sqlx::query_as(&format!(
        "select {COLS} from models where tenant_id = $1 and id = $2"
    ))
    .bind(tenant)
    .bind(id)
    .fetch_optional(db)
    .await
}

pub async fn list(db: impl PgExecutor<'_>, tenant: &str) -> sqlx::Result<Vec<ModelRow>> {
    sqlx::query_as(&format!(
        "select {COLS} from models where tenant_id = $1 order by id"
    ))
    .bind(tenant)
    .fetch_all(db)
    .await
}
