//! OpenAI's inference routes over real HTTP with a real worker: a tiny LLaMA fine-tuned by the
//! service, served as an overlay by the inference engine, answers as the merged model does;
//! streams concatenate to the whole answer; tenants see only their own fine-tunes; the queue
//! is bounded; a client that leaves stops its generation; bad requests name their field.

mod common;

use axum::http::StatusCode;
use common::api::{assert_envelope, post_json, served, state_with, tenant_key, upload};
use rand::Rng;
use serde_json::{json, Value};
use sparsegrad_engine::models::Arch;
use sparsegrad_engine::testing::{write_tiny_model_dir, TINY_WORDS};
use sparsegrad_service::api::AppState;
use sparsegrad_service::storage::{S3Settings, Storage};
use sparsegrad_service::worker::{try_run_one, Outcome, WorkerCtx};
use sqlx::PgPool;

struct Env {
    tmp: tempfile::TempDir,
    st: AppState,
}

/// A state whose models folder holds `tiny-llama` and `tiny-bert`, with `extra` flags.
fn env_with(db: PgPool, extra: &[&str]) -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("file://{}", tmp.path().join("objects").display());
    let storage = Storage::from_url(&url, &S3Settings::default()).unwrap();
    let data = tmp.path().join("data");
    let models = tmp.path().join("models");
    write_tiny_model_dir(&models.join("tiny-llama"), Arch::Llama, 1).unwrap();
    write_tiny_model_dir(&models.join("tiny-bert"), Arch::Bert, 1).unwrap();
    let mut flags = vec![
        "--data-dir",
        data.to_str().unwrap(),
        "--models-dir",
        models.to_str().unwrap(),
    ];
    flags.extend_from_slice(extra);
    Env {
        st: state_with(db, &flags, Some(storage)),
        tmp,
    }
}

fn worker(e: &Env) -> WorkerCtx {
    common::api::worker_ctx(&e.st, e.tmp.path())
}

fn sft_rows(n: usize, seed: u64) -> String {
    let mut rng = sparsegrad_engine::rng::stream(seed, "sft", 0);
    let mut words = |k: usize| {
        (0..k)
            .map(|_| TINY_WORDS[rng.random_range(0..TINY_WORDS.len())])
            .collect::<Vec<_>>()
            .join(" ")
    };
    (0..n)
        .map(|_| json!({"prompt": words(5), "completion": words(3)}).to_string() + "\n")
        .collect()
}

/// A succeeded fine-tune of tiny-llama with `method`: its `fine_tuned_model` and job id.
async fn fine_tune(e: &Env, key: &str, method: Value, suffix: Option<&str>) -> (String, String) {
    let f = upload(&e.st, key, "sft.jsonl", &sft_rows(24, 3)).await;
    let mut body = json!({"model": "tiny-llama", "training_file": f["id"], "method": method});
    if let Some(s) = suffix {
        body["suffix"] = s.into();
    }
    let (s, j) = post_json(&e.st, "/v1/fine_tuning/jobs", Some(key), body).await;
    assert_eq!(s, StatusCode::OK, "{j}");
    match try_run_one(&worker(e)).await.unwrap() {
        Outcome::Ran { status, .. } => assert_eq!(status, "succeeded"),
        other => panic!("{other:?}"),
    }
    let id = j["id"].as_str().unwrap().to_string();
    let (_, j) = common::api::get(&e.st, &format!("/v1/fine_tuning/jobs/{id}"), key).await;
    (j["fine_tuned_model"].as_str().unwrap().to_string(), id)
}

/// The `data:` payloads of a server-sent-events body.
fn sse_data(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(str::to_string)
        .collect()
}

/// The concatenated text of a stream's chunks, its finish reason and its usage chunk.
fn collect_stream(chunks: &[String], chat: bool) -> (String, String, Option<Value>) {
    assert_eq!(
        chunks.last().map(String::as_str),
        Some("[DONE]"),
        "{chunks:?}"
    );
    let mut text = String::new();
    let mut finish = String::new();
    let mut usage = None;
    for (i, c) in chunks[..chunks.len() - 1].iter().enumerate() {
        let v: Value = serde_json::from_str(c).unwrap();
        let object = if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        assert_eq!(v["object"], object, "{v}");
        let choices = v["choices"].as_array().unwrap();
        if choices.is_empty() {
            usage = Some(v["usage"].clone());
            continue;
        }
        let c = &choices[0];
        if chat && i == 0 {
            assert_eq!(c["delta"]["role"], "assistant", "{v}");
        }
        let piece = if chat {
            &c["delta"]["content"]
        } else {
            &c["text"]
        };
        text.push_str(piece.as_str().unwrap_or_default());
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (text, finish, usage)
}

async fn stream_post(st: &AppState, uri: &str, key: &str, body: Value) -> (StatusCode, Vec<u8>) {
    let addr = served(st).unwrap();
    let r = reqwest::Client::new()
        .post(format!("http://{addr}{uri}"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let s = r.status();
    (s, r.bytes().await.unwrap().to_vec())
}

/// What the merged model (base + delta applied to the weights, in memory) generates greedily.
fn merged_completion(e: &Env, job_id: &str, input: Value, max_new: usize) -> String {
    merged_completion_within(e, job_id, input, 64, max_new)
}

/// [`merged_completion`] within `max_len` tokens of prompt and completion.
fn merged_completion_within(
    e: &Env,
    job_id: &str,
    input: Value,
    max_len: usize,
    max_new: usize,
) -> String {
    let objects = e.tmp.path().join("objects");
    let delta = walk(&objects)
        .into_iter()
        .find(|p| p.ends_with("delta.safetensors") && p.to_string_lossy().contains(job_id))
        .expect("the job's delta in storage");
    let art = sparsegrad_engine::artifact::Artifact::load(&delta).unwrap();
    let (model, tok, _) = sparsegrad_engine::pipeline::load_for_inference(
        &e.tmp.path().join("models/tiny-llama"),
        Some(&art),
        None,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let input: sparsegrad_engine::train::PredictInput = serde_json::from_value(input).unwrap();
    match &sparsegrad_engine::train::predict(&model, &tok, None, &[input], max_len, max_new)
        .unwrap()[0]
    {
        sparsegrad_engine::train::Prediction::Text { completion } => completion.clone(),
        other => panic!("{other:?}"),
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[sqlx::test(migrations = "./migrations")]
async fn fine_tunes_answer_chat_and_text_completions_as_their_merged_models(db: PgPool) {
    let e = env_with(db, &[]);
    let (_, key) = tenant_key(&e.st, "acme").await;
    let hp = json!({"max_steps": 3, "batch_size": 4, "max_seq_len": 16});
    let (sg, sg_id) = fine_tune(
        &e,
        &key,
        json!({"type": "sparsegrad", "hyperparameters": hp}),
        Some("sg"),
    )
    .await;
    let (lora, lora_id) = fine_tune(
        &e,
        &key,
        json!({"type": "lora", "hyperparameters": hp}),
        None,
    )
    .await;
    assert!(sg.starts_with("ft:tiny-llama:sg:"), "{sg}");
    let messages = json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello how are you"}]);
    for (model, id) in [(&sg, &sg_id), (&lora, &lora_id)] {
        let body = json!({"model": model, "messages": messages, "max_tokens": 6, "temperature": 0});
        let (s, v) = post_json(&e.st, "/v1/chat/completions", Some(&key), body.clone()).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], model.as_str());
        let choice = &v["choices"][0];
        assert_eq!(choice["message"]["role"], "assistant");
        let content = choice["message"]["content"].as_str().unwrap().to_string();
        let usage = &v["usage"];
        let completion_tokens = usage["completion_tokens"].as_u64().unwrap();
        assert!(completion_tokens <= 6);
        assert_eq!(
            usage["total_tokens"].as_u64().unwrap(),
            usage["prompt_tokens"].as_u64().unwrap() + completion_tokens
        );
        let finish = choice["finish_reason"].as_str().unwrap();
        assert!(
            (finish == "length") == (completion_tokens == 6),
            "{finish} after {completion_tokens}"
        );
        // The overlay answers as the delta merged into the weights does.
        let want = merged_completion(&e, id, json!({"messages": messages}), 6);
        assert_eq!(content, want, "{model}");
        // So does the job's predict route (its completions join the engine's streams).
        let (s, p) = post_json(
            &e.st,
            &format!("/v1/fine_tuning/jobs/{id}/predict"),
            Some(&key),
            json!({"inputs": [{"messages": messages}, {"prompt": "the film was"}], "max_new_tokens": 6}),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{p}");
        // Predictions keep within the job's max_seq_len (16 here), as before.
        let within = |input| merged_completion_within(&e, id, input, 16, 6);
        assert_eq!(
            p["data"][0]["completion"],
            within(json!({"messages": messages}))
        );
        assert_eq!(
            p["data"][1]["completion"],
            within(json!({"prompt": "the film was"}))
        );

        // Streamed: the chunks concatenate to the same answer; the usage chunk agrees.
        let mut sb = body.clone();
        sb["stream"] = true.into();
        sb["stream_options"] = json!({"include_usage": true});
        let (s, bytes) = stream_post(&e.st, "/v1/chat/completions", &key, sb).await;
        assert_eq!(s, StatusCode::OK);
        let (text, f, u) = collect_stream(&sse_data(&bytes), true);
        assert_eq!(text, content);
        assert_eq!(f, finish);
        assert_eq!(u.unwrap(), *usage);

        // Text completions: a prompt, OpenAI's default of 16 tokens.
        let body = json!({"model": model, "prompt": "the film was", "temperature": 0});
        let (s, v) = post_json(&e.st, "/v1/completions", Some(&key), body.clone()).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["object"], "text_completion");
        let text = v["choices"][0]["text"].as_str().unwrap().to_string();
        assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 16);
        assert_eq!(
            text,
            merged_completion(&e, id, json!({"prompt": "the film was"}), 16)
        );
        let mut sb = body;
        sb["stream"] = true.into();
        let (_, bytes) = stream_post(&e.st, "/v1/completions", &key, sb).await;
        assert_eq!(collect_stream(&sse_data(&bytes), false).0, text);
    }
    // One overlay per fine-tune, however often it is asked for; the base loaded once.
    let stats = e.st.inference.stats();
    assert_eq!(stats.overlay_loads, 2, "{stats:?}");
    assert_eq!(stats.base_loads, 1, "{stats:?}");
    assert_eq!(stats.resident_deltas, 2);
    assert_eq!(stats.pending, 0);

    // A base model serves too; a stop sequence ends the answer before it.
    let body =
        json!({"model": "tiny-llama", "prompt": "good film", "max_tokens": 12, "temperature": 0});
    let (s, v) = post_json(&e.st, "/v1/completions", Some(&key), body.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let full = v["choices"][0]["text"].as_str().unwrap().to_string();
    let words: Vec<&str> = full.split_whitespace().collect();
    if words.len() >= 3 {
        let mut b = body.clone();
        b["stop"] = json!([words[2]]);
        let (_, v) = post_json(&e.st, "/v1/completions", Some(&key), b).await;
        let cut = v["choices"][0]["text"].as_str().unwrap();
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert!(
            full.starts_with(cut) && !cut.contains(words[2]),
            "{cut:?} of {full:?}"
        );
    }

    // Another tenant cannot serve these fine-tunes (404, as for a model that does not exist).
    let (_, other) = tenant_key(&e.st, "other").await;
    for m in [&sg, &lora] {
        let body = json!({"model": m, "messages": messages});
        let (s, v) = post_json(&e.st, "/v1/chat/completions", Some(&other), body).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
        assert_eq!(v["error"]["param"], "model");
        assert_eq!(v["error"]["code"], "model_not_found");
    }
}

#[sqlx::test(migrations = "./migrations")]
async fn bad_completion_requests_name_their_field(db: PgPool) {
    let e = env_with(
        db,
        &[
            "--max-context-tokens",
            "12",
            "--max-completion-tokens",
            "50",
        ],
    );
    let (_, key) = tenant_key(&e.st, "acme").await;
    let m = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        (
            json!({"model": "tiny-llama", "messages": m, "n": 2}),
            400,
            "n",
        ),
        (
            json!({"model": "tiny-llama", "messages": m, "temperature": 3}),
            400,
            "temperature",
        ),
        (
            json!({"model": "tiny-llama", "messages": m, "top_p": 0}),
            400,
            "top_p",
        ),
        (
            json!({"model": "tiny-llama", "messages": m, "max_tokens": 0}),
            400,
            "max_tokens",
        ),
        (
            json!({"model": "tiny-llama", "messages": m, "max_tokens": 51}),
            400,
            "max_tokens",
        ),
        (
            json!({"model": "tiny-llama", "messages": m, "max_completion_tokens": 51}),
            400,
            "max_completion_tokens",
        ),
        (
            json!({"model": "tiny-llama", "messages": m, "stop": ["a", "b", "c", "d", "e"]}),
            400,
            "stop",
        ),
        (
            json!({"model": "tiny-llama", "messages": []}),
            400,
            "messages",
        ),
        (
            json!({"model": "tiny-llama", "messages": [{"role": "tool", "content": "x"}]}),
            400,
            "messages[0].role",
        ),
        (
            json!({"model": "tiny-llama", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            400,
            "messages[0].content[0]",
        ),
        (
            json!({"model": "tiny-llama", "prompt": "hi"}),
            400,
            "prompt",
        ),
        (json!({"model": "tiny-llama"}), 400, "messages"),
        (
            json!({"model": "tiny-llama", "messages": m, "logit_bias": {}}),
            400,
            "logit_bias",
        ),
        (json!({"model": "", "messages": m}), 400, "model"),
        (
            json!({"model": "x".repeat(300), "messages": m}),
            400,
            "model",
        ),
        (json!({"model": "nope", "messages": m}), 404, "model"),
        (
            json!({"model": "ft:tiny-llama:ftjob_0000", "messages": m}),
            404,
            "model",
        ),
        // An encoder completes no text.
        (json!({"model": "tiny-bert", "messages": m}), 400, "model"),
        // Past the context the config allows.
        (
            json!({"model": "tiny-llama", "messages": [{"role": "user", "content": "hello ".repeat(40)}]}),
            400,
            "messages",
        ),
    ];
    for (body, status, param) in cases {
        let (s, v) = post_json(&e.st, "/v1/chat/completions", Some(&key), body.clone()).await;
        assert_eq!(s.as_u16(), status, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
        assert_envelope(
            &v,
            if status == 404 {
                "not_found_error"
            } else {
                "invalid_request_error"
            },
        );
    }
    for (body, param) in [
        (json!({"model": "tiny-llama", "messages": m}), "messages"),
        (
            json!({"model": "tiny-llama", "prompt": "hi", "max_completion_tokens": 3}),
            "max_completion_tokens",
        ),
        (json!({"model": "tiny-llama"}), "prompt"),
        (
            json!({"model": "tiny-llama", "prompt": "hello ".repeat(40)}),
            "prompt",
        ),
    ] {
        let (s, v) = post_json(&e.st, "/v1/completions", Some(&key), body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
    }
    let (s, _) = post_json(
        &e.st,
        "/v1/completions",
        None,
        json!({"model": "tiny-llama", "prompt": "hi"}),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(e.st.inference.stats().pending, 0);
}

#[sqlx::test(migrations = "./migrations")]
async fn a_full_inference_queue_answers_429_and_frees_its_places(db: PgPool) {
    let e = env_with(
        db,
        &[
            "--inference-max-queue",
            "2",
            "--inference-max-per-tenant",
            "1",
        ],
    );
    let (ta, a) = tenant_key(&e.st, "a").await;
    let (_, b) = tenant_key(&e.st, "b").await;
    let body = json!({"model": "tiny-llama", "prompt": "hi", "max_tokens": 2});
    // Tenant a holds its one place: its next request is refused, b's is not.
    let held = e.st.inference.admit(&ta).unwrap();
    let r = common::api::request(
        &e.st,
        "POST",
        "/v1/completions",
        Some(&a),
        axum::body::Body::from(body.to_string()),
        &[("content-type", "application/json")],
    )
    .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.json);
    assert_eq!(r.json["error"]["code"], "too_many_inference_requests");
    assert!(r.headers.contains_key("retry-after"));
    let (s, v) = post_json(&e.st, "/v1/completions", Some(&b), body.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // The whole engine full: everyone waits.
    let held2 = e.st.inference.admit("c").unwrap();
    let (s, v) = post_json(&e.st, "/v1/completions", Some(&b), body.clone()).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(v["error"]["code"], "server_busy");
    drop((held, held2));
    let (s, v) = post_json(&e.st, "/v1/completions", Some(&a), body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(e.st.inference.stats().pending, 0);
}

/// A state whose `tiny-llama` never ends on its own (no end-of-sequence token, positions to
/// spare) and whose limits allow long completions.
fn endless(db: PgPool, extra: &[&str]) -> Env {
    let mut flags = vec![
        "--max-context-tokens",
        "1000000",
        "--max-completion-tokens",
        "1000000",
    ];
    flags.extend_from_slice(extra);
    let e = env_with(db, &flags);
    let dir = e.tmp.path().join("models/tiny-llama");
    let mut cfg: Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    cfg["max_position_embeddings"] = 1_000_000.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"pad_token": "[PAD]"}"#,
    )
    .unwrap();
    e
}

/// The key/value cache is budgeted: a completion that could never fit is a 400 about
/// `max_tokens`; one that does not fit beside a running one waits until it ends, then runs.
#[sqlx::test(migrations = "./migrations")]
async fn completions_wait_for_room_in_the_cache_budget(db: PgPool) {
    // tiny-llama keeps 2 layers × 2 (K, V) × 8 × 4 bytes = 128 bytes per token: 1 MiB holds
    // 8,192 tokens.
    let e = endless(db, &["--inference-kv-budget-mb", "1"]);
    let (_, key) = tenant_key(&e.st, "acme").await;
    let body = json!({"model": "tiny-llama", "prompt": "hi", "max_tokens": 9000});
    let (s, v) = post_json(&e.st, "/v1/completions", Some(&key), body).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["param"], "max_tokens");
    // 5,000 tokens each: the second waits for the first.
    let addr = served(&e.st).unwrap();
    let open = move |key: String| async move {
        reqwest::Client::new()
            .post(format!("http://{addr}/v1/completions"))
            .bearer_auth(&key)
            .json(
                &json!({"model": "tiny-llama", "prompt": "hi", "max_tokens": 5000, "stream": true}),
            )
            .send()
            .await
            .unwrap()
    };
    let mut first = open(key.clone()).await;
    assert_eq!(first.status(), StatusCode::OK);
    first.chunk().await.unwrap().expect("the first streams");
    let second = tokio::spawn({
        let key = key.clone();
        async move {
            let mut r = open(key).await;
            r.chunk().await.unwrap().expect("the second streams");
            std::time::Instant::now()
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(!second.is_finished(), "the second ran beside the first");
    assert_eq!(e.st.inference.stats().pending, 2);
    let left = std::time::Instant::now();
    drop(first);
    let started = tokio::time::timeout(std::time::Duration::from_secs(20), second)
        .await
        .expect("the second starts once the first is gone")
        .unwrap();
    assert!(started >= left);
}

#[sqlx::test(migrations = "./migrations")]
async fn a_client_that_leaves_stops_its_generation(db: PgPool) {
    let e = endless(db, &[]);
    let (_, key) = tenant_key(&e.st, "acme").await;
    let addr = served(&e.st).unwrap();
    let mut r = reqwest::Client::new()
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(
            &json!({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 1_000_000, "stream": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let mut got = 0;
    while got < 3 {
        r.chunk().await.unwrap().expect("a chunk");
        got += 1;
    }
    drop(r);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while e.st.inference.stats().abandoned == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            e.st.inference.stats()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let stats = e.st.inference.stats();
    assert_eq!(stats.pending, 0, "{stats:?}");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        e.st.inference.stats().tokens,
        stats.tokens,
        "tokens after the client left"
    );
}
