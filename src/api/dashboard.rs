//! The dashboard: `static/` compiled into the binary (one self-contained file to deploy),
//! served at `/` and `/static/{file}` with an ETag per file and revalidation on every load,
//! so a new binary's dashboard is picked up at once while unchanged files cost a 304.

use axum::extract::Path;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::AppState;

const FILES: &[(&str, &str, &str)] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("../../static/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../../static/app.js"),
    ),
    (
        "api.js",
        "text/javascript; charset=utf-8",
        include_str!("../../static/api.js"),
    ),
    (
        "chart.js",
        "text/javascript; charset=utf-8",
        include_str!("../../static/chart.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../../static/style.css"),
    ),
];

/// The files are fixed at compile time: their ETags are computed once, on first use.
static ETAGS: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
    FILES
        .iter()
        .map(|(_, _, body)| {
            let sha = sparsegrad_engine::io::sha256_bytes(body.as_bytes());
            format!("\"{}\"", &sha[..16])
        })
        .collect()
});

pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/",
            get(|h: HeaderMap| async move { serve("index.html", &h) }),
        )
        .route(
            "/static/{file}",
            get(|Path(f): Path<String>, h: HeaderMap| async move { serve(&f, &h) }),
        )
}

fn serve(name: &str, headers: &HeaderMap) -> Response {
    let Some(i) = FILES.iter().position(|(n, _, _)| *n == name) else {
        return crate::error::ApiError::not_found("file", name).into_response();
    };
    let (_, ctype, body) = FILES[i];
    let etag = ETAGS[i].clone();
    let common = [
        (header::ETAG, etag.clone()),
        (header::CACHE_CONTROL, "no-cache".to_string()),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
        // Everything the page loads comes from here; nothing leaves the machine.
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; \
             style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"
                .to_string(),
        ),
    ];
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag))
    {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    (
        StatusCode::OK,
        common,
        [(header::CONTENT_TYPE, ctype.to_string())],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    /// Every file in static/ is served (a new file must be added to FILES).
    #[test]
    fn every_static_file_is_embedded() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("static");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        on_disk.sort();
        let mut served: Vec<String> = super::FILES.iter().map(|f| f.0.to_string()).collect();
        served.sort();
        assert_eq!(on_disk, served);
    }
}
