//! What a lab is made of, and how every object in it is named.
//!
//! All names derive from the lab name, so a lab can be found again (and torn down) from its name
//! alone, even when its state file is lost. The lab name is short and plain (at most 8 of
//! `[a-z0-9]`) because the fabric's veth ends are called `{name}n{i}` and Linux interface names
//! stop at 15 bytes (IFNAMSIZ - 1). Node `i` (1-based) gets underlay `192.168.100.{i}/24` and pod
//! CIDR `10.244.{i}.0/24`, which bounds the node count at 254.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::LabError;

/// The lab name used when none is given.
pub const DEFAULT_NAME: &str = "vsl";
/// Longest lab name: `{name}n{254}` must fit in 15 bytes.
pub const MAX_NAME_LEN: usize = 8;
/// Most nodes: one underlay address and one /24 pod CIDR each.
pub const MAX_NODES: u32 = 252;
/// Most pods per node: a /24 holds 253 hosts and one is the gateway.
pub const MAX_PODS_PER_NODE: u32 = 250;
/// Longest pod name (the part after `n{i}-`).
pub const MAX_POD_NAME_LEN: usize = 32;
/// The underlay's prefix length.
pub const UNDERLAY_PREFIX_LEN: u8 = 24;
/// The underlay (fabric) MTU, as on a plain Ethernet LAN.
pub const UNDERLAY_MTU: u32 = 1500;
/// The pod MTU given to vswitchd: the underlay's minus VXLAN's 50 bytes.
pub const POD_MTU: u32 = 1450;
/// The kernel bridge in the fabric namespace.
pub const FABRIC_BRIDGE: &str = "fab0";
/// Each node's underlay interface.
pub const UNDERLAY_IFNAME: &str = "ul0";
/// The interface the CNI plugin creates in every pod.
pub const POD_IFNAME: &str = "eth0";

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabSpec {
    /// At most 8 of `[a-z0-9]`; prefixes every namespace of the lab.
    pub name: String,
    /// Number of nodes, 1..=252 (192.168.100.253 is the outside host, .254 the API server
    /// stand-in of Kubernetes mode).
    pub nodes: u32,
    /// Pods attached on every node at `up`, 0..=250.
    pub pods_per_node: u32,
    /// Datapath workers of every node's vswitchd.
    pub workers: u32,
    /// CPUs every node's workers are pinned to (`datapath.cpus`; empty: not pinned).
    pub cpus: Vec<u32>,
    /// Every node's `datapath.busy_poll_us` (None: vswitchd's default).
    pub busy_poll_us: Option<u32>,
    /// Kubernetes mode: an API server stand-in on the fabric, and every vswitchd watching it
    /// (`[kubernetes] enabled`) instead of static peers and Services.
    pub kubernetes: bool,
}

impl Default for LabSpec {
    fn default() -> Self {
        LabSpec {
            name: DEFAULT_NAME.into(),
            nodes: 2,
            pods_per_node: 2,
            workers: 1,
            cpus: Vec::new(),
            busy_poll_us: None,
            kubernetes: false,
        }
    }
}

impl LabSpec {
    pub fn new(name: &str, nodes: u32, pods_per_node: u32) -> Self {
        LabSpec {
            name: name.into(),
            nodes,
            pods_per_node,
            workers: 1,
            cpus: Vec::new(),
            busy_poll_us: None,
            kubernetes: false,
        }
    }

    /// The same lab in Kubernetes mode (see [`LabSpec::kubernetes`]).
    pub fn with_kubernetes(self) -> Self {
        LabSpec {
            kubernetes: true,
            ..self
        }
    }

    /// The same lab with `workers` datapath workers per node.
    pub fn with_workers(self, workers: u32) -> Self {
        LabSpec { workers, ..self }
    }

    /// The same lab with the datapath on cores of its own: every node's workers pinned to
    /// `cpus` and polling all the time, as OVS-DPDK's PMD threads on `pmd-cpu-mask`.
    pub fn with_dedicated_cpus(self, cpus: Vec<u32>) -> Self {
        LabSpec {
            cpus,
            busy_poll_us: Some(conf::config::MAX_BUSY_POLL_US),
            ..self
        }
    }

    pub fn validate(&self) -> Result<(), LabError> {
        validate_name(&self.name)?;
        if !(1..=MAX_NODES).contains(&self.nodes) {
            return Err(LabError::InvalidSpec(format!(
                "--nodes {} is out of range 1..={MAX_NODES}",
                self.nodes
            )));
        }
        if self.kubernetes && self.nodes >= MAX_NODES {
            return Err(LabError::InvalidSpec(format!(
                "--nodes {} with --kubernetes: at most {} (the API server takes the fabric's \
                 last address, {})",
                self.nodes,
                MAX_NODES - 1,
                crate::kube::APISERVER_IP
            )));
        }
        if self.pods_per_node > MAX_PODS_PER_NODE {
            return Err(LabError::InvalidSpec(format!(
                "--pods-per-node {} is out of range 0..={MAX_PODS_PER_NODE}",
                self.pods_per_node
            )));
        }
        if !(1..=conf::config::MAX_WORKERS).contains(&self.workers) {
            return Err(LabError::InvalidSpec(format!(
                "--workers {} is out of range 1..={}",
                self.workers,
                conf::config::MAX_WORKERS
            )));
        }
        if let Some(c) = self.cpus.iter().find(|&&c| c > conf::config::MAX_CPU) {
            return Err(LabError::InvalidSpec(format!(
                "--datapath-cpus: CPU {c} is above {}",
                conf::config::MAX_CPU
            )));
        }
        if let Some(b) = self
            .busy_poll_us
            .filter(|&b| b > conf::config::MAX_BUSY_POLL_US)
        {
            return Err(LabError::InvalidSpec(format!(
                "--busy-poll-us {b} is above {}",
                conf::config::MAX_BUSY_POLL_US
            )));
        }
        Ok(())
    }
}

fn plain(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Checks a lab name: 1 to 8 characters of `[a-z0-9]`.
pub fn validate_name(name: &str) -> Result<(), LabError> {
    let reason = if name.is_empty() {
        "it is empty".to_string()
    } else if name.len() > MAX_NAME_LEN {
        format!(
            "it has {} characters, at most {MAX_NAME_LEN} fit in interface names",
            name.len()
        )
    } else if !plain(name) {
        "use only lowercase letters and digits [a-z0-9]".to_string()
    } else {
        return Ok(());
    };
    Err(LabError::InvalidName {
        name: name.into(),
        reason,
    })
}

/// Checks a pod name (the `p1` in `n1-p1`): 1 to 32 characters of `[a-z0-9]`.
/// A Kubernetes namespace name: a DNS label (1 to 63 of [a-z0-9-], not starting or ending
/// with '-').
pub fn validate_namespace(ns: &str) -> Result<(), LabError> {
    let ok = !ns.is_empty()
        && ns.len() <= 63
        && ns
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !ns.starts_with('-')
        && !ns.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(LabError::InvalidNamespace(ns.into()))
    }
}

pub fn validate_pod_name(name: &str) -> Result<(), LabError> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.len() > MAX_POD_NAME_LEN {
        "it is longer than 32 characters"
    } else if !plain(name) {
        "use only lowercase letters and digits [a-z0-9]"
    } else {
        return Ok(());
    };
    Err(LabError::InvalidPodName {
        name: name.into(),
        reason: reason.into(),
    })
}

/// The names of a lab's objects. Construct only from a validated lab name.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Names<'a>(pub &'a str);

impl Names<'_> {
    pub fn fabric_netns(&self) -> String {
        format!("{}-fab", self.0)
    }
    /// The node's name (vswitchd's node.name) and its namespace: both `{lab}-n{i}`.
    pub fn node(&self, i: u32) -> String {
        format!("{}-n{i}", self.0)
    }
    /// The host outside the cluster (`out`): its namespace.
    pub fn outside_netns(&self) -> String {
        format!("{}-out", self.0)
    }
    /// The fabric's end of the outside host's veth.
    pub fn outside_port(&self) -> String {
        format!("{}out", self.0)
    }
    /// The fabric's end of node `i`'s underlay veth.
    pub fn fabric_port(&self, i: u32) -> String {
        format!("{}n{i}", self.0)
    }
    /// The pod's name within the lab: `n{i}-{pod}`.
    pub fn pod_short(i: u32, pod: &str) -> String {
        format!("n{i}-{pod}")
    }
    /// The pod's namespace and CNI container ID: `{lab}-n{i}-{pod}`.
    pub fn pod_netns(&self, i: u32, pod: &str) -> String {
        format!("{}-n{i}-{pod}", self.0)
    }

    /// Tells what a namespace name is within this lab, if it is one of the lab's.
    pub fn classify(&self, netns: &str) -> Option<LabNetns> {
        let rest = netns.strip_prefix(self.0)?.strip_prefix('-')?;
        if rest == "fab" {
            return Some(LabNetns::Fabric);
        }
        if rest == "out" {
            return Some(LabNetns::Outside);
        }
        let rest = rest.strip_prefix('n')?;
        let (index, pod) = match rest.split_once('-') {
            Some((i, p)) => (i, Some(p)),
            None => (rest, None),
        };
        let i: u32 = index.parse().ok()?;
        // Only the canonical spelling: `n01` is not node 1's.
        if i.to_string() != index {
            return None;
        }
        match pod {
            None => Some(LabNetns::Node(i)),
            Some(p) if validate_pod_name(p).is_ok() => Some(LabNetns::Pod(i, p.to_string())),
            Some(_) => None,
        }
    }
}

/// A namespace that belongs to a lab.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum LabNetns {
    Pod(u32, String),
    Node(u32),
    Outside,
    Fabric,
}

/// The outside host's address on the fabric: the nodes reach it, and it has no route to any
/// pod CIDR, so only what egress translation sends from a node's address is answered.
pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 253);

/// Node `i`'s underlay address.
pub(crate) fn underlay_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 100, i as u8)
}

/// Node `i`'s pod CIDR.
pub(crate) fn pod_cidr(i: u32) -> Ipv4Net {
    // A /24 is always a valid prefix length.
    Ipv4Net::new(Ipv4Addr::new(10, 244, i as u8, 0), 24).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_names() {
        for ok in ["vsl", "a", "lt1234", "12345678"] {
            validate_name(ok).unwrap();
        }
        for bad in ["", "123456789", "Vsl", "v-s", "v_s", "v.s", "v s", "é"] {
            let e = validate_name(bad).unwrap_err();
            assert!(matches!(e, LabError::InvalidName { .. }), "{bad}: {e}");
        }
        // The longest name still gives interface names within IFNAMSIZ.
        let n = Names("12345678");
        assert!(n.fabric_port(MAX_NODES).len() <= 15);
    }

    #[test]
    fn specs() {
        LabSpec::default().validate().unwrap();
        LabSpec::new("x", 252, 0).validate().unwrap();
        assert!(LabSpec::new("x", 253, 0).validate().is_err());
        assert!(LabSpec::new("x", 0, 1).validate().is_err());
        assert!(LabSpec::new("x", 255, 1).validate().is_err());
        assert!(LabSpec::new("x", 1, 251).validate().is_err());
        assert!(LabSpec::new("TOOLONGNAME", 1, 1).validate().is_err());
        LabSpec::new("x", 2, 1).with_workers(2).validate().unwrap();
        let e = LabSpec::new("x", 2, 1)
            .with_workers(0)
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("--workers 0"), "{e}");
        assert!(LabSpec::new("x", 2, 1).with_workers(65).validate().is_err());
    }

    #[test]
    fn names_round_trip_through_classify() {
        let n = Names("vsl");
        assert_eq!(n.classify(&n.fabric_netns()), Some(LabNetns::Fabric));
        assert_eq!(n.classify(&n.outside_netns()), Some(LabNetns::Outside));
        assert!(
            LabNetns::Outside < LabNetns::Fabric,
            "torn down before the fabric"
        );
        assert_eq!(n.classify(&n.node(12)), Some(LabNetns::Node(12)));
        assert_eq!(
            n.classify(&n.pod_netns(3, "p7")),
            Some(LabNetns::Pod(3, "p7".into()))
        );
        for other in [
            "vsl",
            "vsl-",
            "vsl-n",
            "vsl-n01",
            "vsl-nx",
            "vsl-n1-",
            "vsl-n1-P1",
            "vsl2-n1",
            "vs-n1",
            "vsl-fab0",
            "vsl-n1-p1-x",
            "other",
        ] {
            assert_eq!(n.classify(other), None, "{other}");
        }
        assert_eq!(underlay_ip(2), Ipv4Addr::new(192, 168, 100, 2));
        assert_eq!(pod_cidr(2).to_string(), "10.244.2.0/24");
    }
}
