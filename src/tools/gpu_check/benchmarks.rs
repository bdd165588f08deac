//! Step time and peak device memory per method on fixed model shapes (random weights).

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use sparsegrad_engine::methods::sparsegrad::basis::Basis;
use sparsegrad_engine::methods::{MethodSpec, SparseGradConfig, SparseMlp, Support};
use sparsegrad_engine::models::{Arch, MlpKind};
use sparsegrad_engine::optim::AdamConfig;
use sparsegrad_engine::pretrained::{build_model, LoadOptions, LoadReport};
use sparsegrad_engine::testing::{random_tensors_on, tiny_task};

use super::model_checks::{batch_for, calibrate, train_ctx, vocab_of};
use super::GpuCheckArgs;

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

pub(super) fn bench_one(
    dev: &Device,
    shape: &str,
    dtype: &str,
    method: &str,
    a: &GpuCheckArgs,
) -> Result<Value> {
    let (arch, cfg, b, t) = bench_shape(shape, a.layers)?;
    let dt = sparsegrad_engine::pipeline::parse_dtype(Some(dtype))?;
    let task = tiny_task(arch);
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
    let mut m: Box<dyn sparsegrad_engine::methods::Method> = match method {
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
        other => MethodSpec::default_for(other)?.build(adam)?,
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
        let l = model.forward_loss(&batch, &mut train_ctx())?;
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
