//! Router tests for models and fine-tuning jobs (a database per test, tiny random models, a
//! real worker driven step by step): create with dry run and idempotency, validation errors
//! naming the field, list/get with queue position, events as a cursor list and as SSE resumed
//! with Last-Event-ID, metrics, checkpoints, artifacts with Range, merge, predict, cancel,
//! cross-tenant isolation, registered models, and the Prometheus endpoint.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use axum::body::Body;
use axum::http::StatusCode;
use common::api::{assert_envelope, call, get, post_json, request, state_with, tenant_key, upload};
use common::{predict_folder, tiny_rows};
use serde_json::{json, Value};
use sparsegrad_engine::models::Arch;
use sparsegrad_engine::testing::write_tiny_model_dir;
use sparsegrad_service::api::AppState;
use sparsegrad_service::queue::QueueConfig;
use sparsegrad_service::storage::{S3Settings, Storage};
use sparsegrad_service::worker::{try_run_one, Outcome, WorkerCtx};
use sqlx::PgPool;

struct Env {
    tmp: tempfile::TempDir,
    st: AppState,
    worker: WorkerCtx,
}

fn env(db: PgPool) -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    write_tiny_model_dir(&models.join("tiny-bert"), Arch::Bert, 1).unwrap();
    write_tiny_model_dir(&models.join("tiny-llama"), Arch::Llama, 2).unwrap();
    let url = format!("file://{}", tmp.path().join("objects").display());
    let storage = Storage::from_url(&url, &S3Settings::default()).unwrap();
    let data = tmp.path().join("data");
    let st = state_with(
        db.clone(),
        &[
            "--models-dir",
            models.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ],
        Some(storage.clone()),
    );
    let worker = WorkerCtx {
        db,
        storage,
        queue: QueueConfig::default(),
        worker_id: "w1".into(),
        work_dir: tmp.path().join("work"),
        heartbeat: Duration::from_millis(50),
        cancels: sparsegrad_service::db::listen::JobSignals::new(
            st.db.clone(),
            sparsegrad_service::queue::CANCEL_CHANNEL,
        ),
        drain: tokio::sync::watch::channel(false).1,
        cache_dir: None,
        model_cache: tmp.path().join("model-cache"),
        device: candle_core::Device::Cpu,
    };
    Env { tmp, st, worker }
}

async fn run_next(e: &Env) -> String {
    match try_run_one(&e.worker).await.unwrap() {
        Outcome::Ran { status, .. } => status.to_string(),
        other => panic!("{other:?}"),
    }
}

fn job_body(train: &str, valid: Option<&str>) -> Value {
    json!({
        "model": "tiny-bert",
        "training_file": train,
        "validation_file": valid,
        "seed": 3,
        "suffix": "first",
        "metadata": {"team": "nlp"},
        "method": {"type": "sparsegrad", "hyperparameters": {
            "density": 0.1, "basis_steps": 2, "max_steps": 4, "batch_size": 4,
            "max_seq_len": 16, "checkpoint_every": 2, "eval_every": 2, "learning_rate": 0.01
        }}
    })
}

async fn job_count(db: &PgPool) -> i64 {
    sqlx::query_as::<_, (i64,)>("select count(*) from jobs")
        .fetch_one(db)
        .await
        .unwrap()
        .0
}

/// Reads an SSE response body into `(id, event json)` pairs.
fn sse_events(body: &[u8]) -> Vec<(String, Value)> {
    let text = String::from_utf8(body.to_vec()).unwrap();
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let mut id = None;
        let mut data = String::new();
        for line in block.lines() {
            if let Some(v) = line
                .strip_prefix("id: ")
                .or_else(|| line.strip_prefix("id:"))
            {
                id = Some(v.trim().to_string());
            } else if let Some(v) = line
                .strip_prefix("data: ")
                .or_else(|| line.strip_prefix("data:"))
            {
                data.push_str(v);
            }
        }
        if let Some(id) = id {
            out.push((id, serde_json::from_str(&data).unwrap()));
        }
    }
    out
}

#[sqlx::test(migrations = "./migrations")]
async fn a_job_from_upload_to_merge_and_predict(db: PgPool) {
    let e = env(db.clone());
    let st = &e.st;
    let (tenant, key) = tenant_key(st, "acme").await;
    let key = key.as_str();

    // Models: the folder's two, with their architecture.
    let (s, m) = get(st, "/v1/models", key).await;
    assert_eq!(s, StatusCode::OK);
    let ids: Vec<_> = m["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(ids, [json!("tiny-bert"), json!("tiny-llama")]);
    assert_eq!(m["data"][0]["architecture"], "bert");
    assert_eq!(m["data"][0]["owned_by"], "system");
    let (s, one) = get(st, "/v1/models/tiny-llama", key).await;
    assert_eq!(
        (s, one["architecture"].clone()),
        (StatusCode::OK, json!("llama"))
    );
    let (s, v) = get(st, "/v1/models/nope", key).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_envelope(&v, "not_found_error");

    let train = upload(st, key, "train.jsonl", &tiny_rows(40, 1)).await;
    let valid = upload(st, key, "valid.jsonl", &tiny_rows(12, 2)).await;
    let (tid, vid) = (train["id"].as_str().unwrap(), valid["id"].as_str().unwrap());

    // Dry run: an estimate, nothing queued.
    let mut dry = job_body(tid, Some(vid));
    dry["dry_run"] = json!(true);
    let (s, est) = post_json(st, "/v1/fine_tuning/jobs", Some(key), dry).await;
    assert_eq!(s, StatusCode::OK, "{est}");
    assert_eq!(est["object"], "fine_tuning.job.estimate");
    assert_eq!(est["estimate"]["steps"], 4);
    assert_eq!(est["estimate"]["examples"], 16);
    assert_eq!(est["estimate"]["duration_basis"], "flops");
    assert!(est["estimate"]["memory_bytes"].as_u64().unwrap() > 0);
    // The memory model's terms come along; its backward phase is their sum.
    let m = &est["estimate"]["memory"];
    assert_eq!(m["total"], est["estimate"]["memory_bytes"]);
    let terms: u64 = [
        "runtime",
        "weights",
        "optimizer",
        "gradients",
        "method_state",
        "activations",
        "loss",
        "backward_transient",
    ]
    .iter()
    .map(|t| m[t].as_u64().unwrap())
    .sum();
    assert_eq!(terms, m["phases"]["backward"].as_u64().unwrap());
    assert_eq!(est["method"]["hyperparameters"]["lr"], 0.01);
    assert_eq!(est["method"]["hyperparameters"]["support"], "fixed");
    assert_eq!(job_count(&db).await, 0);

    // Create with an idempotency key; a replay returns the same job, a different body with
    // the same key is a conflict.
    let body = job_body(tid, Some(vid));
    let idem = [
        ("content-type", "application/json"),
        ("idempotency-key", "k-1"),
    ];
    let r = request(
        st,
        "POST",
        "/v1/fine_tuning/jobs",
        Some(key),
        Body::from(body.to_string()),
        &idem,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    let job = r.json;
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(job["object"], "fine_tuning.job");
    assert_eq!(job["status"], "queued");
    assert_eq!(job["queue_position"], 0);
    assert!(job["estimated_finish"].as_i64().unwrap() >= job["created_at"].as_i64().unwrap());
    assert_eq!(job["training_method"]["type"], "sparsegrad");
    // OpenAI's shape beside it, as its SDKs validate it.
    assert_eq!(job["method"]["type"], "supervised");
    assert_eq!(job["organization_id"], tenant.as_str());
    assert_eq!(
        job["method"]["supervised"]["hyperparameters"],
        job["hyperparameters"]
    );
    assert_eq!(job["hyperparameters"]["learning_rate_multiplier"], 10.0);
    assert!(job["hyperparameters"]["batch_size"].is_u64());
    assert_eq!(job["metadata"]["team"], "nlp");
    // Lists filter on metadata (every pair given); an unknown cursor is a 400.
    for (q, want) in [
        ("metadata[team]=nlp", 1),
        ("metadata[team]=vision", 0),
        ("metadata[team]=nlp&metadata[other]=x", 0),
    ] {
        let (s, v) = get(st, &format!("/v1/fine_tuning/jobs?{q}"), key).await;
        assert_eq!(s, StatusCode::OK, "{q}: {v}");
        assert_eq!(v["data"].as_array().unwrap().len(), want, "{q}: {v}");
    }
    // Filters are bounded: at most 16, keys 1-64 characters, values at most 512.
    let many: Vec<String> = (0..17).map(|i| format!("metadata[k{i}]=v")).collect();
    let long_key = format!("metadata[{}]=v", "k".repeat(65));
    let long_value = format!("metadata[team]={}", "v".repeat(513));
    for q in [many.join("&"), long_key, long_value] {
        let (s, v) = get(st, &format!("/v1/fine_tuning/jobs?{q}"), key).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(
            v["error"]["param"]
                .as_str()
                .unwrap()
                .starts_with("metadata["),
            "{v}"
        );
    }
    let (s, v) = get(st, "/v1/fine_tuning/jobs?after=ftjob_nope", key).await;
    assert_eq!(
        (s, v["error"]["param"].as_str()),
        (StatusCode::NOT_FOUND, Some("after"))
    );
    let (s, v) = get(st, "/v1/fine_tuning/jobs?purpose=fine-tune", key).await;
    assert_eq!(
        (s, v["error"]["param"].as_str()),
        (StatusCode::BAD_REQUEST, Some("purpose"))
    );
    assert_eq!(job["training_file"], tid);
    assert_eq!(job["validation_file"], vid);
    assert_eq!(job["seed"], 3);
    let r2 = request(
        st,
        "POST",
        "/v1/fine_tuning/jobs",
        Some(key),
        Body::from(body.to_string()),
        &idem,
    )
    .await;
    assert_eq!(r2.status, StatusCode::OK);
    assert_eq!(r2.json["id"], id.as_str());
    assert_eq!(r2.headers["idempotent-replayed"], "true");
    let mut other = body.clone();
    other["seed"] = json!(4);
    let r3 = request(
        st,
        "POST",
        "/v1/fine_tuning/jobs",
        Some(key),
        Body::from(other.to_string()),
        &idem,
    )
    .await;
    assert_eq!(r3.status, StatusCode::CONFLICT);
    assert_envelope(&r3.json, "conflict_error");
    assert_eq!(job_count(&db).await, 1);

    // Merge and predict need a succeeded job.
    let (s, v) = post_json(
        st,
        &format!("/v1/fine_tuning/jobs/{id}/merge"),
        Some(key),
        json!({}),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let (s, v) = post_json(
        st,
        &format!("/v1/fine_tuning/jobs/{id}/predict"),
        Some(key),
        json!({"inputs": [{"text": "good"}]}),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");

    assert_eq!(run_next(&e).await, "succeeded");

    let (s, job) = get(st, &format!("/v1/fine_tuning/jobs/{id}"), key).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["trained_steps"], 4);
    assert!(job["trained_tokens"].as_u64().unwrap() > 0);
    assert!(job["queue_position"].is_null() && job["estimated_finish"].is_null());
    assert!(job["finished_at"].as_i64().unwrap() >= job["started_at"].as_i64().unwrap());
    assert_eq!(job["fine_tuned_model"], format!("ft:tiny-bert:first:{id}"));
    assert_eq!(job["result_files"].as_array().unwrap().len(), 2);
    assert!(job["error"].is_null());

    let (s, list) = get(st, "/v1/fine_tuning/jobs?limit=5", key).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list["data"][0]["id"], id.as_str());
    assert_eq!(list["has_more"], false);

    // Events: newest first with a cursor, …
    let (s, ev) = get(
        st,
        &format!("/v1/fine_tuning/jobs/{id}/events?limit=3"),
        key,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(ev["has_more"], true);
    assert_eq!(ev["data"][0]["message"], "succeeded");
    assert_eq!(ev["data"][0]["object"], "fine_tuning.job.event");
    let last = ev["data"][2]["id"].as_str().unwrap();
    let (_, older) = get(
        st,
        &format!("/v1/fine_tuning/jobs/{id}/events?limit=100&after={last}"),
        key,
    )
    .await;
    let older = older["data"].as_array().unwrap();
    assert_eq!(older.last().unwrap()["message"], "queued");
    let total = 3 + older.len();
    // … and as a stream that ends once the job is final, resumable after any event.
    let sse = [("accept", "text/event-stream")];
    let r = request(
        st,
        "GET",
        &format!("/v1/fine_tuning/jobs/{id}/events"),
        Some(key),
        Body::empty(),
        &sse,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let all = sse_events(&r.bytes);
    assert_eq!(all.len(), total);
    assert_eq!(all[0].1["message"], "queued");
    assert_eq!(all[1].1["message"], "running");
    assert_eq!(all[1].1["data"]["device"], "cpu");
    assert_eq!(all.last().unwrap().1["message"], "succeeded");
    let resume_at = all[4].0.clone();
    let r = request(
        st,
        "GET",
        &format!("/v1/fine_tuning/jobs/{id}/events"),
        Some(key),
        Body::empty(),
        &[
            ("accept", "text/event-stream"),
            ("last-event-id", &resume_at),
        ],
    )
    .await;
    let rest = sse_events(&r.bytes);
    assert_eq!(rest.len(), total - 5);
    assert_eq!(rest[0].0, all[5].0);
    let r = request(
        st,
        "GET",
        &format!("/v1/fine_tuning/jobs/{id}/events"),
        Some(key),
        Body::empty(),
        &[
            ("accept", "text/event-stream"),
            ("last-event-id", "not-an-id"),
        ],
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json["error"]["param"], "Last-Event-ID");

    // Curves, checkpoints.
    let (_, m) = get(st, &format!("/v1/fine_tuning/jobs/{id}/metrics"), key).await;
    let m = m["data"].as_array().unwrap();
    let train_steps: Vec<_> = m
        .iter()
        .filter(|p| p["type"] == "train")
        .map(|p| p["step"].as_u64().unwrap())
        .collect();
    assert_eq!(train_steps, [1, 2, 3, 4]);
    assert!(m
        .iter()
        .filter(|p| p["type"] == "train")
        .all(|p| p["loss"].is_number() && p["lr"].is_number()));
    let evals: Vec<_> = m.iter().filter(|p| p["type"] == "eval").collect();
    assert!(
        !evals.is_empty() && evals.iter().all(|p| p["accuracy"].is_number()),
        "{m:?}"
    );
    let (_, c) = get(st, &format!("/v1/fine_tuning/jobs/{id}/checkpoints"), key).await;
    let steps: Vec<_> = c["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["step_number"].as_u64().unwrap())
        .collect();
    assert!(steps.contains(&2), "{c}");
    assert!(c["data"][0]["bytes"].as_u64().unwrap() > 0);

    // Artifacts: listed with sizes and digests; whole and ranged downloads.
    let (_, a) = get(st, &format!("/v1/fine_tuning/jobs/{id}/artifacts"), key).await;
    let arts = a["data"].as_array().unwrap().clone();
    assert_eq!(arts.len(), 2);
    let delta = arts
        .iter()
        .find(|a| a["name"] == "delta.safetensors")
        .unwrap();
    let url = delta["content_url"].as_str().unwrap().to_string();
    let r = request(st, "GET", &url, Some(key), Body::empty(), &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.bytes.len() as u64, delta["bytes"].as_u64().unwrap());
    assert_eq!(
        sparsegrad_engine::io::sha256_bytes(&r.bytes),
        delta["sha256"].as_str().unwrap()
    );
    assert_eq!(r.headers["accept-ranges"], "bytes");
    let full = r.bytes;
    let n = full.len();
    let r = request(
        st,
        "GET",
        &url,
        Some(key),
        Body::empty(),
        &[("range", "bytes=0-9")],
    )
    .await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.bytes, full[..10]);
    assert_eq!(
        r.headers["content-range"],
        format!("bytes 0-9/{n}").as_str()
    );
    let r = request(
        st,
        "GET",
        &url,
        Some(key),
        Body::empty(),
        &[("range", "bytes=-7")],
    )
    .await;
    assert_eq!(r.bytes, full[n - 7..]);
    let r = request(
        st,
        "GET",
        &url,
        Some(key),
        Body::empty(),
        &[("range", &format!("bytes={n}-"))],
    )
    .await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.headers["content-range"], format!("bytes */{n}").as_str());
    assert_envelope(&r.json, "invalid_request_error");
    let (s, _) = get(
        st,
        &format!("/v1/fine_tuning/jobs/{id}/artifacts/art_nope/content"),
        key,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Predict: base + delta.
    let inputs = json!({"inputs": [{"text": "a good film"}, {"text": "bad plot"}]});
    let (s, p) = post_json(
        st,
        &format!("/v1/fine_tuning/jobs/{id}/predict"),
        Some(key),
        inputs.clone(),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{p}");
    let preds = p["data"].as_array().unwrap();
    assert_eq!(preds.len(), 2);
    // Asked again: the same answer from the model already loaded.
    let (_, again) = post_json(
        st,
        &format!("/v1/fine_tuning/jobs/{id}/predict"),
        Some(key),
        inputs.clone(),
    )
    .await;
    assert_eq!(again["data"], p["data"]);
    assert_eq!(st.inference.loads(), 1);
    assert!(preds
        .iter()
        .all(|p| ["pos", "neg"].contains(&p["label"].as_str().unwrap())));
    for bad in [
        json!({"inputs": []}),
        json!({"inputs": [{"text": "x"}], "max_new_tokens": 0}),
        json!({"input": []}),
    ] {
        let (s, v) = post_json(
            st,
            &format!("/v1/fine_tuning/jobs/{id}/predict"),
            Some(key),
            bad,
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert_envelope(&v, "invalid_request_error");
    }

    // Merge: queued once, run by a worker, its files listed with the job's.
    let (s, m1) = post_json(
        st,
        &format!("/v1/fine_tuning/jobs/{id}/merge"),
        Some(key),
        json!({}),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{m1}");
    assert_eq!(m1["status"], "queued");
    let (s, m2) = post_json(
        st,
        &format!("/v1/fine_tuning/jobs/{id}/merge"),
        Some(key),
        json!({}),
    )
    .await;
    assert_eq!((s, m2["id"].clone()), (StatusCode::OK, m1["id"].clone()));
    assert_eq!(run_next(&e).await, "succeeded");
    let (_, job) = get(st, &format!("/v1/fine_tuning/jobs/{id}"), key).await;
    assert_eq!(job["merge"]["status"], "succeeded", "{job}");
    let (_, a) = get(st, &format!("/v1/fine_tuning/jobs/{id}/artifacts"), key).await;
    let merged: Vec<_> = a["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == "merged")
        .map(|a| a["name"].as_str().unwrap().to_string())
        .collect();
    assert!(
        merged.contains(&"model.safetensors".to_string())
            && merged.contains(&"config.json".to_string()),
        "{merged:?}"
    );
    // The merged folder, downloaded through the API, predicts what base + delta predicts.
    let dir = e.tmp.path().join("merged-download");
    std::fs::create_dir_all(&dir).unwrap();
    for art in a["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == "merged")
    {
        let r = request(
            st,
            "GET",
            art["content_url"].as_str().unwrap(),
            Some(key),
            Body::empty(),
            &[],
        )
        .await;
        std::fs::write(dir.join(art["name"].as_str().unwrap()), &r.bytes).unwrap();
    }
    let merged_preds = predict_folder(&dir, &inputs["inputs"], 16);
    for (a, b) in merged_preds.iter().zip(preds) {
        assert_eq!(a["label"], b["label"]);
        let (pa, pb) = (
            a["probabilities"].as_array().unwrap(),
            b["probabilities"].as_array().unwrap(),
        );
        for (x, y) in pa.iter().zip(pb) {
            assert!(
                (x.as_f64().unwrap() - y.as_f64().unwrap()).abs() < 1e-5,
                "{a} vs {b}"
            );
        }
    }
}

#[sqlx::test(migrations = "./migrations")]
async fn bad_job_requests_name_the_field_and_queue_nothing(db: PgPool) {
    let e = env(db.clone());
    let st = &e.st;
    let (_, key) = tenant_key(st, "acme").await;
    let key = key.as_str();
    let train = upload(st, key, "train.jsonl", &tiny_rows(20, 1)).await;
    let tid = train["id"].as_str().unwrap();
    let chat = upload(
        st,
        key,
        "sft.jsonl",
        "{\"prompt\": \"hi\", \"completion\": \"good day\"}\n",
    )
    .await;
    let cid = chat["id"].as_str().unwrap();
    let ok = || job_body(tid, None);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut b = ok();
        f(&mut b);
        b
    };
    let cases: Vec<(Value, &str)> = vec![
        (with(&|b| b["model"] = json!("no-such-model")), "model"),
        (with(&|b| b["model"] = json!("../models")), "model"),
        (
            with(&|b| b["training_file"] = json!("file_nope")),
            "training_file",
        ),
        (
            with(&|b| b["validation_file"] = json!("file_nope")),
            "validation_file",
        ),
        (
            with(&|b| b["validation_file"] = json!(cid)),
            "validation_file",
        ),
        (with(&|b| b["training_file"] = json!(cid)), "training_file"),
        (
            with(&|b| b["method"]["hyperparameters"]["density"] = json!(1.5)),
            "method.hyperparameters.density",
        ),
        (
            with(&|b| b["method"]["hyperparameters"]["densty"] = json!(0.1)),
            "method.hyperparameters.densty",
        ),
        (
            with(&|b| b["method"]["hyperparameters"]["batch_size"] = json!(0)),
            "method.hyperparameters.batch_size",
        ),
        (
            with(&|b| b["method"]["hyperparameters"]["batch_size"] = json!("8")),
            "method.hyperparameters.batch_size",
        ),
        (
            with(&|b| b["method"]["type"] = json!("qlora")),
            "method.type",
        ),
        (with(&|b| b["suffix"] = json!("has space")), "suffix"),
        (with(&|b| b["seed"] = json!(-1)), "seed"),
        (with(&|b| b["colour"] = json!("red")), "colour"),
        (
            with(&|b| {
                b["metadata"] = json!((0..17)
                    .map(|i| (format!("k{i}"), json!("v")))
                    .collect::<serde_json::Map<_, _>>())
            }),
            "metadata",
        ),
    ];
    for (body, param) in cases {
        let (s, v) = post_json(st, "/v1/fine_tuning/jobs", Some(key), body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body} → {v}");
        assert_envelope(&v, "invalid_request_error");
        let got = v["error"]["param"].as_str().unwrap_or_default();
        assert!(
            got == param || got.starts_with(&format!("{param}.")) || got.starts_with(param),
            "{body}: param {got}, want {param}: {v}"
        );
    }
    let (s, v, _) = call(
        st,
        "POST",
        "/v1/fine_tuning/jobs",
        Some(key),
        Body::from("{not json"),
        Some("application/json"),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_envelope(&v, "invalid_request_error");
    let r = request(
        st,
        "POST",
        "/v1/fine_tuning/jobs",
        Some(key),
        Body::from(ok().to_string()),
        &[
            ("content-type", "application/json"),
            ("idempotency-key", ""),
        ],
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(job_count(&db).await, 0);
    let (s, v) = get(st, "/v1/fine_tuning/jobs?limit=0", key).await;
    assert_eq!(
        (s, v["error"]["param"].clone()),
        (StatusCode::BAD_REQUEST, json!("limit"))
    );
}

#[sqlx::test(migrations = "./migrations")]
async fn cancel_queued_and_running_jobs_and_other_tenants_see_nothing(db: PgPool) {
    let e = env(db.clone());
    let st = &e.st;
    let (_, key) = tenant_key(st, "acme").await;
    let (_, other) = tenant_key(st, "rival").await;
    let key = key.as_str();
    let train = upload(st, key, "train.jsonl", &tiny_rows(20, 1)).await;
    let tid = train["id"].as_str().unwrap();
    let (_, a) = post_json(st, "/v1/fine_tuning/jobs", Some(key), job_body(tid, None)).await;
    let (_, b) = post_json(st, "/v1/fine_tuning/jobs", Some(key), job_body(tid, None)).await;
    let (a, b) = (
        a["id"].as_str().unwrap().to_string(),
        b["id"].as_str().unwrap().to_string(),
    );
    let (_, bj) = get(st, &format!("/v1/fine_tuning/jobs/{b}"), key).await;
    assert_eq!(bj["queue_position"], 1);
    // The list computes positions and ETAs for the whole page: newest (b) first. With
    // estimates of 100 s (a) and 50 s (b), b should finish 150 s from now, a in 100 s.
    for (id, secs) in [(&a, 100), (&b, 50)] {
        sqlx::query("update jobs set estimate_secs = $2, spec = jsonb_set(spec, '{api,estimate,duration_secs}', to_jsonb($2::float8)) where id = $1")
            .bind(id)
            .bind(secs as f64)
            .execute(&db)
            .await
            .unwrap();
    }
    let (_, l) = get(st, "/v1/fine_tuning/jobs", key).await;
    let pos: Vec<_> = l["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["queue_position"].clone())
        .collect();
    assert_eq!(pos, [json!(1), json!(0)]);
    let eta = |j: &Value| j["estimated_finish"].as_i64().unwrap();
    let gap = eta(&l["data"][0]) - eta(&l["data"][1]);
    assert!(
        (49..=51).contains(&gap),
        "the job behind finishes 50 s later: {gap}"
    );

    // Another tenant: 404 everywhere, an empty list, and the job untouched.
    for (m, path) in [
        ("GET", ""),
        ("POST", "/cancel"),
        ("POST", "/pause"),
        ("POST", "/resume"),
        ("GET", "/events"),
        ("GET", "/metrics"),
        ("GET", "/checkpoints"),
        ("GET", "/artifacts"),
        ("POST", "/merge"),
        ("POST", "/predict"),
        ("GET", "/artifacts/art_x/content"),
    ] {
        let body = if m == "POST" {
            Body::from("{\"inputs\": [{\"text\": \"x\"}]}")
        } else {
            Body::empty()
        };
        let (s, v, _) = call(
            st,
            m,
            &format!("/v1/fine_tuning/jobs/{a}{path}"),
            Some(&other),
            body,
            Some("application/json"),
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{m} {path}: {v}");
        assert_envelope(&v, "not_found_error");
        assert!(!v.to_string().contains("acme"));
    }
    let r = request(
        st,
        "GET",
        &format!("/v1/fine_tuning/jobs/{a}/events"),
        Some(&other),
        Body::empty(),
        &[("accept", "text/event-stream")],
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let (_, l) = get(st, "/v1/fine_tuning/jobs", &other).await;
    assert_eq!(l["data"], json!([]));
    let (s, _) = get(st, &format!("/v1/files/{tid}"), &other).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // Nor can it train on the first tenant's file.
    let (s, v) = post_json(
        st,
        "/v1/fine_tuning/jobs",
        Some(&other),
        job_body(tid, None),
    )
    .await;
    assert_eq!(
        (s, v["error"]["param"].clone()),
        (StatusCode::BAD_REQUEST, json!("training_file"))
    );

    // Queued: cancelled at once.
    let (s, v) = post_json(
        st,
        &format!("/v1/fine_tuning/jobs/{b}/cancel"),
        Some(key),
        json!({}),
    )
    .await;
    assert_eq!(
        (s, v["status"].clone()),
        (StatusCode::OK, json!("cancelled"))
    );
    // Running: flagged, then stopped by its worker at its next heartbeat.
    let (job, _lease) = sparsegrad_service::queue::claim(&db, "w-manual", &QueueConfig::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.id, a);
    let (s, v) = post_json(
        st,
        &format!("/v1/fine_tuning/jobs/{a}/cancel"),
        Some(key),
        json!({}),
    )
    .await;
    assert_eq!(
        (s, v["service_status"].clone(), v["status"].clone()),
        (StatusCode::OK, json!("cancelling"), json!("running"))
    );
    let (_, v) = post_json(
        st,
        &format!("/v1/fine_tuning/jobs/{b}/cancel"),
        Some(key),
        json!({}),
    )
    .await;
    assert_eq!(v["status"], "cancelled");
    let (_, ev) = get(st, &format!("/v1/fine_tuning/jobs/{b}/events"), key).await;
    assert_eq!(ev["data"][0]["message"], "cancelled");
}

#[sqlx::test(migrations = "./migrations")]
async fn models_registered_from_storage_train_like_folder_models(db: PgPool) {
    let e = env(db.clone());
    let st = &e.st;
    let (tenant, key) = tenant_key(st, "acme").await;
    let (_, other) = tenant_key(st, "rival").await;
    let key = key.as_str();
    // A model folder placed in object storage by an operator.
    let src: PathBuf = e.tmp.path().join("models/tiny-bert");
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        st.storage
            .put_file(&format!("models/shared/tb/{f}"), &src.join(f))
            .await
            .unwrap();
    }
    st.storage
        .put("models/broken/config.json", "{}".into())
        .await
        .unwrap();
    let (s, m) = post_json(
        st,
        "/v1/models",
        Some(key),
        json!({"id": "my-bert", "source": {"type": "storage", "prefix": "models/shared/tb/"}}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{m}");
    assert_eq!(
        (m["architecture"].clone(), m["owned_by"].clone()),
        (json!("bert"), json!(tenant))
    );
    for (body, status, param) in [
        (
            json!({"id": "my-bert", "source": {"type": "storage", "prefix": "models/shared/tb"}}),
            StatusCode::CONFLICT,
            None,
        ),
        (
            json!({"id": "tiny-bert", "source": {"type": "storage", "prefix": "models/shared/tb"}}),
            StatusCode::CONFLICT,
            None,
        ),
        (
            json!({"id": "x", "source": {"type": "storage", "prefix": "models/broken"}}),
            StatusCode::BAD_REQUEST,
            Some("source.prefix"),
        ),
        (
            json!({"id": "x", "source": {"type": "storage", "prefix": "models/absent"}}),
            StatusCode::BAD_REQUEST,
            Some("source.prefix"),
        ),
        (
            json!({"id": "x", "source": {"type": "storage", "prefix": "tenants/someone-else/models/m"}}),
            StatusCode::BAD_REQUEST,
            Some("source.prefix"),
        ),
        (
            json!({"id": "x", "source": {"type": "storage", "prefix": "jobs/ftjob_1/artifact"}}),
            StatusCode::BAD_REQUEST,
            Some("source.prefix"),
        ),
        (
            json!({"id": "a/b", "source": {"type": "storage", "prefix": "models/shared/tb"}}),
            StatusCode::BAD_REQUEST,
            Some("id"),
        ),
        (
            json!({"id": "x", "source": {"type": "gguf", "key": "imports/none.gguf"}}),
            StatusCode::BAD_REQUEST,
            Some("source.key"),
        ),
        (
            json!({"id": "x", "source": {"type": "gguf", "key": "models/shared/tb/config.json"}}),
            StatusCode::BAD_REQUEST,
            Some("source.key"),
        ),
    ] {
        let (s, v) = post_json(st, "/v1/models", Some(key), body.clone()).await;
        assert_eq!(s, status, "{body}: {v}");
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p, "{body}: {v}");
        }
    }
    // A failed import leaves nothing behind.
    assert!(st
        .storage
        .list(&format!("tenants/{tenant}/models"))
        .await
        .unwrap()
        .is_empty());
    let (_, l) = get(st, "/v1/models", key).await;
    assert_eq!(l["data"].as_array().unwrap().len(), 3);
    let (_, l) = get(st, "/v1/models", &other).await;
    assert_eq!(
        l["data"].as_array().unwrap().len(),
        2,
        "another tenant does not see it"
    );

    // A job on it: the worker fetches the model from storage.
    let train = upload(st, key, "train.jsonl", &tiny_rows(20, 1)).await;
    let mut body = job_body(train["id"].as_str().unwrap(), None);
    body["model"] = json!("my-bert");
    let (s, j) = post_json(st, "/v1/fine_tuning/jobs", Some(key), body.clone()).await;
    assert_eq!(s, StatusCode::OK, "{j}");
    assert_eq!(run_next(&e).await, "succeeded");
    let (s, v) = post_json(st, "/v1/fine_tuning/jobs", Some(&other), body).await;
    assert_eq!(
        (s, v["error"]["param"].clone()),
        (StatusCode::BAD_REQUEST, json!("model"))
    );
}

#[sqlx::test(migrations = "./migrations")]
async fn prometheus_metrics(db: PgPool) {
    let e = env(db.clone());
    let st = &e.st;
    let (_, key) = tenant_key(st, "acme").await;
    let train = upload(st, &key, "train.jsonl", &tiny_rows(20, 1)).await;
    let (s, _) = post_json(
        st,
        "/v1/fine_tuning/jobs",
        Some(&key),
        job_body(train["id"].as_str().unwrap(), None),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = get(st, "/v1/fine_tuning/jobs/ftjob_nope", &key).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // Job counts span tenants: operators only.
    for k in [None, Some(key.as_str())] {
        let r = request(st, "GET", "/metrics", k, Body::empty(), &[]).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{:?}", r.json);
        assert!(!String::from_utf8_lossy(&r.bytes).contains("sparsegrad_jobs"));
    }
    let r = request(
        st,
        "GET",
        "/metrics",
        Some(common::api::ADMIN),
        Body::empty(),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let text = String::from_utf8(r.bytes).unwrap();
    assert!(
        text.contains("sparsegrad_jobs{kind=\"fine_tune\",status=\"queued\"} 1"),
        "{text}"
    );
    assert!(text.contains("sparsegrad_queue_depth 1"), "{text}");
    assert!(text.contains("# TYPE sparsegrad_http_request_duration_seconds histogram"));
    assert!(
        text.contains("route=\"/v1/fine_tuning/jobs\",status=\"200\",le=\"+Inf\"} 1"),
        "{text}"
    );
    // Route templates, not ids, label the series.
    assert!(
        text.contains("route=\"/v1/fine_tuning/jobs/{id}\",status=\"404\""),
        "{text}"
    );
    assert!(!text.contains("ftjob_nope"));
}

#[sqlx::test(migrations = "./migrations")]
async fn the_methods_listing_is_what_jobs_resolve_with(db: PgPool) {
    let e = env(db);
    let st = &e.st;
    // A key is needed, like every /v1 resource; an unknown method is a 404 in the envelope.
    let (s, v, _) = call(st, "GET", "/v1/methods", None, Body::empty(), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_envelope(&v, "authentication_error");
    let (_, key) = tenant_key(st, "acme").await;
    let key = key.as_str();
    let (s, v) = get(st, "/v1/methods/adapter", key).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_envelope(&v, "not_found_error");

    let (s, l) = get(st, "/v1/methods", key).await;
    assert_eq!(s, StatusCode::OK, "{l}");
    let ids: Vec<&str> = l["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["full", "lora", "sparsegrad", "meprop"]);
    let defaults: Vec<&Value> = l["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["default"] == true)
        .collect();
    assert_eq!(defaults.len(), 1);
    assert_eq!(defaults[0]["id"], "sparsegrad");
    let hp = |m: &Value, name: &str| -> Value {
        m["hyperparameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {m}"))
            .clone()
    };
    let (_, lora) = get(st, "/v1/methods/lora", key).await;
    assert_eq!(hp(&lora, "r")["default"], 8);
    assert_eq!(hp(&lora, "r")["maximum"], 1024.0);
    assert_eq!(hp(&lora, "lr")["default"], 5e-4);
    assert_eq!(hp(&lora, "epochs")["aliases"], json!(["n_epochs"]));

    // A job that gives no hyperparameters gets exactly the listed defaults, for every method.
    let train = upload(st, key, "train.jsonl", &tiny_rows(20, 1)).await;
    let tid = train["id"].as_str().unwrap();
    for m in l["data"].as_array().unwrap() {
        let body = json!({"model": "tiny-bert", "training_file": tid,
                          "method": {"type": m["id"]}, "dry_run": true});
        let (s, est) = post_json(st, "/v1/fine_tuning/jobs", Some(key), body).await;
        assert_eq!(s, StatusCode::OK, "{est}");
        for h in m["hyperparameters"].as_array().unwrap() {
            let name = h["name"].as_str().unwrap();
            // The echo names the loop's dropout `dropout` (LoRA's own shares the name).
            if name == "train_dropout" {
                continue;
            }
            // `auto` epochs are fixed from the file's rows when the job is created: 20 rows
            // → 5 passes (about 100 examples seen).
            if name == "epochs" {
                assert_eq!(h["default"], "auto");
                assert_eq!(est["method"]["hyperparameters"][name], 5, "{}", m["id"]);
                continue;
            }
            assert_eq!(
                est["method"]["hyperparameters"][name], h["default"],
                "{} {name}",
                m["id"]
            );
        }
    }
    // And a value outside a listed bound is refused, naming it.
    let body = json!({"model": "tiny-bert", "training_file": tid,
                      "method": {"type": "lora", "hyperparameters": {"r": 1025}}});
    let (s, v) = post_json(st, "/v1/fine_tuning/jobs", Some(key), body).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["param"], "method.hyperparameters.r");
}
