//! The CUDA kernels' algorithms on the host, step for step (same passes, same arithmetic
//! order), so a GPU result can be compared with what the same algorithm gives on the CPU.
//! Top-k's host mirror is [`crate::topk::topk_abs_radix`], beside the other top-k code.

use rayon::prelude::*;

use super::AdamStep;

/// Adam on support entries, in place on the moments; returns each entry's change.
pub fn sparse_adam(
    m: &mut [f32],
    v: &mut [f32],
    slot: Option<&[u32]>,
    g: &[f32],
    s: &AdamStep,
) -> Vec<f32> {
    let (b1, b2) = (s.beta1, s.beta2);
    g.iter()
        .enumerate()
        .map(|(j, &gj)| {
            let i = slot.map_or(j, |sl| sl[j] as usize);
            let gi = gj * s.gscale;
            let mj = b1 * m[i] + (1.0 - b1) * gi;
            let vj = b2 * v[i] + (1.0 - b2) * gi * gi;
            m[i] = mj;
            v[i] = vj;
            -s.lr * ((mj / s.bc1) / ((vj / s.bc2).sqrt() + s.eps))
        })
        .collect()
}

/// CSR of `(dst, src)` pairs given in value order: `(row_ptr, src, perm)` where CSR entry `j`
/// reads value `perm[j]`. Entries keep their value order within a row (a stable counting
/// sort), which fixes the summation order on both devices.
pub fn csr(n_rows: usize, pairs: &[(u32, u32)]) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let mut row_ptr = vec![0u32; n_rows + 1];
    for &(d, _) in pairs {
        row_ptr[d as usize + 1] += 1;
    }
    for r in 0..n_rows {
        row_ptr[r + 1] += row_ptr[r];
    }
    let mut next = row_ptr.clone();
    let mut src = vec![0u32; pairs.len()];
    let mut perm = vec![0u32; pairs.len()];
    for (j, &(d, s)) in pairs.iter().enumerate() {
        let p = next[d as usize] as usize;
        next[d as usize] += 1;
        src[p] = s;
        perm[p] = j as u32;
    }
    (row_ptr, src, perm)
}

/// `out[r] = Σ val[perm[j]] · src_rows[src[j]]` over row r's CSR entries, rows in parallel.
pub fn scatter_rows(
    row_ptr: &[u32],
    src: &[u32],
    perm: &[u32],
    val: &[f32],
    src_rows: &[f32],
    width: usize,
) -> Vec<f32> {
    let n_rows = row_ptr.len() - 1;
    let mut out = vec![0f32; n_rows * width];
    out.par_chunks_mut(width).enumerate().for_each(|(r, row)| {
        for j in row_ptr[r] as usize..row_ptr[r + 1] as usize {
            let v = val[perm[j] as usize];
            let s = &src_rows[src[j] as usize * width..(src[j] as usize + 1) * width];
            row.iter_mut().zip(s).for_each(|(d, &x)| *d += v * x);
        }
    });
    out
}
