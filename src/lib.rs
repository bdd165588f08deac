//! sparsegrad-service: the `sparsegrad` binary's library. Engine commands (train, eval,
//! predict, merge, import-gguf, fixtures, bench) live in [`cli`]; the Postgres job queue in
//! [`queue`]; the training engine itself is the `sparsegrad-engine` crate.

pub mod api;
pub mod bench;
pub mod cli;
pub mod config;
pub mod db;
pub mod error;
pub mod fixtures;
pub mod gpu_check;
pub mod jobs;
pub mod models;
pub mod queue;
pub mod server;
pub mod storage;
pub mod worker;
