// SparseGrad's CUDA kernels. Each has a CPU reference in engine/src/kernels/mod.rs that runs
// the same algorithm in the same order; the GPU check compares the two.
//
// Compiled to PTX by engine/build.rs with -fmad=false: these kernels are memory-bound, and
// without contraction their float results match the CPU references bit for bit.

#include <stdint.h>

#define RADIX_BINS 2048

// |x| as an integer that orders like |x| (IEEE floats of one sign order like their bits).
__device__ __forceinline__ uint32_t mag_key(float x) { return __float_as_uint(x) & 0x7fffffffu; }

// Radix select, one pass: histogram of the next bits of the keys that share the prefix found
// by the previous passes. The host walks the histogram from the top to find the bin holding
// the k-th largest key and narrows the prefix; three passes (11 + 10 + 10 bits) pin it.
extern "C" __global__ void sg_radix_hist(const float* __restrict__ x, uint64_t n, uint32_t prefix,
                                         uint32_t prefix_mask, uint32_t shift, uint32_t bin_mask,
                                         uint32_t* __restrict__ hist) {
  __shared__ uint32_t local[RADIX_BINS];
  for (uint32_t i = threadIdx.x; i < RADIX_BINS; i += blockDim.x) local[i] = 0;
  __syncthreads();
  const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const uint32_t key = mag_key(x[i]);
    if ((key & prefix_mask) == prefix) atomicAdd(&local[(key >> shift) & bin_mask], 1u);
  }
  __syncthreads();
  for (uint32_t i = threadIdx.x; i <= bin_mask; i += blockDim.x)
    if (local[i]) atomicAdd(&hist[i], local[i]);
}

__device__ __forceinline__ uint32_t warp_sum(uint32_t v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Per chunk of `chunk` entries: how many keys are above the threshold key and how many equal
// it. The host turns these into each chunk's exclusive prefix for sg_select_write.
extern "C" __global__ void sg_select_count(const float* __restrict__ x, uint64_t n, uint32_t thr,
                                           uint32_t chunk, uint32_t* __restrict__ gt,
                                           uint32_t* __restrict__ eq) {
  __shared__ uint32_t sg[32], se[32];
  const uint64_t start = (uint64_t)blockIdx.x * chunk;
  const uint64_t end = start + chunk < n ? start + chunk : n;
  uint32_t cg = 0, ce = 0;
  for (uint64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const uint32_t k = mag_key(x[i]);
    cg += k > thr;
    ce += k == thr;
  }
  cg = warp_sum(cg);
  ce = warp_sum(ce);
  const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) { sg[warp] = cg; se[warp] = ce; }
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t tg = 0, te = 0;
    for (uint32_t w = 0; w < (blockDim.x + 31) / 32; ++w) { tg += sg[w]; te += se[w]; }
    gt[blockIdx.x] = tg;
    eq[blockIdx.x] = te;
  }
}

// Writes the selected entries in ascending index order: every key above the threshold, and
// the first `need` keys equal to it (ties go to the lower index, as on the CPU). An entry's
// output slot is the number of selected entries before it, from the chunk's prefix plus a
// ballot scan inside the chunk. blockDim.x must be a multiple of 32.
extern "C" __global__ void sg_select_write(const float* __restrict__ x, uint64_t n, uint32_t thr,
                                           uint32_t need, uint32_t chunk,
                                           const uint32_t* __restrict__ gt_base,
                                           const uint32_t* __restrict__ eq_base,
                                           uint32_t* __restrict__ out_idx,
                                           float* __restrict__ out_val) {
  __shared__ uint32_t wg[32], we[32];
  __shared__ uint32_t run_g, run_e;
  if (threadIdx.x == 0) { run_g = gt_base[blockIdx.x]; run_e = eq_base[blockIdx.x]; }
  __syncthreads();
  const uint64_t start = (uint64_t)blockIdx.x * chunk;
  const uint64_t end = start + chunk < n ? start + chunk : n;
  const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const uint32_t below = (1u << lane) - 1u;
  for (uint64_t base = start; base < end; base += blockDim.x) {
    const uint64_t i = base + threadIdx.x;
    const bool valid = i < end;
    const float xi = valid ? x[i] : 0.0f;
    const uint32_t key = mag_key(xi);
    const bool g = valid && key > thr, e = valid && key == thr;
    const uint32_t bg = __ballot_sync(0xffffffffu, g), be = __ballot_sync(0xffffffffu, e);
    if (lane == 0) { wg[warp] = __popc(bg); we[warp] = __popc(be); }
    __syncthreads();
    uint32_t og = run_g, oe = run_e;
    for (uint32_t w = 0; w < warp; ++w) { og += wg[w]; oe += we[w]; }
    og += __popc(bg & below);
    oe += __popc(be & below);
    if (g || (e && oe < need)) {
      const uint32_t pos = og + (oe < need ? oe : need);
      out_idx[pos] = (uint32_t)i;
      out_val[pos] = xi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (uint32_t w = 0; w < nwarps; ++w) { run_g += wg[w]; run_e += we[w]; }
    }
    __syncthreads();
  }
}

// The rotated gradient on a fixed support: acc[j] (+)= block[pos[j]], summed over micro-batches.
extern "C" __global__ void sg_gather_acc(const float* __restrict__ block,
                                         const uint32_t* __restrict__ pos, float* __restrict__ acc,
                                         uint64_t k, uint32_t accumulate) {
  const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
  for (uint64_t j = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; j < k; j += stride) {
    const float v = block[pos[j]];
    acc[j] = accumulate ? acc[j] + v : v;
  }
}

// Adam on the support, fused: moments m, v (indexed by slot[j], or j when slot is null) are
// updated in place from g[j]·gscale and the entry's change is written to ch[j]. The same
// arithmetic, in the same order, as SparseAdam on the CPU.
extern "C" __global__ void sg_sparse_adam(float* __restrict__ m, float* __restrict__ v,
                                          const uint32_t* __restrict__ slot,
                                          const float* __restrict__ g, float* __restrict__ ch,
                                          uint64_t k, float gscale, float lr, float b1, float b2,
                                          float eps, float bc1, float bc2) {
  const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
  for (uint64_t j = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; j < k; j += stride) {
    const uint64_t s = slot ? slot[j] : j;
    const float gi = g[j] * gscale;
    const float mj = b1 * m[s] + (1.0f - b1) * gi;
    const float vj = b2 * v[s] + (1.0f - b2) * gi * gi;
    m[s] = mj;
    v[s] = vj;
    ch[j] = -lr * ((mj / bc1) / (sqrtf(vj / bc2) + eps));
  }
}

// Sparse × dense for the update W += P S Qᵀ: one block per output row r, which gets
// Σ_j val[perm[j]] · src_rows[src[j]] over the row's entries j in row_ptr[r]..row_ptr[r+1]
// (CSR order, built on the host from the support). No atomics: each row has one writer.
extern "C" __global__ void sg_scatter_rows(const uint32_t* __restrict__ row_ptr,
                                           const uint32_t* __restrict__ src,
                                           const uint32_t* __restrict__ perm,
                                           const float* __restrict__ val,
                                           const float* __restrict__ src_rows,
                                           float* __restrict__ out, uint32_t width) {
  const uint32_t r = blockIdx.x;
  const uint32_t b = row_ptr[r], e = row_ptr[r + 1];
  for (uint32_t c = threadIdx.x; c < width; c += blockDim.x) {
    float acc = 0.0f;
    for (uint32_t j = b; j < e; ++j) acc += val[perm[j]] * src_rows[(uint64_t)src[j] * width + c];
    out[(uint64_t)r * width + c] = acc;
  }
}
