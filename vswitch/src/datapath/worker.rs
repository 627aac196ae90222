//! One worker thread: reads its queue of every port and its underlay socket, asks the pipeline,
//! and moves the bytes where the answer says.
//!
//! The worker decides nothing about a frame itself: ARP, ICMP, Service translation and cluster
//! DNS answers are all the pipeline's; what is left here is I/O (reading, sending, segmenting,
//! batching, handing a query to the upstream forwarder) and the counters of what I/O failed.

use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, Sender};
use hashbrown::HashMap;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use super::busy::{Batch, BusyPoll, Idle, BULK, LOCAL_NAP};
use super::stats::PortStats;
use super::tap::{Tap, VNET_HDR_LEN};
use super::underlay::{self, Underlay};
use super::{gro, segment, Command, CtGauge, UNDERLAY, WAKER};
use crate::capture::{Hub, NatSnap, TapSet};
use crate::pipeline::{self, Action, Conntrack, Ctx, DnsQuery, DropReason, Meta, PortId, Tables};
use crate::wire::{virtio, VirtioNetHdr};
use overlay::vxlan;

/// Where the VXLAN header goes in front of a frame read from a TAP: it ends exactly where the
/// virtio-net header does, so the datagram is contiguous without a copy.
const DGRAM_AT: usize = VNET_HDR_LEN - vxlan::HEADER_LEN;
/// Messages per `recvmmsg` on the underlay, each up to 64 KiB of GRO-coalesced datagrams.
const RX_BATCH: usize = 8;
const RX_BUF_LEN: usize = 65_536;
/// Room for one super-frame cut into segments, each with its own headers and VXLAN prefix.
const SEG_BUF_LEN: usize = 2 * 65_536 + 16_384;
/// Frames read from one port before the worker looks at the others.
const BATCH: usize = 64;
/// A TSO super-frame is at most 64 KiB of IP packet plus Ethernet and virtio-net headers; the
/// pipeline answers a DNS query in the same buffer, which takes more.
const BUF_LEN: usize = VNET_HDR_LEN
    + max(
        crate::wire::ETHERNET_HEADER_LEN + 65_535 + 64,
        pipeline::DNS_BUF_LEN,
    );

const fn max(a: usize, b: usize) -> usize {
    if a > b {
        a
    } else {
        b
    }
}

type Ports = HashMap<PortId, Port, foldhash::fast::RandomState>;

pub(super) struct Port {
    /// Every queue of the device; this worker reads `queues[rx]` (if the device has that many)
    /// and writes `queues[tx]`.
    queues: Arc<[Tap]>,
    rx: Option<usize>,
    tx: usize,
    stats: Arc<PortStats>,
    /// In `Worker::ready`: may still have frames queued (mio is edge-triggered).
    queued: bool,
}

impl Port {
    fn tx(&self) -> &Tap {
        &self.queues[self.tx]
    }
}

/// What [`Datapath::start`](super::Datapath::start) gives a worker.
pub(super) struct Setup {
    /// Which worker this is: the TAP queue it reads.
    pub index: usize,
    pub poll: Poll,
    pub commands: Receiver<Command>,
    /// The worker's own command channel, for answers that come back later (DNS forwarding).
    pub to_self: (Sender<Command>, Arc<Waker>),
    pub tables: Arc<ArcSwap<Tables>>,
    pub ct: Conntrack,
    /// The workers' common clock.
    pub epoch: Instant,
    pub capture: Arc<Hub>,
    pub busy: BusyPoll,
    pub underlay: Option<Underlay>,
    pub underlay_stats: Arc<PortStats>,
}

pub(super) struct Worker {
    index: usize,
    pub(super) busy: BusyPoll,
    poll: Poll,
    commands: Receiver<Command>,
    tables: Arc<ArcSwap<Tables>>,
    ct: Conntrack,
    epoch: Instant,
    capture: Arc<Hub>,
    ports: Ports,
    ready: Vec<PortId>,
    /// One frame read from a port, with room for the reply the pipeline may make of it.
    buf: Box<[u8]>,
    /// The frame read before the one in `buf`, not yet handled (see
    /// [`Worker::service_port`]); the two buffers swap.
    held: Box<[u8]>,
    /// Messages read from the underlay.
    rbuf: Box<[u8]>,
    gro: gro::Gro,
    underlay_ready: bool,
    overlay: Overlay,
    upstream: Upstream,
    /// The egress engine, when egress translation is on, and whether this batch handed it
    /// packets (it is woken once per batch).
    egress: Option<crate::egress::EgressTx>,
    egress_pending: bool,
    /// What the current batch moved.
    batch: Batch,
    /// Frames read (counted here, published to `frames_seen` once per batch).
    frames: u64,
    frames_seen: Arc<AtomicU64>,
    ct_stats: Arc<CtGauge>,
}

/// The sending side of the overlay: the underlay socket (also read by
/// [`Worker::service_underlay`]), and what sending frames to peers as datagrams needs.
struct Overlay {
    underlay: Option<Underlay>,
    small: SmallBatch,
    /// A super-frame cut into datagrams.
    seg: Box<[u8]>,
    stats: Arc<PortStats>,
}

/// Where DNS queries for names outside the cluster go, and how the answers get back to the
/// worker that sends them on.
struct Upstream {
    forwarder: Option<crate::dns::Forwarder>,
    to_self: Sender<Command>,
    waker: Arc<Waker>,
}

/// A read from a port.
enum Read {
    /// A frame of this many bytes (virtio-net header included) is in the buffer.
    Frame(usize),
    /// Nothing usable this time; there may be more.
    Again,
    /// The queue is empty (or the port is gone).
    Drained,
}

impl Worker {
    pub fn new(s: Setup) -> io::Result<Worker> {
        if let Some(u) = &s.underlay {
            s.poll
                .registry()
                .register(&mut SourceFd(&u.rx_fd()), UNDERLAY, Interest::READABLE)?;
        }
        let (to_self, waker) = s.to_self;
        Ok(Worker {
            index: s.index,
            busy: s.busy,
            poll: s.poll,
            commands: s.commands,
            tables: s.tables,
            ct: s.ct,
            epoch: s.epoch,
            capture: s.capture,
            ports: HashMap::default(),
            ready: Vec::new(),
            buf: vec![0u8; BUF_LEN].into_boxed_slice(),
            held: vec![0u8; BUF_LEN].into_boxed_slice(),
            rbuf: vec![0u8; RX_BATCH * RX_BUF_LEN].into_boxed_slice(),
            gro: gro::Gro::default(),
            underlay_ready: s.underlay.is_some(),
            overlay: Overlay {
                underlay: s.underlay,
                small: SmallBatch::new(),
                seg: vec![0u8; SEG_BUF_LEN].into_boxed_slice(),
                stats: s.underlay_stats,
            },
            upstream: Upstream {
                forwarder: None,
                to_self,
                waker,
            },
            egress: None,
            egress_pending: false,
            batch: Batch::default(),
            frames: 0,
            frames_seen: Arc::default(),
            ct_stats: Arc::default(),
        })
    }

    /// The connection tracking and frame counters this worker publishes.
    pub fn gauges(&self) -> (Arc<CtGauge>, Arc<AtomicU64>) {
        (self.ct_stats.clone(), self.frames_seen.clone())
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn run(mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            let busy = !self.ready.is_empty() || self.underlay_ready;
            let idle = (!busy).then(|| self.busy.idle(Instant::now()));
            let timeout = match idle {
                None => Some(Duration::ZERO),
                // Busy-polling: a runnable thread on this core (the pod answering) goes first.
                Some(Idle::Spin) => {
                    std::thread::yield_now();
                    Some(Duration::ZERO)
                }
                Some(Idle::Nap) => {
                    std::thread::sleep(LOCAL_NAP);
                    Some(Duration::ZERO)
                }
                // Wake now and then to expire connections even when idle.
                Some(Idle::Wait) if !self.ct.is_empty() => Some(Duration::from_secs(1)),
                Some(Idle::Wait) => None,
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!("datapath poll failed: {e}");
                }
                continue;
            }
            self.note_ready(&events);
            if !self.commands() {
                return;
            }
            let work = !self.ready.is_empty() || self.underlay_ready;
            self.batch = Batch::default();
            self.service_ready();
            if work {
                self.busy.after_batch(Instant::now(), self.batch);
            }
        }
    }

    fn note_ready(&mut self, events: &Events) {
        for ev in events.iter() {
            if ev.token() == WAKER {
                continue;
            }
            if ev.token() == UNDERLAY {
                self.underlay_ready = true;
                continue;
            }
            let id = ev.token().0 as PortId;
            if let Some(p) = self.ports.get_mut(&id) {
                if !p.queued {
                    p.queued = true;
                    self.ready.push(id);
                }
            }
        }
    }

    /// Applies control commands; false on shutdown.
    fn commands(&mut self) -> bool {
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                Command::AddPort { id, queues, stats } => self.add_port(id, queues, stats),
                Command::RemovePort { id, destroy, done } => {
                    self.remove_port(id, destroy);
                    let _ = done.send(());
                }
                Command::FlushUdp(ips) => {
                    let n = self.ct.flush_udp_to(&ips);
                    if n > 0 {
                        tracing::info!("flushed {n} UDP connection(s) to removed endpoints");
                    }
                }
                Command::DumpConntrack(tx) => {
                    let tables = self.tables.load();
                    let _ = tx.send(self.ct.entries(&tables.services).collect());
                }
                Command::SetForwarder(f) => self.upstream.forwarder = Some(f),
                Command::SetEgress(e) => self.egress = e,
                Command::DnsReply { port, query, reply } => self.dns_reply(port, query, &reply),
                Command::Shutdown => return false,
            }
        }
        true
    }

    fn add_port(&mut self, id: PortId, queues: Arc<[Tap]>, stats: Arc<PortStats>) {
        let rx = (self.index < queues.len()).then_some(self.index);
        if let Some(q) = rx {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&queues[q]);
            if let Err(e) = self.poll.registry().register(
                &mut SourceFd(&fd),
                Token(id as usize),
                Interest::READABLE,
            ) {
                tracing::error!("cannot watch port {id} ({}): {e}", queues[q].name());
                return;
            }
            // A frame may already be waiting: look once without waiting for an edge.
            self.ready.push(id);
        }
        let tx = self.index.min(queues.len().saturating_sub(1));
        let port = Port {
            queues,
            rx,
            tx,
            stats,
            queued: rx.is_some(),
        };
        self.ports.insert(id, port);
    }

    fn remove_port(&mut self, id: PortId, destroy: bool) {
        if let Some(p) = self.ports.remove(&id) {
            if let Some(q) = p.rx {
                let fd = std::os::fd::AsRawFd::as_raw_fd(&p.queues[q]);
                let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
            }
            if destroy {
                if let Err(e) = p.queues[0].set_persist(false) {
                    tracing::warn!("TAP {}: clearing persistence: {e}", p.queues[0].name());
                }
            }
        }
        self.ready.retain(|p| *p != id);
    }

    /// The upstream's answer to a query from `port`: framed by the pipeline and sent as the
    /// switch's own reply.
    fn dns_reply(&mut self, port: PortId, query: DnsQuery, reply: &[u8]) {
        let tables = self.tables.load();
        let out = &mut self.buf[VNET_HDR_LEN..];
        let Some(len) = pipeline::dns::reply_frame(&tables, port, query, reply, out) else {
            return;
        };
        let cap = self.capture.current();
        let frame = Frame {
            len: VNET_HDR_LEN + len,
            vnet: VirtioNetHdr::NONE,
        };
        self.act(
            &tables,
            port,
            Action::Reply(len),
            frame,
            None,
            cap.as_deref(),
        );
    }

    /// Publishes the connection tracking and frame counters.
    fn publish_gauges(&self) {
        let (g, c) = (&self.ct_stats, &self.ct.counters);
        g.entries.store(self.ct.len() as u64, Relaxed);
        g.created.store(c.created, Relaxed);
        g.expired.store(c.expired, Relaxed);
        g.evicted.store(c.evicted, Relaxed);
        g.flushed.store(c.flushed, Relaxed);
        self.frames_seen.store(self.frames, Relaxed);
    }

    fn service_ready(&mut self) {
        let tables = self.tables.load();
        let now = self.now_ms();
        // Catches up with the connections the other workers opened since the last batch, and
        // expires a few.
        self.ct.sweep(now, 256);
        self.publish_gauges();
        // Loaded once per batch; `None` (no capture session) is the common case.
        let cap = self.capture.current();
        let cap = cap.as_deref();
        if self.underlay_ready && self.service_underlay(&tables, now, cap) {
            self.underlay_ready = false;
        }
        let mut i = 0;
        while i < self.ready.len() {
            let id = self.ready[i];
            let drained = self.service_port(&tables, id, now, cap);
            self.overlay.flush();
            if drained {
                if let Some(p) = self.ports.get_mut(&id) {
                    p.queued = false;
                }
                self.ready.swap_remove(i);
            } else {
                i += 1;
            }
        }
        if std::mem::take(&mut self.egress_pending) {
            if let Some(e) = &self.egress {
                e.wake();
            }
        }
    }

    /// Reads up to one batch from a port; true when its queue is empty (or the port is gone).
    ///
    /// Each frame is handled once the next one is read (or the queue is found empty), in the
    /// order they came: when a frame is read, [`pipeline::prefetch`] starts loading what its
    /// handling will read out of cache (a new connection's Service), and the next read runs
    /// while it loads.
    fn service_port(
        &mut self,
        tables: &Tables,
        id: PortId,
        now: u64,
        cap: Option<&TapSet>,
    ) -> bool {
        let mut held = None;
        let mut drained = false;
        for _ in 0..BATCH {
            match self.read(id) {
                Read::Frame(n) => {
                    pipeline::prefetch(tables, &self.buf[VNET_HDR_LEN..n]);
                    std::mem::swap(&mut self.buf, &mut self.held);
                    // `buf` now has the frame read before (if any), `held` this one.
                    if let Some(before) = held.replace(n) {
                        self.port_frame(tables, id, before, now, cap);
                    }
                }
                Read::Again => {}
                Read::Drained => {
                    drained = true;
                    break;
                }
            }
        }
        if let Some(last) = held {
            std::mem::swap(&mut self.buf, &mut self.held);
            self.port_frame(tables, id, last, now, cap);
        }
        drained
    }

    /// Reads one frame from the port into the buffer, counting it.
    fn read(&mut self, id: PortId) -> Read {
        let Some(port) = self.ports.get(&id) else {
            return Read::Drained;
        };
        let Some(rxq) = port.rx.and_then(|q| port.queues.get(q)) else {
            return Read::Drained;
        };
        let n = match rxq.recv(&mut self.buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Read::Drained,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Read::Again,
            Err(e) => {
                tracing::warn!("port {id} ({}): read failed: {e}", rxq.name());
                return Read::Drained;
            }
        };
        self.frames += 1;
        self.batch.bulk |= n > BULK;
        port.stats.rx(n.saturating_sub(VNET_HDR_LEN));
        if n <= VNET_HDR_LEN {
            port.stats.count_drop(DropReason::Malformed);
            return Read::Again;
        }
        Read::Frame(n)
    }

    /// The frame in the buffer, read from port `id`: through the pipeline, then where it says.
    fn port_frame(
        &mut self,
        tables: &Tables,
        id: PortId,
        n: usize,
        now: u64,
        cap: Option<&TapSet>,
    ) {
        let nat = cap.and_then(|c| {
            c.port(id, true, &self.buf[VNET_HDR_LEN..n]);
            c.nat_snap(&self.buf[VNET_HDR_LEN..n])
        });
        let vnet = VirtioNetHdr::parse(&self.buf[..VNET_HDR_LEN]).unwrap_or(VirtioNetHdr::NONE);
        let meta = Meta {
            gso_size: if vnet.is_gso() { vnet.gso_size } else { 0 },
            csum_partial: vnet.needs_csum(),
        };
        let mut cx = Ctx {
            t: tables,
            ct: &mut self.ct,
            now_ms: now,
            trace: None,
        };
        let frame = &mut self.buf[VNET_HDR_LEN..];
        let action = pipeline::handle(&mut cx, id, frame, n - VNET_HDR_LEN, meta);
        self.act(
            tables,
            id,
            action,
            Frame { len: n, vnet },
            nat.as_ref(),
            cap,
        );
    }

    /// Does what the pipeline decided for the frame (or reply) in the buffer that came from
    /// port `id`; what fails is counted on that port.
    fn act(
        &mut self,
        tables: &Tables,
        id: PortId,
        action: Action,
        frame: Frame,
        nat: Option<&NatSnap>,
        cap: Option<&TapSet>,
    ) {
        let Some(port) = self.ports.get(&id) else {
            return;
        };
        let n = frame.len;
        if let Some(c) = cap {
            c.after(id, action, nat, &self.buf[VNET_HDR_LEN..], n - VNET_HDR_LEN);
        }
        let done = match action {
            Action::ToPort(out) => match self.ports.get(&out) {
                Some(dst) => {
                    self.batch.local_bulk |= n > BULK;
                    send(dst, &self.buf[..n])
                }
                None => Err(DropReason::PortGone),
            },
            Action::ToPeer(peer) => self.overlay.send(tables, peer, &mut self.buf, frame, cap),
            Action::Reply(len) => {
                // Our own frames are complete: no checksum or segmentation left to do.
                self.buf[..VNET_HDR_LEN].fill(0);
                let end = (VNET_HDR_LEN + len).min(self.buf.len());
                send(port, &self.buf[..end])
            }
            Action::DnsForward(q) => self.upstream.forward(id, q, &self.buf[VNET_HDR_LEN..n]),
            Action::ToEgress => match &self.egress {
                Some(e) => {
                    let ip = &self.buf[VNET_HDR_LEN + crate::wire::ETHERNET_HEADER_LEN..n];
                    let gso = if frame.vnet.is_gso() {
                        frame.vnet.gso_size
                    } else {
                        0
                    };
                    self.egress_pending = true;
                    e.submit(id, gso, ip)
                }
                None => Err(DropReason::NoRoute),
            },
            Action::Drop(reason) => Err(reason),
        };
        if let Err(reason) = done {
            port.stats.count_drop(reason);
        }
    }

    /// Receives up to a few batches of VXLAN messages; true when the socket is drained.
    fn service_underlay(&mut self, tables: &Tables, now: u64, cap: Option<&TapSet>) -> bool {
        let Some(u) = &self.overlay.underlay else {
            return true;
        };
        let mut rx = UnderlayRx {
            tables,
            now,
            cap,
            u,
            stats: &self.overlay.stats,
            ports: &self.ports,
            ct: &mut self.ct,
        };
        let mut meta = [quinn_udp::RecvMeta::default(); RX_BATCH];
        for _ in 0..BATCH / RX_BATCH {
            let got = {
                let mut chunks = self.rbuf.chunks_exact_mut(RX_BUF_LEN);
                let mut iov: [io::IoSliceMut<'_>; RX_BATCH] =
                    std::array::from_fn(|_| io::IoSliceMut::new(chunks.next().unwrap_or_default()));
                u.recv(&mut iov, &mut meta)
            };
            let n = match got {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("underlay receive failed: {e}");
                    return true;
                }
            };
            for (i, m) in meta.iter().enumerate().take(n) {
                self.frames += 1;
                self.batch.bulk |= m.len > BULK;
                rx.message(&mut self.rbuf, &mut self.gro, i * RX_BUF_LEN, m);
            }
            // Fewer messages than asked for: the queue was empty when the call returned (no
            // transport errors cut a batch short: IP_RECVERR is off), and edge-triggered
            // readiness reports the next datagram. Another call would only say EAGAIN: one
            // system call less per wake-up, which is most of them for ping-like traffic.
            if n < RX_BATCH {
                return true;
            }
        }
        false
    }
}

/// A frame in the worker's buffer: its length with the virtio-net header, and that header.
#[derive(Clone, Copy)]
struct Frame {
    len: usize,
    vnet: VirtioNetHdr,
}

/// Sends a frame (virtio-net header first) out of a port, counting it there.
fn send(port: &Port, frame: &[u8]) -> Result<(), DropReason> {
    match port.tx().send(frame) {
        Ok(_) => {
            port.stats.tx(frame.len() - VNET_HDR_LEN);
            Ok(())
        }
        Err(_) => Err(DropReason::TxError),
    }
}

impl Overlay {
    /// Encapsulates the frame in `buf` for `peer` and sends it (a super-frame as segments at
    /// once, a frame into the batch of small datagrams).
    fn send(
        &mut self,
        tables: &Tables,
        peer: overlay::PeerId,
        buf: &mut [u8],
        f: Frame,
        cap: Option<&TapSet>,
    ) -> Result<(), DropReason> {
        // The peer left the table since the pipeline chose it (as PortGone).
        let peer = tables.peers.get(peer).ok_or(DropReason::PeerGone)?;
        // A peer in the table but no underlay socket to send it on.
        let u = self.underlay.as_ref().ok_or(DropReason::NoUnderlay)?;
        let frame = &mut buf[VNET_HDR_LEN..f.len];
        // Picks the send socket, so the outer source port (see `steer_key`).
        let key = underlay::steer_key(frame);
        let (prefix, partial) = pipeline::encap_for(tables, peer, &f.vnet, frame);
        let ends = (u.source_for(key), SocketAddr::new(peer.underlay, u.port));
        if f.vnet.is_gso() {
            // Keep the flow's order: what is batched goes first.
            self.small.flush(u, &self.stats);
            if let Some(c) = cap {
                c.overlay_inner(false, frame);
            }
            let csum = if partial {
                segment::Csum::Partial
            } else {
                segment::Csum::Full
            };
            let segs = segment::segment_ipv4(frame, &f.vnet, &prefix, csum, &mut self.seg)
                .map_err(|_| DropReason::Malformed)?;
            let d = &self.seg[..segs.total];
            if let Some(c) = cap {
                c.overlay_sent(ends.0, ends.1, d, Some(segs.stride));
            }
            let k = u
                .send(key, d, Some(segs.stride), peer.underlay)
                .map_err(|_| DropReason::TxError)?;
            self.stats.tx_n(k, d.len());
        } else {
            // A checksum the peer finishes (RCO) stays partial.
            if !partial && virtio::finish_checksum(&f.vnet, frame).is_err() {
                return Err(DropReason::Malformed);
            }
            // The VXLAN header goes where the virtio-net header ends.
            buf[DGRAM_AT..VNET_HDR_LEN].copy_from_slice(&prefix);
            let d = &buf[DGRAM_AT..f.len];
            if let Some(c) = cap {
                c.overlay_inner(false, &d[vxlan::HEADER_LEN..]);
                c.overlay_sent(ends.0, ends.1, d, None);
            }
            self.small.push(u, &self.stats, key, peer.underlay, d);
        }
        Ok(())
    }

    /// Sends the batched small datagrams.
    fn flush(&mut self) {
        if let Some(u) = &self.underlay {
            self.small.flush(u, &self.stats);
        }
    }
}

impl Upstream {
    /// Hands the query in `frame` (from `port`) to the forwarder; its answer comes back to this
    /// worker as [`Command::DnsReply`].
    fn forward(&self, port: PortId, query: DnsQuery, frame: &[u8]) -> Result<(), DropReason> {
        let fw = self.forwarder.as_ref().ok_or(DropReason::NoRoute)?;
        let (tx, waker) = (self.to_self.clone(), self.waker.clone());
        let msg = query.message(frame).to_vec();
        fw.submit(msg, crate::dns::Transport::Udp, move |reply| {
            let _ = tx.send(Command::DnsReply { port, query, reply });
            let _ = waker.wake();
        });
        Ok(())
    }
}

/// What handling the VXLAN messages of one receive touches.
struct UnderlayRx<'a> {
    tables: &'a Tables,
    now: u64,
    cap: Option<&'a TapSet>,
    u: &'a Underlay,
    stats: &'a PortStats,
    ports: &'a Ports,
    ct: &'a mut Conntrack,
}

impl UnderlayRx<'_> {
    /// One received message at `rbuf[base..]` (one datagram, or several GRO-coalesced ones):
    /// each through the pipeline, and those to local pods coalesced again for their TAPs.
    fn message(
        &mut self,
        rbuf: &mut [u8],
        gro: &mut gro::Gro,
        base: usize,
        m: &quinn_udp::RecvMeta,
    ) {
        let msg = base..base + m.len.min(RX_BUF_LEN);
        let stride = if m.stride == 0 { m.len } else { m.stride };
        let mut off = msg.start;
        while off < msg.end {
            let end = (off + stride).min(msg.end);
            let d = off..end;
            off = end;
            if let Some((out, inner, rco)) = self.datagram(rbuf, d, m.addr) {
                let uso = self.ports.get(&out).is_some_and(|p| p.tx().uso());
                gro.push(rbuf, out, uso, inner, rco, &mut |b, o| self.deliver(b, o));
            }
        }
        gro.flush(rbuf, &mut |b, o| self.deliver(b, o));
    }

    /// One VXLAN datagram at `rbuf[d]` from `from`: the port its inner frame (rewritten in
    /// place) goes to, where that frame is, and where its checksum is if left partial.
    fn datagram(
        &mut self,
        rbuf: &mut [u8],
        d: Range<usize>,
        from: SocketAddr,
    ) -> Option<(PortId, Range<usize>, Option<vxlan::Rco>)> {
        self.stats.rx(d.len());
        if let Some(c) = self.cap {
            c.overlay_outer(true, from, self.u.local_addr(), &rbuf[d.clone()]);
        }
        let (peer, rco) = match pipeline::decap(self.tables, from.ip(), &rbuf[d.clone()]) {
            Ok(p) => p,
            Err(reason) => {
                self.stats.count_drop(reason);
                return None;
            }
        };
        let inner = d.start + vxlan::HEADER_LEN..d.end;
        let nat = self.cap.and_then(|c| {
            c.overlay_inner(true, &rbuf[inner.clone()]);
            c.nat_snap(&rbuf[inner.clone()])
        });
        let mut cx = Ctx {
            t: self.tables,
            ct: self.ct,
            now_ms: self.now,
            trace: None,
        };
        let action = pipeline::handle_underlay(&mut cx, peer, &mut rbuf[inner.clone()], rco);
        if let (Some(c), Some(s), Action::ToPort(_)) = (self.cap, &nat, action) {
            c.nat(s, &rbuf[inner.clone()]);
        }
        let reason = match action {
            Action::ToPort(out) => return Some((out, inner, rco)),
            Action::Drop(reason) => {
                if let Some(c) = self.cap {
                    c.policy_denied(reason, &rbuf[inner]);
                }
                reason
            }
            // Frames from peers are only ever routed to local pods.
            Action::ToPeer(_) | Action::Reply(_) | Action::DnsForward(_) | Action::ToEgress => {
                DropReason::NoRoute
            }
        };
        self.stats.count_drop(reason);
        None
    }

    /// Writes a (possibly coalesced) frame, in parts of `b`, to its port's TAP.
    fn deliver(&self, b: &[u8], o: gro::Out<'_>) {
        let Some(dst) = self.ports.get(&o.port) else {
            self.stats.count_drop(DropReason::PortGone);
            return;
        };
        if let Some(c) = self.cap {
            c.port_out_parts(
                o.port,
                o.parts.iter().map(|r| b.get(r.clone()).unwrap_or_default()),
            );
        }
        let hdr = o.hdr.to_bytes();
        let mut iov = [io::IoSlice::new(&[]); gro::MAX_SEGS + 2];
        iov[0] = io::IoSlice::new(&hdr);
        let mut len = 0;
        for (slot, r) in iov[1..].iter_mut().zip(o.parts) {
            *slot = io::IoSlice::new(b.get(r.clone()).unwrap_or_default());
            len += r.len();
        }
        match dst.tx().send_vectored(&iov[..1 + o.parts.len()]) {
            Ok(_) => dst.stats.tx_n(o.parts.len(), len),
            Err(_) => self.stats.count_drop(DropReason::TxError),
        }
    }
}

/// Small datagrams to one peer, batched into one UDP_SEGMENT send.
///
/// A stream of small packets (a UDP flood of 64-byte datagrams, a run of ACKs) to one peer
/// becomes a run of equal-size VXLAN datagrams: appended here back to back and sent with one
/// `sendmsg` instead of one each, as a segmented super-frame is. A batch holds one steering key
/// (so one source port) and one size (a shorter datagram may end it), and is flushed at the end
/// of every read batch and before a super-frame of the port is sent, so no flow is reordered.
struct SmallBatch {
    buf: Box<[u8]>,
    len: usize,
    seg: usize,
    count: usize,
    peer: Option<std::net::IpAddr>,
    key: u32,
}

impl SmallBatch {
    /// At most this many bytes in one send (one IPv4 datagram before segmentation).
    const MAX: usize = 65_507;
    const MAX_SEGS: usize = 64;

    fn new() -> Self {
        SmallBatch {
            buf: vec![0u8; Self::MAX].into_boxed_slice(),
            len: 0,
            seg: 0,
            count: 0,
            peer: None,
            key: 0,
        }
    }

    fn push(
        &mut self,
        u: &Underlay,
        stats: &PortStats,
        key: u32,
        peer: std::net::IpAddr,
        d: &[u8],
    ) {
        let fits = self.peer == Some(peer)
            && self.key == key
            && d.len() <= self.seg
            && self.len + d.len() <= Self::MAX
            && self.count < Self::MAX_SEGS;
        if !fits {
            self.flush(u, stats);
        }
        if d.len() > Self::MAX {
            return;
        }
        if self.count == 0 {
            self.peer = Some(peer);
            self.key = key;
            self.seg = d.len();
        }
        self.buf[self.len..self.len + d.len()].copy_from_slice(d);
        self.len += d.len();
        self.count += 1;
        // A shorter datagram can only be the last of a segmented send.
        if d.len() < self.seg {
            self.flush(u, stats);
        }
    }

    fn flush(&mut self, u: &Underlay, stats: &PortStats) {
        if self.count == 0 {
            return;
        }
        let Some(peer) = self.peer else { return };
        let seg = (self.count > 1).then_some(self.seg);
        match u.send(self.key, &self.buf[..self.len], seg, peer) {
            Ok(n) => stats.tx_n(n, self.len),
            Err(_) => stats.count_drop(DropReason::TxError),
        }
        self.len = 0;
        self.count = 0;
        self.peer = None;
    }
}
