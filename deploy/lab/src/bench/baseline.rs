//! The anchors vswitch is compared with: the kernel path (bridge + vxlan, as flannel builds it)
//! and Open vSwitch's userspace datapath, each built by its script in `deploy/bench/` (compiled
//! into this binary so it runs anywhere) in namespaces `PREFIX-*`.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use super::exec::run_ok;
use super::testbed::{Bed, Testbed};
use super::{Kind, PodRef, Pods};
use crate::LabError;

pub(super) const KERNEL_SCRIPT: &str = include_str!("../../../bench/kernel-vxlan.sh");
pub(super) const OVS_SCRIPT: &str = include_str!("../../../bench/ovs-netdev.sh");

pub(super) fn script_cmd(kind: Kind, script: &str, prefix: &str, verb: &str) -> Command {
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

pub(super) fn script_pods(prefix: &str) -> Pods {
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
    pub(super) fn up_script(
        kind: Kind,
        script: &'static str,
        prefix: &'static str,
    ) -> Result<Testbed, LabError> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
