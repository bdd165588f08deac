use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use rand_chacha::ChaCha8Rng;

use super::linear::WeightGradHook;
use crate::{Error, Result};

/// A named parameter: frozen tensors take part in forward and input gradients only;
/// trainable ones are candle `Var`s that receive gradients.
#[derive(Clone, Debug)]
pub enum Param {
    Frozen(Tensor),
    Trainable(Var),
}

impl Param {
    pub fn tensor(&self) -> &Tensor {
        match self {
            Param::Frozen(t) => t,
            Param::Trainable(v) => v.as_tensor(),
        }
    }
    pub fn is_trainable(&self) -> bool {
        matches!(self, Param::Trainable(_))
    }
}

/// What is attached to one linear layer besides its own weight.
#[derive(Clone)]
pub enum Adapter {
    /// LoRA: `y += dropout(x) Aᵀ Bᵀ · alpha/r`; A and B live in [`Weights::params`] as
    /// `{prefix}.lora_A.weight` and `{prefix}.lora_B.weight`.
    Lora { scale: f64, dropout: f64 },
    /// The frozen weight's gradient goes to a method-owned hook instead of a GradStore.
    Hook(Arc<dyn WeightGradHook>),
    /// A served fine-tune's sparse update, applied in the forward pass: `y += x (P S Qᵀ)ᵀ`
    /// without ever forming `P S Qᵀ` (see [`crate::serve`]).
    Sparse(Arc<crate::serve::SparseDelta>),
}

/// Every parameter of a model under its canonical Hugging Face name, plus per-linear adapters.
/// Models keep names, not tensors, so a method can freeze, unfreeze or adapt any layer by name.
pub struct Weights {
    pub params: BTreeMap<String, Param>,
    pub adapters: HashMap<String, Adapter>,
    pub device: Device,
    pub dtype: DType,
}

/// Per-forward context: training mode draws dropout masks from a seeded stream.
pub struct Ctx {
    pub rng: Option<ChaCha8Rng>,
    /// Whether the model's own dropout layers are active (adapter dropout is whenever `rng` is set).
    pub model_dropout: bool,
    /// Inference: the forward runs on detached weights, so no autograd graph keeps every
    /// layer's intermediates alive until the output is dropped (trained `Var`s would).
    pub no_grad: bool,
}

impl Weights {
    pub fn new(params: BTreeMap<String, Tensor>, device: Device, dtype: DType) -> Self {
        Weights {
            params: params
                .into_iter()
                .map(|(k, v)| (k, Param::Frozen(v)))
                .collect(),
            adapters: HashMap::new(),
            device,
            dtype,
        }
    }

    /// The same weights with every trainable one detached (storage shared): a forward over
    /// them builds no autograd graph.
    pub fn detached(&self) -> Weights {
        Weights {
            params: self
                .params
                .iter()
                .map(|(k, p)| (k.clone(), Param::Frozen(p.tensor().detach())))
                .collect(),
            adapters: self.adapters.clone(),
            device: self.device.clone(),
            dtype: self.dtype,
        }
    }

    pub fn has_trainable(&self) -> bool {
        self.params.values().any(Param::is_trainable)
    }

    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.params
            .get(name)
            .map(Param::tensor)
            .ok_or_else(|| Error::Model(format!("missing weight `{name}`")))
    }

    pub fn get_opt(&self, name: &str) -> Option<&Tensor> {
        self.params.get(name).map(Param::tensor)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.params.contains_key(name)
    }

    pub fn insert(&mut self, name: impl Into<String>, p: Param) {
        self.params.insert(name.into(), p);
    }

    /// Turns a parameter into a trainable `Var` (or back into a frozen tensor).
    pub fn set_trainable(&mut self, name: &str, trainable: bool) -> Result<()> {
        let p = self
            .params
            .get_mut(name)
            .ok_or_else(|| Error::Model(format!("missing weight `{name}`")))?;
        *p = match (&*p, trainable) {
            (Param::Frozen(t), true) => Param::Trainable(Var::from_tensor(t)?),
            (Param::Trainable(v), false) => Param::Frozen(v.as_tensor().detach()),
            (other, _) => other.clone(),
        };
        Ok(())
    }

    pub fn freeze_all(&mut self) -> Result<()> {
        let names: Vec<String> = self.params.keys().cloned().collect();
        for n in names {
            self.set_trainable(&n, false)?;
        }
        Ok(())
    }

    /// Trainable parameters in name order (the order optimizer state is saved in).
    pub fn trainable(&self) -> Vec<(String, Var)> {
        self.params
            .iter()
            .filter_map(|(k, p)| match p {
                Param::Trainable(v) => Some((k.clone(), v.clone())),
                Param::Frozen(_) => None,
            })
            .collect()
    }

    pub fn num_params(&self, only_trainable: bool) -> usize {
        self.params
            .values()
            .filter(|p| !only_trainable || p.is_trainable())
            .map(|p| p.tensor().elem_count())
            .sum()
    }

    /// `y = x Wᵀ + b` over the last dimension, with the layer's adapter if any.
    pub fn linear(&self, prefix: &str, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let w = self
            .params
            .get(&format!("{prefix}.weight"))
            .ok_or_else(|| Error::Model(format!("missing weight `{prefix}.weight`")))?;
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().unwrap();
        let x2 = x.reshape(((), in_dim))?;
        let adapter = self.adapters.get(prefix);
        let bias = self.get_opt(&format!("{prefix}.bias"));
        let hook = match adapter {
            // Hooks collect weight gradients: only while training.
            Some(Adapter::Hook(h)) if ctx.rng.is_some() => Some(h.clone()),
            _ => None,
        };
        let lora = match adapter {
            Some(Adapter::Lora { scale, dropout }) => Some((*scale, *dropout)),
            _ => None,
        };
        let y = match (w, lora) {
            // LoRA on a frozen weight: one node that keeps only its output for backward.
            (Param::Frozen(t), Some((scale, dropout))) => {
                let a = self.get(&format!("{prefix}.lora_A.weight"))?;
                let b = self.get(&format!("{prefix}.lora_B.weight"))?;
                let mask = match ctx.rng.as_mut() {
                    Some(rng) => super::dropout_mask(&x2, dropout, rng)?,
                    None => None,
                };
                super::linear::lora_linear(&x2, t, bias, a, b, scale, mask)?
            }
            (w, lora) => {
                let mut y = match w {
                    Param::Trainable(v) => {
                        let y = x2.matmul(&v.as_tensor().t()?)?;
                        match bias {
                            Some(b) => super::fused::bias_add(&y, b)?,
                            None => y,
                        }
                    }
                    Param::Frozen(t) => super::linear::frozen_linear_bias(&x2, t, bias, hook)?,
                };
                if let Some((scale, dropout)) = lora {
                    let xd = match ctx.rng.as_mut() {
                        Some(rng) => super::dropout(&x2, dropout, rng)?,
                        None => x2.clone(),
                    };
                    y = (y + self.lora_delta(prefix, &xd, scale)?)?;
                }
                if let Some(Adapter::Sparse(d)) = adapter {
                    y = (y + d.apply(&x2)?)?;
                }
                y
            }
        };
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = y.dim(1)?;
        Ok(y.reshape(out_dims)?)
    }

    /// `s · (x Aᵀ) Bᵀ`: a LoRA adapter's contribution (the rank-r product scaled, not the
    /// full-width one).
    fn lora_delta(&self, prefix: &str, x2: &Tensor, scale: f64) -> Result<Tensor> {
        let a = self.get(&format!("{prefix}.lora_A.weight"))?;
        let b = self.get(&format!("{prefix}.lora_B.weight"))?;
        Ok((x2.matmul(&a.t()?)? * scale)?.matmul(&b.t()?)?)
    }

    /// What the layer's adapter adds to `x2 Wᵀ (+ b)` at inference (`x2`: `(rows, in)`), if
    /// it has one that adds anything then.
    pub fn adapter_delta(&self, prefix: &str, x2: &Tensor) -> Result<Option<Tensor>> {
        Ok(match self.adapters.get(prefix) {
            Some(Adapter::Lora { scale, .. }) => Some(self.lora_delta(prefix, x2, *scale)?),
            Some(Adapter::Sparse(d)) => Some(d.apply(x2)?),
            Some(Adapter::Hook(_)) | None => None,
        })
    }

    pub fn embedding(&self, name: &str, ids: &Tensor) -> Result<Tensor> {
        let table = self.get(name)?;
        let dims = ids.dims().to_vec();
        let flat = table.index_select(&ids.flatten_all()?, 0)?;
        let mut out = dims;
        out.push(table.dim(1)?);
        Ok(flat.reshape(out)?)
    }

    pub fn layer_norm(&self, prefix: &str, x: &Tensor, eps: f64) -> Result<Tensor> {
        super::layer_norm(
            x,
            self.get(&format!("{prefix}.weight"))?,
            self.get(&format!("{prefix}.bias"))?,
            eps,
        )
    }

    pub fn rms_norm(&self, prefix: &str, x: &Tensor, eps: f64) -> Result<Tensor> {
        super::rms_norm(x, self.get(&format!("{prefix}.weight"))?, eps)
    }

    /// A detached snapshot of every parameter (for saving, merging and comparisons).
    pub fn snapshot(&self) -> BTreeMap<String, Tensor> {
        self.params
            .iter()
            .map(|(k, p)| (k.clone(), p.tensor().detach()))
            .collect()
    }
}

impl Ctx {
    /// No dropout; gradients still flow (gradient checks run in this mode).
    pub fn eval() -> Self {
        Ctx {
            rng: None,
            model_dropout: false,
            no_grad: false,
        }
    }
    /// Evaluation and prediction: no dropout and no graph.
    pub fn inference() -> Self {
        Ctx {
            no_grad: true,
            ..Self::eval()
        }
    }
    pub fn train(rng: ChaCha8Rng, model_dropout: bool) -> Self {
        Ctx {
            rng: Some(rng),
            model_dropout,
            no_grad: false,
        }
    }
    pub fn dropout(&mut self, x: &Tensor, p: f64) -> Result<Tensor> {
        match self.rng.as_mut() {
            Some(rng) if p > 0.0 && self.model_dropout => super::dropout(x, p, rng),
            _ => Ok(x.clone()),
        }
    }
}
