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
fn default_warmup_ratio() -> f64 {
    0.06
}
fn default_weight_decay() -> f64 {
    0.01
}
fn default_true() -> bool {
    true
}

/// Passes over the training set: a number, or `auto` — chosen from the set's size as
/// OpenAI's `"auto"` does (see [`Epochs::for_rows`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Epochs {
    #[default]
    Auto,
    Fixed(usize),
}

impl Epochs {
    /// About 3 passes, more for small sets (at least ~100 examples seen, at most 25 passes),
    /// fewer for large ones (at most ~25,000 examples seen, at least 1 pass) — the rule in
    /// OpenAI's data-preparation guide, so a job behaves as users of that API expect.
    pub fn for_rows(self, rows: usize) -> usize {
        const TARGET: usize = 3;
        const MIN_EXAMPLES: usize = 100;
        const MAX_EXAMPLES: usize = 25_000;
        match self {
            Epochs::Fixed(e) => e,
            Epochs::Auto => {
                let rows = rows.max(1);
                if rows * TARGET < MIN_EXAMPLES {
                    (MIN_EXAMPLES / rows).min(25)
                } else if rows * TARGET > MAX_EXAMPLES {
                    (MAX_EXAMPLES / rows).max(1)
                } else {
                    TARGET
                }
            }
        }
    }
}

impl Serialize for Epochs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Epochs::Auto => s.serialize_str("auto"),
            Epochs::Fixed(e) => s.serialize_u64(*e as u64),
        }
    }
}

impl<'de> Deserialize<'de> for Epochs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Epochs;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a whole number of passes or \"auto\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Epochs, E> {
                usize::try_from(v)
                    .map(Epochs::Fixed)
                    .map_err(|_| E::custom("too many epochs"))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Epochs, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom("must be at least 1"))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Epochs, E> {
                match v {
                    "auto" => Ok(Epochs::Auto),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    #[serde(default)]
    pub epochs: Epochs,
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
    /// Overrides `warmup_ratio` when set.
    #[serde(default)]
    pub warmup_steps: Option<usize>,
    #[serde(default = "default_warmup_ratio")]
    pub warmup_ratio: f64,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    #[serde(default = "default_clip")]
    pub max_grad_norm: Option<f64>,
    #[serde(default)]
    pub seed: u64,
    /// Use the model's dropout while training (as transformers does in train mode).
    #[serde(default = "default_true")]
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
        if self.epochs == Epochs::Fixed(0) && self.max_steps.is_none() {
            return Err(Error::param("epochs", "must be at least 1"));
        }
        Ok(())
    }

    pub fn micro_batches_per_epoch(&self, n: usize) -> usize {
        n.div_ceil(self.batch_size)
    }

    /// Passes over `n` examples (`auto` resolved).
    pub fn epochs_for(&self, n: usize) -> usize {
        self.epochs.for_rows(n)
    }

    pub fn total_steps(&self, n: usize) -> usize {
        match self.max_steps {
            Some(s) => s,
            None => {
                (self.micro_batches_per_epoch(n) * self.epochs_for(n)).div_ceil(self.grad_accum)
            }
        }
    }

    /// Warm-up steps of a `total`-step run: `warmup_steps`, else `warmup_ratio` of the run
    /// rounded up (as transformers does).
    pub fn warmup_for(&self, total: usize) -> usize {
        self.warmup_steps
            .unwrap_or_else(|| (self.warmup_ratio * total as f64).ceil() as usize)
    }
}

/// The loop's hyperparameters as requests name them (every method takes them); defaults
/// come from [`TrainConfig`]'s, bounds are checked by [`TrainConfig::validate`].
pub const TRAINING: &[Hyper] = &[
    Hyper::integer(
        "epochs",
        "passes over the training set (at least 1 unless max_steps is set), or \"auto\": 3, \
         more for sets under 26 rows (up to 25), fewer for sets over 8,333 rows (25,000 \
         examples seen, at least 1 pass)",
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
    Hyper::integer(
        "warmup_steps",
        "steps of linear warm-up from 0; overrides warmup_ratio",
    )
    .min(Bound::Incl(0.0))
    .max(Bound::Incl(1e6))
    .nullable(),
    Hyper::number(
        "warmup_ratio",
        "share of the run's steps spent warming up (rounded up)",
    )
    .min(Bound::Incl(0.0))
    .max(Bound::Incl(1.0)),
    Hyper::number(
        "weight_decay",
        "AdamW's decoupled weight decay of dense matrices (not biases, norms or sparse deltas)",
    )
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
