//! Fine-tuning methods behind one trait the trainer drives. A method decides what trains
//! (freezing, adapters, gradient hooks), turns accumulated gradients into updates, keeps its
//! optimizer state for checkpoints, and says what goes into the artifact. Each method's file
//! holds its settings type too (name, default learning rate, hyperparameters); the
//! `registry!` below is the only list of methods (adding one = its file, a `pub mod` line and
//! one line there), and [`registry`] resolves requests against it.

pub mod full;
pub mod lora;
pub mod registry;
pub mod sparsegrad;

use std::collections::BTreeMap;

use candle_core::{backprop::GradStore, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::models::{Model, ParamShape};
use crate::optim::{clip_scale, grad_norm, AdamConfig, AdamW};
use crate::{Error, Result};
use registry::{parse_at, Footprint, MethodConfig, MethodInfo};

pub use full::{Full, FullConfig};
pub use lora::{Lora, LoraConfig, LoraTargets};
pub use registry::{resolve, Resolved, DEFAULT_METHOD};
pub use sparsegrad::{BasisDtype, Fidelity, MePropConfig, SparseGradConfig, SparseMlp, Support};

/// Declares the methods: `MethodSpec` (a method with its settings, tagged by name as jobs
/// store it) and the dispatch from a name or a spec to its settings type. One line per method.
macro_rules! registry {
    ($($variant:ident($config:ty)),+ $(,)?) => {
        /// Method hyperparameters as submitted (CLI flags or the API's `method` object).
        #[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
        #[serde(tag = "type", rename_all = "snake_case")]
        pub enum MethodSpec {
            $($variant($config)),+
        }

        /// Every method, in listing order.
        pub const METHODS: &[MethodInfo] = &[$(<$config as MethodConfig>::INFO),+];

        impl MethodSpec {
            pub fn info(&self) -> &'static MethodInfo {
                match self {
                    $(MethodSpec::$variant(_) => &<$config as MethodConfig>::INFO),+
                }
            }
            /// The settings as JSON (what `hyperparameters` echoes).
            pub fn settings(&self) -> Value {
                match self {
                    $(MethodSpec::$variant(c) => serde_json::to_value(c)),+
                }
                .expect("serialisable")
            }
            pub fn footprint(&self, shape: &ParamShape) -> Footprint {
                match self {
                    $(MethodSpec::$variant(c) => c.footprint(shape)),+
                }
            }
            fn build_checked(&self, adam: AdamConfig) -> Box<dyn Method> {
                match self {
                    $(MethodSpec::$variant(c) => c.build(adam)),+
                }
            }
            /// `name`'s settings from a JSON object, each error with its path inside it.
            fn parse(name: &str, hyperparameters: Value) -> Option<Result<MethodSpec>> {
                $(
                    if name == <$config as MethodConfig>::INFO.name {
                        return Some(parse_at::<$config>(hyperparameters, "").map(MethodSpec::$variant));
                    }
                )+
                None
            }
            /// `name`'s default settings as JSON.
            fn defaults(name: &str) -> Option<Value> {
                $(
                    if name == <$config as MethodConfig>::INFO.name {
                        return Some(serde_json::to_value(<$config>::default()).expect("serialisable"));
                    }
                )+
                None
            }
        }
    };
}

registry! {
    Full(FullConfig),
    Lora(LoraConfig),
    Sparsegrad(SparseGradConfig),
    Meprop(MePropConfig),
}

/// What trains densely besides a method's MLP update (sparse matrices or adapters).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// The task head only.
    Head,
    /// The task head, the MLP linears' biases and the normalisation layers: tiny (0.1% of
    /// MiniLM-L6), they let the model re-centre and rescale around its MLP update.
    #[default]
    Mlp,
    /// Every parameter outside the MLP weight matrices, as in the paper's GLUE runs.
    Paper,
}

impl Scope {
    /// The parameters trained densely: `mlp_layers` says which blocks' MLPs the method
    /// trains (their biases join in `mlp` scope); `exclude` holds the method's own
    /// parameters (adapters).
    pub fn dense_params(
        self,
        model: &Model,
        mlp_layers: impl Fn(usize) -> bool,
        exclude: &std::collections::HashSet<String>,
    ) -> Vec<String> {
        let mut names = match self {
            Scope::Head => model.head_params(),
            Scope::Mlp => {
                let mut n = model.head_params();
                n.extend(model.mlp_extra_params(mlp_layers));
                n
            }
            Scope::Paper => {
                let mlp: std::collections::HashSet<String> = model
                    .mlp_linears()
                    .into_iter()
                    .map(|(p, _, _)| format!("{p}.weight"))
                    .collect();
                model
                    .weights
                    .params
                    .keys()
                    .filter(|n| !mlp.contains(*n))
                    .cloned()
                    .collect()
            }
        };
        names.retain(|n| !exclude.contains(n) && model.weights.contains(n));
        names.sort();
        names.dedup();
        names
    }

    /// Dense parameters beside the head, for estimates (`paper` counts every non-MLP one).
    pub fn extra_params(self, shape: &ParamShape) -> u64 {
        match self {
            Scope::Head => 0,
            Scope::Mlp => shape.mlp_scope_extra(),
            Scope::Paper => shape.params() - shape.mlp_params(),
        }
    }

    /// The learning-rate multiplier for dense parameters when none is given: the paper scope
    /// trains a whole model's worth at the sparse methods' ~10× rate otherwise.
    pub fn default_dense_lr_scale(self) -> f64 {
        match self {
            Scope::Head | Scope::Mlp => 1.0,
            Scope::Paper => 0.1,
        }
    }
}

/// How an artifact tensor is applied to the base model.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeltaEntry {
    /// The tensor replaces the base parameter of the same name (trained dense params, new heads).
    Dense { param: String },
    /// `W += scale · B · A` on the named linear.
    Lora { linear: String, scale: f64 },
    /// A sparse update of `param` in a rotated basis: `W += P S Qᵀ`, `S` given by
    /// `{param}.sparse_indices` (int32 in memory, `(2, k)`: row, col; the file may narrow
    /// them to int16) and `{param}.sparse_values`
    /// (`(k,)`); `P`, `Q` are the basis tensors of `basis` (absent for MeProp: `W += S`).
    Sparse {
        param: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        basis: Option<crate::models::MlpKind>,
    },
    /// One side of a SparseGrad basis: `P` (out×out) or `Q` (in×in) of a matrix type (in
    /// memory; the file keeps only the columns the supports use, see `artifact`).
    Basis {
        mlp_kind: crate::models::MlpKind,
        side: BasisSide,
    },
    /// The tensor is added to the base parameter (a dense change, e.g. SparseGrad's basis
    /// phase when it updates the weights as the paper's code does).
    Add { param: String },
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum BasisSide {
    P,
    Q,
}

/// What the trainer gives a method's [`Method::calibrate`].
pub struct Calibration<'a> {
    /// The run's base learning rate.
    pub lr: f64,
    /// The run's gradient-clipping norm, for the optimizer steps calibration takes.
    pub max_grad_norm: Option<f64>,
    /// A cache folder and a key naming the data, order and settings the calibration batches
    /// come from; `None` disables caching.
    pub cache: Option<(std::path::PathBuf, String)>,
    /// `backward(model, i)` runs the forward and backward pass of the `i`-th training
    /// micro-batch (the first batches of the first epoch) and returns its gradients.
    pub backward: &'a mut dyn FnMut(&Model, usize) -> Result<GradStore>,
}

pub trait Method: Send {
    /// `full`, `lora`, ...
    fn name(&self) -> &'static str;
    fn hyperparameters(&self) -> serde_json::Value;
    /// Freezes, unfreezes and attaches adapters. `seed` drives any new initialisation.
    fn prepare(&mut self, model: &mut Model, seed: u64) -> Result<()>;
    /// Runs once before the first step of a fresh (not resumed) run, for methods that need
    /// gradient statistics first (SparseGrad's basis phase).
    fn calibrate(&mut self, _model: &mut Model, _cal: Calibration<'_>) -> Result<()> {
        Ok(())
    }
    /// Called before each optimizer step's micro-batches run (0-based step).
    fn begin_step(&mut self, _step: usize, _micro_batches: usize) -> Result<()> {
        Ok(())
    }
    /// Adds one micro-batch's gradients to the running sums.
    fn accumulate(&mut self, model: &Model, grads: GradStore) -> Result<()>;
    /// Applies the accumulated update at learning rate `lr`; returns the pre-clipping norm.
    fn step(&mut self, model: &mut Model, lr: f64, max_grad_norm: Option<f64>) -> Result<f64>;
    /// Everything needed to resume: trained values and optimizer state.
    fn state(&self, model: &Model) -> Result<(BTreeMap<String, Tensor>, u64)>;
    fn load_state(
        &mut self,
        model: &mut Model,
        state: &BTreeMap<String, Tensor>,
        t: u64,
    ) -> Result<()>;
    /// Parameters this method trains (SparseGrad counts k per sparse matrix).
    fn trainable_count(&self, model: &Model) -> usize {
        model.weights.num_params(true)
    }
    /// Numbers of optimizer state held (moments, master copies).
    fn optimizer_state_len(&self) -> usize;
    /// The share of the last step's gradient energy the update kept (sparse methods), when
    /// that step measured it.
    fn grad_energy(&self) -> Option<f64> {
        None
    }
    /// Method-specific figures for the run summary (e.g. how much a dynamic support touched).
    fn stats(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Artifact tensors and how each applies to the base model.
    fn delta(
        &self,
        model: &Model,
    ) -> Result<(BTreeMap<String, Tensor>, BTreeMap<String, DeltaEntry>)>;
}

/// Every trainable parameter as a dense artifact tensor replacing the base one.
pub fn dense_delta(model: &Model) -> (BTreeMap<String, Tensor>, BTreeMap<String, DeltaEntry>) {
    let mut tensors = BTreeMap::new();
    let mut entries = BTreeMap::new();
    for (name, var) in model.weights.trainable() {
        tensors.insert(name.clone(), var.as_tensor().detach());
        entries.insert(name.clone(), DeltaEntry::Dense { param: name });
    }
    (tensors, entries)
}

/// The dense half most methods share: AdamW over the model's trainable `Var`s with gradient
/// accumulation and global-norm clipping.
pub struct DenseTrainer {
    pub opt: Option<AdamW>,
    pub adam: AdamConfig,
    acc: BTreeMap<String, Tensor>,
}

impl DenseTrainer {
    pub fn new(adam: AdamConfig) -> Self {
        DenseTrainer {
            opt: None,
            adam,
            acc: BTreeMap::new(),
        }
    }

    pub fn init(&mut self, model: &Model) -> Result<()> {
        self.opt = Some(AdamW::new(model.weights.trainable(), self.adam.clone())?);
        Ok(())
    }

    /// [`Self::init`] with a learning-rate multiplier per parameter.
    pub fn init_scaled(&mut self, model: &Model, scale: impl Fn(&str) -> f64) -> Result<()> {
        self.opt =
            Some(AdamW::new(model.weights.trainable(), self.adam.clone())?.with_lr_scales(scale));
        Ok(())
    }

    pub fn accumulate(&mut self, model: &Model, grads: &GradStore) -> Result<()> {
        for (name, var) in model.weights.trainable() {
            if let Some(g) = grads.get(var.as_tensor()) {
                let g = g.detach();
                let e = match self.acc.remove(&name) {
                    Some(prev) => (prev + g)?,
                    None => g,
                };
                self.acc.insert(name, e);
            }
        }
        Ok(())
    }

    pub fn step(&mut self, lr: f64, max_grad_norm: Option<f64>) -> Result<f64> {
        let grads = self.take();
        let norm = grad_norm(&grads)?;
        self.apply(&grads, lr, clip_scale(norm, max_grad_norm))?;
        Ok(norm)
    }

    /// The accumulated gradients, leaving the sums empty (for methods that clip jointly with
    /// gradients of their own).
    pub fn take(&mut self) -> BTreeMap<String, Tensor> {
        std::mem::take(&mut self.acc)
    }

    pub fn apply(&mut self, grads: &BTreeMap<String, Tensor>, lr: f64, gscale: f64) -> Result<()> {
        self.opt
            .as_mut()
            .ok_or_else(|| Error::Other("optimizer used before prepare".into()))?
            .step_scaled(grads, lr, gscale)
    }

    pub fn state_len(&self) -> usize {
        self.opt.as_ref().map_or(0, AdamW::state_len)
    }

    pub fn state(&self, model: &Model) -> Result<(BTreeMap<String, Tensor>, u64)> {
        let opt = self
            .opt
            .as_ref()
            .ok_or_else(|| Error::Other("no optimizer".into()))?;
        let mut out: BTreeMap<String, Tensor> = opt
            .state()
            .into_iter()
            .map(|(k, v)| (format!("optimizer.{k}"), v))
            .collect();
        for (name, var) in model.weights.trainable() {
            out.insert(format!("param.{name}"), var.as_tensor().detach());
        }
        Ok((out, opt.t))
    }

    pub fn load_state(
        &mut self,
        model: &mut Model,
        state: &BTreeMap<String, Tensor>,
        t: u64,
    ) -> Result<()> {
        for (name, var) in model.weights.trainable() {
            let v = state
                .get(&format!("param.{name}"))
                .ok_or_else(|| Error::Artifact(format!("checkpoint lacks `{name}`")))?;
            var.set(&v.to_device(var.device())?.to_dtype(var.dtype())?)?;
        }
        let opt_state: BTreeMap<String, Tensor> = state
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("optimizer.")
                    .map(|k| (k.to_string(), v.clone()))
            })
            .collect();
        self.opt
            .as_mut()
            .ok_or_else(|| Error::Other("optimizer used before prepare".into()))?
            .load_state(&opt_state, t)
    }
}
