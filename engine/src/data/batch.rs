//! Encoded examples into batches: seeded epoch orders and dynamically padded batches.

use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;

use super::encode::{EncodeStats, Example, Target};
use super::labels::LabelMap;
use crate::models::{Batch, Labels, Task};
use crate::Result;

/// A fully prepared dataset.
pub struct Dataset {
    pub examples: Vec<Example>,
    pub task: Task,
    pub labels: Option<LabelMap>,
    pub stats: EncodeStats,
}

/// The batches of one epoch: a permutation drawn from the seed and the epoch number, so the
/// same seed gives the same batches and a resumed run continues the same sequence.
pub fn epoch_order(n: usize, seed: u64, epoch: u64, shuffle: bool) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng = crate::rng::stream(seed, "shuffle", epoch);
        idx.shuffle(&mut rng);
    }
    idx
}

/// Pads a batch to its longest example.
pub fn collate(examples: &[&Example], pad_id: u32, dtype: DType, device: &Device) -> Result<Batch> {
    let b = examples.len();
    let t = examples
        .iter()
        .map(|e| e.ids.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let mut ids = vec![pad_id; b * t];
    let mut types = vec![0u32; b * t];
    let mut mask = vec![0f32; b * t];
    let mut num_tokens = 0;
    for (i, e) in examples.iter().enumerate() {
        for (j, &id) in e.ids.iter().enumerate() {
            ids[i * t + j] = id;
            types[i * t + j] = e.type_ids.get(j).copied().unwrap_or(0);
            mask[i * t + j] = 1.0;
        }
        num_tokens += e.ids.len();
    }
    let labels = match examples.first().map(|e| &e.target) {
        Some(Target::Class(_)) => {
            let y: Vec<u32> = examples
                .iter()
                .map(|e| match e.target {
                    Target::Class(c) => c,
                    _ => 0,
                })
                .collect();
            Labels::Class(Tensor::from_vec(y, b, device)?)
        }
        Some(Target::Value(_)) => {
            let y: Vec<f32> = examples
                .iter()
                .map(|e| match e.target {
                    Target::Value(v) => v,
                    _ => 0.0,
                })
                .collect();
            Labels::Value(Tensor::from_vec(y, b, device)?.to_dtype(dtype)?)
        }
        Some(Target::Tokens(_)) => {
            let mut targets = vec![0u32; b * t];
            let mut lm = vec![0f32; b * t];
            for (i, e) in examples.iter().enumerate() {
                if let Target::Tokens(m) = &e.target {
                    for j in 0..e.ids.len().saturating_sub(1) {
                        targets[i * t + j] = e.ids[j + 1];
                        lm[i * t + j] = m[j + 1] as f32;
                    }
                }
            }
            Labels::NextToken {
                targets: Tensor::from_vec(targets, (b, t), device)?,
                mask: Tensor::from_vec(lm, (b, t), device)?.to_dtype(dtype)?,
            }
        }
        None => Labels::None,
    };
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (b, t), device)?,
        token_type_ids: Tensor::from_vec(types, (b, t), device)?,
        attention_mask: Tensor::from_vec(mask, (b, t), device)?.to_dtype(dtype)?,
        labels,
        num_tokens,
        batch_size: b,
    })
}
