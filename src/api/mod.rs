//! The HTTP API under `/v1`: one module per resource, each with its `router()`. Handlers
//! validate, call `db`/`queue`/`storage`/`inference` functions and answer with the typed
//! objects of [`objects`]; they hold no SQL.

pub mod admin;
pub mod completions;
pub mod dashboard;
pub mod files;
pub mod fine_tuning;
pub mod health;
pub mod limits;
pub mod methods;
pub mod metrics;
pub mod models;
pub mod objects;
pub mod webhooks;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::Router;
use secrecy::ExposeSecret;
use sqlx::PgPool;

use crate::config::Config;
use crate::db::tenants::key_hash;
use crate::db::Page;
use crate::error::{ApiError, ApiResult};
use crate::inference::Engine;
use crate::storage::Storage;

/// Cheap handles shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub db: PgPool,
    pub storage: Storage,
    pub cfg: Arc<Config>,
    pub http: Arc<metrics::HttpMetrics>,
    /// The inference engine (its own thread): every model the API runs.
    pub inference: Engine,
    pub gates: Arc<limits::Gates>,
    /// Wakes event streams when their job has news (one LISTEN per process).
    pub signals: crate::db::listen::JobSignals,
}

impl AppState {
    pub fn new(db: PgPool, storage: Storage, cfg: Arc<Config>) -> Self {
        AppState {
            signals: crate::db::listen::JobSignals::new(db.clone(), crate::db::listen::EVENTS),
            db,
            storage,
            http: Default::default(),
            inference: Engine::start(
                &cfg.device,
                crate::inference::Limits {
                    max_queue: cfg.inference_max_queue,
                    max_per_tenant: cfg.inference_max_per_tenant,
                    delta_budget_bytes: cfg.inference_delta_budget_mb << 20,
                    max_bases: cfg.inference_max_bases,
                    kv_budget_bytes: cfg.inference_kv_budget_mb << 20,
                },
            ),
            gates: Arc::new(limits::Gates::new(&cfg)),
            cfg,
        }
    }
}

/// Every route of the API. `/metrics` is among them, behind the admin key, unless the
/// config gives it an operator address of its own (then see [`metrics::operator_router`]).
pub fn router(state: AppState) -> Router {
    let metrics = if state.cfg.metrics_listen.is_none() {
        metrics::router()
    } else {
        Router::new()
    };
    Router::new()
        .merge(health::router())
        .merge(metrics)
        .merge(dashboard::router())
        .nest(
            "/v1",
            Router::new()
                .merge(admin::router())
                .merge(completions::router())
                .merge(files::router())
                .merge(methods::router())
                .merge(models::router())
                .merge(fine_tuning::router())
                .merge(webhooks::router())
                .route_layer(axum::middleware::from_fn(reject_nul)),
        )
        .layer(axum::middleware::from_fn(envelope))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .with_state(state)
}

/// Every error answer in the envelope, whoever produced it: axum's own (unknown route, wrong
/// method, a path it cannot decode), body limits, timeouts. Handlers' errors are JSON already
/// and pass through; a non-JSON error body is replaced (its text kept for 4xx, never for 5xx).
async fn envelope(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let resp = next.run(req).await;
    let status = resp.status();
    let json = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|c| c.to_str().ok())
        .is_some_and(|c| c.starts_with("application/json"));
    if json || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    // Framework rejections are a line of text; anything longer is not worth echoing.
    let mut text = axum::body::to_bytes(body, 2048)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    if text.is_empty() {
        // axum's own 404 and 405 say nothing: say what was asked.
        match status {
            StatusCode::NOT_FOUND => text = format!("no route {method} {path}"),
            StatusCode::METHOD_NOT_ALLOWED => {
                let allowed = parts
                    .headers
                    .get(axum::http::header::ALLOW)
                    .and_then(|a| a.to_str().ok())
                    .unwrap_or_default();
                text = format!("{method} is not allowed on {path} (allowed: {allowed})");
            }
            _ => {}
        }
    }
    let mut out = ApiError::from_status(status, &text).into_response();
    for (name, value) in &parts.headers {
        if name != CONTENT_TYPE && name != CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

/// A NUL byte (`%00`) in a path segment or a query parameter is a 400 naming that parameter
/// (the segment's name in the route template), before any handler or query sees it.
async fn reject_nul(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match nul_param(&req) {
        Some(param) => {
            ApiError::invalid("holds a NUL byte", Some(&param), "invalid_text").into_response()
        }
        None => next.run(req).await,
    }
}

fn nul_param(req: &axum::extract::Request) -> Option<String> {
    let nul = |s: &str| s.to_ascii_lowercase().contains("%00");
    let uri = req.uri();
    for pair in uri.query().unwrap_or_default().split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if nul(k) || nul(v) {
            // The parameter as the client named it (decoded), NULs shown as `\0`.
            let name = form_urlencoded::parse(k.as_bytes())
                .next()
                .map(|(n, _)| n.replace('\0', "\\0"))
                .unwrap_or_else(|| k.to_string());
            return Some(name);
        }
    }
    let template = req
        .extensions()
        .get::<axum::extract::MatchedPath>()?
        .as_str();
    // From the end: inside a nested router the path has lost its prefix, the template not.
    template
        .rsplit('/')
        .zip(uri.path().rsplit('/'))
        .find(|(_, seg)| nul(seg))
        .map(|(t, _)| t.trim_start_matches('{').trim_end_matches('}').to_string())
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

/// A list's query string, as OpenAI documents it: `after`, `limit`, `order` (`asc` /
/// `desc`), and the filters `purpose` (files) and `metadata[key]=value` (jobs). A name given
/// twice or one no list knows is a 400 naming it; each list refuses the filters it lacks.
#[derive(Debug, Default)]
pub struct ListQuery {
    pub after: Option<String>,
    pub limit: Option<i64>,
    pub order: Option<String>,
    pub purpose: Option<String>,
    pub metadata: BTreeMap<String, String>,
}

/// The most `metadata[…]` filters one list accepts (a job has at most 16 pairs).
const MAX_METADATA_FILTERS: usize = 16;

impl ListQuery {
    fn parse(q: &str) -> ApiResult<Self> {
        let bad = |param: &str, msg: String| ApiError::invalid(msg, Some(param), "invalid_query");
        let mut out = ListQuery::default();
        let mut seen = std::collections::HashSet::new();
        for (k, v) in form_urlencoded::parse(q.as_bytes()) {
            if !seen.insert(k.to_string()) {
                return Err(bad(&k, format!("`{k}` is given twice")));
            }
            let v = v.into_owned();
            match &*k {
                "after" if v.is_empty() => {
                    return Err(bad(
                        "after",
                        "is empty (leave it out for the first page)".into(),
                    ))
                }
                "after" => out.after = Some(v),
                "limit" => {
                    out.limit = Some(
                        v.parse()
                            .map_err(|_| bad("limit", format!("`{v}` is not an integer")))?,
                    )
                }
                "order" if v == "asc" || v == "desc" => out.order = Some(v),
                "order" => return Err(bad("order", "one of asc, desc".into())),
                "purpose" => out.purpose = Some(v),
                _ => match k
                    .strip_prefix("metadata[")
                    .and_then(|m| m.strip_suffix(']'))
                {
                    Some(key) if !key.is_empty() && key.len() <= 64 && v.len() <= 512 => {
                        if out.metadata.len() >= MAX_METADATA_FILTERS {
                            return Err(bad(
                                &k,
                                format!("at most {MAX_METADATA_FILTERS} metadata filters"),
                            ));
                        }
                        out.metadata.insert(key.to_string(), v);
                    }
                    Some(_) => {
                        return Err(bad(
                            &k,
                            "metadata keys are 1-64 characters, values at most 512".into(),
                        ))
                    }
                    None => return Err(bad(&k, format!("unknown query parameter `{k}`"))),
                },
            }
        }
        Ok(out)
    }

    /// The page asked for: `limit` in `1..=max_limit` (20 when absent), newest first unless
    /// `order=asc`, filtered by `filter` (see [`Page::filter`]).
    pub fn page(&self, max_limit: i64) -> ApiResult<Page> {
        let limit = self.limit.unwrap_or(20);
        if !(1..=max_limit).contains(&limit) {
            return Err(ApiError::invalid(
                format!("must be between 1 and {max_limit}"),
                Some("limit"),
                "invalid_limit",
            ));
        }
        Ok(Page {
            after: self.after.clone(),
            limit,
            ascending: self.order.as_deref() == Some("asc"),
            filter: None,
        })
    }

    /// Refuses the parameters this list does not take (all but `after` and `limit`, less
    /// those in `takes`).
    pub fn only(&self, takes: &[&str]) -> ApiResult<()> {
        let given = [
            ("order", self.order.is_some()),
            ("purpose", self.purpose.is_some()),
            ("metadata", !self.metadata.is_empty()),
        ];
        for (name, is) in given {
            if is && !takes.contains(&name) {
                let param = match name {
                    "metadata" => format!(
                        "metadata[{}]",
                        self.metadata
                            .keys()
                            .next()
                            .map(String::as_str)
                            .unwrap_or_default()
                    ),
                    n => n.to_string(),
                };
                return Err(ApiError::invalid(
                    format!("this list does not take `{param}`"),
                    Some(&param),
                    "invalid_query",
                ));
            }
        }
        Ok(())
    }
}

/// A page's cursor names no item of this list: a 404 naming `after`, not an empty page.
pub fn unknown_cursor(after: &str) -> ApiError {
    ApiError::not_found_param(
        format!("no item `{after}` in this list to continue after"),
        "after",
        "cursor_not_found",
    )
}

/// The list query of a request, parsed (see [`ListQuery`]).
pub struct ListParams(pub ListQuery);

impl<S: Send + Sync> FromRequestParts<S> for ListParams {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> ApiResult<Self> {
        ListQuery::parse(parts.uri.query().unwrap_or_default()).map(ListParams)
    }
}

/// A query-string extractor whose rejections name the parameter, in the error envelope.
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> ApiResult<Self> {
        let q = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(q.as_bytes()));
        serde_path_to_error::deserialize(de)
            .map(Query)
            .map_err(|e| {
                let path = e.path().to_string();
                let cause = e.into_inner().to_string();
                // Duplicate and unknown fields fail on the whole map: the name is in the text.
                let param = match path.as_str() {
                    "" | "." => cause.split('`').nth(1).map(str::to_string),
                    _ => Some(path),
                };
                ApiError::invalid(
                    format!("invalid query string: {cause}"),
                    param.as_deref(),
                    "invalid_query",
                )
            })
    }
}

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
            // Past the body limit: a 413, not a malformed body.
            Err(e) if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::from_status(e.status(), &e.body_text()))
            }
            Err(e) => {
                let text = e.body_text();
                let param = json_error_path(&text);
                Err(ApiError::invalid(text, param.as_deref(), "invalid_json"))
            }
        }
    }
}

/// The field a body's deserialisation error is about, from axum's message
/// (`… target type: messages[0].role: unknown variant …`); `None` for the body as a whole.
fn json_error_path(text: &str) -> Option<String> {
    let rest = text.split_once("target type: ")?.1;
    let (path, _) = rest.split_once(": ")?;
    let plain = |c: char| c.is_ascii_alphanumeric() || "_.[]".contains(c);
    (!path.is_empty() && path != "." && path.len() <= 256 && path.chars().all(plain))
        .then(|| path.to_string())
}
