//! End-to-end tests of the VXLAN overlay (issue 3): pods on different nodes of a lab (real
//! vswitchd per node, pods attached by the real CNI plugin, nodes joined by a kernel bridge as
//! the "LAN") exchange ping, TCP and UDP; peers are removed and re-added at runtime; packets too
//! big for the path get ICMP fragmentation-needed; a capture of the underlay decodes as VXLAN in
//! tshark; VXLAN from a host that is not a peer is dropped and counted.
//!
//! Needs root, iproute2, ping, iperf3, socat, tcpdump and tshark. Each test builds its own lab
//! with a unique name and tears it down on drop, also when it fails.

mod overlay_support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use overlay_support::*;
use vswitch_lab::Node;

const VXLAN_PORT: u16 = 8472;

/// No VXLAN datagram a node received was refused (unknown peer, bad header, ...).
fn assert_no_vxlan_drops(n: &Node) {
    let drops = underlay_drops(n);
    assert!(
        drops.keys().all(|k| !k.starts_with("vxlan_")),
        "{}: underlay drops {drops:?}",
        n.name
    );
}

// ---------------------------------------------------------------------------------------------
// 1. Pods on three nodes.

#[test]
fn pods_on_three_nodes_exchange_ping_tcp_and_udp() {
    let started = Instant::now();
    let lab = lab("ov", 3, 2);

    // Every ordered pair of nodes, both pods of each, at once.
    let mut pings = Vec::new();
    for a in 1..=3 {
        for b in (1..=3).filter(|&b| b != a) {
            for (s, d) in [("p1", "p2"), ("p2", "p1")] {
                let src = format!("n{a}-{s}");
                let dst = format!("n{b}-{d}");
                let bg = ping_bg(&lab.pod(&src).netns, lab.pod(&dst).ip, 3, &[]);
                pings.push((src, dst, bg));
            }
        }
    }
    for (src, dst, bg) in pings {
        let p = Ping::parse(&bg.wait(Duration::from_secs(6)));
        assert!(p.all_answered(), "ping {src} -> {dst}: {}", p.text);
    }

    // TCP node 1 <-> node 2, both directions at once.
    let (a, b) = (lab.pod("n1-p1"), lab.pod("n2-p1"));
    let tcp = iperf(&a.netns, &b.netns, b.ip, &["--bidir"]);
    assert_tcp_bidir(&tcp, "n1-p1 <-> n2-p1");

    // UDP node 3 <-> node 1 at 50 Mbit/s each way.
    let (c, d) = (lab.pod("n3-p2"), lab.pod("n1-p2"));
    let udp = iperf(&c.netns, &d.netns, d.ip, &["-u", "-b", "50M", "--bidir"]);
    assert_udp_bidir(&udp, "n3-p2 <-> n1-p2");

    // Nothing the nodes sent each other was refused.
    for n in &lab.nodes {
        assert_no_vxlan_drops(n);
    }
    eprintln!("took {:.1?}", started.elapsed());
}

/// A pod reaches another node's own address (what a pod does to reach a NodePort or a
/// host-network server on another node): the request leaves through this node's host port and
/// the underlay, the reply comes back over the overlay with the other node's address as its
/// source, which the receiving switch must take from that peer.
#[test]
fn a_pod_reaches_another_nodes_own_address_and_the_reply_crosses_the_overlay() {
    let lab = lab("oh", 2, 1);
    let (n1, n2) = (lab.node("n1").clone(), lab.node("n2").clone());
    let pod = lab.pod("n1-p1");
    let p = ping(&pod.netns, n2.underlay_ip, 3, &[]);
    assert!(
        p.all_answered(),
        "ping n1-p1 -> node 2's {}: {}",
        n2.underlay_ip,
        p.text
    );
    // TCP to a server in node 2's own namespace, on its underlay address.
    let tcp = iperf(&pod.netns, &n2.netns, n2.underlay_ip, &[]);
    let (bytes, _) = iperf_sum(&tcp, "sum_received");
    assert!(
        bytes > 0,
        "TCP n1-p1 -> node 2's {}: nothing received",
        n2.underlay_ip
    );
    // The replies came back over the overlay (node 2 routes the pod CIDR of node 1 into its
    // switch), and none was refused.
    assert_no_vxlan_drops(&n1);
    assert_no_vxlan_drops(&n2);
}

/// Each lab node has what a Kubernetes node has, whatever the host's own settings (a fresh
/// machine forwards nothing, and new namespaces copy that), and vswitchd says so; when a
/// setting is turned off under a running vswitchd, status, /readyz and /metrics name it and
/// what it breaks, and the path it names stops; put back, the warning goes and the path works.
#[test]
fn lab_nodes_have_what_the_node_paths_need_and_vswitchd_warns_when_one_goes() {
    let lab = lab("sc", 2, 1);
    let (n1, n2) = (lab.node("n1").clone(), lab.node("n2").clone());
    for n in [&n1, &n2] {
        assert_eq!(
            must_in(&n.netns, &["sysctl", "-n", "net.ipv4.ip_forward"]).trim(),
            "1",
            "{} does not forward",
            n.name
        );
        let st = ctl_json(n, &["status"]);
        assert_eq!(st["warnings"], serde_json::json!([]), "{}: {st}", n.name);
    }

    must_in(&n1.netns, &["sysctl", "-qw", "net.ipv4.ip_forward=0"]);
    let pod = lab.pod("n1-p1");
    let st = ctl_json(&n1, &["status"]);
    let w = &st["warnings"][0];
    assert_eq!(w["setting"], "net.ipv4.ip_forward", "{st}");
    assert_eq!(w["value"], "0");
    assert_eq!(w["want"], "1");
    assert!(
        w["breaks"]
            .as_str()
            .is_some_and(|b| b.contains("other nodes' own addresses")),
        "{w}"
    );
    let text = ctl_ok(&n1, &["status"]);
    assert!(
        text.contains("warning:  net.ipv4.ip_forward is 0 (want 1): "),
        "{text}"
    );
    let readyz = must_in(
        &n1.netns,
        &[
            "curl",
            "-s",
            "--max-time",
            "3",
            "http://127.0.0.1:9109/readyz",
        ],
    );
    assert!(
        readyz.starts_with("ready\n") && readyz.contains("warning: net.ipv4.ip_forward is 0"),
        "{readyz}"
    );
    let metrics = must_in(
        &n1.netns,
        &[
            "curl",
            "-s",
            "--max-time",
            "3",
            "http://127.0.0.1:9109/metrics",
        ],
    );
    assert!(
        metrics.lines().any(|l| l == "vswitch_node_warnings 1"),
        "{metrics}"
    );
    assert!(
        metrics.lines().any(|l| l.starts_with(
            "vswitch_node_setting_wrong{setting=\"net.ipv4.ip_forward\",value=\"0\",want=\"1\"} 1"
        )),
        "{metrics}"
    );
    // What it names is what breaks: the node no longer forwards its pod to node 2.
    let p = ping(&pod.netns, n2.underlay_ip, 2, &[]);
    assert!(!p.all_answered(), "answered without forwarding: {}", p.text);
    // And the log said so (the watcher reads the settings every 5 s).
    let log = &n1.log;
    assert!(
        wait_until(Duration::from_secs(15), || std::fs::read_to_string(log)
            .is_ok_and(|l| l.contains("node setting net.ipv4.ip_forward is 0"))),
        "no warning in {}",
        log.display()
    );

    must_in(&n1.netns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    assert_eq!(
        ctl_json(&n1, &["status"])["warnings"],
        serde_json::json!([])
    );
    assert_ping(&pod.netns, n2.underlay_ip);
}

// ---------------------------------------------------------------------------------------------
// 2. Removing a peer at runtime and adding it back.

#[test]
fn removing_a_peer_stops_its_traffic_and_adding_it_back_restores_it() {
    let started = Instant::now();
    let lab = lab("ov", 3, 1);
    let n1 = lab.node("n1").clone();
    let n2 = lab.node("n2").clone();
    let (p1, p2, p3) = (lab.pod("n1-p1"), lab.pod("n2-p1"), lab.pod("n3-p1"));
    assert_ping(&p1.netns, p2.ip);

    // A steady flow to node 3 for the whole change: it must not lose a packet.
    let steady = Bg::spawn(
        &p1.netns,
        &[
            "ping",
            "-n",
            "-c",
            "200",
            "-i",
            "0.02",
            "-W",
            "1",
            &p3.ip.to_string(),
        ],
        Duration::from_secs(15),
    );

    let no_route_before = get(&port_drops(&n1, p1.ip), "no_route");
    let unknown_before = get(&underlay_drops(&n1), "vxlan_unknown_peer");
    ctl_ok(&n1, &["peer-del", &n2.name]);
    let peers = peer_names(&n1);
    assert!(
        !peers.contains(&n2.name),
        "{} is still a peer of n1: {peers:?}",
        n2.name
    );

    // Node 1 no longer routes to node 2's pods, and no longer accepts node 2's VXLAN.
    let out = ping_bg(&p1.netns, p2.ip, 2, &[]);
    let back = ping_bg(&p2.netns, p1.ip, 2, &[]);
    let (out, back) = (
        Ping::parse(&out.wait(Duration::from_secs(5))),
        Ping::parse(&back.wait(Duration::from_secs(5))),
    );
    assert_eq!(
        out.received, 0,
        "n1-p1 -> n2-p1 with the peer removed: {}",
        out.text
    );
    assert_eq!(
        back.received, 0,
        "n2-p1 -> n1-p1 with the peer removed: {}",
        back.text
    );
    let no_route = get(&port_drops(&n1, p1.ip), "no_route") - no_route_before;
    assert!(
        no_route >= u64::from(out.transmitted),
        "n1-p1's port counts {no_route} no_route drops for {} echoes to a removed peer",
        out.transmitted
    );
    let unknown = get(&underlay_drops(&n1), "vxlan_unknown_peer") - unknown_before;
    assert!(
        unknown >= u64::from(back.transmitted),
        "n1's underlay counts {unknown} vxlan_unknown_peer drops for {} echoes from n2",
        back.transmitted
    );

    // Added back: the very first echoes are answered.
    let mac = vtep_mac(&n2);
    ctl_ok(
        &n1,
        &[
            "peer-add",
            &n2.name,
            "--underlay-ip",
            &n2.underlay_ip.to_string(),
            "--vtep-mac",
            &mac,
            "--pod-cidr",
            &n2.pod_cidr.to_string(),
        ],
    );
    assert!(peer_names(&n1).contains(&n2.name));
    let again = ping(&p1.netns, p2.ip, 2, &[]);
    assert!(again.all_answered(), "after peer-add: {}", again.text);
    let mut steady = steady;
    assert!(
        steady.running(),
        "the steady ping ended before the peer was back, so it did not cover the change"
    );
    assert_ping(&p2.netns, p1.ip);

    let s = Ping::parse(&steady.wait(Duration::from_secs(10)));
    assert!(
        s.transmitted == 200 && s.all_answered(),
        "traffic to node 3 lost packets while node 2 was removed and re-added: {}",
        s.text
    );
    assert_ping(&p1.netns, p3.ip);
    eprintln!("took {:.1?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// 3. Path MTU.

fn route_mtu(ns: &str, dst: impl std::fmt::Display) -> String {
    must_in(ns, &["ip", "route", "get", &dst.to_string()])
}

#[test]
fn too_big_packets_get_frag_needed_and_pmtu_discovery_works() {
    let started = Instant::now();
    let lab = lab("ov", 2, 2);
    let n1 = lab.node("n1").clone();
    let (a, b) = (lab.pod("n1-p1"), lab.pod("n2-p1"));

    // A full-size packet of the pod MTU (1450) crosses with DF.
    let full = ping(&a.netns, b.ip, 2, &["-M", "do", "-s", "1422"]);
    assert!(full.all_answered(), "1450-byte DF ping: {}", full.text);

    // The pod believes its link takes 9000; the path does not.
    must_in(&a.netns, &["ip", "link", "set", "eth0", "mtu", "9000"]);
    let big = ping(&a.netns, b.ip, 2, &["-M", "do", "-s", "2000"]);
    assert_eq!(big.received, 0, "2028-byte DF ping crossed: {}", big.text);
    assert!(
        big.text.contains("From 10.244.1.1") && big.text.contains("mtu = 1450"),
        "expected ICMP frag-needed (mtu 1450) from the gateway 10.244.1.1: {}",
        big.text
    );
    let route = route_mtu(&a.netns, b.ip);
    assert!(
        route.contains("mtu 1450"),
        "the pod did not learn the path MTU: {route}"
    );
    let again = ping(&a.netns, b.ip, 1, &["-M", "do", "-s", "2000"]);
    assert!(
        again.text.contains("mtu=1450"),
        "after frag-needed the pod should refuse locally with mtu=1450: {}",
        again.text
    );
    let fits = ping(&a.netns, b.ip, 2, &["-M", "do", "-s", "1422"]);
    assert!(fits.all_answered(), "1450 bytes at MTU 9000: {}", fits.text);
    let drops = port_drops(&n1, a.ip);
    assert_eq!(
        get(&drops, "too_big"),
        0,
        "too-big DF packets must be answered, not dropped: {drops:?}"
    );

    // TCP between two pods that both think their links take 9000 (MSS 8960 each way), with
    // no cached path MTU: the transfer completes and both senders learn 1450 from the gateways.
    let (c, d) = (lab.pod("n1-p2"), lab.pod("n2-p2"));
    for (p, q) in [(c, d), (d, c)] {
        must_in(&p.netns, &["ip", "link", "set", "eth0", "mtu", "9000"]);
        let route = route_mtu(&p.netns, q.ip);
        assert!(
            !route.contains("mtu"),
            "{} has a path MTU already: {route}",
            p.name
        );
    }
    let tcp = iperf(&c.netns, &d.netns, d.ip, &["--bidir"]);
    assert_tcp_bidir(&tcp, "n1-p2 <-> n2-p2 at MTU 9000");
    for (p, q) in [(c, d), (d, c)] {
        let route = route_mtu(&p.netns, q.ip);
        assert!(
            route.contains("mtu 1450"),
            "{} did not learn the path MTU to {} from TCP: {route}",
            p.name,
            q.name
        );
    }
    eprintln!("took {:.1?}", started.elapsed());
}

/// Issue 3: "a packet too large for the path with DF set gets an ICMP fragmentation-needed ...;
/// nothing is fragmented or dropped silently". Fails today for TCP super-frames: the pipeline
/// skips the MTU check when the frame is GSO (vswitch/src/pipeline/mod.rs, route_v4: `!gso &&`)
/// and the datapath segments at the pod's gso_size (8948 here), so the ~9000-byte VXLAN datagrams
/// are either fragmented by the node's kernel (plain sockets) or refused with EMSGSIZE and
/// counted as `tx_error` (DF sockets): no frag-needed goes back, and TCP only recovers through
/// retransmission once some non-GSO full-size segment draws a frag-needed.
#[test]
fn jumbo_pod_tcp_is_neither_fragmented_nor_dropped_on_the_underlay() {
    let lab = lab("ov", 2, 1);
    let n1 = lab.node("n1").clone();
    let (c, d) = (lab.pod("n1-p1"), lab.pod("n2-p1"));
    for p in [c, d] {
        must_in(&p.netns, &["ip", "link", "set", "eth0", "mtu", "9000"]);
    }
    let cap = Capture::start(&lab.name, &n1, "frag", "ip[6:2] & 0x3fff != 0", 1);
    let tcp = iperf(&c.netns, &d.netns, d.ip, &[]);
    assert!(iperf_sum(&tcp, "sum_received").0 > 0);
    let retransmits = tcp["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    let pcap = cap.finish(Duration::from_millis(300));
    let frags = tshark(&pcap, &["-e", "frame.number"]);
    let drops = port_drops(&n1, c.ip);
    assert!(
        frags.is_empty(),
        "IP fragments on node 1's underlay while pods with MTU 9000 ran TCP: the overlay must \
         answer with frag-needed instead of fragmenting"
    );
    assert!(
        get(&drops, "tx_error") == 0 && get(&drops, "too_big") == 0,
        "the sender's port dropped TCP segments too big for the path ({retransmits} \
         retransmits) instead of answering frag-needed: {drops:?}"
    );
}

/// An underlay device without checksum offload (`ethtool -K ul0 tx off`, as some NICs and
/// virtual devices are): the switch's UDP_SEGMENT batches are checksummed by the kernel in
/// software (Linux 6.11+) or refused with EIO on older kernels, where the send pool falls back
/// to one datagram per call (the underlay unit test covers that path). Either way bulk TCP
/// crosses both ways without a refused or failed send, and pods still ping.
#[test]
fn an_underlay_without_checksum_offload_still_carries_bulk_tcp() {
    let lab = lab("ov", 2, 1);
    for n in &lab.nodes {
        must_in(&n.netns, &["ethtool", "-K", "ul0", "tx", "off"]);
        let features = must_in(&n.netns, &["ethtool", "-k", "ul0"]);
        assert!(
            features.contains("tx-checksumming: off"),
            "{}: {features}",
            n.name
        );
    }
    let (a, b) = (lab.pod("n1-p1"), lab.pod("n2-p1"));
    assert_ping(&a.netns, b.ip);
    let tcp = iperf(&a.netns, &b.netns, b.ip, &["--bidir"]);
    assert_tcp_bidir(&tcp, "n1-p1 <-> n2-p1 without underlay checksum offload");
    for n in &lab.nodes {
        assert_no_vxlan_drops(n);
        for p in lab.pods.iter().filter(|p| p.node == n.name) {
            let d = port_drops(n, p.ip);
            assert_eq!(get(&d, "tx_error"), 0, "{}: {d:?}", p.name);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 5. A capture on the underlay, decoded by tshark.

/// tcpdump on a node's underlay interface into a file, removed when dropped.
struct Capture {
    file: PathBuf,
    tcpdump: Option<Bg>,
}

impl Capture {
    /// Starts `tcpdump -i ul0 -c COUNT FILTER` in the node and waits until it captures.
    fn start(lab: &str, node: &Node, tag: &str, filter: &str, count: u32) -> Capture {
        let file = std::env::temp_dir().join(format!("{lab}-n{}-{tag}.pcap", node.index));
        let _ = std::fs::remove_file(&file);
        let path = file.to_string_lossy().into_owned();
        let count = count.to_string();
        let mut argv = vec![
            "tcpdump",
            "-i",
            vswitch_lab::UNDERLAY_IFNAME,
            "-n",
            "-U",
            "-Z",
            "root",
            "-c",
            &count,
            "-w",
            &path,
        ];
        argv.extend(filter.split_whitespace());
        let mut bg = Bg::spawn(&node.netns, &argv, Duration::from_secs(30));
        // tcpdump opens the file only once the capture is active.
        let up = wait_until(Duration::from_secs(5), || file.exists() || !bg.running());
        if !up || !file.exists() {
            let out = bg.stop();
            panic!("tcpdump did not start on {}: {}", node.name, text(&out));
        }
        Capture {
            file,
            tcpdump: Some(bg),
        }
    }

    /// Waits up to `grace` for tcpdump to reach its count, then stops it; the file stays
    /// until the Capture drops.
    fn finish(mut self, grace: Duration) -> CaptureFile {
        if let Some(bg) = self.tcpdump.take() {
            let mut bg = bg;
            wait_until(grace, || !bg.running());
            let _ = bg.stop();
        }
        CaptureFile(std::mem::take(&mut self.file))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        drop(self.tcpdump.take());
        if !self.file.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.file);
        }
    }
}

/// A finished capture file, removed when dropped.
struct CaptureFile(PathBuf);

impl AsRef<Path> for CaptureFile {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for CaptureFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `tshark -r FILE` decoding UDP 8472 as VXLAN, printing `fields` (all occurrences, outer
/// first, comma-separated) one packet per line, split into columns.
fn tshark(file: &impl AsRef<Path>, fields: &[&str]) -> Vec<Vec<String>> {
    let path = file.as_ref().to_string_lossy().into_owned();
    let decode = format!("udp.port=={VXLAN_PORT},vxlan");
    let mut argv = vec![
        "tshark",
        "-n",
        "-r",
        &path,
        "-d",
        &decode,
        "-o",
        "ip.check_checksum:TRUE",
        "-T",
        "fields",
        "-E",
        "separator=/t",
        "-E",
        "occurrence=a",
        "-E",
        "aggregator=,",
    ];
    argv.extend_from_slice(fields);
    let mut c = cmd_host(&argv, Duration::from_secs(60));
    c.stdin(std::process::Stdio::null());
    let o = c
        .output()
        .unwrap_or_else(|e| panic!("cannot run tshark: {e}"));
    assert!(o.status.success(), "tshark {path}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split('\t').map(String::from).collect())
        .collect()
}

fn parts(s: &str) -> Vec<&str> {
    if s.is_empty() {
        Vec::new()
    } else {
        s.split(',').collect()
    }
}

/// One captured VXLAN datagram as tshark decodes it.
#[derive(Debug)]
struct Decoded {
    outer_src: String,
    outer_dst: String,
    outer_sport: u16,
    outer_dport: u16,
    vni: Option<u32>,
    vxlan_flags: String,
    inner_eth_src: String,
    inner_eth_dst: String,
    inner_src: String,
    inner_dst: String,
    inner_proto: String,
    /// Inner L4 ports (UDP only).
    inner_sport: Option<u16>,
    inner_dport: Option<u16>,
    ip_checksums: Vec<String>,
    icmp_type: Option<u8>,
    payload: String,
    line: String,
}

const DECODE_FIELDS: &[&str] = &[
    "-e",
    "ip.src",
    "-e",
    "ip.dst",
    "-e",
    "udp.srcport",
    "-e",
    "udp.dstport",
    "-e",
    "vxlan.vni",
    "-e",
    "vxlan.flags",
    "-e",
    "eth.src",
    "-e",
    "eth.dst",
    "-e",
    "ip.proto",
    "-e",
    "ip.checksum.status",
    "-e",
    "icmp.type",
    "-e",
    "data.data",
];

fn decode(file: &impl AsRef<Path>) -> Vec<Decoded> {
    tshark(file, DECODE_FIELDS)
        .into_iter()
        .map(|cols| {
            let col = |i: usize| cols.get(i).map(String::as_str).unwrap_or("");
            let (ip_src, ip_dst) = (parts(col(0)), parts(col(1)));
            let (sports, dports) = (parts(col(2)), parts(col(3)));
            let (eth_src, eth_dst) = (parts(col(6)), parts(col(7)));
            let protos = parts(col(8));
            let nth = |v: &[&str], i: usize| v.get(i).copied().unwrap_or("").to_string();
            Decoded {
                outer_src: nth(&ip_src, 0),
                outer_dst: nth(&ip_dst, 0),
                outer_sport: nth(&sports, 0).parse().unwrap_or(0),
                outer_dport: nth(&dports, 0).parse().unwrap_or(0),
                vni: col(4).parse().ok(),
                vxlan_flags: col(5).to_string(),
                inner_eth_src: nth(&eth_src, 1),
                inner_eth_dst: nth(&eth_dst, 1),
                inner_src: nth(&ip_src, 1),
                inner_dst: nth(&ip_dst, 1),
                inner_proto: nth(&protos, 1),
                inner_sport: sports.get(1).and_then(|p| p.parse().ok()),
                inner_dport: dports.get(1).and_then(|p| p.parse().ok()),
                ip_checksums: parts(col(9)).into_iter().map(String::from).collect(),
                icmp_type: parts(col(10)).first().and_then(|t| t.parse().ok()),
                payload: col(11).to_string(),
                line: cols.join(" | "),
            }
        })
        .collect()
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn underlay_capture_decodes_as_vxlan_with_vni_1_and_flow_hashed_source_ports() {
    let started = Instant::now();
    let lab = lab("ov", 2, 1);
    let (n1, n2) = (lab.node("n1").clone(), lab.node("n2").clone());
    let (a, b) = (lab.pod("n1-p1"), lab.pod("n2-p1"));
    let (mac1, mac2) = (vtep_mac(&n1), vtep_mac(&n2));

    // 3 echo requests + 3 replies + 8 UDP flows x 2 datagrams.
    const FLOWS: u16 = 8;
    let expected = 6 + 2 * u32::from(FLOWS);
    let receiver = Bg::spawn(
        &b.netns,
        &["socat", "-u", "UDP4-RECV:9999", "STDOUT"],
        Duration::from_secs(30),
    );
    wait_listening(&b.netns, "u", 9999);
    let cap = Capture::start(
        &lab.name,
        &n2,
        "vxlan",
        &format!("udp port {VXLAN_PORT}"),
        expected,
    );

    assert_ping(&a.netns, b.ip);
    let dst = format!("UDP4-SENDTO:{}:9999", b.ip);
    let mut sent = Vec::new();
    for f in 0..FLOWS {
        let sport = 40001 + f;
        for k in 1..=2 {
            let msg = format!("flow{sport}-{k}\n");
            let addr = format!("{dst},sourceport={sport}");
            let o = Bg::spawn_with_input(
                &a.netns,
                &["socat", "-u", "STDIN", &addr],
                Duration::from_secs(5),
                msg.as_bytes(),
            )
            .wait(Duration::from_secs(6));
            assert!(o.status.success(), "socat to {addr}: {}", text(&o));
            sent.push(msg);
        }
    }
    let pcap = cap.finish(Duration::from_secs(3));
    std::thread::sleep(Duration::from_millis(100));
    let received = String::from_utf8_lossy(&receiver.stop().stdout).into_owned();
    for m in &sent {
        assert!(
            received.contains(m.as_str()),
            "n2-p1 did not receive {m:?}: {received:?}"
        );
    }

    let pkts = decode(&pcap);
    assert!(
        pkts.len() >= expected as usize,
        "captured {} datagrams, expected {expected}: {pkts:#?}",
        pkts.len()
    );
    let node_ips = [n1.underlay_ip.to_string(), n2.underlay_ip.to_string()];
    let pod_ips = [a.ip.to_string(), b.ip.to_string()];
    for p in &pkts {
        assert_eq!(p.vni, Some(1), "not VXLAN with VNI 1: {}", p.line);
        // The I bit; and between vswitch nodes, which take remote checksum offload, the RCO
        // bit on TCP/UDP whose checksum the pod left to us (ICMP is always summed in full).
        let l4 = p.inner_proto == "6" || p.inner_proto == "17";
        assert!(
            p.vxlan_flags == "0x0800" || (l4 && p.vxlan_flags == "0x0820"),
            "VXLAN flags (I bit, RCO only on TCP/UDP): {}",
            p.line
        );
        assert_eq!(p.outer_dport, VXLAN_PORT, "{}", p.line);
        assert!(
            node_ips.contains(&p.outer_src) && node_ips.contains(&p.outer_dst),
            "outer addresses are not the nodes': {}",
            p.line
        );
        assert!(
            pod_ips.contains(&p.inner_src) && pod_ips.contains(&p.inner_dst),
            "inner addresses are not the pods': {}",
            p.line
        );
        // Inner Ethernet: from the sending node's VTEP MAC to the receiving node's.
        let (src_mac, dst_mac) = if p.outer_src == node_ips[0] {
            (&mac1, &mac2)
        } else {
            (&mac2, &mac1)
        };
        assert_eq!(
            (&p.inner_eth_src, &p.inner_eth_dst),
            (src_mac, dst_mac),
            "{}",
            p.line
        );
        // Outer and inner IPv4 header checksums verify (1 = good in tshark).
        assert!(
            p.ip_checksums.len() >= 2 && p.ip_checksums.iter().all(|s| s == "1"),
            "IPv4 header checksums: {}",
            p.line
        );
    }
    let echo = |t: u8| {
        pkts.iter()
            .filter(|p| p.inner_proto == "1" && p.icmp_type == Some(t))
            .count()
    };
    assert!(
        echo(8) >= 3 && echo(0) >= 3,
        "expected 3 echo requests and 3 replies: {pkts:#?}"
    );

    // Source ports: constant within a flow, spread across flows.
    let mut by_flow: BTreeMap<u16, BTreeSet<u16>> = BTreeMap::new();
    for p in pkts.iter().filter(|p| p.inner_proto == "17") {
        assert_eq!(p.inner_dport, Some(9999), "{}", p.line);
        let sport = p.inner_sport.unwrap_or(0);
        assert!(
            p.payload.starts_with(&hex(&format!("flow{sport}-"))),
            "inner payload: {}",
            p.line
        );
        by_flow.entry(sport).or_default().insert(p.outer_sport);
    }
    assert_eq!(
        by_flow.len(),
        usize::from(FLOWS),
        "UDP flows seen: {by_flow:?}"
    );
    for (flow, ports) in &by_flow {
        assert_eq!(
            ports.len(),
            1,
            "inner flow from port {flow} left from several outer source ports: {ports:?}"
        );
    }
    let distinct: BTreeSet<u16> = by_flow.values().flatten().copied().collect();
    eprintln!("outer source ports of {FLOWS} inner flows: {distinct:?}");
    assert!(
        distinct.len() > 1,
        "{FLOWS} inner flows all left from one outer source port: {distinct:?}"
    );
    eprintln!("took {:.1?}", started.elapsed());
}

/// Issue 3: "outer source port from a hash of the inner flow (so one flow stays on one path)".
/// Fails today: flow_hash in vswitch/src/datapath/mod.rs hashes the first 4 bytes of any L4
/// header, which for ICMP are type, code and the per-packet checksum, so one ping session
/// (one flow: same addresses and echo id) spreads over the send sockets.
#[test]
fn one_ping_session_keeps_one_outer_source_port() {
    let lab = lab("ov", 2, 1);
    let (a, b) = (lab.pod("n1-p1"), lab.pod("n2-p1"));
    let cap = Capture::start(
        &lab.name,
        lab.node("n2"),
        "icmp",
        &format!("udp port {VXLAN_PORT} and src host 192.168.100.1"),
        6,
    );
    let p = ping(&a.netns, b.ip, 6, &[]);
    assert!(p.all_answered(), "{}", p.text);
    let pcap = cap.finish(Duration::from_secs(2));
    let ports: BTreeSet<u16> = decode(&pcap)
        .iter()
        .filter(|p| p.icmp_type == Some(8))
        .map(|p| p.outer_sport)
        .collect();
    assert_eq!(
        ports.len(),
        1,
        "6 echo requests of one ping left from {ports:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. VXLAN from a host that is not a peer.

fn mac_bytes(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap_or_else(|e| panic!("MAC {s}: {e}")))
        .collect();
    v.try_into()
        .unwrap_or_else(|v| panic!("MAC {s} has {} bytes", Vec::len(&v)))
}

fn ipv4_checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A VXLAN datagram (header + inner Ethernet/IPv4/UDP frame) as a flannel VTEP would send it.
fn vxlan_datagram(
    vni: u32,
    inner_dst_mac: [u8; 6],
    inner_src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut d = vec![0x08, 0, 0, 0];
    d.extend_from_slice(&(vni << 8).to_be_bytes());
    d.extend_from_slice(&inner_dst_mac);
    d.extend_from_slice(&inner_src_mac);
    d.extend_from_slice(&[0x08, 0x00]);
    let udp_len = 8 + payload.len();
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    d.extend_from_slice(&ip);
    d.extend_from_slice(&5555u16.to_be_bytes());
    d.extend_from_slice(&dport.to_be_bytes());
    d.extend_from_slice(&(udp_len as u16).to_be_bytes());
    d.extend_from_slice(&[0, 0]); // no UDP checksum
    d.extend_from_slice(payload);
    d
}

#[test]
fn vxlan_from_a_host_that_is_not_a_peer_is_dropped_and_counted() {
    let started = Instant::now();
    let lab = lab("ov", 1, 1);
    let n1 = lab.node("n1").clone();
    let pod = lab.pod("n1-p1");
    let pod_ip = match pod.ip {
        std::net::IpAddr::V4(ip) => ip,
        other => panic!("pod address {other} is not IPv4"),
    };
    let node_mac = mac_bytes(&vtep_mac(&n1));

    // A host on the same LAN as the node, not one of its peers.
    let stranger = Netns::add(&format!("{}-x", lab.name));
    let port = format!("{}x", lab.name);
    lab.cable_to_fabric(&stranger.name, "ul0", &port, "192.168.100.200/24", None)
        .unwrap_or_else(|e| panic!("cannot cable {} to the fabric: {e}", stranger.name));
    let stranger_mac = [0x02, 0x66, 0x61, 0x6b, 0x65, 0x01];
    let stranger_pod = Ipv4Addr::new(10, 244, 200, 2);

    let receiver = Bg::spawn(
        &pod.netns,
        &["socat", "-u", "UDP4-RECV:9999", "STDOUT"],
        Duration::from_secs(30),
    );
    wait_listening(&pod.netns, "u", 9999);
    let to_node = format!("UDP4-SENDTO:{}:{VXLAN_PORT}", n1.underlay_ip);
    let send = |d: Vec<u8>| {
        let o = Bg::spawn_with_input(
            &stranger.name,
            &["socat", "-u", "STDIN", &to_node],
            Duration::from_secs(5),
            &d,
        )
        .wait(Duration::from_secs(6));
        assert!(o.status.success(), "socat: {}", text(&o));
    };
    // Sends a datagram and waits for the node to count it as `reason`.
    let expect_drop = |d: Vec<u8>, reason: &str| {
        let before = get(&underlay_drops(&n1), reason);
        send(d);
        let mut now = before;
        let counted = wait_until(Duration::from_secs(3), || {
            now = get(&underlay_drops(&n1), reason);
            now > before
        });
        assert!(
            counted,
            "underlay drop counter {reason} stayed at {before}; drops: {:?}",
            underlay_drops(&n1)
        );
        assert_eq!(now, before + 1, "{reason} counted more than once");
    };
    let good = |payload: &str| {
        vxlan_datagram(
            1,
            node_mac,
            stranger_mac,
            stranger_pod,
            pod_ip,
            9999,
            payload.as_bytes(),
        )
    };

    // Not a peer: dropped as vxlan_unknown_peer, however well-formed.
    let tx_before = port_counters(&n1, pod.ip)["tx_packets"]
        .as_u64()
        .unwrap_or(0);
    expect_drop(good("from-a-stranger\n"), "vxlan_unknown_peer");

    // Once it is a peer, the checks after the peer's address apply, and then it is delivered.
    ctl_ok(
        &n1,
        &[
            "peer-add",
            "stranger",
            "--underlay-ip",
            "192.168.100.200",
            "--vtep-mac",
            "02:66:61:6b:65:01",
            "--pod-cidr",
            "10.244.200.0/24",
        ],
    );
    let mut wrong_vni = good("wrong-vni\n");
    wrong_vni[6] = 2;
    expect_drop(wrong_vni, "vxlan_wrong_vni");
    expect_drop(
        vxlan_datagram(
            1,
            node_mac,
            stranger_mac,
            Ipv4Addr::new(10, 244, 7, 7),
            pod_ip,
            9999,
            b"spoofed\n",
        ),
        "vxlan_spoofed_src",
    );
    // Nor may it speak for this node: its own underlay address is not the peer's.
    expect_drop(
        vxlan_datagram(
            1,
            node_mac,
            stranger_mac,
            n1.underlay_ip,
            pod_ip,
            9999,
            b"spoofed-node\n",
        ),
        "vxlan_spoofed_src",
    );
    let mut other_mac = node_mac;
    other_mac[5] ^= 0x55;
    expect_drop(
        vxlan_datagram(
            1,
            other_mac,
            stranger_mac,
            stranger_pod,
            pod_ip,
            9999,
            b"wrong-mac\n",
        ),
        "vxlan_wrong_dst_mac",
    );
    let tx_dropped = port_counters(&n1, pod.ip)["tx_packets"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(
        tx_dropped, tx_before,
        "the pod's port sent frames to the pod while only refused VXLAN arrived"
    );

    send(good("accepted\n"));
    // The peer's own address is a source it speaks for (a reply from its node).
    send(vxlan_datagram(
        1,
        node_mac,
        stranger_mac,
        Ipv4Addr::new(192, 168, 100, 200),
        pod_ip,
        9999,
        b"from-the-node\n",
    ));
    let delivered = wait_until(Duration::from_secs(3), || {
        port_counters(&n1, pod.ip)["tx_packets"]
            .as_u64()
            .unwrap_or(0)
            >= tx_before + 2
    });
    assert!(
        delivered,
        "VXLAN from a configured peer did not reach the pod"
    );
    std::thread::sleep(Duration::from_millis(100));
    let got = String::from_utf8_lossy(&receiver.stop().stdout).into_owned();
    assert_eq!(
        got, "accepted\nfrom-the-node\n",
        "the pod must receive exactly the datagrams from the peer"
    );
    // The plain `vswitchctl ports` shows the underlay's drops too.
    let table = ctl_ok(&n1, &["ports"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("underlay (VXLAN datagrams):")
                && l.contains("vxlan_spoofed_src=2")
                && l.contains("vxlan_unknown_peer=1")),
        "vswitchctl ports:\n{table}"
    );
    ctl_ok(&n1, &["peer-del", "stranger"]);
    eprintln!("took {:.1?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// UDP segmentation offload: a pod's UDP_SEGMENT send reaches the switch whole.

/// `send DST PORT N SIZE SEGS`: N UDP_SEGMENT sends of SEGS datagrams of SIZE bytes, datagram k
/// filled with byte k % 256. `recv BIND PORT WANT SIZE`: counts intact datagrams (prints
/// `got=G bad=B`), until WANT arrived or 5 s pass without one.
const UDP_GSO: &str = r#"
import socket, sys, time
role = sys.argv[1]
if role == "send":
    dst, port, n, size, segs = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_UDP, 103, size)  # UDP_SEGMENT
    for i in range(n):
        s.sendto(b"".join(bytes([(i * segs + j) % 256]) * size for j in range(segs)), (dst, port))
        time.sleep(0.005)
else:
    bind, port, want, size = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind((bind, port))
    s.settimeout(5)
    got, bad, seen = 0, 0, set()
    try:
        while got + bad < want:
            d = s.recv(65535)
            if len(d) == size and d == bytes([d[0]]) * size:
                got += 1
                seen.add(d[0])
            else:
                bad += 1
    except socket.timeout:
        pass
    print(f"got={got} bad={bad} distinct={len(seen)}")
"#;

#[test]
fn a_pods_udp_gso_send_is_switched_whole_and_cut_for_the_overlay() {
    let started = Instant::now();
    let lab = lab("us", 2, 2);
    let (a, b, c) = (lab.pod("n1-p1"), lab.pod("n1-p2"), lab.pod("n2-p1"));
    let out = must_in(&a.netns, &["ethtool", "-k", &a.ifname]);
    assert!(
        out.contains("tx-udp-segmentation: on"),
        "the pod's TAP should offer USO:\n{out}"
    );
    let dir = std::env::temp_dir().join(unique_name("ug"));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let script = dir.join("udp_gso.py");
    std::fs::write(&script, UDP_GSO).unwrap_or_else(|e| panic!("{}: {e}", script.display()));
    let script = script.display().to_string();
    const SENDS: u32 = 20;
    const SEGS: u32 = 10;
    const SIZE: &str = "1000";
    let want = (SENDS * SEGS).to_string();
    // The same node (the super-frame goes to the other TAP whole, and the receiving pod's
    // kernel cuts it) and another node (the switch cuts it into VXLAN datagrams).
    for (to, port) in [(&b, "9101"), (&c, "9102")] {
        let before = port_counters(&lab.nodes[0], a.ip)["rx_packets"]
            .as_u64()
            .unwrap_or(0);
        let recv = Bg::spawn(
            &to.netns,
            &["python3", &script, "recv", "0.0.0.0", port, &want, SIZE],
            Duration::from_secs(30),
        );
        wait_listening(&to.netns, "u", port.parse().unwrap_or(0));
        let ip = to.ip.to_string();
        let sends = SENDS.to_string();
        let segs = SEGS.to_string();
        must_in(
            &a.netns,
            &["python3", &script, "send", &ip, port, &sends, SIZE, &segs],
        );
        let o = recv.wait(Duration::from_secs(15));
        let got = text(&o);
        assert!(
            got.contains(&format!("got={want} bad=0 distinct={want}")),
            "UDP GSO n1-p1 -> {}: {got}",
            to.name
        );
        // The switch read about one frame per send, not one per datagram.
        let after = port_counters(&lab.nodes[0], a.ip)["rx_packets"]
            .as_u64()
            .unwrap_or(0);
        assert!(
            after - before < u64::from(SENDS * SEGS / 2),
            "n1-p1's port read {} frames for {SENDS} sends of {SEGS} datagrams",
            after - before
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("took {:.1?}", started.elapsed());
}

/// A node without `[host] routes` (the shipped ConfigMap has none) still reaches other nodes'
/// pods and ClusterIPs from its own address: vswitchd routes each peer's pod CIDR and each
/// ClusterIP through the host port and follows Services as they come and go (issue 24 point 1).
#[test]
fn a_node_without_configured_routes_reaches_other_nodes_pods_and_cluster_ips() {
    let mut lab = vswitch_tests::lab(2, 1);
    let n1 = lab.nodes[0].clone();
    let remote = lab.pod("n2-p1").clone();
    // n1 loses the lab's routes: from its config, and from the (persistent) host port.
    let text = std::fs::read_to_string(&n1.config).expect("n1's config");
    let without: String = text
        .lines()
        .filter(|l| !l.starts_with("routes = "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(
        text, without,
        "n1's config has no [host] routes to take away"
    );
    std::fs::write(&n1.config, without).expect("write config");
    let config = conf::Config::load(&n1.config).expect("n1's config");
    assert!(config.host.routes.is_empty(), "{:?}", config.host.routes);
    for r in ["10.244.0.0/16", "10.96.0.0/12"] {
        let out = vswitch_tests::exec_in(
            &n1.netns,
            &["ip", "route", "del", r, "dev", "vsw0"],
            vswitch_tests::SHORT,
        );
        assert!(out.success(), "ip route del {r}: {out}");
    }
    lab.restart_daemon(0, Duration::from_secs(10))
        .expect("restart n1's vswitchd");
    let routes = || {
        vswitch_tests::exec_in(
            &n1.netns,
            &["ip", "route", "show", "dev", "vsw0"],
            vswitch_tests::SHORT,
        )
        .stdout
    };
    let ping = |ip: String| {
        vswitch_tests::exec_in(
            &n1.netns,
            &["ping", "-c1", "-W1", &ip],
            Duration::from_secs(5),
        )
        .success()
    };
    // The node reaches the other node's pod through its pod CIDR's route.
    assert!(
        vswitch_tests::wait_until(Duration::from_secs(10), || ping(remote.ip.to_string())),
        "n1 cannot reach n2's pod {}; vsw0 routes:\n{}",
        remote.ip,
        routes()
    );
    assert!(routes().contains("10.244.2.0/24"), "{}", routes());

    // A Service on n2's pod: the node reaches its ClusterIP, by a host route that follows it.
    let _server = vswitch_tests::Bg::spawn(
        &remote.netns,
        &[vswitch_tests::python(), "-m", "http.server", "8080"],
        Duration::from_secs(60),
    );
    let web = vswitch_lab::services::ServiceArgs {
        name: "web".into(),
        ports: vec!["80:8080".parse().expect("port")],
        endpoints: vec![remote.name.clone()],
        cluster_ip: Some("10.96.7.7".parse().expect("ip")),
        node_port: None,
    };
    lab.add_service(&web).expect("add-service");
    let curl = || {
        vswitch_tests::exec_in(
            &n1.netns,
            &[
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "2",
                "http://10.96.7.7/",
            ],
            Duration::from_secs(5),
        )
        .stdout
            == "200"
    };
    assert!(
        vswitch_tests::wait_until(Duration::from_secs(10), curl),
        "n1 cannot reach the ClusterIP 10.96.7.7; vsw0 routes:\n{}",
        routes()
    );
    lab.del_service("web").expect("del-service");
    assert!(
        vswitch_tests::wait_until(Duration::from_secs(10), || !routes().contains("10.96.7.7")),
        "the ClusterIP's route outlived its Service:\n{}",
        routes()
    );
}
