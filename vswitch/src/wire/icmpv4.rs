//! ICMP for IPv4 (RFC 792), the messages a switch has to read or originate.
//!
//! The switch answers pings to the pod gateway, sends "time exceeded" when it routes and
//! "fragmentation needed" when a pod sends more than the overlay MTU with DF set (path MTU
//! discovery is what keeps VXLAN's 50 bytes of overhead from black-holing TCP). Those are all
//! 8-byte-header messages, so the view exposes the second header word both as echo
//! identifier/sequence and as the next-hop MTU; which reading applies is the caller's call based
//! on `msg_type`. The view has no length field of its own: give it exactly the IP payload
//! (`Ipv4Packet::payload`), because the checksum covers every byte it is given.

use super::checksum;
use super::{be16, be32, check_lengths, put_be16, put_be32, Field, Result};

protocol_number! {
    /// The ICMP message type.
    Icmpv4Message(u8) { ECHO_REPLY = 0, DST_UNREACHABLE = 3, ECHO_REQUEST = 8, TIME_EXCEEDED = 11 }
}

impl Icmpv4Message {
    /// Error messages quote the packet that caused them; NAT must translate that quote too.
    pub fn is_error(self) -> bool {
        matches!(self.0, 3 | 4 | 5 | 11 | 12)
    }
}

/// Message codes, by the message type they belong to.
pub mod code {
    /// `DST_UNREACHABLE`: no route to the network.
    pub const NET_UNREACHABLE: u8 = 0;
    /// `DST_UNREACHABLE`: the host did not answer ARP.
    pub const HOST_UNREACHABLE: u8 = 1;
    /// `DST_UNREACHABLE`: no such transport protocol.
    pub const PROTO_UNREACHABLE: u8 = 2;
    /// `DST_UNREACHABLE`: nothing listens on the UDP port (or a service has no endpoints).
    pub const PORT_UNREACHABLE: u8 = 3;
    /// `DST_UNREACHABLE`: the packet is larger than the next hop's MTU and has DF set; the
    /// next-hop MTU field says how large it may be.
    pub const FRAG_NEEDED: u8 = 4;
    /// `TIME_EXCEEDED`: the TTL reached zero in transit.
    pub const TTL_EXPIRED: u8 = 0;
}

mod field {
    use super::Field;
    pub const TYPE: usize = 0;
    pub const CODE: usize = 1;
    pub const CHECKSUM: Field = 2..4;
    pub const REST: Field = 4..8;
    pub const ECHO_IDENT: Field = 4..6;
    pub const ECHO_SEQNO: Field = 6..8;
    pub const NEXT_HOP_MTU: Field = 6..8;
    pub const DATA: usize = 8;
}

view! {
    /// A view of an ICMPv4 message.
    Icmpv4Packet
}

impl<T: AsRef<[u8]>> Icmpv4Packet<T> {
    /// Length of the header of every message this view understands.
    pub const HEADER_LEN: usize = field::DATA;

    /// Ensures every accessor is in bounds: the buffer holds the 8-byte header.
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        check_lengths(len, Self::HEADER_LEN, || Self::HEADER_LEN)
    }

    pub fn msg_type(&self) -> Icmpv4Message {
        Icmpv4Message(self.buffer.as_ref()[field::TYPE])
    }

    pub fn msg_code(&self) -> u8 {
        self.buffer.as_ref()[field::CODE]
    }

    pub fn checksum(&self) -> u16 {
        be16(&self.buffer.as_ref()[field::CHECKSUM])
    }

    /// Echo request/reply identifier.
    pub fn echo_ident(&self) -> u16 {
        be16(&self.buffer.as_ref()[field::ECHO_IDENT])
    }

    /// Echo request/reply sequence number.
    pub fn echo_seq_no(&self) -> u16 {
        be16(&self.buffer.as_ref()[field::ECHO_SEQNO])
    }

    /// Next-hop MTU of a "fragmentation needed" message (RFC 1191); zero from old routers.
    pub fn next_hop_mtu(&self) -> u16 {
        be16(&self.buffer.as_ref()[field::NEXT_HOP_MTU])
    }

    /// The second header word, whatever the message type makes of it.
    pub fn rest_of_header(&self) -> u32 {
        be32(&self.buffer.as_ref()[field::REST])
    }

    /// Everything after the 8-byte header: echo data, or the quoted packet of an error.
    pub fn data(&self) -> &[u8] {
        &self.buffer.as_ref()[field::DATA..]
    }

    /// True if the checksum over the whole buffer is correct.
    pub fn verify_checksum(&self) -> bool {
        checksum::fold(checksum::sum(self.buffer.as_ref())) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Icmpv4Packet<T> {
    pub fn set_msg_type(&mut self, t: Icmpv4Message) {
        self.buffer.as_mut()[field::TYPE] = t.0;
    }

    pub fn set_msg_code(&mut self, code: u8) {
        self.buffer.as_mut()[field::CODE] = code;
    }

    pub fn set_checksum(&mut self, csum: u16) {
        put_be16(&mut self.buffer.as_mut()[field::CHECKSUM], csum);
    }

    pub fn set_echo_ident(&mut self, ident: u16) {
        put_be16(&mut self.buffer.as_mut()[field::ECHO_IDENT], ident);
    }

    pub fn set_echo_seq_no(&mut self, seq: u16) {
        put_be16(&mut self.buffer.as_mut()[field::ECHO_SEQNO], seq);
    }

    /// Sets the next-hop MTU and zeroes the unused half-word before it, as RFC 1191 asks.
    pub fn set_next_hop_mtu(&mut self, mtu: u16) {
        self.set_rest_of_header(u32::from(mtu));
    }

    pub fn set_rest_of_header(&mut self, rest: u32) {
        put_be32(&mut self.buffer.as_mut()[field::REST], rest);
    }

    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::DATA..]
    }

    /// Computes the checksum over the whole buffer and stores it.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let csum = checksum::finish(checksum::sum(self.buffer.as_ref()));
        self.set_checksum(csum);
    }
}

/// The meaning of an ICMPv4 message header, detached from its buffer: the type, the code and
/// the second header word (echo identifier and sequence number, or an error's next-hop MTU).
/// The data after the header (echo data, an error's quote) stays in the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Icmpv4Repr {
    pub msg_type: Icmpv4Message,
    pub msg_code: u8,
    pub rest_of_header: u32,
    /// Bytes after the 8-byte header (echo data, an error's quote).
    pub payload_len: usize,
}

impl Icmpv4Repr {
    /// Reads a message's header, re-checking the view.
    pub fn parse<T: AsRef<[u8]>>(packet: &Icmpv4Packet<T>) -> Result<Icmpv4Repr> {
        packet.check_len()?;
        Ok(Icmpv4Repr {
            msg_type: packet.msg_type(),
            msg_code: packet.msg_code(),
            rest_of_header: packet.rest_of_header(),
            payload_len: packet.data().len(),
        })
    }

    repr_lengths!(field::DATA);

    /// Writes the header and the checksum over the whole message, so the data must be in
    /// place first; the packet's buffer must be exactly [`Self::buffer_len`] long for the
    /// checksum to cover the right bytes.
    ///
    /// # Panics
    /// If the packet's buffer is shorter than the 8-byte header.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Icmpv4Packet<T>) {
        packet.set_msg_type(self.msg_type);
        packet.set_msg_code(self.msg_code);
        packet.set_rest_of_header(self.rest_of_header);
        packet.fill_checksum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ipv4::{IpProtocol, Ipv4Packet};
    use crate::wire::testdata::{ICMP_ECHO, ICMP_FRAG_NEEDED, TCP_SYN};
    use crate::wire::TcpPacket;
    use crate::wire::WireError;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    #[test]
    fn parse_echo_request() {
        let ip = Ipv4Packet::new_checked(&ICMP_ECHO[14..]).unwrap();
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert_eq!(icmp.msg_type(), Icmpv4Message::ECHO_REQUEST);
        assert!(!icmp.msg_type().is_error());
        assert_eq!(icmp.msg_code(), 0);
        assert_eq!(icmp.checksum(), 0xdf90);
        assert!(icmp.verify_checksum());
        assert_eq!(icmp.echo_ident(), 0x1c46);
        assert_eq!(icmp.echo_seq_no(), 1);
        assert_eq!(icmp.data().len(), 56);
        assert_eq!(&icmp.data()[16..20], &[0x10, 0x11, 0x12, 0x13]);
    }

    #[test]
    fn echo_request_becomes_reply() {
        let mut buf: [u8; 64] = ICMP_ECHO[34..].try_into().unwrap();
        let mut icmp = Icmpv4Packet::new_checked(&mut buf[..]).unwrap();
        icmp.set_msg_type(Icmpv4Message::ECHO_REPLY);
        assert!(!icmp.verify_checksum());
        icmp.fill_checksum();
        assert!(icmp.verify_checksum());
        // Only the type byte changed (8 -> 0), so the checksum rose by 0x0800.
        assert_eq!(icmp.checksum(), 0xdf90 + 0x0800);
        assert_eq!(icmp.echo_ident(), 0x1c46);
    }

    #[test]
    fn parse_frag_needed_and_its_quote() {
        let ip = Ipv4Packet::new_checked(&ICMP_FRAG_NEEDED[..]).unwrap();
        assert_eq!(ip.protocol(), IpProtocol::ICMP);
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert_eq!(icmp.msg_type(), Icmpv4Message::DST_UNREACHABLE);
        assert!(icmp.msg_type().is_error());
        assert_eq!(icmp.msg_code(), code::FRAG_NEEDED);
        assert_eq!(icmp.next_hop_mtu(), 1450);
        assert_eq!(icmp.rest_of_header(), 1450);
        assert!(icmp.verify_checksum());

        // The quote is the SYN's IP header and its first 8 bytes, cut short on purpose.
        assert_eq!(icmp.data(), &TCP_SYN[14..42]);
        assert_eq!(
            Ipv4Packet::new_checked(icmp.data()).unwrap_err(),
            WireError::Truncated
        );
        let quoted = Ipv4Packet::new_checked_quoted(icmp.data()).unwrap();
        assert_eq!(quoted.src_addr(), Ipv4Addr::new(10, 244, 1, 5));
        assert_eq!(quoted.total_len(), 60);
        assert_eq!(quoted.payload().len(), 8);
        let ports = quoted.payload();
        assert_eq!(u16::from_be_bytes([ports[0], ports[1]]), 41862);
        assert_eq!(u16::from_be_bytes([ports[2], ports[3]]), 80);
        // 8 bytes are not a whole TCP header; NAT reads the ports by hand, as above.
        assert!(TcpPacket::new_checked(ports).is_err());
    }

    #[test]
    fn construct_frag_needed() {
        let mut buf = [0u8; 36];
        let mut icmp = Icmpv4Packet::new_unchecked(&mut buf[..]);
        icmp.set_rest_of_header(0xdead_beef);
        icmp.set_msg_type(Icmpv4Message::DST_UNREACHABLE);
        icmp.set_msg_code(code::FRAG_NEEDED);
        icmp.set_next_hop_mtu(1450);
        icmp.data_mut().copy_from_slice(&TCP_SYN[14..42]);
        icmp.fill_checksum();
        assert_eq!(buf[..], ICMP_FRAG_NEEDED[20..]);
    }

    #[test]
    fn construct_echo() {
        let mut buf = [0u8; 64];
        let mut icmp = Icmpv4Packet::new_unchecked(&mut buf[..]);
        icmp.set_msg_type(Icmpv4Message::ECHO_REQUEST);
        icmp.set_msg_code(0);
        icmp.set_echo_ident(0x1c46);
        icmp.set_echo_seq_no(1);
        icmp.data_mut().copy_from_slice(&ICMP_ECHO[42..]);
        icmp.fill_checksum();
        assert_eq!(buf[..], ICMP_ECHO[34..]);
    }

    #[test]
    fn rejects_short() {
        assert_eq!(
            Icmpv4Packet::new_checked(&[8u8, 0, 0, 0, 0, 0, 0][..]).unwrap_err(),
            WireError::Truncated
        );
        let p = Icmpv4Packet::new_checked(&[8u8, 0, 0xf7, 0xff, 0, 0, 0, 0][..]).unwrap();
        assert!(p.data().is_empty());
        assert!(p.verify_checksum());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..40)) {
            match Icmpv4Packet::new_checked(&data[..]) {
                Ok(p) => {
                    prop_assert_eq!(p.msg_type().0, data[0]);
                    prop_assert_eq!(p.msg_code(), data[1]);
                    prop_assert_eq!(p.rest_of_header(), u32::from_be_bytes([data[4], data[5], data[6], data[7]]));
                    let _ = (p.checksum(), p.echo_ident(), p.echo_seq_no(), p.next_hop_mtu(), p.msg_type().is_error());
                    prop_assert_eq!(p.data(), &data[8..]);
                    let mut copy = data.clone();
                    let mut p = Icmpv4Packet::new_checked(&mut copy[..]).unwrap();
                    p.fill_checksum();
                    prop_assert!(p.verify_checksum());
                }
                Err(e) => {
                    prop_assert_eq!(e, WireError::Truncated);
                    prop_assert!(data.len() < 8);
                }
            }
        }

        #[test]
        fn agrees_with_etherparse(kind in 0u8..4, id in any::<u16>(), seq in any::<u16>(), mtu in any::<u16>(),
                                  payload in proptest::collection::vec(any::<u8>(), 0..100)) {
            use etherparse::icmpv4::{DestUnreachableHeader, TimeExceededCode};
            use etherparse::{IcmpEchoHeader, Icmpv4Type};
            let icmp_type = match kind {
                0 => Icmpv4Type::EchoRequest(IcmpEchoHeader { id, seq }),
                1 => Icmpv4Type::EchoReply(IcmpEchoHeader { id, seq }),
                2 => Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu }),
                _ => Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit),
            };
            let builder = etherparse::PacketBuilder::ipv4([10, 244, 0, 1], [10, 244, 1, 5], 64).icmpv4(icmp_type.clone());
            let mut buf = Vec::new();
            builder.write(&mut buf, &payload).unwrap();
            let ip = Ipv4Packet::new_checked(&buf[..]).unwrap();
            let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
            let theirs = etherparse::Icmpv4Header::from_slice(ip.payload()).unwrap().0;
            prop_assert_eq!(icmp.checksum(), theirs.checksum);
            prop_assert!(icmp.verify_checksum());
            prop_assert_eq!(icmp.data(), &payload[..]);
            prop_assert_eq!(icmp.checksum(), icmp_type.calc_checksum(&payload));
            let bytes = theirs.to_bytes();
            prop_assert_eq!(icmp.msg_type().0, bytes[0]);
            prop_assert_eq!(icmp.msg_code(), bytes[1]);
            match kind {
                0 | 1 => {
                    prop_assert_eq!(icmp.msg_type(), if kind == 0 { Icmpv4Message::ECHO_REQUEST } else { Icmpv4Message::ECHO_REPLY });
                    prop_assert_eq!(icmp.echo_ident(), id);
                    prop_assert_eq!(icmp.echo_seq_no(), seq);
                }
                2 => {
                    prop_assert_eq!(icmp.msg_type(), Icmpv4Message::DST_UNREACHABLE);
                    prop_assert_eq!(icmp.msg_code(), code::FRAG_NEEDED);
                    prop_assert_eq!(icmp.next_hop_mtu(), mtu);
                }
                _ => {
                    prop_assert_eq!(icmp.msg_type(), Icmpv4Message::TIME_EXCEEDED);
                    prop_assert_eq!(icmp.msg_code(), code::TTL_EXPIRED);
                }
            }
        }
    }

    #[test]
    fn repr_parses_and_emits_the_echo_request() {
        let ip = Ipv4Packet::new_checked(&ICMP_ECHO[14..]).unwrap();
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        let repr = Icmpv4Repr::parse(&icmp).unwrap();
        assert_eq!(
            (repr.msg_type, repr.msg_code),
            (Icmpv4Message::ECHO_REQUEST, 0)
        );
        assert_eq!((repr.header_len(), repr.buffer_len()), (8, 64));
        let mut buf = [0xffu8; 64];
        buf[8..].copy_from_slice(icmp.data());
        repr.emit(&mut Icmpv4Packet::new_unchecked(&mut buf[..]));
        assert_eq!(&buf[..], ip.payload());
    }
}
