//! Service translation: what kube-proxy does with iptables, done inline.
//!
//! A Service frontend (ClusterIP or external IP, protocol, port) maps to backends. The first
//! packet of a connection picks a backend (Maglev consistent hashing by default, so most
//! connections keep their backend when others come and go; or random), is rewritten to it
//! (DNAT), and leaves an entry in the connection tracking table keyed both ways; later packets
//! of either direction find that entry and are rewritten the same way, so replies come back from
//! the ClusterIP. Checksums are patched incrementally, and for checksum-offloaded frames the
//! partial (pseudo-header) sum is patched instead, so a 64 KiB super-frame costs the same as a
//! small packet.
//!
//! A pod that reaches itself through its Service (hairpin) would answer itself directly and
//! never see the translation undone; such connections are also source-translated to the
//! gateway address, as kube-proxy masquerades them.
//!
//! The table is owned by one datapath worker and changed only by it (no lock); expiry is lazy on
//! lookup plus a bounded sweep driven by the worker's clock. It has a hard size: when full, an
//! entry close to expiry among a small sample is evicted (counted), never unbounded growth.

use std::net::Ipv4Addr;

use hashbrown::HashMap;

use conf::config::{LoadBalancing, Protocol, ServiceSpec, TrafficPolicy};

use crate::wire::checksum;
use crate::wire::{IpProtocol, Ipv4Packet, TcpFlags, TcpPacket, UdpPacket};

type Map<K, V> = HashMap<K, V, foldhash::fast::FixedState>;

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
    maglev: Box<[u16]>,
    /// sessionAffinity ClientIP timeout, seconds.
    pub affinity_secs: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub ip: Ipv4Addr,
    pub port: u16,
}

/// Every Service frontend, by (address, protocol, port).
#[derive(Debug, Clone, Default)]
pub struct ServiceTable {
    frontends: Vec<Frontend>,
    by_vip: Map<(Ipv4Addr, u8, u16), u32>,
    pub lb: LoadBalancing,
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
        let mut t = ServiceTable {
            lb,
            ..Default::default()
        };
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
        t
    }

    #[inline]
    pub fn lookup(&self, vip: Ipv4Addr, proto: u8, port: u16) -> Option<&Frontend> {
        self.by_vip
            .get(&(vip, proto, port))
            .and_then(|&i| self.frontends.get(i as usize))
    }

    /// Whether any frontend uses this address (for "a Service address with no such port").
    pub fn is_vip(&self, ip: Ipv4Addr) -> bool {
        self.frontends.iter().any(|f| f.vip == ip)
    }

    pub fn frontends(&self) -> &[Frontend] {
        &self.frontends
    }

    /// Heap bytes the table holds (frontends, backends, Maglev tables, names, index), for
    /// sizing: what 10,000 Services cost.
    pub fn heap_bytes(&self) -> usize {
        let per_frontend: usize = self
            .frontends
            .iter()
            .map(|f| {
                f.backends.capacity() * std::mem::size_of::<Backend>()
                    + f.maglev.len() * std::mem::size_of::<u16>()
                    + f.name.capacity()
            })
            .sum();
        per_frontend
            + self.frontends.capacity() * std::mem::size_of::<Frontend>()
            + self.by_vip.capacity() * (std::mem::size_of::<((Ipv4Addr, u8, u16), u32)>() + 1)
    }

    pub fn is_empty(&self) -> bool {
        self.frontends.is_empty()
    }
}

/// A connection's addresses as one direction's packets carry them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

impl Key {
    fn reversed(&self) -> Key {
        Key {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtState {
    /// TCP: SYN seen from the client, nothing back yet.
    SynSent,
    Established,
    /// TCP: FIN seen.
    Closing,
    /// TCP: RST seen.
    Closed,
    /// UDP: seen in one direction only.
    UdpNew,
    /// UDP: seen both ways.
    UdpAssured,
}

#[derive(Debug, Clone)]
pub struct CtEntry {
    /// The client's packets as sent: client -> VIP.
    pub orig: Key,
    /// The backend's packets as sent: backend -> client (or gateway when hairpinned).
    pub reply: Key,
    pub backend: Backend,
    /// Source translation: the client is seen by the backend as this address and port
    /// (hairpin: the gateway; a source-port clash: another port).
    pub snat: Option<(Ipv4Addr, u16)>,
    pub state: CtState,
    pub expires_ms: u64,
    pub frontend: String,
}

/// Timeouts and limits, from the config (`[nat]`).
#[derive(Debug, Clone, Copy)]
pub struct CtConfig {
    pub tcp_established_ms: u64,
    pub tcp_transitory_ms: u64,
    pub udp_ms: u64,
    pub max: usize,
}

impl CtConfig {
    pub fn from_config(n: &conf::config::NatConfig) -> Self {
        CtConfig {
            tcp_established_ms: u64::from(n.tcp_established_timeout) * 1000,
            tcp_transitory_ms: u64::from(n.tcp_transitory_timeout) * 1000,
            udp_ms: u64::from(n.udp_timeout) * 1000,
            max: n.conntrack_max as usize,
        }
    }

    fn timeout(&self, state: CtState) -> u64 {
        match state {
            CtState::Established => self.tcp_established_ms,
            CtState::SynSent | CtState::Closing => self.tcp_transitory_ms,
            CtState::Closed => self.tcp_transitory_ms.min(10_000),
            CtState::UdpNew | CtState::UdpAssured => self.udp_ms,
        }
    }
}

impl Default for CtConfig {
    fn default() -> Self {
        CtConfig::from_config(&conf::config::NatConfig::default())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Orig,
    Reply,
}

/// Counters of the connection tracking table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CtCounters {
    pub created: u64,
    pub expired: u64,
    pub evicted: u64,
    pub flushed: u64,
}

/// The connection tracking table of one worker.
pub struct Conntrack {
    cfg: CtConfig,
    slots: Vec<Option<CtEntry>>,
    free: Vec<u32>,
    index: Map<Key, (u32, Dir)>,
    affinity: Map<(Ipv4Addr, u32), (Backend, u64)>,
    rng: u64,
    sweep_at: usize,
    pub counters: CtCounters,
}

impl Conntrack {
    pub fn new(cfg: CtConfig) -> Self {
        Conntrack {
            cfg,
            slots: Vec::new(),
            free: Vec::new(),
            index: Map::default(),
            affinity: Map::default(),
            rng: 0x9e37_79b9_7f4a_7c15,
            sweep_at: 0,
            counters: CtCounters::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn entries(&self) -> impl Iterator<Item = &CtEntry> {
        self.slots.iter().flatten()
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: the switch needs spread, not secrecy.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn remove(&mut self, slot: u32) -> Option<CtEntry> {
        let e = self.slots.get_mut(slot as usize)?.take()?;
        self.index.remove(&e.orig);
        self.index.remove(&e.reply);
        self.free.push(slot);
        Some(e)
    }

    fn find(&mut self, key: &Key, now: u64) -> Option<(u32, Dir)> {
        let (slot, dir) = *self.index.get(key)?;
        let expired = self
            .slots
            .get(slot as usize)
            .and_then(|e| e.as_ref())
            .is_none_or(|e| e.expires_ms <= now);
        if expired {
            self.remove(slot);
            self.counters.expired += 1;
            return None;
        }
        Some((slot, dir))
    }

    fn insert(&mut self, e: CtEntry, now: u64) -> Option<u32> {
        if self.index.contains_key(&e.orig) || self.index.contains_key(&e.reply) {
            return None;
        }
        if self.len() >= self.cfg.max {
            self.sweep(now, 64);
            if self.len() >= self.cfg.max {
                // Evict the entry closest to expiry among a few.
                let victim = self
                    .slots
                    .iter()
                    .enumerate()
                    .skip(self.sweep_at % self.slots.len().max(1))
                    .filter_map(|(i, e)| e.as_ref().map(|e| (i, e.expires_ms)))
                    .take(8)
                    .min_by_key(|&(_, exp)| exp)
                    .map(|(i, _)| i as u32)
                    .or_else(|| {
                        self.slots
                            .iter()
                            .position(|e| e.is_some())
                            .map(|i| i as u32)
                    });
                if let Some(v) = victim {
                    self.remove(v);
                    self.counters.evicted += 1;
                }
            }
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        self.index.insert(e.orig, (slot, Dir::Orig));
        self.index.insert(e.reply, (slot, Dir::Reply));
        self.slots[slot as usize] = Some(e);
        self.counters.created += 1;
        Some(slot)
    }

    /// Removes up to `budget` expired entries, continuing where the last sweep stopped.
    pub fn sweep(&mut self, now: u64, budget: usize) {
        let n = self.slots.len();
        if n == 0 {
            return;
        }
        for _ in 0..budget.min(n) {
            self.sweep_at = (self.sweep_at + 1) % n;
            let i = self.sweep_at;
            if self.slots[i].as_ref().is_some_and(|e| e.expires_ms <= now) {
                self.remove(i as u32);
                self.counters.expired += 1;
            }
        }
        self.affinity.retain(|_, (_, exp)| *exp > now);
    }

    /// Drops every UDP entry towards one of these backends at once: a removed UDP endpoint
    /// must not keep receiving a client's datagrams until its entry times out.
    pub fn flush_udp_to(&mut self, backends: &[Ipv4Addr]) -> usize {
        let victims: Vec<u32> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                e.as_ref()
                    .filter(|e| {
                        e.orig.proto == IpProtocol::UDP.0 && backends.contains(&e.backend.ip)
                    })
                    .map(|_| i as u32)
            })
            .collect();
        for v in &victims {
            self.remove(*v);
        }
        self.affinity.retain(|_, (b, _)| !backends.contains(&b.ip));
        self.counters.flushed += victims.len() as u64;
        victims.len()
    }

    fn pick(&mut self, fe: &Frontend, key: &Key, lb: LoadBalancing, now: u64) -> Backend {
        if let Some(secs) = fe.affinity_secs {
            if let Some((b, exp)) = self.affinity.get_mut(&(key.src, fe.id)) {
                if *exp > now && fe.backends.contains(b) {
                    *exp = now + u64::from(secs) * 1000;
                    return b.clone();
                }
            }
        }
        let n = fe.backends.len();
        let idx = match lb {
            LoadBalancing::Maglev if !fe.maglev.is_empty() => {
                use std::hash::BuildHasher;
                let h = foldhash::fast::FixedState::with_seed(0x6374).hash_one(key);
                fe.maglev[(h % fe.maglev.len() as u64) as usize] as usize
            }
            _ => (self.next_random() % n as u64) as usize,
        };
        let b = fe.backends[idx.min(n - 1)].clone();
        if let Some(secs) = fe.affinity_secs {
            self.affinity
                .insert((key.src, fe.id), (b.clone(), now + u64::from(secs) * 1000));
        }
        b
    }
}

/// What translation did to a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// Not a Service's, not a tracked connection's.
    None,
    /// Rewritten (either direction).
    Translated,
    /// A Service frontend with no backend: the caller rejects it (TCP RST or ICMP port
    /// unreachable from the Service address).
    NoBackend,
    /// A table full of entries that could not be evicted, or a hairpin address clash.
    Refused,
}

/// L4 header facts of a TCP/UDP packet.
struct L4 {
    key: Key,
    flags: TcpFlags,
}

fn l4_of(ip: &Ipv4Packet<&mut [u8]>) -> Option<L4> {
    if ip.is_fragment() {
        return None;
    }
    let proto = ip.protocol();
    let p = ip.payload();
    let (sport, dport, flags) = if proto == IpProtocol::TCP {
        let t = TcpPacket::new_checked(p).ok()?;
        (t.src_port(), t.dst_port(), t.flags())
    } else if proto == IpProtocol::UDP {
        let u = UdpPacket::new_checked(p).ok()?;
        (u.src_port(), u.dst_port(), TcpFlags::empty())
    } else {
        return None;
    };
    Some(L4 {
        key: Key {
            src: ip.src_addr(),
            dst: ip.dst_addr(),
            sport,
            dport,
            proto: proto.0,
        },
        flags,
    })
}

/// Rewrites addresses and ports, patching the IP header checksum and the L4 checksum (or, for
/// a checksum-offloaded frame, its partial pseudo-header sum, which covers addresses but not
/// ports).
pub fn rewrite(
    ip: &mut Ipv4Packet<&mut [u8]>,
    src: Option<(Ipv4Addr, u16)>,
    dst: Option<(Ipv4Addr, u16)>,
    csum_partial: bool,
) {
    let (old_src, old_dst) = (ip.src_addr(), ip.dst_addr());
    if let Some((a, _)) = src {
        ip.set_src_addr_incremental(a);
    }
    if let Some((a, _)) = dst {
        ip.set_dst_addr_incremental(a);
    }
    let proto = ip.protocol();
    let payload = ip.payload_mut();
    // Offsets of ports and checksum in TCP and UDP.
    let csum_at = if proto == IpProtocol::TCP {
        16
    } else if proto == IpProtocol::UDP {
        6
    } else {
        return;
    };
    if payload.len() < csum_at + 2 {
        return;
    }
    let mut csum = u16::from_be_bytes([payload[csum_at], payload[csum_at + 1]]);
    if proto == IpProtocol::UDP && csum == 0 {
        // "No checksum" stays so; only the ports change.
        if let Some((_, p)) = src {
            payload[0..2].copy_from_slice(&p.to_be_bytes());
        }
        if let Some((_, p)) = dst {
            payload[2..4].copy_from_slice(&p.to_be_bytes());
        }
        return;
    }
    // A partial sum is the pseudo-header sum itself, not its complement.
    let update32 = |c: u16, old: Ipv4Addr, new: Ipv4Addr| {
        if csum_partial {
            !checksum::update_u32(!c, u32::from(old), u32::from(new))
        } else {
            checksum::update_u32(c, u32::from(old), u32::from(new))
        }
    };
    if let Some((a, p)) = src {
        csum = update32(csum, old_src, a);
        let old_p = u16::from_be_bytes([payload[0], payload[1]]);
        if !csum_partial {
            csum = checksum::update_u16(csum, old_p, p);
        }
        payload[0..2].copy_from_slice(&p.to_be_bytes());
    }
    if let Some((a, p)) = dst {
        csum = update32(csum, old_dst, a);
        let old_p = u16::from_be_bytes([payload[2], payload[3]]);
        if !csum_partial {
            csum = checksum::update_u16(csum, old_p, p);
        }
        payload[2..4].copy_from_slice(&p.to_be_bytes());
    }
    if proto == IpProtocol::UDP && csum == 0 && !csum_partial {
        csum = 0xffff;
    }
    payload[csum_at..csum_at + 2].copy_from_slice(&csum.to_be_bytes());
}

fn advance(state: CtState, dir: Dir, flags: TcpFlags, proto: u8) -> CtState {
    if proto == IpProtocol::UDP.0 {
        return match (state, dir) {
            (CtState::UdpNew, Dir::Reply) => CtState::UdpAssured,
            (s, _) => s,
        };
    }
    if flags.contains(TcpFlags::RST) {
        return CtState::Closed;
    }
    if flags.contains(TcpFlags::FIN) {
        return CtState::Closing;
    }
    match (state, dir) {
        (CtState::SynSent, Dir::Reply) if flags.contains(TcpFlags::ACK) => CtState::Established,
        // A SYN again on a closed or closing tuple starts over.
        (CtState::Closed | CtState::Closing, Dir::Orig) if flags.contains(TcpFlags::SYN) => {
            CtState::SynSent
        }
        (s, _) => s,
    }
}

/// Translates a backend's reply of a tracked connection back to the Service address, and
/// nothing else. For frames switched at layer 2: a backend on the client's own subnet answers
/// the client directly, not through the gateway, yet the client must see the Service address.
pub fn untranslate_reply(
    ct: &mut Conntrack,
    now: u64,
    ip: &mut Ipv4Packet<&mut [u8]>,
    csum_partial: bool,
) -> bool {
    if ct.is_empty() {
        return false;
    }
    let Some(l4) = l4_of(ip) else {
        return false;
    };
    let Some((slot, Dir::Reply)) = ct.find(&l4.key, now) else {
        return false;
    };
    let cfg = ct.cfg;
    let Some(e) = ct.slots.get_mut(slot as usize).and_then(|e| e.as_mut()) else {
        return false;
    };
    e.state = advance(e.state, Dir::Reply, l4.flags, l4.key.proto);
    e.expires_ms = now + cfg.timeout(e.state);
    let from = (e.orig.dst, e.orig.dport);
    let to = e.snat.map(|_| (e.orig.src, e.orig.sport));
    rewrite(ip, Some(from), to, csum_partial);
    true
}

/// Translates a packet if it belongs to a tracked connection or opens one to a Service.
/// `gateway` is the address hairpinned clients are seen as.
pub fn translate(
    services: &ServiceTable,
    ct: &mut Conntrack,
    now: u64,
    ip: &mut Ipv4Packet<&mut [u8]>,
    gateway: Ipv4Addr,
    csum_partial: bool,
) -> Nat {
    let Some(l4) = l4_of(ip) else {
        return Nat::None;
    };
    let key = l4.key;
    if let Some((slot, dir)) = ct.find(&key, now) {
        let cfg = ct.cfg;
        let Some(e) = ct.slots.get_mut(slot as usize).and_then(|e| e.as_mut()) else {
            return Nat::None;
        };
        e.state = advance(e.state, dir, l4.flags, key.proto);
        e.expires_ms = now + cfg.timeout(e.state);
        match dir {
            Dir::Orig => {
                let to = (e.backend.ip, e.backend.port);
                let from = e.snat;
                rewrite(ip, from, Some(to), csum_partial);
            }
            Dir::Reply => {
                let from = (e.orig.dst, e.orig.dport);
                let to = e.snat.map(|_| (e.orig.src, e.orig.sport));
                rewrite(ip, Some(from), to, csum_partial);
            }
        }
        return Nat::Translated;
    }
    let Some(fe) = services.lookup(key.dst, key.proto, key.dport) else {
        return Nat::None;
    };
    if fe.backends.is_empty() {
        return Nat::NoBackend;
    }
    // A non-SYN for an unknown connection (its entry expired or the switch restarted) is
    // tracked as established: Maglev sends it to the same backend as before whenever that
    // backend is still there, which is what lets connections survive a restart.
    let backend = ct.pick(fe, &key, services.lb, now);
    let mut snat = (backend.ip == key.src).then_some((gateway, key.sport));
    let mut reply = Key {
        src: backend.ip,
        dst: snat.map_or(key.src, |s| s.0),
        sport: backend.port,
        dport: key.sport,
        proto: key.proto,
    };
    // The client may use one source port towards two addresses that lead to the same backend
    // (a ClusterIP and an external IP, two Services over the same pods): the replies would be
    // indistinguishable, so, as kernel NAT does, the second gets another source port.
    if ct.index.contains_key(&reply) {
        use std::hash::BuildHasher;
        let h = foldhash::fast::FixedState::with_seed(0x736e_6174);
        let free = (0..32u64).find_map(|i| {
            let port = 32_768 + (h.hash_one((key, i)) % 28_232) as u16;
            let k = Key {
                dport: port,
                ..reply
            };
            (!ct.index.contains_key(&k)).then_some((port, k))
        });
        let Some((port, k)) = free else {
            return Nat::Refused;
        };
        snat = Some((snat.map_or(key.src, |s| s.0), port));
        reply = k;
    }
    let state = if key.proto == IpProtocol::TCP.0 {
        if l4.flags.contains(TcpFlags::SYN) {
            CtState::SynSent
        } else {
            advance(CtState::Established, Dir::Orig, l4.flags, key.proto)
        }
    } else {
        CtState::UdpNew
    };
    let entry = CtEntry {
        orig: key,
        reply,
        backend: backend.clone(),
        snat,
        state,
        expires_ms: now + ct.cfg.timeout(state),
        frontend: fe.name.clone(),
    };
    if ct.insert(entry, now).is_none() {
        return Nat::Refused;
    }
    rewrite(ip, snat, Some((backend.ip, backend.port)), csum_partial);
    Nat::Translated
}

/// For an ICMP error about a translated connection (a backend's "port unreachable", a router's
/// "fragmentation needed" on the way back), rewrites the quoted packet and the error's own
/// source so the client sees them about the Service address. Returns whether it did.
pub fn translate_icmp_error(ct: &mut Conntrack, now: u64, ip: &mut Ipv4Packet<&mut [u8]>) -> bool {
    use crate::wire::{Icmpv4Message, Icmpv4Packet};
    if ip.protocol() != IpProtocol::ICMP || ip.is_fragment() {
        return false;
    }
    let (outer_src, outer_dst) = (ip.src_addr(), ip.dst_addr());
    let Ok(icmp) = Icmpv4Packet::new_checked(ip.payload_mut()) else {
        return false;
    };
    let t = icmp.msg_type();
    if t != Icmpv4Message::DST_UNREACHABLE && t != Icmpv4Message::TIME_EXCEEDED {
        return false;
    }
    // The quoted packet is one the backend's side sent: client -> backend after translation.
    let quoted_key = {
        let Ok(q) = Ipv4Packet::new_checked_quoted(icmp.data()) else {
            return false;
        };
        let l4 = q.payload();
        if l4.len() < 4 {
            return false;
        }
        Key {
            src: q.src_addr(),
            dst: q.dst_addr(),
            sport: u16::from_be_bytes([l4[0], l4[1]]),
            dport: u16::from_be_bytes([l4[2], l4[3]]),
            proto: q.protocol().0,
        }
    };
    // That packet, reversed, is what the backend would send: the reply key.
    let Some((slot, Dir::Reply)) = ct.find(&quoted_key.reversed(), now) else {
        return false;
    };
    let Some(e) = ct.slots.get(slot as usize).and_then(|e| e.clone()) else {
        return false;
    };
    let mut icmp = match Icmpv4Packet::new_checked(ip.payload_mut()) {
        Ok(i) => i,
        Err(_) => return false,
    };
    {
        let data = icmp.data_mut();
        let Ok(mut q) = Ipv4Packet::new_checked_quoted(&mut *data) else {
            return false;
        };
        q.set_dst_addr_incremental(e.orig.dst);
        if e.snat.is_some() {
            q.set_src_addr_incremental(e.orig.src);
        }
        let hl = q.header_len() as usize;
        let l4 = &mut data[hl..];
        if l4.len() >= 4 {
            l4[2..4].copy_from_slice(&e.orig.dport.to_be_bytes());
            if e.snat.is_some() {
                l4[0..2].copy_from_slice(&e.orig.sport.to_be_bytes());
            }
        }
    }
    icmp.fill_checksum();
    // An error from the backend itself comes from the Service address; one from a router on
    // the way keeps its source.
    if outer_src == e.backend.ip {
        ip.set_src_addr_incremental(e.orig.dst);
    }
    if e.snat.is_some() && outer_dst == e.reply.dst {
        ip.set_dst_addr_incremental(e.orig.src);
    }
    true
}
