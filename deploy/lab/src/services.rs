//! Services in a lab: `vswitch-lab add-service NAME --port 80:8080 --endpoints n1-p2,n2-p1`.
//!
//! A lab runs vswitchd in static mode, where Services come from each node's config file and are
//! applied live when it changes. The lab keeps its Services in its state and writes them into
//! every node's config, so a user names pods instead of copying addresses and node names (the
//! README's example names a `node-2` no lab has), and every node agrees.

use std::net::{IpAddr, Ipv4Addr};

use conf::config::{EndpointSpec, Protocol, ServicePort, ServiceSpec, TrafficPolicy};

use crate::{Lab, LabError};

/// The namespace lab Services live in (the pods' own, as vswitchctl names them).
pub const NAMESPACE: &str = "default";

/// Where ClusterIPs are given from when the user names none: inside the lab's Service CIDR
/// (10.96.0.0/12), past the cluster DNS address 10.96.0.10.
const FIRST_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 100);

/// One `--port`: `PORT[:TARGET][/tcp|/udp]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortArg {
    pub port: u16,
    pub target: u16,
    pub protocol: Protocol,
}

impl std::str::FromStr for PortArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (ports, protocol) = match s.rsplit_once('/') {
            Some((p, proto)) => match proto.to_ascii_lowercase().as_str() {
                "tcp" => (p, Protocol::Tcp),
                "udp" => (p, Protocol::Udp),
                other => return Err(format!("protocol {other:?}: tcp or udp")),
            },
            None => (s, Protocol::Tcp),
        };
        let num = |t: &str| -> Result<u16, String> {
            t.parse::<u16>().ok().filter(|&n| n > 0).ok_or_else(|| {
                format!("{t:?} is not a port (1-65535); the form is PORT[:TARGET][/tcp|udp]")
            })
        };
        let (port, target) = match ports.split_once(':') {
            Some((p, t)) => (num(p)?, num(t)?),
            None => (num(ports)?, num(ports)?),
        };
        Ok(PortArg {
            port,
            target,
            protocol,
        })
    }
}

/// What `add-service` asks for.
#[derive(Debug, Clone)]
pub struct ServiceArgs {
    pub name: String,
    pub ports: Vec<PortArg>,
    /// Pod names as the lab knows them (n1-p2).
    pub endpoints: Vec<String>,
    pub cluster_ip: Option<Ipv4Addr>,
    /// A NodePort for the first port.
    pub node_port: Option<u16>,
}

impl Lab {
    /// Adds (or replaces) a Service whose endpoints are lab pods, writes it into every node's
    /// config, and waits until every node's vswitchd serves it.
    pub fn add_service(&mut self, args: &ServiceArgs) -> Result<ServiceSpec, LabError> {
        let bad = |m: String| LabError::BadService {
            name: args.name.clone(),
            message: m,
        };
        if args.ports.is_empty() {
            return Err(bad("give at least one --port".into()));
        }
        if args.endpoints.is_empty() {
            return Err(bad("give at least one pod in --endpoints".into()));
        }
        let mut endpoints = Vec::new();
        for pod in &args.endpoints {
            let p = self.try_pod(pod)?;
            let node = self.node_of(p)?;
            endpoints.push(EndpointSpec {
                ip: p.ip,
                node: Some(node.name.clone()),
                ready: true,
                serving: true,
                terminating: false,
                hostname: None,
            });
        }
        let others: Vec<&ServiceSpec> = self
            .services
            .iter()
            .filter(|s| s.name != args.name)
            .collect();
        let ip = match args.cluster_ip {
            Some(ip) => ip,
            None => (u32::from(FIRST_CLUSTER_IP)..)
                .map(Ipv4Addr::from)
                .find(|ip| {
                    !others
                        .iter()
                        .any(|s| s.cluster_ips.contains(&IpAddr::V4(*ip)))
                })
                .ok_or_else(|| bad("no ClusterIP left".into()))?,
        };
        let ports = args
            .ports
            .iter()
            .enumerate()
            .map(|(i, p)| ServicePort {
                name: (args.ports.len() > 1).then(|| format!("p{}", p.port)),
                protocol: p.protocol,
                port: p.port,
                target_port: Some(p.target),
                node_port: if i == 0 { args.node_port } else { None },
            })
            .collect();
        let spec = ServiceSpec {
            namespace: NAMESPACE.into(),
            name: args.name.clone(),
            cluster_ips: vec![IpAddr::V4(ip)],
            ports,
            external_ips: Vec::new(),
            session_affinity_timeout: None,
            internal_traffic_policy: TrafficPolicy::default(),
            external_traffic_policy: TrafficPolicy::default(),
            endpoints,
        };
        // The daemon's own checks (ClusterIP taken, NodePort range, ...) before any node sees it.
        let mut services: Vec<ServiceSpec> = others.into_iter().cloned().collect();
        services.push(spec.clone());
        self.set_services(services)?;
        Ok(spec)
    }

    /// Removes a Service added with [`Lab::add_service`] from every node.
    pub fn del_service(&mut self, name: &str) -> Result<(), LabError> {
        if !self.services.iter().any(|s| s.name == name) {
            return Err(LabError::BadService {
                name: name.into(),
                message: format!(
                    "no such Service in this lab (it has: {})",
                    if self.services.is_empty() {
                        "none".to_string()
                    } else {
                        self.services
                            .iter()
                            .map(|s| s.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                ),
            });
        }
        let rest = self
            .services
            .iter()
            .filter(|s| s.name != name)
            .cloned()
            .collect();
        self.set_services(rest)
    }

    /// Writes `services` into every node's config (checked first), saves the state, and waits
    /// until each vswitchd serves exactly them; if one does not, the previous Services are put
    /// back and the error says why.
    fn set_services(&mut self, services: Vec<ServiceSpec>) -> Result<(), LabError> {
        let before = std::mem::take(&mut self.services);
        if self.apiserver.is_some() {
            return match self.put_services(services.clone(), &before) {
                Ok(()) => Ok(()),
                Err(e) => {
                    let _ = self.put_services(before, &services);
                    Err(e)
                }
            };
        }
        match self.write_services(services) {
            Ok(()) => Ok(()),
            Err(e) => {
                // Best effort: the error that matters is the first one.
                let _ = self.write_services(before);
                Err(e)
            }
        }
    }

    fn write_services(&mut self, services: Vec<ServiceSpec>) -> Result<(), LabError> {
        let texts = self
            .nodes
            .iter()
            .map(|n| crate::files::render_config(n, &self.nodes, &services))
            .collect::<Result<Vec<_>, _>>()?;
        self.services = services;
        self.save()?;
        for (node, text) in self.nodes.iter().zip(texts) {
            crate::files::write_atomic(&node.config, text.as_bytes())?;
        }
        let want = frontends(&self.services);
        for node in &self.nodes {
            self.wait_services(node, &want)?;
        }
        Ok(())
    }

    /// Kubernetes mode: each Service and its EndpointSlice `kubectl apply`ed to the lab's API
    /// server, those no longer wanted deleted, then the same wait for every vswitchd (which
    /// now learns them through its watch). Only the lab's own Services are compared: others
    /// may have been applied with kubectl.
    fn put_services(
        &mut self,
        services: Vec<ServiceSpec>,
        before: &[ServiceSpec],
    ) -> Result<(), LabError> {
        let gone: Vec<String> = before
            .iter()
            .filter(|s| !services.iter().any(|n| n.name == s.name))
            .map(|s| s.name.clone())
            .collect();
        for name in &gone {
            self.kubectl(
                &[
                    "delete",
                    "--ignore-not-found",
                    "-n",
                    NAMESPACE,
                    &format!("service/{name}"),
                    &format!("endpointslices.discovery.k8s.io/{name}"),
                ],
                None,
            )?;
        }
        let manifests: Vec<serde_json::Value> = services.iter().flat_map(manifests).collect();
        if !manifests.is_empty() {
            // A stream of JSON objects, which kubectl reads one after the other (it validates
            // a `kind: List` against a schema the stand-in does not serve).
            let docs: Vec<String> = manifests.iter().map(|m| m.to_string()).collect();
            self.kubectl(&["apply", "-f", "-"], Some(&docs.join("\n")))?;
        }
        let ours: Vec<String> = services
            .iter()
            .chain(before)
            .map(|s| s.name.clone())
            .collect();
        self.services = services;
        self.save()?;
        let want = frontends(&self.services);
        for node in &self.nodes {
            self.wait_services_of(node, &want, Some(&ours))?;
        }
        Ok(())
    }

    /// Waits until `node`'s vswitchd lists exactly `want` among its Services in [`NAMESPACE`].
    fn wait_services(&self, node: &crate::Node, want: &[String]) -> Result<(), LabError> {
        self.wait_services_of(node, want, None)
    }

    /// As [`Lab::wait_services`], looking only at the Services named in `only` if given.
    fn wait_services_of(
        &self,
        node: &crate::Node,
        want: &[String],
        only: Option<&[String]>,
    ) -> Result<(), LabError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let last = match node
                .client()
                .get::<conf::api::ServicesResponse>(conf::api::PATH_SERVICES)
            {
                Ok(r) => {
                    let prefix = format!("{NAMESPACE}/");
                    let mut have: Vec<String> = r
                        .frontends
                        .iter()
                        .filter(|f| f.name.starts_with(&prefix))
                        .filter(|f| {
                            only.is_none_or(|names| {
                                let svc = f.name[prefix.len()..].split(':').next();
                                names.iter().any(|n| Some(n.as_str()) == svc)
                            })
                        })
                        .map(|f| format!("{} {}", f.name, f.vip))
                        .collect();
                    have.sort();
                    if have == want {
                        return Ok(());
                    }
                    format!("it serves {have:?}")
                }
                Err(e) => e.to_string(),
            };
            if std::time::Instant::now() >= deadline {
                return Err(LabError::BadService {
                    name: want.join(", "),
                    message: format!(
                        "vswitchd on {} did not take them within 5 s ({last}); its log ends:\n{}",
                        node.name,
                        crate::sys::log_tail(&node.log, 5)
                    ),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// A lab Service as the API has it: the Service (its ClusterIP as chosen, a NodePort if
/// asked) and one EndpointSlice named after it, its endpoints ready on their nodes.
pub fn manifests(s: &ServiceSpec) -> Vec<serde_json::Value> {
    use serde_json::json;
    let proto = |p: &ServicePort| p.protocol.as_str().to_uppercase();
    let name = |p: &ServicePort| p.name.clone().unwrap_or_default();
    let ports: Vec<serde_json::Value> = s
        .ports
        .iter()
        .map(|p| {
            let mut v = json!({"name": name(p), "protocol": proto(p), "port": p.port,
                "targetPort": p.target_port.unwrap_or(p.port)});
            if let Some(n) = p.node_port {
                v["nodePort"] = json!(n);
            }
            v
        })
        .collect();
    let typ = if s.ports.iter().any(|p| p.node_port.is_some()) {
        "NodePort"
    } else {
        "ClusterIP"
    };
    let ip = s.cluster_ips.first().map(|i| i.to_string());
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": s.name, "namespace": s.namespace},
        "spec": {"type": typ, "clusterIP": ip, "ports": ports}
    });
    let slice_ports: Vec<serde_json::Value> = s
        .ports
        .iter()
        .map(|p| json!({"name": name(p), "protocol": proto(p), "port": p.target_port.unwrap_or(p.port)}))
        .collect();
    let endpoints: Vec<serde_json::Value> = s
        .endpoints
        .iter()
        .map(|e| {
            let mut v = json!({"addresses": [e.ip.to_string()],
                "conditions": {"ready": e.ready, "serving": e.serving, "terminating": e.terminating}});
            if let Some(n) = &e.node {
                v["nodeName"] = json!(n);
            }
            v
        })
        .collect();
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": s.name, "namespace": s.namespace,
            "labels": {"kubernetes.io/service-name": s.name,
                "endpointslice.kubernetes.io/managed-by": "vswitch-lab"}},
        "addressType": "IPv4",
        "ports": slice_ports,
        "endpoints": endpoints
    });
    vec![service, slice]
}

/// The frontends vswitchd lists for `services`: `namespace/name:port/PROTO vip`, sorted.
fn frontends(services: &[ServiceSpec]) -> Vec<String> {
    let mut out: Vec<String> = services
        .iter()
        .flat_map(|s| {
            s.cluster_ips.iter().flat_map(move |ip| {
                s.ports.iter().map(move |p| {
                    format!(
                        "{}/{}:{}/{} {ip}",
                        s.namespace,
                        s.name,
                        p.port,
                        p.protocol.as_str()
                    )
                })
            })
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_args_parse_with_their_defaults_and_name_what_is_wrong() {
        let p: PortArg = "80:8080".parse().unwrap();
        assert_eq!((p.port, p.target, p.protocol), (80, 8080, Protocol::Tcp));
        let p: PortArg = "53/udp".parse().unwrap();
        assert_eq!((p.port, p.target, p.protocol), (53, 53, Protocol::Udp));
        let p: PortArg = "5353:53/UDP".parse().unwrap();
        assert_eq!((p.port, p.target), (5353, 53));
        assert!("80:x"
            .parse::<PortArg>()
            .unwrap_err()
            .contains("\"x\" is not a port"));
        assert!("0".parse::<PortArg>().is_err());
        assert!("80/sctp"
            .parse::<PortArg>()
            .unwrap_err()
            .contains("tcp or udp"));
    }
}
