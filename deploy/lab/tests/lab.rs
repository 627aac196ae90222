//! The lab against real namespaces, with stand-ins for the two binaries it runs.
//!
//! vswitchd is still being written, so these tests put a fake `vswitchd` and a fake `vswitch`
//! plugin in a directory of their own and point the lab at it. The fake daemon is this test
//! binary itself (run through a wrapper script with a filter that selects `fake_vswitchd`): it
//! reads the generated config with the `conf` crate and answers GET /v1/status on the admin
//! socket. The fake plugin is a shell script that logs its CNI environment and stdin, creates a
//! veth `eth0` in the pod's namespace and prints a CNI result. Everything else is real: the
//! namespaces, the fabric bridge, the veths, the daemon's process lifecycle, the CLI.
//!
//! Every test uses its own lab name and tears it down on drop, also when it fails.

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vswitch_lab::{Lab, LabError, LabGuard, LabSpec, UpOptions};

/// Entry point of the fake vswitchd; a no-op when run as a test.
#[test]
fn fake_vswitchd() {
    let Ok(config) = std::env::var("FAKE_VSWITCHD_CONFIG") else {
        return;
    };
    let mode = std::env::var("FAKE_VSWITCHD_MODE").unwrap_or_default();
    let cfg = conf::Config::load(Path::new(&config)).expect("the lab wrote a valid config");
    eprintln!("fake vswitchd: node {} mode {mode}", cfg.node.name);
    match mode.as_str() {
        "crash" => {
            eprintln!("fake vswitchd: crashing as asked");
            std::process::exit(3);
        }
        "silent" => loop {
            std::thread::sleep(Duration::from_secs(1));
        },
        "stubborn" => {
            // SAFETY: installs SIG_IGN, no handler code runs.
            unsafe {
                nix::sys::signal::signal(
                    nix::sys::signal::Signal::SIGTERM,
                    nix::sys::signal::SigHandler::SigIgn,
                )
            }
            .expect("ignore SIGTERM");
        }
        _ => {}
    }
    let _ = fs::remove_file(&cfg.admin.socket);
    let listener = UnixListener::bind(&cfg.admin.socket).expect("bind the admin socket");
    let status = conf::api::Status {
        node: cfg.node.name.clone(),
        version: "fake".into(),
        pod_cidr: cfg.pod_net(),
        gateway: cfg.gateway().into(),
        gateway_mac: "02:00:00:00:00:01".into(),
        ports: 0,
        ready: true,
        // As vswitchd says it: `restart` waits for the new process's own answer.
        pid: std::process::id(),
        warnings: Vec::new(),
    };
    let body = serde_json::to_string(&status).unwrap();
    for conn in listener.incoming() {
        let Ok(mut c) = conn else { continue };
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
        let _ = write!(
            c,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{body}",
            body.len()
        );
    }
}

const FAKE_PLUGIN: &str = r#"#!/bin/sh
# A stand-in CNI plugin: logs the call, makes a veth eth0, prints a CNI result.
dir=$(dirname "$0")
input=$(cat)
echo "$CNI_COMMAND|$CNI_CONTAINERID|$CNI_NETNS|$CNI_IFNAME|$CNI_ARGS|$CNI_PATH|$(readlink /proc/self/ns/net)" >> "$dir/cni.log"
printf '%s\n' "$input" | tr -d '\n' >> "$dir/cni.stdin"
echo >> "$dir/cni.stdin"
fail=$(cat "$dir/fail" 2>/dev/null)
if [ -n "$fail" ] && [ "$CNI_COMMAND" = ADD ] && [ "${CNI_CONTAINERID%$fail}" != "$CNI_CONTAINERID" ]; then
  echo "fake plugin: failing as asked" >&2
  printf '{"cniVersion":"1.1.0","code":11,"msg":"fake failure","details":"%s"}\n' "$CNI_CONTAINERID"
  exit 1
fi
ns=$(basename "$CNI_NETNS")
case "$CNI_COMMAND" in
ADD)
  rest=${CNI_CONTAINERID##*-n}; node=${rest%%-*}; pod=${rest#*-p}
  case "$pod" in ''|*[!0-9]*) pod=100;; esac
  ip=10.244.$node.$((pod + 1))
  mac=$(printf '02:00:00:00:%02x:%02x' "$node" "$pod")
  ip -n "$ns" link add "$CNI_IFNAME" address "$mac" type veth peer name peer0 &&
  ip -n "$ns" addr add "$ip/24" dev "$CNI_IFNAME" &&
  ip -n "$ns" link set "$CNI_IFNAME" up || {
    printf '{"cniVersion":"1.1.0","code":5,"msg":"cannot make %s"}\n' "$CNI_IFNAME"; exit 1; }
  printf '{"cniVersion":"1.1.0","interfaces":[{"name":"%s","mac":"%s","sandbox":"%s"}],"ips":[{"address":"%s/24","gateway":"10.244.%s.1","interface":0}]}\n' \
    "$CNI_IFNAME" "$mac" "$CNI_NETNS" "$ip" "$node"
  ;;
DEL)
  [ -n "$ns" ] && ip -n "$ns" link del "$CNI_IFNAME" 2>/dev/null
  exit 0
  ;;
CHECK)
  ip -n "$ns" link show "$CNI_IFNAME" >/dev/null 2>&1 || {
    printf '{"cniVersion":"1.1.0","code":102,"msg":"%s is gone"}\n' "$CNI_IFNAME"; exit 1; }
  ;;
esac
"#;

/// A directory holding the fake binaries, and the lab name; tears both down on drop.
struct Fixture {
    name: String,
    bins: PathBuf,
}

impl Fixture {
    /// `None` when not root (the lab needs root): the test then passes vacuously.
    fn new(tag: char, daemon_mode: &str) -> Option<Fixture> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root for network namespaces");
            return None;
        }
        let name = format!("lt{}{tag}", std::process::id() % 10000);
        let _ = Lab::teardown(&name);
        let bins = std::env::temp_dir().join(format!("vswitch-lab-test-{name}"));
        let _ = fs::remove_dir_all(&bins);
        fs::create_dir_all(&bins).unwrap();
        let exe = std::env::current_exe().unwrap();
        let daemon = format!(
            "#!/bin/sh\n# fake vswitchd: $1 is --config, $2 the file\n\
             FAKE_VSWITCHD_CONFIG=\"$2\" FAKE_VSWITCHD_MODE={daemon_mode} \
             exec '{}' --exact fake_vswitchd --nocapture --test-threads 1 \"$2\"\n",
            exe.display()
        );
        for (file, text) in [("vswitchd", daemon.as_str()), ("vswitch", FAKE_PLUGIN)] {
            let p = bins.join(file);
            fs::write(&p, text).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        }
        // The real install step: it sets the fake nodes' kernel settings as for real ones.
        std::os::unix::fs::symlink(
            env!("CARGO_BIN_EXE_vswitch-install"),
            bins.join("vswitch-install"),
        )
        .unwrap();
        Some(Fixture { name, bins })
    }

    fn opts(&self) -> UpOptions {
        UpOptions {
            bin_dir: Some(self.bins.clone()),
            ready_timeout: Duration::from_secs(10),
            ..UpOptions::default()
        }
    }

    fn spec(&self, nodes: u32, pods_per_node: u32) -> LabSpec {
        LabSpec::new(&self.name, nodes, pods_per_node)
    }

    fn cni_log(&self) -> Vec<Vec<String>> {
        fs::read_to_string(self.bins.join("cni.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| l.split('|').map(str::to_string).collect())
            .collect()
    }

    /// The lab's namespaces that exist.
    fn netns(&self) -> BTreeSet<String> {
        netns_with_prefix(&format!("{}-", self.name))
    }

    /// Asserts that nothing of the lab is left: namespaces, files, processes.
    fn assert_gone(&self) {
        assert_eq!(self.netns(), BTreeSet::new(), "namespaces left behind");
        let dir = Lab::dir_of(&self.name);
        assert!(!dir.exists(), "{} left behind", dir.display());
        let marker = format!("{}/", dir.display());
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let procs = processes_mentioning(&marker);
            if procs.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "processes left behind: {procs:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Err(e) = Lab::teardown(&self.name) {
            eprintln!("cleanup of {}: {e}", self.name);
        }
        let _ = fs::remove_dir_all(&self.bins);
        let _ = fs::remove_dir_all(Lab::failed_logs_dir(&self.name));
    }
}

fn netns_with_prefix(prefix: &str) -> BTreeSet<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// Live (non-zombie) processes with an argument containing `s`.
fn processes_mentioning(s: &str) -> Vec<u32> {
    let mut v = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmd).contains(s) {
            v.push(pid);
        }
    }
    v
}

fn netns_inode_of_pid(pid: u32) -> u64 {
    let link = fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    inode_of_ns_link(&link.to_string_lossy())
}

fn inode_of_ns_link(link: &str) -> u64 {
    // "net:[4026532283]"
    link.trim_start_matches("net:[")
        .trim_end_matches(']')
        .parse()
        .unwrap()
}

fn netns_inode(name: &str) -> u64 {
    fs::metadata(Path::new("/var/run/netns").join(name))
        .unwrap()
        .ino()
}

fn stdout(o: &std::process::Output) -> String {
    assert!(
        o.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn up_builds_everything_and_down_removes_it() {
    let Some(fx) = Fixture::new('a', "ready") else {
        return;
    };
    let n = fx.name.clone();
    let lab = LabGuard::new(Lab::up_with(fx.spec(2, 2), &fx.opts()).unwrap());

    // Namespaces: the fabric, the host outside the cluster, the nodes and the pods.
    let expect: BTreeSet<String> = ["fab", "out", "n1", "n2", "n1-p1", "n1-p2", "n2-p1", "n2-p2"]
        .iter()
        .map(|s| format!("{n}-{s}"))
        .collect();
    assert_eq!(fx.netns(), expect);

    // The underlay: ul0 in each node, the other ends on fab0, nothing in the host namespace.
    let ul = stdout(
        &lab.exec("n2", &["ip", "-o", "addr", "show", "dev", "ul0"])
            .unwrap(),
    );
    assert!(ul.contains("inet 192.168.100.2/24"), "{ul}");
    let link = stdout(
        &lab.exec("n1", &["ip", "-o", "link", "show", "dev", "ul0"])
            .unwrap(),
    );
    assert!(
        link.contains("mtu 1500") && link.contains("state UP"),
        "{link}"
    );
    let ports = stdout(
        &lab.exec("fab", &["ip", "-o", "link", "show", "master", "fab0"])
            .unwrap(),
    );
    assert!(
        ports.contains(&format!("{n}n1@")) && ports.contains(&format!("{n}n2@")),
        "{ports}"
    );
    let host = stdout(&Command::new("ip").args(["-o", "link"]).output().unwrap());
    assert!(
        !host.contains(&format!("{n}n1")),
        "a veth end is in the host namespace"
    );
    let lo = stdout(
        &lab.exec("n1-p2", &["ip", "-o", "link", "show", "dev", "lo"])
            .unwrap(),
    );
    assert!(lo.contains("UP"), "{lo}");
    if Command::new("ping").arg("-V").output().is_ok() {
        let o = lab
            .exec("n1", &["ping", "-c1", "-W2", "192.168.100.2"])
            .unwrap();
        assert!(o.status.success(), "the fabric does not connect the nodes");
    }

    // Files and daemons.
    for node in &lab.nodes {
        let cfg = conf::Config::load(&node.config).unwrap();
        assert_eq!(cfg.node.name, node.name);
        assert_eq!(cfg.node.pod_cidr, node.pod_cidr);
        assert_eq!(cfg.admin.socket, node.admin_socket);
        assert_eq!(cfg.node.state_dir, node.dir.join("state"));
        let nc: conf::netconf::NetConf =
            serde_json::from_str(&fs::read_to_string(&node.cni_netconf).unwrap()).unwrap();
        nc.validate().unwrap();
        assert_eq!(nc.name, n);
        assert_eq!(nc.socket_path(), node.admin_socket);

        let pid = node.pid.unwrap();
        let pid_file = fs::read_to_string(node.dir.join("vswitchd.pid")).unwrap();
        assert_eq!(pid_file.trim(), pid.to_string());
        assert_eq!(
            netns_inode_of_pid(pid),
            netns_inode(&node.netns),
            "daemon not in its node"
        );
        let sid = nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid as i32))).unwrap();
        assert_eq!(
            sid.as_raw(),
            pid as i32,
            "daemon is not in a session of its own"
        );
        let log = fs::read_to_string(&node.log).unwrap();
        assert!(
            log.contains(&format!("fake vswitchd: node {}", node.name)),
            "{log}"
        );
    }

    // Status.
    let st = lab.status();
    assert_eq!(st.name, n);
    assert!(st.nodes.iter().all(|n| n.alive && n.ready), "{st:?}");
    assert_eq!(st.nodes[1].underlay_ip.to_string(), "192.168.100.2");
    let pods: Vec<(String, String, String)> = st
        .pods
        .iter()
        .map(|p| (p.name.clone(), p.ip.to_string(), p.mac.clone()))
        .collect();
    assert_eq!(
        pods,
        [
            ("n1-p1", "10.244.1.2", "02:00:00:00:01:01"),
            ("n1-p2", "10.244.1.3", "02:00:00:00:01:02"),
            ("n2-p1", "10.244.2.2", "02:00:00:00:02:01"),
            ("n2-p2", "10.244.2.3", "02:00:00:00:02:02"),
        ]
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    );
    assert_eq!(lab.pod("n2-p1").node, format!("{n}-n2"));
    let eth0 = stdout(
        &lab.exec("n2-p2", &["ip", "-o", "addr", "show", "dev", "eth0"])
            .unwrap(),
    );
    assert!(eth0.contains("10.244.2.3/24"), "{eth0}");

    // The plugin was run as a runtime runs it, on the pod's node.
    let log = fx.cni_log();
    assert_eq!(log.len(), 4, "{log:?}");
    let add = &log[2];
    assert_eq!(add[0], "ADD");
    assert_eq!(add[1], format!("{n}-n2-p1"));
    assert_eq!(add[2], format!("/var/run/netns/{n}-n2-p1"));
    assert_eq!(add[3], "eth0");
    assert_eq!(
        add[4],
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=p1"
    );
    assert_eq!(Path::new(&add[5]), fx.bins);
    assert_eq!(inode_of_ns_link(&add[6]), netns_inode(&format!("{n}-n2")));

    // The state file describes the same lab; a second `up` is refused and changes nothing.
    assert_eq!(&Lab::load(&n).unwrap(), &*lab);
    let e = Lab::up_with(fx.spec(1, 0), &fx.opts()).unwrap_err();
    assert!(matches!(e, LabError::Exists { .. }), "{e}");
    assert!(
        e.to_string()
            .contains(&format!("vswitch-lab down --name {n}")),
        "{e}"
    );
    assert_eq!(fx.netns(), expect);
    assert!(lab.status().nodes.iter().all(|n| n.ready));

    // Pods come and go.
    let mut lab = lab;
    let p = lab.add_pod(1, "p9").unwrap().clone();
    assert_eq!(
        (p.name.as_str(), p.ip.to_string()),
        ("n1-p9", "10.244.1.10".into())
    );
    lab.check_pod("n1-p9").unwrap();
    assert!(matches!(
        lab.add_pod(1, "p9"),
        Err(LabError::PodExists { .. })
    ));
    assert!(matches!(
        lab.add_pod(7, "p1"),
        Err(LabError::NoSuchTarget { .. })
    ));
    lab.del_pod("n1-p9").unwrap();
    assert!(lab.find_pod("n1-p9").is_none());
    assert!(!fx.netns().contains(&format!("{n}-n1-p9")));
    assert!(Lab::load(&n).unwrap().find_pod("n1-p9").is_none());

    // Down: DEL for each pod with the ADD result as prevResult, then nothing left.
    let pids: Vec<u32> = lab.nodes.iter().filter_map(|n| n.pid).collect();
    let report = lab.down().unwrap();
    assert_eq!(report.warnings, Vec::<String>::new());
    assert!(report.found);
    fx.assert_gone();
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "vswitchd {pid} still there"
        );
    }
    let log = fx.cni_log();
    let dels: Vec<&str> = log
        .iter()
        .filter(|l| l[0] == "DEL")
        .map(|l| l[1].as_str())
        .collect();
    assert_eq!(dels.len(), 5, "{log:?}"); // n1-p9 and the four pods
    let stdin = fs::read_to_string(fx.bins.join("cni.stdin")).unwrap();
    let last: serde_json::Value = serde_json::from_str(stdin.lines().last().unwrap()).unwrap();
    assert_eq!(last["prevResult"]["ips"][0]["address"], "10.244.2.3/24");
    assert_eq!(last["type"], "vswitch");

    // Down again: nothing to do, still fine.
    let again = Lab::teardown(&n).unwrap();
    assert!(!again.found);
}

#[test]
fn a_failed_pod_add_rolls_everything_back() {
    let Some(fx) = Fixture::new('b', "ready") else {
        return;
    };
    fs::write(fx.bins.join("fail"), "-n2-p1").unwrap();
    let e = Lab::up_with(fx.spec(2, 2), &fx.opts()).unwrap_err();
    match &e {
        LabError::Cni {
            command,
            pod,
            message,
        } => {
            assert_eq!((*command, pod.as_str()), ("ADD", "n2-p1"));
            assert!(message.contains("code 11: fake failure"), "{message}");
            assert!(message.contains("failing as asked"), "{message}");
        }
        other => panic!("expected a CNI error, got {other}"),
    }
    fx.assert_gone();
    let log = fx.cni_log();
    let calls: Vec<String> = log.iter().map(|l| format!("{} {}", l[0], l[1])).collect();
    let failed = format!("{}-n2-p1", fx.name);
    // As a runtime does: DEL right after the failed ADD; then teardown DELs the two attached pods.
    let pos_add = calls
        .iter()
        .position(|c| *c == format!("ADD {failed}"))
        .unwrap();
    assert_eq!(calls[pos_add + 1], format!("DEL {failed}"), "{calls:?}");
    assert_eq!(
        calls.iter().filter(|c| c.starts_with("DEL")).count(),
        3,
        "{calls:?}"
    );
}

#[test]
fn a_daemon_that_never_gets_ready_is_reported_with_its_log() {
    let Some(fx) = Fixture::new('c', "silent") else {
        return;
    };
    let opts = UpOptions {
        ready_timeout: Duration::from_millis(1500),
        ..fx.opts()
    };
    let e = Lab::up_with(fx.spec(1, 1), &opts).unwrap_err();
    assert!(matches!(e, LabError::DaemonNotReady { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("not ready after"), "{msg}");
    assert!(msg.contains("cannot reach vswitchd"), "{msg}");
    assert!(msg.contains("fake vswitchd: node"), "{msg}");
    fx.assert_gone();
    // The log the message names outlives the rollback.
    let LabError::DaemonNotReady { log, .. } = &e else {
        unreachable!()
    };
    assert!(
        log.starts_with(Lab::failed_logs_dir(&fx.name)),
        "{}",
        log.display()
    );
    assert!(msg.contains(&log.display().to_string()), "{msg}");
    let kept = fs::read_to_string(log).unwrap();
    assert!(kept.contains("fake vswitchd: node"), "{kept}");
}

#[test]
fn a_daemon_that_exits_is_reported_with_its_log() {
    let Some(fx) = Fixture::new('d', "crash") else {
        return;
    };
    let e = Lab::up_with(fx.spec(2, 1), &fx.opts()).unwrap_err();
    assert!(matches!(e, LabError::DaemonExited { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("exit status: 3"), "{msg}");
    assert!(msg.contains("crashing as asked"), "{msg}");
    fx.assert_gone();
    let LabError::DaemonExited { log, .. } = &e else {
        unreachable!()
    };
    assert!(fs::read_to_string(log)
        .unwrap()
        .contains("crashing as asked"));
    assert!(fx.cni_log().is_empty(), "no pod should be attempted");
}

#[test]
fn down_kills_a_daemon_that_ignores_sigterm() {
    let Some(fx) = Fixture::new('e', "stubborn") else {
        return;
    };
    let lab = Lab::up_with(fx.spec(1, 0), &fx.opts()).unwrap();
    let pid = lab.nodes[0].pid.unwrap();
    assert!(lab.status().nodes[0].ready);
    let t = Instant::now();
    lab.down().unwrap();
    assert!(
        t.elapsed() >= Duration::from_secs(4),
        "SIGKILL came before the grace period"
    );
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    fx.assert_gone();
}

#[test]
fn down_cleans_up_a_partial_lab_and_only_that_lab() {
    let Some(fx) = Fixture::new('f', "ready") else {
        return;
    };
    let n = &fx.name;
    // What an interrupted `up` might leave: namespaces and a directory without lab.json.
    for ns in ["fab", "n1", "n1-p1", "n3-web"] {
        let o = Command::new("ip")
            .args(["netns", "add", &format!("{n}-{ns}")])
            .output()
            .unwrap();
        assert!(o.status.success());
    }
    let dir = Lab::dir_of(n);
    fs::create_dir_all(dir.join("n1/state")).unwrap();
    fs::write(dir.join("n1/vswitchd.pid"), "999999999\n").unwrap();
    // Another lab's namespace, and one that only looks similar: both must survive.
    let other = format!("{n}9-n1");
    let similar = format!("{n}-n1-p1-x");
    for ns in [&other, &similar] {
        assert!(Command::new("ip")
            .args(["netns", "add", ns])
            .status()
            .unwrap()
            .success());
    }

    assert!(matches!(
        Lab::up_with(fx.spec(1, 0), &fx.opts()),
        Err(LabError::Exists { .. })
    ));
    let report = Lab::teardown(n).unwrap();
    assert!(report.found);
    let left = netns_with_prefix(n);
    for ns in [&other, &similar] {
        let _ = Command::new("ip").args(["netns", "del", ns]).status();
    }
    assert_eq!(left, BTreeSet::from([other.clone(), similar.clone()]));
    fx.assert_gone();
    assert!(!Lab::teardown(n).unwrap().found);
}

#[test]
fn load_of_a_missing_lab_says_how_to_start_one() {
    let e = Lab::load("nosuch0").unwrap_err();
    assert!(
        e.to_string().contains("vswitch-lab up --name nosuch0"),
        "{e}"
    );
    let e = Lab::load("Bad-Name").unwrap_err();
    assert!(matches!(e, LabError::InvalidName { .. }), "{e}");
}

#[test]
fn the_cli_drives_a_lab_that_outlives_each_command() {
    let Some(fx) = Fixture::new('g', "ready") else {
        return;
    };
    let n = fx.name.as_str();
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_vswitch-lab"))
            .args(args)
            .env("VSWITCH_BIN_DIR", &fx.bins)
            .output()
            .unwrap()
    };
    let up = cli(&["up", "--name", n, "--nodes", "2", "--pods-per-node", "1"]);
    let text = stdout(&up);
    assert!(
        text.contains("10.244.2.2") && text.contains("ready"),
        "{text}"
    );

    // The daemons outlived `up`.
    let st = cli(&["status", "--name", n, "--json"]);
    let st: serde_json::Value = serde_json::from_str(&stdout(&st)).unwrap();
    assert_eq!(st["name"], n);
    assert_eq!(st["nodes"][0]["ready"], true);
    assert_eq!(st["nodes"][1]["ready"], true);
    assert_eq!(st["nodes"][1]["netns"], format!("{n}-n2"));
    assert_eq!(st["pods"][1]["name"], "n2-p1");
    assert_eq!(st["pods"][1]["ip"], "10.244.2.2");
    let table = stdout(&cli(&["--name", n, "status"]));
    assert!(
        table.contains("NODE") && table.contains(&format!("{n}-n1-p1")),
        "{table}"
    );

    let eth0 = stdout(&cli(&[
        "exec", "--name", n, "n1-p1", "--", "ip", "-o", "addr", "show", "eth0",
    ]));
    assert!(eth0.contains("10.244.1.2/24"), "{eth0}");
    let full = cli(&[
        "exec",
        "--name",
        n,
        &format!("{n}-n2-p1"),
        "--",
        "sh",
        "-c",
        "exit 7",
    ]);
    assert_eq!(full.status.code(), Some(7));
    let bad = cli(&["exec", "--name", n, "n9-p9", "--", "true"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("n1-p1"));

    let add = stdout(&cli(&[
        "add-pod", "--name", n, "--node", "2", "--pod", "web",
    ]));
    assert!(
        add.starts_with("n2-web ") && add.contains("10.244.2.101/24"),
        "{add}"
    );
    stdout(&cli(&["check-pod", "--name", n, "n2-web"]));
    stdout(&cli(&["del-pod", "--name", n, "n2-web"]));

    // `restart` replaces a node's daemon; status follows the new one.
    let old_pid = st["nodes"][0]["pid"].as_u64().expect("pid");
    let restarted = stdout(&cli(&["restart", "--name", n, "n1"]));
    assert!(
        restarted.contains(&format!("{n}-n1: vswitchd restarted (pid ")),
        "{restarted}"
    );
    let st: serde_json::Value =
        serde_json::from_str(&stdout(&cli(&["status", "--name", n, "--json"]))).unwrap();
    assert_eq!(st["nodes"][0]["ready"], true);
    let new_pid = st["nodes"][0]["pid"].as_u64().expect("pid");
    assert_ne!(new_pid, old_pid, "the old daemon is gone");
    assert!(
        restarted.contains(&format!("(pid {new_pid})")),
        "{restarted}"
    );
    let nine = cli(&["restart", "--name", n, "n9"]);
    assert!(!nine.status.success());
    assert!(
        String::from_utf8_lossy(&nine.stderr).contains("it has: n1, n2"),
        "{}",
        String::from_utf8_lossy(&nine.stderr)
    );

    let again = cli(&["up", "--name", n]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("run `vswitch-lab down"));

    let down = stdout(&cli(&["down", "--name", n]));
    assert!(down.contains("is down"), "{down}");
    fx.assert_gone();
    let down = stdout(&cli(&["down", "--name", n]));
    assert!(down.contains("nothing to do"), "{down}");
    let st = cli(&["status", "--name", n]);
    assert!(!st.status.success());
    assert!(String::from_utf8_lossy(&st.stderr).contains("vswitch-lab up --name"));
    let bad = cli(&["up", "--name", "Bad_Name"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid lab name"));
}
