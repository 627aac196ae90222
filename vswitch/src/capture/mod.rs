//! The pcap tap: copies of packets at named points of the switch, streamed as pcapng.
//!
//! A capture session (one `vswitchctl capture`, one admin API request) selects capture points
//! and optionally a filter; the datapath offers each frame that passes a selected point to the
//! session, the filter is evaluated on the frame in place, and only a match is copied (up to the
//! snap length) into the session's bounded queue. A full queue drops the copy and counts it:
//! the datapath never waits for a reader. The control plane drains the queue into a pcapng
//! stream ([`stream`]).
//!
//! Capture points, each with a direction:
//! - `pod` (and `host`, the node's own port `vsw0`): *in* is a frame read from the port's TAP,
//!   into the switch; *out* is a frame written to it. Frames the switch coalesced (GRO) or a pod
//!   sent as a TSO super-frame are captured as they are: one packet of up to 64 KiB, its TCP
//!   checksum possibly partial (as tcpdump on a TSO interface shows).
//! - `nat:before` / `nat:after`: a packet Service translation rewrote, as it entered the
//!   translation (inbound) and as it left routing (outbound: translated, next-hop MACs, TTL
//!   decremented). Packets NAT leaves alone do not appear.
//! - `overlay:inner`: the frame going into VXLAN (out) or coming out of it (in).
//! - `overlay:outer`: the VXLAN datagram with Ethernet/IP/UDP headers synthesised around it,
//!   since the switch sends through a UDP socket and never sees them: the node's underlay
//!   address and the source port of the pool socket the flow hashes to, the peer's address and
//!   VXLAN port; zero MACs; one packet per datagram (a segmented super-frame is each segment's
//!   datagram, as on the wire). A filter matches an outer packet when it matches either the
//!   inner frame or the outer headers (so `host <pod IP>` and `udp port 8472` both select it).
//! - `policy:ingress` / `policy:egress` (`policy` for both; directions *in* and *out*): a packet
//!   NetworkPolicy denied, by the destination pod's ingress or the source pod's egress, as the
//!   verdict saw it (after Service translation, before routing). Only the packet that opens a
//!   connection is judged, so each refused attempt shows up (a TCP client's retries too).
//! - `egress:pod` / `egress:node` (`egress` for both): the two sides of egress translation
//!   ([`crate::egress`]). `egress:pod` is the pod's side as it crosses the engine's boundary:
//!   *in* a pod's packet as the engine takes it from its queue (an Ethernet header from the
//!   pod's MAC to the gateway's put back in front, since the queue holds the IP packet), *out*
//!   a packet the engine writes to a pod (smoltcp's TCP segments, UDP and echo replies, ICMP
//!   errors). `egress:node` is the node's side as the outside sees it, synthesised like
//!   `overlay:outer` since the engine only has sockets: IPv4 from the node socket's local
//!   address and port (the kernel-chosen echo identifier for ICMP) to the outside address,
//!   zero MACs; *out* what the engine sent (a UDP datagram or echo request per send), *in*
//!   what came back. TCP is the stream bytes as the socket sees them, not the wire's
//!   segmentation (the kernel does the real TCP): one PSH|ACK segment per write or read, with
//!   a sequence number per direction counting the connection's bytes from 1, and SYN (out)
//!   and SYN|ACK (in) when the connection opened, FIN when a side shut down, RST when one
//!   reset; checksums are valid, window and options are made up.
//!
//! Off costs one relaxed atomic load per batch; on, a point nobody selected costs a bit test.

pub mod filter;
pub mod pcapng;
pub mod stream;

use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::pipeline::{PortId, HOST_PORT};
use crate::wire::{
    EtherType, EthernetAddress, EthernetFrame, EthernetRepr, IpProtocol, Ipv4Packet, Ipv4Repr,
    Ipv6Packet, Ipv6Repr, L4Checksum, TcpFlags, TcpPacket, TcpRepr, UdpPacket, UdpRepr,
    ETHERNET_HEADER_LEN,
};
pub use filter::{Fields, Filter, FilterError};
pub use pcapng::Direction;

/// Every point's bit: two (in, out) for each [`Stage`].
const ALL_POINTS: u16 = (1 << (2 * (Stage::EgressNode as u16 + 1))) - 1;
/// The inbound bit of each stage is the odd one.
const INBOUND_POINTS: u16 = 0xAAAA & ALL_POINTS;

/// Packets a session's queue holds before copies are dropped.
pub const QUEUE_LEN: usize = 4096;
/// The default and largest snap length.
pub const MAX_SNAPLEN: usize = 65_535;
/// The least snap length: enough for the outer headers of a VXLAN datagram and the inner
/// Ethernet, IP and L4 headers the filter and a reader need.
pub const MIN_SNAPLEN: usize = 64;
/// Sessions at once, per daemon.
pub const MAX_SESSIONS: usize = 16;
/// Ended sessions whose counters are still shown.
const RECENT: usize = 16;
/// Enough of a frame to hold every header NAT may rewrite: Ethernet, IPv4 with options, and
/// for an ICMP error the quoted IPv4 header with options and 8 bytes after it.
const NAT_SNAP: usize = ETHERNET_HEADER_LEN + 60 + 8 + 60 + 8;

/// Where in the switch a packet was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    /// A pod's port (or the host port): `in` read from its TAP, `out` written to it.
    Port,
    /// Service translation: `in` is before, `out` after.
    Nat,
    OverlayInner,
    OverlayOuter,
    /// A packet NetworkPolicy denied: `in` by ingress, `out` by egress.
    Policy,
    /// Egress translation, the pod's side: `in` the pod's packet to the engine, `out` the
    /// engine's to the pod.
    EgressPod,
    /// Egress translation, the node's side (synthesised): `out` what the node's socket sent,
    /// `in` what it received.
    EgressNode,
}

/// A capture point as the datapath reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Point {
    pub stage: Stage,
    /// Inbound: into the switch (or into the stage); outbound: out of it.
    pub inbound: bool,
    /// The port of a `Port` point; 0 otherwise.
    pub port: PortId,
}

impl Point {
    fn bit(stage: Stage, inbound: bool) -> u16 {
        1 << (stage as u16 * 2 + u16::from(inbound))
    }

    pub fn direction(&self) -> Direction {
        if self.inbound {
            Direction::Inbound
        } else {
            Direction::Outbound
        }
    }
}

/// Which points a session wants: a set of (stage, direction) and which ports' `Port` points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selection {
    mask: u16,
    ports: Ports,
}

/// Whose `Port` points a session takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ports {
    /// Every port's, the host port's too.
    All,
    /// The pods' ports (point `pod` without `host`).
    Pods,
    /// The host port's (point `host` without `pod`).
    Host,
    /// Only this port's (the other stages are not selected with a port).
    One(PortId),
}

impl Ports {
    #[inline]
    fn has(self, port: PortId) -> bool {
        match self {
            Ports::All => true,
            Ports::Pods => port != HOST_PORT,
            Ports::Host => port == HOST_PORT,
            Ports::One(p) => p == port,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "unknown capture point {0:?}; the points are pod, host, nat, nat:before, nat:after, \
         overlay, overlay:inner, overlay:outer, policy, policy:ingress, policy:egress, egress, \
         egress:pod, egress:node, all"
    )]
    UnknownPoint(String),
    #[error("unknown direction {0:?}; use in, out or both")]
    UnknownDirection(String),
    #[error("a port selects the pod and host points only, not {0}")]
    PortWithStage(String),
    #[error(
        "port {0} is not at point {1}: `host` is the node's own port (0), `pod` the pods' ports"
    )]
    PortNotAtPoint(PortId, &'static str),
    #[error("the selected points and direction leave nothing to capture")]
    Empty,
    #[error("{MAX_SESSIONS} capture sessions are running already")]
    TooMany,
    #[error(transparent)]
    Filter(#[from] FilterError),
}

impl Selection {
    /// From the API's words: `points` a comma-separated list (empty: all), `direction`
    /// `in`, `out` or `both`, and an optional port (its pod/host points only).
    pub fn parse(
        points: &str,
        direction: &str,
        port: Option<PortId>,
    ) -> Result<Selection, CaptureError> {
        let both = Point::bit(Stage::Port, true) | Point::bit(Stage::Port, false);
        let stage = |s: Stage| both << (s as u16 * 2);
        let mut mask = 0u16;
        let mut non_port = None;
        let (mut pods, mut host) = (false, false);
        let words: Vec<&str> = points
            .split(',')
            .map(str::trim)
            .filter(|w| !w.is_empty())
            .collect();
        for w in &words {
            let m = match *w {
                "all" => {
                    (pods, host) = (true, true);
                    ALL_POINTS
                }
                "port" => {
                    (pods, host) = (true, true);
                    stage(Stage::Port)
                }
                // The host port is a port like the pods', told apart by its id.
                "pod" => {
                    pods = true;
                    stage(Stage::Port)
                }
                "host" => {
                    host = true;
                    stage(Stage::Port)
                }
                "nat" => stage(Stage::Nat),
                "nat:before" => Point::bit(Stage::Nat, true),
                "nat:after" => Point::bit(Stage::Nat, false),
                "overlay" => stage(Stage::OverlayInner) | stage(Stage::OverlayOuter),
                "overlay:inner" => stage(Stage::OverlayInner),
                "overlay:outer" => stage(Stage::OverlayOuter),
                "policy" => stage(Stage::Policy),
                "policy:ingress" => Point::bit(Stage::Policy, true),
                "policy:egress" => Point::bit(Stage::Policy, false),
                "egress" => stage(Stage::EgressPod) | stage(Stage::EgressNode),
                "egress:pod" => stage(Stage::EgressPod),
                "egress:node" => stage(Stage::EgressNode),
                _ => return Err(CaptureError::UnknownPoint(w.to_string())),
            };
            if m & !stage(Stage::Port) != 0 {
                non_port = Some(w.to_string());
            }
            mask |= m;
        }
        if words.is_empty() {
            mask = if port.is_some() {
                stage(Stage::Port)
            } else {
                ALL_POINTS
            };
        }
        if let (Some(_), Some(w)) = (port, non_port) {
            return Err(CaptureError::PortWithStage(w));
        }
        let ports = match (port, pods, host) {
            (Some(p), false, true) if p != HOST_PORT => {
                return Err(CaptureError::PortNotAtPoint(p, "host"))
            }
            (Some(p), true, false) if p == HOST_PORT => {
                return Err(CaptureError::PortNotAtPoint(p, "pod"))
            }
            (Some(p), _, _) => Ports::One(p),
            (None, true, false) => Ports::Pods,
            (None, false, true) => Ports::Host,
            (None, _, _) => Ports::All,
        };
        match direction {
            "" | "both" | "inout" => {}
            "in" => mask &= INBOUND_POINTS,
            "out" => mask &= !INBOUND_POINTS,
            d => return Err(CaptureError::UnknownDirection(d.to_string())),
        }
        if mask == 0 {
            return Err(CaptureError::Empty);
        }
        Ok(Selection { mask, ports })
    }

    pub fn port(&self) -> Option<PortId> {
        match self.ports {
            Ports::One(p) => Some(p),
            _ => None,
        }
    }
}

/// One copied packet.
#[derive(Debug)]
pub struct Captured {
    /// Nanoseconds since the Unix epoch.
    pub ts_ns: u64,
    pub point: Point,
    /// Length before the snap length cut it.
    pub orig_len: u32,
    pub data: Vec<u8>,
}

/// A session's counters: written by the datapath, read by the stream and the API.
#[derive(Debug, Default)]
pub struct SessionStats {
    /// Packets that passed the selection and the filter.
    pub matched: AtomicU64,
    /// Copies queued for the reader.
    pub queued: AtomicU64,
    /// Copies dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Packets written to the stream by the reader.
    pub written: AtomicU64,
}

/// A running capture, as the datapath sees it.
pub struct Session {
    pub id: u64,
    pub sel: Selection,
    pub filter: Option<Filter>,
    pub snaplen: usize,
    /// See [`Request::count`].
    pub count: Option<u64>,
    /// The request as given, for listing sessions.
    pub describe: String,
    pub stats: SessionStats,
    tx: Sender<Captured>,
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl Session {
    /// Offers a packet at `point`; `fields` parses it for the filter, `copy` writes it (at
    /// most `snaplen` bytes) into a buffer. Returns whether it was queued.
    #[inline]
    fn offer(
        &self,
        point: Point,
        len: usize,
        matches: &mut impl FnMut(&Filter) -> bool,
        copy: &impl Fn(&mut Vec<u8>, usize),
    ) {
        if self.sel.mask & Point::bit(point.stage, point.inbound) == 0 {
            return;
        }
        if point.stage == Stage::Port && !self.sel.ports.has(point.port) {
            return;
        }
        if let Some(f) = &self.filter {
            if !matches(f) {
                return;
            }
        }
        // With a count, the reader ends the session at it; a packet past it would be matched
        // but never written (`-c 1` said "2 matched").
        if let Some(limit) = self.count {
            if self.stats.matched.fetch_add(1, Relaxed) >= limit {
                self.stats.matched.fetch_sub(1, Relaxed);
                return;
            }
        } else {
            self.stats.matched.fetch_add(1, Relaxed);
        }
        if self.tx.is_full() {
            self.stats.dropped.fetch_add(1, Relaxed);
            return;
        }
        let take = len.min(self.snaplen);
        let mut data = Vec::with_capacity(take);
        copy(&mut data, take);
        let c = Captured {
            ts_ns: now_ns(),
            point,
            orig_len: len as u32,
            data,
        };
        match self.tx.try_send(c) {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Relaxed);
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.stats.dropped.fetch_add(1, Relaxed);
            }
        }
    }
}

/// The sessions running now, as one immutable set the datapath loads once per batch.
pub struct TapSet {
    sessions: Vec<Arc<Session>>,
    /// The union of the sessions' points.
    mask: u16,
}

/// The headers of a frame as it entered NAT, kept until we know whether NAT rewrote it.
pub struct NatSnap {
    head: [u8; NAT_SNAP],
    len: usize,
}

/// Copies parts (byte slices in order) into `out`, at most `take` bytes.
fn copy_parts<'a>(out: &mut Vec<u8>, take: usize, parts: impl Iterator<Item = &'a [u8]>) {
    for p in parts {
        let room = take - out.len();
        if room == 0 {
            break;
        }
        out.extend_from_slice(&p[..p.len().min(room)]);
    }
}

impl TapSet {
    #[inline]
    fn wants(&self, stage: Stage, inbound: bool) -> bool {
        self.mask & Point::bit(stage, inbound) != 0
    }

    /// Offers a contiguous frame at a point.
    fn offer_frame(&self, point: Point, frame: &[u8]) {
        let mut parsed: Option<Fields> = None;
        let mut matches =
            |f: &Filter| f.matches_fields(parsed.get_or_insert_with(|| Fields::parse(frame)));
        for s in &self.sessions {
            s.offer(
                point,
                frame.len(),
                &mut matches,
                &|out: &mut Vec<u8>, take: usize| out.extend_from_slice(&frame[..take]),
            );
        }
    }

    /// A frame at `stage` in direction `inbound` (port `port`'s, 0 at the switch-wide points),
    /// offered when a session wants that point.
    #[inline]
    fn offer_at(&self, stage: Stage, inbound: bool, port: PortId, frame: &[u8]) {
        if self.wants(stage, inbound) {
            let point = Point {
                stage,
                inbound,
                port,
            };
            self.offer_frame(point, frame);
        }
    }

    /// A frame read from (`inbound`) or written to a port's TAP (no virtio-net header).
    #[inline]
    pub fn port(&self, port: PortId, inbound: bool, frame: &[u8]) {
        self.offer_at(Stage::Port, inbound, port, frame);
    }

    /// A frame written to a port's TAP as parts (GRO): the first part holds the headers.
    pub fn port_out_parts<'a>(&self, port: PortId, parts: impl Iterator<Item = &'a [u8]> + Clone) {
        if !self.wants(Stage::Port, false) {
            return;
        }
        let point = Point {
            stage: Stage::Port,
            inbound: false,
            port,
        };
        let head = parts.clone().next().unwrap_or_default();
        self.offer_parts(point, head, parts);
    }

    /// Offers a packet made of `parts` whose headers are all in `head` (the filter reads
    /// only those).
    fn offer_parts<'a>(
        &self,
        point: Point,
        head: &[u8],
        parts: impl Iterator<Item = &'a [u8]> + Clone,
    ) {
        let len: usize = parts.clone().map(<[u8]>::len).sum();
        let mut parsed: Option<Fields> = None;
        let mut matches = |f: &Filter| {
            f.matches_fields(parsed.get_or_insert_with(|| {
                let mut p = Fields::parse(head);
                p.len = len as u32;
                p
            }))
        };
        for s in &self.sessions {
            s.offer(
                point,
                len,
                &mut matches,
                &|out: &mut Vec<u8>, take: usize| copy_parts(out, take, parts.clone()),
            );
        }
    }

    /// Keeps the headers of a frame about to go through NAT, when a session wants NAT points.
    #[inline]
    pub fn nat_snap(&self, frame: &[u8]) -> Option<NatSnap> {
        if self.mask & (Point::bit(Stage::Nat, true) | Point::bit(Stage::Nat, false)) == 0 {
            return None;
        }
        let len = frame.len().min(NAT_SNAP);
        let mut head = [0u8; NAT_SNAP];
        head[..len].copy_from_slice(&frame[..len]);
        Some(NatSnap { head, len })
    }

    /// After the pipeline forwarded the frame: when NAT rewrote it, offers it as it was
    /// (`nat:before`) and as it is (`nat:after`).
    pub fn nat(&self, snap: &NatSnap, after: &[u8]) {
        if !translated(&snap.head[..snap.len], after) {
            return;
        }
        let h = snap.len.min(after.len());
        let head = &snap.head[..h];
        let tail = &after[h..];
        let before = Point {
            stage: Stage::Nat,
            inbound: true,
            port: 0,
        };
        self.offer_parts(before, head, [head, tail].into_iter());
        self.offer_frame(
            Point {
                stage: Stage::Nat,
                inbound: false,
                port: 0,
            },
            after,
        );
    }

    /// The inner frame going into VXLAN (`inbound` false) or coming out of it.
    #[inline]
    pub fn overlay_inner(&self, inbound: bool, frame: &[u8]) {
        self.offer_at(Stage::OverlayInner, inbound, 0, frame);
    }

    /// After the pipeline decided about a frame read from port `ingress`: the NAT points, and
    /// the copy of what goes out of a port (a switched frame or the switch's reply).
    /// `buf` starts at the frame, which was `len` bytes long on the way in.
    pub fn after(
        &self,
        ingress: PortId,
        action: crate::pipeline::Action,
        nat: Option<&NatSnap>,
        buf: &[u8],
        len: usize,
    ) {
        use crate::pipeline::Action;
        let frame = &buf[..len.min(buf.len())];
        match action {
            Action::ToPort(out) => {
                if let Some(s) = nat {
                    self.nat(s, frame);
                }
                self.port(out, false, frame);
            }
            Action::ToPeer(_) => {
                if let Some(s) = nat {
                    self.nat(s, frame);
                }
            }
            Action::Reply(n) => self.port(ingress, false, &buf[..n.min(buf.len())]),
            Action::Drop(reason) => self.policy_denied(reason, frame),
            Action::DnsForward(_) | Action::ToEgress => {}
        }
    }

    /// A frame the pipeline dropped for `reason`: offered at `policy:ingress` or
    /// `policy:egress` when NetworkPolicy denied it.
    #[inline]
    pub fn policy_denied(&self, reason: crate::pipeline::DropReason, frame: &[u8]) {
        use crate::pipeline::DropReason;
        let inbound = match reason {
            DropReason::PolicyDeniedIngress => true,
            DropReason::PolicyDeniedEgress => false,
            _ => return,
        };
        self.offer_at(Stage::Policy, inbound, 0, frame);
    }

    /// VXLAN datagrams about to be sent: the inner frame of each (`overlay:inner:out`, unless
    /// the caller captured a super-frame already) and each datagram with outer headers.
    /// `datagrams` holds one, or with `stride` several back to back.
    pub fn overlay_sent(
        &self,
        src: SocketAddr,
        dst: SocketAddr,
        datagrams: &[u8],
        stride: Option<usize>,
    ) {
        if !self.wants(Stage::OverlayOuter, false) {
            return;
        }
        let stride = stride.filter(|&s| s > 0).unwrap_or(datagrams.len().max(1));
        for d in datagrams.chunks(stride) {
            self.overlay_outer(false, src, dst, d);
        }
    }

    /// A frame at `egress:pod`: a pod's packet the egress engine took (`inbound`) or one it
    /// wrote to a pod.
    #[inline]
    pub fn egress_pod(&self, inbound: bool, frame: &[u8]) {
        self.offer_at(Stage::EgressPod, inbound, 0, frame);
    }

    /// Whether a session wants `egress:pod` packets in direction `inbound`.
    #[inline]
    pub fn wants_egress_pod(&self, inbound: bool) -> bool {
        self.wants(Stage::EgressPod, inbound)
    }

    /// Whether a session wants `egress:node` packets (either way): the engine looks up its
    /// socket's address only then.
    #[inline]
    pub fn wants_egress_node(&self) -> bool {
        self.wants(Stage::EgressNode, true) || self.wants(Stage::EgressNode, false)
    }

    /// What a node socket of the egress engine sent to the outside address `remote`
    /// (`inbound` false: from `node` to `remote`) or received from it, offered at
    /// `egress:node` as a synthesised IPv4 packet. TCP bytes longer than one IPv4 packet
    /// holds become several segments.
    pub fn egress_node(
        &self,
        inbound: bool,
        node: SocketAddrV4,
        remote: SocketAddrV4,
        l4: NodeL4<'_>,
    ) {
        if !self.wants(Stage::EgressNode, inbound) {
            return;
        }
        let point = Point {
            stage: Stage::EgressNode,
            inbound,
            port: 0,
        };
        let (src, dst) = if inbound {
            (remote, node)
        } else {
            (node, remote)
        };
        let offer = |l4: &NodeL4<'_>| {
            let mut head = [0u8; NODE_HEAD];
            if let Some((hl, payload)) = node_headers(&mut head, src, dst, l4) {
                let head = &head[..hl];
                self.offer_parts(point, head, [head, payload].into_iter());
            }
        };
        match l4 {
            NodeL4::Tcp {
                seq,
                ack,
                flags,
                payload,
            } if payload.len() > NODE_MAX_PAYLOAD => {
                let mut seq = seq;
                for p in payload.chunks(NODE_MAX_PAYLOAD) {
                    offer(&NodeL4::Tcp {
                        seq,
                        ack,
                        flags,
                        payload: p,
                    });
                    seq = seq.wrapping_add(p.len() as u32);
                }
            }
            l4 => offer(&l4),
        }
    }

    /// A VXLAN datagram (VXLAN header + inner frame) sent from `src` to `dst` or received.
    pub fn overlay_outer(&self, inbound: bool, src: SocketAddr, dst: SocketAddr, dgram: &[u8]) {
        if !self.wants(Stage::OverlayOuter, inbound) {
            return;
        }
        let point = Point {
            stage: Stage::OverlayOuter,
            inbound,
            port: 0,
        };
        let mut head = [0u8; OUTER_MAX];
        let hl = outer_headers(&mut head, src, dst, dgram.len());
        let total = hl + dgram.len();
        let vni = dgram
            .get(..8)
            .filter(|h| h[0] & 0x08 != 0)
            .map(|h| u32::from_be_bytes([0, h[4], h[5], h[6]]));
        let inner = dgram.get(8..).unwrap_or_default();
        let mut fields: Option<(Fields, Fields)> = None;
        let mut matches = |f: &Filter| {
            let (i, o) = fields
                .get_or_insert_with(|| (Fields::parse(inner), Fields::outer(src, dst, vni, total)));
            f.matches_fields(i) || f.matches_fields(o)
        };
        let head = &head[..hl];
        for s in &self.sessions {
            s.offer(
                point,
                total,
                &mut matches,
                &|out: &mut Vec<u8>, take: usize| copy_parts(out, take, [head, dgram].into_iter()),
            );
        }
    }
}

/// Whether NAT rewrote a frame: the pipeline's routing changes only MACs, the TTL and the IP
/// checksum; a changed address, port or ICMP body (an ICMP error about a translated
/// connection) is translation.
fn translated(before: &[u8], after: &[u8]) -> bool {
    let n = before.len().min(after.len());
    let (Some(b), Some(a)) = (ipv4_head(&before[..n]), ipv4_head(&after[..n])) else {
        return false;
    };
    if b.src_addr() != a.src_addr() || b.dst_addr() != a.dst_addr() {
        return true;
    }
    let b = Ipv4Packet::new_checked_quoted(b.into_inner());
    let a = Ipv4Packet::new_checked_quoted(a.into_inner());
    let (Ok(b), Ok(a)) = (b, a) else {
        return false;
    };
    match b.protocol() {
        // Ports only: a kernel peer's partial checksum may be completed on the way in.
        IpProtocol::TCP | IpProtocol::UDP => b.ports() != a.ports(),
        IpProtocol::ICMP => b.payload() != a.payload(),
        _ => false,
    }
}

/// The IPv4 packet in a frame. A snap may end inside it, so only its fixed header is sure to be
/// there, which is all the unchecked view's address accessors read.
fn ipv4_head(frame: &[u8]) -> Option<Ipv4Packet<&[u8]>> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let is_v4 = eth.ethertype() == EtherType::IPV4;
    let packet = &eth.into_inner()[ETHERNET_HEADER_LEN..];
    (is_v4 && packet.len() >= Ipv4Packet::<&[u8]>::MIN_HEADER_LEN)
        .then(|| Ipv4Packet::new_unchecked(packet))
}

/// Room for synthesised outer headers: Ethernet, IPv6, UDP.
const OUTER_MAX: usize = ETHERNET_HEADER_LEN + 40 + 8;

/// Writes Ethernet/IP/UDP headers for a UDP payload of `len` bytes from `src` to `dst`;
/// returns their length. IPv4 gets a valid header checksum and no UDP checksum (allowed).
fn outer_headers(out: &mut [u8; OUTER_MAX], src: SocketAddr, dst: SocketAddr, len: usize) -> usize {
    let udp = UdpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
        payload_len: len,
    };
    let (ethertype, ip_len) = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let ip = Ipv4Repr {
                src_addr: s,
                dst_addr: d,
                protocol: IpProtocol::UDP,
                payload_len: udp.buffer_len(),
                ttl: 64,
                // DF, as the kernel sends UDP with PMTU discovery.
                dont_frag: true,
            };
            ip.emit(&mut Ipv4Packet::new_unchecked(
                &mut out[ETHERNET_HEADER_LEN..],
            ));
            (EtherType::IPV4, ip.header_len())
        }
        (s, d) => {
            let to6 = |a: IpAddr| match a {
                IpAddr::V6(a) => a,
                IpAddr::V4(a) => a.to_ipv6_mapped(),
            };
            let ip = Ipv6Repr {
                src_addr: to6(s),
                dst_addr: to6(d),
                next_header: IpProtocol::UDP,
                payload_len: udp.buffer_len(),
                hop_limit: 64,
            };
            ip.emit(&mut Ipv6Packet::new_unchecked(
                &mut out[ETHERNET_HEADER_LEN..],
            ));
            (EtherType::IPV6, ip.header_len())
        }
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress::default(),
        dst_addr: EthernetAddress::default(),
        ethertype,
    };
    eth.emit(&mut EthernetFrame::new_unchecked(&mut out[..]));
    let at = ETHERNET_HEADER_LEN + ip_len;
    let end = at + udp.header_len();
    udp.emit(
        &mut UdpPacket::new_unchecked(&mut out[at..end]),
        L4Checksum::None,
    );
    end
}

/// What an egress node socket moved, for [`TapSet::egress_node`].
#[derive(Debug, Clone, Copy)]
pub enum NodeL4<'a> {
    /// A UDP datagram's payload.
    Udp(&'a [u8]),
    /// An ICMP message (echo request or reply, header included); `ident` is the identifier
    /// on the wire (the node socket's), written over the message's own.
    Icmp { msg: &'a [u8], ident: u16 },
    /// Bytes of a TCP stream as one segment (`payload` empty for a SYN, FIN or RST alone).
    Tcp {
        seq: u32,
        ack: u32,
        flags: TcpFlags,
        payload: &'a [u8],
    },
}

/// Room for the headers `egress:node` synthesises: Ethernet, IPv4, TCP (the largest).
const NODE_HEAD: usize = ETHERNET_HEADER_LEN + 20 + 20;
/// The most TCP payload one synthesised IPv4 packet carries.
const NODE_MAX_PAYLOAD: usize = 65_535 - 20 - 20;
/// The window synthesised TCP segments advertise (the kernel's real one is not known).
const NODE_TCP_WINDOW: u16 = 65_535;

/// Writes Ethernet (zero MACs), IPv4 and the L4 header of a node-side packet from `src` to
/// `dst` into `out`, with valid checksums over the payload that follows them; returns the
/// headers' length and that payload, or `None` when it does not fit in one IPv4 packet (or
/// an ICMP message is shorter than its header).
fn node_headers<'a>(
    out: &mut [u8; NODE_HEAD],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    l4: &NodeL4<'a>,
) -> Option<(usize, &'a [u8])> {
    use crate::wire::checksum;
    let (proto, l4_len, payload): (IpProtocol, usize, &'a [u8]) = match *l4 {
        NodeL4::Udp(p) => (IpProtocol::UDP, 8, p),
        NodeL4::Icmp { msg, .. } => (IpProtocol::ICMP, 8, msg.get(8..)?),
        NodeL4::Tcp { payload, .. } => (IpProtocol::TCP, 20, payload),
    };
    let total = 20 + l4_len + payload.len();
    if total > usize::from(u16::MAX) {
        return None;
    }
    EthernetRepr {
        src_addr: EthernetAddress::default(),
        dst_addr: EthernetAddress::default(),
        ethertype: EtherType::IPV4,
    }
    .emit(&mut EthernetFrame::new_unchecked(&mut out[..]));
    let ip = Ipv4Repr {
        src_addr: *src.ip(),
        dst_addr: *dst.ip(),
        protocol: proto,
        payload_len: l4_len + payload.len(),
        ttl: 64,
        dont_frag: true,
    };
    ip.emit(&mut Ipv4Packet::new_unchecked(
        &mut out[ETHERNET_HEADER_LEN..ETHERNET_HEADER_LEN + 20],
    ));
    let at = ETHERNET_HEADER_LEN + 20;
    let end = at + l4_len;
    let head = &mut out[at..end];
    let l4_total = (l4_len + payload.len()) as u16;
    let pseudo = |p: IpProtocol| checksum::pseudo_header_v4(*src.ip(), *dst.ip(), p.0, l4_total);
    match *l4 {
        NodeL4::Udp(_) => {
            UdpRepr {
                src_port: src.port(),
                dst_port: dst.port(),
                payload_len: payload.len(),
            }
            .emit(&mut UdpPacket::new_unchecked(&mut *head), L4Checksum::None);
            let sum =
                !checksum::combine(&[pseudo(proto), checksum::sum(head), checksum::sum(payload)]);
            // Zero is "no checksum" in UDP over IPv4: all ones says the same sum.
            let sum = if sum == 0 { 0xFFFF } else { sum };
            head[6..8].copy_from_slice(&sum.to_be_bytes());
        }
        NodeL4::Icmp { msg, ident } => {
            head.copy_from_slice(&msg[..8]);
            head[2..4].fill(0);
            head[4..6].copy_from_slice(&ident.to_be_bytes());
            let sum = !checksum::combine(&[checksum::sum(head), checksum::sum(payload)]);
            head[2..4].copy_from_slice(&sum.to_be_bytes());
        }
        NodeL4::Tcp {
            seq, ack, flags, ..
        } => {
            TcpRepr {
                src_port: src.port(),
                dst_port: dst.port(),
                seq_number: seq,
                ack_number: ack,
                flags,
                window_len: NODE_TCP_WINDOW,
                payload_len: payload.len(),
            }
            .emit(&mut TcpPacket::new_unchecked(&mut *head), L4Checksum::None);
            let sum =
                !checksum::combine(&[pseudo(proto), checksum::sum(head), checksum::sum(payload)]);
            head[16..18].copy_from_slice(&sum.to_be_bytes());
        }
    }
    Some((end, payload))
}

/// What a new session asks for.
#[derive(Debug, Clone)]
pub struct Request {
    pub sel: Selection,
    pub filter: Option<Filter>,
    pub snaplen: usize,
    /// The reader stops after this many packets: copies past it are neither made nor counted.
    pub count: Option<u64>,
    pub describe: String,
}

/// A session's counters for the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub id: u64,
    pub describe: String,
    pub running: bool,
    pub matched: u64,
    pub queued: u64,
    pub dropped: u64,
    pub written: u64,
}

fn summary(s: &Session, running: bool) -> Summary {
    Summary {
        id: s.id,
        describe: s.describe.clone(),
        running,
        matched: s.stats.matched.load(Relaxed),
        queued: s.stats.queued.load(Relaxed),
        dropped: s.stats.dropped.load(Relaxed),
        written: s.stats.written.load(Relaxed),
    }
}

/// The sessions of one daemon: opened and closed by the control plane, read by the datapath.
#[derive(Default)]
pub struct Hub {
    on: AtomicBool,
    set: ArcSwapOption<TapSet>,
    sessions: Mutex<Vec<Arc<Session>>>,
    recent: Mutex<std::collections::VecDeque<Summary>>,
    next_id: AtomicU64,
    /// Totals over all sessions, ended ones included (for metrics).
    pub total_dropped: AtomicU64,
    pub total_queued: AtomicU64,
}

impl Hub {
    pub fn new() -> Hub {
        Hub::default()
    }

    /// The running sessions, or `None` (the common case) at the cost of one relaxed load.
    #[inline]
    pub fn current(&self) -> Option<Arc<TapSet>> {
        if !self.on.load(Relaxed) {
            return None;
        }
        self.set.load_full()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, sessions: &[Arc<Session>]) {
        if sessions.is_empty() {
            self.on.store(false, Relaxed);
            self.set.store(None);
            return;
        }
        let mask = sessions.iter().fold(0, |m, s| m | s.sel.mask);
        self.set.store(Some(Arc::new(TapSet {
            sessions: sessions.to_vec(),
            mask,
        })));
        self.on.store(true, Relaxed);
    }

    /// Starts a session; its packets arrive on the receiver until [`Hub::close`].
    pub fn open(&self, req: Request) -> Result<(Arc<Session>, Receiver<Captured>), CaptureError> {
        let mut sessions = self.lock();
        if sessions.len() >= MAX_SESSIONS {
            return Err(CaptureError::TooMany);
        }
        let (tx, rx) = crossbeam_channel::bounded(QUEUE_LEN);
        let s = Arc::new(Session {
            id: self.next_id.fetch_add(1, Relaxed) + 1,
            sel: req.sel,
            filter: req.filter,
            snaplen: req.snaplen.clamp(MIN_SNAPLEN, MAX_SNAPLEN),
            count: req.count,
            describe: req.describe,
            stats: SessionStats::default(),
            tx,
        });
        sessions.push(s.clone());
        self.publish(&sessions);
        Ok((s, rx))
    }

    /// Ends a session. The datapath may still hold it for the rest of a batch; its queue is
    /// then simply not read.
    pub fn close(&self, id: u64) {
        let mut sessions = self.lock();
        let Some(i) = sessions.iter().position(|s| s.id == id) else {
            return;
        };
        let s = sessions.remove(i);
        self.publish(&sessions);
        drop(sessions);
        self.total_dropped
            .fetch_add(s.stats.dropped.load(Relaxed), Relaxed);
        self.total_queued
            .fetch_add(s.stats.queued.load(Relaxed), Relaxed);
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(summary(&s, false));
    }

    /// Running sessions first, then recently ended ones.
    pub fn summaries(&self) -> Vec<Summary> {
        let mut out: Vec<Summary> = self.lock().iter().map(|s| summary(s, true)).collect();
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        out.extend(recent.iter().rev().cloned());
        out
    }

    /// Copies dropped and queued over all sessions, running ones included.
    pub fn totals(&self) -> (u64, u64) {
        let live = self.lock();
        let (mut d, mut q) = (
            self.total_dropped.load(Relaxed),
            self.total_queued.load(Relaxed),
        );
        for s in live.iter() {
            d += s.stats.dropped.load(Relaxed);
            q += s.stats.queued.load(Relaxed);
        }
        (q, d)
    }
}

#[cfg(test)]
mod tests;
