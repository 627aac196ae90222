//! Kubernetes objects to the switch's peer and Service tables.
//!
//! Everything here is a pure function of the watched objects: the watch loop calls it on a
//! complete snapshot of its stores and applies the result only when it is fully built, so a
//! table can never be half old and half new, and the same code is tested against fixtures in
//! the exact shape an API server returns. Nothing an object says can make it panic: an object
//! the switch cannot use is left out and a sentence naming it and the reason goes into
//! `problems`, which the watch loop logs once per distinct problem.
//!
//! Conflicts are settled the same way every time (nodes and Services in name order, the
//! first one wins) so that two daemons looking at the same cluster build the same tables.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use conf::config::{
    parse_mac, EndpointSpec, PeerSpec, Protocol, ServicePort, ServiceSpec, TrafficPolicy,
};
use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::{Node, Service, ServiceSpec as K8sServiceSpec};
use k8s_openapi::api::discovery::v1::{
    EndpointConditions, EndpointHints, EndpointPort, EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};

/// Our own Node annotation: this node's VTEP, as JSON [`VtepAnnotation`].
pub const VTEP_ANNOTATION: &str = "vswitch.io/vtep";
/// flannel's VXLAN backend data, JSON `{"VNI":1,"VtepMAC":"..."}`.
pub const FLANNEL_BACKEND_DATA: &str = "flannel.alpha.coreos.com/backend-data";
/// flannel's backend type ("vxlan", "host-gw", "wireguard", ...).
pub const FLANNEL_BACKEND_TYPE: &str = "flannel.alpha.coreos.com/backend-type";
/// flannel's underlay address of the node.
pub const FLANNEL_PUBLIC_IP: &str = "flannel.alpha.coreos.com/public-ip";
/// flannel only looks at Nodes carrying this with "true".
pub const FLANNEL_KUBE_SUBNET_MANAGER: &str = "flannel.alpha.coreos.com/kube-subnet-manager";
/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// A Service with this label is served by the proxy it names, not by vswitch (kube-proxy
/// leaves such Services alone too); it keeps its DNS records.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Begins every problem that is a feature vswitch does not support (as opposed to an object
/// it cannot use): the watch loop counts those.
pub const UNSUPPORTED: &str = "unsupported: ";
/// Kubernetes' default sessionAffinityConfig.clientIP.timeoutSeconds.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// The value of [`VTEP_ANNOTATION`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VtepAnnotation {
    /// Absent: the node's InternalIP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay_ip: Option<IpAddr>,
    pub vtep_mac: String,
    /// The node takes VXLAN remote checksum offload (every vswitch does; absent before it could).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub remote_checksum: bool,
}

/// flannel's backend-data for the VXLAN backend (other keys are ignored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlannelBackendData {
    #[serde(rename = "VNI", default)]
    pub vni: u32,
    #[serde(rename = "VtepMAC")]
    pub vtep_mac: String,
}

/// What the conversion produced, with the reasons for everything it left out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterState {
    pub peers: Vec<PeerSpec>,
    pub services: Vec<ServiceSpec>,
    pub problems: Vec<String>,
}

/// The peer and Service tables for `own_node` from complete lists of Nodes, Services and
/// EndpointSlices.
pub fn cluster_state<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    own_node: &str,
) -> (Vec<PeerSpec>, Vec<ServiceSpec>) {
    let s = convert(nodes, services, slices, own_node);
    (s.peers, s.services)
}

/// [`cluster_state`] with the problems it found.
pub fn convert<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    own_node: &str,
) -> ClusterState {
    let mut problems = Vec::new();
    let peers = peers_from_nodes(nodes, own_node, &mut problems);
    let services = services_from_api(services, slices, &mut problems);
    ClusterState {
        peers,
        services,
        problems,
    }
}

/// Every Node but `own_node` that has an IPv4 pod CIDR and a VTEP, as peers in name order.
pub fn peers_from_nodes<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    own_node: &str,
    problems: &mut Vec<String>,
) -> Vec<PeerSpec> {
    let mut nodes: Vec<&Node> = nodes.into_iter().collect();
    nodes.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut peers: Vec<PeerSpec> = Vec::new();
    for node in nodes {
        let name = node.metadata.name.as_deref().unwrap_or_default();
        if name == own_node {
            continue;
        }
        let peer = match node_peer(node) {
            Ok(Some(p)) => p,
            Ok(None) => continue,
            Err(e) => {
                problems.push(format!("node {name:?}: {e}; not a peer"));
                continue;
            }
        };
        // The datapath's peer table refuses the whole set on a conflict; leave out the later
        // node instead so one bad Node cannot cut off all the others.
        if let Some(other) = peers.iter().find(|q| q.underlay_ip == peer.underlay_ip) {
            problems.push(format!(
                "node {name:?}: underlay address {} is also node {:?}'s; not a peer",
                peer.underlay_ip, other.name
            ));
            continue;
        }
        if let Some((other, c)) = peers.iter().find_map(|q| {
            q.pod_cidrs
                .iter()
                .find(|c| peer.pod_cidrs.iter().any(|d| overlaps(c, d)))
                .map(|c| (q, c))
        }) {
            problems.push(format!(
                "node {name:?}: pod CIDR overlaps node {:?}'s {c}; not a peer",
                other.name
            ));
            continue;
        }
        peers.push(peer);
    }
    peers
}

fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The IPv4 pod CIDRs of a node (spec.podCIDRs, else spec.podCIDR).
pub fn node_pod_cidrs(node: &Node) -> Result<Vec<Ipv4Net>, String> {
    let spec = node.spec.as_ref();
    let listed: Vec<&String> = match spec.and_then(|s| s.pod_cidrs.as_ref()) {
        Some(v) if !v.is_empty() => v.iter().collect(),
        _ => spec.and_then(|s| s.pod_cidr.as_ref()).into_iter().collect(),
    };
    let mut out = Vec::new();
    for c in listed {
        match c.parse::<IpNet>() {
            Ok(IpNet::V4(n)) => {
                if !out.contains(&n) {
                    out.push(n);
                }
            }
            Ok(IpNet::V6(_)) => {} // IPv6 pods are not switched in this version.
            Err(_) => return Err(format!("spec.podCIDRs: {c:?} is not a CIDR")),
        }
    }
    Ok(out)
}

/// The label holding a node's topology zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// The topology zone of node `name` (its [`ZONE_LABEL`]), if it has one.
pub fn node_zone<N: std::ops::Deref<Target = Node>>(nodes: &[N], name: &str) -> Option<String> {
    nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(name))
        .and_then(|n| n.metadata.labels.as_ref()?.get(ZONE_LABEL).cloned())
        .filter(|z| !z.is_empty())
}

/// The node's InternalIP (IPv4 preferred).
pub fn node_internal_ip(node: &Node) -> Option<IpAddr> {
    let addrs = node.status.as_ref()?.addresses.as_ref()?;
    let ips: Vec<IpAddr> = addrs
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    ips.iter()
        .find(|ip| ip.is_ipv4())
        .or_else(|| ips.first())
        .copied()
}

/// A node as a peer. `Ok(None)`: not (yet) a peer, which is normal (no pod CIDR assigned yet,
/// no VTEP published yet); `Err`: the node says something the switch cannot use.
pub fn node_peer(node: &Node) -> Result<Option<PeerSpec>, String> {
    let Some(name) = node.metadata.name.clone().filter(|n| !n.is_empty()) else {
        return Err("metadata.name is missing".into());
    };
    let pod_cidrs = node_pod_cidrs(node)?;
    if pod_cidrs.is_empty() {
        return Ok(None);
    }
    let empty = BTreeMap::new();
    let ann = node.metadata.annotations.as_ref().unwrap_or(&empty);
    let internal = node_internal_ip(node);
    let (underlay_ip, mac, remote_checksum) = if let Some(v) = ann.get(VTEP_ANNOTATION) {
        // Ours first: a vswitch node publishes flannel's annotations too, ours are exact.
        let v: VtepAnnotation = serde_json::from_str(v)
            .map_err(|e| format!("annotation {VTEP_ANNOTATION}: {e} in {v:?}"))?;
        let ip = v.underlay_ip.or(internal).ok_or_else(|| {
            format!("annotation {VTEP_ANNOTATION} has no underlay_ip and the node no InternalIP")
        })?;
        (ip, v.vtep_mac, v.remote_checksum)
    } else if let Some(bd) = ann.get(FLANNEL_BACKEND_DATA) {
        match ann.get(FLANNEL_BACKEND_TYPE).map(String::as_str) {
            None | Some("vxlan") => {}
            Some(other) => {
                return Err(format!(
                    "flannel backend {other:?}: only the vxlan backend can reach this switch"
                ))
            }
        }
        let bd: FlannelBackendData = serde_json::from_str(bd)
            .map_err(|e| format!("annotation {FLANNEL_BACKEND_DATA}: {e} in {bd:?}"))?;
        let ip = match ann.get(FLANNEL_PUBLIC_IP) {
            Some(p) => p
                .parse::<IpAddr>()
                .map_err(|_| format!("annotation {FLANNEL_PUBLIC_IP}: {p:?} is not an address"))?,
            None => internal
                .ok_or_else(|| format!("no annotation {FLANNEL_PUBLIC_IP} and no InternalIP"))?,
        };
        (ip, bd.vtep_mac, false)
    } else {
        return Ok(None);
    };
    let Some(bytes) = parse_mac(&mac) else {
        return Err(format!("VTEP MAC {mac:?} is not a MAC address"));
    };
    let peer = PeerSpec {
        name,
        underlay_ip,
        vtep_mac: format_mac(bytes),
        pod_cidrs,
        remote_checksum,
    };
    peer.validate("peers").map_err(|e| e.to_string())?;
    Ok(Some(peer))
}

/// `aa:bb:cc:dd:ee:ff`, lower case.
pub fn format_mac(m: [u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// An EndpointSlice as the watch keeps it: only what the conversion reads. 100,000 endpoints
/// as k8s-openapi's `Endpoint` (352 bytes before its strings, the pod it stands for and more)
/// would be 45 MB; as [`EndpointLite`] they are a quarter of that. serde skips the rest as it
/// reads the API's JSON.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SliceLite {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub address_type: String,
    /// `null` as the API sends it for a slice without endpoints: none.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub endpoints: Vec<EndpointLite>,
    #[serde(default)]
    pub ports: Option<Vec<EndpointPort>>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<EndpointLite>, D::Error> {
    let v: Option<Vec<EndpointLite>> = serde::Deserialize::deserialize(d)?;
    Ok(v.unwrap_or_default())
}

/// One endpoint of a [`SliceLite`].
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointLite {
    /// The first of `addresses`: the others are fungible, kube-proxy uses the first too.
    #[serde(default, rename = "addresses", deserialize_with = "first_address")]
    pub address: Option<Box<str>>,
    #[serde(default)]
    pub conditions: Option<EndpointConditions>,
    #[serde(default)]
    pub hostname: Option<Box<str>>,
    #[serde(default)]
    pub node_name: Option<Box<str>>,
    #[serde(default)]
    pub hints: Option<Box<EndpointHints>>,
}

fn first_address<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Box<str>>, D::Error> {
    let all: Option<Vec<String>> = serde::Deserialize::deserialize(d)?;
    Ok(all
        .and_then(|a| a.into_iter().next())
        .map(String::into_boxed_str))
}

impl From<&EndpointSlice> for SliceLite {
    fn from(s: &EndpointSlice) -> SliceLite {
        SliceLite {
            metadata: s.metadata.clone(),
            address_type: s.address_type.clone(),
            endpoints: s
                .endpoints
                .iter()
                .map(|e| EndpointLite {
                    address: e.addresses.first().map(|a| a.as_str().into()),
                    conditions: e.conditions.clone(),
                    hostname: e.hostname.as_deref().map(Into::into),
                    node_name: e.node_name.as_deref().map(Into::into),
                    hints: e.hints.clone().map(Box::new),
                })
                .collect(),
            ports: s.ports.clone(),
        }
    }
}

impl kube::Resource for SliceLite {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        "EndpointSlice".into()
    }
    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        "discovery.k8s.io".into()
    }
    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        "endpointslices".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Every Service but ExternalName ones, with its IPv4 endpoints, in (namespace, name) order.
pub fn services_from_api<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    problems: &mut Vec<String>,
) -> Vec<ServiceSpec> {
    let slices: Vec<SliceLite> = slices.into_iter().map(SliceLite::from).collect();
    let mut by_service: BTreeMap<(String, String), Vec<&SliceLite>> = BTreeMap::new();
    for s in &slices {
        if let Some(owner) = slice_service(s) {
            by_service.entry(owner).or_default().push(s);
        }
    }
    let mut services: Vec<&Service> = services.into_iter().collect();
    services.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    let mut out = Vec::new();
    for svc in services {
        let ns = svc.metadata.namespace.clone().unwrap_or_default();
        let name = svc.metadata.name.clone().unwrap_or_default();
        let mut slices = by_service
            .remove(&(ns.clone(), name.clone()))
            .unwrap_or_default();
        slices.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        if let Some(spec) = service_spec(svc, &ns, &name, &slices, problems) {
            out.push(spec);
        }
    }
    out
}

/// The Service an EndpointSlice belongs to (namespace, name), if it is one vswitch reads
/// (IPv4, with the `kubernetes.io/service-name` label; IPv6 and FQDN slices are for later
/// versions).
pub fn slice_service(s: &SliceLite) -> Option<(String, String)> {
    if s.address_type != "IPv4" {
        return None;
    }
    let svc = s.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some((
        s.metadata.namespace.clone().unwrap_or_default(),
        svc.clone(),
    ))
}

/// One Service with its EndpointSlices (any order), as [`services_from_api`] converts each.
pub fn service_from_api(
    svc: &Service,
    slices: &mut [&SliceLite],
    problems: &mut Vec<String>,
) -> Option<ServiceSpec> {
    let ns = svc.metadata.namespace.clone().unwrap_or_default();
    let name = svc.metadata.name.clone().unwrap_or_default();
    slices.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    service_spec(svc, &ns, &name, slices, problems)
}

fn protocol(p: Option<&str>) -> Option<Protocol> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        _ => None,
    }
}

fn policy(p: Option<&str>) -> TrafficPolicy {
    match p {
        Some("Local") => TrafficPolicy::Local,
        _ => TrafficPolicy::Cluster,
    }
}

fn port_u16(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

fn service_spec(
    svc: &Service,
    ns: &str,
    name: &str,
    slices: &[&SliceLite],
    problems: &mut Vec<String>,
) -> Option<ServiceSpec> {
    let who = format!("service {ns}/{name}");
    let Some(spec) = svc.spec.as_ref() else {
        problems.push(format!("{who}: no spec; left out"));
        return None;
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        // A DNS alias: nothing to translate.
        return None;
    }
    let (cluster_ips, external_ips) = addresses(spec, &who, problems);
    let ports = wanted_ports(spec, &who, problems);
    let endpoints = endpoints(slices, &ports, &who, problems);
    ignored_fields(svc, &who, problems);
    let external_traffic_policy = policy(spec.external_traffic_policy.as_deref());
    let out = ServiceSpec {
        namespace: ns.to_string(),
        name: name.to_string(),
        cluster_ips,
        ports: ports
            .iter()
            .map(|w| ServicePort {
                target_port: service_target_port(w, &endpoints),
                ..w.port.clone()
            })
            .collect(),
        external_ips,
        session_affinity_timeout: affinity_timeout(spec),
        internal_traffic_policy: policy(spec.internal_traffic_policy.as_deref()),
        external_traffic_policy,
        load_balancer_ips: load_balancer_ips(svc, &who, problems),
        // Only meaningful (and only allocated by the API server) for policy Local.
        health_check_node_port: spec
            .health_check_node_port
            .and_then(port_u16)
            .filter(|_| external_traffic_policy == TrafficPolicy::Local),
        proxy_name: svc
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL))
            .cloned(),
        endpoints,
    };
    if let Err(e) = out.validate("services") {
        problems.push(format!("{who}: {e}; left out"));
        return None;
    }
    Some(out)
}

/// The Service's IPv4 cluster and external addresses (headless has none; IPv6 endpoints are
/// not watched yet, so an IPv6 address would have none).
fn addresses(
    spec: &K8sServiceSpec,
    who: &str,
    problems: &mut Vec<String>,
) -> (Vec<IpAddr>, Vec<IpAddr>) {
    let listed: Vec<&String> = match &spec.cluster_ips {
        Some(v) if !v.is_empty() => v.iter().collect(),
        _ => spec.cluster_ip.iter().collect(),
    };
    let mut cluster_ips = Vec::new();
    let mut v6: Vec<&str> = Vec::new();
    for ip in listed {
        if ip == "None" || ip.is_empty() {
            continue; // headless
        }
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => cluster_ips.push(IpAddr::V4(a)),
            Ok(IpAddr::V6(_)) => v6.push(ip.as_str()),
            Err(_) => problems.push(format!("{who}: clusterIP {ip:?} is not an address")),
        }
    }
    let mut external_ips = Vec::new();
    for ip in spec.external_ips.iter().flatten() {
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => external_ips.push(IpAddr::V4(a)),
            Ok(IpAddr::V6(_)) => v6.push(ip.as_str()),
            Err(_) => problems.push(format!("{who}: externalIP {ip:?} is not an address")),
        }
    }
    if !v6.is_empty() {
        problems.push(format!(
            "{who}: {UNSUPPORTED}IPv6 addresses are not translated (IPv4 ones are): {}",
            v6.join(", ")
        ));
    }
    (cluster_ips, external_ips)
}

/// A Service port, with the target port it names (resolved per endpoint by [`endpoints`]).
struct Wanted<'a> {
    port: ServicePort,
    target: Option<&'a IntOrString>,
}

/// The Service's TCP and UDP ports; the others, and duplicates, are left out with a problem.
fn wanted_ports<'a>(
    spec: &'a K8sServiceSpec,
    who: &str,
    problems: &mut Vec<String>,
) -> Vec<Wanted<'a>> {
    let mut ports: Vec<Wanted> = Vec::new();
    for p in spec.ports.iter().flatten() {
        let pname = p.name.clone().filter(|n| !n.is_empty());
        let label = pname.clone().unwrap_or_else(|| p.port.to_string());
        let Some(proto) = protocol(p.protocol.as_deref()) else {
            problems.push(format!(
                "{who}: port {label}: protocol {:?} is unknown; port left out",
                p.protocol.as_deref().unwrap_or_default()
            ));
            continue;
        };
        if proto == Protocol::Sctp {
            problems.push(format!(
                "{who}: port {label}: {UNSUPPORTED}SCTP is not translated (TCP and UDP are); \
                 port left out"
            ));
            continue;
        }
        let Some(port) = port_u16(p.port) else {
            problems.push(format!(
                "{who}: port {label}: {} is not a port number; port left out",
                p.port
            ));
            continue;
        };
        if ports
            .iter()
            .any(|w| w.port.port == port && w.port.protocol == proto)
        {
            problems.push(format!(
                "{who}: port {port}/{proto:?} is listed twice; the second is left out"
            ));
            continue;
        }
        ports.push(Wanted {
            port: ServicePort {
                name: pname,
                protocol: proto,
                port,
                target_port: None,
                node_port: p.node_port.and_then(port_u16),
            },
            target: p.target_port.as_ref(),
        });
    }
    ports
}

/// The target port a slice gives the Service port `w` (its port of the same name and protocol).
fn slice_port(s: &SliceLite, w: &Wanted) -> Option<u16> {
    s.ports.iter().flatten().find_map(|sp| {
        let same_name =
            sp.name.as_deref().unwrap_or_default() == w.port.name.as_deref().unwrap_or_default();
        let same_proto = protocol(sp.protocol.as_deref()) == Some(w.port.protocol);
        (same_name && same_proto)
            .then_some(sp.port.and_then(port_u16))
            .flatten()
    })
}

/// The Service port's own target port: a number, or for a named one (which the pods number,
/// each as it likes) the number of its first endpoint, for listings only: translation and DNS
/// use each endpoint's own (see [`EndpointSpec::ports`]).
fn service_target_port(w: &Wanted, endpoints: &[EndpointSpec]) -> Option<u16> {
    match w.target {
        Some(IntOrString::Int(n)) => port_u16(*n),
        Some(IntOrString::String(_)) => endpoints.iter().find_map(|e| e.target_port(&w.port)),
        None => Some(w.port.port),
    }
}

/// The endpoints of every slice, one per address, each with the target ports of its own slice,
/// as kube-proxy's endpoint cache keeps them: the EndpointSlice controller resolves a named
/// targetPort per pod and groups pods by the numbers they resolve to, so during a rollout that
/// renumbers a port the old and the new pods sit in different slices with different numbers,
/// and both are served, each on its own. A slice without a Service port gives its endpoints
/// none of that port's traffic.
fn endpoints(
    slices: &[&SliceLite],
    ports: &[Wanted],
    who: &str,
    problems: &mut Vec<String>,
) -> Vec<EndpointSpec> {
    let mut endpoints: BTreeMap<Ipv4Addr, EndpointSpec> = BTreeMap::new();
    for s in slices {
        let slice_name = s.metadata.name.as_deref().unwrap_or_default();
        let slice_ports: std::sync::Arc<BTreeMap<String, u16>> = std::sync::Arc::new(
            ports
                .iter()
                .filter_map(|w| {
                    let name = w.port.name.clone().unwrap_or_default();
                    slice_port(s, w).map(|p| (name, p))
                })
                .collect(),
        );
        for ep in &s.endpoints {
            // Addresses of one endpoint are fungible; like kube-proxy, use the first.
            let Some(addr) = ep.address.as_deref() else {
                continue;
            };
            let Ok(ip) = addr.parse::<Ipv4Addr>() else {
                problems.push(format!(
                    "{who}: EndpointSlice {slice_name}: {addr:?} is not an IPv4 address"
                ));
                continue;
            };
            let mut e = endpoint(ip, ep);
            e.ports = Some(slice_ports.clone());
            // The same endpoint can sit in two slices for a moment while the controller moves
            // it; keep its most usable state, and every port either slice gives it (the more
            // usable one's number where they differ).
            let rank = |e: &EndpointSpec| (e.ready, e.serving, !e.terminating);
            match endpoints.get_mut(&ip) {
                Some(old) => {
                    let (mut keep, other) = if rank(old) >= rank(&e) {
                        (old.clone(), e)
                    } else {
                        (e, old.clone())
                    };
                    if let (Some(k), Some(o)) = (keep.ports.as_mut(), other.ports) {
                        let k = std::sync::Arc::make_mut(k);
                        for (name, port) in o.iter() {
                            k.entry(name.clone()).or_insert(*port);
                        }
                    }
                    *old = keep;
                }
                None => {
                    endpoints.insert(ip, e);
                }
            }
        }
    }
    endpoints.into_values().collect()
}

fn endpoint(ip: Ipv4Addr, ep: &EndpointLite) -> EndpointSpec {
    let c = ep.conditions.as_ref();
    // The API's rules for absent conditions: ready unknown counts as ready, serving follows
    // ready, terminating defaults to false.
    let ready = c.and_then(|c| c.ready).unwrap_or(true);
    EndpointSpec {
        ip: IpAddr::V4(ip),
        node: ep.node_name.as_deref().map(String::from),
        ready,
        serving: c.and_then(|c| c.serving).unwrap_or(ready),
        terminating: c.and_then(|c| c.terminating).unwrap_or(false),
        hostname: ep.hostname.as_deref().map(String::from),
        ports: None,
        // Written by the EndpointSlice controller for trafficDistribution (PreferClose and its
        // successors) and topology-mode Auto; kube-proxy follows them whatever asked for them.
        for_zones: ep
            .hints
            .as_ref()
            .and_then(|h| h.for_zones.as_ref())
            .map(|z| z.iter().map(|z| z.name.clone()).collect())
            .unwrap_or_default(),
        for_nodes: ep
            .hints
            .as_ref()
            .and_then(|h| h.for_nodes.as_ref())
            .map(|n| n.iter().map(|n| n.name.clone()).collect())
            .unwrap_or_default(),
    }
}

/// A LoadBalancer's ingress addresses with ipMode VIP (the default): traffic to them is
/// translated on the node like an external IP's. ipMode Proxy means the balancer delivers to
/// the node's address itself (a proxy in front), so, as kube-proxy does, such an address is
/// left alone; hostnames only are not addresses at all.
fn load_balancer_ips(svc: &Service, who: &str, problems: &mut Vec<String>) -> Vec<IpAddr> {
    if svc.spec.as_ref().and_then(|s| s.type_.as_deref()) != Some("LoadBalancer") {
        return Vec::new();
    }
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref());
    let mut out = Vec::new();
    for i in ingress.into_iter().flatten() {
        if i.ip_mode.as_deref().unwrap_or("VIP") != "VIP" {
            continue;
        }
        let Some(ip) = i.ip.as_deref() else { continue };
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => {
                if !out.contains(&IpAddr::V4(a)) {
                    out.push(IpAddr::V4(a));
                }
            }
            Ok(IpAddr::V6(_)) => {}
            Err(_) => problems.push(format!(
                "{who}: status.loadBalancer.ingress ip {ip:?} is not an address"
            )),
        }
    }
    out
}

/// Fields of a Service that kube-proxy acts on and this switch does not: each one is a
/// problem (logged once, counted), never silently dropped.
fn ignored_fields(svc: &Service, who: &str, problems: &mut Vec<String>) {
    let Some(spec) = svc.spec.as_ref() else {
        return;
    };
    if spec
        .load_balancer_source_ranges
        .as_ref()
        .is_some_and(|r| !r.is_empty())
    {
        problems.push(format!(
            "{who}: {UNSUPPORTED}loadBalancerSourceRanges is not enforced (every source reaches \
             the Service)"
        ));
    }
}

/// ClientIP affinity's timeout, or `None` without affinity.
fn affinity_timeout(spec: &K8sServiceSpec) -> Option<u32> {
    (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .filter(|t| *t > 0)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
    })
}

/// The peers this node can use: those that do not overlap its own pod CIDR or share its
/// underlay address (the API can disagree with this node's config while a cluster is being
/// changed; the config is authoritative here).
pub fn usable_peers(
    peers: Vec<PeerSpec>,
    own_pod_cidr: Ipv4Net,
    own_underlay: Option<IpAddr>,
    problems: &mut Vec<String>,
) -> Vec<PeerSpec> {
    peers
        .into_iter()
        .filter(|p| {
            if let Some(c) = p.pod_cidrs.iter().find(|c| overlaps(c, &own_pod_cidr)) {
                problems.push(format!(
                    "node {:?}: pod CIDR {c} overlaps this node's {own_pod_cidr}; not a peer",
                    p.name
                ));
                return false;
            }
            if Some(p.underlay_ip) == own_underlay {
                problems.push(format!(
                    "node {:?}: underlay address {} is this node's; not a peer",
                    p.name, p.underlay_ip
                ));
                return false;
            }
            true
        })
        .collect()
}

/// The annotations this node publishes on its Node object: ours, and flannel's so that flannel
/// nodes route to it.
pub fn own_annotations(
    underlay_ip: IpAddr,
    vtep_mac: [u8; 6],
    vni: u32,
) -> BTreeMap<String, String> {
    let mac = format_mac(vtep_mac);
    let ours = VtepAnnotation {
        underlay_ip: Some(underlay_ip),
        vtep_mac: mac.clone(),
        remote_checksum: true,
    };
    let flannel = FlannelBackendData { vni, vtep_mac: mac };
    let mut m = BTreeMap::new();
    // Serialising these plain structs cannot fail; an empty value would only make peers skip us.
    m.insert(
        VTEP_ANNOTATION.to_string(),
        serde_json::to_string(&ours).unwrap_or_default(),
    );
    m.insert(
        FLANNEL_BACKEND_DATA.to_string(),
        serde_json::to_string(&flannel).unwrap_or_default(),
    );
    m.insert(FLANNEL_BACKEND_TYPE.to_string(), "vxlan".to_string());
    m.insert(FLANNEL_PUBLIC_IP.to_string(), underlay_ip.to_string());
    m.insert(FLANNEL_KUBE_SUBNET_MANAGER.to_string(), "true".to_string());
    m
}

/// Whether `node` already carries every annotation in `want`.
pub fn has_annotations(node: &Node, want: &BTreeMap<String, String>) -> bool {
    let have = node.metadata.annotations.as_ref();
    want.iter()
        .all(|(k, v)| have.and_then(|h| h.get(k)) == Some(v))
}

#[cfg(test)]
mod tests {
    //! Cases modelled on kube-proxy's endpointslicecache_test.go and service_test.go, with
    //! objects in the API's JSON shape.
    use serde_json::json;

    use super::*;

    #[test]
    fn recorded_slices_read_as_the_watch_keeps_them_the_same_as_whole() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/k8s/endpointslices.json"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let whole: kube::core::ObjectList<EndpointSlice> = serde_json::from_str(&text).unwrap();
        let lite: kube::core::ObjectList<SliceLite> = serde_json::from_str(&text).unwrap();
        assert_eq!(whole.items.len(), lite.items.len());
        // A slice with `"endpoints": null` is one without endpoints.
        assert!(lite.items.iter().any(|s| s.endpoints.is_empty()));
        for (w, l) in whole.items.iter().zip(&lite.items) {
            let from = SliceLite::from(w);
            let first = |s: &SliceLite| -> Vec<Option<Box<str>>> {
                s.endpoints.iter().map(|e| e.address.clone()).collect()
            };
            assert_eq!(first(&from), first(l));
            let nodes = |s: &SliceLite| -> Vec<Option<Box<str>>> {
                s.endpoints.iter().map(|e| e.node_name.clone()).collect()
            };
            assert_eq!(nodes(&from), nodes(l));
            assert_eq!(from.ports, l.ports);
            assert_eq!(slice_service(&from), slice_service(l));
        }
    }

    fn service(v: serde_json::Value) -> Service {
        serde_json::from_value(v).unwrap()
    }

    fn slice(
        name: &str,
        svc: &str,
        ports: serde_json::Value,
        eps: &[(&str, bool)],
    ) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default",
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4",
            "ports": ports,
            "endpoints": eps.iter().map(|(ip, ready)| json!({
                "addresses": [ip], "nodeName": "n1",
                "conditions": {"ready": ready, "serving": ready, "terminating": !ready}
            })).collect::<Vec<_>>(),
        }))
        .unwrap()
    }

    fn web(extra: serde_json::Value) -> Service {
        let mut v = json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.20", "type": "ClusterIP", "ports": [
                {"name": "http", "protocol": "TCP", "port": 80, "targetPort": "http"},
                {"name": "metrics", "protocol": "TCP", "port": 9100, "targetPort": 9100}]},
        });
        json_merge(&mut v, extra);
        service(v)
    }

    fn json_merge(a: &mut serde_json::Value, b: serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    json_merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    fn one(svc: &Service, slices: &[EndpointSlice]) -> (ServiceSpec, Vec<String>) {
        let mut problems = Vec::new();
        let mut out = services_from_api([svc], slices, &mut problems);
        assert_eq!(out.len(), 1, "{problems:?}");
        (out.remove(0), problems)
    }

    fn ports_of(s: &ServiceSpec, port: usize) -> Vec<(String, Option<u16>)> {
        s.endpoints
            .iter()
            .map(|e| (e.ip.to_string(), e.target_port(&s.ports[port])))
            .collect()
    }

    #[test]
    fn a_renumbered_named_port_keeps_each_slice_s_number() {
        // A rollout: two old pods number "http" 8080, one new pod 8081 (fewer, not ready
        // yet in one case); a third slice's pod has no "http" port. Nothing is dropped, no
        // vote: each endpoint is served on its own slice's number, or not at all.
        let old = slice(
            "web-old",
            "web",
            json!([{"name": "http", "port": 8080}, {"name": "metrics", "port": 9100}]),
            &[("10.244.1.10", true), ("10.244.1.11", true)],
        );
        let new = slice(
            "web-new",
            "web",
            json!([{"name": "http", "port": 8081}, {"name": "metrics", "port": 9100}]),
            &[("10.244.2.10", true)],
        );
        let bare = slice(
            "web-bare",
            "web",
            json!([{"name": "metrics", "port": 9100}]),
            &[("10.244.3.10", true)],
        );
        let (s, problems) = one(&web(json!({})), &[old, new, bare]);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            ports_of(&s, 0),
            [
                ("10.244.1.10".into(), Some(8080)),
                ("10.244.1.11".into(), Some(8080)),
                ("10.244.2.10".into(), Some(8081)),
                ("10.244.3.10".into(), None),
            ]
        );
        assert!(ports_of(&s, 1).iter().all(|(_, p)| *p == Some(9100)));
        // The table built from it sends "http" to three endpoints, each on its own port.
        let t = crate::pipeline::nat::backends_for(&s, &s.ports[0], "n1", TrafficPolicy::Cluster);
        let got: Vec<String> = t.iter().map(|b| format!("{}:{}", b.ip, b.port)).collect();
        assert_eq!(
            got,
            ["10.244.1.10:8080", "10.244.1.11:8080", "10.244.2.10:8081"]
        );
    }

    #[test]
    fn an_endpoint_in_two_slices_keeps_its_best_state_and_every_port() {
        let a = slice(
            "web-a",
            "web",
            json!([{"name": "http", "port": 8080}]),
            &[("10.244.1.10", false)],
        );
        let b = slice(
            "web-b",
            "web",
            json!([{"name": "metrics", "port": 9100}]),
            &[("10.244.1.10", true)],
        );
        let (s, _) = one(&web(json!({})), &[a, b]);
        assert_eq!(s.endpoints.len(), 1);
        assert!(s.endpoints[0].ready);
        assert_eq!(ports_of(&s, 0), [("10.244.1.10".into(), Some(8080))]);
        assert_eq!(ports_of(&s, 1), [("10.244.1.10".into(), Some(9100))]);
    }

    #[test]
    fn services_of_another_proxy_keep_dns_but_are_marked() {
        let svc = web(json!({"metadata": {"labels": {SERVICE_PROXY_NAME_LABEL: "mesh"}}}));
        let (s, _) = one(&svc, &[]);
        assert_eq!(s.proxy_name.as_deref(), Some("mesh"));
        let t = crate::pipeline::nat::ServiceTable::build(
            &[s],
            "n1",
            conf::config::LoadBalancing::Maglev,
        );
        assert!(t.is_empty());
    }

    #[test]
    fn load_balancer_ingress_ips_with_ip_mode_vip_are_translated() {
        let svc = web(json!({
            "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                     "healthCheckNodePort": 32000},
            "status": {"loadBalancer": {"ingress": [
                {"ip": "203.0.113.7"},
                {"ip": "203.0.113.8", "ipMode": "VIP"},
                {"ip": "203.0.113.9", "ipMode": "Proxy"},
                {"hostname": "lb.example.com"},
                {"ip": "2001:db8::7"}]}},
        }));
        let (s, problems) = one(&svc, &[]);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            s.load_balancer_ips,
            [
                "203.0.113.7".parse::<IpAddr>().unwrap(),
                "203.0.113.8".parse().unwrap()
            ]
        );
        assert_eq!(s.health_check_node_port, Some(32000));
        assert_eq!(s.external_traffic_policy, TrafficPolicy::Local);
        // Not a LoadBalancer (any more): its stale status is not followed, and a health
        // check port means nothing under policy Cluster.
        let svc = web(json!({
            "spec": {"type": "ClusterIP", "healthCheckNodePort": 32000},
            "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}},
        }));
        let (s, _) = one(&svc, &[]);
        assert!(s.load_balancer_ips.is_empty());
        assert_eq!(s.health_check_node_port, None);
    }

    #[test]
    fn unsupported_fields_are_problems_marked_unsupported() {
        let svc = web(json!({"spec": {
            "loadBalancerSourceRanges": ["10.0.0.0/8"],
            "ports": [{"name": "http", "protocol": "TCP", "port": 80},
                      {"name": "sig", "protocol": "SCTP", "port": 9899}],
        }}));
        let (s, problems) = one(&svc, &[]);
        assert_eq!(s.ports.len(), 1);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems.iter().all(|p| p.contains(UNSUPPORTED)),
            "{problems:?}"
        );
        assert!(problems
            .iter()
            .any(|p| p.contains("loadBalancerSourceRanges")));
        assert!(problems.iter().any(|p| p.contains("SCTP")));
    }

    #[test]
    fn hints_and_the_node_s_zone_are_read() {
        let mut s = slice(
            "web-a",
            "web",
            json!([{"name": "http", "port": 8080}]),
            &[("10.244.1.10", true)],
        );
        s.endpoints[0].hints = serde_json::from_value(json!({
            "forZones": [{"name": "zone-a"}], "forNodes": [{"name": "n1"}]
        }))
        .unwrap();
        let svc = web(json!({"spec": {"trafficDistribution": "PreferClose"}}));
        let (out, problems) = one(&svc, &[s]);
        assert!(
            problems.is_empty(),
            "honoured, so not a problem: {problems:?}"
        );
        assert_eq!(out.endpoints[0].for_zones, ["zone-a"]);
        assert_eq!(out.endpoints[0].for_nodes, ["n1"]);
        let nodes: Vec<std::sync::Arc<Node>> = vec![std::sync::Arc::new(
            serde_json::from_value(json!({"metadata": {"name": "n1",
                "labels": {ZONE_LABEL: "zone-a"}}}))
            .unwrap(),
        )];
        assert_eq!(node_zone(&nodes, "n1").as_deref(), Some("zone-a"));
        assert_eq!(node_zone(&nodes, "n2"), None);
    }
}
