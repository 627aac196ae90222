//! vswitch's Services in the bench: a ClusterIP whose one endpoint is the iperf3 server's pod,
//! written into every node's config and applied by the live reload.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::thread;
use std::time::{Duration, Instant};

use super::testbed::{Bed, Testbed};
use super::PodRef;

impl Testbed {
    /// A ClusterIP that load-balances to `backend`'s `port`, when this datapath has services.
    ///
    /// For vswitch: a Service `bench/iperf` with `backend` as its one endpoint goes into every
    /// node's config file (replacing the one of an earlier repetition), and this waits until
    /// every node's reload has applied it. The kernel and OVS paths have none: kube-proxy-style
    /// rules are not part of their anchors.
    pub(super) fn cluster_ip(&self, backend: &PodRef, port: u16) -> Result<SocketAddr, String> {
        let lab = match &self.bed {
            Some(Bed::Vswitch(lab)) => lab,
            Some(Bed::Script { .. }) => {
                return Err("the anchor topology has no service proxy".into())
            }
            None => return Err("the testbed is down".into()),
        };
        let vip = SocketAddr::from((Ipv4Addr::new(10, 96, 1, 1), port));
        let node = lab
            .nodes
            .iter()
            .find(|n| n.pod_cidr.contains(&backend.ip))
            .ok_or_else(|| format!("no node has pod {}", backend.ip))?;
        let service = conf::config::ServiceSpec {
            namespace: "bench".into(),
            name: "iperf".into(),
            cluster_ips: vec![vip.ip()],
            ports: vec![conf::config::ServicePort {
                name: None,
                protocol: conf::config::Protocol::Tcp,
                port,
                target_port: Some(port),
                node_port: None,
            }],
            external_ips: Vec::new(),
            session_affinity_timeout: None,
            internal_traffic_policy: Default::default(),
            external_traffic_policy: Default::default(),
            endpoints: vec![conf::config::EndpointSpec {
                ip: backend.ip.into(),
                node: Some(node.name.clone()),
                ready: true,
                serving: true,
                terminating: false,
                hostname: None,
            }],
        };
        for n in &lab.nodes {
            let mut config = conf::Config::load(&n.config).map_err(|e| e.to_string())?;
            config
                .services
                .retain(|s| (s.namespace.as_str(), s.name.as_str()) != ("bench", "iperf"));
            config.services.push(service.clone());
            let text = toml::to_string(&config).map_err(|e| e.to_string())?;
            // Renamed into place: the reload never reads half a file.
            let tmp = n.config.with_extension("toml.tmp");
            fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
            fs::rename(&tmp, &n.config).map_err(|e| format!("{}: {e}", n.config.display()))?;
        }
        let want = vec![format!("{}:{port}", backend.ip)];
        let deadline = Instant::now() + Duration::from_secs(10);
        for n in &lab.nodes {
            loop {
                let got: Result<conf::api::ServicesResponse, _> = n
                    .client()
                    .with_timeout(Duration::from_secs(1))
                    .get(conf::api::PATH_SERVICES);
                let applied = got.as_ref().is_ok_and(|r| {
                    r.frontends
                        .iter()
                        .any(|f| f.vip == vip.ip() && f.port == port && f.backends == want)
                });
                if applied {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "{}: Service {vip} -> {} not applied after 10 s: {got:?}",
                        n.name, want[0]
                    ));
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(vip)
    }
}
