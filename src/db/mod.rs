//! Queries per aggregate: [`tenants`] (and their API keys), [`datasets`] (uploaded files),
//! [`job_records`] (what the API reads about jobs: rows, events, metrics, checkpoints,
//! artifacts) and [`registered_models`]. Every write to a job's lifecycle is the queue's
//! (`crate::queue`). Functions take `impl PgExecutor` so callers choose the transaction.
//! Plain `query_as` with runtime-checked SQL (see Cargo.toml); every statement runs in tests.

pub mod datasets;
pub mod job_records;
pub mod registered_models;
pub mod tenants;

/// Whether the database answers (readiness).
pub async fn ping(db: impl sqlx::PgExecutor<'_>) -> sqlx::Result<()> {
    sqlx::query("select 1").execute(db).await.map(|_| ())
}

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

/// Rows fetched with `limit + 1` cut to `limit`, and whether there were more.
pub fn cut_page<T>(mut rows: Vec<T>, limit: i64) -> (Vec<T>, bool) {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit.max(0) as usize);
    (rows, more)
}
