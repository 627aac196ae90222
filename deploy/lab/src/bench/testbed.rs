//! Testbeds: one two-node, three-pod topology per datapath, torn down on drop. vswitch's are
//! labs; the kernel path's and Open vSwitch's are built by scripts ([`super::baseline`]).

use std::net::Ipv4Addr;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use super::baseline::{script_cmd, KERNEL_SCRIPT, OVS_SCRIPT};
use super::exec::{describe, in_netns, interrupted, run_bounded, run_until, success};
use super::{Kind, KERNEL_PREFIX, LAB_NAME, LAB_NAME_2W, LAB_NAME_PIN, OVS_PREFIX, PIN_CPU};
use crate::{Lab, LabError, LabGuard, LabSpec};

/// A pod of a testbed.
#[derive(Debug, Clone)]
pub struct PodRef {
    pub netns: String,
    pub ip: Ipv4Addr,
    /// The CPUs its programs run on (`taskset -c`), when kept off the datapath's.
    pub cpus: Option<String>,
}

/// `argv` as a program of `pod`: in its namespace, on its CPUs.
pub(super) fn in_pod(pod: &PodRef, argv: &[&str]) -> Command {
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

pub(super) enum Bed {
    Vswitch(LabGuard),
    Script {
        kind: Kind,
        script: &'static str,
        prefix: &'static str,
    },
}

/// A datapath's topology, torn down on drop.
pub(super) struct Testbed {
    pub(super) kind: Kind,
    pub(super) pods: Pods,
    /// None once torn down.
    pub(super) bed: Option<Bed>,
    /// The datapath processes whose CPU time is counted (empty for the kernel path).
    pub(super) pids: Vec<u32>,
}

impl Testbed {
    /// Stops (`hold`) or continues the polling testbed's datapath processes. Between its own
    /// tests vswitch-pin's workers would otherwise poll CPU 0 at times under another
    /// datapath's measurement (an idle pinned lab's workers used 11% and 17% of a CPU over 5 s,
    /// seconds after its last traffic: the pods' IPv6 router solicitations, which Linux repeats
    /// for an hour, each open a 1 s polling window); the plain datapaths spin only 200 µs after
    /// a frame and are left alone.
    pub(super) fn hold(&self, hold: bool, log: &mut dyn FnMut(&str)) {
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

    pub(super) fn up(kind: Kind) -> Result<Testbed, LabError> {
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

    pub(super) fn up_vswitch(kind: Kind, spec: LabSpec) -> Result<Testbed, LabError> {
        // Leftovers of a run that was killed.
        Lab::teardown(&spec.name)?;
        let mut lab = LabGuard::up(spec)?;
        // With the datapath on cores of its own, the pods' programs run on the others, where
        // the lab's `exec` runs them too.
        let cpus = lab.pod_cpus()?;
        let mut pod = |node: u32, name: &str| -> Result<PodRef, LabError> {
            let p = lab.add_pod(node, name)?;
            match p.ip {
                std::net::IpAddr::V4(ip) => Ok(PodRef {
                    netns: p.netns.clone(),
                    ip,
                    cpus: cpus.clone(),
                }),
                other => Err(LabError::Measurement(format!(
                    "pod {} got {other}, not IPv4",
                    p.name
                ))),
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

    /// The host outside the cluster, as a pod-like place to run servers: vswitch's labs have
    /// one on the fabric (`out`), reached by egress translation; the kernel path's script makes
    /// one behind node 1, reached through iptables MASQUERADE (when iptables is there).
    pub(super) fn outside(&self) -> Result<PodRef, String> {
        match &self.bed {
            Some(Bed::Vswitch(lab)) => {
                let netns = lab
                    .outside_netns
                    .clone()
                    .ok_or_else(|| "the lab has no outside host".to_string())?;
                Ok(PodRef {
                    netns,
                    ip: crate::spec::OUTSIDE_IP,
                    cpus: None,
                })
            }
            Some(Bed::Script {
                kind: Kind::Kernel,
                prefix,
                ..
            }) => {
                let netns = format!("{prefix}-out");
                if !crate::sys::netns_exists(&netns) {
                    return Err("no iptables on this machine: no MASQUERADE to compare with".into());
                }
                Ok(PodRef {
                    netns,
                    ip: Ipv4Addr::new(192, 168, 200, 2),
                    cpus: None,
                })
            }
            _ => Err(
                "not built for this datapath (the kernel path's MASQUERADE is the anchor)".into(),
            ),
        }
    }

    /// Waits until p1 reaches p2 and p1b (OVS takes a moment to learn).
    pub(super) fn wait_connected(&self) -> Result<(), LabError> {
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
                    return Err(LabError::Interrupted);
                }
                if Instant::now() >= deadline {
                    return Err(LabError::Measurement(format!(
                        "no connectivity: {} cannot ping {ip} after 15s",
                        self.pods.p1.netns
                    )));
                }
                thread::sleep(Duration::from_millis(200));
            }
        }
        Ok(())
    }

    /// Tears the topology down; a second call does nothing.
    pub(super) fn down(&mut self) -> Result<(), LabError> {
        match self.bed.take() {
            None => Ok(()),
            Some(Bed::Vswitch(guard)) => guard.into_inner().down().map(drop),
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
