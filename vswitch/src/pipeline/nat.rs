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
//! Several datapath workers share one table, because the two directions of a connection may be
//! read by different workers (a client's packets on one TAP queue, the backend's replies on
//! another), yet no lock may sit on the per-packet path. So each worker holds a view: its own
//! index from both keys to the connection, which is one shared allocation whose state and
//! expiry are atomics any worker updates in place. The worker that sees a connection's first
//! packet creates and owns it, and announces it to the other views through a channel before
//! the packet is sent on, so a reply can only be read after the announcement was queued; a view
//! that misses a lookup drains its channel and looks again before concluding there is no
//! connection. Only the owner frees a connection (and announces that), so each index changes
//! only in its own thread; a removal never takes keys that a newer connection has taken over.
//! Expiry is lazy on lookup plus a bounded sweep of each worker's own connections driven by its
//! clock. The group has a hard size, counted together: when full, a connection close to expiry
//! among a small sample is evicted (counted), never unbounded growth.

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
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

impl CtState {
    fn from_u8(v: u8) -> CtState {
        match v {
            0 => CtState::SynSent,
            1 => CtState::Established,
            2 => CtState::Closing,
            3 => CtState::Closed,
            4 => CtState::UdpNew,
            _ => CtState::UdpAssured,
        }
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

/// One tracked connection, the same allocation in every worker's view: what a packet changes
/// (state, expiry) is atomic so that whichever worker reads the packet updates it in place.
struct Conn {
    orig: Key,
    reply: Key,
    backend: Backend,
    snat: Option<(Ipv4Addr, u16)>,
    frontend: String,
    /// The view that created it, the only one that frees it.
    owner: u32,
    /// Its place in the owner's slab.
    slot: u32,
    state: AtomicU8,
    expires_ms: AtomicU64,
    /// Set once, by whoever ends it first (the owner removing it, or any view finding it
    /// expired or evicting it); that one also gives its place back to the shared count.
    dead: AtomicBool,
}

impl Conn {
    fn state(&self) -> CtState {
        CtState::from_u8(self.state.load(Relaxed))
    }

    /// Which direction's packets carry `key` (one of this connection's two).
    fn dir_of(&self, key: &Key) -> Dir {
        if self.orig == *key {
            Dir::Orig
        } else {
            Dir::Reply
        }
    }

    fn is_live(&self, now: u64) -> bool {
        !self.dead.load(Relaxed) && self.expires_ms.load(Relaxed) > now
    }

    /// One packet in direction `dir`: the state moves on and the expiry with it.
    fn touch(&self, cfg: &CtConfig, now: u64, dir: Dir, flags: TcpFlags) {
        let proto = self.orig.proto;
        // A compare-exchange, not a store: two workers with packets of both directions at
        // once must not lose a transition (a SYN-ACK's Established overwritten by a stale
        // SynSent).
        let mut cur = self.state.load(Relaxed);
        let mut state = loop {
            let s = CtState::from_u8(cur);
            let next = advance(s, dir, flags, proto);
            if next == s {
                break s;
            }
            match self
                .state
                .compare_exchange_weak(cur, next as u8, SeqCst, Relaxed)
            {
                Ok(_) => break next,
                Err(seen) => cur = seen,
            }
        };
        // Stored only when it changes (once a millisecond at most), so that the packets of a
        // busy connection read by two workers do not bounce its cache line for nothing. After
        // a store, the state is read again: a transition made by another worker meanwhile
        // (an RST) must not be left with the expiry of the state before it.
        for _ in 0..4 {
            let exp = now.saturating_add(cfg.timeout(state));
            if self.expires_ms.load(Relaxed) == exp {
                return;
            }
            self.expires_ms.store(exp, SeqCst);
            let again = CtState::from_u8(self.state.load(SeqCst));
            if again == state {
                return;
            }
            state = again;
        }
    }

    /// Rewrites a packet of this connection as its direction is translated: the client's
    /// to the backend (and, hairpinned, from the gateway), the backend's back to the Service
    /// address (and to the client's own address and port).
    fn rewrite(&self, dir: Dir, ip: &mut Ipv4Packet<&mut [u8]>, csum_partial: bool) {
        match dir {
            Dir::Orig => {
                let to = (self.backend.ip, self.backend.port);
                rewrite(ip, self.snat, Some(to), csum_partial);
            }
            Dir::Reply => {
                let from = (self.orig.dst, self.orig.dport);
                let to = self.snat.map(|_| (self.orig.src, self.orig.sport));
                rewrite(ip, Some(from), to, csum_partial);
            }
        }
    }

    fn snapshot(&self) -> CtEntry {
        CtEntry {
            orig: self.orig,
            reply: self.reply,
            backend: self.backend.clone(),
            snat: self.snat,
            state: self.state(),
            expires_ms: self.expires_ms.load(Relaxed),
            frontend: self.frontend.clone(),
        }
    }
}

/// What one view tells the others.
#[derive(Clone)]
enum Msg {
    Insert(Arc<Conn>),
    Remove(Arc<Conn>),
    Affinity {
        client: Ipv4Addr,
        frontend: u32,
        backend: Backend,
        expires_ms: u64,
    },
}

/// One worker's view of the connection tracking table shared by a group of workers (a
/// standalone table is a group of one).
pub struct Conntrack {
    cfg: CtConfig,
    /// This view's worker number in its group.
    id: u32,
    /// Every connection of the group by both its keys, this view's copy. The direction is
    /// found by comparing with the connection's original key rather than stored: a smaller
    /// entry keeps more of a large index in cache, which shows on the per-packet lookup.
    index: Map<Key, Arc<Conn>>,
    /// The connections this view created: only it sweeps, evicts and flushes them.
    slots: Vec<Option<Arc<Conn>>>,
    free: Vec<u32>,
    affinity: Map<(Ipv4Addr, u32), (Backend, u64)>,
    /// When `sweep` last dropped expired affinities (a walk of the whole map).
    affinity_swept_ms: u64,
    /// Live (not yet ended) connections of the whole group, for `cfg.max`.
    live: Arc<AtomicUsize>,
    inbox: Receiver<Msg>,
    peers: Vec<Sender<Msg>>,
    rng: u64,
    sweep_at: usize,
    /// This view's own counts; a group's are the sum over its views.
    pub counters: CtCounters,
}

impl Conntrack {
    /// A table for a single worker.
    pub fn new(cfg: CtConfig) -> Self {
        Conntrack::view(
            cfg,
            0,
            Arc::default(),
            crossbeam_channel::never(),
            Vec::new(),
        )
    }

    /// `n` views of one table, one per worker (view `i` is worker `i`'s): a connection
    /// created in one is found in all, and `cfg.max` bounds them together.
    pub fn group(cfg: CtConfig, n: usize) -> Vec<Conntrack> {
        let live = Arc::new(AtomicUsize::new(0));
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| crossbeam_channel::unbounded()).unzip();
        rxs.into_iter()
            .enumerate()
            .map(|(i, inbox)| {
                let peers = txs
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != i)
                    .map(|(_, tx)| tx.clone())
                    .collect();
                Conntrack::view(cfg, i as u32, live.clone(), inbox, peers)
            })
            .collect()
    }

    fn view(
        cfg: CtConfig,
        id: u32,
        live: Arc<AtomicUsize>,
        inbox: Receiver<Msg>,
        peers: Vec<Sender<Msg>>,
    ) -> Self {
        // Each view its own random sequence (for random backend choice), never zero.
        let rng = 0x9e37_79b9_7f4a_7c15 ^ u64::from(id).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        Conntrack {
            cfg,
            id,
            index: Map::default(),
            slots: Vec::new(),
            free: Vec::new(),
            affinity: Map::default(),
            affinity_swept_ms: 0,
            live,
            inbox,
            peers,
            rng: rng.max(1),
            sweep_at: 0,
            counters: CtCounters::default(),
        }
    }

    /// Live connections of the whole group.
    pub fn len(&self) -> usize {
        self.live.load(Relaxed)
    }

    /// No live connection in the whole group: one load, for the per-packet fast path.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The connections this view created (the group's are those of all its views).
    pub fn entries(&self) -> impl Iterator<Item = CtEntry> + '_ {
        self.slots
            .iter()
            .flatten()
            .filter(|c| !c.dead.load(Relaxed))
            .map(|c| c.snapshot())
    }

    /// Applies what the other views did since the last call. Cheap when nothing happened;
    /// the worker calls it once a batch, and a lookup that misses calls it too.
    pub fn sync(&mut self) {
        self.pull();
    }

    /// `sync`, saying whether anything changed.
    fn pull(&mut self) -> bool {
        let mut any = false;
        while let Ok(msg) = self.inbox.try_recv() {
            any = true;
            match msg {
                Msg::Insert(c) => self.adopt(c),
                Msg::Remove(c) => self.unindex(&c),
                Msg::Affinity {
                    client,
                    frontend,
                    backend,
                    expires_ms,
                } => {
                    let e = self
                        .affinity
                        .entry((client, frontend))
                        .or_insert((backend.clone(), 0));
                    // Two workers choosing for one client at once: the later choice wins in
                    // every view alike.
                    if expires_ms >= e.1 {
                        *e = (backend, expires_ms);
                    }
                }
            }
        }
        any
    }

    /// Indexes another view's new connection. It replaces what its keys led to (an ended
    /// connection), except a live one of a lower-numbered view: two views that created a
    /// connection for the same packets at the same moment then agree on one, in every view.
    fn adopt(&mut self, c: Arc<Conn>) {
        if c.dead.load(Acquire) {
            return;
        }
        for k in [c.orig, c.reply] {
            let keep = self.index.get(&k).is_some_and(|old| {
                !Arc::ptr_eq(old, &c) && !old.dead.load(Relaxed) && old.owner < c.owner
            });
            if !keep {
                self.index.insert(k, c.clone());
            }
        }
    }

    /// Forgets the keys of an ended connection, unless a newer one has taken them.
    fn unindex(&mut self, c: &Arc<Conn>) {
        for k in [c.orig, c.reply] {
            if self.index.get(&k).is_some_and(|e| Arc::ptr_eq(e, c)) {
                self.index.remove(&k);
            }
        }
    }

    fn broadcast(&self, msg: Msg) {
        // A peer that is gone (its worker exited) has nothing left to keep in step.
        if let Some((last, rest)) = self.peers.split_last() {
            for p in rest {
                let _ = p.send(msg.clone());
            }
            let _ = last.send(msg);
        }
    }

    /// Ends a connection; true for the one caller that did (and so counts it).
    fn kill(&self, c: &Conn) -> bool {
        let won = c
            .dead
            .compare_exchange(false, true, AcqRel, Relaxed)
            .is_ok();
        if won {
            self.live.fetch_sub(1, Relaxed);
        }
        won
    }

    fn owns(&self, c: &Arc<Conn>) -> bool {
        c.owner == self.id
            && self
                .slots
                .get(c.slot as usize)
                .and_then(Option::as_ref)
                .is_some_and(|s| Arc::ptr_eq(s, c))
    }

    /// Frees one of this view's connections everywhere; true if it was still live.
    fn remove_owned(&mut self, slot: u32) -> bool {
        let Some(c) = self.slots.get_mut(slot as usize).and_then(Option::take) else {
            return false;
        };
        self.free.push(slot);
        let killed = self.kill(&c);
        self.unindex(&c);
        self.broadcast(Msg::Remove(c));
        killed
    }

    /// An expired connection met on lookup: its owner frees it now; another view only ends
    /// it, and the owner's sweep frees it.
    fn retire(&mut self, c: &Arc<Conn>) {
        let killed = if self.owns(c) {
            self.remove_owned(c.slot)
        } else {
            self.kill(c)
        };
        if killed {
            self.counters.expired += 1;
        }
    }

    fn lookup(&self, key: &Key, now: u64) -> Option<(&Conn, Dir)> {
        let c = self.index.get(key)?;
        c.is_live(now).then_some((&**c, c.dir_of(key)))
    }

    /// Runs `f` on the live connection `key` belongs to. On a miss, the view first catches up
    /// with the others and looks again: a reply can reach this worker before its next batch
    /// applies the connection another worker just created.
    fn with_conn<R>(&mut self, key: &Key, now: u64, f: impl FnOnce(&Conn, Dir) -> R) -> Option<R> {
        let known = match self.index.get(key) {
            Some(c) if c.is_live(now) => return Some(f(c, c.dir_of(key))),
            found => found.is_some(),
        };
        let pulled = self.pull();
        if pulled {
            if let Some((c, dir)) = self.lookup(key, now) {
                return Some(f(c, dir));
            }
        }
        // Still not live: what the key leads to, if anything, has expired. (A new connection's
        // first packet, the common miss, skips this lookup.)
        if known || pulled {
            let stale = self
                .index
                .get(key)
                .filter(|c| !c.dead.load(Relaxed))
                .cloned();
            if let Some(c) = stale {
                self.retire(&c);
            }
        }
        None
    }

    /// Whether a live connection already has this key.
    fn taken(&self, key: &Key, now: u64) -> bool {
        self.index.get(key).is_some_and(|c| c.is_live(now))
    }

    /// Counts a new connection in, making room when the group is full; false if none could
    /// be made.
    fn admit(&mut self, now: u64) -> bool {
        let max = self.cfg.max;
        for attempt in 0..4 {
            if self
                .live
                .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
                .is_ok()
            {
                return true;
            }
            match attempt {
                0 => self.sweep_owned(now, 64),
                // Twice: another worker may take the room made by the first.
                1 | 2 => self.evict(),
                _ => {}
            }
        }
        false
    }

    /// Ends the connection closest to expiry among a few of this view's own; only a view
    /// that has none ends another's (its owner frees it on its next sweep), so a worker whose
    /// connections fill the table cannot starve the others of new ones.
    fn evict(&mut self) {
        let alive = |c: &Arc<Conn>| !c.dead.load(Relaxed);
        let n = self.slots.len();
        let own = self
            .slots
            .iter()
            .enumerate()
            .skip(self.sweep_at % n.max(1))
            .filter_map(|(i, e)| {
                e.as_ref()
                    .filter(|c| alive(c))
                    .map(|c| (i, c.expires_ms.load(Relaxed)))
            })
            .take(8)
            .min_by_key(|&(_, exp)| exp)
            .map(|(i, _)| i)
            .or_else(|| {
                self.slots
                    .iter()
                    .position(|e| e.as_ref().is_some_and(alive))
            });
        if let Some(i) = own {
            if self.remove_owned(i as u32) {
                self.counters.evicted += 1;
            }
            return;
        }
        let other = self
            .index
            .values()
            .filter(|c| alive(c))
            .take(8)
            .min_by_key(|c| c.expires_ms.load(Relaxed))
            .cloned();
        if let Some(c) = other {
            if self.kill(&c) {
                self.counters.evicted += 1;
            }
        }
    }

    /// Creates a connection in this view and announces it to the others before returning,
    /// so that no reply to the packet about to be sent can reach a view that will not find
    /// it (a view that misses catches up before concluding).
    #[allow(clippy::too_many_arguments)]
    fn create(
        &mut self,
        orig: Key,
        reply: Key,
        backend: Backend,
        snat: Option<(Ipv4Addr, u16)>,
        state: CtState,
        now: u64,
        frontend: &str,
    ) -> bool {
        // What the reply key still leads to has ended (a live connection's would have been
        // avoided; the original key's was ended by the lookup that missed): ended first, so
        // that every view lets the new connection replace it.
        let old = self
            .index
            .get(&reply)
            .filter(|c| !c.dead.load(Relaxed) && !c.is_live(now))
            .cloned();
        if let Some(c) = old {
            self.retire(&c);
        }
        if !self.admit(now) {
            return false;
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        let c = Arc::new(Conn {
            orig,
            reply,
            backend,
            snat,
            frontend: frontend.to_owned(),
            owner: self.id,
            slot,
            state: AtomicU8::new(state as u8),
            expires_ms: AtomicU64::new(now.saturating_add(self.cfg.timeout(state))),
            dead: AtomicBool::new(false),
        });
        if let Some(s) = self.slots.get_mut(slot as usize) {
            *s = Some(c.clone());
        }
        self.index.insert(orig, c.clone());
        self.index.insert(reply, c.clone());
        self.counters.created += 1;
        self.broadcast(Msg::Insert(c));
        true
    }

    /// Frees up to `budget` of this view's expired or ended connections, continuing where
    /// the last sweep stopped.
    fn sweep_owned(&mut self, now: u64, budget: usize) {
        let n = self.slots.len();
        if n == 0 {
            return;
        }
        for _ in 0..budget.min(n) {
            self.sweep_at = (self.sweep_at + 1) % n;
            let i = self.sweep_at;
            let stale = self
                .slots
                .get(i)
                .and_then(Option::as_ref)
                .is_some_and(|c| c.dead.load(Relaxed) || c.expires_ms.load(Relaxed) <= now);
            if stale && self.remove_owned(i as u32) {
                self.counters.expired += 1;
            }
        }
    }

    /// Catches up with the other views, then frees up to `budget` of this view's expired
    /// connections, continuing where the last sweep stopped. Expired affinities (which lookups
    /// already ignore) are dropped at most once a second: that walks the whole map, and a
    /// worker sweeps every batch.
    pub fn sweep(&mut self, now: u64, budget: usize) {
        self.pull();
        self.sweep_owned(now, budget);
        if now >= self.affinity_swept_ms.saturating_add(1000) {
            self.affinity.retain(|_, (_, exp)| *exp > now);
            self.affinity_swept_ms = now;
        }
    }

    /// Drops every UDP connection this view created towards one of these backends at once: a
    /// removed UDP endpoint must not keep receiving a client's datagrams until its entry times
    /// out. Every view of a group must be told.
    pub fn flush_udp_to(&mut self, backends: &[Ipv4Addr]) -> usize {
        self.pull();
        let victims: Vec<u32> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                e.as_ref()
                    .filter(|c| {
                        c.orig.proto == IpProtocol::UDP.0 && backends.contains(&c.backend.ip)
                    })
                    .map(|_| i as u32)
            })
            .collect();
        let mut n = 0;
        for v in victims {
            if self.remove_owned(v) {
                n += 1;
            }
        }
        self.affinity.retain(|_, (b, _)| !backends.contains(&b.ip));
        self.counters.flushed += n as u64;
        n
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

    /// Records a client's backend for session affinity, here and in every other view: the
    /// client's next connection may be read by another worker.
    fn remember(&mut self, client: Ipv4Addr, fe: u32, backend: &Backend, expires_ms: u64) {
        self.affinity
            .insert((client, fe), (backend.clone(), expires_ms));
        self.broadcast(Msg::Affinity {
            client,
            frontend: fe,
            backend: backend.clone(),
            expires_ms,
        });
    }

    fn pick(&mut self, fe: &Frontend, key: &Key, lb: LoadBalancing, now: u64) -> Option<Backend> {
        let sticky = fe
            .affinity_secs
            .map(|secs| now.saturating_add(u64::from(secs) * 1000));
        if let Some(until) = sticky {
            let kept = self
                .affinity
                .get(&(key.src, fe.id))
                .filter(|(b, exp)| *exp > now && fe.backends.contains(b))
                .map(|(b, _)| b.clone());
            if let Some(b) = kept {
                self.remember(key.src, fe.id, &b, until);
                return Some(b);
            }
        }
        let n = fe.backends.len();
        if n == 0 {
            return None;
        }
        let idx = match lb {
            LoadBalancing::Maglev if !fe.maglev.is_empty() => {
                use std::hash::BuildHasher;
                let h = foldhash::fast::FixedState::with_seed(0x6374).hash_one(key);
                fe.maglev[(h % fe.maglev.len() as u64) as usize] as usize
            }
            _ => (self.next_random() % n as u64) as usize,
        };
        let b = fe.backends[idx.min(n - 1)].clone();
        if let Some(until) = sticky {
            self.remember(key.src, fe.id, &b, until);
        }
        Some(b)
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
    let (Some(old_ports), Some(mut csum)) = (ip.ports(), ip.l4_checksum()) else {
        return;
    };
    let src_port = src.map_or(old_ports.0, |(_, p)| p);
    let dst_port = dst.map_or(old_ports.1, |(_, p)| p);
    ip.set_ports(src_port, dst_port);
    let udp = ip.protocol() == IpProtocol::UDP;
    if udp && csum == 0 {
        // "No checksum" stays so; only the ports change.
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
        if !csum_partial {
            csum = checksum::update_u16(csum, old_ports.0, p);
        }
    }
    if let Some((a, p)) = dst {
        csum = update32(csum, old_dst, a);
        if !csum_partial {
            csum = checksum::update_u16(csum, old_ports.1, p);
        }
    }
    if udp && csum == 0 && !csum_partial {
        csum = 0xffff;
    }
    ip.set_l4_checksum(csum);
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
    let cfg = ct.cfg;
    ct.with_conn(&l4.key, now, |e, dir| {
        if dir != Dir::Reply {
            return false;
        }
        e.touch(&cfg, now, Dir::Reply, l4.flags);
        e.rewrite(Dir::Reply, ip, csum_partial);
        true
    })
    .unwrap_or(false)
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
    let cfg = ct.cfg;
    let known = ct.with_conn(&key, now, |e, dir| {
        e.touch(&cfg, now, dir, l4.flags);
        e.rewrite(dir, ip, csum_partial);
    });
    if known.is_some() {
        return Nat::Translated;
    }
    let Some(fe) = services.lookup(key.dst, key.proto, key.dport) else {
        return Nat::None;
    };
    // A non-SYN for an unknown connection (its entry expired or the switch restarted) is
    // tracked as established: Maglev sends it to the same backend as before whenever that
    // backend is still there, which is what lets connections survive a restart.
    let Some(backend) = ct.pick(fe, &key, services.lb, now) else {
        return Nat::NoBackend;
    };
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
    // indistinguishable, so, as kernel NAT does, the second gets another source port. The
    // check sees every connection the other workers announced before this one's lookup; two
    // workers creating clashing connections within the same few microseconds can still both
    // pass it (the two views then agree on one connection for the shared reply key, and the
    // other's replies go to the wrong client until it expires). It takes one client sending
    // the first packets of two connections from one port at once, on two queues.
    if ct.taken(&reply, now) {
        use std::hash::BuildHasher;
        let h = foldhash::fast::FixedState::with_seed(0x736e_6174);
        let free = (0..32u64).find_map(|i| {
            let port = 32_768 + (h.hash_one((key, i)) % 28_232) as u16;
            let k = Key {
                dport: port,
                ..reply
            };
            (!ct.taken(&k, now)).then_some((port, k))
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
    let to = (backend.ip, backend.port);
    if !ct.create(key, reply, backend, snat, state, now, &fe.name) {
        return Nat::Refused;
    }
    rewrite(ip, snat, Some(to), csum_partial);
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
        let Some((sport, dport)) = q.ports() else {
            return false;
        };
        Key {
            src: q.src_addr(),
            dst: q.dst_addr(),
            sport,
            dport,
            proto: q.protocol().0,
        }
    };
    // That packet, reversed, is what the backend would send: the reply key.
    let found = ct.with_conn(&quoted_key.reversed(), now, |e, dir| {
        (dir == Dir::Reply).then_some((e.orig, e.reply, e.backend.ip, e.snat.is_some()))
    });
    let Some((orig, reply, backend_ip, snat)) = found.flatten() else {
        return false;
    };
    let mut icmp = match Icmpv4Packet::new_checked(ip.payload_mut()) {
        Ok(i) => i,
        Err(_) => return false,
    };
    {
        let Ok(mut q) = Ipv4Packet::new_checked_quoted(icmp.data_mut()) else {
            return false;
        };
        q.set_dst_addr_incremental(orig.dst);
        if snat {
            q.set_src_addr_incremental(orig.src);
        }
        if let Some((sport, _)) = q.ports() {
            q.set_ports(if snat { orig.sport } else { sport }, orig.dport);
        }
    }
    icmp.fill_checksum();
    // An error from the backend itself comes from the Service address; one from a router on
    // the way keeps its source.
    if outer_src == backend_ip {
        ip.set_src_addr_incremental(orig.dst);
    }
    if snat && outer_dst == reply.dst {
        ip.set_dst_addr_incremental(orig.src);
    }
    true
}

#[cfg(test)]
mod tests {
    //! A group of views behaving as one table: packets of one connection read by different
    //! workers, built by an independent encoder (etherparse).

    use std::net::IpAddr;

    use conf::config::{EndpointSpec, Protocol, ServicePort, ServiceSpec};
    use etherparse::PacketBuilder;

    use super::*;

    const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
    const GW: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
    const BACKENDS: [Ipv4Addr; 4] = [
        Ipv4Addr::new(10, 244, 2, 5),
        Ipv4Addr::new(10, 244, 3, 7),
        Ipv4Addr::new(10, 244, 4, 9),
        Ipv4Addr::new(10, 244, 5, 11),
    ];
    const SYN: TcpFlags = TcpFlags::SYN;
    const SYN_ACK: TcpFlags = TcpFlags(TcpFlags::SYN.0 | TcpFlags::ACK.0);
    const ACK: TcpFlags = TcpFlags::ACK;
    const FIN: TcpFlags = TcpFlags(TcpFlags::FIN.0 | TcpFlags::ACK.0);
    const RST: TcpFlags = TcpFlags::RST;

    fn services(proto: Protocol, affinity: Option<u32>, lb: LoadBalancing) -> ServiceTable {
        let spec = ServiceSpec {
            namespace: "default".into(),
            name: "web".into(),
            cluster_ips: vec![IpAddr::V4(VIP)],
            ports: vec![ServicePort {
                name: None,
                protocol: proto,
                port: 80,
                target_port: Some(8080),
                node_port: None,
            }],
            external_ips: vec![],
            session_affinity_timeout: affinity,
            internal_traffic_policy: Default::default(),
            external_traffic_policy: Default::default(),
            endpoints: BACKENDS
                .iter()
                .map(|ip| EndpointSpec {
                    ip: IpAddr::V4(*ip),
                    node: None,
                    ready: true,
                    serving: true,
                    terminating: false,
                    hostname: None,
                })
                .collect(),
        };
        ServiceTable::build(&[spec], "n1", lb)
    }

    fn tcp_svc() -> ServiceTable {
        services(Protocol::Tcp, None, LoadBalancing::Maglev)
    }

    fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: TcpFlags) -> Vec<u8> {
        let mut b =
            PacketBuilder::ipv4(src.0.octets(), dst.0.octets(), 64).tcp(src.1, dst.1, 1000, 64_000);
        if flags.contains(TcpFlags::SYN) {
            b = b.syn();
        }
        if flags.contains(TcpFlags::ACK) {
            b = b.ack(1);
        }
        if flags.contains(TcpFlags::FIN) {
            b = b.fin();
        }
        if flags.contains(TcpFlags::RST) {
            b = b.rst();
        }
        let mut out = Vec::with_capacity(b.size(4));
        b.write(&mut out, b"data").unwrap();
        out
    }

    fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
        let b = PacketBuilder::ipv4(src.0.octets(), dst.0.octets(), 64).udp(src.1, dst.1);
        let mut out = Vec::with_capacity(b.size(4));
        b.write(&mut out, b"data").unwrap();
        out
    }

    /// (source, destination) as the packet now carries them, after checking that its
    /// checksums are still right.
    fn addrs(p: &[u8]) -> ((Ipv4Addr, u16), (Ipv4Addr, u16)) {
        let s = etherparse::SlicedPacket::from_ip(p).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = &s.net else {
            panic!("not IPv4")
        };
        let h = ip.header().to_header();
        assert_eq!(h.header_checksum, h.calc_header_checksum());
        let (sport, dport) = match &s.transport {
            Some(etherparse::TransportSlice::Tcp(t)) => {
                let want = t.to_header().calc_checksum_ipv4(&h, t.payload()).unwrap();
                assert_eq!(t.checksum(), want, "TCP checksum");
                (t.source_port(), t.destination_port())
            }
            Some(etherparse::TransportSlice::Udp(u)) => {
                let want = u.to_header().calc_checksum_ipv4(&h, u.payload()).unwrap();
                assert_eq!(u.checksum(), want, "UDP checksum");
                (u.source_port(), u.destination_port())
            }
            other => panic!("not TCP/UDP: {other:?}"),
        };
        (
            (ip.header().source_addr(), sport),
            (ip.header().destination_addr(), dport),
        )
    }

    fn fwd(svc: &ServiceTable, ct: &mut Conntrack, now: u64, p: &mut [u8]) -> Nat {
        let mut ip = Ipv4Packet::new_checked(p).unwrap();
        translate(svc, ct, now, &mut ip, GW, false)
    }

    fn back(ct: &mut Conntrack, now: u64, p: &mut [u8]) -> bool {
        let mut ip = Ipv4Packet::new_checked(p).unwrap();
        untranslate_reply(ct, now, &mut ip, false)
    }

    fn pair(cfg: CtConfig) -> (Conntrack, Conntrack) {
        let mut g = Conntrack::group(cfg, 2);
        let w1 = g.pop().unwrap();
        let w0 = g.pop().unwrap();
        (w0, w1)
    }

    /// Opens a TCP connection from `sport` on `ct`; returns where it went.
    fn open(svc: &ServiceTable, ct: &mut Conntrack, now: u64, sport: u16) -> (Ipv4Addr, u16) {
        let mut p = tcp((CLIENT, sport), (VIP, 80), SYN);
        assert_eq!(fwd(svc, ct, now, &mut p), Nat::Translated);
        let (src, dst) = addrs(&p);
        assert_eq!(src, (CLIENT, sport));
        assert!(BACKENDS.contains(&dst.0) && dst.1 == 8080, "{dst:?}");
        dst
    }

    fn total(views: &[&Conntrack]) -> CtCounters {
        views.iter().fold(CtCounters::default(), |a, v| CtCounters {
            created: a.created + v.counters.created,
            expired: a.expired + v.counters.expired,
            evicted: a.evicted + v.counters.evicted,
            flushed: a.flushed + v.counters.flushed,
        })
    }

    fn assert_counts_add_up(views: &[&Conntrack]) {
        let c = total(views);
        assert_eq!(
            c.created,
            views[0].len() as u64 + c.expired + c.evicted + c.flushed,
            "{c:?}"
        );
    }

    #[test]
    fn a_view_moves_to_its_worker_thread() {
        fn send<T: Send>() {}
        send::<Conntrack>();
    }

    #[test]
    fn a_reply_read_by_another_worker_is_translated_without_an_explicit_sync() {
        let svc = tcp_svc();
        let (mut w0, mut w1) = pair(CtConfig::default());
        let backend = open(&svc, &mut w0, 0, 40_000);
        assert!(w1.index.is_empty(), "nothing applied to view 1 yet");
        assert_eq!(w1.len(), 1, "the size is the group's");

        // The backend's SYN-ACK, switched at layer 2, read by worker 1.
        let mut p = tcp(backend, (CLIENT, 40_000), SYN_ACK);
        assert!(back(&mut w1, 1, &mut p));
        assert_eq!(addrs(&p), ((VIP, 80), (CLIENT, 40_000)));
        // Routed, through `translate`.
        let mut p = tcp(backend, (CLIENT, 40_000), ACK);
        assert_eq!(fwd(&svc, &mut w1, 2, &mut p), Nat::Translated);
        assert_eq!(addrs(&p), ((VIP, 80), (CLIENT, 40_000)));
        // The client's next packet on worker 1 goes to the same backend.
        let mut p = tcp((CLIENT, 40_000), (VIP, 80), ACK);
        assert_eq!(fwd(&svc, &mut w1, 3, &mut p), Nat::Translated);
        assert_eq!(addrs(&p), ((CLIENT, 40_000), backend));

        assert_eq!(w0.counters.created, 1);
        assert_eq!(w1.counters.created, 0, "found, not created again");
        assert_eq!(w0.len(), 1);
        assert_eq!(w0.entries().count() + w1.entries().count(), 1);
    }

    #[test]
    fn an_icmp_error_read_by_another_worker_is_translated() {
        let svc = services(Protocol::Udp, None, LoadBalancing::Maglev);
        let (mut w0, mut w1) = pair(CtConfig::default());
        let mut p = udp((CLIENT, 5000), (VIP, 80));
        assert_eq!(fwd(&svc, &mut w0, 0, &mut p), Nat::Translated);
        let (_, backend) = addrs(&p);
        // The backend's "port unreachable", quoting the translated datagram.
        let b = PacketBuilder::ipv4(backend.0.octets(), CLIENT.octets(), 64).icmpv4(
            etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::Port,
            ),
        );
        let mut e = Vec::new();
        b.write(&mut e, &p).unwrap();
        let mut ip = Ipv4Packet::new_checked(&mut e[..]).unwrap();
        assert!(translate_icmp_error(&mut w1, 1, &mut ip));
        assert_eq!(ip.src_addr(), VIP);
        let quoted = &ip.payload()[8..];
        let q = Ipv4Packet::new_checked_quoted(quoted).unwrap();
        assert_eq!(q.dst_addr(), VIP);
        assert_eq!(&q.payload()[2..4], &80u16.to_be_bytes());
    }

    #[test]
    fn state_follows_packets_read_by_either_worker() {
        let svc = tcp_svc();
        let cfg = CtConfig::default();
        let (mut w0, mut w1) = pair(cfg);
        let backend = open(&svc, &mut w0, 0, 40_000);
        let state = |w0: &Conntrack| {
            let e: Vec<CtEntry> = w0.entries().collect();
            assert_eq!(e.len(), 1);
            (e[0].state, e[0].expires_ms)
        };
        assert_eq!(state(&w0), (CtState::SynSent, cfg.tcp_transitory_ms));

        let mut p = tcp(backend, (CLIENT, 40_000), SYN_ACK);
        assert!(back(&mut w1, 10, &mut p));
        assert_eq!(
            state(&w0),
            (CtState::Established, 10 + cfg.tcp_established_ms)
        );

        let mut p = tcp((CLIENT, 40_000), (VIP, 80), ACK);
        assert_eq!(fwd(&svc, &mut w0, 20, &mut p), Nat::Translated);
        assert_eq!(
            state(&w0),
            (CtState::Established, 20 + cfg.tcp_established_ms)
        );

        let mut p = tcp((CLIENT, 40_000), (VIP, 80), FIN);
        assert_eq!(fwd(&svc, &mut w1, 30, &mut p), Nat::Translated);
        assert_eq!(state(&w0), (CtState::Closing, 30 + cfg.tcp_transitory_ms));

        let mut p = tcp(backend, (CLIENT, 40_000), RST);
        assert!(back(&mut w0, 40, &mut p));
        assert_eq!(
            state(&w0),
            (CtState::Closed, 40 + cfg.tcp_transitory_ms.min(10_000))
        );
        assert_eq!(w1.entries().count(), 0, "view 1 owns nothing");
    }

    #[test]
    fn the_owners_sweep_removes_an_expired_connection_from_every_view() {
        let svc = services(Protocol::Udp, None, LoadBalancing::Maglev);
        let cfg = CtConfig::default();
        let (mut w0, mut w1) = pair(cfg);
        let mut p = udp((CLIENT, 5000), (VIP, 80));
        assert_eq!(fwd(&svc, &mut w0, 0, &mut p), Nat::Translated);
        let (_, backend) = addrs(&p);
        w1.sync();
        assert_eq!(w1.index.len(), 2);

        let later = cfg.udp_ms + 1;
        w1.sweep(later, 1000);
        assert_eq!((w1.len(), w1.index.len()), (1, 2), "not view 1's to free");
        w0.sweep(later, 1000);
        assert_eq!(w0.len(), 0);
        assert_eq!(w0.counters.expired, 1);
        assert!(w0.index.is_empty());
        w1.sync();
        assert!(w1.index.is_empty(), "the removal reached view 1");
        let mut r = udp(backend, (CLIENT, 5000));
        assert!(!back(&mut w1, later, &mut r));
        assert_counts_add_up(&[&w0, &w1]);
    }

    #[test]
    fn an_expired_connection_met_by_another_worker_is_absent_and_counted_once() {
        let svc = services(Protocol::Udp, None, LoadBalancing::Maglev);
        let cfg = CtConfig::default();
        let (mut w0, mut w1) = pair(cfg);
        let mut p = udp((CLIENT, 5000), (VIP, 80));
        assert_eq!(fwd(&svc, &mut w0, 0, &mut p), Nat::Translated);
        let (_, backend) = addrs(&p);
        let later = cfg.udp_ms + 1;
        let mut r = udp(backend, (CLIENT, 5000));
        assert!(!back(&mut w1, later, &mut r), "expired");
        assert_eq!(w1.counters.expired, 1);
        assert_eq!(w0.len(), 0);
        // Its owner frees it without counting it again.
        assert_eq!(w0.entries().count(), 0);
        w0.sweep(later, 1000);
        assert_eq!(w0.counters.expired, 0);
        assert!(w0.slots.iter().all(Option::is_none));
        w1.sync();
        assert!(w1.index.is_empty());
        assert_counts_add_up(&[&w0, &w1]);
    }

    #[test]
    fn a_newer_connection_with_the_same_keys_survives_the_removal_of_the_older() {
        let svc = services(Protocol::Udp, None, LoadBalancing::Maglev);
        let cfg = CtConfig::default();
        let (mut w0, mut w1) = pair(cfg);
        let mut p = udp((CLIENT, 5000), (VIP, 80));
        assert_eq!(fwd(&svc, &mut w0, 0, &mut p), Nat::Translated);
        let (_, backend) = addrs(&p);
        w1.sync();

        // Long after, the same client port again, read by worker 1: a new connection with the
        // same keys (Maglev picks the same backend), owned by worker 1.
        let later = cfg.udp_ms + 1;
        let mut p = udp((CLIENT, 5000), (VIP, 80));
        assert_eq!(fwd(&svc, &mut w1, later, &mut p), Nat::Translated);
        assert_eq!(addrs(&p).1, backend);
        assert_eq!((w0.counters.created, w1.counters.created), (1, 1));
        assert_eq!(w1.len(), 1);

        // The old one's owner frees it and tells view 1, which by now indexes the new one
        // under the same keys.
        w0.sweep(later, 1000);
        w1.sync();
        assert_eq!(w1.len(), 1);
        assert_eq!(w1.index.len(), 2);
        assert_eq!(w0.index.len(), 2);
        for w in [&mut w0, &mut w1] {
            let mut r = udp(backend, (CLIENT, 5000));
            assert!(back(w, later + 1, &mut r), "view {} lost it", w.id);
            assert_eq!(addrs(&r), ((VIP, 80), (CLIENT, 5000)));
        }
        assert_eq!(w1.entries().count(), 1);
        assert_counts_add_up(&[&w0, &w1]);
    }

    #[test]
    fn two_views_creating_one_connection_at_once_agree_on_one() {
        let (mut w0, mut w1) = pair(CtConfig::default());
        let orig = Key {
            src: CLIENT,
            dst: VIP,
            sport: 5000,
            dport: 80,
            proto: IpProtocol::UDP.0,
        };
        let reply = |b: Ipv4Addr| Key {
            src: b,
            dst: CLIENT,
            sport: 8080,
            dport: 5000,
            proto: IpProtocol::UDP.0,
        };
        let be = |ip| Backend { ip, port: 8080 };
        // Neither has seen the other's before creating its own.
        assert!(w1.create(
            orig,
            reply(BACKENDS[1]),
            be(BACKENDS[1]),
            None,
            CtState::UdpNew,
            0,
            "x"
        ));
        assert!(w0.create(
            orig,
            reply(BACKENDS[0]),
            be(BACKENDS[0]),
            None,
            CtState::UdpNew,
            0,
            "x"
        ));
        w0.sync();
        w1.sync();
        for w in [&w0, &w1] {
            let (c, dir) = w.lookup(&orig, 1).unwrap();
            assert_eq!((c.owner, dir), (0, Dir::Orig), "view {}", w.id);
            // Each reply key still leads to its own connection.
            assert_eq!(w.lookup(&reply(BACKENDS[1]), 1).unwrap().0.owner, 1);
        }
    }

    #[test]
    fn the_size_limit_holds_for_the_group() {
        let svc = tcp_svc();
        let cfg = CtConfig {
            max: 4,
            ..CtConfig::default()
        };
        let (mut w0, mut w1) = pair(cfg);
        for i in 0..2 {
            open(&svc, &mut w0, i, 1000 + i as u16);
            open(&svc, &mut w1, i, 2000 + i as u16);
        }
        assert_eq!((w0.len(), w1.len()), (4, 4));
        // Full: worker 1 makes room among its own.
        open(&svc, &mut w1, 5, 2002);
        assert_eq!(w1.len(), 4);
        assert_eq!((w0.counters.evicted, w1.counters.evicted), (0, 1));
        assert_eq!(w0.entries().count(), 2);
        assert_eq!(w1.entries().count(), 2);

        // Many more from both: never above the limit, and every count accounted for.
        for i in 0..200u16 {
            let w = if i % 3 == 0 { &mut w1 } else { &mut w0 };
            open(&svc, w, 10 + u64::from(i), 3000 + i);
            assert!(w0.len() <= 4);
            let live = w0.entries().count() + w1.entries().count();
            assert!(live <= 4, "{live} live");
        }
        assert_counts_add_up(&[&w0, &w1]);
    }

    #[test]
    fn a_worker_owning_nothing_still_gets_room_in_a_full_table() {
        let svc = tcp_svc();
        let cfg = CtConfig {
            max: 4,
            ..CtConfig::default()
        };
        let (mut w0, mut w1) = pair(cfg);
        for i in 0..4 {
            open(&svc, &mut w0, i, 1000 + i as u16);
        }
        let backend = open(&svc, &mut w1, 5, 2000);
        assert_eq!(w1.len(), 4);
        assert_eq!(w1.counters.evicted, 1);
        assert_eq!(w0.entries().count(), 3);
        // The evicted one's owner frees it without counting it again.
        w0.sweep(6, 1000);
        assert_eq!(w0.counters.expired + w0.counters.evicted, 0);
        assert_eq!(w0.slots.iter().flatten().count(), 3);
        assert_counts_add_up(&[&w0, &w1]);
        let mut r = tcp(backend, (CLIENT, 2000), SYN_ACK);
        assert!(back(&mut w0, 7, &mut r));
    }

    #[test]
    fn session_affinity_holds_whichever_worker_reads_the_connection() {
        let svc = services(Protocol::Tcp, Some(10_800), LoadBalancing::Random);
        let (mut w0, mut w1) = pair(CtConfig::default());
        let first = open(&svc, &mut w0, 0, 1000);
        for i in 1..40u16 {
            let w = if i % 2 == 0 { &mut w0 } else { &mut w1 };
            assert_eq!(
                open(&svc, w, u64::from(i), 1000 + i),
                first,
                "connection {i}"
            );
        }
    }

    #[test]
    fn a_udp_flush_told_to_every_worker_ends_all_their_connections_to_the_backend() {
        let svc = services(Protocol::Udp, None, LoadBalancing::Maglev);
        let (mut w0, mut w1) = pair(CtConfig::default());
        let mut to_first = Vec::new();
        for i in 0..64u16 {
            let w = if i % 2 == 0 { &mut w0 } else { &mut w1 };
            let mut p = udp((CLIENT, 5000 + i), (VIP, 80));
            assert_eq!(fwd(&svc, w, 0, &mut p), Nat::Translated);
            let (_, b) = addrs(&p);
            if b.0 == BACKENDS[0] {
                to_first.push((i, b));
            }
        }
        assert!(to_first.len() > 2);
        let n = w0.flush_udp_to(&[BACKENDS[0]]) + w1.flush_udp_to(&[BACKENDS[0]]);
        assert_eq!(n, to_first.len());
        assert_eq!(w0.len(), 64 - n);
        for (i, b) in to_first {
            for w in [&mut w0, &mut w1] {
                let mut r = udp(b, (CLIENT, 5000 + i));
                assert!(!back(w, 1, &mut r));
            }
        }
        assert_counts_add_up(&[&w0, &w1]);
    }

    /// Two workers on two threads, each opening connections and telling the other only once
    /// `translate` has returned (as the network would: the reply cannot exist before the
    /// translated packet was sent), each translating the other's replies. Neither calls `sync`.
    #[test]
    fn replies_read_by_another_thread_are_all_translated() {
        const N: u16 = 10_000;
        let svc = tcp_svc();
        let cfg = CtConfig {
            max: 1 << 16,
            ..CtConfig::default()
        };
        let (w0, w1) = pair(cfg);
        let (to1, from0) = crossbeam_channel::unbounded();
        let (to0, from1) = crossbeam_channel::unbounded();
        let run = |mut ct: Conntrack,
                   base: u16,
                   tx: Sender<(u16, (Ipv4Addr, u16))>,
                   rx: Receiver<(u16, (Ipv4Addr, u16))>| {
            let svc = &svc;
            move || {
                let mut replied = 0u32;
                let reply = |ct: &mut Conntrack, i: u32, (sport, backend)| {
                    let now = u64::from(i);
                    let mut r = tcp(backend, (CLIENT, sport), SYN_ACK);
                    let ok = if i & 1 == 0 {
                        back(ct, now, &mut r)
                    } else {
                        fwd(svc, ct, now, &mut r) == Nat::Translated
                    };
                    assert!(ok, "the reply of {sport} was not translated");
                    assert_eq!(addrs(&r), ((VIP, 80), (CLIENT, sport)));
                };
                for i in 0..N {
                    let sport = base + i;
                    let backend = open(svc, &mut ct, u64::from(i), sport);
                    tx.send((sport, backend)).unwrap();
                    while let Ok(m) = rx.try_recv() {
                        reply(&mut ct, replied, m);
                        replied += 1;
                    }
                    if i % 1000 == 0 {
                        ct.sweep(u64::from(i), 64);
                    }
                }
                while replied < u32::from(N) {
                    let m = rx.recv().unwrap();
                    reply(&mut ct, replied, m);
                    replied += 1;
                }
                ct
            }
        };
        let (w0, w1) = std::thread::scope(|s| {
            let a = s.spawn(run(w0, 10_000, to1, from1));
            let b = s.spawn(run(w1, 30_000, to0, from0));
            (a.join().unwrap(), b.join().unwrap())
        });
        assert_eq!(w0.len(), 2 * usize::from(N));
        assert_eq!(w0.counters.created + w1.counters.created, 2 * u64::from(N));
        assert_counts_add_up(&[&w0, &w1]);
    }

    #[test]
    fn a_state_survives_its_atomic_encoding() {
        use CtState::*;
        for s in [SynSent, Established, Closing, Closed, UdpNew, UdpAssured] {
            assert_eq!(CtState::from_u8(s as u8), s);
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// A client datagram from port `5000 + flow`, read by `view`.
        Send {
            view: usize,
            flow: u16,
        },
        /// The backend's answer to it.
        Reply {
            view: usize,
            flow: u16,
        },
        Tick(u64),
        Sweep {
            view: usize,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..2usize, 0..6u16).prop_map(|(view, flow)| Op::Send { view, flow }),
            (0..2usize, 0..6u16).prop_map(|(view, flow)| Op::Reply { view, flow }),
            (0..700u64).prop_map(Op::Tick),
            (0..2usize).prop_map(|view| Op::Sweep { view }),
        ]
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// Against a model of UDP flows with one timeout: whichever view reads a datagram,
        /// a reply is translated exactly while its flow is live, and the views' counts add up.
        #[test]
        fn two_views_behave_as_one_table(ops in proptest::collection::vec(op(), 1..80)) {
            let svc = services(Protocol::Udp, None, LoadBalancing::Maglev);
            let cfg = CtConfig { udp_ms: 1000, ..CtConfig::default() };
            let mut views = Conntrack::group(cfg, 2);
            // flow -> (backend, last packet)
            let mut model: std::collections::HashMap<u16, ((Ipv4Addr, u16), u64)> =
                Default::default();
            let mut now = 1u64;
            for op in ops {
                match op {
                    Op::Send { view, flow } => {
                        let mut p = udp((CLIENT, 5000 + flow), (VIP, 80));
                        prop_assert_eq!(fwd(&svc, &mut views[view], now, &mut p), Nat::Translated);
                        let (src, dst) = addrs(&p);
                        prop_assert_eq!(src, (CLIENT, 5000 + flow));
                        if let Some((b, last)) = model.get(&flow) {
                            if now < last + cfg.udp_ms {
                                prop_assert_eq!(dst, *b, "a live flow changed backend");
                            }
                        }
                        model.insert(flow, (dst, now));
                    }
                    Op::Reply { view, flow } => {
                        let Some(&(b, last)) = model.get(&flow) else { continue };
                        let live = now < last + cfg.udp_ms;
                        let mut r = udp(b, (CLIENT, 5000 + flow));
                        let done = back(&mut views[view], now, &mut r);
                        prop_assert_eq!(done, live, "flow {} at {} (last {})", flow, now, last);
                        if live {
                            prop_assert_eq!(addrs(&r), ((VIP, 80), (CLIENT, 5000 + flow)));
                            model.insert(flow, (b, now));
                        } else {
                            model.remove(&flow);
                        }
                    }
                    Op::Tick(dt) => now += dt,
                    Op::Sweep { view } => views[view].sweep(now, 1000),
                }
                let refs: Vec<&Conntrack> = views.iter().collect();
                let c = total(&refs);
                prop_assert_eq!(c.created, views[0].len() as u64 + c.expired + c.evicted + c.flushed);
            }
            let end = now + cfg.udp_ms;
            views[0].sweep(end, 1000);
            views[1].sweep(end, 1000);
            views[0].sync();
            prop_assert_eq!(views[0].len(), 0);
            for v in &views {
                prop_assert!(v.index.is_empty(), "view {} kept {} keys", v.id, v.index.len());
                prop_assert!(v.slots.iter().all(Option::is_none));
            }
        }
    }
}
