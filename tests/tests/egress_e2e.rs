//! End-to-end tests of egress translation (issue 27) in the lab: pods reach the lab's outside
//! host `out` (on the nodes' LAN, with no route to any pod CIDR, so only what leaves from a
//! node's address can be answered) with no iptables rule anywhere: the switch ends each
//! connection and opens it again from a socket of the node.
//!
//! What is shown:
//! 1. from pods on two nodes: a server on `out` sees each node's address; a download and an
//!    upload arrive whole; the outside's half-close (FIN) reaches the pod, which can still send
//!    after it, and the pod's half-close reaches the outside, which can still answer; the
//!    outside's RST reaches the pod and the pod's RST reaches the outside; a refused port is
//!    refused at once; ping, UDP and a DNS query to a resolver on `out` get their answers;
//!    `vswitchctl egress` (the admin API) lists the flows with the pod's name;
//! 2. `egress.max_connections_per_pod` holds and is counted, connections over it are refused,
//!    closed ones free their place, and a pod's flows go with its CNI DEL;
//! 3. the outside's ICMP errors about UDP reach the pod: a router's "fragmentation needed"
//!    (with its MTU) and "host unreachable", and the node's own "fragmentation needed" for a DF
//!    datagram larger than the path MTU it learned; datagrams without DF still go through.
//!
//! Needs root, iproute2, ping, dig and python3. Each test builds its own lab with a unique name,
//! torn down when its guard drops (also on failure); every process runs under `timeout`.

use std::time::Duration;

use conf::api::{EgressResponse, PATH_EGRESS};
use vswitch_lab::{LabSpec, Node};
use vswitch_tests::{
    exec_in, have, ip, python, require_root, unique, wait_until, Bg, LabGuard, Netns,
};

const OUT: &str = "192.168.100.253";
const LIMIT: Duration = Duration::from_secs(20);

/// The outside host's servers, each on its own port, logging what they see on stdout:
/// - 9000 TCP: says the client's address and closes;
/// - 9001 TCP: reads to EOF (the client's half-close), then answers `got N` and closes;
/// - 9002 TCP: sends N bytes (argv[1]) and closes;
/// - 9003 TCP: reads a line, then resets the connection (SO_LINGER 0);
/// - 9004 TCP: sends `hello`, half-closes, reads to EOF and logs `after-eof DATA`;
/// - 9005 TCP: reads until the client resets, logs `reset-seen`;
/// - 9006 TCP: holds connections open until the client closes;
/// - 9007 TCP: accepts and never reads (a stalled peer);
/// - 9005 UDP: answers `ADDR DATA`;
/// - 53 UDP: answers every A query with 192.0.2.1.
const SERVERS: &str = r#"
import socket, struct, sys, threading
big = int(sys.argv[1])
lock = threading.Lock()
def log(s):
    with lock:
        sys.stdout.write(s + "\n"); sys.stdout.flush()

def readall(c):
    n, data = 0, b""
    while True:
        b = c.recv(65536)
        if not b: return n, data
        n += len(b); data = (data + b)[-200:]

def h9000(c, a): c.sendall((a[0] + "\n").encode()); c.close()
def h9001(c, a):
    n, _ = readall(c); c.sendall(("got %d\n" % n).encode()); c.close()
def h9002(c, a):
    chunk = b"x" * 65536; left = big
    while left > 0:
        k = min(left, len(chunk)); c.sendall(chunk[:k]); left -= k
    c.close()
def h9003(c, a):
    c.recv(100)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)); c.close()
def h9004(c, a):
    c.sendall(b"hello\n"); c.shutdown(socket.SHUT_WR)
    _, data = readall(c); log("after-eof " + data.decode().strip()); c.close()
def h9005(c, a):
    try:
        readall(c); log("closed-in-order")
    except ConnectionResetError:
        log("reset-seen")
    c.close()
def h9006(c, a):
    try: readall(c)
    except OSError: pass
    c.close()

def h9007(c, a):
    import time; time.sleep(100)

def serve(port, h):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(64)
    while True:
        c, a = s.accept()
        log("peer %d %s" % (port, a[0]))
        threading.Thread(target=h, args=(c, a), daemon=True).start()

def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 9005))
    while True:
        d, a = s.recvfrom(2048); log("udp %s" % a[0]); s.sendto(a[0].encode() + b" " + d, a)

def dns():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 53))
    while True:
        q, a = s.recvfrom(2048)
        if len(q) < 12: continue
        i = 12
        while i < len(q) and q[i] != 0: i += q[i] + 1
        question = q[12:i + 5]
        hdr = q[:2] + b"\x81\x80" + b"\x00\x01\x00\x01\x00\x00\x00\x00"
        ans = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + bytes([192, 0, 2, 1])
        log("dns %s" % a[0]); s.sendto(hdr + question + ans, a)

for p, h in [(9000, h9000), (9001, h9001), (9002, h9002), (9003, h9003), (9004, h9004),
             (9005, h9005), (9006, h9006), (9007, h9007)]:
    threading.Thread(target=serve, args=(p, h), daemon=True).start()
threading.Thread(target=udp, daemon=True).start()
threading.Thread(target=dns, daemon=True).start()
log("listening")
threading.Event().wait()
"#;

/// A pod's side of the TCP cases: `client CASE`, printing what it sees.
const CLIENT: &str = r#"
import socket, struct, sys
OUT = sys.argv[1]; case = sys.argv[2]
def conn(port):
    s = socket.create_connection((OUT, port), timeout=10); return s
def readall(s):
    n = 0
    while True:
        b = s.recv(65536)
        if not b: return n
        n += len(b)
if case == "upload":
    s = conn(9001); n = int(sys.argv[3]); chunk = b"u" * 65536; left = n
    while left > 0:
        k = min(left, len(chunk)); s.sendall(chunk[:k]); left -= k
    s.shutdown(socket.SHUT_WR)
    print(s.recv(100).decode().strip())
elif case == "download":
    print("read %d" % readall(conn(9002)))
elif case == "outside-reset":
    s = conn(9003); s.sendall(b"go\n")
    try:
        s.recv(100); s.recv(100); print("no reset")
    except ConnectionResetError:
        print("reset by peer")
elif case == "outside-halfclose":
    s = conn(9004); got = b""
    while True:
        b = s.recv(100)
        if not b: break
        got += b
    print("got " + got.decode().strip() + " then eof")
    s.sendall(b"still-here\n"); s.close()
elif case == "pod-reset":
    s = conn(9005); s.sendall(b"x")
    import time; time.sleep(0.3)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)); s.close()
    print("reset sent")
elif case == "refused":
    try:
        conn(9999); print("connected")
    except ConnectionRefusedError:
        print("refused")
elif case == "unreachable":
    try:
        socket.create_connection(("192.168.100.252", 80), timeout=15); print("connected")
    except OSError as e:
        print("errno %s" % e.errno)
elif case == "udp-closed":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
    s.connect((OUT, 9999)); s.send(b"anyone?")
    try:
        s.recv(100); print("answered")
    except ConnectionRefusedError:
        print("port unreachable")
elif case == "stall":
    # Writes to a peer that never reads until nothing moves for 2 s: how much went.
    s = conn(9007); s.settimeout(2); chunk = b"s" * 65536; n = 0
    try:
        while n < 500 * 1024 * 1024:
            n += s.send(chunk)
    except socket.timeout:
        pass
    print(n)
elif case == "hold":
    # Opens N connections, says which opened, keeps them a while, closes them.
    n = int(sys.argv[3]); held = []; res = []
    for i in range(n):
        try:
            held.append(conn(9006)); res.append("ok")
        except OSError as e:
            res.append(type(e).__name__)
    print(" ".join(res)); sys.stdout.flush()
    import time; time.sleep(float(sys.argv[4]))
    for s in held: s.close()
"#;

fn servers(lab: &LabGuard) -> Bg {
    let ns = lab
        .outside_netns
        .clone()
        .expect("the lab has an outside host");
    let big = (4 * 1024 * 1024).to_string();
    let bg = Bg::spawn(
        &ns,
        &[python(), "-u", "-c", SERVERS, &big],
        Duration::from_secs(120),
    );
    // Listening once a client gets an answer from it (from the outside host itself).
    assert!(
        wait_until(Duration::from_secs(10), || {
            let probe = "import socket; socket.create_connection(('127.0.0.1', 9000), timeout=1)";
            exec_in(&ns, &[python(), "-c", probe], LIMIT).success()
        }),
        "the outside host's servers did not start"
    );
    bg
}

fn client(lab: &LabGuard, pod: &str, args: &[&str]) -> String {
    let ns = lab.pod(pod).netns.clone();
    let mut argv = vec![python(), "-c", CLIENT, OUT];
    argv.extend_from_slice(args);
    exec_in(&ns, &argv, LIMIT).ok().trim().to_string()
}

fn egress(node: &Node) -> EgressResponse {
    node.client()
        .get::<EgressResponse>(PATH_EGRESS)
        .unwrap_or_else(|e| panic!("GET {PATH_EGRESS} on {}: {e}", node.name))
}

#[test]
fn pods_reach_the_outside_from_their_nodes_address_both_ways() {
    require_root();
    assert!(have("dig") && have("ping"), "needs dig (dnsutils) and ping");
    let name = unique("e");
    let lab = LabGuard::up(LabSpec::new(&name, 2, 1))
        .unwrap_or_else(|e| panic!("lab {name} did not come up: {e}"));
    let srv = servers(&lab);
    let out_ns = lab.outside_netns.clone().unwrap_or_default();
    // The outside host has no way to the pods: what answers them is translation.
    let routes = exec_in(&out_ns, &["ip", "route"], LIMIT).ok();
    assert!(!routes.contains("10.244"), "{routes}");

    // The server sees each pod's node, not the pod.
    for (pod, node_ip) in [("n1-p1", "192.168.100.1"), ("n2-p1", "192.168.100.2")] {
        let ns = lab.pod(pod).netns.clone();
        let seen = exec_in(
            &ns,
            &[python(), "-c", "import socket,sys; s=socket.create_connection((sys.argv[1],9000),timeout=10); print(s.recv(100).decode().strip())", OUT],
            LIMIT,
        )
        .ok();
        assert_eq!(
            seen.trim(),
            node_ip,
            "{pod} is seen from its node's address"
        );
    }

    // Bulk both ways, with the half-closes that end them.
    assert_eq!(client(&lab, "n1-p1", &["download"]), "read 4194304");
    assert_eq!(
        client(&lab, "n1-p1", &["upload", "3000000"]),
        "got 3000000",
        "the pod's FIN reached the outside, whose answer came after it"
    );
    assert_eq!(
        client(&lab, "n1-p1", &["outside-halfclose"]),
        "got hello then eof"
    );
    assert_eq!(client(&lab, "n1-p1", &["outside-reset"]), "reset by peer");
    assert_eq!(client(&lab, "n1-p1", &["pod-reset"]), "reset sent");
    assert_eq!(client(&lab, "n1-p1", &["refused"]), "refused");
    // The outside's ICMP errors: a host nobody holds (the node's ARP fails), a closed UDP port.
    assert_eq!(
        client(&lab, "n1-p1", &["unreachable"]),
        format!("errno {}", libc::EHOSTUNREACH)
    );
    assert_eq!(client(&lab, "n1-p1", &["udp-closed"]), "port unreachable");

    // A peer that stops reading stops the pod (its window closes): vswitchd holds a bounded
    // amount, whatever the pod tries to send.
    let pid = lab.nodes[0].pid.expect("node 1's vswitchd");
    let rss = || {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = rss();
    let sent: u64 = client(&lab, "n1-p1", &["stall"])
        .parse()
        .expect("bytes sent");
    let grown = rss().saturating_sub(before);
    assert!(
        sent < 64 * 1024 * 1024,
        "{sent} bytes went to a peer that reads nothing"
    );
    assert!(
        grown < 16 * 1024,
        "vswitchd grew by {grown} kB for a stalled peer"
    );
    eprintln!("stalled peer: the pod got {sent} bytes out; vswitchd grew by {grown} kB");

    // Ping, UDP, DNS.
    let ns1 = lab.pod("n1-p1").netns.clone();
    exec_in(&ns1, &["ping", "-c", "2", "-W", "2", OUT], LIMIT).ok();
    let udp = exec_in(
        &ns1,
        &[python(), "-c", "import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(5); s.sendto(b'ping-udp',(sys.argv[1],9005)); print(s.recv(100).decode())", OUT],
        LIMIT,
    )
    .ok();
    assert_eq!(udp.trim(), "192.168.100.1 ping-udp");
    let dig = exec_in(
        &ns1,
        &[
            "dig",
            "+short",
            "+tries=1",
            "+time=3",
            &format!("@{OUT}"),
            "example.test",
            "A",
        ],
        LIMIT,
    )
    .ok();
    assert_eq!(dig.trim(), "192.0.2.1");

    // The admin API lists the flows still open (the echo and UDP flows idle for 30 s).
    let n1 = lab.nodes[0].clone();
    let e = egress(&n1);
    assert!(e.enabled);
    assert!(
        e.connections.iter().any(|c| c.protocol == "ICMP"
            && c.destination.ip().to_string() == OUT
            && c.pod.as_deref().is_some_and(|p| p.ends_with("p1"))),
        "{e:?}"
    );
    assert!(
        e.connections
            .iter()
            .any(|c| c.protocol == "UDP" && c.bytes_in > 0),
        "{e:?}"
    );
    assert!(e.counters["tcp_opened"] >= 6, "{e:?}");
    assert!(e.counters["tcp_refused"] >= 1, "{e:?}");

    let log = srv.stop().stdout;
    assert!(
        log.contains("after-eof still-here"),
        "the pod sent after the outside's FIN:\n{log}"
    );
    assert!(
        log.contains("reset-seen"),
        "the pod's RST reached the outside:\n{log}"
    );
    assert!(
        !log.contains(" 10.244."),
        "the outside saw a pod address:\n{log}"
    );
    assert!(log.contains("dns 192.168.100.1"), "{log}");
}

#[test]
fn connection_limits_hold_are_counted_and_a_pods_flows_go_with_it() {
    require_root();
    let name = unique("e");
    let mut lab = LabGuard::up(LabSpec::new(&name, 1, 0))
        .unwrap_or_else(|e| panic!("lab {name} did not come up: {e}"));
    let node = lab.nodes[0].clone();
    let text = std::fs::read_to_string(&node.config).expect("the lab's config");
    assert!(text.contains("[egress]\nenabled = true\n"), "{text}");
    let text = text.replace(
        "[egress]\nenabled = true\n",
        "[egress]\nenabled = true\nmax_connections_per_pod = 3\n",
    );
    std::fs::write(&node.config, text).expect("writing the config");
    lab.restart_daemon(0, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("vswitchd did not come back: {e}"));
    lab.add_pod(1, "p1").expect("a pod");
    let _srv = servers(&lab);

    // Five at once: three open, the others are refused at once (RST), and counted.
    let ns = lab.pod("n1-p1").netns.clone();
    let hold = Bg::spawn(
        &ns,
        &[python(), "-u", "-c", CLIENT, OUT, "hold", "5", "3"],
        LIMIT,
    );
    let node = lab.nodes[0].clone();
    assert!(
        wait_until(Duration::from_secs(10), || egress(&node).counters
            ["limit_pod"]
            >= 2),
        "{:?}",
        egress(&node)
    );
    assert_eq!(egress(&node).connections.len(), 3);
    let metrics = exec_in(
        &node.netns,
        &["curl", "-s", "http://127.0.0.1:9109/metrics"],
        LIMIT,
    )
    .ok();
    let hits: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("vswitch_egress_events_total{event=\"limit_pod\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no limit_pod counter in the metrics:\n{metrics}"));
    assert!(hits >= 2, "{metrics}");
    assert!(
        metrics.contains("vswitch_egress_connections 3"),
        "{metrics}"
    );
    let out = hold.wait(LIMIT);
    assert_eq!(
        out.stdout.trim(),
        "ok ok ok ConnectionRefusedError ConnectionRefusedError",
        "{out}"
    );
    // Closed connections free their places.
    assert!(
        wait_until(Duration::from_secs(5), || egress(&node)
            .connections
            .is_empty()),
        "{:?}",
        egress(&node)
    );
    assert_eq!(client(&lab, "n1-p1", &["hold", "3", "0"]), "ok ok ok");
    assert!(
        wait_until(Duration::from_secs(5), || egress(&node)
            .connections
            .is_empty()),
        "{:?}",
        egress(&node)
    );

    // A pod that goes takes its flows with it.
    let keep = Bg::spawn(
        &ns,
        &[python(), "-u", "-c", CLIENT, OUT, "hold", "2", "30"],
        LIMIT + LIMIT,
    );
    assert!(
        wait_until(Duration::from_secs(10), || egress(&node).connections.len()
            == 2),
        "{:?}",
        egress(&node)
    );
    // The client still holds them when its pod is deleted.
    lab.del_pod("n1-p1").expect("CNI DEL");
    assert!(
        wait_until(Duration::from_secs(5), || egress(&node)
            .connections
            .is_empty()),
        "{:?}",
        egress(&node)
    );
    drop(keep);
}

/// The far host's UDP server (port 9000): answers `got N` to each datagram of N bytes.
const FAR_SERVER: &str = r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 9000))
while True:
    d, a = s.recvfrom(65535)
    print("got %d from %s" % (len(d), a[0]), flush=True); s.sendto(b"got %d" % len(d), a)
"#;

/// A pod's UDP client: `CASE ADDR PORT` sends one datagram on a connected socket with
/// IP_RECVERR and prints what comes back: an answer, or the ICMP error its error queue got.
/// (1372 bytes of payload are 1400 of IP.)
/// - `df`: 1400 bytes of IP with DF (IP_PMTUDISC_DO); then the path MTU the pod's kernel
///   learned, and whether a second such datagram can be sent;
/// - `nodf`: 1400 bytes without DF (IP_PMTUDISC_DONT);
/// - `small`: a few bytes.
const PMTU_CLIENT: &str = r#"
import errno, select, socket, struct, sys
IP_MTU_DISCOVER, IP_PMTUDISC_DONT, IP_PMTUDISC_DO, IP_RECVERR, IP_MTU = 10, 0, 2, 11, 14
case, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT if case == "nodf" else IP_PMTUDISC_DO)
s.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
if case.startswith("ttl"):
    s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, int(case[3:]))
s.connect((addr, port))
def outcome():
    p = select.poll(); p.register(s, select.POLLIN)
    if not p.poll(5000): return "nothing"
    try:
        _, anc, _, _ = s.recvmsg(2048, 1024, socket.MSG_ERRQUEUE)
    except BlockingIOError:
        return "answer " + s.recv(2048).decode()
    for level, kind, data in anc:
        if level == socket.IPPROTO_IP and kind == IP_RECVERR:
            err, origin, t, code, _, info, _ = struct.unpack("=IBBBBII", data[:16])
            frm = socket.inet_ntoa(data[20:24]) if len(data) >= 24 else "-"
            return "icmp origin=%d type=%d code=%d info=%d errno=%s from=%s" % (
                origin, t, code, info, errno.errorcode.get(err, err), frm)
    return "no error"
s.send(b"x" * (5 if case == "small" or case.startswith("ttl") else 1372))
print(outcome())
if case == "df":
    print("mtu %d" % s.getsockopt(socket.IPPROTO_IP, IP_MTU))
    try:
        s.send(b"x" * 1372); print("resent")
    except OSError as e:
        print("resend " + errno.errorcode.get(e.errno, str(e.errno)))
"#;

const ROUTER: &str = "192.168.100.250";
const FAR: &str = "198.51.100.2";
const NOWHERE: &str = "203.0.113.5";

#[test]
fn the_outsides_icmp_errors_reach_the_pod() {
    require_root();
    let name = unique("e");
    let lab = LabGuard::up(LabSpec::new(&name, 1, 3))
        .unwrap_or_else(|e| panic!("lab {name} did not come up: {e}"));
    // A router on the nodes' LAN (ROUTER) in front of a far host (FAR) behind a link with MTU
    // 1280, and with no way to 203.0.113.0/24 (the kernel answers "host unreachable"). The
    // namespaces go when their guards drop (before the lab's), also on failure.
    let r = Netns::new(&unique("r"));
    let far = Netns::new(&unique("f"));
    lab.cable_to_fabric(r.name(), "eth0", "rtr0", &format!("{ROUTER}/24"), None)
        .unwrap_or_else(|e| panic!("cabling the router: {e}"));
    ip(&[
        "link",
        "add",
        "far0",
        "netns",
        r.name(),
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        far.name(),
    ]);
    ip(&[
        "-n",
        r.name(),
        "addr",
        "add",
        "198.51.100.1/24",
        "dev",
        "far0",
    ]);
    ip(&["-n", r.name(), "link", "set", "far0", "mtu", "1280", "up"]);
    ip(&[
        "-n",
        r.name(),
        "route",
        "add",
        "unreachable",
        "203.0.113.0/24",
    ]);
    exec_in(r.name(), &["sysctl", "-qw", "net.ipv4.ip_forward=1"], LIMIT).ok();
    // The router answers every packet here: its kernel would send one ICMP error a second to
    // the node after a burst of a few.
    exec_in(
        r.name(),
        &["sysctl", "-qw", "net.ipv4.icmp_ratelimit=0"],
        LIMIT,
    )
    .ok();
    ip(&[
        "-n",
        far.name(),
        "addr",
        "add",
        &format!("{FAR}/24"),
        "dev",
        "eth0",
    ]);
    ip(&["-n", far.name(), "link", "set", "eth0", "mtu", "1280", "up"]);
    ip(&[
        "-n",
        far.name(),
        "route",
        "add",
        "default",
        "via",
        "198.51.100.1",
    ]);
    let node = lab.nodes[0].clone();
    for net in ["198.51.100.0/24", "203.0.113.0/24"] {
        ip(&["-n", &node.netns, "route", "add", net, "via", ROUTER]);
    }
    let srv = Bg::spawn(
        far.name(),
        &[python(), "-u", "-c", FAR_SERVER],
        Duration::from_secs(120),
    );
    let probe = "import socket; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); \
                 s.settimeout(0.5); s.sendto(b'p',('127.0.0.1',9000)); s.recv(10)";
    assert!(
        wait_until(Duration::from_secs(10), || exec_in(
            far.name(),
            &[python(), "-c", probe],
            LIMIT
        )
        .success()),
        "the far host's server did not start"
    );
    let udp = |pod: &str, case: &str, dst: &str| {
        let ns = lab.pod(pod).netns.clone();
        exec_in(
            &ns,
            &[python(), "-c", PMTU_CLIENT, case, dst, "9000"],
            LIMIT,
        )
        .ok()
        .trim()
        .to_string()
    };

    // Without DF a datagram larger than the far link's MTU goes through (the router
    // fragments it; nobody has learned the path MTU yet).
    assert_eq!(udp("n1-p2", "nodf", FAR), "answer got 1372");

    // With DF, the router's "fragmentation needed" reaches the pod, from the router, with its
    // MTU, about the pod's own datagram: the pod's kernel learns the path MTU from it.
    let emsgsize = "errno=EMSGSIZE";
    assert_eq!(
        udp("n1-p1", "df", FAR),
        format!("icmp origin=2 type=3 code=4 info=1280 {emsgsize} from={ROUTER}\nmtu 1280\nresend EMSGSIZE")
    );
    let route = exec_in(&lab.pod("n1-p1").netns, &["ip", "route", "get", FAR], LIMIT).ok();
    assert!(route.contains("mtu 1280"), "{route}");

    // Now the node knows the path MTU: another pod's DF datagram too large for it is refused by
    // the node's own socket (EMSGSIZE), and the pod is told as a router would tell it.
    assert_eq!(
        udp("n1-p2", "df", FAR),
        format!("icmp origin=2 type=3 code=4 info=1280 {emsgsize} from={FAR}\nmtu 1280\nresend EMSGSIZE")
    );
    // And one without DF is fragmented by the node and still arrives whole.
    assert_eq!(udp("n1-p3", "nodf", FAR), "answer got 1372");

    // The router's "host unreachable" (a route of type unreachable) about a datagram, and
    // about an echo request.
    assert_eq!(
        udp("n1-p1", "small", NOWHERE),
        format!("icmp origin=2 type=3 code=1 info=0 errno=EHOSTUNREACH from={ROUTER}")
    );
    let ping = exec_in(
        &lab.pod("n1-p3").netns,
        &["ping", "-n", "-c", "1", "-W", "3", NOWHERE],
        LIMIT,
    );
    assert!(
        ping.stdout.contains(&format!(
            "From {ROUTER} icmp_seq=1 Destination Host Unreachable"
        )),
        "{ping}"
    );

    // A traceroute, hop by hop, as through a kernel router: the switch answers the first hop
    // (from the pod's gateway), the node's socket sends with the TTL left, so the router
    // answers the second, and the far host the third.
    let gw = lab.pod("n1-p2").cni_result["ips"][0]["gateway"]
        .as_str()
        .expect("the pod's gateway")
        .to_string();
    let expired = "icmp origin=2 type=11 code=0 info=0 errno=EHOSTUNREACH";
    assert_eq!(udp("n1-p2", "ttl1", FAR), format!("{expired} from={gw}"));
    assert_eq!(
        udp("n1-p2", "ttl2", FAR),
        format!("{expired} from={ROUTER}")
    );
    assert_eq!(udp("n1-p2", "ttl3", FAR), "answer got 5");
    let ping = exec_in(
        &lab.pod("n1-p1").netns,
        &["ping", "-n", "-c", "1", "-W", "3", "-t", "2", FAR],
        LIMIT,
    );
    assert!(
        ping.stdout
            .contains(&format!("From {ROUTER} icmp_seq=1 Time to live exceeded")),
        "{ping}"
    );

    // Counted by kind: the router's and the node's own frag-needed, the two unreachables, the
    // router's two time exceeded.
    let e = egress(&node);
    assert!(e.counters["frag_needed"] >= 2, "{e:?}");
    assert!(e.counters["unreachable"] >= 2, "{e:?}");
    assert!(e.counters["time_exceeded"] >= 2, "{e:?}");
    let log = srv.stop().stdout;
    assert_eq!(
        log.matches("got 1372 from 192.168.100.1").count(),
        2,
        "only the datagrams without DF arrived, from the node:\n{log}"
    );
    assert!(!log.contains("10.244."), "{log}");
}
