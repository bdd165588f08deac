//! OpenAI's inference routes for causal-LM models: `POST /v1/chat/completions` and
//! `POST /v1/completions`, streaming (server-sent events in OpenAI's chunk format) or not.
//! `model` is a succeeded fine-tune's `fine_tuned_model` (the tenant's own) or a base model
//! id; the fine-tune's delta is applied in the forward pass over the shared base (see
//! `crate::inference`).

use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde::{Deserialize, Serialize};
use sparsegrad_engine::data::Message;
use sparsegrad_engine::train::Sampling;
use tokio::sync::mpsc::UnboundedReceiver;

use super::fine_tuning::{busy, find_model, inference_error, served_key};
use super::{AppState, Json, Tenant};
use crate::db::job_records as records;
use crate::db::new_id;
use crate::domain::{JobKind, JobSpec, JobStatus};
use crate::error::{ApiError, ApiResult};
use crate::inference::{GenEvent, GenerateRequest, ModelKey, Prompt};
use crate::storage::local_copy::materialize;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/chat/completions", post(chat))
        .route("/completions", post(completion))
}

/// Most messages in one conversation.
const MAX_MESSAGES: usize = 256;
/// Most bytes of a prompt or of all messages' content together (the context bounds tokens;
/// this bounds the work done before tokenizing).
const MAX_PROMPT_BYTES: usize = 256 << 10;
/// Longest model name accepted.
const MAX_MODEL_NAME: usize = 256;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// A request to either route (each refuses the other's fields): sampling, length and
/// streaming, plus `messages` (chat) or `prompt` (text).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Common {
    model: String,
    #[serde(default)]
    messages: Option<Vec<ChatMessage>>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    /// Only 1 (one choice per request).
    #[serde(default)]
    n: Option<u32>,
    /// Accepted and ignored (OpenAI's end-user tag).
    #[serde(default)]
    #[allow(dead_code)]
    user: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatMessage {
    role: String,
    content: Content,
    #[serde(default)]
    #[allow(dead_code)]
    name: Option<String>,
}

#[derive(Debug, Serialize)]
struct Usage {
    prompt_tokens: usize,
    completion_tokens: usize,
    total_tokens: usize,
}

/// Which route answers: the objects' names and shapes differ.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

fn invalid(message: impl Into<String>, param: &str) -> ApiError {
    ApiError::invalid(message, Some(param), "invalid_value")
}

/// The model a request names, as local files: a fine-tune of the tenant's that succeeded, or
/// a base model the tenant can see. Anything else is 404 about `model`, another tenant's
/// fine-tune included.
async fn resolve_model(st: &AppState, tenant: &str, name: &str) -> ApiResult<ModelKey> {
    if name.is_empty() || name.len() > MAX_MODEL_NAME {
        return Err(invalid(
            format!("give a model name of 1 to {MAX_MODEL_NAME} bytes"),
            "model",
        ));
    }
    let missing = || {
        ApiError::not_found_param(
            format!("no model `{name}` (see GET /v1/models and your fine-tuning jobs)"),
            "model",
            "model_not_found",
        )
    };
    if let Some(rest) = name.strip_prefix("ft:") {
        let id = rest.rsplit(':').next().unwrap_or_default();
        let job = records::get(&st.db, tenant, id, JobKind::FineTune)
            .await?
            .ok_or_else(missing)?;
        let spec: JobSpec = serde_json::from_value(job.spec.clone()).map_err(ApiError::internal)?;
        if job.status != JobStatus::Succeeded || spec.fine_tuned_model(&job.id) != name {
            return Err(missing());
        }
        return Ok(served_key(st, &job).await?.0);
    }
    let model = find_model(st, tenant, name).await?.ok_or_else(missing)?;
    let cache = st.cfg.data_dir.join("cache").join("models");
    let model_dir = materialize(&st.storage, &model.source, &cache)
        .await
        .map_err(ApiError::internal)?;
    Ok(ModelKey {
        model_dir,
        delta: None,
    })
}

/// Checks the shared settings; the sampling, `max_tokens` and whether to stream.
fn settings(
    st: &AppState,
    c: &Common,
    max_tokens: Option<u64>,
    max_tokens_param: &str,
    default_max: usize,
) -> ApiResult<(Sampling, usize)> {
    if c.n.is_some_and(|n| n != 1) {
        return Err(invalid("only n = 1 is supported", "n"));
    }
    let cap = st.cfg.max_completion_tokens;
    let max_tokens = match max_tokens {
        None => default_max.min(cap),
        Some(n) if n >= 1 && n <= cap as u64 => n as usize,
        Some(_) => {
            return Err(invalid(
                format!("must be between 1 and {cap}"),
                max_tokens_param,
            ))
        }
    };
    let stop = match &c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    let sampling = Sampling {
        // OpenAI's defaults: temperature 1, top_p 1; without a seed, a fresh one.
        temperature: c.temperature.unwrap_or(1.0),
        top_p: c.top_p.unwrap_or(1.0),
        seed: c.seed.map_or_else(rand::random, |s| s as u64),
        stop,
    };
    sampling.check().map_err(|e| {
        let f = crate::domain::UserFacing::from(&e);
        invalid(f.reason.clone(), &f.param_or("temperature"))
    })?;
    Ok((sampling, max_tokens))
}

fn chat_messages(messages: Vec<ChatMessage>) -> ApiResult<Vec<Message>> {
    if messages.is_empty() || messages.len() > MAX_MESSAGES {
        return Err(invalid(
            format!("give 1 to {MAX_MESSAGES} messages"),
            "messages",
        ));
    }
    let mut total = 0usize;
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        if !["system", "developer", "user", "assistant"].contains(&m.role.as_str()) {
            return Err(invalid(
                "must be system, developer, user or assistant",
                &format!("messages[{i}].role"),
            ));
        }
        let content = match m.content {
            Content::Text(t) => t,
            Content::Parts(parts) => {
                let mut s = String::new();
                for (j, p) in parts.into_iter().enumerate() {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => s.push_str(&t),
                        _ => return Err(invalid(
                            "only text parts (`{\"type\": \"text\", \"text\": …}`) are supported",
                            &format!("messages[{i}].content[{j}]"),
                        )),
                    }
                }
                s
            }
        };
        total += content.len();
        if total > MAX_PROMPT_BYTES {
            return Err(invalid(
                format!("the conversation exceeds {MAX_PROMPT_BYTES} bytes"),
                &format!("messages[{i}].content"),
            ));
        }
        // The template sees `system` for OpenAI's newer `developer` role.
        let role = if m.role == "developer" {
            "system".to_string()
        } else {
            m.role
        };
        out.push(Message { role, content });
    }
    Ok(out)
}

async fn chat(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Json(mut body): Json<Common>,
) -> ApiResult<Response> {
    if body.prompt.is_some() {
        return Err(invalid(
            "chat completions take `messages`; `prompt` is for /v1/completions",
            "prompt",
        ));
    }
    let messages = body
        .messages
        .take()
        .ok_or_else(|| invalid("give the conversation's messages", "messages"))?;
    let messages = chat_messages(messages)?;
    let (param, max) = match (body.max_completion_tokens, body.max_tokens) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "give max_completion_tokens or max_tokens, not both",
                "max_tokens",
            ))
        }
        (Some(n), None) => ("max_completion_tokens", Some(n)),
        (None, n) => ("max_tokens", n),
    };
    let (sampling, max_tokens) = settings(&st, &body, max, param, usize::MAX)?;
    run(
        st,
        tenant,
        body,
        Prompt::Chat(messages),
        sampling,
        max_tokens,
        Kind::Chat,
    )
    .await
}

async fn completion(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Json(mut body): Json<Common>,
) -> ApiResult<Response> {
    if body.messages.is_some() || body.max_completion_tokens.is_some() {
        let param = if body.messages.is_some() {
            "messages"
        } else {
            "max_completion_tokens"
        };
        return Err(invalid(
            "text completions take `prompt` and `max_tokens`; this is for /v1/chat/completions",
            param,
        ));
    }
    let prompt = body
        .prompt
        .take()
        .ok_or_else(|| invalid("give the prompt to complete", "prompt"))?;
    if prompt.len() > MAX_PROMPT_BYTES {
        return Err(invalid(
            format!("the prompt exceeds {MAX_PROMPT_BYTES} bytes"),
            "prompt",
        ));
    }
    // OpenAI's default for this route: 16 tokens.
    let max = body.max_tokens;
    let (sampling, max_tokens) = settings(&st, &body, max, "max_tokens", 16)?;
    run(
        st,
        tenant,
        body,
        Prompt::Text(prompt),
        sampling,
        max_tokens,
        Kind::Text,
    )
    .await
}

async fn run(
    st: AppState,
    tenant: String,
    common: Common,
    prompt: Prompt,
    sampling: Sampling,
    max_tokens: usize,
    kind: Kind,
) -> ApiResult<Response> {
    let key = resolve_model(&st, &tenant, &common.model).await?;
    let ticket = st.inference.admit(&tenant).map_err(busy)?;
    let prompt_param = match kind {
        Kind::Chat => "messages",
        Kind::Text => "prompt",
    };
    let mut rx = st
        .inference
        .generate(
            ticket,
            GenerateRequest {
                key,
                prompt,
                sampling,
                max_tokens,
                max_context: st.cfg.max_context_tokens,
            },
        )
        .map_err(|e| inference_error(e, prompt_param))?;
    // The first event says whether the request was accepted: a refusal is an error answer,
    // not a stream that fails.
    let first = match rx.recv().await {
        Some(GenEvent::Failed(e)) => return Err(inference_error(e, prompt_param)),
        Some(ev) => ev,
        None => return Err(ApiError::internal("the inference engine dropped a request")),
    };
    let head = Head {
        id: match kind {
            Kind::Chat => new_id("chatcmpl"),
            Kind::Text => new_id("cmpl"),
        },
        created: chrono::Utc::now().timestamp(),
        model: common.model,
        kind,
    };
    if common.stream.unwrap_or(false) {
        let usage = common.stream_options.is_some_and(|o| o.include_usage);
        return Ok(stream(head, first, rx, usage).into_response());
    }
    let mut text = String::new();
    let mut ev = first;
    loop {
        match ev {
            GenEvent::Text(t) => text.push_str(&t),
            GenEvent::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            } => {
                let usage = Usage {
                    prompt_tokens,
                    completion_tokens,
                    total_tokens: prompt_tokens + completion_tokens,
                };
                return Ok(axum::Json(head.whole(&text, finish_reason, usage)).into_response());
            }
            GenEvent::Failed(e) => return Err(inference_error(e, prompt_param)),
        }
        ev = match rx.recv().await {
            Some(ev) => ev,
            None => return Err(ApiError::internal("the inference engine dropped a request")),
        };
    }
}

/// What every object of one answer repeats.
struct Head {
    id: String,
    created: i64,
    model: String,
    kind: Kind,
}

impl Head {
    fn whole(&self, text: &str, finish_reason: &str, usage: Usage) -> serde_json::Value {
        let choice = match self.kind {
            Kind::Chat => serde_json::json!({
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": null},
                "logprobs": null,
                "finish_reason": finish_reason,
            }),
            Kind::Text => serde_json::json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish_reason,
            }),
        };
        serde_json::json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": [choice],
            "usage": usage,
        })
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }

    /// One chunk: a piece of text (the first chat chunk also says the role), or the finish.
    fn chunk(
        &self,
        text: Option<&str>,
        role: bool,
        finish_reason: Option<&str>,
        with_usage: bool,
    ) -> serde_json::Value {
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(t) = text {
                    delta.insert("content".into(), t.into());
                }
                serde_json::json!({
                    "index": 0,
                    "delta": delta,
                    "logprobs": null,
                    "finish_reason": finish_reason,
                })
            }
            Kind::Text => serde_json::json!({
                "index": 0,
                "text": text.unwrap_or_default(),
                "logprobs": null,
                "finish_reason": finish_reason,
            }),
        };
        let mut c = serde_json::json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": [choice],
        });
        if with_usage {
            c["usage"] = serde_json::Value::Null;
        }
        c
    }
}

fn sse(v: &serde_json::Value) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data(v.to_string()))
}

/// The answer as server-sent events: a chunk per piece of text, a final chunk with the finish
/// reason, the usage chunk when asked for, then `[DONE]`. Dropping the stream (the client
/// left) drops the receiver, which stops the generation.
fn stream(
    head: Head,
    first: GenEvent,
    rx: UnboundedReceiver<GenEvent>,
    usage: bool,
) -> impl IntoResponse {
    struct S {
        head: Head,
        rx: UnboundedReceiver<GenEvent>,
        pending: Option<GenEvent>,
        started: bool,
        usage: bool,
        tail: std::collections::VecDeque<serde_json::Value>,
        done: bool,
    }
    let s = S {
        head,
        rx,
        pending: Some(first),
        started: false,
        usage,
        tail: Default::default(),
        done: false,
    };
    let events = futures::stream::unfold(s, |mut s| async move {
        if let Some(v) = s.tail.pop_front() {
            return Some((sse(&v), s));
        }
        if s.done {
            return None;
        }
        if !s.started && s.head.kind == Kind::Chat {
            s.started = true;
            let v = s.head.chunk(Some(""), true, None, s.usage);
            return Some((sse(&v), s));
        }
        s.started = true;
        let ev = match s.pending.take() {
            Some(ev) => Some(ev),
            None => s.rx.recv().await,
        };
        let ev = match ev {
            Some(ev) => ev,
            None => return None,
        };
        match ev {
            GenEvent::Text(t) => {
                let v = s.head.chunk(Some(&t), false, None, s.usage);
                Some((sse(&v), s))
            }
            GenEvent::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            } => {
                let last = s.head.chunk(None, false, Some(finish_reason), s.usage);
                if s.usage {
                    let mut u = s.head.chunk(None, false, None, false);
                    u["choices"] = serde_json::json!([]);
                    u["usage"] = serde_json::json!(Usage {
                        prompt_tokens,
                        completion_tokens,
                        total_tokens: prompt_tokens + completion_tokens,
                    });
                    s.tail.push_back(u);
                }
                s.done = true;
                Some((sse(&last), s))
            }
            GenEvent::Failed(e) => {
                tracing::error!("completion stream failed: {e}");
                s.done = true;
                let v = serde_json::json!({"error": {
                    "message": "the model failed while generating",
                    "type": "server_error", "param": null, "code": null,
                }});
                Some((sse(&v), s))
            }
        }
    });
    // `[DONE]` after the last chunk, as OpenAI ends its streams.
    let events = futures::StreamExt::chain(
        events,
        futures::stream::once(async { Ok(SseEvent::default().data("[DONE]")) }),
    );
    Sse::new(events).keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(15)))
}
