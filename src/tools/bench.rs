//! `sparsegrad bench train`: step time, tokens/s and peak RSS for fixed shapes on real weights,
//! printed as JSON lines (compare with `scripts/bench_torch.py` on the same machine).
//! `sparsegrad bench compare`: the method comparison on real data (each run its own process,
//! so peak RSS is per run).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::{Args, Subcommand};
use rand::Rng;
use sparsegrad_engine::data::{collate, Example, Target};
use sparsegrad_engine::methods::registry::resolve_method;
use sparsegrad_engine::methods::{Calibration, MethodSpec, DEFAULT_METHOD};
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
    /// Fine-tune with each method on the same model, data, steps and seeds; print dev metric
    /// (mean ± sd), step time, peak RSS, trainable parameters, optimizer state and artifact
    /// size as a Markdown table and draw the loss curves (SVG).
    Compare(Box<BenchCompareArgs>),
    /// Queue throughput: N jobs claimed and completed by C concurrent claimers against the
    /// Postgres at DATABASE_URL (in a scratch database that is dropped afterwards).
    Queue(BenchQueueArgs),
    /// Dataset validation throughput and memory: generated JSONL and CSV files of each size
    /// fed through the row validator in 64 KiB chunks, as an upload arrives.
    Validate(BenchValidateArgs),
    /// Uploads end to end: generated JSONL and CSV bodies of each size streamed through
    /// `POST /v1/files` (validation + the file store + the row) in a scratch database; time,
    /// MB/s and peak RSS growth per upload.
    Upload(super::bench_service::BenchUploadArgs),
    /// Event streams: N idle SSE streams held open on a real listener; Postgres transactions
    /// per second while they wait.
    Streams(super::bench_service::BenchStreamsArgs),
    /// Worker processes: jobs per minute with 1, 2 and 4 `sparsegrad worker` processes on
    /// small jobs (a scratch database, a local file store), claim latency into idle workers
    /// and cancel latency of a running job.
    Workers(super::bench_service::BenchWorkersArgs),
    /// Greedy decoding of a causal LM: the time per generated token with the key/value cache
    /// and recomputing the whole sequence, at several context lengths, and the cache's size.
    Decode(BenchDecodeArgs),
    /// The inference engine serving fine-tunes of one base: tokens/s and latency percentiles
    /// for 1, 8 and 32 concurrent streams with 1 and 8 resident fine-tunes, and the memory
    /// each extra fine-tune costs.
    Serve(super::bench_serve::BenchServeArgs),
}

#[derive(Args, Debug)]
pub struct BenchDecodeArgs {
    /// Model folder (default: the SmolLM2-135M-Instruct fixture).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Context lengths (prompt tokens) to decode after.
    #[arg(long, value_delimiter = ',', default_value = "32,128,512")]
    pub context: Vec<usize>,
    /// Tokens generated per measurement.
    #[arg(long, default_value_t = 16)]
    pub tokens: usize,
    #[command(flatten)]
    pub fixtures: super::cli::FixturesArgs,
}

#[derive(Args, Debug)]
pub struct BenchValidateArgs {
    /// File sizes, MiB.
    #[arg(long, value_delimiter = ',', default_value = "16,64,256")]
    pub mib: Vec<usize>,
}

#[derive(Args, Debug)]
pub struct BenchQueueArgs {
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    #[arg(long, default_value_t = 5000)]
    pub jobs: usize,
    #[arg(long, default_value_t = 16)]
    pub claimers: usize,
}

#[derive(Args, Debug)]
pub struct BenchTrainArgs {
    /// Model folder (default: the MiniLM-L6 fixture).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// full | lora | sparsegrad | sparsegrad-dynamic | meprop | all (all runs each method in
    /// its own process so peak RSS is per method).
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
    /// Print the memory model's estimate for this run and stop (no training).
    #[arg(long)]
    pub estimate_only: bool,
    #[command(flatten)]
    pub fixtures: super::cli::FixturesArgs,
}

pub fn run(a: BenchArgs) -> Result<()> {
    match a.what {
        BenchWhat::Train(t) => bench_train(t),
        BenchWhat::Compare(c) => bench_compare(*c),
        BenchWhat::Queue(q) => tokio::runtime::Runtime::new()?.block_on(bench_queue(q)),
        BenchWhat::Validate(v) => bench_validate(v),
        BenchWhat::Upload(u) => super::bench_service::upload(u),
        BenchWhat::Streams(a) => super::bench_service::streams(a),
        BenchWhat::Workers(a) => super::bench_service::workers(a),
        BenchWhat::Decode(a) => bench_decode(a),
        BenchWhat::Serve(a) => super::bench_serve::serve(a),
    }
}

fn bench_decode(a: BenchDecodeArgs) -> Result<()> {
    use candle_core::{DType, Device, Tensor};
    use sparsegrad_engine::models::{Batch, KvCache, Labels, Task};
    use sparsegrad_engine::nn::Ctx;
    let dir = match &a.model {
        Some(m) => m.clone(),
        None => super::fixtures::ensure(&a.fixtures.root())?.smollm2,
    };
    let opts = sparsegrad_engine::pretrained::LoadOptions {
        task: Task::CausalLm,
        dtype: DType::F32,
        device: Device::Cpu,
        seed: 0,
    };
    let (model, _) = sparsegrad_engine::pretrained::load_model(&dir, &opts)?;
    let dev = Device::Cpu;
    let argmax = |l: &Tensor| -> Result<u32> {
        let last = l.dim(1)? - 1;
        Ok(l.narrow(1, last, 1)?
            .flatten_all()?
            .argmax(0)?
            .to_scalar::<u32>()?)
    };
    println!("model: {} · {} threads", dir.display(), rayon_threads());
    println!("| context | with cache ms/token | recompute ms/token | speed-up | cache MiB |");
    println!("|---|---|---|---|---|");
    for &ctx_len in &a.context {
        let prompt: Vec<u32> = (0..ctx_len as u32)
            .map(|i| 100 + (i * 37) % 20_000)
            .collect();
        // With the cache: the prompt once, then one token per step.
        let mut cache = KvCache::default();
        let first = model
            .decode(
                &Tensor::from_vec(prompt.clone(), (1, ctx_len), &dev)?,
                &mut cache,
            )?
            .ok_or_else(|| anyhow::anyhow!("this architecture has no key/value cache"))?;
        let mut next = argmax(&first)?;
        let t0 = std::time::Instant::now();
        for _ in 0..a.tokens {
            let l = model
                .decode(&Tensor::from_vec(vec![next], (1, 1), &dev)?, &mut cache)?
                .expect("decoded above");
            next = argmax(&l)?;
        }
        let cached = t0.elapsed().as_secs_f64() * 1e3 / a.tokens as f64;
        // Recomputing: the whole sequence per token.
        let mut ids = prompt.clone();
        let t0 = std::time::Instant::now();
        for _ in 0..a.tokens {
            let t = ids.len();
            let batch = Batch {
                input_ids: Tensor::from_vec(ids.clone(), (1, t), &dev)?,
                token_type_ids: Tensor::zeros((1, t), DType::U32, &dev)?,
                attention_mask: Tensor::ones((1, t), DType::F32, &dev)?,
                labels: Labels::None,
                num_tokens: t,
                batch_size: 1,
            };
            ids.push(argmax(&model.forward(&batch, &mut Ctx::inference())?)?);
        }
        let full = t0.elapsed().as_secs_f64() * 1e3 / a.tokens as f64;
        println!(
            "| {ctx_len} | {cached:.1} | {full:.1} | {:.1}× | {:.1} |",
            full / cached,
            cache.bytes() as f64 / 1048576.0
        );
    }
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn bench_train(a: BenchTrainArgs) -> Result<()> {
    let model_dir = match &a.model {
        Some(m) => m.clone(),
        None => super::fixtures::ensure(&a.fixtures.root())?.minilm,
    };
    if a.method == "all" {
        let exe = std::env::current_exe()?;
        for m in ["full", "lora", "sparsegrad", "sparsegrad-dynamic", "meprop"] {
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
                .args(a.estimate_only.then_some("--estimate-only"))
                .status()?;
            anyhow::ensure!(status.success(), "bench for {m} failed");
        }
        return Ok(());
    }
    // `sparsegrad-dynamic` is SparseGrad with the paper's dynamic support.
    let spec = match a.method.as_str() {
        "sparsegrad-dynamic" => {
            let mut hp = serde_json::Map::new();
            hp.insert("support".into(), "dynamic".into());
            resolve_method("sparsegrad", &hp)?
        }
        name => MethodSpec::default_for(name)?,
    };
    // Causal-LM checkpoints (LLaMA) train next-token prediction, encoders a 2-label head.
    let (_, cfg) = sparsegrad_engine::pretrained::read_config(&model_dir)?;
    let causal = cfg["architectures"].as_array().is_some_and(|a| {
        a.iter()
            .any(|s| s.as_str().is_some_and(|s| s.ends_with("ForCausalLM")))
    });
    let vocab = cfg["vocab_size"].as_u64().unwrap_or(30522) as u32;
    let opts = sparsegrad_engine::pretrained::LoadOptions {
        task: if causal {
            Task::CausalLm
        } else {
            Task::Classification { num_labels: 2 }
        },
        dtype: candle_core::DType::F32,
        device: candle_core::Device::Cpu,
        seed: 0,
    };
    // Per-phase memory: each phase's own peak (the kernel's high-water mark reset at its
    // start), and what stays resident after it.
    let mut memory: Vec<(&str, f64, f64)> = Vec::new();
    let mib = |b: Option<u64>| b.map_or(f64::NAN, |b| b as f64 / 1048576.0);
    let phase_end = |name: &'static str, memory: &mut Vec<(&str, f64, f64)>| {
        let (peak, now) = (
            mib(sparsegrad_engine::train::peak_rss_bytes()),
            mib(sparsegrad_engine::train::rss_bytes()),
        );
        match memory.iter_mut().find(|(n, _, _)| *n == name) {
            Some(m) => {
                m.1 = m.1.max(peak);
                m.2 = now;
            }
            None => memory.push((name, peak, now)),
        }
        sparsegrad_engine::train::reset_peak_rss();
    };
    let (mut model, _) = sparsegrad_engine::pretrained::load_model(&model_dir, &opts)?;
    let mut method = spec.build(AdamConfig::default())?;
    method.prepare(&mut model, 0)?;
    phase_end("load", &mut memory);
    // The dry run's memory model for this very run, printed beside what was measured.
    let shape = model.architecture.shape();
    let estimate = sparsegrad_engine::memory::estimate(
        &shape,
        &spec.footprint(&shape),
        method.trainable_count(&model) as u64,
        &sparsegrad_engine::memory::Workload {
            batch_size: a.batch_size as u64,
            seq_len: a.seq_len as u64,
            model_dropout: false,
            causal_lm: causal,
            placement: sparsegrad_engine::memory::Placement::Cpu,
        },
    );
    let mib_of = |b: u64| b as f64 / 1048576.0;
    if a.estimate_only {
        let out = serde_json::json!({
            "model": model_dir.file_name().map(|s| s.to_string_lossy().to_string()),
            "method": a.method,
            "batch_size": a.batch_size,
            "seq_len": a.seq_len,
            "estimate_mb": estimate.phases.named().iter()
                .map(|(n, b)| (n.to_string(), serde_json::json!(mib_of(*b))))
                .collect::<serde_json::Map<_, _>>(),
            "estimate_peak_mb": mib_of(estimate.total),
        });
        println!("{out}");
        return Ok(());
    }
    let mut rng = sparsegrad_engine::rng::stream(0, "bench", 0);
    let (lo, hi) = (vocab.min(1000) / 2, vocab.min(30000));
    let examples: Vec<Example> = (0..a.batch_size)
        .map(|i| Example {
            ids: (0..a.seq_len).map(|_| rng.random_range(lo..hi)).collect(),
            type_ids: vec![0; a.seq_len],
            target: if causal {
                Target::Tokens((0..a.seq_len).map(|j| u8::from(j > 0)).collect())
            } else {
                Target::Class((i % 2) as u32)
            },
            line: i,
        })
        .collect();
    let refs: Vec<&Example> = examples.iter().collect();
    let batch = collate(&refs, 0, candle_core::DType::F32, &candle_core::Device::Cpu)?;
    let train_ctx = || Ctx::train(sparsegrad_engine::rng::stream(0, "bench", 1), false);
    let mut backward = |m: &sparsegrad_engine::models::Model, _i: usize| {
        Ok(m.forward_loss(&batch, &mut train_ctx())?.backward()?)
    };
    let t_cal = Instant::now();
    method.calibrate(
        &mut model,
        Calibration {
            lr: 1e-5,
            max_grad_norm: Some(1.0),
            cache: None,
            backward: &mut backward,
        },
    )?;
    let calibration_ms = t_cal.elapsed().as_secs_f64() * 1e3;
    phase_end("calibration", &mut memory);
    let mut times = Vec::new();
    let mut phases = [0f64; 3];
    for step in 0..a.warmup + a.steps {
        method.begin_step(step, 1)?;
        let t0 = Instant::now();
        let loss = model.forward_loss(&batch, &mut train_ctx())?;
        loss.to_scalar::<f32>()?;
        phase_end("forward", &mut memory);
        let t1 = Instant::now();
        let grads = loss.backward()?;
        drop(loss);
        method.accumulate(&model, grads)?;
        phase_end("backward", &mut memory);
        let t2 = Instant::now();
        method.step(&mut model, 1e-5, Some(1.0))?;
        phase_end("optimizer", &mut memory);
        if step >= a.warmup {
            times.push(t0.elapsed().as_secs_f64());
            phases[0] += (t1 - t0).as_secs_f64();
            phases[1] += (t2 - t1).as_secs_f64();
            phases[2] += t2.elapsed().as_secs_f64();
        }
    }
    let eval_rows = sparsegrad_engine::data::Dataset {
        examples: examples.clone(),
        task: model.task.clone(),
        labels: None,
        stats: Default::default(),
    };
    sparsegrad_engine::train::evaluate(&model, &eval_rows, a.batch_size)?;
    phase_end("eval", &mut memory);
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
        "peak_rss_mb": memory.iter().map(|m| m.1).fold(f64::NAN, f64::max),
        // Each phase's own peak and the resident size after it (MiB); steps: the worst step.
        "memory_mb": memory
            .iter()
            .map(|(n, peak, after)| (n.to_string(), serde_json::json!({"peak": peak, "after": after})))
            .collect::<serde_json::Map<_, _>>(),
        "estimate_mb": estimate
            .phases
            .named()
            .iter()
            .map(|(n, b)| (n.to_string(), serde_json::json!(*b as f64 / 1048576.0)))
            .collect::<serde_json::Map<_, _>>(),
        "estimate_peak_mb": estimate.total as f64 / 1048576.0,
        "estimate_terms_mb": estimate
            .backward_terms()
            .iter()
            .map(|(n, b)| (n.to_string(), serde_json::json!(*b as f64 / 1048576.0)))
            .collect::<serde_json::Map<_, _>>(),
        "task": if causal { "causal-lm" } else { "classification" },
        "forward_ms": phases[0] * 1e3 / a.steps as f64,
        "backward_ms": phases[1] * 1e3 / a.steps as f64,
        "optimizer_ms": phases[2] * 1e3 / a.steps as f64,
        "calibration_ms": calibration_ms,
        "optimizer_state": method.optimizer_state_len(),
        "trainable_params": method.trainable_count(&model),
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    });
    println!("{out}");
    Ok(())
}

#[derive(Args, Debug)]
pub struct BenchCompareArgs {
    /// Model folder (default: the MiniLM-L6 fixture).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training file (default: the rt_polarity fixture's train split).
    #[arg(long)]
    pub train: Option<PathBuf>,
    /// Validation file (default: the rt_polarity fixture's dev split).
    #[arg(long)]
    pub valid: Option<PathBuf>,
    /// Comma-separated: head (the head alone, or the paper scope without the MLP), full,
    /// lora (at SparseGrad's trainable count), lora-rN (rank N), meprop, sparsegrad-fixed,
    /// sparsegrad-dynamic, sparsegrad-refreshed.
    #[arg(
        long,
        default_value = "head,full,lora-r8,lora,meprop,sparsegrad-fixed,sparsegrad-dynamic,sparsegrad-refreshed"
    )]
    pub methods: String,
    /// Extra runs beside `--methods`, repeatable: `LABEL=FLAGS`, FLAGS being `sparsegrad train`
    /// method flags (e.g. `warm20=--method sparsegrad --head-warmup-steps 20`); the data,
    /// shape and seeds are shared, `--lr` defaults to the method's.
    #[arg(long = "variant")]
    pub variants: Vec<String>,
    #[arg(long, default_value_t = 5)]
    pub seeds: u64,
    /// Passes over the training rows (default: the service's `auto`).
    #[arg(long)]
    pub epochs: Option<String>,
    #[arg(long)]
    pub max_steps: Option<usize>,
    #[arg(long)]
    pub limit_train: Option<usize>,
    #[arg(long)]
    pub limit_valid: Option<usize>,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 64)]
    pub max_seq_len: usize,
    /// mlp | paper: what the sparse methods (and LoRA's head) train besides the MLP.
    #[arg(long, default_value = "mlp")]
    pub scope: String,
    #[arg(long, default_value_t = 0.01)]
    pub density: f64,
    /// Learning rates (default: each method's, from the registry).
    #[arg(long)]
    pub lr_full: Option<f64>,
    #[arg(long)]
    pub lr_lora: Option<f64>,
    #[arg(long)]
    pub lr_sparse: Option<f64>,
    /// A Python with torch, transformers and peft: also runs PyTorch's full fine-tuning and
    /// LoRA (scripts/compare_torch.py) on the same rows and seeds, beside ours.
    #[arg(long)]
    pub torch: Option<PathBuf>,
    /// Which PyTorch runs `--torch` adds: full, lora (rank 8), or both.
    #[arg(long, default_value = "full,lora")]
    pub torch_methods: String,
    /// Keep runs already finished in `--out` (a long comparison resumes where it stopped).
    #[arg(long)]
    pub reuse: bool,
    /// Where runs, the Markdown table and the loss-curve SVG go.
    #[arg(long, default_value = "bench-compare")]
    pub out: PathBuf,
    #[command(flatten)]
    pub fixtures: super::cli::FixturesArgs,
}

struct RunResult {
    metric: f64,
    step_secs: f64,
    peak_rss: f64,
    trainable: f64,
    opt_state: f64,
    artifact_bytes: f64,
    touched: Option<f64>,
    losses: Vec<(usize, f64)>,
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let sd = if v.len() > 1 {
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (m, sd)
}

fn bench_compare(a: BenchCompareArgs) -> Result<()> {
    let lr = |given: Option<f64>, method: &str| -> Result<f64> {
        Ok(match given {
            Some(l) => l,
            None => MethodSpec::default_for(method)?.default_lr(),
        })
    };
    let lr_full = lr(a.lr_full, "full")?;
    let lr_lora = lr(a.lr_lora, "lora")?;
    let lr_sparse = lr(a.lr_sparse, "sparsegrad")?;
    let fx = super::fixtures::ensure(&a.fixtures.root())?;
    let model = a.model.clone().unwrap_or(fx.minilm.clone());
    let train = a.train.clone().unwrap_or(fx.rt_polarity_train.clone());
    let valid = a.valid.clone().unwrap_or(fx.rt_polarity_dev.clone());
    let (_, cfg) = sparsegrad_engine::pretrained::read_config(&model)?;
    let h = cfg["hidden_size"].as_u64().unwrap_or(768) as f64;
    let i = cfg["intermediate_size"].as_u64().unwrap_or(3072) as f64;
    // LoRA rank with SparseGrad's trainable count per matrix: r (in + out) ≈ k.
    let lora_r = ((a.density * h * i / (h + i)).round() as usize).max(1);
    std::fs::create_dir_all(&a.out)?;
    let exe = std::env::current_exe()?;
    // What our runs and PyTorch's (scripts/compare_torch.py takes the same flags) share.
    let shared_args = |cmd: &mut std::process::Command, seed: u64| {
        cmd.arg("--model")
            .arg(&model)
            .arg("--train")
            .arg(&train)
            .arg("--valid")
            .arg(&valid)
            .args(["--batch-size", &a.batch_size.to_string()])
            .args(["--max-seq-len", &a.max_seq_len.to_string()])
            .args(["--seed", &seed.to_string()]);
        if let Some(e) = &a.epochs {
            cmd.args(["--epochs", e]);
        }
        for (flag, v) in [
            ("--max-steps", a.max_steps),
            ("--limit-train", a.limit_train),
            ("--limit-valid", a.limit_valid),
        ] {
            if let Some(v) = v {
                cmd.args([flag, &v.to_string()]);
            }
        }
    };
    let mut methods: Vec<String> = a
        .methods
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let mut variants = std::collections::BTreeMap::new();
    for v in &a.variants {
        let (label, flags) = v
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--variant `{v}`: expected LABEL=FLAGS"))?;
        let flags: Vec<String> = flags.split_whitespace().map(String::from).collect();
        methods.push(label.to_string());
        variants.insert(label.to_string(), flags);
    }
    let mut results: Vec<(String, Vec<RunResult>)> = Vec::new();
    let mut metric_name = "";
    for m in &methods {
        let mut runs = Vec::new();
        for seed in 0..a.seeds {
            let dir = a.out.join(format!("{m}-seed{seed}"));
            let mut cmd = std::process::Command::new(&exe);
            cmd.arg("train");
            shared_args(&mut cmd, seed);
            cmd.arg("--out").arg(&dir);
            let dens = a.density.to_string();
            match m.as_str() {
                v if variants.contains_key(v) => {
                    let flags = &variants[v];
                    if !flags.iter().any(|f| f == "--lr") {
                        let method = flags
                            .iter()
                            .position(|f| f == "--method")
                            .and_then(|i| flags.get(i + 1))
                            .map_or(DEFAULT_METHOD, String::as_str);
                        cmd.args(["--lr", &lr(None, method)?.to_string()]);
                    }
                    cmd.args(flags);
                }
                "full" => {
                    cmd.args(["--method", "full", "--lr", &lr_full.to_string()]);
                }
                "head" => {
                    // What the MLP updates add: the head (or the paper scope) alone.
                    cmd.args([
                        "--method",
                        "lora",
                        "--lr",
                        &lr_full.max(lr_lora).to_string(),
                    ])
                    .args(["--scope", &a.scope, "--lora-targets", "none"]);
                }
                l if l == "lora" || l.starts_with("lora-r") => {
                    // `lora`: SparseGrad's trainable count; `lora-rN`: rank N.
                    let r = match l.strip_prefix("lora-r") {
                        Some(n) => n
                            .parse()
                            .map_err(|_| anyhow::anyhow!("bad rank in `{l}`"))?,
                        None => lora_r,
                    };
                    cmd.args(["--method", "lora", "--lr", &lr_lora.to_string()])
                        .args(["--scope", &a.scope])
                        .args(["--lora-r", &r.to_string()])
                        .args(["--lora-alpha", &(2 * r).to_string()]);
                }
                "meprop" => {
                    cmd.args(["--method", "meprop", "--lr", &lr_sparse.to_string()])
                        .args(["--density", &dens, "--scope", &a.scope]);
                }
                s if s.starts_with("sparsegrad-") => {
                    let support = &s["sparsegrad-".len()..];
                    cmd.args(["--method", "sparsegrad", "--lr", &lr_sparse.to_string()])
                        .args(["--density", &dens, "--scope", &a.scope])
                        .args(["--support", support]);
                }
                o => anyhow::bail!("unknown method `{o}`"),
            }
            // A run is finished once its metrics are written (they are written last).
            if a.reuse && dir.join("metrics.json").exists() {
                eprintln!("bench compare: {m} seed {seed} (kept from an earlier run)");
            } else {
                eprintln!("bench compare: {m} seed {seed}");
                let status = cmd.stdout(std::process::Stdio::null()).status()?;
                anyhow::ensure!(status.success(), "{m} seed {seed} failed");
            }
            let j: serde_json::Value =
                serde_json::from_slice(&std::fs::read(dir.join("metrics.json"))?)?;
            let eval = &j["eval"];
            metric_name = if eval["accuracy"].is_number() {
                "dev accuracy"
            } else if eval["pearson"].is_number() {
                "dev Pearson"
            } else {
                "dev loss per target token, lower is better"
            };
            let metric = eval["accuracy"]
                .as_f64()
                .or(eval["pearson"].as_f64())
                .unwrap_or(eval["loss"].as_f64().unwrap_or(f64::NAN));
            let losses: Vec<(usize, f64)> = serde_json::from_value(j["losses"].clone())?;
            runs.push(RunResult {
                metric,
                step_secs: j["step_secs"].as_f64().unwrap_or(f64::NAN),
                peak_rss: j["peak_rss_bytes"].as_f64().unwrap_or(f64::NAN),
                trainable: j["trainable_params"].as_f64().unwrap_or(f64::NAN),
                opt_state: j["optimizer_state"].as_f64().unwrap_or(f64::NAN),
                artifact_bytes: std::fs::metadata(dir.join("delta.safetensors"))?.len() as f64,
                touched: j["method_stats"]["touched_fraction"].as_f64(),
                losses,
            });
        }
        results.push((m.clone(), runs));
    }
    if let Some(py) = &a.torch {
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/compare_torch.py");
        // LoRA at rank 8, PEFT's usual setting, beside our `lora-r8`, training what ours does
        // besides the adapters (the script has no `paper` scope: the head alone there).
        let torch_scope = if a.scope == "paper" { "head" } else { &a.scope };
        for (m, lr) in [("full", lr_full), ("lora", lr_lora)] {
            if !a.torch_methods.split(',').any(|t| t.trim() == m) {
                continue;
            }
            let mut runs = Vec::new();
            for seed in 0..a.seeds {
                let mut cmd = std::process::Command::new(py);
                cmd.arg(&script);
                shared_args(&mut cmd, seed);
                cmd.args(["--method", m, "--lr", &lr.to_string()]).args([
                    "--lora-r",
                    "8",
                    "--lora-alpha",
                    "16",
                ]);
                if m == "lora" {
                    cmd.args(["--scope", torch_scope]);
                }
                let kept = a.out.join(format!("pytorch-{m}-seed{seed}.json"));
                let j: serde_json::Value = if a.reuse && kept.exists() {
                    eprintln!("bench compare: pytorch {m} seed {seed} (kept from an earlier run)");
                    serde_json::from_slice(&std::fs::read(&kept)?)?
                } else {
                    eprintln!("bench compare: pytorch {m} seed {seed}");
                    let out = cmd.stderr(std::process::Stdio::inherit()).output()?;
                    anyhow::ensure!(out.status.success(), "pytorch {m} seed {seed} failed");
                    let j: serde_json::Value = serde_json::from_slice(
                        out.stdout
                            .split(|&b| b == b'\n')
                            .rfind(|l| l.starts_with(b"{"))
                            .unwrap_or_default(),
                    )?;
                    std::fs::write(&kept, serde_json::to_vec(&j)?)?;
                    j
                };
                runs.push(RunResult {
                    // Accuracy for classification, the dev loss per target token for causal LM.
                    metric: j["accuracy"]
                        .as_f64()
                        .or(j["loss"].as_f64())
                        .unwrap_or(f64::NAN),
                    step_secs: j["step_secs"].as_f64().unwrap_or(f64::NAN),
                    peak_rss: j["peak_rss_bytes"].as_f64().unwrap_or(f64::NAN),
                    trainable: j["trainable_params"].as_f64().unwrap_or(f64::NAN),
                    opt_state: j["trainable_params"].as_f64().unwrap_or(f64::NAN) * 2.0,
                    artifact_bytes: f64::NAN,
                    touched: None,
                    losses: serde_json::from_value(j["losses"].clone())?,
                });
            }
            let label = match m {
                "lora" => format!("pytorch lora-r8 ({torch_scope} scope)"),
                _ => format!("pytorch {m}"),
            };
            results.push((label, runs));
        }
    }
    let mut md = String::new();
    md.push_str(&format!(
        "model `{}`, train `{}`{}, dev `{}`, epochs {}, batch {}, seq ≤ {}, seeds 0..{}, scope {}, density {}, LoRA r {lora_r}, lr full {} / lora {} / sparse {}, {} threads\n\n",
        model.display(),
        train.display(),
        a.limit_train.map(|l| format!(" (first {l} rows)")).unwrap_or_default(),
        valid.display(),
        a.epochs.as_deref().unwrap_or("auto"),
        a.batch_size,
        a.max_seq_len,
        a.seeds,
        a.scope,
        a.density,
        lr_full,
        lr_lora,
        lr_sparse,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    ));
    md.push_str(&format!("| method | {metric_name} (mean ± sd) | per seed | step ms | peak RSS MiB | trainable params | optimizer state | artifact | touched |\n|---|---|---|---|---|---|---|---|---|\n"));
    for (m, runs) in &results {
        let f = |g: &dyn Fn(&RunResult) -> f64| mean_sd(&runs.iter().map(g).collect::<Vec<_>>());
        let (acc, sd) = f(&|r| r.metric);
        let (step, _) = f(&|r| r.step_secs * 1e3);
        let (rss, _) = f(&|r| r.peak_rss / 1048576.0);
        let (tr, _) = f(&|r| r.trainable);
        let (os, _) = f(&|r| r.opt_state);
        let (ab, _) = f(&|r| r.artifact_bytes / 1048576.0);
        let touched = runs
            .iter()
            .filter_map(|r| r.touched)
            .map(|t| format!("{:.1}%", 100.0 * t))
            .collect::<Vec<_>>()
            .join(" / ");
        let per_seed = runs
            .iter()
            .map(|r| format!("{:.4}", r.metric))
            .collect::<Vec<_>>()
            .join(" / ");
        let artifact = if ab.is_finite() {
            format!("{ab:.2} MiB")
        } else {
            "—".into()
        };
        md.push_str(&format!(
            "| {m} | {acc:.4} ± {sd:.4} | {per_seed} | {step:.0} | {rss:.0} | {tr:.0} | {os:.0} | {artifact} | {touched} |\n"
        ));
    }
    println!("{md}");
    std::fs::write(a.out.join("compare.md"), &md)?;
    std::fs::write(a.out.join("loss_curves.svg"), loss_svg(&results))?;
    eprintln!(
        "wrote {} and {}",
        a.out.join("compare.md").display(),
        a.out.join("loss_curves.svg").display()
    );
    Ok(())
}

/// Training loss per method (mean over seeds, moving average over 20 steps) as an SVG.
fn loss_svg(results: &[(String, Vec<RunResult>)]) -> String {
    const W: f64 = 800.0;
    const H: f64 = 450.0;
    const PAD: f64 = 50.0;
    let colors = [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    ];
    let curves: Vec<(String, Vec<(f64, f64)>)> = results
        .iter()
        .map(|(m, runs)| {
            let n = runs.iter().map(|r| r.losses.len()).min().unwrap_or(0);
            let mean: Vec<f64> = (0..n)
                .map(|i| runs.iter().map(|r| r.losses[i].1).sum::<f64>() / runs.len() as f64)
                .collect();
            let pts = (0..n)
                .map(|i| {
                    let lo = i.saturating_sub(19);
                    let w = &mean[lo..=i];
                    (
                        runs[0].losses[i].0 as f64,
                        w.iter().sum::<f64>() / w.len() as f64,
                    )
                })
                .collect();
            (m.clone(), pts)
        })
        .collect();
    let all = curves.iter().flat_map(|(_, p)| p.iter());
    let (mut x1, mut y0, mut y1) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in all {
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !y0.is_finite() {
        (y0, y1) = (0.0, 1.0);
    }
    let sx = |x: f64| PAD + (x / x1) * (W - 2.0 * PAD);
    let sy = |y: f64| H - PAD - (y - y0) / (y1 - y0).max(1e-9) * (H - 2.0 * PAD);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    s.push_str(&format!(
        "<line x1=\"{PAD}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/><line x1=\"{PAD}\" y1=\"{PAD}\" x2=\"{PAD}\" y2=\"{}\" stroke=\"black\"/>\n",
        H - PAD, W - PAD, H - PAD, H - PAD
    ));
    s.push_str(&format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">step</text><text x=\"12\" y=\"{}\" transform=\"rotate(-90 12 {})\" text-anchor=\"middle\">training loss (20-step mean)</text>\n",
        W / 2.0, H - 12.0, H / 2.0, H / 2.0
    ));
    for k in 0..=4 {
        let y = y0 + (y1 - y0) * k as f64 / 4.0;
        s.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{y:.3}</text>\n",
            PAD - 4.0,
            sy(y) + 4.0
        ));
    }
    s.push_str(&format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{x1:.0}</text>\n",
        W - PAD,
        H - PAD + 16.0
    ));
    for (i, (m, pts)) in curves.iter().enumerate() {
        let c = colors[i % colors.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        s.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"1.5\" points=\"{}\"/>\n",
            path.join(" ")
        ));
        s.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" fill=\"{c}\">{m}</text>\n",
            W - PAD - 150.0,
            PAD + 16.0 * i as f64
        ));
    }
    s.push_str("</svg>\n");
    s
}

/// Runs `f` against a scratch database (migrated, dropped afterwards) on the Postgres at
/// `url`.
pub(crate) async fn with_scratch_db<T, F, Fut>(url: &str, f: F) -> Result<T>
where
    F: FnOnce(sqlx::PgPool) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
    use sqlx::ConnectOptions;
    let admin: PgConnectOptions = url.parse()?;
    let name = format!("sparsegrad_bench_{}", std::process::id());
    let mut conn = admin.connect().await?;
    sqlx::query(&format!("create database {name}"))
        .execute(&mut conn)
        .await?;
    let result = async {
        let pool = PgPoolOptions::new()
            .max_connections(32)
            .connect_with(admin.clone().database(&name))
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        let out = f(pool.clone()).await;
        pool.close().await;
        out
    }
    .await;
    sqlx::query(&format!("drop database if exists {name} with (force)"))
        .execute(&mut conn)
        .await?;
    result
}

async fn bench_queue(a: BenchQueueArgs) -> Result<()> {
    with_scratch_db(&a.database_url, |pool| async move {
        sqlx::query("insert into tenants (id, name) values ('bench', 'bench')")
            .execute(&pool)
            .await?;
        let ids: Vec<String> = (0..a.jobs).map(|i| format!("job_{i:08}")).collect();
        sqlx::query(
            "insert into jobs (id, tenant_id, status, spec)
             select x, 'bench', 'queued', '{}'::jsonb from unnest($1::text[]) as x",
        )
        .bind(&ids)
        .execute(&pool)
        .await?;
        let cfg = crate::queue::QueueConfig::default();
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..a.claimers {
            let (pool, cfg) = (pool.clone(), cfg.clone());
            tasks.push(tokio::spawn(async move {
                let worker = format!("w{w}");
                let mut n = 0usize;
                while let Some((_, lease)) = crate::queue::claim(&pool, &worker, &cfg).await? {
                    crate::queue::complete(&pool, &lease, &serde_json::json!({})).await?;
                    n += 1;
                }
                Ok::<_, crate::queue::QueueError>(n)
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await??;
        }
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "{}",
            serde_json::json!({
                "bench": "queue", "jobs": total, "claimers": a.claimers, "secs": secs,
                "claims_per_sec": total as f64 / secs,
                "note": "each claim is followed by a fenced completion (2 statements per job)",
            })
        );
        anyhow::Ok(())
    })
    .await
}

fn bench_validate(a: BenchValidateArgs) -> Result<()> {
    use sparsegrad_engine::data::{Record, RecordReader};
    const CHUNK: usize = 64 << 10;
    let rss = || sparsegrad_engine::train::peak_rss_bytes().unwrap_or(0) as f64 / 1048576.0;
    for format in ["jsonl", "csv"] {
        for &mib in &a.mib {
            let target = mib << 20;
            let rss0 = rss();
            let mut r = RecordReader::new();
            let mut rows = 0usize;
            let mut sink = |_: usize, _: Record| {
                rows += 1;
                Ok(())
            };
            let mut chunk = Vec::with_capacity(CHUNK + 256);
            if format == "csv" {
                chunk.extend_from_slice(b"text,label\n");
            }
            let (mut fed, mut i) = (0usize, 0usize);
            let t0 = Instant::now();
            while fed < target {
                while chunk.len() < CHUNK {
                    let line = if format == "csv" {
                        format!("\"a quoted, comma-holding review number {i}\",{}\n", i % 2)
                    } else {
                        format!(
                            "{{\"text\": \"a review number {i}\", \"label\": {}}}\n",
                            i % 2
                        )
                    };
                    chunk.extend_from_slice(line.as_bytes());
                    i += 1;
                }
                r.feed(&chunk, &mut sink)?;
                fed += chunk.len();
                chunk.clear();
            }
            r.finish(&mut sink)?;
            let secs = t0.elapsed().as_secs_f64();
            println!(
                "{}",
                serde_json::json!({
                    "format": format, "mib": mib, "rows": rows, "secs": secs,
                    "mib_per_sec": fed as f64 / 1048576.0 / secs,
                    "peak_rss_growth_mib": rss() - rss0,
                })
            );
        }
    }
    Ok(())
}
