//! A worker's hold on its job while the database may be away.
//!
//! The lease in the database runs out `lease` after the last heartbeat that got through; the
//! worker cannot read that row during an outage, so it keeps its own conservative copy: the
//! time it *sent* that heartbeat plus the lease (the database stamped it later, so the real
//! expiry is no earlier). Until then no reaper can have taken the job, and a fenced write that
//! fails because Postgres is unreachable is worth retrying: the write is buffered (the caller
//! waits, training goes on) and lands once Postgres is back, so a restart costs time, not the
//! attempt. Past that time the worker gives the job up: another worker may own it.

use std::future::Future;
use std::ops::Deref;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::queue::{Lease, QueueError};

pub(crate) struct Held {
    lease: Lease,
    len: Duration,
    until: Mutex<Instant>,
}

impl Deref for Held {
    type Target = Lease;
    fn deref(&self) -> &Lease {
        &self.lease
    }
}

/// First retry after this; doubling up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

impl Held {
    /// A lease claimed by a request sent at `sent_at`.
    pub(crate) fn new(lease: Lease, len: Duration, sent_at: Instant) -> Held {
        Held {
            lease,
            len,
            until: Mutex::new(sent_at + len),
        }
    }

    pub(crate) fn lease(&self) -> &Lease {
        &self.lease
    }

    /// A heartbeat sent at `sent_at` got through.
    pub(crate) fn renewed(&self, sent_at: Instant) {
        let mut u = self.until.lock().unwrap_or_else(|p| p.into_inner());
        *u = (*u).max(sent_at + self.len);
    }

    /// The latest time the job is surely still this worker's.
    pub(crate) fn until(&self) -> Instant {
        *self.until.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn expired(&self) -> bool {
        Instant::now() >= self.until()
    }

    /// Runs a fenced write; while the database is unreachable it is retried with backoff
    /// until the lease may have run out (then the last error is returned). A lost fence or
    /// any other error returns at once.
    pub(crate) async fn persist<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, QueueError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, QueueError>>,
    {
        let mut backoff = FIRST_BACKOFF;
        let mut failures = 0u32;
        loop {
            match op().await {
                Err(QueueError::Db(e)) if transient(&e) => {
                    let next = Instant::now() + backoff;
                    if next >= self.until() {
                        tracing::warn!(job = %self.job_id, "{what}: database unreachable until the lease ran out: {e}");
                        return Err(QueueError::Db(e));
                    }
                    failures += 1;
                    if failures == 1 {
                        tracing::warn!(job = %self.job_id, "{what}: database unreachable, retrying until it is back: {e}");
                    }
                    tokio::time::sleep_until(next).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                r => {
                    if failures > 0 && r.is_ok() {
                        tracing::info!(job = %self.job_id, "{what}: written after {failures} retries");
                    }
                    return r;
                }
            }
        }
    }
}

/// Whether an error says the database could not be reached (or is restarting) rather than
/// that the statement was wrong: only those are retried.
pub(crate) fn transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(d) => d.code().is_some_and(|c| {
            // 08: connection exception; 57P01-57P03: shutdown, crash, starting up;
            // 53300: too many connections (a restart's clients all reconnecting).
            c.starts_with("08") || matches!(&*c, "57P01" | "57P02" | "57P03" | "53300")
        }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(len_ms: u64) -> Held {
        let lease = Lease {
            job_id: "j".into(),
            worker_id: "w".into(),
            attempt: 1,
        };
        Held::new(lease, Duration::from_millis(len_ms), Instant::now())
    }

    fn down() -> QueueError {
        QueueError::Db(sqlx::Error::PoolTimedOut)
    }

    #[tokio::test]
    async fn an_unreachable_database_is_retried_until_it_answers() {
        let h = held(30_000);
        let mut calls = 0;
        let r = h
            .persist("t", || {
                calls += 1;
                let n = calls;
                async move {
                    if n < 5 {
                        Err(down())
                    } else {
                        Ok(n)
                    }
                }
            })
            .await;
        assert_eq!(r.unwrap(), 5);
    }

    #[tokio::test]
    async fn retries_stop_when_the_lease_may_have_run_out() {
        let h = held(600);
        let start = Instant::now();
        let r: Result<(), _> = h.persist("t", || async { Err(down()) }).await;
        assert!(matches!(r, Err(QueueError::Db(_))));
        // 100 + 200 ms of backoff; the next (400 ms) would pass the lease.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_millis(600), "{took:?}");
        // A renewal moves the deadline.
        h.renewed(Instant::now());
        assert!(!h.expired());
    }

    #[tokio::test]
    async fn a_lost_fence_or_a_bad_statement_is_not_retried() {
        let h = held(30_000);
        let mut calls = 0;
        let r: Result<(), _> = h
            .persist("t", || {
                calls += 1;
                async { Err(QueueError::LeaseLost("j".into())) }
            })
            .await;
        assert!(matches!(r, Err(QueueError::LeaseLost(_))));
        let r: Result<(), _> = h
            .persist("t", || {
                calls += 1;
                async { Err(QueueError::Db(sqlx::Error::RowNotFound)) }
            })
            .await;
        assert!(matches!(r, Err(QueueError::Db(_))));
        assert_eq!(calls, 2);
    }
}
