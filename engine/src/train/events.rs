//! What a training run tells its caller — progress, evaluations, checkpoints — and what it
//! gets from it: an event callback, a cancellation flag and where to cache and checkpoint.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    pub step: usize,
    pub total_steps: usize,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    pub tokens_per_sec: f64,
    pub elapsed_secs: f64,
    /// The share of the step's MLP gradient energy the sparse update kept,
    /// `‖top-k(G̃)‖² / ‖G‖²` over every sparse matrix (SparseGrad and MeProp; measured every
    /// step where the whole gradient is formed anyway, every 10th on a fixed support).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_energy: Option<f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct EvalMetrics {
    pub loss: f64,
    pub examples: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub macro_f1: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matthews: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pearson: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spearman: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Started {
        total_steps: usize,
        start_step: usize,
        trainable_params: usize,
        total_params: usize,
        examples: usize,
    },
    Step(Progress),
    Eval {
        step: usize,
        metrics: EvalMetrics,
    },
    Checkpoint {
        step: usize,
        path: PathBuf,
    },
}

/// One line for a person: the CLI prints it, the service keeps it as the job event's message.
impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::Started {
                total_steps,
                start_step,
                trainable_params,
                total_params,
                examples,
            } => write!(
                f,
                "training on {examples} examples for {total_steps} steps from step {start_step}; \
                 {trainable_params} of {total_params} parameters trained"
            ),
            Event::Step(p) => write!(
                f,
                "step {}/{}: loss {:.4}, lr {:.2e}, {:.0} tok/s, {:.1}s",
                p.step, p.total_steps, p.loss, p.lr, p.tokens_per_sec, p.elapsed_secs
            ),
            Event::Eval { step, metrics: m } => {
                write!(f, "eval at step {step}: loss {:.4}", m.loss)?;
                let scores = [
                    ("accuracy", m.accuracy),
                    ("macro F1", m.macro_f1),
                    ("Matthews", m.matthews),
                    ("Pearson", m.pearson),
                    ("Spearman", m.spearman),
                    ("perplexity", m.perplexity),
                ];
                for (name, v) in scores {
                    if let Some(v) = v {
                        write!(f, ", {name} {v:.4}")?;
                    }
                }
                Ok(())
            }
            Event::Checkpoint { step, path } => {
                write!(f, "checkpoint at step {step}: {}", path.display())
            }
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainSummary {
    pub steps: usize,
    pub tokens: usize,
    pub wall_secs: f64,
    pub final_loss: f64,
    pub eval: Option<EvalMetrics>,
    pub peak_rss_bytes: Option<u64>,
    pub losses: Vec<(usize, f64)>,
    /// Parameters the method trains and numbers of optimizer state it holds.
    pub trainable_params: usize,
    pub optimizer_state: usize,
    /// Mean wall time of an optimizer step (forward, backward and update), seconds.
    pub step_secs: f64,
    /// Wall time of the method's calibration (SparseGrad's basis phase), seconds.
    pub calibration_secs: f64,
    #[serde(default)]
    pub method_stats: serde_json::Value,
}

pub struct TrainIo<'a> {
    pub on_event: &'a mut dyn FnMut(&Event),
    pub cancel: &'a AtomicBool,
    /// Set to stop at the next step boundary with a checkpoint of the steps done
    /// ([`crate::Error::Drained`]), so another process resumes the run.
    pub drain: Option<&'a AtomicBool>,
    /// Where methods may cache what they derive from the base model and data (SparseGrad
    /// bases); `None` disables caching.
    pub cache_dir: Option<PathBuf>,
    /// Where periodic checkpoints go (`step-N/` folders).
    pub checkpoint_dir: Option<PathBuf>,
    /// A `step-N/` folder to resume from.
    pub resume_from: Option<PathBuf>,
}

impl<'a> TrainIo<'a> {
    /// No cache, no checkpoints, a fresh run.
    pub fn new(on_event: &'a mut dyn FnMut(&Event), cancel: &'a AtomicBool) -> Self {
        TrainIo {
            on_event,
            cancel,
            drain: None,
            cache_dir: None,
            checkpoint_dir: None,
            resume_from: None,
        }
    }
}

/// Peak resident set size of this process (Linux), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    status_kb("VmHWM:").map(|kb| kb * 1024)
}

/// Current resident set size of this process (Linux), in bytes.
pub fn rss_bytes() -> Option<u64> {
    status_kb("VmRSS:").map(|kb| kb * 1024)
}

/// Resets the peak resident set size to the current one (Linux ≥ 4.0), so the next
/// [`peak_rss_bytes`] is the peak of what ran since: a phase's own high-water mark.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn status_kb(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
