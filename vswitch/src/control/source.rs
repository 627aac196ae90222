//! Where peers and Services come from: the Kubernetes API ([`k8s`](super::k8s)) or the config
//! file, reloaded ([`reload`](super::reload)). Both feed the daemon through the same
//! [`ClusterSink`]; neither knows about the other.

use std::path::Path;
use std::sync::Arc;

use conf::config::{PeerSpec, ServiceSpec};

use super::k8s::{self, K8sError, K8sStatsHandle, K8sWatch};
use super::policy::{DirWatch, PolicyInputs};
use super::reload::FileWatch;
use super::Daemon;

/// Where computed tables go: the daemon in production, a recorder in tests. Each call carries a
/// complete table and must replace the previous one atomically.
pub trait ClusterSink: Send + Sync + 'static {
    fn apply_peers(&self, peers: Vec<PeerSpec>) -> Result<(), String>;
    /// Every Service. The Kubernetes watch hands the same `Arc` again for a Service that did
    /// not change, so a sink can tell the changed ones without comparing specs.
    fn apply_services(&self, services: Vec<Arc<ServiceSpec>>) -> Result<(), String>;
    /// NetworkPolicies, Namespaces and Pods, all of them.
    fn apply_policy(&self, _inputs: PolicyInputs) -> Result<(), String> {
        Ok(())
    }
    /// This node's topology zone (its Node's `topology.kubernetes.io/zone` label).
    fn apply_zone(&self, _zone: Option<String>) -> Result<(), String> {
        Ok(())
    }
}

impl ClusterSink for Daemon {
    fn apply_peers(&self, peers: Vec<PeerSpec>) -> Result<(), String> {
        self.replace_peers(peers).map_err(|e| e.to_string())
    }
    fn apply_services(&self, services: Vec<Arc<ServiceSpec>>) -> Result<(), String> {
        self.replace_shared_services(services)
            .map_err(|e| e.to_string())
    }
    fn apply_policy(&self, inputs: PolicyInputs) -> Result<(), String> {
        self.replace_policy(inputs);
        Ok(())
    }
    fn apply_zone(&self, zone: Option<String>) -> Result<(), String> {
        self.set_zone(zone).map_err(|e| e.to_string())
    }
}

/// What keeps the daemon's tables in step with their source; dropping it stops that.
pub enum Source {
    Kubernetes(K8sWatch),
    /// The config file, and the policy manifest directory when `[policy] dir` names one.
    File(FileWatch, Option<DirWatch>),
}

impl Source {
    /// The watch's counters in Kubernetes mode.
    pub fn k8s_stats(&self) -> Option<K8sStatsHandle> {
        match self {
            Source::Kubernetes(w) => Some(w.stats_handle()),
            Source::File(..) => None,
        }
    }
}

/// Starts the Kubernetes watch when `kubernetes.enabled`, else the config file reload. Must be
/// called on the daemon's tokio runtime.
pub async fn start(
    daemon: Arc<Daemon>,
    config_path: &Path,
    node_name_flag: Option<&str>,
) -> Result<Source, K8sError> {
    let config = daemon.config().clone();
    let sink: Arc<dyn ClusterSink> = daemon;
    if !config.kubernetes.enabled {
        let path = config_path.to_path_buf();
        let policy = config
            .policy
            .dir
            .clone()
            .map(|dir| DirWatch::spawn(dir, sink.clone()));
        return Ok(Source::File(FileWatch::spawn(path, config, sink), policy));
    }
    let watch = k8s::start(&config, node_name_flag, sink).await?;
    Ok(Source::Kubernetes(watch))
}
