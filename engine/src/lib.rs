//! The training engine: trainable BERT / RoBERTa / LLaMA on candle, fine-tuned with SparseGrad,
//! LoRA, full fine-tuning or MeProp. It knows nothing about HTTP, SQL or async runtimes:
//! callers run [`pipeline::run_job`] (or [`train::train`] on a loaded model) with a progress
//! callback and a cancellation flag, on a thread of their own.
//!
//! From the bottom up:
//! - [`io`] (JSON, atomic safetensors, sha256) and [`rng`] (named seeded streams);
//! - [`nn`]: ops with a backward pass candle lacks, fused CPU kernels, [`nn::Weights`];
//! - [`topk`] and [`kernels`] (SparseGrad's device kernels and their CPU references);
//! - [`models`]: one file per architecture behind [`models::Architecture`], one registry;
//! - [`pretrained`]: Hugging Face checkpoint folders → [`models::Model`]; [`gguf`] imports;
//! - [`data`]: dataset rows, tokenizer and chat template, encoding, batches;
//! - [`methods`]: the fine-tuning methods behind one trait, and their registry
//!   ([`methods::registry`]: names, hyperparameters, defaults);
//! - [`optim`], [`metrics`];
//! - [`train`]: the loop, its events, checkpoints, evaluation and predictions;
//! - [`artifact`]: the delta format, applying it in memory, merging it into a folder;
//! - [`pipeline`]: one job end to end (what the CLI and the service's worker run);
//! - [`device`] choice, [`testing`] (tiny random models).

pub mod artifact;
pub mod data;
pub mod device;
pub mod error;
pub mod gguf;
pub mod hyper;
pub mod io;
pub mod kernels;
pub mod memory;
pub mod methods;
pub mod metrics;
pub mod models;
pub mod nn;
pub mod optim;
pub mod pipeline;
pub mod pretrained;
pub mod rng;
pub mod serve;
pub mod testing;
pub mod topk;
pub mod train;

pub use error::{Error, Result};
