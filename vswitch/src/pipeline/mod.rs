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
//! 4. IPv4 to the gateway MAC is routed: to a local pod (MACs rewritten, TTL decremented), or an
//!    ICMP echo to the gateway address itself is answered.
//!
//! Anything else is dropped with a reason; every reason has a counter.

pub mod tables;

pub use tables::{PortEntry, Tables};

use crate::wire::{
    ArpOperation, ArpPacket, EtherType, EthernetFrame, Icmpv4Message, Icmpv4Packet, IpProtocol,
    Ipv4Packet,
};

/// A switch port. Stable for the life of an attachment.
pub type PortId = u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send the (possibly rewritten) frame out of this port.
    ToPort(PortId),
    /// The frame was turned into a reply in place: send it back out of the ingress port.
    Reply,
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
    PortGone => "port_gone",
    TxError => "tx_error",
}

/// Decides what happens to `frame` (an Ethernet frame, no virtio-net header) that arrived on
/// port `ingress`.
pub fn handle(t: &Tables, ingress: PortId, frame: &mut [u8]) -> Action {
    let Some(port) = t.port(ingress) else {
        return Action::Drop(DropReason::UnknownPort);
    };
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
                return route_v4(t, port, &mut eth);
            }
            if !dst.is_unicast() {
                return Action::Drop(DropReason::Multicast);
            }
            let Ok(ip) = Ipv4Packet::new_checked(eth.payload_mut()) else {
                return Action::Drop(DropReason::Malformed);
            };
            if ip.src_addr() != port.ip {
                return Action::Drop(DropReason::SpoofedIp);
            }
            match t.port_by_mac(dst) {
                Some(p) if p.id == ingress => Action::Drop(DropReason::Hairpin),
                Some(p) => Action::ToPort(p.id),
                None => Action::Drop(DropReason::UnknownMac),
            }
        }
        EtherType::IPV6 => Action::Drop(DropReason::Ipv6),
        _ => Action::Drop(DropReason::UnsupportedEthertype),
    }
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
    arp.set_operation(ArpOperation::REPLY);
    arp.set_target_hardware_addr(port.mac);
    arp.set_target_protocol_addr(sender_ip);
    arp.set_sender_hardware_addr(answer);
    arp.set_sender_protocol_addr(target);
    eth.set_dst_addr(port.mac);
    eth.set_src_addr(answer);
    Action::Reply
}

fn route_v4(t: &Tables, port: &PortEntry, eth: &mut EthernetFrame<&mut [u8]>) -> Action {
    let Ok(mut ip) = Ipv4Packet::new_checked(eth.payload_mut()) else {
        return Action::Drop(DropReason::Malformed);
    };
    if ip.src_addr() != port.ip {
        return Action::Drop(DropReason::SpoofedIp);
    }
    let dst_ip = ip.dst_addr();
    if dst_ip == t.gateway_ip {
        return gateway_v4(t, port, eth);
    }
    let Some(out) = t.port_by_ip(dst_ip) else {
        return Action::Drop(DropReason::NoRoute);
    };
    if ip.ttl() <= 1 {
        return Action::Drop(DropReason::TtlExpired);
    }
    ip.decrement_ttl_incremental();
    let (out_id, out_mac) = (out.id, out.mac);
    eth.set_src_addr(t.gateway_mac);
    eth.set_dst_addr(out_mac);
    Action::ToPort(out_id)
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
    eth.set_dst_addr(port.mac);
    eth.set_src_addr(t.gateway_mac);
    Action::Reply
}

#[cfg(test)]
mod tests;
