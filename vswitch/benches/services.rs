//! Service translation cost: per-packet time through the pipeline with 1 and with 10,000
//! Services of 10 endpoints each, and the memory and build time of the 10,000-Service table.
//!
//! `cargo bench -p vswitch --bench services` (a plain harness: it prints its own table).
//! Every case carries the same traffic: 200,000 connections from 16 pods, each a distinct
//! (client, source port), so that the connection tracking table is the same size in each and
//! the difference between them is the Service table's alone. The cases: one Service; 10,000
//! with the connections spread over all of them (each to a Service drawn at random, so each
//! lookup's entries are cold, and the order of the frontends in memory gives the CPU's
//! prefetchers no stride to follow, as a cluster's traffic would not);
//! the same table with the connections spread over 100 of them (a cluster's traffic mostly
//! goes to a few Services). Each round sends every connection's SYN (the Service lookup, the
//! backend choice: rendezvous hashing over 10 endpoints; a conntrack insert and the rewrite),
//! then an ACK of each (established: a conntrack hit and the rewrite), then the ACKs through
//! a second worker's view of a shared table, the connections opened through the first (its
//! first lookup applies every announcement at once, so the column includes the cost of
//! replicating the index, once per connection). The cases' rounds alternate, and each figure
//! is the best of 15 rounds; then each case against the one-Service case round by round (the
//! median and quartiles of the rounds' ratios). Last, the cost of one endpoint change among
//! 10,000 Services (`ServiceTable::rebuild_shared`, which shares the unchanged Services'
//! frontends) against a full build.

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::Instant;

use conf::config::LoadBalancing;
use vswitch::pipeline::tables::mac_for;
use vswitch::pipeline::{
    handle, prefetch, Action, Conntrack, CtConfig, Ctx, Meta, PortEntry, ServiceTable, Tables,
};
use vswitch::testutil::{many_services, many_services_vip};

/// The pods the connections come from, on ports 1..=CLIENTS.
const CLIENTS: usize = 16;

fn client(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1, 2 + i as u8)
}

/// A client's segment to `vip`: its SYN, or (`syn` false) an ACK of the connection it opened.
fn segment(client: Ipv4Addr, sport: u16, vip: Ipv4Addr, syn: bool) -> Vec<u8> {
    let gw = Ipv4Addr::new(10, 244, 1, 1);
    let b = etherparse::PacketBuilder::ethernet2(mac_for(client).0, mac_for(gw).0)
        .ipv4(client.octets(), vip.octets(), 64)
        .tcp(sport, 80, 1, 64000);
    let b = if syn { b.syn() } else { b.ack(1) };
    let mut f = Vec::new();
    b.write(&mut f, &[]).expect("frame");
    f.resize(f.len() + 128, 0);
    f
}

/// Connection `i`'s Service among `to`: a hash of `i` (the SplitMix64 finalizer), so that
/// consecutive connections go to Services far apart in memory.
fn drawn(i: usize, to: usize) -> usize {
    let mut z = (i as u64)
        .wrapping_add(1)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    ((z ^ (z >> 31)) % to as u64) as usize
}

/// One case: the table of `n` Services and the frames of its connections.
struct Case {
    n: usize,
    /// How many of the Services the connections go to.
    to: usize,
    tables: Tables,
    /// Each connection's SYN, and an ACK of it.
    syns: Vec<(u32, Vec<u8>)>,
    acks: Vec<(u32, Vec<u8>)>,
    build_ms: f64,
    mem_kib: u64,
}

impl Case {
    fn new(n_services: usize, to: usize) -> Case {
        let specs = many_services(n_services);
        let t0 = Instant::now();
        let table = ServiceTable::build(&specs, "n1", LoadBalancing::Maglev);
        let build_ms = t0.elapsed().as_secs_f64() * 1e3;
        let mem_kib = (table.heap_bytes() / 1024) as u64;
        let gw = Ipv4Addr::new(10, 244, 1, 1);
        let tables = Tables::new("10.244.1.0/24".parse().expect("cidr"), gw, mac_for(gw))
            .with_ports((0..CLIENTS).map(|c| PortEntry {
                id: 1 + c as u32,
                mac: mac_for(client(c)),
                ip: client(c),
            }))
            .with_services(table);
        // Connection i: from pod i % CLIENTS, source port 1024 + i / CLIENTS (so every one is
        // distinct whatever the number of Services), to a Service drawn at random among `to`
        // (the same one in every round and every run).
        let frames = |syn: bool| {
            (0..CONNECTIONS)
                .map(|i| {
                    let c = i % CLIENTS;
                    let vip = many_services_vip(drawn(i, to));
                    let sport = 1024 + (i / CLIENTS) as u16;
                    (1 + c as u32, segment(client(c), sport, vip, syn))
                })
                .collect()
        };
        Case {
            n: n_services,
            to,
            tables,
            syns: frames(true),
            acks: frames(false),
            build_ms,
            mem_kib,
        }
    }

    /// Every frame once through the pipeline with `ct`: ns per packet. As a worker does, each
    /// frame is looked at (`pipeline::prefetch`) before the one before it is handled.
    fn run(&self, frames: &[(u32, Vec<u8>)], ct: &mut Conntrack) -> f64 {
        let mut work = frames.to_vec();
        let t = Instant::now();
        if let Some((_, f)) = work.first() {
            prefetch(&self.tables, &f[..f.len() - 128]);
        }
        for i in 0..work.len() {
            if let Some((_, next)) = work.get(i + 1) {
                prefetch(&self.tables, &next[..next.len() - 128]);
            }
            let (port, f) = &mut work[i];
            let len = f.len() - 128;
            let mut cx = Ctx {
                t: &self.tables,
                ct: &mut *ct,
                now_ms: 1,
                trace: None,
            };
            let a = handle(&mut cx, *port, f, len, Meta::default());
            black_box(&a);
            debug_assert!(!matches!(a, Action::Drop(_)), "{a:?}");
        }
        t.elapsed().as_nanos() as f64 / frames.len() as f64
    }

    /// One round: new connections, the same again established, and established through a
    /// second worker's view (connections opened through the first).
    fn round(&self) -> [f64; 3] {
        let cfg = CtConfig {
            max: 1 << 20,
            ..CtConfig::default()
        };
        let mut ct = Conntrack::new(cfg);
        let new_ns = self.run(&self.syns, &mut ct);
        let est_ns = self.run(&self.acks, &mut ct);
        drop(ct);
        let mut group = Conntrack::group(cfg, 2);
        let mut other = group.pop().expect("view 1");
        let mut first = group.pop().expect("view 0");
        self.run(&self.syns, &mut first);
        let other_ns = self.run(&self.acks, &mut other);
        [new_ns, est_ns, other_ns]
    }
}

const CONNECTIONS: usize = 200_000;
const ROUNDS: usize = 15;

/// The least disturbed of the rounds: on a shared machine the others carry whatever else ran.
fn best(v: impl Iterator<Item = f64>) -> f64 {
    v.fold(f64::INFINITY, f64::min)
}

fn main() {
    // The cases' rounds alternate, so that whatever else the machine does weighs on all.
    // The third case has the same table as the second and sends to 100 of its Services, as a
    // cluster's traffic mostly goes to a few (DNS, the API server, its busiest Services).
    let cases = [
        Case::new(1, 1),
        Case::new(10_000, 10_000),
        Case::new(10_000, 100),
    ];
    let mut samples = vec![Vec::new(); cases.len()];
    for _ in 0..ROUNDS {
        for (c, s) in cases.iter().zip(samples.iter_mut()) {
            s.push(c.round());
        }
    }
    println!(
        "{:>9} {:>11} {:>22} {:>22} {:>22} {:>9} {:>10}",
        "services",
        "traffic to",
        "ns/new conn pkt",
        "ns/established pkt",
        "ns/est pkt, 2nd worker",
        "build ms",
        "table MiB"
    );
    let bests: Vec<Vec<f64>> = samples
        .iter()
        .map(|s| (0..3).map(|k| best(s.iter().map(|r| r[k]))).collect())
        .collect();
    for (c, m) in cases.iter().zip(&bests) {
        // Each column with how far it is over the one-Service case.
        let cell = |k: usize| {
            if c.n == 1 {
                format!("{:.0}", m[k])
            } else {
                format!("{:.0} ({:+.0}%)", m[k], (m[k] / bests[0][k] - 1.0) * 100.0)
            }
        };
        println!(
            "{:>9} {:>11} {:>22} {:>22} {:>22} {:>9.1} {:>10.1}",
            c.n,
            c.to,
            cell(0),
            cell(1),
            cell(2),
            c.build_ms,
            c.mem_kib as f64 / 1024.0
        );
    }
    println!(
        "(each the best of {ROUNDS} rounds of {CONNECTIONS} connections from {CLIENTS} pods, \
         the cases alternating; in parentheses, over the one-Service case)"
    );
    // The same comparison round by round: each round's case against the one-Service case of
    // the same round, which ran just before it, so that a change of the machine's speed
    // between rounds (a quarter, on a shared machine) weighs on both sides of each ratio.
    println!(
        "over the one-Service case, round by round (median, and the middle half of the rounds):"
    );
    for (c, s) in cases.iter().zip(&samples).skip(1) {
        let ratio = |k: usize| {
            let mut r: Vec<f64> = s
                .iter()
                .zip(&samples[0])
                .map(|(x, one)| (x[k] / one[k] - 1.0) * 100.0)
                .collect();
            r.sort_by(f64::total_cmp);
            let at = |q: usize| r[(r.len() - 1) * q / 4];
            format!("{:+.0}% ({:+.0} to {:+.0})", at(2), at(1), at(3))
        };
        println!(
            "{:>9} {:>11} {:>22} {:>22} {:>22}",
            c.n,
            c.to,
            ratio(0),
            ratio(1),
            ratio(2)
        );
    }
    changes(10_000);
}

/// One endpoint change among `n` Services, as the Kubernetes watch hands it over: the same
/// `Arc` for every Service but the changed one (`ServiceTable::rebuild_shared`, which shares
/// the unchanged Services' frontends); what it costs, against a full build.
fn changes(n: usize) {
    let mut specs: Vec<std::sync::Arc<_>> = many_services(n)
        .into_iter()
        .map(std::sync::Arc::new)
        .collect();
    let table = ServiceTable::default().rebuild_shared(&specs, "n1", None, LoadBalancing::Maglev);
    let rounds = 50;
    let mut rebuild = Vec::with_capacity(rounds);
    let mut current = table.clone();
    for r in 0..rounds {
        // Endpoint 0 of Service r goes, as an EndpointSlice update would.
        let mut changed = (*specs[r * 97 % n]).clone();
        changed.endpoints.rotate_left(1);
        changed.endpoints.pop();
        specs[r * 97 % n] = std::sync::Arc::new(changed);
        let t = Instant::now();
        let next = current.rebuild_shared(&specs, "n1", None, LoadBalancing::Maglev);
        rebuild.push(t.elapsed().as_secs_f64() * 1e3);
        current = black_box(next);
    }
    let specs: Vec<_> = specs.iter().map(|s| (**s).clone()).collect();
    rebuild.sort_by(f64::total_cmp);
    let t = Instant::now();
    black_box(ServiceTable::build(&specs, "n1", LoadBalancing::Maglev));
    let full = t.elapsed().as_secs_f64() * 1e3;
    let now: std::collections::HashSet<*const _> = current
        .frontends()
        .iter()
        .map(std::sync::Arc::as_ptr)
        .collect();
    let shared = table
        .frontends()
        .iter()
        .filter(|f| now.contains(&std::sync::Arc::as_ptr(f)))
        .count();
    println!(
        "\none endpoint change among {n} Services ({rounds} changes): rebuild median {:.2} ms, \
         p99 {:.2} ms; a full build {full:.1} ms; after them {shared} of {} frontends are still \
         the first table's objects",
        rebuild[rounds / 2],
        rebuild[rounds * 99 / 100],
        table.frontends().len()
    );
}
