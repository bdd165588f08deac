//! A fine-tuning request as the API receives it, turned into what the worker runs: the
//! method's hyperparameters split into the method's own settings and the training loop's,
//! defaults filled in (the method's learning rate when none is given), every value checked
//! with the field it came from; and the dry-run estimate. No HTTP and no SQL here.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sparsegrad_engine::methods::lora::LoraConfig;
use sparsegrad_engine::methods::sparsegrad::{MePropConfig, SparseGradConfig};
use sparsegrad_engine::methods::MethodSpec;
use sparsegrad_engine::optim::AdamConfig;
use sparsegrad_engine::train::TrainConfig;

/// `POST /v1/fine_tuning/jobs`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    pub model: String,
    pub training_file: String,
    #[serde(default)]
    pub validation_file: Option<String>,
    #[serde(default)]
    pub method: Option<MethodRequest>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
    /// `classification`, `regression` or `causal-lm`; inferred from the file when absent.
    #[serde(default)]
    pub task: Option<String>,
    #[serde(default)]
    pub dry_run: bool,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodRequest {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub hyperparameters: Map<String, Value>,
}

/// A rejected request: the field (JSON path) and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Invalid {
    pub param: String,
    pub message: String,
}

impl Invalid {
    fn new(param: impl Into<String>, message: impl Into<String>) -> Self {
        Invalid {
            param: param.into(),
            message: message.into(),
        }
    }
}

/// The method and loop settings a request resolves to.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    pub method: MethodSpec,
    pub train: TrainConfig,
    pub max_seq_len: usize,
    /// Every hyperparameter with its effective value (defaults included), echoed to users.
    pub hyperparameters: Value,
}

const HP: &str = "method.hyperparameters";

/// Training-loop keys, with the names other fine-tuning APIs use for them.
fn train_key(k: &str) -> Option<&'static str> {
    Some(match k {
        "epochs" | "n_epochs" => "epochs",
        "max_steps" => "max_steps",
        "batch_size" => "batch_size",
        "grad_accum" | "gradient_accumulation_steps" => "grad_accum",
        "lr" | "learning_rate" => "lr",
        "schedule" | "lr_scheduler" => "schedule",
        "warmup_steps" => "warmup_steps",
        "weight_decay" => "weight_decay",
        "max_grad_norm" => "max_grad_norm",
        // `dropout` is LoRA's; the model's own dropout while training is this.
        "train_dropout" => "dropout",
        "eval_every" => "eval_every",
        "checkpoint_every" => "checkpoint_every",
        "keep_checkpoints" => "keep_checkpoints",
        _ => return None,
    })
}

fn parse<T: serde::de::DeserializeOwned>(v: Value, at: &str) -> Result<T, Invalid> {
    serde_path_to_error::deserialize::<_, T>(v).map_err(|e| {
        let path = e.path().to_string();
        let param = if path == "." || path.is_empty() {
            at.to_string()
        } else {
            format!("{at}.{path}")
        };
        // serde names unknown fields itself ("unknown field `x`, expected one of …").
        let inner = e.into_inner().to_string();
        let param = match inner.strip_prefix("unknown field `") {
            Some(r) => format!("{at}.{}", r.split('`').next().unwrap_or_default()),
            None => param,
        };
        Invalid::new(param, inner)
    })
}

fn engine_error(e: sparsegrad_engine::Error) -> Invalid {
    match e {
        sparsegrad_engine::Error::Param {
            param,
            reason: message,
        } => Invalid::new(format!("{HP}.{param}"), message),
        other => Invalid::new(HP, other.to_string()),
    }
}

/// Splits and checks a method request; `seed` is the job's.
pub fn resolve(req: Option<&MethodRequest>, seed: Option<u64>) -> Result<Resolved, Invalid> {
    let default = MethodRequest::default();
    let req = req.unwrap_or(&default);
    let kind = req.kind.as_deref().unwrap_or("sparsegrad");
    let mut train = Map::new();
    let mut rest = Map::new();
    let mut max_seq_len = 128usize;
    for (k, v) in &req.hyperparameters {
        if k == "max_seq_len" {
            max_seq_len = parse(v.clone(), &format!("{HP}.max_seq_len"))?;
            if !(8..=8192).contains(&max_seq_len) {
                return Err(Invalid::new(
                    format!("{HP}.max_seq_len"),
                    "must be between 8 and 8192",
                ));
            }
        } else if let Some(t) = train_key(k) {
            if train.insert(t.to_string(), v.clone()).is_some() {
                return Err(Invalid::new(
                    format!("{HP}.{k}"),
                    format!("`{t}` is given twice (under two names)"),
                ));
            }
        } else {
            rest.insert(k.clone(), v.clone());
        }
    }
    let rest = Value::Object(rest);
    let method = match kind {
        "full" => {
            if let Some(k) = rest.as_object().and_then(|m| m.keys().next()) {
                return Err(Invalid::new(
                    format!("{HP}.{k}"),
                    format!("unknown hyperparameter `{k}` for method `full`"),
                ));
            }
            MethodSpec::Full
        }
        "lora" => MethodSpec::Lora(parse::<LoraConfig>(rest, HP)?),
        "sparsegrad" => MethodSpec::Sparsegrad(parse::<SparseGradConfig>(rest, HP)?),
        "meprop" => MethodSpec::Meprop(parse::<MePropConfig>(rest, HP)?),
        other => {
            return Err(Invalid::new(
                "method.type",
                format!("unknown method `{other}` (sparsegrad, lora, full, meprop)"),
            ))
        }
    };
    method.build(AdamConfig::default()).map_err(engine_error)?;
    if !train.contains_key("lr") {
        train.insert("lr".into(), method.default_lr().into());
    }
    if let Some(s) = seed {
        train.insert("seed".into(), s.into());
    }
    let train: TrainConfig = parse(Value::Object(train), HP)?;
    train.validate().map_err(engine_error)?;

    let mut hp = serde_json::to_value(&train).expect("serialisable");
    if let (Some(h), Value::Object(m)) = (
        hp.as_object_mut(),
        serde_json::to_value(&method).expect("serialisable"),
    ) {
        h.remove("seed");
        h.insert("max_seq_len".into(), max_seq_len.into());
        for (k, v) in m {
            if k != "type" {
                h.insert(k, v);
            }
        }
    }
    Ok(Resolved {
        method,
        train,
        max_seq_len,
        hyperparameters: hp,
    })
}

/// Checks the free-form fields other APIs accept the same way.
pub fn check_request(req: &CreateJob) -> Result<(), Invalid> {
    if let Some(s) = &req.suffix {
        if s.is_empty()
            || s.len() > 64
            || !s
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(Invalid::new("suffix", "1-64 characters from [A-Za-z0-9_-]"));
        }
    }
    if let Some(m) = &req.metadata {
        if m.len() > 16 {
            return Err(Invalid::new("metadata", "at most 16 pairs"));
        }
        for (k, v) in m {
            if k.is_empty() || k.len() > 64 || v.len() > 512 {
                return Err(Invalid::new(
                    format!("metadata.{k}"),
                    "keys 1-64 characters, values at most 512",
                ));
            }
        }
    }
    Ok(())
}

/// What a dry run answers: the job's size and what it will cost, before it is queued.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Estimate {
    pub steps: usize,
    pub examples: usize,
    pub tokens: u64,
    pub duration_secs: f64,
    pub memory_bytes: u64,
    pub trainable_params: u64,
    /// `history` (this service's measured seconds per token on the same base model) or
    /// `flops` (6 FLOPs per parameter and token at an assumed CPU rate).
    pub duration_basis: String,
}

/// Sizes of a base model read from its `config.json`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shape {
    pub vocab: u64,
    pub hidden: u64,
    pub layers: u64,
    pub ffn: u64,
    pub kv_dim: u64,
    pub llama: bool,
}

impl Shape {
    pub fn from_config(cfg: &Value) -> Option<Shape> {
        let g = |k: &str| cfg.get(k).and_then(Value::as_u64);
        let hidden = g("hidden_size")?;
        let heads = g("num_attention_heads")?;
        let llama = cfg.get("model_type").and_then(Value::as_str) == Some("llama");
        let kv_heads = g("num_key_value_heads").unwrap_or(heads);
        Some(Shape {
            vocab: g("vocab_size")?,
            hidden,
            layers: g("num_hidden_layers")?,
            ffn: g("intermediate_size")?,
            kv_dim: hidden / heads.max(1) * kv_heads,
            llama,
        })
    }
    /// Parameters of the transformer blocks (what the per-token FLOPs scale with).
    pub fn block_params(&self) -> u64 {
        let (h, f) = (self.hidden, self.ffn);
        let attn = h * h * 2 + h * self.kv_dim * 2;
        let mlp = if self.llama { 3 * h * f } else { 2 * h * f };
        self.layers * (attn + mlp)
    }
    pub fn params(&self) -> u64 {
        self.block_params() + self.vocab * self.hidden
    }
    /// Entries of the MLP matrices.
    pub fn mlp_params(&self) -> u64 {
        let per = if self.llama { 3 } else { 2 };
        self.layers * per * self.hidden * self.ffn
    }
}

/// Effective CPU rate assumed before the service has measured anything (MiniLM-L6 on two
/// cores trains at about 5e10 FLOP/s in `sparsegrad bench train`).
pub const PRIOR_FLOPS_PER_SEC: f64 = 5e10;

/// The estimate for `rows` examples of `bytes` in all; `secs_per_token` from history if any.
pub fn estimate(
    shape: &Shape,
    r: &Resolved,
    rows: u64,
    bytes: u64,
    secs_per_token: Option<f64>,
) -> Estimate {
    let rows_us = rows.max(1) as usize;
    let steps = r.train.total_steps(rows_us);
    let examples_per_step = (r.train.batch_size * r.train.grad_accum) as u64;
    // About four bytes of text per token, plus the special tokens, capped at the length.
    let per_row = ((bytes / rows.max(1)) / 4 + 2).min(r.max_seq_len as u64);
    let examples = (steps as u64 * examples_per_step).min(match r.train.max_steps {
        Some(_) => u64::MAX,
        None => rows * r.train.epochs as u64,
    });
    let tokens = examples * per_row;
    let calib = match &r.method {
        MethodSpec::Sparsegrad(c) => (c.basis_steps as u64 * r.train.batch_size as u64) * per_row,
        _ => 0,
    };
    let (duration_secs, basis) = match secs_per_token {
        Some(s) => ((tokens + calib) as f64 * s, "history"),
        None => (
            6.0 * shape.block_params() as f64 * (tokens + calib) as f64 / PRIOR_FLOPS_PER_SEC,
            "flops",
        ),
    };
    // Encoders get a pooler and a classifier (two labels assumed), trained densely by
    // every method.
    let head = if shape.llama {
        0
    } else {
        shape.hidden * shape.hidden + 3 * shape.hidden + 2
    };
    let params = shape.params() + head;
    let mlp = shape.mlp_params();
    let trainable = head
        + match &r.method {
            MethodSpec::Full => params - head,
            MethodSpec::Lora(c) => {
                let per = if shape.llama { 3 } else { 2 };
                shape.layers * per * c.r as u64 * (shape.hidden + shape.ffn)
            }
            MethodSpec::Sparsegrad(c) => {
                c.k.map(|k| k as u64 * shape.layers * if shape.llama { 3 } else { 2 })
                    .unwrap_or((mlp as f64 * c.density) as u64)
            }
            MethodSpec::Meprop(c) => {
                c.k.map(|k| k as u64 * shape.layers * if shape.llama { 3 } else { 2 })
                    .unwrap_or((mlp as f64 * c.density) as u64)
            }
        };
    // f32 weights, then gradient + two Adam moments per trained value; SparseGrad adds its
    // bases (one P, Q pair per matrix type); activations kept for backward, per token and
    // layer about 16 hidden-sized and 2 FFN-sized vectors.
    let bases = match &r.method {
        MethodSpec::Sparsegrad(_) => {
            let types = if shape.llama { 3 } else { 2 };
            types * (shape.hidden * shape.hidden + shape.ffn * shape.ffn)
        }
        _ => 0,
    };
    let batch_tokens = r.train.batch_size as u64 * per_row;
    let activations = batch_tokens * shape.layers * (16 * shape.hidden + 2 * shape.ffn);
    let memory_bytes = 4 * (params + 3 * trainable + bases + activations);
    Estimate {
        steps,
        examples: examples as usize,
        tokens,
        duration_secs: (duration_secs * 10.0).round() / 10.0,
        memory_bytes,
        trainable_params: trainable,
        duration_basis: basis.into(),
    }
}

/// A model name a user may register: a path-safe identifier.
pub fn check_model_name(name: &str, param: &str) -> Result<(), Invalid> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && !name.contains("..")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Invalid::new(
            param,
            "1-128 characters from [A-Za-z0-9._-], not starting with a dot",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn req(v: Value) -> MethodRequest {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn defaults_are_sparsegrad_with_its_learning_rate() {
        let r = resolve(None, Some(7)).unwrap();
        assert_eq!(r.method.name(), "sparsegrad");
        assert_eq!(r.train.lr, 1e-3);
        assert_eq!(r.train.seed, 7);
        assert_eq!(r.hyperparameters["density"], 0.01);
        assert_eq!(r.hyperparameters["max_seq_len"], 128);
        let r = resolve(Some(&req(json!({"type": "full"}))), None).unwrap();
        assert_eq!(r.train.lr, 5e-5);
    }

    #[test]
    fn hyperparameters_split_between_method_and_loop() {
        let r = resolve(
            Some(&req(json!({"type": "lora", "hyperparameters":
                {"r": 4, "n_epochs": 2, "learning_rate": 0.01, "batch_size": 8}}))),
            None,
        )
        .unwrap();
        assert_eq!(r.train.epochs, 2);
        assert_eq!(r.train.lr, 0.01);
        assert_eq!(r.train.batch_size, 8);
        match r.method {
            MethodSpec::Lora(c) => assert_eq!(c.r, 4),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_name_the_field() {
        let bad = |v: Value| resolve(Some(&req(v)), None).unwrap_err().param;
        assert_eq!(
            bad(json!({"type": "sparsegrad", "hyperparameters": {"density": 2.0}})),
            "method.hyperparameters.density"
        );
        assert_eq!(
            bad(json!({"type": "sparsegrad", "hyperparameters": {"densty": 0.1}})),
            "method.hyperparameters.densty"
        );
        assert_eq!(
            bad(json!({"type": "lora", "hyperparameters": {"r": "four"}})),
            "method.hyperparameters.r"
        );
        assert_eq!(
            bad(json!({"type": "full", "hyperparameters": {"batch_size": 0}})),
            "method.hyperparameters.batch_size"
        );
        assert_eq!(
            bad(json!({"type": "full", "hyperparameters": {"r": 4}})),
            "method.hyperparameters.r"
        );
        assert_eq!(bad(json!({"type": "adapter"})), "method.type");
        assert_eq!(
            bad(json!({"hyperparameters": {"lr": 0.1, "learning_rate": 0.2}})),
            // Keys are visited in sorted order: the second name is the one reported.
            "method.hyperparameters.lr"
        );
        assert_eq!(
            bad(json!({"hyperparameters": {"max_seq_len": 4}})),
            "method.hyperparameters.max_seq_len"
        );
    }

    #[test]
    fn estimate_counts_steps_and_scales_with_history() {
        let shape = Shape {
            vocab: 30522,
            hidden: 384,
            layers: 6,
            ffn: 1536,
            kv_dim: 384,
            llama: false,
        };
        let r = resolve(
            Some(&req(
                json!({"hyperparameters": {"batch_size": 16, "n_epochs": 2}}),
            )),
            None,
        )
        .unwrap();
        let e = estimate(&shape, &r, 100, 100 * 200, None);
        assert_eq!(e.steps, 14);
        assert_eq!(e.examples, 200);
        assert_eq!(e.tokens, 200 * 52);
        assert_eq!(e.duration_basis, "flops");
        assert!(e.memory_bytes > 4 * shape.params());
        let h = estimate(&shape, &r, 100, 100 * 200, Some(0.01));
        assert_eq!(h.duration_basis, "history");
        // Basis phase: 10 micro-batches of 16 rows.
        assert!((h.duration_secs - (200.0 * 52.0 + 160.0 * 52.0) * 0.01).abs() < 0.1);
    }

    #[test]
    fn model_names_are_path_safe() {
        assert!(check_model_name("my-model_v1.2", "id").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "a..b"] {
            assert!(check_model_name(bad, "id").is_err(), "{bad}");
        }
    }
}
