use std::collections::BTreeMap;

use candle_core::{backprop::GradStore, Tensor};
use serde::{Deserialize, Serialize};

use super::registry::{Footprint, MethodConfig, MethodInfo};
use super::{DeltaEntry, DenseTrainer, Method};
use crate::models::{Model, ParamShape};
use crate::optim::AdamConfig;
use crate::Result;

/// Full fine-tuning has no settings of its own.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FullConfig {}

impl MethodConfig for FullConfig {
    const INFO: MethodInfo = MethodInfo {
        name: "full",
        description: "Every parameter trains with AdamW; the artifact holds every tensor.",
        default_lr: 5e-5,
        hyperparameters: &[],
    };
    fn build(&self, adam: AdamConfig) -> Box<dyn Method> {
        Box::new(Full::new(adam))
    }
    fn footprint(&self, shape: &ParamShape) -> Footprint {
        Footprint {
            trainable: shape.params(),
            // Encoders' linears have biases: a trained one keeps the product before its bias
            // (q, k, v, o, down: 5h; up: f).
            kept_per_token_layer: if shape.mlp_matrices == 2 {
                5 * shape.hidden + shape.ffn
            } else {
                0
            },
            ..Default::default()
        }
    }
}

/// Full fine-tuning: every parameter trains with AdamW; the artifact holds every tensor.
pub struct Full {
    dense: DenseTrainer,
}

impl Full {
    pub fn new(adam: AdamConfig) -> Self {
        Full {
            dense: DenseTrainer::new(adam),
        }
    }
}

impl Method for Full {
    fn name(&self) -> &'static str {
        "full"
    }
    fn hyperparameters(&self) -> serde_json::Value {
        serde_json::json!({})
    }
    fn prepare(&mut self, model: &mut Model, _seed: u64) -> Result<()> {
        let names: Vec<String> = model.weights.params.keys().cloned().collect();
        for n in names {
            model.weights.set_trainable(&n, true)?;
        }
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
        Ok(super::dense_delta(model))
    }
}
