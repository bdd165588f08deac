//! The command line and the tools beside the service: engine commands on local files
//! (`train`, `eval`, `predict`, `merge`, `inspect`, `import-gguf`), pinned test fixtures,
//! benchmarks and the GPU check. The service itself (`serve`, `worker`, `migrate`) is started
//! from here but lives outside this folder.

pub mod bench;
pub mod bench_serve;
pub mod bench_service;
pub mod cli;
pub mod commands;
pub mod fixtures;
pub mod gpu_check;
