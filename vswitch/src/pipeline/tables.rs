//! The switch's tables as one immutable snapshot.
//!
//! The control plane builds a new `Tables` for every change and publishes it with `arc-swap`;
//! workers load it once per batch. Lookups are hash maps keyed by what the fast path has in
//! hand (destination MAC, destination IP, ingress port).
//!
//! A new snapshot shares what did not change: the Service table, the peer table, the DNS
//! records and the port maps are each behind an `Arc` (`ServiceTable` and `PeerTable` are
//! handles to theirs), so `with_ports` on a CNI ADD or DEL builds the port maps and nothing
//! else, whatever the number of Services.

use std::net::Ipv4Addr;
use std::sync::Arc;

use hashbrown::HashMap;
use ipnet::Ipv4Net;

use overlay::PeerTable;

use super::nat::ServiceTable;
use super::PortId;
use crate::wire::EthernetAddress;

type Map<K, V> = HashMap<K, V, foldhash::fast::FixedState>;

/// The switch's DNS resolver as the datapath sees it.
pub struct DnsService {
    /// Queries to these addresses, UDP port 53, are answered by the switch.
    pub addrs: Vec<Ipv4Addr>,
    pub table: crate::dns::DnsTable,
}

impl std::fmt::Debug for DnsService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsService")
            .field("addrs", &self.addrs)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortEntry {
    pub id: PortId,
    pub mac: EthernetAddress,
    pub ip: Ipv4Addr,
}

#[derive(Debug, Clone)]
pub struct Tables {
    /// Bumped on every publish; shown by the admin API.
    pub version: u64,
    pub pod_cidr: Ipv4Net,
    pub gateway_ip: Ipv4Addr,
    pub gateway_mac: EthernetAddress,
    /// This node's VTEP MAC: inner source MAC of what we send, inner destination MAC of what
    /// peers send us.
    pub vtep_mac: EthernetAddress,
    /// The largest inner IPv4 packet that fits in VXLAN over the underlay (underlay MTU - 50).
    pub overlay_mtu: u16,
    /// The VXLAN network identifier of the overlay.
    pub vni: u32,
    pub peers: PeerTable,
    /// Service frontends and their backends.
    pub services: ServiceTable,
    /// This node's name (for traffic policy Local).
    pub node_name: String,
    /// The host port (the node's own interface into the switch), holding the gateway address.
    pub host: Option<PortEntry>,
    /// The cluster's own ranges (the host port's routes): a destination in them with no route
    /// is dropped here rather than sent to the node, which would only send it back.
    pub cluster_nets: Vec<Ipv4Net>,
    /// Cluster DNS answered at the switch: the addresses it answers on, and its records.
    pub dns: Option<Arc<DnsService>>,
    /// NetworkPolicy: `None` while no policy exists, and then nothing is judged.
    pub policy: Option<Arc<crate::policy::PolicyTables>>,
    /// Egress translation (`[egress] enabled`): `None` when off, and then the outside is
    /// reached through the host port as before.
    pub egress: Option<Arc<Egress>>,
    ports: Arc<Ports>,
}

/// Which destinations a pod's packet leaves for by egress translation.
#[derive(Debug, Clone, Default)]
pub struct Egress {
    /// Destinations that keep the pod's address (`egress.no_masquerade`).
    pub no_masquerade: Vec<Ipv4Net>,
    /// This node's own addresses (its underlay address): reached through the host port.
    pub node_ips: Vec<Ipv4Addr>,
}

impl Egress {
    /// Whether a pod's packet to `dst` is translated: outside this node's pod CIDR, the
    /// cluster's ranges (pod CIDRs, Service CIDR) and the no-masquerade list, no node of the
    /// cluster (this one or a peer: those are inside the cluster, reached with the pod's own
    /// address as before, their answers crossing the overlay), and an ordinary unicast
    /// address.
    pub fn translates(&self, t: &Tables, dst: Ipv4Addr) -> bool {
        !(dst.is_broadcast()
            || dst.is_multicast()
            || dst.is_unspecified()
            || dst.is_loopback()
            || dst == t.gateway_ip
            || t.pod_cidr.contains(&dst)
            || t.cluster_nets.iter().any(|n| n.contains(&dst))
            || self.no_masquerade.iter().any(|n| n.contains(&dst))
            || self.node_ips.contains(&dst)
            || t.peers.by_underlay(std::net::IpAddr::V4(dst)).is_some())
    }
}

/// The attached ports, by id and by the two keys frames carry.
#[derive(Debug, Default)]
struct Ports {
    by_id: Map<PortId, PortEntry>,
    by_mac: Map<EthernetAddress, PortId>,
    by_ip: Map<Ipv4Addr, PortId>,
}

impl Tables {
    pub fn new(pod_cidr: Ipv4Net, gateway_ip: Ipv4Addr, gateway_mac: EthernetAddress) -> Self {
        Tables {
            version: 0,
            pod_cidr,
            gateway_ip,
            gateway_mac,
            vtep_mac: EthernetAddress([0x0e, 0x58, 0, 0, 0, 0]),
            overlay_mtu: 1450,
            vni: 1,
            peers: PeerTable::default(),
            services: ServiceTable::default(),
            node_name: String::new(),
            host: None,
            cluster_nets: Vec::new(),
            dns: None,
            policy: None,
            egress: None,
            ports: Arc::default(),
        }
    }

    /// A copy of these tables with other peers and a new version.
    pub fn with_peers(&self, peers: PeerTable) -> Self {
        Tables {
            version: self.version + 1,
            peers,
            ..self.clone()
        }
    }

    /// A copy of these tables with another DNS table and a new version.
    pub fn with_dns(&self, dns: Option<Arc<DnsService>>) -> Self {
        Tables {
            version: self.version + 1,
            dns,
            ..self.clone()
        }
    }

    /// A copy of these tables with other policy tables and a new version.
    pub fn with_policy(&self, policy: Option<Arc<crate::policy::PolicyTables>>) -> Self {
        Tables {
            version: self.version + 1,
            policy,
            ..self.clone()
        }
    }

    /// A copy of these tables with other Services and a new version.
    pub fn with_services(&self, services: ServiceTable) -> Self {
        Tables {
            version: self.version + 1,
            services,
            ..self.clone()
        }
    }

    /// A copy of these tables with the given ports and a new version.
    pub fn with_ports(&self, ports: impl IntoIterator<Item = PortEntry>) -> Self {
        let mut maps = Ports::default();
        for p in ports {
            maps.by_mac.insert(p.mac, p.id);
            maps.by_ip.insert(p.ip, p.id);
            maps.by_id.insert(p.id, p);
        }
        Tables {
            version: self.version + 1,
            ports: Arc::new(maps),
            ..self.clone()
        }
    }

    #[inline]
    pub fn port(&self, id: PortId) -> Option<&PortEntry> {
        self.ports.by_id.get(&id)
    }

    /// Whether `id` is the host port.
    #[inline]
    pub fn is_host(&self, id: PortId) -> bool {
        self.host.as_ref().is_some_and(|h| h.id == id)
    }

    #[inline]
    pub fn port_by_mac(&self, mac: EthernetAddress) -> Option<&PortEntry> {
        let p = &self.ports;
        p.by_mac.get(&mac).and_then(|id| p.by_id.get(id))
    }

    #[inline]
    pub fn port_by_ip(&self, ip: Ipv4Addr) -> Option<&PortEntry> {
        let p = &self.ports;
        p.by_ip.get(&ip).and_then(|id| p.by_id.get(id))
    }

    pub fn ports(&self) -> impl Iterator<Item = &PortEntry> {
        self.ports.by_id.values()
    }
}

/// The host port's MAC: distinct from the gateway (router) MAC the switch answers with, so
/// frames to the node and frames to be routed never look alike.
pub fn host_mac_for(gateway: Ipv4Addr) -> EthernetAddress {
    let o = gateway.octets();
    EthernetAddress([0x0a, 0x59, o[0], o[1], o[2], o[3]])
}

/// The MAC the switch gives an address: 0a:58 followed by the IPv4 address, as OVN-Kubernetes
/// does. Locally administered, unicast, stable across restarts, unique within the cluster.
pub fn mac_for(ip: Ipv4Addr) -> EthernetAddress {
    let o = ip.octets();
    EthernetAddress([0x0a, 0x58, o[0], o[1], o[2], o[3]])
}

#[cfg(test)]
mod tests {
    use conf::config::LoadBalancing;
    use overlay::Peer;

    use super::*;

    #[test]
    fn a_new_snapshot_shares_what_did_not_change() {
        let gw = Ipv4Addr::new(10, 244, 1, 1);
        let services = ServiceTable::build(
            &crate::testutil::many_services(100),
            "n1",
            LoadBalancing::Maglev,
        );
        let peers = PeerTable::new(vec![Peer {
            name: "n2".into(),
            underlay: "192.168.0.2".parse().unwrap(),
            vtep_mac: [0x0e, 0x58, 0, 0, 0, 2],
            pod_cidrs: vec!["10.244.2.0/24".parse().unwrap()],
            remote_csum: false,
        }])
        .unwrap();
        let t = Tables::new("10.244.1.0/24".parse().unwrap(), gw, mac_for(gw))
            .with_services(services)
            .with_peers(peers);
        let pod = Ipv4Addr::new(10, 244, 1, 2);
        let next = t
            .with_ports([PortEntry {
                id: 1,
                mac: mac_for(pod),
                ip: pod,
            }])
            .with_dns(None);

        // The CNI ADD path: new ports and DNS records, the same Services and peers.
        assert!(ServiceTable::ptr_eq(&t.services, &next.services));
        assert!(PeerTable::ptr_eq(&t.peers, &next.peers));
        assert_eq!(next.services.frontends().len(), 100);
        assert_eq!(next.port_by_ip(pod).map(|p| p.id), Some(1));
        assert!(t.port_by_ip(pod).is_none(), "the old snapshot is untouched");
        assert_eq!(next.version, t.version + 2);

        // And the other way round: new Services keep the ports.
        let again = next.with_services(ServiceTable::default());
        assert!(Arc::ptr_eq(&next.ports, &again.ports));
        assert!(!ServiceTable::ptr_eq(&next.services, &again.services));
    }
}
