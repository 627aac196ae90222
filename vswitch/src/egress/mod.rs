//! Egress translation: pods reach the world outside the cluster from the node's own address,
//! with no iptables or nftables rule and no kernel NAT.
//!
//! The pipeline decides ([`Action::ToEgress`](crate::pipeline::Action::ToEgress)) that a pod's
//! packet leaves the cluster; the worker copies the IP packet into a bounded queue to this
//! engine and goes on (a full queue drops it, counted as `egress_queue_full`). The engine runs
//! on a thread of its own with a mio poll, never in a worker's loop. It ends the pod's flow
//! here and opens the same one from an ordinary socket in the node's namespace, as passt/pasta,
//! slirp4netns and Tailscale's userspace networking do, so the outside sees (and answers) the
//! node and the kernel's routing and source address choice apply:
//! - TCP ends in smoltcp (one `Interface` in "any IP" mode: it answers for every outside address
//!   a pod connects to). A pod's SYN first opens a nonblocking connection from the node; only
//!   when that succeeds does smoltcp take the SYN and answer it, so a refused connection is a
//!   RST to the pod and a slow outside host stalls the pod's handshake, not its data. Bytes are
//!   copied between the smoltcp socket and the node's socket through their bounded buffers
//!   (`TCP_BUF` each way): the engine reads from one side only while the other has room, so a
//!   peer that stops reading closes the window of the other, and memory per connection stays
//!   bounded. FIN is passed on as a half-close (`shutdown(SHUT_WR)` / smoltcp `close`), a RST as
//!   a RST (`SO_LINGER` 0 / smoltcp `abort`).
//!   Path MTU discovery for TCP is the node's socket's own business: the kernel does it for
//!   the node's connection (and smoltcp's segments to the pod fit the pods' MTU), so the pod
//!   never needs a "fragmentation needed". An established connection whose outside host
//!   becomes unreachable fails when the kernel gives up retransmitting (ETIMEDOUT, or the
//!   EHOSTUNREACH the routers said meanwhile): the socket reports an error (EPOLLERR, looked
//!   at even when neither direction has anything to move) and the pod gets a RST, as for the
//!   outside's own RST.
//! - UDP: one connected socket per (pod address, pod port, destination), closed after
//!   `UDP_IDLE` without traffic; answers become datagrams from the destination to the pod.
//! - ICMP echo: one unprivileged ICMP datagram socket per (pod, identifier, destination); the
//!   kernel picks the identifier on the wire and the reply gets the pod's back. This needs
//!   `net.ipv4.ping_group_range` to include vswitchd's group (`vswitch-install sysctls` sets
//!   it); without it pings are dropped, counted as `icmp_socket_failed`.
//!
//! ICMP errors reach the pod as the same errors about its own packets:
//! - A TCP connection the node cannot open because the host or network is unreachable is an
//!   ICMP unreachable (code 1 or 0) from the destination about the pod's SYN.
//! - UDP and echo sockets have IP_RECVERR on, so every ICMP error the outside sends about a
//!   flow (destination unreachable of any code, fragmentation needed, time exceeded) lands in
//!   the socket's error queue with its type, code, sender and (fragmentation needed) next-hop
//!   MTU; an error event (EPOLLERR) has the engine read the queue. The pod gets the same type
//!   and code, quoting the pod's own header (pod address and port, or echo identifier, to the
//!   destination) so its stack matches it to its socket, from the router that sent it, or from
//!   the destination for "port unreachable" (the host that has the port closed). A
//!   fragmentation needed carries the router's MTU, so the pod learns the path's MTU.
//! - The node's socket mirrors the pod's DF bit: a pod's datagram with DF is sent with DF and
//!   never fragmented (IP_PMTUDISC_DO), so one larger than the path MTU the node knows (its
//!   link's, or learned from a router) fails with EMSGSIZE, and the pod gets a fragmentation
//!   needed with that MTU (IP_MTU) from the destination, quoting the datagram; one without DF
//!   is sent without (IP_PMTUDISC_DONT) and the kernel fragments it as needed, as a router
//!   would. (Always DO would refuse a pod's large datagram without DF; the kernel's default,
//!   WANT, would set DF on it and pass frag-needed errors to a pod that did not ask.) The
//!   option is set when a flow opens and again only when a pod's DF changes.
//! - The node's socket sends with the pod's TTL (IP_TTL), less the switch's own hop (the
//!   pipeline answers a TTL that runs out there with "time exceeded" from the gateway): so
//!   `traceroute` (UDP) or `ping -t` from a pod sees the switch, then the routers beyond the
//!   node, then the destination, as through a kernel router. TCP is terminated at the node, so
//!   a TCP traceroute sees the switch, then the destination.
//! - Counted by kind: `unreachable`, `frag_needed`, `time_exceeded`.
//!
//! Limits: `egress.max_connections_per_pod` and `egress.max_connections` count every flow
//! (TCP, UDP, echo); a flow over a limit is refused (TCP RST, others dropped) and counted.
//! Everything of a pod is freed when its port goes (CNI DEL), and flows expire when idle.
//!
//! Packets to the pods (smoltcp's, and the UDP and echo replies built in [`packet`]) are
//! written straight to the pod's TAP (its first queue) with an all-zero virtio-net header.
//!
//! Capture sees both sides (`vswitchctl capture --point egress`): `egress:pod` is the pods'
//! packets as the engine takes them from its queue and the packets it writes to them (also
//! offered as the pod port's outbound frames); `egress:node` is what the node's sockets send
//! and receive, synthesised as IPv4 packets from the socket's address (getsockname, looked up
//! once per flow and only when a session wants the point) to the outside address. TCP there is
//! the stream bytes as the socket moved them (one segment per write or read, with SYN, FIN and
//! RST markers), not the wire's segmentation. With no session the engine loads one atomic per
//! packet or pump and builds nothing.

pub mod packet;

use std::collections::VecDeque;
use std::io::{self, IoSliceMut, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use hashbrown::HashMap;
use mio::net::{TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token, Waker};
use nix::errno::Errno;
use nix::sys::socket::{getsockopt, recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags};
use smoltcp::iface::{Config as IfConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Checksum, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpListenEndpoint};

use conf::api::EgressConnInfo;

use crate::capture::{NodeL4, TapSet};
use crate::datapath::tap::{Tap, VNET_HDR_LEN};
use crate::pipeline::{DropReason, PortId, Tables};
use crate::wire::icmpv4::code;
use crate::wire::{
    EtherType, EthernetFrame, EthernetRepr, Icmpv4Message, TcpFlags, ETHERNET_HEADER_LEN,
};
use packet::{FlowKey, IcmpError, Kind};

/// Each direction's buffer of one TCP connection (smoltcp's; the node's socket has the
/// kernel's own). 256 KiB lets the window cover the pod's bursts: one stream to the outside
/// host moved 5.5 Gbit/s with 64 KiB and 7.9 with 256 KiB (`vswitch-lab bench`, 2026-12-07).
/// The buffers are zeroed allocations the size of the kernel's mmap threshold and more, so
/// their pages become resident only as data passes through them: an idle or light connection
/// costs a few KiB, a busy one up to twice this.
const TCP_BUF: usize = 256 * 1024;
/// Packets waiting for the engine, at most.
const QUEUE: usize = 1024;
/// A UDP flow or echo without traffic this long is closed.
const UDP_IDLE: Duration = Duration::from_secs(30);
/// An outside host that neither accepts nor refuses a connection this long: RST to the pod.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// The engine's own address: smoltcp needs one, and its default route through it is what
/// lets it answer for every outside address ("any IP").
const OWN: Ipv4Addr = Ipv4Addr::new(169, 254, 77, 1);

const WAKER: Token = Token(0);

/// The engine's settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub per_pod: u32,
    pub total: u32,
    /// The pods' MTU: smoltcp's segments to them fit it.
    pub mtu: u32,
}

/// Counters, for metrics and `vswitchctl egress`.
#[derive(Debug, Default)]
pub struct EgressStats {
    pub tcp_opened: AtomicU64,
    pub tcp_refused: AtomicU64,
    pub udp_flows: AtomicU64,
    pub echo_flows: AtomicU64,
    pub limit_pod: AtomicU64,
    pub limit_node: AtomicU64,
    pub malformed: AtomicU64,
    pub icmp_socket_failed: AtomicU64,
    pub tx_error: AtomicU64,
    pub bytes_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub expired: AtomicU64,
    /// ICMP destination unreachables passed to pods (port closed, host or network unreachable,
    /// administratively prohibited...; not fragmentation needed).
    pub unreachable: AtomicU64,
    /// ICMP fragmentation needed passed to pods: a router's, or the node's own when its socket
    /// refused a pod's DF datagram larger than the path MTU.
    pub frag_needed: AtomicU64,
    /// ICMP time exceeded passed to pods.
    pub time_exceeded: AtomicU64,
    /// Flows open now (a gauge).
    pub active: AtomicU64,
}

impl EgressStats {
    /// Every counter by name.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("tcp_opened", self.tcp_opened.load(Relaxed)),
            ("tcp_refused", self.tcp_refused.load(Relaxed)),
            ("udp_flows", self.udp_flows.load(Relaxed)),
            ("echo_flows", self.echo_flows.load(Relaxed)),
            ("limit_pod", self.limit_pod.load(Relaxed)),
            ("limit_node", self.limit_node.load(Relaxed)),
            ("malformed", self.malformed.load(Relaxed)),
            ("icmp_socket_failed", self.icmp_socket_failed.load(Relaxed)),
            ("tx_error", self.tx_error.load(Relaxed)),
            ("bytes_out", self.bytes_out.load(Relaxed)),
            ("bytes_in", self.bytes_in.load(Relaxed)),
            ("expired", self.expired.load(Relaxed)),
            ("unreachable", self.unreachable.load(Relaxed)),
            ("frag_needed", self.frag_needed.load(Relaxed)),
            ("time_exceeded", self.time_exceeded.load(Relaxed)),
        ]
    }

    /// Flows open now.
    pub fn active(&self) -> u64 {
        self.active.load(Relaxed)
    }
}

/// A pod's packet for the engine.
pub struct Packet {
    pub port: PortId,
    /// The UDP payload size of a UDP super-frame (USO); 0 otherwise.
    pub gso_size: u16,
    /// The IPv4 packet.
    pub data: Vec<u8>,
}

enum Command {
    AddPort(PortId, Arc<[Tap]>),
    /// Answered once the engine has let go of the port's queues.
    RemovePort(PortId, Sender<()>),
    Dump(Sender<Vec<EgressConnInfo>>),
    Shutdown,
}

/// The workers' end: a bounded queue of packets, with buffers handed back for reuse so the
/// hand-off does not allocate once warm.
#[derive(Clone)]
pub struct EgressTx {
    tx: Sender<Packet>,
    free: Receiver<Vec<u8>>,
    waker: Arc<Waker>,
}

impl EgressTx {
    /// Queues the IP packet `ip` from `port`; the engine is woken by [`EgressTx::wake`].
    pub fn submit(&self, port: PortId, gso_size: u16, ip: &[u8]) -> Result<(), DropReason> {
        let mut data = self.free.try_recv().unwrap_or_default();
        data.clear();
        data.extend_from_slice(ip);
        match self.tx.try_send(Packet {
            port,
            gso_size,
            data,
        }) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                Err(DropReason::EgressBusy)
            }
        }
    }

    /// Wakes the engine (once per batch of submissions).
    pub fn wake(&self) {
        let _ = self.waker.wake();
    }
}

/// The control plane's handle on the engine thread.
pub struct Egress {
    tx: EgressTx,
    cmds: Sender<Command>,
    thread: Option<JoinHandle<()>>,
    pub stats: Arc<EgressStats>,
}

impl Egress {
    /// Starts the engine; what it sends to pods is offered to `capture`'s sessions as the
    /// pods' outbound frames (what they send it was offered by the workers).
    pub fn start(
        tables: Arc<ArcSwap<Tables>>,
        limits: Limits,
        capture: Arc<crate::capture::Hub>,
    ) -> io::Result<Egress> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, rx) = crossbeam_channel::bounded(QUEUE);
        let (free_tx, free_rx) = crossbeam_channel::bounded(QUEUE);
        let (cmds, cmd_rx) = crossbeam_channel::unbounded();
        let stats = Arc::new(EgressStats::default());
        let engine = Engine::new(
            poll,
            (rx, cmd_rx, free_tx),
            (tables, capture),
            limits,
            stats.clone(),
        );
        let thread = std::thread::Builder::new()
            .name("vswitch-egress".into())
            .spawn(move || engine.run())?;
        tracing::info!(
            "egress translation on: at most {} connections, {} per pod",
            limits.total,
            limits.per_pod
        );
        Ok(Egress {
            tx: EgressTx {
                tx,
                free: free_rx,
                waker,
            },
            cmds,
            thread: Some(thread),
            stats,
        })
    }

    pub fn sender(&self) -> EgressTx {
        self.tx.clone()
    }

    fn send(&self, c: Command) {
        if self.cmds.send(c).is_ok() {
            self.tx.wake();
        }
    }

    pub fn add_port(&self, id: PortId, queues: Arc<[Tap]>) {
        self.send(Command::AddPort(id, queues));
    }

    /// Forgets the pod's port and closes every flow it had; returns once the engine holds
    /// none of the port's queues (the TAP is gone when its last holder lets go, and a DEL must
    /// not return before), or after 5 s.
    pub fn remove_port(&self, id: PortId) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.send(Command::RemovePort(id, tx));
        let _ = rx.recv_timeout(Duration::from_secs(5));
    }

    /// The translated flows as they are now.
    pub fn connections(&self) -> Vec<EgressConnInfo> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.send(Command::Dump(tx));
        rx.recv_timeout(Duration::from_secs(2)).unwrap_or_default()
    }

    pub fn shutdown(&mut self) {
        self.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Egress {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Where the engine's packets to pods go: the pods' TAPs, found by destination address.
struct ToPods {
    tables: Arc<ArcSwap<Tables>>,
    capture: Arc<crate::capture::Hub>,
    ports: HashMap<PortId, Arc<[Tap]>>,
    /// virtio-net header + Ethernet header + the packet.
    buf: Vec<u8>,
    stats: Arc<EgressStats>,
}

const IP_AT: usize = VNET_HDR_LEN + ETHERNET_HEADER_LEN;

impl ToPods {
    /// Sends the IPv4 packet at `buf[IP_AT..IP_AT + len]` to the pod it is addressed to.
    fn send(&mut self, len: usize) {
        let Some(ip) = self.buf.get(IP_AT..IP_AT + len) else {
            return;
        };
        let Some(dst) = ip.get(16..20) else { return };
        let dst = Ipv4Addr::new(dst[0], dst[1], dst[2], dst[3]);
        let tables = self.tables.load();
        let Some(port) = tables.port_by_ip(dst) else {
            return;
        };
        let Some(tap) = self.ports.get(&port.id).and_then(|q| q.first()) else {
            return;
        };
        self.buf[..VNET_HDR_LEN].fill(0);
        EthernetRepr {
            src_addr: tables.gateway_mac,
            dst_addr: port.mac,
            ethertype: EtherType::IPV4,
        }
        .emit(&mut EthernetFrame::new_unchecked(
            &mut self.buf[VNET_HDR_LEN..IP_AT],
        ));
        if let Some(c) = self.capture.current() {
            let frame = &self.buf[VNET_HDR_LEN..IP_AT + len];
            c.port(port.id, false, frame);
            c.egress_pod(false, frame);
        }
        if tap.send(&self.buf[..IP_AT + len]).is_err() {
            self.stats.tx_error.fetch_add(1, Relaxed);
        }
    }

    /// Room for one packet to a pod.
    fn packet_buf(&mut self) -> &mut [u8] {
        &mut self.buf[IP_AT..]
    }
}

/// smoltcp's device: pods' packets in (queued by the engine), its packets out to the pods.
struct Link {
    rx: VecDeque<Vec<u8>>,
    out: ToPods,
    free: Sender<Vec<u8>>,
    mtu: usize,
}

struct RxTok<'a> {
    data: Vec<u8>,
    free: &'a Sender<Vec<u8>>,
}

impl smoltcp::phy::RxToken for RxTok<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let r = f(&self.data);
        let _ = self.free.try_send(self.data);
        r
    }
}

struct TxTok<'a>(&'a mut ToPods);

impl smoltcp::phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let buf = self.0.packet_buf();
        let len = len.min(buf.len());
        let r = f(&mut buf[..len]);
        self.0.send(len);
        r
    }
}

impl Device for Link {
    type RxToken<'a> = RxTok<'a>;
    type TxToken<'a> = TxTok<'a>;

    fn receive(
        &mut self,
        _: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let data = self.rx.pop_front()?;
        Some((
            RxTok {
                data,
                free: &self.free,
            },
            TxTok(&mut self.out),
        ))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        Some(TxTok(&mut self.out))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        // Pods' TCP checksums are often left to offload (partial): they come from the pod's
        // own kernel through its TAP, so they are not checked here. smoltcp's own are.
        let mut csum = ChecksumCapabilities::default();
        csum.tcp = Checksum::Tx;
        caps.checksum = csum;
        caps
    }
}

/// One translated TCP connection.
struct TcpConn {
    port: PortId,
    host: TcpStream,
    token: Token,
    /// The pod's SYN while the node's connection is being opened; `None` once smoltcp has it.
    syn: Option<Vec<u8>>,
    handle: Option<SocketHandle>,
    readable: bool,
    writable: bool,
    established: bool,
    /// The pod's FIN was passed on (shutdown(SHUT_WR)).
    pod_fin: bool,
    /// The outside host's FIN was passed on (smoltcp close).
    host_eof: bool,
    /// The node's socket reported an error (EPOLLERR) not yet looked at.
    errored: bool,
    /// The node's connection failed or the outside reset it (a RST it sent, for capture).
    host_reset: bool,
    /// The node's socket's address, once a capture wanted it.
    node: Option<SocketAddrV4>,
    bytes_out: u64,
    bytes_in: u64,
    started: Instant,
}

impl TcpConn {
    /// The next sequence number each way as `egress:node` numbers the stream (byte 0 is the
    /// SYN's, a FIN takes one): (node to outside, outside to node).
    fn node_seq(&self) -> (u32, u32) {
        (
            1u32.wrapping_add(self.bytes_out as u32)
                .wrapping_add(u32::from(self.pod_fin)),
            1u32.wrapping_add(self.bytes_in as u32)
                .wrapping_add(u32::from(self.host_eof)),
        )
    }
}

/// A TCP connection's node side as `egress:node` shows it.
struct TcpTap<'a> {
    tap: &'a TapSet,
    node: SocketAddrV4,
    remote: SocketAddrV4,
}

impl TcpTap<'_> {
    /// A made-up segment: from the node when not `inbound`.
    fn segment(&self, inbound: bool, (seq, ack): (u32, u32), flags: TcpFlags, payload: &[u8]) {
        let l4 = NodeL4::Tcp {
            seq,
            ack,
            flags,
            payload,
        };
        self.tap.egress_node(inbound, self.node, self.remote, l4);
    }
}

/// The capture sessions now, if one takes `egress:node`.
fn node_tap(hub: &crate::capture::Hub) -> Option<Arc<TapSet>> {
    hub.current().filter(|t| t.wants_egress_node())
}

impl TcpConn {
    /// This connection's node side for `tap` (`egress:node`), once its address is known.
    fn tap<'a>(&mut self, tap: &'a TapSet, remote: SocketAddrV4) -> Option<TcpTap<'a>> {
        let node = node_side(&mut self.node, || self.host.local_addr())?;
        Some(TcpTap { tap, node, remote })
    }
}

/// The local address of a flow's node socket (getsockname), looked up the first time a
/// capture asks and kept.
fn node_side(
    cache: &mut Option<SocketAddrV4>,
    local: impl FnOnce() -> io::Result<SocketAddr>,
) -> Option<SocketAddrV4> {
    if cache.is_none() {
        if let Ok(SocketAddr::V4(a)) = local() {
            *cache = Some(a);
        }
    }
    *cache
}

/// One UDP flow or ICMP echo "connection".
struct DgramFlow {
    port: PortId,
    sock: UdpSocket,
    token: Token,
    echo: bool,
    /// The socket sends with DF and never fragments (IP_PMTUDISC_DO), as the pod's last
    /// datagram asked; else without DF (IP_PMTUDISC_DONT).
    df: bool,
    /// The TTL the socket sends with (IP_TTL): the pod's datagram's, which the switch has
    /// already taken its hop off; 0 until the first is sent.
    ttl: u8,
    last: Instant,
    started: Instant,
    /// The node's socket's address (an echo socket's port is its identifier), once a capture
    /// wanted it.
    node: Option<SocketAddrV4>,
    bytes_out: u64,
    bytes_in: u64,
}

impl DgramFlow {
    /// What the node's socket sent (`inbound` false) or received, offered at `egress:node`.
    fn capture(&mut self, tap: &TapSet, inbound: bool, key: FlowKey, msg: &[u8]) {
        let Some(node) = node_side(&mut self.node, || self.sock.local_addr()) else {
            return;
        };
        let l4 = if self.echo {
            // The kernel's identifier; the pod's if it named none.
            let ident = match node.port() {
                0 => key.pod.port(),
                p => p,
            };
            NodeL4::Icmp { msg, ident }
        } else {
            NodeL4::Udp(msg)
        };
        tap.egress_node(inbound, node, key.dst, l4);
    }
}

#[derive(Clone, Copy)]
enum Owner {
    Tcp(FlowKey),
    Dgram(FlowKey, bool),
}

struct Engine {
    poll: Poll,
    packets: Receiver<Packet>,
    cmds: Receiver<Command>,
    iface: Interface,
    sockets: SocketSet<'static>,
    link: Link,
    tcp: HashMap<FlowKey, TcpConn>,
    /// UDP flows and echoes, keyed with `echo`.
    dgram: HashMap<(FlowKey, bool), DgramFlow>,
    tokens: HashMap<Token, Owner>,
    next_token: usize,
    per_pod: HashMap<PortId, u32>,
    limits: Limits,
    stats: Arc<EgressStats>,
    epoch: Instant,
    rbuf: Box<[u8]>,
    /// Room for the control message of one error-queue read.
    cmsg: Vec<u8>,
    /// A pod's packet as a frame for `egress:pod`; empty until a capture wants one.
    cap_buf: Vec<u8>,
}

impl Engine {
    fn new(
        poll: Poll,
        (packets, cmds, free): (Receiver<Packet>, Receiver<Command>, Sender<Vec<u8>>),
        (tables, capture): (Arc<ArcSwap<Tables>>, Arc<crate::capture::Hub>),
        limits: Limits,
        stats: Arc<EgressStats>,
    ) -> Engine {
        let mtu = limits.mtu.clamp(576, 65_535) as usize;
        let mut link = Link {
            rx: VecDeque::new(),
            out: ToPods {
                tables,
                capture,
                ports: HashMap::new(),
                buf: vec![0u8; IP_AT + 65_535],
                stats: stats.clone(),
            },
            free,
            mtu,
        };
        let epoch = Instant::now();
        let mut iface = Interface::new(
            IfConfig::new(HardwareAddress::Ip),
            &mut link,
            smoltcp::time::Instant::from_millis(0),
        );
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(OWN), 32));
        });
        let _ = iface.routes_mut().add_default_ipv4_route(OWN);
        iface.set_any_ip(true);
        Engine {
            poll,
            packets,
            cmds,
            iface,
            sockets: SocketSet::new(Vec::new()),
            link,
            tcp: HashMap::new(),
            dgram: HashMap::new(),
            tokens: HashMap::new(),
            next_token: 1,
            per_pod: HashMap::new(),
            limits,
            stats,
            epoch,
            rbuf: vec![0u8; 65_536].into_boxed_slice(),
            cmsg: nix::cmsg_space!(libc::sock_extended_err, libc::sockaddr_in),
            cap_buf: Vec::new(),
        }
    }

    fn now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_millis(self.epoch.elapsed().as_millis() as i64)
    }

    fn run(mut self) {
        let mut events = Events::with_capacity(256);
        let mut last_sweep = Instant::now();
        loop {
            let now = self.now();
            let timeout = self
                .iface
                .poll_delay(now, &self.sockets)
                .map(|d| Duration::from_millis(d.total_millis()))
                .unwrap_or(Duration::from_secs(1))
                .min(Duration::from_secs(1));
            let timeout = if self.packets.is_empty() {
                timeout
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!("egress poll failed: {e}");
                }
                continue;
            }
            if !self.commands() {
                return;
            }
            for ev in events.iter() {
                self.event(
                    ev.token(),
                    ev.is_readable(),
                    ev.is_writable(),
                    ev.is_error(),
                );
            }
            for _ in 0..QUEUE {
                let Ok(p) = self.packets.try_recv() else {
                    break;
                };
                self.packet(p);
            }
            self.poll_iface();
            self.pump_all();
            self.poll_iface();
            if last_sweep.elapsed() >= Duration::from_secs(1) {
                last_sweep = Instant::now();
                self.sweep();
            }
            let active = (self.tcp.len() + self.dgram.len()) as u64;
            self.stats.active.store(active, Relaxed);
        }
    }

    fn poll_iface(&mut self) {
        let now = self.now();
        self.iface.poll(now, &mut self.link, &mut self.sockets);
    }

    fn commands(&mut self) -> bool {
        while let Ok(c) = self.cmds.try_recv() {
            match c {
                Command::AddPort(id, q) => {
                    self.link.out.ports.insert(id, q);
                }
                Command::RemovePort(id, done) => {
                    self.link.out.ports.remove(&id);
                    let tcp: Vec<FlowKey> = self
                        .tcp
                        .iter()
                        .filter(|(_, c)| c.port == id)
                        .map(|(k, _)| *k)
                        .collect();
                    for k in tcp {
                        self.close_tcp(k, true);
                    }
                    let dg: Vec<(FlowKey, bool)> = self
                        .dgram
                        .iter()
                        .filter(|(_, f)| f.port == id)
                        .map(|(k, _)| *k)
                        .collect();
                    for k in dg {
                        self.close_dgram(k);
                    }
                    self.per_pod.remove(&id);
                    let _ = done.send(());
                }
                Command::Dump(tx) => {
                    let _ = tx.send(self.dump());
                }
                Command::Shutdown => return false,
            }
        }
        true
    }

    fn dump(&mut self) -> Vec<EgressConnInfo> {
        let mut out = Vec::new();
        for (k, c) in &self.tcp {
            let state = match c.handle {
                None => "connecting".to_string(),
                Some(h) => format!("{}", self.sockets.get::<tcp::Socket>(h).state()),
            };
            out.push(EgressConnInfo {
                protocol: "TCP".into(),
                port: c.port,
                pod: None,
                pod_addr: k.pod,
                destination: k.dst,
                node_side: c.host.local_addr().ok(),
                bytes_out: c.bytes_out,
                bytes_in: c.bytes_in,
                age_ms: c.started.elapsed().as_millis() as u64,
                state,
            });
        }
        for ((k, echo), f) in &self.dgram {
            out.push(EgressConnInfo {
                protocol: if *echo { "ICMP" } else { "UDP" }.into(),
                port: f.port,
                pod: None,
                pod_addr: k.pod,
                destination: k.dst,
                node_side: f.sock.local_addr().ok(),
                bytes_out: f.bytes_out,
                bytes_in: f.bytes_in,
                age_ms: f.started.elapsed().as_millis() as u64,
                state: "open".into(),
            });
        }
        out.sort_by_key(|c| (c.port, c.pod_addr, c.destination, c.protocol.clone()));
        out
    }

    /// Counts a new flow of `port` against the limits; false (counted) when one is reached.
    fn admit(&mut self, port: PortId) -> bool {
        let total = self.tcp.len() + self.dgram.len();
        if total >= self.limits.total as usize {
            self.stats.limit_node.fetch_add(1, Relaxed);
            return false;
        }
        let n = self.per_pod.entry(port).or_default();
        if *n >= self.limits.per_pod {
            self.stats.limit_pod.fetch_add(1, Relaxed);
            return false;
        }
        *n += 1;
        true
    }

    fn release(&mut self, port: PortId) {
        if let Some(n) = self.per_pod.get_mut(&port) {
            *n = n.saturating_sub(1);
        }
    }

    fn token(&mut self, owner: Owner) -> Token {
        loop {
            self.next_token = self.next_token.wrapping_add(1).max(1);
            let t = Token(self.next_token);
            if !self.tokens.contains_key(&t) {
                self.tokens.insert(t, owner);
                return t;
            }
        }
    }

    fn recycle(&self, data: Vec<u8>) {
        let _ = self.link.free.try_send(data);
    }

    fn packet(&mut self, p: Packet) {
        if let Some(tap) = self.link.out.capture.current() {
            if tap.wants_egress_pod(true) {
                self.capture_from_pod(&tap, &p);
            }
        }
        match packet::classify(&p.data) {
            Some(Kind::Tcp { key, syn, rst }) => self.tcp_packet(p, key, syn, rst),
            Some(Kind::Udp { key, payload, df }) => {
                self.dgram_packet(&p, key, (false, df), payload);
                self.recycle(p.data);
            }
            Some(Kind::Echo { key, msg, df }) => {
                self.dgram_packet(&p, key, (true, df), msg);
                self.recycle(p.data);
            }
            None => {
                self.stats.malformed.fetch_add(1, Relaxed);
                self.recycle(p.data);
            }
        }
    }

    /// Offers a pod's packet at `egress:pod` (in) as the frame the pod sent, from its MAC to
    /// the gateway's: the queue holds the IP packet only.
    fn capture_from_pod(&mut self, tap: &TapSet, p: &Packet) {
        let tables = self.link.out.tables.load();
        let src_addr = tables.port(p.port).map(|e| e.mac).unwrap_or_default();
        self.cap_buf.clear();
        self.cap_buf.resize(ETHERNET_HEADER_LEN, 0);
        EthernetRepr {
            src_addr,
            dst_addr: tables.gateway_mac,
            ethertype: EtherType::IPV4,
        }
        .emit(&mut EthernetFrame::new_unchecked(&mut self.cap_buf[..]));
        self.cap_buf.extend_from_slice(&p.data);
        tap.egress_pod(true, &self.cap_buf);
    }

    fn tcp_packet(&mut self, p: Packet, key: FlowKey, syn: bool, rst: bool) {
        if let Some(c) = self.tcp.get(&key) {
            if c.syn.is_some() {
                // The pod repeats its SYN while the node's connection is being opened; a RST
                // gives up on it.
                if rst {
                    self.close_tcp(key, true);
                }
                self.recycle(p.data);
            } else {
                self.link.rx.push_back(p.data);
            }
            return;
        }
        if !syn {
            // No such connection: smoltcp answers with a RST (or ignores a RST).
            self.link.rx.push_back(p.data);
            return;
        }
        if !self.admit(p.port) {
            self.link.rx.push_back(p.data);
            return;
        }
        let host = match TcpStream::connect(SocketAddr::V4(key.dst)) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("egress: connecting to {}: {e}", key.dst);
                self.release(p.port);
                self.stats.tcp_refused.fetch_add(1, Relaxed);
                self.link.rx.push_back(p.data);
                return;
            }
        };
        let token = self.token(Owner::Tcp(key));
        let mut host = host;
        if let Err(e) =
            self.poll
                .registry()
                .register(&mut host, token, Interest::READABLE | Interest::WRITABLE)
        {
            tracing::warn!("egress: cannot watch a socket: {e}");
            self.tokens.remove(&token);
            self.release(p.port);
            self.link.rx.push_back(p.data);
            return;
        }
        self.tcp.insert(
            key,
            TcpConn {
                port: p.port,
                host,
                token,
                syn: Some(p.data),
                handle: None,
                readable: false,
                writable: false,
                established: false,
                pod_fin: false,
                host_eof: false,
                errored: false,
                host_reset: false,
                node: None,
                bytes_out: 0,
                bytes_in: 0,
                started: Instant::now(),
            },
        );
    }

    /// The node's connection for `key` is open (or failed): hand the pod's SYN to smoltcp,
    /// with a socket listening for it, or without one (a RST answers it).
    fn tcp_connected(&mut self, key: FlowKey) {
        let Some(c) = self.tcp.get_mut(&key) else {
            return;
        };
        let failed = match c.host.take_error() {
            Ok(Some(e)) | Err(e) => Some(e),
            Ok(None) => match c.host.peer_addr() {
                Ok(_) => None,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(e) => Some(e),
            },
        };
        let Some(syn) = c.syn.take() else { return };
        // The node's handshake at `egress:node`: its SYN, and the outside's SYN|ACK (or the
        // RST of a refusal; an unreachable host is the ICMP error the pod gets).
        if let Some(tap) = node_tap(&self.link.out.capture) {
            if let Some(t) = c.tap(&tap, key.dst) {
                t.segment(false, (0, 0), TcpFlags::SYN, &[]);
                match failed.as_ref().map(io::Error::raw_os_error) {
                    None => t.segment(true, (0, 1), TcpFlags::SYN | TcpFlags::ACK, &[]),
                    Some(Some(libc::ECONNREFUSED)) => {
                        t.segment(true, (0, 1), TcpFlags::RST | TcpFlags::ACK, &[])
                    }
                    Some(_) => {}
                }
            }
        }
        if let Some(e) = failed {
            self.stats.tcp_refused.fetch_add(1, Relaxed);
            // Unreachable as the node found it, in the pod's terms; anything else (refused,
            // timed out) a RST, which smoltcp makes for a SYN no socket takes.
            let code = match e.raw_os_error() {
                Some(libc::EHOSTUNREACH) => Some(1),
                Some(libc::ENETUNREACH) => Some(0),
                _ => None,
            };
            match code {
                Some(code) => {
                    let from = *key.dst.ip();
                    self.icmp_error(key, from, IcmpError::unreachable(code), &syn);
                    self.recycle(syn);
                }
                None => self.link.rx.push_back(syn),
            }
            self.close_tcp(key, false);
            self.poll_iface();
            return;
        }
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; TCP_BUF]),
            tcp::SocketBuffer::new(vec![0u8; TCP_BUF]),
        );
        s.set_nagle_enabled(false);
        s.set_ack_delay(None);
        s.set_timeout(Some(smoltcp::time::Duration::from_secs(120)));
        let ep = IpListenEndpoint {
            addr: Some(IpAddress::Ipv4(*key.dst.ip())),
            port: key.dst.port(),
        };
        if s.listen(ep).is_err() {
            self.link.rx.push_back(syn);
            self.close_tcp(key, false);
            return;
        }
        c.handle = Some(self.sockets.add(s));
        self.stats.tcp_opened.fetch_add(1, Relaxed);
        // This SYN alone meets the new socket, so no other connection's takes it.
        self.poll_iface();
        self.link.rx.push_back(syn);
        self.poll_iface();
    }

    /// Closes a TCP connection: the node's side with a RST when `reset` (or when the pod's
    /// side did not end in order), smoltcp's socket dropped.
    fn close_tcp(&mut self, key: FlowKey, reset: bool) {
        let Some(mut c) = self.tcp.remove(&key) else {
            return;
        };
        if let Some(h) = c.handle {
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            if reset {
                s.abort();
                // Let the RST out before the socket goes.
                let now = self.now();
                self.iface.poll(now, &mut self.link, &mut self.sockets);
            }
            self.sockets.remove(h);
        }
        if reset || !(c.pod_fin && c.host_eof) {
            let _ = socket2::SockRef::from(&c.host).set_linger(Some(Duration::ZERO));
            // The node's RST, at `egress:node`, unless the outside's ended it already.
            if c.handle.is_some() && !c.host_reset {
                if let Some(tap) = node_tap(&self.link.out.capture) {
                    let seq = c.node_seq();
                    if let Some(t) = c.tap(&tap, key.dst) {
                        t.segment(false, seq, TcpFlags::RST | TcpFlags::ACK, &[]);
                    }
                }
            }
        }
        let _ = self.poll.registry().deregister(&mut c.host);
        self.tokens.remove(&c.token);
        self.release(c.port);
    }

    fn event(&mut self, token: Token, readable: bool, writable: bool, error: bool) {
        match self.tokens.get(&token).copied() {
            Some(Owner::Tcp(key)) => {
                let Some(c) = self.tcp.get_mut(&key) else {
                    return;
                };
                c.readable |= readable;
                c.writable |= writable;
                c.errored |= error;
                if c.syn.is_some() && (writable || readable || error) {
                    self.tcp_connected(key);
                }
            }
            // Datagrams, or an error (EPOLLERR: the error queue has something).
            Some(Owner::Dgram(key, echo)) => self.dgram_readable(key, echo),
            None => {}
        }
    }

    fn pump_all(&mut self) {
        let keys: Vec<FlowKey> = self
            .tcp
            .iter()
            .filter(|(_, c)| c.handle.is_some())
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            self.pump(k);
        }
    }

    /// Moves what it can between the pod's (smoltcp) and the node's socket of one connection,
    /// each way only while the other side has room; passes FIN and RST on.
    fn pump(&mut self, key: FlowKey) {
        let Some(c) = self.tcp.get_mut(&key) else {
            return;
        };
        let Some(h) = c.handle else { return };
        let s = self.sockets.get_mut::<tcp::Socket>(h);
        // `egress:node`: the bytes each way as segments, when a capture wants them.
        let cap = node_tap(&self.link.out.capture);
        let tap = cap.as_deref().and_then(|tap| c.tap(tap, key.dst));
        let data = TcpFlags::PSH | TcpFlags::ACK;
        // Past the handshake (a pod that closes at once goes from SYN-RECEIVED to CLOSE-WAIT
        // in one poll, never seen ESTABLISHED here).
        if !matches!(
            s.state(),
            tcp::State::Listen | tcp::State::SynReceived | tcp::State::SynSent | tcp::State::Closed
        ) {
            c.established = true;
        }
        let mut reset = false;
        // Pod -> outside.
        while c.writable && s.can_recv() {
            let seq = c.node_seq();
            let host = &mut c.host;
            match s.recv(|b| match host.write(b) {
                Ok(n) => {
                    if let (Some(t), true) = (&tap, n > 0) {
                        t.segment(false, seq, data, &b[..n.min(b.len())]);
                    }
                    (n, Ok(n))
                }
                Err(e) => (0, Err(e)),
            }) {
                Ok(Ok(n)) => {
                    c.bytes_out += n as u64;
                    self.stats.bytes_out.fetch_add(n as u64, Relaxed);
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => c.writable = false,
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(_)) => {
                    reset = true;
                    break;
                }
                Err(_) => break,
            }
        }
        // The pod's FIN, after all its data: a half-close. (Closed is no FIN: a RST, below.)
        let fin_seen = matches!(
            s.state(),
            tcp::State::CloseWait
                | tcp::State::LastAck
                | tcp::State::Closing
                | tcp::State::TimeWait
        );
        if c.established && fin_seen && !c.pod_fin && !s.can_recv() && !reset {
            if let Some(t) = &tap {
                t.segment(false, c.node_seq(), TcpFlags::FIN | TcpFlags::ACK, &[]);
            }
            c.pod_fin = true;
            let _ = c.host.shutdown(std::net::Shutdown::Write);
        }
        // Outside -> pod.
        while !reset && !c.host_eof && c.readable && s.can_send() {
            let (ack, seq) = c.node_seq();
            let host = &mut c.host;
            match s.send(|b| match host.read(b) {
                Ok(n) => {
                    if let (Some(t), true) = (&tap, n > 0) {
                        t.segment(true, (seq, ack), data, &b[..n.min(b.len())]);
                    }
                    (n, Ok(n))
                }
                Err(e) => (0, Err(e)),
            }) {
                Ok(Ok(0)) => {
                    if let Some(t) = &tap {
                        t.segment(true, (seq, ack), TcpFlags::FIN | TcpFlags::ACK, &[]);
                    }
                    c.host_eof = true;
                    s.close();
                }
                Ok(Ok(n)) => {
                    c.bytes_in += n as u64;
                    self.stats.bytes_in.fetch_add(n as u64, Relaxed);
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => c.readable = false,
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(_)) => reset = true,
                Err(_) => break,
            }
        }
        // The node's connection failed (the outside host's RST, or it became unreachable and the
        // kernel gave up retransmitting: ETIMEDOUT, EHOSTUNREACH): a RST to the pod, even when
        // neither loop above read or wrote (the pod's window full, nothing to send).
        if c.errored && !reset {
            c.errored = false;
            if !matches!(c.host.take_error(), Ok(None)) {
                reset = true;
            }
        }
        if reset {
            // The outside's RST (or the node's connection failed).
            c.host_reset = true;
            if let Some(t) = &tap {
                let (out, inn) = c.node_seq();
                t.segment(true, (inn, out), TcpFlags::RST | TcpFlags::ACK, &[]);
            }
        }
        let state = s.state();
        if reset {
            // The outside host reset the connection (or it failed): so does the pod's side.
            self.close_tcp(key, true);
        } else if state == tcp::State::Closed {
            // A RST from the pod (or its timeout) unless both sides had ended in order.
            self.close_tcp(key, false);
        } else if state == tcp::State::TimeWait && c.pod_fin && c.host_eof {
            self.close_tcp(key, false);
        }
    }

    /// A pod's datagram (`echo`: an echo request) of the flow `key`, sent with DF when `df`.
    fn dgram_packet(
        &mut self,
        p: &Packet,
        key: FlowKey,
        (echo, df): (bool, bool),
        range: (usize, usize),
    ) {
        // A UDP super-frame's length field speaks for one datagram: its payload is the rest of
        // the IP packet.
        let end = if !echo && p.gso_size > 0 {
            let total = p
                .data
                .get(2..4)
                .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
            usize::from(total).min(p.data.len()).max(range.1)
        } else {
            range.1
        };
        let Some(payload) = p.data.get(range.0..end) else {
            self.stats.malformed.fetch_add(1, Relaxed);
            return;
        };
        if !self.dgram.contains_key(&(key, echo)) {
            if !self.admit(p.port) {
                return;
            }
            let sock = match open_dgram(key.dst, echo, df) {
                Ok(s) => s,
                Err(e) => {
                    self.release(p.port);
                    if echo {
                        self.stats.icmp_socket_failed.fetch_add(1, Relaxed);
                        tracing::warn!(
                            "egress: ICMP echo socket: {e} (is net.ipv4.ping_group_range set? \
                             `vswitch-install sysctls` sets it)"
                        );
                    } else {
                        tracing::debug!("egress: UDP socket to {}: {e}", key.dst);
                    }
                    return;
                }
            };
            let token = self.token(Owner::Dgram(key, echo));
            let mut sock = sock;
            if self
                .poll
                .registry()
                .register(&mut sock, token, Interest::READABLE)
                .is_err()
            {
                self.tokens.remove(&token);
                self.release(p.port);
                return;
            }
            if echo {
                self.stats.echo_flows.fetch_add(1, Relaxed);
            } else {
                self.stats.udp_flows.fetch_add(1, Relaxed);
            }
            self.dgram.insert(
                (key, echo),
                DgramFlow {
                    port: p.port,
                    sock,
                    token,
                    echo,
                    df,
                    ttl: 0,
                    last: Instant::now(),
                    started: Instant::now(),
                    node: None,
                    bytes_out: 0,
                    bytes_in: 0,
                },
            );
        }
        let Some(f) = self.dgram.get_mut(&(key, echo)) else {
            return;
        };
        f.last = Instant::now();
        // The node's datagram has DF when the pod's had (one setsockopt when that changes, not
        // one per datagram): so a pod's path MTU discovery sees the real path, and a datagram
        // without DF may be fragmented on the way, as a router would.
        if f.df != df && set_pmtu_discovery(&f.sock, df).is_ok() {
            f.df = df;
        }
        // And the pod's TTL, less the switch's hop (the same: one setsockopt when it changes):
        // a traceroute from the pod (UDP, or ICMP echo) sees the routers beyond the node,
        // whose "time exceeded" comes back as the errors above.
        let ttl = p.data.get(8).copied().unwrap_or(64).max(1);
        if f.ttl != ttl && setsockopt(&f.sock, sockopt::Ipv4Ttl, &i32::from(ttl)).is_ok() {
            f.ttl = ttl;
        }
        // A UDP super-frame (USO) carries several datagrams of `gso_size` bytes each.
        let step = if !echo && p.gso_size > 0 {
            usize::from(p.gso_size)
        } else {
            payload.len().max(1)
        };
        let mut too_big = false;
        let tap = node_tap(&self.link.out.capture);
        for d in payload.chunks(step) {
            match f.sock.send(d) {
                Ok(_) => {
                    f.bytes_out += d.len() as u64;
                    self.stats.bytes_out.fetch_add(d.len() as u64, Relaxed);
                    if let Some(t) = &tap {
                        f.capture(t, false, key, d);
                    }
                }
                // DF and larger than the path MTU the node knows (IP_PMTUDISC_DO).
                Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {
                    too_big = true;
                    break;
                }
                Err(_) => {}
            }
        }
        if payload.is_empty() && f.sock.send(&[]).is_ok() {
            if let Some(t) = &tap {
                f.capture(t, false, key, &[]);
            }
        }
        if too_big {
            // What a router on the path would answer: fragmentation needed with the MTU,
            // about the pod's own packet; from the destination (the node's stack knows the
            // MTU, from an earlier router's message or its own link).
            let mtu = getsockopt(&f.sock, sockopt::IpMtu)
                .ok()
                .and_then(|m| u16::try_from(m).ok());
            if let Some(mtu) = mtu {
                let from = *key.dst.ip();
                self.icmp_error(key, from, IcmpError::frag_needed(mtu), &p.data);
            }
        }
    }

    fn dgram_readable(&mut self, key: FlowKey, echo: bool) {
        // What the outside reported about the flow first: reading the error queue also clears
        // the error the socket would otherwise return from recv.
        self.dgram_errors(key, echo);
        loop {
            let Some(f) = self.dgram.get_mut(&(key, echo)) else {
                return;
            };
            let n = match f.sock.recv(&mut self.rbuf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // An ICMP error that came since the queue was read (port unreachable:
                // ECONNREFUSED, ...): with IP_RECVERR it is in the queue too, so it is passed
                // on from there, once. recv has cleared it, so this does not repeat.
                Err(_) => {
                    self.dgram_errors(key, echo);
                    continue;
                }
            };
            f.last = Instant::now();
            f.bytes_in += n as u64;
            self.stats.bytes_in.fetch_add(n as u64, Relaxed);
            let msg = &self.rbuf[..n];
            if let Some(t) = node_tap(&self.link.out.capture) {
                f.capture(&t, true, key, msg);
            }
            let out = self.link.out.packet_buf();
            let len = if f.echo {
                packet::echo_reply(*key.dst.ip(), *key.pod.ip(), key.pod.port(), msg, out)
            } else {
                packet::udp_packet(key.dst, key.pod, msg, out)
            };
            if let Some(len) = len {
                self.link.out.send(len);
            }
        }
    }

    /// Reads the error queue of a flow's socket (IP_RECVERR): each ICMP error the outside sent
    /// about the flow (unreachable, fragmentation needed, time exceeded) goes to the pod as the
    /// same error about its own packet (its address and port, or echo identifier, to the
    /// destination), from the router that sent it (`ee_offender`), or from the destination for
    /// "port unreachable" and when the kernel names no sender. The node's own errors (origin
    /// local: EMSGSIZE of a send, answered where the send failed) are read and dropped.
    fn dgram_errors(&mut self, key: FlowKey, echo: bool) {
        // Until the queue is empty (EAGAIN), so the next error is a new edge for the poll: the
        // queue is bounded by the socket's receive buffer, its errors by the datagrams sent.
        loop {
            let Some(f) = self.dgram.get(&(key, echo)) else {
                return;
            };
            let mut iov = [IoSliceMut::new(&mut self.rbuf[..])];
            let reported = match recvmsg::<()>(
                f.sock.as_raw_fd(),
                &mut iov,
                Some(&mut self.cmsg[..]),
                MsgFlags::MSG_ERRQUEUE,
            ) {
                Ok(m) => m.cmsgs().ok().and_then(|mut c| {
                    c.find_map(|c| match c {
                        ControlMessageOwned::Ipv4RecvErr(ee, offender) => {
                            Some((ee, offender, m.bytes))
                        }
                        _ => None,
                    })
                }),
                Err(Errno::EINTR) => continue,
                // EAGAIN: nothing (more) in the queue.
                Err(_) => return,
            };
            let Some((ee, offender, quoted_len)) = reported else {
                continue;
            };
            if ee.ee_origin != libc::SO_EE_ORIGIN_ICMP {
                continue;
            }
            let Some(err) = IcmpError::from_reported(ee.ee_type, ee.ee_code, ee.ee_info) else {
                continue;
            };
            let sender = offender
                .filter(|a| i32::from(a.sin_family) == libc::AF_INET)
                .map(|a| Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)))
                .filter(|a| !a.is_unspecified());
            let port_closed = err == IcmpError::unreachable(code::PORT_UNREACHABLE);
            let from = match sender {
                Some(a) if !port_closed => a,
                _ => *key.dst.ip(),
            };
            // The pod's packet, as far as an error quotes it (RFC 792: the IP header and 8
            // bytes): for an echo, its request with the pod's identifier and the sequence
            // number the node's quoted request had (the kernel keeps it).
            let mut orig = [0u8; 28];
            let quoted = if echo {
                let seq = self.rbuf[..quoted_len.min(self.rbuf.len())]
                    .get(6..8)
                    .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
                packet::echo_request_header(
                    *key.pod.ip(),
                    *key.dst.ip(),
                    key.pod.port(),
                    seq,
                    &mut orig,
                )
            } else {
                packet::udp_packet(key.pod, key.dst, &[], &mut orig)
            };
            if let Some(n) = quoted {
                self.icmp_error(key, from, err, &orig[..n]);
            }
        }
    }

    /// Sends the pod of flow `key` the ICMP error `err` from `from` about its packet `orig`,
    /// counted by kind.
    fn icmp_error(&mut self, key: FlowKey, from: Ipv4Addr, err: IcmpError, orig: &[u8]) {
        let out = self.link.out.packet_buf();
        if let Some(len) = packet::icmp_error(from, *key.pod.ip(), err, orig, out) {
            let counter = if err.is_frag_needed() {
                &self.stats.frag_needed
            } else if err.msg_type == Icmpv4Message::TIME_EXCEEDED {
                &self.stats.time_exceeded
            } else {
                &self.stats.unreachable
            };
            counter.fetch_add(1, Relaxed);
            self.link.out.send(len);
        }
    }

    fn close_dgram(&mut self, key: (FlowKey, bool)) {
        if let Some(mut f) = self.dgram.remove(&key) {
            let _ = self.poll.registry().deregister(&mut f.sock);
            self.tokens.remove(&f.token);
            self.release(f.port);
        }
    }

    /// Closes idle datagram flows and connections that never opened.
    fn sweep(&mut self) {
        let idle: Vec<(FlowKey, bool)> = self
            .dgram
            .iter()
            .filter(|(_, f)| f.last.elapsed() >= UDP_IDLE)
            .map(|(k, _)| *k)
            .collect();
        for k in idle {
            self.stats.expired.fetch_add(1, Relaxed);
            self.close_dgram(k);
        }
        let stuck: Vec<FlowKey> = self
            .tcp
            .iter()
            .filter(|(_, c)| c.syn.is_some() && c.started.elapsed() >= CONNECT_TIMEOUT)
            .map(|(k, _)| *k)
            .collect();
        for k in stuck {
            self.stats.expired.fetch_add(1, Relaxed);
            if let Some(syn) = self.tcp.get_mut(&k).and_then(|c| c.syn.take()) {
                self.link.rx.push_back(syn);
            }
            self.close_tcp(k, false);
        }
    }
}

/// A connected datagram socket of the node to `dst`: UDP, or an ICMP echo socket; sending with
/// DF when `df`. The outside's ICMP errors about it come to its error queue (IP_RECVERR): every
/// kind, not only those the kernel deems fatal to a connected socket, each with its sender and,
/// for fragmentation needed, the MTU.
fn open_dgram(dst: SocketAddrV4, echo: bool, df: bool) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let proto = if echo {
        Protocol::ICMPV4
    } else {
        Protocol::UDP
    };
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(proto))?;
    s.set_nonblocking(true)?;
    setsockopt(&s, sockopt::Ipv4RecvErr, &true)?;
    set_pmtu_discovery(&s, df)?;
    let to = if echo {
        SocketAddrV4::new(*dst.ip(), 0)
    } else {
        dst
    };
    s.connect(&SocketAddr::V4(to).into())?;
    // An ICMP datagram socket is read and written as a UDP one is (send/recv of whole
    // messages), so mio's UDP type carries it.
    Ok(UdpSocket::from_std(std::net::UdpSocket::from(s)))
}

/// With `df`, the socket's datagrams carry DF and one larger than the path MTU fails with
/// EMSGSIZE (IP_PMTUDISC_DO); without, they carry no DF and the kernel fragments them
/// (IP_PMTUDISC_DONT). Neither nix nor socket2 has this option.
fn set_pmtu_discovery(sock: &impl AsRawFd, df: bool) -> io::Result<()> {
    let mode: libc::c_int = if df {
        libc::IP_PMTUDISC_DO
    } else {
        libc::IP_PMTUDISC_DONT
    };
    crate::datapath::underlay::set_socket_option(
        sock,
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        &mode,
    )
}
