//! Forwarding names outside the cluster to the node's resolvers, with a cache.
//!
//! Runs on the control plane's tokio runtime; the datapath hands over a query and a callback
//! and never waits. Each upstream exchange uses its own ephemeral, connected UDP socket and a
//! fresh unpredictable ID, so replies cannot be confused between clients and an off-path
//! spoofer has to guess both port and ID; a reply whose ID or question does not match is
//! ignored, not accepted. The client's query bytes go upstream unchanged apart from the ID, so
//! EDNS0 (size, DO bit, options) passes through, and the reply's ID is set back to the
//! client's.
//!
//! A UDP reply with TC=1 is retried over TCP to the same upstream. If the full answer is then
//! larger than the client can take over UDP, the client gets TC=1 itself, as it would from
//! any resolver. Upstreams are tried in `resolv.conf` order, `attempts` rounds; a SERVFAIL or
//! REFUSED moves on to the next one, and when nothing useful comes back the client gets
//! SERVFAIL within `timeout * attempts * upstreams`. In-flight exchanges are bounded; past
//! the bound a query gets SERVFAIL at once rather than an unbounded pile of sockets.
//!
//! Loopback upstreams (systemd-resolved's 127.0.0.53, a local dnsmasq) are kept: vswitchd
//! runs in the node's network namespace, where they answer. A pod could not use them, which is
//! why kubelet skips them, but the pod never talks to them here, the switch does.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::runtime::Handle;
use tokio::sync::Semaphore;

use super::answer::Transport;
use super::cache::{Cache, CacheKey, TtlFields};
use super::message::{
    be16, be32, flags, parse_query, rcode, response_question, rtype, walk_response, Query,
    QueryError, Writer, HEADER_LEN, OPT_LEN, OWN_UDP_SIZE, PLAIN_UDP_LIMIT,
};
use super::DnsError;

/// Where the node's resolvers are listed.
pub const DEFAULT_RESOLV_CONF: &str = "/etc/resolv.conf";

/// How to reach the upstream resolvers and how much to remember.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwarderConfig {
    /// Tried in order.
    pub upstreams: Vec<SocketAddr>,
    /// Per exchange with one upstream (UDP, and TCP again if truncated).
    pub timeout: Duration,
    /// Rounds over all upstreams.
    pub attempts: u32,
    /// Cached responses, at most.
    pub cache_capacity: usize,
    /// Positive answers are cached for their smallest TTL, at most this long.
    pub max_positive_ttl: u32,
    /// NXDOMAIN and NODATA are cached for the SOA's negative TTL (RFC 2308 §5), at most this.
    pub max_negative_ttl: u32,
    /// Queries being forwarded at once, at most; the rest get SERVFAIL.
    pub max_in_flight: usize,
}

impl ForwarderConfig {
    /// Defaults like glibc's for timing (but 2 s, not 5 s, per try), 10 000 cached answers.
    pub fn new(upstreams: Vec<SocketAddr>) -> ForwarderConfig {
        ForwarderConfig {
            upstreams,
            timeout: Duration::from_secs(2),
            attempts: 2,
            cache_capacity: 10_000,
            max_positive_ttl: 3600,
            max_negative_ttl: 300,
            max_in_flight: 1024,
        }
    }

    /// Reads the `nameserver` lines and the `timeout:`/`attempts:` options of a resolv.conf.
    pub fn from_resolv_conf(path: &Path) -> Result<ForwarderConfig, DnsError> {
        let text = std::fs::read_to_string(path).map_err(|source| DnsError::ResolvConf {
            path: path.to_path_buf(),
            source,
        })?;
        let config = Self::parse_resolv_conf(&text);
        if config.upstreams.is_empty() {
            return Err(DnsError::NoUpstreams {
                path: path.to_path_buf(),
            });
        }
        Ok(config)
    }

    /// As [`Self::from_resolv_conf`], from text. Addresses with a zone (`fe80::1%eth0`) are
    /// skipped: a link-local upstream would need the interface index resolved here.
    pub fn parse_resolv_conf(text: &str) -> ForwarderConfig {
        let mut config = Self::new(Vec::new());
        for line in text.lines() {
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => {
                    if let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) {
                        let addr = SocketAddr::new(ip, 53);
                        if !config.upstreams.contains(&addr) {
                            config.upstreams.push(addr);
                        }
                    }
                }
                Some("options") => {
                    for opt in words {
                        // glibc's limits: timeout at most 30 s, attempts at most 5.
                        if let Some(v) = opt.strip_prefix("timeout:") {
                            if let Ok(s) = v.parse::<u64>() {
                                config.timeout = Duration::from_secs(s.clamp(1, 30));
                            }
                        } else if let Some(v) = opt.strip_prefix("attempts:") {
                            if let Ok(n) = v.parse::<u32>() {
                                config.attempts = n.clamp(1, 5);
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        config
    }
}

/// Counters of the forwarder, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ForwarderStats {
    pub queries: u64,
    pub cache_hits: u64,
    /// Exchanges started with an upstream (a TCP retry counts separately below).
    pub upstream_queries: u64,
    /// Timeouts, refused connections, unreadable replies.
    pub upstream_failures: u64,
    pub tcp_retries: u64,
    /// Clients answered SERVFAIL because no upstream answered.
    pub servfail: u64,
    /// Clients answered SERVFAIL because too many queries were in flight.
    pub overloaded: u64,
    /// Queries that could not be read (dropped, or answered FORMERR).
    pub malformed: u64,
}

#[derive(Default)]
struct Counters {
    queries: AtomicU64,
    cache_hits: AtomicU64,
    upstream_queries: AtomicU64,
    upstream_failures: AtomicU64,
    tcp_retries: AtomicU64,
    servfail: AtomicU64,
    overloaded: AtomicU64,
    malformed: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

struct Inner {
    config: ForwarderConfig,
    cache: Mutex<Cache>,
    in_flight: Semaphore,
    /// Keyed SipHash of a counter: unpredictable IDs without a random number crate.
    id_keys: RandomState,
    id_counter: AtomicU64,
    counters: Counters,
    runtime: Handle,
}

/// Forwards queries for names outside the cluster. Cheap to clone; clones share the cache.
#[derive(Clone)]
pub struct Forwarder {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("upstreams", &self.inner.config.upstreams)
            .finish_non_exhaustive()
    }
}

impl Forwarder {
    /// A forwarder whose exchanges run on `runtime` (so [`Forwarder::submit`] can be called
    /// from any thread).
    pub fn new(config: ForwarderConfig, runtime: Handle) -> Forwarder {
        Forwarder {
            inner: Arc::new(Inner {
                cache: Mutex::new(Cache::new(config.cache_capacity)),
                in_flight: Semaphore::new(config.max_in_flight.max(1)),
                id_keys: RandomState::new(),
                id_counter: AtomicU64::new(0),
                counters: Counters::default(),
                runtime,
                config,
            }),
        }
    }

    /// Resolves `query` in the background and calls `reply` with the response. `reply` is not
    /// called for something that is not a query (too short, or a response): it is dropped and
    /// counted as malformed.
    pub fn submit<F>(&self, query: Vec<u8>, transport: Transport, reply: F)
    where
        F: FnOnce(Vec<u8>) + Send + 'static,
    {
        let this = self.clone();
        self.inner.runtime.spawn(async move {
            if let Some(response) = this.resolve(&query, transport).await {
                reply(response);
            }
        });
    }

    /// The response to `query`: from the cache, from an upstream, or SERVFAIL. `None` for
    /// something that is not a query.
    pub async fn resolve(&self, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let c = &self.inner.counters;
        bump(&c.queries);
        let q = match parse_query(query) {
            Ok(q) => q,
            Err(QueryError::Unreadable) => {
                bump(&c.malformed);
                return None;
            }
            Err(QueryError::Format { id, flags: fl }) => {
                bump(&c.malformed);
                let mut out = [0u8; HEADER_LEN];
                let fl = flags::QR
                    | flags::RA
                    | (fl & (flags::OPCODE_MASK | flags::RD))
                    | u16::from(rcode::FORMERR);
                for (i, v) in [id, fl, 0, 0, 0, 0].into_iter().enumerate() {
                    out[2 * i..2 * i + 2].copy_from_slice(&v.to_be_bytes());
                }
                return Some(out.to_vec());
            }
        };
        let limit = match (transport, q.edns) {
            (Transport::Tcp, _) => usize::from(u16::MAX),
            (Transport::Udp, None) => PLAIN_UDP_LIMIT,
            (Transport::Udp, Some(e)) => usize::from(e.udp_size).max(PLAIN_UDP_LIMIT),
        };
        let key = CacheKey {
            name: q.qname.wire().into(),
            qtype: q.qtype,
            qclass: q.qclass,
            edns: q.edns.is_some(),
            dnssec_ok: q.edns.is_some_and(|e| e.dnssec_ok),
        };
        let cached = self.cache().get(&key, Instant::now());
        if let Some(mut msg) = cached {
            bump(&c.cache_hits);
            restore_client_view(&mut msg, &q);
            // Too big for this client: TC from the cache; its retry over TCP is served from
            // the cache too, so the upstream is not asked again.
            return Some(fit(msg, &q, limit));
        }

        let Ok(_permit) = self.inner.in_flight.try_acquire() else {
            bump(&c.overloaded);
            return Some(short_reply(&q, rcode::SERVFAIL, false));
        };
        let Some(mut msg) = self.exchange(query, &q).await else {
            bump(&c.servfail);
            return Some(short_reply(&q, rcode::SERVFAIL, false));
        };
        if let Some((ttls, ttl)) = cacheable(&msg, &self.inner.config) {
            self.cache().insert(key, &msg, ttls, ttl, Instant::now());
        }
        restore_client_view(&mut msg, &q);
        Some(fit(msg, &q, limit))
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ForwarderStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ForwarderStats {
            queries: get(&c.queries),
            cache_hits: get(&c.cache_hits),
            upstream_queries: get(&c.upstream_queries),
            upstream_failures: get(&c.upstream_failures),
            tcp_retries: get(&c.tcp_retries),
            servfail: get(&c.servfail),
            overloaded: get(&c.overloaded),
            malformed: get(&c.malformed),
        }
    }

    /// Cached responses right now.
    pub fn cache_len(&self) -> usize {
        self.cache().len()
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        // A panic while holding the lock leaves a cache that is still consistent (every
        // operation is a single map call), so poisoning is ignored.
        self.inner.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn next_id(&self) -> u16 {
        let n = self.inner.id_counter.fetch_add(1, Ordering::Relaxed);
        self.inner.id_keys.hash_one(n) as u16
    }

    /// Asks the upstreams in turn; returns the first useful response (ID still the
    /// upstream's), or the last poor one, or `None`.
    async fn exchange(&self, query: &[u8], q: &Query<'_>) -> Option<Vec<u8>> {
        let cfg = &self.inner.config;
        let c = &self.inner.counters;
        let mut msg = query.to_vec();
        let mut fallback = None;
        for _ in 0..cfg.attempts.max(1) {
            for &upstream in &cfg.upstreams {
                let id = self.next_id();
                msg[..2].copy_from_slice(&id.to_be_bytes());
                bump(&c.upstream_queries);
                let mut response = match udp_exchange(upstream, &msg, id, q, cfg.timeout).await {
                    Ok(r) => r,
                    Err(e) => {
                        bump(&c.upstream_failures);
                        tracing::debug!(%upstream, error = %e, "dns upstream over UDP failed");
                        continue;
                    }
                };
                if be16(&response, 2).is_some_and(|f| f & flags::TC != 0) {
                    bump(&c.tcp_retries);
                    match tcp_exchange(upstream, &msg, id, q, cfg.timeout).await {
                        Ok(r) => response = r,
                        Err(e) => {
                            bump(&c.upstream_failures);
                            tracing::debug!(%upstream, error = %e, "dns upstream over TCP failed");
                            fallback = Some(response);
                            continue;
                        }
                    }
                }
                let code = be16(&response, 2).map_or(0, |f| f as u8 & 0xf);
                if code == rcode::SERVFAIL || code == rcode::REFUSED {
                    fallback = Some(response);
                    continue;
                }
                return Some(response);
            }
        }
        fallback
    }
}

/// Whether `response` answers our query `id` for `q`.
fn answers(response: &[u8], id: u16, q: &Query<'_>) -> bool {
    let (Some(rid), Some(fl)) = (be16(response, 0), be16(response, 2)) else {
        return false;
    };
    if rid != id || fl & flags::QR == 0 || response.len() < HEADER_LEN {
        return false;
    }
    match response_question(response) {
        Ok(Some((name, t, c))) => name.wire() == q.qname.wire() && t == q.qtype && c == q.qclass,
        // Some servers send FORMERR/NOTIMP without the question.
        Ok(None) => fl & flags::RCODE_MASK != 0,
        Err(_) => false,
    }
}

async fn udp_exchange(
    upstream: SocketAddr,
    msg: &[u8],
    id: u16,
    q: &Query<'_>,
    timeout: Duration,
) -> io::Result<Vec<u8>> {
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let sock = UdpSocket::bind(local).await?;
    sock.connect(upstream).await?;
    sock.send(msg).await?;
    let mut buf = vec![0u8; usize::from(u16::MAX)];
    loop {
        let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no reply"))??;
        if answers(&buf[..n], id, q) {
            buf.truncate(n);
            return Ok(buf);
        }
        // Wrong ID or question: late, stray or spoofed. Keep waiting for ours.
    }
}

async fn tcp_exchange(
    upstream: SocketAddr,
    msg: &[u8],
    id: u16,
    q: &Query<'_>,
    timeout: Duration,
) -> io::Result<Vec<u8>> {
    let work = async {
        let mut stream = TcpStream::connect(upstream).await?;
        let len = u16::try_from(msg.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "query too long"))?;
        let mut framed = Vec::with_capacity(msg.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(msg);
        stream.write_all(&framed).await?;
        let n = usize::from(stream.read_u16().await?);
        let mut buf = vec![0u8; n];
        stream.read_exact(&mut buf).await?;
        if !answers(&buf, id, q) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "reply does not match the query",
            ));
        }
        Ok(buf)
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no reply"))?
}

/// Gives a response the client's ID and the client's spelling of the question.
fn restore_client_view(msg: &mut [u8], q: &Query<'_>) {
    if let Some(id) = msg.get_mut(..2) {
        id.copy_from_slice(&q.id.to_be_bytes());
    }
    let theirs = q.question;
    if be16(msg, 4) == Some(1) {
        if let Some(ours) = msg.get_mut(HEADER_LEN..HEADER_LEN + theirs.len()) {
            if ours.eq_ignore_ascii_case(theirs) {
                ours.copy_from_slice(theirs);
            }
        }
    }
}

/// Whether and how long to cache a response: the TTL field offsets (clamped to the entry's
/// lifetime) and the lifetime.
fn cacheable(msg: &[u8], cfg: &ForwarderConfig) -> Option<(TtlFields, Duration)> {
    let info = walk_response(msg).ok()?;
    if info.flags & flags::TC != 0 {
        return None;
    }
    let records = || info.records.iter().filter(|(_, r)| r.rtype != rtype::OPT);
    let ttl = match info.rcode() {
        rcode::NOERROR if info.answers > 0 => records()
            .map(|(_, r)| r.ttl)
            .min()?
            .min(cfg.max_positive_ttl),
        rcode::NOERROR | rcode::NXDOMAIN => {
            let (_, soa) = records().find(|(s, r)| *s == 2 && r.rtype == rtype::SOA)?;
            let minimum = be32(msg, soa.rdata.end.checked_sub(4)?)?;
            soa.ttl.min(minimum).min(cfg.max_negative_ttl)
        }
        _ => return None,
    };
    if ttl == 0 {
        return None;
    }
    let ttls = records()
        .filter_map(|(_, r)| Some((u16::try_from(r.ttl_at).ok()?, r.ttl.min(ttl))))
        .collect();
    Some((ttls, Duration::from_secs(u64::from(ttl))))
}

/// `msg` if it fits the client's `limit`, else a truncated reply with its rcode (TC set: the
/// client retries over TCP).
fn fit(msg: Vec<u8>, q: &Query<'_>, limit: usize) -> Vec<u8> {
    if msg.len() > limit {
        short_reply(q, be16(&msg, 2).map_or(0, |f| f as u8 & 0xf), true)
    } else {
        msg
    }
}

/// Header, question and (if the query had one) OPT: for SERVFAIL and truncated replies.
fn short_reply(q: &Query<'_>, code: u8, truncated: bool) -> Vec<u8> {
    let mut buf = vec![0u8; HEADER_LEN + q.question.len() + OPT_LEN];
    let mut w = Writer::new(&mut buf, usize::MAX);
    let mut fl = flags::QR
        | flags::RA
        | (q.flags & (flags::OPCODE_MASK | flags::RD | flags::CD))
        | u16::from(code & 0xf);
    if truncated {
        fl |= flags::TC;
    }
    let ar = u16::from(q.edns.is_some());
    // The buffer is sized for exactly this, so the writes cannot fail.
    let _ = [q.id, fl, 1, 0, 0, ar]
        .into_iter()
        .try_for_each(|v| w.put_u16(v));
    let _ = w.put(q.question);
    if let Some(e) = q.edns {
        let ttl = if e.dnssec_ok { 0x8000 } else { 0 };
        let _ = w
            .put(&[0])
            .and_then(|_| w.record_head(rtype::OPT, OWN_UDP_SIZE, ttl));
    }
    let n = w.len();
    buf.truncate(n);
    buf
}
