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
use crate::inference::{InferenceError, PredictRequest};
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
    let (delta, run) = succeeded_delta(&st, &job, "used for predictions").await?;
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
    let cache = st.cfg.data_dir.join("cache");
    let model_dir = materialize(&st.storage, &run.base, &cache.join("models"))
        .await
        .map_err(ApiError::internal)?;
    // Content-addressed: a delta never changes once stored.
    let local = cache
        .join("deltas")
        .join(format!("{}.safetensors", delta.sha256));
    if !local.exists() {
        st.storage
            .download_checked(&delta.object_key, &local, Some(&delta.sha256))
            .await?;
    }
    let preds = st
        .predictor
        .predict(PredictRequest {
            model_dir,
            delta: local,
            delta_sha256: delta.sha256,
            inputs: req.inputs,
            max_seq_len: run.max_seq_len,
            max_new_tokens: max_new,
        })
        .await
        .map_err(|e| match e {
            InferenceError::Engine(e) => {
                let f = UserFacing::from(&e);
                if !f.user_error {
                    return ApiError::internal(e);
                }
                ApiError::invalid(&f.reason, Some(&f.param_or("inputs")), "invalid_value")
            }
            other => ApiError::internal(other),
        })?;
    Ok(axum::Json(PredictionsObject {
        object: "fine_tuning.job.predictions",
        fine_tuning_job_id: id,
        data: preds,
    }))
}
