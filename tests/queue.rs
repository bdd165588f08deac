//! The Postgres job queue under concurrency, lease expiry, zombies, cancellation, retries and
//! idempotency. Each test gets its own database (`sqlx::test`); expiry is simulated by
//! backdating timestamps, never by sleeping.

use std::collections::HashMap;
use std::time::Duration;

use sparsegrad_service::queue::{
    self, Cancelled, Failure, NewJob, QueueConfig, QueueError, RetryPolicy,
};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

async fn tenant(db: &PgPool, id: &str) {
    sqlx::query("insert into tenants (id, name) values ($1, $1)")
        .bind(id)
        .execute(db)
        .await
        .unwrap();
}

fn job(id: &str, tenant: &str) -> NewJob {
    NewJob::fine_tune(id, tenant, serde_json::json!({"n": id}))
}

fn cfg() -> QueueConfig {
    QueueConfig {
        lease: Duration::from_secs(30),
        retry: RetryPolicy {
            base: Duration::from_secs(10),
            max: Duration::from_secs(60),
            jitter_min: 0.5,
        },
        clock: Default::default(),
    }
}

async fn status(db: &PgPool, id: &str) -> (String, i32, Option<serde_json::Value>) {
    sqlx::query_as("select status, attempt, error from jobs where id = $1")
        .bind(id)
        .fetch_one(db)
        .await
        .unwrap()
}

/// Jobs ahead of `id` in claim order, `None` when it is not queued.
async fn position(db: &PgPool, id: &str) -> Option<i64> {
    queue::queue_positions(db, &[id.to_string()])
        .await
        .unwrap()
        .first()
        .map(|p| p.1)
}

/// Expires a job's lease (as if its worker stopped heartbeating long ago).
async fn expire_lease(db: &PgPool, id: &str) {
    sqlx::query("update jobs set lease_expires_at = now() - interval '1 minute' where id = $1")
        .bind(id)
        .execute(db)
        .await
        .unwrap();
}

/// Makes a backed-off job runnable now.
async fn due_now(db: &PgPool, id: &str) {
    sqlx::query("update jobs set run_after = now() - interval '1 second' where id = $1")
        .bind(id)
        .execute(db)
        .await
        .unwrap();
}

#[sqlx::test(migrations = "./migrations")]
async fn concurrent_claimers_take_every_job_exactly_once(pool: PgPool) {
    tenant(&pool, "t1").await;
    let n = 1000;
    let ids: Vec<String> = (0..n).map(|i| format!("job_{i:04}")).collect();
    // One multi-row insert keeps setup fast.
    sqlx::query(
        "insert into jobs (id, tenant_id, status, spec)
         select x, 't1', 'queued', '{}'::jsonb from unnest($1::text[]) as x",
    )
    .bind(&ids)
    .execute(&pool)
    .await
    .unwrap();
    let opts = pool.connect_options().as_ref().clone();
    let wide = PgPoolOptions::new()
        .max_connections(20)
        .connect_with(opts)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for w in 0..16 {
        let db = wide.clone();
        tasks.push(tokio::spawn(async move {
            let worker = format!("w{w}");
            let mut mine = Vec::new();
            while let Some((j, lease)) = queue::claim(&db, &worker, &cfg()).await.unwrap() {
                assert_eq!(j.status, "running");
                assert_eq!(j.attempt, 1);
                queue::complete(&db, &lease, &serde_json::json!({"by": worker}))
                    .await
                    .unwrap();
                mine.push(j.id);
            }
            mine
        }));
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut workers_used = 0;
    for t in tasks {
        let mine = t.await.unwrap();
        workers_used += usize::from(!mine.is_empty());
        for id in mine {
            *seen.entry(id).or_default() += 1;
        }
    }
    assert_eq!(seen.len(), n, "every job claimed");
    assert!(seen.values().all(|&c| c == 1), "a job was claimed twice");
    assert!(workers_used > 1, "claims did not interleave");
    let (done,): (i64,) = sqlx::query_as("select count(*) from jobs where status = 'succeeded'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(done, n as i64);
}

#[sqlx::test(migrations = "./migrations")]
async fn claim_order_priority_then_age_and_queue_position(pool: PgPool) {
    tenant(&pool, "t1").await;
    for (id, prio) in [("a", 0), ("b", 0), ("c", 5)] {
        queue::enqueue(
            &pool,
            &NewJob {
                priority: prio,
                ..job(id, "t1")
            },
        )
        .await
        .unwrap();
        // Distinct creation times.
        sqlx::query("update jobs set created_at = now() - make_interval(secs => $2) where id = $1")
            .bind(id)
            .bind(match id {
                "a" => 30.0,
                "b" => 20.0,
                _ => 10.0,
            })
            .execute(&pool)
            .await
            .unwrap();
    }
    assert_eq!(position(&pool, "c").await, Some(0));
    assert_eq!(position(&pool, "a").await, Some(1));
    assert_eq!(position(&pool, "b").await, Some(2));
    let order: Vec<String> = {
        let mut v = Vec::new();
        while let Some((j, _)) = queue::claim(&pool, "w", &cfg()).await.unwrap() {
            v.push(j.id);
        }
        v
    };
    assert_eq!(order, ["c", "a", "b"]);
    assert_eq!(position(&pool, "a").await, None);
}

#[sqlx::test(migrations = "./migrations")]
async fn expired_lease_is_reaped_with_backoff_and_the_zombie_is_fenced_out(pool: PgPool) {
    tenant(&pool, "t1").await;
    queue::enqueue(&pool, &job("j1", "t1")).await.unwrap();
    let (_, zombie) = queue::claim(&pool, "w-old", &cfg()).await.unwrap().unwrap();
    // A live lease is not reaped.
    assert_eq!(queue::reap(&pool, &cfg()).await.unwrap(), 0);
    expire_lease(&pool, "j1").await;
    assert_eq!(queue::reap(&pool, &cfg()).await.unwrap(), 1);
    assert_eq!(status(&pool, "j1").await.0, "queued");
    // Backoff: not claimable before run_after.
    assert!(queue::claim(&pool, "w-new", &cfg())
        .await
        .unwrap()
        .is_none());
    let (after,): (f64,) = sqlx::query_as(
        "select extract(epoch from run_after - now())::float8 from jobs where id = 'j1'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        (4.0..=10.5).contains(&after),
        "backoff {after}s outside [5, 10)·jitter"
    );
    due_now(&pool, "j1").await;
    let (j, fresh) = queue::claim(&pool, "w-new", &cfg()).await.unwrap().unwrap();
    assert_eq!(j.attempt, 2);
    // The old worker wakes up: its heartbeat, completion and failure all bounce.
    assert!(matches!(
        queue::heartbeat(&pool, &zombie, &cfg(), None).await,
        Err(QueueError::LeaseLost(_))
    ));
    assert!(matches!(
        queue::complete(&pool, &zombie, &serde_json::json!({"stale": true})).await,
        Err(QueueError::LeaseLost(_))
    ));
    assert!(matches!(
        queue::fail(
            &pool,
            &zombie,
            Failure::User,
            &serde_json::json!({}),
            &cfg()
        )
        .await,
        Err(QueueError::LeaseLost(_))
    ));
    assert_eq!(status(&pool, "j1").await.0, "running");
    // The new owner's writes go through.
    queue::heartbeat(&pool, &fresh, &cfg(), Some(&serde_json::json!({"step": 3})))
        .await
        .unwrap();
    queue::complete(&pool, &fresh, &serde_json::json!({"ok": true}))
        .await
        .unwrap();
    let (result,): (serde_json::Value,) = sqlx::query_as("select result from jobs where id = 'j1'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(result, serde_json::json!({"ok": true}));
}

#[sqlx::test(migrations = "./migrations")]
async fn the_reaper_task_returns_a_dead_workers_job_with_no_worker_idle(pool: PgPool) {
    tenant(&pool, "t1").await;
    queue::enqueue(&pool, &job("j1", "t1")).await.unwrap();
    queue::claim(&pool, "w-dead", &cfg())
        .await
        .unwrap()
        .unwrap();
    expire_lease(&pool, "j1").await;
    // No worker calls `try_run_one` here: only the process's reaper task runs.
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let reaper = tokio::spawn(sparsegrad_service::server::reaper_loop(
        pool.clone(),
        cfg(),
        Duration::from_millis(50),
        stop,
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while status(&pool, "j1").await.0 != "queued" {
        assert!(tokio::time::Instant::now() < deadline, "never reaped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_tx.send(true).unwrap();
    reaper.await.unwrap();
}

#[sqlx::test(migrations = "./migrations")]
async fn one_reaper_at_a_time(pool: PgPool) {
    tenant(&pool, "t1").await;
    queue::enqueue(&pool, &job("j1", "t1")).await.unwrap();
    queue::claim(&pool, "w-dead", &cfg())
        .await
        .unwrap()
        .unwrap();
    expire_lease(&pool, "j1").await;
    // Another process is mid-pass (it holds the reaper's lock): this pass skips.
    let mut other = pool.begin().await.unwrap();
    sqlx::query("select pg_advisory_xact_lock(hashtextextended('sparsegrad:reap', 0))")
        .execute(&mut *other)
        .await
        .unwrap();
    assert_eq!(queue::reap(&pool, &cfg()).await.unwrap(), 0);
    other.rollback().await.unwrap();
    assert_eq!(queue::reap(&pool, &cfg()).await.unwrap(), 1);
}

#[sqlx::test(migrations = "./migrations")]
async fn max_attempts_fails_the_job_and_keeps_the_error(pool: PgPool) {
    tenant(&pool, "t1").await;
    queue::enqueue(
        &pool,
        &NewJob {
            max_attempts: 2,
            ..job("j1", "t1")
        },
    )
    .await
    .unwrap();
    // Attempt 1: an infrastructure error is retried.
    let (_, l1) = queue::claim(&pool, "w", &cfg()).await.unwrap().unwrap();
    let err = serde_json::json!({"code": "storage_unavailable", "message": "connection refused", "param": null});
    let s = queue::fail(&pool, &l1, Failure::Infrastructure, &err, &cfg())
        .await
        .unwrap();
    assert_eq!(s, "queued");
    due_now(&pool, "j1").await;
    // Attempt 2: the worker dies; the reaper finds the lease expired with no attempts left.
    let (j, _) = queue::claim(&pool, "w", &cfg()).await.unwrap().unwrap();
    assert_eq!(j.attempt, 2);
    expire_lease(&pool, "j1").await;
    assert_eq!(queue::reap(&pool, &cfg()).await.unwrap(), 1);
    let (st, attempt, error) = status(&pool, "j1").await;
    assert_eq!((st.as_str(), attempt), ("failed", 2));
    let error = error.unwrap();
    assert_eq!(error["code"], "lease_expired");
    assert!(error["message"]
        .as_str()
        .unwrap()
        .contains("attempt 2 of 2"));
    assert!(queue::claim(&pool, "w", &cfg()).await.unwrap().is_none());

    // Infrastructure failure on the last attempt: failed with the worker's error kept.
    queue::enqueue(
        &pool,
        &NewJob {
            max_attempts: 1,
            ..job("j2", "t1")
        },
    )
    .await
    .unwrap();
    let (_, l) = queue::claim(&pool, "w", &cfg()).await.unwrap().unwrap();
    let s = queue::fail(&pool, &l, Failure::Infrastructure, &err, &cfg())
        .await
        .unwrap();
    assert_eq!(s, "failed");
    assert_eq!(status(&pool, "j2").await.2.unwrap(), err);
}

#[sqlx::test(migrations = "./migrations")]
async fn user_errors_fail_at_once(pool: PgPool) {
    tenant(&pool, "t1").await;
    queue::enqueue(&pool, &job("j1", "t1")).await.unwrap();
    let (_, l) = queue::claim(&pool, "w", &cfg()).await.unwrap().unwrap();
    let err = serde_json::json!({"code": "invalid_data", "message": "line 3: field `label`", "param": "training_file"});
    let s = queue::fail(&pool, &l, Failure::User, &err, &cfg())
        .await
        .unwrap();
    assert_eq!(s, "failed");
    let (st, attempt, e) = status(&pool, "j1").await;
    assert_eq!((st.as_str(), attempt), ("failed", 1));
    assert_eq!(e.unwrap(), err);
}

#[sqlx::test(migrations = "./migrations")]
async fn cancel_queued_and_running_jobs(pool: PgPool) {
    tenant(&pool, "t1").await;
    tenant(&pool, "t2").await;
    queue::enqueue(&pool, &job("queued", "t1")).await.unwrap();
    queue::enqueue(&pool, &job("running", "t1")).await.unwrap();
    sqlx::query("update jobs set priority = 1 where id = 'running'")
        .execute(&pool)
        .await
        .unwrap();
    let (j, lease) = queue::claim(&pool, "w", &cfg()).await.unwrap().unwrap();
    assert_eq!(j.id, "running");

    // Another tenant cannot see (or cancel) it.
    assert_eq!(
        queue::cancel(&pool, "t2", "running").await.unwrap(),
        Cancelled::NotFound
    );

    // The cancellation is announced on the channel (for listeners; workers do not listen yet).
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool)
        .await
        .unwrap();
    listener.listen(queue::CANCEL_CHANNEL).await.unwrap();

    assert_eq!(
        queue::cancel(&pool, "t1", "queued").await.unwrap(),
        Cancelled::Now
    );
    assert_eq!(status(&pool, "queued").await.0, "cancelled");
    assert!(queue::claim(&pool, "w", &cfg()).await.unwrap().is_none());

    assert_eq!(
        queue::cancel(&pool, "t1", "running").await.unwrap(),
        Cancelled::Requested
    );
    assert_eq!(status(&pool, "running").await.0, "cancelling");
    let note = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("notification within 10 s")
        .unwrap();
    assert_eq!(note.payload(), "running");
    // The worker learns it from its next heartbeat.
    let beat = queue::heartbeat(&pool, &lease, &cfg(), None).await.unwrap();
    assert!(beat.cancel_requested);
    queue::confirm_cancel(&pool, &lease).await.unwrap();
    assert_eq!(status(&pool, "running").await.0, "cancelled");
    assert_eq!(
        queue::cancel(&pool, "t1", "running").await.unwrap(),
        Cancelled::AlreadyFinal
    );
    // A cancelled job's worker cannot complete it afterwards.
    assert!(queue::complete(&pool, &lease, &serde_json::json!({}))
        .await
        .is_err());

    // A running job whose worker dies while cancelling ends cancelled, not re-queued.
    queue::enqueue(&pool, &job("dies", "t1")).await.unwrap();
    let (_, _l) = queue::claim(&pool, "w", &cfg()).await.unwrap().unwrap();
    queue::cancel(&pool, "t1", "dies").await.unwrap();
    expire_lease(&pool, "dies").await;
    queue::reap(&pool, &cfg()).await.unwrap();
    assert_eq!(status(&pool, "dies").await.0, "cancelled");
}

#[sqlx::test(migrations = "./migrations")]
async fn idempotent_create_returns_the_same_job(pool: PgPool) {
    tenant(&pool, "t1").await;
    tenant(&pool, "t2").await;
    let with_key = |id: &str, t: &str| NewJob {
        idempotency_key: Some("key-1".into()),
        ..job(id, t)
    };
    let (a, created) = queue::enqueue(&pool, &with_key("j1", "t1")).await.unwrap();
    assert!(created);
    let (b, created) = queue::enqueue(&pool, &with_key("j2", "t1")).await.unwrap();
    assert!(!created);
    assert_eq!(a, b);
    // The same key from another tenant is another job.
    let (c, created) = queue::enqueue(&pool, &with_key("j3", "t2")).await.unwrap();
    assert!(created);
    assert_eq!(c.id, "j3");
    let (n,): (i64,) = sqlx::query_as("select count(*) from jobs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 2);
}

#[sqlx::test(migrations = "./migrations")]
async fn the_queue_clock_expires_leases_and_passes_backoffs_without_sleeping(pool: PgPool) {
    tenant(&pool, "t1").await;
    queue::enqueue(&pool, &job("j1", "t1")).await.unwrap();
    // Exact backoffs (no jitter): 10 s after attempt 1.
    let cfg = QueueConfig {
        retry: RetryPolicy {
            jitter_min: 1.0,
            ..cfg().retry
        },
        ..cfg()
    };
    let (_, _lease) = queue::claim(&pool, "w", &cfg).await.unwrap().unwrap();
    assert_eq!(queue::reap(&pool, &cfg).await.unwrap(), 0);
    // Past the 30 s lease: reaped, and runnable again 10 s after that, not sooner.
    cfg.clock.advance(Duration::from_secs(31));
    assert_eq!(queue::reap(&pool, &cfg).await.unwrap(), 1);
    assert_eq!(status(&pool, "j1").await.0, "queued");
    assert!(queue::claim(&pool, "w", &cfg).await.unwrap().is_none());
    cfg.clock.advance(Duration::from_secs(9));
    assert!(queue::claim(&pool, "w", &cfg).await.unwrap().is_none());
    cfg.clock.advance(Duration::from_secs(2));
    let (j, lease) = queue::claim(&pool, "w", &cfg).await.unwrap().unwrap();
    assert_eq!(j.attempt, 2);
    // A failure on attempt 2 backs off 20 s on the same clock.
    let err = serde_json::json!({"code": "x", "message": "storage down", "param": null});
    let s = queue::fail(&pool, &lease, Failure::Infrastructure, &err, &cfg)
        .await
        .unwrap();
    assert_eq!(s, "queued");
    cfg.clock.advance(Duration::from_secs(19));
    assert!(queue::claim(&pool, "w", &cfg).await.unwrap().is_none());
    cfg.clock.advance(Duration::from_secs(2));
    assert!(queue::claim(&pool, "w", &cfg).await.unwrap().is_some());
}

#[sqlx::test(migrations = "./migrations")]
async fn unknown_job_kinds_and_statuses_are_refused(pool: PgPool) {
    tenant(&pool, "t1").await;
    for (kind, status) in [("train", "queued"), ("fine_tune", "validating_files")] {
        let r = sqlx::query(
            "insert into jobs (id, tenant_id, status, spec, kind) values ('x', 't1', $2, '{}', $1)",
        )
        .bind(kind)
        .bind(status)
        .execute(&pool)
        .await;
        assert!(r.is_err(), "{kind}/{status} was stored");
    }
}

#[sqlx::test(migrations = "./migrations")]
async fn a_job_runnable_now_is_announced_to_idle_workers(pool: PgPool) {
    tenant(&pool, "t1").await;
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool)
        .await
        .unwrap();
    listener.listen(queue::QUEUED_CHANNEL).await.unwrap();
    async fn next(l: &mut sqlx::postgres::PgListener, wait: u64) -> Option<String> {
        let n = tokio::time::timeout(Duration::from_millis(wait), l.recv()).await;
        n.ok().map(|n| n.unwrap().payload().to_string())
    }
    queue::enqueue(&pool, &job("a", "t1")).await.unwrap();
    assert_eq!(
        next(&mut listener, 10_000).await.as_deref(),
        Some(queue::QUEUED_KEY)
    );
    // A failed attempt that waits out a backoff is not runnable now: no announcement (the
    // workers' poll finds it later).
    let (_, lease) = queue::claim(&pool, "w", &cfg()).await.unwrap().unwrap();
    let err = serde_json::json!({"code": "x", "message": "x", "param": null});
    let s = queue::fail(&pool, &lease, Failure::Infrastructure, &err, &cfg())
        .await
        .unwrap();
    assert_eq!(s.as_str(), "queued");
    assert_eq!(next(&mut listener, 500).await, None);
    // Handed back at shutdown: runnable at once, announced.
    sqlx::query("update jobs set run_after = now() where id = 'a'")
        .execute(&pool)
        .await
        .unwrap();
    let (_, lease) = queue::claim(&pool, "w", &cfg()).await.unwrap().unwrap();
    queue::release(&pool, &lease).await.unwrap();
    assert_eq!(
        next(&mut listener, 10_000).await.as_deref(),
        Some(queue::QUEUED_KEY)
    );
}

#[sqlx::test(migrations = "./migrations")]
async fn a_pause_requested_before_a_failed_or_lost_attempt_still_pauses(pool: PgPool) {
    tenant(&pool, "t1").await;
    let err = serde_json::json!({"code": "infrastructure_error", "message": "disk", "param": null});
    // A retryable failure while the pause is pending: paused, not queued, and not claimed.
    queue::enqueue(&pool, &job("j1", "t1")).await.unwrap();
    let (_, l) = queue::claim(&pool, "w", &cfg()).await.unwrap().unwrap();
    assert_eq!(
        queue::pause(&pool, "t1", "j1").await.unwrap(),
        queue::Paused::Requested
    );
    let s = queue::fail(&pool, &l, Failure::Infrastructure, &err, &cfg())
        .await
        .unwrap();
    assert_eq!(s, "paused");
    // Past any backoff: still not claimed (only resume queues it again).
    let later = cfg();
    later.clock.advance(Duration::from_secs(3600));
    assert!(queue::claim(&pool, "w", &later).await.unwrap().is_none());
    // A worker that died with the pause pending: reaped into paused.
    queue::enqueue(&pool, &job("j2", "t1")).await.unwrap();
    let (_, l2) = queue::claim(&pool, "w", &cfg()).await.unwrap().unwrap();
    assert_eq!(l2.job_id, "j2");
    queue::pause(&pool, "t1", "j2").await.unwrap();
    expire_lease(&pool, "j2").await;
    assert_eq!(queue::reap(&pool, &cfg()).await.unwrap(), 1);
    assert_eq!(status(&pool, "j2").await.0, "paused");
    // Resumed, both run again; a user error still fails at once whatever was requested.
    for id in ["j1", "j2"] {
        assert_eq!(
            queue::resume(&pool, "t1", id).await.unwrap(),
            queue::Paused::Now
        );
    }
    let (_, l3) = queue::claim(&pool, "w", &cfg()).await.unwrap().unwrap();
    queue::pause(&pool, "t1", &l3.job_id).await.unwrap();
    let s = queue::fail(&pool, &l3, Failure::User, &err, &cfg())
        .await
        .unwrap();
    assert_eq!(s, "failed");
}
