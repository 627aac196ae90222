//! The targets, checked against a run: each PASS, FAIL or n/a with the numbers behind it.

use super::{Cell, Kind, Metric, Report, Target};

/// A target: vswitch's value (or its ratio over another datapath's) against a bound.
struct Def {
    text: &'static str,
    metric: Metric,
    /// vswitch's value over this datapath's, or vswitch's value itself.
    against: Option<Kind>,
    at_least: bool,
    bound: f64,
}

const fn def(
    text: &'static str,
    metric: Metric,
    against: Option<Kind>,
    at_least: bool,
    bound: f64,
) -> Def {
    Def {
        text,
        metric,
        against,
        at_least,
        bound,
    }
}

const K: Option<Kind> = Some(Kind::Kernel);
const O: Option<Kind> = Some(Kind::Ovs);

/// The targets, in the order printed.
const DEFS: [Def; 9] = [
    def(
        "cross-node TCP >= 0.7x the kernel path",
        Metric::TcpCross1,
        K,
        true,
        0.7,
    ),
    def(
        "cross-node TCP >= 8x Open vSwitch userspace",
        Metric::TcpCross1,
        O,
        true,
        8.0,
    ),
    def(
        "same-node TCP >= 0.9x the kernel path",
        Metric::TcpSame,
        K,
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
        K,
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
    def(
        "cross-node TCP with 100 policies >= 0.95x with none",
        Metric::PolicyTcpRatio,
        None,
        true,
        0.95,
    ),
    def(
        "new connections/s with 1,000 policies >= 0.8x with none",
        Metric::PolicyCrrRatio,
        None,
        true,
        0.8,
    ),
    def(
        "TCP to the outside host >= 0.5x the kernel's iptables MASQUERADE",
        Metric::EgressTcp,
        K,
        true,
        0.5,
    ),
];

impl Report {
    /// The targets, each PASS, FAIL or n/a.
    pub fn targets(&self) -> Vec<Target> {
        DEFS.iter()
            .map(|d| self.check(d))
            .chain(self.worker_targets())
            .collect()
    }

    /// `who`'s standing on `d`: its ratio over `d.against`, or its own value.
    fn standing(&self, d: &Def, who: Kind) -> (Option<f64>, Option<String>) {
        let metric = d.metric;
        match d.against {
            Some(k) => {
                let r = self.ratio_of(metric, who, k);
                (r, r.map(|r| format!("{r:.2}x")))
            }
            None => {
                let v = self.value(metric, who);
                (
                    v,
                    v.map(|v| format!("{}{}", metric.format(v), metric.unit())),
                )
            }
        }
    }

    fn check(&self, d: &Def) -> Target {
        let (value, shown) = self.standing(d, Kind::Vswitch);
        let need = match d.against {
            Some(_) => format!("{}{}x", if d.at_least { ">= " } else { "<= " }, d.bound),
            None => format!(
                "{}{}{}",
                if d.at_least { ">= " } else { "<= " },
                d.bound,
                d.metric.unit()
            ),
        };
        // After the verdict: the pinned variant's standing, for the reader (the target is
        // plain vswitch's), and the UDP breakdown.
        let extra = self
            .standing(d, Kind::VswitchPin)
            .1
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
    }

    /// For the UDP loss target: how much of vswitch's loss the receiving pod's socket dropped,
    /// and how fast its sender and the kernel path's sent.
    pub(super) fn udp_loss_detail(&self, m: Metric) -> String {
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
    pub(super) fn worker_targets(&self) -> Vec<Target> {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::tests::sample_report;

    #[test]
    fn ratios_and_targets_follow_the_medians() {
        let r = sample_report();
        assert_eq!(r.value(Metric::TcpCross1, Kind::Vswitch), Some(11.0));
        assert_eq!(r.ratio(Metric::TcpCross1, Kind::Kernel), Some(11.0 / 14.5));
        assert_eq!(r.ratio(Metric::TcpCross1, Kind::Ovs), Some(11.0 / 1.1));
        assert_eq!(r.ratio(Metric::Udp64Loss, Kind::Kernel), None);
        let t = r.targets();
        let status: Vec<&str> = t.iter().map(|t| t.status).collect();
        // 0.76x kernel, 10x OVS, same-node 0.5x, loss 0.5%, RTT 2.0x, ClusterIP n/a, 0.97x
        // with 100 policies, 0.7x new connections with 1,000, egress not measured, two
        // workers 0.9x of one with 4 streams and 1.09x with one.
        assert_eq!(
            status,
            [
                "PASS", "PASS", "FAIL", "PASS", "PASS", "n/a", "PASS", "FAIL", "n/a", "FAIL",
                "PASS"
            ]
        );
        assert_eq!(t[6].detail, "0.97x (needs >= 0.95x)");
        assert_eq!(t[7].detail, "0.70x (needs >= 0.8x)");
        assert_eq!(t[0].detail, "0.76x (needs >= 0.7x); vswitch-pin 0.90x");
        assert_eq!(t[3].detail, "0.5% (needs <= 1%)");
        assert!(t[5].detail.contains("not implemented"), "{}", t[5].detail);
        assert_eq!(t[9].detail, "9.00 vs 10.00 Gbit/s: 0.90x (needs >= 0.95x)");
        // Egress against the kernel's MASQUERADE.
        let mut egress = r.clone();
        egress.add(Metric::EgressTcp, Kind::Vswitch, 6.0);
        egress.add(Metric::EgressTcp, Kind::Kernel, 10.0);
        assert_eq!(egress.targets()[8].status, "PASS");
        assert_eq!(egress.targets()[8].detail, "0.60x (needs >= 0.5x)");
        let mut one_only = r.clone();
        one_only.datapaths = vec![Kind::Vswitch, Kind::Kernel, Kind::Ovs];
        assert_eq!(one_only.targets()[10].status, "n/a");
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
}
