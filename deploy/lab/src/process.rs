//! Child processes with a deadline, and the flag that Ctrl-C sets.
//!
//! Every program the lab, the bench, the soak and the end-to-end tests run to completion goes
//! through [`run_bounded`]: it is killed when it overruns its deadline (or, for the bench, when
//! Ctrl-C asks everything to stop), so no step can hang a run. Output is collected as it comes:
//! a grandchild that keeps a pipe open (a daemonised server) cannot make the caller wait for
//! it; after the child's exit the readers get [`PIPE_GRACE`], then what came is what it said.
//!
//! Signals only set a flag ([`set_on_signals`], with signal-hook's handlers): the loops check it
//! between steps and tear down what they built, as after an error.

use std::ffi::c_int;
use std::io::{self, Read, Write};
use std::process::{Child, ChildStderr, ChildStdout, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long the readers of a finished child's output may take to see the end of its pipes.
pub const PIPE_GRACE: Duration = Duration::from_secs(2);

/// Arguments longer than this (or of several lines, an inline script) are shown as `...`.
const LONG_ARG: usize = 200;

/// A command line as a user would type it, for error messages; an inline script or another
/// very long argument is shown as `...`.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.len() > LONG_ARG || a.contains('\n') {
            s.push_str(" ...");
        } else {
            s.push(' ');
            s.push_str(&a);
        }
    }
    s
}

/// `timeout -k 1 LIMIT ip netns exec NS ARGV...`: `argv` in namespace `ns`, ended by coreutils'
/// timeout after `limit` (and killed a second later) even if the caller dies first.
pub fn bounded_in(ns: &str, argv: &[&str], limit: Duration) -> Command {
    let mut c = Command::new("timeout");
    c.args(["-k", "1", &format!("{:.1}", limit.as_secs_f64())])
        .args(["ip", "netns", "exec", ns])
        .args(argv);
    c
}

/// Why [`run_bounded`] has no exit status to give.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot run `{cmd}`: {source}")]
    Spawn { cmd: String, source: io::Error },

    /// Killed at the deadline; what it had printed by then.
    #[error("`{cmd}` did not finish within {}s and was killed", timeout.as_secs())]
    TimedOut {
        cmd: String,
        timeout: Duration,
        stdout: Vec<u8>,
        stderr: Vec<u8>,
    },

    /// Killed because the stop flag was set.
    #[error("`{cmd}` was interrupted")]
    Interrupted { cmd: String },

    #[error("waiting for `{cmd}`: {source}")]
    Wait { cmd: String, source: io::Error },
}

/// Runs `cmd` with `input` on stdin (None: /dev/null) and stdout and stderr collected; kills it
/// after `timeout`, or as soon as `stop` is set. A non-zero exit is the caller's to judge.
pub fn run_bounded(
    cmd: &mut Command,
    input: Option<&[u8]>,
    timeout: Duration,
    stop: Option<&AtomicBool>,
) -> Result<Output, RunError> {
    let desc = describe(cmd);
    let stdin = if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    };
    let mut child = cmd
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| RunError::Spawn {
            cmd: desc.clone(),
            source,
        })?;
    if let (Some(input), Some(mut pipe)) = (input, child.stdin.take()) {
        let input = input.to_vec();
        // A program may exit without reading its input; that is its business, not an error.
        thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
    }
    let out = Collector::start(child.stdout.take());
    let err = Collector::start(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let failed = loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let grace = Instant::now() + PIPE_GRACE;
                return Ok(Output {
                    status,
                    stdout: out.finish(grace),
                    stderr: err.finish(grace),
                });
            }
            Ok(None) if stop.is_some_and(|s| s.load(Ordering::SeqCst)) => {
                break RunError::Interrupted { cmd: desc };
            }
            Ok(None) if Instant::now() >= deadline => {
                break RunError::TimedOut {
                    cmd: desc,
                    timeout,
                    stdout: out.so_far(),
                    stderr: err.so_far(),
                };
            }
            Ok(None) => thread::sleep(Duration::from_millis(5)),
            Err(source) => break RunError::Wait { cmd: desc, source },
        }
    };
    kill(&mut child);
    Err(failed)
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Reads a pipe on a thread of its own into a buffer the caller can look at any time.
struct Collector {
    buf: Arc<Mutex<Vec<u8>>>,
    reader: thread::JoinHandle<()>,
}

/// The two pipes a child's output comes on.
trait Pipe: Read + Send + 'static {}
impl Pipe for ChildStdout {}
impl Pipe for ChildStderr {}

impl Collector {
    fn start(pipe: Option<impl Pipe>) -> Collector {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let into = buf.clone();
        let reader = thread::spawn(move || {
            let Some(mut pipe) = pipe else { return };
            let mut chunk = [0u8; 65536];
            while let Ok(n) = pipe.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                lock(&into).extend_from_slice(&chunk[..n]);
            }
        });
        Collector { buf, reader }
    }

    fn so_far(&self) -> Vec<u8> {
        lock(&self.buf).clone()
    }

    /// What came until the pipe closed, or until `grace` if something still holds it open.
    fn finish(self, grace: Instant) -> Vec<u8> {
        while !self.reader.is_finished() && Instant::now() < grace {
            thread::sleep(Duration::from_millis(2));
        }
        std::mem::take(&mut *lock(&self.buf))
    }
}

fn lock(buf: &Mutex<Vec<u8>>) -> std::sync::MutexGuard<'_, Vec<u8>> {
    // A reader that panicked left whole chunks behind: still the output.
    buf.lock().unwrap_or_else(|e| e.into_inner())
}

/// Checks `done` every 20 ms until it holds (true) or `timeout` has passed (false).
pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Sets `flag` when any of `signals` arrives. With `second_kills`, a second delivery of the
/// same signal takes its default action (for SIGINT, SIGTERM and SIGHUP: the process ends), so
/// a second Ctrl-C stops a teardown that hangs.
pub fn set_on_signals(
    flag: &Arc<AtomicBool>,
    signals: &[c_int],
    second_kills: bool,
) -> io::Result<()> {
    for &sig in signals {
        if second_kills {
            // Registered first, so it sees the flag as the previous delivery left it.
            let seen = Arc::new(AtomicBool::new(false));
            signal_hook::flag::register_conditional_default(sig, seen.clone())?;
            signal_hook::flag::register(sig, seen)?;
        }
        signal_hook::flag::register(sig, flag.clone())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_hide_inline_scripts() {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", "vsl-n1-p1", "ip", "addr"]);
        assert_eq!(describe(&cmd), "ip netns exec vsl-n1-p1 ip addr");
        let mut cmd = Command::new("bash");
        cmd.args(["-c", "set -e\nip link\n", "kernel-vxlan.sh", "up"]);
        assert_eq!(describe(&cmd), "bash -c ... kernel-vxlan.sh up");
    }

    #[test]
    fn input_output_and_timeouts() {
        let out = run_bounded(
            &mut Command::new("cat"),
            Some(b"hello"),
            Duration::from_secs(5),
            None,
        )
        .unwrap();
        assert_eq!(out.stdout, b"hello");
        assert!(out.status.success());
        let mut slow = Command::new("sh");
        slow.args(["-c", "echo started; sleep 10"]);
        let e = run_bounded(&mut slow, None, Duration::from_millis(300), None).unwrap_err();
        assert!(e.to_string().contains("did not finish"), "{e}");
        assert!(
            matches!(&e, RunError::TimedOut { stdout, .. } if stdout == b"started\n"),
            "{e:?}"
        );
    }

    #[test]
    fn a_set_stop_flag_kills_at_once() {
        let stop = AtomicBool::new(true);
        let started = Instant::now();
        let e = run_bounded(
            Command::new("sleep").arg("10"),
            None,
            Duration::from_secs(10),
            Some(&stop),
        )
        .unwrap_err();
        assert!(matches!(e, RunError::Interrupted { .. }), "{e:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_grandchild_holding_the_pipe_does_not_hold_the_caller() {
        let started = Instant::now();
        let out = run_bounded(
            Command::new("sh").args(["-c", "echo hi; sleep 6 &"]),
            None,
            Duration::from_secs(10),
            None,
        )
        .unwrap();
        assert_eq!(out.stdout, b"hi\n");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
