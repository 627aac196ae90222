//! `vswitchctl trace`: a synthetic packet through the real pipeline, like Open vSwitch's
//! ofproto/trace.
//!
//! The packet is built as the named pod (or peer node) would send it and handed to the same
//! `pipeline::handle` / `handle_underlay` the datapath runs, on the current table snapshot, with
//! a fresh connection tracking table and tracing on. Nothing is sent and no state changes: the
//! answer shows what the first packet of such a connection meets.

use std::net::Ipv4Addr;

use conf::api::{code, ApiError, TraceRequest, TraceResponse};

use crate::pipeline::{self, Action, Conntrack, CtConfig, Ctx, Meta, PortId, Tables};
use crate::wire::{
    EtherType, EthernetAddress, EthernetFrame, EthernetRepr, Icmpv4Message, Icmpv4Packet,
    Icmpv4Repr, IpProtocol, Ipv4Packet, Ipv4Repr, L4Checksum, TcpFlags, TcpPacket, TcpRepr,
    UdpPacket, UdpRepr, ETHERNET_HEADER_LEN,
};

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::new(code::INVALID_ENV, msg, "")
}

/// A DNS query (`kubernetes.default.svc.cluster.local`, A) for a traced UDP packet to port
/// 53, so the trace shows what the switch's resolver does with a query, not with an empty
/// datagram.
fn dns_query() -> Vec<u8> {
    let mut q = vec![0x74, 0x72, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["kubernetes", "default", "svc", "cluster", "local"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// A complete Ethernet/IPv4 frame of the requested kind, written with the wire emitters.
fn frame(
    src_mac: EthernetAddress,
    dst_mac: EthernetAddress,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    req: &TraceRequest,
) -> Result<Vec<u8>, ApiError> {
    let sport = req.src_port.unwrap_or(40000);
    let csum = L4Checksum::V4(src, dst);
    let (protocol, l4): (IpProtocol, Vec<u8>) = match req.protocol.to_ascii_lowercase().as_str() {
        "tcp" => {
            let tcp = TcpRepr {
                src_port: sport,
                dst_port: req.dst_port.unwrap_or(80),
                seq_number: 1,
                ack_number: 0,
                flags: TcpFlags::SYN,
                window_len: 64240,
                payload_len: 0,
            };
            let mut l4 = vec![0u8; tcp.buffer_len()];
            tcp.emit(&mut TcpPacket::new_unchecked(&mut l4[..]), csum);
            (IpProtocol::TCP, l4)
        }
        "udp" => {
            let dst_port = req.dst_port.unwrap_or(53);
            let payload = if dst_port == 53 {
                dns_query()
            } else {
                Vec::new()
            };
            let udp = UdpRepr {
                src_port: sport,
                dst_port,
                payload_len: payload.len(),
            };
            let mut l4 = vec![0u8; udp.buffer_len()];
            l4[udp.header_len()..].copy_from_slice(&payload);
            udp.emit(&mut UdpPacket::new_unchecked(&mut l4[..]), csum);
            (IpProtocol::UDP, l4)
        }
        "icmp" => {
            let echo = Icmpv4Repr {
                msg_type: Icmpv4Message::ECHO_REQUEST,
                msg_code: 0,
                rest_of_header: 0x7472_0001,
                payload_len: 0,
            };
            let mut l4 = vec![0u8; echo.buffer_len()];
            echo.emit(&mut Icmpv4Packet::new_unchecked(&mut l4[..]));
            (IpProtocol::ICMP, l4)
        }
        other => return Err(bad(format!("protocol {other:?}: use tcp, udp or icmp"))),
    };
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        protocol,
        payload_len: l4.len(),
        ttl: 64,
        dont_frag: true,
    };
    let eth = EthernetRepr {
        src_addr: src_mac,
        dst_addr: dst_mac,
        ethertype: EtherType::IPV4,
    };
    let mut f = vec![0u8; ETHERNET_HEADER_LEN + ip.buffer_len()];
    eth.emit(&mut EthernetFrame::new_unchecked(&mut f[..]));
    let at = ETHERNET_HEADER_LEN + ip.header_len();
    f[at..].copy_from_slice(&l4);
    ip.emit(&mut Ipv4Packet::new_unchecked(
        &mut f[ETHERNET_HEADER_LEN..],
    ));
    Ok(f)
}

fn verdict(t: &Tables, a: Action) -> String {
    match a {
        Action::ToPort(p) if t.is_host(p) => "deliver to the node (host port)".into(),
        Action::ToPort(p) => match t.port(p) {
            Some(e) => format!("deliver to port {p} ({})", e.ip),
            None => format!("deliver to port {p}"),
        },
        Action::ToPeer(id) => match t.peers.get(id) {
            Some(peer) => format!(
                "encapsulate in VXLAN (VNI {}) to node {} at {}",
                t.vni, peer.name, peer.underlay
            ),
            None => "encapsulate to an unknown peer".into(),
        },
        Action::Reply(n) => format!("answered by the switch itself ({n}-byte reply)"),
        Action::DnsForward(_) => {
            "forwarded by the switch's DNS resolver to the upstream resolvers".into()
        }
        Action::ToEgress => {
            "egress translation: the switch ends the connection and opens it again from the \
             node's own address"
                .into()
        }
        Action::Drop(r) => format!("dropped: {}", r.name()),
    }
}

/// Runs the trace. `port_of_pod` resolves a pod name or container ID to its port.
pub fn run(
    t: &Tables,
    ct_cfg: CtConfig,
    req: &TraceRequest,
    port_of_pod: impl Fn(&str) -> Option<PortId>,
) -> Result<TraceResponse, ApiError> {
    let mut steps = Vec::new();
    let mut ct = Conntrack::new(ct_cfg);
    let mut cx = Ctx {
        t,
        ct: &mut ct,
        now_ms: 0,
        trace: Some(&mut steps),
    };
    let action = if let Some(name) = &req.peer {
        let (id, peer) = t
            .peers
            .peers()
            .iter()
            .enumerate()
            .find(|(_, p)| &p.name == name)
            .ok_or_else(|| bad(format!("no peer {name:?}")))?;
        let src = req
            .src
            .ok_or_else(|| bad("a packet from a peer needs --src (an address of its pods)"))?;
        let mut f = frame(
            EthernetAddress(peer.vtep_mac),
            t.vtep_mac,
            src,
            req.dst,
            req,
        )?;
        if let Some(s) = cx.trace.as_deref_mut() {
            s.push(format!(
                "ingress: VXLAN from node {} ({})",
                peer.name, peer.underlay
            ));
        }
        pipeline::handle_underlay(&mut cx, id as u32, &mut f, None)
    } else {
        let id = match (&req.pod, req.port) {
            (Some(p), _) => {
                port_of_pod(p).ok_or_else(|| bad(format!("no pod {p:?} on this node")))?
            }
            (None, Some(p)) => p,
            (None, None) => {
                return Err(bad("say where the packet enters: --pod, --port or --peer"))
            }
        };
        let port = if t.is_host(id) {
            t.host.clone()
        } else {
            t.port(id).cloned()
        }
        .ok_or_else(|| bad(format!("no port {id}")))?;
        let src = req.src.unwrap_or(port.ip);
        // A pod sends on-link destinations to their MAC, everything else to its gateway.
        let dst_mac = match t.port_by_ip(req.dst) {
            Some(p) if t.pod_cidr.contains(&req.dst) && !t.is_host(id) => p.mac,
            _ => t.gateway_mac,
        };
        let mut f = frame(port.mac, dst_mac, src, req.dst, req)?;
        let len = f.len();
        f.resize(len + 128, 0);
        pipeline::handle(&mut cx, id, &mut f, len, Meta::default())
    };
    Ok(TraceResponse {
        verdict: verdict(t, action),
        steps,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    use super::*;
    use crate::pipeline::tables::{mac_for, DnsService};
    use crate::pipeline::PortEntry;

    const GW: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
    const A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
    const B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);
    const RESOLVER: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

    fn tables() -> Tables {
        let dns = DnsService {
            addrs: vec![RESOLVER],
            table: crate::dns::DnsTable::new::<conf::config::ServiceSpec>(
                "cluster.local",
                &[],
                &[],
                &[],
            )
            .unwrap(),
        };
        Tables::new("10.244.1.0/24".parse().unwrap(), GW, mac_for(GW))
            .with_ports([
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
            .with_dns(Some(Arc::new(dns)))
    }

    fn request(protocol: &str, dst: Ipv4Addr, dst_port: Option<u16>) -> TraceRequest {
        TraceRequest {
            pod: None,
            port: Some(1),
            peer: None,
            src: None,
            dst,
            protocol: protocol.into(),
            src_port: None,
            dst_port,
        }
    }

    #[test]
    fn frames_are_well_formed_for_an_independent_parser() {
        for proto in ["tcp", "udp", "icmp"] {
            let f = frame(mac_for(A), mac_for(B), A, B, &request(proto, B, None)).unwrap();
            let p = SlicedPacket::from_ethernet(&f).unwrap();
            let Some(NetSlice::Ipv4(ip)) = p.net else {
                panic!("{proto}: not IPv4")
            };
            assert_eq!(ip.header().source_addr(), A);
            assert_eq!(ip.header().destination_addr(), B);
            assert_eq!(usize::from(ip.header().total_len()), f.len() - 14);
            let mut h = ip.header().to_header();
            let sum = h.header_checksum;
            h.header_checksum = h.calc_header_checksum();
            assert_eq!(sum, h.header_checksum, "{proto}: IPv4 checksum");
            match (proto, p.transport) {
                ("tcp", Some(TransportSlice::Tcp(t))) => {
                    assert!(t.syn() && !t.ack());
                    assert_eq!((t.source_port(), t.destination_port()), (40000, 80));
                    let want = t.to_header().calc_checksum_ipv4(&h, t.payload()).unwrap();
                    assert_eq!(t.checksum(), want, "TCP checksum");
                }
                ("udp", Some(TransportSlice::Udp(u))) => {
                    assert_eq!(u.destination_port(), 53);
                    let want = u.to_header().calc_checksum_ipv4(&h, u.payload()).unwrap();
                    assert_eq!(u.checksum(), want, "UDP checksum");
                    assert!(
                        !u.payload().is_empty(),
                        "a query to port 53 carries a question"
                    );
                }
                ("icmp", Some(TransportSlice::Icmpv4(i))) => {
                    assert_eq!(i.type_u8(), 8, "echo request");
                    let want = i.header().icmp_type.calc_checksum(i.payload());
                    assert_eq!(i.checksum(), want, "ICMP checksum");
                }
                (p, t) => panic!("{p}: unexpected transport {t:?}"),
            }
        }
    }

    #[test]
    fn a_traced_query_to_the_cluster_resolver_is_answered_not_malformed() {
        let t = tables();
        let r = run(
            &t,
            CtConfig::default(),
            &request("udp", RESOLVER, Some(53)),
            |_| None,
        )
        .unwrap();
        assert!(
            r.verdict.starts_with("answered by the switch itself"),
            "{r:?}"
        );
    }

    #[test]
    fn a_traced_syn_to_a_local_pod_is_delivered_and_a_ping_to_the_gateway_answered() {
        let t = tables();
        let r = run(&t, CtConfig::default(), &request("tcp", B, None), |_| None).unwrap();
        assert_eq!(r.verdict, format!("deliver to port 2 ({B})"), "{r:?}");
        let r = run(&t, CtConfig::default(), &request("icmp", GW, None), |_| {
            None
        })
        .unwrap();
        assert!(r.verdict.starts_with("answered by the switch"), "{r:?}");
        let e = run(&t, CtConfig::default(), &request("sctp", B, None), |_| None).unwrap_err();
        assert!(e.msg.contains("use tcp, udp or icmp"), "{e:?}");
    }

    #[test]
    fn a_traced_packet_to_the_outside_says_it_leaves_by_egress_translation() {
        let mut t = tables();
        let outside = Ipv4Addr::new(203, 0, 113, 5);
        t.egress = Some(Arc::new(crate::pipeline::tables::Egress::default()));
        for proto in ["tcp", "udp", "icmp"] {
            let r = run(
                &t,
                CtConfig::default(),
                &request(proto, outside, None),
                |_| None,
            )
            .unwrap();
            assert!(
                r.verdict.starts_with("egress translation"),
                "{proto}: {r:?}"
            );
            assert!(
                r.steps
                    .iter()
                    .any(|s| s.contains("leaves by egress translation")),
                "{proto}: {r:?}"
            );
        }
    }
}
