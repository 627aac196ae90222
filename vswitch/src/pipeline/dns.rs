//! Cluster DNS queries, decided in the pure pipeline.
//!
//! A UDP query to the switch's resolver is answered here from the table snapshot's
//! [`DnsTable`](crate::dns::DnsTable), and the answer replaces the query in the frame buffer
//! ([`Action::Reply`]), as an ARP or ICMP echo reply does; only a name outside the cluster
//! leaves the pure part, as [`Action::DnsForward`]: asking the upstream resolvers is I/O, so
//! the worker does it and later sends the upstream's answer with [`reply_frame`].
//!
//! Nothing is allocated: the answer is written into the back half of the frame buffer (past
//! the query) and framed at the front. A buffer of [`DNS_BUF_LEN`] bytes lets every answer be
//! as large as a UDP datagram can be; a smaller one gets a truncated (TC) answer sooner.

use std::net::Ipv4Addr;

use super::tables::DnsService;
use super::{udp_frame, Action, Ctx, DropReason, PortEntry, PortId, Tables};
use crate::dns::{answer, Answer};
use crate::wire::{EthernetFrame, Ipv4Packet, UdpPacket, ETHERNET_HEADER_LEN};

/// Ethernet, IPv4 and UDP headers of an answer the switch frames itself.
const HEADERS: usize = ETHERNET_HEADER_LEN + 20 + UdpPacket::<&[u8]>::HEADER_LEN;
/// The largest UDP payload an IPv4 datagram holds.
const MAX_MESSAGE: usize = 65_535 - 20 - 8;
/// A frame buffer this large leaves room for the largest answer: the answer itself in the back
/// half, and the framed answer in the front half.
pub const DNS_BUF_LEN: usize = 2 * MAX_MESSAGE + HEADERS;

/// A query for the upstream resolvers: who asked whom, and where in the frame the DNS message
/// is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsQuery {
    /// The pod's address and port, where the answer goes.
    pub client: (Ipv4Addr, u16),
    /// The resolver address the pod asked, where the answer comes from.
    pub server: Ipv4Addr,
    start: u32,
    end: u32,
}

impl DnsQuery {
    /// The client, the server and the DNS message of a UDP query frame.
    fn parse(frame: &[u8]) -> Option<DnsQuery> {
        let eth = EthernetFrame::new_checked(frame).ok()?;
        let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
        let udp = UdpPacket::new_checked(ip.payload()).ok()?;
        let at = ETHERNET_HEADER_LEN + ip.header_len() as usize;
        let start = at + UdpPacket::<&[u8]>::HEADER_LEN;
        let end = at + udp.len() as usize;
        frame.get(start..end)?;
        Some(DnsQuery {
            client: (ip.src_addr(), udp.src_port()),
            server: ip.dst_addr(),
            start: u32::try_from(start).ok()?,
            end: u32::try_from(end).ok()?,
        })
    }

    /// The DNS message in the query's frame.
    pub fn message<'a>(&self, frame: &'a [u8]) -> &'a [u8] {
        frame
            .get(self.start as usize..self.end as usize)
            .unwrap_or_default()
    }
}

/// Answers the query in `buf[..len]` (from `port`) from the cluster's records, or says it must
/// go upstream. Malformed and unanswerable queries are dropped as `malformed`.
pub(super) fn query(
    cx: &mut Ctx<'_>,
    dns: &DnsService,
    port: &PortEntry,
    buf: &mut [u8],
    len: usize,
) -> Action {
    let len = len.min(buf.len());
    let Some(q) = DnsQuery::parse(&buf[..len]) else {
        cx.note(|| "not a DNS query: dropped".into());
        return Action::Drop(DropReason::Malformed);
    };
    // The query stays intact in the front part while the answer is written into the back.
    let mid = ((buf.len() + HEADERS) / 2).max(len);
    let (front, back) = buf.split_at_mut(mid);
    let room = back
        .len()
        .min(front.len().saturating_sub(HEADERS))
        .min(MAX_MESSAGE);
    match answer(&dns.table, q.message(front), &mut back[..room]) {
        Answer::Local(n) => {
            cx.note(|| "answered from the cluster's records".into());
            match reply_frame(cx.t, port.id, q, &back[..n], front) {
                Some(flen) => Action::Reply(flen),
                // Cannot happen: `room` leaves space for the headers.
                None => Action::Drop(DropReason::Malformed),
            }
        }
        Answer::Forward => {
            cx.note(|| "a name outside the cluster: forwarded to the upstream resolvers".into());
            Action::DnsForward(q)
        }
        Answer::Invalid => {
            cx.note(|| "not a DNS query the switch can answer: dropped".into());
            Action::Drop(DropReason::Malformed)
        }
    }
}

/// Frames the DNS answer `message` to `q`'s client on `port` (a pod's, or the host's) into
/// `out`; its length, or `None` when the port is gone or `out` is too small.
pub fn reply_frame(
    t: &Tables,
    port: PortId,
    q: DnsQuery,
    message: &[u8],
    out: &mut [u8],
) -> Option<usize> {
    let mac = t
        .port(port)
        .or(t.host.as_ref().filter(|h| h.id == port))?
        .mac;
    udp_frame(t, mac, (q.server, 53), q.client, message, out)
}
