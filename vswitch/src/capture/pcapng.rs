//! A pcapng writer (draft-ietf-opsawg-pcapng): the four block types a live capture needs.
//!
//! Written by hand rather than with a crate because they are a few fixed layouts and the
//! writer appends them to a reusable buffer with no per-packet allocation beyond it. Blocks
//! are in host byte order, which the Section Header Block's byte-order magic announces. Every
//! interface gets nanosecond timestamps (`if_tsresol` = 9), so timestamps are exact.
//!
//! A capture stream is one section: the Section Header Block, then Interface Description Blocks
//! as capture points first appear (pcapng allows them anywhere before their first packet;
//! libpcap, tshark and Wireshark read them so), then Enhanced Packet Blocks with the
//! direction in `epb_flags`, and at the end an Interface Statistics Block per interface.
//! [`next_block`] splits such a stream back into blocks, for rotating files on block
//! boundaries.

/// Block types.
pub const SHB: u32 = 0x0A0D_0D0A;
pub const IDB: u32 = 0x0000_0001;
pub const ISB: u32 = 0x0000_0005;
pub const EPB: u32 = 0x0000_0006;
const BYTE_ORDER_MAGIC: u32 = 0x1A2B_3C4D;
/// LINKTYPE_ETHERNET.
pub const LINKTYPE_ETHERNET: u16 = 1;

/// Which way a packet went, for `epb_flags` bits 0-1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Unknown,
    Inbound,
    Outbound,
}

impl Direction {
    pub fn flags(self) -> u32 {
        match self {
            Direction::Unknown => 0,
            Direction::Inbound => 1,
            Direction::Outbound => 2,
        }
    }
}

fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_ne_bytes());
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_ne_bytes());
}

fn put_option(out: &mut Vec<u8>, code: u16, value: &[u8]) {
    // An option value is at most 65535 bytes; longer text is cut.
    let value = &value[..value.len().min(u16::MAX as usize - 3)];
    put_u16(out, code);
    put_u16(out, value.len() as u16);
    out.extend_from_slice(value);
    out.resize(out.len() + pad4(value.len()) - value.len(), 0);
}

fn put_ts(out: &mut Vec<u8>, ts_ns: u64) {
    put_u32(out, (ts_ns >> 32) as u32);
    put_u32(out, ts_ns as u32);
}

/// Starts a block at the end of `out`; returns where it starts.
fn begin(out: &mut Vec<u8>, block_type: u32) -> usize {
    let at = out.len();
    put_u32(out, block_type);
    put_u32(out, 0);
    at
}

/// Ends options (opt_endofopt) if `options` and fills in both length fields.
fn end(out: &mut Vec<u8>, at: usize, options: bool) {
    if options {
        put_u32(out, 0);
    }
    let len = (out.len() - at + 4) as u32;
    put_u32(out, len);
    out[at + 4..at + 8].copy_from_slice(&len.to_ne_bytes());
}

/// The Section Header Block that opens a stream or file.
pub fn section_header(out: &mut Vec<u8>, application: &str) {
    let at = begin(out, SHB);
    put_u32(out, BYTE_ORDER_MAGIC);
    put_u16(out, 1);
    put_u16(out, 0);
    // Section length: not known in advance.
    out.extend_from_slice(&u64::MAX.to_ne_bytes());
    put_option(out, 4, application.as_bytes()); // shb_userappl
    end(out, at, true);
}

/// An Interface Description Block: Ethernet, with a name and description, nanosecond clock.
pub fn interface(out: &mut Vec<u8>, name: &str, description: &str, snaplen: u32) {
    let at = begin(out, IDB);
    put_u16(out, LINKTYPE_ETHERNET);
    put_u16(out, 0);
    put_u32(out, snaplen);
    put_option(out, 2, name.as_bytes()); // if_name
    if !description.is_empty() {
        put_option(out, 3, description.as_bytes()); // if_description
    }
    put_option(out, 9, &[9]); // if_tsresol: 10^-9 s
    end(out, at, true);
}

/// An Enhanced Packet Block for interface `iface` (its index in order of appearance).
/// `orig_len` is the packet's length before any truncation to `data`.
pub fn packet(
    out: &mut Vec<u8>,
    iface: u32,
    ts_ns: u64,
    data: &[u8],
    orig_len: u32,
    dir: Direction,
) {
    let at = begin(out, EPB);
    put_u32(out, iface);
    put_ts(out, ts_ns);
    put_u32(out, data.len() as u32);
    put_u32(out, orig_len.max(data.len() as u32));
    out.extend_from_slice(data);
    out.resize(out.len() + pad4(data.len()) - data.len(), 0);
    let options = dir != Direction::Unknown;
    if options {
        put_option(out, 2, &dir.flags().to_ne_bytes()); // epb_flags
    }
    end(out, at, options);
}

/// An Interface Statistics Block: packets seen at the interface (received) and dropped
/// because the capture queue was full, between `start_ns` and `end_ns`.
pub fn statistics(
    out: &mut Vec<u8>,
    iface: u32,
    start_ns: u64,
    end_ns: u64,
    received: u64,
    dropped: u64,
) {
    let at = begin(out, ISB);
    put_u32(out, iface);
    put_ts(out, end_ns);
    let ts = |v: u64| {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&((v >> 32) as u32).to_ne_bytes());
        b[4..].copy_from_slice(&(v as u32).to_ne_bytes());
        b
    };
    put_option(out, 2, &ts(start_ns)); // isb_starttime
    put_option(out, 3, &ts(end_ns)); // isb_endtime
    put_option(out, 4, &received.to_ne_bytes()); // isb_ifrecv
    put_option(out, 7, &dropped.to_ne_bytes()); // isb_osdrop
    end(out, at, true);
}

/// The type and total length of the block at the start of `buf`, once `buf` holds all of it;
/// `Err` for bytes that are not a block of a host-order stream.
pub fn next_block(buf: &[u8]) -> Result<Option<(u32, usize)>, String> {
    let (Some(t), Some(l)) = (buf.get(0..4), buf.get(4..8)) else {
        return Ok(None);
    };
    let ty = u32::from_ne_bytes([t[0], t[1], t[2], t[3]]);
    let len = u32::from_ne_bytes([l[0], l[1], l[2], l[3]]) as usize;
    if len < 12 || !len.is_multiple_of(4) {
        return Err(format!("bad pcapng block length {len} (type {ty:#x})"));
    }
    Ok((buf.len() >= len).then_some((ty, len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketOption;
    use pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionOption;
    use pcap_file::pcapng::{Block, PcapNgReader};

    #[test]
    fn reads_back_with_an_independent_parser() {
        let mut out = Vec::new();
        section_header(&mut out, "vswitchd test");
        interface(
            &mut out,
            "pod:default/p1:in",
            "frames read from the TAP",
            65535,
        );
        let a = [0xaau8; 61];
        packet(
            &mut out,
            0,
            1_700_000_000_123_456_789,
            &a,
            61,
            Direction::Inbound,
        );
        interface(&mut out, "overlay:outer:out", "", 65535);
        let b = [0x55u8; 64];
        packet(
            &mut out,
            1,
            1_700_000_001_000_000_001,
            &b,
            9000,
            Direction::Outbound,
        );
        packet(
            &mut out,
            0,
            1_700_000_002_000_000_000,
            &a[..3],
            3,
            Direction::Unknown,
        );
        statistics(&mut out, 0, 1, 2, 10, 3);
        assert_eq!(out.len() % 4, 0);

        let mut r = PcapNgReader::new(&out[..]).expect("section header");
        let mut names = Vec::new();
        let mut packets = Vec::new();
        let mut stats = 0;
        while let Some(block) = r.next_block() {
            match block.expect("block") {
                Block::InterfaceDescription(idb) => {
                    assert_eq!(u32::from(idb.linktype), 1);
                    assert_eq!(idb.snaplen, 65535);
                    for o in &idb.options {
                        if let InterfaceDescriptionOption::IfName(n) = o {
                            names.push(n.to_string());
                        }
                    }
                }
                Block::EnhancedPacket(epb) => {
                    let flags = epb.options.iter().find_map(|o| match o {
                        EnhancedPacketOption::Flags(f) => Some(*f),
                        _ => None,
                    });
                    packets.push((
                        epb.interface_id,
                        epb.timestamp.as_nanos(),
                        epb.data.to_vec(),
                        epb.original_len,
                        flags,
                    ));
                }
                Block::InterfaceStatistics(_) => stats += 1,
                _ => {}
            }
        }
        assert_eq!(names, ["pod:default/p1:in", "overlay:outer:out"]);
        assert_eq!(packets.len(), 3);
        assert_eq!(packets[0].0, 0);
        assert_eq!(packets[0].1, 1_700_000_000_123_456_789);
        assert_eq!(packets[0].2, a.to_vec());
        assert_eq!(packets[0].4, Some(1));
        assert_eq!(packets[1].0, 1);
        assert_eq!(packets[1].3, 9000);
        assert_eq!(packets[1].4, Some(2));
        assert_eq!(packets[2].4, None);
        assert_eq!(stats, 1);
    }

    #[test]
    fn splits_a_stream_into_blocks() {
        let mut out = Vec::new();
        section_header(&mut out, "x");
        interface(&mut out, "nat:before", "", 100);
        packet(&mut out, 0, 5, &[1, 2, 3, 4, 5], 5, Direction::Inbound);
        let mut types = Vec::new();
        let mut rest = &out[..];
        while let Some((t, len)) = next_block(rest).unwrap() {
            types.push(t);
            rest = &rest[len..];
        }
        assert!(rest.is_empty());
        assert_eq!(types, [SHB, IDB, EPB]);
        // A partial block is "not yet".
        assert_eq!(next_block(&out[..10]).unwrap(), None);
        assert!(next_block(&[1, 0, 0, 0, 5, 0, 0, 0]).is_err());
    }
}
