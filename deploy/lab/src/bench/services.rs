//! vswitch's Services in the bench: a ClusterIP whose one endpoint is the iperf3 server's pod,
//! written into every node's config and applied by the live reload.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::thread;
use std::time::{Duration, Instant};

use conf::config::{EndpointSpec, Protocol, ServicePort, ServiceSpec};

use super::testbed::{Bed, Testbed};
use super::PodRef;
use crate::{LabError, Node};

impl Testbed {
    /// A ClusterIP that load-balances to `backend`'s `port`, when this datapath has services.
    ///
    /// For vswitch: a Service `bench/iperf` with `backend` as its one endpoint goes into every
    /// node's config file (replacing the one of an earlier repetition), and this waits until
    /// every node's reload has applied it. The kernel and OVS paths have none: kube-proxy-style
    /// rules are not part of their anchors.
    pub(super) fn cluster_ip(&self, backend: &PodRef, port: u16) -> Result<SocketAddr, LabError> {
        let lab = match &self.bed {
            Some(Bed::Vswitch(lab)) => lab,
            Some(Bed::Script { .. }) => {
                return Err(LabError::Measurement(
                    "the anchor topology has no service proxy".into(),
                ))
            }
            None => return Err(LabError::Measurement("the testbed is down".into())),
        };
        let vip = SocketAddr::from((Ipv4Addr::new(10, 96, 1, 1), port));
        let node = lab
            .nodes
            .iter()
            .find(|n| n.pod_cidr.contains(&backend.ip))
            .ok_or_else(|| LabError::Measurement(format!("no node has pod {}", backend.ip)))?;
        let service = iperf_service(vip, backend.ip.into(), &node.name);
        for n in &lab.nodes {
            put_service(n, &service)?;
        }
        let want = vec![format!("{}:{port}", backend.ip)];
        let deadline = Instant::now() + Duration::from_secs(10);
        for n in &lab.nodes {
            wait_applied(n, vip, &want, deadline)?;
        }
        Ok(vip)
    }
}

/// The Service `bench/iperf`: `vip` to `backend` (on `node`), same port.
fn iperf_service(vip: SocketAddr, backend: IpAddr, node: &str) -> ServiceSpec {
    ServiceSpec {
        namespace: "bench".into(),
        name: "iperf".into(),
        cluster_ips: vec![vip.ip()],
        ports: vec![ServicePort {
            name: None,
            protocol: Protocol::Tcp,
            port: vip.port(),
            target_port: Some(vip.port()),
            node_port: None,
        }],
        external_ips: Vec::new(),
        session_affinity_timeout: None,
        internal_traffic_policy: Default::default(),
        external_traffic_policy: Default::default(),
        load_balancer_ips: Vec::new(),
        health_check_node_port: None,
        proxy_name: None,
        endpoints: vec![EndpointSpec {
            ip: backend,
            node: Some(node.to_string()),
            ready: true,
            serving: true,
            terminating: false,
            hostname: None,
            ports: None,
            for_zones: Vec::new(),
            for_nodes: Vec::new(),
        }],
    }
}

/// Puts `service` into `node`'s config in place of an earlier `bench/iperf`.
fn put_service(node: &Node, service: &ServiceSpec) -> Result<(), LabError> {
    let mut config =
        conf::Config::load(&node.config).map_err(|e| LabError::Measurement(e.to_string()))?;
    config
        .services
        .retain(|s| (s.namespace.as_str(), s.name.as_str()) != ("bench", "iperf"));
    config.services.push(service.clone());
    let text = toml::to_string(&config).map_err(|e| LabError::Measurement(e.to_string()))?;
    // Renamed into place: the reload never reads half a file.
    crate::files::write_atomic(&node.config, text.as_bytes())
}

/// Waits until `node` load-balances `vip` to `want` (its backends), until `deadline`.
fn wait_applied(
    node: &Node,
    vip: SocketAddr,
    want: &[String],
    deadline: Instant,
) -> Result<(), LabError> {
    loop {
        let got: Result<conf::api::ServicesResponse, _> = node
            .client()
            .with_timeout(Duration::from_secs(1))
            .get(conf::api::PATH_SERVICES);
        let applied = got.as_ref().is_ok_and(|r| {
            r.frontends
                .iter()
                .any(|f| f.vip == vip.ip() && f.port == vip.port() && f.backends == want)
        });
        if applied {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(LabError::Measurement(format!(
                "{}: Service {vip} -> {} not applied after 10 s: {got:?}",
                node.name, want[0]
            )));
        }
        thread::sleep(Duration::from_millis(50));
    }
}
