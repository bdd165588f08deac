//! Device against CPU on whole models: logits, loss, gradients and one optimizer step.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::Rng;

use sparsegrad_engine::data::{collate, Example, Target};
use sparsegrad_engine::methods::{
    Calibration, Full, Lora, LoraConfig, MePropConfig, Method, SparseGradConfig, SparseMlp, Support,
};
use sparsegrad_engine::models::{Batch, Model, Task};
use sparsegrad_engine::nn::Ctx;
use sparsegrad_engine::optim::AdamConfig;

use super::{check, host, rel_max, rel_update, Out};

pub(super) fn batch_for(model: &Model, b: usize, t: usize, vocab: u32, seed: u64) -> Result<Batch> {
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

pub(super) fn vocab_of(model: &Model) -> Result<u32> {
    Ok(model.architecture.shape().vocab as u32)
}

/// Training mode without dropout: the same numbers on every device.
pub(super) fn train_ctx() -> Ctx {
    Ctx::train(sparsegrad_engine::rng::stream(0, "gpu-check", 0), false)
}

/// A method's calibration (SparseGrad's basis phase and support) on one repeated batch.
pub(super) fn calibrate(
    m: &mut dyn Method,
    model: &mut Model,
    batch: &Batch,
    lr: f64,
) -> Result<()> {
    let mut back = |mm: &Model, _i: usize| -> sparsegrad_engine::Result<_> {
        Ok(mm.forward_loss(batch, &mut train_ctx())?.backward()?)
    };
    m.calibrate(
        model,
        Calibration {
            lr,
            max_grad_norm: Some(1.0),
            cache: None,
            backward: &mut back,
        },
    )?;
    Ok(())
}

pub(super) fn loss_and_grads(
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
pub(super) fn snapshot(model: &Model) -> Result<BTreeMap<String, Vec<f32>>> {
    model
        .weights
        .snapshot()
        .into_iter()
        .map(|(k, t)| Ok((k, host(&t)?)))
        .collect()
}

pub(super) type Build<'a> = dyn Fn(&Device, DType) -> Result<Model> + 'a;

pub(super) fn model_checks(
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
