//! ARP for IPv4 over Ethernet (RFC 826), the only flavour a pod network carries.
//!
//! The switch answers ARP for the pod gateway and for remote pods itself (proxy ARP), so replies
//! are built on the fast path: `ArpRepr::emit` and `emit_reply` write into a caller-owned buffer
//! and never allocate. Any other hardware or protocol type is rejected as `Unsupported` by
//! `new_checked`, which is what lets every accessor use fixed offsets.

use std::net::Ipv4Addr;

use super::ethernet::{self, EtherType, EthernetAddress, EthernetFrame};
use super::{be16, put_be16, Field, Result, WireError};

protocol_number! {
    /// The ARP operation code.
    ArpOperation(u16) { REQUEST = 1, REPLY = 2 }
}

/// ARP hardware type for Ethernet.
pub const HTYPE_ETHERNET: u16 = 1;

mod field {
    use super::Field;
    pub const HTYPE: Field = 0..2;
    pub const PTYPE: Field = 2..4;
    pub const HLEN: usize = 4;
    pub const PLEN: usize = 5;
    pub const OPER: Field = 6..8;
    pub const SHA: Field = 8..14;
    pub const SPA: Field = 14..18;
    pub const THA: Field = 18..24;
    pub const TPA: Field = 24..28;
}

fn ipv4(b: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(b[0], b[1], b[2], b[3])
}

view! {
    /// A view of an Ethernet/IPv4 ARP packet.
    ArpPacket
}

impl<T: AsRef<[u8]>> ArpPacket<T> {
    /// Length of an Ethernet/IPv4 ARP packet.
    pub const LEN: usize = 28;

    /// Ensures every accessor is in bounds and the address sizes are the ones the fixed
    /// offsets assume.
    pub fn check_len(&self) -> Result<()> {
        let data = self.buffer.as_ref();
        if data.len() < field::OPER.end {
            return Err(WireError::Truncated);
        }
        if self.hardware_type() != HTYPE_ETHERNET
            || self.protocol_type() != EtherType::IPV4
            || self.hardware_len() != 6
            || self.protocol_len() != 4
        {
            return Err(WireError::Unsupported);
        }
        if data.len() < Self::LEN {
            return Err(WireError::Truncated);
        }
        Ok(())
    }

    pub fn hardware_type(&self) -> u16 {
        be16(&self.buffer.as_ref()[field::HTYPE])
    }

    pub fn protocol_type(&self) -> EtherType {
        EtherType(be16(&self.buffer.as_ref()[field::PTYPE]))
    }

    pub fn hardware_len(&self) -> u8 {
        self.buffer.as_ref()[field::HLEN]
    }

    pub fn protocol_len(&self) -> u8 {
        self.buffer.as_ref()[field::PLEN]
    }

    pub fn operation(&self) -> ArpOperation {
        ArpOperation(be16(&self.buffer.as_ref()[field::OPER]))
    }

    pub fn sender_hardware_addr(&self) -> EthernetAddress {
        EthernetAddress::from_bytes(&self.buffer.as_ref()[field::SHA])
    }

    pub fn sender_protocol_addr(&self) -> Ipv4Addr {
        ipv4(&self.buffer.as_ref()[field::SPA])
    }

    pub fn target_hardware_addr(&self) -> EthernetAddress {
        EthernetAddress::from_bytes(&self.buffer.as_ref()[field::THA])
    }

    pub fn target_protocol_addr(&self) -> Ipv4Addr {
        ipv4(&self.buffer.as_ref()[field::TPA])
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> ArpPacket<T> {
    pub fn set_hardware_type(&mut self, htype: u16) {
        put_be16(&mut self.buffer.as_mut()[field::HTYPE], htype);
    }

    pub fn set_protocol_type(&mut self, ptype: EtherType) {
        put_be16(&mut self.buffer.as_mut()[field::PTYPE], ptype.0);
    }

    pub fn set_hardware_len(&mut self, len: u8) {
        self.buffer.as_mut()[field::HLEN] = len;
    }

    pub fn set_protocol_len(&mut self, len: u8) {
        self.buffer.as_mut()[field::PLEN] = len;
    }

    pub fn set_operation(&mut self, op: ArpOperation) {
        put_be16(&mut self.buffer.as_mut()[field::OPER], op.0);
    }

    pub fn set_sender_hardware_addr(&mut self, addr: EthernetAddress) {
        self.buffer.as_mut()[field::SHA].copy_from_slice(&addr.0);
    }

    pub fn set_sender_protocol_addr(&mut self, addr: Ipv4Addr) {
        self.buffer.as_mut()[field::SPA].copy_from_slice(&addr.octets());
    }

    pub fn set_target_hardware_addr(&mut self, addr: EthernetAddress) {
        self.buffer.as_mut()[field::THA].copy_from_slice(&addr.0);
    }

    pub fn set_target_protocol_addr(&mut self, addr: Ipv4Addr) {
        self.buffer.as_mut()[field::TPA].copy_from_slice(&addr.octets());
    }
}

/// The meaning of an Ethernet/IPv4 ARP packet, detached from its buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ArpRepr {
    pub operation: ArpOperation,
    pub sender_hardware_addr: EthernetAddress,
    pub sender_protocol_addr: Ipv4Addr,
    pub target_hardware_addr: EthernetAddress,
    pub target_protocol_addr: Ipv4Addr,
}

impl ArpRepr {
    /// Reads a packet, re-checking it so that a view made with `new_unchecked` is safe too.
    pub fn parse<T: AsRef<[u8]>>(packet: &ArpPacket<T>) -> Result<ArpRepr> {
        packet.check_len()?;
        Ok(ArpRepr {
            operation: packet.operation(),
            sender_hardware_addr: packet.sender_hardware_addr(),
            sender_protocol_addr: packet.sender_protocol_addr(),
            target_hardware_addr: packet.target_hardware_addr(),
            target_protocol_addr: packet.target_protocol_addr(),
        })
    }

    /// Bytes `emit` writes.
    pub const fn buffer_len(&self) -> usize {
        28
    }

    /// Writes every field, including the fixed Ethernet/IPv4 type and length fields.
    ///
    /// # Panics
    /// If the packet's buffer is shorter than [`ArpPacket::LEN`].
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut ArpPacket<T>) {
        packet.set_hardware_type(HTYPE_ETHERNET);
        packet.set_protocol_type(EtherType::IPV4);
        packet.set_hardware_len(6);
        packet.set_protocol_len(4);
        packet.set_operation(self.operation);
        packet.set_sender_hardware_addr(self.sender_hardware_addr);
        packet.set_sender_protocol_addr(self.sender_protocol_addr);
        packet.set_target_hardware_addr(self.target_hardware_addr);
        packet.set_target_protocol_addr(self.target_protocol_addr);
    }
}

/// Writes a complete Ethernet + ARP reply saying "`our_ip` is at `our_mac`" to the host
/// `to_mac`/`to_ip`, and returns its length (42 bytes; TAP devices and VXLAN do not need the
/// 60-byte minimum padding, the kernel adds it where a wire needs it).
///
/// Fails with `Truncated`, touching nothing, if `buf` is shorter than 42 bytes.
pub fn emit_reply(
    buf: &mut [u8],
    our_mac: EthernetAddress,
    our_ip: Ipv4Addr,
    to_mac: EthernetAddress,
    to_ip: Ipv4Addr,
) -> Result<usize> {
    const LEN: usize = ethernet::HEADER_LEN + ArpPacket::<&[u8]>::LEN;
    let buf = buf.get_mut(..LEN).ok_or(WireError::Truncated)?;
    let mut frame = EthernetFrame::new_unchecked(&mut *buf);
    frame.set_dst_addr(to_mac);
    frame.set_src_addr(our_mac);
    frame.set_ethertype(EtherType::ARP);
    let repr = ArpRepr {
        operation: ArpOperation::REPLY,
        sender_hardware_addr: our_mac,
        sender_protocol_addr: our_ip,
        target_hardware_addr: to_mac,
        target_protocol_addr: to_ip,
    };
    repr.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
    Ok(LEN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::testdata::ARP_REQUEST;
    use proptest::prelude::*;

    const POD_MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
    const GW_MAC: EthernetAddress = EthernetAddress([0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x01]);
    const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
    const GW_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);

    #[test]
    fn parse_request() {
        let arp = ArpPacket::new_checked(&ARP_REQUEST[14..]).unwrap();
        assert_eq!(arp.operation(), ArpOperation::REQUEST);
        assert_eq!(arp.sender_hardware_addr(), POD_MAC);
        assert_eq!(arp.sender_protocol_addr(), POD_IP);
        assert_eq!(arp.target_hardware_addr(), EthernetAddress([0; 6]));
        assert_eq!(arp.target_protocol_addr(), GW_IP);
        let repr = ArpRepr::parse(&arp).unwrap();
        assert_eq!(
            repr,
            ArpRepr {
                operation: ArpOperation::REQUEST,
                sender_hardware_addr: POD_MAC,
                sender_protocol_addr: POD_IP,
                target_hardware_addr: EthernetAddress([0; 6]),
                target_protocol_addr: GW_IP,
            }
        );
        // Re-emitting the parsed request reproduces the bytes exactly.
        let mut buf = [0u8; 28];
        repr.emit(&mut ArpPacket::new_unchecked(&mut buf[..]));
        assert_eq!(buf[..], ARP_REQUEST[14..42]);
    }

    #[test]
    fn reply_to_request() {
        let req = ArpPacket::new_checked(&ARP_REQUEST[14..]).unwrap();
        let mut buf = [0xeeu8; 64];
        let n = emit_reply(
            &mut buf,
            GW_MAC,
            req.target_protocol_addr(),
            req.sender_hardware_addr(),
            req.sender_protocol_addr(),
        )
        .unwrap();
        assert_eq!(n, 42);
        #[rustfmt::skip]
        let expected: [u8; 42] = [
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x01, 0x08, 0x06,
            0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x02,
            0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x01, 10, 244, 1, 1,
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 10, 244, 1, 5,
        ];
        assert_eq!(buf[..42], expected);
        assert!(buf[42..].iter().all(|&b| b == 0xee), "wrote past the reply");

        // An independent parser reads it as the reply we meant.
        let theirs = etherparse::PacketHeaders::from_ethernet_slice(&buf[..n]).unwrap();
        let Some(etherparse::NetHeaders::Arp(arp)) = theirs.net else {
            panic!("etherparse did not see ARP: {:?}", theirs.net)
        };
        let arp = arp.try_eth_ipv4().unwrap();
        assert_eq!(arp.operation, etherparse::ArpOperation::REPLY);
        assert_eq!(arp.sender_mac, GW_MAC.0);
        assert_eq!(arp.sender_ipv4_addr(), GW_IP);
        assert_eq!(arp.target_mac, POD_MAC.0);
        assert_eq!(arp.target_ipv4_addr(), POD_IP);
    }

    #[test]
    fn reply_into_small_buffer_is_an_error() {
        let mut buf = [0u8; 41];
        assert_eq!(
            emit_reply(&mut buf, GW_MAC, GW_IP, POD_MAC, POD_IP),
            Err(WireError::Truncated)
        );
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[test]
    fn rejects_other_address_families() {
        let mut pkt = [0u8; 28];
        pkt.copy_from_slice(&ARP_REQUEST[14..42]);
        let check = |p: &[u8]| ArpPacket::new_checked(p).map(|_| ());
        assert_eq!(check(&pkt), Ok(()));
        assert_eq!(check(&pkt[..27]), Err(WireError::Truncated));
        assert_eq!(check(&pkt[..7]), Err(WireError::Truncated));
        for (offset, value) in [(1, 6u8), (2, 0x86), (4, 8), (5, 16)] {
            let mut bad = pkt;
            bad[offset] = value;
            assert_eq!(
                check(&bad),
                Err(WireError::Unsupported),
                "byte {offset} = {value}"
            );
            // A short packet of the wrong family is reported as unsupported, not truncated.
            assert_eq!(check(&bad[..10]), Err(WireError::Unsupported));
        }
        // A view made without checks is still checked by `ArpRepr::parse`.
        let mut bad = pkt;
        bad[5] = 16;
        assert_eq!(
            ArpRepr::parse(&ArpPacket::new_unchecked(&bad[..])),
            Err(WireError::Unsupported)
        );
    }

    #[test]
    fn setters_write_their_fields() {
        let mut buf = [0u8; 28];
        let mut p = ArpPacket::new_unchecked(&mut buf[..]);
        p.set_hardware_type(1);
        p.set_protocol_type(EtherType::IPV4);
        p.set_hardware_len(6);
        p.set_protocol_len(4);
        p.set_operation(ArpOperation(0x1234));
        p.set_sender_hardware_addr(GW_MAC);
        p.set_sender_protocol_addr(GW_IP);
        p.set_target_hardware_addr(POD_MAC);
        p.set_target_protocol_addr(POD_IP);
        let p = ArpPacket::new_checked(p.into_inner()).unwrap();
        assert_eq!(p.operation(), ArpOperation(0x1234));
        assert_eq!(p.sender_hardware_addr(), GW_MAC);
        assert_eq!(p.sender_protocol_addr(), GW_IP);
        assert_eq!(p.target_hardware_addr(), POD_MAC);
        assert_eq!(p.target_protocol_addr(), POD_IP);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn never_panics(mut data in proptest::collection::vec(any::<u8>(), 0..40),
                        valid_prefix in any::<bool>()) {
            if valid_prefix && data.len() >= 6 {
                // Without this almost no input would get past the type checks.
                data[..6].copy_from_slice(&[0, 1, 8, 0, 6, 4]);
            }
            match ArpPacket::new_checked(&data[..]) {
                Ok(p) => {
                    prop_assert!(data.len() >= 28);
                    let r = ArpRepr::parse(&p).unwrap();
                    prop_assert_eq!(r.sender_protocol_addr.octets(), <[u8; 4]>::try_from(&data[14..18]).unwrap());
                    prop_assert_eq!(r.target_hardware_addr.0, <[u8; 6]>::try_from(&data[18..24]).unwrap());
                    let mut out = [0u8; 28];
                    r.emit(&mut ArpPacket::new_unchecked(&mut out[..]));
                    prop_assert_eq!(&out[..], &data[..28]);
                }
                Err(WireError::Truncated) => prop_assert!(data.len() < 28),
                Err(e) => {
                    prop_assert_eq!(e, WireError::Unsupported);
                    prop_assert_ne!(&data[..6], &[0, 1, 8, 0, 6, 4]);
                }
            }
        }

        #[test]
        fn agrees_with_etherparse(smac in any::<[u8; 6]>(), sip in any::<[u8; 4]>(),
                                  tmac in any::<[u8; 6]>(), tip in any::<[u8; 4]>(),
                                  reply in any::<bool>()) {
            let op = if reply { etherparse::ArpOperation::REPLY } else { etherparse::ArpOperation::REQUEST };
            let theirs = etherparse::ArpEthIpv4Packet {
                operation: op,
                sender_mac: smac,
                sender_ipv4: sip,
                target_mac: tmac,
                target_ipv4: tip,
            };
            let bytes = theirs.to_bytes();
            let ours = ArpPacket::new_checked(&bytes[..]).unwrap();
            prop_assert_eq!(ours.operation().0, op.0);
            prop_assert_eq!(ours.sender_hardware_addr().0, smac);
            prop_assert_eq!(ours.sender_protocol_addr().octets(), sip);
            prop_assert_eq!(ours.target_hardware_addr().0, tmac);
            prop_assert_eq!(ours.target_protocol_addr().octets(), tip);

            // And the other way: what we emit, etherparse reads back.
            let mut buf = [0u8; 28];
            ArpRepr::parse(&ours).unwrap().emit(&mut ArpPacket::new_unchecked(&mut buf[..]));
            let back = etherparse::ArpPacket::from_slice(&buf).unwrap().try_eth_ipv4().unwrap();
            prop_assert_eq!(back, theirs);
        }
    }
}
