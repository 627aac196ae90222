//! CPU time: the machine's (from /proc/stat) and the datapath processes' (/proc/PID/stat), for
//! the CPU-per-GB rows; and the processor's name for the report's header.

use std::fs;

use crate::LabError;

/// The machine's CPU time from the first line of /proc/stat, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTimes {
    /// user + nice + system + irq + softirq + steal (guest time is inside user already).
    pub busy: u64,
    /// busy + idle + iowait.
    pub total: u64,
}

pub fn parse_proc_stat(text: &str) -> Result<CpuTimes, LabError> {
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| LabError::BadOutput("/proc/stat has no cpu line".into()))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| {
            x.parse::<u64>()
                .map_err(|e| LabError::BadOutput(format!("/proc/stat: {x:?}: {e}")))
        })
        .collect::<Result<_, _>>()?;
    if f.len() < 8 {
        return Err(LabError::BadOutput(format!(
            "/proc/stat cpu line has {} fields",
            f.len()
        )));
    }
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    let busy = f[0] + f[1] + f[2] + f[5] + f[6] + f[7];
    Ok(CpuTimes {
        busy,
        total: busy + f[3] + f[4],
    })
}

/// Busy CPU seconds between two snapshots.
pub fn busy_seconds(before: CpuTimes, after: CpuTimes, ticks_per_second: u64) -> f64 {
    after.busy.saturating_sub(before.busy) as f64 / ticks_per_second.max(1) as f64
}

/// utime + stime (clock ticks, all threads) from /proc/PID/stat.
pub fn parse_pid_stat(text: &str) -> Result<u64, LabError> {
    // The command name is in parentheses and may hold spaces: split after the last ')'.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| LabError::BadOutput("no ')' in /proc/PID/stat".into()))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let get = |i: usize| -> Result<u64, LabError> {
        f.get(i)
            .and_then(|x| x.parse().ok())
            .ok_or_else(|| LabError::BadOutput(format!("/proc/PID/stat field {} missing", i + 3)))
    };
    Ok(get(11)? + get(12)?)
}

pub(super) fn read_cpu() -> Result<CpuTimes, LabError> {
    let text = fs::read_to_string("/proc/stat").map_err(|e| LabError::io("/proc/stat", e))?;
    parse_proc_stat(&text)
}

/// utime + stime of all `pids` (clock ticks); None if one of them is gone.
pub(crate) fn read_pids_cpu(pids: &[u32]) -> Option<u64> {
    pids.iter()
        .map(|p| {
            fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| parse_pid_stat(&s).ok())
        })
        .sum()
}

pub(crate) fn ticks_per_second() -> u64 {
    use nix::unistd::{sysconf, SysconfVar};
    match sysconf(SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as u64,
        _ => 100,
    }
}

/// The processor's name from /proc/cpuinfo (`model name`), or empty.
pub(crate) fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_deltas_count_busy_time() {
        let a = parse_proc_stat(
            "cpu  100 5 50 1000 10 1 4 0 0 0\ncpu0 50 2 25 500 5 0 2 0 0 0\nintr 1\n",
        )
        .unwrap();
        assert_eq!(
            a,
            CpuTimes {
                busy: 160,
                total: 1170
            }
        );
        let b = parse_proc_stat("cpu  250 5 120 1100 10 1 24 0 0 0\n").unwrap();
        // 150 user + 70 system + 20 softirq ticks = 2.4 s at 100 Hz.
        assert!((busy_seconds(a, b, 100) - 2.4).abs() < 1e-12);
        assert_eq!(busy_seconds(b, a, 100), 0.0);
        assert!(parse_proc_stat("intr 1\n").is_err());
        assert!(parse_proc_stat("cpu  1 2 3\n").is_err());
    }

    #[test]
    fn pid_stat_sums_user_and_system_time() {
        let s = "4242 (ovs-vswitchd (x)) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                 123 45 0 0 20 0 5 0 100 1000000 500 18446744073709551615\n";
        assert_eq!(parse_pid_stat(s).unwrap(), 168);
        assert!(parse_pid_stat("4242 (x) S 1").is_err());
    }
}
