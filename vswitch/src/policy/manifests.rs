//! Kubernetes objects to what policy needs of them, from the API (Kubernetes mode) or from
//! manifest files (static mode): users write exactly what they would `kubectl apply`.
//!
//! A directory holds `.yaml`, `.yml` and `.json` files, each with any number of objects (YAML
//! documents separated by `---`, or a `List` with `items`). The kinds read are NetworkPolicy,
//! Namespace and Pod; an object that cannot be used is left out and a sentence naming its file,
//! kind, name and field goes into `problems`, while every other object stays in force.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ContainerPort, Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::engine::{NamedPort, PodMeta};
use super::model::{check_port_name, Policy, Proto};
use super::selector::{Interner, Labels};

/// The objects a source holds, converted, and what it could not use.
#[derive(Debug, Default)]
pub struct Objects {
    pub policies: Vec<Policy>,
    pub namespaces: Vec<(Arc<str>, Labels)>,
    /// Pods with their addresses (a pod without an address yet is left out: there is nothing
    /// to judge by).
    pub pods: Vec<(Vec<IpAddr>, PodMeta)>,
    pub problems: Vec<String>,
    labels: Interner,
}

impl Objects {
    /// Reads every manifest file of `dir` (not recursively), in name order.
    pub fn load_dir(dir: &Path) -> Result<Objects, String> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension().and_then(|x| x.to_str()),
                    Some("yaml" | "yml" | "json")
                ) && p.is_file()
            })
            .collect();
        names.sort();
        let mut out = Objects::default();
        for path in names {
            match std::fs::read_to_string(&path) {
                Ok(text) => out.add_text(&text, &path.display().to_string()),
                Err(e) => out.problems.push(format!("{}: {e}", path.display())),
            }
        }
        Ok(out)
    }

    /// Adds the objects of one file's text (YAML, of which JSON is a part).
    pub fn add_text(&mut self, text: &str, source: &str) {
        let docs: Vec<serde_json::Value> = match serde_saphyr::from_multiple(text) {
            Ok(d) => d,
            Err(e) => {
                let e = e.to_string();
                let first = e.lines().next().unwrap_or_default();
                self.problems
                    .push(format!("{source}: not a YAML or JSON manifest: {first}"));
                return;
            }
        };
        for (i, doc) in docs.into_iter().enumerate() {
            if doc.is_null() {
                continue;
            }
            self.add_value(doc, &format!("{source}: document {}", i + 1));
        }
    }

    fn add_value(&mut self, doc: serde_json::Value, at: &str) {
        let kind = doc.get("kind").and_then(|k| k.as_str()).unwrap_or_default();
        let api = doc
            .get("apiVersion")
            .and_then(|k| k.as_str())
            .unwrap_or_default();
        let result = match (kind, api) {
            ("List", "v1") | ("NetworkPolicyList", _) | ("NamespaceList", _) | ("PodList", _) => {
                let items = match doc.get("items") {
                    Some(serde_json::Value::Array(items)) => items.clone(),
                    _ => Vec::new(),
                };
                for (j, item) in items.into_iter().enumerate() {
                    self.add_value(item, &format!("{at}: items[{j}]"));
                }
                Ok(())
            }
            ("NetworkPolicy", "networking.k8s.io/v1") => serde_json::from_value(doc)
                .map_err(|e| format!("NetworkPolicy: {e}"))
                .and_then(|np: NetworkPolicy| self.add_policy(&np)),
            ("Namespace", "v1") => serde_json::from_value(doc)
                .map_err(|e| format!("Namespace: {e}"))
                .and_then(|ns: Namespace| self.add_namespace(&ns)),
            ("Pod", "v1") => serde_json::from_value(doc)
                .map_err(|e| format!("Pod: {e}"))
                .and_then(|pod: Pod| self.add_pod(&pod)),
            ("", _) => Err("no `kind`".to_string()),
            (k, a) => Err(format!(
                "{k} ({a}) is not read here (NetworkPolicy networking.k8s.io/v1, Namespace v1, Pod v1)"
            )),
        };
        if let Err(e) = result {
            self.problems.push(format!("{at}: {e}"));
        }
    }

    /// Adds a NetworkPolicy (without a namespace: `default`); the error names its field.
    pub fn add_policy(&mut self, np: &NetworkPolicy) -> Result<(), String> {
        self.policies.push(Policy::from_k8s(np, "default")?);
        Ok(())
    }

    /// Adds a Namespace's labels.
    pub fn add_namespace(&mut self, ns: &Namespace) -> Result<(), String> {
        self.namespaces.push(namespace(ns)?);
        Ok(())
    }

    /// Adds a pod that has an address of its own (see [`owns_address`]); the error names its
    /// field. Pods share label sets.
    pub fn add_pod(&mut self, pod: &impl PodFields) -> Result<(), String> {
        if owns_address(pod) {
            let p = pod_meta(pod, "default", &mut self.labels)?;
            if !p.0.is_empty() {
                self.pods.push(p);
            }
        }
        Ok(())
    }
}

/// What policy reads of a Pod, from whichever shape holds it: the full `Pod` of a manifest, or
/// a trimmed copy that keeps only these fields (the Kubernetes watch's, for memory).
pub trait PodFields {
    fn metadata(&self) -> &ObjectMeta;
    /// `spec.hostNetwork`.
    fn host_network(&self) -> bool;
    /// `status.phase`.
    fn phase(&self) -> Option<&str>;
    /// `status.podIPs`, then `status.podIP`.
    fn ips(&self) -> impl Iterator<Item = &str>;
    /// Each container's `ports`, in order.
    fn container_ports(&self) -> impl Iterator<Item = &[ContainerPort]>;
}

impl PodFields for Pod {
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

/// Whether a pod's address is its own: a pod on the node's network (`spec.hostNetwork`) has
/// the node's, and a finished one (phase Succeeded or Failed) has given its address back, maybe
/// to a new pod. Both are left out.
pub fn owns_address(pod: &impl PodFields) -> bool {
    !pod.host_network() && !matches!(pod.phase(), Some("Succeeded" | "Failed"))
}

/// A Namespace's name and labels.
pub fn namespace(ns: &Namespace) -> Result<(Arc<str>, Labels), String> {
    let name = ns
        .metadata
        .name
        .as_deref()
        .filter(|n| !n.is_empty())
        .ok_or("Namespace: metadata.name: required")?;
    let labels = ns.metadata.labels.as_ref().map(labels).unwrap_or_default();
    Ok((name.into(), labels))
}

fn labels(m: &BTreeMap<String, String>) -> Labels {
    Labels::new(m.iter())
}

/// What policy needs of a Pod: its addresses (`status.podIPs`, or `status.podIP`), namespace,
/// name, labels and named container ports. `labels` shares label sets between pods.
pub fn pod_meta(
    pod: &impl PodFields,
    default_namespace: &str,
    interner: &mut Interner,
) -> Result<(Vec<IpAddr>, PodMeta), String> {
    let metadata = pod.metadata();
    let name = metadata
        .name
        .as_deref()
        .filter(|n| !n.is_empty())
        .ok_or("Pod: metadata.name: required")?;
    let namespace = metadata.namespace.as_deref().unwrap_or(default_namespace);
    let what = format!("Pod {namespace}/{name}");
    let mut ips = Vec::new();
    for (i, ip) in pod.ips().enumerate() {
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("{what}: status.podIPs[{i}]: {ip:?} is not an address"))?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    let mut ports = Vec::new();
    for (c, container) in pod.container_ports().enumerate() {
        for (j, p) in container.iter().enumerate() {
            let Some(n) = &p.name else { continue };
            let at = format!("{what}: spec.containers[{c}].ports[{j}]");
            check_port_name(n).map_err(|e| format!("{at}.name: {e}"))?;
            let proto = match p.protocol.as_deref() {
                None | Some("TCP") => Proto::Tcp,
                Some("UDP") => Proto::Udp,
                Some("SCTP") => Proto::Sctp,
                Some(o) => return Err(format!("{at}.protocol: {o:?} is not TCP, UDP or SCTP")),
            };
            let port = u16::try_from(p.container_port)
                .ok()
                .filter(|&n| n != 0)
                .ok_or(format!(
                    "{at}.containerPort: {} must be between 1 and 65535",
                    p.container_port
                ))?;
            ports.push(NamedPort {
                name: n.as_str().into(),
                proto,
                port,
            });
        }
    }
    let labels = interner.intern(metadata.labels.as_ref().map(labels).unwrap_or_default());
    Ok((
        ips,
        PodMeta {
            namespace: namespace.into(),
            name: name.into(),
            labels,
            ports: ports.into(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: x
  labels: {team: blue}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: x}
spec:
  podSelector: {}
---
# a comment, then an empty document
---
apiVersion: v1
kind: Pod
metadata:
  name: a
  namespace: x
  labels: {pod: a}
spec:
  containers:
  - name: c
    ports:
    - {name: serve-80-tcp, containerPort: 80}
    - {name: serve-81-udp, containerPort: 81, protocol: UDP}
    - {containerPort: 90}
status:
  podIP: 10.244.0.10
  podIPs: [{ip: 10.244.0.10}, {ip: "fd00::a"}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: broken, namespace: x}
spec:
  podSelector: {}
  ingress:
  - from: [{ipBlock: {cidr: 10.0.0.0/40}}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
"#;

    #[test]
    fn a_file_of_several_kinds() {
        let mut o = Objects::default();
        o.add_text(MANIFESTS, "m.yaml");
        assert_eq!(o.policies.len(), 1);
        assert_eq!(o.policies[0].id(), "x/deny");
        assert_eq!(
            o.namespaces,
            vec![(Arc::from("x"), Labels::new([("team", "blue")]))]
        );
        assert_eq!(o.pods.len(), 1);
        let (ips, pod) = &o.pods[0];
        assert_eq!(ips.len(), 2);
        assert_eq!(pod.labels.get("pod"), Some("a"));
        assert_eq!(pod.ports.len(), 2);
        assert_eq!(pod.ports[1].proto, Proto::Udp);
        assert_eq!(o.problems.len(), 2, "{:?}", o.problems);
        assert!(
            o.problems[0].starts_with("m.yaml: document ")
                && o.problems[0]
                    .contains(": NetworkPolicy x/broken: spec.ingress[0].from[0].ipBlock.cidr"),
            "{}",
            o.problems[0]
        );
        assert!(o.problems[1].contains("Deployment"), "{}", o.problems[1]);
    }

    #[test]
    fn json_lists_and_bad_text() {
        let mut o = Objects::default();
        o.add_text(
            r#"{"apiVersion":"v1","kind":"List","items":[
                {"apiVersion":"v1","kind":"Namespace","metadata":{"name":"y"}},
                {"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{"name":"p"},"spec":{"podSelector":{}}}]}"#,
            "l.json",
        );
        assert_eq!(o.namespaces.len(), 1);
        assert_eq!(o.policies[0].id(), "default/p");
        assert!(o.problems.is_empty(), "{:?}", o.problems);
        o.add_text("kind: [unclosed", "bad.yaml");
        assert_eq!(o.problems.len(), 1);
        assert!(o.problems[0].starts_with("bad.yaml: "), "{}", o.problems[0]);
    }

    #[test]
    fn host_network_and_finished_pods_are_left_out() {
        let mut o = Objects::default();
        for (n, extra) in [
            (
                "host",
                r#""spec":{"hostNetwork":true,"containers":[]},"status":{"podIP":"10.0.0.9"},"#,
            ),
            (
                "done",
                r#""status":{"phase":"Succeeded","podIP":"10.0.0.9"},"#,
            ),
            (
                "failed",
                r#""status":{"phase":"Failed","podIP":"10.0.0.9"},"#,
            ),
            ("up", r#""status":{"phase":"Running","podIP":"10.0.0.9"},"#),
        ] {
            o.add_text(
                &format!(
                    r#"{{"apiVersion":"v1","kind":"Pod",{extra}"metadata":{{"name":"{n}"}}}}"#
                ),
                "p.json",
            );
        }
        let names: Vec<&str> = o.pods.iter().map(|p| &*p.1.name).collect();
        assert_eq!(names, ["up"], "{:?}", o.problems);
    }

    #[test]
    fn pods_with_the_same_labels_share_them() {
        let mut o = Objects::default();
        for (n, ip) in [("a", "10.0.0.1"), ("b", "10.0.0.2")] {
            o.add_text(
                &format!(
                    r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"{n}","labels":{{"app":"web"}}}},"status":{{"podIP":"{ip}"}}}}"#
                ),
                "p.json",
            );
        }
        assert!(Arc::ptr_eq(&o.pods[0].1.labels, &o.pods[1].1.labels));
    }
}
