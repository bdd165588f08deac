//! A hostile tenant against a real server over real HTTP (the process's own listener on a
//! local port, real Postgres, the embedded file store): connections that never finish their
//! headers, bodies that stop, uploads that are large, broken, abandoned or past the quota,
//! too many event streams, the unauthenticated `/metrics`, a server killed mid-upload, and
//! one stopped with SIGTERM while it trains. Every wait is bounded by a
//! generous guard so a regression fails instead of hanging; none is a performance claim.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::api::{post_json, state_with, tenant_key, ADMIN};
use common::tiny_rows;
use serde_json::{json, Value};
use sparsegrad_engine::models::Arch;
use sparsegrad_engine::testing::write_tiny_model_dir;
use sparsegrad_service::api::{metrics, router, AppState};
use sparsegrad_service::http::{serve, HttpLimits};
use sparsegrad_service::storage::{S3Settings, Storage};
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// Long enough for anything that should happen, short enough to fail a hung test.
const GUARD: Duration = Duration::from_secs(60);

struct Server {
    tmp: tempfile::TempDir,
    st: AppState,
    addr: SocketAddr,
    _stop: watch::Sender<bool>,
    http: reqwest::Client,
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

async fn listen(app: axum::Router, limits: HttpLimits) -> (SocketAddr, watch::Sender<bool>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = watch::channel(false);
    tokio::spawn(serve(l, app, limits, rx));
    (addr, tx)
}

fn limits() -> HttpLimits {
    HttpLimits {
        max_connections: 100,
        header_timeout: Duration::from_secs(2),
        body_idle_timeout: Duration::from_secs(2),
        drain: Duration::from_secs(1),
    }
}

/// The API on a local port, with a file store and a models folder in a temp dir.
async fn server(db: PgPool, extra: &[&str]) -> Server {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("file://{}", tmp.path().join("objects").display());
    let storage = Storage::from_url(&url, &S3Settings::default()).unwrap();
    let data = tmp.path().join("data");
    let models = tmp.path().join("models");
    write_tiny_model_dir(&models.join("tiny-bert"), Arch::Bert, 1).unwrap();
    let mut flags = vec![
        "--data-dir",
        data.to_str().unwrap(),
        "--models-dir",
        models.to_str().unwrap(),
    ];
    flags.extend_from_slice(extra);
    let st = state_with(db, &flags, Some(storage));
    let (addr, stop) = listen(router(st.clone()), limits()).await;
    Server {
        tmp,
        st,
        addr,
        _stop: stop,
        http: reqwest::Client::new(),
    }
}

async fn healthz(s: &Server) -> reqwest::StatusCode {
    // A connection of its own: a kept-alive one may be closed by the server's idle limit
    // (the header timeout, 2 s here) just as the request goes out on it.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    tokio::time::timeout(GUARD, fresh.get(s.url("/healthz")).send())
        .await
        .expect("healthz answered within the guard")
        .unwrap()
        .status()
}

/// Reads until the server closes the connection; what it sent.
async fn until_closed(c: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(GUARD, c.read(&mut buf)).await {
            Err(_) => panic!("the server kept the connection open past the guard"),
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

async fn files_in_store(s: &Server) -> Vec<String> {
    walk(&s.tmp.path().join("objects"))
        .iter()
        .map(|p| p.display().to_string())
        .collect()
}

async fn file_rows(db: &PgPool) -> i64 {
    sqlx::query_as::<_, (i64,)>("select count(*) from files")
        .fetch_one(db)
        .await
        .unwrap()
        .0
}

#[sqlx::test(migrations = "./migrations")]
async fn half_open_connections_are_closed_and_healthz_keeps_answering(db: PgPool) {
    let s = server(db, &[]).await;
    let half = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ";
    let mut held = Vec::new();
    for _ in 0..50 {
        let mut c = TcpStream::connect(s.addr).await.unwrap();
        c.write_all(half).await.unwrap();
        held.push(c);
    }
    // Under the connection cap: others are served while these are held.
    assert_eq!(healthz(&s).await, 200);
    // Past the cap (100): the rest wait in the backlog, and the header deadline frees slots.
    for _ in 0..250 {
        held.push(TcpStream::connect(s.addr).await.unwrap());
    }
    assert_eq!(healthz(&s).await, 200);
    // Every one of them is closed by the server, none answered as a request.
    for c in &mut held {
        let got = until_closed(c).await;
        assert!(!got.starts_with(b"HTTP/1.1 200"), "{got:?}");
    }
    assert_eq!(healthz(&s).await, 200);
}

#[sqlx::test(migrations = "./migrations")]
async fn a_body_that_stops_arriving_is_dropped_and_nothing_is_stored(db: PgPool) {
    let s = server(db.clone(), &[]).await;
    let (_, key) = tenant_key(&s.st, "acme").await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    let head = format!(
        "POST /v1/files?purpose=fine-tune HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n"
    );
    c.write_all(head.as_bytes()).await.unwrap();
    c.write_all(b"{\"text\": \"a\", \"label\": 1}\n")
        .await
        .unwrap();
    let got = String::from_utf8_lossy(&until_closed(&mut c).await).to_string();
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    assert!(got.contains("no request body bytes arrived"), "{got}");
    assert_eq!(file_rows(&db).await, 0);
    assert_eq!(files_in_store(&s).await, Vec::<String>::new());
}

/// `n` rows of classification JSONL, about `n * 60` bytes.
fn rows(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "{{\"text\": \"a review of a film, number {i:>8}\", \"label\": {}}}\n",
                i % 2
            )
        })
        .collect()
}

async fn post_file(s: &Server, key: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let r = s
        .http
        .post(s.url("/v1/files?purpose=fine-tune&filename=big.jsonl"))
        .bearer_auth(key)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[sqlx::test(migrations = "./migrations")]
async fn large_uploads_stream_in_and_out_and_a_late_bad_row_leaves_nothing(db: PgPool) {
    let s = server(db.clone(), &[]).await;
    let (_, key) = tenant_key(&s.st, "acme").await;
    // 23 MB: past two storage parts, so it goes up in parts while it is validated.
    let good = rows(400_000);
    assert!(good.len() > 16 << 20);
    let (status, f) = post_file(&s, &key, good.clone()).await;
    assert_eq!(status, 200, "{f}");
    assert_eq!(f["bytes"], good.len());
    let id = f["id"].as_str().unwrap();
    let back = s
        .http
        .get(s.url(&format!("/v1/files/{id}/content")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(
        back.headers()["content-length"].to_str().unwrap(),
        good.len().to_string()
    );
    assert!(back.bytes().await.unwrap() == good.as_bytes());
    let stored = files_in_store(&s).await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    // The same size with one bad row at the very end: 400 naming its line, and neither a row
    // nor an object (nor a staging file) is left.
    let mut bad = good.clone();
    bad.push_str("{\"text\": \"a\"}\n");
    let (status, v) = post_file(&s, &key, bad).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "file");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("line 400001"),
        "{v}"
    );
    assert_eq!(file_rows(&db).await, 1);
    assert_eq!(files_in_store(&s).await, stored);
}

/// Starts a 100 MB upload and sends its first 12 MB of good rows, returning once a storage
/// part is staged under `objects` (the upload is then half stored).
async fn half_an_upload(addr: SocketAddr, key: &str, objects: &std::path::Path) -> TcpStream {
    let mut c = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/files?purpose=fine-tune HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
         Content-Length: 100000000\r\n\r\n"
    );
    c.write_all(head.as_bytes()).await.unwrap();
    c.write_all(rows(200_000).as_bytes()).await.unwrap();
    let deadline = tokio::time::Instant::now() + GUARD;
    while walk(objects).is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no part was staged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c
}

#[sqlx::test(migrations = "./migrations")]
async fn an_upload_abandoned_midway_leaves_nothing(db: PgPool) {
    let s = server(db.clone(), &[]).await;
    let (_, key) = tenant_key(&s.st, "acme").await;
    // The first storage part goes up (a staging file appears) …
    let c = half_an_upload(s.addr, &key, &s.tmp.path().join("objects")).await;
    let staged = files_in_store(&s).await;
    assert!(staged.iter().all(|f| f.contains('#')), "{staged:?}");
    // … then the client vanishes.
    drop(c);
    let deadline = tokio::time::Instant::now() + GUARD;
    while !files_in_store(&s).await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            files_in_store(&s).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(file_rows(&db).await, 0);
}

#[sqlx::test(migrations = "./migrations")]
async fn the_storage_quota_answers_429_and_concurrent_uploads_cannot_pass_it(db: PgPool) {
    let one = tiny_rows(20, 1);
    let quota = (one.len() * 2 + one.len() / 2).to_string();
    let s = server(db.clone(), &["--max-stored-bytes", &quota]).await;
    let (_, key) = tenant_key(&s.st, "acme").await;
    let calls = (0..4).map(|_| post_file(&s, &key, one.clone()));
    let got = futures::future::join_all(calls).await;
    let ok = got.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!(ok, 2, "{got:?}");
    for (status, v) in got.iter().filter(|(s, _)| *s != 200) {
        assert_eq!(*status, 429, "{v}");
        assert_eq!(v["error"]["code"], "storage_quota_exceeded", "{v}");
    }
    assert_eq!(file_rows(&db).await, 2);
    assert_eq!(files_in_store(&s).await.len(), 2);
    // Another tenant has a quota of its own.
    let (_, other) = tenant_key(&s.st, "globex").await;
    assert_eq!(post_file(&s, &other, one.clone()).await.0, 200);
}

#[sqlx::test(migrations = "./migrations")]
async fn uploads_past_the_concurrency_limit_get_429_with_retry_after(db: PgPool) {
    let s = server(db, &["--max-concurrent-uploads", "1"]).await;
    let (_, key) = tenant_key(&s.st, "acme").await;
    // One upload that holds its slot: headers and a first row, then nothing for a while.
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    let head = format!(
        "POST /v1/files?purpose=fine-tune HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
         Content-Length: 1000\r\n\r\n{{\"text\": \"a\", \"label\": 1}}\n"
    );
    c.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = s
        .http
        .post(s.url("/v1/files?purpose=fine-tune"))
        .bearer_auth(&key)
        .body(tiny_rows(5, 1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "5");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "server_busy", "{v}");
    // The held one is dropped by the body deadline; the slot comes back.
    until_closed(&mut c).await;
    let (status, v) = post_file(&s, &key, tiny_rows(5, 1)).await;
    assert_eq!(status, 200, "{v}");
}

async fn create_job(s: &Server, key: &str) -> String {
    let (status, f) = post_file(s, key, tiny_rows(20, 1)).await;
    assert_eq!(status, 200, "{f}");
    let (st, j) = post_json(
        &s.st,
        "/v1/fine_tuning/jobs",
        Some(key),
        json!({"model": "tiny-bert", "training_file": f["id"],
               "method": {"type": "full", "hyperparameters": {"max_steps": 2}}}),
    )
    .await;
    assert_eq!(st, 200, "{j}");
    j["id"].as_str().unwrap().to_string()
}

async fn open_stream(s: &Server, key: &str, job: &str) -> reqwest::Response {
    s.http
        .get(s.url(&format!("/v1/fine_tuning/jobs/{job}/events")))
        .bearer_auth(key)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap()
}

async fn commits(db: &PgPool) -> i64 {
    sqlx::query_as::<_, (i64,)>(
        "select xact_commit from pg_stat_database where datname = current_database()",
    )
    .fetch_one(db)
    .await
    .unwrap()
    .0
}

#[sqlx::test(migrations = "./migrations")]
async fn event_streams_are_pushed_not_polled_and_capped_per_tenant(db: PgPool) {
    let s = server(db.clone(), &["--max-event-streams", "40"]).await;
    let (_, key) = tenant_key(&s.st, "acme").await;
    let job = create_job(&s, &key).await;
    let mut streams = Vec::new();
    for _ in 0..40 {
        let r = open_stream(&s, &key, &job).await;
        assert_eq!(r.status(), 200);
        streams.push(r);
    }
    // The 41st is refused; another tenant is not affected by this one's streams.
    let r = open_stream(&s, &key, &job).await;
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "too_many_streams", "{v}");
    // Idle streams cost Postgres nothing: 40 streams polling twice a second would commit
    // about 480 transactions in these 3 s. (An idle backend reports its counts up to 10 s
    // late, so the opening queries are let through first.)
    tokio::time::sleep(Duration::from_secs(11)).await;
    let before = commits(&db).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = commits(&db).await - before;
    assert!(idle < 60, "{idle} commits while 40 streams waited");
    // A cancel reaches every stream at once: each gets the event and ends.
    let (st, v) = post_json(
        &s.st,
        &format!("/v1/fine_tuning/jobs/{job}/cancel"),
        Some(&key),
        json!({}),
    )
    .await;
    assert!(st.is_success(), "{v}");
    for r in streams {
        let text = tokio::time::timeout(GUARD, r.text())
            .await
            .unwrap()
            .unwrap();
        assert!(text.contains("cancelled"), "{text}");
    }
    // Closed streams give their slots back.
    let r = open_stream(&s, &key, &job).await;
    assert_eq!(r.status(), 200);
}

#[sqlx::test(migrations = "./migrations")]
async fn metrics_need_the_admin_key_or_an_operator_address(db: PgPool) {
    let s = server(db.clone(), &[]).await;
    let r = s.http.get(s.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = s
        .http
        .get(s.url("/metrics"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // With an operator address, /metrics lives there (no auth) and not on the API.
    let st = state_with(db, &["--metrics-listen", "127.0.0.1:0"], None);
    let (api, _a) = listen(router(st.clone()), limits()).await;
    let (ops, _o) = listen(metrics::operator_router(st), limits()).await;
    let c = reqwest::Client::new();
    let r = c
        .get(format!("http://{api}/metrics"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = c.get(format!("http://{ops}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("sparsegrad_queue_depth"));
}

#[sqlx::test(migrations = "./migrations")]
async fn an_oversize_multipart_field_is_refused_without_being_read_whole(db: PgPool) {
    let s = server(db.clone(), &[]).await;
    let (_, key) = tenant_key(&s.st, "acme").await;
    // A 64 MB `purpose` field before a good file part.
    let b = "XBOUNDARYX";
    let mut body =
        format!("--{b}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n").into_bytes();
    body.extend(std::iter::repeat_n(b'p', 64 << 20));
    body.extend_from_slice(
        format!(
            "\r\n--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"t.jsonl\"\r\n\r\n{}\r\n--{b}--\r\n",
            tiny_rows(5, 1)
        )
        .as_bytes(),
    );
    let r = s
        .http
        .post(s.url("/v1/files"))
        .bearer_auth(&key)
        .header("content-type", format!("multipart/form-data; boundary={b}"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["param"], "purpose", "{v}");
    assert_eq!(v["error"]["code"], "field_too_large", "{v}");
    assert_eq!(file_rows(&db).await, 0);
    assert!(files_in_store(&s).await.is_empty());
}

/// `sparsegrad serve` (API only) as a child process on the test's database.
struct Child {
    proc: std::process::Child,
    addr: SocketAddr,
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.proc.kill();
        let _ = self.proc.wait();
    }
}

async fn spawn_serve(db: &PgPool, data: &std::path::Path) -> Child {
    spawn_serve_with(db, data, &["--workers", "0"]).await
}

async fn spawn_serve_with(db: &PgPool, data: &std::path::Path, extra: &[&str]) -> Child {
    let (name,): (String,) = sqlx::query_as("select current_database()")
        .fetch_one(db)
        .await
        .unwrap();
    let base = std::env::var("DATABASE_URL").unwrap();
    let url = format!("{}/{name}", base.rsplit_once('/').unwrap().0);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proc = std::process::Command::new(env!("CARGO_BIN_EXE_sparsegrad"))
        .args(["serve", "--admin-key", ADMIN])
        .args(extra)
        .arg("--listen")
        .arg(port.to_string())
        .arg("--data-dir")
        .arg(data)
        .env("DATABASE_URL", url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + GUARD;
    loop {
        let up = http.get(format!("http://{port}/healthz")).send().await;
        if up.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "serve did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Child { proc, addr: port }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

#[sqlx::test(migrations = "./migrations")]
async fn a_server_killed_mid_upload_stores_nothing_and_sweeps_the_leftover_at_start(db: PgPool) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut child = spawn_serve(&db, &data).await;
    let st = state_with(db.clone(), &[], None);
    let (_, key) = tenant_key(&st, "acme").await;
    let objects = data.join("objects");
    let c = half_an_upload(child.addr, &key, &objects).await;
    // kill -9 while the upload is half stored.
    child.proc.kill().unwrap();
    child.proc.wait().unwrap();
    drop(c);
    assert_eq!(file_rows(&db).await, 0);
    let left = walk(&objects);
    assert!(
        !left.is_empty() && left.iter().all(|p| p.to_string_lossy().contains('#')),
        "only a staging file, never a visible object: {left:?}"
    );
    // Restarted after the leftover aged past the sweep's hour: it is removed at start, and
    // the tenant's files are as before the crash.
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    for p in &left {
        std::fs::File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
    }
    let child = spawn_serve(&db, &data).await;
    assert_eq!(walk(&objects), Vec::<std::path::PathBuf>::new());
    let r = reqwest::Client::new()
        .get(format!("http://{}/v1/files", child.addr))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["data"], json!([]), "{v}");
}

#[sqlx::test(migrations = "./migrations")]
async fn sigterm_hands_a_running_job_back_checkpointed_and_the_process_exits(db: PgPool) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let models = tmp.path().join("models");
    write_tiny_model_dir(&models.join("tiny-bert"), Arch::Bert, 1).unwrap();
    let mut child = spawn_serve_with(
        &db,
        &data,
        &["--workers", "1", "--models-dir", models.to_str().unwrap()],
    )
    .await;
    let http = reqwest::Client::new();
    let base = format!("http://{}", child.addr);
    let st = state_with(db.clone(), &[], None);
    let (_, key) = tenant_key(&st, "acme").await;
    let f: Value = http
        .post(format!("{base}/v1/files?purpose=fine-tune"))
        .bearer_auth(&key)
        .body(tiny_rows(40, 1))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let job: Value = http
        .post(format!("{base}/v1/fine_tuning/jobs"))
        .bearer_auth(&key)
        .json(&json!({"model": "tiny-bert", "training_file": f["id"],
               "method": {"type": "full", "hyperparameters": {"max_steps": 100000}}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    let step_seen = |db: PgPool, id: String| async move {
        sqlx::query_as::<_, (i64,)>(
            "select count(*) from job_events where job_id = $1 and message like 'step %'",
        )
        .bind(id)
        .fetch_one(&db)
        .await
        .unwrap()
        .0 > 0
    };
    let deadline = tokio::time::Instant::now() + GUARD;
    while !step_seen(db.clone(), id.clone()).await {
        assert!(tokio::time::Instant::now() < deadline, "the job never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = child.proc.id().to_string();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(term.success());
    let exited = tokio::task::spawn_blocking(move || {
        let r = child.proc.wait();
        (r, child)
    });
    let (status, _child) = tokio::time::timeout(GUARD, exited).await.unwrap().unwrap();
    assert!(status.unwrap().success());
    let (status, attempt, ckpts): (String, i32, i64) = sqlx::query_as(
        "select status, attempt, (select count(*) from job_checkpoints c where c.job_id = j.id)
           from jobs j where id = $1",
    )
    .bind(&id)
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!((status.as_str(), attempt), ("queued", 1));
    assert!(ckpts >= 1, "the drain checkpointed the steps done");
    let (handed,): (i64,) = sqlx::query_as(
        "select count(*) from job_events where job_id = $1 and message like 'handed back at shutdown%'",
    )
    .bind(&id)
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(handed, 1);
}
