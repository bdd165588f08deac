use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() {
    let d = Device::Cpu;
    for (m, k, n) in [(1024, 384, 1536), (1024, 1536, 384), (1024, 384, 384)] {
        let a = Tensor::randn(0f32, 1., (m, k), &d).unwrap();
        let w = Tensor::randn(0f32, 1., (n, k), &d).unwrap();
        let wt = w.t().unwrap();
        let wtc = wt.contiguous().unwrap();
        for (name, b) in [("W.t() view", &wt), ("contiguous", &wtc)] {
            let _ = a.matmul(b).unwrap();
            let t = Instant::now();
            for _ in 0..20 {
                let _ = a.matmul(b).unwrap();
            }
            let s = t.elapsed().as_secs_f64() / 20.0;
            println!(
                "{m}x{k}x{n} {name}: {:.2} ms, {:.1} GFLOP/s",
                s * 1e3,
                2.0 * (m * k * n) as f64 / s / 1e9
            );
        }
    }
}
