//! The underlay: VXLAN in plain UDP sockets, with segmentation offload both ways.
//!
//! One socket bound to `underlay_ip:port` receives from every peer, with UDP GRO on so that one
//! `recvmmsg` returns up to 64 KiB of same-flow datagrams per message. Sending uses a small pool
//! of sockets bound to ephemeral ports, picked by a hash of the inner flow: the outer source port
//! then identifies the flow (as Linux's vxlan does with its source port range), so one flow stays
//! on one path through ECMP fabrics and the peer's GRO can coalesce it. A segmented super-frame
//! leaves in one `sendmsg` with UDP_SEGMENT. quinn-udp does the control-message work and falls
//! back to one datagram per call where the kernel or NIC refuses segmentation (EIO/EINVAL).
//! Sockets are non-blocking; a full send buffer is a counted drop, never a wait.
//!
//! With several datapath workers each has its own `Underlay`: the receive sockets share the
//! VXLAN port with SO_REUSEPORT, so the kernel spreads peers' flows over the workers by the
//! outer addresses and ports (and a peer gives each inner flow its own source port), and each
//! worker sends from its own pool, so no socket is shared between threads.

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

impl Underlay {
    /// One underlay per worker, each with its receive socket on `ip:port` and its send pool on
    /// `ip:0`; with more than one, the receive sockets share the port (SO_REUSEPORT).
    pub fn bind_group(ip: IpAddr, port: u16, n: usize) -> io::Result<Vec<Underlay>> {
        (0..n.max(1))
            .map(|_| Underlay::bind_one(ip, port, n > 1))
            .collect()
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
        flow_hash: u64,
        contents: &[u8],
        segment: Option<usize>,
        peer: IpAddr,
    ) -> io::Result<usize> {
        let (sock, state) = &self.tx[(flow_hash % self.tx.len() as u64) as usize];
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
    pub fn source_for(&self, flow_hash: u64) -> SocketAddr {
        self.tx_addrs[(flow_hash % self.tx_addrs.len() as u64) as usize]
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
    use std::os::fd::AsRawFd;
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
            // SAFETY: setsockopt on an open socket, with a pointer to a c_int that outlives
            // the call and its size.
            let rc = unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_NO_CHECK,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0, "SO_NO_CHECK: {}", io::Error::last_os_error());
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
