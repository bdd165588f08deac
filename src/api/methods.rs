//! `GET /v1/methods`: the fine-tuning methods a job can ask for, each with every
//! hyperparameter it takes — type, bounds, choices, default (the method's own learning rate
//! included) and what it does — read from the engine's registry, the same one that resolves
//! job requests.

use axum::extract::Path;
use axum::routing::get;
use axum::Router;
use sparsegrad_engine::methods::registry::{listings, MethodListing};

use super::objects::List;
use super::{AppState, Tenant};
use crate::error::{ApiError, ApiResult};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/methods", get(list))
        .route("/methods/{id}", get(get_one))
}

async fn list(_: Tenant) -> axum::Json<List<MethodListing>> {
    axum::Json(List::new(listings(), false))
}

async fn get_one(_: Tenant, Path(id): Path<String>) -> ApiResult<axum::Json<MethodListing>> {
    listings()
        .into_iter()
        .find(|m| m.id == id)
        .map(axum::Json)
        .ok_or_else(|| ApiError::not_found("method", &id))
}
