//! The daemon's Kubernetes watch code (`K8sWatch`: kube-rs watchers, reflectors, the debounce
//! loop, the VTEP annotation publisher) against the project's API server stand-in
//! (deploy/apiserver) over real HTTP, loaded with the recorded objects of fixtures/k8s/.
//! Where k8s_watch.rs replays recorded events from a scripted server, here every change is a
//! write to a server that keeps one resourceVersion, an event log, bookmarks and compaction,
//! so list, watch, BOOKMARK, 410 Gone, relist and reconnect all happen as kube-rs meets them
//! in a cluster: a watch cut mid-stream, a server down for a while, changes made while it was
//! down, and a compaction that makes every resumed watch 410 Gone.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use conf::config::{PeerSpec, ServiceSpec};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::time::Instant;
use vswitch::control::k8s::convert::cluster_state;
use vswitch::control::k8s::{K8sWatch, WatchSettings};
use vswitch::control::policy::PolicyInputs;
use vswitch::control::ClusterSink;
use vswitch_apiserver::resources::find;
use vswitch_apiserver::{ApiServer, Options, Settings, Store};

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/k8s/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn fixture_json(name: &str) -> Value {
    serde_json::from_str(&fixture(name)).expect("fixture is JSON")
}

/// The recorded objects of a watch fixture's ADDED/MODIFIED events.
fn recorded_objects(name: &str) -> Vec<Value> {
    fixture(name)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("watch line"))
        .filter(|e| matches!(e["type"].as_str(), Some("ADDED" | "MODIFIED")))
        .map(|e| e["object"].clone())
        .collect()
}

fn options() -> Options {
    Options {
        settings: Settings {
            bookmark_interval: Duration::from_millis(300),
        },
        ..Options::default()
    }
}

async fn stand_in() -> ApiServer {
    let server = ApiServer::start("127.0.0.1:0".parse().unwrap(), options())
        .await
        .expect("stand-in");
    for f in [
        "namespaces.json",
        "nodes.json",
        "services.json",
        "endpointslices.json",
        "pods.json",
        "networkpolicies.json",
    ] {
        server.load(&fixture_json(f)).expect(f);
    }
    server
}

fn objects<T: DeserializeOwned>(store: &Store, group: &str, plural: &str) -> Vec<T> {
    let r = find(group, "v1", plural).expect("a served kind");
    store
        .list(r, None)
        .0
        .iter()
        .map(|o| serde_json::from_value((**o).clone()).expect("typed object"))
        .collect()
}

/// What the tables must be for what the stand-in holds now.
fn expected(store: &Store) -> (Vec<PeerSpec>, Vec<ServiceSpec>) {
    let nodes: Vec<Node> = objects(store, "", "nodes");
    let services: Vec<Service> = objects(store, "", "services");
    let slices: Vec<EndpointSlice> = objects(store, "discovery.k8s.io", "endpointslices");
    cluster_state(&nodes, &services, &slices, "node-a")
}

fn delete(store: &Store, group: &str, plural: &str, ns: &str, name: &str) {
    let r = find(group, "v1", plural).unwrap();
    store.delete(&(r, ns.into(), name.into())).expect("delete");
}

#[derive(Default)]
struct Recorder {
    peers: Mutex<Vec<Vec<PeerSpec>>>,
    services: Mutex<Vec<Vec<ServiceSpec>>>,
    policy: Mutex<Vec<PolicyInputs>>,
    zone: Mutex<Option<String>>,
}

impl ClusterSink for Recorder {
    fn apply_peers(&self, peers: Vec<PeerSpec>) -> Result<(), String> {
        self.peers.lock().unwrap().push(peers);
        Ok(())
    }
    fn apply_services(&self, services: Vec<Arc<ServiceSpec>>) -> Result<(), String> {
        let services = services.into_iter().map(Arc::unwrap_or_clone).collect();
        self.services.lock().unwrap().push(services);
        Ok(())
    }
    fn apply_policy(&self, inputs: PolicyInputs) -> Result<(), String> {
        self.policy.lock().unwrap().push(inputs);
        Ok(())
    }
    fn apply_zone(&self, zone: Option<String>) -> Result<(), String> {
        *self.zone.lock().unwrap() = zone;
        Ok(())
    }
}

impl Recorder {
    fn peers(&self) -> Vec<Vec<PeerSpec>> {
        self.peers.lock().unwrap().clone()
    }
    fn services(&self) -> Vec<Vec<ServiceSpec>> {
        self.services.lock().unwrap().clone()
    }
    fn last_policy(&self) -> Option<PolicyInputs> {
        self.policy.lock().unwrap().last().cloned()
    }
}

async fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
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
        debounce: Duration::from_millis(30),
        max_delay: Duration::from_millis(80),
    }
}

fn client(server: &ApiServer) -> kube::Client {
    let url = server.url().parse().unwrap();
    kube::Client::try_from(kube::Config::new(url)).expect("client")
}

fn names(peers: &[PeerSpec]) -> Vec<&str> {
    peers.iter().map(|p| p.name.as_str()).collect()
}

/// Waits until the last tables applied are the ones the stand-in's objects make.
async fn converged(rec: &Recorder, store: &Store, what: &str) {
    wait_until(what, Duration::from_secs(20), || {
        let (p, s) = expected(store);
        rec.peers().last() == Some(&p) && rec.services().last() == Some(&s)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_follows_writes_cuts_restarts_and_compaction() {
    let mut server = stand_in().await;
    let store = server.store.clone();
    let rec = Arc::new(Recorder::default());
    let watch = K8sWatch::spawn(client(&server), settings(), rec.clone());

    // The first tables are the recorded objects' tables, each applied once.
    converged(&rec, &store, "the first tables").await;
    assert_eq!((rec.peers().len(), rec.services().len()), (1, 1));
    assert_eq!(names(&rec.peers()[0]), ["node-b", "node-c"]);
    // The flag follows the tables' hand-over by a moment.
    wait_until("synced", Duration::from_secs(5), || watch.stats().synced).await;

    // Our VTEP is published on our Node through a PATCH, and read back by our own watch.
    let nodes = find("", "v1", "nodes").unwrap();
    wait_until("our annotations on node-a", Duration::from_secs(5), || {
        store
            .get(&(nodes, String::new(), "node-a".into()))
            .is_some_and(|n| n["metadata"]["annotations"]["vswitch.io/vtep"].is_string())
    })
    .await;

    // The recorded endpoint change, then the recorded burst of a scale-up, written as a
    // controller would.
    let t = Instant::now();
    for o in recorded_objects("watch-endpointslices.jsonl") {
        server.load(&o).expect("slice");
    }
    converged(&rec, &store, "the endpoint change").await;
    eprintln!("endpoint change to table through HTTP: {:?}", t.elapsed());
    for o in recorded_objects("watch-endpointslices-burst.jsonl") {
        server.load(&o).expect("slice");
    }
    converged(&rec, &store, "the scale-up").await;
    let web = rec.services().last().unwrap().clone();
    let web = web.iter().find(|s| s.name == "web").unwrap();
    assert_eq!(web.endpoints.iter().filter(|e| e.ready).count(), 14);

    // A node joins (the recorded node-d publishes its VTEP, node-g arrives) and one leaves.
    for o in recorded_objects("watch-nodes.jsonl") {
        server.load(&o).expect("node");
    }
    server.load(&fixture_json("node-g.json")).expect("node-g");
    delete(&store, "", "nodes", "", "node-c");
    converged(&rec, &store, "node-d and node-g in, node-c out").await;
    assert_eq!(
        names(rec.peers().last().unwrap()),
        ["node-b", "node-d", "node-g"]
    );

    // Every watch cut mid-stream: kube-rs resumes from its last version, nothing is lost.
    let errors = watch.stats().watch_errors;
    store.cut_watches();
    delete(&store, "", "services", "default", "web");
    converged(&rec, &store, "a Service deleted around a cut").await;
    assert!(rec
        .services()
        .last()
        .unwrap()
        .iter()
        .all(|s| s.name != "web"));

    // The server goes away; while it is down a node leaves and a Service changes, and the
    // log is compacted: every resumed watch gets 410 Gone and relists.
    let applies = (rec.peers().len(), rec.services().len());
    let relists = watch.stats().relists;
    server.stop().await;
    delete(&store, "", "nodes", "", "node-b");
    delete(&store, "", "services", "kube-system", "kube-dns");
    store.compact();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        (rec.peers().len(), rec.services().len()),
        applies,
        "the tables stay while the API server is away"
    );
    server = ApiServer::serve(server.addr, store.clone(), options())
        .await
        .expect("the stand-in back on its address");
    converged(&rec, &store, "the relist after the restart").await;
    let stats = watch.stats();
    eprintln!("after the restart: {stats:?}");
    assert!(stats.watch_errors > errors, "{stats:?}");
    assert!(stats.relists > relists, "{stats:?}");
    assert_eq!(names(rec.peers().last().unwrap()), ["node-d", "node-g"]);
    // No table handed over was empty or half-listed: each one is complete for some moment of
    // the stand-in's history (every Service table holds `kubernetes`, every peer table node-d
    // or node-b).
    assert!(rec
        .services()
        .iter()
        .all(|t| t.iter().any(|s| s.name == "kubernetes")));
    assert!(rec
        .peers()
        .iter()
        .all(|t| t.iter().any(|p| p.name == "node-b" || p.name == "node-d")));
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_inputs_follow_pods_through_the_field_selector() {
    let server = stand_in().await;
    let store = server.store.clone();
    let rec = Arc::new(Recorder::default());
    let _watch = K8sWatch::spawn(client(&server), settings(), rec.clone());
    let pod_names = |i: &PolicyInputs| -> Vec<String> {
        i.pods
            .iter()
            .map(|(_, p)| format!("{}/{}", p.namespace, p.name))
            .collect()
    };
    wait_until("the first policy inputs", Duration::from_secs(10), || {
        rec.last_policy().is_some()
    })
    .await;
    let first = rec.last_policy().unwrap();
    assert_eq!(
        pod_names(&first),
        [
            "shop/web-5f7c9d8b4-x2k9p",
            "shop/web-5f7c9d8b4-q7m2r",
            "shop/client-6b8d7f9c5-h4j8n"
        ]
    );
    // The recorded label change, then a pod that finishes: the server's field selector turns
    // its MODIFIED into a DELETED for vswitchd's watch.
    for o in recorded_objects("watch-pods.jsonl") {
        server.load(&o).expect("pod");
    }
    let pods = find("", "v1", "pods").unwrap();
    store
        .update(
            &(pods, "shop".into(), "web-5f7c9d8b4-q7m2r".into()),
            |old| {
                let mut p = old.clone();
                p["status"]["phase"] = "Succeeded".into();
                Ok(p)
            },
        )
        .expect("pod finishes");
    wait_until("the finished pod gone", Duration::from_secs(10), || {
        rec.last_policy().is_some_and(|i| pod_names(&i).len() == 2)
    })
    .await;
    let last = rec.last_policy().unwrap();
    let canary = last
        .pods
        .iter()
        .find(|(_, p)| &*p.name == "web-5f7c9d8b4-x2k9p")
        .expect("web pod");
    assert_eq!(canary.1.labels.get("canary"), Some("true"));
}

fn counted(server: &ApiServer, plural: &str, watches: bool) -> usize {
    let r = ApiServer::resource(plural).expect("a served kind");
    let f = server.faults();
    if watches {
        f.watches[r]
    } else {
        f.lists[r]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_applied_until_every_list_has_completed() {
    let server = stand_in().await;
    // The EndpointSlice list fails first (500, as when etcd times out): retried with backoff.
    server.faults().fail_lists[ApiServer::resource("endpointslices").unwrap()] = 1;
    let rec = Arc::new(Recorder::default());
    let watch = K8sWatch::spawn(client(&server), settings(), rec.clone());
    wait_until("the failed list", Duration::from_secs(5), || {
        watch.stats().watch_errors >= 1
    })
    .await;
    wait_until("the node and service lists", Duration::from_secs(5), || {
        counted(&server, "nodes", false) >= 1 && counted(&server, "services", false) >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        rec.peers().is_empty() && rec.services().is_empty(),
        "a table was applied before the EndpointSlices were listed"
    );
    assert!(!watch.stats().synced);
    converged(&rec, &server.store, "the first tables").await;
    assert_eq!(rec.services().len(), 1, "one complete Service table");
    assert_eq!(counted(&server, "endpointslices", false), 2);
    // The flag follows the tables' hand-over by a moment.
    wait_until("synced", Duration::from_secs(5), || watch.stats().synced).await;
    let stats = watch.stats();
    assert_eq!(stats.watch_errors, 1);
    assert_eq!(
        stats.relists, 0,
        "a failed first list is a retry, not a relist"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_networkpolicies_cost_only_policy() {
    let server = stand_in().await;
    // A cluster whose ClusterRole predates NetworkPolicy support: 403 with the server's Status.
    let netpol = ApiServer::resource("networkpolicies").unwrap();
    server.faults().forbidden[netpol] = true;
    let rec = Arc::new(Recorder::default());
    let watch = K8sWatch::spawn(client(&server), settings(), rec.clone());
    converged(&rec, &server.store, "the first tables").await;
    wait_until("synced", Duration::from_secs(5), || watch.stats().synced).await;
    wait_until("a retried list", Duration::from_secs(10), || {
        counted(&server, "networkpolicies", false) >= 2
    })
    .await;
    assert!(
        rec.last_policy().is_none(),
        "policy applied without its policies"
    );
    let stats = watch.stats();
    assert!(stats.synced && !stats.policy_synced, "{stats:?}");

    // The ClusterRole is updated: the retried list succeeds, no restart needed.
    server.faults().forbidden[netpol] = false;
    wait_until("the policy inputs", Duration::from_secs(30), || {
        rec.last_policy().is_some()
    })
    .await;
    // The flag follows the policy's hand-over by a moment.
    wait_until("policy synced", Duration::from_secs(5), || {
        watch.stats().policy_synced
    })
    .await;
    assert_eq!((rec.peers().len(), rec.services().len()), (1, 1));
}

/// A Service `svc-{i}` in `default` with one EndpointSlice whose endpoint is 10.244.{a}.{b}.
fn service_and_slice(i: u32, endpoint_host: u32) -> (Value, Value) {
    let name = format!("svc-{i}");
    let ip = format!("10.104.{}.{}", i / 250, 1 + i % 250);
    let ep = format!("10.244.1.{}", 2 + endpoint_host % 250);
    let svc = serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    });
    let slice = serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-a"), "namespace": "default",
            "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ep], "conditions": {"ready": true}, "nodeName": "node-b"}]
    });
    (svc, slice)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_larger_than_a_page_and_relists_during_writes_converge() {
    let server = stand_in().await;
    let store = server.store.clone();
    // 1,200 Services and EndpointSlices: kube-rs lists 500 a page, so three pages each, with
    // continue tokens.
    const N: u32 = 1200;
    for i in 0..N {
        let (svc, slice) = service_and_slice(i, i);
        server.load(&svc).expect("service");
        server.load(&slice).expect("slice");
    }
    let rec = Arc::new(Recorder::default());
    let watch = K8sWatch::spawn(client(&server), settings(), rec.clone());
    converged(&rec, &store, "the first tables of 1,200 Services").await;
    assert_eq!(
        rec.services().len(),
        1,
        "the paged list is applied whole, once"
    );
    assert_eq!(counted(&server, "endpointslices", false), 3, "three pages");
    let base = rec.services()[0].len();
    assert!(base >= N as usize, "{base} Services");

    // Endpoints keep changing while the log is compacted and every watch cut, twice: the
    // watches come back to 410 Gone and relist in the middle of the writes.
    let writer = {
        let server_store = store.clone();
        tokio::spawn(async move {
            for round in 1..=300u32 {
                let i = round % N;
                let (_, slice) = service_and_slice(i, i + round);
                vswitch_apiserver::load(&server_store, &slice).expect("slice");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        store.compact();
        store.cut_watches();
    }
    writer.await.expect("writer");
    converged(&rec, &store, "the tables after the writes and relists").await;
    let stats = watch.stats();
    assert!(stats.relists >= 2, "{stats:?}");
    // Every table handed over was whole: never fewer Services than there are.
    let sizes: Vec<usize> = rec.services().iter().map(Vec::len).collect();
    assert!(sizes.iter().all(|s| *s == base), "{sizes:?}");
    eprintln!(
        "{} Service tables applied during 300 writes and 2 relists: {stats:?}",
        sizes.len()
    );
}

/// Two API servers with the same objects, as an HA control plane's members share etcd; the
/// `kubernetes` Service's EndpointSlice lists both. The watch starts on the first; when it goes
/// away for good the watch moves to the second (issue 24 point 3), and a change made there
/// reaches the tables, which stayed as they were in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_moves_to_another_api_server_address_when_its_own_is_away() {
    let mut a = stand_in().await;
    let port = a.url().rsplit(':').next().unwrap().parse::<u16>().unwrap();
    let b_addr = format!("127.0.0.2:{port}").parse().unwrap();
    let Ok(b) = ApiServer::start(b_addr, options()).await else {
        eprintln!("127.0.0.2:{port} is taken; nothing to test on this machine");
        return;
    };
    for f in [
        "namespaces.json",
        "nodes.json",
        "services.json",
        "endpointslices.json",
        "pods.json",
        "networkpolicies.json",
    ] {
        b.load(&fixture_json(f)).expect(f);
    }
    let api = serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "kubernetes", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "kubernetes"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true}},
                      {"addresses": ["127.0.0.2"], "conditions": {"ready": true}}],
        "ports": [{"name": "https", "protocol": "TCP", "port": port}]
    });
    for s in [&a, &b] {
        delete(
            &s.store,
            "discovery.k8s.io",
            "endpointslices",
            "default",
            "kubernetes",
        );
        s.load(&api).expect("the kubernetes EndpointSlice");
    }
    let rec = Arc::new(Recorder::default());
    let kc = kube::Config::new(a.url().parse().unwrap());
    let watch = K8sWatch::spawn_with_failover(kc, settings(), rec.clone(), Duration::from_secs(1))
        .expect("watch");
    converged(&rec, &a.store, "the first tables, from the first server").await;

    // The first server goes away; the second changes meanwhile (a Service deleted).
    a.stop().await;
    let applied = rec.services().len();
    delete(&b.store, "", "services", "default", "web");
    wait_until(
        "the watch on the second server",
        Duration::from_secs(30),
        || {
            let (p, s) = expected(&b.store);
            rec.peers().last() == Some(&p) && rec.services().last() == Some(&s)
        },
    )
    .await;
    // Nothing but whole tables was applied in between.
    for s in &rec.services()[applied..] {
        assert!(
            s.len() >= expected(&b.store).1.len(),
            "a partial table: {s:?}"
        );
    }
    assert!(watch.stats().synced);
}

/// The last applied table's Service `name` in `default`, if any.
fn applied(rec: &Recorder, name: &str) -> Option<ServiceSpec> {
    rec.services()
        .last()?
        .iter()
        .find(|s| s.namespace == "default" && s.name == name)
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_follow_kube_proxy_over_the_api() {
    // Issue 25 through real HTTP: a rollout renumbering a named port (a second slice with
    // another number), a LoadBalancer's ingress address, a Service of another proxy, and the
    // node's zone from its label.
    let server = stand_in().await;
    let roll = serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "roll", "namespace": "default"},
        "spec": {"clusterIP": "10.96.70.7", "type": "LoadBalancer",
                 "externalTrafficPolicy": "Local", "healthCheckNodePort": 32070,
                 "ports": [{"name": "http", "port": 80, "targetPort": "http", "nodePort": 30070}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.70", "ipMode": "VIP"}]}}
    });
    let slice = |name: &str, port: u16, ips: &[&str]| {
        serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "default",
                "labels": {"kubernetes.io/service-name": "roll"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": ips.iter().map(|ip| serde_json::json!({
                "addresses": [ip], "conditions": {"ready": true}, "nodeName": "node-a",
                "hints": {"forZones": [{"name": "zone-a"}]}
            })).collect::<Vec<_>>()
        })
    };
    let mesh = serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "meshed", "namespace": "default",
            "labels": {"service.kubernetes.io/service-proxy-name": "mesh"}},
        "spec": {"clusterIP": "10.96.70.8", "ports": [{"port": 80}]}
    });
    for o in [
        &roll,
        &slice("roll-old", 8080, &["10.244.0.70", "10.244.0.71"]),
        &mesh,
    ] {
        server.load(o).expect("object");
    }
    let rec = Arc::new(Recorder::default());
    let _watch = K8sWatch::spawn(client(&server), settings(), rec.clone());
    wait_until("roll applied", Duration::from_secs(20), || {
        applied(&rec, "roll").is_some_and(|s| s.endpoints.len() == 2)
    })
    .await;
    let s = applied(&rec, "roll").unwrap();
    assert_eq!(
        s.load_balancer_ips,
        ["203.0.113.70".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(s.health_check_node_port, Some(32070));
    assert_eq!(s.endpoints[0].for_zones, ["zone-a"]);
    let meshed = applied(&rec, "meshed").expect("kept for DNS");
    assert_eq!(meshed.proxy_name.as_deref(), Some("mesh"));

    // The new pods come with their own number in a slice of their own: both are kept, each
    // with its number (no vote, nothing dropped).
    server
        .load(&slice("roll-new", 8081, &["10.244.0.72"]))
        .expect("slice");
    wait_until("the new slice applied", Duration::from_secs(20), || {
        applied(&rec, "roll").is_some_and(|s| s.endpoints.len() == 3)
    })
    .await;
    let s = applied(&rec, "roll").unwrap();
    let ports: Vec<(String, Option<u16>)> = s
        .endpoints
        .iter()
        .map(|e| (e.ip.to_string(), e.target_port(&s.ports[0])))
        .collect();
    assert_eq!(
        ports,
        [
            ("10.244.0.70".to_string(), Some(8080)),
            ("10.244.0.71".to_string(), Some(8080)),
            ("10.244.0.72".to_string(), Some(8081)),
        ]
    );

    // node-a gets a zone label: the sink is told.
    let mut node_a: Value = fixture_json("nodes.json")["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["metadata"]["name"] == "node-a")
        .cloned()
        .expect("node-a");
    node_a["apiVersion"] = "v1".into();
    node_a["kind"] = "Node".into();
    node_a["metadata"]["labels"]["topology.kubernetes.io/zone"] = "zone-a".into();
    node_a["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    server.load(&node_a).expect("node-a");
    wait_until("the zone applied", Duration::from_secs(20), || {
        rec.zone.lock().unwrap().as_deref() == Some("zone-a")
    })
    .await;
}
