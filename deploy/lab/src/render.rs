//! Rendering one node's vswitchd config from the cluster-wide settings and the nodes table.
//!
//! Each node's config needs its own `node.name`, `node.pod_cidr` and `overlay.underlay_ip`, and
//! in static mode its `[[peers]]` (vswitchd's Kubernetes mode reads peers and Services from the
//! API, but a node's own pod CIDR still from its config). The cluster config (ConfigMap
//! `vswitch-config`) holds everything else; the nodes table (ConfigMap `vswitch-nodes`,
//! generated from `kubectl get nodes` by deploy/kubernetes/nodes-configmap.sh) holds one entry
//! per node:
//!
//! ```toml
//! [[nodes]]
//! name = "kind-worker"
//! pod_cidr = "10.244.1.0/24"
//! underlay_ip = "172.18.0.3"      # the node's InternalIP
//! # vtep_mac = "0e:58:ac:12:00:03" # default: derived from underlay_ip, as vswitchd does
//! ```
//!
//! This node's entry fills the `[node]` and `[overlay]` fields; every other entry becomes a
//! peer, unless the cluster config turns on `[kubernetes] enabled`, where vswitchd learns its
//! peers from Node objects and static ones are left out. The result is checked with the
//! daemon's own parser, so a bad ConfigMap fails the init container with the daemon's message
//! (naming the field) instead of crash-looping vswitchd.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use conf::config::{default_vtep_mac, Config};
use ipnet::Ipv4Net;
use serde::Deserialize;

use crate::fsutil;

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "{path}: {field} is set per node; remove it from the cluster config (it comes from \
         --node-name and the nodes table)"
    )]
    PerNodeField { path: PathBuf, field: &'static str },
    #[error(
        "node {node} is not in {path} (it lists: {listed}); regenerate the vswitch-nodes \
         ConfigMap with deploy/kubernetes/nodes-configmap.sh"
    )]
    UnknownNode {
        node: String,
        path: PathBuf,
        listed: String,
    },
    #[error("{path}: node {node} is listed twice")]
    Duplicate { path: PathBuf, node: String },
    #[error("{path}: node {node} has no underlay_ip, which its peer {peer} needs")]
    NoUnderlay {
        path: PathBuf,
        node: String,
        peer: String,
    },
    #[error("--node-ip {0:?} is not an IP address")]
    NodeIp(String),
    #[error("the config rendered for node {node} is not valid: {source}")]
    Invalid {
        node: String,
        source: conf::ConfigError,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The nodes table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodesFile {
    #[serde(default)]
    nodes: Vec<NodeEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeEntry {
    name: String,
    pod_cidr: Ipv4Net,
    #[serde(default)]
    underlay_ip: Option<IpAddr>,
    #[serde(default)]
    vtep_mac: Option<String>,
}

/// Fields that differ between nodes and so must not be in the cluster config.
const PER_NODE: &[(&str, &str, &str)] = &[
    ("node", "name", "node.name"),
    ("node", "pod_cidr", "node.pod_cidr"),
    ("node", "gateway", "node.gateway"),
    ("overlay", "underlay_ip", "overlay.underlay_ip"),
    ("overlay", "vtep_mac", "overlay.vtep_mac"),
    ("kubernetes", "node_name", "kubernetes.node_name"),
];

pub struct Inputs<'a> {
    pub cluster: &'a Path,
    pub nodes: &'a Path,
    pub node_name: &'a str,
    pub node_ip: Option<&'a str>,
    pub out: &'a Path,
}

/// Renders, checks and writes the config; returns a one-line summary.
pub fn run(inp: &Inputs<'_>) -> Result<String, RenderError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| RenderError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let node_ip = match inp.node_ip.map(str::trim).filter(|s| !s.is_empty()) {
        Some(s) => Some(
            s.parse::<IpAddr>()
                .map_err(|_| RenderError::NodeIp(s.to_string()))?,
        ),
        None => None,
    };
    let text = render(
        (inp.cluster, &read(inp.cluster)?),
        (inp.nodes, &read(inp.nodes)?),
        inp.node_name,
        node_ip,
    )?;
    // A node the table does not list (Kubernetes mode) has no pod CIDR here: vswitchd takes
    // its Node object's. The rest is checked as vswitchd will, with a stand-in CIDR.
    let pod_cidr_from_node = toml::from_str::<toml::Table>(&text)
        .ok()
        .and_then(|t| {
            t.get("node")?
                .as_table()
                .map(|n| !n.contains_key("pod_cidr"))
        })
        .unwrap_or(false);
    let checked = if pod_cidr_from_node {
        let mut t: toml::Table = toml::from_str(&text).unwrap_or_default();
        if let Some(n) = t.get_mut("node").and_then(|n| n.as_table_mut()) {
            n.insert("pod_cidr".into(), "192.0.2.0/24".into());
        }
        toml::to_string(&t).unwrap_or_default()
    } else {
        text.clone()
    };
    let config = Config::parse(&checked).map_err(|source| RenderError::Invalid {
        node: inp.node_name.to_string(),
        source,
    })?;
    fsutil::write_atomic(inp.out, text.as_bytes(), 0o644).map_err(|source| RenderError::Write {
        path: inp.out.to_owned(),
        source,
    })?;
    Ok(format!(
        "wrote {} for node {}: pod CIDR {}, underlay {}, {} peer(s), metrics on {}",
        inp.out.display(),
        config.node.name,
        if pod_cidr_from_node {
            "from its Node object (vswitchd reads it at start)".to_string()
        } else {
            config.node.pod_cidr.to_string()
        },
        config
            .overlay
            .underlay_ip
            .map_or_else(|| "none".to_string(), |ip| ip.to_string()),
        config.peers.len(),
        config
            .admin
            .metrics_address
            .map_or_else(|| "none".to_string(), |a| a.to_string()),
    ))
}

/// Renders the node's config text (not yet checked by the daemon's parser).
pub fn render(
    (cluster_path, cluster_text): (&Path, &str),
    (nodes_path, nodes_text): (&Path, &str),
    node_name: &str,
    node_ip: Option<IpAddr>,
) -> Result<String, RenderError> {
    let parse_err = |path: &Path, e: toml::de::Error| RenderError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let mut table: toml::Table =
        toml::from_str(cluster_text).map_err(|e| parse_err(cluster_path, e))?;
    for (section, key, field) in PER_NODE {
        if table
            .get(*section)
            .and_then(|s| s.as_table())
            .is_some_and(|s| s.contains_key(*key))
        {
            return Err(RenderError::PerNodeField {
                path: cluster_path.to_owned(),
                field,
            });
        }
    }
    if table.contains_key("peers") {
        return Err(RenderError::PerNodeField {
            path: cluster_path.to_owned(),
            field: "peers",
        });
    }
    let nodes: NodesFile = toml::from_str(nodes_text).map_err(|e| parse_err(nodes_path, e))?;
    for (i, n) in nodes.nodes.iter().enumerate() {
        if nodes.nodes[..i].iter().any(|m| m.name == n.name) {
            return Err(RenderError::Duplicate {
                path: nodes_path.to_owned(),
                node: n.name.clone(),
            });
        }
    }
    let from_api = table
        .get("kubernetes")
        .and_then(|k| k.get("enabled"))
        .and_then(toml::Value::as_bool)
        .unwrap_or(false);
    // In Kubernetes mode a node the table does not list takes its pod CIDR from its Node
    // object (vswitchd asks the API at start), so a joining node needs nothing run by hand.
    let me = nodes.nodes.iter().find(|n| n.name == node_name);
    let unknown = || RenderError::UnknownNode {
        node: node_name.to_string(),
        path: nodes_path.to_owned(),
        listed: if nodes.nodes.is_empty() {
            "no nodes".to_string()
        } else {
            nodes
                .nodes
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        },
    };
    let me = match me {
        Some(me) => Some(me),
        None if from_api => None,
        None => return Err(unknown()),
    };

    let mut node = take_section(&mut table, "node", cluster_path)?;
    node.insert("name".into(), node_name.into());
    if let Some(me) = me {
        node.insert("pod_cidr".into(), me.pod_cidr.to_string().into());
    }
    table.insert("node".into(), node.into());

    let underlay = me.and_then(|m| m.underlay_ip).or(node_ip);
    let others = nodes.nodes.iter().filter(|n| n.name != node_name);
    let peers: Vec<&NodeEntry> = if from_api {
        Vec::new()
    } else {
        others.collect()
    };
    if let Some(peer) = peers.first() {
        if underlay.is_none() {
            return Err(RenderError::NoUnderlay {
                path: nodes_path.to_owned(),
                node: node_name.to_string(),
                peer: peer.name.clone(),
            });
        }
    }
    // Without peers the overlay stays off: no underlay socket is opened on a single node. With
    // peers from the API the overlay is on whenever the node's address is known, even on a
    // single node: a node that joins later becomes a peer live, with no restart here.
    if !peers.is_empty() || (from_api && underlay.is_some()) {
        let mut overlay = take_section(&mut table, "overlay", cluster_path)?;
        if let Some(ip) = underlay {
            overlay.insert("underlay_ip".into(), ip.to_string().into());
        }
        if let Some(mac) = me.and_then(|m| m.vtep_mac.as_ref()) {
            overlay.insert("vtep_mac".into(), mac.clone().into());
        }
        table.insert("overlay".into(), overlay.into());
    }
    // Metrics, health and readiness on this node's own address rather than on every interface
    // of the host (the pod is hostNetwork): kubelet's probes and Prometheus reach the pod's
    // address, which is the node's. An address other than 0.0.0.0 or :: is kept as given.
    if let Some(ip) = node_ip.or(me.and_then(|m| m.underlay_ip)) {
        let mut admin = take_section(&mut table, "admin", cluster_path)?;
        let given = admin
            .get("metrics_address")
            .and_then(toml::Value::as_str)
            .and_then(|a| a.parse::<std::net::SocketAddr>().ok());
        if let Some(addr) = given.filter(|a| a.ip().is_unspecified()) {
            let on_node = std::net::SocketAddr::new(ip, addr.port());
            admin.insert("metrics_address".into(), on_node.to_string().into());
        }
        table.insert("admin".into(), admin.into());
    }
    let mut peer_values = Vec::new();
    for p in &peers {
        let ip = p.underlay_ip.ok_or_else(|| RenderError::NoUnderlay {
            path: nodes_path.to_owned(),
            node: p.name.clone(),
            peer: node_name.to_string(),
        })?;
        let mac = p
            .vtep_mac
            .clone()
            .unwrap_or_else(|| format_mac(default_vtep_mac(ip)));
        let mut t = toml::Table::new();
        t.insert("name".into(), p.name.clone().into());
        t.insert("underlay_ip".into(), ip.to_string().into());
        t.insert("vtep_mac".into(), mac.into());
        t.insert(
            "pod_cidrs".into(),
            toml::Value::Array(vec![p.pod_cidr.to_string().into()]),
        );
        peer_values.push(toml::Value::Table(t));
    }
    if !peer_values.is_empty() {
        table.insert("peers".into(), toml::Value::Array(peer_values));
    }
    let body = toml::to_string(&table).map_err(|e| RenderError::Parse {
        path: cluster_path.to_owned(),
        message: format!("cannot write the merged config: {e}"),
    })?;
    Ok(format!(
        "# Rendered by vswitch-install for node {node_name} from {} and {}.\n\
         # Edit those (ConfigMaps vswitch-config and vswitch-nodes), not this file.\n{body}",
        cluster_path.display(),
        nodes_path.display()
    ))
}

/// Takes the table `name` out of `table` (an empty one when missing); the caller puts it back.
fn take_section(
    table: &mut toml::Table,
    name: &'static str,
    path: &Path,
) -> Result<toml::Table, RenderError> {
    match table.remove(name) {
        None => Ok(toml::Table::new()),
        Some(toml::Value::Table(t)) => Ok(t),
        Some(_) => Err(RenderError::Parse {
            path: path.to_owned(),
            message: format!("{name} must be a table ([{name}])"),
        }),
    }
}

fn format_mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: &str = "[node]\nmtu = 1450\n[admin]\nmetrics_address = \"0.0.0.0:9109\"\n";
    const NODES: &str = "[[nodes]]\nname = \"a\"\npod_cidr = \"10.244.0.0/24\"\n\
                         underlay_ip = \"172.18.0.2\"\n\
                         [[nodes]]\nname = \"b\"\npod_cidr = \"10.244.1.0/24\"\n\
                         underlay_ip = \"172.18.0.3\"\n";

    fn go(cluster: &str, nodes: &str, name: &str, ip: Option<IpAddr>) -> Result<Config, String> {
        let text = render(
            (Path::new("c.toml"), cluster),
            (Path::new("n.toml"), nodes),
            name,
            ip,
        )
        .map_err(|e| e.to_string())?;
        Config::parse(&text).map_err(|e| e.to_string())
    }

    #[test]
    fn other_nodes_become_peers() {
        let c = go(CLUSTER, NODES, "b", None).unwrap();
        assert_eq!(c.node.name, "b");
        assert_eq!(c.node.pod_cidr.to_string(), "10.244.1.0/24");
        assert_eq!(c.overlay.underlay_ip, Some("172.18.0.3".parse().unwrap()));
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.peers[0].name, "a");
        assert_eq!(c.peers[0].vtep_mac, "0e:58:ac:12:00:02");
        assert_eq!(c.node.mtu, 1450);
    }

    #[test]
    fn single_node_needs_no_underlay() {
        let nodes = "[[nodes]]\nname = \"a\"\npod_cidr = \"10.244.0.0/24\"\n";
        let c = go(CLUSTER, nodes, "a", None).unwrap();
        assert!(c.peers.is_empty());
        assert_eq!(c.overlay.underlay_ip, None);
    }

    #[test]
    fn metrics_listen_on_the_nodes_address_unless_an_address_is_given() {
        let nodes = "[[nodes]]\nname = \"a\"\npod_cidr = \"10.244.0.0/24\"\n";
        let ip = Some("172.18.0.9".parse().unwrap());
        let c = go(CLUSTER, nodes, "a", ip).unwrap();
        assert_eq!(
            c.admin.metrics_address,
            Some("172.18.0.9:9109".parse().unwrap())
        );
        let given = "[admin]\nmetrics_address = \"127.0.0.1:9200\"\n";
        let c = go(given, nodes, "a", ip).unwrap();
        assert_eq!(
            c.admin.metrics_address,
            Some("127.0.0.1:9200".parse().unwrap())
        );
        // No address known for the node: as written.
        let c = go(CLUSTER, nodes, "a", None).unwrap();
        assert_eq!(
            c.admin.metrics_address,
            Some("0.0.0.0:9109".parse().unwrap())
        );
    }

    #[test]
    fn node_ip_is_the_fallback_underlay() {
        let nodes = NODES.replace("underlay_ip = \"172.18.0.3\"\n", "");
        let c = go(CLUSTER, &nodes, "b", Some("172.18.0.9".parse().unwrap())).unwrap();
        assert_eq!(c.overlay.underlay_ip, Some("172.18.0.9".parse().unwrap()));
        let e = go(CLUSTER, &nodes, "a", None).unwrap_err();
        assert!(e.contains("node b has no underlay_ip"), "{e}");
    }

    #[test]
    fn peers_from_the_api_are_not_rendered() {
        let cluster = format!("{CLUSTER}[kubernetes]\nenabled = true\n");
        let c = go(&cluster, NODES, "a", None).unwrap();
        assert!(c.kubernetes.enabled);
        assert!(c.peers.is_empty());
        assert_eq!(c.node.pod_cidr.to_string(), "10.244.0.0/24");
        assert_eq!(c.overlay.underlay_ip, Some("172.18.0.2".parse().unwrap()));
    }

    /// A one-node cluster in Kubernetes mode still opens the overlay, so the second node to
    /// join is reached without restarting the first.
    #[test]
    fn with_the_api_a_single_node_keeps_its_overlay_for_nodes_that_join() {
        let cluster = format!("{CLUSTER}[kubernetes]\nenabled = true\n");
        let one = "[[nodes]]\nname = \"a\"\npod_cidr = \"10.244.0.0/24\"\n";
        let c = go(&cluster, one, "a", Some("172.18.0.2".parse().unwrap())).unwrap();
        assert!(c.peers.is_empty());
        assert_eq!(c.overlay.underlay_ip, Some("172.18.0.2".parse().unwrap()));
        // Without any address for the node there is nothing to bind: the overlay stays off.
        let c = go(&cluster, one, "a", None).unwrap();
        assert_eq!(c.overlay.underlay_ip, None);
    }

    /// A node that joins after the nodes table was made: in Kubernetes mode it renders without
    /// a pod CIDR (vswitchd takes its Node object's), with its own address as the underlay.
    #[test]
    fn with_the_api_a_node_the_table_does_not_list_renders_without_a_pod_cidr() {
        let cluster = format!("{CLUSTER}[kubernetes]\nenabled = true\n");
        let ip = Some("172.18.0.7".parse().unwrap());
        let text = render(
            (Path::new("c.toml"), &cluster),
            (Path::new("n.toml"), NODES),
            "new",
            ip,
        )
        .unwrap();
        let t: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(t["node"]["name"].as_str(), Some("new"));
        assert!(t["node"].get("pod_cidr").is_none(), "{text}");
        assert_eq!(t["overlay"]["underlay_ip"].as_str(), Some("172.18.0.7"));
        // Without the API the table must list it.
        let e = go(CLUSTER, NODES, "new", ip).unwrap_err();
        assert!(e.contains("node new is not in n.toml"), "{e}");
    }

    #[test]
    fn mistakes_are_named() {
        let e = go(CLUSTER, NODES, "zz", None).unwrap_err();
        assert!(
            e.contains("node zz is not in n.toml (it lists: a, b)"),
            "{e}"
        );
        let e = go(
            &format!("{CLUSTER}[overlay]\nunderlay_ip = \"1.2.3.4\"\n"),
            NODES,
            "a",
            None,
        )
        .unwrap_err();
        assert!(e.contains("overlay.underlay_ip is set per node"), "{e}");
        let e = go("[node]\nname = \"x\"\n", NODES, "a", None).unwrap_err();
        assert!(e.contains("node.name is set per node"), "{e}");
        let e = go(CLUSTER, &format!("{NODES}{NODES}"), "a", None).unwrap_err();
        assert!(e.contains("listed twice"), "{e}");
        let e = go(
            CLUSTER,
            &NODES.replace("10.244.1.0/24", "10.244.0.0/16"),
            "a",
            None,
        )
        .unwrap_err();
        assert!(e.contains("overlaps"), "{e}");
        let e = go(
            CLUSTER,
            "[[nodes]]\nname = \"a\"\ncidr = \"x\"\n",
            "a",
            None,
        )
        .unwrap_err();
        assert!(e.contains("n.toml"), "{e}");
    }
}
