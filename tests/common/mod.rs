//! Shared by the integration tests: the real-model fixtures (fetched by `sparsegrad fixtures`,
//! which `.ci/run` runs first). Outside CI a test without fixtures is skipped loudly; in CI a
//! missing fixture fails the run.
#![allow(dead_code)]

pub mod api;

use sparsegrad_service::tools::fixtures::{default_root, ensure, Fixtures};

pub fn fixtures() -> Option<Fixtures> {
    let root = std::env::var_os("SPARSEGRAD_FIXTURES")
        .map(Into::into)
        .unwrap_or_else(|| {
            default_root(
                std::env::var_os("XDG_CACHE_HOME").map(Into::into),
                std::env::var_os("HOME").map(Into::into),
            )
        });
    match ensure(&root) {
        Ok(f) => Some(f),
        Err(e) if std::env::var_os("CI").is_some() => panic!("fixtures unavailable in CI: {e:#}"),
        Err(e) => {
            eprintln!("\n*** SKIPPING: real-model fixtures unavailable ({e:#}); run `sparsegrad fixtures` ***\n");
            None
        }
    }
}

#[allow(unused_imports)]
pub use sparsegrad_engine::testing::max_abs_diff;

/// The S3-compatible test server (`scripts/s3-test-server.sh`, started by `scripts/test.sh`):
/// its endpoint, with a fresh bucket created for the caller. Skipped loudly outside CI when
/// no server runs; a failure in CI.
pub fn s3_bucket(name: &str) -> Option<String> {
    let Some(endpoint) = std::env::var("SPARSEGRAD_TEST_S3_ENDPOINT").ok() else {
        if std::env::var_os("CI").is_some() {
            panic!("SPARSEGRAD_TEST_S3_ENDPOINT is not set in CI");
        }
        eprintln!(
            "\n*** SKIPPING: no S3 test server (run the tests through scripts/test.sh) ***\n"
        );
        return None;
    };
    // Bucket creation is a bare `PUT /bucket` (moto checks no signature).
    use std::io::{Read, Write};
    let hostport = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let mut s = std::net::TcpStream::connect(hostport).expect("S3 test server reachable");
    write!(
        s,
        "PUT /{name} HTTP/1.1\r\nHost: {hostport}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(
        resp.starts_with("HTTP/1.1 200"),
        "creating bucket {name}: {resp}"
    );
    Some(endpoint)
}

/// `n` labelled rows over the tiny test vocabulary (`pos` when the text has a positive word).
pub fn tiny_rows(n: usize, seed: u64) -> String {
    use rand::Rng;
    use sparsegrad_engine::testing::TINY_WORDS;
    let mut rng = sparsegrad_engine::rng::stream(seed, "rows", 0);
    let mut s = String::new();
    for _ in 0..n {
        let k = rng.random_range(3..8);
        let text: Vec<&str> = (0..k)
            .map(|_| TINY_WORDS[rng.random_range(0..TINY_WORDS.len())])
            .collect();
        let text = text.join(" ");
        let positive = ["good", "great", "fine", "fun", "love"];
        let label = if text.split(' ').any(|w| positive.contains(&w)) {
            "pos"
        } else {
            "neg"
        };
        s.push_str(&serde_json::json!({"text": text, "label": label}).to_string());
        s.push('\n');
    }
    s
}

/// Predictions of a merged Hugging Face folder (its config carries the labels).
pub fn predict_folder(
    dir: &std::path::Path,
    inputs: &serde_json::Value,
    max_len: usize,
) -> Vec<serde_json::Value> {
    use sparsegrad_engine::models::Task;
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let names: Vec<String> = {
        let m = cfg["id2label"].as_object().unwrap();
        (0..m.len())
            .map(|i| m[&i.to_string()].as_str().unwrap().to_string())
            .collect()
    };
    let (model, tok, _) = sparsegrad_engine::pipeline::load_for_inference(
        dir,
        None,
        Some(Task::Classification {
            num_labels: names.len(),
        }),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let labels = sparsegrad_engine::data::LabelMap { names };
    let inputs: Vec<sparsegrad_engine::train::PredictInput> =
        serde_json::from_value(inputs.clone()).unwrap();
    let p = sparsegrad_engine::train::predict(&model, &tok, Some(&labels), &inputs, max_len, 1)
        .unwrap();
    p.iter().map(|p| serde_json::to_value(p).unwrap()).collect()
}

/// A small SparseGrad fine-tune of the tiny BERT folder `model` on the object `key`.
pub fn tiny_fine_tune(
    model: &std::path::Path,
    key: &str,
    steps: usize,
    checkpoint_every: Option<usize>,
) -> sparsegrad_service::domain::FineTune {
    use sparsegrad_engine::methods::{MethodSpec, SparseGradConfig};
    use sparsegrad_service::domain::{FileRef, FineTune, ModelSource};
    FineTune {
        base: ModelSource::Dir {
            path: model.to_path_buf(),
        },
        model: "tiny-bert".into(),
        training_file: FileRef {
            id: "file_1".into(),
            object_key: key.into(),
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
            lr: 1e-2,
            schedule: sparsegrad_engine::optim::Schedule::Constant,
            seed: 5,
            checkpoint_every,
            ..Default::default()
        },
        max_seq_len: 16,
        task: None,
    }
}

/// Settings for the S3 test server at `endpoint` (its credentials; short retries).
pub fn s3_test_settings(
    endpoint: &str,
    retries: usize,
    retry_timeout: std::time::Duration,
) -> sparsegrad_service::storage::S3Settings {
    sparsegrad_service::storage::S3Settings {
        endpoint: Some(endpoint.into()),
        region: Some("us-east-1".into()),
        access_key_id: Some("test".into()),
        secret_access_key: Some("test".into()),
        allow_http: true,
        max_retries: Some(retries),
        retry_timeout: Some(retry_timeout),
    }
}
