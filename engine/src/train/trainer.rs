//! The loop: micro-batches with gradient accumulation, warmup + schedule, clipping, periodic
//! evaluation and checkpoints, a progress callback and a cancellation flag. Batches and
//! dropout masks are functions of (seed, step), so a resumed run equals an uninterrupted one.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Instant;

use candle_core::DType;

use super::checkpoint::{prune_checkpoints, read_checkpoint, save_checkpoint, CheckpointMeta};
use super::eval::evaluate;
use super::events::{peak_rss_bytes, Event, Progress, TrainIo, TrainSummary};
use super::TrainConfig;
use crate::data::{collate, epoch_order, Dataset, Example};
use crate::methods::Method;
use crate::models::Model;
use crate::nn::Ctx;
use crate::optim::lr_at;
use crate::{Error, Result};

/// Trains `model` in place with `method`.
pub fn train(
    model: &mut Model,
    method: &mut dyn Method,
    cfg: &TrainConfig,
    train_set: &Dataset,
    valid: Option<&Dataset>,
    mut io: TrainIo<'_>,
) -> Result<TrainSummary> {
    cfg.validate()?;
    if train_set.examples.is_empty() {
        return Err(Error::data(0, None, "the training set has no rows"));
    }
    let n = train_set.examples.len();
    let total = cfg.total_steps(n);
    let per_epoch = cfg.micro_batches_per_epoch(n);
    let epochs = cfg.epochs_for(n);
    let warmup = cfg.warmup_for(total);
    let dtype = model.dtype();

    let mut start_step = 0;
    let mut tokens = 0usize;
    if let Some(dir) = &io.resume_from {
        let (meta, state) = read_checkpoint(dir)?;
        if meta.method != method.name() || meta.total_steps != total || meta.seed != cfg.seed {
            return Err(Error::Artifact(format!(
                "checkpoint {} is from a different run (method {}, {} steps, seed {})",
                dir.display(),
                meta.method,
                meta.total_steps,
                meta.seed
            )));
        }
        method.load_state(model, &state, meta.optimizer_t)?;
        start_step = meta.step;
        tokens = meta.tokens;
    }
    let calibration_started = Instant::now();
    if io.resume_from.is_none() {
        let order0 = epoch_order(n, cfg.seed, 0, true);
        let mut backward = |m: &Model, i: usize| -> Result<candle_core::backprop::GradStore> {
            let batch = batch_at(train_set, &order0, i % per_epoch, cfg.batch_size, m)?;
            let mut ctx = Ctx::train(
                crate::rng::stream(cfg.seed, "calibration", i as u64),
                cfg.dropout,
            );
            Ok(m.forward_loss(&batch, &mut ctx)?.backward()?)
        };
        let cache = io
            .cache_dir
            .clone()
            .map(|d| (d, data_key(train_set, cfg, dtype)));
        method.calibrate(
            model,
            crate::methods::Calibration {
                lr: cfg.lr,
                max_grad_norm: cfg.max_grad_norm,
                cache,
                backward: &mut backward,
            },
        )?;
    }
    let calibration_secs = calibration_started.elapsed().as_secs_f64();
    (io.on_event)(&Event::Started {
        total_steps: total,
        start_step,
        trainable_params: method.trainable_count(model),
        total_params: model.weights.num_params(false),
        examples: n,
    });

    let started = Instant::now();
    let tokens_at_start = tokens;
    let mut orders: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut losses = Vec::new();
    let mut last_loss = f64::NAN;
    let mut last_eval = None;
    let mut step_time = 0.0;
    // The last step whose state is in a checkpoint (or that the run resumed from).
    let mut saved_at = start_step;
    for step in start_step..total {
        if io.cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        if io.drain.is_some_and(|d| d.load(Ordering::Relaxed)) {
            // The steps done since the last checkpoint are kept for whoever resumes.
            if step > saved_at {
                checkpoint(&mut io, model, &*method, cfg, step, tokens, total)?;
            }
            return Err(Error::Drained { step });
        }
        let step_started = Instant::now();
        let mut step_loss = 0.0;
        let mut micro_count = 0;
        // The step's micro-batches; the last step of an epoch-bounded run may have fewer.
        let micro_batches: Vec<usize> = (step * cfg.grad_accum..(step + 1) * cfg.grad_accum)
            .filter(|mb| cfg.max_steps.is_some() || mb / per_epoch < epochs)
            .collect();
        method.begin_step(step, micro_batches.len())?;
        for mb in micro_batches {
            let epoch = mb / per_epoch;
            let order = orders
                .entry(epoch)
                .or_insert_with(|| epoch_order(n, cfg.seed, epoch as u64, true));
            let batch = batch_at(train_set, order, mb % per_epoch, cfg.batch_size, model)?;
            let mut ctx = Ctx::train(
                crate::rng::stream(cfg.seed, "dropout", mb as u64),
                cfg.dropout,
            );
            let loss = model.forward_loss(&batch, &mut ctx)?;
            let lv = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !lv.is_finite() {
                return Err(Error::param(
                    "lr",
                    format!(
                        "training diverged (loss is {lv}) at step {}; lower the learning rate",
                        step + 1
                    ),
                ));
            }
            step_loss += lv;
            micro_count += 1;
            let grads = (loss / cfg.grad_accum as f64)?.backward()?;
            method.accumulate(model, grads)?;
            tokens += batch.num_tokens;
        }
        // Orders for finished epochs are no longer needed.
        orders.retain(|&e, _| e + 1 >= (step * cfg.grad_accum) / per_epoch);
        let lr = lr_at(cfg.lr, cfg.schedule, warmup, total, step);
        let grad_norm = method.step(model, lr, cfg.max_grad_norm)?;
        step_time += step_started.elapsed().as_secs_f64();
        last_loss = step_loss / micro_count.max(1) as f64;
        losses.push((step + 1, last_loss));
        let elapsed = started.elapsed().as_secs_f64();
        (io.on_event)(&Event::Step(Progress {
            step: step + 1,
            total_steps: total,
            epoch: ((step + 1) * cfg.grad_accum) as f64 / per_epoch as f64,
            loss: last_loss,
            lr,
            grad_norm,
            tokens,
            tokens_per_sec: (tokens - tokens_at_start) as f64 / elapsed.max(1e-9),
            elapsed_secs: elapsed,
            grad_energy: method.grad_energy(),
        }));
        let done = step + 1 == total;
        if let (Some(every), Some(v)) = (cfg.eval_every, valid) {
            if (step + 1) % every == 0 && !done {
                let m = evaluate(model, v, cfg.batch_size)?;
                (io.on_event)(&Event::Eval {
                    step: step + 1,
                    metrics: m.clone(),
                });
                last_eval = Some(m);
            }
        }
        if let Some(every) = cfg.checkpoint_every {
            if (step + 1) % every == 0 && !done {
                checkpoint(&mut io, model, &*method, cfg, step + 1, tokens, total)?;
                saved_at = step + 1;
            }
        }
    }
    if let Some(v) = valid {
        let m = evaluate(model, v, cfg.batch_size)?;
        (io.on_event)(&Event::Eval {
            step: total,
            metrics: m.clone(),
        });
        last_eval = Some(m);
    }
    Ok(TrainSummary {
        steps: total,
        tokens,
        wall_secs: started.elapsed().as_secs_f64(),
        final_loss: last_loss,
        eval: last_eval,
        peak_rss_bytes: peak_rss_bytes(),
        losses,
        trainable_params: method.trainable_count(model),
        optimizer_state: method.optimizer_state_len(),
        step_secs: step_time / (total - start_step).max(1) as f64,
        calibration_secs,
        method_stats: method.stats(),
    })
}

/// The `idx`-th batch of an epoch's order, collated for `model`.
/// Saves the state after `step` steps into the run's checkpoint folder (if it has one), keeps
/// the newest few, and announces it.
fn checkpoint(
    io: &mut TrainIo<'_>,
    model: &Model,
    method: &dyn Method,
    cfg: &TrainConfig,
    step: usize,
    tokens: usize,
    total: usize,
) -> Result<()> {
    let Some(dir) = &io.checkpoint_dir else {
        return Ok(());
    };
    let meta = CheckpointMeta {
        step,
        optimizer_t: 0,
        tokens,
        method: method.name().into(),
        total_steps: total,
        seed: cfg.seed,
    };
    let path = save_checkpoint(dir, method, model, &meta)?;
    prune_checkpoints(dir, cfg.keep_checkpoints);
    (io.on_event)(&Event::Checkpoint { step, path });
    Ok(())
}

fn batch_at(
    data: &Dataset,
    order: &[usize],
    idx: usize,
    batch_size: usize,
    model: &Model,
) -> Result<crate::models::Batch> {
    let end = ((idx + 1) * batch_size).min(order.len());
    let sel: Vec<&Example> = order[idx * batch_size..end]
        .iter()
        .map(|&i| &data.examples[i])
        .collect();
    collate(&sel, model.pad_id(), model.dtype(), &model.weights.device)
}

/// Names the calibration data: every example's tokens and target, plus what shapes the
/// batches (seed, batch size, dropout, dtype).
fn data_key(data: &Dataset, cfg: &TrainConfig, dtype: DType) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for e in &data.examples {
        for id in &e.ids {
            h.update(id.to_le_bytes());
        }
        h.update(format!("|{:?}|", e.target).as_bytes());
    }
    h.update(format!("{}:{}:{}:{dtype:?}", cfg.seed, cfg.batch_size, cfg.dropout).as_bytes());
    hex::encode(h.finalize())
}
