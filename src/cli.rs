//! The `sparsegrad` command line. Engine commands run the training engine directly on local
//! files; the service commands arrive with the HTTP API.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use sparsegrad_engine::artifact::Artifact;
use sparsegrad_engine::device::parse_device;
use sparsegrad_engine::methods::{
    LoraConfig, LoraTargets, MePropConfig, MethodSpec, Scope, SparseGradConfig,
};
use sparsegrad_engine::models::Task;
use sparsegrad_engine::optim::Schedule;
use sparsegrad_engine::pipeline::{self, JobSpec};
use sparsegrad_engine::train::{Event, PredictInput, TrainConfig, TrainIo};

#[derive(Parser, Debug)]
#[command(
    name = "sparsegrad",
    version,
    about = "Fine-tune BERT, RoBERTa and LLaMA with SparseGrad, LoRA or full fine-tuning"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Fine-tune a model on a dataset and write the artifact and metrics.json.
    Train(Box<TrainArgs>),
    /// Evaluate a base model (optionally with an artifact applied) on a dataset.
    Eval(EvalArgs),
    /// Predict for a few inputs with a base model plus an artifact.
    Predict(PredictArgs),
    /// Write base + delta as a Hugging Face-layout folder.
    Merge(MergeArgs),
    /// Print what an artifact holds: descriptor, tensors by role, sizes.
    Inspect(InspectArgs),
    /// Convert a LLaMA-architecture GGUF file into a Hugging Face-layout folder.
    ImportGguf(ImportArgs),
    /// Fetch the pinned real models and data used by tests and benchmarks; print where they are.
    Fixtures(FixturesArgs),
    /// Benchmarks (printed, never asserted).
    Bench(crate::bench::BenchArgs),
    /// Device-vs-CPU correctness checks and GPU benchmarks (deploy/cuda/gpu-check.sh).
    GpuCheck(crate::gpu_check::GpuCheckArgs),
    /// Run the HTTP API with in-process workers (`--workers N`).
    Serve(ServiceArgs),
    /// Run workers only (claim jobs from the shared Postgres queue).
    Worker(ServiceArgs),
    /// Apply database migrations and exit.
    Migrate(ServiceArgs),
}

#[derive(Args, Debug)]
pub struct ServiceArgs {
    #[command(flatten)]
    pub config: crate::config::Config,
}

#[derive(Args, Debug)]
pub struct FixturesArgs {
    /// Cache folder (default: $XDG_CACHE_HOME/sparsegrad/fixtures or ~/.cache/sparsegrad/fixtures).
    #[arg(long, env = "SPARSEGRAD_FIXTURES")]
    pub dir: Option<PathBuf>,
    #[arg(long, env = "XDG_CACHE_HOME", hide = true)]
    pub xdg_cache_home: Option<PathBuf>,
    #[arg(long, env = "HOME", hide = true)]
    pub home: Option<PathBuf>,
}

impl FixturesArgs {
    pub fn root(&self) -> PathBuf {
        self.dir.clone().unwrap_or_else(|| {
            crate::fixtures::default_root(self.xdg_cache_home.clone(), self.home.clone())
        })
    }
}

#[derive(Args, Debug, Clone)]
pub struct MethodArgs {
    /// full | lora | sparsegrad | meprop
    #[arg(long, default_value = "lora")]
    pub method: String,
    /// sparsegrad / meprop: fraction of each MLP matrix updated.
    #[arg(long, default_value_t = 0.01)]
    pub density: f64,
    /// sparsegrad / meprop: entries updated per MLP matrix (overrides --density).
    #[arg(long)]
    pub k: Option<usize>,
    /// sparsegrad: fixed | dynamic | refreshed
    #[arg(long, default_value = "fixed")]
    pub support: String,
    /// sparsegrad: re-select a refreshed support every N steps.
    #[arg(long, default_value_t = 100)]
    pub refresh_every: usize,
    /// sparsegrad: micro-batches of gradients that define the bases.
    #[arg(long, default_value_t = 10)]
    pub basis_steps: usize,
    /// sparsegrad: update the weights during the basis phase (the paper's code does).
    #[arg(long)]
    pub basis_update: bool,
    /// sparsegrad: f32 | bf16 bases in the artifact.
    #[arg(long, default_value = "f32")]
    pub basis_dtype: String,
    /// sparsegrad / meprop: mlp (MLP sparse + head) | paper (all else dense)
    #[arg(long, default_value = "mlp")]
    pub scope: String,
    /// sparsegrad / meprop: train the MLP of every n-th block only.
    #[arg(long, default_value_t = 1)]
    pub block_stride: usize,
    /// sparsegrad / meprop: learning-rate multiplier for densely trained parameters.
    #[arg(long)]
    pub dense_lr_scale: Option<f64>,
    #[arg(long, default_value_t = 8)]
    pub lora_r: usize,
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f64,
    /// mlp | attention | all
    #[arg(long, default_value = "mlp")]
    pub lora_targets: String,
}

impl MethodArgs {
    pub fn spec(&self) -> Result<MethodSpec> {
        Ok(match self.method.as_str() {
            "full" => MethodSpec::Full,
            "lora" => MethodSpec::Lora(LoraConfig {
                r: self.lora_r,
                alpha: self.lora_alpha,
                dropout: self.lora_dropout,
                targets: self.lora_targets.parse::<LoraTargets>()?,
            }),
            "sparsegrad" => MethodSpec::Sparsegrad(SparseGradConfig {
                density: self.density,
                k: self.k,
                support: serde_json::from_value(self.support.clone().into())
                    .map_err(|_| anyhow::anyhow!("--support: fixed, dynamic or refreshed"))?,
                refresh_every: self.refresh_every,
                basis_steps: self.basis_steps,
                basis_update: self.basis_update,
                scope: self.scope()?,
                block_stride: self.block_stride,
                basis_dtype: serde_json::from_value(self.basis_dtype.clone().into())
                    .map_err(|_| anyhow::anyhow!("--basis-dtype: f32 or bf16"))?,
                dense_lr_scale: self.dense_lr_scale,
            }),
            "meprop" => MethodSpec::Meprop(MePropConfig {
                density: self.density,
                k: self.k,
                scope: self.scope()?,
                block_stride: self.block_stride,
                dense_lr_scale: self.dense_lr_scale,
            }),
            other => anyhow::bail!("unknown method `{other}` (full, lora, sparsegrad, meprop)"),
        })
    }

    fn scope(&self) -> Result<Scope> {
        serde_json::from_value(self.scope.clone().into())
            .map_err(|_| anyhow::anyhow!("--scope: mlp or paper"))
    }
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Base model folder (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub train: PathBuf,
    #[arg(long)]
    pub valid: Option<PathBuf>,
    /// classification | regression | causal-lm (inferred from the rows when absent)
    #[arg(long)]
    pub task: Option<String>,
    #[command(flatten)]
    pub method: MethodArgs,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    #[arg(long)]
    pub max_steps: Option<usize>,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Learning rate (default 5e-5 for full, 5e-4 for LoRA, 1e-3 for sparsegrad and meprop).
    #[arg(long)]
    pub lr: Option<f64>,
    /// constant | linear | cosine
    #[arg(long, default_value = "linear")]
    pub schedule: String,
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Global-norm clipping; 0 disables.
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 128)]
    pub max_seq_len: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// f32 | bf16
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// cpu | cuda | cuda:N
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Enable the model's dropout while training.
    #[arg(long)]
    pub dropout: bool,
    #[arg(long)]
    pub eval_every: Option<usize>,
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// Resume from a `checkpoints/step-N` folder of an earlier run with the same settings.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Use only the first N training rows.
    #[arg(long)]
    pub limit_train: Option<usize>,
    #[arg(long)]
    pub limit_valid: Option<usize>,
    /// Cache SparseGrad bases here, keyed by base model, data and settings.
    #[arg(long)]
    pub basis_cache: Option<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub artifact: Option<PathBuf>,
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long)]
    pub task: Option<String>,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 128)]
    pub max_seq_len: usize,
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub artifact: Option<PathBuf>,
    /// An input text (or prompt); repeat for several.
    #[arg(long = "input")]
    pub inputs: Vec<String>,
    /// A JSONL file of inputs ({"text"}, {"text_a","text_b"}, {"prompt"} or {"messages"}).
    #[arg(long)]
    pub inputs_file: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 512)]
    pub max_seq_len: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Args, Debug)]
pub struct MergeArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub artifact: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// An artifact folder or its delta.safetensors.
    pub artifact: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    pub gguf: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// f32 | bf16
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(a) => train(*a),
        Command::Eval(a) => eval(a),
        Command::Predict(a) => predict(a),
        Command::Merge(a) => {
            let art = Artifact::load(&a.artifact)?;
            sparsegrad_engine::artifact::merge(&a.model, &art, &a.out, 0)?;
            println!("{}", a.out.display());
            Ok(())
        }
        Command::Inspect(a) => {
            let art = Artifact::load(&a.artifact)?;
            let s = art.summary();
            if a.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", s.to_text());
            }
            Ok(())
        }
        Command::ImportGguf(a) => {
            let dtype = pipeline::parse_dtype(Some(&a.dtype))?;
            let r = sparsegrad_engine::gguf::import_gguf(&a.gguf, &a.out, dtype)?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            Ok(())
        }
        Command::Fixtures(a) => {
            let fx = crate::fixtures::ensure(&a.root())?;
            println!("{}", serde_json::to_string_pretty(&fx)?);
            Ok(())
        }
        Command::Bench(a) => crate::bench::run(a),
        Command::GpuCheck(a) => crate::gpu_check::run(a),
        Command::Serve(a) => runtime()?.block_on(crate::server::run(a.config, true)),
        Command::Worker(a) => runtime()?.block_on(crate::server::run(a.config, false)),
        Command::Migrate(a) => runtime()?.block_on(async {
            crate::server::connect(&a.config).await?;
            println!("migrations applied");
            Ok(())
        }),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn train(a: TrainArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    let method = a.method.spec()?;
    let lr = a.lr.unwrap_or(method.default_lr());
    let spec = JobSpec {
        model_dir: a.model.clone(),
        model_name: None,
        train_file: a.train.clone(),
        valid_file: a.valid.clone(),
        task: a.task.clone(),
        method,
        train: TrainConfig {
            epochs: a.epochs,
            max_steps: a.max_steps,
            batch_size: a.batch_size,
            grad_accum: a.grad_accum,
            lr,
            schedule: a.schedule.parse::<Schedule>()?,
            warmup_steps: a.warmup_steps,
            weight_decay: a.weight_decay,
            max_grad_norm: (a.max_grad_norm > 0.0).then_some(a.max_grad_norm),
            seed: a.seed,
            dropout: a.dropout,
            eval_every: a.eval_every,
            checkpoint_every: a.checkpoint_every,
            keep_checkpoints: 2,
        },
        max_seq_len: a.max_seq_len,
        dtype: Some(a.dtype.clone()),
        limit_train: a.limit_train,
        limit_valid: a.limit_valid,
    };
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let cancel = AtomicBool::new(false);
    let tty = std::io::stderr().is_terminal();
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut on_event = |e: &Event| match e {
        Event::Started {
            total_steps,
            start_step,
            trainable_params,
            total_params,
            examples,
        } => {
            eprintln!(
                "training: {examples} examples, {total_steps} steps (from {start_step}), {trainable_params} of {total_params} parameters trainable"
            );
            if tty {
                let b = indicatif::ProgressBar::new(*total_steps as u64);
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{bar:40} {pos}/{len} [{elapsed}<{eta}] {msg}",
                    )
                    .expect("valid template"),
                );
                b.set_position(*start_step as u64);
                bar = Some(b);
            }
        }
        Event::Step(p) => {
            let msg = format!(
                "loss {:.4} lr {:.2e} {:.0} tok/s",
                p.loss, p.lr, p.tokens_per_sec
            );
            match &bar {
                Some(b) => {
                    b.set_position(p.step as u64);
                    b.set_message(msg);
                }
                None => eprintln!(
                    "step {}/{} {msg} elapsed {:.1}s",
                    p.step, p.total_steps, p.elapsed_secs
                ),
            }
        }
        Event::Eval { step, metrics } => {
            let line = format!(
                "eval @ {step}: {}",
                serde_json::to_string(metrics).unwrap_or_default()
            );
            match &bar {
                Some(b) => b.println(line),
                None => eprintln!("{line}"),
            }
        }
        Event::Checkpoint { step, path } => eprintln!("checkpoint @ {step}: {}", path.display()),
    };
    let io = TrainIo {
        on_event: &mut on_event,
        cancel: &cancel,
        cache_dir: a.basis_cache.clone(),
        checkpoint_dir: Some(a.out.join("checkpoints")),
        resume_from: a.resume.clone(),
    };
    let out = pipeline::run_job(&spec, &device, io)?;
    if let Some(b) = &bar {
        b.finish();
    }
    out.artifact.save(&a.out)?;
    let metrics = serde_json::json!({
        "eval": out.summary.eval,
        "steps": out.summary.steps,
        "tokens": out.summary.tokens,
        "wall_secs": out.summary.wall_secs,
        "final_loss": out.summary.final_loss,
        "peak_rss_bytes": out.summary.peak_rss_bytes,
        "losses": out.summary.losses,
        "trainable_params": out.summary.trainable_params,
        "optimizer_state": out.summary.optimizer_state,
        "step_secs": out.summary.step_secs,
        "calibration_secs": out.summary.calibration_secs,
        "method_stats": out.summary.method_stats,
        "initialised": out.load_report.initialised,
        "train_rows": out.train_stats.rows,
        "truncated_rows": out.train_stats.truncated,
    });
    std::fs::write(
        a.out.join("metrics.json"),
        serde_json::to_vec_pretty(&metrics)?,
    )?;
    println!("{}", serde_json::to_string_pretty(&metrics["eval"])?);
    Ok(())
}

fn parse_task(s: &str, labels: usize) -> Result<Task> {
    Ok(match s {
        "classification" => Task::Classification { num_labels: labels },
        "regression" => Task::Regression,
        "causal-lm" => Task::CausalLm,
        o => anyhow::bail!("unknown task `{o}`"),
    })
}

fn eval(a: EvalArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    let art = a.artifact.as_ref().map(|p| Artifact::load(p)).transpose()?;
    let (model, tok, labels) = match &art {
        Some(art) => pipeline::load_for_inference(
            &a.model,
            Some(art),
            None,
            candle_core::DType::F32,
            &device,
        )?,
        None => {
            // Without an artifact the label map comes from the data itself.
            let recs = sparsegrad_engine::data::read_records(&a.data)?;
            let (task, labels) = sparsegrad_engine::data::infer_task(&recs, a.task.as_deref())?;
            let n = labels.as_ref().map(|l| l.names.len()).unwrap_or(1);
            let task = parse_task(task.name(), n)?;
            let (m, t, _) = pipeline::load_for_inference(
                &a.model,
                None,
                Some(task),
                candle_core::DType::F32,
                &device,
            )?;
            (m, t, labels)
        }
    };
    let ds = pipeline::load_dataset(
        &a.data,
        &tok,
        None,
        Some((&model.task, labels.as_ref())),
        a.max_seq_len,
        a.limit,
    )?;
    let m = sparsegrad_engine::train::evaluate(&model, &ds, a.batch_size)?;
    println!("{}", serde_json::to_string_pretty(&m)?);
    Ok(())
}

fn predict(a: PredictArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    let art = a.artifact.as_ref().map(|p| Artifact::load(p)).transpose()?;
    let (model, tok, labels) = pipeline::load_for_inference(
        &a.model,
        art.as_ref(),
        None,
        candle_core::DType::F32,
        &device,
    )?;
    let mut inputs: Vec<PredictInput> = a
        .inputs
        .iter()
        .map(|t| match model.task {
            Task::CausalLm => PredictInput::Prompt { prompt: t.clone() },
            _ => PredictInput::Text { text: t.clone() },
        })
        .collect();
    if let Some(f) = &a.inputs_file {
        for (i, line) in std::fs::read_to_string(f)?.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            inputs.push(
                serde_json::from_str(line)
                    .with_context(|| format!("{}: line {}", f.display(), i + 1))?,
            );
        }
    }
    let preds = sparsegrad_engine::train::predict(
        &model,
        &tok,
        labels.as_ref(),
        &inputs,
        a.max_seq_len,
        a.max_new_tokens,
    )?;
    println!("{}", serde_json::to_string_pretty(&preds)?);
    Ok(())
}
