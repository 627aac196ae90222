//! NetworkPolicy's cost in the pipeline: per-packet time of a new connection's first packet
//! (judged, then tracked) and of an established connection's packet (a conntrack hit), with no
//! policy, with 100 policies selecting both pods and with 1,000.
//!
//! `cargo bench -p vswitch --bench policy` (a plain harness: it prints its own table). The
//! packets go from a client pod to a server pod of the same node through the gateway (the
//! routed path), so the numbers are the pipeline's alone, without I/O.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use vswitch::control::policy::local_meta;
use vswitch::pipeline::tables::mac_for;
use vswitch::pipeline::{handle, Action, Conntrack, CtConfig, Ctx, Meta, PortEntry, Tables};
use vswitch::policy::selector::Interner;
use vswitch::policy::{Policy, PolicySet, PolicyTables};

const GW: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);

/// `n` policies that all select both pods: each admits the client to the server's port 80 and
/// the client's egress to the server, among other peers and ports that do not match, so a
/// verdict reads rules that fail before the one that admits.
fn policies(n: usize) -> Vec<Policy> {
    (0..n)
        .map(|i| {
            let spec = format!(
                r#"{{"metadata":{{"name":"p{i}","namespace":"default"}},"spec":{{
                "podSelector":{{"matchExpressions":[{{"key":"app","operator":"In","values":["web","client"]}}]}},
                "policyTypes":["Ingress","Egress"],
                "ingress":[{{"from":[{{"podSelector":{{"matchLabels":{{"team":"t{i}"}}}}}},
                                     {{"ipBlock":{{"cidr":"192.168.{}.0/24"}}}},
                                     {{"podSelector":{{"matchLabels":{{"app":"client"}}}}}}],
                             "ports":[{{"port":{}}},{{"port":80}}]}}],
                "egress":[{{"to":[{{"podSelector":{{"matchLabels":{{"app":"web"}}}}}}]}}]}}}}"#,
                i % 256,
                1000 + i % 60000
            );
            let np: NetworkPolicy = serde_json::from_str(&spec).expect("policy");
            Policy::from_k8s(&np, "default").expect("valid")
        })
        .collect()
}

fn tables(n: usize) -> Tables {
    let mut t = Tables::new("10.244.1.0/24".parse().expect("cidr"), GW, mac_for(GW)).with_ports([
        PortEntry {
            id: 1,
            mac: mac_for(CLIENT),
            ip: CLIENT,
        },
        PortEntry {
            id: 2,
            mac: mac_for(SERVER),
            ip: SERVER,
        },
    ]);
    if n > 0 {
        let mut labels = Interner::default();
        let mut meta = |app: &str| {
            let l = BTreeMap::from([("app".to_string(), app.to_string())]);
            local_meta(Some(&format!("default/{app}")), &l, &mut labels)
        };
        let (c, s) = (meta("client"), meta("web"));
        let set = Arc::new(PolicySet::new(policies(n), []));
        let pt = PolicyTables::new(set, []).with_local([
            (1, IpAddr::V4(CLIENT), Some(c)),
            (2, IpAddr::V4(SERVER), Some(s)),
        ]);
        t.policy = Some(Arc::new(pt));
    }
    t
}

fn segment(sport: u16, syn: bool) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2(mac_for(CLIENT).0, mac_for(GW).0)
        .ipv4(CLIENT.octets(), SERVER.octets(), 64)
        .tcp(sport, 80, 1, 64000);
    let b = if syn { b.syn() } else { b.ack(1) };
    let mut f = Vec::new();
    b.write(&mut f, &[]).expect("frame");
    f.resize(f.len() + 128, 0);
    f
}

/// ns per packet: first packets of `conns` new connections, then 10 packets of each.
fn measure(n: usize, conns: u16) -> (f64, f64) {
    let t = tables(n);
    let mut ct = Conntrack::new(CtConfig::default());
    let syns: Vec<Vec<u8>> = (0..conns).map(|i| segment(10_000 + i, true)).collect();
    let acks: Vec<Vec<u8>> = (0..conns).map(|i| segment(10_000 + i, false)).collect();
    let run = |ct: &mut Conntrack, frames: &[Vec<u8>], rounds: usize| {
        let mut buf = vec![0u8; 256];
        let start = Instant::now();
        for _ in 0..rounds {
            for f in frames {
                buf[..f.len()].copy_from_slice(f);
                let len = f.len() - 128;
                let mut cx = Ctx {
                    t: &t,
                    ct,
                    now_ms: 1,
                    trace: None,
                };
                let a = handle(&mut cx, 1, &mut buf, len, Meta::default());
                assert_eq!(a, Action::ToPort(2));
                black_box(a);
            }
        }
        start.elapsed().as_nanos() as f64 / (rounds * frames.len()) as f64
    };
    let new_ns = run(&mut ct, &syns, 1);
    let est_ns = run(&mut ct, &acks, 10);
    (new_ns, est_ns)
}

fn main() {
    println!(
        "{:>9} {:>16} {:>12} {:>18} {:>12}",
        "policies", "ns/new conn pkt", "vs none", "ns/established pkt", "vs none"
    );
    let conns = 20_000;
    let (base_new, base_est) = measure(0, conns);
    for n in [0usize, 100, 1_000] {
        let (new_ns, est_ns) = if n == 0 {
            (base_new, base_est)
        } else {
            measure(n, conns)
        };
        println!(
            "{n:>9} {new_ns:>16.0} {:>11.2}x {est_ns:>18.0} {:>11.2}x",
            base_new / new_ns,
            base_est / est_ns
        );
    }
}
