//! Queries per aggregate: [`tenants`] (and their API keys), [`datasets`] (uploaded files),
//! [`job_records`] (what the API reads about jobs: rows, events, metrics, checkpoints,
//! artifacts), [`registered_models`] and [`inventory`] (every row that names a stored
//! object). Every write to a job's lifecycle is the queue's
//! (`crate::queue`). Functions take `impl PgExecutor` so callers choose the transaction.
//! Plain `query_as` with runtime-checked SQL (see Cargo.toml); every statement runs in tests.

pub mod datasets;
pub mod inventory;
pub mod job_records;
pub mod listen;
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

/// A page of a tenant's rows of `table` (those `filter` keeps), newest first, after the row
/// `page.after`: keyset pagination on `(created_at, id)`, so a page costs the same however
/// deep it is. `table`, `cols` and `filter` are this crate's constants, never input.
async fn newest_first<T>(
    db: impl sqlx::PgExecutor<'_>,
    (table, cols, filter): (&str, &str, &str),
    tenant: &str,
    page: &Page,
) -> sqlx::Result<(Vec<T>, bool)>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    let rows: Vec<T> = sqlx::query_as(&format!(
        "select {cols} from {table}
          where tenant_id = $1 and {filter}
            and ($2::text is null or (created_at, id) <
                 (select created_at, id from {table} where id = $2 and tenant_id = $1))
          order by created_at desc, id desc
          limit $3"
    ))
    .bind(tenant)
    .bind(&page.after)
    .bind(page.limit + 1)
    .fetch_all(db)
    .await?;
    Ok(cut_page(rows, page.limit))
}

/// Rows fetched with `limit + 1` cut to `limit`, and whether there were more.
pub fn cut_page<T>(mut rows: Vec<T>, limit: i64) -> (Vec<T>, bool) {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit.max(0) as usize);
    (rows, more)
}
