//! The files a run leaves: latest.{json,txt,png}, and runs/DATE.{json,txt} of a full run.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::exec::reader;
use super::run::have_tool;
use super::{BenchError, Report};

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
    if !have_tool("gnuplot") {
        w.png_skipped = Some("gnuplot is not installed (Debian package gnuplot-nox)".into());
        return Ok(w);
    }
    let mut child = Command::new("gnuplot")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_err(Path::new("gnuplot")))?;
    let script = report.gnuplot_script(&png);
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(script.as_bytes());
    }
    let err = reader(child.stderr.take());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let stderr = err.join().unwrap_or_default();
    match status {
        Some(s) if s.success() && png.is_file() => w.files.push(png),
        Some(s) => w.png_skipped = Some(format!("gnuplot failed ({s}): {}", stderr.trim())),
        None => w.png_skipped = Some("gnuplot timed out".into()),
    }
    Ok(w)
}
