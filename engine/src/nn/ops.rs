use candle_core::{DType, Device, Tensor, D};
use rand::Rng;

use crate::Result;

/// Mixed precision: normalisations and softmaxes of bf16/f16 activations run in f32 (as
/// autocast does) — their reductions over hundreds of features in bf16 lose most digits, and
/// the backward through them (differences of near-equal sums) far more.
fn low_precision(x: &Tensor) -> bool {
    matches!(x.dtype(), DType::BF16 | DType::F16)
}

fn f32s(ts: &[&Tensor]) -> Result<Vec<Tensor>> {
    ts.iter().map(|t| Ok(t.to_dtype(DType::F32)?)).collect()
}

/// Layer norm over the last dimension: `(x - mean) / sqrt(var + eps) * w + b`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if low_precision(x) {
        let v = f32s(&[x, w, b])?;
        return Ok(layer_norm(&v[0], &v[1], &v[2], eps)?.to_dtype(x.dtype())?);
    }
    if super::fused::applies(x) && x.dtype() == w.dtype() {
        return Ok(super::fused::layer_norm(x, w, b, eps)?);
    }
    layer_norm_composed(x, w, b, eps)
}

/// The composed reference (any device or dtype).
pub fn layer_norm_composed(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(xn.broadcast_mul(w)?.broadcast_add(b)?)
}

/// RMS norm over the last dimension: `x / sqrt(mean(x²) + eps) * w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if low_precision(x) {
        let v = f32s(&[x, w])?;
        return Ok(rms_norm(&v[0], &v[1], eps)?.to_dtype(x.dtype())?);
    }
    if super::fused::applies(x) && x.dtype() == w.dtype() {
        return Ok(super::fused::rms_norm(x, w, eps)?);
    }
    rms_norm_composed(x, w, eps)
}

/// The composed reference (any device or dtype).
pub fn rms_norm_composed(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)?)
}

/// Softmax over the last dimension. The max is detached: subtracting any constant leaves
/// softmax unchanged, so its gradient through the max is exactly zero.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if low_precision(x) {
        return Ok(softmax_last_dim(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?);
    }
    if super::fused::applies(x) {
        return Ok(super::fused::softmax_last_dim(x)?);
    }
    softmax_composed(x)
}

/// The composed reference (any device or dtype).
pub fn softmax_composed(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let xs = x.broadcast_sub(&max)?;
    let lse = xs.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(xs.broadcast_sub(&lse)?)
}

/// cos/sin tables for rotary embeddings, `(T, head_dim)`, in the layout of Hugging Face's
/// `rotate_half` convention (frequencies repeated for both halves), computed in f32 as
/// transformers does, then cast.
pub fn rope_tables(
    positions: usize,
    head_dim: usize,
    theta: f64,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(positions * head_dim);
    let mut sin = Vec::with_capacity(positions * head_dim);
    for p in 0..positions {
        // Both halves of the head dimension use the same frequencies.
        for f in inv_freq.iter().chain(&inv_freq) {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    let cos = Tensor::from_vec(cos, (positions, head_dim), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (positions, head_dim), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// Rotary position embedding on `(B, H, T, D)`: `x·cos + rotate_half(x)·sin`,
/// `rotate_half([x1, x2]) = [-x2, x1]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

/// Exact GELU, `x·Φ(x)`. candle's fused `gelu_erf` backward uses a 6-digit constant
/// (relative gradient error ~1e-6), so this is composed from ops with exact derivatives.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if super::fused::applies(x) {
        return Ok(super::fused::gelu_erf(x)?);
    }
    gelu_erf_composed(x)
}

/// The composed reference (any device or dtype).
pub fn gelu_erf_composed(x: &Tensor) -> Result<Tensor> {
    let phi = ((x / std::f64::consts::SQRT_2)?.erf()? + 1.0)? * 0.5;
    Ok(x.mul(&phi?)?)
}

/// The tanh approximation of GELU (`gelu_new`), composed for an exact derivative.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let inner = ((x + (x.powf(3.0)? * 0.044715)?)? * c)?;
    Ok((x * 0.5)?.mul(&(inner.tanh()? + 1.0)?)?)
}

/// Inverted dropout with a mask drawn from `rng` (so runs are reproducible for a seed).
pub fn dropout(x: &Tensor, p: f64, rng: &mut impl Rng) -> Result<Tensor> {
    match dropout_mask(x, p, rng)? {
        Some(mask) => Ok(x.mul(&mask)?),
        None => Ok(x.clone()),
    }
}

/// The multipliers [`dropout`] applies to `x` (0 or `1/(1-p)`), drawn in the same order;
/// `None` when `p` is 0.
pub fn dropout_mask(x: &Tensor, p: f64, rng: &mut impl Rng) -> Result<Option<Tensor>> {
    if p <= 0.0 {
        return Ok(None);
    }
    let n = x.elem_count();
    let keep = 1.0 - p;
    let scale = (1.0 / keep) as f32;
    let mask: Vec<f32> = (0..n)
        .map(|_| {
            if rng.random::<f64>() < keep {
                scale
            } else {
                0.0
            }
        })
        .collect();
    Ok(Some(
        Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?,
    ))
}

/// Mean cross-entropy over the rows whose weight is non-zero.
/// `logits (N, C)`, `targets (N,) u32`, `weights (N,)` in the logits' dtype (0 or 1).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let logp = log_softmax_last_dim(logits)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    let count = weights
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?
        .max(1.0);
    Ok((picked.mul(weights)?.sum_all()?.neg()? / count)?)
}

pub fn mse(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    Ok(pred.sub(target)?.sqr()?.mean_all()?)
}

/// Rows of `(rows, V)` logits per chunk of [`chunked_lm_loss`]: about 4M values (16 MiB in
/// f32) per chunk buffer, whatever the vocabulary.
pub fn lm_loss_chunk_rows(vocab: usize) -> usize {
    (4 << 20) / vocab.max(1)
}

/// The mean next-token cross-entropy of `logits = h Wᵀ` over the rows `weights` counts, without
/// the whole `(N, V)` logits or their gradient: `chunk` rows at a time, each chunk's logits are
/// formed, reduced to its loss and — when `h` is part of a graph — to its share of `∂L/∂h`
/// (and `∂L/∂W` when `W` trains), then dropped. The returned scalar carries those gradients
/// into the graph through `Σ h ⊙ ∂L/∂h (+ Σ W ⊙ ∂L/∂W)` minus its own detached value, so
/// `backward` sees exactly the plain loss's gradient. Computed in f32 (f64 for f64 models).
/// `grad: false` (evaluation) computes the value alone.
pub fn chunked_lm_loss(
    h: &Tensor,
    head: &super::Param,
    targets: &Tensor,
    weights: &Tensor,
    chunk: usize,
    grad: bool,
) -> Result<Tensor> {
    let dt = match h.dtype() {
        DType::F64 => DType::F64,
        _ => DType::F32,
    };
    let (n, _) = h.dims2()?;
    let train_w = head.is_trainable();
    let want_grad = grad && (h.track_op() || train_w);
    let wf = head.tensor().detach().to_dtype(dt)?;
    let hf = h.detach().to_dtype(dt)?;
    let mask = weights.to_dtype(dt)?;
    let count = mask
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?
        .max(1.0);
    let mut loss = 0f64;
    let mut gh = Vec::new();
    let mut gw: Option<Tensor> = None;
    let chunk = chunk.max(1);
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        let hc = hf.narrow(0, start, len)?;
        let tc = targets.narrow(0, start, len)?;
        let mc = mask.narrow(0, start, len)?;
        let logits = hc.matmul(&wf.t()?)?;
        let max = logits.max_keepdim(D::Minus1)?;
        let shifted = logits.broadcast_sub(&max)?;
        drop(logits);
        let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        let picked = shifted.gather(&tc.unsqueeze(1)?, 1)?;
        // −log p(target) = lse − (x_t − max), counted where the mask says.
        let nll = (lse.clone() - picked)?.squeeze(1)?;
        loss += nll
            .mul(&mc)?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        if want_grad {
            // ∂L/∂logits = (softmax − onehot) · mask / count, formed in place of `shifted`.
            let p = shifted.broadcast_sub(&lse)?.exp()?;
            drop(shifted);
            let minus_one = Tensor::full(-1f64, (len, 1), h.device())?.to_dtype(dt)?;
            let p = p.scatter_add(&tc.unsqueeze(1)?, &minus_one, 1)?;
            let g = p.broadcast_mul(&(mc / count)?.unsqueeze(1)?)?;
            gh.push(g.matmul(&wf)?);
            if train_w {
                let c = g.t()?.matmul(&hc)?;
                gw = Some(match gw {
                    Some(a) => (a + c)?,
                    None => c,
                });
            }
        }
    }
    let value = Tensor::new(loss / count, h.device())?.to_dtype(dt)?;
    if !want_grad {
        return Ok(value);
    }
    let mut surrogate = if h.track_op() && !gh.is_empty() {
        let gh = Tensor::cat(&gh, 0)?.to_dtype(h.dtype())?;
        (h * gh)?.sum_all()?.to_dtype(dt)?
    } else {
        Tensor::new(0f64, h.device())?.to_dtype(dt)?
    };
    if let (Some(g), super::Param::Trainable(v)) = (gw, head) {
        let t = v.as_tensor();
        surrogate = (surrogate + (t * g.to_dtype(t.dtype())?)?.sum_all()?.to_dtype(dt)?)?;
    }
    Ok(((surrogate.clone() - surrogate.detach())? + value)?)
}
