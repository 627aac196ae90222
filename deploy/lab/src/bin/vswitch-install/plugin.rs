//! Installing the CNI plugin binary into the host's CNI bin dir.
//!
//! The plugin is copied whole on every start (it is small, and a DaemonSet upgrade must replace
//! an older one); the rename keeps a runtime that is executing the old plugin unharmed.

use std::io;
use std::path::{Path, PathBuf};

use vswitch_lab::fsutil;

/// The plugin's file name, which is also its CNI `type`.
const PLUGIN: &str = conf::netconf::PLUGIN_TYPE;

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("cannot find this program's directory to locate {PLUGIN}: {0}; pass --src")]
    SelfPath(io::Error),
    #[error("cannot read the plugin {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} is empty: not a plugin binary")]
    Empty { path: PathBuf },
    #[error("cannot install the plugin into {dir}: {source}")]
    Write { dir: PathBuf, source: io::Error },
}

/// What was installed.
pub struct Installed {
    pub src: PathBuf,
    pub dest: PathBuf,
    pub bytes: usize,
}

/// Copies `src` (default: `vswitch` next to this program) to `dest_dir/vswitch`, mode 0755.
pub fn install(src: Option<&Path>, dest_dir: &Path) -> Result<Installed, PluginError> {
    let src = match src {
        Some(s) => s.to_path_buf(),
        None => {
            let exe = std::env::current_exe().map_err(PluginError::SelfPath)?;
            exe.with_file_name(PLUGIN)
        }
    };
    let bytes = std::fs::read(&src).map_err(|source| PluginError::Read {
        path: src.clone(),
        source,
    })?;
    if bytes.is_empty() {
        return Err(PluginError::Empty { path: src });
    }
    let dest = dest_dir.join(PLUGIN);
    fsutil::write_atomic(&dest, &bytes, 0o755).map_err(|source| PluginError::Write {
        dir: dest_dir.to_path_buf(),
        source,
    })?;
    Ok(Installed {
        src,
        dest,
        bytes: bytes.len(),
    })
}
