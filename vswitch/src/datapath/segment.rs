//! Software segmentation of TCP and UDP super-frames (what a NIC's TSO and USO would do).
//!
//! Pod TAPs hand us 64 KiB TCP/IPv4 super-frames. Within a node they go to the other TAP whole,
//! but VXLAN to another node must carry MTU-sized frames, so here each super-frame becomes a
//! run of segments written back to back into one buffer, every one already prefixed with its
//! VXLAN header: `out[i * stride ..]` holds segment i, all `stride` bytes long except perhaps
//! the last. That layout is exactly what one `sendmsg` with UDP_SEGMENT takes, so the batch can
//! leave in a single system call; without GSO it is sent one datagram per segment.
//!
//! Per segment: IPv4 total length, identification (+i) and header checksum; TCP sequence
//! number (+i*mss), FIN/PSH only on the last segment and CWR only on the first, and a full TCP
//! checksum (the super-frame's is only the pseudo-header part). A UDP super-frame (a pod's
//! UDP_SEGMENT send, handed over whole when the TAP has USO) becomes datagrams of `gso_size`
//! payload bytes each, every one with its own UDP length and full checksum.
//!
//! With [`Csum::Partial`] (the peer takes VXLAN remote checksum offload) each segment gets only
//! its own pseudo-header sum instead of a full checksum: nothing reads the payload but the copy.

use std::net::Ipv4Addr;

use crate::wire::{
    checksum, EtherType, EthernetFrame, IpProtocol, Ipv4Packet, TcpFlags, TcpPacket, UdpPacket,
    VirtioNetHdr, WireError,
};

/// Where the segments are in the output buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segments {
    /// Distance between segment starts (prefix + headers + MSS).
    pub stride: usize,
    pub count: usize,
    /// Bytes used in the output buffer.
    pub total: usize,
}

impl Segments {
    /// The byte range of segment `i` in the output buffer.
    pub fn range(&self, i: usize) -> std::ops::Range<usize> {
        let start = i * self.stride;
        start..(start + self.stride).min(self.total)
    }
}

const ETH: usize = crate::wire::ETHERNET_HEADER_LEN;

/// What goes into each segment's TCP/UDP checksum field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Csum {
    /// The full checksum.
    Full,
    /// The pseudo-header sum only, for the receiver to finish (NEEDS_CSUM, or VXLAN RCO).
    Partial,
}

/// The partial checksum of an L4 segment of `len` bytes: the folded pseudo-header sum.
fn pseudo_sum(proto: IpProtocol, (src, dst): (Ipv4Addr, Ipv4Addr), len: usize) -> u16 {
    checksum::fold(checksum::pseudo_header_v4(src, dst, proto.0, len as u16))
}

/// Segments a TCP or UDP super-frame, as its virtio-net header's GSO type says.
pub fn segment_ipv4(
    frame: &[u8],
    vnet: &VirtioNetHdr,
    prefix: &[u8],
    csum: Csum,
    out: &mut [u8],
) -> Result<Segments, WireError> {
    if vnet.gso_kind() == VirtioNetHdr::GSO_UDP_L4 {
        segment_udp4(frame, vnet, prefix, csum, out)
    } else {
        segment_tcp4(frame, vnet, prefix, csum, out)
    }
}

/// Segments a TCP/IPv4 super-frame (`frame` starts at the Ethernet header) into `out`.
pub fn segment_tcp4(
    frame: &[u8],
    vnet: &VirtioNetHdr,
    prefix: &[u8],
    csum: Csum,
    out: &mut [u8],
) -> Result<Segments, WireError> {
    let ip = ipv4_of(frame, IpProtocol::TCP)?;
    let tcp = TcpPacket::new_checked(ip.payload())?;
    let (seq, flags) = (tcp.seq_number(), tcp.flags());
    let mss = vnet.gso_size as usize;
    cut(
        frame,
        &ip,
        tcp.header_len() as usize,
        mss,
        prefix,
        out,
        |i, last, l4, len, addrs| {
            let mut tcp = TcpPacket::new_unchecked(l4);
            tcp.set_seq_number(seq.wrapping_add((i * mss) as u32));
            let mut fl = flags;
            if !last {
                fl = TcpFlags(fl.bits() & !(TcpFlags::FIN.bits() | TcpFlags::PSH.bits()));
            }
            if i > 0 {
                fl = TcpFlags(fl.bits() & !TcpFlags::CWR.bits());
            }
            tcp.set_flags(fl);
            match csum {
                Csum::Full => tcp.fill_checksum(addrs.0, addrs.1),
                Csum::Partial => {
                    let l4_len = tcp.header_len() as usize + len;
                    tcp.set_checksum(pseudo_sum(IpProtocol::TCP, addrs, l4_len));
                }
            }
        },
    )
}

/// Segments a UDP/IPv4 super-frame (`frame` starts at the Ethernet header) into `out`: one
/// datagram per `gso_size` bytes of payload, each prefixed with `prefix`.
pub fn segment_udp4(
    frame: &[u8],
    vnet: &VirtioNetHdr,
    prefix: &[u8],
    csum: Csum,
    out: &mut [u8],
) -> Result<Segments, WireError> {
    let ip = ipv4_of(frame, IpProtocol::UDP)?;
    let size = vnet.gso_size as usize;
    cut(frame, &ip, 8, size, prefix, out, |_, _, l4, len, addrs| {
        let mut udp = UdpPacket::new_unchecked(l4);
        udp.set_len((8 + len) as u16);
        match csum {
            Csum::Full => udp.fill_checksum(addrs.0, addrs.1),
            Csum::Partial => udp.set_checksum(pseudo_sum(IpProtocol::UDP, addrs, 8 + len)),
        }
    })
}

/// The IPv4 packet of an Ethernet frame carrying `proto`, unfragmented.
fn ipv4_of(frame: &[u8], proto: IpProtocol) -> Result<Ipv4Packet<&[u8]>, WireError> {
    let eth = EthernetFrame::new_checked(frame)?;
    if eth.ethertype() != EtherType::IPV4 {
        return Err(WireError::Unsupported);
    }
    let ip = Ipv4Packet::new_checked(&frame[ETH..])?;
    if ip.protocol() != proto || ip.is_fragment() {
        return Err(WireError::Unsupported);
    }
    Ok(ip)
}

/// The layout both protocols share: the super-frame's headers (Ethernet, IPv4, `l4_hdr` bytes
/// of L4) again before every `size` bytes of its payload, each segment after `prefix`, with the
/// IPv4 length, identification and checksum of its own. `fix(i, last, l4, len, addrs)` then
/// finishes segment i's L4 header (`l4` is its L4 header and payload, `len` its payload size).
fn cut(
    frame: &[u8],
    ip: &Ipv4Packet<&[u8]>,
    l4_hdr: usize,
    size: usize,
    prefix: &[u8],
    out: &mut [u8],
    fix: impl Fn(usize, bool, &mut [u8], usize, (Ipv4Addr, Ipv4Addr)),
) -> Result<Segments, WireError> {
    let ihl = ip.header_len() as usize;
    let hdrs = ETH + ihl + l4_hdr;
    // The IPv4 total length bounds the payload (a UDP super-frame's own length field may not
    // describe it: it can exceed 16 bits).
    let ip_end = ETH + ip.total_len() as usize;
    let payload = frame.get(hdrs..ip_end).ok_or(WireError::Malformed)?;
    if size == 0 {
        return Err(WireError::Malformed);
    }
    let count = payload.len().div_ceil(size).max(1);
    let stride = prefix.len() + hdrs + size;
    let last = payload.len() - (count - 1) * size;
    let total = (count - 1) * stride + prefix.len() + hdrs + last;
    if out.len() < total {
        return Err(WireError::Truncated);
    }
    let addrs = (ip.src_addr(), ip.dst_addr());
    let ident = ip.ident();
    // The segments' IPv4 headers differ from the super-frame's only in length and
    // identification: sum the rest once, and each header checksum is that plus two words
    // (one's-complement sums are linear), with no read of the header just written.
    let mut hdr = [0u8; 60];
    hdr[..ihl].copy_from_slice(frame.get(ETH..ETH + ihl).ok_or(WireError::Malformed)?);
    hdr[2..6].fill(0);
    hdr[10..12].fill(0);
    let base = checksum::sum(&hdr[..ihl]);
    for i in 0..count {
        let chunk = &payload[i * size..((i + 1) * size).min(payload.len())];
        let seg = &mut out[i * stride..i * stride + prefix.len() + hdrs + chunk.len()];
        seg[..prefix.len()].copy_from_slice(prefix);
        let f = &mut seg[prefix.len()..];
        f[..hdrs].copy_from_slice(&frame[..hdrs]);
        f[hdrs..].copy_from_slice(chunk);
        let ip_buf = &mut f[ETH..];
        let mut ip = Ipv4Packet::new_unchecked(&mut *ip_buf);
        let (len, id) = (
            (ihl + l4_hdr + chunk.len()) as u16,
            ident.wrapping_add(i as u16),
        );
        ip.set_total_len(len);
        ip.set_ident(id);
        ip.set_checksum(checksum::finish(base + u32::from(len) + u32::from(id)));
        fix(i, i + 1 == count, &mut ip_buf[ihl..], chunk.len(), addrs);
    }
    Ok(Segments {
        stride,
        count,
        total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

    fn super_frame(payload_len: usize) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4([10, 244, 1, 2], [10, 244, 2, 2], 63)
            .tcp(40000, 5201, 1_000_000, 64000)
            .psh()
            .ack(77);
        let payload: Vec<u8> = (0..payload_len).map(|i| (i % 251) as u8).collect();
        let mut out = Vec::new();
        b.write(&mut out, &payload).unwrap();
        out
    }

    #[test]
    fn splits_into_valid_mss_segments_with_prefix() {
        let frame = super_frame(5000);
        let vnet = VirtioNetHdr {
            flags: VirtioNetHdr::F_NEEDS_CSUM,
            gso_type: VirtioNetHdr::GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1398,
            csum_start: 34,
            csum_offset: 16,
        };
        let mut out = vec![0u8; 16384];
        let s = segment_tcp4(&frame, &vnet, b"VXLANHDR", Csum::Full, &mut out).unwrap();
        assert_eq!(s.count, 4);
        assert_eq!(s.stride, 8 + 54 + 1398);
        let mut data = Vec::new();
        for i in 0..s.count {
            let seg = &out[s.range(i)];
            assert_eq!(&seg[..8], b"VXLANHDR");
            let p = SlicedPacket::from_ethernet(&seg[8..]).unwrap();
            let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
                panic!()
            };
            let h = ip.header().to_header();
            assert_eq!(h.header_checksum, h.calc_header_checksum());
            assert_eq!(h.identification, i as u16);
            let Some(TransportSlice::Tcp(tcp)) = &p.transport else {
                panic!()
            };
            assert_eq!(tcp.sequence_number(), 1_000_000 + (i * 1398) as u32);
            assert_eq!(tcp.psh(), i == 3, "PSH only on the last segment");
            assert!(tcp.ack());
            let th = tcp.to_header();
            assert_eq!(
                th.checksum,
                th.calc_checksum_ipv4(&h, tcp.payload()).unwrap(),
                "segment {i} TCP checksum"
            );
            data.extend_from_slice(tcp.payload());
        }
        let orig = super_frame(5000);
        assert_eq!(data, orig[54..]);
    }

    /// With a partial checksum each segment carries its own pseudo-header sum (its length
    /// differs from the super-frame's), and finishing it as the receiving stack does gives the
    /// full checksum; TCP and UDP alike.
    #[test]
    fn partial_mode_leaves_each_segment_its_own_pseudo_header_sum() {
        let tcp = VirtioNetHdr {
            flags: VirtioNetHdr::F_NEEDS_CSUM,
            gso_type: VirtioNetHdr::GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1398,
            csum_start: 34,
            csum_offset: 16,
        };
        let udp = VirtioNetHdr {
            gso_type: VirtioNetHdr::GSO_UDP_L4,
            hdr_len: 42,
            gso_size: 1000,
            csum_offset: 6,
            ..tcp
        };
        for (frame, vnet, proto) in [
            (super_frame(5000), tcp, IpProtocol::TCP),
            (udp_super_frame(3500), udp, IpProtocol::UDP),
        ] {
            let mut out = vec![0u8; 16384];
            let s = segment_ipv4(&frame, &vnet, &[], Csum::Partial, &mut out).unwrap();
            assert_eq!(s.count, 4);
            for i in 0..s.count {
                let mut seg = out[s.range(i)].to_vec();
                let l4_len = seg.len() - 34;
                let field = 34 + usize::from(vnet.csum_offset);
                let addrs = (Ipv4Addr::new(10, 244, 1, 2), Ipv4Addr::new(10, 244, 2, 2));
                assert_eq!(
                    u16::from_be_bytes([seg[field], seg[field + 1]]),
                    pseudo_sum(proto, addrs, l4_len)
                );
                let one = VirtioNetHdr {
                    gso_type: VirtioNetHdr::GSO_NONE,
                    ..vnet
                };
                crate::wire::virtio::finish_checksum(&one, &mut seg).unwrap();
                let p = SlicedPacket::from_ethernet(&seg).unwrap();
                let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
                    panic!()
                };
                let h = ip.header().to_header();
                let ok = match &p.transport {
                    Some(TransportSlice::Tcp(t)) => {
                        t.to_header().checksum
                            == t.to_header().calc_checksum_ipv4(&h, t.payload()).unwrap()
                    }
                    Some(TransportSlice::Udp(u)) => {
                        u.to_header().checksum
                            == u.to_header().calc_checksum_ipv4(&h, u.payload()).unwrap()
                    }
                    _ => false,
                };
                assert!(ok, "{proto:?} segment {i}: finished checksum is wrong");
            }
        }
    }

    fn udp_super_frame(payload_len: usize) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4([10, 244, 1, 2], [10, 244, 2, 2], 63)
            .udp(40000, 4433);
        let payload: Vec<u8> = (0..payload_len).map(|i| (i % 253) as u8).collect();
        let mut out = Vec::new();
        b.write(&mut out, &payload).unwrap();
        // As a pod's stack hands it over: only the pseudo-header part of the checksum.
        out[40..42].copy_from_slice(&[0x12, 0x34]);
        out
    }

    #[test]
    fn splits_udp_into_datagrams_of_gso_size_with_prefix() {
        let frame = udp_super_frame(3000);
        let vnet = VirtioNetHdr {
            flags: VirtioNetHdr::F_NEEDS_CSUM,
            gso_type: VirtioNetHdr::GSO_UDP_L4,
            hdr_len: 42,
            gso_size: 1200,
            csum_start: 34,
            csum_offset: 6,
        };
        let mut out = vec![0u8; 16384];
        let s = segment_udp4(&frame, &vnet, b"VXLANHDR", Csum::Full, &mut out).unwrap();
        assert_eq!(s.count, 3);
        assert_eq!(s.stride, 8 + 42 + 1200);
        let mut data = Vec::new();
        for i in 0..s.count {
            let seg = &out[s.range(i)];
            assert_eq!(&seg[..8], b"VXLANHDR");
            let p = SlicedPacket::from_ethernet(&seg[8..]).unwrap();
            let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
                panic!()
            };
            let h = ip.header().to_header();
            assert_eq!(h.header_checksum, h.calc_header_checksum());
            assert_eq!(h.identification, i as u16);
            let Some(TransportSlice::Udp(udp)) = &p.transport else {
                panic!()
            };
            let want = if i < 2 { 1200 } else { 600 };
            assert_eq!(udp.payload().len(), want);
            assert_eq!(usize::from(udp.length()), 8 + want);
            let uh = udp.to_header();
            assert_eq!(
                uh.checksum,
                uh.calc_checksum_ipv4(&h, udp.payload()).unwrap(),
                "datagram {i} UDP checksum"
            );
            data.extend_from_slice(udp.payload());
        }
        assert_eq!(data, frame[42..]);
        // A TCP super-frame is not UDP.
        assert_eq!(
            segment_udp4(&super_frame(100), &vnet, &[], Csum::Full, &mut out),
            Err(WireError::Unsupported)
        );
    }

    #[test]
    fn refuses_what_it_cannot_segment() {
        let frame = super_frame(100);
        let mut vnet = VirtioNetHdr::NONE;
        let mut out = vec![0u8; 4096];
        assert_eq!(
            segment_tcp4(&frame, &vnet, &[], Csum::Full, &mut out),
            Err(WireError::Malformed)
        );
        vnet.gso_size = 10;
        let mut small = vec![0u8; 100];
        assert_eq!(
            segment_tcp4(&frame, &vnet, &[], Csum::Full, &mut small),
            Err(WireError::Truncated)
        );
        assert!(segment_tcp4(&frame[..30], &vnet, &[], Csum::Full, &mut out).is_err());
    }
}
