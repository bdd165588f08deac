//! The training loop's settings and their defaults.

use serde::{Deserialize, Serialize};

use crate::hyper::{check_bounds, Bound, Hyper};
use crate::optim::Schedule;
use crate::{Error, Result};

/// Tokens per example when a job does not say.
pub const DEFAULT_MAX_SEQ_LEN: usize = 128;

fn default_batch() -> usize {
    16
}
fn default_one() -> usize {
    1
}
fn default_lr() -> f64 {
    5e-5
}
fn default_schedule() -> Schedule {
    Schedule::Linear
}
fn default_clip() -> Option<f64> {
    Some(1.0)
}
fn default_epochs() -> usize {
    1
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    /// Overrides `epochs` when set.
    #[serde(default)]
    pub max_steps: Option<usize>,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    #[serde(default = "default_one")]
    pub grad_accum: usize,
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_schedule")]
    pub schedule: Schedule,
    #[serde(default)]
    pub warmup_steps: usize,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "default_clip")]
    pub max_grad_norm: Option<f64>,
    #[serde(default)]
    pub seed: u64,
    /// Use the model's dropout while training (as transformers does in train mode).
    #[serde(default)]
    pub dropout: bool,
    #[serde(default)]
    pub eval_every: Option<usize>,
    #[serde(default)]
    pub checkpoint_every: Option<usize>,
    #[serde(default = "default_one")]
    pub keep_checkpoints: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        check_bounds(&serde_json::to_value(self).expect("serialisable"), TRAINING)?;
        if self.epochs == 0 && self.max_steps.is_none() {
            return Err(Error::param("epochs", "must be at least 1"));
        }
        Ok(())
    }

    pub fn micro_batches_per_epoch(&self, n: usize) -> usize {
        n.div_ceil(self.batch_size)
    }

    pub fn total_steps(&self, n: usize) -> usize {
        match self.max_steps {
            Some(s) => s,
            None => (self.micro_batches_per_epoch(n) * self.epochs).div_ceil(self.grad_accum),
        }
    }
}

/// The loop's hyperparameters as requests name them (every method takes them); defaults
/// come from [`TrainConfig`]'s, bounds are checked by [`TrainConfig::validate`].
pub const TRAINING: &[Hyper] = &[
    Hyper::integer(
        "epochs",
        "passes over the training set (at least 1 unless max_steps is set)",
    )
    .min(Bound::Incl(0.0))
    .max(Bound::Incl(100.0))
    .aliases(&["n_epochs"]),
    Hyper::integer("max_steps", "optimizer steps to run; overrides epochs")
        .min(Bound::Incl(1.0))
        .max(Bound::Incl(1e6))
        .nullable(),
    Hyper::integer("batch_size", "examples per micro-batch")
        .min(Bound::Incl(1.0))
        .max(Bound::Incl(1024.0)),
    Hyper::integer("grad_accum", "micro-batches per optimizer step")
        .min(Bound::Incl(1.0))
        .max(Bound::Incl(1024.0))
        .aliases(&["gradient_accumulation_steps"]),
    Hyper::number(
        "lr",
        "peak learning rate (the method's own default when not given)",
    )
    .min(Bound::Excl(0.0))
    .max(Bound::Excl(1.0))
    .aliases(&["learning_rate"]),
    Hyper::choice(
        "schedule",
        &["constant", "linear", "cosine"],
        "learning-rate decay after warm-up",
    )
    .aliases(&["lr_scheduler"]),
    Hyper::integer("warmup_steps", "steps of linear warm-up from 0")
        .min(Bound::Incl(0.0))
        .max(Bound::Incl(1e6)),
    Hyper::number("weight_decay", "AdamW's decoupled weight decay")
        .min(Bound::Incl(0.0))
        .max(Bound::Excl(1.0)),
    Hyper::number(
        "max_grad_norm",
        "global gradient-norm clipping; null disables it",
    )
    .min(Bound::Excl(0.0))
    .max(Bound::Incl(1e6))
    .nullable(),
    // `dropout` is LoRA's; the model's own dropout while training is this.
    Hyper::boolean(
        "train_dropout",
        "use the model's dropout layers while training",
    )
    .field("dropout"),
    Hyper::integer(
        "eval_every",
        "evaluate on the validation file every N steps",
    )
    .min(Bound::Incl(1.0))
    .max(Bound::Incl(1e6))
    .nullable(),
    Hyper::integer("checkpoint_every", "store a checkpoint every N steps")
        .min(Bound::Incl(1.0))
        .max(Bound::Incl(1e6))
        .nullable(),
    Hyper::integer("keep_checkpoints", "checkpoints kept on the worker")
        .min(Bound::Incl(1.0))
        .max(Bound::Incl(100.0)),
    Hyper::integer(
        "max_seq_len",
        "tokens per example; longer rows are truncated",
    )
    .min(Bound::Incl(8.0))
    .max(Bound::Incl(8192.0)),
];
