//! Router tests (a database per test): health, admin (tenants, keys, revocation), auth, and
//! dataset uploads — valid JSONL/CSV, every kind of bad input answered 4xx in the error
//! envelope with the line and field, and nothing stored for a rejected upload.

mod common;

use axum::body::Body;
use axum::http::StatusCode;
use common::api::{assert_envelope, call, post_json, state_with, tenant_key};
use serde_json::json;
use sparsegrad_service::api::AppState;
use sqlx::PgPool;

fn state(db: PgPool, max_upload: u64) -> AppState {
    state_with(db, &["--max-upload-bytes", &max_upload.to_string()], None)
}

async fn stored_objects(st: &AppState) -> usize {
    st.storage.list("tenants").await.unwrap().len()
}

async fn file_rows(db: &PgPool) -> i64 {
    sqlx::query_as::<_, (i64,)>("select count(*) from files")
        .fetch_one(db)
        .await
        .unwrap()
        .0
}

const GOOD: &str =
    "{\"text\": \"a fine film\", \"label\": \"pos\"}\n{\"text\": \"dull\", \"label\": \"neg\"}\n";

#[sqlx::test(migrations = "./migrations")]
async fn health_and_readiness(db: PgPool) {
    let st = state(db, 1 << 20);
    let (s, _, b) = call(&st, "GET", "/healthz", None, Body::empty(), None).await;
    assert_eq!((s, b.as_slice()), (StatusCode::OK, b"ok".as_slice()));
    let (s, _, b) = call(&st, "GET", "/readyz", None, Body::empty(), None).await;
    assert_eq!((s, b.as_slice()), (StatusCode::OK, b"ready".as_slice()));
    // The dashboard: an ETag per file, and 304 when the browser already has it.
    let r = common::api::request(&st, "GET", "/static/app.js", None, Body::empty(), &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    let etag = r.headers["etag"].to_str().unwrap().to_string();
    let r = common::api::request(
        &st,
        "GET",
        "/static/app.js",
        None,
        Body::empty(),
        &[("if-none-match", &etag)],
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    let r = common::api::request(
        &st,
        "GET",
        "/",
        None,
        Body::empty(),
        &[("if-none-match", &etag)],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "another file, another tag");
}

#[sqlx::test(migrations = "./migrations")]
async fn auth_no_key_bad_key_revoked_key_and_admin_routes(db: PgPool) {
    let st = state(db, 1 << 20);
    for key in [None, Some("sg-nope"), Some("")] {
        let (s, v, _) = call(&st, "GET", "/v1/files", key, Body::empty(), None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert_envelope(&v, "authentication_error");
    }
    // Admin routes need the admin key, not a tenant key.
    let (_, key) = tenant_key(&st, "acme").await;
    let (s, v) = post_json(&st, "/v1/admin/tenants", Some(&key), json!({"name": "x"})).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_envelope(&v, "authentication_error");
    let (s, _, _) = call(&st, "GET", "/v1/files", Some(&key), Body::empty(), None).await;
    assert_eq!(s, StatusCode::OK);
    // Revocation takes effect at once.
    let key_id: (String,) = sqlx::query_as("select id from api_keys")
        .fetch_one(&st.db)
        .await
        .unwrap();
    let (s, v) = post_json(
        &st,
        &format!("/v1/admin/api_keys/{}/revoke", key_id.0),
        Some("admin-secret"),
        json!({}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["revoked_at"].is_i64());
    let (s, _, _) = call(&st, "GET", "/v1/files", Some(&key), Body::empty(), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Only hashes are stored.
    let (n,): (i64,) = sqlx::query_as("select count(*) from api_keys where key_sha256 = $1")
        .bind(&key)
        .fetch_one(&st.db)
        .await
        .unwrap();
    assert_eq!(n, 0);
    // Unknown tenant for a key; malformed admin body.
    let (s, v) = post_json(
        &st,
        "/v1/admin/api_keys",
        Some("admin-secret"),
        json!({"tenant_id": "tenant_x"}),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_envelope(&v, "not_found_error");
    let (s, v, _) = call(
        &st,
        "POST",
        "/v1/admin/tenants",
        Some("admin-secret"),
        Body::from("{"),
        Some("application/json"),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_envelope(&v, "invalid_request_error");
}

#[sqlx::test(migrations = "./migrations")]
async fn upload_list_get_content_delete(db: PgPool) {
    let st = state(db, 1 << 20);
    let (_, key) = tenant_key(&st, "acme").await;
    let (s, f, _) = call(
        &st,
        "POST",
        "/v1/files?purpose=fine-tune&filename=train.jsonl",
        Some(&key),
        Body::from(GOOD),
        Some("application/jsonl"),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{f}");
    assert_eq!(f["object"], "file");
    assert_eq!(
        (f["rows"].as_i64(), f["task"].as_str(), f["format"].as_str()),
        (Some(2), Some("classification"), Some("jsonl"))
    );
    let id = f["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("file_"));
    // Multipart, CSV with quoting (a comma and a doubled quote inside a field).
    let csv = "text,label\n\"a \"\"great\"\", long film\",pos\nok,neg\n";
    let boundary = "XyZ";
    let mp = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"t.csv\"\r\nContent-Type: text/csv\r\n\r\n{csv}\r\n--{boundary}--\r\n"
    );
    let (s, f2, _) = call(
        &st,
        "POST",
        "/v1/files",
        Some(&key),
        Body::from(mp),
        Some(&format!("multipart/form-data; boundary={boundary}")),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{f2}");
    assert_eq!(
        (
            f2["filename"].as_str(),
            f2["format"].as_str(),
            f2["rows"].as_i64()
        ),
        (Some("t.csv"), Some("csv"), Some(2))
    );

    let (s, l, _) = call(
        &st,
        "GET",
        "/v1/files?limit=1",
        Some(&key),
        Body::empty(),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (l["object"].as_str(), l["has_more"].as_bool()),
        (Some("list"), Some(true))
    );
    assert_eq!(l["data"][0]["id"], f2["id"], "newest first");
    let (_, l2, _) = call(
        &st,
        "GET",
        &format!("/v1/files?limit=1&after={}", f2["id"].as_str().unwrap()),
        Some(&key),
        Body::empty(),
        None,
    )
    .await;
    assert_eq!(
        (l2["data"][0]["id"].as_str(), l2["has_more"].as_bool()),
        (Some(id.as_str()), Some(false))
    );
    // OpenAI's list parameters: pages up to 10,000, order, purpose; an unknown cursor, a
    // parameter given twice or one the list does not take is a 400 naming it.
    let list = |q: &str| {
        let uri = format!("/v1/files?{q}");
        let (st, key) = (st.clone(), key.clone());
        async move {
            let (s, v, _) = call(&st, "GET", &uri, Some(&key), Body::empty(), None).await;
            (s, v)
        }
    };
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["id"].as_str().unwrap().to_string())
            .collect()
    };
    let (s, v) = list("limit=10000").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(ids(&v), [f2["id"].as_str().unwrap(), id.as_str()]);
    assert_eq!(v["data"][0]["status"], "processed");
    let (_, v) = list("order=asc").await;
    assert_eq!(ids(&v), [id.as_str(), f2["id"].as_str().unwrap()]);
    let (_, v) = list(&format!("order=asc&limit=1&after={id}")).await;
    assert_eq!(ids(&v), [f2["id"].as_str().unwrap()]);
    let (_, v) = list("purpose=fine-tune").await;
    assert_eq!(ids(&v).len(), 2);
    let (_, v) = list("purpose=batch").await;
    assert!(ids(&v).is_empty());
    let (s, v) = list("after=file_000000000000000000000000").await;
    assert_eq!(
        (s, v["error"]["param"].as_str()),
        (StatusCode::NOT_FOUND, Some("after")),
        "{v}"
    );
    assert_eq!(v["error"]["code"], "cursor_not_found");
    for (q, param) in [
        ("limit=10001", "limit"),
        ("limit=0", "limit"),
        ("after=", "after"),
        ("order=sideways", "order"),
        ("order=asc&order=desc", "order"),
        ("metadata[team]=nlp", "metadata[team]"),
        ("colour=blue", "colour"),
    ] {
        let (s, v) = list(q).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{q}: {v}");
        assert_eq!(v["error"]["param"], param, "{q}: {v}");
    }

    let (s, g, _) = call(
        &st,
        "GET",
        &format!("/v1/files/{id}"),
        Some(&key),
        Body::empty(),
        None,
    )
    .await;
    assert_eq!((s, g["id"].as_str()), (StatusCode::OK, Some(id.as_str())));
    let (s, _, body) = call(
        &st,
        "GET",
        &format!("/v1/files/{id}/content"),
        Some(&key),
        Body::empty(),
        None,
    )
    .await;
    assert_eq!((s, body.as_slice()), (StatusCode::OK, GOOD.as_bytes()));

    // Another tenant sees nothing of it.
    let (_, other) = tenant_key(&st, "globex").await;
    for (m, u) in [
        ("GET", format!("/v1/files/{id}")),
        ("GET", format!("/v1/files/{id}/content")),
        ("DELETE", format!("/v1/files/{id}")),
    ] {
        let (s, v, _) = call(&st, m, &u, Some(&other), Body::empty(), None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{m} {u}");
        assert_envelope(&v, "not_found_error");
        assert!(!v.to_string().contains("acme"));
    }
    let (_, l, _) = call(&st, "GET", "/v1/files", Some(&other), Body::empty(), None).await;
    assert_eq!(l["data"].as_array().unwrap().len(), 0);

    let (s, d, _) = call(
        &st,
        "DELETE",
        &format!("/v1/files/{id}"),
        Some(&key),
        Body::empty(),
        None,
    )
    .await;
    assert_eq!((s, d["deleted"].as_bool()), (StatusCode::OK, Some(true)));
    let (s, _, _) = call(
        &st,
        "GET",
        &format!("/v1/files/{id}"),
        Some(&key),
        Body::empty(),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(stored_objects(&st).await, 1);
}

#[sqlx::test(migrations = "./migrations")]
async fn bad_uploads_are_refused_with_line_and_field_and_store_nothing(db: PgPool) {
    let st = state(db.clone(), 4096);
    let (_, key) = tenant_key(&st, "acme").await;
    let cases: Vec<(&str, Vec<u8>, StatusCode, &str)> = vec![
        (
            "malformed JSON",
            b"{\"text\": \"ok\", \"label\": 1}\n{\"text\": \"oops\"\n".to_vec(),
            StatusCode::BAD_REQUEST,
            "line 2",
        ),
        (
            "wrong schema",
            b"{\"text\": \"ok\", \"label\": 1}\n{\"text\": \"fine\"}\n".to_vec(),
            StatusCode::BAD_REQUEST,
            "label",
        ),
        (
            "invalid UTF-8",
            b"{\"text\": \"ok\", \"label\": 1}\n{\"text\": \"\xff\xfe\", \"label\": 0}\n".to_vec(),
            StatusCode::BAD_REQUEST,
            "line 2",
        ),
        ("empty", b"".to_vec(), StatusCode::BAD_REQUEST, "empty"),
        (
            "blank",
            b"\n  \n".to_vec(),
            StatusCode::BAD_REQUEST,
            "empty",
        ),
        (
            "oversize",
            GOOD.repeat(200).into_bytes(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "exceeds",
        ),
        (
            "CSV unterminated quote",
            b"text,label\n\"open,pos\nx,neg\n".to_vec(),
            StatusCode::BAD_REQUEST,
            "line",
        ),
        (
            "CSV missing column",
            b"text\nhello\n".to_vec(),
            StatusCode::BAD_REQUEST,
            "label",
        ),
        (
            "mixed kinds",
            b"{\"text\": \"ok\", \"label\": 1}\n{\"prompt\": \"p\", \"completion\": \"c\"}\n"
                .to_vec(),
            StatusCode::BAD_REQUEST,
            "line 2",
        ),
    ];
    for (what, body, want, needle) in cases {
        let (s, v, _) = call(
            &st,
            "POST",
            "/v1/files",
            Some(&key),
            Body::from(body),
            Some("application/jsonl"),
        )
        .await;
        assert_eq!(s, want, "{what}: {v}");
        assert_envelope(&v, "invalid_request_error");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{what}: `{msg}` lacks `{needle}`");
        assert_eq!(v["error"]["param"], "file", "{what}");
    }
    let (s, v, _) = call(
        &st,
        "POST",
        "/v1/files?purpose=assistants",
        Some(&key),
        Body::from(GOOD),
        None,
    )
    .await;
    assert_eq!(
        (s, v["error"]["param"].as_str()),
        (StatusCode::BAD_REQUEST, Some("purpose"))
    );
    assert_eq!(
        stored_objects(&st).await,
        0,
        "a rejected upload left an object"
    );
    assert_eq!(file_rows(&db).await, 0, "a rejected upload left a row");
}

/// `(METHOD, path)` pairs of openapi.yaml, read off its `paths:` block.
fn spec_routes() -> Vec<(String, String)> {
    let spec = sparsegrad_service::api::health::OPENAPI;
    let mut out = Vec::new();
    let mut in_paths = false;
    let mut path = String::new();
    for line in spec.lines() {
        if line == "paths:" {
            in_paths = true;
            continue;
        }
        if !in_paths {
            continue;
        }
        if let Some(p) = line.strip_prefix("  ").filter(|l| l.starts_with('/')) {
            path = p.trim_end_matches(':').to_string();
        } else if let Some(m) = line.strip_prefix("    ").and_then(|l| l.strip_suffix(':')) {
            if ["get", "post", "put", "patch", "delete"].contains(&m) {
                out.push((m.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

/// Every route the router serves (kept beside the spec: a route added to one and not the
/// other fails below).
const ROUTED: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/openapi.yaml"),
    ("POST", "/v1/admin/tenants"),
    ("POST", "/v1/admin/api_keys"),
    ("POST", "/v1/admin/api_keys/{id}/revoke"),
    ("GET", "/v1/files"),
    ("POST", "/v1/files"),
    ("GET", "/v1/files/{id}"),
    ("DELETE", "/v1/files/{id}"),
    ("GET", "/v1/files/{id}/content"),
    ("GET", "/metrics"),
    ("GET", "/"),
    ("GET", "/static/{file}"),
    ("GET", "/v1/models"),
    ("POST", "/v1/models"),
    ("GET", "/v1/models/{id}"),
    ("GET", "/v1/methods"),
    ("GET", "/v1/methods/{id}"),
    ("GET", "/v1/fine_tuning/jobs"),
    ("POST", "/v1/fine_tuning/jobs"),
    ("GET", "/v1/fine_tuning/jobs/{id}"),
    ("POST", "/v1/fine_tuning/jobs/estimate"),
    ("POST", "/v1/fine_tuning/jobs/{id}/cancel"),
    ("POST", "/v1/fine_tuning/jobs/{id}/pause"),
    ("POST", "/v1/fine_tuning/jobs/{id}/resume"),
    ("GET", "/v1/fine_tuning/jobs/{id}/events"),
    ("GET", "/v1/fine_tuning/jobs/{id}/metrics"),
    ("GET", "/v1/fine_tuning/jobs/{id}/checkpoints"),
    ("GET", "/v1/fine_tuning/jobs/{id}/artifacts"),
    (
        "GET",
        "/v1/fine_tuning/jobs/{id}/artifacts/{artifact_id}/content",
    ),
    ("POST", "/v1/fine_tuning/jobs/{id}/merge"),
    ("POST", "/v1/fine_tuning/jobs/{id}/predict"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/webhooks"),
    ("POST", "/v1/webhooks"),
    ("GET", "/v1/webhooks/{id}"),
    ("DELETE", "/v1/webhooks/{id}"),
    ("GET", "/v1/webhooks/{id}/deliveries"),
];

#[sqlx::test(migrations = "./migrations")]
async fn every_spec_path_is_routed_and_every_route_is_in_the_spec(db: PgPool) {
    let st = state(db, 1 << 20);
    let mut spec = spec_routes();
    let mut routed: Vec<(String, String)> = ROUTED
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    spec.sort();
    routed.sort();
    assert_eq!(spec, routed, "openapi.yaml and the router disagree");
    for (m, p) in &spec {
        let uri = p
            .replace("{id}", "x_does_not_exist")
            .replace("{artifact_id}", "art_x")
            .replace("{file}", "app.js");
        let (s, v, _) = call(&st, m, &uri, None, Body::empty(), None).await;
        // Unrouted: the router's own 404/405, which the envelope names as such.
        let code = v["error"]["code"].as_str().unwrap_or_default();
        let bare = matches!(code, "unknown_route" | "method_not_allowed");
        assert!(!bare, "{m} {p} is in the spec but not routed ({s}: {v})");
    }
    // And a path in neither is not routed.
    let (s, v, _) = call(&st, "GET", "/v1/nothing", None, Body::empty(), None).await;
    assert!(
        s == StatusCode::NOT_FOUND && v["error"]["code"] == "unknown_route",
        "{s}: {v}"
    );
    let (s, _, body) = call(&st, "GET", "/openapi.yaml", None, Body::empty(), None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(String::from_utf8(body)
        .unwrap()
        .starts_with("openapi: 3.1.0"));
}
