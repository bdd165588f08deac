//! A fine-tuning request as the API receives it, checked field by field: the method resolved
//! through the engine's registry (defaults filled in, every bad value named by its JSON path)
//! and the free-form fields other fine-tuning APIs accept. No HTTP and no SQL here.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Map, Value};
use sparsegrad_engine::methods::{self, Resolved};

use super::failure::UserFacing;

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

/// Resolves a request's method through the engine's registry (defaults, aliases, bounds);
/// an error names its field as a path in the request (`method.hyperparameters.density`).
pub fn resolve(req: Option<&MethodRequest>, seed: Option<u64>) -> Result<Resolved, Invalid> {
    let default = MethodRequest::default();
    let req = req.unwrap_or(&default);
    methods::resolve(req.kind.as_deref(), &req.hyperparameters, seed).map_err(|e| {
        let f = UserFacing::from(&e);
        Invalid::new(
            format!("method.{}", f.param_or("hyperparameters")),
            f.reason,
        )
    })
}

/// The tasks a job may name (else it is inferred from the training file).
pub const TASKS: [&str; 3] = ["classification", "regression", "causal-lm"];

/// Checks the free-form fields other APIs accept the same way, and the task's name.
pub fn check_request(req: &CreateJob) -> Result<(), Invalid> {
    if let Some(t) = &req.task {
        if !TASKS.contains(&t.as_str()) {
            return Err(Invalid::new("task", format!("one of {}", TASKS.join(", "))));
        }
    }
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
    use sparsegrad_engine::methods::MethodSpec;
    use sparsegrad_engine::train::Epochs;

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
        assert_eq!(r.train.epochs, Epochs::Fixed(2));
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
    fn unknown_tasks_are_refused() {
        let req = |task: &str| -> CreateJob {
            serde_json::from_value(json!({"model": "m", "training_file": "f", "task": task}))
                .unwrap()
        };
        assert_eq!(check_request(&req("bogus")).unwrap_err().param, "task");
        assert_eq!(
            check_request(&req(&"x".repeat(100_000))).unwrap_err().param,
            "task"
        );
        for t in TASKS {
            check_request(&req(t)).unwrap();
        }
    }

    #[test]
    fn model_names_are_path_safe() {
        assert!(check_model_name("my-model_v1.2", "id").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "a..b"] {
            assert!(check_model_name(bad, "id").is_err(), "{bad}");
        }
    }
}
