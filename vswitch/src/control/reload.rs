//! Static mode: the config file as the source of peers and Services, reloaded when it changes.
//!
//! Why polling, every 500 ms, of the file's content: it needs no extra crate, and it sees every
//! way a file gets replaced: an editor's write-to-temp-and-rename, a ConfigMap volume's
//! `..data` symlink swap (which an inotify watch on the old inode would miss), or two writes in
//! the same second that leave the mtime unchanged. Reading a few kilobytes twice a second costs
//! nothing next to that.
//!
//! A changed file is parsed and validated as a whole with [`Config::load`] before anything is
//! applied, so a half-edited or invalid file never reaches the tables: the error (which names
//! the field) is logged once and the running tables stay. Peers and Services are applied through
//! the same [`ClusterSink`] as the Kubernetes watch, one atomic swap each, and only when they
//! changed, so editing a Service does not disturb the peer table or the other way round. Every
//! other setting is bound to resources made at start (sockets, the datapath, IPAM): a change
//! to one of them is named in a "needs a restart" warning instead of being half applied.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use conf::Config;
use serde::Serialize;
use serde_json::Value;
use tokio::task::JoinHandle;

use super::ClusterSink;

/// How often the file is looked at.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// What one look at the file found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// Nothing that matters changed.
    Unchanged,
    /// The file changed and is valid; what was applied and what needs a restart.
    Changed {
        peers: bool,
        services: bool,
        needs_restart: Vec<String>,
    },
    /// The file changed but is invalid (or a sink refused a table); the message names why.
    Invalid(String),
    /// The file cannot be read.
    Unreadable(String),
}

/// The reload state: the config in force and the file content last seen.
pub struct Reloader {
    path: PathBuf,
    running: Config,
    last_text: Option<Vec<u8>>,
    last_report: Option<String>,
}

impl Reloader {
    /// `running` is the config the daemon started with.
    pub fn new(path: PathBuf, running: Config) -> Reloader {
        Reloader {
            path,
            running,
            last_text: None,
            last_report: None,
        }
    }

    /// The config in force (peers and Services as last applied from the file).
    pub fn running(&self) -> &Config {
        &self.running
    }

    /// Looks at the file once and applies what changed. Blocking (reads the file).
    pub fn poll(&mut self, sink: &dyn ClusterSink) -> ReloadOutcome {
        let text = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(e) => {
                let msg = format!("cannot read config file {}: {e}", self.path.display());
                self.report(&msg, true);
                // Read it again in full once it is back.
                self.last_text = None;
                return ReloadOutcome::Unreadable(msg);
            }
        };
        if self.last_text.as_deref() == Some(text.as_slice()) {
            return ReloadOutcome::Unchanged;
        }
        self.last_text = Some(text);
        let new = match Config::load(&self.path) {
            Ok(c) => c,
            Err(e) => {
                let msg = format!("{e} (in {})", self.path.display());
                self.report(
                    &format!("{msg}; keeping the running peers and services"),
                    true,
                );
                return ReloadOutcome::Invalid(msg);
            }
        };
        let needs_restart = restart_fields(&self.running, &new);
        let peers = new.peers != self.running.peers;
        let services = new.services != self.running.services;
        if peers || services {
            warn_endpoints(&self.path, &new);
        }
        if peers {
            if let Err(e) = sink.apply_peers(new.peers.clone()) {
                let msg = format!("peers from {}: {e}", self.path.display());
                self.report(&format!("{msg}; keeping the running peers"), true);
                return ReloadOutcome::Invalid(msg);
            }
            tracing::info!(
                "config {}: peers now {}",
                self.path.display(),
                names(new.peers.iter().map(|p| p.name.clone()))
            );
            self.running.peers = new.peers;
        }
        if services {
            let shared = new.services.iter().cloned().map(Arc::new).collect();
            if let Err(e) = sink.apply_services(shared) {
                let msg = format!("services from {}: {e}", self.path.display());
                self.report(&format!("{msg}; keeping the running services"), true);
                return ReloadOutcome::Invalid(msg);
            }
            tracing::info!(
                "config {}: services now {}",
                self.path.display(),
                names(
                    new.services
                        .iter()
                        .map(|s| format!("{}/{}", s.namespace, s.name))
                )
            );
            self.running.services = new.services;
        }
        if needs_restart.is_empty() {
            self.last_report = None;
        } else {
            self.report(
                &format!(
                    "config {}: {} changed; that needs a restart of vswitchd to take effect \
                     (peers and services are applied live)",
                    self.path.display(),
                    needs_restart.join(", ")
                ),
                false,
            );
        }
        if !peers && !services && needs_restart.is_empty() {
            // Rewritten with the same meaning (comments, formatting).
            return ReloadOutcome::Unchanged;
        }
        ReloadOutcome::Changed {
            peers,
            services,
            needs_restart,
        }
    }

    /// Logs a message unless it is the one logged last.
    fn report(&mut self, msg: &str, error: bool) {
        if self.last_report.as_deref() == Some(msg) {
            return;
        }
        if error {
            tracing::error!("{msg}");
        } else {
            tracing::warn!("{msg}");
        }
        self.last_report = Some(msg.to_string());
    }
}

/// Logs each static Service endpoint the switch cannot serve as written (a pasted example's
/// nodes, say): accepted, but not silently.
fn warn_endpoints(path: &Path, config: &Config) {
    for w in config.endpoint_warnings() {
        tracing::warn!("config {}: {w}", path.display());
    }
}

fn names(it: impl Iterator<Item = String>) -> String {
    let v: Vec<String> = it.collect();
    if v.is_empty() {
        "(none)".into()
    } else {
        v.join(", ")
    }
}

/// The dotted names of the settings, other than peers and services, that differ.
pub fn restart_fields(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let mut section = |name: &str, a: Value, b: Value| {
        let (mut fa, mut fb) = (BTreeMap::new(), BTreeMap::new());
        flatten(name, &a, &mut fa);
        flatten(name, &b, &mut fb);
        let mut keys: Vec<&String> = fa.keys().chain(fb.keys()).collect();
        keys.sort();
        keys.dedup();
        for k in keys {
            if fa.get(k) != fb.get(k) {
                out.push(k.clone());
            }
        }
    };
    section("node", json(&old.node), json(&new.node));
    section("admin", json(&old.admin), json(&new.admin));
    section("datapath", json(&old.datapath), json(&new.datapath));
    section("dns", json(&old.dns), json(&new.dns));
    section("overlay", json(&old.overlay), json(&new.overlay));
    section("nat", json(&old.nat), json(&new.nat));
    section("kubernetes", json(&old.kubernetes), json(&new.kubernetes));
    out
}

fn json<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// Leaf values by dotted path; arrays are leaves (a list is one setting).
fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                flatten(&format!("{prefix}.{k}"), v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

/// The polling task; dropping it stops it.
pub struct FileWatch {
    task: JoinHandle<()>,
}

impl FileWatch {
    /// Polls `path` every [`POLL_INTERVAL`] on the current tokio runtime.
    pub fn spawn(path: PathBuf, running: Config, sink: Arc<dyn ClusterSink>) -> FileWatch {
        tracing::info!(
            "static mode: peers and services from {}, reloaded when it changes",
            path.display()
        );
        warn_endpoints(&path, &running);
        let task = tokio::spawn(poll_loop(Reloader::new(path, running), sink));
        FileWatch { task }
    }
}

impl Drop for FileWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn poll_loop(mut reloader: Reloader, sink: Arc<dyn ClusterSink>) {
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let s = sink.clone();
        // File reads and the table swap are blocking work; keep them off the runtime's worker.
        match tokio::task::spawn_blocking(move || {
            reloader.poll(&*s);
            reloader
        })
        .await
        {
            Ok(r) => reloader = r,
            Err(e) => {
                tracing::error!("config reload stopped: {e}");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conf::config::{PeerSpec, ServiceSpec};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder {
        peers: Mutex<Vec<Vec<PeerSpec>>>,
        services: Mutex<Vec<Vec<ServiceSpec>>>,
    }

    impl ClusterSink for Recorder {
        fn apply_peers(&self, peers: Vec<PeerSpec>) -> Result<(), String> {
            self.peers.lock().unwrap().push(peers);
            Ok(())
        }
        fn apply_services(&self, services: Vec<Arc<ServiceSpec>>) -> Result<(), String> {
            let services = services.into_iter().map(Arc::unwrap_or_clone).collect();
            self.services.lock().unwrap().push(services);
            Ok(())
        }
    }

    const BASE: &str = "[node]\nname = \"n1\"\npod_cidr = \"10.244.1.0/24\"\n\
        [overlay]\nunderlay_ip = \"192.168.1.1\"\n";
    const PEER: &str = "[[peers]]\nname = \"n2\"\nunderlay_ip = \"192.168.1.2\"\n\
        vtep_mac = \"0e:58:c0:a8:01:02\"\npod_cidrs = [\"10.244.2.0/24\"]\n";
    const SVC: &str = "[[services]]\nnamespace = \"default\"\nname = \"web\"\n\
        cluster_ips = [\"10.96.0.20\"]\nports = [{ port = 80, target_port = 8080 }]\n\
        endpoints = [{ ip = \"10.244.2.5\" }]\n";

    fn temp_file(tag: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        std::env::temp_dir().join(format!(
            "vswitch-reload-{tag}-{}-{nanos}.toml",
            std::process::id()
        ))
    }

    #[test]
    fn reload_applies_peers_and_services_and_keeps_them_on_errors() {
        let path = temp_file("apply");
        std::fs::write(&path, format!("{BASE}{PEER}")).unwrap();
        let running = Config::load(&path).unwrap();
        let mut r = Reloader::new(path.clone(), running);
        let sink = Recorder::default();

        // First look: same config as running, nothing to apply; then a comment added.
        assert_eq!(r.poll(&sink), ReloadOutcome::Unchanged);
        std::fs::write(&path, format!("# edited\n{BASE}{PEER}")).unwrap();
        assert_eq!(r.poll(&sink), ReloadOutcome::Unchanged);

        // A new Service: only the Service table is replaced.
        std::fs::write(&path, format!("{BASE}{PEER}{SVC}")).unwrap();
        assert_eq!(
            r.poll(&sink),
            ReloadOutcome::Changed {
                peers: false,
                services: true,
                needs_restart: vec![]
            }
        );
        assert!(sink.peers.lock().unwrap().is_empty());
        let svcs = sink.services.lock().unwrap().clone();
        assert_eq!(svcs.len(), 1);
        assert_eq!(svcs[0][0].name, "web");
        assert_eq!(svcs[0][0].ports[0].target_port, Some(8080));

        // An invalid edit: the error names the field, nothing is applied.
        std::fs::write(
            &path,
            format!(
                "{BASE}{}{SVC}",
                PEER.replace("10.244.2.0/24", "10.244.0.0/16")
            ),
        )
        .unwrap();
        match r.poll(&sink) {
            ReloadOutcome::Invalid(msg) => assert!(msg.contains("peers"), "{msg}"),
            other => panic!("expected Invalid, got {other:?}"),
        }
        let broken = format!("{BASE}{SVC}[[peers]]\nname = ");
        std::fs::write(&path, &broken).unwrap();
        assert!(matches!(r.poll(&sink), ReloadOutcome::Invalid(_)));
        assert!(sink.peers.lock().unwrap().is_empty());
        assert_eq!(sink.services.lock().unwrap().len(), 1);
        assert_eq!(r.running().peers.len(), 1, "the running peers stay");

        // The peer removed, and a setting that needs a restart changed.
        std::fs::write(
            &path,
            format!(
                "{}{SVC}",
                BASE.replace("name = \"n1\"", "name = \"n1\"\nmtu = 1400")
            ),
        )
        .unwrap();
        assert_eq!(
            r.poll(&sink),
            ReloadOutcome::Changed {
                peers: true,
                services: false,
                needs_restart: vec!["node.mtu".into()]
            }
        );
        assert_eq!(sink.peers.lock().unwrap().as_slice(), &[Vec::new()]);

        std::fs::remove_file(&path).unwrap();
        assert!(matches!(r.poll(&sink), ReloadOutcome::Unreadable(_)));
    }

    #[test]
    fn restart_fields_are_named() {
        let a = Config::parse(BASE).unwrap();
        let mut b = a.clone();
        b.overlay.vtep_mac = Some("0e:00:00:00:00:01".into());
        b.kubernetes.enabled = true;
        b.dns.nameservers = vec!["10.96.0.10".parse().unwrap()];
        b.peers = Vec::new();
        assert_eq!(
            restart_fields(&a, &b),
            vec!["dns.nameservers", "overlay.vtep_mac", "kubernetes.enabled"]
        );
    }
}
