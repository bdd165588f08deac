//! Serving many fine-tunes over one base model without merging any of them.
//!
//! A delta becomes an *overlay*: a [`Model`] whose weights share every untouched tensor with
//! the base (candle tensors are reference-counted, so sharing costs a pointer) and carry only
//! what the fine-tune changed, in its compact form:
//! - SparseGrad: the sparse values and, per MLP matrix type, only the basis columns the
//!   supports use; the forward pass adds `x Q Sᵀ Pᵀ` ([`SparseDelta`]), so `W₀ + P S Qᵀ` is
//!   never formed;
//! - LoRA: the factors, applied as the adapter they were trained as;
//! - MeProp: the sparse values (no basis);
//! - dense entries (norms, biases, heads, full fine-tuning's matrices): the tensors
//!   themselves, replacing the base's.
//!
//! [`decode_step`] runs one decoding step over sequences of different fine-tunes (and
//! different lengths) at once: rows that share a weight share its matmul.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::artifact::Artifact;
use crate::methods::sparsegrad::basis_tensor_name;
use crate::methods::{BasisSide, DeltaEntry};
use crate::models::{KvCache, MlpKind, Model};
use crate::nn::{Adapter, Param, Weights};
use crate::{Error, Result};

/// A sparse update `ΔW = P S Qᵀ` of one linear layer, kept compact: `y += ((x Q) Sᵀ) Pᵀ`
/// costs two thin matmuls and a gather/scatter of the `k` values.
#[derive(Debug)]
pub struct SparseDelta {
    /// `(in, nq)`: the columns of `Q` the support uses (`None`: no rotation).
    q: Option<Tensor>,
    /// `(np, out)`: the columns of `P` the support uses, transposed so `w Pᵀ` reads it row by
    /// row (`None`: no rotation).
    p_t: Option<Tensor>,
    /// `(k,)` u32: each value's row in `0..np` and column in `0..nq`.
    rows: Tensor,
    cols: Tensor,
    /// `(1, k)` in the model's dtype.
    vals: Tensor,
    /// `np` (or `out` without rotation).
    width: usize,
}

impl SparseDelta {
    /// Every tensor it holds (the bases are shared with the overlay's other matrices).
    fn tensors(&self) -> Vec<&Tensor> {
        let mut out = vec![&self.rows, &self.cols, &self.vals];
        out.extend(self.q.iter().chain(self.p_t.iter()));
        out
    }

    /// `x2 ΔWᵀ` for `x2 (rows, in)`.
    pub fn apply(&self, x2: &Tensor) -> candle_core::Result<Tensor> {
        let n = x2.dim(0)?;
        let z = match &self.q {
            Some(q) => x2.matmul(q)?,
            None => x2.clone(),
        };
        let g = z.index_select(&self.cols, 1)?.broadcast_mul(&self.vals)?;
        let w = Tensor::zeros((n, self.width), x2.dtype(), x2.device())?
            .index_add(&self.rows, &g, 1)?;
        match &self.p_t {
            Some(p_t) => w.matmul(p_t),
            None => Ok(w),
        }
    }
}

/// A fine-tune ready to serve: its overlay and the bytes it holds beyond the base.
pub struct Overlay {
    pub model: Model,
    pub bytes: usize,
}

/// The base model with `art` applied in the forward pass (see the module docs). `base` must
/// be loaded for the artifact's task from the weights it was trained on.
pub fn overlay(base: &Model, art: &Artifact) -> Result<Overlay> {
    let d = &art.descriptor;
    if let Some(fp) = &base.fingerprint {
        if *fp != d.base_model_sha256 {
            return Err(Error::Artifact(format!(
                "base model mismatch: the artifact was trained on sha256 {} but the base has {fp}",
                d.base_model_sha256
            )));
        }
    }
    if base.task != d.task {
        return Err(Error::Artifact(format!(
            "the artifact is for {} but the base is loaded for {}",
            d.task.name(),
            base.task.name()
        )));
    }
    let (dev, dtype) = (base.weights.device.clone(), base.weights.dtype);
    let mut w = Weights {
        params: base.weights.params.clone(),
        adapters: HashMap::new(),
        device: dev.clone(),
        dtype,
    };
    let owned = |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(dtype)?.to_device(&dev)?) };
    let tensor = |name: &str| {
        art.tensors.get(name).ok_or_else(|| {
            Error::Artifact(format!("descriptor names `{name}` but the file lacks it"))
        })
    };
    let mut sparse: BTreeMap<String, Option<MlpKind>> = BTreeMap::new();
    let mut adds: BTreeMap<String, Tensor> = BTreeMap::new();
    for (name, entry) in &d.entries {
        let t = tensor(name)?;
        match entry {
            DeltaEntry::Dense { param } => {
                if let Some(b) = base.weights.get_opt(param) {
                    if b.dims() != t.dims() {
                        return Err(Error::Artifact(format!(
                            "`{param}` has shape {:?} in the artifact but {:?} in the base model",
                            t.dims(),
                            b.dims()
                        )));
                    }
                }
                w.insert(param.clone(), Param::Frozen(owned(t.clone())?));
            }
            DeltaEntry::Lora { .. } => {}
            DeltaEntry::Sparse { param, basis } => {
                sparse.insert(param.clone(), *basis);
            }
            DeltaEntry::Basis { .. } => {}
            DeltaEntry::Add { param } => {
                let t = t.to_dtype(DType::F32)?;
                let sum = match adds.remove(param) {
                    Some(prev) => (prev + t)?,
                    None => t,
                };
                adds.insert(param.clone(), sum);
            }
        }
    }
    for (linear, (a, b, scale)) in art.lora_pairs()? {
        let (out, inp) = base.weights.get(&format!("{linear}.weight"))?.dims2()?;
        let (r, a_in) = a.dims2()?;
        if a_in != inp || b.dims() != [out, r] {
            return Err(Error::Artifact(format!(
                "LoRA delta for `{linear}` does not fit its weight"
            )));
        }
        w.insert(format!("{linear}.lora_A.weight"), Param::Frozen(owned(a)?));
        w.insert(format!("{linear}.lora_B.weight"), Param::Frozen(owned(b)?));
        w.adapters.insert(
            linear,
            Adapter::Lora {
                scale,
                dropout: 0.0,
            },
        );
    }
    // A dense addition (SparseGrad's basis phase) is folded into the weight: it is as large
    // as the weight anyway.
    for (param, add) in adds {
        let b = base.weights.get(&param)?;
        if b.dims() != add.dims() {
            return Err(Error::Artifact(format!(
                "delta for `{param}` has shape {:?} but the weight {:?}",
                add.dims(),
                b.dims()
            )));
        }
        let merged = (b
            .to_dtype(DType::F32)?
            .to_device(&candle_core::Device::Cpu)?
            + add)?;
        w.insert(param, Param::Frozen(owned(merged)?));
    }
    // Each basis is trimmed to the columns some support of its type uses, once per type.
    // Per matrix: its shape, each value's row and column, the values.
    type Support = ((usize, usize), Vec<u32>, Vec<u32>, Vec<f32>);
    let mut supports: BTreeMap<String, Support> = BTreeMap::new();
    let mut used: BTreeMap<(MlpKind, BasisSide), BTreeSet<u32>> = BTreeMap::new();
    for (param, kind) in &sparse {
        let (out, inp) = base.weights.get(param)?.dims2()?;
        let (idx, vals) = art.sparse_entries(param, out, inp)?;
        let rows: Vec<u32> = idx.iter().map(|&i| i / inp as u32).collect();
        let cols: Vec<u32> = idx.iter().map(|&i| i % inp as u32).collect();
        if let Some(k) = kind {
            used.entry((*k, BasisSide::P)).or_default().extend(&rows);
            used.entry((*k, BasisSide::Q)).or_default().extend(&cols);
        }
        supports.insert(param.clone(), ((out, inp), rows, cols, vals));
    }
    // Per basis side: its used columns as a tensor and where each original column went.
    let mut trimmed: HashMap<(MlpKind, BasisSide), (Tensor, HashMap<u32, u32>)> = HashMap::new();
    for ((kind, side), cols) in used {
        let name = basis_tensor_name(kind, side);
        let full = tensor(&name)?;
        let n = full.dims2()?.0;
        let cols: Vec<u32> = cols.into_iter().collect();
        if cols
            .last()
            .is_some_and(|&c| c as usize >= full.dims2().map(|d| d.1).unwrap_or(0))
        {
            return Err(Error::Artifact(format!(
                "`{name}` is narrower than its support"
            )));
        }
        let ix = Tensor::from_slice(&cols, cols.len(), full.device())?;
        let t = full.contiguous()?.index_select(&ix, 1)?;
        debug_assert_eq!(t.dims(), [n, cols.len()]);
        // P is read as `Pᵀ` (np, out) by the product: stored that way, once per type.
        let t = owned(match side {
            BasisSide::P => t.t()?.contiguous()?,
            BasisSide::Q => t,
        })?;
        let pos = cols
            .iter()
            .enumerate()
            .map(|(j, &c)| (c, j as u32))
            .collect();
        trimmed.insert((kind, side), (t, pos));
    }
    for (param, ((out, inp), rows, cols, vals)) in supports {
        let kind = sparse[&param];
        let side = |s: BasisSide| -> Result<Option<&(Tensor, HashMap<u32, u32>)>> {
            match kind {
                None => Ok(None),
                Some(k) => trimmed.get(&(k, s)).map(Some).ok_or_else(|| {
                    Error::Artifact(format!("artifact lacks a basis for `{}`", k.as_str()))
                }),
            }
        };
        let (p, q) = (side(BasisSide::P)?, side(BasisSide::Q)?);
        if let (Some((pt, _)), Some((qt, _))) = (p, q) {
            if pt.dim(1)? != out || qt.dim(0)? != inp {
                return Err(Error::Artifact(format!(
                    "the basis of `{param}` does not fit its {out}×{inp} weight"
                )));
            }
        }
        let remap = |ids: Vec<u32>, s: Option<&(Tensor, HashMap<u32, u32>)>| match s {
            Some((_, pos)) => ids.iter().map(|i| pos[i]).collect(),
            None => ids,
        };
        let k = vals.len();
        let rows = remap(rows, p);
        let cols = remap(cols, q);
        let rows_t = Tensor::from_vec(rows, k, &dev)?;
        let cols_t = Tensor::from_vec(cols, k, &dev)?;
        let vals = owned(Tensor::from_vec(vals, (1, k), &candle_core::Device::Cpu)?)?;
        let width = p.map_or(out, |(t, _)| t.dims2().map(|d| d.0).unwrap_or(0));
        let prefix = param
            .strip_suffix(".weight")
            .ok_or_else(|| Error::Artifact(format!("sparse entry `{param}` is not a weight")))?
            .to_string();
        w.adapters.insert(
            prefix,
            Adapter::Sparse(Arc::new(SparseDelta {
                q: q.map(|(t, _)| t.clone()),
                p_t: p.map(|(t, _)| t.clone()),
                rows: rows_t,
                cols: cols_t,
                vals,
                width,
            })),
        );
    }
    let model = Model {
        arch: base.arch,
        task: base.task.clone(),
        architecture: crate::models::from_config(&base.raw_config)?,
        raw_config: base.raw_config.clone(),
        weights: w,
        fingerprint: base.fingerprint.clone(),
    };
    let bytes = held_bytes(&base.weights, &model.weights);
    Ok(Overlay { model, bytes })
}

/// Bytes `w` holds beyond `base`: each tensor it does not share with the base, once (a
/// basis serves every matrix of its type).
fn held_bytes(base: &Weights, w: &Weights) -> usize {
    let shared: HashSet<candle_core::TensorId> =
        base.params.values().map(|p| p.tensor().id()).collect();
    let mut seen: HashSet<candle_core::TensorId> = HashSet::new();
    let params = w.params.values().map(Param::tensor);
    let adapters = w.adapters.values().flat_map(|a| match a {
        Adapter::Sparse(d) => d.tensors(),
        _ => Vec::new(),
    });
    params
        .chain(adapters)
        .filter(|t| !shared.contains(&t.id()) && seen.insert(t.id()))
        .map(|t| t.elem_count() * t.dtype().size_in_bytes())
        .sum()
}

/// Lays every linear weight of `model` out for products over a few rows at a time: each
/// `W (out, in)` becomes a transposed view of a contiguous `Wᵀ`, so `x Wᵀ` reads `Wᵀ` row by
/// row. On the CPU, gemm then skips repacking the whole matrix per call: for 2–32 rows (a
/// decoding step over several streams) the product takes 40–60% less time, for one row the
/// same. Values are unchanged; tensors laid out already (shared with a base done before) are
/// left alone.
pub fn layout_for_serving(model: &mut Model) -> Result<()> {
    let mut prefixes: Vec<String> = model.mlp_linears().into_iter().map(|l| l.0).collect();
    prefixes.extend(model.attention_linears());
    for p in prefixes {
        let name = format!("{p}.weight");
        if let Some(Param::Frozen(t)) = model.weights.params.get(&name) {
            if t.rank() == 2 && t.is_contiguous() {
                let r = t.t()?.contiguous()?.t()?;
                model.weights.insert(name, Param::Frozen(r));
            }
        }
    }
    Ok(())
}

/// One sequence in a [`decode_step`]: the fine-tune (or base) it runs, the tokens it adds
/// and the cache of what it saw before.
pub struct StepSeq<'a> {
    pub model: &'a Model,
    pub ids: &'a [u32],
    pub cache: &'a mut KvCache,
}

/// One decoding step over sequences that may each run a different overlay of the same base
/// and hold a different amount of context (a prompt being read beside streams producing one
/// token each): the next-token logits after each sequence's last new token, `(n, V)`.
/// Sequences of the same model should be adjacent: each run of them shares its adapters'
/// work.
pub fn decode_step(seqs: &mut [StepSeq<'_>]) -> Result<Tensor> {
    let first = seqs
        .first()
        .ok_or_else(|| Error::Other("a decoding step needs a sequence".into()))?;
    let arch = first.model.arch;
    if seqs
        .iter()
        .any(|s| s.model.arch != arch || s.ids.is_empty())
    {
        return Err(Error::Other(
            "a decoding step's sequences share one architecture and add a token each at least"
                .into(),
        ));
    }
    let architecture = &first.model.architecture;
    architecture.decode_rows(seqs)?.ok_or_else(|| {
        Error::Model(format!(
            "{} models do not decode incrementally",
            arch.as_str()
        ))
    })
}

/// The rows of a step, grouped by the weights they run: `(first row, rows, weights)`, runs of
/// adjacent sequences with the same model merged.
pub(crate) struct RowGroups<'a> {
    pub groups: Vec<(usize, usize, &'a Weights)>,
}

impl<'a> RowGroups<'a> {
    pub fn new(parts: impl IntoIterator<Item = (usize, &'a Weights)>) -> Self {
        let mut groups: Vec<(usize, usize, &'a Weights)> = Vec::new();
        let mut row = 0;
        for (n, w) in parts {
            match groups.last_mut() {
                Some(g) if std::ptr::eq(g.2, w) => g.1 += n,
                _ => groups.push((row, n, w)),
            }
            row += n;
        }
        RowGroups { groups }
    }

    /// `f` per group on its rows, the results stacked; once over all rows when every group
    /// reads the same tensor `name`.
    fn per_group(
        &self,
        name: &str,
        x: &Tensor,
        f: impl Fn(&Weights, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        if self.shared(name)? {
            return f(self.groups[0].2, x);
        }
        let parts = self
            .groups
            .iter()
            .map(|&(r, n, w)| f(w, &x.narrow(0, r, n)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    fn shared(&self, name: &str) -> Result<bool> {
        let first = self.groups[0].2.get(name)?.id();
        for (_, _, w) in &self.groups[1..] {
            if w.get(name)?.id() != first {
                return Ok(false);
            }
        }
        Ok(true)
    }

    pub fn embedding(&self, name: &str, ids: &Tensor) -> Result<Tensor> {
        self.per_group(name, ids, |w, ids| w.embedding(name, ids))
    }

    pub fn rms_norm(&self, prefix: &str, x: &Tensor, eps: f64) -> Result<Tensor> {
        self.per_group(&format!("{prefix}.weight"), x, |w, x| {
            w.rms_norm(prefix, x, eps)
        })
    }

    /// `x W_gᵀ + b_g + adapter_g(x)` on each group's rows `x (rows, in)`: one matmul per
    /// distinct weight tensor (the base's, shared by every overlay that leaves it alone),
    /// then each group's bias and adapter.
    pub fn linear(&self, prefix: &str, x: &Tensor) -> Result<Tensor> {
        self.product(&format!("{prefix}.weight"), Some(prefix), x)
    }

    /// `x Wᵀ` through the output projection `name`.
    pub fn project(&self, name: &str, x: &Tensor) -> Result<Tensor> {
        self.product(name, None, x)
    }

    fn product(&self, weight: &str, prefix: Option<&str>, x: &Tensor) -> Result<Tensor> {
        let n = self.groups.len();
        let mut base: Vec<Option<Tensor>> = vec![None; n];
        let mut done: HashSet<candle_core::TensorId> = HashSet::new();
        for g in 0..n {
            let wt = self.groups[g].2.get(weight)?;
            if !done.insert(wt.id()) {
                continue;
            }
            let members: Vec<usize> = (g..n)
                .filter(|&h| {
                    self.groups[h]
                        .2
                        .get(weight)
                        .is_ok_and(|t| t.id() == wt.id())
                })
                .collect();
            let xs = if members.len() == n {
                x.clone()
            } else {
                let parts = members
                    .iter()
                    .map(|&h| x.narrow(0, self.groups[h].0, self.groups[h].1))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&parts, 0)?
            };
            let y = crate::nn::frozen_linear(&xs, wt, None)?;
            let mut at = 0;
            for &h in &members {
                let rows = self.groups[h].1;
                base[h] = Some(y.narrow(0, at, rows)?);
                at += rows;
            }
        }
        let mut parts = Vec::with_capacity(n);
        for (g, y) in base.into_iter().enumerate() {
            let (r, rows, w) = self.groups[g];
            let mut y = y.ok_or_else(|| Error::Other("row group without a product".into()))?;
            if let Some(prefix) = prefix {
                if let Some(b) = w.get_opt(&format!("{prefix}.bias")) {
                    y = y.broadcast_add(b)?;
                }
                if let Some(d) = w.adapter_delta(prefix, &x.narrow(0, r, rows)?)? {
                    y = (y + d)?;
                }
            }
            parts.push(y);
        }
        if parts.len() == 1 {
            return Ok(parts.pop().expect("one part"));
        }
        Ok(Tensor::cat(&parts, 0)?)
    }
}
