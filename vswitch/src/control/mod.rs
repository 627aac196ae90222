//! The control plane: the daemon's state and the operations the admin API exposes.
//!
//! `Daemon` owns the attachments (one per CNI (container, ifname)), the IPAM leases and the
//! published table snapshot. Operations that change them take one lock for their whole run:
//! CNI operations are rare next to packets, and serialising them is what makes "never the same
//! address twice" and "a failed ADD leaves nothing" easy to see. The datapath never waits on
//! this lock; it sees only the snapshots published here.
//!
//! Attachment records are written to `<state_dir>/attachments/` so DEL, CHECK and GC work
//! across a restart of the daemon.

pub mod api;
pub mod capture_api;
pub mod dns_tcp;
pub mod handover;
pub mod host_routes;
pub mod ipam;
pub mod k8s;
pub mod metrics;
pub mod netconfig;
pub mod nodeport;
pub mod policy;
pub mod policy_dir;
pub mod reload;
pub mod source;
pub mod trace;

pub use source::ClusterSink;

use std::collections::BTreeMap;
use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use conf::api::{
    code, AddRequest, AddResponse, ApiError, Attachment, CheckRequest, DelRequest, Dns, GcRequest,
    GcResponse, PeersResponse, PortInfo, PortsResponse, Route, Status,
};
use conf::config::PeerSpec;
use conf::Config;
use ipnet::{IpNet, Ipv4Net};
use overlay::{Peer, PeerTable};
use serde::{Deserialize, Serialize};

use crate::datapath::stats::PortStats;
use crate::datapath::underlay::Underlay;
use crate::datapath::Datapath;
use crate::pipeline::tables::{host_mac_for, mac_for};
use crate::pipeline::{PortEntry, PortId, ServiceTable, Tables};
use crate::wire::EthernetAddress;
use ipam::Ipam;
use netconfig::{LinkStats, NetConfigError, PodInterface};

/// The drop reason under which a port's counters show what its TAP's kernel driver dropped.
pub const UNREAD: &str = "unread";

/// A port's kernel counters, or none (logged) if they cannot be read: the port works without.
fn link_stats(r: std::io::Result<LinkStats>, port: PortId) -> Option<Arc<LinkStats>> {
    r.map_err(|e| {
        tracing::warn!("port {port}: the kernel's counters of its TAP are unavailable: {e}")
    })
    .ok()
    .map(Arc::new)
}

/// Adds what the port's TAP dropped before the switch read it to `c`, as the drop reason
/// [`UNREAD`] (when there is any).
fn add_link_drops(c: &mut conf::api::PortCounters, link: Option<&LinkStats>) {
    let Some(link) = link else { return };
    match link.tx_dropped() {
        Ok(0) => {}
        Ok(n) => {
            c.drops.insert(UNREAD.to_string(), n);
        }
        Err(e) => tracing::debug!("reading a TAP's kernel counters: {e}"),
    }
}

/// What the daemon remembers of an attachment, on disk and in memory.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    container_id: String,
    ifname: String,
    netns: PathBuf,
    #[serde(default)]
    pod: Option<String>,
    /// The pod's labels from its ADD (for NetworkPolicy).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<String, String>,
    mac: String,
    ip: Ipv4Addr,
    port: PortId,
    /// The pod's hostPorts (its ADD's port mappings), listened on while the port is live.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    host_ports: Vec<conf::api::PortMapping>,
    /// Whether this daemon process holds the port's TAP (false for records from before a
    /// restart, whose devices went away with the old process).
    #[serde(skip)]
    live: bool,
    #[serde(skip)]
    stats: Arc<PortStats>,
    /// The kernel's counters of the pod's TAP (what the switch never got to read).
    #[serde(skip)]
    link: Option<Arc<LinkStats>>,
}

impl Record {
    /// The pod's MAC: the one recorded (derived from the address unless the runtime asked for
    /// one), or, for a record that holds none readable, the one derived from the address.
    fn mac_addr(&self) -> EthernetAddress {
        self.mac.parse().unwrap_or_else(|_| mac_for(self.ip))
    }

    /// The port as the admin API shows it.
    fn info(&self) -> PortInfo {
        PortInfo {
            id: self.port,
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
            netns: self.netns.clone(),
            pod: self.pod.clone(),
            mac: self.mac.clone(),
            ip: IpAddr::V4(self.ip),
            counters: self.stats.snapshot(),
            live: self.live,
            host_ports: self.host_ports.clone(),
        }
    }
}

struct State {
    ipam: Ipam,
    records: BTreeMap<Attachment, Record>,
    next_port: PortId,
    /// The peers as configured (file, then admin API), in the order given.
    peers: Vec<PeerSpec>,
    /// The Services (file, Kubernetes watch), shared with the watch's converter: the same
    /// `Arc` again is the same Service, unchanged.
    services: Vec<Arc<conf::config::ServiceSpec>>,
    /// The DNS names of `services` (no pods), when the switch answers DNS: rebuilt only when a
    /// Service's names change, and joined with the local pods' at each publish.
    dns_base: Option<crate::dns::DnsTable>,
    /// NetworkPolicy's inputs (manifest directory, Kubernetes watch).
    policy: policy::PolicyInputs,
    /// This node's topology zone, for EndpointSlice hints (`node.zone`, or the Node's label).
    zone: Option<String>,
}

pub struct Daemon {
    config: Config,
    tables: Arc<ArcSwap<Tables>>,
    datapath: Mutex<Datapath>,
    state: Mutex<State>,
    records_dir: PathBuf,
    underlay_stats: Arc<PortStats>,
    host_stats: Option<Arc<PortStats>>,
    host_link: Option<Arc<LinkStats>>,
    nodeports: std::sync::OnceLock<nodeport::NodePorts>,
    /// The DNS-over-TCP server on the gateway address (let go of in a handover).
    dns_tcp: Mutex<Option<tokio::task::JoinHandle<()>>>,
    forwarder: std::sync::OnceLock<crate::dns::Forwarder>,
    /// The Kubernetes watch's counters, in Kubernetes mode.
    pub k8s_stats: std::sync::OnceLock<k8s::K8sStatsHandle>,
    /// Handing the node over to a new vswitchd.
    pub handover: handover::Handover,
    /// The node's routes into the switch for other nodes' pods and Services (with a host port).
    host_routes: Option<host_routes::HostRoutes>,
}

pub use crate::pipeline::HOST_PORT;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("state directory {path}: {source}")]
    State {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Ipam(#[from] ipam::IpamError),
    #[error("starting the datapath: {0}")]
    Datapath(std::io::Error),
    #[error("overlay: {0}")]
    Underlay(std::io::Error),
    #[error("peers: {0}")]
    Peers(String),
    #[error("host port {0}: {1}")]
    Host(String, String),
}

fn api_err(code: u32, msg: impl Into<String>, details: impl std::fmt::Display) -> ApiError {
    ApiError::new(code, msg, details.to_string())
}

/// The first table snapshot, from the config alone (no pods yet), and the host port's TAP
/// when `host.enabled`.
fn initial_tables(
    config: &Config,
    gw: Ipv4Addr,
) -> Result<(Tables, Option<crate::datapath::tap::Tap>), DaemonError> {
    let mut tables = Tables::new(config.node.pod_cidr, gw, mac_for(gw));
    tables.vtep_mac = EthernetAddress(config.vtep_mac());
    tables.vni = config.overlay.vni;
    tables.overlay_mtu = (config.overlay.underlay_mtu - 50).min(u16::MAX as u32) as u16;
    tables.peers = peer_table(&config.peers).map_err(|e| DaemonError::Peers(e.msg))?;
    tables.node_name = config.node.name.clone();
    let services: Vec<Arc<conf::config::ServiceSpec>> =
        config.services.iter().cloned().map(Arc::new).collect();
    tables.services = service_table(
        &ServiceTable::default(),
        config,
        &services,
        config.node.zone.as_deref(),
    );
    if config.egress_on() {
        tables.egress = Some(Arc::new(crate::pipeline::tables::Egress {
            no_masquerade: config.egress.no_masquerade.clone(),
            node_ips: match config.overlay.underlay_ip {
                Some(IpAddr::V4(ip)) => vec![ip],
                _ => Vec::new(),
            },
        }));
    }
    let host_tap = if config.host.enabled {
        let routes: Vec<Ipv4Net> = config
            .host
            .routes
            .iter()
            .filter_map(|r| match r {
                IpNet::V4(n) => Some(*n),
                IpNet::V6(_) => None,
            })
            .collect();
        let tap = netconfig::create_host_interface(
            &config.host.interface,
            host_mac_for(gw),
            pod_address(config, gw),
            config.node.mtu,
            routes.clone(),
            config.datapath.offload,
            config.datapath.workers as usize,
        )
        .map_err(|e| DaemonError::Host(config.host.interface.clone(), e.to_string()))?;
        tables.cluster_nets = routes;
        tables.host = Some(PortEntry {
            id: HOST_PORT,
            mac: host_mac_for(gw),
            ip: gw,
        });
        Some(tap)
    } else {
        None
    };
    Ok((tables, host_tap))
}

/// The datapath's workers, with the underlay sockets when the overlay is on.
fn start_datapath(
    config: &Config,
    tables: Arc<ArcSwap<Tables>>,
    underlay_stats: Arc<PortStats>,
    pins: &[crate::datapath::CpuPin],
) -> Result<Datapath, DaemonError> {
    let workers = config.datapath.workers as usize;
    let underlay = match config.overlay.underlay_ip {
        Some(ip) => {
            Underlay::bind_group(ip, config.overlay.port, workers).map_err(DaemonError::Underlay)?
        }
        None => Vec::new(),
    };
    Datapath::start(
        tables,
        underlay,
        underlay_stats,
        crate::pipeline::CtConfig::from_config(&config.nat),
        workers,
        std::time::Duration::from_micros(config.datapath.busy_poll_us.into()),
        pins,
    )
    .map_err(DaemonError::Datapath)
}

/// Takes back the pods' ports from before a restart: their TAP devices persisted, with the
/// pods' addresses and routes, so traffic resumes as soon as they are read again.
fn take_back(config: &Config, datapath: &Datapath, records: &mut BTreeMap<Attachment, Record>) {
    for rec in records.values_mut() {
        match netconfig::reattach_pod_interface(
            &rec.netns,
            rec.ifname.clone(),
            config.datapath.offload,
            config.datapath.workers as usize,
        ) {
            Ok((tap, link)) => {
                rec.live = true;
                rec.link = link_stats(link, rec.port);
                datapath.add_port(rec.port, tap, rec.stats.clone());
                tracing::info!(
                    "took back port {} of {}/{} ({})",
                    rec.port,
                    rec.container_id,
                    rec.ifname,
                    rec.ip
                );
            }
            Err(e) => tracing::warn!(
                "port {} of {}/{} is gone ({e}); the runtime's DEL or GC releases it, or \
                 `vswitchctl release {}`",
                rec.port,
                rec.container_id,
                rec.ifname,
                rec.port
            ),
        }
    }
}

/// How an attachment's hostPorts are known to the relay.
fn owner_of(key: &Attachment) -> String {
    format!("{}/{}", key.container_id, key.ifname)
}

/// What an ADD must carry before anything is looked up.
fn check_add_request(req: &AddRequest) -> Result<(), ApiError> {
    validate_ifname(&req.ifname)?;
    if req.container_id.is_empty() {
        return Err(api_err(code::INVALID_ENV, "CNI_CONTAINERID is empty", ""));
    }
    if !req.netns.is_absolute() {
        return Err(api_err(
            code::INVALID_ENV,
            "CNI_NETNS must be an absolute path",
            req.netns.display(),
        ));
    }
    Ok(())
}

/// A MAC the runtime asked for: unicast, and no other port's (frames are switched by it).
fn requested_mac(st: &State, m: &str) -> Result<EthernetAddress, ApiError> {
    let mac: EthernetAddress = m.parse().map_err(|_| {
        api_err(
            code::INVALID_ENV,
            format!("CNI_ARGS MAC={m:?} is not a MAC address"),
            "",
        )
    })?;
    if mac.0[0] & 1 != 0 || mac.0 == [0; 6] {
        return Err(api_err(
            code::REQUESTED_UNAVAILABLE,
            format!("MAC {mac} is not a unicast address"),
            "",
        ));
    }
    if let Some(other) = st.records.values().find(|r| r.mac_addr() == mac) {
        return Err(api_err(
            code::REQUESTED_UNAVAILABLE,
            format!(
                "MAC {mac} is taken by {}/{}",
                other.container_id, other.ifname
            ),
            "",
        ));
    }
    Ok(mac)
}

/// The address for an ADD: the one it asked for, or the next free one.
fn lease(st: &mut State, req: &AddRequest) -> Result<ipam::Lease, ApiError> {
    match req.ip {
        Some(ip) => st
            .ipam
            .allocate_requested(&req.container_id, &req.ifname, ip),
        None => st.ipam.allocate(&req.container_id, &req.ifname),
    }
    .map_err(|e| match e {
        ipam::IpamError::Exhausted(_) => api_err(code::ADDRESSES_EXHAUSTED, e.to_string(), ""),
        ipam::IpamError::Unavailable { .. } => {
            api_err(code::REQUESTED_UNAVAILABLE, e.to_string(), "")
        }
        e => api_err(code::IO_FAILURE, "IPAM failed", e),
    })
}

impl Daemon {
    pub fn start(config: Config) -> Result<Arc<Daemon>, DaemonError> {
        // Checked before anything is made, so a bad CPU leaves nothing behind.
        let pins =
            crate::datapath::cpu_pins(&config.datapath.cpus).map_err(DaemonError::Datapath)?;
        let state_dir = config.node.state_dir.clone();
        let records_dir = state_dir.join("attachments");
        fs::create_dir_all(&records_dir).map_err(|source| DaemonError::State {
            path: records_dir.clone(),
            source,
        })?;
        let gw = config.gateway();
        let ipam = Ipam::open(&state_dir, config.node.pod_cidr, gw)?;
        let mut records = BTreeMap::new();
        let mut next_port = 1;
        for (key, rec) in load_records(&records_dir) {
            next_port = next_port.max(rec.port + 1);
            records.insert(key, rec);
        }

        let (tables, host_tap) = initial_tables(&config, gw)?;
        let tables = Arc::new(ArcSwap::from_pointee(tables));
        let underlay_stats = Arc::new(PortStats::default());
        let mut datapath = start_datapath(&config, tables.clone(), underlay_stats.clone(), &pins)?;
        if config.egress_on() {
            let limits = crate::egress::Limits {
                per_pod: config.egress.per_pod(),
                total: config.egress.total(),
                mtu: config.node.mtu,
            };
            let e = crate::egress::Egress::start(tables.clone(), limits, datapath.capture())
                .map_err(DaemonError::Datapath)?;
            datapath.set_egress(e);
        }
        take_back(&config, &datapath, &mut records);
        let host_link = host_tap
            .as_ref()
            .and_then(|_| link_stats(LinkStats::open(&config.host.interface), HOST_PORT));
        let host_stats = host_tap.map(|tap| {
            let stats = Arc::new(PortStats::default());
            datapath.add_port(HOST_PORT, tap, stats.clone());
            stats
        });
        let peers = config.peers.clone();
        let services: Vec<Arc<conf::config::ServiceSpec>> =
            config.services.iter().cloned().map(Arc::new).collect();
        let zone = config.node.zone.clone();
        let host_routes = if config.host.enabled {
            let r = host_routes::HostRoutes::start(config.host.interface.clone())
                .map_err(DaemonError::Datapath)?;
            Some(r)
        } else {
            None
        };
        let daemon = Arc::new(Daemon {
            config,
            tables,
            datapath: Mutex::new(datapath),
            state: Mutex::new(State {
                ipam,
                records,
                next_port,
                peers,
                services,
                dns_base: None,
                policy: Default::default(),
                zone: zone.clone(),
            }),
            records_dir,
            underlay_stats,
            host_stats,
            host_link,
            nodeports: std::sync::OnceLock::new(),
            dns_tcp: Mutex::new(None),
            forwarder: std::sync::OnceLock::new(),
            k8s_stats: std::sync::OnceLock::new(),
            handover: Default::default(),
            host_routes,
        });
        // The DNS records of the configured Services exist from the start, and the node's
        // routes to the configured peers and Services.
        {
            let mut st = daemon.lock();
            st.dns_base = daemon.dns_base(&st.services);
            daemon.publish(&st);
            daemon.sync_host_routes(&st);
        }
        Ok(daemon)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-changed in a way that matters
        // more than refusing all further work would.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn datapath(&self) -> MutexGuard<'_, Datapath> {
        self.datapath.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, st: &State) {
        let ports = st.records.values().filter(|r| r.live).map(|r| PortEntry {
            id: r.port,
            mac: r.mac_addr(),
            ip: r.ip,
        });
        let mut labels = crate::policy::selector::Interner::default();
        let local = st.records.values().filter(|r| r.live).map(|r| {
            let meta = policy::local_meta(r.pod.as_deref(), &r.labels, &mut labels);
            (r.port, IpAddr::V4(r.ip), Some(meta))
        });
        let policy = policy::tables(&st.policy, local.collect::<Vec<_>>());
        let next = self
            .tables
            .load()
            .with_ports(ports)
            .with_dns(self.dns_service(st))
            .with_policy(policy);
        self.tables.store(Arc::new(next));
    }

    /// The DNS names of `services` alone (see [`State::dns_base`]), if the switch answers DNS.
    fn dns_base(
        &self,
        services: &[Arc<conf::config::ServiceSpec>],
    ) -> Option<crate::dns::DnsTable> {
        let d = &self.config.dns;
        if !d.answer || !d.nameservers.iter().any(IpAddr::is_ipv4) {
            return None;
        }
        // Authoritative reverse zones: this node's pods and the Service range. Not the whole
        // cluster's pod range: other nodes' pods are not known here, and a PTR query for one
        // must not get a false NXDOMAIN (it is forwarded instead).
        let own = self.config.pod_net();
        let mut zones = vec![own];
        zones.extend(
            self.config
                .host
                .routes
                .iter()
                .filter(|r| !r.contains(&own.network()))
                .copied(),
        );
        match crate::dns::DnsTable::new(&d.cluster_domain, services, &[], &zones) {
            Ok(table) => Some(table),
            Err(e) => {
                tracing::error!("DNS records not updated: {e}");
                self.tables.load().dns.as_ref().map(|d| d.table.clone())
            }
        }
    }

    /// The switch's DNS records: the Services' names and the local pods', if it answers DNS.
    fn dns_service(&self, st: &State) -> Option<Arc<crate::pipeline::tables::DnsService>> {
        let d = &self.config.dns;
        let addrs: Vec<Ipv4Addr> = d
            .nameservers
            .iter()
            .filter_map(|a| match a {
                IpAddr::V4(a) => Some(*a),
                IpAddr::V6(_) => None,
            })
            .collect();
        let base = st.dns_base.as_ref()?;
        let pods: Vec<crate::dns::LocalPod> = st
            .records
            .values()
            .filter_map(|r| {
                let (ns, name) = r.pod.as_deref()?.split_once('/')?;
                Some(crate::dns::LocalPod {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                    ip: IpAddr::V4(r.ip),
                })
            })
            .collect();
        Some(Arc::new(crate::pipeline::tables::DnsService {
            addrs,
            table: base.with_pods(&pods),
        }))
    }

    /// Starts forwarding names outside the cluster to the node's resolvers, on `rt`.
    pub fn start_dns(&self, rt: tokio::runtime::Handle) {
        let d = &self.config.dns;
        if !d.answer || d.nameservers.is_empty() {
            return;
        }
        let cfg = if d.upstreams.is_empty() {
            match crate::dns::ForwarderConfig::from_resolv_conf(&d.resolv_conf) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("DNS: {e}; names outside the cluster will fail (SERVFAIL)");
                    crate::dns::ForwarderConfig::new(Vec::new())
                }
            }
        } else {
            crate::dns::ForwarderConfig::new(d.upstreams.clone())
        };
        // Never forward to ourselves.
        let mut cfg = cfg;
        cfg.upstreams.retain(|u| {
            !d.nameservers.contains(&u.ip()) && u.ip() != IpAddr::V4(self.config.gateway())
        });
        tracing::info!(
            "DNS: answering {} on {:?}, forwarding other names to {:?}",
            d.cluster_domain,
            d.nameservers,
            cfg.upstreams
        );
        let fw = crate::dns::Forwarder::new(cfg, rt.clone());
        self.datapath().set_forwarder(fw.clone());
        let _ = self.forwarder.set(fw.clone());
        if self.config.host.enabled {
            let table = self.tables.clone();
            let addr = std::net::SocketAddr::new(IpAddr::V4(self.config.gateway()), 53);
            let task = rt.spawn(dns_tcp::serve(addr, table, fw));
            *self.dns_tcp.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        }
    }

    /// Closes the DNS-over-TCP listener and waits until it has let go of its port.
    pub async fn stop_dns_tcp(&self) {
        let task = self
            .dns_tcp
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(t) = task {
            t.abort();
            let _ = t.await;
        }
    }

    fn response(&self, rec: &Record) -> AddResponse {
        let gw = self.config.gateway();
        let d = &self.config.dns;
        let dns = if d.nameservers.is_empty() {
            Dns::default()
        } else {
            // What kubelet writes into a pod's resolv.conf for ClusterFirst.
            let domain = &d.cluster_domain;
            let mut search = Vec::new();
            if let Some((ns, _)) = rec.pod.as_deref().and_then(|p| p.split_once('/')) {
                search.push(format!("{ns}.svc.{domain}"));
            }
            search.push(format!("svc.{domain}"));
            search.push(domain.clone());
            Dns {
                nameservers: d.nameservers.clone(),
                domain: None,
                search,
                options: vec!["ndots:5".into()],
            }
        };
        AddResponse {
            ifname: rec.ifname.clone(),
            mac: rec.mac.clone(),
            netns: rec.netns.clone(),
            address: IpNet::V4(pod_address(&self.config, rec.ip)),
            gateway: IpAddr::V4(gw),
            mtu: self.config.node.mtu,
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().expect("literal"),
                gw: Some(IpAddr::V4(gw)),
            }],
            dns,
        }
    }

    pub fn add(&self, req: AddRequest) -> Result<AddResponse, ApiError> {
        check_add_request(&req)?;
        if self.handover.handed_over() {
            return Err(api_err(
                code::TRY_AGAIN_LATER,
                "vswitchd is handing the node over to a new vswitchd: try again",
                "",
            ));
        }
        let key = Attachment {
            container_id: req.container_id.clone(),
            ifname: req.ifname.clone(),
        };
        let mut st = self.lock();
        if st.records.contains_key(&key) {
            // The spec has the runtime DEL before it ADDs the same attachment again.
            return Err(api_err(
                code::INTERFACE_EXISTS,
                format!(
                    "container {} already has interface {}; DEL it first",
                    req.container_id, req.ifname
                ),
                "",
            ));
        }
        let requested_mac = match &req.mac {
            None => None,
            Some(m) => Some(requested_mac(&st, m)?),
        };
        let lease = lease(&mut st, &req)?;
        // Every failure from here gives the address back.
        let made = requested_mac
            .map_or(Ok(()), |mac| self.check_not_reserved(mac, lease.ip))
            .and_then(|()| {
                let mac = requested_mac.unwrap_or_else(|| mac_for(lease.ip));
                let (tap, link) = self.create_pod_interface(&req, mac, lease.ip)?;
                Ok((mac, tap, link))
            });
        let owner = owner_of(&key);
        let made = made.and_then(|m| {
            self.open_host_ports(&owner, lease.ip, &req.port_mappings, true)
                .map(|()| m)
        });
        let (mac, tap, link) = match made {
            Ok(m) => m,
            Err(e) => {
                let _ = st.ipam.release(&req.container_id, &req.ifname);
                return Err(e);
            }
        };
        let port = st.next_port;
        st.next_port += 1;
        let rec = Record {
            container_id: req.container_id.clone(),
            ifname: req.ifname.clone(),
            netns: req.netns.clone(),
            pod: match (&req.pod_namespace, &req.pod_name) {
                (Some(ns), Some(n)) => Some(format!("{ns}/{n}")),
                _ => None,
            },
            labels: req.labels.clone(),
            mac: mac.to_string(),
            ip: lease.ip,
            port,
            host_ports: req.port_mappings.clone(),
            live: true,
            stats: Arc::new(PortStats::default()),
            link: link_stats(link, port),
        };
        if let Err(e) = self.save_record(&rec) {
            drop(tap);
            self.close_host_ports(&owner);
            let _ = st.ipam.release(&req.container_id, &req.ifname);
            return Err(api_err(code::IO_FAILURE, "saving the attachment failed", e));
        }
        self.datapath().add_port(port, tap, rec.stats.clone());
        let resp = self.response(&rec);
        tracing::info!(
            "attached {}/{} ({}) as port {port}: {} {}",
            rec.container_id,
            rec.ifname,
            rec.pod.as_deref().unwrap_or("-"),
            rec.ip,
            rec.mac
        );
        st.records.insert(key, rec);
        self.publish(&st);
        Ok(resp)
    }

    /// Opens a pod's hostPorts (see [`nodeport::NodePorts::open_host_ports`]).
    fn open_host_ports(
        &self,
        owner: &str,
        ip: Ipv4Addr,
        maps: &[conf::api::PortMapping],
        now: bool,
    ) -> Result<(), ApiError> {
        if maps.is_empty() {
            return Ok(());
        }
        let Some(np) = self.nodeports.get() else {
            return Err(api_err(
                code::TRY_AGAIN_LATER,
                "vswitchd is starting: hostPorts are not served yet",
                "",
            ));
        };
        np.open_host_ports(owner, ip, maps, now).map_err(|e| {
            api_err(
                code::REQUESTED_UNAVAILABLE,
                e,
                "another process or pod holds it",
            )
        })
    }

    fn close_host_ports(&self, owner: &str) {
        if let Some(np) = self.nodeports.get() {
            np.close_host_ports(owner);
        }
    }

    /// The MACs derived from the pod CIDR's addresses (0a:58 and the address) belong to those
    /// addresses' pods, and the gateway's, and the host port's: a pod given `ip` may ask for
    /// none of them but its own.
    fn check_not_reserved(&self, mac: EthernetAddress, ip: Ipv4Addr) -> Result<(), ApiError> {
        let o = mac.0;
        let derived = Ipv4Addr::new(o[2], o[3], o[4], o[5]);
        let reserved = (o[..2] == [0x0a, 0x58]
            && self.config.node.pod_cidr.contains(&derived)
            && derived != ip)
            || mac == host_mac_for(self.config.gateway());
        if reserved {
            return Err(api_err(
                code::REQUESTED_UNAVAILABLE,
                format!("MAC {mac} is reserved for another address of this node's pods"),
                "",
            ));
        }
        Ok(())
    }

    /// The pod's TAP device, made in its namespace with its address and routes.
    fn create_pod_interface(
        &self,
        req: &AddRequest,
        mac: EthernetAddress,
        ip: Ipv4Addr,
    ) -> Result<(crate::datapath::tap::Tap, std::io::Result<LinkStats>), ApiError> {
        let want = PodInterface {
            ifname: req.ifname.clone(),
            mac,
            address: pod_address(&self.config, ip),
            gateway: self.config.gateway(),
            mtu: self.config.node.mtu,
        };
        let (offload, queues) = (
            self.config.datapath.offload,
            self.config.datapath.workers as usize,
        );
        netconfig::create_pod_interface(&req.netns, want, offload, queues).map_err(|e| match e {
            NetConfigError::Exists(_) => api_err(code::INTERFACE_EXISTS, e.to_string(), ""),
            NetConfigError::Netns(_) => api_err(code::NETNS_FAILURE, e.to_string(), ""),
            e => api_err(code::IO_FAILURE, "creating the pod interface failed", e),
        })
    }

    pub fn del(&self, req: DelRequest) -> Result<(), ApiError> {
        let key = Attachment {
            container_id: req.container_id.clone(),
            ifname: req.ifname.clone(),
        };
        let mut st = self.lock();
        self.release(&mut st, &key)
    }

    /// Removes an attachment and everything it holds. Releasing nothing is success.
    fn release(&self, st: &mut State, key: &Attachment) -> Result<(), ApiError> {
        if let Some(rec) = st.records.remove(key) {
            self.publish(st);
            if !rec.host_ports.is_empty() {
                self.close_host_ports(&owner_of(key));
            }
            if rec.live {
                self.datapath().remove_port(rec.port);
            } else {
                // Not held by this process: delete the device if it is still there.
                netconfig::delete_pod_interface(&rec.netns, rec.ifname.clone());
            }
            let path = self.record_path(key);
            if let Err(e) = fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("removing {}: {e}", path.display());
                }
            }
            tracing::info!("detached {}/{} ({})", key.container_id, key.ifname, rec.ip);
        }
        st.ipam
            .release(&key.container_id, &key.ifname)
            .map_err(|e| api_err(code::IO_FAILURE, "IPAM release failed", e))?;
        Ok(())
    }

    /// Releases port `id` if the switch no longer holds it (see [`conf::api::PATH_PORT_PREFIX`]).
    pub fn release_port(&self, id: PortId) -> Result<PortInfo, ApiError> {
        let mut st = self.lock();
        let Some((key, rec)) = st
            .records
            .iter()
            .find(|(_, r)| r.port == id)
            .map(|(k, r)| (k.clone(), r.clone()))
        else {
            return Err(api_err(
                code::UNKNOWN_CONTAINER,
                format!("no pod port {id} (vswitchctl ports lists them)"),
                "",
            ));
        };
        if rec.live {
            return Err(api_err(
                code::UNSUPPORTED_FIELD,
                format!(
                    "port {id} of {}/{} is live: the runtime's CNI DEL releases it",
                    rec.container_id, rec.ifname
                ),
                "",
            ));
        }
        // Not held, but its pod may still be there (taking it back failed for another reason):
        // only a namespace that is gone proves the pod is.
        if rec.netns.exists() {
            return Err(api_err(
                code::UNSUPPORTED_FIELD,
                format!(
                    "port {id} of {}/{} is not held, but its namespace {} still exists: the \
                     pod may still run (why the port was not taken back is in vswitchd's log at \
                     its start); the runtime's CNI DEL releases it",
                    rec.container_id,
                    rec.ifname,
                    rec.netns.display()
                ),
                "",
            ));
        }
        let info = rec.info();
        self.release(&mut st, &key)?;
        tracing::info!("released port {id} by request (its namespace was gone)");
        Ok(info)
    }

    pub fn check(&self, req: CheckRequest) -> Result<AddResponse, ApiError> {
        let key = Attachment {
            container_id: req.container_id.clone(),
            ifname: req.ifname.clone(),
        };
        let rec = {
            let st = self.lock();
            st.records.get(&key).cloned()
        };
        let Some(rec) = rec else {
            return Err(api_err(
                code::UNKNOWN_CONTAINER,
                format!("no attachment {}/{}", req.container_id, req.ifname),
                "",
            ));
        };
        if !rec.live {
            return Err(api_err(
                code::CHECK_FAILED,
                format!(
                    "the switch lost port {} of {}/{} (daemon restarted)",
                    rec.port, rec.container_id, rec.ifname
                ),
                "",
            ));
        }
        let want = PodInterface {
            ifname: rec.ifname.clone(),
            mac: rec.mac_addr(),
            address: pod_address(&self.config, rec.ip),
            gateway: self.config.gateway(),
            mtu: self.config.node.mtu,
        };
        netconfig::check_pod_interface(&req.netns, want).map_err(|e| match e {
            NetConfigError::Netns(_) => api_err(code::NETNS_FAILURE, e.to_string(), ""),
            e => api_err(code::CHECK_FAILED, e.to_string(), ""),
        })?;
        // The plugin compares this with the runtime's prevResult.
        Ok(self.response(&rec))
    }

    pub fn gc(&self, req: GcRequest) -> Result<GcResponse, ApiError> {
        let valid: std::collections::BTreeSet<Attachment> = req.valid.into_iter().collect();
        let mut st = self.lock();
        let mut stale: Vec<Attachment> = st
            .records
            .keys()
            .filter(|k| !valid.contains(*k))
            .cloned()
            .collect();
        // Leases without a record (a crash between lease and record) go too.
        let leases = st
            .ipam
            .leases()
            .map_err(|e| api_err(code::IO_FAILURE, "IPAM", e))?;
        for l in leases {
            let k = Attachment {
                container_id: l.container_id,
                ifname: l.ifname,
            };
            if !valid.contains(&k) && !stale.contains(&k) {
                stale.push(k);
            }
        }
        for k in &stale {
            self.release(&mut st, k)?;
        }
        Ok(GcResponse { released: stale })
    }

    pub fn status(&self) -> Status {
        // Read before the lock: CNI operations wait on it, and these are file reads.
        let warnings = self.node_warnings();
        let st = self.lock();
        let gw = self.config.gateway();
        Status {
            node: self.config.node.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            pod_cidr: self.config.pod_net(),
            gateway: IpAddr::V4(gw),
            gateway_mac: mac_for(gw).to_string(),
            ports: st.records.values().filter(|r| r.live).count(),
            ready: self.synced(),
            pid: std::process::id(),
            warnings,
        }
    }

    /// Whether the switch has the cluster's tables: always in static mode (they come with the
    /// config); in Kubernetes mode only once the first lists of Nodes, Services and
    /// EndpointSlices have completed and been applied, and not while every one of those watches
    /// has failed for longer than [`k8s::API_AWAY_GRACE`] (the API server is away: the last
    /// tables keep forwarding, but they may be stale). Until then the DaemonSet does not write
    /// the CNI conflist, so no pod starts against a switch that knows no peer or Service.
    pub fn synced(&self) -> bool {
        !self.config.kubernetes.enabled
            || self.k8s_stats.get().is_some_and(|h| {
                h.get()
                    .ready_at(std::time::SystemTime::now(), k8s::API_AWAY_GRACE)
            })
    }

    /// The node's settings that the paths through the switch need and that are wrong now
    /// (a few small reads of /proc/sys: cheap enough for each status call and scrape).
    pub fn node_warnings(&self) -> Vec<conf::sysctl::NodeWarning> {
        let host_if = self
            .config
            .host
            .enabled
            .then_some(self.config.host.interface.as_str());
        // Looked up each time: the underlay's interface may come or be renamed while we run.
        let underlay_if = self
            .config
            .overlay
            .underlay_ip
            .and_then(conf::sysctl::interface_with_address);
        conf::sysctl::NodeSettings::new(host_if, underlay_if.as_deref()).check()
    }

    pub fn ports(&self) -> PortsResponse {
        let st = self.lock();
        // Each port with its TAP's counters, read below.
        let (ports, links): (Vec<PortInfo>, Vec<Option<Arc<LinkStats>>>) = st
            .records
            .values()
            .map(|r| (r.info(), r.link.clone()))
            .unzip();
        let mut resp = PortsResponse {
            ports,
            switch_drops: BTreeMap::new(),
            host: self.host_stats.as_ref().map(|s| {
                let gw = self.config.gateway();
                PortInfo {
                    id: HOST_PORT,
                    container_id: String::new(),
                    ifname: self.config.host.interface.clone(),
                    netns: PathBuf::from("/proc/self/ns/net"),
                    pod: Some("(host)".into()),
                    mac: host_mac_for(gw).to_string(),
                    ip: IpAddr::V4(gw),
                    counters: s.snapshot(),
                    live: true,
                    host_ports: Vec::new(),
                }
            }),
            underlay: self
                .config
                .overlay
                .underlay_ip
                .map(|_| self.underlay_stats.snapshot()),
        };
        // The kernel's counters are netlink round trips: not under the state lock.
        drop(st);
        for (p, link) in resp.ports.iter_mut().zip(links) {
            add_link_drops(&mut p.counters, link.as_deref());
        }
        if let Some(h) = &mut resp.host {
            add_link_drops(&mut h.counters, self.host_link.as_deref());
        }
        resp
    }

    pub fn peers(&self) -> PeersResponse {
        let st = self.lock();
        let o = &self.config.overlay;
        PeersResponse {
            underlay_ip: o.underlay_ip,
            port: o.port,
            vni: o.vni,
            vtep_mac: EthernetAddress(self.config.vtep_mac()).to_string(),
            peers: st.peers.clone(),
        }
    }

    /// Adds a peer, or replaces the one with the same name; traffic to other peers is not
    /// disturbed (one table swap).
    pub fn set_peer(&self, peer: PeerSpec) -> Result<PeersResponse, ApiError> {
        if self.config.overlay.underlay_ip.is_none() {
            return Err(api_err(
                code::INVALID_NETCONF,
                "the overlay is off: set overlay.underlay_ip in the config to use peers",
                "",
            ));
        }
        {
            let mut st = self.lock();
            let mut peers = st.peers.clone();
            match peers.iter_mut().find(|p| p.name == peer.name) {
                Some(p) => *p = peer,
                None => peers.push(peer),
            }
            self.apply_peers(&mut st, peers)?;
        }
        Ok(self.peers())
    }

    /// The peers and Services this vswitchd forwards with now (read by a successor).
    pub fn cluster_tables(&self) -> (Vec<PeerSpec>, Vec<Arc<conf::config::ServiceSpec>>) {
        let st = self.lock();
        (st.peers.clone(), st.services.clone())
    }

    /// Replaces the whole peer set at once (the Kubernetes watch and config reload use this).
    pub fn replace_peers(&self, peers: Vec<PeerSpec>) -> Result<(), ApiError> {
        let mut st = self.lock();
        if st.peers == peers {
            return Ok(());
        }
        self.apply_peers(&mut st, peers)
    }

    /// This node's topology zone as the API says (its Node's `topology.kubernetes.io/zone`;
    /// `None`: the config's `node.zone`): the Services are rebuilt when it changes.
    pub fn set_zone(&self, zone: Option<String>) -> Result<(), ApiError> {
        let zone = zone.or_else(|| self.config.node.zone.clone());
        let services = {
            let mut st = self.lock();
            if st.zone == zone {
                return Ok(());
            }
            tracing::info!("topology zone {zone:?}");
            st.zone = zone;
            st.services.clone()
        };
        self.replace_shared_services(services)
    }

    /// Replaces the whole Service set at once (config reload and the handover use this).
    pub fn replace_services(
        &self,
        services: Vec<conf::config::ServiceSpec>,
    ) -> Result<(), ApiError> {
        self.replace_shared_services(services.into_iter().map(Arc::new).collect())
    }

    /// Replaces the whole Service set at once (the Kubernetes watch uses this). A Service
    /// handed the same `Arc` as before is unchanged: only the others are validated and built,
    /// and the DNS names, NodePorts and the node's routes are redone only when a changed
    /// Service touches them, so one endpoint change among 10,000 Services costs that Service.
    pub fn replace_shared_services(
        &self,
        services: Vec<Arc<conf::config::ServiceSpec>>,
    ) -> Result<(), ApiError> {
        let mut st = self.lock();
        let changes = service_changes(&st.services, &services);
        for (_, new) in &changes {
            if let Some(s) = new {
                s.validate("services")
                    .map_err(|e| api_err(code::INVALID_NETCONF, e.to_string(), ""))?;
            }
        }
        let old = self.tables.load();
        let zone_moved = old.services.zone() != st.zone.as_deref();
        // Every version of a changed Service, before and after.
        let touched = || changes.iter().flat_map(|(a, b)| a.iter().chain(b));
        let dns_changed = changes
            .iter()
            .any(|(a, b)| crate::dns::dns_differs(a.as_deref(), b.as_deref()));
        let node_ports = zone_moved
            || touched().any(|s| {
                s.ports.iter().any(|p| p.node_port.is_some()) || s.health_check_node_port.is_some()
            });
        let routes = changes.iter().any(|(a, b)| {
            let vips = |s: Option<&conf::config::ServiceSpec>| {
                s.filter(|s| s.proxy_name.is_none()).map(|s| {
                    (
                        s.cluster_ips.clone(),
                        s.external_ips.clone(),
                        s.load_balancer_ips.clone(),
                    )
                })
            };
            vips(a.as_deref()) != vips(b.as_deref())
        });
        if changes.is_empty() && !zone_moved {
            st.services = services;
            return Ok(());
        }
        // Only the Services that changed are built anew (see `ServiceTable::rebuild_shared`).
        let table = service_table(&old.services, &self.config, &services, st.zone.as_deref());
        // UDP backends no Service has any more: their conntrack entries are flushed.
        let before: std::collections::BTreeSet<Ipv4Addr> = touched()
            .flat_map(|s| old.services.udp_backends_of(&s.namespace, &s.name))
            .collect();
        let gone: Vec<Ipv4Addr> = if before.is_empty() {
            Vec::new()
        } else {
            let now = table.udp_backends();
            before.difference(&now).copied().collect()
        };
        // The DNS records change only when a Service's names do (the local pods' are as
        // they were).
        let dns = if dns_changed || st.dns_base.is_none() {
            st.dns_base = self.dns_base(&services);
            self.dns_service(&st)
        } else {
            old.dns.clone()
        };
        st.services = services;
        self.tables
            .store(Arc::new(old.with_services(table).with_dns(dns)));
        if node_ports {
            if let Some(np) = self.nodeports.get() {
                np.reconcile(&st.services, st.zone.as_deref());
            }
        }
        if routes {
            self.sync_host_routes(&st);
        }
        if !gone.is_empty() {
            self.datapath().flush_udp(gone);
        }
        Ok(())
    }

    /// Replaces NetworkPolicy's inputs (policies, namespaces, pods) and publishes the tables.
    pub fn replace_policy(&self, inputs: policy::PolicyInputs) {
        let mut st = self.lock();
        st.policy = inputs;
        self.publish(&st);
    }

    /// NetworkPolicy as the switch applies it (`GET /v1/policies`), for every local pod or
    /// the one named `namespace/name`.
    pub fn policies(&self, pod: Option<&str>) -> Result<conf::api::PoliciesResponse, ApiError> {
        let st = self.lock();
        // Loaded under the lock, so the tables are the ones built from these inputs.
        let t = self.tables.load();
        let mut labels = crate::policy::selector::Interner::default();
        let ports: Vec<policy::LocalPort> = st
            .records
            .values()
            .filter(|r| r.live)
            .map(|r| policy::LocalPort {
                id: r.port,
                ip: IpAddr::V4(r.ip),
                meta: policy::local_meta(r.pod.as_deref(), &r.labels, &mut labels),
            })
            .collect();
        policy::view(&st.policy, t.policy.as_deref(), &ports, pod).map_err(|e| {
            let c = match e {
                policy::ViewError::BadName(_) => code::DECODE_FAILURE,
                policy::ViewError::NoPod { .. } => code::UNKNOWN_CONTAINER,
            };
            api_err(c, e.to_string(), "")
        })
    }

    /// NetworkPolicies in force and objects left out (for metrics).
    pub fn policy_counts(&self) -> (usize, usize) {
        let st = self.lock();
        (st.policy.set.len(), st.policy.problems.len())
    }

    pub fn services(&self) -> conf::api::ServicesResponse {
        let t = self.tables.load();
        conf::api::ServicesResponse {
            frontends: t
                .services
                .frontends()
                .iter()
                .map(|f| conf::api::FrontendInfo {
                    name: f.name.clone(),
                    vip: IpAddr::V4(f.vip),
                    port: f.port,
                    protocol: if f.proto == crate::wire::IpProtocol::TCP.0 {
                        "TCP".into()
                    } else {
                        "UDP".into()
                    },
                    backends: f
                        .backends
                        .iter()
                        .map(|b| format!("{}:{}", b.ip, b.port))
                        .collect(),
                    session_affinity_timeout: f.affinity_secs,
                })
                .collect(),
            node_ports: self
                .nodeports
                .get()
                .map(nodeport::NodePorts::list)
                .unwrap_or_default(),
        }
    }

    /// Tracked connections, optionally only those with `ip` (any side) and `port` (any side).
    /// Egress translation's flows (with their pods' names) and counters.
    pub fn egress(&self) -> conf::api::EgressResponse {
        let (conns, counters) = {
            let dp = self.datapath();
            match dp.egress() {
                None => return conf::api::EgressResponse::default(),
                Some(e) => (e.connections(), e.stats.snapshot()),
            }
        };
        let st = self.lock();
        let name = |port: PortId| {
            st.records
                .values()
                .find(|r| r.port == port)
                .map(|r| r.pod.clone().unwrap_or_else(|| r.container_id.clone()))
        };
        conf::api::EgressResponse {
            enabled: true,
            connections: conns
                .into_iter()
                .map(|mut c| {
                    c.pod = name(c.port);
                    c
                })
                .collect(),
            counters: counters
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        }
    }

    pub fn conntrack(&self, ip: Option<IpAddr>, port: Option<u16>) -> conf::api::ConntrackResponse {
        let entries = self.datapath().conntrack();
        let total = entries.len();
        let now = self.datapath().now_ms();
        let list = entries
            .into_iter()
            .filter(|e| {
                let ips = [e.orig.src, e.orig.dst, e.backend.ip];
                let ports = [e.orig.sport, e.orig.dport, e.backend.port];
                ip.is_none_or(|i| ips.iter().any(|a| IpAddr::V4(*a) == i))
                    && port.is_none_or(|p| ports.contains(&p))
            })
            .map(|e| conf::api::ConntrackInfo {
                protocol: if e.orig.proto == crate::wire::IpProtocol::TCP.0 {
                    "TCP".into()
                } else {
                    "UDP".into()
                },
                client: format!("{}:{}", e.orig.src, e.orig.sport),
                service: format!("{}:{}", e.orig.dst, e.orig.dport),
                backend: format!("{}:{}", e.backend.ip, e.backend.port),
                snat: e.snat.map(|(a, _)| a.to_string()),
                state: format!("{:?}", e.state),
                expires_in_ms: e.expires_ms.saturating_sub(now),
                frontend: e.frontend.clone(),
            })
            .collect();
        conf::api::ConntrackResponse {
            entries: list,
            total,
        }
    }

    /// Removes a peer by name; removing an unknown peer is an error (code 3).
    pub fn remove_peer(&self, name: &str) -> Result<PeersResponse, ApiError> {
        {
            let mut st = self.lock();
            let mut peers = st.peers.clone();
            let before = peers.len();
            peers.retain(|p| p.name != name);
            if peers.len() == before {
                return Err(api_err(
                    code::UNKNOWN_CONTAINER,
                    format!("no peer {name:?}"),
                    "",
                ));
            }
            self.apply_peers(&mut st, peers)?;
        }
        Ok(self.peers())
    }

    fn apply_peers(&self, st: &mut State, peers: Vec<PeerSpec>) -> Result<(), ApiError> {
        let mut check = self.config.clone();
        check.peers = peers;
        check
            .validate_peers()
            .map_err(|e| api_err(code::INVALID_NETCONF, e.to_string(), ""))?;
        let table = peer_table(&check.peers)?;
        let next = self.tables.load().with_peers(table);
        self.tables.store(Arc::new(next));
        tracing::info!(
            "peers now: {}",
            check
                .peers
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        st.peers = check.peers;
        self.sync_host_routes(st);
        Ok(())
    }

    /// Points the node's routes through the host port at the current peers and Services (and
    /// tells the relays which clients are pods).
    fn sync_host_routes(&self, st: &State) {
        if let Some(np) = self.nodeports.get() {
            np.set_pod_nets(self.pod_nets(st));
        }
        if let Some(r) = &self.host_routes {
            r.set(host_routes::wanted(
                &self.config.host.routes,
                self.config.node.pod_cidr,
                &st.peers,
                &st.services,
            ));
        }
    }

    /// The cluster's pod CIDRs this node knows: its own and its peers'.
    fn pod_nets(&self, st: &State) -> Vec<ipnet::Ipv4Net> {
        std::iter::once(self.config.node.pod_cidr)
            .chain(st.peers.iter().flat_map(|p| p.pod_cidrs.iter().copied()))
            .collect()
    }

    /// Starts the NodePort listeners on the control-plane runtime `rt`.
    pub fn start_nodeports(&self, rt: tokio::runtime::Handle) {
        let np = nodeport::NodePorts::new(
            rt,
            self.config.node.name.clone(),
            std::time::Duration::from_secs(u64::from(self.config.nat.udp_timeout)),
            self.config
                .host
                .enabled
                .then(|| self.config.host.interface.clone()),
            self.config.nat.node_port_addresses.clone(),
        );
        let st = self.lock();
        np.set_pod_nets(self.pod_nets(&st));
        np.reconcile(&st.services, st.zone.as_deref());
        // Pods taken back at start keep their hostPorts (bound once the vswitchd this one
        // took over from lets go of them).
        for (key, rec) in st.records.iter().filter(|(_, r)| r.live) {
            if rec.host_ports.is_empty() {
                continue;
            }
            let owner = owner_of(key);
            if let Err(e) = np.open_host_ports(&owner, rec.ip, &rec.host_ports, false) {
                tracing::warn!("hostPorts of {owner}: {e}");
            }
        }
        drop(st);
        let _ = self.nodeports.set(np);
    }

    /// Closes the NodePort listeners and waits until they let go of their ports.
    pub async fn stop_nodeports(&self) {
        if let Some(np) = self.nodeports.get() {
            np.stop().await;
        }
    }

    /// A synthetic packet through the pipeline (see `trace`).
    pub fn trace(
        &self,
        req: conf::api::TraceRequest,
    ) -> Result<conf::api::TraceResponse, ApiError> {
        let t = self.tables.load();
        let records: Vec<(Option<String>, String, PortId)> = self
            .lock()
            .records
            .values()
            .filter(|r| r.live)
            .map(|r| (r.pod.clone(), r.container_id.clone(), r.port))
            .collect();
        trace::run(
            &t,
            crate::pipeline::CtConfig::from_config(&self.config.nat),
            &req,
            |name| {
                records
                    .iter()
                    .find(|(pod, cid, _)| pod.as_deref() == Some(name) || cid == name)
                    .map(|r| r.2)
            },
        )
    }

    /// Frames each datapath worker has read, in worker order.
    pub fn worker_frames(&self) -> Vec<u64> {
        self.datapath().worker_frames()
    }

    /// Connection tracking size and counters.
    /// Egress translation's counters, when it is on.
    pub fn egress_stats(&self) -> Option<Arc<crate::egress::EgressStats>> {
        self.datapath().egress().map(|e| e.stats.clone())
    }

    pub fn ct_stats(&self) -> Arc<crate::datapath::CtGauge> {
        self.datapath().ct_stats()
    }

    /// Version of the published tables.
    pub fn table_version(&self) -> u64 {
        self.tables.load().version
    }

    /// The datapath's capture sessions.
    pub fn capture(&self) -> Arc<crate::capture::Hub> {
        self.datapath().capture()
    }

    /// Each port's name in captures: `pod:NS/NAME` (`port:ID` without a pod name), and
    /// `host:IFNAME` for the host port.
    pub fn port_names(&self) -> Vec<(PortId, String)> {
        let st = self.lock();
        let mut names: Vec<(PortId, String)> = st
            .records
            .values()
            .filter(|r| r.live)
            .map(|r| match &r.pod {
                Some(p) => (r.port, format!("pod:{p}")),
                None => (r.port, format!("port:{}", r.port)),
            })
            .collect();
        if self.host_stats.is_some() {
            names.push((HOST_PORT, format!("host:{}", self.config.host.interface)));
        }
        names
    }

    /// Whether the datapath worker is still running.
    pub fn datapath_alive(&self) -> bool {
        self.datapath().alive()
    }

    /// Stops the datapath: its queues and the VXLAN socket close. Pods' TAP devices and the host
    /// port are persistent and stay for the next vswitchd.
    pub fn shutdown(&self) {
        self.datapath().shutdown();
    }

    fn record_path(&self, key: &Attachment) -> PathBuf {
        // Container IDs are runtime-chosen; keep only a safe file name out of them.
        let safe = |s: &str| -> String {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        };
        self.records_dir.join(format!(
            "{}@{}.json",
            safe(&key.container_id),
            safe(&key.ifname)
        ))
    }

    fn save_record(&self, rec: &Record) -> std::io::Result<()> {
        let key = Attachment {
            container_id: rec.container_id.clone(),
            ifname: rec.ifname.clone(),
        };
        let path = self.record_path(&key);
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(rec)?)?;
        fs::rename(&tmp, &path)
    }
}

/// `ip` with the pod CIDR's prefix length: how pods (and the gateway) hold their address.
fn pod_address(config: &Config, ip: Ipv4Addr) -> Ipv4Net {
    Ipv4Net::new(ip, config.node.pod_cidr.prefix_len()).unwrap_or(config.node.pod_cidr)
}

/// The datapath's Service table: the Services, plus, when the switch answers DNS, TCP port 53
/// of each DNS address translated to the node's DNS-over-TCP listener on the gateway address
/// (clients retry over TCP after a truncated answer, and the switch has no TCP stack).
/// What changed from `old` to `new` Services, by namespace and name: (before, after), None
/// where a Service is absent. The same `Arc` is the same Service; another `Arc` counts as a
/// change only if its spec differs.
/// A Service before and after a change (None: absent).
type ServiceChange = (
    Option<Arc<conf::config::ServiceSpec>>,
    Option<Arc<conf::config::ServiceSpec>>,
);

fn service_changes(
    old: &[Arc<conf::config::ServiceSpec>],
    new: &[Arc<conf::config::ServiceSpec>],
) -> Vec<ServiceChange> {
    fn key(s: &Arc<conf::config::ServiceSpec>) -> (&str, &str) {
        (s.namespace.as_str(), s.name.as_str())
    }
    // In the same order on both sides (the watch's, a config's), most Services pair up at
    // once; the map is for the rest.
    if old.len() == new.len() && old.iter().zip(new).all(|(a, b)| Arc::ptr_eq(a, b)) {
        return Vec::new();
    }
    let mut before: hashbrown::HashMap<(&str, &str), &Arc<conf::config::ServiceSpec>> =
        old.iter().map(|s| (key(s), s)).collect();
    let mut out = Vec::new();
    for s in new {
        match before.remove(&key(s)) {
            Some(o) if Arc::ptr_eq(o, s) || **o == **s => {}
            o => out.push((o.cloned(), Some(s.clone()))),
        }
    }
    out.extend(before.into_values().map(|o| (Some(o.clone()), None)));
    out
}

fn service_table(
    prev: &ServiceTable,
    config: &Config,
    services: &[Arc<conf::config::ServiceSpec>],
    zone: Option<&str>,
) -> ServiceTable {
    let (node, lb) = (&config.node.name, config.nat.load_balancing);
    let d = &config.dns;
    if !(d.answer && config.host.enabled && !d.nameservers.is_empty()) {
        return prev.rebuild_shared(services, node, zone, lb);
    }
    let mut all = services.to_vec();
    all.push(Arc::new(conf::config::ServiceSpec {
        namespace: "vswitch-system".into(),
        name: "dns-tcp".into(),
        cluster_ips: d.nameservers.clone(),
        ports: vec![conf::config::ServicePort {
            name: Some("dns-tcp".into()),
            protocol: conf::config::Protocol::Tcp,
            port: 53,
            target_port: Some(53),
            node_port: None,
        }],
        external_ips: vec![],
        session_affinity_timeout: None,
        internal_traffic_policy: Default::default(),
        external_traffic_policy: Default::default(),
        load_balancer_ips: Vec::new(),
        health_check_node_port: None,
        proxy_name: None,
        endpoints: vec![conf::config::EndpointSpec {
            ip: IpAddr::V4(config.gateway()),
            node: Some(config.node.name.clone()),
            ready: true,
            serving: true,
            terminating: false,
            hostname: None,
            ports: None,
            for_zones: Vec::new(),
            for_nodes: Vec::new(),
        }],
    }));
    prev.rebuild_shared(&all, node, zone, lb)
}

/// The datapath's peer table from validated peer specs.
fn peer_table(specs: &[PeerSpec]) -> Result<PeerTable, ApiError> {
    let mut peers = Vec::with_capacity(specs.len());
    for p in specs {
        let vtep_mac = p
            .validate("peers")
            .map_err(|e| api_err(code::INVALID_NETCONF, e.to_string(), ""))?;
        peers.push(Peer {
            name: p.name.clone(),
            underlay: p.underlay_ip,
            vtep_mac,
            pod_cidrs: p.pod_cidrs.clone(),
            remote_csum: p.remote_checksum,
        });
    }
    PeerTable::new(peers).map_err(|e| api_err(code::INVALID_NETCONF, e.to_string(), ""))
}

fn load_records(dir: &Path) -> Vec<(Attachment, Record)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        match fs::read(&path).map(|b| serde_json::from_slice::<Record>(&b)) {
            Ok(Ok(rec)) => out.push((
                Attachment {
                    container_id: rec.container_id.clone(),
                    ifname: rec.ifname.clone(),
                },
                rec,
            )),
            Ok(Err(err)) => tracing::warn!("ignoring unreadable record {}: {err}", path.display()),
            Err(err) => tracing::warn!("ignoring unreadable record {}: {err}", path.display()),
        }
    }
    out
}

fn validate_ifname(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0');
    if ok {
        Ok(())
    } else {
        Err(api_err(
            code::INVALID_ENV,
            format!("CNI_IFNAME {name:?} is not a valid interface name"),
            "1-15 characters, no '/', ':' or whitespace",
        ))
    }
}
