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
    #[error("address {ip} cannot be given: {why}")]
    Unavailable { ip: Ipv4Addr, why: String },
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
            if let Some(lease) = self.claim(ip, container_id, ifname)? {
                let last_path = self.dir.join("last_reserved_ip");
                fs::write(&last_path, ip.to_string()).map_err(self.io(&last_path))?;
                return Ok(lease);
            }
        }
        Err(IpamError::Exhausted(self.net))
    }

    /// Allocates the address the runtime asked for: a host address of the pod CIDR, not the
    /// gateway, and free (or already this attachment's). Does not move the round-robin.
    pub fn allocate_requested(
        &self,
        container_id: &str,
        ifname: &str,
        ip: Ipv4Addr,
    ) -> Result<Lease, IpamError> {
        let unavailable = |why: String| IpamError::Unavailable { ip, why };
        if let Some(l) = self.find(container_id, ifname)? {
            if l.ip == ip {
                return Ok(l);
            }
            return Err(unavailable(format!(
                "{container_id}/{ifname} already holds {}",
                l.ip
            )));
        }
        if !self.net.contains(&ip) || ip == self.net.network() || ip == self.net.broadcast() {
            return Err(unavailable(format!(
                "not a host address of this node's pod CIDR {}",
                self.net
            )));
        }
        if ip == self.gateway {
            return Err(unavailable("it is the pods' gateway".into()));
        }
        match self.claim(ip, container_id, ifname)? {
            Some(lease) => Ok(lease),
            None => Err(unavailable(
                match self.leases()?.into_iter().find(|l| l.ip == ip) {
                    Some(l) => format!("leased to {}/{}", l.container_id, l.ifname),
                    None => "leased".into(),
                },
            )),
        }
    }

    /// Creates `ip`'s lease file for the attachment; None if another holds it.
    fn claim(
        &self,
        ip: Ipv4Addr,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<Lease>, IpamError> {
        let path = self.dir.join(ip.to_string());
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut f) => {
                let owner = format!("{container_id}\n{ifname}\n");
                if let Err(e) = f.write_all(owner.as_bytes()).and_then(|_| f.sync_all()) {
                    let _ = fs::remove_file(&path);
                    return Err(self.io(&path)(e));
                }
                Ok(Some(Lease {
                    ip,
                    container_id: container_id.into(),
                    ifname: ifname.into(),
                }))
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(self.io(&path)(e)),
        }
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
    fn a_requested_address_is_given_only_if_free_and_in_the_pod_cidr() {
        let dir = tmp("requested");
        let net: Ipv4Net = "10.1.0.0/29".parse().unwrap();
        let gw = Ipv4Addr::new(10, 1, 0, 1);
        let ipam = Ipam::open(&dir, net, gw).unwrap();
        let five = Ipv4Addr::new(10, 1, 0, 5);
        assert_eq!(ipam.allocate_requested("a", "eth0", five).unwrap().ip, five);
        // Again for the same attachment: the same lease.
        assert_eq!(ipam.allocate_requested("a", "eth0", five).unwrap().ip, five);
        let why = |r: Result<Lease, IpamError>| match r {
            Err(IpamError::Unavailable { why, .. }) => why,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            why(ipam.allocate_requested("b", "eth0", five)),
            "leased to a/eth0"
        );
        assert!(
            why(ipam.allocate_requested("a", "eth0", Ipv4Addr::new(10, 1, 0, 6)))
                .contains("already holds 10.1.0.5")
        );
        for bad in [[10, 1, 0, 0], [10, 1, 0, 7], [10, 2, 0, 5]] {
            assert!(
                why(ipam.allocate_requested("b", "eth0", Ipv4Addr::from(bad)))
                    .contains("not a host address of this node's pod CIDR 10.1.0.0/29")
            );
        }
        assert!(why(ipam.allocate_requested("b", "eth0", gw)).contains("gateway"));
        // The round-robin did not move: the next plain allocation starts at the bottom, and
        // skips the requested one.
        let got: Vec<Ipv4Addr> = (0..4)
            .map(|i| ipam.allocate(&format!("c{i}"), "eth0").unwrap().ip)
            .collect();
        assert_eq!(
            got,
            [2, 3, 4, 6].map(|h| Ipv4Addr::new(10, 1, 0, h)).to_vec()
        );
        fs::remove_dir_all(&dir).unwrap();
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
