//! Driving the router in-process: a state over a per-test database, requests with a key,
//! tenants and keys through the admin API, the error-envelope check.

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

/// A state with the admin key, `extra` flags, and `storage` (default: in memory).
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
    AppState::new(db, storage, Arc::new(cfg))
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
