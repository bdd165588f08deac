//! BERT: embeddings (word + position + token type), post-LN encoder, pooler, classifier.
//! The encoder — and the [`Architecture`] of every encoder — is shared with RoBERTa, which
//! differs only in its [`Flavour`]: names, position ids and head.

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{Arch, ArchEntry, Architecture, Batch, MlpKind, ParamShape, Task};
use crate::nn::fused::{scaled_masked_softmax, MaskRows};
use crate::nn::{Ctx, Weights};
use crate::{Error, Result};

pub const ENTRY: ArchEntry = ArchEntry {
    model_type: "bert",
    canonical_name: |n| encoder_canonical_name(PREFIX, n),
    parse: |raw| {
        Ok(Box::new(Encoder {
            cfg: EncoderConfig::parse(raw)?,
            flavour: &BERT,
        }))
    },
    tiny_config: || {
        json!({
            "model_type": "bert", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 24, "hidden_act": "gelu",
            "max_position_embeddings": 32, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
            "pad_token_id": 0
        })
    },
};

const PREFIX: &str = "bert";
const POOLER: &str = "bert.pooler.dense";
const CLASSIFIER: &str = "classifier";

// Submodules of one encoder layer (relative to `{prefix}.encoder.layer.{i}`): written once,
// used by the forward pass, the expected parameters and the linear lists alike.
const QUERY: &str = "attention.self.query";
const KEY: &str = "attention.self.key";
const VALUE: &str = "attention.self.value";
const ATTN_OUT: &str = "attention.output.dense";
const ATTN_NORM: &str = "attention.output.LayerNorm";
const INTERMEDIATE: &str = "intermediate.dense";
const OUTPUT: &str = "output.dense";
const OUT_NORM: &str = "output.LayerNorm";
const ATTENTION: [&str; 4] = [QUERY, KEY, VALUE, ATTN_OUT];
const MLP: [(&str, MlpKind); 2] = [
    (INTERMEDIATE, MlpKind::Intermediate),
    (OUTPUT, MlpKind::Output),
];

// Embedding tables and norm (relative to `{prefix}.embeddings`).
const WORDS: &str = "word_embeddings.weight";
const POSITIONS: &str = "position_embeddings.weight";
const TOKEN_TYPES: &str = "token_type_embeddings.weight";
const EMB_NORM: &str = "LayerNorm";

fn default_eps() -> f64 {
    1e-12
}
fn default_dropout() -> f64 {
    0.1
}
fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EncoderConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: u32,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    #[serde(default)]
    pub classifier_dropout: Option<f64>,
}

impl EncoderConfig {
    pub fn parse(raw: &Value) -> Result<Self> {
        let c: EncoderConfig = super::parse_json(raw)?;
        c.validate()?;
        Ok(c)
    }
    pub fn validate(&self) -> Result<()> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(Error::Model(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        activation(&self.hidden_act)?;
        Ok(())
    }
    pub fn head_dropout(&self) -> f64 {
        self.classifier_dropout.unwrap_or(self.hidden_dropout_prob)
    }
}

/// Parameter names of an encoder whose backbone lives under `prefix` (`bert`, `roberta`).
#[derive(Clone, Copy)]
pub struct EncoderNames {
    pub prefix: &'static str,
}

impl EncoderNames {
    pub fn embeddings(&self, sub: &str) -> String {
        format!("{}.embeddings.{sub}", self.prefix)
    }
    pub fn layer(&self, i: usize, sub: &str) -> String {
        format!("{}.encoder.layer.{i}.{sub}", self.prefix)
    }
}

/// The canonical names an encoder checkpoint's tensors take: bare backbone names go under
/// `prefix`, the sequence-classification head keeps its own names.
pub fn encoder_canonical_name(prefix: &str, name: &str) -> Option<String> {
    super::canonical_under(
        name,
        prefix,
        &["embeddings.", "encoder.", "pooler."],
        &["classifier."],
    )
}

/// The backbone's parameters (embeddings and layers, not the head) with their shapes.
pub fn encoder_params(c: &EncoderConfig, n: EncoderNames) -> Vec<(String, Vec<usize>)> {
    let (h, f) = (c.hidden_size, c.intermediate_size);
    let mut out = vec![
        (n.embeddings(WORDS), vec![c.vocab_size, h]),
        (n.embeddings(POSITIONS), vec![c.max_position_embeddings, h]),
        (n.embeddings(TOKEN_TYPES), vec![c.type_vocab_size, h]),
    ];
    for s in ["weight", "bias"] {
        out.push((n.embeddings(&format!("{EMB_NORM}.{s}")), vec![h]));
    }
    for i in 0..c.num_hidden_layers {
        for (sub, o, inp) in [
            (QUERY, h, h),
            (KEY, h, h),
            (VALUE, h, h),
            (ATTN_OUT, h, h),
            (INTERMEDIATE, f, h),
            (OUTPUT, h, f),
        ] {
            out.push((n.layer(i, &format!("{sub}.weight")), vec![o, inp]));
            out.push((n.layer(i, &format!("{sub}.bias")), vec![o]));
        }
        for norm in [ATTN_NORM, OUT_NORM] {
            for s in ["weight", "bias"] {
                out.push((n.layer(i, &format!("{norm}.{s}")), vec![h]));
            }
        }
    }
    out
}

#[derive(Clone, Copy)]
pub enum Activation {
    GeluErf,
    GeluTanh,
    Relu,
    Silu,
}

pub fn activation(name: &str) -> Result<Activation> {
    match name {
        "gelu" => Ok(Activation::GeluErf),
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
        "relu" => Ok(Activation::Relu),
        "silu" | "swish" => Ok(Activation::Silu),
        other => Err(Error::Model(format!("unsupported hidden_act `{other}`"))),
    }
}

pub fn apply_activation(a: Activation, x: &Tensor) -> Result<Tensor> {
    Ok(match a {
        Activation::GeluErf => crate::nn::gelu_erf(x)?,
        Activation::GeluTanh => crate::nn::gelu_tanh(x)?,
        Activation::Relu => x.relu()?,
        Activation::Silu => x.silu()?,
    })
}

/// `(B, T)` 0/1 mask → additive `(B, T)` bias: 0 for keys to attend, a large negative number
/// for padding.
pub fn additive_key_mask(mask: &Tensor) -> Result<Tensor> {
    let neg = match mask.dtype() {
        DType::F16 => -6e4,
        _ => -1e9,
    };
    Ok(((mask.ones_like()? - mask)? * neg)?)
}

/// The shared encoder: returns the last hidden states `(B, T, H)`.
pub fn encoder(
    cfg: &EncoderConfig,
    w: &Weights,
    n: EncoderNames,
    batch: &Batch,
    position_ids: &Tensor,
    ctx: &mut Ctx,
) -> Result<Tensor> {
    let act = activation(&cfg.hidden_act)?;
    let mut h = w.embedding(&n.embeddings(WORDS), &batch.input_ids)?;
    h = h.broadcast_add(&w.embedding(&n.embeddings(POSITIONS), position_ids)?)?;
    let tt_name = n.embeddings(TOKEN_TYPES);
    if let Some(tt) = w.get_opt(&tt_name) {
        let ids = if tt.dim(0)? == 1 {
            batch.token_type_ids.zeros_like()?
        } else {
            batch.token_type_ids.clone()
        };
        h = (h + w.embedding(&tt_name, &ids)?)?;
    }
    h = w.layer_norm(&n.embeddings(EMB_NORM), &h, cfg.layer_norm_eps)?;
    h = ctx.dropout(&h, cfg.hidden_dropout_prob)?;

    let (b, t, hidden) = h.dims3()?;
    let heads = cfg.num_attention_heads;
    let hd = hidden / heads;
    let mask = additive_key_mask(&batch.attention_mask)?;
    let scale = 1.0 / (hd as f64).sqrt();
    for i in 0..cfg.num_hidden_layers {
        let l = |sub: &str| n.layer(i, sub);
        let split = |x: Tensor| -> Result<Tensor> {
            Ok(x.reshape((b, t, heads, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split(w.linear(&l(QUERY), &h, ctx)?)?;
        let k = split(w.linear(&l(KEY), &h, ctx)?)?;
        let v = split(w.linear(&l(VALUE), &h, ctx)?)?;
        let probs = scaled_masked_softmax(&q.matmul(&k.t()?)?, scale, &mask, MaskRows::PerBatch)?;
        let probs = ctx.dropout(&probs, cfg.attention_probs_dropout_prob)?;
        let a = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, hidden))?;
        let a = w.linear(&l(ATTN_OUT), &a, ctx)?;
        let a = ctx.dropout(&a, cfg.hidden_dropout_prob)?;
        let h1 = w.layer_norm(&l(ATTN_NORM), &(a + &h)?, cfg.layer_norm_eps)?;
        let m = w.linear(&l(INTERMEDIATE), &h1, ctx)?;
        let m = apply_activation(act, &m)?;
        let m = w.linear(&l(OUTPUT), &m, ctx)?;
        let m = ctx.dropout(&m, cfg.hidden_dropout_prob)?;
        h = w.layer_norm(&l(OUT_NORM), &(m + h1)?, cfg.layer_norm_eps)?;
    }
    Ok(h)
}

/// A head linear's weight and bias with their shapes.
pub fn head_param(name: &str, out: usize, inp: usize) -> [(String, Vec<usize>); 2] {
    [
        (format!("{name}.weight"), vec![out, inp]),
        (format!("{name}.bias"), vec![out]),
    ]
}

/// What sets one encoder family apart from another: where its backbone lives, its head and
/// how it numbers positions. The encoder itself, and everything else, is shared.
pub struct Flavour {
    pub arch: Arch,
    pub names: EncoderNames,
    /// The head's two linears: a dense layer (tanh) on the first token, then the classifier.
    pub head: [&'static str; 2],
    /// Dropout on the first token before the dense layer too (RoBERTa), not only after it.
    pub dropout_before_dense: bool,
    /// transformers' class for a merged model's `architectures`.
    pub class_name: &'static str,
    /// Position ids `(B, T)` from input ids and the padding id.
    pub position_ids: fn(&Tensor, u32) -> Result<Tensor>,
}

/// An encoder of some [`Flavour`] with its config: BERT and RoBERTa.
pub struct Encoder {
    pub cfg: EncoderConfig,
    pub flavour: &'static Flavour,
}

/// `0, 1, …, T-1` on every row.
pub fn sequential_positions(input_ids: &Tensor, _pad: u32) -> Result<Tensor> {
    let (b, t) = input_ids.dims2()?;
    let pos: Vec<u32> = (0..t as u32).collect();
    Ok(Tensor::from_vec(pos, (1, t), input_ids.device())?
        .broadcast_as((b, t))?
        .contiguous()?)
}

pub const BERT: Flavour = Flavour {
    arch: Arch::Bert,
    names: EncoderNames { prefix: PREFIX },
    head: [POOLER, CLASSIFIER],
    dropout_before_dense: false,
    class_name: "BertForSequenceClassification",
    position_ids: sequential_positions,
};

impl Architecture for Encoder {
    fn arch(&self) -> Arch {
        self.flavour.arch
    }
    fn num_layers(&self) -> usize {
        self.cfg.num_hidden_layers
    }
    fn pad_id(&self) -> u32 {
        self.cfg.pad_token_id
    }
    fn supports(&self, task: &Task) -> bool {
        matches!(task, Task::Classification { .. } | Task::Regression)
    }
    fn expected_params(&self, task: &Task) -> Vec<(String, Vec<usize>)> {
        let h = self.cfg.hidden_size;
        let [dense, classifier] = self.flavour.head;
        let mut out = encoder_params(&self.cfg, self.flavour.names);
        out.extend(head_param(dense, h, h));
        out.extend(head_param(classifier, task.head_width().unwrap_or(1), h));
        out
    }
    fn head_linears(&self) -> Vec<String> {
        self.flavour.head.map(String::from).to_vec()
    }
    fn mlp_linears(&self) -> Vec<(String, MlpKind, usize)> {
        let n = self.flavour.names;
        (0..self.cfg.num_hidden_layers)
            .flat_map(|i| MLP.map(|(sub, kind)| (n.layer(i, sub), kind, i)))
            .collect()
    }
    fn attention_linears(&self) -> Vec<String> {
        let n = self.flavour.names;
        (0..self.cfg.num_hidden_layers)
            .flat_map(|i| ATTENTION.map(|sub| n.layer(i, sub)))
            .collect()
    }
    fn hidden_states(&self, w: &Weights, batch: &Batch, ctx: &mut Ctx) -> Result<Tensor> {
        let pos = (self.flavour.position_ids)(&batch.input_ids, self.cfg.pad_token_id)?;
        encoder(&self.cfg, w, self.flavour.names, batch, &pos, ctx)
    }
    /// Classification logits `(B, C)`, or `(B,)` for regression.
    fn forward(&self, w: &Weights, task: &Task, batch: &Batch, ctx: &mut Ctx) -> Result<Tensor> {
        let h = self.hidden_states(w, batch, ctx)?;
        let p = self.cfg.head_dropout();
        let [dense, classifier] = self.flavour.head;
        let mut x = h.narrow(1, 0, 1)?.squeeze(1)?;
        if self.flavour.dropout_before_dense {
            x = ctx.dropout(&x, p)?;
        }
        let x = w.linear(dense, &x, ctx)?.tanh()?;
        let x = ctx.dropout(&x, p)?;
        let logits = w.linear(classifier, &x, ctx)?;
        match task {
            Task::Regression => Ok(logits.squeeze(D::Minus1)?),
            _ => Ok(logits),
        }
    }
    fn merged_config(&self, raw: &Value, task: &Task, labels: Option<&[String]>) -> Value {
        super::classifier_config(raw, self.flavour.class_name, task, labels)
    }
    fn shape(&self) -> ParamShape {
        let h = self.cfg.hidden_size as u64;
        ParamShape {
            vocab: self.cfg.vocab_size as u64,
            hidden: h,
            layers: self.cfg.num_hidden_layers as u64,
            ffn: self.cfg.intermediate_size as u64,
            kv_dim: h,
            mlp_matrices: MLP.len() as u64,
            heads: self.cfg.num_attention_heads as u64,
            // A dense layer on the first token plus a two-label classifier.
            head: h * h + 3 * h + 2,
        }
    }
}
