//! NetworkPolicy's inputs and the tables built from them.
//!
//! The inputs are the policies, the namespaces and the pods known by address (from the API in
//! Kubernetes mode, from the manifest directory in static mode). The daemon adds its own pods'
//! identities from their CNI ADDs (namespace and name from CNI_ARGS, labels from the netconf)
//! where the inputs do not know the address, and builds [`PolicyTables`] with every table
//! publication.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::task::JoinHandle;

use crate::policy::manifests::Objects;
use crate::policy::selector::Interner;
use crate::policy::{Labels, PodMeta, PolicySet, PolicyTables};

use super::policy_dir::{PolicyDir, POLL_INTERVAL};
use super::ClusterSink;

/// Everything policy reads besides the local ports.
#[derive(Debug, Default, Clone)]
pub struct PolicyInputs {
    pub set: Arc<PolicySet>,
    pub pods: Arc<Vec<(IpAddr, Arc<PodMeta>)>>,
    /// Objects left out, each with the reason.
    pub problems: Vec<String>,
}

impl PolicyInputs {
    /// The pods come out in one order (address, namespace, name) however the source listed
    /// them, so that two readings of the same objects are equal.
    pub fn from_objects(o: Objects) -> PolicyInputs {
        let mut pods: Vec<(IpAddr, Arc<PodMeta>)> = o
            .pods
            .into_iter()
            .flat_map(|(ips, meta)| {
                let meta = Arc::new(meta);
                ips.into_iter().map(move |ip| (ip, meta.clone()))
            })
            .collect();
        pods.sort_unstable_by(|(a, p), (b, q)| {
            (a, &p.namespace, &p.name).cmp(&(b, &q.namespace, &q.name))
        });
        PolicyInputs {
            set: Arc::new(PolicySet::new(o.policies, o.namespaces)),
            pods: Arc::new(pods),
            problems: o.problems,
        }
    }

    /// Whether `other` holds the same policies, namespaces, pods and problems (what decides
    /// whether a new reading needs a table rebuild).
    pub fn same_as(&self, other: &PolicyInputs) -> bool {
        (Arc::ptr_eq(&self.set, &other.set) || self.set == other.set)
            && (Arc::ptr_eq(&self.pods, &other.pods) || self.pods == other.pods)
            && self.problems == other.problems
    }

    /// No policy at all: the datapath judges nothing.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

/// A local pod's identity from its CNI ADD: `namespace/name` and labels.
pub fn local_meta(
    pod: Option<&str>,
    labels: &BTreeMap<String, String>,
    interner: &mut Interner,
) -> Arc<PodMeta> {
    let (ns, name) = pod
        .and_then(|p| p.split_once('/'))
        .unwrap_or(("default", pod.unwrap_or_default()));
    Arc::new(PodMeta {
        namespace: ns.into(),
        name: name.into(),
        labels: interner.intern(Labels::new(labels.iter())),
        ports: Arc::from(Vec::new()),
    })
}

/// The tables for `inputs` and the local pods (port, address and identity from the ADD);
/// `None` without policies, so that the datapath judges nothing.
pub fn tables(
    inputs: &PolicyInputs,
    local: impl IntoIterator<Item = (u32, IpAddr, Option<Arc<PodMeta>>)>,
) -> Option<Arc<PolicyTables>> {
    if inputs.is_empty() {
        return None;
    }
    let t = PolicyTables::new(inputs.set.clone(), inputs.pods.iter().cloned()).with_local(local);
    Some(Arc::new(t))
}

/// Static mode's watch of the manifest directory; dropping it stops it.
pub struct DirWatch {
    task: JoinHandle<()>,
}

impl DirWatch {
    /// Polls `dir` every [`POLL_INTERVAL`] on the current tokio runtime and hands each new
    /// reading to `sink`.
    pub fn spawn(dir: PathBuf, sink: Arc<dyn ClusterSink>) -> DirWatch {
        tracing::info!(
            "NetworkPolicy: manifests from {}, read again when they change",
            dir.display()
        );
        let task = tokio::spawn(async move {
            let mut d = PolicyDir::new(dir);
            let mut tick = tokio::time::interval(POLL_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let s = sink.clone();
                let looked = tokio::task::spawn_blocking(move || {
                    if let Some(o) = d.poll() {
                        let inputs = PolicyInputs::from_objects(o);
                        tracing::info!(
                            "NetworkPolicy: {} policies, {} pods known from manifests",
                            inputs.set.len(),
                            inputs.pods.len()
                        );
                        if let Err(e) = s.apply_policy(inputs) {
                            tracing::warn!("NetworkPolicy: not applied: {e}");
                        }
                    }
                    d
                })
                .await;
                match looked {
                    Ok(back) => d = back,
                    Err(e) => {
                        tracing::error!("policy directory watch stopped: {e}");
                        return;
                    }
                }
            }
        });
        DirWatch { task }
    }
}

impl Drop for DirWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}
