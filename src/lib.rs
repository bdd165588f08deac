//! sparsegrad-service: the `sparsegrad` binary's library. Engine commands (train, eval,
//! predict, merge, import-gguf, fixtures, bench) live in [`cli`]; the Postgres job queue in
//! [`queue`]; the training engine itself is the `sparsegrad-engine` crate.

pub mod bench;
pub mod cli;
pub mod fixtures;
pub mod queue;
pub mod storage;
pub mod worker;
