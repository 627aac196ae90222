//! The files a run leaves: latest.{json,txt,png}, and runs/DATE.{json,txt} of a full run.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::run::have_tool;
use super::{BenchError, Report};
use crate::process::{self, RunError};

/// Files written by [`write_outputs`].
#[derive(Debug, Clone, Default)]
pub struct Written {
    pub files: Vec<PathBuf>,
    /// Why there is no PNG, if there is none.
    pub png_skipped: Option<String>,
}

/// Writes latest.json, latest.txt and (with gnuplot) latest.png into `dir`, and keeps the run
/// as `runs/DATE.{json,txt}` there too, for `vswitch-lab bench-summary` (full runs only: a
/// quick one is no measurement to keep).
pub fn write_outputs(report: &Report, dir: &Path) -> Result<Written, BenchError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BenchError::Io { path, source }
    };
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut w = Written::default();
    let json = serde_json::to_string_pretty(&report.to_json()).unwrap_or_default() + "\n";
    let table = report.to_table();
    let mut put = |path: PathBuf, text: &str| -> Result<(), BenchError> {
        fs::write(&path, text).map_err(io_err(&path))?;
        w.files.push(path);
        Ok(())
    };
    put(dir.join("latest.json"), &json)?;
    put(dir.join("latest.txt"), &table)?;
    if !report.quick {
        let runs = dir.join("runs");
        fs::create_dir_all(&runs).map_err(io_err(&runs))?;
        let stem = report.date.replace(':', "");
        put(runs.join(format!("{stem}.json")), &json)?;
        put(runs.join(format!("{stem}.txt")), &table)?;
    }

    let png = dir.join("latest.png");
    match chart(report, &png)? {
        None => w.files.push(png),
        Some(why) => w.png_skipped = Some(why),
    }
    Ok(w)
}

/// Draws latest.png with gnuplot; why there is none, if there is none.
fn chart(report: &Report, png: &Path) -> Result<Option<String>, BenchError> {
    if !have_tool("gnuplot") {
        return Ok(Some(
            "gnuplot is not installed (Debian package gnuplot-nox)".into(),
        ));
    }
    let script = report.gnuplot_script(png);
    let run = process::run_bounded(
        &mut Command::new("gnuplot"),
        Some(script.as_bytes()),
        Duration::from_secs(30),
        None,
    );
    Ok(match run {
        Ok(out) if out.status.success() && png.is_file() => None,
        Ok(out) => Some(format!(
            "gnuplot failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(RunError::Spawn { source, .. }) => {
            return Err(BenchError::Io {
                path: "gnuplot".into(),
                source,
            })
        }
        Err(_) => Some("gnuplot timed out".into()),
    })
}
