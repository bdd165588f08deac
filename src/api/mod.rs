//! The HTTP API under `/v1`: one module per resource, each with its `router()`. Handlers
//! validate, call `db`/`queue`/`storage`/`inference` functions and answer with the typed
//! objects of [`objects`]; they hold no SQL.

pub mod admin;
pub mod dashboard;
pub mod files;
pub mod fine_tuning;
pub mod health;
pub mod methods;
pub mod metrics;
pub mod models;
pub mod objects;

use std::sync::Arc;

use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use axum::Router;
use secrecy::ExposeSecret;
use serde::Deserialize;
use sqlx::PgPool;

use crate::config::Config;
use crate::db::tenants::key_hash;
use crate::db::Page;
use crate::error::{ApiError, ApiResult};
use crate::inference::Predictor;
use crate::storage::Storage;

/// Cheap handles shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub db: PgPool,
    pub storage: Storage,
    pub cfg: Arc<Config>,
    pub http: Arc<metrics::HttpMetrics>,
    pub predictor: Arc<Predictor>,
}

impl AppState {
    pub fn new(db: PgPool, storage: Storage, cfg: Arc<Config>) -> Self {
        AppState {
            db,
            storage,
            cfg,
            http: Default::default(),
            predictor: Default::default(),
        }
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(health::router())
        .merge(metrics::router())
        .merge(dashboard::router())
        .nest(
            "/v1",
            Router::new()
                .merge(admin::router())
                .merge(files::router())
                .merge(methods::router())
                .merge(models::router())
                .merge(fine_tuning::router()),
        )
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .with_state(state)
}

/// The tenant behind `Authorization: Bearer <api key>`.
pub struct Tenant(pub String);

fn bearer(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

impl FromRequestParts<AppState> for Tenant {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> ApiResult<Self> {
        let key = bearer(parts).ok_or_else(|| {
            ApiError::unauthorized("missing `Authorization: Bearer <api key>` header")
        })?;
        match crate::db::tenants::for_key(&st.db, key).await? {
            Some(t) => Ok(Tenant(t)),
            None => Err(ApiError::unauthorized("invalid or revoked API key")),
        }
    }
}

/// The configured admin key.
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> ApiResult<Self> {
        let Some(want) = &st.cfg.admin_key else {
            return Err(ApiError::unauthorized(
                "admin routes are disabled (no admin key configured)",
            ));
        };
        let got = bearer(parts).unwrap_or_default();
        // Compare hashes: equal-length inputs, no early exit on the secret itself.
        if key_hash(got) == key_hash(want.expose_secret()) && !got.is_empty() {
            Ok(Admin)
        } else {
            Err(ApiError::unauthorized("invalid admin key"))
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    pub after: Option<String>,
    pub limit: Option<i64>,
}

impl ListQuery {
    pub fn page(&self) -> ApiResult<Page> {
        let limit = self.limit.unwrap_or(20);
        if !(1..=100).contains(&limit) {
            return Err(ApiError::invalid(
                "must be between 1 and 100",
                Some("limit"),
                "invalid_limit",
            ));
        }
        Ok(Page {
            after: self.after.clone(),
            limit,
        })
    }
}

pub type ListParams = Query<ListQuery>;

/// A JSON body extractor whose rejections come back in the error envelope.
pub struct Json<T>(pub T);

impl<T, S> axum::extract::FromRequest<S> for Json<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;
    async fn from_request(req: axum::extract::Request, st: &S) -> ApiResult<Self> {
        match axum::Json::<T>::from_request(req, st).await {
            Ok(axum::Json(v)) => Ok(Json(v)),
            Err(e) => Err(ApiError::invalid(e.body_text(), None, "invalid_json")),
        }
    }
}
