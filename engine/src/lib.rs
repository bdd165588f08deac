//! The training engine: trainable BERT / RoBERTa / LLaMA on candle, data pipeline, methods
//! (full fine-tuning, LoRA; SparseGrad and MeProp plug into the same trait), evaluation and
//! artifacts. It knows nothing about HTTP, SQL or async runtimes: callers drive it through
//! [`train::Trainer`] with a progress callback and a cancellation flag.

pub mod artifact;
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod error;
pub mod gguf;
pub mod kernels;
pub mod methods;
pub mod metrics;
pub mod models;
pub mod nn;
pub mod optim;
pub mod pipeline;
pub mod rng;
pub mod testing;
pub mod train;

pub use error::{Error, Result};
