//! What a wake-up costs on this machine: the round trip of one byte between two threads over a
//! socket pair, each blocked in `read` until the other writes, on two CPUs and on one, back to
//! back and after the CPUs sat idle.
//!
//! Every hop a datapath hands to another thread (pod to switch, switch to switch, switch to
//! pod) pays this, and a request that comes after a pause pays the idle figure: a vCPU with
//! nothing to run halts, and waking it takes a trip through the hypervisor. On bare metal the
//! figures are a few microseconds; on a VM that does not halt-poll they can be tens to hundreds,
//! and then they, not the switch, set ping and request/response times. The bench prints them
//! beside its table so its latency ratios can be read against the machine they came from.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant};

use crate::sys::pin_thread;

/// Medians of one-byte round trips between two threads, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WakeCost {
    /// The two threads on different CPUs, one round trip right after the other.
    pub cross_busy_us: f64,
    /// On different CPUs, each round trip after `idle` of sleep.
    pub cross_idle_us: f64,
    /// Both threads on one CPU, back to back.
    pub same_busy_us: f64,
    /// On one CPU, each after `idle` of sleep.
    pub same_idle_us: f64,
    /// The pause before each idle round trip (the bench's ping interval).
    pub idle: Duration,
}

/// Round trips back to back, per placement.
const BUSY_ROUNDS: usize = 400;
/// The longest a single round trip may take before the measurement gives up.
const STALL: Duration = Duration::from_secs(2);

/// Measures on the first two CPUs this thread may use (the same-CPU figures on the first);
/// `idle_rounds` round trips after `idle` each. Takes about `2 * idle_rounds * idle`.
pub fn measure(idle: Duration, idle_rounds: usize) -> Result<WakeCost, String> {
    let cpus = crate::sys::allowed_cpus()?;
    let (&a, &b) = match cpus.as_slice() {
        [a, b, ..] => (a, b),
        _ => return Err(format!("needs two CPUs, this process may use {cpus:?}")),
    };
    let idle_rounds = idle_rounds.max(1);
    Ok(WakeCost {
        cross_busy_us: round_trips(a, b, BUSY_ROUNDS, Duration::ZERO)?,
        cross_idle_us: round_trips(a, b, idle_rounds, idle)?,
        same_busy_us: round_trips(a, a, BUSY_ROUNDS, Duration::ZERO)?,
        same_idle_us: round_trips(a, a, idle_rounds, idle)?,
        idle,
    })
}

/// The median round trip in µs between a thread on CPU `a` and an echoing thread on CPU `b`,
/// sleeping `gap` before each. Both are threads of their own, so the caller's affinity stays.
fn round_trips(a: usize, b: usize, rounds: usize, gap: Duration) -> Result<f64, String> {
    let (mut ping, mut echo) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    for s in [&ping, &echo] {
        s.set_read_timeout(Some(STALL))
            .map_err(|e| format!("socket timeout: {e}"))?;
    }
    let echoer = thread::Builder::new()
        .name("wake-echo".into())
        .spawn(move || -> Result<(), String> {
            pin_thread(b)?;
            let mut byte = [0u8; 1];
            loop {
                match echo.read(&mut byte) {
                    Ok(0) => return Ok(()),
                    Ok(_) => echo
                        .write_all(&byte)
                        .map_err(|e| format!("echo write: {e}"))?,
                    Err(e) => return Err(format!("echo read: {e}")),
                }
            }
        })
        .map_err(|e| format!("spawn: {e}"))?;
    let pinger = thread::Builder::new()
        .name("wake-ping".into())
        .spawn(move || -> Result<Vec<f64>, String> {
            pin_thread(a)?;
            let mut rtts = Vec::with_capacity(rounds);
            let mut byte = [1u8; 1];
            for _ in 0..rounds {
                if !gap.is_zero() {
                    thread::sleep(gap);
                }
                let t = Instant::now();
                ping.write_all(&byte)
                    .and_then(|()| ping.read_exact(&mut byte))
                    .map_err(|e| format!("round trip: {e}"))?;
                rtts.push(t.elapsed().as_secs_f64() * 1e6);
            }
            // Dropping `ping` ends the echoer.
            Ok(rtts)
        })
        .map_err(|e| format!("spawn: {e}"))?;
    let rtts = pinger.join().map_err(|_| "the pinging thread panicked")?;
    let echoed = echoer.join().map_err(|_| "the echoing thread panicked")?;
    // The echoer's error first: it is the cause when both failed.
    echoed?;
    let rtts = rtts?;
    crate::bench::median(&rtts).ok_or_else(|| "no round trips".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_on_one_cpu_and_two_are_measured() {
        let cpus = crate::sys::allowed_cpus().unwrap();
        let a = cpus[0];
        let b = *cpus.get(1).unwrap_or(&a);
        for (x, y) in [(a, a), (a, b)] {
            let us = round_trips(x, y, 20, Duration::ZERO).unwrap();
            // A round trip is two system calls and two wake-ups: more than nothing, and far
            // below the stall limit on any machine the tests run on.
            assert!(us > 0.0 && us < 1e6, "{us} µs between CPUs {x} and {y}");
        }
    }

    #[test]
    fn a_cpu_this_process_may_not_use_is_an_error() {
        let a = crate::sys::allowed_cpus().unwrap()[0];
        let none = nix::sched::CpuSet::count() - 1;
        let err = round_trips(a, none, 1, Duration::ZERO).unwrap_err();
        assert!(err.contains("sched_setaffinity"), "{err}");
    }
}
