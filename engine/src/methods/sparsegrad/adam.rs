//! Adam state for a subset of a matrix's entries, addressed by flat index: SparseGrad's
//! optimizer. Entries never selected cost nothing; an entry's moments change only on steps
//! that give it a gradient (as `torch.optim.SparseAdam`). The update rule is the one the
//! dense [`crate::optim::AdamW`] uses, so on a fixed support it equals dense Adam fed
//! gradients that are zero off the support.
//!
//! The index bookkeeping (which slot holds which entry) lives on the host; the values —
//! moments, accumulated delta — are f32 tensors on the model's device, updated by the
//! kernels in [`crate::kernels`], so a GPU step moves k indices at most, never the values.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::kernels::{self, AdamStep};
use crate::optim::AdamConfig;
use crate::Result;

/// A growable set of flat indices with a slot per index.
#[derive(Clone, Debug, Default)]
pub struct Slots {
    pub index: Vec<u32>,
    pos: HashMap<u32, u32>,
}

impl Slots {
    pub fn from_index(index: Vec<u32>) -> Self {
        let pos = index
            .iter()
            .enumerate()
            .map(|(s, &i)| (i, s as u32))
            .collect();
        Slots { index, pos }
    }
    pub fn len(&self) -> usize {
        self.index.len()
    }
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }
    pub fn get(&self, i: u32) -> Option<usize> {
        self.pos.get(&i).map(|&s| s as usize)
    }
    /// Slots for `idx`, appending new entries: `None` when `idx` is exactly the slot order
    /// (a fixed support), else the slot of each entry and how many were added.
    pub fn slots_for(&mut self, idx: &[u32]) -> (Option<Vec<u32>>, usize) {
        if idx == self.index.as_slice() {
            return (None, 0);
        }
        let before = self.len();
        let s = idx.iter().map(|&i| self.slot(i).0 as u32).collect();
        (Some(s), self.len() - before)
    }
    /// The slot of `i`, appended when new (`true` in the second field).
    pub fn slot(&mut self, i: u32) -> (usize, bool) {
        match self.pos.get(&i) {
            Some(&s) => (s as usize, false),
            None => {
                let s = self.index.len();
                self.index.push(i);
                self.pos.insert(i, s as u32);
                (s, true)
            }
        }
    }
}

/// Appends `extra` zeros to a 1-d f32 tensor; an empty one becomes a tensor on `dev`.
fn grow(t: &Tensor, extra: usize, dev: &Device) -> Result<Tensor> {
    if extra == 0 {
        return Ok(t.clone());
    }
    let z = Tensor::zeros(extra, DType::F32, dev)?;
    Ok(if t.elem_count() == 0 {
        z
    } else {
        Tensor::cat(&[t, &z], 0)?
    })
}

/// A 1-d f32 tensor of `v` on `dev` — on the host when empty (CUDA has no zero-byte
/// allocations).
fn values_on(v: Vec<f32>, dev: &Device) -> Result<Tensor> {
    let n = v.len();
    let dev = if n == 0 { &Device::Cpu } else { dev };
    Ok(Tensor::from_vec(v, n, dev)?)
}

fn upload(v: &[u32], dev: &Device) -> Result<Tensor> {
    Ok(Tensor::from_slice(v, v.len(), dev)?)
}

/// Values on a growable set of entries (the accumulated rotated delta `ΔW̃`).
#[derive(Clone, Debug)]
pub struct SparseValues {
    pub slots: Slots,
    pub values: Tensor,
    dev: Device,
}

impl SparseValues {
    pub fn new(dev: &Device) -> Result<Self> {
        Self::from_parts(Vec::new(), Vec::new(), dev)
    }

    pub fn from_parts(index: Vec<u32>, values: Vec<f32>, dev: &Device) -> Result<Self> {
        Ok(SparseValues {
            slots: Slots::from_index(index),
            values: values_on(values, dev)?,
            dev: dev.clone(),
        })
    }

    pub fn add(&mut self, idx: &[u32], vals: &Tensor) -> Result<()> {
        let (slots, added) = self.slots.slots_for(idx);
        let grown = grow(&self.values, added, &self.dev)?;
        self.values = match slots {
            None => (grown + vals)?,
            Some(s) => grown.index_add(&upload(&s, vals.device())?, vals, 0)?,
        };
        Ok(())
    }

    /// `(index, value)` pairs in ascending index order, on the host.
    pub fn sorted(&self) -> Result<(Vec<u32>, Vec<f32>)> {
        let values = self.host_values()?;
        let mut order: Vec<usize> = (0..values.len()).collect();
        order.sort_unstable_by_key(|&s| self.slots.index[s]);
        Ok((
            order.iter().map(|&s| self.slots.index[s]).collect(),
            order.iter().map(|&s| values[s]).collect(),
        ))
    }

    pub fn host_values(&self) -> Result<Vec<f32>> {
        Ok(self.values.to_device(&Device::Cpu)?.to_vec1()?)
    }
}

#[derive(Clone, Debug)]
pub struct SparseAdam {
    pub slots: Slots,
    pub m: Tensor,
    pub v: Tensor,
    dev: Device,
}

impl SparseAdam {
    pub fn new(dev: &Device) -> Result<Self> {
        Self::with_support(&[], dev)
    }

    /// Zero moments for exactly the entries of `support`.
    pub fn with_support(support: &[u32], dev: &Device) -> Result<Self> {
        let n = support.len();
        Self::from_parts(support.to_vec(), vec![0.0; n], vec![0.0; n], dev)
    }

    pub fn from_parts(index: Vec<u32>, m: Vec<f32>, v: Vec<f32>, dev: &Device) -> Result<Self> {
        Ok(SparseAdam {
            slots: Slots::from_index(index),
            m: values_on(m, dev)?,
            v: values_on(v, dev)?,
            dev: dev.clone(),
        })
    }

    /// Numbers of state held (two moments per entry).
    pub fn state_len(&self) -> usize {
        2 * self.slots.len()
    }

    /// The moments on the host, in slot order.
    pub fn host_moments(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok((
            self.m.to_device(&Device::Cpu)?.to_vec1()?,
            self.v.to_device(&Device::Cpu)?.to_vec1()?,
        ))
    }

    /// Moves to a new support, keeping the moments of entries that stay and starting new
    /// entries at zero (refresh steps only: the remap runs on the host).
    pub fn retain_support(&mut self, support: &[u32]) -> Result<()> {
        let (om, ov) = self.host_moments()?;
        let (mut m, mut v) = (vec![0.0; support.len()], vec![0.0; support.len()]);
        for (s, &i) in support.iter().enumerate() {
            if let Some(old) = self.slots.get(i) {
                m[s] = om[old];
                v[s] = ov[old];
            }
        }
        *self = Self::from_parts(support.to_vec(), m, v, &self.dev.clone())?;
        Ok(())
    }

    /// One Adam step (step number `t`, 1-based) on entries `idx` with gradients `g · gscale`;
    /// returns each entry's change. Entries not yet held get slots (dynamic support).
    pub fn update(
        &mut self,
        idx: &[u32],
        g: &Tensor,
        gscale: f32,
        lr: f32,
        cfg: &AdamConfig,
        t: u64,
    ) -> Result<Tensor> {
        let step = AdamStep {
            gscale,
            lr,
            beta1: cfg.beta1 as f32,
            beta2: cfg.beta2 as f32,
            eps: cfg.eps as f32,
            bc1: (1.0 - cfg.beta1.powi(t as i32)) as f32,
            bc2: (1.0 - cfg.beta2.powi(t as i32)) as f32,
        };
        let (slots, added) = self.slots.slots_for(idx);
        let (m, v) = (
            grow(&self.m, added, &self.dev)?,
            grow(&self.v, added, &self.dev)?,
        );
        let slot_t = slots.map(|s| upload(&s, &self.dev)).transpose()?;
        let (m, v, ch) = kernels::sparse_adam(&m, &v, slot_t.as_ref(), g, &step)?;
        self.m = m;
        self.v = v;
        Ok(ch)
    }
}
