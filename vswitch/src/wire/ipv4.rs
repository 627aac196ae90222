//! IPv4 packets (RFC 791).
//!
//! `new_checked` validates the three lengths that matter (buffer, IHL, total length) once, so
//! the pipeline can read addresses and the L4 payload with no further checks. The payload is
//! bounded by the total length, not by the buffer: Ethernet pads short frames to 60 bytes and
//! that padding must not reach a checksum or a DNS parser.
//!
//! Forwarding rewrites the TTL and NAT rewrites addresses on every packet, so those setters
//! have `_incremental` variants that patch the header checksum (RFC 1624) instead of summing the
//! header again. IPv4 "BIG TCP" (total length 0 on a >64 KB GSO packet) is rejected as
//! `Malformed`: TAP devices never produce it because their GSO limit stays at 64 KB.

use std::net::Ipv4Addr;

use super::checksum;
use super::WireError;
use super::{be16, check_lengths, clamped, clamped_mut, ports, put_be16, tcp, udp, Field, Result};

protocol_number! {
    /// The IP protocol / IPv6 next-header number.
    IpProtocol(u8) { HOP_BY_HOP = 0, ICMP = 1, TCP = 6, UDP = 17, IPV6_FRAG = 44, ICMPV6 = 58 }
}

mod field {
    use super::Field;
    pub const VER_IHL: usize = 0;
    pub const DSCP_ECN: usize = 1;
    pub const LENGTH: Field = 2..4;
    pub const IDENT: Field = 4..6;
    pub const FLG_OFF: Field = 6..8;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: Field = 10..12;
    pub const SRC_ADDR: Field = 12..16;
    pub const DST_ADDR: Field = 16..20;
}

const FLAG_DF: u16 = 0x4000;
const FLAG_MF: u16 = 0x2000;
const OFFSET_MASK: u16 = 0x1fff;

view! {
    /// A view of an IPv4 packet.
    Ipv4Packet
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    /// Length of a header without options.
    pub const MIN_HEADER_LEN: usize = field::DST_ADDR.end;

    /// Wraps the copy of a packet quoted inside an ICMP error (RFC 792: its header plus the
    /// first 8 payload bytes, or more per RFC 1812). Such a copy is cut short on purpose, so
    /// only the header must be whole; the total length may point past the buffer, and
    /// [`Self::payload`] then returns what was quoted.
    pub fn new_checked_quoted(buffer: T) -> Result<Ipv4Packet<T>> {
        let packet = Self::new_unchecked(buffer);
        packet.check_header_len()?;
        Ok(packet)
    }

    /// The version, the IHL against the buffer, and the total length against the IHL. A
    /// version other than 4 reads as a header length of zero: `Malformed`.
    fn check_header_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        check_lengths(len, Self::MIN_HEADER_LEN, || match self.version() {
            4 => usize::from(self.header_len()),
            _ => 0,
        })?;
        if self.total_len() < u16::from(self.header_len()) {
            return Err(WireError::Malformed);
        }
        Ok(())
    }

    /// Ensures every accessor is in bounds and the length fields are consistent.
    pub fn check_len(&self) -> Result<()> {
        self.check_header_len()?;
        if self.buffer.as_ref().len() < usize::from(self.total_len()) {
            return Err(WireError::Truncated);
        }
        Ok(())
    }

    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_IHL] >> 4
    }

    /// Header length in bytes (IHL * 4), options included.
    pub fn header_len(&self) -> u8 {
        (self.buffer.as_ref()[field::VER_IHL] & 0x0f) * 4
    }

    pub fn dscp(&self) -> u8 {
        self.buffer.as_ref()[field::DSCP_ECN] >> 2
    }

    pub fn ecn(&self) -> u8 {
        self.buffer.as_ref()[field::DSCP_ECN] & 0x03
    }

    /// Header plus payload, in bytes.
    pub fn total_len(&self) -> u16 {
        be16(&self.buffer.as_ref()[field::LENGTH])
    }

    pub fn ident(&self) -> u16 {
        be16(&self.buffer.as_ref()[field::IDENT])
    }

    pub fn dont_frag(&self) -> bool {
        be16(&self.buffer.as_ref()[field::FLG_OFF]) & FLAG_DF != 0
    }

    pub fn more_frags(&self) -> bool {
        be16(&self.buffer.as_ref()[field::FLG_OFF]) & FLAG_MF != 0
    }

    /// Fragment offset in bytes (the field counts 8-byte units).
    pub fn frag_offset(&self) -> u16 {
        (be16(&self.buffer.as_ref()[field::FLG_OFF]) & OFFSET_MASK) << 3
    }

    /// Part of a fragmented datagram. Only the first fragment carries the L4 header, so NAT and
    /// conntrack must not read ports from any fragment but that one.
    pub fn is_fragment(&self) -> bool {
        self.more_frags() || self.frag_offset() != 0
    }

    pub fn hop_limit(&self) -> u8 {
        self.buffer.as_ref()[field::TTL]
    }

    /// Same as [`Self::hop_limit`], by its IPv4 name.
    pub fn ttl(&self) -> u8 {
        self.hop_limit()
    }

    pub fn next_header(&self) -> IpProtocol {
        IpProtocol(self.buffer.as_ref()[field::PROTOCOL])
    }

    /// Same as [`Self::next_header`], by its IPv4 name.
    pub fn protocol(&self) -> IpProtocol {
        self.next_header()
    }

    pub fn checksum(&self) -> u16 {
        be16(&self.buffer.as_ref()[field::CHECKSUM])
    }

    pub fn src_addr(&self) -> Ipv4Addr {
        let b = &self.buffer.as_ref()[field::SRC_ADDR];
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }

    pub fn dst_addr(&self) -> Ipv4Addr {
        let b = &self.buffer.as_ref()[field::DST_ADDR];
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }

    /// The whole header, options included.
    pub fn header(&self) -> &[u8] {
        clamped(self.buffer.as_ref(), 0, usize::from(self.header_len()))
    }

    /// IP options (empty for the usual 20-byte header).
    pub fn options(&self) -> &[u8] {
        let data = self.buffer.as_ref();
        clamped(data, Self::MIN_HEADER_LEN, usize::from(self.header_len()))
    }

    /// True if the header checksum is correct.
    pub fn verify_checksum(&self) -> bool {
        checksum::fold(checksum::sum(self.header())) == 0xffff
    }

    /// The L4 packet: from the end of the header to the total length, never into padding.
    pub fn payload(&self) -> &[u8] {
        let data = self.buffer.as_ref();
        clamped(
            data,
            usize::from(self.header_len()),
            usize::from(self.total_len()),
        )
    }

    /// Where a TCP/UDP field is in the buffer, for a TCP or UDP packet that is not a later
    /// fragment (only the first carries the L4 header) and holds that field. Never out of
    /// bounds, whatever the header says.
    fn l4_field(&self, tcp: Field, udp: Field) -> Option<Field> {
        let f = match self.protocol() {
            IpProtocol::TCP => tcp,
            IpProtocol::UDP => udp,
            _ => return None,
        };
        let start = usize::from(self.header_len());
        let end = usize::from(self.total_len()).min(self.buffer.as_ref().len());
        (self.frag_offset() == 0 && start + f.end <= end).then(|| start + f.start..start + f.end)
    }

    /// (source, destination) port of a TCP or UDP packet; `None` for another protocol, a
    /// later fragment, or an L4 header cut short (a quote may hold only the ports).
    pub fn ports(&self) -> Option<(u16, u16)> {
        let r = self.l4_field(ports::BOTH, ports::BOTH)?;
        let b = &self.buffer.as_ref()[r];
        Some((be16(&b[ports::SRC]), be16(&b[ports::DST])))
    }

    /// The TCP or UDP checksum field, where [`Self::ports`] would find ports and the header
    /// reaches that far.
    pub fn l4_checksum(&self) -> Option<u16> {
        let r = self.l4_field(tcp::field::CHECKSUM, udp::field::CHECKSUM)?;
        Some(be16(&self.buffer.as_ref()[r]))
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    pub fn set_version(&mut self, version: u8) {
        let b = &mut self.buffer.as_mut()[field::VER_IHL];
        *b = (*b & 0x0f) | (version << 4);
    }

    /// Sets the header length in bytes; it is stored in 4-byte units, so a length that is not a
    /// multiple of four is rounded down.
    pub fn set_header_len(&mut self, len: u8) {
        let b = &mut self.buffer.as_mut()[field::VER_IHL];
        *b = (*b & 0xf0) | ((len / 4) & 0x0f);
    }

    pub fn set_dscp(&mut self, dscp: u8) {
        let b = &mut self.buffer.as_mut()[field::DSCP_ECN];
        *b = (*b & 0x03) | (dscp << 2);
    }

    pub fn set_ecn(&mut self, ecn: u8) {
        let b = &mut self.buffer.as_mut()[field::DSCP_ECN];
        *b = (*b & !0x03) | (ecn & 0x03);
    }

    pub fn set_total_len(&mut self, len: u16) {
        put_be16(&mut self.buffer.as_mut()[field::LENGTH], len);
    }

    pub fn set_ident(&mut self, ident: u16) {
        put_be16(&mut self.buffer.as_mut()[field::IDENT], ident);
    }

    fn set_flg_off(&mut self, mask: u16, value: u16) {
        let f = &mut self.buffer.as_mut()[field::FLG_OFF];
        let raw = (be16(f) & !mask) | (value & mask);
        put_be16(f, raw);
    }

    pub fn set_dont_frag(&mut self, df: bool) {
        self.set_flg_off(FLAG_DF, if df { FLAG_DF } else { 0 });
    }

    pub fn set_more_frags(&mut self, mf: bool) {
        self.set_flg_off(FLAG_MF, if mf { FLAG_MF } else { 0 });
    }

    /// Sets the fragment offset in bytes; the low three bits are dropped (8-byte units).
    pub fn set_frag_offset(&mut self, offset: u16) {
        self.set_flg_off(OFFSET_MASK, offset >> 3);
    }

    pub fn set_hop_limit(&mut self, ttl: u8) {
        self.buffer.as_mut()[field::TTL] = ttl;
    }

    /// Sets the TTL without touching the checksum; see [`Self::decrement_ttl_incremental`].
    pub fn set_ttl(&mut self, ttl: u8) {
        self.set_hop_limit(ttl);
    }

    pub fn set_next_header(&mut self, proto: IpProtocol) {
        self.buffer.as_mut()[field::PROTOCOL] = proto.0;
    }

    pub fn set_protocol(&mut self, proto: IpProtocol) {
        self.set_next_header(proto);
    }

    pub fn set_checksum(&mut self, csum: u16) {
        put_be16(&mut self.buffer.as_mut()[field::CHECKSUM], csum);
    }

    pub fn set_src_addr(&mut self, addr: Ipv4Addr) {
        self.buffer.as_mut()[field::SRC_ADDR].copy_from_slice(&addr.octets());
    }

    pub fn set_dst_addr(&mut self, addr: Ipv4Addr) {
        self.buffer.as_mut()[field::DST_ADDR].copy_from_slice(&addr.octets());
    }

    /// Computes the header checksum from scratch and stores it.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let csum = checksum::finish(checksum::sum(self.header()));
        self.set_checksum(csum);
    }

    /// Decrements the TTL and patches the header checksum for that one change, as a router
    /// does (RFC 1624). Returns the new TTL. A TTL already at zero is left alone; the caller
    /// is expected to have turned `ttl() <= 1` into an ICMP time-exceeded before forwarding.
    pub fn decrement_ttl_incremental(&mut self) -> u8 {
        let data = self.buffer.as_mut();
        let ttl = data[field::TTL];
        if ttl == 0 {
            return 0;
        }
        let proto = data[field::PROTOCOL];
        data[field::TTL] = ttl - 1;
        let csum = checksum::update_u16(
            be16(&data[field::CHECKSUM]),
            u16::from_be_bytes([ttl, proto]),
            u16::from_be_bytes([ttl - 1, proto]),
        );
        put_be16(&mut data[field::CHECKSUM], csum);
        ttl - 1
    }

    /// Rewrites the source address and patches the header checksum (not the L4 checksum,
    /// which also covers the address through the pseudo header: NAT fixes that one too, with
    /// [`checksum::update_u32`]).
    pub fn set_src_addr_incremental(&mut self, addr: Ipv4Addr) {
        let old = u32::from(self.src_addr());
        self.set_src_addr(addr);
        self.set_checksum(checksum::update_u32(self.checksum(), old, u32::from(addr)));
    }

    /// Rewrites the destination address and patches the header checksum; see
    /// [`Self::set_src_addr_incremental`].
    pub fn set_dst_addr_incremental(&mut self, addr: Ipv4Addr) {
        let old = u32::from(self.dst_addr());
        self.set_dst_addr(addr);
        self.set_checksum(checksum::update_u32(self.checksum(), old, u32::from(addr)));
    }

    /// Mutable twin of [`Ipv4Packet::payload`].
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let start = usize::from(self.header_len());
        let end = usize::from(self.total_len());
        clamped_mut(self.buffer.as_mut(), start, end)
    }

    /// Rewrites the ports of a TCP or UDP packet, not its checksum; returns false, writing
    /// nothing, where [`Ipv4Packet::ports`] is `None`.
    pub fn set_ports(&mut self, src: u16, dst: u16) -> bool {
        let Some(r) = self.l4_field(ports::BOTH, ports::BOTH) else {
            return false;
        };
        let b = &mut self.buffer.as_mut()[r];
        put_be16(&mut b[ports::SRC], src);
        put_be16(&mut b[ports::DST], dst);
        true
    }

    /// Stores the TCP or UDP checksum field; returns false, writing nothing, where
    /// [`Ipv4Packet::l4_checksum`] is `None`.
    pub fn set_l4_checksum(&mut self, csum: u16) -> bool {
        let Some(r) = self.l4_field(tcp::field::CHECKSUM, udp::field::CHECKSUM) else {
            return false;
        };
        put_be16(&mut self.buffer.as_mut()[r], csum);
        true
    }
}

/// The meaning of an IPv4 header without options, detached from its buffer: what the switch
/// needs to write a packet of its own. Identification, DSCP and ECN are written as zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Repr {
    pub src_addr: Ipv4Addr,
    pub dst_addr: Ipv4Addr,
    pub protocol: IpProtocol,
    /// Bytes after the header.
    pub payload_len: usize,
    pub ttl: u8,
    pub dont_frag: bool,
}

impl Ipv4Repr {
    /// Reads a packet's header (its options are not kept), re-checking the view.
    pub fn parse<T: AsRef<[u8]>>(packet: &Ipv4Packet<T>) -> Result<Ipv4Repr> {
        packet.check_len()?;
        Ok(Ipv4Repr {
            src_addr: packet.src_addr(),
            dst_addr: packet.dst_addr(),
            protocol: packet.protocol(),
            payload_len: packet.payload().len(),
            ttl: packet.ttl(),
            dont_frag: packet.dont_frag(),
        })
    }

    repr_lengths!(field::DST_ADDR.end);

    /// Writes every header byte, the checksum included. A total length past 65535 is stored
    /// as 65535 (the caller sizes packets; none of the switch's own is that long).
    ///
    /// # Panics
    /// If the packet's buffer is shorter than the 20-byte header.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Ipv4Packet<T>) {
        {
            let b = packet.buffer.as_mut();
            b[field::VER_IHL] = 0x40 | (field::DST_ADDR.end / 4) as u8;
            b[field::DSCP_ECN] = 0;
            put_be16(&mut b[field::IDENT], 0);
            put_be16(
                &mut b[field::FLG_OFF],
                if self.dont_frag { FLAG_DF } else { 0 },
            );
        }
        packet.set_total_len(u16::try_from(self.buffer_len()).unwrap_or(u16::MAX));
        packet.set_ttl(self.ttl);
        packet.set_protocol(self.protocol);
        packet.set_src_addr(self.src_addr);
        packet.set_dst_addr(self.dst_addr);
        packet.fill_checksum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::testdata::{DNS_QUERY, ICMP_ECHO, ICMP_FRAG_NEEDED, TCP_SYN};
    use proptest::prelude::*;

    const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);

    #[test]
    fn parse_icmp_echo() {
        let ip = Ipv4Packet::new_checked(&ICMP_ECHO[14..]).unwrap();
        assert_eq!(ip.version(), 4);
        assert_eq!(ip.header_len(), 20);
        assert_eq!(ip.dscp(), 0);
        assert_eq!(ip.ecn(), 0);
        assert_eq!(ip.total_len(), 84);
        assert_eq!(ip.ident(), 0x3c1d);
        assert!(ip.dont_frag() && !ip.more_frags() && !ip.is_fragment());
        assert_eq!(ip.frag_offset(), 0);
        assert_eq!(ip.ttl(), 64);
        assert_eq!(ip.protocol(), IpProtocol::ICMP);
        assert_eq!(ip.checksum(), 0xe598);
        assert!(ip.verify_checksum());
        assert_eq!(ip.src_addr(), POD_IP);
        assert_eq!(ip.dst_addr(), Ipv4Addr::new(10, 244, 2, 7));
        assert!(ip.options().is_empty());
        assert_eq!(ip.payload(), &ICMP_ECHO[34..]);
    }

    #[test]
    fn parse_udp_and_tcp() {
        let ip = Ipv4Packet::new_checked(&DNS_QUERY[14..]).unwrap();
        assert_eq!(ip.protocol(), IpProtocol::UDP);
        assert!(!ip.dont_frag());
        assert_eq!(ip.dst_addr(), Ipv4Addr::new(10, 96, 0, 10));
        assert!(ip.verify_checksum());
        assert_eq!(ip.payload().len(), 73);

        let ip = Ipv4Packet::new_checked(&TCP_SYN[14..]).unwrap();
        assert_eq!(ip.protocol(), IpProtocol::TCP);
        assert_eq!(ip.checksum(), 0xcb13);
        assert!(ip.verify_checksum());
        assert_eq!(ip.payload().len(), 40);

        let ip = Ipv4Packet::new_checked(&ICMP_FRAG_NEEDED[..]).unwrap();
        assert_eq!(ip.src_addr(), Ipv4Addr::new(10, 244, 0, 1));
        assert!(ip.verify_checksum());
    }

    #[test]
    fn payload_excludes_ethernet_padding() {
        let mut padded = [0u8; 128];
        padded[..84].copy_from_slice(&ICMP_ECHO[14..]);
        padded[84..].fill(0xaa);
        let ip = Ipv4Packet::new_checked(&padded[..]).unwrap();
        assert_eq!(ip.payload(), &ICMP_ECHO[34..]);
    }

    #[test]
    fn rejects_inconsistent_lengths() {
        let base: [u8; 84] = ICMP_ECHO[14..].try_into().unwrap();
        let check = |p: &[u8]| Ipv4Packet::new_checked(p).map(|_| ());
        assert_eq!(check(&base), Ok(()));
        assert_eq!(check(&base[..19]), Err(WireError::Truncated));
        assert_eq!(check(&base[..83]), Err(WireError::Truncated));

        let mut v6 = base;
        v6[0] = 0x65;
        assert_eq!(check(&v6), Err(WireError::Malformed));

        let mut short_ihl = base;
        short_ihl[0] = 0x44;
        assert_eq!(check(&short_ihl), Err(WireError::Malformed));

        // IHL 15 says 60 header bytes; a 40-byte buffer cannot hold them.
        let mut long_ihl = base;
        long_ihl[0] = 0x4f;
        assert_eq!(check(&long_ihl[..40]), Err(WireError::Truncated));

        let mut small_total = base;
        small_total[2..4].copy_from_slice(&19u16.to_be_bytes());
        assert_eq!(check(&small_total), Err(WireError::Malformed));

        let mut big_total = base;
        big_total[2..4].copy_from_slice(&85u16.to_be_bytes());
        assert_eq!(check(&big_total), Err(WireError::Truncated));

        // BIG TCP's zero total length.
        let mut zero_total = base;
        zero_total[2..4].copy_from_slice(&0u16.to_be_bytes());
        assert_eq!(check(&zero_total), Err(WireError::Malformed));
    }

    #[test]
    fn options_and_fragments() {
        // A header with a 4-byte option (router alert) and the second fragment of a datagram.
        let mut buf = [0u8; 32];
        buf[..20].copy_from_slice(&ICMP_ECHO[14..34]);
        buf[20..24].copy_from_slice(&[0x94, 0x04, 0x00, 0x00]);
        let mut ip = Ipv4Packet::new_unchecked(&mut buf[..]);
        ip.set_header_len(24);
        ip.set_total_len(32);
        ip.set_dont_frag(false);
        ip.set_more_frags(true);
        ip.set_frag_offset(1480);
        ip.fill_checksum();
        let ip = Ipv4Packet::new_checked(&buf[..]).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(ip.header_len(), 24);
        assert_eq!(ip.options(), &[0x94, 0x04, 0x00, 0x00]);
        assert_eq!(ip.payload().len(), 8);
        assert!(!ip.dont_frag() && ip.more_frags() && ip.is_fragment());
        assert_eq!(ip.frag_offset(), 1480);
        assert_eq!(&buf[6..8], &[0x20, 0xb9]); // MF | 185 units of 8 bytes

        let theirs = etherparse::Ipv4Header::from_slice(&buf).unwrap().0;
        assert_eq!(&theirs.options[..], &[0x94, 0x04, 0x00, 0x00]);
        assert_eq!(theirs.fragment_offset.byte_offset(), 1480);
        assert_eq!(theirs.header_checksum, theirs.calc_header_checksum());
    }

    #[test]
    fn construct_header() {
        let mut buf = [0u8; 84];
        let mut ip = Ipv4Packet::new_unchecked(&mut buf[..]);
        ip.set_version(4);
        ip.set_header_len(20);
        ip.set_dscp(0);
        ip.set_ecn(0);
        ip.set_total_len(84);
        ip.set_ident(0x3c1d);
        ip.set_dont_frag(true);
        ip.set_more_frags(false);
        ip.set_frag_offset(0);
        ip.set_ttl(64);
        ip.set_protocol(IpProtocol::ICMP);
        ip.set_src_addr(POD_IP);
        ip.set_dst_addr(Ipv4Addr::new(10, 244, 2, 7));
        ip.fill_checksum();
        ip.payload_mut().copy_from_slice(&ICMP_ECHO[34..]);
        assert_eq!(buf[..], ICMP_ECHO[14..]);
    }

    #[test]
    fn dscp_ecn_do_not_clobber_each_other() {
        let mut buf: [u8; 84] = ICMP_ECHO[14..].try_into().unwrap();
        let mut ip = Ipv4Packet::new_checked(&mut buf[..]).unwrap();
        ip.set_dscp(46);
        ip.set_ecn(2);
        assert_eq!((ip.dscp(), ip.ecn()), (46, 2));
        ip.set_ecn(1);
        assert_eq!((ip.dscp(), ip.ecn()), (46, 1));
        assert_eq!(buf[1], (46 << 2) | 1);
    }

    #[test]
    fn ttl_decrement_patches_checksum() {
        let mut buf: [u8; 84] = ICMP_ECHO[14..].try_into().unwrap();
        let mut ip = Ipv4Packet::new_checked(&mut buf[..]).unwrap();
        assert_eq!(ip.decrement_ttl_incremental(), 63);
        assert_eq!(ip.ttl(), 63);
        assert!(ip.verify_checksum());
        // Only the TTL went down by one, so the checksum went up by 0x0100.
        assert_eq!(ip.checksum(), 0xe698);
        ip.set_ttl(1);
        ip.fill_checksum();
        assert_eq!(ip.decrement_ttl_incremental(), 0);
        assert!(ip.verify_checksum());
        let csum = ip.checksum();
        assert_eq!(ip.decrement_ttl_incremental(), 0);
        assert_eq!(ip.checksum(), csum);
    }

    #[test]
    fn nat_rewrite_patches_checksum() {
        let mut buf: [u8; 93] = DNS_QUERY[14..].try_into().unwrap();
        let mut ip = Ipv4Packet::new_checked(&mut buf[..]).unwrap();
        ip.set_dst_addr_incremental(Ipv4Addr::new(10, 244, 3, 17));
        ip.set_src_addr_incremental(Ipv4Addr::new(169, 254, 0, 1));
        assert!(ip.verify_checksum());
        let incremental = ip.checksum();
        ip.fill_checksum();
        assert_eq!(ip.checksum(), incremental);
    }

    #[test]
    fn payload_clamped_after_bad_setter() {
        let mut buf: [u8; 84] = ICMP_ECHO[14..].try_into().unwrap();
        let mut ip = Ipv4Packet::new_checked(&mut buf[..]).unwrap();
        ip.set_total_len(60000);
        assert_eq!(ip.payload().len(), 64);
        ip.set_header_len(60);
        ip.set_total_len(30);
        assert!(ip.payload().is_empty());
        assert_eq!(ip.options().len(), 40);
        assert!(!ip.verify_checksum());
    }

    fn arb_bytes() -> impl Strategy<Value = Vec<u8>> {
        (
            proptest::collection::vec(any::<u8>(), 0..100),
            any::<bool>(),
        )
            .prop_map(|(mut d, fix)| {
                // Steer half the inputs past the version/length checks so the accessors run.
                if fix && d.len() >= 20 {
                    d[0] = 0x40 | (d[0] & 0x0f).max(5);
                    let total = (d.len() as u16).saturating_sub(u16::from(d[1] & 3));
                    d[2..4].copy_from_slice(&total.to_be_bytes());
                }
                d
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn never_panics(data in arb_bytes()) {
            // The lenient constructor for ICMP quotes must be just as safe to read.
            let quoted = Ipv4Packet::new_checked_quoted(&data[..]);
            if let Ok(q) = &quoted {
                let hl = usize::from(q.header_len());
                prop_assert!(hl >= 20 && hl <= data.len());
                prop_assert!(q.payload().len() <= usize::from(q.total_len()) - hl);
                let _ = (q.options(), q.verify_checksum(), q.src_addr(), q.protocol());
            }
            match Ipv4Packet::new_checked(&data[..]) {
                Ok(ip) => {
                    prop_assert!(quoted.is_ok());
                    let hl = usize::from(ip.header_len());
                    let tl = usize::from(ip.total_len());
                    prop_assert!(hl >= 20 && hl <= tl && tl <= data.len());
                    prop_assert_eq!(ip.payload().len(), tl - hl);
                    prop_assert_eq!(ip.options().len(), hl - 20);
                    let _ = (ip.dscp(), ip.ecn(), ip.ident(), ip.dont_frag(), ip.more_frags());
                    let _ = (ip.frag_offset(), ip.is_fragment(), ip.ttl(), ip.protocol());
                    let _ = (ip.checksum(), ip.src_addr(), ip.dst_addr(), ip.verify_checksum());
                    let mut copy = data.clone();
                    let mut ip = Ipv4Packet::new_checked(&mut copy[..]).unwrap();
                    ip.fill_checksum();
                    prop_assert!(ip.verify_checksum());
                    ip.decrement_ttl_incremental();
                    prop_assert!(ip.verify_checksum());
                    let _ = ip.payload_mut();
                }
                Err(WireError::Truncated) => prop_assert!(
                    data.len() < 20
                        || data.len() < usize::from(data[0] & 0x0f) * 4
                        || data.len() < usize::from(u16::from_be_bytes([data[2], data[3]]))
                ),
                Err(e) => prop_assert_eq!(e, WireError::Malformed),
            }
        }

        #[test]
        fn agrees_with_etherparse(
            src in any::<[u8; 4]>(), dst in any::<[u8; 4]>(), ttl in 1u8..=255,
            ident in any::<u16>(), df in any::<bool>(), dscp in 0u8..64,
            options in prop_oneof![Just(vec![]), Just(vec![1, 1, 1, 0]), Just(vec![0x94, 4, 0, 0, 1, 1, 1, 1])],
            transport in 0u8..3,
            payload in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut header = etherparse::Ipv4Header::new(0, ttl, etherparse::IpNumber::UDP, src, dst).unwrap();
            header.identification = ident;
            header.dont_fragment = df;
            header.dscp = etherparse::IpDscp::try_new(dscp).unwrap();
            header.options = options.as_slice().try_into().unwrap();
            let builder = etherparse::PacketBuilder::ip(etherparse::IpHeaders::Ipv4(header, Default::default()));
            let mut buf = Vec::new();
            match transport {
                0 => builder.udp(53, 1053).write(&mut buf, &payload).unwrap(),
                1 => builder.tcp(80, 8080, 1, 100).write(&mut buf, &payload).unwrap(),
                _ => builder.icmpv4_echo_request(1, 2).write(&mut buf, &payload).unwrap(),
            }
            let theirs = etherparse::Ipv4Header::from_slice(&buf).unwrap().0;
            let mut ip = Ipv4Packet::new_checked(&mut buf[..]).unwrap();
            prop_assert_eq!(ip.src_addr().octets(), theirs.source);
            prop_assert_eq!(ip.dst_addr().octets(), theirs.destination);
            prop_assert_eq!(ip.ttl(), theirs.time_to_live);
            prop_assert_eq!(ip.ident(), theirs.identification);
            prop_assert_eq!(ip.dont_frag(), theirs.dont_fragment);
            prop_assert_eq!(ip.dscp(), theirs.dscp.value());
            prop_assert_eq!(ip.protocol().0, theirs.protocol.0);
            prop_assert_eq!(ip.total_len(), theirs.total_len);
            prop_assert_eq!(usize::from(ip.header_len()), theirs.header_len());
            prop_assert_eq!(ip.options(), &theirs.options[..]);
            prop_assert_eq!(ip.checksum(), theirs.header_checksum);
            prop_assert!(ip.verify_checksum());
            prop_assert_eq!(ip.payload().len(), buf_payload_len(&theirs));

            // The incremental TTL decrement lands on the checksum a full recompute gives.
            ip.decrement_ttl_incremental();
            let mut after = theirs.clone();
            after.time_to_live -= 1;
            prop_assert_eq!(ip.checksum(), after.calc_header_checksum());

            // And so does a NAT rewrite of both addresses.
            ip.set_dst_addr_incremental(Ipv4Addr::from(src));
            ip.set_src_addr_incremental(Ipv4Addr::from(dst));
            after.source = dst;
            after.destination = src;
            prop_assert_eq!(ip.checksum(), after.calc_header_checksum());
        }
    }

    fn buf_payload_len(h: &etherparse::Ipv4Header) -> usize {
        usize::from(h.total_len) - h.header_len()
    }

    #[test]
    fn repr_parses_and_emits_a_header() {
        let ip = Ipv4Packet::new_checked(&ICMP_ECHO[14..]).unwrap();
        let repr = Ipv4Repr::parse(&ip).unwrap();
        let want = Ipv4Repr {
            src_addr: POD_IP,
            dst_addr: Ipv4Addr::new(10, 244, 2, 7),
            protocol: IpProtocol::ICMP,
            payload_len: 64,
            ttl: 64,
            dont_frag: true,
        };
        assert_eq!(repr, want);
        assert_eq!((repr.header_len(), repr.buffer_len()), (20, 84));
        let mut buf = [0xffu8; 84];
        repr.emit(&mut Ipv4Packet::new_unchecked(&mut buf[..]));
        buf[20..].copy_from_slice(&ICMP_ECHO[34..]);
        // The sample's header but for the identification, zero in the switch's own packets.
        let mut sample: [u8; 84] = ICMP_ECHO[14..].try_into().unwrap();
        let mut s = Ipv4Packet::new_unchecked(&mut sample[..]);
        s.set_ident(0);
        s.fill_checksum();
        assert_eq!(buf, sample);
    }

    #[test]
    fn l4_ports_and_checksum() {
        let mut buf: [u8; 93] = DNS_QUERY[14..].try_into().unwrap();
        let mut ip = Ipv4Packet::new_checked(&mut buf[..]).unwrap();
        assert_eq!(ip.ports(), Some((53211, 53)));
        assert_eq!(ip.l4_checksum(), Some(0x6f02));
        assert!(ip.set_ports(1, 2) && ip.set_l4_checksum(0x1234));
        assert_eq!((ip.ports(), ip.l4_checksum()), (Some((1, 2)), Some(0x1234)));
        assert_eq!(&buf[20..28], &[0, 1, 0, 2, 0, 73, 0x12, 0x34]);
        // A later fragment carries no L4 header.
        let mut ip = Ipv4Packet::new_checked(&mut buf[..]).unwrap();
        ip.set_frag_offset(8);
        assert_eq!((ip.ports(), ip.l4_checksum()), (None, None));
        assert!(!ip.set_ports(3, 4) && !ip.set_l4_checksum(5));
        // ICMP has no ports.
        let icmp = Ipv4Packet::new_checked(&ICMP_ECHO[14..]).unwrap();
        assert_eq!((icmp.ports(), icmp.l4_checksum()), (None, None));
        // A TCP header quoted to 8 bytes has its ports, not its checksum.
        let quoted = Ipv4Packet::new_checked_quoted(&TCP_SYN[14..42]).unwrap();
        let tcp = crate::wire::TcpPacket::new_checked(&TCP_SYN[34..]).unwrap();
        assert_eq!(quoted.ports(), Some((tcp.src_port(), tcp.dst_port())));
        assert_eq!(quoted.l4_checksum(), None);
    }
}
