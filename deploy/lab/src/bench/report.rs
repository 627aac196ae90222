//! The report: samples in, cells (medians or why there are none) and ratios out. Its views are
//! in [`super::table`] (the printed table), [`super::json`] (latest.json), [`super::targets`]
//! (the targets) and [`super::chart`] (the gnuplot script).

use std::collections::BTreeMap;

use super::{median, Durations, Kind, Metric};

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
pub(super) fn wake_text(w: &Result<crate::wake::WakeCost, String>) -> String {
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
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::bench) fn sample_report() -> Report {
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
        r.add(Metric::PolicyTcpRatio, Kind::Vswitch, 0.97);
        r.add(Metric::PolicyCrrRatio, Kind::Vswitch, 0.7);
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
}
