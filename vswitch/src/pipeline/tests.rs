//! Pipeline decisions on frames built by an independent encoder (etherparse).

use std::net::Ipv4Addr;

use etherparse::{PacketBuilder, SlicedPacket};
use proptest::prelude::*;

use super::*;
use crate::pipeline::tables::mac_for;
use crate::wire::EthernetAddress;

const GW: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
const A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);

fn tables() -> Tables {
    Tables::new("10.244.1.0/24".parse().unwrap(), GW, mac_for(GW)).with_ports([
        PortEntry {
            id: 1,
            mac: mac_for(A),
            ip: A,
        },
        PortEntry {
            id: 2,
            mac: mac_for(B),
            ip: B,
        },
    ])
}

/// `f` through the pipeline from `port` with a new connection table, looked at first
/// (`prefetch`) if `look`, as the worker does: the action, and the buffer after it (the frame,
/// with room past it for a reply, as the datapath's buffer has).
fn through(t: &Tables, port: PortId, f: &[u8], look: bool) -> (Action, Vec<u8>) {
    if look {
        prefetch(t, f);
    }
    let mut ct = Conntrack::new(CtConfig::default());
    let mut cx = Ctx {
        t,
        ct: &mut ct,
        now_ms: 0,
        trace: None,
    };
    let mut buf = f.to_vec();
    buf.resize(f.len() + 128, 0);
    let a = handle(&mut cx, port, &mut buf, f.len(), Meta::default());
    (a, buf)
}

fn run(t: &Tables, port: PortId, f: &mut [u8]) -> Action {
    let (a, buf) = through(t, port, f, true);
    let n = match a {
        Action::Reply(n) => n.min(f.len()),
        _ => f.len(),
    };
    f[..n].copy_from_slice(&buf[..n]);
    a
}

fn arp_request(src_mac: EthernetAddress, src_ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&src_mac.0);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&src_mac.0);
    f.extend_from_slice(&src_ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

fn udp(
    src_mac: EthernetAddress,
    dst_mac: EthernetAddress,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ttl: u8,
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src_mac.0, dst_mac.0)
        .ipv4(src.octets(), dst.octets(), ttl)
        .udp(4000, 5000);
    let payload = b"hello";
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).unwrap();
    out
}

fn ping(
    src_mac: EthernetAddress,
    dst_mac: EthernetAddress,
    src: Ipv4Addr,
    dst: Ipv4Addr,
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src_mac.0, dst_mac.0)
        .ipv4(src.octets(), dst.octets(), 64)
        .icmpv4_echo_request(0x1234, 7);
    let payload = b"abcdefgh0123456789";
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).unwrap();
    out
}

#[test]
fn arp_for_a_pod_is_answered_from_the_port_table() {
    let t = tables();
    let mut f = arp_request(mac_for(A), A, B);
    let n = f.len();
    assert_eq!(run(&t, 1, &mut f), Action::Reply(n));
    let eth = EthernetFrame::new_checked(&f[..]).unwrap();
    assert_eq!(eth.dst_addr(), mac_for(A));
    assert_eq!(eth.src_addr(), mac_for(B));
    let arp = ArpPacket::new_checked(eth.payload()).unwrap();
    assert_eq!(arp.operation(), ArpOperation::REPLY);
    assert_eq!(arp.sender_hardware_addr(), mac_for(B));
    assert_eq!(arp.sender_protocol_addr(), B);
    assert_eq!(arp.target_hardware_addr(), mac_for(A));
    assert_eq!(arp.target_protocol_addr(), A);
}

#[test]
fn arp_for_the_gateway_gets_the_gateway_mac() {
    let t = tables();
    let mut f = arp_request(mac_for(A), A, GW);
    let n = f.len();
    assert_eq!(run(&t, 1, &mut f), Action::Reply(n));
    let eth = EthernetFrame::new_checked(&f[..]).unwrap();
    assert_eq!(eth.src_addr(), mac_for(GW));
}

#[test]
fn arp_for_unknown_or_own_address_is_not_answered_nor_flooded() {
    let t = tables();
    let mut f = arp_request(mac_for(A), A, Ipv4Addr::new(10, 244, 1, 99));
    assert_eq!(
        run(&t, 1, &mut f),
        Action::Drop(DropReason::ArpUnknownTarget)
    );
    let mut f = arp_request(mac_for(A), A, A);
    assert_eq!(
        run(&t, 1, &mut f),
        Action::Drop(DropReason::ArpUnknownTarget)
    );
}

#[test]
fn spoofed_sources_are_dropped() {
    let t = tables();
    // Pod A claiming B's MAC.
    let mut f = udp(mac_for(B), mac_for(B), B, B, 64);
    assert_eq!(run(&t, 1, &mut f), Action::Drop(DropReason::SpoofedMac));
    // Pod A's MAC with B's address.
    let mut f = udp(mac_for(A), mac_for(B), B, B, 64);
    assert_eq!(run(&t, 1, &mut f), Action::Drop(DropReason::SpoofedIp));
    // ARP claiming someone else's address.
    let mut f = arp_request(mac_for(A), B, GW);
    assert_eq!(run(&t, 1, &mut f), Action::Drop(DropReason::SpoofedArp));
}

#[test]
fn same_subnet_frames_are_switched_by_destination_mac() {
    let t = tables();
    let mut f = udp(mac_for(A), mac_for(B), A, B, 64);
    let orig = f.clone();
    assert_eq!(run(&t, 1, &mut f), Action::ToPort(2));
    assert_eq!(f, orig, "switching must not modify the frame");
    let mut f = udp(
        mac_for(A),
        EthernetAddress([0x0a, 0x58, 1, 2, 3, 4]),
        A,
        B,
        64,
    );
    assert_eq!(run(&t, 1, &mut f), Action::Drop(DropReason::UnknownMac));
    let mut f = udp(mac_for(A), mac_for(A), A, A, 64);
    assert_eq!(run(&t, 1, &mut f), Action::Drop(DropReason::Hairpin));
}

#[test]
fn frames_to_the_gateway_are_routed_to_local_pods() {
    let t = tables();
    let mut f = udp(mac_for(A), mac_for(GW), A, B, 64);
    assert_eq!(run(&t, 1, &mut f), Action::ToPort(2));
    let p = SlicedPacket::from_ethernet(&f).unwrap();
    let Some(etherparse::LinkSlice::Ethernet2(eth)) = p.link else {
        panic!()
    };
    assert_eq!(eth.source(), mac_for(GW).0);
    assert_eq!(eth.destination(), mac_for(B).0);
    let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
        panic!()
    };
    assert_eq!(ip.header().ttl(), 63);
    let h = ip.header().to_header();
    assert_eq!(
        h.header_checksum,
        h.calc_header_checksum(),
        "IPv4 checksum after TTL decrement"
    );

    let mut f = udp(mac_for(A), mac_for(GW), A, Ipv4Addr::new(8, 8, 8, 8), 64);
    assert_eq!(run(&t, 1, &mut f), Action::Drop(DropReason::NoRoute));
}

/// `f` through the pipeline from port 1, and the whole reply if there is one.
fn reply_to(t: &Tables, f: &[u8]) -> (Action, Vec<u8>) {
    let (a, buf) = through(t, 1, f, true);
    let n = if let Action::Reply(n) = a { n } else { 0 };
    (a, buf[..n].to_vec())
}

#[test]
fn a_packet_whose_ttl_runs_out_gets_time_exceeded_from_the_gateway() {
    let mut t = tables();
    t.egress = Some(std::sync::Arc::new(tables::Egress {
        no_masquerade: Vec::new(),
        node_ips: vec![Ipv4Addr::new(172, 16, 0, 1)],
    }));
    let outside = Ipv4Addr::new(198, 51, 100, 7);
    // To a pod of the node, and to the outside through egress translation: the first hop.
    for dst in [B, outside] {
        let f = udp(mac_for(A), mac_for(GW), A, dst, 1);
        let (a, reply) = reply_to(&t, &f);
        assert!(matches!(a, Action::Reply(_)), "{dst}: {a:?}");
        let p = SlicedPacket::from_ethernet(&reply).expect("the reply parses");
        let Some(etherparse::LinkSlice::Ethernet2(eth)) = &p.link else {
            panic!("not Ethernet")
        };
        assert_eq!(
            (eth.source(), eth.destination()),
            (mac_for(GW).0, mac_for(A).0)
        );
        let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
            panic!("not IPv4")
        };
        assert_eq!(
            (ip.header().source_addr(), ip.header().destination_addr()),
            (GW, A)
        );
        let Some(etherparse::TransportSlice::Icmpv4(icmp)) = &p.transport else {
            panic!("not ICMP")
        };
        assert!(
            matches!(
                icmp.icmp_type(),
                etherparse::Icmpv4Type::TimeExceeded(
                    etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit
                )
            ),
            "{:?}",
            icmp.icmp_type()
        );
        // It quotes the packet's header and its first 8 bytes (the UDP header).
        assert_eq!(icmp.payload(), &f[14..14 + 28]);
        let hdr = icmp.header();
        assert_eq!(hdr.checksum, hdr.icmp_type.calc_checksum(icmp.payload()));
    }
    // With TTL left, egress gets the packet one hop on.
    let f = udp(mac_for(A), mac_for(GW), A, outside, 2);
    let mut buf = f.clone();
    assert_eq!(run(&t, 1, &mut buf), Action::ToEgress);
    assert_eq!(buf[14 + 8], 1, "TTL");
    let ip = etherparse::Ipv4HeaderSlice::from_slice(&buf[14..]).unwrap();
    assert_eq!(ip.header_checksum(), ip.to_header().calc_header_checksum());

    // No error about an ICMP error.
    let b = PacketBuilder::ethernet2(mac_for(A).0, mac_for(GW).0)
        .ipv4(A.octets(), B.octets(), 1)
        .icmpv4(etherparse::Icmpv4Type::TimeExceeded(
            etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit,
        ));
    let mut err = Vec::new();
    b.write(&mut err, &f[14..14 + 28]).unwrap();
    assert_eq!(reply_to(&t, &err).0, Action::Drop(DropReason::TtlExpired));
}

#[test]
fn ping_to_the_gateway_is_answered() {
    let t = tables();
    let mut f = ping(mac_for(A), mac_for(GW), A, GW);
    let n = f.len();
    assert_eq!(run(&t, 1, &mut f), Action::Reply(n));
    let p = SlicedPacket::from_ethernet(&f).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
        panic!()
    };
    assert_eq!(ip.header().source_addr(), GW);
    assert_eq!(ip.header().destination_addr(), A);
    let h = ip.header().to_header();
    assert_eq!(h.header_checksum, h.calc_header_checksum());
    let Some(etherparse::TransportSlice::Icmpv4(icmp)) = &p.transport else {
        panic!()
    };
    match icmp.icmp_type() {
        etherparse::Icmpv4Type::EchoReply(e) => {
            assert_eq!((e.id, e.seq), (0x1234, 7));
        }
        other => panic!("expected echo reply, got {other:?}"),
    }
    assert_eq!(icmp.payload(), b"abcdefgh0123456789");
    let hdr = icmp.header();
    assert_eq!(hdr.checksum, hdr.icmp_type.calc_checksum(icmp.payload()));
}

#[test]
fn garbage_and_unsupported_frames_are_dropped_with_a_reason() {
    let t = tables();
    assert_eq!(
        run(&t, 1, &mut [0u8; 5]),
        Action::Drop(DropReason::Malformed)
    );
    assert_eq!(
        run(&t, 9, &mut [0u8; 64]),
        Action::Drop(DropReason::UnknownPort)
    );
    let mut f = udp(mac_for(A), mac_for(B), A, B, 64);
    f[12..14].copy_from_slice(&[0x86, 0xdd]);
    assert_eq!(run(&t, 1, &mut f), Action::Drop(DropReason::Ipv6));
    f[12..14].copy_from_slice(&[0x88, 0xcc]);
    assert_eq!(
        run(&t, 1, &mut f),
        Action::Drop(DropReason::UnsupportedEthertype)
    );
    let mut f = udp(mac_for(A), mac_for(B), A, B, 64);
    f.truncate(20);
    assert_eq!(run(&t, 1, &mut f), Action::Drop(DropReason::Malformed));
}

/// Tables whose resolver at 10.96.0.10 knows one Service, `web.default` at 10.96.0.20.
fn dns_tables() -> Tables {
    use conf::config::{ServiceSpec, TrafficPolicy};
    let web = ServiceSpec {
        namespace: "default".into(),
        name: "web".into(),
        cluster_ips: vec!["10.96.0.20".parse().unwrap()],
        ports: vec![],
        external_ips: vec![],
        session_affinity_timeout: None,
        internal_traffic_policy: TrafficPolicy::Cluster,
        external_traffic_policy: TrafficPolicy::Cluster,
        load_balancer_ips: Vec::new(),
        health_check_node_port: None,
        proxy_name: None,
        endpoints: vec![],
    };
    let table = crate::dns::DnsTable::new("cluster.local", &[web], &[], &[]).unwrap();
    let dns = tables::DnsService {
        addrs: vec![Ipv4Addr::new(10, 96, 0, 10)],
        table,
    };
    tables().with_dns(Some(std::sync::Arc::new(dns)))
}

fn dns_query(name: &str) -> Vec<u8> {
    let mut m = vec![0x42, 0x42, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for l in name.split('.') {
        m.push(l.len() as u8);
        m.extend(l.as_bytes());
    }
    m.extend([0, 0, 1, 0, 1]);
    m
}

fn udp_to_resolver(payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(mac_for(A).0, mac_for(GW).0)
        .ipv4(A.octets(), [10, 96, 0, 10], 64)
        .udp(40000, 53);
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).unwrap();
    out
}

#[test]
fn cluster_dns_is_answered_in_place_and_the_rest_goes_upstream() {
    let t = dns_tables();
    let mut ct = Conntrack::new(CtConfig::default());
    let mut cx = Ctx {
        t: &t,
        ct: &mut ct,
        now_ms: 0,
        trace: None,
    };
    let mut buf = vec![0u8; DNS_BUF_LEN];

    // A name in the cluster: the reply from the resolver address, to the asking pod.
    let f = udp_to_resolver(&dns_query("web.default.svc.cluster.local"));
    buf[..f.len()].copy_from_slice(&f);
    let Action::Reply(n) = handle(&mut cx, 1, &mut buf, f.len(), Meta::default()) else {
        panic!("a cluster name is answered by the pipeline");
    };
    let reply = buf[..n].to_vec();
    let p = SlicedPacket::from_ethernet(&reply).expect("the reply parses");
    let Some(etherparse::LinkSlice::Ethernet2(eth)) = &p.link else {
        panic!("not Ethernet");
    };
    assert_eq!(
        (eth.source(), eth.destination()),
        (mac_for(GW).0, mac_for(A).0)
    );
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
        panic!("not IPv4");
    };
    assert_eq!(ip.header().source(), [10, 96, 0, 10]);
    assert_eq!(ip.header().destination(), A.octets());
    let Some(etherparse::TransportSlice::Udp(udp)) = &p.transport else {
        panic!("not UDP");
    };
    assert_eq!((udp.source_port(), udp.destination_port()), (53, 40000));
    let answer = udp.payload();
    assert_eq!(&answer[..2], &[0x42, 0x42]);
    assert_eq!(&answer[6..8], &[0, 1], "one answer record");
    assert_eq!(&answer[answer.len() - 4..], &[10, 96, 0, 20]);

    // A name outside: handed to the datapath with who asked whom, the frame unchanged.
    let q = dns_query("example.com");
    let f = udp_to_resolver(&q);
    buf[..f.len()].copy_from_slice(&f);
    let Action::DnsForward(fw) = handle(&mut cx, 1, &mut buf, f.len(), Meta::default()) else {
        panic!("an outside name is forwarded");
    };
    assert_eq!(fw.client, (A, 40000));
    assert_eq!(fw.server, Ipv4Addr::new(10, 96, 0, 10));
    assert_eq!(fw.message(&buf[..f.len()]), &q[..]);
    assert_eq!(&buf[..f.len()], &f[..]);

    // Not a DNS message at all.
    let f = udp_to_resolver(b"hello");
    buf[..f.len()].copy_from_slice(&f);
    let a = handle(&mut cx, 1, &mut buf, f.len(), Meta::default());
    assert_eq!(a, Action::Drop(DropReason::Malformed));
}

#[test]
fn prefetch_reads_any_part_of_a_frame_and_decides_nothing() {
    use conf::config::LoadBalancing;
    let services = crate::testutil::many_services(100);
    let t = tables().with_services(ServiceTable::build(&services, "n1", LoadBalancing::Maglev));
    let vip = crate::testutil::many_services_vip(7);
    let mut syn = Vec::new();
    PacketBuilder::ethernet2(mac_for(A).0, mac_for(GW).0)
        .ipv4(A.octets(), vip.octets(), 64)
        .tcp(40_000, 80, 1, 64_000)
        .syn()
        .write(&mut syn, &[])
        .unwrap();
    // Every truncation, and every byte changed, of a SYN to a Service.
    for n in 0..=syn.len() {
        prefetch(&t, &syn[..n]);
    }
    for i in 0..syn.len() {
        let mut f = syn.clone();
        f[i] ^= 0xff;
        prefetch(&t, &f);
    }
    // The SYN is handled the same whether it was looked at first or not.
    let (without, plain) = through(&t, 1, &syn, false);
    let (with, looked) = through(&t, 1, &syn, true);
    assert_eq!(with, without);
    assert_eq!(looked, plain);
    // Translated: the destination is one of the Service's backends.
    let ip = Ipv4Packet::new_checked(&looked[ETHERNET_HEADER_LEN..]).unwrap();
    assert_ne!(ip.dst_addr(), vip);
    let dst = std::net::IpAddr::V4(ip.dst_addr());
    assert!(services[7].endpoints.iter().any(|e| e.ip == dst));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn never_panics_on_arbitrary_frames(mut frame in proptest::collection::vec(any::<u8>(), 0..200), ingress in 0u32..4) {
        let t = tables();
        let _ = run(&t, ingress, &mut frame);
    }

    #[test]
    fn never_panics_on_mutated_valid_frames(idx in 0usize..64, byte in any::<u8>(), kind in 0u8..4) {
        let t = tables();
        let mut f = match kind {
            0 => arp_request(mac_for(A), A, B),
            1 => udp(mac_for(A), mac_for(GW), A, B, 64),
            2 => ping(mac_for(A), mac_for(GW), A, GW),
            _ => udp(mac_for(A), mac_for(B), A, B, 64),
        };
        let i = idx % f.len();
        f[i] = byte;
        let _ = run(&t, 1, &mut f);
    }
}
