//! Driving the API over real HTTP: a state over a per-test database served by the production
//! listener on a local port, requests with a key, tenants and keys through the admin API, the
//! error-envelope check. (A state not served that way is driven through the router
//! in-process.)

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use clap::Parser;
use serde_json::{json, Value};
use sparsegrad_service::api::{router, AppState};
use sparsegrad_service::config::Config;
use sparsegrad_service::storage::{S3Settings, Storage};
use sqlx::PgPool;
use tower::ServiceExt;

#[derive(Parser)]
struct Wrap {
    #[command(flatten)]
    cfg: Config,
}

pub const ADMIN: &str = "admin-secret";

/// A state with the admin key, `extra` flags, and `storage` (default: in memory), served
/// over real HTTP on a local port (every request helper goes there).
pub fn state_with(db: PgPool, extra: &[&str], storage: Option<Storage>) -> AppState {
    let mut args = vec![
        "x",
        "--database-url",
        "postgres://unused",
        "--admin-key",
        ADMIN,
    ];
    args.extend_from_slice(extra);
    let cfg = Wrap::parse_from(args).cfg;
    let storage =
        storage.unwrap_or_else(|| Storage::from_url("memory://", &S3Settings::default()).unwrap());
    let st = AppState::new(db, storage, Arc::new(cfg));
    serve_over_http(&st);
    st
}

/// States served on a local port, and where (the config's `Arc` identifies the state and,
/// held here, is never reused for another).
static SERVED: std::sync::Mutex<Vec<(Arc<Config>, std::net::SocketAddr)>> =
    std::sync::Mutex::new(Vec::new());

/// Serves `st` with the production listener (`http::serve`, default limits) on a local port;
/// from then on every request helper reaches it over real HTTP. Call inside the test's runtime.
pub fn serve_over_http(st: &AppState) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap();
    let l = tokio::net::TcpListener::from_std(l).unwrap();
    let limits = sparsegrad_service::http::HttpLimits {
        max_connections: 1024,
        header_timeout: std::time::Duration::from_secs(15),
        body_idle_timeout: std::time::Duration::from_secs(30),
        drain: std::time::Duration::from_secs(1),
    };
    // The sender goes at once: the server runs until the test's runtime ends.
    let (_, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(sparsegrad_service::http::serve(
        l,
        router(st.clone()),
        limits,
        stop,
    ));
    SERVED.lock().unwrap().push((st.cfg.clone(), addr));
}

pub fn served(st: &AppState) -> Option<std::net::SocketAddr> {
    let s = SERVED.lock().unwrap();
    s.iter()
        .find(|(c, _)| Arc::ptr_eq(c, &st.cfg))
        .map(|(_, a)| *a)
}

async fn over_http(
    addr: std::net::SocketAddr,
    method: &str,
    uri: &str,
    key: Option<&str>,
    body: Body,
    headers: &[(&str, &str)],
) -> Resp {
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = reqwest::Client::new().request(method, format!("http://{addr}{uri}"));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    for (h, v) in headers {
        req = req.header(*h, *v);
    }
    let r = req.body(body).send().await.unwrap();
    let status = r.status();
    let headers = r.headers().clone();
    let bytes = r.bytes().await.unwrap().to_vec();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Resp {
        status,
        headers,
        json,
        bytes,
    }
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub json: Value,
    pub bytes: Vec<u8>,
}

pub async fn request(
    st: &AppState,
    method: &str,
    uri: &str,
    key: Option<&str>,
    body: Body,
    headers: &[(&str, &str)],
) -> Resp {
    if let Some(addr) = served(st) {
        return over_http(addr, method, uri, key, body, headers).await;
    }
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    for (h, v) in headers {
        req = req.header(*h, *v);
    }
    let resp = router(st.clone())
        .oneshot(req.body(body).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 28)
        .await
        .unwrap()
        .to_vec();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Resp {
        status,
        headers,
        json,
        bytes,
    }
}

pub async fn call(
    st: &AppState,
    method: &str,
    uri: &str,
    key: Option<&str>,
    body: Body,
    ctype: Option<&str>,
) -> (StatusCode, Value, Vec<u8>) {
    let h: Vec<(&str, &str)> = ctype.map(|c| ("content-type", c)).into_iter().collect();
    let r = request(st, method, uri, key, body, &h).await;
    (r.status, r.json, r.bytes)
}

pub async fn get(st: &AppState, uri: &str, key: &str) -> (StatusCode, Value) {
    let (s, v, _) = call(st, "GET", uri, Some(key), Body::empty(), None).await;
    (s, v)
}

pub async fn delete(st: &AppState, uri: &str, key: &str) -> Resp {
    request(st, "DELETE", uri, Some(key), Body::empty(), &[]).await
}

pub async fn post_json(
    st: &AppState,
    uri: &str,
    key: Option<&str>,
    v: Value,
) -> (StatusCode, Value) {
    let (s, v, _) = call(
        st,
        "POST",
        uri,
        key,
        Body::from(v.to_string()),
        Some("application/json"),
    )
    .await;
    (s, v)
}

/// A tenant and a live key for it.
pub async fn tenant_key(st: &AppState, name: &str) -> (String, String) {
    let (s, t) = post_json(st, "/v1/admin/tenants", Some(ADMIN), json!({"name": name})).await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    let tid = t["id"].as_str().unwrap().to_string();
    let (s, k) = post_json(
        st,
        "/v1/admin/api_keys",
        Some(ADMIN),
        json!({"tenant_id": tid}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{k}");
    (tid, k["key"].as_str().unwrap().to_string())
}

pub fn assert_envelope(v: &Value, kind: &str) {
    let e = &v["error"];
    assert_eq!(e["type"], kind, "{v}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
}

/// Uploads a dataset as a raw body; the file object.
pub async fn upload(st: &AppState, key: &str, name: &str, data: &str) -> Value {
    let (s, v, _) = call(
        st,
        "POST",
        &format!("/v1/files?purpose=fine-tune&filename={name}"),
        Some(key),
        Body::from(data.to_string()),
        Some("application/octet-stream"),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v
}

/// A worker context over `st`'s database and storage, working under `dir`, on the CPU, with a
/// quick heartbeat (each test runs the worker itself with `try_run_one`).
pub fn worker_ctx(st: &AppState, dir: &std::path::Path) -> sparsegrad_service::worker::WorkerCtx {
    sparsegrad_service::worker::WorkerCtx {
        db: st.db.clone(),
        storage: st.storage.clone(),
        queue: sparsegrad_service::queue::QueueConfig::default(),
        worker_id: "w1".into(),
        work_dir: dir.join("work"),
        heartbeat: std::time::Duration::from_millis(50),
        cancels: sparsegrad_service::db::listen::JobSignals::new(
            st.db.clone(),
            sparsegrad_service::queue::CANCEL_CHANNEL,
        ),
        drain: tokio::sync::watch::channel(false).1,
        cache_dir: None,
        model_cache: dir.join("model-cache"),
        device: candle_core::Device::Cpu,
    }
}
