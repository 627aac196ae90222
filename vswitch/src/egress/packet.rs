//! The pure parts of egress translation: which flow a pod's packet belongs to, and the reply
//! packets the engine builds itself (UDP, ICMP echo and the ICMP errors the outside reported
//! about a pod's flow; TCP's are smoltcp's).

use std::net::{Ipv4Addr, SocketAddrV4};

use crate::wire::icmpv4::code;
use crate::wire::{
    Icmpv4Message, Icmpv4Packet, Icmpv4Repr, IpProtocol, Ipv4Packet, Ipv4Repr, L4Checksum,
    TcpFlags, TcpPacket, UdpPacket, UdpRepr,
};

/// A pod's side and the outside's side of a translated flow. For ICMP echo the "ports" are the
/// pod's echo identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub pod: SocketAddrV4,
    pub dst: SocketAddrV4,
}

/// What a pod's IPv4 packet is to the egress engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A TCP segment; `syn` when it opens a connection (SYN without ACK).
    Tcp { key: FlowKey, syn: bool, rst: bool },
    /// A UDP datagram; its payload at `payload` in the IP packet; `df` when the pod set
    /// "don't fragment" on it.
    Udp {
        key: FlowKey,
        payload: (usize, usize),
        df: bool,
    },
    /// An ICMP echo request; the ICMP message at `msg` in the IP packet; `df` as for UDP.
    Echo {
        key: FlowKey,
        msg: (usize, usize),
        df: bool,
    },
}

/// Classifies an unfragmented IPv4 packet; `None` for anything else (malformed, fragments,
/// other protocols), which the engine drops and counts. Never panics.
pub fn classify(packet: &[u8]) -> Option<Kind> {
    let ip = Ipv4Packet::new_checked(packet).ok()?;
    if ip.is_fragment() {
        return None;
    }
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let hl = usize::from(ip.header_len());
    let end = usize::from(ip.total_len());
    let key = |sp, dp| FlowKey {
        pod: SocketAddrV4::new(src, sp),
        dst: SocketAddrV4::new(dst, dp),
    };
    match ip.protocol() {
        IpProtocol::TCP => {
            let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
            let f = tcp.flags();
            Some(Kind::Tcp {
                key: key(tcp.src_port(), tcp.dst_port()),
                syn: f.opens(),
                rst: f.contains(TcpFlags::RST),
            })
        }
        IpProtocol::UDP => {
            let udp = UdpPacket::new_checked(ip.payload()).ok()?;
            let (sp, dp) = ip.ports()?;
            let len = usize::from(udp.len()).clamp(8, end - hl);
            Some(Kind::Udp {
                key: key(sp, dp),
                payload: (hl + 8, hl + len),
                df: ip.dont_frag(),
            })
        }
        IpProtocol::ICMP => {
            let icmp = Icmpv4Packet::new_checked(ip.payload()).ok()?;
            if icmp.msg_type() != Icmpv4Message::ECHO_REQUEST || icmp.msg_code() != 0 {
                return None;
            }
            let id = icmp.echo_ident();
            Some(Kind::Echo {
                key: key(id, id),
                msg: (hl, end),
                df: ip.dont_frag(),
            })
        }
        _ => None,
    }
}

const IP_HDR: usize = 20;

/// Writes an IPv4/UDP packet from `from` to `to` carrying `payload` into `out`; its length, or
/// `None` when it does not fit.
pub fn udp_packet(
    from: SocketAddrV4,
    to: SocketAddrV4,
    payload: &[u8],
    out: &mut [u8],
) -> Option<usize> {
    let udp = UdpRepr {
        src_port: from.port(),
        dst_port: to.port(),
        payload_len: payload.len(),
    };
    let len = IP_HDR + udp.buffer_len();
    if len > usize::from(u16::MAX) || out.len() < len {
        return None;
    }
    let ip = own_ip(*from.ip(), *to.ip(), IpProtocol::UDP, udp.buffer_len());
    ip.emit(&mut Ipv4Packet::new_unchecked(&mut out[..len]));
    let l4 = &mut out[IP_HDR..len];
    l4[8..].copy_from_slice(payload);
    udp.emit(
        &mut UdpPacket::new_unchecked(l4),
        L4Checksum::V4(*from.ip(), *to.ip()),
    );
    Some(len)
}

/// Writes the IPv4 packet of an ICMP echo reply from `from` to the pod at `to`: `msg` is the
/// reply as the node's ICMP socket received it, whose identifier (the socket's) becomes the
/// pod's `ident` again. `None` when `msg` is no echo reply or does not fit.
pub fn echo_reply(
    from: Ipv4Addr,
    to: Ipv4Addr,
    ident: u16,
    msg: &[u8],
    out: &mut [u8],
) -> Option<usize> {
    let len = IP_HDR + msg.len();
    if len > usize::from(u16::MAX) || out.len() < len {
        return None;
    }
    let icmp = Icmpv4Packet::new_checked(msg).ok()?;
    if icmp.msg_type() != Icmpv4Message::ECHO_REPLY {
        return None;
    }
    let ip = own_ip(from, to, IpProtocol::ICMP, msg.len());
    ip.emit(&mut Ipv4Packet::new_unchecked(&mut out[..len]));
    out[IP_HDR..len].copy_from_slice(msg);
    let mut icmp = Icmpv4Packet::new_unchecked(&mut out[IP_HDR..len]);
    icmp.set_echo_ident(ident);
    icmp.fill_checksum();
    Some(len)
}

/// An ICMP error about a pod's flow, as the node's socket learned it (from the outside, in the
/// error queue, or from its own stack), to be passed on to the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpError {
    pub msg_type: Icmpv4Message,
    pub code: u8,
    /// The next-hop MTU of a "fragmentation needed" (destination unreachable, code 4); 0 for
    /// every other error.
    pub mtu: u16,
}

impl IcmpError {
    /// Destination unreachable with `code` (not fragmentation needed: see [`Self::frag_needed`]).
    pub fn unreachable(code: u8) -> IcmpError {
        IcmpError {
            msg_type: Icmpv4Message::DST_UNREACHABLE,
            code,
            mtu: 0,
        }
    }

    /// Fragmentation needed and DF set, with the next hop's MTU.
    pub fn frag_needed(mtu: u16) -> IcmpError {
        IcmpError {
            msg_type: Icmpv4Message::DST_UNREACHABLE,
            code: code::FRAG_NEEDED,
            mtu,
        }
    }

    /// The error an ICMP message of `msg_type`/`code` reported to the node's socket (its
    /// `sock_extended_err`'s `ee_type`, `ee_code`, `ee_info`) is to the pod, or `None` when it is
    /// none to pass on: destination unreachable (any code; `info` is the next-hop MTU of
    /// fragmentation needed) and time exceeded are; redirects, source quench and parameter
    /// problems (whose pointer is into the node's header, not the pod's) are not.
    pub fn from_reported(msg_type: u8, code: u8, info: u32) -> Option<IcmpError> {
        match Icmpv4Message(msg_type) {
            Icmpv4Message::DST_UNREACHABLE if code == code::FRAG_NEEDED => Some(
                IcmpError::frag_needed(u16::try_from(info).unwrap_or(u16::MAX)),
            ),
            t @ (Icmpv4Message::DST_UNREACHABLE | Icmpv4Message::TIME_EXCEEDED) => {
                Some(IcmpError {
                    msg_type: t,
                    code,
                    mtu: 0,
                })
            }
            _ => None,
        }
    }

    pub fn is_frag_needed(self) -> bool {
        self.msg_type == Icmpv4Message::DST_UNREACHABLE && self.code == code::FRAG_NEEDED
    }
}

/// Writes the ICMP error `err` from `from` to the pod at `to`, quoting the start of the pod's
/// packet (`orig`: its IPv4 header and the 8 bytes after it, RFC 792), as the node's socket was
/// told by the outside (or its own routing). A fragmentation needed carries its MTU in the
/// second header word (RFC 1191). `None` when `orig` is no IPv4 packet or it does not fit.
pub fn icmp_error(
    from: Ipv4Addr,
    to: Ipv4Addr,
    err: IcmpError,
    orig: &[u8],
    out: &mut [u8],
) -> Option<usize> {
    let ip = Ipv4Packet::new_checked(orig).ok()?;
    let quote = &orig[..(usize::from(ip.header_len()) + 8).min(orig.len())];
    let icmp = Icmpv4Repr {
        msg_type: err.msg_type,
        msg_code: err.code,
        rest_of_header: if err.is_frag_needed() {
            u32::from(err.mtu)
        } else {
            0
        },
        payload_len: quote.len(),
    };
    let len = IP_HDR + icmp.buffer_len();
    if out.len() < len {
        return None;
    }
    own_ip(from, to, IpProtocol::ICMP, icmp.buffer_len())
        .emit(&mut Ipv4Packet::new_unchecked(&mut out[..len]));
    let l4 = &mut out[IP_HDR..len];
    l4[icmp.header_len()..].copy_from_slice(quote);
    icmp.emit(&mut Icmpv4Packet::new_unchecked(l4));
    Some(len)
}

/// Writes the start of an ICMP echo request from `pod` to `dst` with identifier `ident` and
/// sequence number `seq` (its IPv4 header and ICMP header): what an error about the pod's echo
/// quotes. `None` when it does not fit.
pub fn echo_request_header(
    pod: Ipv4Addr,
    dst: Ipv4Addr,
    ident: u16,
    seq: u16,
    out: &mut [u8],
) -> Option<usize> {
    let icmp = Icmpv4Repr {
        msg_type: Icmpv4Message::ECHO_REQUEST,
        msg_code: 0,
        rest_of_header: (u32::from(ident) << 16) | u32::from(seq),
        payload_len: 0,
    };
    let len = IP_HDR + icmp.buffer_len();
    if out.len() < len {
        return None;
    }
    own_ip(pod, dst, IpProtocol::ICMP, icmp.buffer_len())
        .emit(&mut Ipv4Packet::new_unchecked(&mut out[..len]));
    icmp.emit(&mut Icmpv4Packet::new_unchecked(&mut out[IP_HDR..len]));
    Some(len)
}

fn own_ip(src_addr: Ipv4Addr, dst_addr: Ipv4Addr, protocol: IpProtocol, len: usize) -> Ipv4Repr {
    Ipv4Repr {
        src_addr,
        dst_addr,
        protocol,
        payload_len: len,
        ttl: 64,
        dont_frag: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn etherparse_ipv4(b: &[u8]) -> etherparse::SlicedPacket<'_> {
        etherparse::SlicedPacket::from_ip(b).expect("a valid IPv4 packet")
    }

    #[test]
    fn a_udp_reply_is_a_valid_packet_to_the_pod() {
        let from: SocketAddrV4 = "203.0.113.5:53".parse().unwrap();
        let to: SocketAddrV4 = "10.244.1.2:40000".parse().unwrap();
        let mut out = [0u8; 128];
        let n = udp_packet(from, to, b"hello", &mut out).unwrap();
        assert_eq!(n, 20 + 8 + 5);
        let p = etherparse_ipv4(&out[..n]);
        let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
            panic!("not IPv4")
        };
        assert_eq!(ip.header().source_addr(), *from.ip());
        assert_eq!(ip.header().destination_addr(), *to.ip());
        let Some(etherparse::TransportSlice::Udp(udp)) = &p.transport else {
            panic!("not UDP")
        };
        assert_eq!((udp.source_port(), udp.destination_port()), (53, 40000));
        assert_eq!(udp.payload(), b"hello");
        let ipv = Ipv4Packet::new_checked(&out[..n]).unwrap();
        assert!(ipv.verify_checksum());
        let u = UdpPacket::new_checked(ipv.payload()).unwrap();
        assert!(u.verify_checksum(*from.ip(), *to.ip()));
        // And the flow it answers is the pod's.
        let mut q = [0u8; 128];
        let n = udp_packet(to, from, b"q", &mut q).unwrap();
        match classify(&q[..n]) {
            Some(Kind::Udp { key, payload, df }) => {
                assert_eq!(key, FlowKey { pod: to, dst: from });
                assert!(df, "the engine's own packets carry DF");
                assert_eq!(&q[payload.0..payload.1], b"q");
            }
            other => panic!("{other:?}"),
        }
        drop(p);
        assert!(
            udp_packet(from, to, &[0; 200], &mut out).is_none(),
            "too small"
        );
    }

    #[test]
    fn an_echo_reply_gets_the_pods_identifier_back() {
        // What the node's ICMP socket hands over: type 0, its own identifier 777.
        let mut msg = [0u8, 0, 0, 0, 0x03, 0x09, 0, 7, b'p', b'i', b'n', b'g'];
        Icmpv4Packet::new_unchecked(&mut msg[..]).fill_checksum();
        let mut out = [0u8; 64];
        let (from, to) = (Ipv4Addr::new(203, 0, 113, 5), Ipv4Addr::new(10, 244, 1, 2));
        let n = echo_reply(from, to, 0x1234, &msg, &mut out).unwrap();
        let ip = Ipv4Packet::new_checked(&out[..n]).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!((ip.src_addr(), ip.dst_addr()), (from, to));
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert_eq!(icmp.echo_ident(), 0x1234);
        assert_eq!(icmp.echo_seq_no(), 7);
        assert!(icmp.verify_checksum());
        assert_eq!(icmp.data(), b"ping");
        // A request is no reply.
        msg[0] = 8;
        assert!(echo_reply(from, to, 1, &msg, &mut out).is_none());
    }

    #[test]
    fn an_unreachable_quotes_the_pods_packet() {
        let pod: SocketAddrV4 = "10.244.1.2:40000".parse().unwrap();
        let dst: SocketAddrV4 = "203.0.113.5:9999".parse().unwrap();
        let mut orig = [0u8; 64];
        let n = udp_packet(pod, dst, b"payload", &mut orig).unwrap();
        let mut out = [0u8; 128];
        let err = IcmpError::unreachable(code::PORT_UNREACHABLE);
        let len = icmp_error(*dst.ip(), *pod.ip(), err, &orig[..n], &mut out).unwrap();
        assert_eq!(len, 20 + 8 + 28);
        let ip = Ipv4Packet::new_checked(&out[..len]).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!((ip.src_addr(), ip.dst_addr()), (*dst.ip(), *pod.ip()));
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum());
        assert_eq!(
            (icmp.msg_type(), icmp.msg_code()),
            (Icmpv4Message::DST_UNREACHABLE, 3)
        );
        assert_eq!(icmp.rest_of_header(), 0);
        assert_eq!(icmp.data(), &orig[..28]);
        assert!(icmp_error(*dst.ip(), *pod.ip(), err, &orig[..10], &mut out).is_none());
        assert!(
            icmp_error(*dst.ip(), *pod.ip(), err, &orig[..n], &mut out[..55]).is_none(),
            "too small"
        );
    }

    #[test]
    fn a_frag_needed_carries_the_mtu_and_quotes_the_pods_own_header() {
        // The pod's 1400-byte datagram with DF, from its address and port to the destination.
        let pod: SocketAddrV4 = "10.244.1.2:40000".parse().unwrap();
        let dst: SocketAddrV4 = "198.51.100.2:9000".parse().unwrap();
        let mut orig = vec![0u8; 1400];
        let n = udp_packet(pod, dst, &[7u8; 1372], &mut orig).unwrap();
        assert_eq!(n, 1400);
        let router = Ipv4Addr::new(192, 168, 100, 250);
        let mut out = [0u8; 128];
        let err = IcmpError::frag_needed(1280);
        let len = icmp_error(router, *pod.ip(), err, &orig[..n], &mut out).unwrap();
        assert_eq!(len, 20 + 8 + 28);
        let ip = Ipv4Packet::new_checked(&out[..len]).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!((ip.src_addr(), ip.dst_addr()), (router, *pod.ip()));
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum());
        assert_eq!(
            (icmp.msg_type(), icmp.msg_code(), icmp.next_hop_mtu()),
            (Icmpv4Message::DST_UNREACHABLE, code::FRAG_NEEDED, 1280)
        );
        // The quote is the pod's header as it sent it: its total length (so it is no whole
        // packet), DF, its ports.
        assert!(Ipv4Packet::new_checked(icmp.data()).is_err());
        let quoted = Ipv4Packet::new_unchecked(icmp.data());
        assert_eq!(
            (quoted.src_addr(), quoted.dst_addr()),
            (*pod.ip(), *dst.ip())
        );
        assert_eq!(quoted.total_len(), 1400);
        assert!(quoted.dont_frag());
        assert_eq!(icmp.data()[20..24], [0x9c, 0x40, 0x23, 0x28]);
        // And an independent parser reads it the same.
        let p = etherparse_ipv4(&out[..len]);
        let Some(etherparse::TransportSlice::Icmpv4(e)) = &p.transport else {
            panic!("not ICMP")
        };
        assert_eq!(
            e.icmp_type(),
            etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: 1280
                }
            )
        );
    }

    #[test]
    fn what_the_node_was_told_is_what_the_pod_is_told() {
        assert_eq!(
            IcmpError::from_reported(3, 4, 1280),
            Some(IcmpError::frag_needed(1280))
        );
        assert_eq!(
            IcmpError::from_reported(3, 4, 70_000),
            Some(IcmpError::frag_needed(u16::MAX))
        );
        for c in [0, 1, 3, 10, 13] {
            let e = IcmpError::from_reported(3, c, 99).unwrap();
            assert_eq!(
                (e.msg_type, e.code, e.mtu),
                (Icmpv4Message::DST_UNREACHABLE, c, 0)
            );
            assert!(!e.is_frag_needed());
        }
        assert_eq!(
            IcmpError::from_reported(11, 0, 0).map(|e| e.msg_type),
            Some(Icmpv4Message::TIME_EXCEEDED)
        );
        // Redirect, source quench, parameter problem, an echo reply: not passed on.
        for t in [5, 4, 12, 0] {
            assert_eq!(IcmpError::from_reported(t, 1, 0), None);
        }
    }

    #[test]
    fn an_error_about_an_echo_quotes_the_pods_request() {
        let (pod, dst) = (Ipv4Addr::new(10, 244, 1, 2), Ipv4Addr::new(203, 0, 113, 5));
        let mut orig = [0u8; 28];
        assert_eq!(
            echo_request_header(pod, dst, 0x1234, 7, &mut orig),
            Some(28)
        );
        assert!(echo_request_header(pod, dst, 0x1234, 7, &mut orig[..27]).is_none());
        let mut out = [0u8; 64];
        let from = Ipv4Addr::new(192, 168, 100, 250);
        let len = icmp_error(from, pod, IcmpError::unreachable(1), &orig, &mut out).unwrap();
        let ip = Ipv4Packet::new_checked(&out[..len]).unwrap();
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert_eq!(icmp.msg_code(), 1);
        let q = Ipv4Packet::new_checked(icmp.data()).unwrap();
        assert_eq!(
            (q.src_addr(), q.dst_addr(), q.protocol()),
            (pod, dst, IpProtocol::ICMP)
        );
        let echo = Icmpv4Packet::new_checked(q.payload()).unwrap();
        assert_eq!(echo.msg_type(), Icmpv4Message::ECHO_REQUEST);
        assert_eq!((echo.echo_ident(), echo.echo_seq_no()), (0x1234, 7));
        // The pod's classifier takes the quoted request for its own flow.
        assert_eq!(
            classify(&orig),
            Some(Kind::Echo {
                key: FlowKey {
                    pod: SocketAddrV4::new(pod, 0x1234),
                    dst: SocketAddrV4::new(dst, 0x1234)
                },
                msg: (20, 28),
                df: true,
            })
        );
    }

    #[test]
    fn classify_never_panics_and_refuses_what_is_not_for_egress() {
        assert_eq!(classify(&[]), None);
        assert_eq!(classify(&[0x45; 19]), None);
        let mut q = [0u8; 64];
        let n = udp_packet(
            "10.244.1.2:1".parse().unwrap(),
            "1.1.1.1:2".parse().unwrap(),
            b"",
            &mut q,
        )
        .unwrap();
        // A fragment is not translated.
        q[6] = 0x20;
        assert_eq!(classify(&q[..n]), None);
        for len in 0..n {
            let _ = classify(&q[..len]);
        }
    }

    proptest::proptest! {
        #[test]
        fn classify_takes_any_bytes(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80)) {
            let _ = classify(&b);
        }
    }
}
