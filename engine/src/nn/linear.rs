use std::sync::Arc;

use candle_core::{
    backend::BackendStorage, CpuStorage, CudaStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor,
};

/// Receives a frozen linear layer's input and upstream gradient during backward, so a method
/// can form (and immediately reduce) the weight gradient itself — SparseGrad rotates it and
/// keeps the top-k, MeProp keeps the top-k — without candle ever holding it in a GradStore.
pub trait WeightGradHook: Send + Sync {
    /// `x`: the layer input as `(tokens, in)`; `grad_out`: `∂L/∂y` as `(tokens, out)`.
    fn on_backward(&self, x: &Tensor, grad_out: &Tensor) -> candle_core::Result<()>;
    /// A variable the tap's output depends on, so that backward reaches the layer even when
    /// nothing below it is trained (SparseGrad's `mlp` scope freezes every other weight).
    /// Its gradient is never formed.
    fn anchor(&self) -> &Tensor;
}

/// `y = x Wᵀ (+ b)` whose backward sends `x` the input gradient `g W` only: the weight gradient
/// `gᵀ x` that candle's matmul backward would compute (and keep) for the frozen weight is never
/// formed. The product is computed inside the op, so the graph holds only `x` (needed anyway)
/// and `y`, not a second, detached copy of `y`.
struct GradTap {
    weight: Tensor,
    /// A frozen bias added in the same pass (CPU f32/f64 only).
    bias: Option<Tensor>,
    hook: Option<Arc<dyn WeightGradHook>>,
}

/// `(batching, m, n, k)` and `Wᵀ`'s layout for `x (m, k) · W (n, k)ᵀ`.
fn product_shape(
    lx: &Layout,
    w: &Tensor,
) -> candle_core::Result<((usize, usize, usize, usize), Layout)> {
    let (m, k) = match lx.dims() {
        [m, k] => (*m, *k),
        d => candle_core::bail!("grad tap expects (tokens, in), got {d:?}"),
    };
    let (n, k2) = w.dims2()?;
    if k != k2 {
        candle_core::bail!("grad tap: input width {k} vs weight {n}x{k2}");
    }
    Ok(((1, m, n, k), w.layout().transpose(0, 1)?))
}

impl CustomOp2 for GradTap {
    fn name(&self) -> &'static str {
        "frozen-linear-grad-tap"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        _anchor: &CpuStorage,
        _la: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (bmnk, lwt) = product_shape(lx, &self.weight)?;
        let (ws, _) = self.weight.storage_and_layout();
        let candle_core::Storage::Cpu(ws) = &*ws else {
            candle_core::bail!("grad tap: weight and input on different devices");
        };
        let y = sx.matmul(ws, bmnk, lx, &lwt)?;
        let ly = Layout::contiguous((bmnk.1, bmnk.2));
        if let Some(b) = &self.bias {
            let (st, lb) = b.storage_and_layout();
            if let candle_core::Storage::Cpu(bs) = &*st {
                return super::fused::bias_add_cpu(&y, &ly, bs, lb);
            }
        }
        Ok((y, ly.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        sx: &CudaStorage,
        lx: &Layout,
        _anchor: &CudaStorage,
        _la: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (bmnk, lwt) = product_shape(lx, &self.weight)?;
        let (ws, _) = self.weight.storage_and_layout();
        let candle_core::Storage::Cuda(ws) = &*ws else {
            candle_core::bail!("grad tap: weight and input on different devices");
        };
        let y = sx.matmul(ws, bmnk, lx, &lwt)?;
        Ok((y, Shape::from((bmnk.1, bmnk.2))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _anchor: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if let Some(hook) = &self.hook {
            hook.on_backward(&x.detach(), grad)?;
        }
        let gx = if x.track_op() {
            Some(grad.matmul(&self.weight)?)
        } else {
            None
        };
        Ok((gx, None))
    }
}

/// `y = x Wᵀ` for a frozen `W`: `(tokens, in) → (tokens, out)`. Backward yields only `∂L/∂x`
/// (and feeds the optional hook).
pub fn frozen_linear(
    x: &Tensor,
    weight: &Tensor,
    hook: Option<Arc<dyn WeightGradHook>>,
) -> candle_core::Result<Tensor> {
    frozen_linear_bias(x, weight, None, hook)
}

/// [`frozen_linear`] plus a frozen bias, added in the tap's own pass where the fused path
/// applies (otherwise as a separate op).
pub fn frozen_linear_bias(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    hook: Option<Arc<dyn WeightGradHook>>,
) -> candle_core::Result<Tensor> {
    if !x.track_op() && hook.is_none() {
        let y = x.matmul(&weight.t()?)?;
        return match bias {
            Some(b) => super::fused::bias_add(&y, b),
            None => Ok(y),
        };
    }
    let fold = bias.filter(|b| {
        super::fused::applies(x) && b.dtype() == x.dtype() && !b.track_op() && b.rank() == 1
    });
    // Without a hook the input itself carries the tracking; with one, the hook's anchor does.
    let anchor = match &hook {
        Some(h) => h.anchor().clone(),
        None => x.clone(),
    };
    let out = x.contiguous()?.apply_op2(
        &anchor,
        GradTap {
            weight: weight.detach(),
            bias: fold.map(|b| b.contiguous()).transpose()?,
            hook,
        },
    )?;
    match (bias, fold) {
        (Some(b), None) => super::fused::bias_add(&out, b),
        _ => Ok(out),
    }
}

/// `y = x Wᵀ + b + s·((x⊙m) Aᵀ) Bᵀ` (LoRA on a frozen `W`, dropout mask `m` on the adapter's
/// input) as one graph node over `(x, A, B)`. Composed, candle keeps the frozen product, the
/// rank-r products, the full-width delta, the dropped-out input and the sum alive until
/// backward; here only the output (and the mask) stay, and the backward recomputes the
/// rank-r product `(x⊙m) Aᵀ`, which costs `r/out` of the forward's matmul.
struct LoraLinear {
    weight: Tensor,
    scale: f64,
    mask: Option<Tensor>,
    /// The output, computed on detached operands before the node is built; the node's
    /// forward moves it out (so the graph holds it once, as the node's result).
    out: std::sync::Mutex<Option<Tensor>>,
}

impl LoraLinear {
    fn masked(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.mask {
            Some(m) => x.mul(m),
            None => Ok(x.clone()),
        }
    }

    fn take_out(&self) -> candle_core::Result<Tensor> {
        self.out
            .lock()
            .map_err(|_| candle_core::Error::Msg("lora linear: poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("lora linear: forward ran twice".into()))
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "fused-lora-linear"
    }

    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        _lx: &Layout,
        _a: &CpuStorage,
        _la: &Layout,
        _b: &CpuStorage,
        _lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = self.take_out()?;
        let (st, l) = out.storage_and_layout();
        match &*st {
            candle_core::Storage::Cpu(s) => Ok((s.try_clone(l)?, l.shape().clone())),
            _ => candle_core::bail!("lora linear: output on another device"),
        }
    }

    fn cuda_fwd(
        &self,
        _x: &CudaStorage,
        _lx: &Layout,
        _a: &CudaStorage,
        _la: &Layout,
        _b: &CudaStorage,
        _lb: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let out = self.take_out()?;
        let (st, l) = out.storage_and_layout();
        match &*st {
            candle_core::Storage::Cuda(s) => Ok((s.try_clone(l)?, l.shape().clone())),
            _ => candle_core::bail!("lora linear: output on another device"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let track = (x.track_op(), a.track_op(), b.track_op());
        let (x, a, b, g) = (x.detach(), a.detach(), b.detach(), g.detach());
        let xm = self.masked(&x)?;
        let gu = (g.matmul(&b)? * self.scale)?;
        let ga = track.1.then(|| gu.t()?.matmul(&xm)).transpose()?;
        let gb = if track.2 {
            let u = xm.matmul(&a.t()?)?;
            Some((g.t()?.matmul(&u)? * self.scale)?)
        } else {
            None
        };
        let gx = if track.0 {
            Some(
                g.matmul(&self.weight)?
                    .add(&self.masked(&gu.matmul(&a)?)?)?,
            )
        } else {
            None
        };
        Ok((gx, ga, gb))
    }
}

/// LoRA on a frozen linear, `x (tokens, in)`: see [`LoraLinear`]. A trained bias is added
/// after the node (its gradient is the column sum); with nothing trained (inference) no node is
/// built at all.
pub fn lora_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<Tensor>,
) -> candle_core::Result<Tensor> {
    let (xd, wd, ad, bd) = (x.detach(), weight.detach(), a.detach(), b.detach());
    let xm = match &mask {
        Some(m) => xd.mul(m)?,
        None => xd.clone(),
    };
    let frozen_bias = bias.filter(|b| !b.track_op());
    let mut out = xd.matmul(&wd.t()?)?;
    if let Some(fb) = frozen_bias {
        out = super::fused::bias_add(&out, fb)?;
    }
    let out = out.add(&(xm.matmul(&ad.t()?)? * scale)?.matmul(&bd.t()?)?)?;
    drop(xm);
    let out = if x.track_op() || a.track_op() || b.track_op() {
        let op = LoraLinear {
            weight: wd,
            scale,
            mask,
            out: std::sync::Mutex::new(Some(out)),
        };
        x.apply_op3(a, b, op)?
    } else {
        out
    };
    match bias.filter(|b| b.track_op()) {
        Some(tb) => super::fused::bias_add(&out, tb),
        None => Ok(out),
    }
}
