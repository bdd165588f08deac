//! Dataset files: upload (validated row by row before anything is stored), list, get,
//! content, delete.

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::StreamExt;
use serde::Deserialize;

use super::objects::{Deleted, FileObject, List};
use super::{unknown_cursor, AppState, ListParams, Query, Tenant};
use crate::db::datasets::{self, FileRow};
use crate::db::new_id;
use crate::error::{ApiError, ApiResult};
use crate::storage::keys;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/files", get(list).post(upload))
        .route("/files/{id}", get(get_one).delete(delete))
        .route("/files/{id}/content", get(content))
        // Uploads are bounded by `max_upload_bytes` below, not by axum's 2 MB default.
        .layer(axum::extract::DefaultBodyLimit::disable())
}

mod intake;

/// Largest non-file multipart field (`purpose`).
const MAX_FIELD_BYTES: usize = 1024;

#[derive(Deserialize, Default)]
struct UploadQuery {
    purpose: Option<String>,
    filename: Option<String>,
}

fn bad_multipart(e: axum::extract::multipart::MultipartError, field: &str) -> ApiError {
    ApiError::invalid(e.body_text(), Some(field), "bad_multipart")
}

/// Uploads stream: each chunk is validated and sent to storage as it arrives (see
/// [`intake`]), and the row is written only once the object is complete.
async fn upload(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Query(q): Query<UploadQuery>,
    req: Request,
) -> ApiResult<Response> {
    let _permit = st.gates.upload()?;
    let quota = st.cfg.max_stored_bytes;
    let used = datasets::stored_bytes(&st.db, &tenant).await?;
    let room = quota.saturating_sub(used.max(0) as u64);
    if room == 0 {
        return Err(over_quota(quota));
    }
    // Past the room left in the quota the answer is the quota's, past the size cap the cap's.
    let (limit, over_limit): (u64, fn(u64) -> ApiError) = if room < st.cfg.max_upload_bytes {
        (room, |_| over_quota_during_upload())
    } else {
        (st.cfg.max_upload_bytes, ApiError::too_large)
    };
    let id = new_id("file");
    let key = keys::file(&tenant, &id);
    let mut intake = intake::Intake::new(&st.storage, &key, limit, over_limit)?;
    let is_multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let (mut purpose, mut filename) = (q.purpose, q.filename);
    if is_multipart {
        let mut mp = Multipart::from_request(req, &st)
            .await
            .map_err(|e| ApiError::invalid(e.body_text(), Some("file"), "bad_multipart"))?;
        let mut got_file = false;
        while let Some(mut field) = mp
            .next_field()
            .await
            .map_err(|e| bad_multipart(e, "file"))?
        {
            match field.name() {
                Some("purpose") => {
                    // A small field: read with a cap, not whole.
                    let mut v = Vec::new();
                    while let Some(chunk) = field
                        .chunk()
                        .await
                        .map_err(|e| bad_multipart(e, "purpose"))?
                    {
                        if v.len() + chunk.len() > MAX_FIELD_BYTES {
                            return Err(ApiError::invalid(
                                format!("at most {MAX_FIELD_BYTES} bytes"),
                                Some("purpose"),
                                "field_too_large",
                            ));
                        }
                        v.extend_from_slice(&chunk);
                    }
                    purpose = Some(String::from_utf8_lossy(&v).into_owned());
                }
                Some("file") if !got_file => {
                    got_file = true;
                    filename = filename.or(field.file_name().map(str::to_string));
                    while let Some(chunk) =
                        field.chunk().await.map_err(|e| bad_multipart(e, "file"))?
                    {
                        intake.push(chunk).await?;
                    }
                }
                Some("file") => {
                    return Err(ApiError::invalid(
                        "more than one `file` part",
                        Some("file"),
                        "bad_multipart",
                    ))
                }
                _ => {}
            }
        }
        if !got_file {
            return Err(ApiError::invalid(
                "no `file` part",
                Some("file"),
                "missing_file",
            ));
        }
    } else {
        let mut body = req.into_body().into_data_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::invalid(format!("reading the body: {e}"), Some("file"), "bad_body")
            })?;
            intake.push(chunk).await?;
        }
    }
    let purpose = purpose.unwrap_or_else(|| "fine-tune".into());
    if purpose != "fine-tune" {
        return Err(ApiError::invalid(
            "only `fine-tune` is supported",
            Some("purpose"),
            "invalid_purpose",
        ));
    }
    // Stored as shown back: printable, and of a sane length.
    let filename: String = filename
        .unwrap_or_else(|| "upload.jsonl".into())
        .chars()
        .filter(|c| !c.is_control())
        .take(255)
        .collect();
    let filename = if filename.trim().is_empty() {
        "upload.jsonl".to_string()
    } else {
        filename
    };
    let checked = intake.finish().await?;
    let len = checked.writer.finish().await? as i64;
    let row = FileRow {
        id,
        tenant_id: tenant,
        filename,
        purpose,
        bytes: len,
        format: format!("{:?}", checked.file.format).to_lowercase(),
        task: checked.file.task.name().into(),
        rows: checked.file.rows as i64,
        object_key: key.clone(),
        created_at: chrono::Utc::now(),
    };
    // The quota is decided again with the row, under the tenant's lock: concurrent uploads
    // cannot together pass it.
    let inserted = datasets::insert_within_quota(&st.db, &row, quota as i64).await;
    match inserted {
        Ok(Some(f)) => {
            Ok((axum::http::StatusCode::OK, axum::Json(FileObject::from(&f))).into_response())
        }
        other => {
            // No row, no object.
            let _ = st.storage.delete(&key).await;
            match other {
                Err(e) => Err(e.into()),
                _ => Err(over_quota(quota)),
            }
        }
    }
}

fn over_quota(quota: u64) -> ApiError {
    ApiError::too_many(
        format!(
            "your stored files and fine-tuned models take the quota of {quota} bytes: \
             delete some to upload more"
        ),
        "storage_quota_exceeded",
        60,
    )
}

fn over_quota_during_upload() -> ApiError {
    ApiError::too_many(
        "this upload would pass your storage quota: delete some files to upload more",
        "storage_quota_exceeded",
        60,
    )
}

async fn list(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    ListParams(q): ListParams,
) -> ApiResult<axum::Json<List<FileObject>>> {
    q.only(&["order", "purpose"])?;
    // OpenAI's files list pages up to 10,000.
    let mut page = q.page(10_000)?;
    page.filter = q.purpose.clone().map(serde_json::Value::String);
    let (rows, more) = datasets::list(&st.db, &tenant, &page)
        .await?
        .ok_or_else(|| unknown_cursor(page.after.as_deref().unwrap_or_default()))?;
    Ok(axum::Json(List::new(
        rows.iter().map(FileObject::from).collect(),
        more,
    )))
}

async fn get_one(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<FileObject>> {
    let f = datasets::get(&st.db, &tenant, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("file", &id))?;
    Ok(axum::Json(FileObject::from(&f)))
}

async fn content(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let f = datasets::get(&st.db, &tenant, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("file", &id))?;
    // Streamed: a slow reader of a large file holds one chunk, not the file.
    let (size, chunks) = st.storage.get_stream(&f.object_key).await?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, size.to_string()),
        ],
        Body::from_stream(chunks),
    )
        .into_response())
}

async fn delete(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Deleted>> {
    let f = match datasets::delete(&st.db, &tenant, &id).await? {
        datasets::Deleted::Gone(f) => f,
        datasets::Deleted::NotFound => return Err(ApiError::not_found("file", &id)),
        datasets::Deleted::InUse(job) => {
            return Err(ApiError::conflict(
                format!("fine-tuning job `{job}` is queued or running on this file"),
                "file_in_use",
            ))
        }
    };
    st.storage.delete(&f.object_key).await?;
    Ok(axum::Json(Deleted {
        id: f.id,
        object: "file",
        deleted: true,
    }))
}
