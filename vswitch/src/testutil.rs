//! Fixtures shared by the unit tests, the integration tests (`tests/`) and the benchmarks
//! (`benches/`), which cannot share a `#[cfg(test)]` module: Service specs as the control plane
//! would hand them over. Not part of the daemon's API (hidden from the docs).

use std::net::{IpAddr, Ipv4Addr};

use conf::config::{EndpointSpec, Protocol, ServicePort, ServiceSpec};

/// The Service `namespace/name` on `vip`, port 80 to target port 8080 over `proto`, with a
/// ready endpoint on each of `backends` and the given ClientIP affinity timeout.
pub fn service(
    namespace: &str,
    name: &str,
    vip: Ipv4Addr,
    proto: Protocol,
    backends: impl IntoIterator<Item = Ipv4Addr>,
    affinity: Option<u32>,
) -> ServiceSpec {
    ServiceSpec {
        namespace: namespace.into(),
        name: name.into(),
        cluster_ips: vec![IpAddr::V4(vip)],
        ports: vec![ServicePort {
            name: Some("http".into()),
            protocol: proto,
            port: 80,
            target_port: Some(8080),
            node_port: None,
        }],
        external_ips: vec![],
        session_affinity_timeout: affinity,
        internal_traffic_policy: Default::default(),
        external_traffic_policy: Default::default(),
        load_balancer_ips: Vec::new(),
        health_check_node_port: None,
        proxy_name: None,
        endpoints: backends
            .into_iter()
            .map(|ip| EndpointSpec {
                ip: IpAddr::V4(ip),
                node: None,
                ready: true,
                serving: true,
                terminating: false,
                hostname: None,
                ports: None,
                for_zones: Vec::new(),
                for_nodes: Vec::new(),
            })
            .collect(),
    }
}

/// The address of Service `i` of [`many_services`]: 10.96.0.0 + i + 1.
pub fn many_services_vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0a60_0000u32 + i as u32 + 1)
}

/// `n` TCP Services `bench/svc-<i>` of 10 endpoints each, on [`many_services_vip`]: the
/// 10,000-Service table whose cost the benchmark measures.
pub fn many_services(n: usize) -> Vec<ServiceSpec> {
    (0..n)
        .map(|i| {
            let backends = (0..10)
                .map(|e| Ipv4Addr::new(10, 244, 2 + (e % 4) as u8, 10 + (i % 200) as u8 + e as u8));
            let name = format!("svc-{i}");
            service(
                "bench",
                &name,
                many_services_vip(i),
                Protocol::Tcp,
                backends,
                None,
            )
        })
        .collect()
}
