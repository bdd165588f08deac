//! Using a succeeded fine-tune: merging its delta into the base model (a job on the same
//! queue), and predictions with base + delta (see `crate::inference`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sparsegrad_engine::train::{PredictInput, Prediction};

use super::job_for;
use crate::api::objects::{MergeObject, PredictionsObject};
use crate::api::{AppState, Json, Tenant};
use crate::db::job_records::{self as records, ArtifactRow, JobRow};
use crate::db::new_id;
use crate::domain::{ArtifactKind, FineTune, JobKind, JobStatus, MergeSpec, UserFacing};
use crate::error::{ApiError, ApiResult};
use crate::inference::{Busy, InferenceError, ModelKey, PredictRequest};
use crate::queue::{self, NewJob};
use crate::storage::local_copy::materialize;

/// A succeeded job's stored delta and what it trained (409 for a job that has not succeeded).
async fn succeeded_delta(
    st: &AppState,
    job: &JobRow,
    what: &str,
) -> ApiResult<(ArtifactRow, FineTune)> {
    if job.status != JobStatus::Succeeded {
        return Err(ApiError::conflict(
            format!(
                "the job is `{}`; only a succeeded job can be {what}",
                job.status
            ),
            "job_not_succeeded",
        ));
    }
    let delta = records::artifacts(&st.db, &job.id)
        .await?
        .into_iter()
        .find(|a| a.kind == ArtifactKind::Delta && a.name == "delta.safetensors")
        .ok_or_else(|| ApiError::internal(format!("succeeded job {} has no delta", job.id)))?;
    let run: FineTune = serde_json::from_value(job.spec.clone()).map_err(ApiError::internal)?;
    Ok((delta, run))
}

pub(super) async fn merge(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let job = job_for(&st, &tenant, &id).await?;
    let (delta, run) = succeeded_delta(&st, &job, "merged").await?;
    let spec = MergeSpec {
        base: run.base,
        model: run.model,
        delta_key: delta.object_key,
    };
    let new = NewJob {
        max_attempts: st.cfg.max_attempts,
        active_limit: Some(st.cfg.max_active_jobs),
        ..NewJob::merge(
            &new_id("merge"),
            &tenant,
            &job.id,
            serde_json::to_value(&spec).map_err(ApiError::internal)?,
        )
    };
    let (m, created) = queue::enqueue_merge(&st.db, &new).await?;
    let row = records::get(&st.db, &tenant, &m.id, JobKind::Merge)
        .await?
        .ok_or_else(|| ApiError::internal("merge vanished after enqueue"))?;
    let status = if created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(MergeObject::from(&row))).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PredictBody {
    inputs: Vec<PredictInput>,
    #[serde(default)]
    max_new_tokens: Option<usize>,
}

/// Most inputs one request may carry (the endpoint is for checking a delta, not serving).
const MAX_PREDICT_INPUTS: usize = 16;

pub(super) async fn predict(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Path(id): Path<String>,
    Json(req): Json<PredictBody>,
) -> ApiResult<axum::Json<PredictionsObject<Prediction>>> {
    let job = job_for(&st, &tenant, &id).await?;
    let (key, run) = served_key(&st, &job).await?;
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
    let _permit = st.gates.predict()?;
    let ticket = st.inference.admit(&tenant).map_err(busy)?;
    let preds = st
        .inference
        .predict(
            ticket,
            PredictRequest {
                key,
                inputs: req.inputs,
                max_seq_len: run.max_seq_len,
                max_new_tokens: max_new,
            },
        )
        .await
        .map_err(|e| inference_error(e, "inputs"))?;
    Ok(axum::Json(PredictionsObject {
        object: "fine_tuning.job.predictions",
        fine_tuning_job_id: id,
        data: preds,
    }))
}

/// The local files a succeeded fine-tune runs from: its base model folder and its delta
/// (downloaded once into the content-addressed cache; a delta never changes once stored).
pub(crate) async fn served_key(st: &AppState, job: &JobRow) -> ApiResult<(ModelKey, FineTune)> {
    let (delta, run) = succeeded_delta(st, job, "used for inference").await?;
    let cache = st.cfg.data_dir.join("cache");
    let model_dir = materialize(&st.storage, &run.base, &cache.join("models"))
        .await
        .map_err(ApiError::internal)?;
    let local = cache
        .join("deltas")
        .join(format!("{}.safetensors", delta.sha256));
    if !local.exists() {
        st.storage
            .download_checked(&delta.object_key, &local, Some(&delta.sha256))
            .await?;
    }
    let key = ModelKey {
        model_dir,
        delta: Some((local, delta.sha256)),
    };
    Ok((key, run))
}

/// The engine is full: 429 with a retry hint.
pub(crate) fn busy(b: Busy) -> ApiError {
    let code = if b.per_tenant {
        "too_many_inference_requests"
    } else {
        "server_busy"
    };
    ApiError::too_many(b.message, code, 2)
}

/// An engine error as the API answers it: the request's fault → 400 about `param` (or the
/// field the engine named), anything else → 500 with the cause logged.
pub(crate) fn inference_error(e: InferenceError, param: &str) -> ApiError {
    match e {
        InferenceError::Invalid { param, message } => {
            ApiError::invalid(message, Some(param), "invalid_value")
        }
        InferenceError::Engine(e) => {
            let f = UserFacing::from(&e);
            if !f.user_error {
                return ApiError::internal(e);
            }
            ApiError::invalid(&f.reason, Some(&f.param_or(param)), "invalid_value")
        }
        other => ApiError::internal(other),
    }
}
