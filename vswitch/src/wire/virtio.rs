//! The `virtio_net_hdr` that a TAP device opened with `IFF_VNET_HDR` puts before every frame.
//!
//! This header is what makes a userspace switch fast: with `TUNSETOFFLOAD` the kernel hands us
//! one 64 KB TCP super-frame per read instead of forty-odd 1500-byte ones, and leaves the L4
//! checksum unfinished (`F_NEEDS_CSUM`) because nobody has to compute it if the frame goes on
//! to another TAP or to a NIC that offloads it. So a frame in the pipeline always travels with
//! its header, and the header is a plain `Copy` struct parsed once per read rather than a view.
//!
//! Byte order: the fields are little-endian here. Legacy virtio uses the host's byte order and
//! virtio 1.0 uses little-endian; the datapath only sets the header up on little-endian hosts,
//! where both agree, so no `TUNSETVNETLE` juggling is needed. We use the 10-byte header
//! (`TUNSETVNETHDRSZ` 10); the 12-byte `virtio_net_hdr_mrg_rxbuf` only adds `num_buffers`,
//! which means nothing on a TAP.

use super::checksum;
use super::{put_be16, Result, WireError};

/// `struct virtio_net_hdr` (virtio spec §5.1.6, `<linux/virtio_net.h>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct VirtioNetHdr {
    /// `F_NEEDS_CSUM` and/or `F_DATA_VALID`.
    pub flags: u8,
    /// One of the `GSO_*` values, possibly or-ed with `GSO_ECN`.
    pub gso_type: u8,
    /// Length of the Ethernet + IP + L4 headers of a GSO frame (a hint; may be zero).
    pub hdr_len: u16,
    /// Payload bytes per segment when the frame is cut up (the MSS for TCP).
    pub gso_size: u16,
    /// Offset from the start of the Ethernet frame where checksumming starts.
    pub csum_start: u16,
    /// Offset from `csum_start` of the 16-bit field that receives the checksum.
    pub csum_offset: u16,
}

impl VirtioNetHdr {
    /// Bytes on the wire.
    pub const LEN: usize = 10;

    /// No offload: a complete frame with valid checksums. This is what to write in front of a
    /// frame the switch built or finished itself.
    pub const NONE: VirtioNetHdr = VirtioNetHdr {
        flags: 0,
        gso_type: Self::GSO_NONE,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
    };

    /// The L4 checksum is unfinished: the field at `csum_start + csum_offset` holds the
    /// pseudo-header sum, and the sum from `csum_start` to the end still has to be added.
    pub const F_NEEDS_CSUM: u8 = 1;
    /// The sender has already verified the checksums (receive side only).
    pub const F_DATA_VALID: u8 = 2;

    pub const GSO_NONE: u8 = 0;
    pub const GSO_TCPV4: u8 = 1;
    pub const GSO_UDP: u8 = 3;
    pub const GSO_TCPV6: u8 = 4;
    pub const GSO_UDP_L4: u8 = 5;
    /// Or-ed into `gso_type`: the TCP stream has ECN CWR set and segments must keep it.
    pub const GSO_ECN: u8 = 0x80;

    /// Reads the header from the first ten bytes of `data` (the frame follows them).
    pub fn parse(data: &[u8]) -> Result<VirtioNetHdr> {
        let b = data.get(..Self::LEN).ok_or(WireError::Truncated)?;
        let le16 = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Ok(VirtioNetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le16(2),
            gso_size: le16(4),
            csum_start: le16(6),
            csum_offset: le16(8),
        })
    }

    /// The ten bytes on the wire.
    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }

    /// Writes the header into the first ten bytes of `buf`.
    ///
    /// # Panics
    /// If `buf` is shorter than [`Self::LEN`]; the datapath reserves the room up front.
    pub fn emit(&self, buf: &mut [u8]) {
        buf[..Self::LEN].copy_from_slice(&self.to_bytes());
    }

    pub fn needs_csum(&self) -> bool {
        self.flags & Self::F_NEEDS_CSUM != 0
    }

    /// The GSO type without the ECN bit.
    pub fn gso_kind(&self) -> u8 {
        self.gso_type & !Self::GSO_ECN
    }

    /// The frame is a super-frame that must be segmented before it meets a real MTU.
    pub fn is_gso(&self) -> bool {
        self.gso_kind() != Self::GSO_NONE
    }
}

/// Completes the L4 checksum of a frame that arrived with `F_NEEDS_CSUM`, as the kernel's
/// `skb_checksum_help` would: sums from `csum_start` to the end of `frame` (the field already
/// holds the pseudo-header sum), and stores the folded complement in the field. Needed before a
/// frame leaves through something that will not finish the checksum for us: the capture tap, a
/// VXLAN peer without offload, or the switch's own DNS and NAT code that must verify it.
///
/// A frame without `F_NEEDS_CSUM` is left alone. GSO super-frames are refused with
/// `Unsupported`: their checksum has to be computed per segment, after segmentation. Offsets
/// that do not fit in the frame are `Malformed`. Pass the frame only, without the virtio
/// header, and bounded at its real end (any padding would be summed).
///
/// Clear `F_NEEDS_CSUM` in the header that goes out with the frame afterwards.
pub fn finish_checksum(hdr: &VirtioNetHdr, frame: &mut [u8]) -> Result<()> {
    if !hdr.needs_csum() {
        return Ok(());
    }
    if hdr.is_gso() {
        return Err(WireError::Unsupported);
    }
    let start = usize::from(hdr.csum_start);
    let at = start + usize::from(hdr.csum_offset);
    if at + 2 > frame.len() {
        return Err(WireError::Malformed);
    }
    // A result of zero is sent as 0xffff: equivalent for TCP, and required for UDP, where a
    // zero would mean "no checksum".
    let csum = match checksum::finish(checksum::sum(&frame[start..])) {
        0 => 0xffff,
        c => c,
    };
    put_be16(&mut frame[at..at + 2], csum);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::checksum;
    use crate::wire::testdata::{DNS_QUERY, TCP_SYN};
    use crate::wire::{Ipv4Packet, TcpPacket, UdpPacket};
    use proptest::prelude::*;

    /// What a TAP hands over for a TSO burst from a pod: TCPv4 GSO, MSS 1448, checksum to be
    /// finished at byte 34 + 16.
    const TSO_HDR: [u8; 10] = [0x01, 0x01, 0x42, 0x00, 0xa8, 0x05, 0x22, 0x00, 0x10, 0x00];

    #[test]
    fn parse_tso_header() {
        let h = VirtioNetHdr::parse(&TSO_HDR).unwrap();
        assert_eq!(
            h,
            VirtioNetHdr {
                flags: VirtioNetHdr::F_NEEDS_CSUM,
                gso_type: VirtioNetHdr::GSO_TCPV4,
                hdr_len: 66,
                gso_size: 1448,
                csum_start: 34,
                csum_offset: 16,
            }
        );
        assert!(h.needs_csum() && h.is_gso());
        assert_eq!(h.to_bytes(), TSO_HDR);
        let mut buf = [0xffu8; 12];
        h.emit(&mut buf);
        assert_eq!(buf[..10], TSO_HDR);
        assert_eq!(buf[10..], [0xff, 0xff]);
    }

    #[test]
    fn none_header() {
        assert_eq!(VirtioNetHdr::NONE.to_bytes(), [0; 10]);
        assert_eq!(VirtioNetHdr::NONE, VirtioNetHdr::default());
        assert!(!VirtioNetHdr::NONE.is_gso() && !VirtioNetHdr::NONE.needs_csum());
        let ecn_only = VirtioNetHdr {
            gso_type: VirtioNetHdr::GSO_ECN,
            ..VirtioNetHdr::NONE
        };
        assert!(!ecn_only.is_gso());
        let ecn_tcp6 = VirtioNetHdr {
            gso_type: 0x84,
            ..VirtioNetHdr::NONE
        };
        assert_eq!(ecn_tcp6.gso_kind(), VirtioNetHdr::GSO_TCPV6);
    }

    #[test]
    fn parse_needs_ten_bytes() {
        assert_eq!(
            VirtioNetHdr::parse(&TSO_HDR[..9]),
            Err(WireError::Truncated)
        );
        assert_eq!(VirtioNetHdr::parse(&[]), Err(WireError::Truncated));
        // Trailing bytes are the frame, not an error.
        let mut with_frame = [0u8; 20];
        with_frame[..10].copy_from_slice(&TSO_HDR);
        assert!(VirtioNetHdr::parse(&with_frame).is_ok());
    }

    /// Replaces the finished checksum at `at` with the partial pseudo-header sum a kernel leaves.
    fn make_partial(frame: &mut [u8], at: usize, pseudo: u32) {
        frame[at..at + 2].copy_from_slice(&checksum::fold(pseudo).to_be_bytes());
    }

    #[test]
    fn finishes_tcp_checksum_like_the_kernel() {
        let mut frame = TCP_SYN;
        let ip = Ipv4Packet::new_checked(&TCP_SYN[14..]).unwrap();
        let pseudo = checksum::pseudo_header_v4(ip.src_addr(), ip.dst_addr(), 6, 40);
        make_partial(&mut frame, 14 + 20 + 16, pseudo);
        assert_ne!(frame, TCP_SYN);
        let hdr = VirtioNetHdr {
            flags: VirtioNetHdr::F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 16,
            ..VirtioNetHdr::NONE
        };
        finish_checksum(&hdr, &mut frame).unwrap();
        assert_eq!(frame, TCP_SYN);
        let tcp = TcpPacket::new_checked(&frame[34..]).unwrap();
        assert!(tcp.verify_checksum(ip.src_addr(), ip.dst_addr()));
    }

    #[test]
    fn finishes_udp_checksum() {
        let mut frame = DNS_QUERY;
        let ip = Ipv4Packet::new_checked(&DNS_QUERY[14..]).unwrap();
        let pseudo = checksum::pseudo_header_v4(ip.src_addr(), ip.dst_addr(), 17, 73);
        make_partial(&mut frame, 14 + 20 + 6, pseudo);
        let hdr = VirtioNetHdr {
            flags: VirtioNetHdr::F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 6,
            ..VirtioNetHdr::NONE
        };
        finish_checksum(&hdr, &mut frame).unwrap();
        assert_eq!(frame, DNS_QUERY);
        let udp = UdpPacket::new_checked(&frame[34..]).unwrap();
        assert_eq!(udp.checksum(), 0x6f02);
    }

    #[test]
    fn finish_checksum_edge_cases() {
        let hdr = VirtioNetHdr {
            flags: VirtioNetHdr::F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 16,
            ..VirtioNetHdr::NONE
        };
        // Without NEEDS_CSUM nothing is touched, even with offsets outside the frame.
        let mut frame = TCP_SYN;
        let skip = VirtioNetHdr {
            flags: VirtioNetHdr::F_DATA_VALID,
            csum_start: 999,
            ..hdr
        };
        assert_eq!(finish_checksum(&skip, &mut frame), Ok(()));
        assert_eq!(frame, TCP_SYN);
        // Offsets past the end.
        let past = VirtioNetHdr {
            csum_start: 60,
            csum_offset: 13,
            ..hdr
        };
        assert_eq!(
            finish_checksum(&past, &mut frame),
            Err(WireError::Malformed)
        );
        let max = VirtioNetHdr {
            csum_start: u16::MAX,
            csum_offset: u16::MAX,
            ..hdr
        };
        assert_eq!(finish_checksum(&max, &mut frame), Err(WireError::Malformed));
        // The field may be the last two bytes of the frame.
        let last = VirtioNetHdr {
            csum_start: 70,
            csum_offset: 2,
            ..hdr
        };
        assert_eq!(finish_checksum(&last, &mut frame), Ok(()));
        // GSO frames are finished per segment, not here.
        let gso = VirtioNetHdr {
            gso_type: VirtioNetHdr::GSO_TCPV4,
            ..hdr
        };
        let mut frame = TCP_SYN;
        assert_eq!(
            finish_checksum(&gso, &mut frame),
            Err(WireError::Unsupported)
        );
        assert_eq!(frame, TCP_SYN);
    }

    #[test]
    fn zero_result_is_sent_as_all_ones() {
        // Bytes summing to 0xffff: the complement is zero, which must go out as 0xffff.
        let mut frame = [0x12, 0x34, 0x00, 0x00, 0xed, 0xcb];
        let hdr = VirtioNetHdr {
            flags: VirtioNetHdr::F_NEEDS_CSUM,
            csum_offset: 2,
            ..VirtioNetHdr::NONE
        };
        finish_checksum(&hdr, &mut frame).unwrap();
        assert_eq!(frame[2..4], [0xff, 0xff]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn parse_emit_roundtrip(bytes in any::<[u8; 10]>()) {
            let h = VirtioNetHdr::parse(&bytes).unwrap();
            prop_assert_eq!(h.to_bytes(), bytes);
            prop_assert_eq!(h.csum_start, u16::from_le_bytes([bytes[6], bytes[7]]));
        }

        #[test]
        fn finish_never_panics(hdr in any::<[u8; 10]>(), mut frame in proptest::collection::vec(any::<u8>(), 0..80)) {
            let h = VirtioNetHdr::parse(&hdr).unwrap();
            let before = frame.clone();
            match finish_checksum(&h, &mut frame) {
                Ok(()) if h.needs_csum() => {
                    // The stored value plus the partial sum that was in the field must verify.
                    let start = usize::from(h.csum_start);
                    let at = start + usize::from(h.csum_offset);
                    prop_assert!(at + 2 <= frame.len());
                    let mut partial = u16::from_be_bytes([before[at], before[at + 1]]);
                    if (at - start) % 2 == 1 {
                        partial = partial.swap_bytes();
                    }
                    let total = checksum::sum(&frame[start..]) + u32::from(partial);
                    prop_assert_eq!(checksum::fold(total), 0xffff);
                    prop_assert_eq!(&frame[..at], &before[..at]);
                    prop_assert_eq!(&frame[at + 2..], &before[at + 2..]);
                }
                Ok(()) => prop_assert_eq!(&frame, &before),
                Err(_) => prop_assert_eq!(&frame, &before),
            }
        }

        /// For any UDP or TCP frame etherparse builds, turning its checksum into the kernel's
        /// partial form and finishing it gives back etherparse's checksum.
        #[test]
        fn finish_agrees_with_etherparse(
            src in any::<[u8; 4]>(), dst in any::<[u8; 4]>(), tcp in any::<bool>(),
            payload in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let builder = etherparse::PacketBuilder::ethernet2([2; 6], [4; 6]).ipv4(src, dst, 64);
            let mut frame = Vec::new();
            if tcp {
                builder.tcp(1, 2, 3, 4).write(&mut frame, &payload).unwrap();
            } else {
                builder.udp(1, 2).write(&mut frame, &payload).unwrap();
            }
            let original = frame.clone();
            let (proto, offset, l4_len) = if tcp { (6, 16, 20 + payload.len()) } else { (17, 6, 8 + payload.len()) };
            let pseudo = checksum::pseudo_header_v4(src.into(), dst.into(), proto, l4_len as u16);
            make_partial(&mut frame, 34 + offset, pseudo);
            let hdr = VirtioNetHdr {
                flags: VirtioNetHdr::F_NEEDS_CSUM,
                csum_start: 34,
                csum_offset: offset as u16,
                ..VirtioNetHdr::NONE
            };
            finish_checksum(&hdr, &mut frame).unwrap();
            // etherparse also sends a zero UDP checksum as 0xffff, so the bytes match exactly.
            prop_assert_eq!(frame, original);
        }
    }
}
