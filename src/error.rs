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
    /// An error with a code and nothing else set; the constructors below add the rest.
    fn new(
        status: StatusCode,
        kind: &'static str,
        message: impl Into<String>,
        code: Option<&'static str>,
    ) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            param: None,
            code,
            retry_after: None,
        }
    }
    fn about(self, param: &str) -> Self {
        ApiError {
            param: Some(param.to_string()),
            ..self
        }
    }
    pub fn invalid(message: impl Into<String>, param: Option<&str>, code: &'static str) -> Self {
        ApiError {
            param: param.map(str::to_string),
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                message,
                Some(code),
            )
        }
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        let code = Some("invalid_api_key");
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            message,
            code,
        )
    }
    pub fn not_found(what: &str, id: &str) -> Self {
        let message = format!("no {what} `{id}`");
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            message,
            Some("not_found"),
        )
    }
    /// A 404 about one request field (a cursor that names nothing).
    pub fn not_found_param(message: impl Into<String>, param: &str, code: &'static str) -> Self {
        ApiError {
            param: Some(param.to_string()),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "not_found_error",
                message,
                Some(code),
            )
        }
    }
    pub fn conflict(message: impl Into<String>, code: &'static str) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict_error", message, Some(code))
    }
    pub fn too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the upload exceeds the limit of {limit} bytes"),
            Some("file_too_large"),
        )
        .about("file")
    }
    /// A `Range` outside an object of `size` bytes.
    pub fn range_not_satisfiable(size: u64) -> Self {
        Self::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "invalid_request_error",
            format!("the range is outside the artifact's {size} bytes"),
            Some("range_not_satisfiable"),
        )
        .about("Range")
    }
    /// A limit of the tenant's was reached: try again later.
    pub fn too_many(message: impl Into<String>, code: &'static str, retry_after: u64) -> Self {
        ApiError {
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                message,
                Some(code),
            )
        }
    }
    /// A server-side failure: logged with its cause, answered opaquely.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!("internal error: {cause}");
        let status = StatusCode::INTERNAL_SERVER_ERROR;
        Self::new(status, "server_error", "internal server error", None)
    }
    pub fn unavailable(what: &str) -> Self {
        let message = format!("{what} unavailable");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            message,
            Some("unavailable"),
        )
    }
}

impl ApiError {
    /// The envelope for an error answer that was not one (a framework rejection, a layer's
    /// limit): the kind follows the status, 4xx keep their one-line text.
    pub fn from_status(status: StatusCode, text: &str) -> Self {
        let text = if text.is_empty() || text.len() > 500 || status.is_server_error() {
            None
        } else {
            Some(text.to_string())
        };
        let (kind, code, default) = match status {
            StatusCode::NOT_FOUND => ("not_found_error", "unknown_route", "no such route".into()),
            StatusCode::METHOD_NOT_ALLOWED => (
                "invalid_request_error",
                "method_not_allowed",
                "method not allowed".into(),
            ),
            StatusCode::UNAUTHORIZED => (
                "authentication_error",
                "invalid_api_key",
                "authentication required".into(),
            ),
            StatusCode::FORBIDDEN => ("permission_error", "forbidden", "forbidden".into()),
            StatusCode::PAYLOAD_TOO_LARGE => (
                "invalid_request_error",
                "request_too_large",
                "the request body is too large".into(),
            ),
            StatusCode::REQUEST_TIMEOUT => (
                "invalid_request_error",
                "timeout",
                "the request took too long to arrive".into(),
            ),
            StatusCode::TOO_MANY_REQUESTS => (
                "rate_limit_error",
                "rate_limited",
                "too many requests".into(),
            ),
            s if s.is_server_error() => (
                "server_error",
                "server_error",
                s.canonical_reason().unwrap_or("server error").into(),
            ),
            s => (
                "invalid_request_error",
                "invalid_request",
                s.canonical_reason().unwrap_or("invalid request").into(),
            ),
        };
        Self::new(status, kind, text.unwrap_or(default), Some(code))
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
