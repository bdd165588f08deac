use std::collections::BTreeMap;

use candle_core::{backprop::GradStore, Tensor};
use rand_distr::{Distribution, Uniform};
use serde::{Deserialize, Serialize};

use super::registry::{Bound, Footprint, Hyper, MethodConfig, MethodInfo};
use super::{DeltaEntry, DenseTrainer, Method, Scope};
use crate::models::{Model, ParamShape};
use crate::nn::{Adapter, Param};
use crate::optim::AdamConfig;
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LoraTargets {
    #[default]
    Mlp,
    Attention,
    All,
    /// No adapters: only what the scope trains densely (the head-only baseline).
    None,
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    16.0
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    #[serde(default = "default_r")]
    pub r: usize,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default)]
    pub targets: LoraTargets,
    /// What trains densely besides the adapters — the same choices as SparseGrad's, so the two
    /// compare like for like.
    #[serde(default)]
    pub scope: Scope,
    #[serde(default)]
    pub dense_lr_scale: Option<f64>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: default_r(),
            alpha: default_alpha(),
            dropout: 0.0,
            targets: LoraTargets::Mlp,
            scope: Scope::default(),
            dense_lr_scale: None,
        }
    }
}

impl MethodConfig for LoraConfig {
    const INFO: MethodInfo = MethodInfo {
        name: "lora",
        description: "LoRA (Hu et al. 2021): frozen weights plus a trained low-rank update B·A on \
                      the target linears; the task head trains densely.",
        default_lr: 5e-4,
        hyperparameters: &[
            Hyper::integer("r", "rank of the update")
                .min(Bound::Incl(1.0))
                .max(Bound::Incl(1024.0)),
            Hyper::number("alpha", "scale: the update is multiplied by alpha / r")
                .min(Bound::Excl(0.0))
                .max(Bound::Incl(1e4)),
            Hyper::number("dropout", "dropout on the adapter's input")
                .min(Bound::Incl(0.0))
                .max(Bound::Excl(1.0)),
            Hyper::choice(
                "targets",
                &["mlp", "attention", "all", "none"],
                "which linears get adapters (none: only the head, or the paper scope, trains)",
            ),
            Hyper::choice(
                "scope",
                &["head", "mlp", "paper"],
                "what trains densely besides the adapters, as for SparseGrad: the task head \
                 (head), plus the MLP biases and normalisation layers (mlp), or every parameter \
                 outside the MLP matrices (paper)",
            ),
            Hyper::number(
                "dense_lr_scale",
                "learning-rate multiplier for the densely trained parameters (default 1 in head \
                 and mlp scope, 0.1 in paper scope)",
            )
            .min(Bound::Excl(0.0))
            .max(Bound::Incl(1e3))
            .nullable(),
        ],
    };
    fn build(&self, adam: AdamConfig) -> Box<dyn Method> {
        Box::new(Lora::new(self.clone(), adam))
    }
    fn footprint(&self, shape: &ParamShape) -> Footprint {
        // Adapters on the MLP matrices (the default targets): r·(in + out) each.
        Footprint {
            trainable: shape.layers
                * shape.mlp_matrices
                * self.r as u64
                * (shape.hidden + shape.ffn)
                + self.scope.extra_params(shape),
            // With dropout, the fused LoRA node keeps the mask of each adapted input.
            kept_per_token_layer: if self.dropout > 0.0 {
                let (h, f) = (shape.hidden, shape.ffn);
                let mlp_in = (shape.mlp_matrices - 1) * h + f;
                match self.targets {
                    LoraTargets::Mlp => mlp_in,
                    LoraTargets::Attention => 4 * h,
                    LoraTargets::All => mlp_in + 4 * h,
                    LoraTargets::None => 0,
                }
            } else {
                0
            },
            ..Default::default()
        }
    }
}

/// LoRA (Hu et al.): frozen `W`, trainable `A (r×in)` (Kaiming-uniform, as PEFT) and
/// `B (out×r)` (zeros) on the target linears; the task head, if any, trains densely.
pub struct Lora {
    cfg: LoraConfig,
    dense: DenseTrainer,
    linears: Vec<String>,
}

impl Lora {
    pub fn new(cfg: LoraConfig, adam: AdamConfig) -> Self {
        Lora {
            cfg,
            dense: DenseTrainer::new(adam),
            linears: Vec::new(),
        }
    }
    pub fn scale(&self) -> f64 {
        self.cfg.alpha / self.cfg.r as f64
    }
}

impl Method for Lora {
    fn name(&self) -> &'static str {
        "lora"
    }
    fn hyperparameters(&self) -> serde_json::Value {
        serde_json::to_value(&self.cfg).expect("serialisable")
    }
    fn prepare(&mut self, model: &mut Model, seed: u64) -> Result<()> {
        model.weights.freeze_all()?;
        let mut linears: Vec<String> = Vec::new();
        if matches!(self.cfg.targets, LoraTargets::Mlp | LoraTargets::All) {
            linears.extend(model.mlp_linears().into_iter().map(|(p, _, _)| p));
        }
        if matches!(self.cfg.targets, LoraTargets::Attention | LoraTargets::All) {
            linears.extend(model.attention_linears());
        }
        let r = self.cfg.r;
        let w = &mut model.weights;
        for (i, prefix) in linears.iter().enumerate() {
            let base = w.get(&format!("{prefix}.weight"))?;
            let (out, inp) = base.dims2()?;
            let bound = 1.0 / (inp as f32).sqrt();
            let mut rng = crate::rng::stream(seed, "lora-init", i as u64);
            let u = Uniform::new(-bound, bound).map_err(|e| Error::Other(e.to_string()))?;
            let a: Vec<f32> = (0..r * inp).map(|_| u.sample(&mut rng)).collect();
            let a = Tensor::from_vec(a, (r, inp), &w.device)?.to_dtype(w.dtype)?;
            let b = Tensor::zeros((out, r), w.dtype, &w.device)?;
            w.insert(format!("{prefix}.lora_A.weight"), Param::Frozen(a));
            w.insert(format!("{prefix}.lora_B.weight"), Param::Frozen(b));
            w.set_trainable(&format!("{prefix}.lora_A.weight"), true)?;
            w.set_trainable(&format!("{prefix}.lora_B.weight"), true)?;
            w.adapters.insert(
                prefix.clone(),
                Adapter::Lora {
                    scale: self.scale(),
                    dropout: self.cfg.dropout,
                },
            );
        }
        let adapters: std::collections::HashSet<String> = linears
            .iter()
            .flat_map(|p| [format!("{p}.lora_A.weight"), format!("{p}.lora_B.weight")])
            .collect();
        let dense = self.cfg.scope.dense_params(model, |_| true, &adapters);
        for h in dense {
            model.weights.set_trainable(&h, true)?;
        }
        self.linears = linears;
        let scale = self
            .cfg
            .dense_lr_scale
            .unwrap_or(self.cfg.scope.default_dense_lr_scale());
        self.dense
            .init_scaled(model, |n| if adapters.contains(n) { 1.0 } else { scale })
    }
    fn accumulate(&mut self, model: &Model, grads: GradStore) -> Result<()> {
        self.dense.accumulate(model, &grads)
    }
    fn step(&mut self, _model: &mut Model, lr: f64, max_grad_norm: Option<f64>) -> Result<f64> {
        self.dense.step(lr, max_grad_norm)
    }
    fn optimizer_state_len(&self) -> usize {
        self.dense.state_len()
    }
    fn state(&self, model: &Model) -> Result<(BTreeMap<String, Tensor>, u64)> {
        self.dense.state(model)
    }
    fn load_state(
        &mut self,
        model: &mut Model,
        state: &BTreeMap<String, Tensor>,
        t: u64,
    ) -> Result<()> {
        self.dense.load_state(model, state, t)
    }
    fn delta(
        &self,
        model: &Model,
    ) -> Result<(BTreeMap<String, Tensor>, BTreeMap<String, DeltaEntry>)> {
        let mut tensors = BTreeMap::new();
        let mut entries = BTreeMap::new();
        let scale = self.scale();
        for p in &self.linears {
            for ab in ["lora_A", "lora_B"] {
                let n = format!("{p}.{ab}.weight");
                tensors.insert(n.clone(), model.weights.get(&n)?.detach());
                entries.insert(
                    n,
                    DeltaEntry::Lora {
                        linear: p.clone(),
                        scale,
                    },
                );
            }
        }
        // Whatever else trained densely: the head, and in paper scope every non-MLP parameter.
        for (h, v) in model.weights.trainable() {
            if !tensors.contains_key(&h) {
                tensors.insert(h.clone(), v.as_tensor().detach());
                entries.insert(h.clone(), DeltaEntry::Dense { param: h });
            }
        }
        Ok((tensors, entries))
    }
}
