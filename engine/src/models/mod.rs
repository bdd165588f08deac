//! Trainable models under canonical Hugging Face parameter names (those of
//! `BertForSequenceClassification`, `RobertaForSequenceClassification`, `LlamaForCausalLM`).
//!
//! One file per architecture owns everything about it — its config, its parameter names, the
//! parameters it expects, its forward pass, which linears are MLP and attention, its task head,
//! the tasks it supports, its sizes for estimates and the config of a merged model — behind the
//! [`Architecture`] trait. The [`registry!`] below is the only list of architectures: adding one
//! is a new file plus one line there.

pub mod bert;
pub mod llama;
pub mod roberta;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::nn::{Ctx, Weights};
use crate::{Error, Result};

/// What one architecture's file exports to the registry.
#[derive(Clone, Copy)]
pub struct ArchEntry {
    /// `model_type` in `config.json`.
    pub model_type: &'static str,
    /// Maps a checkpoint tensor name to the canonical name, or `None` for tensors the task
    /// model does not use (pre-training heads, buffers). Needs no config: weights are read
    /// before the config is checked against them.
    pub canonical_name: fn(&str) -> Option<String>,
    /// Parses and validates `config.json`.
    pub parse: fn(&Value) -> Result<Box<dyn Architecture>>,
    /// A config.json for a tiny random model (unit tests, gradient checks).
    pub tiny_config: fn() -> Value,
}

/// One architecture, configured: everything the engine needs to know about a model family.
pub trait Architecture: Send + Sync {
    fn arch(&self) -> Arch;
    fn num_layers(&self) -> usize;
    /// The token batches are padded with.
    fn pad_id(&self) -> u32;
    /// Whether this architecture trains for `task` here.
    fn supports(&self, task: &Task) -> bool;
    /// The task a model is loaded for when nobody names one (a causal LM's own).
    fn default_task(&self) -> Option<Task> {
        None
    }
    /// Every canonical parameter a model for `task` has, with its shape.
    fn expected_params(&self, task: &Task) -> Vec<(String, Vec<usize>)>;
    /// Checkpoint tensors that duplicate another (a tied LM head): dropped when loading.
    fn tied_params(&self) -> Vec<String> {
        Vec::new()
    }
    /// The task head's linears (newly initialised when the checkpoint lacks them).
    fn head_linears(&self) -> Vec<String>;
    /// Every MLP linear layer: `(prefix, kind, layer index)`.
    fn mlp_linears(&self) -> Vec<(String, MlpKind, usize)>;
    /// Every attention linear layer prefix.
    fn attention_linears(&self) -> Vec<String>;
    /// Logits: `(B, num_labels)` for classification, `(B,)` for regression, `(B, T, V)` for LM.
    fn forward(&self, w: &Weights, task: &Task, batch: &Batch, ctx: &mut Ctx) -> Result<Tensor>;
    /// Causal LM, incremental: next-token logits `(B, T, V)` for `ids (B, T)` following the
    /// `cache.len` tokens whose keys and values `cache` holds (appending the new ones), so
    /// generation computes each token once. `None` where the architecture has no cache.
    fn decode(&self, _w: &Weights, _ids: &Tensor, _cache: &mut KvCache) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Causal LM, one step over sequences of different overlays and lengths (see
    /// [`crate::serve::decode_step`]): the logits after each sequence's last new token.
    fn decode_rows(&self, _seqs: &mut [crate::serve::StepSeq<'_>]) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Causal LM: the final hidden states `(B·T, H)` and the output projection's weight name,
    /// so the loss can be taken a chunk of rows at a time ([`crate::nn::chunked_lm_loss`]).
    fn lm_hidden(
        &self,
        _w: &Weights,
        _batch: &Batch,
        _ctx: &mut Ctx,
    ) -> Result<Option<(Tensor, &'static str)>> {
        Ok(None)
    }
    /// The encoder's last hidden states `(B, T, H)`.
    fn hidden_states(&self, _w: &Weights, _batch: &Batch, _ctx: &mut Ctx) -> Result<Tensor> {
        Err(Error::Model("hidden_states is for encoder models".into()))
    }
    /// `config.json` of a merged model: the base config plus what the task head needs.
    fn merged_config(&self, raw: &Value, task: &Task, labels: Option<&[String]>) -> Value;
    /// The sizes estimates are made from.
    fn shape(&self) -> ParamShape;
}

/// Declares the architectures: the `Arch` enum, its `model_type` names and each one's
/// [`ArchEntry`]. One line per architecture.
macro_rules! registry {
    ($($variant:ident => $entry:path),+ $(,)?) => {
        /// A supported architecture (serialised as its `model_type`).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Arch {
            $($variant),+
        }

        impl Arch {
            pub const ALL: &'static [Arch] = &[$(Arch::$variant),+];

            pub fn entry(self) -> &'static ArchEntry {
                match self {
                    $(Arch::$variant => &$entry),+
                }
            }
        }
    };
}

registry! {
    Bert => bert::ENTRY,
    Roberta => roberta::ENTRY,
    Llama => llama::ENTRY,
}

impl Arch {
    pub fn from_model_type(t: &str) -> Result<Arch> {
        Arch::ALL
            .iter()
            .copied()
            .find(|a| a.as_str() == t)
            .ok_or_else(|| {
                let known: Vec<&str> = Arch::ALL.iter().map(|a| a.as_str()).collect();
                Error::Model(format!(
                    "unsupported model_type `{t}` ({} are supported)",
                    known.join(", ")
                ))
            })
    }

    /// The architecture a `config.json` names (its `model_type`).
    pub fn of_config(raw: &Value) -> Result<Arch> {
        let mt = raw
            .get("model_type")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::Model("config.json has no model_type".into()))?;
        Arch::from_model_type(mt)
    }

    pub fn as_str(self) -> &'static str {
        self.entry().model_type
    }

    /// Parses and validates a `config.json` of this architecture.
    pub fn parse(self, raw: &Value) -> Result<Box<dyn Architecture>> {
        (self.entry().parse)(raw)
    }

    pub fn canonical_name(self, name: &str) -> Option<String> {
        (self.entry().canonical_name)(name)
    }

    pub fn tiny_config(self) -> Value {
        (self.entry().tiny_config)()
    }
}

impl Serialize for Arch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Arch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Arch::from_model_type(&s).map_err(serde::de::Error::custom)
    }
}

/// The architecture a `config.json` declares, parsed and validated.
pub fn from_config(raw: &Value) -> Result<Box<dyn Architecture>> {
    Arch::of_config(raw)?.parse(raw)
}

/// Deserialises an architecture's config struct, naming the file in errors.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(raw: &Value) -> Result<T> {
    serde_json::from_value(raw.clone()).map_err(|e| Error::Model(format!("config.json: {e}")))
}

/// The usual canonicalisation: old `gamma`/`beta` LayerNorm names renamed, buffers dropped,
/// bare backbone names (`encoder.…`) put under `prefix`, and names under `prefix.` or one of
/// `own` (the head) kept as they are.
pub(crate) fn canonical_under(
    name: &str,
    prefix: &str,
    bare: &[&str],
    own: &[&str],
) -> Option<String> {
    let mut n = name.to_string();
    if n.contains("LayerNorm.gamma") || n.contains("LayerNorm.beta") {
        n = n
            .replace("LayerNorm.gamma", "LayerNorm.weight")
            .replace("LayerNorm.beta", "LayerNorm.bias");
    }
    if n.ends_with("position_ids") || n.ends_with("rotary_emb.inv_freq") {
        return None;
    }
    if n.starts_with(&format!("{prefix}.")) || own.iter().any(|o| n.starts_with(o)) {
        Some(n)
    } else if bare.iter().any(|s| n.starts_with(s)) {
        Some(format!("{prefix}.{n}"))
    } else {
        None
    }
}

/// Sizes of a model read from its config alone (no weights), for dry-run estimates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ParamShape {
    pub vocab: u64,
    pub hidden: u64,
    pub layers: u64,
    pub ffn: u64,
    /// Width of the key and value projections (smaller than `hidden` with grouped queries).
    pub kv_dim: u64,
    /// MLP matrices per block (BERT's two, LLaMA's three).
    pub mlp_matrices: u64,
    /// Attention (query) heads: the attention scores kept for backward scale with them.
    pub heads: u64,
    /// Parameters of a newly initialised two-label task head (0 for a causal LM).
    pub head: u64,
}

impl ParamShape {
    /// Parameters of the transformer blocks (what the per-token FLOPs scale with).
    pub fn block_params(&self) -> u64 {
        let (h, f) = (self.hidden, self.ffn);
        let attn = h * h * 2 + h * self.kv_dim * 2;
        self.layers * (attn + self.mlp_matrices * h * f)
    }
    /// What the `mlp` scope trains beside the head: the MLP biases and the norms (BERT and
    /// RoBERTa: both MLP biases and two LayerNorms per block plus the embeddings'; LLaMA: two
    /// RMSNorm weights per block plus the final one, no biases).
    pub fn mlp_scope_extra(&self) -> u64 {
        let h = self.hidden;
        if self.mlp_matrices == 2 {
            self.layers * (self.ffn + h + 4 * h) + 2 * h
        } else {
            self.layers * 2 * h + h
        }
    }

    pub fn params(&self) -> u64 {
        self.block_params() + self.vocab * self.hidden
    }
    /// Entries of the MLP matrices.
    pub fn mlp_params(&self) -> u64 {
        self.layers * self.mlp_matrices * self.hidden * self.ffn
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Task {
    Classification { num_labels: usize },
    Regression,
    CausalLm,
}

impl Task {
    pub fn name(&self) -> &'static str {
        match self {
            Task::Classification { .. } => "classification",
            Task::Regression => "regression",
            Task::CausalLm => "causal-lm",
        }
    }
    /// Output width of a sequence-classification head.
    pub fn head_width(&self) -> Option<usize> {
        match self {
            Task::Classification { num_labels } => Some(*num_labels),
            Task::Regression => Some(1),
            Task::CausalLm => None,
        }
    }
}

/// A padded batch on the model's device. Encoder batches carry labels per sequence; causal-LM
/// batches carry next-token targets and a loss mask per position.
#[derive(Clone, Debug)]
pub struct Batch {
    /// `(B, T)` u32
    pub input_ids: Tensor,
    /// `(B, T)` u32
    pub token_type_ids: Tensor,
    /// `(B, T)` in the compute dtype, 1 for real tokens.
    pub attention_mask: Tensor,
    pub labels: Labels,
    /// Non-padding tokens in the batch.
    pub num_tokens: usize,
    pub batch_size: usize,
}

#[derive(Clone, Debug)]
pub enum Labels {
    None,
    /// `(B,)` u32
    Class(Tensor),
    /// `(B,)` compute dtype
    Value(Tensor),
    /// `targets (B, T)` u32 = the token at t+1; `mask (B, T)` compute dtype, 1 where counted.
    NextToken {
        targets: Tensor,
        mask: Tensor,
    },
}

/// Which MLP matrix of a block a linear layer is (SparseGrad shares one basis per type).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum MlpKind {
    Intermediate,
    Output,
    Gate,
    Up,
    Down,
}

impl MlpKind {
    pub const ALL: [MlpKind; 5] = [
        MlpKind::Intermediate,
        MlpKind::Output,
        MlpKind::Gate,
        MlpKind::Up,
        MlpKind::Down,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            MlpKind::Intermediate => "intermediate",
            MlpKind::Output => "output",
            MlpKind::Gate => "gate",
            MlpKind::Up => "up",
            MlpKind::Down => "down",
        }
    }
}

/// A loaded model: an architecture, the task it is set up for, and its weights.
/// Keys and values of the tokens a causal LM has seen, per layer (`(B, KV heads, len, D)`,
/// after RoPE), for [`Model::decode`].
#[derive(Debug, Default)]
pub struct KvCache {
    pub(crate) layers: Vec<(Tensor, Tensor)>,
    /// Tokens held.
    pub len: usize,
}

impl KvCache {
    /// Layer `i`'s keys and values with `k`, `v` (`(B, KV heads, new, D)`) appended after what
    /// it held, kept for the next call and returned.
    pub(crate) fn append(&mut self, i: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match self.layers.get(i) {
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
            None => (k, v),
        };
        if i < self.layers.len() {
            self.layers[i] = (k.clone(), v.clone());
        } else {
            self.layers.push((k.clone(), v.clone()));
        }
        Ok((k, v))
    }

    /// Bytes the cache holds.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }
}

pub struct Model {
    pub arch: Arch,
    pub task: Task,
    pub architecture: Box<dyn Architecture>,
    /// The checkpoint's config.json, kept so merged models are written with it.
    pub raw_config: Value,
    pub weights: Weights,
    /// Identity of the base weights (sha256 of the weight files) when loaded from disk; keys
    /// caches of things derived from the base model (SparseGrad bases).
    pub fingerprint: Option<String>,
}

impl Model {
    pub fn dtype(&self) -> DType {
        self.weights.dtype
    }

    /// Logits: `(B, num_labels)` for classification, `(B,)` for regression, `(B, T, V)` for LM.
    pub fn forward(&self, batch: &Batch, ctx: &mut Ctx) -> Result<Tensor> {
        let view = self.view(ctx);
        self.architecture.forward(
            view.as_ref().unwrap_or(&self.weights),
            &self.task,
            batch,
            ctx,
        )
    }

    /// Next-token logits of `ids (B, T)` after what `cache` holds (see
    /// [`Architecture::decode`]); `None` where the architecture has no cache.
    pub fn decode(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Option<Tensor>> {
        let ctx = Ctx::inference();
        let view = self.view(&ctx);
        self.architecture
            .decode(view.as_ref().unwrap_or(&self.weights), ids, cache)
    }

    /// Under [`Ctx::inference`], the weights detached (when any trains); otherwise `None`.
    fn view(&self, ctx: &Ctx) -> Option<Weights> {
        (ctx.no_grad && self.weights.has_trainable()).then(|| self.weights.detached())
    }

    /// The training loss of a batch (its value and, through `backward`, its gradient): for
    /// causal LM taken chunk by chunk from the final hidden states, so neither the whole
    /// `(B·T, V)` logits nor their gradient ever exist; otherwise [`Self::loss`] of the logits.
    pub fn forward_loss(&self, batch: &Batch, ctx: &mut Ctx) -> Result<Tensor> {
        if let Labels::NextToken { targets, mask } = &batch.labels {
            let view = self.view(ctx);
            let w = view.as_ref().unwrap_or(&self.weights);
            if let Some((h, head)) = self.architecture.lm_hidden(w, batch, ctx)? {
                let head = w
                    .params
                    .get(head)
                    .ok_or_else(|| Error::Model(format!("missing {head}")))?;
                let rows = crate::nn::lm_loss_chunk_rows(head.tensor().dim(0)?);
                return crate::nn::chunked_lm_loss(
                    &h,
                    head,
                    &targets.flatten_all()?,
                    &mask.flatten_all()?,
                    rows,
                    !ctx.no_grad,
                );
            }
        }
        let logits = self.forward(batch, ctx)?;
        self.loss(&logits, batch)
    }

    /// The encoder's last hidden states `(B, T, H)` (BERT / RoBERTa).
    pub fn hidden_states(&self, batch: &Batch, ctx: &mut Ctx) -> Result<Tensor> {
        self.architecture.hidden_states(&self.weights, batch, ctx)
    }

    /// The loss, in f32 (f64 for f64 models): a bf16 log-softmax over a 32k vocabulary and a
    /// bf16 sum over thousands of tokens lose most of their digits (the sum stalls once its
    /// spacing exceeds the terms). The gradient flows back through the cast into the bf16
    /// graph.
    pub fn loss(&self, logits: &Tensor, batch: &Batch) -> Result<Tensor> {
        let dt = match logits.dtype() {
            DType::F64 => DType::F64,
            _ => DType::F32,
        };
        let logits = &logits.to_dtype(dt)?;
        match &batch.labels {
            Labels::Class(y) => {
                let ones = Tensor::ones(y.dims1()?, dt, logits.device())?;
                crate::nn::cross_entropy(logits, y, &ones)
            }
            Labels::Value(y) => crate::nn::mse(logits, &y.to_dtype(dt)?),
            Labels::NextToken { targets, mask } => {
                let v = logits.dim(2)?;
                crate::nn::cross_entropy(
                    &logits.reshape(((), v))?,
                    &targets.flatten_all()?,
                    &mask.flatten_all()?.to_dtype(dt)?,
                )
            }
            Labels::None => Err(Error::Other("batch has no labels".into())),
        }
    }

    pub fn num_layers(&self) -> usize {
        self.architecture.num_layers()
    }

    pub fn pad_id(&self) -> u32 {
        self.architecture.pad_id()
    }

    /// Every MLP linear layer: `(prefix, kind, layer index)`.
    pub fn mlp_linears(&self) -> Vec<(String, MlpKind, usize)> {
        self.architecture.mlp_linears()
    }

    /// Every attention linear layer prefix.
    pub fn attention_linears(&self) -> Vec<String> {
        self.architecture.attention_linears()
    }

    /// The biases of the MLP linears in `layers` and every normalisation layer's parameters:
    /// a few thousand values per block, which the `mlp` scope trains densely beside the
    /// sparse or low-rank MLP update (they shift and rescale what the MLP sees and emits).
    pub fn mlp_extra_params(&self, layers: impl Fn(usize) -> bool) -> Vec<String> {
        let mut out: Vec<String> = self
            .mlp_linears()
            .into_iter()
            .filter(|(_, _, l)| layers(*l))
            .map(|(p, _, _)| format!("{p}.bias"))
            .filter(|n| self.weights.contains(n))
            .collect();
        out.extend(
            self.weights
                .params
                .keys()
                .filter(|n| is_norm_param(n))
                .cloned(),
        );
        out.sort();
        out.dedup();
        out
    }

    /// Parameters of the task head (newly initialised when the checkpoint lacks them).
    pub fn head_params(&self) -> Vec<String> {
        self.architecture
            .head_linears()
            .iter()
            .flat_map(|l| [format!("{l}.weight"), format!("{l}.bias")])
            .collect()
    }

    /// The `config.json` a merged model is written with: the base config plus the task head.
    pub fn merged_config(&self, id2label: Option<&[String]>) -> Value {
        self.architecture
            .merged_config(&self.raw_config, &self.task, id2label)
    }
}

/// A normalisation layer's weight or bias (`…LayerNorm.weight`, `…input_layernorm.weight`,
/// `model.norm.weight`): the module name before the last dot contains "norm".
pub fn is_norm_param(name: &str) -> bool {
    let mut parts = name.rsplit('.');
    matches!(parts.next(), Some("weight" | "bias"))
        && parts
            .next()
            .is_some_and(|m| m.to_ascii_lowercase().contains("norm"))
}

/// Checks that `arch` trains for `task`, saying why not.
pub fn check_task(arch: &dyn Architecture, task: &Task) -> Result<()> {
    if !arch.supports(task) {
        return Err(Error::param(
            "task",
            format!(
                "{} models are not supported for {} here",
                arch.arch().as_str(),
                task.name()
            ),
        ));
    }
    if let Task::Classification { num_labels } = task {
        if *num_labels < 2 {
            return Err(Error::param(
                "task",
                "classification needs at least two labels",
            ));
        }
    }
    Ok(())
}

/// A sequence classifier's merged config: the architectures entry, label count, problem type
/// and label names (what transformers' `*ForSequenceClassification` reads).
pub(crate) fn classifier_config(
    raw: &Value,
    class_name: &str,
    task: &Task,
    labels: Option<&[String]>,
) -> Value {
    let mut c = raw.clone();
    if let Some(obj) = c.as_object_mut() {
        obj.insert("architectures".into(), serde_json::json!([class_name]));
        obj.insert("num_labels".into(), task.head_width().unwrap_or(1).into());
        let problem = if *task == Task::Regression {
            "regression"
        } else {
            "single_label_classification"
        };
        obj.insert("problem_type".into(), problem.into());
        if let Some(names) = labels {
            let id2: serde_json::Map<_, _> = names
                .iter()
                .enumerate()
                .map(|(i, n)| (i.to_string(), Value::from(n.clone())))
                .collect();
            let l2: serde_json::Map<_, _> = names
                .iter()
                .enumerate()
                .map(|(i, n)| (n.clone(), Value::from(i)))
                .collect();
            obj.insert("id2label".into(), id2.into());
            obj.insert("label2id".into(), l2.into());
        }
    }
    c
}

/// The head a merged encoder's `config.json` declares ([`classifier_config`] wrote it): a
/// `…ForSequenceClassification` architecture with its `num_labels`, `problem_type` and
/// `id2label` names. `None` for anything else (a bare encoder, a causal LM).
pub fn head_of_config(raw: &Value) -> Option<(Task, Option<crate::data::LabelMap>)> {
    let classifier = raw
        .get("architectures")?
        .as_array()?
        .iter()
        .filter_map(Value::as_str)
        .any(|a| a.ends_with("ForSequenceClassification"));
    if !classifier {
        return None;
    }
    if raw.get("problem_type").and_then(Value::as_str) == Some("regression") {
        return Some((Task::Regression, None));
    }
    let id2label = raw.get("id2label").and_then(Value::as_object);
    let n = raw
        .get("num_labels")
        .and_then(Value::as_u64)
        .map(|n| n as usize)
        .or(id2label.map(|m| m.len()))
        .unwrap_or(2);
    // Bounded like any head the service trains; names only when every index 0..n has one.
    if !(2..=crate::data::MAX_CLASSES).contains(&n) {
        return None;
    }
    let names: Option<Vec<String>> = id2label.and_then(|m| {
        (0..n)
            .map(|i| m.get(&i.to_string())?.as_str().map(str::to_string))
            .collect()
    });
    let labels = names.map(|names| crate::data::LabelMap { names });
    Some((Task::Classification { num_labels: n }, labels))
}

#[cfg(test)]
mod tests {
    use super::is_norm_param;

    #[test]
    fn a_merged_config_names_its_head() {
        use super::{classifier_config, head_of_config, Task};
        let raw = serde_json::json!({"model_type": "bert", "architectures": ["BertModel"]});
        assert!(head_of_config(&raw).is_none());
        let names = ["neg".to_string(), "pos".to_string(), "mixed".to_string()];
        let c = classifier_config(
            &raw,
            "BertForSequenceClassification",
            &Task::Classification { num_labels: 3 },
            Some(&names),
        );
        let (t, labels) = head_of_config(&c).unwrap();
        assert_eq!(t, Task::Classification { num_labels: 3 });
        assert_eq!(labels.unwrap().names, names);
        let r = classifier_config(
            &raw,
            "BertForSequenceClassification",
            &Task::Regression,
            None,
        );
        assert_eq!(head_of_config(&r).unwrap().0, Task::Regression);
        let mut huge = c.clone();
        huge["num_labels"] = 1_000_000.into();
        assert!(head_of_config(&huge).is_none());
    }

    #[test]
    fn norm_params_are_found_by_module_name() {
        for n in [
            "bert.embeddings.LayerNorm.weight",
            "roberta.encoder.layer.3.output.LayerNorm.bias",
            "model.layers.0.input_layernorm.weight",
            "model.layers.7.post_attention_layernorm.weight",
            "model.norm.weight",
        ] {
            assert!(is_norm_param(n), "{n}");
        }
        for n in [
            "bert.encoder.layer.0.output.dense.weight",
            "model.layers.0.mlp.down_proj.weight",
            "model.embed_tokens.weight",
            "normalizer.scale",
            "LayerNorm",
        ] {
            assert!(!is_norm_param(n), "{n}");
        }
    }
}
