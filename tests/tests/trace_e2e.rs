//! `vswitchctl trace` against a running lab: pod to pod, pod to Service, and dropped cases.

use std::time::Duration;

use serde_json::Value;
use vswitch_tests::*;

fn trace(socket: &std::path::Path, args: &[&str]) -> Value {
    let mut cmd = std::process::Command::new(bin("vswitchctl"));
    cmd.arg("--socket")
        .arg(socket)
        .arg("--json")
        .arg("trace")
        .args(args);
    let out = run(&mut cmd, Duration::from_secs(10));
    assert!(out.success(), "vswitchctl trace {args:?} failed: {out}");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", out.stdout))
}

fn verdict(v: &Value) -> &str {
    v["verdict"].as_str().unwrap_or_default()
}

fn steps(v: &Value) -> String {
    v["steps"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

#[test]
fn trace_shows_pod_to_pod_pod_to_service_and_drops() {
    require_root();
    let lab = lab(2, 2);
    let n1 = lab.node("n1");
    let n2 = lab.node("n2");
    let (p1, p2, remote) = (lab.pod("n1-p1"), lab.pod("n1-p2"), lab.pod("n2-p1"));
    let svc = format!(
        "\n[[services]]\nnamespace = \"default\"\nname = \"web\"\ncluster_ips = [\"10.96.0.20\"]\n\
         ports = [{{ name = \"http\", protocol = \"TCP\", port = 80, target_port = 8080 }}]\n\
         endpoints = [{{ ip = \"{}\", node = \"{}\" }}]\n\
         [[services]]\nnamespace = \"default\"\nname = \"empty\"\ncluster_ips = [\"10.96.0.21\"]\n\
         ports = [{{ port = 80 }}]\n",
        remote.ip, n2.name
    );
    let mut text = std::fs::read_to_string(&n1.config).unwrap();
    text.push_str(&svc);
    std::fs::write(&n1.config, text).unwrap();
    let sock = n1.admin_socket.clone();
    let applied = wait_until(Duration::from_secs(5), || {
        verdict(&trace(
            &sock,
            &["--pod", &p1.container_id, "--dst", "10.96.0.21"],
        ))
        .contains("answered by the switch")
    });
    assert!(
        applied,
        "the Services from the config file were not applied"
    );

    // Pod to pod on one node: switched at layer 2.
    let v = trace(
        &sock,
        &[
            "--pod",
            &p1.container_id,
            "--dst",
            &p2.ip.to_string(),
            "--proto",
            "icmp",
        ],
    );
    assert_eq!(verdict(&v), format!("deliver to port 2 ({})", p2.ip), "{v}");
    // Pod to a pod on another node: routed into VXLAN.
    let v = trace(
        &sock,
        &["--pod", &p1.container_id, "--dst", &remote.ip.to_string()],
    );
    assert!(verdict(&v).contains(&format!("to node {}", n2.name)), "{v}");
    assert!(steps(&v).contains("VXLAN VNI 1"), "{v}");
    // Pod to Service: translated to the backend, then routed to its node.
    let v = trace(
        &sock,
        &[
            "--pod",
            &p1.container_id,
            "--dst",
            "10.96.0.20",
            "--dport",
            "80",
        ],
    );
    let s = steps(&v);
    assert!(
        s.contains(&format!(
            "-> 10.96.0.20:80 became {}:40000 -> {}:8080",
            p1.ip, remote.ip
        )),
        "{s}"
    );
    assert!(verdict(&v).contains(&n2.name), "{v}");
    // A Service with no endpoints is refused by the switch.
    let v = trace(
        &sock,
        &[
            "--pod",
            &p1.container_id,
            "--dst",
            "10.96.0.21",
            "--dport",
            "80",
        ],
    );
    assert!(steps(&v).contains("without endpoints"), "{v}");
    // Dropped: a spoofed source, and a destination nothing routes.
    let v = trace(
        &sock,
        &[
            "--pod",
            &p1.container_id,
            "--src",
            "10.244.1.99",
            "--dst",
            &p2.ip.to_string(),
        ],
    );
    assert_eq!(verdict(&v), "dropped: spoofed_ip", "{v}");
    let v = trace(&sock, &["--port", "1", "--dst", "10.244.77.1"]);
    assert!(
        verdict(&v).starts_with("deliver to the node") || verdict(&v) == "dropped: no_route",
        "{v}"
    );
    // From a peer: routed to the local pod.
    let v = trace(
        &sock,
        &[
            "--peer",
            &n2.name,
            "--src",
            &remote.ip.to_string(),
            "--dst",
            &p1.ip.to_string(),
            "--proto",
            "udp",
        ],
    );
    assert_eq!(verdict(&v), format!("deliver to port 1 ({})", p1.ip), "{v}");
    // No side effects: nothing was tracked.
    let ct = std::process::Command::new(bin("vswitchctl"))
        .arg("--socket")
        .arg(&sock)
        .args(["--json", "conntrack"])
        .output()
        .unwrap();
    let ct: Value = serde_json::from_slice(&ct.stdout).unwrap();
    assert_eq!(ct["total"], 0, "trace left connection tracking state: {ct}");
}
