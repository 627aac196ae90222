//! The forwarding pipeline: pure, sans-IO decisions about one frame.
//!
//! `handle(tables, ingress, frame)` looks at an Ethernet frame that arrived on a port and returns
//! what to do with it. It may rewrite the frame in place (MAC rewrite when routing, an ARP or
//! ICMP echo reply built over the request) but never allocates, never reads a clock and never
//! does I/O, so the same code runs in the datapath workers, in `vswitchctl trace`, and in the
//! deterministic simulator tests.
//!
//! What it does today, in order:
//! 1. anti-spoofing: a pod may only send with its own MAC, and IPv4/ARP only from its own
//!    address;
//! 2. ARP is answered from the port table (pods and the gateway); it is never flooded;
//! 3. frames to a pod's MAC are switched to its port (the pod-to-pod case on one node);
//! 4. IPv4 to the gateway MAC is routed: to a local pod (MACs rewritten, TTL decremented), to
//!    the peer node whose pod CIDR holds the destination (inner MACs set the way flannel's
//!    kernel VTEPs expect: our VTEP MAC to theirs), or an ICMP echo to the gateway address
//!    itself is answered. A packet too big for the overlay with DF set gets an ICMP
//!    fragmentation-needed back so path MTU discovery works.
//! 5. Frames decapsulated from a peer must be IPv4 to our VTEP MAC from an address in that
//!    peer's pod CIDRs; they are routed to the local pod.
//! 6. Before any routing decision, routed IPv4 goes through Service translation (`nat`): a
//!    packet to a Service address is rewritten to a backend and tracked, replies are rewritten
//!    back; a Service without backends is rejected at once (TCP RST, ICMP port unreachable).
//! 7. A UDP query to the cluster DNS address (`Tables::dns`) is answered in place from the
//!    cluster's records (`dns`); only a name outside the cluster goes back to the datapath,
//!    whose forwarder asks the upstream resolvers.
//!
//! Connection tracking is the one piece of state the pipeline changes; it is passed in (`Ctx`)
//! together with the time, so the pipeline still never reads a clock.
//!
//! Anything else is dropped with a reason; every reason has a counter.

pub mod dns;
pub mod nat;
mod policy;
pub mod tables;

use std::net::{IpAddr, Ipv4Addr};

pub use dns::{DnsQuery, DNS_BUF_LEN};
pub use nat::{Conntrack, CtConfig, ServiceTable};

use overlay::vxlan::{self, Rco, VxlanHeader};
pub use overlay::PeerId;
pub use tables::{PortEntry, Tables};

use crate::wire::icmpv4::code as icmp_code;
use crate::wire::{
    ArpOperation, ArpPacket, EtherType, EthernetAddress, EthernetFrame, EthernetRepr,
    Icmpv4Message, Icmpv4Packet, Icmpv4Repr, IpProtocol, Ipv4Packet, Ipv4Repr, L4Checksum,
    TcpFlags, TcpPacket, TcpRepr, UdpPacket, UdpRepr, ETHERNET_HEADER_LEN,
};

/// A switch port. Stable for the life of an attachment.
pub type PortId = u32;
/// The host port's id (the node's own interface into the switch); pod ports count from 1.
pub const HOST_PORT: PortId = 0;

/// Per-frame facts from the virtio-net header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Meta {
    /// Segment payload size of a TSO super-frame; 0 for a plain frame. Its segments, not the
    /// frame, must fit the path.
    pub gso_size: u16,
    /// The L4 checksum field holds only the pseudo-header sum (NEEDS_CSUM).
    pub csum_partial: bool,
}

/// What a decision reads and the state it may change: the tables, the worker's connection
/// tracking table, and the time (milliseconds on the worker's monotonic clock).
pub struct Ctx<'a> {
    pub t: &'a Tables,
    pub ct: &'a mut Conntrack,
    pub now_ms: u64,
    /// When tracing (`vswitchctl trace`), every decision is described here. Never set on the
    /// datapath, so the fast path only tests an `Option`.
    pub trace: Option<&'a mut Vec<String>>,
}

impl Ctx<'_> {
    #[inline]
    fn note(&mut self, f: impl FnOnce() -> String) {
        if let Some(t) = self.trace.as_deref_mut() {
            t.push(f());
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send the (possibly rewritten) frame out of this port.
    ToPort(PortId),
    /// Encapsulate the (rewritten) frame in VXLAN and send it to this peer node.
    ToPeer(PeerId),
    /// The frame was turned into a reply of this many bytes in place: send it back out of the
    /// ingress port.
    Reply(usize),
    /// A UDP DNS query to the switch's resolver (`Tables::dns`) for a name outside the
    /// cluster: the datapath hands it to the upstream forwarder. (Names in the cluster are
    /// answered here, as a `Reply`.)
    DnsForward(DnsQuery),
    /// An IPv4 packet of a pod (TCP, UDP or ICMP echo) to an address outside the cluster, with
    /// egress translation on: the datapath hands it to the egress engine, which ends the
    /// connection here and opens it again from the node's own address.
    ToEgress,
    Drop(DropReason),
}

macro_rules! drop_reasons {
    ($($variant:ident => $name:literal,)*) => {
        /// Why a frame was dropped. Each has a counter per port.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum DropReason { $($variant,)* }

        impl DropReason {
            pub const ALL: &'static [DropReason] = &[$(DropReason::$variant,)*];
            pub const COUNT: usize = DropReason::ALL.len();

            /// The counter's name in the admin API and metrics.
            pub fn name(self) -> &'static str {
                match self { $(DropReason::$variant => $name,)* }
            }
        }
    };
}

drop_reasons! {
    Malformed => "malformed",
    SpoofedMac => "spoofed_mac",
    SpoofedIp => "spoofed_ip",
    SpoofedArp => "spoofed_arp",
    ArpUnknownTarget => "arp_unknown_target",
    ArpNotRequest => "arp_not_request",
    Multicast => "multicast",
    UnknownMac => "unknown_mac",
    Hairpin => "hairpin_l2",
    NoRoute => "no_route",
    TtlExpired => "ttl_expired",
    GatewayUnsupported => "gateway_unsupported",
    Ipv6 => "ipv6_unsupported",
    UnsupportedEthertype => "unsupported_ethertype",
    UnknownPort => "unknown_port",
    TooBig => "too_big",
    UnknownPeer => "vxlan_unknown_peer",
    WrongVni => "vxlan_wrong_vni",
    VxlanMalformed => "vxlan_malformed",
    VxlanBadRco => "vxlan_bad_rco",
    VxlanNotForUs => "vxlan_wrong_dst_mac",
    VxlanSpoofedSrc => "vxlan_spoofed_src",
    VxlanNotIpv4 => "vxlan_not_ipv4",
    PortGone => "port_gone",
    TxError => "tx_error",
    ServiceRejected => "service_no_endpoints",
    ConntrackRefused => "conntrack_refused",
    PeerGone => "peer_gone",
    NoUnderlay => "no_underlay",
    PolicyDeniedIngress => "policy_denied_ingress",
    PolicyDeniedEgress => "policy_denied_egress",
    EgressBusy => "egress_queue_full",
}

/// Starts loading, without waiting for it, what handling `frame` (an Ethernet frame from a
/// port) will read that is likely out of cache: for a TCP SYN, the Service index slot of its
/// destination, which among 10,000 Services is a cache miss on each new connection. It reads
/// the frame's headers only and decides nothing. The worker calls it on each frame as it
/// reads it and handles the frame after reading the next one, so that the slot loads during
/// that read instead of holding up the handling.
pub fn prefetch(t: &Tables, frame: &[u8]) {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return;
    };
    if eth.ethertype() != EtherType::IPV4 || t.services.is_empty() {
        return;
    }
    let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
        return;
    };
    if ip.protocol() != IpProtocol::TCP || ip.is_fragment() {
        return;
    }
    let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
        return;
    };
    if tcp.flags().opens() {
        t.services
            .prefetch(ip.dst_addr(), IpProtocol::TCP.0, tcp.dst_port());
    }
}

/// Decides what happens to the Ethernet frame `buf[..len]` (no virtio-net header) that
/// arrived on port `ingress`. Bytes of `buf` past `len` are room for a reply larger than the
/// frame (an ICMP error about a small datagram); they are never read as part of the frame.
pub fn handle(cx: &mut Ctx<'_>, ingress: PortId, buf: &mut [u8], len: usize, meta: Meta) -> Action {
    let t = cx.t;
    let len = len.min(buf.len());
    let frame = &mut buf[..len];
    if t.is_host(ingress) {
        cx.note(|| "ingress: the host port".into());
        return from_host(cx, buf, len, meta);
    }
    let Some(port) = t.port(ingress) else {
        return Action::Drop(DropReason::UnknownPort);
    };
    cx.note(|| format!("ingress: port {} ({} {})", port.id, port.ip, port.mac));
    let Ok(mut eth) = EthernetFrame::new_checked(&mut *frame) else {
        return Action::Drop(DropReason::Malformed);
    };
    if eth.src_addr() != port.mac {
        return Action::Drop(DropReason::SpoofedMac);
    }
    let dst = eth.dst_addr();
    match eth.ethertype() {
        EtherType::ARP => arp(t, port, &mut eth),
        EtherType::IPV4 => {
            if dst == t.gateway_mac {
                cx.note(|| "destination MAC is the gateway's: routed".into());
                return route_v4(cx, port, buf, len, meta);
            }
            if !dst.is_unicast() {
                return Action::Drop(DropReason::Multicast);
            }
            let Ok(mut ip) = Ipv4Packet::new_checked(eth.payload_mut()) else {
                return Action::Drop(DropReason::Malformed);
            };
            if ip.src_addr() != port.ip {
                return Action::Drop(DropReason::SpoofedIp);
            }
            let mut done = nat::Nat::None;
            if nat::untranslate_reply(cx.ct, cx.now_ms, &mut ip, meta.csum_partial) {
                cx.note(|| "a Service backend's reply: source rewritten to the Service".into());
                done = nat::Nat::Translated;
            } else if nat::translate_icmp_error(cx.ct, cx.now_ms, &mut ip) {
                cx.note(|| "an ICMP error about a Service connection: translated".into());
                done = nat::Nat::Translated;
            }
            cx.note(|| format!("switched by destination MAC {dst}"));
            match t.port_by_mac(dst) {
                Some(p) if p.id == ingress => Action::Drop(DropReason::Hairpin),
                Some(p) => {
                    if t.policy.is_some() {
                        let src = policy::From::Pod(port);
                        if let Err(why) = policy::admit(cx, src, Some(p), &ip, done) {
                            return Action::Drop(why);
                        }
                    }
                    Action::ToPort(p.id)
                }
                None => Action::Drop(DropReason::UnknownMac),
            }
        }
        EtherType::IPV6 => Action::Drop(DropReason::Ipv6),
        _ => Action::Drop(DropReason::UnsupportedEthertype),
    }
}

/// Frames from the node itself. The host is trusted (it owns the gateway address and may send
/// from any of its addresses); its ARP is answered for every address the switch can route, with
/// the router MAC, so all its traffic into the switch is routed.
fn from_host(cx: &mut Ctx<'_>, buf: &mut [u8], len: usize, meta: Meta) -> Action {
    let t = cx.t;
    let Some(host) = t.host.clone() else {
        return Action::Drop(DropReason::UnknownPort);
    };
    let Ok(mut eth) = EthernetFrame::new_checked(&mut buf[..len]) else {
        return Action::Drop(DropReason::Malformed);
    };
    match eth.ethertype() {
        EtherType::ARP => {
            let Ok(mut arp) = ArpPacket::new_checked(eth.payload_mut()) else {
                return Action::Drop(DropReason::Malformed);
            };
            if arp.operation() != ArpOperation::REQUEST {
                return Action::Drop(DropReason::ArpNotRequest);
            }
            let target = arp.target_protocol_addr();
            if target == t.gateway_ip {
                return Action::Drop(DropReason::ArpUnknownTarget);
            }
            arp_reply(&mut arp, host.mac, t.gateway_mac);
            eth.set_dst_addr(host.mac);
            eth.set_src_addr(t.gateway_mac);
            Action::Reply(ETHERNET_HEADER_LEN + ArpPacket::<&[u8]>::LEN)
        }
        EtherType::IPV4 if eth.dst_addr() == t.gateway_mac => route_v4(cx, &host, buf, len, meta),
        EtherType::IPV4 => Action::Drop(DropReason::UnknownMac),
        EtherType::IPV6 => Action::Drop(DropReason::Ipv6),
        _ => Action::Drop(DropReason::UnsupportedEthertype),
    }
}

/// Source and destination ports of an unfragmented TCP/UDP packet, (0, 0) otherwise (for
/// traces).
fn nat_ports(ip: &Ipv4Packet<&mut [u8]>) -> (u16, u16) {
    if ip.is_fragment() {
        return (0, 0);
    }
    ip.ports().unwrap_or((0, 0))
}

fn arp(t: &Tables, port: &PortEntry, eth: &mut EthernetFrame<&mut [u8]>) -> Action {
    let Ok(mut arp) = ArpPacket::new_checked(eth.payload_mut()) else {
        return Action::Drop(DropReason::Malformed);
    };
    if arp.sender_hardware_addr() != port.mac {
        return Action::Drop(DropReason::SpoofedArp);
    }
    let sender_ip = arp.sender_protocol_addr();
    // 0.0.0.0 is an address probe (RFC 5227) and allowed.
    if sender_ip != port.ip && !sender_ip.is_unspecified() {
        return Action::Drop(DropReason::SpoofedArp);
    }
    if arp.operation() != ArpOperation::REQUEST {
        return Action::Drop(DropReason::ArpNotRequest);
    }
    let target = arp.target_protocol_addr();
    let answer = if target == t.gateway_ip {
        t.gateway_mac
    } else {
        match t.port_by_ip(target) {
            // A pod asking for its own address (duplicate address detection) gets no answer.
            Some(p) if p.id != port.id => p.mac,
            _ => return Action::Drop(DropReason::ArpUnknownTarget),
        }
    };
    arp_reply(&mut arp, port.mac, answer);
    eth.set_dst_addr(port.mac);
    eth.set_src_addr(answer);
    Action::Reply(ETHERNET_HEADER_LEN + ArpPacket::<&[u8]>::LEN)
}

/// Turns an ARP request into its reply in place: `answer` owns the asked-for address, and the
/// reply goes to the asker (`to`, at the address it asked from).
fn arp_reply(arp: &mut ArpPacket<&mut [u8]>, to: EthernetAddress, answer: EthernetAddress) {
    let (asker, target) = (arp.sender_protocol_addr(), arp.target_protocol_addr());
    arp.set_operation(ArpOperation::REPLY);
    arp.set_target_hardware_addr(to);
    arp.set_target_protocol_addr(asker);
    arp.set_sender_hardware_addr(answer);
    arp.set_sender_protocol_addr(target);
}

fn route_v4(cx: &mut Ctx<'_>, port: &PortEntry, buf: &mut [u8], len: usize, meta: Meta) -> Action {
    let t = cx.t;
    let gso_size = meta.gso_size;
    let mut eth = EthernetFrame::new_unchecked(&mut buf[..len]);
    let Ok(mut ip) = Ipv4Packet::new_checked(eth.payload_mut()) else {
        return Action::Drop(DropReason::Malformed);
    };
    let from_host = t.is_host(port.id);
    if ip.src_addr() != port.ip && !from_host {
        return Action::Drop(DropReason::SpoofedIp);
    }
    if let Some(dns) = &t.dns {
        // A UDP super-frame (several datagrams) is no single query: it goes on as traffic.
        if ip.protocol() == IpProtocol::UDP
            && gso_size == 0
            && !ip.is_fragment()
            && dns.addrs.contains(&ip.dst_addr())
            && ip.ports().is_some_and(|(_, dport)| dport == 53)
        {
            cx.note(|| format!("DNS query to {}: the switch's resolver", ip.dst_addr()));
            return dns::query(cx, dns, port, buf, len);
        }
    }
    let before = (ip.src_addr(), ip.dst_addr(), nat_ports(&ip));
    let done = service_nat(cx, &mut ip, meta.csum_partial);
    match done {
        nat::Nat::None | nat::Nat::Tracked => {}
        nat::Nat::Translated | nat::Nat::Opened => {
            let after = (ip.src_addr(), ip.dst_addr(), nat_ports(&ip));
            cx.note(|| {
                format!(
                    "Service translation: {}:{} -> {}:{} became {}:{} -> {}:{}",
                    before.0,
                    before.2 .0,
                    before.1,
                    before.2 .1,
                    after.0,
                    after.2 .0,
                    after.1,
                    after.2 .1
                )
            });
        }
        nat::Nat::NoBackend => {
            cx.note(|| format!("{}: a Service without endpoints: rejected", before.1));
            return reject(t, port, buf, len);
        }
        nat::Nat::Refused => return Action::Drop(DropReason::ConntrackRefused),
    }
    let dst_ip = ip.dst_addr();
    if t.policy.is_some() {
        // The node itself (kubelet's probes) is always let in; the pod's egress is judged.
        let src = if from_host {
            policy::From::Node
        } else {
            policy::From::Pod(port)
        };
        if let Err(why) = policy::admit(cx, src, t.port_by_ip(dst_ip), &ip, done) {
            return Action::Drop(why);
        }
    }
    let to_host = t.host.as_ref().filter(|h| h.id != port.id);
    if dst_ip == t.gateway_ip && to_host.is_none() {
        if from_host {
            return Action::Drop(DropReason::NoRoute);
        }
        return gateway_v4(t, port, &mut eth);
    }
    let (action, next_mac, src_mac) = if let Some(out) = t.port_by_ip(dst_ip) {
        cx.note(|| format!("route: {dst_ip} is local pod port {}", out.id));
        // A Service's connection is tracked by its translation already.
        if from_host && !matches!(done, nat::Nat::Opened | nat::Nat::Translated) {
            track_from_outside(cx, &ip);
        }
        (Action::ToPort(out.id), out.mac, t.gateway_mac)
    } else if let (true, Some(h)) = (dst_ip == t.gateway_ip, to_host) {
        cx.note(|| format!("route: {dst_ip} is the node (host port)"));
        (Action::ToPort(h.id), h.mac, t.gateway_mac)
    } else if let Some((id, peer)) = t.peers.route(dst_ip) {
        cx.note(|| {
            format!(
                "route: {dst_ip} is on node {} (VXLAN VNI {} to {}, inner MAC {})",
                peer.name,
                t.vni,
                peer.underlay,
                EthernetAddress(peer.vtep_mac)
            )
        });
        if on_wire_len(&ip, gso_size) > t.overlay_mtu as usize {
            if ip.dont_frag() {
                return frag_needed(t, port, buf, len, t.overlay_mtu);
            }
            return Action::Drop(DropReason::TooBig);
        }
        (
            Action::ToPeer(id),
            EthernetAddress(peer.vtep_mac),
            t.vtep_mac,
        )
    } else if !from_host
        && egress_kind(&ip)
        && t.egress.as_ref().is_some_and(|e| e.translates(t, dst_ip))
        && !answers_from_a_service(t, &ip, done)
        && !answers_the_node(cx, &ip)
    {
        cx.note(|| {
            format!("route: {dst_ip} is outside the cluster: leaves by egress translation, from the node's address")
        });
        // A hop, as through the node's router: the engine sends with the TTL left (so that a
        // traceroute from the pod sees the routers beyond the node).
        if ip.ttl() <= 1 {
            return time_exceeded(cx, port, from_host, buf, len);
        }
        ip.decrement_ttl_incremental();
        return Action::ToEgress;
    } else if let Some(h) = to_host.filter(|_| !t.cluster_nets.iter().any(|n| n.contains(&dst_ip)))
    {
        cx.note(|| format!("route: {dst_ip} is outside the cluster: to the node (host port)"));
        // Anything else goes to the node, which routes it on (as pods behind cni0 use the
        // node as their router).
        (Action::ToPort(h.id), h.mac, t.gateway_mac)
    } else {
        return Action::Drop(DropReason::NoRoute);
    };
    if ip.ttl() <= 1 {
        return time_exceeded(cx, port, from_host, buf, len);
    }
    ip.decrement_ttl_incremental();
    eth.set_src_addr(src_mac);
    eth.set_dst_addr(next_mac);
    action
}

/// Whether a translated packet is a backend's answer, now from a Service address: to a client
/// outside the cluster it goes back the way the client came, through the node (an external
/// address or LoadBalancer IP routed to this node), never to the egress engine.
fn answers_from_a_service(t: &Tables, ip: &Ipv4Packet<&mut [u8]>, done: nat::Nat) -> bool {
    if done != nat::Nat::Translated {
        return false;
    }
    let (sport, _) = nat_ports(ip);
    t.services
        .lookup(ip.src_addr(), ip.protocol().0, sport)
        .is_some()
}

/// The TCP/UDP key and flags of an unfragmented packet.
fn l4_key(ip: &Ipv4Packet<&mut [u8]>) -> Option<(nat::Key, TcpFlags)> {
    if ip.is_fragment() {
        return None;
    }
    let proto = ip.protocol();
    let (sport, dport) = ip.ports()?;
    let flags = if proto == IpProtocol::TCP {
        TcpPacket::new_checked(ip.payload()).ok()?.flags()
    } else if proto == IpProtocol::UDP {
        TcpFlags::empty()
    } else {
        return None;
    };
    let key = nat::Key {
        src: ip.src_addr(),
        dst: ip.dst_addr(),
        sport,
        dport,
        proto: proto.0,
    };
    Some((key, flags))
}

/// With egress translation on, a connection the node opens to a pod from an outside address
/// (a NodePort relay keeping the client's address) is tracked, so that the pod's answers go
/// back through the node that holds it ([`answers_the_node`]) rather than to the egress
/// engine, which would answer them with a RST.
fn track_from_outside(cx: &mut Ctx<'_>, ip: &Ipv4Packet<&mut [u8]>) {
    let t = cx.t;
    let Some(e) = &t.egress else { return };
    if !e.translates(t, ip.src_addr()) {
        return;
    }
    let Some((key, flags)) = l4_key(ip) else {
        return;
    };
    let now = cx.now_ms;
    if cx.ct.touch(&key, now, flags) {
        return;
    }
    let state = if key.proto != IpProtocol::TCP.0 {
        nat::CtState::UdpNew
    } else if flags.contains(TcpFlags::SYN) {
        nat::CtState::SynSent
    } else {
        nat::CtState::Established
    };
    if cx.ct.track(key, state, now) {
        cx.note(|| "a connection from outside through the node: tracked for its answers".into());
    }
}

/// Whether a pod's packet to the outside answers a connection the node opened to it
/// ([`track_from_outside`]).
fn answers_the_node(cx: &mut Ctx<'_>, ip: &Ipv4Packet<&mut [u8]>) -> bool {
    let Some((key, flags)) = l4_key(ip) else {
        return false;
    };
    let reply = cx.ct.touch_reply(&key, cx.now_ms, flags);
    if reply {
        cx.note(|| "an answer to a connection the node opened: not translated".into());
    }
    reply
}

/// Whether the egress engine takes this packet: unfragmented TCP, UDP or ICMP echo request
/// (anything else goes to the node, as without egress translation).
fn egress_kind(ip: &Ipv4Packet<&mut [u8]>) -> bool {
    if ip.is_fragment() {
        return false;
    }
    match ip.protocol() {
        IpProtocol::TCP | IpProtocol::UDP => true,
        IpProtocol::ICMP => Icmpv4Packet::new_checked(ip.payload())
            .is_ok_and(|i| i.msg_type() == Icmpv4Message::ECHO_REQUEST && i.msg_code() == 0),
        _ => false,
    }
}

/// Service translation of a routed packet: a Service's or a tracked connection's packet is
/// translated, and an ICMP error about a translated connection is translated with it.
fn service_nat(cx: &mut Ctx<'_>, ip: &mut Ipv4Packet<&mut [u8]>, csum_partial: bool) -> nat::Nat {
    let t = cx.t;
    // Pods and nodes are inside the cluster: an external address of a policy-Local Service
    // serves them as its ClusterIP would (kube-proxy's short-circuit).
    let in_cluster = |src: Ipv4Addr| {
        t.pod_cidr.contains(&src)
            || t.peers.route(src).is_some()
            || t.cluster_nets.iter().any(|n| n.contains(&src))
    };
    let done = nat::translate_from(
        &t.services,
        cx.ct,
        cx.now_ms,
        ip,
        t.gateway_ip,
        csum_partial,
        in_cluster,
    );
    if done == nat::Nat::None {
        nat::translate_icmp_error(cx.ct, cx.now_ms, ip);
    }
    done
}

/// The largest packet `ip` puts on the wire: itself, or for a super-frame each segment, the
/// headers plus at most `gso_size` bytes.
fn on_wire_len(ip: &Ipv4Packet<&mut [u8]>, gso_size: u16) -> usize {
    if gso_size == 0 {
        return ip.total_len() as usize;
    }
    let l4_hdr = if ip.protocol() == IpProtocol::TCP {
        // The data offset as it is, even where a broken one says less than 20 bytes.
        ip.payload().get(12).map_or(20, |b| usize::from(b >> 4) * 4)
    } else {
        UdpPacket::<&[u8]>::HEADER_LEN
    };
    ip.header_len() as usize + l4_hdr + gso_size as usize
}

/// Writes a complete UDP/IPv4 frame from `server:53`-style `from` to `to` carrying `payload`,
/// addressed from the gateway MAC to `to_mac`; returns its length. For answers the switch
/// makes itself (DNS). `out` must hold 42 + payload bytes.
pub fn udp_frame(
    t: &Tables,
    to_mac: EthernetAddress,
    from: (Ipv4Addr, u16),
    to: (Ipv4Addr, u16),
    payload: &[u8],
    out: &mut [u8],
) -> Option<usize> {
    let udp = UdpRepr {
        src_port: from.1,
        dst_port: to.1,
        payload_len: payload.len(),
    };
    let ip = own_ipv4((from.0, to.0), IpProtocol::UDP, udp.buffer_len(), true);
    u16::try_from(ip.buffer_len()).ok()?;
    let (l4, len) = emit_own_ipv4(t, to_mac, &ip, out)?;
    l4[udp.header_len()..].copy_from_slice(payload);
    let csum = L4Checksum::V4(from.0, to.0);
    udp.emit(&mut UdpPacket::new_unchecked(l4), csum);
    Some(len)
}

/// The IPv4 header of a packet the switch sends itself, `(from, to)`.
fn own_ipv4(
    (src_addr, dst_addr): (Ipv4Addr, Ipv4Addr),
    protocol: IpProtocol,
    payload_len: usize,
    dont_frag: bool,
) -> Ipv4Repr {
    Ipv4Repr {
        src_addr,
        dst_addr,
        protocol,
        payload_len,
        ttl: 64,
        dont_frag,
    }
}

/// Writes the Ethernet header (from the gateway MAC to `to_mac`) and the IPv4 header `ip` of a
/// packet the switch sends itself at the start of `buf`. Returns the packet's L4 part, right
/// after the headers and exactly as long as `ip` says, and the frame's length; `None`, having
/// written nothing, where `buf` is too short.
fn emit_own_ipv4<'a>(
    t: &Tables,
    to_mac: EthernetAddress,
    ip: &Ipv4Repr,
    buf: &'a mut [u8],
) -> Option<(&'a mut [u8], usize)> {
    let len = ETHERNET_HEADER_LEN + ip.buffer_len();
    let frame = buf.get_mut(..len)?;
    let eth = EthernetRepr {
        src_addr: t.gateway_mac,
        dst_addr: to_mac,
        ethertype: EtherType::IPV4,
    };
    eth.emit(&mut EthernetFrame::new_unchecked(&mut *frame));
    let ip_buf = &mut frame[ETHERNET_HEADER_LEN..];
    ip.emit(&mut Ipv4Packet::new_unchecked(&mut *ip_buf));
    Some((&mut ip_buf[ip.header_len()..], len))
}

/// The VXLAN header for what this node sends.
pub fn encap_header(t: &Tables) -> [u8; vxlan::HEADER_LEN] {
    let mut h = [0u8; vxlan::HEADER_LEN];
    vxlan::emit_header(&mut h, t.vni);
    h
}

/// The VXLAN header for `frame` (a pod's frame, its virtio-net header `vnet`) to `peer`, and
/// whether the frame's TCP/UDP checksum may stay partial on the way (remote checksum offload:
/// the peer takes it and the frame's checksum was offloaded to us, at the usual place). When
/// it may, the segments of a super-frame carry their pseudo-header sums and a single frame is
/// sent as it is, where otherwise each segment's payload is summed here and again at the peer.
pub fn encap_for(
    t: &Tables,
    peer: &overlay::Peer,
    vnet: &crate::wire::VirtioNetHdr,
    frame: &[u8],
) -> ([u8; vxlan::HEADER_LEN], bool) {
    let mut h = encap_header(t);
    if !peer.remote_csum || !vnet.needs_csum() {
        return (h, false);
    }
    let Some(rco) = l4_checksum_at(frame) else {
        return (h, false);
    };
    let at_l4 = vnet.csum_start == rco.start && vnet.csum_offset == rco.offset;
    if !(vnet.is_gso() || at_l4) || vxlan::emit_header_rco(&mut h, t.vni, rco).is_none() {
        return (encap_header(t), false);
    }
    (h, true)
}

/// Where the TCP/UDP checksum of an unfragmented IPv4 frame is.
fn l4_checksum_at(frame: &[u8]) -> Option<Rco> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EtherType::IPV4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    if ip.is_fragment() {
        return None;
    }
    let offset = match ip.protocol() {
        IpProtocol::TCP => vxlan::TCP_CSUM_OFFSET,
        IpProtocol::UDP => vxlan::UDP_CSUM_OFFSET,
        _ => return None,
    };
    // The whole L4 header must be there for the checksum field to be.
    let min = if offset == vxlan::TCP_CSUM_OFFSET {
        20
    } else {
        8
    };
    if ip.payload().len() < min {
        return None;
    }
    Some(Rco {
        start: ETHERNET_HEADER_LEN as u16 + u16::from(ip.header_len()),
        offset,
    })
}

/// Accepts a received VXLAN datagram (header + inner frame) or says why not: it must come
/// from a peer's underlay address and carry our VNI. Also says where the inner checksum is
/// when the sender left it partial (RCO).
pub fn decap(
    t: &Tables,
    from: IpAddr,
    datagram: &[u8],
) -> Result<(PeerId, Option<Rco>), DropReason> {
    let Some((peer, _)) = t.peers.by_underlay(from) else {
        return Err(DropReason::UnknownPeer);
    };
    match VxlanHeader::new_checked(datagram) {
        Ok(h) if h.vni() == t.vni => Ok((peer, h.rco())),
        Ok(_) => Err(DropReason::WrongVni),
        Err(_) => Err(DropReason::VxlanMalformed),
    }
}

/// A frame decapsulated from VXLAN sent by `peer`: routed to the local pod it is for. `rco`
/// is where its TCP/UDP checksum is when the sender left it partial; it must be exactly where
/// the frame's L4 checksum is, or the frame is dropped (the frame then goes to the pod marked
/// NEEDS_CSUM, and a wrong place would have the pod trust unchecked bytes).
pub fn handle_underlay(
    cx: &mut Ctx<'_>,
    peer: PeerId,
    frame: &mut [u8],
    rco: Option<Rco>,
) -> Action {
    let t = cx.t;
    if rco.is_some() && rco != l4_checksum_at(frame) {
        return Action::Drop(DropReason::VxlanBadRco);
    }
    let Ok(mut eth) = EthernetFrame::new_checked(&mut *frame) else {
        return Action::Drop(DropReason::VxlanMalformed);
    };
    if eth.ethertype() != EtherType::IPV4 {
        return Action::Drop(DropReason::VxlanNotIpv4);
    }
    if eth.dst_addr() != t.vtep_mac {
        return Action::Drop(DropReason::VxlanNotForUs);
    }
    let Ok(mut ip) = Ipv4Packet::new_checked(eth.payload_mut()) else {
        return Action::Drop(DropReason::VxlanMalformed);
    };
    // A peer speaks for its pods and for itself: a reply from its node's own address (to a pod
    // here that reached that node, or a NodePort on it) crosses the overlay too, as flannel's
    // route to this node's pod CIDR sends it.
    let src = ip.src_addr();
    let from_peer = t.peers.get(peer).is_some_and(|p| {
        p.underlay == IpAddr::V4(src) || p.pod_cidrs.iter().any(|c| c.contains(&src))
    });
    if !from_peer {
        return Action::Drop(DropReason::VxlanSpoofedSrc);
    }
    let partial = rco.is_some();
    if !partial {
        complete_partial_checksum(&mut ip);
    }
    // Replies from a remote backend to a client here are translated back here.
    let done = service_nat(cx, &mut ip, partial);
    if done == nat::Nat::Refused {
        return Action::Drop(DropReason::ConntrackRefused);
    }
    let dst = ip.dst_addr();
    let out = match (t.port_by_ip(dst), &t.host) {
        (Some(p), _) => p,
        (None, Some(h)) if dst == t.gateway_ip => h,
        // An answer to a client outside the cluster that reached a Service through this node
        // (seen by the backend as this node): back to it through the node.
        (None, Some(h)) if answers_from_a_service(t, &ip, done) => h,
        _ => return Action::Drop(DropReason::NoRoute),
    };
    if t.policy.is_some() {
        // A pod of another node: its ingress was judged there, this pod's here.
        let src = policy::From::Elsewhere;
        if let Err(why) = policy::admit(cx, src, t.port_by_ip(dst), &ip, done) {
            return Action::Drop(why);
        }
    }
    if ip.ttl() <= 1 {
        return Action::Drop(DropReason::TtlExpired);
    }
    ip.decrement_ttl_incremental();
    let (id, mac) = (out.id, out.mac);
    eth.set_src_addr(t.gateway_mac);
    eth.set_dst_addr(mac);
    Action::ToPort(id)
}

/// Completes an inner TCP/UDP checksum that a kernel peer left partial.
///
/// A kernel VXLAN peer whose underlay device offloads checksums (a veth, as between kind
/// nodes) puts inner segments on the wire with only the pseudo-header sum in the checksum field:
/// no hardware ever finished it. That value is recognisable (it equals the folded
/// pseudo-header sum) and costs nothing to test, so only such segments pay for a full sum;
/// any other value is left for the pod's stack to judge. (If a complete checksum happened to
/// equal it, recomputing writes the same value.)
fn complete_partial_checksum(ip: &mut Ipv4Packet<&mut [u8]>) {
    use crate::wire::checksum;
    if ip.is_fragment() {
        return;
    }
    let (src, dst, proto) = (ip.src_addr(), ip.dst_addr(), ip.protocol());
    let l4_len = ip.payload().len() as u16;
    let partial = checksum::fold(checksum::pseudo_header_v4(src, dst, proto.0, l4_len));
    if proto == IpProtocol::TCP {
        if let Ok(mut tcp) = TcpPacket::new_checked(ip.payload_mut()) {
            if tcp.checksum() == partial {
                tcp.fill_checksum(src, dst);
            }
        }
    } else if proto == IpProtocol::UDP {
        if let Ok(mut udp) = UdpPacket::new_checked(ip.payload_mut()) {
            if udp.checksum() == partial && partial != 0 {
                udp.fill_checksum(src, dst);
            }
        }
    }
}

/// Turns an IPv4 packet that does not fit the path into an ICMP "fragmentation needed" from
/// the gateway back to its sender (RFC 1191), in place.
fn frag_needed(t: &Tables, port: &PortEntry, buf: &mut [u8], len: usize, mtu: u16) -> Action {
    icmp_error(
        t,
        port,
        buf,
        len,
        t.gateway_ip,
        (Icmpv4Message::DST_UNREACHABLE, icmp_code::FRAG_NEEDED, mtu),
    )
}

/// A packet whose TTL ran out at the switch: a pod's gets "time exceeded" from the gateway, as a
/// router answers (RFC 1812 5.3.1; what makes the switch the first hop of a traceroute).
/// None is sent about an ICMP error or a fragment after the first (RFC 1812 4.3.2.7), nor to
/// the node's port, whose packets come from the addresses it routes for; those are dropped.
fn time_exceeded(
    cx: &mut Ctx<'_>,
    port: &PortEntry,
    from_host: bool,
    buf: &mut [u8],
    len: usize,
) -> Action {
    let t = cx.t;
    let answer = !from_host
        && buf
            .get(ETHERNET_HEADER_LEN..len)
            .and_then(|p| Ipv4Packet::new_checked(p).ok())
            .is_some_and(|ip| ip.frag_offset() == 0 && !is_icmp_error(&ip));
    if !answer {
        return Action::Drop(DropReason::TtlExpired);
    }
    cx.note(|| "TTL ran out here: answered with time exceeded from the gateway".to_string());
    let msg = (Icmpv4Message::TIME_EXCEEDED, icmp_code::TTL_EXPIRED, 0);
    icmp_error(t, port, buf, len, t.gateway_ip, msg)
}

/// Whether `ip` carries an ICMP error ([`Icmpv4Message::is_error`]; a message too short to
/// say counts as one), about which no error is sent.
fn is_icmp_error(ip: &Ipv4Packet<&[u8]>) -> bool {
    ip.protocol() == IpProtocol::ICMP
        && ip
            .payload()
            .first()
            .is_none_or(|&kind| Icmpv4Message(kind).is_error())
}

/// A Service with no endpoint refuses at once, as kube-proxy does: TCP gets a RST, anything
/// else an ICMP port unreachable, both from the Service address.
fn reject(t: &Tables, port: &PortEntry, buf: &mut [u8], len: usize) -> Action {
    let Some(packet) = buf.get(ETHERNET_HEADER_LEN..len) else {
        return Action::Drop(DropReason::Malformed);
    };
    let Ok(ip) = Ipv4Packet::new_checked(packet) else {
        return Action::Drop(DropReason::Malformed);
    };
    let vip = ip.dst_addr();
    if ip.protocol() != IpProtocol::TCP {
        let msg = (
            Icmpv4Message::DST_UNREACHABLE,
            icmp_code::PORT_UNREACHABLE,
            0,
        );
        return icmp_error(t, port, buf, len, vip, msg);
    }
    let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
        return Action::Drop(DropReason::Malformed);
    };
    let Some(rst) = rst_for(&tcp) else {
        return Action::Drop(DropReason::ServiceRejected);
    };
    let client = ip.src_addr();
    let ip = own_ipv4((vip, client), IpProtocol::TCP, rst.buffer_len(), true);
    let Some((l4, len)) = emit_own_ipv4(t, port.mac, &ip, buf) else {
        return Action::Drop(DropReason::Malformed);
    };
    rst.emit(
        &mut TcpPacket::new_unchecked(l4),
        L4Checksum::V4(vip, client),
    );
    Action::Reply(len)
}

/// The RST that answers `tcp` (RFC 9293 3.10.7.1: an ACK with its number, anything else with
/// an ACK of it); none for a RST.
fn rst_for(tcp: &TcpPacket<&[u8]>) -> Option<TcpRepr> {
    let flags = tcp.flags();
    if flags.contains(TcpFlags::RST) {
        return None;
    }
    let seg_len = tcp.payload().len() as u32
        + u32::from(flags.contains(TcpFlags::SYN))
        + u32::from(flags.contains(TcpFlags::FIN));
    let (seq_number, ack_number, flags) = if flags.contains(TcpFlags::ACK) {
        (tcp.ack_number(), 0, TcpFlags::RST)
    } else {
        let ack = tcp.seq_number().wrapping_add(seg_len);
        (0, ack, TcpFlags::RST | TcpFlags::ACK)
    };
    Some(TcpRepr {
        src_port: tcp.dst_port(),
        dst_port: tcp.src_port(),
        seq_number,
        ack_number,
        flags,
        window_len: 0,
        payload_len: 0,
    })
}

/// Turns the packet in `frame` into an ICMP error about it from `from` back to its sender, in
/// place, quoting its header and first 8 payload bytes.
fn icmp_error(
    t: &Tables,
    port: &PortEntry,
    buf: &mut [u8],
    len: usize,
    from: Ipv4Addr,
    (msg, code, mtu): (Icmpv4Message, u8, u16),
) -> Action {
    let Some(packet) = buf.get(ETHERNET_HEADER_LEN..len) else {
        return Action::Drop(DropReason::Malformed);
    };
    let Ok(orig) = Ipv4Packet::new_checked(packet) else {
        return Action::Drop(DropReason::Malformed);
    };
    // Quote the original header and the first 8 bytes of its payload.
    let quote_len = (orig.header_len() as usize + 8).min(orig.total_len() as usize);
    let mut quote = [0u8; 68];
    quote[..quote_len].copy_from_slice(&packet[..quote_len]);
    let icmp = Icmpv4Repr {
        msg_type: msg,
        msg_code: code,
        rest_of_header: u32::from(mtu),
        payload_len: quote_len,
    };
    let ip = own_ipv4((from, port.ip), IpProtocol::ICMP, icmp.buffer_len(), false);
    let Some((l4, len)) = emit_own_ipv4(t, port.mac, &ip, buf) else {
        return Action::Drop(DropReason::TooBig);
    };
    l4[icmp.header_len()..].copy_from_slice(&quote[..quote_len]);
    icmp.emit(&mut Icmpv4Packet::new_unchecked(l4));
    Action::Reply(len)
}

/// Traffic for the gateway address itself: ICMP echo is answered, the rest is not served yet.
fn gateway_v4(t: &Tables, port: &PortEntry, eth: &mut EthernetFrame<&mut [u8]>) -> Action {
    let Ok(mut ip) = Ipv4Packet::new_checked(eth.payload_mut()) else {
        return Action::Drop(DropReason::Malformed);
    };
    if ip.protocol() != IpProtocol::ICMP || ip.more_frags() || ip.frag_offset() != 0 {
        return Action::Drop(DropReason::GatewayUnsupported);
    }
    {
        let Ok(mut icmp) = Icmpv4Packet::new_checked(ip.payload_mut()) else {
            return Action::Drop(DropReason::Malformed);
        };
        if icmp.msg_type() != Icmpv4Message::ECHO_REQUEST || icmp.msg_code() != 0 {
            return Action::Drop(DropReason::GatewayUnsupported);
        }
        icmp.set_msg_type(Icmpv4Message::ECHO_REPLY);
        icmp.fill_checksum();
    }
    ip.set_src_addr(t.gateway_ip);
    ip.set_dst_addr(port.ip);
    ip.set_ttl(64);
    ip.fill_checksum();
    let len = ETHERNET_HEADER_LEN + ip.total_len() as usize;
    eth.set_dst_addr(port.mac);
    eth.set_src_addr(t.gateway_mac);
    Action::Reply(len)
}

#[cfg(test)]
mod tests;
