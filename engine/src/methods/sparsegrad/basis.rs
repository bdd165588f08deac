//! Bases from gradient statistics: `P` = eigenvectors of `Σ G Gᵀ` (out×out), `Q` = eigenvectors of
//! `Σ Gᵀ G` (in×in), eigenvalues descending — the mode-2 / mode-3 singular vectors of the stacked
//! gradient tensor, without ever stacking it. The sums accumulate on the gradients' device; the
//! symmetric eigensolver runs in f64 (faer).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use crate::models::MlpKind;
use crate::{Error, Result};

/// Running `Σ G Gᵀ` and `Σ Gᵀ G` per matrix type.
#[derive(Default)]
pub struct GramAccumulator {
    sums: BTreeMap<MlpKind, (Tensor, Tensor, usize)>,
}

/// One matrix type's orthogonal bases; columns are eigenvectors, eigenvalues descending.
#[derive(Clone, Debug)]
pub struct Basis {
    /// `(out, out)`
    pub p: Tensor,
    /// `(in, in)`
    pub q: Tensor,
    pub eig_p: Vec<f64>,
    pub eig_q: Vec<f64>,
    /// How many gradients went into the sums.
    pub samples: usize,
}

impl GramAccumulator {
    /// Adds one weight gradient `G (out, in)` of a matrix of type `kind`.
    pub fn add(&mut self, kind: MlpKind, g: &Tensor) -> Result<()> {
        let g = g.to_dtype(DType::F32)?;
        let ggt = g.matmul(&g.t()?)?;
        let gtg = g.t()?.matmul(&g)?;
        match self.sums.remove(&kind) {
            Some((a, b, n)) => {
                self.sums.insert(kind, ((a + ggt)?, (b + gtg)?, n + 1));
            }
            None => {
                self.sums.insert(kind, (ggt, gtg, 1));
            }
        }
        Ok(())
    }

    pub fn kinds(&self) -> impl Iterator<Item = &MlpKind> {
        self.sums.keys()
    }

    /// Eigendecomposes every accumulated type. `P`, `Q` come back as f32 on the sums' device.
    pub fn finish(&self) -> Result<BTreeMap<MlpKind, Basis>> {
        let mut out = BTreeMap::new();
        for (kind, (a, b, n)) in &self.sums {
            let (p, eig_p) = eigh_desc(a)?;
            let (q, eig_q) = eigh_desc(b)?;
            out.insert(
                *kind,
                Basis {
                    p,
                    q,
                    eig_p,
                    eig_q,
                    samples: *n,
                },
            );
        }
        Ok(out)
    }
}

/// Eigenvectors (as columns, f32, on `m`'s device) and eigenvalues of a symmetric matrix,
/// eigenvalues in descending order.
pub fn eigh_desc(m: &Tensor) -> Result<(Tensor, Vec<f64>)> {
    let (r, c) = m.dims2()?;
    if r != c {
        return Err(Error::Other(format!("eigh of a non-square {r}x{c} matrix")));
    }
    let host: Vec<f64> = m
        .to_dtype(DType::F64)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1()?;
    // Symmetrise: f32 accumulation leaves the two triangles a few ulps apart.
    let mat = faer::Mat::<f64>::from_fn(r, r, |i, j| 0.5 * (host[i * r + j] + host[j * r + i]));
    let evd = mat
        .self_adjoint_eigen(faer::Side::Lower)
        .map_err(|e| Error::Other(format!("eigendecomposition failed: {e:?}")))?;
    let u = evd.U();
    let s = evd.S().column_vector();
    // faer sorts ascending; reverse to descending.
    let eig: Vec<f64> = (0..r).rev().map(|k| s[k]).collect();
    let mut vecs = Vec::with_capacity(r * r);
    for i in 0..r {
        for k in (0..r).rev() {
            vecs.push(u[(i, k)] as f32);
        }
    }
    let p = Tensor::from_vec(vecs, (r, r), &Device::Cpu)?.to_device(m.device())?;
    Ok((p, eig))
}

/// The rotated gradient `G̃ = Pᵀ G Q`.
pub fn rotate(g: &Tensor, basis: &Basis) -> Result<Tensor> {
    Ok(basis
        .p
        .t()?
        .matmul(&g.to_dtype(basis.p.dtype())?)?
        .matmul(&basis.q)?)
}
