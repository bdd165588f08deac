//! One fine-tune attempt: inputs fetched, a resumed checkpoint if there is one, the engine on
//! its own thread, progress and heartbeats until it ends, the artifact stored.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use sparsegrad_engine::pipeline::run_job;
use sparsegrad_engine::train::{Event, TrainIo};
use tokio::sync::mpsc;

use super::hold::Held;
use super::transfer::{latest_checkpoint, store_artifacts, COMPLETE_MARKER};
use super::{became, event, progress, Done, Stop, WorkerCtx};
use crate::domain::{ArtifactKind, EventLevel, EventType, FineTune, FineTuneResult, JobStatus};
use crate::queue::Completion;
use crate::storage::local_copy::materialize;

/// Downloads an input file; one that is gone was deleted by its owner (no retry brings it
/// back).
async fn input(ctx: &WorkerCtx, key: &str, to: &Path, param: &str) -> Result<(), Stop> {
    match ctx.storage.download(key, to).await {
        Err(crate::storage::StorageError::NotFound(_)) => Err(Stop::User(
            format!("the {} was deleted", param.replace('_', " ")),
            Some(param.into()),
        )),
        r => Ok(r?),
    }
}

pub(super) async fn run(
    ctx: &WorkerCtx,
    lease: &Held,
    spec: FineTune,
    dir: &Path,
) -> Result<Done, Stop> {
    let model_dir = materialize(&ctx.storage, &spec.base, &ctx.model_cache).await?;
    let train_path = dir.join("train.data");
    input(
        ctx,
        &spec.training_file.object_key,
        &train_path,
        "training_file",
    )
    .await?;
    let valid_path = match &spec.validation_file {
        Some(f) => {
            let p = dir.join("valid.data");
            input(ctx, &f.object_key, &p, "validation_file").await?;
            Some(p)
        }
        None => None,
    };
    let ckpt_dir = dir.join("checkpoints");
    let resume_from = match latest_checkpoint(&ctx.db, &ctx.storage, &lease.job_id).await? {
        Some((step, objs)) => {
            let local = ckpt_dir.join(format!("step-{step}"));
            for k in objs {
                let name = k.rsplit('/').next().unwrap_or_default().to_string();
                if name != COMPLETE_MARKER {
                    ctx.storage.download(&k, &local.join(name)).await?;
                }
            }
            let msg = format!("resuming from step {step}");
            event(
                &ctx.db,
                lease,
                EventLevel::Info,
                EventType::Message,
                &msg,
                None,
            )
            .await?;
            Some(local)
        }
        None => None,
    };
    let engine = spec.run_spec(model_dir, train_path, valid_path);

    let cancel = Arc::new(AtomicBool::new(false));
    let drain = Arc::new(AtomicBool::new(false));
    let thread_drain = drain.clone();
    // Checkpoint events carry an acknowledgement: training waits until the checkpoint is
    // uploaded, so the local copy cannot be pruned under the upload.
    let (tx, mut rx) = mpsc::unbounded_channel::<(Event, Option<std::sync::mpsc::Sender<()>>)>();
    let out_dir = dir.join("artifact");
    let thread_cancel = cancel.clone();
    let thread_ckpt = ckpt_dir.clone();
    let cache_dir = ctx.cache_dir.clone();
    let thread_out = out_dir.clone();
    let device = ctx.device.clone();
    let device_label = sparsegrad_engine::device::device_name(&device);
    // Training owns a whole thread: it would starve the runtime's workers.
    let handle = std::thread::Builder::new()
        .name(format!("train-{}", lease.job_id))
        .spawn(move || {
            let mut on_event = |e: &Event| {
                if matches!(e, Event::Checkpoint { .. }) {
                    let (ack, done) = std::sync::mpsc::channel();
                    if tx.send((e.clone(), Some(ack))).is_ok() {
                        let _ = done.recv();
                    }
                } else {
                    let _ = tx.send((e.clone(), None));
                }
            };
            let out = run_job(
                &engine,
                &device,
                TrainIo {
                    on_event: &mut on_event,
                    cancel: &thread_cancel,
                    drain: Some(&thread_drain),
                    cache_dir,
                    checkpoint_dir: Some(thread_ckpt),
                    resume_from,
                },
            )?;
            out.artifact.save(&thread_out)?;
            Ok::<_, sparsegrad_engine::Error>(out.summary)
        })
        .map_err(|e| Stop::Infra(format!("cannot start the training thread: {e}")))?;

    let mut standing = lease.standing();
    let mut shutdown = ctx.drain.clone();
    let mut draining = false;
    // The first reason to stop; training is told to cancel and drained to its end.
    let running = serde_json::json!({
        "device": device_label,
        "attempt": lease.attempt,
        "worker": lease.worker_id,
    });
    let mut abort: Option<Stop> = match became(ctx, lease, JobStatus::Running, Some(running)).await
    {
        Ok(()) => None,
        Err(s) => {
            cancel.store(true, Ordering::SeqCst);
            Some(s)
        }
    };
    loop {
        tokio::select! {
            // Shutdown: the engine checkpoints at its next step boundary and stops.
            _ = crate::shutdown::until_true(&mut shutdown), if !draining => {
                draining = true;
                drain.store(true, Ordering::SeqCst);
            }
            e = rx.recv() => {
                let Some((e, ack)) = e else { break };
                if abort.is_none() {
                    if let Err(s) = progress::record(ctx, lease, &e).await {
                        cancel.store(true, Ordering::SeqCst);
                        abort = Some(s);
                    }
                }
                drop(ack);
            }
            // What the heartbeats learned: cancellation or a pause requested, or the job lost.
            Ok(()) = standing.changed() => {
                let now = *standing.borrow_and_update();
                if now.lost && abort.is_none() {
                    abort = Some(Stop::Lost);
                }
                if now.lost || now.cancel_requested {
                    cancel.store(true, Ordering::SeqCst);
                }
                // A pause drains as a shutdown does: checkpoint at the next step, hand back.
                // Withdrawn before that step, training goes on.
                if !draining {
                    drain.store(now.pause_requested, Ordering::SeqCst);
                }
            }
        }
    }
    let result = tokio::task::spawn_blocking(move || handle.join())
        .await
        .map_err(|e| Stop::Infra(format!("training thread: {e}")))?
        .map_err(|_| Stop::Infra("the training thread panicked".into()))?;
    if let Some(s) = abort {
        return Err(s);
    }
    let summary = result.map_err(|e| Stop::engine(e, "training_file"))?;
    let names = ["delta.safetensors", "delta.json"].map(String::from);
    let artifacts =
        store_artifacts(&ctx.storage, lease, ArtifactKind::Delta, &out_dir, &names).await?;
    let result = FineTuneResult {
        device: device_label,
        result_files: artifacts.iter().map(|a| a.id.clone()).collect(),
        trained_steps: summary.steps,
        trained_tokens: summary.tokens,
        final_loss: summary.final_loss,
        eval: summary.eval,
        wall_secs: summary.wall_secs,
        peak_rss_bytes: summary.peak_rss_bytes,
        trainable_params: summary.trainable_params,
        optimizer_state: summary.optimizer_state,
        method_stats: summary.method_stats,
    };
    let done = Completion {
        result: serde_json::to_value(&result).expect("serialisable"),
        wall_secs: Some(result.wall_secs),
        trained_tokens: Some(result.trained_tokens as i64),
    };
    Ok((done, artifacts))
}
