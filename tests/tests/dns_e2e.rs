//! End-to-end tests of cluster DNS answered at the switch (issue 7), in the lab: a real vswitchd
//! per node, pods attached by the real CNI plugin (which also gives them their resolv.conf:
//! `nameserver 10.96.0.10`, the search list and `ndots:5`, written to
//! `/etc/netns/<pod>/resolv.conf` so that `ip netns exec` uses it), and real clients in the
//! pods: `dig` and glibc's resolver through `getent`.
//!
//! What is shown, one test each:
//! 1. the records of the Kubernetes DNS specification from a pod: A for a ClusterIP Service; a
//!    headless Service's ready endpoints (not the not-ready one) and its
//!    `<hostname>.<svc>.<ns>.svc.<zone>` names; SRV for named ports; PTR for a ClusterIP, a
//!    pod and a headless endpoint; pod names `a-b-c-d.<ns>.pod.<zone>`; NXDOMAIN with the
//!    zone's SOA in the authority section; short names through the search list; EDNS0;
//! 2. an answer too large for UDP is truncated and the client gets it over TCP (dig and glibc);
//! 3. a Service written into the config at runtime resolves within the reload (no restart),
//!    and a removed one stops resolving;
//! 4. names outside the cluster domain go to the upstream resolver (a fake one in the node's
//!    namespace, `dns.upstreams`), once: repeats come from the cache, which honours TTLs; an
//!    upstream's truncated answer is fetched again over TCP; the search list's misses never
//!    leave the node;
//! 5. with `dns.answer = false` the switch leaves DNS alone: a query to 10.96.0.10 times out,
//!    and once a Service holds that address (a stand-in for CoreDNS in a pod) that answers.
//!
//! Tests 4 and 5 need settings that take a restart (`[dns]`): they bring a lab up with one
//! node and no pods, rewrite the node's config, restart its vswitchd (the lab records the new
//! pid, so teardown still finds it) and only then attach pods: a restart takes the pod
//! interfaces with it.
//!
//! Needs root, iproute2, dig (dnsutils), getent (libc-bin) and python3. Each test builds its
//! own lab with a unique name and tears it down when its guard drops, also on failure (and
//! removes any `/etc/netns/<lab>-*` directory left behind). Every process runs under `timeout`;
//! background servers run in a process group that is killed when their guard drops.

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use conf::Config;
use vswitch_lab::{Lab, LabGuard, LabSpec, Node, Pod};
use vswitch_tests::{bounded_in, exec_in, have, python, require_root, unique, wait_until, Out};

/// The cluster DNS address the lab gives pods (its nodes' `dns.nameservers`).
const CLUSTER_DNS: &str = "10.96.0.10";
/// How long a config change may take to be served: the reload polls every 500 ms.
const APPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// The fake upstream resolver's address, in the node's namespace (vswitchd's own).
const UPSTREAM: &str = "127.0.0.1:5353";

// ---------------------------------------------------------------------------------------------
// A DNS server for the tests: the node's upstream resolver, or a stand-in for CoreDNS.

/// `fake-dns HOST PORT zone|catch-all [ADDR]`: UDP and TCP on HOST:PORT. Logs every query as
/// `query NAME TYPE udp|tcp` (after `listening` once it is bound). In `zone` mode it knows
/// `example.test` (A 192.0.2.77, TTL 300), `short.test` (A 192.0.2.78, TTL 1) and `big.test`
/// (60 A records, TTL 300: over UDP only a truncated empty reply, TC=1, so a resolver must ask
/// again over TCP); every other name is NXDOMAIN. In `catch-all` mode every A query is
/// answered with ADDR (TTL 5), as a cluster DNS server of its own would answer.
const FAKE_DNS: &str = r#"
import socket, struct, sys, threading
host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
catch_all = sys.argv[4] if mode == "catch-all" else None
ZONE = {
    "example.test": (300, ["192.0.2.77"]),
    "short.test": (1, ["192.0.2.78"]),
    "big.test": (300, ["192.0.2.%d" % i for i in range(1, 61)]),
}
lock = threading.Lock()

def log(s):
    with lock:
        sys.stdout.write(s + "\n")
        sys.stdout.flush()

def parse(q):
    i, labels = 12, []
    while q[i]:
        n = q[i]
        labels.append(q[i + 1:i + 1 + n].decode("ascii", "replace").lower())
        i += 1 + n
    qtype, = struct.unpack("!H", q[i + 1:i + 3])
    return ".".join(labels), qtype, q[12:i + 5]

def reply(q, proto):
    qid, qflags = struct.unpack("!HH", q[:4])
    name, qtype, question = parse(q)
    log("query %s %d %s" % (name, qtype, proto))
    answers, rcode, tc = [], 0, 0
    if catch_all is not None:
        if qtype == 1:
            answers = [(5, catch_all)]
    elif name in ZONE:
        ttl, addrs = ZONE[name]
        if qtype == 1:
            if name == "big.test" and proto == "udp":
                tc = 0x0200
            else:
                answers = [(ttl, a) for a in addrs]
    else:
        rcode = 3
    flags = 0x8000 | 0x0400 | (qflags & 0x0100) | 0x0080 | tc | rcode
    out = struct.pack("!HHHHHH", qid, flags, 1, len(answers), 0, 0) + question
    for ttl, a in answers:
        out += struct.pack("!HHHIH", 0xC00C, 1, 1, ttl, 4) + socket.inet_aton(a)
    return out

def serve_udp(s):
    while True:
        q, peer = s.recvfrom(4096)
        try:
            s.sendto(reply(q, "udp"), peer)
        except Exception as e:
            log("error %r" % e)

def serve_conn(c):
    try:
        c.settimeout(5)
        while True:
            n = c.recv(2)
            if len(n) < 2:
                return
            want, = struct.unpack("!H", n)
            q = b""
            while len(q) < want:
                chunk = c.recv(want - len(q))
                if not chunk:
                    return
                q += chunk
            r = reply(q, "tcp")
            c.sendall(struct.pack("!H", len(r)) + r)
    except Exception:
        pass
    finally:
        c.close()

def serve_tcp(s):
    while True:
        c, _ = s.accept()
        threading.Thread(target=serve_conn, args=(c,), daemon=True).start()

u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind((host, port))
t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind((host, port))
t.listen(16)
threading.Thread(target=serve_tcp, args=(t,), daemon=True).start()
log("listening")
serve_udp(u)
"#;

/// Panics with what to install unless the clients the tests drive are there.
fn require_tools() {
    require_root();
    for (program, package) in [
        ("dig", "dnsutils"),
        ("getent", "libc-bin"),
        ("timeout", "coreutils"),
    ] {
        assert!(
            have(program),
            "the DNS tests need `{program}`: apt-get install {package}"
        );
    }
    assert!(
        have("python3") || Path::new("/usr/bin/python3").is_file(),
        "the DNS tests need python3 for their fake DNS servers: apt-get install python3"
    );
}

// ---------------------------------------------------------------------------------------------
// Processes: bounded, background ones in their own process group and killed on drop.

/// A server in the background whose stdout can be read while it runs.
struct Bg {
    child: Option<Child>,
    desc: String,
    out: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
}

impl Bg {
    /// Starts `argv` in `ns` under `timeout LIMIT`, in a process group of its own.
    fn spawn(ns: &str, argv: &[&str], limit: Duration) -> Bg {
        let desc = format!(
            "{} (in {ns})",
            argv.join(" ").chars().take(80).collect::<String>()
        );
        let mut child = bounded_in(ns, argv, limit)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
        let out = Arc::new(Mutex::new(Vec::new()));
        let reader = |pipe: Option<Box<dyn Read + Send>>| {
            let buf = out.clone();
            thread::spawn(move || {
                let Some(mut p) = pipe else { return };
                let mut chunk = [0u8; 4096];
                while let Ok(n) = p.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    buf.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend_from_slice(&chunk[..n]);
                }
            })
        };
        let readers = vec![
            reader(child.stdout.take().map(|p| Box::new(p) as _)),
            reader(child.stderr.take().map(|p| Box::new(p) as _)),
        ];
        Bg {
            child: Some(child),
            desc,
            out,
            readers,
        }
    }

    /// What it printed so far (stdout and stderr, interleaved).
    fn output(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// Waits until it printed `line`; panics with its output if it did not within 5 s.
    fn wait_for_line(&mut self, line: &str) {
        let ok = wait_until(Duration::from_secs(5), || {
            self.output().lines().any(|l| l == line)
        });
        if !ok {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
                .map(|s| format!("it exited with {s}"))
                .unwrap_or_else(|| "it is still running".into());
            panic!(
                "{} did not print {line:?} within 5 s ({exited}); it printed:\n{}",
                self.desc,
                self.output()
            );
        }
    }

    /// The `query NAME TYPE PROTO` lines a fake DNS server logged for `name`.
    fn queries_for(&self, name: &str) -> Vec<String> {
        self.output()
            .lines()
            .filter(|l| l.split_whitespace().nth(1) == Some(name))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(pid) = libc::pid_t::try_from(c.id()) {
                // SAFETY: kill(2) on the process group our unreaped child leads (made its
                // leader by process_group(0)); the id cannot be reused before we reap it.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
            let _ = c.wait();
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The lab

/// A lab torn down on drop, and then any `/etc/netns/<lab>-*` directory (a pod's resolv.conf)
/// removed that teardown left.
struct DnsLab {
    lab: Option<LabGuard>,
    name: String,
}

impl DnsLab {
    fn up(pods: u32) -> DnsLab {
        require_tools();
        let name = unique("d");
        assert!(
            name.len() <= vswitch_lab::MAX_NAME_LEN,
            "lab name {name} is too long"
        );
        let lab = LabGuard::up(LabSpec::new(&name, 1, pods))
            .unwrap_or_else(|e| panic!("lab {name} did not come up: {e}"));
        DnsLab {
            lab: Some(lab),
            name,
        }
    }

    fn lab(&self) -> &Lab {
        self.lab.as_ref().expect("the lab is up until drop")
    }

    fn lab_mut(&mut self) -> &mut Lab {
        self.lab.as_mut().expect("the lab is up until drop")
    }

    fn node(&self) -> Node {
        self.lab().node("n1").clone()
    }

    fn pod(&self, name: &str) -> Pod {
        self.lab().pod(name).clone()
    }

    fn add_pod(&mut self, name: &str) -> Pod {
        let lab = self.lab_mut();
        let pod = lab
            .add_pod(1, name)
            .unwrap_or_else(|e| panic!("add pod {name}: {e}"))
            .clone();
        // The runtime's part: the pod's resolv.conf from the CNI result.
        let resolv =
            fs::read_to_string(Path::new("/etc/netns").join(&pod.netns).join("resolv.conf"))
                .unwrap_or_default();
        assert!(
            resolv.contains(&format!("nameserver {CLUSTER_DNS}")),
            "pod {name}'s resolv.conf does not name the cluster DNS; it is:\n{resolv}\nCNI result: {}",
            pod.cni_result
        );
        pod
    }

    fn config_text(&self) -> String {
        let node = self.node();
        fs::read_to_string(&node.config)
            .unwrap_or_else(|e| panic!("{}: {e}", node.config.display()))
    }

    /// Appends `[[services]]` tables to the node's config (the daemon reloads it).
    fn append_services(&self, toml: &str) {
        let node = self.node();
        let text = self.config_text() + "\n" + toml;
        Config::parse(&text)
            .unwrap_or_else(|e| panic!("the test's config is invalid: {e}\n{text}"));
        fs::write(&node.config, text).unwrap_or_else(|e| panic!("{}: {e}", node.config.display()));
    }

    /// Rewrites the `[dns]` section's `key = ...` line (adding it when missing) and restarts
    /// the node's vswitchd with the result, as settings bound at start need. Returns the new pid.
    fn restart_with_dns(&mut self, key: &str, value: &str) -> u32 {
        let node = self.node();
        let text = self.config_text();
        let mut out = String::new();
        let (mut in_dns, mut done) = (false, false);
        for line in text.lines() {
            if line.starts_with('[') {
                if in_dns && !done {
                    out.push_str(&format!("{key} = {value}\n"));
                    done = true;
                }
                in_dns = line.trim() == "[dns]";
            }
            if in_dns && line.split('=').next().map(str::trim) == Some(key) {
                out.push_str(&format!("{key} = {value}\n"));
                done = true;
                continue;
            }
            out.push_str(line);
            out.push('\n');
        }
        assert!(done, "the lab's config has no [dns] section:\n{text}");
        Config::parse(&out).unwrap_or_else(|e| panic!("the edited config is invalid: {e}\n{out}"));

        let old = node.pid.expect("the lab's vswitchd has a pid");
        stop_daemon(old, &node);
        fs::write(&node.config, &out).unwrap_or_else(|e| panic!("{}: {e}", node.config.display()));
        self.lab_mut()
            .restart_daemon(0, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("vswitchd did not come back after the restart: {e}"))
    }
}

impl Drop for DnsLab {
    fn drop(&mut self) {
        drop(self.lab.take());
        let prefix = format!("{}-", self.name);
        if let Ok(rd) = fs::read_dir("/etc/netns") {
            for e in rd.filter_map(Result::ok) {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    }
}

/// SIGTERM to the node's vswitchd (a child of this process: the lab started it here), reaped
/// within 10 s, else SIGKILL.
fn stop_daemon(pid: u32, node: &Node) {
    let Ok(p) = libc::pid_t::try_from(pid) else {
        panic!("pid {pid} out of range");
    };
    assert!(p > 0, "pid {pid}");
    let gone = |p: libc::pid_t| {
        let mut status = 0;
        // SAFETY: waitpid(2) with WNOHANG on one pid, writing only to our local `status`.
        let r = unsafe { libc::waitpid(p, &mut status, libc::WNOHANG) };
        r == p || (r < 0 && !Path::new(&format!("/proc/{p}")).exists())
    };
    for (sig, grace) in [(libc::SIGTERM, 10), (libc::SIGKILL, 5)] {
        // SAFETY: kill(2) on the lab daemon's pid, which is our unreaped child, so the pid
        // cannot have been reused.
        unsafe { libc::kill(p, sig) };
        if wait_until(Duration::from_secs(grace), || gone(p)) {
            return;
        }
    }
    panic!(
        "vswitchd pid {pid} of {} did not stop; its log:\n{}",
        node.name,
        log_tail(node, 20)
    );
}

fn log_tail(node: &Node, lines: usize) -> String {
    let text = fs::read_to_string(&node.log).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Whether `pid` is a live (not zombie) vswitchd running `config`.
fn daemon_running(pid: u32, node: &Node) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    !matches!(state, None | Some('Z') | Some('X'))
        && cmdline
            .split(|b| *b == 0)
            .any(|a| a == node.config.as_os_str().as_encoded_bytes())
}

/// A pod's address as the middle label of its DNS name: `10-244-1-2`.
fn dashed(ip: IpAddr) -> String {
    ip.to_string().replace('.', "-")
}

fn ip4(pod: &Pod) -> Ipv4Addr {
    match pod.ip {
        IpAddr::V4(a) => a,
        IpAddr::V6(a) => panic!("pod {} has IPv6 address {a}; the lab is IPv4", pod.name),
    }
}

// ---------------------------------------------------------------------------------------------
// dig and getent

/// One resource record as dig prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rr {
    name: String,
    ttl: u32,
    rtype: String,
    data: String,
}

/// What one dig run printed, parsed.
#[derive(Debug)]
struct Dig {
    out: Out,
    /// NOERROR, NXDOMAIN, ... (empty when no answer came).
    status: String,
    flags: BTreeSet<String>,
    answer: Vec<Rr>,
    authority: Vec<Rr>,
    additional: Vec<Rr>,
    /// The UDP size of the reply's OPT record, if it had one.
    edns_udp: Option<u16>,
    /// "UDP" or "TCP": how the answer came.
    transport: String,
}

impl Dig {
    fn parse(out: Out) -> Dig {
        let text = out.stdout.clone();
        let mut d = Dig {
            status: String::new(),
            flags: BTreeSet::new(),
            answer: Vec::new(),
            authority: Vec::new(),
            additional: Vec::new(),
            edns_udp: None,
            transport: String::new(),
            out,
        };
        let mut section: Option<&str> = None;
        for line in text.lines() {
            let line = line.trim_end();
            if let Some(rest) = line.split("status: ").nth(1) {
                d.status = rest.split(',').next().unwrap_or_default().to_string();
            } else if let Some(rest) = line.strip_prefix(";; flags:") {
                let f = rest.split(';').next().unwrap_or_default();
                d.flags = f.split_whitespace().map(str::to_string).collect();
            } else if let Some(rest) = line.split("udp: ").nth(1) {
                d.edns_udp = rest.trim().parse().ok();
            } else if let Some(rest) = line.strip_prefix(";; SERVER:") {
                d.transport = rest
                    .rsplit('(')
                    .next()
                    .unwrap_or_default()
                    .trim_end_matches(')')
                    .to_string();
            }
            if line.is_empty() {
                section = None;
                continue;
            }
            if let Some(s) = line
                .strip_prefix(";; ")
                .and_then(|l| l.strip_suffix(" SECTION:"))
            {
                section = Some(match s {
                    "ANSWER" => "answer",
                    "AUTHORITY" => "authority",
                    "ADDITIONAL" => "additional",
                    _ => "other",
                });
                continue;
            }
            if line.starts_with(';') {
                continue;
            }
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(sec), true) = (section, f.len() >= 5) else {
                continue;
            };
            let rr = Rr {
                name: f[0].to_string(),
                ttl: f[1].parse().unwrap_or(u32::MAX),
                rtype: f[3].to_string(),
                data: f[4..].join(" "),
            };
            match sec {
                "answer" => d.answer.push(rr),
                "authority" => d.authority.push(rr),
                "additional" => d.additional.push(rr),
                _ => {}
            }
        }
        d
    }

    /// The data of the answer's records of `rtype`, sorted.
    fn data(&self, rtype: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .answer
            .iter()
            .filter(|r| r.rtype == rtype)
            .map(|r| r.data.clone())
            .collect();
        v.sort();
        v
    }

    fn answered(&self) -> bool {
        !self.status.is_empty()
    }
}

impl std::fmt::Display for Dig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.out.fmt(f)
    }
}

/// `dig ARGS...` from `ns` through the pod's resolv.conf: one try, 2 s per try.
fn dig(ns: &str, args: &[&str]) -> Dig {
    let mut argv = vec!["dig", "+time=2", "+tries=1"];
    argv.extend_from_slice(args);
    Dig::parse(exec_in(ns, &argv, Duration::from_secs(15)))
}

/// `getent DATABASE KEY` from `ns` (glibc's resolver, the pod's resolv.conf).
fn getent(ns: &str, database: &str, key: &str) -> Out {
    exec_in(ns, &["getent", database, key], Duration::from_secs(20))
}

/// The addresses (first column) `getent` printed.
fn getent_addrs(out: &Out) -> BTreeSet<String> {
    out.stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Polls `dig NAME` until it answers with an A record (true) or `timeout` passed.
fn resolves_within(ns: &str, name: &str, timeout: Duration) -> bool {
    wait_until(timeout, || {
        let d = dig(ns, &["+time=1", name]);
        d.status == "NOERROR" && !d.data("A").is_empty()
    })
}

/// Failures collected over many checks, so one run reports every wrong record at once.
#[derive(Default)]
struct Checks(Vec<String>);

impl Checks {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.0.push(what());
        }
    }

    fn assert_all(self) {
        assert!(
            self.0.is_empty(),
            "{} DNS check(s) failed:\n\n{}",
            self.0.len(),
            self.0.join("\n\n==========\n\n")
        );
    }
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------------------------------------
// The tests

#[test]
fn service_and_pod_records_answer_dig_and_getent_in_a_pod() {
    let lab = DnsLab::up(3);
    let client = lab.pod("n1-p1");
    let (db0, db1) = (lab.pod("n1-p2"), lab.pod("n1-p3"));
    let ns = client.netns.as_str();
    lab.append_services(&format!(
        r#"
[[services]]
namespace = "default"
name = "web"
cluster_ips = ["10.96.0.100"]
ports = [{{ name = "http", protocol = "TCP", port = 80, target_port = 8080 }},
         {{ name = "syslog", protocol = "UDP", port = 514 }},
         {{ protocol = "TCP", port = 9090 }}]
endpoints = [{{ ip = "{db0}" }}]

[[services]]
namespace = "default"
name = "db"
cluster_ips = []
ports = [{{ name = "pg", protocol = "TCP", port = 5432 }}]
endpoints = [{{ ip = "{db0}", hostname = "db-0" }},
             {{ ip = "{db1}", hostname = "db-1" }},
             {{ ip = "10.244.1.250", hostname = "db-2", ready = false }}]
"#,
        db0 = db0.ip,
        db1 = db1.ip
    ));
    assert!(
        resolves_within(ns, "web.default.svc.cluster.local", APPLY_TIMEOUT),
        "web.default.svc.cluster.local does not resolve {APPLY_TIMEOUT:?} after the config \
         write; vswitchd's log:\n{}",
        log_tail(&lab.node(), 20)
    );
    let mut c = Checks::default();

    // The pod's resolv.conf, as kubelet would write it.
    let resolv = fs::read_to_string(Path::new("/etc/netns").join(ns).join("resolv.conf"))
        .unwrap_or_default();
    c.check(
        resolv.contains("nameserver 10.96.0.10")
            && resolv.contains("search default.svc.cluster.local svc.cluster.local cluster.local")
            && resolv.contains("ndots:5"),
        || format!("the pod's resolv.conf is not kubelet's:\n{resolv}"),
    );

    // A for a ClusterIP Service: authoritative, the cluster TTL.
    let d = dig(ns, &["web.default.svc.cluster.local"]);
    c.check(
        d.status == "NOERROR"
            && d.flags.contains("aa")
            && d.data("A") == ["10.96.0.100"]
            && d.answer.iter().all(|r| r.ttl <= 5),
        || {
            format!(
                "A web.default.svc.cluster.local: want NOERROR, aa, 10.96.0.100 (TTL <= 5)\n{d}"
            )
        },
    );

    // Headless: the ready endpoints only, and each under its hostname.
    let d = dig(ns, &["db.default.svc.cluster.local"]);
    let want = vec![db0.ip.to_string(), db1.ip.to_string()];
    c.check(d.status == "NOERROR" && d.data("A") == want, || {
        format!("A db (headless): want the ready endpoints {want:?}, not 10.244.1.250\n{d}")
    });
    let d = dig(ns, &["db-1.db.default.svc.cluster.local"]);
    c.check(d.data("A") == [db1.ip.to_string()], || {
        format!("A db-1.db.default.svc.cluster.local: want {}\n{d}", db1.ip)
    });
    let d = dig(ns, &["db-2.db.default.svc.cluster.local"]);
    c.check(d.status == "NXDOMAIN", || {
        format!("A db-2.db.default.svc.cluster.local (a not-ready endpoint): want NXDOMAIN\n{d}")
    });
    let g = getent(ns, "ahosts", "db");
    let want = set(&[&db0.ip.to_string(), &db1.ip.to_string()]);
    c.check(g.success() && getent_addrs(&g) == want, || {
        format!("getent ahosts db: want exactly {want:?}\n{g}")
    });
    let g = getent(ns, "hosts", "db-0.db");
    c.check(
        g.success()
            && g.stdout.split_whitespace().collect::<Vec<_>>()
                == [
                    db0.ip.to_string().as_str(),
                    "db-0.db.default.svc.cluster.local",
                ],
        || {
            format!(
                "getent hosts db-0.db: want `{} db-0.db.default.svc.cluster.local`\n{g}",
                db0.ip
            )
        },
    );

    // SRV for named ports: the Service's own port and name for a ClusterIP; the endpoints'
    // port and hostnames (with their addresses as additional records) for a headless one.
    let d = dig(ns, &["SRV", "_http._tcp.web.default.svc.cluster.local"]);
    c.check(
        d.data("SRV") == ["0 100 80 web.default.svc.cluster.local."],
        || format!("SRV _http._tcp.web: want `0 100 80 web.default.svc.cluster.local.`\n{d}"),
    );
    let d = dig(ns, &["SRV", "_syslog._udp.web.default.svc.cluster.local"]);
    c.check(
        d.data("SRV") == ["0 100 514 web.default.svc.cluster.local."],
        || format!("SRV _syslog._udp.web: want port 514\n{d}"),
    );
    let d = dig(ns, &["SRV", "_syslog._tcp.web.default.svc.cluster.local"]);
    c.check(d.status != "NOERROR" || d.answer.is_empty(), || {
        format!("SRV _syslog._tcp.web (the port is UDP): want no record\n{d}")
    });
    let d = dig(ns, &["SRV", "_pg._tcp.db.default.svc.cluster.local"]);
    let targets: BTreeSet<String> = d
        .data("SRV")
        .iter()
        .map(|s| s.split_whitespace().skip(2).collect::<Vec<_>>().join(" "))
        .collect();
    let glue: BTreeSet<(String, String)> = d
        .additional
        .iter()
        .filter(|r| r.rtype == "A")
        .map(|r| (r.name.clone(), r.data.clone()))
        .collect();
    c.check(
        targets
            == set(&[
                "5432 db-0.db.default.svc.cluster.local.",
                "5432 db-1.db.default.svc.cluster.local.",
            ])
            && glue.contains(&("db-0.db.default.svc.cluster.local.".into(), db0.ip.to_string()))
            && glue.contains(&("db-1.db.default.svc.cluster.local.".into(), db1.ip.to_string())),
        || format!("SRV _pg._tcp.db (headless): want port 5432 on db-0 and db-1 with their A records as additional\n{d}"),
    );

    // PTR: a ClusterIP, a pod, and a headless endpoint with a hostname.
    let d = dig(ns, &["-x", "10.96.0.100"]);
    c.check(d.data("PTR") == ["web.default.svc.cluster.local."], || {
        format!("PTR 10.96.0.100: want web.default.svc.cluster.local.\n{d}")
    });
    let d = dig(ns, &["-x", &client.ip.to_string()]);
    let want = format!("{}.default.pod.cluster.local.", dashed(client.ip));
    c.check(d.data("PTR") == [want.clone()], || {
        format!("PTR {} (pod p1): want {want}\n{d}", client.ip)
    });
    let d = dig(ns, &["-x", &db1.ip.to_string()]);
    c.check(
        d.data("PTR") == ["db-1.db.default.svc.cluster.local."],
        || {
            format!(
                "PTR {} (headless endpoint db-1): want db-1.db.default.svc.cluster.local.\n{d}",
                db1.ip
            )
        },
    );

    // Pod records.
    let name = format!("{}.default.pod.cluster.local", dashed(db0.ip));
    let d = dig(ns, &[&name]);
    c.check(
        d.status == "NOERROR" && d.data("A") == [db0.ip.to_string()],
        || format!("A {name}: want {}\n{d}", db0.ip),
    );
    let ip = ip4(&db1);
    let g = getent(ns, "hosts", &format!("{}.default.pod", dashed(ip.into())));
    c.check(
        g.success() && getent_addrs(&g) == set(&[&ip.to_string()]),
        || {
            format!(
                "getent hosts {}.default.pod: want {ip}\n{g}",
                dashed(ip.into())
            )
        },
    );

    // A missing name: NXDOMAIN, with the zone's SOA (for negative caching) as authority.
    let d = dig(ns, &["nosuch.default.svc.cluster.local"]);
    let soa = d.authority.iter().find(|r| r.rtype == "SOA");
    c.check(
        d.status == "NXDOMAIN"
            && d.answer.is_empty()
            && d.flags.contains("aa")
            && soa.is_some_and(|s| {
                s.name == "cluster.local." && s.data.starts_with("ns.dns.cluster.local. ")
            }),
        || format!("A nosuch.default.svc.cluster.local: want NXDOMAIN, aa, SOA cluster.local. in the authority section\n{d}"),
    );
    // A name that exists with other types only: NODATA (NOERROR, no answer), not NXDOMAIN.
    let d = dig(ns, &["AAAA", "web.default.svc.cluster.local"]);
    c.check(d.status == "NOERROR" && d.answer.is_empty(), || {
        format!("AAAA web (IPv4-only Service): want NOERROR without records\n{d}")
    });

    // Short names through the search list (glibc, ndots:5).
    for key in ["web", "web.default", "web.default.svc"] {
        let g = getent(ns, "hosts", key);
        c.check(
            g.success()
                && g.stdout.split_whitespace().collect::<Vec<_>>()
                    == ["10.96.0.100", "web.default.svc.cluster.local"],
            || format!("getent hosts {key}: want `10.96.0.100 web.default.svc.cluster.local`\n{g}"),
        );
    }
    let d = dig(ns, &["+search", "web"]);
    c.check(d.data("A") == ["10.96.0.100"], || {
        format!("dig +search web: want 10.96.0.100\n{d}")
    });
    let g = getent(ns, "hosts", "nosuch");
    c.check(g.status.code() == Some(2), || {
        format!("getent hosts nosuch: want exit 2 (not found)\n{g}")
    });

    // EDNS0: an OPT record in the reply to a query with one, none without.
    let d = dig(ns, &["+bufsize=1232", "web.default.svc.cluster.local"]);
    c.check(
        d.out.stdout.contains(";; OPT PSEUDOSECTION:")
            && d.edns_udp.is_some()
            && d.data("A") == ["10.96.0.100"],
        || format!("dig +bufsize=1232: want an OPT pseudo-section and the answer\n{d}"),
    );
    let d = dig(ns, &["+noedns", "web.default.svc.cluster.local"]);
    c.check(
        !d.out.stdout.contains("OPT PSEUDOSECTION") && d.data("A") == ["10.96.0.100"],
        || format!("dig +noedns: want no OPT pseudo-section in the reply\n{d}"),
    );

    // From another pod too, by its own resolv.conf.
    let d = dig(&db1.netns, &["web.default.svc.cluster.local"]);
    c.check(d.data("A") == ["10.96.0.100"], || {
        format!("A web from pod p3: want 10.96.0.100\n{d}")
    });
    c.assert_all();
}

#[test]
fn an_answer_too_large_for_udp_comes_over_tcp() {
    let lab = DnsLab::up(1);
    let ns = lab.pod("n1-p1").netns;
    // 60 ready endpoints: 60 A records are ~1 KB, over the 512 bytes of plain DNS over UDP.
    let endpoints: Vec<String> = (100..160)
        .map(|i| format!("{{ ip = \"10.244.1.{i}\" }}"))
        .collect();
    lab.append_services(&format!(
        "[[services]]\nnamespace = \"default\"\nname = \"many\"\ncluster_ips = []\n\
         ports = [{{ name = \"http\", protocol = \"TCP\", port = 80 }}]\nendpoints = [{}]\n",
        endpoints.join(", ")
    ));
    assert!(
        resolves_within(&ns, "many.default.svc.cluster.local", APPLY_TIMEOUT),
        "many.default.svc.cluster.local does not resolve after the config write; log:\n{}",
        log_tail(&lab.node(), 20)
    );
    let all: BTreeSet<String> = (100..160).map(|i| format!("10.244.1.{i}")).collect();

    // Over UDP without EDNS the answer does not fit: TC set.
    let d = dig(
        &ns,
        &["+noedns", "+ignore", "many.default.svc.cluster.local"],
    );
    assert!(
        d.answered() && d.flags.contains("tc") && d.transport == "UDP",
        "plain UDP query for 60 records: want a truncated (tc) reply over UDP\n{d}"
    );

    // dig follows TC to TCP on the same address.
    let d = dig(&ns, &["+noedns", "many.default.svc.cluster.local"]);
    let got: BTreeSet<String> = d.data("A").into_iter().collect();
    assert!(
        d.out.stdout.contains("Truncated, retrying in TCP mode")
            && d.transport == "TCP"
            && got == all,
        "DNS over TCP ({CLUSTER_DNS}:53/TCP) must give the full answer after truncation; \
         want all 60 endpoints over TCP, got {} records over {:?}. If TCP is not answered at \
         all, DNS over TCP is missing from the switch.\n{d}",
        got.len(),
        d.transport
    );
    let d = dig(&ns, &["+tcp", "many.default.svc.cluster.local"]);
    assert!(
        d.transport == "TCP" && d.data("A").len() == 60,
        "dig +tcp: want 60 records over TCP\n{d}"
    );

    // So does glibc (no EDNS, 512 bytes): every address, via TCP.
    let g = getent(&ns, "ahosts", "many");
    assert!(
        g.success() && getent_addrs(&g) == all,
        "getent ahosts many: want all 60 endpoints (glibc retries a truncated answer over TCP), \
         got {}\n{g}",
        getent_addrs(&g).len()
    );

    // With a large EDNS buffer it fits in one UDP reply.
    let d = dig(&ns, &["+bufsize=4096", "many.default.svc.cluster.local"]);
    assert!(
        d.transport == "UDP" && !d.flags.contains("tc") && d.data("A").len() == 60,
        "dig +bufsize=4096: want all 60 records in one UDP reply\n{d}"
    );
}

#[test]
fn a_service_added_at_runtime_resolves_at_once_without_a_restart() {
    let lab = DnsLab::up(1);
    let node = lab.node();
    let ns = lab.pod("n1-p1").netns;
    let pid = node.pid.expect("the lab's vswitchd has a pid");
    let name = "late.default.svc.cluster.local";

    let d = dig(&ns, &[name]);
    assert_eq!(d.status, "NXDOMAIN", "before the Service exists\n{d}");

    let service = "[[services]]\nnamespace = \"default\"\nname = \"late\"\n\
                   cluster_ips = [\"10.96.0.123\"]\nports = [{ port = 80 }]\n";
    let before = lab.config_text();
    lab.append_services(service);
    let written = Instant::now();
    let mut last = None;
    let ok = wait_until(Duration::from_secs(10), || {
        let d = dig(&ns, &["+time=1", name]);
        let ok = d.data("A") == ["10.96.0.123"];
        last = Some(d);
        ok
    });
    let took = written.elapsed();
    let last = last.map(|d| d.to_string()).unwrap_or_default();
    assert!(
        ok,
        "{name} does not resolve 10 s after the config write; last dig:\n{last}\nlog:\n{}",
        log_tail(&node, 20)
    );
    eprintln!("a_service_added_at_runtime: resolved {took:?} after the config write");
    let g = getent(&ns, "hosts", "late");
    assert!(
        getent_addrs(&g) == set(&["10.96.0.123"]),
        "getent hosts late: want 10.96.0.123\n{g}"
    );

    // The same daemon: not restarted, and it said why the names changed.
    let log = fs::read_to_string(&node.log).unwrap_or_default();
    assert!(
        daemon_running(pid, &node),
        "vswitchd pid {pid} is no longer running"
    );
    assert_eq!(
        log.matches("DNS: answering").count(),
        1,
        "vswitchd started more than once:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("services now") && l.contains("default/late")),
        "the log does not say the services changed:\n{log}"
    );

    // And a removed one stops resolving just as fast.
    fs::write(&node.config, before).unwrap_or_else(|e| panic!("{}: {e}", node.config.display()));
    let removed = Instant::now();
    let gone = wait_until(Duration::from_secs(10), || {
        dig(&ns, &["+time=1", name]).status == "NXDOMAIN"
    });
    assert!(
        gone,
        "{name} still resolves {:?} after its Service was removed from the config",
        removed.elapsed()
    );
    eprintln!(
        "removed Service stopped resolving after {:?}",
        removed.elapsed()
    );
    assert!(daemon_running(pid, &node), "vswitchd pid {pid} is gone");
}

#[test]
fn names_outside_the_cluster_are_forwarded_once_and_then_cached() {
    let mut lab = DnsLab::up(0);
    let node = lab.node();
    let (host, port) = UPSTREAM.split_once(':').expect("ip:port");
    let mut upstream = Bg::spawn(
        &node.netns,
        &[python(), "-c", FAKE_DNS, host, port, "zone"],
        Duration::from_secs(300),
    );
    upstream.wait_for_line("listening");
    lab.restart_with_dns("upstreams", &format!("[\"{UPSTREAM}\"]"));
    let log = log_tail(&node, 30);
    assert!(
        log.contains(&format!("forwarding other names to [{UPSTREAM}]")),
        "vswitchd does not say it forwards to {UPSTREAM}:\n{log}"
    );
    let ns = lab.add_pod("c1").netns;
    let a_queries = |name: &str| -> Vec<String> {
        upstream
            .queries_for(name)
            .into_iter()
            .filter(|l| l.split_whitespace().nth(2) == Some("1"))
            .collect()
    };

    // The upstream's answer, through the switch.
    let first = dig(&ns, &["example.test"]);
    assert!(
        first.status == "NOERROR" && first.data("A") == ["192.0.2.77"],
        "example.test: want the upstream's 192.0.2.77\n{first}\nupstream saw:\n{}",
        upstream.output()
    );
    assert_eq!(
        a_queries("example.test").len(),
        1,
        "the upstream should see example.test once:\n{}",
        upstream.output()
    );
    // Again: from the cache (the upstream sees nothing), with the TTL counting down.
    thread::sleep(Duration::from_millis(1100));
    let second = dig(&ns, &["example.test"]);
    let ttl = |d: &Dig| d.answer.first().map(|r| r.ttl).unwrap_or(u32::MAX);
    assert!(
        second.data("A") == ["192.0.2.77"] && ttl(&second) < ttl(&first) && ttl(&second) >= 290,
        "the cached answer: want 192.0.2.77 with a TTL below the first's {} (and near 300)\n{second}",
        ttl(&first)
    );
    assert_eq!(
        a_queries("example.test").len(),
        1,
        "the second query for example.test went upstream instead of to the cache:\n{}",
        upstream.output()
    );

    // A 1-second TTL is honoured: after it, the name is asked again.
    let d = dig(&ns, &["short.test"]);
    assert_eq!(d.data("A"), ["192.0.2.78"], "short.test\n{d}");
    thread::sleep(Duration::from_millis(2200));
    let d = dig(&ns, &["short.test"]);
    assert_eq!(d.data("A"), ["192.0.2.78"], "short.test again\n{d}");
    assert_eq!(
        a_queries("short.test").len(),
        2,
        "short.test (TTL 1) should be asked upstream again after 2 s:\n{}",
        upstream.output()
    );

    // The upstream's NXDOMAIN comes through.
    let d = dig(&ns, &["nosuch.test"]);
    assert_eq!(d.status, "NXDOMAIN", "nosuch.test from the upstream\n{d}");

    // A truncated upstream answer is fetched again over TCP; the client (EDNS 1232) gets it all.
    let d = dig(&ns, &["+bufsize=1232", "big.test"]);
    let protos: Vec<String> = a_queries("big.test")
        .iter()
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_string))
        .collect();
    assert!(
        d.data("A").len() == 60 && protos == ["udp", "tcp"],
        "big.test: want 60 records, asked upstream over UDP then (after TC) TCP; upstream saw \
         {protos:?}\n{d}"
    );

    // glibc through the search list: the misses (example.test.default.svc.cluster.local, ...)
    // are answered at the switch; only example.test itself may go upstream.
    let g = getent(&ns, "hosts", "example.test");
    assert!(
        g.success() && getent_addrs(&g) == set(&["192.0.2.77"]),
        "getent hosts example.test: want 192.0.2.77\n{g}"
    );
    let seen = upstream.output();
    let leaked: Vec<&str> = seen
        .lines()
        .filter(|l| l.contains("cluster.local"))
        .collect();
    assert!(
        leaked.is_empty(),
        "names in the cluster domain must never go upstream; it saw: {leaked:?}"
    );
}

#[test]
fn with_answer_off_the_switch_leaves_cluster_dns_to_a_service() {
    let mut lab = DnsLab::up(0);
    let node = lab.node();
    lab.restart_with_dns("answer", "false");
    let log = log_tail(&node, 30);
    assert!(
        !log.lines()
            .rev()
            .take_while(|l| !l.contains("vswitchd 0.") && !l.contains("shutting down"))
            .any(|l| l.contains("DNS: answering")),
        "with dns.answer = false vswitchd still says it answers DNS:\n{log}"
    );
    let client = lab.add_pod("c1");
    let server = lab.add_pod("dns1");
    lab.append_services(
        "[[services]]\nnamespace = \"default\"\nname = \"web\"\ncluster_ips = [\"10.96.0.100\"]\n\
         ports = [{ port = 80 }]\n",
    );
    // Give the reload time to apply, so a miss below is not just a slow reload.
    let applied = wait_until(APPLY_TIMEOUT, || {
        fs::read_to_string(&node.log)
            .unwrap_or_default()
            .contains("services now default/web")
    });
    assert!(
        applied,
        "the Service was not applied:\n{}",
        log_tail(&node, 20)
    );

    // Nobody answers 10.96.0.10 now: the switch stays out of it.
    let d = dig(&client.netns, &["web.default.svc.cluster.local"]);
    assert!(
        !d.answered(),
        "with dns.answer = false a query to {CLUSTER_DNS} must not be answered by the switch\n{d}"
    );

    // A cluster DNS of its own (CoreDNS's stand-in) behind the kube-dns Service answers instead.
    let mut coredns = Bg::spawn(
        &server.netns,
        &[
            python(),
            "-c",
            FAKE_DNS,
            "0.0.0.0",
            "53",
            "catch-all",
            "192.0.2.53",
        ],
        Duration::from_secs(300),
    );
    coredns.wait_for_line("listening");
    lab.append_services(&format!(
        "[[services]]\nnamespace = \"kube-system\"\nname = \"kube-dns\"\n\
         cluster_ips = [\"{CLUSTER_DNS}\"]\n\
         ports = [{{ name = \"dns\", protocol = \"UDP\", port = 53 }}, \
                  {{ name = \"dns-tcp\", protocol = \"TCP\", port = 53 }}]\n\
         endpoints = [{{ ip = \"{}\" }}]\n",
        server.ip
    ));
    let mut last = None;
    let ok = wait_until(APPLY_TIMEOUT, || {
        let d = dig(&client.netns, &["+time=1", "web.default.svc.cluster.local"]);
        let ok = d.data("A") == ["192.0.2.53"];
        last = Some(d);
        ok
    });
    assert!(
        ok,
        "with the kube-dns Service on {CLUSTER_DNS}, its endpoint must answer (192.0.2.53), \
         not the switch; last dig:\n{}\nthe server saw:\n{}",
        last.map(|d| d.to_string()).unwrap_or_default(),
        coredns.output()
    );
    assert!(
        !coredns
            .queries_for("web.default.svc.cluster.local")
            .is_empty(),
        "the stand-in CoreDNS did not see the query:\n{}",
        coredns.output()
    );
    let d = dig(&client.netns, &["+tcp", "web.default.svc.cluster.local"]);
    assert!(
        d.transport == "TCP" && d.data("A") == ["192.0.2.53"],
        "over TCP too, the Service's endpoint answers\n{d}"
    );
}

// ---------------------------------------------------------------------------------------------
// Product bugs found by these tests: ignored until fixed, each with its reason.

#[test]
#[ignore = "limitation: a node knows only its own pods (Pods are not watched), so another node's pod PTR is forwarded upstream (no longer a false NXDOMAIN)"]
fn a_pods_ptr_is_the_same_from_every_node() {
    require_tools();
    let name = unique("d");
    let lab = LabGuard::up(LabSpec::new(&name, 2, 1))
        .unwrap_or_else(|e| panic!("lab {name} did not come up: {e}"));
    let guard = DnsLab {
        lab: Some(lab),
        name,
    };
    let remote = guard.pod("n2-p1");
    let want = format!("{}.default.pod.cluster.local.", dashed(remote.ip));
    let here = dig(&remote.netns, &["-x", &remote.ip.to_string()]);
    assert_eq!(
        here.data("PTR"),
        std::slice::from_ref(&want),
        "PTR of n2-p1 asked on its own node\n{here}"
    );
    let there = dig(&guard.pod("n1-p1").netns, &["-x", &remote.ip.to_string()]);
    assert!(
        there.status == "NOERROR" && there.data("PTR") == std::slice::from_ref(&want),
        "PTR {} (pod n2-p1) asked from a pod on node 1: want {want} as node 2 answers, got {}\n{there}",
        remote.ip,
        there.status
    );
}

#[test]
fn a_cached_answer_too_large_for_udp_is_not_fetched_again() {
    let mut lab = DnsLab::up(0);
    let node = lab.node();
    let (host, port) = UPSTREAM.split_once(':').expect("ip:port");
    let mut upstream = Bg::spawn(
        &node.netns,
        &[python(), "-c", FAKE_DNS, host, port, "zone"],
        Duration::from_secs(300),
    );
    upstream.wait_for_line("listening");
    lab.restart_with_dns("upstreams", &format!("[\"{UPSTREAM}\"]"));
    let ns = lab.add_pod("c1").netns;
    for i in 0..3 {
        let d = dig(&ns, &["+noedns", "big.test"]);
        assert_eq!(d.data("A").len(), 60, "dig +noedns big.test, run {i}\n{d}");
    }
    let seen = upstream.queries_for("big.test");
    assert_eq!(
        seen.len(),
        2,
        "three plain-UDP lookups of a cached 1 KB answer (TTL 300): the upstream should be asked \
         once (UDP, then TCP after TC), then the cache should answer (TC over UDP, the answer \
         over TCP); it saw:\n{}",
        seen.join("\n")
    );
}
