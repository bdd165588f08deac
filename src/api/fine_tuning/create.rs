//! `POST /v1/fine_tuning/jobs`: the request checked field by field, files and model checked
//! against each other, the dry-run estimate, and the job queued (idempotently per
//! `Idempotency-Key`).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sparsegrad_engine::models::{self, Task};

use super::read::job_object;
use crate::api::objects::EstimateObject;
use crate::api::{AppState, Tenant};
use crate::db::datasets::{self, FileRow};
use crate::db::{self, job_records as records, registered_models};
use crate::domain::estimate::estimate;
use crate::domain::job::MethodEcho;
use crate::domain::request::{check_request, resolve_request, CreateJob};
use crate::domain::{
    catalog, ApiMeta, BaseModel, FileRef, FineTune, JobKind, JobSpec, ModelSource,
};
use crate::error::{ApiError, ApiResult};
use crate::queue::{self, NewJob};

/// A base model by name: the tenant's registered ones, then the shared folder.
pub async fn find_model(st: &AppState, tenant: &str, name: &str) -> ApiResult<Option<BaseModel>> {
    if let Some(m) = registered_models::get(&st.db, tenant, name).await? {
        return Ok(Some(BaseModel {
            id: m.id,
            architecture: m.architecture,
            config: m.config,
            source: ModelSource::Storage {
                prefix: m.object_prefix,
            },
            created: Some(m.created_at.timestamp()),
        }));
    }
    let Some(dir) = st.cfg.models_dir.clone() else {
        return Ok(None);
    };
    let name = name.to_string();
    tokio::task::spawn_blocking(move || catalog::in_dir(&dir, &name))
        .await
        .map_err(ApiError::internal)
}

async fn input_file(st: &AppState, tenant: &str, id: &str, param: &str) -> ApiResult<FileRow> {
    datasets::get(&st.db, tenant, id)
        .await?
        .ok_or_else(|| ApiError::invalid(format!("no file `{id}`"), Some(param), "file_not_found"))
}

fn file_ref(f: &FileRow) -> FileRef {
    FileRef {
        id: f.id.clone(),
        object_key: f.object_key.clone(),
    }
}

/// The task a file's rows train, as the architecture sees it (two classes stand for any).
fn task_of(name: &str) -> Option<Task> {
    match name {
        "classification" => Some(Task::Classification { num_labels: 2 }),
        "regression" => Some(Task::Regression),
        "causal-lm" => Some(Task::CausalLm),
        _ => None,
    }
}

fn idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let k = v.to_str().unwrap_or_default();
    if k.is_empty() || k.len() > 255 {
        return Err(ApiError::invalid(
            "Idempotency-Key must be 1-255 visible ASCII characters",
            Some("Idempotency-Key"),
            "invalid_idempotency_key",
        ));
    }
    Ok(Some(k.to_string()))
}

pub(super) async fn create(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    create_or_estimate(tenant, st, headers, body, false).await
}

/// `POST /v1/fine_tuning/jobs/estimate`: the dry run under its own route, so a client whose
/// `jobs.create` expects a job object (the OpenAI SDKs) never gets an estimate from it.
pub(super) async fn estimate_only(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    create_or_estimate(tenant, st, headers, body, true).await
}

async fn create_or_estimate(
    tenant: String,
    st: AppState,
    headers: HeaderMap,
    body: Bytes,
    estimate_only: bool,
) -> ApiResult<Response> {
    let req: CreateJob =
        serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(&body))
            .map_err(|e| {
                let path = e.path().to_string();
                let param = (path != ".").then_some(path);
                ApiError::invalid(e.into_inner().to_string(), param.as_deref(), "invalid_json")
            })?;
    check_request(&req)?;
    let mut resolved = resolve_request(&req)?;
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
    let bad_model = || {
        ApiError::invalid(
            "the model's config.json lacks its sizes",
            Some("model"),
            "invalid_model",
        )
    };
    let architecture = models::from_config(&model.config).map_err(|_| bad_model())?;
    if !task_of(&train.task).is_some_and(|t| architecture.supports(&t)) {
        return Err(ApiError::invalid(
            format!(
                "a {} model cannot train on `{}` rows",
                model.architecture, train.task
            ),
            Some("training_file"),
            "task_mismatch",
        ));
    }
    // A forced task must suit the rows: SFT rows train a causal LM and nothing else.
    if let Some(t) = &req.task {
        if (t == "causal-lm") != (train.task == "causal-lm") {
            return Err(ApiError::invalid(
                format!(
                    "the training file holds `{}` rows; they cannot train `{t}`",
                    train.task
                ),
                Some("task"),
                "task_mismatch",
            ));
        }
    }
    let shape = architecture.shape();
    let history = records::secs_per_token(&st.db, &req.model).await?;
    resolved.settle_epochs(train.rows as usize);
    let estimate = estimate(
        &shape,
        &resolved,
        train.rows as u64,
        train.bytes as u64,
        history,
        crate::domain::estimate::placement_of(&st.cfg.device),
    );
    let method = MethodEcho {
        kind: resolved.method.name().into(),
        hyperparameters: resolved.hyperparameters.clone(),
    };
    if req.dry_run || estimate_only {
        return Ok(axum::Json(EstimateObject {
            object: "fine_tuning.job.estimate",
            model: req.model,
            method,
            training_file: train.id,
            validation_file: valid.map(|v| v.id),
            estimate,
        })
        .into_response());
    }
    let key = idempotency_key(&headers)?;
    let spec = JobSpec {
        run: FineTune {
            base: model.source.clone(),
            model: req.model.clone(),
            training_file: file_ref(&train),
            validation_file: valid.as_ref().map(file_ref),
            method: resolved.method.clone(),
            train: resolved.train.clone(),
            max_seq_len: resolved.max_seq_len,
            task: req.task.clone(),
        },
        api: ApiMeta {
            method,
            seed: resolved.train.seed,
            suffix: req.suffix.clone(),
            metadata: req.metadata.clone().unwrap_or_default(),
            estimate: estimate.clone(),
            request_sha256: sparsegrad_engine::io::sha256_bytes(&body),
        },
    };
    let new = NewJob {
        idempotency_key: key,
        max_attempts: st.cfg.max_attempts,
        model: Some(req.model.clone()),
        estimate_secs: Some(estimate.duration_secs),
        active_limit: Some(st.cfg.max_active_jobs),
        ..NewJob::fine_tune(
            &db::new_id("ftjob"),
            &tenant,
            serde_json::to_value(&spec).map_err(ApiError::internal)?,
        )
    };
    let (job, created) = queue::enqueue(&st.db, &new).await?;
    if !created && job.spec["api"]["request_sha256"] != spec.api.request_sha256.as_str() {
        return Err(ApiError::conflict(
            "this Idempotency-Key was used for a different request",
            "idempotency_key_reused",
        ));
    }
    let row = records::get(&st.db, &tenant, &job.id, JobKind::FineTune)
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
