//! `vswitch-lab soak`: churn a lab for a while with traffic running, then look for leaks.
//!
//! Two nodes and N pods (split between them). The nodes run with short `[nat]` timeouts (set
//! in their configs and taken by a restart, which also shows that pods survive one). For the
//! duration: pods are deleted and added continuously through the CNI plugin, the nodes'
//! `[[services]]` are rewritten every few seconds (applied by the live reload), and traffic
//! runs between random pods (ping, iperf3 bursts, TCP and UDP to the Services' ClusterIPs).
//! Then, with traffic stopped and the conntrack timeouts passed, each node is checked:
//!
//! - TAP devices: vswitchd holds one `/dev/net/tun` descriptor per live pod plus the host port;
//!   every live pod namespace has exactly `lo` and `eth0`; no namespace of a deleted pod is
//!   left; the node namespace holds only `lo`, `ul0` and `vsw0`;
//! - descriptors: vswitchd's other descriptors (not TAP queues) are as many as at the start,
//!   within [`FD_SLACK`];
//! - addresses: the IPAM leases and attachment records are exactly the live pods';
//! - conntrack: back to at most [`CT_LEFT`] entries;
//! - memory: RSS grew by less than `--rss-bound` MB.
//!
//! The lab is torn down at the end, also after an error or Ctrl-C (which ends the churn early).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use conf::api::{ConntrackResponse, PortsResponse, PATH_CONNTRACK, PATH_PORTS};
use conf::Config;

use crate::spec::{LabNetns, Names};
use crate::{process, sys, Lab, LabError, LabGuard, LabSpec, Node, Pod, UpOptions};

/// `[nat]` timeouts (seconds) of the soak's nodes: short, so conntrack must drain soon after.
const TCP_ESTABLISHED: u64 = 10;
const TCP_TRANSITORY: u64 = 5;
const UDP_TIMEOUT: u64 = 5;
/// Conntrack entries allowed to remain after the timeouts.
pub const CT_LEFT: usize = 2;
/// Non-TAP descriptors vswitchd may hold beyond its count at the start.
pub const FD_SLACK: i64 = 8;
/// How often the Services are rewritten.
const SERVICE_PERIOD: Duration = Duration::from_secs(3);
/// Traffic threads.
const TRAFFIC_THREADS: usize = 3;
/// One pod deleted and one added this often: with 100 pods a pod lives ~25 s on average.
const CHURN_PERIOD: Duration = Duration::from_millis(250);

/// What to run.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    pub name: String,
    pub duration: Duration,
    /// Pods in all (split between the two nodes).
    pub pods: u32,
    /// Largest RSS growth of a vswitchd accepted, bytes.
    pub rss_bound: u64,
}

/// A node's numbers at the start and the end.
#[derive(Debug, Clone, Default)]
pub struct NodeReport {
    pub name: String,
    pub pods_start: usize,
    pub pods_end: usize,
    pub tun_fds_start: usize,
    pub tun_fds_end: usize,
    pub other_fds_start: usize,
    pub other_fds_end: usize,
    pub rss_start_kb: u64,
    pub rss_end_kb: u64,
    pub leases_end: usize,
    pub records_end: usize,
    pub ports_end: usize,
    pub conntrack_peak: usize,
    pub conntrack_end: usize,
    /// Seconds from the end of traffic until conntrack was back to at most CT_LEFT.
    pub conntrack_drain_secs: f64,
}

/// Counts of what ran.
#[derive(Debug, Clone, Default)]
pub struct Activity {
    pub pods_added: u64,
    pub pods_deleted: u64,
    pub cni_errors: u64,
    pub service_updates: u64,
    /// (ok, failed with both pods still there, failed because a pod went away)
    pub ping: (u64, u64, u64),
    pub iperf: (u64, u64, u64),
    pub service_probes: (u64, u64),
    pub iperf_bytes: u64,
    /// The first failures between pods that were both there.
    pub failures: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct SoakReport {
    pub lab: String,
    pub seconds: f64,
    pub nodes: Vec<NodeReport>,
    pub activity: Activity,
    /// Every check that failed, in words.
    pub problems: Vec<String>,
    /// Namespaces of the lab left after teardown.
    pub left_after_teardown: Vec<String>,
}

impl SoakReport {
    pub fn to_text(&self, rss_bound: u64) -> String {
        let a = &self.activity;
        let mut s = format!(
            "soak of lab {} for {:.0} s\n\
             churn: {} pods added, {} deleted ({} CNI errors), {} Service updates\n\
             traffic: ping {} ok / {} failed / {} lost to churn; iperf3 {} ok / {} failed / {} \
             lost to churn ({:.1} GB); Service probes {} sent / {} failed to start\n\n",
            self.lab,
            self.seconds,
            a.pods_added,
            a.pods_deleted,
            a.cni_errors,
            a.service_updates,
            a.ping.0,
            a.ping.1,
            a.ping.2,
            a.iperf.0,
            a.iperf.1,
            a.iperf.2,
            a.iperf_bytes as f64 / 1e9,
            a.service_probes.0,
            a.service_probes.1,
        );
        if !a.failures.is_empty() {
            s += &format!(
                "failures between live pods (first {}):\n  {}\n\n",
                a.failures.len(),
                a.failures.join("\n  ")
            );
        }
        s += &format!(
            "{:<10} {:>11} {:>11} {:>13} {:>15} {:>9} {:>8} {:>6} {:>14} {:>9}\n",
            "NODE",
            "PODS",
            "TAP FDS",
            "OTHER FDS",
            "RSS MB",
            "LEASES",
            "RECORDS",
            "PORTS",
            "CONNTRACK",
            "DRAIN S"
        );
        for n in &self.nodes {
            s += &format!(
                "{:<10} {:>11} {:>11} {:>13} {:>15} {:>9} {:>8} {:>6} {:>14} {:>9.1}\n",
                n.name,
                format!("{} -> {}", n.pods_start, n.pods_end),
                format!("{} -> {}", n.tun_fds_start, n.tun_fds_end),
                format!("{} -> {}", n.other_fds_start, n.other_fds_end),
                format!(
                    "{:.1} -> {:.1}",
                    n.rss_start_kb as f64 / 1024.0,
                    n.rss_end_kb as f64 / 1024.0
                ),
                n.leases_end,
                n.records_end,
                n.ports_end,
                format!("{} peak, {} end", n.conntrack_peak, n.conntrack_end),
                n.conntrack_drain_secs,
            );
        }
        s += &format!(
            "\nbounds: TAP fds = live pods + 1 (host port); other fds within +{FD_SLACK}; \
             leases = records = ports = live pods; conntrack <= {CT_LEFT} after {} s of timeouts; \
             RSS growth < {} MB\n",
            TCP_ESTABLISHED,
            rss_bound / (1024 * 1024)
        );
        if self.left_after_teardown.is_empty() {
            s += "teardown: nothing of the lab is left\n";
        } else {
            s += &format!("teardown left: {:?}\n", self.left_after_teardown);
        }
        if self.problems.is_empty() {
            s += "result: PASS\n";
        } else {
            s += "result: FAIL\n";
            for p in &self.problems {
                s += &format!("  - {p}\n");
            }
        }
        s
    }
}

static STOP: LazyLock<Arc<AtomicBool>> = LazyLock::new(Arc::default);

/// Ctrl-C and SIGTERM end the churn early; the checks and the teardown still run.
/// (Registering a handler for these two cannot fail.)
fn catch_signals() {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let _ = crate::process::set_on_signals(&STOP, &[SIGINT, SIGTERM], false);
}

fn stopped() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// A small xorshift generator: the soak needs variety, not quality.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Rng(seed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Runs the soak: builds the lab, churns, checks, tears down. Progress goes to `progress`.
pub fn run(opts: &SoakOptions, progress: &mut dyn FnMut(&str)) -> Result<SoakReport, LabError> {
    if opts.pods < 2 {
        return Err(LabError::InvalidSpec("soak needs at least 2 pods".into()));
    }
    catch_signals();
    let per_node = opts.pods / 2;
    progress(&format!(
        "soak: lab {} with 2 nodes and {} pods (`vswitch-lab --name {} down` removes it if this \
         process is killed)",
        opts.name,
        per_node * 2 + opts.pods % 2,
        opts.name
    ));
    let mut lab = LabGuard::new(Lab::up_with(
        LabSpec::new(&opts.name, 2, per_node),
        &UpOptions::default(),
    )?);
    if opts.pods % 2 == 1 {
        lab.add_pod(1, "pextra")?;
    }
    let result = soak(&mut lab, opts, progress);
    let name = lab.name.clone();
    let down = lab.into_inner().down();
    let mut report = result?;
    if let Err(e) = down {
        report.problems.push(format!("teardown: {e}"));
    }
    let names = Names(&name);
    report.left_after_teardown = sys::netns_list()?
        .into_iter()
        .filter(|ns| names.classify(ns).is_some())
        .collect();
    if !report.left_after_teardown.is_empty() {
        report.problems.push(format!(
            "namespaces left after teardown: {:?}",
            report.left_after_teardown
        ));
    }
    Ok(report)
}

fn soak(
    lab: &mut LabGuard,
    opts: &SoakOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<SoakReport, LabError> {
    // Short conntrack timeouts, taken at a restart (the pods stay attached through it).
    let mut base = Vec::new();
    for i in 0..lab.nodes.len() {
        let text = fs::read_to_string(&lab.nodes[i].config)
            .map_err(|e| LabError::io(&lab.nodes[i].config, e))?;
        let text = with_nat(&text);
        check_config(&lab.nodes[i], &text)?;
        crate::files::write_atomic(&lab.nodes[i].config, text.as_bytes())?;
        base.push(text);
        restart(lab, i)?;
    }
    progress("soak: nodes restarted with short [nat] timeouts; pods taken back");
    thread::sleep(Duration::from_secs(1));

    let mut report = SoakReport {
        lab: lab.name.clone(),
        ..Default::default()
    };
    for n in &lab.nodes {
        let pid = n.pid.unwrap_or(0);
        let (tun, other) = fds(pid);
        report.nodes.push(NodeReport {
            name: n.name.clone(),
            pods_start: lab.pods.iter().filter(|p| p.node_index == n.index).count(),
            tun_fds_start: tun,
            other_fds_start: other,
            rss_start_kb: rss_kb(pid),
            ..Default::default()
        });
    }

    // Traffic, in threads that read the live pods and Services.
    let live: Arc<Mutex<Vec<Pod>>> = Arc::new(Mutex::new(lab.pods.clone()));
    let vips: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let run_traffic = Arc::new(AtomicBool::new(true));
    let counters = Arc::new(TrafficCounters::default());
    let mut workers = Vec::new();
    for w in 0..TRAFFIC_THREADS {
        let (live, vips, on, c) = (
            live.clone(),
            vips.clone(),
            run_traffic.clone(),
            counters.clone(),
        );
        workers.push(thread::spawn(move || traffic(w, &live, &vips, &on, &c)));
    }

    let start = Instant::now();
    let mut rng = Rng::new();
    let mut next_services = Instant::now();
    let mut serial = 0u64;
    let mut peak = vec![0usize; lab.nodes.len()];
    let mut last_report = Instant::now();
    let mut activity = Activity::default();
    while start.elapsed() < opts.duration && !stopped() {
        if Instant::now() >= next_services {
            let services = random_services(&mut rng, &lab.pods, &lab.nodes);
            for (i, b) in base.iter().enumerate() {
                let text = format!("{b}{}", services.0);
                check_config(&lab.nodes[i], &text)?;
                crate::files::write_atomic(&lab.nodes[i].config, text.as_bytes())?;
            }
            *vips.lock().unwrap_or_else(|e| e.into_inner()) = services.1;
            activity.service_updates += 1;
            next_services = Instant::now() + SERVICE_PERIOD;
            for (i, n) in lab.nodes.iter().enumerate() {
                peak[i] = peak[i].max(conntrack(n).unwrap_or(0));
            }
        }
        // One pod out, one in (on a random node).
        let churn_at = Instant::now() + CHURN_PERIOD;
        if !lab.pods.is_empty() {
            let victim = lab.pods[rng.below(lab.pods.len())].name.clone();
            // Gone for the traffic before it goes: a failure from here on is churn's.
            live.lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|p| p.name != victim);
            match lab.del_pod(&victim) {
                Ok(()) => activity.pods_deleted += 1,
                Err(e) => {
                    activity.cni_errors += 1;
                    progress(&format!("soak: DEL {victim}: {e}"));
                }
            }
        }
        serial += 1;
        let node = 1 + rng.below(2) as u32;
        match lab.add_pod(node, &format!("c{serial}")) {
            Ok(_) => activity.pods_added += 1,
            Err(e) => {
                activity.cni_errors += 1;
                progress(&format!("soak: ADD n{node}-c{serial}: {e}"));
            }
        }
        *live.lock().unwrap_or_else(|e| e.into_inner()) = lab.pods.clone();
        if let Some(rest) = churn_at.checked_duration_since(Instant::now()) {
            thread::sleep(rest);
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            progress(&format!(
                "soak: {:.0} s: {} pods added, {} deleted, {} Service updates; ping ok {}, \
                 iperf3 ok {}",
                start.elapsed().as_secs_f64(),
                activity.pods_added,
                activity.pods_deleted,
                activity.service_updates,
                counters.ping_ok.load(Ordering::Relaxed),
                counters.iperf_ok.load(Ordering::Relaxed),
            ));
        }
    }
    run_traffic.store(false, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    report.seconds = start.elapsed().as_secs_f64();
    let c = &counters;
    let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
    activity.ping = (ld(&c.ping_ok), ld(&c.ping_failed), ld(&c.ping_churned));
    activity.iperf = (ld(&c.iperf_ok), ld(&c.iperf_failed), ld(&c.iperf_churned));
    activity.service_probes = (ld(&c.probes), ld(&c.probe_errors));
    activity.iperf_bytes = ld(&c.iperf_bytes);
    activity.failures = c.failures.lock().unwrap_or_else(|e| e.into_inner()).clone();
    report.activity = activity;
    progress(&format!(
        "soak: churn and traffic stopped after {:.0} s; waiting for conntrack to drain",
        report.seconds
    ));

    // Conntrack back to (near) zero once the timeouts have passed.
    let stop = Instant::now();
    let deadline = Duration::from_secs(TCP_ESTABLISHED + 20);
    for (i, n) in lab.nodes.iter().enumerate() {
        let r = &mut report.nodes[i];
        loop {
            let entries = conntrack(n).unwrap_or(usize::MAX);
            r.conntrack_end = entries;
            if entries <= CT_LEFT || stop.elapsed() >= deadline {
                break;
            }
            thread::sleep(Duration::from_millis(500));
        }
        r.conntrack_drain_secs = stop.elapsed().as_secs_f64();
        r.conntrack_peak = peak[i];
    }

    // The checks.
    check_nodes(lab, &mut report, opts.rss_bound);
    Ok(report)
}

fn check_nodes(lab: &LabGuard, report: &mut SoakReport, rss_bound: u64) {
    let names = Names(&lab.name);
    let lab_netns: BTreeSet<String> = sys::netns_list()
        .unwrap_or_default()
        .into_iter()
        .filter(|ns| matches!(names.classify(ns), Some(LabNetns::Pod(..))))
        .collect();
    let live_netns: BTreeSet<String> = lab.pods.iter().map(|p| p.netns.clone()).collect();
    let stale: Vec<&String> = lab_netns.difference(&live_netns).collect();
    if !stale.is_empty() {
        report
            .problems
            .push(format!("namespaces of deleted pods left: {stale:?}"));
    }
    for p in &lab.pods {
        let links = link_names(&p.netns);
        if links != ["eth0", "lo"] {
            report.problems.push(format!(
                "pod {} has links {links:?}, not [eth0, lo]",
                p.name
            ));
        }
    }
    for (i, n) in lab.nodes.iter().enumerate() {
        let pid = n.pid.unwrap_or(0);
        let pods: Vec<&Pod> = lab
            .pods
            .iter()
            .filter(|p| p.node_index == n.index)
            .collect();
        let ips: BTreeSet<String> = pods.iter().map(|p| p.ip.to_string()).collect();
        let (tun, other) = fds(pid);
        let r = &mut report.nodes[i];
        r.pods_end = pods.len();
        r.tun_fds_end = tun;
        r.other_fds_end = other;
        r.rss_end_kb = rss_kb(pid);
        let state = n.dir.join("state");
        let leases = dir_names(&state.join("ipam"), &["last_reserved_ip"]);
        r.leases_end = leases.len();
        r.records_end = dir_names(&state.join("attachments"), &[]).len();
        r.ports_end = n
            .client()
            .get::<PortsResponse>(PATH_PORTS)
            .map(|p| p.ports.len())
            .unwrap_or(usize::MAX);
        let mut problem = |p: String| report.problems.push(format!("{}: {p}", n.name));
        if tun != pods.len() + 1 {
            problem(format!(
                "vswitchd holds {tun} TAP queues for {} pods and the host port",
                pods.len()
            ));
        }
        if other as i64 - r.other_fds_start as i64 > FD_SLACK {
            problem(format!(
                "vswitchd's other descriptors grew from {} to {other}",
                r.other_fds_start
            ));
        }
        if leases != ips {
            let leaked: Vec<_> = leases.difference(&ips).collect();
            let missing: Vec<_> = ips.difference(&leases).collect();
            problem(format!(
                "leases differ from the live pods: leaked {leaked:?}, missing {missing:?}"
            ));
        }
        if r.records_end != pods.len() || r.ports_end != pods.len() {
            problem(format!(
                "{} attachment records and {} ports for {} pods",
                r.records_end,
                r.ports_end,
                pods.len()
            ));
        }
        if r.conntrack_end > CT_LEFT {
            problem(format!(
                "{} conntrack entries left {:.0} s after traffic stopped",
                r.conntrack_end, r.conntrack_drain_secs
            ));
        }
        let node_links = link_names(&n.netns);
        if node_links != ["lo", "ul0", "vsw0"] {
            problem(format!("node namespace has links {node_links:?}"));
        }
        let growth = r.rss_end_kb.saturating_sub(r.rss_start_kb) * 1024;
        if growth >= rss_bound {
            problem(format!(
                "RSS grew from {} kB to {} kB",
                r.rss_start_kb, r.rss_end_kb
            ));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Traffic

#[derive(Default)]
struct TrafficCounters {
    ping_ok: AtomicU64,
    ping_failed: AtomicU64,
    ping_churned: AtomicU64,
    iperf_ok: AtomicU64,
    iperf_failed: AtomicU64,
    iperf_churned: AtomicU64,
    iperf_bytes: AtomicU64,
    probes: AtomicU64,
    probe_errors: AtomicU64,
    /// The first few failures between pods that were both there, for the report.
    failures: Mutex<Vec<String>>,
}

/// `argv` in `ns`, ended after `secs` ([`process::bounded_in`]), waited for.
fn bounded(ns: &str, argv: &[&str], secs: u32) -> Option<std::process::Output> {
    let limit = Duration::from_secs(secs.into());
    let mut cmd = process::bounded_in(ns, argv, limit);
    process::run_bounded(&mut cmd, None, limit + Duration::from_secs(3), None).ok()
}

fn traffic(
    id: usize,
    live: &Mutex<Vec<Pod>>,
    vips: &Mutex<Vec<String>>,
    on: &AtomicBool,
    c: &TrafficCounters,
) {
    let mut rng = Rng::new();
    rng.0 ^= (id as u64 + 1) << 32;
    let port = (5401 + id).to_string();
    let still_there = |names: [&str; 2]| {
        let l = live.lock().unwrap_or_else(|e| e.into_inner());
        names.iter().all(|n| l.iter().any(|p| p.name == *n))
    };
    while on.load(Ordering::Relaxed) && !stopped() {
        let pods = live.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if pods.len() < 2 {
            thread::sleep(Duration::from_millis(100));
            continue;
        }
        let a = &pods[rng.below(pods.len())];
        let b = &pods[rng.below(pods.len())];
        if a.name == b.name {
            continue;
        }
        let tally =
            |ok: bool, what: &str, okc: &AtomicU64, failc: &AtomicU64, churnc: &AtomicU64| {
                if ok {
                    okc.fetch_add(1, Ordering::Relaxed);
                } else if still_there([&a.name, &b.name]) {
                    failc.fetch_add(1, Ordering::Relaxed);
                    let mut f = c.failures.lock().unwrap_or_else(|e| e.into_inner());
                    if f.len() < 10 {
                        f.push(format!(
                            "{what} {} ({}) -> {} ({})",
                            a.name, a.ip, b.name, b.ip
                        ));
                    }
                } else {
                    churnc.fetch_add(1, Ordering::Relaxed);
                }
            };
        match rng.below(5) {
            0 | 1 => {
                let dst = b.ip.to_string();
                let t0 = Instant::now();
                let out = bounded(
                    &a.netns,
                    &["ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "1", &dst],
                    5,
                );
                let ok = out.as_ref().is_some_and(|o| o.status.success());
                // The summary line and how long it took, for the report.
                let what = out
                    .map(|o| {
                        let text = String::from_utf8_lossy(&o.stdout).into_owned();
                        let line = text
                            .lines()
                            .find(|l| l.contains("transmitted"))
                            .unwrap_or("")
                            .to_string();
                        let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
                        format!("ping [{line}{err}; {:.1} s]", t0.elapsed().as_secs_f64())
                    })
                    .unwrap_or_else(|| "ping".into());
                tally(ok, &what, &c.ping_ok, &c.ping_failed, &c.ping_churned);
            }
            2 => {
                let (ok, bytes, error) = iperf_burst(a, b, &port);
                c.iperf_bytes.fetch_add(bytes, Ordering::Relaxed);
                let what = format!("iperf3 [{error}]");
                tally(ok, &what, &c.iperf_ok, &c.iperf_failed, &c.iperf_churned);
            }
            _ => {
                // A TCP connection and a UDP datagram to a Service: conntrack entries.
                let vip = {
                    let v = vips.lock().unwrap_or_else(|e| e.into_inner());
                    if v.is_empty() {
                        continue;
                    }
                    v[rng.below(v.len())].clone()
                };
                let script = format!(
                    "for i in 1 2 3 4 5; do nc -z -w 1 {vip} 80; echo x > /dev/udp/{vip}/53; \
                     done; true"
                );
                let ok = bounded(&a.netns, &["bash", "-c", &script], 8).is_some();
                c.probes.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    c.probe_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// A one-second iperf3 run from `a` to `b`: (success, bytes received, iperf3's error if any).
fn iperf_burst(a: &Pod, b: &Pod, port: &str) -> (bool, u64, String) {
    let argv = ["iperf3", "-s", "-1", "-p", port];
    let server = process::bounded_in(&b.netns, &argv, Duration::from_secs(8))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(mut server) = server else {
        return (false, 0, "cannot start the server".into());
    };
    let dst = b.ip.to_string();
    let mut result = (false, 0, "the server never listened".to_string());
    for _ in 0..10 {
        thread::sleep(Duration::from_millis(150));
        let Some(out) = bounded(
            &a.netns,
            &["iperf3", "-c", &dst, "-p", port, "-t", "1", "-J"],
            6,
        ) else {
            break;
        };
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let refused = v["error"]
            .as_str()
            .is_some_and(|e| e.contains("refused") || e.contains("busy"));
        if refused {
            continue; // the server is not listening yet
        }
        let bytes = v["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
        let error = v["error"].as_str().unwrap_or("").to_string();
        result = (out.status.success() && bytes > 0, bytes, error);
        break;
    }
    let _ = server.kill();
    let _ = server.wait();
    result
}

// ---------------------------------------------------------------------------------------------
// Nodes: config, restart, inspection

fn with_nat(text: &str) -> String {
    crate::files::with_nat_keys(
        text,
        &[
            ("tcp_established_timeout", TCP_ESTABLISHED),
            ("tcp_transitory_timeout", TCP_TRANSITORY),
            ("udp_timeout", UDP_TIMEOUT),
        ],
    )
}

fn check_config(node: &Node, text: &str) -> Result<(), LabError> {
    Config::parse(text)
        .map(drop)
        .map_err(|e| LabError::BadConfig {
            node: node.name.clone(),
            reason: e.to_string(),
        })
}

/// Stops node `i`'s vswitchd and starts it again as `up` does; records the new pid.
fn restart(lab: &mut LabGuard, i: usize) -> Result<(), LabError> {
    let node = lab.nodes[i].clone();
    if let Some(pid) = node.pid {
        sys::stop_process(pid, node.config.as_os_str(), Duration::from_secs(5)).map_err(|e| {
            LabError::Command {
                cmd: format!("stop vswitchd of {}", node.name),
                status: "failed".into(),
                stderr: e,
            }
        })?;
    }
    let bins = crate::Binaries::in_dir(&lab.bin_dir)?;
    let child = sys::spawn_daemon(&node.netns, &bins.vswitchd, &node.config, &node.log)?;
    let pid = child.id();
    lab.nodes[i].pid = Some(pid);
    let pid_file = node.dir.join("vswitchd.pid");
    fs::write(&pid_file, format!("{pid}\n")).map_err(|e| LabError::io(&pid_file, e))?;
    lab.save()?;
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < Duration::from_secs(10) {
        match node.daemon_status(Duration::from_secs(1)) {
            Ok(s) if s.ready => return Ok(()),
            Ok(_) => last = "not ready".into(),
            Err(e) => last = e,
        }
        thread::sleep(Duration::from_millis(50));
    }
    Err(LabError::DaemonNotReady {
        node: node.name.clone(),
        waited: started.elapsed(),
        last,
        log: node.log.clone(),
        tail: sys::log_tail(&node.log, 20),
    })
}

/// (TAP queue descriptors, other descriptors) of a process.
fn fds(pid: u32) -> (usize, usize) {
    let targets: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| fs::read_link(e.path()).ok())
                .map(|t| t.to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let tun = targets.iter().filter(|t| *t == "/dev/net/tun").count();
    (tun, targets.len() - tun)
}

/// A process's resident set size in KiB (`VmRSS`), 0 if it is gone.
pub fn rss_kb(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn conntrack(node: &Node) -> Option<usize> {
    node.client()
        .with_timeout(Duration::from_secs(5))
        .get::<ConntrackResponse>(PATH_CONNTRACK)
        .ok()
        .map(|r| r.total)
}

/// Sorted link names of a namespace.
fn link_names(netns: &str) -> Vec<String> {
    let out = sys::ip(&["-n", netns, "-o", "link", "show"]).unwrap_or_default();
    let mut v: Vec<String> = out
        .lines()
        .filter_map(|l| {
            let name = l.split(':').nth(1)?.trim();
            Some(name.split('@').next()?.to_string())
        })
        .collect();
    v.sort();
    v
}

fn dir_names(dir: &std::path::Path, except: &[&str]) -> BTreeSet<String> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !except.contains(&n.as_str()) && !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

/// 1 to 4 Services on random live pods: their `[[services]]` TOML and ClusterIPs.
fn random_services(rng: &mut Rng, pods: &[Pod], nodes: &[Node]) -> (String, Vec<String>) {
    let mut text = String::new();
    let mut vips = Vec::new();
    let node_name: BTreeMap<u32, &str> = nodes.iter().map(|n| (n.index, n.name.as_str())).collect();
    for s in 0..1 + rng.below(4) {
        let vip = format!("10.96.1.{}", 10 + s);
        let eps: Vec<String> = (0..1 + rng.below(3))
            .filter_map(|_| pods.get(rng.below(pods.len())))
            .map(|p| {
                format!(
                    "{{ ip = \"{}\", node = \"{}\" }}",
                    p.ip,
                    node_name.get(&p.node_index).copied().unwrap_or("")
                )
            })
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        text += &format!(
            "\n[[services]]\nnamespace = \"soak\"\nname = \"s{s}\"\ncluster_ips = [\"{vip}\"]\n\
             ports = [{{ name = \"http\", protocol = \"TCP\", port = 80, target_port = 8080 }}, \
             {{ name = \"dns\", protocol = \"UDP\", port = 53, target_port = 5353 }}]\n\
             endpoints = [{}]\n",
            eps.join(", ")
        );
        vips.push(vip);
    }
    (text, vips)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nat_timeouts_are_replaced_in_the_nat_section_only() {
        let text = "[node]\nudp_timeout = 1\n\n[nat]\nload_balancing = \"maglev\"\n\
                    tcp_established_timeout = 86400\ntcp_transitory_timeout = 120\n\
                    udp_timeout = 30\nconntrack_max = 262144\n";
        let out = with_nat(text);
        assert!(out.contains("[node]\nudp_timeout = 1\n"), "{out}");
        assert!(out.contains("tcp_established_timeout = 10\n"), "{out}");
        assert!(out.contains("tcp_transitory_timeout = 5\n"), "{out}");
        assert!(
            out.contains("\nudp_timeout = 5\nconntrack_max = 262144\n"),
            "{out}"
        );
    }

    #[test]
    fn random_services_parse_as_config() {
        let names = Names("vsl");
        let dir = Lab::dir_of("vsl");
        let nodes = vec![Node::plan(names, 1, &dir), Node::plan(names, 2, &dir)];
        let pod = |i: u32, ip: &str| Pod {
            name: format!("n{i}-p"),
            k8s_name: "p".into(),
            node: format!("vsl-n{i}"),
            node_index: i,
            netns: format!("vsl-n{i}-p"),
            container_id: format!("vsl-n{i}-p"),
            ifname: "eth0".into(),
            ip: ip.parse().unwrap(),
            prefix_len: 24,
            mac: "0a:58:0a:f4:01:02".into(),
            cni_result: serde_json::Value::Null,
            namespace: "default".into(),
            labels: Default::default(),
            host_ports: Vec::new(),
        };
        let pods = vec![pod(1, "10.244.1.2"), pod(2, "10.244.2.2")];
        let base = crate::files::render_config(&nodes[0], &nodes, &[]).unwrap();
        let mut rng = Rng(7);
        for _ in 0..20 {
            let (toml, vips) = random_services(&mut rng, &pods, &nodes);
            let c = Config::parse(&format!("{}{toml}", with_nat(&base))).unwrap();
            assert_eq!(c.services.len(), vips.len());
            assert_eq!(c.nat.udp_timeout, 5);
        }
    }
}
