//! The per-packet index of Service frontends by (address, protocol, port).
//!
//! One flat table of 64-byte slots, one cache line each (open addressing, linear probing, at
//! most half full). A slot holds its key, the frontend, and a copy of what choosing a backend
//! for a plain frontend reads: the addresses of up to [`INLINE`] backends that share one
//! target port, the port, and the frontend's flags. A new connection's lookup and backend
//! choice then read one cache line, where a map bucket, then the frontend, then its backends
//! were three loads each waiting for the one before. Among 10,000 Services none of them is in
//! cache when a connection opens, so those waits were most of what a new connection cost over
//! one Service's. Other frontends (more backends, backends on different ports during a
//! rollout that renumbers a named port, session affinity, an internal twin) are found by
//! their slot and choose from the frontend.
//!
//! The table is built once per Service table and never changed, so a key's probe sequence
//! always ends at its slot or at an empty one.

use std::fmt;
use std::net::Ipv4Addr;
use std::sync::Arc;

use conf::config::LoadBalancing;

use super::conntrack::Key;
use super::services::{mix64, rendezvous_by, Backend, Frontend, GOLDEN, RENDEZVOUS_MAX};

/// The most backends a slot holds: what fits in a cache line beside the rest.
pub(super) const INLINE: usize = 11;
const _: () = assert!(INLINE <= RENDEZVOUS_MAX);

/// One frontend's slot; `key` 0 is an empty one.
#[derive(Clone, Default)]
#[repr(C, align(64))]
struct Slot {
    key: u64,
    fe: Option<Arc<Frontend>>,
    /// The backends' addresses, in the frontend's order (when `plain`).
    ips: [u32; INLINE],
    /// Their one target port.
    port: u16,
    /// How many of `ips` are backends.
    n: u8,
    /// [`PLAIN`] and [`MASQUERADE_OUTSIDE`].
    flags: u8,
}

/// The slot's backends are the frontend's choice for any client: no session affinity, no
/// internal twin, at most [`INLINE`] backends, all on one port.
const PLAIN: u8 = 1;
/// [`Frontend::masquerade_outside`].
const MASQUERADE_OUTSIDE: u8 = 2;

const _: () = assert!(std::mem::size_of::<Slot>() == 64);

impl Slot {
    fn of(key: u64, fe: &Arc<Frontend>) -> Slot {
        let mut s = Slot {
            key,
            fe: Some(fe.clone()),
            ..Slot::default()
        };
        if fe.masquerade_outside {
            s.flags |= MASQUERADE_OUTSIDE;
        }
        let b = &fe.backends;
        let port = b.first().map_or(0, |b| b.port);
        if b.len() <= INLINE
            && b.iter().all(|b| b.port == port)
            && fe.affinity_secs.is_none()
            && fe.internal.is_none()
        {
            s.flags |= PLAIN;
            for (slot, b) in s.ips.iter_mut().zip(b.iter()) {
                *slot = u32::from(b.ip);
            }
            s.port = port;
            s.n = b.len() as u8;
        }
        s
    }
}

/// A key's slot: address, port and protocol, and a low bit that no empty slot has.
#[inline]
fn pack(vip: Ipv4Addr, proto: u8, port: u16) -> u64 {
    (u64::from(u32::from(vip)) << 32) | (u64::from(port) << 16) | (u64::from(proto) << 8) | 1
}

/// Where a key's probe starts among `cap` slots: the key mixed (the SplitMix64 finalizer), so
/// that consecutive addresses spread over the table, scaled to `cap` (Lemire's multiply and
/// shift, which any table size can use).
#[inline]
fn home(key: u64, cap: usize) -> usize {
    let z = mix64(key.wrapping_mul(GOLDEN));
    ((u128::from(z) * cap as u128) >> 64) as usize
}

/// The slot after `i` among `cap`.
#[inline]
fn next(i: usize, cap: usize) -> usize {
    if i + 1 >= cap {
        0
    } else {
        i + 1
    }
}

/// The frontends by (address, protocol, port).
#[derive(Default)]
pub(super) struct VipIndex {
    /// Twice as many as the frontends it was made for (none when there are none).
    slots: Box<[Slot]>,
    len: usize,
}

impl fmt::Debug for VipIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VipIndex")
            .field("frontends", &self.len)
            .field("slots", &self.slots.len())
            .finish()
    }
}

impl VipIndex {
    /// An empty index with room for up to `n` frontends.
    pub(super) fn with_room(n: usize) -> VipIndex {
        let cap = n.saturating_mul(2);
        VipIndex {
            slots: vec![Slot::default(); cap].into_boxed_slice(),
            len: 0,
        }
    }

    /// Indexes `fe` under its address, protocol and port. A frontend already there stays
    /// unless `replace`. Returns whether `fe` is now indexed; false too when the index is
    /// full (more frontends than it was made with room for).
    pub(super) fn insert(&mut self, fe: &Arc<Frontend>, replace: bool) -> bool {
        let key = pack(fe.vip, fe.proto, fe.port);
        let cap = self.slots.len();
        let mut i = home(key, cap);
        for _ in 0..cap {
            let Some(s) = self.slots.get_mut(i) else {
                return false;
            };
            if s.key == key {
                if replace {
                    *s = Slot::of(key, fe);
                }
                return replace;
            }
            if s.key == 0 {
                // Half of the slots stay empty, so that every probe ends soon.
                if 2 * (self.len + 1) > cap {
                    return false;
                }
                *s = Slot::of(key, fe);
                self.len += 1;
                return true;
            }
            i = next(i, cap);
        }
        false
    }

    /// The frontend at `vip`, `proto`, `port`.
    #[inline]
    pub(super) fn find(&self, vip: Ipv4Addr, proto: u8, port: u16) -> Option<Hit<'_>> {
        let key = pack(vip, proto, port);
        let cap = self.slots.len();
        let mut i = home(key, cap);
        for _ in 0..cap {
            let s = self.slots.get(i)?;
            if s.key == key {
                return s.fe.as_deref().map(|fe| Hit { slot: s, fe });
            }
            if s.key == 0 {
                return None;
            }
            i = next(i, cap);
        }
        None
    }

    /// Starts loading the slot where a lookup of `vip`, `proto`, `port` starts, and the one
    /// after it, without waiting: at most half of the slots are taken, so a lookup ends in
    /// one of the two for about nine frontends in ten.
    #[inline]
    pub(super) fn prefetch(&self, vip: Ipv4Addr, proto: u8, port: u16) {
        let key = pack(vip, proto, port);
        let cap = self.slots.len();
        let i = home(key, cap);
        if let Some(s) = self.slots.get(i) {
            crate::datapath::memory::prefetch(s);
        }
        if let Some(s) = self.slots.get(next(i, cap)) {
            crate::datapath::memory::prefetch(s);
        }
    }

    /// Heap bytes the slots take.
    pub(super) fn heap_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.slots)
    }
}

/// A frontend found in the index, with its slot.
#[derive(Clone, Copy)]
pub struct Hit<'a> {
    slot: &'a Slot,
    pub fe: &'a Frontend,
}

impl<'a> Hit<'a> {
    /// Whether clients outside the cluster are seen by the backend as the node
    /// ([`Frontend::masquerade_outside`]), from the slot.
    #[inline]
    pub fn masquerade_outside(&self) -> bool {
        self.slot.flags & MASQUERADE_OUTSIDE != 0
    }

    /// Whether the frontend has an internal twin ([`Frontend::internal`]), from the slot for a
    /// plain one.
    #[inline]
    pub fn has_internal(&self) -> bool {
        self.slot.flags & PLAIN == 0 && self.fe.internal.is_some()
    }

    /// The backend consistent hashing gives connection `key` (`None` without backends), read
    /// from the slot alone; `None` when that is not the whole choice (session affinity, an
    /// internal twin, a Maglev table, or random choice), which [`Conntrack::pick`] then makes
    /// from the frontend.
    ///
    /// [`Conntrack::pick`]: super::Conntrack
    #[inline]
    pub fn plain_choice(&self, key: &Key, lb: LoadBalancing) -> Option<Option<Backend>> {
        let s = self.slot;
        if s.flags & PLAIN == 0 || lb != LoadBalancing::Maglev {
            return None;
        }
        let n = usize::from(s.n).min(INLINE);
        let ips = &s.ips[..n];
        let chosen = rendezvous_by(Frontend::key_hash(key), n, |i| (ips[i], s.port));
        Some(chosen.map(|i| Backend {
            ip: Ipv4Addr::from(ips[i]),
            port: s.port,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::IpProtocol;

    fn fe(vip: Ipv4Addr, port: u16, backends: usize, name: &str) -> Arc<Frontend> {
        on_ports(vip, port, backends, name, 1)
    }

    /// A frontend whose backends' target ports take `ports` values (8080, 8081, ...).
    fn on_ports(
        vip: Ipv4Addr,
        port: u16,
        backends: usize,
        name: &str,
        ports: usize,
    ) -> Arc<Frontend> {
        Arc::new(Frontend {
            name: name.into(),
            masquerade_outside: true,
            ..super::super::services::test_frontend(vip, port, backends, ports)
        })
    }

    fn key(i: u32) -> Key {
        Key {
            src: Ipv4Addr::from(0x0af4_0100 + (i % 256)),
            dst: Ipv4Addr::new(10, 96, 0, 10),
            sport: 1024 + (i / 256) as u16,
            dport: 80,
            proto: IpProtocol::TCP.0,
        }
    }

    #[test]
    fn finds_every_frontend_and_nothing_else() {
        let n = 5_000u32;
        let mut ix = VipIndex::with_room(n as usize);
        for i in 0..n {
            let vip = Ipv4Addr::from(0x0a60_0000 + i);
            assert!(ix.insert(&fe(vip, 80, 2, &format!("s{i}")), true));
        }
        assert_eq!(ix.slots.len(), 10_000);
        for i in 0..n {
            let vip = Ipv4Addr::from(0x0a60_0000 + i);
            let hit = ix.find(vip, IpProtocol::TCP.0, 80).expect("indexed");
            assert_eq!(hit.fe.name, format!("s{i}"));
            assert!(ix.find(vip, IpProtocol::TCP.0, 81).is_none());
            assert!(ix.find(vip, IpProtocol::UDP.0, 80).is_none());
        }
        assert!(ix.find(Ipv4Addr::new(10, 97, 0, 1), 6, 80).is_none());
        assert!(VipIndex::default()
            .find(Ipv4Addr::LOCALHOST, 6, 80)
            .is_none());
    }

    #[test]
    fn an_existing_frontend_stays_unless_replaced_and_room_is_kept() {
        let vip = Ipv4Addr::new(10, 96, 0, 10);
        let mut ix = VipIndex::with_room(1);
        assert!(ix.insert(&fe(vip, 80, 2, "first"), false));
        assert!(!ix.insert(&fe(vip, 80, 2, "second"), false));
        assert_eq!(ix.find(vip, 6, 80).unwrap().fe.name, "first");
        assert!(ix.insert(&fe(vip, 80, 2, "third"), true));
        assert_eq!(ix.find(vip, 6, 80).unwrap().fe.name, "third");
        // Room for one: a second frontend is refused, not squeezed in.
        assert!(!ix.insert(&fe(vip, 81, 2, "fourth"), true));
        assert!(ix.find(vip, 6, 81).is_none());
        assert!(!VipIndex::with_room(0).insert(&fe(vip, 80, 2, "x"), true));
    }

    #[test]
    fn the_slots_choice_is_the_frontends() {
        let vip = Ipv4Addr::new(10, 96, 0, 10);
        let sizes = [0, 1, 2, 10, INLINE, INLINE + 1, RENDEZVOUS_MAX, 40];
        for (n, ports) in sizes.iter().map(|&n| (n, 1)).chain([(2, 2), (10, 3)]) {
            let f = on_ports(vip, 80, n, "web", ports);
            let inline = n <= INLINE && ports == 1;
            let mut ix = VipIndex::with_room(1);
            ix.insert(&f, true);
            let hit = ix.find(vip, 6, 80).unwrap();
            for i in 0..2_000 {
                let k = key(i);
                let whole = f.consistent_choice(&k).map(|j| f.backends[j].clone());
                match hit.plain_choice(&k, LoadBalancing::Maglev) {
                    Some(b) => {
                        assert!(inline, "{n} backends on {ports} ports chosen from the slot");
                        assert_eq!(b, whole, "{n} backends, connection {i}");
                    }
                    None => assert!(!inline, "{n} backends on {ports} ports"),
                }
                assert!(hit.plain_choice(&k, LoadBalancing::Random).is_none());
            }
        }
    }

    #[test]
    fn affinity_and_twins_go_through_the_frontend() {
        let vip = Ipv4Addr::new(10, 96, 0, 10);
        let mut sticky = (*fe(vip, 80, 3, "sticky")).clone();
        sticky.affinity_secs = Some(10);
        let mut twinned = (*fe(vip, 81, 3, "twinned")).clone();
        twinned.internal = Some(fe(Ipv4Addr::UNSPECIFIED, 81, 2, "twin"));
        let mut ix = VipIndex::with_room(2);
        ix.insert(&Arc::new(sticky), true);
        ix.insert(&Arc::new(twinned), true);
        let k = key(1);
        let s = ix.find(vip, 6, 80).unwrap();
        assert!(s.plain_choice(&k, LoadBalancing::Maglev).is_none());
        assert!(!s.has_internal());
        let t = ix.find(vip, 6, 81).unwrap();
        assert!(t.plain_choice(&k, LoadBalancing::Maglev).is_none());
        assert!(t.has_internal());
        assert!(t.masquerade_outside());
    }
}
