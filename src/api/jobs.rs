//! `/v1/fine_tuning/jobs`: create (with dry run and `Idempotency-Key`), list, get (with
//! queue position and ETA), cancel, events (cursor list or Server-Sent Events resumable with
//! `Last-Event-ID`), metrics, checkpoints, artifacts (downloads with `Range`), merge, predict.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use sparsegrad_engine::train::PredictInput;

use super::{list_body, AppState, Json, ListParams, Tenant};
use crate::db::jobs::{self as q, ArtifactRow, EventRow, JobRow};
use crate::db::{self, FileRow};
use crate::error::{ApiError, ApiResult};
use crate::jobs::{self, CreateJob, Invalid, Shape};
use crate::models::{self, BaseModel, ModelSource};
use crate::queue::{self, Cancelled, NewJob};
use crate::worker::{FileRef, JobSpec, MergeSpec};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/fine_tuning/jobs", post(create).get(list))
        .route("/fine_tuning/jobs/{id}", get(get_one))
        .route("/fine_tuning/jobs/{id}/cancel", post(cancel))
        .route("/fine_tuning/jobs/{id}/events", get(events))
        .route("/fine_tuning/jobs/{id}/metrics", get(metrics))
        .route("/fine_tuning/jobs/{id}/checkpoints", get(checkpoints))
        .route("/fine_tuning/jobs/{id}/artifacts", get(artifacts))
        .route(
            "/fine_tuning/jobs/{id}/artifacts/{artifact_id}/content",
            get(artifact_content),
        )
        .route("/fine_tuning/jobs/{id}/merge", post(merge))
        .route("/fine_tuning/jobs/{id}/predict", post(predict))
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        ApiError::invalid(e.message, Some(&e.param), "invalid_value")
    }
}

fn unix(t: &DateTime<Utc>) -> i64 {
    t.timestamp()
}

/// A base model by name: the tenant's registered ones, then the shared folder.
pub async fn find_model(st: &AppState, tenant: &str, name: &str) -> ApiResult<Option<BaseModel>> {
    if let Some(m) = db::models::get(&st.db, tenant, name).await? {
        return Ok(Some(BaseModel {
            id: m.id,
            architecture: m.architecture,
            config: m.config,
            source: ModelSource::Storage {
                prefix: m.object_prefix,
            },
        }));
    }
    let Some(dir) = st.cfg.models_dir.clone() else {
        return Ok(None);
    };
    let name = name.to_string();
    tokio::task::spawn_blocking(move || models::in_dir(&dir, &name))
        .await
        .map_err(ApiError::internal)
}

async fn input_file(st: &AppState, tenant: &str, id: &str, param: &str) -> ApiResult<FileRow> {
    db::get_file(&st.db, tenant, id)
        .await?
        .ok_or_else(|| ApiError::invalid(format!("no file `{id}`"), Some(param), "file_not_found"))
}

async fn create(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let req: CreateJob =
        serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(&body))
            .map_err(|e| {
                let path = e.path().to_string();
                let param = (path != ".").then_some(path);
                ApiError::invalid(e.into_inner().to_string(), param.as_deref(), "invalid_json")
            })?;
    jobs::check_request(&req)?;
    let resolved = jobs::resolve(req.method.as_ref(), req.seed)?;
    let model = find_model(&st, &tenant, &req.model).await?.ok_or_else(|| {
        ApiError::invalid(
            format!("no base model `{}` (see GET /v1/models)", req.model),
            Some("model"),
            "model_not_found",
        )
    })?;
    let train = input_file(&st, &tenant, &req.training_file, "training_file").await?;
    let valid = match &req.validation_file {
        Some(id) => {
            let v = input_file(&st, &tenant, id, "validation_file").await?;
            if v.task != train.task {
                return Err(ApiError::invalid(
                    format!(
                        "the validation file holds `{}` rows but the training file `{}` rows",
                        v.task, train.task
                    ),
                    Some("validation_file"),
                    "task_mismatch",
                ));
            }
            Some(v)
        }
        None => None,
    };
    let is_llama = model.architecture == "llama";
    if is_llama != (train.task == "causal-lm") {
        return Err(ApiError::invalid(
            format!(
                "a {} model cannot train on `{}` rows",
                model.architecture, train.task
            ),
            Some("training_file"),
            "task_mismatch",
        ));
    }
    let shape = Shape::from_config(&model.config).ok_or_else(|| {
        ApiError::invalid(
            "the model's config.json lacks its sizes",
            Some("model"),
            "invalid_model",
        )
    })?;
    let history = q::secs_per_token(&st.db, &req.model).await?;
    let estimate = jobs::estimate(
        &shape,
        &resolved,
        train.rows as u64,
        train.bytes as u64,
        history,
    );
    let method =
        json!({"type": resolved.method.name(), "hyperparameters": resolved.hyperparameters});
    if req.dry_run {
        return Ok(axum::Json(json!({
            "object": "fine_tuning.job.estimate",
            "model": req.model,
            "method": method,
            "training_file": train.id,
            "validation_file": valid.as_ref().map(|v| &v.id),
            "estimate": estimate,
        }))
        .into_response());
    }
    let key = match headers.get("idempotency-key") {
        Some(v) => {
            let k = v.to_str().unwrap_or_default();
            if k.is_empty() || k.len() > 255 {
                return Err(ApiError::invalid(
                    "Idempotency-Key must be 1-255 visible ASCII characters",
                    Some("Idempotency-Key"),
                    "invalid_idempotency_key",
                ));
            }
            Some(k.to_string())
        }
        None => None,
    };
    let spec = JobSpec {
        base: model.source.clone(),
        model: req.model.clone(),
        training_file: FileRef {
            id: train.id.clone(),
            object_key: train.object_key.clone(),
        },
        validation_file: valid.as_ref().map(|v| FileRef {
            id: v.id.clone(),
            object_key: v.object_key.clone(),
        }),
        method: resolved.method.clone(),
        train: resolved.train.clone(),
        max_seq_len: resolved.max_seq_len,
        task: req.task.clone(),
    };
    let mut spec = serde_json::to_value(&spec).map_err(ApiError::internal)?;
    spec["api"] = json!({
        "method": method,
        "seed": resolved.train.seed,
        "suffix": req.suffix,
        "metadata": req.metadata.clone().unwrap_or_default(),
        "estimate": estimate,
        "request_sha256": sparsegrad_engine::checkpoint::sha256_bytes(&body),
    });
    let new = NewJob {
        idempotency_key: key,
        max_attempts: st.cfg.max_attempts,
        ..NewJob::fine_tune(&db::new_id("ftjob"), &tenant, spec)
    };
    let (job, created) = queue::enqueue(&st.db, &new).await?;
    if !created && job.spec["api"]["request_sha256"] != new.spec["api"]["request_sha256"] {
        return Err(ApiError::conflict(
            "this Idempotency-Key was used for a different request",
            "idempotency_key_reused",
        ));
    }
    let row = q::get(&st.db, &tenant, &job.id, "fine_tune")
        .await?
        .ok_or_else(|| ApiError::internal("job vanished after enqueue"))?;
    let body = job_object(&st, &row).await?;
    let mut resp = (StatusCode::OK, axum::Json(body)).into_response();
    if !created {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

fn merge_object(m: &JobRow) -> Value {
    json!({
        "id": m.id,
        "object": "fine_tuning.job.merge",
        "job_id": m.parent_id,
        "status": m.status,
        "created_at": unix(&m.created_at),
        "finished_at": m.finished_at.as_ref().map(unix),
        "error": m.error,
        "result_files": m.result.as_ref().and_then(|r| r.get("result_files")).cloned(),
    })
}

/// What a job object needs beyond its row, fetched for a whole page at once.
#[derive(Default)]
struct Extras {
    queued: std::collections::HashMap<String, (i64, f64)>,
    merges: std::collections::HashMap<String, JobRow>,
}

async fn extras(st: &AppState, rows: &[JobRow]) -> ApiResult<Extras> {
    let queued: Vec<String> = rows
        .iter()
        .filter(|r| r.status == "queued")
        .map(|r| r.id.clone())
        .collect();
    let mut x = Extras::default();
    if !queued.is_empty() {
        for (id, pos, eta) in q::queue_positions(&st.db, &queued).await? {
            x.queued.insert(id, (pos, eta));
        }
    }
    let succeeded: Vec<String> = rows
        .iter()
        .filter(|r| r.status == "succeeded")
        .map(|r| r.id.clone())
        .collect();
    if !succeeded.is_empty() {
        for m in q::merges_of(&st.db, &succeeded).await? {
            if let Some(p) = m.parent_id.clone() {
                x.merges.insert(p, m);
            }
        }
    }
    Ok(x)
}

/// One job as users see it.
async fn job_object(st: &AppState, j: &JobRow) -> ApiResult<Value> {
    let x = extras(st, std::slice::from_ref(j)).await?;
    Ok(render(j, &x))
}

fn render(j: &JobRow, x: &Extras) -> Value {
    let api = &j.spec["api"];
    let queued = x.queued.get(&j.id);
    let queue_position = queued.map(|q| q.0);
    let now = Utc::now();
    let estimated_finish = match j.status.as_str() {
        "queued" => queued.map(|q| now.timestamp() + q.1.ceil() as i64),
        "running" | "cancelling" => {
            let p = j.progress.as_ref();
            let step = p.and_then(|p| p["step"].as_f64()).unwrap_or(0.0);
            let total = p.and_then(|p| p["total_steps"].as_f64()).unwrap_or(0.0);
            let elapsed = p.and_then(|p| p["elapsed_secs"].as_f64()).unwrap_or(0.0);
            let at = j.heartbeat_at.unwrap_or(now).timestamp();
            if step > 0.0 && total >= step {
                Some(at + (elapsed / step * (total - step)).ceil() as i64)
            } else {
                api["estimate"]["duration_secs"]
                    .as_f64()
                    .map(|d| j.started_at.unwrap_or(now).timestamp() + d.ceil() as i64)
            }
        }
        _ => None,
    };
    let merge = x.merges.get(&j.id);
    let result = j.result.as_ref();
    let progress = j.progress.as_ref();
    let trained_steps = result
        .and_then(|r| r.get("trained_steps"))
        .or_else(|| progress.and_then(|p| p.get("step")))
        .cloned();
    let trained_tokens = result
        .and_then(|r| r.get("trained_tokens"))
        .or_else(|| progress.and_then(|p| p.get("tokens")))
        .cloned();
    let model = j.spec["model"].as_str().unwrap_or_default();
    let fine_tuned_model = (j.status == "succeeded").then(|| match api["suffix"].as_str() {
        Some(s) => format!("ft:{model}:{s}:{}", j.id),
        None => format!("ft:{model}:{}", j.id),
    });
    json!({
        "id": j.id,
        "object": "fine_tuning.job",
        "model": model,
        "base_model": model,
        "created_at": unix(&j.created_at),
        "started_at": j.started_at.as_ref().map(unix),
        "finished_at": j.finished_at.as_ref().map(unix),
        "status": j.status,
        "training_file": j.spec["training_file"]["id"],
        "validation_file": j.spec["validation_file"]["id"],
        "method": api["method"],
        "seed": api["seed"],
        "suffix": api["suffix"],
        "metadata": api["metadata"],
        "task": j.spec["task"],
        "progress": j.progress,
        "trained_steps": trained_steps,
        "trained_tokens": trained_tokens,
        "estimate": api["estimate"],
        "queue_position": queue_position,
        "estimated_finish": estimated_finish,
        "attempt": j.attempt,
        "max_attempts": j.max_attempts,
        "error": j.error,
        "result": j.result,
        "result_files": result.and_then(|r| r.get("result_files")).cloned().unwrap_or(json!([])),
        "fine_tuned_model": fine_tuned_model,
        "merge": merge.map(merge_object),
    })
}

async fn job_for(st: &AppState, tenant: &str, id: &str) -> ApiResult<JobRow> {
    q::get(&st.db, tenant, id, "fine_tune")
        .await?
        .ok_or_else(|| ApiError::not_found("fine-tuning job", id))
}

async fn list(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Query(p): ListParams,
) -> ApiResult<axum::Json<Value>> {
    let (rows, more) = q::list(&st.db, &tenant, &p.page()?).await?;
    let x = extras(&st, &rows).await?;
    Ok(axum::Json(list_body(
        rows.iter().map(|r| render(r, &x)).collect(),
        more,
    )))
}

async fn get_one(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let j = job_for(&st, &tenant, &id).await?;
    Ok(axum::Json(job_object(&st, &j).await?))
}

async fn cancel(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    match queue::cancel(&st.db, &tenant, &id).await? {
        Cancelled::NotFound => return Err(ApiError::not_found("fine-tuning job", &id)),
        Cancelled::Now | Cancelled::Requested | Cancelled::AlreadyFinal => {}
    }
    let j = job_for(&st, &tenant, &id).await?;
    Ok(axum::Json(job_object(&st, &j).await?))
}

fn event_object(e: &EventRow) -> Value {
    json!({
        "id": format!("ev_{}", e.id),
        "object": "fine_tuning.job.event",
        "created_at": unix(&e.created_at),
        "level": e.level,
        "type": e.kind,
        "message": e.message,
        "data": e.data,
    })
}

fn event_cursor(s: &str, param: &str) -> ApiResult<i64> {
    s.strip_prefix("ev_").unwrap_or(s).parse().map_err(|_| {
        ApiError::invalid(
            format!("not an event id: `{s}`"),
            Some(param),
            "invalid_cursor",
        )
    })
}

fn is_final(status: &str) -> bool {
    matches!(status, "succeeded" | "failed" | "cancelled")
}

async fn events(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Path(id): Path<String>,
    Query(p): ListParams,
    headers: HeaderMap,
) -> ApiResult<Response> {
    job_for(&st, &tenant, &id).await?;
    let wants_stream = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if !wants_stream {
        let page = p.page()?;
        let after = page
            .after
            .as_deref()
            .map(|a| event_cursor(a, "after"))
            .transpose()?;
        let (rows, more) = q::events(&st.db, &id, after, page.limit, true).await?;
        return Ok(
            axum::Json(list_body(rows.iter().map(event_object).collect(), more)).into_response(),
        );
    }
    // Resume after the last event the client saw (header), or the `after` cursor.
    let after = match headers.get("last-event-id").and_then(|v| v.to_str().ok()) {
        Some(v) => Some(event_cursor(v, "Last-Event-ID")?),
        None => p
            .after
            .as_deref()
            .map(|a| event_cursor(a, "after"))
            .transpose()?,
    };
    Ok(Sse::new(event_stream(st, tenant, id, after.unwrap_or(0)))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// Events in order as they are written; ends once the job is final and everything is sent.
fn event_stream(
    st: AppState,
    tenant: String,
    job_id: String,
    after: i64,
) -> impl futures::Stream<Item = Result<SseEvent, std::convert::Infallible>> {
    struct S {
        st: AppState,
        tenant: String,
        job_id: String,
        after: i64,
        buf: std::collections::VecDeque<EventRow>,
        last_poll_empty_and_final: bool,
    }
    let s = S {
        st,
        tenant,
        job_id,
        after,
        buf: Default::default(),
        last_poll_empty_and_final: false,
    };
    futures::stream::unfold(s, |mut s| async move {
        loop {
            if let Some(e) = s.buf.pop_front() {
                let ev = SseEvent::default()
                    .id(format!("ev_{}", e.id))
                    .data(event_object(&e).to_string());
                return Some((Ok(ev), s));
            }
            if s.last_poll_empty_and_final {
                return None;
            }
            // Status first, then events: a final status seen here means every event the
            // worker wrote before settling is visible to the query that follows.
            let status = match q::get(&s.st.db, &s.tenant, &s.job_id, "fine_tune").await {
                Ok(Some(j)) => j.status,
                Ok(None) => return None,
                Err(e) => {
                    tracing::warn!("event stream: {e}");
                    return None;
                }
            };
            match q::events(&s.st.db, &s.job_id, Some(s.after), 200, false).await {
                Ok((rows, _)) if !rows.is_empty() => {
                    s.after = rows.last().map(|r| r.id).unwrap_or(s.after);
                    s.buf.extend(rows);
                }
                Ok(_) if is_final(&status) => s.last_poll_empty_and_final = true,
                Ok(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                Err(e) => {
                    tracing::warn!("event stream: {e}");
                    return None;
                }
            }
        }
    })
}

async fn metrics(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    job_for(&st, &tenant, &id).await?;
    let rows = q::metrics(&st.db, &id).await?;
    let data: Vec<Value> = rows
        .into_iter()
        .map(|m| {
            let mut v = json!({"object": "fine_tuning.job.metric", "type": m.kind, "step": m.step});
            if let (Some(o), Value::Object(d)) = (v.as_object_mut(), m.data) {
                for (k, x) in d {
                    o.entry(k).or_insert(x);
                }
            }
            v
        })
        .collect();
    Ok(axum::Json(list_body(data, false)))
}

async fn checkpoints(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    job_for(&st, &tenant, &id).await?;
    let rows = q::checkpoints(&st.db, &id).await?;
    let data = rows
        .iter()
        .map(|c| {
            json!({
                "id": c.id,
                "object": "fine_tuning.job.checkpoint",
                "fine_tuning_job_id": id,
                "step_number": c.step,
                "attempt": c.attempt,
                "bytes": c.bytes,
                "created_at": unix(&c.created_at),
            })
        })
        .collect();
    Ok(axum::Json(list_body(data, false)))
}

fn artifact_object(a: &ArtifactRow, job_id: &str) -> Value {
    json!({
        "id": a.id,
        "object": "fine_tuning.job.artifact",
        "fine_tuning_job_id": job_id,
        "kind": a.kind,
        "name": a.name,
        "bytes": a.bytes,
        "sha256": a.sha256,
        "created_at": unix(&a.created_at),
        "content_url": format!("/v1/fine_tuning/jobs/{job_id}/artifacts/{}/content", a.id),
    })
}

/// The job's own artifacts and those of its merge.
async fn all_artifacts(st: &AppState, job: &JobRow) -> ApiResult<Vec<ArtifactRow>> {
    let mut rows = q::artifacts(&st.db, &job.id).await?;
    if let Some(m) = q::merge_of(&st.db, &job.id).await? {
        rows.extend(q::artifacts(&st.db, &m.id).await?);
    }
    Ok(rows)
}

async fn artifacts(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let job = job_for(&st, &tenant, &id).await?;
    let rows = all_artifacts(&st, &job).await?;
    Ok(axum::Json(list_body(
        rows.iter().map(|a| artifact_object(a, &id)).collect(),
        false,
    )))
}

/// `bytes=a-b`, `bytes=a-` or `bytes=-n` against an object of `size` bytes; `Err` when
/// unsatisfiable, `None` for forms we serve whole (several ranges).
fn parse_range(h: &str, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| ())?;
        if n == 0 {
            return Err(());
        }
        (size.saturating_sub(n), size.saturating_sub(1))
    } else {
        let s: u64 = a.parse().map_err(|_| ())?;
        let e: u64 = if b.is_empty() {
            size.saturating_sub(1)
        } else {
            b.parse::<u64>()
                .map_err(|_| ())?
                .min(size.saturating_sub(1))
        };
        (s, e)
    };
    if size == 0 || start >= size || start > end {
        return Err(());
    }
    Ok(Some((start, end)))
}

async fn artifact_content(
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
        .map(|h| parse_range(h, size));
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
        Some(Err(())) => Ok(Response::builder()
            .status(StatusCode::RANGE_NOT_SATISFIABLE)
            .header(header::CONTENT_RANGE, format!("bytes */{size}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(
                json!({"error": {"message": format!("the range is outside the artifact's {size} bytes"),
                       "type": "invalid_request_error", "param": "Range", "code": "range_not_satisfiable"}})
                .to_string(),
            ))
            .map_err(ApiError::internal)?),
        Some(Ok(Some((start, end)))) => {
            let bytes = st.storage.get_range(&art.object_key, start..end + 1).await?;
            base(StatusCode::PARTIAL_CONTENT, bytes.len() as u64)
                .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{size}"))
                .body(Body::from(bytes))
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

/// A succeeded job's stored delta and its base model (409 for a job that has not succeeded).
async fn succeeded_delta(
    st: &AppState,
    job: &JobRow,
    what: &str,
) -> ApiResult<(ArtifactRow, ModelSource)> {
    if job.status != "succeeded" {
        return Err(ApiError::conflict(
            format!(
                "the job is `{}`; only a succeeded job can be {what}",
                job.status
            ),
            "job_not_succeeded",
        ));
    }
    let delta = q::artifacts(&st.db, &job.id)
        .await?
        .into_iter()
        .find(|a| a.kind == "delta" && a.name == "delta.safetensors")
        .ok_or_else(|| ApiError::internal(format!("succeeded job {} has no delta", job.id)))?;
    let base = serde_json::from_value(job.spec["base"].clone()).map_err(ApiError::internal)?;
    Ok((delta, base))
}

async fn merge(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let job = job_for(&st, &tenant, &id).await?;
    let (delta, base) = succeeded_delta(&st, &job, "merged").await?;
    let spec = MergeSpec {
        base,
        model: job.spec["model"].as_str().unwrap_or_default().into(),
        delta_key: delta.object_key,
    };
    let new = NewJob {
        kind: "merge",
        parent_id: Some(job.id.clone()),
        max_attempts: st.cfg.max_attempts,
        ..NewJob::fine_tune(
            &db::new_id("merge"),
            &tenant,
            serde_json::to_value(&spec).map_err(ApiError::internal)?,
        )
    };
    let (m, created) = queue::enqueue_merge(&st.db, &new).await?;
    let row = q::get(&st.db, &tenant, &m.id, "merge")
        .await?
        .ok_or_else(|| ApiError::internal("merge vanished after enqueue"))?;
    let status = if created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(merge_object(&row))).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PredictRequest {
    inputs: Vec<PredictInput>,
    #[serde(default)]
    max_new_tokens: Option<usize>,
}

/// Most inputs one request may carry (the endpoint is for checking a delta, not serving).
const MAX_PREDICT_INPUTS: usize = 16;

async fn predict(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Path(id): Path<String>,
    Json(req): Json<PredictRequest>,
) -> ApiResult<axum::Json<Value>> {
    let job = job_for(&st, &tenant, &id).await?;
    let (delta, base) = succeeded_delta(&st, &job, "used for predictions").await?;
    if req.inputs.is_empty() || req.inputs.len() > MAX_PREDICT_INPUTS {
        return Err(ApiError::invalid(
            format!("give 1 to {MAX_PREDICT_INPUTS} inputs"),
            Some("inputs"),
            "invalid_value",
        ));
    }
    let max_new = req.max_new_tokens.unwrap_or(32);
    if max_new == 0 || max_new > 256 {
        return Err(ApiError::invalid(
            "must be between 1 and 256",
            Some("max_new_tokens"),
            "invalid_value",
        ));
    }
    let cache = st.cfg.data_dir.join("cache");
    let model_dir = models::materialize(&st.storage, &base, &cache.join("models"))
        .await
        .map_err(ApiError::internal)?;
    // Content-addressed: a delta never changes once stored.
    let local = cache
        .join("deltas")
        .join(format!("{}.safetensors", delta.sha256));
    if !local.exists() {
        st.storage.download(&delta.object_key, &local).await?;
    }
    let max_len = job.spec["max_seq_len"].as_u64().unwrap_or(128) as usize;
    let inputs = req.inputs;
    let cache = st.predict_cache.clone();
    // Loading and running a model: a blocking thread.
    let preds = tokio::task::spawn_blocking(move || {
        let l = cache.get(&model_dir, &local, &delta.sha256)?;
        sparsegrad_engine::train::predict(
            &l.model,
            &l.tok,
            l.labels.as_ref(),
            &inputs,
            max_len,
            max_new,
        )
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(|e| match e {
        sparsegrad_engine::Error::Param {
            param,
            reason: message,
        } => ApiError::invalid(message, Some(&param), "invalid_value"),
        e if e.is_user_error() => ApiError::invalid(e.to_string(), Some("inputs"), "invalid_value"),
        e => ApiError::internal(e),
    })?;
    Ok(axum::Json(json!({
        "object": "fine_tuning.job.predictions",
        "fine_tuning_job_id": id,
        "data": preds,
    })))
}

/// Base + delta, loaded for predictions.
pub struct Loaded {
    model: sparsegrad_engine::models::Model,
    tok: sparsegrad_engine::data::TextTokenizer,
    labels: Option<sparsegrad_engine::data::LabelMap>,
}

/// The last base + delta predict loaded, kept while the same delta is asked for (the
/// dashboard's predict box asks again and again; loading dominates a small request). One
/// model stays resident at most.
#[derive(Default)]
pub struct PredictCache {
    last: std::sync::Mutex<Option<(String, std::sync::Arc<Loaded>)>>,
    loads: std::sync::atomic::AtomicUsize,
}

impl PredictCache {
    /// How many times a model was loaded (not found in the cache).
    pub fn loads(&self) -> usize {
        self.loads.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn get(
        &self,
        model_dir: &std::path::Path,
        delta: &std::path::Path,
        delta_sha: &str,
    ) -> sparsegrad_engine::Result<std::sync::Arc<Loaded>> {
        let key = format!("{}\n{delta_sha}", model_dir.display());
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((k, l)) = last.as_ref() {
            if *k == key {
                return Ok(l.clone());
            }
        }
        // Loading under the lock: two requests for a new delta load it once.
        let art = sparsegrad_engine::artifact::Artifact::load(delta)?;
        let (model, tok, labels) = sparsegrad_engine::pipeline::load_for_inference(
            model_dir,
            Some(&art),
            None,
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )?;
        self.loads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let l = std::sync::Arc::new(Loaded { model, tok, labels });
        *last = Some((key, l.clone()));
        Ok(l)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Ok(Some((0, 9))));
        assert_eq!(parse_range("bytes=90-", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=-10", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=-500", 100), Ok(Some((0, 99))));
        assert_eq!(parse_range("bytes=50-500", 100), Ok(Some((50, 99))));
        assert_eq!(parse_range("bytes=100-", 100), Err(()));
        assert_eq!(parse_range("bytes=5-2", 100), Err(()));
        assert_eq!(parse_range("bytes=-0", 100), Err(()));
        assert_eq!(parse_range("bytes=x-1", 100), Err(()));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Ok(None));
        assert_eq!(parse_range("items=0-1", 100), Ok(None));
    }
}
