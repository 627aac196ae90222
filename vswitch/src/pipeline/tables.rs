//! The switch's tables as one immutable snapshot.
//!
//! The control plane builds a new `Tables` for every change and publishes it with `arc-swap`;
//! workers load it once per batch. Lookups are hash maps keyed by what the fast path has in
//! hand (destination MAC, destination IP, ingress port).

use std::net::Ipv4Addr;

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
    pub dns: Option<std::sync::Arc<DnsService>>,
    ports: Map<PortId, PortEntry>,
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
            ports: Map::default(),
            by_mac: Map::default(),
            by_ip: Map::default(),
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
    pub fn with_dns(&self, dns: Option<std::sync::Arc<DnsService>>) -> Self {
        Tables {
            version: self.version + 1,
            dns,
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
        let mut t = Tables {
            version: self.version + 1,
            ports: Map::default(),
            by_mac: Map::default(),
            by_ip: Map::default(),
            ..self.clone()
        };
        for p in ports {
            t.by_mac.insert(p.mac, p.id);
            t.by_ip.insert(p.ip, p.id);
            t.ports.insert(p.id, p);
        }
        t
    }

    #[inline]
    pub fn port(&self, id: PortId) -> Option<&PortEntry> {
        self.ports.get(&id)
    }

    /// Whether `id` is the host port.
    #[inline]
    pub fn is_host(&self, id: PortId) -> bool {
        self.host.as_ref().is_some_and(|h| h.id == id)
    }

    #[inline]
    pub fn port_by_mac(&self, mac: EthernetAddress) -> Option<&PortEntry> {
        self.by_mac.get(&mac).and_then(|id| self.ports.get(id))
    }

    #[inline]
    pub fn port_by_ip(&self, ip: Ipv4Addr) -> Option<&PortEntry> {
        self.by_ip.get(&ip).and_then(|id| self.ports.get(id))
    }

    pub fn ports(&self) -> impl Iterator<Item = &PortEntry> {
        self.ports.values()
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
