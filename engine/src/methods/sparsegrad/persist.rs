//! SparseGrad's checkpointed state — dense trainer, bases, supports, sparse moments and
//! deltas, the sparse weights (and bf16 bases `W₀`) — and restoring it on resume.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use super::adam::{SparseAdam, SparseValues};
use super::basis::Basis;
use super::state::HostBasis;
use super::SparseMlp;
use crate::models::{MlpKind, Model};
use crate::nn::Param;
use crate::{Error, Result};

fn u32_tensor(v: &[u32]) -> Result<Tensor> {
    Ok(Tensor::from_slice(v, v.len(), &Device::Cpu)?)
}
fn f32_tensor(v: &[f32]) -> Result<Tensor> {
    Ok(Tensor::from_slice(v, v.len(), &Device::Cpu)?)
}

impl SparseMlp {
    pub(super) fn save_state(&self, model: &Model) -> Result<(BTreeMap<String, Tensor>, u64)> {
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
            if let Some(e) = &m.ema {
                out.insert(format!("{p}.ema"), e.clone());
            }
        }
        Ok((out, self.t))
    }

    pub(super) fn restore_state(
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
            m.ema = state
                .get(&format!("{p}.ema"))
                .map(|e| e.to_device(&dev))
                .transpose()?;
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
}
