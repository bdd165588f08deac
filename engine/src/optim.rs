//! AdamW over named dense parameters, learning-rate schedules and gradient clipping.
//! Moments (and, for bf16 parameters, an f32 master copy) are kept in f32.

use std::collections::BTreeMap;
use std::sync::Mutex;

use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Storage, Tensor, Var};
use rayon::prelude::*;
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

/// Adam's first and second moments, f32.
enum Moments {
    /// CPU f32 parameters: plain vectors updated in place by [`FusedAdam`].
    Cpu { m: Vec<f32>, v: Vec<f32> },
    /// Everything else (other devices, bf16 parameters with an f32 master copy): tensor ops.
    Tensors { m: Tensor, v: Tensor },
}

struct Slot {
    var: Var,
    decay: bool,
    /// This parameter's learning rate as a multiple of the step's (a parameter group's lr).
    lr_scale: f64,
    moments: Moments,
    master: Option<Tensor>,
}

/// One fused pass of AdamW over a CPU f32 parameter, updated in place; the moments are
/// updated in place too (their tensors are never shared while the optimizer owns them).
struct FusedAdam<'a> {
    g: &'a [f32],
    m: Mutex<&'a mut [f32]>,
    v: Mutex<&'a mut [f32]>,
    lr: f32,
    b1: f32,
    b2: f32,
    eps: f32,
    bc1: f32,
    bc2: f32,
    decay: f32,
    gscale: f32,
}

impl InplaceOp1 for FusedAdam<'_> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }
    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(p) = storage else {
            candle_core::bail!("fused AdamW is for f32")
        };
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("fused AdamW needs a contiguous parameter")
        };
        let p = &mut p[a..b];
        let mut m = self.m.lock().expect("not poisoned");
        let mut v = self.v.lock().expect("not poisoned");
        const C: usize = 16384;
        p.par_chunks_mut(C)
            .zip(m.par_chunks_mut(C))
            .zip(v.par_chunks_mut(C))
            .zip(self.g.par_chunks(C))
            .for_each(|(((p, m), v), g)| {
                for i in 0..p.len() {
                    let gi = g[i] * self.gscale;
                    m[i] = self.b1 * m[i] + (1.0 - self.b1) * gi;
                    v[i] = self.b2 * v[i] + (1.0 - self.b2) * gi * gi;
                    let upd = (m[i] / self.bc1) / ((v[i] / self.bc2).sqrt() + self.eps);
                    p[i] = p[i] * self.decay - self.lr * upd;
                }
            });
        Ok(())
    }
}

/// A contiguous CPU f32 tensor's data, for read-only use while `f` runs.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (st, l) = t.storage_and_layout();
    let (a, b) = l.contiguous_offsets()?;
    match &*st {
        Storage::Cpu(CpuStorage::F32(d)) => Some(f(&d[a..b])),
        _ => None,
    }
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
            let master = if t.dtype() != DType::F32 {
                Some(t.to_dtype(DType::F32)?)
            } else {
                None
            };
            let moments = if t.dtype() == DType::F32 && t.device().is_cpu() {
                let n = t.elem_count();
                Moments::Cpu {
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                }
            } else {
                let m = Tensor::zeros(t.shape(), DType::F32, t.device())?;
                Moments::Tensors { v: m.clone(), m }
            };
            slots.insert(
                name.clone(),
                Slot {
                    decay: decays(&name, t),
                    lr_scale: 1.0,
                    moments,
                    master,
                    var,
                },
            );
        }
        Ok(AdamW { cfg, slots, t: 0 })
    }

    /// Gives each parameter the learning rate `scale(name)` × the step's, as PyTorch's
    /// parameter groups do (decay scales with it, as there).
    pub fn with_lr_scales(mut self, scale: impl Fn(&str) -> f64) -> Self {
        for (n, s) in self.slots.iter_mut() {
            s.lr_scale = scale(n);
        }
        self
    }

    /// Numbers of optimizer state held (moments and master copies), for memory reports.
    pub fn state_len(&self) -> usize {
        self.slots
            .values()
            .map(|s| {
                let n = s.var.elem_count();
                2 * n + s.master.as_ref().map_or(0, |_| n)
            })
            .sum()
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.slots.keys()
    }

    /// One update with gradients by name (missing = zero gradient, parameter still decays).
    pub fn step(&mut self, grads: &BTreeMap<String, Tensor>, lr: f64) -> Result<()> {
        self.step_scaled(grads, lr, 1.0)
    }

    /// [`AdamW::step`] with every gradient multiplied by `gscale` (gradient clipping).
    pub fn step_scaled(
        &mut self,
        grads: &BTreeMap<String, Tensor>,
        lr: f64,
        gscale: f64,
    ) -> Result<()> {
        self.t += 1;
        let c = &self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (name, s) in self.slots.iter_mut() {
            let lr = lr * s.lr_scale;
            let decay = if s.decay {
                1.0 - lr * c.weight_decay
            } else {
                1.0
            };
            let (m, v) = match &mut s.moments {
                Moments::Cpu { m, v } => {
                    // A parameter without a gradient this step sees a zero gradient.
                    let g = match grads.get(name) {
                        Some(g) => g.to_dtype(DType::F32)?.contiguous()?,
                        None => Tensor::zeros(s.var.shape(), DType::F32, s.var.device())?,
                    };
                    let var = s.var.clone();
                    let done = with_f32(&g, |g| {
                        let op = FusedAdam {
                            g,
                            m: Mutex::new(m.as_mut_slice()),
                            v: Mutex::new(v.as_mut_slice()),
                            lr: lr as f32,
                            b1: c.beta1 as f32,
                            b2: c.beta2 as f32,
                            eps: c.eps as f32,
                            bc1: bc1 as f32,
                            bc2: bc2 as f32,
                            decay: decay as f32,
                            gscale: gscale as f32,
                        };
                        var.as_tensor().inplace_op1(&op)
                    });
                    done.ok_or_else(|| {
                        Error::Other(format!("gradient of `{name}` is not on the CPU"))
                    })??;
                    continue;
                }
                Moments::Tensors { m, v } => (m, v),
            };
            let mut p = match &s.master {
                Some(master) => master.clone(),
                None => s.var.as_tensor().detach(),
            };
            if decay != 1.0 {
                p = (&p * decay)?;
            }
            match grads.get(name) {
                Some(g) => {
                    let g = (g.to_dtype(DType::F32)? * gscale)?;
                    *m = ((&*m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
                    *v = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
                }
                None => {
                    *m = (&*m * c.beta1)?;
                    *v = (&*v * c.beta2)?;
                }
            }
            let mhat = (&*m / bc1)?;
            let denom = ((&*v / bc2)?.sqrt()? + c.eps)?;
            p = (p - (mhat.div(&denom)? * lr)?)?;
            match &mut s.master {
                Some(master) => {
                    s.var.set(&p.to_dtype(s.var.dtype())?)?;
                    *master = p;
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
            let (m, v) = match &s.moments {
                Moments::Cpu { m, v } => {
                    let (shape, dev) = (s.var.shape(), s.var.device());
                    (
                        Tensor::from_slice(m, shape, dev).expect("same element count"),
                        Tensor::from_slice(v, shape, dev).expect("same element count"),
                    )
                }
                Moments::Tensors { m, v } => (m.clone(), v.clone()),
            };
            out.insert(format!("{n}.exp_avg"), m);
            out.insert(format!("{n}.exp_avg_sq"), v);
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
            let dev = s.var.device().clone();
            let (m_new, v_new) = (get("exp_avg")?, get("exp_avg_sq")?);
            s.moments = match s.moments {
                Moments::Cpu { .. } => Moments::Cpu {
                    m: m_new.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
                    v: v_new.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
                },
                Moments::Tensors { .. } => Moments::Tensors {
                    m: m_new.to_device(&dev)?,
                    v: v_new.to_device(&dev)?,
                },
            };
            // An f32 state has no master copies: loaded into a low-precision model, the
            // masters stay the model's own values widened to f32.
            if let (Some(_), Some(m)) = (&s.master, state.get(&format!("{n}.master"))) {
                let m = m.to_device(&dev)?;
                s.var.set(&m.to_dtype(s.var.dtype())?)?;
                s.master = Some(m);
            }
        }
        self.t = t;
        Ok(())
    }
}

/// The global L2 norm of the gradients.
pub fn grad_norm(grads: &BTreeMap<String, Tensor>) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.values() {
        let fast = with_f32(g, |d| {
            d.par_chunks(16384)
                .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
                .sum::<f64>()
        });
        total += match fast {
            Some(t) => t,
            None => g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?,
        };
    }
    Ok(total.sqrt())
}

/// The factor that brings the global norm to at most `max_norm`.
pub fn clip_scale(norm: f64, max_norm: Option<f64>) -> f64 {
    match max_norm {
        Some(max) if norm > max && norm.is_finite() => max / (norm + 1e-6),
        _ => 1.0,
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
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
