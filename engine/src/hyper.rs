//! Hyperparameter schemas: each value's name in requests, type, bounds and what it does, the
//! bound checks every settings type runs, and parsing that names a bad value's path. Below the
//! training loop's settings and the methods' (see `methods::registry`).

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::{Error, Result};

/// A hyperparameter's JSON type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Number,
    Integer,
    Boolean,
    String,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Bound {
    Incl(f64),
    Excl(f64),
}

/// One hyperparameter: its name in requests, the settings field it fills, its bounds and
/// what it does. Its default is read from the settings type.
#[derive(Clone, Copy, Debug)]
pub struct Hyper {
    pub name: &'static str,
    /// The settings field (when it differs from `name`).
    pub field: &'static str,
    pub kind: Kind,
    pub nullable: bool,
    pub min: Option<Bound>,
    pub max: Option<Bound>,
    pub choices: &'static [&'static str],
    /// Other names requests may use (those of other fine-tuning APIs).
    pub aliases: &'static [&'static str],
    pub doc: &'static str,
}

impl Hyper {
    const fn new(name: &'static str, kind: Kind, doc: &'static str) -> Self {
        Hyper {
            name,
            field: name,
            kind,
            nullable: false,
            min: None,
            max: None,
            choices: &[],
            aliases: &[],
            doc,
        }
    }
    pub const fn number(name: &'static str, doc: &'static str) -> Self {
        Self::new(name, Kind::Number, doc)
    }
    pub const fn integer(name: &'static str, doc: &'static str) -> Self {
        Self::new(name, Kind::Integer, doc)
    }
    pub const fn boolean(name: &'static str, doc: &'static str) -> Self {
        Self::new(name, Kind::Boolean, doc)
    }
    pub const fn choice(
        name: &'static str,
        choices: &'static [&'static str],
        doc: &'static str,
    ) -> Self {
        Hyper {
            choices,
            ..Self::new(name, Kind::String, doc)
        }
    }
    pub const fn min(self, b: Bound) -> Self {
        Hyper {
            min: Some(b),
            ..self
        }
    }
    pub const fn max(self, b: Bound) -> Self {
        Hyper {
            max: Some(b),
            ..self
        }
    }
    pub const fn nullable(self) -> Self {
        Hyper {
            nullable: true,
            ..self
        }
    }
    pub const fn aliases(self, aliases: &'static [&'static str]) -> Self {
        Hyper { aliases, ..self }
    }
    pub const fn field(self, field: &'static str) -> Self {
        Hyper { field, ..self }
    }

    /// This hyperparameter as listed, its default read from `defaults` (settings as JSON).
    pub fn listing(&self, scope: &'static str, defaults: &Value) -> HyperListing {
        let split = |b: Option<Bound>| match b {
            Some(Bound::Incl(m)) => (Some(m), None),
            Some(Bound::Excl(m)) => (None, Some(m)),
            None => (None, None),
        };
        let ((minimum, exclusive_minimum), (maximum, exclusive_maximum)) =
            (split(self.min), split(self.max));
        HyperListing {
            name: self.name,
            kind: self.kind,
            scope,
            default: defaults.get(self.field).cloned().unwrap_or(Value::Null),
            nullable: self.nullable,
            minimum,
            exclusive_minimum,
            maximum,
            exclusive_maximum,
            choices: self.choices,
            aliases: self.aliases,
            description: self.doc,
        }
    }

    /// "must be …" for a value outside the bounds, `None` when it is inside.
    fn violation(&self, x: f64) -> Option<String> {
        if !x.is_finite() {
            return Some("must be a finite number".into());
        }
        let above = |b: Bound| match b {
            Bound::Incl(m) => x >= m,
            Bound::Excl(m) => x > m,
        };
        let below = |b: Bound| match b {
            Bound::Incl(m) => x <= m,
            Bound::Excl(m) => x < m,
        };
        if self.min.is_none_or(above) && self.max.is_none_or(below) {
            return None;
        }
        let int = self.kind == Kind::Integer;
        Some(match (self.min, self.max) {
            (Some(Bound::Incl(a)), Some(Bound::Incl(b))) if int => {
                format!("must be between {a} and {b}")
            }
            (Some(a), Some(b)) => {
                let (l, a) = match a {
                    Bound::Incl(a) => ('[', a),
                    Bound::Excl(a) => ('(', a),
                };
                let (r, b) = match b {
                    Bound::Incl(b) => (']', b),
                    Bound::Excl(b) => (')', b),
                };
                format!("must be in {l}{a}, {b}{r}")
            }
            (Some(Bound::Incl(a)), None) => format!("must be at least {a}"),
            (Some(Bound::Excl(0.0)), None) => "must be a positive number".into(),
            (Some(Bound::Excl(a)), None) => format!("must be greater than {a}"),
            (None, Some(Bound::Incl(b))) => format!("must be at most {b}"),
            (None, Some(Bound::Excl(b))) => format!("must be less than {b}"),
            (None, None) => unreachable!("no bounds, no violation"),
        })
    }
}

/// Checks the bounds of every hyperparameter of `settings` (the settings as JSON).
pub fn check_bounds(settings: &Value, hypers: &[Hyper]) -> Result<()> {
    for h in hypers {
        if let Some(x) = settings.get(h.field).and_then(Value::as_f64) {
            if let Some(reason) = h.violation(x) {
                return Err(Error::param(h.name, reason));
            }
        }
    }
    Ok(())
}

/// One hyperparameter as `GET /v1/methods` lists it.
#[derive(Clone, Debug, Serialize)]
pub struct HyperListing {
    pub name: &'static str,
    #[serde(rename = "type")]
    pub kind: Kind,
    /// `method` (the method's own) or `training` (the loop's, taken by every method).
    pub scope: &'static str,
    pub default: Value,
    pub nullable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minimum: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exclusive_minimum: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maximum: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exclusive_maximum: Option<f64>,
    #[serde(rename = "enum", skip_serializing_if = "<[_]>::is_empty")]
    pub choices: &'static [&'static str],
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub aliases: &'static [&'static str],
    pub description: &'static str,
}

/// Deserialises `T` from `v`; a bad value's error names its path under `at`.
pub fn parse_at<T: DeserializeOwned>(v: Value, at: &str) -> Result<T> {
    let join = |p: &str| match (at.is_empty(), p.is_empty()) {
        (true, _) => p.to_string(),
        (false, true) => at.to_string(),
        (false, false) => format!("{at}.{p}"),
    };
    serde_path_to_error::deserialize::<_, T>(v).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        // serde names unknown fields itself ("unknown field `x`, expected one of …").
        let inner = e.into_inner().to_string();
        let param = match inner.strip_prefix("unknown field `") {
            Some(r) => join(r.split('`').next().unwrap_or_default()),
            None => join(&path),
        };
        Error::param(&param, inner)
    })
}
