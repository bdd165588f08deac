//! How an engine error reaches a user: the one mapping from [`sparsegrad_engine::Error`] into
//! a message, the field it is about and whether trying again could help. The worker, the API
//! and predictions add their own context (which field a bad row belongs to).

/// An engine error as users see it.
#[derive(Clone, Debug, PartialEq)]
pub struct UserFacing {
    pub message: String,
    /// The message without the field's name in front: what an API error shows beside its
    /// `param` (the same as `message` when the engine named no field).
    pub reason: String,
    /// The request field it is about, when the engine knows (`density`, `inputs`, …).
    pub param: Option<String>,
    /// Whether it is the submitter's to fix (bad data, impossible settings, an unusable model).
    pub user_error: bool,
    /// A problem with a dataset row (its line is in the message).
    pub data_error: bool,
}

impl UserFacing {
    /// `param`, or `default` when the engine named none.
    pub fn param_or(&self, default: &str) -> String {
        self.param.clone().unwrap_or_else(|| default.to_string())
    }
    /// Retrying cannot fix a user error; anything else (storage, a crash) may pass.
    pub fn retryable(&self) -> bool {
        !self.user_error
    }
}

impl From<&sparsegrad_engine::Error> for UserFacing {
    fn from(e: &sparsegrad_engine::Error) -> Self {
        use sparsegrad_engine::Error;
        let (param, reason) = match e {
            Error::Param { param, reason } => (Some(param.clone()), reason.clone()),
            _ => (None, e.to_string()),
        };
        UserFacing {
            message: e.to_string(),
            reason,
            param,
            user_error: e.is_user_error(),
            data_error: matches!(e, Error::Data { .. }),
        }
    }
}

impl From<sparsegrad_engine::Error> for UserFacing {
    fn from(e: sparsegrad_engine::Error) -> Self {
        UserFacing::from(&e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sparsegrad_engine::Error;

    #[test]
    fn engine_errors_map_to_param_and_retryability() {
        let p = UserFacing::from(Error::param("density", "must be in (0, 1]"));
        assert_eq!(p.param.as_deref(), Some("density"));
        assert_eq!(p.reason, "must be in (0, 1]");
        assert!(p.message.contains("density"));
        assert!(p.user_error && !p.retryable());
        let d = UserFacing::from(Error::data(6, Some("label"), "missing"));
        assert!(d.data_error && d.user_error);
        assert_eq!(d.param_or("training_file"), "training_file");
        assert!(d.message.contains("line 6"));
        let o = UserFacing::from(Error::Other("disk full".into()));
        assert!(o.retryable());
    }
}
