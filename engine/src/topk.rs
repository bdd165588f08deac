//! Top-k by magnitude over a whole matrix — ties to the lower index, indices ascending — in
//! one place, below both the kernels and the methods. Three host versions with three jobs:
//!
//! - [`topk_abs`]: the definition (a partial sort), what the others are tested against;
//! - [`topk_abs_fast`]: what the CPU runs — a histogram over the high bits of `|x|` (IEEE
//!   floats of one sign order like their bit patterns) finds the bin that holds the k-th
//!   largest, and only that bin's entries are sorted; two parallel linear passes;
//! - [`topk_abs_radix`]: the CUDA kernel's radix select step for step (same passes, same
//!   chunked compaction), so `gpu-check` can compare a GPU result with the same algorithm on
//!   the host.

use rayon::prelude::*;

/// Indices of the `k` entries of largest magnitude (ties broken by lower index), ascending.
/// The definition every other top-k here is tested against.
pub fn topk_abs(values: &[f32], k: usize) -> Vec<usize> {
    let k = k.min(values.len());
    if k == 0 {
        return Vec::new();
    }
    let mut idx: Vec<usize> = (0..values.len()).collect();
    let cmp = |a: &usize, b: &usize| values[*b].abs().total_cmp(&values[*a].abs()).then(a.cmp(b));
    idx.select_nth_unstable_by(k - 1, cmp);
    let mut top = idx[..k].to_vec();
    top.sort_unstable();
    top
}

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

const SHIFT: u32 = 16;
const BINS: usize = 1 << (31 - SHIFT);
const CHUNK: usize = 1 << 16;

/// Flat indices (ascending) of the `k` entries of largest magnitude.
pub fn topk_abs_fast(values: &[f32], k: usize) -> Vec<u32> {
    let n = values.len();
    let k = k.min(n);
    if k == 0 {
        return Vec::new();
    }
    if k == n {
        return (0..n as u32).collect();
    }
    let hist = values
        .par_chunks(CHUNK)
        .map(|c| {
            let mut h = vec![0u32; BINS];
            for &x in c {
                h[(mag_key(x) >> SHIFT) as usize] += 1;
            }
            h
        })
        .reduce(
            || vec![0u32; BINS],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                a
            },
        );
    let mut above = 0usize;
    let mut bin = BINS - 1;
    loop {
        let c = hist[bin] as usize;
        if above + c >= k {
            break;
        }
        above += c;
        bin -= 1;
    }
    let need = k - above;
    let bin = bin as u32;
    let mut out: Vec<u32> = values
        .par_chunks(CHUNK)
        .enumerate()
        .flat_map_iter(|(ci, c)| {
            c.iter().enumerate().filter_map(move |(i, &x)| {
                ((mag_key(x) >> SHIFT) > bin).then_some((ci * CHUNK + i) as u32)
            })
        })
        .collect();
    let mut cand: Vec<(u32, u32)> = values
        .iter()
        .enumerate()
        .filter(|(_, &x)| (mag_key(x) >> SHIFT) == bin)
        .map(|(i, &x)| (mag_key(x), i as u32))
        .collect();
    cand.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    out.extend(cand[..need].iter().map(|c| c.1));
    out.par_sort_unstable();
    out
}
