//! Exact top-k by magnitude in two linear passes: a histogram over the high bits of `|x|`
//! (IEEE floats of one sign order like their bit patterns) finds the bin that holds the k-th
//! largest, and only that bin's entries are sorted. Selects the same set as
//! [`super::basis::topk_abs`] (ties toward the lower index) at a fraction of its cost.

use rayon::prelude::*;

const SHIFT: u32 = 16;
const BINS: usize = 1 << (31 - SHIFT);
const CHUNK: usize = 1 << 16;

#[inline]
fn key(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

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
                h[(key(x) >> SHIFT) as usize] += 1;
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
                ((key(x) >> SHIFT) > bin).then_some((ci * CHUNK + i) as u32)
            })
        })
        .collect();
    let mut cand: Vec<(u32, u32)> = values
        .iter()
        .enumerate()
        .filter(|(_, &x)| (key(x) >> SHIFT) == bin)
        .map(|(i, &x)| (key(x), i as u32))
        .collect();
    cand.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    out.extend(cand[..need].iter().map(|c| c.1));
    out.par_sort_unstable();
    out
}
