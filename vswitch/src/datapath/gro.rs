//! Receive-side coalescing of TCP segments into super-frames (software GRO).
//!
//! The underlay socket hands us, with UDP GRO, up to 64 KiB of VXLAN datagrams at a time, most
//! of them consecutive MSS-sized segments of one TCP flow. Writing each to the pod's TAP costs a
//! system call and a trip through the pod's stack per 1.4 KB; instead consecutive segments of a
//! flow are merged into one TSO super-frame (virtio-net header GSO_TCPV4 + NEEDS_CSUM), written
//! with one `writev`: the headers of the first segment, patched, then every segment's payload
//! in place. Nothing is copied.
//!
//! Segments merge only when Linux's own GRO would merge them: same flow, next sequence number,
//! same ACK and options, ACK (PSH allowed on the last one) and no other flag, every segment but
//! the last of the same size. Each merged segment's TCP checksum is verified first, since the
//! super-frame carries only a partial checksum and the pod's stack will not check it again; a
//! segment that fails is passed on alone for the kernel to judge.
//!
//! A segment whose sender left its checksum partial (VXLAN remote checksum offload) is not
//! summed here: the outer UDP checksum, which the kernel verified, covered it. It merges like
//! the others, and alone it goes to the pod marked NEEDS_CSUM, as a pod's own frames come.
//!
//! UDP datagrams of one flow merge the same way into a UDP super-frame (GSO_UDP_L4) when the
//! pod's TAP takes those (USO): every datagram but the last of the same size, so the pod's
//! stack cuts them back exactly as they were sent, and each checksum verified first. A stream
//! of small datagrams then costs one `writev` per batch instead of one per datagram.

use std::net::Ipv4Addr;
use std::ops::Range;

use crate::pipeline::PortId;
use crate::wire::VirtioNetHdr;
use crate::wire::{
    checksum, EtherType, EthernetFrame, IpProtocol, Ipv4Packet, TcpFlags, TcpPacket, UdpPacket,
};
use overlay::vxlan::Rco;

/// Most segments merged into one super-frame (each one iovec).
pub const MAX_SEGS: usize = 64;
const ETH: usize = crate::wire::ETHERNET_HEADER_LEN;

/// One frame ready for a TAP: a virtio-net header and the byte ranges (into the receive buffer)
/// that make up the frame, in order.
pub struct Out<'a> {
    pub port: PortId,
    pub hdr: VirtioNetHdr,
    pub parts: &'a [Range<usize>],
}

#[derive(Debug, Clone, Copy)]
struct Flow {
    udp: bool,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ports: u32,
    ack: u32,
    ihl: usize,
    thl: usize,
    ttl: u8,
}

struct Pending {
    port: PortId,
    flow: Flow,
    /// The first segment's whole frame (its headers are patched on flush).
    first: Range<usize>,
    next_seq: u32,
    mss: usize,
    /// Payload bytes so far (first segment included).
    payload: usize,
    /// The last segment was shorter than the MSS or had PSH: nothing may follow.
    closed: bool,
    psh: bool,
    /// The first segment's checksum is partial, here (when it ends up alone).
    rco: Option<Rco>,
}

/// Coalesces frames of one receive batch. Feed frames in order with [`Gro::push`]; call
/// [`Gro::flush`] at the end of the batch.
pub struct Gro {
    pending: Option<Pending>,
    parts: [Range<usize>; MAX_SEGS + 1],
    nparts: usize,
}

impl Default for Gro {
    fn default() -> Self {
        Gro {
            pending: None,
            parts: std::array::from_fn(|_| 0..0),
            nparts: 0,
        }
    }
}

/// What a TCP segment looks like, if it is one GRO may merge.
struct Seg {
    flow: Flow,
    seq: u32,
    payload: Range<usize>,
    psh: bool,
}

/// The virtio-net header of a frame passed on alone: its checksum finished or, if partial,
/// where the pod's stack finds it.
fn single(rco: Option<Rco>) -> VirtioNetHdr {
    match rco {
        None => VirtioNetHdr::NONE,
        Some(r) => VirtioNetHdr {
            flags: VirtioNetHdr::F_NEEDS_CSUM,
            csum_start: r.start,
            csum_offset: r.offset,
            ..VirtioNetHdr::NONE
        },
    }
}

/// `partial`: the checksum is known good without summing (RCO), so it is not verified.
fn classify(buf: &[u8], frame: &Range<usize>, uso: bool, partial: bool) -> Option<Seg> {
    let f = buf.get(frame.clone())?;
    let eth = EthernetFrame::new_checked(f).ok()?;
    if eth.ethertype() != EtherType::IPV4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    if ip.is_fragment() {
        return None;
    }
    let ihl = ip.header_len() as usize;
    if ip.protocol() == IpProtocol::UDP && uso {
        let udp = UdpPacket::new_checked(ip.payload()).ok()?;
        let start = frame.start + ETH + ihl + 8;
        let end = frame.start + ETH + ihl + udp.len() as usize;
        if start >= end || !(partial || udp.verify_checksum(ip.src_addr(), ip.dst_addr())) {
            return None;
        }
        return Some(Seg {
            flow: Flow {
                udp: true,
                src: ip.src_addr(),
                dst: ip.dst_addr(),
                ports: u32::from(udp.src_port()) << 16 | u32::from(udp.dst_port()),
                ack: 0,
                ihl,
                thl: 8,
                ttl: ip.ttl(),
            },
            seq: 0,
            payload: start..end,
            psh: false,
        });
    }
    if ip.protocol() != IpProtocol::TCP {
        return None;
    }
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    let flags = tcp.flags();
    let allowed = TcpFlags::ACK.bits() | TcpFlags::PSH.bits();
    if flags.bits() & !allowed != 0 || !flags.contains(TcpFlags::ACK) {
        return None;
    }
    let thl = tcp.header_len() as usize;
    let start = frame.start + ETH + ihl + thl;
    let end = frame.start + ETH + ip.total_len() as usize;
    if start >= end {
        return None;
    }
    // The checksum must be right before the segment loses it.
    if !partial && !tcp.verify_checksum(ip.src_addr(), ip.dst_addr()) {
        return None;
    }
    Some(Seg {
        flow: Flow {
            udp: false,
            src: ip.src_addr(),
            dst: ip.dst_addr(),
            ports: u32::from(tcp.src_port()) << 16 | u32::from(tcp.dst_port()),
            ack: tcp.ack_number(),
            ihl,
            thl,
            ttl: ip.ttl(),
        },
        seq: tcp.seq_number(),
        payload: start..end,
        psh: flags.contains(TcpFlags::PSH),
    })
}

fn same_options(
    buf: &[u8],
    a: &Range<usize>,
    b_frame: &Range<usize>,
    ihl: usize,
    thl: usize,
) -> bool {
    let opt = |start: usize| buf.get(start + ETH + ihl + 20..start + ETH + ihl + thl);
    opt(a.start).is_some() && opt(a.start) == opt(b_frame.start)
}

impl Gro {
    /// Offers a frame (a byte range of `buf`) destined to `port`; `uso` says whether the port
    /// takes UDP super-frames, `rco` where the frame's checksum is if its sender left it
    /// partial. Frames that cannot be merged are emitted at once (after whatever was pending)
    /// through `emit`.
    pub fn push(
        &mut self,
        buf: &mut [u8],
        port: PortId,
        uso: bool,
        frame: Range<usize>,
        rco: Option<Rco>,
        emit: &mut impl FnMut(&[u8], Out<'_>),
    ) {
        let seg = classify(buf, &frame, uso, rco.is_some());
        if let (Some(p), Some(s)) = (&mut self.pending, &seg) {
            let len = s.payload.len();
            let f = &s.flow;
            let fits = p.port == port
                && !p.closed
                && f.udp == p.flow.udp
                && f.src == p.flow.src
                && f.dst == p.flow.dst
                && f.ports == p.flow.ports
                && f.ack == p.flow.ack
                && f.ihl == p.flow.ihl
                && f.thl == p.flow.thl
                && f.ttl == p.flow.ttl
                && s.seq == p.next_seq
                && len <= p.mss
                && p.payload + len + p.flow.ihl + p.flow.thl <= 65_535
                && self.nparts < MAX_SEGS
                && (f.udp || same_options(buf, &p.first, &frame, f.ihl, f.thl));
            if fits {
                // UDP has no sequence: `seq` is 0 and `next_seq` stays 0.
                p.next_seq = p.next_seq.wrapping_add(if f.udp { 0 } else { len as u32 });
                p.payload += len;
                p.closed = len < p.mss || s.psh;
                p.psh |= s.psh;
                self.parts[self.nparts] = s.payload.clone();
                self.nparts += 1;
                return;
            }
        }
        self.flush(buf, emit);
        match seg {
            Some(s) if !s.psh => {
                let len = s.payload.len();
                let next = if s.flow.udp { 0 } else { len as u32 };
                self.pending = Some(Pending {
                    port,
                    flow: s.flow,
                    first: frame.clone(),
                    next_seq: s.seq.wrapping_add(next),
                    mss: len,
                    payload: len,
                    closed: false,
                    psh: false,
                    rco,
                });
                // Up to the end of the L4 payload: never an Ethernet pad into the middle of the
                // merged payload.
                self.parts[0] = frame.start..s.payload.end;
                self.nparts = 1;
            }
            _ => {
                self.parts[0] = frame;
                emit(
                    buf,
                    Out {
                        port,
                        hdr: single(rco),
                        parts: &self.parts[..1],
                    },
                );
            }
        }
    }

    /// Emits what is pending: one frame, or a super-frame with patched headers.
    pub fn flush(&mut self, buf: &mut [u8], emit: &mut impl FnMut(&[u8], Out<'_>)) {
        let Some(p) = self.pending.take() else {
            return;
        };
        let n = self.nparts;
        self.nparts = 0;
        if n == 1 {
            emit(
                buf,
                Out {
                    port: p.port,
                    hdr: single(p.rco),
                    parts: &self.parts[..1],
                },
            );
            return;
        }
        let (ihl, thl) = (p.flow.ihl, p.flow.thl);
        let ip_len = ihl + thl + p.payload;
        let first = p.first.start;
        let proto = if p.flow.udp {
            IpProtocol::UDP
        } else {
            IpProtocol::TCP
        };
        {
            let ip_buf = &mut buf[first + ETH..first + ETH + ihl + thl];
            let mut ip = Ipv4Packet::new_unchecked(&mut *ip_buf);
            ip.set_total_len(ip_len as u16);
            ip.fill_checksum();
            // NEEDS_CSUM: the field holds the pseudo-header sum, the stack adds the rest.
            let pseudo = checksum::fold(checksum::pseudo_header_v4(
                p.flow.src,
                p.flow.dst,
                proto.0,
                (thl + p.payload) as u16,
            ));
            if p.flow.udp {
                let mut udp = UdpPacket::new_unchecked(&mut ip_buf[ihl..]);
                udp.set_len((thl + p.payload) as u16);
                udp.set_checksum(pseudo);
            } else {
                let mut tcp = TcpPacket::new_unchecked(&mut ip_buf[ihl..]);
                if p.psh {
                    tcp.set_flags(tcp.flags() | TcpFlags::PSH);
                }
                tcp.set_checksum(pseudo);
            }
        }
        // The first part is the first segment's headers and payload together.
        let hdr = VirtioNetHdr {
            flags: VirtioNetHdr::F_NEEDS_CSUM,
            gso_type: if p.flow.udp {
                VirtioNetHdr::GSO_UDP_L4
            } else {
                VirtioNetHdr::GSO_TCPV4
            },
            hdr_len: (ETH + ihl + thl) as u16,
            gso_size: p.mss as u16,
            csum_start: (ETH + ihl) as u16,
            csum_offset: if p.flow.udp { 6 } else { 16 },
        };
        emit(
            buf,
            Out {
                port: p.port,
                hdr,
                parts: &self.parts[..n],
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::segment::{segment_tcp4, Csum};
    use etherparse::PacketBuilder;

    fn super_frame(len: usize, psh: bool) -> Vec<u8> {
        let mut b = PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4([10, 244, 1, 2], [10, 244, 2, 2], 63)
            .tcp(40000, 5201, 7, 64000)
            .ack(99);
        if psh {
            b = b.psh();
        }
        let payload: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        let mut out = Vec::new();
        b.write(&mut out, &payload).unwrap();
        out
    }

    const VNET: VirtioNetHdr = VirtioNetHdr {
        flags: VirtioNetHdr::F_NEEDS_CSUM,
        gso_type: VirtioNetHdr::GSO_TCPV4,
        hdr_len: 54,
        gso_size: 1000,
        csum_start: 34,
        csum_offset: 16,
    };

    /// Segments `frame` the way the sender does, then coalesces: returns the emitted frames
    /// (header + concatenated parts).
    fn roundtrip(frames: &[Vec<u8>]) -> Vec<(VirtioNetHdr, Vec<u8>)> {
        let mut buf = Vec::new();
        let mut ranges = Vec::new();
        for f in frames {
            let mut out = vec![0u8; 200_000];
            let s = segment_tcp4(f, &VNET, &[], Csum::Full, &mut out).unwrap();
            for i in 0..s.count {
                let r = s.range(i);
                let start = buf.len();
                buf.extend_from_slice(&out[r.clone()]);
                ranges.push(start..buf.len());
            }
        }
        coalesce(&mut buf, &ranges, false)
    }

    #[test]
    fn segments_of_one_flow_become_the_original_super_frame() {
        let orig = super_frame(5500, true);
        let got = roundtrip(std::slice::from_ref(&orig));
        assert_eq!(got.len(), 1);
        let (hdr, frame) = &got[0];
        assert_eq!(hdr.gso_type, VirtioNetHdr::GSO_TCPV4);
        assert_eq!(hdr.gso_size, 1000);
        assert_eq!(hdr.hdr_len, 54);
        assert_eq!(frame.len(), orig.len());
        assert_eq!(frame[54..], orig[54..], "payload in order");
        let ip = Ipv4Packet::new_checked(&frame[ETH..]).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(ip.total_len() as usize, orig.len() - ETH);
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        assert!(tcp.flags().contains(TcpFlags::PSH));
        assert_eq!(tcp.seq_number(), 7);
        // Finishing the partial checksum gives a valid segment.
        let mut f = frame.clone();
        let whole = VirtioNetHdr {
            gso_type: VirtioNetHdr::GSO_NONE,
            ..*hdr
        };
        crate::wire::virtio::finish_checksum(&whole, &mut f).unwrap();
        let ip = Ipv4Packet::new_checked(&f[ETH..]).unwrap();
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        assert!(tcp.verify_checksum(ip.src_addr(), ip.dst_addr()));
    }

    #[test]
    fn does_not_merge_across_gaps_flows_or_bad_checksums() {
        // Two super-frames whose sequence numbers are not contiguous: two outputs.
        let a = super_frame(3000, false);
        let b = super_frame(3000, false); // same seq again: a retransmission
        let got = roundtrip(&[a, b]);
        assert_eq!(got.len(), 2);
        // A corrupt segment is passed on alone, unmerged.
        let orig = super_frame(3000, false);
        let mut out = vec![0u8; 20_000];
        let s = segment_tcp4(&orig, &VNET, &[], Csum::Full, &mut out).unwrap();
        let mut buf = out[..s.total].to_vec();
        buf[s.range(1).start + 60] ^= 0xff;
        let mut n = Vec::new();
        let mut gro = Gro::default();
        let mut emit = |_: &[u8], o: Out<'_>| n.push((o.hdr.gso_type, o.parts.len()));
        for i in 0..s.count {
            gro.push(&mut buf, 1, false, s.range(i), None, &mut emit);
        }
        gro.flush(&mut buf, &mut emit);
        assert_eq!(n, vec![(0, 1), (0, 1), (0, 1)]);
    }

    /// Segments cut with partial checksums (RCO) merge without being summed into the same
    /// super-frame, and a lone one goes out NEEDS_CSUM, so the pod's stack finishes it.
    #[test]
    fn partial_segments_merge_unsummed_and_a_lone_one_is_marked_needs_csum() {
        let rco = Some(Rco {
            start: 34,
            offset: 16,
        });
        let orig = super_frame(3500, true);
        let mut out = vec![0u8; 20_000];
        let s = segment_tcp4(&orig, &VNET, &[], Csum::Partial, &mut out).unwrap();
        let mut buf = out[..s.total].to_vec();
        let mut got = Vec::new();
        let mut gro = Gro::default();
        let mut emit = |b: &[u8], o: Out<'_>| {
            let f: Vec<u8> = o.parts.iter().flat_map(|r| b[r.clone()].to_vec()).collect();
            got.push((o.hdr, f));
        };
        for i in 0..s.count {
            gro.push(&mut buf, 1, false, s.range(i), rco, &mut emit);
        }
        gro.flush(&mut buf, &mut emit);
        assert_eq!(got.len(), 1, "partial segments merge like checked ones");
        let (hdr, frame) = &got[0];
        assert_eq!(
            (hdr.gso_type, hdr.gso_size),
            (VirtioNetHdr::GSO_TCPV4, 1000)
        );
        assert_eq!(frame[54..], orig[54..]);
        // A lone partial segment: NEEDS_CSUM at the TCP checksum; finished, it is valid.
        let mut one = out[s.range(0)].to_vec();
        let len = one.len();
        let mut lone = Vec::new();
        gro.push(&mut one, 2, false, 0..len, rco, &mut |b, o| {
            lone.push((o.hdr, b[o.parts[0].clone()].to_vec()))
        });
        gro.flush(&mut one, &mut |b, o| {
            lone.push((o.hdr, b[o.parts[0].clone()].to_vec()))
        });
        let [(hdr, f)] = &lone[..] else {
            panic!("{} frames", lone.len())
        };
        assert_eq!(
            (hdr.flags, hdr.gso_type, hdr.csum_start, hdr.csum_offset),
            (VirtioNetHdr::F_NEEDS_CSUM, VirtioNetHdr::GSO_NONE, 34, 16)
        );
        let mut f = f.clone();
        crate::wire::virtio::finish_checksum(hdr, &mut f).unwrap();
        let ip = Ipv4Packet::new_checked(&f[ETH..]).unwrap();
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        assert!(tcp.verify_checksum(ip.src_addr(), ip.dst_addr()));
        // Without RCO the same partial segment fails the check and is passed on as it is.
        let mut one = out[s.range(0)].to_vec();
        let mut plain = Vec::new();
        gro.push(&mut one, 2, false, 0..len, None, &mut |_, o| {
            plain.push(o.hdr)
        });
        gro.flush(&mut one, &mut |_, o| plain.push(o.hdr));
        assert_eq!(plain, vec![VirtioNetHdr::NONE]);
    }

    #[test]
    fn non_tcp_frames_pass_through_alone() {
        let b = PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4([10, 244, 1, 2], [10, 244, 2, 2], 63)
            .udp(1, 2);
        let mut f = Vec::new();
        b.write(&mut f, b"hello").unwrap();
        let mut buf = f.clone();
        let mut n = 0;
        let mut gro = Gro::default();
        let len = buf.len();
        gro.push(&mut buf, 3, false, 0..len, None, &mut |_, o| {
            assert_eq!(o.port, 3);
            assert_eq!(o.hdr, VirtioNetHdr::NONE);
            n += 1;
        });
        gro.flush(&mut buf, &mut |_, _| n += 100);
        assert_eq!(n, 1);
    }
    /// The datagrams of a pod's UDP_SEGMENT send as they cross the overlay, back to back in one
    /// buffer: `n` of `size` bytes, the last `last` bytes, datagram k filled with byte k.
    fn datagrams(n: usize, size: usize, last: usize) -> (Vec<u8>, Vec<Range<usize>>) {
        let mut buf = Vec::new();
        let mut ranges = Vec::new();
        for k in 0..n {
            let len = if k + 1 == n { last } else { size };
            let b = PacketBuilder::ethernet2([2; 6], [4; 6])
                .ipv4([10, 244, 1, 2], [10, 244, 2, 2], 63)
                .udp(40000, 4433);
            let start = buf.len();
            b.write(&mut buf, &vec![k as u8; len]).unwrap();
            ranges.push(start..buf.len());
        }
        (buf, ranges)
    }

    /// Offers `ranges` of `buf` to GRO for port 1 in order: the frames it emits (header and
    /// concatenated parts).
    fn coalesce(
        buf: &mut [u8],
        ranges: &[Range<usize>],
        uso: bool,
    ) -> Vec<(VirtioNetHdr, Vec<u8>)> {
        let mut got = Vec::new();
        let mut gro = Gro::default();
        let mut emit = |b: &[u8], o: Out<'_>| {
            let mut f = Vec::new();
            for p in o.parts {
                f.extend_from_slice(&b[p.clone()]);
            }
            got.push((o.hdr, f));
        };
        for r in ranges {
            gro.push(buf, 1, uso, r.clone(), None, &mut emit);
        }
        gro.flush(buf, &mut emit);
        got
    }

    #[test]
    fn udp_datagrams_of_one_flow_become_a_udp_super_frame_for_a_uso_port() {
        let (mut buf, ranges) = datagrams(11, 1000, 500);
        let got = coalesce(&mut buf, &ranges, true);
        assert_eq!(got.len(), 1);
        let (hdr, frame) = &got[0];
        assert_eq!(hdr.gso_type, VirtioNetHdr::GSO_UDP_L4);
        assert_eq!(hdr.gso_size, 1000);
        assert_eq!((hdr.csum_start, hdr.csum_offset), (34, 6));
        assert_eq!(frame.len(), 42 + 10 * 1000 + 500);
        let ip = Ipv4Packet::new_checked(&frame[ETH..]).unwrap();
        assert!(ip.verify_checksum());
        // Cut again as the pod's stack does: the same datagrams, checksums valid.
        let mut out = vec![0u8; 20_000];
        let s =
            crate::datapath::segment::segment_udp4(frame, hdr, &[], Csum::Full, &mut out).unwrap();
        assert_eq!(s.count, 11);
        for k in 0..s.count {
            let seg = &out[s.range(k)];
            let ip = Ipv4Packet::new_checked(&seg[ETH..]).unwrap();
            let udp = UdpPacket::new_checked(ip.payload()).unwrap();
            assert!(udp.verify_checksum(ip.src_addr(), ip.dst_addr()));
            let want = if k == 10 { 500 } else { 1000 };
            assert_eq!(udp.payload(), &vec![k as u8; want][..], "datagram {k}");
        }
    }

    #[test]
    fn udp_is_not_merged_without_uso_nor_across_sizes_nor_with_a_bad_checksum() {
        let (mut buf, ranges) = datagrams(4, 1000, 1000);
        let got = coalesce(&mut buf, &ranges, false);
        assert_eq!(got.len(), 4);
        assert!(got.iter().all(|(h, _)| *h == VirtioNetHdr::NONE));
        // A bigger datagram after a smaller one starts a new super-frame.
        let (mut a, ra) = datagrams(3, 500, 500);
        let (b, rb) = datagrams(3, 1000, 1000);
        let off = a.len();
        a.extend_from_slice(&b);
        let ranges: Vec<_> = ra
            .into_iter()
            .chain(rb.into_iter().map(|r| r.start + off..r.end + off))
            .collect();
        let got = coalesce(&mut a, &ranges, true);
        let sizes: Vec<(u16, usize)> = got.iter().map(|(h, f)| (h.gso_size, f.len())).collect();
        assert_eq!(sizes, [(500, 42 + 1500), (1000, 42 + 3000)]);
        // A corrupt datagram is passed on alone.
        let (mut buf, ranges) = datagrams(3, 1000, 1000);
        buf[ranges[1].start + 100] ^= 0xff;
        let got = coalesce(&mut buf, &ranges, true);
        let kinds: Vec<u8> = got.iter().map(|(h, _)| h.gso_type).collect();
        assert_eq!(kinds, [0, 0, 0]);
    }
}
