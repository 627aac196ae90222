//! The forwarder against fake upstreams on 127.0.0.1: a tokio UDP socket and a TCP listener
//! on the same port, answering with whatever each test scripts.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use simple_dns::rdata::{RData, A, SOA};
use simple_dns::{Name, Packet, PacketFlag, ResourceRecord, CLASS, RCODE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

use super::*;

/// Scripted replies: given the query bytes and whether it came over TCP, the datagrams (or
/// TCP messages) to send back, in order.
type Script = dyn Fn(&[u8], bool) -> Vec<Vec<u8>> + Send + Sync;

struct Upstream {
    addr: SocketAddr,
    udp: Arc<AtomicUsize>,
    tcp: Arc<AtomicUsize>,
    /// The last query seen, as received.
    last: Arc<std::sync::Mutex<Vec<u8>>>,
}

async fn upstream(
    script: impl Fn(&[u8], bool) -> Vec<Vec<u8>> + Send + Sync + 'static,
) -> Upstream {
    let script: Arc<Script> = Arc::new(script);
    // Bind UDP first, then TCP on the same port; another process may hold that TCP port.
    let (udp_sock, tcp_listener) = loop {
        let u = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        if let Ok(t) = TcpListener::bind(u.local_addr().unwrap()).await {
            break (u, t);
        }
    };
    let addr = udp_sock.local_addr().unwrap();
    let up = Upstream {
        addr,
        udp: Arc::default(),
        tcp: Arc::default(),
        last: Arc::default(),
    };
    let (count, last, s) = (up.udp.clone(), up.last.clone(), script.clone());
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        while let Ok((n, from)) = udp_sock.recv_from(&mut buf).await {
            count.fetch_add(1, Ordering::SeqCst);
            *last.lock().unwrap() = buf[..n].to_vec();
            for reply in s(&buf[..n], false) {
                let _ = udp_sock.send_to(&reply, from).await;
            }
        }
    });
    let (count, last, s) = (up.tcp.clone(), up.last.clone(), script);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = tcp_listener.accept().await {
            let (count, last, s) = (count.clone(), last.clone(), s.clone());
            tokio::spawn(async move {
                let Ok(n) = stream.read_u16().await else {
                    return;
                };
                let mut q = vec![0u8; usize::from(n)];
                if stream.read_exact(&mut q).await.is_err() {
                    return;
                }
                count.fetch_add(1, Ordering::SeqCst);
                *last.lock().unwrap() = q.clone();
                for reply in s(&q, true) {
                    let _ = stream.write_u16(reply.len() as u16).await;
                    let _ = stream.write_all(&reply).await;
                }
            });
        }
    });
    up
}

/// A UDP socket that takes queries and never answers. Keep it alive for the test.
async fn silent() -> (UdpSocket, SocketAddr) {
    let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let a = s.local_addr().unwrap();
    (s, a)
}

/// Builds a reply to `query` with simple-dns: same ID and question, then `fill`.
fn reply(query: &[u8], fill: impl FnOnce(&mut Packet<'_>)) -> Vec<u8> {
    let q = Packet::parse(query).unwrap();
    let mut r = Packet::new_reply(q.id());
    r.set_flags(PacketFlag::RECURSION_AVAILABLE | PacketFlag::RECURSION_DESIRED);
    r.questions = q.questions.clone();
    fill(&mut r);
    let mut bytes = r.build_bytes_vec().unwrap();
    if query[11] > 0 {
        // Echo an OPT (written by hand: simple-dns encodes the OPT TTL in the wrong bits).
        bytes[11] += 1;
        bytes.extend([0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
    }
    bytes
}

fn a_record(name: &str, ip: [u8; 4], ttl: u32) -> ResourceRecord<'_> {
    ResourceRecord::new(
        Name::new(name).unwrap(),
        CLASS::IN,
        ttl,
        RData::A(A::from(Ipv4Addr::from(ip))),
    )
}

fn soa_record(zone: &str, ttl: u32, minimum: u32) -> ResourceRecord<'_> {
    ResourceRecord::new(
        Name::new(zone).unwrap(),
        CLASS::IN,
        ttl,
        RData::SOA(SOA {
            mname: Name::new("ns1.example.com").unwrap(),
            rname: Name::new("hostmaster.example.com").unwrap(),
            serial: 1,
            refresh: 7200,
            retry: 900,
            expire: 86400,
            minimum,
        }),
    )
}

/// An A query like a stub resolver's, optionally with EDNS (size, DO).
fn query(id: u16, name: &str, edns: Option<(u16, bool)>) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend(id.to_be_bytes());
    m.extend([1, 0, 0, 1, 0, 0, 0, 0, 0, u8::from(edns.is_some())]);
    for l in name.split('.') {
        m.push(l.len() as u8);
        m.extend(l.as_bytes());
    }
    m.extend([0, 0, 1, 0, 1]);
    if let Some((size, dnssec_ok)) = edns {
        m.extend([0, 0, 41]);
        m.extend(size.to_be_bytes());
        m.extend([0, 0, if dnssec_ok { 0x80 } else { 0 }, 0, 0, 0]);
    }
    m
}

fn forwarder(upstreams: Vec<SocketAddr>) -> Forwarder {
    let mut config = ForwarderConfig::new(upstreams);
    config.timeout = Duration::from_millis(300);
    config.attempts = 1;
    Forwarder::new(config, tokio::runtime::Handle::current())
}

fn addrs(p: &Packet<'_>) -> Vec<Ipv4Addr> {
    p.answers
        .iter()
        .filter_map(|rr| match &rr.rdata {
            RData::A(a) => Some(Ipv4Addr::from(a.address)),
            _ => None,
        })
        .collect()
}

/// Every test runs under this bound, so a hang fails instead of stalling CI.
async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("test took too long");
}

#[tokio::test]
async fn forwards_restores_the_id_and_serves_repeats_from_the_cache() {
    bounded(async {
        let up = upstream(|q, _| {
            vec![reply(q, |r| {
                r.answers
                    .push(a_record("example.com", [93, 184, 216, 34], 60))
            })]
        })
        .await;
        let f = forwarder(vec![up.addr]);

        let first = f
            .resolve(&query(0x1111, "example.com", None), Transport::Udp)
            .await
            .unwrap();
        let p = Packet::parse(&first).unwrap();
        assert_eq!(p.id(), 0x1111);
        assert_eq!(addrs(&p), vec![Ipv4Addr::new(93, 184, 216, 34)]);
        assert_eq!(p.answers[0].ttl, 60);

        // Same name in another case, another ID: from the cache, in the client's spelling.
        let second = f
            .resolve(&query(0x2222, "EXAMPLE.com", None), Transport::Udp)
            .await
            .unwrap();
        let p = Packet::parse(&second).unwrap();
        assert_eq!(p.id(), 0x2222);
        assert_eq!(p.questions[0].qname.to_string(), "EXAMPLE.com");
        assert_eq!(addrs(&p), vec![Ipv4Addr::new(93, 184, 216, 34)]);
        assert!(p.answers[0].ttl <= 60);
        assert_eq!(up.udp.load(Ordering::SeqCst), 1);
        let s = f.stats();
        assert_eq!((s.queries, s.cache_hits, s.upstream_queries), (2, 1, 1));
    })
    .await;
}

#[tokio::test]
async fn truncated_udp_answers_are_retried_over_tcp() {
    bounded(async {
        let up = upstream(|q, tcp| {
            vec![reply(q, |r| {
                if tcp {
                    for i in 0..100u8 {
                        r.answers
                            .push(a_record("big.example.com", [10, 0, 0, i], 300));
                    }
                } else {
                    r.set_flags(PacketFlag::TRUNCATION);
                }
            })]
        })
        .await;
        let f = forwarder(vec![up.addr]);

        // Room for the whole answer: it arrives complete.
        let r = f
            .resolve(
                &query(7, "big.example.com", Some((4096, false))),
                Transport::Udp,
            )
            .await
            .unwrap();
        let p = Packet::parse(&r).unwrap();
        assert!(!p.has_flags(PacketFlag::TRUNCATION));
        assert_eq!(addrs(&p).len(), 100);
        assert_eq!(up.tcp.load(Ordering::SeqCst), 1);
        assert_eq!(f.stats().tcp_retries, 1);

        // No EDNS: 512 bytes, so the client is told to use TCP itself.
        let r = f
            .resolve(&query(8, "big.example.com", None), Transport::Udp)
            .await
            .unwrap();
        assert!(r.len() <= 512);
        let p = Packet::parse(&r).unwrap();
        assert_eq!(p.id(), 8);
        assert!(p.has_flags(PacketFlag::TRUNCATION));
        assert!(p.answers.is_empty());

        // Which it does, and then the cached full answer fits.
        let r = f
            .resolve(&query(9, "big.example.com", None), Transport::Tcp)
            .await
            .unwrap();
        assert_eq!(addrs(&Packet::parse(&r).unwrap()).len(), 100);
    })
    .await;
}

#[tokio::test]
async fn edns_passes_through_both_ways() {
    bounded(async {
        let up = upstream(|q, _| {
            vec![reply(q, |r| {
                r.answers.push(a_record("example.org", [1, 2, 3, 4], 60))
            })]
        })
        .await;
        let f = forwarder(vec![up.addr]);
        let q = query(0x3333, "example.org", Some((1400, true)));
        let r = f.resolve(&q, Transport::Udp).await.unwrap();
        // The upstream got the client's query byte for byte except the ID.
        let seen = up.last.lock().unwrap().clone();
        assert_eq!(seen[2..], q[2..]);
        let p = Packet::parse(&r).unwrap();
        assert_eq!(p.id(), 0x3333);
        assert!(p.opt().is_some());

        // DO and no-EDNS are cached apart: each asks upstream once.
        f.resolve(
            &query(1, "example.org", Some((1400, false))),
            Transport::Udp,
        )
        .await
        .unwrap();
        let r = f
            .resolve(&query(2, "example.org", None), Transport::Udp)
            .await
            .unwrap();
        assert!(Packet::parse(&r).unwrap().opt().is_none());
        assert_eq!(up.udp.load(Ordering::SeqCst), 3);
        f.resolve(&query(3, "example.org", Some((1400, true))), Transport::Udp)
            .await
            .unwrap();
        assert_eq!(up.udp.load(Ordering::SeqCst), 3);
    })
    .await;
}

#[tokio::test]
async fn cached_answers_expire_with_their_ttl() {
    bounded(async {
        let up = upstream(|q, _| {
            vec![reply(q, |r| {
                r.answers.push(a_record("short.example", [5, 5, 5, 5], 1))
            })]
        })
        .await;
        let f = forwarder(vec![up.addr]);
        let q = query(1, "short.example", None);
        f.resolve(&q, Transport::Udp).await.unwrap();
        f.resolve(&q, Transport::Udp).await.unwrap();
        assert_eq!(up.udp.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        f.resolve(&q, Transport::Udp).await.unwrap();
        assert_eq!(up.udp.load(Ordering::SeqCst), 2);
    })
    .await;
}

#[tokio::test]
async fn negative_answers_are_cached_for_the_soa_minimum_capped() {
    bounded(async {
        let up = upstream(|q, _| {
            vec![reply(q, |r| {
                *r.rcode_mut() = RCODE::NameError;
                r.name_servers.push(soa_record("example.net", 3600, 3600));
            })]
        })
        .await;
        let mut config = ForwarderConfig::new(vec![up.addr]);
        config.timeout = Duration::from_millis(300);
        config.max_negative_ttl = 1;
        let f = Forwarder::new(config, tokio::runtime::Handle::current());
        let q = query(1, "nope.example.net", None);
        let r = f.resolve(&q, Transport::Udp).await.unwrap();
        assert_eq!(Packet::parse(&r).unwrap().rcode(), RCODE::NameError);
        let r = f.resolve(&q, Transport::Udp).await.unwrap();
        let p = Packet::parse(&r).unwrap();
        assert_eq!(p.rcode(), RCODE::NameError);
        assert!(p.name_servers[0].ttl <= 1, "the SOA's TTL is capped too");
        assert_eq!(up.udp.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        f.resolve(&q, Transport::Udp).await.unwrap();
        assert_eq!(up.udp.load(Ordering::SeqCst), 2);
    })
    .await;
}

#[tokio::test]
async fn servfail_when_no_upstream_answers() {
    bounded(async {
        let (_hold, quiet) = silent().await;
        // A port nobody listens on: the kernel refuses at once.
        let closed = {
            let s = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            s.local_addr().unwrap()
        };
        let f = forwarder(vec![quiet, closed]);
        let started = Instant::now();
        let r = f
            .resolve(
                &query(0x5151, "example.com", Some((1232, false))),
                Transport::Udp,
            )
            .await
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(3));
        let p = Packet::parse(&r).unwrap();
        assert_eq!(p.id(), 0x5151);
        assert_eq!(p.rcode(), RCODE::ServerFailure);
        assert_eq!(p.questions.len(), 1);
        assert!(p.opt().is_some());
        let s = f.stats();
        assert_eq!((s.servfail, s.upstream_failures), (1, 2));
        assert_eq!(f.cache_len(), 0, "failures are not cached");
    })
    .await;
}

#[tokio::test]
async fn the_next_upstream_is_tried_after_a_timeout_or_servfail() {
    bounded(async {
        let (_hold, quiet) = silent().await;
        let broken =
            upstream(|q, _| vec![reply(q, |r| *r.rcode_mut() = RCODE::ServerFailure)]).await;
        let good = upstream(|q, _| {
            vec![reply(q, |r| {
                r.answers.push(a_record("example.com", [9, 9, 9, 9], 60))
            })]
        })
        .await;
        let f = forwarder(vec![quiet, broken.addr, good.addr]);
        let r = f
            .resolve(&query(1, "example.com", None), Transport::Udp)
            .await
            .unwrap();
        assert_eq!(
            addrs(&Packet::parse(&r).unwrap()),
            vec![Ipv4Addr::new(9, 9, 9, 9)]
        );
        assert_eq!(broken.udp.load(Ordering::SeqCst), 1);
    })
    .await;
}

#[tokio::test]
async fn replies_with_the_wrong_id_or_question_are_ignored() {
    bounded(async {
        let up = upstream(|q, _| {
            let mut spoofed = reply(q, |r| {
                r.answers.push(a_record("example.com", [6, 6, 6, 6], 60))
            });
            spoofed[0] ^= 0xff;
            let other = query(u16::from_be_bytes([q[0], q[1]]), "example.org", None);
            let mut wrong_question = reply(&other, |r| {
                r.answers.push(a_record("example.org", [7, 7, 7, 7], 60))
            });
            wrong_question[2] |= 0x80;
            let real = reply(q, |r| {
                r.answers.push(a_record("example.com", [1, 1, 1, 1], 60))
            });
            vec![spoofed, wrong_question, real]
        })
        .await;
        let f = forwarder(vec![up.addr]);
        let r = f
            .resolve(&query(1, "example.com", None), Transport::Udp)
            .await
            .unwrap();
        assert_eq!(
            addrs(&Packet::parse(&r).unwrap()),
            vec![Ipv4Addr::new(1, 1, 1, 1)]
        );
    })
    .await;
}

#[tokio::test]
async fn malformed_queries_are_dropped_or_formerr() {
    bounded(async {
        let f = forwarder(vec![]);
        assert!(f.resolve(&[1, 2, 3], Transport::Udp).await.is_none());
        let mut q = query(0x7777, "example.com", None);
        q[5] = 0; // no question
        let r = f.resolve(&q, Transport::Udp).await.unwrap();
        let p = Packet::parse(&r).unwrap();
        assert_eq!((p.id(), p.rcode()), (0x7777, RCODE::FormatError));
        assert_eq!(f.stats().malformed, 2);
    })
    .await;
}

#[test]
fn submit_replies_through_the_callback_from_a_plain_thread() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let up = rt.block_on(upstream(|q, _| {
        vec![reply(q, |r| {
            r.answers.push(a_record("example.com", [4, 4, 4, 4], 60))
        })]
    }));
    let f = {
        let _guard = rt.enter();
        forwarder(vec![up.addr])
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        f.submit(
            query(0x0a0a, "example.com", None),
            Transport::Udp,
            move |r| {
                let _ = tx.send(r);
            },
        );
    })
    .join()
    .unwrap();
    let r = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let p = Packet::parse(&r).unwrap();
    assert_eq!(p.id(), 0x0a0a);
    assert_eq!(addrs(&p), vec![Ipv4Addr::new(4, 4, 4, 4)]);
}

#[test]
fn resolv_conf_gives_upstreams_and_timing() {
    let c = ForwarderConfig::parse_resolv_conf(
        "# generated\n\
         search example.com\n\
         nameserver 192.0.2.1\n\
         nameserver 2001:db8::53 # v6\n\
         nameserver fe80::1%eth0\n\
         nameserver not-an-address\n\
         nameserver 192.0.2.1\n\
         nameserver 127.0.0.53\n\
         options ndots:2 timeout:3 attempts:9 rotate\n",
    );
    let want: Vec<SocketAddr> = ["192.0.2.1:53", "[2001:db8::53]:53", "127.0.0.53:53"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    assert_eq!(c.upstreams, want);
    assert_eq!(c.timeout, Duration::from_secs(3));
    assert_eq!(c.attempts, 5);

    let dir = std::env::temp_dir().join(format!("vswitch-dns-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let empty = dir.join("resolv.conf");
    std::fs::write(&empty, "search x\n").unwrap();
    let err = ForwarderConfig::from_resolv_conf(&empty).unwrap_err();
    assert!(matches!(err, DnsError::NoUpstreams { .. }), "{err}");
    let err = ForwarderConfig::from_resolv_conf(&dir.join("missing")).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
