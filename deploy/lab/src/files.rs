//! The files the lab writes for each node: vswitchd's TOML config and the CNI netconf.
//!
//! Both are built from the `conf` crate's own types, so they can never drift from what the
//! daemon and the plugin parse, and the config is parsed back and validated before it is written.

use std::path::Path;

use conf::config::{
    default_vtep_mac, AdminConfig, Config, DatapathConfig, DnsConfig, NodeConfig, OverlayConfig,
    PeerSpec, ServiceSpec,
};
use conf::netconf::NetConf;

use crate::spec::POD_MTU;
use crate::{LabError, Node};

/// vswitchd's configuration for a node: every other node of the lab is a peer (full mesh over
/// the fabric).
pub(crate) fn daemon_config(node: &Node, all: &[Node], services: &[ServiceSpec]) -> Config {
    let mac = |ip| {
        let m = default_vtep_mac(ip);
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    let peers = all
        .iter()
        .filter(|n| n.index != node.index)
        .map(|n| PeerSpec {
            name: n.name.clone(),
            underlay_ip: n.underlay_ip.into(),
            vtep_mac: mac(n.underlay_ip.into()),
            pod_cidrs: vec![n.pod_cidr],
            // Every lab node is a vswitch.
            remote_checksum: true,
        })
        .collect();
    Config {
        node: NodeConfig {
            name: node.name.clone(),
            zone: None,
            pod_cidr: node.pod_cidr,
            gateway: None,
            mtu: POD_MTU,
            state_dir: node.dir.join("state"),
        },
        admin: AdminConfig {
            socket: node.admin_socket.clone(),
            // Each node has its own namespace, so every node can use the same port.
            metrics_address: Some(([0, 0, 0, 0], 9109).into()),
        },
        datapath: {
            let d = DatapathConfig::default();
            DatapathConfig {
                workers: node.workers,
                cpus: node.cpus.clone(),
                busy_poll_us: node.busy_poll_us.unwrap_or(d.busy_poll_us),
                ..d
            }
        },
        // The cluster DNS address, as kube-dns's ClusterIP: answered by the switch itself.
        dns: DnsConfig {
            nameservers: vec![std::net::Ipv4Addr::new(10, 96, 0, 10).into()],
            ..DnsConfig::default()
        },
        overlay: OverlayConfig {
            underlay_ip: Some(node.underlay_ip.into()),
            underlay_mtu: crate::spec::UNDERLAY_MTU,
            ..OverlayConfig::default()
        },
        // Kubernetes mode: peers come from the Node objects (and the VTEPs each node
        // publishes on its own), Services from the API.
        peers: if node.kubeconfig.is_some() {
            Vec::new()
        } else {
            peers
        },
        nat: Default::default(),
        host: conf::config::HostConfig {
            routes: vec![
                "10.244.0.0/16".parse().expect("literal"),
                "10.96.0.0/12".parse().expect("literal"),
            ],
            ..Default::default()
        },
        services: services.to_vec(),
        kubernetes: match &node.kubeconfig {
            Some(k) => conf::config::KubernetesConfig {
                enabled: true,
                kubeconfig: Some(k.clone()),
                node_name: Some(node.name.clone()),
                ..Default::default()
            },
            None => Default::default(),
        },
        // One directory of manifests (NetworkPolicy, Namespace, Pod) that every node reads.
        policy: conf::config::PolicyConfig {
            dir: node.dir.parent().map(|lab| lab.join(POLICY_DIR)),
        },
        // Pods reach the lab's outside host (`out`) from the node's address (issue 27).
        egress: conf::config::EgressConfig {
            enabled: Some(true),
            ..Default::default()
        },
    }
}

/// The lab's manifest directory (`vswitch-lab apply -f`), below the lab's directory.
pub const POLICY_DIR: &str = "policies";

/// A vswitchd config's text with the `[nat]` keys of `set` given new values (keys the section
/// does not have are not added), everything else as it was: how the soak and the tests shorten
/// conntrack timeouts or bound its size without rewriting the lab's config.
pub fn with_nat_keys(text: &str, set: &[(&str, u64)]) -> String {
    let mut out = String::new();
    let mut in_nat = false;
    for line in text.lines() {
        if line.starts_with('[') {
            in_nat = line.trim() == "[nat]";
        }
        let key = line.split('=').next().map(str::trim).unwrap_or("");
        match set.iter().find(|(k, _)| in_nat && *k == key) {
            Some((k, v)) => out.push_str(&format!("{k} = {v}\n")),
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// The cluster-wide settings the project ships for a cluster (deploy/kubernetes/20-config.yaml,
/// ConfigMap `vswitch-config`), as the DaemonSet mounts them.
const SHIPPED_CONFIGMAP: &str = include_str!("../../kubernetes/20-config.yaml");

/// The shipped ConfigMap's `vswitchd.toml`.
pub fn shipped_cluster_config() -> Result<String, String> {
    let doc: serde_json::Value = serde_saphyr::from_str(SHIPPED_CONFIGMAP)
        .map_err(|e| format!("deploy/kubernetes/20-config.yaml: {e}"))?;
    doc.pointer("/data/vswitchd.toml")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .ok_or_else(|| "deploy/kubernetes/20-config.yaml has no data.vswitchd.toml".into())
}

/// Kubernetes mode: the node's config made as the DaemonSet makes it, from the shipped
/// ConfigMap and a `vswitch-nodes` table of the lab's nodes (what nodes-configmap.sh writes)
/// through vswitch-install's own render step, so a value the shipped ConfigMap lacks is missing
/// in the lab too. What the lab then changes is only what a cluster gives each node by other
/// means: its state directory and admin socket (each node here shares one filesystem), the
/// kubeconfig (in a cluster, the pod's service account) and the datapath options `up` was
/// given.
fn render_kubernetes_config(
    node: &Node,
    all: &[Node],
    kubeconfig: &Path,
) -> Result<String, String> {
    let cluster = shipped_cluster_config()?;
    let mut nodes = String::new();
    for n in all {
        nodes += &format!(
            "[[nodes]]\nname = {:?}\npod_cidr = \"{}\"\nunderlay_ip = \"{}\"\n\n",
            n.name, n.pod_cidr, n.underlay_ip
        );
    }
    let text = crate::render::render(
        (Path::new("deploy/kubernetes/20-config.yaml"), &cluster),
        (Path::new("vswitch-nodes/nodes.toml"), &nodes),
        &node.name,
        Some(node.underlay_ip.into()),
    )
    .map_err(|e| e.to_string())?;
    let mut t: toml::Table = toml::from_str(&text).map_err(|e| e.to_string())?;
    let mut set = |section: &str, key: &str, v: toml::Value| {
        let s = t
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let Some(s) = s.as_table_mut() {
            s.insert(key.to_string(), v);
        }
    };
    let path = |p: &Path| toml::Value::String(p.display().to_string());
    set("node", "state_dir", path(&node.dir.join("state")));
    set("admin", "socket", path(&node.admin_socket));
    set("kubernetes", "kubeconfig", path(kubeconfig));
    if node.workers != 1 {
        set("datapath", "workers", i64::from(node.workers).into());
    }
    if !node.cpus.is_empty() {
        let cpus = node.cpus.iter().map(|c| i64::from(*c).into()).collect();
        set("datapath", "cpus", toml::Value::Array(cpus));
    }
    if let Some(us) = node.busy_poll_us {
        set("datapath", "busy_poll_us", i64::from(us).into());
    }
    let body = toml::to_string(&t).map_err(|e| e.to_string())?;
    Ok(format!(
        "# vswitchd config for lab node {}, as the DaemonSet renders it: \
         deploy/kubernetes/20-config.yaml through vswitch-install's render step; then the \
         lab's state_dir, admin socket, kubeconfig and datapath options.\n\n{body}",
        node.name
    ))
}

/// The config as TOML, checked with the daemon's own parser.
pub(crate) fn render_config(
    node: &Node,
    all: &[Node],
    services: &[ServiceSpec],
) -> Result<String, LabError> {
    let bad = |reason: String| LabError::BadConfig {
        node: node.name.clone(),
        reason,
    };
    if let Some(kubeconfig) = &node.kubeconfig {
        let text = render_kubernetes_config(node, all, kubeconfig).map_err(bad)?;
        Config::parse(&text).map_err(|e| bad(e.to_string()))?;
        return Ok(text);
    }
    let config = daemon_config(node, all, services);
    let body = toml::to_string(&config).map_err(|e| bad(e.to_string()))?;
    let text = format!(
        "# vswitchd config for lab node {}, written by vswitch-lab.\n\n{body}",
        node.name
    );
    let parsed = Config::parse(&text).map_err(|e| bad(e.to_string()))?;
    if parsed != config {
        return Err(bad(format!("{text}\nreads back as {parsed:?}")));
    }
    Ok(text)
}

/// Writes a file by write-to-temp and rename ([`crate::fsutil::write_atomic`]), so vswitchd's
/// reload never reads half of it.
pub(crate) fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), LabError> {
    crate::fsutil::write_atomic(path, contents, 0o644).map_err(|e| LabError::io(path, e))
}

/// The CNI netconf the lab's "runtime" hands the plugin on every call.
pub(crate) fn netconf(lab: &str, socket: &Path) -> NetConf {
    NetConf::new(lab, Some(socket.to_owned()))
}

pub(crate) fn render_netconf(lab: &str, socket: &Path) -> Result<String, LabError> {
    let nc = netconf(lab, socket);
    nc.validate().map_err(|e| LabError::BadConfig {
        node: socket.display().to_string(),
        reason: e.to_string(),
    })?;
    serde_json::to_string_pretty(&nc)
        .map(|s| s + "\n")
        .map_err(|e| LabError::BadConfig {
            node: socket.display().to_string(),
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Names;
    use std::path::PathBuf;

    #[test]
    fn config_is_valid_for_the_daemon() {
        let all: Vec<Node> = (1..=3)
            .map(|i| Node::plan(Names("vsl"), i, &PathBuf::from("/run/vswitch-lab/vsl")))
            .collect();
        let node = all[2].clone();
        let text = render_config(&node, &all, &[]).unwrap();
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.node.name, "vsl-n3");
        assert_eq!(c.node.pod_cidr.to_string(), "10.244.3.0/24");
        assert_eq!(c.node.mtu, 1450);
        assert_eq!(c.peers.len(), 2, "full mesh: the other two nodes");
        assert_eq!(c.peers[0].pod_cidrs[0].to_string(), "10.244.1.0/24");
        assert_eq!(c.overlay.underlay_ip, Some(node.underlay_ip.into()));
        assert_eq!(c.gateway().to_string(), "10.244.3.1");
        assert_eq!(c.datapath.workers, 1);
        let two = Node {
            workers: 2,
            ..node.clone()
        };
        let c2 = Config::parse(&render_config(&two, &all, &[]).unwrap()).unwrap();
        assert_eq!(c2.datapath.workers, 2);
        assert!(c2.datapath.cpus.is_empty());
        let pinned = Node {
            cpus: vec![0],
            busy_poll_us: Some(1_000_000),
            ..node.clone()
        };
        let c3 = Config::parse(&render_config(&pinned, &all, &[]).unwrap()).unwrap();
        assert_eq!(c3.datapath.cpus, vec![0]);
        assert_eq!(c3.datapath.busy_poll_us, 1_000_000);
        let k8s = Node {
            kubeconfig: Some("/run/vswitch-lab/vsl/kubeconfig".into()),
            ..node.clone()
        };
        // Kubernetes mode: the shipped ConfigMap through the DaemonSet's render step.
        let c4 = Config::parse(&render_config(&k8s, &all, &[]).unwrap()).unwrap();
        assert!(c4.kubernetes.enabled && c4.peers.is_empty());
        assert_eq!(c4.node.name, "vsl-n3");
        assert_eq!(c4.node.pod_cidr.to_string(), "10.244.3.0/24");
        assert_eq!(c4.overlay.underlay_ip, Some(node.underlay_ip.into()));
        assert!(
            c4.egress.enabled.unwrap_or(true),
            "the ConfigMap's [egress]"
        );
        assert!(
            c4.host.routes.is_empty(),
            "the ConfigMap names no host routes"
        );
        assert_eq!(
            c4.kubernetes.kubeconfig.as_deref(),
            Some(std::path::Path::new("/run/vswitch-lab/vsl/kubeconfig"))
        );
        assert_eq!(c4.node.state_dir, node.dir.join("state"));
        assert_eq!(
            c4.admin.metrics_address,
            Some(std::net::SocketAddr::new(node.underlay_ip.into(), 9109))
        );
        assert_eq!(
            c.node.state_dir,
            PathBuf::from("/run/vswitch-lab/vsl/n3/state")
        );
        assert_eq!(
            c.admin.socket,
            PathBuf::from("/run/vswitch-lab/vsl/n3/vswitchd.sock")
        );
    }

    #[test]
    fn netconf_is_valid_for_the_plugin() {
        let sock = PathBuf::from("/run/vswitch-lab/vsl/n1/vswitchd.sock");
        let text = render_netconf("vsl", &sock).unwrap();
        let nc: NetConf = serde_json::from_str(&text).unwrap();
        nc.validate().unwrap();
        assert_eq!(nc.name, "vsl");
        assert_eq!(nc.plugin_type, "vswitch");
        assert_eq!(nc.socket_path(), sock);
    }
}
