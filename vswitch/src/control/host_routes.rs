//! The node's routes into the switch through the host port, kept in step with the cluster.
//!
//! The node reaches its own pods through `vsw0` (its address is on the pod CIDR). To reach pods
//! on other nodes and Services (a NodePort relay dialling a ClusterIP, the API server calling a
//! webhook pod, a host-network client) it needs routes into the switch as well, which flannel
//! adds per node subnet and kube-proxy makes unnecessary with its netfilter rules. vswitch takes
//! them from what it already knows, so no user has to name the cluster's CIDRs: a route per
//! peer's pod CIDR and a host route per ClusterIP, each left out where a configured route of
//! `[host] routes` covers it (a configured cluster or Service CIDR makes them unnecessary).
//! Each `externalIPs` and LoadBalancer ingress address gets a host route too: traffic for it
//! that the network routes to this node (a cloud or MetalLB balancer, a static route) is
//! forwarded into the switch, which translates it as kube-proxy would.
//!
//! The routes are applied off the caller's thread, newest wanted set first (a burst of changes
//! collapses into one pass), by a thread of their own that diffs against what it installed; a
//! route the kernel already has (a configured one, one left by an earlier vswitchd) counts as
//! installed.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::{Arc, Condvar, Mutex};

use conf::config::{PeerSpec, ServiceSpec};
use ipnet::{IpNet, Ipv4Net};

/// The routes the node should have through the host port beyond `configured`: each peer's
/// pod CIDRs and each ClusterIP, external IP and LoadBalancer address, unless a configured route or the node's own pod CIDR covers
/// it.
pub fn wanted<S: std::borrow::Borrow<ServiceSpec>>(
    configured: &[IpNet],
    own: Ipv4Net,
    peers: &[PeerSpec],
    services: &[S],
) -> BTreeSet<Ipv4Net> {
    let covered: Vec<Ipv4Net> = configured
        .iter()
        .filter_map(|n| match n {
            IpNet::V4(n) => Some(*n),
            IpNet::V6(_) => None,
        })
        .chain(std::iter::once(own))
        .collect();
    let free = |n: &Ipv4Net| !covered.iter().any(|c| c.contains(n));
    let cidrs = peers.iter().flat_map(|p| p.pod_cidrs.iter().copied());
    // A Service another proxy serves (service-proxy-name) is not the switch's to take.
    let vips = services
        .iter()
        .map(|s| s.borrow())
        .filter(|s| s.proxy_name.is_none())
        .flat_map(|s| {
            s.cluster_ips
                .iter()
                .chain(&s.external_ips)
                .chain(&s.load_balancer_ips)
        })
        .filter_map(|ip| match ip {
            IpAddr::V4(ip) if !ip.is_unspecified() => Ipv4Net::new(*ip, 32).ok(),
            _ => None,
        });
    cidrs.chain(vips).filter(free).collect()
}

#[derive(Default)]
struct Pending {
    want: Option<BTreeSet<Ipv4Net>>,
    stop: bool,
}

/// The thread that installs and removes the routes.
pub struct HostRoutes {
    pending: Arc<(Mutex<Pending>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HostRoutes {
    /// Starts the thread for the host port `ifname` (in this process's network namespace).
    pub fn start(ifname: String) -> std::io::Result<HostRoutes> {
        let pending: Arc<(Mutex<Pending>, Condvar)> = Arc::default();
        let p = pending.clone();
        let thread = std::thread::Builder::new()
            .name("vswitch-routes".into())
            .spawn(move || run(&ifname, &p))?;
        Ok(HostRoutes {
            pending,
            thread: Some(thread),
        })
    }

    /// Asks for exactly `want` (beyond the configured routes); returns at once.
    pub fn set(&self, want: BTreeSet<Ipv4Net>) {
        let (m, cv) = &*self.pending;
        m.lock().unwrap_or_else(|p| p.into_inner()).want = Some(want);
        cv.notify_one();
    }
}

impl Drop for HostRoutes {
    fn drop(&mut self) {
        let (m, cv) = &*self.pending;
        m.lock().unwrap_or_else(|p| p.into_inner()).stop = true;
        cv.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(ifname: &str, pending: &(Mutex<Pending>, Condvar)) {
    let (m, cv) = pending;
    let mut installed: BTreeSet<Ipv4Net> = BTreeSet::new();
    loop {
        let want = {
            let mut p = m.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if p.stop {
                    return;
                }
                if let Some(w) = p.want.take() {
                    break w;
                }
                p = cv.wait(p).unwrap_or_else(|p| p.into_inner());
            }
        };
        let add: Vec<Ipv4Net> = want.difference(&installed).copied().collect();
        let del: Vec<Ipv4Net> = installed.difference(&want).copied().collect();
        if add.is_empty() && del.is_empty() {
            continue;
        }
        match super::netconfig::sync_host_routes(ifname, &add, &del) {
            Ok(failed) => {
                for (r, e) in &failed {
                    tracing::warn!("host port route {r}: {e}");
                }
                installed = want;
                for (r, _) in failed {
                    installed.remove(&r);
                }
                tracing::info!(
                    "host port {ifname}: {} routes into the switch (+{} -{})",
                    installed.len(),
                    add.len(),
                    del.len()
                );
            }
            Err(e) => tracing::warn!("host port {ifname}: routes not updated: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn peer(name: &str, cidr: &str) -> PeerSpec {
        PeerSpec {
            name: name.into(),
            underlay_ip: "192.168.0.2".parse().unwrap(),
            vtep_mac: "02:00:00:00:00:02".into(),
            pod_cidrs: vec![cidr.parse().unwrap()],
            remote_checksum: true,
        }
    }

    fn service(ips: &[&str]) -> ServiceSpec {
        let mut s = crate::testutil::service(
            "default",
            "web",
            Ipv4Addr::new(10, 96, 0, 1),
            conf::config::Protocol::Tcp,
            [],
            None,
        );
        s.cluster_ips = ips.iter().map(|i| i.parse().unwrap()).collect();
        s
    }

    fn nets(v: &[&str]) -> BTreeSet<Ipv4Net> {
        v.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn peers_and_cluster_ips_are_routed_unless_a_configured_route_covers_them() {
        let own: Ipv4Net = "10.244.1.0/24".parse().unwrap();
        let peers = [peer("n2", "10.244.2.0/24"), peer("n3", "10.244.3.0/24")];
        let services = [
            service(&["10.96.0.10"]),
            service(&["10.96.5.5", "fd00::5"]),
            // Headless: nothing to route.
            service(&[]),
        ];
        assert_eq!(
            wanted(&[], own, &peers, &services),
            nets(&[
                "10.244.2.0/24",
                "10.244.3.0/24",
                "10.96.0.10/32",
                "10.96.5.5/32"
            ])
        );
        // External IPs and LoadBalancer addresses are routed in too.
        let mut lb = service(&["10.96.8.8"]);
        lb.external_ips = vec!["203.0.113.10".parse().unwrap()];
        lb.load_balancer_ips = vec!["203.0.113.20".parse().unwrap()];
        assert_eq!(
            wanted(&[], own, &[], &[lb]),
            nets(&["10.96.8.8/32", "203.0.113.10/32", "203.0.113.20/32"])
        );
        // Nor is a Service of another proxy.
        let mut meshed = service(&["10.96.7.7"]);
        meshed.proxy_name = Some("mesh".into());
        assert!(!wanted(&[], own, &peers, &[meshed]).contains(&"10.96.7.7/32".parse().unwrap()));
        // The shipped lab's routes cover everything: nothing more to add.
        let configured: Vec<IpNet> = vec![
            "10.244.0.0/16".parse().unwrap(),
            "10.96.0.0/12".parse().unwrap(),
        ];
        assert!(wanted(&configured, own, &peers, &services).is_empty());
        // A peer claiming the node's own CIDR gets no second route.
        assert!(wanted::<ServiceSpec>(&[], own, &[peer("bad", "10.244.1.0/25")], &[]).is_empty());
    }

    #[test]
    fn the_thread_stops_when_dropped_without_work() {
        let r = HostRoutes::start("vsw-none".into()).unwrap();
        drop(r);
    }

    #[test]
    fn a_missing_device_is_logged_not_fatal() {
        let r = HostRoutes::start("vsw-missing0".into()).unwrap();
        r.set(nets(&["10.99.0.0/24"]));
        r.set(nets(&["10.99.1.0/24"]));
        drop(r);
    }
}
