//! The lab's contact with the system: iproute2 for plumbing, and the daemon's process.
//!
//! The lab is a test harness, so it drives `ip` rather than netlink: every step is then a
//! command a user can read in an error and rerun by hand. Every veth is created directly inside
//! its namespaces (`ip link add ... netns A type veth peer ... netns B`), so the host's own
//! namespace sees nothing but the `/run/netns` entries.
//!
//! A daemon is identified by its pid *and* its command line (which holds the lab's config path),
//! so a stale pid file can never make the lab signal an unrelated process that reused the pid.

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

pub(crate) use crate::process::{describe, wait_until};
use crate::LabError;

/// Where `ip netns` keeps its namespaces (as runtimes pass them in CNI_NETNS).
pub(crate) const NETNS_DIR: &str = "/var/run/netns";

pub(crate) fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Runs a command to completion; non-zero exit is an error carrying its stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<String, LabError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| LabError::Spawn {
            cmd: describe(cmd),
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(LabError::Command {
            cmd: describe(cmd),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Runs `ip ARGS...`.
pub(crate) fn ip(args: &[&str]) -> Result<String, LabError> {
    run(Command::new("ip").args(args))
}

pub(crate) fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

pub(crate) fn netns_exists(name: &str) -> bool {
    netns_path(name).exists()
}

/// Every namespace `ip netns list` knows.
pub(crate) fn netns_list() -> Result<Vec<String>, LabError> {
    let out = ip(&["netns", "list"])?;
    // Lines look like "name (id: 3)" or just "name".
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// `ip netns del`, treating an already-missing namespace as done.
pub(crate) fn netns_del(name: &str) -> Result<(), LabError> {
    // The pod's resolv.conf, which `ip netns exec` bind-mounts over /etc/resolv.conf.
    let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(name));
    match ip(&["netns", "del", name]) {
        Err(_) if !netns_exists(name) => Ok(()),
        other => other.map(|_| ()),
    }
}

/// Writes the DNS settings of a CNI result where `ip netns exec` finds them
/// (/etc/netns/NETNS/resolv.conf), as a runtime writes a container's resolv.conf.
pub(crate) fn write_resolv_conf(netns: &str, cni_result: &serde_json::Value) {
    let dns = &cni_result["dns"];
    let list = |k: &str| -> Vec<String> {
        dns[k]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let servers = list("nameservers");
    if servers.is_empty() {
        return;
    }
    let mut text = String::new();
    for s in servers {
        text.push_str(&format!("nameserver {s}\n"));
    }
    let search = list("search");
    if !search.is_empty() {
        text.push_str(&format!("search {}\n", search.join(" ")));
    }
    let options = list("options");
    if !options.is_empty() {
        text.push_str(&format!("options {}\n", options.join(" ")));
    }
    let dir = Path::new("/etc/netns").join(netns);
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join("resolv.conf"), text);
    }
}

/// Starts `ip netns exec NETNS EXE --config CONFIG` in a session of its own, so the daemon
/// outlives the command that started it, with stdout and stderr appended to `log`.
/// `ip netns exec` execs the program without forking, so the child's pid is the daemon's.
pub(crate) fn spawn_daemon(
    netns: &str,
    exe: &Path,
    config: &Path,
    log: &Path,
) -> Result<Child, LabError> {
    spawn_detached(netns, exe, &["--config".as_ref(), config.as_os_str()], log)
}

/// Starts `ip netns exec NETNS EXE ARGS...` in a session of its own (see [`spawn_daemon`]).
pub(crate) fn spawn_detached(
    netns: &str,
    exe: &Path,
    args: &[&std::ffi::OsStr],
    log: &Path,
) -> Result<Child, LabError> {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| LabError::io(log, e))?;
    let err = out.try_clone().map_err(|e| LabError::io(log, e))?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns])
        .arg(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: the closure runs in the forked child before exec and only calls setsid(2), which
    // is async-signal-safe and touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(drop).map_err(io::Error::from));
    }
    cmd.spawn().map_err(|source| LabError::Spawn {
        cmd: describe(&cmd),
        source,
    })
}

fn to_pid(pid: u32) -> Option<Pid> {
    // pid 0 and negative pids address process groups in kill(2): never let one through.
    i32::try_from(pid)
        .ok()
        .filter(|p| *p > 0)
        .map(Pid::from_raw)
}

/// Whether `pid` is alive and is the process started with `marker` among its arguments.
/// Reaps it if it is this process's child and has exited.
pub(crate) fn process_alive(pid: u32, marker: &OsStr) -> bool {
    let Some(p) = to_pid(pid) else {
        return false;
    };
    match waitpid(p, Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::StillAlive) => return true,
        Ok(_) => return false,
        Err(_) => {} // Not our child: look it up.
    }
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state is the first field after the command name, which ends at the last ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    if matches!(state, None | Some('Z') | Some('X')) {
        return false;
    }
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    cmdline.split(|b| *b == 0).any(|a| a == marker.as_bytes())
}

/// How a daemon was stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stopped {
    NotRunning,
    Terminated,
    Killed,
}

fn wait_gone(pid: u32, marker: &OsStr, timeout: Duration) -> bool {
    wait_until(timeout, || !process_alive(pid, marker))
}

/// SIGSTOP (`hold`) or SIGCONT (`!hold`) to `pid`, if it is still the process started with
/// `marker` (as [`stop_process`] checks, so a reused pid is never signalled): a stopped process
/// keeps its descriptors (a TAP keeps its carrier) but uses no CPU.
pub(crate) fn hold_process(pid: u32, marker: &OsStr, hold: bool) -> Result<(), String> {
    let Some(p) = to_pid(pid).filter(|_| process_alive(pid, marker)) else {
        return Err(format!("vswitchd pid {pid} is not running"));
    };
    let sig = if hold {
        Signal::SIGSTOP
    } else {
        Signal::SIGCONT
    };
    kill(p, sig).map_err(|e| format!("cannot send {sig} to pid {pid}: {e}"))
}

/// SIGTERM, then SIGKILL after `grace`.
pub(crate) fn stop_process(pid: u32, marker: &OsStr, grace: Duration) -> Result<Stopped, String> {
    let Some(p) = to_pid(pid) else {
        return Ok(Stopped::NotRunning);
    };
    if !process_alive(pid, marker) {
        return Ok(Stopped::NotRunning);
    }
    match kill(p, Signal::SIGTERM) {
        Err(Errno::ESRCH) => return Ok(Stopped::NotRunning),
        Err(e) => return Err(format!("cannot signal vswitchd pid {pid}: {e}")),
        Ok(()) => {}
    }
    if wait_gone(pid, marker, grace) {
        return Ok(Stopped::Terminated);
    }
    match kill(p, Signal::SIGKILL) {
        Err(Errno::ESRCH) | Ok(()) => {}
        Err(e) => return Err(format!("cannot kill vswitchd pid {pid}: {e}")),
    }
    if wait_gone(pid, marker, Duration::from_secs(5)) {
        Ok(Stopped::Killed)
    } else {
        Err(format!("vswitchd pid {pid} is still alive after SIGKILL"))
    }
}

/// This process and its ancestors (a shell the lab was run from, say).
fn self_and_ancestors() -> Vec<u32> {
    let mut out = vec![std::process::id()];
    while let Some(&pid) = out.last() {
        let ppid = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                // The parent is the second field after the command name, which ends at the
                // last ')'.
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
            });
        match ppid {
            Some(p) if p > 1 && !out.contains(&p) => out.push(p),
            _ => break,
        }
    }
    out
}

/// The processes whose network namespace is one of `netns` (what `ip netns pids` lists), each
/// with its command name; not this process nor its ancestors (`down` run from a shell inside a
/// lab namespace leaves that shell alone).
pub(crate) fn netns_pids(netns: &[&str]) -> Vec<(u32, String)> {
    use std::os::unix::fs::MetadataExt;
    let targets: Vec<(u64, u64)> = netns
        .iter()
        .filter_map(|ns| fs::metadata(netns_path(ns)).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect();
    if targets.is_empty() {
        return Vec::new();
    }
    let spare = self_and_ancestors();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| !spare.contains(pid))
        // A zombie has no namespaces left: its ns/net cannot be followed.
        .filter(|pid| {
            fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| targets.contains(&(m.dev(), m.ino())))
        })
        .map(|pid| {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            (pid, comm.trim().to_string())
        })
        .collect()
}

/// Stops every process still running in any of `netns`, all at once: SIGTERM, then SIGKILL
/// for what is left after `grace`. Returns what was found (pid, command name); an error when
/// something survives.
pub(crate) fn stop_netns_processes(
    netns: &[&str],
    grace: Duration,
) -> Result<Vec<(u32, String)>, String> {
    let found = netns_pids(netns);
    if found.is_empty() {
        return Ok(found);
    }
    // Each round looks again: a process may have started a child meanwhile.
    let signal_all = |sig: Signal| {
        for (pid, _) in netns_pids(netns) {
            if let Some(p) = to_pid(pid) {
                let _ = kill(p, sig);
            }
        }
    };
    // A child of ours that exited is a zombie until its owner waits for it, and a zombie has
    // left its namespace: it counts as gone.
    let all_gone = || netns_pids(netns).is_empty();
    signal_all(Signal::SIGTERM);
    if !wait_until(grace, all_gone) {
        signal_all(Signal::SIGKILL);
        if !wait_until(Duration::from_secs(5), all_gone) {
            let left: Vec<String> = netns_pids(netns)
                .iter()
                .map(|(pid, comm)| format!("{comm} (pid {pid})"))
                .collect();
            return Err(format!(
                "still running in the lab's namespaces after SIGKILL: {}",
                left.join(", ")
            ));
        }
    }
    Ok(found)
}

/// The last `n` lines of a log file, for error messages.
pub(crate) fn log_tail(path: &Path, n: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(n)..].join("\n");
            if tail.trim().is_empty() {
                "(the log is empty)".into()
            } else {
                tail
            }
        }
        Err(e) => format!("(cannot read the log: {e})"),
    }
}

/// The CPUs this process may run on but `reserved`, as a `taskset -c` list: where a pod's
/// programs go when the datapath has cores of its own (what kubelet's reserved CPUs do).
pub fn cpus_besides(reserved: &[u32]) -> Result<String, String> {
    cpu_list_besides(&allowed_cpus()?, reserved)
}

/// The CPUs the calling thread may run on, in order.
pub fn allowed_cpus() -> Result<Vec<usize>, String> {
    use nix::sched::{sched_getaffinity, CpuSet};
    let allowed = sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .map_err(|e| format!("sched_getaffinity: {e}"))?;
    Ok((0..CpuSet::count())
        .filter(|&c| allowed.is_set(c).unwrap_or(false))
        .collect())
}

/// Pins the calling thread to one CPU.
pub fn pin_thread(cpu: usize) -> Result<(), String> {
    use nix::sched::{sched_setaffinity, CpuSet};
    let mut set = CpuSet::new();
    set.set(cpu).map_err(|e| format!("CPU {cpu}: {e}"))?;
    sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .map_err(|e| format!("sched_setaffinity to CPU {cpu}: {e}"))
}

/// `allowed` without `reserved`, comma-separated; an error when nothing is left.
pub(crate) fn cpu_list_besides(allowed: &[usize], reserved: &[u32]) -> Result<String, String> {
    let rest: Vec<String> = allowed
        .iter()
        .filter(|&&c| !reserved.iter().any(|&r| r as usize == c))
        .map(|c| c.to_string())
        .collect();
    if rest.is_empty() {
        return Err(format!(
            "no CPU is left for the pods: the datapath has {reserved:?} of the CPUs this process \
             may use ({allowed:?})"
        ));
    }
    Ok(rest.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_and_its_parents_are_spared() {
        let spare = self_and_ancestors();
        assert_eq!(spare[0], std::process::id());
        let parent = std::os::unix::process::parent_id();
        if parent > 1 {
            assert_eq!(spare.get(1), Some(&parent), "{spare:?}");
        }
        assert!(!spare.contains(&1), "{spare:?}");
    }

    #[test]
    fn a_foreign_or_missing_pid_is_not_a_daemon() {
        let marker = OsStr::new("/run/vswitch-lab/none/n1/vswitchd.toml");
        assert!(!process_alive(0, marker));
        assert!(!process_alive(u32::MAX, marker));
        // This test process is alive but is not a vswitchd of that lab.
        assert!(!process_alive(std::process::id(), marker));
        assert_eq!(
            stop_process(std::process::id(), marker, Duration::from_millis(10)),
            Ok(Stopped::NotRunning)
        );
    }

    #[test]
    fn child_processes_are_recognised_stopped_and_reaped() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let marker = OsStr::new("30");
        assert!(process_alive(child.id(), marker));
        assert_eq!(
            stop_process(child.id(), marker, Duration::from_secs(5)),
            Ok(Stopped::Terminated)
        );
        assert!(!process_alive(child.id(), marker));
        // Already reaped by stop_process: this only satisfies the type's contract.
        let _ = child.wait();
    }

    #[test]
    fn log_tails() {
        let p = std::env::temp_dir().join(format!("vswitch-lab-tail-{}", std::process::id()));
        fs::write(&p, "a\nb\nc\n").unwrap();
        assert_eq!(log_tail(&p, 2), "b\nc");
        fs::remove_file(&p).unwrap();
        assert!(log_tail(&p, 2).contains("cannot read"));
    }

    #[test]
    fn pods_get_the_cpus_the_datapath_does_not() {
        assert_eq!(cpu_list_besides(&[0, 1, 2, 3], &[0]).unwrap(), "1,2,3");
        assert_eq!(cpu_list_besides(&[0, 1, 2, 3], &[1, 3]).unwrap(), "0,2");
        assert_eq!(cpu_list_besides(&[2, 3], &[7]).unwrap(), "2,3");
        assert!(cpu_list_besides(&[0], &[0])
            .unwrap_err()
            .contains("no CPU is left"));
    }
}
