//! The worker against real Postgres and storage, on a tiny model: a job runs to success and
//! its artifact is stored; bad data fails at once with the line; cancellation stops a running
//! job; a storage outage is retried, not corrupted; a job whose lease was lost resumes from its
//! last uploaded checkpoint on the next attempt and ends exactly where an uninterrupted run does.

mod common;

use std::time::Duration;

use sparsegrad_engine::artifact::Artifact;
use sparsegrad_engine::models::Arch;
use sparsegrad_engine::testing::{max_abs_diff, write_tiny_model_dir};
use sparsegrad_service::domain::{FineTune, JobStatus};
use sparsegrad_service::queue::{self, Cancelled, NewJob, Paused, QueueConfig, RetryPolicy};
use sparsegrad_service::storage::{S3Settings, Storage};
use sparsegrad_service::worker::{try_run_one, Outcome, WorkerCtx};
use sqlx::PgPool;

use common::tiny_fine_tune as spec;
use common::tiny_rows as rows;

struct Env {
    _tmp: tempfile::TempDir,
    ctx: WorkerCtx,
    model: std::path::PathBuf,
}

async fn env(db: &PgPool, storage: Option<Storage>) -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    write_tiny_model_dir(&model, Arch::Bert, 1).unwrap();
    let storage = storage.unwrap_or_else(|| {
        let url = format!("file://{}", tmp.path().join("objects").display());
        Storage::from_url(&url, &S3Settings::default()).unwrap()
    });
    sqlx::query("insert into tenants (id, name) values ('t1', 't1')")
        .execute(db)
        .await
        .unwrap();
    let ctx = WorkerCtx {
        db: db.clone(),
        storage,
        queue: QueueConfig {
            lease: Duration::from_secs(30),
            retry: RetryPolicy {
                base: Duration::from_secs(10),
                max: Duration::from_secs(60),
                jitter_min: 0.5,
            },
            clock: Default::default(),
        },
        worker_id: "w1".into(),
        work_dir: tmp.path().join("work"),
        heartbeat: Duration::from_millis(50),
        cancels: sparsegrad_service::db::listen::JobSignals::new(
            db.clone(),
            sparsegrad_service::queue::CANCEL_CHANNEL,
        ),
        drain: tokio::sync::watch::channel(false).1,
        cache_dir: None,
        model_cache: tmp.path().join("models"),
        device: candle_core::Device::Cpu,
    };
    Env {
        _tmp: tmp,
        ctx,
        model,
    }
}

/// A worker whose heartbeat comes an hour apart (and a lease to match): only a notification
/// (`job_cancel`, also used for pauses) can reach it within a test's time.
fn hourly_heartbeat(ctx: &WorkerCtx) -> WorkerCtx {
    WorkerCtx {
        heartbeat: Duration::from_secs(3600),
        queue: QueueConfig {
            lease: Duration::from_secs(7200),
            ..ctx.queue.clone()
        },
        ..ctx.clone()
    }
}

async fn enqueue(db: &PgPool, id: &str, spec: &FineTune) {
    queue::enqueue(
        db,
        &NewJob::fine_tune(id, "t1", serde_json::to_value(spec).unwrap()),
    )
    .await
    .unwrap();
}

async fn job_row(
    db: &PgPool,
    id: &str,
) -> (
    String,
    i32,
    Option<serde_json::Value>,
    Option<serde_json::Value>,
) {
    sqlx::query_as("select status, attempt, error, result from jobs where id = $1")
        .bind(id)
        .fetch_one(db)
        .await
        .unwrap()
}

async fn messages(db: &PgPool, id: &str) -> Vec<String> {
    sqlx::query_as::<_, (String,)>("select message from job_events where job_id = $1 order by id")
        .bind(id)
        .fetch_all(db)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.0)
        .collect()
}

/// Waits (polling the database, bounded) until an event message containing `needle` exists.
/// Where the job's recorded delta is stored (the row names it).
async fn delta_key(db: &PgPool, job: &str) -> String {
    sqlx::query_as::<_, (String,)>(
        "select object_key from job_artifacts where job_id = $1 and name = 'delta.safetensors'",
    )
    .bind(job)
    .fetch_one(db)
    .await
    .unwrap()
    .0
}

async fn wait_for_event(db: &PgPool, id: &str, needle: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        if messages(db, id).await.iter().any(|m| m.contains(needle)) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no `{needle}` event"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[sqlx::test(migrations = "./migrations")]
async fn a_job_runs_to_success_and_its_artifact_is_stored(db: PgPool) {
    let e = env(&db, None).await;
    e.ctx
        .storage
        .put("in/train.jsonl", rows(40, 1).into())
        .await
        .unwrap();
    enqueue(&db, "job_a", &spec(&e.model, "in/train.jsonl", 6, None)).await;
    let out = try_run_one(&e.ctx).await.unwrap();
    assert_eq!(
        out,
        Outcome::Ran {
            job_id: "job_a".into(),
            status: JobStatus::Succeeded
        }
    );
    let (status, attempt, error, result) = job_row(&db, "job_a").await;
    assert_eq!((status.as_str(), attempt, error), ("succeeded", 1, None));
    let result = result.unwrap();
    assert_eq!(result["trained_steps"], 6);
    let arts = sparsegrad_service::db::job_records::artifacts(&db, "job_a")
        .await
        .unwrap();
    let names: Vec<_> = arts
        .iter()
        .map(|a| (a.kind.as_str(), a.name.as_str()))
        .collect();
    assert_eq!(
        names,
        [("delta", "delta.json"), ("delta", "delta.safetensors")]
    );
    let ids: Vec<_> = arts.iter().map(|a| a.id.clone()).collect();
    let mut listed: Vec<String> = serde_json::from_value(result["result_files"].clone()).unwrap();
    listed.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(listed, want);
    let a = &arts[1];
    let bytes = e.ctx.storage.get(&a.object_key).await.unwrap();
    assert_eq!(a.bytes as usize, bytes.len());
    assert_eq!(a.sha256, sparsegrad_engine::io::sha256_bytes(&bytes));
    // One training point per step for the curves.
    let points = sparsegrad_service::db::job_records::metrics(&db, "job_a")
        .await
        .unwrap();
    assert_eq!(points.iter().filter(|m| m.kind == "train").count(), 6);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("delta.safetensors"), &bytes).unwrap();
    let art = Artifact::load(tmp.path()).unwrap();
    assert_eq!(art.descriptor.method, "sparsegrad");
    assert_eq!(art.descriptor.base_model.as_deref(), Some("tiny-bert"));
    let msgs = messages(&db, "job_a").await;
    assert_eq!(msgs[..2], ["queued", "running"]);
    assert_eq!(msgs.last().map(String::as_str), Some("succeeded"));
    assert_eq!(msgs.iter().filter(|m| m.starts_with("step ")).count(), 6);
    // The events say where the job trained (the worker's device).
    let (running, done): (serde_json::Value, serde_json::Value) = sqlx::query_as(
        "select (select data from job_events where job_id = $1 and message = 'running'),
                (select data from job_events where job_id = $1 and message = 'succeeded')",
    )
    .bind("job_a")
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(running["device"], "cpu", "{running}");
    assert_eq!(done["device"], "cpu", "{done}");
    // Scratch space is cleaned up; nothing else is runnable.
    assert!(!e.ctx.work_dir.join("job_a").join("attempt-1").exists());
    assert_eq!(try_run_one(&e.ctx).await.unwrap(), Outcome::Empty);
}

#[sqlx::test(migrations = "./migrations")]
async fn bad_data_fails_at_once_naming_the_line(db: PgPool) {
    let e = env(&db, None).await;
    let mut data = rows(5, 2);
    data.push_str("{\"text\": \"fine\"}\n");
    e.ctx
        .storage
        .put("in/bad.jsonl", data.into())
        .await
        .unwrap();
    enqueue(&db, "job_b", &spec(&e.model, "in/bad.jsonl", 3, None)).await;
    let out = try_run_one(&e.ctx).await.unwrap();
    assert_eq!(
        out,
        Outcome::Ran {
            job_id: "job_b".into(),
            status: JobStatus::Failed
        }
    );
    let (status, attempt, error, _) = job_row(&db, "job_b").await;
    assert_eq!((status.as_str(), attempt), ("failed", 1));
    let error = error.unwrap();
    assert!(
        error["message"].as_str().unwrap().contains("line 6"),
        "{error}"
    );
    assert_eq!(error["param"], "training_file");
    assert!(e.ctx.storage.list("jobs/job_b").await.unwrap().is_empty());
}

#[sqlx::test(migrations = "./migrations")]
async fn cancelling_a_running_job_stops_it(db: PgPool) {
    let e = env(&db, None).await;
    e.ctx
        .storage
        .put("in/train.jsonl", rows(40, 3).into())
        .await
        .unwrap();
    enqueue(
        &db,
        "job_c",
        &spec(&e.model, "in/train.jsonl", 1_000_000, None),
    )
    .await;
    let ctx = e.ctx.clone();
    let run = tokio::spawn(async move { try_run_one(&ctx).await.unwrap() });
    wait_for_event(&db, "job_c", "step 3/").await;
    assert_eq!(
        queue::cancel(&db, "t1", "job_c").await.unwrap(),
        Cancelled::Requested
    );
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        out,
        Outcome::Ran {
            job_id: "job_c".into(),
            status: JobStatus::Cancelled
        }
    );
    assert_eq!(job_row(&db, "job_c").await.0, "cancelled");
}

#[sqlx::test(migrations = "./migrations")]
async fn a_cancel_reaches_a_running_job_without_waiting_for_its_heartbeat(db: PgPool) {
    let e = env(&db, None).await;
    e.ctx
        .storage
        .put("in/train.jsonl", rows(40, 3).into())
        .await
        .unwrap();
    enqueue(
        &db,
        "job_p",
        &spec(&e.model, "in/train.jsonl", 1_000_000, None),
    )
    .await;
    // A heartbeat an hour apart (and a lease to match): only the `job_cancel` notification
    // can stop this job within the guard.
    let ctx = hourly_heartbeat(&e.ctx);
    let run = tokio::spawn(async move { try_run_one(&ctx).await.unwrap() });
    wait_for_event(&db, "job_p", "step 3/").await;
    assert_eq!(
        queue::cancel(&db, "t1", "job_p").await.unwrap(),
        Cancelled::Requested
    );
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the cancel was pushed, not left to an hourly heartbeat")
        .unwrap();
    assert_eq!(
        out,
        Outcome::Ran {
            job_id: "job_p".into(),
            status: JobStatus::Cancelled
        }
    );
}

#[sqlx::test(migrations = "./migrations")]
async fn at_shutdown_a_running_job_checkpoints_and_is_handed_back_at_once(db: PgPool) {
    let e = env(&db, None).await;
    e.ctx
        .storage
        .put("in/train.jsonl", rows(40, 3).into())
        .await
        .unwrap();
    // No periodic checkpoint before the end: only the drain writes one.
    enqueue(
        &db,
        "job_d",
        &spec(&e.model, "in/train.jsonl", 60, Some(1000)),
    )
    .await;
    let (budget,): (i32,) = sqlx::query_as("select max_attempts from jobs where id = 'job_d'")
        .fetch_one(&db)
        .await
        .unwrap();
    let (stop, drain) = tokio::sync::watch::channel(false);
    let ctx = WorkerCtx {
        drain,
        ..e.ctx.clone()
    };
    let run = tokio::spawn(async move { try_run_one(&ctx).await.unwrap() });
    wait_for_event(&db, "job_d", "step 3/").await;
    stop.send(true).unwrap();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        out,
        Outcome::Released {
            job_id: "job_d".into()
        }
    );
    // Queued, runnable now, the attempt not held against it, its steps checkpointed.
    let (status, attempt, max_attempts, runnable): (String, i32, i32, bool) = sqlx::query_as(
        "select status, attempt, max_attempts, run_after <= now() from jobs where id = 'job_d'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!((status.as_str(), attempt, runnable), ("queued", 1, true));
    assert_eq!(max_attempts, budget + 1);
    let (step,): (i32,) =
        sqlx::query_as("select max(step) from job_checkpoints where job_id = 'job_d'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert!((3..60).contains(&step), "{step}");
    // The next worker resumes from there and finishes.
    let second = WorkerCtx {
        worker_id: "w2".into(),
        ..e.ctx.clone()
    };
    let out = try_run_one(&second).await.unwrap();
    assert_eq!(
        out,
        Outcome::Ran {
            job_id: "job_d".into(),
            status: JobStatus::Succeeded
        }
    );
    let msgs = messages(&db, "job_d").await;
    assert!(
        msgs.iter()
            .any(|m| m == &format!("resuming from step {step}")),
        "{msgs:?}"
    );
    assert!(msgs
        .iter()
        .any(|m| m.starts_with("handed back at shutdown")));
}

#[sqlx::test(migrations = "./migrations")]
async fn a_paused_job_checkpoints_waits_and_resumes_where_it_stopped(db: PgPool) {
    let e = env(&db, None).await;
    e.ctx
        .storage
        .put("in/train.jsonl", rows(40, 3).into())
        .await
        .unwrap();
    enqueue(
        &db,
        "job_z",
        &spec(&e.model, "in/train.jsonl", 60, Some(1000)),
    )
    .await;
    let status = |db: PgPool| async move {
        let (s,): (String,) = sqlx::query_as("select status from jobs where id = 'job_z'")
            .fetch_one(&db)
            .await
            .unwrap();
        s
    };
    // Queued: paused at once, and no worker takes it; resumed, it is queued again.
    assert_eq!(queue::pause(&db, "t1", "job_z").await.unwrap(), Paused::Now);
    assert_eq!(
        queue::pause(&db, "t1", "job_z").await.unwrap(),
        Paused::Already
    );
    assert_eq!(
        queue::pause(&db, "t2", "job_z").await.unwrap(),
        Paused::NotFound
    );
    assert_eq!(try_run_one(&e.ctx).await.unwrap(), Outcome::Empty);
    assert_eq!(
        queue::resume(&db, "t1", "job_z").await.unwrap(),
        Paused::Now
    );
    assert_eq!(status(db.clone()).await, "queued");

    // Running: the worker hears the pause at once (an hourly heartbeat would not), checkpoints
    // and hands the job back paused.
    let ctx = hourly_heartbeat(&e.ctx);
    let run = tokio::spawn(async move { try_run_one(&ctx).await.unwrap() });
    wait_for_event(&db, "job_z", "step 3/").await;
    assert_eq!(
        queue::pause(&db, "t1", "job_z").await.unwrap(),
        Paused::Requested
    );
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the pause was pushed, not left to an hourly heartbeat")
        .unwrap();
    assert_eq!(
        out,
        Outcome::Released {
            job_id: "job_z".into()
        }
    );
    assert_eq!(status(db.clone()).await, "paused");
    let (step,): (i32,) =
        sqlx::query_as("select max(step) from job_checkpoints where job_id = 'job_z'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert!((3..60).contains(&step), "{step}");
    assert_eq!(
        try_run_one(&e.ctx).await.unwrap(),
        Outcome::Empty,
        "paused jobs are not claimed"
    );

    // Resumed: the next worker continues from the checkpoint and finishes.
    assert_eq!(
        queue::resume(&db, "t1", "job_z").await.unwrap(),
        Paused::Now
    );
    let out = try_run_one(&e.ctx).await.unwrap();
    assert_eq!(
        out,
        Outcome::Ran {
            job_id: "job_z".into(),
            status: JobStatus::Succeeded
        }
    );
    let msgs = messages(&db, "job_z").await;
    assert!(
        msgs.iter()
            .any(|m| m == &format!("resuming from step {step}")),
        "{msgs:?}"
    );
    assert!(msgs.iter().any(|m| m == "paused"), "{msgs:?}");
    // A finished job can be neither paused nor resumed.
    assert_eq!(
        queue::pause(&db, "t1", "job_z").await.unwrap(),
        Paused::Conflict(JobStatus::Succeeded)
    );
    assert_eq!(
        queue::resume(&db, "t1", "job_z").await.unwrap(),
        Paused::Conflict(JobStatus::Succeeded)
    );
}

#[sqlx::test(migrations = "./migrations")]
async fn a_storage_outage_is_retried_not_corrupted(db: PgPool) {
    let Some(endpoint) = common::s3_bucket("worker-outage") else {
        return;
    };
    let s3 = |endpoint: &str| S3Settings {
        endpoint: Some(endpoint.into()),
        region: Some("us-east-1".into()),
        access_key_id: Some("test".into()),
        secret_access_key: Some("test".into()),
        allow_http: true,
        max_retries: Some(0),
        retry_timeout: Some(Duration::from_secs(1)),
    };
    let good = Storage::from_url("s3://worker-outage", &s3(&endpoint)).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let down = Storage::from_url(
        "s3://worker-outage",
        &s3(&format!("http://127.0.0.1:{port}")),
    )
    .unwrap();
    let mut e = env(&db, Some(down)).await;
    good.put("in/train.jsonl", rows(40, 4).into())
        .await
        .unwrap();
    enqueue(&db, "job_d", &spec(&e.model, "in/train.jsonl", 4, None)).await;
    let out = try_run_one(&e.ctx).await.unwrap();
    assert_eq!(
        out,
        Outcome::Ran {
            job_id: "job_d".into(),
            status: JobStatus::Queued
        }
    );
    let (status, attempt, error, _) = job_row(&db, "job_d").await;
    assert_eq!((status.as_str(), attempt), ("queued", 1));
    assert_eq!(error.unwrap()["code"], "infrastructure_error");
    // Storage is back: the retry (once its backoff has passed) succeeds.
    e.ctx.storage = good.clone();
    assert_eq!(
        try_run_one(&e.ctx).await.unwrap(),
        Outcome::Empty,
        "backoff respected"
    );
    sqlx::query("update jobs set run_after = now() where id = 'job_d'")
        .execute(&db)
        .await
        .unwrap();
    let out = try_run_one(&e.ctx).await.unwrap();
    assert_eq!(
        out,
        Outcome::Ran {
            job_id: "job_d".into(),
            status: JobStatus::Succeeded
        }
    );
    assert_eq!(job_row(&db, "job_d").await.1, 2);
    assert_eq!(
        good.list("jobs/job_d/attempt-2/artifact")
            .await
            .unwrap()
            .len(),
        2
    );
}

#[sqlx::test(migrations = "./migrations")]
async fn a_lost_lease_resumes_from_the_last_checkpoint(db: PgPool) {
    let e = env(&db, None).await;
    e.ctx
        .storage
        .put("in/train.jsonl", rows(40, 5).into())
        .await
        .unwrap();
    let steps = 400;
    // The reference: the same job, uninterrupted.
    enqueue(
        &db,
        "job_ref",
        &spec(&e.model, "in/train.jsonl", steps, Some(3)),
    )
    .await;
    assert!(matches!(
        try_run_one(&e.ctx).await.unwrap(),
        Outcome::Ran { .. }
    ));
    let reference = e
        .ctx
        .storage
        .get(&delta_key(&db, "job_ref").await)
        .await
        .unwrap();

    enqueue(
        &db,
        "job_e",
        &spec(&e.model, "in/train.jsonl", steps, Some(3)),
    )
    .await;
    let ctx = e.ctx.clone();
    let first = tokio::spawn(async move { try_run_one(&ctx).await.unwrap() });
    wait_for_event(&db, "job_e", "checkpoint at step 6").await;
    // The worker is presumed dead: its lease expires and the reaper re-queues the job. The
    // worker's own heartbeat (every 50 ms) may renew the lease between the two statements, or
    // hold the row while the reaper looks (it skips locked rows): then expire it again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        sqlx::query(
            "update jobs set lease_expires_at = now() - interval '1 minute' where id = 'job_e'",
        )
        .execute(&db)
        .await
        .unwrap();
        if queue::reap(&db, &e.ctx.queue).await.unwrap() == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the reaper never took job_e"
        );
    }
    // The old worker notices at its next heartbeat and stops without writing anything more.
    let out = tokio::time::timeout(Duration::from_secs(60), first)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        out,
        Outcome::LostLease {
            job_id: "job_e".into()
        }
    );
    sqlx::query("update jobs set run_after = now() where id = 'job_e'")
        .execute(&db)
        .await
        .unwrap();
    let second = WorkerCtx {
        worker_id: "w2".into(),
        ..e.ctx.clone()
    };
    let out = try_run_one(&second).await.unwrap();
    assert_eq!(
        out,
        Outcome::Ran {
            job_id: "job_e".into(),
            status: JobStatus::Succeeded
        }
    );
    let msgs = messages(&db, "job_e").await;
    assert!(
        msgs.iter().any(|m| m.starts_with("resuming from step ")),
        "{msgs:?}"
    );
    // The winner's objects are its own attempt's: what the lost attempt (a zombie, were it
    // still running) writes under its prefix is never the recorded, served object.
    let served = delta_key(&db, "job_e").await;
    assert!(served.starts_with("jobs/job_e/attempt-2/"), "{served}");
    e.ctx
        .storage
        .put(
            "jobs/job_e/attempt-1/artifact/delta/delta.safetensors",
            "zombie bytes".into(),
        )
        .await
        .unwrap();
    // Resumed = uninterrupted.
    let resumed = e.ctx.storage.get(&served).await.unwrap();
    let load = |b: &[u8]| {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("delta.safetensors"), b).unwrap();
        Artifact::load(t.path()).unwrap()
    };
    let (a, b) = (load(&reference), load(&resumed));
    for (k, t) in &a.tensors {
        let d = max_abs_diff(t, &b.tensors[k]);
        assert!(d <= 1e-6, "{k} differs by {d} after the retry");
    }
}
