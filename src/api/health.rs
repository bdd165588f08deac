//! Liveness, readiness and the API contract.

use axum::extract::State;
use axum::routing::get;
use axum::Router;

use super::AppState;
use crate::error::{ApiError, ApiResult};

pub fn router() -> Router<AppState> {
    probes().route("/openapi.yaml", get(openapi))
}

/// Liveness and readiness, also on the operator address (a worker-only process has no other
/// listener for its probes).
pub fn probes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
}

/// Ready when the database and storage both answer.
async fn readyz(State(st): State<AppState>) -> ApiResult<&'static str> {
    crate::db::ping(&st.db)
        .await
        .map_err(|_| ApiError::unavailable("database"))?;
    st.storage
        .check()
        .await
        .map_err(|_| ApiError::unavailable("storage"))?;
    Ok("ready")
}

/// The API contract, compiled in so the binary always serves its own.
pub const OPENAPI: &str = include_str!("../../openapi.yaml");

async fn openapi() -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/yaml")],
        OPENAPI,
    )
}
