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
//! The relay terminates the client's connection, so the backend sees the node as the client:
//! the client's source address is not kept. Keeping it would need the relay's sockets to send
//! from the client's address (IP_TRANSPARENT) and policy routing that delivers the backend's
//! replies back to them; that is not done. It runs on the control-plane runtime, never on the
//! datapath threads.

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
    /// Candidate destinations: the ClusterIP, or the local endpoints for policy Local.
    dests: Vec<SocketAddr>,
}

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
}

fn targets(services: &[ServiceSpec], node: &str) -> HashMap<Key, Target> {
    let mut out = HashMap::new();
    for s in services {
        for p in &s.ports {
            let Some(np) = p.node_port else { continue };
            if p.protocol == Protocol::Sctp {
                continue;
            }
            let dests = if s.external_traffic_policy == TrafficPolicy::Local {
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
            out.insert((p.protocol, np), Target { dests });
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

fn salt_of(addr: &SocketAddr) -> u64 {
    use std::hash::BuildHasher;
    foldhash::fast::RandomState::default().hash_one(addr)
}

impl NodePorts {
    pub fn new(rt: tokio::runtime::Handle, node: String, udp_idle: Duration) -> Self {
        NodePorts {
            rt,
            node,
            udp_idle,
            listeners: Mutex::new(HashMap::new()),
        }
    }

    /// Opens listeners for new NodePorts, closes those that went away, and points the rest at
    /// their current destinations.
    pub fn reconcile(&self, services: &[ServiceSpec]) {
        let want = targets(services, &self.node);
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
                Protocol::Tcp => self.rt.spawn(tcp(k.1, target.clone())),
                _ => self.rt.spawn(udp(k.1, target.clone(), self.udp_idle)),
            };
            ls.insert(k, Listener { target, task });
        }
    }
}

async fn tcp(port: u16, target: Arc<Mutex<Target>>) {
    let listener = match TcpListener::bind((IpAddr::from([0, 0, 0, 0]), port)).await {
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
        tokio::spawn(async move {
            let connect = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(dest));
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

async fn udp(port: u16, target: Arc<Mutex<Target>>, idle: Duration) {
    let sock = match UdpSocket::bind((IpAddr::from([0, 0, 0, 0]), port)).await {
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
                let Ok(u) = UdpSocket::bind("0.0.0.0:0").await else {
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
