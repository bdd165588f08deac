//! Finite-difference checks (in f64) of every custom op and of tiny BERT, RoBERTa and LLaMA
//! end to end, for full training and for LoRA (whose frozen linears use the input-gradient-only
//! tap).

use candle_core::{DType, Device, Tensor, Var};
use sparsegrad_engine::data::{collate, Example, Target};
use sparsegrad_engine::methods::{Full, Lora, LoraConfig, LoraTargets, Method};
use sparsegrad_engine::models::{Arch, Model, Task};
use sparsegrad_engine::nn::{self, Ctx};
use sparsegrad_engine::optim::AdamConfig;
use sparsegrad_engine::testing::{max_abs_diff, tiny_model, tiny_task};

const EPS: f64 = 1e-6;

fn rand_tensor(shape: &[usize], seed: u64) -> Tensor {
    use rand::Rng;
    let mut rng = sparsegrad_engine::rng::stream(seed, "gradcheck", 0);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random::<f64>() * 2.0 - 1.0).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Compares d f / d var from backward with central differences at every entry.
fn check(var: &Var, f: &dyn Fn() -> Tensor, tol: f64) {
    let loss = f();
    let grads = loss.backward().unwrap();
    let g: Vec<f64> = grads
        .get(var.as_tensor())
        .expect("gradient")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    let shape = var.as_tensor().shape().clone();
    let mut worst = 0f64;
    for i in 0..base.len() {
        let mut p = base.clone();
        p[i] += EPS;
        var.set(&Tensor::from_vec(p.clone(), shape.clone(), &Device::Cpu).unwrap())
            .unwrap();
        let lp = f().to_scalar::<f64>().unwrap();
        p[i] -= 2.0 * EPS;
        var.set(&Tensor::from_vec(p, shape.clone(), &Device::Cpu).unwrap())
            .unwrap();
        let lm = f().to_scalar::<f64>().unwrap();
        let num = (lp - lm) / (2.0 * EPS);
        let err = (num - g[i]).abs() / (1.0f64).max(num.abs()).max(g[i].abs());
        worst = worst.max(err);
    }
    var.set(&Tensor::from_vec(base, shape, &Device::Cpu).unwrap())
        .unwrap();
    assert!(
        worst < tol,
        "finite-difference mismatch: worst relative error {worst:e}"
    );
}

/// A fixed weighting makes the scalar depend on every output element differently.
fn weighted_sum(y: &Tensor, seed: u64) -> Tensor {
    let w = rand_tensor(y.dims(), seed);
    y.mul(&w).unwrap().sum_all().unwrap()
}

#[test]
fn layer_norm_gradients() {
    let x = Var::from_tensor(&rand_tensor(&[3, 5, 8], 1)).unwrap();
    let w = Var::from_tensor(&rand_tensor(&[8], 2)).unwrap();
    let b = Var::from_tensor(&rand_tensor(&[8], 3)).unwrap();
    let f = || weighted_sum(&nn::layer_norm(&x, &w, &b, 1e-5).unwrap(), 9);
    check(&x, &f, 1e-6);
    check(&w, &f, 1e-6);
    check(&b, &f, 1e-6);
}

#[test]
fn rms_norm_gradients() {
    let x = Var::from_tensor(&rand_tensor(&[4, 6], 4)).unwrap();
    let w = Var::from_tensor(&rand_tensor(&[6], 5)).unwrap();
    let f = || weighted_sum(&nn::rms_norm(&x, &w, 1e-6).unwrap(), 9);
    check(&x, &f, 1e-6);
    check(&w, &f, 1e-6);
}

/// The decoder's fused kernels against finite differences in f64 (the fused path handles
/// f64, so these check the kernels themselves, not the composed fallbacks).
#[test]
fn fused_decoder_kernels_pass_the_gradient_check() {
    let x = Var::from_tensor(&rand_tensor(&[4, 6], 4)).unwrap();
    let w = Var::from_tensor(&rand_tensor(&[6], 5)).unwrap();
    let f = || weighted_sum(&nn::rms_norm_composed(&x, &w, 1e-6).unwrap(), 9);
    check(&x, &f, 1e-6);
    check(&w, &f, 1e-6);
    // RoPE fused with the head transpose: (B, T, H, D) -> (B, H, T, D).
    let (cos, sin) = nn::rope_tables(5, 8, 10000.0, DType::F64, &Device::Cpu).unwrap();
    let x = Var::from_tensor(&rand_tensor(&[2, 5, 3, 8], 7)).unwrap();
    let f = || weighted_sum(&nn::fused::rope_heads(&x, &cos, &sin).unwrap(), 9);
    check(&x, &f, 1e-6);
    let g = Var::from_tensor(&(rand_tensor(&[3, 7], 8) * 4.0).unwrap()).unwrap();
    let u = Var::from_tensor(&rand_tensor(&[3, 7], 9)).unwrap();
    let f = || weighted_sum(&nn::fused::swiglu(&g, &u).unwrap(), 10);
    check(&g, &f, 1e-6);
    check(&u, &f, 1e-6);
}

/// Fused and composed decoder ops agree in value and gradient (f32), including the RoPE
/// layout change and SwiGLU with only one input trained.
#[test]
fn fused_decoder_kernels_match_composed_reference() {
    let f32 = |t: Tensor| t.to_dtype(DType::F32).unwrap();
    let x = Var::from_tensor(&f32(rand_tensor(&[2, 5, 3, 8], 11))).unwrap();
    let (cos, sin) = nn::rope_tables(5, 8, 10000.0, DType::F32, &Device::Cpu).unwrap();
    let wt = f32(rand_tensor(&[2, 3, 5, 8], 12));
    let yf = nn::fused::rope_heads(&x, &cos, &sin).unwrap();
    let yc = nn::rope(
        &x.transpose(1, 2).unwrap().contiguous().unwrap(),
        &cos,
        &sin,
    )
    .unwrap();
    assert_eq!(yf.dims(), &[2, 3, 5, 8]);
    assert!(max_abs_diff(&yf, &yc) < 1e-6);
    let gf = yf.mul(&wt).unwrap().sum_all().unwrap().backward().unwrap();
    let gc = yc.mul(&wt).unwrap().sum_all().unwrap().backward().unwrap();
    let (a, c) = (gf.get(&x).unwrap(), gc.get(&x).unwrap());
    assert!(max_abs_diff(a, c) < 1e-5, "rope gradient");

    let xr = Var::from_tensor(&f32(rand_tensor(&[3, 7, 24], 13))).unwrap();
    let w = Var::from_tensor(&f32(rand_tensor(&[24], 14))).unwrap();
    let wt = f32(rand_tensor(&[3, 7, 24], 15));
    let yf = nn::rms_norm(&xr, &w, 1e-6).unwrap();
    let yc = nn::rms_norm_composed(&xr, &w, 1e-6).unwrap();
    assert!(max_abs_diff(&yf, &yc) < 1e-5);
    let gf = yf.mul(&wt).unwrap().sum_all().unwrap().backward().unwrap();
    let gc = yc.mul(&wt).unwrap().sum_all().unwrap().backward().unwrap();
    for v in [&xr, &w] {
        let d = max_abs_diff(gf.get(v).unwrap(), gc.get(v).unwrap());
        assert!(d < 1e-4, "rms norm gradient differs by {d}");
    }

    let g = Var::from_tensor(&f32((rand_tensor(&[5, 33], 16) * 6.0).unwrap())).unwrap();
    let u = f32(rand_tensor(&[5, 33], 17));
    let yf = nn::fused::swiglu(&g, &u).unwrap();
    let yc = g.silu().unwrap().mul(&u).unwrap();
    assert!(max_abs_diff(&yf, &yc) < 1e-5);
    let gf = yf.sum_all().unwrap().backward().unwrap();
    let gc = yc.sum_all().unwrap().backward().unwrap();
    assert!(max_abs_diff(gf.get(&g).unwrap(), gc.get(&g).unwrap()) < 1e-5);
    // The frozen input gets no gradient.
    assert!(gf.get(&u).is_none());
}

/// LoRA's fused node (frozen `W` and bias, dropout mask on the adapter input) against finite
/// differences for `x`, `A` and `B`, and against the composed graph in value.
#[test]
fn fused_lora_linear_passes_the_gradient_check() {
    let x = Var::from_tensor(&rand_tensor(&[5, 6], 21)).unwrap();
    let w = rand_tensor(&[4, 6], 22);
    let bias = rand_tensor(&[4], 23);
    let a = Var::from_tensor(&rand_tensor(&[2, 6], 24)).unwrap();
    let b = Var::from_tensor(&rand_tensor(&[4, 2], 25)).unwrap();
    let keep: Vec<f64> = (0..30)
        .map(|i| if i % 3 == 1 { 0.0 } else { 1.5 })
        .collect();
    let mask = Tensor::from_vec(keep, (5, 6), &Device::Cpu).unwrap();
    let fused = || nn::lora_linear(&x, &w, Some(&bias), &a, &b, 0.7, Some(mask.clone())).unwrap();
    let composed = (x
        .matmul(&w.t().unwrap())
        .unwrap()
        .broadcast_add(&bias)
        .unwrap()
        + (x.mul(&mask).unwrap().matmul(&a.t().unwrap()).unwrap() * 0.7)
            .unwrap()
            .matmul(&b.t().unwrap())
            .unwrap())
    .unwrap();
    assert!(max_abs_diff(&fused(), &composed) < 1e-12);
    let f = || weighted_sum(&fused(), 26);
    check(&x, &f, 1e-6);
    check(&a, &f, 1e-6);
    check(&b, &f, 1e-6);
    // A trained bias gets its gradient after the node.
    let tb = Var::from_tensor(&bias).unwrap();
    let y = nn::lora_linear(&x, &w, Some(&tb), &a, &b, 0.7, None).unwrap();
    let g = weighted_sum(&y, 26).backward().unwrap();
    assert_eq!(g.get(&tb).unwrap().dims(), &[4]);
}

#[test]
fn softmax_and_log_softmax_gradients() {
    let x = Var::from_tensor(&(rand_tensor(&[2, 3, 7], 6) * 3.0).unwrap()).unwrap();
    check(
        &x,
        &|| weighted_sum(&nn::softmax_last_dim(&x).unwrap(), 9),
        1e-6,
    );
    check(
        &x,
        &|| weighted_sum(&nn::log_softmax_last_dim(&x).unwrap(), 10),
        1e-6,
    );
}

#[test]
fn softmax_matches_definition() {
    let x = Tensor::new(&[[1.0f64, 2.0, 3.0], [0.0, -1e9, 0.0]], &Device::Cpu).unwrap();
    let y: Vec<Vec<f64>> = nn::softmax_last_dim(&x).unwrap().to_vec2().unwrap();
    let z = 1f64.exp() + 2f64.exp() + 3f64.exp();
    assert!((y[0][2] - 3f64.exp() / z).abs() < 1e-15);
    assert_eq!(y[1], vec![0.5, 0.0, 0.5]);
}

#[test]
fn rope_gradients_and_rotation() {
    let (cos, sin) = nn::rope_tables(5, 8, 10000.0, DType::F64, &Device::Cpu).unwrap();
    let x = Var::from_tensor(&rand_tensor(&[2, 3, 5, 8], 7)).unwrap();
    check(
        &x,
        &|| weighted_sum(&nn::rope(&x, &cos, &sin).unwrap(), 9),
        1e-6,
    );
    // RoPE is a rotation: it preserves norms per position.
    let y = nn::rope(&x, &cos, &sin).unwrap();
    let nx: f64 = x.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
    let ny: f64 = y.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
    assert!((nx - ny).abs() < 1e-6 * nx, "{nx} vs {ny}");
}

#[test]
fn cross_entropy_gradients() {
    let logits = Var::from_tensor(&rand_tensor(&[4, 5], 8)).unwrap();
    let t = Tensor::new(&[1u32, 0, 4, 2], &Device::Cpu).unwrap();
    let w = Tensor::new(&[1.0f64, 0.0, 1.0, 1.0], &Device::Cpu).unwrap();
    check(
        &logits,
        &|| nn::cross_entropy(&logits, &t, &w).unwrap(),
        1e-6,
    );
}

#[test]
fn frozen_linear_gives_input_gradient_only() {
    let x = Var::from_tensor(&rand_tensor(&[6, 4], 11)).unwrap();
    let w = rand_tensor(&[3, 4], 12);
    let f = || weighted_sum(&nn::frozen_linear(&x, &w, None).unwrap(), 9);
    check(&x, &f, 1e-6);
    let y = nn::frozen_linear(&x, &w, None).unwrap();
    let dense = x.matmul(&w.t().unwrap()).unwrap();
    assert_eq!(y.to_vec2::<f64>().unwrap(), dense.to_vec2::<f64>().unwrap());
    let grads = weighted_sum(&y, 9).backward().unwrap();
    assert!(
        grads.get(&w).is_none(),
        "a frozen weight must not receive a gradient"
    );
}

fn batch_for(model: &Model, seed: u64) -> sparsegrad_engine::models::Batch {
    use rand::Rng;
    let mut rng = sparsegrad_engine::rng::stream(seed, "batch", 0);
    let lens = [7usize, 5, 6];
    let ex: Vec<Example> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let ids: Vec<u32> = (0..n).map(|_| rng.random_range(2..50)).collect();
            let target = match &model.task {
                Task::Classification { .. } => Target::Class((i % 3) as u32),
                Task::Regression => Target::Value(i as f32 * 0.7 - 0.5),
                Task::CausalLm => Target::Tokens((0..n).map(|j| (j >= 2) as u8).collect()),
            };
            let type_ids = (0..n).map(|j| (j >= n / 2) as u32).collect();
            Example {
                ids,
                type_ids,
                target,
                line: i + 1,
            }
        })
        .collect();
    let refs: Vec<&Example> = ex.iter().collect();
    let pad = model.pad_id();
    collate(&refs, pad, model.dtype(), &Device::Cpu).unwrap()
}

/// Checks a handful of entries of every trainable parameter of a model.
fn check_model(model: &Model, per_param: usize, tol: f64) {
    let batch = batch_for(model, 3);
    let f = || {
        let logits = model.forward(&batch, &mut Ctx::eval()).unwrap();
        model.loss(&logits, &batch).unwrap()
    };
    let grads = f().backward().unwrap();
    let mut checked = 0;
    for (name, var) in model.weights.trainable() {
        let g: Vec<f64> = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let shape = var.as_tensor().shape().clone();
        let step = (base.len() / per_param).max(1);
        for i in (0..base.len()).step_by(step).take(per_param) {
            let mut p = base.clone();
            p[i] += EPS;
            var.set(&Tensor::from_vec(p.clone(), shape.clone(), &Device::Cpu).unwrap())
                .unwrap();
            let lp = f().to_scalar::<f64>().unwrap();
            p[i] -= 2.0 * EPS;
            var.set(&Tensor::from_vec(p, shape.clone(), &Device::Cpu).unwrap())
                .unwrap();
            let lm = f().to_scalar::<f64>().unwrap();
            var.set(&Tensor::from_vec(base.clone(), shape.clone(), &Device::Cpu).unwrap())
                .unwrap();
            let num = (lp - lm) / (2.0 * EPS);
            let err = (num - g[i]).abs() / 1e-3f64.max(num.abs()).max(g[i].abs());
            assert!(
                err < tol,
                "{name}[{i}]: analytic {} vs numeric {num} (rel {err:e})",
                g[i]
            );
            checked += 1;
        }
    }
    assert!(checked > 20, "too few entries checked: {checked}");
}

fn full(arch: Arch, task: Task) -> Model {
    let mut m = tiny_model(arch, task, DType::F64, 5).unwrap();
    Full::new(AdamConfig::default()).prepare(&mut m, 5).unwrap();
    m
}

#[test]
fn bert_classification_end_to_end() {
    check_model(
        &full(Arch::Bert, Task::Classification { num_labels: 3 }),
        3,
        1e-5,
    );
}

#[test]
fn bert_regression_end_to_end() {
    check_model(&full(Arch::Bert, Task::Regression), 3, 1e-5);
}

#[test]
fn roberta_classification_end_to_end() {
    check_model(
        &full(Arch::Roberta, Task::Classification { num_labels: 3 }),
        3,
        1e-5,
    );
}

#[test]
fn llama_causal_lm_end_to_end() {
    check_model(&full(Arch::Llama, Task::CausalLm), 3, 1e-5);
}

#[test]
fn every_registered_architecture_passes_the_gradient_check() {
    // A new architecture is checked here without a test of its own (the named tests above
    // cover more tasks of the existing ones).
    for &arch in Arch::ALL {
        // Three classes: the batch has one of each.
        let task = match tiny_task(arch) {
            Task::Classification { .. } => Task::Classification { num_labels: 3 },
            t => t,
        };
        check_model(&full(arch, task), 2, 1e-5);
    }
}

#[test]
fn lora_on_frozen_models_end_to_end() {
    for (arch, task) in [
        (Arch::Bert, Task::Classification { num_labels: 3 }),
        (Arch::Roberta, Task::Regression),
        (Arch::Llama, Task::CausalLm),
    ] {
        let mut m = tiny_model(arch, task, DType::F64, 5).unwrap();
        let cfg = LoraConfig {
            r: 2,
            alpha: 4.0,
            dropout: 0.0,
            targets: LoraTargets::All,
            ..Default::default()
        };
        Lora::new(cfg, AdamConfig::default())
            .prepare(&mut m, 5)
            .unwrap();
        // B starts at zero, which would leave A's gradient zero; give B values to test both.
        for (name, var) in m.weights.trainable() {
            if name.ends_with("lora_B.weight") {
                var.set(&rand_tensor(var.dims(), 17)).unwrap();
            }
        }
        check_model(&m, 2, 1e-5);
        // Nothing frozen gets a gradient.
        let batch = batch_for(&m, 3);
        let logits = m.forward(&batch, &mut Ctx::eval()).unwrap();
        let grads = m.loss(&logits, &batch).unwrap().backward().unwrap();
        for (name, p) in &m.weights.params {
            if !p.is_trainable() {
                assert!(
                    grads.get(p.tensor()).is_none(),
                    "frozen {name} got a gradient"
                );
            }
        }
    }
}

#[test]
fn activation_gradients() {
    let x = Var::from_tensor(&(rand_tensor(&[40], 21) * 3.0).unwrap()).unwrap();
    check(&x, &|| weighted_sum(&nn::gelu_erf(&x).unwrap(), 9), 1e-8);
    check(&x, &|| weighted_sum(&nn::gelu_tanh(&x).unwrap(), 9), 1e-8);
    check(&x, &|| weighted_sum(&x.silu().unwrap(), 9), 1e-6);
    check(&x, &|| weighted_sum(&x.tanh().unwrap(), 9), 1e-6);
}

/// The fused CPU kernels (which the checks above exercise) agree with the composed reference
/// used on other devices, forward and backward, in f32.
#[test]
fn fused_kernels_match_composed_reference() {
    let x = Var::from_tensor(
        &(rand_tensor(&[3, 7, 24], 31) * 4.0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap(),
    )
    .unwrap();
    let w = Var::from_tensor(&rand_tensor(&[24], 32).to_dtype(DType::F32).unwrap()).unwrap();
    let b = Var::from_tensor(&rand_tensor(&[24], 33).to_dtype(DType::F32).unwrap()).unwrap();
    let wt = rand_tensor(&[3, 7, 24], 34).to_dtype(DType::F32).unwrap();
    type Op<'a> = Box<dyn Fn() -> Tensor + 'a>;
    let pairs: Vec<(&str, Op, Op)> = vec![
        (
            "layer_norm",
            Box::new(|| nn::layer_norm(&x, &w, &b, 1e-5).unwrap()),
            Box::new(|| nn::layer_norm_composed(&x, &w, &b, 1e-5).unwrap()),
        ),
        (
            "softmax",
            Box::new(|| nn::softmax_last_dim(&x).unwrap()),
            Box::new(|| nn::softmax_composed(&x).unwrap()),
        ),
        (
            "gelu",
            Box::new(|| nn::gelu_erf(&x).unwrap()),
            Box::new(|| nn::gelu_erf_composed(&x).unwrap()),
        ),
    ];
    for (name, fused, composed) in pairs {
        let (yf, yc) = (fused(), composed());
        let d: f32 = yf
            .sub(&yc)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(d < 1e-5, "{name} forward differs by {d}");
        let gf = yf.mul(&wt).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = yc.mul(&wt).unwrap().sum_all().unwrap().backward().unwrap();
        for (vn, v) in [("x", &x), ("w", &w), ("b", &b)] {
            match (gf.get(v.as_tensor()), gc.get(v.as_tensor())) {
                (Some(a), Some(c)) => {
                    let d: f32 = a
                        .sub(c)
                        .unwrap()
                        .abs()
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .max(0)
                        .unwrap()
                        .to_scalar()
                        .unwrap();
                    assert!(d < 1e-4, "{name}: gradient of {vn} differs by {d}");
                }
                (None, None) => {}
                _ => panic!("{name}: gradient of {vn} present in one version only"),
            }
        }
    }
}

#[test]
fn fast_exp_and_erf_are_accurate_and_flush_to_zero() {
    use sparsegrad_engine::nn::fused::{erf_f32, exp_f32};
    let mut worst_exp = 0f64;
    let mut worst_erf = 0f64;
    for i in 0..200_000 {
        let x = -87.0 + 175.0 * i as f32 / 200_000.0;
        let e = (exp_f32(x) as f64 - (x as f64).exp()).abs() / (x as f64).exp();
        worst_exp = worst_exp.max(e);
        let y = -6.0 + 12.0 * i as f32 / 200_000.0;
        worst_erf = worst_erf.max((erf_f32(y) as f64 - libm::erf(y as f64)).abs());
    }
    assert!(worst_exp < 5e-7, "exp relative error {worst_exp:e}");
    assert!(worst_erf < 5e-7, "erf absolute error {worst_erf:e}");
    // Masked attention scores must give exact zeros, not subnormals (which slow matmuls ~100x).
    assert_eq!(exp_f32(-1e9), 0.0);
    assert_eq!(exp_f32(-88.0), 0.0);
    let s = Tensor::new(&[[[[1.0f32, 2.0, 3.0]]]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[0.0f32, 0.0, -1e9]], &Device::Cpu).unwrap();
    let p =
        nn::fused::scaled_masked_softmax(&s, 1.0, &mask, nn::fused::MaskRows::PerBatch).unwrap();
    let p: Vec<f32> = p.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(p[2], 0.0);
    assert!((p[0] + p[1] - 1.0).abs() < 1e-6);
}

/// The chunked causal-LM loss is the plain one: same value, same gradients for the hidden
/// states and a trained (or frozen) output projection, whatever the chunk size, in f64.
#[test]
fn chunked_lm_loss_equals_the_plain_loss_and_its_gradient() {
    let (n, h, v) = (11, 6, 13);
    let hv = Var::from_tensor(&rand_tensor(&[n, h], 1)).unwrap();
    let w = Var::from_tensor(&rand_tensor(&[v, h], 2)).unwrap();
    let targets = Tensor::from_vec(
        (0..n as u32)
            .map(|i| (i * 5 + 3) % v as u32)
            .collect::<Vec<_>>(),
        n,
        &Device::Cpu,
    )
    .unwrap();
    let mask = Tensor::from_vec(
        (0..n).map(|i| f64::from(i % 4 != 1)).collect::<Vec<_>>(),
        n,
        &Device::Cpu,
    )
    .unwrap();
    let plain = nn::cross_entropy(
        &hv.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap(),
        &targets,
        &mask,
    )
    .unwrap();
    let want = plain.backward().unwrap();
    let value = |t: &Tensor| t.to_scalar::<f64>().unwrap();
    let diff = max_abs_diff;
    for chunk in [1, 3, 4, n, 100] {
        for trained in [true, false] {
            let head = if trained {
                nn::Param::Trainable(w.clone())
            } else {
                nn::Param::Frozen(w.as_tensor().detach())
            };
            let loss =
                nn::chunked_lm_loss(hv.as_tensor(), &head, &targets, &mask, chunk, true).unwrap();
            assert!(
                (value(&loss) - value(&plain)).abs() < 1e-12,
                "chunk {chunk}"
            );
            let got = loss.backward().unwrap();
            let gh = got.get(hv.as_tensor()).unwrap();
            assert!(diff(gh, want.get(hv.as_tensor()).unwrap()) < 1e-12);
            match got.get(w.as_tensor()) {
                Some(gw) if trained => {
                    assert!(diff(gw, want.get(w.as_tensor()).unwrap()) < 1e-12)
                }
                None if !trained => {}
                other => panic!(
                    "head gradient {:?} with trained = {trained}",
                    other.is_some()
                ),
            }
            // Evaluation: the value alone.
            let eval =
                nn::chunked_lm_loss(hv.as_tensor(), &head, &targets, &mask, chunk, false).unwrap();
            assert!((value(&eval) - value(&plain)).abs() < 1e-12);
            assert!(!eval.track_op());
        }
    }
}

/// On a tiny LLaMA (its own `lm_head`, or tied to the embedding: one weight, two uses;
/// every parameter trained) the loss the trainer uses is the plain loss of the logits, with
/// every parameter's gradient equal (f64).
#[test]
fn llama_forward_loss_equals_forward_then_loss() {
    for tied in [false, true] {
        let mut model = full(Arch::Llama, Task::CausalLm);
        if tied {
            assert!(model.weights.params.remove("lm_head.weight").is_some());
        }
        forward_loss_matches(&model);
    }
}

fn forward_loss_matches(model: &Model) {
    let batch = batch_for(model, 4);
    let train = || Ctx::train(sparsegrad_engine::rng::stream(0, "t", 0), false);
    let chunked = model.forward_loss(&batch, &mut train()).unwrap();
    let logits = model.forward(&batch, &mut train()).unwrap();
    let plain = model.loss(&logits, &batch).unwrap();
    let (a, b) = (
        chunked.to_scalar::<f64>().unwrap(),
        plain.to_scalar::<f64>().unwrap(),
    );
    assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    let (ga, gb) = (chunked.backward().unwrap(), plain.backward().unwrap());
    let trainable = model.weights.trainable();
    assert!(trainable.len() > 5);
    for (name, var) in trainable {
        let (x, y) = (
            ga.get(var.as_tensor()).unwrap(),
            gb.get(var.as_tensor()).unwrap(),
        );
        let d = max_abs_diff(x, y);
        assert!(d < 1e-10, "{name}: {d}");
    }
}

/// Inference builds no graph even over trained parameters (so evaluation keeps one layer's
/// intermediates, not every layer's) and computes exactly what a tracked forward does.
#[test]
fn inference_forward_builds_no_graph_and_changes_nothing() {
    for (arch, task) in [
        (Arch::Llama, Task::CausalLm),
        (Arch::Bert, Task::Classification { num_labels: 3 }),
    ] {
        let model = full(arch, task);
        assert!(model.weights.has_trainable());
        let batch = batch_for(&model, 6);
        let tracked = model.forward(&batch, &mut Ctx::eval()).unwrap();
        let free = model.forward(&batch, &mut Ctx::inference()).unwrap();
        assert!(tracked.track_op());
        assert!(!free.track_op(), "{arch:?}");
        assert_eq!(max_abs_diff(&tracked, &free), 0.0, "{arch:?}");
        let l = model.forward_loss(&batch, &mut Ctx::inference()).unwrap();
        assert!(!l.track_op(), "{arch:?}");
    }
}
