//! What a job produced: its training curves, checkpoints and artifacts (its own and its
//! merge's), and artifact downloads — whole, or one `Range`.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use http_range_header::{parse_range_header, RangeInvalid, RangeUnsatisfiableError};

use super::job_for;
use crate::api::objects::{ArtifactObject, CheckpointObject, List, MetricObject};
use crate::api::{AppState, Tenant};
use crate::db::job_records::{self as records, ArtifactRow, JobRow};
use crate::domain::MetricKind;
use crate::error::{ApiError, ApiResult};

pub(super) async fn metrics(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<List<MetricObject>>> {
    job_for(&st, &tenant, &id).await?;
    let rows = records::metrics(&st.db, &id).await?;
    let data = rows.into_iter().map(MetricObject::from).collect();
    Ok(axum::Json(List::new(data, false)))
}

pub(super) async fn checkpoints(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<List<CheckpointObject>>> {
    let job = job_for(&st, &tenant, &id).await?;
    let model = job.spec["model"].as_str().unwrap_or_default().to_string();
    let rows = records::checkpoints(&st.db, &id).await?;
    // OpenAI's checkpoints carry the training loss at their step: from the job's curve.
    let losses: std::collections::HashMap<i32, f64> = records::metrics(&st.db, &id)
        .await?
        .into_iter()
        .filter(|m| m.kind == MetricKind::Train)
        .filter_map(|m| Some((m.step, m.data.get("loss")?.as_f64()?)))
        .collect();
    let data = rows
        .iter()
        .map(|c| CheckpointObject::new(c, &id, &model, losses.get(&c.step).copied()))
        .collect();
    Ok(axum::Json(List::new(data, false)))
}

/// The job's own artifacts and those of its merge.
async fn all_artifacts(st: &AppState, job: &JobRow) -> ApiResult<Vec<ArtifactRow>> {
    let mut rows = records::artifacts(&st.db, &job.id).await?;
    if let Some(m) = records::merge_of(&st.db, &job.id).await? {
        rows.extend(records::artifacts(&st.db, &m.id).await?);
    }
    Ok(rows)
}

pub(super) async fn artifacts(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<List<ArtifactObject>>> {
    let job = job_for(&st, &tenant, &id).await?;
    let rows = all_artifacts(&st, &job).await?;
    let data = rows.iter().map(|a| ArtifactObject::new(a, &id)).collect();
    Ok(axum::Json(List::new(data, false)))
}

/// A `Range` header against an object of `size` bytes: one range to serve (`start`, `end`
/// inclusive), `None` to serve it whole (no byte range, or several ranges), `Err` when it
/// cannot be satisfied (416).
fn byte_range(h: &str, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let parsed = match parse_range_header(h.trim()) {
        Ok(p) => p,
        // Another unit than bytes: the whole object, as RFC 9110 allows.
        Err(RangeUnsatisfiableError::Invalid(RangeInvalid::DoesNotStartWithToken)) => {
            return Ok(None)
        }
        Err(_) => return Err(()),
    };
    if parsed.len() != 1 {
        return Ok(None);
    }
    match parsed.validate(size) {
        Ok(r) => match r.first() {
            Some(r) => Ok(Some((*r.start(), *r.end()))),
            None => Err(()),
        },
        Err(_) => Err(()),
    }
}

pub(super) async fn artifact_content(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Path((id, artifact_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let job = job_for(&st, &tenant, &id).await?;
    let art = all_artifacts(&st, &job)
        .await?
        .into_iter()
        .find(|a| a.id == artifact_id)
        .ok_or_else(|| ApiError::not_found("artifact", &artifact_id))?;
    let size = art.bytes as u64;
    let disposition = format!("attachment; filename=\"{}\"", art.name.replace('"', ""));
    let etag = format!("\"{}\"", art.sha256);
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(|h| byte_range(h, size));
    let base = |status: StatusCode, len: u64| {
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, len)
            .header(header::ACCEPT_RANGES, "bytes")
            .header(header::ETAG, etag.clone())
            .header(header::CONTENT_DISPOSITION, disposition.clone())
    };
    match range {
        Some(Err(())) => {
            let mut resp = ApiError::range_not_satisfiable(size).into_response();
            resp.headers_mut().insert(
                header::CONTENT_RANGE,
                format!("bytes */{size}")
                    .parse()
                    .map_err(ApiError::internal)?,
            );
            Ok(resp)
        }
        Some(Ok(Some((start, end)))) => {
            // Streamed like the whole object: `bytes=0-` of a merged model is no smaller.
            let stream = st
                .storage
                .get_range_stream(&art.object_key, start..end + 1)
                .await?;
            base(StatusCode::PARTIAL_CONTENT, end + 1 - start)
                .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{size}"))
                .body(Body::from_stream(stream))
                .map_err(ApiError::internal)
        }
        _ => {
            let (len, stream) = st.storage.get_stream(&art.object_key).await?;
            base(StatusCode::OK, len)
                .body(Body::from_stream(stream))
                .map_err(ApiError::internal)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::byte_range;

    #[test]
    fn ranges() {
        assert_eq!(byte_range("bytes=0-9", 100), Ok(Some((0, 9))));
        assert_eq!(byte_range("bytes=90-", 100), Ok(Some((90, 99))));
        assert_eq!(byte_range("bytes=-10", 100), Ok(Some((90, 99))));
        assert_eq!(byte_range("bytes=-500", 100), Ok(Some((0, 99))));
        assert_eq!(byte_range("bytes=50-500", 100), Ok(Some((50, 99))));
        assert_eq!(byte_range("bytes=100-", 100), Err(()));
        assert_eq!(byte_range("bytes=5-2", 100), Err(()));
        assert_eq!(byte_range("bytes=-0", 100), Err(()));
        assert_eq!(byte_range("bytes=x-1", 100), Err(()));
        assert_eq!(byte_range("bytes=0-1,5-6", 100), Ok(None));
        assert_eq!(byte_range("items=0-1", 100), Ok(None));
    }
}
