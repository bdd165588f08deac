//! Faults with real processes: `sparsegrad worker` (and `serve`) as child processes, a
//! Postgres of the test's own that it stops and restarts, the S3 test server behind a proxy
//! the test takes down, and a scale-out run with workers killed at random. Every wait is
//! bounded.
//!
//! Each test that stops something owns it: the restarted Postgres is a cluster on its own
//! port (never the shared server other tests use), and the S3 outage is a proxy of the
//! test's own in front of the shared S3 test server (whose contents a restart would lose).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sparsegrad_engine::models::Arch;
use sparsegrad_engine::testing::write_tiny_model_dir;
use sparsegrad_service::domain::FineTune;
use sparsegrad_service::fsck::{fsck, FsckOptions};
use sparsegrad_service::queue::{self, NewJob};
use sparsegrad_service::storage::{S3Settings, Storage};
use sqlx::PgPool;

use common::tiny_rows;

const GUARD: Duration = Duration::from_secs(240);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Postgres cluster of this test's own (scripts/postgres.sh on a free port and folder).
struct OwnPostgres {
    dir: PathBuf,
    port: u16,
    url: String,
}

impl OwnPostgres {
    fn script(&self, arg: &str) -> std::process::Output {
        Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/postgres.sh"))
            .arg(arg)
            .env("SPARSEGRAD_PG_LOCAL", "1")
            .env("SPARSEGRAD_PG_DIR", &self.dir)
            .env("SPARSEGRAD_PG_PORT", self.port.to_string())
            .output()
            .unwrap()
    }

    fn start_new() -> OwnPostgres {
        let port = free_port();
        // Under /tmp itself: the server runs as `postgres` and must reach the folder.
        let dir = PathBuf::from(format!("/tmp/sparsegrad-test-pg-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        let mut pg = OwnPostgres {
            dir,
            port,
            url: String::new(),
        };
        let out = pg.script("start");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8_lossy(&out.stdout).to_string();
        pg.url = line
            .trim()
            .strip_prefix("export DATABASE_URL=")
            .unwrap_or_else(|| panic!("{line}"))
            .to_string();
        pg
    }

    fn stop(&self) {
        let out = self.script("stop");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start(&self) {
        let out = self.script("start");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ = self.script("stop");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP proxy to `target` on a fixed port that the test takes down (the port refuses
/// connections, open ones are cut) and brings back.
struct Proxy {
    port: u16,
    target: SocketAddr,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    async fn new(target: SocketAddr) -> Proxy {
        let mut p = Proxy {
            port: free_port(),
            target,
            task: None,
        };
        p.up().await;
        p
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn up(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("proxy rebinding: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("proxy cannot rebind its port: {e}"),
            }
        };
        let target = self.target;
        self.task = Some(tokio::spawn(async move {
            // Dropped with the task: every open connection is cut when the proxy goes down.
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut c, _)) = listener.accept().await {
                conns.spawn(async move {
                    if let Ok(mut s) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
                    }
                });
            }
        }));
    }

    fn down(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.down();
    }
}

/// A child process killed (and reaped) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sparsegrad() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sparsegrad"));
    c.env_remove("SPARSEGRAD_STORAGE_URL")
        .env("RUST_LOG", "warn,sparsegrad_service=info");
    c
}

/// Where a child's log goes (printed when a test fails).
fn log_file(dir: &Path, name: &str) -> Stdio {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::File::create(dir.join(format!("{name}.log")))
        .unwrap()
        .into()
}

/// A `sparsegrad worker` named `name` on the database at `url`, with its own data folder
/// under `root` and its log in `logs/<name>.log`; `args` are the rest of its flags.
fn worker(url: &str, root: &Path, logs: &Path, name: &str, args: &[&str]) -> Proc {
    Proc(
        sparsegrad()
            .arg("worker")
            .args(args)
            .arg("--data-dir")
            .arg(root.join(name))
            .env("DATABASE_URL", url)
            .env("HOSTNAME", name)
            .stdout(Stdio::null())
            .stderr(log_file(logs, name))
            .spawn()
            .unwrap(),
    )
}

fn spec(model: &Path, key: &str, steps: usize, checkpoint_every: usize) -> FineTune {
    common::tiny_fine_tune(model, key, steps, Some(checkpoint_every))
}

/// What a single-worker fault test starts from: a tiny model, a local file store holding
/// the training rows at `in/train.jsonl`, and a folder for the children's logs.
struct Scene {
    tmp: tempfile::TempDir,
    logs: PathBuf,
    model: PathBuf,
    objects: String,
    st: Storage,
}

async fn scene(seed: u64) -> Scene {
    let tmp = tempfile::tempdir().unwrap();
    let logs = tmp.path().join("logs");
    let model = tmp.path().join("model");
    write_tiny_model_dir(&model, Arch::Bert, 1).unwrap();
    let objects = format!("file://{}", tmp.path().join("objects").display());
    let st = Storage::from_url(&objects, &S3Settings::default()).unwrap();
    st.put("in/train.jsonl", tiny_rows(40, seed).into())
        .await
        .unwrap();
    Scene {
        tmp,
        logs,
        model,
        objects,
        st,
    }
}

async fn enqueue(db: &PgPool, id: &str, spec: &FineTune) {
    sqlx::query("insert into tenants (id, name) values ('t1', 't1') on conflict do nothing")
        .execute(db)
        .await
        .unwrap();
    queue::enqueue(
        db,
        &NewJob::fine_tune(id, "t1", serde_json::to_value(spec).unwrap()),
    )
    .await
    .unwrap();
}

async fn steps_seen(db: &PgPool, id: &str) -> i64 {
    sqlx::query_as::<_, (i64,)>("select count(*) from job_metrics where job_id = $1")
        .bind(id)
        .fetch_one(db)
        .await
        .map(|r| r.0)
        .unwrap_or(0)
}

/// Waits until the job has recorded a training step.
async fn until_training(db: &PgPool, id: &str, logs: &Path) {
    let deadline = Instant::now() + GUARD;
    while steps_seen(db, id).await == 0 {
        assert!(
            Instant::now() < deadline,
            "never trained; {}",
            logs_of(logs)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for a terminal status (queries failing while a database restarts are retried).
async fn until_finished(db: &PgPool, id: &str, logs: &Path) -> (String, i32) {
    let deadline = Instant::now() + GUARD;
    loop {
        let row: Result<(String, i32), _> =
            sqlx::query_as("select status, attempt from jobs where id = $1")
                .bind(id)
                .fetch_one(db)
                .await;
        if let Ok((s, a)) = &row {
            if matches!(s.as_str(), "succeeded" | "failed" | "cancelled") {
                return (s.clone(), *a);
            }
        }
        assert!(
            Instant::now() < deadline,
            "job {id} not finished: {row:?}; {}",
            logs_of(logs)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn logs_of(dir: &Path) -> String {
    let mut s = String::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        s += &format!("\n--- {} ---\n", e.path().display());
        s += &tail.into_iter().rev().collect::<Vec<_>>().join("\n");
    }
    s
}

/// Every recorded train step once, from 1 to the last, all from attempt 1.
async fn assert_metrics_whole(db: &PgPool, id: &str, steps: i32) {
    let rows: Vec<(i32, i32)> = sqlx::query_as(
        "select step, attempt from job_metrics where job_id = $1 and kind = 'train' order by step",
    )
    .bind(id)
    .fetch_all(db)
    .await
    .unwrap();
    let got: Vec<i32> = rows.iter().map(|r| r.0).collect();
    assert_eq!(got, (1..=steps).collect::<Vec<_>>(), "gaps or duplicates");
    assert!(rows.iter().all(|r| r.1 == 1), "{rows:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_mid_job_costs_time_not_the_attempt() {
    let pg = OwnPostgres::start_new();
    let db = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&pg.url)
        .await
        .unwrap();
    sqlx::migrate!("./migrations").run(&db).await.unwrap();
    let Scene {
        tmp,
        logs,
        model,
        objects,
        st,
    } = scene(1).await;
    let steps = 400;
    enqueue(&db, "job_pg", &spec(&model, "in/train.jsonl", steps, 50)).await;
    let args = ["--lease-secs", "30", "--storage-url", &objects];
    let _worker = worker(&pg.url, tmp.path(), &logs, "worker", &args);
    until_training(&db, "job_pg", &logs).await;
    pg.stop();
    let down = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    pg.start();
    eprintln!("postgres was down {:.1} s", down.elapsed().as_secs_f64());
    let (status, attempt) = until_finished(&db, "job_pg", &logs).await;
    assert_eq!(
        (status.as_str(), attempt),
        ("succeeded", 1),
        "{}",
        logs_of(&logs)
    );
    assert_metrics_whole(&db, "job_pg", steps as i32).await;
    let report = fsck(
        &db,
        &st,
        &FsckOptions {
            grace: Duration::ZERO,
            fix: false,
            digests: true,
        },
    )
    .await
    .unwrap();
    assert!(report.clean(), "{}", report.to_text());
}

/// The URL of this test's database (sqlx::test made it on the shared server).
async fn db_url(db: &PgPool) -> String {
    let (name,): (String,) = sqlx::query_as("select current_database()")
        .fetch_one(db)
        .await
        .unwrap();
    let base = std::env::var("DATABASE_URL").unwrap();
    format!("{}/{name}", base.rsplit_once('/').unwrap().0)
}

fn unique_bucket(name: &str) -> String {
    format!(
        "{name}-{}",
        sparsegrad_service::db::new_id("b")
            .to_lowercase()
            .replace('_', "-")
    )
}

fn s3(endpoint: &str) -> S3Settings {
    common::s3_test_settings(endpoint, 3, Duration::from_secs(10))
}

/// The flags that put a child process on `bucket` at `endpoint`.
fn s3_args(bucket: &str, endpoint: &str) -> Vec<String> {
    [
        "--storage-url",
        &format!("s3://{bucket}"),
        "--s3-endpoint",
        endpoint,
        "--s3-region",
        "us-east-1",
        "--s3-access-key-id",
        "test",
        "--s3-secret-access-key",
        "test",
        "--s3-allow-http",
    ]
    .map(String::from)
    .to_vec()
}

/// Every artifact row's object has the row's size and sha256.
async fn assert_artifacts_match(db: &PgPool, st: &Storage) -> usize {
    let rows: Vec<(String, i64, String)> =
        sqlx::query_as("select object_key, bytes, sha256 from job_artifacts")
            .fetch_all(db)
            .await
            .unwrap();
    for (key, bytes, sha) in &rows {
        let (n, got) = st.digest(key).await.unwrap();
        assert_eq!((n as i64, &got), (*bytes, sha), "{key}");
    }
    rows.len()
}

async fn assert_fsck_clean(db: &PgPool, st: &Storage) {
    let opts = FsckOptions {
        grace: Duration::ZERO,
        fix: false,
        digests: true,
    };
    let report = fsck(db, st, &opts).await.unwrap();
    assert!(report.clean(), "{}", report.to_text());
    assert!(report.objects > 0 && report.rows > 0, "{report:?}");
}

#[sqlx::test(migrations = "./migrations")]
async fn an_s3_outage_mid_job_costs_time_and_records_no_partial_object(db: PgPool) {
    // A bucket of this run's own: the test server keeps earlier runs' objects.
    let bucket = unique_bucket("faults-outage");
    let Some(endpoint) = common::s3_bucket(&bucket) else {
        return;
    };
    let target: SocketAddr = endpoint.trim_start_matches("http://").parse().unwrap();
    let mut proxy = Proxy::new(target).await;
    let direct = Storage::from_url(&format!("s3://{bucket}"), &s3(&endpoint)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let logs = tmp.path().join("logs");
    let model = tmp.path().join("model");
    write_tiny_model_dir(&model, Arch::Bert, 1).unwrap();
    direct
        .put("in/train.jsonl", tiny_rows(40, 2).into())
        .await
        .unwrap();
    let steps = 400;
    enqueue(&db, "job_s3", &spec(&model, "in/train.jsonl", steps, 20)).await;
    let mut args: Vec<String> = ["--lease-secs", "30", "--retry-base-secs", "1"]
        .map(String::from)
        .to_vec();
    args.extend(s3_args(&bucket, &proxy.endpoint()));
    args.extend(["--s3-max-retries", "30", "--s3-retry-timeout-secs", "120"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let url = db_url(&db).await;
    let _worker = worker(&url, tmp.path(), &logs, "worker", &args);
    until_training(&db, "job_s3", &logs).await;
    proxy.down();
    tokio::time::sleep(Duration::from_secs(10)).await;
    proxy.up().await;
    let (status, attempt) = until_finished(&db, "job_s3", &logs).await;
    eprintln!("S3 down 10 s mid-job: {status} after {attempt} attempt(s)");
    assert_eq!(status, "succeeded", "{}", logs_of(&logs));
    assert_metrics_whole(&db, "job_s3", steps as i32).await;
    assert_eq!(assert_artifacts_match(&db, &direct).await, 2);
    assert_fsck_clean(&db, &direct).await;
}

/// The admin key of the scale-out run's API process.
const ADMIN: &str = "faults-admin-key";

async fn post(http: &reqwest::Client, url: String, key: &str, body: Value) -> Value {
    let r = http
        .post(url)
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert!(status.is_success(), "{status}: {v}");
    v
}

#[sqlx::test(migrations = "./migrations")]
async fn scale_out_four_workers_killed_ten_times_run_every_job_exactly_once(db: PgPool) {
    use rand::{Rng, SeedableRng};
    let bucket = unique_bucket("faults-scale");
    let Some(endpoint) = common::s3_bucket(&bucket) else {
        return;
    };
    let st = Storage::from_url(&format!("s3://{bucket}"), &s3(&endpoint)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let logs = tmp.path().join("logs");
    let models = tmp.path().join("models");
    write_tiny_model_dir(&models.join("tiny-bert"), Arch::Bert, 1).unwrap();
    let url = db_url(&db).await;
    let shared: Vec<String> = s3_args(&bucket, &endpoint)
        .into_iter()
        .chain(["--lease-secs", "5", "--retry-base-secs", "0.5"].map(String::from))
        .collect();
    let port = free_port();
    let _api = Proc(
        sparsegrad()
            .args(["serve", "--workers", "0", "--admin-key", ADMIN])
            .args(["--max-attempts", "20", "--max-active-jobs", "100"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(&shared)
            .arg("--models-dir")
            .arg(&models)
            .arg("--data-dir")
            .arg(tmp.path().join("api"))
            .env("DATABASE_URL", &url)
            .stdout(Stdio::null())
            .stderr(log_file(&logs, "api"))
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + GUARD;
    while !http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(
            Instant::now() < deadline,
            "API never ready; {}",
            logs_of(&logs)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t = post(
        &http,
        format!("{base}/v1/admin/tenants"),
        ADMIN,
        json!({"name": "acme"}),
    )
    .await;
    let k = post(
        &http,
        format!("{base}/v1/admin/api_keys"),
        ADMIN,
        json!({"tenant_id": t["id"]}),
    )
    .await;
    let key = k["key"].as_str().unwrap().to_string();
    let f: Value = http
        .post(format!(
            "{base}/v1/files?purpose=fine-tune&filename=t.jsonl"
        ))
        .bearer_auth(&key)
        .body(tiny_rows(40, 3))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let jobs = 40;
    for _ in 0..jobs {
        post(
            &http,
            format!("{base}/v1/fine_tuning/jobs"),
            &key,
            json!({"model": "tiny-bert", "training_file": f["id"],
                   "method": {"type": "sparsegrad",
                              "hyperparameters": {"max_steps": 30, "batch_size": 4,
                                                  "checkpoint_every": 10}}}),
        )
        .await;
    }
    let worker_args: Vec<&str> = ["--workers", "1"]
        .into_iter()
        .chain(shared.iter().map(String::as_str))
        .collect();
    let spawn_worker = |i: usize, generation: usize| {
        let name = format!("w{i}g{generation}");
        worker(&url, tmp.path(), &logs, &name, &worker_args)
    };
    let mut workers: Vec<Proc> = (0..4).map(|i| spawn_worker(i, 0)).collect();
    let started = Instant::now();
    let finished = |db: PgPool| async move {
        sqlx::query_as::<_, (i64,)>(
            "select count(*) from jobs where status in ('succeeded', 'failed', 'cancelled')",
        )
        .fetch_one(&db)
        .await
        .unwrap()
        .0
    };
    // Ten kill -9s at random moments while jobs remain, each worker restarted at once.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(15);
    let mut kills = 0;
    while kills < 10 && finished(db.clone()).await < jobs {
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..900))).await;
        let i = rng.random_range(0..workers.len());
        let victim = &mut workers[i].0;
        victim.kill().unwrap();
        victim.wait().unwrap();
        kills += 1;
        workers[i] = spawn_worker(i, kills);
    }
    let deadline = Instant::now() + GUARD;
    while finished(db.clone()).await < jobs {
        assert!(
            Instant::now() < deadline,
            "jobs unfinished; {}",
            logs_of(&logs)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = started.elapsed();
    drop(workers);
    let (succeeded, attempts, max_attempt): (i64, i64, i32) = sqlx::query_as(
        "select count(*) filter (where status = 'succeeded'), sum(attempt), max(attempt) from jobs",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    eprintln!(
        "{jobs} jobs on 4 workers with {kills} kill -9s: {:.1} s, {attempts} attempts (at most {max_attempt} for one job)",
        took.as_secs_f64()
    );
    assert_eq!(succeeded, jobs, "{}", logs_of(&logs));
    assert_eq!(kills, 10, "the jobs finished before every kill happened");
    // Exactly one success per job: a zombie's fenced writes never land.
    let once: Vec<(String, i64)> = sqlx::query_as(
        "select j.id, count(e.id) from jobs j left join job_events e
            on e.job_id = j.id and e.type = 'status' and e.message = 'succeeded'
          group by j.id having count(e.id) <> 1",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert!(once.is_empty(), "{once:?}");
    assert_eq!(assert_artifacts_match(&db, &st).await, 2 * jobs as usize);
    assert_fsck_clean(&db, &st).await;
    // And the operator command agrees (exit status 0).
    let out = sparsegrad()
        .args(["fsck", "--grace-secs", "0"])
        .args(&shared)
        .arg("--data-dir")
        .arg(tmp.path().join("fsck"))
        .env("DATABASE_URL", &url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("no problems found"), "{text}");
}

#[sqlx::test(migrations = "./migrations")]
async fn with_every_worker_busy_a_killed_workers_job_is_reaped_and_resumed(db: PgPool) {
    let Scene {
        tmp,
        logs,
        model,
        objects,
        ..
    } = scene(4).await;
    // Long jobs, one per worker: every worker is busy.
    for id in ["job_a", "job_b"] {
        enqueue(&db, id, &spec(&model, "in/train.jsonl", 1_000_000, 20)).await;
    }
    let lease = 10u64;
    let url = db_url(&db).await;
    let lease_arg = lease.to_string();
    let args = [
        "--lease-secs",
        &lease_arg,
        "--storage-url",
        &objects,
        "--retry-base-secs",
        "0",
    ];
    let spawn = |name: &str| worker(&url, tmp.path(), &logs, name, &args);
    let mut w1 = spawn("w1");
    let _w2 = spawn("w2");
    let holder = |db: PgPool, id: &'static str| async move {
        sqlx::query_as::<_, (String, Option<String>, i32)>(
            "select status, worker_id, attempt from jobs where id = $1",
        )
        .bind(id)
        .fetch_one(&db)
        .await
        .unwrap()
    };
    let deadline = Instant::now() + GUARD;
    loop {
        let (a, b) = (
            holder(db.clone(), "job_a").await,
            holder(db.clone(), "job_b").await,
        );
        let checkpointed: (i64,) =
            sqlx::query_as("select count(distinct job_id) from job_checkpoints")
                .fetch_one(&db)
                .await
                .unwrap();
        if a.0 == "running" && b.0 == "running" && checkpointed.0 == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "{a:?} {b:?}; {}", logs_of(&logs));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let victim = if holder(db.clone(), "job_a")
        .await
        .1
        .unwrap()
        .starts_with("w1")
    {
        "job_a"
    } else {
        "job_b"
    };
    w1.0.kill().unwrap();
    w1.0.wait().unwrap();
    let killed = Instant::now();
    // The other worker is busy; its process's reaper still returns the job.
    while holder(db.clone(), victim).await.0 == "running" {
        assert!(
            Instant::now() < deadline,
            "never reaped; {}",
            logs_of(&logs)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reaped = killed.elapsed().as_secs_f64();
    let bound = lease as f64 * 1.25;
    eprintln!("worker killed with every worker busy: its job reaped after {reaped:.1} s (lease {lease} s + reap interval {:.1} s)", lease as f64 / 4.0);
    assert!(reaped <= bound + 3.0, "reaped after {reaped:.1} s");
    // A worker comes back and resumes the job from its checkpoint.
    let _w1 = spawn("w1-again");
    let deadline = Instant::now() + GUARD;
    loop {
        let resumed: (i64,) = sqlx::query_as(
            "select count(*) from job_events where job_id = $1 and message like 'resuming from step %'",
        )
        .bind(victim)
        .fetch_one(&db)
        .await
        .unwrap();
        if resumed.0 == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never resumed; {}",
            logs_of(&logs)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(holder(db.clone(), victim).await.2, 2);
    // Cancel reaches each running job through LISTEN, well inside a heartbeat interval.
    let mut took = Vec::new();
    for id in ["job_a", "job_b"] {
        while holder(db.clone(), id).await.0 != "running" {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let t = Instant::now();
        queue::cancel(&db, "t1", id).await.unwrap();
        while holder(db.clone(), id).await.0 != "cancelled" {
            assert!(t.elapsed() < GUARD, "cancel never arrived");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        took.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    eprintln!(
        "cancel of a running job in a worker process: {took:.0?} ms (heartbeat every {} ms)",
        lease * 200
    );
    assert!(took.iter().all(|ms| *ms < 1000.0), "{took:?}");
}

#[sqlx::test(migrations = "./migrations")]
async fn sigterm_to_a_worker_mid_job_hands_it_to_another_that_resumes_it(db: PgPool) {
    let Scene {
        tmp,
        logs,
        model,
        objects,
        ..
    } = scene(6).await;
    // No periodic checkpoints: what the next worker resumes from is the drain's.
    let steps = 1500;
    enqueue(
        &db,
        "job_t",
        &common::tiny_fine_tune(&model, "in/train.jsonl", steps, None),
    )
    .await;
    let url = db_url(&db).await;
    let args = ["--lease-secs", "30", "--storage-url", &objects];
    let spawn = |name: &str| worker(&url, tmp.path(), &logs, name, &args);
    let mut w1 = spawn("w1");
    until_training(&db, "job_t", &logs).await;
    let _w2 = spawn("w2");
    let term = Command::new("kill")
        .args(["-TERM", &w1.0.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let exited = tokio::task::spawn_blocking(move || {
        let s = w1.0.wait();
        (s, w1)
    });
    let (status, _w1) = tokio::time::timeout(GUARD, exited).await.unwrap().unwrap();
    assert!(
        status.unwrap().success(),
        "w1 exits cleanly after the drain"
    );
    let (status, attempt) = until_finished(&db, "job_t", &logs).await;
    assert_eq!(status, "succeeded", "{}", logs_of(&logs));
    let (max_attempts, resumed_from, handed_back): (i32, Option<String>, i64) = sqlx::query_as(
        "select max_attempts,
                (select message from job_events where job_id = j.id and message like 'resuming from step %'),
                (select count(*) from job_events where job_id = j.id and message like 'handed back at shutdown%')
           from jobs j where id = 'job_t'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    eprintln!("SIGTERM mid-job: attempt {attempt} of {max_attempts}, {resumed_from:?}");
    assert_eq!(handed_back, 1);
    // The drained attempt was given back: two attempts ran, one counts against the budget.
    assert_eq!((attempt, max_attempts), (2, 4));
    let from: usize = resumed_from
        .expect("the second attempt resumed")
        .trim_start_matches("resuming from step ")
        .parse()
        .unwrap();
    assert!(from > 0 && from < steps, "{from}");
    let worker: (String,) = sqlx::query_as(
        "select data->>'worker' from job_events where job_id = 'job_t' and message = 'running' order by id desc limit 1",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert!(worker.0.starts_with("w2"), "{worker:?}");
}
