//! The report as a gnuplot script: one bar chart per metric that has a value.

use std::fmt::Write as _;
use std::path::Path;

use super::{Cell, Kind, Metric, Report};

impl Report {
    /// A gnuplot script drawing one bar chart per metric that has a value, into `png`.
    pub fn gnuplot_script(&self, png: &Path) -> String {
        let panels: Vec<Metric> = Metric::ALL
            .into_iter()
            .filter(|&m| Kind::ALL.iter().any(|&k| self.value(m, k).is_some()))
            .collect();
        let cols = 3;
        let rows = panels.len().div_ceil(cols).max(1);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "set terminal pngcairo size 1500,{} font 'sans,10'",
            rows * 330 + 60
        );
        let _ = writeln!(s, "set output '{}'", gp_escape(&png.display().to_string()));
        s.push_str(
            "set style fill solid 0.85 border -1\nset boxwidth 0.6\nset grid ytics\n\
             set linetype 1 lc rgb '#d1495b'\nset linetype 2 lc rgb '#00798c'\n\
             set linetype 3 lc rgb '#8d6a9f'\nset linetype 4 lc rgb '#edae49'\n\
             set linetype 5 lc rgb '#66a182'\nunset key\n",
        );
        let _ = writeln!(s, "set xrange [-0.6:{}.6]", Kind::ALL.len() - 1);
        for (i, &m) in panels.iter().enumerate() {
            let _ = writeln!(s, "$d{i} << EOD");
            // x, name, value, colour, label; a datapath without a value gets an empty bar
            // labelled with why.
            for (j, &k) in Kind::ALL.iter().enumerate() {
                let (v, label) = match self.cell(m, k) {
                    Cell::Value(v) => (v, m.format(v)),
                    Cell::NotApplicable(_) => (0.0, "n/a".into()),
                    Cell::Error(_) => (0.0, "error".into()),
                    Cell::NotRun => (0.0, "not run".into()),
                };
                let _ = writeln!(s, "{j} \"{}\" {v} {} \"{label}\"", k.name(), j + 1);
            }
            s.push_str("EOD\n");
        }
        let _ = writeln!(
            s,
            "set multiplot layout {rows},{cols} title \"vswitch-lab bench {}: medians of {} rep{} ({})\" font 'sans,13'",
            gp_escape(&self.date),
            self.reps,
            if self.reps == 1 { "" } else { "s" },
            if self.quick { "quick" } else { "full" },
        );
        for (i, &m) in panels.iter().enumerate() {
            let max = Kind::ALL
                .iter()
                .filter_map(|&k| self.value(m, k))
                .fold(0.0f64, f64::max);
            let top = if max > 0.0 { max * 1.25 } else { 1.0 };
            let _ = writeln!(
                s,
                "set title \"{} ({}, {} is better)\"\nset yrange [0:{top}]",
                gp_escape(m.label()),
                gp_escape(m.unit()),
                if m.higher_is_better() {
                    "higher"
                } else {
                    "lower"
                }
            );
            let _ = writeln!(
                s,
                "plot $d{i} using 1:3:4:xtic(2) with boxes lc variable, \
                 '' using 1:3:5 with labels offset 0,0.8"
            );
        }
        s.push_str("unset multiplot\n");
        s
    }
}

pub(super) fn gp_escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\'', "")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::tests::sample_report;

    #[test]
    fn gnuplot_script_draws_the_metrics_that_have_values() {
        let s = sample_report().gnuplot_script(Path::new("/tmp/x/latest.png"));
        assert!(s.contains("set output '/tmp/x/latest.png'"));
        // TcpCross1, TcpCross4, TcpSame, Udp64Loss, PingRtt and the two policy ratios have
        // values: seven panels on a 3x3 grid.
        assert_eq!(s.matches("\nplot ").count(), 7, "{s}");
        assert!(s.contains("set multiplot layout 3,3"), "{s}");
        assert!(s.contains("0 \"vswitch\" 11 1 \"11.00\""), "{s}");
        assert!(s.contains("1 \"vswitch-2w\" 12 2 \"12.00\""), "{s}");
        assert!(s.contains("2 \"vswitch-pin\" 13.05 3 \"13.05\""), "{s}");
        assert!(s.contains("4 \"ovs\" 1.1 5 \"1.10\""), "{s}");
        // same-node TCP was not measured for ovs: an empty bar that says so.
        assert!(s.contains("4 \"ovs\" 0 5 \"error\""), "{s}");
        assert!(!s.contains("ClusterIP"), "{s}");
    }
}
