//! The lab's one error type.
//!
//! Every message says what went wrong and what to do next: most lab failures are fixed by
//! building the binaries, running as root, or tearing down a previous lab.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("invalid lab name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },

    #[error("invalid pod name {name:?}: {reason}")]
    InvalidPodName { name: String, reason: String },

    #[error("invalid namespace {0:?}: a namespace is a DNS label (1 to 63 of [a-z0-9-], not starting or ending with '-')")]
    InvalidNamespace(String),

    #[error("invalid lab spec: {0}")]
    InvalidSpec(String),

    #[error("vswitch-lab must run as root: it creates network namespaces and veth pairs")]
    NotRoot,

    #[error("lab {name:?} already exists ({what}); run `vswitch-lab down --name {name}` first")]
    Exists { name: String, what: String },

    #[error(
        "no lab named {name:?} ({} does not exist); start one with `vswitch-lab up --name {name}`",
        path.display()
    )]
    NotFound { name: String, path: PathBuf },

    #[error(
        "lab state {} is unreadable: {message}; run `vswitch-lab down --name {name}` to clean up",
        path.display()
    )]
    State {
        name: String,
        path: PathBuf,
        message: String,
    },

    #[error(
        "{} not found; build with `cargo build --workspace --bins`, or set VSWITCH_BIN_DIR to \
         the directory holding vswitchd, vswitch and vswitch-install",
        path.display()
    )]
    BinaryMissing { path: PathBuf },

    #[error(transparent)]
    Run(#[from] crate::process::RunError),

    /// A command of the bench that could not start, did not finish, or failed (the reason
    /// says which, with the tail of its stderr).
    #[error("{cmd}: {reason}")]
    BenchCommand { cmd: String, reason: String },

    /// Output of a measuring tool or a /proc file that does not hold what a measurement needs;
    /// the message names the tool and shows what it printed.
    #[error("{0}")]
    BadOutput(String),

    /// A measurement or a testbed that did not work out: no connectivity, a server that never
    /// listened, a Service that was not applied.
    #[error("{0}")]
    Measurement(String),

    #[error("interrupted")]
    Interrupted,

    #[error("Service {name}: {message}")]
    BadService { name: String, message: String },

    #[error("cannot run `{cmd}`: {source}")]
    Spawn { cmd: String, source: std::io::Error },

    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{}: {reason}", file.display())]
    BadManifest { file: PathBuf, reason: String },

    #[error("{0:?} is not a label (KEY=VALUE: KEY an optional DNS prefix and '/', then a name of at most 63 alphanumerics, '-', '_' or '.'; VALUE the same, or empty)")]
    BadLabel(String),

    #[error(
        "{0:?} is not a hostPort ([HOST_IP:]HOST_PORT:CONTAINER_PORT[/tcp|/udp], as podman's -p)"
    )]
    BadPublish(String),

    #[error("generated a bad vswitchd config for node {node} (a vswitch-lab bug): {reason}")]
    BadConfig { node: String, reason: String },

    #[error(
        "vswitchd on node {node} is not ready after {:.1}s (last answer: {last}); last lines of {}:\n{tail}",
        waited.as_secs_f64(), log.display()
    )]
    DaemonNotReady {
        node: String,
        waited: Duration,
        last: String,
        log: PathBuf,
        tail: String,
    },

    #[error(
        "vswitchd on node {node} exited ({status}) before it was ready; last lines of {}:\n{tail}",
        log.display()
    )]
    DaemonExited {
        node: String,
        status: String,
        log: PathBuf,
        tail: String,
    },

    #[error("cannot stop the running vswitchd of node {node}: {message}")]
    DaemonStop { node: String, message: String },

    #[error("CNI {command} of pod {pod} failed: {message}")]
    Cni {
        command: &'static str,
        pod: String,
        message: String,
    },

    #[error("lab {lab} has no {what} {target:?}; it has: {known}")]
    NoSuchTarget {
        lab: String,
        what: &'static str,
        target: String,
        known: String,
    },

    #[error("lab {lab} already has a pod {pod:?}")]
    PodExists { lab: String, pod: String },

    #[error(
        "tearing down lab {name} left problems (run `vswitch-lab down --name {name}` again once fixed):\n  {}",
        problems.join("\n  ")
    )]
    Teardown { name: String, problems: Vec<String> },

    #[error(
        "{error}\nrolling back the half-built lab also failed; run `vswitch-lab down --name {name}`:\n  {}",
        problems.join("\n  ")
    )]
    RollbackFailed {
        name: String,
        error: Box<LabError>,
        problems: Vec<String>,
    },
}

impl LabError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LabError::Io {
            path: path.into(),
            source,
        }
    }
}
