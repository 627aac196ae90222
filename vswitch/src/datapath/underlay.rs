//! The underlay: VXLAN in plain UDP sockets.
//!
//! One socket bound to `underlay_ip:port` receives from every peer. Sending uses a small pool of
//! sockets bound to ephemeral ports, picked by a hash of the inner flow: the outer source port
//! then identifies the flow (as Linux's vxlan does with its source port range), so one flow stays
//! on one path through ECMP fabrics and the peer's GRO can coalesce it, while different flows
//! spread. Sockets are non-blocking; a full send buffer is a counted drop, never a wait.

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};

/// Sockets in the send pool: distinct outer source ports per worker.
const SEND_POOL: usize = 8;
const BUFFER_BYTES: usize = 4 << 20;

pub struct Underlay {
    pub rx: mio::net::UdpSocket,
    tx: Vec<UdpSocket>,
    /// The peers' VXLAN port (the cluster uses one port).
    pub port: u16,
}

fn socket(addr: SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_nonblocking(true)?;
    s.set_cloexec(true)?;
    // Bigger buffers absorb bursts of TSO-sized batches; the kernel caps them at rmem_max
    // unless we are privileged, and either way a smaller buffer only means more drops.
    let _ = s.set_recv_buffer_size(BUFFER_BYTES);
    let _ = s.set_send_buffer_size(BUFFER_BYTES);
    s.bind(&addr.into())?;
    Ok(s)
}

impl Underlay {
    /// Binds the receive socket on `ip:port` and the send pool on `ip:0`.
    pub fn bind(ip: IpAddr, port: u16) -> io::Result<Underlay> {
        let rx = socket(SocketAddr::new(ip, port)).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("binding the VXLAN socket to {ip}:{port}: {e}"),
            )
        })?;
        let rx = mio::net::UdpSocket::from_std(rx.into());
        let mut tx = Vec::with_capacity(SEND_POOL);
        for _ in 0..SEND_POOL {
            tx.push(socket(SocketAddr::new(ip, 0))?.into());
        }
        Ok(Underlay { rx, tx, port })
    }

    /// Sends one datagram (VXLAN header + inner frame) to `peer` from the pool socket chosen by
    /// the inner flow's hash.
    #[inline]
    pub fn send(&self, flow_hash: u64, datagram: &[u8], peer: IpAddr) -> io::Result<usize> {
        let s = &self.tx[(flow_hash % self.tx.len() as u64) as usize];
        s.send_to(datagram, SocketAddr::new(peer, self.port))
    }

    /// The local source ports of the send pool (for tests and `vswitchctl`).
    pub fn source_ports(&self) -> Vec<u16> {
        self.tx
            .iter()
            .filter_map(|s| s.local_addr().ok().map(|a| a.port()))
            .collect()
    }
}
