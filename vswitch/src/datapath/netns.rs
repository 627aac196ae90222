//! Running work inside another network namespace.
//!
//! `setns(2)` changes the namespace of the calling thread only, so namespace work runs on a
//! fresh OS thread made for it and thrown away afterwards: no pooled thread (tokio's blocking
//! pool included) is ever left in a pod's namespace. Sockets and TAP queues opened there stay
//! bound to that namespace after the thread is gone.

use std::fs::File;
use std::io;
use std::path::Path;

use nix::sched::{setns, CloneFlags};

/// Runs `f` on a new thread that has joined the network namespace at `netns` (a path such as
/// /var/run/netns/NAME or /proc/PID/ns/net) and returns its result.
pub fn run_in<T, F>(netns: &Path, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let ns = File::open(netns).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot open network namespace {}: {e}", netns.display()),
        )
    })?;
    let path = netns.display().to_string();
    std::thread::Builder::new()
        .name("netns".into())
        .spawn(move || {
            setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| {
                io::Error::other(format!("cannot enter network namespace {path}: {e}"))
            })?;
            drop(ns);
            f()
        })?
        .join()
        .map_err(|_| io::Error::other("namespace worker thread panicked"))?
}
