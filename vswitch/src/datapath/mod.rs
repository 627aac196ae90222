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
//! TAP as one unit and the kernel never segments it. Replies the switch makes itself (ARP, ICMP,
//! DNS) get an all-zero header: complete checksums, no GSO.
//!
//! This module is the control plane's handle on the workers; [`worker`] is one worker's loop,
//! and [`busy`] its policy for spinning, napping and sleeping when idle.

mod busy;
pub mod gro;
pub mod memory;
pub mod netns;
pub mod segment;
pub mod stats;
pub mod tap;
pub mod underlay;
mod worker;

use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;

use arc_swap::ArcSwap;
use crossbeam_channel::Sender;
use mio::{Poll, Token, Waker};

use crate::pipeline::nat::CtEntry;
use crate::pipeline::{Conntrack, CtConfig, DnsQuery, PortId, Tables};
use busy::BusyPoll;
use stats::PortStats;
use tap::Tap;
use underlay::Underlay;
use worker::Worker;

const WAKER: Token = Token(usize::MAX);
const UNDERLAY: Token = Token(usize::MAX - 1);

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
    /// From now on, hand packets for egress translation to this engine (or to none).
    SetEgress(Option<crate::egress::EgressTx>),
    /// An upstream's answer to a forwarded query from the pod on `port`.
    DnsReply {
        port: PortId,
        query: DnsQuery,
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
    /// The egress translation engine, when on: it writes replies to the pods' TAPs too, so
    /// it hears of every port.
    egress: Option<crate::egress::Egress>,
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
            let pin = (!pins.is_empty()).then(|| pins[index % pins.len()]);
            let underlay = underlays.next();
            if let (0, Some(u)) = (index, &underlay) {
                tracing::info!(
                    "underlay: UDP GRO {}, source ports {:?}",
                    if u.gro() { "on" } else { "off" },
                    u.source_ports()
                );
            }
            let worker = Worker::new(worker::Setup {
                index,
                poll,
                commands: rx,
                to_self: (tx.clone(), waker.clone()),
                tables: tables.clone(),
                ct,
                epoch,
                capture: capture.clone(),
                busy: BusyPoll::new(busy_poll, pin.is_some()),
                underlay,
                underlay_stats: underlay_stats.clone(),
            })?;
            let (ct_stats, frames) = worker.gauges();
            handles.push(Handle {
                tx,
                waker,
                thread: Some(spawn(index, worker, pin)?),
                ct_stats,
                frames,
            });
        }
        tracing::info!("datapath: {n} worker(s)");
        Ok(Datapath {
            epoch,
            egress: None,
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
        if let Some(e) = &self.egress {
            e.add_port(id, queues.clone());
        }
        self.broadcast(|| Command::AddPort {
            id,
            queues: queues.clone(),
            stats: stats.clone(),
        });
    }

    /// Removes a port and waits until every worker has let go of it, so its TAP device is
    /// closed (and deleted) when this returns.
    pub fn remove_port(&self, id: PortId) {
        if let Some(e) = &self.egress {
            e.remove_port(id);
        }
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

    /// Starts egress translation: the workers hand it the packets the pipeline sends there.
    /// Ports added before are not known to it, so call this before the first `add_port`.
    pub fn set_egress(&mut self, e: crate::egress::Egress) {
        let tx = e.sender();
        self.broadcast(|| Command::SetEgress(Some(tx.clone())));
        self.egress = Some(e);
    }

    /// The egress engine, when egress translation is on.
    pub fn egress(&self) -> Option<&crate::egress::Egress> {
        self.egress.as_ref()
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
        self.broadcast(|| Command::SetEgress(None));
        if let Some(mut e) = self.egress.take() {
            e.shutdown();
        }
        self.broadcast(|| Command::Shutdown);
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// Runs the worker on a thread of its own, pinned to `pin`'s CPU if given.
fn spawn(index: usize, mut worker: Worker, pin: Option<CpuPin>) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("vswitch-dp{index}"))
        .spawn(move || {
            if let Some(CpuPin { cpu, set }) = pin {
                match nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set) {
                    Ok(()) => tracing::info!("datapath worker {index} pinned to CPU {cpu}"),
                    Err(e) => {
                        // Not on a core of its own after all: spin like an unpinned one.
                        worker.busy.pinned = false;
                        tracing::error!("datapath worker {index}: pinning to CPU {cpu} failed: {e}")
                    }
                }
            }
            worker.run()
        })
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.shutdown();
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

/// The connection tracking table's size and counters, published by the worker for metrics.
#[derive(Debug, Default)]
pub struct CtGauge {
    pub entries: std::sync::atomic::AtomicU64,
    pub created: std::sync::atomic::AtomicU64,
    pub expired: std::sync::atomic::AtomicU64,
    pub evicted: std::sync::atomic::AtomicU64,
    pub flushed: std::sync::atomic::AtomicU64,
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
