//! The memory model: what a training run holds in each phase, from the model's sizes, the
//! method's footprint and the batch shape. The dry-run estimate reports it and `bench train`
//! prints it beside the measured per-phase profile, so the two are compared term by term.
//!
//! Terms (values, times 4 bytes for f32):
//! - **runtime**: the process before any model (binary, allocator, thread pools) plus the
//!   tokenizer, which grows with the vocabulary.
//! - **weights**: every parameter; loading briefly holds a second copy (file → f32).
//! - **optimizer**: two Adam moments per trained value (kept across steps); **gradients**:
//!   one per trained value, from backward until the step.
//! - **method state**: what the method keeps besides (SparseGrad's bases); while calibrating,
//!   also what the basis phase accumulates.
//! - **activations**: what the graph keeps for backward, per token and block. Counted from
//!   the ops a block runs on this device: on the CPU the fused kernels keep only their inputs
//!   and outputs (`nn::fused`); elsewhere the composed ops keep their intermediates too.
//! - **loss**: the output layer's logits and their gradient: one chunk of rows for a causal
//!   LM (`nn::chunked_lm_loss`), negligible for a classifier.
//! - **backward transient**: gradients in flight: about two blocks' activations, plus two
//!   vocabulary-sized gradients when the embedding trains (its scatter and the tied head).

use serde::{Deserialize, Serialize};

use crate::methods::registry::Footprint;
use crate::models::ParamShape;

/// Where the run's tensors live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// Fused CPU kernels; the figure is the process's resident size.
    Cpu,
    /// Composed ops on a GPU; the figure is the device pool's high-water mark (no runtime
    /// term). Not yet checked against a GPU measurement.
    Cuda,
}

/// The batch a step sees.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Workload {
    pub batch_size: u64,
    /// Tokens per row (the padded length).
    pub seq_len: u64,
    /// The model's own dropout while training (encoders keep its masks).
    pub model_dropout: bool,
    pub causal_lm: bool,
    pub placement: Placement,
}

/// Bytes per phase and per term; `total` is the largest phase.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemoryEstimate {
    pub runtime: u64,
    pub weights: u64,
    pub optimizer: u64,
    pub gradients: u64,
    pub method_state: u64,
    pub activations: u64,
    pub loss: u64,
    pub backward_transient: u64,
    /// Each phase's peak: load, calibration, forward, backward, optimizer, eval.
    pub phases: Phases,
    pub total: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Phases {
    pub load: u64,
    pub calibration: u64,
    pub forward: u64,
    pub backward: u64,
    pub optimizer: u64,
    pub eval: u64,
}

impl Phases {
    pub fn max(&self) -> u64 {
        [
            self.load,
            self.calibration,
            self.forward,
            self.backward,
            self.optimizer,
            self.eval,
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
    }
    /// `(name, bytes)` in phase order.
    pub fn named(&self) -> [(&'static str, u64); 6] {
        [
            ("load", self.load),
            ("calibration", self.calibration),
            ("forward", self.forward),
            ("backward", self.backward),
            ("optimizer", self.optimizer),
            ("eval", self.eval),
        ]
    }
}

const F32: u64 = 4;
const MIB: u64 = 1 << 20;

/// Values a block keeps for backward per token, for the model's own ops (the method adds
/// `Footprint::kept_per_token_layer`). `t` is the padded length (attention scores are
/// `heads × t` per token).
pub fn kept_per_token_layer(shape: &ParamShape, w: &Workload) -> u64 {
    let (h, f, kv, t) = (shape.hidden, shape.ffn, shape.kv_dim, w.seq_len);
    let scores = 2 * shape.heads * t; // scores and probabilities
    if shape.mlp_matrices == 3 {
        // LLaMA: norm outputs 2h, residual stream 2h, q/k/v h+2kv, rotated q/k h+kv, v by
        // head kv, attention output and its transpose 2h, o-projection h, gate, up and their
        // SwiGLU 3f, down projection h.
        let fused = 10 * h + 4 * kv + 3 * f + scores;
        match w.placement {
            Placement::Cpu => fused,
            // Composed RMS norm (+2h each), RoPE (+4 per rotated value), SiLU (+f).
            Placement::Cuda => fused + 4 * h + 4 * (h + kv) + f,
        }
    } else {
        // BERT/RoBERTa: block input h, q/k/v 3h, by head 3h, attention output and transpose
        // 2h, o-projection h, residual + LayerNorm 2h, FFN up and GELU 2f, down h, residual h.
        let fused = 14 * h + 2 * f + scores;
        let dropout = if w.model_dropout {
            // Attention-probability and two hidden dropouts: mask and output each.
            scores + 4 * h
        } else {
            0
        };
        match w.placement {
            Placement::Cpu => fused + dropout,
            // Composed LayerNorm (+3h each), GELU (+3f), bias adds (+5h+f).
            Placement::Cuda => fused + dropout + 6 * h + 3 * f + 5 * h + f,
        }
    }
}

/// Runtime before the model: measured ~48 MiB for the binary and its pools, plus the tokenizer
/// (~512 bytes per vocabulary entry).
fn runtime(shape: &ParamShape, placement: Placement) -> u64 {
    match placement {
        Placement::Cpu => 48 * MIB + 512 * shape.vocab,
        Placement::Cuda => 0,
    }
}

/// The memory of one training run; `trainable` counts every trained value (task head
/// included), `fp` is the method's footprint.
pub fn estimate(
    shape: &ParamShape,
    fp: &Footprint,
    trainable: u64,
    w: &Workload,
) -> MemoryEstimate {
    let params = shape.params() + shape.head;
    let tokens = w.batch_size * w.seq_len;
    let runtime = runtime(shape, w.placement);
    let weights = params * F32;
    let optimizer = 2 * trainable * F32;
    let gradients = trainable * F32;
    let method_state = fp.extra_state * F32;
    let per_layer = kept_per_token_layer(shape, w) + fp.kept_per_token_layer;
    // Plus the embeddings' output and the final norm, once per token.
    let activations = tokens * (shape.layers * per_layer + 4 * shape.hidden) * F32;
    let loss = if w.causal_lm {
        // A chunk of logits, their softmax and their gradient.
        let rows = tokens.min(crate::nn::lm_loss_chunk_rows(shape.vocab as usize) as u64);
        3 * rows * shape.vocab * F32
    } else {
        0
    };
    let embedding_trains = trainable >= shape.params();
    let backward_transient = 2 * tokens * per_layer * F32
        + if embedding_trains {
            2 * shape.vocab * shape.hidden * F32
        } else {
            0
        };
    let steady = runtime + weights + optimizer + method_state;
    let forward = steady + activations + loss;
    let backward = forward + gradients + backward_transient;
    // Inference keeps nothing across blocks: one block's outputs in flight, and the loss chunk.
    let eval = steady + tokens * per_layer * F32 + loss;
    let phases = Phases {
        // The file's tensors and their f32 copies; a method that allocates its moments when it
        // is prepared (full fine-tuning) holds the steady state already.
        load: (runtime + 2 * weights).max(steady),
        calibration: if fp.calibration_batches > 0 {
            backward + fp.calibration_state * F32
        } else {
            steady
        },
        forward,
        backward,
        optimizer: steady + gradients,
        eval,
    };
    MemoryEstimate {
        runtime,
        weights,
        optimizer,
        gradients,
        method_state,
        activations,
        loss,
        backward_transient,
        total: phases.max(),
        phases,
    }
}

impl MemoryEstimate {
    /// The backward phase's terms, which add up to it.
    pub fn backward_terms(&self) -> [(&'static str, u64); 8] {
        [
            ("runtime", self.runtime),
            ("weights", self.weights),
            ("optimizer", self.optimizer),
            ("gradients", self.gradients),
            ("method_state", self.method_state),
            ("activations", self.activations),
            ("loss", self.loss),
            ("backward_transient", self.backward_transient),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2() -> ParamShape {
        ParamShape {
            vocab: 49152,
            hidden: 576,
            layers: 30,
            ffn: 1536,
            kv_dim: 192,
            mlp_matrices: 3,
            heads: 9,
            head: 0,
        }
    }

    fn work(b: u64, t: u64) -> Workload {
        Workload {
            batch_size: b,
            seq_len: t,
            model_dropout: false,
            causal_lm: true,
            placement: Placement::Cpu,
        }
    }

    #[test]
    fn terms_add_up_to_the_backward_phase_and_the_total() {
        let s = smollm2();
        let fp = Footprint {
            trainable: 1_555_776,
            extra_state: 1000,
            calibration_batches: 0,
            kept_per_token_layer: 0,
            calibration_state: 0,
        };
        let e = estimate(&s, &fp, fp.trainable, &work(8, 128));
        let sum: u64 = e.backward_terms().iter().map(|t| t.1).sum();
        assert_eq!(sum, e.phases.backward);
        assert_eq!(e.total, e.phases.max());
        assert_eq!(e.total, e.phases.backward);
    }

    #[test]
    fn activations_grow_with_batch_and_length_as_the_formula_says() {
        let s = smollm2();
        let fp = Footprint::default();
        let a = |b, t| estimate(&s, &fp, 0, &work(b, t)).activations;
        // Linear in the batch.
        assert_eq!(a(16, 128), 2 * a(8, 128));
        // In the length: linear per token, plus the attention scores' t² term.
        let per = |t: u64| kept_per_token_layer(&s, &work(1, t));
        assert_eq!(per(256) - per(128), 2 * s.heads * 128);
        assert_eq!(
            a(8, 256),
            8 * 256 * (s.layers * per(256) + 4 * s.hidden) * 4
        );
        // The loss chunk grows with the vocabulary until the chunk cap binds.
        let mut big = s;
        big.vocab *= 2;
        let l = |sh: &ParamShape, b| estimate(sh, &fp, 0, &work(b, 16)).loss;
        assert_eq!(l(&big, 1), 2 * l(&s, 1));
        assert_eq!(l(&s, 1), 3 * 16 * s.vocab * 4);
        assert!(l(&s, 64) <= 3 * (4 << 20) * 4);
    }

    #[test]
    fn full_training_pays_for_gradients_and_moments_of_every_weight() {
        let s = smollm2();
        let full = Footprint {
            trainable: s.params(),
            ..Default::default()
        };
        let lora = Footprint {
            trainable: 1_555_776,
            ..Default::default()
        };
        let ef = estimate(&s, &full, full.trainable, &work(8, 128));
        let el = estimate(&s, &lora, lora.trainable, &work(8, 128));
        assert_eq!(ef.optimizer, 2 * s.params() * 4);
        assert_eq!(ef.activations, el.activations);
        assert!(ef.total > el.total + 3 * s.params() * 4);
        // Composed ops on a GPU keep more per block.
        let mut cuda = work(8, 128);
        cuda.placement = Placement::Cuda;
        assert!(estimate(&s, &lora, 0, &cuda).activations > el.activations);
    }
}
