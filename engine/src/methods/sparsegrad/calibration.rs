//! SparseGrad's calibration: the basis phase (gradient statistics → bases, cached between
//! runs on the same base model and data), then the fixed support from the same batches.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};

use super::adam::SparseAdam;
use super::basis::Basis;
use super::state::{HostBasis, Phase};
use super::{SparseMlp, Support};
use crate::methods::Calibration;
use crate::models::{MlpKind, Model};
use crate::nn::Param;
use crate::optim::{clip_scale, grad_norm, AdamW};
use crate::{Error, Result};

impl SparseMlp {
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
            // The head the basis-phase gradients flow through depends on these.
            "head_warmup_steps": self.cfg.head_warmup_steps,
            "scope": self.cfg.scope,
            "dense_lr": cal.lr * self.dense_lr_scale(),
            "max_grad_norm": cal.max_grad_norm,
        });
        let sha = crate::io::sha256_bytes(id.to_string().as_bytes());
        Some(dir.join(format!("bases-{}.safetensors", &sha[..32])))
    }

    /// Trains the dense parameters alone for `head_warmup_steps` steps, on the first
    /// training batches at the run's dense learning rate (the sparse matrices' hooks idle).
    fn warm_head(&mut self, model: &mut Model, cal: &mut Calibration<'_>) -> Result<()> {
        self.core()?.phase = Phase::Idle;
        let lr = cal.lr * self.dense_lr_scale();
        for i in 0..self.cfg.head_warmup_steps {
            let grads = (cal.backward)(model, i)?;
            self.dense.accumulate(model, &grads)?;
            drop(grads);
            self.dense.step(lr, cal.max_grad_norm)?;
        }
        Ok(())
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
        let mlp_lr = cal.lr * self.cfg.basis_update_lr_scale.unwrap_or(1.0);
        self.core()?.phase = Phase::Gram { keep: true };
        for i in 0..n {
            let grads = (cal.backward)(model, i)?;
            self.dense.accumulate(model, &grads)?;
            drop(grads);
            let dense = self.dense.take();
            let mut g = BTreeMap::new();
            for m in self.core()?.matrices.iter_mut() {
                if let Some(d) = m.dense_grad.take() {
                    g.insert(m.weight_name(), d);
                }
            }
            // Clipped over everything this step moves, as a training step is: these are
            // whole-matrix updates, where one outsized gradient does the most damage.
            let norm = (grad_norm(&dense)?.powi(2) + grad_norm(&g)?.powi(2)).sqrt();
            let scale = clip_scale(norm, cal.max_grad_norm);
            self.dense
                .apply(&dense, cal.lr * self.dense_lr_scale(), scale)?;
            opt.step_scaled(&g, mlp_lr, scale)?;
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
            let (sup, _) = m.select(&score)?;
            if self.cfg.support == Support::Ema {
                // Seeded with the basis phase's mean |G̃|.
                m.ema = Some((score / self.cfg.basis_steps.max(1) as f64)?);
            }
            m.adam = SparseAdam::with_support(&sup, &dev)?;
            m.set_support(sup, &dev)?;
        }
        Ok(())
    }

    /// Adds `S` (entries `idx`, values `vals`; `csr` when the caller has it cached) to the
    /// f32 weight `w`: in place `W += P S Qᵀ` for SparseGrad (`w` must be owned by the
    /// caller), a new tensor `W + S` for MeProp.
    /// The basis phase (or cached / preset bases), then the fixed support if any.
    pub(super) fn calibrate_mlp(
        &mut self,
        model: &mut Model,
        mut cal: Calibration<'_>,
    ) -> Result<()> {
        if !self.rotates() {
            return Ok(());
        }
        self.warm_head(model, &mut cal)?;
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
            let paper = self.paper();
            for (k, b) in bases {
                // The authors rotate the input side by u3ᵀ: their gradient is `Pᵀ G Qᵀ`, which
                // is ours with `Qᵀ` as the basis (and the delta then `P S Q`).
                let q = if paper { b.q.t()?.contiguous()? } else { b.q };
                let b = Basis {
                    p: b.p.to_device(&self.device)?,
                    q: q.to_device(&self.device)?,
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
