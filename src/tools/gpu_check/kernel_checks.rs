//! Each SparseGrad kernel on the device against its CPU reference.

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use rand::Rng;

use sparsegrad_engine::kernels::{self, reference, AdamStep, Csr};

use sparsegrad_engine::methods::sparsegrad::basis::Basis;
use sparsegrad_engine::methods::sparsegrad::state::HostBasis;

use super::{check, host, rel_max, rel_update, Out};

fn parse_shape(s: &str) -> Result<(usize, usize)> {
    let (r, c) = s.split_once('x').context("shape as ROWSxCOLS")?;
    Ok((r.parse()?, c.parse()?))
}

pub(super) fn kernel_checks(dev: &Device, shape: &str, out: &mut Out) -> Result<()> {
    let (rows, cols) = parse_shape(shape)?;
    let n = rows * cols;
    let mut rng = sparsegrad_engine::rng::stream(11, "kernels", 0);
    let smooth: Vec<f32> = (0..n).map(|_| rng.random::<f32>() - 0.5).collect();
    // Quantised values: many exact ties, which must go to the lower index on both.
    let ties: Vec<f32> = smooth.iter().map(|x| (x * 64.0).round() / 64.0).collect();
    let name = format!("{rows}x{cols}");
    for (label, v) in [("top-k", &smooth), ("top-k ties", &ties)] {
        let k = n / 100;
        let x = Tensor::from_slice(v, (rows, cols), dev)?;
        let t = Instant::now();
        let (idx, vals) = kernels::topk_abs(&x, k)?;
        dev.synchronize()?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let (ri, rv) = sparsegrad_engine::topk::topk_abs_radix(v, k, 4096);
        let wrong =
            idx.iter().zip(&ri).filter(|(a, b)| a != b).count() + idx.len().abs_diff(ri.len());
        println!("{label}: {ms:.1} ms for k = {k} of {n}");
        out.push(
            "correctness",
            check(label, &name, "indices differing", wrong as f64, 0.0),
        )?;
        out.push(
            "correctness",
            check(
                &format!("{label} values"),
                &name,
                "rel max",
                rel_max(&host(&vals)?, &rv, 1e-12),
                0.0,
            ),
        )?;
    }
    // Gather on a support, accumulated twice.
    let k = n / 100;
    let pos: Vec<u32> = (0..k).map(|_| rng.random_range(0..n as u32)).collect();
    let x = Tensor::from_slice(&smooth, n, dev)?;
    let p = Tensor::from_slice(&pos, k, dev)?;
    let once = kernels::gather_acc(&x, &p, None)?;
    let twice = kernels::gather_acc(&x, &p, Some(&once))?;
    let want: Vec<f32> = pos.iter().map(|&i| smooth[i as usize] * 2.0).collect();
    out.push(
        "correctness",
        check(
            "gather on support",
            &name,
            "rel max",
            rel_max(&host(&twice)?, &want, 1e-12),
            0.0,
        ),
    )?;
    // Fused sparse Adam with slots.
    let cap = k + 1000;
    let m0: Vec<f32> = (0..cap).map(|_| rng.random::<f32>() - 0.5).collect();
    let v0: Vec<f32> = (0..cap).map(|_| rng.random::<f32>()).collect();
    let g: Vec<f32> = (0..k).map(|_| rng.random::<f32>() - 0.5).collect();
    let mut slots: Vec<u32> = (0..cap as u32).collect();
    slots.truncate(k);
    slots.reverse();
    let s = AdamStep {
        gscale: 0.7,
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        bc1: 0.271,
        bc2: 0.003,
    };
    let (mt, vt, ct) = kernels::sparse_adam(
        &Tensor::from_slice(&m0, cap, dev)?,
        &Tensor::from_slice(&v0, cap, dev)?,
        Some(&Tensor::from_slice(&slots, k, dev)?),
        &Tensor::from_slice(&g, k, dev)?,
        &s,
    )?;
    let (mut mr, mut vr) = (m0.clone(), v0.clone());
    let cr = reference::sparse_adam(&mut mr, &mut vr, Some(&slots), &g, &s);
    let e = rel_max(&host(&mt)?, &mr, 1e-12)
        .max(rel_max(&host(&vt)?, &vr, 1e-12))
        .max(rel_max(&host(&ct)?, &cr, 1e-12));
    out.push(
        "correctness",
        check("fused sparse adam", &name, "rel max", e, 1e-6),
    )?;
    // W += P S Qᵀ in both orientations: CSR scatter + in-place GEMM against the dense product
    // computed on the CPU.
    for (o, i) in [
        (rows.min(5632), cols.min(2048)),
        (cols.min(2048), rows.min(5632)),
    ] {
        let kk = o * i / 100;
        let idx: Vec<u32> = {
            let mut v: Vec<u32> = (0..kk)
                .map(|_| rng.random_range(0..(o * i) as u32))
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        let vals: Vec<f32> = (0..idx.len()).map(|_| rng.random::<f32>() - 0.5).collect();
        let pm = Tensor::randn(0f32, 1.0 / (o as f32).sqrt(), (o, o), &Device::Cpu)?;
        let qm = Tensor::randn(0f32, 1.0 / (i as f32).sqrt(), (i, i), &Device::Cpu)?;
        let w0 = Tensor::randn(0f32, 0.02, (o, i), &Device::Cpu)?;
        let basis = |d: &Device| -> Result<_> {
            Ok(HostBasis::new(Basis {
                p: pm.to_device(d)?,
                q: qm.to_device(d)?,
                eig_p: vec![],
                eig_q: vec![],
                samples: 0,
            })?)
        };
        let (bc, bg) = (basis(&Device::Cpu)?, basis(dev)?);
        let csr_c = HostBasis::csr(o, i, &idx, &Device::Cpu)?;
        let csr_g: Csr = HostBasis::csr(o, i, &idx, dev)?;
        let wc = w0.copy()?;
        let wg = w0.to_device(dev)?.copy()?;
        let t = Instant::now();
        bg.add_expanded(&wg, &csr_g, &Tensor::from_slice(&vals, vals.len(), dev)?)?;
        dev.synchronize()?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        bc.add_expanded(
            &wc,
            &csr_c,
            &Tensor::from_slice(&vals, vals.len(), &Device::Cpu)?,
        )?;
        let base = host(&w0)?;
        println!("W += P S Qᵀ {o}x{i}: {ms:.1} ms on the device");
        out.push(
            "correctness",
            check(
                "W += P S Q^T in place",
                &format!("{o}x{i}"),
                "rel update",
                rel_update(&host(&wg)?, &host(&wc)?, &base),
                1e-4,
            ),
        )?;
    }
    Ok(())
}
