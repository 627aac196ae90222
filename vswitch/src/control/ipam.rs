//! Address management for the node's pod CIDR.
//!
//! One lease is one file named by the address in `<state_dir>/ipam/`, created with O_EXCL and
//! holding its owner (`container_id`, `ifname`). The file system is the source of truth, so an
//! address is never handed out twice: not by two concurrent ADDs (the daemon serialises them and
//! O_EXCL would catch a second process), and not after a restart (the leases are still there).
//! Allocation continues round-robin from the last address handed out, persisted in
//! `last_reserved_ip`, so a released address is not reused at once (as host-local does).

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("no free address left in pod CIDR {0}")]
    Exhausted(Ipv4Net),
    #[error("IPAM state in {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub ip: Ipv4Addr,
    pub container_id: String,
    pub ifname: String,
}

pub struct Ipam {
    dir: PathBuf,
    net: Ipv4Net,
    gateway: Ipv4Addr,
}

impl Ipam {
    pub fn open(state_dir: &Path, net: Ipv4Net, gateway: Ipv4Addr) -> Result<Ipam, IpamError> {
        let dir = state_dir.join("ipam");
        fs::create_dir_all(&dir).map_err(|source| IpamError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(Ipam { dir, net, gateway })
    }

    fn io(&self, path: &Path) -> impl FnOnce(io::Error) -> IpamError {
        let path = path.to_owned();
        move |source| IpamError::Io { path, source }
    }

    /// The lease of this attachment, if it has one.
    pub fn find(&self, container_id: &str, ifname: &str) -> Result<Option<Lease>, IpamError> {
        Ok(self
            .leases()?
            .into_iter()
            .find(|l| l.container_id == container_id && l.ifname == ifname))
    }

    /// Allocates an address for the attachment, or returns the one it already holds.
    pub fn allocate(&self, container_id: &str, ifname: &str) -> Result<Lease, IpamError> {
        if let Some(l) = self.find(container_id, ifname)? {
            return Ok(l);
        }
        let first = u32::from(self.net.network()) + 1;
        let last = u32::from(self.net.broadcast()) - 1;
        let size = last - first + 1;
        let start = self
            .last_reserved()
            .map(|ip| u32::from(ip).wrapping_add(1))
            .filter(|ip| (first..=last).contains(ip))
            .unwrap_or(first);
        for i in 0..size {
            let ip = Ipv4Addr::from(first + (start - first + i) % size);
            if ip == self.gateway {
                continue;
            }
            let path = self.dir.join(ip.to_string());
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    let owner = format!("{container_id}\n{ifname}\n");
                    if let Err(e) = f.write_all(owner.as_bytes()).and_then(|_| f.sync_all()) {
                        let _ = fs::remove_file(&path);
                        return Err(self.io(&path)(e));
                    }
                    let last_path = self.dir.join("last_reserved_ip");
                    fs::write(&last_path, ip.to_string()).map_err(self.io(&last_path))?;
                    return Ok(Lease {
                        ip,
                        container_id: container_id.into(),
                        ifname: ifname.into(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(self.io(&path)(e)),
            }
        }
        Err(IpamError::Exhausted(self.net))
    }

    /// Releases the attachment's lease; releasing nothing is not an error.
    pub fn release(&self, container_id: &str, ifname: &str) -> Result<Option<Ipv4Addr>, IpamError> {
        match self.find(container_id, ifname)? {
            Some(l) => {
                let path = self.dir.join(l.ip.to_string());
                match fs::remove_file(&path) {
                    Ok(()) => Ok(Some(l.ip)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(self.io(&path)(e)),
                }
            }
            None => Ok(None),
        }
    }

    /// Every lease on disk.
    pub fn leases(&self) -> Result<Vec<Lease>, IpamError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(self.io(&self.dir))? {
            let entry = entry.map_err(self.io(&self.dir))?;
            let Some(ip) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            let text = match fs::read_to_string(entry.path()) {
                Ok(t) => t,
                // Released between read_dir and here.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.io(&entry.path())(e)),
            };
            let mut lines = text.lines();
            let container_id = lines.next().unwrap_or_default().to_string();
            let ifname = lines.next().unwrap_or_default().to_string();
            out.push(Lease {
                ip,
                container_id,
                ifname,
            });
        }
        out.sort_by_key(|l| l.ip);
        Ok(out)
    }

    fn last_reserved(&self) -> Option<Ipv4Addr> {
        fs::read_to_string(self.dir.join("last_reserved_ip"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vswitch-ipam-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn allocates_distinct_skips_gateway_and_survives_reopen() {
        let dir = tmp("distinct");
        let net: Ipv4Net = "10.1.0.0/29".parse().unwrap();
        let gw = Ipv4Addr::new(10, 1, 0, 1);
        let ipam = Ipam::open(&dir, net, gw).unwrap();
        let mut seen = HashSet::new();
        for i in 0..5 {
            let l = ipam.allocate(&format!("c{i}"), "eth0").unwrap();
            assert_ne!(l.ip, gw);
            assert!(seen.insert(l.ip), "{} handed out twice", l.ip);
        }
        // Same attachment again: same address.
        assert_eq!(
            ipam.allocate("c0", "eth0").unwrap().ip,
            Ipv4Addr::new(10, 1, 0, 2)
        );
        assert!(matches!(
            ipam.allocate("c9", "eth0"),
            Err(IpamError::Exhausted(_))
        ));
        // A restart sees the same leases.
        let ipam = Ipam::open(&dir, net, gw).unwrap();
        assert_eq!(ipam.leases().unwrap().len(), 5);
        assert_eq!(
            ipam.release("c3", "eth0").unwrap(),
            Some(Ipv4Addr::new(10, 1, 0, 5))
        );
        assert_eq!(ipam.release("c3", "eth0").unwrap(), None);
        assert_eq!(
            ipam.allocate("c10", "eth0").unwrap().ip,
            Ipv4Addr::new(10, 1, 0, 5)
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn round_robin_does_not_reuse_a_released_address_at_once() {
        let dir = tmp("rr");
        let ipam = Ipam::open(
            &dir,
            "10.2.0.0/24".parse().unwrap(),
            Ipv4Addr::new(10, 2, 0, 1),
        )
        .unwrap();
        let a = ipam.allocate("a", "eth0").unwrap().ip;
        ipam.release("a", "eth0").unwrap();
        let b = ipam.allocate("b", "eth0").unwrap().ip;
        assert_ne!(a, b);
        fs::remove_dir_all(&dir).unwrap();
    }
}
