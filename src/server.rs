//! `sparsegrad serve` (API + in-process workers) and `sparsegrad worker` (workers only), each
//! with a reaper task: one shutdown signal (SIGTERM / ctrl-c) stops the server gracefully,
//! the reaper, and the workers' loops — a running fine-tune checkpoints at its next step and
//! is handed back to the queue at once, costing no attempt (within 25 s; past that it is left
//! to its lease).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::sync::watch;

use crate::api::{router, AppState};
use crate::config::Config;
use crate::shutdown::until_true;
use crate::storage::Storage;
use crate::worker::{try_run_one, Outcome, WorkerCtx};

pub async fn connect(cfg: &Config) -> Result<(PgPool, Storage)> {
    let db = PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(10))
        .connect(cfg.database_url.expose())
        .await
        .context("connecting to Postgres (DATABASE_URL)")?;
    sqlx::migrate!("./migrations")
        .run(&db)
        .await
        .context("running migrations")?;
    let storage = Storage::from_url(&cfg.storage_url()?, &cfg.s3())?;
    storage.check().await.context("checking object storage")?;
    Ok((db, storage))
}

fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutting down");
        let _ = tx.send(true);
    });
    rx
}

/// Claims and runs jobs until shutdown. With the queue empty it waits for a job to be
/// announced on `job_queued` (`queued`), and polls once a second besides (for jobs whose
/// backoff ran out, and in case a notification was lost). A job running at shutdown is not
/// dropped mid-way: it hears the signal through `ctx.drain`, checkpoints at its next step and
/// is handed back to the queue, and then the loop ends.
pub async fn worker_loop(
    ctx: WorkerCtx,
    mut stop: watch::Receiver<bool>,
    queued: crate::db::listen::JobSignals,
) {
    let mut news = queued.watch(crate::queue::QUEUED_KEY);
    loop {
        if *stop.borrow() {
            return;
        }
        news.mark_seen();
        match try_run_one(&ctx).await {
            Ok(Outcome::Empty) => {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = news.changed() => {}
                    _ = until_true(&mut stop) => return,
                }
            }
            Ok(o) => tracing::info!(worker = %ctx.worker_id, "{o:?}"),
            Err(e) => {
                tracing::warn!(worker = %ctx.worker_id, "worker step failed: {e}");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

/// How long shutdown waits for running jobs to checkpoint and hand themselves back (under
/// the systemd unit's `TimeoutStopSec`); a job still running then is left to its lease.
pub const WORKER_DRAIN: Duration = Duration::from_secs(25);

/// Reaps expired leases every `every` until shutdown, whatever the workers are doing: with
/// every worker busy on a long job, a dead worker's job is still returned to the queue. Every
/// `serve` and `worker` process runs one; [`crate::queue::reap`] lets one pass run at a time.
pub async fn reaper_loop(
    db: PgPool,
    queue: crate::queue::QueueConfig,
    every: Duration,
    stop: watch::Receiver<bool>,
) {
    periodically(every, stop, || async {
        match crate::queue::reap(&db, &queue).await {
            Ok(0) => {}
            Ok(n) => tracing::info!("reaped {n} jobs with expired leases"),
            Err(e) => tracing::warn!("reaping failed: {e}"),
        }
    })
    .await
}

/// Sends due webhook deliveries every `every` until shutdown (every `serve` and `worker`
/// process runs this; `SKIP LOCKED` spreads the deliveries across them).
pub async fn webhook_loop(
    db: PgPool,
    cfg: crate::webhooks::WebhookConfig,
    every: Duration,
    stop: watch::Receiver<bool>,
) {
    periodically(every, stop, || async {
        if let Err(e) = crate::webhooks::deliver_due(&db, &cfg).await {
            tracing::warn!("webhook deliveries: {e}");
        }
    })
    .await
}

/// Runs `pass` at each tick of `every` (a late tick is not made up) until shutdown.
async fn periodically<F, Fut>(every: Duration, mut stop: watch::Receiver<bool>, mut pass: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = until_true(&mut stop) => return,
        }
        pass().await;
    }
}

/// Removes scratch a crashed process left: import folders, partial downloads and (with the
/// embedded file store) the staging files of uploads that never completed, older than an
/// hour (anything that old was abandoned; other processes sharing the data dir keep theirs
/// younger). Training attempts clean up after themselves and are left alone here. An S3
/// bucket's incomplete uploads are its lifecycle rule's to abort (see deploy/).
pub fn sweep_stale_scratch(data_dir: &std::path::Path, older_than: Duration) -> usize {
    let stale = |p: &std::path::Path| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > older_than)
    };
    let mut removed = 0;
    // object_store stages a file-store upload as `<key>#<n>` until it completes.
    let staging = |n: &str| {
        n.rsplit_once('#')
            .is_some_and(|(_, s)| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
    };
    let tenants = std::fs::read_dir(data_dir.join("objects/tenants"))
        .into_iter()
        .flatten()
        .flatten();
    for t in tenants {
        let files = std::fs::read_dir(t.path().join("files"))
            .into_iter()
            .flatten();
        for e in files.flatten() {
            let p = e.path();
            if staging(&e.file_name().to_string_lossy()) && stale(&p) {
                removed += usize::from(std::fs::remove_file(&p).is_ok());
            }
        }
    }
    for (dir, matches) in [
        (
            data_dir.join("work"),
            (|n: &str| n.starts_with("import_")) as fn(&str) -> bool,
        ),
        (data_dir.join("cache/models"), |n: &str| {
            n.starts_with(".tmp-")
        }),
        (data_dir.join("cache/deltas"), |n: &str| {
            n.ends_with(".part")
        }),
    ] {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let p = e.path();
            if matches(&name) && stale(&p) {
                let gone = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
                removed += usize::from(gone.is_ok());
            }
        }
    }
    removed
}

pub async fn run(cfg: Config, api: bool) -> Result<()> {
    let (db, storage) = connect(&cfg).await?;
    let swept = sweep_stale_scratch(&cfg.data_dir, Duration::from_secs(3600));
    if swept > 0 {
        tracing::info!(
            "removed {swept} stale scratch entries under {}",
            cfg.data_dir.display()
        );
    }
    let cfg = Arc::new(cfg);
    let stop = shutdown_signal();
    // One device for every in-process worker (they share its stream); a bad explicit choice
    // stops startup rather than failing every job.
    let device = sparsegrad_engine::device::resolve_device(&cfg.device)?;
    if cfg.workers > 0 {
        tracing::info!(
            "workers train on {}",
            sparsegrad_engine::device::device_name(&device)
        );
    }
    // A quarter of the lease: a dead worker's job waits at most that long past its expiry.
    let reaper = tokio::spawn(reaper_loop(
        db.clone(),
        cfg.queue(),
        (cfg.queue().lease / 4).max(Duration::from_secs(1)),
        stop.clone(),
    ));
    let webhooks = tokio::spawn(webhook_loop(
        db.clone(),
        cfg.webhooks(),
        Duration::from_secs(1),
        stop.clone(),
    ));
    let mut workers = Vec::new();
    let cancels = crate::db::listen::JobSignals::new(db.clone(), crate::queue::CANCEL_CHANNEL);
    let queued = crate::db::listen::JobSignals::new(db.clone(), crate::queue::QUEUED_CHANNEL);
    for i in 0..cfg.workers {
        let ctx = WorkerCtx {
            db: db.clone(),
            storage: storage.clone(),
            queue: cfg.queue(),
            worker_id: format!("{}-{}-{i}", cfg.host, std::process::id()),
            work_dir: cfg.data_dir.join("work"),
            heartbeat: cfg.queue().lease / 5,
            cancels: cancels.clone(),
            drain: stop.clone(),
            cache_dir: Some(cfg.data_dir.join("cache")),
            model_cache: cfg.data_dir.join("cache").join("models"),
            device: device.clone(),
        };
        workers.push(tokio::spawn(worker_loop(ctx, stop.clone(), queued.clone())));
    }
    let limits = crate::http::HttpLimits {
        max_connections: crate::http::fit_connections(cfg.max_connections),
        header_timeout: Duration::from_secs(cfg.header_timeout_secs.max(1)),
        body_idle_timeout: Duration::from_secs(cfg.body_idle_timeout_secs.max(1)),
        drain: Duration::from_secs(10),
    };
    let state = AppState::new(db, storage, cfg.clone());
    // The operator address: `/metrics`, `/healthz` and `/readyz` without auth, in both modes
    // (a worker-only process's liveness and readiness probes go here).
    if let Some(addr) = cfg.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the metrics address {addr}"))?;
        tracing::info!("metrics and probes on http://{}", l.local_addr()?);
        let ops = crate::api::metrics::operator_router(state.clone());
        let small = crate::http::HttpLimits {
            max_connections: 64,
            ..limits
        };
        tokio::spawn(crate::http::serve(l, ops, small, stop.clone()));
    }
    if api {
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("binding {}", cfg.listen))?;
        tracing::info!("listening on http://{}", listener.local_addr()?);
        crate::http::serve(listener, router(state), limits, stop.clone()).await?;
    } else {
        until_true(&mut stop.clone()).await;
    }
    if tokio::time::timeout(WORKER_DRAIN, futures::future::join_all(workers))
        .await
        .is_err()
    {
        tracing::warn!("jobs still running after {WORKER_DRAIN:?}: left to their leases");
    }
    let _ = reaper.await;
    let _ = webhooks.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn only_stale_scratch_is_swept() {
        let d = tempfile::tempdir().unwrap();
        let work = d.path().join("work");
        for p in ["import_old", "import_new", "ftjob_x/attempt-1"] {
            std::fs::create_dir_all(work.join(p)).unwrap();
        }
        let deltas = d.path().join("cache/deltas");
        std::fs::create_dir_all(&deltas).unwrap();
        std::fs::write(deltas.join(".a.safetensors.dl_1.part"), b"x").unwrap();
        std::fs::write(deltas.join("a.safetensors"), b"x").unwrap();
        let files = d.path().join("objects/tenants/t1/files");
        std::fs::create_dir_all(&files).unwrap();
        std::fs::write(files.join("file_a#1"), b"x").unwrap();
        std::fs::write(files.join("file_b"), b"x").unwrap();
        // Everything is "older" than zero seconds once a moment has passed.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            super::sweep_stale_scratch(d.path(), Duration::from_secs(3600)),
            0
        );
        assert_eq!(super::sweep_stale_scratch(d.path(), Duration::ZERO), 4);
        assert!(files.join("file_b").exists() && !files.join("file_a#1").exists());
        assert!(work.join("ftjob_x/attempt-1").exists());
        assert!(deltas.join("a.safetensors").exists());
        assert!(!work.join("import_old").exists());
    }
}
