use candle_core::{Device, Tensor, Var};
use sparsegrad_engine::nn;
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
    let x = Var::from_tensor(&Tensor::randn(0f32, 1., (1024, 384), &d).unwrap()).unwrap();
    let w = Var::from_tensor(&Tensor::ones(384, candle_core::DType::F32, &d).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::zeros(384, candle_core::DType::F32, &d).unwrap()).unwrap();
    let s = Var::from_tensor(&Tensor::randn(0f32, 1., (16, 12, 64, 64), &d).unwrap()).unwrap();
    let g = Var::from_tensor(&Tensor::randn(0f32, 1., (1024, 1536), &d).unwrap()).unwrap();
    time("ln fused fwd", &|| {
        nn::layer_norm(&x, &w, &b, 1e-12).unwrap();
    });
    time("ln composed fwd", &|| {
        nn::layer_norm_composed(&x, &w, &b, 1e-12).unwrap();
    });
    time("ln fused fwd+bwd", &|| {
        nn::layer_norm(&x, &w, &b, 1e-12)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
    });
    time("ln composed fwd+bwd", &|| {
        nn::layer_norm_composed(&x, &w, &b, 1e-12)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
    });
    time("softmax fused fwd", &|| {
        nn::softmax_last_dim(&s).unwrap();
    });
    time("softmax composed fwd", &|| {
        nn::softmax_composed(&s).unwrap();
    });
    time("softmax fused fwd+bwd", &|| {
        nn::softmax_last_dim(&s)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
    });
    time("softmax composed fwd+bwd", &|| {
        nn::softmax_composed(&s)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
    });
    time("gelu fused fwd", &|| {
        nn::gelu_erf(&g).unwrap();
    });
    time("gelu composed fwd", &|| {
        nn::gelu_erf_composed(&g).unwrap();
    });
    time("gelu candle fwd", &|| {
        g.gelu_erf().unwrap();
    });
    time("gelu fused fwd+bwd", &|| {
        nn::gelu_erf(&g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
    });
    time("gelu composed fwd+bwd", &|| {
        nn::gelu_erf_composed(&g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
    });
    time("add 1.5M", &|| {
        (g.as_tensor() + g.as_tensor()).unwrap();
    });
}
