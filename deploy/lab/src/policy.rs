//! NetworkPolicy in the lab: one directory of manifests that every node's vswitchd reads
//! (`[policy] dir`), filled as `kubectl` would fill an API server.
//!
//! - `apply -f FILE` writes each object of FILE (NetworkPolicy, Namespace, Pod; YAML or JSON,
//!   several per file) to its own file named by kind, namespace and name, so applying an object
//!   again replaces it wherever it was first applied from; `delete -f FILE` removes the objects
//!   FILE names.
//! - Each pod of the lab has a Pod manifest there (its namespace, labels and address), so every
//!   node knows the pods of the others; `label` rewrites it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::error::LabError;
use crate::files::POLICY_DIR;
use crate::fsutil::write_atomic;
use crate::lab::{Lab, Pod};

/// The kinds `apply` takes (what vswitchd reads).
const KINDS: [(&str, &str); 3] = [
    ("NetworkPolicy", "networking.k8s.io/v1"),
    ("Namespace", "v1"),
    ("Pod", "v1"),
];

/// The lab's manifest directory.
pub fn policy_dir(lab_dir: &Path) -> PathBuf {
    lab_dir.join(POLICY_DIR)
}

fn bad(file: &Path, reason: impl Into<String>) -> LabError {
    LabError::BadManifest {
        file: file.to_path_buf(),
        reason: reason.into(),
    }
}

/// The objects of a manifest file, each with the file name it takes in the lab's directory.
fn objects(file: &Path) -> Result<Vec<(String, Value)>, LabError> {
    let text = fs::read_to_string(file).map_err(|e| LabError::io(file, e))?;
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
        .map_err(|e| bad(file, e.to_string().lines().next().unwrap_or_default()))?;
    let mut out = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        let items = match doc.get("kind").and_then(Value::as_str) {
            Some(k) if k == "List" || k.ends_with("List") => match doc.get("items") {
                Some(Value::Array(items)) => items.clone(),
                _ => Vec::new(),
            },
            _ => vec![doc],
        };
        for obj in items {
            let kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default();
            let api = obj
                .get("apiVersion")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if !KINDS.contains(&(kind, api)) {
                return Err(bad(
                    file,
                    format!(
                        "document {}: {kind:?} ({api}) is not one the lab applies (NetworkPolicy networking.k8s.io/v1, Namespace v1, Pod v1)",
                        i + 1
                    ),
                ));
            }
            let meta = obj.get("metadata");
            let name = meta
                .and_then(|m| m.get("name"))
                .and_then(Value::as_str)
                .filter(|n| {
                    !n.is_empty()
                        && n.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b))
                })
                .ok_or_else(|| {
                    bad(
                        file,
                        format!("document {}: {kind} has no valid metadata.name", i + 1),
                    )
                })?;
            let ns = meta
                .and_then(|m| m.get("namespace"))
                .and_then(Value::as_str)
                .unwrap_or(if kind == "Namespace" { "" } else { "default" });
            if !ns.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err(bad(
                    file,
                    format!("document {}: bad metadata.namespace {ns:?}", i + 1),
                ));
            }
            let file_name = match ns {
                "" => format!("{}-{name}.json", kind.to_ascii_lowercase()),
                ns => format!("{}-{ns}-{name}.json", kind.to_ascii_lowercase()),
            };
            out.push((file_name, obj));
        }
    }
    Ok(out)
}

impl Lab {
    /// The manifest directory all nodes read.
    pub fn policy_dir(&self) -> PathBuf {
        policy_dir(&self.dir)
    }

    /// `kubectl apply -f FILE` into the lab; returns what was written (`kind/namespace/name`).
    /// In Kubernetes mode it is `kubectl apply -f FILE` against the lab's API server.
    pub fn apply(&self, file: &Path) -> Result<Vec<String>, LabError> {
        if self.apiserver.is_some() {
            let f = file.to_string_lossy();
            let out = self.kubectl(&["apply", "-f", &f], None)?;
            return Ok(out.lines().map(str::to_string).collect());
        }
        let dir = self.policy_dir();
        fs::create_dir_all(&dir).map_err(|e| LabError::io(&dir, e))?;
        let objs = objects(file)?;
        let mut done = Vec::new();
        for (name, obj) in objs {
            let text = serde_json::to_string_pretty(&obj).unwrap_or_default();
            write_atomic(&dir.join(&name), text.as_bytes(), 0o644)
                .map_err(|e| LabError::io(&dir, e))?;
            done.push(name.trim_end_matches(".json").to_string());
        }
        Ok(done)
    }

    /// `kubectl delete -f FILE`: removes the objects FILE names; returns those that were there.
    pub fn delete(&self, file: &Path) -> Result<Vec<String>, LabError> {
        if self.apiserver.is_some() {
            let f = file.to_string_lossy();
            let out = self.kubectl(&["delete", "--ignore-not-found", "-f", &f], None)?;
            return Ok(out.lines().map(str::to_string).collect());
        }
        let dir = self.policy_dir();
        let mut done = Vec::new();
        for (name, _) in objects(file)? {
            if fs::remove_file(dir.join(&name)).is_ok() {
                done.push(name.trim_end_matches(".json").to_string());
            }
        }
        Ok(done)
    }

    /// Sets (`k=v`) or removes (`k-`) labels of a pod, live.
    pub fn label(&mut self, pod: &str, changes: &[String]) -> Result<&Pod, LabError> {
        let name = self.try_pod(pod)?.name.clone();
        let idx = self.pods.iter().position(|p| p.name == name).unwrap_or(0);
        let mut labels = self.pods[idx].labels.clone();
        for c in changes {
            if let Some(k) = c.strip_suffix('-').filter(|k| !k.contains('=')) {
                labels.remove(k);
            } else {
                let (k, v) = parse_label(c)?;
                labels.insert(k, v);
            }
        }
        self.pods[idx].labels = labels;
        self.save()?;
        self.publish_pod(&self.pods[idx])?;
        Ok(&self.pods[idx])
    }

    /// Makes a lab pod's Pod object known as a kubelet would: a manifest file every node
    /// reads, or in Kubernetes mode the object (and its Namespace) in the API, Running with
    /// its address.
    pub(crate) fn publish_pod(&self, pod: &Pod) -> Result<(), LabError> {
        if self.apiserver.is_none() {
            return write_pod_manifest(&self.dir, pod);
        }
        let ns = json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": pod.namespace}});
        let mut obj = pod_object(pod);
        // Every node's first pod is `p1` to the CNI plugin; in one API they need names of
        // their own: the lab's (`n1-p1`).
        obj["metadata"]["name"] = json!(pod.name);
        obj["status"]["phase"] = json!("Running");
        // A stream of JSON objects (see services.rs); the Namespace first.
        let text = format!("{ns}\n{obj}");
        self.kubectl(&["apply", "-f", "-"], Some(&text)).map(drop)
    }

    /// Removes what [`Lab::publish_pod`] made (best effort: the pod is gone either way).
    pub(crate) fn unpublish_pod(&self, pod: &Pod) {
        if self.apiserver.is_none() {
            return remove_pod_manifest(&self.dir, pod);
        }
        let _ = self.kubectl(
            &[
                "delete",
                "--ignore-not-found",
                "-n",
                &pod.namespace,
                &format!("pod/{}", pod.name),
            ],
            None,
        );
    }
}

/// `k=v`, with the key and value as Kubernetes allows them.
pub fn parse_label(s: &str) -> Result<(String, String), LabError> {
    let bad = || LabError::BadLabel(s.to_string());
    let (k, v) = s.split_once('=').ok_or_else(bad)?;
    let ok_part = |p: &str, max: usize| {
        p.len() <= max
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && p.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
            && p.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric())
    };
    let name = k.rsplit('/').next().unwrap_or_default();
    if name.is_empty() || !ok_part(name, 63) || !ok_part(v, 63) || k.len() > 317 {
        return Err(bad());
    }
    Ok((k.to_string(), v.to_string()))
}

/// `k=v,k2=v2` (empty: no labels).
pub fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, LabError> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(parse_label)
        .collect()
}

fn pod_manifest_path(lab_dir: &Path, pod: &Pod) -> PathBuf {
    policy_dir(lab_dir).join(format!("labpod-{}.json", pod.name))
}

/// The Pod object of a lab pod, as an API server would hold it.
pub(crate) fn write_pod_manifest(lab_dir: &Path, pod: &Pod) -> Result<(), LabError> {
    let dir = policy_dir(lab_dir);
    fs::create_dir_all(&dir).map_err(|e| LabError::io(&dir, e))?;
    let doc = pod_object(pod);
    let path = pod_manifest_path(lab_dir, pod);
    let text = serde_json::to_string_pretty(&doc).unwrap_or_default();
    write_atomic(&path, text.as_bytes(), 0o644).map_err(|e| LabError::io(&path, e))
}

/// The Pod object of a lab pod.
fn pod_object(pod: &Pod) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod.k8s_name, "namespace": pod.namespace, "labels": pod.labels},
        "spec": {"nodeName": pod.node, "containers": [{"name": "c", "ports": named_ports()}]},
        "status": {"podIP": pod.ip.to_string(), "podIPs": [{"ip": pod.ip.to_string()}]},
    })
}

pub(crate) fn remove_pod_manifest(lab_dir: &Path, pod: &Pod) {
    let _ = fs::remove_file(pod_manifest_path(lab_dir, pod));
}

/// The container ports every lab pod declares, named as the upstream NetworkPolicy e2e suite
/// names its servers' (`serve-80-tcp`, ...), so policies may use named ports.
fn named_ports() -> Value {
    let mut ports = Vec::new();
    for p in [80, 81] {
        for proto in ["TCP", "UDP"] {
            ports.push(json!({
                "name": format!("serve-{p}-{}", proto.to_ascii_lowercase()),
                "containerPort": p,
                "protocol": proto,
            }));
        }
    }
    Value::Array(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_as_kubernetes_allows() {
        let l = parse_labels("app=web,tier=,example.com/team=blue").unwrap();
        assert_eq!(l.len(), 3);
        assert_eq!(l["tier"], "");
        for bad in ["app", "=x", "a b=c", "app=-x", "k=v w"] {
            assert!(parse_label(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn objects_are_named_by_kind_namespace_and_name() {
        let dir = std::env::temp_dir().join(format!("vswitch-lab-policy-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("m.yaml");
        fs::write(
            &f,
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {ns: x}}\n",
        )
        .unwrap();
        let o = objects(&f).unwrap();
        let names: Vec<_> = o.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["networkpolicy-x-deny.json", "namespace-x.json"]);
        fs::write(
            &f,
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n",
        )
        .unwrap();
        assert!(objects(&f).unwrap_err().to_string().contains("Deployment"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
