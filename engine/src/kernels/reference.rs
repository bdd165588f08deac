//! The CUDA kernels' algorithms on the host, step for step (same passes, same arithmetic
//! order), so a GPU result can be compared with what the same algorithm gives on the CPU.

use rayon::prelude::*;

use super::AdamStep;

/// `|x|` as an integer ordered like `|x|`.
#[inline]
pub fn mag_key(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

/// The radix-select passes over the 31-bit magnitude key: (shift, bits). Each pass takes a
/// 2^bits-bin histogram of the keys that match the prefix found so far.
pub const RADIX_PASSES: [(u32, u32); 3] = [(20, 11), (10, 10), (0, 10)];

/// Narrows the prefix by one pass: the bin that holds the k-th largest key, given the
/// histogram of that pass and the count of keys already known to be larger.
pub fn radix_step(hist: &[u32], k: usize, above: &mut usize) -> u32 {
    for b in (0..hist.len()).rev() {
        let c = hist[b] as usize;
        if *above + c >= k {
            return b as u32;
        }
        *above += c;
    }
    0
}

/// The k-th largest key (`thr`) and how many keys equal to it are taken (`need`): every key
/// above `thr` is selected, plus the first `need` equal to it.
pub fn radix_threshold(values: &[f32], k: usize) -> (u32, usize) {
    let (mut prefix, mut mask, mut above) = (0u32, 0u32, 0usize);
    for (shift, bits) in RADIX_PASSES {
        let bin_mask = (1u32 << bits) - 1;
        let mut hist = vec![0u32; 1 << bits];
        for &x in values {
            let key = mag_key(x);
            if key & mask == prefix {
                hist[((key >> shift) & bin_mask) as usize] += 1;
            }
        }
        let b = radix_step(&hist, k, &mut above);
        prefix |= b << shift;
        mask |= bin_mask << shift;
    }
    (prefix, k - above)
}

/// Top-k by magnitude as the GPU does it: radix threshold, per-chunk counts, exclusive scans,
/// then each chunk writes its selected entries at their rank. Indices ascending, ties to the
/// lower index.
pub fn topk_abs_radix(values: &[f32], k: usize, chunk: usize) -> (Vec<u32>, Vec<f32>) {
    let n = values.len();
    let k = k.min(n);
    if k == 0 {
        return (Vec::new(), Vec::new());
    }
    let (thr, need) = radix_threshold(values, k);
    let counts: Vec<(u32, u32)> = values
        .chunks(chunk)
        .map(|c| {
            c.iter().fold((0, 0), |(g, e), &x| {
                let key = mag_key(x);
                (g + (key > thr) as u32, e + (key == thr) as u32)
            })
        })
        .collect();
    let (mut gt_base, mut eq_base) = (0u32, 0u32);
    let mut idx = vec![0u32; k];
    let mut val = vec![0f32; k];
    for (ci, c) in values.chunks(chunk).enumerate() {
        let (mut og, mut oe) = (gt_base, eq_base);
        for (j, &x) in c.iter().enumerate() {
            let key = mag_key(x);
            let (g, e) = (key > thr, key == thr);
            if g || (e && (oe as usize) < need) {
                let pos = og as usize + (oe as usize).min(need);
                idx[pos] = (ci * chunk + j) as u32;
                val[pos] = x;
            }
            og += g as u32;
            oe += e as u32;
        }
        gt_base += counts[ci].0;
        eq_base += counts[ci].1;
    }
    (idx, val)
}

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
