//! Atomic file replacement: write a temporary file in the destination's directory, flush it to
//! disk, set its mode, and rename it over the destination.
//!
//! The temporary name starts with a dot and ends in `.tmp`, so neither libcni (which loads
//! `*.conf`, `*.conflist`, `*.json`) nor a runtime looking up plugin `vswitch` ever picks it up.
//! rename(2) within one directory is atomic: readers see the old file or the new one, and a
//! process still executing the old plugin keeps its inode.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Replaces `dest` with `bytes` (mode `mode`), creating its directory if needed.
pub fn write_atomic(dest: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = dest.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} has no file name", dest.display()),
        )
    })?;
    fs::create_dir_all(&dir).map_err(|e| with_path(e, "cannot create directory", &dir))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = write_then_rename(&tmp, dest, bytes, mode);
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    // Make the rename itself durable; a failure here does not undo the replacement.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn write_then_rename(tmp: &Path, dest: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(tmp)
        .map_err(|e| with_path(e, "cannot create", tmp))?;
    f.write_all(bytes)
        .and_then(|()| f.set_permissions(fs::Permissions::from_mode(mode)))
        .and_then(|()| f.sync_all())
        .map_err(|e| with_path(e, "cannot write", tmp))?;
    drop(f);
    fs::rename(tmp, dest).map_err(|e| with_path(e, "cannot rename into place", dest))
}

fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}
