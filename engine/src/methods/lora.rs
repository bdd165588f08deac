use std::collections::BTreeMap;

use candle_core::{backprop::GradStore, Tensor};
use rand_distr::{Distribution, Uniform};
use serde::{Deserialize, Serialize};

use super::{DeltaEntry, DenseTrainer, Method};
use crate::models::Model;
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
}

impl std::str::FromStr for LoraTargets {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mlp" => Ok(LoraTargets::Mlp),
            "attention" => Ok(LoraTargets::Attention),
            "all" => Ok(LoraTargets::All),
            o => Err(Error::param(
                "targets",
                format!("unknown LoRA targets `{o}` (mlp, attention, all)"),
            )),
        }
    }
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
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: default_r(),
            alpha: default_alpha(),
            dropout: 0.0,
            targets: LoraTargets::Mlp,
        }
    }
}

impl LoraConfig {
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 || self.r > 1024 {
            return Err(Error::param("r", "must be between 1 and 1024"));
        }
        if !(self.alpha > 0.0 && self.alpha.is_finite()) {
            return Err(Error::param("alpha", "must be a positive number"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::param("dropout", "must be in [0, 1)"));
        }
        Ok(())
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
        for h in model.head_params() {
            model.weights.set_trainable(&h, true)?;
        }
        self.linears = linears;
        self.dense.init(model)
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
        for h in model.head_params() {
            tensors.insert(h.clone(), model.weights.get(&h)?.detach());
            entries.insert(h.clone(), DeltaEntry::Dense { param: h });
        }
        Ok((tensors, entries))
    }
}
