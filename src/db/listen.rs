//! One `LISTEN` connection per channel and process, fanned out to the tasks that wait on a
//! job: on `job_events` the API's event streams wake when their job has news (so open streams
//! cost Postgres nothing while they wait, however many there are); on `job_cancel` a worker
//! learns at once that its job was cancelled. The connection is opened with the first waiter
//! and closed once the owner is gone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::watch;

/// Every new event and status change of a job (payload: the job id; see the migrations).
pub const EVENTS: &str = "job_events";

#[derive(Default)]
struct Waiters {
    by_job: HashMap<String, watch::Sender<u64>>,
    listening: bool,
}

#[derive(Clone)]
pub struct JobSignals {
    db: PgPool,
    channel: &'static str,
    waiters: Arc<Mutex<Waiters>>,
}

/// Changes when the job may have new events or a new status.
pub struct JobWatch {
    rx: Option<watch::Receiver<u64>>,
    job: String,
    waiters: Arc<Mutex<Waiters>>,
}

impl JobWatch {
    /// Marks what is known now as seen: news after this call wakes [`changed`](Self::changed).
    pub fn mark_seen(&mut self) {
        if let Some(rx) = &mut self.rx {
            rx.borrow_and_update();
        }
    }

    pub async fn changed(&mut self) {
        let alive = match &mut self.rx {
            Some(rx) => rx.changed().await.is_ok(),
            None => false,
        };
        if !alive {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for JobWatch {
    fn drop(&mut self) {
        drop(self.rx.take());
        let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        if w.by_job
            .get(&self.job)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            w.by_job.remove(&self.job);
        }
    }
}

fn bump(tx: &watch::Sender<u64>) {
    tx.send_modify(|n| *n = n.wrapping_add(1));
}

impl JobSignals {
    /// Signals for the notifications on `channel` whose payload is a job id.
    pub fn new(db: PgPool, channel: &'static str) -> Self {
        JobSignals {
            db,
            channel,
            waiters: Default::default(),
        }
    }

    pub fn watch(&self, job: &str) -> JobWatch {
        let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        if !w.listening {
            w.listening = true;
            tokio::spawn(listen(
                self.db.clone(),
                self.channel,
                Arc::downgrade(&self.waiters),
            ));
        }
        let rx = w
            .by_job
            .entry(job.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        JobWatch {
            rx: Some(rx),
            job: job.to_string(),
            waiters: self.waiters.clone(),
        }
    }

    /// Jobs with a stream waiting on them (for tests and metrics).
    pub fn watched(&self) -> usize {
        let w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        w.by_job.len()
    }
}

/// Wakes every waiter: after a reconnect, notifications may have been missed.
fn bump_all(waiters: &Weak<Mutex<Waiters>>) -> bool {
    let Some(w) = waiters.upgrade() else {
        return false;
    };
    let w = w.lock().unwrap_or_else(|p| p.into_inner());
    w.by_job.values().for_each(bump);
    true
}

async fn listen(db: PgPool, channel: &'static str, waiters: Weak<Mutex<Waiters>>) {
    let mut listener: Option<PgListener> = None;
    loop {
        if waiters.strong_count() == 0 {
            return;
        }
        let l = match &mut listener {
            Some(l) => l,
            None => {
                let connected: sqlx::Result<PgListener> = async {
                    let mut l = PgListener::connect_with(&db).await?;
                    l.listen(channel).await?;
                    Ok(l)
                }
                .await;
                match connected {
                    Ok(l) => {
                        bump_all(&waiters);
                        listener.insert(l)
                    }
                    Err(e) => {
                        tracing::warn!("listener on {channel}: {e}; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
            }
        };
        // Wakes now and then to notice that the owning state is gone.
        match tokio::time::timeout(Duration::from_secs(5), l.try_recv()).await {
            Err(_) => {}
            Ok(Ok(Some(n))) => {
                let Some(w) = waiters.upgrade() else { return };
                let w = w.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(tx) = w.by_job.get(n.payload()) {
                    bump(tx);
                }
            }
            // The connection dropped; the next call reconnects and listens again.
            Ok(Ok(None)) => {
                if !bump_all(&waiters) {
                    return;
                }
            }
            Ok(Err(e)) => {
                tracing::warn!("listener on {channel}: {e}; reconnecting");
                listener = None;
                bump_all(&waiters);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
