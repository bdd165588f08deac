//! The service's vocabulary, shared by the API, the queue and the worker and owned by none of
//! them: what a job is (its kind, status, spec and result, typed once — see [`job`]), what a
//! request asks for ([`request`]), what it will cost ([`estimate`]), which base models exist
//! ([`catalog`]), and how an engine error reaches a user ([`failure`]). No HTTP, no SQL here.

pub mod catalog;
pub mod estimate;
pub mod failure;
pub mod job;
pub mod request;

pub use catalog::{BaseModel, ModelSource};
pub use failure::UserFacing;
pub use job::{
    ApiMeta, ArtifactKind, EventLevel, EventType, FileRef, FineTune, FineTuneResult, JobKind,
    JobSpec, JobStatus, MergeResult, MergeSpec, MetricKind,
};
