//! The kinds the stand-in serves and the discovery documents that describe them.
//!
//! One static table drives routing, discovery and the `kind`/`apiVersion` of every answer, so
//! a kind is added in one place. Only the kinds vswitchd reads (and kubectl applies for it) are
//! here; anything else is a 404 as on a server without that API.

use serde_json::{json, Value};

/// One API resource (a plural name in a group/version).
#[derive(Debug, PartialEq, Eq)]
pub struct Resource {
    /// `""` for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    /// Field selectors the real API server accepts beyond metadata.name/namespace.
    pub fields: &'static [&'static str],
}

impl Resource {
    /// `v1` or `group/v1`, as in an object's `apiVersion`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// The name used in Status details and messages (`services`, `endpointslices.discovery.k8s.io`).
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

pub static RESOURCES: &[Resource] = &[
    Resource {
        group: "",
        version: "v1",
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        short_names: &["ns"],
        fields: &["status.phase"],
    },
    Resource {
        group: "",
        version: "v1",
        plural: "nodes",
        singular: "node",
        kind: "Node",
        namespaced: false,
        short_names: &["no"],
        fields: &["spec.unschedulable"],
    },
    Resource {
        group: "",
        version: "v1",
        plural: "pods",
        singular: "pod",
        kind: "Pod",
        namespaced: true,
        short_names: &["po"],
        fields: &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
    },
    Resource {
        group: "",
        version: "v1",
        plural: "services",
        singular: "service",
        kind: "Service",
        namespaced: true,
        short_names: &["svc"],
        fields: &[],
    },
    Resource {
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        singular: "endpointslice",
        kind: "EndpointSlice",
        namespaced: true,
        short_names: &[],
        fields: &["addressType"],
    },
    Resource {
        group: "networking.k8s.io",
        version: "v1",
        plural: "networkpolicies",
        singular: "networkpolicy",
        kind: "NetworkPolicy",
        namespaced: true,
        short_names: &["netpol"],
        fields: &[],
    },
];

/// The index in [`RESOURCES`] of `plural` in `group`/`version`.
pub fn find(group: &str, version: &str, plural: &str) -> Option<usize> {
    RESOURCES
        .iter()
        .position(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The index in [`RESOURCES`] of the kind an `apiVersion` + `kind` name.
pub fn by_kind(api_version: &str, kind: &str) -> Option<usize> {
    RESOURCES
        .iter()
        .position(|r| r.api_version() == api_version && r.kind == kind)
}

/// The groups other than core, in the order served.
fn groups() -> Vec<&'static str> {
    let mut g: Vec<&str> = RESOURCES
        .iter()
        .map(|r| r.group)
        .filter(|g| !g.is_empty())
        .collect();
    g.dedup();
    g
}

const VERBS: [&str; 8] = [
    "create",
    "delete",
    "get",
    "list",
    "patch",
    "update",
    "watch",
    "deletecollection",
];

/// `/api`.
pub fn api_versions(server: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server}]
    })
}

/// `/apis`.
pub fn api_group_list() -> Value {
    let groups: Vec<Value> = groups()
        .into_iter()
        .map(|g| {
            let gv = json!({"groupVersion": format!("{g}/v1"), "version": "v1"});
            json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/{group}`, or None for a group not served.
pub fn api_group(group: &str) -> Option<Value> {
    if !groups().contains(&group) {
        return None;
    }
    let gv = json!({"groupVersion": format!("{group}/v1"), "version": "v1"});
    Some(
        json!({"kind": "APIGroup", "apiVersion": "v1", "name": group,
        "versions": [gv.clone()], "preferredVersion": gv}),
    )
}

/// `/api/v1` or `/apis/{group}/{version}`, or None for a group/version not served.
pub fn api_resource_list(group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        resources.push(json!({
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": VERBS,
            "shortNames": r.short_names,
        }));
        resources.push(json!({
            "name": format!("{}/status", r.plural),
            "singularName": "",
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": ["get", "patch", "update"],
        }));
    }
    if resources.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
        "resources": resources}),
    )
}

/// The group/version paths of `/openapi/v3` (`api/v1`, `apis/{group}/v1`).
fn openapi_paths() -> Vec<(String, &'static str, &'static str)> {
    let mut out = vec![("api/v1".to_string(), "", "v1")];
    for g in groups() {
        out.push((format!("apis/{g}/v1"), g, "v1"));
    }
    out
}

/// `/openapi/v3`: the index kubectl reads before `apply`.
pub fn openapi_v3_index() -> Value {
    let paths: serde_json::Map<String, Value> = openapi_paths()
        .into_iter()
        .map(|(p, _, _)| {
            let url = format!("/openapi/v3/{p}?hash=vswitch-apiserver");
            (p, json!({"serverRelativeURL": url}))
        })
        .collect();
    json!({"paths": paths})
}

/// `/openapi/v3/{api/v1 | apis/group/v1}`: one operation per kind and verb kubectl looks at,
/// each saying it takes the `fieldValidation` parameter (so kubectl leaves validation to the
/// server instead of needing every schema; the stand-in validates little, see the README). No
/// schemas: kubectl then takes merge keys from its own compiled-in types.
pub fn openapi_v3_group(path: &str) -> Option<Value> {
    let (_, group, version) = openapi_paths().into_iter().find(|(p, _, _)| p == path)?;
    let mut paths = serde_json::Map::new();
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
        let param =
            json!([{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}]);
        let op = |id: &str| {
            json!({"operationId": format!("{id}{}", r.kind), "parameters": param,
                "x-kubernetes-group-version-kind": gvk, "responses": {"200": {"description": "OK"}}})
        };
        let base = if r.namespaced {
            format!("/{path}/namespaces/{{namespace}}/{}", r.plural)
        } else {
            format!("/{path}/{}", r.plural)
        };
        paths.insert(base.clone(), json!({"post": op("create")}));
        paths.insert(
            format!("{base}/{{name}}"),
            json!({"put": op("replace"), "patch": op("patch")}),
        );
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (vswitch-apiserver stand-in)", "version": "v1.35.0"},
        "paths": paths,
        "components": {"schemas": {}}
    }))
}

/// `/openapi/v2` as the protobuf kubectl before 1.27 (Debian's 1.20) asks for and decodes
/// before `apply`: a gnostic `openapi_v2.Document` with `swagger` (field 1), `info` (2: title,
/// version) and an empty `paths` (8), hand-encoded. It holds no schemas: kubectl then finds no
/// schema for a kind and leaves it unvalidated (see the README's limits).
pub fn openapi_v2_protobuf() -> Vec<u8> {
    fn field(out: &mut Vec<u8>, number: u8, bytes: &[u8]) {
        out.push(number << 3 | 2);
        // Every length here is below 128: one varint byte.
        out.push(bytes.len() as u8);
        out.extend_from_slice(bytes);
    }
    let mut info = Vec::new();
    field(&mut info, 1, b"Kubernetes (vswitch-apiserver stand-in)");
    field(&mut info, 2, b"v1.35.0");
    let mut doc = Vec::new();
    field(&mut doc, 1, b"2.0");
    field(&mut doc, 2, &info);
    field(&mut doc, 8, &[]);
    doc
}

/// `/version`.
pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "35",
        "gitVersion": "v1.35.0-vswitch-apiserver",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-12-07T00:00:00Z",
        "goVersion": "n/a (Rust)",
        "compiler": "rustc",
        "platform": "linux/amd64"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_found_by_path_and_by_kind() {
        for (i, r) in RESOURCES.iter().enumerate() {
            assert_eq!(find(r.group, r.version, r.plural), Some(i));
            assert_eq!(by_kind(&r.api_version(), r.kind), Some(i));
        }
        assert_eq!(find("", "v1", "secrets"), None);
        assert_eq!(
            api_group_list()["groups"][0]["name"],
            json!("discovery.k8s.io")
        );
        assert!(api_resource_list("apps", "v1").is_none());
    }
}
