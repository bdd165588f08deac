//! Launches of the kernels in `engine/kernels/sparsegrad.cu` (compiled to PTX by build.rs)
//! and the cuBLAS call behind [`super::gemm_acc`].
//!
//! Kernel launches and raw cuBLAS calls are `unsafe` in cudarc; this module is the one place
//! the engine allows it. Every launch checks the lengths its kernel will touch first.
#![allow(unsafe_code)]

use candle_core::cuda_backend::cudarc::cublas::{sys::cublasOperation_t, Gemm, GemmConfig};
use candle_core::cuda_backend::cudarc::driver::{
    self, CudaFunction, CudaSlice, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{DType, Device, InplaceOp3, Layout, Storage, Tensor};

use super::{AdamStep, Csr};
use crate::{Error, Result};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sparsegrad.ptx"));
const MODULE: &str = "sparsegrad";
const BLOCK: u32 = 256;
/// Entries per block in the top-k compaction (a multiple of BLOCK).
pub const SELECT_CHUNK: usize = 4096;

fn func(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    Ok(dev
        .get_or_load_custom_func(name, MODULE, PTX)?
        .into_cuda_function())
}

fn grid(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn cuda_dev(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        d => Err(Error::Other(format!("expected a CUDA tensor, got {d:?}"))),
    }
}

fn wrap<T: candle_core::cuda_backend::CudaDType>(
    s: CudaSlice<T>,
    dev: &CudaDevice,
    len: usize,
) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone())),
        len,
        BackpropOp::none(),
        false,
    )
}

/// Runs `f` on the contiguous data of a CUDA tensor of dtype `T` (checked).
fn with_slice<T: candle_core::cuda_backend::CudaDType, R>(
    t: &Tensor,
    f: impl FnOnce(driver::CudaView<'_, T>) -> Result<R>,
) -> Result<R> {
    let (st, l) = t.storage_and_layout();
    f(view::<T>(&st, l)?)
}

/// A fresh device copy of a 1-d f32 tensor, for kernels that update their output in place.
fn copy_f32(dev: &CudaDevice, t: &Tensor) -> Result<CudaSlice<f32>> {
    let t = t.contiguous()?;
    with_slice::<f32, _>(&t, |tv| {
        let mut o = unsafe { dev.alloc::<f32>(tv.len())? };
        dev.memcpy_dtod(&tv, &mut o)?;
        Ok(o)
    })
}

/// The contiguous data of a CUDA storage as a typed view.
fn view<'a, T: candle_core::cuda_backend::CudaDType>(
    st: &'a Storage,
    l: &Layout,
) -> Result<driver::CudaView<'a, T>> {
    let Storage::Cuda(cs) = st else {
        return Err(Error::Other("expected a CUDA tensor".into()));
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        return Err(Error::Other("kernel input must be contiguous".into()));
    };
    Ok(cs.as_cuda_slice::<T>()?.slice(a..b))
}

pub fn topk_abs(x: &Tensor, k: usize) -> Result<(Vec<u32>, Tensor)> {
    let dev = cuda_dev(x)?;
    let n = x.elem_count();
    let k = k.min(n);
    if k == 0 {
        return Ok((Vec::new(), Tensor::zeros(0, DType::F32, &Device::Cpu)?));
    }
    let hist_f = func(&dev, "sg_radix_hist")?;
    let count_f = func(&dev, "sg_select_count")?;
    let write_f = func(&dev, "sg_select_write")?;
    with_slice::<f32, _>(x, |xs| {
        // Radix select: three histogram passes pin the k-th largest magnitude key.
        let (mut prefix, mut mask, mut above) = (0u32, 0u32, 0usize);
        for (shift, bits) in crate::topk::RADIX_PASSES {
            let bin_mask = (1u32 << bits) - 1;
            let hist = dev.alloc_zeros::<u32>(1 << bits)?;
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(BLOCK as usize).clamp(1, 1024) as u32, 1, 1),
                ..grid(n)
            };
            let n64 = n as u64;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&hist_f);
            b.arg(&xs).arg(&n64).arg(&prefix).arg(&mask);
            b.arg(&shift).arg(&bin_mask).arg(&hist);
            unsafe { b.launch(cfg) }.w()?;
            let h = dev.clone_dtoh(&hist)?;
            let bin = crate::topk::radix_step(&h, k, &mut above);
            prefix |= bin << shift;
            mask |= bin_mask << shift;
        }
        let (thr, need) = (prefix, (k - above) as u32);
        // Compaction in index order: per-chunk counts, exclusive scan on the host (a few
        // thousand numbers), then each chunk writes its entries at their rank.
        let chunks = n.div_ceil(SELECT_CHUNK);
        let gt = dev.alloc_zeros::<u32>(chunks)?;
        let eq = dev.alloc_zeros::<u32>(chunks)?;
        let cfg = LaunchConfig {
            grid_dim: (chunks as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n64, chunk) = (n as u64, SELECT_CHUNK as u32);
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&count_f);
        b.arg(&xs).arg(&n64).arg(&thr).arg(&chunk).arg(&gt).arg(&eq);
        unsafe { b.launch(cfg) }.w()?;
        let (gh, eh) = (dev.clone_dtoh(&gt)?, dev.clone_dtoh(&eq)?);
        let scan = |v: &[u32]| {
            let mut acc = 0u32;
            v.iter()
                .map(|&c| {
                    let s = acc;
                    acc += c;
                    s
                })
                .collect::<Vec<u32>>()
        };
        let gt_base = dev.clone_htod(&scan(&gh))?;
        let eq_base = dev.clone_htod(&scan(&eh))?;
        let out_idx = dev.alloc_zeros::<u32>(k)?;
        let out_val = dev.alloc_zeros::<f32>(k)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&write_f);
        b.arg(&xs).arg(&n64).arg(&thr).arg(&need).arg(&chunk);
        b.arg(&gt_base).arg(&eq_base).arg(&out_idx).arg(&out_val);
        unsafe { b.launch(cfg) }.w()?;
        let idx = dev.clone_dtoh(&out_idx)?;
        Ok((idx, wrap(out_val, &dev, k)))
    })
}

pub fn gather_acc(block: &Tensor, pos: &Tensor, acc: Option<&Tensor>) -> Result<Tensor> {
    let dev = cuda_dev(block)?;
    let k = pos.elem_count();
    if k == 0 {
        return Ok(Tensor::zeros(0, DType::F32, &Device::Cpu)?);
    }
    let f = func(&dev, "sg_gather_acc")?;
    let pos = pos.to_dtype(DType::U32)?.contiguous()?;
    // The output starts as a copy of `acc` (or uninitialised, fully written by the kernel).
    let out: CudaSlice<f32> = match acc {
        Some(a) if a.elem_count() == k => copy_f32(&dev, a)?,
        Some(_) => return Err(Error::Other("gather_acc: accumulator length".into())),
        None => dev.alloc_zeros::<f32>(k)?,
    };
    let n = block.elem_count();
    let max_pos = pos.max(0)?.to_scalar::<u32>()? as usize;
    if max_pos >= n {
        return Err(Error::Other(format!(
            "gather_acc: position {max_pos} outside {n}"
        )));
    }
    with_slice::<f32, _>(block, |bs| {
        with_slice::<u32, _>(&pos, |ps| {
            let (k64, accumulate) = (k as u64, acc.is_some() as u32);
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&bs).arg(&ps).arg(&out).arg(&k64).arg(&accumulate);
            unsafe { b.launch(grid(k)) }.w()?;
            Ok(())
        })
    })?;
    Ok(wrap(out, &dev, k))
}

pub fn sparse_adam(
    m: &Tensor,
    v: &Tensor,
    slot: Option<&Tensor>,
    g: &Tensor,
    s: &AdamStep,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dev = cuda_dev(m)?;
    let (cap, k) = (m.elem_count(), g.elem_count());
    if k == 0 {
        return Ok((
            m.clone(),
            v.clone(),
            Tensor::zeros(0, DType::F32, &Device::Cpu)?,
        ));
    }
    if v.elem_count() != cap || (slot.is_none() && k != cap) {
        return Err(Error::Other("sparse_adam: state lengths".into()));
    }
    if let Some(sl) = slot {
        if sl.elem_count() != k || sl.max(0)?.to_scalar::<u32>()? as usize >= cap {
            return Err(Error::Other("sparse_adam: slot outside the state".into()));
        }
    }
    let f = func(&dev, "sg_sparse_adam")?;
    let (m2, v2) = (copy_f32(&dev, m)?, copy_f32(&dev, v)?);
    let ch = dev.alloc_zeros::<f32>(k)?;
    let g = g.contiguous()?;
    let slot = slot.map(|t| t.contiguous()).transpose()?;
    let (gst, gl) = g.storage_and_layout();
    let gv = view::<f32>(&gst, gl)?;
    let sguard = slot.as_ref().map(|t| t.storage_and_layout());
    let sv = match &sguard {
        Some((st, l)) => Some(view::<u32>(st, l)?),
        None => None,
    };
    let (k64, null) = (k as u64, 0usize);
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&m2).arg(&v2);
    match &sv {
        Some(v) => b.arg(v),
        None => b.arg(&null),
    };
    b.arg(&gv).arg(&ch).arg(&k64).arg(&s.gscale).arg(&s.lr);
    b.arg(&s.beta1)
        .arg(&s.beta2)
        .arg(&s.eps)
        .arg(&s.bc1)
        .arg(&s.bc2);
    unsafe { b.launch(grid(k)) }.w()?;
    drop(b);
    Ok((wrap(m2, &dev, cap), wrap(v2, &dev, cap), wrap(ch, &dev, k)))
}

pub fn scatter_rows(csr: &Csr, vals: &Tensor, src_rows: &Tensor, width: usize) -> Result<Tensor> {
    let dev = cuda_dev(src_rows)?;
    let n_src = src_rows.dim(0)?;
    let entries = csr.src.elem_count();
    if vals.elem_count() != entries || csr.perm.elem_count() != entries {
        return Err(Error::Other("scatter_rows: entry counts".into()));
    }
    if csr.src.max(0)?.to_scalar::<u32>()? as usize >= n_src {
        return Err(Error::Other(
            "scatter_rows: source row outside the basis".into(),
        ));
    }
    let f = func(&dev, "sg_scatter_rows")?;
    let out = dev.alloc_zeros::<f32>(csr.n_rows * width)?;
    let (src_rows, vals) = (src_rows.contiguous()?, vals.contiguous()?);
    let guards =
        [&csr.row_ptr, &csr.src, &csr.perm, &vals, &src_rows].map(|t| t.storage_and_layout());
    let [rp, sr, pm] = [0, 1, 2].map(|i| view::<u32>(&guards[i].0, guards[i].1));
    let (rp, sr, pm) = (rp?, sr?, pm?);
    let vv = view::<f32>(&guards[3].0, guards[3].1)?;
    let rows = view::<f32>(&guards[4].0, guards[4].1)?;
    let w = width as u32;
    let cfg = LaunchConfig {
        grid_dim: (csr.n_rows as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&rp)
        .arg(&sr)
        .arg(&pm)
        .arg(&vv)
        .arg(&rows)
        .arg(&out)
        .arg(&w);
    unsafe { b.launch(cfg) }.w()?;
    drop(b);
    Ok(wrap(out, &dev, csr.n_rows * width).reshape((csr.n_rows, width))?)
}

/// A row-major operand as cuBLAS sees it: the column-major view of a row-major buffer is the
/// transpose, so `transposed` here means "stored as its transpose, contiguously".
fn operand(l: &Layout) -> candle_core::Result<(bool, usize)> {
    let (r, c) = l.shape().dims2()?;
    let st = l.stride();
    if st[1] == 1 && (st[0] == c || r == 1) {
        Ok((false, c))
    } else if st[0] == 1 && (st[1] == r || c == 1) {
        Ok((true, r))
    } else {
        candle_core::bail!("gemm_acc: operand must be contiguous or a transposed contiguous matrix")
    }
}

/// `C += A·B` with cuBLAS, β = 1. Row-major `C = op(A)·op(B)` is column-major
/// `Cᵀ = op(B)ᵀ·op(A)ᵀ`, so B is passed first.
pub struct GemmAcc;

impl InplaceOp3 for GemmAcc {
    fn name(&self) -> &'static str {
        "gemm-acc"
    }
    fn cpu_fwd(
        &self,
        _: &mut candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        candle_core::bail!("gemm-acc runs on CUDA only; the CPU path multiplies then adds")
    }
    fn cuda_fwd(
        &self,
        c: &mut CudaStorage,
        lc: &Layout,
        a: &CudaStorage,
        la: &Layout,
        b: &CudaStorage,
        lb: &Layout,
    ) -> candle_core::Result<()> {
        let (m, n) = lc.shape().dims2()?;
        let k = la.shape().dims2()?.1;
        let Some((c0, c1)) = lc.contiguous_offsets() else {
            candle_core::bail!("gemm-acc: the accumulator must be contiguous")
        };
        let (ta, lda_rm) = operand(la)?;
        let (tb, ldb_rm) = operand(lb)?;
        let op = |t: bool| {
            if t {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        let cfg = GemmConfig {
            transa: op(tb),
            transb: op(ta),
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha: 1.0f32,
            lda: ldb_rm as i32,
            ldb: lda_rm as i32,
            beta: 1.0f32,
            ldc: n as i32,
        };
        let blas = c.device.cublas_handle();
        let av = a.as_cuda_slice::<f32>()?.slice(la.start_offset()..);
        let bv = b.as_cuda_slice::<f32>()?.slice(lb.start_offset()..);
        let cs = c.as_cuda_slice_mut::<f32>()?;
        let mut cv = cs.slice_mut(c0..c1);
        unsafe { blas.gemm(cfg, &bv, &av, &mut cv) }.w()?;
        Ok(())
    }
}

/// The device's default memory pool — what cudarc's stream-ordered allocations (and so
/// candle's) come from on GPUs that have pools.
fn default_pool(dev: &Device) -> Result<driver::sys::CUmemoryPool> {
    use driver::sys;
    let d = dev.as_cuda_device()?;
    d.cuda_stream().context().bind_to_thread().w()?;
    let ordinal = match dev.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => gpu_id as i32,
        _ => 0,
    };
    let mut cu_dev: sys::CUdevice = 0;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    unsafe {
        sys::cuDeviceGet(&mut cu_dev, ordinal).result().w()?;
        sys::cuDeviceGetDefaultMemPool(&mut pool, cu_dev)
            .result()
            .w()?;
    }
    Ok(pool)
}

/// A u64 attribute of a memory pool: read, or written when `set` is given.
fn pool_attr(
    pool: driver::sys::CUmemoryPool,
    attr: driver::sys::CUmemPool_attribute,
    set: Option<u64>,
) -> Result<u64> {
    use driver::sys;
    let mut v = set.unwrap_or(0);
    unsafe {
        match set {
            Some(_) => sys::cuMemPoolSetAttribute(pool, attr, &mut v as *mut u64 as *mut _),
            None => sys::cuMemPoolGetAttribute(pool, attr, &mut v as *mut u64 as *mut _),
        }
        .result()
        .w()?;
    }
    Ok(v)
}

/// Peak device memory of the default pool: `(high-water mark of bytes in use, of bytes
/// reserved)`, optionally resetting both marks.
pub fn pool_peak(dev: &Device, reset: bool) -> Result<(u64, u64)> {
    use driver::sys::CUmemPool_attribute::{
        CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH as RESERVED, CU_MEMPOOL_ATTR_USED_MEM_HIGH as USED,
    };
    let pool = default_pool(dev)?;
    let out = (
        pool_attr(pool, USED, None)?,
        pool_attr(pool, RESERVED, None)?,
    );
    if reset {
        pool_attr(pool, USED, Some(0))?;
        pool_attr(pool, RESERVED, Some(0))?;
    }
    Ok(out)
}

/// Lets the stream-ordered allocator keep freed memory for reuse instead of returning it to
/// the driver at every synchronisation (its default): a training step frees and reallocates
/// the same buffers each time, as PyTorch's caching allocator assumes too.
pub fn retain_pool_memory(dev: &Device) -> Result<()> {
    use driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
    pool_attr(
        default_pool(dev)?,
        CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
        Some(u64::MAX),
    )?;
    Ok(())
}

/// `(free, total)` device memory.
pub fn mem_info(dev: &Device) -> Result<(u64, u64)> {
    let d = dev.as_cuda_device()?;
    d.cuda_stream().context().bind_to_thread().w()?;
    let (free, total) = driver::result::mem_get_info().w()?;
    Ok((free as u64, total as u64))
}
