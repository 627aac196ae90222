//! NetworkPolicy end to end (issue 26, 33 cases), on the model of the upstream Kubernetes NetworkPolicy
//! e2e suite (test/e2e/network/netpol): namespaces x, y and z, pods a, b and c in each (labels
//! `pod=a` ..., namespaces labelled `ns=x` ...), every pod serving TCP and UDP on ports 80 and
//! 81; the pods are spread over two nodes, so half the pairs cross the overlay. Each case
//! applies manifests with `Lab::apply` (what `vswitch-lab apply -f` does), then probes every
//! pair of pods and compares the whole truth table with the one the case expects, probing
//! again until they agree or 10 s have passed (as the upstream suite retries its probes).
//!
//! Needs root, iproute2 and python3. Each test has a lab of its own, torn down on drop.

use std::collections::BTreeMap;
use std::fs;
use std::net::IpAddr;
use std::thread;
use std::time::{Duration, Instant};

use vswitch_lab::{LabGuard, PodOptions};
use vswitch_tests::{exec_in, lab, python, unique, Bg, TempDir};

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
/// How long a change may take to reach every node's datapath before a case fails.
const CONVERGE: Duration = Duration::from_secs(10);

/// The servers and the prober:
/// - `serve`: TCP and UDP on ports 80 and 81; a TCP connection gets one line, a datagram is
///   echoed.
/// - `probe PROTO PORT IP...`: one attempt to each address at once (1 s each); prints `IP ok`
///   or `IP no` per address.
const SCRIPT: &str = r#"
import socket, sys, threading

def tcp_server(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", port)); s.listen(64)
    while True:
        c, _ = s.accept()
        try: c.sendall(b"hi\n")
        except OSError: pass
        c.close()

def udp_server(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("", port))
    while True:
        d, a = s.recvfrom(2048)
        s.sendto(d, a)

def probe(proto, port, ip, out):
    try:
        if proto == "tcp":
            s = socket.create_connection((ip, port), timeout=1)
            s.settimeout(1)
            ok = s.recv(16).startswith(b"hi")
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(1)
            s.connect((ip, port))
            s.send(b"ping")
            ok = s.recv(16) == b"ping"
        s.close()
    except OSError:
        ok = False
    out[ip] = "ok" if ok else "no"

if sys.argv[1] == "serve":
    ts = [threading.Thread(target=f, args=(p,), daemon=True)
          for p in (80, 81) for f in (tcp_server, udp_server)]
    for t in ts: t.start()
    print("ready", flush=True)
    for t in ts: t.join()
else:
    proto, port, ips = sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    out = {}
    ts = [threading.Thread(target=probe, args=(proto, port, ip, out)) for ip in ips]
    for t in ts: t.start()
    for t in ts: t.join()
    for ip in ips: print(ip, out.get(ip, "no"))
"#;

struct Cluster {
    lab: LabGuard,
    /// `ns/pod`, the pod's network namespace and address, in table order.
    pods: Vec<(String, String, IpAddr)>,
    _servers: Vec<Bg>,
    dir: TempDir,
    applied: usize,
}

impl Cluster {
    fn new() -> Cluster {
        let dir = TempDir::new(&unique("netpol"));
        fs::write(dir.join("np.py"), SCRIPT).unwrap();
        let mut c = Cluster {
            lab: lab(2, 0),
            pods: Vec::new(),
            _servers: Vec::new(),
            dir,
            applied: 0,
        };
        let namespaces: String = NAMESPACES
            .iter()
            .map(|n| format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: \"{n}\", labels: {{ns: \"{n}\"}}}}\n---\n"))
            .collect();
        c.apply(&namespaces);
        for (i, ns) in NAMESPACES.iter().enumerate() {
            for (j, pod) in PODS.iter().enumerate() {
                let node = 1 + ((i * 3 + j) % 2) as u32;
                let opts = PodOptions {
                    namespace: ns.to_string(),
                    labels: BTreeMap::from([("pod".to_string(), pod.to_string())]),
                    ..Default::default()
                };
                let p = c
                    .lab
                    .add_pod_with(node, &format!("{ns}{pod}"), &opts)
                    .unwrap_or_else(|e| panic!("pod {ns}/{pod}: {e}"))
                    .clone();
                c.pods.push((format!("{ns}/{pod}"), p.netns.clone(), p.ip));
            }
        }
        let script = c.dir.join("np.py");
        for (_, netns, _) in &c.pods {
            let argv = [python(), script.to_str().unwrap(), "serve"];
            c._servers
                .push(Bg::spawn(netns, &argv, Duration::from_secs(900)));
        }
        // Every server answers before the first case (no policy yet: all pairs connect).
        c.expect("tcp", 81, |_, _| true);
        c
    }

    /// Applies manifests, as `vswitch-lab apply -f` does.
    fn apply(&mut self, yaml: &str) {
        self.applied += 1;
        let f = self.dir.join(format!("m{}.yaml", self.applied));
        fs::write(&f, yaml).unwrap();
        self.lab.apply(&f).unwrap_or_else(|e| panic!("apply: {e}"));
    }

    /// Removes every NetworkPolicy (between cases).
    fn clear_policies(&self) {
        for e in fs::read_dir(self.lab.policy_dir()).unwrap().flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with("networkpolicy-")
            {
                fs::remove_file(e.path()).unwrap();
            }
        }
    }

    fn table(&self, proto: &str, port: u16) -> String {
        let ips: Vec<String> = self.pods.iter().map(|p| p.2.to_string()).collect();
        let script = self.dir.join("np.py");
        let rows: Vec<String> = thread::scope(|s| {
            let hs: Vec<_> = self
                .pods
                .iter()
                .map(|(name, netns, _)| {
                    let ips = &ips;
                    let script = &script;
                    s.spawn(move || {
                        let port = port.to_string();
                        let mut argv =
                            vec![python(), script.to_str().unwrap(), "probe", proto, &port];
                        argv.extend(ips.iter().map(String::as_str));
                        let out = exec_in(netns, &argv, Duration::from_secs(20));
                        let text = out.stdout.clone();
                        let marks: String = ips
                            .iter()
                            .map(|ip| {
                                if text.lines().any(|l| l == format!("{ip} ok")) {
                                    'X'
                                } else {
                                    '.'
                                }
                            })
                            .collect();
                        format!("{name} {marks}")
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        rows.join("\n") + "\n"
    }

    /// Probes until the truth table is `want(from, to)`, or fails with both tables.
    fn expect(&self, proto: &str, port: u16, want: impl Fn(&str, &str) -> bool) {
        let names: Vec<&str> = self.pods.iter().map(|p| p.0.as_str()).collect();
        let wanted: String = names
            .iter()
            .map(|from| {
                let marks: String = names
                    .iter()
                    // A pod reaches itself inside its own namespace: no policy applies (the
                    // upstream suite allows loopback too).
                    .map(|to| {
                        if from == to || want(from, to) {
                            'X'
                        } else {
                            '.'
                        }
                    })
                    .collect();
                format!("{from} {marks}\n")
            })
            .collect();
        let deadline = Instant::now() + CONVERGE;
        loop {
            let got = self.table(proto, port);
            if got == wanted {
                return;
            }
            if Instant::now() > deadline {
                panic!("{proto}/{port}: the truth table (rows from, columns to x/a..z/c)\n{got}is not\n{wanted}");
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// One case: no policy, apply `manifests`, check each table.
    fn case(&mut self, manifests: &str) {
        self.clear_policies();
        self.apply(manifests);
    }
}

fn np(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: \"{ns}\"}}\nspec: {spec}\n---\n"
    )
}

fn in_ns(p: &str, ns: &str) -> bool {
    p.starts_with(&format!("{ns}/"))
}

#[test]
fn ingress_by_pod_namespace_and_ip_block() {
    let mut c = Cluster::new();
    // 1. Deny all ingress in x, over TCP and UDP.
    c.case(&np("x", "deny", "{podSelector: {}}"));
    c.expect("tcp", 80, |_, to| !in_ns(to, "x"));
    c.expect("udp", 81, |_, to| !in_ns(to, "x"));
    // 2. Allow all beside it.
    c.apply(&np("x", "allow", "{podSelector: {}, ingress: [{}]}"));
    c.expect("tcp", 80, |_, _| true);
    // 3. From pods of the same namespace by label.
    c.case(&np("x", "p", "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]}"));
    c.expect("tcp", 80, |from, to| to != "x/a" || from == "x/b");
    // 4. From a namespace by label.
    c.case(&np("x", "p", "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: 'y'}}}]}]}"));
    c.expect("tcp", 80, |from, to| to != "x/a" || in_ns(from, "y"));
    // 5. By the automatic kubernetes.io/metadata.name label, NotIn.
    c.case(&np("x", "p", "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: ['y']}]}}]}]}"));
    c.expect("tcp", 80, |from, to| to != "x/a" || !in_ns(from, "y"));
    // 6. Pod and namespace selectors in one peer.
    c.case(&np("x", "p", "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: 'y'}}, podSelector: {matchLabels: {pod: b}}}]}]}"));
    c.expect("tcp", 80, |from, to| to != "x/a" || from == "y/b");
    // 7. ... and in two peers.
    c.case(&np("x", "p", "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: 'y'}}}, {podSelector: {matchLabels: {pod: b}}}]}]}"));
    c.expect("tcp", 80, |from, to| {
        to != "x/a" || in_ns(from, "y") || from == "x/b"
    });
    // 8. A pod label in every namespace.
    c.case(&np("x", "p", "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {pod: c}}}]}]}"));
    c.expect("tcp", 80, |from, to| to != "x/a" || from.ends_with("/c"));
    // 9. matchExpressions on both sides.
    c.case(&np("x", "p", "{podSelector: {matchExpressions: [{key: pod, operator: In, values: [a, b]}]}, ingress: [{from: [{podSelector: {matchExpressions: [{key: pod, operator: NotIn, values: [a]}]}}]}]}"));
    c.expect("tcp", 80, |from, to| {
        !(to == "x/a" || to == "x/b") || from == "x/b" || from == "x/c"
    });
    // 10. ipBlock with except: namespace y's pods but y/b, by address.
    let yb = c.pods.iter().find(|p| p.0 == "y/b").unwrap().2;
    c.case(&np("x", "p", &format!("{{podSelector: {{matchLabels: {{pod: a}}}}, ingress: [{{from: [{{ipBlock: {{cidr: 10.244.0.0/16, except: [{yb}/32]}}}}]}}]}}")));
    c.expect("tcp", 80, |from, to| to != "x/a" || from != "y/b");
    // 11. A policy in another namespace selects nothing here.
    c.case(&np("y", "p", "{podSelector: {matchLabels: {pod: a}}}"));
    c.expect("tcp", 80, |_, to| to != "y/a");
}

#[test]
fn egress_ports_and_several_policies() {
    let mut c = Cluster::new();
    // 12. Deny all egress.
    c.case(&np("x", "deny", "{podSelector: {}, policyTypes: [Egress]}"));
    c.expect("tcp", 80, |from, _| !in_ns(from, "x"));
    c.expect("udp", 80, |from, _| !in_ns(from, "x"));
    // 13. Deny both ways.
    c.case(&np(
        "x",
        "deny",
        "{podSelector: {}, policyTypes: [Ingress, Egress]}",
    ));
    c.expect("tcp", 81, |from, to| !in_ns(from, "x") && !in_ns(to, "x"));
    // 14. A port number: 81 open, 80 closed, UDP 81 closed (TCP is the default).
    c.case(&np(
        "x",
        "p",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{ports: [{port: 81}]}]}",
    ));
    c.expect("tcp", 81, |_, _| true);
    c.expect("tcp", 80, |_, to| to != "x/a");
    c.expect("udp", 81, |_, to| to != "x/a");
    // 15. A named port, resolved on the destination pod.
    c.case(&np(
        "x",
        "p",
        "{podSelector: {}, ingress: [{ports: [{port: serve-80-udp, protocol: UDP}]}]}",
    ));
    c.expect("udp", 80, |_, _| true);
    c.expect("udp", 81, |_, to| !in_ns(to, "x"));
    // 16. An egress named port.
    c.case(&np("x", "p", "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{ports: [{port: serve-81-tcp}]}]}"));
    c.expect("tcp", 81, |_, _| true);
    c.expect("tcp", 80, |from, _| from != "x/a");
    // 17. endPort.
    c.case(&np(
        "x",
        "p",
        "{podSelector: {}, ingress: [{ports: [{port: 80, endPort: 81, protocol: UDP}]}]}",
    ));
    c.expect("udp", 80, |_, _| true);
    c.expect("udp", 81, |_, _| true);
    c.expect("tcp", 81, |_, to| !in_ns(to, "x"));
    // 18. Several policies add up.
    c.case(&(np("x", "p1", "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]}")
        + &np("x", "p2", "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: 'z'}}, podSelector: {matchLabels: {pod: c}}}]}]}")));
    c.expect("tcp", 80, |from, to| {
        to != "x/a" || from == "x/b" || from == "z/c"
    });
    // 19. The source's egress and the destination's ingress must both admit.
    c.case(&(np("x", "out", "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{to: [{namespaceSelector: {matchLabels: {ns: 'y'}}}]}]}")
        + &np("y", "in", "{podSelector: {matchLabels: {pod: b}}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: 'z'}}}]}]}")));
    c.expect("tcp", 80, |from, to| {
        (from != "x/a" || in_ns(to, "y")) && (to != "y/b" || in_ns(from, "z"))
    });
    // 20. Egress to an ipBlock (one pod's address).
    let zc = c.pods.iter().find(|p| p.0 == "z/c").unwrap().2;
    c.case(&np("x", "p", &format!("{{podSelector: {{matchLabels: {{pod: a}}}}, policyTypes: [Egress], egress: [{{to: [{{ipBlock: {{cidr: {zc}/32}}}}]}}]}}")));
    c.expect("udp", 81, |from, to| from != "x/a" || to == "z/c");
}

#[test]
fn changes_services_and_the_node() {
    let mut c = Cluster::new();
    // 21. A policy updated in place.
    c.case(&np("x", "p", "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]}"));
    c.expect("tcp", 80, |from, to| to != "x/a" || from == "x/b");
    c.apply(&np("x", "p", "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{podSelector: {matchLabels: {pod: c}}}]}]}"));
    c.expect("tcp", 80, |from, to| to != "x/a" || from == "x/c");
    // 22. A pod's labels changed: x/b becomes pod=c.
    let xb = c
        .lab
        .pods
        .iter()
        .find(|p| p.k8s_name == "xb")
        .unwrap()
        .name
        .clone();
    c.lab.label(&xb, &["pod=c".to_string()]).unwrap();
    c.expect("tcp", 80, |from, to| {
        to != "x/a" || from == "x/c" || from == "x/b"
    });
    c.lab.label(&xb, &["pod=b".to_string()]).unwrap();
    // 23. A namespace's labels changed.
    c.case(&np(
        "x",
        "p",
        "{podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {team: blue}}}]}]}",
    ));
    c.expect("tcp", 80, |_, to| !in_ns(to, "x"));
    c.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: \"z\", labels: {ns: \"z\", team: blue}}\n");
    c.expect("tcp", 80, |from, to| !in_ns(to, "x") || in_ns(from, "z"));
    c.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: \"z\", labels: {ns: \"z\"}}\n");
    // 24. The policy deleted: everything connects again.
    c.clear_policies();
    c.expect("tcp", 80, |_, _| true);
    // 25. Service traffic is judged after translation, against the backend pod.
    let xa = c
        .lab
        .pods
        .iter()
        .find(|p| p.k8s_name == "xa")
        .unwrap()
        .name
        .clone();
    let svc = vswitch_lab::services::ServiceArgs {
        name: "web".into(),
        ports: vec!["80".parse().unwrap()],
        endpoints: vec![xa],
        cluster_ip: Some("10.96.1.80".parse().unwrap()),
        node_port: None,
    };
    c.lab.add_service(&svc).unwrap();
    c.case(&np("x", "p", "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: 'y'}}}]}]}"));
    let script = c.dir.join("np.py");
    let reach = |from: &str| {
        let netns = &c.pods.iter().find(|p| p.0 == from).unwrap().1;
        let argv = [
            python(),
            script.to_str().unwrap(),
            "probe",
            "tcp",
            "80",
            "10.96.1.80",
        ];
        let out = exec_in(netns, &argv, Duration::from_secs(20));
        out.stdout.contains("ok")
    };
    let deadline = Instant::now() + CONVERGE;
    while !reach("y/b") || reach("z/b") {
        assert!(
            Instant::now() < deadline,
            "the Service's backend is not guarded by its policy"
        );
        thread::sleep(Duration::from_millis(200));
    }
    // 26. The node (kubelet's probes) always reaches its pods, isolated or not.
    c.case(&np(
        "x",
        "deny",
        "{podSelector: {}, policyTypes: [Ingress, Egress]}",
    ));
    c.expect("tcp", 80, |from, to| !in_ns(from, "x") && !in_ns(to, "x"));
    for (name, _, ip) in c.pods.iter().filter(|p| in_ns(&p.0, "x")) {
        let node_of = c
            .lab
            .pods
            .iter()
            .find(|p| p.ip == *ip)
            .unwrap()
            .node
            .clone();
        let ip = ip.to_string();
        let argv = [
            python(),
            script.to_str().unwrap(),
            "probe",
            "tcp",
            "80",
            &ip,
        ];
        let out = exec_in(&node_of, &argv, Duration::from_secs(20));
        assert!(
            out.stdout.contains("ok"),
            "node {node_of} cannot reach its pod {name}"
        );
    }
    // 27. ICMP: pods that take nothing are not pinged; replies to their own pings come back
    // only when they may send.
    let out = exec_in(
        &c.pods[3].1,
        &["ping", "-c1", "-W1", &c.pods[0].2.to_string()],
        Duration::from_secs(5),
    );
    assert!(!out.success(), "a ping into an isolated pod was answered");
}

/// More of the upstream suite's cases: namespace isolation, a protocol without a port, ipBlock
/// `except` on egress and its overlap with another policy, an allow-all taking precedence, and
/// ingress with egress in one policy.
#[test]
fn isolation_protocols_and_overlaps() {
    let mut c = Cluster::new();
    // 28. Only from the same namespace ("should deny ingress from pods on other namespaces").
    c.case(&np(
        "x",
        "p",
        "{podSelector: {}, ingress: [{from: [{podSelector: {}}]}]}",
    ));
    c.expect("tcp", 80, |from, to| !in_ns(to, "x") || in_ns(from, "x"));
    // 29. A protocol and no port: every UDP port, no TCP ("allowing any port traffic to a
    // server on a specific protocol").
    c.case(&np(
        "x",
        "p",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{ports: [{protocol: UDP}]}]}",
    ));
    c.expect("udp", 80, |_, _| true);
    c.expect("udp", 81, |_, _| true);
    c.expect("tcp", 81, |_, to| to != "x/a");
    // 30. Egress to a CIDR but its except ("should enforce except clause while egress access to
    // server in CIDR block").
    let zc = c.pods.iter().find(|p| p.0 == "z/c").unwrap().2;
    let except = format!("{{podSelector: {{matchLabels: {{pod: a}}}}, policyTypes: [Egress], egress: [{{to: [{{ipBlock: {{cidr: 10.244.0.0/16, except: [{zc}/32]}}}}]}}]}}");
    c.case(&np("x", "p1", &except));
    c.expect("tcp", 80, |from, to| from != "x/a" || to != "z/c");
    // 31. An address in one policy's except and another's cidr is admitted ("should ensure an
    // IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed").
    c.apply(&np("x", "p2", &format!("{{podSelector: {{matchLabels: {{pod: a}}}}, policyTypes: [Egress], egress: [{{to: [{{ipBlock: {{cidr: {zc}/32}}}}]}}]}}")));
    c.expect("tcp", 80, |_, _| true);
    // 32. An egress allow-all beside a narrower egress policy wins ("multiple egress policies
    // with egress allow-all policy taking precedence").
    c.case(&np("x", "narrow", "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{to: [{podSelector: {matchLabels: {pod: b}}}]}]}"));
    c.expect("udp", 81, |from, to| from != "x/a" || to == "x/b");
    c.apply(&np(
        "x",
        "all",
        "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{}]}",
    ));
    c.expect("udp", 81, |_, _| true);
    // 33. Ingress and egress in one policy ("should work with Ingress, Egress specified
    // together").
    c.case(&np("x", "p", "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress, Egress], ingress: [{from: [{namespaceSelector: {matchLabels: {ns: 'y'}}}]}], egress: [{to: [{namespaceSelector: {matchLabels: {ns: 'z'}}}]}]}"));
    c.expect("tcp", 81, |from, to| {
        (to != "x/a" || in_ns(from, "y")) && (from != "x/a" || in_ns(to, "z"))
    });
}

/// `vswitchctl` against one node's daemon, run in the node's namespace: its JSON answer.
fn ctl(c: &Cluster, node: &str, args: &[&str]) -> serde_json::Value {
    let n = c.lab.node(node);
    let sock = n.admin_socket.to_str().unwrap();
    let bin = vswitch_tests::bin("vswitchctl");
    let mut argv = vec![bin.to_str().unwrap(), "--socket", sock, "--json"];
    argv.extend_from_slice(args);
    let out = vswitch_tests::run(
        &mut vswitch_tests::in_netns(&n.netns, &argv),
        Duration::from_secs(10),
    );
    assert!(out.success(), "vswitchctl {args:?}: {out}");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", out.stdout))
}

/// Seeing it (issue 26 point 6): `vswitchctl policies` names the policy isolating a pod and a
/// policy left out, `trace` says a denied connection is denied by ingress, and the node's
/// drop counters count it.
#[test]
fn policies_trace_and_counters_show_a_deny() {
    let mut c = Cluster::new();
    c.case(&np("x", "deny", "{podSelector: {matchLabels: {pod: a}}}"));
    c.expect("tcp", 80, |_, to| to != "x/a");
    // x/a and x/c are on n1.
    let v = ctl(&c, "n1", &["policies", "--pod", "x/xa"]);
    let pods = v["pods"].as_array().unwrap();
    assert_eq!(pods.len(), 1, "{v}");
    let a = &pods[0];
    assert_eq!(a["pod"], "x/xa", "{v}");
    assert_eq!(a["labels"]["pod"], "a", "{v}");
    assert_eq!(a["isolated_ingress"], true, "{v}");
    assert_eq!(a["isolated_egress"], false, "{v}");
    assert_eq!(a["ingress"][0]["policy"], "x/deny", "{v}");
    assert_eq!(a["ingress"][0]["rules"], serde_json::json!([]), "{v}");
    assert!(
        v["policies"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "x/deny"),
        "{v}"
    );
    // A policy the API server would refuse is listed as left out.
    c.apply(&np(
        "y",
        "bad",
        "{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: bogus}}]}]}",
    ));
    let deadline = Instant::now() + CONVERGE;
    loop {
        let v = ctl(&c, "n1", &["policies"]);
        let seen = v["problems"].as_array().unwrap().iter().any(|p| {
            p.as_str()
                .is_some_and(|p| p.contains("NetworkPolicy y/bad") && p.contains("cidr"))
        });
        if seen {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "y/bad not listed as left out: {v}"
        );
        thread::sleep(Duration::from_millis(200));
    }
    // The trace of x/c -> x/a:80 says denied, by ingress, and by which policy.
    let xa = c.pods.iter().find(|p| p.0 == "x/a").unwrap().2.to_string();
    let v = ctl(
        &c,
        "n1",
        &["trace", "--pod", "x/xc", "--dst", &xa, "--dport", "80"],
    );
    assert_eq!(v["verdict"], "dropped: policy_denied_ingress", "{v}");
    let steps: Vec<&str> = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    assert!(
        steps
            .iter()
            .any(|s| s
                .starts_with("policy: denied by ingress: x/xa is isolated for ingress by x/deny")),
        "{steps:#?}"
    );
    // The probes above were refused, and counted (on the sender's port on n1, or on the
    // underlay for those from n2).
    let ports = vswitch_tests::ports(&c.lab.node("n1").admin_socket);
    let denied: u64 = ports
        .ports
        .iter()
        .map(|p| &p.counters)
        .chain(ports.underlay.as_ref())
        .filter_map(|c| c.drops.get("policy_denied_ingress"))
        .sum();
    assert!(denied > 0, "no policy_denied_ingress counted: {ports:?}");
}
