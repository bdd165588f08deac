//! The training loop: micro-batches with gradient accumulation, warmup + schedule, clipping,
//! periodic evaluation and checkpoints, a progress callback and a cancellation flag.
//! A checkpoint holds the method's trained values and optimizer state; batches and dropout
//! masks are functions of (seed, step), so a resumed run equals an uninterrupted one.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::data::{collate, epoch_order, Dataset, Example, LabelMap, Message, TextTokenizer};
use crate::methods::Method;
use crate::metrics;
use crate::models::{Arch, Labels, Model, Task};
use crate::nn::Ctx;
use crate::optim::{lr_at, Schedule};
use crate::{Error, Result};

fn default_batch() -> usize {
    16
}
fn default_one() -> usize {
    1
}
fn default_lr() -> f64 {
    5e-5
}
fn default_schedule() -> Schedule {
    Schedule::Linear
}
fn default_clip() -> Option<f64> {
    Some(1.0)
}
fn default_epochs() -> usize {
    1
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    /// Overrides `epochs` when set.
    #[serde(default)]
    pub max_steps: Option<usize>,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    #[serde(default = "default_one")]
    pub grad_accum: usize,
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_schedule")]
    pub schedule: Schedule,
    #[serde(default)]
    pub warmup_steps: usize,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "default_clip")]
    pub max_grad_norm: Option<f64>,
    #[serde(default)]
    pub seed: u64,
    /// Use the model's dropout while training (as transformers does in train mode).
    #[serde(default)]
    pub dropout: bool,
    #[serde(default)]
    pub eval_every: Option<usize>,
    #[serde(default)]
    pub checkpoint_every: Option<usize>,
    #[serde(default = "default_one")]
    pub keep_checkpoints: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(Error::param("batch_size", "must be at least 1"));
        }
        if self.grad_accum == 0 {
            return Err(Error::param("grad_accum", "must be at least 1"));
        }
        if !(self.lr > 0.0 && self.lr < 1.0) {
            return Err(Error::param("lr", "must be in (0, 1)"));
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            return Err(Error::param("epochs", "must be at least 1"));
        }
        if self.max_steps == Some(0) {
            return Err(Error::param("max_steps", "must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.weight_decay) {
            return Err(Error::param("weight_decay", "must be in [0, 1)"));
        }
        Ok(())
    }

    pub fn micro_batches_per_epoch(&self, n: usize) -> usize {
        n.div_ceil(self.batch_size)
    }

    pub fn total_steps(&self, n: usize) -> usize {
        match self.max_steps {
            Some(s) => s,
            None => (self.micro_batches_per_epoch(n) * self.epochs).div_ceil(self.grad_accum),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    pub step: usize,
    pub total_steps: usize,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    pub tokens_per_sec: f64,
    pub elapsed_secs: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct EvalMetrics {
    pub loss: f64,
    pub examples: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub macro_f1: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matthews: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pearson: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spearman: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Started {
        total_steps: usize,
        start_step: usize,
        trainable_params: usize,
        total_params: usize,
        examples: usize,
    },
    Step(Progress),
    Eval {
        step: usize,
        metrics: EvalMetrics,
    },
    Checkpoint {
        step: usize,
        path: PathBuf,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainSummary {
    pub steps: usize,
    pub tokens: usize,
    pub wall_secs: f64,
    pub final_loss: f64,
    pub eval: Option<EvalMetrics>,
    pub peak_rss_bytes: Option<u64>,
    pub losses: Vec<(usize, f64)>,
    /// Parameters the method trains and numbers of optimizer state it holds.
    pub trainable_params: usize,
    pub optimizer_state: usize,
    /// Mean wall time of an optimizer step (forward, backward and update), seconds.
    pub step_secs: f64,
    /// Wall time of the method's calibration (SparseGrad's basis phase), seconds.
    pub calibration_secs: f64,
    #[serde(default)]
    pub method_stats: serde_json::Value,
}

/// What the trainer reads back from a checkpoint folder besides tensors.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub step: usize,
    pub optimizer_t: u64,
    pub tokens: usize,
    pub method: String,
    pub total_steps: usize,
    pub seed: u64,
}

pub struct TrainIo<'a> {
    pub on_event: &'a mut dyn FnMut(&Event),
    pub cancel: &'a AtomicBool,
    /// Where methods may cache what they derive from the base model and data (SparseGrad
    /// bases); `None` disables caching.
    pub cache_dir: Option<PathBuf>,
    /// Where periodic checkpoints go (`step-N/` folders).
    pub checkpoint_dir: Option<PathBuf>,
    /// A `step-N/` folder to resume from.
    pub resume_from: Option<PathBuf>,
}

impl<'a> TrainIo<'a> {
    /// No cache, no checkpoints, a fresh run.
    pub fn new(on_event: &'a mut dyn FnMut(&Event), cancel: &'a AtomicBool) -> Self {
        TrainIo {
            on_event,
            cancel,
            cache_dir: None,
            checkpoint_dir: None,
            resume_from: None,
        }
    }
}

/// Peak resident set size of this process (Linux), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn pad_id(model: &Model) -> u32 {
    match &model.config {
        crate::models::Config::Encoder(c) => c.pad_token_id,
        crate::models::Config::Llama(c) => c.pad_token_id.unwrap_or(0),
    }
}

pub fn save_checkpoint(
    dir: &Path,
    method: &dyn Method,
    model: &Model,
    meta: &CheckpointMeta,
) -> Result<PathBuf> {
    let final_dir = dir.join(format!("step-{}", meta.step));
    let tmp = dir.join(format!(".tmp-step-{}", meta.step));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let (tensors, t) = method.state(model)?;
    let meta = CheckpointMeta {
        optimizer_t: t,
        ..meta.clone()
    };
    let map: HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&map, tmp.join("state.safetensors"))?;
    let j = serde_json::to_vec_pretty(&meta).expect("serialisable");
    std::fs::write(tmp.join("trainer.json"), j).map_err(|e| Error::io(&tmp, e))?;
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    Ok(final_dir)
}

pub fn read_checkpoint(dir: &Path) -> Result<(CheckpointMeta, BTreeMap<String, Tensor>)> {
    let p = dir.join("trainer.json");
    let meta: CheckpointMeta =
        serde_json::from_slice(&std::fs::read(&p).map_err(|e| Error::io(&p, e))?)
            .map_err(|e| Error::Artifact(format!("{}: {e}", p.display())))?;
    let tensors =
        candle_core::safetensors::load(dir.join("state.safetensors"), &candle_core::Device::Cpu)?;
    Ok((meta, tensors.into_iter().collect()))
}

fn prune_checkpoints(dir: &Path, keep: usize) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut steps: Vec<(usize, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            n.strip_prefix("step-")
                .and_then(|s| s.parse().ok())
                .map(|s| (s, e.path()))
        })
        .collect();
    steps.sort();
    let drop = steps.len().saturating_sub(keep.max(1));
    for (_, p) in steps.into_iter().take(drop) {
        let _ = std::fs::remove_dir_all(p);
    }
}

/// Trains `model` in place with `method`.
pub fn train(
    model: &mut Model,
    method: &mut dyn Method,
    cfg: &TrainConfig,
    train_set: &Dataset,
    valid: Option<&Dataset>,
    io: TrainIo<'_>,
) -> Result<TrainSummary> {
    cfg.validate()?;
    if train_set.examples.is_empty() {
        return Err(Error::data(0, None, "the training set has no rows"));
    }
    let n = train_set.examples.len();
    let total = cfg.total_steps(n);
    let per_epoch = cfg.micro_batches_per_epoch(n);
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
            let logits = m.forward(&batch, &mut ctx)?;
            Ok(m.loss(&logits, &batch)?.backward()?)
        };
        let cache = io
            .cache_dir
            .clone()
            .map(|d| (d, data_key(train_set, cfg, dtype)));
        method.calibrate(
            model,
            crate::methods::Calibration {
                lr: cfg.lr,
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
    for step in start_step..total {
        if io.cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        let step_started = Instant::now();
        let mut step_loss = 0.0;
        let mut micro_count = 0;
        // The step's micro-batches; the last step of an epoch-bounded run may have fewer.
        let micro_batches: Vec<usize> = (step * cfg.grad_accum..(step + 1) * cfg.grad_accum)
            .filter(|mb| cfg.max_steps.is_some() || mb / per_epoch < cfg.epochs)
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
            let logits = model.forward(&batch, &mut ctx)?;
            let loss = model.loss(&logits, &batch)?;
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
        let lr = lr_at(cfg.lr, cfg.schedule, cfg.warmup_steps, total, step);
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
        if let (Some(every), Some(dir)) = (cfg.checkpoint_every, &io.checkpoint_dir) {
            if (step + 1) % every == 0 && !done {
                let meta = CheckpointMeta {
                    step: step + 1,
                    optimizer_t: 0,
                    tokens,
                    method: method.name().into(),
                    total_steps: total,
                    seed: cfg.seed,
                };
                let path = save_checkpoint(dir, method, model, &meta)?;
                prune_checkpoints(dir, cfg.keep_checkpoints);
                (io.on_event)(&Event::Checkpoint {
                    step: step + 1,
                    path,
                });
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
    collate(&sel, pad_id(model), model.dtype(), &model.weights.device)
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

/// Loss and task metrics over a dataset, in order, without dropout.
pub fn evaluate(model: &Model, data: &Dataset, batch_size: usize) -> Result<EvalMetrics> {
    let pad = pad_id(model);
    let (dtype, device) = (model.dtype(), model.weights.device.clone());
    let mut loss_sum = 0.0;
    let mut weight_sum = 0.0;
    let (mut pred_c, mut gold_c) = (Vec::new(), Vec::new());
    let (mut pred_v, mut gold_v) = (Vec::new(), Vec::new());
    for chunk in data.examples.chunks(batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = collate(&refs, pad, dtype, &device)?;
        let logits = model.forward(&batch, &mut Ctx::eval())?.detach();
        let loss = model
            .loss(&logits, &batch)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        let w = match &batch.labels {
            Labels::NextToken { mask, .. } => {
                mask.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?
            }
            _ => chunk.len() as f64,
        };
        loss_sum += loss * w;
        weight_sum += w;
        match &batch.labels {
            Labels::Class(y) => {
                pred_c.extend(logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
                gold_c.extend(y.to_vec1::<u32>()?);
            }
            Labels::Value(y) => {
                pred_v.extend(logits.to_dtype(DType::F64)?.to_vec1::<f64>()?);
                gold_v.extend(y.to_dtype(DType::F64)?.to_vec1::<f64>()?);
            }
            _ => {}
        }
    }
    let loss = loss_sum / weight_sum.max(1e-12);
    let mut m = EvalMetrics {
        loss,
        examples: data.examples.len(),
        ..Default::default()
    };
    match &data.task {
        Task::Classification { num_labels } => {
            m.accuracy = Some(metrics::accuracy(&pred_c, &gold_c));
            m.macro_f1 = Some(metrics::macro_f1(&pred_c, &gold_c, *num_labels));
            m.matthews = Some(metrics::matthews(&pred_c, &gold_c, *num_labels));
        }
        Task::Regression => {
            m.pearson = Some(metrics::pearson(&pred_v, &gold_v));
            m.spearman = Some(metrics::spearman(&pred_v, &gold_v));
        }
        Task::CausalLm => m.perplexity = Some(loss.exp()),
    }
    Ok(m)
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PredictInput {
    Pair { text_a: String, text_b: String },
    Text { text: String },
    Prompt { prompt: String },
    Chat { messages: Vec<Message> },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Prediction {
    Class {
        label: String,
        index: u32,
        probabilities: Vec<f32>,
    },
    Value {
        value: f32,
    },
    Text {
        completion: String,
    },
}

/// Predictions for a few inputs: class + probabilities, a regression value, or a greedy
/// completion of at most `max_new_tokens` tokens.
pub fn predict(
    model: &Model,
    tok: &TextTokenizer,
    labels: Option<&LabelMap>,
    inputs: &[PredictInput],
    max_seq_len: usize,
    max_new_tokens: usize,
) -> Result<Vec<Prediction>> {
    let pad = pad_id(model);
    let (dtype, device) = (model.dtype(), model.weights.device.clone());
    let mut out = Vec::with_capacity(inputs.len());
    for input in inputs {
        if model.arch == Arch::Llama {
            let text = match input {
                PredictInput::Prompt { prompt } => prompt.clone(),
                PredictInput::Text { text } => text.clone(),
                PredictInput::Chat { messages } => tok.render_chat(messages, true)?,
                PredictInput::Pair { .. } => {
                    return Err(Error::param(
                        "inputs",
                        "a causal LM takes `prompt`, `text` or `messages`",
                    ))
                }
            };
            let special = !matches!(input, PredictInput::Chat { .. });
            let enc = tok
                .inner
                .encode(text.as_str(), special)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            let mut ids = enc.get_ids().to_vec();
            let prompt_len = ids.len();
            for _ in 0..max_new_tokens {
                if ids.len() >= max_seq_len {
                    break;
                }
                let t = ids.len();
                let batch = crate::models::Batch {
                    input_ids: Tensor::from_vec(ids.clone(), (1, t), &device)?,
                    token_type_ids: Tensor::zeros((1, t), DType::U32, &device)?,
                    attention_mask: Tensor::ones((1, t), dtype, &device)?,
                    labels: Labels::None,
                    num_tokens: t,
                    batch_size: 1,
                };
                let logits = model.forward(&batch, &mut Ctx::eval())?.detach();
                let next = logits
                    .narrow(1, t - 1, 1)?
                    .flatten_all()?
                    .argmax(0)?
                    .to_scalar::<u32>()?;
                ids.push(next);
                if Some(next) == tok.eos_id {
                    break;
                }
            }
            let completion = tok
                .inner
                .decode(&ids[prompt_len..], true)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            out.push(Prediction::Text { completion });
            continue;
        }
        let enc = match input {
            PredictInput::Text { text } => tok.inner.encode(text.as_str(), true),
            PredictInput::Pair { text_a, text_b } => {
                tok.inner.encode((text_a.as_str(), text_b.as_str()), true)
            }
            _ => {
                return Err(Error::param(
                    "inputs",
                    "a classifier takes `text` or `text_a`/`text_b`",
                ))
            }
        }
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        let mut types = enc.get_type_ids().to_vec();
        ids.truncate(max_seq_len);
        types.truncate(max_seq_len);
        let ex = Example {
            ids,
            type_ids: types,
            target: crate::data::Target::Class(0),
            line: 0,
        };
        let batch = collate(&[&ex], pad, dtype, &device)?;
        let logits = model.forward(&batch, &mut Ctx::eval())?.detach();
        match model.task {
            Task::Regression => {
                let v = logits.to_dtype(DType::F32)?.to_vec1::<f32>()?[0];
                out.push(Prediction::Value { value: v });
            }
            _ => {
                let probs = crate::nn::softmax_last_dim(&logits.to_dtype(DType::F32)?)?
                    .squeeze(0)?
                    .to_vec1::<f32>()?;
                let (index, _) =
                    probs
                        .iter()
                        .enumerate()
                        .fold(
                            (0, f32::MIN),
                            |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) },
                        );
                let label = labels
                    .and_then(|l| l.names.get(index).cloned())
                    .unwrap_or_else(|| index.to_string());
                out.push(Prediction::Class {
                    label,
                    index: index as u32,
                    probabilities: probs,
                });
            }
        }
    }
    Ok(out)
}
