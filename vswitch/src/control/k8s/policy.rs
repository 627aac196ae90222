//! What the Kubernetes watch keeps of NetworkPolicies, Namespaces and Pods, and the policy
//! inputs made from it.
//!
//! Memory is the constraint here: a cluster of 100,000 pods is 100,000 objects in the Pod store
//! for as long as the daemon runs. A k8s-openapi `Pod` is 2.4 KB before any of its strings (the
//! struct alone, every field empty), so the Pod watch parses into [`PolicyPod`] instead, a type
//! with only the fields policy reads: serde skips everything else as it reads the API's JSON.
//! Each object is then trimmed as it arrives (`WatchStreamExt::modify`): metadata keeps name,
//! namespace, uid, resourceVersion and labels (no managedFields, annotations or owner
//! references), and a pod whose address is not its own (hostNetwork, or finished) keeps only
//! what says so. Namespaces keep name and labels, NetworkPolicies their spec.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ContainerPort, Namespace};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use crate::control::policy::PolicyInputs;
use crate::policy::manifests::{owns_address, pod_meta, Objects, PodFields};
use crate::policy::pods::{PodIndex, PodList};
use crate::policy::selector::Interner;
use crate::policy::PodMeta;

/// A Pod as the policy watch reads it from the API (`/api/v1/pods`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PolicyPod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<PolicyPodSpec>,
    #[serde(default)]
    pub status: Option<PolicyPodStatus>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyPodSpec {
    #[serde(default)]
    pub host_network: Option<bool>,
    #[serde(default)]
    pub containers: Vec<PolicyContainer>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct PolicyContainer {
    #[serde(default)]
    pub ports: Option<Vec<ContainerPort>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct PolicyPodStatus {
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Option<Vec<PodIp>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct PodIp {
    pub ip: String,
}

impl kube::Resource for PolicyPod {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl PodFields for PolicyPod {
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn host_network(&self) -> bool {
        self.spec.as_ref().and_then(|s| s.host_network) == Some(true)
    }
    fn phase(&self) -> Option<&str> {
        self.status.as_ref()?.phase.as_deref()
    }
    fn ips(&self) -> impl Iterator<Item = &str> {
        self.status.iter().flat_map(|s| {
            let listed = s.pod_ips.iter().flatten().map(|p| p.ip.as_str());
            listed.chain(s.pod_ip.as_deref())
        })
    }
    fn container_ports(&self) -> impl Iterator<Item = &[ContainerPort]> {
        let containers = self.spec.iter().flat_map(|s| s.containers.iter());
        containers.map(|c| c.ports.as_deref().unwrap_or_default())
    }
}

/// The metadata the stores keep: what names an object and its version, and its labels when
/// `labels`.
fn trimmed(m: &mut ObjectMeta, labels: bool) {
    let m0 = std::mem::take(m);
    *m = ObjectMeta {
        name: m0.name,
        namespace: m0.namespace,
        uid: m0.uid,
        resource_version: m0.resource_version,
        labels: if labels { m0.labels } else { None },
        ..ObjectMeta::default()
    };
}

/// Trims a Pod as it arrives. A pod whose address is not its own keeps only its name and the
/// reason it is left out.
pub fn strip_pod(p: &mut PolicyPod) {
    let own = owns_address(p);
    trimmed(&mut p.metadata, own);
    if own {
        for c in p.spec.iter_mut().flat_map(|s| s.containers.iter_mut()) {
            for port in c.ports.iter_mut().flatten() {
                port.host_ip = None;
                port.host_port = None;
            }
        }
    } else {
        if let Some(s) = p.spec.as_mut() {
            s.containers = Vec::new();
        }
        if let Some(s) = p.status.as_mut() {
            s.pod_ip = None;
            s.pod_ips = None;
        }
    }
}

/// Trims a Namespace as it arrives: name and labels.
pub fn strip_namespace(ns: &mut Namespace) {
    trimmed(&mut ns.metadata, true);
    ns.spec = None;
    ns.status = None;
}

/// Trims a NetworkPolicy as it arrives: its name and spec (kubectl's last-applied annotation,
/// a copy of the object, goes).
pub fn strip_policy(np: &mut NetworkPolicy) {
    trimmed(&mut np.metadata, false);
}

/// The policy inputs from lists of objects, read as the Pod watch reads a list. Objects that
/// cannot be used are left out, each with a problem naming it; the others stay in force.
pub fn inputs<'a>(
    policies: impl IntoIterator<Item = &'a NetworkPolicy>,
    namespaces: impl IntoIterator<Item = &'a Namespace>,
    pods: impl IntoIterator<Item = &'a PolicyPod>,
) -> PolicyInputs {
    use kube::runtime::watcher::Event;
    let mut store = PodStore::default();
    store.apply(&Event::Init);
    for p in pods {
        store.apply(&Event::InitApply(p.clone()));
    }
    store.apply(&Event::InitDone);
    inputs_from_store(policies, namespaces, &store)
}

/// What policy reads of one pod: its addresses with its identity, or why it is left out.
type PodReading = Result<Vec<(IpAddr, Arc<PodMeta>)>, String>;

/// The Pod watch's store: each pod as policy reads it (addresses, identity, labels, named
/// ports), made as the pod arrives, and nothing else. 100,000 pods cost their readings, a
/// few hundred bytes each, not 100,000 API objects held as well. The sorted list and the index
/// by address that policy's tables are built from are kept up to date pod by pod, so a pod's
/// change among 100,000 costs a copy of each, not a sort and a new index.
#[derive(Default)]
pub struct PodStore {
    live: HashMap<(String, String), PodReading>,
    /// A list in progress: it replaces `live` when complete, as a reflector's store does.
    building: Option<HashMap<(String, String), PodReading>>,
    labels: Interner,
    /// Readings made since the interner was last pruned.
    made: usize,
    /// Every address with its pod, in (address, namespace, name) order.
    sorted: PodList,
    /// The same by address: the last in that order for an address shared.
    index: PodIndex,
    /// The pods left out, with why.
    problems: BTreeMap<(String, String), String>,
}

fn read(pod: &PolicyPod, labels: &mut Interner) -> PodReading {
    if !owns_address(pod) {
        return Ok(Vec::new());
    }
    let (ips, meta) = pod_meta(pod, "default", labels)?;
    let meta = Arc::new(meta);
    Ok(ips.into_iter().map(|ip| (ip, meta.clone())).collect())
}

fn key(pod: &PolicyPod) -> (String, String) {
    (
        pod.metadata.namespace.clone().unwrap_or_default(),
        pod.metadata.name.clone().unwrap_or_default(),
    )
}

impl PodStore {
    /// Takes one event of the Pod watch.
    pub fn apply(&mut self, ev: &kube::runtime::watcher::Event<PolicyPod>) {
        use kube::runtime::watcher::Event;
        self.made += 1;
        match ev {
            Event::Init => self.building = Some(HashMap::new()),
            Event::InitApply(p) => {
                let r = read(p, &mut self.labels);
                self.building.get_or_insert_default().insert(key(p), r);
            }
            Event::InitDone => {
                if let Some(b) = self.building.take() {
                    self.live = b;
                    self.rebuild();
                }
            }
            Event::Apply(p) => {
                let k = key(p);
                let r = read(p, &mut self.labels);
                let old = self.live.insert(k.clone(), r.clone());
                self.replace(&k, old, Some(r));
            }
            Event::Delete(p) => {
                let k = key(p);
                let old = self.live.remove(&k);
                self.replace(&k, old, None);
            }
        }
        if self.made > 2 * self.live.len() + 1024 {
            self.labels.prune();
            self.made = 0;
        }
    }

    /// The sorted list, the index and the problems from `live`, whole.
    fn rebuild(&mut self) {
        let mut sorted = Vec::with_capacity(self.live.len());
        self.problems.clear();
        for (k, r) in &self.live {
            match r {
                Ok(v) => sorted.extend(v.iter().cloned()),
                Err(e) => {
                    self.problems.insert(k.clone(), e.clone());
                }
            }
        }
        self.sorted = sorted.into_iter().collect();
        self.index = self.sorted.index();
    }

    /// One pod's reading went from `old` to `new`.
    fn replace(&mut self, k: &(String, String), old: Option<PodReading>, new: Option<PodReading>) {
        if old.as_ref() == new.as_ref() {
            return;
        }
        self.problems.remove(k);
        if let Some(Err(e)) = &new {
            self.problems.insert(k.clone(), e.clone());
        }
        let gone = match old {
            Some(Ok(v)) => v,
            _ => Vec::new(),
        };
        let came = match new {
            Some(Ok(v)) => v,
            _ => Vec::new(),
        };
        if gone.is_empty() && came.is_empty() {
            return;
        }
        // The addresses touched, each to the last pod in order that has it after.
        let touched: Vec<IpAddr> = gone.iter().chain(&came).map(|e| e.0).collect();
        // Each copies the one shard it touches if a published table still shares it.
        for e in &gone {
            self.sorted.remove(e);
        }
        for e in came {
            self.sorted.insert(e);
        }
        for ip in touched {
            match self.sorted.last_at(&ip) {
                Some(p) => self.index.insert(ip, p.clone()),
                None => self.index.remove(&ip),
            };
        }
    }
}

/// The policy inputs from NetworkPolicies, Namespaces and the Pod store (see [`inputs`]).
pub fn inputs_from_store<'a>(
    policies: impl IntoIterator<Item = &'a NetworkPolicy>,
    namespaces: impl IntoIterator<Item = &'a Namespace>,
    pods: &PodStore,
) -> PolicyInputs {
    let mut o = Objects::default();
    let mut problems: Vec<String> = pods.problems.values().cloned().collect();
    for np in policies {
        if let Err(e) = o.add_policy(np) {
            problems.push(e);
        }
    }
    for ns in namespaces {
        if let Err(e) = o.add_namespace(ns) {
            problems.push(e);
        }
    }
    // The stores' order is a hash map's: one order, so that equal readings compare equal.
    problems.sort_unstable();
    PolicyInputs::from_sorted(
        o.policies,
        o.namespaces,
        pods.sorted.clone(),
        Arc::new(pods.index.clone()),
        problems,
    )
}

/// Counts for the log: policies, namespaces, pod addresses.
pub fn summary(i: &PolicyInputs, namespaces: usize) -> String {
    format!(
        "{} NetworkPolicies, {namespaces} namespaces, {} pod addresses",
        i.set.len(),
        i.pods.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, ip: &str, app: &str) -> PolicyPod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns", "labels": {"app": app}},
            "status": {"phase": "Running", "podIP": ip}
        }))
        .unwrap()
    }

    /// What a store holding `live` would have built whole.
    fn whole(store: &PodStore) -> (PodList, PodIndex) {
        let mut fresh = PodStore {
            live: store.live.clone(),
            ..PodStore::default()
        };
        fresh.rebuild();
        (fresh.sorted, fresh.index)
    }

    #[test]
    fn the_pod_store_keeps_its_list_and_index_pod_by_pod() {
        use kube::runtime::watcher::Event;
        let mut s = PodStore::default();
        s.apply(&Event::Init);
        for (n, ip) in [("a", "10.0.0.3"), ("b", "10.0.0.1"), ("c", "10.0.0.2")] {
            s.apply(&Event::InitApply(pod(n, ip, "web")));
        }
        s.apply(&Event::InitDone);
        let ips = |s: &PodStore| -> Vec<String> {
            let mut v: Vec<String> = s
                .sorted
                .iter()
                .map(|(ip, m)| format!("{ip} {}", m.name))
                .collect();
            v.sort();
            v
        };
        assert_eq!(ips(&s), ["10.0.0.1 b", "10.0.0.2 c", "10.0.0.3 a"]);
        let steps = [
            Event::Apply(pod("a", "10.0.0.9", "web")),   // moves
            Event::Apply(pod("d", "10.0.0.2", "db")),    // shares c's address
            Event::Apply(pod("b", "10.0.0.1", "other")), // relabelled
            Event::Delete(pod("c", "10.0.0.2", "web")),
            Event::Apply(pod("e", "not-an-ip", "web")), // left out, with why
            Event::Delete(pod("d", "10.0.0.2", "db")),
        ];
        for ev in &steps {
            s.apply(ev);
            let (sorted, index) = whole(&s);
            assert_eq!(s.sorted, sorted, "after {ev:?}");
            assert_eq!(s.index, index, "after {ev:?}");
        }
        assert_eq!(ips(&s), ["10.0.0.1 b", "10.0.0.9 a"]);
        assert_eq!(s.problems.len(), 1);
        let inputs = inputs_from_store([], [], &s);
        assert_eq!(inputs.pods.len(), 2);
        assert_eq!(inputs.problems.len(), 1);
    }

    #[test]
    fn a_stored_pod_is_small() {
        // A k8s-openapi Pod is 2,440 bytes before its strings; 100,000 of them would be 244 MB.
        let size = std::mem::size_of::<PolicyPod>();
        assert!(size <= 512, "PolicyPod is {size} bytes");
    }

    #[test]
    fn a_pod_from_the_api_keeps_only_what_policy_reads() {
        let mut p: PolicyPod = serde_json::from_value(json!({
            "kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "u1",
                         "resourceVersion": "7", "labels": {"app": "web"},
                         "annotations": {"big": "x"}, "generateName": "web-",
                         "managedFields": [{"manager": "kubelet"}]},
            "spec": {"nodeName": "node-a", "containers": [
                {"name": "c", "image": "nginx", "ports": [
                    {"name": "http", "containerPort": 80, "hostPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": "10.244.0.7",
                       "podIPs": [{"ip": "10.244.0.7"}],
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .expect("a Pod as the API sends it");
        strip_pod(&mut p);
        assert_eq!(p.metadata.annotations, None);
        assert_eq!(p.metadata.generate_name, None);
        assert_eq!(p.metadata.managed_fields, None);
        assert_eq!(p.metadata.resource_version.as_deref(), Some("7"));
        let i = inputs([], [], [&p]);
        assert!(i.problems.is_empty(), "{:?}", i.problems);
        assert_eq!(i.pods.len(), 1);
        let (ip, meta) = i.pods.iter().next().expect("one pod");
        assert_eq!(ip.to_string(), "10.244.0.7");
        assert_eq!((&*meta.namespace, &*meta.name), ("shop", "web-1"));
        assert_eq!(meta.labels.get("app"), Some("web"));
        assert_eq!(meta.ports[0].port, 80);

        let mut host: PolicyPod = serde_json::from_value(json!({
            "metadata": {"name": "proxy", "namespace": "kube-system", "labels": {"k": "v"}},
            "spec": {"hostNetwork": true, "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIP": "172.18.0.2"}
        }))
        .expect("pod");
        strip_pod(&mut host);
        assert_eq!(host.metadata.labels, None);
        assert!(host.status.as_ref().unwrap().pod_ip.is_none());
        assert!(inputs([], [], [&host]).pods.is_empty());
    }
}
