//! What `vswitch-lab status` shows: the saved lab plus live daemon state.
//!
//! The JSON form is a stable document for scripts and tests (field names are part of the
//! interface); the human form is two aligned tables.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabStatus {
    pub name: String,
    pub nodes: Vec<NodeStatus>,
    pub pods: Vec<PodStatus>,
    /// The manifest directory every node reads NetworkPolicies, Namespaces and Pods from
    /// (`vswitch-lab apply -f`).
    #[serde(default)]
    pub policy_dir: PathBuf,
    /// The host outside the cluster (`exec out -- ...`), where the lab has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outside: Option<OutsideStatus>,
    /// Kubernetes mode only: the API server stand-in's address (on the fabric, reachable
    /// from every node namespace and the fabric's) and a kubeconfig for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apiserver: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
}

/// The lab's host outside the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutsideStatus {
    /// `out`, as `exec` takes it.
    pub name: String,
    pub netns: String,
    /// Its address on the nodes' LAN; it has no route to any pod CIDR.
    pub ip: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub netns: String,
    pub underlay_ip: Ipv4Addr,
    pub pod_cidr: Ipv4Net,
    pub admin_socket: PathBuf,
    pub cni_netconf: PathBuf,
    /// The daemon's pid as recorded at `up`.
    pub pid: Option<u32>,
    /// Whether that pid is still this node's vswitchd (not in the JSON document).
    #[serde(skip)]
    pub alive: bool,
    /// The daemon is alive and /v1/status says ready.
    pub ready: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PodStatus {
    pub name: String,
    pub node: String,
    pub netns: String,
    pub ip: IpAddr,
    pub mac: String,
    /// The pod's Kubernetes namespace and labels.
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// The pod's hostPorts, `[HOST_IP:]HOST_PORT->CONTAINER_PORT/PROTO`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_ports: Vec<String>,
}

impl NodeStatus {
    /// The daemon column: `1234 ready`, `1234 not ready`, `1234 dead`, `-`.
    pub fn daemon(&self) -> String {
        match (self.pid, self.alive, self.ready) {
            (None, _, _) => "-".into(),
            (Some(p), _, true) => format!("{p} ready"),
            (Some(p), true, false) => format!("{p} not ready"),
            (Some(p), false, false) => format!("{p} dead"),
        }
    }
}

impl LabStatus {
    pub fn to_json(&self) -> String {
        // Plain data with string keys: serialising cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The human form.
    pub fn to_table(&self) -> String {
        let mut out = format!("lab {}\n\n", self.name);
        if let (Some(a), Some(k)) = (&self.apiserver, &self.kubeconfig) {
            out += &format!(
                "Kubernetes mode: API server stand-in http://{a} (kubeconfig {}; \
                 `vswitch-lab kubectl -- get nodes`)\n\n",
                k.display()
            );
        }
        let nodes: Vec<Vec<String>> = self
            .nodes
            .iter()
            .map(|n| {
                vec![
                    n.name.clone(),
                    n.netns.clone(),
                    n.underlay_ip.to_string(),
                    n.pod_cidr.to_string(),
                    n.daemon(),
                    n.admin_socket.display().to_string(),
                    n.cni_netconf.display().to_string(),
                ]
            })
            .collect();
        out += &table(
            &[
                "NODE",
                "NETNS",
                "UNDERLAY",
                "POD CIDR",
                "VSWITCHD",
                "ADMIN SOCKET",
                "CNI NETCONF",
            ],
            &nodes,
        );
        out.push('\n');
        if self.pods.is_empty() {
            out += "no pods\n";
        } else {
            let pods: Vec<Vec<String>> = self
                .pods
                .iter()
                .map(|p| {
                    vec![
                        p.name.clone(),
                        p.node.clone(),
                        p.netns.clone(),
                        p.ip.to_string(),
                        p.mac.clone(),
                    ]
                })
                .collect();
            out += &table(&["POD", "NODE", "NETNS", "IP", "MAC"], &pods);
        }
        if let Some(o) = &self.outside {
            out += &format!(
                "\noutside host {} ({}) at {}: no route to the pods; they reach it by egress \
                 translation\n",
                o.name, o.netns, o.ip
            );
        }
        out
    }
}

fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (c, w) in cells.zip(&width) {
            let _ = write!(l, "{c:<w$}  ");
        }
        out += l.trim_end();
        out.push('\n');
    };
    line(&mut head.iter().copied());
    for r in rows {
        line(&mut r.iter().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_aligned() {
        let st = LabStatus {
            name: "vsl".into(),
            nodes: vec![NodeStatus {
                name: "vsl-n1".into(),
                netns: "vsl-n1".into(),
                underlay_ip: "192.168.100.1".parse().unwrap(),
                pod_cidr: "10.244.1.0/24".parse().unwrap(),
                admin_socket: "/run/vswitch-lab/vsl/n1/vswitchd.sock".into(),
                cni_netconf: "/run/vswitch-lab/vsl/n1/cni.conf".into(),
                pid: Some(7),
                alive: true,
                ready: false,
            }],
            pods: vec![PodStatus {
                name: "n1-p1".into(),
                node: "vsl-n1".into(),
                netns: "vsl-n1-p1".into(),
                ip: "10.244.1.2".parse().unwrap(),
                mac: "02:00:00:00:00:01".into(),
                namespace: "default".into(),
                labels: Default::default(),
                host_ports: Vec::new(),
            }],
            policy_dir: "/run/vswitch-lab/vsl/policies".into(),
            outside: None,
            apiserver: None,
            kubeconfig: None,
        };
        let t = st.to_table();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "lab vsl");
        assert!(
            lines[2].starts_with("NODE    NETNS   UNDERLAY       POD CIDR"),
            "{t}"
        );
        assert!(lines[3].contains("7 not ready"), "{t}");
        assert_eq!(lines[3].find("192.168"), lines[2].find("UNDERLAY"));
        assert!(lines[5].starts_with("POD    NODE    NETNS      IP"), "{t}");
        assert!(lines[6].contains("10.244.1.2  02:00:00:00:00:01"), "{t}");
        let back: LabStatus = serde_json::from_str(&st.to_json()).unwrap();
        assert_eq!(back.pods, st.pods);
    }
}
