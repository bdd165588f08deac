//! A hostile tenant against the API over real HTTP (the production listener on a local port,
//! real Postgres, real object storage on disk): model sources, untrusted model files and
//! templates, bounds, quotas and lifecycle rules. Each test is one attack that used to succeed
//! and must now get a clear 4xx and leave nothing behind. Attacks on the listener itself
//! (connections, bodies, streams) are in `hostile_http.rs`.

mod common;

use axum::http::StatusCode;
use common::api::{
    assert_envelope, delete, get, post_json, request, state_with, tenant_key, upload,
};
use common::tiny_rows;
use serde_json::{json, Value};
use sparsegrad_engine::models::Arch;
use sparsegrad_engine::testing::gguf::{with, V};
use sparsegrad_engine::testing::write_tiny_model_dir;
use sparsegrad_service::api::AppState;
use sparsegrad_service::storage::{S3Settings, Storage};
use sparsegrad_service::worker::{try_run_one, Outcome, WorkerCtx};
use sqlx::PgPool;

struct Env {
    tmp: tempfile::TempDir,
    st: AppState,
}

fn env(db: PgPool) -> Env {
    env_with(db, &[])
}

/// A state with a models folder holding `tiny-bert`, and `extra` flags.
fn env_with(db: PgPool, extra: &[&str]) -> Env {
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
    Env { tmp, st }
}

async fn job_count(db: &PgPool) -> i64 {
    sqlx::query_as::<_, (i64,)>("select count(*) from jobs")
        .fetch_one(db)
        .await
        .unwrap()
        .0
}

async fn model_rows(db: &PgPool) -> i64 {
    sqlx::query_as::<_, (i64,)>("select count(*) from models")
        .fetch_one(db)
        .await
        .unwrap()
        .0
}

/// POSTs `body` to `/v1/fine_tuning/jobs{tail}` as the tenant of `key`.
async fn jobs_post(st: &AppState, key: &str, tail: &str, body: Value) -> (StatusCode, Value) {
    let uri = format!("/v1/fine_tuning/jobs{tail}");
    post_json(st, &uri, Some(key), body).await
}

async fn register(st: &AppState, key: &str, source: Value) -> (StatusCode, Value) {
    post_json(
        st,
        "/v1/models",
        Some(key),
        json!({"id": "m1", "source": source}),
    )
    .await
}

#[sqlx::test(migrations = "./migrations")]
async fn an_uploaded_dataset_can_never_be_a_model_source(db: PgPool) {
    let e = env(db.clone());
    let st = &e.st;
    let (tenant, key) = tenant_key(st, "acme").await;
    // A file that is a valid dataset; as a GGUF source it must be refused by where it lives,
    // whatever its bytes are.
    let f = upload(st, &key, "poly.csv", "text,label\nhello,cat\nworld,dog\n").await;
    let file_key = format!("tenants/{tenant}/files/{}", f["id"].as_str().unwrap());
    for source in [
        json!({"type": "gguf", "key": file_key}),
        json!({"type": "storage", "prefix": format!("tenants/{tenant}/files")}),
        json!({"type": "storage", "prefix": format!("tenants/{tenant}/files/")}),
    ] {
        let (s, v) = register(st, &key, source.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{source}: {v}");
        assert_envelope(&v, "invalid_request_error");
        assert!(v["error"]["param"].as_str().unwrap().starts_with("source."));
    }
    assert_eq!(model_rows(&db).await, 0);
}

#[sqlx::test(migrations = "./migrations")]
async fn malformed_gguf_files_are_400s_naming_the_problem(db: PgPool) {
    let e = env(db.clone());
    let st = &e.st;
    let (_, key) = tenant_key(st, "acme").await;
    for (bytes, want) in [
        (
            with("llama.attention.head_count", V::U32(0)),
            "head_count",
        ),
        (with("general.alignment", V::U32(0)), "alignment"),
        (
            with("tokenizer.ggml.tokens", V::ClaimedStrs(1 << 40)),
            "exceeds the file",
        ),
        (
            with(
                "tokenizer.chat_template",
                V::Str("{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}"),
            ),
            "fuel",
        ),
    ] {
        st.storage.put("imports/bad.gguf", bytes.into()).await.unwrap();
        let (s, v) = register(st, &key, json!({"type": "gguf", "key": "imports/bad.gguf"})).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{want}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(want), "{want}: {msg}");
        // No server path reaches the tenant.
        assert!(!msg.contains(e.tmp.path().to_str().unwrap()), "{msg}");
        assert!(!msg.contains("/work/") && !msg.contains("data/work"), "{msg}");
    }
    assert_eq!(model_rows(&db).await, 0);
    assert!(st.storage.list("tenants").await.unwrap().is_empty());
}

#[sqlx::test(migrations = "./migrations")]
async fn a_template_bomb_or_an_oversize_config_in_a_stored_model_is_refused(db: PgPool) {
    let e = env(db.clone());
    let st = &e.st;
    let (_, key) = tenant_key(st, "acme").await;
    let dir = e.tmp.path().join("tiny-llama");
    write_tiny_model_dir(&dir, Arch::Llama, 1).unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        st.storage
            .put_file(&format!("models/bomb/{f}"), &dir.join(f))
            .await
            .unwrap();
    }
    let put = |name: &str, bytes: Vec<u8>| {
        let key = format!("models/bomb/{name}");
        async move { st.storage.put(&key, bytes.into()).await.unwrap() }
    };
    let try_register = || {
        register(
            st,
            &key,
            json!({"type": "storage", "prefix": "models/bomb"}),
        )
    };
    let bomb = json!({"eos_token": "<eos>", "chat_template":
        "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}x{% endfor %}{% endfor %}{% endfor %}"});
    put("tokenizer_config.json", bomb.to_string().into()).await;
    let (s, v) = try_register().await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("fuel"),
        "{v}"
    );
    // The same folder with a sane template but a config.json past 1 MiB: refused unread.
    let sane = json!({"eos_token": "<eos>"});
    put("tokenizer_config.json", sane.to_string().into()).await;
    let config = std::fs::read(dir.join("config.json")).unwrap();
    let mut padded = config.clone();
    padded.extend(std::iter::repeat_n(b' ', 2 << 20));
    put("config.json", padded).await;
    let (s, v) = try_register().await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["param"], "source.prefix", "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("larger than"), "{v}");
    assert_eq!(model_rows(&db).await, 0);
    // With its real config it registers.
    put("config.json", config).await;
    let (s, v) = try_register().await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(model_rows(&db).await, 1);
}

#[sqlx::test(migrations = "./migrations")]
async fn unbounded_work_is_refused_naming_the_field(db: PgPool) {
    let e = env(db.clone());
    let st = &e.st;
    let (_, key) = tenant_key(st, "acme").await;
    let f = upload(st, &key, "t.jsonl", &tiny_rows(20, 1)).await;
    let tid = f["id"].as_str().unwrap();
    for (hp, param) in [
        (
            json!({"max_steps": 1e18}),
            "method.hyperparameters.max_steps",
        ),
        (
            json!({"max_steps": 1_000_001}),
            "method.hyperparameters.max_steps",
        ),
        (
            json!({"batch_size": 1u64 << 40}),
            "method.hyperparameters.batch_size",
        ),
        (
            json!({"grad_accum": 1u64 << 40}),
            "method.hyperparameters.grad_accum",
        ),
        (
            json!({"n_epochs": 1_000_000}),
            "method.hyperparameters.n_epochs",
        ),
        (
            json!({"n_epochs": "forever"}),
            "method.hyperparameters.n_epochs",
        ),
        (
            json!({"warmup_ratio": 1e300}),
            "method.hyperparameters.warmup_ratio",
        ),
        (
            json!({"k": 1_000_000_000_000u64}),
            "method.hyperparameters.k",
        ),
        (
            json!({"basis_steps": 1_000_000_000_000u64}),
            "method.hyperparameters.basis_steps",
        ),
        (
            json!({"eval_every": 0}),
            "method.hyperparameters.eval_every",
        ),
    ] {
        let body = json!({"model": "tiny-bert", "training_file": tid,
                          "method": {"type": "sparsegrad", "hyperparameters": hp}});
        let (s, v) = jobs_post(st, &key, "", body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{hp}: {v}");
        assert_eq!(v["error"]["param"], param, "{hp}: {v}");
    }
    for task in [
        json!("bogus"),
        json!("x".repeat(100_000)),
        json!("causal-lm"),
    ] {
        let body = json!({"model": "tiny-bert", "training_file": tid, "task": task});
        let (s, v) = jobs_post(st, &key, "", body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert_eq!(v["error"]["param"], "task", "{v}");
    }
    assert_eq!(job_count(&db).await, 0);
}

#[sqlx::test(migrations = "./migrations")]
async fn a_tenant_at_its_active_job_limit_gets_429_and_replays_still_answer(db: PgPool) {
    let e = env_with(db.clone(), &["--max-active-jobs", "2"]);
    let st = &e.st;
    let (_, key) = tenant_key(st, "acme").await;
    let (_, other) = tenant_key(st, "rival").await;
    let f = upload(st, &key, "t.jsonl", &tiny_rows(20, 1)).await;
    let body = json!({"model": "tiny-bert", "training_file": f["id"]});
    let create = |k: &str, idem: &str| {
        let (st, body, k, idem) = (st.clone(), body.clone(), k.to_string(), idem.to_string());
        async move {
            request(
                &st,
                "POST",
                "/v1/fine_tuning/jobs",
                Some(&k),
                axum::body::Body::from(body.to_string()),
                &[
                    ("content-type", "application/json"),
                    ("idempotency-key", &idem),
                ],
            )
            .await
        }
    };
    let first = create(&key, "a").await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.json);
    assert_eq!(create(&key, "b").await.status, StatusCode::OK);
    let third = create(&key, "c").await;
    assert_eq!(
        third.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        third.json
    );
    assert_envelope(&third.json, "rate_limit_error");
    assert_eq!(third.headers["retry-after"], "60");
    // A replay of a job that exists is not new work: answered with that job.
    let replay = create(&key, "a").await;
    assert_eq!(replay.status, StatusCode::OK);
    assert_eq!(replay.json["id"], first.json["id"]);
    // Another tenant's limit is its own.
    let g = upload(st, &other, "t.jsonl", &tiny_rows(20, 2)).await;
    let (s, v) = jobs_post(
        st,
        &other,
        "",
        json!({"model": "tiny-bert", "training_file": g["id"]}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // A cancelled job frees its place.
    let id = first.json["id"].as_str().unwrap();
    let (s, _) = jobs_post(st, &key, &format!("/{id}/cancel"), json!({})).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(create(&key, "d").await.status, StatusCode::OK);
    assert_eq!(job_count(&db).await, 4);
}

/// A worker on the same database and storage as `e`.
fn worker(e: &Env) -> WorkerCtx {
    common::api::worker_ctx(&e.st, e.tmp.path())
}

/// A succeeded fine-tune of tiny-bert: its id.
async fn succeeded_job(e: &Env, key: &str) -> String {
    let f = upload(&e.st, key, "t.jsonl", &tiny_rows(24, 1)).await;
    let body = json!({"model": "tiny-bert", "training_file": f["id"],
        "method": {"type": "lora", "hyperparameters": {"max_steps": 2, "batch_size": 4, "max_seq_len": 16}}});
    let (s, j) = jobs_post(&e.st, key, "", body).await;
    assert_eq!(s, StatusCode::OK, "{j}");
    match try_run_one(&worker(e)).await.unwrap() {
        Outcome::Ran { status, .. } => assert_eq!(status, "succeeded"),
        other => panic!("{other:?}"),
    }
    j["id"].as_str().unwrap().to_string()
}

#[sqlx::test(migrations = "./migrations")]
async fn a_file_a_queued_job_reads_cannot_be_deleted(db: PgPool) {
    let e = env(db.clone());
    let st = &e.st;
    let (_, key) = tenant_key(st, "acme").await;
    let f = upload(st, &key, "t.jsonl", &tiny_rows(20, 1)).await;
    let fid = f["id"].as_str().unwrap();
    let (_, j) = jobs_post(
        st,
        &key,
        "",
        json!({"model": "tiny-bert", "training_file": fid}),
    )
    .await;
    let jid = j["id"].as_str().unwrap();
    let r = delete(st, &format!("/v1/files/{fid}"), &key).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.json);
    assert_eq!(r.json["error"]["code"], "file_in_use");
    assert!(r.json["error"]["message"].as_str().unwrap().contains(jid));
    // Once the job is over, the file can go.
    jobs_post(st, &key, &format!("/{jid}/cancel"), json!({})).await;
    let r = delete(st, &format!("/v1/files/{fid}"), &key).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
}

#[sqlx::test(migrations = "./migrations")]
async fn a_failed_merge_can_be_asked_again_and_a_merge_id_is_not_a_job(db: PgPool) {
    let e = env(db.clone());
    let st = &e.st;
    let (_, key) = tenant_key(st, "acme").await;
    let id = succeeded_job(&e, &key).await;
    let (s, m1) = jobs_post(st, &key, &format!("/{id}/merge"), json!({})).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{m1}");
    let mid = m1["id"].as_str().unwrap();
    // A merge's id is not a fine-tuning job: 404, and the merge is untouched.
    let (s, v) = jobs_post(st, &key, &format!("/{mid}/cancel"), json!({})).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (_, j) = get(st, &format!("/v1/fine_tuning/jobs/{id}"), &key).await;
    assert_eq!(j["merge"]["status"], "queued");
    // Asking again while it is live answers the same merge.
    let (s, again) = jobs_post(st, &key, &format!("/{id}/merge"), json!({})).await;
    assert_eq!((s, again["id"].clone()), (StatusCode::OK, m1["id"].clone()));
    // The merge fails (its worker gave up): a new one may be asked for, and is shown.
    sqlx::query("update jobs set status = 'failed', finished_at = now() where id = $1")
        .bind(mid)
        .execute(&db)
        .await
        .unwrap();
    let (s, m2) = jobs_post(st, &key, &format!("/{id}/merge"), json!({})).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{m2}");
    assert_ne!(m2["id"], m1["id"]);
    let (_, j) = get(st, &format!("/v1/fine_tuning/jobs/{id}"), &key).await;
    assert_eq!(
        (j["merge"]["id"].clone(), j["merge"]["status"].clone()),
        (m2["id"].clone(), json!("queued"))
    );
    match try_run_one(&worker(&e)).await.unwrap() {
        Outcome::Ran { status, .. } => assert_eq!(status, "succeeded"),
        other => panic!("{other:?}"),
    }
}

#[sqlx::test(migrations = "./migrations")]
async fn forty_concurrent_first_predictions_all_succeed(db: PgPool) {
    // The predict gate opened wide: this is about the shared download, not the gate.
    let e = env_with(
        db.clone(),
        &[
            "--max-concurrent-predicts",
            "40",
            "--inference-max-per-tenant",
            "40",
        ],
    );
    let (_, key) = tenant_key(&e.st, "acme").await;
    let id = succeeded_job(&e, &key).await;
    let body = json!({"inputs": [{"text": "a good film"}]});
    let calls = (0..40).map(|_| {
        let (st, key, body) = (e.st.clone(), key.clone(), body.clone());
        let uri = format!("/v1/fine_tuning/jobs/{id}/predict");
        async move { post_json(&st, &uri, Some(&key), body).await }
    });
    for (s, v) in futures::future::join_all(calls).await {
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    // The model was loaded once; no temporary download was left behind.
    assert_eq!(e.st.inference.loads(), 1);
    let deltas = e.tmp.path().join("data/cache/deltas");
    let names: Vec<String> = std::fs::read_dir(&deltas)
        .unwrap()
        .map(|d| d.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].ends_with(".safetensors"));
}

#[sqlx::test(migrations = "./migrations")]
async fn predictions_past_the_concurrency_limit_get_429_not_a_queue(db: PgPool) {
    let e = env_with(db.clone(), &["--max-concurrent-predicts", "1"]);
    let (_, key) = tenant_key(&e.st, "acme").await;
    let id = succeeded_job(&e, &key).await;
    let body = json!({"inputs": [{"text": "a good film"}]});
    let calls = (0..8).map(|_| {
        let (st, key, body) = (e.st.clone(), key.clone(), body.clone());
        let uri = format!("/v1/fine_tuning/jobs/{id}/predict");
        async move { post_json(&st, &uri, Some(&key), body).await }
    });
    let got = futures::future::join_all(calls).await;
    assert!(got.iter().any(|(s, _)| *s == StatusCode::OK), "{got:?}");
    let busy: Vec<_> = got.iter().filter(|(s, _)| *s != StatusCode::OK).collect();
    assert!(!busy.is_empty(), "8 at once past a limit of 1: {got:?}");
    for (s, v) in busy {
        assert_eq!(*s, StatusCode::TOO_MANY_REQUESTS, "{v}");
        assert_eq!(v["error"]["code"], "server_busy", "{v}");
    }
}

#[sqlx::test(migrations = "./migrations")]
async fn made_up_http_methods_share_one_metrics_series(db: PgPool) {
    let e = env(db);
    for i in 0..50 {
        request(
            &e.st,
            &format!("FOO{i}"),
            "/healthz",
            None,
            axum::body::Body::empty(),
            &[],
        )
        .await;
    }
    let r = request(
        &e.st,
        "GET",
        "/metrics",
        Some(common::api::ADMIN),
        axum::body::Body::empty(),
        &[],
    )
    .await;
    let text = String::from_utf8(r.bytes).unwrap();
    assert!(!text.contains("FOO"), "{text}");
    assert!(text.contains("method=\"OTHER\""), "{text}");
}

#[sqlx::test(migrations = "./migrations")]
async fn nul_bytes_and_control_characters_are_not_500s(db: PgPool) {
    let e = env(db);
    let st = &e.st;
    let (_, key) = tenant_key(st, "acme").await;
    // A NUL in an id, a cursor and a tenant name: 400 naming the parameter, never a 500.
    for (uri, param) in [
        ("/v1/files/file_%00x", "id"),
        ("/v1/fine_tuning/jobs/ftjob_%00", "id"),
        (
            "/v1/fine_tuning/jobs/ftjob_x/artifacts/art_%00/content",
            "artifact_id",
        ),
        ("/v1/files?after=a%00b", "after"),
    ] {
        let (s, v) = get(st, uri, &key).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{uri}: {v}");
        assert_eq!(v["error"]["param"], param, "{uri}: {v}");
    }
    let (s, v) = post_json(
        st,
        "/v1/admin/tenants",
        Some(common::api::ADMIN),
        json!({"name": "a\u{0}b"}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    // File names are stored printable and bounded.
    let long = format!("a%0D%0Ab{}", "x".repeat(20_000));
    let f = upload(st, &key, &long, &tiny_rows(5, 1)).await;
    let name = f["filename"].as_str().unwrap();
    assert!(
        name.len() <= 255 && !name.contains('\r') && !name.contains('\n'),
        "{name}"
    );
}

#[sqlx::test(migrations = "./migrations")]
async fn concurrent_imports_of_one_id_leave_exactly_one_complete_model(db: PgPool) {
    let e = env_with(db.clone(), &["--max-concurrent-imports", "6"]);
    let (tenant, key) = tenant_key(&e.st, "acme").await;
    let (kvs, tensors) = sparsegrad_engine::testing::gguf::base();
    let file = sparsegrad_engine::testing::gguf::build(&kvs, &tensors);
    e.st.storage
        .put("imports/m.gguf", file.into())
        .await
        .unwrap();
    let calls = (0..6).map(|_| {
        let (st, key) = (e.st.clone(), key.clone());
        async move { register(&st, &key, json!({"type": "gguf", "key": "imports/m.gguf"})).await }
    });
    let results = futures::future::join_all(calls).await;
    let ok: Vec<_> = results
        .iter()
        .filter(|(s, _)| *s == StatusCode::OK)
        .collect();
    assert_eq!(ok.len(), 1, "{results:?}");
    assert!(results
        .iter()
        .all(|(s, _)| *s == StatusCode::OK || *s == StatusCode::CONFLICT));
    assert_eq!(model_rows(&db).await, 1);
    // The winner's files are all there, and nothing of the losers'.
    let keys =
        e.st.storage
            .list(&format!("tenants/{tenant}/models/m1"))
            .await
            .unwrap();
    let configs = keys.iter().filter(|k| k.ends_with("/config.json")).count();
    assert_eq!(configs, 1, "{keys:?}");
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        assert!(
            keys.iter().any(|k| k.ends_with(&format!("/{f}"))),
            "{f} in {keys:?}"
        );
    }
}

/// What the framework answers by itself — unknown routes and methods, a query it cannot
/// parse, a body past the limit — comes back in the error envelope, naming the parameter
/// where there is one, as every handler's errors do.
#[sqlx::test(migrations = "./migrations")]
async fn framework_errors_come_back_in_the_envelope(db: PgPool) {
    let e = env(db);
    let st = &e.st;
    let (_, key) = tenant_key(st, "acme").await;
    let empty = || axum::body::Body::empty();
    let r = request(st, "GET", "/v1/no/such/route", Some(&key), empty(), &[]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_envelope(&r.json, "not_found_error");
    assert_eq!(r.json["error"]["code"], "unknown_route");
    assert!(r.json["error"]["message"]
        .as_str()
        .unwrap()
        .contains("GET /v1/no/such/route"));

    let r = request(st, "PUT", "/v1/files", Some(&key), empty(), &[]).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{:?}", r.json);
    assert_envelope(&r.json, "invalid_request_error");
    assert_eq!(r.json["error"]["code"], "method_not_allowed");
    assert!(r.headers.contains_key("allow"), "{:?}", r.headers);

    for (uri, param) in [
        ("/v1/files?limit=abc", "limit"),
        ("/v1/fine_tuning/jobs?limit=1.5", "limit"),
        (
            "/v1/files?purpose=fine-tune&purpose=fine-tune&filename=a.jsonl",
            "purpose",
        ),
    ] {
        let method = if uri.contains("purpose") {
            "POST"
        } else {
            "GET"
        };
        let r = request(st, method, uri, Some(&key), empty(), &[]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{uri}: {:?}", r.json);
        assert_envelope(&r.json, "invalid_request_error");
        assert_eq!(r.json["error"]["param"], param, "{uri}: {:?}", r.json);
    }

    let big = format!("{{\"model\": \"{}\"}}", "x".repeat(3 << 20));
    let r = request(
        st,
        "POST",
        "/v1/fine_tuning/jobs",
        Some(&key),
        axum::body::Body::from(big),
        &[("content-type", "application/json")],
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{:?}", r.json);
    assert_envelope(&r.json, "invalid_request_error");
    assert_eq!(job_count(&e.st.db).await, 0);
}
