//! The inference engine: one OS thread owns every loaded model and runs every model the API
//! runs (predictions, chat and text completions), so no model ever runs on the async runtime
//! (text-embeddings-inference's pattern: requests arrive over a channel, answers leave over
//! channels).
//!
//! Base models are loaded once (a few, least recently used evicted); each fine-tune is an
//! overlay over its base (`sparsegrad_engine::serve`): only what it changed is resident, and
//! overlays are kept least-recently-used within a byte budget. Generation is continuously
//! batched: every step takes one token from each running stream of the same base (a new
//! stream's whole prompt), whichever fine-tune it runs, in one forward pass; a stream whose
//! client left is dropped before the next step.
//!
//! Admission is bounded: past `max_queue` requests in the engine, or a tenant's
//! `max_per_tenant`, callers get [`Busy`] (429) instead of a place in an unbounded queue.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use candle_core::{DType, Device};
use rand_chacha::ChaCha8Rng;
use sparsegrad_engine::artifact::Artifact;
use sparsegrad_engine::data::{LabelMap, Message, TextTokenizer};
use sparsegrad_engine::models::{KvCache, Model, Task};
use sparsegrad_engine::serve::{decode_step, overlay, StepSeq};
use sparsegrad_engine::train::{PredictInput, Prediction, Sampling};
use tokio::sync::{mpsc as tmpsc, oneshot};

/// Bounds of the engine, from the config.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Requests admitted at once (queued or running), all tenants together.
    pub max_queue: usize,
    /// Requests one tenant may have admitted at once.
    pub max_per_tenant: usize,
    /// Bytes of resident fine-tune overlays (beyond their bases) kept loaded.
    pub delta_budget_bytes: usize,
    /// Base models kept loaded.
    pub max_bases: usize,
    /// Bytes of key/value cache the running completions may reserve together (each reserves
    /// its prompt plus `max_tokens`); past it, new completions wait for running ones to end.
    pub kv_budget_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_queue: 64,
            max_per_tenant: 16,
            delta_budget_bytes: 2 << 30,
            max_bases: 2,
            kv_budget_bytes: 2 << 30,
        }
    }
}

/// What to load: a base model folder and, for a fine-tune, its delta file and digest.
#[derive(Clone, Debug)]
pub struct ModelKey {
    pub model_dir: PathBuf,
    pub delta: Option<(PathBuf, String)>,
}

/// What one prediction request runs.
pub struct PredictRequest {
    pub key: ModelKey,
    pub inputs: Vec<PredictInput>,
    pub max_seq_len: usize,
    pub max_new_tokens: usize,
}

/// What a completion starts from.
#[derive(Clone, Debug)]
pub enum Prompt {
    /// A conversation, rendered with the model's chat template.
    Chat(Vec<Message>),
    /// Plain text (the tokenizer adds its special tokens).
    Text(String),
}

/// One completion: its prompt, how to sample and how long it may run.
pub struct GenerateRequest {
    pub key: ModelKey,
    pub prompt: Prompt,
    pub sampling: Sampling,
    pub max_tokens: usize,
    /// Most tokens of prompt + completion (also bounded by the model's positions).
    pub max_context: usize,
}

/// What a running completion reports, in order: text pieces, then one `Done` (or `Failed`).
#[derive(Debug)]
pub enum GenEvent {
    Text(String),
    Done {
        /// `stop` (end of sequence or a stop sequence) or `length`.
        finish_reason: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(InferenceError),
}

#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    #[error(transparent)]
    Engine(#[from] sparsegrad_engine::Error),
    /// A request the model cannot serve, about one request field.
    #[error("{message}")]
    Invalid {
        param: &'static str,
        message: String,
    },
    #[error("the inference engine stopped: {0}")]
    Thread(String),
}

/// The engine is full (or the tenant has its share): try again shortly.
#[derive(Debug)]
pub struct Busy {
    pub message: String,
    pub per_tenant: bool,
}

/// Counters for tests, metrics and the benchmark.
#[derive(Default)]
struct Shared {
    pending: AtomicUsize,
    per_tenant: Mutex<HashMap<String, usize>>,
    overlay_loads: AtomicUsize,
    base_loads: AtomicUsize,
    resident_deltas: AtomicUsize,
    resident_delta_bytes: AtomicUsize,
    resident_base_bytes: AtomicUsize,
    tokens: AtomicU64,
    abandoned: AtomicU64,
    steps: AtomicU64,
}

/// A place in the engine, held until the request is finished (the engine thread drops it).
pub struct Ticket {
    shared: Arc<Shared>,
    tenant: String,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.shared.pending.fetch_sub(1, Ordering::SeqCst);
        let mut m = self
            .shared
            .per_tenant
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.tenant) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.tenant);
            }
        }
    }
}

enum Msg {
    Predict {
        ticket: Ticket,
        req: PredictRequest,
        reply: oneshot::Sender<Result<Answer, InferenceError>>,
    },
    Generate {
        ticket: Ticket,
        req: GenerateRequest,
        out: tmpsc::UnboundedSender<GenEvent>,
    },
}

/// A prediction's answer: at once (classifiers), or one stream per input (a causal LM's
/// completions, generated beside every other stream rather than ahead of them).
enum Answer {
    Now(Vec<Prediction>),
    Generating(Vec<tmpsc::UnboundedReceiver<GenEvent>>),
}

/// A handle on the engine thread (cheap to clone; the thread ends with the last handle).
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
    limits: Limits,
}

/// What the engine holds now.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Stats {
    pub pending: usize,
    pub overlay_loads: usize,
    pub base_loads: usize,
    pub resident_deltas: usize,
    pub resident_delta_bytes: usize,
    /// Bytes of the base models' weights held.
    pub resident_base_bytes: usize,
    pub tokens: u64,
    /// Completions dropped because their client left.
    pub abandoned: u64,
    pub steps: u64,
}

impl Engine {
    /// Starts the engine thread, running models on `device` (`auto`, `cpu`, `cuda[:N]`).
    pub fn start(device: &str, limits: Limits) -> Engine {
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared::default());
        let device = sparsegrad_engine::device::resolve_device(device).unwrap_or_else(|e| {
            tracing::warn!("inference device: {e}; using the CPU");
            Device::Cpu
        });
        let s = shared.clone();
        let l = limits.clone();
        std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || Worker::new(device, l, s).run(rx))
            .expect("spawn the inference thread");
        Engine { tx, shared, limits }
    }

    pub fn stats(&self) -> Stats {
        let s = &self.shared;
        Stats {
            pending: s.pending.load(Ordering::SeqCst),
            overlay_loads: s.overlay_loads.load(Ordering::Relaxed),
            base_loads: s.base_loads.load(Ordering::Relaxed),
            resident_deltas: s.resident_deltas.load(Ordering::Relaxed),
            resident_delta_bytes: s.resident_delta_bytes.load(Ordering::Relaxed),
            resident_base_bytes: s.resident_base_bytes.load(Ordering::Relaxed),
            tokens: s.tokens.load(Ordering::Relaxed),
            abandoned: s.abandoned.load(Ordering::Relaxed),
            steps: s.steps.load(Ordering::Relaxed),
        }
    }

    /// How many fine-tune overlays were built (not found resident).
    pub fn loads(&self) -> usize {
        self.shared.overlay_loads.load(Ordering::Relaxed)
    }

    /// A place for one request of `tenant`, or [`Busy`].
    pub fn admit(&self, tenant: &str) -> Result<Ticket, Busy> {
        let mut m = self
            .shared
            .per_tenant
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mine = m.get(tenant).copied().unwrap_or(0);
        if mine >= self.limits.max_per_tenant {
            return Err(Busy {
                message: format!(
                    "you have {mine} inference requests in progress; at most {} may be at once",
                    self.limits.max_per_tenant
                ),
                per_tenant: true,
            });
        }
        let all = self.shared.pending.fetch_add(1, Ordering::SeqCst);
        if all >= self.limits.max_queue {
            self.shared.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(Busy {
                message: format!(
                    "the inference queue is full ({} requests); retry shortly",
                    self.limits.max_queue
                ),
                per_tenant: false,
            });
        }
        *m.entry(tenant.to_string()).or_default() += 1;
        Ok(Ticket {
            shared: self.shared.clone(),
            tenant: tenant.to_string(),
        })
    }

    pub async fn predict(
        &self,
        ticket: Ticket,
        req: PredictRequest,
    ) -> Result<Vec<Prediction>, InferenceError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Predict { ticket, req, reply })
            .map_err(|_| InferenceError::Thread("not running".into()))?;
        let answer = rx
            .await
            .map_err(|_| InferenceError::Thread("the request was dropped".into()))??;
        let streams = match answer {
            Answer::Now(p) => return Ok(p),
            Answer::Generating(streams) => streams,
        };
        let mut out = Vec::with_capacity(streams.len());
        for mut rx in streams {
            let mut completion = String::new();
            loop {
                match rx.recv().await {
                    Some(GenEvent::Text(t)) => completion.push_str(&t),
                    Some(GenEvent::Done { .. }) => break,
                    Some(GenEvent::Failed(e)) => return Err(e),
                    None => return Err(InferenceError::Thread("a completion was dropped".into())),
                }
            }
            out.push(Prediction::Text { completion });
        }
        Ok(out)
    }

    /// Starts a completion; its events arrive on the receiver. Dropping the receiver stops
    /// the generation before its next token.
    pub fn generate(
        &self,
        ticket: Ticket,
        req: GenerateRequest,
    ) -> Result<tmpsc::UnboundedReceiver<GenEvent>, InferenceError> {
        let (out, rx) = tmpsc::unbounded_channel();
        self.tx
            .send(Msg::Generate { ticket, req, out })
            .map_err(|_| InferenceError::Thread("not running".into()))?;
        Ok(rx)
    }
}

/// A base model with its tokenizer.
struct Base {
    model: Model,
    tok: TextTokenizer,
}

/// A model ready to run: a base, or a fine-tune's overlay over one.
struct Served {
    base: Arc<Base>,
    overlay: Option<Model>,
    labels: Option<LabelMap>,
    bytes: usize,
}

impl Served {
    fn model(&self) -> &Model {
        self.overlay.as_ref().unwrap_or(&self.base.model)
    }
}

/// A completion being generated.
struct Stream {
    served: Arc<Served>,
    /// The request's place in the engine (shared by a prediction's streams).
    _ticket: Arc<Ticket>,
    out: tmpsc::UnboundedSender<GenEvent>,
    cache: KvCache,
    unseen: Vec<u32>,
    generated: Vec<u32>,
    prompt_tokens: usize,
    sampling: Sampling,
    rng: ChaCha8Rng,
    max_tokens: usize,
    max_context: usize,
    /// Bytes of the completion's text already sent.
    sent: usize,
    /// Text held back in case it begins a stop sequence.
    hold: usize,
    /// Key/value cache bytes reserved: prompt plus `max_tokens`, within the context.
    kv_bytes: usize,
}

struct Worker {
    device: Device,
    limits: Limits,
    shared: Arc<Shared>,
    clock: u64,
    /// `(folder, task) → base`, with its last use.
    bases: Vec<((PathBuf, Task), Arc<Base>, u64)>,
    /// delta digest → overlay, with its last use.
    deltas: Vec<(String, Arc<Served>, u64)>,
    streams: Vec<Stream>,
    /// Completions whose cache does not fit beside the running ones yet, in arrival order.
    waiting: std::collections::VecDeque<Stream>,
    /// Key/value cache bytes the running streams reserve.
    kv_reserved: usize,
    /// Which base's streams step next (round robin over bases).
    turn: usize,
}

impl Worker {
    fn new(device: Device, limits: Limits, shared: Arc<Shared>) -> Self {
        Worker {
            device,
            limits,
            shared,
            clock: 0,
            bases: Vec::new(),
            deltas: Vec::new(),
            streams: Vec::new(),
            waiting: Default::default(),
            kv_reserved: 0,
            turn: 0,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        loop {
            if self.streams.is_empty() && self.waiting.is_empty() {
                match rx.recv() {
                    Ok(m) => self.guarded(|w| w.handle(m)),
                    Err(_) => return,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(m) => self.guarded(|w| w.handle(m)),
                    Err(mpsc::TryRecvError::Empty) => break,
                    // Every handle is gone: finish what runs, then stop.
                    Err(mpsc::TryRecvError::Disconnected)
                        if self.streams.is_empty() && self.waiting.is_empty() =>
                    {
                        return
                    }
                    Err(mpsc::TryRecvError::Disconnected) => break,
                }
            }
            if !self.streams.is_empty() || !self.waiting.is_empty() {
                self.guarded(|w| w.step());
            }
        }
    }

    /// Runs `f`; a panic fails the running streams instead of killing the engine.
    fn guarded(&mut self, f: impl FnOnce(&mut Self)) {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self))).is_err() {
            tracing::error!("the inference engine caught a panic; failing its running streams");
            while !self.streams.is_empty() {
                let e = GenEvent::Failed(InferenceError::Thread("the model failed".into()));
                self.finish(self.streams.len() - 1, e);
            }
        }
    }

    fn handle(&mut self, m: Msg) {
        match m {
            Msg::Predict { ticket, req, reply } => {
                let r = self.predict(req, ticket);
                let _ = reply.send(r);
            }
            Msg::Generate { ticket, req, out } => {
                match self.start(req, Arc::new(ticket), out.clone()) {
                    Ok(s) => {
                        self.waiting.push_back(s);
                        self.admit_waiting();
                    }
                    Err(e) => {
                        let _ = out.send(GenEvent::Failed(e));
                    }
                }
            }
        }
    }

    /// Drops the streams whose client left, then starts waiting completions, oldest first,
    /// while their caches fit the budget (one always runs: a lone request never waits for
    /// nothing).
    fn admit_waiting(&mut self) {
        // A client that left, running or waiting, costs nothing more.
        let before = self.streams.len() + self.waiting.len();
        let mut released = 0;
        self.streams.retain(|s| {
            let open = !s.out.is_closed();
            if !open {
                released += s.kv_bytes;
            }
            open
        });
        self.kv_reserved -= released;
        self.waiting.retain(|s| !s.out.is_closed());
        let gone = before - self.streams.len() - self.waiting.len();
        self.shared
            .abandoned
            .fetch_add(gone as u64, Ordering::Relaxed);
        while let Some(s) = self.waiting.front() {
            let fits = self.kv_reserved + s.kv_bytes <= self.limits.kv_budget_bytes;
            if !fits && !self.streams.is_empty() {
                break;
            }
            let s = self.waiting.pop_front().expect("a front");
            self.kv_reserved += s.kv_bytes;
            self.streams.push(s);
        }
    }

    /// A classifier answers at once (its ticket dropped before the reply); a causal LM's
    /// inputs become greedy completions that join the running streams.
    fn predict(&mut self, req: PredictRequest, ticket: Ticket) -> Result<Answer, InferenceError> {
        let served = self.served(&req.key)?;
        if served.model().task != Task::CausalLm {
            return Ok(Answer::Now(sparsegrad_engine::train::predict(
                served.model(),
                &served.base.tok,
                served.labels.as_ref(),
                &req.inputs,
                req.max_seq_len,
                req.max_new_tokens,
            )?));
        }
        let ticket = Arc::new(ticket);
        let mut started = Vec::with_capacity(req.inputs.len());
        let mut receivers = Vec::with_capacity(req.inputs.len());
        for input in req.inputs {
            let prompt = match input {
                PredictInput::Chat { messages } => Prompt::Chat(messages),
                PredictInput::Prompt { prompt: t } | PredictInput::Text { text: t } => {
                    Prompt::Text(t)
                }
                PredictInput::Pair { .. } => {
                    return Err(InferenceError::Invalid {
                        param: "inputs",
                        message: "a causal LM takes `prompt`, `text` or `messages`".into(),
                    })
                }
            };
            let generate = GenerateRequest {
                key: req.key.clone(),
                prompt,
                sampling: Sampling::default(),
                max_tokens: req.max_new_tokens,
                max_context: req.max_seq_len,
            };
            let (out, rx) = tmpsc::unbounded_channel();
            let stream = self
                .start(generate, ticket.clone(), out)
                .map_err(|e| match e {
                    InferenceError::Invalid { message, .. } => InferenceError::Invalid {
                        param: "inputs",
                        message,
                    },
                    other => other,
                })?;
            started.push(stream);
            receivers.push(rx);
        }
        self.waiting.extend(started);
        self.admit_waiting();
        Ok(Answer::Generating(receivers))
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn base(
        &mut self,
        dir: &std::path::Path,
        task: Option<Task>,
    ) -> Result<Arc<Base>, InferenceError> {
        let now = self.tick();
        let task = match task {
            Some(t) => t,
            None => {
                let (arch, raw) = sparsegrad_engine::pretrained::read_config(dir)?;
                arch.parse(&raw)?
                    .default_task()
                    .ok_or_else(|| InferenceError::Invalid {
                        param: "model",
                        message: "this base model is an encoder: it completes no text".into(),
                    })?
            }
        };
        let key = (dir.to_path_buf(), task.clone());
        if let Some(e) = self.bases.iter_mut().find(|e| e.0 == key) {
            e.2 = now;
            return Ok(e.1.clone());
        }
        let (mut model, tok, _) = sparsegrad_engine::pipeline::load_for_inference(
            dir,
            None,
            Some(task),
            DType::F32,
            &self.device,
        )?;
        sparsegrad_engine::serve::layout_for_serving(&mut model)?;
        self.shared.base_loads.fetch_add(1, Ordering::Relaxed);
        let b = Arc::new(Base { model, tok });
        if self.bases.len() >= self.limits.max_bases.max(1) {
            // The least recently used goes; streams still running on it keep it alive.
            if let Some(i) = (0..self.bases.len()).min_by_key(|&i| self.bases[i].2) {
                self.bases.remove(i);
            }
        }
        self.bases.push((key, b.clone(), now));
        let bytes: usize = self
            .bases
            .iter()
            .map(|e| {
                e.1.model
                    .weights
                    .params
                    .values()
                    .map(|p| p.tensor().elem_count() * p.tensor().dtype().size_in_bytes())
                    .sum::<usize>()
            })
            .sum();
        self.shared
            .resident_base_bytes
            .store(bytes, Ordering::Relaxed);
        Ok(b)
    }

    fn served(&mut self, key: &ModelKey) -> Result<Arc<Served>, InferenceError> {
        let Some((path, sha)) = &key.delta else {
            let base = self.base(&key.model_dir, None)?;
            return Ok(Arc::new(Served {
                base,
                overlay: None,
                labels: None,
                bytes: 0,
            }));
        };
        let now = self.tick();
        if let Some(e) = self.deltas.iter_mut().find(|e| e.0 == *sha) {
            e.2 = now;
            return Ok(e.1.clone());
        }
        let art = Artifact::load(path)?;
        let base = self.base(&key.model_dir, Some(art.descriptor.task.clone()))?;
        let mut o = overlay(&base.model, &art)?;
        // A full fine-tune's own matrices (the base's are laid out already).
        sparsegrad_engine::serve::layout_for_serving(&mut o.model)?;
        self.shared.overlay_loads.fetch_add(1, Ordering::Relaxed);
        let served = Arc::new(Served {
            base,
            overlay: Some(o.model),
            labels: art.descriptor.labels.clone(),
            bytes: o.bytes,
        });
        self.deltas.push((sha.clone(), served.clone(), now));
        // Least recently used overlays leave until the rest fit (the newest always stays).
        let mut total: usize = self.deltas.iter().map(|e| e.1.bytes).sum();
        while total > self.limits.delta_budget_bytes && self.deltas.len() > 1 {
            let Some(i) = (0..self.deltas.len()).min_by_key(|&i| self.deltas[i].2) else {
                break;
            };
            total -= self.deltas.remove(i).1.bytes;
        }
        self.shared
            .resident_deltas
            .store(self.deltas.len(), Ordering::Relaxed);
        self.shared
            .resident_delta_bytes
            .store(total, Ordering::Relaxed);
        Ok(served)
    }

    fn start(
        &mut self,
        req: GenerateRequest,
        ticket: Arc<Ticket>,
        out: tmpsc::UnboundedSender<GenEvent>,
    ) -> Result<Stream, InferenceError> {
        req.sampling.check()?;
        let served = self.served(&req.key)?;
        if served.model().task != Task::CausalLm {
            return Err(InferenceError::Invalid {
                param: "model",
                message: "this model classifies text: use POST /v1/fine_tuning/jobs/{id}/predict"
                    .into(),
            });
        }
        let tok = &served.base.tok;
        let (text, special, param) = match &req.prompt {
            Prompt::Chat(messages) => (tok.render_chat(messages, true)?, false, "messages"),
            Prompt::Text(t) => (t.clone(), true, "prompt"),
        };
        let ids = tok
            .inner
            .encode(text.as_str(), special)
            .map_err(|e| InferenceError::Invalid {
                param,
                message: format!("the tokenizer refused it: {e}"),
            })?
            .get_ids()
            .to_vec();
        if ids.is_empty() {
            return Err(InferenceError::Invalid {
                param,
                message: "the prompt has no tokens".into(),
            });
        }
        let positions = served
            .model()
            .raw_config
            .get("max_position_embeddings")
            .and_then(|v| v.as_u64())
            .map_or(usize::MAX, |n| n as usize);
        let max_context = req.max_context.min(positions);
        if ids.len() >= max_context {
            return Err(InferenceError::Invalid {
                param,
                message: format!(
                    "the prompt is {} tokens; at most {} fit this model with room to answer",
                    ids.len(),
                    max_context - 1
                ),
            });
        }
        let hold = req.sampling.stop.iter().map(String::len).max().unwrap_or(1) - 1;
        let shape = served.model().architecture.shape();
        let per_token = 2 * shape.layers as usize * shape.kv_dim as usize * 4;
        let kv_bytes = per_token * max_context.min(ids.len() + req.max_tokens);
        if kv_bytes > self.limits.kv_budget_bytes {
            return Err(InferenceError::Invalid {
                param: "max_tokens",
                message: format!(
                    "the prompt and max_tokens need {} MiB of key/value cache; this server \
                     holds at most {} MiB: ask for fewer tokens",
                    kv_bytes >> 20,
                    self.limits.kv_budget_bytes >> 20
                ),
            });
        }
        Ok(Stream {
            served,
            _ticket: ticket,
            out,
            cache: KvCache::default(),
            prompt_tokens: ids.len(),
            unseen: ids,
            generated: Vec::new(),
            rng: sparsegrad_engine::rng::stream(req.sampling.seed, "sampling", 0),
            sampling: req.sampling,
            max_tokens: req.max_tokens,
            max_context,
            sent: 0,
            hold,
            kv_bytes,
        })
    }

    /// One forward pass over the running streams of one base.
    fn step(&mut self) {
        // A client that left costs nothing more.
        // Places freed since the last step go to those waiting.
        self.admit_waiting();
        if self.streams.is_empty() {
            return;
        }
        self.turn = (self.turn + 1) % self.streams.len();
        let base = Arc::as_ptr(&self.streams[self.turn].served.base);
        // This base's streams, each fine-tune's adjacent (their rows share its adapters).
        let mut mine: Vec<usize> = (0..self.streams.len())
            .filter(|&i| Arc::as_ptr(&self.streams[i].served.base) == base)
            .collect();
        mine.sort_by_key(|&i| Arc::as_ptr(&self.streams[i].served) as usize);
        let result = {
            let mut picked: Vec<Option<&mut Stream>> = self.streams.iter_mut().map(Some).collect();
            let mut seqs: Vec<StepSeq<'_>> = Vec::with_capacity(mine.len());
            let mut order: Vec<usize> = Vec::with_capacity(mine.len());
            for &i in &mine {
                let s = picked[i].take().expect("each stream once");
                let Stream {
                    served,
                    unseen,
                    cache,
                    ..
                } = s;
                seqs.push(StepSeq {
                    model: served.model(),
                    ids: unseen,
                    cache,
                });
                order.push(i);
            }
            decode_step(&mut seqs)
                .and_then(|l| Ok(l.to_dtype(DType::F32)?.to_vec2::<f32>()?))
                .map(|rows| (order, rows))
        };
        self.shared.steps.fetch_add(1, Ordering::Relaxed);
        let (order, rows) = match result {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("inference step failed: {e}");
                let failed: Vec<usize> = mine;
                self.finish_many(&failed, |_| {
                    GenEvent::Failed(InferenceError::Thread("the model failed".into()))
                });
                return;
            }
        };
        let mut done: Vec<(usize, GenEvent)> = Vec::new();
        for (i, row) in order.into_iter().zip(rows) {
            let s = &mut self.streams[i];
            let next = s.sampling.pick(&row, &mut s.rng);
            self.shared.tokens.fetch_add(1, Ordering::Relaxed);
            if Some(next) == s.served.base.tok.eos_id {
                done.push((i, s.finish("stop")));
                continue;
            }
            s.generated.push(next);
            s.unseen = vec![next];
            if let Some(ev) = s.advance() {
                done.push((i, ev));
                continue;
            }
            if s.generated.len() >= s.max_tokens
                || s.prompt_tokens + s.generated.len() >= s.max_context
            {
                done.push((i, s.finish("length")));
            }
        }
        done.sort_by_key(|d| std::cmp::Reverse(d.0));
        for (i, ev) in done {
            self.finish(i, ev);
        }
    }

    fn finish_many(&mut self, which: &[usize], ev: impl Fn(&Stream) -> GenEvent) {
        let mut which = which.to_vec();
        which.sort_unstable_by(|a, b| b.cmp(a));
        for i in which {
            let e = ev(&self.streams[i]);
            self.finish(i, e);
        }
    }

    /// Ends stream `i` with `ev`: its place in the engine is given back before the client
    /// hears the end (so a client that asks again at once finds it free).
    fn finish(&mut self, i: usize, ev: GenEvent) {
        let s = self.streams.swap_remove(i);
        self.kv_reserved -= s.kv_bytes;
        let out = s.out.clone();
        drop(s);
        let _ = out.send(ev);
    }
}

impl Stream {
    fn text(&self) -> String {
        self.served
            .base
            .tok
            .inner
            .decode(&self.generated, true)
            .unwrap_or_default()
    }

    /// Sends the text that can no longer change or begin a stop sequence; `Some(Done)` when a
    /// stop sequence appeared (the text before it sent).
    fn advance(&mut self) -> Option<GenEvent> {
        let text = self.text();
        if let Some(at) = self.sampling.stop_at(&text) {
            self.send_upto(&text, at);
            return Some(self.done("stop"));
        }
        // A trailing replacement character is half a UTF-8 sequence: wait for the rest.
        let mut safe = text.trim_end_matches('\u{FFFD}').len();
        safe = safe.saturating_sub(self.hold);
        while !text.is_char_boundary(safe) {
            safe -= 1;
        }
        self.send_upto(&text, safe);
        None
    }

    fn send_upto(&mut self, text: &str, end: usize) {
        if end > self.sent && text.is_char_boundary(self.sent) {
            let _ = self
                .out
                .send(GenEvent::Text(text[self.sent..end].to_string()));
            self.sent = end;
        }
    }

    /// The rest of the text, then `Done`.
    fn finish(&mut self, reason: &'static str) -> GenEvent {
        let text = self.text();
        let end = self.sampling.stop_at(&text).unwrap_or(text.len());
        self.send_upto(&text, end);
        self.done(reason)
    }

    fn done(&self, finish_reason: &'static str) -> GenEvent {
        GenEvent::Done {
            finish_reason,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.generated.len(),
        }
    }
}
