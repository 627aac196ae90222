//! DNS over TCP for the switch's resolver.
//!
//! The switch answers UDP queries in the datapath, but a client whose answer was truncated
//! retries over TCP, and the switch has no TCP stack. TCP port 53 of each DNS address is
//! therefore translated, like a Service, to this listener on the gateway address, which the
//! node holds on the host port: the kernel terminates the connection and this task answers each
//! length-prefixed message from the same records (with TCP's size limits) or forwards it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::dns::{answer_with, Answer, Forwarder, Transport};
use crate::pipeline::Tables;

/// Idle connections are closed after this (RFC 7766 suggests seconds, not minutes).
const IDLE: Duration = Duration::from_secs(10);

pub async fn serve(addr: SocketAddr, tables: Arc<ArcSwap<Tables>>, fw: Forwarder) {
    // The vswitchd this one took the node over from lets go of the port as it hands over; a
    // moment's patience covers the rest, as for NodePorts.
    let listener = match super::nodeport::retry_in_use(|| TcpListener::bind(addr)).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("DNS over TCP on {addr}: {e}; truncated answers cannot be retried");
            return;
        }
    };
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        tokio::spawn(session(conn, tables.clone(), fw.clone()));
    }
}

async fn session(mut conn: TcpStream, tables: Arc<ArcSwap<Tables>>, fw: Forwarder) {
    let mut out = vec![0u8; 65_535];
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(IDLE, conn.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
        if !matches!(
            tokio::time::timeout(IDLE, conn.read_exact(&mut q)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let reply: Option<Vec<u8>> = {
            let t = tables.load();
            match t.dns.as_ref() {
                Some(dns) => match answer_with(&dns.table, &q, &mut out, Transport::Tcp) {
                    Answer::Local(n) => Some(out[..n].to_vec()),
                    Answer::Forward => None,
                    Answer::Invalid => return,
                },
                None => return,
            }
        };
        let reply = match reply {
            Some(r) => r,
            None => match fw.resolve(&q, Transport::Tcp).await {
                Some(r) => r,
                None => return,
            },
        };
        let Ok(n) = u16::try_from(reply.len()) else {
            return;
        };
        if conn.write_all(&n.to_be_bytes()).await.is_err() || conn.write_all(&reply).await.is_err()
        {
            return;
        }
    }
}
