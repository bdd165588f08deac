//! Dataset files: upload (validated row by row before anything is stored), list, get,
//! content, delete.

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::StreamExt;
use serde::Deserialize;

use super::objects::{Deleted, FileObject, List};
use super::{AppState, ListParams, Tenant};
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

/// Largest non-file multipart field (`purpose`).
const MAX_FIELD_BYTES: usize = 1024;

#[derive(Deserialize, Default)]
struct UploadQuery {
    purpose: Option<String>,
    filename: Option<String>,
}

/// Reads a body stream into memory, refusing it once it passes `limit`.
async fn read_limited(body: Body, limit: u64) -> ApiResult<Vec<u8>> {
    let mut out = Vec::new();
    let mut s = body.into_data_stream();
    while let Some(chunk) = s.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::invalid(format!("reading the body: {e}"), Some("file"), "bad_body")
        })?;
        if (out.len() + chunk.len()) as u64 > limit {
            return Err(ApiError::too_large(limit));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

async fn upload(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Query(q): Query<UploadQuery>,
    req: Request,
) -> ApiResult<Response> {
    let limit = st.cfg.max_upload_bytes;
    let is_multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let (mut purpose, mut filename) = (q.purpose, q.filename);
    let bytes = if is_multipart {
        let mut mp = Multipart::from_request(req, &st)
            .await
            .map_err(|e| ApiError::invalid(e.body_text(), Some("file"), "bad_multipart"))?;
        let mut data = None;
        while let Some(mut field) = mp
            .next_field()
            .await
            .map_err(|e| ApiError::invalid(e.body_text(), Some("file"), "bad_multipart"))?
        {
            match field.name() {
                Some("purpose") => {
                    // A small field: read with a cap, not whole.
                    let mut v = Vec::new();
                    while let Some(chunk) = field.chunk().await.map_err(|e| {
                        ApiError::invalid(e.body_text(), Some("purpose"), "bad_multipart")
                    })? {
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
                Some("file") => {
                    filename = filename.or(field.file_name().map(str::to_string));
                    let mut buf = Vec::new();
                    while let Some(chunk) = field.chunk().await.map_err(|e| {
                        ApiError::invalid(e.body_text(), Some("file"), "bad_multipart")
                    })? {
                        if (buf.len() + chunk.len()) as u64 > limit {
                            return Err(ApiError::too_large(limit));
                        }
                        buf.extend_from_slice(&chunk);
                    }
                    data = Some(buf);
                }
                _ => {}
            }
        }
        data.ok_or_else(|| ApiError::invalid("no `file` part", Some("file"), "missing_file"))?
    } else {
        read_limited(req.into_body(), limit).await?
    };
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
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid(
            "the file is empty",
            Some("file"),
            "empty_file",
        ));
    }
    // Validate every row before anything is stored (off the runtime: it parses the whole file).
    let (bytes, format, task, rows) =
        tokio::task::spawn_blocking(move || -> Result<_, sparsegrad_engine::Error> {
            let format = sparsegrad_engine::data::detect_format(&bytes);
            let recs = sparsegrad_engine::data::parse_records(&bytes)?;
            let (task, _) = sparsegrad_engine::data::infer_task(&recs, None)?;
            let rows = recs.len();
            Ok((bytes, format, task, rows))
        })
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| ApiError::invalid(e.to_string(), Some("file"), "invalid_file"))?;
    let len = bytes.len() as i64;
    let id = new_id("file");
    let key = keys::file(&tenant, &id);
    st.storage.put(&key, bytes.into()).await?;
    let row = FileRow {
        id,
        tenant_id: tenant,
        filename,
        purpose,
        bytes: len,
        format: format!("{format:?}").to_lowercase(),
        task: task.name().into(),
        rows: rows as i64,
        object_key: key.clone(),
        created_at: chrono::Utc::now(),
    };
    match datasets::insert(&st.db, &row).await {
        Ok(f) => Ok((axum::http::StatusCode::OK, axum::Json(FileObject::from(&f))).into_response()),
        Err(e) => {
            // No row, no object.
            let _ = st.storage.delete(&key).await;
            Err(e.into())
        }
    }
}

async fn list(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Query(q): ListParams,
) -> ApiResult<axum::Json<List<FileObject>>> {
    let (rows, more) = datasets::list(&st.db, &tenant, &q.page()?).await?;
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
    let bytes = st.storage.get(&f.object_key).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
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
