//! Capture filter cost per packet: the hand-written filter this switch had (`legacy`, a tree
//! over a parsed header summary) against libpcap's compiler and BPF interpreter (the filter
//! now), on the same frames and expressions.
//!
//! `cargo bench -p vswitch --bench capture_filter` (a plain harness: it prints its own table).
//! Each row runs the filter over a mix of frames (TCP to port 80, DNS over UDP, ICMP, ARP) the
//! way the datapath does: the frame in place, nothing copied. The machine is noisy: compare
//! the columns of one run, never times across runs.

#[path = "capture_filter/legacy.rs"]
mod legacy;

use std::hint::black_box;
use std::time::Instant;

use etherparse::PacketBuilder;
use vswitch::capture::Filter;

const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];

fn frames() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .tcp(40000, 80, 1, 64240)
        .write(&mut v, &[0u8; 1400])
        .unwrap();
    out.push(v);
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4([10, 0, 0, 3], [10, 0, 0, 1], 64)
        .udp(5353, 53)
        .write(&mut v, &[0u8; 40])
        .unwrap();
    out.push(v);
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4([10, 0, 0, 2], [10, 0, 0, 4], 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut v, &[0u8; 56])
        .unwrap();
    out.push(v);
    let mut v = vec![0u8; 42];
    v[0..6].copy_from_slice(&[0xff; 6]);
    v[6..12].copy_from_slice(&MAC_A);
    v[12..14].copy_from_slice(&[0x08, 0x06]);
    v[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    v[28..32].copy_from_slice(&[10, 0, 0, 1]);
    v[38..42].copy_from_slice(&[10, 0, 0, 9]);
    out.push(v);
    out
}

/// Nanoseconds per frame, the best of a few rounds.
fn per_frame(frames: &[Vec<u8>], f: impl Fn(&[u8]) -> bool) -> f64 {
    const ROUNDS: usize = 7;
    const PER_ROUND: usize = 500_000;
    let mut best = f64::MAX;
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let mut hits = 0u32;
        for i in 0..PER_ROUND {
            hits += u32::from(f(black_box(&frames[i % frames.len()])));
        }
        black_box(hits);
        best = best.min(t.elapsed().as_nanos() as f64 / PER_ROUND as f64);
    }
    best
}

fn main() {
    let frames = frames();
    let exprs = [
        "tcp port 80",
        "host 10.0.0.1 and udp",
        "host 192.168.9.9 or port 9999",
        "not arp and (tcp dst port 80 or udp port 53)",
        "tcp[13] & 2 != 0",
    ];
    println!(
        "{:<46} {:>8} {:>10} {:>11} {:>6}",
        "filter (4 frames in turn)", "matches", "legacy ns", "libpcap ns", "ratio"
    );
    for e in exprs {
        let new = Filter::parse(e).unwrap_or_else(|err| panic!("{err}"));
        let hits = frames.iter().filter(|f| new.matches(f)).count();
        let old = legacy::Filter::parse(e).ok();
        if let Some(old) = &old {
            let old_hits = frames.iter().filter(|f| old.matches(f)).count();
            assert_eq!(old_hits, hits, "{e}: the two filters disagree");
        }
        let t_new = per_frame(&frames, |f| new.matches(f));
        let (t_old, ratio) = match &old {
            Some(old) => {
                let t = per_frame(&frames, |f| old.matches(f));
                (format!("{t:.1}"), format!("{:.2}", t_new / t))
            }
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<46} {:>8} {:>10} {:>11.1} {:>6}",
            e,
            format!("{hits}/{}", frames.len()),
            t_old,
            t_new,
            ratio
        );
    }
}
