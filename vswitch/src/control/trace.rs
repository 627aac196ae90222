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
use crate::wire::{checksum, EthernetAddress, IpProtocol};

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::new(code::INVALID_ENV, msg, "")
}

/// A complete Ethernet/IPv4 frame of the requested kind.
fn frame(
    src_mac: EthernetAddress,
    dst_mac: EthernetAddress,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    req: &TraceRequest,
) -> Result<Vec<u8>, ApiError> {
    let (proto, l4): (IpProtocol, Vec<u8>) = match req.protocol.to_ascii_lowercase().as_str() {
        "tcp" => {
            let mut t = vec![0u8; 20];
            t[0..2].copy_from_slice(&req.src_port.unwrap_or(40000).to_be_bytes());
            t[2..4].copy_from_slice(&req.dst_port.unwrap_or(80).to_be_bytes());
            t[4..8].copy_from_slice(&1u32.to_be_bytes());
            t[12] = 5 << 4;
            t[13] = 0x02; // SYN
            t[14..16].copy_from_slice(&64240u16.to_be_bytes());
            (IpProtocol::TCP, t)
        }
        "udp" => {
            let mut u = vec![0u8; 8];
            u[0..2].copy_from_slice(&req.src_port.unwrap_or(40000).to_be_bytes());
            u[2..4].copy_from_slice(&req.dst_port.unwrap_or(53).to_be_bytes());
            u[4..6].copy_from_slice(&8u16.to_be_bytes());
            (IpProtocol::UDP, u)
        }
        "icmp" => {
            let mut i = vec![0u8; 8];
            i[0] = 8;
            i[4..6].copy_from_slice(&0x7472u16.to_be_bytes());
            i[6..8].copy_from_slice(&1u16.to_be_bytes());
            let c = checksum::finish(checksum::sum(&i));
            i[2..4].copy_from_slice(&c.to_be_bytes());
            (IpProtocol::ICMP, i)
        }
        other => return Err(bad(format!("protocol {other:?}: use tcp, udp or icmp"))),
    };
    let mut f = Vec::with_capacity(34 + l4.len());
    f.extend_from_slice(&dst_mac.0);
    f.extend_from_slice(&src_mac.0);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + l4.len()) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = proto.0;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = checksum::finish(checksum::sum(&ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut l4 = l4;
    if proto != IpProtocol::ICMP {
        let at = if proto == IpProtocol::TCP { 16 } else { 6 };
        let sum =
            checksum::pseudo_header_v4(src, dst, proto.0, l4.len() as u16) + checksum::sum(&l4);
        l4[at..at + 2].copy_from_slice(&checksum::finish(sum).to_be_bytes());
    }
    f.extend_from_slice(&l4);
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
