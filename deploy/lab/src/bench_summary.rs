//! `vswitch-lab bench-summary`: the medians of several bench runs, each kept with its date.
//!
//! One run on this kind of machine is not a claim: the ratios move by 0.2 or more between
//! machines and over minutes on one. `vswitch-lab bench` keeps every run it makes as
//! `runs/DATE.json` beside `latest.json`; this reads such runs, takes for each metric the median
//! of the runs' values and of their ratios (with the range), and prints the Markdown table the
//! README shows, headed by the runs it came from and the machines they ran on.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::bench::{median, BenchError};

/// The datapaths in the table's order, with the column names.
const COLUMNS: [(&str, &str); 4] = [
    ("vswitch", "vswitch"),
    ("kernel", "kernel"),
    ("ovs", "OVS"),
    ("vswitch-pin", "vswitch-pin"),
];
/// The ratios shown, with the column names.
const RATIOS: [(&str, &str); 3] = [
    ("vswitch/kernel", "vswitch / kernel"),
    ("vswitch/ovs", "vswitch / OVS"),
    ("vswitch-pin/kernel", "pin / kernel"),
];

/// One run as read from its JSON.
#[derive(Debug, Clone)]
pub struct Run {
    pub path: PathBuf,
    pub json: Value,
}

impl Run {
    pub fn read(path: &Path) -> Result<Run, BenchError> {
        let text = fs::read_to_string(path).map_err(|source| BenchError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let json: Value = serde_json::from_str(&text).map_err(|e| BenchError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        if json["tool"] != "vswitch-lab bench" || !json["metrics"].is_array() {
            return Err(BenchError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "not a vswitch-lab bench report (no \"tool\" and \"metrics\")",
                ),
            });
        }
        Ok(Run {
            path: path.to_path_buf(),
            json,
        })
    }

    fn metric(&self, key: &str) -> Option<&Value> {
        self.json["metrics"]
            .as_array()?
            .iter()
            .find(|m| m["key"] == key)
    }

    /// One line on the run and its machine.
    fn describe(&self) -> String {
        let j = &self.json;
        let h = &j["host"];
        let s = |v: &Value| v.as_str().unwrap_or("?").to_string();
        let wake = h["wakeup_round_trip_us"]["cross_cpu"]
            .as_f64()
            .map_or("not measured".into(), |w| format!("{w:.0} µs"));
        format!(
            "{} (commit {}): {}, {} CPUs, kernel {}, pods' TCP {}, wake-up across CPUs {wake}, {} reps",
            s(&j["date"]),
            s(&j["commit"]),
            h["cpu_model"].as_str().unwrap_or("CPU model not recorded"),
            h["cpus"],
            s(&h["kernel"]),
            s(&h["tcp_congestion_control"]),
            j["config"]["reps"],
        )
    }
}

/// The runs in `dir` (`*.json`), oldest first (their names are their dates).
pub fn runs_in(dir: &Path) -> Result<Vec<Run>, BenchError> {
    let entries = fs::read_dir(dir).map_err(|source| BenchError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    paths.iter().map(|p| Run::read(p)).collect()
}

fn fmt_value(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// The Markdown summary of `runs`: the runs, then one row per metric.
pub fn summarize(runs: &[Run]) -> String {
    let mut out = format!(
        "Median of {} runs of `vswitch-lab bench` (each value: the median over the runs of \
         that run's median; each ratio: the median of the runs' ratios, with their range):\n\n",
        runs.len()
    );
    for r in runs {
        out.push_str(&format!("- {}\n", r.describe()));
    }
    out.push('\n');
    let mut header = String::from("| metric | unit |");
    let mut rule = String::from("|---|---|");
    for (_, name) in COLUMNS {
        header.push_str(&format!(" {name} |"));
        rule.push_str("---|");
    }
    for (_, name) in RATIOS {
        header.push_str(&format!(" {name} |"));
        rule.push_str("---|");
    }
    out.push_str(&header);
    out.push('\n');
    out.push_str(&rule);
    out.push('\n');
    // Metrics in the first run's order.
    let keys: Vec<(String, String, String)> = runs
        .first()
        .and_then(|r| r.json["metrics"].as_array())
        .map(|ms| {
            ms.iter()
                .map(|m| {
                    let s = |k: &str| m[k].as_str().unwrap_or_default().to_string();
                    (s("key"), s("label"), s("unit"))
                })
                .collect()
        })
        .unwrap_or_default();
    for (key, label, unit) in keys {
        let of = |f: &dyn Fn(&Value) -> Option<f64>| -> Vec<f64> {
            runs.iter()
                .filter_map(|r| r.metric(&key))
                .filter_map(f)
                .collect()
        };
        let mut row = format!("| {label} | {unit} |");
        for (kind, _) in COLUMNS {
            let v = median(&of(&|m| m["values"][kind]["median"].as_f64()));
            row.push_str(&format!(" {} |", v.map_or(String::new(), fmt_value)));
        }
        for (ratio, _) in RATIOS {
            let all = of(&|m| m["ratios"][ratio].as_f64());
            let cell = match median(&all) {
                None => String::new(),
                Some(m) => {
                    let lo = all.iter().copied().fold(f64::INFINITY, f64::min);
                    let hi = all.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    if all.len() > 1 {
                        format!("{m:.2}x ({lo:.2}-{hi:.2})")
                    } else {
                        format!("{m:.2}x")
                    }
                }
            };
            row.push_str(&format!(" {cell} |"));
        }
        out.push_str(&row);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(date: &str, vswitch: f64, kernel: f64) -> Run {
        Run {
            path: PathBuf::from(format!("{date}.json")),
            json: json!({
                "tool": "vswitch-lab bench",
                "date": date,
                "commit": "abc1234",
                "config": { "reps": 3 },
                "host": { "cpus": 2, "kernel": "6.18", "cpu_model": "Test CPU",
                          "tcp_congestion_control": "bbr",
                          "wakeup_round_trip_us": { "cross_cpu": 55.4 } },
                "metrics": [{
                    "key": "tcp_cross_node_1", "label": "cross-node TCP, 1 stream",
                    "unit": "Gbit/s",
                    "values": { "vswitch": { "median": vswitch }, "kernel": { "median": kernel },
                                "ovs": { "median": null, "not_run": true } },
                    "ratios": { "vswitch/kernel": vswitch / kernel, "vswitch/ovs": null }
                }]
            }),
        }
    }

    #[test]
    fn the_summary_takes_medians_over_runs_and_names_each_run_and_machine() {
        let runs = [
            run("2026-12-07T03:00:00Z", 7.0, 14.0),
            run("2026-12-07T04:00:00Z", 10.0, 14.0),
            run("2026-12-07T05:00:00Z", 12.0, 15.0),
        ];
        let s = summarize(&runs);
        assert!(s.starts_with("Median of 3 runs"), "{s}");
        assert!(
            s.contains("- 2026-12-07T04:00:00Z (commit abc1234): Test CPU, 2 CPUs, kernel 6.18"),
            "{s}"
        );
        let row = s
            .lines()
            .find(|l| l.starts_with("| cross-node TCP, 1 stream"))
            .unwrap();
        // vswitch 10.0 (median of 7, 10, 12), kernel 14.0, no OVS; ratio median 0.71 of
        // 0.50, 0.71, 0.80.
        assert_eq!(
            row,
            "| cross-node TCP, 1 stream | Gbit/s | 10.0 | 14.0 |  |  | 0.71x (0.50-0.80) |  |  |"
        );
    }

    #[test]
    fn a_file_that_is_no_bench_report_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("bench-summary-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.json");
        fs::write(&p, "{\"a\": 1}").unwrap();
        let e = Run::read(&p).unwrap_err().to_string();
        assert!(
            e.contains("x.json") && e.contains("not a vswitch-lab bench report"),
            "{e}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
