//! A group of views behaving as one table: packets of one connection read by different
//! workers, built by an independent encoder (etherparse).

use std::net::Ipv4Addr;

use conf::config::{LoadBalancing, Protocol};
use crossbeam_channel::{Receiver, Sender};
use etherparse::PacketBuilder;

use super::conntrack::Dir;
use super::*;
use crate::wire::{IpProtocol, Ipv4Packet, TcpFlags};

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
    let spec = crate::testutil::service("default", "web", VIP, proto, BACKENDS, affinity);
    ServiceTable::build(&[spec], "n1", lb)
}

/// A UDP connection from the client's port 5000 to the Service, opened through view 0 of a
/// pair at time 0: the Service table, the config, both views, and the backend it went to.
fn udp_opened_by_view_0() -> (
    ServiceTable,
    CtConfig,
    Conntrack,
    Conntrack,
    (Ipv4Addr, u16),
) {
    let svc = services(Protocol::Udp, None, LoadBalancing::Maglev);
    let cfg = CtConfig::default();
    let (mut w0, w1) = pair(cfg);
    let mut p = udp((CLIENT, 5000), (VIP, 80));
    assert_eq!(fwd(&svc, &mut w0, 0, &mut p), Nat::Translated);
    let (_, backend) = addrs(&p);
    (svc, cfg, w0, w1, backend)
}

/// The TCP Service and a pair of views sharing a table of 4 connections at most.
fn tcp_pair_of_4() -> (ServiceTable, Conntrack, Conntrack) {
    let cfg = CtConfig {
        max: 4,
        ..CtConfig::default()
    };
    let (w0, w1) = pair(cfg);
    (tcp_svc(), w0, w1)
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

/// Translates a client's packet; a connection opened or an existing one's packet are both
/// "translated" here (`opened_then_translated` tells them apart).
fn fwd(svc: &ServiceTable, ct: &mut Conntrack, now: u64, p: &mut [u8]) -> Nat {
    match fwd_exact(svc, ct, now, p) {
        Nat::Opened => Nat::Translated,
        n => n,
    }
}

fn fwd_exact(svc: &ServiceTable, ct: &mut Conntrack, now: u64, p: &mut [u8]) -> Nat {
    let mut ip = Ipv4Packet::new_checked(p).unwrap();
    translate(svc, ct, now, &mut ip, GW, false)
}

#[test]
fn opened_then_translated() {
    let svc = tcp_svc();
    let mut ct = Conntrack::new(CtConfig::default());
    let mut p = tcp((CLIENT, 40000), (VIP, 80), SYN);
    assert_eq!(fwd_exact(&svc, &mut ct, 0, &mut p), Nat::Opened);
    let mut p = tcp((CLIENT, 40000), (VIP, 80), ACK);
    assert_eq!(fwd_exact(&svc, &mut ct, 1, &mut p), Nat::Translated);
}

#[test]
fn policy_tracked_connections_pass_untouched_and_can_be_forgotten() {
    let svc = tcp_svc();
    let mut ct = Conntrack::new(CtConfig::default());
    let a: Ipv4Addr = "10.244.1.9".parse().unwrap();
    let key = Key {
        src: CLIENT,
        dst: a,
        sport: 40000,
        dport: 8080,
        proto: 6,
    };
    assert!(ct.track(key, CtState::SynSent, 0));
    let mut p = tcp((CLIENT, 40000), (a, 8080), ACK);
    let before = p.clone();
    assert_eq!(fwd_exact(&svc, &mut ct, 1, &mut p), Nat::Tracked);
    assert_eq!(p, before);
    // The reply is no Service's: not rewritten either.
    let mut r = tcp((a, 8080), (CLIENT, 40000), SYN_ACK);
    assert!(!back(&mut ct, 2, &mut r));
    assert_eq!(fwd_exact(&svc, &mut ct, 2, &mut r), Nat::Tracked);
    ct.forget(&key);
    assert!(ct.is_empty());
    let mut p = tcp((CLIENT, 40000), (a, 8080), ACK);
    assert_eq!(fwd_exact(&svc, &mut ct, 3, &mut p), Nat::None);
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

/// How many connections a view lists (those it created and are live).
fn listed(w: &Conntrack) -> usize {
    w.entries(&ServiceTable::default()).count()
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
    assert_eq!(listed(&w0) + listed(&w1), 1);
}

#[test]
fn a_listed_connection_is_named_after_the_frontend_its_address_has_now() {
    let svc = tcp_svc();
    let (mut w0, _w1) = pair(CtConfig::default());
    open(&svc, &mut w0, 0, 40_000);
    let policy = super::conntrack::Key {
        src: CLIENT,
        dst: Ipv4Addr::new(10, 244, 2, 9),
        sport: 41_000,
        dport: 8080,
        proto: IpProtocol::TCP.0,
    };
    assert!(w0.track(policy, CtState::SynSent, 0));
    let names = |t: &ServiceTable| {
        let mut n: Vec<String> = w0.entries(t).map(|e| e.frontend).collect();
        n.sort();
        n
    };
    let name = svc
        .lookup(VIP, IpProtocol::TCP.0, 80)
        .expect("frontend")
        .name
        .clone();
    assert_eq!(names(&svc), ["(policy)".to_string(), name]);
    // The Service gone: the connection lives on, under no name.
    assert_eq!(names(&ServiceTable::default()), ["(gone)", "(policy)"]);
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
        let e: Vec<CtEntry> = w0.entries(&ServiceTable::default()).collect();
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
    assert_eq!(listed(&w1), 0, "view 1 owns nothing");
}

#[test]
fn the_owners_sweep_removes_an_expired_connection_from_every_view() {
    let (_svc, cfg, mut w0, mut w1, backend) = udp_opened_by_view_0();
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
    let (_svc, cfg, mut w0, mut w1, backend) = udp_opened_by_view_0();
    let later = cfg.udp_ms + 1;
    let mut r = udp(backend, (CLIENT, 5000));
    assert!(!back(&mut w1, later, &mut r), "expired");
    assert_eq!(w1.counters.expired, 1);
    assert_eq!(w0.len(), 0);
    // Its owner frees it without counting it again.
    assert_eq!(listed(&w0), 0);
    w0.sweep(later, 1000);
    assert_eq!(w0.counters.expired, 0);
    assert!(w0.slots.iter().all(Option::is_none));
    w1.sync();
    assert!(w1.index.is_empty());
    assert_counts_add_up(&[&w0, &w1]);
}

#[test]
fn a_newer_connection_with_the_same_keys_survives_the_removal_of_the_older() {
    let (svc, cfg, mut w0, mut w1, backend) = udp_opened_by_view_0();
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
    assert_eq!(listed(&w1), 1);
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
    let create =
        |w: &mut Conntrack, b: Ipv4Addr| w.create(orig, reply(b), be(b), None, CtState::UdpNew, 0);
    // Neither has seen the other's before creating its own.
    assert!(create(&mut w1, BACKENDS[1]));
    assert!(create(&mut w0, BACKENDS[0]));
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
    let (svc, mut w0, mut w1) = tcp_pair_of_4();
    for i in 0..2 {
        open(&svc, &mut w0, i, 1000 + i as u16);
        open(&svc, &mut w1, i, 2000 + i as u16);
    }
    assert_eq!((w0.len(), w1.len()), (4, 4));
    // Full: worker 1 makes room among its own.
    open(&svc, &mut w1, 5, 2002);
    assert_eq!(w1.len(), 4);
    assert_eq!((w0.counters.evicted, w1.counters.evicted), (0, 1));
    assert_eq!(listed(&w0), 2);
    assert_eq!(listed(&w1), 2);

    // Many more from both: never above the limit, and every count accounted for.
    for i in 0..200u16 {
        let w = if i % 3 == 0 { &mut w1 } else { &mut w0 };
        open(&svc, w, 10 + u64::from(i), 3000 + i);
        assert!(w0.len() <= 4);
        let live = listed(&w0) + listed(&w1);
        assert!(live <= 4, "{live} live");
    }
    assert_counts_add_up(&[&w0, &w1]);
}

#[test]
fn a_worker_owning_nothing_still_gets_room_in_a_full_table() {
    let (svc, mut w0, mut w1) = tcp_pair_of_4();
    for i in 0..4 {
        open(&svc, &mut w0, i, 1000 + i as u16);
    }
    let backend = open(&svc, &mut w1, 5, 2000);
    assert_eq!(w1.len(), 4);
    assert_eq!(w1.counters.evicted, 1);
    assert_eq!(listed(&w0), 3);
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

// ---------------------------------------------------------------------------------------------
// Which endpoints stand behind which frontend, modelled on kube-proxy's topology_test.go
// (TestCategorizeEndpoints) and endpointslicecache_test.go (named ports per slice).

mod policy {
    use std::net::IpAddr;

    use conf::config::{EndpointSpec, ServiceSpec, TrafficPolicy};

    use super::*;

    const EXT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
    const LB: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
    const OUTSIDE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

    fn ep(ip: Ipv4Addr, node: &str, ready: bool, terminating: bool) -> EndpointSpec {
        EndpointSpec {
            ip: IpAddr::V4(ip),
            node: Some(node.into()),
            ready,
            serving: ready || terminating,
            terminating,
            hostname: None,
            ports: None,
            for_zones: Vec::new(),
            for_nodes: Vec::new(),
        }
    }

    fn svc(itp: TrafficPolicy, etp: TrafficPolicy, eps: Vec<EndpointSpec>) -> ServiceSpec {
        let mut s = crate::testutil::service("default", "web", VIP, Protocol::Tcp, [], None);
        s.internal_traffic_policy = itp;
        s.external_traffic_policy = etp;
        s.external_ips = vec![IpAddr::V4(EXT)];
        s.load_balancer_ips = vec![IpAddr::V4(LB)];
        s.endpoints = eps;
        s
    }

    fn backends(t: &ServiceTable, vip: Ipv4Addr, in_cluster: bool) -> Vec<(Ipv4Addr, u16)> {
        let fe = t.lookup(vip, IpProtocol::TCP.0, 80).expect("a frontend");
        t.for_client(fe, in_cluster)
            .backends
            .iter()
            .map(|b| (b.ip, b.port))
            .collect()
    }

    const A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
    const B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);
    const C: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);

    #[test]
    fn external_addresses_follow_external_policy_and_cluster_ips_internal() {
        // ITP Local, ETP Cluster: the ClusterIP has only the local endpoint, the external IP
        // and the LoadBalancer address every endpoint (they used to inherit ITP).
        let s = svc(
            TrafficPolicy::Local,
            TrafficPolicy::Cluster,
            vec![ep(A, "n1", true, false), ep(B, "n2", true, false)],
        );
        let t = ServiceTable::build(&[s], "n1", LoadBalancing::Maglev);
        assert_eq!(backends(&t, VIP, true), [(A, 8080)]);
        for vip in [EXT, LB] {
            assert_eq!(backends(&t, vip, false), [(A, 8080), (B, 8080)]);
            assert_eq!(backends(&t, vip, true), [(A, 8080), (B, 8080)]);
        }
        // ITP Cluster, ETP Local: outside clients of the external addresses get the local
        // endpoint only; pods and nodes are short-circuited to the internal policy.
        let s = svc(
            TrafficPolicy::Cluster,
            TrafficPolicy::Local,
            vec![ep(A, "n1", true, false), ep(B, "n2", true, false)],
        );
        let t = ServiceTable::build(&[s], "n1", LoadBalancing::Maglev);
        assert_eq!(backends(&t, VIP, false), [(A, 8080), (B, 8080)]);
        for vip in [EXT, LB] {
            assert_eq!(backends(&t, vip, false), [(A, 8080)]);
            assert_eq!(backends(&t, vip, true), [(A, 8080), (B, 8080)]);
        }
        // Seen from n3, which has no endpoint: outside clients are refused.
        let t = ServiceTable::build(
            &[svc(
                TrafficPolicy::Cluster,
                TrafficPolicy::Local,
                vec![ep(A, "n1", true, false)],
            )],
            "n3",
            LoadBalancing::Maglev,
        );
        assert!(backends(&t, EXT, false).is_empty());
        let mut ct = Conntrack::new(CtConfig::default());
        let mut p = tcp((OUTSIDE, 40000), (EXT, 80), SYN);
        let mut ip = Ipv4Packet::new_checked(&mut p[..]).unwrap();
        let got = translate_from(&t, &mut ct, 0, &mut ip, GW, false, |_| false);
        assert_eq!(got, Nat::NoBackend);
        // A pod of the cluster still reaches it through the same address.
        let mut p = tcp((CLIENT, 40000), (EXT, 80), SYN);
        let mut ip = Ipv4Packet::new_checked(&mut p[..]).unwrap();
        let got = translate_from(&t, &mut ct, 0, &mut ip, GW, false, |_| true);
        assert_eq!(got, Nat::Opened);
        assert_eq!(addrs(&p).1, (A, 8080));
    }

    #[test]
    fn outside_clients_are_seen_as_the_node_unless_the_policy_is_local() {
        // Policy Cluster: an outside client of an external address, a LoadBalancer address or
        // a ClusterIP reaches the backend from the gateway (its port kept), so the answers,
        // wherever the backend runs, come back through this node; they leave from the
        // address the client used.
        let s = svc(
            TrafficPolicy::Cluster,
            TrafficPolicy::Cluster,
            vec![ep(B, "n2", true, false)],
        );
        let t = ServiceTable::build(&[s], "n1", LoadBalancing::Maglev);
        let mut ct = Conntrack::new(CtConfig::default());
        for (i, vip) in [EXT, LB, VIP].into_iter().enumerate() {
            let sport = 41000 + i as u16;
            let mut p = tcp((OUTSIDE, sport), (vip, 80), SYN);
            let mut ip = Ipv4Packet::new_checked(&mut p[..]).unwrap();
            let got = translate_from(&t, &mut ct, 0, &mut ip, GW, false, |_| false);
            assert_eq!(got, Nat::Opened);
            assert_eq!(addrs(&p), ((GW, sport), (B, 8080)), "{vip}");
            let mut r = tcp((B, 8080), (GW, sport), SYN_ACK);
            let mut ip = Ipv4Packet::new_checked(&mut r[..]).unwrap();
            let got = translate_from(&t, &mut ct, 0, &mut ip, GW, false, |_| false);
            assert_eq!(got, Nat::Translated);
            assert_eq!(addrs(&r), ((vip, 80), (OUTSIDE, sport)), "{vip}");
        }
        // A pod is seen as itself.
        let mut p = tcp((CLIENT, 42000), (EXT, 80), SYN);
        let mut ip = Ipv4Packet::new_checked(&mut p[..]).unwrap();
        translate_from(&t, &mut ct, 0, &mut ip, GW, false, |_| true);
        assert_eq!(addrs(&p), ((CLIENT, 42000), (B, 8080)));
        // Policy Local: the outside client's own address reaches the (local) backend.
        let s = svc(
            TrafficPolicy::Cluster,
            TrafficPolicy::Local,
            vec![ep(A, "n1", true, false), ep(B, "n2", true, false)],
        );
        let t = ServiceTable::build(&[s], "n1", LoadBalancing::Maglev);
        let mut ct = Conntrack::new(CtConfig::default());
        let mut p = tcp((OUTSIDE, 43000), (LB, 80), SYN);
        let mut ip = Ipv4Packet::new_checked(&mut p[..]).unwrap();
        translate_from(&t, &mut ct, 0, &mut ip, GW, false, |_| false);
        assert_eq!(addrs(&p), ((OUTSIDE, 43000), (A, 8080)));
    }

    #[test]
    fn local_policy_falls_back_to_local_serving_terminating_endpoints() {
        // KEP-1669 for policy Local: no local ready endpoint, a local terminating one that
        // still serves is used rather than nothing (and a remote ready one is not).
        let s = svc(
            TrafficPolicy::Local,
            TrafficPolicy::Local,
            vec![
                ep(A, "n1", false, true),
                ep(C, "n1", false, false),
                ep(B, "n2", true, false),
            ],
        );
        let t = ServiceTable::build(&[s], "n1", LoadBalancing::Maglev);
        assert_eq!(backends(&t, VIP, true), [(A, 8080)]);
        assert_eq!(backends(&t, EXT, false), [(A, 8080)]);
        // Once a local endpoint is ready, the terminating one is left.
        let s = svc(
            TrafficPolicy::Local,
            TrafficPolicy::Local,
            vec![ep(A, "n1", false, true), ep(C, "n1", true, false)],
        );
        let t = ServiceTable::build(&[s], "n1", LoadBalancing::Maglev);
        assert_eq!(backends(&t, EXT, false), [(C, 8080)]);
    }

    #[test]
    fn each_endpoint_is_served_on_its_own_target_port() {
        // A rollout renumbering the named port "http": old pods on 8080, new pods on 9090,
        // one pod whose slice has no "http" port at all.
        let mut s = svc(TrafficPolicy::Cluster, TrafficPolicy::Cluster, vec![]);
        let with = |ip, port: Option<u16>| EndpointSpec {
            ports: Some(std::sync::Arc::new(
                port.map(|p| ("http".to_string(), p)).into_iter().collect(),
            )),
            ..ep(ip, "n1", true, false)
        };
        s.endpoints = vec![with(A, Some(8080)), with(B, Some(9090)), with(C, None)];
        let t = ServiceTable::build(&[s], "n1", LoadBalancing::Maglev);
        assert_eq!(backends(&t, VIP, true), [(A, 8080), (B, 9090)]);
        // Every connection lands on a (backend, its own port) pair.
        let mut ct = Conntrack::new(CtConfig::default());
        let mut seen = std::collections::BTreeSet::new();
        for sport in 1000..1200 {
            let mut p = tcp((CLIENT, sport), (VIP, 80), SYN);
            assert_eq!(fwd(&t, &mut ct, 0, &mut p), Nat::Translated);
            seen.insert(addrs(&p).1);
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), [(A, 8080), (B, 9090)]);
    }

    #[test]
    fn affinity_survives_other_services_coming_and_going() {
        // kube-proxy keys affinity on the Service port: a table rebuilt with another Service
        // in front of this one (every position moved) keeps each client's backend.
        let backends4 = BACKENDS;
        let web =
            crate::testutil::service("default", "web", VIP, Protocol::Tcp, backends4, Some(600));
        let other = crate::testutil::service(
            "aaa",
            "first",
            Ipv4Addr::new(10, 96, 0, 1),
            Protocol::Tcp,
            [Ipv4Addr::new(10, 244, 9, 9)],
            None,
        );
        let before = ServiceTable::build(std::slice::from_ref(&web), "n1", LoadBalancing::Random);
        let after = ServiceTable::build(&[other, web], "n1", LoadBalancing::Random);
        let id = |t: &ServiceTable| t.frontends().iter().position(|f| f.vip == VIP);
        assert_ne!(id(&before), id(&after), "the test must move the frontend");
        let mut ct = Conntrack::new(CtConfig::default());
        let first = open(&before, &mut ct, 0, 1000);
        for sport in 1001..1040 {
            assert_eq!(open(&after, &mut ct, 1, sport), first);
        }
        // And one client keeps its backend whichever address of the Service it uses.
        let mut both =
            crate::testutil::service("default", "web", VIP, Protocol::Tcp, backends4, Some(600));
        both.external_ips = vec![IpAddr::V4(EXT)];
        let t = ServiceTable::build(&[both], "n1", LoadBalancing::Random);
        let mut ct = Conntrack::new(CtConfig::default());
        let first = open(&t, &mut ct, 0, 2000);
        for sport in 2001..2040 {
            let mut p = tcp((CLIENT, sport), (EXT, 80), SYN);
            assert_eq!(fwd(&t, &mut ct, 0, &mut p), Nat::Translated);
            assert_eq!(addrs(&p).1, first);
        }
    }

    #[test]
    fn a_service_of_another_proxy_is_not_translated() {
        let mut s = svc(
            TrafficPolicy::Cluster,
            TrafficPolicy::Cluster,
            vec![ep(A, "n1", true, false)],
        );
        s.proxy_name = Some("mesh".into());
        let t = ServiceTable::build(&[s], "n1", LoadBalancing::Maglev);
        assert!(t.is_empty());
    }

    /// Cases of kube-proxy's TestCategorizeEndpoints with hints: (zone hints, node hints) per
    /// endpoint A (n1, zone-a), B (n2, zone-b), C (n1, zone-a).
    #[test]
    fn topology_hints_as_kube_proxy_follows_them() {
        let hinted = |ip, node: &str, zones: &[&str], nodes: &[&str]| EndpointSpec {
            for_zones: zones.iter().map(|z| z.to_string()).collect(),
            for_nodes: nodes.iter().map(|n| n.to_string()).collect(),
            ..ep(ip, node, true, false)
        };
        let got = |eps: Vec<EndpointSpec>, node: &str, zone: Option<&str>, itp| {
            let s = svc(itp, TrafficPolicy::Cluster, eps);
            let t = ServiceTable::build_in(&[s], node, zone, LoadBalancing::Maglev);
            backends(&t, VIP, true)
                .into_iter()
                .map(|(ip, _)| ip)
                .collect::<Vec<_>>()
        };
        use TrafficPolicy::*;
        let zoned = || {
            vec![
                hinted(A, "n1", &["zone-a"], &[]),
                hinted(B, "n2", &["zone-b"], &[]),
                hinted(C, "n1", &["zone-a"], &[]),
            ]
        };
        // Every endpoint hinted, one for this zone: only this zone's.
        assert_eq!(got(zoned(), "n1", Some("zone-a"), Cluster), [A, C]);
        assert_eq!(got(zoned(), "n2", Some("zone-b"), Cluster), [B]);
        // No endpoint for this zone, or the node has no zone label: all of them.
        assert_eq!(got(zoned(), "n3", Some("zone-c"), Cluster), [A, C, B]);
        assert_eq!(got(zoned(), "n1", None, Cluster), [A, C, B]);
        // One ready endpoint without hints: hints are ignored altogether.
        let mut partly = zoned();
        partly[1].for_zones.clear();
        assert_eq!(got(partly, "n1", Some("zone-a"), Cluster), [A, C, B]);
        // ...but an unready one without hints does not count.
        let mut unready = zoned();
        unready.push(ep(Ipv4Addr::new(10, 244, 9, 9), "n9", false, false));
        assert_eq!(got(unready, "n1", Some("zone-a"), Cluster), [A, C]);
        // Node hints first when one names this node; otherwise the zone hints.
        let noded = || {
            vec![
                hinted(A, "n1", &["zone-a"], &["n1"]),
                hinted(B, "n2", &["zone-a"], &["n2"]),
                hinted(C, "n1", &["zone-a"], &["n1"]),
            ]
        };
        assert_eq!(got(noded(), "n2", Some("zone-a"), Cluster), [B]);
        assert_eq!(got(noded(), "n3", Some("zone-a"), Cluster), [A, C, B]);
        // Policy Local is about nodes already: hints play no part.
        assert_eq!(got(zoned(), "n1", Some("zone-b"), Local), [A, C]);
    }
}

mod rebuild {
    //! A change of Services builds only the changed Services' frontends (issue 23).
    use conf::config::LoadBalancing;
    use std::net::{IpAddr, Ipv4Addr};

    use super::super::ServiceTable;
    use crate::testutil::{many_services, many_services_vip};
    use crate::wire::IpProtocol;

    fn fe(t: &ServiceTable, i: usize) -> *const super::super::Frontend {
        t.lookup(many_services_vip(i), IpProtocol::TCP.0, 80)
            .map_or(std::ptr::null(), |f| f as *const _)
    }

    #[test]
    fn unchanged_services_are_shared_and_changed_ones_built_anew() {
        let mut specs = many_services(100);
        let t = ServiceTable::build(&specs, "n1", LoadBalancing::Maglev);
        // One endpoint of one Service goes: that Service's frontend is new, the others' are
        // the same objects, Maglev tables and all.
        specs[7].endpoints.pop();
        let next = t.rebuild(&specs, "n1", None, LoadBalancing::Maglev);
        for i in 0..100 {
            assert_eq!(fe(&t, i) == fe(&next, i), i != 7, "Service {i}");
        }
        let seven = next
            .lookup(many_services_vip(7), IpProtocol::TCP.0, 80)
            .unwrap();
        assert_eq!(seven.backends.len(), 9);
        // Nothing changed: everything shared, the same lookups.
        let same = next.rebuild(&specs, "n1", None, LoadBalancing::Maglev);
        assert!((0..100).all(|i| fe(&next, i) == fe(&same, i)));
        // A Service removed is gone, one added is there; the rest still shared.
        let gone = specs.remove(3);
        let mut added = gone.clone();
        added.name = "added".into();
        added.cluster_ips = vec![IpAddr::V4(Ipv4Addr::new(10, 97, 0, 1))];
        specs.push(added);
        let after = same.rebuild(&specs, "n1", None, LoadBalancing::Maglev);
        assert!(fe(&after, 3).is_null());
        assert!(after
            .lookup(Ipv4Addr::new(10, 97, 0, 1), IpProtocol::TCP.0, 80)
            .is_some());
        assert_eq!(after.frontends().len(), 100);
        assert!(fe(&after, 50) == fe(&same, 50));
        // Another node or zone sees other backends: nothing is reused.
        let zoned = after.rebuild(&specs, "n1", Some("z1"), LoadBalancing::Maglev);
        assert!(fe(&zoned, 50) != fe(&after, 50));
        let other = after.rebuild(&specs, "n2", None, LoadBalancing::Maglev);
        assert!(fe(&other, 50) != fe(&after, 50));
        // The handle itself: a rebuild is a new table, the old one unchanged.
        assert!(!ServiceTable::ptr_eq(&after, &same));
        assert!(!fe(&same, 3).is_null());
    }
}
