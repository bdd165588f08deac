//! The dry-run estimate: a job's size and cost from the model's sizes, the file's and the
//! method's footprint, before anything is queued.

use serde::{Deserialize, Serialize};
use sparsegrad_engine::memory::{MemoryEstimate, Placement, Workload};
use sparsegrad_engine::methods::Resolved;
use sparsegrad_engine::models::ParamShape;

/// What a dry run answers: the job's size and what it will cost, before it is queued.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Estimate {
    pub steps: usize,
    pub examples: usize,
    pub tokens: u64,
    pub duration_secs: f64,
    /// The largest phase of `memory` (what to provision).
    pub memory_bytes: u64,
    /// The memory model's terms and per-phase peaks (`sparsegrad bench train` prints the same
    /// model beside the measured profile). Absent from jobs queued before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryEstimate>,
    pub trainable_params: u64,
    /// `history` (this service's measured seconds per token on the same base model) or
    /// `flops` (6 FLOPs per parameter and token at an assumed CPU rate).
    pub duration_basis: String,
}

/// A base model's sizes from its `config.json`, through the architecture that reads it;
/// `None` when the config is not one the engine can load.
pub fn shape_of(config: &serde_json::Value) -> Option<ParamShape> {
    sparsegrad_engine::models::from_config(config)
        .ok()
        .map(|a| a.shape())
}

/// Where the workers configured with `device` (`SPARSEGRAD_DEVICE`) train: `auto` picks a GPU
/// only in a CUDA build.
pub fn placement_of(device: &str) -> Placement {
    let cuda = device.starts_with("cuda") || (device == "auto" && cfg!(feature = "cuda"));
    if cuda {
        Placement::Cuda
    } else {
        Placement::Cpu
    }
}

/// Effective CPU rate assumed before the service has measured anything (MiniLM-L6 on two
/// cores trains at about 5e10 FLOP/s in `sparsegrad bench train`).
pub const PRIOR_FLOPS_PER_SEC: f64 = 5e10;

/// The estimate for `rows` examples of `bytes` in all; `secs_per_token` from history if any.
pub fn estimate(
    shape: &ParamShape,
    r: &Resolved,
    rows: u64,
    bytes: u64,
    secs_per_token: Option<f64>,
    placement: Placement,
) -> Estimate {
    let rows_us = rows.max(1) as usize;
    let steps = r.train.total_steps(rows_us);
    let examples_per_step = (r.train.batch_size * r.train.grad_accum) as u64;
    // About four bytes of text per token, plus the special tokens, capped at the length.
    let per_row = ((bytes / rows.max(1)) / 4 + 2).min(r.max_seq_len as u64);
    // Saturating: every factor is bounded by the registry, but no request may wrap a figure.
    let examples = (steps as u64)
        .saturating_mul(examples_per_step)
        .min(match r.train.max_steps {
            Some(_) => u64::MAX,
            None => rows.saturating_mul(r.train.epochs_for(rows_us) as u64),
        });
    let tokens = examples.saturating_mul(per_row);
    let footprint = r.method.footprint(shape);
    let calib = footprint
        .calibration_batches
        .saturating_mul(r.train.batch_size as u64)
        .saturating_mul(per_row);
    let (duration_secs, basis) = match secs_per_token {
        Some(s) => (tokens.saturating_add(calib) as f64 * s, "history"),
        None => (
            6.0 * shape.block_params() as f64 * tokens.saturating_add(calib) as f64
                / PRIOR_FLOPS_PER_SEC,
            "flops",
        ),
    };
    // Encoders get a newly initialised head (two labels assumed), trained densely by every
    // method.
    let trainable = shape.head + footprint.trainable;
    // Batches are padded to their longest row: assume it 1.5× the mean, within the cap.
    let padded = (per_row * 3).div_ceil(2).min(r.max_seq_len as u64).max(1);
    let memory = sparsegrad_engine::memory::estimate(
        shape,
        &footprint,
        trainable,
        &Workload {
            batch_size: r.train.batch_size as u64,
            seq_len: padded,
            model_dropout: r.train.dropout,
            causal_lm: shape.head == 0,
            placement,
        },
    );
    Estimate {
        steps,
        examples: examples as usize,
        tokens,
        duration_secs: (duration_secs * 10.0).round() / 10.0,
        memory_bytes: memory.total,
        memory: Some(memory),
        trainable_params: trainable,
        duration_basis: basis.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::request::{resolve, MethodRequest};
    use serde_json::{json, Value};

    fn req(v: Value) -> MethodRequest {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn estimate_counts_steps_and_scales_with_history() {
        let shape = ParamShape {
            vocab: 30522,
            hidden: 384,
            layers: 6,
            ffn: 1536,
            kv_dim: 384,
            mlp_matrices: 2,
            heads: 12,
            head: 384 * 384 + 3 * 384 + 2,
        };
        let r = resolve(
            Some(&req(
                json!({"hyperparameters": {"batch_size": 16, "n_epochs": 2}}),
            )),
            None,
        )
        .unwrap();
        let e = estimate(&shape, &r, 100, 100 * 200, None, Placement::Cpu);
        assert_eq!(e.steps, 14);
        assert_eq!(e.examples, 200);
        assert_eq!(e.tokens, 200 * 52);
        assert_eq!(e.duration_basis, "flops");
        assert!(e.memory_bytes > 4 * shape.params());
        let m = e.memory.as_ref().unwrap();
        assert_eq!(e.memory_bytes, m.total);
        assert_eq!(
            m.backward_terms().iter().map(|t| t.1).sum::<u64>(),
            m.phases.backward
        );
        let h = estimate(&shape, &r, 100, 100 * 200, Some(0.01), Placement::Cpu);
        assert_eq!(h.duration_basis, "history");
        // Calibration: 20 head warm-up and 10 basis-phase micro-batches of 16 rows.
        assert!((h.duration_secs - (200.0 * 52.0 + 480.0 * 52.0) * 0.01).abs() < 0.1);
    }

    #[test]
    fn shapes_come_from_the_architecture() {
        let bert = json!({"model_type": "bert", "vocab_size": 30522, "hidden_size": 384,
            "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536,
            "max_position_embeddings": 512});
        let s = shape_of(&bert).unwrap();
        assert_eq!((s.mlp_matrices, s.kv_dim), (2, 384));
        let llama = json!({"model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "intermediate_size": 1536});
        let s = shape_of(&llama).unwrap();
        assert_eq!((s.mlp_matrices, s.kv_dim, s.head), (3, 192, 0));
        assert!(shape_of(&json!({"model_type": "gpt2"})).is_none());
    }
}
