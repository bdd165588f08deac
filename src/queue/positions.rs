//! Where queued jobs stand: how many are ahead of each in claim order, and when it should
//! finish.

use sqlx::PgExecutor;

use super::{Result, CLAIM_ORDER};

/// For the queued jobs among `ids`: `(id, jobs ahead in claim order, seconds until it should
/// finish)` — the estimated durations of the jobs ahead spread over the workers busy now (at
/// least one), plus its own and any backoff it still waits out. One pass over the queue for
/// a whole page; a job without an estimate counts as a minute.
pub async fn queue_positions(
    db: impl PgExecutor<'_>,
    ids: &[String],
) -> Result<Vec<(String, i64, f64)>> {
    Ok(sqlx::query_as(&format!(
        "with q as (
            select id,
                   row_number() over w - 1 as pos,
                   coalesce(sum(coalesce(estimate_secs, 60))
                            over (w rows between unbounded preceding and 1 preceding), 0) as ahead,
                   coalesce(estimate_secs, 60)
                     + greatest(0, extract(epoch from run_after - now()))::float8 as own
              from jobs where status = 'queued'
            window w as (order by {CLAIM_ORDER}))
         select id, pos, ahead / greatest(1, (select count(*) from jobs
                                               where status in ('running', 'cancelling'))) + own
           from q where id = any($1)"
    ))
    .bind(ids)
    .fetch_all(db)
    .await?)
}
