//! Fused CPU kernels (f32/f64) for the ops that dominate a training step besides matmul:
//! layer norm, softmax and exact GELU, each with a hand-written backward. One pass per
//! direction instead of the 5-15 elementwise passes (and as many buffers, plus candle's
//! zero-initialised gradient slots) of the composed versions in `ops.rs`, which remain the
//! reference, the path for other devices and dtypes, and what these are tested against.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

/// f32 uses branch-free `exp`/`erf` that the compiler vectorises (libm's are scalar calls,
/// ~10 ns each: exact GELU's backward alone cost 60 ms per MiniLM step); f64 keeps libm, so the
/// f64 gradient checks see exact values.
pub trait Real: WithDType + num_traits::Float + Send + Sync {
    fn erf_(self) -> Self;
    fn exp_(self) -> Self;
    fn lit(v: f64) -> Self {
        <Self as WithDType>::from_f64(v)
    }
}
impl Real for f32 {
    #[inline(always)]
    fn erf_(self) -> Self {
        erf_f32(self)
    }
    #[inline(always)]
    fn exp_(self) -> Self {
        exp_f32(self)
    }
}
impl Real for f64 {
    #[inline(always)]
    fn erf_(self) -> Self {
        libm::erf(self)
    }
    #[inline(always)]
    fn exp_(self) -> Self {
        self.exp()
    }
}

/// `exp` for f32: round-to-nearest by the 1.5·2²³ trick, Cody-Waite reduction, degree-6
/// polynomial, exponent by bit shift. Relative error ≲ 2e-7 on [-87, 88]; 0 below -87.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    // Below -87 the result is (nearly) subnormal; masked attention scores land there, and
    // subnormal probabilities make every later matmul crawl. Flush them to exactly 0.
    if x < -87.0 {
        return 0.0;
    }
    let x = x.min(88.0);
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let e = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    p * f32::from_bits(((e + 127) << 23) as u32)
}

/// `erf` for f32 as Eigen's `generic_fast_erf_float` (rational approximation on [-4, 4],
/// ±1 beyond); absolute error ≲ 1e-7.
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 - 2.101_024e-6;
    p = p * x2 - 5.692_506_4e-5;
    p = p * x2 - 7.349_906_3e-4;
    p = p * x2 - 2.954_6e-3;
    p = p * x2 - 1.609_603_3e-2;
    let mut q = -1.456_607_2e-5f32;
    q = q * x2 - 2.133_740_6e-4;
    q = q * x2 - 1.682_827e-3;
    q = q * x2 - 7.373_329_3e-3;
    q = q * x2 - 1.426_474e-2;
    x * p / q
}

/// Sum with eight independent accumulators so the loop vectorises.
#[inline(always)]
fn sum<T: Real>(xs: impl Iterator<Item = T>) -> T {
    let mut acc = [T::zero(); 8];
    for (i, v) in xs.enumerate() {
        acc[i & 7] += v;
    }
    acc.iter().fold(T::zero(), |a, &b| a + b)
}

/// Rows per rayon task: enough work per task to amortise scheduling.
fn rows_per_task(h: usize) -> usize {
    (16384 / h.max(1)).max(1)
}

/// The fused path applies to contiguous f32/f64 tensors on the CPU.
pub fn applies(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("fused op expects a contiguous tensor"),
    }
}

fn last_dim(l: &Layout) -> usize {
    *l.dims().last().unwrap_or(&1)
}

macro_rules! dispatch1 {
    ($s:expr, $f:ident, $($arg:expr),*) => {
        match $s {
            CpuStorage::F32(_) => $f::<f32>($($arg),*),
            CpuStorage::F64(_) => $f::<f64>($($arg),*),
            _ => candle_core::bail!("fused op supports f32 and f64"),
        }
    };
}

// ---------------------------------------------------------------- layer norm

struct LayerNorm {
    eps: f64,
}

fn ln_fwd<T: Real>(
    x: &CpuStorage,
    lx: &Layout,
    w: &CpuStorage,
    lw: &Layout,
    b: &CpuStorage,
    lb: &Layout,
    eps: f64,
) -> candle_core::Result<CpuStorage> {
    let (x, w, b) = (slice::<T>(x, lx)?, slice::<T>(w, lw)?, slice::<T>(b, lb)?);
    let h = last_dim(lx);
    let mut out = vec![T::zero(); x.len()];
    let c = h * rows_per_task(h);
    out.par_chunks_mut(c)
        .zip(x.par_chunks(c))
        .for_each(|(oc, xc)| {
            for (o, r) in oc.chunks_mut(h).zip(xc.chunks(h)) {
                let (mean, rstd) = row_stats(r, eps);
                for i in 0..h {
                    o[i] = (r[i] - mean) * rstd * w[i] + b[i];
                }
            }
        });
    Ok(T::to_cpu_storage_owned(out))
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }
    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = dispatch1!(x, ln_fwd, x, lx, w, lw, b, lb, self.eps)?;
        Ok((s, lx.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let gx = if x.track_op() {
            Some(x.apply_op3_no_bwd(w, &g, &LayerNormBwdX { eps: self.eps })?)
        } else {
            None
        };
        let (gw, gb) = if w.track_op() || b.track_op() {
            let both = x.apply_op2_no_bwd(&g, &LayerNormBwdWB { eps: self.eps })?;
            (Some(both.get(0)?), Some(both.get(1)?))
        } else {
            (None, None)
        };
        Ok((gx, gw.filter(|_| w.track_op()), gb.filter(|_| b.track_op())))
    }
}

struct LayerNormBwdX {
    eps: f64,
}

fn row_stats<T: Real>(r: &[T], eps: f64) -> (T, T) {
    let n = T::lit(r.len() as f64);
    let mean = sum(r.iter().copied()) / n;
    let var = sum(r.iter().map(|&v| (v - mean) * (v - mean))) / n;
    (mean, T::one() / (var + T::lit(eps)).sqrt())
}

fn ln_bwd_x<T: Real>(
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
                let (mean, rstd) = row_stats(r, eps);
                let m1 = sum((0..h).map(|i| gr[i] * w[i])) / n;
                let m2 = sum((0..h).map(|i| gr[i] * w[i] * (r[i] - mean) * rstd)) / n;
                for i in 0..h {
                    let xh = (r[i] - mean) * rstd;
                    o[i] = rstd * (gr[i] * w[i] - m1 - xh * m2);
                }
            }
        });
    Ok(T::to_cpu_storage_owned(out))
}

impl CustomOp3 for LayerNormBwdX {
    fn name(&self) -> &'static str {
        "fused-layer-norm-bwd-x"
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
        let s = dispatch1!(x, ln_bwd_x, x, lx, w, lw, g, lg, self.eps)?;
        Ok((s, lx.shape().clone()))
    }
}

struct LayerNormBwdWB {
    eps: f64,
}

fn ln_bwd_wb<T: Real>(
    x: &CpuStorage,
    lx: &Layout,
    g: &CpuStorage,
    lg: &Layout,
    eps: f64,
) -> candle_core::Result<CpuStorage> {
    let (x, g) = (slice::<T>(x, lx)?, slice::<T>(g, lg)?);
    let h = last_dim(lx);
    let rows = x.len() / h;
    let chunk = rows
        .div_ceil(rayon::current_num_threads().max(1) * 4)
        .max(1);
    let sums = x
        .par_chunks(h * chunk)
        .zip(g.par_chunks(h * chunk))
        .map(|(xc, gc)| {
            let mut acc = vec![T::zero(); 2 * h];
            for (r, gr) in xc.chunks(h).zip(gc.chunks(h)) {
                let (mean, rstd) = row_stats(r, eps);
                for i in 0..h {
                    acc[i] += gr[i] * (r[i] - mean) * rstd;
                    acc[h + i] += gr[i];
                }
            }
            acc
        })
        .reduce(
            || vec![T::zero(); 2 * h],
            |a, b| a.iter().zip(&b).map(|(x, y)| *x + *y).collect(),
        );
    Ok(T::to_cpu_storage_owned(sums))
}

impl CustomOp2 for LayerNormBwdWB {
    fn name(&self) -> &'static str {
        "fused-layer-norm-bwd-wb"
    }
    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = dispatch1!(x, ln_bwd_wb, x, lx, g, lg, self.eps)?;
        Ok((s, Shape::from((2, last_dim(lx)))))
    }
}

pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNorm { eps })
}

// ---------------------------------------------------------------- softmax

struct Softmax;

fn softmax_fwd<T: Real>(x: &CpuStorage, l: &Layout) -> candle_core::Result<CpuStorage> {
    let x = slice::<T>(x, l)?;
    let h = last_dim(l);
    let mut out = vec![T::zero(); x.len()];
    let c = h * rows_per_task(h);
    out.par_chunks_mut(c)
        .zip(x.par_chunks(c))
        .for_each(|(oc, xc)| {
            for (o, r) in oc.chunks_mut(h).zip(xc.chunks(h)) {
                let max = r
                    .iter()
                    .fold(T::neg_infinity(), |a, &v| num_traits::Float::max(a, v));
                for i in 0..h {
                    o[i] = (r[i] - max).exp_();
                }
                let inv = T::one() / sum(o.iter().copied());
                o.iter_mut().for_each(|v| *v *= inv);
            }
        });
    Ok(T::to_cpu_storage_owned(out))
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((dispatch1!(s, softmax_fwd, s, l)?, l.shape().clone()))
    }
    fn bwd(&self, _arg: &Tensor, res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxBwd)?))
    }
}

struct SoftmaxBwd;

fn softmax_bwd<T: Real>(
    y: &CpuStorage,
    ly: &Layout,
    g: &CpuStorage,
    lg: &Layout,
) -> candle_core::Result<CpuStorage> {
    let (y, g) = (slice::<T>(y, ly)?, slice::<T>(g, lg)?);
    let h = last_dim(ly);
    let mut out = vec![T::zero(); y.len()];
    let c = h * rows_per_task(h);
    out.par_chunks_mut(c)
        .zip(y.par_chunks(c).zip(g.par_chunks(c)))
        .for_each(|(oc, (yc, gc))| {
            for (o, (yr, gr)) in oc.chunks_mut(h).zip(yc.chunks(h).zip(gc.chunks(h))) {
                let dot = sum(yr.iter().zip(gr).map(|(&y, &g)| y * g));
                for i in 0..h {
                    o[i] = yr[i] * (gr[i] - dot);
                }
            }
        });
    Ok(T::to_cpu_storage_owned(out))
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "fused-softmax-bwd"
    }
    fn cpu_fwd(
        &self,
        y: &CpuStorage,
        ly: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((
            dispatch1!(y, softmax_bwd, y, ly, g, lg)?,
            ly.shape().clone(),
        ))
    }
}

pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

// ---------------------------------------------------------------- exact GELU

struct Gelu;

fn gelu_fwd<T: Real>(x: &CpuStorage, l: &Layout) -> candle_core::Result<CpuStorage> {
    let x = slice::<T>(x, l)?;
    let mut out = vec![T::zero(); x.len()];
    let (half, r2) = (T::lit(0.5), T::lit(std::f64::consts::FRAC_1_SQRT_2));
    out.par_chunks_mut(4096)
        .zip(x.par_chunks(4096))
        .for_each(|(o, r)| {
            for (o, &v) in o.iter_mut().zip(r) {
                *o = half * v * (T::one() + (v * r2).erf_());
            }
        });
    Ok(T::to_cpu_storage_owned(out))
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu-erf"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((dispatch1!(s, gelu_fwd, s, l)?, l.shape().clone()))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&g.contiguous()?, &GeluBwd)?))
    }
}

struct GeluBwd;

fn gelu_bwd<T: Real>(
    x: &CpuStorage,
    lx: &Layout,
    g: &CpuStorage,
    lg: &Layout,
) -> candle_core::Result<CpuStorage> {
    let (x, g) = (slice::<T>(x, lx)?, slice::<T>(g, lg)?);
    let mut out = vec![T::zero(); x.len()];
    let (half, r2) = (T::lit(0.5), T::lit(std::f64::consts::FRAC_1_SQRT_2));
    let inv_sqrt_2pi = T::lit(1.0 / (2.0 * std::f64::consts::PI).sqrt());
    out.par_chunks_mut(4096)
        .zip(x.par_chunks(4096).zip(g.par_chunks(4096)))
        .for_each(|(o, (xr, gr))| {
            for i in 0..o.len() {
                let v = xr[i];
                let cdf = half * (T::one() + (v * r2).erf_());
                let pdf = inv_sqrt_2pi * (-half * v * v).exp_();
                o[i] = gr[i] * (cdf + v * pdf);
            }
        });
    Ok(T::to_cpu_storage_owned(out))
}

impl CustomOp2 for GeluBwd {
    fn name(&self) -> &'static str {
        "fused-gelu-erf-bwd"
    }
    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((dispatch1!(x, gelu_bwd, x, lx, g, lg)?, lx.shape().clone()))
    }
}

pub fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

// ---------------------------------------------------------------- bias add

/// `y + b` over rows. candle's broadcast add would materialise a zero-filled gradient of the
/// broadcast shape for the bias (even a frozen one) and reduce it; here the input gradient is
/// passed through and the bias gradient is one column sum, only when the bias trains.
struct BiasAdd;

fn bias_add_fwd<T: Real>(
    y: &CpuStorage,
    ly: &Layout,
    b: &CpuStorage,
    lb: &Layout,
) -> candle_core::Result<CpuStorage> {
    let (y, b) = (slice::<T>(y, ly)?, slice::<T>(b, lb)?);
    let h = b.len();
    let mut out = vec![T::zero(); y.len()];
    let c = h * rows_per_task(h);
    out.par_chunks_mut(c)
        .zip(y.par_chunks(c))
        .for_each(|(oc, yc)| {
            for (o, r) in oc.chunks_mut(h).zip(yc.chunks(h)) {
                for i in 0..h {
                    o[i] = r[i] + b[i];
                }
            }
        });
    Ok(T::to_cpu_storage_owned(out))
}

/// The bias-add kernel for callers holding CPU storages (the frozen-linear tap).
pub fn bias_add_cpu(
    y: &CpuStorage,
    ly: &Layout,
    b: &CpuStorage,
    lb: &Layout,
) -> candle_core::Result<(CpuStorage, Shape)> {
    Ok((
        dispatch1!(y, bias_add_fwd, y, ly, b, lb)?,
        ly.shape().clone(),
    ))
}

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "fused-bias-add"
    }
    fn cpu_fwd(
        &self,
        y: &CpuStorage,
        ly: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((
            dispatch1!(y, bias_add_fwd, y, ly, b, lb)?,
            ly.shape().clone(),
        ))
    }
    fn bwd(
        &self,
        y: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let gy = y.track_op().then(|| g.clone());
        let gb = if b.track_op() {
            Some(g.contiguous()?.apply_op1_no_bwd(&ColumnSum)?)
        } else {
            None
        };
        Ok((gy, gb))
    }
}

/// Column sums of `(N, H)` → `(H)`, rows split across threads.
struct ColumnSum;

fn column_sum<T: Real>(g: &CpuStorage, l: &Layout) -> candle_core::Result<CpuStorage> {
    let g = slice::<T>(g, l)?;
    let h = last_dim(l);
    let rows = g.len() / h.max(1);
    let chunk = rows
        .div_ceil(rayon::current_num_threads().max(1) * 4)
        .max(1);
    let sums = g
        .par_chunks(h * chunk)
        .map(|gc| {
            let mut acc = vec![T::zero(); h];
            for r in gc.chunks(h) {
                for i in 0..h {
                    acc[i] += r[i];
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

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "fused-column-sum"
    }
    fn cpu_fwd(&self, g: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((dispatch1!(g, column_sum, g, l)?, Shape::from(last_dim(l))))
    }
}

/// `y (N, H) + b (H)`.
pub fn bias_add(y: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if applies(y) && y.dtype() == b.dtype() && y.rank() == 2 {
        y.contiguous()?.apply_op2(&b.contiguous()?, BiasAdd)
    } else {
        y.broadcast_add(b)
    }
}

// ---------------------------------------------------------------- scaled, masked softmax

/// Which mask row applies to a score row `(batch, head, query)`.
#[derive(Clone, Copy)]
pub enum MaskRows {
    /// `(B, Tk)` key-padding mask: row = batch.
    PerBatch,
    /// `(Tq, Tk)` causal mask: row = query.
    PerQuery,
}

/// `softmax(scale · s + mask)` over the last dimension of `s (B, H, Tq, Tk)`; the mask is a
/// constant (no gradient), so the only backward is the scores'.
struct ScaledMaskedSoftmax {
    scale: f64,
    rows: MaskRows,
    heads: usize,
    tq: usize,
}

fn sms_fwd<T: Real>(
    s: &CpuStorage,
    ls: &Layout,
    m: &CpuStorage,
    lm: &Layout,
    op: &ScaledMaskedSoftmax,
) -> candle_core::Result<CpuStorage> {
    let (s, m) = (slice::<T>(s, ls)?, slice::<T>(m, lm)?);
    let tk = last_dim(ls);
    let scale = T::lit(op.scale);
    let mut out = vec![T::zero(); s.len()];
    let c = tk * rows_per_task(tk);
    let per_task = c / tk;
    out.par_chunks_mut(c)
        .zip(s.par_chunks(c))
        .enumerate()
        .for_each(|(ti, (oc, sc))| {
            for (ri, (o, r)) in oc.chunks_mut(tk).zip(sc.chunks(tk)).enumerate() {
                let row = ti * per_task + ri;
                let q = row % op.tq;
                let bidx = row / (op.tq * op.heads);
                let mr = match op.rows {
                    MaskRows::PerBatch => &m[bidx * tk..(bidx + 1) * tk],
                    MaskRows::PerQuery => &m[q * tk..(q + 1) * tk],
                };
                let mut max = T::neg_infinity();
                for i in 0..tk {
                    o[i] = r[i] * scale + mr[i];
                    max = num_traits::Float::max(max, o[i]);
                }
                for v in o.iter_mut() {
                    *v = (*v - max).exp_();
                }
                let inv = T::one() / sum(o.iter().copied());
                o.iter_mut().for_each(|v| *v *= inv);
            }
        });
    Ok(T::to_cpu_storage_owned(out))
}

impl CustomOp2 for ScaledMaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-scaled-masked-softmax"
    }
    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        ls: &Layout,
        m: &CpuStorage,
        lm: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((
            dispatch1!(s, sms_fwd, s, ls, m, lm, self)?,
            ls.shape().clone(),
        ))
    }
    fn bwd(
        &self,
        _s: &Tensor,
        _m: &Tensor,
        res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let gs = res.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxBwd)?;
        Ok((Some((gs * self.scale)?), None))
    }
}

/// `softmax(scale · scores + mask)`: scores `(B, H, Tq, Tk)`, mask `(B, Tk)` (per batch) or
/// `(Tq, Tk)` (per query), additive.
pub fn scaled_masked_softmax(
    scores: &Tensor,
    scale: f64,
    mask: &Tensor,
    rows: MaskRows,
) -> crate::Result<Tensor> {
    let (b, h, tq, tk) = scores.dims4()?;
    if applies(scores) && mask.dtype() == scores.dtype() {
        let op = ScaledMaskedSoftmax {
            scale,
            rows,
            heads: h,
            tq,
        };
        return Ok(scores.contiguous()?.apply_op2(&mask.contiguous()?, op)?);
    }
    let m = match rows {
        MaskRows::PerBatch => mask.reshape((b, 1, 1, tk))?,
        MaskRows::PerQuery => mask.reshape((1, 1, tq, tk))?,
    };
    super::ops::softmax_last_dim(&(scores * scale)?.broadcast_add(&m)?)
}

mod decoder;
pub use decoder::{rms_norm, rope_heads, swiglu};
