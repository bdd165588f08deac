//! AdamW over named dense parameters, learning-rate schedules and gradient clipping.
//! Moments (and, for bf16 parameters, an f32 master copy) are kept in f32.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AdamConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

struct Slot {
    var: Var,
    decay: bool,
    m: Tensor,
    v: Tensor,
    master: Option<Tensor>,
}

/// AdamW as in PyTorch (decoupled decay, bias-corrected moments). Biases and norm weights —
/// every 1-D parameter — get no weight decay.
pub struct AdamW {
    cfg: AdamConfig,
    slots: BTreeMap<String, Slot>,
    pub t: u64,
}

/// Whether a parameter is decayed: matrices yes, biases and norm weights (1-D) no.
pub fn decays(name: &str, t: &Tensor) -> bool {
    t.rank() >= 2 && !name.ends_with(".bias")
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, cfg: AdamConfig) -> Result<Self> {
        let mut slots = BTreeMap::new();
        for (name, var) in params {
            let t = var.as_tensor();
            let m = Tensor::zeros(t.shape(), DType::F32, t.device())?;
            let master = if t.dtype() != DType::F32 {
                Some(t.to_dtype(DType::F32)?)
            } else {
                None
            };
            slots.insert(
                name.clone(),
                Slot {
                    decay: decays(&name, t),
                    v: m.clone(),
                    m,
                    master,
                    var,
                },
            );
        }
        Ok(AdamW { cfg, slots, t: 0 })
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.slots.keys()
    }

    /// One update with gradients by name (missing = zero gradient, parameter still decays).
    pub fn step(&mut self, grads: &BTreeMap<String, Tensor>, lr: f64) -> Result<()> {
        self.t += 1;
        let c = &self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (name, s) in self.slots.iter_mut() {
            let p32 = match &s.master {
                Some(m) => m.clone(),
                None => s.var.as_tensor().detach(),
            };
            let mut p = p32;
            if s.decay && c.weight_decay > 0.0 {
                p = (&p * (1.0 - lr * c.weight_decay))?;
            }
            if let Some(g) = grads.get(name) {
                let g = g.to_dtype(DType::F32)?;
                s.m = ((&s.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
                s.v = ((&s.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            } else {
                s.m = (&s.m * c.beta1)?;
                s.v = (&s.v * c.beta2)?;
            }
            let mhat = (&s.m / bc1)?;
            let denom = ((&s.v / bc2)?.sqrt()? + c.eps)?;
            p = (p - (mhat.div(&denom)? * lr)?)?;
            match &mut s.master {
                Some(m) => {
                    s.var.set(&p.to_dtype(s.var.dtype())?)?;
                    *m = p;
                }
                None => s.var.set(&p)?,
            }
        }
        Ok(())
    }

    /// Moments (and master weights) for a checkpoint.
    pub fn state(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (n, s) in &self.slots {
            out.insert(format!("{n}.exp_avg"), s.m.clone());
            out.insert(format!("{n}.exp_avg_sq"), s.v.clone());
            if let Some(m) = &s.master {
                out.insert(format!("{n}.master"), m.clone());
            }
        }
        out
    }

    pub fn load_state(&mut self, state: &BTreeMap<String, Tensor>, t: u64) -> Result<()> {
        for (n, s) in self.slots.iter_mut() {
            let get = |k: &str| {
                state.get(&format!("{n}.{k}")).cloned().ok_or_else(|| {
                    Error::Artifact(format!("checkpoint lacks optimizer state `{n}.{k}`"))
                })
            };
            let dev = s.m.device().clone();
            s.m = get("exp_avg")?.to_device(&dev)?;
            s.v = get("exp_avg_sq")?.to_device(&dev)?;
            if s.master.is_some() {
                let m = get("master")?.to_device(&dev)?;
                s.var.set(&m.to_dtype(s.var.dtype())?)?;
                s.master = Some(m);
            }
        }
        self.t = t;
        Ok(())
    }
}

/// Scales gradients so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut BTreeMap<String, Tensor>, max_norm: Option<f64>) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.values() {
        total += g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
    }
    let norm = total.sqrt();
    if let Some(max) = max_norm {
        if norm > max && norm.is_finite() {
            let scale = max / (norm + 1e-6);
            for g in grads.values_mut() {
                *g = (&*g * scale)?;
            }
        }
    }
    Ok(norm)
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

impl std::str::FromStr for Schedule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "constant" => Ok(Schedule::Constant),
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            o => Err(Error::param(
                "schedule",
                format!("unknown schedule `{o}` (constant, linear, cosine)"),
            )),
        }
    }
}

/// Learning rate at optimizer step `step` (0-based): linear warmup, then the schedule's decay
/// to zero at `total` (as transformers' schedulers).
pub fn lr_at(base: f64, schedule: Schedule, warmup: usize, total: usize, step: usize) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    match schedule {
        Schedule::Constant => base,
        Schedule::Linear => base * (1.0 - progress),
        Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}
