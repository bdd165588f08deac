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
pub mod config;
pub mod state;

pub use config::{BasisDtype, MePropConfig, Scope, SparseGradConfig, Support};

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};

use self::adam::{SparseAdam, SparseValues};
use self::basis::Basis;
use self::state::{Core, HostBasis, MatrixState, Phase, Tap};
use super::{BasisSide, Calibration, DeltaEntry, DenseTrainer, Method};
use crate::kernels::{self, Csr};
use crate::models::{MlpKind, Model};
use crate::nn::{Adapter, Param};
use crate::optim::{clip_scale, grad_norm, AdamConfig, AdamW};
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
    device: Device,
    preset: Option<BTreeMap<MlpKind, Basis>>,
}

impl SparseMlp {
    pub fn sparsegrad(cfg: SparseGradConfig, adam: AdamConfig) -> Self {
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
            device: Device::Cpu,
            preset: None,
        }
    }

    /// MeProp (Sun et al. 2017) on the same matrices: top-k of `|G|` in the original basis
    /// every step, Adam moments on the entries ever kept.
    pub fn meprop(cfg: MePropConfig, adam: AdamConfig) -> Self {
        let sg = SparseGradConfig {
            density: cfg.density,
            k: cfg.k,
            support: Support::Dynamic,
            scope: cfg.scope,
            block_stride: cfg.block_stride,
            dense_lr_scale: cfg.dense_lr_scale,
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

    fn dense_lr_scale(&self) -> f64 {
        self.cfg.dense_lr_scale.unwrap_or(match self.cfg.scope {
            Scope::Mlp => 1.0,
            Scope::Paper => 0.1,
        })
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

    fn cache_file(&self, cal: &Calibration<'_>, model: &Model) -> Option<PathBuf> {
        if self.cfg.basis_update {
            // The weights move during the basis phase: bases alone would not reproduce it.
            return None;
        }
        let (dir, key) = cal.cache.as_ref()?;
        let layers: Vec<usize> = self.core().ok()?.matrices.iter().map(|m| m.layer).collect();
        let id = serde_json::json!({
            "run": key,
            "model": model.fingerprint,
            "basis_steps": self.cfg.basis_steps,
            "layers": layers,
        });
        let sha = crate::io::sha256_bytes(id.to_string().as_bytes());
        Some(dir.join(format!("bases-{}.safetensors", &sha[..32])))
    }

    fn basis_phase(&mut self, model: &mut Model, cal: &mut Calibration<'_>) -> Result<()> {
        let n = self.cfg.basis_steps;
        if !self.cfg.basis_update {
            self.core()?.phase = Phase::Gram { keep: false };
            for i in 0..n {
                drop((cal.backward)(model, i)?);
            }
            return Ok(());
        }
        // As the paper's code: the basis-phase steps update the MLP matrices (dense AdamW)
        // and whatever the scope trains.
        let names: Vec<String> = self
            .core()?
            .matrices
            .iter()
            .map(|m| m.weight_name())
            .collect();
        let mut vars = Vec::new();
        let mut init = Vec::new();
        for n in &names {
            let w = model.weights.get(n)?.clone();
            init.push(w.clone());
            vars.push((n.clone(), Var::from_tensor(&w)?));
        }
        let mut opt = AdamW::new(vars.clone(), self.adam.clone())?;
        self.core()?.phase = Phase::Gram { keep: true };
        for i in 0..n {
            let grads = (cal.backward)(model, i)?;
            self.dense.accumulate(model, &grads)?;
            drop(grads);
            self.dense.step(cal.lr * self.dense_lr_scale(), None)?;
            let mut g = BTreeMap::new();
            for m in self.core()?.matrices.iter_mut() {
                if let Some(d) = m.dense_grad.take() {
                    g.insert(m.weight_name(), d);
                }
            }
            opt.step(&g, cal.lr)?;
            for (n, v) in &vars {
                model
                    .weights
                    .insert(n.clone(), Param::Frozen(v.as_tensor().detach()));
            }
        }
        let mut core = self.core()?;
        for (m, w0) in core.matrices.iter_mut().zip(init) {
            let w = model.weights.get(&m.weight_name())?;
            m.warm = Some((w.to_dtype(DType::F32)? - w0.to_dtype(DType::F32)?)?);
        }
        Ok(())
    }

    fn select_fixed_supports(
        &mut self,
        model: &mut Model,
        cal: &mut Calibration<'_>,
    ) -> Result<()> {
        self.core()?.phase = Phase::Score;
        for i in 0..self.cfg.basis_steps {
            drop((cal.backward)(model, i)?);
        }
        let dev = self.device.clone();
        let mut core = self.core()?;
        for m in core.matrices.iter_mut() {
            let score = m
                .score
                .take()
                .ok_or_else(|| Error::Other(format!("no gradient reached {}", m.prefix)))?;
            let (sup, _) = kernels::topk_abs(&score, m.k)?;
            m.adam = SparseAdam::with_support(&sup, &dev)?;
            m.set_support(sup, &dev)?;
        }
        Ok(())
    }

    /// Adds `S` (entries `idx`, values `vals`; `csr` when the caller has it cached) to the
    /// f32 weight `w`: in place `W += P S Qᵀ` for SparseGrad (`w` must be owned by the
    /// caller), a new tensor `W + S` for MeProp.
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

fn u32_tensor(v: &[u32]) -> Result<Tensor> {
    Ok(Tensor::from_slice(v, v.len(), &Device::Cpu)?)
}
fn f32_tensor(v: &[f32]) -> Result<Tensor> {
    Ok(Tensor::from_slice(v, v.len(), &Device::Cpu)?)
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
        {
            let mut core = self.core()?;
            core.matrices.clear();
            for (prefix, kind, layer) in model.mlp_linears() {
                if layer % self.cfg.block_stride != 0 {
                    continue;
                }
                let w = model.weights.get(&format!("{prefix}.weight"))?;
                let (out, inp) = w.dims2()?;
                let k = self
                    .cfg
                    .k
                    .unwrap_or_else(|| (self.cfg.density * (out * inp) as f64).round() as usize)
                    .clamp(1, out * inp);
                let id = core.matrices.len();
                core.matrices.push(MatrixState::new(
                    prefix.clone(),
                    kind,
                    layer,
                    out,
                    inp,
                    k,
                    &self.device,
                )?);
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
        let mlp_weights: Vec<String> = model
            .mlp_linears()
            .into_iter()
            .map(|(p, _, _)| format!("{p}.weight"))
            .collect();
        let dense: Vec<String> = match self.cfg.scope {
            Scope::Mlp => model.head_params(),
            Scope::Paper => model
                .weights
                .params
                .keys()
                .filter(|n| !mlp_weights.contains(n))
                .cloned()
                .collect(),
        };
        for n in dense {
            if model.weights.contains(&n) {
                model.weights.set_trainable(&n, true)?;
            }
        }
        self.dense.init(model)
    }

    fn calibrate(&mut self, model: &mut Model, mut cal: Calibration<'_>) -> Result<()> {
        if !self.rotates() {
            return Ok(());
        }
        let cache = self.cache_file(&cal, model);
        let cached = match (&cache, self.preset.clone()) {
            (_, Some(b)) => Some(b),
            (Some(p), None) if p.exists() => Some(load_bases(p)?),
            _ => None,
        };
        let bases = match cached {
            Some(b) => b,
            None => {
                self.basis_phase(model, &mut cal)?;
                let mut core = self.core()?;
                let b = core.gram.finish()?;
                core.gram = Default::default();
                drop(core);
                if let Some(p) = &cache {
                    // A cache that cannot be written only costs the next run time.
                    if let Err(e) = save_bases(p, &b) {
                        tracing::warn!("basis cache {}: {e}", p.display());
                    }
                }
                b
            }
        };
        {
            let mut core = self.core()?;
            core.bases.clear();
            for (k, b) in bases {
                let b = Basis {
                    p: b.p.to_device(&self.device)?,
                    q: b.q.to_device(&self.device)?,
                    ..b
                };
                core.bases.insert(k, HostBasis::new(b)?);
            }
        }
        if self.cfg.support != Support::Dynamic {
            self.select_fixed_supports(model, &mut cal)?;
        }
        let low_precision = !matches!(model.dtype(), DType::F32 | DType::F64);
        let phase = self.train_phase();
        let mut core = self.core()?;
        for m in core.matrices.iter_mut() {
            let w = model.weights.get(&m.weight_name())?;
            if low_precision {
                m.w0 = Some(w.clone());
            } else {
                // f32 weights are updated in place: give each its own storage first, so no
                // clone of the loaded model (or the basis phase's variables) sees the change.
                let own = w.to_dtype(DType::F32)?.copy()?;
                model.weights.insert(m.weight_name(), Param::Frozen(own));
            }
        }
        core.phase = phase;
        Ok(())
    }

    fn begin_step(&mut self, step: usize, micro_batches: usize) -> Result<()> {
        let select = match self.cfg.support {
            Support::Dynamic => true,
            Support::Fixed => false,
            Support::Refreshed => step > 0 && step.is_multiple_of(self.cfg.refresh_every),
        } || !self.rotates();
        self.refreshing = select && self.cfg.support == Support::Refreshed && self.rotates();
        let mut core = self.core()?;
        core.micro_batches = micro_batches.max(1);
        core.phase = Phase::Train { select };
        for m in core.matrices.iter_mut() {
            m.reset_step();
        }
        Ok(())
    }

    fn accumulate(&mut self, model: &Model, grads: GradStore) -> Result<()> {
        self.dense.accumulate(model, &grads)
    }

    fn step(&mut self, model: &mut Model, lr: f64, max_grad_norm: Option<f64>) -> Result<f64> {
        let grads = self.dense.take();
        let mut sq = grad_norm(&grads)?.powi(2);
        let core = self.core.clone();
        let mut core = core
            .lock()
            .map_err(|_| Error::Other("sparse state poisoned".into()))?;
        for m in &core.matrices {
            if let Some((_, g)) = &m.grad {
                sq += g
                    .to_dtype(DType::F64)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f64>()?;
            }
        }
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
        let (mut out, dense_t) = self.dense.state(model)?;
        out.insert(
            "sparse.t".into(),
            Tensor::new(&[self.t as u32, dense_t as u32], &Device::Cpu)?,
        );
        let core = self.core()?;
        for (kind, hb) in &core.bases {
            let k = kind.as_str();
            out.insert(format!("sparse.basis.{k}.p"), hb.basis.p.contiguous()?);
            out.insert(format!("sparse.basis.{k}.q"), hb.basis.q.contiguous()?);
            out.insert(
                format!("sparse.basis.{k}.eig_p"),
                Tensor::new(hb.basis.eig_p.as_slice(), &Device::Cpu)?,
            );
            out.insert(
                format!("sparse.basis.{k}.eig_q"),
                Tensor::new(hb.basis.eig_q.as_slice(), &Device::Cpu)?,
            );
        }
        for m in &core.matrices {
            let p = format!("sparse.{}", m.prefix);
            if let Some(s) = &m.support {
                out.insert(format!("{p}.support"), u32_tensor(s)?);
            }
            if !m.adam.slots.is_empty() {
                let (am, av) = m.adam.host_moments()?;
                out.insert(format!("{p}.adam_index"), u32_tensor(&m.adam.slots.index)?);
                out.insert(format!("{p}.adam_m"), f32_tensor(&am)?);
                out.insert(format!("{p}.adam_v"), f32_tensor(&av)?);
            }
            if !m.delta.slots.is_empty() {
                out.insert(
                    format!("{p}.delta_index"),
                    u32_tensor(&m.delta.slots.index)?,
                );
                out.insert(format!("{p}.delta"), f32_tensor(&m.delta.host_values()?)?);
            }
            out.insert(
                format!("{p}.weight"),
                model.weights.get(&m.weight_name())?.clone(),
            );
            if let Some(w) = &m.warm {
                out.insert(format!("{p}.warm"), w.clone());
            }
            if let Some(w) = &m.w0 {
                out.insert(format!("{p}.w0"), w.clone());
            }
        }
        Ok((out, self.t))
    }

    fn load_state(
        &mut self,
        model: &mut Model,
        state: &BTreeMap<String, Tensor>,
        t: u64,
    ) -> Result<()> {
        let ts: Vec<u32> = state
            .get("sparse.t")
            .ok_or_else(|| Error::Artifact("checkpoint lacks `sparse.t`".into()))?
            .to_vec1()?;
        self.dense.load_state(model, state, ts[1] as u64)?;
        self.t = t;
        let dev = self.device.clone();
        let get = |k: &str| -> Result<Tensor> {
            state
                .get(k)
                .cloned()
                .ok_or_else(|| Error::Artifact(format!("checkpoint lacks `{k}`")))
        };
        let u32s = |k: &str| -> Result<Vec<u32>> {
            Ok(state
                .get(k)
                .map(|t| t.to_vec1())
                .transpose()?
                .unwrap_or_default())
        };
        let f32s = |k: &str| -> Result<Vec<f32>> {
            Ok(state
                .get(k)
                .map(|t| t.to_vec1())
                .transpose()?
                .unwrap_or_default())
        };
        let phase = self.train_phase();
        let mut core = self.core()?;
        if core.rotate {
            let kinds: Vec<MlpKind> = core.matrices.iter().map(|m| m.kind).collect();
            core.bases.clear();
            for kind in kinds {
                if core.bases.contains_key(&kind) {
                    continue;
                }
                let k = kind.as_str();
                let b = Basis {
                    p: get(&format!("sparse.basis.{k}.p"))?.to_device(&dev)?,
                    q: get(&format!("sparse.basis.{k}.q"))?.to_device(&dev)?,
                    eig_p: get(&format!("sparse.basis.{k}.eig_p"))?.to_vec1()?,
                    eig_q: get(&format!("sparse.basis.{k}.eig_q"))?.to_vec1()?,
                    samples: 0,
                };
                core.bases.insert(kind, HostBasis::new(b)?);
            }
        }
        for m in core.matrices.iter_mut() {
            let p = format!("sparse.{}", m.prefix);
            if let Some(s) = state.get(&format!("{p}.support")) {
                m.set_support(s.to_vec1()?, &dev)?;
            }
            m.adam = SparseAdam::from_parts(
                u32s(&format!("{p}.adam_index"))?,
                f32s(&format!("{p}.adam_m"))?,
                f32s(&format!("{p}.adam_v"))?,
                &dev,
            )?;
            m.delta = SparseValues::from_parts(
                u32s(&format!("{p}.delta_index"))?,
                f32s(&format!("{p}.delta"))?,
                &dev,
            )?;
            m.delta_csr = None;
            // A copy of its own: f32 weights are updated in place.
            let w = get(&format!("{p}.weight"))?
                .to_device(&dev)?
                .to_dtype(model.weights.dtype)?
                .copy()?;
            model.weights.insert(m.weight_name(), Param::Frozen(w));
            m.warm = state.get(&format!("{p}.warm")).cloned();
            m.w0 = match state.get(&format!("{p}.w0")) {
                Some(t) => Some(t.to_device(&dev)?),
                // An f32 state loaded into a low-precision model (the GPU check does this):
                // the loaded weight is the base the f32 delta is added to.
                None if !matches!(model.weights.dtype, DType::F32 | DType::F64) => {
                    Some(model.weights.get(&m.weight_name())?.clone())
                }
                None => None,
            };
        }
        core.phase = phase;
        Ok(())
    }

    fn trainable_count(&self, model: &Model) -> usize {
        let sparse: usize = self
            .core()
            .map(|c| c.matrices.iter().map(|m| m.k).sum())
            .unwrap_or(0);
        model.weights.num_params(true) + sparse
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

/// The artifact tensor holding one side of a matrix type's basis.
pub fn basis_tensor_name(kind: MlpKind, side: BasisSide) -> String {
    let s = match side {
        BasisSide::P => "P",
        BasisSide::Q => "Q",
    };
    format!("sparsegrad.basis.{}.{s}", kind.as_str())
}

fn save_bases(path: &std::path::Path, bases: &BTreeMap<MlpKind, Basis>) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    let mut t = BTreeMap::new();
    for (kind, b) in bases {
        let k = kind.as_str();
        t.insert(format!("{k}.p"), b.p.clone());
        t.insert(format!("{k}.q"), b.q.clone());
        t.insert(
            format!("{k}.eig_p"),
            Tensor::new(b.eig_p.as_slice(), &Device::Cpu)?,
        );
        t.insert(
            format!("{k}.eig_q"),
            Tensor::new(b.eig_q.as_slice(), &Device::Cpu)?,
        );
        t.insert(
            format!("{k}.samples"),
            Tensor::new(&[b.samples as u32], &Device::Cpu)?,
        );
    }
    crate::io::write_safetensors(&t, None, path)
}

fn load_bases(path: &std::path::Path) -> Result<BTreeMap<MlpKind, Basis>> {
    let t = candle_core::safetensors::load(path, &Device::Cpu)?;
    let mut out = BTreeMap::new();
    for kind in MlpKind::ALL {
        let k = kind.as_str();
        let (Some(p), Some(q)) = (t.get(&format!("{k}.p")), t.get(&format!("{k}.q"))) else {
            continue;
        };
        let vec64 = |n: &str| -> Result<Vec<f64>> {
            Ok(t.get(n)
                .map(|x| x.to_vec1())
                .transpose()?
                .unwrap_or_default())
        };
        let samples: Vec<u32> = t
            .get(&format!("{k}.samples"))
            .map(|x| x.to_vec1())
            .transpose()?
            .unwrap_or_default();
        out.insert(
            kind,
            Basis {
                p: p.clone(),
                q: q.clone(),
                eig_p: vec64(&format!("{k}.eig_p"))?,
                eig_q: vec64(&format!("{k}.eig_q"))?,
                samples: samples.first().copied().unwrap_or(0) as usize,
            },
        );
    }
    Ok(out)
}
