use axum::extract::State;
use axum::routing::get;
use axum::Router;

use super::AppState;
use crate::error::{ApiError, ApiResult};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
}

/// Ready when the database and storage both answer.
async fn readyz(State(st): State<AppState>) -> ApiResult<&'static str> {
    sqlx::query("select 1")
        .execute(&st.db)
        .await
        .map_err(|_| ApiError::unavailable("database"))?;
    st.storage
        .check()
        .await
        .map_err(|_| ApiError::unavailable("storage"))?;
    Ok("ready")
}
