//! The VXLAN header (RFC 7348), as a zero-copy view in the style of the `wire` module.
//!
//! ```text
//!  0                   1                   2                   3
//! |R|R|R|R|I|R|R|R|            Reserved                           |
//! |                VXLAN Network Identifier (VNI) |   Reserved    |
//! ```
//! Only the I flag (VNI valid) is defined. Receivers must ignore the reserved bits (RFC 7348
//! section 5), and that is what Linux does; so do we, accepting any frame with I set.

/// Length of the VXLAN header.
pub const HEADER_LEN: usize = 8;
/// The I flag: the VNI field is valid.
pub const FLAG_VNI: u8 = 0x08;
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
                let _ = (h.vni(), h.flags(), h.payload().len());
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
