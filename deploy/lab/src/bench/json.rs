//! The report as latest.json (and runs/DATE.json): its keys are what `bench-summary` and the
//! README's tables read, so they do not change.

use serde_json::{json, Value};

use super::{Cell, Durations, Kind, Metric, Report, NOTES};

impl Report {
    /// The JSON document written to latest.json.
    pub fn to_json(&self) -> Value {
        let metrics: Vec<Value> = Metric::ALL
            .iter()
            .map(|&m| {
                let mut values = serde_json::Map::new();
                for k in Kind::ALL {
                    let cell = match self.cell(m, k) {
                        Cell::Value(v) => json!({
                            "median": v,
                            "samples": self.samples.get(&(m, k)).cloned().unwrap_or_default(),
                        }),
                        Cell::NotApplicable(r) => json!({ "median": null, "n/a": r }),
                        Cell::Error(e) => json!({ "median": null, "error": e }),
                        Cell::NotRun => json!({ "median": null, "not_run": true }),
                    };
                    values.insert(k.name().into(), cell);
                }
                json!({
                    "key": m.key(),
                    "label": m.label(),
                    "unit": m.unit(),
                    "better": if m.higher_is_better() { "higher" } else { "lower" },
                    "values": values,
                    "ratios": {
                        "vswitch/kernel": self.ratio(m, Kind::Kernel),
                        "vswitch/ovs": self.ratio(m, Kind::Ovs),
                        "vswitch-pin/kernel": self.ratio_of(m, Kind::VswitchPin, Kind::Kernel),
                        "vswitch-pin/ovs": self.ratio_of(m, Kind::VswitchPin, Kind::Ovs),
                    },
                })
            })
            .collect();
        let targets: Vec<Value> = self
            .targets()
            .iter()
            .map(|t| json!({ "target": t.text, "status": t.status, "detail": t.detail }))
            .collect();
        let d = self.durations.clone().unwrap_or_else(Durations::full);
        json!({
            "tool": "vswitch-lab bench",
            "date": self.date,
            "commit": self.commit,
            "host": {
                "cpu_model": self.cpu_model,
                "kernel": self.kernel,
                "cpus": self.cpus,
                "tcp_congestion_control": self.tcp_cc,
                "wakeup_round_trip_us": match &self.wake {
                    Some(Ok(w)) => json!({
                        "cross_cpu": w.cross_busy_us,
                        "cross_cpu_after_idle": w.cross_idle_us,
                        "same_cpu": w.same_busy_us,
                        "same_cpu_after_idle": w.same_idle_us,
                        "idle_seconds": w.idle.as_secs_f64(),
                    }),
                    Some(Err(e)) => json!({ "error": e }),
                    None => Value::Null,
                },
            },
            "config": {
                "reps": self.reps,
                "quick": self.quick,
                "tcp_seconds": d.tcp.as_secs_f64(),
                "udp_seconds": d.udp.as_secs_f64(),
                "rr_seconds": d.rr.as_secs_f64(),
                "ping_count": d.ping_count,
                "ping_interval_seconds": d.ping_interval.as_secs_f64(),
            },
            "datapaths": Kind::ALL.iter().map(|k| json!({
                "name": k.name(),
                "what": k.describe(),
                "measured": self.datapaths.contains(k) && !self.datapath_errors.contains_key(k),
                "error": self.datapath_errors.get(k),
            })).collect::<Vec<_>>(),
            "metrics": metrics,
            "targets": targets,
            "problems": self.problems(),
            "notes": NOTES,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::tests::sample_report;
    use std::time::Duration;

    #[test]
    fn json_has_medians_samples_ratios_and_targets() {
        let v = sample_report().to_json();
        assert_eq!(v["date"], "2026-01-02T03:04:05Z");
        assert_eq!(v["config"]["reps"], 3);
        let m = v["metrics"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["key"] == "tcp_cross_node_1")
            .unwrap();
        assert_eq!(m["unit"], "Gbit/s");
        assert_eq!(m["better"], "higher");
        assert_eq!(m["values"]["vswitch"]["median"], 11.0);
        assert_eq!(m["values"]["vswitch"]["samples"], json!([11.0, 12.0, 10.0]));
        assert_eq!(m["ratios"]["vswitch/ovs"].as_f64().unwrap(), 11.0 / 1.1);
        let m = v["metrics"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["key"] == "clusterip_vs_pod_ip")
            .unwrap();
        assert_eq!(m["values"]["vswitch"]["median"], Value::Null);
        assert!(m["values"]["vswitch"]["n/a"]
            .as_str()
            .unwrap()
            .contains("services"));
        assert_eq!(v["targets"].as_array().unwrap().len(), 11);
        assert_eq!(m["values"]["vswitch-2w"]["median"], Value::Null);
        assert_eq!(v["targets"][2]["status"], "FAIL");
        assert_eq!(v["metrics"].as_array().unwrap().len(), Metric::ALL.len());
    }

    #[test]
    fn the_wake_up_cost_is_in_the_header_and_the_json() {
        let mut r = sample_report();
        assert!(!r.to_table().contains("wake-up round trip between"));
        assert_eq!(r.to_json()["host"]["wakeup_round_trip_us"], Value::Null);
        r.wake = Some(Ok(crate::wake::WakeCost {
            cross_busy_us: 71.5,
            cross_idle_us: 187.8,
            same_busy_us: 3.0,
            same_idle_us: 32.0,
            idle: Duration::from_millis(50),
        }));
        let t = r.to_table();
        assert_eq!(
            t.lines().nth(1),
            Some(
                "wake-up round trip between two threads: 71.5 µs across CPUs (187.8 µs after 50 \
                 ms idle), 3.0 µs on one CPU (32.0 µs after idle)"
            ),
            "{t}"
        );
        let v = r.to_json();
        let w = &v["host"]["wakeup_round_trip_us"];
        assert_eq!(w["cross_cpu"], 71.5);
        assert_eq!(w["cross_cpu_after_idle"], 187.8);
        assert_eq!(w["same_cpu"], 3.0);
        assert_eq!(w["same_cpu_after_idle"], 32.0);
        assert_eq!(w["idle_seconds"], 0.05);
        r.wake = Some(Err("needs two CPUs".into()));
        assert!(r.to_table().contains("not measured (needs two CPUs)"));
        assert_eq!(
            r.to_json()["host"]["wakeup_round_trip_us"]["error"],
            "needs two CPUs"
        );
    }
}
