//! Tenants and API keys (admin key only).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use serde::Deserialize;
use serde_json::json;

use super::{Admin, AppState, Json};
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
) -> ApiResult<(StatusCode, axum::Json<serde_json::Value>)> {
    let name = b.name.trim();
    if name.is_empty() || name.len() > 200 {
        return Err(ApiError::invalid(
            "1 to 200 characters",
            Some("name"),
            "invalid_name",
        ));
    }
    let t = crate::db::create_tenant(&st.db, name).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(
            json!({"object": "tenant", "id": t.id, "name": t.name, "created_at": t.created_at.timestamp()}),
        ),
    ))
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
) -> ApiResult<(StatusCode, axum::Json<serde_json::Value>)> {
    let (k, secret) = crate::db::create_api_key(&st.db, &b.tenant_id)
        .await?
        .ok_or_else(|| ApiError::not_found("tenant", &b.tenant_id))?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({
            "object": "api_key", "id": k.id, "tenant_id": k.tenant_id, "prefix": k.prefix,
            "created_at": k.created_at.timestamp(),
            // Shown once; only its hash is stored.
            "key": secret,
        })),
    ))
}

async fn revoke_key(
    _: Admin,
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<serde_json::Value>> {
    let k = crate::db::revoke_api_key(&st.db, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("api key", &id))?;
    Ok(axum::Json(json!({
        "object": "api_key", "id": k.id, "tenant_id": k.tenant_id, "prefix": k.prefix,
        "revoked_at": k.revoked_at.map(|t| t.timestamp()),
    })))
}
