//! A worker's hold on its job while the database may be away.
//!
//! The lease in the database runs out `lease` after the last heartbeat that got through; the
//! worker cannot read that row during an outage, so it keeps its own conservative copy: the
//! time it *sent* that heartbeat plus the lease (the database stamped it later, so the real
//! expiry is no earlier). Until then no reaper can have taken the job, and a fenced write that
//! fails because Postgres is unreachable is worth retrying: the write is buffered (the caller
//! waits, training goes on) and lands once Postgres is back, so a restart costs time, not the
//! attempt. Past that time the worker gives the job up: another worker may own it.
//!
//! [`Held::keep`] renews the lease for the whole attempt — downloading a base model, training,
//! uploading, merging alike — and publishes what it learns ([`Standing`]: cancellation
//! requested, job lost) for whichever phase is running to act on.

use std::future::Future;
use std::ops::Deref;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::queue::{self, Lease, QueueError};

/// What the heartbeats have learned about the job.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Standing {
    pub cancel_requested: bool,
    /// Checkpoint at the next step and hand the job back (it waits `paused`).
    pub pause_requested: bool,
    /// The job is no longer surely this worker's: stop and write nothing more.
    pub lost: bool,
}

pub(crate) struct Held {
    lease: Lease,
    len: Duration,
    until: Mutex<Instant>,
    standing: watch::Sender<Standing>,
    /// The latest training progress, recorded with each heartbeat.
    progress: Mutex<Option<serde_json::Value>>,
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
            standing: watch::channel(Standing::default()).0,
            progress: Mutex::new(None),
        }
    }

    /// Follows what the heartbeats learn (the current value counts as unseen news).
    pub(crate) fn standing(&self) -> watch::Receiver<Standing> {
        let mut rx = self.standing.subscribe();
        rx.mark_changed();
        rx
    }

    pub(crate) fn set_progress(&self, p: serde_json::Value) {
        *self.progress.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
    }

    /// Renews the lease every `every`, and at once when `cancels` announces news of this job,
    /// until the job is lost (then it returns). A heartbeat that cannot reach the database is
    /// retried at the next tick; only once the lease may have run out is the job given up.
    pub(crate) async fn keep(
        &self,
        db: &sqlx::PgPool,
        cfg: &queue::QueueConfig,
        every: Duration,
        cancels: &crate::db::listen::JobSignals,
    ) {
        let mut beat = tokio::time::interval(every);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut news = cancels.watch(&self.job_id);
        loop {
            tokio::select! {
                _ = beat.tick() => {}
                _ = news.changed() => {}
            }
            let progress = self
                .progress
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let sent_at = Instant::now();
            match queue::heartbeat(db, &self.lease, cfg, progress.as_ref()).await {
                Ok(b) => {
                    self.renewed(sent_at);
                    self.standing.send_if_modified(|s| {
                        let was = *s;
                        // A cancellation stands once seen; a pause may be withdrawn (resume).
                        s.cancel_requested |= b.cancel_requested;
                        s.pause_requested = b.pause_requested;
                        *s != was
                    });
                }
                Err(QueueError::LeaseLost(_)) => return self.give_up(),
                // Unreachable past the lease: a reaper may have handed the job on.
                Err(e) if self.expired() => {
                    tracing::warn!(job = %self.job_id, "heartbeat failed past the lease, giving the job up: {e}");
                    return self.give_up();
                }
                // An outage shorter than the lease: keep working.
                Err(e) => tracing::warn!(job = %self.job_id, "heartbeat failed: {e}"),
            }
        }
    }

    fn give_up(&self) {
        self.standing.send_modify(|s| s.lost = true);
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

    #[sqlx::test(migrations = "./migrations")]
    async fn the_keeper_holds_the_job_through_a_phase_longer_than_the_lease(db: sqlx::PgPool) {
        sqlx::query("insert into tenants (id, name) values ('t1', 't1')")
            .execute(&db)
            .await
            .unwrap();
        let job = queue::NewJob::fine_tune("job_k", "t1", serde_json::json!({}));
        queue::enqueue(&db, &job).await.unwrap();
        let cfg = queue::QueueConfig {
            lease: Duration::from_secs(1),
            ..Default::default()
        };
        let sent = Instant::now();
        let (_, lease) = queue::claim(&db, "w", &cfg).await.unwrap().unwrap();
        let held = Held::new(lease, cfg.lease, sent);
        let cancels = crate::db::listen::JobSignals::new(db.clone(), queue::CANCEL_CHANNEL);
        let mut standing = held.standing();
        // A phase of 3 leases (a base model download, a merge) with the keeper beside it.
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(3)) => {}
            _ = held.keep(&db, &cfg, Duration::from_millis(100), &cancels) => panic!("lost"),
        }
        assert_eq!(queue::reap(&db, &cfg).await.unwrap(), 0, "the lease held");
        assert!(!held.expired());
        // A cancel reaches the keeper (LISTEN) and is published.
        let keeper = held.keep(&db, &cfg, Duration::from_secs(3600), &cancels);
        tokio::pin!(keeper);
        standing.borrow_and_update();
        tokio::select! {
            _ = &mut keeper => panic!("lost"),
            _ = async {
                // The keeper's first tick runs at once; cancel once it is listening.
                tokio::time::sleep(Duration::from_millis(300)).await;
                queue::cancel(&db, "t1", "job_k").await.unwrap();
                standing.changed().await.unwrap();
            } => {}
        }
        assert!(standing.borrow().cancel_requested && !standing.borrow().lost);
        // Without the keeper the lease runs out; once reaped, the keeper gives the job up.
        sqlx::query(
            "update jobs set cancel_requested = false, status = 'running' where id = 'job_k'",
        )
        .execute(&db)
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(queue::reap(&db, &cfg).await.unwrap(), 1);
        tokio::time::timeout(
            Duration::from_secs(10),
            held.keep(&db, &cfg, Duration::from_millis(100), &cancels),
        )
        .await
        .expect("the keeper returns once the job is lost");
        assert!(held.standing().borrow().lost);
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
