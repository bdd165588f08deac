//! The service's one typed configuration, read once from flags and environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use secrecy::SecretString;

use crate::queue::QueueConfig;
use crate::storage::S3Settings;

#[derive(Args, Clone, Debug)]
pub struct Config {
    /// Postgres connection URL.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: DatabaseUrl,
    #[arg(long, env = "SPARSEGRAD_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Local state: object storage (by default), scratch space for workers, caches.
    #[arg(long, env = "SPARSEGRAD_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
    /// `file:///abs/dir`, `s3://bucket/prefix` or `memory://` (default: file://DATA_DIR/objects).
    #[arg(long, env = "SPARSEGRAD_STORAGE_URL")]
    pub storage_url: Option<String>,
    #[arg(long, env = "SPARSEGRAD_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    #[arg(long, env = "SPARSEGRAD_S3_REGION")]
    pub s3_region: Option<String>,
    #[arg(long, env = "SPARSEGRAD_S3_ACCESS_KEY_ID")]
    pub s3_access_key_id: Option<String>,
    #[arg(long, env = "SPARSEGRAD_S3_SECRET_ACCESS_KEY")]
    pub s3_secret_access_key: Option<SecretString>,
    /// Allow plain-http S3 endpoints (local servers).
    #[arg(long, env = "SPARSEGRAD_S3_ALLOW_HTTP")]
    pub s3_allow_http: bool,
    /// Retries of one S3 request (connection errors, 5xx, throttling), with exponential
    /// backoff from 100 ms to 15 s: an outage shorter than the retry window costs time only.
    #[arg(long, env = "SPARSEGRAD_S3_MAX_RETRIES", default_value_t = 10)]
    pub s3_max_retries: usize,
    /// Seconds after which one S3 request stops being retried, whatever retries remain.
    #[arg(long, env = "SPARSEGRAD_S3_RETRY_TIMEOUT_SECS", default_value_t = 180)]
    pub s3_retry_timeout_secs: u64,
    /// Folder of base models (one sub-folder per model with config.json).
    #[arg(long, env = "SPARSEGRAD_MODELS_DIR")]
    pub models_dir: Option<PathBuf>,
    /// The admin key for `/v1/admin/*` (tenants and API keys); admin routes are off without it.
    #[arg(long, env = "SPARSEGRAD_ADMIN_KEY")]
    pub admin_key: Option<SecretString>,
    /// Largest accepted dataset upload, bytes.
    #[arg(long, env = "SPARSEGRAD_MAX_UPLOAD_BYTES", default_value_t = 256 << 20)]
    pub max_upload_bytes: u64,
    /// Most parameters a GGUF import may have (it dequantises every tensor into memory).
    #[arg(
        long,
        env = "SPARSEGRAD_MAX_IMPORT_PARAMS",
        default_value_t = 2_000_000_000
    )]
    pub max_import_params: u64,
    /// Most jobs (fine-tunes and merges) one tenant may have queued or running at once.
    #[arg(long, env = "SPARSEGRAD_MAX_ACTIVE_JOBS", default_value_t = 32)]
    pub max_active_jobs: i64,
    /// Most bytes one tenant may keep stored (files and fine-tuned artifacts); uploads past it
    /// answer 429.
    #[arg(long, env = "SPARSEGRAD_MAX_STORED_BYTES", default_value_t = 20 << 30)]
    pub max_stored_bytes: u64,
    /// Most event streams (SSE) one tenant may hold open on one API process.
    #[arg(long, env = "SPARSEGRAD_MAX_EVENT_STREAMS", default_value_t = 16)]
    pub max_event_streams: usize,
    /// Uploads validated at once by one API process (more answer 429).
    #[arg(long, env = "SPARSEGRAD_MAX_CONCURRENT_UPLOADS", default_value_t = 8)]
    pub max_concurrent_uploads: usize,
    /// Model imports at once by one API process (more answer 429).
    #[arg(long, env = "SPARSEGRAD_MAX_CONCURRENT_IMPORTS", default_value_t = 2)]
    pub max_concurrent_imports: usize,
    /// Predictions at once by one API process (more answer 429).
    #[arg(long, env = "SPARSEGRAD_MAX_CONCURRENT_PREDICTS", default_value_t = 4)]
    pub max_concurrent_predicts: usize,
    /// Inference requests (predictions and completions) admitted at once by one API process,
    /// queued or running; more answer 429.
    #[arg(long, env = "SPARSEGRAD_INFERENCE_MAX_QUEUE", default_value_t = 64)]
    pub inference_max_queue: usize,
    /// Inference requests one tenant may have admitted at once on one API process.
    #[arg(
        long,
        env = "SPARSEGRAD_INFERENCE_MAX_PER_TENANT",
        default_value_t = 16
    )]
    pub inference_max_per_tenant: usize,
    /// MiB of fine-tunes kept resident for inference beyond their base models (least
    /// recently used leave first).
    #[arg(
        long,
        env = "SPARSEGRAD_INFERENCE_DELTA_BUDGET_MB",
        default_value_t = 2048
    )]
    pub inference_delta_budget_mb: usize,
    /// MiB of key/value cache running completions may reserve together (prompt + max_tokens
    /// each); past it, new completions wait in the engine for running ones to end.
    #[arg(
        long,
        env = "SPARSEGRAD_INFERENCE_KV_BUDGET_MB",
        default_value_t = 2048
    )]
    pub inference_kv_budget_mb: usize,
    /// Base models kept loaded for inference.
    #[arg(long, env = "SPARSEGRAD_INFERENCE_MAX_BASES", default_value_t = 2)]
    pub inference_max_bases: usize,
    /// Most tokens one completion may ask for (`max_tokens`).
    #[arg(long, env = "SPARSEGRAD_MAX_COMPLETION_TOKENS", default_value_t = 1024)]
    pub max_completion_tokens: usize,
    /// Most tokens of prompt plus completion (also bounded by the model's positions).
    #[arg(long, env = "SPARSEGRAD_MAX_CONTEXT_TOKENS", default_value_t = 4096)]
    pub max_context_tokens: usize,
    /// Most open client connections; more wait in the listen backlog.
    #[arg(long, env = "SPARSEGRAD_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers (and a kept-alive connection may sit
    /// idle before its next request).
    #[arg(long, env = "SPARSEGRAD_HEADER_TIMEOUT_SECS", default_value_t = 15)]
    pub header_timeout_secs: u64,
    /// Seconds a request body may go without a byte arriving before the request is dropped.
    #[arg(long, env = "SPARSEGRAD_BODY_IDLE_TIMEOUT_SECS", default_value_t = 30)]
    pub body_idle_timeout_secs: u64,
    /// Serve `/metrics`, `/healthz` and `/readyz` without auth on this separate (operator-only)
    /// address, in `serve` and `worker` alike; without it, `/metrics` is on the API address
    /// and needs the admin key.
    #[arg(long, env = "SPARSEGRAD_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// In-process workers (`serve`); 0 runs the API only.
    #[arg(long, env = "SPARSEGRAD_WORKERS", default_value_t = 1)]
    pub workers: usize,
    #[arg(long, env = "SPARSEGRAD_LEASE_SECS", default_value_t = 30)]
    pub lease_secs: u64,
    #[arg(long, env = "SPARSEGRAD_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: i32,
    /// Backoff before a failed attempt's retry: this many seconds, doubling per attempt (up
    /// to ten minutes), with jitter.
    #[arg(long, env = "SPARSEGRAD_RETRY_BASE_SECS", default_value_t = 10.0)]
    pub retry_base_secs: f64,
    /// Hosts (names or IP literals, comma-separated) webhook deliveries may reach although
    /// they are not public addresses, and over plain http: a local receiver, a trusted relay.
    /// Everything else must be https to a public address.
    #[arg(long, env = "SPARSEGRAD_WEBHOOK_ALLOW_HOSTS", value_delimiter = ',')]
    pub webhook_allow_hosts: Vec<String>,
    /// Attempts per webhook delivery before it is marked failed.
    #[arg(long, env = "SPARSEGRAD_WEBHOOK_MAX_ATTEMPTS", default_value_t = 8)]
    pub webhook_max_attempts: i32,
    /// Seconds before a failed delivery's first retry, doubling per attempt (up to an hour).
    #[arg(
        long,
        env = "SPARSEGRAD_WEBHOOK_RETRY_BASE_SECS",
        default_value_t = 10.0
    )]
    pub webhook_retry_base_secs: f64,
    /// Most webhook endpoints one tenant may register.
    #[arg(long, env = "SPARSEGRAD_MAX_WEBHOOK_ENDPOINTS", default_value_t = 16)]
    pub max_webhook_endpoints: i64,
    /// Where workers train: `auto` (the first GPU when the binary was built with CUDA and one
    /// is present, else the CPU), `cpu`, `cuda` or `cuda:N`.
    #[arg(long, env = "SPARSEGRAD_DEVICE", default_value = "auto")]
    pub device: String,
    /// Names this process's workers (`<host>-<pid>-<n>`) in job events and leases.
    #[arg(long, env = "HOSTNAME", default_value = "local")]
    pub host: String,
}

/// A Postgres URL whose password never reaches a log.
#[derive(Clone)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for DatabaseUrl {
    fn from(s: String) -> Self {
        DatabaseUrl(s)
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:<redacted>@host/db`.
fn redact_url(u: &str) -> String {
    match (u.find("://"), u.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &u[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:<redacted>{}", &u[..s + 3], &u[at..]),
                None => u.to_string(),
            }
        }
        _ => u.to_string(),
    }
}

impl Config {
    pub fn storage_url(&self) -> std::io::Result<String> {
        Ok(match &self.storage_url {
            Some(u) => u.clone(),
            None => {
                let dir = std::path::absolute(self.data_dir.join("objects"))?;
                format!("file://{}", dir.display())
            }
        })
    }

    pub fn s3(&self) -> S3Settings {
        S3Settings {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            access_key_id: self.s3_access_key_id.clone(),
            secret_access_key: self.s3_secret_access_key.clone(),
            allow_http: self.s3_allow_http,
            max_retries: Some(self.s3_max_retries),
            retry_timeout: Some(Duration::from_secs(self.s3_retry_timeout_secs.max(1))),
        }
    }

    pub fn webhooks(&self) -> crate::webhooks::WebhookConfig {
        crate::webhooks::WebhookConfig {
            allow_hosts: self.webhook_allow_hosts.clone(),
            max_attempts: self.webhook_max_attempts.clamp(1, 100),
            retry_base: Duration::from_secs_f64(self.webhook_retry_base_secs.clamp(0.0, 3600.0)),
            ..Default::default()
        }
    }

    pub fn queue(&self) -> QueueConfig {
        QueueConfig {
            lease: Duration::from_secs(self.lease_secs.max(2)),
            retry: crate::queue::RetryPolicy {
                base: Duration::from_secs_f64(self.retry_base_secs.clamp(0.0, 600.0)),
                ..Default::default()
            },
            ..QueueConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        cfg: super::Config,
    }

    #[test]
    fn secrets_never_reach_debug_output() {
        let c = Wrap::parse_from([
            "x",
            "--database-url",
            "postgres://u:hunter2@h/d",
            "--admin-key",
            "admin-s3cret",
            "--s3-secret-access-key",
            "s3-s3cret",
        ])
        .cfg;
        let d = format!("{c:?}");
        for secret in ["hunter2", "admin-s3cret", "s3-s3cret"] {
            assert!(!d.contains(secret), "{secret} in {d}");
        }
        assert!(d.contains("postgres://u:<redacted>@h/d"), "{d}");
    }

    #[test]
    fn database_password_is_redacted() {
        assert_eq!(
            super::redact_url("postgres://u:hunter2@h:5432/d"),
            "postgres://u:<redacted>@h:5432/d"
        );
        assert_eq!(super::redact_url("postgres://u@h/d"), "postgres://u@h/d");
    }
}
