//! Static mode's NetworkPolicy source: a directory of manifests (`[policy] dir`), read again
//! whenever a file in it changes.
//!
//! Polling, as for the config file (see `reload`), for the same reasons (a ConfigMap volume's
//! symlink swap, an editor's rename), but every 50 ms so that a change is in force within
//! 100 ms: each look costs a `readdir` and a `stat` per file, and the files are read only when
//! one of them changed (name, size, inode or modification time). A directory that does not
//! exist (yet) holds nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::policy::manifests::Objects;

/// How often the directory is looked at.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// What identifies a file's version without reading it.
type Signature = Vec<(PathBuf, u64, u64, i64, i64)>;

/// The directory and what was last read from it.
pub struct PolicyDir {
    path: PathBuf,
    last: Option<Signature>,
    /// The problems last reported, so each is logged once.
    reported: Vec<String>,
}

impl PolicyDir {
    pub fn new(path: PathBuf) -> PolicyDir {
        PolicyDir {
            path,
            last: None,
            reported: Vec::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn signature(&self) -> Signature {
        use std::os::unix::fs::MetadataExt;
        let Ok(entries) = std::fs::read_dir(&self.path) else {
            return Vec::new();
        };
        let mut sig: Signature = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let p = e.path();
                // Follows symlinks, so a swapped ConfigMap `..data` link shows.
                let m = std::fs::metadata(&p).ok()?;
                m.is_file()
                    .then(|| (p, m.len(), m.ino(), m.mtime(), m.mtime_nsec()))
            })
            .collect();
        sig.sort();
        sig
    }

    /// Reads the directory if anything in it changed since the last look; `None` when nothing
    /// did. Blocking (reads files).
    pub fn poll(&mut self) -> Option<Objects> {
        let sig = self.signature();
        if self.last.as_ref() == Some(&sig) {
            return None;
        }
        self.last = Some(sig);
        // A directory that is not there (yet) holds no policies and no pods.
        let objects = Objects::load_dir(&self.path).unwrap_or_default();
        for p in &objects.problems {
            if !self.reported.contains(p) {
                tracing::warn!(
                    "policy manifests: {p}; the object is left out, the others stay in force"
                );
            }
        }
        self.reported = objects.problems.clone();
        Some(objects)
    }

    /// The problems of the last read (for status and metrics).
    pub fn problems(&self) -> &[String] {
        &self.reported
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_seen_and_only_changes() {
        let dir = std::env::temp_dir().join(format!("vswitch-policy-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut d = PolicyDir::new(dir.clone());
        // Missing: read once as empty, then nothing new.
        assert_eq!(d.poll().map(|o| o.policies.len()), Some(0));
        assert!(d.poll().is_none());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("p.yaml"),
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a, namespace: x}\nspec: {podSelector: {}}\n",
        )
        .unwrap();
        assert_eq!(d.poll().map(|o| o.policies.len()), Some(1));
        assert!(d.poll().is_none());
        std::fs::write(dir.join("bad.yaml"), "kind: [").unwrap();
        let o = d.poll().unwrap();
        assert_eq!(o.policies.len(), 1);
        assert_eq!(d.problems().len(), 1);
        std::fs::remove_file(dir.join("p.yaml")).unwrap();
        assert_eq!(d.poll().map(|o| o.policies.len()), Some(0));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
