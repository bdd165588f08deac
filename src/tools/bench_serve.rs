//! `sparsegrad bench serve`: the inference engine serving many fine-tunes of one base —
//! tokens/s and latency percentiles for concurrent streams with 1 and 8 resident fine-tunes,
//! and the memory each extra fine-tune costs. Runs the engine the API runs (its own thread,
//! continuous batching), without HTTP or a database in the way.
//!
//! The fine-tunes: one real SparseGrad run on the base (a few steps of chitchat), and copies
//! of it with rescaled values (the same structure and size, different outputs).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use sparsegrad_engine::artifact::Artifact;
use sparsegrad_engine::methods::{MethodSpec, SparseGradConfig};
use sparsegrad_engine::train::{Sampling, TrainConfig, TrainIo};

use crate::inference::{Engine, GenEvent, GenerateRequest, Limits, ModelKey, Prompt};

#[derive(Args, Debug)]
pub struct BenchServeArgs {
    /// Model folder (default: the SmolLM2-135M-Instruct fixture).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Concurrent streams.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub streams: Vec<usize>,
    /// Resident fine-tunes the streams are spread over.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub deltas: Vec<usize>,
    /// Tokens generated per stream.
    #[arg(long, default_value_t = 32)]
    pub tokens: usize,
    /// Prompt tokens per stream (about).
    #[arg(long, default_value_t = 32)]
    pub prompt: usize,
    /// Internal: write the fine-tunes into this folder and stop (the benchmark trains in a
    /// child process, so its memory does not blur the serving figures).
    #[arg(long, hide = true)]
    pub prepare_into: Option<PathBuf>,
    #[command(flatten)]
    pub fixtures: super::cli::FixturesArgs,
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let l = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            l.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .unwrap_or(0.0)
        / 1024.0
}

fn percentile(xs: &mut [f64], p: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[((xs.len() - 1) as f64 * p).round() as usize]
}

/// One real SparseGrad fine-tune of `dir` and `n - 1` rescaled copies, saved under `out`.
fn fine_tunes(
    dir: &std::path::Path,
    data: &std::path::Path,
    out: &std::path::Path,
    n: usize,
) -> Result<()> {
    let spec = sparsegrad_engine::pipeline::RunSpec {
        model_dir: dir.to_path_buf(),
        model_name: None,
        train_file: data.to_path_buf(),
        valid_file: None,
        task: None,
        method: MethodSpec::Sparsegrad(SparseGradConfig {
            basis_steps: 2,
            ..Default::default()
        }),
        train: TrainConfig {
            max_steps: Some(2),
            batch_size: 2,
            lr: 1e-3,
            seed: 1,
            ..TrainConfig::default()
        },
        max_seq_len: 32,
        dtype: None,
        limit_train: Some(8),
        limit_valid: None,
    };
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let t0 = Instant::now();
    let run = sparsegrad_engine::pipeline::run_job(
        &spec,
        &candle_core::Device::Cpu,
        TrainIo::new(&mut |_| {}, &cancel),
    )?;
    eprintln!(
        "trained one SparseGrad fine-tune in {:.0}s",
        t0.elapsed().as_secs_f64()
    );
    let art = run.artifact;
    drop(run.model);
    for i in 0..n {
        let scale = 1.0 + i as f64 * 0.25;
        let tensors = art
            .tensors
            .iter()
            .map(|(k, t)| {
                let t = if k.ends_with(".sparse_values") {
                    (t * scale)?
                } else {
                    t.clone()
                };
                Ok((k.clone(), t))
            })
            .collect::<Result<_>>()?;
        let a = Artifact {
            descriptor: art.descriptor.clone(),
            tensors,
        };
        a.save(&out.join(format!("ft-{i}")))?;
    }
    Ok(())
}

pub fn serve(a: BenchServeArgs) -> Result<()> {
    let fx = super::fixtures::ensure(&a.fixtures.root())?;
    let dir = a.model.clone().unwrap_or(fx.smollm2.clone());
    let most = a.deltas.iter().copied().max().unwrap_or(1);
    if let Some(out) = &a.prepare_into {
        return fine_tunes(&dir, &fx.chitchat_train, out, most);
    }
    let tmp = tempfile::tempdir()?;
    let status = std::process::Command::new(std::env::current_exe()?)
        .args(["bench", "serve", "--deltas", &most.to_string(), "--model"])
        .arg(&dir)
        .arg("--prepare-into")
        .arg(tmp.path())
        .status()?;
    anyhow::ensure!(status.success(), "preparing the fine-tunes failed");
    let keys: Vec<ModelKey> = (0..most)
        .map(|i| ModelKey {
            model_dir: dir.clone(),
            delta: Some((
                tmp.path().join(format!("ft-{i}/delta.safetensors")),
                format!("bench-{i}"),
            )),
        })
        .collect();
    let rt = tokio::runtime::Runtime::new()?;
    let engine = Engine::start(
        "cpu",
        Limits {
            max_queue: 1024,
            max_per_tenant: 1024,
            ..Limits::default()
        },
    );
    let prompt = "Hi! ".repeat(a.prompt.max(1) / 2);
    let generate = |key: &ModelKey, max_tokens: usize, seed: u64| {
        let ticket = engine
            .admit("bench")
            .map_err(|b| anyhow::anyhow!(b.message))?;
        engine
            .generate(
                ticket,
                GenerateRequest {
                    key: key.clone(),
                    prompt: Prompt::Text(prompt.clone()),
                    sampling: Sampling {
                        // Sampled (seeded) so streams run their full length, not to an early EOS.
                        temperature: 1.0,
                        seed,
                        ..Default::default()
                    },
                    max_tokens,
                    max_context: 4096,
                },
            )
            .map_err(|e| anyhow::anyhow!("{e}"))
    };
    // Memory: the base alone, then 1 and `most` fine-tunes resident.
    let base_key = ModelKey {
        model_dir: dir.clone(),
        delta: None,
    };
    let rss0 = rss_mib();
    rt.block_on(drain(generate(&base_key, 1, 0)?))?;
    let rss_base = rss_mib();
    let mut rss_with = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        rt.block_on(drain(generate(k, 1, 0)?))?;
        rss_with.push((i + 1, rss_mib(), engine.stats().resident_delta_bytes));
    }
    println!(
        "model: {} · {} threads · {} tokens per stream after a {}-token prompt",
        dir.display(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        a.tokens,
        a.prompt
    );
    println!();
    let base_bytes = engine.stats().resident_base_bytes as f64 / 1048576.0;
    println!("| resident | weights + overlays MiB | overlays MiB | per fine-tune MiB | per fine-tune, % of base | process RSS MiB |");
    println!("|---|---|---|---|---|---|");
    println!("| base only | {base_bytes:.0} | 0 | – | – | {rss_base:.0} |");
    for &(n, rss, bytes) in &rss_with {
        if n == 1 || n == most {
            let mib = bytes as f64 / 1048576.0;
            let per = mib / n as f64;
            println!(
                "| base + {n} | {:.0} | {mib:.1} | {per:.1} | {:.1}% | {rss:.0} |",
                base_bytes + mib,
                100.0 * per / base_bytes.max(1.0)
            );
        }
    }
    eprintln!("(process RSS before loading the base: {rss0:.0} MiB; the allocator keeps what loading freed, so RSS moves little as overlays arrive)");
    println!();
    println!("| fine-tunes | streams | tokens/s | inter-token p50 ms | p99 ms | first token p50 ms | request p50 s | p99 s |");
    println!("|---|---|---|---|---|---|---|---|");
    for &nd in &a.deltas {
        for &ns in &a.streams {
            let t0 = Instant::now();
            let rxs = (0..ns)
                .map(|i| generate(&keys[i % nd], a.tokens, i as u64))
                .collect::<Result<Vec<_>>>()?;
            let timings = rt.block_on(async {
                let tasks: Vec<_> = rxs
                    .into_iter()
                    .map(|rx| tokio::spawn(timed(rx, t0)))
                    .collect();
                let mut out = Vec::new();
                for t in tasks {
                    out.push(t.await??);
                }
                anyhow::Ok(out)
            })?;
            let wall = t0.elapsed().as_secs_f64();
            let tokens: usize = timings.iter().map(|t| t.tokens).sum();
            let mut gaps: Vec<f64> = timings
                .iter()
                .flat_map(|t| t.gaps.iter().copied())
                .collect();
            let mut first: Vec<f64> = timings.iter().map(|t| t.first).collect();
            let mut total: Vec<f64> = timings.iter().map(|t| t.total).collect();
            println!(
                "| {nd} | {ns} | {:.1} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} |",
                tokens as f64 / wall,
                percentile(&mut gaps, 0.5) * 1e3,
                percentile(&mut gaps, 0.99) * 1e3,
                percentile(&mut first, 0.5) * 1e3,
                percentile(&mut total, 0.5),
                percentile(&mut total, 0.99),
            );
        }
    }
    let s = engine.stats();
    eprintln!(
        "engine: {} steps, {} tokens, {} overlays built",
        s.steps, s.tokens, s.overlay_loads
    );
    Ok(())
}

async fn drain(mut rx: tokio::sync::mpsc::UnboundedReceiver<GenEvent>) -> Result<()> {
    while let Some(ev) = rx.recv().await {
        if let GenEvent::Failed(e) = ev {
            anyhow::bail!("{e}");
        }
    }
    Ok(())
}

struct Timing {
    tokens: usize,
    first: f64,
    total: f64,
    gaps: Vec<f64>,
}

/// A stream's completion tokens, time to its first text, its total time and the gaps between
/// pieces of text.
async fn timed(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<GenEvent>,
    t0: Instant,
) -> Result<Timing> {
    let mut last: Option<Instant> = None;
    let mut t = Timing {
        tokens: 0,
        first: 0.0,
        total: 0.0,
        gaps: Vec::new(),
    };
    while let Some(ev) = rx.recv().await {
        let now = Instant::now();
        match ev {
            GenEvent::Text(_) => {
                match last {
                    None => t.first = (now - t0).as_secs_f64(),
                    Some(l) => t.gaps.push((now - l).as_secs_f64()),
                }
                last = Some(now);
            }
            GenEvent::Done {
                completion_tokens, ..
            } => {
                t.tokens = completion_tokens;
                t.total = (now - t0).as_secs_f64();
            }
            GenEvent::Failed(e) => anyhow::bail!("{e}"),
        }
    }
    Ok(t)
}
