//! Service frontends and their backends, and how each frontend picks a backend for a new
//! connection: by rendezvous hashing over up to [`RENDEZVOUS_MAX`] backends, by a Maglev table
//! over more (both consistent: see [`Frontend::consistent_choice`]).
//!
//! Which endpoints stand behind a frontend is kube-proxy's rule (pkg/proxy/topology.go): a
//! ClusterIP follows `internalTrafficPolicy`, an external address (externalIPs, a
//! LoadBalancer's ingress IPs) follows `externalTrafficPolicy`; policy Local takes only this
//! node's endpoints; ready ones first and, when none is ready, serving-and-terminating ones
//! (KEP-1669); none at all and the frontend refuses (the caller answers with a TCP RST or an
//! ICMP port unreachable, as kube-proxy's REJECT). Traffic from inside the cluster (pods, the
//! node) to an external address of a policy-Local Service is not "external": as kube-proxy
//! short-circuits it, it gets the internal policy's endpoints (the frontend's `internal` twin).
//! Each endpoint carries its own target port (that of its EndpointSlice), and an endpoint
//! that does not serve a port stands behind none of that port's frontends.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use conf::config::{
    EndpointSpec, LoadBalancing, Protocol, ServicePort, ServiceSpec, TrafficPolicy,
};

use super::conntrack::Key;
use super::vip_index::{Hit, VipIndex};
use super::Map;
use crate::wire::IpProtocol;

/// One frontend of a Service: where clients send, and the backends behind it.
#[derive(Debug, Clone)]
pub struct Frontend {
    /// `namespace/name:port/proto`, for the admin API and traces.
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
    /// The backends in use (ready, or serving-and-terminating when none is ready).
    pub backends: Arc<[Backend]>,
    /// Maglev lookup table: slot -> index into `backends`; empty with up to
    /// [`RENDEZVOUS_MAX`] backends, which are chosen among by rendezvous hashing.
    pub(super) maglev: Box<[u16]>,
    /// sessionAffinity ClientIP timeout, seconds.
    pub affinity_secs: Option<u32>,
    /// ClientIP affinity is remembered under this key: the Service port's identity
    /// (namespace, name, port, protocol), so that it survives other Services coming and going
    /// and one client keeps its backend whichever of the Service's addresses it uses.
    pub affinity_key: u64,
    /// An external frontend of a policy-Local Service: its twin (not in the address index,
    /// not listed) whose backends serve clients inside the cluster.
    pub internal: Option<Arc<Frontend>>,
    /// Clients outside the cluster are seen by the backend as the node (the gateway address),
    /// as kube-proxy masquerades them: a ClusterIP's, and an external address's of a Service
    /// with `externalTrafficPolicy: Cluster`, whose backend may be on another node, from where
    /// the replies must come back through this one. Policy Local keeps the client's address.
    pub masquerade_outside: bool,
}

impl Frontend {
    /// The hash both choices start from: connection `key`'s.
    #[inline]
    pub(super) fn key_hash(key: &Key) -> u64 {
        use std::hash::BuildHasher;
        foldhash::fast::FixedState::with_seed(0x6374).hash_one(key)
    }

    /// The Maglev slot of connection `key`, if the frontend has a table.
    #[inline]
    fn maglev_slot(&self, key: &Key) -> Option<usize> {
        let m = self.maglev.len() as u64;
        (m > 0).then(|| (Self::key_hash(key) % m) as usize)
    }

    /// The backend (an index into `backends`) consistent hashing gives connection `key`;
    /// `None` without backends. Every node (and every worker, and a restarted process)
    /// chooses the same one for the same connection and backends, and a change of backends
    /// moves few connections: a removed backend's alone under rendezvous hashing, about as
    /// few under Maglev.
    ///
    /// Up to [`RENDEZVOUS_MAX`] backends the choice is rendezvous (highest random weight)
    /// hashing: it reads the backends only, where a Maglev table would be one more load from
    /// another place in memory for each new connection (at 10,000 Services of 10 endpoints the
    /// tables were 22 MB, and their slots cache misses).
    #[inline]
    pub(super) fn consistent_choice(&self, key: &Key) -> Option<usize> {
        if self.maglev.is_empty() {
            let b = &self.backends;
            return rendezvous_by(Self::key_hash(key), b.len(), |i| {
                (u32::from(b[i].ip), b[i].port)
            });
        }
        self.maglev_slot(key)
            .and_then(|s| self.maglev.get(s))
            .map(|&i| usize::from(i))
    }
}

/// Up to this many backends a frontend chooses by rendezvous hashing and has no Maglev table.
/// A choice costs about 1.5 ns a backend with the backends in cache (a table lookup about
/// 8 ns in all, the connection's hash included), which the table's cache miss makes up for
/// when there are many Services.
pub const RENDEZVOUS_MAX: usize = 16;

/// Rendezvous hashing (Thaler and Ravishankar, 1998): each of the `n` backends' weight for the
/// connection is a hash of the two, and the heaviest wins. Removing a backend moves only the
/// connections it had; adding one takes its share from every other. `backend(i)` is the i-th
/// backend's address and port (from the frontend, or from its copy in the address index).
#[inline]
pub(super) fn rendezvous_by(
    key_hash: u64,
    n: usize,
    backend: impl Fn(usize) -> (u32, u16),
) -> Option<usize> {
    // The weight's low byte holds the backend's index, so the heaviest is a maximum of
    // numbers (no branch to mispredict) and a tie (of the other 56 bits) goes to the later.
    const INDEX: u64 = 0xff;
    const _: () = assert!(RENDEZVOUS_MAX as u64 <= INDEX);
    let best = (0..n.min(RENDEZVOUS_MAX))
        .map(|i| (weight(key_hash, backend(i)) & !INDEX) | i as u64)
        .max()?;
    Some((best & INDEX) as usize)
}

/// A backend's weight for a connection: the connection's hash and the backend's address and
/// port, mixed (the SplitMix64 finalizer, a bijection, so two backends' weights are as
/// independent as the hash is uniform).
#[inline]
fn weight(key_hash: u64, (ip, port): (u32, u16)) -> u64 {
    let id = (u64::from(ip) << 16) | u64::from(port);
    mix64(key_hash ^ id.wrapping_mul(GOLDEN))
}

/// 2^64 divided by the golden ratio: multiplying by it spreads consecutive numbers apart.
pub(super) const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64's finalizer: a bijection of `z` in which every bit of the input reaches every
/// bit of the output.
#[inline]
pub(super) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub ip: Ipv4Addr,
    pub port: u16,
}

/// Every Service frontend, by (address, protocol, port).
///
/// A handle: the frontends and their Maglev tables (tens of MB at 10,000 Services) sit behind
/// an `Arc`, so every table snapshot that keeps the Services (a pod attached or gone, new DNS
/// records, new peers) shares them instead of copying them. A change of Services
/// ([`ServiceTable::rebuild`]) builds the frontends of the Services that changed only: those
/// of the others are shared with the previous table (as kube-proxy's nftables mode rewrites
/// only the changed Services' chains), and only the address index is made anew.
#[derive(Debug, Clone, Default)]
pub struct ServiceTable {
    shared: Arc<Frontends>,
    pub lb: LoadBalancing,
}

#[derive(Debug, Default)]
struct Frontends {
    frontends: Vec<Arc<Frontend>>,
    /// The per-packet index: each frontend by (address, protocol, port), with a copy of the
    /// backends of most (see [`VipIndex`]).
    index: VipIndex,
    /// Each Service's frontends, by namespace and name, with what they were built from. The
    /// names are shared from table to table, and looked up by [`KeyRef`] without a copy.
    built: Map<(Arc<str>, Arc<str>), Arc<Built>>,
    /// The node and zone the frontends were built for (backends depend on both).
    node: String,
    zone: Option<String>,
}

/// A Service's (namespace, name) to look up [`Frontends::built`] with: it hashes as the key.
#[derive(Hash)]
struct KeyRef<'a>(&'a str, &'a str);

impl hashbrown::Equivalent<(Arc<str>, Arc<str>)> for KeyRef<'_> {
    fn equivalent(&self, key: &(Arc<str>, Arc<str>)) -> bool {
        *self.0 == *key.0 && *self.1 == *key.1
    }
}

/// One Service's frontends.
#[derive(Debug)]
struct Built {
    /// The [`ServiceSpec`] they were built from, and its hash: a table handed the same `Arc`
    /// again (the Kubernetes watch converts only the Services that changed) reuses them without
    /// hashing; another `Arc` with the same hash (a config reload) reuses them too.
    source: Arc<ServiceSpec>,
    spec: u64,
    /// Its ClusterIPs' frontends, then its external addresses' (which an earlier Service
    /// claiming the same address keeps).
    cluster: Vec<Arc<Frontend>>,
    external: Vec<Arc<Frontend>>,
}

fn spec_hash(s: &ServiceSpec) -> u64 {
    use std::hash::BuildHasher;
    foldhash::quality::FixedState::with_seed(0x7370_6563).hash_one(s)
}

/// The frontends of one Service as seen from `node` in `zone`.
fn build_service(s: &Arc<ServiceSpec>, node: &str, zone: Option<&str>, spec: u64) -> Built {
    let mut out = Built {
        source: s.clone(),
        spec,
        cluster: Vec::new(),
        external: Vec::new(),
    };
    for p in &s.ports {
        let Some(proto) = proto_num(p.protocol) else {
            continue;
        };
        let name = format!(
            "{}/{}:{}/{}",
            s.namespace,
            s.name,
            p.port,
            p.protocol.as_str()
        );
        let affinity_key = {
            use std::hash::BuildHasher;
            foldhash::fast::FixedState::with_seed(0x6166_6669).hash_one((
                &s.namespace,
                &s.name,
                p.port,
                proto,
            ))
        };
        let internal = backends_in(s, p, node, zone, s.internal_traffic_policy);
        // Only Services with external addresses need the second set.
        let has_external = !s.external_ips.is_empty() || !s.load_balancer_ips.is_empty();
        let external = if !has_external {
            Vec::new()
        } else if s.external_traffic_policy != s.internal_traffic_policy {
            backends_in(s, p, node, zone, s.external_traffic_policy)
        } else {
            internal.clone()
        };
        let frontend = |vip: Ipv4Addr, backends: &[Backend], masquerade_outside| Frontend {
            name: name.clone(),
            vip,
            port: p.port,
            proto,
            maglev: maglev(backends),
            backends: backends.into(),
            affinity_secs: s.session_affinity_timeout,
            affinity_key,
            internal: None,
            masquerade_outside,
        };
        for vip in v4(&s.cluster_ips) {
            out.cluster.push(Arc::new(frontend(vip, &internal, true)));
        }
        let cluster = s.external_traffic_policy == TrafficPolicy::Cluster;
        // One internal twin serves every external address of the port.
        let twin = (s.external_traffic_policy == TrafficPolicy::Local && internal != external)
            .then(|| Arc::new(frontend(Ipv4Addr::UNSPECIFIED, &internal, false)));
        for vip in v4(&s.external_ips).chain(v4(&s.load_balancer_ips)) {
            let mut fe = frontend(vip, &external, cluster);
            fe.internal = twin.clone();
            out.external.push(Arc::new(fe));
        }
    }
    out
}

fn proto_num(p: Protocol) -> Option<u8> {
    match p {
        Protocol::Tcp => Some(IpProtocol::TCP.0),
        Protocol::Udp => Some(IpProtocol::UDP.0),
        Protocol::Sctp => None,
    }
}

/// The Maglev table size for `n` backends: a prime well above 100 slots per backend keeps the
/// spread within 1%, while 10,000 Services stay a few tens of MB.
fn maglev_size(n: usize) -> usize {
    const PRIMES: [usize; 6] = [251, 1021, 4093, 16_381, 65_521, 131_071];
    PRIMES
        .iter()
        .copied()
        .find(|&m| m >= n * 100)
        .unwrap_or(131_071)
}

/// Maglev (Eisenbud et al., NSDI 2016): every backend walks its own permutation of the slots
/// and claims the next free one in turn; removing a backend moves only its own slots.
pub(super) fn maglev(backends: &[Backend]) -> Box<[u16]> {
    use std::hash::BuildHasher;
    let n = backends.len();
    if n <= RENDEZVOUS_MAX {
        return Box::new([]);
    }
    let m = maglev_size(n);
    let h1 = foldhash::fast::FixedState::with_seed(0x6d61_676c);
    let h2 = foldhash::fast::FixedState::with_seed(0x6576_3221);
    let perm: Vec<(usize, usize)> = backends
        .iter()
        .map(|b| {
            let key = (u32::from(b.ip), b.port);
            let offset = (h1.hash_one(key) % m as u64) as usize;
            let skip = (h2.hash_one(key) % (m as u64 - 1) + 1) as usize;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0usize; n];
    let mut table = vec![u16::MAX; m];
    let mut filled = 0;
    'fill: loop {
        for i in 0..n {
            let (offset, skip) = perm[i];
            loop {
                let slot = (offset + next[i] * skip) % m;
                next[i] += 1;
                if table[slot] == u16::MAX {
                    table[slot] = i as u16;
                    filled += 1;
                    break;
                }
            }
            if filled == m {
                break 'fill;
            }
        }
    }
    table.into_boxed_slice()
}

fn v4(ips: &[IpAddr]) -> impl Iterator<Item = Ipv4Addr> + '_ {
    ips.iter().filter_map(|ip| match ip {
        IpAddr::V4(a) => Some(*a),
        IpAddr::V6(_) => None,
    })
}

/// How topology hints narrow a Service's cluster-wide endpoints (kube-proxy's
/// topologyModeFromHints): hints count only when every ready endpoint has them; node hints
/// first, if one names this node; else zone hints, if one names this node's zone; else none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Topology<'a> {
    Any,
    SameNode(&'a str),
    SameZone(&'a str),
}

fn topology<'a>(s: &ServiceSpec, node: &'a str, zone: Option<&'a str>) -> Topology<'a> {
    let ready = || s.endpoints.iter().filter(|e| e.ready);
    let has_any = ready().next().is_some();
    // No hint for this node: zones next, as kube-proxy falls through.
    if has_any
        && ready().all(|e| !e.for_nodes.is_empty())
        && ready().any(|e| e.for_nodes.iter().any(|n| n == node))
    {
        return Topology::SameNode(node);
    }
    if let Some(z) = zone {
        if has_any
            && ready().all(|e| !e.for_zones.is_empty())
            && ready().any(|e| e.for_zones.iter().any(|h| h == z))
        {
            return Topology::SameZone(z);
        }
    }
    Topology::Any
}

fn available(e: &EndpointSpec, t: Topology) -> bool {
    match t {
        Topology::Any => true,
        Topology::SameNode(n) => e.for_nodes.iter().any(|h| h == n),
        Topology::SameZone(z) => e.for_zones.iter().any(|h| h == z),
    }
}

/// The backends of Service port `p` under traffic policy `policy` as seen from `node`: ready
/// endpoints (only this node's for Local), else the serving-and-terminating ones (KEP-1669),
/// each on its own target port; endpoints that do not serve `p` are not among them.
pub fn backends_for(
    s: &ServiceSpec,
    p: &ServicePort,
    node: &str,
    policy: TrafficPolicy,
) -> Vec<Backend> {
    backends_in(s, p, node, None, policy)
}

/// [`backends_for`] on a node in `zone`: under policy Cluster, EndpointSlice hints narrow the
/// endpoints to those meant for this node or its zone, as kube-proxy's do (pkg/proxy/topology.go).
pub fn backends_in(
    s: &ServiceSpec,
    p: &ServicePort,
    node: &str,
    zone: Option<&str>,
    policy: TrafficPolicy,
) -> Vec<Backend> {
    let topo = match policy {
        TrafficPolicy::Cluster => topology(s, node, zone),
        TrafficPolicy::Local => Topology::Any,
    };
    let eligible = |e: &&EndpointSpec| {
        (policy == TrafficPolicy::Cluster || e.node.as_deref() == Some(node)) && available(e, topo)
    };
    let backend = |e: &EndpointSpec| match (e.ip, e.target_port(p)) {
        (IpAddr::V4(ip), Some(port)) => Some(Backend { ip, port }),
        _ => None,
    };
    let mut backends: Vec<Backend> = s
        .endpoints
        .iter()
        .filter(eligible)
        .filter(|e| e.ready)
        .filter_map(backend)
        .collect();
    if backends.is_empty() {
        backends = s
            .endpoints
            .iter()
            .filter(eligible)
            .filter(|e| e.serving && e.terminating)
            .filter_map(backend)
            .collect();
    }
    backends.sort_by_key(|b| (b.ip, b.port));
    backends.dedup();
    backends
}

impl ServiceTable {
    /// Builds the frontends of `services` as seen from node `node`.
    pub fn build(services: &[ServiceSpec], node: &str, lb: LoadBalancing) -> ServiceTable {
        ServiceTable::build_in(services, node, None, lb)
    }

    /// Builds the frontends of `services` as seen from node `node` in topology zone `zone`.
    pub fn build_in(
        services: &[ServiceSpec],
        node: &str,
        zone: Option<&str>,
        lb: LoadBalancing,
    ) -> ServiceTable {
        ServiceTable::default().rebuild(services, node, zone, lb)
    }

    /// The table for `services`, sharing with this one the frontends of every Service that
    /// has not changed (same spec, same node and zone): only the changed Services' frontends
    /// and Maglev tables are built, and the address index.
    pub fn rebuild(
        &self,
        services: &[ServiceSpec],
        node: &str,
        zone: Option<&str>,
        lb: LoadBalancing,
    ) -> ServiceTable {
        let shared: Vec<Arc<ServiceSpec>> = services.iter().cloned().map(Arc::new).collect();
        self.rebuild_shared(&shared, node, zone, lb)
    }

    /// [`ServiceTable::rebuild`] from shared specs: a Service handed the same `Arc` as last
    /// time is not even hashed, so one changed Service among 10,000 costs its own build and
    /// the address index.
    pub fn rebuild_shared(
        &self,
        services: &[Arc<ServiceSpec>],
        node: &str,
        zone: Option<&str>,
        lb: LoadBalancing,
    ) -> ServiceTable {
        let prev = &self.shared;
        let reuse = prev.node == node && prev.zone.as_deref() == zone;
        let mut t = Frontends {
            node: node.to_string(),
            zone: zone.map(str::to_string),
            ..Frontends::default()
        };
        t.built.reserve(services.len());
        let mut order = Vec::with_capacity(services.len());
        for s in services.iter().filter(|s| s.proxy_name.is_none()) {
            let found = prev.built.get_key_value(&KeyRef(&s.namespace, &s.name));
            let key = match found {
                Some((k, _)) => k.clone(),
                None => (Arc::from(s.namespace.as_str()), Arc::from(s.name.as_str())),
            };
            let old = found.map(|(_, b)| b).filter(|_| reuse);
            let built = match old.filter(|b| Arc::ptr_eq(&b.source, s)) {
                Some(b) => b.clone(),
                None => {
                    let hash = spec_hash(s);
                    match old.filter(|b| b.spec == hash) {
                        // The same spec in another `Arc`: the frontends are kept, and the new
                        // `Arc` is remembered so that the next table finds it without hashing.
                        Some(b) => Arc::new(Built {
                            source: s.clone(),
                            spec: hash,
                            cluster: b.cluster.clone(),
                            external: b.external.clone(),
                        }),
                        None => Arc::new(build_service(s, node, zone, hash)),
                    }
                }
            };
            order.push(built.clone());
            t.built.insert(key, built);
        }
        let count = order
            .iter()
            .map(|b| b.cluster.len() + b.external.len())
            .sum();
        t.frontends.reserve(count);
        t.index = VipIndex::with_room(count);
        for built in &order {
            for fe in &built.cluster {
                t.frontends.push(fe.clone());
                t.index.insert(fe, true);
            }
            for fe in &built.external {
                // The first Service (in name order) to claim an external address keeps it.
                if t.index.insert(fe, false) {
                    t.frontends.push(fe.clone());
                }
            }
        }
        ServiceTable {
            shared: Arc::new(t),
            lb,
        }
    }

    /// The frontend serving a client at `src` that looked up `fe`: its internal twin when the
    /// client is inside the cluster (`in_cluster`).
    #[inline]
    pub fn for_client<'a>(&'a self, fe: &'a Frontend, in_cluster: bool) -> &'a Frontend {
        match &fe.internal {
            Some(twin) if in_cluster => twin,
            _ => fe,
        }
    }

    /// The topology zone the frontends were built for.
    pub fn zone(&self) -> Option<&str> {
        self.shared.zone.as_deref()
    }

    /// The UDP backends' addresses of Service `namespace/name`.
    pub fn udp_backends_of(&self, namespace: &str, name: &str) -> Vec<Ipv4Addr> {
        let Some(b) = self.shared.built.get(&KeyRef(namespace, name)) else {
            return Vec::new();
        };
        b.cluster
            .iter()
            .chain(&b.external)
            .filter(|f| f.proto == crate::wire::IpProtocol::UDP.0)
            .flat_map(|f| f.backends.iter().map(|b| b.ip))
            .collect()
    }

    /// Every UDP backend's address.
    pub fn udp_backends(&self) -> std::collections::BTreeSet<Ipv4Addr> {
        self.frontends()
            .iter()
            .filter(|f| f.proto == crate::wire::IpProtocol::UDP.0)
            .flat_map(|f| f.backends.iter().map(|b| b.ip))
            .collect()
    }

    /// Whether two tables are one and the same (a snapshot kept its predecessor's Services).
    pub fn ptr_eq(a: &ServiceTable, b: &ServiceTable) -> bool {
        Arc::ptr_eq(&a.shared, &b.shared)
    }

    #[inline]
    pub fn lookup(&self, vip: Ipv4Addr, proto: u8, port: u16) -> Option<&Frontend> {
        self.find(vip, proto, port).map(|h| h.fe)
    }

    /// Starts loading, without waiting, what [`ServiceTable::find`] will read for `vip`,
    /// `proto`, `port`: among 10,000 Services it is not in cache.
    #[inline]
    pub fn prefetch(&self, vip: Ipv4Addr, proto: u8, port: u16) {
        self.shared.index.prefetch(vip, proto, port)
    }

    /// [`ServiceTable::lookup`] with the frontend's index slot, which a new connection's
    /// backend is mostly chosen from ([`Hit::plain_choice`]).
    #[inline]
    pub(super) fn find(&self, vip: Ipv4Addr, proto: u8, port: u16) -> Option<Hit<'_>> {
        self.shared.index.find(vip, proto, port)
    }

    /// Whether any frontend uses this address (for "a Service address with no such port").
    pub fn is_vip(&self, ip: Ipv4Addr) -> bool {
        self.shared.frontends.iter().any(|f| f.vip == ip)
    }

    pub fn frontends(&self) -> &[Arc<Frontend>] {
        &self.shared.frontends
    }

    /// Heap bytes the table holds (frontends, backends, Maglev tables, names, index), for
    /// sizing: what 10,000 Services cost.
    pub fn heap_bytes(&self) -> usize {
        let per_frontend: usize = self
            .shared
            .frontends
            .iter()
            .map(|f| {
                f.backends.len() * std::mem::size_of::<Backend>()
                    + f.maglev.len() * std::mem::size_of::<u16>()
                    + f.name.capacity()
            })
            .sum();
        per_frontend
            + self.shared.frontends.capacity() * std::mem::size_of::<Frontend>()
            + self.shared.index.heap_bytes()
    }

    pub fn is_empty(&self) -> bool {
        self.shared.frontends.is_empty()
    }
}

/// A TCP frontend `default/web` at `vip`:`port` for tests, of `n` backends (10.244.0.10 on)
/// whose target ports take `ports` values (8080, 8081, ...).
#[cfg(test)]
pub(super) fn test_frontend(vip: Ipv4Addr, port: u16, n: usize, ports: usize) -> Frontend {
    let backends = (0..n)
        .map(|i| Backend {
            ip: Ipv4Addr::new(10, 244, (i / 200) as u8, 10 + (i % 200) as u8),
            port: 8080 + (i % ports.max(1)) as u16,
        })
        .collect::<Vec<_>>();
    Frontend {
        name: format!("default/web:{port}/TCP"),
        vip,
        port,
        proto: IpProtocol::TCP.0,
        maglev: maglev(&backends),
        backends: backends.into(),
        affinity_secs: None,
        affinity_key: 0,
        internal: None,
        masquerade_outside: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frontend(n: usize) -> Frontend {
        test_frontend(Ipv4Addr::new(10, 96, 0, 10), 80, n, 1)
    }

    fn without(fe: &Frontend, gone: usize) -> Frontend {
        let mut backends = fe.backends.to_vec();
        backends.remove(gone);
        Frontend {
            maglev: maglev(&backends),
            backends: backends.into(),
            ..fe.clone()
        }
    }

    /// `count` connections to the frontend from 256 clients.
    fn keys(count: u32) -> impl Iterator<Item = Key> {
        (0..count).map(|i| Key {
            src: Ipv4Addr::from(0x0af4_0100 + (i % 256)),
            dst: Ipv4Addr::new(10, 96, 0, 10),
            sport: 1024 + (i / 256) as u16,
            dport: 80,
            proto: IpProtocol::TCP.0,
        })
    }

    fn chosen(fe: &Frontend, k: &Key) -> Ipv4Addr {
        fe.backends[fe.consistent_choice(k).expect("a backend")].ip
    }

    #[test]
    fn small_frontends_have_no_table_and_large_ones_have_maglevs() {
        assert!(frontend(0)
            .consistent_choice(&keys(1).next().unwrap())
            .is_none());
        assert!(frontend(1).maglev.is_empty());
        assert!(frontend(RENDEZVOUS_MAX).maglev.is_empty());
        assert_eq!(frontend(RENDEZVOUS_MAX + 1).maglev.len(), 4093);
    }

    #[test]
    fn connections_spread_evenly_with_and_without_a_table() {
        for n in [2, 10, RENDEZVOUS_MAX, RENDEZVOUS_MAX + 1, 100] {
            let fe = frontend(n);
            let total = 200_000;
            let mut count = vec![0u32; n];
            for k in keys(total) {
                count[fe.consistent_choice(&k).unwrap()] += 1;
            }
            let fair = f64::from(total) / n as f64;
            for (i, c) in count.iter().enumerate() {
                let off = (f64::from(*c) - fair).abs() / fair;
                assert!(off < 0.1, "{n} backends: backend {i} has {c}, fair {fair}");
            }
        }
    }

    #[test]
    fn every_table_with_the_same_backends_chooses_the_same_one() {
        // Another node, or this one after a restart: the same connection, the same backend.
        for n in [3, 100] {
            let (a, b) = (frontend(n), frontend(n));
            assert!(keys(10_000).all(|k| chosen(&a, &k) == chosen(&b, &k)));
        }
    }

    #[test]
    fn removing_a_backend_moves_little_but_its_own_connections() {
        for (n, others_moved) in [(10, 0.0), (RENDEZVOUS_MAX, 0.0), (100, 0.05)] {
            let fe = frontend(n);
            let gone = n / 2;
            let after = without(&fe, gone);
            let (mut own, mut moved, mut total) = (0, 0, 0);
            for k in keys(100_000) {
                let before = chosen(&fe, &k);
                let now = chosen(&after, &k);
                if before == fe.backends[gone].ip {
                    own += 1;
                    assert_ne!(now, before);
                } else {
                    total += 1;
                    moved += u32::from(now != before);
                }
            }
            assert!(own > 0);
            let share = f64::from(moved) / f64::from(total);
            assert!(
                share <= others_moved,
                "{n} backends: {share} of the others' connections moved"
            );
        }
    }

    #[test]
    fn an_added_backend_takes_about_its_share() {
        for n in [9, RENDEZVOUS_MAX - 1, 99] {
            let (before, after) = (frontend(n), frontend(n + 1));
            let added = after.backends[n].ip;
            let total = 100_000;
            let (mut moved, mut to_added) = (0u32, 0u32);
            for k in keys(total) {
                let (b, a) = (chosen(&before, &k), chosen(&after, &k));
                moved += u32::from(a != b);
                to_added += u32::from(a == added);
            }
            let share = 1.0 / (n + 1) as f64;
            let moved = f64::from(moved) / f64::from(total);
            // Maglev moves a few more than the new backend's share (a table slot's owner
            // changes as the permutations refill it); rendezvous hashing that share alone.
            let most = if n < RENDEZVOUS_MAX { 1.5 } else { 3.0 };
            assert!(moved < share * most, "{n}+1 backends: {moved} moved");
            if n < RENDEZVOUS_MAX {
                // Rendezvous: a connection moves only to the new backend.
                assert_eq!(moved, f64::from(to_added) / f64::from(total));
            }
        }
    }
}
