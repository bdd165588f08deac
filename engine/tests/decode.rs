//! Incremental decoding with a key/value cache against the full forward pass, on a tiny
//! LLaMA with grouped-query attention (4 query heads over 2 KV heads).

use candle_core::{DType, Device, Tensor};
use sparsegrad_engine::models::{Arch, Batch, KvCache, Labels, Model};
use sparsegrad_engine::nn::Ctx;
use sparsegrad_engine::testing::{max_abs_diff, tiny_model, tiny_task};

fn full_logits(m: &Model, ids: &[u32]) -> Tensor {
    let t = ids.len();
    let batch = Batch {
        input_ids: Tensor::from_vec(ids.to_vec(), (1, t), &Device::Cpu).unwrap(),
        token_type_ids: Tensor::zeros((1, t), DType::U32, &Device::Cpu).unwrap(),
        attention_mask: Tensor::ones((1, t), m.dtype(), &Device::Cpu).unwrap(),
        labels: Labels::None,
        num_tokens: t,
        batch_size: 1,
    };
    m.forward(&batch, &mut Ctx::inference()).unwrap()
}

fn argmax_last(l: &Tensor) -> u32 {
    let last = l.dim(1).unwrap() - 1;
    l.narrow(1, last, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .argmax(0)
        .unwrap()
        .to_scalar::<u32>()
        .unwrap()
}

#[test]
fn cached_decoding_in_any_chunks_equals_the_full_forward() {
    for dtype in [DType::F32, DType::F64] {
        let m = tiny_model(Arch::Llama, tiny_task(Arch::Llama), dtype, 7).unwrap();
        let ids: Vec<u32> = (0..15).map(|i| (i * 7 + 3) % 50).collect();
        let full = full_logits(&m, &ids);
        for chunks in [vec![15], vec![4, 1, 1, 5, 2, 2], vec![1; 15]] {
            let mut cache = KvCache::default();
            let mut parts = Vec::new();
            let mut at = 0;
            for n in &chunks {
                let step =
                    Tensor::from_vec(ids[at..at + n].to_vec(), (1, *n), &Device::Cpu).unwrap();
                parts.push(m.decode(&step, &mut cache).unwrap().expect("llama decodes"));
                at += n;
            }
            assert_eq!(cache.len, ids.len());
            assert!(cache.bytes() > 0);
            let cached = Tensor::cat(&parts, 1).unwrap();
            let d = max_abs_diff(&cached, &full);
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            assert!(d <= tol, "{dtype:?} chunks {chunks:?}: {d}");
        }
    }
}

#[test]
fn greedy_generation_with_the_cache_equals_recomputation_token_for_token() {
    let m = tiny_model(Arch::Llama, tiny_task(Arch::Llama), DType::F32, 11).unwrap();
    let prompt: Vec<u32> = vec![5, 9, 14, 22];
    let mut recomputed = prompt.clone();
    for _ in 0..24 {
        let next = argmax_last(&full_logits(&m, &recomputed));
        recomputed.push(next);
    }
    let mut cache = KvCache::default();
    let mut cached = prompt.clone();
    let mut unseen = prompt.clone();
    for _ in 0..24 {
        let step = Tensor::from_vec(unseen.clone(), (1, unseen.len()), &Device::Cpu).unwrap();
        let next = argmax_last(&m.decode(&step, &mut cache).unwrap().unwrap());
        cached.push(next);
        unseen = vec![next];
    }
    assert_eq!(cached, recomputed);
    // Encoders have no cache: the caller falls back to the full forward.
    let bert = tiny_model(Arch::Bert, tiny_task(Arch::Bert), DType::F32, 1).unwrap();
    let step = Tensor::from_vec(vec![1u32, 2], (1, 2), &Device::Cpu).unwrap();
    assert!(bert
        .decode(&step, &mut KvCache::default())
        .unwrap()
        .is_none());
}
