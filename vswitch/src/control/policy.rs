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
use conf::api::{PodPolicies, PoliciesResponse, PolicyInfo, SelectingPolicy};

use crate::policy::{Direction, Labels, PodMeta, PolicySet, PolicyTables, Selection};

use super::policy_dir::{PolicyDir, POLL_INTERVAL};
use super::ClusterSink;

/// Everything policy reads besides the local ports.
#[derive(Debug, Default, Clone)]
pub struct PolicyInputs {
    pub set: Arc<PolicySet>,
    pub pods: crate::policy::pods::PodList,
    /// Objects left out, each with the reason.
    pub problems: Vec<String>,
    /// `pods` by address, made once (at the first publish) for every table built from them.
    index: std::sync::OnceLock<Arc<crate::policy::tables::PodIndex>>,
}

impl PolicyInputs {
    /// The pods come out in one order (address, namespace, name) however the source listed
    /// them, so that two readings of the same objects are equal.
    pub fn from_objects(o: Objects) -> PolicyInputs {
        let pods: Vec<(IpAddr, Arc<PodMeta>)> = o
            .pods
            .into_iter()
            .flat_map(|(ips, meta)| {
                let meta = Arc::new(meta);
                ips.into_iter().map(move |ip| (ip, meta.clone()))
            })
            .collect();
        PolicyInputs::from_parts(o.policies, o.namespaces, pods, o.problems)
    }

    /// [`PolicyInputs::from_objects`] with the pods already read (the Kubernetes watch keeps
    /// each pod's reading while the pod does not change).
    pub fn from_parts(
        policies: Vec<crate::policy::Policy>,
        namespaces: Vec<(Arc<str>, Labels)>,
        pods: Vec<(IpAddr, Arc<PodMeta>)>,
        problems: Vec<String>,
    ) -> PolicyInputs {
        PolicyInputs {
            set: Arc::new(PolicySet::new(policies, namespaces)),
            pods: pods.into_iter().collect(),
            problems,
            index: Default::default(),
        }
    }

    /// Whether `other` holds the same policies, namespaces, pods and problems (what decides
    /// whether a new reading needs a table rebuild).
    pub fn same_as(&self, other: &PolicyInputs) -> bool {
        (Arc::ptr_eq(&self.set, &other.set) || self.set == other.set)
            && self.pods == other.pods
            && self.problems == other.problems
    }

    /// [`PolicyInputs::from_parts`] with the pods sorted and indexed already (the Kubernetes
    /// watch keeps both up to date pod by pod).
    pub fn from_sorted(
        policies: Vec<crate::policy::Policy>,
        namespaces: Vec<(Arc<str>, Labels)>,
        pods: crate::policy::pods::PodList,
        index: Arc<crate::policy::tables::PodIndex>,
        problems: Vec<String>,
    ) -> PolicyInputs {
        PolicyInputs {
            set: Arc::new(PolicySet::new(policies, namespaces)),
            pods,
            problems,
            index: std::sync::OnceLock::from(index),
        }
    }

    /// The pods by address (later entries for an address win).
    pub fn index(&self) -> Arc<crate::policy::tables::PodIndex> {
        self.index
            .get_or_init(|| Arc::new(self.pods.index()))
            .clone()
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
    let t = PolicyTables::with_index(inputs.set.clone(), inputs.index()).with_local(local);
    Some(Arc::new(t))
}

/// A local port as `vswitchctl policies` lists it: id, address, and the identity from its
/// CNI ADD (used when no policy tables are published).
pub struct LocalPort {
    pub id: u32,
    pub ip: IpAddr,
    pub meta: Arc<PodMeta>,
}

/// Why `vswitchctl policies --pod` has no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ViewError {
    #[error("pod {0:?}: give it as NAMESPACE/NAME")]
    BadName(String),
    #[error("no pod {pod:?} on this node; its pods: {known}")]
    NoPod { pod: String, known: String },
}

/// `GET /v1/policies`: each local pod (or only `only`, `namespace/name`) with the policies
/// selecting it, the policies in force and the objects left out. `tables` are the published
/// ones (`None` without policies).
pub fn view(
    inputs: &PolicyInputs,
    tables: Option<&PolicyTables>,
    ports: &[LocalPort],
    only: Option<&str>,
) -> Result<PoliciesResponse, ViewError> {
    let bad = |p: &&str| {
        p.split_once('/')
            .is_none_or(|(n, m)| n.is_empty() || m.is_empty())
    };
    if let Some(p) = only.filter(bad) {
        return Err(ViewError::BadName(p.to_string()));
    }
    let set = &inputs.set;
    let mut pods: Vec<PodPolicies> = ports
        .iter()
        .map(|l| {
            let local = tables.and_then(|t| t.local(l.id));
            let meta = local.map_or(&l.meta, |p| &p.pod);
            let none = Selection::default();
            pod_view(set, l, meta, local.map_or(&none, |p| &p.selected))
        })
        .filter(|p| only.is_none_or(|o| p.pod == o))
        .collect();
    if let (Some(o), true) = (only, pods.is_empty()) {
        let mut known: Vec<String> = ports
            .iter()
            .map(|l| format!("{}/{}", l.meta.namespace, l.meta.name))
            .collect();
        known.sort();
        return Err(ViewError::NoPod {
            pod: o.to_string(),
            known: if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            },
        });
    }
    pods.sort_by(|a, b| a.pod.cmp(&b.pod));
    let policies = set
        .policies()
        .iter()
        .map(|p| PolicyInfo {
            name: p.id(),
            pod_selector: p.pod_selector.to_string(),
            types: [Direction::Ingress, Direction::Egress]
                .into_iter()
                .filter(|d| p.rules(*d).is_some())
                .map(|d| capitalized(d.name()))
                .collect(),
        })
        .collect();
    Ok(PoliciesResponse {
        pods,
        policies,
        problems: inputs.problems.clone(),
    })
}

fn capitalized(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
        .unwrap_or_default()
}

/// One pod: who it is and, per direction, each selecting policy's rules as sentences.
fn pod_view(set: &PolicySet, l: &LocalPort, meta: &PodMeta, sel: &Selection) -> PodPolicies {
    let rules = |dir: Direction| -> Vec<SelectingPolicy> {
        let word = match dir {
            Direction::Ingress => "from",
            Direction::Egress => "to",
        };
        sel.get(dir)
            .iter()
            .filter_map(|&i| set.policy(i))
            .map(|p| SelectingPolicy {
                policy: p.id(),
                rules: p
                    .rules(dir)
                    .unwrap_or_default()
                    .iter()
                    .map(|r| format!("{word} {r}"))
                    .collect(),
            })
            .collect()
    };
    PodPolicies {
        pod: format!("{}/{}", meta.namespace, meta.name),
        port: l.id,
        ip: l.ip,
        labels: meta
            .labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        isolated_ingress: !sel.ingress.is_empty(),
        isolated_egress: !sel.egress.is_empty(),
        ingress: rules(Direction::Ingress),
        egress: rules(Direction::Egress),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::networking::v1::NetworkPolicy;

    fn policy(name: &str, spec: &str) -> crate::policy::Policy {
        let np: NetworkPolicy = serde_json::from_str(&format!(
            r#"{{"metadata":{{"name":"{name}","namespace":"x"}},"spec":{spec}}}"#
        ))
        .unwrap();
        crate::policy::Policy::from_k8s(&np, "x").unwrap()
    }

    /// Pods x/a (port 1) and x/b (port 2); `deny` isolates x/a for ingress, `web` admits
    /// TCP 80 from pods pod=b to it.
    fn fixture() -> (PolicyInputs, Arc<PolicyTables>, Vec<LocalPort>) {
        let set = PolicySet::new(
            vec![
                policy("deny", r#"{"podSelector":{"matchLabels":{"pod":"a"}}}"#),
                policy(
                    "web",
                    r#"{"podSelector":{"matchLabels":{"pod":"a"}},"ingress":[{"from":[{"podSelector":{"matchLabels":{"pod":"b"}}}],"ports":[{"port":80}]}]}"#,
                ),
            ],
            [],
        );
        let inputs = PolicyInputs {
            set: Arc::new(set),
            pods: Default::default(),
            problems: vec!["NetworkPolicy x/bad: spec: required".into()],
            ..Default::default()
        };
        let mut interner = Interner::default();
        let ports: Vec<LocalPort> = [(1, "a", [10, 244, 1, 2]), (2, "b", [10, 244, 1, 3])]
            .into_iter()
            .map(|(id, name, ip)| LocalPort {
                id,
                ip: IpAddr::from(ip),
                meta: local_meta(
                    Some(&format!("x/{name}")),
                    &BTreeMap::from([("pod".to_string(), name.to_string())]),
                    &mut interner,
                ),
            })
            .collect();
        let local = ports.iter().map(|l| (l.id, l.ip, Some(l.meta.clone())));
        let t = tables(&inputs, local.collect::<Vec<_>>()).unwrap();
        (inputs, t, ports)
    }

    #[test]
    fn each_pod_with_its_selecting_policies_rules_and_the_problems() {
        let (inputs, t, ports) = fixture();
        let r = view(&inputs, Some(&t), &ports, None).unwrap();
        assert_eq!(r.pods.len(), 2);
        let a = &r.pods[0];
        assert_eq!(a.pod, "x/a");
        assert_eq!(a.labels.get("pod").map(String::as_str), Some("a"));
        assert!(a.isolated_ingress && !a.isolated_egress);
        let names: Vec<&str> = a.ingress.iter().map(|s| s.policy.as_str()).collect();
        assert_eq!(names, ["x/deny", "x/web"]);
        assert!(a.ingress[0].rules.is_empty(), "{:?}", a.ingress[0]);
        assert_eq!(
            a.ingress[1].rules,
            ["from pods pod=b in the policy's namespace, TCP 80"]
        );
        assert!(a.egress.is_empty());
        let b = &r.pods[1];
        assert_eq!(b.pod, "x/b");
        assert!(!b.isolated_ingress && !b.isolated_egress && b.ingress.is_empty());
        let in_force: Vec<(&str, &str)> = r
            .policies
            .iter()
            .map(|p| (p.name.as_str(), p.pod_selector.as_str()))
            .collect();
        assert_eq!(in_force, [("x/deny", "pod=a"), ("x/web", "pod=a")]);
        assert_eq!(r.policies[0].types, ["Ingress"]);
        assert_eq!(r.problems, ["NetworkPolicy x/bad: spec: required"]);
    }

    #[test]
    fn one_pod_by_name_and_bad_names_refused() {
        let (inputs, t, ports) = fixture();
        let r = view(&inputs, Some(&t), &ports, Some("x/b")).unwrap();
        assert_eq!(r.pods.len(), 1);
        assert_eq!(r.pods[0].pod, "x/b");
        assert_eq!(
            view(&inputs, Some(&t), &ports, Some("x/zz")),
            Err(ViewError::NoPod {
                pod: "x/zz".into(),
                known: "x/a, x/b".into()
            })
        );
        for bad in ["a", "/a", "x/"] {
            assert_eq!(
                view(&inputs, Some(&t), &ports, Some(bad)),
                Err(ViewError::BadName(bad.into()))
            );
        }
    }

    #[test]
    fn without_policies_every_pod_is_shown_unisolated() {
        let (_, _, ports) = fixture();
        let r = view(&PolicyInputs::default(), None, &ports, None).unwrap();
        assert_eq!(r.pods.len(), 2);
        assert!(r
            .pods
            .iter()
            .all(|p| !p.isolated_ingress && p.ingress.is_empty()));
        assert!(r.policies.is_empty() && r.problems.is_empty());
    }
}
