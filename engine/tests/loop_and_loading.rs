//! Loading variants (sharded index, prefixes, old LayerNorm names), AdamW and schedules against
//! their formulas, gradient accumulation equivalence, device errors.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor, Var};
use sparsegrad_engine::io::write_safetensors;
use sparsegrad_engine::methods::MethodSpec;
use sparsegrad_engine::models::{Arch, Task};
use sparsegrad_engine::optim::{lr_at, AdamConfig, AdamW, Schedule};
use sparsegrad_engine::pipeline::{run_job, RunSpec};
use sparsegrad_engine::pretrained::{load_model, LoadOptions};
use sparsegrad_engine::testing::{write_tiny_model_dir, TINY_WORDS};
use sparsegrad_engine::train::{TrainConfig, TrainIo};

fn opts(task: Task) -> LoadOptions {
    LoadOptions {
        task,
        dtype: DType::F32,
        device: Device::Cpu,
        seed: 3,
    }
}

#[test]
fn sharded_unprefixed_and_gamma_beta_checkpoints_load_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let single = tmp.path().join("single");
    write_tiny_model_dir(&single, Arch::Bert, 4).unwrap();
    let task = Task::Classification { num_labels: 2 };
    let (reference, _) = load_model(&single, &opts(task.clone())).unwrap();

    // The same weights as an old-style BertModel checkpoint: no `bert.` prefix,
    // LayerNorm.gamma/beta, split over two shards with an index.
    let sharded = tmp.path().join("sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(single.join(f), sharded.join(f)).unwrap();
    }
    let tensors =
        candle_core::safetensors::load(single.join("model.safetensors"), &Device::Cpu).unwrap();
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    let mut map = serde_json::Map::new();
    for (i, (k, v)) in tensors.into_iter().enumerate() {
        let name = k
            .strip_prefix("bert.")
            .unwrap()
            .replace("LayerNorm.weight", "LayerNorm.gamma")
            .replace("LayerNorm.bias", "LayerNorm.beta");
        let (shard, file) = if i % 2 == 0 {
            (&mut a, "model-00001-of-00002.safetensors")
        } else {
            (&mut b, "model-00002-of-00002.safetensors")
        };
        map.insert(name.clone(), file.into());
        shard.insert(name, v);
    }
    a.insert(
        "embeddings.position_ids".into(),
        Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
    );
    write_safetensors(&a, None, &sharded.join("model-00001-of-00002.safetensors")).unwrap();
    write_safetensors(&b, None, &sharded.join("model-00002-of-00002.safetensors")).unwrap();
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();

    let (m, report) = load_model(&sharded, &opts(task)).unwrap();
    assert!(
        report.ignored.iter().any(|n| n.contains("position_ids")),
        "{:?}",
        report.ignored
    );
    let mut init = report.initialised.clone();
    init.sort();
    assert_eq!(
        init,
        vec![
            "bert.pooler.dense.bias",
            "bert.pooler.dense.weight",
            "classifier.bias",
            "classifier.weight"
        ]
    );
    assert_eq!(
        m.weights.params.keys().collect::<Vec<_>>(),
        reference.weights.params.keys().collect::<Vec<_>>()
    );
    for (k, p) in &reference.weights.params {
        let d: f32 = p
            .tensor()
            .sub(m.weights.get(k).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(
            d, 0.0,
            "{k} differs (the head is seeded identically, the rest loaded)"
        );
    }
}

#[test]
fn missing_backbone_weights_are_an_error_naming_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    write_tiny_model_dir(&dir, Arch::Llama, 1).unwrap();
    let mut t: BTreeMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
    t.remove("model.layers.1.mlp.up_proj.weight");
    write_safetensors(&t, None, &dir.join("model.safetensors")).unwrap();
    let err = load_model(&dir, &opts(Task::CausalLm))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model.layers.1.mlp.up_proj.weight"), "{err}");
}

#[test]
fn adamw_follows_the_pytorch_formula() {
    let p0 = [0.5f32, -1.0, 2.0, 0.1];
    let var = Var::from_tensor(&Tensor::new(&[[0.5f32, -1.0], [2.0, 0.1]], &Device::Cpu).unwrap())
        .unwrap();
    let bias = Var::from_tensor(&Tensor::new(&[0.3f32, -0.2], &Device::Cpu).unwrap()).unwrap();
    let cfg = AdamConfig {
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let mut opt = AdamW::new(
        vec![("w".into(), var.clone()), ("b.bias".into(), bias.clone())],
        cfg,
    )
    .unwrap()
    // A parameter group with half the learning rate.
    .with_lr_scales(|n| if n == "b.bias" { 0.5 } else { 1.0 });
    // The third step has no gradient for the bias (a parameter that missed the batch).
    let grads = [
        [0.2f32, -0.4, 1.0, 0.0],
        [0.1, 0.3, -2.0, 0.5],
        [0.3, 0.0, 0.0, -0.1],
    ];
    let lrs = [0.1, 0.05, 0.02];
    let (mut p, mut m, mut v) = (p0.map(|x| x as f64), [0f64; 4], [0f64; 4]);
    let mut pb = [0.3f64, -0.2];
    let (mut mb, mut vb) = ([0f64; 2], [0f64; 2]);
    for (t, (g, lr)) in grads.iter().zip(lrs).enumerate() {
        let mut gm = BTreeMap::new();
        gm.insert(
            "w".to_string(),
            Tensor::new(g.as_slice(), &Device::Cpu)
                .unwrap()
                .reshape((2, 2))
                .unwrap(),
        );
        let bias_grad = t < 2;
        if bias_grad {
            gm.insert(
                "b.bias".to_string(),
                Tensor::new(&[g[0], g[1]], &Device::Cpu).unwrap(),
            );
        }
        opt.step(&gm, lr).unwrap();
        let t = (t + 1) as i32;
        for i in 0..4 {
            p[i] *= 1.0 - lr * 0.1;
            m[i] = 0.9 * m[i] + 0.1 * g[i] as f64;
            v[i] = 0.99 * v[i] + 0.01 * (g[i] as f64).powi(2);
            p[i] -= lr * (m[i] / (1.0 - 0.9f64.powi(t)))
                / ((v[i] / (1.0 - 0.99f64.powi(t))).sqrt() + 1e-8);
        }
        for i in 0..2 {
            // biases are not decayed
            let gb = if bias_grad { g[i] as f64 } else { 0.0 };
            mb[i] = 0.9 * mb[i] + 0.1 * gb;
            vb[i] = 0.99 * vb[i] + 0.01 * gb.powi(2);
            pb[i] -= 0.5 * lr * (mb[i] / (1.0 - 0.9f64.powi(t)))
                / ((vb[i] / (1.0 - 0.99f64.powi(t))).sqrt() + 1e-8);
        }
    }
    let got: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    for i in 0..4 {
        assert!(
            (got[i] as f64 - p[i]).abs() < 1e-6,
            "w[{i}]: {} vs {}",
            got[i],
            p[i]
        );
    }
    let gb: Vec<f32> = bias.as_tensor().to_vec1().unwrap();
    for i in 0..2 {
        assert!(
            (gb[i] as f64 - pb[i]).abs() < 1e-6,
            "b[{i}]: {} vs {}",
            gb[i],
            pb[i]
        );
    }
}

#[test]
fn schedules_warm_up_then_decay() {
    assert_eq!(lr_at(1.0, Schedule::Linear, 4, 12, 0), 0.25);
    assert_eq!(lr_at(1.0, Schedule::Linear, 4, 12, 3), 1.0);
    assert_eq!(lr_at(1.0, Schedule::Linear, 4, 12, 4), 1.0);
    assert!((lr_at(1.0, Schedule::Linear, 4, 12, 8) - 0.5).abs() < 1e-12);
    assert!((lr_at(1.0, Schedule::Cosine, 0, 10, 5) - 0.5).abs() < 1e-12);
    assert!(lr_at(1.0, Schedule::Cosine, 0, 10, 9) < 0.03);
    assert_eq!(lr_at(2.0, Schedule::Constant, 0, 10, 9), 2.0);
}

/// Two micro-batches of 4 accumulate to the same update as one batch of 8.
#[test]
fn gradient_accumulation_equals_the_larger_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    write_tiny_model_dir(&dir, Arch::Bert, 2).unwrap();
    let rows: String = (0..8)
        .map(|i| format!("{}\n", serde_json::json!({"text": format!("{} {} movie", TINY_WORDS[i], TINY_WORDS[i + 3]), "label": i % 2})))
        .collect();
    let data = tmp.path().join("d.jsonl");
    std::fs::write(&data, rows).unwrap();
    let run = |batch, accum| {
        let spec = RunSpec {
            model_dir: dir.clone(),
            model_name: None,
            train_file: data.clone(),
            valid_file: None,
            task: None,
            method: MethodSpec::Full(Default::default()),
            train: TrainConfig {
                max_steps: Some(1),
                batch_size: batch,
                grad_accum: accum,
                lr: 1e-2,
                max_grad_norm: None,
                dropout: false,
                weight_decay: 0.0,
                warmup_ratio: 0.0,
                ..TrainConfig::default()
            },
            max_seq_len: 16,
            dtype: Some("f64".into()),
            limit_train: None,
            limit_valid: None,
        };
        let cancel = AtomicBool::new(false);
        run_job(&spec, &Device::Cpu, TrainIo::new(&mut |_| {}, &cancel)).unwrap()
    };
    let (a, b) = (run(8, 1), run(4, 2));
    for (k, t) in &a.artifact.tensors {
        let d: f64 = t
            .sub(&b.artifact.tensors[k])
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(d < 1e-9, "{k} differs by {d}");
    }
    // the model actually changed
    let probe = a.model.weights.get("classifier.weight").unwrap();
    assert!(
        probe
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            > 0.0
    );
}

#[test]
fn cuda_without_the_feature_says_so() {
    let err = sparsegrad_engine::device::parse_device("cuda")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no CUDA support"), "{err}");
    assert!(sparsegrad_engine::device::parse_device("tpu").is_err());
}
