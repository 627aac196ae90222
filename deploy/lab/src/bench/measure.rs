//! One test on one testbed, into the report: the tests a repetition runs, in order, and the
//! metrics each one gives.

use super::cpu::{read_cpu, read_pids_cpu, ticks_per_second};
use super::latency::{ping_rtt, tcp_rr};
use super::testbed::Testbed;
use super::throughput::{iperf_tcp, iperf_udp64, udp_rcvbuf_errors};
use super::{busy_seconds, Durations, Metric, Report, IPERF_PORT};

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
}

impl Test {
    pub(super) const ALL: [Test; 8] = [
        Test::Ping,
        Test::RequestResponse,
        Test::Cross1,
        Test::Cross4,
        Test::Same,
        Test::CrossCubic,
        Test::SameCubic,
        Test::Udp64,
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
        }
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
