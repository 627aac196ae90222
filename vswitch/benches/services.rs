//! Service translation cost: per-packet time through the pipeline with 1 and with 10,000
//! Services of 10 endpoints each, and the memory and build time of the 10,000-Service table.
//!
//! `cargo bench -p vswitch --bench services` (a plain harness: it prints its own table).
//! Every packet is the first of a new connection (a SYN from a new source port), so each one
//! pays the Service lookup, the Maglev choice, a conntrack insert and the rewrite; a second run
//! sends packets of established connections (conntrack hit + rewrite), and a third sends them
//! through a second worker's view of a shared table, the connections opened through the first:
//! its first lookup applies every announcement at once, so the column includes the cost of
//! replicating the index, once per connection. Last, the cost of one endpoint change among
//! 10,000 Services (`ServiceTable::rebuild_shared`, which shares the unchanged Services' frontends)
//! against a full build.

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::Instant;

use conf::config::LoadBalancing;
use vswitch::pipeline::tables::mac_for;
use vswitch::pipeline::{
    handle, Action, Conntrack, CtConfig, Ctx, Meta, PortEntry, ServiceTable, Tables,
};
use vswitch::testutil::{many_services, many_services_vip};

fn syn(sport: u16, vip: Ipv4Addr) -> Vec<u8> {
    let client = Ipv4Addr::new(10, 244, 1, 2);
    let gw = Ipv4Addr::new(10, 244, 1, 1);
    let b = etherparse::PacketBuilder::ethernet2(mac_for(client).0, mac_for(gw).0)
        .ipv4(client.octets(), vip.octets(), 64)
        .tcp(sport, 80, 1, 64000)
        .syn();
    let mut f = Vec::new();
    b.write(&mut f, &[]).expect("frame");
    f.resize(f.len() + 128, 0);
    f
}

fn measure(n_services: usize) -> (f64, f64, f64, f64, u64) {
    let specs = many_services(n_services);
    let t0 = Instant::now();
    let table = ServiceTable::build(&specs, "n1", LoadBalancing::Maglev);
    let build_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mem_kib = (table.heap_bytes() / 1024) as u64;
    let gw = Ipv4Addr::new(10, 244, 1, 1);
    let tables = Tables::new("10.244.1.0/24".parse().expect("cidr"), gw, mac_for(gw))
        .with_ports([PortEntry {
            id: 1,
            mac: mac_for(Ipv4Addr::new(10, 244, 1, 2)),
            ip: Ipv4Addr::new(10, 244, 1, 2),
        }])
        .with_services(table);
    let packets = 200_000usize;
    let frames: Vec<Vec<u8>> = (0..packets)
        .map(|i| {
            let vip = many_services_vip(i % n_services);
            syn(1024 + (i / n_services % 60_000) as u16, vip)
        })
        .collect();
    let mut ct = Conntrack::new(CtConfig {
        max: 1 << 20,
        ..CtConfig::default()
    });
    let run = |frames: &[Vec<u8>], ct: &mut Conntrack| {
        let mut work = frames.to_vec();
        let t = Instant::now();
        for f in work.iter_mut() {
            let len = f.len() - 128;
            let mut cx = Ctx {
                t: &tables,
                ct: &mut *ct,
                now_ms: 1,
                trace: None,
            };
            let a = handle(&mut cx, 1, f, len, Meta::default());
            black_box(&a);
            debug_assert!(!matches!(a, Action::Drop(_)), "{a:?}");
        }
        t.elapsed().as_nanos() as f64 / frames.len() as f64
    };
    let new_ns = run(&frames, &mut ct);
    let est_ns = run(&frames, &mut ct);
    // Two workers sharing the table: connections opened through one, their later packets read
    // by the other.
    let mut group = Conntrack::group(
        CtConfig {
            max: 1 << 20,
            ..CtConfig::default()
        },
        2,
    );
    let mut other = group.pop().expect("view 1");
    let mut first = group.pop().expect("view 0");
    run(&frames, &mut first);
    let other_ns = run(&frames, &mut other);
    (new_ns, est_ns, other_ns, build_ms, mem_kib)
}

fn main() {
    println!(
        "{:>9} {:>16} {:>18} {:>22} {:>14} {:>14}",
        "services",
        "ns/new conn pkt",
        "ns/established pkt",
        "ns/est pkt, 2nd worker",
        "build ms",
        "table MiB"
    );
    for n in [1usize, 10_000] {
        let (new_ns, est_ns, other_ns, build_ms, mem) = measure(n);
        println!(
            "{n:>9} {new_ns:>16.0} {est_ns:>18.0} {other_ns:>22.0} {build_ms:>14.1} {:>14.1}",
            mem as f64 / 1024.0
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
