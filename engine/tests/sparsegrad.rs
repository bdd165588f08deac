//! SparseGrad and MeProp on tiny models: the in-layer rotated gradient, exact top-k, sparse
//! Adam against dense Adam, the density-1 trajectory against full training in the rotated
//! parametrisation, optimizer-state size, gradient accumulation, basis caching, block stride.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
use rand::Rng;
use sparsegrad_engine::data::{collate, Dataset, EncodeStats, Example, Target};
use sparsegrad_engine::methods::sparsegrad::adam::SparseAdam;
use sparsegrad_engine::methods::sparsegrad::basis::{rotate, Basis};
use sparsegrad_engine::methods::{
    Calibration, DeltaEntry, Fidelity, Method, MethodSpec, Scope, SparseGradConfig, SparseMlp,
    Support,
};
use sparsegrad_engine::models::{Arch, MlpKind, Model, Task};
use sparsegrad_engine::nn::Ctx;
use sparsegrad_engine::optim::{AdamConfig, AdamW, Schedule};
use sparsegrad_engine::testing::{max_abs_diff, tiny_model};
use sparsegrad_engine::topk::topk_abs;
use sparsegrad_engine::topk::topk_abs_fast;
use sparsegrad_engine::train::{train, TrainConfig, TrainIo, TrainSummary};

fn dataset(arch: Arch, rows: usize, seed: u64) -> Dataset {
    let mut rng = sparsegrad_engine::rng::stream(seed, "rows", 0);
    let examples = (0..rows)
        .map(|i| {
            let n = rng.random_range(4..10);
            let ids: Vec<u32> = std::iter::once(2)
                .chain((1..n).map(|_| rng.random_range(5..50)))
                .collect();
            let target = match arch {
                Arch::Llama => Target::Tokens(vec![1; n]),
                _ => Target::Class(u32::from(ids.iter().any(|&t| t < 12))),
            };
            Example {
                type_ids: vec![0; n],
                ids,
                target,
                line: i + 1,
            }
        })
        .collect();
    Dataset {
        examples,
        task: task(arch),
        labels: None,
        stats: EncodeStats::default(),
    }
}

fn task(arch: Arch) -> Task {
    match arch {
        Arch::Llama => Task::CausalLm,
        _ => Task::Classification { num_labels: 2 },
    }
}

fn cfg(steps: usize, batch: usize, accum: usize) -> TrainConfig {
    TrainConfig {
        max_steps: Some(steps),
        batch_size: batch,
        grad_accum: accum,
        lr: 1e-2,
        schedule: Schedule::Constant,
        max_grad_norm: None,
        seed: 3,
        // Exact comparisons: no dropout, decay or warm-up unless a test asks.
        dropout: false,
        weight_decay: 0.0,
        warmup_ratio: 0.0,
        ..TrainConfig::default()
    }
}

fn run(
    model: &mut Model,
    method: &mut dyn Method,
    c: &TrainConfig,
    data: &Dataset,
    cache: Option<&Path>,
) -> TrainSummary {
    let cancel = AtomicBool::new(false);
    train(
        model,
        method,
        c,
        data,
        None,
        TrainIo {
            cache_dir: cache.map(Path::to_path_buf),
            ..TrainIo::new(&mut |_| {}, &cancel)
        },
    )
    .unwrap()
}

/// f32 bases: the comparisons here rely on `P`, `Q` being orthonormal to f32 precision
/// (bf16-rounded bases, the default, are exercised by the pipeline tests).
fn sg(density: f64, support: Support) -> SparseGradConfig {
    SparseGradConfig {
        density,
        support,
        basis_steps: 3,
        basis_dtype: sparsegrad_engine::methods::BasisDtype::F32,
        // The references here start the basis phase from the initial head.
        head_warmup_steps: 0,
        ..Default::default()
    }
}

/// The bases one step of SparseGrad finds on a tiny BERT (model seed `seed`), to give another
/// run.
fn bert_bases(data: &Dataset, config: SparseGradConfig, seed: u64) -> BTreeMap<MlpKind, Basis> {
    let mut model = tiny_model(Arch::Bert, task(Arch::Bert), DType::F32, seed).unwrap();
    let mut m = SparseMlp::sparsegrad(config, AdamConfig::default());
    m.prepare(&mut model, 0).unwrap();
    run(&mut model, &mut m, &cfg(1, 4, 1), data, None);
    m.bases().unwrap()
}

#[test]
fn fast_topk_selects_exactly_the_k_largest_magnitudes() {
    let mut rng = sparsegrad_engine::rng::stream(1, "topk", 0);
    for &n in &[1usize, 7, 1000, 200_000] {
        // Quantised values make many exact ties, which must go to the lower index.
        let vals: Vec<f32> = (0..n)
            .map(|_| ((rng.random::<f32>() - 0.5) * 64.0).round() / 8.0)
            .collect();
        let smooth: Vec<f32> = (0..n)
            .map(|_| (rng.random::<f32>() - 0.5) * rng.random::<f32>().powi(8))
            .collect();
        for v in [&vals, &smooth] {
            for k in [0, 1, n / 100, n / 2, n.saturating_sub(1), n, n + 5] {
                let fast = topk_abs_fast(v, k);
                let reference: Vec<u32> = topk_abs(v, k).into_iter().map(|i| i as u32).collect();
                assert_eq!(fast, reference, "n {n} k {k}");
                assert_eq!(fast.len(), k.min(n));
                // Every kept magnitude ≥ every dropped one.
                if !fast.is_empty() && fast.len() < n {
                    let kept: std::collections::HashSet<u32> = fast.iter().copied().collect();
                    let min_kept = fast
                        .iter()
                        .map(|&i| v[i as usize].abs())
                        .fold(f32::MAX, f32::min);
                    let max_dropped = (0..n as u32)
                        .filter(|i| !kept.contains(i))
                        .map(|i| v[i as usize].abs())
                        .fold(0f32, f32::max);
                    assert!(min_kept >= max_dropped);
                }
            }
        }
    }
}

#[test]
fn sparse_adam_equals_dense_adam_restricted_to_the_support() {
    let (out, inp) = (12, 9);
    let mut rng = sparsegrad_engine::rng::stream(2, "adam", 0);
    let mut support: Vec<u32> = (0..(out * inp) as u32)
        .filter(|_| rng.random::<f32>() < 0.2)
        .collect();
    support.sort_unstable();
    let w0: Vec<f32> = (0..out * inp).map(|_| rng.random::<f32>() - 0.5).collect();
    let var =
        Var::from_tensor(&Tensor::from_vec(w0.clone(), (out, inp), &Device::Cpu).unwrap()).unwrap();
    let cfg = AdamConfig::default();
    let mut dense = AdamW::new(vec![("w".into(), var.clone())], cfg.clone()).unwrap();
    let mut sparse = SparseAdam::with_support(&support, &Device::Cpu).unwrap();
    let mut w_sparse = w0.clone();
    for t in 1..=6u64 {
        let g: Vec<f32> = (0..out * inp).map(|_| rng.random::<f32>() - 0.5).collect();
        let masked: Vec<f32> = (0..out * inp)
            .map(|i| {
                if support.binary_search(&(i as u32)).is_ok() {
                    g[i]
                } else {
                    0.0
                }
            })
            .collect();
        let mut grads = BTreeMap::new();
        grads.insert(
            "w".to_string(),
            Tensor::from_vec(masked, (out, inp), &Device::Cpu).unwrap(),
        );
        dense.step(&grads, 1e-2).unwrap();
        let gs: Vec<f32> = support.iter().map(|&i| g[i as usize]).collect();
        let gs = Tensor::new(gs.as_slice(), &Device::Cpu).unwrap();
        let ch: Vec<f32> = sparse
            .update(&support, &gs, 1.0, 1e-2, &cfg, t)
            .unwrap()
            .to_vec1()
            .unwrap();
        for (&i, c) in support.iter().zip(ch) {
            w_sparse[i as usize] += c;
        }
    }
    let d = max_abs_diff(
        var.as_tensor(),
        &Tensor::from_vec(w_sparse, (out, inp), &Device::Cpu).unwrap(),
    );
    assert!(
        d <= 1e-6,
        "sparse Adam differs from restricted dense Adam by {d}"
    );
    assert_eq!(sparse.state_len(), 2 * support.len());
}

fn backward_fn<'a>(
    data: &'a Dataset,
    batch: usize,
) -> impl FnMut(&Model, usize) -> sparsegrad_engine::Result<GradStore> + 'a {
    move |m: &Model, i: usize| {
        let refs: Vec<&Example> = data.examples.iter().skip(i * batch).take(batch).collect();
        let b = collate(&refs, 0, m.dtype(), &Device::Cpu)?;
        let mut ctx = Ctx::train(sparsegrad_engine::rng::stream(0, "t", i as u64), false);
        let logits = m.forward(&b, &mut ctx)?;
        Ok(m.loss(&logits, &b)?.backward()?)
    }
}

#[test]
fn in_layer_rotated_gradient_equals_rotated_dense_gradient() {
    // Dynamic support at density 1 forms the whole G̃; a fixed support forms only its own
    // rows and columns of it (by either order of products). Both must equal Pᵀ G Q there.
    for (arch, support, density) in [
        (Arch::Bert, Support::Dynamic, 1.0),
        (Arch::Llama, Support::Dynamic, 1.0),
        (Arch::Bert, Support::Fixed, 0.2),
        (Arch::Llama, Support::Fixed, 0.05),
    ] {
        let data = dataset(arch, 24, 1);
        let mut model = tiny_model(arch, task(arch), DType::F32, 5).unwrap();
        let mut method = SparseMlp::sparsegrad(sg(density, support), AdamConfig::default());
        method.prepare(&mut model, 0).unwrap();
        let mut bw = backward_fn(&data, 4);
        method
            .calibrate(
                &mut model,
                Calibration {
                    lr: 1e-3,
                    max_grad_norm: None,
                    cache: None,
                    backward: &mut bw,
                },
            )
            .unwrap();
        method.begin_step(0, 1).unwrap();
        // The next batch through the hooks.
        drop(bw(&model, 4).unwrap());
        let pending = method.pending_gradients().unwrap();
        let bases = method.bases().unwrap();

        // Reference: the same model with its MLP weights trainable, candle's dense gradient.
        let mut reference = tiny_model(arch, task(arch), DType::F32, 5).unwrap();
        let mlp = reference.mlp_linears();
        for (p, _, _) in &mlp {
            reference
                .weights
                .set_trainable(&format!("{p}.weight"), true)
                .unwrap();
        }
        let grads = bw(&reference, 4).unwrap();
        assert_eq!(pending.len(), mlp.len());
        for ((name, got), (p, kind, _)) in pending.iter().zip(&mlp) {
            assert_eq!(name, &format!("{p}.weight"));
            let w = reference.weights.get(name).unwrap();
            let g = grads.get(w).expect("dense gradient");
            let want = rotate(g, &bases[kind]).unwrap();
            let (idx, vals) = got.clone().expect("hook saw the gradient");
            let (o, i) = want.dims2().unwrap();
            let k = (density * (o * i) as f64).round() as usize;
            assert_eq!(idx.len(), k);
            assert!(idx.windows(2).all(|w| w[0] < w[1]));
            let want_flat: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
            let scale = want_flat.iter().fold(0f32, |a, &b| a.max(b.abs())).max(1.0);
            for (&ix, &v) in idx.iter().zip(&vals) {
                let d = (v - want_flat[ix as usize]).abs();
                assert!(
                    d <= 1e-5 * scale,
                    "{arch:?} {support:?} {name}[{ix}]: {v} vs {}",
                    want_flat[ix as usize]
                );
            }
        }
    }
}

/// Full training of the MLP matrices in SparseGrad's parametrisation `W = P W̃ Qᵀ`: dense
/// AdamW on `W̃` with gradient `Pᵀ G Q`, the head dense — what SparseGrad at density 1 must
/// reproduce.
struct RotatedFull {
    bases: BTreeMap<MlpKind, Basis>,
    mlp: Vec<(String, MlpKind)>,
    tilde: Vec<Var>,
    opt_tilde: Option<AdamW>,
    opt_head: Option<AdamW>,
    head: Vec<(String, Var)>,
    grads: BTreeMap<String, Tensor>,
}

impl Method for RotatedFull {
    fn name(&self) -> &'static str {
        "rotated-full"
    }
    fn hyperparameters(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    fn prepare(&mut self, model: &mut Model, _seed: u64) -> sparsegrad_engine::Result<()> {
        model.weights.freeze_all()?;
        let mut tilde = Vec::new();
        for (p, kind, _) in model.mlp_linears() {
            let name = format!("{p}.weight");
            model.weights.set_trainable(&name, true)?;
            let b = &self.bases[&kind];
            let w = model.weights.get(&name)?;
            let t = Var::from_tensor(&b.p.t()?.matmul(w)?.matmul(&b.q)?)?;
            tilde.push((name.clone(), t.clone()));
            self.tilde.push(t);
            self.mlp.push((name, kind));
        }
        for h in model.head_params() {
            model.weights.set_trainable(&h, true)?;
            let v = match &model.weights.params[&h] {
                sparsegrad_engine::nn::Param::Trainable(v) => v.clone(),
                _ => unreachable!(),
            };
            self.head.push((h, v));
        }
        self.opt_tilde = Some(AdamW::new(tilde, adam_eps())?);
        self.opt_head = Some(AdamW::new(self.head.clone(), adam_eps())?);
        Ok(())
    }
    fn accumulate(&mut self, model: &Model, grads: GradStore) -> sparsegrad_engine::Result<()> {
        for (name, v) in model.weights.trainable() {
            if let Some(g) = grads.get(v.as_tensor()) {
                self.grads.insert(name, g.clone());
            }
        }
        Ok(())
    }
    fn step(
        &mut self,
        model: &mut Model,
        lr: f64,
        _clip: Option<f64>,
    ) -> sparsegrad_engine::Result<f64> {
        let grads = std::mem::take(&mut self.grads);
        let mut gt = BTreeMap::new();
        for (name, kind) in &self.mlp {
            gt.insert(name.clone(), rotate(&grads[name], &self.bases[kind])?);
        }
        self.opt_tilde.as_mut().unwrap().step(&gt, lr)?;
        let head: BTreeMap<String, Tensor> = self
            .head
            .iter()
            .filter_map(|(n, _)| grads.get(n).map(|g| (n.clone(), g.clone())))
            .collect();
        self.opt_head.as_mut().unwrap().step(&head, lr)?;
        for ((name, kind), t) in self.mlp.iter().zip(&self.tilde) {
            let b = &self.bases[kind];
            let w = b.p.matmul(t.as_tensor())?.matmul(&b.q.t()?)?;
            match &model.weights.params[name] {
                sparsegrad_engine::nn::Param::Trainable(v) => v.set(&w)?,
                _ => unreachable!(),
            }
        }
        Ok(0.0)
    }
    fn optimizer_state_len(&self) -> usize {
        0
    }
    // The reference only runs uninterrupted and leaves no artifact.
    fn state(&self, _m: &Model) -> sparsegrad_engine::Result<(BTreeMap<String, Tensor>, u64)> {
        Err(sparsegrad_engine::Error::Other(
            "the reference is not checkpointed".into(),
        ))
    }
    fn load_state(
        &mut self,
        _m: &mut Model,
        _s: &BTreeMap<String, Tensor>,
        _t: u64,
    ) -> sparsegrad_engine::Result<()> {
        Err(sparsegrad_engine::Error::Other(
            "the reference is not checkpointed".into(),
        ))
    }
    fn delta(
        &self,
        _m: &Model,
    ) -> sparsegrad_engine::Result<(BTreeMap<String, Tensor>, BTreeMap<String, DeltaEntry>)> {
        Err(sparsegrad_engine::Error::Other(
            "the reference has no artifact".into(),
        ))
    }
}

/// Adam's ε at 1e-8 turns f32 rounding in near-zero gradient entries into full-size steps of
/// either sign; a larger ε keeps the comparison about the math, not the rounding.
fn adam_eps() -> AdamConfig {
    AdamConfig {
        eps: 1e-5,
        ..Default::default()
    }
}

#[test]
fn density_one_follows_full_training_in_the_rotated_basis() {
    for arch in [Arch::Bert, Arch::Llama] {
        let data = dataset(arch, 40, 2);
        let c = cfg(8, 4, 1);
        let mut m1 = tiny_model(arch, task(arch), DType::F32, 9).unwrap();
        // The reference trains the head beside the rotated MLP, nothing else.
        let head_only = SparseGradConfig {
            scope: Scope::Head,
            ..sg(1.0, Support::Dynamic)
        };
        let mut sparse = SparseMlp::sparsegrad(head_only, adam_eps());
        sparse.prepare(&mut m1, 3).unwrap();
        let s1 = run(&mut m1, &mut sparse, &c, &data, None);

        let mut m2 = tiny_model(arch, task(arch), DType::F32, 9).unwrap();
        let mut reference = RotatedFull {
            bases: sparse.bases().unwrap(),
            mlp: Vec::new(),
            tilde: Vec::new(),
            opt_tilde: None,
            opt_head: None,
            head: Vec::new(),
            grads: BTreeMap::new(),
        };
        reference.prepare(&mut m2, 3).unwrap();
        let s2 = run(&mut m2, &mut reference, &c, &data, None);

        for ((step, a), (_, b)) in s1.losses.iter().zip(&s2.losses) {
            assert!(
                (a - b).abs() <= 1e-5,
                "{arch:?} step {step}: loss {a} vs {b}"
            );
        }
        let base = tiny_model(arch, task(arch), DType::F32, 9).unwrap();
        // The trajectory moved: training did something.
        assert!((s1.losses[0].1 - s1.losses[7].1).abs() > 1e-3);
        for (p, _, _) in m1.mlp_linears() {
            let n = format!("{p}.weight");
            let d = max_abs_diff(m1.weights.get(&n).unwrap(), m2.weights.get(&n).unwrap());
            let moved = max_abs_diff(m1.weights.get(&n).unwrap(), base.weights.get(&n).unwrap());
            eprintln!("{arch:?} {n}: moved {moved:.3e}, differs by {d:.3e}");
            assert!(d <= 1e-4 * moved, "{arch:?} {n} differs by {d}");
        }
    }
}

#[test]
fn fixed_support_keeps_two_numbers_per_selected_entry() {
    let data = dataset(Arch::Bert, 40, 3);
    let c = cfg(4, 4, 1);
    let mut model = tiny_model(Arch::Bert, task(Arch::Bert), DType::F32, 1).unwrap();
    let mut method = SparseMlp::sparsegrad(sg(0.05, Support::Fixed), AdamConfig::default());
    method.prepare(&mut model, 0).unwrap();
    let head = model.weights.num_params(true);
    let summary = run(&mut model, &mut method, &c, &data, None);
    let mlp = model.mlp_linears();
    let mut k_total = 0;
    let mut dense_total = 0;
    for (p, _, _) in &mlp {
        let (o, i) = model
            .weights
            .get(&format!("{p}.weight"))
            .unwrap()
            .dims2()
            .unwrap();
        let k = (0.05 * (o * i) as f64).round() as usize;
        k_total += k;
        dense_total += o * i;
    }
    assert_eq!(method.optimizer_state_len(), 2 * head + 2 * k_total);
    assert_eq!(summary.optimizer_state, 2 * head + 2 * k_total);
    assert!(2 * k_total * 10 < 2 * dense_total);
    // Each support has exactly k distinct entries and the delta lives on it.
    for (name, sup) in method.supports().unwrap() {
        let sup = sup.expect("fixed support");
        assert!(sup.windows(2).all(|w| w[0] < w[1]), "{name}");
        assert_eq!(sup.len(), k_total / mlp.len());
    }
    let (tensors, _) = method.delta(&model).unwrap();
    for (p, _, _) in &mlp {
        let v = &tensors[&format!("{p}.weight.sparse_values")];
        assert_eq!(v.elem_count(), k_total / mlp.len());
    }
    // Dynamic support: state grows with the union of selections, never below 2k.
    let mut model = tiny_model(Arch::Bert, task(Arch::Bert), DType::F32, 1).unwrap();
    let mut dynamic = SparseMlp::sparsegrad(sg(0.05, Support::Dynamic), AdamConfig::default());
    dynamic.prepare(&mut model, 0).unwrap();
    run(&mut model, &mut dynamic, &c, &data, None);
    assert!(dynamic.optimizer_state_len() >= 2 * head + 2 * k_total);
    let touched = dynamic.stats()["touched_entries"].as_u64().unwrap() as usize;
    assert!(touched >= k_total);
}

/// `max_basis_columns`: every support (fixed from the score, dynamic from each step) stays
/// in the leading block of the rotated matrix, with k entries when the block holds them.
#[test]
fn column_cap_keeps_supports_in_the_leading_eigenvectors() {
    let data = dataset(Arch::Bert, 40, 3);
    let c = cfg(3, 4, 1);
    for support in [Support::Fixed, Support::Dynamic] {
        let mut model = tiny_model(Arch::Bert, task(Arch::Bert), DType::F32, 1).unwrap();
        let cap = 5;
        let mut method = SparseMlp::sparsegrad(
            SparseGradConfig {
                max_basis_columns: Some(cap),
                ..sg(0.05, support)
            },
            AdamConfig::default(),
        );
        method.prepare(&mut model, 0).unwrap();
        run(&mut model, &mut method, &c, &data, None);
        let (tensors, _) = method.delta(&model).unwrap();
        for (p, _, _) in model.mlp_linears() {
            let (o, i) = model
                .weights
                .get(&format!("{p}.weight"))
                .unwrap()
                .dims2()
                .unwrap();
            let k = ((0.05 * (o * i) as f64).round() as usize).min(cap * cap);
            let rc: Vec<Vec<i32>> = tensors[&format!("{p}.weight.sparse_indices")]
                .to_vec2()
                .unwrap();
            assert!(rc[0].iter().all(|&r| (r as usize) < cap.min(o)), "{p}");
            assert!(rc[1].iter().all(|&c| (c as usize) < cap.min(i)), "{p}");
            if support == Support::Fixed {
                assert_eq!(rc[0].len(), k, "{p}");
            } else {
                assert!(rc[0].len() >= k, "{p}");
            }
        }
    }
}

/// `fidelity: paper`: the authors' settings replace ours, the input side is rotated by `Qᵀ`,
/// and on LLaMA gate_proj trains densely while every third block's up/down are sparse.
#[test]
fn paper_fidelity_follows_the_authors_choices() {
    let paper = SparseGradConfig {
        fidelity: Fidelity::Paper,
        k: Some(30),
        ..sg(0.05, Support::Fixed)
    };
    // Bases given: the method keeps P and uses Qᵀ for the input side.
    let data = dataset(Arch::Bert, 24, 3);
    let given = bert_bases(&data, sg(0.05, Support::Fixed), 1);
    let mut model = tiny_model(Arch::Bert, task(Arch::Bert), DType::F32, 1).unwrap();
    let mut m =
        SparseMlp::sparsegrad(paper.clone(), AdamConfig::default()).with_bases(given.clone());
    m.prepare(&mut model, 0).unwrap();
    run(&mut model, &mut m, &cfg(2, 4, 1), &data, None);
    for (kind, b) in m.bases().unwrap() {
        assert_eq!(max_abs_diff(&b.p, &given[&kind].p), 0.0);
        assert_eq!(max_abs_diff(&b.q, &given[&kind].q.t().unwrap()), 0.0);
    }
    let h = m.hyperparameters();
    for (field, want) in [
        ("support", "dynamic"),
        ("scope", "paper"),
        ("fidelity", "paper"),
    ] {
        assert_eq!(h[field], want, "{field}");
    }
    assert_eq!(h["basis_update"], true);
    assert_eq!(h["basis_steps"], 11);
    assert_eq!(h["dense_lr_scale"], 1.0);
    // Norms frozen, attention dense (the paper scope), sparse MLP matrices.
    let (tensors, entries) = m.delta(&model).unwrap();
    assert!(
        !tensors.keys().any(|k| k.contains("LayerNorm")),
        "norms frozen"
    );
    assert!(tensors.contains_key("bert.encoder.layer.0.attention.self.query.weight"));
    assert!(entries.contains_key("bert.encoder.layer.0.intermediate.dense.weight.sparse_values"));

    let data = dataset(Arch::Llama, 24, 3);
    let mut model = tiny_model(Arch::Llama, Task::CausalLm, DType::F32, 1).unwrap();
    let mut m = SparseMlp::sparsegrad(paper, AdamConfig::default());
    m.prepare(&mut model, 0).unwrap();
    run(&mut model, &mut m, &cfg(2, 4, 1), &data, None);
    assert_eq!(m.hyperparameters()["block_stride"], 3);
    let (tensors, entries) = m.delta(&model).unwrap();
    assert!(matches!(
        entries["model.layers.0.mlp.gate_proj.weight"],
        DeltaEntry::Dense { .. }
    ));
    for sub in ["up_proj", "down_proj"] {
        let v = &tensors[&format!("model.layers.0.mlp.{sub}.weight.sparse_values")];
        // A fresh top-30 on each of the 2 steps: the union of what they touched.
        assert!((30..=60).contains(&v.elem_count()), "{sub}");
    }
    assert!(!tensors.keys().any(|k| k.starts_with("model.layers.1.mlp.")));
    assert!(!tensors.keys().any(|k| k.contains("norm")), "norms frozen");
}

/// MeProp under `fidelity: paper` is the authors' masked dense AdamW: the first step moves
/// exactly the top-k entries, later steps keep moving earlier ones on their moments — where
/// ours moves exactly the step's k entries every step.
#[test]
fn paper_meprop_masks_a_dense_gradient_under_adamw() {
    let data = dataset(Arch::Bert, 24, 3);
    let k = 12;
    let weights_after = |fidelity: Fidelity, steps: usize| {
        let mut model = tiny_model(Arch::Bert, task(Arch::Bert), DType::F32, 1).unwrap();
        let spec = MethodSpec::Meprop(sparsegrad_engine::methods::MePropConfig {
            k: Some(k),
            fidelity,
            ..Default::default()
        });
        let mut m = spec.build(AdamConfig::default()).unwrap();
        m.prepare(&mut model, 0).unwrap();
        run(&mut model, m.as_mut(), &cfg(steps, 4, 1), &data, None);
        let w = |n: &str| -> Vec<f32> {
            model
                .weights
                .get(n)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let name = "bert.encoder.layer.0.intermediate.dense.weight";
        (w(name), m.hyperparameters())
    };
    let moved = |a: &[f32], b: &[f32]| a.iter().zip(b).filter(|(x, y)| x != y).count();
    let w0: Vec<f32> = tiny_model(Arch::Bert, task(Arch::Bert), DType::F32, 1)
        .unwrap()
        .weights
        .get("bert.encoder.layer.0.intermediate.dense.weight")
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for fidelity in [Fidelity::Ours, Fidelity::Paper] {
        let (w1, h) = weights_after(fidelity, 1);
        let (w2, _) = weights_after(fidelity, 2);
        assert_eq!(moved(&w0, &w1), k, "{fidelity:?}: step 1");
        let second = moved(&w1, &w2);
        match fidelity {
            Fidelity::Ours => assert_eq!(second, k),
            Fidelity::Paper => {
                assert!(second > k, "momentum moves step 1's entries too: {second}");
                assert_eq!(h["scope"], "paper");
                assert_eq!(h["dense_lr_scale"], 1.0);
            }
        }
    }
}

#[test]
fn gradient_accumulation_equals_the_larger_batch() {
    // Top-k of the step's summed gradient, not of each micro-batch's. The basis phase sees
    // micro-batches, so both runs get the same given bases.
    let data = dataset(Arch::Bert, 48, 4);
    let bases = bert_bases(&data, sg(0.1, Support::Dynamic), 2);
    for method in ["sparsegrad", "meprop"] {
        let mut out = Vec::new();
        for (batch, accum) in [(8, 1), (4, 2)] {
            let mut model = tiny_model(Arch::Bert, task(Arch::Bert), DType::F32, 2).unwrap();
            let mut m = match method {
                "sparsegrad" => {
                    SparseMlp::sparsegrad(sg(0.1, Support::Dynamic), AdamConfig::default())
                        .with_bases(bases.clone())
                }
                _ => SparseMlp::meprop(
                    sparsegrad_engine::methods::MePropConfig {
                        density: 0.1,
                        ..Default::default()
                    },
                    AdamConfig::default(),
                ),
            };
            m.prepare(&mut model, 0).unwrap();
            let s = run(&mut model, &mut m, &cfg(5, batch, accum), &data, None);
            out.push((s.losses, m.delta(&model).unwrap().0));
        }
        for ((_, a), (_, b)) in out[0].0.iter().zip(&out[1].0) {
            assert!((a - b).abs() < 1e-5, "{method}: loss {a} vs {b}");
        }
        for (k, t) in &out[0].1 {
            if k.ends_with("sparse_indices") {
                assert_eq!(max_abs_diff(t, &out[1].1[k]), 0.0, "{method}: {k} differs");
            } else {
                let d = max_abs_diff(t, &out[1].1[k]);
                assert!(d <= 1e-5, "{method}: {k} differs by {d}");
            }
        }
    }
}

#[test]
fn bases_are_cached_and_reused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(Arch::Bert, 40, 5);
    let c = cfg(3, 4, 1);
    let go = |cache: &Path| {
        let mut model = tiny_model(Arch::Bert, task(Arch::Bert), DType::F32, 1).unwrap();
        let mut m = SparseMlp::sparsegrad(sg(0.1, Support::Fixed), AdamConfig::default());
        m.prepare(&mut model, 0).unwrap();
        run(&mut model, &mut m, &c, &data, Some(cache));
        m.bases().unwrap()
    };
    let first = go(tmp.path());
    let files: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    // Replace the cached bases by identities: a run that uses the cache must come back with them.
    let mut t = candle_core::safetensors::load(&files[0], &Device::Cpu).unwrap();
    for (k, b) in &first {
        let (o, i) = (b.p.dim(0).unwrap(), b.q.dim(0).unwrap());
        t.insert(
            format!("{}.p", k.as_str()),
            Tensor::eye(o, DType::F32, &Device::Cpu).unwrap(),
        );
        t.insert(
            format!("{}.q", k.as_str()),
            Tensor::eye(i, DType::F32, &Device::Cpu).unwrap(),
        );
    }
    candle_core::safetensors::save(&t, &files[0]).unwrap();
    let second = go(tmp.path());
    for b in second.values() {
        let eye = Tensor::eye(b.p.dim(0).unwrap(), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(max_abs_diff(&b.p, &eye), 0.0);
    }
    // A fresh cache folder: the basis phase runs again and finds the first run's bases.
    let other = tempfile::tempdir().unwrap();
    let third = go(other.path());
    for (k, b) in &third {
        assert!(max_abs_diff(&b.p, &first[k].p) <= 1e-6);
    }
}

#[test]
fn block_stride_trains_every_nth_block_only() {
    let data = dataset(Arch::Llama, 24, 6);
    let mut model = tiny_model(Arch::Llama, Task::CausalLm, DType::F32, 1).unwrap();
    let spec = MethodSpec::Sparsegrad(SparseGradConfig {
        block_stride: 2,
        ..sg(0.1, Support::Fixed)
    });
    let mut m = spec.build(AdamConfig::default()).unwrap();
    m.prepare(&mut model, 0).unwrap();
    run(&mut model, m.as_mut(), &cfg(3, 4, 1), &data, None);
    let (tensors, entries) = m.delta(&model).unwrap();
    let sparse: Vec<&String> = entries
        .iter()
        .filter(|(_, e)| matches!(e, DeltaEntry::Sparse { .. }))
        .map(|(k, _)| k)
        .collect();
    assert_eq!(sparse.len(), 6, "{sparse:?}");
    assert!(sparse.iter().all(|k| k.starts_with("model.layers.0.mlp.")));
    // Block 1's MLP (matrices and biases) stays frozen; its norms train in `mlp` scope.
    assert!(tensors
        .keys()
        .all(|k| !k.starts_with("model.layers.1.mlp.")));
    assert!(tensors.contains_key("model.layers.1.post_attention_layernorm.weight"));
}

#[test]
fn invalid_settings_name_the_field() {
    for (cfg, field) in [
        (
            SparseGradConfig {
                density: 0.0,
                ..Default::default()
            },
            "density",
        ),
        (
            SparseGradConfig {
                density: 1.5,
                ..Default::default()
            },
            "density",
        ),
        (
            SparseGradConfig {
                k: Some(0),
                ..Default::default()
            },
            "k",
        ),
        (
            SparseGradConfig {
                basis_steps: 0,
                ..Default::default()
            },
            "basis_steps",
        ),
        (
            SparseGradConfig {
                block_stride: 0,
                ..Default::default()
            },
            "block_stride",
        ),
        (
            SparseGradConfig {
                refresh_every: 0,
                ..Default::default()
            },
            "refresh_every",
        ),
        (
            SparseGradConfig {
                ema_beta: 1.0,
                ..Default::default()
            },
            "ema_beta",
        ),
        (
            SparseGradConfig {
                basis_update_lr_scale: Some(0.0),
                ..Default::default()
            },
            "basis_update_lr_scale",
        ),
    ] {
        let e = MethodSpec::Sparsegrad(cfg)
            .build(AdamConfig::default())
            .err()
            .unwrap();
        assert!(e.to_string().contains(field), "{e}");
        assert!(e.is_user_error());
    }
    let parsed: Result<SparseGradConfig, _> = serde_json::from_str(r#"{"support": "sometimes"}"#);
    assert!(parsed.is_err());
    let parsed: SparseGradConfig =
        serde_json::from_str(r#"{"support": "dynamic", "scope": "paper"}"#).unwrap();
    assert_eq!(
        (parsed.support, parsed.scope),
        (Support::Dynamic, Scope::Paper)
    );
}

/// The share of gradient energy the sparse update keeps: measured every step where top-k is
/// taken (MeProp, a dynamic support) and every 10th step on a fixed support; a share, and all
/// of it when k is the whole matrix.
#[test]
fn gradient_energy_kept_is_reported_where_measured() {
    let data = dataset(Arch::Bert, 24, 4);
    let energies = |method: MethodSpec, steps: usize, accum: usize| -> Vec<Option<f64>> {
        let mut model = tiny_model(Arch::Bert, task(Arch::Bert), DType::F32, 2).unwrap();
        let mut m = method.build(AdamConfig::default()).unwrap();
        m.prepare(&mut model, 3).unwrap();
        let cancel = AtomicBool::new(false);
        let mut seen = Vec::new();
        let mut on_event = |e: &sparsegrad_engine::train::Event| {
            if let sparsegrad_engine::train::Event::Step(p) = e {
                seen.push(p.grad_energy);
            }
        };
        train(
            &mut model,
            m.as_mut(),
            &cfg(steps, 4, accum),
            &data,
            None,
            TrainIo::new(&mut on_event, &cancel),
        )
        .unwrap();
        seen
    };
    let fixed = energies(MethodSpec::Sparsegrad(sg(0.1, Support::Fixed)), 12, 2);
    for (i, e) in fixed.iter().enumerate() {
        assert_eq!(e.is_some(), i % 10 == 0, "step {}: {e:?}", i + 1);
        if let Some(e) = e {
            assert!(*e > 0.1 && *e < 1.0, "a 10% support keeps a share: {e}");
        }
    }
    for method in [
        MethodSpec::Sparsegrad(sg(0.1, Support::Dynamic)),
        MethodSpec::Meprop(sparsegrad_engine::methods::MePropConfig {
            density: 0.1,
            ..Default::default()
        }),
    ] {
        for e in energies(method, 4, 1) {
            let e = e.expect("measured every step");
            assert!(e > 0.1 && e < 1.0, "{e}");
        }
    }
    // k = every entry: the whole energy (up to the bases' orthonormality in f32).
    for e in energies(MethodSpec::Sparsegrad(sg(1.0, Support::Fixed)), 1, 1) {
        assert!((e.unwrap() - 1.0).abs() < 1e-4, "{e:?}");
    }
}

/// `support: ema` re-selects from an average of `|G̃|`: with β = 0 the average is the step's
/// own gradient, so it trains exactly as `refreshed` does; with β > 0 every refresh still
/// leaves k ascending entries per matrix.
#[test]
fn ema_support_with_no_memory_is_the_refreshed_support() {
    let data = dataset(Arch::Bert, 40, 3);
    let c = cfg(7, 4, 1);
    let train = |support: Support, beta: f64| {
        let mut model = tiny_model(Arch::Bert, task(Arch::Bert), DType::F32, 1).unwrap();
        let mut m = SparseMlp::sparsegrad(
            SparseGradConfig {
                refresh_every: 3,
                ema_beta: beta,
                ..sg(0.05, support)
            },
            AdamConfig::default(),
        );
        m.prepare(&mut model, 0).unwrap();
        run(&mut model, &mut m, &c, &data, None);
        (model, m)
    };
    let (refreshed, r) = train(Support::Refreshed, 0.9);
    let (ema0, e) = train(Support::Ema, 0.0);
    assert_eq!(r.supports().unwrap(), e.supports().unwrap());
    for (p, _, _) in refreshed.mlp_linears() {
        let n = format!("{p}.weight");
        let d = max_abs_diff(
            refreshed.weights.get(&n).unwrap(),
            ema0.weights.get(&n).unwrap(),
        );
        assert!(d < 1e-5, "{n}: {d}");
    }
    let (_, fixed) = train(Support::Fixed, 0.9);
    let (_, ema) = train(Support::Ema, 0.9);
    let first = fixed.supports().unwrap();
    let mut moved = false;
    for ((name, sup), (_, start)) in ema.supports().unwrap().into_iter().zip(first) {
        let (sup, start) = (sup.unwrap(), start.unwrap());
        assert!(sup.windows(2).all(|w| w[0] < w[1]), "{name}");
        assert_eq!(sup.len(), start.len(), "{name}");
        moved |= sup != start;
    }
    assert!(moved, "two refreshes moved no support");
}

/// `basis_update_lr_scale` scales the basis phase's dense MLP updates: Adam's first step is
/// lr · sign-like, so one basis step at half the rate moves the weights exactly half as far.
#[test]
fn basis_update_rate_scales_the_warm_start() {
    let data = dataset(Arch::Bert, 24, 3);
    let warm = |scale: Option<f64>| {
        let mut model = tiny_model(Arch::Bert, task(Arch::Bert), DType::F32, 1).unwrap();
        let mut m = SparseMlp::sparsegrad(
            SparseGradConfig {
                basis_steps: 1,
                basis_update: true,
                basis_update_lr_scale: scale,
                ..sg(0.05, Support::Fixed)
            },
            AdamConfig::default(),
        );
        m.prepare(&mut model, 0).unwrap();
        run(&mut model, &mut m, &cfg(1, 4, 1), &data, None);
        let (state, _) = m.state(&model).unwrap();
        state
            .into_iter()
            .filter(|(k, _)| k.ends_with(".warm"))
            .collect::<BTreeMap<_, _>>()
    };
    let (full, half) = (warm(None), warm(Some(0.5)));
    assert!(!full.is_empty());
    for (k, w) in &full {
        let scale = max_abs_diff(w, &w.zeros_like().unwrap());
        assert!(scale > 0.0, "{k} did not move");
        let d = max_abs_diff(&(w * 0.5).unwrap(), &half[k]);
        assert!(d <= 1e-4 * scale, "{k}: {d} vs {scale}");
    }
}
