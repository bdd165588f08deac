//! The fine-tuning methods a job can ask for, by name (the list itself is `registry!` in
//! `methods/mod.rs`): each method's settings type, default learning rate and hyperparameters
//! (type, bounds, choices, what they do); the training loop's hyperparameters beside them;
//! and [`resolve`], which turns a request's `{type, hyperparameters}` into what the trainer
//! runs, every bad value named by its path.
//! The CLI, the benchmarks and the service's API resolve through here, and `GET /v1/methods`
//! lists it (so the dashboard and SDK users read the same defaults the engine uses).
//!
//! Defaults are not written here: a method's come from its settings type's `Default`, the
//! loop's from [`TrainConfig`]'s, so the listing can never disagree with what runs.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

pub use crate::hyper::{check_bounds, parse_at, Bound, Hyper, HyperListing, Kind};

use super::{Method, MethodSpec, METHODS};
use crate::models::ParamShape;
use crate::optim::AdamConfig;
use crate::train::config::{Epochs, TrainConfig, TRAINING};
use crate::{Error, Result};

/// The method a request without `method.type` runs.
pub const DEFAULT_METHOD: &str = "sparsegrad";
pub use crate::train::config::DEFAULT_MAX_SEQ_LEN;

/// What a method costs, from a model's sizes alone (dry-run estimates).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Footprint {
    /// Values trained besides the task head (which every method trains densely).
    pub trainable: u64,
    /// Other values held for the run (SparseGrad's bases).
    pub extra_state: u64,
    /// Micro-batches of ordinary backprop before the first step (SparseGrad's basis phase).
    pub calibration_batches: u64,
    /// Values per token and block the method's own graph nodes keep for backward beyond the
    /// model's (LoRA's dropout masks; see [`crate::memory`]).
    pub kept_per_token_layer: u64,
    /// Values held only while calibrating (a fixed support's accumulated `|G̃|`, one per MLP
    /// entry).
    pub calibration_state: u64,
}

/// A method's settings type.
pub trait MethodConfig: Serialize + DeserializeOwned + Default {
    const INFO: MethodInfo;
    /// The method, ready to prepare on a model. Settings are checked first.
    fn build(&self, adam: AdamConfig) -> Box<dyn Method>;
    fn footprint(&self, shape: &ParamShape) -> Footprint;
}

/// A method as listed: what it is, its learning rate and its own hyperparameters.
#[derive(Clone, Copy, Debug)]
pub struct MethodInfo {
    pub name: &'static str,
    pub description: &'static str,
    /// The learning rate a method works with when the job gives none.
    pub default_lr: f64,
    pub hyperparameters: &'static [Hyper],
}

impl MethodSpec {
    pub fn name(&self) -> &'static str {
        self.info().name
    }
    pub fn default_lr(&self) -> f64 {
        self.info().default_lr
    }
    /// Checks the settings' bounds and builds the method.
    pub fn build(&self, adam: AdamConfig) -> Result<Box<dyn Method>> {
        self.validate()?;
        Ok(self.build_checked(adam))
    }
    pub fn validate(&self) -> Result<()> {
        check_bounds(&self.settings(), self.info().hyperparameters)
    }
    /// A method by name with its default settings.
    pub fn default_for(name: &str) -> Result<MethodSpec> {
        resolve_method(name, &Map::new())
    }
}

/// The method named `name` with `hyperparameters` (its own keys only), checked.
pub fn resolve_method(name: &str, hyperparameters: &Map<String, Value>) -> Result<MethodSpec> {
    let spec =
        MethodSpec::parse(name, Value::Object(hyperparameters.clone())).unwrap_or_else(|| {
            let known: Vec<&str> = METHODS.iter().map(|m| m.name).collect();
            Err(Error::param(
                "type",
                format!("unknown method `{name}` ({})", known.join(", ")),
            ))
        })?;
    spec.validate()?;
    Ok(spec)
}

/// What a request resolves to.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    pub method: MethodSpec,
    pub train: TrainConfig,
    pub max_seq_len: usize,
    /// Every hyperparameter with its effective value (defaults included), echoed to users.
    pub hyperparameters: Value,
}

impl Resolved {
    /// Fixes `auto` epochs for a training set of `rows`, so the job states (and runs) the
    /// number of passes it chose.
    pub fn settle_epochs(&mut self, rows: usize) {
        if self.train.epochs == Epochs::Auto {
            let e = self.train.epochs_for(rows);
            self.train.epochs = Epochs::Fixed(e);
            self.hyperparameters["epochs"] = e.into();
        }
    }
}

/// Resolves a request's method name (the default method when `None`) and hyperparameters —
/// the method's own and the loop's, under their names or aliases — with defaults filled in
/// (the method's learning rate when none is given). An error's `param` is its path relative
/// to the request's `method` object: `type` or `hyperparameters.<name>`.
pub fn resolve(
    name: Option<&str>,
    hyperparameters: &Map<String, Value>,
    seed: Option<u64>,
) -> Result<Resolved> {
    let under = |e: Error| match e {
        Error::Param { param, reason } if param != "type" => {
            Error::param(&format!("hyperparameters.{param}"), reason)
        }
        other => other,
    };
    let name = name.unwrap_or(DEFAULT_METHOD);
    let (mut train, mut own) = (Map::new(), Map::new());
    // The key each loop setting was given under, by field: an error names that key.
    let mut given: std::collections::HashMap<&str, &str> = Default::default();
    let mut max_seq_len = DEFAULT_MAX_SEQ_LEN;
    for (k, v) in hyperparameters {
        let Some(h) = TRAINING
            .iter()
            .find(|h| h.name == k || h.aliases.contains(&k.as_str()))
        else {
            own.insert(k.clone(), v.clone());
            continue;
        };
        if given.insert(h.field, k).is_some() {
            return Err(Error::param(
                &format!("hyperparameters.{k}"),
                format!("`{}` is given twice (under two names)", h.name),
            ));
        }
        if h.name == "max_seq_len" {
            max_seq_len = parse_at(v.clone(), "max_seq_len").map_err(under)?;
        } else {
            train.insert(h.field.to_string(), v.clone());
        }
    }
    // A loop error names its field or request name; the request may have used an alias.
    let as_given = |e: Error| {
        under(match e {
            Error::Param { param, reason } => {
                let head = param.split('.').next().unwrap_or(&param);
                let key = TRAINING
                    .iter()
                    .find(|h| h.field == head || h.name == head)
                    .map(|h| given.get(h.field).copied().unwrap_or(h.name));
                let param = match key {
                    Some(k) => param.replacen(head, k, 1),
                    None => param,
                };
                Error::param(&param, reason)
            }
            other => other,
        })
    };
    check_bounds(&serde_json::json!({ "max_seq_len": max_seq_len }), TRAINING).map_err(as_given)?;
    let method = resolve_method(name, &own).map_err(under)?;
    if !train.contains_key("lr") {
        train.insert("lr".into(), method.default_lr().into());
    }
    if let Some(s) = seed {
        train.insert("seed".into(), s.into());
    }
    let train: TrainConfig = parse_at(Value::Object(train), "").map_err(as_given)?;
    train.validate().map_err(as_given)?;

    let mut hp = serde_json::to_value(&train).expect("serialisable");
    if let (Some(h), Value::Object(m)) = (hp.as_object_mut(), method.settings()) {
        h.remove("seed");
        h.insert("max_seq_len".into(), max_seq_len.into());
        for (k, v) in m {
            h.insert(k, v);
        }
    }
    Ok(Resolved {
        method,
        train,
        max_seq_len,
        hyperparameters: hp,
    })
}

/// One method as `GET /v1/methods` lists it.
#[derive(Clone, Debug, Serialize)]
pub struct MethodListing {
    pub id: &'static str,
    pub object: &'static str,
    pub description: &'static str,
    /// Whether a job without `method.type` runs this one.
    pub default: bool,
    pub hyperparameters: Vec<HyperListing>,
}

/// Every method with all it takes — its own hyperparameters, then the loop's — and each
/// one's effective default.
pub fn listings() -> Vec<MethodListing> {
    let mut loop_defaults = serde_json::to_value(TrainConfig::default()).expect("serialisable");
    loop_defaults["max_seq_len"] = DEFAULT_MAX_SEQ_LEN.into();
    METHODS
        .iter()
        .map(|m| {
            let own = MethodSpec::defaults(m.name).unwrap_or(Value::Null);
            let mut d = loop_defaults.clone();
            d["lr"] = m.default_lr.into();
            let mut hyperparameters: Vec<HyperListing> = m
                .hyperparameters
                .iter()
                .map(|h| h.listing("method", &own))
                .collect();
            hyperparameters.extend(TRAINING.iter().map(|h| h.listing("training", &d)));
            MethodListing {
                id: m.name,
                object: "fine_tuning.method",
                description: m.description,
                default: m.name == DEFAULT_METHOD,
                hyperparameters,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn hp(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn every_settings_field_is_listed_and_every_listed_field_exists() {
        // The tables and the settings types cannot drift apart: each field of each settings
        // type (and of the loop's) has exactly one entry, and each entry names a field.
        for m in METHODS {
            let fields: Vec<String> = MethodSpec::defaults(m.name)
                .unwrap()
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect();
            let listed: Vec<&str> = m.hyperparameters.iter().map(|h| h.field).collect();
            let mut a: Vec<&str> = fields.iter().map(String::as_str).collect();
            let mut b = listed.clone();
            a.sort();
            b.sort();
            assert_eq!(a, b, "method {}", m.name);
        }
        let mut loop_fields: Vec<String> = serde_json::to_value(TrainConfig::default())
            .unwrap()
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| *k != "seed")
            .cloned()
            .collect();
        loop_fields.push("max_seq_len".into());
        loop_fields.sort();
        let mut listed: Vec<String> = TRAINING.iter().map(|h| h.field.to_string()).collect();
        listed.sort();
        assert_eq!(loop_fields, listed);
    }

    #[test]
    fn every_choice_is_accepted_and_nothing_else() {
        for m in METHODS {
            for h in m.hyperparameters.iter().filter(|h| !h.choices.is_empty()) {
                for c in h.choices {
                    resolve(Some(m.name), &hp(json!({ h.name: c })), None)
                        .unwrap_or_else(|e| panic!("{} {}={c}: {e}", m.name, h.name));
                }
                let e = resolve(Some(m.name), &hp(json!({ h.name: "nonsense" })), None);
                assert!(e.is_err(), "{} {} took nonsense", m.name, h.name);
            }
        }
        for c in ["constant", "linear", "cosine"] {
            resolve(None, &hp(json!({ "schedule": c })), None).unwrap();
        }
    }

    #[test]
    fn auto_epochs_follow_the_dataset_size_and_a_job_fixes_them() {
        use crate::train::Epochs;
        for (rows, e) in [
            (1, 25),
            (4, 25),
            (20, 5),
            (26, 3),
            (34, 3),
            (4000, 3),
            (8333, 3),
            (8334, 2),
            (30_000, 1),
        ] {
            assert_eq!(Epochs::Auto.for_rows(rows), e, "{rows} rows");
        }
        assert_eq!(Epochs::Fixed(7).for_rows(4000), 7);
        let mut r = resolve(None, &hp(json!({"n_epochs": "auto"})), None).unwrap();
        assert_eq!(r.hyperparameters["epochs"], "auto");
        assert_eq!(r.train.total_steps(4000), 750);
        assert_eq!(r.train.warmup_for(750), 45);
        r.settle_epochs(4000);
        assert_eq!(r.train.epochs, Epochs::Fixed(3));
        assert_eq!(r.hyperparameters["epochs"], 3);
        let fixed = resolve(None, &hp(json!({"epochs": 2, "warmup_steps": 5})), None).unwrap();
        assert_eq!(fixed.train.total_steps(4000), 500);
        assert_eq!(fixed.train.warmup_for(500), 5);
        // The Hugging Face recipe is what a request without hyperparameters gets.
        let d = resolve(None, &Map::new(), None).unwrap().train;
        assert!(d.dropout);
        assert_eq!((d.warmup_ratio, d.weight_decay), (0.06, 0.01));
        assert_eq!(d.schedule, crate::optim::Schedule::Linear);
    }

    #[test]
    fn bounds_are_enforced_with_the_request_name() {
        let bad = |v: Value| match resolve(None, &hp(v), None) {
            Err(Error::Param { param, reason }) => (param, reason),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            bad(json!({"density": 0.0})),
            ("hyperparameters.density".into(), "must be in (0, 1]".into())
        );
        assert_eq!(
            bad(json!({"batch_size": 0})),
            (
                "hyperparameters.batch_size".into(),
                "must be between 1 and 1024".into()
            )
        );
        // An alias is named as given.
        assert_eq!(bad(json!({"n_epochs": 1000})).0, "hyperparameters.n_epochs");
        // `auto` is the one word epochs take; fractions, negatives and other words are refused.
        for v in [
            json!("banana"),
            json!(1.5),
            json!(-1),
            json!(true),
            json!(1e30),
        ] {
            assert_eq!(bad(json!({"epochs": v})).0, "hyperparameters.epochs", "{v}");
        }
        assert_eq!(
            bad(json!({"n_epochs": "AUTO"})).0,
            "hyperparameters.n_epochs"
        );
        for v in [json!(1.5), json!(-0.1), json!("6%")] {
            assert_eq!(
                bad(json!({"warmup_ratio": v})).0,
                "hyperparameters.warmup_ratio"
            );
        }
        let lora = |v: Value| match resolve(Some("lora"), &hp(v), None) {
            Err(Error::Param { param, .. }) => param,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            lora(json!({"scope": "everything"})),
            "hyperparameters.scope"
        );
        assert_eq!(
            lora(json!({"dense_lr_scale": 0})),
            "hyperparameters.dense_lr_scale"
        );
        assert_eq!(lora(json!({"targets": "heads"})), "hyperparameters.targets");
        // Every count has an upper bound too.
        assert_eq!(
            bad(json!({"max_steps": 1e18})).0,
            "hyperparameters.max_steps"
        );
        assert_eq!(
            bad(json!({"grad_accum": 1u64 << 40})).0,
            "hyperparameters.grad_accum"
        );
        assert_eq!(bad(json!({"k": 1e12})).0, "hyperparameters.k");
        assert_eq!(
            bad(json!({"basis_steps": 1e12})).0,
            "hyperparameters.basis_steps"
        );
        assert_eq!(
            bad(json!({"eval_every": 0})).0,
            "hyperparameters.eval_every"
        );
        assert_eq!(
            bad(json!({"train_dropout": 3})).0,
            "hyperparameters.train_dropout"
        );
        assert_eq!(
            resolve(Some("lora"), &hp(json!({"r": 0})), None)
                .unwrap_err()
                .to_string(),
            "invalid value for `hyperparameters.r`: must be between 1 and 1024"
        );
        assert_eq!(
            bad(json!({"max_seq_len": 9000})).0,
            "hyperparameters.max_seq_len"
        );
        match resolve(Some("adapter"), &Map::new(), None) {
            Err(Error::Param { param, .. }) => assert_eq!(param, "type"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_count_and_size_has_an_upper_bound() {
        // A request can neither overflow an estimate nor queue unbounded work.
        for m in listings() {
            for h in &m.hyperparameters {
                if matches!(h.kind, Kind::Integer | Kind::Number) {
                    assert!(
                        h.maximum.is_some() || h.exclusive_maximum.is_some(),
                        "{} {} has no upper bound",
                        m.id,
                        h.name
                    );
                }
            }
        }
    }

    #[test]
    fn listing_defaults_are_what_resolving_nothing_gives() {
        for m in listings() {
            let r = resolve(Some(m.id), &Map::new(), None).unwrap();
            for h in &m.hyperparameters {
                // The echo names the loop's dropout `dropout`, which LoRA's own overwrites.
                let got = match h.name {
                    "train_dropout" => Value::from(r.train.dropout),
                    n => r.hyperparameters[n].clone(),
                };
                assert_eq!(got, h.default, "{} {}", m.id, h.name);
            }
        }
        let l = listings();
        assert_eq!(l.iter().filter(|m| m.default).count(), 1);
        assert!(l.iter().any(|m| m.id == DEFAULT_METHOD && m.default));
    }
}
