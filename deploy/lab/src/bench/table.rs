//! The report as printed: the header, a row per metric with the ratio columns, the targets, the
//! problems and the notes (also latest.txt and runs/DATE.txt).

use std::fmt::Write as _;

use super::report::wake_text;
use super::{Cell, Kind, Metric, Report, NOTES};

impl Report {
    pub(super) fn cell_text(&self, m: Metric, k: Kind) -> String {
        match self.cell(m, k) {
            Cell::Value(v) => m.format(v),
            Cell::NotApplicable(_) => "n/a".into(),
            Cell::Error(_) => "error".into(),
            Cell::NotRun => "-".into(),
        }
    }

    pub(super) fn ratio_text(&self, m: Metric, who: Kind, k: Kind) -> String {
        if !m.has_ratio() {
            return "".into();
        }
        match self.ratio_of(m, who, k) {
            Some(r) => format!("{r:.2}x"),
            None => "-".into(),
        }
    }

    /// The table, the targets and the notes, as printed.
    pub fn to_table(&self) -> String {
        let mut rows: Vec<Vec<String>> = vec![vec![
            "metric".into(),
            "unit".into(),
            "vswitch".into(),
            "vswitch-2w".into(),
            "vswitch-pin".into(),
            "kernel".into(),
            "ovs".into(),
            "vswitch/kernel".into(),
            "vswitch/ovs".into(),
            "pin/kernel".into(),
        ]];
        for m in Metric::ALL {
            rows.push(vec![
                m.label().into(),
                m.unit().into(),
                self.cell_text(m, Kind::Vswitch),
                self.cell_text(m, Kind::Vswitch2),
                self.cell_text(m, Kind::VswitchPin),
                self.cell_text(m, Kind::Kernel),
                self.cell_text(m, Kind::Ovs),
                self.ratio_text(m, Kind::Vswitch, Kind::Kernel),
                self.ratio_text(m, Kind::Vswitch, Kind::Ovs),
                self.ratio_text(m, Kind::VswitchPin, Kind::Kernel),
            ]);
        }
        let mut w = [0usize; 10];
        for r in &rows {
            for (i, c) in r.iter().enumerate() {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        let _ = writeln!(
            out,
            "vswitch-lab bench {} ({} rep{}, {}), {}, kernel {}, {} CPUs, pods' TCP {}{}",
            self.date,
            self.reps,
            if self.reps == 1 { "" } else { "s" },
            if self.quick { "quick" } else { "full" },
            if self.cpu_model.is_empty() {
                "CPU model unknown"
            } else {
                &self.cpu_model
            },
            self.kernel,
            self.cpus,
            if self.tcp_cc.is_empty() {
                "?"
            } else {
                &self.tcp_cc
            },
            self.commit
                .as_ref()
                .map(|c| format!(", commit {c}"))
                .unwrap_or_default()
        );
        if let Some(w) = &self.wake {
            let _ = writeln!(out, "{}", wake_text(w));
        }
        out.push('\n');
        for r in &rows {
            let mut line = format!("{:<w0$}  {:<w1$}", r[0], r[1], w0 = w[0], w1 = w[1]);
            for (c, width) in r.iter().zip(w).skip(2) {
                let _ = write!(line, "  {c:>width$}");
            }
            let _ = writeln!(out, "{line}");
        }
        out.push_str("\ntargets (issue 4):\n");
        for t in self.targets() {
            let _ = writeln!(out, "  {:<4}  {:<46}  {}", t.status, t.text, t.detail);
        }
        let problems = self.problems();
        if !problems.is_empty() {
            out.push_str("\nproblems:\n");
            for p in problems {
                let _ = writeln!(out, "  {p}");
            }
        }
        out.push_str("\nnotes:\n");
        for n in NOTES {
            let _ = writeln!(out, "  - {n}");
        }
        for (k, reason) in self.na_reasons() {
            let _ = writeln!(out, "  - n/a for {k}: {reason}");
        }
        out
    }

    /// Distinct n/a reasons, for the notes.
    pub(super) fn na_reasons(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for ((m, k), r) in &self.not_applicable {
            if self.samples.contains_key(&(*m, *k)) || !self.datapaths.contains(k) {
                continue;
            }
            let what = format!("{} ({})", m.label(), k.name());
            if let Some(e) = out.iter_mut().find(|(_, rr)| rr == r) {
                e.0.push_str(", ");
                e.0.push_str(&what);
            } else {
                out.push((what, r.clone()));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::tests::sample_report;

    #[test]
    fn table_has_a_row_per_metric_and_the_ratio_columns() {
        let r = sample_report();
        let t = r.to_table();
        let header = t.lines().find(|l| l.starts_with("metric")).unwrap();
        for c in [
            "unit",
            "vswitch",
            "vswitch-2w",
            "vswitch-pin",
            "kernel",
            "ovs",
            "vswitch/kernel",
            "vswitch/ovs",
            "pin/kernel",
        ] {
            assert!(header.contains(c), "{header}");
        }
        for m in Metric::ALL {
            assert!(t.lines().any(|l| l.starts_with(m.label())), "{m:?}\n{t}");
        }
        let row = t
            .lines()
            .find(|l| l.starts_with("cross-node TCP, 1 stream"))
            .unwrap();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells[cells.len() - 9..],
            ["Gbit/s", "11.00", "12.00", "13.05", "14.50", "1.10", "0.76x", "10.00x", "0.90x"]
        );
        let row = t
            .lines()
            .find(|l| l.starts_with("TCP request/response"))
            .unwrap();
        assert!(row.contains("error"), "{row}");
        let row = t
            .lines()
            .find(|l| l.starts_with("ClusterIP / pod IP"))
            .unwrap();
        assert!(row.contains("n/a"), "{row}");
        assert!(
            t.contains("PASS  cross-node TCP >= 0.7x the kernel path"),
            "{t}"
        );
        assert!(
            t.contains("FAIL  same-node TCP >= 0.9x the kernel path"),
            "{t}"
        );
        assert!(t.contains("/proc/stat"), "{t}");
        assert!(
            t.contains("ovs TCP request/response: rr-client: timed out"),
            "{t}"
        );
    }
}
