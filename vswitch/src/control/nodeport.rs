//! NodePort: Services reachable at any node's address, without iptables or IPVS.
//!
//! Traffic for a NodePort arrives addressed to the node itself, so the node's kernel, not the
//! switch, receives it; with no packet-rewriting hooks allowed, the switch takes it at the
//! socket layer, as kube-proxy's original userspace mode did: one listener per NodePort on the
//! node, and each connection (TCP) or client flow (UDP) relayed to the Service. With the
//! default `externalTrafficPolicy: Cluster` the relay connects to the ClusterIP, which the node
//! routes into the switch through the host port, where the switch translates it like any other
//! Service connection (to a backend on any node). With `Local` it connects only to an endpoint
//! on this node, and refuses (closes) when there is none, so the client's load balancer can
//! fail over.
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
//! runtime, never on the datapath threads.

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
    /// Candidate destinations: the ClusterIP, or the local endpoints for policy Local.
    dests: Vec<SocketAddr>,
    /// `externalTrafficPolicy: Local`.
    local: bool,
    /// Send from the client's address (policy Local, with the return route in place).
    transparent: bool,
}

type Rules = Arc<Mutex<std::collections::BTreeSet<(u8, u16)>>>;
const TCP: u8 = 6;
const UDP: u8 = 17;

/// The routing table that delivers endpoints' replies to transparent relay sockets.
const TPROXY_TABLE: u32 = 1009;
const TPROXY_PRIORITY: u32 = 1009;

type Key = (Protocol, u16);

struct Listener {
    target: Arc<Mutex<Target>>,
    task: JoinHandle<()>,
}

/// The NodePort listeners of this node, kept in step with the Services.
pub struct NodePorts {
    rt: tokio::runtime::Handle,
    node: String,
    udp_idle: Duration,
    listeners: Mutex<HashMap<Key, Listener>>,
    /// The host port, through which endpoints' replies reach the node; None: no transparency.
    host_if: Option<String>,
    /// (IP protocol, target port) pairs with a return rule installed.
    rules: Rules,
}

fn targets(services: &[ServiceSpec], node: &str) -> HashMap<Key, Target> {
    let mut out = HashMap::new();
    for s in services {
        for p in &s.ports {
            let Some(np) = p.node_port else { continue };
            if p.protocol == Protocol::Sctp {
                continue;
            }
            let local = s.external_traffic_policy == TrafficPolicy::Local;
            let dests = if local {
                let target = p.target_port.unwrap_or(p.port);
                s.endpoints
                    .iter()
                    .filter(|e| e.ready && e.node.as_deref() == Some(node))
                    .map(|e| SocketAddr::new(e.ip, target))
                    .collect()
            } else {
                s.cluster_ips
                    .iter()
                    .filter(|ip| ip.is_ipv4())
                    .map(|ip| SocketAddr::new(*ip, p.port))
                    .collect()
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
                },
            );
        }
    }
    out
}

fn pick(target: &Mutex<Target>, salt: u64) -> Option<SocketAddr> {
    let t = target.lock().unwrap_or_else(|p| p.into_inner());
    if t.dests.is_empty() {
        return None;
    }
    Some(t.dests[(salt % t.dests.len() as u64) as usize])
}

/// Whether to send from the client's address: policy Local, and only with the return route
/// for (`proto`, `port`) in place, otherwise the replies would be lost.
fn transparent(target: &Mutex<Target>, rules: &Rules, proto: u8, port: u16) -> bool {
    target.lock().unwrap_or_else(|p| p.into_inner()).transparent
        && rules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&(proto, port))
}

fn salt_of(addr: &SocketAddr) -> u64 {
    use std::hash::BuildHasher;
    foldhash::fast::RandomState::default().hash_one(addr)
}

impl NodePorts {
    pub fn new(
        rt: tokio::runtime::Handle,
        node: String,
        udp_idle: Duration,
        host_if: Option<String>,
    ) -> Self {
        NodePorts {
            rt,
            node,
            udp_idle,
            listeners: Mutex::new(HashMap::new()),
            host_if,
            rules: Arc::default(),
        }
    }

    /// Installs (and removes) the return rules for the target ports of Local TCP NodePorts.
    fn sync_rules(&self, services: &[ServiceSpec]) {
        let Some(host_if) = self.host_if.clone() else {
            return;
        };
        let want: std::collections::BTreeSet<(u8, u16)> = services
            .iter()
            .filter(|s| s.external_traffic_policy == TrafficPolicy::Local)
            .flat_map(|s| s.ports.iter())
            .filter(|p| p.node_port.is_some())
            .filter_map(|p| {
                let proto = match p.protocol {
                    Protocol::Tcp => TCP,
                    Protocol::Udp => UDP,
                    Protocol::Sctp => return None,
                };
                Some((proto, p.target_port.unwrap_or(p.port)))
            })
            .collect();
        let rules = self.rules.clone();
        self.rt.spawn(async move {
            let have = rules.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if want == have {
                return;
            }
            match return_rules(&host_if, &have, &want).await {
                Ok(()) => *rules.lock().unwrap_or_else(|e| e.into_inner()) = want,
                Err(e) => tracing::warn!(
                    "NodePort policy Local: cannot route endpoints' replies back to the relay \
                     ({e}); the client's address is not kept"
                ),
            }
        });
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
        let tasks: Vec<JoinHandle<()>> = {
            let mut ls = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
            ls.drain().map(|(_, l)| l.task).collect()
        };
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
    }

    /// Opens listeners for new NodePorts, closes those that went away, and points the rest at
    /// their current destinations.
    pub fn reconcile(&self, services: &[ServiceSpec]) {
        self.sync_rules(services);
        let mut want = targets(services, &self.node);
        if self.host_if.is_none() {
            for t in want.values_mut() {
                t.transparent = false;
            }
        }
        let mut ls = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        ls.retain(|k, l| {
            let keep = want.contains_key(k);
            if !keep {
                l.task.abort();
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
            let task = match k.0 {
                Protocol::Tcp => self.rt.spawn(tcp(k.1, target.clone(), self.rules.clone())),
                _ => self
                    .rt
                    .spawn(udp(k.1, target.clone(), self.udp_idle, self.rules.clone())),
            };
            ls.insert(k, Listener { target, task });
        }
    }
}

/// How long a NodePort waits for its port while another process still holds it: the
/// vswitchd this one took the node over from lets go of its listeners as it hands over, but a
/// UDP flow of its relay may hold the socket a moment longer.
const BIND_PATIENCE: Duration = Duration::from_secs(10);

/// `bind()`, again every 100 ms while the address is in use, for up to [`BIND_PATIENCE`].
async fn retry_in_use<T, F, Fut>(bind: F) -> std::io::Result<T>
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

async fn tcp(port: u16, target: Arc<Mutex<Target>>, rules: Rules) {
    let bind = || TcpListener::bind((IpAddr::from([0, 0, 0, 0]), port));
    let listener = match retry_in_use(bind).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("NodePort {port}/TCP: cannot listen: {e}");
            return;
        }
    };
    tracing::info!("NodePort {port}/TCP listening");
    loop {
        let (mut client, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("NodePort {port}/TCP: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(dest) = pick(&target, salt_of(&from)) else {
            // No (local) endpoint: close at once, as a rejected connection.
            continue;
        };
        let transparent = transparent(&target, &rules, TCP, dest.port());
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

async fn udp(port: u16, target: Arc<Mutex<Target>>, idle: Duration, rules: Rules) {
    let bind = || UdpSocket::bind((IpAddr::from([0, 0, 0, 0]), port));
    let sock = match retry_in_use(bind).await {
        Ok(s) => Arc::new(s),
        Err(e) => {
            tracing::error!("NodePort {port}/UDP: cannot bind: {e}");
            return;
        }
    };
    tracing::info!("NodePort {port}/UDP listening");
    let flows: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>> = Default::default();
    let mut buf = vec![0u8; 65_536];
    loop {
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
                let Some(dest) = pick(&target, salt_of(&from)) else {
                    continue;
                };
                let transparent = transparent(&target, &rules, UDP, dest.port());
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
                tokio::spawn(async move {
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
