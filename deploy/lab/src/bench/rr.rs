//! Request/response: the hidden `rr-server` and `rr-client` subcommands, which run in the pods.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use crate::LabError;
use serde_json::{json, Value};

/// What `rr-client` prints (as JSON on one line).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RrResult {
    pub transactions: u64,
    pub seconds: f64,
}

impl RrResult {
    pub fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.transactions as f64 / self.seconds
        } else {
            0.0
        }
    }

    pub fn to_json(&self) -> String {
        json!({ "transactions": self.transactions, "seconds": self.seconds, "rate": self.rate() })
            .to_string()
    }

    pub fn from_json(text: &str) -> Result<RrResult, LabError> {
        let v: Value = serde_json::from_str(text.trim()).map_err(|e| {
            LabError::BadOutput(format!("rr-client printed {:?}: {e}", text.trim()))
        })?;
        Ok(RrResult {
            transactions: v["transactions"]
                .as_u64()
                .ok_or_else(|| LabError::BadOutput("rr-client JSON has no transactions".into()))?,
            seconds: v["seconds"]
                .as_f64()
                .ok_or_else(|| LabError::BadOutput("rr-client JSON has no seconds".into()))?,
        })
    }
}

/// Serves one connection on `listener`: echoes each byte back until the client closes.
/// Gives up (Ok) after `timeout` without a client; the process is expected to be short-lived.
pub fn rr_serve(listener: TcpListener, timeout: Duration) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let (mut s, _) = loop {
        match listener.accept() {
            Ok(c) => break c,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Ok(());
                }
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    };
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => return Ok(()),
            Ok(_) => s.write_all(&b)?,
            Err(e) => return Err(e),
        }
    }
}

/// `rr-server`: listen on `bind`, serve one client, exit; never longer than `timeout` idle.
pub fn rr_server(bind: SocketAddr, timeout: Duration) -> io::Result<()> {
    rr_serve(TcpListener::bind(bind)?, timeout)
}

/// `rr-client`: one connection, 1-byte request and 1-byte response, as many as fit in
/// `duration`.
pub fn rr_client(addr: SocketAddr, duration: Duration) -> io::Result<RrResult> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let start = Instant::now();
    let mut n = 0u64;
    let mut b = [0u8; 1];
    while start.elapsed() < duration {
        s.write_all(b"x")?;
        s.read_exact(&mut b)?;
        n += 1;
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(RrResult {
        transactions: n,
        seconds,
    })
}

/// Serves a connection per transaction on `listener` (TCP_CRR): for each client, reads the
/// 1-byte request, writes the response and closes first, so the TIME_WAITs stay here and the
/// client never runs out of ports. Returns (Ok) once `timeout` passes without a client.
pub fn crr_serve(listener: TcpListener, timeout: Duration) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let mut idle_since = Instant::now();
    let mut b = [0u8; 1];
    loop {
        match listener.accept() {
            Ok((mut s, _)) => {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                // A client that went away mid-transaction costs its own transaction only.
                if matches!(s.read(&mut b), Ok(1)) {
                    let _ = s.write_all(&b);
                }
                idle_since = Instant::now();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if idle_since.elapsed() >= timeout {
                    return Ok(());
                }
                thread::sleep(Duration::from_micros(200));
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
            Err(e) => return Err(e),
        }
    }
}

/// `rr-server --each`: listen on `bind`, a connection per transaction, until idle `timeout`.
pub fn crr_server(bind: SocketAddr, timeout: Duration) -> io::Result<()> {
    crr_serve(TcpListener::bind(bind)?, timeout)
}

/// `rr-client --each`: a new connection per transaction (connect, 1-byte request, 1-byte
/// response, the server's close), as many as fit in `duration`: new connections per second,
/// where each one's first packets meet connection tracking and policy.
pub fn crr_client(addr: SocketAddr, duration: Duration) -> io::Result<RrResult> {
    let start = Instant::now();
    let mut n = 0u64;
    let mut b = [0u8; 1];
    while start.elapsed() < duration {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"x")?;
        s.read_exact(&mut b)?;
        // Waits for the server's FIN, so the next connect does not race this one's close.
        let _ = s.read(&mut b);
        n += 1;
    }
    Ok(RrResult {
        transactions: n,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rr_client_and_server_ping_pong_over_loopback() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = thread::spawn(move || rr_serve(l, Duration::from_secs(10)));
        let r = rr_client(addr, Duration::from_millis(200)).unwrap();
        assert!(r.transactions > 10, "{r:?}");
        assert!(r.seconds >= 0.2);
        server.join().unwrap().unwrap();
        let back = RrResult::from_json(&r.to_json()).unwrap();
        assert_eq!(back.transactions, r.transactions);
        assert!(RrResult::from_json("oops").is_err());
    }

    #[test]
    fn rr_server_gives_up_without_a_client() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let t = Instant::now();
        rr_serve(l, Duration::from_millis(100)).unwrap();
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn crr_client_opens_a_connection_per_transaction() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = thread::spawn(move || crr_serve(l, Duration::from_millis(500)));
        let r = crr_client(addr, Duration::from_millis(200)).unwrap();
        assert!(r.transactions > 10, "{r:?}");
        server.join().unwrap().unwrap();
        // The server is gone: a client now fails rather than reporting a rate.
        assert!(crr_client(addr, Duration::from_millis(50)).is_err());
    }
}
