//! The bench's processes: every command is bounded in time and interruptible by Ctrl-C, and a
//! server in a pod is killed when its guard drops.
//!
//! SIGINT, SIGTERM and SIGHUP only set [`interrupted`]: the driver and every wait check it, and
//! what the bench built is torn down as after an error. A second signal of the same kind takes
//! its default action, so a second Ctrl-C ends a teardown that hangs.

use std::fs;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::thread;
use std::time::{Duration, Instant};

use super::tcp_table_listens;
use super::testbed::{in_pod, PodRef};
use crate::process::{self, RunError};
use crate::LabError;

pub(super) use crate::process::describe;

static INTERRUPTED: LazyLock<Arc<AtomicBool>> = LazyLock::new(Arc::default);

pub(super) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Arms the flag (cleared) for a run.
pub(super) fn install_signal_handlers() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    // Registering handlers for these three cannot fail.
    let _ = process::set_on_signals(&INTERRUPTED, &[SIGINT, SIGTERM, SIGHUP], true);
    INTERRUPTED.store(false, Ordering::SeqCst);
}

/// A command that ran to its end.
pub(super) struct Finished {
    pub(super) status: ExitStatus,
    pub(super) stdout: String,
    pub(super) stderr: String,
}

/// Runs a command with a deadline; it is killed on timeout or Ctrl-C.
pub(super) fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<Finished, LabError> {
    run_until(cmd, timeout, true)
}

/// Runs a command with a deadline, and (if `interruptible`) until Ctrl-C. Teardown is not
/// interruptible: it is what Ctrl-C asks for.
pub(super) fn run_until(
    cmd: &mut Command,
    timeout: Duration,
    interruptible: bool,
) -> Result<Finished, LabError> {
    let stop = interruptible.then_some(&**INTERRUPTED);
    let out = process::run_bounded(cmd, None, timeout, stop).map_err(|e| {
        let (cmd, reason) = match e {
            RunError::Spawn { cmd, source } | RunError::Wait { cmd, source } => {
                (cmd, source.to_string())
            }
            RunError::TimedOut { cmd, timeout, .. } => {
                (cmd, format!("timed out after {}s", timeout.as_secs()))
            }
            RunError::Interrupted { cmd } => (cmd, "interrupted".into()),
        };
        LabError::BenchCommand { cmd, reason }
    })?;
    Ok(Finished {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Like [`run_bounded`], and a non-zero exit is an error with the tail of stderr.
pub(super) fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<String, LabError> {
    let what = describe(cmd);
    let f = run_bounded(cmd, timeout)?;
    success(&what, f)
}

/// The stdout of a command that exited 0, else its status and the tail of its stderr.
pub(super) fn success(what: &str, f: Finished) -> Result<String, LabError> {
    if f.status.success() {
        Ok(f.stdout)
    } else {
        let tail: Vec<&str> = f.stderr.lines().rev().take(6).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Err(LabError::BenchCommand {
            cmd: what.to_string(),
            reason: format!("{}: {}", f.status, tail.join(" | ")),
        })
    }
}

pub(super) fn in_netns(netns: &str, argv: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", netns]).args(argv);
    c
}

/// A server in a pod, killed when dropped.
pub(super) struct Server {
    pub(super) child: Child,
    pub(super) what: String,
}

impl Server {
    /// Starts `argv` in `pod` and waits until it listens on TCP `port` there.
    pub(super) fn start(
        pod: &PodRef,
        argv: &[&str],
        program: &str,
        port: u16,
    ) -> Result<Server, LabError> {
        let mut cmd = in_pod(pod, argv);
        let what = describe(&cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| LabError::BenchCommand {
                cmd: what.clone(),
                reason: e.to_string(),
            })?;
        let mut server = Server { child, what };
        server.wait_listening(program, port)?;
        Ok(server)
    }

    pub(super) fn wait_listening(&mut self, program: &str, port: u16) -> Result<(), LabError> {
        let pid = self.child.id();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(LabError::Measurement(format!(
                    "{} exited ({st}) before listening",
                    self.what
                )));
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
                return Err(LabError::Interrupted);
            }
            if Instant::now() >= deadline {
                return Err(LabError::Measurement(format!(
                    "{} is not listening on port {port} after 5s",
                    self.what
                )));
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
