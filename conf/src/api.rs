//! The admin API between vswitchd and its clients (the CNI plugin, vswitchctl, the lab).
//!
//! HTTP/1.1 with JSON bodies over a unix socket. Every endpoint and its request/response types
//! are declared here once. Errors come back as [`ApiError`] with a CNI error code, so the plugin
//! can hand them to the runtime unchanged.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub const PATH_CNI_ADD: &str = "/v1/cni/add";
pub const PATH_CNI_DEL: &str = "/v1/cni/del";
pub const PATH_CNI_CHECK: &str = "/v1/cni/check";
pub const PATH_CNI_GC: &str = "/v1/cni/gc";
pub const PATH_STATUS: &str = "/v1/status";
pub const PATH_PORTS: &str = "/v1/ports";
/// DELETE `/v1/ports/{id}` releases a port that is no longer live (its pod's namespace went
/// away while vswitchd was down, and the runtime sent no DEL since): its address, record and
/// device. A live port is refused: the runtime's CNI DEL releases it.
pub const PATH_PORT_PREFIX: &str = "/v1/ports/";
/// GET lists, POST adds or replaces one peer (by name).
pub const PATH_PEERS: &str = "/v1/peers";
/// GET: Service frontends and the backends in use.
pub const PATH_SERVICES: &str = "/v1/services";
/// GET: connection tracking entries; query `ip=` (any side) and `port=` filter.
pub const PATH_CONNTRACK: &str = "/v1/conntrack";
/// `GET`: egress translation's connections and counters.
pub const PATH_EGRESS: &str = "/v1/egress";
/// POST a [`TraceRequest`]: a synthetic packet through the pipeline, without side effects.
pub const PATH_TRACE: &str = "/v1/trace";
/// DELETE removes the named peer: `/v1/peers/{name}`.
pub const PATH_PEER_PREFIX: &str = "/v1/peers/";
/// GET: a live pcapng stream (chunked) until the client disconnects or `count=` packets;
/// query `point=` (comma-separated), `port=`, `pod=NS/NAME`, `direction=in|out|both`,
/// `filter=` (tcpdump syntax), `count=`, `snaplen=`. The session's id is in the
/// [`CAPTURE_SESSION_HEADER`] response header.
pub const PATH_CAPTURE: &str = "/v1/capture";
/// GET: running and recently ended capture sessions with their counters.
pub const PATH_CAPTURE_SESSIONS: &str = "/v1/capture/sessions";
/// GET: NetworkPolicy as this switch applies it ([`PoliciesResponse`]); query `pod=NS/NAME`
/// for one local pod.
pub const PATH_POLICIES: &str = "/v1/policies";
/// `POST`: a new vswitchd on this node asks the running one to let go of the node's devices
/// and sockets and exit (an upgrade without an outage); answered once they are released.
pub const PATH_HANDOVER: &str = "/v1/handover";
/// `GET`: the peers and Services a running vswitchd forwards with ([`ClusterTables`]), read by
/// a new one before it asks for the handover.
pub const PATH_HANDOVER_TABLES: &str = "/v1/handover/tables";
/// `GET`: Kubernetes mode's watch ([`KubernetesResponse`]): counters, how long the first sync
/// took and how long endpoint changes took to reach the datapath; query `since_ms=T` (ms since
/// the Unix epoch) for the samples taken after T only. 404 when Kubernetes mode is off.
pub const PATH_KUBERNETES: &str = "/v1/kubernetes";
pub const CAPTURE_SESSION_HEADER: &str = "x-capture-session";

/// CNI error codes (CNI spec 1.1.0, "Error" section).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_NETCONF: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    pub const NOT_AVAILABLE_LIMITED: u32 = 51;
    /// Vendor codes start at 100.
    pub const INTERFACE_EXISTS: u32 = 100;
    pub const ADDRESSES_EXHAUSTED: u32 = 101;
    pub const CHECK_FAILED: u32 = 102;
    pub const NETNS_FAILURE: u32 = 103;
    /// The address or MAC the runtime asked for cannot be given (taken, or not in the pod
    /// network).
    pub const REQUESTED_UNAVAILABLE: u32 = 104;
    pub const INTERNAL: u32 = 110;
}

/// An error from the daemon: a CNI error code, a message, and details.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, thiserror::Error)]
#[error("{msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct ApiError {
    pub code: u32,
    pub msg: String,
    #[serde(default)]
    pub details: String,
}

impl ApiError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        ApiError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }
}

/// One attachment of a container to the network: CNI's (containerID, ifname) key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AddRequest {
    pub container_id: String,
    /// Path of the pod's network namespace (CNI_NETNS).
    pub netns: PathBuf,
    /// Interface name inside the pod (CNI_IFNAME).
    pub ifname: String,
    /// Kubernetes pod namespace and name, from CNI_ARGS when the runtime gives them.
    #[serde(default)]
    pub pod_namespace: Option<String>,
    #[serde(default)]
    pub pod_name: Option<String>,
    /// The pod's labels (the netconf's `args.cni.labels`, CNI conventions), for NetworkPolicy.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// An address the runtime asks for (CNI_ARGS `IP=`, as podman's `--ip`): given if it is a
    /// free host address of the pod CIDR, else the ADD fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    /// A MAC address the runtime asks for (CNI_ARGS `MAC=`, as podman's `--mac-address`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The pod's hostPorts (the netconf's `runtimeConfig.portMappings`, the runtime's
    /// `portMappings` capability).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_mappings: Vec<PortMapping>,
}

/// One hostPort: connections and datagrams to `host_port` on the node's addresses (or on
/// `host_ip` alone) reach the pod at `container_port`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    /// "tcp" or "udp".
    pub protocol: String,
    /// The node address to listen on; None: every address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<Ipv4Addr>,
}

impl PortMapping {
    /// UDP (else TCP, the only other protocol a mapping can have).
    pub fn is_udp(&self) -> bool {
        self.protocol == "udp"
    }
}

impl std::fmt::Display for PortMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(ip) = self.host_ip {
            write!(f, "{ip}:")?;
        }
        write!(
            f,
            "{}->{}/{}",
            self.host_port, self.container_port, self.protocol
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Route {
    pub dst: IpNet,
    #[serde(default)]
    pub gw: Option<IpAddr>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Dns {
    #[serde(default)]
    pub nameservers: Vec<IpAddr>,
    #[serde(default)]
    pub domain: Option<String>,
    #[serde(default)]
    pub search: Vec<String>,
    #[serde(default)]
    pub options: Vec<String>,
}

/// What an ADD made: everything the CNI result reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AddResponse {
    pub ifname: String,
    pub mac: String,
    pub netns: PathBuf,
    /// The pod's address with the pod CIDR's prefix length.
    pub address: IpNet,
    pub gateway: IpAddr,
    pub mtu: u32,
    pub routes: Vec<Route>,
    pub dns: Dns,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DelRequest {
    pub container_id: String,
    pub ifname: String,
    /// May be absent or already gone: DEL still releases everything.
    #[serde(default)]
    pub netns: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckRequest {
    pub container_id: String,
    pub ifname: String,
    pub netns: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GcRequest {
    /// Attachments the runtime still uses; every other one is released.
    pub valid: Vec<Attachment>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GcResponse {
    pub released: Vec<Attachment>,
}

/// The answer to `POST` [`PATH_HANDOVER`]: the devices and sockets are released, and the
/// process that held them exits.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HandoverResponse {
    /// The old vswitchd's process ID.
    pub pid: u32,
    /// Milliseconds its datapath took to stop and let go.
    pub released_ms: u64,
}

/// The answer to `GET` [`PATH_HANDOVER_TABLES`]: the peers and Services a vswitchd forwards
/// with. In Kubernetes mode a new vswitchd reads them before it asks for the handover (so
/// their size never lengthens the gap in forwarding) and forwards with them until its own
/// first lists from the API are applied.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ClusterTables {
    pub peers: Vec<crate::config::PeerSpec>,
    /// Shared with the running tables: answering does not copy 10,000 Services.
    pub services: Vec<std::sync::Arc<crate::config::ServiceSpec>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub node: String,
    pub version: String,
    pub pod_cidr: IpNet,
    pub gateway: IpAddr,
    pub gateway_mac: String,
    pub ports: usize,
    pub ready: bool,
    /// The answering vswitchd's process ID (0 from a version that did not say).
    #[serde(default)]
    pub pid: u32,
    /// The node's settings that a path through the switch needs and that are wrong now, each
    /// with what it breaks (see [`crate::sysctl`]). Empty when all is well.
    #[serde(default)]
    pub warnings: Vec<crate::sysctl::NodeWarning>,
}

/// Packet and drop counters of one port. Drops are keyed by reason.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PortCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub drops: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PortInfo {
    pub id: u32,
    pub container_id: String,
    pub ifname: String,
    pub netns: PathBuf,
    #[serde(default)]
    pub pod: Option<String>,
    pub mac: String,
    pub ip: IpAddr,
    pub counters: PortCounters,
    /// The switch holds the port's TAP. False for a port it could not take back after a
    /// restart (its namespace is gone): the runtime's DEL or GC, or `vswitchctl release`,
    /// frees it.
    #[serde(default = "live_default")]
    pub live: bool,
    /// The pod's hostPorts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_ports: Vec<PortMapping>,
}

fn live_default() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PortsResponse {
    pub ports: Vec<PortInfo>,
    /// Drops not attributable to a port (e.g. a frame for a port that just went away).
    pub switch_drops: BTreeMap<String, u64>,
    /// The VXLAN underlay's counters (datagrams), when the overlay is on.
    #[serde(default)]
    pub underlay: Option<PortCounters>,
    /// The host port (the node's own interface into the switch), when it is on.
    #[serde(default)]
    pub host: Option<PortInfo>,
}

/// The overlay's settings and peers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeersResponse {
    pub underlay_ip: Option<IpAddr>,
    pub port: u16,
    pub vni: u32,
    pub vtep_mac: String,
    pub peers: Vec<crate::config::PeerSpec>,
}

/// One Service frontend as the datapath uses it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FrontendInfo {
    /// `namespace/name:port/PROTO`.
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: String,
    /// `ip:port` of each backend in use.
    pub backends: Vec<String>,
    #[serde(default)]
    pub session_affinity_timeout: Option<u32>,
}

/// One NodePort this node listens on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodePortInfo {
    pub node_port: u16,
    /// `TCP` or `UDP`.
    pub protocol: String,
    /// `namespace/name:port/PROTO` of the Service port.
    pub service: String,
    /// Where connections go: the ClusterIP, or this node's ready endpoints with
    /// `externalTrafficPolicy: Local` (none: connections are refused).
    pub destinations: Vec<String>,
    /// `externalTrafficPolicy: Local`: only this node's ready endpoints, reached from the
    /// client's own address where the return rule could be installed (else from the node's).
    pub local: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServicesResponse {
    pub frontends: Vec<FrontendInfo>,
    /// The node's NodePort listeners (none before they start, or without Services that have
    /// one).
    #[serde(default)]
    pub node_ports: Vec<NodePortInfo>,
}

/// One tracked connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConntrackInfo {
    pub protocol: String,
    /// `ip:port` of the client, the Service address it used, and the backend.
    pub client: String,
    pub service: String,
    pub backend: String,
    /// Hairpinned: the address the backend sees the client as.
    #[serde(default)]
    pub snat: Option<String>,
    pub state: String,
    pub expires_in_ms: u64,
    pub frontend: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConntrackResponse {
    pub entries: Vec<ConntrackInfo>,
    /// Entries before filtering.
    pub total: usize,
}

/// One flow of egress translation: a pod's connection to the outside, opened again from the
/// node's address.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EgressConnInfo {
    /// `TCP`, `UDP` or `ICMP` (echo).
    pub protocol: String,
    /// The pod's port, and its name where the runtime gave one.
    pub port: u32,
    #[serde(default)]
    pub pod: Option<String>,
    /// The pod's address and port (for ICMP, its echo identifier).
    pub pod_addr: std::net::SocketAddrV4,
    pub destination: std::net::SocketAddrV4,
    /// The node-side socket's address: what the outside sees.
    pub node_side: Option<std::net::SocketAddr>,
    /// Bytes from the pod to the outside, and back (payload).
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub age_ms: u64,
    pub state: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct EgressResponse {
    pub enabled: bool,
    pub connections: Vec<EgressConnInfo>,
    /// Counters since start: flows opened, refused, limits hit (`limit_pod`, `limit_node`),
    /// bytes each way, ...
    pub counters: BTreeMap<String, u64>,
}

/// Kubernetes mode's watch, as `GET /v1/kubernetes` gives it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct KubernetesResponse {
    /// All three table lists (Nodes, Services, EndpointSlices) completed once and the first
    /// tables were applied.
    pub synced: bool,
    /// From the start of the watch to the first applied tables, ms.
    #[serde(default)]
    pub sync_ms: Option<u64>,
    /// NetworkPolicies, Namespaces and Pods were listed and the first policy inputs applied.
    #[serde(default)]
    pub policy_synced: bool,
    /// From the start of the watch to then, ms.
    #[serde(default)]
    pub policy_sync_ms: Option<u64>,
    pub watch_errors: u64,
    pub relists: u64,
    /// Complete lists (first or relist) of Nodes, Services and EndpointSlices.
    #[serde(default)]
    pub table_lists: u64,
    /// Relists of those begun.
    #[serde(default)]
    pub table_relists: u64,
    /// Service tables converted (whether or not the result differed and was applied).
    #[serde(default)]
    pub service_rebuilds: u64,
    pub applies: u64,
    pub apply_errors: u64,
    /// Services and endpoints in the applied table.
    pub services: u64,
    pub endpoints: u64,
    /// Network programming latency, as kube-proxy measures it: from an EndpointSlice's
    /// `endpoints.kubernetes.io/last-change-trigger-time` annotation (set by the EndpointSlice
    /// controller when the change that caused it happened) to the moment the table holding the
    /// change was applied to the datapath.
    pub programming: ProgrammingLatency,
}

/// Network programming latencies: a summary of every sample since start, and the most recent
/// samples (at most [`ProgrammingLatency::KEPT`]) after the query's `since_ms`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ProgrammingLatency {
    /// Samples since start.
    pub count: u64,
    /// Over the kept samples, ms.
    #[serde(default)]
    pub p50_ms: Option<f64>,
    #[serde(default)]
    pub p99_ms: Option<f64>,
    #[serde(default)]
    pub max_ms: Option<f64>,
    /// `[applied at (ms since the epoch), latency (µs)]`, oldest first.
    #[serde(default)]
    pub samples: Vec<(u64, u64)>,
}

impl ProgrammingLatency {
    /// Samples vswitchd keeps.
    pub const KEPT: usize = 16_384;
}

/// The `q` quantile (0..=1) of `sorted` (ascending), nearest rank; None when empty.
pub fn quantile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// A capture session's counters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CaptureSessionInfo {
    pub id: u64,
    /// The request: points, port, direction and filter.
    pub request: String,
    pub running: bool,
    /// Packets that passed the points and the filter.
    pub matched: u64,
    /// Copies dropped because the session's queue was full (the reader was too slow).
    pub dropped: u64,
    /// Packets written to the stream.
    pub written: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CaptureSessionsResponse {
    pub sessions: Vec<CaptureSessionInfo>,
}

/// The rules of one policy that selects a pod, for one direction.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SelectingPolicy {
    /// `namespace/name`.
    pub policy: String,
    /// Each rule as a sentence (`from pods pod=b in the policy's namespace, TCP 80`); none:
    /// the policy admits nothing in this direction.
    pub rules: Vec<String>,
}

/// A local pod as NetworkPolicy sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PodPolicies {
    /// `namespace/name`.
    pub pod: String,
    pub port: u32,
    pub ip: IpAddr,
    pub labels: BTreeMap<String, String>,
    /// A policy selects it for ingress: only what one admits reaches it.
    pub isolated_ingress: bool,
    /// A policy selects it for egress: it reaches only what one admits.
    pub isolated_egress: bool,
    pub ingress: Vec<SelectingPolicy>,
    pub egress: Vec<SelectingPolicy>,
}

/// A NetworkPolicy in force.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PolicyInfo {
    /// `namespace/name`.
    pub name: String,
    /// Its pod selector (`{}`: every pod of its namespace).
    pub pod_selector: String,
    /// `Ingress`, `Egress` or both.
    pub types: Vec<String>,
}

/// `GET` [`PATH_POLICIES`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PoliciesResponse {
    /// The local pods (or the one asked for), by name.
    pub pods: Vec<PodPolicies>,
    /// Every policy in force, by name.
    pub policies: Vec<PolicyInfo>,
    /// Objects left out (a policy the API server would refuse, a manifest that does not
    /// parse), each with the reason.
    pub problems: Vec<String>,
}

/// Where a traced packet enters and what it is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TraceRequest {
    /// Sent by this pod (`namespace/name` or container ID)...
    #[serde(default)]
    pub pod: Option<String>,
    /// ...or from this port...
    #[serde(default)]
    pub port: Option<u32>,
    /// ...or arriving over VXLAN from this peer node.
    #[serde(default)]
    pub peer: Option<String>,
    /// Source address (default: the pod's own; required for a peer).
    #[serde(default)]
    pub src: Option<std::net::Ipv4Addr>,
    pub dst: std::net::Ipv4Addr,
    /// "tcp" (a SYN), "udp" or "icmp" (an echo request).
    #[serde(default = "default_trace_proto")]
    pub protocol: String,
    #[serde(default)]
    pub src_port: Option<u16>,
    #[serde(default)]
    pub dst_port: Option<u16>,
}

fn default_trace_proto() -> String {
    "tcp".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TraceResponse {
    /// Every decision, in order.
    pub steps: Vec<String>,
    /// What the switch would do with it.
    pub verdict: String,
}

/// The query of [`PATH_CAPTURE`], typed: what `vswitchctl capture` asks for and what the daemon
/// reads. Empty strings count as absent; numbers are checked for form here and for range by
/// the daemon (which knows its snap length limits).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaptureQuery {
    /// `NAMESPACE/NAME`, or `NAME` in `default`.
    pub pod: Option<String>,
    pub port: Option<u32>,
    /// Comma-separated capture points.
    pub point: Option<String>,
    /// `in`, `out` or `both`.
    pub direction: Option<String>,
    pub count: Option<u64>,
    /// 0 for the whole packet.
    pub snaplen: Option<usize>,
    /// tcpdump syntax, trimmed.
    pub filter: Option<String>,
}

/// A [`CaptureQuery`] parameter that is not what it should be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaptureQueryError {
    #[error("port={0:?} is not a port number")]
    Port(String),
    #[error("count={0:?} is not a number")]
    Count(String),
    #[error("snaplen={0:?} is not a number")]
    Snaplen(String),
}

impl CaptureQuery {
    /// Reads decoded `key=value` pairs (a later key wins; unknown keys are ignored).
    pub fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<CaptureQuery, CaptureQueryError> {
        let text = |v: &str| Some(v.to_string()).filter(|v| !v.is_empty());
        let mut q = CaptureQuery::default();
        for (k, v) in pairs {
            match k {
                "pod" => q.pod = text(v),
                "port" => q.port = Some(v.parse().map_err(|_| CaptureQueryError::Port(v.into()))?),
                "point" => q.point = text(v),
                "direction" => q.direction = text(v),
                "count" => {
                    q.count = Some(v.parse().map_err(|_| CaptureQueryError::Count(v.into()))?)
                }
                "snaplen" => {
                    q.snaplen = Some(
                        v.parse()
                            .map_err(|_| CaptureQueryError::Snaplen(v.into()))?,
                    )
                }
                "filter" => q.filter = text(v.trim()),
                _ => {}
            }
        }
        Ok(q)
    }

    /// The request path: [`PATH_CAPTURE`] with this query, percent-encoded.
    pub fn path(&self) -> String {
        fn text(q: &mut Vec<String>, k: &str, v: Option<&str>) {
            if let Some(v) = v.filter(|v| !v.is_empty()) {
                q.push(format!("{k}={}", percent_encode(v)));
            }
        }
        let mut q = Vec::new();
        text(&mut q, "pod", self.pod.as_deref());
        if let Some(p) = self.port {
            q.push(format!("port={p}"));
        }
        text(&mut q, "point", self.point.as_deref());
        text(&mut q, "direction", self.direction.as_deref());
        if let Some(c) = self.count {
            q.push(format!("count={c}"));
        }
        if let Some(s) = self.snaplen {
            q.push(format!("snaplen={s}"));
        }
        text(&mut q, "filter", self.filter.as_deref().map(str::trim));
        if q.is_empty() {
            PATH_CAPTURE.to_string()
        } else {
            format!("{PATH_CAPTURE}?{}", q.join("&"))
        }
    }
}

/// Every byte but RFC 3986's unreserved characters as `%XX`.
fn percent_encode(s: &str) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_queries_read_typed_and_name_the_bad_parameter() {
        let q = CaptureQuery::from_pairs([
            ("pod", "default/p1"),
            ("point", ""),
            ("count", "5"),
            ("filter", "  host 10.0.0.1 "),
            ("other", "x"),
        ])
        .unwrap();
        assert_eq!(q.pod.as_deref(), Some("default/p1"));
        assert_eq!((q.point, q.count), (None, Some(5)));
        assert_eq!(q.filter.as_deref(), Some("host 10.0.0.1"));
        let e = CaptureQuery::from_pairs([("port", "x")]).unwrap_err();
        assert_eq!(e.to_string(), "port=\"x\" is not a port number");
        let e = CaptureQuery::from_pairs([("snaplen", "-1")]).unwrap_err();
        assert_eq!(e.to_string(), "snaplen=\"-1\" is not a number");
        assert_eq!(CaptureQuery::default().path(), PATH_CAPTURE);
        let q = CaptureQuery {
            port: Some(3),
            direction: Some("in".into()),
            filter: Some("!tcp".into()),
            ..CaptureQuery::default()
        };
        assert_eq!(q.path(), "/v1/capture?port=3&direction=in&filter=%21tcp");
    }
}
