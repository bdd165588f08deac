//! Micro-benchmarks of the CPU kernels a training step spends its time in (matmul shapes of
//! MiniLM-L6 at batch 16 × 64 tokens, attention matmuls, and the fused ops against their
//! composed references). Printed, never asserted:
//!     cargo run --release -p sparsegrad-engine --example kernel_bench
use candle_core::{DType, Device, Tensor, Var};
use sparsegrad_engine::nn;
use std::time::Instant;

fn time(name: &str, f: &dyn Fn()) {
    f();
    let t = Instant::now();
    for _ in 0..20 {
        f();
    }
    println!(
        "{name:45} {:8.3} ms",
        t.elapsed().as_secs_f64() / 20.0 * 1e3
    );
}

fn main() {
    let d = Device::Cpu;
    for (m, k, n) in [(1024, 384, 1536), (1024, 1536, 384), (1024, 384, 384)] {
        let a = Tensor::randn(0f32, 1., (m, k), &d).unwrap();
        let w = Tensor::randn(0f32, 1., (n, k), &d).unwrap();
        time(&format!("matmul {m}x{k} · ({n}x{k})ᵀ"), &|| {
            a.matmul(&w.t().unwrap()).unwrap();
        });
    }
    let q = Tensor::randn(0f32, 1., (16, 12, 64, 32), &d).unwrap();
    let k = Tensor::randn(0f32, 1., (16, 12, 64, 32), &d).unwrap();
    let p = Tensor::randn(0f32, 1., (16, 12, 64, 64), &d).unwrap();
    time("attention q·kᵀ (16,12,64,32)", &|| {
        q.matmul(&k.t().unwrap()).unwrap();
    });
    time("attention p·v (16,12,64,64)", &|| {
        p.matmul(&k).unwrap();
    });

    let x = Var::from_tensor(&Tensor::randn(0f32, 1., (1024, 384), &d).unwrap()).unwrap();
    let w = Var::from_tensor(&Tensor::ones(384, DType::F32, &d).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::zeros(384, DType::F32, &d).unwrap()).unwrap();
    let s = Var::from_tensor(&Tensor::randn(0f32, 1., (16, 12, 64, 64), &d).unwrap()).unwrap();
    let g = Var::from_tensor(&Tensor::randn(0f32, 1., (1024, 1536), &d).unwrap()).unwrap();
    let fb = |t: Tensor| {
        t.sum_all().unwrap().backward().unwrap();
    };
    time("layer norm fused fwd+bwd", &|| {
        fb(nn::layer_norm(&x, &w, &b, 1e-12).unwrap())
    });
    time("layer norm composed fwd+bwd", &|| {
        fb(nn::layer_norm_composed(&x, &w, &b, 1e-12).unwrap())
    });
    time("softmax fused fwd+bwd", &|| {
        fb(nn::softmax_last_dim(&s).unwrap())
    });
    time("softmax composed fwd+bwd", &|| {
        fb(nn::softmax_composed(&s).unwrap())
    });
    time("gelu fused fwd+bwd", &|| fb(nn::gelu_erf(&g).unwrap()));
    time("gelu composed fwd+bwd", &|| {
        fb(nn::gelu_erf_composed(&g).unwrap())
    });
}
