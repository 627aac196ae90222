//! The driver: checks the tools, measures what a wake-up costs, brings every datapath up, runs
//! the repetitions (every datapath runs a test before the next test starts), and tears down.

use std::fs;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::cpu::cpu_model;
use super::exec::{install_signal_handlers, interrupted};
use super::measure::{measure, Test};
use super::report::wake_text;
use super::testbed::Testbed;
use super::{utc_timestamp, BenchError, BenchOptions, Kind, Report};

pub(super) fn need_tool(tool: &'static str, package: &'static str) -> Result<(), BenchError> {
    if have_tool(tool) {
        Ok(())
    } else {
        Err(BenchError::MissingTool { tool, package })
    }
}

pub(crate) fn have_tool(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

pub(crate) fn git_commit() -> Option<String> {
    let out = Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=7"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let c = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !c.is_empty()).then_some(c)
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

    let mut report = new_report(opts);
    // On the idle machine, before any testbed: what a wake-up costs here.
    log("wake-up round trips between two threads");
    let wake = crate::wake::measure(
        opts.durations.ping_interval,
        if opts.quick { 5 } else { 20 },
    );
    log(&wake_text(&wake));
    report.wake = Some(wake);

    let beds = bring_up(&mut report, log);
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

/// The report's header: the machine, the commit and what was asked for.
fn new_report(opts: &BenchOptions) -> Report {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let first_line = |path: &str| {
        fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    Report {
        date: utc_timestamp(now),
        commit: git_commit(),
        kernel: first_line("/proc/sys/kernel/osrelease"),
        cpu_model: cpu_model(),
        tcp_cc: first_line("/proc/sys/net/ipv4/tcp_congestion_control"),
        cpus: thread::available_parallelism().map_or(1, |n| n.get()),
        reps: opts.reps.max(1),
        quick: opts.quick,
        durations: Some(opts.durations.clone()),
        datapaths: Kind::ALL
            .into_iter()
            .filter(|k| opts.only.contains(k))
            .collect(),
        ..Report::default()
    }
}

/// Brings every datapath of the report up; one that fails is reported and the others go on.
fn bring_up(report: &mut Report, log: &mut dyn FnMut(&str)) -> Vec<Testbed> {
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
                report.datapath_errors.insert(k, e.to_string());
            }
        }
    }
    beds
}
