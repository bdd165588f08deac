//! `sparsegrad gpu-check`: what deploy/cuda/gpu-check.sh runs on a GPU machine.
//!
//! 1. Correctness: the device under test against the CPU on the same weights and batch —
//!    logits, loss, SparseGrad's rotated gradients on the support, and the weights after one
//!    optimizer step (SparseGrad, full, LoRA) — for tiny BERT / RoBERTa / LLaMA and MiniLM-L6,
//!    in f32 and (forward + one SparseGrad step) in bf16; and each SparseGrad kernel against
//!    its CPU reference on an LLaMA-sized matrix.
//! 2. Benchmarks: step time and peak device memory of full / LoRA / SparseGrad on a
//!    BERT-base shape and a LLaMA-1.1B shape (random weights).
//!
//! Results go to `<out>/ours.json`, rewritten after every item so a run cut short keeps what
//! it measured. With `--device cpu` the same code runs here (the CPU against itself), which
//! is how CI keeps this harness working without a GPU.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use rand::Rng;
use serde_json::{json, Value};
use sparsegrad_engine::checkpoint::{build_model, load_model, LoadOptions, LoadReport};
use sparsegrad_engine::data::{collate, Example, Target};
use sparsegrad_engine::kernels::{self, reference, AdamStep, Csr};
use sparsegrad_engine::methods::sparsegrad::basis::Basis;
use sparsegrad_engine::methods::{
    Calibration, Full, Lora, LoraConfig, MePropConfig, Method, SparseGradConfig, SparseMlp, Support,
};
use sparsegrad_engine::models::{Arch, Batch, MlpKind, Model, Task};
use sparsegrad_engine::nn::Ctx;
use sparsegrad_engine::optim::AdamConfig;
use sparsegrad_engine::testing::{random_tensors, random_tensors_on, tiny_config};

#[derive(Args, Debug)]
pub struct GpuCheckArgs {
    /// The device under test (compared with the CPU).
    #[arg(long, default_value = "cuda")]
    pub device: String,
    #[arg(long)]
    pub out: PathBuf,
    /// A MiniLM-L6 folder (Hugging Face layout) for the real-model check.
    #[arg(long)]
    pub minilm: Option<PathBuf>,
    /// Kernel checks on an `ROWSxCOLS` matrix.
    #[arg(long, default_value = "11008x4096")]
    pub kernel_shape: String,
    #[arg(long, value_delimiter = ',', default_value = "bert-base,llama-1.1b")]
    pub shapes: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "full,lora,sparsegrad")]
    pub methods: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16")]
    pub dtypes: Vec<String>,
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Override a benchmark shape's layer count (quick runs of the harness).
    #[arg(long)]
    pub layers: Option<usize>,
    #[arg(long)]
    pub skip_bench: bool,
}

/// One comparison: `value` (a relative or absolute error, as `metric` says) against `tol`.
fn check(name: &str, model: &str, metric: &str, value: f64, tol: f64) -> Value {
    let pass = value.is_finite() && value <= tol;
    println!(
        "{} {model:<12} {name:<28} {metric} {value:.3e} (tol {tol:.0e})",
        if pass { "PASS" } else { "FAIL" }
    );
    json!({"check": name, "model": model, "metric": metric, "value": value, "tol": tol, "pass": pass})
}

fn host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1()?)
}

/// max |a − b| / max(|b|, floor).
fn rel_max(a: &[f32], b: &[f32], floor: f32) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let scale = b.iter().fold(floor, |m, x| m.max(x.abs()));
    let d = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    (d / scale) as f64
}

/// ‖a − b‖ / ‖b − base‖: the error of an update relative to the update.
fn rel_update(a: &[f32], b: &[f32], base: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b
        .iter()
        .zip(base)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum();
    (num / den.max(1e-30)).sqrt()
}

struct Out {
    path: PathBuf,
    doc: Value,
}

impl Out {
    fn push(&mut self, key: &str, v: Value) -> Result<()> {
        self.doc[key].as_array_mut().expect("array").push(v);
        std::fs::write(&self.path, serde_json::to_vec_pretty(&self.doc)?)?;
        Ok(())
    }
}

pub fn run(a: GpuCheckArgs) -> Result<()> {
    let dev = sparsegrad_engine::device::parse_device(&a.device)?;
    std::fs::create_dir_all(&a.out)?;
    let mut out = Out {
        path: a.out.join("ours.json"),
        doc: json!({
            "device": sparsegrad_engine::device::device_name(&dev),
            "started": chrono::Utc::now().to_rfc3339(),
            "correctness": [],
            "bench": [],
        }),
    };
    let t0 = Instant::now();
    kernel_checks(&dev, &a.kernel_shape, &mut out)?;
    for arch in [Arch::Bert, Arch::Roberta, Arch::Llama] {
        let cfg = tiny_config(arch);
        let task = task_for(arch);
        let tensors = random_tensors(arch, &cfg, &task, 0.3, 7)?;
        model_checks(
            &format!("tiny-{}", arch.as_str()),
            &dev,
            &|d, dt| {
                let opts = LoadOptions {
                    task: task.clone(),
                    dtype: dt,
                    device: d.clone(),
                    seed: 0,
                };
                Ok(build_model(
                    arch,
                    cfg.clone(),
                    tensors.clone(),
                    &opts,
                    &mut LoadReport::default(),
                )?)
            },
            true,
            &mut out,
        )?;
    }
    if let Some(dir) = &a.minilm {
        model_checks(
            "minilm-l6",
            &dev,
            &|d, dt| {
                let opts = LoadOptions {
                    task: Task::Classification { num_labels: 2 },
                    dtype: dt,
                    device: d.clone(),
                    seed: 0,
                };
                Ok(load_model(dir, &opts)
                    .with_context(|| format!("loading {}", dir.display()))?
                    .0)
            },
            false,
            &mut out,
        )?;
    }
    println!("correctness: {:.1} s", t0.elapsed().as_secs_f64());
    if !a.skip_bench {
        for shape in &a.shapes {
            for dtype in &a.dtypes {
                for method in &a.methods {
                    let r = bench_one(&dev, shape, dtype, method, &a)
                        .unwrap_or_else(|e| json!({"shape": shape, "dtype": dtype, "method": method, "error": format!("{e:#}")}));
                    println!("{r}");
                    out.push("bench", r)?;
                }
            }
        }
    }
    let failed = out.doc["correctness"]
        .as_array()
        .expect("array")
        .iter()
        .filter(|c| c["pass"] != true)
        .count();
    println!(
        "wrote {} ({failed} correctness checks failed)",
        out.path.display()
    );
    anyhow::ensure!(failed == 0, "{failed} correctness checks failed");
    Ok(())
}

fn task_for(arch: Arch) -> Task {
    match arch {
        Arch::Llama => Task::CausalLm,
        _ => Task::Classification { num_labels: 2 },
    }
}

fn batch_for(model: &Model, b: usize, t: usize, vocab: u32, seed: u64) -> Result<Batch> {
    let mut rng = sparsegrad_engine::rng::stream(seed, "gpu-check", 0);
    let causal = matches!(model.task, Task::CausalLm);
    let ex: Vec<Example> = (0..b)
        .map(|i| Example {
            ids: (0..t).map(|_| rng.random_range(5..vocab)).collect(),
            type_ids: vec![0; t],
            target: if causal {
                Target::Tokens(vec![1; t])
            } else {
                Target::Class((i % 2) as u32)
            },
            line: i,
        })
        .collect();
    let refs: Vec<&Example> = ex.iter().collect();
    Ok(collate(&refs, 0, model.dtype(), &model.weights.device)?)
}

fn vocab_of(model: &Model) -> Result<u32> {
    let name = model
        .weights
        .params
        .keys()
        .find(|k| k.ends_with("word_embeddings.weight") || k.ends_with("embed_tokens.weight"))
        .context("no token embedding")?
        .clone();
    Ok(model.weights.get(&name)?.dim(0)? as u32)
}

/// Training mode without dropout: the same numbers on every device.
fn train_ctx() -> Ctx {
    Ctx::train(sparsegrad_engine::rng::stream(0, "gpu-check", 0), false)
}

/// A method's calibration (SparseGrad's basis phase and support) on one repeated batch.
fn calibrate(m: &mut dyn Method, model: &mut Model, batch: &Batch, lr: f64) -> Result<()> {
    let mut back = |mm: &Model, _i: usize| -> sparsegrad_engine::Result<_> {
        let logits = mm.forward(batch, &mut train_ctx())?;
        Ok(mm.loss(&logits, batch)?.backward()?)
    };
    m.calibrate(
        model,
        Calibration {
            lr,
            cache: None,
            backward: &mut back,
        },
    )?;
    Ok(())
}

fn loss_and_grads(
    model: &Model,
    batch: &Batch,
) -> Result<(Tensor, f32, candle_core::backprop::GradStore)> {
    let logits = model.forward(batch, &mut train_ctx())?;
    let loss = model.loss(&logits, batch)?;
    let l = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    let grads = loss.backward()?;
    Ok((logits, l, grads))
}

fn sparse_cfg() -> SparseGradConfig {
    SparseGradConfig {
        density: 0.05,
        basis_steps: 2,
        support: Support::Fixed,
        ..Default::default()
    }
}

/// Values of every parameter the method may change, on the host.
fn snapshot(model: &Model) -> Result<BTreeMap<String, Vec<f32>>> {
    model
        .weights
        .snapshot()
        .into_iter()
        .map(|(k, t)| Ok((k, host(&t)?)))
        .collect()
}

type Build<'a> = dyn Fn(&Device, DType) -> Result<Model> + 'a;

fn model_checks(
    name: &str,
    dev: &Device,
    build: &Build<'_>,
    tiny: bool,
    out: &mut Out,
) -> Result<()> {
    let mut cpu = build(&Device::Cpu, DType::F32)?;
    let mut gpu = build(dev, DType::F32)?;
    let vocab = vocab_of(&cpu)?;
    let (b, t) = if tiny { (2, 8) } else { (4, 32) };
    let bc = batch_for(&cpu, b, t, vocab, 1)?;
    let bg = batch_for(&gpu, b, t, vocab, 1)?;
    // Forward.
    let (lc, loss_c, _) = loss_and_grads(&cpu, &bc)?;
    let (lg, loss_g, _) = loss_and_grads(&gpu, &bg)?;
    out.push(
        "correctness",
        check(
            "f32 logits",
            name,
            "rel max",
            rel_max(&host(&lg)?, &host(&lc)?, 1.0),
            1e-4,
        ),
    )?;
    out.push(
        "correctness",
        check(
            "f32 loss",
            name,
            "rel",
            ((loss_g - loss_c) / loss_c.abs().max(1e-6)).abs() as f64,
            1e-5,
        ),
    )?;

    // SparseGrad: calibrate on the CPU, give the device the same bases and support through
    // the checkpoint state, then one step on both.
    let lr = 1e-3;
    let adam = AdamConfig::default();
    let mut mc = SparseMlp::sparsegrad(sparse_cfg(), adam.clone());
    mc.prepare(&mut cpu, 0)?;
    calibrate(&mut mc, &mut cpu, &bc, lr)?;
    // A deep copy: state tensors share storage with the live weights and optimizer, which the
    // CPU step below updates in place.
    let (state, st) = mc.state(&cpu)?;
    let state: BTreeMap<String, Tensor> = state
        .into_iter()
        .map(|(k, v)| Ok((k, v.copy()?)))
        .collect::<Result<_>>()?;
    let mut mg = SparseMlp::sparsegrad(sparse_cfg(), adam.clone());
    mg.prepare(&mut gpu, 0)?;
    mg.load_state(&mut gpu, &state, st)?;
    let before = snapshot(&cpu)?;
    for (m, model, batch) in [(&mut mc, &mut cpu, &bc), (&mut mg, &mut gpu, &bg)] {
        m.begin_step(0, 1)?;
        let (_, _, grads) = loss_and_grads(model, batch)?;
        m.accumulate(model, grads)?;
    }
    let (pc, pg) = (mc.pending_gradients()?, mg.pending_gradients()?);
    let mut worst = 0f64;
    for ((wn, c), (_, g)) in pc.iter().zip(&pg) {
        match (c, g) {
            (Some((ic, vc)), Some((ig, vg))) if ic == ig => {
                worst = worst.max(rel_max(vg, vc, 1e-12))
            }
            _ => anyhow::bail!("{wn}: the devices hold different supports"),
        }
    }
    out.push(
        "correctness",
        check("rotated gradient", name, "rel max", worst, 1e-4),
    )?;
    mc.step(&mut cpu, lr, Some(1.0))?;
    mg.step(&mut gpu, lr, Some(1.0))?;
    out.push(
        "correctness",
        check(
            "sparsegrad step weights",
            name,
            "rel update",
            step_error(&cpu, &gpu, &before)?,
            1e-3,
        ),
    )?;

    // Full fine-tuning, LoRA and MeProp (top-k of the plain gradient on the device): one step
    // each from fresh models.
    if tiny {
        for method in ["full", "lora", "meprop"] {
            let mut cpu = build(&Device::Cpu, DType::F32)?;
            let mut gpu = build(dev, DType::F32)?;
            let make = || -> Box<dyn Method> {
                match method {
                    "full" => Box::new(Full::new(adam.clone())),
                    "meprop" => Box::new(SparseMlp::meprop(
                        MePropConfig {
                            density: 0.2,
                            ..Default::default()
                        },
                        adam.clone(),
                    )),
                    _ => Box::new(Lora::new(LoraConfig::default(), adam.clone())),
                }
            };
            let (mut mc, mut mg) = (make(), make());
            mc.prepare(&mut cpu, 3)?;
            mg.prepare(&mut gpu, 3)?;
            let before = snapshot(&cpu)?;
            for (m, model, batch) in [(&mut mc, &mut cpu, &bc), (&mut mg, &mut gpu, &bg)] {
                m.begin_step(0, 1)?;
                let (_, _, grads) = loss_and_grads(model, batch)?;
                m.accumulate(model, grads)?;
                m.step(model, lr, Some(1.0))?;
            }
            out.push(
                "correctness",
                check(
                    &format!("{method} step weights"),
                    name,
                    "rel update",
                    step_error(&cpu, &gpu, &before)?,
                    1e-3,
                ),
            )?;
        }
    }

    // bf16 mixed precision on the device: the forward against the f32 CPU logits, and one
    // SparseGrad step from the same state (bf16 compute, f32 moments and delta).
    let mut g16 = build(dev, DType::BF16)?;
    let b16 = batch_for(&g16, b, t, vocab, 1)?;
    let (l16, loss16, _) = loss_and_grads(&g16, &b16)?;
    out.push(
        "correctness",
        check(
            "bf16 logits",
            name,
            "rel max",
            rel_max(&host(&l16)?, &host(&lc)?, 1.0),
            5e-2,
        ),
    )?;
    out.push(
        "correctness",
        check(
            "bf16 loss",
            name,
            "rel",
            ((loss16 - loss_c) / loss_c.abs().max(1e-6)).abs() as f64,
            2e-2,
        ),
    )?;
    let mut m16 = SparseMlp::sparsegrad(sparse_cfg(), adam);
    m16.prepare(&mut g16, 0)?;
    m16.load_state(&mut g16, &state, st)?;
    m16.begin_step(0, 1)?;
    let (_, _, grads) = loss_and_grads(&g16, &b16)?;
    m16.accumulate(&g16, grads)?;
    // bf16 compute against the f32 CPU gradients on the same support. (Not the first Adam
    // step itself: it is ±lr·sign(g) per entry, so support entries whose gradient is ~0 — a
    // short calibration leaves many — take a random sign under any rounding.)
    let mut cos_worst = 1f64;
    for ((wn, c), (_, g)) in pc.iter().zip(&m16.pending_gradients()?) {
        let (Some((ic, vc)), Some((ig, vg))) = (c, g) else {
            anyhow::bail!("{wn}: no gradient in bf16");
        };
        anyhow::ensure!(ic == ig, "{wn}: the bf16 run holds another support");
        let dot: f64 = vc
            .iter()
            .zip(vg)
            .map(|(x, y)| (*x as f64) * (*y as f64))
            .sum();
        let n = vc.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()
            * vg.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        if n > 0.0 {
            cos_worst = cos_worst.min(dot / n);
        }
    }
    out.push(
        "correctness",
        check(
            "bf16 rotated gradient",
            name,
            "1 - cos",
            1.0 - cos_worst,
            2e-2,
        ),
    )?;
    // The step runs in mixed precision: the f32 delta moves, and stays finite.
    m16.step(&mut g16, lr, Some(1.0))?;
    let (d16, _) = m16.delta(&g16)?;
    let mut moved = 0usize;
    let mut finite = true;
    for (_, t) in d16.iter().filter(|(k, _)| k.ends_with(".sparse_values")) {
        let v = host(t)?;
        finite &= v.iter().all(|x| x.is_finite());
        moved += v.iter().filter(|x| **x != 0.0).count();
    }
    let bad = if finite && moved > 0 { 0.0 } else { 1.0 };
    out.push(
        "correctness",
        check(
            "bf16 sparsegrad step",
            name,
            "non-finite or still",
            bad,
            0.0,
        ),
    )?;
    Ok(())
}

/// The parameters' difference after one step, relative to the CPU step's change; the worst
/// parameter that changed.
fn step_error(cpu: &Model, gpu: &Model, before: &BTreeMap<String, Vec<f32>>) -> Result<f64> {
    let (c, g) = (snapshot(cpu)?, snapshot(gpu)?);
    let mut worst = 0f64;
    for (k, vc) in &c {
        let vg = g
            .get(k)
            .with_context(|| format!("{k} missing on the device"))?;
        let b0 = before
            .get(k)
            .with_context(|| format!("{k} appeared during the step"))?;
        worst = worst.max(if b0 != vc {
            rel_update(vg, vc, b0)
        } else {
            rel_max(vg, vc, 1.0)
        });
    }
    Ok(worst)
}

fn parse_shape(s: &str) -> Result<(usize, usize)> {
    let (r, c) = s.split_once('x').context("shape as ROWSxCOLS")?;
    Ok((r.parse()?, c.parse()?))
}

fn kernel_checks(dev: &Device, shape: &str, out: &mut Out) -> Result<()> {
    let (rows, cols) = parse_shape(shape)?;
    let n = rows * cols;
    let mut rng = sparsegrad_engine::rng::stream(11, "kernels", 0);
    let smooth: Vec<f32> = (0..n).map(|_| rng.random::<f32>() - 0.5).collect();
    // Quantised values: many exact ties, which must go to the lower index on both.
    let ties: Vec<f32> = smooth.iter().map(|x| (x * 64.0).round() / 64.0).collect();
    let name = format!("{rows}x{cols}");
    for (label, v) in [("top-k", &smooth), ("top-k ties", &ties)] {
        let k = n / 100;
        let x = Tensor::from_slice(v, (rows, cols), dev)?;
        let t = Instant::now();
        let (idx, vals) = kernels::topk_abs(&x, k)?;
        dev.synchronize()?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let (ri, rv) = reference::topk_abs_radix(v, k, 4096);
        let wrong =
            idx.iter().zip(&ri).filter(|(a, b)| a != b).count() + idx.len().abs_diff(ri.len());
        println!("{label}: {ms:.1} ms for k = {k} of {n}");
        out.push(
            "correctness",
            check(label, &name, "indices differing", wrong as f64, 0.0),
        )?;
        out.push(
            "correctness",
            check(
                &format!("{label} values"),
                &name,
                "rel max",
                rel_max(&host(&vals)?, &rv, 1e-12),
                0.0,
            ),
        )?;
    }
    // Gather on a support, accumulated twice.
    let k = n / 100;
    let pos: Vec<u32> = (0..k).map(|_| rng.random_range(0..n as u32)).collect();
    let x = Tensor::from_slice(&smooth, n, dev)?;
    let p = Tensor::from_slice(&pos, k, dev)?;
    let once = kernels::gather_acc(&x, &p, None)?;
    let twice = kernels::gather_acc(&x, &p, Some(&once))?;
    let want: Vec<f32> = pos.iter().map(|&i| smooth[i as usize] * 2.0).collect();
    out.push(
        "correctness",
        check(
            "gather on support",
            &name,
            "rel max",
            rel_max(&host(&twice)?, &want, 1e-12),
            0.0,
        ),
    )?;
    // Fused sparse Adam with slots.
    let cap = k + 1000;
    let m0: Vec<f32> = (0..cap).map(|_| rng.random::<f32>() - 0.5).collect();
    let v0: Vec<f32> = (0..cap).map(|_| rng.random::<f32>()).collect();
    let g: Vec<f32> = (0..k).map(|_| rng.random::<f32>() - 0.5).collect();
    let mut slots: Vec<u32> = (0..cap as u32).collect();
    slots.truncate(k);
    slots.reverse();
    let s = AdamStep {
        gscale: 0.7,
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        bc1: 0.271,
        bc2: 0.003,
    };
    let (mt, vt, ct) = kernels::sparse_adam(
        &Tensor::from_slice(&m0, cap, dev)?,
        &Tensor::from_slice(&v0, cap, dev)?,
        Some(&Tensor::from_slice(&slots, k, dev)?),
        &Tensor::from_slice(&g, k, dev)?,
        &s,
    )?;
    let (mut mr, mut vr) = (m0.clone(), v0.clone());
    let cr = reference::sparse_adam(&mut mr, &mut vr, Some(&slots), &g, &s);
    let e = rel_max(&host(&mt)?, &mr, 1e-12)
        .max(rel_max(&host(&vt)?, &vr, 1e-12))
        .max(rel_max(&host(&ct)?, &cr, 1e-12));
    out.push(
        "correctness",
        check("fused sparse adam", &name, "rel max", e, 1e-6),
    )?;
    // W += P S Qᵀ in both orientations: CSR scatter + in-place GEMM against the dense product
    // computed on the CPU.
    for (o, i) in [
        (rows.min(5632), cols.min(2048)),
        (cols.min(2048), rows.min(5632)),
    ] {
        let kk = o * i / 100;
        let idx: Vec<u32> = {
            let mut v: Vec<u32> = (0..kk)
                .map(|_| rng.random_range(0..(o * i) as u32))
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        let vals: Vec<f32> = (0..idx.len()).map(|_| rng.random::<f32>() - 0.5).collect();
        let pm = Tensor::randn(0f32, 1.0 / (o as f32).sqrt(), (o, o), &Device::Cpu)?;
        let qm = Tensor::randn(0f32, 1.0 / (i as f32).sqrt(), (i, i), &Device::Cpu)?;
        let w0 = Tensor::randn(0f32, 0.02, (o, i), &Device::Cpu)?;
        let basis = |d: &Device| -> Result<_> {
            Ok(
                sparsegrad_engine::methods::sparsegrad::core::HostBasis::new(Basis {
                    p: pm.to_device(d)?,
                    q: qm.to_device(d)?,
                    eig_p: vec![],
                    eig_q: vec![],
                    samples: 0,
                })?,
            )
        };
        let (bc, bg) = (basis(&Device::Cpu)?, basis(dev)?);
        let csr_c =
            sparsegrad_engine::methods::sparsegrad::core::HostBasis::csr(o, i, &idx, &Device::Cpu)?;
        let csr_g: Csr =
            sparsegrad_engine::methods::sparsegrad::core::HostBasis::csr(o, i, &idx, dev)?;
        let wc = w0.copy()?;
        let wg = w0.to_device(dev)?.copy()?;
        let t = Instant::now();
        bg.add_expanded(&wg, &csr_g, &Tensor::from_slice(&vals, vals.len(), dev)?)?;
        dev.synchronize()?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        bc.add_expanded(
            &wc,
            &csr_c,
            &Tensor::from_slice(&vals, vals.len(), &Device::Cpu)?,
        )?;
        let base = host(&w0)?;
        println!("W += P S Qᵀ {o}x{i}: {ms:.1} ms on the device");
        out.push(
            "correctness",
            check(
                "W += P S Q^T in place",
                &format!("{o}x{i}"),
                "rel update",
                rel_update(&host(&wg)?, &host(&wc)?, &base),
                1e-4,
            ),
        )?;
    }
    Ok(())
}

/// Benchmark configs: (config.json, batch, seq).
fn bench_shape(name: &str, layers: Option<usize>) -> Result<(Arch, Value, usize, usize)> {
    let (arch, mut cfg, b, t) = match name {
        "bert-base" => (
            Arch::Bert,
            json!({"model_type": "bert", "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
                   "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
                   "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0}),
            32,
            128,
        ),
        "llama-1.1b" => (
            Arch::Llama,
            json!({"model_type": "llama", "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
                   "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
                   "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false,
                   "max_position_embeddings": 2048}),
            4,
            512,
        ),
        o => anyhow::bail!("unknown shape {o} (bert-base, llama-1.1b)"),
    };
    if let Some(l) = layers {
        cfg["num_hidden_layers"] = json!(l);
    }
    Ok((arch, cfg, b, t))
}

fn peak(dev: &Device, reset: bool) -> Result<Option<(u64, u64)>> {
    match dev {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => Ok(Some(kernels::cuda::pool_peak(dev, reset)?)),
        _ => {
            let _ = reset;
            Ok(None)
        }
    }
}

fn bench_one(
    dev: &Device,
    shape: &str,
    dtype: &str,
    method: &str,
    a: &GpuCheckArgs,
) -> Result<Value> {
    let (arch, cfg, b, t) = bench_shape(shape, a.layers)?;
    let dt = sparsegrad_engine::pipeline::parse_dtype(Some(dtype))?;
    let task = task_for(arch);
    dev.synchronize()?;
    peak(dev, true)?;
    let tensors = random_tensors_on(arch, &cfg, &task, 0.02, dev, dt)?;
    let opts = LoadOptions {
        task,
        dtype: dt,
        device: dev.clone(),
        seed: 0,
    };
    let mut model = build_model(arch, cfg, tensors, &opts, &mut LoadReport::default())?;
    let adam = AdamConfig::default();
    let mut m: Box<dyn Method> = match method {
        "full" => Box::new(Full::new(adam)),
        "lora" => Box::new(Lora::new(LoraConfig::default(), adam)),
        "sparsegrad" => {
            // Random bases: the same products as real ones (timing only), without a host
            // eigendecomposition of 5632² Gram matrices.
            let mut bases = BTreeMap::new();
            for (prefix, kind, _) in model.mlp_linears() {
                if bases.contains_key(&kind) {
                    continue;
                }
                let (o, i) = model.weights.get(&format!("{prefix}.weight"))?.dims2()?;
                let basis = Basis {
                    p: Tensor::randn(0f32, 1.0 / (o as f32).sqrt(), (o, o), dev)?,
                    q: Tensor::randn(0f32, 1.0 / (i as f32).sqrt(), (i, i), dev)?,
                    eig_p: vec![1.0; o],
                    eig_q: vec![1.0; i],
                    samples: 1,
                };
                bases.insert(kind, basis);
            }
            let _: &BTreeMap<MlpKind, Basis> = &bases;
            Box::new(SparseMlp::sparsegrad(sparse_cfg_bench(), adam).with_bases(bases))
        }
        o => anyhow::bail!("unknown method {o}"),
    };
    m.prepare(&mut model, 0)?;
    let vocab = vocab_of(&model)?;
    let batch = batch_for(&model, b, t, vocab, 2)?;
    let t_cal = Instant::now();
    calibrate(m.as_mut(), &mut model, &batch, 1e-5)?;
    dev.synchronize()?;
    let calibration_ms = t_cal.elapsed().as_secs_f64() * 1e3;
    let mut times = Vec::new();
    let mut loss = f32::NAN;
    for step in 0..a.warmup + a.steps {
        if step == a.warmup {
            // Steady-state training memory, not the calibration's.
            peak(dev, true)?;
        }
        let s0 = Instant::now();
        m.begin_step(step, 1)?;
        let logits = model.forward(&batch, &mut train_ctx())?;
        let l = model.loss(&logits, &batch)?;
        let grads = l.backward()?;
        m.accumulate(&model, grads)?;
        m.step(&mut model, 1e-5, Some(1.0))?;
        loss = l.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        dev.synchronize()?;
        if step >= a.warmup {
            times.push(s0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let pk = peak(dev, false)?;
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let params: usize = model
        .weights
        .params
        .values()
        .map(|p| p.tensor().elem_count())
        .sum();
    Ok(json!({
        "shape": shape, "method": method, "dtype": dtype, "batch": b, "seq": t,
        "params": params,
        "trainable": m.trainable_count(&model),
        "optimizer_state": m.optimizer_state_len(),
        "step_ms_median": median,
        "step_ms_min": times[0],
        "tokens_per_sec": (b * t) as f64 / (median / 1e3),
        "peak_mib": pk.map(|p| p.0 as f64 / 1048576.0),
        "reserved_mib": pk.map(|p| p.1 as f64 / 1048576.0),
        "calibration_ms": calibration_ms,
        "final_loss": loss,
    }))
}

fn sparse_cfg_bench() -> SparseGradConfig {
    SparseGradConfig {
        density: 0.01,
        basis_steps: 1,
        support: Support::Fixed,
        ..Default::default()
    }
}
