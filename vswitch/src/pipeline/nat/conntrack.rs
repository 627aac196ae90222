//! Connection tracking: each worker's view of the table its group shares, the choice of a
//! backend for a new connection (consistent hashing or random, with session affinity), and
//! expiry, eviction and flushing. The design is in the module above.

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use conf::config::LoadBalancing;

use super::services::{Backend, Frontend, ServiceTable};
use super::Map;
use crate::wire::{IpProtocol, TcpFlags};

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
    /// The key of the packet an ICMP error quotes (`icmp_data`: the quoted IPv4 header and
    /// the first bytes after it), with ports 0 when its protocol has none.
    pub fn of_quoted(icmp_data: &[u8]) -> Option<Key> {
        let q = crate::wire::Ipv4Packet::new_checked_quoted(icmp_data).ok()?;
        let (sport, dport) = q.ports().unwrap_or((0, 0));
        Some(Key {
            src: q.src_addr(),
            dst: q.dst_addr(),
            sport,
            dport,
            proto: q.protocol().0,
        })
    }

    pub fn reversed(&self) -> Key {
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
    /// The frontend's name (`namespace/name:port/proto`) as the Service table has it now for
    /// the address the client sent to; "(policy)" for a connection tracked for NetworkPolicy
    /// only, "(gone)" when no frontend has that address any more.
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
    pub(super) fn from_u8(v: u8) -> CtState {
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
pub(super) enum Dir {
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
pub(super) struct Conn {
    pub(super) orig: Key,
    pub(super) reply: Key,
    pub(super) backend: Backend,
    pub(super) snat: Option<(Ipv4Addr, u16)>,
    /// Tracked for NetworkPolicy only: nothing to rewrite, its packets pass as they are.
    pub(super) policy_only: bool,
    /// The view that created it, the only one that frees it.
    pub(super) owner: u32,
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
    pub(super) fn touch(&self, cfg: &CtConfig, now: u64, dir: Dir, flags: TcpFlags) {
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

    /// What it is now, its frontend named after `services` (a connection keeps no copy of
    /// the name: a new connection's first packet does not read it).
    fn snapshot(&self, services: &ServiceTable) -> CtEntry {
        let frontend = if self.policy_only {
            "(policy)".to_string()
        } else {
            services
                .lookup(self.orig.dst, self.orig.proto, self.orig.dport)
                .map_or_else(|| "(gone)".to_string(), |f| f.name.clone())
        };
        CtEntry {
            orig: self.orig,
            reply: self.reply,
            backend: self.backend.clone(),
            snat: self.snat,
            state: self.state(),
            expires_ms: self.expires_ms.load(Relaxed),
            frontend,
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
        frontend: u64,
        backend: Backend,
        expires_ms: u64,
    },
}

/// One worker's view of the connection tracking table shared by a group of workers (a
/// standalone table is a group of one).
pub struct Conntrack {
    pub(super) cfg: CtConfig,
    /// This view's worker number in its group.
    pub(super) id: u32,
    /// Every connection of the group by both its keys, this view's copy. The direction is
    /// found by comparing with the connection's original key rather than stored: a smaller
    /// entry keeps more of a large index in cache, which shows on the per-packet lookup.
    pub(super) index: Map<Key, Arc<Conn>>,
    /// The connections this view created: only it sweeps, evicts and flushes them.
    pub(super) slots: Vec<Option<Arc<Conn>>>,
    free: Vec<u32>,
    /// ClientIP affinity: (client, the Service port's `Frontend::affinity_key`) -> backend.
    affinity: Map<(Ipv4Addr, u64), (Backend, u64)>,
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

    /// The connections this view created (the group's are those of all its views), their
    /// frontends named after `services`.
    pub fn entries<'a>(&'a self, services: &'a ServiceTable) -> impl Iterator<Item = CtEntry> + 'a {
        self.slots
            .iter()
            .flatten()
            .filter(|c| !c.dead.load(Relaxed))
            .map(|c| c.snapshot(services))
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

    pub(super) fn lookup(&self, key: &Key, now: u64) -> Option<(&Conn, Dir)> {
        let c = self.index.get(key)?;
        c.is_live(now).then_some((&**c, c.dir_of(key)))
    }

    /// Runs `f` on the live connection `key` belongs to. On a miss, the view first catches up
    /// with the others and looks again: a reply can reach this worker before its next batch
    /// applies the connection another worker just created.
    pub(super) fn with_conn<R>(
        &mut self,
        key: &Key,
        now: u64,
        f: impl FnOnce(&Conn, Dir) -> R,
    ) -> Option<R> {
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

    /// Whether `key` belongs to a live connection (either direction); the packet carrying it
    /// moves the connection's state and expiry on.
    pub fn touch(&mut self, key: &Key, now: u64, flags: TcpFlags) -> bool {
        let cfg = self.cfg;
        self.with_conn(key, now, |e, dir| e.touch(&cfg, now, dir, flags))
            .is_some()
    }

    /// Whether `key` is the reply direction of a live connection; the packet carrying it moves
    /// the connection on (as [`Conntrack::touch`]).
    pub fn touch_reply(&mut self, key: &Key, now: u64, flags: TcpFlags) -> bool {
        let cfg = self.cfg;
        self.with_conn(key, now, |e, dir| {
            let reply = matches!(dir, Dir::Reply);
            if reply {
                e.touch(&cfg, now, dir, flags);
            }
            reply
        })
        .unwrap_or(false)
    }

    /// Whether a live connection already has this key.
    pub(super) fn taken(&self, key: &Key, now: u64) -> bool {
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
    pub(super) fn create(
        &mut self,
        orig: Key,
        reply: Key,
        backend: Backend,
        snat: Option<(Ipv4Addr, u16)>,
        state: CtState,
        now: u64,
    ) -> bool {
        self.insert(orig, reply, backend, snat, state, now, false)
    }

    /// Tracks a connection that NetworkPolicy admitted and nothing translates, so that its
    /// later packets and replies pass without being judged again.
    pub fn track(&mut self, orig: Key, state: CtState, now: u64) -> bool {
        let backend = Backend {
            ip: orig.dst,
            port: orig.dport,
        };
        self.insert(orig, orig.reversed(), backend, None, state, now, true)
    }

    /// Ends the connection `key` belongs to if this view made it (a connection opened by a
    /// packet that policy then refused).
    pub fn forget(&mut self, key: &Key) {
        let Some(c) = self.index.get(key).cloned() else {
            return;
        };
        if self.owns(&c) {
            self.remove_owned(c.slot);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn insert(
        &mut self,
        orig: Key,
        reply: Key,
        backend: Backend,
        snat: Option<(Ipv4Addr, u16)>,
        state: CtState,
        now: u64,
        policy_only: bool,
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
            policy_only,
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
    fn remember(&mut self, client: Ipv4Addr, fe: u64, backend: &Backend, expires_ms: u64) {
        self.affinity
            .insert((client, fe), (backend.clone(), expires_ms));
        self.broadcast(Msg::Affinity {
            client,
            frontend: fe,
            backend: backend.clone(),
            expires_ms,
        });
    }

    pub(super) fn pick(
        &mut self,
        fe: &Frontend,
        key: &Key,
        lb: LoadBalancing,
        now: u64,
    ) -> Option<Backend> {
        let sticky = fe
            .affinity_secs
            .map(|secs| now.saturating_add(u64::from(secs) * 1000));
        if let Some(until) = sticky {
            let kept = self
                .affinity
                .get(&(key.src, fe.affinity_key))
                .filter(|(b, exp)| *exp > now && fe.backends.contains(b))
                .map(|(b, _)| b.clone());
            if let Some(b) = kept {
                self.remember(key.src, fe.affinity_key, &b, until);
                return Some(b);
            }
        }
        let n = fe.backends.len();
        if n == 0 {
            return None;
        }
        let consistent = match lb {
            LoadBalancing::Maglev => fe.consistent_choice(key),
            _ => None,
        };
        let idx = consistent.unwrap_or_else(|| (self.next_random() % n as u64) as usize);
        let b = fe.backends[idx.min(n - 1)].clone();
        if let Some(until) = sticky {
            self.remember(key.src, fe.affinity_key, &b, until);
        }
        Some(b)
    }
}

/// The state a packet in direction `dir` with `flags` moves a connection to.
pub(super) fn advance(state: CtState, dir: Dir, flags: TcpFlags, proto: u8) -> CtState {
    // UDP, and the ICMP echoes and other protocols policy tracks, have no flags.
    if proto != IpProtocol::TCP.0 {
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
