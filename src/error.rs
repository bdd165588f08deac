//! The API's one error type and its JSON envelope:
//! `{"error": {"message", "type", "param", "code"}}`. Internal causes are logged, never sent.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds a client should wait before trying again (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&str>, code: &'static str) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param: param.map(str::to_string),
            code: Some(code),
            retry_after: None,
        }
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            kind: "authentication_error",
            message: message.into(),
            param: None,
            code: Some("invalid_api_key"),
            retry_after: None,
        }
    }
    pub fn not_found(what: &str, id: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "not_found_error",
            message: format!("no {what} `{id}`"),
            param: None,
            code: Some("not_found"),
            retry_after: None,
        }
    }
    pub fn conflict(message: impl Into<String>, code: &'static str) -> Self {
        ApiError {
            status: StatusCode::CONFLICT,
            kind: "conflict_error",
            message: message.into(),
            param: None,
            code: Some(code),
            retry_after: None,
        }
    }
    pub fn too_large(limit: u64) -> Self {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            kind: "invalid_request_error",
            message: format!("the upload exceeds the limit of {limit} bytes"),
            param: Some("file".into()),
            code: Some("file_too_large"),
            retry_after: None,
        }
    }
    /// A `Range` outside an object of `size` bytes.
    pub fn range_not_satisfiable(size: u64) -> Self {
        ApiError {
            status: StatusCode::RANGE_NOT_SATISFIABLE,
            kind: "invalid_request_error",
            message: format!("the range is outside the artifact's {size} bytes"),
            param: Some("Range".into()),
            code: Some("range_not_satisfiable"),
            retry_after: None,
        }
    }
    /// A limit of the tenant's was reached: try again later.
    pub fn too_many(message: impl Into<String>, code: &'static str, retry_after: u64) -> Self {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            kind: "rate_limit_error",
            message: message.into(),
            param: None,
            code: Some(code),
            retry_after: Some(retry_after),
        }
    }
    /// A server-side failure: logged with its cause, answered opaquely.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!("internal error: {cause}");
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "server_error",
            message: "internal server error".into(),
            param: None,
            code: None,
            retry_after: None,
        }
    }
    pub fn unavailable(what: &str) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "server_error",
            message: format!("{what} unavailable"),
            param: None,
            code: Some("unavailable"),
            retry_after: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }});
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        resp
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        // Text Postgres cannot store (a NUL byte) came from the request, not from us.
        if let sqlx::Error::Database(d) = &e {
            if d.code().as_deref() == Some("22021") {
                return ApiError::invalid(
                    "a value in the request holds a NUL byte",
                    None,
                    "invalid_text",
                );
            }
        }
        ApiError::internal(format!("database: {e}"))
    }
}

impl From<crate::storage::StorageError> for ApiError {
    fn from(e: crate::storage::StorageError) -> Self {
        match e {
            crate::storage::StorageError::NotFound(k) => ApiError::not_found("object", &k),
            other => ApiError::internal(other),
        }
    }
}

impl From<crate::queue::QueueError> for ApiError {
    fn from(e: crate::queue::QueueError) -> Self {
        match e {
            crate::queue::QueueError::Quota { active, limit } => ApiError::too_many(
                format!(
                    "{active} of your jobs are queued or running; at most {limit} may be at \
                     once: wait for one to finish or cancel one"
                ),
                "too_many_active_jobs",
                60,
            ),
            e => ApiError::internal(e),
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
