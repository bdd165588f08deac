//! `GET /metrics` in Prometheus text format: jobs by kind and status, the runnable queue
//! depth, and a request-latency histogram per method, route template and status, recorded by
//! a middleware around every route. Served behind the admin key, or without auth on a
//! separate operator address (`--metrics-listen`).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::AppState;
use crate::error::ApiResult;

/// Upper bounds of the latency buckets, seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

/// Request latencies by `(method, route, status)`.
#[derive(Default)]
pub struct HttpMetrics {
    series: Mutex<BTreeMap<(String, String, u16), Histogram>>,
}

impl HttpMetrics {
    fn observe(&self, method: &str, route: &str, status: u16, secs: f64) {
        let mut s = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let h = s
            .entry((method.to_string(), route.to_string(), status))
            .or_default();
        for (c, b) in h.counts.iter_mut().zip(BUCKETS) {
            if secs <= b {
                *c += 1;
            }
        }
        h.sum += secs;
        h.count += 1;
    }

    fn render(&self, out: &mut String) {
        let name = "sparsegrad_http_request_duration_seconds";
        let _ = writeln!(out, "# HELP {name} HTTP request latency by route template.");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let s = self.series.lock().unwrap_or_else(|p| p.into_inner());
        for ((method, route, status), h) in s.iter() {
            let labels = format!("method=\"{method}\",route=\"{route}\",status=\"{status}\"");
            for (c, b) in h.counts.iter().zip(BUCKETS) {
                let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {c}");
            }
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum);
            let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count);
        }
    }
}

/// Times every request; the route is the matched template (`/v1/files/{id}`), so ids never
/// become label values.
pub async fn track(State(st): State<AppState>, req: Request, next: Next) -> Response {
    // Made-up methods would each become a series: they share one label.
    let method = match req.method().as_str() {
        m @ ("GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD" | "OPTIONS") => m.to_string(),
        _ => "OTHER".to_string(),
    };
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let t = Instant::now();
    let resp = next.run(req).await;
    st.http.observe(
        &method,
        &route,
        resp.status().as_u16(),
        t.elapsed().as_secs_f64(),
    );
    resp
}

/// `/metrics` on the API address: operators only (the admin key).
pub fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(admin_metrics))
}

/// `/metrics` alone, without auth, for an operator-only address.
pub fn operator_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .merge(super::health::probes())
        .with_state(state)
}

async fn admin_metrics(_: super::Admin, st: State<AppState>) -> ApiResult<Response> {
    metrics(st).await
}

async fn metrics(State(st): State<AppState>) -> ApiResult<Response> {
    let mut out = String::new();
    let _ = writeln!(out, "# HELP sparsegrad_jobs Jobs by kind and status.");
    let _ = writeln!(out, "# TYPE sparsegrad_jobs gauge");
    for (kind, status, n) in crate::db::job_records::status_counts(&st.db).await? {
        let _ = writeln!(
            out,
            "sparsegrad_jobs{{kind=\"{kind}\",status=\"{status}\"}} {n}"
        );
    }
    let depth = crate::db::job_records::runnable_now(&st.db).await?;
    let _ = writeln!(
        out,
        "# HELP sparsegrad_queue_depth Queued jobs runnable now."
    );
    let _ = writeln!(out, "# TYPE sparsegrad_queue_depth gauge");
    let _ = writeln!(out, "sparsegrad_queue_depth {depth}");
    st.http.render(&mut out);
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response())
}
