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

use std::net::Ipv4Addr;
use std::ops::Range;

use crate::pipeline::PortId;
use crate::wire::VirtioNetHdr;
use crate::wire::{
    checksum, EtherType, EthernetFrame, IpProtocol, Ipv4Packet, TcpFlags, TcpPacket,
};

/// Most segments merged into one super-frame (each one iovec).
pub const MAX_SEGS: usize = 64;
const ETH: usize = 14;

/// One frame ready for a TAP: a virtio-net header and the byte ranges (into the receive buffer)
/// that make up the frame, in order.
pub struct Out<'a> {
    pub port: PortId,
    pub hdr: VirtioNetHdr,
    pub parts: &'a [Range<usize>],
}

#[derive(Debug, Clone, Copy)]
struct Flow {
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

fn classify(buf: &[u8], frame: &Range<usize>) -> Option<Seg> {
    let f = buf.get(frame.clone())?;
    let eth = EthernetFrame::new_checked(f).ok()?;
    if eth.ethertype() != EtherType::IPV4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    if ip.protocol() != IpProtocol::TCP || ip.is_fragment() {
        return None;
    }
    let ihl = ip.header_len() as usize;
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
    if !tcp.verify_checksum(ip.src_addr(), ip.dst_addr()) {
        return None;
    }
    Some(Seg {
        flow: Flow {
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
    /// Offers a frame (a byte range of `buf`) destined to `port`. Frames that cannot be merged
    /// are emitted at once (after whatever was pending) through `emit`.
    pub fn push(
        &mut self,
        buf: &mut [u8],
        port: PortId,
        frame: Range<usize>,
        emit: &mut impl FnMut(&[u8], Out<'_>),
    ) {
        let seg = classify(buf, &frame);
        if let (Some(p), Some(s)) = (&mut self.pending, &seg) {
            let len = s.payload.len();
            let f = &s.flow;
            let fits = p.port == port
                && !p.closed
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
                && same_options(buf, &p.first, &frame, f.ihl, f.thl);
            if fits {
                p.next_seq = p.next_seq.wrapping_add(len as u32);
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
                self.pending = Some(Pending {
                    port,
                    flow: s.flow,
                    first: frame.clone(),
                    next_seq: s.seq.wrapping_add(len as u32),
                    mss: len,
                    payload: len,
                    closed: false,
                    psh: false,
                });
                self.parts[0] = frame;
                self.nparts = 1;
            }
            _ => {
                self.parts[0] = frame;
                emit(
                    buf,
                    Out {
                        port,
                        hdr: VirtioNetHdr::NONE,
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
                    hdr: VirtioNetHdr::NONE,
                    parts: &self.parts[..1],
                },
            );
            return;
        }
        let (ihl, thl) = (p.flow.ihl, p.flow.thl);
        let ip_len = ihl + thl + p.payload;
        let first = p.first.start;
        {
            let ip_buf = &mut buf[first + ETH..first + ETH + ihl + thl];
            let mut ip = Ipv4Packet::new_unchecked(&mut *ip_buf);
            ip.set_total_len(ip_len as u16);
            ip.fill_checksum();
            let mut tcp = TcpPacket::new_unchecked(&mut ip_buf[ihl..]);
            if p.psh {
                tcp.set_flags(tcp.flags() | TcpFlags::PSH);
            }
            // NEEDS_CSUM: the field holds the pseudo-header sum, the stack adds the rest.
            let pseudo = checksum::pseudo_header_v4(
                p.flow.src,
                p.flow.dst,
                IpProtocol::TCP.0,
                (thl + p.payload) as u16,
            );
            tcp.set_checksum(checksum::fold(pseudo));
        }
        // The first part is the first segment's headers and payload together.
        let hdr = VirtioNetHdr {
            flags: VirtioNetHdr::F_NEEDS_CSUM,
            gso_type: VirtioNetHdr::GSO_TCPV4,
            hdr_len: (ETH + ihl + thl) as u16,
            gso_size: p.mss as u16,
            csum_start: (ETH + ihl) as u16,
            csum_offset: 16,
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
    use crate::datapath::segment::segment_tcp4;
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
            let s = segment_tcp4(f, &VNET, &[], &mut out).unwrap();
            for i in 0..s.count {
                let r = s.range(i);
                let start = buf.len();
                buf.extend_from_slice(&out[r.clone()]);
                ranges.push(start..buf.len());
            }
        }
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
            gro.push(&mut buf, 1, r, &mut emit);
        }
        gro.flush(&mut buf, &mut emit);
        got
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
        let ip = Ipv4Packet::new_checked(&frame[14..]).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(ip.total_len() as usize, orig.len() - 14);
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
        let ip = Ipv4Packet::new_checked(&f[14..]).unwrap();
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
        let s = segment_tcp4(&orig, &VNET, &[], &mut out).unwrap();
        let mut buf = out[..s.total].to_vec();
        buf[s.range(1).start + 60] ^= 0xff;
        let mut n = Vec::new();
        let mut gro = Gro::default();
        let mut emit = |_: &[u8], o: Out<'_>| n.push((o.hdr.gso_type, o.parts.len()));
        for i in 0..s.count {
            gro.push(&mut buf, 1, s.range(i), &mut emit);
        }
        gro.flush(&mut buf, &mut emit);
        assert_eq!(n, vec![(0, 1), (0, 1), (0, 1)]);
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
        gro.push(&mut buf, 3, 0..len, &mut |_, o| {
            assert_eq!(o.port, 3);
            assert_eq!(o.hdr, VirtioNetHdr::NONE);
            n += 1;
        });
        gro.flush(&mut buf, &mut |_, _| n += 100);
        assert_eq!(n, 1);
    }
}
