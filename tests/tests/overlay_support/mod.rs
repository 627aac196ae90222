//! Helpers shared by the overlay tests (overlay_e2e.rs, flannel_interop.rs).
//!
//! Every test runs as root in namespaces it creates, in parallel with the other tests of its
//! binary and with other test binaries, so everything here is built to be unique, bounded and
//! self-cleaning: names carry the pid and a counter, every command runs under `timeout`, every
//! background process lives in its own process group that is killed when its guard drops, and
//! namespaces the tests make by hand are deleted by a guard too.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::collections::BTreeMap;
use std::fmt::Display;
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde_json::Value;
pub use vswitch_lab::process::wait_until;
use vswitch_lab::{Lab, LabGuard, LabSpec, Node};

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn base36(mut n: u64, width: usize) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut s = Vec::new();
    while n > 0 || s.len() < width {
        s.push(DIGITS[(n % 36) as usize]);
        n /= 36;
    }
    s.reverse();
    String::from_utf8(s).unwrap_or_default()
}

/// A lab name no other running test uses: a 2-letter prefix, this process's pid (5 base-36
/// digits fit any pid_max) and a one-digit counter: 8 characters of `[a-z0-9]`.
pub fn unique_name(prefix: &str) -> String {
    assert_eq!(prefix.len(), 2, "prefix {prefix:?} must be 2 characters");
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    assert!(
        n < 36,
        "more than 36 labs in one test binary: widen the counter"
    );
    let name = format!(
        "{prefix}{}{}",
        base36(u64::from(std::process::id()), 5),
        base36(u64::from(n), 1)
    );
    assert!(name.len() <= vswitch_lab::MAX_NAME_LEN, "{name}");
    name
}

/// Builds a lab that is torn down when the guard drops (also when the test fails).
pub fn lab(prefix: &str, nodes: u32, pods_per_node: u32) -> LabGuard {
    let name = unique_name(prefix);
    LabGuard::up(LabSpec::new(&name, nodes, pods_per_node))
        .unwrap_or_else(|e| panic!("lab {name} did not come up: {e}"))
}

/// `timeout -k 2 LIMIT ip netns exec NS ARGV...`: a command in a namespace with a hard deadline.
pub fn cmd_in(ns: &str, argv: &[&str], limit: Duration) -> Command {
    let mut c = Command::new("timeout");
    c.args(["-k", "2", &format!("{:.1}", limit.as_secs_f64())])
        .args(["ip", "netns", "exec", ns])
        .args(argv);
    c
}

/// `timeout -k 2 LIMIT ARGV...` in the test's own namespace (only for commands that name a
/// namespace of ours, like `ip -n NS ...` or `ip link add ... netns NS`).
pub fn cmd_host(argv: &[&str], limit: Duration) -> Command {
    let mut c = Command::new("timeout");
    c.args(["-k", "2", &format!("{:.1}", limit.as_secs_f64())])
        .args(argv);
    c
}

/// What a command printed, both streams, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        status_note(o.status)
    )
}

fn status_note(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(0), _) => String::new(),
        (Some(124), _) => "[timed out]".into(),
        (Some(c), _) => format!("[exit {c}]"),
        (None, Some(sig)) => format!("[signal {sig}]"),
        _ => "[?]".into(),
    }
}

fn output(mut c: Command) -> Output {
    let what = format!("{c:?}");
    c.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"))
}

/// Runs a command in a namespace (bounded by `limit`).
pub fn run_in(ns: &str, argv: &[&str], limit: Duration) -> Output {
    output(cmd_in(ns, argv, limit))
}

/// Runs a command in a namespace and panics with its output unless it succeeds.
pub fn must_in(ns: &str, argv: &[&str]) -> String {
    let o = run_in(ns, argv, Duration::from_secs(10));
    assert!(
        o.status.success(),
        "`{}` in {ns} failed: {}",
        argv.join(" "),
        text(&o)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs a command (bounded) in the test's namespace.
pub fn run_host(argv: &[&str]) -> Output {
    output(cmd_host(argv, Duration::from_secs(10)))
}

/// Like [`run_host`], panicking with the output unless it succeeds.
pub fn must_host(argv: &[&str]) -> String {
    let o = run_host(argv);
    assert!(
        o.status.success(),
        "`{}` failed: {}",
        argv.join(" "),
        text(&o)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A background process in its own process group: the whole group (`timeout` and what it runs)
/// is killed when the guard drops, and `timeout` bounds it even if the test process dies.
pub struct Bg {
    child: Option<Child>,
    pid: libc::pid_t,
    what: String,
    readers: Vec<JoinHandle<Vec<u8>>>,
}

impl Bg {
    /// Starts `argv` in namespace `ns`, for at most `limit`.
    pub fn spawn(ns: &str, argv: &[&str], limit: Duration) -> Bg {
        Bg::start(cmd_in(ns, argv, limit), None)
    }

    /// Like [`Bg::spawn`], writing `stdin` to the process and then closing its input.
    pub fn spawn_with_input(ns: &str, argv: &[&str], limit: Duration, stdin: &[u8]) -> Bg {
        Bg::start(cmd_in(ns, argv, limit), Some(stdin))
    }

    fn start(mut c: Command, stdin: Option<&[u8]>) -> Bg {
        let what = format!("{c:?}");
        c.process_group(0)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let mut readers = Vec::new();
        if let Some(mut out) = child.stdout.take() {
            readers.push(thread::spawn(move || {
                let mut b = Vec::new();
                let _ = out.read_to_end(&mut b);
                b
            }));
        }
        if let Some(mut err) = child.stderr.take() {
            readers.push(thread::spawn(move || {
                let mut b = Vec::new();
                let _ = err.read_to_end(&mut b);
                b
            }));
        }
        if let (Some(data), Some(mut input)) = (stdin, child.stdin.take()) {
            // A short write into a fresh pipe: it fits the pipe buffer, so this cannot block.
            let _ = input.write_all(data);
        }
        Bg {
            pid: libc::pid_t::try_from(child.id()).unwrap_or(0),
            child: Some(child),
            what,
            readers,
        }
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits up to `timeout` for it to end by itself (then kills it) and returns its output.
    pub fn wait(mut self, timeout: Duration) -> Output {
        wait_until(timeout, || !self.running());
        self.finish()
    }

    /// Asks it to stop (SIGTERM to its group), then kills it, and returns its output.
    pub fn stop(mut self) -> Output {
        self.signal(libc::SIGTERM);
        wait_until(Duration::from_secs(3), || !self.running());
        self.finish()
    }

    fn signal(&self, sig: libc::c_int) {
        // Only while the child is unreaped: until then its pid (and group) cannot be reused.
        if self.child.is_some() && self.pid > 0 {
            // SAFETY: kill(2) with a negative pid signals the process group we created for this
            // child (process_group(0) made it the leader); it touches no memory of ours.
            unsafe {
                libc::kill(-self.pid, sig);
            }
        }
    }

    fn finish(&mut self) -> Output {
        let exited = self
            .child
            .as_mut()
            .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))));
        if !exited {
            self.signal(libc::SIGKILL);
        }
        let Some(mut child) = self.child.take() else {
            return Output {
                status: ExitStatus::from_raw(0),
                stdout: Vec::new(),
                stderr: Vec::new(),
            };
        };
        let status = child.wait().unwrap_or(ExitStatus::from_raw(0x7f00));
        let mut bufs: Vec<Vec<u8>> = self
            .readers
            .drain(..)
            .map(|r| r.join().unwrap_or_default())
            .collect();
        let stderr = bufs.pop().unwrap_or_default();
        let stdout = bufs.pop().unwrap_or_default();
        Output {
            status,
            stdout,
            stderr,
        }
    }

    pub fn what(&self) -> &str {
        &self.what
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.signal(libc::SIGTERM);
            thread::sleep(Duration::from_millis(50));
            self.finish();
        }
    }
}

/// A network namespace made by a test (not by the lab), deleted when the guard drops.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn add(name: &str) -> Netns {
        must_host(&["ip", "netns", "add", name]);
        let ns = Netns { name: name.into() };
        must_host(&["ip", "-n", name, "link", "set", "lo", "up"]);
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let o = run_host(&["ip", "netns", "del", &self.name]);
        if !o.status.success() {
            eprintln!("cleanup: ip netns del {}: {}", self.name, text(&o));
        }
    }
}

/// The result of one `ping` run.
#[derive(Debug)]
pub struct Ping {
    pub transmitted: u32,
    pub received: u32,
    pub text: String,
}

impl Ping {
    pub fn parse(o: &Output) -> Ping {
        let text = text(o);
        let mut transmitted = 0;
        let mut received = 0;
        for line in text.lines().filter(|l| l.contains("packets transmitted")) {
            for part in line.split(',') {
                let mut w = part.split_whitespace();
                let (Some(n), Some(what)) = (w.next(), w.next()) else {
                    continue;
                };
                match what {
                    "packets" => transmitted = n.parse().unwrap_or(0),
                    "received" => received = n.parse().unwrap_or(0),
                    _ => {}
                }
            }
        }
        Ping {
            transmitted,
            received,
            text,
        }
    }

    pub fn all_answered(&self) -> bool {
        self.transmitted > 0 && self.received == self.transmitted
    }
}

/// `ping -c COUNT -i 0.2 -W 1 [extra] DST` in `ns`, in the background.
pub fn ping_bg(ns: &str, dst: impl Display, count: u32, extra: &[&str]) -> Bg {
    let count_s = count.to_string();
    let dst = dst.to_string();
    let mut argv = vec!["ping", "-n", "-c", &count_s, "-i", "0.2", "-W", "1"];
    argv.extend_from_slice(extra);
    argv.push(&dst);
    Bg::spawn(
        ns,
        &argv,
        Duration::from_millis(u64::from(count) * 200 + 3000),
    )
}

/// `ping -c COUNT -i 0.2 -W 1 [extra] DST` in `ns`.
pub fn ping(ns: &str, dst: impl Display, count: u32, extra: &[&str]) -> Ping {
    let p = ping_bg(ns, dst, count, extra);
    let limit = Duration::from_millis(u64::from(count) * 200 + 4000);
    Ping::parse(&p.wait(limit))
}

/// Asserts that every echo of a short ping is answered.
pub fn assert_ping(ns: &str, dst: impl Display + Copy) {
    let p = ping(ns, dst, 3, &[]);
    assert!(p.all_answered(), "ping {dst} from {ns}: {}", p.text);
}

/// Waits until something in `ns` listens on `port` (`proto`: "t" or "u").
pub fn wait_listening(ns: &str, proto: &str, port: u16) {
    let flags = format!("-Hl{proto}n");
    let filter = format!("sport = :{port}");
    let ok = wait_until(Duration::from_secs(5), || {
        let o = run_in(ns, &["ss", &flags, &filter], Duration::from_secs(3));
        o.status.success() && !o.stdout.is_empty()
    });
    assert!(
        ok,
        "nothing listens on {proto} port {port} in {ns} after 5 s"
    );
}

/// An iperf3 server for one test (`--one-off`), killed when dropped.
pub fn iperf_server(ns: &str) -> Bg {
    let s = Bg::spawn(ns, &["iperf3", "-s", "--one-off"], Duration::from_secs(30));
    wait_listening(ns, "t", 5201);
    s
}

/// Runs `iperf3 -c SERVER -t 2 -J [extra]` from `ns` against a fresh server in `server_ns`
/// and returns the client's JSON report.
pub fn iperf(ns: &str, server_ns: &str, server_ip: impl Display, extra: &[&str]) -> Value {
    let server = iperf_server(server_ns);
    let ip = server_ip.to_string();
    let mut argv = vec![
        "iperf3",
        "-c",
        &ip,
        "-t",
        "2",
        "-J",
        "--connect-timeout",
        "3000",
    ];
    argv.extend_from_slice(extra);
    let o = run_in(ns, &argv, Duration::from_secs(20));
    let server_out = server.wait(Duration::from_secs(3));
    let report: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "iperf3 {} from {ns}: no JSON report ({e}): {}\nserver: {}",
            argv.join(" "),
            text(&o),
            text(&server_out)
        )
    });
    if let Some(err) = report.get("error") {
        panic!(
            "iperf3 {} from {ns} to {ip}: {err}\nserver: {}",
            argv.join(" "),
            text(&server_out)
        );
    }
    report
}

/// `end.KEY` of an iperf3 report: (bytes, bits per second).
pub fn iperf_sum(report: &Value, key: &str) -> (u64, f64) {
    let s = &report["end"][key];
    (
        s["bytes"].as_u64().unwrap_or(0),
        s["bits_per_second"].as_f64().unwrap_or(0.0),
    )
}

/// Asserts a TCP iperf3 report (run with --bidir) moved data in both directions, and prints
/// the rates: how fast is the bench's question (`vswitch-lab bench`), not a test's.
pub fn assert_tcp_bidir(report: &Value, what: &str) -> (f64, f64) {
    let (fwd_bytes, fwd_bps) = iperf_sum(report, "sum_received");
    let (rev_bytes, rev_bps) = iperf_sum(report, "sum_received_bidir_reverse");
    let (fwd, rev) = (fwd_bps / 1e6, rev_bps / 1e6);
    eprintln!("{what}: TCP {fwd:.0} Mbit/s forward, {rev:.0} Mbit/s reverse");
    assert!(
        fwd_bytes > 0 && rev_bytes > 0,
        "{what}: TCP received {fwd_bytes} bytes forward, {rev_bytes} reverse"
    );
    (fwd, rev)
}

/// Asserts a UDP iperf3 report (run with --bidir) delivered datagrams each way, and prints the
/// loss (a rate for the bench to measure, not for a test to assert).
pub fn assert_udp_bidir(report: &Value, what: &str) {
    for key in ["sum_received", "sum_received_bidir_reverse"] {
        let s = &report["end"][key];
        let packets = s["packets"].as_u64().unwrap_or(0);
        let lost = s["lost_packets"].as_u64().unwrap_or(0);
        let loss = s["lost_percent"].as_f64().unwrap_or(100.0);
        eprintln!("{what}: UDP {key}: {packets} datagrams, {lost} lost ({loss:.2}%)");
        assert!(
            packets > lost,
            "{what}: UDP {key}: none of {packets} datagrams arrived: {s}"
        );
    }
}

/// The vswitchctl binary next to the lab's vswitchd.
pub fn vswitchctl_path() -> PathBuf {
    let dir = Lab::bin_dir().unwrap_or_else(|e| panic!("{e}"));
    let p = dir.join("vswitchctl");
    assert!(
        p.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

/// Runs `vswitchctl --socket NODE_SOCKET ARGS...`.
pub fn vswitchctl(node: &Node, args: &[&str]) -> Output {
    let ctl = vswitchctl_path();
    let socket = node.admin_socket.to_string_lossy().into_owned();
    let mut argv = vec![ctl.to_str().unwrap_or("vswitchctl"), "--socket", &socket];
    argv.extend_from_slice(args);
    output(cmd_host(&argv, Duration::from_secs(15)))
}

/// Runs vswitchctl and returns its stdout, panicking unless it succeeds.
pub fn ctl_ok(node: &Node, args: &[&str]) -> String {
    let o = vswitchctl(node, args);
    assert!(
        o.status.success(),
        "vswitchctl {} on {}: {}",
        args.join(" "),
        node.name,
        text(&o)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs vswitchctl with `--json` and parses what it prints.
pub fn ctl_json(node: &Node, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = ctl_ok(node, &a);
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("vswitchctl {} printed no JSON ({e}): {out}", a.join(" ")))
}

/// `vswitchctl ports --json` of a node.
pub fn ports(node: &Node) -> Value {
    ctl_json(node, &["ports"])
}

fn counters(v: &Value) -> BTreeMap<String, u64> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

/// The node's underlay drop counters (`underlay.drops` of `vswitchctl ports --json`).
pub fn underlay_drops(node: &Node) -> BTreeMap<String, u64> {
    let p = ports(node);
    assert!(
        p["underlay"].is_object(),
        "{}: `vswitchctl ports --json` has no underlay counters: {p}",
        node.name
    );
    counters(&p["underlay"]["drops"])
}

/// One pod port's counters, found by the pod's address.
pub fn port_counters(node: &Node, pod_ip: impl Display) -> Value {
    let ip = pod_ip.to_string();
    let p = ports(node);
    p["ports"]
        .as_array()
        .and_then(|ports| ports.iter().find(|x| x["ip"] == ip.as_str()))
        .map(|x| x["counters"].clone())
        .unwrap_or_else(|| panic!("{}: no port with ip {ip}: {p}", node.name))
}

/// One pod port's drop counters.
pub fn port_drops(node: &Node, pod_ip: impl Display) -> BTreeMap<String, u64> {
    counters(&port_counters(node, pod_ip)["drops"])
}

/// A counter's value, 0 when absent.
pub fn get(m: &BTreeMap<String, u64>, k: &str) -> u64 {
    m.get(k).copied().unwrap_or(0)
}

/// The node's VTEP MAC, as `vswitchctl peers --json` reports it.
pub fn vtep_mac(node: &Node) -> String {
    let v = ctl_json(node, &["peers"]);
    v["vtep_mac"]
        .as_str()
        .unwrap_or_else(|| panic!("{}: peers --json has no vtep_mac: {v}", node.name))
        .to_string()
}

/// The names of a node's peers, as `vswitchctl peers --json` reports them.
pub fn peer_names(node: &Node) -> Vec<String> {
    let v = ctl_json(node, &["peers"]);
    v["peers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}
