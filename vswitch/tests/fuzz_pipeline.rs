//! Fuzzing of the whole pipeline with property tests.
//!
//! Frames are thrown at the real decision code exactly as the datapath calls it: from a pod
//! port or the host port (`handle`, with a virtio-net header turned into `Meta`, in a buffer as
//! large as the worker's), and from the underlay (`decap`, then `handle_underlay`, then
//! software GRO, for a batch of datagrams in one receive buffer). What leaves towards a peer is
//! segmented or checksummed as the datapath does. The tables are those of a real node: four
//! pods, a host port, two peers, Services built by `ServiceTable::build` (with endpoints here
//! and on peers, with none, with affinity, with traffic policy Local, an external IP), and no
//! DNS (so `Action::DnsForward` never happens).
//!
//! Inputs are arbitrary bytes and, more usefully, valid ARP / IPv4 TCP, UDP, ICMP echo and
//! ICMP error frames from an independent encoder (etherparse), addressed at everything the
//! switch knows, then mutated (bytes changed, truncated, extended).
//!
//! Properties: nothing panics; every outcome is a forwarding action to something that exists
//! or a `Drop` with a reason; a reply fits the buffer and goes back to the sender; a frame a pod
//! sends out carries its own MAC and address (or ones the switch put there: the gateway's, a
//! Service's); what comes from a peer is only delivered to a local port, from that peer's pod
//! CIDR; bytes past the frame are never read; and the connection tracking table never holds
//! more than its maximum, however many flows arrive, with its counters adding up.
//!
//! Each property runs 2,000 cases by default (the conntrack one 200 sequences of ~1,000-4,000
//! flows), or `PROPTEST_CASES` (the conntrack one a tenth of it). A long run:
//! `PROPTEST_CASES=1000000 cargo test --release -p vswitch --test fuzz_pipeline`.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;

use conf::config::{
    EndpointSpec, LoadBalancing, Protocol, ServicePort, ServiceSpec, TrafficPolicy,
};
use etherparse::PacketBuilder;
use overlay::{Peer, PeerTable};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;

use vswitch::datapath::gro::Gro;
use vswitch::datapath::segment::{segment_tcp4, Csum};
use vswitch::pipeline::tables::{host_mac_for, mac_for};
use vswitch::pipeline::{
    decap, encap_for, handle, handle_underlay, Action, Conntrack, CtConfig, Ctx, DropReason, Meta,
    PortEntry, PortId, ServiceTable, Tables,
};
use vswitch::wire::{virtio, EthernetAddress, EthernetFrame, Ipv4Packet, VirtioNetHdr};

// ---------------------------------------------------------------------------------------------
// The node under test

const GW: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
const HOST: PortId = 0;
const NPODS: usize = 4;
/// An id no port has.
const NO_PORT: PortId = 99;
const OUR_UNDERLAY: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);
const PEER_UNDERLAY: [Ipv4Addr; 2] = [
    Ipv4Addr::new(192, 168, 100, 2),
    Ipv4Addr::new(192, 168, 100, 3),
];
const REMOTE_POD: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 244, 2, 5), Ipv4Addr::new(10, 244, 3, 7)];
/// The datapath's frame buffer past the virtio-net header: a 64 KiB super-frame plus room.
const WORKER_BUF: usize = 14 + 65_535 + 64;
/// The datapath's segmentation buffer.
const SEG_BUF: usize = 2 * 65_536 + 16_384;
const CT_MAX: usize = 1024;

fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1, 2 + i as u8)
}
fn pod_port(i: usize) -> PortId {
    i as PortId + 1
}
fn vtep(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x0e, 0x58, o[0], o[1], o[2], o[3]]
}

/// A Service frontend as clients address it.
#[derive(Debug, Clone, Copy)]
struct Svc {
    vip: Ipv4Addr,
    tcp: bool,
    port: u16,
}

const SVCS: [Svc; 7] = [
    // web: a local and a remote endpoint.
    Svc {
        vip: Ipv4Addr::new(10, 96, 0, 20),
        tcp: true,
        port: 80,
    },
    // web's external IP.
    Svc {
        vip: Ipv4Addr::new(192, 0, 2, 10),
        tcp: true,
        port: 80,
    },
    // dns-ish UDP: a local and a remote endpoint.
    Svc {
        vip: Ipv4Addr::new(10, 96, 0, 30),
        tcp: false,
        port: 53,
    },
    // no endpoints: rejected (RST / ICMP port unreachable).
    Svc {
        vip: Ipv4Addr::new(10, 96, 0, 40),
        tcp: true,
        port: 80,
    },
    Svc {
        vip: Ipv4Addr::new(10, 96, 0, 40),
        tcp: false,
        port: 80,
    },
    // ClientIP affinity, endpoints pods 0 and 3 (pod 0 hairpins through it).
    Svc {
        vip: Ipv4Addr::new(10, 96, 0, 50),
        tcp: true,
        port: 443,
    },
    // internalTrafficPolicy Local with endpoints only on another node: none here.
    Svc {
        vip: Ipv4Addr::new(10, 96, 0, 60),
        tcp: true,
        port: 80,
    },
];

fn services() -> Vec<ServiceSpec> {
    let ep = |ip: Ipv4Addr, node: &str| EndpointSpec {
        ip: IpAddr::V4(ip),
        node: Some(node.into()),
        ready: true,
        serving: true,
        terminating: false,
        hostname: None,
        ports: None,
        for_zones: Vec::new(),
        for_nodes: Vec::new(),
    };
    let port = |proto, port, target| ServicePort {
        name: None,
        protocol: proto,
        port,
        target_port: Some(target),
        node_port: None,
    };
    let svc = |name: &str, vip: Ipv4Addr, ports, endpoints| ServiceSpec {
        namespace: "default".into(),
        name: name.into(),
        cluster_ips: vec![IpAddr::V4(vip)],
        ports,
        external_ips: vec![],
        session_affinity_timeout: None,
        internal_traffic_policy: TrafficPolicy::default(),
        external_traffic_policy: TrafficPolicy::default(),
        load_balancer_ips: Vec::new(),
        health_check_node_port: None,
        proxy_name: None,
        endpoints,
    };
    let mut web = svc(
        "web",
        SVCS[0].vip,
        vec![port(Protocol::Tcp, 80, 8080)],
        vec![ep(pod_ip(1), "n1"), ep(REMOTE_POD[0], "n2")],
    );
    web.external_ips = vec![IpAddr::V4(SVCS[1].vip)];
    let dns = svc(
        "dns",
        SVCS[2].vip,
        vec![port(Protocol::Udp, 53, 5353)],
        vec![ep(pod_ip(2), "n1"), ep(REMOTE_POD[1], "n3")],
    );
    let empty = svc(
        "empty",
        SVCS[3].vip,
        vec![port(Protocol::Tcp, 80, 80), port(Protocol::Udp, 80, 80)],
        vec![],
    );
    let mut sticky = svc(
        "sticky",
        SVCS[5].vip,
        vec![port(Protocol::Tcp, 443, 8443)],
        vec![ep(pod_ip(0), "n1"), ep(pod_ip(3), "n1")],
    );
    sticky.session_affinity_timeout = Some(10_800);
    let mut local = svc(
        "local",
        SVCS[6].vip,
        vec![port(Protocol::Tcp, 80, 8080)],
        vec![ep(REMOTE_POD[0], "n2")],
    );
    local.internal_traffic_policy = TrafficPolicy::Local;
    vec![web, dns, empty, sticky, local]
}

/// The tables of node n1, with Maglev (`[0]`) or random (`[1]`) backend selection.
fn tables(random_lb: bool) -> &'static Tables {
    static T: OnceLock<[Tables; 2]> = OnceLock::new();
    let t = T.get_or_init(|| {
        let build = |lb| {
            let mut t = Tables::new("10.244.1.0/24".parse().unwrap(), GW, mac_for(GW)).with_ports(
                (0..NPODS).map(|i| PortEntry {
                    id: pod_port(i),
                    mac: mac_for(pod_ip(i)),
                    ip: pod_ip(i),
                }),
            );
            t.vtep_mac = EthernetAddress(vtep(OUR_UNDERLAY));
            t.overlay_mtu = 1450;
            t.vni = 1;
            t.node_name = "n1".into();
            t.peers = PeerTable::new(
                (0..2)
                    .map(|k| Peer {
                        name: format!("n{}", k + 2),
                        underlay: IpAddr::V4(PEER_UNDERLAY[k]),
                        vtep_mac: vtep(PEER_UNDERLAY[k]),
                        pod_cidrs: vec![format!("10.244.{}.0/24", k + 2).parse().unwrap()],
                        // One vswitch peer (RCO) and one kernel peer.
                        remote_csum: k == 0,
                    })
                    .collect(),
            )
            .unwrap();
            t.host = Some(PortEntry {
                id: HOST,
                mac: host_mac_for(GW),
                ip: GW,
            });
            t.dns = None;
            t.with_services(ServiceTable::build(&services(), "n1", lb))
        };
        [build(LoadBalancing::Maglev), build(LoadBalancing::Random)]
    });
    &t[usize::from(random_lb)]
}

fn ct_config() -> CtConfig {
    CtConfig {
        max: CT_MAX,
        ..CtConfig::default()
    }
}

/// `PROPTEST_CASES` if set, else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n.max(1),
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// What a frame is made of

/// Addresses worth aiming at, plus random ones.
fn any_ip() -> BoxedStrategy<Ipv4Addr> {
    prop_oneof![
        Just(GW),
        (0..NPODS).prop_map(pod_ip),
        (0usize..2).prop_map(|k| REMOTE_POD[k]),
        (0..SVCS.len()).prop_map(|i| SVCS[i].vip),
        prop_oneof![
            Just(Ipv4Addr::new(8, 8, 8, 8)),
            Just(Ipv4Addr::UNSPECIFIED),
            Just(Ipv4Addr::BROADCAST),
            Just(Ipv4Addr::new(224, 0, 0, 1)),
            Just(Ipv4Addr::new(10, 244, 1, 200)),
        ],
        any::<[u8; 4]>().prop_map(Ipv4Addr::from),
    ]
    .boxed()
}

fn any_mac() -> BoxedStrategy<[u8; 6]> {
    prop_oneof![
        Just(mac_for(GW).0),
        (0..NPODS).prop_map(|i| mac_for(pod_ip(i)).0),
        Just(host_mac_for(GW).0),
        Just([0xff; 6]),
        Just(vtep(OUR_UNDERLAY)),
        any::<[u8; 6]>(),
    ]
    .boxed()
}

/// Who a frame claims to be from.
#[derive(Debug, Clone)]
enum Src {
    /// The ingress port's own MAC and address (past anti-spoofing, into the deeper logic).
    Own,
    OwnMacOtherIp(Ipv4Addr),
    Other([u8; 6], Ipv4Addr),
}

fn any_src() -> BoxedStrategy<Src> {
    prop_oneof![
        6 => Just(Src::Own),
        1 => any_ip().prop_map(Src::OwnMacOtherIp),
        1 => (any_mac(), any_ip()).prop_map(|(m, i)| Src::Other(m, i)),
    ]
    .boxed()
}

/// Where a frame is sent: the destination MAC and address.
#[derive(Debug, Clone)]
enum Dst {
    /// Routed: to the gateway MAC, for this address.
    Routed(Ipv4Addr),
    /// Switched: to a pod's own MAC.
    Switched(usize),
    /// A Service frontend through the gateway, at its port.
    Service(usize),
    Raw([u8; 6], Ipv4Addr),
}

fn any_dst() -> BoxedStrategy<Dst> {
    prop_oneof![
        3 => any_ip().prop_map(Dst::Routed),
        2 => (0..NPODS).prop_map(Dst::Switched),
        4 => (0..SVCS.len()).prop_map(Dst::Service),
        1 => (any_mac(), any_ip()).prop_map(|(m, i)| Dst::Raw(m, i)),
    ]
    .boxed()
}

/// The layer 4 part of an IPv4 frame.
#[derive(Debug, Clone)]
enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        seq: u32,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    Echo {
        id: u16,
        seq: u16,
    },
    /// Destination unreachable (port) quoting a TCP/UDP packet between these.
    IcmpError {
        quoted: (Ipv4Addr, u16, Ipv4Addr, u16),
        tcp: bool,
    },
    /// Another protocol number (GRE, SCTP, ...) over a UDP-shaped body.
    Other(u8),
}

fn any_port() -> BoxedStrategy<u16> {
    prop_oneof![
        Just(80u16),
        Just(53),
        Just(443),
        Just(8080),
        Just(5353),
        any::<u16>()
    ]
    .boxed()
}

fn any_l4() -> BoxedStrategy<L4> {
    prop_oneof![
        4 => (any::<u16>(), any_port(), any::<u8>(), any::<u32>())
            .prop_map(|(sport, dport, flags, seq)| L4::Tcp { sport, dport, flags, seq }),
        3 => (any::<u16>(), any_port()).prop_map(|(sport, dport)| L4::Udp { sport, dport }),
        2 => (any::<u16>(), any::<u16>()).prop_map(|(id, seq)| L4::Echo { id, seq }),
        2 => ((any_ip(), any_port(), any_ip(), any_port()), any::<bool>())
            .prop_map(|(quoted, tcp)| L4::IcmpError { quoted, tcp }),
        1 => any::<u8>().prop_map(L4::Other),
    ]
    .boxed()
}

#[derive(Debug, Clone)]
enum Body {
    Arp {
        op: u16,
        src: Src,
        target: Ipv4Addr,
    },
    Ipv4 {
        src: Src,
        dst: Dst,
        l4: L4,
        ttl: u8,
        df: bool,
        payload: usize,
        fill: u8,
    },
    /// Another ethertype (IPv6, VLAN, LLDP, ...) with whatever follows.
    Ethertype(u16, Vec<u8>),
    Bytes(Vec<u8>),
}

fn payload_len() -> BoxedStrategy<usize> {
    prop_oneof![
        8 => 0usize..64,
        4 => 64usize..1500,
        2 => 1380usize..1480,
        1 => 1500usize..65_000,
    ]
    .boxed()
}

fn any_body() -> BoxedStrategy<Body> {
    prop_oneof![
        2 => (prop_oneof![Just(1u16), Just(2), any::<u16>()], any_src(), any_ip())
            .prop_map(|(op, src, target)| Body::Arp { op, src, target }),
        8 => (any_src(), any_dst(), any_l4(), prop_oneof![Just(64u8), Just(1), Just(0), any::<u8>()],
              any::<bool>(), payload_len(), any::<u8>())
            .prop_map(|(src, dst, l4, ttl, df, payload, fill)| Body::Ipv4 { src, dst, l4, ttl, df, payload, fill }),
        1 => (prop_oneof![Just(0x86ddu16), Just(0x8100), Just(0x88cc), any::<u16>()],
              proptest::collection::vec(any::<u8>(), 0..100))
            .prop_map(|(t, b)| Body::Ethertype(t, b)),
        1 => proptest::collection::vec(any::<u8>(), 0..200).prop_map(Body::Bytes),
    ]
    .boxed()
}

/// Changes to a built frame: bytes overwritten, then cut or extended.
#[derive(Debug, Clone)]
struct Mutation {
    bytes: Vec<(usize, u8)>,
    resize: Option<usize>,
}

fn any_mutation() -> BoxedStrategy<Mutation> {
    prop_oneof![
        // Unchanged: valid frames must get through the deep paths too.
        3 => Just(Mutation { bytes: vec![], resize: None }),
        // The headers are where parsers go wrong: aim there mostly.
        4 => proptest::collection::vec((prop_oneof![0usize..80, any::<usize>()], any::<u8>()), 1..5)
            .prop_map(|bytes| Mutation { bytes, resize: None }),
        2 => (proptest::collection::vec((0usize..80, any::<u8>()), 0..3), 0usize..120)
            .prop_map(|(bytes, n)| Mutation { bytes, resize: Some(n) }),
    ]
    .boxed()
}

impl Mutation {
    fn apply(&self, f: &mut Vec<u8>) {
        if !f.is_empty() {
            for &(i, b) in &self.bytes {
                let i = i % f.len();
                f[i] = b;
            }
        }
        if let Some(n) = self.resize {
            // Under 100: a cut to n bytes; above: n - 100 bytes of padding.
            if n < 100 {
                f.truncate(n);
            } else {
                f.resize(f.len() + n - 100, 0);
            }
        }
    }
}

/// The virtio-net header the TAP put in front of the frame.
fn any_vnet() -> BoxedStrategy<VirtioNetHdr> {
    prop_oneof![
        4 => Just(VirtioNetHdr::NONE),
        // A checksum-offloaded frame: TCP (offset 16) or UDP (6) after a 20-byte IP header.
        2 => prop_oneof![Just(16u16), Just(6), any::<u16>()].prop_map(|off| VirtioNetHdr {
            flags: VirtioNetHdr::F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: off,
            ..VirtioNetHdr::NONE
        }),
        // A TSO super-frame.
        3 => (prop_oneof![Just(1398u16), Just(1448), Just(8948), 1u16..2000, any::<u16>()],
              prop_oneof![Just(VirtioNetHdr::GSO_TCPV4), Just(VirtioNetHdr::GSO_TCPV4 | VirtioNetHdr::GSO_ECN), any::<u8>()])
            .prop_map(|(gso_size, gso_type)| VirtioNetHdr {
                flags: VirtioNetHdr::F_NEEDS_CSUM,
                gso_type,
                hdr_len: 66,
                gso_size,
                csum_start: 34,
                csum_offset: 16,
            }),
        1 => any::<[u8; 10]>().prop_map(|b| VirtioNetHdr::parse(&b).unwrap()),
    ]
    .boxed()
}

/// Room in the buffer past the frame: the worker's (64 KiB) or a tight one.
#[derive(Debug, Clone, Copy)]
enum Room {
    Worker,
    Tight(usize),
}

fn any_room() -> BoxedStrategy<Room> {
    prop_oneof![3 => Just(Room::Worker), 1 => (0usize..130).prop_map(Room::Tight)].boxed()
}

fn src_of(src: &Src, own: &PortEntry) -> ([u8; 6], Ipv4Addr) {
    match src {
        Src::Own => (own.mac.0, own.ip),
        Src::OwnMacOtherIp(ip) => (own.mac.0, *ip),
        Src::Other(m, ip) => (*m, *ip),
    }
}

fn arp_frame(op: u16, mac: [u8; 6], ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

/// An Ethernet + IPv4 frame built by etherparse (an encoder independent of the switch's).
fn ipv4_frame(
    (src_mac, src_ip): ([u8; 6], Ipv4Addr),
    (dst_mac, dst_ip): ([u8; 6], Ipv4Addr),
    l4: &L4,
    ttl: u8,
    df: bool,
    payload: &[u8],
) -> Vec<u8> {
    let ip = PacketBuilder::ethernet2(src_mac, dst_mac).ipv4(src_ip.octets(), dst_ip.octets(), ttl);
    let mut out = Vec::new();
    let written = match *l4 {
        L4::Tcp {
            sport,
            dport,
            flags,
            seq,
        } => {
            let mut b = ip.tcp(sport, dport, seq, 64_000);
            if flags & 0x01 != 0 {
                b = b.fin();
            }
            if flags & 0x02 != 0 {
                b = b.syn();
            }
            if flags & 0x04 != 0 {
                b = b.rst();
            }
            if flags & 0x08 != 0 {
                b = b.psh();
            }
            if flags & 0x10 != 0 {
                b = b.ack(seq ^ 0x5a5a);
            }
            b.write(&mut out, payload)
        }
        L4::Udp { sport, dport } => ip.udp(sport, dport).write(&mut out, payload),
        L4::Other(_) => ip.udp(1, 2).write(&mut out, payload),
        L4::Echo { id, seq } => ip.icmpv4_echo_request(id, seq).write(&mut out, payload),
        L4::IcmpError {
            quoted: (qs, qsp, qd, qdp),
            tcp,
        } => {
            let q = PacketBuilder::ipv4(qs.octets(), qd.octets(), 63);
            let mut inner = Vec::new();
            if tcp {
                q.tcp(qsp, qdp, 1, 1000).write(&mut inner, &[0; 8]).unwrap();
            } else {
                q.udp(qsp, qdp).write(&mut inner, &[0; 8]).unwrap();
            }
            inner.truncate(28);
            use etherparse::icmpv4::DestUnreachableHeader;
            ip.icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                DestUnreachableHeader::Port,
            ))
            .write(&mut out, &inner)
        }
    };
    written.unwrap();
    {
        let mut p = Ipv4Packet::new_unchecked(&mut out[14..]);
        p.set_dont_frag(df);
        if let L4::Other(proto) = *l4 {
            p.set_protocol(vswitch::wire::IpProtocol(proto));
        }
        p.fill_checksum();
    }
    out
}

/// The frame `body` describes, as sent from `own` (a pod's or the host's port).
fn build(body: &Body, own: &PortEntry) -> Vec<u8> {
    match body {
        Body::Arp { op, src, target } => {
            let (mac, ip) = src_of(src, own);
            arp_frame(*op, mac, ip, *target)
        }
        Body::Ipv4 {
            src,
            dst,
            l4,
            ttl,
            df,
            payload,
            fill,
        } => {
            let gw = mac_for(GW).0;
            let (dst, l4) = match dst {
                Dst::Routed(ip) => ((gw, *ip), l4.clone()),
                Dst::Switched(i) => ((mac_for(pod_ip(*i)).0, pod_ip(*i)), l4.clone()),
                Dst::Service(i) => {
                    let s = SVCS[*i];
                    let l4 = match (s.tcp, l4) {
                        (
                            true,
                            L4::Tcp {
                                sport, flags, seq, ..
                            },
                        ) => L4::Tcp {
                            sport: *sport,
                            dport: s.port,
                            flags: *flags,
                            seq: *seq,
                        },
                        (true, L4::Udp { sport, .. }) => L4::Tcp {
                            sport: *sport,
                            dport: s.port,
                            flags: 0x02,
                            seq: 1,
                        },
                        (false, L4::Udp { sport, .. } | L4::Tcp { sport, .. }) => L4::Udp {
                            sport: *sport,
                            dport: s.port,
                        },
                        (_, other) => other.clone(),
                    };
                    ((gw, s.vip), l4)
                }
                Dst::Raw(m, ip) => ((*m, *ip), l4.clone()),
            };
            let body = vec![*fill; *payload];
            ipv4_frame(src_of(src, own), dst, &l4, *ttl, *df, &body)
        }
        Body::Ethertype(t, rest) => {
            let mut f = mac_for(GW).0.to_vec();
            f.extend_from_slice(&own.mac.0);
            f.extend_from_slice(&t.to_be_bytes());
            f.extend_from_slice(rest);
            f
        }
        Body::Bytes(b) => b.clone(),
    }
}

// ---------------------------------------------------------------------------------------------
// One frame from a port, as the worker handles it

#[derive(Debug, Clone)]
struct PodFrame {
    /// Index into `ingress_ports()`.
    ingress: usize,
    body: Body,
    mutation: Mutation,
    vnet: VirtioNetHdr,
    room: Room,
    /// Milliseconds since the previous frame.
    dt: u64,
}

fn ingress_ports() -> [PortId; NPODS + 2] {
    [
        pod_port(0),
        pod_port(1),
        pod_port(2),
        pod_port(3),
        HOST,
        NO_PORT,
    ]
}

fn any_pod_frame() -> BoxedStrategy<PodFrame> {
    (
        prop_oneof![8 => 0..NPODS, 2 => Just(NPODS), 1 => Just(NPODS + 1)],
        any_body(),
        any_mutation(),
        any_vnet(),
        any_room(),
        prop_oneof![Just(0u64), 0u64..1000, 0u64..200_000],
    )
        .prop_map(|(ingress, body, mutation, vnet, room, dt)| PodFrame {
            ingress,
            body,
            mutation,
            vnet,
            room,
            dt,
        })
        .boxed()
}

/// The port entry frames claim to come from (a made-up one for the unknown port).
fn own_entry(t: &Tables, id: PortId) -> PortEntry {
    t.port(id)
        .or(t.host.as_ref().filter(|h| h.id == id))
        .cloned()
        .unwrap_or(PortEntry {
            id,
            mac: EthernetAddress([0x0a, 0x58, 9, 9, 9, 9]),
            ip: Ipv4Addr::new(10, 244, 1, 99),
        })
}

/// What handling one frame produced: the action and the bytes it left (frame or reply).
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    action: Action,
    bytes: Vec<u8>,
}

/// Handles `frame` from `ingress` exactly as the worker does, with `tail` filling the buffer
/// past the frame, and checks every property of the outcome.
#[allow(clippy::too_many_arguments)] // the worker's own inputs, one by one
fn run_pod_frame(
    t: &Tables,
    ct: &mut Conntrack,
    now_ms: u64,
    ingress: PortId,
    frame: &[u8],
    vnet: &VirtioNetHdr,
    room: Room,
    tail: u8,
) -> Result<Outcome, TestCaseError> {
    let len = frame.len();
    let cap = match room {
        Room::Worker => WORKER_BUF.max(len),
        Room::Tight(n) => len + n,
    };
    let mut buf = vec![tail; cap];
    buf[..len].copy_from_slice(frame);
    let meta = Meta {
        gso_size: if vnet.is_gso() { vnet.gso_size } else { 0 },
        csum_partial: vnet.needs_csum(),
    };
    let mut cx = Ctx {
        t,
        ct,
        now_ms,
        trace: None,
    };
    let action = handle(&mut cx, ingress, &mut buf, len, meta);
    prop_assert!(
        ct.len() <= CT_MAX,
        "conntrack holds {} > {CT_MAX}",
        ct.len()
    );
    let from_pod = t.port(ingress).is_some();
    let own = own_entry(t, ingress);
    let vips: BTreeSet<Ipv4Addr> = SVCS.iter().map(|s| s.vip).collect();
    let out_len = match action {
        Action::Reply(n) => n,
        _ => len,
    };
    match action {
        Action::DnsForward(_) => {
            prop_assert!(false, "DNS is off in these tables, yet Action::DnsForward")
        }
        Action::ToEgress => {
            prop_assert!(false, "egress is off in these tables, yet Action::ToEgress")
        }
        Action::Drop(r) => {
            prop_assert!(DropReason::ALL.contains(&r) && !r.name().is_empty());
        }
        Action::Reply(n) => {
            prop_assert!(
                (14..=buf.len()).contains(&n),
                "Reply({n}) outside the buffer of {} bytes",
                buf.len()
            );
            prop_assert!(t.port(ingress).is_some() || t.is_host(ingress));
            let eth = EthernetFrame::new_checked(&buf[..n]).map_err(fail)?;
            prop_assert_eq!(eth.dst_addr(), own.mac, "a reply goes back to its sender");
        }
        Action::ToPort(id) => {
            let out = t
                .port(id)
                .or(t.host.as_ref().filter(|h| h.id == id))
                .ok_or_else(|| fail(format!("ToPort({id}): no such port")))?;
            let eth = EthernetFrame::new_checked(&buf[..len]).map_err(fail)?;
            prop_assert_eq!(
                eth.dst_addr(),
                out.mac,
                "delivered to a port, not to its MAC"
            );
            prop_assert_eq!(eth.ethertype(), vswitch::wire::EtherType::IPV4);
            if from_pod {
                let src_mac = eth.src_addr();
                prop_assert!(
                    src_mac == own.mac || src_mac == t.gateway_mac,
                    "pod {ingress} got a frame out with source MAC {src_mac}"
                );
                let ip = Ipv4Packet::new_checked(eth.payload()).map_err(fail)?;
                let src = ip.src_addr();
                prop_assert!(
                    src == own.ip || src == GW || vips.contains(&src),
                    "pod {ingress} ({}) got a packet out from {src}",
                    own.ip
                );
            }
        }
        Action::ToPeer(id) => {
            let peer = t
                .peers
                .get(id)
                .ok_or_else(|| fail(format!("ToPeer({id}): no such peer")))?;
            let mut frame = buf[..len].to_vec();
            {
                let eth = EthernetFrame::new_checked(&frame[..]).map_err(fail)?;
                prop_assert_eq!(eth.dst_addr().0, peer.vtep_mac);
                prop_assert_eq!(eth.src_addr(), t.vtep_mac);
                let ip = Ipv4Packet::new_checked(eth.payload()).map_err(fail)?;
                prop_assert!(
                    peer.pod_cidrs.iter().any(|c| c.contains(&ip.dst_addr())),
                    "sent to {} for {}",
                    peer.name,
                    ip.dst_addr()
                );
                if from_pod {
                    prop_assert!(ip.src_addr() == own.ip || ip.src_addr() == GW);
                }
                if meta.gso_size == 0 {
                    prop_assert!(
                        ip.total_len() <= t.overlay_mtu,
                        "{} bytes leave for a peer over a {} MTU",
                        ip.total_len(),
                        t.overlay_mtu
                    );
                }
            }
            // What the worker does next: segment a super-frame, or finish its checksum.
            let (prefix, partial) = encap_for(t, peer, vnet, &frame);
            prop_assert!(!partial || peer.remote_csum);
            let csum = if partial { Csum::Partial } else { Csum::Full };
            if vnet.is_gso() {
                let mut seg = vec![0u8; SEG_BUF];
                if let Ok(s) = segment_tcp4(&frame, vnet, &prefix, csum, &mut seg) {
                    prop_assert!(s.total <= seg.len() && s.count >= 1);
                    for i in 0..s.count {
                        let r = s.range(i);
                        prop_assert!(r.start < r.end && r.end <= s.total);
                        // Each segment is VXLAN + an inner frame that fits the overlay.
                        let inner = &seg[r.start + 8..r.end];
                        let eth = EthernetFrame::new_checked(inner).map_err(fail)?;
                        let ip = Ipv4Packet::new_checked(eth.payload()).map_err(fail)?;
                        prop_assert!(ip.total_len() <= t.overlay_mtu);
                    }
                }
            } else if !partial {
                let _ = virtio::finish_checksum(vnet, &mut frame);
            }
        }
    }
    Ok(Outcome {
        action,
        bytes: buf[..out_len.max(len)].to_vec(),
    })
}

fn fail(e: impl std::fmt::Debug) -> TestCaseError {
    TestCaseError::fail(format!("{e:?}"))
}

/// Runs a sequence of frames twice, with different bytes past each frame, through two tables in
/// lockstep: the outcomes must agree (nothing past the frame is read) and pass every check.
fn run_pod_sequence(frames: &[PodFrame], random_lb: bool) -> Result<Vec<Action>, TestCaseError> {
    let t = tables(random_lb);
    let (mut a, mut b) = (Conntrack::new(ct_config()), Conntrack::new(ct_config()));
    let mut now = 1_000u64;
    let mut actions = Vec::new();
    for f in frames {
        now += f.dt;
        let ingress = ingress_ports()[f.ingress];
        let mut frame = build(&f.body, &own_entry(t, ingress));
        f.mutation.apply(&mut frame);
        let x = run_pod_frame(t, &mut a, now, ingress, &frame, &f.vnet, f.room, 0x00)?;
        let y = run_pod_frame(t, &mut b, now, ingress, &frame, &f.vnet, f.room, 0xa5)?;
        prop_assert_eq!(&x, &y, "the outcome depends on bytes past the frame");
        prop_assert_eq!(a.len(), b.len());
        actions.push(x.action);
    }
    let c = a.counters;
    prop_assert_eq!(
        c.created,
        a.len() as u64 + c.expired + c.evicted + c.flushed,
        "conntrack counters do not add up: {:?} with {} entries",
        c,
        a.len()
    );
    Ok(actions)
}

// ---------------------------------------------------------------------------------------------
// The underlay: VXLAN datagrams from peers (or not)

#[derive(Debug, Clone)]
enum Inner {
    /// IPv4 to our VTEP MAC from a peer's VTEP, as a well-behaved peer sends.
    Ipv4 {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        dst_is_service: Option<usize>,
        l4: L4,
        ttl: u8,
        payload: usize,
        fill: u8,
        dst_mac: Option<[u8; 6]>,
    },
    Arp(Ipv4Addr, Ipv4Addr),
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone)]
struct Datagram {
    /// 0, 1: the peers; 2: us; 3: a stranger.
    from: usize,
    /// 0: valid (flags 0x08, VNI 1); 1: wrong VNI; 2: flags without I; 3: random header;
    /// 4, 5: valid with remote checksum offload for TCP, for UDP (checksum start 34).
    header: (u8, [u8; 8]),
    inner: Inner,
    mutation: Mutation,
    /// Cut the datagram short (a truncated read) to this many bytes.
    cut: Option<usize>,
}

fn any_inner() -> BoxedStrategy<Inner> {
    let remote_src = prop_oneof![
        4 => (0usize..2).prop_map(|k| REMOTE_POD[k]),
        1 => (0usize..2, any::<u8>()).prop_map(|(k, h)| Ipv4Addr::new(10, 244, k as u8 + 2, h)),
        1 => any_ip(),
    ];
    prop_oneof![
        8 => (remote_src, any_ip(), prop_oneof![3 => Just(None), 1 => (0..SVCS.len()).prop_map(Some)],
              any_l4(), prop_oneof![Just(64u8), Just(1), any::<u8>()], payload_len(), any::<u8>(),
              prop_oneof![4 => Just(None), 1 => any_mac().prop_map(Some)])
            .prop_map(|(src, dst, dst_is_service, l4, ttl, payload, fill, dst_mac)| Inner::Ipv4 {
                src, dst, dst_is_service, l4, ttl, payload, fill, dst_mac,
            }),
        1 => (any_ip(), any_ip()).prop_map(|(a, b)| Inner::Arp(a, b)),
        1 => proptest::collection::vec(any::<u8>(), 0..120).prop_map(Inner::Bytes),
    ]
    .boxed()
}

fn any_datagram() -> BoxedStrategy<Datagram> {
    (
        prop_oneof![8 => 0usize..2, 1 => Just(2usize), 1 => Just(3usize)],
        (
            prop_oneof![8 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8), 1 => Just(3u8),
                        4 => Just(4u8), 2 => Just(5u8)],
            any::<[u8; 8]>(),
        ),
        any_inner(),
        any_mutation(),
        prop_oneof![6 => Just(None), 1 => (0usize..60).prop_map(Some)],
    )
        .prop_map(|(from, header, inner, mutation, cut)| Datagram {
            from,
            header,
            inner,
            mutation,
            cut,
        })
        .boxed()
}

fn underlay_addr(i: usize) -> IpAddr {
    IpAddr::V4(match i {
        0 | 1 => PEER_UNDERLAY[i],
        2 => OUR_UNDERLAY,
        _ => Ipv4Addr::new(192, 168, 100, 77),
    })
}

fn datagram_bytes(d: &Datagram) -> Vec<u8> {
    let mut out = match d.header.0 {
        0 => vec![0x08, 0, 0, 0, 0, 0, 1, 0],
        1 => vec![0x08, 0, 0, 0, 0, 0, 2, 0],
        2 => vec![0x00, 0, 0, 0, 0, 0, 1, 0],
        4 => vec![0x08, 0x20, 0, 0, 0, 0, 1, 17],
        5 => vec![0x08, 0x20, 0, 0, 0, 0, 1, 0x80 | 17],
        _ => d.header.1.to_vec(),
    };
    let peer_mac = match d.from {
        0 | 1 => vtep(PEER_UNDERLAY[d.from]),
        _ => [0x0e, 0x58, 1, 2, 3, 4],
    };
    let mut inner = match &d.inner {
        Inner::Ipv4 {
            src,
            dst,
            dst_is_service,
            l4,
            ttl,
            payload,
            fill,
            dst_mac,
        } => {
            let mut l4 = l4.clone();
            let mut dst = *dst;
            if let Some(i) = dst_is_service {
                let s = SVCS[*i];
                dst = s.vip;
                l4 = match l4 {
                    L4::Tcp {
                        sport, flags, seq, ..
                    } if s.tcp => L4::Tcp {
                        sport,
                        dport: s.port,
                        flags,
                        seq,
                    },
                    L4::Udp { sport, .. } if !s.tcp => L4::Udp {
                        sport,
                        dport: s.port,
                    },
                    other => other,
                };
            }
            let body = vec![*fill; *payload];
            let to = dst_mac.unwrap_or(vtep(OUR_UNDERLAY));
            ipv4_frame((peer_mac, *src), (to, dst), &l4, *ttl, false, &body)
        }
        Inner::Arp(a, b) => {
            let mut f = arp_frame(1, peer_mac, *a, *b);
            f[..6].copy_from_slice(&vtep(OUR_UNDERLAY));
            f
        }
        Inner::Bytes(b) => b.clone(),
    };
    d.mutation.apply(&mut inner);
    out.extend_from_slice(&inner);
    if let Some(n) = d.cut {
        out.truncate(n);
    }
    out
}

/// One receive batch from the underlay, handled as the worker does: every datagram decapped
/// and routed in place in one buffer, deliveries merged by GRO.
fn run_underlay_batch(
    batch: &[Datagram],
    random_lb: bool,
    now_ms: u64,
) -> Result<Vec<Action>, TestCaseError> {
    let t = tables(random_lb);
    let mut ct = Conntrack::new(ct_config());
    let mut rbuf = Vec::new();
    let mut ranges = Vec::new();
    for d in batch {
        let b = datagram_bytes(d);
        ranges.push((underlay_addr(d.from), rbuf.len()..rbuf.len() + b.len()));
        rbuf.extend_from_slice(&b);
    }
    let vips: BTreeSet<Ipv4Addr> = SVCS.iter().map(|s| s.vip).collect();
    let mut gro = Gro::default();
    let mut actions = Vec::new();
    let mut delivered = 0usize;
    let mut emitted = Vec::new();
    let mut emit = |buf: &[u8], out: vswitch::datapath::gro::Out<'_>| {
        let mut total = 0;
        let mut ok = out
            .parts
            .iter()
            .all(|r| r.start <= r.end && r.end <= buf.len());
        for r in out.parts {
            total += r.len();
        }
        ok &= total <= 14 + 65_535;
        emitted.push((out.port, out.parts.len(), ok));
    };
    for (from, r) in &ranges {
        let (peer, rco) = match decap(t, *from, &rbuf[r.clone()]) {
            Ok(p) => p,
            Err(reason) => {
                prop_assert!(matches!(
                    reason,
                    DropReason::UnknownPeer | DropReason::WrongVni | DropReason::VxlanMalformed
                ));
                prop_assert!(
                    reason != DropReason::UnknownPeer
                        || !PEER_UNDERLAY.iter().any(|p| IpAddr::V4(*p) == *from),
                    "a known peer's datagram refused as from an unknown peer"
                );
                actions.push(Action::Drop(reason));
                continue;
            }
        };
        prop_assert!(
            PEER_UNDERLAY.iter().any(|p| IpAddr::V4(*p) == *from),
            "VXLAN accepted from {from}, which is not a peer"
        );
        let inner = r.start + 8..r.end;
        let mut cx = Ctx {
            t,
            ct: &mut ct,
            now_ms,
            trace: None,
        };
        let action = handle_underlay(&mut cx, peer, &mut rbuf[inner.clone()], rco);
        prop_assert!(ct.len() <= CT_MAX);
        match action {
            Action::ToPort(id) => {
                let out = t
                    .port(id)
                    .or(t.host.as_ref().filter(|h| h.id == id))
                    .ok_or_else(|| fail(format!("ToPort({id}) from the underlay: no such port")))?;
                let eth = EthernetFrame::new_checked(&rbuf[inner.clone()]).map_err(fail)?;
                prop_assert_eq!(eth.dst_addr(), out.mac);
                prop_assert_eq!(eth.src_addr(), t.gateway_mac);
                let ip = Ipv4Packet::new_checked(eth.payload()).map_err(fail)?;
                let cidrs = &t.peers.get(peer).unwrap().pod_cidrs;
                prop_assert!(
                    cidrs.iter().any(|c| c.contains(&ip.src_addr()))
                        || vips.contains(&ip.src_addr()),
                    "delivered from {} though the peer owns {:?}",
                    ip.src_addr(),
                    cidrs
                );
                prop_assert!(ip.dst_addr() == out.ip);
                delivered += 1;
                gro.push(&mut rbuf, id, true, inner, rco, &mut emit);
            }
            Action::Drop(r) => prop_assert!(DropReason::ALL.contains(&r)),
            other => prop_assert!(
                false,
                "from the underlay only ToPort or Drop, got {other:?}"
            ),
        }
        actions.push(action);
    }
    gro.flush(&mut rbuf, &mut emit);
    let frames: usize = emitted.iter().map(|e| e.1).sum();
    prop_assert_eq!(frames, delivered, "GRO lost or duplicated frames");
    prop_assert!(
        emitted.iter().all(|e| e.2),
        "GRO emitted parts outside the buffer: {emitted:?}"
    );
    Ok(actions)
}

// ---------------------------------------------------------------------------------------------
// Properties

proptest! {
    #![proptest_config(config(cases(2000)))]

    /// Arbitrary bytes from any port, with any virtio-net header.
    #[test]
    fn arbitrary_bytes_from_a_port(
        frames in proptest::collection::vec(
            (0..NPODS + 2, proptest::collection::vec(any::<u8>(), 0..1600), any_vnet(), any_room())
                .prop_map(|(ingress, b, vnet, room)| PodFrame {
                    ingress,
                    body: Body::Bytes(b),
                    mutation: Mutation { bytes: vec![], resize: None },
                    vnet,
                    room,
                    dt: 1,
                }),
            1..6),
        random_lb in any::<bool>(),
    ) {
        run_pod_sequence(&frames, random_lb)?;
    }

    /// Valid and mutated ARP, TCP, UDP, ICMP frames from pods and the host, to every kind of
    /// destination, as super-frames or with offloaded checksums, several per table.
    #[test]
    fn mutated_frames_from_pods(
        frames in proptest::collection::vec(any_pod_frame(), 1..12),
        random_lb in any::<bool>(),
    ) {
        run_pod_sequence(&frames, random_lb)?;
    }

    /// Arbitrary and mutated VXLAN datagrams, from peers and strangers, in one receive batch.
    #[test]
    fn datagrams_from_the_underlay(
        batch in proptest::collection::vec(any_datagram(), 1..10),
        random_lb in any::<bool>(),
        now in any::<u32>(),
    ) {
        run_underlay_batch(&batch, random_lb, u64::from(now))?;
    }
}

/// Connections a node sees: clients opening flows to Services, backends answering.
fn flows(seed: u64, n: usize, step_ms: u64, random_lb: bool) -> Result<(), TestCaseError> {
    let t = tables(random_lb);
    let mut ct = Conntrack::new(ct_config());
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut now = 5_000u64;
    let mut replies_checked = 0u32;
    let gw = mac_for(GW).0;
    for _ in 0..n {
        now += next() % (step_ms + 1);
        if next() % 64 == 0 {
            ct.sweep(now, 64);
        }
        let client = (next() % NPODS as u64) as usize;
        // Services with endpoints (web, its external IP, dns, sticky).
        let svc = SVCS[[0usize, 1, 2, 5][(next() % 4) as usize]];
        let sport = 1024 + (next() % 60_000) as u16;
        let l4 = if svc.tcp {
            let flags = [0x02u8, 0x02, 0x02, 0x10, 0x11, 0x04][(next() % 6) as usize];
            L4::Tcp {
                sport,
                dport: svc.port,
                flags,
                seq: next() as u32,
            }
        } else {
            L4::Udp {
                sport,
                dport: svc.port,
            }
        };
        let me = mac_for(pod_ip(client)).0;
        let frame = ipv4_frame((me, pod_ip(client)), (gw, svc.vip), &l4, 64, true, b"hello");
        let mut buf = frame.clone();
        buf.resize(frame.len() + 128, 0);
        let mut cx = Ctx {
            t,
            ct: &mut ct,
            now_ms: now,
            trace: None,
        };
        let a = handle(
            &mut cx,
            pod_port(client),
            &mut buf,
            frame.len(),
            Meta::default(),
        );
        prop_assert!(
            ct.len() <= CT_MAX,
            "conntrack holds {} entries, max {CT_MAX}",
            ct.len()
        );
        match a {
            Action::ToPort(backend_port) if next() % 2 == 0 => {
                // The backend answers; the client must see the Service's address.
                let eth = EthernetFrame::new_checked(&buf[..frame.len()]).map_err(fail)?;
                let ip = Ipv4Packet::new_checked(eth.payload()).map_err(fail)?;
                let (backend, dst) = (ip.src_addr(), ip.dst_addr());
                let p = ip.payload();
                let bport = u16::from_be_bytes([p[2], p[3]]);
                // The client's port as the backend saw it (remapped on a reply-tuple clash).
                let seen = u16::from_be_bytes([p[0], p[1]]);
                let backend_ip = t.port(backend_port).map(|p| p.ip).unwrap_or(dst);
                // Hairpin: the backend sees the gateway; it answers the gateway.
                let (to_ip, to_mac) = if backend == GW {
                    (GW, gw)
                } else if next() % 2 == 0 {
                    (pod_ip(client), me)
                } else {
                    (pod_ip(client), gw)
                };
                let rl4 = match l4 {
                    L4::Tcp { .. } => L4::Tcp {
                        sport: bport,
                        dport: seen,
                        flags: 0x12,
                        seq: 7,
                    },
                    _ => L4::Udp {
                        sport: bport,
                        dport: seen,
                    },
                };
                let reply = ipv4_frame(
                    (mac_for(backend_ip).0, backend_ip),
                    (to_mac, to_ip),
                    &rl4,
                    64,
                    true,
                    b"world",
                );
                let mut rbuf = reply.clone();
                rbuf.resize(reply.len() + 128, 0);
                let mut cx = Ctx {
                    t,
                    ct: &mut ct,
                    now_ms: now,
                    trace: None,
                };
                let ra = handle(
                    &mut cx,
                    backend_port,
                    &mut rbuf,
                    reply.len(),
                    Meta::default(),
                );
                prop_assert!(ct.len() <= CT_MAX);
                if matches!(l4, L4::Tcp { flags, .. } if flags & 0x04 != 0) {
                    continue; // A RST may have closed it; nothing to check.
                }
                prop_assert_eq!(
                    ra,
                    Action::ToPort(pod_port(client)),
                    "the reply did not reach the client"
                );
                let eth = EthernetFrame::new_checked(&rbuf[..reply.len()]).map_err(fail)?;
                let ip = Ipv4Packet::new_checked(eth.payload()).map_err(fail)?;
                prop_assert_eq!(
                    ip.src_addr(),
                    svc.vip,
                    "the reply is not from the Service address"
                );
                prop_assert_eq!(ip.dst_addr(), pod_ip(client));
                replies_checked += 1;
            }
            Action::ToPort(_) | Action::ToPeer(_) => {}
            // Only when no free port is left for a reply-tuple clash.
            Action::Drop(DropReason::ConntrackRefused) => {}
            other => prop_assert!(false, "a flow to a Service with endpoints got {other:?}"),
        }
    }
    let c = ct.counters;
    prop_assert_eq!(
        c.created,
        ct.len() as u64 + c.expired + c.evicted + c.flushed,
        "{:?}",
        c
    );
    if c.created > CT_MAX as u64 && step_ms == 0 {
        prop_assert!(
            c.evicted > 0,
            "more flows than room and nothing evicted: {:?}",
            c
        );
    }
    prop_assert!(n < 100 || replies_checked > 0);
    Ok(())
}

proptest! {
    #![proptest_config(config(cases(2000) / 10))]

    /// Many more flows than the table holds: it never grows past its maximum, it evicts (and
    /// counts it), and replies of the flows it holds are still translated back.
    #[test]
    fn conntrack_never_exceeds_its_maximum(
        seed in any::<u64>(),
        n in 1_100usize..4_000,
        step_ms in prop_oneof![Just(0u64), 0u64..100, 0u64..40_000],
        random_lb in any::<bool>(),
    ) {
        flows(seed, n, step_ms, random_lb)?;
    }
}

/// The generators reach the deep paths, not only the first checks: over a fixed sample of
/// cases, every kind of action and the drops the issue is about all occur.
#[test]
fn the_generators_reach_every_outcome() {
    let mut runner = TestRunner::deterministic();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let frames = proptest::collection::vec(any_pod_frame(), 1..12);
    for _ in 0..3000 {
        let f = frames.new_tree(&mut runner).unwrap().current();
        for a in run_pod_sequence(&f, false).unwrap() {
            seen.insert(name(a));
        }
    }
    let batches = proptest::collection::vec(any_datagram(), 1..10);
    for _ in 0..3000 {
        let b = batches.new_tree(&mut runner).unwrap().current();
        for a in run_underlay_batch(&b, false, 1_000).unwrap() {
            seen.insert(format!("underlay {}", name(a)));
        }
    }
    let want = [
        "ToPort",
        "ToPeer",
        "Reply",
        "drop spoofed_mac",
        "drop spoofed_ip",
        "drop spoofed_arp",
        "drop malformed",
        "drop too_big",
        "drop ttl_expired",
        "drop no_route",
        "drop arp_unknown_target",
        "drop unknown_port",
        "drop unknown_mac",
        "underlay ToPort",
        "underlay drop vxlan_unknown_peer",
        "underlay drop vxlan_wrong_vni",
        "underlay drop vxlan_spoofed_src",
        "underlay drop vxlan_wrong_dst_mac",
        "underlay drop vxlan_not_ipv4",
        "underlay drop vxlan_malformed",
        "underlay drop vxlan_bad_rco",
    ];
    let missing: Vec<&str> = want
        .iter()
        .copied()
        .filter(|w| !seen.contains(*w))
        .collect();
    assert!(
        missing.is_empty(),
        "never reached: {missing:?}; reached: {seen:?}"
    );
}

fn name(a: Action) -> String {
    match a {
        Action::ToPort(_) => "ToPort".into(),
        Action::ToPeer(_) => "ToPeer".into(),
        Action::Reply(_) => "Reply".into(),
        Action::DnsForward(_) => "DnsForward".into(),
        Action::ToEgress => "ToEgress".into(),
        Action::Drop(r) => format!("drop {}", r.name()),
    }
}

/// Two Service addresses with one backend (a ClusterIP and its external IP, or two Services
/// selecting the same pods), and a client that uses one source port for both, as Linux does for
/// connections to different destinations: both connections have the same reply tuple (backend
/// port -> client port), the second is refused (`conntrack_refused`) and the client's SYNs are
/// dropped until the first entry expires. Kernel NAT would give the second another source port.
#[test]
fn one_client_port_to_two_addresses_of_one_backend() {
    let mut spec = services().remove(0);
    spec.endpoints.truncate(1); // pod 1 only
    let t = tables(false).with_services(ServiceTable::build(&[spec], "n1", LoadBalancing::Maglev));
    let mut ct = Conntrack::new(ct_config());
    let me = mac_for(pod_ip(0)).0;
    for vip in [SVCS[0].vip, SVCS[1].vip] {
        let l4 = L4::Tcp {
            sport: 40_000,
            dport: 80,
            flags: 0x02,
            seq: 1,
        };
        let f = ipv4_frame((me, pod_ip(0)), (mac_for(GW).0, vip), &l4, 64, true, b"");
        let mut buf = f.clone();
        buf.resize(f.len() + 128, 0);
        let mut cx = Ctx {
            t: &t,
            ct: &mut ct,
            now_ms: 1,
            trace: None,
        };
        let a = handle(&mut cx, pod_port(0), &mut buf, f.len(), Meta::default());
        assert_eq!(
            a,
            Action::ToPort(pod_port(1)),
            "SYN to {vip}:80 from port 40000"
        );
    }
}
