//! Tenants and API keys (admin key only).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use serde::Deserialize;

use super::objects::{ApiKeyObject, TenantObject};
use super::{Admin, AppState, Json};
use crate::db::tenants;
use crate::error::{ApiError, ApiResult};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/tenants", post(create_tenant))
        .route("/admin/api_keys", post(create_key))
        .route("/admin/api_keys/{id}/revoke", post(revoke_key))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTenant {
    name: String,
}

async fn create_tenant(
    _: Admin,
    State(st): State<AppState>,
    Json(b): Json<NewTenant>,
) -> ApiResult<(StatusCode, axum::Json<TenantObject>)> {
    let name = b.name.trim();
    if name.is_empty() || name.len() > 200 {
        return Err(ApiError::invalid(
            "1 to 200 characters",
            Some("name"),
            "invalid_name",
        ));
    }
    let t = tenants::create(&st.db, name).await?;
    Ok((StatusCode::CREATED, axum::Json(TenantObject::from(&t))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    tenant_id: String,
}

async fn create_key(
    _: Admin,
    State(st): State<AppState>,
    Json(b): Json<NewKey>,
) -> ApiResult<(StatusCode, axum::Json<ApiKeyObject>)> {
    let (k, secret) = tenants::create_key(&st.db, &b.tenant_id)
        .await?
        .ok_or_else(|| ApiError::not_found("tenant", &b.tenant_id))?;
    Ok((
        StatusCode::CREATED,
        axum::Json(ApiKeyObject::new(&k, Some(secret))),
    ))
}

async fn revoke_key(
    _: Admin,
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<ApiKeyObject>> {
    let k = tenants::revoke_key(&st.db, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("api key", &id))?;
    Ok(axum::Json(ApiKeyObject::new(&k, None)))
}
