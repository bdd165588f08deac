//! What training reports, recorded under the worker's fence: a metric point and an event per
//! step, evaluations, the start, and checkpoints (uploaded before training goes on).

use sparsegrad_engine::train::Event;

use super::hold::Held;
use super::transfer::{upload_dir, COMPLETE_MARKER};
use super::{event, Stop, WorkerCtx};
use crate::domain::{EventLevel, EventType, MetricKind};
use crate::queue;

/// Records one engine event; a step's progress also goes out with the next heartbeat.
pub(super) async fn record(ctx: &WorkerCtx, lease: &Held, e: &Event) -> Result<(), Stop> {
    let info = |kind: EventType, msg: String, data: Option<serde_json::Value>| async move {
        event(&ctx.db, lease, EventLevel::Info, kind, &msg, data).await
    };
    match e {
        Event::Step(p) => {
            let d = serde_json::to_value(p).unwrap_or_default();
            lease.set_progress(d.clone());
            let write = || queue::metric(&ctx.db, lease.lease(), MetricKind::Train, p.step, &d);
            lease.persist("metric", write).await?;
            info(EventType::Metrics, e.to_string(), Some(d)).await
        }
        Event::Eval { step, metrics } => {
            let data = serde_json::json!({"step": step, "eval": metrics});
            let point = serde_json::to_value(metrics).unwrap_or_default();
            let write = || queue::metric(&ctx.db, lease.lease(), MetricKind::Eval, *step, &point);
            lease.persist("metric", write).await?;
            info(EventType::Metrics, e.to_string(), Some(data)).await
        }
        Event::Started { .. } => {
            let data = serde_json::to_value(e).unwrap_or_default();
            info(EventType::Message, e.to_string(), Some(data)).await
        }
        Event::Checkpoint { step, path } => {
            let prefix =
                crate::storage::keys::checkpoint_prefix(&lease.job_id, lease.attempt, *step);
            let stored = async {
                let bytes = upload_dir(&ctx.storage, path, &prefix).await?;
                // Written last: a checkpoint without it is incomplete and ignored.
                ctx.storage
                    .put(&format!("{prefix}/{COMPLETE_MARKER}"), "".into())
                    .await?;
                Ok::<_, Stop>(bytes)
            }
            .await;
            match stored {
                Ok(bytes) => {
                    let write = || queue::checkpoint(&ctx.db, lease.lease(), *step, &prefix, bytes);
                    lease.persist("checkpoint", write).await?;
                    // Not the event's own line: that names the worker's local folder.
                    info(
                        EventType::Message,
                        format!("checkpoint at step {step}"),
                        None,
                    )
                    .await
                }
                // A checkpoint that cannot be stored only costs progress on a retry.
                Err(Stop::Infra(m)) => {
                    let msg = format!("checkpoint at step {step} not stored: {m}");
                    event(
                        &ctx.db,
                        lease,
                        EventLevel::Warn,
                        EventType::Message,
                        &msg,
                        None,
                    )
                    .await
                }
                Err(other) => Err(other),
            }
        }
    }
}
