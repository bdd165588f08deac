//! Webhook endpoints (per tenant), their deliveries (written by the `jobs_terminal_webhooks`
//! trigger when a fine-tune reaches a terminal state) and every delivery attempt.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{FromRow, PgExecutor};

use super::{Page, PageResult};

#[derive(Clone, Debug, FromRow, Serialize)]
pub struct EndpointRow {
    pub id: String,
    pub tenant_id: String,
    pub url: String,
    #[serde(skip)]
    pub secret: String,
    pub events: Vec<String>,
    pub created_at: DateTime<Utc>,
}

const ENDPOINT_COLS: &str = "id, tenant_id, url, secret, events, created_at";

/// Inserts an endpoint unless the tenant already has `max` (then `None`), under a per-tenant
/// lock so concurrent registrations cannot pass the cap together.
pub async fn insert_endpoint(
    db: &sqlx::PgPool,
    e: &EndpointRow,
    max: i64,
) -> sqlx::Result<Option<EndpointRow>> {
    let mut tx = db.begin().await?;
    sqlx::query("select pg_advisory_xact_lock(hashtextextended('webhooks:' || $1, 0))")
        .bind(&e.tenant_id)
        .execute(&mut *tx)
        .await?;
    let (n,): (i64,) =
        sqlx::query_as("select count(*) from webhook_endpoints where tenant_id = $1")
            .bind(&e.tenant_id)
            .fetch_one(&mut *tx)
            .await?;
    if n >= max {
        tx.rollback().await?;
        return Ok(None);
    }
    let row: EndpointRow = sqlx::query_as(&format!(
        "insert into webhook_endpoints (id, tenant_id, url, secret, events)
         values ($1, $2, $3, $4, $5) returning {ENDPOINT_COLS}"
    ))
    .bind(&e.id)
    .bind(&e.tenant_id)
    .bind(&e.url)
    .bind(&e.secret)
    .bind(&e.events)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(row))
}

pub async fn endpoint(
    db: impl PgExecutor<'_>,
    tenant: &str,
    id: &str,
) -> sqlx::Result<Option<EndpointRow>> {
    sqlx::query_as(&format!(
        "select {ENDPOINT_COLS} from webhook_endpoints where id = $1 and tenant_id = $2"
    ))
    .bind(id)
    .bind(tenant)
    .fetch_optional(db)
    .await
}

pub async fn endpoints(db: &sqlx::PgPool, tenant: &str, page: &Page) -> PageResult<EndpointRow> {
    super::keyset_page(
        db,
        (
            "webhook_endpoints",
            ENDPOINT_COLS,
            "($4::jsonb is null or true)",
        ),
        tenant,
        page,
    )
    .await
}

/// Deletes an endpoint and its deliveries; whether it existed.
pub async fn delete_endpoint(
    db: impl PgExecutor<'_>,
    tenant: &str,
    id: &str,
) -> sqlx::Result<bool> {
    let r = sqlx::query("delete from webhook_endpoints where id = $1 and tenant_id = $2")
        .bind(id)
        .bind(tenant)
        .execute(db)
        .await?;
    Ok(r.rows_affected() > 0)
}

#[derive(Clone, Debug, FromRow)]
pub struct DeliveryRow {
    pub id: String,
    pub endpoint_id: String,
    pub tenant_id: String,
    pub job_id: String,
    pub event_type: String,
    pub payload: serde_json::Value,
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
}

const DELIVERY_COLS: &str = "id, endpoint_id, tenant_id, job_id, event_type, payload, status, \
                             attempts, next_attempt_at, created_at, delivered_at";

#[derive(Clone, Debug, FromRow, Serialize)]
pub struct AttemptRow {
    pub delivery_id: String,
    pub attempt: i32,
    pub at: DateTime<Utc>,
    pub status_code: Option<i32>,
    pub error: Option<String>,
    pub duration_ms: i32,
}

/// An endpoint's deliveries, newest first, with their attempts.
pub async fn deliveries(
    db: &sqlx::PgPool,
    tenant: &str,
    endpoint_id: &str,
    page: &Page,
) -> sqlx::Result<Option<(Vec<(DeliveryRow, Vec<AttemptRow>)>, bool)>> {
    let mut p = page.clone();
    p.filter = Some(serde_json::Value::String(endpoint_id.to_string()));
    let filter = "endpoint_id = $4::jsonb #>> '{}'";
    let Some((rows, more)) = super::keyset_page::<DeliveryRow>(
        db,
        ("webhook_deliveries", DELIVERY_COLS, filter),
        tenant,
        &p,
    )
    .await?
    else {
        return Ok(None);
    };
    let ids: Vec<String> = rows.iter().map(|d| d.id.clone()).collect();
    let attempts: Vec<AttemptRow> = sqlx::query_as(
        "select delivery_id, attempt, at, status_code, error, duration_ms from webhook_attempts
          where delivery_id = any($1) order by delivery_id, attempt",
    )
    .bind(&ids)
    .fetch_all(db)
    .await?;
    let out = rows
        .into_iter()
        .map(|d| {
            let a = attempts
                .iter()
                .filter(|a| a.delivery_id == d.id)
                .cloned()
                .collect();
            (d, a)
        })
        .collect();
    Ok(Some((out, more)))
}

/// A delivery claimed for one attempt, with what sending it needs.
#[derive(Clone, Debug, FromRow)]
pub struct Due {
    pub id: String,
    pub url: String,
    pub secret: String,
    pub payload: serde_json::Value,
    pub attempts: i32,
}

/// Claims the next due delivery for one attempt (`SKIP LOCKED`: senders in other processes
/// take others): pending ones whose time has come, and ones whose sender died mid-attempt
/// (their lease ran out) — at least once, never lost.
pub async fn claim_due(db: impl PgExecutor<'_>, lease_secs: f64) -> sqlx::Result<Option<Due>> {
    sqlx::query_as(
        "with d as (
            update webhook_deliveries set status = 'delivering', attempts = attempts + 1,
                   lease_expires_at = now() + make_interval(secs => $1)
             where id = (select id from webhook_deliveries
                          where (status = 'pending' and next_attempt_at <= now())
                             or (status = 'delivering' and lease_expires_at < now())
                          order by next_attempt_at
                          for update skip locked
                          limit 1)
            returning id, endpoint_id, payload, attempts)
         select d.id, e.url, e.secret, d.payload, d.attempts
           from d join webhook_endpoints e on e.id = d.endpoint_id",
    )
    .bind(lease_secs)
    .fetch_optional(db)
    .await
}

/// What one attempt got.
pub struct Outcome<'a> {
    pub status_code: Option<i32>,
    pub error: Option<&'a str>,
    pub duration_ms: i32,
    /// `None`: delivered. `Some(None)`: give up. `Some(Some(secs))`: retry after `secs`.
    pub retry_in: Option<Option<f64>>,
}

/// Records an attempt and moves the delivery on: delivered, retried later, or failed.
pub async fn finish_attempt(
    db: &sqlx::PgPool,
    id: &str,
    attempt: i32,
    o: &Outcome<'_>,
) -> sqlx::Result<()> {
    let mut tx = db.begin().await?;
    sqlx::query(
        "insert into webhook_attempts (delivery_id, attempt, status_code, error, duration_ms)
         values ($1, $2, $3, $4, $5) on conflict do nothing",
    )
    .bind(id)
    .bind(attempt)
    .bind(o.status_code)
    .bind(o.error)
    .bind(o.duration_ms)
    .execute(&mut *tx)
    .await?;
    let (status, delay) = match o.retry_in {
        None => ("succeeded", None),
        Some(None) => ("failed", None),
        Some(Some(s)) => ("pending", Some(s)),
    };
    sqlx::query(
        "update webhook_deliveries set status = $2, lease_expires_at = null,
                next_attempt_at = now() + make_interval(secs => coalesce($3, 0)),
                delivered_at = case when $2 = 'succeeded' then now() else delivered_at end
          where id = $1 and attempts = $4",
    )
    .bind(id)
    .bind(status)
    .bind(delay)
    .bind(attempt)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}
