//! Trainable models under canonical Hugging Face parameter names (those of
//! `BertForSequenceClassification`, `RobertaForSequenceClassification`, `LlamaForCausalLM`).

pub mod bert;
pub mod llama;
pub mod roberta;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::nn::{Ctx, Weights};
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    Bert,
    Roberta,
    Llama,
}

impl Arch {
    pub fn from_model_type(t: &str) -> Result<Arch> {
        match t {
            "bert" => Ok(Arch::Bert),
            "roberta" => Ok(Arch::Roberta),
            "llama" => Ok(Arch::Llama),
            other => Err(Error::Model(format!(
                "unsupported model_type `{other}` (bert, roberta and llama are supported)"
            ))),
        }
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            Arch::Bert => "bert",
            Arch::Roberta => "roberta",
            Arch::Llama => "llama",
        }
    }
    /// The canonical prefix of the backbone's parameters.
    pub fn backbone_prefix(&self) -> &'static str {
        match self {
            Arch::Bert => "bert",
            Arch::Roberta => "roberta",
            Arch::Llama => "model",
        }
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

pub enum Config {
    Encoder(bert::EncoderConfig),
    Llama(llama::LlamaConfig),
}

pub struct Model {
    pub arch: Arch,
    pub task: Task,
    pub config: Config,
    /// The checkpoint's config.json, kept so merged models are written with it.
    pub raw_config: serde_json::Value,
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
        match (&self.config, self.arch) {
            (Config::Encoder(c), Arch::Bert) => {
                bert::forward(c, &self.weights, &self.task, batch, ctx)
            }
            (Config::Encoder(c), Arch::Roberta) => {
                roberta::forward(c, &self.weights, &self.task, batch, ctx)
            }
            (Config::Llama(c), Arch::Llama) => llama::forward(c, &self.weights, batch, ctx),
            _ => Err(Error::Model("config does not match architecture".into())),
        }
    }

    /// The encoder's last hidden states `(B, T, H)` (BERT / RoBERTa).
    pub fn hidden_states(&self, batch: &Batch, ctx: &mut Ctx) -> Result<Tensor> {
        match (&self.config, self.arch) {
            (Config::Encoder(c), Arch::Bert) => bert::hidden_states(c, &self.weights, batch, ctx),
            (Config::Encoder(c), Arch::Roberta) => {
                roberta::hidden_states(c, &self.weights, batch, ctx)
            }
            _ => Err(Error::Model("hidden_states is for encoder models".into())),
        }
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
        match &self.config {
            Config::Encoder(c) => c.num_hidden_layers,
            Config::Llama(c) => c.num_hidden_layers,
        }
    }

    /// Every MLP linear layer: `(prefix, kind, layer index)`.
    pub fn mlp_linears(&self) -> Vec<(String, MlpKind, usize)> {
        let p = self.arch.backbone_prefix();
        let mut out = Vec::new();
        for i in 0..self.num_layers() {
            match self.arch {
                Arch::Bert | Arch::Roberta => {
                    let l = format!("{p}.encoder.layer.{i}");
                    out.push((format!("{l}.intermediate.dense"), MlpKind::Intermediate, i));
                    out.push((format!("{l}.output.dense"), MlpKind::Output, i));
                }
                Arch::Llama => {
                    let l = format!("{p}.layers.{i}.mlp");
                    out.push((format!("{l}.gate_proj"), MlpKind::Gate, i));
                    out.push((format!("{l}.up_proj"), MlpKind::Up, i));
                    out.push((format!("{l}.down_proj"), MlpKind::Down, i));
                }
            }
        }
        out
    }

    /// Every attention linear layer prefix.
    pub fn attention_linears(&self) -> Vec<String> {
        let p = self.arch.backbone_prefix();
        let mut out = Vec::new();
        for i in 0..self.num_layers() {
            match self.arch {
                Arch::Bert | Arch::Roberta => {
                    let l = format!("{p}.encoder.layer.{i}.attention");
                    for s in ["self.query", "self.key", "self.value", "output.dense"] {
                        out.push(format!("{l}.{s}"));
                    }
                }
                Arch::Llama => {
                    let l = format!("{p}.layers.{i}.self_attn");
                    for s in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                        out.push(format!("{l}.{s}"));
                    }
                }
            }
        }
        out
    }

    /// Parameters of the task head (newly initialised when the checkpoint lacks them).
    pub fn head_params(&self) -> Vec<String> {
        match self.arch {
            Arch::Bert => vec![
                "bert.pooler.dense.weight".into(),
                "bert.pooler.dense.bias".into(),
                "classifier.weight".into(),
                "classifier.bias".into(),
            ],
            Arch::Roberta => vec![
                "classifier.dense.weight".into(),
                "classifier.dense.bias".into(),
                "classifier.out_proj.weight".into(),
                "classifier.out_proj.bias".into(),
            ],
            Arch::Llama => vec![],
        }
    }

    /// The `config.json` a merged model is written with: the base config plus the task head.
    pub fn merged_config(&self, id2label: Option<&[String]>) -> serde_json::Value {
        let mut c = self.raw_config.clone();
        if let Some(obj) = c.as_object_mut() {
            match (&self.task, self.arch) {
                (Task::CausalLm, _) => {
                    obj.insert(
                        "architectures".into(),
                        serde_json::json!(["LlamaForCausalLM"]),
                    );
                }
                (task, arch) => {
                    let name = if arch == Arch::Bert {
                        "BertForSequenceClassification"
                    } else {
                        "RobertaForSequenceClassification"
                    };
                    obj.insert("architectures".into(), serde_json::json!([name]));
                    let n = task.head_width().unwrap_or(1);
                    obj.insert("num_labels".into(), n.into());
                    if *task == Task::Regression {
                        obj.insert("problem_type".into(), "regression".into());
                    } else {
                        obj.insert("problem_type".into(), "single_label_classification".into());
                    }
                    if let Some(names) = id2label {
                        let id2: serde_json::Map<_, _> = names
                            .iter()
                            .enumerate()
                            .map(|(i, n)| (i.to_string(), serde_json::Value::from(n.clone())))
                            .collect();
                        let l2: serde_json::Map<_, _> = names
                            .iter()
                            .enumerate()
                            .map(|(i, n)| (n.clone(), serde_json::Value::from(i)))
                            .collect();
                        obj.insert("id2label".into(), id2.into());
                        obj.insert("label2id".into(), l2.into());
                    }
                }
            }
        }
        c
    }
}
