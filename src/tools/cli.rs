//! The `sparsegrad` command line: the service (`serve`, `worker`, `migrate`), engine commands
//! on local files (see [`super::commands`]) and the tools.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use serde_json::{Map, Value};
use sparsegrad_engine::artifact::Artifact;
use sparsegrad_engine::methods::registry::{resolve_method, DEFAULT_MAX_SEQ_LEN, DEFAULT_METHOD};
use sparsegrad_engine::methods::MethodSpec;
use sparsegrad_engine::pipeline;

use super::commands;

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
    Bench(super::bench::BenchArgs),
    /// Device-vs-CPU correctness checks and GPU benchmarks (deploy/cuda/gpu-check.sh).
    GpuCheck(super::gpu_check::GpuCheckArgs),
    /// Run the HTTP API with in-process workers (`--workers N`).
    Serve(ServiceArgs),
    /// Run workers only (claim jobs from the shared Postgres queue).
    Worker(ServiceArgs),
    /// Apply database migrations and exit.
    Migrate(ServiceArgs),
    /// Check the object store against the database: objects no row names (orphans), rows
    /// whose object is gone, artifacts whose size or sha256 differs. Exits 1 when it finds a
    /// problem it did not fix.
    Fsck(FsckArgs),
}

#[derive(Args, Debug)]
pub struct FsckArgs {
    #[command(flatten)]
    pub config: crate::config::Config,
    /// Delete orphans (objects no row names, older than the grace period).
    #[arg(long)]
    pub fix: bool,
    /// Unrecorded objects younger than this are left alone (their row may be on its way).
    #[arg(long, default_value_t = 86_400)]
    pub grace_secs: u64,
    /// Check sizes only; skip reading every artifact for its sha256.
    #[arg(long)]
    pub sizes_only: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
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
            super::fixtures::default_root(self.xdg_cache_home.clone(), self.home.clone())
        })
    }
}

/// The method and its hyperparameters. Unset flags take the registry's defaults (see
/// `GET /v1/methods`); a flag the method does not take is an error.
#[derive(Args, Debug, Clone)]
pub struct MethodArgs {
    /// full | lora | sparsegrad | meprop (default: sparsegrad)
    #[arg(long)]
    pub method: Option<String>,
    /// sparsegrad / meprop: fraction of each MLP matrix updated.
    #[arg(long)]
    pub density: Option<f64>,
    /// sparsegrad / meprop: entries updated per MLP matrix (overrides --density).
    #[arg(long)]
    pub k: Option<usize>,
    /// sparsegrad: fixed | dynamic | refreshed | ema
    #[arg(long)]
    pub support: Option<String>,
    /// sparsegrad: re-select a refreshed or ema support every N steps.
    #[arg(long)]
    pub refresh_every: Option<usize>,
    /// sparsegrad: decay per step of the ema support's average of |G̃|.
    #[arg(long)]
    pub ema_beta: Option<f64>,
    /// sparsegrad: micro-batches of gradients that define the bases.
    #[arg(long)]
    pub basis_steps: Option<usize>,
    /// sparsegrad: steps training the head alone before the basis phase.
    #[arg(long)]
    pub head_warmup_steps: Option<usize>,
    /// sparsegrad: update the weights during the basis phase (the paper's code does).
    #[arg(long)]
    pub basis_update: bool,
    /// sparsegrad: learning-rate multiplier for those basis-phase updates.
    #[arg(long)]
    pub basis_update_lr_scale: Option<f64>,
    /// sparsegrad: ours | paper (the authors' code's choices; see the README).
    #[arg(long)]
    pub fidelity: Option<String>,
    /// sparsegrad: the support uses only the first N eigenvectors of each basis.
    #[arg(long)]
    pub max_basis_columns: Option<usize>,
    /// sparsegrad: f32 | bf16 bases in the artifact.
    #[arg(long)]
    pub basis_dtype: Option<String>,
    /// sparsegrad / meprop / lora: head | mlp (head + MLP biases + norms) | paper (all else dense)
    #[arg(long)]
    pub scope: Option<String>,
    /// sparsegrad / meprop: train the MLP of every n-th block only.
    #[arg(long)]
    pub block_stride: Option<usize>,
    /// sparsegrad / meprop: learning-rate multiplier for densely trained parameters.
    #[arg(long)]
    pub dense_lr_scale: Option<f64>,
    /// lora: rank.
    #[arg(long)]
    pub lora_r: Option<usize>,
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// lora: mlp | attention | all
    #[arg(long)]
    pub lora_targets: Option<String>,
}

impl TrainArgs {
    /// Every hyperparameter given on the command line (method and loop), as a request names
    /// them.
    pub fn hyperparameters(&self) -> Map<String, Value> {
        let mut m = self.method.hyperparameters();
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                m.insert(k.to_string(), v);
            }
        };
        put(
            "epochs",
            self.epochs.as_deref().map(|e| match e.parse::<u64>() {
                Ok(n) => Value::from(n),
                Err(_) => Value::from(e),
            }),
        );
        put("max_steps", self.max_steps.map(Value::from));
        put("batch_size", self.batch_size.map(Value::from));
        put("grad_accum", self.grad_accum.map(Value::from));
        put("lr", self.lr.map(Value::from));
        put("schedule", self.schedule.clone().map(Value::from));
        put("warmup_steps", self.warmup_steps.map(Value::from));
        put("warmup_ratio", self.warmup_ratio.map(Value::from));
        put("weight_decay", self.weight_decay.map(Value::from));
        put(
            "max_grad_norm",
            self.max_grad_norm
                .map(|n| if n > 0.0 { Value::from(n) } else { Value::Null }),
        );
        put("max_seq_len", self.max_seq_len.map(Value::from));
        put(
            "train_dropout",
            self.no_dropout.then_some(Value::Bool(false)),
        );
        put("eval_every", self.eval_every.map(Value::from));
        put("checkpoint_every", self.checkpoint_every.map(Value::from));
        put("keep_checkpoints", self.keep_checkpoints.map(Value::from));
        m
    }
}

impl MethodArgs {
    /// The flags given, as the method's hyperparameters (request names).
    pub fn hyperparameters(&self) -> Map<String, Value> {
        let mut m = Map::new();
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                m.insert(k.to_string(), v);
            }
        };
        put("density", self.density.map(Value::from));
        put("k", self.k.map(Value::from));
        put("support", self.support.clone().map(Value::from));
        put("refresh_every", self.refresh_every.map(Value::from));
        put("ema_beta", self.ema_beta.map(Value::from));
        put("basis_steps", self.basis_steps.map(Value::from));
        put("head_warmup_steps", self.head_warmup_steps.map(Value::from));
        put(
            "basis_update",
            self.basis_update.then_some(Value::Bool(true)),
        );
        put(
            "basis_update_lr_scale",
            self.basis_update_lr_scale.map(Value::from),
        );
        put("basis_dtype", self.basis_dtype.clone().map(Value::from));
        put("max_basis_columns", self.max_basis_columns.map(Value::from));
        put("fidelity", self.fidelity.clone().map(Value::from));
        put("scope", self.scope.clone().map(Value::from));
        put("block_stride", self.block_stride.map(Value::from));
        put("dense_lr_scale", self.dense_lr_scale.map(Value::from));
        put("r", self.lora_r.map(Value::from));
        put("alpha", self.lora_alpha.map(Value::from));
        put("dropout", self.lora_dropout.map(Value::from));
        put("targets", self.lora_targets.clone().map(Value::from));
        m
    }

    /// The method with these flags, resolved and checked by the engine's registry.
    pub fn spec(&self) -> Result<MethodSpec> {
        Ok(resolve_method(
            self.method.as_deref().unwrap_or(DEFAULT_METHOD),
            &self.hyperparameters(),
        )?)
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
    // Training-loop flags: unset ones take the registry's defaults (`GET /v1/methods`).
    /// Passes over the training set, or `auto` (the default: chosen from the set's size).
    #[arg(long)]
    pub epochs: Option<String>,
    #[arg(long)]
    pub max_steps: Option<usize>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Learning rate (default: the method's).
    #[arg(long)]
    pub lr: Option<f64>,
    /// constant | linear | cosine
    #[arg(long)]
    pub schedule: Option<String>,
    /// Overrides --warmup-ratio.
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// Share of the steps spent warming up (default 0.06).
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Global-norm clipping; 0 disables.
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// f32 | bf16
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// cpu | cuda | cuda:N
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Turn the model's dropout off while training (it is on by default, as in transformers).
    #[arg(long)]
    pub no_dropout: bool,
    #[arg(long)]
    pub eval_every: Option<usize>,
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    #[arg(long)]
    pub keep_checkpoints: Option<usize>,
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
    #[arg(long, default_value_t = DEFAULT_MAX_SEQ_LEN)]
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
    /// Causal LMs: 0 (the default) is greedy; higher samples more freely (at most 2).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Causal LMs: sample only from the most likely tokens whose probabilities reach this.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Causal LMs: the sampling stream's seed (the same seed, the same completion).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Causal LMs: end a completion at this text (repeat for several, at most 4).
    #[arg(long)]
    pub stop: Vec<String>,
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
        Command::Train(a) => commands::train(*a),
        Command::Eval(a) => commands::eval(a),
        Command::Predict(a) => commands::predict(a),
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
            let r = sparsegrad_engine::gguf::import_gguf(
                &a.gguf,
                &a.out,
                dtype,
                &sparsegrad_engine::gguf::ImportLimits::NONE,
            )?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            Ok(())
        }
        Command::Fixtures(a) => {
            let fx = super::fixtures::ensure(&a.root())?;
            println!("{}", serde_json::to_string_pretty(&fx)?);
            Ok(())
        }
        Command::Bench(a) => super::bench::run(a),
        Command::GpuCheck(a) => super::gpu_check::run(a),
        Command::Serve(a) => runtime()?.block_on(crate::server::run(a.config, true)),
        Command::Worker(a) => runtime()?.block_on(crate::server::run(a.config, false)),
        Command::Migrate(a) => runtime()?.block_on(async {
            crate::server::connect(&a.config).await?;
            println!("migrations applied");
            Ok(())
        }),
        Command::Fsck(a) => runtime()?.block_on(async {
            let (db, storage) = crate::server::connect(&a.config).await?;
            let opts = crate::fsck::FsckOptions {
                grace: std::time::Duration::from_secs(a.grace_secs),
                fix: a.fix,
                digests: !a.sizes_only,
            };
            let report = crate::fsck::fsck(&db, &storage, &opts).await?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.to_text());
            }
            if report.clean() {
                Ok(())
            } else {
                anyhow::bail!("fsck found problems it did not fix")
            }
        }),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
