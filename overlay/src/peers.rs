//! The peer table: which node owns which pod CIDR, and where to send its traffic.
//!
//! Lookups happen per frame, so the table is built once per change and queried without
//! allocation: one hash map per distinct prefix length, longest first (a cluster normally has a
//! single pod CIDR size, so this is one hash lookup). Received VXLAN is accepted only from an
//! underlay address in the table.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use hashbrown::HashMap;
use ipnet::Ipv4Net;

type Map<K, V> = HashMap<K, V, foldhash::fast::FixedState>;

/// Index of a peer in a [`PeerTable`].
pub type PeerId = u32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The node's name.
    pub name: String,
    /// Where its VXLAN datagrams go (and come from).
    pub underlay: IpAddr,
    /// Its VTEP MAC: the inner destination MAC of frames sent to it (flannel's flannel.1 MAC).
    pub vtep_mac: [u8; 6],
    /// Pod CIDRs routed to it.
    pub pod_cidrs: Vec<Ipv4Net>,
    /// It takes VXLAN remote checksum offload: inner checksums may be left partial.
    pub remote_csum: bool,
}

/// The peer table. A handle: its content sits behind an `Arc`, so a table snapshot that keeps
/// the peers shares them instead of copying them.
#[derive(Debug, Clone, Default)]
pub struct PeerTable {
    shared: Arc<Routes>,
}

#[derive(Debug, Default)]
struct Routes {
    peers: Vec<Peer>,
    /// (prefix length, network -> peer), longest prefix first.
    routes: Vec<(u8, Map<u32, PeerId>)>,
    by_underlay: Map<IpAddr, PeerId>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("peer {0:?}: pod CIDR {1} is already routed to peer {2:?}")]
    Overlap(String, Ipv4Net, String),
    #[error("peer {0:?}: underlay address {1} is already used by peer {2:?}")]
    DuplicateUnderlay(String, IpAddr, String),
    #[error("peer {0:?} is listed twice")]
    DuplicateName(String),
}

impl PeerTable {
    /// Builds a table; overlapping CIDRs or duplicate peers are refused.
    pub fn new(peers: Vec<Peer>) -> Result<PeerTable, PeerError> {
        let mut t = Routes::default();
        let mut lens: Vec<u8> = Vec::new();
        for (i, p) in peers.iter().enumerate() {
            let id = i as PeerId;
            if peers[..i].iter().any(|q| q.name == p.name) {
                return Err(PeerError::DuplicateName(p.name.clone()));
            }
            if let Some(other) = t.by_underlay.insert(p.underlay, id) {
                return Err(PeerError::DuplicateUnderlay(
                    p.name.clone(),
                    p.underlay,
                    peers[other as usize].name.clone(),
                ));
            }
            for net in &p.pod_cidrs {
                if !lens.contains(&net.prefix_len()) {
                    lens.push(net.prefix_len());
                }
            }
        }
        // CIDRs are nested or disjoint, so after sorting by address any overlap shows up
        // between neighbours.
        let mut all: Vec<(Ipv4Net, usize)> = peers
            .iter()
            .enumerate()
            .flat_map(|(i, p)| p.pod_cidrs.iter().map(move |n| (n.trunc(), i)))
            .collect();
        all.sort_unstable_by_key(|(n, _)| (n.network(), n.prefix_len()));
        for w in all.windows(2) {
            let ((a, ai), (b, bi)) = (w[0], w[1]);
            if a.contains(&b.network()) {
                return Err(PeerError::Overlap(
                    peers[bi].name.clone(),
                    b,
                    peers[ai].name.clone(),
                ));
            }
        }
        lens.sort_unstable_by(|a, b| b.cmp(a));
        for len in lens {
            let mut m = Map::default();
            for (i, p) in peers.iter().enumerate() {
                for net in p.pod_cidrs.iter().filter(|n| n.prefix_len() == len) {
                    m.insert(u32::from(net.network()), i as PeerId);
                }
            }
            t.routes.push((len, m));
        }
        t.peers = peers;
        Ok(PeerTable {
            shared: Arc::new(t),
        })
    }

    /// Whether two tables are one and the same (a snapshot kept its predecessor's peers).
    pub fn ptr_eq(a: &PeerTable, b: &PeerTable) -> bool {
        Arc::ptr_eq(&a.shared, &b.shared)
    }

    /// The peer whose pod CIDR holds `ip` (longest prefix).
    #[inline]
    pub fn route(&self, ip: Ipv4Addr) -> Option<(PeerId, &Peer)> {
        let a = u32::from(ip);
        for (len, m) in &self.shared.routes {
            let mask = if *len == 0 { 0 } else { u32::MAX << (32 - len) };
            if let Some(&id) = m.get(&(a & mask)) {
                return Some((id, &self.shared.peers[id as usize]));
            }
        }
        None
    }

    /// The peer sending from this underlay address.
    #[inline]
    pub fn by_underlay(&self, addr: IpAddr) -> Option<(PeerId, &Peer)> {
        let id = *self.shared.by_underlay.get(&addr)?;
        Some((id, &self.shared.peers[id as usize]))
    }

    pub fn get(&self, id: PeerId) -> Option<&Peer> {
        self.shared.peers.get(id as usize)
    }

    pub fn peers(&self) -> &[Peer] {
        &self.shared.peers
    }

    pub fn is_empty(&self) -> bool {
        self.shared.peers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, ul: [u8; 4], cidrs: &[&str]) -> Peer {
        Peer {
            remote_csum: false,
            name: name.into(),
            underlay: IpAddr::from(ul),
            vtep_mac: [2, 0, ul[0], ul[1], ul[2], ul[3]],
            pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn routes_by_longest_prefix_and_knows_underlays() {
        let t = PeerTable::new(vec![
            peer("n2", [192, 168, 100, 2], &["10.244.2.0/24"]),
            peer(
                "n3",
                [192, 168, 100, 3],
                &["10.244.3.0/24", "10.250.0.0/16"],
            ),
        ])
        .unwrap();
        assert_eq!(
            t.route("10.244.2.77".parse().unwrap()).unwrap().1.name,
            "n2"
        );
        assert_eq!(t.route("10.250.9.1".parse().unwrap()).unwrap().1.name, "n3");
        assert!(t.route("10.244.4.1".parse().unwrap()).is_none());
        assert_eq!(
            t.by_underlay("192.168.100.3".parse().unwrap()).unwrap().0,
            1
        );
        assert!(t.by_underlay("192.168.100.9".parse().unwrap()).is_none());
    }

    #[test]
    fn refuses_overlaps_and_duplicates() {
        let e = PeerTable::new(vec![
            peer("n2", [192, 168, 100, 2], &["10.244.0.0/16"]),
            peer("n3", [192, 168, 100, 3], &["10.244.3.0/24"]),
        ])
        .unwrap_err();
        assert!(matches!(e, PeerError::Overlap(..)), "{e}");
        let e = PeerTable::new(vec![
            peer("n2", [192, 168, 100, 2], &["10.244.2.0/24"]),
            peer("n3", [192, 168, 100, 2], &["10.244.3.0/24"]),
        ])
        .unwrap_err();
        assert!(matches!(e, PeerError::DuplicateUnderlay(..)), "{e}");
        let e = PeerTable::new(vec![
            peer("n2", [192, 168, 100, 2], &["10.244.2.0/24"]),
            peer("n2", [192, 168, 100, 3], &["10.244.3.0/24"]),
        ])
        .unwrap_err();
        assert!(matches!(e, PeerError::DuplicateName(..)), "{e}");
    }
}
