//! `vswitch-lab bench`: vswitch against the kernel path and Open vSwitch, measured in one run.
//!
//! Every datapath gets the same two-node, three-pod shape: pods `p1` and `p1b` on node 1, `p2` on
//! node 2, pod CIDRs 10.244.{1,2}.0/24, pod MTU 1450, VXLAN between the nodes over a veth
//! underlay. vswitch is built with the lab library (its real vswitchd and CNI plugin); the kernel
//! path (bridge + vxlan, as flannel builds it) and Open vSwitch's userspace datapath are built by
//! the scripts in `deploy/bench/`, compiled into this binary so it runs anywhere.
//!
//! All datapaths are up at once and the repetitions interleave them (rep 1 of each, then rep 2,
//! ...), so a slow minute on a noisy machine hurts all columns alike; the idle datapaths cost
//! nothing while another one is measured. Each number is the median of its repetitions. The
//! machine is shared, so only ratios taken in one run mean much.
//!
//! Every client and server is bounded in time (iperf3 `-t` plus a kill after a deadline), all
//! traffic stays between namespaces this command made, and everything it built is torn down on
//! success, on error and on Ctrl-C (the first one; a second one kills at once).
//!
//! The module is split so the parts that need no root are testable: parsers of iperf3 JSON,
//! ping output, `/proc/stat` and `/proc/PID/stat`; the median; the report's table, JSON and
//! gnuplot script; and the request/response client and server (over loopback).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::{Lab, LabError, LabGuard, LabSpec};

/// The vswitch lab's name (its namespaces are `vbench-*`).
pub const LAB_NAME: &str = "vbench";
/// The lab of vswitch with two datapath workers per node.
pub const LAB_NAME_2W: &str = "vbench2";
/// The lab of vswitch with its datapath on a core of its own.
pub const LAB_NAME_PIN: &str = "vbenchp";
/// The CPU the pinned lab's workers get; its pods run on all the others.
pub const PIN_CPU: u32 = 0;
/// Namespace prefix of the kernel path (`vbk-n1`, `vbk-p1`, ...).
pub const KERNEL_PREFIX: &str = "vbk";
/// Namespace prefix of Open vSwitch (`vbo-n1`, ...).
pub const OVS_PREFIX: &str = "vbo";

const KERNEL_SCRIPT: &str = include_str!("../../bench/kernel-vxlan.sh");
const OVS_SCRIPT: &str = include_str!("../../bench/ovs-netdev.sh");

const IPERF_PORT: u16 = 5201;
const RR_PORT: u16 = 5301;
/// What a client gets on top of its own duration before it is killed.
const GRACE: Duration = Duration::from_secs(15);

/// One of the datapaths compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Vswitch,
    /// vswitch with two datapath workers per node.
    Vswitch2,
    /// vswitch with its workers pinned to a CPU of their own, polling, and the pods kept off it.
    VswitchPin,
    Kernel,
    Ovs,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Vswitch,
        Kind::Vswitch2,
        Kind::VswitchPin,
        Kind::Kernel,
        Kind::Ovs,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Vswitch => "vswitch",
            Kind::Vswitch2 => "vswitch-2w",
            Kind::VswitchPin => "vswitch-pin",
            Kind::Kernel => "kernel",
            Kind::Ovs => "ovs",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Kind::Vswitch => "vswitch (vswitchd, TAP + userspace VXLAN, 1 datapath worker)",
            Kind::Vswitch2 => "vswitch-2w (the same with 2 datapath workers per node)",
            Kind::VswitchPin => {
                "vswitch-pin (1 worker per node pinned to CPU 0 and polling, pods on the other \
                 CPUs: a core set aside for the datapath, as OVS-DPDK's pmd-cpu-mask with \
                 kubelet's reserved CPUs)"
            }
            Kind::Kernel => "kernel (bridge + vxlan, as flannel builds it)",
            Kind::Ovs => "ovs (Open vSwitch userspace datapath, netdev)",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s.trim())
    }
}

/// What is measured; the rows of the table, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Metric {
    TcpCross1,
    TcpCross4,
    TcpSame,
    /// The same two tests with the pods' TCP forced to cubic (Linux's default congestion
    /// control), whatever the host's default is.
    TcpCross1Cubic,
    TcpSameCubic,
    Udp64Rate,
    Udp64Loss,
    Udp64Sent,
    Udp64SocketLoss,
    PingRtt,
    TcpRr,
    ClusterIpTcp,
    ClusterIpRatio,
    CpuPerGb,
    DatapathCpuPerGb,
}

impl Metric {
    pub const ALL: [Metric; 15] = [
        Metric::TcpCross1,
        Metric::TcpCross4,
        Metric::TcpSame,
        Metric::TcpCross1Cubic,
        Metric::TcpSameCubic,
        Metric::Udp64Rate,
        Metric::Udp64Loss,
        Metric::Udp64Sent,
        Metric::Udp64SocketLoss,
        Metric::PingRtt,
        Metric::TcpRr,
        Metric::ClusterIpTcp,
        Metric::ClusterIpRatio,
        Metric::CpuPerGb,
        Metric::DatapathCpuPerGb,
    ];

    /// The key in the JSON document.
    pub fn key(self) -> &'static str {
        match self {
            Metric::TcpCross1 => "tcp_cross_node_1",
            Metric::TcpCross4 => "tcp_cross_node_4",
            Metric::TcpSame => "tcp_same_node",
            Metric::TcpCross1Cubic => "tcp_cross_node_1_cubic",
            Metric::TcpSameCubic => "tcp_same_node_cubic",
            Metric::Udp64Rate => "udp64_delivered",
            Metric::Udp64Loss => "udp64_loss",
            Metric::Udp64Sent => "udp64_sent",
            Metric::Udp64SocketLoss => "udp64_loss_at_receiver_socket",
            Metric::PingRtt => "ping_rtt",
            Metric::TcpRr => "tcp_rr",
            Metric::ClusterIpTcp => "clusterip_tcp",
            Metric::ClusterIpRatio => "clusterip_vs_pod_ip",
            Metric::CpuPerGb => "cpu_per_gb",
            Metric::DatapathCpuPerGb => "datapath_cpu_per_gb",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Metric::TcpCross1 => "cross-node TCP, 1 stream",
            Metric::TcpCross4 => "cross-node TCP, 4 streams",
            Metric::TcpSame => "same-node TCP",
            Metric::TcpCross1Cubic => "cross-node TCP, cubic",
            Metric::TcpSameCubic => "same-node TCP, cubic",
            Metric::Udp64Rate => "UDP 64 B delivered",
            Metric::Udp64Loss => "UDP 64 B loss",
            Metric::Udp64Sent => "UDP 64 B sent",
            Metric::Udp64SocketLoss => "UDP 64 B lost at rcv socket",
            Metric::PingRtt => "ping RTT (avg)",
            Metric::TcpRr => "TCP request/response",
            Metric::ClusterIpTcp => "ClusterIP TCP",
            Metric::ClusterIpRatio => "ClusterIP / pod IP",
            Metric::CpuPerGb => "CPU per GB, machine",
            Metric::DatapathCpuPerGb => "CPU per GB, datapath procs",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Metric::TcpCross1
            | Metric::TcpCross4
            | Metric::TcpSame
            | Metric::TcpCross1Cubic
            | Metric::TcpSameCubic
            | Metric::ClusterIpTcp => "Gbit/s",
            Metric::Udp64Rate | Metric::Udp64Sent => "kpps",
            Metric::Udp64Loss | Metric::Udp64SocketLoss => "%",
            Metric::PingRtt => "ms",
            Metric::TcpRr => "trans/s",
            Metric::ClusterIpRatio => "x",
            Metric::CpuPerGb | Metric::DatapathCpuPerGb => "CPU s/GB",
        }
    }

    pub fn higher_is_better(self) -> bool {
        !matches!(
            self,
            Metric::Udp64Loss
                | Metric::Udp64SocketLoss
                | Metric::PingRtt
                | Metric::CpuPerGb
                | Metric::DatapathCpuPerGb
        )
    }

    /// Whether vswitch/other makes sense (a ratio of loss percentages does not, nor one of
    /// how fast the sending pod could hand datagrams to its interface).
    fn has_ratio(self) -> bool {
        !matches!(
            self,
            Metric::Udp64Loss | Metric::Udp64SocketLoss | Metric::Udp64Sent
        )
    }

    fn decimals(self) -> usize {
        match self {
            Metric::Udp64Rate | Metric::Udp64Sent | Metric::TcpRr => 0,
            Metric::Udp64Loss | Metric::Udp64SocketLoss => 1,
            Metric::PingRtt => 3,
            _ => 2,
        }
    }

    /// A value in this metric's unit, rounded for display.
    pub fn format(self, v: f64) -> String {
        format!("{v:.*}", self.decimals())
    }
}

/// How long each measurement runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Durations {
    /// iperf3 `-t` of each TCP test.
    pub tcp: Duration,
    /// iperf3 `-t` of the UDP test.
    pub udp: Duration,
    /// How long the request/response client runs.
    pub rr: Duration,
    /// `ping -c`.
    pub ping_count: u32,
    /// `ping -i`.
    pub ping_interval: Duration,
}

impl Durations {
    pub fn full() -> Self {
        Durations {
            tcp: Duration::from_secs(5),
            udp: Duration::from_secs(5),
            rr: Duration::from_secs(5),
            ping_count: 20,
            ping_interval: Duration::from_millis(50),
        }
    }

    pub fn quick() -> Self {
        Durations {
            tcp: Duration::from_secs(2),
            udp: Duration::from_secs(2),
            rr: Duration::from_secs(2),
            ..Durations::full()
        }
    }

    /// Every timed test (TCP, UDP, request/response) set to `d`.
    pub fn with_time(self, d: Duration) -> Self {
        Durations {
            tcp: d,
            udp: d,
            rr: d,
            ..self
        }
    }
}

/// What `vswitch-lab bench` was asked to do.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Repetitions of every measurement; the table shows medians.
    pub reps: u32,
    pub quick: bool,
    pub durations: Durations,
    /// The datapaths to build and measure, in column order.
    pub only: Vec<Kind>,
    /// Where latest.json, latest.txt and latest.png go; None writes nothing.
    pub out_dir: Option<PathBuf>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            reps: 3,
            quick: false,
            durations: Durations::full(),
            only: Kind::ALL.to_vec(),
            out_dir: Some(PathBuf::from("docs/benchmarks")),
        }
    }
}

/// Why the bench as a whole could not run (a datapath that fails is reported in its column).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("vswitch-lab bench must run as root: it creates network namespaces")]
    NotRoot,
    #[error("{tool} is not installed; install the Debian package {package}")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error("interrupted; everything the bench built has been torn down")]
    Interrupted,
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("no datapath could be measured: {0}")]
    NothingMeasured(String),
}

// ---------------------------------------------------------------------------------------------
// Parsers and arithmetic (no root needed, unit-tested).

/// A TCP test as iperf3's receiver saw it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TcpResult {
    pub bits_per_second: f64,
    pub bytes: u64,
    pub seconds: f64,
}

/// A UDP test: what the client sent and what the server reported lost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UdpResult {
    pub packets: u64,
    pub lost: u64,
    pub seconds: f64,
}

impl UdpResult {
    /// Packets per second the client sent (handed to its socket).
    pub fn sent_pps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.packets as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// Packets per second that arrived.
    pub fn delivered_pps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.packets.saturating_sub(self.lost) as f64 / self.seconds
        } else {
            0.0
        }
    }

    pub fn loss_percent(&self) -> f64 {
        if self.packets > 0 {
            100.0 * self.lost as f64 / self.packets as f64
        } else {
            100.0
        }
    }
}

fn iperf_doc(text: &str) -> Result<Value, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| {
        let head: String = text.trim().chars().take(200).collect();
        format!("iperf3 printed no JSON ({e}): {head:?}")
    })?;
    if let Some(err) = v.get("error").and_then(Value::as_str) {
        return Err(format!("iperf3: {err}"));
    }
    Ok(v)
}

fn num(v: &Value, what: &str) -> Result<f64, String> {
    v.as_f64()
        .ok_or_else(|| format!("iperf3 JSON has no number at {what}"))
}

/// Parses `iperf3 -c ... -J` of a TCP test (any `-P`): the receiver's sum.
pub fn parse_iperf_tcp(text: &str) -> Result<TcpResult, String> {
    let v = iperf_doc(text)?;
    let s = &v["end"]["sum_received"];
    Ok(TcpResult {
        bits_per_second: num(&s["bits_per_second"], "end.sum_received.bits_per_second")?,
        bytes: num(&s["bytes"], "end.sum_received.bytes")? as u64,
        seconds: num(&s["seconds"], "end.sum_received.seconds")?,
    })
}

/// Parses `iperf3 -u -c ... -J`: packets sent and lost (the server's count) from `end.sum`.
pub fn parse_iperf_udp(text: &str) -> Result<UdpResult, String> {
    let v = iperf_doc(text)?;
    let s = &v["end"]["sum"];
    Ok(UdpResult {
        packets: num(&s["packets"], "end.sum.packets")? as u64,
        lost: num(&s["lost_packets"], "end.sum.lost_packets")?.max(0.0) as u64,
        seconds: num(&s["seconds"], "end.sum.seconds")?,
    })
}

/// The `Udp: RcvbufErrors` counter from a `/proc/net/snmp`: datagrams the kernel dropped
/// because the receiving socket's buffer was full.
pub fn parse_udp_rcvbuf_errors(snmp: &str) -> Result<u64, String> {
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return Err("/proc/net/snmp has no Udp lines".into());
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .ok_or_else(|| format!("/proc/net/snmp has no Udp RcvbufErrors: {values:?}"))
}

/// The average RTT in ms from ping's summary, or why there is none.
pub fn parse_ping_avg(text: &str) -> Result<f64, String> {
    let received = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .and_then(|l| {
            l.split(',')
                .find(|p| p.contains("received"))?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        });
    if received == Some(0) {
        return Err("ping: no replies".into());
    }
    let line = text
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .ok_or_else(|| format!("ping printed no RTT summary: {:?}", text.trim()))?;
    let values = line
        .split('=')
        .nth(1)
        .ok_or_else(|| format!("unexpected ping summary {line:?}"))?;
    values
        .trim()
        .split('/')
        .nth(1)
        .and_then(|a| a.trim().parse::<f64>().ok())
        .ok_or_else(|| format!("unexpected ping summary {line:?}"))
}

/// The machine's CPU time from the first line of /proc/stat, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTimes {
    /// user + nice + system + irq + softirq + steal (guest time is inside user already).
    pub busy: u64,
    /// busy + idle + iowait.
    pub total: u64,
}

pub fn parse_proc_stat(text: &str) -> Result<CpuTimes, String> {
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or("/proc/stat has no cpu line")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| {
            x.parse::<u64>()
                .map_err(|e| format!("/proc/stat: {x:?}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    if f.len() < 8 {
        return Err(format!("/proc/stat cpu line has {} fields", f.len()));
    }
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    let busy = f[0] + f[1] + f[2] + f[5] + f[6] + f[7];
    Ok(CpuTimes {
        busy,
        total: busy + f[3] + f[4],
    })
}

/// Busy CPU seconds between two snapshots.
pub fn busy_seconds(before: CpuTimes, after: CpuTimes, ticks_per_second: u64) -> f64 {
    after.busy.saturating_sub(before.busy) as f64 / ticks_per_second.max(1) as f64
}

/// utime + stime (clock ticks, all threads) from /proc/PID/stat.
pub fn parse_pid_stat(text: &str) -> Result<u64, String> {
    // The command name is in parentheses and may hold spaces: split after the last ')'.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or("no ')' in /proc/PID/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let get = |i: usize| -> Result<u64, String> {
        f.get(i)
            .and_then(|x| x.parse().ok())
            .ok_or_else(|| format!("/proc/PID/stat field {} missing", i + 3))
    };
    Ok(get(11)? + get(12)?)
}

/// Whether a /proc/PID/net/tcp{,6} table has a socket listening on `port`.
pub fn tcp_table_listens(table: &str, port: u16) -> bool {
    let want = format!("{port:04X}");
    table.lines().skip(1).any(|l| {
        let mut f = l.split_whitespace();
        let local = f.nth(1).unwrap_or("");
        let state = f.nth(1).unwrap_or("");
        state == "0A" && local.rsplit_once(':').is_some_and(|(_, p)| p == want)
    })
}

/// The median (mean of the middle two for an even count); None when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a Unix time.
pub fn utc_timestamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

// ---------------------------------------------------------------------------------------------
// The report: samples in, table / JSON / chart out.

/// What one cell of the table holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    /// The median of the samples.
    Value(f64),
    /// Not applicable to this datapath, or not built yet (the reason).
    NotApplicable(String),
    /// Every attempt failed (the last error).
    Error(String),
    /// The datapath was not selected.
    NotRun,
}

/// A target from the issue, checked against the run.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub text: &'static str,
    /// "PASS", "FAIL" or "n/a".
    pub status: &'static str,
    pub detail: String,
}

/// Everything one run measured.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub date: String,
    pub commit: Option<String>,
    pub kernel: String,
    /// The processor, as /proc/cpuinfo names it (the machine a run is to be compared with).
    pub cpu_model: String,
    /// The host's default TCP congestion control, which the pods inherit.
    pub tcp_cc: String,
    pub cpus: usize,
    pub reps: u32,
    pub quick: bool,
    pub durations: Option<Durations>,
    pub datapaths: Vec<Kind>,
    pub samples: BTreeMap<(Metric, Kind), Vec<f64>>,
    pub errors: BTreeMap<(Metric, Kind), String>,
    pub not_applicable: BTreeMap<(Metric, Kind), String>,
    /// A datapath that did not come up at all.
    pub datapath_errors: BTreeMap<Kind, String>,
    /// What a thread wake-up costs on this machine, measured before any testbed came up; or
    /// why it could not be.
    pub wake: Option<Result<crate::wake::WakeCost, String>>,
}

/// The header line on what a wake-up costs here (see [`crate::wake`]).
fn wake_text(w: &Result<crate::wake::WakeCost, String>) -> String {
    match w {
        Ok(w) => format!(
            "wake-up round trip between two threads: {:.1} µs across CPUs ({:.1} µs after {} ms idle), {:.1} µs on one CPU ({:.1} µs after idle)",
            w.cross_busy_us,
            w.cross_idle_us,
            w.idle.as_millis(),
            w.same_busy_us,
            w.same_idle_us
        ),
        Err(e) => format!("wake-up round trip between two threads: not measured ({e})"),
    }
}

/// The notes printed under the table and stored in the JSON.
pub const NOTES: [&str; 8] = [
    "Each value is the median of the repetitions. In each repetition every datapath ran a test before the next test began, so the values a ratio compares were measured seconds apart; the machine is shared and its speed drifts over minutes, so compare ratios, not absolute numbers.",
    "CPU per GB, machine: whole-machine busy CPU time from /proc/stat deltas (user+nice+system+irq+softirq+steal) during the cross-node 1-stream TCP test, divided by the GB iperf3 delivered. It includes iperf3 and softirq/system time (the only place the kernel path's work shows) and anything else running on the machine, the same for every datapath.",
    "CPU per GB, datapath procs: utime+stime of vswitchd / ovs-vswitchd over the same test; the kernel path has no such process (n/a).",
    "TCP request/response: 1-byte ping-pong over one TCP connection (TCP_NODELAY) between pods on two nodes, transactions per second.",
    "TCP congestion control: the pods inherit the host's default (in the header line); the cubic rows force cubic (iperf3 -C cubic), Linux's own default. BBR paces every burst with a timer, which both paths pay and which changes the ratios a lot: the targets are judged on the default rows.",
    "UDP 64 B: iperf3 -u -b 0 -l 64 across nodes. sent is the rate the client handed datagrams to its socket; lost at rcv socket is the part of the loss the receiving pod's kernel dropped because iperf3 had not read its socket buffer yet (Udp RcvbufErrors in its namespace); the rest was lost on the way. On the kernel path the sending pod's own system call carries each datagram through both nodes' stacks into the receiver's socket, which holds the sender to the receiver's pace; a switch in its own thread or process takes datagrams as fast as the sender makes them.",
    "Wake-up round trip (header): the median time for one byte to go from a thread to another and back over a socket pair, each thread blocked in read until the other writes, measured before the testbeds came up. Every hop that hands a packet to another thread (pod to switch, switch to switch, switch to pod) pays one wake-up, and a request after a pause, such as each ping here, pays the after-idle figure: an idle vCPU halts, and waking it takes a trip through the hypervisor. The kernel path carries a ping from the pinging sendto to the reply in one softirq without crossing threads; a userspace switch crosses three or four, so on a machine with slow wake-ups the ping and request/response ratios say more about the machine than about the switch.",
    "vswitch-pin: both lab nodes' workers share CPU 0 (the nodes are namespaces of one machine) and every pod program runs under taskset on the other CPUs; the kernel path and OVS run unpinned, as their users run them. Between its own tests its vswitchd processes are stopped (SIGSTOP), so its polling workers cannot take CPU 0 during another datapath's. The targets are judged on plain vswitch; vswitch-pin's ratio follows each.",
];

impl Report {
    pub fn add(&mut self, m: Metric, k: Kind, v: f64) {
        self.samples.entry((m, k)).or_default().push(v);
    }

    pub fn cell(&self, m: Metric, k: Kind) -> Cell {
        if !self.datapaths.contains(&k) {
            return Cell::NotRun;
        }
        if let Some(v) = self.samples.get(&(m, k)).and_then(|s| median(s)) {
            return Cell::Value(v);
        }
        if let Some(r) = self.not_applicable.get(&(m, k)) {
            return Cell::NotApplicable(r.clone());
        }
        if let Some(e) = self.datapath_errors.get(&k) {
            return Cell::Error(e.clone());
        }
        Cell::Error(
            self.errors
                .get(&(m, k))
                .cloned()
                .unwrap_or_else(|| "not measured".into()),
        )
    }

    pub fn value(&self, m: Metric, k: Kind) -> Option<f64> {
        match self.cell(m, k) {
            Cell::Value(v) => Some(v),
            _ => None,
        }
    }

    /// vswitch's median over `other`'s.
    pub fn ratio(&self, m: Metric, other: Kind) -> Option<f64> {
        self.ratio_of(m, Kind::Vswitch, other)
    }

    /// `who`'s median over `other`'s.
    pub fn ratio_of(&self, m: Metric, who: Kind, other: Kind) -> Option<f64> {
        if !m.has_ratio() {
            return None;
        }
        let a = self.value(m, who)?;
        let b = self.value(m, other)?;
        (b != 0.0).then(|| a / b)
    }

    /// The issue's targets, each PASS, FAIL or n/a.
    pub fn targets(&self) -> Vec<Target> {
        struct Def {
            text: &'static str,
            metric: Metric,
            /// vswitch's value over this datapath's, or vswitch's value itself.
            against: Option<Kind>,
            at_least: bool,
            bound: f64,
        }
        let def = |text, metric, against, at_least, bound| Def {
            text,
            metric,
            against,
            at_least,
            bound,
        };
        let (k, o) = (Some(Kind::Kernel), Some(Kind::Ovs));
        let defs = [
            def(
                "cross-node TCP >= 0.7x the kernel path",
                Metric::TcpCross1,
                k,
                true,
                0.7,
            ),
            def(
                "cross-node TCP >= 8x Open vSwitch userspace",
                Metric::TcpCross1,
                o,
                true,
                8.0,
            ),
            def(
                "same-node TCP >= 0.9x the kernel path",
                Metric::TcpSame,
                k,
                true,
                0.9,
            ),
            def(
                "UDP 64-byte at iperf3's full rate: loss <= 1%",
                Metric::Udp64Loss,
                None,
                false,
                1.0,
            ),
            def(
                "ping RTT <= 2x the kernel path",
                Metric::PingRtt,
                k,
                false,
                2.0,
            ),
            def(
                "ClusterIP throughput >= 0.95x pod IP",
                Metric::ClusterIpRatio,
                None,
                true,
                0.95,
            ),
        ];
        defs.iter()
            .map(|d| {
                let (value, shown) = match d.against {
                    Some(k) => {
                        let r = self.ratio(d.metric, k);
                        (r, r.map(|r| format!("{r:.2}x")))
                    }
                    None => {
                        let v = self.value(d.metric, Kind::Vswitch);
                        (
                            v,
                            v.map(|v| format!("{}{}", d.metric.format(v), d.metric.unit())),
                        )
                    }
                };
                let need = match d.against {
                    Some(_) => format!("{}{}x", if d.at_least { ">= " } else { "<= " }, d.bound),
                    None => format!(
                        "{}{}{}",
                        if d.at_least { ">= " } else { "<= " },
                        d.bound,
                        d.metric.unit()
                    ),
                };
                // The pinned variant's standing, for the reader (the target is plain vswitch's).
                let pinned = match d.against {
                    Some(k) => self
                        .ratio_of(d.metric, Kind::VswitchPin, k)
                        .map(|r| format!("{r:.2}x")),
                    None => self
                        .value(d.metric, Kind::VswitchPin)
                        .map(|v| format!("{}{}", d.metric.format(v), d.metric.unit())),
                };
                // After the verdict: the pinned variant's standing, and the UDP breakdown.
                let extra = pinned
                    .map(|p| format!("; vswitch-pin {p}"))
                    .unwrap_or_default()
                    + &self.udp_loss_detail(d.metric);
                match (value, shown) {
                    (Some(v), Some(s)) => {
                        let ok = if d.at_least {
                            v >= d.bound
                        } else {
                            v <= d.bound
                        };
                        Target {
                            text: d.text,
                            status: if ok { "PASS" } else { "FAIL" },
                            detail: format!("{s} (needs {need}){extra}"),
                        }
                    }
                    _ => {
                        let why = match self.cell(d.metric, Kind::Vswitch) {
                            Cell::NotApplicable(r) => r,
                            _ => "not measured in this run".into(),
                        };
                        Target {
                            text: d.text,
                            status: "n/a",
                            detail: why,
                        }
                    }
                }
            })
            .chain(self.worker_targets())
            .collect()
    }

    /// For the UDP loss target: how much of vswitch's loss the receiving pod's socket dropped,
    /// and how fast its sender and the kernel path's sent.
    fn udp_loss_detail(&self, m: Metric) -> String {
        if m != Metric::Udp64Loss {
            return String::new();
        }
        let mut s = String::new();
        if let Some(v) = self.value(Metric::Udp64SocketLoss, Kind::Vswitch) {
            s += &format!("; {v:.1}% at the receiving pod's socket");
        }
        let sent = |k| self.value(Metric::Udp64Sent, k);
        if let (Some(v), Some(k)) = (sent(Kind::Vswitch), sent(Kind::Kernel)) {
            s += &format!("; sent {v:.0} kpps, the kernel path's sender {k:.0}");
        }
        s
    }

    /// "Two workers never slower than one": vswitch-2w's cross-node TCP over vswitch's, for one
    /// stream and four. A 5% margin is the run-to-run noise of one median on a shared machine.
    fn worker_targets(&self) -> Vec<Target> {
        [
            (
                "two workers not slower than one: 4 streams",
                Metric::TcpCross4,
            ),
            (
                "two workers not slower than one: 1 stream",
                Metric::TcpCross1,
            ),
        ]
        .into_iter()
        .map(
            |(text, m)| match (self.value(m, Kind::Vswitch2), self.value(m, Kind::Vswitch)) {
                (Some(two), Some(one)) if one > 0.0 => {
                    let r = two / one;
                    Target {
                        text,
                        status: if r >= 0.95 { "PASS" } else { "FAIL" },
                        detail: format!(
                            "{} vs {} {}: {r:.2}x (needs >= 0.95x)",
                            m.format(two),
                            m.format(one),
                            m.unit()
                        ),
                    }
                }
                _ => Target {
                    text,
                    status: "n/a",
                    detail: "vswitch and vswitch-2w were not both measured".into(),
                },
            },
        )
        .collect()
    }

    fn cell_text(&self, m: Metric, k: Kind) -> String {
        match self.cell(m, k) {
            Cell::Value(v) => m.format(v),
            Cell::NotApplicable(_) => "n/a".into(),
            Cell::Error(_) => "error".into(),
            Cell::NotRun => "-".into(),
        }
    }

    fn ratio_text(&self, m: Metric, who: Kind, k: Kind) -> String {
        if !m.has_ratio() {
            return "".into();
        }
        match self.ratio_of(m, who, k) {
            Some(r) => format!("{r:.2}x"),
            None => "-".into(),
        }
    }

    /// The table, the targets and the notes, as printed.
    pub fn to_table(&self) -> String {
        let mut rows: Vec<Vec<String>> = vec![vec![
            "metric".into(),
            "unit".into(),
            "vswitch".into(),
            "vswitch-2w".into(),
            "vswitch-pin".into(),
            "kernel".into(),
            "ovs".into(),
            "vswitch/kernel".into(),
            "vswitch/ovs".into(),
            "pin/kernel".into(),
        ]];
        for m in Metric::ALL {
            rows.push(vec![
                m.label().into(),
                m.unit().into(),
                self.cell_text(m, Kind::Vswitch),
                self.cell_text(m, Kind::Vswitch2),
                self.cell_text(m, Kind::VswitchPin),
                self.cell_text(m, Kind::Kernel),
                self.cell_text(m, Kind::Ovs),
                self.ratio_text(m, Kind::Vswitch, Kind::Kernel),
                self.ratio_text(m, Kind::Vswitch, Kind::Ovs),
                self.ratio_text(m, Kind::VswitchPin, Kind::Kernel),
            ]);
        }
        let mut w = [0usize; 10];
        for r in &rows {
            for (i, c) in r.iter().enumerate() {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        let _ = writeln!(
            out,
            "vswitch-lab bench {} ({} rep{}, {}), {}, kernel {}, {} CPUs, pods' TCP {}{}",
            self.date,
            self.reps,
            if self.reps == 1 { "" } else { "s" },
            if self.quick { "quick" } else { "full" },
            if self.cpu_model.is_empty() {
                "CPU model unknown"
            } else {
                &self.cpu_model
            },
            self.kernel,
            self.cpus,
            if self.tcp_cc.is_empty() {
                "?"
            } else {
                &self.tcp_cc
            },
            self.commit
                .as_ref()
                .map(|c| format!(", commit {c}"))
                .unwrap_or_default()
        );
        if let Some(w) = &self.wake {
            let _ = writeln!(out, "{}", wake_text(w));
        }
        out.push('\n');
        for r in &rows {
            let mut line = format!("{:<w0$}  {:<w1$}", r[0], r[1], w0 = w[0], w1 = w[1]);
            for (c, width) in r.iter().zip(w).skip(2) {
                let _ = write!(line, "  {c:>width$}");
            }
            let _ = writeln!(out, "{line}");
        }
        out.push_str("\ntargets (issue 4):\n");
        for t in self.targets() {
            let _ = writeln!(out, "  {:<4}  {:<46}  {}", t.status, t.text, t.detail);
        }
        let problems = self.problems();
        if !problems.is_empty() {
            out.push_str("\nproblems:\n");
            for p in problems {
                let _ = writeln!(out, "  {p}");
            }
        }
        out.push_str("\nnotes:\n");
        for n in NOTES {
            let _ = writeln!(out, "  - {n}");
        }
        for (k, reason) in self.na_reasons() {
            let _ = writeln!(out, "  - n/a for {k}: {reason}");
        }
        out
    }

    /// Distinct n/a reasons, for the notes.
    fn na_reasons(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for ((m, k), r) in &self.not_applicable {
            if self.samples.contains_key(&(*m, *k)) || !self.datapaths.contains(k) {
                continue;
            }
            let what = format!("{} ({})", m.label(), k.name());
            if let Some(e) = out.iter_mut().find(|(_, rr)| rr == r) {
                e.0.push_str(", ");
                e.0.push_str(&what);
            } else {
                out.push((what, r.clone()));
            }
        }
        out
    }

    /// Datapaths that did not come up and measurements that failed every time.
    pub fn problems(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .datapath_errors
            .iter()
            .map(|(k, e)| format!("{}: {e}", k.name()))
            .collect();
        for ((m, k), e) in &self.errors {
            if self.datapath_errors.contains_key(k) {
                continue;
            }
            let ok = self.samples.get(&(*m, *k)).is_some_and(|s| !s.is_empty());
            out.push(format!(
                "{} {}: {}{e}",
                k.name(),
                m.label(),
                if ok {
                    "failed in some repetitions: "
                } else {
                    ""
                }
            ));
        }
        out
    }

    /// The JSON document written to latest.json.
    pub fn to_json(&self) -> Value {
        let metrics: Vec<Value> = Metric::ALL
            .iter()
            .map(|&m| {
                let mut values = serde_json::Map::new();
                for k in Kind::ALL {
                    let cell = match self.cell(m, k) {
                        Cell::Value(v) => json!({
                            "median": v,
                            "samples": self.samples.get(&(m, k)).cloned().unwrap_or_default(),
                        }),
                        Cell::NotApplicable(r) => json!({ "median": null, "n/a": r }),
                        Cell::Error(e) => json!({ "median": null, "error": e }),
                        Cell::NotRun => json!({ "median": null, "not_run": true }),
                    };
                    values.insert(k.name().into(), cell);
                }
                json!({
                    "key": m.key(),
                    "label": m.label(),
                    "unit": m.unit(),
                    "better": if m.higher_is_better() { "higher" } else { "lower" },
                    "values": values,
                    "ratios": {
                        "vswitch/kernel": self.ratio(m, Kind::Kernel),
                        "vswitch/ovs": self.ratio(m, Kind::Ovs),
                        "vswitch-pin/kernel": self.ratio_of(m, Kind::VswitchPin, Kind::Kernel),
                        "vswitch-pin/ovs": self.ratio_of(m, Kind::VswitchPin, Kind::Ovs),
                    },
                })
            })
            .collect();
        let targets: Vec<Value> = self
            .targets()
            .iter()
            .map(|t| json!({ "target": t.text, "status": t.status, "detail": t.detail }))
            .collect();
        let d = self.durations.clone().unwrap_or_else(Durations::full);
        json!({
            "tool": "vswitch-lab bench",
            "date": self.date,
            "commit": self.commit,
            "host": {
                "cpu_model": self.cpu_model,
                "kernel": self.kernel,
                "cpus": self.cpus,
                "tcp_congestion_control": self.tcp_cc,
                "wakeup_round_trip_us": match &self.wake {
                    Some(Ok(w)) => json!({
                        "cross_cpu": w.cross_busy_us,
                        "cross_cpu_after_idle": w.cross_idle_us,
                        "same_cpu": w.same_busy_us,
                        "same_cpu_after_idle": w.same_idle_us,
                        "idle_seconds": w.idle.as_secs_f64(),
                    }),
                    Some(Err(e)) => json!({ "error": e }),
                    None => Value::Null,
                },
            },
            "config": {
                "reps": self.reps,
                "quick": self.quick,
                "tcp_seconds": d.tcp.as_secs_f64(),
                "udp_seconds": d.udp.as_secs_f64(),
                "rr_seconds": d.rr.as_secs_f64(),
                "ping_count": d.ping_count,
                "ping_interval_seconds": d.ping_interval.as_secs_f64(),
            },
            "datapaths": Kind::ALL.iter().map(|k| json!({
                "name": k.name(),
                "what": k.describe(),
                "measured": self.datapaths.contains(k) && !self.datapath_errors.contains_key(k),
                "error": self.datapath_errors.get(k),
            })).collect::<Vec<_>>(),
            "metrics": metrics,
            "targets": targets,
            "problems": self.problems(),
            "notes": NOTES,
        })
    }

    /// A gnuplot script drawing one bar chart per metric that has a value, into `png`.
    pub fn gnuplot_script(&self, png: &Path) -> String {
        let panels: Vec<Metric> = Metric::ALL
            .into_iter()
            .filter(|&m| Kind::ALL.iter().any(|&k| self.value(m, k).is_some()))
            .collect();
        let cols = 3;
        let rows = panels.len().div_ceil(cols).max(1);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "set terminal pngcairo size 1500,{} font 'sans,10'",
            rows * 330 + 60
        );
        let _ = writeln!(s, "set output '{}'", gp_escape(&png.display().to_string()));
        s.push_str(
            "set style fill solid 0.85 border -1\nset boxwidth 0.6\nset grid ytics\n\
             set linetype 1 lc rgb '#d1495b'\nset linetype 2 lc rgb '#00798c'\n\
             set linetype 3 lc rgb '#8d6a9f'\nset linetype 4 lc rgb '#edae49'\n\
             set linetype 5 lc rgb '#66a182'\nunset key\n",
        );
        let _ = writeln!(s, "set xrange [-0.6:{}.6]", Kind::ALL.len() - 1);
        for (i, &m) in panels.iter().enumerate() {
            let _ = writeln!(s, "$d{i} << EOD");
            // x, name, value, colour, label; a datapath without a value gets an empty bar
            // labelled with why.
            for (j, &k) in Kind::ALL.iter().enumerate() {
                let (v, label) = match self.cell(m, k) {
                    Cell::Value(v) => (v, m.format(v)),
                    Cell::NotApplicable(_) => (0.0, "n/a".into()),
                    Cell::Error(_) => (0.0, "error".into()),
                    Cell::NotRun => (0.0, "not run".into()),
                };
                let _ = writeln!(s, "{j} \"{}\" {v} {} \"{label}\"", k.name(), j + 1);
            }
            s.push_str("EOD\n");
        }
        let _ = writeln!(
            s,
            "set multiplot layout {rows},{cols} title \"vswitch-lab bench {}: medians of {} rep{} ({})\" font 'sans,13'",
            gp_escape(&self.date),
            self.reps,
            if self.reps == 1 { "" } else { "s" },
            if self.quick { "quick" } else { "full" },
        );
        for (i, &m) in panels.iter().enumerate() {
            let max = Kind::ALL
                .iter()
                .filter_map(|&k| self.value(m, k))
                .fold(0.0f64, f64::max);
            let top = if max > 0.0 { max * 1.25 } else { 1.0 };
            let _ = writeln!(
                s,
                "set title \"{} ({}, {} is better)\"\nset yrange [0:{top}]",
                gp_escape(m.label()),
                gp_escape(m.unit()),
                if m.higher_is_better() {
                    "higher"
                } else {
                    "lower"
                }
            );
            let _ = writeln!(
                s,
                "plot $d{i} using 1:3:4:xtic(2) with boxes lc variable, \
                 '' using 1:3:5 with labels offset 0,0.8"
            );
        }
        s.push_str("unset multiplot\n");
        s
    }
}

fn gp_escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\'', "")
}

// ---------------------------------------------------------------------------------------------
// Request/response: the hidden `rr-server` and `rr-client` subcommands.

/// What `rr-client` prints (as JSON on one line).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RrResult {
    pub transactions: u64,
    pub seconds: f64,
}

impl RrResult {
    pub fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.transactions as f64 / self.seconds
        } else {
            0.0
        }
    }

    pub fn to_json(&self) -> String {
        json!({ "transactions": self.transactions, "seconds": self.seconds, "rate": self.rate() })
            .to_string()
    }

    pub fn from_json(text: &str) -> Result<RrResult, String> {
        let v: Value = serde_json::from_str(text.trim())
            .map_err(|e| format!("rr-client printed {:?}: {e}", text.trim()))?;
        Ok(RrResult {
            transactions: v["transactions"]
                .as_u64()
                .ok_or("rr-client JSON has no transactions")?,
            seconds: v["seconds"]
                .as_f64()
                .ok_or("rr-client JSON has no seconds")?,
        })
    }
}

/// Serves one connection on `listener`: echoes each byte back until the client closes.
/// Gives up (Ok) after `timeout` without a client; the process is expected to be short-lived.
pub fn rr_serve(listener: TcpListener, timeout: Duration) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let (mut s, _) = loop {
        match listener.accept() {
            Ok(c) => break c,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Ok(());
                }
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    };
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => return Ok(()),
            Ok(_) => s.write_all(&b)?,
            Err(e) => return Err(e),
        }
    }
}

/// `rr-server`: listen on `bind`, serve one client, exit; never longer than `timeout` idle.
pub fn rr_server(bind: SocketAddr, timeout: Duration) -> io::Result<()> {
    rr_serve(TcpListener::bind(bind)?, timeout)
}

/// `rr-client`: one connection, 1-byte request and 1-byte response, as many as fit in
/// `duration`.
pub fn rr_client(addr: SocketAddr, duration: Duration) -> io::Result<RrResult> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let start = Instant::now();
    let mut n = 0u64;
    let mut b = [0u8; 1];
    while start.elapsed() < duration {
        s.write_all(b"x")?;
        s.read_exact(&mut b)?;
        n += 1;
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(RrResult {
        transactions: n,
        seconds,
    })
}

// ---------------------------------------------------------------------------------------------
// Processes: bounded, interruptible.

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: nix::libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// SIGINT, SIGTERM and SIGHUP set a flag the bench checks between (and during) steps; the
/// handler resets itself, so a second Ctrl-C kills at once.
fn install_signal_handlers() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let act = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESETHAND | SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let _ = unsafe { sigaction(sig, &act) };
    }
}

struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.len() > 60 {
            s.push_str(" ...");
        } else {
            s.push(' ');
            s.push_str(&a);
        }
    }
    s
}

fn reader<R: Read + Send + 'static>(r: Option<R>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Runs a command with a deadline; it is killed on timeout or Ctrl-C.
fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<Finished, String> {
    run_until(cmd, timeout, true)
}

/// Runs a command with a deadline, and (if `interruptible`) until Ctrl-C. Teardown is not
/// interruptible: it is what Ctrl-C asks for.
fn run_until(
    cmd: &mut Command,
    timeout: Duration,
    interruptible: bool,
) -> Result<Finished, String> {
    let what = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: {e}"))?;
    let out = reader(child.stdout.take());
    let err = reader(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Ok(st),
            Ok(None) if interruptible && interrupted() => break Err("interrupted".to_string()),
            Ok(None) if Instant::now() >= deadline => {
                break Err(format!("timed out after {}s", timeout.as_secs()))
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => break Err(e.to_string()),
        }
    };
    if status.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    match status {
        Ok(status) => Ok(Finished {
            status,
            stdout,
            stderr,
        }),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

/// Like [`run_bounded`], and a non-zero exit is an error with the tail of stderr.
fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<String, String> {
    let what = describe(cmd);
    let f = run_bounded(cmd, timeout)?;
    success(&what, f)
}

/// The stdout of a command that exited 0, else its status and the tail of its stderr.
fn success(what: &str, f: Finished) -> Result<String, String> {
    if f.status.success() {
        Ok(f.stdout)
    } else {
        let tail: Vec<&str> = f.stderr.lines().rev().take(6).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Err(format!("{what}: {}: {}", f.status, tail.join(" | ")))
    }
}

fn in_netns(netns: &str, argv: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", netns]).args(argv);
    c
}

/// A server in a pod, killed when dropped.
struct Server {
    child: Child,
    what: String,
}

impl Server {
    /// Starts `argv` in `pod` and waits until it listens on TCP `port` there.
    fn start(pod: &PodRef, argv: &[&str], program: &str, port: u16) -> Result<Server, String> {
        let mut cmd = in_pod(pod, argv);
        let what = describe(&cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{what}: {e}"))?;
        let mut server = Server { child, what };
        server.wait_listening(program, port)?;
        Ok(server)
    }

    fn wait_listening(&mut self, program: &str, port: u16) -> Result<(), String> {
        let pid = self.child.id();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(format!("{} exited ({st}) before listening", self.what));
            }
            // `ip netns exec` enters the namespace and execs: once the process is `program`,
            // its /proc/PID/net is the pod's.
            let exec_done = fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|p| p.file_name().is_some_and(|n| n == program));
            if exec_done {
                let listening = ["tcp", "tcp6"].iter().any(|t| {
                    fs::read_to_string(format!("/proc/{pid}/net/{t}"))
                        .is_ok_and(|s| tcp_table_listens(&s, port))
                });
                if listening {
                    return Ok(());
                }
            }
            if interrupted() {
                return Err("interrupted".into());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} is not listening on port {port} after 5s",
                    self.what
                ));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A one-shot server normally exits by itself right after its client; give it a moment.
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_cpu() -> Result<CpuTimes, String> {
    let text = fs::read_to_string("/proc/stat").map_err(|e| format!("/proc/stat: {e}"))?;
    parse_proc_stat(&text)
}

/// utime + stime of all `pids` (clock ticks); None if one of them is gone.
fn read_pids_cpu(pids: &[u32]) -> Option<u64> {
    pids.iter()
        .map(|p| {
            fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| parse_pid_stat(&s).ok())
        })
        .sum()
}

fn ticks_per_second() -> u64 {
    use nix::unistd::{sysconf, SysconfVar};
    match sysconf(SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as u64,
        _ => 100,
    }
}

// ---------------------------------------------------------------------------------------------
// Testbeds: one topology per datapath.

/// A pod of a testbed.
#[derive(Debug, Clone)]
pub struct PodRef {
    pub netns: String,
    pub ip: Ipv4Addr,
    /// The CPUs its programs run on (`taskset -c`), when kept off the datapath's.
    pub cpus: Option<String>,
}

/// `argv` as a program of `pod`: in its namespace, on its CPUs.
fn in_pod(pod: &PodRef, argv: &[&str]) -> Command {
    match &pod.cpus {
        Some(cpus) => {
            let mut all = vec!["taskset", "-c", cpus.as_str()];
            all.extend_from_slice(argv);
            in_netns(&pod.netns, &all)
        }
        None => in_netns(&pod.netns, argv),
    }
}

/// The three pods every testbed has.
#[derive(Debug, Clone)]
pub struct Pods {
    /// Node 1.
    pub p1: PodRef,
    /// Node 1, next to p1.
    pub p1b: PodRef,
    /// Node 2.
    pub p2: PodRef,
}

enum Bed {
    Vswitch(LabGuard),
    Script {
        kind: Kind,
        script: &'static str,
        prefix: &'static str,
    },
}

/// A datapath's topology, torn down on drop.
struct Testbed {
    kind: Kind,
    pods: Pods,
    /// None once torn down.
    bed: Option<Bed>,
    /// The datapath processes whose CPU time is counted (empty for the kernel path).
    pids: Vec<u32>,
}

fn lab_err(e: LabError) -> String {
    e.to_string()
}

fn script_cmd(kind: Kind, script: &str, prefix: &str, verb: &str) -> Command {
    let mut c = Command::new("bash");
    let name = match kind {
        Kind::Ovs => "ovs-netdev.sh",
        _ => "kernel-vxlan.sh",
    };
    c.arg("-c")
        .arg(script)
        .arg(name)
        .arg(verb)
        .env("BENCH_PREFIX", prefix);
    c
}

fn script_pods(prefix: &str) -> Pods {
    let pod = |n: &str, ip: [u8; 4]| PodRef {
        netns: format!("{prefix}-{n}"),
        ip: Ipv4Addr::from(ip),
        cpus: None,
    };
    Pods {
        p1: pod("p1", [10, 244, 1, 2]),
        p1b: pod("p1b", [10, 244, 1, 3]),
        p2: pod("p2", [10, 244, 2, 2]),
    }
}

impl Testbed {
    /// Stops (`hold`) or continues the polling testbed's datapath processes. Between its own
    /// tests vswitch-pin's workers would otherwise poll CPU 0 at times under another
    /// datapath's measurement (an idle pinned lab's workers used 11% and 17% of a CPU over 5 s,
    /// seconds after its last traffic: the pods' IPv6 router solicitations, which Linux repeats
    /// for an hour, each open a 1 s polling window); the plain datapaths spin only 200 µs after
    /// a frame and are left alone.
    fn hold(&self, hold: bool, log: &mut dyn FnMut(&str)) {
        let (Kind::VswitchPin, Some(Bed::Vswitch(lab))) = (self.kind, &self.bed) else {
            return;
        };
        for node in &lab.nodes {
            let Some(pid) = node.pid else { continue };
            if let Err(e) = crate::sys::hold_process(pid, node.config.as_os_str(), hold) {
                log(&format!("{}: {e}", self.kind.name()));
            }
        }
    }

    fn up(kind: Kind) -> Result<Testbed, String> {
        match kind {
            Kind::Vswitch => Testbed::up_vswitch(kind, LabSpec::new(LAB_NAME, 2, 0)),
            Kind::Vswitch2 => {
                Testbed::up_vswitch(kind, LabSpec::new(LAB_NAME_2W, 2, 0).with_workers(2))
            }
            Kind::VswitchPin => Testbed::up_vswitch(
                kind,
                LabSpec::new(LAB_NAME_PIN, 2, 0).with_dedicated_cpus(vec![PIN_CPU]),
            ),
            Kind::Kernel => Testbed::up_script(kind, KERNEL_SCRIPT, KERNEL_PREFIX),
            Kind::Ovs => Testbed::up_script(kind, OVS_SCRIPT, OVS_PREFIX),
        }
    }

    fn up_vswitch(kind: Kind, spec: LabSpec) -> Result<Testbed, String> {
        // Leftovers of a run that was killed.
        Lab::teardown(&spec.name).map_err(lab_err)?;
        let mut lab = LabGuard::up(spec).map_err(lab_err)?;
        // With the datapath on cores of its own, the pods' programs run on the others, where
        // the lab's `exec` runs them too.
        let cpus = lab.pod_cpus().map_err(lab_err)?;
        let mut pod = |node: u32, name: &str| -> Result<PodRef, String> {
            let p = lab.add_pod(node, name).map_err(lab_err)?;
            match p.ip {
                std::net::IpAddr::V4(ip) => Ok(PodRef {
                    netns: p.netns.clone(),
                    ip,
                    cpus: cpus.clone(),
                }),
                other => Err(format!("pod {} got {other}, not IPv4", p.name)),
            }
        };
        let pods = Pods {
            p1: pod(1, "p1")?,
            p1b: pod(1, "p1b")?,
            p2: pod(2, "p2")?,
        };
        let pids = lab.nodes.iter().filter_map(|n| n.pid).collect();
        Ok(Testbed {
            kind,
            pods,
            bed: Some(Bed::Vswitch(lab)),
            pids,
        })
    }

    fn up_script(
        kind: Kind,
        script: &'static str,
        prefix: &'static str,
    ) -> Result<Testbed, String> {
        let mut bed = Testbed {
            kind,
            pods: script_pods(prefix),
            bed: Some(Bed::Script {
                kind,
                script,
                prefix,
            }),
            pids: Vec::new(),
        };
        // On failure `bed` drops here, which runs `down`.
        run_ok(
            &mut script_cmd(kind, script, prefix, "up"),
            Duration::from_secs(120),
        )?;
        let pids = run_ok(
            &mut script_cmd(kind, script, prefix, "pids"),
            Duration::from_secs(10),
        )?;
        bed.pids = pids.lines().filter_map(|l| l.trim().parse().ok()).collect();
        Ok(bed)
    }

    /// Waits until p1 reaches p2 and p1b (OVS takes a moment to learn).
    fn wait_connected(&self) -> Result<(), String> {
        for to in [&self.pods.p2, &self.pods.p1b] {
            let ip = to.ip.to_string();
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let r = run_bounded(
                    &mut in_pod(&self.pods.p1, &["ping", "-c", "1", "-W", "1", &ip]),
                    Duration::from_secs(5),
                );
                if matches!(&r, Ok(f) if f.status.success()) {
                    break;
                }
                if interrupted() {
                    return Err("interrupted".into());
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "no connectivity: {} cannot ping {ip} after 15s",
                        self.pods.p1.netns
                    ));
                }
                thread::sleep(Duration::from_millis(200));
            }
        }
        Ok(())
    }

    /// A ClusterIP that load-balances to `backend`'s `port`, when this datapath has services.
    ///
    /// For vswitch: a Service `bench/iperf` with `backend` as its one endpoint goes into every
    /// node's config file (replacing the one of an earlier repetition), and this waits until
    /// every node's reload has applied it. The kernel and OVS paths have none: kube-proxy-style
    /// rules are not part of their anchors.
    fn cluster_ip(&self, backend: &PodRef, port: u16) -> Result<SocketAddr, String> {
        let lab = match &self.bed {
            Some(Bed::Vswitch(lab)) => lab,
            Some(Bed::Script { .. }) => {
                return Err("the anchor topology has no service proxy".into())
            }
            None => return Err("the testbed is down".into()),
        };
        let vip = SocketAddr::from((Ipv4Addr::new(10, 96, 1, 1), port));
        let node = lab
            .nodes
            .iter()
            .find(|n| n.pod_cidr.contains(&backend.ip))
            .ok_or_else(|| format!("no node has pod {}", backend.ip))?;
        let service = conf::config::ServiceSpec {
            namespace: "bench".into(),
            name: "iperf".into(),
            cluster_ips: vec![vip.ip()],
            ports: vec![conf::config::ServicePort {
                name: None,
                protocol: conf::config::Protocol::Tcp,
                port,
                target_port: Some(port),
                node_port: None,
            }],
            external_ips: Vec::new(),
            session_affinity_timeout: None,
            internal_traffic_policy: Default::default(),
            external_traffic_policy: Default::default(),
            endpoints: vec![conf::config::EndpointSpec {
                ip: backend.ip.into(),
                node: Some(node.name.clone()),
                ready: true,
                serving: true,
                terminating: false,
                hostname: None,
            }],
        };
        for n in &lab.nodes {
            let mut config = conf::Config::load(&n.config).map_err(|e| e.to_string())?;
            config
                .services
                .retain(|s| (s.namespace.as_str(), s.name.as_str()) != ("bench", "iperf"));
            config.services.push(service.clone());
            let text = toml::to_string(&config).map_err(|e| e.to_string())?;
            // Renamed into place: the reload never reads half a file.
            let tmp = n.config.with_extension("toml.tmp");
            fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
            fs::rename(&tmp, &n.config).map_err(|e| format!("{}: {e}", n.config.display()))?;
        }
        let want = vec![format!("{}:{port}", backend.ip)];
        let deadline = Instant::now() + Duration::from_secs(10);
        for n in &lab.nodes {
            loop {
                let got: Result<conf::api::ServicesResponse, _> = n
                    .client()
                    .with_timeout(Duration::from_secs(1))
                    .get(conf::api::PATH_SERVICES);
                let applied = got.as_ref().is_ok_and(|r| {
                    r.frontends
                        .iter()
                        .any(|f| f.vip == vip.ip() && f.port == port && f.backends == want)
                });
                if applied {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "{}: Service {vip} -> {} not applied after 10 s: {got:?}",
                        n.name, want[0]
                    ));
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(vip)
    }

    /// Tears the topology down; a second call does nothing.
    fn down(&mut self) -> Result<(), String> {
        match self.bed.take() {
            None => Ok(()),
            Some(Bed::Vswitch(guard)) => guard.into_inner().down().map(drop).map_err(lab_err),
            Some(Bed::Script {
                kind,
                script,
                prefix,
            }) => {
                let mut cmd = script_cmd(kind, script, prefix, "down");
                let what = describe(&cmd);
                run_until(&mut cmd, Duration::from_secs(60), false)
                    .and_then(|f| success(&what, f))
                    .map(drop)
            }
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if let Err(e) = self.down() {
            eprintln!("vswitch-lab bench: tearing down {}: {e}", self.kind.name());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Measurements.

/// A one-shot iperf3 server on `to`, listening on its pod address.
fn iperf_server(to: &PodRef) -> Result<Server, String> {
    let argv = format!(
        "iperf3 -s -1 -B {} -p {IPERF_PORT} --idle-timeout 30",
        to.ip
    );
    Server::start(to, &words(&argv), "iperf3", IPERF_PORT)
}

fn words(s: &str) -> Vec<&str> {
    s.split_whitespace().collect()
}

/// TCP from `from` to `to`'s server, addressed as `target` (its pod IP or a ClusterIP).
fn iperf_tcp(
    from: &PodRef,
    to: &PodRef,
    target: Ipv4Addr,
    streams: u32,
    t: Duration,
    cc: Option<&str>,
) -> Result<TcpResult, String> {
    let _server = iperf_server(to)?;
    let mut argv = format!(
        "iperf3 -c {target} -p {IPERF_PORT} -t {} -P {streams} -J --connect-timeout 3000",
        t.as_secs().max(1)
    );
    if let Some(cc) = cc {
        argv.push_str(&format!(" -C {cc}"));
    }
    let out = iperf_client(&mut in_pod(from, &words(&argv)), t + GRACE)?;
    parse_iperf_tcp(&out)
}

/// Runs an iperf3 client and returns its stdout. With -J iperf3 prints even its errors as JSON
/// on stdout (which the parsers report); stderr is added when there is no JSON at all.
fn iperf_client(cmd: &mut Command, timeout: Duration) -> Result<String, String> {
    let f = run_bounded(cmd, timeout)?;
    if !f.status.success() && !f.stdout.trim_start().starts_with('{') {
        return Err(format!("iperf3 {}: {}", f.status, f.stderr.trim()));
    }
    Ok(f.stdout)
}

/// What `pod`'s kernel dropped because a UDP socket's buffer was full, so far.
fn udp_rcvbuf_errors(pod: &PodRef) -> Result<u64, String> {
    let f = run_bounded(
        &mut in_netns(&pod.netns, &["cat", "/proc/net/snmp"]),
        Duration::from_secs(5),
    )?;
    parse_udp_rcvbuf_errors(&f.stdout)
}

/// 64-byte UDP datagrams as fast as iperf3 can send them.
fn iperf_udp64(from: &PodRef, to: &PodRef, t: Duration) -> Result<UdpResult, String> {
    let _server = iperf_server(to)?;
    let argv = format!(
        "iperf3 -u -b 0 -l 64 -c {} -p {IPERF_PORT} -t {} -J --connect-timeout 3000",
        to.ip,
        t.as_secs().max(1)
    );
    let out = iperf_client(&mut in_pod(from, &words(&argv)), t + GRACE)?;
    parse_iperf_udp(&out)
}

fn ping_rtt(from: &PodRef, to: &PodRef, d: &Durations) -> Result<f64, String> {
    let c = d.ping_count.to_string();
    let i = format!("{:.3}", d.ping_interval.as_secs_f64());
    let ip = to.ip.to_string();
    let budget = d.ping_interval * d.ping_count + Duration::from_secs(5) + Duration::from_secs(1);
    let f = run_bounded(
        &mut in_pod(from, &["ping", "-c", &c, "-i", &i, "-W", "1", "-q", &ip]),
        budget,
    )?;
    parse_ping_avg(&f.stdout)
}

fn tcp_rr(from: &PodRef, to: &PodRef, d: Duration) -> Result<RrResult, String> {
    let exe = std::env::current_exe().map_err(|e| format!("/proc/self/exe: {e}"))?;
    let exe_s = exe.to_string_lossy().into_owned();
    let program = exe
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let bind = SocketAddr::from((to.ip, RR_PORT)).to_string();
    let timeout = (d + GRACE).as_secs().to_string();
    let _server = Server::start(
        to,
        &[&exe_s, "rr-server", "--bind", &bind, "--timeout", &timeout],
        &program,
        RR_PORT,
    )?;
    let secs = format!("{:.3}", d.as_secs_f64());
    let out = run_ok(
        &mut in_pod(
            from,
            &[&exe_s, "rr-client", "--connect", &bind, "--duration", &secs],
        ),
        d + GRACE,
    )?;
    RrResult::from_json(&out)
}

/// The bench's tests, in the order a repetition runs them. Every datapath runs a test before
/// the next test starts, so the values a ratio compares are measured seconds apart, not a
/// whole testbed's round of tests apart: the machine's speed drifts over minutes on a shared
/// host (cross-node TCP moved from 12 to 10 Gbit/s and back within minutes, with nothing else
/// running here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Test {
    Ping,
    RequestResponse,
    /// Cross-node, one stream, with the CPU it costs; then at once the same test to a Service
    /// whose one endpoint is p2 (ClusterIP), so the ratio of the two compares runs seconds
    /// apart on the same testbed.
    Cross1,
    Cross4,
    Same,
    CrossCubic,
    SameCubic,
    Udp64,
}

impl Test {
    const ALL: [Test; 8] = [
        Test::Ping,
        Test::RequestResponse,
        Test::Cross1,
        Test::Cross4,
        Test::Same,
        Test::CrossCubic,
        Test::SameCubic,
        Test::Udp64,
    ];

    fn name(self) -> &'static str {
        match self {
            Test::Ping => "ping",
            Test::RequestResponse => "request/response",
            Test::Cross1 => "cross-node TCP, pod IP and ClusterIP",
            Test::Cross4 => "cross-node TCP, 4 streams",
            Test::Same => "same-node TCP",
            Test::CrossCubic => "cross-node TCP, cubic",
            Test::SameCubic => "same-node TCP, cubic",
            Test::Udp64 => "UDP 64 B",
        }
    }
}

/// One test on one testbed, into the report.
fn measure(
    bed: &Testbed,
    test: Test,
    d: &Durations,
    report: &mut Report,
    log: &mut dyn FnMut(&str),
) {
    let k = bed.kind;
    let pods = &bed.pods;
    let mut record = |report: &mut Report, m: Metric, r: Result<f64, String>| match r {
        Ok(v) => {
            log(&format!(
                "  {:<8} {:<28} {:>10} {}",
                k.name(),
                m.label(),
                m.format(v),
                m.unit()
            ));
            report.add(m, k, v);
        }
        Err(e) => {
            log(&format!("  {:<8} {:<28} error: {e}", k.name(), m.label()));
            report.errors.insert((m, k), e);
        }
    };

    match test {
        Test::Ping => record(report, Metric::PingRtt, ping_rtt(&pods.p1, &pods.p2, d)),
        Test::RequestResponse => record(
            report,
            Metric::TcpRr,
            tcp_rr(&pods.p1, &pods.p2, d.rr).map(|r| r.rate()),
        ),
        Test::Cross1 => {
            let tps = ticks_per_second();
            let cpu0 = read_cpu();
            let pid0 = read_pids_cpu(&bed.pids);
            let r = iperf_tcp(&pods.p1, &pods.p2, pods.p2.ip, 1, d.tcp, None);
            let cpu1 = read_cpu();
            let pid1 = read_pids_cpu(&bed.pids);
            let pod_ip_gbps = r.as_ref().ok().map(|t| t.bits_per_second / 1e9);
            match r {
                Ok(t) => {
                    let gb = t.bytes as f64 / 1e9;
                    record(report, Metric::TcpCross1, Ok(t.bits_per_second / 1e9));
                    let machine = match (cpu0, cpu1) {
                        (Ok(a), Ok(b)) if gb > 0.0 => Ok(busy_seconds(a, b, tps) / gb),
                        (Err(e), _) | (_, Err(e)) => Err(e),
                        _ => Err("no bytes moved".into()),
                    };
                    record(report, Metric::CpuPerGb, machine);
                    if bed.pids.is_empty() {
                        report.not_applicable.insert(
                            (Metric::DatapathCpuPerGb, k),
                            "no datapath process: the kernel path's work is softirq/system time"
                                .into(),
                        );
                    } else {
                        let procs = match (pid0, pid1) {
                            (Some(a), Some(b)) if gb > 0.0 => {
                                Ok(b.saturating_sub(a) as f64 / tps as f64 / gb)
                            }
                            (Some(_), Some(_)) => Err("no bytes moved".into()),
                            _ => Err("a datapath process is gone".into()),
                        };
                        record(report, Metric::DatapathCpuPerGb, procs);
                    }
                }
                Err(e) => {
                    record(report, Metric::TcpCross1, Err(e.clone()));
                    record(report, Metric::CpuPerGb, Err(e.clone()));
                    record(report, Metric::DatapathCpuPerGb, Err(e));
                }
            }
            // ClusterIP: the same test to a Service whose one endpoint is p2, right after,
            // divided by the pod-IP value just measured.
            match bed.cluster_ip(&pods.p2, IPERF_PORT) {
                Err(reason) => {
                    report
                        .not_applicable
                        .insert((Metric::ClusterIpTcp, k), reason.clone());
                    report
                        .not_applicable
                        .insert((Metric::ClusterIpRatio, k), reason);
                }
                Ok(vip) => match vip.ip() {
                    std::net::IpAddr::V4(ip) => {
                        let r = iperf_tcp(&pods.p1, &pods.p2, ip, 1, d.tcp, None)
                            .map(|t| t.bits_per_second / 1e9);
                        if let (Ok(c), Some(p)) = (&r, pod_ip_gbps) {
                            if p > 0.0 {
                                record(report, Metric::ClusterIpRatio, Ok(c / p));
                            }
                        }
                        record(report, Metric::ClusterIpTcp, r);
                    }
                    other => record(
                        report,
                        Metric::ClusterIpTcp,
                        Err(format!("ClusterIP {other} is not IPv4")),
                    ),
                },
            }
        }
        Test::Cross4 => record(
            report,
            Metric::TcpCross4,
            iperf_tcp(&pods.p1, &pods.p2, pods.p2.ip, 4, d.tcp, None)
                .map(|t| t.bits_per_second / 1e9),
        ),
        Test::Same => record(
            report,
            Metric::TcpSame,
            iperf_tcp(&pods.p1, &pods.p1b, pods.p1b.ip, 1, d.tcp, None)
                .map(|t| t.bits_per_second / 1e9),
        ),
        Test::CrossCubic | Test::SameCubic => {
            let (m, to) = if test == Test::CrossCubic {
                (Metric::TcpCross1Cubic, &pods.p2)
            } else {
                (Metric::TcpSameCubic, &pods.p1b)
            };
            record(
                report,
                m,
                iperf_tcp(&pods.p1, to, to.ip, 1, d.tcp, Some("cubic"))
                    .map(|t| t.bits_per_second / 1e9),
            );
        }
        Test::Udp64 => {
            let before = udp_rcvbuf_errors(&pods.p2);
            match iperf_udp64(&pods.p1, &pods.p2, d.udp) {
                Ok(u) => {
                    record(report, Metric::Udp64Rate, Ok(u.delivered_pps() / 1e3));
                    record(report, Metric::Udp64Loss, Ok(u.loss_percent()));
                    record(report, Metric::Udp64Sent, Ok(u.sent_pps() / 1e3));
                    // Where the loss happened: the receiving pod's socket, or on the way there.
                    let at_socket =
                        before.and_then(|b| {
                            let a = udp_rcvbuf_errors(&pods.p2)?;
                            Ok(100.0 * a.saturating_sub(b).min(u.lost) as f64
                                / u.packets.max(1) as f64)
                        });
                    record(report, Metric::Udp64SocketLoss, at_socket);
                }
                Err(e) => {
                    record(report, Metric::Udp64Rate, Err(e.clone()));
                    record(report, Metric::Udp64Loss, Err(e.clone()));
                    record(report, Metric::Udp64Sent, Err(e.clone()));
                    record(report, Metric::Udp64SocketLoss, Err(e));
                }
            }
        }
    }
}

fn need_tool(tool: &'static str, package: &'static str) -> Result<(), BenchError> {
    if have_tool(tool) {
        Ok(())
    } else {
        Err(BenchError::MissingTool { tool, package })
    }
}

fn have_tool(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

fn git_commit() -> Option<String> {
    let out = Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=7"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let c = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !c.is_empty()).then_some(c)
}

/// Files written by [`write_outputs`].
#[derive(Debug, Clone, Default)]
pub struct Written {
    pub files: Vec<PathBuf>,
    /// Why there is no PNG, if there is none.
    pub png_skipped: Option<String>,
}

/// The processor's name from /proc/cpuinfo (`model name`), or empty.
fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// Writes latest.json, latest.txt and (with gnuplot) latest.png into `dir`, and keeps the run
/// as `runs/DATE.{json,txt}` there too, for `vswitch-lab bench-summary` (full runs only: a
/// quick one is no measurement to keep).
pub fn write_outputs(report: &Report, dir: &Path) -> Result<Written, BenchError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BenchError::Io { path, source }
    };
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut w = Written::default();
    let json = serde_json::to_string_pretty(&report.to_json()).unwrap_or_default() + "\n";
    let table = report.to_table();
    let mut put = |path: PathBuf, text: &str| -> Result<(), BenchError> {
        fs::write(&path, text).map_err(io_err(&path))?;
        w.files.push(path);
        Ok(())
    };
    put(dir.join("latest.json"), &json)?;
    put(dir.join("latest.txt"), &table)?;
    if !report.quick {
        let runs = dir.join("runs");
        fs::create_dir_all(&runs).map_err(io_err(&runs))?;
        let stem = report.date.replace(':', "");
        put(runs.join(format!("{stem}.json")), &json)?;
        put(runs.join(format!("{stem}.txt")), &table)?;
    }

    let png = dir.join("latest.png");
    if !have_tool("gnuplot") {
        w.png_skipped = Some("gnuplot is not installed (Debian package gnuplot-nox)".into());
        return Ok(w);
    }
    let mut child = Command::new("gnuplot")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_err(Path::new("gnuplot")))?;
    let script = report.gnuplot_script(&png);
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(script.as_bytes());
    }
    let err = reader(child.stderr.take());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let stderr = err.join().unwrap_or_default();
    match status {
        Some(s) if s.success() && png.is_file() => w.files.push(png),
        Some(s) => w.png_skipped = Some(format!("gnuplot failed ({s}): {}", stderr.trim())),
        None => w.png_skipped = Some("gnuplot timed out".into()),
    }
    Ok(w)
}

/// Runs the whole bench: builds every selected datapath, measures, tears everything down, and
/// returns the report. Progress goes to `log`.
pub fn run(opts: &BenchOptions, log: &mut dyn FnMut(&str)) -> Result<Report, BenchError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(BenchError::NotRoot);
    }
    need_tool("ip", "iproute2")?;
    need_tool("iperf3", "iperf3")?;
    need_tool("ping", "iputils-ping")?;
    if opts.only.contains(&Kind::VswitchPin) {
        need_tool("taskset", "util-linux")?;
    }
    install_signal_handlers();
    INTERRUPTED.store(false, Ordering::SeqCst);

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut report = Report {
        date: utc_timestamp(now),
        commit: git_commit(),
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        cpu_model: cpu_model(),
        tcp_cc: fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        cpus: thread::available_parallelism().map_or(1, |n| n.get()),
        reps: opts.reps.max(1),
        quick: opts.quick,
        durations: Some(opts.durations.clone()),
        datapaths: Kind::ALL
            .into_iter()
            .filter(|k| opts.only.contains(k))
            .collect(),
        ..Report::default()
    };

    // On the idle machine, before any testbed: what a wake-up costs here.
    log("wake-up round trips between two threads");
    let wake = crate::wake::measure(
        opts.durations.ping_interval,
        if opts.quick { 5 } else { 20 },
    );
    log(&wake_text(&wake));
    report.wake = Some(wake);

    // Bring every datapath up; one that fails is reported and the others go on.
    let mut beds: Vec<Testbed> = Vec::new();
    for k in report.datapaths.clone() {
        if interrupted() {
            break;
        }
        if k == Kind::Ovs && !have_tool("ovs-vswitchd") {
            report.datapath_errors.insert(
                k,
                "ovs-vswitchd is not installed (Debian package openvswitch-switch)".into(),
            );
            log("ovs: skipped, openvswitch-switch is not installed");
            continue;
        }
        log(&format!("up: {}", k.describe()));
        let started = Instant::now();
        match Testbed::up(k).and_then(|b| b.wait_connected().map(|()| b)) {
            Ok(b) => {
                log(&format!(
                    "up: {} ready in {:.1}s",
                    k.name(),
                    started.elapsed().as_secs_f64()
                ));
                beds.push(b);
            }
            Err(e) => {
                log(&format!("up: {} failed: {e}", k.name()));
                report.datapath_errors.insert(k, e);
            }
        }
    }

    for rep in 1..=report.reps {
        for test in Test::ALL {
            log(&format!("rep {rep}/{}: {}", report.reps, test.name()));
            for bed in &beds {
                if interrupted() {
                    break;
                }
                bed.hold(false, log);
                measure(bed, test, &opts.durations, &mut report, log);
                bed.hold(true, log);
            }
        }
    }
    for bed in &beds {
        bed.hold(false, log);
    }

    for mut bed in beds {
        log(&format!("down: {}", bed.kind.name()));
        if let Err(e) = bed.down() {
            log(&format!("down: {} failed: {e}", bed.kind.name()));
        }
    }
    if interrupted() {
        return Err(BenchError::Interrupted);
    }
    if report.samples.is_empty() {
        return Err(BenchError::NothingMeasured(report.problems().join("; ")));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    const IPERF_TCP: &str = r#"{
        "start": {"connected": []},
        "intervals": [],
        "end": {
            "streams": [],
            "sum_sent": {"start": 0, "end": 2.0, "seconds": 2.0, "bytes": 540000000,
                         "bits_per_second": 2160000000.0, "retransmits": 3, "sender": true},
            "sum_received": {"start": 0, "end": 2.011616, "seconds": 2.011616,
                             "bytes": 536204278, "bits_per_second": 2132431947.25037,
                             "sender": true},
            "cpu_utilization_percent": {}
        }
    }"#;

    const IPERF_UDP: &str = r#"{
        "start": {}, "intervals": [],
        "end": {
            "streams": [],
            "sum": {"start": 0, "end": 2.004994, "seconds": 2.004994, "bytes": 73169920,
                    "bits_per_second": 292302901.55988926, "jitter_ms": 0.0017,
                    "lost_packets": 982200, "packets": 1143280,
                    "lost_percent": 85.9107130361766, "sender": true},
            "sum_sent": {}, "sum_received": {}
        }
    }"#;

    #[test]
    fn iperf_tcp_json_gives_the_receivers_rate_and_bytes() {
        let t = parse_iperf_tcp(IPERF_TCP).unwrap();
        assert!((t.bits_per_second - 2.132_431_947e9).abs() < 1.0);
        assert_eq!(t.bytes, 536_204_278);
        assert!((t.seconds - 2.011_616).abs() < 1e-9);
    }

    #[test]
    fn iperf_udp_json_gives_delivered_packets_and_loss() {
        let u = parse_iperf_udp(IPERF_UDP).unwrap();
        assert_eq!((u.packets, u.lost), (1_143_280, 982_200));
        assert!((u.delivered_pps() - 161_080.0 / 2.004_994).abs() < 1e-6);
        assert!((u.loss_percent() - 85.910_713).abs() < 1e-4);
        assert!((u.sent_pps() - 1_143_280.0 / 2.004_994).abs() < 1e-6);
    }

    #[test]
    fn the_udp_target_says_where_the_loss_happened() {
        let mut r = sample_report();
        let udp = |r: &Report| {
            r.targets()
                .into_iter()
                .find(|t| t.text.starts_with("UDP"))
                .unwrap()
        };
        assert_eq!(udp(&r).detail, "0.5% (needs <= 1%)");
        r.add(Metric::Udp64SocketLoss, Kind::Vswitch, 0.24);
        r.add(Metric::Udp64Sent, Kind::Vswitch, 698.4);
        r.add(Metric::Udp64Sent, Kind::Kernel, 289.0);
        let t = udp(&r);
        assert_eq!(t.status, "PASS");
        assert_eq!(
            t.detail,
            "0.5% (needs <= 1%); 0.2% at the receiving pod's socket; \
             sent 698 kpps, the kernel path's sender 289"
        );
    }

    #[test]
    fn snmp_gives_the_udp_receive_buffer_drops() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
            Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors\n\
            Udp: 640897 0 1354026 12 1354026 0 0 0 0\n\
            UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors\n\
            UdpLite: 0 0 0 0 7 0 0 0 0\n";
        assert_eq!(parse_udp_rcvbuf_errors(snmp), Ok(1_354_026));
        let e = parse_udp_rcvbuf_errors("Ip: Forwarding\nIp: 1\n").unwrap_err();
        assert!(e.contains("no Udp"), "{e}");
        let e = parse_udp_rcvbuf_errors("Udp: InDatagrams\nUdp: 5\n").unwrap_err();
        assert!(e.contains("RcvbufErrors"), "{e}");
    }

    #[test]
    fn iperf_errors_are_reported_not_parsed() {
        let e = parse_iperf_tcp(r#"{"start":{}, "intervals":[], "end":{}, "error":"unable to connect to server: Connection refused"}"#)
            .unwrap_err();
        assert!(e.contains("Connection refused"), "{e}");
        let e = parse_iperf_tcp("iperf3: error - unable to connect").unwrap_err();
        assert!(
            e.contains("no JSON") && e.contains("unable to connect"),
            "{e}"
        );
        let e = parse_iperf_udp(r#"{"end":{"sum":{"packets":1}}}"#).unwrap_err();
        assert!(e.contains("lost_packets"), "{e}");
    }

    #[test]
    fn ping_summary_gives_the_average() {
        let out = "PING 10.244.2.2 (10.244.2.2) 56(84) bytes of data.\n\n\
                   --- 10.244.2.2 ping statistics ---\n\
                   20 packets transmitted, 20 received, 0% packet loss, time 968ms\n\
                   rtt min/avg/max/mdev = 0.061/0.108/0.215/0.032 ms\n";
        assert_eq!(parse_ping_avg(out).unwrap(), 0.108);
        let lost = "--- 10.244.2.2 ping statistics ---\n\
                    20 packets transmitted, 0 received, 100% packet loss, time 1000ms\n";
        assert_eq!(parse_ping_avg(lost).unwrap_err(), "ping: no replies");
        assert!(parse_ping_avg("").is_err());
        // busybox spells it "round-trip".
        let bb = "20 packets transmitted, 20 packets received, 0% packet loss\n\
                  round-trip min/avg/max = 0.050/0.070/0.100 ms\n";
        assert_eq!(parse_ping_avg(bb).unwrap(), 0.070);
    }

    #[test]
    fn proc_stat_deltas_count_busy_time() {
        let a = parse_proc_stat(
            "cpu  100 5 50 1000 10 1 4 0 0 0\ncpu0 50 2 25 500 5 0 2 0 0 0\nintr 1\n",
        )
        .unwrap();
        assert_eq!(
            a,
            CpuTimes {
                busy: 160,
                total: 1170
            }
        );
        let b = parse_proc_stat("cpu  250 5 120 1100 10 1 24 0 0 0\n").unwrap();
        // 150 user + 70 system + 20 softirq ticks = 2.4 s at 100 Hz.
        assert!((busy_seconds(a, b, 100) - 2.4).abs() < 1e-12);
        assert_eq!(busy_seconds(b, a, 100), 0.0);
        assert!(parse_proc_stat("intr 1\n").is_err());
        assert!(parse_proc_stat("cpu  1 2 3\n").is_err());
    }

    #[test]
    fn pid_stat_sums_user_and_system_time() {
        let s = "4242 (ovs-vswitchd (x)) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                 123 45 0 0 20 0 5 0 100 1000000 500 18446744073709551615\n";
        assert_eq!(parse_pid_stat(s).unwrap(), 168);
        assert!(parse_pid_stat("4242 (x) S 1").is_err());
    }

    #[test]
    fn listening_sockets_are_found_by_port() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n\
                 \x20  0: 0202F40A:1451 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0\n\
                 \x20  1: 0202F40A:14B5 0302F40A:C350 01 00000000:00000000 00:00000000 00000000 0\n";
        assert!(tcp_table_listens(t, 5201));
        // 0x14B5 = 5301 is only an established connection here.
        assert!(!tcp_table_listens(t, 5301));
        assert!(!tcp_table_listens("", 5201));
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[7.5]), Some(7.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 1.0]), Some(1.0));
    }

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_timestamp(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_timestamp(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    fn sample_report() -> Report {
        let mut r = Report {
            date: "2026-01-02T03:04:05Z".into(),
            commit: Some("abc1234".into()),
            kernel: "6.18.0".into(),
            cpus: 2,
            reps: 3,
            quick: false,
            durations: Some(Durations::full()),
            datapaths: Kind::ALL.to_vec(),
            ..Report::default()
        };
        for (k, v) in [
            (Kind::Vswitch, [11.0, 12.0, 10.0]),
            (Kind::Vswitch2, [12.0, 13.0, 11.0]),
            (Kind::VswitchPin, [13.0, 13.05, 13.1]),
            (Kind::Kernel, [14.0, 15.0, 14.5]),
            (Kind::Ovs, [1.0, 1.1, 1.2]),
        ] {
            for x in v {
                r.add(Metric::TcpCross1, k, x);
            }
        }
        // Two workers slower than one with four streams.
        r.add(Metric::TcpCross4, Kind::Vswitch, 10.0);
        r.add(Metric::TcpCross4, Kind::Vswitch2, 9.0);
        r.add(Metric::TcpSame, Kind::Vswitch, 9.0);
        r.add(Metric::TcpSame, Kind::Kernel, 18.0);
        r.add(Metric::Udp64Loss, Kind::Vswitch, 0.5);
        r.add(Metric::Udp64Loss, Kind::Kernel, 0.1);
        r.add(Metric::PingRtt, Kind::Vswitch, 0.2);
        r.add(Metric::PingRtt, Kind::Kernel, 0.1);
        r.add(Metric::PingRtt, Kind::Ovs, 0.5);
        r.errors
            .insert((Metric::TcpRr, Kind::Ovs), "rr-client: timed out".into());
        for k in Kind::ALL {
            r.not_applicable.insert(
                (Metric::ClusterIpRatio, k),
                "services are not implemented in vswitch yet".into(),
            );
        }
        r.not_applicable.insert(
            (Metric::DatapathCpuPerGb, Kind::Kernel),
            "no datapath process".into(),
        );
        r
    }

    #[test]
    fn ratios_and_targets_follow_the_medians() {
        let r = sample_report();
        assert_eq!(r.value(Metric::TcpCross1, Kind::Vswitch), Some(11.0));
        assert_eq!(r.ratio(Metric::TcpCross1, Kind::Kernel), Some(11.0 / 14.5));
        assert_eq!(r.ratio(Metric::TcpCross1, Kind::Ovs), Some(11.0 / 1.1));
        assert_eq!(r.ratio(Metric::Udp64Loss, Kind::Kernel), None);
        let t = r.targets();
        let status: Vec<&str> = t.iter().map(|t| t.status).collect();
        // 0.76x kernel, 10x OVS, same-node 0.5x, loss 0.5%, RTT 2.0x, ClusterIP n/a, two
        // workers 0.9x of one with 4 streams and 1.09x with one.
        assert_eq!(
            status,
            ["PASS", "PASS", "FAIL", "PASS", "PASS", "n/a", "FAIL", "PASS"]
        );
        assert_eq!(t[0].detail, "0.76x (needs >= 0.7x); vswitch-pin 0.90x");
        assert_eq!(t[3].detail, "0.5% (needs <= 1%)");
        assert!(t[5].detail.contains("not implemented"), "{}", t[5].detail);
        assert_eq!(t[6].detail, "9.00 vs 10.00 Gbit/s: 0.90x (needs >= 0.95x)");
        let mut one_only = r.clone();
        one_only.datapaths = vec![Kind::Vswitch, Kind::Kernel, Kind::Ovs];
        assert_eq!(one_only.targets()[7].status, "n/a");
    }

    #[test]
    fn cells_say_why_there_is_no_number() {
        let mut r = sample_report();
        assert_eq!(
            r.cell(Metric::TcpRr, Kind::Ovs),
            Cell::Error("rr-client: timed out".into())
        );
        assert!(matches!(
            r.cell(Metric::ClusterIpRatio, Kind::Vswitch),
            Cell::NotApplicable(_)
        ));
        r.datapaths = vec![Kind::Vswitch, Kind::Kernel];
        assert_eq!(r.cell(Metric::TcpCross1, Kind::Ovs), Cell::NotRun);
        assert_eq!(r.targets()[1].status, "n/a");
        r.datapath_errors
            .insert(Kind::Kernel, "no connectivity".into());
        r.samples.retain(|(_, k), _| *k != Kind::Kernel);
        assert_eq!(
            r.cell(Metric::TcpCross1, Kind::Kernel),
            Cell::Error("no connectivity".into())
        );
        assert_eq!(
            r.problems(),
            [
                "kernel: no connectivity",
                "ovs TCP request/response: rr-client: timed out"
            ]
        );
    }

    #[test]
    fn table_has_a_row_per_metric_and_the_ratio_columns() {
        let r = sample_report();
        let t = r.to_table();
        let header = t.lines().find(|l| l.starts_with("metric")).unwrap();
        for c in [
            "unit",
            "vswitch",
            "vswitch-2w",
            "vswitch-pin",
            "kernel",
            "ovs",
            "vswitch/kernel",
            "vswitch/ovs",
            "pin/kernel",
        ] {
            assert!(header.contains(c), "{header}");
        }
        for m in Metric::ALL {
            assert!(t.lines().any(|l| l.starts_with(m.label())), "{m:?}\n{t}");
        }
        let row = t
            .lines()
            .find(|l| l.starts_with("cross-node TCP, 1 stream"))
            .unwrap();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells[cells.len() - 9..],
            ["Gbit/s", "11.00", "12.00", "13.05", "14.50", "1.10", "0.76x", "10.00x", "0.90x"]
        );
        let row = t
            .lines()
            .find(|l| l.starts_with("TCP request/response"))
            .unwrap();
        assert!(row.contains("error"), "{row}");
        let row = t
            .lines()
            .find(|l| l.starts_with("ClusterIP / pod IP"))
            .unwrap();
        assert!(row.contains("n/a"), "{row}");
        assert!(
            t.contains("PASS  cross-node TCP >= 0.7x the kernel path"),
            "{t}"
        );
        assert!(
            t.contains("FAIL  same-node TCP >= 0.9x the kernel path"),
            "{t}"
        );
        assert!(t.contains("/proc/stat"), "{t}");
        assert!(
            t.contains("ovs TCP request/response: rr-client: timed out"),
            "{t}"
        );
    }

    #[test]
    fn json_has_medians_samples_ratios_and_targets() {
        let v = sample_report().to_json();
        assert_eq!(v["date"], "2026-01-02T03:04:05Z");
        assert_eq!(v["config"]["reps"], 3);
        let m = v["metrics"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["key"] == "tcp_cross_node_1")
            .unwrap();
        assert_eq!(m["unit"], "Gbit/s");
        assert_eq!(m["better"], "higher");
        assert_eq!(m["values"]["vswitch"]["median"], 11.0);
        assert_eq!(m["values"]["vswitch"]["samples"], json!([11.0, 12.0, 10.0]));
        assert_eq!(m["ratios"]["vswitch/ovs"].as_f64().unwrap(), 11.0 / 1.1);
        let m = v["metrics"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["key"] == "clusterip_vs_pod_ip")
            .unwrap();
        assert_eq!(m["values"]["vswitch"]["median"], Value::Null);
        assert!(m["values"]["vswitch"]["n/a"]
            .as_str()
            .unwrap()
            .contains("services"));
        assert_eq!(v["targets"].as_array().unwrap().len(), 8);
        assert_eq!(m["values"]["vswitch-2w"]["median"], Value::Null);
        assert_eq!(v["targets"][2]["status"], "FAIL");
        assert_eq!(v["metrics"].as_array().unwrap().len(), Metric::ALL.len());
    }

    #[test]
    fn the_wake_up_cost_is_in_the_header_and_the_json() {
        let mut r = sample_report();
        assert!(!r.to_table().contains("wake-up round trip between"));
        assert_eq!(r.to_json()["host"]["wakeup_round_trip_us"], Value::Null);
        r.wake = Some(Ok(crate::wake::WakeCost {
            cross_busy_us: 71.5,
            cross_idle_us: 187.8,
            same_busy_us: 3.0,
            same_idle_us: 32.0,
            idle: Duration::from_millis(50),
        }));
        let t = r.to_table();
        assert_eq!(
            t.lines().nth(1),
            Some(
                "wake-up round trip between two threads: 71.5 µs across CPUs (187.8 µs after 50 \
                 ms idle), 3.0 µs on one CPU (32.0 µs after idle)"
            ),
            "{t}"
        );
        let v = r.to_json();
        let w = &v["host"]["wakeup_round_trip_us"];
        assert_eq!(w["cross_cpu"], 71.5);
        assert_eq!(w["cross_cpu_after_idle"], 187.8);
        assert_eq!(w["same_cpu"], 3.0);
        assert_eq!(w["same_cpu_after_idle"], 32.0);
        assert_eq!(w["idle_seconds"], 0.05);
        r.wake = Some(Err("needs two CPUs".into()));
        assert!(r.to_table().contains("not measured (needs two CPUs)"));
        assert_eq!(
            r.to_json()["host"]["wakeup_round_trip_us"]["error"],
            "needs two CPUs"
        );
    }

    #[test]
    fn gnuplot_script_draws_the_metrics_that_have_values() {
        let s = sample_report().gnuplot_script(Path::new("/tmp/x/latest.png"));
        assert!(s.contains("set output '/tmp/x/latest.png'"));
        // TcpCross1, TcpCross4, TcpSame, Udp64Loss, PingRtt have values: five panels on a 2x3
        // grid.
        assert_eq!(s.matches("\nplot ").count(), 5, "{s}");
        assert!(s.contains("set multiplot layout 2,3"), "{s}");
        assert!(s.contains("0 \"vswitch\" 11 1 \"11.00\""), "{s}");
        assert!(s.contains("1 \"vswitch-2w\" 12 2 \"12.00\""), "{s}");
        assert!(s.contains("2 \"vswitch-pin\" 13.05 3 \"13.05\""), "{s}");
        assert!(s.contains("4 \"ovs\" 1.1 5 \"1.10\""), "{s}");
        // same-node TCP was not measured for ovs: an empty bar that says so.
        assert!(s.contains("4 \"ovs\" 0 5 \"error\""), "{s}");
        assert!(!s.contains("ClusterIP"), "{s}");
    }

    #[test]
    fn rr_client_and_server_ping_pong_over_loopback() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = thread::spawn(move || rr_serve(l, Duration::from_secs(10)));
        let r = rr_client(addr, Duration::from_millis(200)).unwrap();
        assert!(r.transactions > 10, "{r:?}");
        assert!(r.seconds >= 0.2);
        server.join().unwrap().unwrap();
        let back = RrResult::from_json(&r.to_json()).unwrap();
        assert_eq!(back.transactions, r.transactions);
        assert!(RrResult::from_json("oops").is_err());
    }

    #[test]
    fn rr_server_gives_up_without_a_client() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let t = Instant::now();
        rr_serve(l, Duration::from_millis(100)).unwrap();
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn kinds_parse_by_name_and_scripts_are_embedded() {
        assert_eq!(Kind::parse("ovs"), Some(Kind::Ovs));
        assert_eq!(Kind::parse(" kernel"), Some(Kind::Kernel));
        assert_eq!(Kind::parse("bridge"), None);
        for s in [KERNEL_SCRIPT, OVS_SCRIPT] {
            assert!(s.contains("BENCH_PREFIX") && s.contains("up)") && s.contains("down)"));
            assert!(s.contains("10.244.1.3") && s.contains("p1b"));
        }
        let p = script_pods("vbk");
        assert_eq!(p.p1b.netns, "vbk-p1b");
        assert_eq!(p.p2.ip, Ipv4Addr::new(10, 244, 2, 2));
    }
}
