//! Ethernet II frames and MAC addresses.
//!
//! The switch learns and forwards on MAC addresses, so `EthernetAddress` is a plain `Copy`
//! array that hashes and compares as bytes. VLAN tags are deliberately not parsed: pod ports are
//! untagged, and a tagged frame simply reports `EtherType::VLAN` so the pipeline can count and
//! drop it instead of misreading the tag as an L3 header. 802.3 length-field frames also just
//! report their length as the "ethertype"; no IP traffic uses them.

use core::fmt;
use core::str::FromStr;

use super::{be16, check_lengths, put_be16, Field, Result};

/// A 48-bit IEEE MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct EthernetAddress(pub [u8; 6]);

impl EthernetAddress {
    /// ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: EthernetAddress = EthernetAddress([0xff; 6]);

    /// Builds an address from the first six bytes of `data`.
    ///
    /// # Panics
    /// If `data` is shorter than six bytes; views only call it on checked ranges.
    pub fn from_bytes(data: &[u8]) -> EthernetAddress {
        let mut a = [0; 6];
        a.copy_from_slice(&data[..6]);
        EthernetAddress(a)
    }

    /// The six bytes in wire order.
    pub const fn as_bytes(&self) -> &[u8; 6] {
        &self.0
    }

    pub fn is_broadcast(&self) -> bool {
        *self == Self::BROADCAST
    }

    /// The group bit (I/G) is set; broadcast is a multicast address too.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    pub fn is_unicast(&self) -> bool {
        !self.is_multicast()
    }

    /// The locally administered bit (U/L) is set, as on every MAC a CNI plugin makes up.
    pub fn is_local(&self) -> bool {
        self.0[0] & 0x02 != 0
    }
}

impl fmt::Display for EthernetAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// A MAC address string was not six colon-separated pairs of hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?}: expected six colon-separated hex pairs like 0a:58:0a:f4:01:05")]
pub struct ParseEthernetAddressError(pub String);

impl FromStr for EthernetAddress {
    type Err = ParseEthernetAddressError;

    /// Accepts `aa:bb:cc:dd:ee:ff` (either case), exactly as `ip link` prints it. Other
    /// spellings are refused rather than guessed at, so a typo in a config is reported.
    fn from_str(s: &str) -> core::result::Result<Self, Self::Err> {
        let err = || ParseEthernetAddressError(s.to_owned());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 || !part.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(EthernetAddress(out))
    }
}

impl From<[u8; 6]> for EthernetAddress {
    fn from(a: [u8; 6]) -> Self {
        EthernetAddress(a)
    }
}

protocol_number! {
    /// The EtherType field.
    EtherType(u16) { IPV4 = 0x0800, ARP = 0x0806, VLAN = 0x8100, IPV6 = 0x86DD }
}

impl fmt::Display for EtherType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{:04x}", self.0)
    }
}

mod field {
    use super::Field;
    pub const DST: Field = 0..6;
    pub const SRC: Field = 6..12;
    pub const ETHERTYPE: Field = 12..14;
    pub const PAYLOAD: usize = 14;
}

/// Length of the Ethernet II header: the one definition every frame offset in the switch uses.
pub const HEADER_LEN: usize = field::PAYLOAD;

view! {
    /// A view of an Ethernet II frame (without FCS: TAP devices and sockets never carry one).
    EthernetFrame
}

impl<T: AsRef<[u8]>> EthernetFrame<T> {
    /// Length of the Ethernet II header ([`HEADER_LEN`]).
    pub const HEADER_LEN: usize = HEADER_LEN;

    /// Ensures every accessor is in bounds: the buffer holds a whole header.
    pub fn check_len(&self) -> Result<()> {
        check_lengths(self.buffer.as_ref().len(), HEADER_LEN, || HEADER_LEN)
    }

    pub fn dst_addr(&self) -> EthernetAddress {
        EthernetAddress::from_bytes(&self.buffer.as_ref()[field::DST])
    }

    pub fn src_addr(&self) -> EthernetAddress {
        EthernetAddress::from_bytes(&self.buffer.as_ref()[field::SRC])
    }

    /// The EtherType (0x8100 for a tagged frame: tags are not looked through).
    pub fn ethertype(&self) -> EtherType {
        EtherType(be16(&self.buffer.as_ref()[field::ETHERTYPE]))
    }

    /// Everything after the header, including any padding up to the 60-byte minimum: the L3
    /// header's own length field says where its packet ends.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[field::PAYLOAD..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> EthernetFrame<T> {
    pub fn set_dst_addr(&mut self, addr: EthernetAddress) {
        self.buffer.as_mut()[field::DST].copy_from_slice(&addr.0);
    }

    pub fn set_src_addr(&mut self, addr: EthernetAddress) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(&addr.0);
    }

    pub fn set_ethertype(&mut self, ethertype: EtherType) {
        put_be16(&mut self.buffer.as_mut()[field::ETHERTYPE], ethertype.0);
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::PAYLOAD..]
    }
}

/// The meaning of an Ethernet II header, detached from its buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EthernetRepr {
    pub src_addr: EthernetAddress,
    pub dst_addr: EthernetAddress,
    pub ethertype: EtherType,
}

impl EthernetRepr {
    /// Reads a frame's header, re-checking it so that a view made with `new_unchecked` is
    /// safe too.
    pub fn parse<T: AsRef<[u8]>>(frame: &EthernetFrame<T>) -> Result<EthernetRepr> {
        frame.check_len()?;
        Ok(EthernetRepr {
            src_addr: frame.src_addr(),
            dst_addr: frame.dst_addr(),
            ethertype: frame.ethertype(),
        })
    }

    /// Bytes `emit` writes.
    pub const fn header_len(&self) -> usize {
        HEADER_LEN
    }

    /// Writes the header; the payload is the caller's.
    ///
    /// # Panics
    /// If the frame's buffer is shorter than [`HEADER_LEN`].
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, frame: &mut EthernetFrame<T>) {
        frame.set_dst_addr(self.dst_addr);
        frame.set_src_addr(self.src_addr);
        frame.set_ethertype(self.ethertype);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::testdata::{ARP_REQUEST, ICMP_ECHO, IPV6_DNS_QUERY};
    use crate::wire::WireError;
    use proptest::prelude::*;

    const POD_MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
    const GW_MAC: EthernetAddress = EthernetAddress([0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x01]);

    #[test]
    fn parses_broadcast_arp_frame() {
        let f = EthernetFrame::new_checked(&ARP_REQUEST[..]).unwrap();
        assert_eq!(f.dst_addr(), EthernetAddress::BROADCAST);
        assert!(f.dst_addr().is_broadcast() && f.dst_addr().is_multicast());
        assert_eq!(f.src_addr(), POD_MAC);
        assert_eq!(f.ethertype(), EtherType::ARP);
        // The padding to 60 bytes stays in the payload; ARP's own length bounds it.
        assert_eq!(f.payload().len(), 60 - 14);
        assert_eq!(&f.payload()[..2], &[0x00, 0x01]);
    }

    #[test]
    fn parses_unicast_ip_frames() {
        let f = EthernetFrame::new_checked(&ICMP_ECHO[..]).unwrap();
        assert_eq!(f.dst_addr(), GW_MAC);
        assert!(f.dst_addr().is_unicast() && f.dst_addr().is_local());
        // QEMU's 52:54:00 prefix has the U/L bit set as well.
        assert!(f.src_addr().is_local());
        assert_eq!(f.ethertype(), EtherType::IPV4);
        assert_eq!(f.payload()[0], 0x45);
        let f = EthernetFrame::new_checked(&IPV6_DNS_QUERY[..]).unwrap();
        assert_eq!(f.ethertype(), EtherType::IPV6);
    }

    #[test]
    fn vlan_tag_is_reported_not_parsed() {
        let mut frame = ICMP_ECHO;
        EthernetFrame::new_unchecked(&mut frame[..]).set_ethertype(EtherType::VLAN);
        let f = EthernetFrame::new_checked(&frame[..]).unwrap();
        assert_eq!(f.ethertype(), EtherType::VLAN);
        assert_eq!(f.payload().len(), ICMP_ECHO.len() - 14);
    }

    #[test]
    fn rejects_short_buffers() {
        assert_eq!(
            EthernetFrame::new_checked(&[0u8; 13][..]).unwrap_err(),
            WireError::Truncated
        );
        let f = EthernetFrame::new_checked(&[0u8; 14][..]).unwrap();
        assert!(f.payload().is_empty());
    }

    #[test]
    fn construct_frame() {
        let mut buf = [0u8; 20];
        let mut f = EthernetFrame::new_checked(&mut buf[..]).unwrap();
        f.set_dst_addr(EthernetAddress::BROADCAST);
        f.set_src_addr(GW_MAC);
        f.set_ethertype(EtherType::IPV6);
        f.payload_mut().copy_from_slice(b"abcdef");
        assert_eq!(
            buf,
            [
                0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x01, 0x86, 0xdd,
                b'a', b'b', b'c', b'd', b'e', b'f'
            ]
        );
        assert_eq!(EthernetFrame::new_unchecked(&buf).into_inner(), &buf);
    }

    #[test]
    fn address_display_and_parse() {
        assert_eq!(GW_MAC.to_string(), "0a:58:0a:f4:01:01");
        assert_eq!(
            "0A:58:0a:F4:01:01".parse::<EthernetAddress>().unwrap(),
            GW_MAC
        );
        assert_eq!(
            "ff:ff:ff:ff:ff:ff".parse::<EthernetAddress>().unwrap(),
            EthernetAddress::BROADCAST
        );
        for bad in [
            "",
            "0a:58:0a:f4:01",
            "0a:58:0a:f4:01:01:02",
            "0a:58:0a:f4:01:1",
            "0a-58-0a-f4-01-01",
            "0a:58:0a:f4:01:0g",
            "0a:58:0a:f4:01:+1",
            "0a:58:0a:f4:01:01:",
        ] {
            let err = bad.parse::<EthernetAddress>().unwrap_err();
            assert_eq!(err, ParseEthernetAddressError(bad.to_owned()));
            assert!(err
                .to_string()
                .contains("expected six colon-separated hex pairs"));
        }
    }

    #[test]
    fn address_classes() {
        let mcast = EthernetAddress([0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb]);
        assert!(mcast.is_multicast() && !mcast.is_broadcast() && !mcast.is_unicast());
        assert!(!mcast.is_local());
        assert!(EthernetAddress([0x02, 0, 0, 0, 0, 1]).is_local());
        assert!(EthernetAddress::default().is_unicast());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            match EthernetFrame::new_checked(&data[..]) {
                Ok(f) => {
                    prop_assert_eq!(f.dst_addr().0, <[u8; 6]>::try_from(&data[0..6]).unwrap());
                    prop_assert_eq!(f.src_addr().0, <[u8; 6]>::try_from(&data[6..12]).unwrap());
                    prop_assert_eq!(f.ethertype().0, u16::from_be_bytes([data[12], data[13]]));
                    prop_assert_eq!(f.payload(), &data[14..]);
                }
                Err(e) => {
                    prop_assert!(data.len() < 14);
                    prop_assert_eq!(e, WireError::Truncated);
                }
            }
        }

        #[test]
        fn display_parse_roundtrip(a in any::<[u8; 6]>()) {
            let addr = EthernetAddress(a);
            prop_assert_eq!(addr.to_string().parse::<EthernetAddress>().unwrap(), addr);
        }

        #[test]
        fn agrees_with_etherparse(src in any::<[u8; 6]>(), dst in any::<[u8; 6]>(),
                                  payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let builder = etherparse::PacketBuilder::ethernet2(src, dst)
                .ipv4([10, 244, 1, 5], [10, 244, 2, 7], 64)
                .udp(1000, 2000);
            let mut buf = Vec::with_capacity(builder.size(payload.len()));
            builder.write(&mut buf, &payload).unwrap();
            let theirs = etherparse::Ethernet2Header::from_slice(&buf).unwrap().0;
            let ours = EthernetFrame::new_checked(&buf[..]).unwrap();
            prop_assert_eq!(ours.src_addr().0, theirs.source);
            prop_assert_eq!(ours.dst_addr().0, theirs.destination);
            prop_assert_eq!(ours.ethertype().0, theirs.ether_type.0);
            prop_assert_eq!(ours.ethertype(), EtherType::IPV4);
            prop_assert_eq!(ours.payload().len(), 20 + 8 + payload.len());
        }
    }

    #[test]
    fn repr_parses_and_emits_a_header() {
        let frame = EthernetFrame::new_checked(&ICMP_ECHO[..]).unwrap();
        let repr = EthernetRepr::parse(&frame).unwrap();
        assert_eq!(repr.ethertype, EtherType::IPV4);
        assert_eq!(repr.header_len(), HEADER_LEN);
        let mut buf = [0xffu8; HEADER_LEN];
        repr.emit(&mut EthernetFrame::new_unchecked(&mut buf[..]));
        assert_eq!(buf[..], ICMP_ECHO[..HEADER_LEN]);
    }
}
