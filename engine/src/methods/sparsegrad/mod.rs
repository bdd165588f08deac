//! SparseGrad (Chekalina et al., EMNLP 2024) and the MeProp baseline: MLP matrices trained
//! through the top-k entries of their weight gradient — in a basis found from gradient
//! statistics (SparseGrad) or in the original one (MeProp).
//!
//! Forward and input gradients use the dense weight `W` (one matmul, as an ordinary frozen
//! linear). Only the weight gradient changes: a hook in the layer's own backward forms `G`,
//! rotates it to `G̃ = Pᵀ G Q` and keeps k values; the step runs Adam on those entries and
//! writes `W += P ΔW̃ Qᵀ` in place. The artifact holds the k values and indices per matrix
//! plus the bases once per matrix type.

pub mod adam;
pub mod basis;
mod calibration;
mod persist;
pub mod settings;
pub mod state;

pub use super::Scope;
pub use settings::{BasisDtype, Fidelity, MePropConfig, SparseGradConfig, Support};

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};

use self::basis::Basis;
use self::state::{Core, HostBasis, MatrixState, Phase, Tap};
use super::{BasisSide, Calibration, DeltaEntry, DenseTrainer, Method};
use crate::kernels::Csr;
use crate::models::{MlpKind, Model};
use crate::nn::{Adapter, Param};
use crate::optim::{clip_scale, grad_norm, AdamConfig};
use crate::{Error, Result};

/// SparseGrad or MeProp over the MLP matrices, plus dense AdamW for what the scope trains.
pub struct SparseMlp {
    name: &'static str,
    hyper: serde_json::Value,
    cfg: SparseGradConfig,
    adam: AdamConfig,
    dense: DenseTrainer,
    core: Arc<Mutex<Core>>,
    /// Sparse optimizer steps taken.
    t: u64,
    refreshing: bool,
    /// The last step's kept share of gradient energy, when measured.
    energy: Option<f64>,
    device: Device,
    preset: Option<BTreeMap<MlpKind, Basis>>,
    /// MeProp as the authors ran it: MLP weights trained by ordinary AdamW on their gradient
    /// masked to its top-k (weight name → k).
    masked: BTreeMap<String, usize>,
}

impl SparseMlp {
    pub fn sparsegrad(cfg: SparseGradConfig, adam: AdamConfig) -> Self {
        let cfg = cfg.effective();
        let hyper = serde_json::to_value(&cfg).expect("serialisable");
        Self::new("sparsegrad", hyper, cfg, adam)
    }

    fn new(
        name: &'static str,
        hyper: serde_json::Value,
        cfg: SparseGradConfig,
        adam: AdamConfig,
    ) -> Self {
        SparseMlp {
            name,
            hyper,
            cfg,
            dense: DenseTrainer::new(adam.clone()),
            adam,
            core: Arc::new(Mutex::new(Core::new(name == "sparsegrad"))),
            t: 0,
            refreshing: false,
            energy: None,
            device: Device::Cpu,
            preset: None,
            masked: BTreeMap::new(),
        }
    }

    /// MeProp (Sun et al. 2017) on the same matrices: top-k of `|G|` in the original basis
    /// every step, Adam moments on the entries ever kept.
    pub fn meprop(cfg: MePropConfig, adam: AdamConfig) -> Self {
        let cfg = cfg.effective();
        let sg = SparseGradConfig {
            density: cfg.density,
            k: cfg.k,
            support: Support::Dynamic,
            scope: cfg.scope,
            block_stride: cfg.block_stride,
            dense_lr_scale: cfg.dense_lr_scale,
            fidelity: cfg.fidelity,
            ..Default::default()
        };
        let hyper = serde_json::to_value(&cfg).expect("serialisable");
        Self::new("meprop", hyper, sg, adam)
    }

    fn core(&self) -> Result<MutexGuard<'_, Core>> {
        self.core
            .lock()
            .map_err(|_| Error::Other("sparse state poisoned".into()))
    }

    fn rotates(&self) -> bool {
        self.name == "sparsegrad"
    }

    /// The authors' choices (either method).
    fn paper(&self) -> bool {
        self.cfg.fidelity == Fidelity::Paper
    }

    /// MeProp as the authors ran it: masked dense gradients under ordinary AdamW.
    fn masks_dense(&self) -> bool {
        !self.rotates() && self.paper()
    }

    fn dense_lr_scale(&self) -> f64 {
        self.cfg
            .dense_lr_scale
            .unwrap_or(self.cfg.scope.default_dense_lr_scale())
    }

    /// The bases found by the basis phase (empty for MeProp or before calibration).
    pub fn bases(&self) -> Result<BTreeMap<MlpKind, Basis>> {
        Ok(self
            .core()?
            .bases
            .iter()
            .map(|(k, b)| (*k, b.basis.clone()))
            .collect())
    }

    /// Per matrix: weight name and current support (fixed/refreshed), for inspection.
    pub fn supports(&self) -> Result<Vec<(String, Option<Vec<u32>>)>> {
        Ok(self
            .core()?
            .matrices
            .iter()
            .map(|m| (m.weight_name(), m.support.clone()))
            .collect())
    }

    /// Uses these bases instead of running the basis phase (bases from an earlier run or
    /// computed elsewhere).
    pub fn with_bases(mut self, bases: BTreeMap<MlpKind, Basis>) -> Self {
        self.preset = Some(bases);
        self
    }

    /// Per matrix: weight name and the gradient the hooks collected for the current step
    /// (flat indices into the `(out, in)` matrix, values in the rotated basis).
    #[allow(clippy::type_complexity)]
    pub fn pending_gradients(&self) -> Result<Vec<(String, Option<(Vec<u32>, Vec<f32>)>)>> {
        self.core()?
            .matrices
            .iter()
            .map(|m| {
                let g = match &m.grad {
                    Some((i, v)) => Some((i.clone(), v.to_device(&Device::Cpu)?.to_vec1()?)),
                    None => None,
                };
                Ok((m.weight_name(), g))
            })
            .collect()
    }

    fn add_sparse(
        core: &Core,
        m: &MatrixState,
        w: Tensor,
        idx: &[u32],
        vals: &Tensor,
        csr: Option<&Csr>,
    ) -> Result<Tensor> {
        if !core.rotate {
            let ids = Tensor::from_slice(idx, idx.len(), w.device())?;
            return Ok(w
                .flatten_all()?
                .index_add(&ids, vals, 0)?
                .reshape((m.out, m.inp))?);
        }
        let b = core
            .bases
            .get(&m.kind)
            .ok_or_else(|| Error::Other(format!("no basis for {:?}", m.kind)))?;
        let built;
        let csr = match csr {
            Some(c) => c,
            None => {
                built = HostBasis::csr(m.out, m.inp, idx, w.device())?;
                &built
            }
        };
        b.add_expanded(&w, csr, vals)?;
        Ok(w)
    }

    fn train_phase(&self) -> Phase {
        Phase::Train {
            select: self.cfg.support == Support::Dynamic,
        }
    }
}

impl Method for SparseMlp {
    fn name(&self) -> &'static str {
        self.name
    }

    fn hyperparameters(&self) -> serde_json::Value {
        self.hyper.clone()
    }

    fn prepare(&mut self, model: &mut Model, _seed: u64) -> Result<()> {
        model.weights.freeze_all()?;
        self.device = model.weights.device.clone();
        let anchor = Var::zeros(1, model.dtype(), &self.device)?;
        let mut sparse_weights = Vec::new();
        let mut dense_gates = Vec::new();
        let mut masked = BTreeMap::new();
        let llama = model
            .mlp_linears()
            .iter()
            .any(|(_, k, _)| *k == MlpKind::Gate);
        if self.paper() && llama && self.cfg.block_stride == 1 {
            // The authors' LLaMA runs train every third block.
            self.cfg.block_stride = 3;
            self.hyper["block_stride"] = 3.into();
        }
        {
            let mut core = self.core()?;
            core.matrices.clear();
            for (prefix, kind, layer) in model.mlp_linears() {
                if layer % self.cfg.block_stride != 0 {
                    continue;
                }
                if self.paper() && self.rotates() && kind == MlpKind::Gate {
                    // The authors' LLaMA runs train gate_proj densely (set below).
                    dense_gates.push(format!("{prefix}.weight"));
                    continue;
                }
                let w = model.weights.get(&format!("{prefix}.weight"))?;
                let (out, inp) = w.dims2()?;
                let lead = match (self.rotates(), self.cfg.max_basis_columns) {
                    (true, Some(c)) => (c.min(out), c.min(inp)),
                    _ => (out, inp),
                };
                let k = match (self.cfg.k, self.paper()) {
                    (Some(k), _) => k,
                    (None, true) if llama => settings::PAPER_K_LLAMA,
                    (None, true) => settings::PAPER_K_ENCODER,
                    (None, false) => (self.cfg.density * (out * inp) as f64).round() as usize,
                }
                .clamp(1, lead.0 * lead.1);
                if self.masks_dense() {
                    masked.insert(format!("{prefix}.weight"), k);
                    continue;
                }
                let id = core.matrices.len();
                let mut state =
                    MatrixState::new(prefix.clone(), kind, layer, out, inp, k, &self.device)?;
                state.lead = lead;
                core.matrices.push(state);
                sparse_weights.push(format!("{prefix}.weight"));
                model.weights.adapters.insert(
                    prefix,
                    Adapter::Hook(Arc::new(Tap {
                        id,
                        core: self.core.clone(),
                        anchor: anchor.as_tensor().clone(),
                    })),
                );
            }
            if !core.rotate {
                core.phase = Phase::Train { select: true };
            }
        }
        self.masked = masked;
        let stride = self.cfg.block_stride;
        let mut dense = self.cfg.scope.dense_params(
            model,
            |l| l % stride == 0,
            &std::collections::HashSet::new(),
        );
        if self.paper() {
            // The authors' code leaves the norms frozen (their parameter filter misses them).
            dense.retain(|n| !crate::models::is_norm_param(n));
            dense.extend(dense_gates);
            dense.extend(self.masked.keys().cloned());
        }
        // `dense_params` keeps only names the model has; gates and masked weights are its own.
        for n in dense {
            model.weights.set_trainable(&n, true)?;
        }
        self.dense.init(model)
    }

    fn calibrate(&mut self, model: &mut Model, cal: Calibration<'_>) -> Result<()> {
        self.calibrate_mlp(model, cal)
    }

    fn begin_step(&mut self, step: usize, micro_batches: usize) -> Result<()> {
        let refresh_step = step > 0 && step.is_multiple_of(self.cfg.refresh_every);
        let select = match self.cfg.support {
            // The average needs the whole rotated gradient every step.
            Support::Dynamic | Support::Ema => true,
            Support::Fixed => false,
            Support::Refreshed => refresh_step,
        } || !self.rotates();
        self.refreshing = self.rotates()
            && match self.cfg.support {
                Support::Refreshed | Support::Ema => refresh_step,
                Support::Fixed | Support::Dynamic => false,
            };
        let mut core = self.core()?;
        core.ema = (self.rotates() && self.cfg.support == Support::Ema)
            .then_some(self.cfg.ema_beta as f32);
        core.refresh = self.refreshing;
        core.micro_batches = micro_batches.max(1);
        core.phase = Phase::Train { select };
        core.measure = select || step.is_multiple_of(ENERGY_EVERY);
        core.dense_sq = 0.0;
        core.measured = 0;
        for m in core.matrices.iter_mut() {
            m.reset_step();
        }
        Ok(())
    }

    fn accumulate(&mut self, model: &Model, grads: GradStore) -> Result<()> {
        self.dense.accumulate(model, &grads)
    }

    fn step(&mut self, model: &mut Model, lr: f64, max_grad_norm: Option<f64>) -> Result<f64> {
        let mut grads = self.dense.take();
        let mut masked_energy = None;
        if !self.masked.is_empty() {
            let (mut kept, mut all) = (0.0, 0.0);
            for (name, &k) in &self.masked {
                let Some(g) = grads.remove(name) else {
                    continue;
                };
                let m = mask_topk(&g, k)?;
                all += state::sq_norm(&g)?;
                kept += state::sq_norm(&m)?;
                grads.insert(name.clone(), m);
            }
            masked_energy = (all > 0.0).then(|| kept / all);
        }
        let mut sq = grad_norm(&grads)?.powi(2);
        let core = self.core.clone();
        let mut core = core
            .lock()
            .map_err(|_| Error::Other("sparse state poisoned".into()))?;
        let mut kept = 0.0;
        for m in &core.matrices {
            if let Some((_, g)) = &m.grad {
                kept += state::sq_norm(g)?;
            }
        }
        sq += kept;
        self.energy = (core.measured == core.matrices.len() && core.dense_sq > 0.0)
            .then(|| (kept / core.dense_sq).min(1.0))
            .or(masked_energy);
        let norm = sq.sqrt();
        let scale = clip_scale(norm, max_grad_norm);
        self.dense
            .apply(&grads, lr * self.dense_lr_scale(), scale)?;
        self.t += 1;
        let dev = self.device.clone();
        let (n, rotate) = (core.matrices.len(), core.rotate);
        for i in 0..n {
            let Some((idx, g)) = core.matrices[i].grad.take() else {
                continue;
            };
            let m = &mut core.matrices[i];
            if self.refreshing {
                m.adam.retain_support(&idx)?;
                m.set_support(idx.clone(), &dev)?;
            }
            let ch = m
                .adam
                .update(&idx, &g, scale as f32, lr as f32, &self.adam, self.t)?;
            m.delta.add(&idx, &ch)?;
            let name = m.weight_name();
            let w = model.weights.get(&name)?.clone();
            let new = if m.w0.is_some() {
                // Low-precision weights: W = W₀ + P ΔW̃ Qᵀ from the f32 delta every step, so
                // small updates are not lost to rounding of the running weight.
                let count = m.delta.slots.len();
                if m.delta_csr.as_ref().map(|(c, _)| *c) != Some(count) && rotate {
                    let csr = HostBasis::csr(m.out, m.inp, &m.delta.slots.index, &dev)?;
                    core.matrices[i].delta_csr = Some((count, csr));
                }
                let m = &core.matrices[i];
                // W₀ is low-precision, so the cast is a fresh f32 buffer the update may own.
                let base = m.w0.as_ref().expect("checked").to_dtype(DType::F32)?;
                let csr = m.delta_csr.as_ref().map(|(_, c)| c);
                Self::add_sparse(&core, m, base, &m.delta.slots.index, &m.delta.values, csr)?
                    .to_dtype(w.dtype())?
            } else {
                let m = &core.matrices[i];
                // On a fixed support the step's entries are the support: its CSR is cached.
                let csr = m
                    .block
                    .as_ref()
                    .filter(|_| m.support.as_deref() == Some(idx.as_slice()))
                    .map(|b| &b.csr);
                Self::add_sparse(&core, m, w, &idx, &ch, csr)?
            };
            model.weights.insert(name, Param::Frozen(new));
        }
        Ok(norm)
    }

    /// The tensors share storage with the live weights (f32 sparse matrices are updated in
    /// place) and optimizer: serialise them before the next step, or copy them.
    fn state(&self, model: &Model) -> Result<(BTreeMap<String, Tensor>, u64)> {
        self.save_state(model)
    }

    fn load_state(
        &mut self,
        model: &mut Model,
        state: &BTreeMap<String, Tensor>,
        t: u64,
    ) -> Result<()> {
        self.restore_state(model, state, t)
    }

    fn trainable_count(&self, model: &Model) -> usize {
        let sparse: usize = self
            .core()
            .map(|c| c.matrices.iter().map(|m| m.k).sum())
            .unwrap_or(0);
        model.weights.num_params(true) + sparse
    }

    fn grad_energy(&self) -> Option<f64> {
        self.energy
    }

    fn optimizer_state_len(&self) -> usize {
        let sparse: usize = self
            .core()
            .map(|c| c.matrices.iter().map(|m| m.adam.state_len()).sum())
            .unwrap_or(0);
        self.dense.state_len() + sparse
    }

    fn stats(&self) -> serde_json::Value {
        let Ok(core) = self.core() else {
            return serde_json::Value::Null;
        };
        let entries: usize = core.matrices.iter().map(|m| m.out * m.inp).sum();
        let k: usize = core.matrices.iter().map(|m| m.k).sum();
        let touched: usize = core.matrices.iter().map(|m| m.delta.slots.len()).sum();
        let moments: usize = core.matrices.iter().map(|m| m.adam.slots.len()).sum();
        serde_json::json!({
            "sparse_matrices": core.matrices.len(),
            "mlp_entries": entries,
            "k_total": k,
            "touched_entries": touched,
            "touched_fraction": touched as f64 / entries.max(1) as f64,
            "moment_entries": moments,
        })
    }

    fn delta(
        &self,
        model: &Model,
    ) -> Result<(BTreeMap<String, Tensor>, BTreeMap<String, DeltaEntry>)> {
        let (mut tensors, mut entries) = super::dense_delta(model);
        let core = self.core()?;
        let basis_dtype = match self.cfg.basis_dtype {
            BasisDtype::F32 => DType::F32,
            BasisDtype::Bf16 => DType::BF16,
        };
        for (kind, hb) in &core.bases {
            for (side, t) in [(BasisSide::P, &hb.basis.p), (BasisSide::Q, &hb.basis.q)] {
                let n = basis_tensor_name(*kind, side);
                tensors.insert(n.clone(), t.to_dtype(basis_dtype)?);
                entries.insert(
                    n,
                    DeltaEntry::Basis {
                        mlp_kind: *kind,
                        side,
                    },
                );
            }
        }
        for m in &core.matrices {
            let w = m.weight_name();
            let (idx, vals) = m.delta.sorted()?;
            let n = idx.len();
            let mut rc: Vec<i32> = Vec::with_capacity(2 * n);
            rc.extend(idx.iter().map(|&i| (i as usize / m.inp) as i32));
            rc.extend(idx.iter().map(|&i| (i as usize % m.inp) as i32));
            let entry = DeltaEntry::Sparse {
                param: w.clone(),
                basis: core.rotate.then_some(m.kind),
            };
            tensors.insert(
                format!("{w}.sparse_indices"),
                Tensor::from_vec(rc, (2, n), &Device::Cpu)?,
            );
            tensors.insert(
                format!("{w}.sparse_values"),
                Tensor::from_vec(vals, n, &Device::Cpu)?,
            );
            entries.insert(format!("{w}.sparse_indices"), entry.clone());
            entries.insert(format!("{w}.sparse_values"), entry);
            if let Some(d) = &m.warm {
                let n = format!("{w}.basis_phase_delta");
                tensors.insert(n.clone(), d.clone());
                entries.insert(n, DeltaEntry::Add { param: w.clone() });
            }
        }
        Ok((tensors, entries))
    }
}

/// `g` with all but its `k` largest-magnitude entries zeroed.
fn mask_topk(g: &Tensor, k: usize) -> Result<Tensor> {
    let (idx, vals) = crate::kernels::topk_abs(g, k)?;
    let ids = Tensor::from_slice(&idx, idx.len(), g.device())?;
    Ok(g.flatten_all()?
        .zeros_like()?
        .index_add(&ids, &vals.to_dtype(g.dtype())?, 0)?
        .reshape(g.shape())?)
}

/// A fixed support forms the whole gradient, to measure the energy it keeps, every this many
/// steps (and on the first).
const ENERGY_EVERY: usize = 10;

/// The artifact tensor holding one side of a matrix type's basis.
pub fn basis_tensor_name(kind: MlpKind, side: BasisSide) -> String {
    let s = match side {
        BasisSide::P => "P",
        BasisSide::Q => "Q",
    };
    format!("sparsegrad.basis.{}.{s}", kind.as_str())
}
