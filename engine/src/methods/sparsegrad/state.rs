//! What the sparse methods keep per MLP matrix and the hook that feeds it during backward.
//!
//! The hook sees a layer's input `x (T×in)` and upstream gradient `g (T×out)` inside the
//! layer's own backward, forms the weight gradient, rotates it (SparseGrad) and reduces it
//! to what the step needs — k values — before the next layer's backward runs, so no more
//! than one matrix's dense gradient is alive at a time.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

use super::adam::{SparseAdam, SparseValues};
use super::basis::{Basis, GramAccumulator};
use crate::kernels::{self, Csr};
use crate::models::MlpKind;
use crate::nn::WeightGradHook;
use crate::{Error, Result};

/// What the hooks do with a gradient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Not collecting (evaluation, or a method between phases).
    Idle,
    /// Basis phase: add `G Gᵀ`, `Gᵀ G` to the per-type Gram sums (and keep `G` when the
    /// basis phase also updates the weights).
    Gram { keep: bool },
    /// Support selection: accumulate `|G̃|` per matrix.
    Score,
    /// Training. `select`: take this step's top-k (dynamic support, or a refresh step);
    /// otherwise gather the gradient on the matrix's support.
    Train { select: bool },
}

/// A basis laid out for sparse expansion: `P` and `Q` are kept as transposed views of
/// contiguous `Pᵀ`, `Qᵀ`, whose rows (the basis vectors) the expansion reads in place — one
/// copy of each basis, not two.
pub struct HostBasis {
    pub basis: Basis,
    pt: Tensor,
    qt: Tensor,
}

impl HostBasis {
    pub fn new(basis: Basis) -> Result<Self> {
        let pt = basis.p.to_dtype(DType::F32)?.t()?.contiguous()?;
        let qt = basis.q.to_dtype(DType::F32)?.t()?.contiguous()?;
        Ok(HostBasis {
            basis: Basis {
                p: pt.t()?,
                q: qt.t()?,
                ..basis
            },
            pt,
            qt,
        })
    }

    /// `G̃ = Pᵀ G Q`.
    pub fn rotate(&self, g: &Tensor) -> Result<Tensor> {
        Ok(self.pt.matmul(g)?.matmul(&self.basis.q)?)
    }

    /// The sparse factor of `P S Qᵀ` grouped for [`kernels::scatter_rows`]: it is multiplied
    /// first, with the larger basis, so the one dense product costs `out·in·min(out, in)`.
    pub fn csr(out: usize, inp: usize, idx: &[u32], dev: &Device) -> Result<Csr> {
        let inp32 = inp as u32;
        if out >= inp {
            // (P S)ᵀ (in×out): row c += v · P[:, r]
            let pairs: Vec<(u32, u32)> = idx.iter().map(|&i| (i % inp32, i / inp32)).collect();
            Csr::new(inp, &pairs, dev)
        } else {
            // S Qᵀ (out×in): row r += v · Q[:, c]
            let pairs: Vec<(u32, u32)> = idx.iter().map(|&i| (i / inp32, i % inp32)).collect();
            Csr::new(out, &pairs, dev)
        }
    }

    /// `W += P S Qᵀ` in place, for a contiguous f32 `W (out×in)` the caller owns; `S` is the
    /// entries of `csr` (from [`Self::csr`]) with values `vals` in index order.
    pub fn add_expanded(&self, w: &Tensor, csr: &Csr, vals: &Tensor) -> Result<()> {
        let (out, inp) = w.dims2()?;
        if out >= inp {
            let r = kernels::scatter_rows(csr, vals, &self.pt)?;
            kernels::gemm_acc(w, &r.t()?, &self.qt)
        } else {
            let n = kernels::scatter_rows(csr, vals, &self.qt)?;
            kernels::gemm_acc(w, &self.basis.p, &n)
        }
    }

    /// `P S Qᵀ` for a sparse `S (out×in)` given by flat indices and values, as a dense f32
    /// tensor on the basis' device.
    pub fn expand(&self, out: usize, inp: usize, idx: &[u32], vals: &[f32]) -> Result<Tensor> {
        let dev = self.basis.p.device();
        let w = Tensor::zeros((out, inp), DType::F32, dev)?;
        let csr = Self::csr(out, inp, idx, dev)?;
        self.add_expanded(&w, &csr, &Tensor::from_slice(vals, vals.len(), dev)?)?;
        Ok(w)
    }
}

/// `S` itself as a dense f32 tensor (MeProp: no rotation).
pub fn expand_plain(
    out: usize,
    inp: usize,
    idx: &[u32],
    vals: &[f32],
    dev: &Device,
) -> Result<Tensor> {
    let mut buf = vec![0f32; out * inp];
    for (&i, &v) in idx.iter().zip(vals) {
        buf[i as usize] += v;
    }
    Ok(Tensor::from_vec(buf, (out, inp), dev)?)
}

pub struct SupportBlock {
    rows: Tensor,
    cols: Tensor,
    n_rows: usize,
    n_cols: usize,
    /// Position of each support entry (in support order) in the row-major block.
    pos: Tensor,
    /// The support grouped for the update `W += P S Qᵀ` (built once per support).
    pub csr: Csr,
}

impl SupportBlock {
    fn new(support: &[u32], out: usize, inp: usize, dev: &Device) -> Result<Self> {
        let mut rows: Vec<u32> = support.iter().map(|&i| i / inp as u32).collect();
        let mut cols: Vec<u32> = support.iter().map(|&i| i % inp as u32).collect();
        rows.sort_unstable();
        rows.dedup();
        cols.sort_unstable();
        cols.dedup();
        let nc = cols.len();
        let pos: Vec<u32> = support
            .iter()
            .map(|&i| {
                let r = rows.binary_search(&(i / inp as u32)).expect("own row");
                let c = cols.binary_search(&(i % inp as u32)).expect("own col");
                (r * nc + c) as u32
            })
            .collect();
        Ok(SupportBlock {
            n_rows: rows.len(),
            n_cols: nc,
            rows: Tensor::from_slice(&rows, rows.len(), dev)?,
            cols: Tensor::from_slice(&cols, nc, dev)?,
            pos: Tensor::from_slice(&pos, pos.len(), dev)?,
            csr: HostBasis::csr(out, inp, support, dev)?,
        })
    }

    /// `(Pᵀ G Q)` on the block's rows and columns, `G = gᵀ x`, by whichever order of
    /// products is cheaper for this many tokens.
    fn rotated(&self, b: &HostBasis, x: &Tensor, g: &Tensor) -> Result<Tensor> {
        // Rows of Pᵀ and Qᵀ are the basis vectors: gather them contiguously.
        let pr = b.pt.index_select(&self.rows, 0)?.t()?;
        let qc = b.qt.index_select(&self.cols, 0)?.t()?;
        let (t, o, i) = (x.dim(0)?, g.dim(1)?, x.dim(1)?);
        let (r, c) = (self.n_rows, self.n_cols);
        let via_weight = t * o * i + r * o * i + r * i * c;
        let via_tokens = t * o * r + t * i * c + r * t * c;
        Ok(if via_weight <= via_tokens {
            pr.t()?.matmul(&g.t()?.matmul(x)?)?.matmul(&qc)?
        } else {
            g.matmul(&pr)?.t()?.matmul(&x.matmul(&qc)?)?
        })
    }
}

pub struct MatrixState {
    /// The linear's prefix; the weight is `{prefix}.weight`.
    pub prefix: String,
    pub kind: MlpKind,
    pub layer: usize,
    pub out: usize,
    pub inp: usize,
    pub k: usize,
    /// The current support, ascending (fixed and refreshed supports).
    pub support: Option<Vec<u32>>,
    /// The support's distinct rows and columns, and its entries' positions in the
    /// `rows × cols` block: the rotated gradient is only ever formed on that block.
    pub block: Option<SupportBlock>,
    /// The CSR of every entry of `delta` (low-precision weights re-expand all of it each
    /// step), with the entry count it was built for: slots only grow, so the count says
    /// whether it is current.
    pub delta_csr: Option<(usize, Csr)>,
    pub adam: SparseAdam,
    /// Accumulated `ΔW̃` on every entry ever updated.
    pub delta: SparseValues,
    /// The dense change of the basis phase, when it updates the weights.
    pub warm: Option<Tensor>,
    /// The weight as the sparse phase started (kept only for low-precision weights, which
    /// are recomputed from it each step instead of accumulating rounding).
    pub w0: Option<Tensor>,
    /// This step's rotated gradient summed over micro-batches, until selection.
    acc: Option<Tensor>,
    /// This step's gradient: indices (host) and values (f32 on the model's device).
    pub grad: Option<(Vec<u32>, Tensor)>,
    seen: usize,
    /// Basis phase with updates: the dense gradient of this micro-batch.
    pub dense_grad: Option<Tensor>,
    pub score: Option<Tensor>,
    /// `ema` support: the running average of `|G̃|`.
    pub ema: Option<Tensor>,
    /// The leading `(rows, cols)` of the rotated matrix the support may use (all of it
    /// unless `max_basis_columns` caps it).
    pub lead: (usize, usize),
}

impl MatrixState {
    pub fn new(
        prefix: String,
        kind: MlpKind,
        layer: usize,
        out: usize,
        inp: usize,
        k: usize,
        dev: &Device,
    ) -> Result<Self> {
        Ok(MatrixState {
            prefix,
            kind,
            layer,
            out,
            inp,
            k,
            support: None,
            block: None,
            delta_csr: None,
            adam: SparseAdam::new(dev)?,
            delta: SparseValues::new(dev)?,
            warm: None,
            w0: None,
            acc: None,
            grad: None,
            seen: 0,
            dense_grad: None,
            score: None,
            ema: None,
            lead: (out, inp),
        })
    }

    /// Top-k of `|a|` (this matrix's rotated gradient or score) within its leading block.
    pub fn select(&self, a: &Tensor) -> Result<(Vec<u32>, Tensor)> {
        topk_leading(a, self.k, self.lead)
    }

    /// `ema` support: folds this step's `|G̃|` into the average, re-selects the support from
    /// it on a refresh step, and gathers the step's gradient on the (new) support.
    fn ema_step(&mut self, acc: &Tensor, beta: f64, refresh: bool) -> Result<(Vec<u32>, Tensor)> {
        let a = acc.abs()?;
        let avg = match self.ema.take() {
            Some(e) => ((e * beta)? + (a * (1.0 - beta))?)?,
            None => a,
        };
        let idx = if refresh {
            self.select(&avg)?.0
        } else {
            self.support.clone().unwrap_or_default()
        };
        self.ema = Some(avg);
        let at = Tensor::from_slice(&idx, idx.len(), acc.device())?;
        let vals = acc.flatten_all()?.index_select(&at, 0)?;
        Ok((idx, vals))
    }

    pub fn weight_name(&self) -> String {
        format!("{}.weight", self.prefix)
    }

    pub fn set_support(&mut self, support: Vec<u32>, dev: &Device) -> Result<()> {
        self.block = Some(SupportBlock::new(&support, self.out, self.inp, dev)?);
        self.support = Some(support);
        Ok(())
    }

    pub fn reset_step(&mut self) {
        self.acc = None;
        self.grad = None;
        self.seen = 0;
    }
}

/// Flat indices (ascending, into the whole `(out, in)` matrix) and values of the `k`
/// largest-magnitude entries of `a` within its leading `rows × cols` block: a support limited
/// to the first eigenvectors of each basis, so the artifact stores only those columns.
pub fn topk_leading(
    a: &Tensor,
    k: usize,
    (rows, cols): (usize, usize),
) -> Result<(Vec<u32>, Tensor)> {
    let (out, inp) = a.dims2()?;
    if rows >= out && cols >= inp {
        return kernels::topk_abs(a, k);
    }
    let block = a.narrow(0, 0, rows)?.narrow(1, 0, cols)?.contiguous()?;
    let (local, vals) = kernels::topk_abs(&block, k.min(rows * cols))?;
    let (c, w) = (cols as u32, inp as u32);
    // Row-major in the block stays row-major (and ascending) in the matrix.
    let idx = local.into_iter().map(|l| (l / c) * w + l % c).collect();
    Ok((idx, vals))
}

/// State shared by the method and the hooks of every sparse matrix.
pub struct Core {
    pub phase: Phase,
    /// SparseGrad rotates; MeProp selects in the original basis.
    pub rotate: bool,
    pub micro_batches: usize,
    pub matrices: Vec<MatrixState>,
    pub bases: BTreeMap<MlpKind, HostBasis>,
    pub gram: GramAccumulator,
    /// Whether this step forms each matrix's whole gradient to measure its energy (always
    /// where top-k needs it; sometimes on a fixed support, which otherwise never forms it).
    pub measure: bool,
    /// `‖G‖²` summed over the matrices measured this step, and how many were.
    pub dense_sq: f64,
    pub measured: usize,
    /// `ema` support: the average's decay per step (`None` for the other supports).
    pub ema: Option<f32>,
    /// `ema` support: whether this step re-selects the support from the average.
    pub refresh: bool,
}

impl Core {
    pub fn new(rotate: bool) -> Self {
        Core {
            phase: Phase::Idle,
            rotate,
            micro_batches: 1,
            matrices: Vec::new(),
            bases: BTreeMap::new(),
            gram: GramAccumulator::default(),
            measure: false,
            dense_sq: 0.0,
            measured: 0,
            ema: None,
            refresh: false,
        }
    }

    fn rotated(&self, kind: MlpKind, g: Tensor) -> Result<Tensor> {
        if !self.rotate {
            return Ok(g);
        }
        self.bases
            .get(&kind)
            .ok_or_else(|| Error::Other(format!("no basis for {kind:?}")))?
            .rotate(&g)
    }

    fn on_grad(&mut self, id: usize, x: &Tensor, g: &Tensor) -> Result<()> {
        let phase = self.phase;
        if phase == Phase::Idle {
            return Ok(());
        }
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let g = g.to_dtype(DType::F32)?.contiguous()?;
        let kind = self.matrices[id].kind;
        if let Phase::Train { select: false } = phase {
            if self.matrices[id].block.is_some() {
                let prev = self.matrices[id].grad.take().map(|(_, v)| v);
                let block = self.matrices[id].block.as_ref().expect("checked");
                // Fixed support: only the support's rows and columns of G̃ are formed.
                let on_block = match self.bases.get(&kind) {
                    Some(b) if self.rotate => block.rotated(b, &x, &g)?,
                    _ => {
                        let gr = g.index_select(&block.rows, 1)?;
                        let xc = x.index_select(&block.cols, 1)?;
                        gr.t()?.matmul(&xc)?
                    }
                };
                let vals = kernels::gather_acc(&on_block, &block.pos, prev.as_ref())?;
                let measure = self.measure;
                let micro_batches = self.micro_batches;
                let m = &mut self.matrices[id];
                m.grad = Some((m.support.clone().unwrap_or_default(), vals));
                if measure {
                    // ‖G̃‖ = ‖G‖ (orthonormal bases): the plain sum over micro-batches will do.
                    let dense = g.t()?.matmul(&x)?;
                    m.seen += 1;
                    let acc = match m.acc.take() {
                        Some(a) => (a + dense)?,
                        None => dense,
                    };
                    if m.seen >= micro_batches {
                        self.dense_sq += sq_norm(&acc)?;
                        self.measured += 1;
                    } else {
                        m.acc = Some(acc);
                    }
                }
                return Ok(());
            }
        }
        // G = gᵀ x: (out, in)
        let grad = g.t()?.matmul(&x)?;
        match phase {
            Phase::Idle => {}
            Phase::Gram { keep } => {
                self.gram.add(kind, &grad)?;
                if keep {
                    self.matrices[id].dense_grad = Some(grad);
                }
            }
            Phase::Score => {
                let a = self.rotated(kind, grad)?.abs()?;
                let m = &mut self.matrices[id];
                m.score = Some(match m.score.take() {
                    Some(s) => (s + a)?,
                    None => a,
                });
            }
            Phase::Train { .. } => {
                // Top-k of the step's summed gradient: with accumulation the dense sum lives
                // until the last micro-batch.
                let gt = self.rotated(kind, grad)?;
                let m = &mut self.matrices[id];
                m.seen += 1;
                let acc = match m.acc.take() {
                    Some(a) => (a + gt)?,
                    None => gt,
                };
                if m.seen >= self.micro_batches {
                    m.grad = Some(match self.ema {
                        Some(beta) => m.ema_step(&acc, beta as f64, self.refresh)?,
                        None => m.select(&acc)?,
                    });
                    self.dense_sq += sq_norm(&acc)?;
                    self.measured += 1;
                } else {
                    m.acc = Some(acc);
                }
            }
        }
        Ok(())
    }
}

/// `‖t‖²` in f64.
pub fn sq_norm(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f64>()?)
}

/// The hook attached to one sparse matrix.
pub struct Tap {
    pub id: usize,
    pub core: Arc<Mutex<Core>>,
    pub anchor: Tensor,
}

impl WeightGradHook for Tap {
    fn on_backward(&self, x: &Tensor, grad_out: &Tensor) -> candle_core::Result<()> {
        self.core
            .lock()
            .map_err(|_| candle_core::Error::Msg("sparse state poisoned".into()))?
            .on_grad(self.id, x, grad_out)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
    fn anchor(&self) -> &Tensor {
        &self.anchor
    }
}
