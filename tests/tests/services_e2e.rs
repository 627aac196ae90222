//! End-to-end tests of Services (issue 5) and of the static config reload (issue 6), in the lab:
//! real vswitchd per node, pods attached by the real CNI plugin, Services written into each
//! node's config file and picked up by the daemon's reload (no restart), real clients (curl,
//! small Python clients) and servers in the pods.
//!
//! What is shown, one test each:
//! 1. connections to a ClusterIP spread over 3 backends on 3 nodes, replies from the ClusterIP;
//!    with two datapath workers per node, both directions of every connection are translated
//!    whichever worker reads them;
//! 2. sessionAffinity ClientIP keeps one client on one backend (two workers per node sharing
//!    it); internalTrafficPolicy Local
//!    keeps connections on the client's node;
//! 3. a Service without a ready endpoint rejects at once (TCP RST, ICMP port unreachable);
//!    a backend's own RST and ICMP errors reach the client as if from the ClusterIP;
//! 4. hairpin: a pod reaches itself through its own Service;
//! 5. NodePort (TCP and UDP) from a client outside the cluster (a namespace on the lab's
//!    fabric), with externalTrafficPolicy Local;
//! 6. a long TCP stream survives the removal and return of the Service's other endpoints;
//! 7. a UDP flow moves to the new endpoint at once when its endpoint is removed (flush);
//! 8. a new Service and a removed peer in the config file reach traffic without a restart;
//! 9. the node reaches pods and ClusterIPs, and pods reach the node;
//! 10. as kube-proxy (issue 25): a rollout renumbering a named port serves old and new pods,
//!     each on its own port; a NodePort with externalTrafficPolicy Local is still served by
//!     its last local endpoint while that terminates, and refused (curl exit 7) with none;
//!     its healthCheckNodePort answers 200 with the local endpoint count, then 503;
//! 11. hostPorts (issue 24): a pod's hostPorts (TCP and UDP), given as a runtime gives them
//!     (`runtimeConfig.portMappings`), reach it at its node's address from outside the cluster
//!     with the client's address kept, from a pod on another node and from the node itself;
//!     a second pod asking for a port in use fails its ADD and leaves nothing behind; a new
//!     vswitchd taking the node over serves them; the pod's DEL closes them.
//! 12. external IPs and LoadBalancer addresses (issue 27), routed to a node by the outside
//!     host: policy Cluster reaches an endpoint on another node, which sees the node; policy
//!     Local the node's own endpoint, which sees the client; a node without one refuses.
//!
//! The tests' Services live in namespace `default` with ClusterIPs in 10.96.1.0/24, clear of
//! the addresses the daemon serves itself (the cluster DNS on 10.96.0.10).
//!
//! Needs root, iproute2, curl, python3 and ss. Every test builds its own lab with a unique name,
//! runs every process under `timeout` in a process group that is killed when its guard drops,
//! and tears everything down on drop, also when it fails. The servers and clients are one small
//! Python script ([`SCRIPT`]) written to a temporary directory: pods share the filesystem.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use conf::api::{
    ConntrackInfo, ConntrackResponse, PeersResponse, ServicesResponse, PATH_CONNTRACK, PATH_PEERS,
    PATH_SERVICES,
};
use vswitch_lab::{LabGuard, LabSpec, Node, Pod};
use vswitch_tests::{
    bin, exec_in, python, require_root, run, unique, wait_until, wall, Bg, Netns, Out,
};

/// How long a config change may take to reach the datapath: the reload polls the file every
/// 500 ms, so 5 s is a hung reload, not a slow one.
const APPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// The port the test HTTP servers listen on in the pods.
const HTTP_PORT: u16 = 8080;

// ---------------------------------------------------------------------------------------------
// The servers and clients that run in the pods.

/// One script, several roles (the first argument):
/// - `http NAME PORT [BIND]`: answers every GET with `name=NAME peer=IP:PORT`, the address the
///   connection came from as the server saw it.
/// - `udp-echo NAME PORT`: answers every datagram with `NAME <datagram>` and logs
///   `TIME from=IP:PORT <datagram>`.
/// - `udp-client HOST PORT SECONDS INTERVAL SPORT`: one socket bound to SPORT sends `seqN`
///   every INTERVAL seconds and logs `TIME reply from=IP:PORT <reply>`.
/// - `stream-server NAME PORT`: per connection: sends `NAME\n`, reads `BYTES SECONDS`, sends
///   BYTES bytes of a known pattern paced over SECONDS, then answers `got N` with `ok N`.
/// - `stream-client HOST PORT BYTES SECONDS`: the other end; checks every byte and prints
///   `backend=NAME bytes=N`; exits 1 on any error.
/// - `tcp-probe HOST PORT` / `udp-probe HOST PORT`: one connect (TCP) or one datagram on a
///   connected socket (UDP) and how it ended: `refused SECONDS`, `connected`, `reply`,
///   `timeout`; for UDP also the ICMP error from the socket's error queue (IP_RECVERR).
const SCRIPT: &str = r#"
import http.server, select, socket, socketserver, struct, sys, threading, time

def out(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()

def http_server(name, port, bind=""):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = ("name=%s peer=%s:%d" % (name, self.client_address[0],
                                             self.client_address[1])).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True
        allow_reuse_address = True
    Server((bind, int(port)), Handler).serve_forever()

def udp_echo(name, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("", int(port)))
    while True:
        data, peer = s.recvfrom(2048)
        text = data.decode(errors="replace")
        out("%.3f from=%s:%d %s" % (time.time(), peer[0], peer[1], text))
        s.sendto(("%s %s peer=%s" % (name, text, peer[0])).encode(), peer)

def udp_client(host, port, secs, interval, sport):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("", int(sport)))
    end = time.time() + float(secs)
    due = time.time()
    seq = 0
    while time.time() < end:
        if time.time() >= due:
            s.sendto(b"seq%d" % seq, (host, int(port)))
            seq += 1
            due += float(interval)
        wait = max(0.0, min(due, end) - time.time())
        ready, _, _ = select.select([s], [], [], wait)
        if ready:
            try:
                data, peer = s.recvfrom(2048)
            except OSError as e:
                out("%.3f error %s" % (time.time(), e))
                continue
            out("%.3f reply from=%s:%d %s" % (time.time(), peer[0], peer[1],
                                              data.decode(errors="replace")))
    out("sent %d" % seq)

PATTERN = bytes(range(256)) * 257

def stream_server(name, port):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("", int(port)))
    srv.listen(16)
    def serve(c):
        with c:
            f = c.makefile("rb")
            c.sendall(("%s\n" % name).encode())
            total, secs = f.readline().split()
            total, secs = int(total), float(secs)
            start = time.monotonic()
            sent = 0
            while sent < total:
                n = min(16384, total - sent)
                c.sendall(PATTERN[:n])
                sent += n
                late = start + secs * sent / total - time.monotonic()
                if late > 0:
                    time.sleep(late)
            got = f.readline().split()
            c.sendall(b"ok " + got[1] + b"\n")
    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()

def stream_client(host, port, total, secs):
    total = int(total)
    c = socket.create_connection((host, int(port)), timeout=10)
    f = c.makefile("rb")
    name = f.readline().decode().strip()
    c.sendall(("%d %s\n" % (total, secs)).encode())
    got = 0
    start = time.monotonic()
    while got < total:
        chunk = f.read1(65536)
        if not chunk:
            out("error: closed after %d of %d bytes" % (got, total))
            sys.exit(1)
        off = got % 256
        if chunk != PATTERN[off:off + len(chunk)]:
            out("error: wrong bytes at offset %d" % got)
            sys.exit(1)
        got += len(chunk)
    c.sendall(b"got %d\n" % got)
    line = f.readline()
    if line != b"ok %d\n" % got:
        out("error: final answer %r" % line)
        sys.exit(1)
    out("backend=%s bytes=%d secs=%.2f" % (name, got, time.monotonic() - start))

def tcp_probe(host, port):
    s = socket.socket()
    s.settimeout(3)
    t = time.monotonic()
    try:
        s.connect((host, int(port)))
        out("connected %.4f" % (time.monotonic() - t))
    except ConnectionRefusedError:
        out("refused %.4f" % (time.monotonic() - t))
    except socket.timeout:
        out("timeout %.4f" % (time.monotonic() - t))

def udp_probe(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_IP, 11, 1)  # IP_RECVERR: keep the ICMP error for MSG_ERRQUEUE
    s.connect((host, int(port)))
    s.settimeout(3)
    t = time.monotonic()
    s.send(b"probe")
    try:
        s.recv(2048)
        out("reply %.4f" % (time.monotonic() - t))
    except ConnectionRefusedError:
        out("refused %.4f" % (time.monotonic() - t))
    except socket.timeout:
        out("timeout %.4f" % (time.monotonic() - t))
        return
    try:
        _, anc, _, _ = s.recvmsg(2048, 1024, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
    except BlockingIOError:
        out("no icmp")
        return
    for _, _, data in anc:
        # struct sock_extended_err, then the offender's sockaddr_in.
        _, origin, typ, code, _, _, _ = struct.unpack("IBBBBII", data[:16])
        out("icmp origin=%d type=%d code=%d offender=%s" % (origin, typ, code,
                                                           socket.inet_ntoa(data[20:24])))

ROLES = {"http": http_server, "udp-echo": udp_echo, "udp-client": udp_client,
         "stream-server": stream_server, "stream-client": stream_client,
         "tcp-probe": tcp_probe, "udp-probe": udp_probe}
ROLES[sys.argv[1]](*sys.argv[2:])
"#;

// ---------------------------------------------------------------------------------------------
// Processes (bounded, in their own process group, killed on drop: `vswitch_tests::Bg`).

/// Waits until something in `ns` listens on `port` (`proto` "t" or "u").
fn wait_listening(ns: &str, proto: &str, port: u16) {
    let flags = format!("-Hl{proto}n");
    let filter = format!("sport = :{port}");
    let ok = wait_until(Duration::from_secs(5), || {
        let o = exec_in(ns, &["ss", &flags, &filter], Duration::from_secs(3));
        o.success() && !o.stdout.trim().is_empty()
    });
    assert!(
        ok,
        "nothing listens on {proto} port {port} in {ns} after 5 s"
    );
}

// ---------------------------------------------------------------------------------------------
// Services, as written into the config files.

/// An endpoint with its EndpointSlice conditions.
#[derive(Debug, Clone)]
struct Ep {
    ip: IpAddr,
    node: String,
    ready: bool,
    serving: bool,
    terminating: bool,
    /// Its own target port for every Service port (an EndpointSlice of its own); None: the
    /// Service port's.
    port: Option<u16>,
}

impl Ep {
    fn of(pod: &Pod) -> Ep {
        Ep {
            ip: pod.ip,
            node: pod.node.clone(),
            ready: true,
            serving: true,
            terminating: false,
            port: None,
        }
    }

    /// Numbering the Service's ports its own way (a pod of a rollout that renumbers them).
    fn on_port(mut self, port: u16) -> Ep {
        self.port = Some(port);
        self
    }

    /// Being deleted but still serving (KEP-1669).
    fn terminating(mut self) -> Ep {
        self.ready = false;
        self.serving = true;
        self.terminating = true;
        self
    }

    /// Not ready and not serving.
    fn unready(mut self) -> Ep {
        self.ready = false;
        self.serving = false;
        self
    }
}

#[derive(Debug, Clone)]
struct SvcPort {
    proto: &'static str,
    port: u16,
    target: u16,
    node_port: Option<u16>,
}

fn tcp(port: u16, target: u16) -> SvcPort {
    SvcPort {
        proto: "TCP",
        port,
        target,
        node_port: None,
    }
}

fn udp(port: u16, target: u16) -> SvcPort {
    SvcPort {
        proto: "UDP",
        ..tcp(port, target)
    }
}

#[derive(Debug, Clone)]
struct Svc {
    name: String,
    vip: String,
    ports: Vec<SvcPort>,
    affinity: Option<u32>,
    internal_local: bool,
    external_local: bool,
    health_check_node_port: Option<u16>,
    /// `externalIPs` and LoadBalancer ingress addresses.
    external_ips: Vec<&'static str>,
    load_balancer_ips: Vec<&'static str>,
    endpoints: Vec<Ep>,
}

impl Svc {
    fn new(name: &str, vip: &str, ports: Vec<SvcPort>, endpoints: Vec<Ep>) -> Svc {
        Svc {
            name: name.into(),
            vip: vip.into(),
            ports,
            affinity: None,
            internal_local: false,
            external_local: false,
            health_check_node_port: None,
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            endpoints,
        }
    }

    /// The `[[services]]` table.
    fn toml(&self) -> String {
        let ports: Vec<String> = self
            .ports
            .iter()
            .map(|p| {
                let np = p
                    .node_port
                    .map(|n| format!(", node_port = {n}"))
                    .unwrap_or_default();
                format!(
                    "{{ name = \"{}-{}\", protocol = \"{}\", port = {}, target_port = {}{np} }}",
                    p.proto.to_lowercase(),
                    p.port,
                    p.proto,
                    p.port,
                    p.target
                )
            })
            .collect();
        let eps: Vec<String> = self
            .endpoints
            .iter()
            .map(|e| {
                let own = e
                    .port
                    .map(|n| {
                        let each: Vec<String> = self
                            .ports
                            .iter()
                            .map(|p| format!("\"{}-{}\" = {n}", p.proto.to_lowercase(), p.port))
                            .collect();
                        format!(", ports = {{ {} }}", each.join(", "))
                    })
                    .unwrap_or_default();
                format!(
                    "{{ ip = \"{}\", node = \"{}\", ready = {}, serving = {}, terminating = {}{own} }}",
                    e.ip, e.node, e.ready, e.serving, e.terminating
                )
            })
            .collect();
        let mut s = format!(
            "\n[[services]]\nnamespace = \"default\"\nname = \"{}\"\ncluster_ips = [\"{}\"]\n\
             ports = [{}]\nendpoints = [{}]\n",
            self.name,
            self.vip,
            ports.join(", "),
            eps.join(", ")
        );
        if let Some(t) = self.affinity {
            s += &format!("session_affinity_timeout = {t}\n");
        }
        if self.internal_local {
            s += "internal_traffic_policy = \"Local\"\n";
        }
        if self.external_local {
            s += "external_traffic_policy = \"Local\"\n";
        }
        if let Some(p) = self.health_check_node_port {
            s += &format!("health_check_node_port = {p}\n");
        }
        let list = |a: &[&str]| {
            a.iter()
                .map(|x| format!("{x:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !self.external_ips.is_empty() {
            s += &format!("external_ips = [{}]\n", list(&self.external_ips));
        }
        if !self.load_balancer_ips.is_empty() {
            s += &format!("load_balancer_ips = [{}]\n", list(&self.load_balancer_ips));
        }
        s
    }

    /// The frontends node `node` should publish for this Service: (name, vip, backends), with
    /// the documented choice of backends (ready ones; else serving-and-terminating ones; only
    /// this node's for internalTrafficPolicy Local).
    fn frontends(&self, node: &str) -> Vec<(String, String, BTreeSet<String>)> {
        let mut out = self.frontends_of(node, &self.vip, self.internal_local);
        for a in self.external_ips.iter().chain(&self.load_balancer_ips) {
            out.extend(self.frontends_of(node, a, self.external_local));
        }
        out
    }

    /// The frontends of one address, whose policy is Local or not.
    fn frontends_of(
        &self,
        node: &str,
        vip: &str,
        local: bool,
    ) -> Vec<(String, String, BTreeSet<String>)> {
        let eligible: Vec<&Ep> = self
            .endpoints
            .iter()
            .filter(|e| !local || e.node == node)
            .collect();
        let mut chosen: Vec<&Ep> = eligible.iter().copied().filter(|e| e.ready).collect();
        if chosen.is_empty() {
            chosen = eligible
                .iter()
                .copied()
                .filter(|e| e.serving && e.terminating)
                .collect();
        }
        self.ports
            .iter()
            .map(|p| {
                (
                    format!("default/{}:{}/{}", self.name, p.port, p.proto),
                    vip.to_string(),
                    chosen
                        .iter()
                        .map(|e| format!("{}:{}", e.ip, e.port.unwrap_or(p.target)))
                        .collect(),
                )
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// A lab whose nodes' config files the test rewrites.

struct World {
    lab: LabGuard,
    /// Each node's config as the lab wrote it.
    original: Vec<String>,
    /// Each node's config without Services (the original, perhaps with a peer removed).
    base: Vec<String>,
    services: Vec<Svc>,
    script: PathBuf,
    /// Owns the script's directory.
    _dir: vswitch_tests::TempDir,
}

impl World {
    fn new(nodes: u32, pods_per_node: u32) -> World {
        World::with_workers(nodes, pods_per_node, 1)
    }

    /// A lab whose daemons run `workers` datapath workers each.
    fn with_workers(nodes: u32, pods_per_node: u32, workers: u32) -> World {
        require_root();
        let name = unique("s");
        assert!(name.len() <= vswitch_lab::MAX_NAME_LEN, "lab name {name}");
        let lab = LabGuard::up(LabSpec::new(&name, nodes, pods_per_node).with_workers(workers))
            .unwrap_or_else(|e| panic!("lab {name} did not come up: {e}"));
        let original: Vec<String> = lab
            .nodes
            .iter()
            .map(|n| {
                fs::read_to_string(&n.config)
                    .unwrap_or_else(|e| panic!("{}: {e}", n.config.display()))
            })
            .collect();
        let dir = vswitch_tests::TempDir::new(&name);
        let script = dir.join("svc.py");
        fs::write(&script, SCRIPT).unwrap_or_else(|e| panic!("{}: {e}", script.display()));
        World {
            lab,
            base: original.clone(),
            original,
            services: Vec::new(),
            script,
            _dir: dir,
        }
    }

    fn node(&self, i: u32) -> &Node {
        self.lab.node(&format!("n{i}"))
    }

    fn pod(&self, name: &str) -> Pod {
        self.lab.pod(name).clone()
    }

    fn add_pod(&mut self, node: u32, name: &str) -> Pod {
        self.lab
            .add_pod(node, name)
            .unwrap_or_else(|e| panic!("add pod {name} on n{node}: {e}"))
            .clone()
    }

    /// argv of the script in role `role`.
    fn py<'a>(&'a self, role: &'a str, args: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec![python(), self.script.to_str().unwrap_or("svc.py"), role];
        v.extend_from_slice(args);
        v
    }

    /// The HTTP name server on `pod`'s HTTP_PORT, up and listening.
    fn http_server(&self, pod: &Pod) -> Bg {
        let port = HTTP_PORT.to_string();
        let bg = Bg::spawn(
            &pod.netns,
            &self.py("http", &[&pod.name, &port]),
            Duration::from_secs(120),
        );
        wait_listening(&pod.netns, "t", HTTP_PORT);
        bg
    }

    /// Writes `text` as node `i`'s config, atomically (the reload never sees half a file).
    fn write_config(&self, i: usize, text: &str) {
        let path = &self.lab.nodes[i].config;
        let tmp = path.with_extension("toml.tmp");
        fs::write(&tmp, text).unwrap_or_else(|e| panic!("{}: {e}", tmp.display()));
        fs::rename(&tmp, path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }

    fn rewrite(&self) {
        let svcs: String = self.services.iter().map(Svc::toml).collect();
        for i in 0..self.lab.nodes.len() {
            self.write_config(i, &format!("{}{svcs}", self.base[i]));
        }
    }

    /// Puts `services` into every node's config and waits until every node translates with
    /// exactly them. Returns the wall-clock time at which the last node was seen applying them.
    fn set_services(&mut self, services: &[Svc]) -> f64 {
        self.services = services.to_vec();
        self.rewrite();
        for n in &self.lab.nodes {
            let want: BTreeSet<_> = services.iter().flat_map(|s| s.frontends(&n.name)).collect();
            let mut got = BTreeSet::new();
            let ok = wait_until(APPLY_TIMEOUT, || {
                got = frontends(n);
                got == want
            });
            assert!(
                ok,
                "{}: services not applied after {APPLY_TIMEOUT:?}\nwant {want:#?}\ngot {got:#?}\n\
                 log:\n{}",
                n.name,
                log_tail(n)
            );
        }
        wall()
    }

    /// Removes the `[[peers]]` table `peer` from node `i`'s config, or with `None` restores
    /// the lab's peers; the Services stay.
    fn set_peer_removed(&mut self, i: usize, peer: Option<&str>) {
        self.base[i] = match peer {
            Some(p) => without_peer(&self.original[i], p),
            None => self.original[i].clone(),
        };
        self.rewrite();
    }
}

/// Config text without the `[[peers]]` table whose name is `peer`.
fn without_peer(text: &str, peer: &str) -> String {
    let mut out = String::new();
    let mut section = String::new();
    let flush = |section: &mut String, out: &mut String| {
        let drop = section.starts_with("[[peers]]")
            && section
                .lines()
                .any(|l| l.trim() == format!("name = \"{peer}\""));
        if !drop {
            out.push_str(section);
        }
        section.clear();
    };
    for line in text.split_inclusive('\n') {
        if line.starts_with('[') {
            flush(&mut section, &mut out);
        }
        section.push_str(line);
    }
    flush(&mut section, &mut out);
    assert_ne!(out, text, "no [[peers]] table named {peer} in:\n{text}");
    out
}

fn log_tail(node: &Node) -> String {
    let text = fs::read_to_string(&node.log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// The frontends of the tests' Services (namespace `default`) a node publishes: (name, vip,
/// backends). The daemon's own (the cluster DNS in `vswitch-system`) are left out.
fn frontends(node: &Node) -> BTreeSet<(String, String, BTreeSet<String>)> {
    let r: Result<ServicesResponse, _> = node
        .client()
        .with_timeout(Duration::from_secs(2))
        .get(PATH_SERVICES);
    match r {
        Ok(r) => r
            .frontends
            .into_iter()
            .filter(|f| f.name.starts_with("default/"))
            .map(|f| (f.name, f.vip.to_string(), f.backends.into_iter().collect()))
            .collect(),
        Err(e) => panic!("{}: GET {PATH_SERVICES}: {e}", node.name),
    }
}

/// A node's tracked connections.
fn conntrack(node: &Node) -> Vec<ConntrackInfo> {
    let r: Result<ConntrackResponse, _> = node
        .client()
        .with_timeout(Duration::from_secs(2))
        .get(PATH_CONNTRACK);
    r.unwrap_or_else(|e| panic!("{}: GET {PATH_CONNTRACK}: {e}", node.name))
        .entries
}

fn peer_names(node: &Node) -> Vec<String> {
    let r: Result<PeersResponse, _> = node
        .client()
        .with_timeout(Duration::from_secs(2))
        .get(PATH_PEERS);
    r.unwrap_or_else(|e| panic!("{}: GET {PATH_PEERS}: {e}", node.name))
        .peers
        .into_iter()
        .map(|p| p.name)
        .collect()
}

/// `vswitchctl --socket S ARGS... --json`, parsed.
fn vswitchctl_json(node: &Node, args: &[&str]) -> serde_json::Value {
    let mut cmd = Command::new(bin("vswitchctl"));
    cmd.arg("--socket")
        .arg(&node.admin_socket)
        .args(args)
        .arg("--json");
    let out = run(&mut cmd, Duration::from_secs(15)).ok();
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("vswitchctl {args:?}: {e}: {out}"))
}

// ---------------------------------------------------------------------------------------------
// HTTP through curl.

/// One curl response: who answered, whom it saw, and where curl was connected.
#[derive(Debug, Clone)]
struct Reply {
    name: String,
    peer_ip: String,
    peer_port: u16,
    remote: String,
}

/// What `curl -w` appends to the body, so each response is one line.
const CURL_FORMAT: &str = " remote=%{remote_ip}:%{remote_port}\n";

fn parse_reply(line: &str) -> Option<Reply> {
    let mut name = None;
    let mut peer = None;
    let mut remote = None;
    for w in line.split_whitespace() {
        if let Some(v) = w.strip_prefix("name=") {
            name = Some(v.to_string());
        } else if let Some(v) = w.strip_prefix("peer=") {
            peer = v
                .rsplit_once(':')
                .map(|(a, p)| (a.to_string(), p.parse().ok()));
        } else if let Some(v) = w.strip_prefix("remote=") {
            remote = Some(v.to_string());
        }
    }
    let (peer_ip, peer_port) = peer?;
    Some(Reply {
        name: name?,
        peer_ip,
        peer_port: peer_port?,
        remote: remote?,
    })
}

/// `count` sequential curls of `url` from `ns` (one process each, so a fresh source port each);
/// every one must succeed.
fn curl_many(ns: &str, url: &str, count: u32) -> Vec<Reply> {
    let script = format!(
        "for i in $(seq {count}); do curl -sS --max-time 3 -w '{CURL_FORMAT}' {url} \
         || echo \"curl-failed $?\"; done"
    );
    let o = exec_in(
        ns,
        &["sh", "-c", &script],
        Duration::from_secs(10 + u64::from(count)),
    );
    assert!(o.success(), "{o}");
    let replies: Vec<Reply> = o.stdout.lines().filter_map(parse_reply).collect();
    assert_eq!(
        replies.len(),
        count as usize,
        "{count} curls of {url} from {ns}: not all answered:\n{o}"
    );
    replies
}

/// One curl of `url` from `ns`; its reply, or how it failed and how long that took (seconds,
/// curl's own time_total).
fn curl_once(ns: &str, url: &str, max_time: u32) -> Result<Reply, (Out, f64)> {
    let format = format!("{} time=%{{time_total}}\n", CURL_FORMAT.trim_end());
    let o = exec_in(
        ns,
        &[
            "curl",
            "-sS",
            "--max-time",
            &max_time.to_string(),
            "-w",
            &format,
            url,
        ],
        Duration::from_secs(u64::from(max_time) + 5),
    );
    let time = o
        .stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix("time="))
        .and_then(|t| t.parse().ok())
        .unwrap_or(f64::MAX);
    match (o.success(), o.stdout.lines().find_map(parse_reply)) {
        (true, Some(r)) => Ok(r),
        _ => Err((o, time)),
    }
}

fn curl_ok(ns: &str, url: &str) -> Reply {
    curl_once(ns, url, 3).unwrap_or_else(|(o, _)| panic!("curl {url} from {ns} failed:\n{o}"))
}

fn counts(replies: &[Reply]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in replies {
        *m.entry(r.name.clone()).or_insert(0) += 1;
    }
    m
}

// ---------------------------------------------------------------------------------------------
// 1. Spread over three backends on three nodes.

#[test]
fn connections_to_a_cluster_ip_spread_over_three_backends_on_three_nodes() {
    let started = Instant::now();
    let mut w = World::new(3, 1);
    let client = w.add_pod(1, "c");
    let backends: Vec<Pod> = ["n1-p1", "n2-p1", "n3-p1"]
        .iter()
        .map(|p| w.pod(p))
        .collect();
    let _servers: Vec<Bg> = backends.iter().map(|p| w.http_server(p)).collect();
    w.set_services(&[Svc::new(
        "web",
        "10.96.1.10",
        vec![tcp(80, HTTP_PORT)],
        backends.iter().map(Ep::of).collect(),
    )]);

    const N: u32 = 60;
    let replies = curl_many(&client.netns, "http://10.96.1.10/", N);
    let spread = counts(&replies);
    eprintln!("{N} connections to 10.96.1.10:80: {spread:?}");

    // Every connection was to the ClusterIP (curl's remote address) and reached a backend
    // that saw the client's own address: only the destination is translated.
    for r in &replies {
        assert_eq!(r.remote, "10.96.1.10:80", "{r:?}");
        assert_eq!(r.peer_ip, client.ip.to_string(), "{r:?}");
    }
    // Each curl used a fresh source port, so each is a new connection for the hash.
    let ports: BTreeSet<u16> = replies.iter().map(|r| r.peer_port).collect();
    assert_eq!(ports.len(), N as usize, "source ports were reused");

    // Tolerance: Maglev gives each of 3 backends ~1/3 of the hash space (1021 slots), so the
    // count per backend of 60 hashed connections is ~Binomial(60, 1/3): mean 20, sd 3.7. Each
    // backend must get at least 10% (6 of 60), 3.8 sd below the mean: a false failure about
    // once in 10,000 runs, while a broken spread (one backend unused or hogging) fails surely.
    for b in &backends {
        let n = spread.get(&b.name).copied().unwrap_or(0);
        assert!(
            n * 10 >= N as usize,
            "backend {} got {n} of {N} connections (< 10%): {spread:?}",
            b.name
        );
    }
    assert_eq!(spread.values().sum::<usize>(), N as usize, "{spread:?}");

    // The client's node tracked each connection to the backend that answered it.
    let ct = conntrack(w.node(1));
    for r in &replies {
        let client_addr = format!("{}:{}", client.ip, r.peer_port);
        let backend = backends.iter().find(|b| b.name == r.name).map(|b| b.ip);
        let e = ct
            .iter()
            .find(|e| e.client == client_addr)
            .unwrap_or_else(|| panic!("no conntrack entry for {client_addr}: {ct:#?}"));
        assert_eq!(e.service, "10.96.1.10:80", "{e:?}");
        assert_eq!(
            Some(e.backend.clone()),
            backend.map(|ip| format!("{ip}:{HTTP_PORT}")),
            "{e:?} answered by {}",
            r.name
        );
        assert_eq!(e.snat, None, "{e:?}");
    }
    eprintln!("took {:.1?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// 1b. Two datapath workers per node.

/// `vswitch_worker_frames` of a node's /metrics, by worker.
fn worker_frames(node: &Node) -> BTreeMap<String, u64> {
    let out = run(
        &mut vswitch_tests::in_netns(
            &node.netns,
            &[
                "curl",
                "-s",
                "--max-time",
                "5",
                "http://127.0.0.1:9109/metrics",
            ],
        ),
        Duration::from_secs(10),
    )
    .ok();
    out.lines()
        .filter_map(|l| l.strip_prefix("vswitch_worker_frames_total{worker=\""))
        .filter_map(|l| {
            let (w, rest) = l.split_once('"')?;
            Some((w.to_string(), rest.split_whitespace().last()?.parse().ok()?))
        })
        .collect()
}

#[test]
fn two_workers_per_node_translate_both_directions_of_every_connection() {
    let started = Instant::now();
    let mut w = World::with_workers(2, 1, 2);
    let client = w.add_pod(1, "c");
    // One backend beside the client (its replies come from a TAP) and one on the other node
    // (its replies come from the underlay, spread over the workers' sockets by SO_REUSEPORT).
    let backends: Vec<Pod> = ["n1-p1", "n2-p1"].iter().map(|p| w.pod(p)).collect();
    let _servers: Vec<Bg> = backends.iter().map(|p| w.http_server(p)).collect();
    w.set_services(&[Svc::new(
        "web",
        "10.96.1.13",
        vec![tcp(80, HTTP_PORT)],
        backends.iter().map(Ep::of).collect(),
    )]);
    let before = worker_frames(w.node(1));
    assert_eq!(
        before.keys().cloned().collect::<Vec<_>>(),
        ["0", "1"],
        "node 1 should report two workers: {before:?}"
    );

    const N: u32 = 60;
    let replies = curl_many(&client.netns, "http://10.96.1.13/", N);
    // curl_many fails the test on any connection that does not complete: a reply that reached
    // a worker without the connection's entry would come from the backend's address and be
    // reset by the client. Every one came back from the ClusterIP.
    for r in &replies {
        assert_eq!(r.remote, "10.96.1.13:80", "{r:?}");
        assert_eq!(r.peer_ip, client.ip.to_string(), "{r:?}");
    }
    let spread = counts(&replies);
    eprintln!("{N} connections: {spread:?}");
    assert_eq!(spread.len(), 2, "both backends should answer: {spread:?}");

    // The kernel spreads the client's flows over the TAP's two queues by hash: 60 flows all on
    // one queue has probability 2^-59. Both workers read frames.
    let after = worker_frames(w.node(1));
    eprintln!("node 1 worker frames: {before:?} -> {after:?}");
    for k in ["0", "1"] {
        let grew = after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
        assert!(grew > 0, "worker {k} read nothing: {before:?} -> {after:?}");
    }
    // One logical table: every connection is listed once, whichever worker opened it.
    let ct = conntrack(w.node(1));
    for r in &replies {
        let client_addr = format!("{}:{}", client.ip, r.peer_port);
        let n = ct.iter().filter(|e| e.client == client_addr).count();
        assert_eq!(n, 1, "{client_addr} tracked {n} times: {ct:#?}");
    }
    eprintln!("took {:.1?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// 2. Session affinity.

#[test]
fn session_affinity_keeps_a_client_on_one_backend() {
    let started = Instant::now();
    // Two workers per node: a client's connections land on either, and the affinity one of
    // them records must hold for the other.
    let mut w = World::with_workers(3, 1, 2);
    let client = w.add_pod(1, "c");
    let backends: Vec<Pod> = ["n1-p1", "n2-p1", "n3-p1"]
        .iter()
        .map(|p| w.pod(p))
        .collect();
    let _servers: Vec<Bg> = backends.iter().map(|p| w.http_server(p)).collect();
    let eps: Vec<Ep> = backends.iter().map(Ep::of).collect();
    let mut sticky = Svc::new(
        "sticky",
        "10.96.1.11",
        vec![tcp(80, HTTP_PORT)],
        eps.clone(),
    );
    sticky.affinity = Some(600);
    // The same backends without affinity, as the control.
    let plain = Svc::new("plain", "10.96.1.12", vec![tcp(80, HTTP_PORT)], eps);
    w.set_services(&[sticky, plain]);
    let published = vswitchctl_json(w.node(1), &["services"]);
    let fe = published["frontends"]
        .as_array()
        .and_then(|a| a.iter().find(|f| f["vip"] == "10.96.1.11"))
        .unwrap_or_else(|| panic!("10.96.1.11 not in vswitchctl services: {published}"));
    assert_eq!(fe["session_affinity_timeout"], 600, "{fe}");

    const N: u32 = 30;
    let with = counts(&curl_many(&client.netns, "http://10.96.1.11/", N));
    let without = counts(&curl_many(&client.netns, "http://10.96.1.12/", N));
    eprintln!("{N} connections with affinity: {with:?}; without: {without:?}");
    assert_eq!(
        with.len(),
        1,
        "with sessionAffinity ClientIP all {N} connections must reach one backend: {with:?}"
    );
    // Without affinity 30 hashed connections all on one of 3 backends has probability 3^-29.
    assert!(
        without.len() >= 2,
        "without affinity {N} connections should spread: {without:?}"
    );

    // Another client may get another backend, and keeps it too.
    let other = w.pod("n2-p1");
    let theirs = counts(&curl_many(&other.netns, "http://10.96.1.11/", 10));
    assert_eq!(theirs.len(), 1, "second client with affinity: {theirs:?}");
    eprintln!("took {:.1?}", started.elapsed());
}

#[test]
fn internal_traffic_policy_local_keeps_connections_on_the_node() {
    let started = Instant::now();
    let mut w = World::new(2, 2);
    let (b1, b2) = (w.pod("n1-p1"), w.pod("n2-p1"));
    let _servers = [w.http_server(&b1), w.http_server(&b2)];
    let mut svc = Svc::new(
        "local",
        "10.96.1.13",
        vec![tcp(80, HTTP_PORT)],
        vec![Ep::of(&b1), Ep::of(&b2)],
    );
    svc.internal_local = true;
    // Each node publishes only its own endpoint (set_services checks that).
    w.set_services(&[svc]);
    for (client, local) in [("n1-p2", &b1), ("n2-p2", &b2)] {
        let c = w.pod(client);
        let got = counts(&curl_many(&c.netns, "http://10.96.1.13/", 10));
        assert_eq!(
            got,
            BTreeMap::from([(local.name.clone(), 10)]),
            "{client}: internalTrafficPolicy Local must use only its node's endpoint"
        );
    }
    eprintln!("took {:.1?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// 3. No endpoint: rejected at once.

/// Runs a `tcp-probe` or `udp-probe` from `ns`: its verdict (`refused`, `connected`, ...),
/// the seconds it took, and all it printed.
fn probe(w: &World, ns: &str, role: &str, host: &str, port: u16) -> (String, f64, String) {
    let p = port.to_string();
    let o = exec_in(ns, &w.py(role, &[host, &p]), Duration::from_secs(10));
    assert!(o.success(), "{o}");
    let mut first = o.stdout.lines().next().unwrap_or("").split_whitespace();
    let verdict = first.next().unwrap_or("").to_string();
    let secs = first
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::MAX);
    (verdict, secs, o.stdout)
}

#[test]
fn a_service_without_ready_endpoints_rejects_at_once() {
    let started = Instant::now();
    let mut w = World::new(1, 1);
    let client = w.pod("n1-p1");
    // One Service with no endpoints at all, one whose only endpoint is neither ready nor
    // serving (a pod that failed its readiness probe): both have no backend.
    let none = Svc::new("none", "10.96.1.20", vec![tcp(80, 80), udp(53, 53)], vec![]);
    let unready = Svc::new(
        "unready",
        "10.96.1.21",
        vec![tcp(80, 80), udp(53, 53)],
        vec![Ep::of(&client).unready()],
    );
    w.set_services(&[none, unready]);

    for vip in ["10.96.1.20", "10.96.1.21"] {
        // TCP: curl fails with "connection refused" (exit 7): a RST came back. A dropped SYN
        // would end in a timeout (exit 28) instead.
        let (o, secs) = match curl_once(&client.netns, &format!("http://{vip}/"), 3) {
            Ok(r) => panic!("curl {vip} got an answer from a Service without endpoints: {r:?}"),
            Err(e) => e,
        };
        assert_eq!(
            o.status.code(),
            Some(7),
            "curl {vip}: expected exit 7:\n{o}"
        );
        // The same with a plain connect(): ECONNREFUSED, i.e. a RST came back.
        let (verdict, tcp_secs, text) = probe(&w, &client.netns, "tcp-probe", vip, 80);
        assert_eq!(verdict, "refused", "connect to {vip}:80: {text}");

        // UDP: a connected socket gets ECONNREFUSED from an ICMP port unreachable (type 3
        // code 3) that comes from the ClusterIP itself.
        let (verdict, udp_secs, text) = probe(&w, &client.netns, "udp-probe", vip, 53);
        assert_eq!(verdict, "refused", "UDP to {vip}:53: {text}");
        assert!(
            text.contains(&format!("icmp origin=2 type=3 code=3 offender={vip}")),
            "UDP to {vip}:53: expected ICMP port unreachable from {vip}: {text}"
        );
        eprintln!(
            "{vip}: curl refused in {:.1} ms, connect() in {:.1} ms, UDP in {:.1} ms",
            secs * 1e3,
            tcp_secs * 1e3,
            udp_secs * 1e3
        );
    }
    eprintln!("took {:.1?}", started.elapsed());
}

/// An endpoint where nothing listens: the backend itself answers with a RST (TCP) or an ICMP
/// port unreachable (UDP) about the translated packet. The client must see both as if from
/// the ClusterIP, or its socket would not match them to its connection.
fn backend_errors_come_from_the_cluster_ip(nodes: u32, backend: &str) {
    let started = Instant::now();
    let mut w = World::new(nodes, 2);
    let (client, backend) = (w.pod("n1-p1"), w.pod(backend));
    w.set_services(&[Svc::new(
        "closed",
        "10.96.1.22",
        vec![tcp(80, 81), udp(53, 54)],
        vec![Ep::of(&backend)],
    )]);
    let (verdict, secs, text) = probe(&w, &client.netns, "tcp-probe", "10.96.1.22", 80);
    assert_eq!(verdict, "refused", "connect to 10.96.1.22:80: {text}");
    assert!(secs < 0.5, "connect refused after {secs} s");
    let (verdict, secs, text) = probe(&w, &client.netns, "udp-probe", "10.96.1.22", 53);
    assert_eq!(
        verdict, "refused",
        "UDP to 10.96.1.22:53 (backend {} port 54 closed): {text}",
        backend.name
    );
    assert!(secs < 0.5, "UDP refused after {secs} s");
    assert!(
        text.contains("icmp origin=2 type=3 code=3 offender=10.96.1.22"),
        "the backend's ICMP port unreachable must come from the ClusterIP: {text}"
    );
    eprintln!("took {:.1?}", started.elapsed());
}

#[test]
fn errors_from_a_backend_on_another_node_come_back_from_the_cluster_ip() {
    backend_errors_come_from_the_cluster_ip(2, "n2-p1");
}

/// The backend's ICMP error is switched at layer 2 (same subnet, the client's MAC), where
/// only TCP/UDP replies are translated back (`nat::untranslate_reply`), not ICMP errors
/// (`nat::translate_icmp_error` runs on the routed paths only): the client gets
/// `10.244.1.3 > 10.244.1.2: ICMP 10.244.1.3 udp port 54 unreachable`, which its socket
/// (connected to 10.96.1.22:53) cannot match, so it waits for its timeout.
#[test]
fn errors_from_a_backend_on_the_clients_node_come_back_from_the_cluster_ip() {
    backend_errors_come_from_the_cluster_ip(1, "n1-p2");
}

// ---------------------------------------------------------------------------------------------
// 4. Hairpin.

#[test]
fn a_pod_reaches_itself_through_its_own_service() {
    let started = Instant::now();
    let mut w = World::new(1, 2);
    let (me, other) = (w.pod("n1-p1"), w.pod("n1-p2"));
    let _server = w.http_server(&me);
    w.set_services(&[Svc::new(
        "self",
        "10.96.1.30",
        vec![tcp(80, HTTP_PORT)],
        vec![Ep::of(&me)],
    )]);
    let gateway = "10.244.1.1";

    // The pod connects to its own Service and answers itself. It sees the connection come
    // from the gateway (hairpin SNAT): from its own address it would answer itself directly,
    // bypassing the translation back to the ClusterIP.
    for r in curl_many(&me.netns, "http://10.96.1.30/", 5) {
        assert_eq!(r.name, me.name, "{r:?}");
        assert_eq!(r.remote, "10.96.1.30:80", "{r:?}");
        assert_eq!(
            r.peer_ip, gateway,
            "hairpin must be seen from the gateway: {r:?}"
        );
    }
    let ct = vswitchctl_json(w.node(1), &["conntrack", "--ip", "10.96.1.30"]);
    let entries = ct["entries"].as_array().cloned().unwrap_or_default();
    assert!(
        entries.len() >= 5
            && entries
                .iter()
                .all(|e| e["snat"] == gateway && e["backend"] == format!("{}:{HTTP_PORT}", me.ip)),
        "vswitchctl conntrack --ip 10.96.1.30: expected 5 hairpin entries with snat {gateway}: \
         {ct}"
    );

    // Another pod is not source-translated.
    let r = curl_ok(&other.netns, "http://10.96.1.30/");
    assert_eq!(
        (r.name.as_str(), r.peer_ip.as_str()),
        (me.name.as_str(), other.ip.to_string().as_str())
    );
    eprintln!("took {:.1?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// 5. NodePort from outside the cluster.

/// A host on the lab's fabric that is not a node: the "outside client".
fn outside_client(w: &World, address: &str) -> Netns {
    let lab = &w.lab;
    let ns = Netns::new(&format!("{}-x", lab.name));
    let port = format!("{}x", lab.name);
    lab.cable_to_fabric(ns.name(), "eth0", &port, address, None)
        .unwrap_or_else(|e| panic!("cannot cable {} to the fabric: {e}", ns.name()));
    ns
}

#[test]
fn nodeport_reaches_a_backend_on_another_node_from_outside_the_cluster() {
    let started = Instant::now();
    let mut w = World::new(2, 1);
    let (p1, p2) = (w.pod("n1-p1"), w.pod("n2-p1"));
    let _servers = [w.http_server(&p1), w.http_server(&p2)];
    let nodeport = |port: u16, np: u16| SvcPort {
        node_port: Some(np),
        ..tcp(port, HTTP_PORT)
    };
    let on_n2 = Svc::new(
        "on-n2",
        "10.96.1.41",
        vec![nodeport(80, 30081)],
        vec![Ep::of(&p2)],
    );
    let on_n1 = Svc::new(
        "on-n1",
        "10.96.1.42",
        vec![nodeport(80, 30082)],
        vec![Ep::of(&p1)],
    );
    let mut local = Svc::new(
        "local",
        "10.96.1.43",
        vec![nodeport(80, 30083)],
        vec![Ep::of(&p2)],
    );
    local.external_local = true;
    let echo = Svc::new(
        "echo",
        "10.96.1.44",
        vec![SvcPort {
            node_port: Some(30053),
            ..udp(53, 5353)
        }],
        vec![Ep::of(&p2)],
    );
    let mut echo_local = Svc::new(
        "echo-local",
        "10.96.1.45",
        vec![SvcPort {
            node_port: Some(30054),
            ..udp(53, 5353)
        }],
        vec![Ep::of(&p2)],
    );
    echo_local.external_local = true;
    w.set_services(&[on_n2, on_n1, local, echo, echo_local]);
    let _udp_echo = Bg::spawn(
        &p2.netns,
        &w.py("udp-echo", &[&p2.name, "5353"]),
        Duration::from_secs(60),
    );
    wait_listening(&p2.netns, "u", 5353);
    for n in &w.lab.nodes {
        for np in [30081, 30082] {
            wait_listening(&n.netns, "t", np);
        }
        wait_listening(&n.netns, "u", 30053);
    }
    // Policy Local: only node 2, which has the endpoint, listens.
    wait_listening(&w.node(2).netns, "t", 30083);
    wait_listening(&w.node(2).netns, "u", 30054);
    // `vswitchctl services` lists node 1's NodePorts and where each sends: the ClusterIP;
    // those of policy Local have no endpoint on this node, so nothing to listen for.
    let listed = vswitchctl_json(w.node(1), &["services"]);
    let node_ports: Vec<(u64, String, String, Vec<String>, bool)> = listed["node_ports"]
        .as_array()
        .unwrap_or_else(|| panic!("no node_ports in vswitchctl services: {listed}"))
        .iter()
        .map(|n| {
            (
                n["node_port"].as_u64().unwrap_or(0),
                n["protocol"].as_str().unwrap_or("").to_string(),
                n["service"].as_str().unwrap_or("").to_string(),
                n["destinations"]
                    .as_array()
                    .map(|d| {
                        d.iter()
                            .filter_map(|x| x.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default(),
                n["local"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    let row = |port: u64, proto: &str, svc: &str, dests: &[&str], local: bool| {
        (
            port,
            proto.to_string(),
            format!(
                "default/{svc}:{}/{proto}",
                if proto == "TCP" { 80 } else { 53 }
            ),
            dests.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
            local,
        )
    };
    assert_eq!(
        node_ports,
        vec![
            row(30053, "UDP", "echo", &["10.96.1.44:53"], false),
            row(30081, "TCP", "on-n2", &["10.96.1.41:80"], false),
            row(30082, "TCP", "on-n1", &["10.96.1.42:80"], false),
        ],
        "vswitchctl services on node 1: {listed}"
    );

    let client = outside_client(&w, "192.168.100.250/24");
    let (n1, n2) = (w.node(1).clone(), w.node(2).clone());

    // Every node serves every NodePort, with the backend on this node or the other one.
    for (node, np, backend) in [
        (&n1, 30081, &p2),
        (&n2, 30082, &p1),
        (&n1, 30082, &p1),
        (&n2, 30081, &p2),
    ] {
        let url = format!("http://{}:{np}/", node.underlay_ip);
        let r = curl_ok(client.name(), &url);
        assert_eq!(r.name, backend.name, "{url}: {r:?}");
        // Policy Cluster: the relay terminates the client's connection and the backend sees
        // the node (its gateway address), as kube-proxy's SNAT for that policy does.
        let gw = format!("10.244.{}.1", node.index);
        assert_eq!(
            r.peer_ip, gw,
            "{url}: the backend should see the node's address {gw}: {r:?}"
        );
        eprintln!("{url} -> {} (seen from {})", r.name, r.peer_ip);
    }

    // UDP too: datagrams to node 1's NodePort reach the backend on node 2, and its answers come
    // back from the address the client sent to. 10 are sent in 1 s; the client stops listening
    // right after the last, so its answer may be missed: at least 8 must come back.
    let o = exec_in(
        client.name(),
        &w.py(
            "udp-client",
            &[&n1.underlay_ip.to_string(), "30053", "1", "0.1", "40000"],
        ),
        Duration::from_secs(10),
    );
    assert!(o.success(), "{o}");
    let answers = o
        .stdout
        .lines()
        .filter(|l| {
            l.contains(&format!(
                " reply from={}:30053 {} seq",
                n1.underlay_ip, p2.name
            ))
        })
        .count();
    assert!(
        answers >= 8,
        "UDP NodePort {}:30053: {answers} of 10 datagrams answered by {}:\n{o}",
        n1.underlay_ip,
        p2.name
    );

    // UDP with policy Local: the endpoint sees the client's own address.
    let o = exec_in(
        client.name(),
        &w.py(
            "udp-client",
            &[&n2.underlay_ip.to_string(), "30054", "1", "0.1", "40001"],
        ),
        Duration::from_secs(10),
    );
    assert!(o.success(), "{o}");
    let kept = o
        .stdout
        .lines()
        .filter(|l| l.contains(&format!(" {} seq", p2.name)) && l.ends_with("peer=192.168.100.250"))
        .count();
    assert!(
        kept >= 8,
        "UDP NodePort {}:30054 (policy Local): {kept} of 10 answers saw the client's address:\n{o}",
        n2.underlay_ip
    );

    // externalTrafficPolicy Local: the node with the endpoint serves it; the other refuses at
    // once (nothing listens: a TCP RST) so a load balancer can fail over.
    let url = format!("http://{}:30083/", n2.underlay_ip);
    let r = curl_ok(client.name(), &url);
    assert_eq!(r.name, p2.name, "{url}: {r:?}");
    // Policy Local keeps the client's address: the relay sends from it (IP_TRANSPARENT) and
    // policy routing brings the endpoint's replies back to the relay.
    assert_eq!(r.peer_ip, "192.168.100.250", "{url}: {r:?}");
    let url = format!("http://{}:30083/", n1.underlay_ip);
    match curl_once(client.name(), &url, 3) {
        Ok(r) => panic!("{url}: policy Local without a local endpoint answered: {r:?}"),
        Err((o, secs)) => {
            assert!(
                secs < 1.0,
                "{url}: policy Local without a local endpoint must fail at once, took {secs} s:\n{o}"
            );
            assert_eq!(
                o.status.code(),
                Some(7),
                "{url}: refused (curl exit 7), not accepted then closed:\n{o}"
            );
            eprintln!(
                "{url}: failed in {:.1} ms as it should ({})",
                secs * 1e3,
                o.stderr.trim()
            );
        }
    }
    eprintln!("took {:.1?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// 10. As kube-proxy serves them (issue 25).

/// `curl -i` of a health check: (HTTP status, the JSON body).
fn health_check(ns: &str, url: &str) -> (u16, serde_json::Value) {
    let o = exec_in(
        ns,
        &["curl", "-sS", "--max-time", "3", "-i", url],
        Duration::from_secs(8),
    );
    assert!(o.success(), "{url}: {o}");
    let status = o
        .stdout
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{url}: no status line:\n{o}"));
    let body = o.stdout.split("\r\n\r\n").nth(1).unwrap_or_default();
    let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("{url}: {e} in {body:?}"));
    (status, json)
}

#[test]
fn a_renumbered_named_port_and_a_local_nodeport_as_kube_proxy_serves_them() {
    let started = Instant::now();
    let mut w = World::new(2, 1);
    let (p1, p2) = (w.pod("n1-p1"), w.pod("n2-p1"));
    // The rollout: the old pod serves the named port on 8080, the new one on 8081; the
    // EndpointSlice controller puts them in two slices with two numbers.
    let _old = w.http_server(&p1);
    let _new = Bg::spawn(
        &p2.netns,
        &w.py("http", &[&p2.name, "8081"]),
        Duration::from_secs(120),
    );
    wait_listening(&p2.netns, "t", 8081);
    let roll = Svc::new(
        "roll",
        "10.96.1.101",
        vec![tcp(80, HTTP_PORT)],
        vec![Ep::of(&p1), Ep::of(&p2).on_port(8081)],
    );
    let mut local = Svc::new(
        "local-hc",
        "10.96.1.102",
        vec![SvcPort {
            node_port: Some(30101),
            ..tcp(80, HTTP_PORT)
        }],
        vec![Ep::of(&p1)],
    );
    local.external_local = true;
    local.health_check_node_port = Some(30102);
    w.set_services(&[roll.clone(), local.clone()]);

    // Both the old and the new pod answer through the ClusterIP, each on its own port.
    let replies = curl_many(&p1.netns, "http://10.96.1.101/", 30);
    let seen = counts(&replies);
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        [p1.name.clone(), p2.name.clone()],
        "a renumbered named port must reach old and new pods: {seen:?}"
    );

    let client = outside_client(&w, "192.168.100.251/24");
    let (n1, n2) = (w.node(1).clone(), w.node(2).clone());
    wait_listening(&n1.netns, "t", 30101);
    wait_listening(&n1.netns, "t", 30102);
    wait_listening(&n2.netns, "t", 30102);
    let np = format!("http://{}:30101/", n1.underlay_ip);
    let hc1 = format!("http://{}:30102/", n1.underlay_ip);
    let hc2 = format!("http://{}:30102/", n2.underlay_ip);
    assert_eq!(curl_ok(client.name(), &np).name, p1.name);
    let body = |n: u64| {
        serde_json::json!({"service": {"namespace": "default", "name": "local-hc"},
                           "localEndpoints": n, "serviceProxyHealthy": true})
    };
    assert_eq!(health_check(client.name(), &hc1), (200, body(1)));
    // Node 2 has no endpoint: its health check says so, and its NodePort refuses.
    assert_eq!(health_check(client.name(), &hc2), (503, body(0)));
    let refused = |url: &str| match curl_once(client.name(), url, 3) {
        Ok(r) => panic!("{url}: answered without a local endpoint: {r:?}"),
        Err((o, secs)) => {
            assert_eq!(o.status.code(), Some(7), "{url}: not refused:\n{o}");
            assert!(secs < 1.0, "{url}: refused only after {secs} s");
        }
    };
    refused(&format!("http://{}:30101/", n2.underlay_ip));

    // The last local endpoint terminates but still serves: still served (KEP-1669), while
    // the health check already sends balancers elsewhere.
    local.endpoints = vec![Ep::of(&p1).terminating()];
    w.set_services(&[roll.clone(), local.clone()]);
    let ok = wait_until(APPLY_TIMEOUT, || health_check(client.name(), &hc1).0 == 503);
    assert!(ok, "{hc1}: still 200 with only a terminating endpoint");
    assert_eq!(health_check(client.name(), &hc1), (503, body(0)));
    assert_eq!(curl_ok(client.name(), &np).name, p1.name);

    // No local endpoint at all (it moved to node 2): refused, not accepted then closed.
    local.endpoints = vec![Ep::of(&p2).on_port(8081)];
    w.set_services(&[roll, local]);
    let ok = wait_until(APPLY_TIMEOUT, || {
        curl_once(client.name(), &np, 3)
            .err()
            .is_some_and(|(o, _)| o.status.code() == Some(7))
    });
    assert!(ok, "{np}: not refused after the last local endpoint went");
    refused(&np);
    assert_eq!(health_check(client.name(), &hc1), (503, body(0)));
    // And node 2 now serves it, on the new pod's own port, and says so.
    let url = format!("http://{}:30101/", n2.underlay_ip);
    let ok = wait_until(APPLY_TIMEOUT, || curl_once(client.name(), &url, 3).is_ok());
    assert!(ok, "{url}: not served by the new local endpoint");
    assert_eq!(curl_ok(client.name(), &url).name, p2.name);
    assert_eq!(health_check(client.name(), &hc2), (200, body(1)));
    eprintln!("took {:.1?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// 6. A long stream survives endpoint churn.

#[test]
fn a_long_tcp_stream_survives_churn_of_the_other_endpoints() {
    let started = Instant::now();
    let mut w = World::new(2, 2);
    let client = w.add_pod(1, "c");
    let backends: Vec<Pod> = ["n1-p1", "n2-p1", "n2-p2"]
        .iter()
        .map(|p| w.pod(p))
        .collect();
    const PORT: u16 = 9000;
    let port = PORT.to_string();
    let _servers: Vec<Bg> = backends
        .iter()
        .map(|b| {
            let s = Bg::spawn(
                &b.netns,
                &w.py("stream-server", &[&b.name, &port]),
                Duration::from_secs(120),
            );
            wait_listening(&b.netns, "t", PORT);
            s
        })
        .collect();
    let all: Vec<Ep> = backends.iter().map(Ep::of).collect();
    let svc = |eps: Vec<Ep>| Svc::new("stream", "10.96.1.60", vec![tcp(PORT, PORT)], eps);
    w.set_services(&[svc(all.clone())]);

    // 10 MB paced over 10 s, every byte checked, then a last exchange both ways.
    const BYTES: u32 = 10_000_000;
    let bytes = BYTES.to_string();
    let mut stream = Bg::spawn(
        &client.netns,
        &w.py("stream-client", &["10.96.1.60", &port, &bytes, "10"]),
        Duration::from_secs(60),
    );
    let n1 = w.node(1).clone();
    let mut entry = None;
    wait_until(Duration::from_secs(5), || {
        entry = conntrack(&n1)
            .into_iter()
            .find(|e| e.service == format!("10.96.1.60:{PORT}") && e.state == "Established");
        entry.is_some()
    });
    let entry = entry.unwrap_or_else(|| {
        panic!(
            "the stream's connection is not tracked on n1: {:#?}",
            conntrack(&n1)
        )
    });
    let mine = all
        .iter()
        .find(|e| format!("{}:{PORT}", e.ip) == entry.backend)
        .unwrap_or_else(|| panic!("stream backend {} is not an endpoint", entry.backend))
        .clone();
    let others: Vec<&Ep> = all.iter().filter(|e| e.ip != mine.ip).collect();
    eprintln!(
        "stream on {} ({}); churning the other two",
        mine.ip, entry.client
    );

    // Remove the other endpoints and bring them back, twice; then mark the stream's own
    // endpoint terminating (the other two ready): established TCP to it may finish.
    let churn_started = Instant::now();
    for round in 0..2 {
        w.set_services(&[svc(vec![mine.clone()])]);
        assert!(stream.running(), "the stream ended during round {round}");
        w.set_services(&[svc(all.clone())]);
        assert!(stream.running(), "the stream ended during round {round}");
    }
    let mut last = vec![mine.clone().terminating()];
    last.extend(others.iter().map(|e| (*e).clone()));
    w.set_services(&[svc(last)]);
    let churn = churn_started.elapsed();
    assert!(
        stream.running(),
        "the stream ended before the churn was over ({churn:.1?}): it did not cover it"
    );
    let o = stream.wait(Duration::from_secs(40));
    assert!(o.success(), "the stream failed during endpoint churn:\n{o}");
    let backend_name = backends
        .iter()
        .find(|b| b.ip == mine.ip)
        .map(|b| b.name.clone())
        .unwrap_or_default();
    assert!(
        o.stdout
            .contains(&format!("backend={backend_name} bytes={BYTES}")),
        "stream report: {o}"
    );
    eprintln!(
        "stream: {} (5 endpoint changes in {churn:.1?})",
        o.stdout.trim()
    );
    eprintln!("took {:.1?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// 7. UDP flush.

#[test]
fn a_udp_flow_moves_to_the_new_endpoint_when_its_endpoint_is_removed() {
    let started = Instant::now();
    let mut w = World::new(2, 2);
    let client = w.pod("n1-p1");
    // A on the client's node, B on the other.
    let (a, b) = (w.pod("n1-p2"), w.pod("n2-p1"));
    const PORT: u16 = 5353;
    let port = PORT.to_string();
    let echo = |p: &Pod| {
        let s = Bg::spawn(
            &p.netns,
            &w.py("udp-echo", &[&p.name, &port]),
            Duration::from_secs(60),
        );
        wait_listening(&p.netns, "u", PORT);
        s
    };
    let (echo_a, echo_b) = (echo(&a), echo(&b));
    let svc = |ep: &Pod| Svc::new("echo", "10.96.1.53", vec![udp(53, PORT)], vec![Ep::of(ep)]);
    w.set_services(&[svc(&a)]);

    // One socket, one 5-tuple: a datagram every 100 ms for 5 s.
    const SPORT: u16 = 40053;
    let sport = SPORT.to_string();
    let flow = Bg::spawn(
        &client.netns,
        &w.py("udp-client", &["10.96.1.53", "53", "5", "0.1", &sport]),
        Duration::from_secs(20),
    );
    thread::sleep(Duration::from_millis(1500));
    let swapped_at = wall();
    let applied_at = w.set_services(&[svc(&b)]);
    let o = flow.wait(Duration::from_secs(15));
    assert!(o.success(), "{o}");

    // (time, answered by). A's answer to a datagram it got just before the change, arriving
    // after its connection was flushed, is no longer translated (as with kube-proxy, whose
    // conntrack deletion leaves the same window; a connected client socket drops it): such a
    // stray is allowed from A alone, around the change, and counted.
    let from_a_itself = format!("from={}:{PORT}", a.ip);
    let mut strays = Vec::new();
    let replies: Vec<(f64, String)> = o
        .stdout
        .lines()
        .filter(|l| l.contains(" reply "))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let at: f64 = f[0].parse().unwrap_or(0.0);
            let from = f.get(2).copied();
            if from == Some(from_a_itself.as_str()) && at >= swapped_at && at <= applied_at + 0.5 {
                strays.push(l.to_string());
                return None;
            }
            assert_eq!(
                from,
                Some("from=10.96.1.53:53"),
                "a reply not from the ClusterIP: {l}"
            );
            Some((at, f.get(3).unwrap_or(&"").to_string()))
        })
        .collect();
    assert!(
        strays.len() <= 2,
        "more than the in-flight answers of A came back untranslated: {strays:?}"
    );
    let from_a: Vec<f64> = replies
        .iter()
        .filter(|r| r.1 == a.name)
        .map(|r| r.0)
        .collect();
    let from_b: Vec<f64> = replies
        .iter()
        .filter(|r| r.1 == b.name)
        .map(|r| r.0)
        .collect();
    assert!(
        from_a.len() >= 5,
        "A answered only {} datagrams before the swap:\n{o}",
        from_a.len()
    );
    let first_b = from_b
        .first()
        .copied()
        .unwrap_or_else(|| panic!("B never answered the flow after the swap:\n{o}"));
    let last_a = from_a.last().copied().unwrap_or(0.0);
    eprintln!(
        "A answered {} datagrams, B {} ({} of A's in flight untranslated); the config was \
         written at +0 ms, seen applied at +{:.0} ms, B's first answer at +{:.0} ms, A's last \
         at +{:.0} ms",
        from_a.len(),
        from_b.len(),
        strays.len(),
        (applied_at - swapped_at) * 1e3,
        (first_b - swapped_at) * 1e3,
        (last_a - swapped_at) * 1e3
    );
    assert!(
        first_b <= applied_at + 1.0,
        "B's first answer came {:.2} s after the change was applied: the stale entry was not \
         flushed",
        first_b - applied_at
    );
    assert!(last_a < first_b, "A still answered after B took over:\n{o}");
    assert!(
        from_b.len() >= 10,
        "B answered only {} datagrams:\n{o}",
        from_b.len()
    );

    // B saw the very same client address and port: the same flow, re-translated.
    let b_log = echo_b.stop();
    let seen: BTreeSet<&str> = b_log
        .stdout
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    let expect = format!("from={}:{SPORT}", client.ip);
    assert_eq!(
        seen,
        BTreeSet::from([expect.as_str()]),
        "B's log:\n{}",
        b_log.stdout
    );
    drop(echo_a);
    let ct = conntrack(w.node(1));
    assert!(
        ct.iter()
            .any(|e| e.client == format!("{}:{SPORT}", client.ip)
                && e.backend == format!("{}:{PORT}", b.ip)),
        "n1 does not track the flow to B: {ct:#?}"
    );
    eprintln!("took {:.1?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// 8. Static config reload (issue 6).

#[test]
fn a_new_service_and_a_removed_peer_in_the_config_file_apply_without_a_restart() {
    let started = Instant::now();
    let mut w = World::new(2, 1);
    let (p1, p2) = (w.pod("n1-p1"), w.pod("n2-p1"));
    let _server = w.http_server(&p2);
    let pids: Vec<Option<u32>> = w.lab.nodes.iter().map(|n| n.pid).collect();
    let url = "http://10.96.1.80/";
    let pod_url = format!("http://{}:{HTTP_PORT}/", p2.ip);

    // Before: no such Service.
    assert!(
        curl_once(&p1.netns, url, 1).is_err(),
        "{url} answered before it existed"
    );

    // A Service appears in the config files: it works.
    let web = Svc::new(
        "late",
        "10.96.1.80",
        vec![tcp(80, HTTP_PORT)],
        vec![Ep::of(&p2)],
    );
    let t = Instant::now();
    w.set_services(&[web]);
    eprintln!("new service applied in {:.0?}", t.elapsed());
    let r = curl_ok(&p1.netns, url);
    assert_eq!(
        (r.name.as_str(), r.remote.as_str()),
        (p2.name.as_str(), "10.96.1.80:80")
    );

    // n2 leaves n1's config: n1 no longer routes to n2's pods.
    let n2_name = w.node(2).name.clone();
    let t = Instant::now();
    w.set_peer_removed(0, Some(&n2_name));
    let n1 = w.node(1).clone();
    let gone = wait_until(APPLY_TIMEOUT, || !peer_names(&n1).contains(&n2_name));
    assert!(gone, "n1 still has peer {n2_name}; log:\n{}", log_tail(&n1));
    eprintln!("peer removal applied in {:.0?}", t.elapsed());
    assert!(
        curl_once(&p1.netns, &pod_url, 1).is_err(),
        "{pod_url} still reachable from n1 with n2 removed from n1's peers"
    );
    assert!(
        curl_once(&p1.netns, url, 1).is_err(),
        "{url} (backend on n2) still reachable from n1 with n2 removed from n1's peers"
    );

    // And back.
    w.set_peer_removed(0, None);
    let back = wait_until(APPLY_TIMEOUT, || peer_names(&n1).contains(&n2_name));
    assert!(
        back,
        "n1 did not get peer {n2_name} back; log:\n{}",
        log_tail(&n1)
    );
    assert_eq!(curl_ok(&p1.netns, &pod_url).name, p2.name);
    assert_eq!(curl_ok(&p1.netns, url).name, p2.name);

    // All of it without a restart: the same daemons, still running.
    for (n, pid) in w.lab.nodes.iter().zip(&pids) {
        assert_eq!(n.pid, *pid);
        assert!(
            n.daemon_alive(),
            "{}: vswitchd (pid {pid:?}) is gone",
            n.name
        );
        let reloads = fs::read_to_string(&n.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("services now"))
            .count();
        assert!(reloads >= 1, "{}: no \"services now\" in the log", n.name);
    }
    eprintln!("took {:.1?}", started.elapsed());
}

/// The lab's own way to add a Service (`vswitch-lab add-service`): endpoints named as pods, a
/// ClusterIP given, every node serving it when the call returns, its DNS name and NodePort
/// working; a bad one refused and nothing changed; removed, it is gone everywhere.
#[test]
fn a_service_added_by_the_lab_from_its_pods_works_on_every_node_and_goes() {
    use vswitch_lab::services::{PortArg, ServiceArgs};
    let mut w = World::new(2, 2);
    let (p1, b1, b2) = (w.pod("n1-p1"), w.pod("n1-p2"), w.pod("n2-p1"));
    let _s1 = w.http_server(&b1);
    let _s2 = w.http_server(&b2);
    let args = ServiceArgs {
        name: "web".into(),
        ports: vec![format!("80:{HTTP_PORT}").parse::<PortArg>().expect("port")],
        endpoints: vec![b1.name.clone(), b2.name.clone()],
        cluster_ip: None,
        node_port: Some(30080),
    };
    let spec = w.lab.add_service(&args).expect("add-service");
    assert_eq!(spec.cluster_ips, ["10.96.0.100".parse::<IpAddr>().unwrap()]);
    // Served on every node as soon as it returned: no waiting here.
    for n in &w.lab.nodes {
        let f = frontends(n);
        assert!(
            f.iter()
                .any(|(name, vip, backends)| name == "default/web:80/TCP"
                    && vip == "10.96.0.100"
                    && backends.len() == 2),
            "{}: {f:?}",
            n.name
        );
    }
    let names: BTreeSet<String> = curl_many(&p1.netns, "http://web.default.svc.cluster.local/", 8)
        .iter()
        .map(|r| r.name.clone())
        .collect();
    assert!(
        names.is_subset(&[b1.name.clone(), b2.name.clone()].into()),
        "{names:?}"
    );
    let via_node_port = curl_ok(&p1.netns, "http://192.168.100.2:30080/");
    assert!([&b1.name, &b2.name].contains(&&via_node_port.name));

    // A name the API would refuse: refused with vswitchd's own check before any node sees
    // it, and the running Service is untouched.
    let bad = ServiceArgs {
        name: "Web_1".into(),
        ..args.clone()
    };
    let e = w.lab.add_service(&bad).expect_err("not a DNS label");
    assert!(e.to_string().contains("must be DNS labels"), "{e}");
    assert_eq!(w.lab.services.len(), 1);
    assert!(curl_once(&p1.netns, "http://10.96.0.100/", 3).is_ok());

    w.lab.del_service("web").expect("del-service");
    for n in &w.lab.nodes {
        assert!(
            !frontends(n)
                .iter()
                .any(|(name, ..)| name.starts_with("default/")),
            "{}",
            n.name
        );
    }
    assert!(curl_once(&p1.netns, "http://10.96.0.100/", 1).is_err());
    let e = w.lab.del_service("web").expect_err("twice");
    assert!(e.to_string().contains("no such Service"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// 9. The node and the pods.

#[test]
fn the_node_reaches_pods_and_cluster_ips_and_pods_reach_the_node() {
    let started = Instant::now();
    let mut w = World::new(2, 1);
    let (p1, p2) = (w.pod("n1-p1"), w.pod("n2-p1"));
    let _server = w.http_server(&p2);
    w.set_services(&[Svc::new(
        "web",
        "10.96.1.90",
        vec![tcp(80, HTTP_PORT)],
        vec![Ep::of(&p2)],
    )]);
    let n1 = w.node(1).clone();

    // From the node itself (as kubelet's probes would): a pod on another node, a ClusterIP.
    let r = curl_ok(&n1.netns, &format!("http://{}:{HTTP_PORT}/", p2.ip));
    assert_eq!(r.name, p2.name, "{r:?}");
    let r = curl_ok(&n1.netns, "http://10.96.1.90/");
    assert_eq!(
        (r.name.as_str(), r.remote.as_str()),
        (p2.name.as_str(), "10.96.1.90:80")
    );

    // A server in the node's namespace on the gateway address, reached from pods.
    let node_server = Bg::spawn(
        &n1.netns,
        &w.py("http", &["node-n1", "9090", "10.244.1.1"]),
        Duration::from_secs(60),
    );
    wait_listening(&n1.netns, "t", 9090);
    let r = curl_ok(&p1.netns, "http://10.244.1.1:9090/");
    assert_eq!(
        (r.name.as_str(), r.peer_ip.as_str()),
        ("node-n1", p1.ip.to_string().as_str()),
        "{r:?}"
    );
    let r = curl_ok(&p2.netns, "http://10.244.1.1:9090/");
    assert_eq!(
        (r.name.as_str(), r.peer_ip.as_str()),
        ("node-n1", p2.ip.to_string().as_str()),
        "from a pod on another node: {r:?}"
    );
    drop(node_server);

    // A server on node 1's own (underlay) address, as the API server is behind the
    // `kubernetes` Service: a pod on node 2 reaches it directly and through a ClusterIP whose
    // endpoint is that address. Node 1 answers the pod through its switch, over the overlay,
    // from its own address.
    let api_like = Bg::spawn(
        &n1.netns,
        &w.py("http", &["api-n1", "6443", &n1.underlay_ip.to_string()]),
        Duration::from_secs(60),
    );
    wait_listening(&n1.netns, "t", 6443);
    let mut kubernetes = Svc::new("kubernetes", "10.96.1.91", vec![tcp(443, 6443)], vec![]);
    kubernetes.endpoints = vec![Ep {
        ip: IpAddr::V4(n1.underlay_ip),
        node: n1.name.clone(),
        ready: true,
        serving: true,
        terminating: false,
        port: None,
    }];
    w.set_services(&[
        Svc::new(
            "web",
            "10.96.1.90",
            vec![tcp(80, HTTP_PORT)],
            vec![Ep::of(&p2)],
        ),
        kubernetes,
    ]);
    let r = curl_ok(&p2.netns, &format!("http://{}:6443/", n1.underlay_ip));
    assert_eq!(r.name, "api-n1", "{r:?}");
    let r = curl_ok(&p2.netns, "http://10.96.1.91:443/");
    assert_eq!(
        (r.name.as_str(), r.remote.as_str()),
        ("api-n1", "10.96.1.91:443"),
        "through the ClusterIP: {r:?}"
    );
    drop(api_like);
    eprintln!("took {:.1?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// 11. hostPorts (issue 24).

#[test]
fn host_ports_reach_a_pod_from_outside_from_other_pods_and_from_its_node() {
    let started = Instant::now();
    let mut w = World::new(2, 1);
    let p1 = w.pod("n1-p1");
    let publish = |s: &str| vswitch_lab::parse_publish(s).unwrap_or_else(|e| panic!("{e}"));
    let opts = vswitch_lab::PodOptions {
        host_ports: vec![publish("8090:8080"), publish("5354:5353/udp")],
        ..Default::default()
    };
    let web = w
        .lab
        .add_pod_with(2, "web", &opts)
        .unwrap_or_else(|e| panic!("add pod web with hostPorts: {e}"))
        .clone();
    let _http = w.http_server(&web);
    let _echo = Bg::spawn(
        &web.netns,
        &w.py("udp-echo", &[&web.name, "5353"]),
        Duration::from_secs(60),
    );
    wait_listening(&web.netns, "u", 5353);
    let n2 = w.node(2).clone();
    wait_listening(&n2.netns, "t", 8090);
    wait_listening(&n2.netns, "u", 5354);
    let ports = vswitchctl_json(&n2, &["ports"]);
    let listed: Vec<String> = ports["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["ip"].as_str() == Some(&web.ip.to_string()))
        .flat_map(|p| p["host_ports"].as_array().cloned().unwrap_or_default())
        .map(|m| {
            format!(
                "{}->{}/{}",
                m["host_port"],
                m["container_port"],
                m["protocol"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(
        listed,
        ["8090->8080/tcp", "5354->5353/udp"],
        "vswitchctl ports on n2: {ports}"
    );

    // From outside the cluster: the pod sees the client's own address, as with the portmap
    // plugin's DNAT.
    let client = outside_client(&w, "192.168.100.250/24");
    let url = format!("http://{}:8090/", n2.underlay_ip);
    let r = curl_ok(client.name(), &url);
    assert_eq!(
        (r.name.as_str(), r.peer_ip.as_str()),
        (web.name.as_str(), "192.168.100.250"),
        "{url} from outside: {r:?}"
    );
    let o = exec_in(
        client.name(),
        &w.py(
            "udp-client",
            &[&n2.underlay_ip.to_string(), "5354", "1", "0.1", "40002"],
        ),
        Duration::from_secs(10),
    );
    assert!(o.success(), "{o}");
    let kept = o
        .stdout
        .lines()
        .filter(|l| {
            l.contains(&format!(
                "reply from={}:5354 {} seq",
                n2.underlay_ip, web.name
            )) && l.ends_with("peer=192.168.100.250")
        })
        .count();
    assert!(
        kept >= 8,
        "UDP hostPort {}:5354: {kept} of 10 answered from the node with the client's address:\n{o}",
        n2.underlay_ip
    );

    // From a pod on another node: its replies would cross the switch, not the node, so the
    // relay sends from the node's address (as a hairpin is masqueraded).
    let r = curl_ok(&p1.netns, &url);
    assert_eq!(
        (r.name.as_str(), r.peer_ip.as_str()),
        (web.name.as_str(), "10.244.2.1"),
        "{url} from pod {}: {r:?}",
        p1.name
    );
    // From the node itself, on its loopback address.
    let r = curl_ok(&n2.netns, "http://127.0.0.1:8090/");
    assert_eq!(r.name, web.name, "127.0.0.1:8090 on n2: {r:?}");

    // A second pod asking for a port in use: its ADD fails with the reason and leaves nothing.
    let before = vswitchctl_json(&n2, &["ports"])["ports"]
        .as_array()
        .map_or(0, Vec::len);
    let err = match w.lab.add_pod_with(2, "web2", &opts) {
        Ok(p) => panic!("a second pod got hostPort 8090 too: {p:?}"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("8090"),
        "the error should name the port: {err}"
    );
    assert!(w.lab.find_pod("n2-web2").is_none());
    let after = vswitchctl_json(&n2, &["ports"]);
    assert_eq!(
        after["ports"].as_array().map_or(0, Vec::len),
        before,
        "a failed ADD left a port behind: {after}"
    );
    let r = curl_ok(client.name(), &url);
    assert_eq!(r.name, web.name, "the first pod keeps its hostPort: {r:?}");

    // A new vswitchd taking the node over serves the pod's hostPorts too.
    w.lab
        .restart_daemon(1, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("restart n2's vswitchd: {e}"));
    wait_listening(&n2.netns, "t", 8090);
    let r = curl_ok(client.name(), &url);
    assert_eq!(
        (r.name.as_str(), r.peer_ip.as_str()),
        (web.name.as_str(), "192.168.100.250"),
        "{url} after a restart: {r:?}"
    );

    // The pod's DEL closes its hostPorts: the node refuses at once.
    w.lab
        .del_pod(&web.name)
        .unwrap_or_else(|e| panic!("del pod {}: {e}", web.name));
    let closed = wait_until(Duration::from_secs(5), || {
        let o = exec_in(
            &n2.netns,
            &["ss", "-Hltn", "sport = :8090"],
            Duration::from_secs(3),
        );
        o.success() && o.stdout.trim().is_empty()
    });
    assert!(
        closed,
        "hostPort 8090 still listened on after the pod's DEL"
    );
    match curl_once(client.name(), &url, 3) {
        Ok(r) => panic!("{url} answered after the pod's DEL: {r:?}"),
        Err((o, _)) => assert_eq!(o.status.code(), Some(7), "{url}: refused:\n{o}"),
    }
    eprintln!("took {:.1?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// 12. External IPs and LoadBalancer addresses from outside the cluster (issue 27).

#[test]
fn external_ips_and_load_balancer_addresses_reach_endpoints_from_outside() {
    let started = Instant::now();
    let mut w = World::new(2, 1);
    let (p1, p2) = (w.pod("n1-p1"), w.pod("n2-p1"));
    let _servers = [w.http_server(&p1), w.http_server(&p2)];
    // Policy Cluster, its only endpoint on node 2.
    let mut ext = Svc::new(
        "ext",
        "10.96.1.61",
        vec![tcp(80, HTTP_PORT)],
        vec![Ep::of(&p2)],
    );
    ext.external_ips = vec!["203.0.113.10"];
    // Policy Local, with these endpoints.
    let lb = |eps: Vec<Ep>| {
        let mut s = Svc::new("lb", "10.96.1.62", vec![tcp(80, HTTP_PORT)], eps);
        s.load_balancer_ips = vec!["203.0.113.20"];
        s.external_local = true;
        s
    };
    // An endpoint on each node.
    w.set_services(&[ext.clone(), lb(vec![Ep::of(&p1), Ep::of(&p2)])]);
    let out = w
        .lab
        .outside_netns
        .clone()
        .expect("the lab has its outside host");
    let (n1, n2) = (w.node(1).clone(), w.node(2).clone());
    let client = vswitch_lab::OUTSIDE_IP.to_string();
    // The outside network routes each address to a node, as a static route, a cloud's or
    // MetalLB's balancer does.
    let route = |addr: &str, node: &Node| {
        let via = node.underlay_ip.to_string();
        let o = exec_in(
            &out,
            &["ip", "route", "replace", addr, "via", &via],
            Duration::from_secs(5),
        );
        assert!(
            o.success(),
            "route {addr} via {via} on the outside host: {o}"
        );
    };

    // The external IP, routed to node 1: translated there to the endpoint on node 2, which
    // sees node 1 (policy Cluster masquerades), and its answers come back through node 1.
    route("203.0.113.10", &n1);
    for _ in 0..3 {
        let r = curl_ok(&out, "http://203.0.113.10/");
        assert_eq!(
            (r.name.as_str(), r.peer_ip.as_str()),
            (p2.name.as_str(), "10.244.1.1"),
            "external IP through n1: {r:?}"
        );
    }
    // The LoadBalancer address, policy Local: each node serves it with its own endpoint, which
    // sees the client's own address.
    for (node, pod) in [(&n1, &p1), (&n2, &p2)] {
        route("203.0.113.20", node);
        for _ in 0..3 {
            let r = curl_ok(&out, "http://203.0.113.20/");
            assert_eq!(
                (r.name.as_str(), r.peer_ip.as_str()),
                (pod.name.as_str(), client.as_str()),
                "LoadBalancer address through {}: {r:?}",
                node.name
            );
        }
    }
    // Pods reach both addresses as well (translated at their own switch).
    for addr in ["203.0.113.10", "203.0.113.20"] {
        let r = curl_ok(&p1.netns, &format!("http://{addr}/"));
        assert!(
            r.name == p1.name || r.name == p2.name,
            "{addr} from pod {}: {r:?}",
            p1.name
        );
    }
    // Policy Local on a node without an endpoint refuses at once.
    w.set_services(&[ext, lb(vec![Ep::of(&p2)])]);
    route("203.0.113.20", &n1);
    match curl_once(&out, "http://203.0.113.20/", 3) {
        Ok(r) => panic!("policy Local without a local endpoint answered: {r:?}"),
        Err((o, secs)) => {
            assert_eq!(o.status.code(), Some(7), "refused (curl exit 7):\n{o}");
            assert!(secs < 1.0, "refused at once, took {secs} s:\n{o}");
        }
    }
    eprintln!("took {:.1?}", started.elapsed());
}
