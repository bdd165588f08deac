//! SparseGrad's own kernels, one entry point per operation that dispatches on the tensors'
//! device: the CPU code here, or the CUDA kernels in `engine/kernels/sparsegrad.cu` (feature
//! `cuda`). The `reference` module runs the GPU algorithms step for step on the host; the
//! GPU check (`sparsegrad gpu-check`) compares the two, and the unit tests below check the
//! references against plain definitions.
//!
//! - [`topk_abs`]: top-k by magnitude over a whole matrix (radix select; candle's arg-sort
//!   works per row and runs out of shared memory on wide matrices).
//! - [`gather_acc`]: the rotated gradient on a fixed support, summed over micro-batches.
//! - [`sparse_adam`]: Adam on the support, moments and change in one pass.
//! - [`Csr`] + [`scatter_rows`] + [`gemm_acc`]: `W += P S Qᵀ` in place — the sparse factor
//!   times one basis without atomics, then one GEMM accumulating into the weight.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod reference;

use candle_core::{CpuStorage, DType, Device, InplaceOp2, Layout, Tensor};
use rayon::prelude::*;

use crate::{Error, Result};

/// Runs `f` on the data of `t` as contiguous f32: borrowed when it already is (on the CPU),
/// else from a host copy.
fn on_host_f32<R>(t: &Tensor, f: impl Fn(&[f32]) -> R) -> Result<R> {
    if let Some(r) = crate::optim::with_f32(t, &f) {
        return Ok(r);
    }
    let host: Vec<f32> = t
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1()?;
    Ok(f(&host))
}

fn unsupported(what: &str, dev: &Device) -> Error {
    Error::Other(format!(
        "{what}: no kernel for {dev:?} in this build (CUDA needs `--features cuda`)"
    ))
}

/// Flat indices (ascending, on the host) of the `k` entries of `x` with the largest
/// magnitude — ties to the lower index — and their values as an f32 tensor on `x`'s device.
pub fn topk_abs(x: &Tensor, k: usize) -> Result<(Vec<u32>, Tensor)> {
    let x = x.to_dtype(DType::F32)?.flatten_all()?.contiguous()?;
    match x.device() {
        Device::Cpu => {
            let (idx, vals) = on_host_f32(&x, |v| {
                let idx = crate::topk::topk_abs_fast(v, k);
                let vals: Vec<f32> = idx.iter().map(|&i| v[i as usize]).collect();
                (idx, vals)
            })?;
            let n = vals.len();
            Ok((idx, Tensor::from_vec(vals, n, &Device::Cpu)?))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::topk_abs(&x, k),
        d => Err(unsupported("top-k", d)),
    }
}

/// `block[pos[j]]` for every support entry `j`, added to `acc` when given (micro-batch
/// accumulation). `block` is any f32 tensor (read flat), `pos` u32.
pub fn gather_acc(block: &Tensor, pos: &Tensor, acc: Option<&Tensor>) -> Result<Tensor> {
    let flat = block.flatten_all()?.contiguous()?;
    match flat.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::gather_acc(&flat, pos, acc),
        _ => {
            let g = flat.index_select(pos, 0)?;
            Ok(match acc {
                Some(a) => (a + g)?,
                None => g,
            })
        }
    }
}

/// The scalars of one sparse Adam step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    /// Gradient multiplier (clipping).
    pub gscale: f32,
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Bias corrections `1 − β₁ᵗ`, `1 − β₂ᵗ`.
    pub bc1: f32,
    pub bc2: f32,
}

/// Adam on support entries: `g[j]` updates the moments at `slot[j]` (at `j` when `slot` is
/// `None`). Returns the new moments and each entry's change; the inputs are not modified.
pub fn sparse_adam(
    m: &Tensor,
    v: &Tensor,
    slot: Option<&Tensor>,
    g: &Tensor,
    s: &AdamStep,
) -> Result<(Tensor, Tensor, Tensor)> {
    match m.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::sparse_adam(m, v, slot, g, s),
        Device::Cpu => {
            let mut mh: Vec<f32> = m.to_vec1()?;
            let mut vh: Vec<f32> = v.to_vec1()?;
            let slots: Option<Vec<u32>> = slot.map(|t| t.to_vec1()).transpose()?;
            let gh: Vec<f32> = g.to_vec1()?;
            let ch = reference::sparse_adam(&mut mh, &mut vh, slots.as_deref(), &gh, s);
            let (n, k) = (mh.len(), ch.len());
            Ok((
                Tensor::from_vec(mh, n, &Device::Cpu)?,
                Tensor::from_vec(vh, n, &Device::Cpu)?,
                Tensor::from_vec(ch, k, &Device::Cpu)?,
            ))
        }
        d => Err(unsupported("sparse Adam", d)),
    }
}

/// Sparse entries grouped by destination row, for [`scatter_rows`]: entry `j` (in CSR
/// order) adds `val[perm[j]] · src_rows[src[j]]` to row `r` for `j` in
/// `row_ptr[r]..row_ptr[r+1]`. Built on the host once per support (or per step for dynamic
/// supports) and uploaded.
pub struct Csr {
    pub n_rows: usize,
    pub row_ptr: Tensor,
    pub src: Tensor,
    pub perm: Tensor,
}

impl Csr {
    /// From `(dst, src)` pairs in value order.
    pub fn new(n_rows: usize, pairs: &[(u32, u32)], dev: &Device) -> Result<Self> {
        let (row_ptr, src, perm) = reference::csr(n_rows, pairs);
        // CUDA has no zero-byte allocations: an empty entry list stays on the host.
        let edev = if pairs.is_empty() { &Device::Cpu } else { dev };
        Ok(Csr {
            n_rows,
            row_ptr: Tensor::from_vec(row_ptr, n_rows + 1, dev)?,
            src: Tensor::from_slice(&src, src.len(), edev)?,
            perm: Tensor::from_slice(&perm, perm.len(), edev)?,
        })
    }
}

/// The dense `(n_rows × width)` product of the sparse entries with the rows of `src_rows`
/// (contiguous f32, row-major with rows of `width`).
pub fn scatter_rows(csr: &Csr, vals: &Tensor, src_rows: &Tensor) -> Result<Tensor> {
    let width = src_rows.dim(1)?;
    if csr.src.elem_count() == 0 {
        return Ok(Tensor::zeros(
            (csr.n_rows, width),
            DType::F32,
            src_rows.device(),
        )?);
    }
    match src_rows.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::scatter_rows(csr, vals, src_rows, width),
        Device::Cpu => {
            let row_ptr: Vec<u32> = csr.row_ptr.to_vec1()?;
            let src: Vec<u32> = csr.src.to_vec1()?;
            let perm: Vec<u32> = csr.perm.to_vec1()?;
            let vals: Vec<f32> = vals.to_vec1()?;
            let buf = on_host_f32(&src_rows.contiguous()?, |s| {
                reference::scatter_rows(&row_ptr, &src, &perm, &vals, s, width)
            })?;
            Ok(Tensor::from_vec(buf, (csr.n_rows, width), &Device::Cpu)?)
        }
        d => Err(unsupported("sparse scatter", d)),
    }
}

/// `C += A · B` in place, for a contiguous f32 `C` that nothing else shares (the caller owns
/// it). `A` and `B` may be contiguous or transposed views of contiguous matrices. On CUDA
/// this is one cuBLAS GEMM with β = 1: no product-sized temporary.
pub fn gemm_acc(c: &Tensor, a: &Tensor, b: &Tensor) -> Result<()> {
    let (m, n) = c.dims2()?;
    let (am, ak) = a.dims2()?;
    let (bk, bn) = b.dims2()?;
    if am != m || bn != n || ak != bk {
        return Err(Error::Other(format!(
            "gemm_acc: ({m}×{n}) += ({am}×{ak})·({bk}×{bn})"
        )));
    }
    match c.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => Ok(c.inplace_op3(a, b, &cuda::GemmAcc)?),
        _ => {
            let p = a.matmul(b)?;
            Ok(c.inplace_op2(&p, &AddAssign)?)
        }
    }
}

/// `dst += src` on the CPU, for contiguous f32 tensors of one shape.
struct AddAssign;

impl InplaceOp2 for AddAssign {
    fn name(&self) -> &'static str {
        "add-assign"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(d), CpuStorage::F32(s)) = (s1, s2) else {
            candle_core::bail!("add-assign: f32 only")
        };
        let (Some((a1, b1)), Some((a2, b2))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("add-assign: contiguous tensors only")
        };
        d[a1..b1]
            .par_chunks_mut(1 << 14)
            .zip(s[a2..b2].par_chunks(1 << 14))
            .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(x, y)| *x += y));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    fn rnd(n: usize, seed: u64) -> Vec<f32> {
        let mut r = crate::rng::stream(seed, "kernels", 0);
        (0..n).map(|_| r.random::<f32>() - 0.5).collect()
    }

    #[test]
    fn radix_topk_reference_matches_the_sort_definition() {
        let mut r = crate::rng::stream(3, "radix", 0);
        for &n in &[1usize, 5, 4096, 70_001] {
            let ties: Vec<f32> = (0..n)
                .map(|_| ((r.random::<f32>() - 0.5) * 16.0).round() / 4.0)
                .collect();
            let wide: Vec<f32> = (0..n)
                .map(|_| (r.random::<f32>() - 0.5) * r.random::<f32>().powi(12) * 1e3)
                .collect();
            for v in [&ties, &wide] {
                for k in [1, n / 100 + 1, n / 3 + 1, n] {
                    let k = k.min(n);
                    let want: Vec<u32> = crate::topk::topk_abs(v, k)
                        .into_iter()
                        .map(|i| i as u32)
                        .collect();
                    let (idx, vals) = crate::topk::topk_abs_radix(v, k, 4096);
                    assert_eq!(idx, want, "n {n} k {k}");
                    let expect: Vec<f32> = want.iter().map(|&i| v[i as usize]).collect();
                    assert_eq!(vals, expect);
                    let (t, tv) =
                        topk_abs(&Tensor::new(v.as_slice(), &Device::Cpu).unwrap(), k).unwrap();
                    assert_eq!(t, want);
                    assert_eq!(tv.to_vec1::<f32>().unwrap(), expect);
                }
            }
        }
    }

    #[test]
    fn scatter_then_gemm_equals_the_dense_product_in_both_orientations() {
        // W += P S Qᵀ via the two layouts SparseGrad uses, against dense matmuls.
        for (out, inp) in [(7usize, 5usize), (4, 9)] {
            let p = Tensor::from_vec(rnd(out * out, 1), (out, out), &Device::Cpu).unwrap();
            let q = Tensor::from_vec(rnd(inp * inp, 2), (inp, inp), &Device::Cpu).unwrap();
            let w0 = rnd(out * inp, 3);
            let idx: Vec<u32> = (0..(out * inp) as u32).filter(|i| i % 3 != 1).collect();
            let vals = rnd(idx.len(), 4);
            let mut s = vec![0f32; out * inp];
            for (&i, &v) in idx.iter().zip(&vals) {
                s[i as usize] = v;
            }
            let s = Tensor::from_vec(s, (out, inp), &Device::Cpu).unwrap();
            let want = (Tensor::from_vec(w0.clone(), (out, inp), &Device::Cpu).unwrap()
                + p.matmul(&s).unwrap().matmul(&q.t().unwrap()).unwrap())
            .unwrap();
            let w = Tensor::from_vec(w0, (out, inp), &Device::Cpu).unwrap();
            let vt = Tensor::new(vals.as_slice(), &Device::Cpu).unwrap();
            let (pt, qt) = (
                p.t().unwrap().contiguous().unwrap(),
                q.t().unwrap().contiguous().unwrap(),
            );
            if out >= inp {
                let pairs: Vec<(u32, u32)> = idx
                    .iter()
                    .map(|&i| (i % inp as u32, i / inp as u32))
                    .collect();
                let csr = Csr::new(inp, &pairs, &Device::Cpu).unwrap();
                let r = scatter_rows(&csr, &vt, &pt).unwrap();
                gemm_acc(&w, &r.t().unwrap(), &qt).unwrap();
            } else {
                let pairs: Vec<(u32, u32)> = idx
                    .iter()
                    .map(|&i| (i / inp as u32, i % inp as u32))
                    .collect();
                let csr = Csr::new(out, &pairs, &Device::Cpu).unwrap();
                let n = scatter_rows(&csr, &vt, &qt).unwrap();
                gemm_acc(&w, &pt.t().unwrap(), &n).unwrap();
            }
            let d = crate::testing::max_abs_diff(&w, &want);
            assert!(d < 1e-5, "{out}×{inp}: {d}");
        }
    }

    #[test]
    fn sparse_adam_with_and_without_slots_and_gather() {
        let s = AdamStep {
            gscale: 0.5,
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            bc1: 0.1,
            bc2: 0.001,
        };
        let dev = Device::Cpu;
        let m = Tensor::new(&[0.1f32, -0.2, 0.3], &dev).unwrap();
        let v = Tensor::new(&[0.01f32, 0.02, 0.03], &dev).unwrap();
        let g = Tensor::new(&[1.0f32, -2.0], &dev).unwrap();
        let slot = Tensor::new(&[2u32, 0], &dev).unwrap();
        let (m2, v2, ch) = sparse_adam(&m, &v, Some(&slot), &g, &s).unwrap();
        let (m2, v2, ch) = (
            m2.to_vec1::<f32>().unwrap(),
            v2.to_vec1::<f32>().unwrap(),
            ch.to_vec1::<f32>().unwrap(),
        );
        assert_eq!(m2[1], -0.2, "untouched slot keeps its moment");
        let (g0, b1, b2) = (-2.0f32 * 0.5, 0.9f32, 0.999f32);
        let want_m0 = b1 * 0.1 + (1.0 - b1) * g0;
        let want_v0 = b2 * 0.01 + (1.0 - b2) * g0 * g0;
        assert_eq!(m2[0], want_m0);
        assert_eq!(v2[0], want_v0);
        assert_eq!(
            ch[1],
            -1e-2 * ((want_m0 / 0.1) / ((want_v0 / 0.001).sqrt() + 1e-8))
        );
        let block = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &dev).unwrap();
        let pos = Tensor::new(&[3u32, 0], &dev).unwrap();
        let once = gather_acc(&block, &pos, None).unwrap();
        let twice = gather_acc(&block, &pos, Some(&once)).unwrap();
        assert_eq!(twice.to_vec1::<f32>().unwrap(), vec![8.0, 2.0]);
    }
}
