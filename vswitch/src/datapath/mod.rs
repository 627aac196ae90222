//! The datapath: worker threads that move frames between ports.
//!
//! A worker owns its ports' TAP handles and a mio poll. It reads ready ports in bounded batches
//! (so one busy pod cannot starve the others), loads the table snapshot once per batch, asks the
//! pure [`pipeline`](crate::pipeline) what to do with each frame, and does it. Nothing on this
//! path blocks, locks or allocates: the frame buffer is the worker's own, counters are relaxed
//! atomics with a single writer, and the control plane reaches the worker only through a
//! command channel plus a waker.
//!
//! Frames carry the 10-byte virtio-net header in front. When a frame is switched unchanged the
//! header goes with it, so a 64 KiB TSO super-frame from one pod is handed to the other pod's
//! TAP as one unit and the kernel never segments it. Replies the switch makes itself (ARP, ICMP)
//! get an all-zero header: complete checksums, no GSO.

pub mod netns;
pub mod stats;
pub mod tap;

use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;

use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, Sender};
use hashbrown::HashMap;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::pipeline::{self, Action, DropReason, PortId, Tables};
use stats::PortStats;
use tap::{Tap, VNET_HDR_LEN};

const WAKER: Token = Token(usize::MAX);
/// Frames read from one port before the worker looks at the others.
const BATCH: usize = 64;
/// A TSO super-frame is at most 64 KiB of IP packet plus Ethernet and virtio-net headers.
const BUF_LEN: usize = VNET_HDR_LEN + 14 + 65_535 + 64;

pub enum Command {
    AddPort {
        id: PortId,
        tap: Tap,
        stats: Arc<PortStats>,
    },
    /// Closes the port's TAP (deleting the device) and acknowledges on `done`.
    RemovePort { id: PortId, done: Sender<()> },
    Shutdown,
}

/// Handle to the running worker.
pub struct Datapath {
    tx: Sender<Command>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl Datapath {
    pub fn start(tables: Arc<ArcSwap<Tables>>) -> io::Result<Datapath> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, rx) = crossbeam_channel::unbounded();
        let thread = std::thread::Builder::new()
            .name("vswitch-dp0".into())
            .spawn(move || Worker::new(poll, rx, tables).run())?;
        Ok(Datapath {
            tx,
            waker,
            thread: Some(thread),
        })
    }

    fn send(&self, cmd: Command) {
        // The worker only goes away at shutdown; a send after that has nobody to tell.
        if self.tx.send(cmd).is_ok() {
            let _ = self.waker.wake();
        }
    }

    pub fn add_port(&self, id: PortId, tap: Tap, stats: Arc<PortStats>) {
        self.send(Command::AddPort { id, tap, stats });
    }

    /// Removes a port and waits until its TAP device is closed.
    pub fn remove_port(&self, id: PortId) {
        let (done, wait) = crossbeam_channel::bounded(1);
        self.send(Command::RemovePort { id, done });
        let _ = wait.recv_timeout(std::time::Duration::from_secs(5));
    }

    pub fn shutdown(&mut self) {
        self.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Port {
    tap: Tap,
    stats: Arc<PortStats>,
    /// In `Worker::ready`: may still have frames queued (mio is edge-triggered).
    queued: bool,
}

struct Worker {
    poll: Poll,
    rx: Receiver<Command>,
    tables: Arc<ArcSwap<Tables>>,
    ports: HashMap<PortId, Port, foldhash::fast::RandomState>,
    ready: Vec<PortId>,
    buf: Box<[u8]>,
}

impl Worker {
    fn new(poll: Poll, rx: Receiver<Command>, tables: Arc<ArcSwap<Tables>>) -> Worker {
        Worker {
            poll,
            rx,
            tables,
            ports: HashMap::default(),
            ready: Vec::new(),
            buf: vec![0u8; BUF_LEN].into_boxed_slice(),
        }
    }

    fn run(mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            let timeout = if self.ready.is_empty() {
                None
            } else {
                Some(std::time::Duration::ZERO)
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
            self.service_ready();
        }
    }

    /// Applies control commands; false on shutdown.
    fn commands(&mut self) -> bool {
        while let Ok(cmd) = self.rx.try_recv() {
            match cmd {
                Command::AddPort { id, tap, stats } => {
                    let fd = std::os::fd::AsRawFd::as_raw_fd(&tap);
                    if let Err(e) = self.poll.registry().register(
                        &mut SourceFd(&fd),
                        Token(id as usize),
                        Interest::READABLE,
                    ) {
                        tracing::error!("cannot watch port {id} ({}): {e}", tap.name());
                        continue;
                    }
                    // A frame may already be waiting: look once without waiting for an edge.
                    self.ready.push(id);
                    self.ports.insert(
                        id,
                        Port {
                            tap,
                            stats,
                            queued: true,
                        },
                    );
                }
                Command::RemovePort { id, done } => {
                    if let Some(p) = self.ports.remove(&id) {
                        let fd = std::os::fd::AsRawFd::as_raw_fd(&p.tap);
                        let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
                    }
                    self.ready.retain(|p| *p != id);
                    let _ = done.send(());
                }
                Command::Shutdown => return false,
            }
        }
        true
    }

    fn service_ready(&mut self) {
        let tables = self.tables.load();
        let mut i = 0;
        while i < self.ready.len() {
            let id = self.ready[i];
            let drained = self.service_port(&tables, id);
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
    fn service_port(&mut self, tables: &Tables, id: PortId) -> bool {
        for _ in 0..BATCH {
            let Some(port) = self.ports.get(&id) else {
                return true;
            };
            let n = match port.tap.recv(&mut self.buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("port {id} ({}): read failed: {e}", port.tap.name());
                    return true;
                }
            };
            let stats = &port.stats;
            stats.rx(n.saturating_sub(VNET_HDR_LEN));
            if n <= VNET_HDR_LEN {
                stats.count_drop(DropReason::Malformed);
                continue;
            }
            let frame = &mut self.buf[VNET_HDR_LEN..n];
            match pipeline::handle(tables, id, frame) {
                Action::ToPort(out) => match self.ports.get(&out) {
                    Some(dst) => match dst.tap.send(&self.buf[..n]) {
                        Ok(_) => dst.stats.tx(n - VNET_HDR_LEN),
                        Err(_) => stats.count_drop(DropReason::TxError),
                    },
                    None => stats.count_drop(DropReason::PortGone),
                },
                Action::Reply => {
                    // Our own frames are complete: no checksum or segmentation left to do.
                    self.buf[..VNET_HDR_LEN].fill(0);
                    match port.tap.send(&self.buf[..n]) {
                        Ok(_) => stats.tx(n - VNET_HDR_LEN),
                        Err(_) => stats.count_drop(DropReason::TxError),
                    }
                }
                Action::Drop(reason) => stats.count_drop(reason),
            }
        }
        false
    }
}
