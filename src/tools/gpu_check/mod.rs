//! `sparsegrad gpu-check`: what deploy/cuda/gpu-check.sh runs on a GPU machine.
//!
//! 1. Correctness ([`model_checks`], [`kernel_checks`]): the device under test against the
//!    CPU on the same weights and batch — logits, loss, SparseGrad's rotated gradients on the
//!    support, and the weights after one optimizer step (SparseGrad, full, LoRA) — for a tiny
//!    model of every registered architecture and MiniLM-L6, in f32 and (forward + one
//!    SparseGrad step) in bf16; and each SparseGrad kernel against its CPU reference on an
//!    LLaMA-sized matrix.
//! 2. [`benchmarks`]: step time and peak device memory of full / LoRA / SparseGrad on a
//!    BERT-base shape and a LLaMA-1.1B shape (random weights).
//!
//! Results go to `<out>/ours.json`, rewritten after every item so a run cut short keeps what
//! it measured. With `--device cpu` the same code runs here (the CPU against itself), which
//! is how CI keeps this harness working without a GPU.

mod benchmarks;
mod kernel_checks;
mod model_checks;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use serde_json::{json, Value};
use sparsegrad_engine::models::{Arch, Task};
use sparsegrad_engine::pretrained::{build_model, load_model, LoadOptions, LoadReport};
use sparsegrad_engine::testing::{random_tensors, tiny_config, tiny_task};

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
pub(super) fn check(name: &str, model: &str, metric: &str, value: f64, tol: f64) -> Value {
    let pass = value.is_finite() && value <= tol;
    println!(
        "{} {model:<12} {name:<28} {metric} {value:.3e} (tol {tol:.0e})",
        if pass { "PASS" } else { "FAIL" }
    );
    json!({"check": name, "model": model, "metric": metric, "value": value, "tol": tol, "pass": pass})
}

pub(super) fn host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1()?)
}

/// max |a − b| / max(|b|, floor).
pub(super) fn rel_max(a: &[f32], b: &[f32], floor: f32) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let scale = b.iter().fold(floor, |m, x| m.max(x.abs()));
    let d = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    (d / scale) as f64
}

/// ‖a − b‖ / ‖b − base‖: the error of an update relative to the update.
pub(super) fn rel_update(a: &[f32], b: &[f32], base: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b
        .iter()
        .zip(base)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum();
    (num / den.max(1e-30)).sqrt()
}

pub(super) struct Out {
    path: PathBuf,
    doc: Value,
}

impl Out {
    pub(super) fn push(&mut self, key: &str, v: Value) -> Result<()> {
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
    kernel_checks::kernel_checks(&dev, &a.kernel_shape, &mut out)?;
    for &arch in Arch::ALL {
        let cfg = tiny_config(arch);
        let task = tiny_task(arch);
        let tensors = random_tensors(arch, &cfg, &task, 0.3, 7)?;
        model_checks::model_checks(
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
        model_checks::model_checks(
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
                    let r = benchmarks::bench_one(&dev, shape, dtype, method, &a)
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
