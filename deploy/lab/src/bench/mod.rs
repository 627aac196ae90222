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
//! The parts that need no root are testable on their own: the parsers of iperf3 JSON, ping
//! output, `/proc/stat` and `/proc/PID/stat` (`parse`, `cpu`); the report's table, JSON,
//! targets and gnuplot script (`report` and its views); and the request/response client and
//! server (`rr`, over loopback). The rest drives processes: `exec` (bounded, interruptible
//! commands and servers), `testbed` with the `baseline`s of the kernel and Open vSwitch and
//! vswitch's `services`, the measurement families (`throughput`, `latency`), `measure`
//! (one test on one testbed) and `run` (the driver).
//!
//! A measurement that fails is a `LabError`; the report keeps its message in the failed cell, and
//! only what stops the whole run is a [`BenchError`].

mod baseline;
mod chart;
pub(crate) mod cpu;
mod exec;
mod json;
mod kinds;
mod latency;
mod measure;
mod output;
mod parse;
mod policy;
mod report;
mod rr;
pub(crate) mod run;
mod services;
mod table;
mod targets;
mod testbed;
mod throughput;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

pub use cpu::{busy_seconds, parse_pid_stat, parse_proc_stat, CpuTimes};
pub use kinds::{Kind, Metric};
pub use output::{write_outputs, Written};
pub use parse::{
    median, parse_iperf_tcp, parse_iperf_udp, parse_ping_avg, parse_udp_rcvbuf_errors,
    tcp_table_listens, utc_timestamp, TcpResult, UdpResult,
};
pub use report::{Cell, Report, Target, NOTES};
pub use rr::{crr_client, crr_serve, crr_server, rr_client, rr_serve, rr_server, RrResult};
pub use run::run;
pub use testbed::{PodRef, Pods};

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

const IPERF_PORT: u16 = 5201;
const RR_PORT: u16 = 5301;
const CRR_PORT: u16 = 5302;
/// What a client gets on top of its own duration before it is killed.
const GRACE: Duration = Duration::from_secs(15);

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
