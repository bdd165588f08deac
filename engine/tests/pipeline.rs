//! The whole pipeline on tiny models written to disk: checkpoint/resume equivalence, merge ==
//! in-memory model, artifact round trip, prediction.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device};
use rand::Rng;
use sparsegrad_engine::artifact::{merge, Artifact};
use sparsegrad_engine::data::{collate, Example};
use sparsegrad_engine::methods::{
    BasisDtype, Fidelity, LoraConfig, LoraTargets, MePropConfig, MethodSpec, Scope,
    SparseGradConfig, Support,
};
use sparsegrad_engine::models::{Arch, Model, Task};
use sparsegrad_engine::nn::Ctx;
use sparsegrad_engine::optim::Schedule;
use sparsegrad_engine::pipeline::{load_for_inference, run_job, RunSpec};
use sparsegrad_engine::pretrained::{load_model, LoadOptions};
use sparsegrad_engine::testing::{max_abs_diff, write_tiny_model_dir, TINY_WORDS};
use sparsegrad_engine::train::{Event, PredictInput, Prediction, TrainConfig, TrainIo};

fn sentence(rng: &mut impl Rng, n: usize) -> String {
    (0..n)
        .map(|_| TINY_WORDS[rng.random_range(0..TINY_WORDS.len())])
        .collect::<Vec<_>>()
        .join(" ")
}

/// Classification rows whose label is whether "good" appears (learnable), or SFT rows.
fn write_data(dir: &Path, arch: Arch, rows: usize, seed: u64) -> PathBuf {
    let mut rng = sparsegrad_engine::rng::stream(seed, "data", 0);
    let mut s = String::new();
    for _ in 0..rows {
        let n = rng.random_range(3..9);
        let text = sentence(&mut rng, n);
        let row = match arch {
            Arch::Llama => serde_json::json!({"prompt": text, "completion": sentence(&mut rng, 4)}),
            _ => {
                let label = if text.contains("good") { "pos" } else { "neg" };
                serde_json::json!({"text": text, "label": label})
            }
        };
        s.push_str(&row.to_string());
        s.push('\n');
    }
    let p = dir.join(format!("data-{seed}.jsonl"));
    std::fs::write(&p, s).unwrap();
    p
}

fn spec(model: &Path, data: &Path, method: MethodSpec, max_steps: usize) -> RunSpec {
    RunSpec {
        model_dir: model.to_path_buf(),
        model_name: None,
        train_file: data.to_path_buf(),
        valid_file: None,
        task: None,
        method,
        train: TrainConfig {
            max_steps: Some(max_steps),
            batch_size: 4,
            grad_accum: 2,
            lr: 1e-2,
            schedule: Schedule::Cosine,
            warmup_steps: Some(2),
            weight_decay: 0.01,
            seed: 7,
            dropout: true,
            ..TrainConfig::default()
        },
        max_seq_len: 16,
        dtype: None,
        limit_train: None,
        limit_valid: None,
    }
}

fn sparsegrad(support: Support, scope: Scope) -> MethodSpec {
    MethodSpec::Sparsegrad(SparseGradConfig {
        density: 0.1,
        support,
        scope,
        basis_steps: 3,
        refresh_every: 3,
        // Exact merges; the bf16 default is checked separately.
        basis_dtype: BasisDtype::F32,
        ..Default::default()
    })
}

/// The authors' choices (Qᵀ rotation, warm start, dense gate_proj on LLaMA) with a k the tiny
/// models hold and exact bases.
fn paper_fidelity() -> MethodSpec {
    MethodSpec::Sparsegrad(SparseGradConfig {
        fidelity: Fidelity::Paper,
        k: Some(40),
        basis_dtype: BasisDtype::F32,
        ..Default::default()
    })
}

fn meprop() -> MethodSpec {
    MethodSpec::Meprop(MePropConfig {
        density: 0.1,
        ..Default::default()
    })
}

fn lora() -> MethodSpec {
    MethodSpec::Lora(LoraConfig {
        r: 2,
        alpha: 4.0,
        dropout: 0.1,
        targets: LoraTargets::All,
        ..Default::default()
    })
}

fn lora_scoped(targets: LoraTargets, scope: Scope) -> MethodSpec {
    MethodSpec::Lora(LoraConfig {
        r: 2,
        targets,
        scope,
        ..Default::default()
    })
}

/// LoRA's scopes: `paper` trains every parameter outside the MLP matrices densely (at a tenth
/// of the adapters' rate), as SparseGrad's paper scope does; `targets: none` is the head alone.
#[test]
fn lora_scope_trains_what_it_names() {
    let tmp = tempfile::tempdir().unwrap();
    let mdir = tmp.path().join("model");
    write_tiny_model_dir(&mdir, Arch::Bert, 1).unwrap();
    let data = write_data(tmp.path(), Arch::Bert, 24, 2);
    let cancel = AtomicBool::new(false);
    let run = |m: MethodSpec| {
        run_job(
            &spec(&mdir, &data, m, 3),
            &Device::Cpu,
            TrainIo::new(&mut |_| {}, &cancel),
        )
        .unwrap()
    };
    let names = |o: &sparsegrad_engine::pipeline::JobOutput| -> Vec<String> {
        o.artifact.tensors.keys().cloned().collect()
    };
    let paper = run(lora_scoped(LoraTargets::Mlp, Scope::Paper));
    let n = names(&paper);
    assert!(
        n.contains(&"bert.embeddings.word_embeddings.weight".to_string()),
        "{n:?}"
    );
    assert!(
        n.iter().any(|k| k.contains("attention.self.query.weight")),
        "{n:?}"
    );
    assert!(
        n.iter().any(|k| k.ends_with("intermediate.dense.bias")),
        "MLP biases: {n:?}"
    );
    assert!(n.iter().any(|k| k.ends_with("lora_A.weight")), "{n:?}");
    assert!(
        !n.iter().any(|k| k.ends_with("intermediate.dense.weight")
            || k.ends_with("output.dense.weight") && !k.contains("attention")),
        "MLP matrices stay frozen: {n:?}"
    );
    let head = run(lora_scoped(LoraTargets::None, Scope::Head));
    let mut n = names(&head);
    n.sort();
    assert_eq!(
        n,
        [
            "bert.pooler.dense.bias",
            "bert.pooler.dense.weight",
            "classifier.bias",
            "classifier.weight"
        ]
    );
    // `mlp`: the head plus the MLP biases and every LayerNorm, nothing else dense.
    let mlp = run(lora_scoped(LoraTargets::None, Scope::Mlp));
    let mut n = names(&mlp);
    n.sort();
    let mut want: Vec<String> = head.artifact.tensors.keys().cloned().collect();
    want.extend(
        [
            "bert.embeddings.LayerNorm.bias",
            "bert.embeddings.LayerNorm.weight",
        ]
        .map(String::from),
    );
    for l in 0..2 {
        want.extend(
            [
                "attention.output.LayerNorm.bias",
                "attention.output.LayerNorm.weight",
                "intermediate.dense.bias",
                "output.LayerNorm.bias",
                "output.LayerNorm.weight",
                "output.dense.bias",
            ]
            .map(|p| format!("bert.encoder.layer.{l}.{p}")),
        );
    }
    want.sort();
    assert_eq!(n, want);
    assert!(head.summary.trainable_params < mlp.summary.trainable_params);
    assert!(mlp.summary.trainable_params < paper.summary.trainable_params);
}

#[test]
fn resume_from_checkpoint_equals_uninterrupted_run() {
    for (arch, method) in [
        (Arch::Bert, MethodSpec::Full(Default::default())),
        (Arch::Roberta, lora()),
        (Arch::Llama, lora()),
        (Arch::Bert, sparsegrad(Support::Fixed, Scope::Mlp)),
        (Arch::Roberta, sparsegrad(Support::Refreshed, Scope::Paper)),
        (Arch::Bert, sparsegrad(Support::Ema, Scope::Mlp)),
        (Arch::Llama, sparsegrad(Support::Dynamic, Scope::Mlp)),
        (Arch::Bert, meprop()),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let mdir = tmp.path().join("model");
        write_tiny_model_dir(&mdir, arch, 1).unwrap();
        let data = write_data(tmp.path(), arch, 40, 2);
        let mut s = spec(&mdir, &data, method, 12);
        s.train.checkpoint_every = Some(5);

        let cancel = AtomicBool::new(false);
        let full = run_job(&s, &Device::Cpu, TrainIo::new(&mut |_| {}, &cancel)).unwrap();

        // Interrupted: cancel after step 7, which leaves the step-5 checkpoint.
        let ck = tmp.path().join("ck");
        let cancel2 = AtomicBool::new(false);
        let mut on_event = |e: &Event| {
            if let Event::Step(p) = e {
                if p.step == 7 {
                    cancel2.store(true, Ordering::SeqCst);
                }
            }
        };
        let r = run_job(
            &s,
            &Device::Cpu,
            TrainIo {
                checkpoint_dir: Some(ck.clone()),
                ..TrainIo::new(&mut on_event, &cancel2)
            },
        );
        assert!(matches!(r, Err(sparsegrad_engine::Error::Cancelled)));
        assert!(ck.join("step-5").exists());

        let resumed = run_job(
            &s,
            &Device::Cpu,
            TrainIo {
                resume_from: Some(ck.join("step-5")),
                ..TrainIo::new(&mut |_| {}, &cancel)
            },
        )
        .unwrap();
        // Drained after step 7 (between periodic checkpoints): the steps done are saved as
        // step-7, and the run resumed from there ends where the uninterrupted one does.
        let dk = tmp.path().join("drained");
        let drain = AtomicBool::new(false);
        let mut on_event = |e: &Event| {
            if let Event::Step(p) = e {
                if p.step == 7 {
                    drain.store(true, Ordering::SeqCst);
                }
            }
        };
        let r = run_job(
            &s,
            &Device::Cpu,
            TrainIo {
                checkpoint_dir: Some(dk.clone()),
                drain: Some(&drain),
                ..TrainIo::new(&mut on_event, &cancel)
            },
        );
        assert!(
            matches!(r, Err(sparsegrad_engine::Error::Drained { step: 7 })),
            "{arch:?}: {:?}",
            r.err()
        );
        let from_drain = run_job(
            &s,
            &Device::Cpu,
            TrainIo {
                resume_from: Some(dk.join("step-7")),
                ..TrainIo::new(&mut |_| {}, &cancel)
            },
        )
        .unwrap();
        let (a, b) = (&full.artifact.tensors, &resumed.artifact.tensors);
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (k, t) in a {
            let d = max_abs_diff(t, &b[k]);
            assert!(d <= 1e-6, "{arch:?}: {k} differs by {d} after resume");
            let d = max_abs_diff(t, &from_drain.artifact.tensors[k]);
            assert!(d <= 1e-6, "{arch:?}: {k} differs by {d} after a drain");
        }
        // And training moved the weights at all.
        let base = load_model(
            &mdir,
            &LoadOptions {
                task: full.model.task.clone(),
                dtype: DType::F32,
                device: Device::Cpu,
                seed: 7,
            },
        )
        .unwrap()
        .0;
        let moved = a
            .iter()
            .filter(|(k, _)| {
                k.contains("lora_B")
                    || k.ends_with("intermediate.dense.weight")
                    || k.ends_with("sparse_values")
            })
            .any(|(k, t)| {
                base.weights
                    .get_opt(k)
                    .map(|b| max_abs_diff(t, b) > 1e-4)
                    .unwrap_or(max_abs_diff(t, &t.zeros_like().unwrap()) > 1e-4)
            });
        assert!(moved, "{arch:?}: nothing was trained");
    }
}

fn probe_batch(model: &Model) -> sparsegrad_engine::models::Batch {
    let mut rng = sparsegrad_engine::rng::stream(3, "probe", 0);
    let ex: Vec<Example> = [6usize, 9, 4]
        .iter()
        .map(|&n| Example {
            ids: std::iter::once(0)
                .chain((1..n).map(|_| rng.random_range(5..50)))
                .collect(),
            type_ids: vec![0; n],
            target: sparsegrad_engine::data::Target::Class(0),
            line: 0,
        })
        .collect();
    let refs: Vec<&Example> = ex.iter().collect();
    collate(&refs, 1, model.dtype(), &Device::Cpu).unwrap()
}

/// For each SparseGrad basis tensor, the columns its matrices' supports use.
fn used_basis_columns(a: &Artifact) -> std::collections::HashMap<String, Vec<u32>> {
    use sparsegrad_engine::methods::{BasisSide, DeltaEntry};
    let mut out = std::collections::HashMap::new();
    for (name, e) in &a.descriptor.entries {
        let DeltaEntry::Basis { mlp_kind, side } = e else {
            continue;
        };
        let row = usize::from(*side == BasisSide::Q);
        let mut cols = std::collections::BTreeSet::new();
        for (n, e) in &a.descriptor.entries {
            if matches!(e, DeltaEntry::Sparse { basis: Some(k), .. } if k == mlp_kind)
                && n.ends_with(".sparse_indices")
            {
                let rc: Vec<Vec<i64>> = a.tensors[n]
                    .to_dtype(DType::I64)
                    .unwrap()
                    .to_vec2()
                    .unwrap();
                cols.extend(rc[row].iter().map(|&c| c as u32));
            }
        }
        out.insert(name.clone(), cols.into_iter().collect());
    }
    out
}

#[test]
fn merged_model_equals_in_memory_fine_tuned_model() {
    for (arch, method) in [
        (Arch::Bert, lora()),
        (Arch::Bert, MethodSpec::Full(Default::default())),
        (Arch::Roberta, lora()),
        (Arch::Llama, lora()),
        (Arch::Llama, MethodSpec::Full(Default::default())),
        (Arch::Bert, sparsegrad(Support::Fixed, Scope::Mlp)),
        (Arch::Roberta, sparsegrad(Support::Refreshed, Scope::Mlp)),
        (Arch::Llama, sparsegrad(Support::Dynamic, Scope::Paper)),
        (Arch::Bert, meprop()),
        (Arch::Bert, lora_scoped(LoraTargets::Mlp, Scope::Paper)),
        (Arch::Llama, lora_scoped(LoraTargets::None, Scope::Mlp)),
        (Arch::Bert, paper_fidelity()),
        (Arch::Llama, paper_fidelity()),
        (
            Arch::Llama,
            MethodSpec::Meprop(MePropConfig {
                k: Some(40),
                fidelity: Fidelity::Paper,
                ..Default::default()
            }),
        ),
        (
            Arch::Bert,
            MethodSpec::Sparsegrad(SparseGradConfig {
                density: 0.1,
                basis_steps: 3,
                basis_update: true,
                ..Default::default()
            }),
        ),
        (
            Arch::Roberta,
            MethodSpec::Sparsegrad(SparseGradConfig {
                support: Support::Ema,
                basis_update: true,
                basis_update_lr_scale: Some(0.05),
                ..match sparsegrad(Support::Ema, Scope::Mlp) {
                    MethodSpec::Sparsegrad(c) => c,
                    _ => unreachable!(),
                }
            }),
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let mdir = tmp.path().join("model");
        write_tiny_model_dir(&mdir, arch, 1).unwrap();
        let data = write_data(tmp.path(), arch, 24, 2);
        let cancel = AtomicBool::new(false);
        let out = run_job(
            &spec(&mdir, &data, method, 6),
            &Device::Cpu,
            TrainIo::new(&mut |_| {}, &cancel),
        )
        .unwrap();
        let batch = probe_batch(&out.model);
        let trained = out.model.forward(&batch, &mut Ctx::eval()).unwrap();
        // bf16 bases (the default) merge to within their rounding; everything else exactly.
        let bf16_bases = out.artifact.tensors.iter().any(|(k, t)| {
            k.starts_with("sparsegrad.basis.")
                && !k.ends_with(".columns")
                && t.dtype() == DType::BF16
        });
        let scale = max_abs_diff(&trained, &trained.zeros_like().unwrap());
        let tol = if bf16_bases {
            1e-3 * scale.max(1.0)
        } else {
            1e-5
        };

        // Artifact round trip: what is loaded is what was saved (a basis in the columns its
        // supports use: the file stores only those).
        let adir = tmp.path().join("artifact");
        out.artifact.save(&adir).unwrap();
        let loaded = Artifact::load(&adir).unwrap();
        assert_eq!(loaded.descriptor, out.artifact.descriptor);
        let used = used_basis_columns(&out.artifact);
        for (k, t) in &out.artifact.tensors {
            let (a, b) = match used.get(k) {
                Some(cols) => {
                    let ix =
                        candle_core::Tensor::from_slice(cols, cols.len(), &Device::Cpu).unwrap();
                    let pick = |t: &candle_core::Tensor| {
                        t.to_dtype(DType::F32)
                            .unwrap()
                            .contiguous()
                            .unwrap()
                            .index_select(&ix, 1)
                            .unwrap()
                    };
                    (pick(t), pick(&loaded.tensors[k]))
                }
                None => (t.clone(), loaded.tensors[k].clone()),
            };
            assert_eq!(a.dtype(), b.dtype(), "{k}");
            assert_eq!(max_abs_diff(&a, &b), 0.0, "{k} changed in the round trip");
        }

        // base + delta in memory
        let (applied, _, _) =
            load_for_inference(&mdir, Some(&loaded), None, DType::F32, &Device::Cpu).unwrap();
        let d_apply = max_abs_diff(
            &trained,
            &applied.forward(&batch, &mut Ctx::eval()).unwrap(),
        );
        assert!(
            d_apply <= tol,
            "{arch:?}: applied artifact differs by {d_apply} (bf16 bases: {bf16_bases})"
        );

        // The delta applied in the forward pass over a shared base (what the server serves).
        let (base, _, _) = load_for_inference(
            &mdir,
            None,
            Some(loaded.descriptor.task.clone()),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let served = sparsegrad_engine::serve::overlay(&base, &loaded).unwrap();
        let d_overlay = max_abs_diff(
            &trained,
            &served.model.forward(&batch, &mut Ctx::eval()).unwrap(),
        );
        assert!(
            d_overlay <= tol.max(1e-5),
            "{arch:?}: the overlay differs by {d_overlay} (bf16 bases: {bf16_bases})"
        );
        assert!(served.bytes > 0, "{arch:?}: an overlay that holds nothing");

        // merged folder loads as an ordinary checkpoint
        let merged = tmp.path().join("merged");
        merge(&mdir, &loaded, &merged, 0).unwrap();
        let opts = LoadOptions {
            task: out.model.task.clone(),
            dtype: DType::F32,
            device: Device::Cpu,
            seed: 99,
        };
        let (m2, report) = load_model(&merged, &opts).unwrap();
        assert!(
            report.initialised.is_empty(),
            "merged model lacks {:?}",
            report.initialised
        );
        let d_merge = max_abs_diff(&trained, &m2.forward(&batch, &mut Ctx::eval()).unwrap());
        assert!(
            d_merge <= tol,
            "{arch:?}: merged model differs by {d_merge} (bf16 bases: {bf16_bases})"
        );
        if bf16_bases {
            eprintln!(
                "bf16 bases: applied {d_apply:e}, merged {d_merge:e} (logit scale {scale:.3})"
            );
        }
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(merged.join("config.json")).unwrap()).unwrap();
        if arch != Arch::Llama {
            assert_eq!(cfg["id2label"]["0"], "neg");
        }
    }
}

#[test]
fn merge_refuses_a_different_base_model() {
    let tmp = tempfile::tempdir().unwrap();
    let (m1, m2) = (tmp.path().join("m1"), tmp.path().join("m2"));
    write_tiny_model_dir(&m1, Arch::Bert, 1).unwrap();
    write_tiny_model_dir(&m2, Arch::Bert, 2).unwrap();
    let data = write_data(tmp.path(), Arch::Bert, 24, 2);
    let cancel = AtomicBool::new(false);
    let out = run_job(
        &spec(&m1, &data, lora(), 1),
        &Device::Cpu,
        TrainIo::new(&mut |_| {}, &cancel),
    )
    .unwrap();
    let err = merge(&m2, &out.artifact, &tmp.path().join("x"), 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("base model mismatch"), "{err}");
}

#[test]
fn training_learns_a_simple_rule_and_predicts_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let mdir = tmp.path().join("model");
    write_tiny_model_dir(&mdir, Arch::Bert, 1).unwrap();
    let data = write_data(tmp.path(), Arch::Bert, 200, 2);
    let valid = write_data(tmp.path(), Arch::Bert, 100, 3);
    let mut s = spec(&mdir, &data, MethodSpec::Full(Default::default()), 150);
    s.valid_file = Some(valid);
    s.train.lr = 3e-3;
    s.train.dropout = false;
    let cancel = AtomicBool::new(false);
    let mut steps = 0;
    let out = run_job(
        &s,
        &Device::Cpu,
        TrainIo::new(
            &mut |e| {
                if matches!(e, Event::Step(_)) {
                    steps += 1
                }
            },
            &cancel,
        ),
    )
    .unwrap();
    assert_eq!(steps, 150);
    let eval = out.summary.eval.clone().unwrap();
    assert!(eval.accuracy.unwrap() > 0.9, "{eval:?}");
    let first: f64 = out.summary.losses[..10].iter().map(|l| l.1).sum::<f64>() / 10.0;
    let last: f64 = out.summary.losses[140..].iter().map(|l| l.1).sum::<f64>() / 10.0;
    assert!(last < first * 0.5, "loss {first} → {last}");
    let tok = sparsegrad_engine::data::TextTokenizer::from_dir(&mdir).unwrap();
    let preds = sparsegrad_engine::train::predict(
        &out.model,
        &tok,
        out.artifact.descriptor.labels.as_ref(),
        &[
            PredictInput::Text {
                text: "a good movie".into(),
            },
            PredictInput::Text {
                text: "a boring plot".into(),
            },
        ],
        16,
        0,
    )
    .unwrap();
    match (&preds[0], &preds[1]) {
        (
            Prediction::Class {
                label: a,
                probabilities,
                ..
            },
            Prediction::Class { label: b, .. },
        ) => {
            assert_eq!((a.as_str(), b.as_str()), ("pos", "neg"));
            assert!((probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
        other => panic!("{other:?}"),
    }
    // Inputs of different lengths predicted as one padded batch = each predicted alone.
    let inputs: Vec<PredictInput> = [
        "good",
        "a really boring story but the music was good",
        "hate",
        "it was not very fun",
    ]
    .iter()
    .map(|t| PredictInput::Text {
        text: t.to_string(),
    })
    .collect();
    let labels = out.artifact.descriptor.labels.as_ref();
    let together =
        sparsegrad_engine::train::predict(&out.model, &tok, labels, &inputs, 16, 0).unwrap();
    for (input, batched) in inputs.iter().zip(&together) {
        let alone = sparsegrad_engine::train::predict(
            &out.model,
            &tok,
            labels,
            std::slice::from_ref(input),
            16,
            0,
        )
        .unwrap();
        match (&alone[0], batched) {
            (
                Prediction::Class {
                    label: a,
                    probabilities: pa,
                    ..
                },
                Prediction::Class {
                    label: b,
                    probabilities: pb,
                    ..
                },
            ) => {
                assert_eq!(a, b);
                let d = pa
                    .iter()
                    .zip(pb)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(d <= 1e-5, "{input:?}: {d}");
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn causal_lm_generates_and_bf16_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let mdir = tmp.path().join("model");
    write_tiny_model_dir(&mdir, Arch::Llama, 1).unwrap();
    let data = write_data(tmp.path(), Arch::Llama, 16, 2);
    let mut s = spec(&mdir, &data, MethodSpec::Full(Default::default()), 3);
    s.dtype = Some("bf16".into());
    let cancel = AtomicBool::new(false);
    let out = run_job(&s, &Device::Cpu, TrainIo::new(&mut |_| {}, &cancel)).unwrap();
    assert_eq!(out.model.dtype(), DType::BF16);
    assert!(out.summary.final_loss.is_finite());
    let tok = sparsegrad_engine::data::TextTokenizer::from_dir(&mdir).unwrap();
    let p = sparsegrad_engine::train::predict(
        &out.model,
        &tok,
        None,
        &[PredictInput::Prompt {
            prompt: "hello how are".into(),
        }],
        32,
        5,
    )
    .unwrap();
    assert!(matches!(&p[0], Prediction::Text { .. }));
    assert_eq!(out.model.task, Task::CausalLm);
}

#[test]
fn sampled_completions_repeat_with_their_seed_and_end_at_a_stop_sequence() {
    use sparsegrad_engine::train::{predict_with, Sampling};
    let tmp = tempfile::tempdir().unwrap();
    let mdir = tmp.path().join("model");
    write_tiny_model_dir(&mdir, Arch::Llama, 3).unwrap();
    let tok = sparsegrad_engine::data::TextTokenizer::from_dir(&mdir).unwrap();
    let (model, _, _) = sparsegrad_engine::pipeline::load_for_inference(
        &mdir,
        None,
        None,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let prompt = [PredictInput::Prompt {
        prompt: "hello how are".into(),
    }];
    let text =
        |s: &Sampling| match &predict_with(&model, &tok, None, &prompt, 64, 12, s).unwrap()[0] {
            Prediction::Text { completion } => completion.clone(),
            other => panic!("{other:?}"),
        };
    let greedy = text(&Sampling::default());
    let hot = |seed| Sampling {
        temperature: 1.5,
        seed,
        ..Default::default()
    };
    assert_eq!(text(&hot(1)), text(&hot(1)));
    let draws: std::collections::BTreeSet<String> = (0..8).map(|s| text(&hot(s))).collect();
    assert!(draws.len() > 1, "eight seeds, one completion: {draws:?}");
    // A stop sequence taken from the greedy completion ends it just before.
    let words: Vec<&str> = greedy.split_whitespace().collect();
    assert!(words.len() >= 3, "{greedy:?}");
    let stop = words[2].to_string();
    let cut = text(&Sampling {
        stop: vec![stop.clone()],
        ..Default::default()
    });
    assert_eq!(
        cut,
        greedy[..greedy.find(&stop).unwrap()],
        "{greedy:?} stop {stop:?}"
    );
}

#[test]
fn sparsegrad_trains_bf16_weights_and_bf16_bases_apply() {
    let tmp = tempfile::tempdir().unwrap();
    let mdir = tmp.path().join("model");
    write_tiny_model_dir(&mdir, Arch::Llama, 1).unwrap();
    let data = write_data(tmp.path(), Arch::Llama, 24, 2);
    let mut s = spec(
        &mdir,
        &data,
        MethodSpec::Sparsegrad(SparseGradConfig {
            density: 0.2,
            basis_steps: 3,
            basis_dtype: BasisDtype::Bf16,
            ..Default::default()
        }),
        5,
    );
    s.dtype = Some("bf16".into());
    let cancel = AtomicBool::new(false);
    let out = run_job(&s, &Device::Cpu, TrainIo::new(&mut |_| {}, &cancel)).unwrap();
    assert_eq!(out.model.dtype(), DType::BF16);
    let p = &out.artifact.tensors["sparsegrad.basis.gate.P"];
    assert_eq!(p.dtype(), DType::BF16);
    // bf16 weights are W₀ + P ΔW̃ Qᵀ rounded once, so small updates survive: they moved.
    let (base, _, _) =
        load_for_inference(&mdir, None, Some(Task::CausalLm), DType::BF16, &Device::Cpu).unwrap();
    let name = "model.layers.0.mlp.gate_proj.weight";
    let moved = max_abs_diff(
        &out.model
            .weights
            .get(name)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap(),
        &base
            .weights
            .get(name)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap(),
    );
    assert!(moved > 1e-3, "bf16 weights did not move ({moved})");
    // Applied with bf16 bases: equal up to bf16 rounding of P and Q.
    let (applied, _, _) =
        load_for_inference(&mdir, Some(&out.artifact), None, DType::F32, &Device::Cpu).unwrap();
    let batch = probe_batch(&out.model);
    let a = out
        .model
        .forward(&batch, &mut Ctx::eval())
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let b = applied.forward(&batch, &mut Ctx::eval()).unwrap();
    let d = max_abs_diff(&a, &b);
    let scale = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    assert!(
        d <= 0.05 * scale,
        "bf16 artifact output differs by {d} (scale {scale})"
    );
}

/// The estimate's count of what the `mlp` scope adds equals the parameters it trains.
#[test]
fn mlp_scope_estimate_counts_the_parameters_it_trains() {
    for arch in [Arch::Bert, Arch::Roberta, Arch::Llama] {
        let task = if arch == Arch::Llama {
            Task::CausalLm
        } else {
            Task::Classification { num_labels: 2 }
        };
        let model = sparsegrad_engine::testing::tiny_model(arch, task, DType::F32, 1).unwrap();
        let count = |names: Vec<String>| -> u64 {
            names
                .iter()
                .map(|n| model.weights.get(n).unwrap().elem_count() as u64)
                .sum()
        };
        let none = std::collections::HashSet::new();
        let mlp = count(Scope::Mlp.dense_params(&model, |_| true, &none));
        let head = count(Scope::Head.dense_params(&model, |_| true, &none));
        let shape = model.architecture.shape();
        assert_eq!(mlp - head, shape.mlp_scope_extra(), "{arch:?}");
        assert_eq!(Scope::Mlp.extra_params(&shape), mlp - head);
    }
}

/// Serving: one decoding step over sequences of three different fine-tunes and the base
/// (different prompt lengths, one joining mid-way with its whole prompt) gives each sequence
/// the logits it gets alone, and alone an overlay decodes as the delta applied to the weights.
#[test]
fn a_step_mixing_three_deltas_equals_each_delta_alone() {
    use sparsegrad_engine::models::KvCache;
    use sparsegrad_engine::serve::{decode_step, overlay, StepSeq};
    let tmp = tempfile::tempdir().unwrap();
    let mdir = tmp.path().join("model");
    write_tiny_model_dir(&mdir, Arch::Llama, 1).unwrap();
    let data = write_data(tmp.path(), Arch::Llama, 24, 2);
    let cancel = AtomicBool::new(false);
    let methods = [
        sparsegrad(Support::Fixed, Scope::Mlp),
        lora(),
        MethodSpec::Full(Default::default()),
    ];
    let (base, _, _) =
        load_for_inference(&mdir, None, Some(Task::CausalLm), DType::F32, &Device::Cpu).unwrap();
    let mut models: Vec<Model> = Vec::new();
    for method in methods {
        let out = run_job(
            &spec(&mdir, &data, method, 4),
            &Device::Cpu,
            TrainIo::new(&mut |_| {}, &cancel),
        )
        .unwrap();
        let served = overlay(&base, &out.artifact).unwrap();
        // Alone, the overlay decodes as the delta applied to the weights.
        let (applied, _, _) =
            load_for_inference(&mdir, Some(&out.artifact), None, DType::F32, &Device::Cpu).unwrap();
        let ids =
            candle_core::Tensor::from_vec(vec![3u32, 8, 13, 21, 34], (1, 5), &Device::Cpu).unwrap();
        let a = served
            .model
            .decode(&ids, &mut KvCache::default())
            .unwrap()
            .unwrap();
        let b = applied
            .decode(&ids, &mut KvCache::default())
            .unwrap()
            .unwrap();
        let d = max_abs_diff(&a, &b);
        assert!(d <= 1e-5, "overlay vs applied: {d}");
        models.push(served.model);
    }
    models.push(base);
    // The fine-tunes differ from the base and from each other (so mixing them is tested).
    let probe = candle_core::Tensor::from_vec(vec![3u32, 8, 13], (1, 3), &Device::Cpu).unwrap();
    let outs: Vec<candle_core::Tensor> = models
        .iter()
        .map(|m| m.decode(&probe, &mut KvCache::default()).unwrap().unwrap())
        .collect();
    for i in 0..outs.len() {
        for j in i + 1..outs.len() {
            let d = max_abs_diff(&outs[i], &outs[j]);
            assert!(d > 1e-3, "models {i} and {j} agree ({d})");
        }
    }
    // (model, prompt, the step it joins at); the two sequences of model 0 are not adjacent.
    let seqs: Vec<(usize, Vec<u32>, usize)> = vec![
        (0, vec![5, 9, 14], 0),
        (1, vec![7, 7, 2, 40, 11, 3], 0),
        (0, vec![12], 0),
        (2, vec![30, 1, 4, 4], 0),
        (3, vec![6, 17, 28, 39, 2, 13, 24], 2),
    ];
    let steps = 6;
    let argmax = |row: &candle_core::Tensor| -> u32 { row.argmax(0).unwrap().to_scalar().unwrap() };
    // Alone: each sequence's logits per step, and the greedy tokens it feeds back.
    let mut alone: Vec<Vec<candle_core::Tensor>> = Vec::new();
    let mut fed: Vec<Vec<Vec<u32>>> = Vec::new();
    for (m, prompt, _) in &seqs {
        let mut cache = KvCache::default();
        let (mut logits, mut inputs) = (Vec::new(), Vec::new());
        let mut unseen = prompt.clone();
        for _ in 0..steps {
            let t = unseen.len();
            let ids = candle_core::Tensor::from_vec(unseen.clone(), (1, t), &Device::Cpu).unwrap();
            let l = models[*m].decode(&ids, &mut cache).unwrap().unwrap();
            let row = l.narrow(1, t - 1, 1).unwrap().flatten_all().unwrap();
            inputs.push(unseen.clone());
            unseen = vec![argmax(&row)];
            logits.push(row);
        }
        alone.push(logits);
        fed.push(inputs);
    }
    let mut caches: Vec<KvCache> = seqs.iter().map(|_| KvCache::default()).collect();
    for step in 0..steps + 2 {
        let mut batch: Vec<(usize, StepSeq<'_>)> = Vec::new();
        for (i, ((m, _, join), cache)) in seqs.iter().zip(caches.iter_mut()).enumerate() {
            if step < *join || step - join >= steps {
                continue;
            }
            batch.push((
                i,
                StepSeq {
                    model: &models[*m],
                    ids: &fed[i][step - join],
                    cache,
                },
            ));
        }
        if batch.is_empty() {
            continue;
        }
        let (who, mut seqs_now): (Vec<usize>, Vec<StepSeq<'_>>) = batch.into_iter().unzip();
        let logits = decode_step(&mut seqs_now).unwrap();
        for (row, &i) in who.iter().enumerate() {
            let got = logits.get(row).unwrap();
            let want = &alone[i][step - seqs[i].2];
            let d = max_abs_diff(&got, want);
            assert!(d <= 1e-4, "step {step}, sequence {i}: {d}");
        }
    }
}

/// Regression heads predict one value per input, batched or alone alike.
#[test]
fn regression_predictions_are_one_value_per_input_batched_or_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let mdir = tmp.path().join("model");
    write_tiny_model_dir(&mdir, Arch::Bert, 4).unwrap();
    let (model, tok, _) = load_for_inference(
        &mdir,
        None,
        Some(Task::Regression),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let inputs: Vec<PredictInput> = ["good", "a really boring story", "hate it"]
        .iter()
        .map(|t| PredictInput::Text {
            text: t.to_string(),
        })
        .collect();
    let together = sparsegrad_engine::train::predict(&model, &tok, None, &inputs, 16, 0).unwrap();
    assert_eq!(together.len(), 3);
    for (input, batched) in inputs.iter().zip(&together) {
        let alone = sparsegrad_engine::train::predict(
            &model,
            &tok,
            None,
            std::slice::from_ref(input),
            16,
            0,
        )
        .unwrap();
        match (&alone[0], batched) {
            (Prediction::Value { value: a }, Prediction::Value { value: b }) => {
                assert!((a - b).abs() <= 1e-5, "{input:?}: {a} vs {b}")
            }
            other => panic!("{other:?}"),
        }
    }
}
