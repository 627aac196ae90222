//! The node's kernel settings that paths through the switch rely on.
//!
//! The switch itself needs none: it moves frames between TAPs and a UDP socket. But three paths
//! pass through the node's own IP stack, and each needs a setting a fresh host may not have:
//! - a pod's packet to another node's address (a NodePort or host-network server there, the API
//!   server) or to anywhere outside the cluster leaves the switch on the host port and is
//!   *forwarded* by the node to its underlay interface: `net.ipv4.ip_forward` and the host
//!   port's `forwarding`;
//! - the same packet arrives at the other node on its underlay interface, while that node's
//!   route back to the pod is through its host port: strict reverse-path filtering
//!   (`rp_filter = 1`) on the underlay interface drops it.
//!
//! A Kubernetes node has them (kubeadm's preflight demands `ip_forward`, and the distributions'
//! defaults are loose or off for `rp_filter`); a bare host or a fresh network namespace may not:
//! new namespaces copy the initial namespace's IPv4 settings. So vswitchd checks them at start
//! and while it runs, and says what breaks ([`check`]); the DaemonSet's privileged init step and
//! the lab set them ([`apply`]), logging each change.
//!
//! Everything here reads and writes files under a `/proc/sys` root given by the caller, so the
//! tests run against a directory.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the running kernel's settings are.
pub const PROC_SYS: &str = "/proc/sys";

/// One setting found wrong, and what that breaks. Shown by `vswitchctl status`, `/readyz` and
/// `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeWarning {
    /// The sysctl's name, e.g. `net.ipv4.ip_forward`.
    pub setting: String,
    /// Its value now (`missing` when the file cannot be read).
    pub value: String,
    /// The value the paths need.
    pub want: String,
    /// What does not work while it stays so.
    pub breaks: String,
}

impl std::fmt::Display for NodeWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} is {} (want {}): {}",
            self.setting, self.value, self.want, self.breaks
        )
    }
}

/// What a setting must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// Exactly this value.
    Is(&'static str),
    /// Reverse-path filtering not strict: the kernel takes the larger of `conf.all` and the
    /// device's value, so both count; loose (2) is what [`apply`] sets.
    NotStrict,
}

const BREAKS_FORWARD: &str = "pods cannot reach other nodes' own addresses (NodePorts and \
    host-network servers there, the API server) nor anything outside the cluster, because the \
    node does not forward their packets";
const BREAKS_RP_FILTER: &str = "packets from other nodes' pods to this node's own addresses \
    (NodePorts, host-network servers) are dropped: they arrive on the underlay interface while \
    the route back to their pod is through the host port";

/// One setting a path needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Requirement {
    key: String,
    want: Want,
    breaks: &'static str,
}

/// The settings of one node that vswitch's paths need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSettings {
    root: PathBuf,
    host_if: Option<String>,
    underlay_if: Option<String>,
}

/// A setting [`apply`] changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub setting: String,
    pub was: String,
    pub now: String,
}

impl std::fmt::Display for Applied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "set {} = {} (was {})", self.setting, self.now, self.was)
    }
}

/// [`NodeSettings::apply`] could not write a setting.
#[derive(Debug, thiserror::Error)]
#[error("cannot set {setting} = {value} ({path}): {source}; {breaks}")]
pub struct ApplyError {
    pub setting: String,
    pub value: String,
    pub path: PathBuf,
    pub breaks: &'static str,
    pub source: io::Error,
}

impl NodeSettings {
    /// The settings under the running kernel's `/proc/sys`, for a node whose host port is
    /// `host_if` (none: the host port is off, and pods do not reach the node's stack at all) and
    /// whose underlay is `underlay_if` (none: not known, or no overlay).
    pub fn new(host_if: Option<&str>, underlay_if: Option<&str>) -> NodeSettings {
        NodeSettings::under(Path::new(PROC_SYS), host_if, underlay_if)
    }

    /// As [`NodeSettings::new`], under another root (tests).
    pub fn under(root: &Path, host_if: Option<&str>, underlay_if: Option<&str>) -> NodeSettings {
        NodeSettings {
            root: root.to_path_buf(),
            host_if: host_if.map(str::to_string),
            underlay_if: underlay_if.map(str::to_string),
        }
    }

    fn requirements(&self) -> Vec<Requirement> {
        let mut reqs = Vec::new();
        if let Some(host) = &self.host_if {
            reqs.push(Requirement {
                key: "net.ipv4.ip_forward".into(),
                want: Want::Is("1"),
                breaks: BREAKS_FORWARD,
            });
            // `ip_forward` sets every device's `forwarding`, but a device's own can be turned
            // off after; the input device's is the one the kernel asks.
            reqs.push(Requirement {
                key: format!("net.ipv4.conf.{host}.forwarding"),
                want: Want::Is("1"),
                breaks: BREAKS_FORWARD,
            });
            if let Some(ul) = &self.underlay_if {
                for dev in ["all", ul.as_str()] {
                    reqs.push(Requirement {
                        key: format!("net.ipv4.conf.{dev}.rp_filter"),
                        want: Want::NotStrict,
                        breaks: BREAKS_RP_FILTER,
                    });
                }
            }
        }
        reqs
    }

    fn path(&self, key: &str) -> PathBuf {
        // Device names may hold dots (eth0.100); sysctl(8) writes those as slashes in the key.
        // Keys here are built from known parts, so only the separators between them are dots:
        // net.ipv4.conf.<dev>.<name>.
        let parts: Vec<&str> = key.splitn(4, '.').collect();
        let mut p = self.root.clone();
        match parts.as_slice() {
            ["net", "ipv4", "conf", rest] => {
                let (dev, name) = rest.rsplit_once('.').unwrap_or((rest, ""));
                p.extend(["net", "ipv4", "conf", dev, name]);
            }
            _ => p.extend(key.split('.')),
        }
        p
    }

    fn read(&self, key: &str) -> Option<String> {
        fs::read_to_string(self.path(key))
            .ok()
            .map(|s| s.trim().to_string())
    }

    /// The settings that are not as the paths need them, each with what it breaks. A device
    /// that does not exist (yet) is not reported.
    pub fn check(&self) -> Vec<NodeWarning> {
        let reqs = self.requirements();
        let mut out = Vec::new();
        for r in &reqs {
            let Some(value) = self.read(&r.key) else {
                // The host port's or underlay's settings exist only while the device does;
                // ip_forward always exists.
                if r.key == "net.ipv4.ip_forward" {
                    out.push(warning(r, "missing"));
                }
                continue;
            };
            let ok = match r.want {
                Want::Is(v) => value == v,
                Want::NotStrict => value != "1",
            };
            // A device's forwarding follows ip_forward: name only the cause.
            let follows = r.key.ends_with(".forwarding")
                && out.iter().any(|w| w.setting == "net.ipv4.ip_forward");
            if !ok && !follows {
                out.push(warning(r, &value));
            }
        }
        out
    }

    /// Sets what [`check`](Self::check) would report (and, for reverse-path filtering,
    /// `conf.default` too, so a device made later is loose), and returns what it changed.
    /// Stops at the first setting it cannot write.
    pub fn apply(&self) -> Result<Vec<Applied>, ApplyError> {
        let mut reqs = self.requirements();
        if self.host_if.is_some() {
            // conf.default too, so that a device made later (an underlay not known yet) is
            // loose; conf.all and the underlay's may already be in the list.
            for dev in ["all", "default"] {
                reqs.push(Requirement {
                    key: format!("net.ipv4.conf.{dev}.rp_filter"),
                    want: Want::NotStrict,
                    breaks: BREAKS_RP_FILTER,
                });
            }
        }
        let mut done: Vec<Applied> = Vec::new();
        for r in reqs {
            let Some(was) = self.read(&r.key) else {
                continue;
            };
            let now = match r.want {
                Want::Is(v) if was != v => v,
                Want::NotStrict if was == "1" => "2",
                _ => continue,
            };
            if done.iter().any(|d| d.setting == r.key) {
                continue;
            }
            let path = self.path(&r.key);
            fs::write(&path, format!("{now}\n")).map_err(|source| ApplyError {
                setting: r.key.clone(),
                value: now.to_string(),
                path: path.clone(),
                breaks: r.breaks,
                source,
            })?;
            done.push(Applied {
                setting: r.key,
                was,
                now: now.to_string(),
            });
        }
        Ok(done)
    }
}

/// The interface that holds `ip` in this network namespace (the underlay, found from the
/// node's address), if any.
pub fn interface_with_address(ip: std::net::IpAddr) -> Option<String> {
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    for a in addrs {
        let Some(sa) = a.address else { continue };
        let found = match ip {
            std::net::IpAddr::V4(v4) => sa.as_sockaddr_in().is_some_and(|s| s.ip() == v4),
            std::net::IpAddr::V6(v6) => sa.as_sockaddr_in6().is_some_and(|s| s.ip() == v6),
        };
        if found {
            return Some(a.interface_name);
        }
    }
    None
}

fn warning(r: &Requirement, value: &str) -> NodeWarning {
    NodeWarning {
        setting: r.key.clone(),
        value: value.to_string(),
        want: match r.want {
            Want::Is(v) => v.to_string(),
            Want::NotStrict => "0 or 2".to_string(),
        },
        breaks: r.breaks.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake /proc/sys with the given settings.
    struct Root(PathBuf);

    impl Root {
        fn new(settings: &[(&str, &str)]) -> Root {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "conf-sysctl-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let root = Root(dir);
            let s = NodeSettings::under(&root.0, None, None);
            for (k, v) in settings {
                let p = s.path(k);
                fs::create_dir_all(p.parent().unwrap()).unwrap();
                fs::write(p, format!("{v}\n")).unwrap();
            }
            root
        }
        fn settings(&self, host: Option<&str>, ul: Option<&str>) -> NodeSettings {
            NodeSettings::under(&self.0, host, ul)
        }
        fn get(&self, key: &str) -> String {
            self.settings(None, None).read(key).unwrap()
        }
    }

    impl Drop for Root {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const FRESH_HOST: &[(&str, &str)] = &[
        ("net.ipv4.ip_forward", "0"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
        ("net.ipv4.conf.vsw0.forwarding", "0"),
        ("net.ipv4.conf.vsw0.rp_filter", "0"),
        ("net.ipv4.conf.ul0.rp_filter", "0"),
    ];

    #[test]
    fn a_fresh_host_lacks_forwarding_and_says_what_breaks() {
        let root = Root::new(FRESH_HOST);
        let w = root.settings(Some("vsw0"), Some("ul0")).check();
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].setting, "net.ipv4.ip_forward");
        assert_eq!(w[0].value, "0");
        assert_eq!(w[0].want, "1");
        assert!(w[0].breaks.contains("outside the cluster"), "{}", w[0]);
        assert!(w[0]
            .to_string()
            .starts_with("net.ipv4.ip_forward is 0 (want 1): "));
    }

    #[test]
    fn apply_sets_what_check_reports_and_check_is_then_clean() {
        let root = Root::new(FRESH_HOST);
        let s = root.settings(Some("vsw0"), Some("ul0"));
        let done = s.apply().unwrap();
        let names: Vec<&str> = done.iter().map(|d| d.setting.as_str()).collect();
        assert_eq!(
            names,
            ["net.ipv4.ip_forward", "net.ipv4.conf.vsw0.forwarding"]
        );
        assert_eq!(done[0].to_string(), "set net.ipv4.ip_forward = 1 (was 0)");
        assert_eq!(s.check(), Vec::new());
        assert_eq!(
            s.apply().unwrap(),
            Vec::new(),
            "a second apply changes nothing"
        );
    }

    #[test]
    fn strict_reverse_path_filtering_on_the_underlay_is_reported_and_made_loose() {
        let mut settings = FRESH_HOST.to_vec();
        settings.retain(|(k, _)| !k.contains("rp_filter"));
        settings.extend([
            ("net.ipv4.conf.all.rp_filter", "1"),
            ("net.ipv4.conf.default.rp_filter", "1"),
            ("net.ipv4.conf.ul0.rp_filter", "1"),
        ]);
        let root = Root::new(&settings);
        let s = root.settings(Some("vsw0"), Some("ul0"));
        let w: Vec<String> = s.check().into_iter().map(|w| w.setting).collect();
        assert_eq!(
            w,
            [
                "net.ipv4.ip_forward",
                "net.ipv4.conf.all.rp_filter",
                "net.ipv4.conf.ul0.rp_filter"
            ]
        );
        s.apply().unwrap();
        assert_eq!(s.check(), Vec::new());
        assert_eq!(root.get("net.ipv4.conf.ul0.rp_filter"), "2");
        assert_eq!(root.get("net.ipv4.conf.default.rp_filter"), "2");
        // Loose filtering (2) is left as it is.
        assert_eq!(s.apply().unwrap(), Vec::new());
    }

    #[test]
    fn a_device_turned_off_after_ip_forward_is_named_and_one_cause_is_named_once() {
        let mut settings = FRESH_HOST.to_vec();
        settings[0] = ("net.ipv4.ip_forward", "1");
        let root = Root::new(&settings);
        let w = root.settings(Some("vsw0"), Some("ul0")).check();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].setting, "net.ipv4.conf.vsw0.forwarding");
        // With ip_forward off too, only ip_forward is named.
        let root = Root::new(FRESH_HOST);
        let w = root.settings(Some("vsw0"), None).check();
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn devices_not_there_yet_are_not_reported_and_without_a_host_port_nothing_is_needed() {
        let root = Root::new(&[("net.ipv4.ip_forward", "0")]);
        let w = root.settings(Some("vsw0"), Some("eth0")).check();
        assert_eq!(w.len(), 1);
        assert_eq!(root.settings(None, Some("eth0")).check(), Vec::new());
        // ip_forward itself unreadable: said so.
        let root = Root::new(&[]);
        let w = root.settings(Some("vsw0"), None).check();
        assert_eq!(w[0].value, "missing");
    }

    #[test]
    fn the_loopback_address_is_found_on_lo() {
        assert_eq!(
            interface_with_address("127.0.0.1".parse().unwrap()).as_deref(),
            Some("lo")
        );
        assert_eq!(interface_with_address("192.0.2.77".parse().unwrap()), None);
    }

    #[test]
    fn devices_with_dots_in_their_names_map_to_their_directory() {
        let root = Root::new(&[]);
        let s = root.settings(None, None);
        assert_eq!(
            s.path("net.ipv4.conf.eth0.100.rp_filter"),
            root.0.join("net/ipv4/conf/eth0.100/rp_filter")
        );
        assert_eq!(
            s.path("net.ipv4.ip_forward"),
            root.0.join("net/ipv4/ip_forward")
        );
    }

    #[test]
    fn a_setting_that_cannot_be_written_names_itself_and_what_breaks() {
        let root = Root::new(FRESH_HOST);
        let s = root.settings(Some("vsw0"), None);
        // A file that reads but takes no write, even from root.
        let ip = s.path("net.ipv4.ip_forward");
        fs::remove_file(&ip).unwrap();
        std::os::unix::fs::symlink("/proc/version", &ip).unwrap();
        let e = s.apply().unwrap_err();
        assert_eq!(e.setting, "net.ipv4.ip_forward");
        let text = e.to_string();
        assert!(
            text.starts_with("cannot set net.ipv4.ip_forward = 1 ("),
            "{text}"
        );
        assert!(text.contains("outside the cluster"), "{text}");
    }
}
