//! The datapath: worker threads that move frames between ports.
//!
//! A worker owns one queue of every port's multi-queue TAP, its own underlay socket and a mio
//! poll. It reads ready ports in bounded batches (so one busy pod cannot starve the others),
//! loads the table snapshot once per batch, asks the pure [`pipeline`](crate::pipeline) what to
//! do with each frame, and does it. Nothing on this path blocks, locks or allocates: buffers are
//! the worker's own, counters are relaxed atomics, connection tracking is the worker's view of
//! a table shared without locks, and the control plane reaches each worker only through a
//! command channel plus a waker. With several workers, the kernel spreads flows over them (TAP
//! queue steering, SO_REUSEPORT), and each flow tends to stay on one.
//!
//! Frames carry the 10-byte virtio-net header in front. When a frame is switched unchanged the
//! header goes with it, so a 64 KiB TSO super-frame from one pod is handed to the other pod's
//! TAP as one unit and the kernel never segments it. Replies the switch makes itself (ARP, ICMP)
//! get an all-zero header: complete checksums, no GSO.

pub mod gro;
pub mod netns;
pub mod segment;
pub mod stats;
pub mod tap;
pub mod underlay;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, Sender};
use hashbrown::HashMap;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::pipeline::nat::CtEntry;
use crate::pipeline::{self, Action, Conntrack, CtConfig, Ctx, DropReason, Meta, PortId, Tables};
use crate::wire::{virtio, EthernetFrame, Ipv4Packet, VirtioNetHdr};
use overlay::vxlan;
use stats::PortStats;
use tap::{Tap, VNET_HDR_LEN};
use underlay::Underlay;

const WAKER: Token = Token(usize::MAX);
const UNDERLAY: Token = Token(usize::MAX - 1);
/// Where the VXLAN header goes in front of a frame read from a TAP: it ends exactly where the
/// virtio-net header does, so the datagram is contiguous without a copy.
const DGRAM_AT: usize = VNET_HDR_LEN - vxlan::HEADER_LEN;
/// Messages per `recvmmsg` on the underlay, each up to 64 KiB of GRO-coalesced datagrams.
const RX_BATCH: usize = 8;
const RX_BUF_LEN: usize = 65_536;
/// Room for one super-frame cut into segments, each with its own headers and VXLAN prefix.
const SEG_BUF_LEN: usize = 2 * 65_536 + 16_384;
/// A frame (or GRO-coalesced message) bigger than this marks a batch as bulk transfer, after
/// which the worker busy-polls only for [`BULK_SPIN`].
const BULK: usize = 4096;
/// How long a worker keeps polling after a batch of bulk traffic (capped by
/// `datapath.busy_poll_us`). A TCP stream's next super-frame (64 KiB) follows within tens of µs:
/// a worker that is still awake takes it without a sleep and a wake-up (an IPI to an idle
/// core). In the lab this gave 5-10% more stream throughput than no spin, and 20 µs did better
/// than 30 or 60: longer spins take the core from the pods producing the data.
const BULK_SPIN: std::time::Duration = std::time::Duration::from_micros(20);
/// For this long after a bulk batch, every batch gets only [`BULK_SPIN`]: the ACKs of a
/// transfer come in batches of small frames, which would otherwise get the full request/response
/// spin (cross-node TCP +5% in the lab).
const BULK_HOLD: std::time::Duration = std::time::Duration::from_millis(2);
/// After a super-frame went from one local pod to another, an idle worker sleeps this long
/// (plus the thread's timer slack, 50 µs by default) and then looks at its ports, instead of
/// waiting to be woken by the next frame: what a NIC's interrupt moderation does. A worker
/// waiting in epoll costs the pod that sends each frame a cross-core wake-up (an IPI; a VM exit
/// on a VM); a napping worker is woken by no one, and finds several super-frames and their ACKs
/// waiting. Same-node TCP in the lab: 12.6 -> 16 Gbit/s; polling without the nap did as well
/// but took 90% of a core instead of 65%. Not for the overlay: there both nodes' workers
/// napping cost cross-node TCP 10-15%, as the ACKs' round trip then includes two naps. Lasts
/// [`BULK_HOLD`] after the last such frame, so request/response traffic never naps.
const LOCAL_NAP: std::time::Duration = std::time::Duration::from_micros(30);

/// Frames read from one port before the worker looks at the others.
const BATCH: usize = 64;
/// A TSO super-frame is at most 64 KiB of IP packet plus Ethernet and virtio-net headers.
const BUF_LEN: usize = VNET_HDR_LEN + 14 + 65_535 + 64;

pub enum Command {
    AddPort {
        id: PortId,
        queues: Arc<[Tap]>,
        stats: Arc<PortStats>,
    },
    /// Forgets the port (closing this worker's hold on its queues; with `destroy`, also
    /// clearing the device's persistence, so it is deleted once every worker let go) and
    /// acknowledges on `done`.
    RemovePort {
        id: PortId,
        destroy: bool,
        done: Sender<()>,
    },
    /// Drops the UDP connections to these (removed) endpoints at once.
    FlushUdp(Vec<std::net::Ipv4Addr>),
    /// A copy of the connections this worker created.
    DumpConntrack(Sender<Vec<CtEntry>>),
    /// From now on, forward DNS queries the switch cannot answer with this.
    SetForwarder(crate::dns::Forwarder),
    /// An upstream's answer to a forwarded query, for the pod on `port`.
    DnsReply {
        port: PortId,
        client: (std::net::Ipv4Addr, u16),
        server: std::net::Ipv4Addr,
        reply: Vec<u8>,
    },
    Shutdown,
}

/// The control plane's end of one worker thread.
struct Handle {
    tx: Sender<Command>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
    ct_stats: Arc<CtGauge>,
    frames: Arc<std::sync::atomic::AtomicU64>,
}

impl Handle {
    fn send(&self, cmd: Command) {
        // A worker only goes away at shutdown; a send after that has nobody to tell.
        if self.tx.send(cmd).is_ok() {
            let _ = self.waker.wake();
        }
    }
}

/// Handle to the running workers.
///
/// Worker `i` reads queue `i` of every port's multi-queue TAP and its own underlay socket, and
/// writes to that same queue of a port (or its last, for a device with fewer queues), so what
/// it sends into a pod steers that flow's answers back to it. The connection tracking table is
/// one logical table over per-worker views (see [`pipeline::nat`]); everything else a worker
/// touches per packet is its own.
pub struct Datapath {
    epoch: std::time::Instant,
    workers: Vec<Handle>,
    capture: Arc<crate::capture::Hub>,
}

impl Datapath {
    /// Starts `workers` worker threads; with underlays (one per worker) they also carry traffic
    /// to and from peer nodes, counted in `underlay_stats`.
    pub fn start(
        tables: Arc<ArcSwap<Tables>>,
        underlays: Vec<Underlay>,
        underlay_stats: Arc<PortStats>,
        ct: CtConfig,
        workers: usize,
        busy_poll: std::time::Duration,
        pins: &[CpuPin],
    ) -> io::Result<Datapath> {
        let n = workers.max(1);
        if pins.len() > n {
            tracing::warn!(
                "datapath.cpus lists {} CPUs for {n} worker(s): the rest go unused",
                pins.len()
            );
        }
        if !underlays.is_empty() && underlays.len() != n {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} underlay sockets for {n} workers", underlays.len()),
            ));
        }
        let epoch = std::time::Instant::now();
        let capture = Arc::new(crate::capture::Hub::new());
        let mut underlays = underlays.into_iter();
        let mut handles = Vec::with_capacity(n);
        for (index, ct) in Conntrack::group(ct, n).into_iter().enumerate() {
            let poll = Poll::new()?;
            let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
            let (tx, rx) = crossbeam_channel::unbounded();
            let mut worker = Worker::new(poll, rx, tables.clone(), underlay_stats.clone());
            worker.index = index;
            worker.epoch = epoch;
            worker.capture = capture.clone();
            worker.to_self = Some((tx.clone(), waker.clone()));
            worker.ct = ct;
            worker.busy_poll = busy_poll;
            let pin = (!pins.is_empty()).then(|| pins[index % pins.len()]);
            worker.pinned = pin.is_some();
            let ct_stats = worker.ct_stats.clone();
            let frames = worker.frames_seen.clone();
            if let Some(u) = underlays.next() {
                worker.poll.registry().register(
                    &mut SourceFd(&u.rx_fd()),
                    UNDERLAY,
                    Interest::READABLE,
                )?;
                if index == 0 {
                    tracing::info!(
                        "underlay: UDP GRO {}, source ports {:?}",
                        if u.gro() { "on" } else { "off" },
                        u.source_ports()
                    );
                }
                worker.underlay = Some(u);
                worker.underlay_ready = true;
            }
            let thread = std::thread::Builder::new()
                .name(format!("vswitch-dp{index}"))
                .spawn(move || {
                    let mut worker = worker;
                    if let Some(CpuPin { cpu, set }) = pin {
                        match nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set) {
                            Ok(()) => tracing::info!("datapath worker {index} pinned to CPU {cpu}"),
                            Err(e) => {
                                // Not on a core of its own after all: spin like an unpinned one.
                                worker.pinned = false;
                                tracing::error!(
                                    "datapath worker {index}: pinning to CPU {cpu} failed: {e}"
                                )
                            }
                        }
                    }
                    worker.run()
                })?;
            handles.push(Handle {
                tx,
                waker,
                thread: Some(thread),
                ct_stats,
                frames,
            });
        }
        tracing::info!("datapath: {n} worker(s)");
        Ok(Datapath {
            epoch,
            workers: handles,
            capture,
        })
    }

    fn broadcast(&self, cmd: impl Fn() -> Command) {
        for w in &self.workers {
            w.send(cmd());
        }
    }

    /// Hands the port's TAP (all its queues) to the workers.
    pub fn add_port(&self, id: PortId, tap: Tap, stats: Arc<PortStats>) {
        let queues: Arc<[Tap]> = tap.into_queues().into();
        self.broadcast(|| Command::AddPort {
            id,
            queues: queues.clone(),
            stats: stats.clone(),
        });
    }

    /// Removes a port and waits until every worker has let go of it, so its TAP device is
    /// closed (and deleted) when this returns.
    pub fn remove_port(&self, id: PortId) {
        let (done, wait) = crossbeam_channel::bounded(self.workers.len());
        for (i, w) in self.workers.iter().enumerate() {
            w.send(Command::RemovePort {
                id,
                destroy: i == 0,
                done: done.clone(),
            });
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        for _ in &self.workers {
            if wait.recv_deadline(deadline).is_err() {
                break;
            }
        }
    }

    /// Connection tracking size and counters as of the workers' last batches.
    pub fn ct_stats(&self) -> Arc<CtGauge> {
        use std::sync::atomic::Ordering::Relaxed;
        let sum = CtGauge::default();
        for w in &self.workers {
            let g = &w.ct_stats;
            // Every view counts the one shared table.
            sum.entries.fetch_max(g.entries.load(Relaxed), Relaxed);
            sum.created.fetch_add(g.created.load(Relaxed), Relaxed);
            sum.expired.fetch_add(g.expired.load(Relaxed), Relaxed);
            sum.evicted.fetch_add(g.evicted.load(Relaxed), Relaxed);
            sum.flushed.fetch_add(g.flushed.load(Relaxed), Relaxed);
        }
        Arc::new(sum)
    }

    /// Frames (and VXLAN datagrams) each worker has read, in worker order.
    pub fn worker_frames(&self) -> Vec<u64> {
        self.workers
            .iter()
            .map(|w| w.frames.load(std::sync::atomic::Ordering::Relaxed))
            .collect()
    }

    /// The workers' clock (milliseconds since they started), for showing expiry times.
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Hands the workers the upstream forwarder for DNS names outside the cluster.
    pub fn set_forwarder(&self, f: crate::dns::Forwarder) {
        self.broadcast(|| Command::SetForwarder(f.clone()));
    }

    pub fn flush_udp(&self, backends: Vec<std::net::Ipv4Addr>) {
        self.broadcast(|| Command::FlushUdp(backends.clone()));
    }

    /// The connection tracking table as it is now.
    pub fn conntrack(&self) -> Vec<CtEntry> {
        let (tx, rx) = crossbeam_channel::bounded(self.workers.len());
        self.broadcast(|| Command::DumpConntrack(tx.clone()));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut all = Vec::new();
        for _ in &self.workers {
            match rx.recv_deadline(deadline) {
                Ok(mut v) => all.append(&mut v),
                Err(_) => break,
            }
        }
        all
    }

    /// The capture sessions the workers offer packets to.
    pub fn capture(&self) -> Arc<crate::capture::Hub> {
        self.capture.clone()
    }

    /// Whether every worker thread is running.
    pub fn alive(&self) -> bool {
        self.workers
            .iter()
            .all(|w| w.thread.as_ref().is_some_and(|t| !t.is_finished()))
    }

    pub fn shutdown(&mut self) {
        self.broadcast(|| Command::Shutdown);
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Port {
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

/// A CPU a worker is pinned to (`datapath.cpus`).
#[derive(Debug, Clone, Copy)]
pub struct CpuPin {
    pub cpu: usize,
    set: nix::sched::CpuSet,
}

/// One pin per entry of `datapath.cpus`, each checked to be a CPU this process may run on, so
/// a typo fails the start, naming the field, instead of leaving a worker unpinned. vswitchd
/// calls this before it changes anything.
pub fn cpu_pins(cpus: &[u32]) -> io::Result<Vec<CpuPin>> {
    use nix::sched::{sched_getaffinity, CpuSet};
    if cpus.is_empty() {
        return Ok(Vec::new());
    }
    let allowed = sched_getaffinity(nix::unistd::Pid::from_raw(0)).map_err(io::Error::from)?;
    let may = |c: usize| allowed.is_set(c).unwrap_or(false);
    cpus.iter()
        .map(|&cpu| {
            let cpu = cpu as usize;
            let mut set = CpuSet::new();
            if !may(cpu) || set.set(cpu).is_err() {
                let list: Vec<usize> = (0..CpuSet::count()).filter(|&c| may(c)).collect();
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "datapath.cpus: CPU {cpu} is not one this process may run on (allowed: {})",
                        cpu_list(&list)
                    ),
                ));
            }
            Ok(CpuPin { cpu, set })
        })
        .collect()
}

/// CPU numbers as the kernel's list format: `0-3,8,10-11`.
fn cpu_list(cpus: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    out.join(",")
}

struct Worker {
    /// Which worker this is: the TAP queue it reads.
    index: usize,
    /// Pinned to a CPU of its own (`datapath.cpus`): spins its whole window even when bulk.
    pinned: bool,
    /// How long to keep polling after the last packet before sleeping.
    busy_poll: std::time::Duration,
    /// Until when the worker polls without sleeping: set after every batch with packets.
    spin_until: Option<std::time::Instant>,
    /// When the worker last moved a frame bigger than [`BULK`].
    last_bulk: Option<std::time::Instant>,
    /// Whether the current batch moved a frame bigger than [`BULK`].
    bulk: bool,
    /// Whether the current batch moved a frame bigger than [`BULK`] between local pods.
    local_bulk: bool,
    /// When the worker last did.
    last_local_bulk: Option<std::time::Instant>,
    /// Frames read (counted here, published to `frames_seen` once per batch).
    frames: u64,
    frames_seen: Arc<std::sync::atomic::AtomicU64>,
    /// The worker's own command channel, for answers that come back later (DNS forwarding).
    to_self: Option<(Sender<Command>, Arc<Waker>)>,
    forwarder: Option<crate::dns::Forwarder>,
    dns_out: Box<[u8]>,
    poll: Poll,
    rx: Receiver<Command>,
    tables: Arc<ArcSwap<Tables>>,
    ports: HashMap<PortId, Port, foldhash::fast::RandomState>,
    ready: Vec<PortId>,
    buf: Box<[u8]>,
    seg: Box<[u8]>,
    rbuf: Box<[u8]>,
    gro: gro::Gro,
    underlay: Option<Underlay>,
    underlay_ready: bool,
    underlay_stats: Arc<PortStats>,
    ct: Conntrack,
    epoch: std::time::Instant,
    capture: Arc<crate::capture::Hub>,
    ct_stats: Arc<CtGauge>,
    small: SmallBatch,
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

/// The connection tracking table's size and counters, published by the worker for metrics.
#[derive(Debug, Default)]
pub struct CtGauge {
    pub entries: std::sync::atomic::AtomicU64,
    pub created: std::sync::atomic::AtomicU64,
    pub expired: std::sync::atomic::AtomicU64,
    pub evicted: std::sync::atomic::AtomicU64,
    pub flushed: std::sync::atomic::AtomicU64,
}

impl Worker {
    fn new(
        poll: Poll,
        rx: Receiver<Command>,
        tables: Arc<ArcSwap<Tables>>,
        underlay_stats: Arc<PortStats>,
    ) -> Worker {
        Worker {
            index: 0,
            pinned: false,
            busy_poll: std::time::Duration::ZERO,
            spin_until: None,
            last_bulk: None,
            bulk: false,
            local_bulk: false,
            last_local_bulk: None,
            frames: 0,
            frames_seen: Arc::default(),
            poll,
            rx,
            to_self: None,
            forwarder: None,
            dns_out: vec![0u8; 65_535].into_boxed_slice(),
            tables,
            ports: HashMap::default(),
            ready: Vec::new(),
            buf: vec![0u8; BUF_LEN].into_boxed_slice(),
            seg: vec![0u8; SEG_BUF_LEN].into_boxed_slice(),
            rbuf: vec![0u8; RX_BATCH * RX_BUF_LEN].into_boxed_slice(),
            gro: gro::Gro::default(),
            underlay: None,
            underlay_ready: false,
            underlay_stats,
            ct: Conntrack::new(CtConfig::default()),
            epoch: std::time::Instant::now(),
            ct_stats: Arc::default(),
            small: SmallBatch::new(),
            capture: Arc::new(crate::capture::Hub::new()),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn run(mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            let busy = !self.ready.is_empty() || self.underlay_ready;
            let spin = !busy
                && self
                    .spin_until
                    .is_some_and(|t| std::time::Instant::now() < t);
            if spin {
                // Busy-polling: a runnable thread on this core (the pod answering) goes first.
                std::thread::yield_now();
            }
            // Interrupt moderation for bulk traffic between local pods: see [`LOCAL_NAP`].
            let nap = !busy
                && !spin
                && self
                    .last_local_bulk
                    .is_some_and(|t| t.elapsed() < BULK_HOLD);
            if nap {
                std::thread::sleep(LOCAL_NAP);
            }
            let timeout = if busy || spin || nap {
                Some(std::time::Duration::ZERO)
            } else if !self.ct.is_empty() {
                // Wake now and then to expire connections even when idle.
                Some(std::time::Duration::from_secs(1))
            } else {
                None
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!("datapath poll failed: {e}");
                }
                continue;
            }
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
            if !self.commands() {
                return;
            }
            let work = !self.ready.is_empty() || self.underlay_ready;
            self.bulk = false;
            self.local_bulk = false;
            self.service_ready();
            if !work {
                continue;
            }
            let now = std::time::Instant::now();
            if self.bulk {
                self.last_bulk = Some(now);
            }
            if self.local_bulk {
                self.last_local_bulk = Some(now);
            }
            if !self.busy_poll.is_zero() {
                // Spinning pays off for request/response traffic, whose answer comes back
                // within a round trip. A bulk transfer gets only a short spin, to bridge the
                // gap to its next super-frame.
                // The ACK-only batches of a transfer count as bulk too: a long spin on each
                // would take the core from the pods that move the data.
                let bulk = self
                    .last_bulk
                    .is_some_and(|t| now.duration_since(t) < BULK_HOLD);
                // A pinned worker's core is the datapath's: it takes nothing from the pods.
                let window = if bulk && !self.pinned {
                    self.busy_poll.min(BULK_SPIN)
                } else {
                    self.busy_poll
                };
                self.spin_until = Some(now + window);
            }
        }
    }

    /// Applies control commands; false on shutdown.
    fn commands(&mut self) -> bool {
        while let Ok(cmd) = self.rx.try_recv() {
            match cmd {
                Command::AddPort { id, queues, stats } => {
                    let rx = (self.index < queues.len()).then_some(self.index);
                    if let Some(q) = rx {
                        let fd = std::os::fd::AsRawFd::as_raw_fd(&queues[q]);
                        if let Err(e) = self.poll.registry().register(
                            &mut SourceFd(&fd),
                            Token(id as usize),
                            Interest::READABLE,
                        ) {
                            tracing::error!("cannot watch port {id} ({}): {e}", queues[q].name());
                            continue;
                        }
                        // A frame may already be waiting: look once without waiting for an edge.
                        self.ready.push(id);
                    }
                    let tx = self.index.min(queues.len().saturating_sub(1));
                    self.ports.insert(
                        id,
                        Port {
                            queues,
                            rx,
                            tx,
                            stats,
                            queued: rx.is_some(),
                        },
                    );
                }
                Command::RemovePort { id, destroy, done } => {
                    if let Some(p) = self.ports.remove(&id) {
                        if let Some(q) = p.rx {
                            let fd = std::os::fd::AsRawFd::as_raw_fd(&p.queues[q]);
                            let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
                        }
                        if destroy {
                            if let Err(e) = p.queues[0].set_persist(false) {
                                tracing::warn!(
                                    "TAP {}: clearing persistence: {e}",
                                    p.queues[0].name()
                                );
                            }
                        }
                    }
                    self.ready.retain(|p| *p != id);
                    let _ = done.send(());
                }
                Command::FlushUdp(ips) => {
                    let n = self.ct.flush_udp_to(&ips);
                    if n > 0 {
                        tracing::info!("flushed {n} UDP connection(s) to removed endpoints");
                    }
                }
                Command::DumpConntrack(tx) => {
                    let _ = tx.send(self.ct.entries().collect());
                }
                Command::SetForwarder(f) => self.forwarder = Some(f),
                Command::DnsReply {
                    port,
                    client,
                    server,
                    reply,
                } => {
                    let tables = self.tables.load();
                    let mac = tables
                        .port(port)
                        .or(tables.host.as_ref().filter(|h| h.id == port))
                        .map(|p| p.mac);
                    let (Some(mac), Some(dst)) = (mac, self.ports.get(&port)) else {
                        continue;
                    };
                    self.seg[..VNET_HDR_LEN].fill(0);
                    let built = pipeline::udp_frame(
                        &tables,
                        mac,
                        (server, 53),
                        client,
                        &reply,
                        &mut self.seg[VNET_HDR_LEN..],
                    );
                    if let Some(len) = built {
                        if let Some(c) = self.capture.current() {
                            c.port(port, false, &self.seg[VNET_HDR_LEN..VNET_HDR_LEN + len]);
                        }
                        match dst.tx().send(&self.seg[..VNET_HDR_LEN + len]) {
                            Ok(_) => dst.stats.tx(len),
                            Err(_) => dst.stats.count_drop(DropReason::TxError),
                        }
                    }
                }
                Command::Shutdown => return false,
            }
        }
        true
    }

    fn service_ready(&mut self) {
        let tables = self.tables.load();
        let now = self.now_ms();
        // Catches up with the connections the other workers opened since the last batch, and
        // expires a few.
        self.ct.sweep(now, 256);
        {
            use std::sync::atomic::Ordering::Relaxed;
            let (g, c) = (&self.ct_stats, &self.ct.counters);
            g.entries.store(self.ct.len() as u64, Relaxed);
            g.created.store(c.created, Relaxed);
            g.expired.store(c.expired, Relaxed);
            g.evicted.store(c.evicted, Relaxed);
            g.flushed.store(c.flushed, Relaxed);
            self.frames_seen.store(self.frames, Relaxed);
        }
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
            if let Some(u) = &self.underlay {
                self.small.flush(u, &self.underlay_stats);
            }
            if drained {
                if let Some(p) = self.ports.get_mut(&id) {
                    p.queued = false;
                }
                self.ready.swap_remove(i);
            } else {
                i += 1;
            }
        }
    }

    /// Reads up to one batch from a port; true when its queue is empty (or the port is gone).
    fn service_port(
        &mut self,
        tables: &Tables,
        id: PortId,
        now: u64,
        cap: Option<&crate::capture::TapSet>,
    ) -> bool {
        for _ in 0..BATCH {
            let Some(port) = self.ports.get(&id) else {
                return true;
            };
            let Some(rxq) = port.rx.and_then(|q| port.queues.get(q)) else {
                return true;
            };
            let n = match rxq.recv(&mut self.buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("port {id} ({}): read failed: {e}", rxq.name());
                    return true;
                }
            };
            let stats = &port.stats;
            self.frames += 1;
            self.bulk |= n > BULK;
            stats.rx(n.saturating_sub(VNET_HDR_LEN));
            if n <= VNET_HDR_LEN {
                stats.count_drop(DropReason::Malformed);
                continue;
            }
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
            let action = pipeline::handle(
                &mut cx,
                id,
                &mut self.buf[VNET_HDR_LEN..],
                n - VNET_HDR_LEN,
                meta,
            );
            if let Some(c) = cap {
                c.after(
                    id,
                    action,
                    nat.as_ref(),
                    &self.buf[VNET_HDR_LEN..],
                    n - VNET_HDR_LEN,
                );
            }
            match action {
                Action::ToPort(out) => match self.ports.get(&out) {
                    Some(dst) => {
                        self.local_bulk |= n > BULK;
                        match dst.tx().send(&self.buf[..n]) {
                            Ok(_) => dst.stats.tx(n - VNET_HDR_LEN),
                            Err(_) => stats.count_drop(DropReason::TxError),
                        }
                    }
                    None => stats.count_drop(DropReason::PortGone),
                },
                Action::ToPeer(peer) => {
                    // The peer left the table since the pipeline chose it (as PortGone).
                    let Some(peer) = tables.peers.get(peer) else {
                        stats.count_drop(DropReason::PeerGone);
                        continue;
                    };
                    // A peer in the table but no underlay socket to send it on.
                    let Some(u) = &self.underlay else {
                        stats.count_drop(DropReason::NoUnderlay);
                        continue;
                    };
                    let frame = &mut self.buf[VNET_HDR_LEN..n];
                    // Picks the send socket, so the outer source port (see `steer_key`).
                    let key = underlay::steer_key(frame);
                    let (prefix, partial) = pipeline::encap_for(tables, peer, &vnet, frame);
                    let ends = (u.source_for(key), SocketAddr::new(peer.underlay, u.port));
                    if vnet.is_gso() {
                        // Keep the flow's order: what is batched goes first.
                        self.small.flush(u, &self.underlay_stats);
                        if let Some(c) = cap {
                            c.overlay_inner(false, frame);
                        }
                        let csum = if partial {
                            segment::Csum::Partial
                        } else {
                            segment::Csum::Full
                        };
                        let segs =
                            match segment::segment_ipv4(frame, &vnet, &prefix, csum, &mut self.seg)
                            {
                                Ok(s) => s,
                                Err(_) => {
                                    stats.count_drop(DropReason::Malformed);
                                    continue;
                                }
                            };
                        let d = &self.seg[..segs.total];
                        if let Some(c) = cap {
                            c.overlay_sent(ends.0, ends.1, d, Some(segs.stride));
                        }
                        match u.send(key, d, Some(segs.stride), peer.underlay) {
                            Ok(k) => self.underlay_stats.tx_n(k, d.len()),
                            Err(_) => stats.count_drop(DropReason::TxError),
                        }
                    } else {
                        // A checksum the peer finishes (RCO) stays partial.
                        if !partial && virtio::finish_checksum(&vnet, frame).is_err() {
                            stats.count_drop(DropReason::Malformed);
                            continue;
                        }
                        // The VXLAN header goes where the virtio-net header ends.
                        self.buf[DGRAM_AT..VNET_HDR_LEN].copy_from_slice(&prefix);
                        let d = &self.buf[DGRAM_AT..n];
                        if let Some(c) = cap {
                            c.overlay_inner(false, &d[vxlan::HEADER_LEN..]);
                            c.overlay_sent(ends.0, ends.1, d, None);
                        }
                        self.small
                            .push(u, &self.underlay_stats, key, peer.underlay, d);
                    }
                }
                Action::Reply(len) => {
                    // Our own frames are complete: no checksum or segmentation left to do.
                    self.buf[..VNET_HDR_LEN].fill(0);
                    let end = (VNET_HDR_LEN + len).min(self.buf.len());
                    match port.tx().send(&self.buf[..end]) {
                        Ok(_) => stats.tx(end - VNET_HDR_LEN),
                        Err(_) => stats.count_drop(DropReason::TxError),
                    }
                }
                Action::Dns => {
                    let Some(dns) = tables.dns.as_ref() else {
                        stats.count_drop(DropReason::NoRoute);
                        continue;
                    };
                    let frame = &self.buf[VNET_HDR_LEN..n];
                    let Some((client, server, q)) = dns_query(frame) else {
                        stats.count_drop(DropReason::Malformed);
                        continue;
                    };
                    match crate::dns::answer(&dns.table, q, &mut self.dns_out) {
                        crate::dns::Answer::Local(len) => {
                            let mac = tables
                                .port(id)
                                .or(tables.host.as_ref().filter(|h| h.id == id))
                                .map(|p| p.mac);
                            let Some(mac) = mac else { continue };
                            self.seg[..VNET_HDR_LEN].fill(0);
                            let built = pipeline::udp_frame(
                                tables,
                                mac,
                                (server, 53),
                                client,
                                &self.dns_out[..len],
                                &mut self.seg[VNET_HDR_LEN..],
                            );
                            if let Some(flen) = built {
                                if let Some(c) = cap {
                                    c.port(id, false, &self.seg[VNET_HDR_LEN..VNET_HDR_LEN + flen]);
                                }
                                match port.tx().send(&self.seg[..VNET_HDR_LEN + flen]) {
                                    Ok(_) => stats.tx(flen),
                                    Err(_) => stats.count_drop(DropReason::TxError),
                                }
                            }
                        }
                        crate::dns::Answer::Forward => {
                            let (Some(fw), Some((tx, waker))) = (&self.forwarder, &self.to_self)
                            else {
                                stats.count_drop(DropReason::NoRoute);
                                continue;
                            };
                            let (tx, waker) = (tx.clone(), waker.clone());
                            fw.submit(q.to_vec(), crate::dns::Transport::Udp, move |reply| {
                                let _ = tx.send(Command::DnsReply {
                                    port: id,
                                    client,
                                    server,
                                    reply,
                                });
                                let _ = waker.wake();
                            });
                        }
                        crate::dns::Answer::Invalid => stats.count_drop(DropReason::Malformed),
                    }
                }
                Action::Drop(reason) => stats.count_drop(reason),
            }
        }
        false
    }
}

/// The client, the server address and the DNS message of a UDP query frame.
fn dns_query(frame: &[u8]) -> Option<((std::net::Ipv4Addr, u16), std::net::Ipv4Addr, &[u8])> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    let udp = crate::wire::UdpPacket::new_checked(ip.payload()).ok()?;
    let at = crate::wire::ETHERNET_HEADER_LEN + ip.header_len() as usize;
    let start = at + crate::wire::UdpPacket::<&[u8]>::HEADER_LEN;
    let end = at + udp.len() as usize;
    let q = frame.get(start..end)?;
    Some(((ip.src_addr(), udp.src_port()), ip.dst_addr(), q))
}

impl Worker {
    /// Receives up to a few batches of VXLAN messages; true when the socket is drained.
    fn service_underlay(
        &mut self,
        tables: &Tables,
        now: u64,
        cap: Option<&crate::capture::TapSet>,
    ) -> bool {
        let Some(u) = &self.underlay else {
            return true;
        };
        let stats = &self.underlay_stats;
        let ports = &self.ports;
        let gro = &mut self.gro;
        let ct = &mut self.ct;
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
            let mut emit = |b: &[u8], o: gro::Out<'_>| {
                let Some(dst) = ports.get(&o.port) else {
                    stats.count_drop(DropReason::PortGone);
                    return;
                };
                if let Some(c) = cap {
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
                    Err(_) => stats.count_drop(DropReason::TxError),
                }
            };
            for (i, m) in meta.iter().enumerate().take(n) {
                self.frames += 1;
                self.bulk |= m.len > BULK;
                let base = i * RX_BUF_LEN;
                let msg = base..base + m.len.min(RX_BUF_LEN);
                let stride = if m.stride == 0 { m.len } else { m.stride };
                let mut off = msg.start;
                while off < msg.end {
                    let end = (off + stride).min(msg.end);
                    let d = off..end;
                    off = end;
                    stats.rx(d.len());
                    if let Some(c) = cap {
                        c.overlay_outer(true, m.addr, u.local_addr(), &self.rbuf[d.clone()]);
                    }
                    let (peer, rco) =
                        match pipeline::decap(tables, m.addr.ip(), &self.rbuf[d.clone()]) {
                            Ok(p) => p,
                            Err(reason) => {
                                stats.count_drop(reason);
                                continue;
                            }
                        };
                    let inner = d.start + vxlan::HEADER_LEN..d.end;
                    let nat = cap.and_then(|c| {
                        c.overlay_inner(true, &self.rbuf[inner.clone()]);
                        c.nat_snap(&self.rbuf[inner.clone()])
                    });
                    let mut cx = Ctx {
                        t: tables,
                        ct,
                        now_ms: now,
                        trace: None,
                    };
                    let action = pipeline::handle_underlay(
                        &mut cx,
                        peer,
                        &mut self.rbuf[inner.clone()],
                        rco,
                    );
                    if let (Some(c), Some(s), Action::ToPort(_)) = (cap, &nat, action) {
                        c.nat(s, &self.rbuf[inner.clone()]);
                    }
                    match action {
                        Action::ToPort(out) => {
                            let uso = ports.get(&out).is_some_and(|p| p.tx().uso());
                            gro.push(&mut self.rbuf, out, uso, inner, rco, &mut emit)
                        }
                        Action::Drop(reason) => stats.count_drop(reason),
                        // Frames from peers are only ever routed to local pods.
                        Action::ToPeer(_) | Action::Reply(_) | Action::Dns => {
                            stats.count_drop(DropReason::NoRoute)
                        }
                    }
                }
                gro.flush(&mut self.rbuf, &mut emit);
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

#[cfg(test)]
mod tests {
    use super::{cpu_list, cpu_pins};

    #[test]
    fn pinning_takes_allowed_cpus_and_names_the_field_for_others() {
        assert!(cpu_pins(&[]).unwrap().is_empty());
        let allowed = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
        let first = (0..nix::sched::CpuSet::count())
            .find(|&c| allowed.is_set(c).unwrap_or(false))
            .unwrap();
        let pins = cpu_pins(&[first as u32, first as u32]).unwrap();
        assert_eq!(pins.len(), 2);
        assert_eq!(pins[1].cpu, first);
        assert!(pins[0].set.is_set(first).unwrap());
        let e = cpu_pins(&[first as u32, 1023]).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        assert!(e.to_string().starts_with("datapath.cpus: CPU 1023"), "{e}");
        assert!(cpu_pins(&[100_000]).is_err());
    }

    #[test]
    fn cpu_lists_collapse_runs() {
        assert_eq!(cpu_list(&[]), "");
        assert_eq!(cpu_list(&[0]), "0");
        assert_eq!(cpu_list(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
    }
}
