use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use super::stream::{Next, Stream};
use super::*;

fn frame(src: [u8; 4], dst: [u8; 4], proto: u8, sport: u16, dport: u16, payload: usize) -> Vec<u8> {
    let builder = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 64);
    let body = vec![0x61u8; payload];
    let mut out = Vec::new();
    match proto {
        6 => builder
            .tcp(sport, dport, 1, 1000)
            .write(&mut out, &body)
            .unwrap(),
        17 => builder.udp(sport, dport).write(&mut out, &body).unwrap(),
        _ => builder
            .icmpv4_echo_request(1, 1)
            .write(&mut out, &body)
            .unwrap(),
    }
    out
}

fn open(
    hub: &Hub,
    points: &str,
    dir: &str,
    port: Option<u32>,
    filter: Option<&str>,
) -> (Arc<Session>, crossbeam_channel::Receiver<Captured>) {
    hub.open(Request {
        sel: Selection::parse(points, dir, port).unwrap(),
        filter: filter.map(|f| Filter::parse(f).unwrap()),
        snaplen: MAX_SNAPLEN,
        count: None,
        describe: String::new(),
    })
    .unwrap()
}

#[test]
fn selections() {
    let all = Selection::parse("", "", None).unwrap();
    assert_eq!(all.mask, ALL_POINTS);
    assert_eq!(
        Selection::parse("policy", "in", None).unwrap().mask,
        Point::bit(Stage::Policy, true)
    );
    assert_eq!(
        Selection::parse("policy:egress", "", None).unwrap().mask,
        Point::bit(Stage::Policy, false)
    );
    let p = Selection::parse("", "in", Some(3)).unwrap();
    assert_eq!(p.mask, Point::bit(Stage::Port, true));
    assert_eq!(p.port(), Some(3));
    let e = Selection::parse("egress", "", None).unwrap();
    assert_eq!(
        e.mask,
        Point::bit(Stage::EgressPod, true)
            | Point::bit(Stage::EgressPod, false)
            | Point::bit(Stage::EgressNode, true)
            | Point::bit(Stage::EgressNode, false)
    );
    assert_eq!(
        Selection::parse("egress:pod", "in", None).unwrap().mask,
        Point::bit(Stage::EgressPod, true)
    );
    assert_eq!(
        Selection::parse("egress:node", "out", None).unwrap().mask,
        Point::bit(Stage::EgressNode, false)
    );
    assert!(
        all.mask & Point::bit(Stage::EgressNode, true) != 0,
        "all has egress"
    );
    assert!(matches!(
        Selection::parse("egress", "", Some(1)),
        Err(CaptureError::PortWithStage(_))
    ));
    let unknown = Selection::parse("egress:outside", "", None).unwrap_err();
    assert!(unknown.to_string().contains("egress:node"), "{unknown}");
    let n = Selection::parse("nat:before,overlay:outer", "both", None).unwrap();
    assert_eq!(
        n.mask,
        Point::bit(Stage::Nat, true)
            | Point::bit(Stage::OverlayOuter, true)
            | Point::bit(Stage::OverlayOuter, false)
    );
    assert_eq!(
        Selection::parse("nat:before", "out", None),
        Err(CaptureError::Empty)
    );
    assert!(matches!(
        Selection::parse("bogus", "", None),
        Err(CaptureError::UnknownPoint(_))
    ));
    assert!(matches!(
        Selection::parse("pod", "sideways", None),
        Err(CaptureError::UnknownDirection(_))
    ));
    assert!(matches!(
        Selection::parse("nat", "", Some(1)),
        Err(CaptureError::PortWithStage(_))
    ));
    // `host` is port 0 alone, `pod` every port but 0.
    assert_eq!(
        Selection::parse("host", "", Some(3)),
        Err(CaptureError::PortNotAtPoint(3, "host"))
    );
    assert_eq!(
        Selection::parse("pod", "", Some(HOST_PORT)),
        Err(CaptureError::PortNotAtPoint(HOST_PORT, "pod"))
    );
    assert_eq!(
        Selection::parse("host", "", Some(HOST_PORT))
            .unwrap()
            .port(),
        Some(HOST_PORT)
    );
    assert_eq!(
        Selection::parse("pod,host", "", Some(3)).unwrap().port(),
        Some(3)
    );
}

#[test]
fn off_until_a_session_opens_and_after_it_closes() {
    let hub = Hub::new();
    assert!(hub.current().is_none());
    let (s, _rx) = open(&hub, "pod", "", None, None);
    assert!(hub.current().is_some());
    hub.close(s.id);
    assert!(hub.current().is_none());
    assert_eq!(hub.summaries().len(), 1);
    assert!(!hub.summaries()[0].running);
}

#[test]
fn points_ports_directions_and_filters_select_what_is_copied() {
    let hub = Hub::new();
    let (_a, rx_a) = open(&hub, "", "in", Some(2), None);
    let (_b, rx_b) = open(&hub, "pod", "", None, Some("udp port 53"));
    let set = hub.current().unwrap();
    let udp = frame([10, 0, 0, 1], [10, 0, 0, 2], 17, 999, 53, 10);
    let tcp = frame([10, 0, 0, 1], [10, 0, 0, 2], 6, 999, 80, 10);
    set.port(2, true, &udp);
    set.port(2, false, &tcp);
    set.port(3, true, &tcp);
    set.port(3, false, &udp);
    set.overlay_inner(false, &udp);
    let a: Vec<Captured> = rx_a.try_iter().collect();
    assert_eq!(a.len(), 1);
    assert_eq!((a[0].point.port, a[0].point.inbound), (2, true));
    assert_eq!(a[0].data, udp);
    let b: Vec<(u32, bool)> = rx_b
        .try_iter()
        .map(|c| (c.point.port, c.point.inbound))
        .collect();
    assert_eq!(b, [(2, true), (3, false)]);
}

/// A packet NetworkPolicy denied is offered at `policy:ingress` / `policy:egress`; other drops
/// and forwarded frames are not, and a session on other points sees none of them.
#[test]
fn policy_point_takes_the_packets_policy_denied() {
    use crate::pipeline::{Action, DropReason};
    let hub = Hub::new();
    let (_p, rx_p) = open(&hub, "policy", "", None, Some("tcp"));
    let (_e, rx_e) = open(&hub, "policy:egress", "", None, None);
    let (_n, rx_n) = open(&hub, "nat,overlay", "", None, None);
    let set = hub.current().unwrap();
    let tcp = frame([10, 0, 0, 1], [10, 0, 0, 2], 6, 999, 80, 10);
    let udp = frame([10, 0, 0, 1], [10, 0, 0, 2], 17, 999, 53, 10);
    let mut buf = tcp.clone();
    buf.resize(tcp.len() + 64, 0);
    for a in [
        Action::Drop(DropReason::PolicyDeniedIngress),
        Action::Drop(DropReason::PolicyDeniedEgress),
        Action::Drop(DropReason::NoRoute),
        Action::ToPort(2),
    ] {
        set.after(1, a, None, &buf, tcp.len());
    }
    set.policy_denied(DropReason::PolicyDeniedIngress, &udp);
    let p: Vec<(Stage, bool, Vec<u8>)> = rx_p
        .try_iter()
        .map(|c| (c.point.stage, c.point.inbound, c.data))
        .collect();
    assert_eq!(
        p,
        [
            (Stage::Policy, true, tcp.clone()),
            (Stage::Policy, false, tcp.clone())
        ]
    );
    let e: Vec<bool> = rx_e.try_iter().map(|c| c.point.inbound).collect();
    assert_eq!(e, [false]);
    assert_eq!(rx_n.try_iter().count(), 0);
    let names = |inbound| {
        let point = Point {
            stage: Stage::Policy,
            inbound,
            port: 0,
        };
        super::stream::interface_name(&point, &|_| String::new()).0
    };
    assert_eq!(
        (names(true), names(false)),
        ("policy:ingress".into(), "policy:egress".into())
    );
}

/// `host` is the host port's points alone, `pod` the pods' alone, both (or `port`, `all`, no
/// point) every port's; a stage next to `host` does not bring the pods' ports in.
#[test]
fn pod_and_host_points_tell_the_host_port_from_the_pods() {
    let hub = Hub::new();
    let f = frame([10, 0, 0, 1], [10, 0, 0, 2], 1, 0, 0, 10);
    type Seen = &'static [(u32, bool)];
    // The points offered below, in order: every one of them is "all".
    const ALL: Seen = &[
        (HOST_PORT, true),
        (HOST_PORT, false),
        (1, true),
        (1, false),
        (2, true),
    ];
    const HOST: Seen = &[(HOST_PORT, true), (HOST_PORT, false)];
    let cases: [(&str, &str, Seen); 7] = [
        ("host", "", HOST),
        ("host", "out", &[(HOST_PORT, false)]),
        ("nat:after,host", "", HOST),
        ("pod", "", &[(1, true), (1, false), (2, true)]),
        ("pod,host", "", ALL),
        ("port", "", ALL),
        ("", "", ALL),
    ];
    for (points, dir, want) in cases {
        let (s, rx) = open(&hub, points, dir, None, None);
        let set = hub.current().unwrap();
        for &(port, inbound) in ALL {
            set.port(port, inbound, &f);
        }
        let got: Vec<(u32, bool)> = rx
            .try_iter()
            .filter(|c| c.point.stage == Stage::Port)
            .map(|c| (c.point.port, c.point.inbound))
            .collect();
        assert_eq!(got, want, "--point {points:?} --direction {dir:?}");
        hub.close(s.id);
    }
}

#[test]
fn a_full_queue_drops_and_counts_instead_of_waiting() {
    let hub = Hub::new();
    let (s, rx) = open(&hub, "pod", "", None, None);
    let set = hub.current().unwrap();
    let f = frame([10, 0, 0, 1], [10, 0, 0, 2], 17, 1, 2, 100);
    for _ in 0..QUEUE_LEN + 10 {
        set.port(1, true, &f);
    }
    assert_eq!(s.stats.queued.load(Relaxed), QUEUE_LEN as u64);
    assert_eq!(s.stats.dropped.load(Relaxed), 10);
    assert_eq!(rx.len(), QUEUE_LEN);
    assert_eq!(hub.totals(), (QUEUE_LEN as u64, 10));
}

#[test]
fn snaplen_cuts_copies_but_keeps_the_length() {
    let hub = Hub::new();
    let (_s, rx) = hub
        .open(Request {
            sel: Selection::parse("pod", "", None).unwrap(),
            filter: None,
            snaplen: 100,
            count: None,
            describe: String::new(),
        })
        .unwrap();
    let f = frame([10, 0, 0, 1], [10, 0, 0, 2], 17, 1, 2, 1000);
    hub.current().unwrap().port(1, true, &f);
    let c = rx.try_recv().unwrap();
    assert_eq!(c.data.len(), 100);
    assert_eq!(c.orig_len as usize, f.len());
}

#[test]
fn a_counted_session_matches_and_copies_no_more_than_its_count() {
    let hub = Hub::new();
    let (s, rx) = hub
        .open(Request {
            sel: Selection::parse("pod", "", None).unwrap(),
            filter: None,
            snaplen: MAX_SNAPLEN,
            count: Some(2),
            describe: String::new(),
        })
        .unwrap();
    let f = frame([10, 0, 0, 1], [10, 0, 0, 2], 17, 1, 2, 100);
    for _ in 0..5 {
        hub.current().unwrap().port(1, true, &f);
    }
    assert_eq!(rx.try_iter().count(), 2);
    assert_eq!(s.stats.matched.load(Relaxed), 2);
    assert_eq!(s.stats.queued.load(Relaxed), 2);
}

#[test]
fn nat_points_show_translated_packets_only() {
    let hub = Hub::new();
    let (_s, rx) = open(&hub, "nat", "", None, None);
    let set = hub.current().unwrap();
    let before = frame([10, 244, 1, 2], [10, 96, 0, 10], 6, 40000, 80, 20);
    // Routing alone: MACs and TTL change, nothing else.
    let mut routed = before.clone();
    routed[0] = 0x0e;
    routed[14 + 8] -= 1;
    let snap = set.nat_snap(&before).unwrap();
    set.nat(&snap, &routed);
    assert!(rx.try_recv().is_err(), "routing is not translation");
    // DNAT to a backend on port 8080.
    let mut after = routed.clone();
    after[14 + 16..14 + 20].copy_from_slice(&[10, 244, 2, 5]);
    after[14 + 20 + 2..14 + 20 + 4].copy_from_slice(&8080u16.to_be_bytes());
    set.nat(&snap, &after);
    let got: Vec<Captured> = rx.try_iter().collect();
    assert_eq!(got.len(), 2);
    assert!(got[0].point.inbound && got[0].point.stage == Stage::Nat);
    assert_eq!(got[0].data, before);
    assert!(!got[1].point.inbound);
    assert_eq!(got[1].data, after);
}

#[test]
fn nat_filter_applies_to_each_side() {
    let hub = Hub::new();
    let (_s, rx) = open(&hub, "nat", "", None, Some("host 10.96.0.10"));
    let set = hub.current().unwrap();
    let before = frame([10, 244, 1, 2], [10, 96, 0, 10], 17, 40000, 53, 20);
    let mut after = before.clone();
    after[14 + 16..14 + 20].copy_from_slice(&[10, 244, 2, 5]);
    let snap = set.nat_snap(&before).unwrap();
    set.nat(&snap, &after);
    let got: Vec<bool> = rx.try_iter().map(|c| c.point.inbound).collect();
    assert_eq!(got, [true], "only the side with the ClusterIP matches");
}

#[test]
fn outer_datagrams_get_synthesised_headers_that_parse() {
    let hub = Hub::new();
    let (_s, rx) = open(&hub, "overlay:outer", "", None, Some("host 10.244.2.3"));
    let set = hub.current().unwrap();
    let inner = frame([10, 244, 1, 2], [10, 244, 2, 3], 1, 0, 0, 56);
    let mut dgram = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    dgram.extend_from_slice(&inner);
    let src: SocketAddr = "192.168.100.1:41000".parse().unwrap();
    let dst: SocketAddr = "192.168.100.2:8472".parse().unwrap();
    set.overlay_outer(false, src, dst, &dgram);
    // An unrelated inner frame is filtered out; the outer headers alone do not match.
    let other = frame([10, 244, 1, 9], [10, 244, 2, 9], 1, 0, 0, 56);
    let mut d2 = dgram[..8].to_vec();
    d2.extend_from_slice(&other);
    set.overlay_outer(false, src, dst, &d2);
    let c = rx.try_recv().unwrap();
    assert!(rx.try_recv().is_err());
    let p = etherparse::SlicedPacket::from_ethernet(&c.data).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
        panic!("not IPv4: {p:?}")
    };
    assert_eq!(ip.header().source(), [192, 168, 100, 1]);
    assert_eq!(ip.header().destination(), [192, 168, 100, 2]);
    assert_eq!(ip.header().total_len() as usize, 20 + 8 + dgram.len());
    let h = ip.header().to_header();
    assert_eq!(h.header_checksum, h.calc_header_checksum());
    let Some(etherparse::TransportSlice::Udp(udp)) = &p.transport else {
        panic!("not UDP")
    };
    assert_eq!((udp.source_port(), udp.destination_port()), (41000, 8472));
    assert_eq!(udp.payload(), &dgram[..]);
    assert_eq!(c.orig_len as usize, 14 + 20 + 8 + dgram.len());
}

#[test]
fn outer_filter_matches_outer_headers_too() {
    let hub = Hub::new();
    let (_s, rx) = open(
        &hub,
        "overlay:outer",
        "in",
        None,
        Some("vxlan 1 and src host 192.168.100.2"),
    );
    let set = hub.current().unwrap();
    let inner = frame([10, 244, 2, 3], [10, 244, 1, 2], 1, 0, 0, 8);
    let mut dgram = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    dgram.extend_from_slice(&inner);
    let src: SocketAddr = "192.168.100.2:41000".parse().unwrap();
    let dst: SocketAddr = "192.168.100.1:8472".parse().unwrap();
    set.overlay_outer(true, src, dst, &dgram);
    set.overlay_outer(false, dst, src, &dgram);
    assert_eq!(rx.try_iter().count(), 1);
}

#[test]
fn gro_parts_are_captured_as_one_frame() {
    let hub = Hub::new();
    let (_s, rx) = open(&hub, "pod", "out", None, Some("tcp port 80"));
    let set = hub.current().unwrap();
    let f = frame([10, 0, 0, 1], [10, 0, 0, 2], 6, 80, 999, 3000);
    let (a, b) = f.split_at(1000);
    let (b, c) = b.split_at(1000);
    set.port_out_parts(4, [a, b, c].into_iter());
    let got = rx.try_recv().unwrap();
    assert_eq!(got.data, f);
    assert_eq!(got.point.port, 4);
}

#[test]
fn a_stream_is_pcapng_with_one_interface_per_point_and_directions() {
    use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketOption;
    use pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionOption;
    use pcap_file::pcapng::{Block, PcapNgReader};

    let hub = Arc::new(Hub::new());
    let (s, rx) = open(&hub, "", "", None, None);
    let id = s.id;
    let namer: stream::PortNamer = Box::new(|p| {
        if p == 0 {
            "host:vsw0".into()
        } else {
            format!("pod:default/p{p}")
        }
    });
    let (mut st, mut bytes) = Stream::new(hub.clone(), s, rx, namer, Some(4));
    let set = hub.current().unwrap();
    let f = frame([10, 0, 0, 1], [10, 0, 0, 2], 17, 1, 2, 10);
    set.port(1, true, &f);
    set.port(0, false, &f);
    set.port(1, true, &f);
    set.overlay_inner(false, &f);
    set.port(1, false, &f);
    loop {
        match st.next(Duration::from_millis(100)) {
            Next::Data(b) => bytes.extend_from_slice(&b),
            Next::Idle => panic!("packets were queued"),
            Next::End(b) => {
                bytes.extend_from_slice(&b);
                break;
            }
        }
    }
    assert!(hub.current().is_none(), "the count ends the session");
    assert!(hub
        .summaries()
        .iter()
        .any(|s| s.id == id && !s.running && s.written == 4));
    let mut r = PcapNgReader::new(&bytes[..]).unwrap();
    let mut names = Vec::new();
    let mut packets = Vec::new();
    let mut isbs = 0;
    while let Some(b) = r.next_block() {
        match b.unwrap() {
            Block::InterfaceDescription(i) => {
                names.extend(i.options.iter().filter_map(|o| match o {
                    InterfaceDescriptionOption::IfName(n) => Some(n.to_string()),
                    _ => None,
                }))
            }
            Block::EnhancedPacket(e) => packets.push((
                e.interface_id,
                e.options.iter().find_map(|o| match o {
                    EnhancedPacketOption::Flags(f) => Some(*f),
                    _ => None,
                }),
            )),
            Block::InterfaceStatistics(_) => isbs += 1,
            _ => {}
        }
    }
    assert_eq!(
        names,
        ["pod:default/p1:in", "host:vsw0:out", "overlay:inner:out"]
    );
    assert_eq!(
        packets,
        [(0, Some(1)), (1, Some(2)), (0, Some(1)), (2, Some(2))]
    );
    assert_eq!(isbs, 3);
}

/// An `egress:node` packet: its IPv4 header and checksum, and the transport etherparse finds.
fn node_packet(c: &Captured) -> (etherparse::Ipv4Header, etherparse::TransportSlice<'_>) {
    let p = etherparse::SlicedPacket::from_ethernet(&c.data).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
        panic!("not IPv4: {p:?}")
    };
    let h = ip.header().to_header();
    assert_eq!(h.header_checksum, h.calc_header_checksum());
    assert_eq!(h.total_len as usize + 14, c.data.len());
    assert_eq!(c.orig_len as usize, c.data.len());
    (h, p.transport.unwrap())
}

#[test]
fn egress_node_packets_are_synthesised_with_valid_checksums() {
    let hub = Hub::new();
    let (_s, rx) = open(&hub, "egress:node", "", None, Some("host 192.168.100.253"));
    let (_p, rx_pod) = open(&hub, "egress:pod", "", None, None);
    let set = hub.current().unwrap();
    assert!(set.wants_egress_node() && set.wants_egress_pod(true));
    let node: SocketAddrV4 = "192.168.100.1:40001".parse().unwrap();
    let out: SocketAddrV4 = "192.168.100.253:9000".parse().unwrap();

    // UDP, sent: from the node's socket to the outside.
    set.egress_node(false, node, out, NodeL4::Udp(b"hello"));
    let c = rx.try_recv().unwrap();
    assert_eq!(c.point.stage, Stage::EgressNode);
    assert_eq!(c.point.direction(), Direction::Outbound);
    let (ip, t) = node_packet(&c);
    assert_eq!(
        (ip.source, ip.destination),
        ([192, 168, 100, 1], [192, 168, 100, 253])
    );
    let etherparse::TransportSlice::Udp(udp) = t else {
        panic!("not UDP")
    };
    assert_eq!((udp.source_port(), udp.destination_port()), (40001, 9000));
    assert_eq!(udp.payload(), b"hello");
    assert_eq!(
        udp.checksum(),
        udp.to_header()
            .calc_checksum_ipv4(&ip, udp.payload())
            .unwrap()
    );

    // UDP, received: the other way round.
    set.egress_node(true, node, out, NodeL4::Udp(b"world!"));
    let c = rx.try_recv().unwrap();
    assert_eq!(c.point.direction(), Direction::Inbound);
    let (ip, t) = node_packet(&c);
    assert_eq!(
        (ip.source, ip.destination),
        ([192, 168, 100, 253], [192, 168, 100, 1])
    );
    let etherparse::TransportSlice::Udp(udp) = t else {
        panic!("not UDP")
    };
    assert_eq!((udp.source_port(), udp.destination_port()), (9000, 40001));
    assert_eq!(udp.payload(), b"world!");
    assert_eq!(
        udp.checksum(),
        udp.to_header()
            .calc_checksum_ipv4(&ip, udp.payload())
            .unwrap()
    );

    // An echo request as the pod sent it (identifier 0x1234, its checksum) leaves with the
    // node socket's identifier and a checksum to match.
    let mut msg = vec![8u8, 0, 0, 0, 0x12, 0x34, 0, 7];
    msg.extend_from_slice(b"ping data");
    crate::wire::Icmpv4Packet::new_unchecked(&mut msg[..]).fill_checksum();
    set.egress_node(
        false,
        node,
        out,
        NodeL4::Icmp {
            msg: &msg,
            ident: 777,
        },
    );
    let c = rx.try_recv().unwrap();
    let (_, t) = node_packet(&c);
    let etherparse::TransportSlice::Icmpv4(icmp) = t else {
        panic!("not ICMP")
    };
    assert_eq!(
        icmp.icmp_type(),
        etherparse::Icmpv4Type::EchoRequest(etherparse::IcmpEchoHeader { id: 777, seq: 7 })
    );
    assert_eq!(icmp.payload(), b"ping data");
    let want = etherparse::Icmpv4Header::with_checksum(icmp.icmp_type(), icmp.payload());
    assert_eq!(icmp.checksum(), want.checksum);
    // Too short to be an ICMP message: nothing.
    set.egress_node(
        false,
        node,
        out,
        NodeL4::Icmp {
            msg: &msg[..4],
            ident: 1,
        },
    );
    assert!(rx.try_recv().is_err());

    // TCP: a data segment with the given numbers, PSH|ACK.
    let flags = TcpFlags::PSH | TcpFlags::ACK;
    set.egress_node(
        false,
        node,
        out,
        NodeL4::Tcp {
            seq: 1,
            ack: 1,
            flags,
            payload: b"GET / HTTP/1.0\r\n\r\n",
        },
    );
    let c = rx.try_recv().unwrap();
    let (ip, t) = node_packet(&c);
    let etherparse::TransportSlice::Tcp(tcp) = t else {
        panic!("not TCP")
    };
    assert_eq!((tcp.source_port(), tcp.destination_port()), (40001, 9000));
    assert_eq!((tcp.sequence_number(), tcp.acknowledgment_number()), (1, 1));
    assert!(tcp.psh() && tcp.ack() && !tcp.syn() && !tcp.fin());
    assert_eq!(tcp.payload(), b"GET / HTTP/1.0\r\n\r\n");
    assert_eq!(
        tcp.checksum(),
        tcp.calc_checksum_ipv4(ip.source, ip.destination).unwrap()
    );
    // Odd lengths and an empty payload (a SYN) checksum right too.
    for payload in [&b"x"[..], &b""[..]] {
        set.egress_node(
            true,
            node,
            out,
            NodeL4::Tcp {
                seq: 0,
                ack: 1,
                flags: TcpFlags::SYN | TcpFlags::ACK,
                payload,
            },
        );
        let c = rx.try_recv().unwrap();
        let (ip, t) = node_packet(&c);
        let etherparse::TransportSlice::Tcp(tcp) = t else {
            panic!("not TCP")
        };
        assert!(tcp.syn() && tcp.ack());
        assert_eq!((tcp.source_port(), tcp.destination_port()), (9000, 40001));
        assert_eq!(
            tcp.checksum(),
            tcp.calc_checksum_ipv4(ip.source, ip.destination).unwrap()
        );
    }

    // Bytes more than one IPv4 packet holds become segments numbered on.
    let big = vec![0x5au8; 100_000];
    set.egress_node(
        false,
        node,
        out,
        NodeL4::Tcp {
            seq: 10,
            ack: 1,
            flags,
            payload: &big,
        },
    );
    let (a, b) = (rx.try_recv().unwrap(), rx.try_recv().unwrap());
    assert!(rx.try_recv().is_err());
    let mut total = 0;
    let mut seq = 10u32;
    for c in [&a, &b] {
        // The snap length (65535) cuts the largest: its headers say the rest.
        let tcp = crate::wire::TcpPacket::new_checked(&c.data[34..]).unwrap();
        assert_eq!(tcp.seq_number(), seq);
        let len = c.orig_len as usize - 14 - 20 - 20;
        assert!(len <= 65_535 - 40);
        seq += len as u32;
        total += len;
    }
    assert_eq!(total, big.len());

    // A filter on the outside address leaves other destinations out; nothing went to the
    // egress:pod session.
    let elsewhere: SocketAddrV4 = "203.0.113.9:53".parse().unwrap();
    set.egress_node(false, node, elsewhere, NodeL4::Udp(b"q"));
    assert!(rx.try_recv().is_err());
    assert!(rx_pod.try_recv().is_err());
    set.egress_pod(
        true,
        &frame([10, 244, 1, 2], [192, 168, 100, 253], 17, 5000, 9000, 3),
    );
    let c = rx_pod.try_recv().unwrap();
    assert_eq!((c.point.stage, c.point.inbound), (Stage::EgressPod, true));
    assert!(rx.try_recv().is_err());
}

#[test]
fn egress_points_are_off_unless_selected() {
    let hub = Hub::new();
    let (_s, rx) = open(&hub, "pod,nat,overlay,policy", "", None, None);
    let set = hub.current().unwrap();
    assert!(!set.wants_egress_node());
    assert!(!set.wants_egress_pod(true) && !set.wants_egress_pod(false));
    let node: SocketAddrV4 = "192.168.100.1:40001".parse().unwrap();
    let out: SocketAddrV4 = "192.168.100.253:9000".parse().unwrap();
    set.egress_node(false, node, out, NodeL4::Udp(b"hello"));
    set.egress_pod(
        false,
        &frame([1, 1, 1, 1], [10, 244, 1, 2], 17, 9000, 5000, 3),
    );
    assert!(rx.try_recv().is_err());
    // Only the direction asked for.
    let (_o, rx_out) = open(&hub, "egress:node", "out", None, None);
    let set = hub.current().unwrap();
    set.egress_node(true, node, out, NodeL4::Udp(b"in"));
    set.egress_node(false, node, out, NodeL4::Udp(b"out"));
    assert!(!rx_out.try_recv().unwrap().point.inbound);
    assert!(rx_out.try_recv().is_err());
    let name = |stage, inbound| {
        let point = Point {
            stage,
            inbound,
            port: 0,
        };
        super::stream::interface_name(&point, &|_| String::new()).0
    };
    assert_eq!(name(Stage::EgressPod, true), "egress:pod:in");
    assert_eq!(name(Stage::EgressPod, false), "egress:pod:out");
    assert_eq!(name(Stage::EgressNode, false), "egress:node:out");
    assert_eq!(name(Stage::EgressNode, true), "egress:node:in");
}
