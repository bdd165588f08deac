//! Listing, reading and cancelling jobs, and the job object itself (with queue position,
//! ETA and merge, fetched for a whole page at once).

use std::collections::HashMap;

use axum::extract::{Path, State};
use chrono::Utc;

use super::job_for;
use crate::api::objects::{JobObject, List, MergeObject};
use crate::api::{AppState, ListParams, Query, Tenant};
use crate::db::job_records::{self as records, JobRow};
use crate::domain::{JobSpec, JobStatus};
use crate::error::{ApiError, ApiResult};
use crate::queue::{self, Cancelled};

/// What a job object needs beyond its row, fetched for a whole page at once.
#[derive(Default)]
struct Extras {
    queued: HashMap<String, (i64, f64)>,
    merges: HashMap<String, JobRow>,
}

async fn extras(st: &AppState, rows: &[JobRow]) -> ApiResult<Extras> {
    let ids = |s: JobStatus| -> Vec<String> {
        rows.iter()
            .filter(|r| r.status == s)
            .map(|r| r.id.clone())
            .collect()
    };
    let mut x = Extras::default();
    let queued = ids(JobStatus::Queued);
    if !queued.is_empty() {
        for (id, pos, eta) in queue::queue_positions(&st.db, &queued).await? {
            x.queued.insert(id, (pos, eta));
        }
    }
    let succeeded = ids(JobStatus::Succeeded);
    if !succeeded.is_empty() {
        for m in records::merges_of(&st.db, &succeeded).await? {
            if let Some(p) = m.parent_id.clone() {
                x.merges.insert(p, m);
            }
        }
    }
    Ok(x)
}

/// One job as users see it.
pub(super) async fn job_object(st: &AppState, j: &JobRow) -> ApiResult<JobObject> {
    let x = extras(st, std::slice::from_ref(j)).await?;
    render(j, &x)
}

fn render(j: &JobRow, x: &Extras) -> ApiResult<JobObject> {
    let spec: JobSpec = serde_json::from_value(j.spec.clone())
        .map_err(|e| ApiError::internal(format!("job {}: spec: {e}", j.id)))?;
    let (run, api) = (spec.run, spec.api);
    let queued = x.queued.get(&j.id);
    let now = Utc::now();
    let estimated_finish = match j.status {
        JobStatus::Queued => queued.map(|q| now.timestamp() + q.1.ceil() as i64),
        JobStatus::Running | JobStatus::Cancelling => {
            let p = j.progress.as_ref();
            let step = p.and_then(|p| p["step"].as_f64()).unwrap_or(0.0);
            let total = p.and_then(|p| p["total_steps"].as_f64()).unwrap_or(0.0);
            let elapsed = p.and_then(|p| p["elapsed_secs"].as_f64()).unwrap_or(0.0);
            let at = j.heartbeat_at.unwrap_or(now).timestamp();
            if step > 0.0 && total >= step {
                Some(at + (elapsed / step * (total - step)).ceil() as i64)
            } else {
                Some(
                    j.started_at.unwrap_or(now).timestamp()
                        + api.estimate.duration_secs.ceil() as i64,
                )
            }
        }
        _ => None,
    };
    let result = j.result.as_ref();
    let progress = j.progress.as_ref();
    let figure = |key: &str, progress_key: &str| {
        result
            .and_then(|r| r.get(key))
            .or_else(|| progress.and_then(|p| p.get(progress_key)))
            .and_then(|v| v.as_u64())
    };
    let fine_tuned_model = (j.status == JobStatus::Succeeded).then(|| match &api.suffix {
        Some(s) => format!("ft:{}:{s}:{}", run.model, j.id),
        None => format!("ft:{}:{}", run.model, j.id),
    });
    Ok(JobObject {
        id: j.id.clone(),
        object: "fine_tuning.job",
        model: run.model.clone(),
        base_model: run.model,
        created_at: j.created_at.timestamp(),
        started_at: j.started_at.map(|t| t.timestamp()),
        finished_at: j.finished_at.map(|t| t.timestamp()),
        status: j.status,
        training_file: run.training_file.id,
        validation_file: run.validation_file.map(|f| f.id),
        method: api.method,
        seed: api.seed,
        suffix: api.suffix,
        metadata: api.metadata,
        task: run.task,
        progress: j.progress.clone(),
        trained_steps: figure("trained_steps", "step"),
        trained_tokens: figure("trained_tokens", "tokens"),
        estimate: api.estimate,
        queue_position: queued.map(|q| q.0),
        estimated_finish,
        attempt: j.attempt,
        max_attempts: j.max_attempts,
        error: j.error.clone(),
        result: j.result.clone(),
        result_files: result
            .and_then(|r| r.get("result_files"))
            .cloned()
            .unwrap_or(serde_json::json!([])),
        fine_tuned_model,
        merge: x.merges.get(&j.id).map(MergeObject::from),
    })
}

pub(super) async fn list(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Query(p): ListParams,
) -> ApiResult<axum::Json<List<JobObject>>> {
    let (rows, more) = records::list(&st.db, &tenant, &p.page()?).await?;
    let x = extras(&st, &rows).await?;
    let data = rows
        .iter()
        .map(|r| render(r, &x))
        .collect::<ApiResult<_>>()?;
    Ok(axum::Json(List::new(data, more)))
}

pub(super) async fn get_one(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<JobObject>> {
    let j = job_for(&st, &tenant, &id).await?;
    Ok(axum::Json(job_object(&st, &j).await?))
}

pub(super) async fn cancel(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<JobObject>> {
    // Fine-tuning jobs only: a merge's id is not a fine-tuning job here (404, untouched).
    job_for(&st, &tenant, &id).await?;
    match queue::cancel(&st.db, &tenant, &id).await? {
        Cancelled::NotFound => return Err(ApiError::not_found("fine-tuning job", &id)),
        Cancelled::Now | Cancelled::Requested | Cancelled::AlreadyFinal => {}
    }
    let j = job_for(&st, &tenant, &id).await?;
    Ok(axum::Json(job_object(&st, &j).await?))
}
