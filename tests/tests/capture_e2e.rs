//! End-to-end tests of the pcap tap (issue 8): `vswitchctl capture` against real vswitchd
//! nodes of a lab, the files read back by tshark and tcpdump.
//!
//! - A ping between pods on two nodes is seen at every point it passes, in order and with the
//!   right pcapng direction flags: pod in, overlay inner and outer (decoded by tshark as VXLAN
//!   VNI 1) on the sending node; overlay outer and inner in, pod out on the receiving node.
//! - A connection to a ClusterIP shows at `nat:before` with the ClusterIP and at `nat:after`
//!   with the backend, both ways; Ctrl-C ends the capture with a summary on stderr.
//! - A capture with a filter holds only matching packets, two sessions run at once, and `-C`
//!   with and without `-W` rotates files like tcpdump; a live stream piped into `tcpdump -r -`
//!   is read as it comes.
//! - A pod's UDP datagram, TCP request and ping to the lab's outside host `out` show at
//!   `egress:pod` with the pod's address and at `egress:node` from the node's address and the
//!   port the outside host saw, carrying the same bytes, checksums valid (tshark checks them).
//!
//! Needs root, iproute2, ping, iperf3, socat, tcpdump and tshark. Each test builds its own lab
//! with a unique name and tears it down on drop, also when it fails; every process is bounded.

mod overlay_support;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use conf::api::{CaptureSessionsResponse, ServicesResponse, PATH_CAPTURE_SESSIONS, PATH_SERVICES};
use overlay_support::*;
use vswitch_lab::Node;

/// A `vswitchctl capture` running in the background (own process group, killed on drop).
struct Capture {
    child: Option<Child>,
    what: String,
}

impl Capture {
    /// Starts `vswitchctl capture ARGS` against `node`, bounded by `limit`, and waits until
    /// the daemon lists the session as running (so no packet sent after this is missed).
    fn start(node: &Node, args: &[&str], limit: Duration) -> Capture {
        let before = sessions(node).len();
        let ctl = vswitchctl_path();
        let mut c = Command::new("timeout");
        c.args(["-s", "INT", "-k", "3", &format!("{}", limit.as_secs())])
            .arg(&ctl)
            .arg("--socket")
            .arg(&node.admin_socket)
            .arg("capture")
            .args(args)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let what = format!("vswitchctl capture {} on {}", args.join(" "), node.name);
        let child = c
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let mut cap = Capture {
            child: Some(child),
            what,
        };
        let up = wait_until(Duration::from_secs(10), || {
            sessions(node).iter().filter(|s| s.running).count() > 0 && sessions(node).len() > before
        });
        if !up {
            let out = cap.interrupt();
            panic!("{}: no session started: {}", cap.what, text(&out));
        }
        cap
    }

    /// Waits for it to end by itself (a count), up to `timeout`, then interrupts it.
    fn wait(mut self, timeout: Duration) -> Output {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if !matches!(c.try_wait(), Ok(None)) {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.interrupt()
    }

    /// Ctrl-C (SIGINT to the group), then its output.
    fn interrupt(&mut self) -> Output {
        let Some(child) = self.child.take() else {
            panic!("{} was already collected", self.what)
        };
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill(2) on the process group this unreaped child leads.
            unsafe { libc::kill(-pid, libc::SIGINT) };
        }
        child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("{}: {e}", self.what))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(pid) = libc::pid_t::try_from(c.id()) {
                // SAFETY: as above; the child is not reaped yet.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
            let _ = c.wait();
        }
    }
}

fn sessions(node: &Node) -> Vec<conf::api::CaptureSessionInfo> {
    node.client()
        .with_timeout(Duration::from_secs(5))
        .get::<CaptureSessionsResponse>(PATH_CAPTURE_SESSIONS)
        .map(|r| r.sessions)
        .unwrap_or_default()
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("vswitch-cap-{tag}-{}", unique_name("cp")));
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        Scratch(p)
    }

    fn file(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// tshark's fields of every packet of a file, one row per packet (VXLAN decoded on 8472).
fn tshark(file: &str, fields: &[&str]) -> Vec<Vec<String>> {
    let mut argv = vec![
        "tshark",
        "-n",
        "-r",
        file,
        "-d",
        "udp.port==8472,vxlan",
        "-T",
        "fields",
    ];
    for f in fields {
        argv.push("-e");
        argv.push(f);
    }
    let o = run_host(&argv);
    assert!(o.status.success(), "tshark -r {file}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect()
}

const ROW: &[&str] = &[
    "frame.interface_name",
    "frame.packet_flags_direction",
    "ip.src",
    "ip.dst",
    "vxlan.vni",
    "icmp.type",
];

/// `frame.packet_flags_direction` as tshark prints it: 0x00000001 inbound, 0x00000002 outbound.
fn dir(flags: &str) -> &'static str {
    match u32::from_str_radix(flags.trim_start_matches("0x"), 16).map(|f| f & 3) {
        Ok(1) => "in",
        Ok(2) => "out",
        _ => "?",
    }
}

#[test]
fn a_ping_between_nodes_is_seen_at_every_point_with_its_direction() {
    let lab = lab("cp", 2, 2);
    let (n1, n2) = (lab.node("n1").clone(), lab.node("n2").clone());
    let (a, b) = (lab.pod("n1-p1").clone(), lab.pod("n2-p2").clone());
    let dir_ = Scratch::new("ping");
    let (f1, f2) = (dir_.file("n1.pcapng"), dir_.file("n2.pcapng"));
    // The filter keeps ARP and everything else out; on the outer points it matches the inner
    // frame. Each node sees the request and the reply at 3 points: 6 packets.
    let c1 = Capture::start(
        &n1,
        &["-c", "6", "-w", &f1, "icmp"],
        Duration::from_secs(20),
    );
    let c2 = Capture::start(
        &n2,
        &["-c", "6", "-w", &f2, "icmp"],
        Duration::from_secs(20),
    );
    // And a live stream into tcpdump, as a user would run it.
    let ctl = vswitchctl_path();
    let live = Command::new("timeout")
        .args(["-k", "3", "20", "sh", "-c"])
        .arg(format!(
            "'{}' --socket '{}' capture --pod default/{} -c 2 icmp | tcpdump -nr - 2>&1",
            ctl.display(),
            n2.admin_socket.display(),
            b.k8s_name
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sh");
    assert!(wait_until(Duration::from_secs(10), || sessions(&n2)
        .iter()
        .filter(|s| s.running)
        .count()
        == 2));

    let p = ping(&a.netns, b.ip, 1, &[]);
    assert!(p.all_answered(), "ping: {}", p.text);
    let o1 = c1.wait(Duration::from_secs(10));
    let o2 = c2.wait(Duration::from_secs(10));
    assert!(o1.status.success(), "{}", text(&o1));
    assert!(o2.status.success(), "{}", text(&o2));
    assert!(
        String::from_utf8_lossy(&o1.stderr).contains("6 packets captured"),
        "{}",
        text(&o1)
    );

    let (ip_a, ip_b) = (a.ip.to_string(), b.ip.to_string());
    let (ul1, ul2) = (n1.underlay_ip.to_string(), n2.underlay_ip.to_string());
    let pod_a = format!("pod:default/{}", a.k8s_name);
    let pod_b = format!("pod:default/{}", b.k8s_name);
    let rows = |f: &str| -> Vec<(String, &'static str, String, String, String, String)> {
        tshark(f, ROW)
            .into_iter()
            .map(|r| {
                let g = |i: usize| r.get(i).cloned().unwrap_or_default();
                (g(0), dir(&g(1)), g(2), g(3), g(4), g(5))
            })
            .collect()
    };
    let s = |x: &str| x.to_string();
    let outer = |u: &str, ip: &str| format!("{u},{ip}");
    let want1 = vec![
        (
            format!("{pod_a}:in"),
            "in",
            s(&ip_a),
            s(&ip_b),
            s(""),
            s("8"),
        ),
        (
            s("overlay:inner:out"),
            "out",
            s(&ip_a),
            s(&ip_b),
            s(""),
            s("8"),
        ),
        (
            s("overlay:outer:out"),
            "out",
            outer(&ul1, &ip_a),
            outer(&ul2, &ip_b),
            s("1"),
            s("8"),
        ),
        (
            s("overlay:outer:in"),
            "in",
            outer(&ul2, &ip_b),
            outer(&ul1, &ip_a),
            s("1"),
            s("0"),
        ),
        (
            s("overlay:inner:in"),
            "in",
            s(&ip_b),
            s(&ip_a),
            s(""),
            s("0"),
        ),
        (
            format!("{pod_a}:out"),
            "out",
            s(&ip_b),
            s(&ip_a),
            s(""),
            s("0"),
        ),
    ];
    assert_eq!(rows(&f1), want1, "node 1 ({f1})");
    let want2 = vec![
        (
            s("overlay:outer:in"),
            "in",
            outer(&ul1, &ip_a),
            outer(&ul2, &ip_b),
            s("1"),
            s("8"),
        ),
        (
            s("overlay:inner:in"),
            "in",
            s(&ip_a),
            s(&ip_b),
            s(""),
            s("8"),
        ),
        (
            format!("{pod_b}:out"),
            "out",
            s(&ip_a),
            s(&ip_b),
            s(""),
            s("8"),
        ),
        (
            format!("{pod_b}:in"),
            "in",
            s(&ip_b),
            s(&ip_a),
            s(""),
            s("0"),
        ),
        (
            s("overlay:inner:out"),
            "out",
            s(&ip_b),
            s(&ip_a),
            s(""),
            s("0"),
        ),
        (
            s("overlay:outer:out"),
            "out",
            outer(&ul2, &ip_b),
            outer(&ul1, &ip_a),
            s("1"),
            s("0"),
        ),
    ];
    assert_eq!(rows(&f2), want2, "node 2 ({f2})");
    // The outer packets are real VXLAN to tshark, on the flow's own source port.
    let udp = tshark(&f1, &["udp.srcport", "udp.dstport", "vxlan.flags"]);
    let sport: u16 = udp[2][0].parse().expect("source port");
    assert!(sport >= 1024, "{udp:?}");
    assert_eq!(udp[2][1], "8472");

    let live = live.wait_with_output().expect("tcpdump");
    let out = String::from_utf8_lossy(&live.stdout);
    let lines: Vec<&str> = out.lines().filter(|l| l.contains(" IP ")).collect();
    assert_eq!(lines.len(), 2, "tcpdump -r - read: {out}");
    assert!(
        lines[0].contains(&format!("{ip_a} > {ip_b}: ICMP echo request")),
        "{out}"
    );
    assert!(
        lines[1].contains(&format!("{ip_b} > {ip_a}: ICMP echo reply")),
        "{out}"
    );
}

/// Appends a Service to a node's config file; the daemon reloads it within a second or so.
fn add_service(node: &Node, vip: &str, port: u16, backend: &str, target: u16) {
    let svc = format!(
        "\n[[services]]\nnamespace = \"default\"\nname = \"capweb\"\ncluster_ips = [\"{vip}\"]\n\
         ports = [{{ port = {port}, target_port = {target} }}]\nendpoints = [{{ ip = \"{backend}\" }}]\n"
    );
    let mut text = std::fs::read_to_string(&node.config).expect("config");
    text.push_str(&svc);
    std::fs::write(&node.config, text).expect("config");
    let loaded = wait_until(Duration::from_secs(10), || {
        node.client()
            .get::<ServicesResponse>(PATH_SERVICES)
            .is_ok_and(|r| r.frontends.iter().any(|f| f.vip.to_string() == vip))
    });
    assert!(loaded, "{}: the Service {vip} was not loaded", node.name);
}

#[test]
fn a_cluster_ip_connection_is_seen_before_and_after_translation() {
    let lab = lab("cp", 2, 2);
    let n1 = lab.node("n1").clone();
    let (client, backend) = (lab.pod("n1-p1").clone(), lab.pod("n2-p2").clone());
    let vip = "10.96.0.77";
    add_service(&n1, vip, 80, &backend.ip.to_string(), 8080);
    let server = Bg::spawn(
        &backend.netns,
        &["socat", "-u", "TCP-LISTEN:8080,reuseaddr", "OPEN:/dev/null"],
        Duration::from_secs(20),
    );
    wait_listening(&backend.netns, "t", 8080);
    let dir_ = Scratch::new("nat");
    let f = dir_.file("nat.pcapng");
    let cap = Capture::start(
        &n1,
        &["--point", "nat", "-w", &f, "tcp"],
        Duration::from_secs(30),
    );
    let o = run_in(
        &client.netns,
        &[
            "socat",
            "-u",
            "OPEN:/etc/hostname",
            &format!("TCP:{vip}:80"),
        ],
        Duration::from_secs(10),
    );
    assert!(o.status.success(), "connect to {vip}:80: {}", text(&o));
    // Let the last ACKs pass, then Ctrl-C.
    std::thread::sleep(Duration::from_millis(500));
    let mut cap = cap;
    let out = cap.interrupt();
    drop(server);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        err.contains("packets captured"),
        "no summary on Ctrl-C: {err}"
    );
    assert!(err.contains("0 packets dropped"), "{err}");

    let rows = tshark(
        &f,
        &[
            "frame.interface_name",
            "frame.packet_flags_direction",
            "ip.src",
            "tcp.srcport",
            "ip.dst",
            "tcp.dstport",
        ],
    );
    let (c, b) = (client.ip.to_string(), backend.ip.to_string());
    let ep = |ip: &str, port: &str| format!("{ip}:{port}");
    let seen: Vec<(String, &str, String, String)> = rows
        .iter()
        .map(|r| (r[0].clone(), dir(&r[1]), ep(&r[2], &r[3]), ep(&r[4], &r[5])))
        .collect();
    assert!(seen.len() >= 6, "a TCP connection both ways: {seen:?}");
    // Every packet appears in pairs: before (inbound) then after (outbound).
    for pair in seen.chunks(2) {
        assert_eq!(pair.len(), 2, "{seen:?}");
        assert_eq!(
            (pair[0].0.as_str(), pair[0].1),
            ("nat:before", "in"),
            "{seen:?}"
        );
        assert_eq!(
            (pair[1].0.as_str(), pair[1].1),
            ("nat:after", "out"),
            "{seen:?}"
        );
        let client_side = pair[0].2.starts_with(&c);
        if client_side {
            // Client -> ClusterIP becomes client -> backend.
            assert_eq!(pair[0].3, ep(vip, "80"), "{seen:?}");
            assert_eq!(pair[1].3, ep(&b, "8080"), "{seen:?}");
            assert_eq!(pair[0].2, pair[1].2, "{seen:?}");
        } else {
            // Backend -> client becomes ClusterIP -> client.
            assert_eq!(pair[0].2, ep(&b, "8080"), "{seen:?}");
            assert_eq!(pair[1].2, ep(vip, "80"), "{seen:?}");
            assert_eq!(pair[0].3, pair[1].3, "{seen:?}");
        }
    }
    assert!(
        seen.iter().any(|r| r.2.starts_with(&b)),
        "replies are translated too: {seen:?}"
    );
}

fn files_like(dir: &Path, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_filter_keeps_only_matching_packets_and_files_rotate() {
    let lab = lab("cp", 2, 1);
    let n1 = lab.node("n1").clone();
    let (a, b) = (lab.pod("n1-p1").clone(), lab.pod("n2-p1").clone());
    let dir_ = Scratch::new("rot");
    let ring = dir_.file("ring");
    let all = dir_.file("all");
    let filter = ["udp", "and", "dst", "port", "5201"];
    let mut args = vec![
        "--point",
        "pod",
        "--direction",
        "in",
        "-w",
        &ring,
        "-C",
        "1",
        "-W",
        "3",
    ];
    args.extend_from_slice(&filter);
    let c_ring = Capture::start(&n1, &args, Duration::from_secs(40));
    let mut args = vec!["--point", "pod", "-w", &all, "-C", "1"];
    args.extend_from_slice(&filter);
    let c_all = Capture::start(&n1, &args, Duration::from_secs(40));

    // Traffic the filter must leave out (ICMP, and iperf3's TCP control connection), and
    // about 5 MB it keeps: 1400-byte datagrams at 20 Mbit/s for 2 seconds.
    let pings = ping_bg(&a.netns, b.ip, 5, &["-i", "0.2"]);
    let report = iperf(&a.netns, &b.netns, b.ip, &["-u", "-b", "20M", "-l", "1400"]);
    let (sent, _) = iperf_sum(&report, "sum");
    assert!(sent > 3_000_000, "iperf3 sent {sent} bytes");
    let _ = pings.wait(Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(500));
    let (mut c_ring, mut c_all) = (c_ring, c_all);
    let (o_ring, o_all) = (c_ring.interrupt(), c_all.interrupt());
    assert!(o_ring.status.success(), "{}", text(&o_ring));
    assert!(o_all.status.success(), "{}", text(&o_all));

    // Without -W: all, all1, all2, ... each a readable capture of at most ~1 MB plus a packet,
    // together every matching packet.
    let names = files_like(&dir_.0, "all");
    assert!(names.len() >= 4, "5 MB in 1 MB files: {names:?}");
    let mut want = vec!["all".to_string()];
    want.extend((1..names.len()).map(|i| format!("all{i}")));
    let mut sorted_want = want.clone();
    sorted_want.sort();
    assert_eq!(names, sorted_want);
    let mut total = 0;
    for n in &want {
        let path = dir_.file(n);
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        assert!(size <= 1_000_000 + 2000, "{n}: {size} bytes");
        let rows = tshark(&path, &["frame.interface_name", "ip.proto", "udp.dstport"]);
        assert!(!rows.is_empty(), "{n} holds no packet");
        for r in &rows {
            assert_eq!(
                r[1..],
                ["17", "5201"],
                "{n}: a packet the filter does not match: {r:?}"
            );
            assert_eq!(r[0], format!("pod:default/{}:in", a.k8s_name), "{n}: {r:?}");
        }
        total += rows.len();
    }
    let err = String::from_utf8_lossy(&o_all.stderr).into_owned();
    assert!(
        err.contains(&format!("{total} packets captured")),
        "the files hold {total} packets: {err}"
    );
    // With -W 3: ring0, ring1, ring2 reused in turn, nothing else.
    assert_eq!(files_like(&dir_.0, "ring"), ["ring0", "ring1", "ring2"]);
    for n in ["ring0", "ring1", "ring2"] {
        let rows = tshark(&dir_.file(n), &["udp.dstport"]);
        assert!(
            !rows.is_empty() && rows.iter().all(|r| r[0] == "5201"),
            "{n}"
        );
    }
}

#[test]
fn bad_requests_are_refused_with_the_reason() {
    let lab = lab("cp", 1, 1);
    let n1 = lab.node("n1").clone();
    let o = vswitchctl(&n1, &["capture", "tcp", "udp"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("syntax error at 'udp'"), "{}", text(&o));
    let o = vswitchctl(&n1, &["capture", "--point", "bogus"]);
    assert!(
        !o.status.success() && text(&o).contains("bogus"),
        "{}",
        text(&o)
    );
    let o = vswitchctl(&n1, &["capture", "--pod", "default/nope"]);
    assert!(
        !o.status.success() && text(&o).contains("no pod default/nope"),
        "{}",
        text(&o)
    );
    assert!(sessions(&n1).is_empty(), "no session was opened");
}

/// The outside host's servers for the egress capture: TCP 47001 answers `tcp-reply-` and what
/// it read, then closes; UDP 47002 answers `udp-reply-` and the datagram; each logs the peer.
const EGRESS_SERVERS: &str = r#"
import socket, threading
def tcp():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 47001)); s.listen(8)
    while True:
        c, a = s.accept(); print("tcp %s:%d" % a, flush=True)
        d = c.recv(100); c.sendall(b"tcp-reply-" + d); c.close()
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 47002))
    while True:
        d, a = s.recvfrom(2048); print("udp %s:%d" % a, flush=True); s.sendto(b"udp-reply-" + d, a)
threading.Thread(target=tcp, daemon=True).start()
udp()
"#;

/// The pod's side: one datagram and one request, printing the answers.
const EGRESS_CLIENT: &str = r#"
import socket, sys
out = sys.argv[1]
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
u.sendto(b"udp-hello-egress", (out, 47002)); print(u.recv(100).decode())
t = socket.create_connection((out, 47001), timeout=10); t.sendall(b"tcp-hello-egress"); r = b""
while True:
    b = t.recv(100)
    if not b: break
    r += b
t.close(); print(r.decode())
"#;

/// Hex of `s` as tshark prints a byte field (no separators).
fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn egress_translation_is_seen_on_the_pods_side_and_the_nodes() {
    let lab = lab("cg", 1, 1);
    let n1 = lab.node("n1").clone();
    let pod = lab.pod("n1-p1").clone();
    let out_ns = lab
        .outside_netns
        .clone()
        .expect("the lab has an outside host");
    let out = "192.168.100.253";
    let server = Bg::spawn(
        &out_ns,
        &[vswitch_tests::python(), "-u", "-c", EGRESS_SERVERS],
        Duration::from_secs(60),
    );
    wait_listening(&out_ns, "t", 47001);
    wait_listening(&out_ns, "u", 47002);
    let dir_ = Scratch::new("egress");
    let (f_node, f_pod) = (dir_.file("node.pcapng"), dir_.file("pod.pcapng"));
    let mut c_node = Capture::start(
        &n1,
        &["--point", "egress:node", "-w", &f_node],
        Duration::from_secs(40),
    );
    let mut c_pod = Capture::start(
        &n1,
        &["--point", "egress:pod", "-w", &f_pod, "not arp"],
        Duration::from_secs(40),
    );
    let o = run_in(
        &pod.netns,
        &[vswitch_tests::python(), "-c", EGRESS_CLIENT, out],
        Duration::from_secs(20),
    );
    assert!(o.status.success(), "the pod's client: {}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "udp-reply-udp-hello-egress\ntcp-reply-tcp-hello-egress"
    );
    let p = ping(&pod.netns, out, 1, &[]);
    assert!(p.all_answered(), "ping: {}", p.text);
    // Let the last FIN and ACKs pass, then Ctrl-C.
    std::thread::sleep(Duration::from_millis(500));
    let o_node = c_node.interrupt();
    let o_pod = c_pod.interrupt();
    let log = String::from_utf8_lossy(&server.stop().stdout).into_owned();
    for o in [&o_node, &o_pod] {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("0 packets dropped"), "{}", text(o));
    }
    // Where the outside host saw each flow come from.
    let seen = |proto: &str| -> String {
        log.lines()
            .find_map(|l| l.strip_prefix(&format!("{proto} ")))
            .unwrap_or_else(|| panic!("the server saw no {proto} peer: {log}"))
            .to_string()
    };
    let (udp_peer, tcp_peer) = (seen("udp"), seen("tcp"));
    let node_ip = n1.underlay_ip.to_string();
    assert!(udp_peer.starts_with(&format!("{node_ip}:")), "{udp_peer}");
    assert!(tcp_peer.starts_with(&format!("{node_ip}:")), "{tcp_peer}");

    let fields = [
        "frame.interface_name",
        "frame.packet_flags_direction",
        "ip.src",
        "ip.dst",
        "udp.srcport",
        "udp.dstport",
        "tcp.srcport",
        "tcp.dstport",
        "tcp.flags.str",
        "udp.payload",
        "tcp.payload",
        "icmp.type",
        "ip.checksum.status",
        "udp.checksum.status",
        "tcp.checksum.status",
        "icmp.checksum.status",
    ];
    let read = |f: &str| -> Vec<Vec<String>> {
        let mut argv = vec![
            "tshark",
            "-n",
            "-r",
            f,
            "-o",
            "ip.check_checksum:TRUE",
            "-o",
            "udp.check_checksum:TRUE",
            "-o",
            "tcp.check_checksum:TRUE",
            "-T",
            "fields",
        ];
        for x in &fields {
            argv.push("-e");
            argv.push(x);
        }
        let o = run_host(&argv);
        assert!(o.status.success(), "tshark -r {f}: {}", text(&o));
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                // Byte fields may come with colons between the bytes.
                let mut r: Vec<String> = l
                    .split('\t')
                    .map(|x| {
                        if x.len() > 2 && x.as_bytes()[2] == b':' {
                            x.replace(':', "")
                        } else {
                            x.to_string()
                        }
                    })
                    .collect();
                r.resize(fields.len(), String::new());
                r
            })
            .collect()
    };
    let col = |f: &str| fields.iter().position(|x| *x == f).expect("a field");
    let (iface, dirc, src, dst) = (
        col("frame.interface_name"),
        col("frame.packet_flags_direction"),
        col("ip.src"),
        col("ip.dst"),
    );
    let (usport, tsport, flags) = (col("udp.srcport"), col("tcp.srcport"), col("tcp.flags.str"));
    let (upay, tpay, icmp) = (col("udp.payload"), col("tcp.payload"), col("icmp.type"));

    // The node's side: from the node's address (and the port the outside saw) to `out`.
    let node_rows = read(&f_node);
    let show = |rows: &[Vec<String>]| {
        rows.iter()
            .map(|r| r.join(" "))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let ns = show(&node_rows);
    assert!(!node_rows.is_empty(), "nothing at egress:node");
    for r in &node_rows {
        assert!(r[iface].starts_with("egress:node:"), "{ns}");
        let (from_node, to_node) = (
            r[src] == node_ip && r[dst] == out,
            r[src] == out && r[dst] == node_ip,
        );
        assert!(from_node || to_node, "only the node and `out`: {ns}");
        assert_eq!(dir(&r[dirc]), if from_node { "out" } else { "in" }, "{ns}");
        // Every checksum tshark checked is good (1); none bad (0).
        for c in [
            "ip.checksum.status",
            "udp.checksum.status",
            "tcp.checksum.status",
            "icmp.checksum.status",
        ] {
            let v = &r[col(c)];
            assert!(v.is_empty() || v == "1", "{c} {v}: {ns}");
        }
    }
    let has = |rows: &[Vec<String>], pred: &dyn Fn(&Vec<String>) -> bool| rows.iter().any(pred);
    let udp_port = udp_peer.rsplit(':').next().unwrap_or_default().to_string();
    let tcp_port = tcp_peer.rsplit(':').next().unwrap_or_default().to_string();
    assert!(
        has(&node_rows, &|r| r[src] == node_ip
            && r[usport] == udp_port
            && r[upay].contains(&hex("udp-hello-egress"))),
        "the datagram from the node's socket ({udp_peer}): {ns}"
    );
    assert!(
        has(&node_rows, &|r| r[src] == out
            && r[upay].contains(&hex("udp-reply-udp-hello-egress"))),
        "the answer to the node: {ns}"
    );
    assert!(
        has(&node_rows, &|r| r[src] == node_ip
            && r[tsport] == tcp_port
            && r[flags].contains('S')),
        "the node's SYN from {tcp_peer}: {ns}"
    );
    assert!(
        has(&node_rows, &|r| r[src] == node_ip
            && r[tsport] == tcp_port
            && r[tpay].contains(&hex("tcp-hello-egress"))),
        "the request's bytes from {tcp_peer}: {ns}"
    );
    assert!(
        has(&node_rows, &|r| r[src] == out
            && r[tpay].contains(&hex("tcp-reply-tcp-hello-egress"))),
        "the answer's bytes: {ns}"
    );
    assert!(
        has(&node_rows, &|r| r[src] == out && r[flags].contains('F')),
        "the outside's FIN: {ns}"
    );
    assert!(
        has(&node_rows, &|r| r[src] == node_ip && r[icmp] == "8")
            && has(&node_rows, &|r| r[src] == out && r[icmp] == "0"),
        "the echo request and reply: {ns}"
    );

    // The pod's side: the pod's address and the same bytes.
    let pod_rows = read(&f_pod);
    let ps = show(&pod_rows);
    let pod_ip = pod.ip.to_string();
    for r in &pod_rows {
        assert!(r[iface].starts_with("egress:pod:"), "{ps}");
        let from_pod = r[src] == pod_ip && r[dst] == out;
        assert!(
            from_pod || (r[src] == out && r[dst] == pod_ip),
            "only the pod and `out`: {ps}"
        );
        assert_eq!(dir(&r[dirc]), if from_pod { "in" } else { "out" }, "{ps}");
    }
    assert!(
        has(&pod_rows, &|r| r[src] == pod_ip
            && r[upay].contains(&hex("udp-hello-egress"))),
        "{ps}"
    );
    assert!(
        has(&pod_rows, &|r| r[src] == out
            && r[upay].contains(&hex("udp-reply-udp-hello-egress"))),
        "{ps}"
    );
    assert!(
        has(&pod_rows, &|r| r[src] == pod_ip
            && r[tpay].contains(&hex("tcp-hello-egress"))),
        "{ps}"
    );
    assert!(
        has(&pod_rows, &|r| r[src] == out
            && r[tpay].contains(&hex("tcp-reply-tcp-hello-egress"))),
        "smoltcp's segment to the pod: {ps}"
    );
    assert!(
        has(&pod_rows, &|r| r[src] == out && r[icmp] == "0"),
        "the echo reply to the pod: {ps}"
    );
}
