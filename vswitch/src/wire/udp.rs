//! UDP datagrams (RFC 768).
//!
//! The switch reads UDP for service NAT (ports), for cluster DNS (it answers queries itself)
//! and for VXLAN on the underlay. The datagram is bounded by its own length field, not by the
//! buffer, so trailing padding stays out of the checksum and the payload. Checksums need the IP
//! addresses for the pseudo header, so `fill_checksum`/`verify_checksum` take them as arguments
//! rather than the view reaching back into an IP header it does not own. Over IPv4 a checksum of
//! zero means "not computed" and verifies; over IPv6 it is invalid (RFC 8200 §8.1).

use std::net::{Ipv4Addr, Ipv6Addr};

use super::checksum::{self, L4Checksum};
use super::ipv4::IpProtocol;
use super::{be16, clamped, clamped_mut, put_be16, Field, Result};

pub(super) mod field {
    use super::Field;
    pub const LENGTH: Field = 4..6;
    pub const CHECKSUM: Field = 6..8;
    pub const PAYLOAD: usize = 8;
}

l4_view! {
    /// A view of a UDP datagram, bounded by its length field.
    UdpPacket, HEADER_LEN = field::PAYLOAD, len
}

impl<T: AsRef<[u8]>> UdpPacket<T> {
    /// Header plus payload, in bytes, as the length field says.
    pub fn len(&self) -> u16 {
        be16(&self.buffer.as_ref()[field::LENGTH])
    }

    /// True if the length field announces no payload.
    pub fn is_empty(&self) -> bool {
        usize::from(self.len()) <= Self::HEADER_LEN
    }

    /// Header and payload up to the length field: what the checksum covers.
    fn datagram(&self) -> &[u8] {
        clamped(self.buffer.as_ref(), 0, usize::from(self.len()))
    }

    pub fn payload(&self) -> &[u8] {
        clamped(
            self.buffer.as_ref(),
            field::PAYLOAD,
            usize::from(self.len()),
        )
    }

    fn sum_v4(&self, src: Ipv4Addr, dst: Ipv4Addr) -> u32 {
        checksum::pseudo_header_v4(src, dst, IpProtocol::UDP.0, self.len())
            + checksum::sum(self.datagram())
    }

    fn sum_v6(&self, src: Ipv6Addr, dst: Ipv6Addr) -> u32 {
        checksum::pseudo_header_v6(src, dst, IpProtocol::UDP.0, u32::from(self.len()))
            + checksum::sum(self.datagram())
    }

    /// True if the checksum is correct for these IPv4 addresses, or absent (zero).
    pub fn verify_checksum(&self, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        self.checksum() == 0 || checksum::fold(self.sum_v4(src, dst)) == 0xffff
    }

    /// True if the checksum is correct for these IPv6 addresses; zero is never valid here.
    pub fn verify_checksum_v6(&self, src: Ipv6Addr, dst: Ipv6Addr) -> bool {
        self.checksum() != 0 && checksum::fold(self.sum_v6(src, dst)) == 0xffff
    }
}

/// A computed checksum of zero is sent as all ones, since zero on the wire means "none".
fn nonzero(csum: u16) -> u16 {
    if csum == 0 {
        0xffff
    } else {
        csum
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> UdpPacket<T> {
    pub fn set_len(&mut self, len: u16) {
        put_be16(&mut self.buffer.as_mut()[field::LENGTH], len);
    }

    /// Computes the checksum with the IPv4 pseudo header and stores it.
    pub fn fill_checksum(&mut self, src: Ipv4Addr, dst: Ipv4Addr) {
        self.set_checksum(0);
        let csum = checksum::finish(self.sum_v4(src, dst));
        self.set_checksum(nonzero(csum));
    }

    /// Computes the checksum with the IPv6 pseudo header and stores it.
    pub fn fill_checksum_v6(&mut self, src: Ipv6Addr, dst: Ipv6Addr) {
        self.set_checksum(0);
        let csum = checksum::finish(self.sum_v6(src, dst));
        self.set_checksum(nonzero(csum));
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = usize::from(self.len());
        clamped_mut(self.buffer.as_mut(), field::PAYLOAD, end)
    }
}

/// The meaning of a UDP header, detached from its buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UdpRepr {
    pub src_port: u16,
    pub dst_port: u16,
    /// Bytes after the header.
    pub payload_len: usize,
}

impl UdpRepr {
    /// Reads a datagram's header, re-checking the view.
    pub fn parse<T: AsRef<[u8]>>(packet: &UdpPacket<T>) -> Result<UdpRepr> {
        packet.check_len()?;
        Ok(UdpRepr {
            src_port: packet.src_port(),
            dst_port: packet.dst_port(),
            payload_len: packet.payload().len(),
        })
    }

    repr_lengths!(field::PAYLOAD);

    /// Writes the header and, over the given pseudo header, the checksum, so the payload must
    /// be in place first. A datagram longer than the length field can say gets the largest
    /// length (the caller sizes datagrams; an IPv4 one never is).
    ///
    /// # Panics
    /// If the packet's buffer is shorter than the 8-byte header.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut UdpPacket<T>, csum: L4Checksum) {
        packet.set_src_port(self.src_port);
        packet.set_dst_port(self.dst_port);
        packet.set_len(u16::try_from(self.buffer_len()).unwrap_or(u16::MAX));
        packet.fill_l4_checksum(csum);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ipv4::Ipv4Packet;
    use crate::wire::ipv6::Ipv6Packet;
    use crate::wire::testdata::{DNS_QUERY, IPV6_DNS_QUERY};
    use crate::wire::WireError;
    use proptest::prelude::*;

    const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
    const DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

    #[test]
    fn parse_dns_query() {
        let ip = Ipv4Packet::new_checked(&DNS_QUERY[14..]).unwrap();
        let udp = UdpPacket::new_checked(ip.payload()).unwrap();
        assert_eq!(udp.src_port(), 53211);
        assert_eq!(udp.dst_port(), 53);
        assert_eq!(udp.len(), 73);
        assert!(!udp.is_empty());
        assert_eq!(udp.checksum(), 0x6f02);
        assert!(udp.verify_checksum(POD_IP, DNS_IP));
        // After DNAT the old checksum no longer matches the new destination.
        assert!(!udp.verify_checksum(POD_IP, Ipv4Addr::new(10, 244, 3, 17)));
        assert_eq!(udp.payload().len(), 65);
        assert_eq!(&udp.payload()[..4], &[0xbe, 0xef, 0x01, 0x00]);
        assert_eq!(&udp.payload()[13..23], b"kubernetes");
    }

    #[test]
    fn parse_ipv6_dns_query() {
        let ip = Ipv6Packet::new_checked(&IPV6_DNS_QUERY[14..]).unwrap();
        let udp = UdpPacket::new_checked(ip.payload()).unwrap();
        assert_eq!((udp.src_port(), udp.dst_port(), udp.len()), (40001, 53, 62));
        assert_eq!(udp.checksum(), 0x91bb);
        assert!(udp.verify_checksum_v6(ip.src_addr(), ip.dst_addr()));
        assert!(!udp.verify_checksum_v6(ip.dst_addr(), ip.dst_addr()));
    }

    #[test]
    fn construct_dns_query() {
        let mut buf = [0u8; 73];
        let mut udp = UdpPacket::new_unchecked(&mut buf[..]);
        udp.set_src_port(53211);
        udp.set_dst_port(53);
        udp.set_len(73);
        udp.payload_mut().copy_from_slice(&DNS_QUERY[42..]);
        udp.fill_checksum(POD_IP, DNS_IP);
        assert_eq!(buf[..], DNS_QUERY[34..]);

        let mut buf = [0u8; 62];
        buf.copy_from_slice(&IPV6_DNS_QUERY[54..]);
        let mut udp = UdpPacket::new_checked(&mut buf[..]).unwrap();
        udp.set_checksum(0x1234);
        let ip = Ipv6Packet::new_checked(&IPV6_DNS_QUERY[14..]).unwrap();
        udp.fill_checksum_v6(ip.src_addr(), ip.dst_addr());
        assert_eq!(udp.checksum(), 0x91bb);
    }

    #[test]
    fn zero_checksum_rules() {
        let mut buf: [u8; 73] = DNS_QUERY[34..].try_into().unwrap();
        let mut udp = UdpPacket::new_checked(&mut buf[..]).unwrap();
        udp.set_checksum(0);
        assert!(udp.verify_checksum(POD_IP, DNS_IP));
        assert!(udp.verify_checksum(DNS_IP, DNS_IP));
        let v6: Ipv6Addr = "fd00::1".parse().unwrap();
        assert!(!udp.verify_checksum_v6(v6, v6));

        // Make the computed checksum come out as zero: it must be sent as 0xffff.
        udp.payload_mut()[0..2].copy_from_slice(&[0, 0]);
        udp.fill_checksum(POD_IP, DNS_IP);
        let c = udp.checksum();
        udp.payload_mut()[0..2].copy_from_slice(&c.to_be_bytes());
        udp.fill_checksum(POD_IP, DNS_IP);
        assert_eq!(udp.checksum(), 0xffff);
        assert!(udp.verify_checksum(POD_IP, DNS_IP));
    }

    #[test]
    fn length_field_bounds_the_datagram() {
        let mut buf = [0u8; 80];
        buf[..73].copy_from_slice(&DNS_QUERY[34..]);
        buf[73..].fill(0x55); // padding must not count
        let udp = UdpPacket::new_checked(&buf[..]).unwrap();
        assert_eq!(udp.payload().len(), 65);
        assert!(udp.verify_checksum(POD_IP, DNS_IP));

        let check = |p: &[u8]| UdpPacket::new_checked(p).map(|_| ());
        assert_eq!(check(&buf[..7]), Err(WireError::Truncated));
        assert_eq!(check(&buf[..72]), Err(WireError::Truncated));
        let mut bad = buf;
        bad[4..6].copy_from_slice(&7u16.to_be_bytes());
        assert_eq!(check(&bad), Err(WireError::Malformed));
        bad[4..6].copy_from_slice(&8u16.to_be_bytes());
        let empty = UdpPacket::new_checked(&bad[..]).unwrap();
        assert!(empty.is_empty() && empty.payload().is_empty());

        // A setter writing a length past the buffer cannot make a later read panic.
        let mut udp = UdpPacket::new_checked(&mut buf[..]).unwrap();
        udp.set_len(9000);
        assert_eq!(udp.payload().len(), 72);
        assert_eq!(udp.payload_mut().len(), 72);
        let _ = udp.verify_checksum(POD_IP, DNS_IP);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn never_panics(mut data in proptest::collection::vec(any::<u8>(), 0..64), fix in any::<bool>()) {
            if fix && data.len() >= 8 {
                let len = data.len() as u16 - u16::from(data[0] & 3).min(data.len() as u16 - 8);
                data[4..6].copy_from_slice(&len.to_be_bytes());
            }
            match UdpPacket::new_checked(&data[..]) {
                Ok(udp) => {
                    prop_assert_eq!(udp.payload().len() + 8, usize::from(udp.len()));
                    prop_assert_eq!(udp.src_port(), u16::from_be_bytes([data[0], data[1]]));
                    let _ = (udp.dst_port(), udp.checksum(), udp.is_empty());
                    let (a, b) = (Ipv4Addr::new(1, 2, 3, 4), Ipv4Addr::new(5, 6, 7, 8));
                    let _ = udp.verify_checksum(a, b);
                    let mut copy = data.clone();
                    let mut udp = UdpPacket::new_checked(&mut copy[..]).unwrap();
                    udp.fill_checksum(a, b);
                    prop_assert!(udp.checksum() != 0 && udp.verify_checksum(a, b));
                    udp.fill_checksum_v6(Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST);
                    prop_assert!(udp.verify_checksum_v6(Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST));
                }
                Err(WireError::Truncated) => prop_assert!(
                    data.len() < 8 || data.len() < usize::from(u16::from_be_bytes([data[4], data[5]]))
                ),
                Err(e) => prop_assert_eq!(e, WireError::Malformed),
            }
        }

        #[test]
        fn agrees_with_etherparse_v4(src in any::<[u8; 4]>(), dst in any::<[u8; 4]>(),
                                     sport in any::<u16>(), dport in any::<u16>(),
                                     payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let builder = etherparse::PacketBuilder::ipv4(src, dst, 64).udp(sport, dport);
            let mut buf = Vec::new();
            builder.write(&mut buf, &payload).unwrap();
            let ip = Ipv4Packet::new_checked(&buf[..]).unwrap();
            let theirs = etherparse::UdpHeader::from_slice(ip.payload()).unwrap().0;
            let udp = UdpPacket::new_checked(ip.payload()).unwrap();
            prop_assert_eq!(udp.src_port(), theirs.source_port);
            prop_assert_eq!(udp.dst_port(), theirs.destination_port);
            prop_assert_eq!(udp.len(), theirs.length);
            prop_assert_eq!(udp.checksum(), theirs.checksum);
            prop_assert!(udp.verify_checksum(ip.src_addr(), ip.dst_addr()));
            prop_assert_eq!(udp.payload(), &payload[..]);

            let mut copy = ip.payload().to_vec();
            let mut ours = UdpPacket::new_checked(&mut copy[..]).unwrap();
            ours.set_checksum(0);
            ours.fill_checksum(ip.src_addr(), ip.dst_addr());
            prop_assert_eq!(ours.checksum(), theirs.checksum);
        }

        #[test]
        fn agrees_with_etherparse_v6(src in any::<[u8; 16]>(), dst in any::<[u8; 16]>(),
                                     sport in any::<u16>(), dport in any::<u16>(),
                                     payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let builder = etherparse::PacketBuilder::ipv6(src, dst, 64).udp(sport, dport);
            let mut buf = Vec::new();
            builder.write(&mut buf, &payload).unwrap();
            let ip = Ipv6Packet::new_checked(&buf[..]).unwrap();
            let theirs = etherparse::UdpHeader::from_slice(ip.payload()).unwrap().0;
            let udp = UdpPacket::new_checked(ip.payload()).unwrap();
            prop_assert_eq!((udp.src_port(), udp.dst_port(), udp.len()), (sport, dport, theirs.length));
            prop_assert_eq!(udp.checksum(), theirs.checksum);
            prop_assert!(udp.verify_checksum_v6(ip.src_addr(), ip.dst_addr()));
        }
    }

    #[test]
    fn repr_parses_and_emits_the_dns_query() {
        let ip = Ipv4Packet::new_checked(&DNS_QUERY[14..]).unwrap();
        let udp = UdpPacket::new_checked(ip.payload()).unwrap();
        let repr = UdpRepr::parse(&udp).unwrap();
        let want = UdpRepr {
            src_port: 53211,
            dst_port: 53,
            payload_len: 65,
        };
        assert_eq!(repr, want);
        assert_eq!((repr.header_len(), repr.buffer_len()), (8, 73));
        let mut buf = [0xffu8; 73];
        buf[8..].copy_from_slice(udp.payload());
        repr.emit(
            &mut UdpPacket::new_unchecked(&mut buf[..]),
            L4Checksum::V4(POD_IP, DNS_IP),
        );
        assert_eq!(&buf[..], ip.payload());
        repr.emit(
            &mut UdpPacket::new_unchecked(&mut buf[..]),
            L4Checksum::None,
        );
        assert_eq!(&buf[6..8], &[0, 0]);
    }
}
