//! Times one decoding step (`serve::decode_step`) over n sequences: base vs an overlay.
//! `cargo run --example step_profile -- MODEL_DIR [DELTA]`
use std::time::Instant;

use candle_core::{DType, Device};
use sparsegrad_engine::models::{KvCache, Task};
use sparsegrad_engine::serve::{decode_step, overlay, StepSeq};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(&args[1]);
    let (mut base, _, _) = sparsegrad_engine::pipeline::load_for_inference(
        &dir,
        None,
        Some(Task::CausalLm),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    if std::env::var_os("PLAIN").is_none() {
        sparsegrad_engine::serve::layout_for_serving(&mut base).unwrap();
    }
    let ov = args.get(2).map(|p| {
        let art = sparsegrad_engine::artifact::Artifact::load(std::path::Path::new(p)).unwrap();
        overlay(&base, &art).unwrap().model
    });
    for (name, model) in [("base", Some(&base)), ("overlay", ov.as_ref())] {
        let Some(model) = model else { continue };
        for n in std::env::var("NS")
            .map(|v| {
                v.split(',')
                    .map(|x| x.parse().unwrap())
                    .collect::<Vec<usize>>()
            })
            .unwrap_or(vec![1, 8, 32])
        {
            let mut caches: Vec<KvCache> = (0..n).map(|_| KvCache::default()).collect();
            let prompt: Vec<u32> = (0..32).map(|i| 100 + i * 7).collect();
            {
                let mut seqs: Vec<StepSeq<'_>> = caches
                    .iter_mut()
                    .map(|cache| StepSeq {
                        model,
                        ids: &prompt,
                        cache,
                    })
                    .collect();
                decode_step(&mut seqs).unwrap();
            }
            let one = vec![42u32];
            let t0 = Instant::now();
            let steps = 8;
            for _ in 0..steps {
                let mut seqs: Vec<StepSeq<'_>> = caches
                    .iter_mut()
                    .map(|cache| StepSeq {
                        model,
                        ids: &one,
                        cache,
                    })
                    .collect();
                decode_step(&mut seqs).unwrap();
            }
            let ms = t0.elapsed().as_secs_f64() * 1e3 / steps as f64;
            println!(
                "{name}: {n} sequences: {ms:.1} ms/step ({:.1} ms/token)",
                ms / n as f64
            );
        }
    }
}
