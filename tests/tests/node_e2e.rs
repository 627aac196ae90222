//! One node, end to end: pods on a node reach each other and the gateway and move TCP data
//! intact; the product creates no kernel bridge, vxlan or firewall rule; the daemon's config
//! errors name the field and its admin socket is private; IPAM never hands out a leased address,
//! also after vswitchd was killed and restarted; workers pinned with `datapath.cpus` run on
//! their CPU.
//!
//! Cross-node traffic is not tested here (the overlay is another issue).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use vswitch_tests::*;

/// Deterministic bytes that no compression or stuck-at fault would reproduce by accident.
fn payload(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Waits until something listens on TCP `port` in `netns`.
fn wait_listening(netns: &str, port: u16) {
    let filter = format!("sport = :{port}");
    let ok = wait_until(Duration::from_secs(10), || {
        let out = run(&mut in_netns(netns, &["ss", "-Hltn", &filter]), SHORT);
        out.success() && !out.stdout.trim().is_empty()
    });
    assert!(ok, "nothing listens on port {port} in {netns} after 10 s");
}

#[test]
fn pods_on_one_node_reach_each_other_and_the_gateway_and_move_tcp_data_intact() {
    let lab = lab(1, 2);
    let node = lab.node("n1");
    let (a, b) = (lab.pod("n1-p1"), lab.pod("n1-p2"));
    assert_ne!(a.ip, b.ip, "two pods got the same address");
    for p in [a, b] {
        assert!(
            node.pod_cidr
                .contains(&p.ip.to_string().parse::<Ipv4Addr>().unwrap()),
            "{} is outside {}",
            p.ip,
            node.pod_cidr
        );
    }
    let gateway: IpAddr = node
        .daemon_status(Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("vswitchd status: {e}"))
        .gateway;
    assert_eq!(gateway.to_string(), "10.244.1.1");

    assert_ping(&a.netns, b.ip);
    assert_ping(&b.netns, a.ip);
    assert_ping(&a.netns, gateway);
    assert_ping(&b.netns, gateway);

    // 8 MiB over one TCP connection (TSO super-frames through the switch), byte for byte.
    let data = payload(8 << 20);
    let server = Background::spawn_piped(&mut in_netns(&b.netns, &["nc", "-l", "5001"]));
    wait_listening(&b.netns, 5001);
    run_input(
        &mut in_netns(
            &a.netns,
            &["nc", "-N", "-w", "10", &b.ip.to_string(), "5001"],
        ),
        &data,
        Duration::from_secs(30),
    )
    .ok();
    let (status, got, err) = server.finish(Duration::from_secs(30));
    assert!(status.success(), "nc -l exited with {status}: {err}");
    assert_eq!(got.len(), data.len(), "bytes received over TCP");
    if let Some(i) = got.iter().zip(&data).position(|(x, y)| x != y) {
        panic!("the TCP stream was corrupted: first differing byte at offset {i}");
    }

    // iperf3 for two seconds: a sustained stream, and the switch's counters account for it.
    let _server = Background::spawn(&mut in_netns(
        &b.netns,
        &["iperf3", "-s", "-1", "-p", "5201"],
    ));
    wait_listening(&b.netns, 5201);
    let out = run(
        &mut in_netns(
            &a.netns,
            &[
                "iperf3",
                "-c",
                &b.ip.to_string(),
                "-p",
                "5201",
                "-t",
                "2",
                "-J",
            ],
        ),
        Duration::from_secs(30),
    );
    let report: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("iperf3 -J printed no JSON ({e}): {out}"));
    assert!(out.success(), "iperf3 failed: {out}");
    let received = report["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    assert!(
        received >= 10 << 20,
        "iperf3 moved only {received} bytes in 2 s: {}",
        report["end"]
    );
    let ports = ports(&node.admin_socket);
    let port_a = ports
        .ports
        .iter()
        .find(|p| p.ip == a.ip)
        .unwrap_or_else(|| panic!("no port for {} in {ports:?}", a.ip));
    assert!(
        port_a.counters.rx_bytes >= received + data.len() as u64,
        "port of {} counted {} bytes received, the pods sent at least {}",
        a.ip,
        port_a.counters.rx_bytes,
        received + data.len() as u64
    );
}

/// Kinds of link that would mean the product fell back on kernel switching or tunnelling.
const KERNEL_DATAPATH_KINDS: &[&str] = &["bridge", "vxlan", "openvswitch", "geneve", "macvlan"];

#[test]
fn no_kernel_bridge_vxlan_or_firewall_rule_is_created() {
    let lab = lab(2, 2);
    // Traffic first, so anything created lazily exists by the time we look.
    for n in ["n1", "n2"] {
        let (a, b) = (lab.pod(&format!("{n}-p1")), lab.pod(&format!("{n}-p2")));
        assert_ping(&a.netns, b.ip);
    }
    // Every node and pod namespace, but not `NAME-fab`: that is the lab's stand-in for the
    // physical LAN between machines (a kernel bridge the lab itself makes), not the product's.
    let mut namespaces: Vec<&str> = lab.nodes.iter().map(|n| n.netns.as_str()).collect();
    namespaces.extend(lab.pods.iter().map(|p| p.netns.as_str()));
    assert_eq!(namespaces.len(), 6);
    for ns in &namespaces {
        for link in links(ns) {
            let kind = link["linkinfo"]["info_kind"].as_str().unwrap_or("");
            assert!(
                !KERNEL_DATAPATH_KINDS.contains(&kind),
                "namespace {ns} has a {kind} link: {link}"
            );
        }
        if have("nft") {
            let out = run(&mut in_netns(ns, &["nft", "list", "ruleset"]), SHORT).ok();
            assert!(out.trim().is_empty(), "nftables ruleset in {ns}:\n{out}");
        }
        for save in ["iptables-save", "ip6tables-save"] {
            if have(save) {
                let out = run(&mut in_netns(ns, &[save]), SHORT).ok();
                let tables: Vec<&str> = out
                    .lines()
                    .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
                    .collect();
                assert!(tables.is_empty(), "{save} in {ns} shows:\n{out}");
            }
        }
    }
    // What the pods do have: eth0 is a TAP device, the switch's port.
    for p in &lab.pods {
        let eth0 = links(&p.netns)
            .into_iter()
            .find(|l| l["ifname"] == "eth0")
            .unwrap_or_else(|| panic!("pod {} has no eth0", p.name));
        assert_eq!(eth0["linkinfo"]["info_kind"], "tun", "{eth0}");
        assert_eq!(eth0["linkinfo"]["info_data"]["type"], "tap", "{eth0}");
    }
}

#[test]
fn config_errors_name_the_field_and_the_admin_socket_is_private() {
    require_root();
    let dir = TempDir::new(&unique("cfg"));
    let tail = format!(
        "state_dir = {:?}\n\n[admin]\nsocket = {:?}\n",
        dir.join("state").display().to_string(),
        dir.join("vswitchd.sock").display().to_string()
    );
    // (config, what stderr must name). Every case has a valid state_dir and socket in `dir`,
    // so a config wrongly accepted starts a daemon there, which the timeout below catches.
    let cases = [
        (
            format!("[node]\nname = \"n\"\npod_cidr = \"10.244.1.1/24\"\n{tail}"),
            vec!["node.pod_cidr", "10.244.1.0/24"],
        ),
        (
            format!("[node]\nname = \"n\"\npod_cidr = \"10.244.1.0/30\"\n{tail}"),
            vec!["node.pod_cidr", "/29"],
        ),
        (
            format!("[node]\nname = \"n\"\npod_cidr = \"10.244.1.0/24\"\ngateway = \"10.9.9.9\"\n{tail}"),
            vec!["node.gateway"],
        ),
        (
            format!("[node]\nname = \"n\"\npod_cidr = \"10.244.1.0/24\"\nmtu = 100\n{tail}"),
            vec!["node.mtu"],
        ),
        (
            format!("[node]\nname = \"\"\npod_cidr = \"10.244.1.0/24\"\n{tail}"),
            vec!["node.name"],
        ),
        (
            format!(
                "[node]\nname = \"n\"\npod_cidr = \"10.244.1.0/24\"\n{tail}\n[datapath]\nworkers = 0\n"
            ),
            vec!["datapath.workers"],
        ),
        (
            format!(
                "[node]\nname = \"n\"\npod_cidr = \"10.244.1.0/24\"\n{tail}\n[datapath]\ncpus = [4096]\n"
            ),
            vec!["datapath.cpus", "4096"],
        ),
        // A CPU number the config takes but this machine does not have.
        (
            format!(
                "[node]\nname = \"n\"\npod_cidr = \"10.244.1.0/24\"\n{tail}\n[datapath]\ncpus = [1023]\n"
            ),
            vec!["datapath.cpus", "CPU 1023"],
        ),
        (
            format!(
                "[node]\nname = \"n\"\npod_cidr = \"10.244.1.0/24\"\nstate_dir = {:?}\n\n[admin]\nsocket = \"rel.sock\"\n",
                dir.join("state").display().to_string()
            ),
            vec!["admin.socket"],
        ),
        // Syntax and type errors point at the key in the file.
        (
            format!("[node]\nname = \"n\"\npod_cidr = \"ten-dot-something\"\n{tail}"),
            vec!["pod_cidr", "line 3"],
        ),
        (
            format!("[node]\nname = \"n\"\npodcidr = \"10.244.1.0/24\"\n{tail}"),
            vec!["podcidr"],
        ),
        (
            format!("[node]\nname = \"n\"\n{tail}"),
            vec!["pod_cidr"],
        ),
    ];
    let config = dir.join("bad.toml");
    for (text, want) in &cases {
        std::fs::write(&config, text).unwrap();
        let out = run(
            Command::new(bin("vswitchd"))
                .arg("--config")
                .arg(&config)
                .current_dir(dir.path()),
            Duration::from_secs(10),
        );
        assert!(!out.success(), "vswitchd accepted:\n{text}\n{out}");
        for w in want {
            assert!(
                out.stderr.contains(w),
                "the error for\n{text}\ndoes not name {w:?}:\n{}",
                out.stderr
            );
        }
        assert!(
            !dir.join("vswitchd.sock").exists(),
            "vswitchd made its socket despite the bad config:\n{text}"
        );
        assert!(
            !dir.join("state").exists(),
            "vswitchd made its state directory despite the bad config:\n{text}"
        );
    }
    let out = run(
        Command::new(bin("vswitchd"))
            .arg("--config")
            .arg(dir.join("missing.toml")),
        Duration::from_secs(10),
    );
    assert!(
        !out.success() && out.stderr.contains("missing.toml"),
        "{out}"
    );

    let daemon = Daemon::start("10.250.6.0/24");
    assert_eq!(
        daemon.socket_mode(),
        0o600,
        "the admin socket {} must be mode 0600",
        daemon.socket.display()
    );
}

#[test]
fn ipam_never_hands_out_a_leased_address_across_a_daemon_restart() {
    // A /29 holds five pod addresses (.2-.6; .1 is the gateway), so the restarted daemon has
    // to wrap around and skip the leases it finds on disk instead of just counting upwards.
    let mut daemon = Daemon::start("10.250.5.0/29");
    let cni = daemon.cni("1.0.0");
    let pods: Vec<Netns> = (0..7)
        .map(|i| Netns::new(&format!("vst-{}-p{i}", daemon.name)))
        .collect();
    let add = |i: usize| cni.add(&format!("c{i}"), &pods[i].path(), "eth0");

    let r0 = add(0).ok();
    let r1 = add(1).ok();
    let r2 = add(2).ok();
    let before: Vec<Ipv4Addr> = [&r0, &r1, &r2].into_iter().map(result_ip).collect();
    assert_eq!(
        before.iter().collect::<BTreeSet<_>>().len(),
        3,
        "{before:?}"
    );
    // c1 leaves; c0 and c2 keep their leases through the crash.
    cni.del("c1", Some(&pods[1].path()), "eth0", Some(&r1)).ok();
    let held: BTreeSet<Ipv4Addr> = [before[0], before[2]].into();

    // Killed, as a crash or the OOM killer ends it. Meanwhile the runtime is told the
    // network is not ready (STATUS, code 50) and to retry an ADD later (code 11).
    daemon.kill();
    let status = Cni::new(&daemon.name, &daemon.socket, "1.1.0").call(&CniCall {
        command: "STATUS",
        container_id: "",
        netns: None,
        ifname: "",
        prev: None,
    });
    status.expect_error(50);
    add(3).expect_error(11);
    daemon.launch();

    let mut after = Vec::new();
    for i in 3..6 {
        let ip = result_ip(&add(i).ok());
        assert!(
            !held.contains(&ip),
            "after the restart c{i} got {ip}, still leased to a pod from before it (leases {held:?})"
        );
        assert!(
            !after.contains(&ip),
            "{ip} handed out twice after the restart"
        );
        after.push(ip);
    }
    // Five addresses: two held from before, three handed out since. The pool is full.
    let full = add(6);
    full.expect_error(101);
    assert_eq!(leases(&daemon.state_dir).len(), 5);

    // The new pods work: c3 reaches c4 and the gateway.
    assert_ping(pods[3].name(), IpAddr::V4(after[1]));
    assert_ping(pods[4].name(), "10.250.5.1".parse().unwrap());

    // The pods from before the restart are still known: their DEL releases their addresses.
    cni.del("c0", Some(&pods[0].path()), "eth0", Some(&r0)).ok();
    cni.del("c2", Some(&pods[2].path()), "eth0", Some(&r2)).ok();
    let ip6 = result_ip(&add(6).ok());
    assert!(
        held.contains(&ip6),
        "c6 got {ip6}; only the addresses released by DEL ({held:?}) were free"
    );
    for (i, pod) in pods.iter().enumerate().skip(3) {
        cni.del(&format!("c{i}"), Some(&pod.path()), "eth0", None)
            .ok();
    }
    assert!(ports(&daemon.socket).ports.is_empty());
    assert!(leases(&daemon.state_dir).is_empty());
    assert_daemon_holds_no_pod(daemon.pid(), daemon.netns.name());
}

/// `datapath.cpus`: the worker threads run on the CPU they were given (two workers, one CPU
/// listed: both on it), and the pods still reach each other through them.
#[test]
fn pinned_workers_run_on_their_cpu() {
    require_root();
    let name = unique("t");
    // The CPUs this test may run on (`0-1`, `2,5-7`, ...), and the last of them: on a machine
    // with more than one, a worker that was not pinned would show them all.
    let allowed_list = |status: &str| -> String {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no Cpus_allowed_list in {status}"))
    };
    let list = allowed_list(&std::fs::read_to_string("/proc/self/status").unwrap());
    let last = list.rsplit([',', '-']).next().unwrap();
    let cpu: u32 = last.parse().unwrap();
    let spec = vswitch_lab::LabSpec {
        cpus: vec![cpu],
        ..vswitch_lab::LabSpec::new(&name, 1, 2).with_workers(2)
    };
    let lab = vswitch_lab::LabGuard::up(spec).unwrap_or_else(|e| panic!("lab {name}: {e}"));
    let pid = lab.node("n1").pid.expect("vswitchd pid");
    let mut workers = Vec::new();
    let mut others = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let allowed = allowed_list(&std::fs::read_to_string(dir.join("status")).unwrap());
        if comm.trim().starts_with("vswitch-dp") {
            workers.push((comm.trim().to_string(), allowed));
        } else {
            others.push(allowed);
        }
    }
    workers.sort();
    assert_eq!(
        workers,
        [
            ("vswitch-dp0".to_string(), cpu.to_string()),
            ("vswitch-dp1".to_string(), cpu.to_string())
        ]
    );
    // Only the workers are pinned: the control plane runs wherever the daemon may.
    assert!(others.iter().all(|a| *a == list), "{others:?} vs {list}");
    let (a, b) = (lab.pod("n1-p1"), lab.pod("n1-p2"));
    assert_ping(&a.netns, b.ip);
    assert_ping(&b.netns, a.ip);
    // `vswitch-lab exec` runs a pod's programs off the datapath's CPU, as kubelet's reserved
    // CPUs would; a node's run anywhere.
    let in_pod = lab.exec("n1-p1", &["grep", "Cpus_allowed_list", "/proc/self/status"]);
    match in_pod {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let pod_list = text.split(':').nth(1).unwrap_or_default().trim();
            assert!(!pod_list.is_empty(), "{text}");
            assert!(
                pod_list.split(',').all(|c| c != cpu.to_string()),
                "a pod program may run on the datapath's CPU {cpu}: {pod_list}"
            );
        }
        // A machine with one CPU has none left for the pods.
        Err(e) => assert!(
            list == cpu.to_string() && e.to_string().contains("no CPU is left"),
            "{e}"
        ),
    }
    let on_node = lab
        .exec("n1", &["grep", "Cpus_allowed_list", "/proc/self/status"])
        .unwrap();
    assert!(String::from_utf8_lossy(&on_node.stdout).contains(&list));
}

/// Whether `pid` is still a running process (gone or a zombie is not).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X')
    })
}

#[test]
fn down_stops_what_still_runs_in_the_labs_namespaces() {
    let lab = lab(1, 1);
    let (pod, node) = (lab.pod("n1-p1").clone(), lab.node("n1").clone());
    // Detached from this test (setsid -f: the program is not our child), as a server started
    // with `vswitch-lab exec ... -D` is; one ignores SIGTERM, so only SIGKILL stops it.
    for (ns, argv) in [
        (&pod.netns, vec!["setsid", "-f", "sleep", "600"]),
        (
            &node.netns,
            vec!["setsid", "-f", "sh", "-c", "trap '' TERM; sleep 600"],
        ),
    ] {
        let mut all = vec!["ip", "netns", "exec", ns.as_str()];
        all.extend(argv);
        let out = run(Command::new(all[0]).args(&all[1..]), Duration::from_secs(5));
        assert!(out.success(), "{out:?}");
    }
    let netns_pids = |ns: &str| -> Vec<u32> {
        let out = run(
            Command::new("ip").args(["netns", "pids", ns]),
            Duration::from_secs(5),
        );
        out.stdout
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    let mut left = Vec::new();
    assert!(wait_until(Duration::from_secs(5), || {
        left = netns_pids(&pod.netns);
        left.extend(netns_pids(&node.netns));
        // The pod's sleep, and the node's shell and its sleep, besides vswitchd.
        left.len() >= 4
    }));
    let report = lab.into_inner().down().expect("down");
    let mut stopped: Vec<&str> = report.stopped.iter().map(|(c, _)| c.as_str()).collect();
    stopped.sort_unstable();
    assert_eq!(stopped, ["sh", "sleep", "sleep"], "{report:?}");
    for pid in left {
        assert!(!running(pid), "pid {pid} still runs after down");
    }
    let names = run(
        Command::new("ip").args(["netns", "list"]),
        Duration::from_secs(5),
    )
    .stdout;
    assert!(
        !names.contains(&pod.netns) && !names.contains(&node.netns),
        "{names}"
    );
}

/// Kubernetes mode with the API server out of reach: vswitchd runs (the datapath is up), but
/// says it is not ready, on the admin API and /readyz, so the DaemonSet's conflist step does not
/// write the conflist and no pod starts against a switch that knows no peer and no Service.
#[test]
fn kubernetes_mode_is_not_ready_before_the_first_sync() {
    require_root();
    let ns = Netns::new(&unique("k8"));
    let dir = TempDir::new(&unique("k8"));
    // An API server address in the test's own namespace, where nothing listens.
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: \
         http://127.0.0.1:6443\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\n\
         current-context: c\nusers:\n- name: u\n  user:\n    token: t\n",
    )
    .expect("kubeconfig");
    let socket = dir.join("vswitchd.sock");
    let config = dir.join("vswitchd.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nname = \"k8\"\npod_cidr = \"10.244.1.0/24\"\nstate_dir = {:?}\n\n\
             [admin]\nsocket = {:?}\nmetrics_address = \"127.0.0.1:9109\"\n\n\
             [kubernetes]\nenabled = true\nkubeconfig = {:?}\n",
            dir.join("state").display().to_string(),
            socket.display().to_string(),
            kubeconfig.display().to_string()
        ),
    )
    .expect("config");
    let vswitchd = bin("vswitchd");
    let daemon = Bg::spawn(
        ns.name(),
        &[
            &vswitchd.to_string_lossy(),
            "--config",
            &config.to_string_lossy(),
        ],
        Duration::from_secs(60),
    );
    let client = conf::client::Client::new(&socket).with_timeout(Duration::from_secs(2));
    let answered = wait_until(Duration::from_secs(10), || {
        client
            .get::<conf::api::Status>(conf::api::PATH_STATUS)
            .is_ok()
    });
    assert!(answered, "vswitchd never answered on {}", socket.display());
    // It keeps trying the API; a few seconds later it is still not ready.
    std::thread::sleep(Duration::from_secs(2));
    let status = client
        .get::<conf::api::Status>(conf::api::PATH_STATUS)
        .expect("status");
    assert!(
        !status.ready,
        "ready without any list from the API: {status:?}"
    );
    let readyz = run(
        &mut in_netns(
            ns.name(),
            &[
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "3",
                "http://127.0.0.1:9109/readyz",
            ],
        ),
        SHORT,
    );
    assert_eq!(readyz.stdout.trim(), "503", "{readyz}");
    let out = daemon.stop();
    assert!(
        out.stderr
            .contains("kubernetes: API server http://127.0.0.1:6443"),
        "{out}"
    );
}
