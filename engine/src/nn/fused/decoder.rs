//! Fused CPU kernels for the decoder (LLaMA) block: RMS norm, rotary embedding with the head
//! transpose, and SwiGLU. candle keeps every intermediate of a composed op alive until
//! backward (each node holds its inputs): the composed RMS norm keeps three hidden-sized
//! tensors, the composed RoPE five head-sized ones per projection, SiLU-then-multiply one
//! intermediate-sized one. These keep only their inputs and output, so a LLaMA step's
//! activation memory is what the backward needs. The composed versions in `ops.rs` stay the
//! reference and the path for other devices and dtypes.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{applies, last_dim, rows_per_task, slice, sum, Real};

// ---------------------------------------------------------------- RMS norm

/// `x / sqrt(mean(x²) + eps) * w` over the last dimension.
struct RmsNorm {
    eps: f64,
}

fn rms<T: Real>(r: &[T], eps: f64) -> T {
    let n = T::lit(r.len() as f64);
    T::one() / (sum(r.iter().map(|&v| v * v)) / n + T::lit(eps)).sqrt()
}

fn rms_fwd<T: Real>(
    x: &CpuStorage,
    lx: &Layout,
    w: &CpuStorage,
    lw: &Layout,
    eps: f64,
) -> candle_core::Result<CpuStorage> {
    let (x, w) = (slice::<T>(x, lx)?, slice::<T>(w, lw)?);
    let h = last_dim(lx);
    let mut out = vec![T::zero(); x.len()];
    let c = h * rows_per_task(h);
    out.par_chunks_mut(c)
        .zip(x.par_chunks(c))
        .for_each(|(oc, xc)| {
            for (o, r) in oc.chunks_mut(h).zip(xc.chunks(h)) {
                let s = rms(r, eps);
                for i in 0..h {
                    o[i] = r[i] * s * w[i];
                }
            }
        });
    Ok(T::to_cpu_storage_owned(out))
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }
    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = dispatch1!(x, rms_fwd, x, lx, w, lw, self.eps)?;
        Ok((s, lx.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let gx = if x.track_op() {
            Some(x.apply_op3_no_bwd(w, &g, &RmsNormBwdX { eps: self.eps })?)
        } else {
            None
        };
        let gw = if w.track_op() {
            Some(x.apply_op2_no_bwd(&g, &RmsNormBwdW { eps: self.eps })?)
        } else {
            None
        };
        Ok((gx, gw))
    }
}

/// `dx = s·(g⊙w) − x·s³·mean(g⊙w⊙x)`, `s = 1/rms(x)`.
struct RmsNormBwdX {
    eps: f64,
}

fn rms_bwd_x<T: Real>(
    x: &CpuStorage,
    lx: &Layout,
    w: &CpuStorage,
    lw: &Layout,
    g: &CpuStorage,
    lg: &Layout,
    eps: f64,
) -> candle_core::Result<CpuStorage> {
    let (x, w, g) = (slice::<T>(x, lx)?, slice::<T>(w, lw)?, slice::<T>(g, lg)?);
    let h = last_dim(lx);
    let n = T::lit(h as f64);
    let mut out = vec![T::zero(); x.len()];
    let c = h * rows_per_task(h);
    out.par_chunks_mut(c)
        .zip(x.par_chunks(c).zip(g.par_chunks(c)))
        .for_each(|(oc, (xc, gc))| {
            for (o, (r, gr)) in oc.chunks_mut(h).zip(xc.chunks(h).zip(gc.chunks(h))) {
                let s = rms(r, eps);
                let m = sum((0..h).map(|i| gr[i] * w[i] * r[i])) / n;
                let k = s * s * s * m;
                for i in 0..h {
                    o[i] = s * gr[i] * w[i] - r[i] * k;
                }
            }
        });
    Ok(T::to_cpu_storage_owned(out))
}

impl CustomOp3 for RmsNormBwdX {
    fn name(&self) -> &'static str {
        "fused-rms-norm-bwd-x"
    }
    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = dispatch1!(x, rms_bwd_x, x, lx, w, lw, g, lg, self.eps)?;
        Ok((s, lx.shape().clone()))
    }
}

/// `dw = Σ_rows g⊙x·s`.
struct RmsNormBwdW {
    eps: f64,
}

fn rms_bwd_w<T: Real>(
    x: &CpuStorage,
    lx: &Layout,
    g: &CpuStorage,
    lg: &Layout,
    eps: f64,
) -> candle_core::Result<CpuStorage> {
    let (x, g) = (slice::<T>(x, lx)?, slice::<T>(g, lg)?);
    let h = last_dim(lx);
    let rows = x.len() / h.max(1);
    let chunk = rows
        .div_ceil(rayon::current_num_threads().max(1) * 4)
        .max(1);
    let sums = x
        .par_chunks(h * chunk)
        .zip(g.par_chunks(h * chunk))
        .map(|(xc, gc)| {
            let mut acc = vec![T::zero(); h];
            for (r, gr) in xc.chunks(h).zip(gc.chunks(h)) {
                let s = rms(r, eps);
                for i in 0..h {
                    acc[i] += gr[i] * r[i] * s;
                }
            }
            acc
        })
        .reduce(
            || vec![T::zero(); h],
            |a, b| a.iter().zip(&b).map(|(x, y)| *x + *y).collect(),
        );
    Ok(T::to_cpu_storage_owned(sums))
}

impl CustomOp2 for RmsNormBwdW {
    fn name(&self) -> &'static str {
        "fused-rms-norm-bwd-w"
    }
    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = dispatch1!(x, rms_bwd_w, x, lx, g, lg, self.eps)?;
        Ok((s, Shape::from(last_dim(lx))))
    }
}

/// Fused RMS norm of contiguous f32/f64 CPU tensors (callers check [`applies`]).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
}

// ---------------------------------------------------------------- rotary embedding

/// Rotary embedding (Hugging Face's rotate-half layout) fused with the head transpose:
/// `(B, T, H, D)` → `(B, H, T, D)`. `cos`/`sin` are `(T, D)` tables. The backward is the
/// inverse rotation with the inverse transpose, the same kernel run the other way.
#[derive(Clone, Copy)]
struct RopeHeads {
    heads: usize,
    t: usize,
    /// `true`: `(B, T, H, D)` → `(B, H, T, D)` rotating by +θ; `false`: the adjoint.
    forward: bool,
}

#[allow(clippy::too_many_arguments)]
fn rope_kernel<T: Real>(
    x: &CpuStorage,
    lx: &Layout,
    cos: &CpuStorage,
    lc: &Layout,
    sin: &CpuStorage,
    ls: &Layout,
    op: &RopeHeads,
) -> candle_core::Result<CpuStorage> {
    let (x, cos, sin) = (
        slice::<T>(x, lx)?,
        slice::<T>(cos, lc)?,
        slice::<T>(sin, ls)?,
    );
    let d = last_dim(lx);
    let (h, t, half) = (op.heads, op.t, d / 2);
    let mut out = vec![T::zero(); x.len()];
    // Output rows in order; each reads its row of the other layout.
    let c = d * rows_per_task(d);
    let per_task = c / d;
    out.par_chunks_mut(c).enumerate().for_each(|(ti, oc)| {
        for (ri, o) in oc.chunks_mut(d).enumerate() {
            let row = ti * per_task + ri;
            let b = row / (h * t);
            let (src, p) = if op.forward {
                // out (b, hi, p) reads input (b, p, hi)
                let (hi, p) = ((row / t) % h, row % t);
                ((b * t + p) * h + hi, p)
            } else {
                // out (b, p, hi) reads gradient (b, hi, p)
                let (p, hi) = ((row / h) % t, row % h);
                ((b * h + hi) * t + p, p)
            };
            let r = &x[src * d..(src + 1) * d];
            let (c, s) = (&cos[p * d..(p + 1) * d], &sin[p * d..(p + 1) * d]);
            if op.forward {
                for j in 0..half {
                    o[j] = r[j] * c[j] - r[j + half] * s[j];
                    o[j + half] = r[j + half] * c[j + half] + r[j] * s[j + half];
                }
            } else {
                for j in 0..half {
                    o[j] = r[j] * c[j] + r[j + half] * s[j + half];
                    o[j + half] = r[j + half] * c[j + half] - r[j] * s[j];
                }
            }
        }
    });
    Ok(T::to_cpu_storage_owned(out))
}

impl CustomOp3 for RopeHeads {
    fn name(&self) -> &'static str {
        "fused-rope-heads"
    }
    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        cos: &CpuStorage,
        lc: &Layout,
        sin: &CpuStorage,
        ls: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = lx.dims();
        let s = dispatch1!(x, rope_kernel, x, lx, cos, lc, sin, ls, self)?;
        Ok((s, Shape::from((dims[0], dims[2], dims[1], dims[3]))))
    }
    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let gx = if x.track_op() {
            let back = RopeHeads {
                forward: false,
                ..*self
            };
            Some(g.contiguous()?.apply_op3_no_bwd(cos, sin, &back)?)
        } else {
            None
        };
        Ok((gx, None, None))
    }
}

/// `rope(x.transpose(1, 2))` for `x (B, T, H, D)` and `(T, D)` tables, as one pass (the
/// tables are constants: no gradient).
pub fn rope_heads(x: &Tensor, cos: &Tensor, sin: &Tensor) -> crate::Result<Tensor> {
    let (_, t, h, d) = x.dims4()?;
    if applies(x) && cos.dtype() == x.dtype() && d % 2 == 0 {
        let op = RopeHeads {
            heads: h,
            t,
            forward: true,
        };
        let (cos, sin) = (cos.detach().contiguous()?, sin.detach().contiguous()?);
        return Ok(x.contiguous()?.apply_op3(&cos, &sin, op)?);
    }
    let xt = x.transpose(1, 2)?.contiguous()?;
    super::super::ops::rope(&xt, cos, sin)
}

// ---------------------------------------------------------------- SwiGLU

/// `silu(g) ⊙ u`, without keeping `silu(g)` for the backward.
struct SwiGlu;

fn sigmoid<T: Real>(v: T) -> T {
    T::one() / (T::one() + (-v).exp_())
}

fn swiglu_fwd<T: Real>(
    g: &CpuStorage,
    lg: &Layout,
    u: &CpuStorage,
    lu: &Layout,
) -> candle_core::Result<CpuStorage> {
    let (g, u) = (slice::<T>(g, lg)?, slice::<T>(u, lu)?);
    let mut out = vec![T::zero(); g.len()];
    out.par_chunks_mut(4096)
        .zip(g.par_chunks(4096).zip(u.par_chunks(4096)))
        .for_each(|(o, (gr, ur))| {
            for i in 0..o.len() {
                o[i] = gr[i] * sigmoid(gr[i]) * ur[i];
            }
        });
    Ok(T::to_cpu_storage_owned(out))
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }
    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        lg: &Layout,
        u: &CpuStorage,
        lu: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((dispatch1!(g, swiglu_fwd, g, lg, u, lu)?, lg.shape().clone()))
    }
    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if !g.track_op() && !u.track_op() {
            return Ok((None, None));
        }
        // One pass writes both gradients, stacked on a new leading dimension.
        let both = g.apply_op3_no_bwd(u, &grad.contiguous()?, &SwiGluBwd)?;
        let gg = g.track_op().then(|| both.get(0)).transpose()?;
        let gu = u.track_op().then(|| both.get(1)).transpose()?;
        Ok((gg, gu))
    }
}

/// `d g = grad⊙u⊙σ(g)(1 + g(1 − σ(g)))`, `d u = grad⊙silu(g)`.
struct SwiGluBwd;

fn swiglu_bwd<T: Real>(
    g: &CpuStorage,
    lg: &Layout,
    u: &CpuStorage,
    lu: &Layout,
    d: &CpuStorage,
    ld: &Layout,
) -> candle_core::Result<CpuStorage> {
    let (g, u, d) = (slice::<T>(g, lg)?, slice::<T>(u, lu)?, slice::<T>(d, ld)?);
    let n = g.len();
    let mut out = vec![T::zero(); 2 * n];
    let (dg, du) = out.split_at_mut(n);
    dg.par_chunks_mut(4096)
        .zip(du.par_chunks_mut(4096))
        .zip(
            g.par_chunks(4096)
                .zip(u.par_chunks(4096).zip(d.par_chunks(4096))),
        )
        .for_each(|((dgc, duc), (gr, (ur, dr)))| {
            for i in 0..dgc.len() {
                let s = sigmoid(gr[i]);
                dgc[i] = dr[i] * ur[i] * s * (T::one() + gr[i] * (T::one() - s));
                duc[i] = dr[i] * gr[i] * s;
            }
        });
    Ok(T::to_cpu_storage_owned(out))
}

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "fused-swiglu-bwd"
    }
    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        lg: &Layout,
        u: &CpuStorage,
        lu: &Layout,
        d: &CpuStorage,
        ld: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut dims = vec![2];
        dims.extend_from_slice(lg.dims());
        Ok((
            dispatch1!(g, swiglu_bwd, g, lg, u, lu, d, ld)?,
            Shape::from(dims),
        ))
    }
}

/// `silu(g) ⊙ u` (SwiGLU's gate), fused where it applies.
pub fn swiglu(g: &Tensor, u: &Tensor) -> crate::Result<Tensor> {
    if applies(g) && g.dtype() == u.dtype() && g.shape() == u.shape() {
        return Ok(g.contiguous()?.apply_op2(&u.contiguous()?, SwiGlu)?);
    }
    Ok((g.silu()? * u)?)
}
