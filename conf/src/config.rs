//! The daemon's configuration file (TOML).
//!
//! Parsing is strict (`deny_unknown_fields`) so that a typo is an error, not a silently ignored
//! setting. After parsing, [`Config::validate`] checks every value against the others and the
//! first problem is reported with the dotted path of the field, e.g.
//! `node.pod_cidr: 10.244.1.0/31 leaves no address for pods`.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};

/// Default admin socket path.
pub const DEFAULT_SOCKET: &str = "/run/vswitch/vswitchd.sock";
/// Default state directory (IPAM leases, attachments).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/vswitch";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub datapath: DatapathConfig,
    #[serde(default)]
    pub dns: DnsConfig,
    #[serde(default)]
    pub overlay: OverlayConfig,
    /// Other nodes and their pod CIDRs (static mode; also changed at runtime via the admin API).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerSpec>,
    /// How Services are translated (timeouts, backend choice, conntrack size).
    #[serde(default)]
    pub nat: NatConfig,
    /// The node's own interface into the switch.
    #[serde(default)]
    pub host: HostConfig,
    /// Services and their endpoints (static mode; in a cluster they come from the API).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceSpec>,
    /// The Kubernetes API as the source of peers and Services (off: static mode).
    #[serde(default, skip_serializing_if = "KubernetesConfig::is_default")]
    pub kubernetes: KubernetesConfig,
    /// NetworkPolicy: where policies, namespaces and pod labels come from in static mode.
    #[serde(default, skip_serializing_if = "PolicyConfig::is_default")]
    pub policy: PolicyConfig,
    /// Pods' traffic to the world outside the cluster, leaving from the node's address.
    #[serde(default, skip_serializing_if = "EgressConfig::is_default")]
    pub egress: EgressConfig,
}

/// Egress translation: pods' TCP, UDP and ICMP echo to addresses outside the cluster leave from
/// the node's own address without any iptables rule. The switch ends the pod's connection
/// itself and opens the same one from an ordinary socket of the node (as passt and slirp4netns
/// do), so the outside sees the node and answers the node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct EgressConfig {
    /// On or off; unset: on in Kubernetes mode, off in static mode (see [`Config::egress_on`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Destinations that keep the pod's address (routed through the node as before), like
    /// ip-masq-agent's nonMasqueradeCIDRs. The pod CIDRs and the Service CIDR (host.routes)
    /// are never translated whatever this says.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub no_masquerade: Vec<Ipv4Net>,
    /// Most translated connections (TCP, UDP flows, ICMP echo) of one pod at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections_per_pod: Option<u32>,
    /// Most translated connections of the node at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
}

/// Default of `egress.max_connections_per_pod`.
pub const EGRESS_MAX_PER_POD: u32 = 1024;
/// Default of `egress.max_connections`.
pub const EGRESS_MAX: u32 = 16_384;
const EGRESS_LIMIT: u32 = 1_000_000;

impl EgressConfig {
    pub fn is_default(&self) -> bool {
        *self == EgressConfig::default()
    }

    pub fn per_pod(&self) -> u32 {
        self.max_connections_per_pod.unwrap_or(EGRESS_MAX_PER_POD)
    }

    pub fn total(&self) -> u32 {
        self.max_connections.unwrap_or(EGRESS_MAX)
    }

    /// Checks the section; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(n) = self.no_masquerade.iter().find(|n| **n != n.trunc()) {
            return Err(invalid(
                "egress.no_masquerade",
                format!("{n} has host bits set; did you mean {}?", n.trunc()),
            ));
        }
        for (field, v) in [
            ("egress.max_connections_per_pod", self.per_pod()),
            ("egress.max_connections", self.total()),
        ] {
            if !(1..=EGRESS_LIMIT).contains(&v) {
                return Err(invalid(
                    field,
                    format!("{v} is out of range 1..={EGRESS_LIMIT}"),
                ));
            }
        }
        if self.per_pod() > self.total() {
            return Err(invalid(
                "egress.max_connections_per_pod",
                format!(
                    "{} is more than egress.max_connections ({})",
                    self.per_pod(),
                    self.total()
                ),
            ));
        }
        Ok(())
    }
}

/// NetworkPolicy enforcement. In Kubernetes mode the policies, Namespaces and Pods come from
/// the API; in static mode from `dir`, a directory of the manifests a user would `kubectl
/// apply` (NetworkPolicy, Namespace and Pod objects, YAML or JSON, several per file), reloaded
/// live when a file in it changes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
}

impl PolicyConfig {
    pub fn is_default(&self) -> bool {
        *self == PolicyConfig::default()
    }

    /// Checks the section; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(d) = &self.dir {
            if !d.is_absolute() {
                return Err(invalid(
                    "policy.dir",
                    format!("{} must be an absolute path", d.display()),
                ));
            }
        }
        Ok(())
    }
}

/// Where peers and Services come from in a cluster. Off by default: static mode, where they come
/// from this file and are reloaded when it changes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// Watch Nodes, Services and EndpointSlices and publish this node's VTEP annotation.
    #[serde(default)]
    pub enabled: bool,
    /// A kubeconfig file. Default: $KUBECONFIG, then the in-cluster service account, then
    /// ~/.kube/config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name in the API. Default: `--node-name`, then $NODE_NAME (the downward API),
    /// then `node.name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Quiet time after the last API event before the tables are rebuilt, milliseconds.
    #[serde(default = "default_debounce_ms")]
    pub debounce_ms: u32,
    /// Longest a burst of events can hold a rebuild back, milliseconds.
    #[serde(default = "default_max_delay_ms")]
    pub max_delay_ms: u32,
}

fn default_debounce_ms() -> u32 {
    10
}
fn default_max_delay_ms() -> u32 {
    25
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            enabled: false,
            kubeconfig: None,
            node_name: None,
            debounce_ms: default_debounce_ms(),
            max_delay_ms: default_max_delay_ms(),
        }
    }
}

impl KubernetesConfig {
    pub fn is_default(&self) -> bool {
        *self == KubernetesConfig::default()
    }

    /// Checks the section; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(n) = &self.node_name {
            if n.is_empty() || n.len() > 253 {
                return Err(invalid(
                    "kubernetes.node_name",
                    "must be 1 to 253 characters",
                ));
            }
        }
        if let Some(p) = &self.kubeconfig {
            if p.as_os_str().is_empty() {
                return Err(invalid("kubernetes.kubeconfig", "must not be empty"));
            }
        }
        if !(1..=10_000).contains(&self.debounce_ms) {
            return Err(invalid(
                "kubernetes.debounce_ms",
                format!("{} is out of range 1..=10000", self.debounce_ms),
            ));
        }
        if self.max_delay_ms < self.debounce_ms || self.max_delay_ms > 60_000 {
            return Err(invalid(
                "kubernetes.max_delay_ms",
                format!(
                    "{} must be at least kubernetes.debounce_ms ({}) and at most 60000",
                    self.max_delay_ms, self.debounce_ms
                ),
            ));
        }
        Ok(())
    }
}

/// The host port: an interface in the daemon's network namespace (the node's) that joins
/// the node itself to the switch, as flannel's cni0 does: it holds the gateway address, so the
/// node (kubelet probes, host processes) reaches pods, other nodes' pods and Services through
/// it, and pods reach the node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default = "default_host_if")]
    pub interface: String,
    /// Routes the node sends into the switch besides the pod CIDR: the cluster's pod CIDR and
    /// the Service CIDR, e.g. ["10.244.0.0/16", "10.96.0.0/12"].
    #[serde(default)]
    pub routes: Vec<IpNet>,
}

fn default_host_if() -> String {
    "vsw0".into()
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            enabled: true,
            interface: default_host_if(),
            routes: Vec::new(),
        }
    }
}

/// Service translation settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NatConfig {
    /// Backend choice: "maglev" (consistent hashing, stable under endpoint churn: rendezvous
    /// hashing for up to 16 endpoints, a Maglev table for more) or "random".
    #[serde(default)]
    pub load_balancing: LoadBalancing,
    /// Idle timeout of an established TCP connection, seconds.
    #[serde(default = "default_tcp_established")]
    pub tcp_established_timeout: u32,
    /// Idle timeout of a TCP connection being opened or closed, seconds.
    #[serde(default = "default_tcp_transitory")]
    pub tcp_transitory_timeout: u32,
    /// Idle timeout of a UDP flow, seconds.
    #[serde(default = "default_udp_timeout")]
    pub udp_timeout: u32,
    /// Most connections tracked at once; the oldest idle ones are evicted beyond it.
    #[serde(default = "default_conntrack_max")]
    pub conntrack_max: u32,
    /// Which of the node's addresses take NodePorts (kube-proxy's `nodePortAddresses`), as
    /// CIDRs, e.g. ["10.0.0.0/8"]. Empty (the default): every address of the node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_port_addresses: Vec<IpNet>,
}

fn default_tcp_established() -> u32 {
    86_400
}
fn default_tcp_transitory() -> u32 {
    120
}
fn default_udp_timeout() -> u32 {
    30
}
fn default_conntrack_max() -> u32 {
    262_144
}

impl Default for NatConfig {
    fn default() -> Self {
        NatConfig {
            load_balancing: LoadBalancing::default(),
            tcp_established_timeout: default_tcp_established(),
            tcp_transitory_timeout: default_tcp_transitory(),
            udp_timeout: default_udp_timeout(),
            conntrack_max: default_conntrack_max(),
            node_port_addresses: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LoadBalancing {
    #[default]
    Maglev,
    Random,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// `TCP`, `UDP` or `SCTP`, as Kubernetes and the config spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, Default)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

/// A Kubernetes Service as the switch needs it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub namespace: String,
    pub name: String,
    /// ClusterIPs; empty for a headless Service.
    #[serde(default)]
    pub cluster_ips: Vec<IpAddr>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub external_ips: Vec<IpAddr>,
    /// sessionAffinity ClientIP with this timeout in seconds (Kubernetes' default is 10800).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity_timeout: Option<u32>,
    #[serde(default)]
    pub internal_traffic_policy: TrafficPolicy,
    #[serde(default)]
    pub external_traffic_policy: TrafficPolicy,
    /// A LoadBalancer's ingress addresses (`status.loadBalancer.ingress[].ip`, ipMode VIP):
    /// translated like `external_ips`, following `external_traffic_policy`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub load_balancer_ips: Vec<IpAddr>,
    /// `healthCheckNodePort` of a Service with `external_traffic_policy = "Local"`: the node
    /// answers HTTP on it with 200 while it has a ready endpoint of the Service, else 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_node_port: Option<u16>,
    /// Served by another proxy (the label `service.kubernetes.io/service-proxy-name`): its
    /// names are answered in DNS, its addresses are not translated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_name: Option<String>,
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    /// The port's name (for SRV records and named target ports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    pub port: u16,
    /// The endpoints' port; default: the same as `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<u16>,
}

fn default_protocol() -> Protocol {
    Protocol::Tcp
}

/// One endpoint, with the EndpointSlice conditions.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    pub ip: IpAddr,
    /// The node the endpoint runs on (for traffic policy Local).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default = "default_true")]
    pub ready: bool,
    #[serde(default = "default_true")]
    pub serving: bool,
    #[serde(default)]
    pub terminating: bool,
    /// The endpoint's hostname (headless Service DNS records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The endpoint's own target port for each Service port, by the Service port's name (""
    /// for an unnamed port), as its EndpointSlice says: pods of one Service can number a
    /// named port differently (a rollout that renumbers it). Absent: every Service port at
    /// its `target_port`. Present: only the ports named here; the others send it nothing.
    /// Shared by the endpoints of one EndpointSlice (100,000 endpoints hold a few maps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<std::sync::Arc<std::collections::BTreeMap<String, u16>>>,
    /// EndpointSlice topology hints: the zones (`hints.forZones`) and nodes (`hints.forNodes`)
    /// this endpoint is meant for. Used, as kube-proxy uses them, only when every ready
    /// endpoint of the Service has them and one is meant for this node (`node.zone`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub for_zones: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub for_nodes: Vec<String>,
}

impl EndpointSpec {
    /// The port this endpoint takes Service port `p`'s traffic on, or `None` when it does
    /// not serve that port.
    pub fn target_port(&self, p: &ServicePort) -> Option<u16> {
        match &self.ports {
            None => Some(p.target_port.unwrap_or(p.port)),
            Some(m) => m
                .get(p.name.as_deref().unwrap_or_default())
                .copied()
                .filter(|n| *n != 0),
        }
    }
}

impl ServiceSpec {
    /// Checks one Service; `field` is where it sits.
    pub fn validate(&self, field: &'static str) -> Result<(), ConfigError> {
        let who = format!("{}/{}", self.namespace, self.name);
        let dns_label = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !s.starts_with('-')
                && !s.ends_with('-')
        };
        if !dns_label(&self.namespace) || !dns_label(&self.name) {
            return Err(invalid(
                field,
                format!("service {who:?}: namespace and name must be DNS labels"),
            ));
        }
        let mut seen = Vec::new();
        for p in &self.ports {
            if p.protocol == Protocol::Sctp {
                return Err(invalid(
                    field,
                    format!(
                        "service {who}: port {}: SCTP is not supported (TCP and UDP are)",
                        p.port
                    ),
                ));
            }
            if p.port == 0
                || p.target_port == Some(0)
                || p.node_port == Some(0)
                || self.health_check_node_port == Some(0)
            {
                return Err(invalid(
                    field,
                    format!("service {who}: port numbers must not be 0"),
                ));
            }
            if seen.contains(&(p.protocol, p.port)) {
                return Err(invalid(
                    field,
                    format!(
                        "service {who}: port {}/{:?} is listed twice",
                        p.port, p.protocol
                    ),
                ));
            }
            seen.push((p.protocol, p.port));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The node's name (as in Kubernetes).
    pub name: String,
    /// The node's topology zone (`topology.kubernetes.io/zone`), for EndpointSlice zone hints;
    /// in Kubernetes mode the Node's label, when it has one, wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// The node's pod CIDR; pods get addresses from it.
    pub pod_cidr: Ipv4Net,
    /// The pods' default gateway, answered by the switch itself. Default: first host address.
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
    /// MTU given to pod interfaces.
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    /// Where IPAM leases and attachment records live; survives restarts.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
}

fn default_mtu() -> u32 {
    1450
}
fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// The admin API's unix socket (HTTP/JSON), created with mode 0600.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// TCP address for `/metrics`, `/healthz` and `/readyz` (e.g. "0.0.0.0:9109"). Off when
    /// unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_address: Option<std::net::SocketAddr>,
}

fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            socket: default_socket(),
            metrics_address: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatapathConfig {
    /// Datapath worker threads. Each reads its own queue of every multi-queue TAP and its own
    /// SO_REUSEPORT underlay socket, so a node's flows spread over that many cores.
    #[serde(default = "default_workers")]
    pub workers: u32,
    /// TAP offloads (IFF_VNET_HDR with checksum and TSO): one read is a TCP super-frame.
    #[serde(default = "default_true")]
    pub offload: bool,
    /// Microseconds a worker keeps polling after its last packet before it sleeps: the answer
    /// to a packet usually comes back within one round trip, and catching it awake saves the
    /// wake-up (tens of microseconds on a VM) twice per round trip. 0 never spins. A window
    /// longer than the gaps in the traffic (tens of milliseconds and up) keeps the worker
    /// polling all the time, as OVS-DPDK's PMD threads do: the lowest latency (lab ping 0.12 ms
    /// instead of 0.27) for a core per worker.
    #[serde(default = "default_busy_poll")]
    pub busy_poll_us: u32,
    /// CPUs the workers are pinned to, worker i on `cpus[i % len]` (empty: not pinned, the
    /// default). For a core set aside for the datapath, as OVS-DPDK's `pmd-cpu-mask` and
    /// kubelet's `reservedSystemCPUs` do together: a pinned worker owns its core, so it spins
    /// its whole `busy_poll_us` window even during bulk transfers (an unpinned one cuts it
    /// short to leave the core to the pods). Pods must be kept off these CPUs, or they share
    /// them with a polling worker.
    #[serde(default)]
    pub cpus: Vec<u32>,
}

/// The highest CPU number `datapath.cpus` takes (the size of the kernel's default cpu_set_t).
pub const MAX_CPU: u32 = 1023;

/// The longest busy-poll window, one second: longer would only mean a worker that never sleeps
/// once it has seen a packet, which a second already is for any live traffic.
pub const MAX_BUSY_POLL_US: u32 = 1_000_000;

fn default_busy_poll() -> u32 {
    200
}

/// The most datapath workers: a TAP has at most 256 queues, and more threads than cores only
/// take turns.
pub const MAX_WORKERS: u32 = 64;

fn default_workers() -> u32 {
    1
}
fn default_true() -> bool {
    true
}

impl Default for DatapathConfig {
    fn default() -> Self {
        DatapathConfig {
            workers: default_workers(),
            offload: true,
            busy_poll_us: default_busy_poll(),
            cpus: Vec::new(),
        }
    }
}

/// What pods are told about DNS in the CNI result (as kubelet would write resolv.conf).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// The cluster DNS server address given to pods. Empty: no nameserver in the result.
    #[serde(default)]
    pub nameservers: Vec<IpAddr>,
    /// The cluster domain.
    #[serde(default = "default_domain")]
    pub cluster_domain: String,
    /// Answer DNS queries to the `nameservers` addresses at the switch. Turn off for clusters
    /// that keep CoreDNS (the addresses are then ordinary Services).
    #[serde(default = "default_true")]
    pub answer: bool,
    /// Where the node's upstream resolvers for other names are read from.
    #[serde(default = "default_resolv_conf")]
    pub resolv_conf: PathBuf,
    /// Upstream resolvers instead of those in `resolv_conf`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstreams: Vec<std::net::SocketAddr>,
}

fn default_resolv_conf() -> PathBuf {
    PathBuf::from("/etc/resolv.conf")
}

fn default_domain() -> String {
    "cluster.local".into()
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            cluster_domain: default_domain(),
            answer: true,
            resolv_conf: default_resolv_conf(),
            upstreams: Vec::new(),
        }
    }
}

/// The VXLAN overlay to other nodes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OverlayConfig {
    /// This node's underlay address: VXLAN is sent from it and received on it. Required when
    /// there are peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay_ip: Option<IpAddr>,
    /// UDP port of VXLAN (8472 as flannel and Linux's default; 4789 is the IANA port).
    #[serde(default = "default_vxlan_port")]
    pub port: u16,
    /// VXLAN network identifier (flannel uses 1).
    #[serde(default = "default_vni")]
    pub vni: u32,
    /// This node's VTEP MAC, the inner destination MAC peers use. Default: derived from the
    /// underlay address (0e:58 + IPv4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep_mac: Option<String>,
    /// MTU of the underlay path; pod packets larger than this minus 50 cannot cross.
    #[serde(default = "default_underlay_mtu")]
    pub underlay_mtu: u32,
}

fn default_vxlan_port() -> u16 {
    8472
}
fn default_vni() -> u32 {
    1
}
fn default_underlay_mtu() -> u32 {
    1500
}

impl Default for OverlayConfig {
    fn default() -> Self {
        OverlayConfig {
            underlay_ip: None,
            port: default_vxlan_port(),
            vni: default_vni(),
            vtep_mac: None,
            underlay_mtu: default_underlay_mtu(),
        }
    }
}

/// A peer node: where its pods live and how to reach it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeerSpec {
    pub name: String,
    pub underlay_ip: IpAddr,
    /// Its VTEP MAC (for a flannel node: the MAC of flannel.1, from the
    /// flannel.alpha.coreos.com/backend-data annotation).
    pub vtep_mac: String,
    pub pod_cidrs: Vec<Ipv4Net>,
    /// The peer takes VXLAN remote checksum offload (RCO): inner TCP/UDP checksums may be sent
    /// partial, so neither end sums the payload. True for vswitch nodes; a Linux VXLAN device
    /// takes it only with `remcsumrx`, so leave it off for flannel nodes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub remote_checksum: bool,
}

impl PeerSpec {
    /// Checks one peer; `field` is where it sits (e.g. `peers[2]`).
    pub fn validate(&self, field: &'static str) -> Result<[u8; 6], ConfigError> {
        if self.name.is_empty() || self.name.len() > 253 {
            return Err(invalid(field, "name must be 1 to 253 characters"));
        }
        let mac = parse_mac(&self.vtep_mac).ok_or_else(|| {
            invalid(
                field,
                format!(
                    "peer {}: vtep_mac {:?} is not a MAC like 0e:58:c0:a8:64:02",
                    self.name, self.vtep_mac
                ),
            )
        })?;
        if mac[0] & 1 == 1 || mac == [0; 6] {
            return Err(invalid(
                field,
                format!("peer {}: vtep_mac must be a unicast MAC", self.name),
            ));
        }
        if self.pod_cidrs.is_empty() {
            return Err(invalid(
                field,
                format!("peer {}: pod_cidrs is empty", self.name),
            ));
        }
        for c in &self.pod_cidrs {
            if *c != c.trunc() {
                return Err(invalid(
                    field,
                    format!("peer {}: pod CIDR {c} has host bits set", self.name),
                ));
            }
        }
        Ok(mac)
    }
}

/// Parses `aa:bb:cc:dd:ee:ff` (or with dashes).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for b in out.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// The VTEP MAC derived from an underlay address when none is configured.
pub fn default_vtep_mac(underlay: IpAddr) -> [u8; 6] {
    match underlay {
        IpAddr::V4(a) => {
            let o = a.octets();
            [0x0e, 0x58, o[0], o[1], o[2], o[3]]
        }
        IpAddr::V6(a) => {
            let o = a.octets();
            [0x0e, 0x58, o[12], o[13], o[14], o[15]]
        }
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates config text.
    /// [`Config::load`], except that in Kubernetes mode `node.pod_cidr` may be left out, as
    /// flannel takes a node's subnet from its Node object: then `ask` is given the
    /// `[kubernetes]` settings and `node.name` and answers the node's pod CIDR (or why not).
    pub fn load_asking_pod_cidr(
        path: &Path,
        ask: impl FnOnce(&KubernetesConfig, &str) -> Result<Ipv4Net, String>,
    ) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let Ok(mut table) = toml::from_str::<toml::Table>(&text) else {
            return Config::load(path);
        };
        let k8s = table
            .get("kubernetes")
            .cloned()
            .and_then(|v| v.try_into::<KubernetesConfig>().ok())
            .filter(|k| k.enabled);
        let node = table.get_mut("node").and_then(|n| n.as_table_mut());
        let (Some(k8s), Some(node)) = (k8s, node) else {
            return Config::load(path);
        };
        let name = node.get("name").and_then(|n| n.as_str());
        let (Some(name), false) = (name, node.contains_key("pod_cidr")) else {
            return Config::load(path);
        };
        let cidr = ask(&k8s, name).map_err(|why| {
            invalid(
                "node.pod_cidr",
                format!("not set, and not taken from the Node object: {why}"),
            )
        })?;
        node.insert("pod_cidr".into(), cidr.to_string().into());
        let text = toml::to_string(&table).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            e => e,
        })
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Static Services' endpoints that this switch cannot serve as written, each as a line to
    /// log: an endpoint whose `node` is neither this node nor a peer (a traffic policy Local
    /// misjudges it), or whose address is in no pod CIDR the switch knows and is no node's own
    /// (its packets go to the node's stack to be routed, if they go anywhere). Valid config
    /// still: an endpoint outside the cluster is allowed, but pasted examples are caught.
    pub fn endpoint_warnings(&self) -> Vec<String> {
        let known_node =
            |name: &str| name == self.node.name || self.peers.iter().any(|p| p.name == name);
        let known_ip = |ip: IpAddr| match ip {
            IpAddr::V4(v4) => {
                self.node.pod_cidr.contains(&v4)
                    || self.overlay.underlay_ip == Some(ip)
                    || self
                        .peers
                        .iter()
                        .any(|p| p.underlay_ip == ip || p.pod_cidrs.iter().any(|c| c.contains(&v4)))
            }
            IpAddr::V6(_) => false,
        };
        let mut out = Vec::new();
        for svc in &self.services {
            for ep in &svc.endpoints {
                let who = format!("Service {}/{}: endpoint {}", svc.namespace, svc.name, ep.ip);
                if let Some(node) = ep.node.as_deref().filter(|n| !known_node(n)) {
                    out.push(format!(
                        "{who} is on node {node:?}, which is neither this node ({}) nor one of \
                         its peers",
                        self.node.name
                    ));
                }
                if !known_ip(ep.ip) {
                    out.push(format!(
                        "{who} is in no pod CIDR this switch knows (its own {} or a peer's) and \
                         is no node's address: connections to it leave through the node's stack",
                        self.node.pod_cidr
                    ));
                }
            }
        }
        out
    }

    /// Checks every field; the error names the first field that is wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let n = &self.node;
        if n.name.is_empty() || n.name.len() > 253 {
            return Err(invalid("node.name", "must be 1 to 253 characters"));
        }
        if n.pod_cidr != n.pod_cidr.trunc() {
            return Err(invalid(
                "node.pod_cidr",
                format!(
                    "{} has host bits set; did you mean {}?",
                    n.pod_cidr,
                    n.pod_cidr.trunc()
                ),
            ));
        }
        if n.pod_cidr.prefix_len() > 29 {
            return Err(invalid(
                "node.pod_cidr",
                format!("{} is too small: use a /29 or larger", n.pod_cidr),
            ));
        }
        let gw = self.gateway();
        if !n.pod_cidr.contains(&gw) || gw == n.pod_cidr.network() || gw == n.pod_cidr.broadcast() {
            return Err(invalid(
                "node.gateway",
                format!("{gw} is not a host address of node.pod_cidr {}", n.pod_cidr),
            ));
        }
        if !(576..=65_535).contains(&n.mtu) {
            return Err(invalid(
                "node.mtu",
                format!("{} is out of range 576..=65535", n.mtu),
            ));
        }
        if !n.state_dir.is_absolute() {
            return Err(invalid("node.state_dir", "must be an absolute path"));
        }
        if !self.admin.socket.is_absolute() {
            return Err(invalid("admin.socket", "must be an absolute path"));
        }
        if !(1..=MAX_WORKERS).contains(&self.datapath.workers) {
            return Err(invalid(
                "datapath.workers",
                format!(
                    "{}: must be between 1 and {MAX_WORKERS} (one TAP queue and one underlay \
                     socket each)",
                    self.datapath.workers
                ),
            ));
        }
        if self.datapath.busy_poll_us > MAX_BUSY_POLL_US {
            return Err(invalid(
                "datapath.busy_poll_us",
                format!(
                    "{}: at most {MAX_BUSY_POLL_US} microseconds",
                    self.datapath.busy_poll_us
                ),
            ));
        }
        if let Some(c) = self.datapath.cpus.iter().find(|&&c| c > MAX_CPU) {
            return Err(invalid(
                "datapath.cpus",
                format!("CPU {c}: CPU numbers go up to {MAX_CPU}"),
            ));
        }
        let o = &self.overlay;
        if o.port == 0 {
            return Err(invalid("overlay.port", "must not be 0"));
        }
        if o.vni >= 1 << 24 {
            return Err(invalid(
                "overlay.vni",
                format!("{} does not fit in 24 bits", o.vni),
            ));
        }
        if let Some(m) = &o.vtep_mac {
            match parse_mac(m) {
                Some(b) if b[0] & 1 == 0 && b != [0; 6] => {}
                _ => {
                    return Err(invalid(
                        "overlay.vtep_mac",
                        format!("{m:?} is not a unicast MAC like 0e:58:c0:a8:64:01"),
                    ))
                }
            }
        }
        if !(1280..=65_535).contains(&o.underlay_mtu) {
            return Err(invalid(
                "overlay.underlay_mtu",
                format!("{} is out of range 1280..=65535", o.underlay_mtu),
            ));
        }
        if !self.peers.is_empty() {
            if o.underlay_ip.is_none() {
                return Err(invalid(
                    "overlay.underlay_ip",
                    "is required when peers are configured",
                ));
            }
            if n.mtu + 50 > o.underlay_mtu {
                return Err(invalid(
                    "node.mtu",
                    format!(
                        "{} is larger than overlay.underlay_mtu - 50 ({}): pod packets would not fit in VXLAN",
                        n.mtu,
                        o.underlay_mtu - 50
                    ),
                ));
            }
        }
        self.validate_peers()?;
        let h = &self.host;
        if h.enabled
            && (h.interface.is_empty()
                || h.interface.len() > 15
                || h.interface.contains(['/', ' ', ':']))
        {
            return Err(invalid(
                "host.interface",
                format!("{:?} is not an interface name", h.interface),
            ));
        }
        if let Some(r) = h
            .routes
            .iter()
            .find(|r| matches!(r, IpNet::V6(_)) || **r != r.trunc())
        {
            return Err(invalid(
                "host.routes",
                format!("{r} must be an IPv4 network without host bits"),
            ));
        }
        let nat = &self.nat;
        for (name, v) in [
            ("nat.tcp_established_timeout", nat.tcp_established_timeout),
            ("nat.tcp_transitory_timeout", nat.tcp_transitory_timeout),
            ("nat.udp_timeout", nat.udp_timeout),
        ] {
            if v == 0 {
                return Err(invalid(name, "must be at least 1 second"));
            }
        }
        if !(1024..=16_777_216).contains(&nat.conntrack_max) {
            return Err(invalid(
                "nat.conntrack_max",
                format!("{} is out of range 1024..=16777216", nat.conntrack_max),
            ));
        }
        for c in &nat.node_port_addresses {
            if *c != c.trunc() {
                return Err(invalid(
                    "nat.node_port_addresses",
                    format!("{c} has host bits set; did you mean {}?", c.trunc()),
                ));
            }
            if !matches!(c, IpNet::V4(_)) {
                return Err(invalid(
                    "nat.node_port_addresses",
                    format!("{c}: NodePorts are served on IPv4 addresses only"),
                ));
            }
        }
        for (i, svc) in self.services.iter().enumerate() {
            svc.validate("services")?;
            if self.services[..i]
                .iter()
                .any(|o| o.namespace == svc.namespace && o.name == svc.name)
            {
                return Err(invalid(
                    "services",
                    format!("service {}/{} is listed twice", svc.namespace, svc.name),
                ));
            }
        }
        self.kubernetes.validate()?;
        self.policy.validate()?;
        self.egress.validate()?;
        let d = &self.dns.cluster_domain;
        if d.is_empty() || d.starts_with('.') || d.ends_with('.') || d.contains("..") {
            return Err(invalid(
                "dns.cluster_domain",
                format!("{d:?} is not a domain name like cluster.local"),
            ));
        }
        Ok(())
    }

    /// Checks the peers against each other and this node.
    pub fn validate_peers(&self) -> Result<(), ConfigError> {
        for (i, p) in self.peers.iter().enumerate() {
            p.validate("peers")?;
            if self.peers[..i].iter().any(|q| q.name == p.name) {
                return Err(invalid("peers", format!("peer {} is listed twice", p.name)));
            }
            if p.name == self.node.name {
                return Err(invalid("peers", format!("peer {} is this node", p.name)));
            }
            if Some(p.underlay_ip) == self.overlay.underlay_ip {
                return Err(invalid(
                    "peers",
                    format!(
                        "peer {}: underlay_ip {} is this node's",
                        p.name, p.underlay_ip
                    ),
                ));
            }
            for c in &p.pod_cidrs {
                let own = self.node.pod_cidr;
                if c.contains(&own.network()) || own.contains(&c.network()) {
                    return Err(invalid(
                        "peers",
                        format!("peer {}: pod CIDR {c} overlaps this node's {own}", p.name),
                    ));
                }
            }
        }
        Ok(())
    }

    /// This node's VTEP MAC.
    pub fn vtep_mac(&self) -> [u8; 6] {
        self.overlay
            .vtep_mac
            .as_deref()
            .and_then(parse_mac)
            .unwrap_or_else(|| {
                default_vtep_mac(
                    self.overlay
                        .underlay_ip
                        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                )
            })
    }

    /// The pods' gateway address.
    pub fn gateway(&self) -> Ipv4Addr {
        self.node.gateway.unwrap_or_else(|| {
            let net = u32::from(self.node.pod_cidr.network());
            Ipv4Addr::from(net.wrapping_add(1))
        })
    }

    /// Whether egress translation is on: as configured, else on in Kubernetes mode only.
    pub fn egress_on(&self) -> bool {
        self.egress.enabled.unwrap_or(self.kubernetes.enabled)
    }

    /// The pod CIDR as a generic network (for types that carry IPv4 or IPv6).
    pub fn pod_net(&self) -> IpNet {
        IpNet::V4(self.node.pod_cidr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "[node]\nname = \"n1\"\npod_cidr = \"10.244.1.0/24\"\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MIN).unwrap();
        assert_eq!(c.gateway(), Ipv4Addr::new(10, 244, 1, 1));
        assert_eq!(c.node.mtu, 1450);
        assert_eq!(c.admin.socket, PathBuf::from(DEFAULT_SOCKET));
        assert!(c.datapath.offload);
    }

    #[test]
    fn endpoints_on_unknown_nodes_or_outside_every_known_cidr_are_named() {
        let text = format!(
            "{MIN}[overlay]\nunderlay_ip = \"192.168.100.1\"\n\
             [[peers]]\nname = \"n2\"\nunderlay_ip = \"192.168.100.2\"\n\
             vtep_mac = \"0e:58:c0:a8:64:02\"\npod_cidrs = [\"10.244.2.0/24\"]\n\
             [[services]]\nnamespace = \"default\"\nname = \"web\"\n\
             cluster_ips = [\"10.96.0.20\"]\nports = [{{ port = 80 }}]\n\
             endpoints = [{{ ip = \"10.244.1.5\", node = \"n1\" }}, \
             {{ ip = \"10.244.2.5\", node = \"n2\" }}, {{ ip = \"192.168.100.2\" }}, \
             {{ ip = \"10.244.2.6\", node = \"node-2\" }}, {{ ip = \"10.244.9.5\" }}]\n"
        );
        let c = Config::parse(&text).unwrap();
        let w = c.endpoint_warnings();
        assert_eq!(w.len(), 2, "{w:#?}");
        assert!(
            w[0].starts_with(
                "Service default/web: endpoint 10.244.2.6 is on node \"node-2\", \
                              which is neither this node (n1) nor one of its peers"
            ),
            "{}",
            w[0]
        );
        assert!(
            w[1].starts_with("Service default/web: endpoint 10.244.9.5 is in no pod CIDR"),
            "{}",
            w[1]
        );
    }

    #[test]
    fn node_port_addresses_take_cidrs_and_bad_ones_name_the_field() {
        let c = Config::parse(&format!(
            "{MIN}[nat]\nnode_port_addresses = [\"10.0.0.0/8\", \"192.168.1.0/24\"]\n"
        ))
        .unwrap();
        assert_eq!(c.nat.node_port_addresses.len(), 2);
        assert!(Config::parse(MIN)
            .unwrap()
            .nat
            .node_port_addresses
            .is_empty());
        for bad in ["\"10.0.0.1/8\"", "\"fd00::/64\""] {
            assert_eq!(
                field_of(&format!("{MIN}[nat]\nnode_port_addresses = [{bad}]\n")),
                "nat.node_port_addresses"
            );
        }
        let msg = field_of(&format!("{MIN}[nat]\nnode_port_addresses = [\"eth0\"]\n"));
        assert!(msg.contains("node_port_addresses"), "{msg}");
    }

    #[test]
    fn endpoints_may_carry_their_own_target_ports() {
        let text = format!(
            "{MIN}[[services]]\nnamespace = \"default\"\nname = \"web\"\n\
             cluster_ips = [\"10.96.0.20\"]\n\
             ports = [{{ name = \"http\", port = 80, target_port = 8080 }}, {{ port = 9 }}]\n\
             endpoints = [{{ ip = \"10.244.1.5\" }}, \
             {{ ip = \"10.244.1.6\", ports = {{ http = 8081 }} }}]\n"
        );
        let c = Config::parse(&text).unwrap();
        let s = &c.services[0];
        let (http, nine) = (&s.ports[0], &s.ports[1]);
        // Without per-endpoint ports: every Service port at its target port, as before.
        assert_eq!(s.endpoints[0].target_port(http), Some(8080));
        assert_eq!(s.endpoints[0].target_port(nine), Some(9));
        // With them: its own number, and nothing for a port it does not list.
        assert_eq!(s.endpoints[1].target_port(http), Some(8081));
        assert_eq!(s.endpoints[1].target_port(nine), None);
    }

    fn field_of(text: &str) -> String {
        match Config::parse(text) {
            Err(ConfigError::Invalid { field, .. }) => field.to_string(),
            Err(ConfigError::Parse { message, .. }) => message,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            field_of("[node]\nname = \"n1\"\npod_cidr = \"10.244.1.1/24\"\n"),
            "node.pod_cidr"
        );
        assert_eq!(
            field_of("[node]\nname = \"n1\"\npod_cidr = \"10.244.1.0/30\"\n"),
            "node.pod_cidr"
        );
        assert_eq!(
            field_of(&format!("{MIN}gateway = \"10.9.0.1\"\n")),
            "node.gateway"
        );
        assert_eq!(field_of(&format!("{MIN}mtu = 100\n")), "node.mtu");
        assert_eq!(
            field_of(&format!("{MIN}state_dir = \"rel\"\n")),
            "node.state_dir"
        );
        assert_eq!(
            field_of(&format!("{MIN}[datapath]\nworkers = 0\n")),
            "datapath.workers"
        );
        assert_eq!(
            field_of(&format!("{MIN}[datapath]\nworkers = 65\n")),
            "datapath.workers"
        );
        assert_eq!(
            field_of(&format!("{MIN}[datapath]\nbusy_poll_us = 1000001\n")),
            "datapath.busy_poll_us"
        );
        assert_eq!(
            field_of(&format!("{MIN}[datapath]\ncpus = [0, 4096]\n")),
            "datapath.cpus"
        );
        assert_eq!(
            field_of(&format!("{MIN}[dns]\ncluster_domain = \".x\"\n")),
            "dns.cluster_domain"
        );
        let unknown = field_of(&format!("{MIN}colour = \"red\"\n"));
        assert!(unknown.contains("colour"), "{unknown}");
        let peer = "[[peers]]\nname = \"n2\"\nunderlay_ip = \"192.168.1.2\"\nvtep_mac = \"0e:58:c0:a8:01:02\"\npod_cidrs = [\"10.244.2.0/24\"]\n";
        assert_eq!(field_of(&format!("{MIN}{peer}")), "overlay.underlay_ip");
        let ov = "[overlay]\nunderlay_ip = \"192.168.1.1\"\n";
        assert!(Config::parse(&format!("{MIN}{ov}{peer}")).is_ok());
        assert_eq!(
            field_of(&format!("{MIN}mtu = 1480\n{ov}{peer}")),
            "node.mtu"
        );
        assert_eq!(
            field_of(&format!("{MIN}[overlay]\nvni = 16777216\n")),
            "overlay.vni"
        );
        assert_eq!(
            field_of(&format!(
                "{MIN}[overlay]\nvtep_mac = \"01:00:00:00:00:01\"\n"
            )),
            "overlay.vtep_mac"
        );
        assert_eq!(
            field_of(&format!(
                "{MIN}{ov}{}",
                peer.replace("10.244.2.0/24", "10.244.0.0/16")
            )),
            "peers"
        );
        assert_eq!(
            field_of(&format!("{MIN}{ov}{}", peer.replace("0e:58", "zz:58"))),
            "peers"
        );
        assert_eq!(field_of(&format!("{MIN}{ov}{peer}{peer}")), "peers");
        let bad_cidr = field_of("[node]\nname = \"n1\"\npod_cidr = \"10.244.1.0/33\"\n");
        assert!(bad_cidr.contains("pod_cidr"), "{bad_cidr}");
    }

    #[test]
    fn egress_section() {
        let c = Config::parse(MIN).unwrap();
        assert!(!c.egress_on(), "off in static mode unless asked for");
        assert_eq!(c.egress.per_pod(), EGRESS_MAX_PER_POD);
        assert!(!toml::to_string(&c).unwrap().contains("egress"));
        let k = Config::parse(&format!("{MIN}[kubernetes]\nenabled = true\n")).unwrap();
        assert!(k.egress_on(), "on in Kubernetes mode");
        let off = Config::parse(&format!(
            "{MIN}[kubernetes]\nenabled = true\n[egress]\nenabled = false\n"
        ))
        .unwrap();
        assert!(!off.egress_on());
        let e = Config::parse(&format!(
            "{MIN}[egress]\nenabled = true\nno_masquerade = [\"192.168.0.0/16\"]\n\
             max_connections_per_pod = 10\nmax_connections = 20\n"
        ))
        .unwrap();
        assert!(e.egress_on());
        assert_eq!(
            e.egress.no_masquerade,
            vec!["192.168.0.0/16".parse().unwrap()]
        );
        assert_eq!((e.egress.per_pod(), e.egress.total()), (10, 20));
        for (bad, field) in [
            (
                "no_masquerade = [\"192.168.1.1/16\"]",
                "egress.no_masquerade",
            ),
            (
                "max_connections_per_pod = 0",
                "egress.max_connections_per_pod",
            ),
            ("max_connections = 0", "egress.max_connections"),
            (
                "max_connections = 5\nmax_connections_per_pod = 6",
                "egress.max_connections_per_pod",
            ),
        ] {
            assert_eq!(field_of(&format!("{MIN}[egress]\n{bad}\n")), field, "{bad}");
        }
        assert!(field_of(&format!("{MIN}[egress]\nenable = true\n")).contains("unknown field"));
    }

    #[test]
    fn in_kubernetes_mode_a_missing_pod_cidr_is_asked_for() {
        let dir = std::env::temp_dir().join(format!("vswitch-conf-ask-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        let k8s = "[node]\nname = \"n7\"\n[kubernetes]\nenabled = true\nnode_name = \"w7\"\n";
        std::fs::write(&path, k8s).unwrap();
        let c = Config::load_asking_pod_cidr(&path, |k, node| {
            assert_eq!((k.node_name.as_deref(), node), (Some("w7"), "n7"));
            Ok("10.244.7.0/24".parse().unwrap())
        })
        .unwrap();
        assert_eq!(c.node.pod_cidr.to_string(), "10.244.7.0/24");
        assert_eq!(c.gateway().to_string(), "10.244.7.1");
        // The answer is validated like a written one, and a refusal names the field.
        let e = Config::load_asking_pod_cidr(&path, |_, _| Ok("10.244.7.0/30".parse().unwrap()))
            .unwrap_err();
        assert!(e.to_string().contains("node.pod_cidr"), "{e}");
        let e = Config::load_asking_pod_cidr(&path, |_, _| Err("no API".into())).unwrap_err();
        assert!(e.to_string().starts_with("node.pod_cidr: not set"), "{e}");
        // A written pod CIDR, or static mode, never asks.
        for text in [
            k8s.replace(
                "name = \"n7\"\n",
                "name = \"n7\"\npod_cidr = \"10.1.0.0/24\"\n",
            ),
            "[node]\nname = \"n7\"\npod_cidr = \"10.1.0.0/24\"\n".to_string(),
        ] {
            std::fs::write(&path, text).unwrap();
            let c = Config::load_asking_pod_cidr(&path, |_, _| panic!("asked")).unwrap();
            assert_eq!(c.node.pod_cidr.to_string(), "10.1.0.0/24");
        }
        // Static mode without one is the usual error.
        std::fs::write(&path, "[node]\nname = \"n7\"\n").unwrap();
        let e = Config::load_asking_pod_cidr(&path, |_, _| panic!("asked")).unwrap_err();
        assert!(e.to_string().contains("pod_cidr"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn kubernetes_section() {
        let c = Config::parse(MIN).unwrap();
        assert!(!c.kubernetes.enabled, "static mode is the default");
        let k = Config::parse(&format!(
            "{MIN}[kubernetes]\nenabled = true\nkubeconfig = \"/etc/k.conf\"\nnode_name = \"w1\"\n"
        ))
        .unwrap();
        assert!(k.kubernetes.enabled);
        assert_eq!(k.kubernetes.debounce_ms, 10);
        assert_eq!(
            field_of(&format!("{MIN}[kubernetes]\nnode_name = \"\"\n")),
            "kubernetes.node_name"
        );
        assert_eq!(
            field_of(&format!("{MIN}[kubernetes]\ndebounce_ms = 0\n")),
            "kubernetes.debounce_ms"
        );
        assert_eq!(
            field_of(&format!(
                "{MIN}[kubernetes]\ndebounce_ms = 50\nmax_delay_ms = 40\n"
            )),
            "kubernetes.max_delay_ms"
        );
        // A default section is not written out, so rendered configs stay as they were.
        assert!(!toml::to_string(&c).unwrap().contains("kubernetes"));
    }
}
