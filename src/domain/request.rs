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
    /// OpenAI's top-level (legacy) hyperparameters: `batch_size`, `learning_rate_multiplier`,
    /// `n_epochs`, each a value or `"auto"`.
    #[serde(default)]
    pub hyperparameters: Option<Map<String, Value>>,
    /// OpenAI's integrations (Weights & Biases): refused unless empty.
    #[serde(default)]
    pub integrations: Option<Vec<Value>>,
}

/// `method`: the service's shape (`type` one of its methods, `hyperparameters` by their own
/// names) or OpenAI's (`type: supervised` with `supervised.hyperparameters`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodRequest {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub hyperparameters: Map<String, Value>,
    #[serde(default)]
    pub supervised: Option<OpenAiMethod>,
    #[serde(default)]
    pub dpo: Option<Value>,
    #[serde(default)]
    pub reinforcement: Option<Value>,
}

/// OpenAI's `method.supervised`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiMethod {
    #[serde(default)]
    pub hyperparameters: Option<Map<String, Value>>,
}

/// OpenAI's method type that maps onto the service's default method.
pub const SUPERVISED: &str = "supervised";
/// OpenAI's hyperparameters, as OpenAI names them.
pub const OPENAI_HYPERPARAMETERS: [&str; 3] =
    ["batch_size", "learning_rate_multiplier", "n_epochs"];

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
    resolve_with(
        req.kind.as_deref(),
        &req.hyperparameters,
        seed,
        &Default::default(),
    )
}

/// A whole job request's method: the service's shape, OpenAI's (`method.type: supervised`,
/// top-level `hyperparameters`) or both (OpenAI's hyperparameters applied to a service
/// method). OpenAI features this service does not have are refused by name.
pub fn resolve_request(req: &CreateJob) -> Result<Resolved, Invalid> {
    if req.integrations.as_ref().is_some_and(|i| !i.is_empty()) {
        return Err(Invalid::new(
            "integrations",
            "integrations (Weights & Biases) are not supported; follow a job with its events \
             and metrics instead",
        ));
    }
    let default = MethodRequest::default();
    let m = req.method.as_ref().unwrap_or(&default);
    let kind = m.kind.as_deref();
    if let Some(k @ ("dpo" | "reinforcement")) = kind {
        return Err(Invalid::new(
            "method.type",
            format!(
                "`{k}` fine-tuning is not supported: use `{SUPERVISED}` or one of this \
                 service's methods (GET /v1/methods)"
            ),
        ));
    }
    for (field, given) in [
        ("supervised", m.supervised.is_some()),
        ("dpo", m.dpo.is_some()),
        ("reinforcement", m.reinforcement.is_some()),
    ] {
        let matches = kind == Some(field) || (field == SUPERVISED && kind.is_none());
        if given && !matches {
            return Err(Invalid::new(
                format!("method.{field}"),
                format!("goes with method.type `{field}`"),
            ));
        }
    }
    let supervised = m
        .supervised
        .as_ref()
        .and_then(|s| s.hyperparameters.as_ref());
    let mut openai = OpenAiHyper::default();
    if let Some(h) = supervised {
        if !m.hyperparameters.is_empty() {
            return Err(Invalid::new(
                "method.hyperparameters",
                "with `method.supervised.hyperparameters` given, name the hyperparameters there",
            ));
        }
        openai.read(h, "method.supervised.hyperparameters")?;
    }
    if let Some(h) = &req.hyperparameters {
        if supervised.is_some() {
            return Err(Invalid::new(
                "hyperparameters",
                "give hyperparameters in one place: `method.supervised.hyperparameters` \
                 (top-level `hyperparameters` is OpenAI's older form)",
            ));
        }
        openai.read(h, "hyperparameters")?;
    }
    // `supervised` is OpenAI's name for plain fine-tuning: this service's default method.
    let kind = kind.filter(|k| *k != SUPERVISED);
    resolve_with(kind, &m.hyperparameters, req.seed, &openai)
}

/// OpenAI's hyperparameters, translated: values by the service's names (`auto` left to the
/// defaults), and where each came from, so an error names the field the request used.
#[derive(Default)]
struct OpenAiHyper {
    values: Map<String, Value>,
    multiplier: Option<f64>,
    from: BTreeMap<String, String>,
}

impl OpenAiHyper {
    fn read(&mut self, h: &Map<String, Value>, at: &str) -> Result<(), Invalid> {
        for (k, v) in h {
            let path = format!("{at}.{k}");
            if !OPENAI_HYPERPARAMETERS.contains(&k.as_str()) {
                return Err(Invalid::new(
                    path,
                    format!(
                        "unknown hyperparameter; OpenAI's are {} (this service's own go in \
                         method.hyperparameters with method.type one of its methods)",
                        OPENAI_HYPERPARAMETERS.join(", ")
                    ),
                ));
            }
            if v == "auto" || v.is_null() {
                continue;
            }
            if k == "learning_rate_multiplier" {
                match v.as_f64() {
                    Some(x) if x > 0.0 && x <= 100.0 && x.is_finite() => self.multiplier = Some(x),
                    _ => return Err(Invalid::new(path, "a number in (0, 100] or \"auto\"")),
                }
            } else {
                self.values.insert(k.clone(), v.clone());
            }
            self.from.insert(k.clone(), path);
        }
        Ok(())
    }
}

fn resolve_with(
    kind: Option<&str>,
    own: &Map<String, Value>,
    seed: Option<u64>,
    openai: &OpenAiHyper,
) -> Result<Resolved, Invalid> {
    let mut hp = own.clone();
    for (k, v) in &openai.values {
        hp.insert(k.clone(), v.clone());
    }
    // The same setting under both names (the service's and OpenAI's) is ambiguous.
    for (k, path) in &openai.from {
        let names: &[&str] = match k.as_str() {
            "learning_rate_multiplier" => &["lr", "learning_rate"],
            "n_epochs" => &["n_epochs", "epochs"],
            _ => &["batch_size"],
        };
        if names.iter().any(|n| own.contains_key(*n)) {
            return Err(Invalid::new(
                path.clone(),
                "also given in method.hyperparameters: give it once",
            ));
        }
    }
    let run = |hp: &Map<String, Value>| {
        methods::resolve(kind, hp, seed).map_err(|e| {
            let f = UserFacing::from(&e);
            let param = f.param_or("hyperparameters");
            // A value OpenAI's names gave is reported where the request gave it.
            match param
                .strip_prefix("hyperparameters.")
                .and_then(|k| openai.from.get(k))
            {
                Some(p) => Invalid::new(p.clone(), f.reason),
                None => Invalid::new(format!("method.{param}"), f.reason),
            }
        })
    };
    let Some(mult) = openai.multiplier else {
        return run(&hp);
    };
    let base = run(&hp)?;
    hp.insert(
        "learning_rate".into(),
        (base.method.default_lr() * mult).into(),
    );
    run(&hp)
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

    fn job(v: Value) -> CreateJob {
        let mut b = json!({"model": "m", "training_file": "f"});
        for (k, x) in v.as_object().unwrap() {
            b[k] = x.clone();
        }
        serde_json::from_value(b).unwrap()
    }

    #[test]
    fn openai_shapes_map_onto_the_default_method() {
        let r = resolve_request(&job(json!({"method": {"type": "supervised", "supervised":
            {"hyperparameters": {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 0.5}}}})))
        .unwrap();
        assert_eq!(r.method.name(), "sparsegrad");
        assert_eq!(r.train.epochs, Epochs::Fixed(2));
        assert_eq!(r.train.batch_size, 8);
        assert!((r.train.lr - 5e-4).abs() < 1e-12, "{}", r.train.lr);
        // The legacy top-level form, onto a service method; `auto` keeps the defaults.
        let r = resolve_request(&job(json!({"method": {"type": "lora"},
            "hyperparameters": {"learning_rate_multiplier": 2, "n_epochs": "auto", "batch_size": "auto"}})))
        .unwrap();
        let plain = resolve(Some(&req(json!({"type": "lora"}))), None).unwrap();
        assert_eq!(r.method.name(), "lora");
        assert_eq!(r.train.lr, 2.0 * plain.train.lr);
        assert_eq!(r.train.epochs, Epochs::Auto);
        assert_eq!(r.train.batch_size, plain.train.batch_size);
        // Neither form: the service's defaults.
        assert_eq!(
            resolve_request(&job(json!({}))).unwrap().train,
            resolve(None, None).unwrap().train
        );
    }

    #[test]
    fn openai_shape_errors_name_the_field_the_request_used() {
        let bad = |v: Value| resolve_request(&job(v)).unwrap_err().param;
        assert_eq!(
            bad(json!({"hyperparameters": {"n_epochs": 0}})),
            "hyperparameters.n_epochs"
        );
        assert_eq!(
            bad(
                json!({"method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 0}}}})
            ),
            "method.supervised.hyperparameters.batch_size"
        );
        assert_eq!(
            bad(json!({"hyperparameters": {"learning_rate_multiplier": -1}})),
            "hyperparameters.learning_rate_multiplier"
        );
        assert_eq!(
            bad(json!({"hyperparameters": {"density": 0.1}})),
            "hyperparameters.density"
        );
        assert_eq!(
            bad(json!({"method": {"type": "dpo", "dpo": {}}})),
            "method.type"
        );
        assert_eq!(
            bad(json!({"method": {"type": "reinforcement"}})),
            "method.type"
        );
        assert_eq!(
            bad(json!({"method": {"type": "lora", "supervised": {}}})),
            "method.supervised"
        );
        assert_eq!(
            bad(json!({"integrations": [{"type": "wandb"}]})),
            "integrations"
        );
        assert!(resolve_request(&job(json!({"integrations": []}))).is_ok());
        assert_eq!(
            bad(
                json!({"hyperparameters": {"n_epochs": 1}, "method": {"type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": 2}}}})
            ),
            "hyperparameters"
        );
        assert_eq!(
            bad(json!({"hyperparameters": {"learning_rate_multiplier": 2},
                "method": {"type": "lora", "hyperparameters": {"lr": 0.1}}})),
            "hyperparameters.learning_rate_multiplier"
        );
        assert_eq!(
            bad(json!({"hyperparameters": {"batch_size": 4},
                "method": {"hyperparameters": {"batch_size": 8}}})),
            "hyperparameters.batch_size"
        );
        // The service's own shape still names its own paths.
        assert_eq!(
            bad(json!({"method": {"type": "lora", "hyperparameters": {"r": 0}}})),
            "method.hyperparameters.r"
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
