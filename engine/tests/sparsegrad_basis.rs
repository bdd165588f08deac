//! The SparseGrad basis phase: orthogonality, eigenvalue order, the Gram identity, the
//! rotation `Pᵀ G Q`, exact top-k.

use candle_core::{DType, Device, Tensor};
use rand::Rng;
use sparsegrad_engine::methods::sparsegrad::basis::{rotate, GramAccumulator};
use sparsegrad_engine::models::MlpKind;
use sparsegrad_engine::testing::max_abs_diff;
use sparsegrad_engine::topk::topk_abs;

fn grad(out: usize, inp: usize, seed: u64) -> Tensor {
    // Low-rank plus noise, like real weight gradients (energy concentrated in few directions).
    let mut rng = sparsegrad_engine::rng::stream(seed, "grad", 0);
    let r = 3;
    let u: Vec<f32> = (0..out * r).map(|_| rng.random::<f32>() - 0.5).collect();
    let v: Vec<f32> = (0..r * inp).map(|_| rng.random::<f32>() - 0.5).collect();
    let n: Vec<f32> = (0..out * inp)
        .map(|_| (rng.random::<f32>() - 0.5) * 0.01)
        .collect();
    let u = Tensor::from_vec(u, (out, r), &Device::Cpu).unwrap();
    let v = Tensor::from_vec(v, (r, inp), &Device::Cpu).unwrap();
    (u.matmul(&v).unwrap() + Tensor::from_vec(n, (out, inp), &Device::Cpu).unwrap()).unwrap()
}

#[test]
fn bases_are_orthogonal_sorted_and_diagonalise_the_gram_sums() {
    let (out, inp) = (48, 20);
    let mut acc = GramAccumulator::default();
    let gs: Vec<Tensor> = (0..6).map(|s| grad(out, inp, s)).collect();
    for g in &gs {
        acc.add(MlpKind::Intermediate, g).unwrap();
    }
    let bases = acc.finish().unwrap();
    let b = &bases[&MlpKind::Intermediate];
    assert_eq!(b.samples, 6);
    for (m, n) in [(&b.p, out), (&b.q, inp)] {
        let eye = Tensor::eye(n, DType::F32, &Device::Cpu).unwrap();
        let d = max_abs_diff(&m.t().unwrap().matmul(m).unwrap(), &eye);
        assert!(d <= 1e-5, "PᵀP differs from I by {d}");
    }
    for e in [&b.eig_p, &b.eig_q] {
        assert!(
            e.windows(2).all(|w| w[0] >= w[1]),
            "eigenvalues not descending: {e:?}"
        );
    }
    // P diag(λ) Pᵀ = Σ G Gᵀ
    let sum = gs
        .iter()
        .map(|g| g.matmul(&g.t().unwrap()).unwrap())
        .reduce(|a, b| (a + b).unwrap())
        .unwrap();
    let lam = Tensor::from_vec(
        b.eig_p.iter().map(|&x| x as f32).collect::<Vec<_>>(),
        out,
        &Device::Cpu,
    )
    .unwrap();
    let recon =
        b.p.broadcast_mul(&lam)
            .unwrap()
            .matmul(&b.p.t().unwrap())
            .unwrap();
    let scale = sum
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    assert!(max_abs_diff(&recon, &sum) / scale <= 1e-5);
    // Six rank-3 gradients span at most 18 directions on each side: the rotated gradient's
    // energy sits in its leading 18×18 block.
    let gt = rotate(&gs[0], b).unwrap();
    let total = gt
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let lead = gt
        .narrow(0, 0, 18)
        .unwrap()
        .narrow(1, 0, 18)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        lead / total > 0.99,
        "leading block holds {:.4} of the energy",
        lead / total
    );
}

#[test]
fn rotated_gradient_equals_pt_g_q() {
    let mut acc = GramAccumulator::default();
    for s in 0..4 {
        acc.add(MlpKind::Down, &grad(16, 40, s)).unwrap();
    }
    let b = &acc.finish().unwrap()[&MlpKind::Down];
    let g = grad(16, 40, 99);
    let got = rotate(&g, b).unwrap();
    let f64t = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let want = f64t(&b.p)
        .t()
        .unwrap()
        .matmul(&f64t(&g))
        .unwrap()
        .matmul(&f64t(&b.q))
        .unwrap();
    let d = max_abs_diff(&f64t(&got), &want);
    assert!(d <= 1e-5, "rotation differs by {d}");
}

#[test]
fn topk_selects_exactly_the_largest_magnitudes() {
    let mut rng = sparsegrad_engine::rng::stream(5, "topk", 0);
    let v: Vec<f32> = (0..10_000)
        .map(|_| rng.random::<f32>() * 2.0 - 1.0)
        .collect();
    for k in [0, 1, 7, 100, 9_999, 10_000, 20_000] {
        let got = topk_abs(&v, k);
        let mut order: Vec<usize> = (0..v.len()).collect();
        order.sort_by(|&a, &b| v[b].abs().total_cmp(&v[a].abs()).then(a.cmp(&b)));
        let mut want = order[..k.min(v.len())].to_vec();
        want.sort_unstable();
        assert_eq!(got, want, "k = {k}");
    }
    // ties: lower index wins
    assert_eq!(topk_abs(&[1.0, -1.0, 1.0, 0.5], 2), vec![0, 1]);
}
