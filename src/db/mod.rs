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
pub mod webhooks;

/// Whether the database answers (readiness).
pub async fn ping(db: impl sqlx::PgExecutor<'_>) -> sqlx::Result<()> {
    sqlx::query("select 1").execute(db).await.map(|_| ())
}

pub fn new_id(prefix: &str) -> String {
    let mut b = [0u8; 12];
    rand::Rng::fill(&mut rand::rng(), &mut b[..]);
    format!("{prefix}_{}", hex::encode(b))
}

/// A cursor page: `limit` rows after `after` (newest first unless `ascending`), and whether
/// more follow.
#[derive(Clone, Debug, Default)]
pub struct Page {
    pub after: Option<String>,
    pub limit: i64,
    pub ascending: bool,
    /// The list's own filter value (bound as `$4` of its filter SQL): a file purpose, a job's
    /// metadata pairs.
    pub filter: Option<serde_json::Value>,
}

/// A page, or why there is none: the cursor names no row of the list.
pub type PageResult<T> = sqlx::Result<Option<(Vec<T>, bool)>>;

/// A page of a tenant's rows of `table` (those `filter` keeps; it may read `$4`, the page's
/// filter value as jsonb, null when absent) after the row `page.after`: keyset pagination on
/// `(created_at, id)`, so a page costs the same however deep it is. `None` when `after` is no
/// row of the tenant's list. `table`, `cols` and `filter` are this crate's constants, never
/// input.
async fn keyset_page<T>(
    db: &sqlx::PgPool,
    (table, cols, filter): (&str, &str, &str),
    tenant: &str,
    page: &Page,
) -> PageResult<T>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    // The filter value is bound only where the list's filter reads it.
    let filtered = filter.contains("$4");
    if let Some(after) = &page.after {
        let sql = format!(
            "select 1 from {table} where id = $1 and tenant_id = $2 and {}",
            filter.replace("$4", "$3")
        );
        let mut q = sqlx::query_as(&sql).bind(after).bind(tenant);
        if filtered {
            q = q.bind(&page.filter);
        }
        let known: Option<(i32,)> = q.fetch_optional(db).await?;
        if known.is_none() {
            return Ok(None);
        }
    }
    let (cmp, dir) = if page.ascending {
        (">", "asc")
    } else {
        ("<", "desc")
    };
    let sql = format!(
        "select {cols} from {table}
          where tenant_id = $1 and {filter}
            and ($2::text is null or (created_at, id) {cmp}
                 (select created_at, id from {table} where id = $2 and tenant_id = $1))
          order by created_at {dir}, id {dir}
          limit $3"
    );
    let mut q = sqlx::query_as(&sql)
        .bind(tenant)
        .bind(&page.after)
        .bind(page.limit + 1);
    if filtered {
        q = q.bind(&page.filter);
    }
    let rows: Vec<T> = q.fetch_all(db).await?;
    Ok(Some(cut_page(rows, page.limit)))
}

/// Rows fetched with `limit + 1` cut to `limit`, and whether there were more.
pub fn cut_page<T>(mut rows: Vec<T>, limit: i64) -> (Vec<T>, bool) {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit.max(0) as usize);
    (rows, more)
}
