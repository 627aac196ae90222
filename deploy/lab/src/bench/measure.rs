//! One test on one testbed, into the report: the tests a repetition runs, in order, and the
//! metrics each one gives.

use std::fmt::Display;
use std::net::IpAddr;

use super::cpu::{read_cpu, read_pids_cpu, ticks_per_second};
use super::latency::{ping_rtt, tcp_crr, tcp_rr};
use super::testbed::Testbed;
use super::throughput::{iperf_tcp, iperf_udp64, udp_rcvbuf_errors};
use super::{busy_seconds, Durations, Kind, Metric, Report, TcpResult, IPERF_PORT};
use crate::LabError;

/// The bench's tests, in the order a repetition runs them. Every datapath runs a test before
/// the next test starts, so the values a ratio compares are measured seconds apart, not a
/// whole testbed's round of tests apart: the machine's speed drifts over minutes on a shared
/// host (cross-node TCP moved from 12 to 10 Gbit/s and back within minutes, with nothing else
/// running here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Test {
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
    /// New TCP connections a second, pod to pod across nodes.
    Crr,
    /// NetworkPolicy's cost (vswitch only): cross-node TCP with none and then with 100
    /// policies selecting both pods; new connections a second with none and with 1,000.
    Policy,
    /// A pod to the host outside the cluster: one TCP stream, and new connections a second.
    Egress,
}

impl Test {
    pub(super) const ALL: [Test; 11] = [
        Test::Ping,
        Test::RequestResponse,
        Test::Cross1,
        Test::Cross4,
        Test::Same,
        Test::CrossCubic,
        Test::SameCubic,
        Test::Udp64,
        Test::Crr,
        Test::Policy,
        Test::Egress,
    ];

    pub(super) fn name(self) -> &'static str {
        match self {
            Test::Ping => "ping",
            Test::RequestResponse => "request/response",
            Test::Cross1 => "cross-node TCP, pod IP and ClusterIP",
            Test::Cross4 => "cross-node TCP, 4 streams",
            Test::Same => "same-node TCP",
            Test::CrossCubic => "cross-node TCP, cubic",
            Test::SameCubic => "same-node TCP, cubic",
            Test::Udp64 => "UDP 64 B",
            Test::Crr => "TCP new connections",
            Test::Policy => "NetworkPolicy: TCP with 100, new connections with 1,000",
            Test::Egress => "to the outside host: TCP, new connections",
        }
    }
}

/// Where a test's results go: the report, and a line of progress each.
struct Recorder<'a> {
    kind: Kind,
    report: &'a mut Report,
    log: &'a mut dyn FnMut(&str),
}

impl Recorder<'_> {
    fn record(&mut self, m: Metric, r: Result<f64, impl Display>) {
        let k = self.kind;
        match r {
            Ok(v) => {
                (self.log)(&format!(
                    "  {:<8} {:<28} {:>10} {}",
                    k.name(),
                    m.label(),
                    m.format(v),
                    m.unit()
                ));
                self.report.add(m, k, v);
            }
            Err(e) => {
                (self.log)(&format!("  {:<8} {:<28} error: {e}", k.name(), m.label()));
                self.report.errors.insert((m, k), e.to_string());
            }
        }
    }

    /// The same error for every metric a failed test would have given.
    fn fail(&mut self, metrics: &[Metric], e: &LabError) {
        for &m in metrics {
            self.record(m, Err::<f64, _>(e));
        }
    }

    fn not_applicable(&mut self, m: Metric, reason: String) {
        self.report.not_applicable.insert((m, self.kind), reason);
    }
}

/// One test on one testbed, into the report.
pub(super) fn measure(
    bed: &Testbed,
    test: Test,
    d: &Durations,
    report: &mut Report,
    log: &mut dyn FnMut(&str),
) {
    let pods = &bed.pods;
    let mut rec = Recorder {
        kind: bed.kind,
        report,
        log,
    };
    let gbps = |r: Result<TcpResult, LabError>| r.map(|t| t.bits_per_second / 1e9);
    match test {
        Test::Ping => rec.record(Metric::PingRtt, ping_rtt(&pods.p1, &pods.p2, d)),
        Test::RequestResponse => rec.record(
            Metric::TcpRr,
            tcp_rr(&pods.p1, &pods.p2, d.rr).map(|r| r.rate()),
        ),
        Test::Cross1 => {
            let pod_ip_gbps = cross_node_with_cpu(bed, d, &mut rec);
            cluster_ip(bed, d, pod_ip_gbps, &mut rec);
        }
        Test::Cross4 => rec.record(
            Metric::TcpCross4,
            gbps(iperf_tcp(&pods.p1, &pods.p2, pods.p2.ip, 4, d.tcp, None)),
        ),
        Test::Same => rec.record(
            Metric::TcpSame,
            gbps(iperf_tcp(&pods.p1, &pods.p1b, pods.p1b.ip, 1, d.tcp, None)),
        ),
        Test::CrossCubic | Test::SameCubic => {
            let (m, to) = if test == Test::CrossCubic {
                (Metric::TcpCross1Cubic, &pods.p2)
            } else {
                (Metric::TcpSameCubic, &pods.p1b)
            };
            rec.record(
                m,
                gbps(iperf_tcp(&pods.p1, to, to.ip, 1, d.tcp, Some("cubic"))),
            );
        }
        Test::Udp64 => udp64(bed, d, &mut rec),
        Test::Crr => rec.record(
            Metric::TcpCrr,
            tcp_crr(&pods.p1, &pods.p2, d.rr).map(|r| r.rate()),
        ),
        Test::Policy => policy(bed, d, &mut rec),
        Test::Egress => match bed.outside() {
            Ok(out) => {
                rec.record(
                    Metric::EgressTcp,
                    gbps(iperf_tcp(&pods.p1, &out, out.ip, 1, d.tcp, None)),
                );
                rec.record(
                    Metric::EgressCrr,
                    tcp_crr(&pods.p1, &out, d.rr).map(|r| r.rate()),
                );
            }
            Err(why) => {
                rec.not_applicable(Metric::EgressTcp, why.clone());
                rec.not_applicable(Metric::EgressCrr, why);
            }
        },
    }
}

/// Cross-node TCP, one stream, and the CPU it cost (the machine's and the datapath
/// processes'); the pod-IP rate for the ClusterIP ratio.
fn cross_node_with_cpu(bed: &Testbed, d: &Durations, rec: &mut Recorder) -> Option<f64> {
    let pods = &bed.pods;
    let tps = ticks_per_second();
    let cpu0 = read_cpu();
    let pid0 = read_pids_cpu(&bed.pids);
    let r = iperf_tcp(&pods.p1, &pods.p2, pods.p2.ip, 1, d.tcp, None);
    let cpu1 = read_cpu();
    let pid1 = read_pids_cpu(&bed.pids);
    let t = match r {
        Ok(t) => t,
        Err(e) => {
            let all = [
                Metric::TcpCross1,
                Metric::CpuPerGb,
                Metric::DatapathCpuPerGb,
            ];
            rec.fail(&all, &e);
            return None;
        }
    };
    let no_bytes = || LabError::Measurement("no bytes moved".into());
    let gb = t.bytes as f64 / 1e9;
    rec.record(
        Metric::TcpCross1,
        Ok::<_, LabError>(t.bits_per_second / 1e9),
    );
    let machine = match (cpu0, cpu1) {
        (Ok(a), Ok(b)) if gb > 0.0 => Ok(busy_seconds(a, b, tps) / gb),
        (Err(e), _) | (_, Err(e)) => Err(e),
        _ => Err(no_bytes()),
    };
    rec.record(Metric::CpuPerGb, machine);
    if bed.pids.is_empty() {
        rec.not_applicable(
            Metric::DatapathCpuPerGb,
            "no datapath process: the kernel path's work is softirq/system time".into(),
        );
    } else {
        let procs = match (pid0, pid1) {
            (Some(a), Some(b)) if gb > 0.0 => Ok(b.saturating_sub(a) as f64 / tps as f64 / gb),
            (Some(_), Some(_)) => Err(no_bytes()),
            _ => Err(LabError::Measurement("a datapath process is gone".into())),
        };
        rec.record(Metric::DatapathCpuPerGb, procs);
    }
    Some(t.bits_per_second / 1e9)
}

/// ClusterIP: the same test to a Service whose one endpoint is p2, right after the pod-IP one,
/// divided by the pod-IP value just measured.
fn cluster_ip(bed: &Testbed, d: &Durations, pod_ip_gbps: Option<f64>, rec: &mut Recorder) {
    let pods = &bed.pods;
    let vip = match bed.cluster_ip(&pods.p2, IPERF_PORT) {
        Ok(vip) => vip,
        Err(reason) => {
            rec.not_applicable(Metric::ClusterIpTcp, reason.to_string());
            rec.not_applicable(Metric::ClusterIpRatio, reason.to_string());
            return;
        }
    };
    let IpAddr::V4(ip) = vip.ip() else {
        let e = LabError::Measurement(format!("ClusterIP {} is not IPv4", vip.ip()));
        return rec.record(Metric::ClusterIpTcp, Err::<f64, _>(e));
    };
    let r = iperf_tcp(&pods.p1, &pods.p2, ip, 1, d.tcp, None).map(|t| t.bits_per_second / 1e9);
    if let (Ok(c), Some(p)) = (&r, pod_ip_gbps) {
        if p > 0.0 {
            rec.record(Metric::ClusterIpRatio, Ok::<_, LabError>(c / p));
        }
    }
    rec.record(Metric::ClusterIpTcp, r);
}

/// 64-byte UDP across nodes: delivered, lost, sent, and the part of the loss at the receiving
/// pod's socket.
fn udp64(bed: &Testbed, d: &Durations, rec: &mut Recorder) {
    let pods = &bed.pods;
    let before = udp_rcvbuf_errors(&pods.p2);
    let u = match iperf_udp64(&pods.p1, &pods.p2, d.udp) {
        Ok(u) => u,
        Err(e) => {
            let all = [
                Metric::Udp64Rate,
                Metric::Udp64Loss,
                Metric::Udp64Sent,
                Metric::Udp64SocketLoss,
            ];
            return rec.fail(&all, &e);
        }
    };
    rec.record(
        Metric::Udp64Rate,
        Ok::<_, LabError>(u.delivered_pps() / 1e3),
    );
    rec.record(Metric::Udp64Loss, Ok::<_, LabError>(u.loss_percent()));
    rec.record(Metric::Udp64Sent, Ok::<_, LabError>(u.sent_pps() / 1e3));
    // Where the loss happened: the receiving pod's socket, or on the way there.
    let at_socket = before.and_then(|b| {
        let a = udp_rcvbuf_errors(&pods.p2)?;
        Ok(100.0 * a.saturating_sub(b).min(u.lost) as f64 / u.packets.max(1) as f64)
    });
    rec.record(Metric::Udp64SocketLoss, at_socket);
}

/// NetworkPolicy's cost, on plain vswitch: each ratio divides the value with policies by the
/// one without, measured seconds before on the same testbed; the policies are removed after.
fn policy(bed: &Testbed, d: &Durations, rec: &mut Recorder) {
    const ALL: [Metric; 4] = [
        Metric::PolicyTcp,
        Metric::PolicyTcpRatio,
        Metric::PolicyCrr,
        Metric::PolicyCrrRatio,
    ];
    if bed.kind != Kind::Vswitch {
        let why = if matches!(bed.kind, Kind::Kernel | Kind::Ovs) {
            "the anchor topology enforces no NetworkPolicy"
        } else {
            "measured on plain vswitch (one worker) only"
        };
        for m in ALL {
            rec.not_applicable(m, why.into());
        }
        return;
    }
    let pods = &bed.pods;
    let tcp = || {
        iperf_tcp(&pods.p1, &pods.p2, pods.p2.ip, 1, d.tcp, None).map(|t| t.bits_per_second / 1e9)
    };
    let crr = || tcp_crr(&pods.p1, &pods.p2, d.rr).map(|r| r.rate());
    let ratio = |with: &Result<f64, LabError>, none: &Result<f64, LabError>| match (with, none) {
        (Ok(w), Ok(n)) if *n > 0.0 => Ok(w / n),
        (Err(e), _) | (_, Err(e)) => Err(LabError::Measurement(e.to_string())),
        _ => Err(LabError::Measurement(
            "nothing moved without policies".into(),
        )),
    };
    let run = || -> Result<[Result<f64, LabError>; 4], LabError> {
        bed.set_policies(0)?;
        let tcp_none = tcp();
        bed.set_policies(100)?;
        let tcp_100 = tcp();
        bed.set_policies(0)?;
        let crr_none = crr();
        bed.set_policies(1000)?;
        let crr_1000 = crr();
        let tcp_ratio = ratio(&tcp_100, &tcp_none);
        let crr_ratio = ratio(&crr_1000, &crr_none);
        Ok([tcp_100, tcp_ratio, crr_1000, crr_ratio])
    };
    let results = run();
    // The policies go whatever happened, so the tests after this one run without them.
    let cleared = bed.set_policies(0);
    match results {
        Ok(values) => {
            for (m, v) in ALL.into_iter().zip(values) {
                rec.record(m, v);
            }
        }
        Err(e) => rec.fail(&ALL, &e),
    }
    if let Err(e) = cleared {
        (rec.log)(&format!("  policies not removed: {e}"));
    }
}
