//! `vswitch-lab scale`: vswitchd in Kubernetes mode against a cluster of the size issue 23
//! promises (5,000 nodes, 10,000 Services, 100,000 endpoints in EndpointSlices of up to 100,
//! 100,000 pods), served by the API server stand-in over real HTTP.
//!
//! Two one-node labs in Kubernetes mode, one after the other:
//! 1. an empty cluster (only the lab's node): the CNI ADD and DEL times and the resident
//!    memory with no Services;
//! 2. the large cluster, generated here and loaded into the stand-in before vswitchd starts:
//!    - the initial sync: vswitchd's own `sync_ms` (from the start of its watch to the first
//!      applied tables, `GET /v1/kubernetes`) and the time until it says ready;
//!    - isolated endpoint changes (`--isolated` of them, 10 a second) and a sustained burst
//!      (`--changes` at `--rate` a second), made by the stand-in as the EndpointSlice controller
//!      makes them (`POST /_standin/churn`): one endpoint's readiness flipped per update, stamped
//!      with `endpoints.kubernetes.io/last-change-trigger-time`. The latency of each is what
//!      vswitchd measures from that stamp to the applied table (kube-proxy's network programming
//!      latency), read back with `GET /v1/kubernetes?since_ms=`; the CPU vswitchd used during
//!      the burst comes from /proc/PID/stat;
//!    - the CNI ADD and DEL times again, and the resident memory after all of it.
//!
//! The per-packet cost of Service translation at this size is `cargo bench -p vswitch --bench
//! services` (a datapath microbenchmark, not a lab run).

use std::fmt::Write as _;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use conf::api::{quantile, KubernetesResponse, PATH_KUBERNETES};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::bench::cpu::{read_pids_cpu, ticks_per_second};
use crate::soak::rss_kb;
use crate::{Lab, LabError, LabGuard, LabSpec, UpOptions};

/// The targets of issue 23.
pub const TARGET_P99_MS: f64 = 50.0;
pub const TARGET_SYNC_MS: u64 = 10_000;
pub const TARGET_RSS_MIB: f64 = 256.0;
pub const TARGET_CNI_RATIO: f64 = 1.2;
pub const TARGET_CORES: f64 = 1.0;

#[derive(Debug, Clone)]
pub struct ScaleOptions {
    pub name: String,
    pub nodes: u32,
    pub services: u32,
    pub endpoints: u32,
    pub pods: u32,
    /// Endpoints per EndpointSlice, at most.
    pub slice_max: u32,
    pub isolated: u32,
    pub changes: u32,
    pub rate: u32,
    pub cni_reps: u32,
    /// Where to write latest JSON/text and the chart; None: nowhere.
    pub out_dir: Option<PathBuf>,
    /// Leave the large cluster's lab up afterwards (`vswitch-lab --name NAME down` ends it).
    pub keep: bool,
}

impl Default for ScaleOptions {
    fn default() -> Self {
        ScaleOptions {
            name: "vscale".into(),
            nodes: 5_000,
            services: 10_000,
            endpoints: 100_000,
            pods: 100_000,
            slice_max: 100,
            isolated: 200,
            changes: 1_000,
            rate: 100,
            cni_reps: 20,
            out_dir: None,
            keep: false,
        }
    }
}

/// Latencies of a set of changes, ms.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    fn of(samples_us: &[u64]) -> Latency {
        let mut s = samples_us.to_vec();
        s.sort_unstable();
        let ms = |q: f64| quantile(&s, q).unwrap_or(0) as f64 / 1000.0;
        Latency {
            samples: s.len(),
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            max_ms: ms(1.0),
        }
    }
}

/// A burst of changes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Churn {
    pub changes: u32,
    pub rate: u32,
    /// How long the stand-in took to make them.
    pub seconds: f64,
    /// Writes the stand-in made more than one interval late (it fell behind, not vswitchd).
    pub behind: u64,
    pub latency: Latency,
    /// vswitchd's CPU over the burst and until it caught up, in cores.
    pub cores: f64,
    /// Tables applied during the burst.
    pub applies: u64,
    /// Every change's latency, ms, in the order applied (for the chart).
    #[serde(default)]
    pub samples_ms: Vec<f64>,
}

/// Medians of CNI ADD and DEL, ms.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Cni {
    pub add_ms: f64,
    pub del_ms: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScaleReport {
    pub date: String,
    pub commit: String,
    pub machine: String,
    pub nodes: u32,
    pub services: u32,
    pub endpoints: u32,
    pub endpoint_slices: u32,
    pub pods: u32,
    /// vswitchd's own figure: from the start of its watch to the first applied tables.
    pub sync_ms: u64,
    /// The same to the first NetworkPolicy inputs (NetworkPolicies, Namespaces, Pods).
    pub policy_sync_ms: u64,
    /// `up` of the large lab: the stand-in loading the cluster, the node's namespace, and
    /// vswitchd from its start to ready.
    pub up_ms: u64,
    /// Services and endpoints in vswitchd's table once synced.
    pub table_services: u64,
    pub table_endpoints: u64,
    pub rss_empty_mib: f64,
    pub rss_synced_mib: f64,
    pub rss_after_mib: f64,
    pub isolated: Churn,
    pub sustained: Churn,
    /// Pod label changes at the sustained rate (`churn?kind=pods`): every one is a new
    /// NetworkPolicy reading of the 100,000 pods. CPU only (a Pod carries no trigger time).
    #[serde(default)]
    pub pod_churn: Churn,
    pub cni_empty: Cni,
    pub cni_loaded: Cni,
    /// Every watch cut after a compaction (410 Gone on resuming): from the cut until every
    /// table kind relisted and the tables were applied again, ms; and the fewest Services
    /// vswitchd's table held meanwhile (it keeps its last complete tables).
    pub relist_ms: u64,
    pub relist_min_services: u64,
    /// A restart of vswitchd (a rolling update's handover) with the cluster loaded: ready and
    /// its own sync.
    pub restart_ready_ms: u64,
    pub restart_sync_ms: u64,
}

impl ScaleReport {
    /// The targets missed, each as a sentence.
    /// The highest resident memory measured with the cluster loaded, MiB.
    fn rss_peak(&self) -> f64 {
        self.rss_synced_mib.max(self.rss_after_mib)
    }

    /// CNI ADD and DEL with the cluster loaded against the empty cluster's (0: no baseline).
    fn cni_ratios(&self) -> [(&'static str, f64, f64, f64); 2] {
        let (e, l) = (&self.cni_empty, &self.cni_loaded);
        [
            ("ADD", e.add_ms, l.add_ms, ratio(l.add_ms, e.add_ms)),
            ("DEL", e.del_ms, l.del_ms, ratio(l.del_ms, e.del_ms)),
        ]
    }

    /// Whether each target was met: initial sync, NetworkPolicy sync, p99, cores, memory,
    /// CNI ADD, CNI DEL.
    fn met(&self) -> [bool; 7] {
        let [add, del] = self.cni_ratios().map(|(_, _, _, r)| r <= TARGET_CNI_RATIO);
        [
            self.sync_ms <= TARGET_SYNC_MS,
            self.policy_sync_ms <= TARGET_SYNC_MS,
            self.isolated.latency.p99_ms <= TARGET_P99_MS,
            self.sustained.cores <= TARGET_CORES,
            self.rss_peak() <= TARGET_RSS_MIB,
            add,
            del,
        ]
    }

    /// The targets missed, each as a sentence.
    pub fn misses(&self) -> Vec<String> {
        let [sync, policy_sync, p99, cores, rss, add, del] = self.met();
        let mut m = Vec::new();
        if !p99 {
            m.push(format!(
                "an endpoint change reached the datapath in {:.1} ms (p99), over {TARGET_P99_MS} ms",
                self.isolated.latency.p99_ms
            ));
        }
        if !cores {
            m.push(format!(
                "{} changes a second took {:.2} cores, over {TARGET_CORES}",
                self.sustained.rate, self.sustained.cores
            ));
        }
        if !sync {
            m.push(format!(
                "the initial sync took {} ms, over {TARGET_SYNC_MS} ms",
                self.sync_ms
            ));
        }
        if !policy_sync {
            m.push(format!(
                "the initial NetworkPolicy sync took {} ms, over {TARGET_SYNC_MS} ms",
                self.policy_sync_ms
            ));
        }
        if !rss {
            m.push(format!(
                "vswitchd's resident memory reached {:.0} MiB, over {TARGET_RSS_MIB} MiB",
                self.rss_peak()
            ));
        }
        for ((what, _, _, r), met) in self.cni_ratios().into_iter().zip([add, del]) {
            if !met {
                m.push(format!(
                    "a CNI {what} took {r:.2}x its time with no Services, over {TARGET_CNI_RATIO}x"
                ));
            }
        }
        m
    }

    pub fn to_text(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "vswitch-lab scale, {} (commit {}), {}\n\
             cluster: {} nodes, {} Services, {} endpoints in {} EndpointSlices, {} pods\n",
            self.date,
            self.commit,
            self.machine,
            self.nodes,
            self.services,
            self.endpoints,
            self.endpoint_slices,
            self.pods
        );
        let ok = |pass: bool| if pass { "ok" } else { "MISSED" };
        let [sync, policy_sync, p99, cores, rss, add, del] = self.met();
        let mut rows: Vec<(String, String, String, &str)> = vec![
            (
                "initial sync (vswitchd's sync_ms)".into(),
                format!("{} ms", self.sync_ms),
                format!("<= {TARGET_SYNC_MS} ms"),
                ok(sync),
            ),
            (
                "NetworkPolicy sync (policy_sync_ms: pods too)".into(),
                format!("{} ms", self.policy_sync_ms),
                format!("<= {TARGET_SYNC_MS} ms"),
                ok(policy_sync),
            ),
            (
                "lab up: stand-in loads, vswitchd starts and syncs".into(),
                format!("{} ms", self.up_ms),
                String::new(),
                "",
            ),
            (
                format!(
                    "endpoint change to datapath, p99 ({} changes at 10/s)",
                    self.isolated.changes
                ),
                format!(
                    "{:.1} ms (p50 {:.1}, max {:.1})",
                    self.isolated.latency.p99_ms,
                    self.isolated.latency.p50_ms,
                    self.isolated.latency.max_ms
                ),
                format!("<= {TARGET_P99_MS} ms"),
                ok(p99),
            ),
            (
                format!(
                    "{} changes/s ({:.0}/s made) for {:.0} s: vswitchd CPU",
                    self.sustained.rate,
                    f64::from(self.sustained.changes) / self.sustained.seconds.max(0.001),
                    self.sustained.seconds
                ),
                format!("{:.2} cores", self.sustained.cores),
                format!("<= {TARGET_CORES} core"),
                ok(cores),
            ),
            (
                format!("{} changes/s: change to datapath", self.sustained.rate),
                format!(
                    "p99 {:.1} ms (p50 {:.1}, max {:.1}; {} tables applied, stand-in behind {})",
                    self.sustained.latency.p99_ms,
                    self.sustained.latency.p50_ms,
                    self.sustained.latency.max_ms,
                    self.sustained.applies,
                    self.sustained.behind
                ),
                String::new(),
                "",
            ),
            (
                format!(
                    "{} pod changes/s ({:.0}/s made) for {:.0} s: vswitchd CPU",
                    self.pod_churn.rate,
                    f64::from(self.pod_churn.changes) / self.pod_churn.seconds.max(0.001),
                    self.pod_churn.seconds
                ),
                format!(
                    "{:.2} cores ({} policy tables applied)",
                    self.pod_churn.cores, self.pod_churn.applies
                ),
                String::new(),
                "",
            ),
            (
                "vswitchd RSS: empty / synced / after churn".into(),
                format!(
                    "{:.0} / {:.0} / {:.0} MiB",
                    self.rss_empty_mib, self.rss_synced_mib, self.rss_after_mib
                ),
                format!("<= {TARGET_RSS_MIB} MiB"),
                ok(rss),
            ),
        ];
        for ((what, empty, loaded, r), met) in self.cni_ratios().into_iter().zip([add, del]) {
            rows.push((
                format!("CNI {what}: empty / loaded (median)"),
                format!("{empty:.1} / {loaded:.1} ms ({r:.2}x)"),
                format!("<= {TARGET_CNI_RATIO}x"),
                ok(met),
            ));
        }
        rows.extend([
            (
                "compaction + cut watches: relisted and applied".into(),
                format!(
                    "{} ms (table never below {} Services)",
                    self.relist_ms, self.relist_min_services
                ),
                String::new(),
                "",
            ),
            (
                "restart (handover): ready / its sync".into(),
                format!("{} / {} ms", self.restart_ready_ms, self.restart_sync_ms),
                String::new(),
                "",
            ),
        ]);
        let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let w1 = rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
        let w2 = rows.iter().map(|r| r.2.len()).max().unwrap_or(0);
        for (a, b, c, d) in &rows {
            let _ = writeln!(t, "{a:<w0$}  {b:<w1$}  {c:<w2$}  {d}");
        }
        let misses = self.misses();
        if misses.is_empty() {
            let _ = writeln!(t, "\nevery target met");
        } else {
            let _ = writeln!(t, "\ntargets missed:");
            for m in misses {
                let _ = writeln!(t, "- {m}");
            }
        }
        t
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// The generated cluster: one JSON List per kind, in the order they load.
pub struct Cluster {
    pub lists: Vec<(&'static str, Value)>,
    pub slices: u32,
}

/// Fake node `j` (1-based; the lab's own node is not one of them).
fn fake_node(j: u32) -> (String, String, Ipv4Addr) {
    let cidr = format!("10.{}.{}.0/24", 64 + j / 256, j % 256);
    let underlay = Ipv4Addr::new(172, 20, (j / 250) as u8, (j % 250 + 1) as u8);
    (format!("scale-node-{j:05}"), cidr, underlay)
}

fn fake_pod_ip(j: u32, slot: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, (64 + j / 256) as u8, (j % 256) as u8, (slot + 2) as u8)
}

/// The cluster `o` describes, around the lab's node (which is in the stand-in already).
pub fn cluster(o: &ScaleOptions) -> Result<Cluster, LabError> {
    let fakes = o.nodes.saturating_sub(1).max(1);
    if fakes > 64 * 256 {
        return Err(LabError::InvalidSpec("--nodes: at most 16385".into()));
    }
    if o.pods.div_ceil(fakes) > 250 {
        return Err(LabError::InvalidSpec(format!(
            "--pods: at most 250 a node ({} nodes hold {} at most)",
            o.nodes,
            fakes * 250
        )));
    }
    if o.services == 0 || o.pods == 0 || o.slice_max == 0 {
        return Err(LabError::InvalidSpec(
            "--services, --pods and --slice-max must be at least 1".into(),
        ));
    }
    let namespaces = 100.min(o.services);
    let ns_of = |i: u32| format!("ns-{:03}", i % namespaces);
    let nodes: Vec<Value> = (1..=fakes)
        .map(|j| {
            let (name, cidr, underlay) = fake_node(j);
            let vtep = json!({
                "underlay_ip": underlay.to_string(),
                "vtep_mac": format!("02:5c:{:02x}:{:02x}:{:02x}:01", j >> 16 & 0xff, j >> 8 & 0xff, j & 0xff),
                "remote_checksum": true
            });
            json!({
                "metadata": {
                    "name": name,
                    "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"},
                    "annotations": {"vswitch.io/vtep": vtep.to_string()}
                },
                "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
                "status": {
                    "addresses": [
                        {"type": "InternalIP", "address": underlay.to_string()},
                        {"type": "Hostname", "address": name}
                    ],
                    "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]
                }
            })
        })
        .collect();
    let pod = |i: u32| -> (String, String, Ipv4Addr, String) {
        let j = 1 + i % fakes;
        let slot = i / fakes;
        (
            ns_of(i),
            format!("pod-{i:06}"),
            fake_pod_ip(j, slot),
            fake_node(j).0,
        )
    };
    let pods: Vec<Value> = (0..o.pods)
        .map(|i| {
            let (ns, name, ip, node) = pod(i);
            json!({
                "metadata": {"namespace": ns, "name": name, "labels": {"app": format!("a{}", i % 50)}},
                "spec": {"nodeName": node, "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}]},
                "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]}
            })
        })
        .collect();
    // Endpoints per Service: a twentieth of the Services are large (more than one full
    // slice), the others share what is left.
    let big_size = o.slice_max + 5;
    let mut big = o.services / 20;
    while big > 0 && big * big_size > o.endpoints {
        big -= 1;
    }
    let rest = o.endpoints - big * big_size;
    let small = o.services - big;
    let per_small = |k: u32| rest / small.max(1) + u32::from(k < rest % small.max(1));
    let mut services = Vec::new();
    let mut slices = Vec::new();
    let mut next_pod = 0u32;
    for i in 0..o.services {
        let ns = ns_of(i);
        let name = format!("svc-{i:05}");
        services.push(json!({
            "metadata": {"namespace": ns, "name": name},
            "spec": {
                "selector": {"app": name},
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
            }
        }));
        let n = if i < big {
            big_size
        } else {
            per_small(i - big)
        };
        let eps: Vec<Value> = (0..n)
            .map(|_| {
                let p = next_pod % o.pods;
                next_pod += 1;
                let (pns, pname, ip, node) = pod(p);
                json!({
                    "addresses": [ip.to_string()],
                    "conditions": {"ready": true, "serving": true, "terminating": false},
                    "nodeName": node,
                    "targetRef": {"kind": "Pod", "namespace": pns, "name": pname}
                })
            })
            .collect();
        for (k, chunk) in eps.chunks(o.slice_max as usize).enumerate() {
            slices.push(json!({
                "metadata": {
                    "namespace": ns,
                    "name": format!("{name}-{k}"),
                    "labels": {
                        "kubernetes.io/service-name": name,
                        "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"
                    }
                },
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": chunk
            }));
        }
    }
    let policies: Vec<Value> = (0..namespaces)
        .map(|i| {
            json!({
                "metadata": {"namespace": format!("ns-{i:03}"), "name": "allow-a1"},
                "spec": {
                    "podSelector": {"matchLabels": {"app": "a1"}},
                    "policyTypes": ["Ingress"],
                    "ingress": [{"from": [{"namespaceSelector": {}}], "ports": [{"port": 8080}]}]
                }
            })
        })
        .collect();
    let namespaces: Vec<Value> = (0..namespaces)
        .map(|i| json!({"metadata": {"name": format!("ns-{i:03}")}}))
        .collect();
    let list = |api: &str, kind: &str, items: Vec<Value>| json!({"apiVersion": api, "kind": format!("{kind}List"), "items": items});
    let n_slices = slices.len() as u32;
    Ok(Cluster {
        lists: vec![
            ("namespaces", list("v1", "Namespace", namespaces)),
            ("nodes", list("v1", "Node", nodes)),
            ("services", list("v1", "Service", services)),
            (
                "endpointslices",
                list("discovery.k8s.io/v1", "EndpointSlice", slices),
            ),
            ("pods", list("v1", "Pod", pods)),
            (
                "networkpolicies",
                list("networking.k8s.io/v1", "NetworkPolicy", policies),
            ),
        ],
        slices: n_slices,
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn kubernetes(lab: &Lab, since_ms: u64) -> Result<KubernetesResponse, LabError> {
    lab.nodes[0]
        .client()
        .with_timeout(Duration::from_secs(30))
        .get(&format!("{PATH_KUBERNETES}?since_ms={since_ms}"))
        .map_err(|e| LabError::BadOutput(format!("GET {PATH_KUBERNETES}: {e}")))
}

fn rss_mib(lab: &Lab) -> f64 {
    lab.nodes[0].pid.map(rss_kb).unwrap_or(0) as f64 / 1024.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// ADD then DEL of `reps` pods on node 1, timed as a runtime sees them (the plugin call with
/// the pod's namespace made before and removed after).
fn cni_times(lab: &mut Lab, reps: u32) -> Result<Cni, LabError> {
    let (mut adds, mut dels) = (Vec::new(), Vec::new());
    for i in 0..reps {
        let name = format!("s{i}");
        let t = Instant::now();
        let short = lab.add_pod(1, &name)?.name.clone();
        adds.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        lab.del_pod(&short)?;
        dels.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(Cni {
        add_ms: median(adds),
        del_ms: median(dels),
    })
}

/// What the stand-in changes in [`churn`].
#[derive(Clone, Copy)]
enum Changes {
    /// EndpointSlices (one endpoint's readiness each), whose latency vswitchd measures.
    Endpoints,
    /// Pods (one label each): vswitchd's CPU only (a Pod carries no trigger time).
    Pods,
}

/// `count` changes at `rate` a second, made by the stand-in: vswitchd's CPU meanwhile and until
/// they were applied (endpoints: every one, or 10 s more; pods: half a second more, for its
/// debounce and the last policy build), and its latencies for endpoint changes.
fn churn(lab: &Lab, what: Changes, count: u32, rate: u32) -> Result<Churn, LabError> {
    let before = kubernetes(lab, u64::MAX)?;
    let pid = lab.nodes[0].pid.unwrap_or(0);
    let cpu0 = read_pids_cpu(&[pid]).unwrap_or(0);
    let since = now_ms();
    let kind = match what {
        Changes::Endpoints => "",
        Changes::Pods => "kind=pods&",
    };
    let out = lab.kubectl(
        &[
            "create",
            "--raw",
            &format!("/_standin/churn?{kind}rate={rate}&count={count}"),
            "-f",
            "/dev/null",
            "--request-timeout=0",
        ],
        None,
    )?;
    let answer: Value = serde_json::from_str(out.trim())
        .map_err(|e| LabError::BadOutput(format!("churn answered {out:?}: {e}")))?;
    let k = match what {
        Changes::Pods => {
            std::thread::sleep(Duration::from_millis(500));
            kubernetes(lab, since)?
        }
        Changes::Endpoints => {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut k = kubernetes(lab, since)?;
            while (k.programming.count - before.programming.count) < u64::from(count)
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(100));
                k = kubernetes(lab, since)?;
            }
            k
        }
    };
    let cpu1 = read_pids_cpu(&[pid]).unwrap_or(cpu0);
    let wall = (now_ms() - since) as f64 / 1000.0;
    let samples: Vec<u64> = match what {
        Changes::Endpoints => k.programming.samples.iter().map(|(_, l)| *l).collect(),
        Changes::Pods => Vec::new(),
    };
    Ok(Churn {
        changes: count,
        rate,
        seconds: answer["seconds"].as_f64().unwrap_or(0.0),
        behind: answer["behind"].as_u64().unwrap_or(0),
        latency: Latency::of(&samples),
        cores: (cpu1 - cpu0) as f64 / ticks_per_second() as f64 / wall.max(0.001),
        applies: k.applies - before.applies,
        samples_ms: samples.iter().map(|us| *us as f64 / 1000.0).collect(),
    })
}

/// Compacts the stand-in's log and cuts every watch: each resumes from a version it no longer
/// has (410 Gone) and relists. How long until the three table kinds relisted and the tables
/// were applied after, and the fewest Services the table held meanwhile.
fn relist(lab: &Lab) -> Result<(u64, u64), LabError> {
    let before = kubernetes(lab, u64::MAX)?;
    let started = Instant::now();
    for ctl in ["compact", "cut-watches"] {
        lab.kubectl(
            &[
                "create",
                "--raw",
                &format!("/_standin/{ctl}"),
                "-f",
                "/dev/null",
            ],
            None,
        )?;
    }
    let deadline = started + Duration::from_secs(60);
    let mut least = before.services;
    // The Service table converted after the three lists completed: counted from the last look
    // before they had (a look that sees them completed may already see that conversion too).
    let mut rebuilds_at_lists: Option<u64> = None;
    let mut rebuilds_seen = before.service_rebuilds;
    loop {
        let k = kubernetes(lab, u64::MAX)?;
        least = least.min(k.services);
        // Every relist that began has completed (a watch whose version the compaction kept,
        // the Nodes' after a recent bookmark, resumes without one), the churned Services' and
        // EndpointSlices' at least.
        let begun = k.table_relists - before.table_relists;
        let done = k.table_lists - before.table_lists;
        if done >= 2 && done >= begun {
            let at = *rebuilds_at_lists.get_or_insert(rebuilds_seen);
            if k.service_rebuilds > at {
                return Ok((started.elapsed().as_millis() as u64, least));
            }
        }
        rebuilds_seen = k.service_rebuilds;
        if Instant::now() > deadline {
            return Err(LabError::BadOutput(format!(
                "vswitchd did not relist within 60 s ({} lists, {} before)",
                k.table_lists, before.table_lists
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs both labs and reports; `progress` hears what happens.
pub fn run(o: &ScaleOptions, progress: &mut dyn FnMut(&str)) -> Result<ScaleReport, LabError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut r = ScaleReport {
        date: crate::bench::utc_timestamp(now),
        commit: crate::bench::run::git_commit().unwrap_or_default(),
        machine: format!(
            "{}, {} CPUs",
            crate::bench::cpu::cpu_model(),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        ),
        nodes: o.nodes,
        services: o.services,
        endpoints: o.endpoints,
        pods: o.pods,
        ..ScaleReport::default()
    };
    progress("empty cluster: up");
    {
        let mut lab = LabGuard::up(LabSpec::new(&format!("{}e", o.name), 1, 0).with_kubernetes())?;
        r.rss_empty_mib = rss_mib(&lab);
        progress("empty cluster: CNI ADD and DEL");
        r.cni_empty = cni_times(&mut lab, o.cni_reps)?;
    }
    progress(&format!(
        "generating {} nodes, {} Services, {} endpoints, {} pods",
        o.nodes, o.services, o.endpoints, o.pods
    ));
    let cluster = cluster(o)?;
    r.endpoint_slices = cluster.slices;
    let dir = PathBuf::from(crate::RUN_DIR).join(format!("{}.scale", o.name));
    fs::create_dir_all(&dir).map_err(|e| LabError::io(&dir, e))?;
    let mut files = Vec::new();
    for (kind, list) in &cluster.lists {
        let f = dir.join(format!("{kind}.json"));
        fs::write(&f, list.to_string()).map_err(|e| LabError::io(&f, e))?;
        files.push(f);
    }
    drop(cluster);
    let result = run_loaded(o, &mut r, files, progress);
    let _ = fs::remove_dir_all(&dir);
    result.map(|()| r)
}

fn run_loaded(
    o: &ScaleOptions,
    r: &mut ScaleReport,
    files: Vec<PathBuf>,
    progress: &mut dyn FnMut(&str),
) -> Result<(), LabError> {
    progress("large cluster: loading the stand-in and starting vswitchd");
    let opts = UpOptions {
        ready_timeout: Duration::from_secs(120),
        apiserver_load: files,
        ..UpOptions::default()
    };
    let started = Instant::now();
    let mut lab = LabGuard::new(Lab::up_with(
        LabSpec::new(&o.name, 1, 0).with_kubernetes(),
        &opts,
    )?);
    // `up` returns once vswitchd is ready; the stand-in's load came first.
    r.up_ms = started.elapsed().as_millis() as u64;
    let mut k = kubernetes(&lab, u64::MAX)?;
    r.sync_ms = k.sync_ms.unwrap_or(0);
    // Pods, for NetworkPolicy, come after the tables: wait for them too, so that what
    // follows is measured on a daemon that is done listing.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !k.policy_synced && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        k = kubernetes(&lab, u64::MAX)?;
    }
    r.policy_sync_ms = k.policy_sync_ms.unwrap_or(u64::MAX);
    r.table_services = k.services;
    r.table_endpoints = k.endpoints;
    r.rss_synced_mib = rss_mib(&lab);
    progress(&format!(
        "synced: {} Services, {} endpoints in {} ms; RSS {:.0} MiB",
        k.services, k.endpoints, r.sync_ms, r.rss_synced_mib
    ));
    progress("large cluster: CNI ADD and DEL");
    r.cni_loaded = cni_times(&mut lab, o.cni_reps)?;
    progress(&format!("{} isolated endpoint changes", o.isolated));
    r.isolated = churn(&lab, Changes::Endpoints, o.isolated, 10)?;
    progress(&format!("{} changes at {}/s", o.changes, o.rate));
    r.sustained = churn(&lab, Changes::Endpoints, o.changes, o.rate)?;
    progress(&format!("{} pod changes at {}/s", o.changes, o.rate));
    r.pod_churn = churn(&lab, Changes::Pods, o.changes, o.rate)?;
    r.rss_after_mib = rss_mib(&lab);
    progress("compaction and cut watches: relist");
    (r.relist_ms, r.relist_min_services) = relist(&lab)?;
    progress("restart (handover)");
    let t = Instant::now();
    lab.restart_daemon(0, Duration::from_secs(120))?;
    r.restart_ready_ms = t.elapsed().as_millis() as u64;
    r.restart_sync_ms = kubernetes(&lab, u64::MAX)?.sync_ms.unwrap_or(0);
    if o.keep {
        let lab = lab.into_inner();
        progress(&format!("lab {} left up", lab.name));
    }
    Ok(())
}

/// The latency chart's gnuplot script: each burst's changes by latency, as a distribution.
fn gnuplot_script(r: &ScaleReport, png: &Path) -> String {
    let series = |c: &Churn| -> String {
        let mut v = c.samples_ms.clone();
        v.sort_by(f64::total_cmp);
        let n = v.len().max(1) as f64;
        let mut out = String::new();
        for (i, ms) in v.iter().enumerate() {
            let _ = writeln!(out, "{:.3} {:.5}", ms, (i + 1) as f64 / n);
        }
        out + "e\n"
    };
    format!(
        "set terminal png size 900,500\nset output '{}'\n\
         set title 'Endpoint change to datapath, {} Services, {} endpoints ({})'\n\
         set xlabel 'ms from last-change-trigger-time to the applied table'\n\
         set ylabel 'fraction of changes'\nset key bottom right\nset grid\nset xrange [0:*]\n\
         set arrow from {TARGET_P99_MS},0 to {TARGET_P99_MS},1 nohead dt 2\n\
         plot '-' using 1:2 with steps title '{} changes at 10/s', \\\n\
         '-' using 1:2 with steps title '{} changes at {}/s'\n{}{}",
        png.display(),
        r.services,
        r.endpoints,
        r.date,
        r.isolated.changes,
        r.sustained.changes,
        r.sustained.rate,
        series(&r.isolated),
        series(&r.sustained),
    )
}

/// Draws `png` with gnuplot; why there is none, if there is none.
fn chart(r: &ScaleReport, png: &Path) -> Option<String> {
    if !crate::bench::run::have_tool("gnuplot") {
        return Some("gnuplot is not installed (Debian package gnuplot-nox)".into());
    }
    let script = gnuplot_script(r, png);
    match crate::process::run_bounded(
        &mut std::process::Command::new("gnuplot"),
        Some(script.as_bytes()),
        Duration::from_secs(30),
        None,
    ) {
        Ok(out) if out.status.success() && png.is_file() => None,
        Ok(out) => Some(format!(
            "gnuplot failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!("gnuplot: {e}")),
    }
}

/// Writes `latest.json`, `latest.txt`, `latest.png` (with gnuplot) and the run's copies
/// under `runs/` into `dir`.
pub fn write(dir: &Path, r: &ScaleReport) -> Result<Vec<PathBuf>, LabError> {
    fs::create_dir_all(dir.join("runs")).map_err(|e| LabError::io(dir, e))?;
    let stamp = r.date.replace([':', '-'], "");
    let json = serde_json::to_string_pretty(r).unwrap_or_default() + "\n";
    let text = r.to_text();
    let mut out = Vec::new();
    for (name, body) in [
        ("latest.json".to_string(), &json),
        ("latest.txt".to_string(), &text),
        (format!("runs/{stamp}.json"), &json),
        (format!("runs/{stamp}.txt"), &text),
    ] {
        let p = dir.join(name);
        fs::write(&p, body).map_err(|e| LabError::io(&p, e))?;
        out.push(p);
    }
    let png = dir.join("latest.png");
    match chart(r, &png) {
        None => out.push(png),
        Some(why) => eprintln!("no chart: {why}"),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_cluster_has_the_sizes_asked_for() {
        let o = ScaleOptions {
            nodes: 50,
            services: 100,
            endpoints: 1000,
            pods: 1000,
            slice_max: 100,
            ..ScaleOptions::default()
        };
        let c = cluster(&o).unwrap();
        let items = |k: &str| {
            c.lists.iter().find(|(n, _)| *n == k).unwrap().1["items"]
                .as_array()
                .unwrap()
                .clone()
        };
        assert_eq!(items("nodes").len(), 49);
        assert_eq!(items("services").len(), 100);
        assert_eq!(items("pods").len(), 1000);
        let slices = items("endpointslices");
        let eps: usize = slices
            .iter()
            .map(|s| s["endpoints"].as_array().unwrap().len())
            .sum();
        assert_eq!(eps, 1000);
        assert!(slices
            .iter()
            .all(|s| s["endpoints"].as_array().unwrap().len() <= 100));
        assert_eq!(c.slices as usize, slices.len());
        // Every pod address is unique and none is in the lab's own pod CIDR.
        let ips: std::collections::BTreeSet<String> = items("pods")
            .iter()
            .map(|p| p["status"]["podIP"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(ips.len(), 1000);
        assert!(ips.iter().all(|ip| !ip.starts_with("10.244.")));
    }

    #[test]
    fn misses_name_each_target() {
        let mut r = ScaleReport {
            sync_ms: 20_000,
            ..ScaleReport::default()
        };
        r.isolated.latency.p99_ms = 80.0;
        r.cni_empty = Cni {
            add_ms: 10.0,
            del_ms: 10.0,
        };
        r.cni_loaded = Cni {
            add_ms: 13.0,
            del_ms: 11.0,
        };
        let m = r.misses();
        assert_eq!(m.len(), 3, "{m:?}");
        assert!(r.to_text().contains("MISSED"));
    }
}
