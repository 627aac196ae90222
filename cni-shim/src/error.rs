//! The plugin's errors and how each becomes a CNI error object.
//!
//! Every failure ends as `{"cniVersion", "code", "msg", "details"}` on stdout (CNI spec 1.1.0,
//! "Error"). The variant decides the code, so a code can't drift from the failure it describes;
//! errors from vswitchd already carry a CNI code and pass through unchanged.

use conf::api::{code, ApiError};
use conf::client::ClientError;
use conf::netconf::NetConfError;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A CNI_* variable is missing or malformed (code 4).
    #[error("{var}: {reason}")]
    Env { var: &'static str, reason: String },
    /// The network configuration could not be read from stdin (code 5).
    #[error("cannot read the network configuration from stdin: {0}")]
    Stdin(#[source] std::io::Error),
    /// The network configuration (or a part of it, like prevResult) is not the JSON we expect
    /// (code 6).
    #[error("cannot decode {what}: {reason}")]
    Decode { what: &'static str, reason: String },
    /// The netconf's cniVersion is unsupported, or too old for the command (code 1).
    #[error("{0}")]
    IncompatibleVersion(String),
    /// The netconf parsed but a field is invalid; the message names the field (code 7).
    #[error("invalid network configuration: {0}")]
    NetConf(#[from] NetConfError),
    /// vswitchd could not be reached or stopped answering; the runtime should retry (code 11).
    #[error("{msg}")]
    TryAgainLater { msg: String, details: String },
    /// STATUS: the plugin cannot serve ADD right now (code 50).
    #[error("{msg}")]
    NotAvailable { msg: String, details: String },
    /// CHECK found the attachment differs from what prevResult recorded (code 102).
    #[error("{0}")]
    CheckFailed(String),
    /// vswitchd answered something that is not its API (code 110).
    #[error("vswitchd sent a malformed response: {0}")]
    Protocol(String),
    /// A bug in the plugin itself (code 110).
    #[error("internal error: {0}")]
    Internal(String),
    /// vswitchd refused the request; its CNI code, message and details pass through.
    #[error("{}", .0.msg)]
    Daemon(ApiError),
}

impl Error {
    pub fn env(var: &'static str, reason: impl Into<String>) -> Self {
        Error::Env {
            var,
            reason: reason.into(),
        }
    }

    /// The CNI error code.
    pub fn code(&self) -> u32 {
        match self {
            Error::Env { .. } => code::INVALID_ENV,
            Error::Stdin(_) => code::IO_FAILURE,
            Error::Decode { .. } => code::DECODE_FAILURE,
            Error::IncompatibleVersion(_) => code::INCOMPATIBLE_VERSION,
            Error::NetConf(_) => code::INVALID_NETCONF,
            Error::TryAgainLater { .. } => code::TRY_AGAIN_LATER,
            Error::NotAvailable { .. } => code::NOT_AVAILABLE,
            Error::CheckFailed(_) => code::CHECK_FAILED,
            Error::Protocol(_) | Error::Internal(_) => code::INTERNAL,
            Error::Daemon(e) => e.code,
        }
    }

    pub fn details(&self) -> &str {
        match self {
            Error::TryAgainLater { details, .. } | Error::NotAvailable { details, .. } => details,
            Error::Daemon(e) => &e.details,
            _ => "",
        }
    }

    /// Maps a failed call to vswitchd. `unreachable` builds the error for a daemon that could
    /// not be reached or stopped answering: TRY_AGAIN_LATER for ADD/DEL/CHECK/GC, NOT_AVAILABLE
    /// for STATUS.
    pub(crate) fn from_client(e: ClientError, unreachable: fn(String, String) -> Error) -> Error {
        const HINT: &str = "is vswitchd running on this node?";
        match e {
            ClientError::Connect { path, source } => unreachable(
                format!("cannot reach vswitchd at {}", path.display()),
                format!("{source}; {HINT}"),
            ),
            ClientError::Io { path, source } => unreachable(
                format!("lost the connection to vswitchd at {}", path.display()),
                format!("{source}; {HINT}"),
            ),
            ClientError::Protocol(m) => Error::Protocol(m),
            ClientError::Api(e) => Error::Daemon(e),
        }
    }

    pub(crate) fn try_again(msg: String, details: String) -> Error {
        Error::TryAgainLater { msg, details }
    }

    pub(crate) fn not_available(msg: String, details: String) -> Error {
        Error::NotAvailable { msg, details }
    }

    /// The CNI error object, written in `cni_version`.
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        struct CniError<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: String,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        let e = CniError {
            cni_version,
            code: self.code(),
            msg: self.to_string(),
            details: self.details(),
        };
        // Serializing strings and integers cannot fail; the fallback keeps that unprovable
        // case from panicking.
        serde_json::to_string(&e).unwrap_or_else(|_| {
            format!(
                r#"{{"cniVersion":"{}","code":{},"msg":"internal error"}}"#,
                conf::netconf::CNI_VERSION,
                code::INTERNAL
            )
        })
    }
}
