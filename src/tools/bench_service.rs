//! Benchmarks of the service's own paths (not the engine's): `bench upload` streams generated
//! files through `POST /v1/files`, `bench streams` holds idle SSE streams on a real listener
//! and counts what they cost Postgres. Both run in a scratch database on DATABASE_URL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use axum::body::Body;
use bytes::Bytes;
use clap::{Args, Parser};
use tower::ServiceExt;

use crate::api::{router, AppState};
use crate::config::Config;
use crate::storage::{S3Settings, Storage};

#[derive(Args, Debug)]
pub struct BenchUploadArgs {
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// File sizes, MiB.
    #[arg(long, value_delimiter = ',', default_value = "16,64,256")]
    pub mib: Vec<usize>,
}

#[derive(Args, Debug)]
pub struct BenchStreamsArgs {
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    #[arg(long, default_value_t = 1000)]
    pub streams: usize,
    /// Seconds over which Postgres transactions are counted.
    #[arg(long, default_value_t = 10)]
    pub secs: u64,
}

#[derive(Parser)]
struct Wrap {
    #[command(flatten)]
    cfg: Config,
}

/// A state over `db` with its files, models and data in `dir`.
fn state(db: sqlx::PgPool, dir: &std::path::Path, extra: &[&str]) -> Result<AppState> {
    let data = dir.join("data");
    let models = dir.join("models");
    sparsegrad_engine::testing::write_tiny_model_dir(
        &models.join("tiny-bert"),
        sparsegrad_engine::models::Arch::Bert,
        1,
    )?;
    let mut args = vec![
        "bench",
        "--database-url",
        "postgres://unused",
        "--data-dir",
        data.to_str().context("data dir")?,
        "--models-dir",
        models.to_str().context("models dir")?,
        "--max-upload-bytes",
        "1099511627776",
    ];
    args.extend_from_slice(extra);
    let cfg = Wrap::try_parse_from(args)?.cfg;
    let url = format!("file://{}", dir.join("objects").display());
    let storage = Storage::from_url(&url, &S3Settings::default())?;
    Ok(AppState::new(db, storage, Arc::new(cfg)))
}

async fn tenant_key(db: &sqlx::PgPool) -> Result<String> {
    let t = crate::db::tenants::create(db, "bench").await?;
    let (_, key) = crate::db::tenants::create_key(db, &t.id)
        .await?
        .context("the tenant vanished")?;
    Ok(key)
}

fn proc_status_kib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let l = s.lines().find(|l| l.starts_with(field))?;
            l.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .unwrap_or(0.0)
}

/// Rows of about 50 bytes until `target` bytes, in 64 KiB chunks, made as they are sent.
fn generated(
    format: &'static str,
    target: usize,
) -> impl futures::Stream<Item = std::io::Result<Bytes>> {
    let header = if format == "csv" { "text,label\n" } else { "" };
    futures::stream::unfold(
        (0usize, 0usize, header),
        move |(mut sent, mut i, header)| async move {
            if sent >= target {
                return None;
            }
            let mut chunk = String::with_capacity(64 << 10);
            chunk.push_str(header);
            loop {
                let line = if format == "csv" {
                    format!("\"a quoted, comma-holding review number {i}\",{}\n", i % 2)
                } else {
                    format!(
                        "{{\"text\": \"a review number {i}\", \"label\": {}}}\n",
                        i % 2
                    )
                };
                if sent + chunk.len() + line.len() > target || chunk.len() + line.len() > 64 << 10 {
                    break;
                }
                chunk.push_str(&line);
                i += 1;
            }
            if chunk.is_empty() {
                return None;
            }
            sent += chunk.len();
            Some((Ok(Bytes::from(chunk)), (sent, i, "")))
        },
    )
}

pub fn upload(a: BenchUploadArgs) -> Result<()> {
    tokio::runtime::Runtime::new()?.block_on(super::bench::with_scratch_db(
        &a.database_url,
        |db| async move {
            let dir = tempfile::tempdir()?;
            let st = state(db.clone(), dir.path(), &[])?;
            let key = tenant_key(&db).await?;
            for format in ["jsonl", "csv"] {
                for &mib in &a.mib {
                    // The peak is reset, so each upload's growth is its own.
                    let _ = std::fs::write("/proc/self/clear_refs", "5");
                    let rss0 = proc_status_kib("VmRSS:");
                    let req = axum::http::Request::post("/v1/files?purpose=fine-tune")
                        .header("authorization", format!("Bearer {key}"))
                        .body(Body::from_stream(generated(format, mib << 20)))?;
                    let t0 = Instant::now();
                    let resp = router(st.clone()).oneshot(req).await?;
                    let status = resp.status();
                    let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await?;
                    let secs = t0.elapsed().as_secs_f64();
                    let peak = proc_status_kib("VmHWM:");
                    ensure!(
                        status.is_success(),
                        "{status}: {}",
                        String::from_utf8_lossy(&body)
                    );
                    let f: serde_json::Value = serde_json::from_slice(&body)?;
                    println!(
                        "{}",
                        serde_json::json!({
                            "bench": "upload", "format": format, "mib": mib,
                            "rows": f["rows"], "secs": secs,
                            "mib_per_sec": mib as f64 / secs,
                            "peak_rss_growth_mib": (peak - rss0) / 1024.0,
                        })
                    );
                    let id = f["id"].as_str().unwrap_or_default();
                    let del = axum::http::Request::delete(format!("/v1/files/{id}"))
                        .header("authorization", format!("Bearer {key}"))
                        .body(Body::empty())?;
                    router(st.clone()).oneshot(del).await?;
                }
            }
            Ok(())
        },
    ))
}

async fn commits(db: &sqlx::PgPool) -> Result<i64> {
    let (n,): (i64,) = sqlx::query_as(
        "select xact_commit from pg_stat_database where datname = current_database()",
    )
    .fetch_one(db)
    .await?;
    Ok(n)
}

pub fn streams(a: BenchStreamsArgs) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tokio::runtime::Runtime::new()?.block_on(super::bench::with_scratch_db(
        &a.database_url,
        |db| async move {
            let dir = tempfile::tempdir()?;
            let n = a.streams.to_string();
            let st = state(db.clone(), dir.path(), &["--max-event-streams", &n])?;
            let key = tenant_key(&db).await?;
            let call = |req: axum::http::Request<Body>| {
                let st = st.clone();
                async move {
                    let r = router(st).oneshot(req).await?;
                    let body = axum::body::to_bytes(r.into_body(), 1 << 20).await?;
                    anyhow::Ok(serde_json::from_slice::<serde_json::Value>(&body)?)
                }
            };
            let rows: String = (0..20)
                .map(|i| format!("{{\"text\": \"row {i}\", \"label\": {}}}\n", i % 2))
                .collect();
            let f = call(
                axum::http::Request::post("/v1/files?purpose=fine-tune")
                    .header("authorization", format!("Bearer {key}"))
                    .body(Body::from(rows))?,
            )
            .await?;
            let job = call(
                axum::http::Request::post("/v1/fine_tuning/jobs")
                    .header("authorization", format!("Bearer {key}"))
                    .header("content-type", "application/json")
                    .body(Body::from(
                        serde_json::json!({"model": "tiny-bert", "training_file": f["id"]})
                            .to_string(),
                    ))?,
            )
            .await?;
            let job = job["id"].as_str().context("no job id")?.to_string();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let limits = crate::http::HttpLimits {
                max_connections: a.streams + 64,
                header_timeout: Duration::from_secs(15),
                body_idle_timeout: Duration::from_secs(30),
                drain: Duration::from_secs(1),
            };
            let (_stop_tx, stop) = tokio::sync::watch::channel(false);
            tokio::spawn(crate::http::serve(
                listener,
                router(st.clone()),
                limits,
                stop,
            ));
            let mut held = Vec::with_capacity(a.streams);
            for _ in 0..a.streams {
                let mut c = tokio::net::TcpStream::connect(addr).await?;
                let req = format!(
                    "GET /v1/fine_tuning/jobs/{job}/events HTTP/1.1\r\nHost: x\r\n\
                     Authorization: Bearer {key}\r\nAccept: text/event-stream\r\n\r\n"
                );
                c.write_all(req.as_bytes()).await?;
                let mut head = [0u8; 12];
                c.read_exact(&mut head).await?;
                ensure!(
                    head.starts_with(b"HTTP/1.1 200"),
                    "{}",
                    String::from_utf8_lossy(&head)
                );
                held.push(c);
            }
            // Let the opening queries settle, and their statistics arrive: an idle backend
            // reports its counts up to 10 s late.
            tokio::time::sleep(Duration::from_secs(12)).await;
            let c0 = commits(&db).await?;
            tokio::time::sleep(Duration::from_secs(a.secs)).await;
            let c1 = commits(&db).await?;
            println!(
                "{}",
                serde_json::json!({
                    "bench": "streams", "streams": held.len(), "secs": a.secs,
                    "commits_per_sec": (c1 - c0 - 2) as f64 / a.secs as f64,
                    "watched_jobs": st.signals.watched(),
                    "note": "the two statistics queries themselves are subtracted",
                })
            );
            Ok(())
        },
    ))
}

#[derive(Args, Debug)]
pub struct BenchWorkersArgs {
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// Worker process counts to run the same jobs with.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub processes: Vec<usize>,
    #[arg(long, default_value_t = 24)]
    pub jobs: usize,
    /// Training steps per job (a tiny BERT, SparseGrad).
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Claim and cancel latencies measured per process count.
    #[arg(long, default_value_t = 8)]
    pub probes: usize,
}

/// `sparsegrad worker` processes of this binary on a scratch database, killed when dropped.
struct Workers(Vec<std::process::Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn p50_max(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let p50 = v.get(v.len() / 2).copied().unwrap_or(f64::NAN);
    (p50, v.last().copied().unwrap_or(f64::NAN))
}

/// Polls until `sql` (one bigint) reaches `n`.
async fn until_count(db: &sqlx::PgPool, sql: &str, n: i64, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let (c,): (i64,) = sqlx::query_as(sql).fetch_one(db).await?;
        if c >= n {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "timed out waiting for `{sql}` >= {n}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Jobs per minute with 1, 2 and 4 worker processes on small jobs, claim latency (enqueue to
/// `running` with idle workers) and cancel latency (request to `cancelled` on a running job).
pub fn workers(a: BenchWorkersArgs) -> Result<()> {
    use crate::domain::{FileRef, FineTune, ModelSource};
    use sparsegrad_engine::methods::{MethodSpec, SparseGradConfig};
    let tmp = tempfile::tempdir()?;
    let model = tmp.path().join("model");
    sparsegrad_engine::testing::write_tiny_model_dir(
        &model,
        sparsegrad_engine::models::Arch::Bert,
        1,
    )?;
    let objects = format!("file://{}", tmp.path().join("objects").display());
    let storage = Storage::from_url(&objects, &S3Settings::default())?;
    let words = sparsegrad_engine::testing::TINY_WORDS;
    let rows: String = (0..64)
        .map(|i| {
            let text = format!(
                "{} {}",
                words[i % words.len()],
                words[(i * 7) % words.len()]
            );
            let label = if i % 2 == 0 { "pos" } else { "neg" };
            format!("{}\n", serde_json::json!({"text": text, "label": label}))
        })
        .collect();
    let spec = |steps: usize| FineTune {
        base: ModelSource::Dir {
            path: model.clone(),
        },
        model: "tiny-bert".into(),
        training_file: FileRef {
            id: "file_bench".into(),
            object_key: "in/train.jsonl".into(),
        },
        validation_file: None,
        method: MethodSpec::Sparsegrad(SparseGradConfig {
            density: 0.1,
            basis_steps: 2,
            ..Default::default()
        }),
        train: sparsegrad_engine::train::TrainConfig {
            max_steps: Some(steps),
            batch_size: 4,
            ..Default::default()
        },
        max_seq_len: 16,
        task: None,
    };
    let exe = std::env::current_exe()?;
    let admin_url = a.database_url.clone();
    tokio::runtime::Runtime::new()?.block_on(super::bench::with_scratch_db(&admin_url, |db| async move {
        storage.put("in/train.jsonl", rows.into()).await?;
        sqlx::query("insert into tenants (id, name) values ('bench', 'bench')")
            .execute(&db)
            .await?;
        let (name,): (String,) = sqlx::query_as("select current_database()")
            .fetch_one(&db)
            .await?;
        let url = format!(
            "{}/{name}",
            a.database_url.rsplit_once('/').context("DATABASE_URL")?.0
        );
        let small = serde_json::to_value(spec(a.steps))?;
        let long = serde_json::to_value(spec(1_000_000))?;
        let enqueue = |id: String, spec: serde_json::Value| {
            let db = db.clone();
            async move {
                crate::queue::enqueue(&db, &crate::queue::NewJob::fine_tune(&id, "bench", spec))
                    .await
            }
        };
        println!("| worker processes | jobs | wall s | jobs/min | speed-up | claim p50 / max ms | cancel p50 / max ms |");
        println!("|---|---|---|---|---|---|---|");
        let mut base_rate = None;
        for (round, &n) in a.processes.iter().enumerate() {
            sqlx::query("delete from jobs").execute(&db).await?;
            let mut procs = Workers(Vec::new());
            for i in 0..n {
                procs.0.push(
                    std::process::Command::new(&exe)
                        .args(["worker", "--workers", "1", "--storage-url", &objects])
                        .arg("--data-dir")
                        .arg(tmp.path().join(format!("w{i}")))
                        .env("DATABASE_URL", &url)
                        .env("HOSTNAME", format!("bench{i}"))
                        .env("RUST_LOG", "warn")
                        .stdout(std::process::Stdio::null())
                        .spawn()?,
                );
            }
            // Idle workers, then every job at once.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let t0 = Instant::now();
            for j in 0..a.jobs {
                enqueue(format!("job_r{round}_{j:04}"), small.clone()).await?;
            }
            until_count(
                &db,
                "select count(*) from jobs where status = 'succeeded'",
                a.jobs as i64,
                Duration::from_secs(1800),
            )
            .await?;
            let wall = t0.elapsed().as_secs_f64();
            let rate = a.jobs as f64 / wall * 60.0;
            let speedup = rate / *base_rate.get_or_insert(rate);
            // Claim latency: one job at a time into an idle pool (database clock at both ends).
            let mut claims = Vec::new();
            for p in 0..a.probes {
                let id = format!("job_r{round}_claim{p}");
                enqueue(id.clone(), small.clone()).await?;
                let q = format!("select count(*) from jobs where id = '{id}' and status = 'succeeded'");
                until_count(&db, &q, 1, Duration::from_secs(600)).await?;
                let (ms,): (f64,) = sqlx::query_as(
                    "select extract(epoch from started_at - created_at)::float8 * 1000 from jobs where id = $1",
                )
                .bind(&id)
                .fetch_one(&db)
                .await?;
                claims.push(ms);
            }
            // Cancel latency: request to `cancelled` on a job that is training.
            let mut cancels = Vec::new();
            for p in 0..a.probes {
                let id = format!("job_r{round}_cancel{p}");
                enqueue(id.clone(), long.clone()).await?;
                let q = format!("select count(*) from job_metrics where job_id = '{id}'");
                until_count(&db, &q, 1, Duration::from_secs(600)).await?;
                let t = Instant::now();
                crate::queue::cancel(&db, "bench", &id).await?;
                let q = format!("select count(*) from jobs where id = '{id}' and status = 'cancelled'");
                until_count(&db, &q, 1, Duration::from_secs(60)).await?;
                cancels.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            drop(procs);
            let (c50, cmax) = p50_max(claims);
            let (x50, xmax) = p50_max(cancels);
            println!(
                "| {n} | {} | {wall:.1} | {rate:.1} | {speedup:.2}x | {c50:.0} / {cmax:.0} | {x50:.0} / {xmax:.0} |",
                a.jobs
            );
        }
        anyhow::Ok(())
    }))
}
