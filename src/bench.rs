//! `sparsegrad bench train`: step time, tokens/s and peak RSS for fixed shapes on real weights,
//! printed as JSON lines (compare with `scripts/bench_torch.py` on the same machine).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::{Args, Subcommand};
use rand::Rng;
use sparsegrad_engine::data::{collate, Example, Target};
use sparsegrad_engine::methods::{LoraConfig, MethodSpec};
use sparsegrad_engine::models::Task;
use sparsegrad_engine::nn::Ctx;
use sparsegrad_engine::optim::AdamConfig;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(Subcommand, Debug)]
pub enum BenchWhat {
    /// Training step time for a model folder at a fixed batch shape.
    Train(BenchTrainArgs),
}

#[derive(Args, Debug)]
pub struct BenchTrainArgs {
    /// Model folder (default: the MiniLM-L6 fixture).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// full | lora | all (all runs each method in its own process so peak RSS is per method).
    #[arg(long, default_value = "all")]
    pub method: String,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 64)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    #[command(flatten)]
    pub fixtures: crate::cli::FixturesArgs,
}

pub fn run(a: BenchArgs) -> Result<()> {
    match a.what {
        BenchWhat::Train(t) => bench_train(t),
    }
}

fn bench_train(a: BenchTrainArgs) -> Result<()> {
    let model_dir = match &a.model {
        Some(m) => m.clone(),
        None => crate::fixtures::ensure(&a.fixtures.root())?.minilm,
    };
    if a.method == "all" {
        let exe = std::env::current_exe()?;
        for m in ["full", "lora"] {
            let status = std::process::Command::new(&exe)
                .args(["bench", "train", "--method", m, "--model"])
                .arg(&model_dir)
                .args([
                    "--batch-size",
                    &a.batch_size.to_string(),
                    "--seq-len",
                    &a.seq_len.to_string(),
                ])
                .args([
                    "--steps",
                    &a.steps.to_string(),
                    "--warmup",
                    &a.warmup.to_string(),
                ])
                .status()?;
            anyhow::ensure!(status.success(), "bench for {m} failed");
        }
        return Ok(());
    }
    let spec = match a.method.as_str() {
        "full" => MethodSpec::Full,
        "lora" => MethodSpec::Lora(LoraConfig::default()),
        o => anyhow::bail!("unknown method {o}"),
    };
    let opts = sparsegrad_engine::checkpoint::LoadOptions {
        task: Task::Classification { num_labels: 2 },
        dtype: candle_core::DType::F32,
        device: candle_core::Device::Cpu,
        seed: 0,
    };
    let (mut model, _) = sparsegrad_engine::checkpoint::load_model(&model_dir, &opts)?;
    let mut method = spec.build(AdamConfig::default())?;
    method.prepare(&mut model, 0)?;
    let mut rng = sparsegrad_engine::rng::stream(0, "bench", 0);
    let examples: Vec<Example> = (0..a.batch_size)
        .map(|i| Example {
            ids: (0..a.seq_len)
                .map(|_| rng.random_range(1000..30000))
                .collect(),
            type_ids: vec![0; a.seq_len],
            target: Target::Class((i % 2) as u32),
            line: i,
        })
        .collect();
    let refs: Vec<&Example> = examples.iter().collect();
    let batch = collate(&refs, 0, candle_core::DType::F32, &candle_core::Device::Cpu)?;
    let mut times = Vec::new();
    let mut phases = [0f64; 3];
    for step in 0..a.warmup + a.steps {
        let t0 = Instant::now();
        let logits = model.forward(&batch, &mut Ctx::eval())?;
        let loss = model.loss(&logits, &batch)?;
        loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        method.accumulate(&model, grads)?;
        let t2 = Instant::now();
        method.step(&mut model, 1e-5, Some(1.0))?;
        if step >= a.warmup {
            times.push(t0.elapsed().as_secs_f64());
            phases[0] += (t1 - t0).as_secs_f64();
            phases[1] += (t2 - t1).as_secs_f64();
            phases[2] += t2.elapsed().as_secs_f64();
        }
    }
    times.sort_by(f64::total_cmp);
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let median = times[times.len() / 2];
    let out = serde_json::json!({
        "impl": "sparsegrad (candle, CPU)",
        "model": model_dir.file_name().map(|s| s.to_string_lossy().to_string()),
        "method": a.method,
        "batch_size": a.batch_size,
        "seq_len": a.seq_len,
        "steps": a.steps,
        "step_ms_mean": mean * 1e3,
        "step_ms_median": median * 1e3,
        "tokens_per_sec": (a.batch_size * a.seq_len) as f64 / median,
        "peak_rss_mb": sparsegrad_engine::train::peak_rss_bytes().map(|b| b as f64 / 1048576.0),
        "forward_ms": phases[0] * 1e3 / a.steps as f64,
        "backward_ms": phases[1] * 1e3 / a.steps as f64,
        "optimizer_ms": phases[2] * 1e3 / a.steps as f64,
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    });
    println!("{out}");
    Ok(())
}
