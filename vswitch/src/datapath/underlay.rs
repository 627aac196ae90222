//! The underlay: VXLAN in plain UDP sockets, with segmentation offload both ways.
//!
//! One socket bound to `underlay_ip:port` receives from every peer, with UDP GRO on so that one
//! `recvmmsg` returns up to 64 KiB of same-flow datagrams per message. Sending uses a small pool
//! of sockets bound to ephemeral ports, picked by a key of the inner flow: the outer source port
//! then identifies the flow (as Linux's vxlan does with its source port range), so one flow stays
//! on one path through ECMP fabrics and the peer's GRO can coalesce it. A segmented super-frame
//! leaves in one `sendmsg` with UDP_SEGMENT. quinn-udp does the control-message work and falls
//! back to one datagram per call where the kernel or NIC refuses segmentation (EIO/EINVAL).
//! Sockets are non-blocking; a full send buffer is a counted drop, never a wait.
//!
//! With several datapath workers each has its own `Underlay`: the receive sockets share the
//! VXLAN port with SO_REUSEPORT, and each worker sends from its own pool, so no socket is shared
//! between threads. A classic BPF program on the port's group picks the receiving worker from
//! the *inner* flow, by a key that is the same for both directions and that also picked the
//! peer's send socket (see [`steer_key`]), so a TCP stream's data and its ACKs stay on one
//! worker per node, as do flows a NIC's GRO merges. (The kernel's default pick, a hash of the outer
//! addresses and ports, sent each direction's datagrams to whichever worker the peer's source
//! port hashed to; the pod's replies follow the TAP queue last written for their flow, so for
//! about one flow in ten the two nodes' picks disagreed and the flow moved between a node's two
//! workers on every round trip: both read it at once, 10% slower in the lab and reordered.)

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr, UdpSocket};

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use socket2::{Domain, Protocol, Socket, Type};

/// Sockets in the send pool: distinct outer source ports per worker.
const SEND_POOL: usize = 8;
const BUFFER_BYTES: usize = 8 << 20;
/// The most one UDP_SEGMENT send may carry: the whole batch is one IPv4 datagram before
/// segmentation, so it must fit in 64 KiB with the IP and UDP headers.
const MAX_GSO_BYTES: usize = 65_535 - 20 - 8;

pub struct Underlay {
    rx: UdpSocket,
    rx_state: UdpSocketState,
    tx: Vec<(UdpSocket, UdpSocketState)>,
    /// The local addresses of `rx` and of `tx`, in order (for capture copies).
    rx_addr: SocketAddr,
    tx_addrs: Vec<SocketAddr>,
    /// The peers' VXLAN port (the cluster uses one port).
    pub port: u16,
}

fn socket(addr: SocketAddr, reuse_port: bool) -> io::Result<(UdpSocket, UdpSocketState)> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_cloexec(true)?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    s.bind(&addr.into())?;
    let s: UdpSocket = s.into();
    let state = UdpSocketState::new((&s).into())?;
    // Bigger buffers absorb bursts of TSO-sized batches; the kernel caps them at its maximum,
    // and either way a smaller buffer only means more (counted) drops.
    let _ = state.set_recv_buffer_size((&s).into(), BUFFER_BYTES);
    let _ = state.set_send_buffer_size((&s).into(), BUFFER_BYTES);
    Ok((s, state))
}

/// Where the inner IPv4 header starts in a datagram's payload: after the VXLAN header and the
/// inner Ethernet header.
const INNER_IP: u32 = (overlay::vxlan::HEADER_LEN + crate::wire::ETHERNET_HEADER_LEN) as u32;

/// Knuth's multiplier for Fibonacci hashing: the prime next to 2^32 divided by the golden
/// ratio.
const GOLDEN: u32 = 0x9E37_79B1;

/// The steering key of an inner Ethernet frame, which both ends of the overlay compute: the
/// sender picks its send socket (so the outer source port) as `key % SEND_POOL`, and the
/// receiver's [`inner_flow_program`] picks the worker as `key % SEND_POOL % workers`. The key
/// is the same for both directions of a flow, so a flow's data and its replies meet on one
/// worker per node; and flows that share an outer source port, which a NIC's GRO may merge
/// into one datagram train that the program sees only the first of, share a worker too.
///
/// For IPv4, `saddr ^ daddr`, with `sport ^ dport` for TCP and UDP (not in later fragments),
/// the ports read where the header length says; multiplied by [`GOLDEN`], the top 16 bits
/// (the multiply carries every bit upwards: XOR alone left the low bit to the ports' parity,
/// and Linux gives connect() even ports). Anything else, or too short to read, is 0. This
/// must stay the exact model of the program (the unit test checks one against the other).
pub fn steer_key(frame: &[u8]) -> u32 {
    let be16 = |b: &[u8], at: usize| b.get(at..at + 2).map(|x| u16::from_be_bytes([x[0], x[1]]));
    let be32 = |b: &[u8], at: usize| {
        b.get(at..at + 4)
            .map(|x| u32::from_be_bytes([x[0], x[1], x[2], x[3]]))
    };
    let mix = |a: u32| a.wrapping_mul(GOLDEN) >> 16;
    if be16(frame, 12) != Some(0x0800) {
        return 0;
    }
    let ip = &frame[14..];
    let (Some(src), Some(dst), Some(&proto), Some(frag)) =
        (be32(ip, 12), be32(ip, 16), ip.get(9), be16(ip, 6))
    else {
        return 0;
    };
    let addrs = src ^ dst;
    if !matches!(proto, 6 | 17) || frag & 0x1fff != 0 {
        return mix(addrs);
    }
    let l4 = usize::from(ip[0] & 0x0f) * 4;
    match (be16(ip, l4), be16(ip, l4 + 2)) {
        (Some(sp), Some(dp)) => mix(addrs ^ u32::from(sp ^ dp)),
        // The program's load past the end ends it with 0.
        _ => 0,
    }
}

/// The classic BPF program that picks a datagram's socket in a reuseport group of `n`: the
/// kernel runs it with the packet starting at the UDP payload (the VXLAN header) and takes the
/// result as the socket's index, `steer_key(inner frame) % SEND_POOL % n` (see [`steer_key`]).
/// A load past the end of a short datagram ends it with 0, as classic BPF does: worker 0.
pub fn inner_flow_program(n: u32) -> Vec<libc::sock_filter> {
    use libc::{
        BPF_A, BPF_ABS, BPF_ALU, BPF_B, BPF_H, BPF_IND, BPF_JA, BPF_JEQ, BPF_JMP, BPF_JSET, BPF_K,
        BPF_LD, BPF_LDX, BPF_MEM, BPF_MISC, BPF_MOD, BPF_MSH, BPF_MUL, BPF_RET, BPF_RSH, BPF_ST,
        BPF_TAX, BPF_W, BPF_X, BPF_XOR,
    };
    let op = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    // A conditional jump from instruction `at`: to `t` if true, `f` if false (absolute).
    let jump = |code: u32, k: u32, at: u8, t: u8, f: u8| libc::sock_filter {
        code: (BPF_JMP | code | BPF_K) as u16,
        jt: t - at - 1,
        jf: f - at - 1,
        k,
    };
    const FRAG: u8 = 10;
    const ADDRS: u8 = 21;
    const MIX: u8 = 22;
    const ZERO: u8 = 27;
    let prog = vec![
        op(BPF_LD | BPF_H | BPF_ABS, INNER_IP - 2), // 0: A = EtherType
        jump(BPF_JEQ, 0x0800, 1, 2, ZERO),          // 1: not IPv4: 0
        op(BPF_LD | BPF_W | BPF_ABS, INNER_IP + 12), // 2: A = saddr
        op(BPF_MISC | BPF_TAX, 0),                  // 3: X = A
        op(BPF_LD | BPF_W | BPF_ABS, INNER_IP + 16), // 4: A = daddr
        op(BPF_ALU | BPF_XOR | BPF_X, 0),           // 5: A ^= X
        op(BPF_ST, 0),                              // 6: M[0] = saddr ^ daddr
        op(BPF_LD | BPF_B | BPF_ABS, INNER_IP + 9), // 7: A = protocol
        jump(BPF_JEQ, 6, 8, FRAG, 9),               // 8: TCP
        jump(BPF_JEQ, 17, 9, FRAG, ADDRS),          // 9: UDP; others: addresses only
        op(BPF_LD | BPF_H | BPF_ABS, INNER_IP + 6), // 10: A = flags, fragment offset
        jump(BPF_JSET, 0x1fff, 11, ADDRS, 12),      // 11: a later fragment: no ports
        op(BPF_LDX | BPF_B | BPF_MSH, INNER_IP),    // 12: X = IP header length
        op(BPF_LD | BPF_H | BPF_IND, INNER_IP),     // 13: A = sport
        op(BPF_ST, 1),                              // 14: M[1] = sport
        op(BPF_LD | BPF_H | BPF_IND, INNER_IP + 2), // 15: A = dport
        op(BPF_LDX | BPF_MEM, 1),                   // 16: X = sport
        op(BPF_ALU | BPF_XOR | BPF_X, 0),           // 17: A ^= X
        op(BPF_LDX | BPF_MEM, 0),                   // 18: X = saddr ^ daddr
        op(BPF_ALU | BPF_XOR | BPF_X, 0),           // 19: A ^= X
        op(BPF_JMP | BPF_JA, u32::from(MIX - 20 - 1)), // 20: to MIX
        op(BPF_LD | BPF_MEM, 0),                    // 21 ADDRS: A = saddr ^ daddr
        op(BPF_ALU | BPF_MUL | BPF_K, GOLDEN),      // 22 MIX: A *= GOLDEN
        op(BPF_ALU | BPF_RSH | BPF_K, 16),          // 23: A >>= 16 (the key)
        op(BPF_ALU | BPF_MOD | BPF_K, SEND_POOL as u32), // 24: the peer's send socket
        op(BPF_ALU | BPF_MOD | BPF_K, n.max(1)),    // 25: its worker here
        op(BPF_RET | BPF_A, 0),                     // 26: socket index A
        op(BPF_RET | BPF_K, 0),                     // 27 ZERO: socket 0
    ];
    debug_assert_eq!(prog.len(), usize::from(ZERO) + 1);
    prog
}

/// Attaches [`inner_flow_program`] to the reuseport group `sock` belongs to.
fn steer_by_inner_flow(sock: &UdpSocket, n: u32) -> io::Result<()> {
    let mut prog = inner_flow_program(n);
    let fprog = libc::sock_fprog {
        len: prog.len() as libc::c_ushort,
        filter: prog.as_mut_ptr(),
    };
    // The kernel copies the program during the call; `prog` outlives it.
    set_socket_option(
        sock,
        libc::SOL_SOCKET,
        libc::SO_ATTACH_REUSEPORT_CBPF,
        &fprog,
    )
}

/// `setsockopt(2)` at `level` with `value`, a plain C struct or integer of the option's type
/// (for options neither socket2 nor nix has; the egress engine's IP_MTU_DISCOVER too).
pub(crate) fn set_socket_option<T>(
    sock: &impl std::os::fd::AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: setsockopt on an open socket, with a pointer to `value` (borrowed for the whole
    // call) and its exact size; the kernel only reads it.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Underlay {
    /// One underlay per worker, each with its receive socket on `ip:port` and its send pool on
    /// `ip:0`; with more than one, the receive sockets share the port (SO_REUSEPORT).
    pub fn bind_group(ip: IpAddr, port: u16, n: usize) -> io::Result<Vec<Underlay>> {
        let mut first = Underlay::bind_one(ip, port, n > 1)?;
        // The others join the first's port (which the kernel chose, for port 0).
        let port = first.local_addr().port();
        first.port = port;
        let mut group = vec![first];
        for _ in 1..n {
            group.push(Underlay::bind_one(ip, port, true)?);
        }
        // A socket's index in the group is the order it joined: worker i's is i.
        if n > 1 {
            if let Err(e) = steer_by_inner_flow(&group[0].rx, n as u32) {
                // Still correct, as before this program: the kernel spreads by outer ports.
                tracing::warn!(
                    "underlay: cannot steer VXLAN flows to workers by their inner flow ({e}); \
                     the kernel's hash of the outer addresses and ports picks the worker, so \
                     some flows will move between workers"
                );
            }
        }
        Ok(group)
    }

    fn bind_one(ip: IpAddr, port: u16, reuse_port: bool) -> io::Result<Underlay> {
        let (rx, rx_state) = socket(SocketAddr::new(ip, port), reuse_port).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("binding the VXLAN socket to {ip}:{port}: {e}"),
            )
        })?;
        let mut tx = Vec::with_capacity(SEND_POOL);
        for _ in 0..SEND_POOL {
            tx.push(socket(SocketAddr::new(ip, 0), false)?);
        }
        let rx_addr = rx.local_addr()?;
        let tx_addrs = tx
            .iter()
            .map(|(s, _)| s.local_addr())
            .collect::<io::Result<_>>()?;
        Ok(Underlay {
            rx,
            rx_state,
            tx,
            rx_addr,
            tx_addrs,
            port,
        })
    }

    pub fn rx_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.rx)
    }

    /// Receives a batch of messages (each possibly several GRO-coalesced datagrams of
    /// `meta.stride` bytes).
    pub fn recv(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> io::Result<usize> {
        self.rx_state.recv((&self.rx).into(), bufs, meta)
    }

    /// Sends `contents` to `peer`: one datagram, or with `segment` a run of datagrams of that
    /// size (the last may be shorter). Returns the datagrams sent; on error none of the failing
    /// chunk was sent.
    pub fn send(
        &self,
        key: u32,
        contents: &[u8],
        segment: Option<usize>,
        peer: IpAddr,
    ) -> io::Result<usize> {
        let (sock, state) = &self.tx[key as usize % self.tx.len()];
        let destination = SocketAddr::new(peer, self.port);
        let Some(seg) = segment.filter(|&s| s > 0 && s < contents.len()) else {
            state.try_send(
                sock.into(),
                &Transmit {
                    destination,
                    ecn: None,
                    contents,
                    segment_size: None,
                    src_ip: None,
                },
            )?;
            return Ok(1);
        };
        let gso = state.max_gso_segments();
        let per_call = gso.min(MAX_GSO_BYTES / seg).max(1);
        let mut sent = 0;
        let mut result = Ok(());
        for chunk in contents.chunks(per_call * seg) {
            result = state.try_send(
                sock.into(),
                &Transmit {
                    destination,
                    ecn: None,
                    contents: chunk,
                    segment_size: (chunk.len() > seg).then_some(seg),
                    src_ip: None,
                },
            );
            if result.is_err() {
                break;
            }
            sent += chunk.len().div_ceil(seg);
        }
        if gso > 1 && state.max_gso_segments() == 1 {
            // quinn-udp saw EIO/EINVAL: the underlay device cannot segment or checksum.
            tracing::warn!(
                "underlay: the kernel refused UDP segmentation offload on a send socket (an \
                 underlay device without checksum offload?); that socket sends one datagram \
                 per call from now on"
            );
        }
        result.map(|()| sent)
    }

    /// The address a datagram of this flow leaves from, as `send` picks the socket.
    pub fn source_for(&self, key: u32) -> SocketAddr {
        self.tx_addrs[key as usize % self.tx_addrs.len()]
    }

    /// The address datagrams from peers arrive at.
    pub fn local_addr(&self) -> SocketAddr {
        self.rx_addr
    }

    /// Whether the kernel coalesces received datagrams (UDP GRO).
    pub fn gro(&self) -> bool {
        self.rx_state.gro_segments() > 1
    }

    /// The local source ports of the send pool.
    pub fn source_ports(&self) -> Vec<u16> {
        self.tx
            .iter()
            .filter_map(|(s, _)| s.local_addr().ok().map(|a| a.port()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Datagrams (and bytes) the underlay's receive socket gets within a second.
    fn drain(u: &Underlay, want: usize) -> (usize, usize) {
        let mut buf = vec![0u8; 65_536];
        let (mut n, mut bytes) = (0, 0);
        let deadline = Instant::now() + Duration::from_secs(1);
        while bytes < want && Instant::now() < deadline {
            let mut meta = [RecvMeta::default()];
            match u.recv(&mut [IoSliceMut::new(&mut buf)], &mut meta) {
                Ok(_) => {
                    n += meta[0].len.div_ceil(meta[0].stride.max(1));
                    bytes += meta[0].len;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => panic!("recv: {e}"),
            }
        }
        (n, bytes)
    }

    /// A VXLAN datagram carrying an inner IPv4 packet of `proto` (with `opts` words of IP
    /// options, the fragment offset `frag`) whose L4 header starts with these ports.
    fn vxlan_ip(
        proto: u8,
        src: [u8; 4],
        dst: [u8; 4],
        ports: (u16, u16),
        opts: usize,
        frag: u16,
    ) -> Vec<u8> {
        let mut d = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
        d.extend_from_slice(&[0x0a, 0x58, 0, 0, 0, 2, 0x0a, 0x58, 0, 0, 0, 1, 0x08, 0x00]);
        let ihl = 5 + opts;
        let mut ip = vec![0u8; ihl * 4];
        ip[0] = 0x40 | ihl as u8;
        ip[6..8].copy_from_slice(&frag.to_be_bytes());
        ip[9] = proto;
        ip[12..16].copy_from_slice(&src);
        ip[16..20].copy_from_slice(&dst);
        d.extend_from_slice(&ip);
        d.extend_from_slice(&ports.0.to_be_bytes());
        d.extend_from_slice(&ports.1.to_be_bytes());
        d.extend_from_slice(&[0u8; 16]);
        d
    }

    /// The worker the program should pick for a datagram, from the model.
    fn model(datagram: &[u8], n: usize) -> usize {
        let inner = datagram
            .get(overlay::vxlan::HEADER_LEN..)
            .unwrap_or_default();
        steer_key(inner) as usize % SEND_POOL % n
    }

    /// Which of `group`'s receive sockets got a datagram within a second.
    fn receiver(group: &[Underlay]) -> usize {
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut buf = vec![0u8; 65_536];
        loop {
            for (i, u) in group.iter().enumerate() {
                let mut meta = [RecvMeta::default()];
                if u.recv(&mut [IoSliceMut::new(&mut buf)], &mut meta).is_ok() {
                    return i;
                }
            }
            assert!(Instant::now() < deadline, "no socket of the group got it");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Both directions of an inner flow reach the same worker, whichever outer source port
    /// they come from; the worker is the model's (`steer_key`, which the sender also uses for
    /// its source port), so a socket's index in the group is its worker's; flows spread over
    /// the workers; what is not TCP or UDP (or a later fragment) goes by the addresses alone.
    #[test]
    fn the_vxlan_port_steers_both_directions_of_an_inner_flow_to_one_worker() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        for n in [2, 3] {
            let group = Underlay::bind_group(ip, 0, n).unwrap();
            let port = group[0].local_addr().port();
            assert!(group.iter().all(|u| u.local_addr().port() == port));
            let to = SocketAddr::new(ip, port);
            // Peers send from many source ports: the outer port must not matter.
            let senders: Vec<UdpSocket> = (0..4)
                .map(|_| UdpSocket::bind(SocketAddr::new(ip, 0)).unwrap())
                .collect();
            let (a, b) = ([10, 244, 1, 2], [10, 244, 2, 7]);
            let mut seen = vec![0usize; n];
            for i in 0..48u16 {
                // Even source ports, as connect() gets them.
                let (sport, dport) = (40_000 + i * 2, 5201);
                let proto = [6, 17, 1, 6][usize::from(i % 4)];
                let opts = usize::from(i % 3 == 0);
                let frag = if i % 8 == 7 { 0x20b9 } else { 0 };
                let there = vxlan_ip(proto, a, b, (sport, dport), opts, frag);
                let back = vxlan_ip(proto, b, a, (dport, sport), opts, frag);
                let want = model(&there, n);
                assert_eq!(model(&back, n), want, "the model is symmetric");
                senders[usize::from(i) % 4].send_to(&there, to).unwrap();
                assert_eq!(receiver(&group), want, "n={n} flow {i}, forward");
                senders[(usize::from(i) + 1) % 4]
                    .send_to(&back, to)
                    .unwrap();
                assert_eq!(receiver(&group), want, "n={n} flow {i}, reverse");
                seen[want] += 1;
                // ICMP and later fragments: the ports' bytes do not count.
                if proto == 1 || frag != 0 {
                    let other = vxlan_ip(proto, a, b, (sport ^ 0x5a5a, 77), opts, frag);
                    assert_eq!(model(&other, n), want);
                }
            }
            assert!(
                seen.iter().all(|&c| c > 0),
                "n={n}: flows on workers {seen:?}"
            );
            // Not IPv4 (ARP), or too short for the program's loads: worker 0, never an error.
            let mut arp = vxlan_ip(6, a, b, (1, 2), 0, 0);
            arp[8 + 12..8 + 14].copy_from_slice(&[0x08, 0x06]);
            for d in [arp, vec![0x08, 0, 0, 0]] {
                assert_eq!(model(&d, n), 0);
                senders[0].send_to(&d, to).unwrap();
                assert_eq!(receiver(&group), 0);
            }
            // TCP whose ports lie past the end: the program's load fails, so worker 0.
            let mut cut = vxlan_ip(6, a, b, (1, 2), 0, 0);
            cut.truncate(8 + 14 + 20 + 2);
            assert_eq!(model(&cut, n), 0);
            senders[0].send_to(&cut, to).unwrap();
            assert_eq!(receiver(&group), 0);
        }
    }

    /// Where the kernel refuses UDP_SEGMENT on a socket (EIO from a device without checksum
    /// offload on older kernels, EINVAL here, from a socket that sends no UDP checksum), the
    /// send pool falls back to one datagram per call and the segments still arrive whole.
    #[test]
    fn a_refused_segmentation_offload_falls_back_to_one_datagram_per_call() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let mut u = Underlay::bind_group(ip, 0, 1).unwrap().remove(0);
        u.port = u.local_addr().port();
        let data = vec![7u8; 3000];
        // With offload: one call, three datagrams.
        assert_eq!(u.send(1, &data, Some(1000), ip).unwrap(), 3);
        assert_eq!(drain(&u, 3000), (3, 3000));
        for (s, state) in &u.tx {
            assert!(
                state.max_gso_segments() > 1,
                "no segmentation offload to refuse"
            );
            let one: libc::c_int = 1;
            set_socket_option(s, libc::SOL_SOCKET, libc::SO_NO_CHECK, &one).expect("SO_NO_CHECK");
        }
        // The refused send is lost (a counted drop in the worker); every later one goes out
        // datagram by datagram.
        let first = u.send(1, &data, Some(1000), ip);
        let (tx, state) = &u.tx[(1 % u.tx.len() as u64) as usize];
        assert_eq!(state.max_gso_segments(), 1, "{first:?} from {tx:?}");
        let sent_first = first.unwrap_or(0);
        assert_eq!(u.send(1, &data, Some(1000), ip).unwrap(), 3);
        let want = 3000 + sent_first * 1000;
        assert_eq!(drain(&u, want), (3 + sent_first, want));
    }
}
