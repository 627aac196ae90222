//! Errors as the API server sends them: a `Status` object with the HTTP code, a reason a
//! client switches on (`NotFound`, `AlreadyExists`, `Conflict`, `Expired`, ...) and the
//! message kubectl prints.

use serde_json::{json, Value};

use crate::resources::Resource;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    /// `details` of the Status (name and kind), when the error is about one object.
    pub details: Option<(String, String)>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: String) -> ApiError {
        ApiError {
            code,
            reason,
            message,
            details: None,
        }
    }

    fn about(mut self, r: &Resource, name: &str) -> ApiError {
        self.details = Some((name.to_string(), r.plural.to_string()));
        self
    }

    pub fn not_found(r: &Resource, name: &str) -> ApiError {
        let msg = format!("{} \"{name}\" not found", r.qualified());
        ApiError::new(404, "NotFound", msg).about(r, name)
    }

    pub fn namespace_not_found(ns: &str) -> ApiError {
        let mut e = ApiError::new(404, "NotFound", format!("namespaces \"{ns}\" not found"));
        e.details = Some((ns.to_string(), "namespaces".into()));
        e
    }

    pub fn already_exists(r: &Resource, name: &str) -> ApiError {
        let msg = format!("{} \"{name}\" already exists", r.qualified());
        ApiError::new(409, "AlreadyExists", msg).about(r, name)
    }

    pub fn conflict(r: &Resource, name: &str) -> ApiError {
        let msg = format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please \
             apply your changes to the latest version and try again",
            r.qualified()
        );
        ApiError::new(409, "Conflict", msg).about(r, name)
    }

    pub fn invalid(r: &Resource, name: &str, what: &str) -> ApiError {
        let msg = format!("{} \"{name}\" is invalid: {what}", r.kind);
        let mut e = ApiError::new(422, "Invalid", msg);
        e.details = Some((name.to_string(), r.plural.to_string()));
        e
    }

    /// A watch or list from a resourceVersion the log no longer holds.
    pub fn gone(asked: u64, oldest: u64) -> ApiError {
        ApiError::new(
            410,
            "Expired",
            format!("too old resource version: {asked} ({oldest})"),
        )
    }

    pub fn continue_expired() -> ApiError {
        ApiError::new(
            410,
            "Expired",
            "The provided continue parameter is too old to display a consistent list result. \
             You can start a new list without the continue parameter."
                .into(),
        )
    }

    /// What the server answers a service account its ClusterRole does not cover.
    pub fn forbidden(r: &Resource) -> ApiError {
        let mut e = ApiError::new(
            403,
            "Forbidden",
            format!(
                "{} is forbidden: User \"system:serviceaccount:vswitch:vswitch\" cannot list \
                 resource \"{}\" in API group \"{}\" at the cluster scope",
                r.plural, r.plural, r.group
            ),
        );
        e.details = Some((String::new(), r.plural.to_string()));
        e
    }

    pub fn internal(msg: &str) -> ApiError {
        ApiError::new(500, "InternalError", msg.to_string())
    }

    pub fn bad_request(msg: &str) -> ApiError {
        ApiError::new(400, "BadRequest", msg.to_string())
    }

    pub fn unsupported_media(ct: &str) -> ApiError {
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {ct})"),
        )
    }

    pub fn method_not_allowed() -> ApiError {
        ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource".into(),
        )
    }

    pub fn path_not_found() -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource".into(),
        )
    }

    pub fn unavailable() -> ApiError {
        ApiError::new(
            503,
            "ServiceUnavailable",
            "the API server stand-in is restarting".into(),
        )
    }

    /// The `Status` object.
    pub fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some((name, kind)) = &self.details {
            s["details"] = json!({"name": name, "kind": kind});
        }
        s
    }
}

/// The `Status` a successful DELETE of a collection (or of a kind answering with Status) sends.
pub fn success() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"})
}
