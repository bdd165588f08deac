//! End to end over real HTTP with a real worker loop: upload an rt_polarity subset, fine-tune
//! MiniLM-L6 with SparseGrad, follow the job over Server-Sent Events to `succeeded`, download
//! the delta, merge, predict — and the predictions equal those of the same job trained in
//! memory here, and of the merged model downloaded through the API.

mod common;

use std::io::{BufRead, BufReader};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use common::api::{state_with, ADMIN};
use futures::StreamExt;
use serde_json::{json, Value};
use sparsegrad_service::api::router;
use sparsegrad_service::domain::FineTune;
use sparsegrad_service::queue::QueueConfig;
use sparsegrad_service::server::worker_loop;
use sparsegrad_service::storage::{S3Settings, Storage};
use sparsegrad_service::worker::WorkerCtx;
use sqlx::PgPool;

/// The first `n` lines of a JSONL file.
fn head(path: &std::path::Path, n: usize) -> String {
    let f = BufReader::new(std::fs::File::open(path).unwrap());
    let mut s = String::new();
    for l in f.lines().take(n) {
        s.push_str(&l.unwrap());
        s.push('\n');
    }
    s
}

#[sqlx::test(migrations = "./migrations")]
async fn upload_train_follow_download_merge_predict_over_http(db: PgPool) {
    let Some(fx) = common::fixtures() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("file://{}", tmp.path().join("objects").display());
    let storage = Storage::from_url(&url, &S3Settings::default()).unwrap();
    let models_dir = fx.root.join("models");
    let st = state_with(
        db.clone(),
        &[
            "--models-dir",
            models_dir.to_str().unwrap(),
            "--data-dir",
            tmp.path().join("data").to_str().unwrap(),
        ],
        Some(storage.clone()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router(st)).await.unwrap() });
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let worker = tokio::spawn(worker_loop(
        WorkerCtx {
            db: db.clone(),
            storage,
            queue: QueueConfig::default(),
            worker_id: "e2e-worker".into(),
            work_dir: tmp.path().join("work"),
            heartbeat: Duration::from_secs(1),
            cancels: sparsegrad_service::db::listen::JobSignals::new(
                db.clone(),
                sparsegrad_service::queue::CANCEL_CHANNEL,
            ),
            drain: tokio::sync::watch::channel(false).1,
            cache_dir: Some(tmp.path().join("cache")),
            model_cache: tmp.path().join("model-cache"),
            device: candle_core::Device::Cpu,
        },
        stop,
        sparsegrad_service::db::listen::JobSignals::new(
            db.clone(),
            sparsegrad_service::queue::QUEUED_CHANNEL,
        ),
    ));

    let http = reqwest::Client::new();
    let post = |path: &str, key: &str, body: Value| {
        http.post(format!("{base}{path}"))
            .bearer_auth(key)
            .json(&body)
            .send()
    };
    let t: Value = post("/v1/admin/tenants", ADMIN, json!({"name": "e2e"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let k: Value = post("/v1/admin/api_keys", ADMIN, json!({"tenant_id": t["id"]}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = k["key"].as_str().unwrap().to_string();
    let get = |path: String| http.get(format!("{base}{path}")).bearer_auth(&key).send();
    let upload = |name: &str, data: String| {
        http.post(format!("{base}/v1/files?purpose=fine-tune&filename={name}"))
            .bearer_auth(&key)
            .body(data)
            .send()
    };
    let train: Value = upload("train.jsonl", head(&fx.rt_polarity_train, 320))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(train["rows"], 320, "{train}");
    let dev_rows = head(&fx.rt_polarity_dev, 64);
    let valid: Value = upload("dev.jsonl", dev_rows.clone())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();

    let r = post(
        "/v1/fine_tuning/jobs",
        &key,
        json!({
            "model": "all-minilm-l6-v2",
            "training_file": train["id"],
            "validation_file": valid["id"],
            "seed": 11,
            "method": {"type": "sparsegrad", "hyperparameters": {
                "max_steps": 12, "batch_size": 16, "max_seq_len": 64, "basis_steps": 4,
                "eval_every": 6, "checkpoint_every": 6, "schedule": "constant"
            }}
        }),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let job: Value = r.json().await.unwrap();
    let id = job["id"].as_str().unwrap().to_string();

    // Follow the events until the stream ends (it does once the job is final).
    let resp = http
        .get(format!("{base}/v1/fine_tuning/jobs/{id}/events"))
        .bearer_auth(&key)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    let mut text = String::new();
    let followed = tokio::time::timeout(Duration::from_secs(600), async {
        while let Some(chunk) = stream.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
    })
    .await;
    assert!(followed.is_ok(), "the job did not finish in 10 minutes");
    let events: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let statuses: Vec<&str> = events
        .iter()
        .filter(|e| e["category"] == "status" && e["type"] == "message")
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["queued", "running", "succeeded"], "{text}");
    let steps = events
        .iter()
        .filter(|e| e["type"] == "metrics" && e["data"]["step"].is_number())
        .count();
    assert!(steps >= 12, "{steps} metric events");

    let job: Value = get(format!("/v1/fine_tuning/jobs/{id}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["trained_steps"], 12);
    let acc = job["result"]["eval"]["accuracy"].as_f64().unwrap();
    eprintln!("e2e: dev accuracy after 12 steps {acc:.3}, job {job}");

    // Download the delta over HTTP and check it against its listed digest.
    let arts: Value = get(format!("/v1/fine_tuning/jobs/{id}/artifacts"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let delta = arts["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "delta.safetensors")
        .unwrap()
        .clone();
    let bytes = get(delta["content_url"].as_str().unwrap().to_string())
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(
        sparsegrad_engine::io::sha256_bytes(&bytes),
        delta["sha256"].as_str().unwrap()
    );
    let delta_dir = tmp.path().join("downloaded-delta");
    std::fs::create_dir_all(&delta_dir).unwrap();
    std::fs::write(delta_dir.join("delta.safetensors"), &bytes).unwrap();

    // Merge, and wait for it.
    let r = post(&format!("/v1/fine_tuning/jobs/{id}/merge"), &key, json!({}))
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let merged = tokio::time::timeout(Duration::from_secs(300), async {
        loop {
            let j: Value = get(format!("/v1/fine_tuning/jobs/{id}"))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            match j["merge"]["status"].as_str() {
                Some("succeeded") => return,
                Some("failed") => panic!("merge failed: {j}"),
                _ => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
    })
    .await;
    assert!(merged.is_ok(), "merge did not finish");

    // Predict through the API: base + delta.
    let inputs: Vec<Value> = dev_rows
        .lines()
        .take(12)
        .map(|l| json!({"text": serde_json::from_str::<Value>(l).unwrap()["text"]}))
        .collect();
    let r = post(
        &format!("/v1/fine_tuning/jobs/{id}/predict"),
        &key,
        json!({"inputs": inputs}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let api: Value = r.json().await.unwrap();
    let api = api["data"].as_array().unwrap().clone();

    // The same job trained in memory here (same spec, same data, same seed).
    let spec_row: (Value,) = sqlx::query_as("select spec from jobs where id = $1")
        .bind(&id)
        .fetch_one(&db)
        .await
        .unwrap();
    let spec: FineTune = serde_json::from_value(spec_row.0).unwrap();
    let (tr, dv) = (tmp.path().join("t.jsonl"), tmp.path().join("d.jsonl"));
    std::fs::write(&tr, head(&fx.rt_polarity_train, 320)).unwrap();
    std::fs::write(&dv, &dev_rows).unwrap();
    let engine = spec.run_spec(fx.minilm.clone(), tr, Some(dv));
    let inputs_typed: Vec<sparsegrad_engine::train::PredictInput> =
        serde_json::from_value(Value::Array(inputs.clone())).unwrap();
    let local = tokio::task::spawn_blocking(move || {
        let cancel = AtomicBool::new(false);
        let mut on_event = |_: &sparsegrad_engine::train::Event| {};
        let out = sparsegrad_engine::pipeline::run_job(
            &engine,
            &candle_core::Device::Cpu,
            sparsegrad_engine::train::TrainIo::new(&mut on_event, &cancel),
        )
        .unwrap();
        let labels = out.artifact.descriptor.labels.clone();
        let tok = sparsegrad_engine::data::TextTokenizer::from_dir(&engine.model_dir).unwrap();
        sparsegrad_engine::train::predict(&out.model, &tok, labels.as_ref(), &inputs_typed, 64, 1)
            .unwrap()
    })
    .await
    .unwrap();
    let local: Vec<Value> = local
        .iter()
        .map(|p| serde_json::to_value(p).unwrap())
        .collect();

    // And the merged model, downloaded through the API.
    let merged_dir = tmp.path().join("merged");
    std::fs::create_dir_all(&merged_dir).unwrap();
    let arts: Value = get(format!("/v1/fine_tuning/jobs/{id}/artifacts"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for a in arts["data"].as_array().unwrap() {
        if a["kind"] == "merged" {
            let b = get(a["content_url"].as_str().unwrap().to_string())
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            std::fs::write(merged_dir.join(a["name"].as_str().unwrap()), &b).unwrap();
        }
    }
    let merged = common::predict_folder(&merged_dir, &Value::Array(inputs.clone()), 64);

    let labels = |v: &[Value]| -> Vec<String> {
        v.iter()
            .map(|p| p["label"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(labels(&api), labels(&local), "API vs in-memory");
    assert_eq!(labels(&api), labels(&merged), "API vs merged");
    for ((a, l), m) in api.iter().zip(&local).zip(&merged) {
        for k in 0..2 {
            let pa = a["probabilities"][k].as_f64().unwrap();
            assert!(
                (pa - l["probabilities"][k].as_f64().unwrap()).abs() < 1e-4,
                "{a} {l}"
            );
            assert!(
                (pa - m["probabilities"][k].as_f64().unwrap()).abs() < 1e-4,
                "{a} {m}"
            );
        }
    }
    eprintln!("e2e: predicted labels {:?}", labels(&api));

    stop_tx.send(true).unwrap();
    worker.await.unwrap();
}

/// `POST /v1/models` imports the real SmolLM2 GGUF from storage: a LLaMA model registered
/// for the tenant, its folder equal to the command-line import's (same config, same tensors).
#[sqlx::test(migrations = "./migrations")]
async fn gguf_import_through_the_api(db: PgPool) {
    let Some(fx) = common::fixtures() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("file://{}", tmp.path().join("objects").display());
    let storage = Storage::from_url(&url, &S3Settings::default()).unwrap();
    let st = state_with(
        db.clone(),
        &["--data-dir", tmp.path().join("data").to_str().unwrap()],
        Some(storage.clone()),
    );
    let (tenant, key) = common::api::tenant_key(&st, "acme").await;
    storage
        .put_file("imports/smollm2.gguf", &fx.smollm2_gguf)
        .await
        .unwrap();
    let (s, m) = common::api::post_json(
        &st,
        "/v1/models",
        Some(&key),
        json!({"id": "smollm2", "source": {"type": "gguf", "key": "imports/smollm2.gguf"}}),
    )
    .await;
    assert_eq!(s, axum::http::StatusCode::OK, "{m}");
    assert_eq!(m["architecture"], "llama");
    assert_eq!(m["owned_by"], tenant.as_str());
    // The stored folder is what `sparsegrad import-gguf` (the fixture) produced.
    // (under the model's area, in a folder of that import's own)
    let listed = storage
        .list(&format!("tenants/{tenant}/models/smollm2"))
        .await
        .unwrap();
    let config_key = listed
        .iter()
        .find(|k| k.ends_with("/config.json"))
        .expect("an imported config.json");
    let prefix = config_key.trim_end_matches("/config.json").to_string();
    let mut stored: Value =
        serde_json::from_slice(&storage.get(&format!("{prefix}/config.json")).await.unwrap())
            .unwrap();
    assert_eq!(stored["imported_from"], "smollm2.gguf");
    stored["imported_from"] = json!("SmolLM2-135M-Instruct.Q4_1.gguf");
    let reference: Value =
        serde_json::from_slice(&std::fs::read(fx.smollm2.join("config.json")).unwrap()).unwrap();
    assert_eq!(stored, reference);
    let weights = storage
        .get(&format!("{prefix}/model.safetensors"))
        .await
        .unwrap();
    let want = std::fs::read(fx.smollm2.join("model.safetensors")).unwrap();
    assert_eq!(
        sparsegrad_engine::io::sha256_bytes(&weights),
        sparsegrad_engine::io::sha256_bytes(&want)
    );
    let (s, l) = common::api::get(&st, "/v1/models/smollm2", &key).await;
    assert_eq!((s.as_u16(), l["source"].clone()), (200, json!("storage")));
    // No scratch left behind.
    let work = tmp.path().join("data/work");
    assert!(!work.exists() || std::fs::read_dir(&work).unwrap().next().is_none());
}
