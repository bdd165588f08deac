//! `/v1/fine_tuning/jobs`: [`create`] (with dry run and `Idempotency-Key`), [`read`] (list,
//! get with queue position and ETA, cancel), [`events`] (cursor list or Server-Sent Events
//! resumable with `Last-Event-ID`), [`artifacts`] (metrics, checkpoints, artifacts and their
//! downloads with `Range`), [`predict`] (merge and predictions with the result).

mod artifacts;
mod create;
mod events;
mod predict;
mod read;

use axum::routing::{get, post};
use axum::Router;

use super::AppState;
use crate::db::job_records::{self as records, JobRow};
use crate::domain::request::Invalid;
use crate::domain::JobKind;
use crate::error::{ApiError, ApiResult};

pub use create::find_model;
pub(crate) use predict::{busy, inference_error, served_key};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/fine_tuning/jobs", post(create::create).get(read::list))
        .route("/fine_tuning/jobs/estimate", post(create::estimate_only))
        .route("/fine_tuning/jobs/{id}", get(read::get_one))
        .route("/fine_tuning/jobs/{id}/cancel", post(read::cancel))
        .route("/fine_tuning/jobs/{id}/pause", post(read::pause))
        .route("/fine_tuning/jobs/{id}/resume", post(read::resume))
        .route("/fine_tuning/jobs/{id}/events", get(events::events))
        .route("/fine_tuning/jobs/{id}/metrics", get(artifacts::metrics))
        .route(
            "/fine_tuning/jobs/{id}/checkpoints",
            get(artifacts::checkpoints),
        )
        .route(
            "/fine_tuning/jobs/{id}/artifacts",
            get(artifacts::artifacts),
        )
        .route(
            "/fine_tuning/jobs/{id}/artifacts/{artifact_id}/content",
            get(artifacts::artifact_content),
        )
        .route("/fine_tuning/jobs/{id}/merge", post(predict::merge))
        .route("/fine_tuning/jobs/{id}/predict", post(predict::predict))
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        ApiError::invalid(e.message, Some(&e.param), "invalid_value")
    }
}

/// A tenant's fine-tuning job, or 404 (another tenant's job is not found either).
async fn job_for(st: &AppState, tenant: &str, id: &str) -> ApiResult<JobRow> {
    records::get(&st.db, tenant, id, JobKind::FineTune)
        .await?
        .ok_or_else(|| ApiError::not_found("fine-tuning job", id))
}
