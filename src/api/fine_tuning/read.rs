//! Listing, reading and cancelling jobs, and the job object itself (with queue position,
//! ETA and merge, fetched for a whole page at once).

use std::collections::HashMap;

use axum::extract::{Path, State};
use chrono::Utc;
use sparsegrad_engine::train::Epochs;

use super::job_for;
use crate::api::objects::{
    openai_error, JobObject, List, MergeObject, OpenAiHyperparameters, OpenAiMethod,
    SupervisedMethod,
};
use crate::api::{unknown_cursor, AppState, ListParams, Tenant};
use crate::db::job_records::{self as records, JobRow};
use crate::domain::request::SUPERVISED;
use crate::domain::{FineTune, JobSpec, JobStatus};
use crate::error::{ApiError, ApiResult};
use crate::queue::{self, Cancelled, Paused};

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
    let fine_tuned_model = (j.status == JobStatus::Succeeded).then(|| spec.fine_tuned_model(&j.id));
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
    let hyperparameters = openai_hyperparameters(&run);
    Ok(JobObject {
        id: j.id.clone(),
        object: "fine_tuning.job",
        model: run.model.clone(),
        base_model: run.model,
        organization_id: j.tenant_id.clone(),
        created_at: j.created_at.timestamp(),
        started_at: j.started_at.map(|t| t.timestamp()),
        finished_at: j.finished_at.map(|t| t.timestamp()),
        status: j.status.openai(),
        service_status: j.status,
        training_file: run.training_file.id,
        validation_file: run.validation_file.map(|f| f.id),
        method: OpenAiMethod {
            kind: SUPERVISED,
            supervised: SupervisedMethod {
                hyperparameters: hyperparameters.clone(),
            },
        },
        hyperparameters,
        training_method: api.method,
        integrations: None,
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
        error: j.error.as_ref().map(openai_error),
        result: j.result.clone(),
        result_files: result
            .and_then(|r| r.get("result_files"))
            .cloned()
            .unwrap_or(serde_json::json!([])),
        fine_tuned_model,
        merge: x.merges.get(&j.id).map(MergeObject::from),
    })
}

/// The loop's settings under OpenAI's names: the learning rate as a multiple of the
/// method's default.
fn openai_hyperparameters(run: &FineTune) -> OpenAiHyperparameters {
    let lr = run.train.lr / run.method.default_lr();
    OpenAiHyperparameters {
        batch_size: run.train.batch_size.into(),
        // Four significant digits: 3e-4 over 1e-3 is 0.3, not 0.30000000000000004.
        learning_rate_multiplier: format!("{lr:.4e}").parse::<f64>().unwrap_or(lr).into(),
        n_epochs: match run.train.epochs {
            Epochs::Fixed(n) => n.into(),
            Epochs::Auto => "auto".into(),
        },
    }
}

pub(super) async fn list(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    ListParams(p): ListParams,
) -> ApiResult<axum::Json<List<JobObject>>> {
    p.only(&["metadata"])?;
    let mut page = p.page(100)?;
    if !p.metadata.is_empty() {
        page.filter = Some(serde_json::to_value(&p.metadata).map_err(ApiError::internal)?);
    }
    let (rows, more) = records::list(&st.db, &tenant, &page)
        .await?
        .ok_or_else(|| unknown_cursor(page.after.as_deref().unwrap_or_default()))?;
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

/// `pause`: a queued job stops at once; a running one checkpoints at its next step and waits
/// `paused` (`service_status`) until resumed.
pub(super) async fn pause(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<JobObject>> {
    let r = queue::pause(&st.db, &tenant, &id).await?;
    pause_answer(&st, &tenant, &id, r, "paused").await
}

/// `resume`: a paused job is queued again and continues from its latest checkpoint.
pub(super) async fn resume(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<JobObject>> {
    let r = queue::resume(&st.db, &tenant, &id).await?;
    pause_answer(&st, &tenant, &id, r, "resumed").await
}

async fn pause_answer(
    st: &AppState,
    tenant: &str,
    id: &str,
    r: Paused,
    verb: &str,
) -> ApiResult<axum::Json<JobObject>> {
    match r {
        Paused::NotFound => return Err(ApiError::not_found("fine-tuning job", id)),
        Paused::Conflict(s) => {
            return Err(ApiError::conflict(
                format!("a {s} job cannot be {verb}"),
                "invalid_job_status",
            ))
        }
        Paused::Now | Paused::Requested | Paused::Already => {}
    }
    let j = job_for(st, tenant, id).await?;
    Ok(axum::Json(job_object(st, &j).await?))
}
