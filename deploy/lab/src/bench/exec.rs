//! The bench's processes: every command is bounded in time and interruptible by Ctrl-C, and a
//! server in a pod is killed when its guard drops.

use std::fs;
use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::tcp_table_listens;
use super::testbed::{in_pod, PodRef};

pub(super) static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: nix::libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

pub(super) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// SIGINT, SIGTERM and SIGHUP set a flag the bench checks between (and during) steps; the
/// handler resets itself, so a second Ctrl-C kills at once.
pub(super) fn install_signal_handlers() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let act = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESETHAND | SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let _ = unsafe { sigaction(sig, &act) };
    }
}

pub(super) struct Finished {
    pub(super) status: ExitStatus,
    pub(super) stdout: String,
    pub(super) stderr: String,
}

pub(super) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.len() > 60 {
            s.push_str(" ...");
        } else {
            s.push(' ');
            s.push_str(&a);
        }
    }
    s
}

pub(super) fn reader<R: Read + Send + 'static>(r: Option<R>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Runs a command with a deadline; it is killed on timeout or Ctrl-C.
pub(super) fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<Finished, String> {
    run_until(cmd, timeout, true)
}

/// Runs a command with a deadline, and (if `interruptible`) until Ctrl-C. Teardown is not
/// interruptible: it is what Ctrl-C asks for.
pub(super) fn run_until(
    cmd: &mut Command,
    timeout: Duration,
    interruptible: bool,
) -> Result<Finished, String> {
    let what = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: {e}"))?;
    let out = reader(child.stdout.take());
    let err = reader(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Ok(st),
            Ok(None) if interruptible && interrupted() => break Err("interrupted".to_string()),
            Ok(None) if Instant::now() >= deadline => {
                break Err(format!("timed out after {}s", timeout.as_secs()))
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => break Err(e.to_string()),
        }
    };
    if status.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    match status {
        Ok(status) => Ok(Finished {
            status,
            stdout,
            stderr,
        }),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

/// Like [`run_bounded`], and a non-zero exit is an error with the tail of stderr.
pub(super) fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<String, String> {
    let what = describe(cmd);
    let f = run_bounded(cmd, timeout)?;
    success(&what, f)
}

/// The stdout of a command that exited 0, else its status and the tail of its stderr.
pub(super) fn success(what: &str, f: Finished) -> Result<String, String> {
    if f.status.success() {
        Ok(f.stdout)
    } else {
        let tail: Vec<&str> = f.stderr.lines().rev().take(6).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Err(format!("{what}: {}: {}", f.status, tail.join(" | ")))
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
    ) -> Result<Server, String> {
        let mut cmd = in_pod(pod, argv);
        let what = describe(&cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{what}: {e}"))?;
        let mut server = Server { child, what };
        server.wait_listening(program, port)?;
        Ok(server)
    }

    pub(super) fn wait_listening(&mut self, program: &str, port: u16) -> Result<(), String> {
        let pid = self.child.id();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(format!("{} exited ({st}) before listening", self.what));
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
                return Err("interrupted".into());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} is not listening on port {port} after 5s",
                    self.what
                ));
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
