//! The VXLAN header (RFC 7348), as a zero-copy view in the style of the `wire` module.
//!
//! ```text
//!  0                   1                   2                   3
//! |R|R|R|R|I|R|R|R|            Reserved                           |
//! |                VXLAN Network Identifier (VNI) |   Reserved    |
//! ```
//! Only the I flag (VNI valid) is defined. Receivers must ignore the reserved bits (RFC 7348
//! section 5), and that is what Linux does; so do we, accepting any frame with I set.
//!
//! One extension is understood: remote checksum offload (RCO, draft-herbert-vxlan-rco, Linux's
//! `remcsumtx`/`remcsumrx`). The R flag in the second byte says the inner TCP/UDP checksum was
//! left partial (the field holds the pseudo-header sum, as a checksum-offloaded packet does)
//! and the byte after the VNI says where it starts: `(start / 2) | 0x80 if UDP`, `start`
//! counted from the inner Ethernet header. The outer UDP checksum covers the whole inner frame,
//! so neither end has to sum the payload a second time. It is only sent to peers that said
//! they take it, since a receiver that does not know the flag verifies the partial checksum
//! and drops the segment.

/// Length of the VXLAN header.
pub const HEADER_LEN: usize = 8;
/// The I flag: the VNI field is valid.
pub const FLAG_VNI: u8 = 0x08;
/// The RCO flag, in the second byte (Linux's `VXLAN_HF_RCO`, bit 21 of the first word).
pub const FLAG_RCO: u8 = 0x20;
/// In the RCO byte: the checksum is UDP's (offset 6), not TCP's (offset 16).
const RCO_UDP: u8 = 0x80;
/// Offsets of the checksum field within the TCP and UDP headers.
pub const TCP_CSUM_OFFSET: u16 = 16;
pub const UDP_CSUM_OFFSET: u16 = 6;

/// Where a partial inner checksum is: `start` from the inner Ethernet header, the field
/// `offset` bytes after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rco {
    pub start: u16,
    pub offset: u16,
}
/// Flannel's (and Linux's historical) default VXLAN port.
pub const FLANNEL_PORT: u16 = 8472;
/// The IANA-assigned VXLAN port.
pub const IANA_PORT: u16 = 4789;
/// Outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14): what encapsulation costs.
pub const OVERHEAD_V4: usize = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VxlanError {
    #[error("datagram shorter than a VXLAN header")]
    Truncated,
    #[error("VXLAN header without the VNI flag")]
    NoVni,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanHeader<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> VxlanHeader<T> {
    pub fn new_unchecked(buffer: T) -> Self {
        VxlanHeader { buffer }
    }

    /// Checks the length and the I flag.
    pub fn new_checked(buffer: T) -> Result<Self, VxlanError> {
        let h = VxlanHeader { buffer };
        let b = h.buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(VxlanError::Truncated);
        }
        if b[0] & FLAG_VNI == 0 {
            return Err(VxlanError::NoVni);
        }
        Ok(h)
    }

    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[0]
    }

    /// Where the inner checksum starts, when the sender left it partial (RCO).
    pub fn rco(&self) -> Option<Rco> {
        let b = self.buffer.as_ref();
        if b[1] & FLAG_RCO == 0 {
            return None;
        }
        let udp = b[7] & RCO_UDP != 0;
        Some(Rco {
            start: u16::from(b[7] & !RCO_UDP) << 1,
            offset: if udp {
                UDP_CSUM_OFFSET
            } else {
                TCP_CSUM_OFFSET
            },
        })
    }

    pub fn vni(&self) -> u32 {
        let b = self.buffer.as_ref();
        u32::from_be_bytes([0, b[4], b[5], b[6]])
    }

    /// The encapsulated Ethernet frame.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> VxlanHeader<T> {
    /// Writes a complete header (flags, reserved zero, VNI).
    pub fn emit(&mut self, vni: u32) {
        let b = self.buffer.as_mut();
        b[..HEADER_LEN].fill(0);
        b[0] = FLAG_VNI;
        b[4..7].copy_from_slice(&vni.to_be_bytes()[1..]);
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[HEADER_LEN..]
    }
}

/// Writes a VXLAN header for `vni` into the first 8 bytes of `buf`.
pub fn emit_header(buf: &mut [u8; HEADER_LEN], vni: u32) {
    VxlanHeader::new_unchecked(&mut buf[..]).emit(vni);
}

/// Writes a VXLAN header for `vni` that says the inner checksum is left partial at `rco`.
/// `None` (and the plain header written) when RCO cannot express it: an odd start, one past
/// 254 bytes, or an offset that is neither TCP's nor UDP's.
pub fn emit_header_rco(buf: &mut [u8; HEADER_LEN], vni: u32, rco: Rco) -> Option<()> {
    emit_header(buf, vni);
    let udp = match rco.offset {
        UDP_CSUM_OFFSET => RCO_UDP,
        TCP_CSUM_OFFSET => 0,
        _ => return None,
    };
    if !rco.start.is_multiple_of(2) || rco.start > 254 {
        return None;
    }
    buf[1] |= FLAG_RCO;
    buf[7] = (rco.start >> 1) as u8 | udp;
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // As the Linux kernel sends it for VNI 1 (flannel's default).
    const VNI1: [u8; 8] = [0x08, 0, 0, 0, 0, 0, 0x01, 0];

    #[test]
    fn parses_and_emits_like_linux() {
        let h = VxlanHeader::new_checked(&VNI1[..]).unwrap();
        assert_eq!(h.vni(), 1);
        let mut b = [0xffu8; 8];
        emit_header(&mut b, 1);
        assert_eq!(b, VNI1);
        let mut b = [0u8; 8];
        emit_header(&mut b, 0xabcdef);
        assert_eq!(VxlanHeader::new_checked(&b[..]).unwrap().vni(), 0xabcdef);
        assert_eq!(b[7], 0);
    }

    #[test]
    fn rco_is_encoded_as_linux_does() {
        // Linux's vxlan_compute_rco for an inner TCP/IPv4 segment (checksum start 34 bytes into
        // the inner frame) and for UDP, VNI 1.
        let mut b = [0u8; 8];
        let tcp = Rco {
            start: 34,
            offset: TCP_CSUM_OFFSET,
        };
        emit_header_rco(&mut b, 1, tcp).unwrap();
        assert_eq!(b, [0x08, 0x20, 0, 0, 0, 0, 0x01, 17]);
        let h = VxlanHeader::new_checked(&b[..]).unwrap();
        assert_eq!((h.vni(), h.rco()), (1, Some(tcp)));
        let udp = Rco {
            start: 54,
            offset: UDP_CSUM_OFFSET,
        };
        emit_header_rco(&mut b, 7, udp).unwrap();
        assert_eq!(b, [0x08, 0x20, 0, 0, 0, 0, 0x07, 0x80 | 27]);
        assert_eq!(VxlanHeader::new_checked(&b[..]).unwrap().rco(), Some(udp));
        assert_eq!(VxlanHeader::new_checked(&VNI1[..]).unwrap().rco(), None);
        for bad in [(35, 16), (256, 16), (34, 10)] {
            let r = Rco {
                start: bad.0,
                offset: bad.1,
            };
            assert_eq!(emit_header_rco(&mut b, 1, r), None);
            assert_eq!(b, VNI1);
        }
    }

    #[test]
    fn rejects_short_and_flagless() {
        assert_eq!(
            VxlanHeader::new_checked(&VNI1[..7]),
            Err(VxlanError::Truncated)
        );
        assert_eq!(
            VxlanHeader::new_checked(&[0u8; 8][..]),
            Err(VxlanError::NoVni)
        );
    }

    proptest! {
        #[test]
        fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..32)) {
            if let Ok(h) = VxlanHeader::new_checked(&b[..]) {
                let _ = (h.vni(), h.flags(), h.rco(), h.payload().len());
            }
        }

        #[test]
        fn vni_round_trips(vni in 0u32..(1 << 24)) {
            let mut b = [0u8; 8];
            emit_header(&mut b, vni);
            prop_assert_eq!(VxlanHeader::new_checked(&b[..]).unwrap().vni(), vni);
        }
    }
}
