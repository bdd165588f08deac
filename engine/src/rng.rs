//! All randomness comes from ChaCha streams derived from the job seed and a purpose, so a
//! run is reproducible on CPU and a resumed run draws exactly what the uninterrupted one drew.
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

pub fn stream(seed: u64, purpose: &str, index: u64) -> ChaCha8Rng {
    // FNV-1a of the purpose keeps streams for different uses independent.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in purpose.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ h);
    rng.set_stream(index);
    rng
}
