//! NodePort: Services reachable at any node's address, without iptables or IPVS.
//!
//! Traffic for a NodePort arrives addressed to the node itself, so the node's kernel, not the
//! switch, receives it; with no packet-rewriting hooks allowed, the switch takes it at the
//! socket layer, as kube-proxy's original userspace mode did: one listener per NodePort on the
//! node, and each connection (TCP) or client flow (UDP) relayed to the Service. With the
//! default `externalTrafficPolicy: Cluster` the relay connects to the ClusterIP, which the node
//! routes into the switch through the host port, where the switch translates it like any other
//! Service connection (to a backend on any node). With `Local` it connects only to an endpoint
//! on this node (a ready one, else a serving-and-terminating one, KEP-1669). Where the
//! ClusterIP would not serve as `Cluster` means (the Service has `internalTrafficPolicy:
//! Local`, or ClientIP affinity, which the ClusterIP would key on the relaying node), the relay
//! connects to the Service's endpoints itself, choosing by the client's address when affinity
//! is on. A NodePort with no endpoint to relay to has no listener, so the node's kernel
//! refuses it (TCP RST, ICMP port unreachable), as kube-proxy's REJECT does, and a client's
//! load balancer fails over at once rather than seeing a connection accepted then closed.
//! `nat.node_port_addresses` restricts the listeners to the node's addresses in those CIDRs
//! (as found when the NodePorts change).
//!
//! A Service with `externalTrafficPolicy: Local` and a `healthCheckNodePort` gets the health
//! check kube-proxy serves there (pkg/proxy/healthcheck): HTTP 200 with a JSON body counting
//! this node's ready endpoints while there is one, 503 otherwise, so a cloud balancer sends
//! the Service's traffic only to nodes that can serve it.
//!
//! The relay terminates the client's connection. With `Cluster` the backend sees the node as
//! the client, as with kube-proxy's SNAT for that policy. With `Local` the client's address is
//! kept (TCP and UDP), which is that policy's point: the relay's connection to the endpoint is sent
//! from the client's address (an IP_TRANSPARENT socket), and the endpoint's replies, which the
//! switch hands to the node like any packet for an outside address, are delivered to that
//! socket by policy routing: `ip rule iif <host port> ipproto tcp|udp sport <target port>
//! lookup 1009` with `local 0.0.0.0/0 dev lo` in table 1009. That needs policy routing in the node's
//! kernel (CONFIG_IP_MULTIPLE_TABLES, present in every distribution kernel); where the rule
//! cannot be installed the relay falls back to the node's address and says so in the log. A
//! pod serving the same port to outside clients through the node is also answered locally
//! while the rule is there, a cost documented with the policy. It runs on the control-plane
//! runtime, never on the datapath threads. Clients that are pods (in this node's or a peer's
//! pod CIDR) are always relayed from the node's address: their replies would cross the
//! switch to the client's node rather than come back through this one.
//!
//! Pods' hostPorts (the runtime's `portMappings`) are relayed the same way, each to its pod's
//! container port, keeping the client's address as policy Local does. They are bound when the
//! pod's ADD is taken, so a port in use fails the ADD, and closed by its DEL.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conf::config::{Protocol, ServiceSpec, TrafficPolicy};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

/// Where one NodePort relays to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    /// `namespace/name:port/PROTO` of the Service port, for listings.
    service: String,
    /// Candidate destinations: the ClusterIP, or the endpoints themselves.
    dests: Vec<SocketAddr>,
    /// `externalTrafficPolicy: Local`.
    local: bool,
    /// Send from the client's address (policy Local, with the return route in place).
    transparent: bool,
    /// ClientIP affinity: one client, one destination (chosen by its address alone).
    affinity: bool,
}

type RuleSet = std::collections::BTreeSet<(u8, u16)>;

/// What the relays read when they choose whether to keep a client's address.
#[derive(Default)]
struct Relay {
    /// (IP protocol, target port) pairs with a return rule installed.
    installed: Mutex<RuleSet>,
    /// The cluster's pod CIDRs (this node's and its peers'): a pod's replies to another pod
    /// cross the switch, never the node, so a pod client is relayed from the node's address.
    pods: Mutex<Vec<ipnet::Ipv4Net>>,
}

type Rules = Arc<Relay>;
const TCP: u8 = 6;
const UDP: u8 = 17;

/// The routing table that delivers endpoints' replies to transparent relay sockets.
const TPROXY_TABLE: u32 = 1009;
const TPROXY_PRIORITY: u32 = 1009;

type Key = (Protocol, u16);

struct Listener {
    target: Arc<Mutex<Target>>,
    /// One task per address listened on.
    tasks: Vec<JoinHandle<()>>,
    /// The addresses listened on (unspecified: all).
    addrs: Vec<IpAddr>,
}

/// The health check of one Service: what it answers, and its server.
struct Health {
    state: Arc<Mutex<HealthState>>,
    /// One task per address listened on.
    tasks: Vec<JoinHandle<()>>,
    addrs: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct HealthState {
    namespace: String,
    name: String,
    /// This node's ready endpoints of the Service.
    local_endpoints: usize,
}

/// The NodePort listeners of this node, kept in step with the Services.
pub struct NodePorts {
    rt: tokio::runtime::Handle,
    node: String,
    udp_idle: Duration,
    listeners: Mutex<HashMap<Key, Listener>>,
    health: Mutex<HashMap<u16, Health>>,
    /// `nat.node_port_addresses`: empty, every address.
    only: Vec<ipnet::IpNet>,
    /// The host port, through which endpoints' replies reach the node; None: no transparency.
    host_if: Option<String>,
    /// (IP protocol, target port) pairs with a return rule installed.
    rules: Rules,
    /// The pairs the NodePorts want a return rule for.
    node_rules: Mutex<RuleSet>,
    /// The pairs wanted in all (NodePorts and hostPorts), as last computed.
    desired: Arc<Mutex<RuleSet>>,
    /// Held while return rules are changed, so that changes apply in order.
    applying: Arc<tokio::sync::Mutex<()>>,
    /// The pods' hostPorts.
    host_ports: Mutex<Vec<HostListener>>,
}

/// One hostPort of a pod: a listener relaying to the pod's container port.
struct HostListener {
    /// The attachment (`container/ifname`) it belongs to.
    owner: String,
    mapping: conf::api::PortMapping,
    task: JoinHandle<()>,
}

/// The NodePort targets of `services` seen from `node`; a NodePort without any destination
/// is left out (nothing listens, the kernel refuses).
fn targets<S: std::borrow::Borrow<ServiceSpec>>(
    services: &[S],
    node: &str,
    zone: Option<&str>,
) -> HashMap<Key, Target> {
    let mut out = HashMap::new();
    for s in services
        .iter()
        .map(|s| s.borrow())
        .filter(|s| s.proxy_name.is_none())
    {
        for p in &s.ports {
            let Some(np) = p.node_port else { continue };
            if p.protocol == Protocol::Sctp {
                continue;
            }
            let local = s.external_traffic_policy == TrafficPolicy::Local;
            let affinity = s.session_affinity_timeout.is_some();
            let endpoints: Vec<SocketAddr> =
                crate::pipeline::nat::backends_in(s, p, node, zone, s.external_traffic_policy)
                    .into_iter()
                    .map(|b| SocketAddr::new(IpAddr::V4(b.ip), b.port))
                    .collect();
            if endpoints.is_empty() {
                continue;
            }
            // Through the ClusterIP only where it serves as policy Cluster means.
            let via_cluster_ip = !local
                && !affinity
                && s.internal_traffic_policy == TrafficPolicy::Cluster
                && s.cluster_ips.iter().any(|ip| ip.is_ipv4());
            let dests = if via_cluster_ip {
                s.cluster_ips
                    .iter()
                    .filter(|ip| ip.is_ipv4())
                    .map(|ip| SocketAddr::new(*ip, p.port))
                    .collect()
            } else {
                endpoints
            };
            out.insert(
                (p.protocol, np),
                Target {
                    service: format!(
                        "{}/{}:{}/{}",
                        s.namespace,
                        s.name,
                        p.port,
                        p.protocol.as_str()
                    ),
                    dests,
                    local,
                    transparent: local,
                    affinity,
                },
            );
        }
    }
    out
}

/// The health checks of `services` seen from `node`: healthCheckNodePort -> what it answers.
fn health_states<S: std::borrow::Borrow<ServiceSpec>>(
    services: &[S],
    node: &str,
) -> HashMap<u16, HealthState> {
    services
        .iter()
        .map(|s| s.borrow())
        .filter(|s| s.proxy_name.is_none() && s.external_traffic_policy == TrafficPolicy::Local)
        .filter_map(|s| {
            let port = s.health_check_node_port?;
            // kube-proxy counts the ready endpoints on this node (terminating ones do not
            // count: the balancer is to drain the node).
            let local_endpoints = s
                .endpoints
                .iter()
                .filter(|e| e.ready && e.node.as_deref() == Some(node))
                .count();
            Some((
                port,
                HealthState {
                    namespace: s.namespace.clone(),
                    name: s.name.clone(),
                    local_endpoints,
                },
            ))
        })
        .collect()
}

/// The HTTP response of a health check, as kube-proxy's service health server writes it.
fn health_response(st: &HealthState) -> String {
    let body = serde_json::json!({
        "service": {"namespace": st.namespace, "name": st.name},
        "localEndpoints": st.local_endpoints,
        "serviceProxyHealthy": true,
    })
    .to_string();
    let status = if st.local_endpoints > 0 {
        "200 OK"
    } else {
        "503 Service Unavailable"
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\n\
         X-Load-Balancing-Endpoint-Weight: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        st.local_endpoints,
        body.len()
    )
}

fn pick(target: &Mutex<Target>, from: &SocketAddr) -> Option<SocketAddr> {
    let t = target.lock().unwrap_or_else(|p| p.into_inner());
    if t.dests.is_empty() {
        return None;
    }
    let salt = if t.affinity {
        // The same for every connection of a client, in every run: its address alone.
        use std::hash::BuildHasher;
        foldhash::fast::FixedState::with_seed(0x6166).hash_one(from.ip())
    } else {
        salt_of(from)
    };
    Some(t.dests[(salt % t.dests.len() as u64) as usize])
}

/// Whether to send from the client's address: policy Local, and only with the return route
/// for (`proto`, `port`) in place, otherwise the replies would be lost.
fn transparent(
    target: &Mutex<Target>,
    relay: &Relay,
    proto: u8,
    from: SocketAddr,
    dest: SocketAddr,
) -> bool {
    let outside = || match from.ip() {
        IpAddr::V4(ip) => !relay
            .pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|n| n.contains(&ip)),
        IpAddr::V6(_) => false,
    };
    target.lock().unwrap_or_else(|p| p.into_inner()).transparent
        && keeps(from, dest)
        && relay
            .installed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&(proto, dest.port()))
        && outside()
}

/// Whether the client's address can be kept towards `dest`: not a loopback client (its
/// address cannot leave the node), and not the destination pod itself (a hairpin, which the
/// pod would drop as a martian: it is relayed from the node's address, as kube-proxy
/// masquerades hairpin traffic).
fn keeps(from: SocketAddr, dest: SocketAddr) -> bool {
    !from.ip().is_loopback() && from.ip() != dest.ip()
}

fn salt_of(addr: &SocketAddr) -> u64 {
    use std::hash::BuildHasher;
    foldhash::fast::RandomState::default().hash_one(addr)
}

/// The node's IPv4 addresses in `only` (all of them, as the unspecified address, when empty).
fn listen_addrs(only: &[ipnet::IpNet]) -> Vec<IpAddr> {
    if only.is_empty() {
        return vec![IpAddr::from([0, 0, 0, 0])];
    }
    let mut out: Vec<IpAddr> = match nix::ifaddrs::getifaddrs() {
        Ok(addrs) => addrs
            .filter_map(|a| a.address?.as_sockaddr_in().map(|s| IpAddr::V4(s.ip())))
            .filter(|ip| only.iter().any(|c| c.contains(ip)))
            .collect(),
        Err(e) => {
            tracing::warn!("NodePorts: cannot list the node's addresses: {e}");
            Vec::new()
        }
    };
    out.sort();
    out.dedup();
    out
}

impl NodePorts {
    pub fn new(
        rt: tokio::runtime::Handle,
        node: String,
        udp_idle: Duration,
        host_if: Option<String>,
        only: Vec<ipnet::IpNet>,
    ) -> Self {
        NodePorts {
            rt,
            node,
            udp_idle,
            listeners: Mutex::new(HashMap::new()),
            health: Mutex::new(HashMap::new()),
            only,
            host_if,
            rules: Arc::default(),
            node_rules: Mutex::default(),
            desired: Arc::default(),
            applying: Arc::default(),
            host_ports: Mutex::default(),
        }
    }

    /// Installs (and removes) the return rules for the endpoints' ports of Local NodePorts.
    fn sync_rules(&self, want: &HashMap<Key, Target>) {
        let want: RuleSet = want
            .iter()
            .filter(|(_, t)| t.local)
            .flat_map(|(k, t)| {
                let proto = if k.0 == Protocol::Tcp { TCP } else { UDP };
                t.dests.iter().map(move |d| (proto, d.port()))
            })
            .collect();
        *self.node_rules.lock().unwrap_or_else(|e| e.into_inner()) = want;
        self.apply_rules();
    }

    /// Brings the installed return rules to what the NodePorts and hostPorts want now, on the
    /// control-plane runtime, one change after another.
    fn apply_rules(&self) {
        let Some(host_if) = self.host_if.clone() else {
            return;
        };
        let mut want = self
            .node_rules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        want.extend(
            self.host_ports
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|h| {
                    let proto = if h.mapping.is_udp() { UDP } else { TCP };
                    (proto, h.mapping.container_port)
                }),
        );
        *self.desired.lock().unwrap_or_else(|e| e.into_inner()) = want;
        let (rules, desired, applying) = (
            self.rules.clone(),
            self.desired.clone(),
            self.applying.clone(),
        );
        self.rt.spawn(async move {
            let _turn = applying.lock().await;
            let want = desired.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let have = rules
                .installed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if want == have {
                return;
            }
            match return_rules(&host_if, &have, &want).await {
                Ok(()) => *rules.installed.lock().unwrap_or_else(|e| e.into_inner()) = want,
                Err(e) => tracing::warn!(
                    "NodePort policy Local and hostPorts: cannot route endpoints' replies back \
                     to the relay ({e}); the client's address is not kept"
                ),
            }
        });
    }

    /// The cluster's pod CIDRs: clients there are relayed from the node's address.
    pub fn set_pod_nets(&self, nets: Vec<ipnet::Ipv4Net>) {
        *self.rules.pods.lock().unwrap_or_else(|e| e.into_inner()) = nets;
    }

    /// Opens `owner`'s hostPorts, relaying to `pod`. With `now`, each port is bound before
    /// this returns and an error (a port in use) leaves none of them open; otherwise (pods
    /// taken back at start) each listener binds when its port is free, as NodePorts do.
    pub fn open_host_ports(
        &self,
        owner: &str,
        pod: std::net::Ipv4Addr,
        maps: &[conf::api::PortMapping],
        now: bool,
    ) -> Result<(), String> {
        if maps.is_empty() {
            return Ok(());
        }
        enum Bound {
            Tcp(TcpListener),
            Udp(UdpSocket),
            Later,
        }
        let bound: Vec<Bound> = if now {
            let _rt = self.rt.enter();
            maps.iter()
                .map(|m| {
                    let at = (
                        IpAddr::V4(m.host_ip.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED)),
                        m.host_port,
                    );
                    let open = if m.is_udp() {
                        std::net::UdpSocket::bind(at)
                            .and_then(|s| s.set_nonblocking(true).map(|()| s))
                            .and_then(UdpSocket::from_std)
                            .map(Bound::Udp)
                    } else {
                        std::net::TcpListener::bind(at)
                            .and_then(|s| s.set_nonblocking(true).map(|()| s))
                            .and_then(TcpListener::from_std)
                            .map(Bound::Tcp)
                    };
                    open.map_err(|e| {
                        format!("hostPort {}/{} on {}: {e}", m.host_port, m.protocol, at.0)
                    })
                })
                .collect::<Result<_, _>>()?
        } else {
            maps.iter().map(|_| Bound::Later).collect()
        };
        let mut hs = self.host_ports.lock().unwrap_or_else(|e| e.into_inner());
        for (m, b) in maps.iter().zip(bound) {
            let target = Arc::new(Mutex::new(Target {
                service: format!("hostPort of {owner}"),
                dests: vec![SocketAddr::new(IpAddr::V4(pod), m.container_port)],
                local: true,
                transparent: self.host_if.is_some(),
                affinity: false,
            }));
            let ip = IpAddr::V4(m.host_ip.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED));
            let (port, rules) = (m.host_port, self.rules.clone());
            let task = match b {
                Bound::Tcp(l) => self.rt.spawn(serve_tcp(l, port, target, rules)),
                Bound::Udp(u) => {
                    self.rt
                        .spawn(serve_udp(Arc::new(u), target, self.udp_idle, rules))
                }
                Bound::Later if m.is_udp() => {
                    self.rt.spawn(udp(ip, port, target, self.udp_idle, rules))
                }
                Bound::Later => self.rt.spawn(tcp(ip, port, target, rules)),
            };
            tracing::info!("hostPort {m} of {owner} to {pod}");
            hs.push(HostListener {
                owner: owner.to_string(),
                mapping: m.clone(),
                task,
            });
        }
        drop(hs);
        self.apply_rules();
        Ok(())
    }

    /// Closes `owner`'s hostPorts.
    pub fn close_host_ports(&self, owner: &str) {
        let mut closed = false;
        self.host_ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|h| {
                if h.owner != owner {
                    return true;
                }
                h.task.abort();
                tracing::info!("hostPort {} of {owner} closed", h.mapping);
                closed = true;
                false
            });
        if closed {
            self.apply_rules();
        }
    }

    /// The NodePorts listened on, by port and protocol.
    pub fn list(&self) -> Vec<conf::api::NodePortInfo> {
        let ls = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<conf::api::NodePortInfo> = ls
            .iter()
            .map(|(k, l)| {
                let t = l.target.lock().unwrap_or_else(|p| p.into_inner());
                conf::api::NodePortInfo {
                    node_port: k.1,
                    protocol: k.0.as_str().into(),
                    service: t.service.clone(),
                    destinations: t.dests.iter().map(|d| d.to_string()).collect(),
                    local: t.local,
                }
            })
            .collect();
        out.sort_by(|a, b| (a.node_port, &a.protocol).cmp(&(b.node_port, &b.protocol)));
        out
    }

    /// Closes every listener and waits until each task has ended (a vswitchd taking the node
    /// over binds the ports next).
    pub async fn stop(&self) {
        let mut tasks: Vec<JoinHandle<()>> = {
            let mut ls = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
            ls.drain().flat_map(|(_, l)| l.tasks).collect()
        };
        tasks.extend(
            self.health
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drain()
                .flat_map(|(_, h)| h.tasks),
        );
        tasks.extend(
            self.host_ports
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drain(..)
                .map(|h| h.task),
        );
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
    }

    /// Opens listeners for new NodePorts, closes those that went away (or have nothing to
    /// relay to), and points the rest at their current destinations.
    pub fn reconcile<S: std::borrow::Borrow<ServiceSpec>>(
        &self,
        services: &[S],
        zone: Option<&str>,
    ) {
        let mut want = targets(services, &self.node, zone);
        self.sync_rules(&want);
        if self.host_if.is_none() {
            for t in want.values_mut() {
                t.transparent = false;
            }
        }
        let addrs = listen_addrs(&self.only);
        let mut ls = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        ls.retain(|k, l| {
            let keep = want.contains_key(k) && l.addrs == addrs;
            if !keep {
                for t in &l.tasks {
                    t.abort();
                }
                tracing::info!("NodePort {}/{:?} closed", k.1, k.0);
            }
            keep
        });
        for (k, t) in want {
            if let Some(l) = ls.get(&k) {
                *l.target.lock().unwrap_or_else(|p| p.into_inner()) = t;
                continue;
            }
            let target = Arc::new(Mutex::new(t));
            let tasks = addrs
                .iter()
                .map(|&ip| match k.0 {
                    Protocol::Tcp => {
                        self.rt
                            .spawn(tcp(ip, k.1, target.clone(), self.rules.clone()))
                    }
                    _ => self.rt.spawn(udp(
                        ip,
                        k.1,
                        target.clone(),
                        self.udp_idle,
                        self.rules.clone(),
                    )),
                })
                .collect();
            ls.insert(
                k,
                Listener {
                    target,
                    tasks,
                    addrs: addrs.clone(),
                },
            );
        }
        drop(ls);
        let want = health_states(services, &self.node);
        let mut hs = self.health.lock().unwrap_or_else(|p| p.into_inner());
        hs.retain(|port, h| {
            let keep = want.contains_key(port) && h.addrs == addrs;
            if !keep {
                for t in &h.tasks {
                    t.abort();
                }
                tracing::info!("health check {port}/TCP closed");
            }
            keep
        });
        for (port, st) in want {
            if let Some(h) = hs.get(&port) {
                *h.state.lock().unwrap_or_else(|p| p.into_inner()) = st;
                continue;
            }
            let state = Arc::new(Mutex::new(st));
            let tasks = addrs
                .iter()
                .map(|&ip| self.rt.spawn(health(ip, port, state.clone())))
                .collect();
            hs.insert(
                port,
                Health {
                    state,
                    tasks,
                    addrs: addrs.clone(),
                },
            );
        }
    }
}

/// Serves one Service's health check on `ip`:`port` (the NodePorts' addresses, as kube-proxy's
/// health server follows nodePortAddresses).
async fn health(ip: IpAddr, port: u16, state: Arc<Mutex<HealthState>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let bind = || TcpListener::bind((ip, port));
    let listener = match retry_in_use(bind).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("health check {port}/TCP: cannot listen: {e}");
            return;
        }
    };
    tracing::info!("health check {port}/TCP listening");
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            // The request itself does not matter (any path, any method), but it is read so
            // that closing does not reset the connection under an unread request.
            let mut buf = [0u8; 2048];
            let mut seen = 0;
            let read = async {
                while let Ok(n) = conn.read(&mut buf[seen..]).await {
                    if n == 0 {
                        break;
                    }
                    seen += n;
                    if buf[..seen].windows(4).any(|w| w == b"\r\n\r\n") || seen == buf.len() {
                        break;
                    }
                }
            };
            if tokio::time::timeout(Duration::from_secs(5), read)
                .await
                .is_err()
            {
                return;
            }
            let resp = health_response(&state.lock().unwrap_or_else(|p| p.into_inner()));
            let _ = conn.write_all(resp.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

/// How long a NodePort waits for its port while another process still holds it: the
/// vswitchd this one took the node over from lets go of its listeners as it hands over, but a
/// UDP flow of its relay may hold the socket a moment longer.
const BIND_PATIENCE: Duration = Duration::from_secs(10);

/// `bind()`, again every 100 ms while the address is in use, for up to [`BIND_PATIENCE`].
pub(crate) async fn retry_in_use<T, F, Fut>(bind: F) -> std::io::Result<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + BIND_PATIENCE;
    loop {
        match bind().await {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            r => return r,
        }
    }
}

async fn tcp(ip: IpAddr, port: u16, target: Arc<Mutex<Target>>, rules: Rules) {
    let bind = || TcpListener::bind((ip, port));
    let listener = match retry_in_use(bind).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("port {port}/TCP: cannot listen: {e}");
            return;
        }
    };
    tracing::info!("port {port}/TCP listening on {ip}");
    serve_tcp(listener, port, target, rules).await
}

/// Relays each connection `listener` accepts.
async fn serve_tcp(listener: TcpListener, port: u16, target: Arc<Mutex<Target>>, rules: Rules) {
    loop {
        let (mut client, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("port {port}/TCP: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(dest) = pick(&target, &from) else {
            // The last endpoint went a moment ago (the listener closes with the next
            // reconcile): reset, as a refused connection.
            let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
            continue;
        };
        let transparent = transparent(&target, &rules, TCP, from, dest);
        tokio::spawn(async move {
            let connect = tokio::time::timeout(
                Duration::from_secs(10),
                connect_from(transparent.then_some(from.ip()), dest),
            );
            let mut backend = match connect.await {
                Ok(Ok(b)) => b,
                _ => return,
            };
            let _ = client.set_nodelay(true);
            let _ = backend.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
        });
    }
}

/// Connects to `dest`, from the client's address `from` when given (IP_TRANSPARENT); if the
/// kernel refuses that, from the node's.
async fn connect_from(from: Option<IpAddr>, dest: SocketAddr) -> std::io::Result<TcpStream> {
    if let Some(IpAddr::V4(client)) = from {
        let transparent = (|| -> std::io::Result<tokio::net::TcpSocket> {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.set_ip_transparent_v4(true)?;
            s.set_nonblocking(true)?;
            s.bind(&SocketAddr::new(IpAddr::V4(client), 0).into())?;
            Ok(tokio::net::TcpSocket::from_std_stream(s.into()))
        })();
        match transparent {
            Ok(sock) => return sock.connect(dest).await,
            Err(e) => tracing::debug!("transparent relay socket: {e}"),
        }
    }
    TcpStream::connect(dest).await
}

/// A UDP socket for one client flow, sending from the client's address when given.
async fn udp_from(from: Option<IpAddr>) -> std::io::Result<UdpSocket> {
    if let Some(IpAddr::V4(client)) = from {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
        if s.set_ip_transparent_v4(true).is_ok()
            && s.bind(&SocketAddr::new(IpAddr::V4(client), 0).into())
                .is_ok()
        {
            s.set_nonblocking(true)?;
            return UdpSocket::from_std(s.into());
        }
    }
    UdpSocket::bind("0.0.0.0:0").await
}

/// Replaces the return rules for `have` by those for `want`: replies from those ports that
/// arrive on the host port are delivered locally, to the relay's transparent sockets.
async fn return_rules(
    host_if: &str,
    have: &std::collections::BTreeSet<(u8, u16)>,
    want: &std::collections::BTreeSet<(u8, u16)>,
) -> Result<(), String> {
    use rtnetlink::packet_route::route::RouteType;
    use rtnetlink::packet_route::rule::{RuleAttribute, RulePortRange};
    use rtnetlink::packet_route::IpProtocol as NlProto;
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| e.to_string())?;
    let task = tokio::spawn(conn);
    let result = async {
        if !want.is_empty() {
            let lo = crate::datapath::tap::interface_index("lo").ok_or("no lo")?;
            let route = rtnetlink::RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .destination_prefix(std::net::Ipv4Addr::UNSPECIFIED, 0)
                .output_interface(lo)
                .table_id(TPROXY_TABLE)
                .kind(RouteType::Local)
                .scope(rtnetlink::packet_route::route::RouteScope::Host)
                .build();
            if let Err(e) = handle.route().add(route).replace().execute().await {
                return Err(format!("local route in table {TPROXY_TABLE}: {e}"));
            }
        }
        let rule = |(proto, port): (u8, u16)| {
            let mut r = handle
                .rule()
                .add()
                .v4()
                .input_interface(host_if.to_string())
                .table_id(TPROXY_TABLE)
                .priority(TPROXY_PRIORITY)
                .action(rtnetlink::packet_route::rule::RuleAction::ToTable);
            let m = r.message_mut();
            m.attributes
                .push(RuleAttribute::IpProtocol(if proto == TCP {
                    NlProto::Tcp
                } else {
                    NlProto::Udp
                }));
            m.attributes
                .push(RuleAttribute::SourcePortRange(RulePortRange {
                    start: port,
                    end: port,
                }));
            r
        };
        for &(proto, port) in want.difference(have) {
            if let Err(e) = rule((proto, port)).execute().await {
                // Left by an earlier run of the daemon: already what we want.
                if !e.to_string().contains("File exists") {
                    return Err(format!("rule for source port {port}: {e}"));
                }
            }
        }
        for &key in have.difference(want) {
            let msg = rule(key).message_mut().clone();
            let _ = handle.rule().del(msg).execute().await;
        }
        Ok(())
    }
    .await;
    task.abort();
    result
}

async fn udp(ip: IpAddr, port: u16, target: Arc<Mutex<Target>>, idle: Duration, rules: Rules) {
    let bind = || UdpSocket::bind((ip, port));
    let sock = match retry_in_use(bind).await {
        Ok(s) => Arc::new(s),
        Err(e) => {
            tracing::error!("port {port}/UDP: cannot bind: {e}");
            return;
        }
    };
    tracing::info!("port {port}/UDP listening on {ip}");
    serve_udp(sock, target, idle, rules).await
}

/// Relays each client flow that reaches `sock`.
async fn serve_udp(sock: Arc<UdpSocket>, target: Arc<Mutex<Target>>, idle: Duration, rules: Rules) {
    let flows: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>> = Default::default();
    // The flows' reply tasks end with this task: a NodePort closed (its last endpoint gone)
    // lets go of its port at once, so it can listen again as soon as an endpoint is back.
    let mut reply_tasks = tokio::task::JoinSet::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        while reply_tasks.try_join_next().is_some() {}
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(_) => continue,
        };
        let existing = flows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&from)
            .cloned();
        let up = match existing {
            Some(u) => u,
            None => {
                let Some(dest) = pick(&target, &from) else {
                    continue;
                };
                let transparent = transparent(&target, &rules, UDP, from, dest);
                let Ok(u) = udp_from(transparent.then_some(from.ip())).await else {
                    continue;
                };
                if u.connect(dest).await.is_err() {
                    continue;
                }
                let u = Arc::new(u);
                flows
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(from, u.clone());
                // Replies flow back until the flow is idle.
                let (down, flows2, u2) = (sock.clone(), flows.clone(), u.clone());
                reply_tasks.spawn(async move {
                    let mut b = vec![0u8; 65_536];
                    while let Ok(Ok(m)) = tokio::time::timeout(idle, u2.recv(&mut b)).await {
                        let _ = down.send_to(&b[..m], from).await;
                    }
                    flows2
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&from);
                });
                u
            }
        };
        let _ = up.send(&buf[..n]).await;
    }
}

#[cfg(test)]
mod tests {
    //! Where NodePorts relay, modelled on kube-proxy's proxier tests of externalTrafficPolicy
    //! (TestOnlyLocalNodePorts, TestExternalTrafficPolicyCluster) and its service health
    //! server's tests (healthcheck_test.go).
    use std::net::{IpAddr, Ipv4Addr};

    use conf::config::EndpointSpec;

    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
    const B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);

    fn ep(ip: Ipv4Addr, node: &str, ready: bool, terminating: bool) -> EndpointSpec {
        EndpointSpec {
            ip: IpAddr::V4(ip),
            node: Some(node.into()),
            ready,
            serving: ready || terminating,
            terminating,
            hostname: None,
            ports: None,
            for_zones: Vec::new(),
            for_nodes: Vec::new(),
        }
    }

    fn svc(itp: TrafficPolicy, etp: TrafficPolicy, eps: Vec<EndpointSpec>) -> ServiceSpec {
        let mut s = crate::testutil::service(
            "default",
            "web",
            Ipv4Addr::new(10, 96, 0, 20),
            Protocol::Tcp,
            [],
            None,
        );
        s.ports[0].node_port = Some(30080);
        s.internal_traffic_policy = itp;
        s.external_traffic_policy = etp;
        s.health_check_node_port = (etp == TrafficPolicy::Local).then_some(32000);
        s.endpoints = eps;
        s
    }

    fn dests(s: ServiceSpec, node: &str) -> Option<Vec<String>> {
        targets(&[s], node, None)
            .remove(&(Protocol::Tcp, 30080))
            .map(|t| t.dests.iter().map(|d| d.to_string()).collect())
    }

    #[test]
    fn cluster_policy_relays_through_the_cluster_ip_unless_it_would_not_serve_as_cluster() {
        use TrafficPolicy::*;
        let eps = || vec![ep(A, "n1", true, false), ep(B, "n2", true, false)];
        assert_eq!(
            dests(svc(Cluster, Cluster, eps()), "n1").unwrap(),
            ["10.96.0.20:80"]
        );
        // ITP Local must not leak into a Cluster NodePort: the relay goes to every endpoint.
        assert_eq!(
            dests(svc(Local, Cluster, eps()), "n3").unwrap(),
            ["10.244.1.10:8080", "10.244.2.10:8080"]
        );
        // ClientIP affinity: the relay chooses by the client's address, not the ClusterIP by
        // the node's.
        let mut s = svc(Cluster, Cluster, eps());
        s.session_affinity_timeout = Some(600);
        let t = targets(&[s], "n1", None)
            .remove(&(Protocol::Tcp, 30080))
            .unwrap();
        assert_eq!(t.dests.len(), 2);
        let target = Mutex::new(t);
        let client = |port| SocketAddr::new(IpAddr::from([198, 51, 100, 1]), port);
        let first = pick(&target, &client(1000));
        assert!((1001..1100).all(|p| pick(&target, &client(p)) == first));
    }

    #[test]
    fn local_policy_uses_local_endpoints_then_terminating_ones_then_refuses() {
        use TrafficPolicy::*;
        let eps = vec![ep(A, "n1", false, true), ep(B, "n2", true, false)];
        // The last local endpoint is terminating but serving: still served (KEP-1669).
        assert_eq!(
            dests(svc(Cluster, Local, eps.clone()), "n1").unwrap(),
            ["10.244.1.10:8080"]
        );
        // No local endpoint at all: no listener, so the kernel refuses the connection.
        assert_eq!(dests(svc(Cluster, Local, eps), "n3"), None);
        // Nor for policy Cluster with no endpoint anywhere.
        assert_eq!(dests(svc(Cluster, Cluster, vec![]), "n1"), None);
    }

    #[test]
    fn the_health_check_counts_local_ready_endpoints() {
        use TrafficPolicy::*;
        let s = svc(
            Cluster,
            Local,
            vec![ep(A, "n1", true, false), ep(B, "n2", true, false)],
        );
        let st = health_states(std::slice::from_ref(&s), "n1")
            .remove(&32000)
            .unwrap();
        assert_eq!(st.local_endpoints, 1);
        let r = health_response(&st);
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        let body: serde_json::Value =
            serde_json::from_str(r.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"service": {"namespace": "default", "name": "web"},
                               "localEndpoints": 1, "serviceProxyHealthy": true})
        );
        // Terminating local endpoints still serve but do not count: the balancer drains.
        let mut draining = s.clone();
        draining.endpoints = vec![ep(A, "n1", false, true)];
        let st = health_states(&[draining], "n1").remove(&32000).unwrap();
        assert_eq!(st.local_endpoints, 0);
        assert!(health_response(&st).starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        // Policy Cluster has no health check.
        let mut cluster = s;
        cluster.external_traffic_policy = Cluster;
        assert!(health_states(&[cluster], "n1").is_empty());
    }

    #[test]
    fn node_port_addresses_pick_the_node_s_addresses_in_them() {
        assert_eq!(listen_addrs(&[]), [IpAddr::from([0, 0, 0, 0])]);
        let lo: Vec<ipnet::IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
        assert!(listen_addrs(&lo).contains(&IpAddr::from([127, 0, 0, 1])));
        let none: Vec<ipnet::IpNet> = vec!["0.0.0.0/32".parse().unwrap()];
        assert!(listen_addrs(&none).is_empty());
    }
}
