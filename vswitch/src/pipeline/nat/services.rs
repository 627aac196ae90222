//! Service frontends and their backends, and the Maglev table each frontend picks backends
//! with.

use std::net::Ipv4Addr;
use std::sync::Arc;

use conf::config::{LoadBalancing, Protocol, ServiceSpec, TrafficPolicy};

use super::Map;
use crate::wire::IpProtocol;

/// One frontend of a Service: where clients send, and the backends behind it.
#[derive(Debug, Clone)]
pub struct Frontend {
    pub id: u32,
    /// `namespace/name:port/proto`, for the admin API and traces.
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
    /// The backends in use (ready, or serving-and-terminating when none is ready).
    pub backends: Vec<Backend>,
    /// Maglev lookup table: slot -> index into `backends`.
    pub(super) maglev: Box<[u16]>,
    /// sessionAffinity ClientIP timeout, seconds.
    pub affinity_secs: Option<u32>,
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
/// records, new peers) shares them instead of copying them; only a change of Services builds
/// a new one.
#[derive(Debug, Clone, Default)]
pub struct ServiceTable {
    shared: Arc<Frontends>,
    pub lb: LoadBalancing,
}

#[derive(Debug, Default)]
struct Frontends {
    frontends: Vec<Frontend>,
    by_vip: Map<(Ipv4Addr, u8, u16), u32>,
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
fn maglev(backends: &[Backend]) -> Box<[u16]> {
    use std::hash::BuildHasher;
    let n = backends.len();
    if n == 0 {
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

impl ServiceTable {
    /// Builds the frontends of `services` as seen from node `node`.
    pub fn build(services: &[ServiceSpec], node: &str, lb: LoadBalancing) -> ServiceTable {
        let mut t = Frontends::default();
        for s in services {
            let local_only = s.internal_traffic_policy == TrafficPolicy::Local;
            for p in &s.ports {
                let Some(proto) = proto_num(p.protocol) else {
                    continue;
                };
                let target = p.target_port.unwrap_or(p.port);
                let eligible = |e: &&conf::config::EndpointSpec| {
                    !local_only || e.node.as_deref() == Some(node)
                };
                let v4 = |e: &conf::config::EndpointSpec| match e.ip {
                    std::net::IpAddr::V4(ip) => Some(Backend { ip, port: target }),
                    std::net::IpAddr::V6(_) => None,
                };
                let mut backends: Vec<Backend> = s
                    .endpoints
                    .iter()
                    .filter(eligible)
                    .filter(|e| e.ready)
                    .filter_map(v4)
                    .collect();
                if backends.is_empty() {
                    // KEP-1669: with no ready endpoint, terminating ones that still serve are
                    // better than a black hole.
                    backends = s
                        .endpoints
                        .iter()
                        .filter(eligible)
                        .filter(|e| e.serving && e.terminating)
                        .filter_map(v4)
                        .collect();
                }
                backends.sort_by_key(|b| (b.ip, b.port));
                backends.dedup();
                let vips = s.cluster_ips.iter().chain(&s.external_ips);
                for vip in vips {
                    let std::net::IpAddr::V4(vip) = *vip else {
                        continue;
                    };
                    let id = t.frontends.len() as u32;
                    t.frontends.push(Frontend {
                        id,
                        name: format!(
                            "{}/{}:{}/{}",
                            s.namespace,
                            s.name,
                            p.port,
                            if proto == IpProtocol::TCP.0 {
                                "TCP"
                            } else {
                                "UDP"
                            }
                        ),
                        vip,
                        port: p.port,
                        proto,
                        maglev: maglev(&backends),
                        backends: backends.clone(),
                        affinity_secs: s.session_affinity_timeout,
                    });
                    t.by_vip.insert((vip, proto, p.port), id);
                }
            }
        }
        ServiceTable {
            shared: Arc::new(t),
            lb,
        }
    }

    /// Whether two tables are one and the same (a snapshot kept its predecessor's Services).
    pub fn ptr_eq(a: &ServiceTable, b: &ServiceTable) -> bool {
        Arc::ptr_eq(&a.shared, &b.shared)
    }

    #[inline]
    pub fn lookup(&self, vip: Ipv4Addr, proto: u8, port: u16) -> Option<&Frontend> {
        self.shared
            .by_vip
            .get(&(vip, proto, port))
            .and_then(|&i| self.shared.frontends.get(i as usize))
    }

    /// Whether any frontend uses this address (for "a Service address with no such port").
    pub fn is_vip(&self, ip: Ipv4Addr) -> bool {
        self.shared.frontends.iter().any(|f| f.vip == ip)
    }

    pub fn frontends(&self) -> &[Frontend] {
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
                f.backends.capacity() * std::mem::size_of::<Backend>()
                    + f.maglev.len() * std::mem::size_of::<u16>()
                    + f.name.capacity()
            })
            .sum();
        per_frontend
            + self.shared.frontends.capacity() * std::mem::size_of::<Frontend>()
            + self.shared.by_vip.capacity()
                * (std::mem::size_of::<((Ipv4Addr, u8, u16), u32)>() + 1)
    }

    pub fn is_empty(&self) -> bool {
        self.shared.frontends.is_empty()
    }
}
