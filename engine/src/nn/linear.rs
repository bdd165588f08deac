use std::sync::Arc;

use candle_core::{
    backend::BackendStorage, CpuStorage, CudaStorage, CustomOp3, Layout, Shape, Tensor,
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

/// Passes `y` through unchanged in the forward pass and, in the backward pass, sends `x` the
/// input gradient `g W` only: the weight gradient `gᵀ x` that candle's matmul backward would
/// compute (and keep) for the frozen weight is never formed.
struct GradTap {
    weight: Tensor,
    /// A frozen bias added in the same pass (CPU f32/f64 only).
    bias: Option<Tensor>,
    hook: Option<Arc<dyn WeightGradHook>>,
}

fn check_plain(l: &Layout) -> candle_core::Result<()> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("grad tap expects a fresh contiguous tensor");
    }
    Ok(())
}

impl CustomOp3 for GradTap {
    fn name(&self) -> &'static str {
        "frozen-linear-grad-tap"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
        _s3: &CpuStorage,
        _l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        check_plain(l1)?;
        if let Some(b) = &self.bias {
            let (st, lb) = b.storage_and_layout();
            if let candle_core::Storage::Cpu(bs) = &*st {
                return super::fused::bias_add_cpu(s1, l1, bs, lb);
            }
        }
        Ok((s1.try_clone(l1)?, l1.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        _s2: &CudaStorage,
        _l2: &Layout,
        _s3: &CudaStorage,
        _l3: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        check_plain(l1)?;
        Ok((s1.try_clone(l1)?, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _y: &Tensor,
        x: &Tensor,
        _anchor: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if let Some(hook) = &self.hook {
            hook.on_backward(&x.detach(), grad)?;
        }
        let gx = if x.track_op() {
            Some(grad.matmul(&self.weight)?)
        } else {
            None
        };
        Ok((None, gx, None))
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
    let y = x.detach().matmul(&weight.t()?)?;
    let fold =
        bias.filter(|b| super::fused::applies(&y) && b.dtype() == y.dtype() && !b.track_op());
    if !x.track_op() && hook.is_none() {
        return match bias {
            Some(b) => super::fused::bias_add(&y, b),
            None => Ok(y),
        };
    }
    // Without a hook the input itself carries the tracking; with one, the hook's anchor does.
    let anchor = match &hook {
        Some(h) => h.anchor().clone(),
        None => x.clone(),
    };
    let out = y.apply_op3(
        x,
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
