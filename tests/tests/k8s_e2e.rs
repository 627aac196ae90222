//! Kubernetes mode end to end: a lab whose vswitchds watch the project's API server stand-in
//! (`vswitch-lab up --kubernetes`), driven with the real `kubectl`.
//!
//! 1. A Service and its EndpointSlice applied with `kubectl apply -f` are reached from a pod
//!    by ClusterIP and DNS name; the EndpointSlice scaled up and down changes the backends;
//!    while the API server is down (and its log compacted, so every watch comes back to a
//!    410 Gone and relists) the Service keeps working, and a change made after it is back
//!    arrives; `kubectl delete -f` removes it.
//! 2. A node leaves (its Node object deleted: the others drop it as a peer, its pods become
//!    unreachable) and joins again (the Node object re-created: its vswitchd publishes its
//!    VTEP again, the others take it back).
//! 3. NetworkPolicy from the API: a policy applied with kubectl isolates a pod, a label
//!    changed on the client's Pod object admits it, the policy deleted admits all.
//! 4. The DaemonSet's paths (issue 24), in a lab whose nodes are configured from the shipped
//!    ConfigMap through the render step (no `[host] routes`): a node reaches a pod on another
//!    node (as the API server reaches a webhook) and a ClusterIP; the outside host reaches a
//!    NodePort of policy Cluster through a node without the endpoint, one of policy Local
//!    through the node with it, and a pod's hostPort.
//! 5. A rolling update: every node's vswitchd replaced in turn (each new one takes the node
//!    over from the old, which hands over its peers and Services too) while a pod pings a pod
//!    on the other node every 20 ms: no two pings in a row are lost (the forwarding gap of a
//!    handover is a few milliseconds, which one ping in flight can fall into).
//!
//! Needs root, iproute2, curl, python3, ss and kubectl (Debian's kubernetes-client). Every test
//! builds its own lab with a unique name and tears it down on drop, also when it fails; every
//! process is bounded in time.

use std::collections::BTreeSet;
use std::fs;
use std::time::Duration;

use conf::api::{PeersResponse, ServicesResponse, PATH_PEERS, PATH_SERVICES};
use vswitch_lab::{LabGuard, LabSpec, Node, Pod, PodOptions};
use vswitch_tests::{exec_in, python, require_root, unique, wait_until, Bg, TempDir};

/// How long a change in the API may take to reach traffic: the watch delivers in
/// milliseconds; 10 s is a broken watch, not a slow one.
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);
const HTTP_PORT: u16 = 8080;
const CLUSTER_IP: &str = "10.96.1.10";

/// `http NAME PORT`: answers every GET with `name=NAME`.
const SERVER: &str = r#"
import http.server, socketserver, sys
name, port = sys.argv[1], int(sys.argv[2])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("name=%s" % name).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
S(("", port), H).serve_forever()
"#;

fn have_kubectl() -> bool {
    std::process::Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn k8s_lab(nodes: u32) -> LabGuard {
    require_root();
    assert!(
        have_kubectl(),
        "kubectl is missing: install Debian's kubernetes-client (tests/run.sh does)"
    );
    let name = unique("k");
    LabGuard::up(LabSpec::new(&name, nodes, 1).with_kubernetes())
        .unwrap_or_else(|e| panic!("lab {name} (--kubernetes) did not come up: {e}"))
}

fn kubectl(lab: &LabGuard, args: &[&str]) -> String {
    lab.kubectl(args, None)
        .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
}

fn peer_names(node: &Node) -> BTreeSet<String> {
    let r: Result<PeersResponse, _> = node
        .client()
        .with_timeout(Duration::from_secs(2))
        .get(PATH_PEERS);
    r.map(|r| r.peers.into_iter().map(|p| p.name).collect())
        .unwrap_or_default()
}

fn serves(node: &Node, frontend: &str) -> bool {
    let r: Result<ServicesResponse, _> = node
        .client()
        .with_timeout(Duration::from_secs(2))
        .get(PATH_SERVICES);
    r.is_ok_and(|r| r.frontends.iter().any(|f| f.name.starts_with(frontend)))
}

/// One unlabelled metric of `node`'s vswitchd (its /metrics, on the node's own address as the
/// shipped ConfigMap has it rendered).
fn metric(node: &Node, name: &str) -> f64 {
    let url = format!("http://{}:9109/metrics", node.underlay_ip);
    let o = exec_in(
        &node.netns,
        &["curl", "-sS", "--max-time", "3", &url],
        Duration::from_secs(5),
    );
    o.stdout
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{}: no {name} in /metrics:\n{o}", node.name))
}

fn log_tail(node: &Node) -> String {
    let text = fs::read_to_string(&node.log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

fn server(script: &std::path::Path, pod: &Pod) -> Bg {
    let port = HTTP_PORT.to_string();
    let bg = Bg::spawn(
        &pod.netns,
        &[
            python(),
            script.to_str().unwrap_or("srv.py"),
            &pod.name,
            &port,
        ],
        Duration::from_secs(180),
    );
    let filter = format!("sport = :{HTTP_PORT}");
    let ok = wait_until(Duration::from_secs(5), || {
        let o = exec_in(
            &pod.netns,
            &["ss", "-Hltn", &filter],
            Duration::from_secs(3),
        );
        o.success() && !o.stdout.trim().is_empty()
    });
    assert!(ok, "the server in {} does not listen", pod.name);
    bg
}

/// Who answers `url` from `ns`, `count` times (None for a failed request).
fn who(ns: &str, url: &str, count: u32) -> Vec<Option<String>> {
    let script = format!(
        "for i in $(seq {count}); do curl -sS --max-time 1 {url} || echo curl-failed; echo; done"
    );
    let o = exec_in(
        ns,
        &["sh", "-c", &script],
        Duration::from_secs(5 + 3 * u64::from(count)),
    );
    o.stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.trim().strip_prefix("name=").map(str::to_string))
        .collect()
}

/// Waits until the set of backends answering `url` from `ns` is `want` (every request answered).
fn wait_backends(lab: &LabGuard, ns: &str, url: &str, want: &[&str], what: &str) {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    let mut got = Vec::new();
    // One request at a time until one is answered by a wanted backend (a Service not yet
    // applied costs a short timeout, not twelve), then a sample of twelve.
    let ok = wait_until(APPLY_TIMEOUT, || {
        got = who(ns, url, 1);
        if !got.iter().flatten().all(|b| want.contains(b)) || got.iter().any(Option::is_none) {
            std::thread::sleep(Duration::from_millis(100));
            return false;
        }
        got = who(ns, url, 12);
        got.iter().all(Option::is_some)
            && got.iter().flatten().cloned().collect::<BTreeSet<_>>() == want
    });
    assert!(
        ok,
        "{what}: want backends {want:?} for {url}, got {got:?}\nn1 log:\n{}",
        log_tail(lab.node("n1"))
    );
}

fn manifests(backends: &[&Pod]) -> String {
    let endpoints: String = backends
        .iter()
        .map(|p| {
            format!(
                "- addresses: [\"{}\"]\n  conditions: {{ready: true}}\n  nodeName: {}\n",
                p.ip, p.node
            )
        })
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\nspec:\n  \
         clusterIP: {CLUSTER_IP}\n  selector:\n    app: web\n  ports:\n  - name: http\n    port: \
         80\n    targetPort: {HTTP_PORT}\n---\napiVersion: discovery.k8s.io/v1\nkind: \
         EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  labels:\n    \
         kubernetes.io/service-name: web\naddressType: IPv4\nports:\n- name: http\n  port: \
         {HTTP_PORT}\n  protocol: TCP\nendpoints:\n{endpoints}"
    )
}

#[test]
fn a_service_applied_with_kubectl_is_reached_scaled_survives_an_api_restart_and_goes() {
    let mut lab = k8s_lab(3);
    let dir = TempDir::new(&lab.name);
    let script = dir.join("srv.py");
    fs::write(&script, SERVER).unwrap();
    let (client, b2, b3) = (
        lab.pod("n1-p1").clone(),
        lab.pod("n2-p1").clone(),
        lab.pod("n3-p1").clone(),
    );
    let (b2, b3) = (&b2, &b3);
    let _servers = [server(&script, b2), server(&script, b3)];
    let url = format!("http://{CLUSTER_IP}/");
    let file = dir.join("web.yaml");

    // One backend.
    fs::write(&file, manifests(&[b2])).unwrap();
    let out = kubectl(&lab, &["apply", "-f", file.to_str().unwrap()]);
    assert!(out.contains("service/web created"), "{out}");
    wait_backends(
        &lab,
        &client.netns,
        &url,
        &[&b2.name],
        "the applied Service",
    );
    let by_name = who(&client.netns, "http://web.default.svc.cluster.local/", 1);
    assert_eq!(by_name, [Some(b2.name.clone())], "by DNS name");

    // Scaled up: both backends; scaled down: the other one.
    fs::write(&file, manifests(&[b2, b3])).unwrap();
    let out = kubectl(&lab, &["apply", "-f", file.to_str().unwrap()]);
    assert!(
        out.contains("endpointslice.discovery.k8s.io/web-1 configured"),
        "{out}"
    );
    wait_backends(
        &lab,
        &client.netns,
        &url,
        &[&b2.name, &b3.name],
        "scaled up",
    );
    fs::write(&file, manifests(&[b3])).unwrap();
    kubectl(&lab, &["apply", "-f", file.to_str().unwrap()]);
    wait_backends(&lab, &client.netns, &url, &[&b3.name], "scaled down");

    // The API server goes away for 3 s, its log compacted: traffic goes on meanwhile, and a
    // change made once it is back arrives (through 410 Gone and a relist).
    kubectl(
        &lab,
        &["create", "--raw", "/_standin/compact", "-f", "/dev/null"],
    );
    kubectl(
        &lab,
        &[
            "create",
            "--raw",
            "/_standin/restart?down_ms=3000",
            "-f",
            "/dev/null",
        ],
    );
    assert_eq!(
        who(&client.netns, &url, 3),
        vec![Some(b3.name.clone()); 3],
        "the Service while the API server is down"
    );
    std::thread::sleep(Duration::from_millis(3000));
    fs::write(&file, manifests(&[b2])).unwrap();
    let applied = wait_until(Duration::from_secs(10), || {
        lab.kubectl(&["apply", "-f", file.to_str().unwrap()], None)
            .is_ok()
    });
    assert!(applied, "kubectl apply after the restart");
    wait_backends(
        &lab,
        &client.netns,
        &url,
        &[&b2.name],
        "a change after the restart",
    );
    // Every node came back through a relist (the watches resumed into the compaction's 410).
    // (kube-rs backs off while the server is down, up to seconds, so a node may take a while.)
    for n in &lab.nodes {
        let mut relists = 0.0;
        let ok = wait_until(Duration::from_secs(30), || {
            relists = metric(n, "vswitch_k8s_relists_total");
            relists >= 1.0
        });
        assert!(ok, "{}: vswitch_k8s_relists_total {relists}", n.name);
    }

    // Deleted: no node serves it any more, and the ClusterIP answers no more.
    let out = kubectl(&lab, &["delete", "-f", file.to_str().unwrap()]);
    assert!(out.contains("service \"web\" deleted"), "{out}");
    let gone = wait_until(APPLY_TIMEOUT, || {
        lab.nodes.iter().all(|n| !serves(n, "default/web:"))
    });
    assert!(gone, "the deleted Service is still served");
    assert_eq!(who(&client.netns, &url, 1), [None]);

    // The lab's add-service goes through the API too (a Service and its EndpointSlice), and
    // returns once every node serves it; del-service deletes them.
    let args = vswitch_lab::services::ServiceArgs {
        name: "api".into(),
        ports: vec![format!("80:{HTTP_PORT}").parse().expect("port")],
        endpoints: vec![b3.name.clone()],
        cluster_ip: None,
        node_port: None,
    };
    let spec = lab
        .add_service(&args)
        .unwrap_or_else(|e| panic!("add-service: {e}"));
    let vip = spec.cluster_ips[0];
    let objects = kubectl(&lab, &["get", "services,endpointslices", "-o", "name"]);
    assert!(objects.contains("service/api"), "{objects}");
    assert_eq!(
        who(&client.netns, &format!("http://{vip}/"), 2),
        vec![Some(b3.name.clone()); 2]
    );
    lab.del_service("api")
        .unwrap_or_else(|e| panic!("del-service: {e}"));
    let objects = kubectl(&lab, &["get", "services", "-o", "name"]);
    assert!(!objects.contains("service/api"), "{objects}");
}

#[test]
fn a_node_leaves_and_joins_through_its_node_object() {
    let lab = k8s_lab(3);
    let (n1, n3) = (lab.node("n1"), lab.node("n3"));
    let all: BTreeSet<String> = [lab.node("n2").name.clone(), n3.name.clone()].into();
    let ok = wait_until(APPLY_TIMEOUT, || peer_names(n1) == all);
    assert!(ok, "n1's peers: {:?}\n{}", peer_names(n1), log_tail(n1));
    let (client, far) = (lab.pod("n1-p1"), lab.pod("n3-p1"));
    vswitch_tests::assert_ping(&client.netns, far.ip);
    let node_json = kubectl(&lab, &["get", "node", &n3.name, "-o", "json"]);

    let out = kubectl(&lab, &["delete", "node", &n3.name]);
    assert!(out.contains("deleted"), "{out}");
    let only_n2: BTreeSet<String> = [lab.node("n2").name.clone()].into();
    let ok = wait_until(APPLY_TIMEOUT, || peer_names(n1) == only_n2);
    assert!(ok, "n3 left, n1's peers: {:?}", peer_names(n1));
    let ping = vswitch_tests::ping(&client.netns, far.ip, 1);
    assert!(
        !ping.success(),
        "a pod of a node that left still answers:\n{ping}"
    );

    // Joins again: the Node object as it was (without the VTEP annotations, which n3's own
    // vswitchd publishes again when it sees its Node without them).
    let mut node: serde_json::Value = serde_json::from_str(&node_json).unwrap();
    let meta = node["metadata"].as_object_mut().unwrap();
    for f in ["annotations", "resourceVersion", "uid", "creationTimestamp"] {
        meta.remove(f);
    }
    let out = lab
        .kubectl(&["apply", "-f", "-"], Some(&node.to_string()))
        .unwrap_or_else(|e| panic!("re-create the Node: {e}"));
    assert!(out.contains("created"), "{out}");
    let ok = wait_until(APPLY_TIMEOUT, || peer_names(n1) == all);
    assert!(
        ok,
        "n3 joined again, n1's peers: {:?}\nn3 log:\n{}",
        peer_names(n1),
        log_tail(n3)
    );
    vswitch_tests::assert_ping(&client.netns, far.ip);
}

/// Whether one ping from `ns` to `ip` is answered.
fn answers(ns: &str, ip: std::net::IpAddr) -> bool {
    vswitch_tests::ping(ns, ip, 1).success()
}

#[test]
fn network_policy_from_the_api_isolates_a_pod_and_follows_labels() {
    let mut lab = k8s_lab(2);
    let opts = PodOptions {
        namespace: "shop".into(),
        labels: [("app".to_string(), "web".to_string())].into(),
        ..Default::default()
    };
    let web = lab
        .add_pod_with(2, "web", &opts)
        .unwrap_or_else(|e| panic!("add pod web: {e}"))
        .clone();
    // The lab's pods are Pod objects in the API, named as the lab names them.
    let pods = kubectl(&lab, &["get", "pods", "-A", "-o", "name"]);
    for p in ["pod/n1-p1", "pod/n2-p1", "pod/n2-web"] {
        assert!(pods.contains(p), "{p} missing: {pods}");
    }
    let client = lab.pod("n1-p1").clone();
    assert!(answers(&client.netns, web.ip), "web before any policy");

    let dir = TempDir::new(&lab.name);
    let file = dir.join("policy.yaml");
    fs::write(
        &file,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: clients-only\n  \
         namespace: shop\nspec:\n  podSelector:\n    matchLabels:\n      app: web\n  ingress:\n  \
         - from:\n    - namespaceSelector: {}\n      podSelector:\n        matchLabels:\n          \
         role: client\n",
    )
    .unwrap();
    let out = lab
        .apply(&file)
        .unwrap_or_else(|e| panic!("apply the policy: {e}"));
    assert!(out.iter().any(|l| l.contains("created")), "{out:?}");
    let denied = wait_until(APPLY_TIMEOUT, || !answers(&client.netns, web.ip));
    assert!(
        denied,
        "the policy does not isolate web\n{}",
        log_tail(lab.node("n2"))
    );

    // The client's Pod object gains role=client: admitted.
    lab.label("n1-p1", &["role=client".to_string()])
        .unwrap_or_else(|e| panic!("label: {e}"));
    let admitted = wait_until(APPLY_TIMEOUT, || answers(&client.netns, web.ip));
    assert!(admitted, "a client labelled role=client is not admitted");
    lab.label("n1-p1", &["role-".to_string()])
        .unwrap_or_else(|e| panic!("label: {e}"));
    let denied = wait_until(APPLY_TIMEOUT, || !answers(&client.netns, web.ip));
    assert!(denied, "the label removed, the client is still admitted");

    // The policy deleted: web is open again.
    lab.delete(&file)
        .unwrap_or_else(|e| panic!("delete the policy: {e}"));
    let open = wait_until(APPLY_TIMEOUT, || answers(&client.netns, web.ip));
    assert!(open, "web stays isolated after its policy was deleted");
}

/// A node whose config names no pod CIDR (a node that joined after the nodes table was made)
/// takes the one of its Node object (issue 24 point 3): n1 restarts without `node.pod_cidr`,
/// takes the node over, and its pod is reached again from the other node.
#[test]
fn a_node_without_a_pod_cidr_in_its_config_takes_its_node_objects() {
    let mut lab = k8s_lab(2);
    let n1 = lab.node("n1").clone();
    let (near, far) = (lab.pod("n1-p1").clone(), lab.pod("n2-p1").clone());
    vswitch_tests::assert_ping(&far.netns, near.ip);
    let text = fs::read_to_string(&n1.config).expect("n1's config");
    let without: String = text
        .lines()
        .filter(|l| !l.starts_with("pod_cidr = "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(text, without, "n1's config names no pod CIDR to take away");
    fs::write(&n1.config, &without).expect("write n1's config");
    lab.restart_daemon(0, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("restart n1 without a pod CIDR: {e}\n{}", log_tail(&n1)));
    let log = fs::read_to_string(&n1.log).unwrap_or_default();
    assert!(
        log.contains("from node") && log.contains("spec"),
        "n1 did not take its pod CIDR from its Node:\n{}",
        log_tail(&n1)
    );
    let status: conf::api::Status = n1
        .client()
        .get(conf::api::PATH_STATUS)
        .expect("n1's status");
    assert!(
        status.pod_cidr.contains(&near.ip),
        "n1's pod CIDR {} does not hold its pod {}",
        status.pod_cidr,
        near.ip
    );
    vswitch_tests::assert_ping(&far.netns, near.ip);
}

/// A Service of `name` on `cluster_ip` with NodePort `node_port` and traffic policy
/// `policy`, and its EndpointSlice with `backend`.
fn node_port_manifests(
    name: &str,
    cluster_ip: &str,
    node_port: u16,
    policy: &str,
    backend: &Pod,
) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  \
         type: NodePort\n  externalTrafficPolicy: {policy}\n  clusterIP: {cluster_ip}\n  ports:\n  \
         - name: http\n    port: 80\n    targetPort: {HTTP_PORT}\n    nodePort: {node_port}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  \
         namespace: default\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\n\
         ports:\n- name: http\n  port: {HTTP_PORT}\n  protocol: TCP\nendpoints:\n- addresses: \
         [\"{}\"]\n  conditions: {{ready: true}}\n  nodeName: {}\n",
        backend.ip, backend.node
    )
}

#[test]
fn the_daemonsets_paths_work_as_the_shipped_configmap_sets_a_node_up() {
    let mut lab = k8s_lab(2);
    let dir = TempDir::new(&lab.name);
    let script = dir.join("srv.py");
    fs::write(&script, SERVER).unwrap();
    let (n1, n2) = (lab.node("n1").clone(), lab.node("n2").clone());
    let p2 = lab.pod("n2-p1").clone();
    let _server = server(&script, &p2);
    let config = fs::read_to_string(&n1.config).unwrap();
    assert!(
        config.contains("20-config.yaml") && !config.contains("routes"),
        "n1's config should be the shipped ConfigMap's, with no host routes:\n{config}"
    );

    // The node reaches a pod on another node, as the API server reaches a webhook's pod.
    let pod_url = format!("http://{}:{HTTP_PORT}/", p2.ip);
    wait_backends(&lab, &n1.netns, &pod_url, &[&p2.name], "n1 to a pod on n2");

    // NodePorts of both traffic policies, and the node to a ClusterIP.
    let file = dir.join("np.yaml");
    let yaml = [
        node_port_manifests("np-cluster", "10.96.1.20", 30080, "Cluster", &p2),
        node_port_manifests("np-local", "10.96.1.21", 30081, "Local", &p2),
    ]
    .join("---\n");
    fs::write(&file, yaml).unwrap();
    kubectl(&lab, &["apply", "-f", file.to_str().unwrap()]);
    wait_backends(
        &lab,
        &n1.netns,
        "http://10.96.1.20/",
        &[&p2.name],
        "n1 to a ClusterIP",
    );
    let out = lab.outside_netns.clone().expect("the lab's outside host");
    let cluster = format!("http://{}:30080/", n1.underlay_ip);
    wait_backends(
        &lab,
        &out,
        &cluster,
        &[&p2.name],
        "NodePort (Cluster) through n1",
    );
    let local = format!("http://{}:30081/", n2.underlay_ip);
    wait_backends(&lab, &out, &local, &[&p2.name], "NodePort (Local) on n2");

    // A hostPort.
    let opts = PodOptions {
        host_ports: vec![vswitch_lab::parse_publish("8090:8080").unwrap()],
        ..Default::default()
    };
    let web = lab
        .add_pod_with(2, "web", &opts)
        .unwrap_or_else(|e| panic!("add pod web with a hostPort: {e}"))
        .clone();
    let _web = server(&script, &web);
    let host_port = format!("http://{}:8090/", n2.underlay_ip);
    wait_backends(&lab, &out, &host_port, &[&web.name], "the hostPort on n2");
}

#[test]
fn a_rolling_update_of_every_node_loses_at_most_a_ping_per_handover() {
    let mut lab = k8s_lab(2);
    let (from, to) = (lab.pod("n1-p1").clone(), lab.pod("n2-p1").clone());
    vswitch_tests::assert_ping(&from.netns, to.ip);
    let count = 250;
    let ping = Bg::spawn(
        &from.netns,
        &[
            "ping",
            "-i",
            "0.02",
            "-c",
            &count.to_string(),
            "-W",
            "1",
            &to.ip.to_string(),
        ],
        Duration::from_secs(30),
    );
    std::thread::sleep(Duration::from_millis(500));
    for idx in 0..lab.nodes.len() {
        lab.restart_daemon(idx, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("restart node {idx}: {e}"));
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = ping.wait(Duration::from_secs(20));
    let answered: BTreeSet<u32> = out
        .stdout
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("icmp_seq=")?.parse().ok())
        .collect();
    let lost: Vec<u32> = (1..=count).filter(|s| !answered.contains(s)).collect();
    for node in &lab.nodes {
        let log = fs::read_to_string(&node.log).unwrap_or_default();
        let handover: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("handover") || l.contains("forwarding with"))
            .collect();
        assert!(
            log.contains("forwarding with the 1 peer(s)"),
            "{}: the new vswitchd did not start with the old one's peers:\n{}",
            node.name,
            handover.join("\n")
        );
        assert!(
            !log.contains("DNS over TCP") || !log.contains("Address already in use"),
            "{}: the DNS-over-TCP port was not handed over:\n{}",
            node.name,
            log_tail(node)
        );
    }
    let in_a_row = lost.windows(2).any(|w| w[1] == w[0] + 1);
    assert!(
        !in_a_row && lost.len() <= 2 * lab.nodes.len(),
        "pings lost during the rolling update: {lost:?}\n{out}"
    );
    eprintln!(
        "rolling update of {} nodes: {count} pings every 20 ms, lost {lost:?}",
        lab.nodes.len()
    );
}

/// `vswitch-lab scale` end to end at a small size (the figures come from the full-size run,
/// README "At cluster scale"; here only that every step works): the generated cluster is
/// loaded and converted whole, every churned change is measured by vswitchd, the relist after
/// a compaction completes with the table whole throughout, and the handover restart syncs.
#[test]
fn the_scale_bench_runs_end_to_end_at_a_small_size() {
    require_root();
    assert!(
        have_kubectl(),
        "kubectl is missing (Debian's kubernetes-client)"
    );
    let opts = vswitch_lab::scale::ScaleOptions {
        name: unique("s"),
        nodes: 20,
        services: 20,
        endpoints: 200,
        pods: 200,
        slice_max: 100,
        isolated: 10,
        changes: 20,
        rate: 50,
        cni_reps: 1,
        out_dir: None,
        keep: false,
    };
    let r = vswitch_lab::scale::run(&opts, &mut |line| eprintln!("scale: {line}"))
        .unwrap_or_else(|e| panic!("vswitch-lab scale failed: {e}"));
    eprintln!("{}", r.to_text());
    assert_eq!((r.table_services, r.table_endpoints), (20, 200));
    // One Service of 105 endpoints in two slices, 19 of 5.
    assert_eq!(r.endpoint_slices, 21);
    assert_eq!(r.isolated.latency.samples, 10, "{:?}", r.isolated);
    assert_eq!(r.sustained.latency.samples, 20, "{:?}", r.sustained);
    // Every pod relabelled is a new NetworkPolicy reading, applied (debounced) meanwhile.
    assert_eq!(r.pod_churn.changes, 20, "{:?}", r.pod_churn);
    assert!(r.pod_churn.applies > 0, "{:?}", r.pod_churn);
    assert!(r.sync_ms > 0 && r.policy_sync_ms > 0 && r.policy_sync_ms < u64::MAX);
    assert_eq!(r.relist_min_services, 20);
    assert!(r.restart_sync_ms > 0);
    assert!(r.cni_empty.add_ms > 0.0 && r.cni_loaded.del_ms > 0.0);
}
