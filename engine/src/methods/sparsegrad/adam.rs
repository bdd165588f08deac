//! Adam state for a subset of a matrix's entries, addressed by flat index: SparseGrad's
//! optimizer. Entries never selected cost nothing; an entry's moments change only on steps
//! that give it a gradient (as `torch.optim.SparseAdam`). The update rule is the one the
//! dense [`crate::optim::AdamW`] uses, so on a fixed support it equals dense Adam fed
//! gradients that are zero off the support.

use std::collections::HashMap;

use crate::optim::AdamConfig;

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

/// Values on a growable set of entries (the accumulated rotated delta `ΔW̃`).
#[derive(Clone, Debug, Default)]
pub struct SparseValues {
    pub slots: Slots,
    pub values: Vec<f32>,
}

impl SparseValues {
    pub fn add(&mut self, idx: &[u32], vals: &[f32]) {
        for (&i, &v) in idx.iter().zip(vals) {
            let (s, new) = self.slots.slot(i);
            if new {
                self.values.push(v);
            } else {
                self.values[s] += v;
            }
        }
    }
    /// `(index, value)` pairs in ascending index order.
    pub fn sorted(&self) -> (Vec<u32>, Vec<f32>) {
        let mut order: Vec<usize> = (0..self.values.len()).collect();
        order.sort_unstable_by_key(|&s| self.slots.index[s]);
        (
            order.iter().map(|&s| self.slots.index[s]).collect(),
            order.iter().map(|&s| self.values[s]).collect(),
        )
    }
}

#[derive(Clone, Debug, Default)]
pub struct SparseAdam {
    pub slots: Slots,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl SparseAdam {
    /// Zero moments for exactly the entries of `support`.
    pub fn with_support(support: &[u32]) -> Self {
        SparseAdam {
            slots: Slots::from_index(support.to_vec()),
            m: vec![0.0; support.len()],
            v: vec![0.0; support.len()],
        }
    }

    /// Numbers of state held (two moments per entry).
    pub fn state_len(&self) -> usize {
        2 * self.m.len()
    }

    /// Moves to a new support, keeping the moments of entries that stay and starting new
    /// entries at zero.
    pub fn retain_support(&mut self, support: &[u32]) {
        let (mut m, mut v) = (vec![0.0; support.len()], vec![0.0; support.len()]);
        for (s, &i) in support.iter().enumerate() {
            if let Some(old) = self.slots.get(i) {
                m[s] = self.m[old];
                v[s] = self.v[old];
            }
        }
        *self = SparseAdam {
            slots: Slots::from_index(support.to_vec()),
            m,
            v,
        };
    }

    /// One Adam step (step number `t`, 1-based) on entries `idx` with gradients `g · gscale`;
    /// returns each entry's change. Entries not yet held get slots (dynamic support).
    pub fn update(
        &mut self,
        idx: &[u32],
        g: &[f32],
        gscale: f32,
        lr: f32,
        cfg: &AdamConfig,
        t: u64,
    ) -> Vec<f32> {
        let (b1, b2, eps) = (cfg.beta1 as f32, cfg.beta2 as f32, cfg.eps as f32);
        let bc1 = (1.0 - cfg.beta1.powi(t as i32)) as f32;
        let bc2 = (1.0 - cfg.beta2.powi(t as i32)) as f32;
        let mut out = Vec::with_capacity(idx.len());
        for (&i, &gi) in idx.iter().zip(g) {
            let (s, new) = self.slots.slot(i);
            if new {
                self.m.push(0.0);
                self.v.push(0.0);
            }
            let gi = gi * gscale;
            let m = b1 * self.m[s] + (1.0 - b1) * gi;
            let v = b2 * self.v[s] + (1.0 - b2) * gi * gi;
            self.m[s] = m;
            self.v[s] = v;
            out.push(-lr * ((m / bc1) / ((v / bc2).sqrt() + eps)));
        }
        out
    }
}
