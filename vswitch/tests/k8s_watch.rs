//! The Kubernetes watch-to-table path.
//!
//! (a) API objects in the exact shape an API server returns them (fixtures/k8s/) converted to
//!     the switch's peer and Service tables.
//! (b) The daemon's own watch code (`K8sWatch`, the same kube watchers, debounce loop and
//!     annotation publisher) run against a local HTTP server that behaves like an API server:
//!     lists with a resourceVersion, watches that stream recorded events with BOOKMARKs from
//!     that version on, a 410 Gone that forces a relist, a failing list, and PATCH of a Node.
//!     A recorder in place of the daemon (both implement `ClusterSink`) sees every table the
//!     daemon would have been given.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch};
use axum::Router;
use conf::config::{EndpointSpec, PeerSpec, Protocol, ServicePort, ServiceSpec, TrafficPolicy};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::sync::broadcast;
use tokio::time::Instant;
use vswitch::control::k8s::convert::{self, cluster_state};
use vswitch::control::k8s::{K8sWatch, WatchSettings};
use vswitch::control::policy::PolicyInputs;
use vswitch::control::ClusterSink;

// ---------------------------------------------------------------------------------------------
// Fixtures

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/k8s/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn list_items(name: &str) -> Vec<Value> {
    let v: Value = serde_json::from_str(&fixture(name)).expect("fixture is JSON");
    v["items"].as_array().cloned().unwrap_or_default()
}

fn typed<T: DeserializeOwned>(items: &[Value]) -> Vec<T> {
    items
        .iter()
        .map(|v| serde_json::from_value(v.clone()).expect("fixture object"))
        .collect()
}

fn peer(name: &str, ip: &str, mac: &str, cidrs: &[&str]) -> PeerSpec {
    PeerSpec {
        name: name.into(),
        underlay_ip: ip.parse().unwrap(),
        vtep_mac: mac.into(),
        pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
        remote_checksum: false,
    }
}

fn ep(ip: &str, node: Option<&str>, ready: bool, serving: bool, terminating: bool) -> EndpointSpec {
    EndpointSpec {
        ip: ip.parse().unwrap(),
        node: node.map(Into::into),
        ready,
        serving,
        terminating,
        hostname: None,
        ports: None,
        for_zones: Vec::new(),
        for_nodes: Vec::new(),
    }
}

fn with_ports(e: EndpointSpec, ports: &[(&str, u16)]) -> EndpointSpec {
    EndpointSpec {
        ports: Some(Arc::new(
            ports.iter().map(|(n, p)| (n.to_string(), *p)).collect(),
        )),
        ..e
    }
}

fn port(name: Option<&str>, protocol: Protocol, port: u16, target: u16) -> ServicePort {
    ServicePort {
        name: name.map(Into::into),
        protocol,
        port,
        target_port: Some(target),
        node_port: None,
    }
}

fn svc(ns: &str, name: &str, ips: &[&str]) -> ServiceSpec {
    ServiceSpec {
        namespace: ns.into(),
        name: name.into(),
        cluster_ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
        ports: Vec::new(),
        external_ips: Vec::new(),
        session_affinity_timeout: None,
        internal_traffic_policy: TrafficPolicy::Cluster,
        external_traffic_policy: TrafficPolicy::Cluster,
        load_balancer_ips: Vec::new(),
        health_check_node_port: None,
        proxy_name: None,
        endpoints: Vec::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// (a) fixtures -> tables

#[test]
fn fixtures_convert_to_tables() {
    let nodes: Vec<Node> = typed(&list_items("nodes.json"));
    let services: Vec<Service> = typed(&list_items("services.json"));
    let slices: Vec<EndpointSlice> = typed(&list_items("endpointslices.json"));
    let state = convert::convert(&nodes, &services, &slices, "node-a");

    // node-a is us; node-b publishes our annotation without an address (its InternalIP, the
    // IPv4 one, is used; the IPv6 pod CIDR is left aside); node-c is a flannel node (public-ip,
    // the MAC as flannel writes it, upper case); node-d has no VTEP yet and node-e no pod
    // CIDR (both normal, no problem); node-f runs flannel's host-gw and node-h has a broken
    // MAC (both problems).
    assert_eq!(
        state.peers,
        vec![
            peer(
                "node-b",
                "172.18.0.3",
                "0e:58:ac:12:00:03",
                &["10.244.1.0/24"]
            ),
            peer(
                "node-c",
                "192.168.56.14",
                "b2:4f:7e:2a:91:0c",
                &["10.244.2.0/24"]
            ),
        ]
    );

    let mut db = svc("default", "db", &[]);
    db.ports = vec![port(Some("pg"), Protocol::Tcp, 5432, 5432)];
    db.endpoints = vec![
        EndpointSpec {
            hostname: Some("db-0".into()),
            ..ep("10.244.1.20", Some("node-b"), true, true, false)
        },
        EndpointSpec {
            hostname: Some("db-1".into()),
            ..ep("10.244.2.21", Some("node-c"), true, true, false)
        },
    ];
    let mut kubernetes = svc("default", "kubernetes", &["10.96.0.1"]);
    kubernetes.ports = vec![port(Some("https"), Protocol::Tcp, 443, 6443)];
    kubernetes.endpoints = vec![ep("172.18.0.2", None, true, true, false)];
    let mut web = svc("default", "web", &["10.96.12.34"]);
    web.ports = vec![ServicePort {
        node_port: Some(30080),
        // targetPort "http", resolved through the EndpointSlices' port of the same name.
        ..port(Some("http"), Protocol::Tcp, 80, 8080)
    }];
    web.external_ips = vec!["192.0.2.10".parse().unwrap()];
    web.session_affinity_timeout = Some(10_800);
    web.external_traffic_policy = TrafficPolicy::Local;
    web.endpoints = vec![
        ep("10.244.0.13", Some("node-a"), false, false, false),
        // Also in web-def34 as a terminating copy: the ready one is kept.
        ep("10.244.1.10", Some("node-b"), true, true, false),
        ep("10.244.2.11", Some("node-c"), true, true, false),
        ep("10.244.2.12", Some("node-c"), false, true, true),
    ];
    let mut dns = svc("kube-system", "kube-dns", &["10.96.0.10"]);
    dns.ports = vec![
        port(Some("dns"), Protocol::Udp, 53, 53),
        port(Some("dns-tcp"), Protocol::Tcp, 53, 53),
        port(Some("metrics"), Protocol::Tcp, 9153, 9153),
    ];
    dns.endpoints = vec![
        ep("10.244.0.5", Some("node-a"), true, true, false),
        ep("10.244.1.7", Some("node-b"), true, true, false),
    ];
    // targetPort "metrics", numbered 9100 by two pods and 9200 by a third (in a slice of its
    // own): every pod is served on its own number (the port's listed number is its first
    // endpoint's).
    let mut exporter = svc("monitoring", "exporter", &["10.96.60.6"]);
    exporter.ports = vec![port(None, Protocol::Tcp, 9100, 9200)];
    exporter.endpoints = vec![
        with_ports(
            ep("10.244.0.42", Some("node-a"), true, true, false),
            &[("", 9200)],
        ),
        ep("10.244.1.40", Some("node-b"), true, true, false),
        ep("10.244.2.41", Some("node-c"), true, true, false),
    ];
    let mut sticky = svc("shop", "sticky", &["10.96.50.5"]);
    sticky.ports = vec![port(Some("api"), Protocol::Tcp, 8443, 8443)];
    sticky.session_affinity_timeout = Some(600);
    sticky.internal_traffic_policy = TrafficPolicy::Local;
    sticky.endpoints = vec![ep("10.244.0.30", Some("node-a"), true, true, false)];
    // default/search is an ExternalName Service: nothing to translate.
    let mut want = vec![db, kubernetes, web, dns, exporter, sticky];
    // Each endpoint carries its own slice's ports (all alike here but for exporter's third).
    for (s, ports) in want.iter_mut().zip([
        &[("pg", 5432)][..],
        &[("https", 6443)],
        &[("http", 8080)],
        &[("dns-tcp", 53), ("dns", 53), ("metrics", 9153)],
        &[("", 9100)],
        &[("api", 8443)],
    ]) {
        for e in s.endpoints.iter_mut().filter(|e| e.ports.is_none()) {
            *e = with_ports(e.clone(), ports);
        }
    }
    assert_eq!(state.services.len(), want.len());
    for (got, want) in state.services.iter().zip(&want) {
        assert_eq!(got, want, "{}/{}", want.namespace, want.name);
    }

    let problems = state.problems.join("\n");
    for needle in [
        "node \"node-f\": flannel backend \"host-gw\"",
        "node \"node-h\": VTEP MAC \"not-a-mac\"",
        "service shop/sticky: port sig: unsupported: SCTP",
        "service shop/sticky: unsupported: IPv6 addresses are not translated (IPv4 ones are): \
         fd00:10:96::5",
    ] {
        assert!(problems.contains(needle), "{needle:?} not in:\n{problems}");
    }
    assert_eq!(state.problems.len(), 4, "{problems}");

    // The pure entry point gives the same tables.
    let (p, s) = cluster_state(&nodes, &services, &slices, "node-a");
    assert_eq!((p, s), (state.peers.clone(), state.services.clone()));
    // Seen from node-b, node-a has no VTEP yet (it publishes it at start) and node-b is us.
    let (p, _) = cluster_state(&nodes, &services, &slices, "node-b");
    assert_eq!(
        p.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        ["node-c"]
    );
}

#[test]
fn our_annotations_are_read_back_by_vswitch_and_flannel_readers() {
    let want = convert::own_annotations(
        "172.18.0.2".parse().unwrap(),
        [0x0e, 0x58, 0xac, 0x12, 0x00, 0x02],
        1,
    );
    assert_eq!(
        want[convert::VTEP_ANNOTATION],
        r#"{"underlay_ip":"172.18.0.2","vtep_mac":"0e:58:ac:12:00:02","remote_checksum":true}"#
    );
    assert_eq!(
        want[convert::FLANNEL_BACKEND_DATA],
        r#"{"VNI":1,"VtepMAC":"0e:58:ac:12:00:02"}"#
    );
    assert_eq!(want[convert::FLANNEL_BACKEND_TYPE], "vxlan");
    assert_eq!(want[convert::FLANNEL_PUBLIC_IP], "172.18.0.2");
    assert_eq!(want[convert::FLANNEL_KUBE_SUBNET_MANAGER], "true");

    let mut node: Node = typed(&list_items("nodes.json")).remove(0);
    node.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .extend(want.clone());
    assert!(convert::has_annotations(&node, &want));
    let me = peer(
        "node-a",
        "172.18.0.2",
        "0e:58:ac:12:00:02",
        &["10.244.0.0/24"],
    );
    // Another vswitch reads that we take remote checksum offload.
    let rco = PeerSpec {
        remote_checksum: true,
        ..me.clone()
    };
    assert_eq!(convert::node_peer(&node), Ok(Some(rco)));
    // A reader that knows only flannel's annotations (a flannel node) sees the same VTEP,
    // and never RCO: a flannel node's kernel vxlan device drops it.
    if let Some(a) = node.metadata.annotations.as_mut() {
        a.remove(convert::VTEP_ANNOTATION);
    }
    assert_eq!(convert::node_peer(&node), Ok(Some(me)));
}

#[test]
fn malformed_objects_are_problems_not_panics() {
    let nodes: Vec<Node> = typed(&[
        json!({"metadata": {}}),
        json!({"metadata": {"name": "x1", "annotations": {
                 "vswitch.io/vtep": "{\"underlay_ip\":\"10.0.0.1\",\"vtep_mac\":\"0e:00:00:00:00:01\"}"}},
               "spec": {"podCIDR": "10.244.9.1/24"}}),
        json!({"metadata": {"name": "x2", "annotations": {"vswitch.io/vtep": "{"}},
               "spec": {"podCIDR": "10.244.10.0/24"}}),
        json!({"metadata": {"name": "x3", "annotations": {"vswitch.io/vtep": "{\"vtep_mac\":\"0e:00:00:00:00:01\"}"}},
               "spec": {"podCIDR": "10.244.11.0/24"}}),
        json!({"metadata": {"name": "x4", "annotations": {
                 "flannel.alpha.coreos.com/backend-data": "{\"VNI\":1,\"VtepMAC\":\"0e:00:00:00:00:04\"}",
                 "flannel.alpha.coreos.com/public-ip": "not-an-ip"}},
               "spec": {"podCIDRs": ["garbage"]}}),
        json!({"metadata": {"name": "x5", "annotations": {
                 "vswitch.io/vtep": "{\"underlay_ip\":\"10.0.0.5\",\"vtep_mac\":\"01:00:00:00:00:05\"}"}},
               "spec": {"podCIDR": "10.244.12.0/24"}}),
        json!({"metadata": {"name": "x6", "annotations": {
                 "vswitch.io/vtep": "{\"underlay_ip\":\"10.0.0.5\",\"vtep_mac\":\"0e:00:00:00:00:06\"}"}},
               "spec": {"podCIDR": "10.244.12.0/24"}}),
        json!({"metadata": {"name": "x7", "annotations": {
                 "vswitch.io/vtep": "{\"underlay_ip\":\"10.0.0.5\",\"vtep_mac\":\"0e:00:00:00:00:07\"}"}},
               "spec": {"podCIDR": "10.244.13.0/24"}}),
        json!({"metadata": {"name": "x8", "annotations": {
                 "vswitch.io/vtep": "{\"underlay_ip\":\"10.0.0.8\",\"vtep_mac\":\"0e:00:00:00:00:08\"}"}},
               "spec": {"podCIDR": "10.244.0.0/23"}}),
    ]);
    let services: Vec<Service> = typed(&[
        json!({"metadata": {"name": "nospec", "namespace": "default"}}),
        json!({"metadata": {"name": "Bad_Name", "namespace": "default"},
               "spec": {"clusterIP": "10.96.0.99", "ports": [{"port": 80}]}}),
        json!({"metadata": {"name": "ports", "namespace": "default"},
               "spec": {"clusterIPs": ["10.96.0.98", "nonsense"], "externalIPs": ["x"],
                        "ports": [{"port": 0}, {"port": 70000}, {"port": 80, "protocol": "QUIC"},
                                  {"port": 81, "targetPort": -5, "nodePort": 99999},
                                  {"port": 81, "name": "again"}],
                        "sessionAffinity": "ClientIP",
                        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": -1}}}}),
    ]);
    let slices: Vec<EndpointSlice> = typed(&[
        json!({"metadata": {"name": "ports-1", "namespace": "default",
                            "labels": {"kubernetes.io/service-name": "ports"}},
               "addressType": "IPv4",
               "endpoints": [{"addresses": []}, {"addresses": ["fe80::1"]}, {"addresses": ["10.244.1.1"]}],
               "ports": [{"port": -1}, {"name": "x"}]}),
        json!({"metadata": {"name": "nolabel", "namespace": "default"}, "addressType": "IPv4",
               "endpoints": null}),
        json!({"metadata": {"name": "fqdn", "namespace": "default",
                            "labels": {"kubernetes.io/service-name": "ports"}},
               "addressType": "FQDN", "endpoints": [{"addresses": ["example.com"]}]}),
    ]);
    let state = convert::convert(&nodes, &services, &slices, "none");
    let problems = state.problems.join("\n");
    // x5 is refused (multicast MAC), so x6 is the first with 10.0.0.5 and x7 the duplicate;
    // x8 overlaps nothing kept before it.
    assert_eq!(
        state
            .peers
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>(),
        ["x6", "x8"],
        "{problems}"
    );
    for needle in [
        "node \"\": metadata.name is missing",
        "node \"x1\": peers: peer x1: pod CIDR 10.244.9.1/24 has host bits set",
        "node \"x2\": annotation vswitch.io/vtep",
        "node \"x3\": annotation vswitch.io/vtep has no underlay_ip",
        "node \"x4\": spec.podCIDRs: \"garbage\"",
        "node \"x5\"",
        "node \"x7\": underlay address 10.0.0.5 is also node \"x6\"'s",
        "service default/nospec: no spec",
        "service default/Bad_Name",
        "clusterIP \"nonsense\"",
        "externalIP \"x\"",
        "port 0: 0 is not a port number",
        "port 70000: 70000 is not a port number",
        "protocol \"QUIC\" is unknown",
        "port 81/Tcp is listed twice",
        "\"fe80::1\" is not an IPv4 address",
    ] {
        assert!(problems.contains(needle), "{needle:?} not in:\n{problems}");
    }
    let ports = &state.services[0];
    assert_eq!(ports.name, "ports");
    assert_eq!(
        ports.cluster_ips,
        ["10.96.0.98".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(ports.session_affinity_timeout, Some(10_800));
    assert_eq!(ports.ports.len(), 1);
    assert_eq!(ports.ports[0].port, 81);
    assert_eq!(ports.ports[0].node_port, None);
    assert_eq!(
        ports.endpoints,
        // Its slice has no port 81: it stays (for DNS) but is sent none of the port's traffic.
        [with_ports(ep("10.244.1.1", None, true, true, false), &[])],
        "endpoints without an address or with an IPv6 one in an IPv4 slice are skipped"
    );
    // Against this node's own config, x6 has our underlay address and x8 overlaps our pod
    // CIDR: usable_peers leaves both out.
    let mut p = Vec::new();
    let kept = convert::usable_peers(
        state.peers,
        "10.244.0.0/24".parse().unwrap(),
        Some("10.0.0.5".parse().unwrap()),
        &mut p,
    );
    assert!(kept.is_empty(), "{kept:?}");
    assert_eq!(p.len(), 2, "{p:?}");
}

// ---------------------------------------------------------------------------------------------
// (b) a local API server

#[derive(Clone)]
enum Msg {
    /// A watch line and the resourceVersion it carries (0: not stored, e.g. a BOOKMARK).
    Line(String),
    /// The server ends the watch (after an ERROR, like an API server does).
    Close,
}

struct Kind {
    list_kind: &'static str,
    api_version: &'static str,
    kind: &'static str,
    items: Mutex<Vec<Value>>,
    /// Stored events by resourceVersion, so that a watch from a list's version misses
    /// nothing (what the API server's watch cache does).
    log: Mutex<Vec<(u64, String)>>,
    tx: broadcast::Sender<Msg>,
    lists: AtomicUsize,
    watches: AtomicUsize,
    /// Lists to answer with 500 before answering properly.
    fail_lists: AtomicUsize,
    /// Answer lists and watches with 403 Forbidden (a ClusterRole without this kind).
    forbidden: AtomicBool,
    /// The query of the last list.
    list_query: Mutex<HashMap<String, String>>,
}

struct Inner {
    kinds: BTreeMap<&'static str, Kind>,
    rv: AtomicU64,
    patches: Mutex<Vec<Value>>,
}

#[derive(Clone)]
struct FakeApi(Arc<Inner>);

const NODES: &str = "nodes";
const SERVICES: &str = "services";
const SLICES: &str = "endpointslices";
const POLICIES: &str = "networkpolicies";
const NAMESPACES: &str = "namespaces";
const PODS: &str = "pods";

fn key(v: &Value) -> (String, String) {
    let m = &v["metadata"];
    (
        m["namespace"].as_str().unwrap_or_default().to_string(),
        m["name"].as_str().unwrap_or_default().to_string(),
    )
}

impl FakeApi {
    fn from_fixtures() -> FakeApi {
        let kind = |list_kind, api_version, kind, file| Kind {
            list_kind,
            api_version,
            kind,
            items: Mutex::new(list_items(file)),
            log: Mutex::new(Vec::new()),
            tx: broadcast::channel(1024).0,
            lists: AtomicUsize::new(0),
            watches: AtomicUsize::new(0),
            fail_lists: AtomicUsize::new(0),
            forbidden: AtomicBool::new(false),
            list_query: Mutex::new(HashMap::new()),
        };
        let mut kinds = BTreeMap::new();
        kinds.insert(NODES, kind("NodeList", "v1", "Node", "nodes.json"));
        kinds.insert(
            SERVICES,
            kind("ServiceList", "v1", "Service", "services.json"),
        );
        kinds.insert(
            SLICES,
            kind(
                "EndpointSliceList",
                "discovery.k8s.io/v1",
                "EndpointSlice",
                "endpointslices.json",
            ),
        );
        kinds.insert(
            POLICIES,
            kind(
                "NetworkPolicyList",
                "networking.k8s.io/v1",
                "NetworkPolicy",
                "networkpolicies.json",
            ),
        );
        kinds.insert(
            NAMESPACES,
            kind("NamespaceList", "v1", "Namespace", "namespaces.json"),
        );
        kinds.insert(PODS, kind("PodList", "v1", "Pod", "pods.json"));
        FakeApi(Arc::new(Inner {
            kinds,
            rv: AtomicU64::new(1000),
            patches: Mutex::new(Vec::new()),
        }))
    }

    fn kind(&self, k: &str) -> &Kind {
        &self.0.kinds[k]
    }

    async fn serve(&self) -> u16 {
        let app = Router::new()
            .route(
                "/api/v1/nodes",
                get(|s: State<FakeApi>, q: Query<HashMap<String, String>>| {
                    list_or_watch(s, NODES, q)
                }),
            )
            .route("/api/v1/nodes/{name}", patch(patch_node))
            .route(
                "/api/v1/services",
                get(|s: State<FakeApi>, q: Query<HashMap<String, String>>| {
                    list_or_watch(s, SERVICES, q)
                }),
            )
            .route(
                "/apis/discovery.k8s.io/v1/endpointslices",
                get(|s: State<FakeApi>, q: Query<HashMap<String, String>>| {
                    list_or_watch(s, SLICES, q)
                }),
            )
            .route(
                "/apis/networking.k8s.io/v1/networkpolicies",
                get(|s: State<FakeApi>, q: Query<HashMap<String, String>>| {
                    list_or_watch(s, POLICIES, q)
                }),
            )
            .route(
                "/api/v1/namespaces",
                get(|s: State<FakeApi>, q: Query<HashMap<String, String>>| {
                    list_or_watch(s, NAMESPACES, q)
                }),
            )
            .route(
                "/api/v1/pods",
                get(|s: State<FakeApi>, q: Query<HashMap<String, String>>| {
                    list_or_watch(s, PODS, q)
                }),
            )
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        port
    }

    /// Stores a change as the API server would (new resourceVersion) and streams it to the
    /// watches. `line` is one recorded watch line; BOOKMARKs get the current version.
    fn replay(&self, kind: &str, line: &str) {
        let k = self.kind(kind);
        let mut ev: Value = serde_json::from_str(line).expect("watch line");
        let typ = ev["type"].as_str().unwrap_or_default().to_string();
        let mut log = k.log.lock().unwrap();
        match typ.as_str() {
            "ADDED" | "MODIFIED" | "DELETED" => {
                let rv = self.0.rv.fetch_add(1, Ordering::SeqCst) + 1;
                ev["object"]["metadata"]["resourceVersion"] = json!(rv.to_string());
                let mut stored = ev["object"].clone();
                if let Some(o) = stored.as_object_mut() {
                    o.remove("kind");
                    o.remove("apiVersion");
                }
                let mut items = k.items.lock().unwrap();
                items.retain(|i| key(i) != key(&stored));
                if typ != "DELETED" {
                    items.push(stored);
                }
                let line = ev.to_string();
                log.push((rv, line.clone()));
                let _ = k.tx.send(Msg::Line(line));
            }
            "BOOKMARK" => {
                let rv = self.0.rv.load(Ordering::SeqCst);
                ev["object"]["metadata"]["resourceVersion"] = json!(rv.to_string());
                let _ = k.tx.send(Msg::Line(ev.to_string()));
            }
            _ => {
                let _ = k.tx.send(Msg::Line(ev.to_string()));
                let _ = k.tx.send(Msg::Close);
            }
        }
    }

    /// A change the watches do not see (they are down); the next list has it.
    fn change_unseen(&self, kind: &str, typ: &str, obj: Value) {
        let k = self.kind(kind);
        let _log = k.log.lock().unwrap();
        let rv = self.0.rv.fetch_add(1, Ordering::SeqCst) + 1;
        let mut obj = obj;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let mut items = k.items.lock().unwrap();
        items.retain(|i| key(i) != key(&obj));
        if typ != "DELETED" {
            items.push(obj);
        }
    }

    fn active_watches(&self, kind: &str) -> usize {
        self.kind(kind).tx.receiver_count()
    }

    fn typed<T: DeserializeOwned>(&self, kind: &str) -> Vec<T> {
        typed(&self.kind(kind).items.lock().unwrap())
    }

    /// What the tables must be for the objects the server holds now.
    fn expected(&self, own: &str) -> (Vec<PeerSpec>, Vec<ServiceSpec>) {
        let nodes: Vec<Node> = self.typed(NODES);
        let services: Vec<Service> = self.typed(SERVICES);
        let slices: Vec<EndpointSlice> = self.typed(SLICES);
        cluster_state(&nodes, &services, &slices, own)
    }
}

async fn list_or_watch(
    State(api): State<FakeApi>,
    kind: &'static str,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let k = api.kind(kind);
    if k.forbidden.load(Ordering::SeqCst) {
        k.lists.fetch_add(1, Ordering::SeqCst);
        // What an API server answers a service account its ClusterRole does not cover.
        let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure",
            "message": format!("{kind} is forbidden: User \"system:serviceaccount:vswitch:vswitch\" \
                cannot list resource \"{kind}\" in API group \"{}\" at the cluster scope",
                k.api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or_default()),
            "reason": "Forbidden", "details": {"kind": kind}, "code": 403});
        return (StatusCode::FORBIDDEN, axum::Json(status)).into_response();
    }
    if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
        k.watches.fetch_add(1, Ordering::SeqCst);
        let from: u64 = q
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        // Subscribe and take the backlog under the log's lock: no event is lost or doubled.
        let (rx, backlog) = {
            let log = k.log.lock().unwrap();
            let rx = k.tx.subscribe();
            let backlog: Vec<Msg> = log
                .iter()
                .filter(|(rv, _)| *rv > from)
                .map(|(_, l)| Msg::Line(l.clone()))
                .collect();
            (rx, backlog)
        };
        let live = futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(m) => return Some((m, rx)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        use futures::StreamExt;
        let body = futures::stream::iter(backlog)
            .chain(live)
            .take_while(|m| std::future::ready(matches!(m, Msg::Line(_))))
            .map(|m| match m {
                Msg::Line(l) => Ok::<_, Infallible>(Bytes::from(l + "\n")),
                Msg::Close => Ok(Bytes::new()),
            });
        return Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from_stream(body))
            .unwrap();
    }
    k.lists.fetch_add(1, Ordering::SeqCst);
    *k.list_query.lock().unwrap() = q.clone();
    if k.fail_lists
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": "etcdserver: request timed out",
            "reason": "InternalError", "code": 500});
        return (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(status)).into_response();
    }
    let log = k.log.lock().unwrap();
    let rv = api.0.rv.load(Ordering::SeqCst);
    let body = json!({
        "kind": k.list_kind,
        "apiVersion": k.api_version,
        "metadata": {"resourceVersion": rv.to_string()},
        "items": *k.items.lock().unwrap(),
    });
    drop(log);
    axum::Json(body).into_response()
}

async fn patch_node(
    State(api): State<FakeApi>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> Response {
    let Ok(patch): Result<Value, _> = serde_json::from_slice(&body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    api.0.patches.lock().unwrap().push(patch.clone());
    let k = api.kind(NODES);
    let node = {
        let items = k.items.lock().unwrap();
        items.iter().find(|n| key(n).1 == name).cloned()
    };
    let Some(mut node) = node else {
        return (StatusCode::NOT_FOUND, "no such node").into_response();
    };
    if let Some(a) = patch["metadata"]["annotations"].as_object() {
        for (k, v) in a {
            node["metadata"]["annotations"][k] = v.clone();
        }
    }
    let mut full = json!({"kind": k.kind, "apiVersion": k.api_version});
    full.as_object_mut()
        .unwrap()
        .extend(node.as_object().unwrap().clone());
    api.replay(
        NODES,
        &json!({"type": "MODIFIED", "object": full}).to_string(),
    );
    let stored = {
        let items = k.items.lock().unwrap();
        items.iter().find(|n| key(n).1 == name).cloned()
    };
    axum::Json(stored).into_response()
}

/// The daemon's stand-in: every table it is given, with the time it was given.
#[derive(Default)]
struct Recorder {
    peers: Mutex<Vec<(Instant, Vec<PeerSpec>)>>,
    services: Mutex<Vec<(Instant, Vec<ServiceSpec>)>>,
    policy: Mutex<Vec<(Instant, PolicyInputs)>>,
}

impl ClusterSink for Recorder {
    fn apply_peers(&self, peers: Vec<PeerSpec>) -> Result<(), String> {
        self.peers.lock().unwrap().push((Instant::now(), peers));
        Ok(())
    }
    fn apply_services(&self, services: Vec<Arc<ServiceSpec>>) -> Result<(), String> {
        let services = services.into_iter().map(Arc::unwrap_or_clone).collect();
        self.services
            .lock()
            .unwrap()
            .push((Instant::now(), services));
        Ok(())
    }
    fn apply_policy(&self, inputs: PolicyInputs) -> Result<(), String> {
        self.policy.lock().unwrap().push((Instant::now(), inputs));
        Ok(())
    }
}

impl Recorder {
    fn peers(&self) -> Vec<(Instant, Vec<PeerSpec>)> {
        self.peers.lock().unwrap().clone()
    }
    fn services(&self) -> Vec<(Instant, Vec<ServiceSpec>)> {
        self.services.lock().unwrap().clone()
    }
    fn policy(&self) -> Vec<PolicyInputs> {
        let p = self.policy.lock().unwrap();
        p.iter().map(|(_, i)| i.clone()).collect()
    }
}

async fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn settings() -> WatchSettings {
    WatchSettings {
        node_name: "node-a".into(),
        pod_cidr: "10.244.0.0/24".parse().unwrap(),
        underlay_ip: Some("172.18.0.2".parse().unwrap()),
        vtep_mac: [0x0e, 0x58, 0xac, 0x12, 0x00, 0x02],
        vni: 1,
        publish_vtep: true,
        // The defaults of [kubernetes].
        debounce: Duration::from_millis(30),
        max_delay: Duration::from_millis(80),
    }
}

fn client(port: u16) -> kube::Client {
    let url = format!("http://127.0.0.1:{port}").parse().unwrap();
    kube::Client::try_from(kube::Config::new(url)).expect("client")
}

fn lines(name: &str) -> Vec<String> {
    fixture(name).lines().map(str::to_string).collect()
}

/// The 100 ms from an API event to the table swap that the design promises.
const PROMISED: Duration = Duration::from_millis(100);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_replays_bookmarks_410_gone_and_relist() {
    let api = FakeApi::from_fixtures();
    let port = api.serve().await;
    let rec = Arc::new(Recorder::default());
    let watch = K8sWatch::spawn(client(port), settings(), rec.clone());

    // The first tables: everything listed, converted, applied once each.
    wait_until("the first tables", Duration::from_secs(10), || {
        !rec.peers().is_empty() && !rec.services().is_empty()
    })
    .await;
    let (p0, s0) = api.expected("node-a");
    assert_eq!(rec.peers()[0].1, p0);
    assert_eq!(rec.services()[0].1, s0);
    assert_eq!(
        p0.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        ["node-b", "node-c"]
    );
    wait_until("synced", Duration::from_secs(5), || watch.stats().synced).await;

    // Our VTEP is published on our Node: ours and flannel's annotations, one merge patch.
    wait_until("the VTEP patch", Duration::from_secs(5), || {
        !api.0.patches.lock().unwrap().is_empty()
    })
    .await;
    let patch = api.0.patches.lock().unwrap()[0].clone();
    assert_eq!(
        patch,
        json!({"metadata": {"annotations": {
            "vswitch.io/vtep": "{\"underlay_ip\":\"172.18.0.2\",\"vtep_mac\":\"0e:58:ac:12:00:02\",\"remote_checksum\":true}",
            "flannel.alpha.coreos.com/backend-data": "{\"VNI\":1,\"VtepMAC\":\"0e:58:ac:12:00:02\"}",
            "flannel.alpha.coreos.com/backend-type": "vxlan",
            "flannel.alpha.coreos.com/kube-subnet-manager": "true",
            "flannel.alpha.coreos.com/public-ip": "172.18.0.2",
        }}})
    );
    wait_until("three watches", Duration::from_secs(5), || {
        [NODES, SERVICES, SLICES]
            .iter()
            .all(|k| api.active_watches(k) == 1)
    })
    .await;
    // Our own Node changing (the patch's MODIFIED event) changes no table.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!((rec.peers().len(), rec.services().len()), (1, 1));

    // A recorded EndpointSlice watch: BOOKMARK, a pod replaced in web-abc12, BOOKMARK.
    let mut sent = None;
    for l in lines("watch-endpointslices.jsonl") {
        if l.contains("\"MODIFIED\"") {
            sent = Some(Instant::now());
        }
        api.replay(SLICES, &l);
    }
    wait_until("the endpoint change", Duration::from_secs(5), || {
        rec.services().len() >= 2
    })
    .await;
    assert_eq!(rec.services().len(), 2, "one change, one apply");
    let (at, s1) = rec.services()[1].clone();
    let latency = at - sent.unwrap();
    eprintln!("endpoint change to table: {latency:?}");
    assert!(
        latency < PROMISED,
        "an endpoint change took {latency:?} to reach the tables"
    );
    assert_eq!(s1, api.expected("node-a").1);
    let web = s1.iter().find(|s| s.name == "web").unwrap();
    let ips: Vec<String> = web.endpoints.iter().map(|e| e.ip.to_string()).collect();
    assert_eq!(
        ips,
        ["10.244.0.13", "10.244.1.10", "10.244.2.11", "10.244.2.14"]
    );

    // A burst (ten pods of a scale-up becoming ready, back to back) is one table swap, with
    // the final state, still within the promised time of the first event.
    let burst = lines("watch-endpointslices-burst.jsonl");
    let first = Instant::now();
    for l in &burst {
        api.replay(SLICES, l);
    }
    wait_until("the burst", Duration::from_secs(5), || {
        rec.services().len() >= 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let services = rec.services();
    assert_eq!(
        services.len(),
        3,
        "a burst of {} events is one apply",
        burst.len()
    );
    let latency = services[2].0 - first;
    eprintln!("burst of {} events to table: {latency:?}", burst.len());
    assert!(latency < PROMISED, "the burst took {latency:?}");
    assert_eq!(services[2].1, api.expected("node-a").1);
    let web = services[2].1.iter().find(|s| s.name == "web").unwrap();
    assert_eq!(web.endpoints.iter().filter(|e| e.ready).count(), 14);
    assert_eq!(
        rec.peers().len(),
        1,
        "endpoint churn does not touch the peers"
    );

    // A recorded Node watch: BOOKMARK, node-d publishes its VTEP, BOOKMARK, then 410 Gone.
    let nodes = lines("watch-nodes.jsonl");
    assert!(nodes[3].contains("\"code\":410"));
    let sent = Instant::now();
    for l in &nodes[..3] {
        api.replay(NODES, l);
    }
    wait_until("node-d as a peer", Duration::from_secs(5), || {
        rec.peers().len() >= 2
    })
    .await;
    assert_eq!(rec.peers().len(), 2, "one new node, one apply");
    let (at, p1) = rec.peers()[1].clone();
    eprintln!("node change to table: {:?}", at - sent);
    assert!(at - sent < PROMISED, "a new node took {:?}", at - sent);
    assert_eq!(
        p1.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        ["node-b", "node-c", "node-d"]
    );
    assert_eq!(
        p1[2],
        peer(
            "node-d",
            "172.18.0.5",
            "0e:58:ac:12:00:05",
            &["10.244.3.0/24"]
        )
    );
    let errors_before = watch.stats().watch_errors;
    api.replay(NODES, &nodes[3]);
    // While the watch is down (the watcher backs off before relisting), node-c goes away and
    // node-g joins. Only the relist can tell, and it must arrive as one table.
    api.change_unseen(NODES, "DELETED", json!({"metadata": {"name": "node-c"}}));
    let g: Value = serde_json::from_str(&fixture("node-g.json")).unwrap();
    api.change_unseen(NODES, "ADDED", g);
    wait_until("the relist", Duration::from_secs(15), || {
        rec.peers().len() >= 3
    })
    .await;
    let peers = rec.peers();
    eprintln!("watch stats after the relist: {:?}", watch.stats());
    assert_eq!(
        peers[2]
            .1
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>(),
        ["node-b", "node-d", "node-g"]
    );
    assert_eq!(peers[2].1, api.expected("node-a").0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rec.peers().len(), 3, "no half-relisted table in between");
    let stats = watch.stats();
    assert!(stats.watch_errors > errors_before, "{stats:?}");
    assert!(stats.relists >= 1, "{stats:?}");
    assert_eq!(api.kind(NODES).lists.load(Ordering::SeqCst), 2);
    assert_eq!(api.kind(SERVICES).lists.load(Ordering::SeqCst), 1);
    assert_eq!(api.kind(SLICES).lists.load(Ordering::SeqCst), 1);
    assert!(api.kind(NODES).watches.load(Ordering::SeqCst) >= 2);
    assert_eq!(rec.services().len(), 3);
    assert_eq!(
        rec.policy().len(),
        1,
        "nodes and endpoints do not touch policy"
    );
    assert_eq!(stats.applies, 7);
    assert!(stats.last_apply.is_some());
    assert!(stats.annotation_patches >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_applied_until_every_list_has_completed() {
    let api = FakeApi::from_fixtures();
    // The EndpointSlice list fails first (counted, retried with backoff).
    api.kind(SLICES).fail_lists.store(1, Ordering::SeqCst);
    let port = api.serve().await;
    let rec = Arc::new(Recorder::default());
    let watch = K8sWatch::spawn(client(port), settings(), rec.clone());

    wait_until("the failed list", Duration::from_secs(5), || {
        watch.stats().watch_errors >= 1
    })
    .await;
    wait_until("the node and service lists", Duration::from_secs(5), || {
        api.kind(NODES).lists.load(Ordering::SeqCst) >= 1
            && api.kind(SERVICES).lists.load(Ordering::SeqCst) >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        rec.peers().is_empty() && rec.services().is_empty(),
        "a table was applied before the EndpointSlices were listed"
    );
    assert!(!watch.stats().synced);

    wait_until("the first tables", Duration::from_secs(15), || {
        !rec.services().is_empty() && !rec.peers().is_empty()
    })
    .await;
    let (p, s) = api.expected("node-a");
    assert_eq!(rec.peers()[0].1, p);
    assert_eq!(
        rec.services()[0].1,
        s,
        "the first Service table has its endpoints"
    );
    assert!(rec.services()[0]
        .1
        .iter()
        .any(|s| s.name == "web" && !s.endpoints.is_empty()));
    assert_eq!(api.kind(SLICES).lists.load(Ordering::SeqCst), 2);
    // The flag follows the tables' hand-over by a moment.
    wait_until("synced", Duration::from_secs(5), || watch.stats().synced).await;
    let stats = watch.stats();
    assert_eq!(stats.watch_errors, 1);
    assert_eq!(
        stats.relists, 0,
        "a failed first list is a retry, not a relist"
    );
}

/// Each pod address the inputs know, with the pod's `namespace/name` and labels.
fn pods_of(i: &PolicyInputs) -> Vec<(String, String, String)> {
    i.pods
        .sorted()
        .into_iter()
        .map(|(ip, p)| {
            let name = format!("{}/{}", p.namespace, p.name);
            (ip.to_string(), name, p.labels.to_string())
        })
        .collect()
}

fn policy_ids(i: &PolicyInputs) -> Vec<String> {
    i.set.policies().iter().map(|p| p.id()).collect()
}

fn pod_row(ip: &str, name: &str, labels: &str) -> (String, String, String) {
    (ip.into(), name.into(), labels.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_inputs_follow_networkpolicies_namespaces_and_pods() {
    let api = FakeApi::from_fixtures();
    let port = api.serve().await;
    let rec = Arc::new(Recorder::default());
    let watch = K8sWatch::spawn(client(port), settings(), rec.clone());

    wait_until("the first policy inputs", Duration::from_secs(10), || {
        !rec.policy().is_empty() && !rec.services().is_empty()
    })
    .await;
    let first = rec.policy()[0].clone();
    // allow-scrape's ipBlock is not a CIDR: left out with the field named, the others stay.
    assert_eq!(policy_ids(&first), ["shop/allow-web", "shop/default-deny"]);
    assert_eq!(first.problems.len(), 1, "{:?}", first.problems);
    assert!(
        first.problems[0]
            .contains("NetworkPolicy shop/allow-scrape: spec.ingress[0].from[0].ipBlock.cidr"),
        "{}",
        first.problems[0]
    );
    // The hostNetwork pod (the node's address), the finished Job pod and the pending pod
    // (no address yet) are left out.
    let web = "app=web,pod-template-hash=5f7c9d8b4";
    assert_eq!(
        pods_of(&first),
        [
            pod_row("10.244.0.10", "shop/web-5f7c9d8b4-x2k9p", web),
            pod_row("10.244.1.10", "shop/web-5f7c9d8b4-q7m2r", web),
            pod_row(
                "10.244.1.20",
                "shop/client-6b8d7f9c5-h4j8n",
                "pod-template-hash=6b8d7f9c5,role=client"
            ),
        ]
    );
    // Pods with the same labels share one label set; named ports come along.
    let pods = first.pods.sorted();
    assert!(Arc::ptr_eq(&pods[0].1.labels, &pods[1].1.labels));
    let ports: Vec<(&str, u16)> = pods[0].1.ports.iter().map(|p| (&*p.name, p.port)).collect();
    assert_eq!(ports, [("http", 8080), ("metrics", 9100)]);
    assert_eq!(first.set.namespace_labels("shop").get("team"), Some("blue"));
    assert_eq!(
        first.set.namespace_labels("monitoring").get("team"),
        Some("ops")
    );
    // Finished pods are not even sent: the list asks the API server to leave them out.
    let q = api.kind(PODS).list_query.lock().unwrap().clone();
    assert_eq!(
        q.get("fieldSelector").map(String::as_str),
        Some("status.phase!=Succeeded,status.phase!=Failed")
    );
    wait_until("synced", Duration::from_secs(5), || {
        let s = watch.stats();
        s.synced && s.policy_synced
    })
    .await;
    wait_until("six watches", Duration::from_secs(5), || {
        [NODES, SERVICES, SLICES, POLICIES, NAMESPACES, PODS]
            .iter()
            .all(|k| api.active_watches(k) == 1)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (peers, services) = (rec.peers().len(), rec.services().len());
    assert_eq!(rec.policy().len(), 1);

    // A pod's labels change (a recorded watch: BOOKMARK, MODIFIED, BOOKMARK): new inputs,
    // within the promised time, and neither the Service nor the peer table is rebuilt.
    let sent = Instant::now();
    for l in lines("watch-pods.jsonl") {
        api.replay(PODS, &l);
    }
    wait_until("the label change", Duration::from_secs(5), || {
        rec.policy().len() >= 2
    })
    .await;
    let at = rec.policy.lock().unwrap()[1].0;
    eprintln!("pod label change to policy inputs: {:?}", at - sent);
    assert!(at - sent < PROMISED, "a label change took {:?}", at - sent);
    let second = rec.policy()[1].clone();
    assert_eq!(
        pods_of(&second)[0],
        pod_row(
            "10.244.0.10",
            "shop/web-5f7c9d8b4-x2k9p",
            "app=web,canary=true,pod-template-hash=5f7c9d8b4"
        )
    );
    assert_eq!(policy_ids(&second), policy_ids(&first));

    // A pod's status changes and nothing policy reads does (its readiness): not applied again.
    for l in lines("watch-pods-status.jsonl") {
        api.replay(PODS, &l);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rec.policy().len(), 2, "an unchanged reading is not applied");

    // The broken policy is fixed and a namespace relabelled: one apply each, in force.
    for l in lines("watch-networkpolicies.jsonl") {
        api.replay(POLICIES, &l);
    }
    wait_until("the fixed policy", Duration::from_secs(5), || {
        rec.policy().len() >= 3
    })
    .await;
    let third = rec.policy()[2].clone();
    assert_eq!(
        policy_ids(&third),
        ["shop/allow-scrape", "shop/allow-web", "shop/default-deny"]
    );
    assert!(third.problems.is_empty(), "{:?}", third.problems);
    for l in lines("watch-namespaces.jsonl") {
        api.replay(NAMESPACES, &l);
    }
    wait_until("the relabelled namespace", Duration::from_secs(5), || {
        rec.policy().len() >= 4
    })
    .await;
    let fourth = rec.policy()[3].clone();
    assert_eq!(
        fourth.set.namespace_labels("monitoring").get("team"),
        Some("blue")
    );

    // Endpoint churn rebuilds the Services and not policy.
    for l in lines("watch-endpointslices.jsonl") {
        api.replay(SLICES, &l);
    }
    wait_until("the endpoint change", Duration::from_secs(5), || {
        rec.services().len() > services
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        rec.policy().len(),
        4,
        "endpoint churn does not touch policy"
    );
    assert_eq!(rec.services().len(), services + 1);
    assert_eq!(
        rec.peers().len(),
        peers,
        "policy changes do not touch the peers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_networkpolicies_cost_only_policy() {
    let api = FakeApi::from_fixtures();
    // A cluster whose ClusterRole predates NetworkPolicy support.
    api.kind(POLICIES).forbidden.store(true, Ordering::SeqCst);
    let port = api.serve().await;
    let rec = Arc::new(Recorder::default());
    let watch = K8sWatch::spawn(client(port), settings(), rec.clone());

    wait_until("the first tables", Duration::from_secs(10), || {
        !rec.peers().is_empty() && !rec.services().is_empty()
    })
    .await;
    let (p, s) = api.expected("node-a");
    assert_eq!(
        (rec.peers()[0].1.clone(), rec.services()[0].1.clone()),
        (p, s)
    );
    wait_until("a retried list", Duration::from_secs(10), || {
        api.kind(POLICIES).lists.load(Ordering::SeqCst) >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        rec.policy().is_empty(),
        "policy applied without its policies"
    );
    let stats = watch.stats();
    assert!(stats.synced && !stats.policy_synced, "{stats:?}");
    assert!(stats.watch_errors >= 2, "{stats:?}");

    // The ClusterRole is updated: the retried list succeeds and policy comes into force, no
    // restart needed.
    api.kind(POLICIES).forbidden.store(false, Ordering::SeqCst);
    wait_until("the policy inputs", Duration::from_secs(30), || {
        !rec.policy().is_empty()
    })
    .await;
    assert_eq!(
        policy_ids(&rec.policy()[0]),
        ["shop/allow-web", "shop/default-deny"]
    );
    // The flag follows the policy's hand-over by a moment.
    wait_until("policy synced", Duration::from_secs(5), || {
        watch.stats().policy_synced
    })
    .await;
    assert_eq!(rec.services().len(), 1);
    assert_eq!(rec.peers().len(), 1);
}

#[tokio::test]
async fn tls_client_builds_with_the_ring_provider() {
    // kube's rustls stack needs exactly one crypto provider; a second one pulled in by another
    // crate would make this panic at start in a cluster.
    let url = "https://127.0.0.1:6443".parse().unwrap();
    assert!(kube::Client::try_from(kube::Config::new(url)).is_ok());
}
