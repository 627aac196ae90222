//! The Kubernetes API as the source of truth for peers, Services and NetworkPolicy.
//!
//! Why this shape:
//! - kube's `watcher` + `reflector` do the hard part of being a correct API client: list, then
//!   watch from the list's resourceVersion, follow BOOKMARKs, relist after a 410 Gone or any
//!   watch error (with client-go's backoff via `.default_backoff()`), and swap a relisted store in
//!   whole at the end of the list. We keep six such stores (Nodes, Services, EndpointSlices for
//!   the tables; NetworkPolicies, Namespaces, Pods for policy, trimmed as they arrive, see
//!   [`policy`]) and never act on individual events.
//! - Events only mark a table dirty. A single loop waits until nothing has happened for
//!   `debounce` (at most `max_delay` after the first event of a burst), takes a snapshot of the
//!   stores, converts it with the pure [`convert`] functions and hands the result to a
//!   [`ClusterSink`] as one `apply_peers` / `apply_services` call, each of which the daemon
//!   publishes as one atomic table swap. A rolling update that touches fifty EndpointSlices is
//!   one swap, not fifty, and a table is never built from a half-read list: nothing is applied
//!   before all three stores have finished their first list, and a relist only becomes visible
//!   when it is complete. Until then the daemon keeps the tables it has.
//! - Only what changed is converted again: the watch notes which Services and EndpointSlices
//!   an event touched ([`ServiceChanges`]), and [`services`] converts those Services alone,
//!   handing the sink the same `Arc` for every other one; the daemon builds only the changed
//!   Services' frontends, and redoes DNS, NodePorts and routes only when a change touches them.
//!   With 10,000 Services an endpoint change costs a few milliseconds, so the default debounce
//!   (10 ms, at most `max_delay` 25 ms after the first event of a burst) keeps a change's way to
//!   the datapath under the promised 50 ms (`vswitch-lab scale` measures it).
//! - Node heartbeats do not rebuild Services and endpoint churn does not rebuild peers: each
//!   kind marks only the table it feeds (pod churn only policy), and an unchanged result is not
//!   applied again.
//! - Policy has a gate of its own: its inputs are applied once its three lists are complete,
//!   and the tables do not wait for them. An API server that refuses those lists (RBAC not
//!   updated, 403) costs NetworkPolicy, logged once, and nothing else.
//! - This node publishes its VTEP as an annotation on its own Node (ours, and flannel's so that
//!   flannel nodes route to it) from a separate task that retries with backoff, so an API
//!   server that refuses the patch never holds up the tables. The loop re-publishes when the
//!   annotations on our Node are missing or different (a recreated Node object).
//! - [`ClusterSink`] is the seam the tests use: the same watch code runs against a local HTTP
//!   server that replays recorded API responses, with a recorder in place of the daemon.

pub mod convert;
pub mod policy;
mod services;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Debug;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use conf::api::{KubernetesResponse, ProgrammingLatency};
use conf::config::{KubernetesConfig, PeerSpec};
use conf::Config;
use futures::StreamExt;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use self::policy::PolicyPod;
use super::policy::PolicyInputs;
use super::ClusterSink;

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("kubernetes.kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        source: kube::config::KubeconfigError,
    },
    #[error("kubeconfig from $KUBECONFIG: {0}")]
    KubeconfigEnv(kube::config::KubeconfigError),
    #[error("in-cluster config (service account): {0}")]
    InCluster(kube::config::InClusterError),
    #[error(
        "no Kubernetes credentials: not in a cluster (KUBERNETES_SERVICE_HOST is unset) and no \
         kubeconfig (set kubernetes.kubeconfig or KUBECONFIG, or write ~/.kube/config): {0}"
    )]
    NoCredentials(kube::config::KubeconfigError),
    #[error("Kubernetes client: {0}")]
    Client(kube::Error),
    #[error("{0}")]
    PodCidr(String),
}

/// Counters of the watch, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct K8sStats {
    /// Errors from the watches (failed lists and watches, 410 Gone, broken streams).
    pub watch_errors: u64,
    /// Relists after the first list (each follows an error or an expired resourceVersion).
    pub relists: u64,
    /// Tables handed to the sink (peers, Services and policy inputs count separately).
    pub applies: u64,
    /// Tables the sink refused (the previous ones stay).
    pub apply_errors: u64,
    /// Successful patches of our Node's VTEP annotations.
    pub annotation_patches: u64,
    /// When a table was last applied.
    pub last_apply: Option<SystemTime>,
    /// All three lists have completed once and the first tables were applied.
    pub synced: bool,
    /// NetworkPolicies, Namespaces and Pods have been listed and the first policy inputs
    /// applied (false while the API server refuses one of those lists).
    pub policy_synced: bool,
    /// Since when every watch of Nodes, Services and EndpointSlices has been failing (the API
    /// server is away); None while one of them works.
    pub api_away_since: Option<SystemTime>,
    /// Services' features vswitch ignores, now (SCTP ports, loadBalancerSourceRanges, ...;
    /// each logged once when it appears).
    pub unsupported: u64,
}

/// How long every table watch may fail before the watch moves to another address of the API
/// server.
pub const FAILOVER_AFTER: Duration = Duration::from_secs(15);

/// How long the API server may be away before vswitchd stops saying it is ready. Forwarding
/// goes on with the last tables meanwhile and after; ready comes back with the next list.
pub const API_AWAY_GRACE: Duration = Duration::from_secs(60);

impl K8sStats {
    /// Ready at `now`: the first tables were applied, and the API server has not been away
    /// for longer than `grace`.
    pub fn ready_at(&self, now: SystemTime, grace: Duration) -> bool {
        let away_too_long = self
            .api_away_since
            .is_some_and(|t| now.duration_since(t).unwrap_or_default() > grace);
        self.synced && !away_too_long
    }
}

#[derive(Default)]
struct Counters {
    watch_errors: AtomicU64,
    relists: AtomicU64,
    applies: AtomicU64,
    apply_errors: AtomicU64,
    annotation_patches: AtomicU64,
    last_apply_ms: AtomicU64,
    synced: AtomicBool,
    policy_synced: AtomicBool,
    /// Per table kind (Nodes, Services, EndpointSlices): since when its watch fails, in ms
    /// since the epoch; 0 while it works.
    failing_since_ms: [AtomicU64; 3],
    /// The API server's addresses, from the `kubernetes` Service's EndpointSlices as last
    /// seen: where the watch moves when the address it uses is away.
    api_endpoints: std::sync::Mutex<Vec<std::net::SocketAddr>>,
    unsupported: AtomicU64,
    /// When the watch started, ms since the epoch.
    started_ms: AtomicU64,
    table_lists: AtomicU64,
    table_relists: AtomicU64,
    service_rebuilds: AtomicU64,
    /// From the start of the watch to the first applied tables, ms (0: not yet).
    sync_ms: AtomicU64,
    /// The same for the first policy inputs.
    policy_sync_ms: AtomicU64,
    /// In the applied Service table.
    services: AtomicU64,
    endpoints: AtomicU64,
    programming: std::sync::Mutex<Programming>,
}

/// Network programming latencies (see [`conf::api::KubernetesResponse::programming`]).
#[derive(Default)]
struct Programming {
    count: u64,
    /// (applied at, ms since the epoch; latency, µs), oldest first.
    samples: VecDeque<(u64, u64)>,
}

impl Programming {
    fn record(&mut self, applied: SystemTime, triggers: &[SystemTime]) {
        let at = applied
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        for t in triggers {
            // A trigger time after the apply is another clock's: it says nothing.
            let Ok(latency) = applied.duration_since(*t) else {
                continue;
            };
            if self.samples.len() == ProgrammingLatency::KEPT {
                self.samples.pop_front();
            }
            self.samples.push_back((at, latency.as_micros() as u64));
            self.count += 1;
        }
    }

    fn report(&self, since_ms: u64) -> ProgrammingLatency {
        let samples: Vec<(u64, u64)> = self
            .samples
            .iter()
            .filter(|(at, _)| *at >= since_ms)
            .copied()
            .collect();
        let mut sorted: Vec<u64> = samples.iter().map(|(_, l)| *l).collect();
        sorted.sort_unstable();
        let ms = |us: Option<u64>| us.map(|us| us as f64 / 1000.0);
        ProgrammingLatency {
            count: self.count,
            p50_ms: ms(conf::api::quantile(&sorted, 0.5)),
            p99_ms: ms(conf::api::quantile(&sorted, 0.99)),
            max_ms: ms(sorted.last().copied()),
            samples,
        }
    }
}

impl Counters {
    /// The watch of `kind` worked (`ok`) or failed now.
    fn watch_health(&self, kind: Kind, ok: bool) {
        let Some(i) = TABLE_KINDS.iter().position(|k| *k == kind) else {
            return;
        };
        let since = &self.failing_since_ms[i];
        if ok {
            since.store(0, Ordering::Relaxed);
        } else {
            let now = now_ms().max(1);
            let _ = since.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A cheap handle on the watch's counters (e.g. for `/metrics`).
#[derive(Clone, Default)]
pub struct K8sStatsHandle(Arc<Counters>);

impl K8sStatsHandle {
    pub fn get(&self) -> K8sStats {
        let c = &self.0;
        let ms = c.last_apply_ms.load(Ordering::Relaxed);
        K8sStats {
            watch_errors: c.watch_errors.load(Ordering::Relaxed),
            relists: c.relists.load(Ordering::Relaxed),
            applies: c.applies.load(Ordering::Relaxed),
            apply_errors: c.apply_errors.load(Ordering::Relaxed),
            annotation_patches: c.annotation_patches.load(Ordering::Relaxed),
            last_apply: (ms > 0).then(|| UNIX_EPOCH + Duration::from_millis(ms)),
            synced: c.synced.load(Ordering::Relaxed),
            policy_synced: c.policy_synced.load(Ordering::Relaxed),
            api_away_since: {
                let since: Vec<u64> = c
                    .failing_since_ms
                    .iter()
                    .map(|a| a.load(Ordering::Relaxed))
                    .collect();
                since.iter().all(|&t| t > 0).then(|| {
                    UNIX_EPOCH + Duration::from_millis(since.into_iter().max().unwrap_or(0))
                })
            },
            unsupported: c.unsupported.load(Ordering::Relaxed),
        }
    }

    /// `GET /v1/kubernetes`, with the latency samples taken at or after `since_ms`.
    pub fn kubernetes(&self, since_ms: u64) -> KubernetesResponse {
        let k = self.get();
        let c = &self.0;
        let sync_ms = c.sync_ms.load(Ordering::Relaxed);
        let policy_sync_ms = c.policy_sync_ms.load(Ordering::Relaxed);
        KubernetesResponse {
            synced: k.synced,
            sync_ms: (sync_ms > 0).then_some(sync_ms),
            policy_synced: k.policy_synced,
            policy_sync_ms: (policy_sync_ms > 0).then_some(policy_sync_ms),
            watch_errors: k.watch_errors,
            relists: k.relists,
            table_lists: c.table_lists.load(Ordering::Relaxed),
            table_relists: c.table_relists.load(Ordering::Relaxed),
            service_rebuilds: c.service_rebuilds.load(Ordering::Relaxed),
            applies: k.applies,
            apply_errors: k.apply_errors,
            services: c.services.load(Ordering::Relaxed),
            endpoints: c.endpoints.load(Ordering::Relaxed),
            programming: c
                .programming
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .report(since_ms),
        }
    }
}

/// What the watch needs to know about this node.
#[derive(Debug, Clone)]
pub struct WatchSettings {
    /// This node's name in the API.
    pub node_name: String,
    /// The pod CIDR from the config (authoritative for IPAM in this version).
    pub pod_cidr: Ipv4Net,
    /// This node's underlay address; `None`: the overlay is off, peers are not applied and
    /// nothing is published.
    pub underlay_ip: Option<IpAddr>,
    pub vtep_mac: [u8; 6],
    pub vni: u32,
    /// Publish our VTEP annotations on our Node.
    pub publish_vtep: bool,
    pub debounce: Duration,
    pub max_delay: Duration,
}

impl WatchSettings {
    pub fn from_config(config: &Config, node_name: String) -> WatchSettings {
        let k = &config.kubernetes;
        WatchSettings {
            node_name,
            pod_cidr: config.node.pod_cidr,
            underlay_ip: config.overlay.underlay_ip,
            vtep_mac: config.vtep_mac(),
            vni: config.overlay.vni,
            publish_vtep: true,
            debounce: Duration::from_millis(k.debounce_ms.into()),
            max_delay: Duration::from_millis(k.max_delay_ms.into()),
        }
    }

    fn annotations(&self) -> Option<BTreeMap<String, String>> {
        let ip = self.underlay_ip.filter(|_| self.publish_vtep)?;
        Some(convert::own_annotations(ip, self.vtep_mac, self.vni))
    }
}

/// This node's name in the API: `--node-name`, then `kubernetes.node_name`, then $NODE_NAME
/// (the downward API's spec.nodeName), then `node.name`.
pub fn node_name(flag: Option<&str>, config: &Config, env: Option<String>) -> String {
    node_name_of(flag, &config.kubernetes, &config.node.name, env)
}

/// [`node_name`] from the `[kubernetes]` settings and `node.name` alone.
pub fn node_name_of(
    flag: Option<&str>,
    k: &KubernetesConfig,
    node: &str,
    env: Option<String>,
) -> String {
    flag.map(str::to_string)
        .or_else(|| k.node_name.clone())
        .or(env.filter(|n| !n.is_empty()))
        .unwrap_or_else(|| node.to_string())
}

/// How long to wait between looks at a Node that has no pod CIDR yet (or an API not reached).
const POD_CIDR_RETRY: Duration = Duration::from_secs(2);

/// This node's pod CIDR from its Node object: the IPv4 one of `spec.podCIDRs`, else
/// `spec.podCIDR`. Waits while the Node does not exist or has none yet (the controller manager
/// allocates one soon after the node registers) or the API server is not reached, saying so
/// in the log; fails only on a client that cannot be built or a CIDR that does not parse.
pub async fn own_pod_cidr(k: &KubernetesConfig, node_name: &str) -> Result<Ipv4Net, K8sError> {
    let kc = client_config(k).await?;
    let client = kube::Client::try_from(kc).map_err(K8sError::Client)?;
    let nodes: Api<Node> = Api::all(client);
    for attempt in 0u32.. {
        let why = match nodes.get_opt(node_name).await {
            Ok(Some(n)) => {
                let spec = n.spec.unwrap_or_default();
                let listed = spec.pod_cidrs.unwrap_or_default();
                let cidrs = listed.iter().chain(spec.pod_cidr.iter());
                let mut v4 = cidrs.filter(|c| !c.contains(':'));
                match v4.next() {
                    Some(c) => {
                        let cidr = c.parse().map_err(|e| {
                            K8sError::PodCidr(format!("node {node_name}: spec.podCIDR {c:?}: {e}"))
                        })?;
                        tracing::info!("kubernetes: pod CIDR {cidr} from node {node_name}'s spec");
                        return Ok(cidr);
                    }
                    None => "has no IPv4 spec.podCIDR yet".to_string(),
                }
            }
            Ok(None) => "does not exist (yet)".to_string(),
            Err(e) => format!("cannot be read: {e}"),
        };
        if attempt % 10 == 0 {
            tracing::warn!(
                "kubernetes: node {node_name} {why}; waiting for its pod CIDR (node.pod_cidr \
                 is not set)"
            );
        }
        tokio::time::sleep(POD_CIDR_RETRY).await;
    }
    unreachable!("the loop above only ends by returning")
}

/// The client configuration: `kubernetes.kubeconfig`, then $KUBECONFIG, then the in-cluster
/// service account, then ~/.kube/config.
pub async fn client_config(k: &KubernetesConfig) -> Result<kube::Config, K8sError> {
    use kube::config::{KubeConfigOptions, Kubeconfig};
    let opts = KubeConfigOptions::default();
    if let Some(path) = &k.kubeconfig {
        let kc = Kubeconfig::read_from(path).map_err(|source| K8sError::Kubeconfig {
            path: path.display().to_string(),
            source,
        })?;
        return kube::Config::from_custom_kubeconfig(kc, &opts)
            .await
            .map_err(|source| K8sError::Kubeconfig {
                path: path.display().to_string(),
                source,
            });
    }
    if std::env::var_os("KUBECONFIG").is_some() {
        return kube::Config::from_kubeconfig(&opts)
            .await
            .map_err(K8sError::KubeconfigEnv);
    }
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        return kube::Config::incluster().map_err(K8sError::InCluster);
    }
    kube::Config::from_kubeconfig(&opts)
        .await
        .map_err(K8sError::NoCredentials)
}

/// The running watch; dropping it stops its tasks.
pub struct K8sWatch {
    stats: K8sStatsHandle,
    tasks: Vec<JoinHandle<()>>,
}

impl K8sWatch {
    /// Starts the watches, the debounce loop and the annotation publisher on the current tokio
    /// runtime.
    pub fn spawn(
        client: kube::Client,
        settings: WatchSettings,
        sink: Arc<dyn ClusterSink>,
    ) -> Self {
        Self::spawn_with(client, settings, sink, K8sStatsHandle::default())
    }

    /// Like [`K8sWatch::spawn`], and when every table watch has failed for `failover_after`
    /// (the API server it uses is away) it starts again on another address of the API server,
    /// from the `kubernetes` Service's EndpointSlices as last seen, in turn. The tables stay as
    /// they are until the new watch has listed everything. An address is reached with the TLS
    /// name `kubernetes.default.svc`, which every API server's certificate holds.
    pub fn spawn_with_failover(
        kc: kube::Config,
        settings: WatchSettings,
        sink: Arc<dyn ClusterSink>,
        failover_after: Duration,
    ) -> Result<Self, K8sError> {
        let stats = K8sStatsHandle::default();
        let client = kube::Client::try_from(kc.clone()).map_err(K8sError::Client)?;
        let first = Self::spawn_with(client, settings.clone(), sink.clone(), stats.clone());
        let task = tokio::spawn(failover_loop(
            kc,
            first,
            settings,
            sink,
            stats.clone(),
            failover_after,
        ));
        Ok(K8sWatch {
            stats,
            tasks: vec![task],
        })
    }

    fn spawn_with(
        client: kube::Client,
        settings: WatchSettings,
        sink: Arc<dyn ClusterSink>,
        stats: K8sStatsHandle,
    ) -> Self {
        let shared = Arc::new(Shared::default());
        let (stores, mut tasks) = watch_all(&client, &shared, &stats);
        let publish = Arc::new(Notify::new());
        if let Some(want) = settings.annotations() {
            publish.notify_one();
            tasks.push(tokio::spawn(publish_loop(
                Api::<Node>::all(client),
                settings.node_name.clone(),
                want,
                publish.clone(),
                stats.clone(),
            )));
        } else if settings.underlay_ip.is_none() {
            tracing::warn!(
                "overlay.underlay_ip is unset: peers from the Kubernetes API are not applied \
                 and this node publishes no VTEP, so pods on other nodes are unreachable"
            );
        }
        tasks.push(tokio::spawn(apply_loop(
            stores,
            settings,
            sink,
            shared,
            stats.clone(),
            publish,
        )));
        K8sWatch { stats, tasks }
    }

    pub fn stats(&self) -> K8sStats {
        self.stats.get()
    }

    pub fn stats_handle(&self) -> K8sStatsHandle {
        self.stats.clone()
    }
}

impl Drop for K8sWatch {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Watches the watch: moves it to the next address of the API server while the one it uses
/// is away (see [`K8sWatch::spawn_with_failover`]).
async fn failover_loop(
    kc: kube::Config,
    mut watch: K8sWatch,
    settings: WatchSettings,
    sink: Arc<dyn ClusterSink>,
    stats: K8sStatsHandle,
    failover_after: Duration,
) {
    let mut current = kc.cluster_url.clone();
    let mut moved_at = Instant::now();
    let tick = (failover_after / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        tokio::time::sleep(tick).await;
        let away = stats
            .get()
            .api_away_since
            .and_then(|t| SystemTime::now().duration_since(t).ok());
        if away.is_none_or(|a| a < failover_after) || moved_at.elapsed() < failover_after {
            continue;
        }
        let known = stats
            .0
            .api_endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(next) = next_endpoint(&current, &known) else {
            continue;
        };
        let mut to = kc.clone();
        let scheme = current.scheme_str().unwrap_or("https").to_string();
        let Ok(url) = format!("{scheme}://{next}").parse::<http::Uri>() else {
            continue;
        };
        to.cluster_url = url.clone();
        if scheme == "https" {
            to.tls_server_name = Some("kubernetes.default.svc".into());
        }
        match kube::Client::try_from(to) {
            Ok(client) => {
                tracing::warn!(
                    "kubernetes: API server {current} away for {:?}; watching through {url}",
                    away.unwrap_or_default()
                );
                drop(watch);
                watch = K8sWatch::spawn_with(client, settings.clone(), sink.clone(), stats.clone());
                current = url;
                moved_at = Instant::now();
            }
            Err(e) => tracing::warn!("kubernetes: a client for {url}: {e}"),
        }
    }
}

/// The API server address after the one `current` names, among `known` (in turn), or None
/// when there is no other.
fn next_endpoint(
    current: &http::Uri,
    known: &[std::net::SocketAddr],
) -> Option<std::net::SocketAddr> {
    let now = current.authority().map(|a| a.as_str().to_string());
    let at = known.iter().position(|a| Some(a.to_string()) == now);
    let others = known.len() - usize::from(at.is_some());
    if others == 0 {
        return None;
    }
    Some(match at {
        Some(i) => known[(i + 1) % known.len()],
        None => known[0],
    })
}

/// The API server's addresses: the ready endpoints of the `kubernetes` Service's
/// EndpointSlices in `default`, on their `https` port (or their only one).
fn api_endpoints(slices: &Store<convert::SliceLite>) -> Vec<std::net::SocketAddr> {
    let mut out = Vec::new();
    for s in slices.state() {
        let ours = s.metadata.namespace.as_deref() == Some("default")
            && s.labels()
                .get("kubernetes.io/service-name")
                .map(String::as_str)
                == Some("kubernetes");
        if !ours {
            continue;
        }
        let ports = s.ports.as_deref().unwrap_or_default();
        let port = ports
            .iter()
            .find(|p| p.name.as_deref() == Some("https"))
            .or_else(|| (ports.len() == 1).then(|| &ports[0]))
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok());
        let Some(port) = port else { continue };
        for e in &s.endpoints {
            if e.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            if let Some(a) = e.address.as_deref() {
                if let Ok(ip) = a.parse::<IpAddr>() {
                    out.push(std::net::SocketAddr::new(ip, port));
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Starts one watcher per kind, each into its store.
fn watch_all(
    client: &kube::Client,
    shared: &Arc<Shared>,
    stats: &K8sStatsHandle,
) -> (Stores, Vec<JoinHandle<()>>) {
    let (nodes, nodes_w) = reflector::store::<Node>();
    let (services, services_w) = reflector::store::<Service>();
    let (slices, slices_w) = reflector::store::<convert::SliceLite>();
    let (policies, policies_w) = reflector::store::<NetworkPolicy>();
    let (namespaces, namespaces_w) = reflector::store::<Namespace>();
    let pods = Arc::new(std::sync::Mutex::new(policy::PodStore::default()));
    let all = watcher::Config::default;
    // A finished pod's address is not its own any more: the API server leaves such pods out of
    // the list and sends a pod that finishes as DELETED.
    let running = || all().fields("status.phase!=Succeeded,status.phase!=Failed");
    let (c, sh, st) = (client, shared, stats);
    let tasks = vec![
        spawn_drive(
            Api::all(c.clone()),
            Kind::Nodes,
            nodes_w,
            strip_node,
            |_, _, _| {},
            all(),
            sh,
            st,
        ),
        spawn_drive(
            Api::all(c.clone()),
            Kind::Services,
            services_w,
            strip_service,
            note_service,
            all(),
            sh,
            st,
        ),
        spawn_drive(
            Api::all(c.clone()),
            Kind::EndpointSlices,
            slices_w,
            strip_slice,
            note_slice,
            all(),
            sh,
            st,
        ),
        spawn_drive(
            Api::all(c.clone()),
            Kind::NetworkPolicies,
            policies_w,
            policy::strip_policy,
            |_, _, _| {},
            all(),
            sh,
            st,
        ),
        spawn_drive(
            Api::all(c.clone()),
            Kind::Namespaces,
            namespaces_w,
            policy::strip_namespace,
            |_, _, _| {},
            all(),
            sh,
            st,
        ),
        spawn_drive(
            Api::all(c.clone()),
            Kind::Pods,
            PodKeeper(pods.clone()),
            policy::strip_pod,
            |_, _, _| {},
            running(),
            sh,
            st,
        ),
    ];
    let stores = Stores {
        nodes,
        services,
        slices,
        policies,
        namespaces,
        pods,
    };
    (stores, tasks)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Nodes,
    Services,
    EndpointSlices,
    NetworkPolicies,
    Namespaces,
    Pods,
}

/// The kinds that feed the peer and Service tables.
const TABLE_KINDS: [Kind; 3] = [Kind::Nodes, Kind::Services, Kind::EndpointSlices];
/// The kinds that feed NetworkPolicy.
const POLICY_KINDS: [Kind; 3] = [Kind::NetworkPolicies, Kind::Namespaces, Kind::Pods];

impl Kind {
    fn is_policy(self) -> bool {
        POLICY_KINDS.contains(&self)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Nodes => "nodes",
            Kind::Services => "services",
            Kind::EndpointSlices => "endpointslices",
            Kind::NetworkPolicies => "networkpolicies",
            Kind::Namespaces => "namespaces",
            Kind::Pods => "pods",
        })
    }
}

/// What the watch drivers tell the apply loop.
#[derive(Default)]
struct Shared {
    peers_dirty: AtomicBool,
    services_dirty: AtomicBool,
    policy_dirty: AtomicBool,
    listed: [AtomicBool; 6],
    wake: Notify,
    service_changes: std::sync::Mutex<ServiceChanges>,
}

/// A namespaced object's (namespace, name).
pub(crate) type ObjKey = (String, String);

fn obj_key<K: Resource>(o: &K) -> ObjKey {
    (
        o.meta().namespace.clone().unwrap_or_default(),
        o.meta().name.clone().unwrap_or_default(),
    )
}

/// What changed among the Services and EndpointSlices since the last rebuild, so that only
/// the Services they belong to are converted again.
#[derive(Debug, Default)]
pub(crate) struct ServiceChanges {
    /// A list completed (the first, or a relist that may have dropped objects): convert every
    /// Service again.
    pub all: bool,
    pub services: hashbrown::HashSet<ObjKey>,
    pub slices: hashbrown::HashSet<ObjKey>,
    /// The `last-change-trigger-time`s of the changed EndpointSlices.
    pub triggers: Vec<SystemTime>,
}

/// The annotation the EndpointSlice controller sets to when the change behind a slice's
/// update happened; kube-proxy measures its network programming latency from it.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

fn note_service(shared: &Shared, s: &Service, _deleted: bool) {
    shared.changes().services.insert(obj_key(s));
}

fn note_slice(shared: &Shared, s: &convert::SliceLite, deleted: bool) {
    let trigger = (!deleted)
        .then(|| s.annotations().get(TRIGGER_TIME_ANNOTATION))
        .flatten()
        .and_then(|t| {
            serde_json::from_value::<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>(
                serde_json::Value::String(t.clone()),
            )
            .ok()
        })
        .map(|t| SystemTime::from(t.0));
    let mut c = shared.changes();
    c.slices.insert(obj_key(s));
    c.triggers.extend(trigger);
}

impl Shared {
    fn changes(&self) -> std::sync::MutexGuard<'_, ServiceChanges> {
        self.service_changes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn mark(&self, kind: Kind) {
        let dirty = match kind {
            Kind::Nodes => &self.peers_dirty,
            Kind::Services | Kind::EndpointSlices => &self.services_dirty,
            Kind::NetworkPolicies | Kind::Namespaces | Kind::Pods => &self.policy_dirty,
        };
        dirty.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    fn listed(&self, kinds: &[Kind]) -> bool {
        kinds
            .iter()
            .all(|k| self.listed[*k as usize].load(Ordering::SeqCst))
    }

    /// Which tables to rebuild now, clearing their marks. Policy waits, marked, until all
    /// three of its lists are complete.
    fn take_dirty(&self) -> Dirty {
        let services = self.services_dirty.swap(false, Ordering::SeqCst);
        Dirty {
            peers: self.peers_dirty.swap(false, Ordering::SeqCst),
            // Taken after the mark is cleared: a change noted from here on marks again.
            services: services.then(|| std::mem::take(&mut *self.changes())),
            policy: self.listed(&POLICY_KINDS) && self.policy_dirty.swap(false, Ordering::SeqCst),
        }
    }
}

/// The tables to rebuild, with what changed among the Services.
#[derive(Debug)]
struct Dirty {
    peers: bool,
    services: Option<ServiceChanges>,
    policy: bool,
}

struct Stores {
    nodes: Store<Node>,
    services: Store<Service>,
    slices: Store<convert::SliceLite>,
    policies: Store<NetworkPolicy>,
    namespaces: Store<Namespace>,
    pods: Arc<std::sync::Mutex<policy::PodStore>>,
}

/// Where a watch keeps what it sees: a reflector's store, or the Pod store.
trait Keep<K>: Send + 'static {
    fn keep(&mut self, ev: &Event<K>);
}

impl<K> Keep<K> for reflector::store::Writer<K>
where
    K: Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    fn keep(&mut self, ev: &Event<K>) {
        self.apply_watcher_event(ev);
    }
}

/// The Pod watch keeps each pod as policy reads it, not the object.
struct PodKeeper(Arc<std::sync::Mutex<policy::PodStore>>);

impl Keep<PolicyPod> for PodKeeper {
    fn keep(&mut self, ev: &Event<PolicyPod>) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).apply(ev);
    }
}

/// A Service's annotations (kubectl's last-applied-configuration is a copy of the whole
/// object) are not read.
fn strip_service(s: &mut Service) {
    s.metadata.managed_fields = None;
    s.metadata.annotations = None;
}

/// Of an EndpointSlice's annotations only the change's trigger time is read (the rest of it is
/// left out as it is read, see [`convert::SliceLite`]).
fn strip_slice(s: &mut convert::SliceLite) {
    s.metadata.managed_fields = None;
    if let Some(a) = s.metadata.annotations.as_mut() {
        a.retain(|k, _| k == TRIGGER_TIME_ANNOTATION);
    }
}

/// Node objects carry image lists and conditions that can be large; none of it matters here.
fn strip_node(n: &mut Node) {
    n.managed_fields_mut().clear();
    if let Some(s) = n.status.as_mut() {
        s.images = None;
        s.conditions = None;
        s.volumes_attached = None;
        s.volumes_in_use = None;
    }
}

#[allow(clippy::too_many_arguments)]
fn spawn_drive<K>(
    api: Api<K>,
    kind: Kind,
    writer: impl Keep<K>,
    strip: fn(&mut K),
    note: fn(&Shared, &K, bool),
    config: watcher::Config,
    shared: &Arc<Shared>,
    stats: &K8sStatsHandle,
) -> JoinHandle<()>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let (shared, stats) = (shared.clone(), stats.clone());
    tokio::spawn(drive(api, kind, writer, strip, note, config, shared, stats))
}

/// Runs one watcher into its store and tells the apply loop what changed. An error is retried
/// with backoff and never stops the other watches; a list the API server refuses (403, 404) is
/// logged once, with what it costs, and retried quietly until it is allowed. `note` hears of
/// each object that changed (true: deleted) after the store has it.
#[allow(clippy::too_many_arguments)]
async fn drive<K>(
    api: Api<K>,
    kind: Kind,
    mut writer: impl Keep<K>,
    strip: fn(&mut K),
    note: fn(&Shared, &K, bool),
    config: watcher::Config,
    shared: Arc<Shared>,
    stats: K8sStatsHandle,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let stream = kube::runtime::watcher(api, config)
        .default_backoff()
        .modify(strip);
    let mut stream = std::pin::pin!(stream);
    let mut listed = false;
    let mut refused = false;
    while let Some(ev) = stream.next().await {
        if let Ok(ev) = &ev {
            writer.keep(ev);
        }
        match ev {
            Ok(Event::Init) => {
                // A retried first list is not a relist: there is no store to replace yet.
                if listed {
                    stats.0.relists.fetch_add(1, Ordering::Relaxed);
                    if TABLE_KINDS.contains(&kind) {
                        stats.0.table_relists.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::info!("kubernetes: relisting {kind}");
                }
            }
            Ok(Event::InitApply(_)) => {}
            Ok(Event::InitDone) => {
                stats.0.watch_health(kind, true);
                if std::mem::take(&mut refused) {
                    tracing::info!("kubernetes: {kind}: the API server allows the list now");
                }
                listed = true;
                shared.listed[kind as usize].store(true, Ordering::SeqCst);
                if matches!(kind, Kind::Services | Kind::EndpointSlices) {
                    shared.changes().all = true;
                }
                if TABLE_KINDS.contains(&kind) {
                    stats.0.table_lists.fetch_add(1, Ordering::Relaxed);
                }
                shared.mark(kind);
            }
            Ok(Event::Apply(o)) => {
                stats.0.watch_health(kind, true);
                note(&shared, &o, false);
                shared.mark(kind)
            }
            Ok(Event::Delete(o)) => {
                stats.0.watch_health(kind, true);
                note(&shared, &o, true);
                shared.mark(kind)
            }
            Err(e) => {
                stats.0.watch_errors.fetch_add(1, Ordering::Relaxed);
                // A refusal is an answer: the server is there.
                stats.0.watch_health(kind, refusal(&e).is_some());
                match (&e, refusal(&e)) {
                    (_, Some(s)) if refused => tracing::debug!("kubernetes: {kind}: {s}"),
                    (_, Some(s)) => {
                        refused = true;
                        tracing::error!("{}", refused_message(kind, &s));
                    }
                    (watcher::Error::WatchError(s), _) if s.code == 410 => tracing::info!(
                        "kubernetes: {kind} watch expired (410 Gone: {}); relisting",
                        s.message
                    ),
                    _ => tracing::warn!("kubernetes: {kind}: {e}; retrying with backoff"),
                }
            }
        }
    }
}

/// The API server's refusal to list or watch a kind at all: 403 (this service account may not)
/// or 404 (the server does not serve it), as `code reason: message`.
fn refusal(e: &watcher::Error) -> Option<String> {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
            if s.code == 403 || s.code == 404 =>
        {
            Some(format!("{} {}: {}", s.code, s.reason, s.message))
        }
        _ => None,
    }
}

fn refused_message(kind: Kind, status: &str) -> String {
    let fix = "the ClusterRole in deploy/kubernetes/10-rbac.yaml grants what vswitchd needs";
    if kind.is_policy() {
        format!(
            "kubernetes: the API server refuses to list {kind} ({status}): NetworkPolicy is not \
             enforced until it allows list and watch on networkpolicies (networking.k8s.io), \
             namespaces and pods; {fix}. Peers and Services are not affected; retrying quietly"
        )
    } else {
        format!(
            "kubernetes: the API server refuses to list {kind} ({status}): the tables from the \
             config file stay in force until it allows it; {fix}. Retrying quietly"
        )
    }
}

/// Logs each distinct problem once, when it first appears.
#[derive(Default)]
struct ProblemLog(BTreeSet<String>);

impl ProblemLog {
    fn update(&mut self, problems: Vec<String>) {
        let now: BTreeSet<String> = problems.into_iter().collect();
        for p in now.difference(&self.0) {
            tracing::warn!("kubernetes: {p}");
        }
        self.0 = now;
    }
}

/// Waits for changes, debounces them, converts complete snapshots and applies them.
async fn apply_loop(
    stores: Stores,
    settings: WatchSettings,
    sink: Arc<dyn ClusterSink>,
    shared: Arc<Shared>,
    stats: K8sStatsHandle,
    publish: Arc<Notify>,
) {
    let started = Instant::now();
    stats.0.started_ms.store(now_ms(), Ordering::Relaxed);
    while !shared.listed(&TABLE_KINDS) {
        if tokio::time::timeout(Duration::from_secs(30), shared.wake.notified())
            .await
            .is_err()
        {
            let missing: Vec<String> = TABLE_KINDS
                .iter()
                .filter(|k| !shared.listed[**k as usize].load(Ordering::SeqCst))
                .map(|k| k.to_string())
                .collect();
            tracing::warn!(
                "kubernetes: still waiting for the first list of {} after {:?}; keeping the \
                 tables from the config file",
                missing.join(", "),
                started.elapsed()
            );
        }
    }
    let mut state = ApplyState::default();
    let mut dirty = shared.take_dirty();
    dirty.peers = true;
    let mut changes = dirty.services.take().unwrap_or_default();
    changes.all = true;
    dirty.services = Some(changes);
    state.rebuild(dirty, &stores, &settings, &*sink, &stats, &publish);
    stats.0.synced.store(true, Ordering::Relaxed);
    stats.0.sync_ms.store(
        (started.elapsed().as_millis() as u64).max(1),
        Ordering::Relaxed,
    );
    tracing::info!(
        "kubernetes: synced {} nodes, {} services, {} endpointslices in {:?}",
        stores.nodes.len(),
        stores.services.len(),
        stores.slices.len(),
        started.elapsed()
    );
    loop {
        shared.wake.notified().await;
        let first = Instant::now();
        let hard = first + settings.max_delay;
        let mut deadline = (first + settings.debounce).min(hard);
        loop {
            tokio::select! {
                _ = shared.wake.notified() => {
                    deadline = (Instant::now() + settings.debounce).min(hard);
                }
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let dirty = shared.take_dirty();
        state.rebuild(dirty, &stores, &settings, &*sink, &stats, &publish);
    }
}

#[derive(Default)]
struct ApplyState {
    peers: Option<Vec<PeerSpec>>,
    /// A Service table was applied once.
    services_applied: bool,
    /// The sink refused the last one.
    services_refused: bool,
    converter: services::ServiceConverter,
    policy: Option<PolicyInputs>,
    node_problems: ProblemLog,
    service_problems: ProblemLog,
    policy_problems: ProblemLog,
    own_node_note: Option<String>,
}

impl ApplyState {
    fn rebuild(
        &mut self,
        dirty: Dirty,
        stores: &Stores,
        settings: &WatchSettings,
        sink: &dyn ClusterSink,
        stats: &K8sStatsHandle,
        publish: &Notify,
    ) {
        if dirty.peers {
            self.rebuild_peers(stores, settings, sink, stats, publish);
        }
        if let Some(changes) = dirty.services {
            self.rebuild_services(changes, stores, sink, stats);
            let api = api_endpoints(&stores.slices);
            if !api.is_empty() {
                *stats
                    .0
                    .api_endpoints
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = api;
            }
        }
        if dirty.policy {
            self.rebuild_policy(stores, sink, stats);
        }
    }

    fn rebuild_peers(
        &mut self,
        stores: &Stores,
        settings: &WatchSettings,
        sink: &dyn ClusterSink,
        stats: &K8sStatsHandle,
        publish: &Notify,
    ) {
        let nodes = stores.nodes.state();
        self.check_own_node(&nodes, settings, publish);
        let zone = convert::node_zone(&nodes, &settings.node_name);
        if let Err(e) = sink.apply_zone(zone) {
            tracing::error!("kubernetes: topology zone refused: {e}");
        }
        let mut problems = Vec::new();
        let peers = convert::peers_from_nodes(
            nodes.iter().map(|n| &**n),
            &settings.node_name,
            &mut problems,
        );
        let peers = convert::usable_peers(
            peers,
            settings.pod_cidr,
            settings.underlay_ip,
            &mut problems,
        );
        self.node_problems.update(problems);
        if settings.underlay_ip.is_some() && self.peers.as_ref() != Some(&peers) {
            let names: Vec<&str> = peers.iter().map(|p| p.name.as_str()).collect();
            let summary = names.join(", ");
            match sink.apply_peers(peers.clone()) {
                Ok(()) => {
                    applied(stats);
                    tracing::info!("kubernetes: {} peer(s): {summary}", names.len());
                    self.peers = Some(peers);
                }
                Err(e) => {
                    stats.0.apply_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!("kubernetes: peers refused, keeping the previous ones: {e}");
                }
            }
        }
    }

    /// Converts the Services `changes` touched again and applies the table when it changed.
    /// A table the sink refuses is converted whole with the next change.
    fn rebuild_services(
        &mut self,
        mut changes: ServiceChanges,
        stores: &Stores,
        sink: &dyn ClusterSink,
        stats: &K8sStatsHandle,
    ) {
        changes.all |= std::mem::take(&mut self.services_refused);
        let full = changes.all;
        stats.0.service_rebuilds.fetch_add(1, Ordering::Relaxed);
        let changed = self
            .converter
            .update(&changes, &stores.services, &stores.slices);
        let problems = self.converter.problems();
        let unsupported = problems
            .iter()
            .filter(|p| p.contains(convert::UNSUPPORTED))
            .count();
        stats
            .0
            .unsupported
            .store(unsupported as u64, Ordering::Relaxed);
        self.service_problems.update(problems);
        if changed || !self.services_applied {
            let services = self.converter.specs();
            let n = services.len();
            let eps: usize = services.iter().map(|s| s.endpoints.len()).sum();
            match sink.apply_services(services) {
                Ok(()) => {
                    applied(stats);
                    stats.0.services.store(n as u64, Ordering::Relaxed);
                    stats.0.endpoints.store(eps as u64, Ordering::Relaxed);
                    tracing::debug!("kubernetes: {n} service(s), {eps} endpoint(s)");
                    self.services_applied = true;
                }
                Err(e) => {
                    stats.0.apply_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!("kubernetes: services refused, keeping the previous ones: {e}");
                    self.services_refused = true;
                    return;
                }
            }
        }
        // Applied, or nothing to apply (a change that made no difference to the table): the
        // datapath has what these changes asked for.
        stats
            .0
            .programming
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(SystemTime::now(), &changes.triggers);
        if full {
            trim_after("a full list of Services and EndpointSlices");
        }
    }

    /// Policy's inputs from the NetworkPolicy, Namespace and Pod stores; never the peer or
    /// Service tables. A reading equal to the last one applied (a pod's status changed, not its
    /// address or labels) is not applied again.
    fn rebuild_policy(&mut self, stores: &Stores, sink: &dyn ClusterSink, stats: &K8sStatsHandle) {
        let policies = stores.policies.state();
        let namespaces = stores.namespaces.state();
        let pods = stores.pods.lock().unwrap_or_else(|p| p.into_inner());
        let inputs = policy::inputs_from_store(
            policies.iter().map(|p| &**p),
            namespaces.iter().map(|n| &**n),
            &pods,
        );
        drop(pods);
        self.policy_problems.update(inputs.problems.clone());
        if self.policy.as_ref().is_some_and(|p| p.same_as(&inputs)) {
            return;
        }
        let summary = format!(
            "{} NetworkPolicies, {} namespaces, {} pod addresses ({} objects left out)",
            inputs.set.len(),
            namespaces.len(),
            inputs.pods.len(),
            inputs.problems.len()
        );
        match sink.apply_policy(inputs.clone()) {
            Ok(()) => {
                applied(stats);
                if self.policy.is_none() {
                    let took = now_ms().saturating_sub(stats.0.started_ms.load(Ordering::Relaxed));
                    tracing::info!("kubernetes: NetworkPolicy synced in {took} ms: {summary}");
                    stats.0.policy_sync_ms.store(took.max(1), Ordering::Relaxed);
                    stats.0.policy_synced.store(true, Ordering::Relaxed);
                    trim_after("the first list of NetworkPolicies, Namespaces and Pods");
                } else {
                    tracing::debug!("kubernetes: NetworkPolicy: {summary}");
                }
                self.policy = Some(inputs);
            }
            Err(e) => {
                stats.0.apply_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    "kubernetes: NetworkPolicy inputs refused, keeping the previous ones: {e}"
                );
            }
        }
    }

    /// Compares our Node with the config and re-publishes our annotations when they are gone.
    fn check_own_node(&mut self, nodes: &[Arc<Node>], settings: &WatchSettings, publish: &Notify) {
        let own = nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(settings.node_name.as_str()));
        let note =
            match own {
                None => Some(format!(
                    "node {:?} is not in the API's node list; check --node-name / NODE_NAME / \
                 kubernetes.node_name",
                    settings.node_name
                )),
                Some(n) => match convert::node_pod_cidrs(n) {
                    Ok(c) if c.is_empty() || c.contains(&settings.pod_cidr) => None,
                    Ok(c) => Some(format!(
                    "node {:?} has pod CIDR {} in the API but node.pod_cidr is {} in the config; \
                     the config stays authoritative for pod addresses in this version, so other \
                     nodes will route {} here while pods get addresses from {}: make them agree",
                    settings.node_name,
                    c.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(","),
                    settings.pod_cidr,
                    c[0],
                    settings.pod_cidr
                )),
                    Err(e) => Some(format!("node {:?}: {e}", settings.node_name)),
                },
            };
        if note != self.own_node_note {
            if let Some(n) = &note {
                tracing::warn!("kubernetes: {n}");
            }
            self.own_node_note = note;
        }
        if let (Some(n), Some(want)) = (own, settings.annotations()) {
            if !convert::has_annotations(n, &want) {
                publish.notify_one();
            }
        }
    }
}

/// Gives the heap's freed pages back after large transient work (see
/// [`crate::datapath::memory`]).
fn trim_after(what: &str) {
    let freed = crate::datapath::memory::trim();
    tracing::debug!("kubernetes: {} MiB returned after {what}", freed >> 20);
}

fn applied(stats: &K8sStatsHandle) {
    stats.0.applies.fetch_add(1, Ordering::Relaxed);
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(1);
    stats.0.last_apply_ms.store(ms.max(1), Ordering::Relaxed);
}

/// Patches our Node's annotations whenever asked, retrying with backoff until it works.
async fn publish_loop(
    api: Api<Node>,
    node: String,
    want: BTreeMap<String, String>,
    trigger: Arc<Notify>,
    stats: K8sStatsHandle,
) {
    let patch = serde_json::json!({ "metadata": { "annotations": want } });
    let params = PatchParams {
        field_manager: Some("vswitchd".into()),
        ..PatchParams::default()
    };
    loop {
        trigger.notified().await;
        let mut backoff = Duration::from_secs(1);
        loop {
            match api.patch(&node, &params, &Patch::Merge(&patch)).await {
                Ok(_) => {
                    stats.0.annotation_patches.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        "kubernetes: published this node's VTEP on node {node}: {}",
                        want.get(convert::VTEP_ANNOTATION)
                            .map(String::as_str)
                            .unwrap_or_default()
                    );
                    break;
                }
                Err(e) => {
                    tracing::warn!(
                        "kubernetes: annotating node {node} with its VTEP: {e}; retrying in \
                         {backoff:?}"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
        }
        // Someone else rewriting the annotations must not turn this into a hot loop.
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// Starts the watch of the Kubernetes API for this node (`node_name_flag`, or as the config
/// says) into `sink`. Must be called on the daemon's tokio runtime.
pub async fn start(
    config: &Config,
    node_name_flag: Option<&str>,
    sink: Arc<dyn ClusterSink>,
) -> Result<K8sWatch, K8sError> {
    let name = node_name(node_name_flag, config, std::env::var("NODE_NAME").ok());
    if name != config.node.name {
        tracing::info!(
            "kubernetes: this is node {name:?} in the API (node.name in the config is {:?})",
            config.node.name
        );
    }
    if !config.peers.is_empty() || !config.services.is_empty() {
        tracing::warn!(
            "kubernetes: the config file's peers and services are used only until the first \
             list from the API completes"
        );
    }
    let kc = client_config(&config.kubernetes).await?;
    tracing::info!("kubernetes: API server {}", kc.cluster_url);
    let settings = WatchSettings::from_config(config, name);
    K8sWatch::spawn_with_failover(kc, settings, sink, FAILOVER_AFTER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_is_away_only_while_every_table_watch_fails_and_ready_waits_out_the_grace() {
        let h = K8sStatsHandle::default();
        h.0.synced.store(true, Ordering::Relaxed);
        let now = SystemTime::now();
        assert!(h.get().ready_at(now, API_AWAY_GRACE));
        // Services and EndpointSlices fail, Nodes still works: not away.
        h.0.watch_health(Kind::Services, false);
        h.0.watch_health(Kind::EndpointSlices, false);
        // A policy kind does not count.
        h.0.watch_health(Kind::Pods, false);
        assert_eq!(h.get().api_away_since, None);
        h.0.watch_health(Kind::Nodes, false);
        let since = h.get().api_away_since.expect("every table watch fails");
        // Ready through the grace, not after it.
        assert!(h.get().ready_at(since + API_AWAY_GRACE, API_AWAY_GRACE));
        assert!(!h.get().ready_at(since + API_AWAY_GRACE * 2, API_AWAY_GRACE));
        // One watch back: ready again.
        h.0.watch_health(Kind::Nodes, true);
        assert!(h.get().ready_at(since + API_AWAY_GRACE * 2, API_AWAY_GRACE));
        // Never ready before the first sync, API or not.
        h.0.synced.store(false, Ordering::Relaxed);
        assert!(!h.get().ready_at(now, API_AWAY_GRACE));
    }

    #[test]
    fn only_a_refused_list_or_watch_is_a_refusal() {
        use kube::core::Status;
        let api =
            |code| kube::Error::Api(Status::failure("no", "Forbidden").with_code(code).boxed());
        let forbidden = watcher::Error::InitialListFailed(api(403));
        assert_eq!(refusal(&forbidden).as_deref(), Some("403 Forbidden: no"));
        assert!(refusal(&watcher::Error::WatchStartFailed(api(404))).is_some());
        assert!(refusal(&watcher::Error::InitialListFailed(api(500))).is_none());
        let gone =
            watcher::Error::WatchError(Status::failure("old", "Expired").with_code(410).boxed());
        assert!(refusal(&gone).is_none());
        let m = refused_message(Kind::NetworkPolicies, "403 Forbidden: no");
        assert!(
            m.contains("NetworkPolicy is not enforced") && m.contains("10-rbac.yaml"),
            "{m}"
        );
        assert!(refused_message(Kind::Nodes, "403").contains("config file"));
    }

    #[test]
    fn node_name_precedence() {
        let mut c = Config::parse("[node]\nname = \"cfg\"\npod_cidr = \"10.244.1.0/24\"\n")
            .expect("config");
        assert_eq!(node_name(None, &c, None), "cfg");
        assert_eq!(node_name(None, &c, Some(String::new())), "cfg");
        assert_eq!(node_name(None, &c, Some("env".into())), "env");
        c.kubernetes.node_name = Some("section".into());
        assert_eq!(node_name(None, &c, Some("env".into())), "section");
        assert_eq!(node_name(Some("flag"), &c, Some("env".into())), "flag");
    }
}
