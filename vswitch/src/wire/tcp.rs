//! TCP segments (RFC 9293).
//!
//! The switch never terminates TCP; it reads ports and flags for connection tracking and
//! service NAT, and rewrites ports and the MSS option. TCP has no length field, so the view
//! takes the segment to be the whole buffer: pass it exactly the IP payload
//! (`Ipv4Packet::payload`, which is already bounded by the IP total length). Checksums take the
//! IP addresses as arguments for the pseudo header, like UDP.
//!
//! Segments that arrive from a TAP with `VirtioNetHdr::F_NEEDS_CSUM` (every TSO super-frame)
//! carry only the pseudo-header sum in the checksum field, not a checksum: `verify_checksum`
//! rightly fails on them, and code that rewrites such a segment must finish or adjust that
//! partial sum instead (see `virtio::finish_checksum`).
//!
//! `clamp_max_seg_size` exists because the overlay costs 50 bytes of MTU: lowering the MSS in
//! SYNs keeps pods whose interface MTU was not lowered from sending segments that would need
//! fragmenting. It patches the checksum incrementally, like every other rewrite here.

use core::fmt;
use core::ops::{BitAnd, BitOr, BitOrAssign, Range};
use std::net::{Ipv4Addr, Ipv6Addr};

use super::checksum::{self, L4Checksum};
use super::ipv4::IpProtocol;
use super::{be16, be32, clamped, clamped_mut, put_be16, put_be32, Field, Result};

pub(super) mod field {
    use super::Field;
    pub const SEQ_NUM: Field = 4..8;
    pub const ACK_NUM: Field = 8..12;
    pub const FLAGS: Field = 12..14;
    pub const WIN_SIZE: Field = 14..16;
    pub const CHECKSUM: Field = 16..18;
    pub const URGENT: Field = 18..20;
}

/// TCP option kinds this module looks at.
pub mod option {
    pub const END: u8 = 0;
    pub const NOP: u8 = 1;
    pub const MSS: u8 = 2;
}

/// The nine TCP control bits as a bitset (the low 9 bits of header bytes 12-13).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TcpFlags(pub u16);

impl TcpFlags {
    pub const FIN: TcpFlags = TcpFlags(0x001);
    pub const SYN: TcpFlags = TcpFlags(0x002);
    pub const RST: TcpFlags = TcpFlags(0x004);
    pub const PSH: TcpFlags = TcpFlags(0x008);
    pub const ACK: TcpFlags = TcpFlags(0x010);
    pub const URG: TcpFlags = TcpFlags(0x020);
    pub const ECE: TcpFlags = TcpFlags(0x040);
    pub const CWR: TcpFlags = TcpFlags(0x080);
    pub const NS: TcpFlags = TcpFlags(0x100);
    const ALL: u16 = 0x1ff;

    pub const fn empty() -> TcpFlags {
        TcpFlags(0)
    }

    pub const fn bits(self) -> u16 {
        self.0
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// All of `other`'s bits are set.
    pub const fn contains(self, other: TcpFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Any of `other`'s bits is set.
    pub const fn intersects(self, other: TcpFlags) -> bool {
        self.0 & other.0 != 0
    }

    /// A connection's first segment: SYN without ACK (a SYN-ACK answers one).
    pub const fn opens(self) -> bool {
        self.contains(TcpFlags::SYN) && !self.contains(TcpFlags::ACK)
    }
}

impl BitOr for TcpFlags {
    type Output = TcpFlags;
    fn bitor(self, rhs: TcpFlags) -> TcpFlags {
        TcpFlags(self.0 | rhs.0)
    }
}

impl BitOrAssign for TcpFlags {
    fn bitor_assign(&mut self, rhs: TcpFlags) {
        self.0 |= rhs.0;
    }
}

impl BitAnd for TcpFlags {
    type Output = TcpFlags;
    fn bitand(self, rhs: TcpFlags) -> TcpFlags {
        TcpFlags(self.0 & rhs.0)
    }
}

/// Prints `SYN|ACK`, which is what one wants to read in a log line.
impl fmt::Debug for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [&str; 9] = ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR", "NS"];
        if self.0 == 0 {
            return f.write_str("(none)");
        }
        let mut first = true;
        for (i, name) in NAMES.iter().enumerate() {
            if self.0 & (1 << i) != 0 {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        if self.0 & !Self::ALL != 0 {
            write!(
                f,
                "{}0x{:x}",
                if first { "" } else { "|" },
                self.0 & !Self::ALL
            )?;
        }
        Ok(())
    }
}

l4_view! {
    /// A view of a TCP segment: the fixed header, options up to the data offset, data.
    TcpPacket, MIN_HEADER_LEN = field::URGENT.end, header_len
}

impl<T: AsRef<[u8]>> TcpPacket<T> {
    pub fn seq_number(&self) -> u32 {
        be32(&self.buffer.as_ref()[field::SEQ_NUM])
    }

    pub fn ack_number(&self) -> u32 {
        be32(&self.buffer.as_ref()[field::ACK_NUM])
    }

    /// Header length in bytes (data offset * 4), options included.
    pub fn header_len(&self) -> u8 {
        (self.buffer.as_ref()[field::FLAGS.start] >> 4) * 4
    }

    pub fn flags(&self) -> TcpFlags {
        TcpFlags(be16(&self.buffer.as_ref()[field::FLAGS]) & TcpFlags::ALL)
    }

    /// The raw window field (unscaled).
    pub fn window_len(&self) -> u16 {
        be16(&self.buffer.as_ref()[field::WIN_SIZE])
    }

    pub fn urgent_at(&self) -> u16 {
        be16(&self.buffer.as_ref()[field::URGENT])
    }

    /// The option bytes between the fixed header and the data.
    pub fn options(&self) -> &[u8] {
        let end = usize::from(self.header_len());
        clamped(self.buffer.as_ref(), Self::MIN_HEADER_LEN, end)
    }

    pub fn payload(&self) -> &[u8] {
        let data = self.buffer.as_ref();
        clamped(data, usize::from(self.header_len()), data.len())
    }

    /// Range in the buffer of the first option of `kind` with exactly `len` bytes, if the
    /// option list is well formed up to it. A broken list yields `None`, never a panic.
    fn find_option(&self, kind: u8, len: usize) -> Option<Range<usize>> {
        let opts = self.options();
        let mut i = 0;
        while i < opts.len() {
            match opts[i] {
                option::END => return None,
                option::NOP => i += 1,
                k => {
                    let l = usize::from(*opts.get(i + 1)?);
                    if l < 2 || i + l > opts.len() {
                        return None;
                    }
                    if k == kind && l == len {
                        let start = Self::MIN_HEADER_LEN + i;
                        return Some(start..start + l);
                    }
                    i += l;
                }
            }
        }
        None
    }

    /// The maximum segment size option, normally only present on SYNs.
    pub fn max_seg_size(&self) -> Option<u16> {
        let r = self.find_option(option::MSS, 4)?;
        Some(be16(&self.buffer.as_ref()[r.start + 2..r.end]))
    }

    fn sum_v4(&self, src: Ipv4Addr, dst: Ipv4Addr) -> Option<u32> {
        let data = self.buffer.as_ref();
        // IPv4 cannot carry a longer segment, so no checksum can be right for one.
        let len = u16::try_from(data.len()).ok()?;
        Some(checksum::pseudo_header_v4(src, dst, IpProtocol::TCP.0, len) + checksum::sum(data))
    }

    fn sum_v6(&self, src: Ipv6Addr, dst: Ipv6Addr) -> Option<u32> {
        let data = self.buffer.as_ref();
        let len = u32::try_from(data.len()).ok()?;
        Some(checksum::pseudo_header_v6(src, dst, IpProtocol::TCP.0, len) + checksum::sum(data))
    }

    /// True if the checksum is correct for these IPv4 addresses.
    pub fn verify_checksum(&self, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        self.sum_v4(src, dst)
            .is_some_and(|s| checksum::fold(s) == 0xffff)
    }

    /// True if the checksum is correct for these IPv6 addresses.
    pub fn verify_checksum_v6(&self, src: Ipv6Addr, dst: Ipv6Addr) -> bool {
        self.sum_v6(src, dst)
            .is_some_and(|s| checksum::fold(s) == 0xffff)
    }
}

/// The meaning of a TCP header without options, detached from its buffer: what the switch
/// needs to write a segment of its own (a RST).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TcpRepr {
    pub src_port: u16,
    pub dst_port: u16,
    pub seq_number: u32,
    pub ack_number: u32,
    pub flags: TcpFlags,
    pub window_len: u16,
    /// Bytes after the header.
    pub payload_len: usize,
}

impl TcpRepr {
    /// Reads a segment's header (its options are not kept), re-checking the view.
    pub fn parse<T: AsRef<[u8]>>(packet: &TcpPacket<T>) -> Result<TcpRepr> {
        packet.check_len()?;
        Ok(TcpRepr {
            src_port: packet.src_port(),
            dst_port: packet.dst_port(),
            seq_number: packet.seq_number(),
            ack_number: packet.ack_number(),
            flags: packet.flags(),
            window_len: packet.window_len(),
            payload_len: packet.payload().len(),
        })
    }

    repr_lengths!(field::URGENT.end);

    /// Writes every header byte (no options, urgent pointer zero) and, over the given pseudo
    /// header, the checksum, so the payload must be in place first and the buffer exactly
    /// [`Self::buffer_len`] long. `L4Checksum::None` leaves the checksum zero.
    ///
    /// # Panics
    /// If the packet's buffer is shorter than the 20-byte header.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut TcpPacket<T>, csum: L4Checksum) {
        packet.set_src_port(self.src_port);
        packet.set_dst_port(self.dst_port);
        packet.set_seq_number(self.seq_number);
        packet.set_ack_number(self.ack_number);
        // Data offset, the reserved bits and the flags: one half-word.
        let offset = (field::URGENT.end as u16 / 4) << 12;
        put_be16(
            &mut packet.buffer.as_mut()[field::FLAGS],
            offset | (self.flags.0 & TcpFlags::ALL),
        );
        packet.set_window_len(self.window_len);
        packet.set_urgent_at(0);
        packet.fill_l4_checksum(csum);
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> TcpPacket<T> {
    pub fn set_seq_number(&mut self, seq: u32) {
        put_be32(&mut self.buffer.as_mut()[field::SEQ_NUM], seq);
    }

    pub fn set_ack_number(&mut self, ack: u32) {
        put_be32(&mut self.buffer.as_mut()[field::ACK_NUM], ack);
    }

    /// Sets the header length in bytes; stored in 4-byte units, so it is rounded down.
    pub fn set_header_len(&mut self, len: u8) {
        let b = &mut self.buffer.as_mut()[field::FLAGS.start];
        *b = (*b & 0x0f) | (((len / 4) & 0x0f) << 4);
    }

    /// Sets the control bits, leaving the data offset alone.
    pub fn set_flags(&mut self, flags: TcpFlags) {
        let f = &mut self.buffer.as_mut()[field::FLAGS];
        let raw = (be16(f) & !TcpFlags::ALL) | (flags.0 & TcpFlags::ALL);
        put_be16(f, raw);
    }

    pub fn set_window_len(&mut self, window: u16) {
        put_be16(&mut self.buffer.as_mut()[field::WIN_SIZE], window);
    }

    pub fn set_urgent_at(&mut self, urgent: u16) {
        put_be16(&mut self.buffer.as_mut()[field::URGENT], urgent);
    }

    /// Computes the checksum with the IPv4 pseudo header and stores it. A buffer longer than
    /// 65535 bytes cannot be an IPv4 segment; its checksum is left at zero.
    pub fn fill_checksum(&mut self, src: Ipv4Addr, dst: Ipv4Addr) {
        self.set_checksum(0);
        if let Some(sum) = self.sum_v4(src, dst) {
            self.set_checksum(checksum::finish(sum));
        }
    }

    /// Computes the checksum with the IPv6 pseudo header and stores it.
    pub fn fill_checksum_v6(&mut self, src: Ipv6Addr, dst: Ipv6Addr) {
        self.set_checksum(0);
        if let Some(sum) = self.sum_v6(src, dst) {
            self.set_checksum(checksum::finish(sum));
        }
    }

    /// Lowers the MSS option to `limit` if it is larger, patching the checksum for the change.
    /// Returns true if the segment was changed. Segments without a (well-formed) MSS option
    /// are left alone.
    pub fn clamp_max_seg_size(&mut self, limit: u16) -> bool {
        let Some(r) = self.find_option(option::MSS, 4) else {
            return false;
        };
        let at = r.start + 2;
        let old = be16(&self.buffer.as_ref()[at..r.end]);
        if old <= limit {
            return false;
        }
        put_be16(&mut self.buffer.as_mut()[at..r.end], limit);
        // A value at an odd offset straddles two checksum words; its contribution to the sum
        // is then its byte-swapped value (RFC 1071 §2(B)).
        let (o, n) = if at % 2 == 0 {
            (old, limit)
        } else {
            (old.swap_bytes(), limit.swap_bytes())
        };
        let csum = checksum::update_u16(self.checksum(), o, n);
        self.set_checksum(csum);
        true
    }

    pub fn options_mut(&mut self) -> &mut [u8] {
        let end = usize::from(self.header_len());
        clamped_mut(self.buffer.as_mut(), Self::MIN_HEADER_LEN, end)
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        let start = usize::from(self.header_len());
        let data = self.buffer.as_mut();
        let end = data.len();
        clamped_mut(data, start, end)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::wire::{testdata::TCP_SYN, Ipv4Packet, WireError};

    const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
    const SVC_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 12, 34);

    fn syn() -> [u8; 40] {
        TCP_SYN[34..].try_into().unwrap()
    }

    #[test]
    fn construct_syn() {
        let mut buf = [0u8; 40];
        let mut tcp = TcpPacket::new_unchecked(&mut buf[..]);
        tcp.set_src_port(41862);
        tcp.set_dst_port(80);
        tcp.set_seq_number(0x5d3a_7e11);
        tcp.set_ack_number(0);
        tcp.set_header_len(40);
        tcp.set_flags(TcpFlags::SYN);
        tcp.set_window_len(64240);
        tcp.set_urgent_at(0);
        tcp.options_mut().copy_from_slice(&TCP_SYN[54..]);
        tcp.fill_checksum(POD_IP, SVC_IP);
        assert_eq!(buf, syn());
    }

    #[test]
    fn parse_syn_with_options() {
        let ip = Ipv4Packet::new_checked(&TCP_SYN[14..]).unwrap();
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        assert_eq!(tcp.src_port(), 41862);
        assert_eq!(tcp.dst_port(), 80);
        assert_eq!(tcp.seq_number(), 0x5d3a_7e11);
        assert_eq!(tcp.ack_number(), 0);
        assert_eq!(tcp.header_len(), 40);
        assert_eq!(tcp.flags(), TcpFlags::SYN);
        assert!(!tcp.flags().contains(TcpFlags::ACK));
        assert_eq!(tcp.window_len(), 64240);
        assert_eq!(tcp.checksum(), 0x0036);
        assert_eq!(tcp.urgent_at(), 0);
        assert!(tcp.verify_checksum(POD_IP, SVC_IP));
        assert!(!tcp.verify_checksum(POD_IP, Ipv4Addr::new(10, 244, 3, 17)));
        assert_eq!(tcp.options().len(), 20);
        assert_eq!(&tcp.options()[..4], &[2, 4, 0x05, 0xb4]);
        assert_eq!(tcp.max_seg_size(), Some(1460));
        assert!(tcp.payload().is_empty());
    }

    #[test]
    fn only_a_syn_without_ack_opens() {
        assert!(TcpFlags::SYN.opens());
        // An ECN-setup SYN (RFC 3168) opens too.
        assert!((TcpFlags::SYN | TcpFlags::ECE | TcpFlags::CWR).opens());
        assert!(!(TcpFlags::SYN | TcpFlags::ACK).opens());
        assert!(!TcpFlags::ACK.opens());
        assert!(!TcpFlags::empty().opens());
    }

    #[test]
    fn flags_do_not_touch_data_offset() {
        let mut buf = syn();
        let mut tcp = TcpPacket::new_checked(&mut buf[..]).unwrap();
        tcp.set_flags(TcpFlags::SYN | TcpFlags::ACK | TcpFlags::NS);
        assert_eq!(tcp.header_len(), 40);
        assert!(tcp.flags().contains(TcpFlags::SYN | TcpFlags::ACK));
        assert!(tcp.flags().intersects(TcpFlags::NS | TcpFlags::FIN));
        assert!(!tcp.flags().contains(TcpFlags::NS | TcpFlags::FIN));
        assert_eq!(&buf[12..14], &[0xa1, 0x12]);
        assert_eq!(format!("{:?}", TcpFlags::SYN | TcpFlags::ACK), "SYN|ACK");
        assert_eq!(format!("{:?}", TcpFlags::empty()), "(none)");
        assert_eq!(format!("{:?}", TcpFlags(0x211)), "FIN|ACK|0x200");
        let mut f = TcpFlags::empty();
        f |= TcpFlags::RST;
        assert_eq!((f & TcpFlags::RST).bits(), 4);
        assert!(TcpFlags::default().is_empty());
    }

    #[test]
    fn rejects_bad_offsets() {
        let check = |p: &[u8]| TcpPacket::new_checked(p).map(|_| ());
        let base = syn();
        assert_eq!(check(&base), Ok(()));
        assert_eq!(check(&base[..19]), Err(WireError::Truncated));
        assert_eq!(check(&base[..39]), Err(WireError::Truncated));
        let mut bad = base;
        bad[12] = 0x40; // data offset 4 words = 16 bytes
        assert_eq!(check(&bad), Err(WireError::Malformed));
        bad[12] = 0xf0; // 60 bytes in a 40-byte buffer
        assert_eq!(check(&bad), Err(WireError::Truncated));
    }

    #[test]
    fn clamps_mss_with_incremental_checksum() {
        let mut buf = syn();
        let mut tcp = TcpPacket::new_checked(&mut buf[..]).unwrap();
        assert!(!tcp.clamp_max_seg_size(1460));
        assert!(tcp.clamp_max_seg_size(1410));
        assert_eq!(tcp.max_seg_size(), Some(1410));
        assert!(tcp.verify_checksum(POD_IP, SVC_IP));
        let incremental = tcp.checksum();
        tcp.fill_checksum(POD_IP, SVC_IP);
        assert_eq!(tcp.checksum(), incremental);

        // The same with the MSS option pushed to an odd offset by a NOP.
        let mut buf = syn();
        buf[20..26].copy_from_slice(&[1, 2, 4, 0x05, 0xb4, 1]);
        let mut tcp = TcpPacket::new_checked(&mut buf[..]).unwrap();
        tcp.fill_checksum(POD_IP, SVC_IP);
        assert_eq!(tcp.max_seg_size(), Some(1460));
        assert!(tcp.clamp_max_seg_size(1200));
        assert_eq!(tcp.max_seg_size(), Some(1200));
        assert!(tcp.verify_checksum(POD_IP, SVC_IP));
    }

    #[test]
    fn broken_option_lists_are_ignored() {
        let mut buf = syn();
        // Length byte 0 would loop forever in a careless parser.
        buf[20..24].copy_from_slice(&[8, 0, 2, 4]);
        let mut tcp = TcpPacket::new_checked(&mut buf[..]).unwrap();
        assert_eq!(tcp.max_seg_size(), None);
        assert!(!tcp.clamp_max_seg_size(100));
        // An option running past the header.
        tcp.options_mut()[..4].copy_from_slice(&[1, 1, 8, 30]);
        assert_eq!(tcp.max_seg_size(), None);
        // End of list before the MSS.
        tcp.options_mut()[..4].copy_from_slice(&[0, 2, 4, 5]);
        assert_eq!(tcp.max_seg_size(), None);
        // An MSS option with the wrong length is not an MSS.
        tcp.options_mut()[..4].copy_from_slice(&[2, 3, 5, 1]);
        assert_eq!(tcp.max_seg_size(), None);
        // A plain 20-byte header has no options at all.
        let mut plain = [0u8; 20];
        plain[12] = 0x50;
        assert_eq!(
            TcpPacket::new_checked(&plain[..]).unwrap().max_seg_size(),
            None
        );
    }

    #[test]
    fn payload_follows_options() {
        let mut buf = [0u8; 45];
        buf[..40].copy_from_slice(&syn());
        buf[40..].copy_from_slice(b"hello");
        let mut tcp = TcpPacket::new_checked(&mut buf[..]).unwrap();
        assert_eq!(tcp.payload(), b"hello");
        tcp.payload_mut()[0] = b'j';
        tcp.set_header_len(60); // past the buffer: reads clamp, they do not panic
        assert!(tcp.payload().is_empty());
        assert_eq!(tcp.options().len(), 25);
        let _ = tcp.max_seg_size();
        assert_eq!(&buf[40..], b"jello");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn never_panics(mut data in proptest::collection::vec(any::<u8>(), 0..80), fix in any::<bool>()) {
            if fix && data.len() >= 20 {
                let words = (data.len() / 4).clamp(5, 15) as u8;
                data[12] = (data[12] & 0x0f) | (words.min(5 + (data[13] & 7)) << 4);
                // Often start the options with a plausible MSS so the walker gets exercised.
                if data.len() >= 24 && data[0] & 1 == 0 {
                    data[20] = 2;
                    data[21] = 4;
                }
            }
            match TcpPacket::new_checked(&data[..]) {
                Ok(tcp) => {
                    let hl = usize::from(tcp.header_len());
                    prop_assert!(hl >= 20 && hl <= data.len());
                    prop_assert_eq!(tcp.options().len(), hl - 20);
                    prop_assert_eq!(tcp.payload(), &data[hl..]);
                    prop_assert_eq!(tcp.flags().bits() & !0x1ff, 0);
                    let _ = (tcp.src_port(), tcp.dst_port(), tcp.seq_number(), tcp.ack_number());
                    let _ = (tcp.window_len(), tcp.checksum(), tcp.urgent_at());
                    let (a, b) = (Ipv4Addr::new(1, 2, 3, 4), Ipv4Addr::new(5, 6, 7, 8));
                    let mut copy = data.clone();
                    let mut tcp = TcpPacket::new_checked(&mut copy[..]).unwrap();
                    tcp.fill_checksum(a, b);
                    prop_assert!(tcp.verify_checksum(a, b));
                    let mss = tcp.max_seg_size();
                    let clamped = tcp.clamp_max_seg_size(536);
                    prop_assert_eq!(clamped, mss.is_some_and(|m| m > 536));
                    prop_assert!(tcp.verify_checksum(a, b));
                    if clamped {
                        prop_assert_eq!(tcp.max_seg_size(), Some(536));
                    }
                    tcp.fill_checksum_v6(Ipv6Addr::LOCALHOST, Ipv6Addr::UNSPECIFIED);
                    prop_assert!(tcp.verify_checksum_v6(Ipv6Addr::LOCALHOST, Ipv6Addr::UNSPECIFIED));
                }
                Err(WireError::Truncated) => prop_assert!(
                    data.len() < 20 || data.len() < usize::from(data[12] >> 4) * 4
                ),
                Err(e) => prop_assert_eq!(e, WireError::Malformed),
            }
        }

        #[test]
        fn agrees_with_etherparse(
            src in any::<[u8; 4]>(), dst in any::<[u8; 4]>(),
            sport in any::<u16>(), dport in any::<u16>(), seq in any::<u32>(), ack in any::<u32>(),
            window in any::<u16>(), flag_bits in 0u16..0x200, mss in any::<u16>(), v6 in any::<bool>(),
            payload in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            use etherparse::TcpOptionElement as O;
            let mut h = etherparse::TcpHeader::new(sport, dport, seq, window);
            h.acknowledgment_number = ack;
            h.fin = flag_bits & 0x001 != 0;
            h.syn = flag_bits & 0x002 != 0;
            h.rst = flag_bits & 0x004 != 0;
            h.psh = flag_bits & 0x008 != 0;
            h.ack = flag_bits & 0x010 != 0;
            h.urg = flag_bits & 0x020 != 0;
            h.ece = flag_bits & 0x040 != 0;
            h.cwr = flag_bits & 0x080 != 0;
            h.ns = flag_bits & 0x100 != 0;
            h.set_options(&[O::MaximumSegmentSize(mss), O::SelectiveAcknowledgementPermitted,
                            O::Timestamp(seq, ack), O::Noop, O::WindowScale(7)]).unwrap();
            let mut buf = Vec::new();
            let (mut a6, mut b6) = ([0u8; 16], [0u8; 16]);
            a6[12..].copy_from_slice(&src);
            b6[12..].copy_from_slice(&dst);
            if v6 {
                etherparse::PacketBuilder::ipv6(a6, b6, 64).tcp_header(h.clone()).write(&mut buf, &payload).unwrap();
            } else {
                etherparse::PacketBuilder::ipv4(src, dst, 64).tcp_header(h.clone()).write(&mut buf, &payload).unwrap();
            }
            let l4 = if v6 { &buf[40..] } else { &buf[20..] };
            let theirs = etherparse::TcpHeader::from_slice(l4).unwrap().0;
            let tcp = TcpPacket::new_checked(l4).unwrap();
            prop_assert_eq!(tcp.src_port(), theirs.source_port);
            prop_assert_eq!(tcp.dst_port(), theirs.destination_port);
            prop_assert_eq!(tcp.seq_number(), theirs.sequence_number);
            prop_assert_eq!(tcp.ack_number(), theirs.acknowledgment_number);
            prop_assert_eq!(usize::from(tcp.header_len()), theirs.header_len());
            prop_assert_eq!(tcp.flags().bits(), flag_bits);
            prop_assert_eq!(tcp.flags().contains(TcpFlags::SYN), theirs.syn);
            prop_assert_eq!(tcp.flags().contains(TcpFlags::NS), theirs.ns);
            prop_assert_eq!(tcp.window_len(), theirs.window_size);
            prop_assert_eq!(tcp.checksum(), theirs.checksum);
            prop_assert_eq!(tcp.options(), theirs.options.as_slice());
            prop_assert_eq!(tcp.max_seg_size(), Some(mss));
            prop_assert_eq!(tcp.payload(), &payload[..]);
            if v6 {
                let (a, b) = (Ipv6Addr::from(a6), Ipv6Addr::from(b6));
                prop_assert!(tcp.verify_checksum_v6(a, b));
            } else {
                let (a, b) = (Ipv4Addr::from(src), Ipv4Addr::from(dst));
                prop_assert!(tcp.verify_checksum(a, b));
                // MSS clamping agrees with etherparse's full recompute.
                let mut copy = l4.to_vec();
                let mut ours = TcpPacket::new_checked(&mut copy[..]).unwrap();
                if ours.clamp_max_seg_size(1360) {
                    let mut h2 = theirs.clone();
                    h2.set_options(&[O::MaximumSegmentSize(1360), O::SelectiveAcknowledgementPermitted,
                                     O::Timestamp(seq, ack), O::Noop, O::WindowScale(7)]).unwrap();
                    prop_assert_eq!(ours.checksum(), h2.calc_checksum_ipv4_raw(src, dst, &payload).unwrap());
                }
            }
        }
    }

    #[test]
    fn repr_emits_a_rst() {
        let repr = TcpRepr {
            src_port: 80,
            dst_port: 40_000,
            seq_number: 7,
            ack_number: 9,
            flags: TcpFlags::RST | TcpFlags::ACK,
            window_len: 0,
            payload_len: 0,
        };
        let mut buf = [0xaau8; 20];
        let csum = L4Checksum::V4(SVC_IP, POD_IP);
        repr.emit(&mut TcpPacket::new_unchecked(&mut buf[..]), csum);
        assert_eq!(
            &buf[12..14],
            &[0x50, 0x14],
            "data offset 5, RST|ACK, reserved zero"
        );
        let tcp = TcpPacket::new_checked(&buf[..]).unwrap();
        assert_eq!(TcpRepr::parse(&tcp), Ok(repr));
        assert_eq!((tcp.header_len(), tcp.urgent_at()), (20, 0));
        assert!(tcp.verify_checksum(SVC_IP, POD_IP));
        let (theirs, _) = etherparse::TcpHeader::from_slice(&buf).unwrap();
        assert!(theirs.rst && theirs.ack && !theirs.syn);
        assert_eq!(
            (theirs.sequence_number, theirs.acknowledgment_number),
            (7, 9)
        );
    }
}
