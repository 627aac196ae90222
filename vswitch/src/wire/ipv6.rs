//! The IPv6 fixed header (RFC 8200 §3).
//!
//! IPv4 is the product's focus today, but pods are dual-stack in many clusters, so the switch
//! must at least classify and forward IPv6 without guessing. This view covers the 40-byte fixed
//! header only: `next_header` reports the first extension header as it is, and walking the
//! extension chain is left to the code that needs an L4 header. The payload is bounded by the
//! payload length field, so Ethernet padding never leaks into it; jumbograms (payload length 0
//! plus a hop-by-hop option) therefore show an empty payload, which is right for a switch whose
//! MTU is far below 64 KB on the wire.

use std::net::Ipv6Addr;

use super::ipv4::IpProtocol;
use super::{be16, be32, check_lengths, clamped, clamped_mut, put_be16, put_be32, Field, Result};

mod field {
    use super::Field;
    pub const VER_TC_FLOW: Field = 0..4;
    pub const LENGTH: Field = 4..6;
    pub const NXT_HDR: usize = 6;
    pub const HOP_LIMIT: usize = 7;
    pub const SRC_ADDR: Field = 8..24;
    pub const DST_ADDR: Field = 24..40;
}

fn addr(b: &[u8]) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    Ipv6Addr::from(a)
}

view! {
    /// A view of an IPv6 packet's fixed header and payload.
    Ipv6Packet
}

impl<T: AsRef<[u8]>> Ipv6Packet<T> {
    /// Length of the fixed header.
    pub const HEADER_LEN: usize = field::DST_ADDR.end;

    /// Ensures every accessor is in bounds: the version, and that the buffer holds the header
    /// and the payload length it announces (trailing padding is allowed). A version other than
    /// 6 reads as a length of zero: `Malformed`.
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        check_lengths(len, Self::HEADER_LEN, || match self.version() {
            6 => self.total_len(),
            _ => 0,
        })
    }

    fn ver_tc_flow(&self) -> u32 {
        be32(&self.buffer.as_ref()[field::VER_TC_FLOW])
    }

    pub fn version(&self) -> u8 {
        (self.ver_tc_flow() >> 28) as u8
    }

    pub fn traffic_class(&self) -> u8 {
        (self.ver_tc_flow() >> 20) as u8
    }

    /// The 20-bit flow label.
    pub fn flow_label(&self) -> u32 {
        self.ver_tc_flow() & 0x000f_ffff
    }

    /// Length of everything after the fixed header, extension headers included.
    pub fn payload_len(&self) -> u16 {
        be16(&self.buffer.as_ref()[field::LENGTH])
    }

    /// Fixed header plus payload length, in bytes.
    pub fn total_len(&self) -> usize {
        Self::HEADER_LEN + usize::from(self.payload_len())
    }

    /// The first header after the fixed one: an L4 protocol or an extension header.
    pub fn next_header(&self) -> IpProtocol {
        IpProtocol(self.buffer.as_ref()[field::NXT_HDR])
    }

    pub fn hop_limit(&self) -> u8 {
        self.buffer.as_ref()[field::HOP_LIMIT]
    }

    pub fn src_addr(&self) -> Ipv6Addr {
        addr(&self.buffer.as_ref()[field::SRC_ADDR])
    }

    pub fn dst_addr(&self) -> Ipv6Addr {
        addr(&self.buffer.as_ref()[field::DST_ADDR])
    }

    /// Everything after the fixed header up to the payload length.
    pub fn payload(&self) -> &[u8] {
        clamped(self.buffer.as_ref(), Self::HEADER_LEN, self.total_len())
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv6Packet<T> {
    fn set_ver_tc_flow(&mut self, mask: u32, value: u32) {
        let f = &mut self.buffer.as_mut()[field::VER_TC_FLOW];
        let raw = (be32(f) & !mask) | (value & mask);
        put_be32(f, raw);
    }

    pub fn set_version(&mut self, version: u8) {
        self.set_ver_tc_flow(0xf000_0000, u32::from(version) << 28);
    }

    pub fn set_traffic_class(&mut self, tc: u8) {
        self.set_ver_tc_flow(0x0ff0_0000, u32::from(tc) << 20);
    }

    /// Sets the flow label; bits above the low 20 are ignored.
    pub fn set_flow_label(&mut self, label: u32) {
        self.set_ver_tc_flow(0x000f_ffff, label);
    }

    pub fn set_payload_len(&mut self, len: u16) {
        put_be16(&mut self.buffer.as_mut()[field::LENGTH], len);
    }

    pub fn set_next_header(&mut self, nh: IpProtocol) {
        self.buffer.as_mut()[field::NXT_HDR] = nh.0;
    }

    /// IPv6 has no header checksum, so this is all a router has to touch.
    pub fn set_hop_limit(&mut self, hop_limit: u8) {
        self.buffer.as_mut()[field::HOP_LIMIT] = hop_limit;
    }

    pub fn set_src_addr(&mut self, addr: Ipv6Addr) {
        self.buffer.as_mut()[field::SRC_ADDR].copy_from_slice(&addr.octets());
    }

    pub fn set_dst_addr(&mut self, addr: Ipv6Addr) {
        self.buffer.as_mut()[field::DST_ADDR].copy_from_slice(&addr.octets());
    }

    /// Mutable twin of [`Ipv6Packet::payload`].
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = self.total_len();
        clamped_mut(self.buffer.as_mut(), Self::HEADER_LEN, end)
    }
}

/// The meaning of an IPv6 fixed header, detached from its buffer; traffic class and flow
/// label are written as zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv6Repr {
    pub src_addr: Ipv6Addr,
    pub dst_addr: Ipv6Addr,
    pub next_header: IpProtocol,
    /// Bytes after the fixed header.
    pub payload_len: usize,
    pub hop_limit: u8,
}

impl Ipv6Repr {
    /// Reads a packet's fixed header, re-checking the view.
    pub fn parse<T: AsRef<[u8]>>(packet: &Ipv6Packet<T>) -> Result<Ipv6Repr> {
        packet.check_len()?;
        Ok(Ipv6Repr {
            src_addr: packet.src_addr(),
            dst_addr: packet.dst_addr(),
            next_header: packet.next_header(),
            payload_len: packet.payload().len(),
            hop_limit: packet.hop_limit(),
        })
    }

    repr_lengths!(field::DST_ADDR.end);

    /// Writes every byte of the fixed header. A payload length past 65535 is stored as
    /// 65535 (no jumbograms here).
    ///
    /// # Panics
    /// If the packet's buffer is shorter than the 40-byte header.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Ipv6Packet<T>) {
        put_be32(&mut packet.buffer.as_mut()[field::VER_TC_FLOW], 6 << 28);
        packet.set_payload_len(u16::try_from(self.payload_len).unwrap_or(u16::MAX));
        packet.set_next_header(self.next_header);
        packet.set_hop_limit(self.hop_limit);
        packet.set_src_addr(self.src_addr);
        packet.set_dst_addr(self.dst_addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::testdata::IPV6_DNS_QUERY;
    use crate::wire::WireError;
    use proptest::prelude::*;

    fn pod() -> Ipv6Addr {
        "fd00:10:244:1::5".parse().unwrap()
    }

    fn dns() -> Ipv6Addr {
        "fd00:10:96::a".parse().unwrap()
    }

    #[test]
    fn parse_dns_query() {
        let ip = Ipv6Packet::new_checked(&IPV6_DNS_QUERY[14..]).unwrap();
        assert_eq!(ip.version(), 6);
        assert_eq!(ip.traffic_class(), 0);
        assert_eq!(ip.flow_label(), 0x12345);
        assert_eq!(ip.payload_len(), 62);
        assert_eq!(ip.total_len(), 102);
        assert_eq!(ip.next_header(), IpProtocol::UDP);
        assert_eq!(ip.hop_limit(), 64);
        assert_eq!(ip.src_addr(), pod());
        assert_eq!(ip.dst_addr(), dns());
        assert_eq!(ip.payload(), &IPV6_DNS_QUERY[54..]);
    }

    #[test]
    fn construct_header() {
        let mut buf = [0u8; 102];
        let mut ip = Ipv6Packet::new_unchecked(&mut buf[..]);
        ip.set_version(6);
        ip.set_traffic_class(0);
        ip.set_flow_label(0xfff1_2345); // high bits must not spill into the traffic class
        ip.set_payload_len(62);
        ip.set_next_header(IpProtocol::UDP);
        ip.set_hop_limit(64);
        ip.set_src_addr(pod());
        ip.set_dst_addr(dns());
        ip.payload_mut().copy_from_slice(&IPV6_DNS_QUERY[54..]);
        assert_eq!(buf[..], IPV6_DNS_QUERY[14..]);
    }

    #[test]
    fn traffic_class_and_flow_label_are_independent() {
        let mut buf: [u8; 102] = IPV6_DNS_QUERY[14..].try_into().unwrap();
        let mut ip = Ipv6Packet::new_checked(&mut buf[..]).unwrap();
        ip.set_traffic_class(0xb8);
        assert_eq!(
            (ip.version(), ip.traffic_class(), ip.flow_label()),
            (6, 0xb8, 0x12345)
        );
        ip.set_flow_label(7);
        assert_eq!(
            (ip.version(), ip.traffic_class(), ip.flow_label()),
            (6, 0xb8, 7)
        );
        assert_eq!(&buf[..4], &[0x6b, 0x80, 0x00, 0x07]);
    }

    #[test]
    fn rejects_bad_headers() {
        let base: [u8; 102] = IPV6_DNS_QUERY[14..].try_into().unwrap();
        let check = |p: &[u8]| Ipv6Packet::new_checked(p).map(|_| ());
        assert_eq!(check(&base), Ok(()));
        assert_eq!(check(&base[..39]), Err(WireError::Truncated));
        assert_eq!(check(&base[..101]), Err(WireError::Truncated));
        let mut v4 = base;
        v4[0] = 0x40;
        assert_eq!(check(&v4), Err(WireError::Malformed));
        // Padding after the payload is fine and stays out of it.
        let mut padded = [0u8; 128];
        padded[..102].copy_from_slice(&base);
        let ip = Ipv6Packet::new_checked(&padded[..]).unwrap();
        assert_eq!(ip.payload().len(), 62);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn never_panics(mut data in proptest::collection::vec(any::<u8>(), 0..120), fix in any::<bool>()) {
            if fix && data.len() >= 40 {
                data[0] = 0x60 | (data[0] & 0x0f);
                let plen = (data.len() - 40) as u16;
                data[4..6].copy_from_slice(&plen.to_be_bytes());
            }
            match Ipv6Packet::new_checked(&data[..]) {
                Ok(ip) => {
                    prop_assert_eq!(ip.version(), 6);
                    prop_assert_eq!(ip.payload().len(), usize::from(ip.payload_len()));
                    prop_assert!(ip.flow_label() < (1 << 20));
                    let _ = (ip.traffic_class(), ip.next_header(), ip.hop_limit());
                    prop_assert_eq!(&ip.src_addr().octets()[..], &data[8..24]);
                    prop_assert_eq!(&ip.dst_addr().octets()[..], &data[24..40]);
                }
                Err(WireError::Truncated) => prop_assert!(
                    data.len() < 40 || data.len() < 40 + usize::from(u16::from_be_bytes([data[4], data[5]]))
                ),
                Err(e) => {
                    prop_assert_eq!(e, WireError::Malformed);
                    prop_assert_ne!(data[0] >> 4, 6);
                }
            }
        }

        #[test]
        fn agrees_with_etherparse(
            src in any::<[u8; 16]>(), dst in any::<[u8; 16]>(), hop in any::<u8>(),
            tc in any::<u8>(), flow in 0u32..(1 << 20),
            payload in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let header = etherparse::Ipv6Header {
                traffic_class: tc,
                flow_label: etherparse::Ipv6FlowLabel::try_new(flow).unwrap(),
                payload_length: 0,
                next_header: etherparse::IpNumber::UDP,
                hop_limit: hop,
                source: src,
                destination: dst,
            };
            let builder = etherparse::PacketBuilder::ethernet2([2; 6], [4; 6])
                .ip(etherparse::IpHeaders::Ipv6(header, Default::default()))
                .udp(5353, 5353);
            let mut buf = Vec::new();
            builder.write(&mut buf, &payload).unwrap();
            let theirs = etherparse::Ipv6Header::from_slice(&buf[14..]).unwrap().0;
            let ip = Ipv6Packet::new_checked(&buf[14..]).unwrap();
            prop_assert_eq!(ip.src_addr(), theirs.source_addr());
            prop_assert_eq!(ip.dst_addr(), theirs.destination_addr());
            prop_assert_eq!(ip.hop_limit(), theirs.hop_limit);
            prop_assert_eq!(ip.traffic_class(), theirs.traffic_class);
            prop_assert_eq!(ip.flow_label(), theirs.flow_label.value());
            prop_assert_eq!(ip.payload_len(), theirs.payload_length);
            prop_assert_eq!(ip.next_header().0, theirs.next_header.0);
            prop_assert_eq!(ip.payload().len(), 8 + payload.len());
        }
    }

    #[test]
    fn repr_parses_and_emits_a_header() {
        let ip = Ipv6Packet::new_checked(&IPV6_DNS_QUERY[14..]).unwrap();
        let repr = Ipv6Repr::parse(&ip).unwrap();
        assert_eq!((repr.src_addr, repr.dst_addr), (pod(), dns()));
        assert_eq!((repr.next_header, repr.payload_len), (IpProtocol::UDP, 62));
        assert_eq!((repr.header_len(), repr.buffer_len()), (40, 102));
        let mut buf = [0xffu8; 40];
        repr.emit(&mut Ipv6Packet::new_unchecked(&mut buf[..]));
        // The sample's header but for the flow label, zero in the switch's own packets.
        let mut sample: [u8; 40] = IPV6_DNS_QUERY[14..54].try_into().unwrap();
        Ipv6Packet::new_unchecked(&mut sample[..]).set_flow_label(0);
        assert_eq!(buf, sample);
    }
}
