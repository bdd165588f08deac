//! Building blocks with a backward pass. candle-nn's fused layer_norm / rms_norm /
//! softmax_last_dim / rope have none (gradients silently stop there), so these are written
//! from primitive ops whose backward candle implements, and checked against finite differences.
//! Frozen weights never get a weight gradient: see [`linear::frozen_linear`].

pub mod fused;
pub mod linear;
pub mod ops;
pub mod weights;

pub use linear::{frozen_linear, lora_linear, WeightGradHook};
pub use ops::*;
pub use weights::{Adapter, Ctx, Param, Weights};
