//! SparseGrad's and MeProp's settings, their hyperparameters as listed and checked, and what
//! each costs for estimates.

use serde::{Deserialize, Serialize};

use super::SparseMlp;
use crate::methods::registry::{Bound, Footprint, Hyper, MethodConfig, MethodInfo};
use crate::methods::{Method, Scope};
use crate::models::ParamShape;
use crate::optim::AdamConfig;

/// Which entries of each matrix may change.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Support {
    /// The paper's: top-k of every step's rotated gradient.
    Dynamic,
    /// Chosen once from the basis-phase gradients (largest accumulated `|G̃|`); Adam state
    /// for those k entries only.
    #[default]
    Fixed,
    /// Fixed, re-selected every `refresh_every` steps from that step's gradient; moments of
    /// entries that stay are kept.
    Refreshed,
    /// As `refreshed`, but re-selected from an exponential average of `|G̃|` over every step
    /// (`ema_beta`), seeded by the basis phase's: the whole rotated gradient is formed each
    /// step, as `dynamic` does.
    Ema,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum BasisDtype {
    /// Full precision.
    F32,
    /// The artifact's bases rounded to bf16: halves their share of the artifact; the merged
    /// weights differ from the trained ones by bf16 rounding of `P` and `Q` (at most 9.2e-5
    /// on MiniLM-L6, density 1%, 250 steps).
    #[default]
    Bf16,
}

/// Whose choices the method follows.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Fidelity {
    /// This service's: a fixed support, exact HOSVD core `Pᵀ G Q`, frozen weights during the
    /// basis phase, the other settings as given.
    #[default]
    Ours,
    /// The authors' code (`sayankotor/sparse_grads`), to reproduce their tables: the input
    /// side rotated by `Qᵀ` (their `u3ᵀ`), 11 basis-phase steps of full fine-tuning, a fresh
    /// top-k every step, every non-MLP parameter dense at the same learning rate with the norms
    /// frozen, k = 28,000 per matrix on encoders; on LLaMA `gate_proj` dense and `up`/`down`
    /// of every third block sparse with k = 100,000. Fields it fixes are overridden (an
    /// explicit `k` is kept).
    Paper,
}

/// The authors' k per matrix when none is given: encoders' base models, and LLaMA.
pub const PAPER_K_ENCODER: usize = 28_000;
pub const PAPER_K_LLAMA: usize = 100_000;

fn default_density() -> f64 {
    0.01
}
fn default_refresh() -> usize {
    100
}
fn default_ema_beta() -> f64 {
    0.9
}
/// +0.5 point on rt_polarity over 5 seeds (MiniLM-L6, 4,000 rows, 250 steps), at the cost of
/// 20 head-only steps of calibration (docs/benchmarks).
fn default_head_warmup() -> usize {
    20
}
fn default_basis_steps() -> usize {
    10
}
fn default_stride() -> usize {
    1
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SparseGradConfig {
    /// Fraction of each MLP matrix's entries updated (k = density · out · in).
    #[serde(default = "default_density")]
    pub density: f64,
    /// An explicit k per matrix (overrides `density`).
    #[serde(default)]
    pub k: Option<usize>,
    #[serde(default)]
    pub support: Support,
    #[serde(default = "default_refresh")]
    pub refresh_every: usize,
    /// Decay of the `ema` support's average of `|G̃|` per step.
    #[serde(default = "default_ema_beta")]
    pub ema_beta: f64,
    /// Micro-batches of ordinary backprop whose gradients define the bases.
    #[serde(default = "default_basis_steps")]
    pub basis_steps: usize,
    /// Optimizer steps on the densely trained parameters alone (the head, and whatever the
    /// scope adds) before the basis phase, so the bases come from gradients through a head
    /// that has started to learn rather than a random one.
    #[serde(default = "default_head_warmup")]
    pub head_warmup_steps: usize,
    /// Update the weights densely during the basis phase, as the paper's code does (the delta
    /// then has a dense part per MLP matrix).
    #[serde(default)]
    pub basis_update: bool,
    /// Multiplier of the job's learning rate for those basis-phase updates of the MLP
    /// matrices (default 1, the paper's: the sparse rate, ~10× full fine-tuning's, which can
    /// overshoot on dense steps; 0.05 gives full fine-tuning's rate at the default 1e-3).
    #[serde(default)]
    pub basis_update_lr_scale: Option<f64>,
    #[serde(default)]
    pub scope: Scope,
    /// Train the MLP of every n-th block only (blocks 0, n, 2n, …; the paper used 3 for
    /// LLaMa-2); other blocks' MLPs stay frozen.
    #[serde(default = "default_stride")]
    pub block_stride: usize,
    #[serde(default)]
    pub basis_dtype: BasisDtype,
    #[serde(default)]
    pub fidelity: Fidelity,
    /// The support may use only the first n eigenvectors of each basis (those of the largest
    /// gradient energy): the artifact then stores at most n columns of each `P` and `Q`.
    #[serde(default)]
    pub max_basis_columns: Option<usize>,
    /// Learning-rate multiplier for densely trained parameters (default 1 in `mlp` scope,
    /// 0.1 in `paper` scope, where they are a whole model's worth trained at the sparse
    /// methods' ~10× rate otherwise).
    #[serde(default)]
    pub dense_lr_scale: Option<f64>,
}

impl Default for SparseGradConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }
}

impl SparseGradConfig {
    /// The settings `fidelity` implies: for `paper`, the authors' choices replace the fields
    /// they fix (what the job then echoes); the architecture-dependent ones (k, LLaMA's
    /// stride) are applied when the model is known.
    pub fn effective(&self) -> Self {
        match self.fidelity {
            Fidelity::Ours => self.clone(),
            Fidelity::Paper => SparseGradConfig {
                support: Support::Dynamic,
                basis_steps: 11,
                basis_update: true,
                head_warmup_steps: 0,
                scope: Scope::Paper,
                dense_lr_scale: Some(1.0),
                basis_update_lr_scale: Some(1.0),
                max_basis_columns: None,
                ..self.clone()
            },
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MePropConfig {
    #[serde(default = "default_density")]
    pub density: f64,
    #[serde(default)]
    pub k: Option<usize>,
    #[serde(default)]
    pub scope: Scope,
    #[serde(default = "default_stride")]
    pub block_stride: usize,
    #[serde(default)]
    pub dense_lr_scale: Option<f64>,
    /// `paper`: the authors' MeProp — the MLP weights' dense gradient masked to its top-k
    /// under ordinary AdamW (dense moments, so masked entries keep moving on momentum),
    /// every non-MLP parameter dense at the same learning rate with the norms frozen, k as
    /// for SparseGrad's `paper`.
    #[serde(default)]
    pub fidelity: Fidelity,
}

impl Default for MePropConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }
}

impl MePropConfig {
    /// The settings `fidelity` implies (see [`SparseGradConfig::effective`]).
    pub fn effective(&self) -> Self {
        match self.fidelity {
            Fidelity::Ours => self.clone(),
            Fidelity::Paper => MePropConfig {
                scope: Scope::Paper,
                dense_lr_scale: Some(1.0),
                ..self.clone()
            },
        }
    }
}

const DENSITY: Hyper = Hyper::number(
    "density",
    "fraction of each MLP matrix's entries updated (k = density · out · in)",
)
.min(Bound::Excl(0.0))
.max(Bound::Incl(1.0));
const K: Hyper = Hyper::integer(
    "k",
    "entries updated per MLP matrix (overrides density; at most the matrix's size)",
)
.min(Bound::Incl(1.0))
.max(Bound::Incl(1e9))
.nullable();
const SCOPE: Hyper = Hyper::choice(
    "scope",
    &["head", "mlp", "paper"],
    "what trains densely besides the sparse MLP matrices: the task head (head), the head plus \
     the MLP biases and normalisation layers (mlp), or every other parameter (paper)",
);
const BLOCK_STRIDE: Hyper = Hyper::integer(
    "block_stride",
    "train the MLP of every n-th block only (the paper used 3 for LLaMA-2)",
)
.min(Bound::Incl(1.0))
.max(Bound::Incl(1024.0));
const DENSE_LR_SCALE: Hyper = Hyper::number(
    "dense_lr_scale",
    "learning-rate multiplier for densely trained parameters (default 1 in head and mlp \
     scope, 0.1 in paper scope)",
)
.min(Bound::Excl(0.0))
.max(Bound::Incl(1e3))
.nullable();

/// Values trained on the sparse matrices: k per matrix, or the density's share of them.
fn sparse_trainable(k: Option<usize>, density: f64, shape: &ParamShape) -> u64 {
    k.map(|k| k as u64 * shape.layers * shape.mlp_matrices)
        .unwrap_or((shape.mlp_params() as f64 * density) as u64)
}

/// The given k, or under `fidelity: paper` the authors' for the architecture (three MLP
/// matrices per block: LLaMA).
fn paper_k(k: Option<usize>, fidelity: Fidelity, shape: &ParamShape) -> Option<usize> {
    k.or(match (fidelity, shape.mlp_matrices) {
        (Fidelity::Ours, _) => None,
        (Fidelity::Paper, 3) => Some(PAPER_K_LLAMA),
        (Fidelity::Paper, _) => Some(PAPER_K_ENCODER),
    })
}

impl MethodConfig for SparseGradConfig {
    const INFO: MethodInfo = MethodInfo {
        name: "sparsegrad",
        description: "SparseGrad (Chekalina et al. 2024): MLP matrices trained through the top-k \
                      entries of their weight gradient in a basis found from gradient statistics; \
                      the delta holds k values per matrix plus the bases.",
        // Sparse methods update ~1% of each MLP matrix and need about 10× full fine-tuning's
        // rate (at 1e-4 a fixed support did not learn at all in our PyTorch re-implementation).
        default_lr: 1e-3,
        hyperparameters: &[
            DENSITY,
            K,
            Hyper::choice(
                "support",
                &["fixed", "dynamic", "refreshed", "ema"],
                "which entries may change: chosen once from the basis phase (fixed), top-k of \
                 every step's gradient (dynamic, the paper's), or re-chosen every refresh_every \
                 steps from that step's gradient (refreshed) or from an exponential average of \
                 every step's (ema)",
            ),
            Hyper::integer(
                "refresh_every",
                "steps between re-selections of a refreshed or ema support",
            )
            .min(Bound::Incl(1.0))
            .max(Bound::Incl(1e6)),
            Hyper::number(
                "ema_beta",
                "decay per step of the ema support's average of |G̃|",
            )
            .min(Bound::Incl(0.0))
            .max(Bound::Excl(1.0)),
            Hyper::integer(
                "basis_steps",
                "micro-batches of ordinary backprop whose gradients define the bases",
            )
            .min(Bound::Incl(1.0))
            .max(Bound::Incl(1000.0)),
            Hyper::integer(
                "head_warmup_steps",
                "steps training only the dense parameters (the head) before the basis phase, \
                 so the bases see gradients through a head that has started to learn",
            )
            .min(Bound::Incl(0.0))
            .max(Bound::Incl(1000.0)),
            Hyper::boolean(
                "basis_update",
                "update the weights densely during the basis phase, as the paper's code does",
            ),
            Hyper::number(
                "basis_update_lr_scale",
                "multiplier of the learning rate for the basis phase's dense updates of the MLP \
                 matrices (basis_update; default 1)",
            )
            .min(Bound::Excl(0.0))
            .max(Bound::Incl(10.0))
            .nullable(),
            SCOPE,
            BLOCK_STRIDE,
            Hyper::choice(
                "basis_dtype",
                &["f32", "bf16"],
                "precision of the bases in the artifact: bf16 halves them (the merge then differs \
                 from the trained weights by their rounding), f32 keeps them exact",
            ),
            Hyper::choice(
                "fidelity",
                &["ours", "paper"],
                "whose choices to follow: this service's (ours), or the authors' code (paper: \
                 Qᵀ input rotation, 11 warm-start steps of full fine-tuning, dynamic top-k, \
                 every non-MLP parameter dense at one learning rate with norms frozen, k 28,000; \
                 on LLaMA gate_proj dense and every third block's up/down sparse, k 100,000)",
            ),
            Hyper::integer(
                "max_basis_columns",
                "the support may use only the first n eigenvectors of each basis (largest \
                 gradient energy first); the artifact then holds at most n columns of each",
            )
            .min(Bound::Incl(1.0))
            .max(Bound::Incl(1e6))
            .nullable(),
            DENSE_LR_SCALE,
        ],
    };
    fn build(&self, adam: AdamConfig) -> Box<dyn Method> {
        Box::new(SparseMlp::sparsegrad(self.clone(), adam))
    }
    fn footprint(&self, shape: &ParamShape) -> Footprint {
        let c = self.effective();
        Footprint {
            trainable: sparse_trainable(paper_k(c.k, c.fidelity, shape), c.density, shape)
                + c.scope.extra_params(shape),
            // One P, Q pair per matrix type.
            extra_state: shape.mlp_matrices * (shape.hidden * shape.hidden + shape.ffn * shape.ffn),
            calibration_batches: (c.head_warmup_steps + c.basis_steps) as u64,
            // Every support but the dynamic one ranks the basis phase's summed |G̃|.
            calibration_state: match c.support {
                Support::Dynamic => 0,
                _ => shape.mlp_params(),
            },
            ..Default::default()
        }
    }
}

impl MethodConfig for MePropConfig {
    const INFO: MethodInfo = MethodInfo {
        name: "meprop",
        description: "MeProp (Sun et al. 2017) on the same MLP matrices: top-k of the weight \
                      gradient in the original basis every step.",
        default_lr: 1e-3,
        hyperparameters: &[
            DENSITY,
            K,
            SCOPE,
            BLOCK_STRIDE,
            DENSE_LR_SCALE,
            Hyper::choice(
                "fidelity",
                &["ours", "paper"],
                "ours: Adam on the selected entries only; paper (the authors' code): the dense \
                 gradient masked to its top-k under ordinary AdamW, non-MLP parameters dense \
                 at one learning rate with norms frozen, k 28,000 (100,000 on LLaMA)",
            ),
        ],
    };
    fn build(&self, adam: AdamConfig) -> Box<dyn Method> {
        Box::new(SparseMlp::meprop(self.clone(), adam))
    }
    fn footprint(&self, shape: &ParamShape) -> Footprint {
        let c = self.effective();
        let mlp = match c.fidelity {
            // Masked dense gradients: every MLP weight has AdamW state.
            Fidelity::Paper => shape.mlp_params(),
            Fidelity::Ours => sparse_trainable(c.k, c.density, shape),
        };
        Footprint {
            trainable: mlp + c.scope.extra_params(shape),
            ..Default::default()
        }
    }
}
