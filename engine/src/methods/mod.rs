//! Fine-tuning methods behind one trait the trainer drives. A method decides what trains
//! (freezing, adapters, gradient hooks), turns accumulated gradients into updates, keeps its
//! optimizer state for checkpoints, and says what goes into the artifact.

pub mod full;
pub mod lora;
pub mod sparsegrad;

use std::collections::BTreeMap;

use candle_core::{backprop::GradStore, Tensor};
use serde::{Deserialize, Serialize};

use crate::models::Model;
use crate::optim::{clip_scale, grad_norm, AdamConfig, AdamW};
use crate::{Error, Result};

pub use full::Full;
pub use lora::{Lora, LoraConfig, LoraTargets};

/// How an artifact tensor is applied to the base model.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeltaEntry {
    /// The tensor replaces the base parameter of the same name (trained dense params, new heads).
    Dense { param: String },
    /// `W += scale · B · A` on the named linear.
    Lora { linear: String, scale: f64 },
}

pub trait Method: Send {
    /// `full`, `lora`, ...
    fn name(&self) -> &'static str;
    fn hyperparameters(&self) -> serde_json::Value;
    /// Freezes, unfreezes and attaches adapters. `seed` drives any new initialisation.
    fn prepare(&mut self, model: &mut Model, seed: u64) -> Result<()>;
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
    /// Artifact tensors and how each applies to the base model.
    fn delta(
        &self,
        model: &Model,
    ) -> Result<(BTreeMap<String, Tensor>, BTreeMap<String, DeltaEntry>)>;
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
        let grads = std::mem::take(&mut self.acc);
        let norm = grad_norm(&grads)?;
        self.opt
            .as_mut()
            .ok_or_else(|| Error::Other("optimizer used before prepare".into()))?
            .step_scaled(&grads, lr, clip_scale(norm, max_grad_norm))?;
        Ok(norm)
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

/// Method hyperparameters as submitted (CLI flags or the API's `method` object).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MethodSpec {
    Full,
    Lora(LoraConfig),
}

impl MethodSpec {
    pub fn build(&self, adam: AdamConfig) -> Result<Box<dyn Method>> {
        Ok(match self {
            MethodSpec::Full => Box::new(Full::new(adam)),
            MethodSpec::Lora(c) => {
                c.validate()?;
                Box::new(Lora::new(c.clone(), adam))
            }
        })
    }
    pub fn name(&self) -> &'static str {
        match self {
            MethodSpec::Full => "full",
            MethodSpec::Lora(_) => "lora",
        }
    }
}
