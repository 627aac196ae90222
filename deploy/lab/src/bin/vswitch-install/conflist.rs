//! Writing the CNI conflist once vswitchd is ready.
//!
//! Readiness is asked of the admin socket the plugin itself will use (`GET /v1/status`,
//! `ready: true`), so the conflist appears only when a CNI ADD can actually be served. Nothing
//! is written while the socket is missing, refuses, or answers not ready.
//!
//! With `--watch` the step stays as a sidecar: whenever the daemon is ready and the conflist is
//! missing or differs (a node whose /etc/cni/net.d was cleaned, an edited file), it is written
//! again. It does not remove the conflist when the daemon goes away: a restart of vswitchd
//! (an upgrade) should not flip the node NotReady, and pods that are running keep working.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use conf::api::{Status, PATH_STATUS};
use conf::client::Client;
use conf::netconf::{NetConf, PLUGIN_TYPE, SUPPORTED_VERSIONS};
use serde_json::json;
use signal_hook::consts::{SIGINT, SIGTERM};

use crate::log;
use vswitch_lab::{fsutil, process};

/// How long one status request may take; a daemon this slow is not ready.
const STATUS_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ConflistError {
    #[error("cniVersion {0:?} is not one the plugin supports ({supported})", supported = SUPPORTED_VERSIONS.join(", "))]
    Version(String),
    #[error("the conflist would not be valid: {0}")]
    Invalid(String),
    #[error("vswitchd at {socket} was not ready within {secs} s (last: {last})")]
    Timeout {
        socket: PathBuf,
        secs: u64,
        last: String,
    },
    #[error("stopped by a signal before vswitchd was ready")]
    Stopped,
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub struct Options {
    pub socket: PathBuf,
    pub dest: PathBuf,
    pub name: String,
    pub cni_version: String,
    pub timeout: Option<Duration>,
    pub poll: Duration,
    pub watch: bool,
}

/// The conflist document: one plugin, vswitch, talking to `socket`.
pub fn render(opts: &Options) -> Result<String, ConflistError> {
    if !SUPPORTED_VERSIONS.contains(&opts.cni_version.as_str()) {
        return Err(ConflistError::Version(opts.cni_version.clone()));
    }
    // The plugin's netconf is the plugin entry plus the list's name and version (as libcni
    // builds it); check it with the plugin's own validation before any runtime sees it.
    let mut conf = NetConf::new(&opts.name, Some(opts.socket.clone()));
    conf.cni_version = opts.cni_version.clone();
    conf.validate()
        .map_err(|e| ConflistError::Invalid(e.to_string()))?;
    let doc = json!({
        "cniVersion": opts.cni_version,
        "name": opts.name,
        "plugins": [
            { "type": PLUGIN_TYPE, "socket": opts.socket, "capabilities": {"portMappings": true} }
        ]
    });
    serde_json::to_string_pretty(&doc)
        .map(|s| s + "\n")
        .map_err(|e| ConflistError::Invalid(e.to_string()))
}

/// Waits for a ready daemon and writes the conflist; with `watch`, keeps it in place until a
/// signal.
pub fn run(opts: &Options) -> Result<(), ConflistError> {
    let conflist = render(opts)?;
    // As PID 1 of its container this process gets no default SIGTERM action: without a
    // handler kubelet would wait out the whole grace period.
    let stop = Arc::new(AtomicBool::new(false));
    process::set_on_signals(&stop, &[SIGTERM, SIGINT], false).map_err(ConflistError::Signals)?;
    let started = Instant::now();
    let mut last_wait: Option<String> = None;
    let mut written = false;
    loop {
        match probe(opts) {
            Ok(node) => {
                let current = std::fs::read_to_string(&opts.dest).ok();
                if current.as_deref() != Some(conflist.as_str()) {
                    fsutil::write_atomic(&opts.dest, conflist.as_bytes(), 0o644).map_err(
                        |source| ConflistError::Write {
                            path: opts.dest.clone(),
                            source,
                        },
                    )?;
                    let why = match (&current, written) {
                        (None, false) => "vswitchd is ready",
                        (None, true) => "it went missing",
                        (Some(_), _) => "it differed",
                    };
                    log(&format!(
                        "wrote {} ({why}; node {node})",
                        opts.dest.display()
                    ));
                }
                written = true;
                last_wait = None;
                if !opts.watch {
                    return Ok(());
                }
            }
            Err(reason) => {
                if last_wait.as_deref() != Some(reason.as_str()) {
                    log(&format!("waiting for vswitchd: {reason}"));
                }
                if !written {
                    if let Some(limit) = opts.timeout.filter(|t| started.elapsed() >= *t) {
                        return Err(ConflistError::Timeout {
                            socket: opts.socket.clone(),
                            secs: limit.as_secs(),
                            last: reason,
                        });
                    }
                }
                last_wait = Some(reason);
            }
        }
        if pause(opts.poll, &stop) {
            return if written {
                log("stopping");
                Ok(())
            } else {
                Err(ConflistError::Stopped)
            };
        }
    }
}

/// Ok(node name) when the daemon answers ready; Err(why not) otherwise.
fn probe(opts: &Options) -> Result<String, String> {
    let client = Client::new(&opts.socket).with_timeout(STATUS_TIMEOUT);
    match client.get::<Status>(PATH_STATUS) {
        Ok(s) if s.ready => Ok(s.node),
        Ok(s) => Err(format!("vswitchd on node {} is not ready yet", s.node)),
        Err(e) => Err(e.to_string()),
    }
}

/// Sleeps for `d` in short steps; true when a stop signal arrived.
fn pause(d: Duration, stop: &AtomicBool) -> bool {
    let end = Instant::now() + d;
    loop {
        if stop.load(Ordering::Relaxed) {
            return true;
        }
        let now = Instant::now();
        if now >= end {
            return false;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}
