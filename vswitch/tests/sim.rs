//! A deterministic simulator of several switches joined by a fake underlay.
//!
//! No root, no sockets, no clock: each node is a table snapshot run through the real pipeline
//! (`handle`, `decap`, `handle_underlay`) and the real segmentation code; the "wire" is a queue
//! of datagrams. It checks the overlay's decisions end to end: routing to the right node,
//! encapsulation and decapsulation, super-frames cut to the path, the checks on what arrives
//! from the underlay, and path-MTU signalling.
//!
//! Peers take VXLAN remote checksum offload (as vswitch nodes do) unless a test builds the
//! mesh with [`Sim::with_rco`] false (as toward a flannel node). A frame delivered with a
//! partial checksum is finished the way the pod's stack would (NEEDS_CSUM), so the tests' own
//! checksum checks see what the pod's application would.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr};

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use overlay::{Peer, PeerTable};
use vswitch::datapath::segment::{segment_tcp4, Csum};
use vswitch::pipeline::tables::mac_for;
use vswitch::pipeline::{
    decap, encap_for, encap_header, handle, handle_underlay, Action, Conntrack, CtConfig, Ctx,
    DropReason, Meta, PortEntry, PortId, Tables,
};
use vswitch::wire::{virtio, EthernetAddress, Ipv4Packet, VirtioNetHdr};

#[derive(Debug, Clone, PartialEq)]
enum Event {
    /// A frame written to a pod's TAP.
    Delivered {
        node: usize,
        port: PortId,
        frame: Vec<u8>,
    },
    /// A reply the switch made, back to the sending pod.
    Reply {
        node: usize,
        port: PortId,
        frame: Vec<u8>,
    },
    Dropped {
        node: usize,
        reason: DropReason,
    },
}

struct Node {
    tables: Tables,
    ct: Conntrack,
    underlay: IpAddr,
}

struct Sim {
    nodes: Vec<Node>,
    wire: VecDeque<(IpAddr, IpAddr, Vec<u8>)>,
    /// Every datagram that crossed the wire.
    sent: Vec<(IpAddr, IpAddr, Vec<u8>)>,
    events: Vec<Event>,
    /// The simulated clock, milliseconds.
    now_ms: u64,
}

/// The ICMP message that `ev`, a pod's send on node 0 port 1, came to: the one event, a reply
/// the switch made from `from` to the pod `to`.
fn icmp_reply(ev: &[Event], from: Ipv4Addr, to: Ipv4Addr) -> etherparse::Icmpv4Slice<'_> {
    let [Event::Reply {
        node: 0,
        port: 1,
        frame,
    }] = ev
    else {
        panic!("{ev:?}")
    };
    let p = SlicedPacket::from_ethernet(frame).unwrap();
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        panic!()
    };
    assert_eq!(
        (ip.header().source_addr(), ip.header().destination_addr()),
        (from, to)
    );
    let Some(TransportSlice::Icmpv4(icmp)) = p.transport else {
        panic!()
    };
    icmp
}

fn underlay_of(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 168, 100, i as u8 + 1))
}
fn vtep_of(i: usize) -> [u8; 6] {
    [0x0e, 0x58, 192, 168, 100, i as u8 + 1]
}
fn cidr_of(i: usize) -> ipnet::Ipv4Net {
    format!("10.244.{}.0/24", i + 1).parse().unwrap()
}
fn gw_of(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, i as u8 + 1, 1)
}
fn pod(i: usize, j: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, i as u8 + 1, j + 1)
}

impl Sim {
    /// `n` nodes in a full mesh, each with `pods` pods on ports 1..=pods.
    fn new(n: usize, pods: u8) -> Sim {
        Sim::with_rco(n, pods, true)
    }

    /// [`Sim::new`], with peers that take remote checksum offload or not.
    fn with_rco(n: usize, pods: u8, rco: bool) -> Sim {
        let nodes = (0..n)
            .map(|i| {
                let peers = (0..n)
                    .filter(|&k| k != i)
                    .map(|k| Peer {
                        name: format!("n{k}"),
                        underlay: underlay_of(k),
                        vtep_mac: vtep_of(k),
                        pod_cidrs: vec![cidr_of(k)],
                        remote_csum: rco,
                    })
                    .collect();
                let mut t = Tables::new(cidr_of(i), gw_of(i), mac_for(gw_of(i))).with_ports(
                    (1..=pods).map(|j| PortEntry {
                        id: j as PortId,
                        mac: mac_for(pod(i, j)),
                        ip: pod(i, j),
                    }),
                );
                t.vtep_mac = EthernetAddress(vtep_of(i));
                t.overlay_mtu = 1450;
                t.peers = PeerTable::new(peers).unwrap();
                Node {
                    tables: t,
                    ct: Conntrack::new(CtConfig::default()),
                    underlay: underlay_of(i),
                }
            })
            .collect();
        Sim {
            nodes,
            wire: VecDeque::new(),
            sent: Vec::new(),
            events: Vec::new(),
            now_ms: 0,
        }
    }

    /// Pod on `port` of `node` sends `frame` (with its TAP's virtio-net header).
    fn pod_send(&mut self, node: usize, port: PortId, mut frame: Vec<u8>, vnet: VirtioNetHdr) {
        let meta = Meta {
            gso_size: if vnet.is_gso() { vnet.gso_size } else { 0 },
            csum_partial: vnet.needs_csum(),
        };
        let now_ms = self.now_ms;
        let action = {
            let n = &mut self.nodes[node];
            let mut cx = Ctx {
                t: &n.tables,
                ct: &mut n.ct,
                now_ms,
                trace: None,
            };
            let len = frame.len();
            frame.resize(len + 128, 0);
            let a = handle(&mut cx, port, &mut frame, len, meta);
            frame.truncate(match a {
                Action::Reply(n) => n,
                _ => len,
            });
            a
        };
        let t = &self.nodes[node].tables;
        match action {
            Action::ToPort(p) => self.events.push(Event::Delivered {
                node,
                port: p,
                frame,
            }),
            Action::Reply(n) => self.events.push(Event::Reply {
                node,
                port,
                frame: frame[..n].to_vec(),
            }),
            Action::Drop(reason) => self.events.push(Event::Dropped { node, reason }),
            Action::DnsForward(_) => panic!("the simulated nodes do not answer DNS"),
            Action::ToEgress => panic!("the simulated nodes do not translate egress"),
            Action::ToPeer(id) => {
                let peer = t.peers.get(id).unwrap();
                let (prefix, partial) = encap_for(t, peer, &vnet, &frame);
                let csum = if partial { Csum::Partial } else { Csum::Full };
                let peer = peer.underlay;
                let from = self.nodes[node].underlay;
                if vnet.is_gso() {
                    let mut out = vec![0u8; 200_000];
                    let segs = segment_tcp4(&frame, &vnet, &prefix, csum, &mut out).unwrap();
                    for i in 0..segs.count {
                        self.wire
                            .push_back((from, peer, out[segs.range(i)].to_vec()));
                    }
                } else {
                    if !partial {
                        virtio::finish_checksum(&vnet, &mut frame).unwrap();
                    }
                    let mut d = prefix.to_vec();
                    d.extend_from_slice(&frame);
                    self.wire.push_back((from, peer, d));
                }
            }
        }
        self.run_wire();
    }

    /// Something on the underlay sends a datagram to a node's VXLAN port.
    fn inject(&mut self, from: IpAddr, to: IpAddr, datagram: Vec<u8>) {
        self.wire.push_back((from, to, datagram));
        self.run_wire();
    }

    fn run_wire(&mut self) {
        while let Some((from, to, d)) = self.wire.pop_front() {
            self.sent.push((from, to, d.clone()));
            let Some(node) = self.nodes.iter().position(|n| n.underlay == to) else {
                continue;
            };
            let n = &mut self.nodes[node];
            let t = &n.tables;
            let (peer, rco) = match decap(t, from, &d) {
                Ok(p) => p,
                Err(reason) => {
                    self.events.push(Event::Dropped { node, reason });
                    continue;
                }
            };
            let mut inner = d[8..].to_vec();
            let mut cx = Ctx {
                t,
                ct: &mut n.ct,
                now_ms: self.now_ms,
                trace: None,
            };
            match handle_underlay(&mut cx, peer, &mut inner, rco) {
                Action::ToPort(p) => {
                    if let Some(r) = rco {
                        // What the pod's stack does with a NEEDS_CSUM frame.
                        let hdr = VirtioNetHdr {
                            flags: VirtioNetHdr::F_NEEDS_CSUM,
                            csum_start: r.start,
                            csum_offset: r.offset,
                            ..VirtioNetHdr::NONE
                        };
                        virtio::finish_checksum(&hdr, &mut inner).unwrap();
                    }
                    self.events.push(Event::Delivered {
                        node,
                        port: p,
                        frame: inner,
                    })
                }
                Action::Drop(reason) => self.events.push(Event::Dropped { node, reason }),
                other => panic!("underlay frames are only delivered or dropped, got {other:?}"),
            }
        }
    }

    fn take(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }
}

fn udp_to(src_node: usize, src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8], ttl: u8) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(mac_for(src).0, mac_for(gw_of(src_node)).0)
        .ipv4(src.octets(), dst.octets(), ttl)
        .udp(40000, 53);
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

fn set_df(frame: &mut [u8], df: bool) {
    if df {
        frame[14 + 6] |= 0x40;
    } else {
        frame[14 + 6] &= !0x40;
    }
    Ipv4Packet::new_checked(&mut frame[14..])
        .unwrap()
        .fill_checksum();
}

#[test]
fn cross_node_udp_is_encapsulated_and_routed_to_the_right_node() {
    let mut sim = Sim::new(3, 2);
    let f = udp_to(0, pod(0, 1), pod(2, 2), b"over the overlay", 64);
    sim.pod_send(0, 1, f, VirtioNetHdr::NONE);
    // One datagram, from node 0 to node 2 (not node 1), VXLAN VNI 1, inner MACs VTEP to VTEP.
    assert_eq!(sim.sent.len(), 1);
    let (from, to, d) = &sim.sent[0];
    assert_eq!((*from, *to), (underlay_of(0), underlay_of(2)));
    assert_eq!(&d[..8], &[0x08, 0, 0, 0, 0, 0, 1, 0]);
    assert_eq!(
        &d[8..14],
        &vtep_of(2),
        "inner destination: the peer's VTEP MAC"
    );
    assert_eq!(&d[14..20], &vtep_of(0), "inner source: our VTEP MAC");
    let ev = sim.take();
    let [Event::Delivered {
        node: 2,
        port: 2,
        frame,
    }] = &ev[..]
    else {
        panic!("{ev:?}")
    };
    let p = SlicedPacket::from_ethernet(frame).unwrap();
    let Some(etherparse::LinkSlice::Ethernet2(eth)) = &p.link else {
        panic!()
    };
    assert_eq!(eth.source(), mac_for(gw_of(2)).0);
    assert_eq!(eth.destination(), mac_for(pod(2, 2)).0);
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        panic!()
    };
    assert_eq!(ip.header().ttl(), 62, "routed twice: once per node");
    let h = ip.header().to_header();
    assert_eq!(h.header_checksum, h.calc_header_checksum());
    let Some(TransportSlice::Udp(udp)) = &p.transport else {
        panic!()
    };
    assert_eq!(udp.payload(), b"over the overlay");
}

#[test]
fn the_reply_finds_its_way_back() {
    let mut sim = Sim::new(2, 1);
    sim.pod_send(
        1,
        1,
        udp_to(1, pod(1, 1), pod(0, 1), b"pong", 64),
        VirtioNetHdr::NONE,
    );
    let ev = sim.take();
    assert!(
        matches!(
            &ev[..],
            [Event::Delivered {
                node: 0,
                port: 1,
                ..
            }]
        ),
        "{ev:?}"
    );
}

#[test]
fn a_tso_super_frame_crosses_as_mtu_sized_segments() {
    tso_super_frame_crosses(true);
}

#[test]
fn a_tso_super_frame_crosses_with_full_checksums_to_a_peer_without_rco() {
    tso_super_frame_crosses(false);
}

/// A 20 KB super-frame crosses whole and intact. With RCO every datagram says so and carries
/// its segment's pseudo-header sum; without, a full checksum and no RCO flag.
fn tso_super_frame_crosses(rco: bool) {
    let mut sim = Sim::with_rco(2, 1, rco);
    let payload: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let b = PacketBuilder::ethernet2(mac_for(pod(0, 1)).0, mac_for(gw_of(0)).0)
        .ipv4(pod(0, 1).octets(), pod(1, 1).octets(), 64)
        .tcp(40000, 5201, 42, 65535)
        .ack(1);
    let mut f = Vec::new();
    b.write(&mut f, &payload).unwrap();
    // The total length of a 64 KiB super-frame may not fit 16 bits honestly; this one does.
    let vnet = VirtioNetHdr {
        flags: VirtioNetHdr::F_NEEDS_CSUM,
        gso_type: VirtioNetHdr::GSO_TCPV4,
        hdr_len: 54,
        gso_size: 1398,
        csum_start: 34,
        csum_offset: 16,
    };
    sim.pod_send(0, 1, f, vnet);
    let ev = sim.take();
    assert_eq!(ev.len(), 20_000usize.div_ceil(1398));
    let mut got = Vec::new();
    for e in &ev {
        let Event::Delivered {
            node: 1,
            port: 1,
            frame,
        } = e
        else {
            panic!("{e:?}")
        };
        let p = SlicedPacket::from_ethernet(frame).unwrap();
        let Some(NetSlice::Ipv4(ip)) = &p.net else {
            panic!()
        };
        let h = ip.header().to_header();
        assert!(
            h.total_len <= 1450,
            "segment of {} bytes exceeds the path",
            h.total_len
        );
        let Some(TransportSlice::Tcp(tcp)) = &p.transport else {
            panic!()
        };
        let th = tcp.to_header();
        assert_eq!(
            th.checksum,
            th.calc_checksum_ipv4(&h, tcp.payload()).unwrap()
        );
        got.extend_from_slice(tcp.payload());
    }
    assert_eq!(got, payload);
    for (_, _, d) in &sim.sent {
        assert!(d.len() - 8 - 14 <= 1450);
        let h = overlay::vxlan::VxlanHeader::new_checked(&d[..]).unwrap();
        let pseudo = vswitch::wire::checksum::fold(vswitch::wire::checksum::pseudo_header_v4(
            pod(0, 1),
            pod(1, 1),
            6,
            (d.len() - 8 - 34) as u16,
        ));
        let on_wire = u16::from_be_bytes([d[8 + 34 + 16], d[8 + 34 + 17]]);
        if rco {
            assert_eq!(
                h.rco(),
                Some(overlay::vxlan::Rco {
                    start: 34,
                    offset: 16
                })
            );
            assert_eq!(on_wire, pseudo, "a partial checksum on the wire");
        } else {
            assert_eq!(h.rco(), None);
            assert_ne!(on_wire, pseudo, "a full checksum on the wire");
        }
    }
}

/// A pod's single frame with an offloaded checksum (NEEDS_CSUM) to a remote backend of a
/// Service, and the backend's answer the same way: both cross partial (RCO), are translated on
/// the way with the partial sum patched, and arrive with checksums the pods' stacks accept.
#[test]
fn offloaded_checksums_cross_partial_and_survive_translation_both_ways() {
    let mut sim = Sim::new(2, 1);
    sim.set_services(
        &[service(&[pod(1, 1)], Protocol::Tcp, None)],
        LoadBalancing::Maglev,
    );
    let offloaded = |mut f: Vec<u8>, src: Ipv4Addr, dst: Ipv4Addr| {
        let pseudo = vswitch::wire::checksum::fold(vswitch::wire::checksum::pseudo_header_v4(
            src,
            dst,
            6,
            (f.len() - 34) as u16,
        ));
        f[34 + 16..34 + 18].copy_from_slice(&pseudo.to_be_bytes());
        let vnet = VirtioNetHdr {
            flags: VirtioNetHdr::F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 16,
            ..VirtioNetHdr::NONE
        };
        (f, vnet)
    };
    let client = pod(0, 1);
    let (f, vnet) = offloaded(
        tcp_frame(0, (client, 1234), (VIP, 80), true, None),
        client,
        VIP,
    );
    sim.pod_send(0, 1, f, vnet);
    let (node, port, frame) = delivered(&sim.take());
    assert_eq!((node, port), (1, 1));
    assert_eq!(addrs(&frame), ((client, 1234), (pod(1, 1), 8080)));
    let d = &sim.sent.last().unwrap().2;
    assert!(overlay::vxlan::VxlanHeader::new_checked(&d[..])
        .unwrap()
        .rco()
        .is_some());
    let (f, vnet) = offloaded(
        tcp_frame(1, (pod(1, 1), 8080), (client, 1234), false, None),
        pod(1, 1),
        client,
    );
    sim.pod_send(1, 1, f, vnet);
    let (node, port, frame) = delivered(&sim.take());
    assert_eq!((node, port), (0, 1));
    assert_eq!(addrs(&frame), ((VIP, 80), (client, 1234)));
}

/// An RCO header must point at the inner frame's TCP/UDP checksum: anywhere else and the pod
/// would be told to trust bytes nobody checked, so the frame is dropped and counted.
#[test]
fn rco_pointing_anywhere_but_the_l4_checksum_is_dropped() {
    let mut sim = Sim::new(2, 1);
    let mut inner = tcp_frame(1, (pod(1, 1), 8080), (pod(0, 1), 1234), false, None);
    inner[..6].copy_from_slice(&vtep_of(0));
    inner[6..12].copy_from_slice(&vtep_of(1));
    for (start, offset, ok) in [
        (34, 16, true),
        (34, 6, false),
        (36, 16, false),
        (14, 16, false),
    ] {
        let mut h = [0u8; 8];
        let rco = overlay::vxlan::Rco { start, offset };
        overlay::vxlan::emit_header_rco(&mut h, 1, rco).unwrap();
        let mut d = h.to_vec();
        d.extend_from_slice(&inner);
        sim.inject(underlay_of(1), underlay_of(0), d);
        let ev = sim.take();
        if ok {
            assert!(
                matches!(ev[..], [Event::Delivered { node: 0, .. }]),
                "{ev:?}"
            );
        } else {
            assert_eq!(
                ev,
                [Event::Dropped {
                    node: 0,
                    reason: DropReason::VxlanBadRco
                }]
            );
        }
    }
}

#[test]
fn vxlan_from_strangers_or_with_the_wrong_vni_is_dropped() {
    let mut sim = Sim::new(2, 1);
    let mut d = encap_header(&sim.nodes[1].tables).to_vec();
    let mut inner = udp_to(1, pod(1, 1), pod(0, 1), b"x", 64);
    inner[..6].copy_from_slice(&vtep_of(0));
    inner[6..12].copy_from_slice(&vtep_of(1));
    d.extend_from_slice(&inner);
    let stranger = IpAddr::V4(Ipv4Addr::new(192, 168, 100, 99));
    sim.inject(stranger, underlay_of(0), d.clone());
    let mut wrong_vni = d.clone();
    wrong_vni[6] = 2;
    sim.inject(underlay_of(1), underlay_of(0), wrong_vni);
    let mut no_flag = d.clone();
    no_flag[0] = 0;
    sim.inject(underlay_of(1), underlay_of(0), no_flag);
    let mut not_for_us = d.clone();
    not_for_us[8..14].copy_from_slice(&[0x0e, 0x58, 1, 2, 3, 4]);
    sim.inject(underlay_of(1), underlay_of(0), not_for_us);
    // A peer may only send from its own pod CIDR.
    let mut spoofed = d.clone();
    let ip = 8 + 14;
    spoofed[ip + 12..ip + 16].copy_from_slice(&[10, 244, 9, 9]);
    Ipv4Packet::new_checked(&mut spoofed[ip..])
        .unwrap()
        .fill_checksum();
    sim.inject(underlay_of(1), underlay_of(0), spoofed);
    sim.inject(underlay_of(1), underlay_of(0), d[..5].to_vec());
    let reasons: Vec<DropReason> = sim
        .take()
        .into_iter()
        .map(|e| match e {
            Event::Dropped { node: 0, reason } => reason,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        reasons,
        vec![
            DropReason::UnknownPeer,
            DropReason::WrongVni,
            DropReason::VxlanMalformed,
            DropReason::VxlanNotForUs,
            DropReason::VxlanSpoofedSrc,
            DropReason::VxlanMalformed,
        ]
    );
    // The same datagram from the real peer is delivered.
    sim.inject(underlay_of(1), underlay_of(0), d.clone());
    assert!(matches!(
        &sim.take()[..],
        [Event::Delivered {
            node: 0,
            port: 1,
            ..
        }]
    ));
    // The peer also speaks for its node's own address (a reply from a server on that node),
    // but not for this node's.
    let from = |src: IpAddr| {
        let IpAddr::V4(src) = src else {
            unreachable!("the sim's underlay is IPv4")
        };
        let mut x = d.clone();
        x[ip + 12..ip + 16].copy_from_slice(&src.octets());
        Ipv4Packet::new_checked(&mut x[ip..])
            .unwrap()
            .fill_checksum();
        x
    };
    sim.inject(underlay_of(1), underlay_of(0), from(underlay_of(1)));
    assert!(matches!(
        &sim.take()[..],
        [Event::Delivered {
            node: 0,
            port: 1,
            ..
        }]
    ));
    sim.inject(underlay_of(1), underlay_of(0), from(underlay_of(0)));
    assert_eq!(
        sim.take(),
        [Event::Dropped {
            node: 0,
            reason: DropReason::VxlanSpoofedSrc
        }]
    );
}

#[test]
fn too_big_with_df_gets_frag_needed_and_without_df_is_counted() {
    let mut sim = Sim::new(2, 1);
    let mut f = udp_to(0, pod(0, 1), pod(1, 1), &[0u8; 1500], 64);
    set_df(&mut f, true);
    sim.pod_send(0, 1, f.clone(), VirtioNetHdr::NONE);
    let ev = sim.take();
    let icmp = icmp_reply(&ev, gw_of(0), pod(0, 1));
    assert!(sim.sent.is_empty(), "nothing crossed the wire");
    match icmp.icmp_type() {
        etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu },
        ) => assert_eq!(next_hop_mtu, 1450),
        other => panic!("expected frag needed, got {other:?}"),
    }
    // It quotes the original header, as PMTU discovery needs.
    assert_eq!(&icmp.payload()[..20], &f[14..34]);
    let hdr = icmp.header();
    assert_eq!(hdr.checksum, hdr.icmp_type.calc_checksum(icmp.payload()));

    let mut f = udp_to(0, pod(0, 1), pod(1, 1), &[0u8; 1500], 64);
    set_df(&mut f, false);
    sim.pod_send(0, 1, f, VirtioNetHdr::NONE);
    assert_eq!(
        sim.take(),
        vec![Event::Dropped {
            node: 0,
            reason: DropReason::TooBig
        }]
    );
    // Exactly the path MTU passes.
    let f = udp_to(0, pod(0, 1), pod(1, 1), &[0u8; 1450 - 28], 64);
    sim.pod_send(0, 1, f, VirtioNetHdr::NONE);
    assert!(matches!(
        &sim.take()[..],
        [Event::Delivered { node: 1, .. }]
    ));
}

#[test]
fn routing_decisions() {
    let mut sim = Sim::new(2, 2);
    // Same node: routed locally, never on the wire.
    sim.pod_send(
        0,
        1,
        udp_to(0, pod(0, 1), pod(0, 2), b"l", 64),
        VirtioNetHdr::NONE,
    );
    assert!(matches!(
        &sim.take()[..],
        [Event::Delivered {
            node: 0,
            port: 2,
            ..
        }]
    ));
    // No node owns it.
    sim.pod_send(
        0,
        1,
        udp_to(0, pod(0, 1), Ipv4Addr::new(10, 99, 0, 1), b"?", 64),
        VirtioNetHdr::NONE,
    );
    assert_eq!(
        sim.take(),
        vec![Event::Dropped {
            node: 0,
            reason: DropReason::NoRoute
        }]
    );
    // A remote pod address that is not attached there.
    sim.pod_send(
        0,
        1,
        udp_to(0, pod(0, 1), pod(1, 77), b"?", 64),
        VirtioNetHdr::NONE,
    );
    assert_eq!(
        sim.take(),
        vec![Event::Dropped {
            node: 1,
            reason: DropReason::NoRoute
        }]
    );
    assert_eq!(sim.sent.len(), 1, "only the remote pod's datagram crossed");
    // TTL runs out at the first hop: "time exceeded" from the gateway, as a router answers.
    sim.pod_send(
        0,
        1,
        udp_to(0, pod(0, 1), pod(1, 1), b"t", 1),
        VirtioNetHdr::NONE,
    );
    let ev = sim.take();
    let icmp = icmp_reply(&ev, gw_of(0), pod(0, 1));
    assert!(
        matches!(icmp.icmp_type(), etherparse::Icmpv4Type::TimeExceeded(_)),
        "{:?}",
        icmp.icmp_type()
    );
    assert_eq!(sim.sent.len(), 1);
    // The peer removed: its pods are unreachable, the other traffic unaffected.
    let t = sim.nodes[0].tables.with_peers(PeerTable::default());
    sim.nodes[0].tables = t;
    sim.pod_send(
        0,
        1,
        udp_to(0, pod(0, 1), pod(1, 1), b"gone", 64),
        VirtioNetHdr::NONE,
    );
    assert_eq!(
        sim.take(),
        vec![Event::Dropped {
            node: 0,
            reason: DropReason::NoRoute
        }]
    );
    sim.pod_send(
        0,
        1,
        udp_to(0, pod(0, 1), pod(0, 2), b"l", 64),
        VirtioNetHdr::NONE,
    );
    assert!(matches!(
        &sim.take()[..],
        [Event::Delivered {
            node: 0,
            port: 2,
            ..
        }]
    ));
}

// ---- Services: translation, conntrack, rejects, hairpin ----

use conf::config::{LoadBalancing, Protocol, ServiceSpec};
use vswitch::pipeline::ServiceTable;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn service(backends: &[Ipv4Addr], proto: Protocol, affinity: Option<u32>) -> ServiceSpec {
    let backends = backends.iter().copied();
    vswitch::testutil::service("default", "web", VIP, proto, backends, affinity)
}

impl Sim {
    fn set_services(&mut self, specs: &[ServiceSpec], lb: LoadBalancing) {
        for (i, n) in self.nodes.iter_mut().enumerate() {
            let table = ServiceTable::build(specs, &format!("n{i}"), lb);
            n.tables = n.tables.with_services(table);
        }
    }
}

fn tcp_frame(
    node: usize,
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    syn: bool,
    mac_dst: Option<[u8; 6]>,
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(mac_for(src.0).0, mac_dst.unwrap_or(mac_for(gw_of(node)).0))
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .tcp(src.1, dst.1, 1000, 64000);
    let b = if syn { b.syn() } else { b.ack(1) };
    let mut out = Vec::new();
    b.write(&mut out, b"GET / HTTP/1.1\r\n\r\n").unwrap();
    out
}

/// (src, dst) addresses and ports of a delivered TCP/UDP frame, with its checksums checked.
fn addrs(frame: &[u8]) -> ((Ipv4Addr, u16), (Ipv4Addr, u16)) {
    let p = SlicedPacket::from_ethernet(frame).unwrap();
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        panic!()
    };
    let h = ip.header().to_header();
    assert_eq!(h.header_checksum, h.calc_header_checksum(), "IP checksum");
    let (s, d) = (ip.header().source_addr(), ip.header().destination_addr());
    match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            let th = t.to_header();
            assert_eq!(
                th.checksum,
                th.calc_checksum_ipv4(&h, t.payload()).unwrap(),
                "TCP checksum"
            );
            ((s, t.source_port()), (d, t.destination_port()))
        }
        Some(TransportSlice::Udp(u)) => {
            let uh = u.to_header();
            assert_eq!(
                uh.checksum,
                uh.calc_checksum_ipv4(&h, u.payload()).unwrap(),
                "UDP checksum"
            );
            ((s, u.source_port()), (d, u.destination_port()))
        }
        other => panic!("{other:?}"),
    }
}

fn delivered(ev: &[Event]) -> (usize, PortId, Vec<u8>) {
    match ev {
        [Event::Delivered { node, port, frame }] => (*node, *port, frame.clone()),
        other => panic!("expected one delivery, got {other:?}"),
    }
}

#[test]
fn clusterip_connections_reach_backends_on_any_node_and_replies_come_from_the_vip() {
    let mut sim = Sim::new(3, 3);
    let backends = [pod(0, 2), pod(1, 1), pod(2, 1)];
    sim.set_services(
        &[service(&backends, Protocol::Tcp, None)],
        LoadBalancing::Maglev,
    );
    let client = pod(0, 1);
    let mut per_backend = std::collections::HashMap::new();
    for sport in 30000..30300u16 {
        sim.pod_send(
            0,
            1,
            tcp_frame(0, (client, sport), (VIP, 80), true, None),
            VirtioNetHdr::NONE,
        );
        let (node, port, f) = delivered(&sim.take());
        let ((s, sp), (d, dp)) = addrs(&f);
        assert_eq!((s, sp), (client, sport), "the client's address is kept");
        assert_eq!(dp, 8080, "target port");
        assert!(backends.contains(&d));
        assert_eq!(pod(node, port as u8), d, "delivered to that backend's port");
        *per_backend.entry(d).or_insert(0) += 1;
        // The backend answers; the client sees the Service address.
        let (bnode, bport) = (node, port);
        sim.pod_send(
            bnode,
            bport,
            tcp_frame(bnode, (d, 8080), (client, sport), false, None),
            VirtioNetHdr::NONE,
        );
        let (cnode, cport, r) = delivered(&sim.take());
        assert_eq!((cnode, cport), (0, 1));
        assert_eq!(addrs(&r), ((VIP, 80), (client, sport)));
    }
    // 300 connections over 3 backends: each within 100 +- 40.
    assert_eq!(per_backend.len(), 3, "{per_backend:?}");
    for (b, n) in &per_backend {
        assert!((60..=140).contains(n), "backend {b} got {n} of 300");
    }
    // The same connection keeps its backend.
    sim.pod_send(
        0,
        1,
        tcp_frame(0, (client, 30000), (VIP, 80), false, None),
        VirtioNetHdr::NONE,
    );
    let first = addrs(&delivered(&sim.take()).2).1;
    sim.pod_send(
        0,
        1,
        tcp_frame(0, (client, 30000), (VIP, 80), false, None),
        VirtioNetHdr::NONE,
    );
    assert_eq!(addrs(&delivered(&sim.take()).2).1, first);
}

#[test]
fn session_affinity_sticks_to_one_backend_until_it_times_out() {
    let mut sim = Sim::new(2, 4);
    let backends = [pod(0, 2), pod(0, 3), pod(1, 1), pod(1, 2)];
    sim.set_services(
        &[service(&backends, Protocol::Tcp, Some(10))],
        LoadBalancing::Random,
    );
    let client = pod(0, 1);
    let mut seen = std::collections::HashSet::new();
    for sport in 40000..40050u16 {
        sim.pod_send(
            0,
            1,
            tcp_frame(0, (client, sport), (VIP, 80), true, None),
            VirtioNetHdr::NONE,
        );
        seen.insert(addrs(&delivered(&sim.take()).2).1 .0);
    }
    assert_eq!(
        seen.len(),
        1,
        "affinity: every connection to the same backend"
    );
    // After the timeout, random choice spreads again.
    sim.now_ms += 11_000;
    let mut later = std::collections::HashSet::new();
    for sport in 41000..41050u16 {
        sim.now_ms += 11_000;
        sim.pod_send(
            0,
            1,
            tcp_frame(0, (client, sport), (VIP, 80), true, None),
            VirtioNetHdr::NONE,
        );
        later.insert(addrs(&delivered(&sim.take()).2).1 .0);
    }
    assert!(later.len() > 1);
}

#[test]
fn a_service_without_endpoints_rejects_at_once() {
    let mut sim = Sim::new(1, 1);
    sim.set_services(
        &[service(&[], Protocol::Tcp, None), {
            let mut u = service(&[], Protocol::Udp, None);
            u.name = "dns".into();
            u.ports[0].port = 53;
            u
        }],
        LoadBalancing::Maglev,
    );
    let client = pod(0, 1);
    sim.pod_send(
        0,
        1,
        tcp_frame(0, (client, 5555), (VIP, 80), true, None),
        VirtioNetHdr::NONE,
    );
    let ev = sim.take();
    let [Event::Reply { frame, .. }] = &ev[..] else {
        panic!("{ev:?}")
    };
    let p = SlicedPacket::from_ethernet(frame).unwrap();
    let Some(TransportSlice::Tcp(t)) = &p.transport else {
        panic!()
    };
    assert!(t.rst() && t.ack(), "RST|ACK to a SYN");
    assert_eq!(t.acknowledgment_number(), 1000 + 1 + 18);
    assert_eq!(addrs(frame), ((VIP, 80), (client, 5555)));
    // UDP: port unreachable from the Service address.
    let b = PacketBuilder::ethernet2(mac_for(client).0, mac_for(gw_of(0)).0)
        .ipv4(client.octets(), VIP.octets(), 64)
        .udp(5353, 53);
    let mut f = Vec::new();
    b.write(&mut f, b"query").unwrap();
    sim.pod_send(0, 1, f, VirtioNetHdr::NONE);
    let ev = sim.take();
    let icmp = icmp_reply(&ev, VIP, client);
    assert!(matches!(
        icmp.icmp_type(),
        etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::Port
        )
    ));
}

#[test]
fn a_pod_reaches_itself_through_its_own_service() {
    let mut sim = Sim::new(1, 1);
    let me = pod(0, 1);
    sim.set_services(
        &[service(&[me], Protocol::Tcp, None)],
        LoadBalancing::Maglev,
    );
    sim.pod_send(
        0,
        1,
        tcp_frame(0, (me, 7000), (VIP, 80), true, None),
        VirtioNetHdr::NONE,
    );
    let (_, port, f) = delivered(&sim.take());
    assert_eq!(port, 1);
    // Seen as coming from the gateway, so the answer goes back through the switch.
    assert_eq!(addrs(&f), ((gw_of(0), 7000), (me, 8080)));
    sim.pod_send(
        0,
        1,
        tcp_frame(0, (me, 8080), (gw_of(0), 7000), false, None),
        VirtioNetHdr::NONE,
    );
    let (_, port, r) = delivered(&sim.take());
    assert_eq!(port, 1);
    assert_eq!(addrs(&r), ((VIP, 80), (me, 7000)));
}

#[test]
fn udp_entries_to_a_removed_endpoint_are_flushed() {
    let mut sim = Sim::new(1, 3);
    let client = pod(0, 1);
    let udp = |sport: u16| {
        let b = PacketBuilder::ethernet2(mac_for(client).0, mac_for(gw_of(0)).0)
            .ipv4(client.octets(), VIP.octets(), 64)
            .udp(sport, 80);
        let mut f = Vec::new();
        b.write(&mut f, b"dgram").unwrap();
        f
    };
    sim.set_services(
        &[service(&[pod(0, 2), pod(0, 3)], Protocol::Udp, None)],
        LoadBalancing::Maglev,
    );
    sim.pod_send(0, 1, udp(9999), VirtioNetHdr::NONE);
    let first = addrs(&delivered(&sim.take()).2).1 .0;
    let other = if first == pod(0, 2) {
        pod(0, 3)
    } else {
        pod(0, 2)
    };
    // The endpoint goes away: its UDP entries go with it and the flow moves.
    sim.set_services(
        &[service(&[other], Protocol::Udp, None)],
        LoadBalancing::Maglev,
    );
    assert_eq!(sim.nodes[0].ct.flush_udp_to(&[first]), 1);
    sim.pod_send(0, 1, udp(9999), VirtioNetHdr::NONE);
    assert_eq!(addrs(&delivered(&sim.take()).2).1 .0, other);
}

#[test]
fn translation_survives_checksum_offload_and_super_frames() {
    let mut sim = Sim::new(2, 2);
    sim.set_services(
        &[service(&[pod(1, 1)], Protocol::Tcp, None)],
        LoadBalancing::Maglev,
    );
    let client = pod(0, 1);
    sim.pod_send(
        0,
        1,
        tcp_frame(0, (client, 1234), (VIP, 80), true, None),
        VirtioNetHdr::NONE,
    );
    sim.take();
    // A TSO super-frame of the same connection with a partial checksum, as a TAP hands it over.
    let payload: Vec<u8> = (0..9000u32).map(|i| i as u8).collect();
    let b = PacketBuilder::ethernet2(mac_for(client).0, mac_for(gw_of(0)).0)
        .ipv4(client.octets(), VIP.octets(), 64)
        .tcp(1234, 80, 1019, 64000)
        .ack(1);
    let mut f = Vec::new();
    b.write(&mut f, &payload).unwrap();
    // Replace the checksum with the pseudo-header sum, as the kernel leaves it.
    let tcp_len = (f.len() - 34) as u16;
    let partial = vswitch::wire::checksum::fold(vswitch::wire::checksum::pseudo_header_v4(
        client, VIP, 6, tcp_len,
    ));
    f[34 + 16..34 + 18].copy_from_slice(&partial.to_be_bytes());
    let vnet = VirtioNetHdr {
        flags: VirtioNetHdr::F_NEEDS_CSUM,
        gso_type: VirtioNetHdr::GSO_TCPV4,
        hdr_len: 54,
        gso_size: 1398,
        csum_start: 34,
        csum_offset: 16,
    };
    sim.pod_send(0, 1, f, vnet);
    let ev = sim.take();
    assert_eq!(ev.len(), 9000usize.div_ceil(1398));
    let mut got = Vec::new();
    for e in &ev {
        let Event::Delivered {
            node: 1,
            port: 1,
            frame,
        } = e
        else {
            panic!("{e:?}")
        };
        let ((s, _), (d, dp)) = addrs(frame);
        assert_eq!((s, d, dp), (client, pod(1, 1), 8080));
        let p = SlicedPacket::from_ethernet(frame).unwrap();
        let Some(TransportSlice::Tcp(t)) = &p.transport else {
            panic!()
        };
        got.extend_from_slice(t.payload());
    }
    assert_eq!(got, payload);
}

#[test]
fn a_backend_on_the_clients_subnet_answering_directly_is_translated_too() {
    let mut sim = Sim::new(1, 2);
    let (client, backend) = (pod(0, 1), pod(0, 2));
    sim.set_services(
        &[service(&[backend], Protocol::Tcp, None)],
        LoadBalancing::Maglev,
    );
    sim.pod_send(
        0,
        1,
        tcp_frame(0, (client, 6000), (VIP, 80), true, None),
        VirtioNetHdr::NONE,
    );
    let (_, port, f) = delivered(&sim.take());
    assert_eq!((port, addrs(&f).1), (2, (backend, 8080)));
    // The backend knows the client is on its subnet and sends straight to its MAC.
    let reply = tcp_frame(
        0,
        (backend, 8080),
        (client, 6000),
        false,
        Some(mac_for(client).0),
    );
    sim.pod_send(0, 2, reply, VirtioNetHdr::NONE);
    let (_, port, r) = delivered(&sim.take());
    assert_eq!(port, 1);
    assert_eq!(addrs(&r), ((VIP, 80), (client, 6000)));
}
