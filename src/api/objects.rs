//! What the API answers, typed: every resource object and the list envelope. Handlers build
//! these from rows and domain types; nothing else shapes a response body.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::db::datasets::FileRow;
use crate::db::job_records::{ArtifactRow, CheckpointRow, EventRow, JobRow, MetricRow};
use crate::db::tenants::{ApiKey, Tenant};
use crate::domain::estimate::Estimate;
use crate::domain::job::MethodEcho;
use crate::domain::{ArtifactKind, EventLevel, EventType, JobStatus, MetricKind};

fn unix(t: &chrono::DateTime<chrono::Utc>) -> i64 {
    t.timestamp()
}

/// `{"object": "list", "data": [...], "has_more": bool}`
#[derive(Serialize)]
pub struct List<T> {
    pub object: &'static str,
    pub data: Vec<T>,
    pub has_more: bool,
}

impl<T> List<T> {
    pub fn new(data: Vec<T>, has_more: bool) -> Self {
        List {
            object: "list",
            data,
            has_more,
        }
    }
}

/// OpenAI's file object plus the dataset's format, task and rows. Files are validated row by
/// row before they are stored, so every stored file is `processed`.
#[derive(Serialize)]
pub struct FileObject {
    pub id: String,
    pub object: &'static str,
    pub bytes: i64,
    pub created_at: i64,
    pub filename: String,
    pub purpose: String,
    pub status: &'static str,
    pub status_details: Option<String>,
    pub expires_at: Option<i64>,
    pub format: String,
    pub task: String,
    pub rows: i64,
}

impl From<&FileRow> for FileObject {
    fn from(f: &FileRow) -> Self {
        FileObject {
            id: f.id.clone(),
            object: "file",
            bytes: f.bytes,
            created_at: unix(&f.created_at),
            filename: f.filename.clone(),
            purpose: f.purpose.clone(),
            status: "processed",
            status_details: None,
            expires_at: None,
            format: f.format.clone(),
            task: f.task.clone(),
            rows: f.rows,
        }
    }
}

#[derive(Serialize)]
pub struct Deleted {
    pub id: String,
    pub object: &'static str,
    pub deleted: bool,
}

#[derive(Serialize)]
pub struct TenantObject {
    pub object: &'static str,
    pub id: String,
    pub name: String,
    pub created_at: i64,
}

impl From<&Tenant> for TenantObject {
    fn from(t: &Tenant) -> Self {
        TenantObject {
            object: "tenant",
            id: t.id.clone(),
            name: t.name.clone(),
            created_at: unix(&t.created_at),
        }
    }
}

#[derive(Serialize)]
pub struct ApiKeyObject {
    pub object: &'static str,
    pub id: String,
    pub tenant_id: String,
    pub prefix: String,
    pub created_at: i64,
    /// The secret, in the creation response only (only its hash is stored).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
}

impl ApiKeyObject {
    pub fn new(k: &ApiKey, secret: Option<String>) -> Self {
        ApiKeyObject {
            object: "api_key",
            id: k.id.clone(),
            tenant_id: k.tenant_id.clone(),
            prefix: k.prefix.clone(),
            created_at: unix(&k.created_at),
            key: secret,
            revoked_at: k.revoked_at.as_ref().map(unix),
        }
    }
}

#[derive(Serialize)]
pub struct ModelObject {
    pub id: String,
    pub object: &'static str,
    /// Unix seconds (0 where unknown: OpenAI's model object requires a number).
    pub created: i64,
    pub owned_by: String,
    pub architecture: String,
    pub hidden_size: Option<Value>,
    pub num_hidden_layers: Option<Value>,
    pub intermediate_size: Option<Value>,
    pub parameters: Option<u64>,
    /// `models_dir` (shared) or `storage` (the tenant's).
    pub source: &'static str,
}

#[derive(Serialize)]
pub struct MergeObject {
    pub id: String,
    pub object: &'static str,
    pub job_id: Option<String>,
    pub status: JobStatus,
    pub created_at: i64,
    pub finished_at: Option<i64>,
    pub error: Option<Value>,
    pub result_files: Option<Value>,
}

impl From<&JobRow> for MergeObject {
    fn from(m: &JobRow) -> Self {
        MergeObject {
            id: m.id.clone(),
            object: "fine_tuning.job.merge",
            job_id: m.parent_id.clone(),
            status: m.status,
            created_at: unix(&m.created_at),
            finished_at: m.finished_at.as_ref().map(unix),
            error: m.error.clone(),
            result_files: m
                .result
                .as_ref()
                .and_then(|r| r.get("result_files"))
                .cloned(),
        }
    }
}

/// A fine-tuning job: OpenAI's fields with OpenAI's value sets (what the SDKs validate), plus
/// this service's (the method run with its resolved hyperparameters, progress, estimate, queue
/// position and ETA, attempts, result, merge).
#[derive(Serialize)]
pub struct JobObject {
    pub id: String,
    pub object: &'static str,
    pub model: String,
    pub base_model: String,
    pub organization_id: String,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// OpenAI's status: a job whose cancellation is under way is still `running`.
    pub status: &'static str,
    /// The service's own status, which adds `cancelling`.
    pub service_status: JobStatus,
    pub training_file: String,
    pub validation_file: Option<String>,
    /// OpenAI's: `batch_size`, `learning_rate_multiplier` (of the method's default learning
    /// rate), `n_epochs`, as the job runs them.
    pub hyperparameters: OpenAiHyperparameters,
    /// OpenAI's shape: `{"type": "supervised", "supervised": {"hyperparameters": …}}`.
    pub method: OpenAiMethod,
    /// The method this service runs, with every resolved hyperparameter.
    pub training_method: MethodEcho,
    pub integrations: Option<Vec<Value>>,
    pub seed: u64,
    pub suffix: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub task: Option<String>,
    pub progress: Option<Value>,
    pub trained_steps: Option<u64>,
    pub trained_tokens: Option<u64>,
    pub estimate: Estimate,
    pub queue_position: Option<i64>,
    pub estimated_finish: Option<i64>,
    pub attempt: i32,
    pub max_attempts: i32,
    /// OpenAI's `{code, message, param}` (a failed job's cause).
    pub error: Option<Value>,
    pub result: Option<Value>,
    pub result_files: Value,
    pub fine_tuned_model: Option<String>,
    pub merge: Option<MergeObject>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct OpenAiHyperparameters {
    pub batch_size: Value,
    pub learning_rate_multiplier: Value,
    pub n_epochs: Value,
}

#[derive(Serialize)]
pub struct OpenAiMethod {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub supervised: SupervisedMethod,
}

#[derive(Serialize)]
pub struct SupervisedMethod {
    pub hyperparameters: OpenAiHyperparameters,
}

impl JobStatus {
    /// The status among OpenAI's values.
    pub fn openai(self) -> &'static str {
        match self {
            JobStatus::Cancelling => "running",
            // OpenAI's SDKs know no `paused`: it waits for its turn once resumed.
            JobStatus::Paused => "queued",
            s => s.as_str(),
        }
    }
}

/// A stored error in OpenAI's shape: `code` and `message` strings, `param` or null.
pub fn openai_error(e: &Value) -> Value {
    let text = |k: &str| e.get(k).and_then(Value::as_str).map(str::to_string);
    serde_json::json!({
        "code": text("code").unwrap_or_else(|| "error".into()),
        "message": text("message").unwrap_or_else(|| e.to_string()),
        "param": text("param"),
    })
}

/// A dry run's answer: what the job would be, and what it would cost.
#[derive(Serialize)]
pub struct EstimateObject {
    pub object: &'static str,
    pub model: String,
    pub method: MethodEcho,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub estimate: Estimate,
}

#[derive(Serialize)]
pub struct EventObject {
    pub id: String,
    pub object: &'static str,
    pub created_at: i64,
    pub level: EventLevel,
    /// OpenAI's `message` or `metrics`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The service's finer kind: `status` (a status change), `message` or `metrics`.
    pub category: EventType,
    pub message: String,
    pub data: Option<Value>,
}

/// The event id clients see (and resume from).
pub fn event_id(id: i64) -> String {
    format!("ev_{id}")
}

impl From<&EventRow> for EventObject {
    fn from(e: &EventRow) -> Self {
        EventObject {
            id: event_id(e.id),
            object: "fine_tuning.job.event",
            created_at: unix(&e.created_at),
            level: e.level,
            kind: match e.kind {
                EventType::Metrics => "metrics",
                EventType::Status | EventType::Message => "message",
            },
            category: e.kind,
            message: e.message.clone(),
            data: match (e.kind, &e.data) {
                (EventType::Metrics, Some(d)) => Some(openai_metrics(d)),
                (_, d) => d.clone(),
            },
        }
    }
}

/// A metrics event's data with OpenAI's names added beside the service's: `step`,
/// `train_loss` (a training step's `loss`), `valid_loss` and `valid_mean_token_accuracy` /
/// `valid_accuracy` (an evaluation's).
fn openai_metrics(d: &Value) -> Value {
    let mut d = d.clone();
    let Some(m) = d.as_object_mut() else {
        return d;
    };
    if let Some(l) = m.get("loss").cloned() {
        m.entry("train_loss").or_insert(l);
    }
    if let Some(Value::Object(ev)) = m.get("eval").cloned() {
        if let Some(l) = ev.get("loss") {
            m.entry("valid_loss").or_insert(l.clone());
        }
        for (from, to) in [
            ("token_accuracy", "valid_mean_token_accuracy"),
            ("accuracy", "valid_accuracy"),
        ] {
            if let Some(a) = ev.get(from) {
                m.entry(to).or_insert(a.clone());
            }
        }
    }
    d
}

/// A point on a job's curves: its kind and step, then the recorded figures.
#[derive(Serialize)]
pub struct MetricObject {
    pub object: &'static str,
    #[serde(rename = "type")]
    pub kind: MetricKind,
    pub step: i32,
    #[serde(flatten)]
    pub data: serde_json::Map<String, Value>,
}

impl From<MetricRow> for MetricObject {
    fn from(m: MetricRow) -> Self {
        let mut data = match m.data {
            Value::Object(d) => d,
            _ => Default::default(),
        };
        // The point's own fields win over recorded figures of the same name.
        for k in ["object", "type", "step"] {
            data.remove(k);
        }
        MetricObject {
            object: "fine_tuning.job.metric",
            kind: m.kind,
            step: m.step,
            data,
        }
    }
}

#[derive(Serialize)]
pub struct CheckpointObject {
    pub id: String,
    pub object: &'static str,
    pub fine_tuning_job_id: String,
    /// A name for the checkpoint (OpenAI's field; this service serves final models only).
    pub fine_tuned_model_checkpoint: String,
    /// OpenAI's: the step, and the training loss recorded at it.
    pub metrics: Value,
    pub step_number: i32,
    pub attempt: i32,
    pub bytes: i64,
    pub created_at: i64,
}

impl CheckpointObject {
    pub fn new(c: &CheckpointRow, job_id: &str, model: &str, train_loss: Option<f64>) -> Self {
        CheckpointObject {
            id: c.id.clone(),
            object: "fine_tuning.job.checkpoint",
            fine_tuning_job_id: job_id.to_string(),
            fine_tuned_model_checkpoint: format!("ft:{model}:{job_id}:ckpt-step-{}", c.step),
            metrics: serde_json::json!({"step": c.step, "train_loss": train_loss}),
            step_number: c.step,
            attempt: c.attempt,
            bytes: c.bytes,
            created_at: unix(&c.created_at),
        }
    }
}

#[derive(Serialize)]
pub struct ArtifactObject {
    pub id: String,
    pub object: &'static str,
    pub fine_tuning_job_id: String,
    pub kind: ArtifactKind,
    pub name: String,
    pub bytes: i64,
    pub sha256: String,
    pub created_at: i64,
    pub content_url: String,
}

impl ArtifactObject {
    pub fn new(a: &ArtifactRow, job_id: &str) -> Self {
        ArtifactObject {
            id: a.id.clone(),
            object: "fine_tuning.job.artifact",
            fine_tuning_job_id: job_id.to_string(),
            kind: a.kind,
            name: a.name.clone(),
            bytes: a.bytes,
            sha256: a.sha256.clone(),
            created_at: unix(&a.created_at),
            content_url: format!("/v1/fine_tuning/jobs/{job_id}/artifacts/{}/content", a.id),
        }
    }
}

#[derive(Serialize)]
pub struct PredictionsObject<T> {
    pub object: &'static str,
    pub fine_tuning_job_id: String,
    pub data: Vec<T>,
}

/// A webhook endpoint. Its signing secret is shown once, when it is registered.
#[derive(Serialize)]
pub struct WebhookEndpointObject {
    pub id: String,
    pub object: &'static str,
    pub url: String,
    pub events: Vec<String>,
    pub created_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

impl WebhookEndpointObject {
    pub fn new(e: &crate::db::webhooks::EndpointRow, with_secret: bool) -> Self {
        WebhookEndpointObject {
            id: e.id.clone(),
            object: "webhook_endpoint",
            url: e.url.clone(),
            events: e.events.clone(),
            created_at: unix(&e.created_at),
            secret: with_secret.then(|| e.secret.clone()),
        }
    }
}

/// One event sent (or being sent) to an endpoint, with every attempt.
#[derive(Serialize)]
pub struct WebhookDeliveryObject {
    /// The message id (`webhook-id`), the same on every retry.
    pub id: String,
    pub object: &'static str,
    pub endpoint_id: String,
    pub fine_tuning_job_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// `pending` (waiting for its next attempt), `delivering`, `succeeded` or `failed`.
    pub status: String,
    pub attempts: Vec<WebhookAttemptObject>,
    pub next_attempt_at: Option<i64>,
    pub created_at: i64,
    pub delivered_at: Option<i64>,
    /// The body sent, as OpenAI's event object.
    pub payload: Value,
}

#[derive(Serialize)]
pub struct WebhookAttemptObject {
    pub attempt: i32,
    pub at: i64,
    pub status_code: Option<i32>,
    pub error: Option<String>,
    pub duration_ms: i32,
}

impl WebhookDeliveryObject {
    pub fn new(
        d: &crate::db::webhooks::DeliveryRow,
        attempts: &[crate::db::webhooks::AttemptRow],
    ) -> Self {
        WebhookDeliveryObject {
            id: d.id.clone(),
            object: "webhook.delivery",
            endpoint_id: d.endpoint_id.clone(),
            fine_tuning_job_id: d.job_id.clone(),
            kind: d.event_type.clone(),
            status: d.status.clone(),
            attempts: attempts
                .iter()
                .map(|a| WebhookAttemptObject {
                    attempt: a.attempt,
                    at: unix(&a.at),
                    status_code: a.status_code,
                    error: a.error.clone(),
                    duration_ms: a.duration_ms,
                })
                .collect(),
            next_attempt_at: (d.status == "pending").then(|| unix(&d.next_attempt_at)),
            created_at: unix(&d.created_at),
            delivered_at: d.delivered_at.as_ref().map(unix),
            payload: d.payload.clone(),
        }
    }
}
