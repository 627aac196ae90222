//! A minimal blocking HTTP/1.1 client for the admin unix socket.
//!
//! The CNI plugin runs once per pod operation and must start fast, so it does not pull in an
//! async runtime: one request, `Connection: close`, read to EOF. The daemon answers JSON with a
//! content length; chunked bodies are decoded too in case a proxy or a future server sends them.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::ApiError;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach vswitchd at {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to vswitchd at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("vswitchd sent a malformed response: {0}")]
    Protocol(String),
    #[error(transparent)]
    Api(#[from] ApiError),
}

pub struct Client {
    path: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(path: impl AsRef<Path>) -> Self {
        Client {
            path: path.as_ref().to_owned(),
            timeout: Duration::from_secs(60),
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R, ClientError> {
        self.request("GET", path, None)
    }

    pub fn delete<R: DeserializeOwned>(&self, path: &str) -> Result<R, ClientError> {
        self.request("DELETE", path, None)
    }

    pub fn post<Q: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &Q,
    ) -> Result<R, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.request("POST", path, Some(&body))
    }

    fn request<R: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<R, ClientError> {
        let (status, body) = self.raw(method, path, body)?;
        if (200..300).contains(&status) {
            serde_json::from_slice(&body)
                .map_err(|e| ClientError::Protocol(format!("bad JSON body: {e}")))
        } else {
            match serde_json::from_slice::<ApiError>(&body) {
                Ok(e) => Err(ClientError::Api(e)),
                Err(_) => Err(ClientError::Protocol(format!(
                    "HTTP {status}: {}",
                    String::from_utf8_lossy(&body)
                ))),
            }
        }
    }

    /// A connection to the daemon, every read and write bounded by the client's timeout.
    fn connect(&self) -> Result<UnixStream, ClientError> {
        let s = UnixStream::connect(&self.path).map_err(|source| ClientError::Connect {
            path: self.path.clone(),
            source,
        })?;
        s.set_read_timeout(Some(self.timeout))
            .and_then(|()| s.set_write_timeout(Some(self.timeout)))
            .map_err(|source| ClientError::Io {
                path: self.path.clone(),
                source,
            })?;
        Ok(s)
    }

    /// Sends one request and returns the status code and the (de-chunked) body.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let io = |source| ClientError::Io {
            path: self.path.clone(),
            source,
        };
        let mut s = self.connect()?;
        let body = body.unwrap_or(&[]);
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: vswitchd\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).map_err(io)?;
        s.write_all(body).map_err(io)?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).map_err(io)?;
        parse_response(&resp)
    }
}

impl Client {
    /// Sends a GET and returns once the response headers are in; the body is then read as it
    /// arrives (de-chunked) through [`Streaming`]'s `Read`. For endpoints whose body does not
    /// end by itself (a live capture). `read_timeout` bounds each read, so a caller can look
    /// up from a quiet stream now and then (a read that times out is `WouldBlock`/`TimedOut`
    /// and may be retried).
    pub fn stream(
        &self,
        path: &str,
        read_timeout: Option<Duration>,
    ) -> Result<Streaming, ClientError> {
        let io = |source| ClientError::Io {
            path: self.path.clone(),
            source,
        };
        let mut s = self.connect()?;
        let head = format!("GET {path} HTTP/1.1\r\nHost: vswitchd\r\nConnection: close\r\n\r\n");
        s.write_all(head.as_bytes()).map_err(io)?;
        let mut r = BufReader::new(s);
        let mut head = Vec::new();
        loop {
            let start = head.len();
            let n = r.read_until(b'\n', &mut head).map_err(io)?;
            if n == 0 {
                return Err(ClientError::Protocol(
                    "connection closed in the headers".into(),
                ));
            }
            if &head[start..] == b"\r\n" || &head[start..] == b"\n" {
                break;
            }
            if head.len() > 64 * 1024 {
                return Err(ClientError::Protocol("headers too long".into()));
            }
        }
        let text = String::from_utf8_lossy(&head).into_owned();
        let mut lines = text.lines();
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ClientError::Protocol("bad status line".into()))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let find = |k: &str| {
            headers
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
        };
        let chunked = find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        let length = find("content-length").and_then(|v| v.parse::<u64>().ok());
        r.get_ref().set_read_timeout(read_timeout).map_err(io)?;
        Ok(Streaming {
            r,
            status,
            headers,
            body: if chunked {
                Body::Chunked {
                    left: 0,
                    line: Vec::new(),
                }
            } else {
                Body::Plain { left: length }
            },
            done: false,
        })
    }
}

enum Body {
    /// `left` bytes of the current chunk to go; `line` a chunk-size line read so far.
    Chunked { left: u64, line: Vec<u8> },
    /// Up to the content length, or to EOF without one.
    Plain { left: Option<u64> },
}

/// A response being read as it arrives: `Read` yields the de-chunked body, then EOF.
pub struct Streaming {
    r: BufReader<UnixStream>,
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    body: Body,
    done: bool,
}

impl Streaming {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The error a non-2xx response carries (its JSON body read to the end).
    pub fn into_error(mut self) -> ClientError {
        let _ = self
            .r
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(10)));
        let mut body = Vec::new();
        if let Err(e) = self.read_to_end(&mut body) {
            return ClientError::Protocol(format!("HTTP {}: {e}", self.status));
        }
        match serde_json::from_slice::<ApiError>(&body) {
            Ok(e) => ClientError::Api(e),
            Err(_) => ClientError::Protocol(format!(
                "HTTP {}: {}",
                self.status,
                String::from_utf8_lossy(&body)
            )),
        }
    }
}

fn bad_data(m: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string())
}

impl Read for Streaming {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        match &mut self.body {
            Body::Plain { left } => {
                let want = match left {
                    Some(0) => {
                        self.done = true;
                        return Ok(0);
                    }
                    Some(n) => buf.len().min(usize::try_from(*n).unwrap_or(usize::MAX)),
                    None => buf.len(),
                };
                let n = self.r.read(&mut buf[..want])?;
                if n == 0 {
                    self.done = true;
                }
                if let Some(l) = left {
                    *l -= n as u64;
                }
                Ok(n)
            }
            Body::Chunked { left, line } => loop {
                if *left > 0 {
                    let want = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    let n = self.r.read(&mut buf[..want])?;
                    if n == 0 {
                        return Err(bad_data("connection closed inside a chunk"));
                    }
                    *left -= n as u64;
                    return Ok(n);
                }
                // The CRLF after a chunk's data, then the next size line; a partial line
                // survives a timed-out read in `line`.
                let n = self.r.read_until(b'\n', line)?;
                if n == 0 {
                    return Err(bad_data("connection closed between chunks"));
                }
                if !line.ends_with(b"\n") {
                    continue;
                }
                let text = String::from_utf8_lossy(line).trim().to_string();
                line.clear();
                if text.is_empty() {
                    continue;
                }
                let size = u64::from_str_radix(text.split(';').next().unwrap_or("").trim(), 16)
                    .map_err(|_| bad_data("bad chunk size"))?;
                if size == 0 {
                    self.done = true;
                    return Ok(0);
                }
                *left = size;
            },
        }
    }
}

fn parse_response(resp: &[u8]) -> Result<(u16, Vec<u8>), ClientError> {
    let bad = |m: &str| ClientError::Protocol(m.to_string());
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = std::str::from_utf8(&resp[..split]).map_err(|_| bad("headers are not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or_else(|| bad("empty response"))?;
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let mut chunked = false;
    let mut length = None;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else if k == "content-length" {
                length = v.parse::<usize>().ok();
            }
        }
    }
    let mut body = &resp[split + 4..];
    if chunked {
        let mut out = Vec::new();
        loop {
            let eol = body
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or_else(|| bad("truncated chunk"))?;
            let size_str = std::str::from_utf8(&body[..eol]).map_err(|_| bad("bad chunk size"))?;
            let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| bad("bad chunk size"))?;
            body = &body[eol + 2..];
            if size == 0 {
                break;
            }
            if body.len() < size {
                return Err(bad("truncated chunk"));
            }
            out.extend_from_slice(&body[..size]);
            body = body.get(size + 2..).unwrap_or(&[]);
        }
        Ok((status, out))
    } else {
        if let Some(n) = length {
            if body.len() < n {
                return Err(bad("truncated body"));
            }
            body = &body[..n];
        }
        Ok((status, body.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_a_chunked_body_as_it_arrives() {
        use std::os::unix::net::UnixListener;
        let path = std::env::temp_dir().join(format!("vswitch-client-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut req = [0u8; 1024];
            let _ = c.read(&mut req).unwrap();
            c.write_all(b"HTTP/1.1 200 OK\r\nx-capture-session: 7\r\ntransfer-encoding: chunked\r\n\r\n4\r\nabcd\r\n").unwrap();
            // The client sees the first chunk before the rest is even sent.
            std::thread::sleep(Duration::from_millis(300));
            c.write_all(b"3;ext=1\r\nefg\r\n0\r\n\r\n").unwrap();
        });
        let mut s = Client::new(&path)
            .stream("/v1/capture", Some(Duration::from_millis(100)))
            .unwrap();
        assert_eq!(s.status, 200);
        assert_eq!(s.header("X-Capture-Session"), Some("7"));
        let mut got = Vec::new();
        let mut buf = [0u8; 2];
        let mut timeouts = 0;
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    assert_eq!(got, b"abcd", "the first chunk came at once");
                    timeouts += 1;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, b"abcdefg");
        assert!(timeouts > 0);
        server.join().unwrap();
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn parses_plain_and_chunked() {
        let r = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(r).unwrap(), (200, b"{}".to_vec()));
        let r =
            b"HTTP/1.1 500 X\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(r).unwrap(), (500, b"abcde".to_vec()));
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n{}").is_err());
    }
}
