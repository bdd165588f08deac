//! Per-process limits on expensive work: how many uploads, model imports and predictions run
//! at once (past that: 429 with `Retry-After`), and how many event streams each tenant holds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Config;
use crate::error::{ApiError, ApiResult};

pub struct Gates {
    uploads: Arc<Semaphore>,
    imports: Arc<Semaphore>,
    predicts: Arc<Semaphore>,
    streams: Arc<Mutex<HashMap<String, usize>>>,
    max_streams: usize,
}

/// Held while a tenant's event stream is open.
pub struct StreamSlot {
    streams: Arc<Mutex<HashMap<String, usize>>>,
    tenant: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut m = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.tenant) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.tenant);
            }
        }
    }
}

fn take(sem: &Arc<Semaphore>, what: &str) -> ApiResult<OwnedSemaphorePermit> {
    sem.clone().try_acquire_owned().map_err(|_| {
        ApiError::too_many(
            format!("too many {what} are in progress on this server; retry shortly"),
            "server_busy",
            5,
        )
    })
}

impl Gates {
    pub fn new(cfg: &Config) -> Self {
        Gates {
            uploads: Arc::new(Semaphore::new(cfg.max_concurrent_uploads.max(1))),
            imports: Arc::new(Semaphore::new(cfg.max_concurrent_imports.max(1))),
            predicts: Arc::new(Semaphore::new(cfg.max_concurrent_predicts.max(1))),
            streams: Default::default(),
            max_streams: cfg.max_event_streams,
        }
    }

    pub fn upload(&self) -> ApiResult<OwnedSemaphorePermit> {
        take(&self.uploads, "uploads")
    }

    pub fn import(&self) -> ApiResult<OwnedSemaphorePermit> {
        take(&self.imports, "model imports")
    }

    pub fn predict(&self) -> ApiResult<OwnedSemaphorePermit> {
        take(&self.predicts, "predictions")
    }

    /// A slot for one more of the tenant's event streams, or 429 past `max_event_streams`.
    pub fn stream(&self, tenant: &str) -> ApiResult<StreamSlot> {
        let mut m = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(tenant.to_string()).or_default();
        if *n >= self.max_streams {
            return Err(ApiError::too_many(
                format!(
                    "you have {} event streams open; at most {} may be at once: close one",
                    *n, self.max_streams
                ),
                "too_many_streams",
                5,
            ));
        }
        *n += 1;
        Ok(StreamSlot {
            streams: self.streams.clone(),
            tenant: tenant.to_string(),
        })
    }
}
