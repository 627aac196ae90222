//! Helpers shared by the end-to-end tests.
//!
//! The tests drive the real binaries (`vswitchd`, the `vswitch` CNI plugin, `vswitchctl`) and
//! real clients (ping, nc, iperf3, podman) in network namespaces they create. Three rules hold
//! for everything here:
//! - Names are unique per process and call ([`unique`]), because tests run in parallel threads
//!   and in parallel with other test binaries.
//! - Everything a test makes is owned by a guard whose `Drop` removes it, so a failed assertion
//!   (a panic) still cleans up. `Drop` never panics.
//! - Every child process is waited for with a deadline and killed when it overruns ([`run`]).
//!
//! The helpers panic with a message naming the command and its output when something the test
//! did not mean to test goes wrong: in a test that is the failure report.

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use conf::api::{PortsResponse, Status, PATH_STATUS};
use conf::client::Client;
use serde_json::{json, Value};

use vswitch_lab::process::{self, RunError};
pub use vswitch_lab::{Lab, LabGuard, LabSpec, Node, Pod};

/// How long a short command (`ip`, `ping -c 3`, one plugin call) may take before it is killed.
pub const SHORT: Duration = Duration::from_secs(30);

/// Panics unless the tests run as root, which namespaces and TAP devices need.
pub fn require_root() {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the end-to-end tests need root (network namespaces, TAP devices); run tests/run.sh as root"
    );
}

/// A name unique to this process and call: `prefix` + pid + counter, both in base 36, so it is
/// at most 8 characters of `[a-z0-9]` (a valid lab name) for a one-character prefix.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}{}", base36(std::process::id()), base36(n))
}

fn base36(mut n: u32) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// Where vswitchd, vswitch and vswitchctl are (`target/debug` next to the test binary).
pub fn bin(name: &str) -> PathBuf {
    let dir = Lab::bin_dir().unwrap_or_else(|e| panic!("cannot find the binaries: {e}"));
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` before the tests",
        path.display()
    );
    path
}

/// A lab that is torn down when the returned guard drops.
pub fn lab(nodes: u32, pods_per_node: u32) -> LabGuard {
    lab_with_workers(nodes, pods_per_node, 1)
}

/// A lab whose daemons run `workers` datapath workers each.
pub fn lab_with_workers(nodes: u32, pods_per_node: u32, workers: u32) -> LabGuard {
    require_root();
    let name = unique("t");
    assert!(
        name.len() <= vswitch_lab::MAX_NAME_LEN,
        "lab name {name} is too long"
    );
    LabGuard::up(LabSpec::new(&name, nodes, pods_per_node).with_workers(workers))
        .unwrap_or_else(|e| panic!("lab {name} did not come up: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Bounded processes in namespaces, in the foreground and in the background

/// The system Python: a version manager's shim costs a shell script per start.
pub fn python() -> &'static str {
    if Path::new("/usr/bin/python3").is_file() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// Runs `argv` in `ns`, killed after `limit`.
pub fn exec_in(ns: &str, argv: &[&str], limit: Duration) -> Out {
    run(
        &mut bounded_in(ns, argv, limit),
        limit + Duration::from_secs(3),
    )
}

/// Seconds since the Unix epoch, for comparing with timestamps that clients print.
pub fn wall() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A background process (with `timeout` around it) in a process group of its own: the whole
/// group is killed when the guard drops.
pub struct Bg {
    child: Option<Child>,
    desc: String,
    readers: Vec<std::thread::JoinHandle<Vec<u8>>>,
}

impl Bg {
    pub fn spawn(ns: &str, argv: &[&str], limit: Duration) -> Bg {
        let mut cmd = bounded_in(ns, argv, limit);
        let desc = format!("{} (in {ns})", argv.join(" "));
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
        fn reader(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut p) = pipe {
                    let _ = p.read_to_end(&mut buf);
                }
                buf
            })
        }
        let readers = vec![reader(child.stdout.take()), reader(child.stderr.take())];
        Bg {
            child: Some(child),
            desc,
            readers,
        }
    }

    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn signal(&self, sig: libc::c_int) {
        if let Some(c) = &self.child {
            if let Ok(pid) = libc::pid_t::try_from(c.id()) {
                // SAFETY: kill(2) on the process group our unreaped child leads (it was made
                // the leader by process_group(0)); the id cannot have been reused while the
                // child is unreaped. It touches no memory.
                unsafe { libc::kill(-pid, sig) };
            }
        }
    }

    /// Waits up to `timeout` for it to end by itself (then kills it); what it printed.
    pub fn wait(mut self, timeout: Duration) -> Out {
        wait_until(timeout, || !self.running());
        self.finish()
    }

    /// SIGTERM to the group, then SIGKILL; what it printed.
    pub fn stop(mut self) -> Out {
        self.signal(libc::SIGTERM);
        wait_until(Duration::from_secs(2), || !self.running());
        self.finish()
    }

    fn finish(&mut self) -> Out {
        if self.running() {
            self.signal(libc::SIGKILL);
        }
        let status = match self.child.take() {
            Some(mut c) => c.wait().unwrap_or_else(|e| panic!("{}: {e}", self.desc)),
            None => <ExitStatus as std::os::unix::process::ExitStatusExt>::from_raw(0),
        };
        let mut bufs: Vec<String> = self
            .readers
            .drain(..)
            .map(|r| String::from_utf8_lossy(&r.join().unwrap_or_default()).into_owned())
            .collect();
        let stderr = bufs.pop().unwrap_or_default();
        let stdout = bufs.pop().unwrap_or_default();
        Out {
            cmd: self.desc.clone(),
            status,
            stdout,
            stderr,
        }
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.signal(libc::SIGKILL);
            self.finish();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

/// What a finished command printed.
#[derive(Debug)]
pub struct Out {
    pub cmd: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Panics with the whole story unless the command succeeded; returns stdout.
    pub fn ok(self) -> String {
        assert!(self.success(), "{self}");
        self.stdout
    }
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmd,
            self.status,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

pub use vswitch_lab::process::{bounded_in, describe, wait_until};

/// Runs `cmd` to completion, killing it after `timeout` (then the test fails).
pub fn run(cmd: &mut Command, timeout: Duration) -> Out {
    run_input(cmd, &[], timeout)
}

/// Like [`run`], with `input` on stdin.
pub fn run_input(cmd: &mut Command, input: &[u8], timeout: Duration) -> Out {
    match try_run(cmd, input, timeout) {
        Ok(out) => out,
        Err(e) => panic!("{e}"),
    }
}

/// [`run_input`] that reports instead of panicking (for `Drop`).
pub fn try_run(cmd: &mut Command, input: &[u8], timeout: Duration) -> Result<Out, String> {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    match process::run_bounded(cmd, Some(input), timeout, None) {
        Ok(out) => Ok(Out {
            cmd: describe(cmd),
            status: out.status,
            stdout: text(&out.stdout),
            stderr: text(&out.stderr),
        }),
        Err(RunError::TimedOut {
            cmd,
            timeout,
            stdout,
            stderr,
        }) => Err(format!(
            "`{cmd}` did not finish within {timeout:?} and was killed\n--- stdout ---\n{}\n--- stderr ---\n{}",
            text(&stdout),
            text(&stderr)
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// `ip ARGS...`, which must succeed; returns stdout.
pub fn ip(args: &[&str]) -> String {
    run(Command::new("ip").args(args), SHORT).ok()
}

/// A command that runs `argv` in network namespace `netns`.
pub fn in_netns(netns: &str, argv: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns]).args(argv);
    cmd
}

/// Whether a program is installed (for optional checks like `nft`).
pub fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(program).is_file())
}

/// A process running in the background, killed (SIGKILL) and reaped when dropped.
pub struct Background {
    child: Child,
    desc: String,
    /// Readers of stdout and stderr, started with the process so it never blocks on a full
    /// pipe (for [`Background::spawn_piped`]).
    readers: Option<[thread::JoinHandle<Vec<u8>>; 2]>,
}

impl Background {
    /// Starts `cmd` with stdin closed and stdout/stderr discarded.
    pub fn spawn(cmd: &mut Command) -> Background {
        let desc = describe(cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{desc}`: {e}"));
        Background {
            child,
            desc,
            readers: None,
        }
    }

    /// Starts `cmd` with stdout and stderr collected, for [`Background::finish`].
    pub fn spawn_piped(cmd: &mut Command) -> Background {
        let desc = describe(cmd);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{desc}`: {e}"));
        fn reader(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<Vec<u8>> {
            thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut p) = pipe {
                    let _ = p.read_to_end(&mut buf);
                }
                buf
            })
        }
        let readers = Some([reader(child.stdout.take()), reader(child.stderr.take())]);
        Background {
            child,
            desc,
            readers,
        }
    }

    /// Waits at most `timeout` for the exit; returns the exit status, stdout and stderr.
    pub fn finish(mut self, timeout: Duration) -> (ExitStatus, Vec<u8>, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
                Ok(None) => panic!("`{}` did not finish within {timeout:?}", self.desc),
                Err(e) => panic!("waiting for `{}`: {e}", self.desc),
            }
        };
        match self.readers.take() {
            Some([out, err]) => (
                status,
                out.join().unwrap_or_default(),
                String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned(),
            ),
            None => (status, Vec::new(), String::new()),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Files and namespaces

/// A directory removed (with everything in it) when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("vswitch-tests-{name}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A network namespace made with `ip netns add`, deleted when dropped.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(name: &str) -> Netns {
        ip(&["netns", "add", name]);
        let ns = Netns { name: name.into() };
        ip(&["-n", name, "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// CNI_NETNS of this namespace.
    pub fn path(&self) -> PathBuf {
        netns_path(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if netns_path(&self.name).exists() {
            let _ = try_run(
                Command::new("ip").args(["netns", "del", &self.name]),
                &[],
                SHORT,
            );
        }
    }
}

/// Where `ip netns` keeps a namespace.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/var/run/netns").join(name)
}

/// The namespaces `ip netns list` shows.
pub fn netns_list() -> BTreeSet<String> {
    ip(&["netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The links of a namespace as `ip -d -j link show` reports them.
pub fn links(netns: &str) -> Vec<Value> {
    let out = ip(&["-n", netns, "-d", "-j", "link", "show"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("ip -j link in {netns}: {e}: {out}"))
}

/// The link names of a namespace.
pub fn link_names(netns: &str) -> Vec<String> {
    links(netns)
        .iter()
        .filter_map(|l| l["ifname"].as_str().map(str::to_string))
        .collect()
}

/// The IPv4 addresses (with prefix) on `dev` in `netns`.
pub fn addresses(netns: &str, dev: &str) -> Vec<String> {
    let out = ip(&["-n", netns, "-j", "-4", "addr", "show", "dev", dev]);
    let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
    v.as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| {
            Some(format!(
                "{}/{}",
                a["local"].as_str()?,
                a["prefixlen"].as_u64()?
            ))
        })
        .collect()
}

/// `ping -c COUNT -W 2 -i 0.2 DST` from `netns`.
pub fn ping(netns: &str, dst: IpAddr, count: u32) -> Out {
    run(
        &mut in_netns(
            netns,
            &[
                "ping",
                "-n",
                "-c",
                &count.to_string(),
                "-W",
                "2",
                "-i",
                "0.2",
                &dst.to_string(),
            ],
        ),
        SHORT,
    )
}

/// Asserts that every ping from `netns` to `dst` is answered.
pub fn assert_ping(netns: &str, dst: IpAddr) {
    let out = ping(netns, dst, 3);
    assert!(
        out.success() && out.stdout.contains(" 0% packet loss"),
        "ping {dst} from {netns} lost packets:\n{out}"
    );
}

// ---------------------------------------------------------------------------------------------
// The CNI plugin, called as a runtime calls it

/// How a runtime calls the plugin for one network: the binary, the netconf, and the namespace
/// the plugin runs in (the node's, as on a real node).
#[derive(Clone)]
pub struct Cni {
    pub plugin: PathBuf,
    pub netconf: Value,
    pub node_netns: Option<String>,
    /// More `KEY=VALUE` pairs for CNI_ARGS (`IP=...;MAC=...`), after the Kubernetes ones.
    pub extra_args: String,
}

/// One plugin call's outcome.
#[derive(Debug)]
pub struct CniOut {
    pub out: Out,
    /// stdout as JSON (Null when empty, as DEL and CHECK answer).
    pub json: Value,
}

impl CniOut {
    pub fn success(&self) -> bool {
        self.out.success()
    }

    /// Panics unless the call succeeded; returns the JSON it printed.
    pub fn ok(self) -> Value {
        assert!(self.success(), "CNI call failed: {}", self.out);
        self.json
    }

    /// Asserts a failure reported as a CNI error object with `code`; returns its `msg`.
    pub fn expect_error(&self, code: u64) -> String {
        assert!(
            !self.success(),
            "expected CNI error {code}, the call succeeded: {}",
            self.out
        );
        assert!(
            self.json
                .get("cniVersion")
                .and_then(Value::as_str)
                .is_some()
                && self.json.get("msg").and_then(Value::as_str).is_some(),
            "not a CNI error object on stdout: {}",
            self.out
        );
        assert_eq!(
            self.json.get("code").and_then(Value::as_u64),
            Some(code),
            "wrong CNI error code: {}",
            self.out
        );
        self.json["msg"].as_str().unwrap_or_default().to_string()
    }
}

/// The arguments of one call that vary.
pub struct CniCall<'a> {
    pub command: &'a str,
    pub container_id: &'a str,
    /// CNI_NETNS; `None` sends it empty (DEL of a sandbox that is gone).
    pub netns: Option<&'a Path>,
    pub ifname: &'a str,
    /// The ADD result, as prevResult (DEL, CHECK).
    pub prev: Option<&'a Value>,
}

impl Cni {
    /// The plugin with a netconf for a daemon listening on `socket`.
    pub fn new(name: &str, socket: &Path, cni_version: &str) -> Cni {
        Cni {
            plugin: bin("vswitch"),
            netconf: json!({
                "cniVersion": cni_version,
                "name": name,
                "type": "vswitch",
                "socket": socket,
            }),
            node_netns: None,
            extra_args: String::new(),
        }
    }

    /// The plugin as the lab calls it for pods on `node`: its netconf, run in its namespace.
    pub fn for_node(node: &Node) -> Cni {
        let text = fs::read(&node.cni_netconf)
            .unwrap_or_else(|e| panic!("{}: {e}", node.cni_netconf.display()));
        Cni {
            plugin: bin("vswitch"),
            netconf: serde_json::from_slice(&text)
                .unwrap_or_else(|e| panic!("{}: {e}", node.cni_netconf.display())),
            node_netns: Some(node.netns.clone()),
            extra_args: String::new(),
        }
    }

    /// The same plugin with `args` added to CNI_ARGS.
    pub fn with_args(&self, args: &str) -> Cni {
        Cni {
            plugin: self.plugin.clone(),
            netconf: self.netconf.clone(),
            node_netns: self.node_netns.clone(),
            extra_args: args.to_string(),
        }
    }

    pub fn call(&self, c: &CniCall<'_>) -> CniOut {
        let mut cmd = match &self.node_netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(&self.plugin);
                cmd
            }
            None => Command::new(&self.plugin),
        };
        let netns = c.netns.map(|p| p.to_string_lossy().into_owned());
        cmd.env("CNI_COMMAND", c.command)
            .env("CNI_CONTAINERID", c.container_id)
            .env("CNI_NETNS", netns.unwrap_or_default())
            .env("CNI_IFNAME", c.ifname)
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={};{}",
                    c.container_id, self.extra_args
                ),
            )
            .env("CNI_PATH", self.plugin.parent().unwrap_or(Path::new("/")));
        let mut conf = self.netconf.clone();
        if let (Some(prev), Some(obj)) = (c.prev, conf.as_object_mut()) {
            obj.insert("prevResult".into(), prev.clone());
        }
        let input = serde_json::to_vec(&conf).unwrap_or_default();
        let out = run_input(&mut cmd, &input, Duration::from_secs(60));
        let json = if out.stdout.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&out.stdout)
                .unwrap_or_else(|e| panic!("the plugin's stdout is not JSON ({e}): {out}"))
        };
        CniOut { out, json }
    }

    pub fn add(&self, container_id: &str, netns: &Path, ifname: &str) -> CniOut {
        self.call(&CniCall {
            command: "ADD",
            container_id,
            netns: Some(netns),
            ifname,
            prev: None,
        })
    }

    pub fn del(
        &self,
        container_id: &str,
        netns: Option<&Path>,
        ifname: &str,
        prev: Option<&Value>,
    ) -> CniOut {
        self.call(&CniCall {
            command: "DEL",
            container_id,
            netns,
            ifname,
            prev,
        })
    }

    pub fn check(&self, container_id: &str, netns: &Path, ifname: &str, prev: &Value) -> CniOut {
        self.call(&CniCall {
            command: "CHECK",
            container_id,
            netns: Some(netns),
            ifname,
            prev: Some(prev),
        })
    }
}

/// `ips[0].address` of an ADD result, without the prefix.
pub fn result_ip(result: &Value) -> Ipv4Addr {
    let addr = result["ips"][0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("the ADD result has no ips[0].address: {result}"));
    addr.split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("ips[0].address {addr:?} is not IPv4/prefix"))
}

// ---------------------------------------------------------------------------------------------
// Inspecting a daemon

/// `vswitchctl --socket SOCKET --json ports`, parsed.
pub fn ports(socket: &Path) -> PortsResponse {
    let out = run(
        Command::new(bin("vswitchctl"))
            .arg("--socket")
            .arg(socket)
            .args(["--json", "ports"]),
        SHORT,
    )
    .ok();
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("vswitchctl ports --json: {e}: {out}"))
}

/// The lease files in a state directory's `ipam/` (every entry but `last_reserved_ip`).
pub fn leases(state_dir: &Path) -> BTreeSet<String> {
    let dir = state_dir.join("ipam");
    fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "last_reserved_ip")
        .collect()
}

/// The attachment records in a state directory's `attachments/`.
pub fn records(state_dir: &Path) -> BTreeSet<String> {
    let dir = state_dir.join("attachments");
    match fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => BTreeSet::new(),
    }
}

/// The state directory of a lab node.
pub fn state_dir(node: &Node) -> PathBuf {
    node.dir.join("state")
}

/// What the open descriptors of process `pid` point at (`/dev/net/tun`, `net:[4026532]`, ...).
pub fn fd_targets(pid: u32) -> Vec<String> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| fs::read_link(e.path()).ok())
                .map(|t| t.to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// How many TAP queues (open /dev/net/tun descriptors) process `pid` holds.
pub fn tun_fds(pid: u32) -> usize {
    fd_targets(pid)
        .iter()
        .filter(|t| *t == "/dev/net/tun")
        .count()
}

/// Asserts that vswitchd (`pid`, running in namespace `home`) holds nothing of any pod: no TAP
/// queue, no descriptor of a namespace, no thread left in another namespace. Anything held
/// would keep a deleted pod namespace alive, unseen by `ip netns list`.
pub fn assert_daemon_holds_no_pod(pid: u32, home: &str) {
    let fds = fd_targets(pid);
    assert!(
        !fds.is_empty(),
        "cannot read /proc/{pid}/fd: is vswitchd running?"
    );
    // One TAP queue stays: the host port (`vsw0`, the node's own interface into the switch).
    let taps = fds.iter().filter(|t| *t == "/dev/net/tun").count();
    let held: Vec<&String> = fds.iter().filter(|t| t.starts_with("net:[")).collect();
    assert!(
        held.is_empty() && taps <= 1,
        "vswitchd (pid {pid}) still holds pod resources: {held:?} and {taps} TAP queue(s) \
         (1 is the host port's)"
    );
    let home = netns_id(home);
    let threads = thread_netns(pid);
    assert!(
        threads.iter().all(|t| *t == home),
        "vswitchd threads are in namespaces {threads:?}, expected only its own {home}"
    );
}

/// The network namespaces (by `net:[inode]`) any thread of process `pid` is in.
pub fn thread_netns(pid: u32) -> BTreeSet<String> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|t| fs::read_link(t.path().join("ns/net")).ok())
                .map(|l| l.to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The `net:[inode]` of a named namespace.
pub fn netns_id(name: &str) -> String {
    let meta = fs::metadata(netns_path(name)).unwrap_or_else(|e| panic!("netns {name}: {e}"));
    use std::os::unix::fs::MetadataExt;
    format!("net:[{}]", meta.ino())
}

// ---------------------------------------------------------------------------------------------
// A vswitchd of our own

/// A vswitchd run directly (not by the lab), with a config of the test's choosing, in a
/// namespace of its own. Stopped, and its namespace and files removed, when dropped.
pub struct Daemon {
    pub name: String,
    pub netns: Netns,
    pub dir: TempDir,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    pub pod_cidr: String,
    child: Option<Child>,
}

impl Daemon {
    /// Starts vswitchd for `pod_cidr` and waits until it answers ready.
    pub fn start(pod_cidr: &str) -> Daemon {
        require_root();
        let name = unique("vd");
        let dir = TempDir::new(&name);
        let netns = Netns::new(&format!("vst-{name}"));
        let mut d = Daemon {
            config: dir.join("vswitchd.toml"),
            socket: dir.join("vswitchd.sock"),
            state_dir: dir.join("state"),
            log: dir.join("vswitchd.log"),
            pod_cidr: pod_cidr.into(),
            name,
            netns,
            dir,
            child: None,
        };
        let config = format!(
            "[node]\nname = {:?}\npod_cidr = {pod_cidr:?}\nstate_dir = {:?}\n\n[admin]\nsocket = {:?}\n",
            d.name,
            d.state_dir.display().to_string(),
            d.socket.display().to_string()
        );
        fs::write(&d.config, config).unwrap_or_else(|e| panic!("{}: {e}", d.config.display()));
        d.launch();
        d
    }

    /// Starts vswitchd (again, after [`Daemon::kill`]) with its config and waits until ready.
    pub fn launch(&mut self) {
        assert!(
            self.child.is_none(),
            "vswitchd {} is already running",
            self.name
        );
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("{}: {e}", self.log.display()));
        let log2 = log.try_clone().unwrap_or_else(|e| panic!("{e}"));
        // `ip netns exec` execs vswitchd without forking: the child's pid is the daemon's.
        let child = Command::new("ip")
            .args(["netns", "exec", self.netns.name()])
            .arg(bin("vswitchd"))
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start vswitchd: {e}"));
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let client = Client::new(&self.socket).with_timeout(Duration::from_secs(1));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "vswitchd exited with {status} before it was ready; its log:\n{}",
                    self.log_text()
                );
            }
            match client.get::<Status>(PATH_STATUS) {
                Ok(s) if s.ready => return,
                _ if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                other => panic!(
                    "vswitchd is not ready after 10 s ({other:?}); its log:\n{}",
                    self.log_text()
                ),
            }
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// SIGKILL, as a crash or an OOM kill would end it, and reap it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The plugin with a netconf for this daemon (runs in the host namespace, as podman runs
    /// plugins; the plugin only talks to the socket).
    pub fn cni(&self, cni_version: &str) -> Cni {
        Cni::new(&self.name, &self.socket, cni_version)
    }

    /// The admin socket's permission bits.
    pub fn socket_mode(&self) -> u32 {
        fs::metadata(&self.socket)
            .unwrap_or_else(|e| panic!("{}: {e}", self.socket.display()))
            .permissions()
            .mode()
            & 0o7777
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM first: vswitchd then shuts its datapath down and removes its socket.
            if let Ok(pid) = i32::try_from(c.id()) {
                // SAFETY: kill(2) on the pid of our own unreaped child, which cannot have been
                // reused while we have not waited for it.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
