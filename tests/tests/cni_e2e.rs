//! The CNI plugin as a runtime drives it, against a lab node's real vswitchd: DEL is
//! idempotent and works without the pod's namespace, CHECK compares against the live
//! interface, an ADD that cannot complete fails with a CNI error and leaves nothing behind,
//! and 50 concurrent ADDs get 50 distinct addresses and leave nothing once deleted.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Barrier;
use std::thread;

use serde_json::Value;
use vswitch_tests::*;

/// The switch's view of a node: ports (by container) and leases.
fn node_state(node: &Node) -> (BTreeSet<(String, String, IpAddr)>, BTreeSet<String>) {
    let ports = ports(&node.admin_socket)
        .ports
        .into_iter()
        .map(|p| (p.container_id, p.ifname, p.ip))
        .collect();
    (ports, leases(&state_dir(node)))
}

fn gateway(node: &Node) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(u32::from(node.pod_cidr.network()) + 1))
}

#[test]
fn del_twice_succeeds_and_releases_the_pod() {
    let lab = lab(1, 2);
    let node = lab.node("n1");
    let cni = Cni::for_node(node);
    let (a, b) = (lab.pod("n1-p1"), lab.pod("n1-p2"));
    assert!(leases(&state_dir(node)).contains(&a.ip.to_string()));

    for round in 1..=2 {
        let out = cni.del(
            &a.container_id,
            Some(&a.netns_path()),
            &a.ifname,
            Some(&a.cni_result),
        );
        assert!(out.success(), "DEL #{round} failed: {}", out.out);
        assert_eq!(out.json, Value::Null, "DEL #{round} printed something");
    }
    assert_eq!(
        link_names(&a.netns),
        ["lo"],
        "DEL left an interface in the pod"
    );
    let (ports, leases) = node_state(node);
    assert!(
        !ports.iter().any(|(c, _, _)| *c == a.container_id),
        "port of the deleted pod is still there: {ports:?}"
    );
    assert!(
        !leases.contains(&a.ip.to_string()),
        "{} is still leased after DEL: {leases:?}",
        a.ip
    );
    // The other pod is untouched.
    assert_ping(&b.netns, gateway(node));
    assert_eq!(ports.len(), 1);
}

/// The node's own TAP queue (`vsw0`), held beside the pods'.
const HOST_PORT: usize = 1;

#[test]
fn del_after_the_pod_netns_is_gone_releases_everything() {
    let lab = lab(1, 2);
    let node = lab.node("n1");
    let pid = node.pid.expect("the lab's vswitchd has a pid");
    let cni = Cni::for_node(node);
    let (a, b) = (lab.pod("n1-p1"), lab.pod("n1-p2"));
    assert_eq!(
        tun_fds(pid),
        2 + HOST_PORT,
        "vswitchd should hold one TAP queue per pod, and the host port's"
    );

    // The runtime tore the sandbox down before DEL (a crash, a kubelet restart). One runtime
    // sends CNI_NETNS empty, another the path that no longer exists; both must work.
    ip(&["netns", "del", &a.netns]);
    ip(&["netns", "del", &b.netns]);
    cni.del(&a.container_id, None, &a.ifname, Some(&a.cni_result))
        .ok();
    cni.del(
        &b.container_id,
        Some(&b.netns_path()),
        &b.ifname,
        Some(&b.cni_result),
    )
    .ok();

    let (ports, leases) = node_state(node);
    assert!(ports.is_empty(), "ports left after DEL: {ports:?}");
    assert!(leases.is_empty(), "leases left after DEL: {leases:?}");
    assert!(records(&state_dir(node)).is_empty());
    // vswitchd let go of the TAPs, and with them the last references to the deleted
    // namespaces, which would otherwise live on unseen.
    assert_daemon_holds_no_pod(pid, &node.netns);

    // Deleting again, now that vswitchd knows nothing of the pod, still succeeds.
    cni.del(&a.container_id, None, &a.ifname, None).ok();
}

/// `vswitchctl ARGS...` against `node`: (success, stdout, stderr).
fn vswitchctl(node: &Node, args: &[&str]) -> (bool, String, String) {
    let o = std::process::Command::new(bin("vswitchctl"))
        .arg("--socket")
        .arg(&node.admin_socket)
        .args(args)
        .output()
        .expect("run vswitchctl");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A runtime that removed a pod while vswitchd was down and never sends DEL (podman 4 does
/// neither DEL again nor GC): after the restart the port is listed as not held, and, its
/// namespace being gone, `vswitchctl release` frees its address; a live port is refused.
#[test]
fn a_port_whose_namespace_vanished_while_the_daemon_was_down_is_released_on_request() {
    let mut lab = lab(1, 2);
    let (a, b) = (lab.pod("n1-p1").clone(), lab.pod("n1-p2").clone());
    let pid = lab.node("n1").pid.expect("pid");
    // The daemon dies; meanwhile the runtime removes the pod (its DEL failed, not retried).
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    ip(&["netns", "del", &a.netns]);
    lab.restart_daemon(0, std::time::Duration::from_secs(10))
        .expect("restart vswitchd");
    let node = lab.node("n1").clone();

    let listed = ports(&node.admin_socket).ports;
    let gone = listed
        .iter()
        .find(|p| p.container_id == a.container_id)
        .expect("the vanished pod's port is still listed");
    assert!(!gone.live, "{gone:?}");
    let live = listed
        .iter()
        .find(|p| p.container_id == b.container_id)
        .expect("the other pod's port");
    assert!(live.live, "{live:?}");
    let (ok, table, _) = vswitchctl(&node, &["ports"]);
    assert!(ok);
    let id = gone.id.to_string();
    assert!(
        table.lines().any(|l| l.trim_start().starts_with(&format!("{id} "))
            && l.contains(&format!("NOT HELD (not taken back after a restart: the runtime's DEL frees it, or, once its namespace is gone, `vswitchctl release {id}`)"))),
        "{table}"
    );

    // A live port is not the operator's to release, nor is a port that does not exist.
    let (ok, _, err) = vswitchctl(&node, &["release", &live.id.to_string()]);
    assert!(
        !ok && err.contains("is live: the runtime's CNI DEL releases it"),
        "{err}"
    );
    let (ok, _, err) = vswitchctl(&node, &["release", "999"]);
    assert!(!ok && err.contains("no pod port 999"), "{err}");

    let (ok, out, err) = vswitchctl(&node, &["release", &id]);
    assert!(ok, "{err}");
    assert_eq!(
        out.trim(),
        format!(
            "released port {id} of {}/{} ({})",
            a.container_id, a.ifname, a.ip
        )
    );
    let (ports_now, leases_now) = node_state(&node);
    assert!(
        !ports_now.iter().any(|(c, _, _)| *c == a.container_id),
        "{ports_now:?}"
    );
    assert!(!leases_now.contains(&a.ip.to_string()), "{leases_now:?}");
    assert!(leases_now.contains(&b.ip.to_string()), "{leases_now:?}");
    // The runtime's DEL, should it come after all, still succeeds.
    let out = Cni::for_node(&node).del(&a.container_id, None, &a.ifname, None);
    assert!(out.success(), "{}", out.out);
    assert_ping(&b.netns, gateway(&node));
}

/// A runtime that asks for an address and a MAC (CNI_ARGS `IP=`, `MAC=`: podman's `--ip` and
/// `--mac-address`, and what its `network reload` sends to keep them) gets them; one that
/// cannot be given fails the ADD with code 104 and leaves nothing behind.
#[test]
fn a_requested_address_and_mac_are_given_or_the_add_fails_cleanly() {
    let lab = lab(1, 1);
    let node = lab.node("n1");
    let other = lab.pod("n1-p1");
    let cni = Cni::for_node(node);
    let (ns, ns2) = (Netns::new(&unique("rq")), Netns::new(&unique("rq")));
    let (cid, cid2) = (unique("rqc"), unique("rqc"));

    let res = cni
        .with_args("IP=10.244.1.50;MAC=02:42:0a:f4:01:32")
        .add(&cid, &ns.path(), "eth0")
        .ok();
    assert_eq!(result_ip(&res), Ipv4Addr::new(10, 244, 1, 50), "{res}");
    assert_eq!(res["interfaces"][0]["mac"], "02:42:0a:f4:01:32", "{res}");
    let link = exec_in(ns.name(), &["ip", "-o", "link", "show", "eth0"], SHORT).ok();
    assert!(link.contains("link/ether 02:42:0a:f4:01:32"), "{link}");
    let addr = exec_in(
        ns.name(),
        &["ip", "-o", "-4", "addr", "show", "eth0"],
        SHORT,
    )
    .ok();
    assert!(addr.contains("10.244.1.50/24"), "{addr}");
    // The switch knows the pod by that MAC and address: it passes anti-spoofing both ways.
    assert_ping(ns.name(), gateway(node));
    assert_ping(&other.netns, IpAddr::V4(Ipv4Addr::new(10, 244, 1, 50)));

    // What cannot be given fails with 104, and nothing stays: no interface, no lease, no port.
    let before = node_state(node);
    for (args, why) in [
        ("IP=10.244.1.50", "leased to"),
        (
            "IP=10.244.9.9",
            "not a host address of this node's pod CIDR",
        ),
        ("IP=10.244.1.1", "gateway"),
        ("MAC=02:42:0a:f4:01:32", "is taken by"),
        ("MAC=0a:58:0a:f4:01:63", "reserved for another address"),
        ("MAC=03:00:00:00:00:01", "not a unicast address"),
    ] {
        let msg = cni
            .with_args(args)
            .add(&cid2, &ns2.path(), "eth0")
            .expect_error(104);
        assert!(msg.contains(why), "{args}: {msg}");
        assert_eq!(link_names(ns2.name()), ["lo"], "{args} left an interface");
        assert_eq!(node_state(node), before, "{args} left state behind");
    }
    // A malformed request is the runtime's error (4), before anything is asked of the switch.
    cni.with_args("IP=fd00::1")
        .add(&cid2, &ns2.path(), "eth0")
        .expect_error(4);

    // Asking for what the pod already has (podman's network reload) works after its DEL.
    cni.del(&cid, Some(&ns.path()), "eth0", Some(&res)).ok();
    assert!(!node_state(node).1.contains("10.244.1.50"));
    let again = cni
        .with_args("IP=10.244.1.50;MAC=02:42:0a:f4:01:32")
        .add(&cid, &ns.path(), "eth0")
        .ok();
    assert_eq!(result_ip(&again), Ipv4Addr::new(10, 244, 1, 50));
    cni.del(&cid, Some(&ns.path()), "eth0", Some(&again)).ok();
    assert_eq!(
        node_state(node).0.len(),
        1,
        "only the lab's own pod is left"
    );
}

#[test]
fn check_passes_on_a_live_pod_and_fails_once_its_interface_is_broken() {
    let lab = lab(1, 3);
    let node = lab.node("n1");
    let cni = Cni::for_node(node);
    let check = |p: &Pod| cni.check(&p.container_id, &p.netns_path(), &p.ifname, &p.cni_result);
    for p in &lab.pods {
        let out = check(p);
        assert!(out.success(), "CHECK of a healthy pod failed: {}", out.out);
        assert_eq!(out.json, Value::Null);
    }
    let (gone, no_addr, no_route) = (lab.pod("n1-p1"), lab.pod("n1-p2"), lab.pod("n1-p3"));

    ip(&["-n", &gone.netns, "link", "del", "eth0"]);
    let msg = check(gone).expect_error(102);
    assert!(msg.contains("eth0"), "{msg}");

    ip(&["-n", &no_addr.netns, "addr", "flush", "dev", "eth0"]);
    let msg = check(no_addr).expect_error(102);
    assert!(msg.contains(&no_addr.ip.to_string()), "{msg}");

    ip(&["-n", &no_route.netns, "route", "del", "default"]);
    let msg = check(no_route).expect_error(102);
    assert!(msg.contains("route"), "{msg}");
}

#[test]
fn add_with_an_existing_interface_name_fails_and_leaves_nothing_behind() {
    let lab = lab(1, 1);
    let node = lab.node("n1");
    let cni = Cni::for_node(node);
    let pod = lab.pod("n1-p1");
    // An interface the pod already has, not made by us: a veth pair inside the pod.
    ip(&[
        "-n", &pod.netns, "link", "add", "eth1", "type", "veth", "peer", "name", "eth1p",
    ]);
    let eth1_before = links(&pod.netns)
        .into_iter()
        .find(|l| l["ifname"] == "eth1")
        .expect("eth1 was just made");
    let links_before = link_names(&pod.netns);
    let state_before = node_state(node);
    let records_before = records(&state_dir(node));

    // 1. Another interface by that name: refused, the existing one untouched.
    let msg = cni
        .add(&pod.container_id, &pod.netns_path(), "eth1")
        .expect_error(100);
    assert!(msg.contains("eth1"), "{msg}");
    let eth1_after = links(&pod.netns)
        .into_iter()
        .find(|l| l["ifname"] == "eth1")
        .expect("the failed ADD removed the pod's own eth1");
    assert_eq!(eth1_after["address"], eth1_before["address"]);
    assert_eq!(eth1_after["linkinfo"]["info_kind"], "veth");
    assert!(
        addresses(&pod.netns, "eth1").is_empty(),
        "the failed ADD configured eth1"
    );

    // 2. A second container whose namespace already has our eth0 (a TAP of the switch).
    let msg = cni
        .add("intruder", &pod.netns_path(), "eth0")
        .expect_error(100);
    assert!(msg.contains("eth0"), "{msg}");

    // 3. The same attachment again, without DEL first.
    cni.add(&pod.container_id, &pod.netns_path(), "eth0")
        .expect_error(100);

    // Nothing leaked: no lease, no port, no record, no interface; the pod still works.
    assert_eq!(node_state(node), state_before);
    assert_eq!(records(&state_dir(node)), records_before);
    assert_eq!(link_names(&pod.netns), links_before);
    assert_eq!(addresses(&pod.netns, "eth0"), [pod.address().to_string()]);
    assert_ping(&pod.netns, gateway(node));
    cni.check(
        &pod.container_id,
        &pod.netns_path(),
        "eth0",
        &pod.cni_result,
    )
    .ok();
}

const CONCURRENT: usize = 50;

#[test]
fn fifty_concurrent_adds_get_distinct_addresses_and_their_dels_leave_nothing() {
    let lab = lab(1, 0);
    let node = lab.node("n1");
    let pid = node.pid.expect("the lab's vswitchd has a pid");
    let cni = Cni::for_node(node);
    // Named like the lab's pods, so the lab's teardown would find them too.
    let pods: Vec<Netns> = (0..CONCURRENT)
        .map(|i| Netns::new(&format!("{}-n1-c{i}", lab.name)))
        .collect();
    let ours: BTreeSet<String> = pods.iter().map(|p| p.name().to_string()).collect();

    // All plugin processes start together, as a runtime starting 50 pods does.
    let barrier = Barrier::new(CONCURRENT);
    let results: Vec<Value> = thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .map(|p| {
                let (cni, barrier) = (&cni, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    cni.add(p.name(), &p.path(), "eth0")
                })
            })
            .collect();
        let outs: Vec<CniOut> = handles
            .into_iter()
            .map(|h| h.join().expect("an ADD thread panicked"))
            .collect();
        let failed: Vec<String> = outs
            .iter()
            .filter(|o| !o.success())
            .map(|o| o.out.to_string())
            .collect();
        assert!(
            failed.is_empty(),
            "{} ADDs failed:\n{}",
            failed.len(),
            failed.join("\n")
        );
        outs.into_iter().map(|o| o.json).collect()
    });

    let ips: Vec<Ipv4Addr> = results.iter().map(result_ip).collect();
    let distinct: BTreeSet<Ipv4Addr> = ips.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        CONCURRENT,
        "addresses handed out twice: {ips:?}"
    );
    let gw = gateway(node);
    for ip in &ips {
        assert!(
            node.pod_cidr.contains(ip),
            "{ip} is outside {}",
            node.pod_cidr
        );
        assert_ne!(IpAddr::V4(*ip), gw, "a pod got the gateway's address");
    }
    // Each pod has the address its result reports, and the switch agrees.
    for (p, ip) in pods.iter().zip(&ips) {
        assert_eq!(
            addresses(p.name(), "eth0"),
            [format!("{ip}/{}", node.pod_cidr.prefix_len())],
            "pod {}",
            p.name()
        );
    }
    let port_ips: BTreeSet<IpAddr> = ports(&node.admin_socket)
        .ports
        .iter()
        .map(|p| p.ip)
        .collect();
    assert_eq!(
        port_ips,
        distinct.iter().map(|ip| IpAddr::V4(*ip)).collect(),
        "vswitchctl ports"
    );
    assert_eq!(tun_fds(pid), CONCURRENT + HOST_PORT);
    assert_ping(pods[0].name(), IpAddr::V4(ips[CONCURRENT - 1]));

    // All DELs at once too.
    let barrier = Barrier::new(CONCURRENT);
    thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .zip(&results)
            .map(|(p, r)| {
                let (cni, barrier) = (&cni, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    cni.del(p.name(), Some(&p.path()), "eth0", Some(r))
                })
            })
            .collect();
        for h in handles {
            let out = h.join().expect("a DEL thread panicked");
            assert!(out.success(), "DEL failed: {}", out.out);
        }
    });

    for p in &pods {
        assert_eq!(
            link_names(p.name()),
            ["lo"],
            "pod {} kept an interface",
            p.name()
        );
    }
    assert!(
        ports(&node.admin_socket).ports.is_empty(),
        "vswitchctl ports is not empty"
    );
    let ipam: BTreeSet<String> = std::fs::read_dir(state_dir(node).join("ipam"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(ipam, BTreeSet::from(["last_reserved_ip".to_string()]));
    assert!(records(&state_dir(node)).is_empty());
    assert_daemon_holds_no_pod(pid, &node.netns);

    drop(pods);
    let left: Vec<String> = netns_list().intersection(&ours).cloned().collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
}
