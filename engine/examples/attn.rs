use candle_core::{Device, Tensor};
use std::time::Instant;
fn time(name: &str, f: &dyn Fn()) {
    f();
    let t = Instant::now();
    for _ in 0..20 {
        f();
    }
    println!("{name}: {:.3} ms", t.elapsed().as_secs_f64() / 20.0 * 1e3);
}
fn main() {
    let d = Device::Cpu;
    let q = Tensor::randn(0f32, 1., (16, 12, 64, 32), &d).unwrap();
    let k = Tensor::randn(0f32, 1., (16, 12, 64, 32), &d).unwrap();
    let kt = k.t().unwrap();
    let ktc = kt.contiguous().unwrap();
    let p = Tensor::randn(0f32, 1., (16, 12, 64, 64), &d).unwrap();
    time("q @ k^T (view)", &|| {
        q.matmul(&kt).unwrap();
    });
    time("q @ k^T (contig)", &|| {
        q.matmul(&ktc).unwrap();
    });
    time("p @ v", &|| {
        p.matmul(&k).unwrap();
    });
    time("p^T @ q (bwd-like)", &|| {
        p.t().unwrap().matmul(&q).unwrap();
    });
    let x = Tensor::randn(0f32, 1., (1024, 384), &d).unwrap();
    let w = Tensor::randn(0f32, 1., (384, 384), &d).unwrap();
    time("1024x384x384", &|| {
        x.matmul(&w.t().unwrap()).unwrap();
    });
    time("transpose(1,2).contiguous 16x64x12x32", &|| {
        q.transpose(1, 2).unwrap().contiguous().unwrap();
    });
}
