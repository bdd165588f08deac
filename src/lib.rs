//! sparsegrad-service: the `sparsegrad` binary's library.
//!
//! The service, by role: [`api`] (HTTP: one module per resource) over [`domain`] (what jobs,
//! requests, estimates and base models are), [`db`] (reads per aggregate), [`queue`] (every
//! change to a job's lifecycle), [`storage`] (objects and local model copies), [`worker`]
//! (claims jobs and drives the engine on its own thread), [`inference`] (loaded models for
//! predictions), [`webhooks`] (signed deliveries of job events), [`server`] (runs API and
//! workers until shutdown), [`fsck`] (the object store
//! checked against the database), one typed [`config`] and one API [`error`] type. Beside it,
//! [`tools`]: the command line, engine commands on local files, fixtures, benchmarks and the
//! GPU check. The training engine is the
//! `sparsegrad-engine` crate.

pub mod api;
pub mod config;
pub mod db;
pub mod domain;
pub mod error;
pub mod fsck;
pub mod http;
pub mod inference;
pub mod queue;
pub mod server;
pub mod shutdown;
pub mod storage;
pub mod tools;
pub mod webhooks;
pub mod worker;
