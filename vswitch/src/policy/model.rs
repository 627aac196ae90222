//! NetworkPolicy (networking.k8s.io/v1) compiled into the switch's form, validated as the API
//! server validates it so that a policy `kubectl apply` would refuse is refused here too, with
//! the object and field named.

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::selector::Selector;

/// The transport protocols a NetworkPolicy port names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
            Proto::Sctp => 132,
        }
    }

    pub fn from_number(n: u8) -> Option<Proto> {
        match n {
            6 => Some(Proto::Tcp),
            17 => Some(Proto::Udp),
            132 => Some(Proto::Sctp),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
            Proto::Sctp => "SCTP",
        }
    }
}

/// Which side of a connection a rule judges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Connections to the selected pod (judged at the destination pod's switch).
    Ingress,
    /// Connections from the selected pod (judged at the source pod's switch).
    Egress,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// Which pods a peer's pod part selects, by namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Namespaces {
    /// The policy's own namespace (a peer with only a `podSelector`).
    Own,
    /// The namespaces whose labels match (`namespaceSelector`, `{}` = all).
    Matching(Selector),
}

/// One `from` / `to` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    Pods {
        namespaces: Namespaces,
        pods: Selector,
    },
    Block {
        cidr: IpNet,
        except: Box<[IpNet]>,
    },
}

impl Peer {
    pub fn block_contains(cidr: &IpNet, except: &[IpNet], ip: IpAddr) -> bool {
        cidr.contains(&ip) && !except.iter().any(|e| e.contains(&ip))
    }
}

/// The port part of one `ports` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortMatch {
    /// No `port`: every port of the protocol.
    Any,
    /// `port`, or `port`..=`endPort`.
    Range(u16, u16),
    /// A named port, resolved per destination pod from its container ports.
    Named(Box<str>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub proto: Proto,
    pub port: PortMatch,
}

/// One ingress or egress rule: it admits a connection whose peer matches any of `peers` (none
/// listed: every peer) on any of `ports` (none listed: every port and protocol).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rule {
    pub peers: Vec<Peer>,
    pub ports: Vec<Port>,
}

/// A NetworkPolicy as the switch applies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub namespace: Box<str>,
    pub name: Box<str>,
    pub pod_selector: Selector,
    /// `Some` when the policy's types include Ingress: the pods it selects are isolated for
    /// ingress, and these rules (possibly none) admit connections to them.
    pub ingress: Option<Vec<Rule>>,
    /// The same for Egress.
    pub egress: Option<Vec<Rule>>,
}

impl Policy {
    pub fn rules(&self, dir: Direction) -> Option<&[Rule]> {
        match dir {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }

    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Compiles a NetworkPolicy, refusing what the API server's validation refuses; the error
    /// names the object and the field. `default_namespace` is used when the object has none
    /// (a manifest applied without `-n`, as kubectl does with its context's namespace).
    pub fn from_k8s(np: &net::NetworkPolicy, default_namespace: &str) -> Result<Policy, String> {
        let name = np.metadata.name.as_deref().unwrap_or_default();
        let namespace = np
            .metadata
            .namespace
            .as_deref()
            .unwrap_or(default_namespace);
        let what = format!("NetworkPolicy {namespace}/{name}");
        compile(np, namespace, name).map_err(|e| format!("{what}: {e}"))
    }
}

fn compile(np: &net::NetworkPolicy, namespace: &str, name: &str) -> Result<Policy, String> {
    if name.is_empty() {
        return Err("metadata.name: required".into());
    }
    let spec = np.spec.as_ref().ok_or("spec: required")?;
    let pod_selector = match &spec.pod_selector {
        Some(s) => Selector::from_k8s(s, "spec.podSelector")?,
        None => Selector::everything(),
    };
    // Defaulting as the API server's: no policyTypes means Ingress, plus Egress when the policy
    // has egress rules.
    let (mut ingress_on, mut egress_on) = (false, false);
    match spec.policy_types.as_deref() {
        None | Some([]) => {
            ingress_on = true;
            egress_on = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
        }
        Some(types) => {
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => ingress_on = true,
                    "Egress" => egress_on = true,
                    other => {
                        return Err(format!(
                            "spec.policyTypes[{i}]: {other:?} is not Ingress or Egress"
                        ))
                    }
                }
            }
        }
    }
    let mut ingress = Vec::new();
    for (i, r) in spec.ingress.iter().flatten().enumerate() {
        let at = format!("spec.ingress[{i}]");
        ingress.push(rule(r.from.as_deref(), r.ports.as_deref(), &at, "from")?);
    }
    let mut egress = Vec::new();
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        let at = format!("spec.egress[{i}]");
        egress.push(rule(r.to.as_deref(), r.ports.as_deref(), &at, "to")?);
    }
    Ok(Policy {
        namespace: namespace.into(),
        name: name.into(),
        pod_selector,
        ingress: ingress_on.then_some(ingress),
        egress: egress_on.then_some(egress),
    })
}

fn rule(
    peers: Option<&[net::NetworkPolicyPeer]>,
    ports: Option<&[net::NetworkPolicyPort]>,
    at: &str,
    side: &str,
) -> Result<Rule, String> {
    let mut r = Rule::default();
    for (j, p) in peers.unwrap_or_default().iter().enumerate() {
        r.peers.push(peer(p, &format!("{at}.{side}[{j}]"))?);
    }
    for (j, p) in ports.unwrap_or_default().iter().enumerate() {
        r.ports.push(port(p, &format!("{at}.ports[{j}]"))?);
    }
    Ok(r)
}

fn peer(p: &net::NetworkPolicyPeer, at: &str) -> Result<Peer, String> {
    if let Some(b) = &p.ip_block {
        if p.pod_selector.is_some() || p.namespace_selector.is_some() {
            return Err(format!(
                "{at}: may not specify more than 1 peer type (ipBlock with a selector)"
            ));
        }
        let cidr: IpNet = b
            .cidr
            .parse()
            .map_err(|_| format!("{at}.ipBlock.cidr: {:?} is not a valid CIDR", b.cidr))?;
        let mut except = Vec::new();
        for (k, e) in b.except.iter().flatten().enumerate() {
            let f = format!("{at}.ipBlock.except[{k}]");
            let n: IpNet = e
                .parse()
                .map_err(|_| format!("{f}: {e:?} is not a valid CIDR"))?;
            // The API server's rule: each except strictly inside the cidr.
            if !(cidr.contains(&n) && n.prefix_len() > cidr.prefix_len()) {
                return Err(format!("{f}: {e} must be a strict subset of `cidr` {cidr}"));
            }
            except.push(n);
        }
        return Ok(Peer::Block {
            cidr: cidr.trunc(),
            except: except.into_iter().map(|n| n.trunc()).collect(),
        });
    }
    let pods = match &p.pod_selector {
        Some(s) => Selector::from_k8s(s, &format!("{at}.podSelector"))?,
        None => Selector::everything(),
    };
    let namespaces = match &p.namespace_selector {
        Some(s) => Namespaces::Matching(Selector::from_k8s(s, &format!("{at}.namespaceSelector"))?),
        None if p.pod_selector.is_some() => Namespaces::Own,
        None => return Err(format!("{at}: must specify a peer")),
    };
    Ok(Peer::Pods { namespaces, pods })
}

fn port(p: &net::NetworkPolicyPort, at: &str) -> Result<Port, String> {
    let proto = match p.protocol.as_deref() {
        None | Some("TCP") => Proto::Tcp,
        Some("UDP") => Proto::Udp,
        Some("SCTP") => Proto::Sctp,
        Some(other) => {
            return Err(format!(
                "{at}.protocol: {other:?} is not supported (TCP, UDP, SCTP)"
            ))
        }
    };
    let port = match (&p.port, p.end_port) {
        (None, None) => PortMatch::Any,
        (None, Some(_)) => return Err(format!("{at}.endPort: may not be set without `port`")),
        (Some(IntOrString::Int(n)), end) => {
            let start = port_number(*n).ok_or(format!(
                "{at}.port: {n} must be between 1 and 65535, inclusive"
            ))?;
            let end = match end {
                None => start,
                Some(e) => {
                    let e = port_number(e).ok_or(format!(
                        "{at}.endPort: {e} must be between 1 and 65535, inclusive"
                    ))?;
                    if e < start {
                        return Err(format!(
                            "{at}.endPort: {e} must be greater than or equal to `port` {start}"
                        ));
                    }
                    e
                }
            };
            PortMatch::Range(start, end)
        }
        (Some(IntOrString::String(s)), None) => {
            check_port_name(s).map_err(|e| format!("{at}.port: {e}"))?;
            PortMatch::Named(s.as_str().into())
        }
        (Some(IntOrString::String(_)), Some(_)) => {
            return Err(format!(
                "{at}.endPort: may not be set when `port` is a named port"
            ))
        }
    };
    Ok(Port { proto, port })
}

fn port_number(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|&p| p != 0)
}

/// An IANA service name, as a container port's name: 1 to 15 lowercase alphanumerics and `-`,
/// at least one letter, no `-` at either end or twice in a row.
pub fn check_port_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a valid port name (1 to 15 lowercase letters, digits and '-', with a letter, not starting, ending or doubling '-')"
        ))
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Block { cidr, except } if except.is_empty() => write!(f, "ipBlock {cidr}"),
            Peer::Block { cidr, except } => {
                let ex: Vec<String> = except.iter().map(|e| e.to_string()).collect();
                write!(f, "ipBlock {cidr} except {}", ex.join(","))
            }
            Peer::Pods {
                namespaces: Namespaces::Own,
                pods,
            } => write!(f, "pods {pods} in the policy's namespace"),
            Peer::Pods {
                namespaces: Namespaces::Matching(ns),
                pods,
            } => write!(f, "pods {pods} in namespaces {ns}"),
        }
    }
}

impl std::fmt::Display for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.port {
            PortMatch::Any => write!(f, "{} any port", self.proto.name()),
            PortMatch::Range(a, b) if a == b => write!(f, "{} {a}", self.proto.name()),
            PortMatch::Range(a, b) => write!(f, "{} {a}-{b}", self.proto.name()),
            PortMatch::Named(n) => write!(f, "{} {n}", self.proto.name()),
        }
    }
}

impl std::fmt::Display for Rule {
    /// `from any peer on any port`, `pods app=web in the policy's namespace on TCP 80`, ...
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.peers.is_empty() {
            f.write_str("any peer")?;
        } else {
            let p: Vec<String> = self.peers.iter().map(|p| p.to_string()).collect();
            f.write_str(&p.join(" or "))?;
        }
        if self.ports.is_empty() {
            f.write_str(", any port")
        } else {
            let p: Vec<String> = self.ports.iter().map(|p| p.to_string()).collect();
            write!(f, ", {}", p.join(" or "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn np(json: &str) -> Result<Policy, String> {
        let v: net::NetworkPolicy = serde_json::from_str(json).unwrap();
        Policy::from_k8s(&v, "default")
    }

    fn spec(s: &str) -> Result<Policy, String> {
        np(&format!(
            r#"{{"metadata":{{"name":"p","namespace":"x"}},"spec":{s}}}"#
        ))
    }

    #[test]
    fn policy_types_default_as_the_api_server_does() {
        let p = spec(r#"{"podSelector":{}}"#).unwrap();
        assert_eq!(p.ingress, Some(vec![]));
        assert_eq!(p.egress, None);
        let p = spec(r#"{"podSelector":{},"egress":[{}]}"#).unwrap();
        assert_eq!(p.ingress, Some(vec![]));
        assert_eq!(p.egress, Some(vec![Rule::default()]));
        let p = spec(r#"{"podSelector":{},"policyTypes":["Egress"]}"#).unwrap();
        assert_eq!(p.ingress, None);
        assert_eq!(p.egress, Some(vec![]));
        // An empty egress list does not turn Egress on.
        let p = spec(r#"{"podSelector":{},"egress":[]}"#).unwrap();
        assert_eq!(p.egress, None);
    }

    #[test]
    fn peers_compile_by_kind() {
        let p = spec(
            r#"{"podSelector":{"matchLabels":{"pod":"a"}},"ingress":[{"from":[
                {"podSelector":{"matchLabels":{"pod":"b"}}},
                {"namespaceSelector":{}},
                {"namespaceSelector":{"matchLabels":{"ns":"y"}},"podSelector":{}},
                {"ipBlock":{"cidr":"10.0.0.0/8","except":["10.1.0.0/16"]}}],
                "ports":[{"port":80},{"port":"serve-81","protocol":"UDP"},{"port":1000,"endPort":2000},{"protocol":"SCTP"}]}]}"#,
        )
        .unwrap();
        let r = &p.ingress.as_ref().unwrap()[0];
        assert!(matches!(
            &r.peers[0],
            Peer::Pods {
                namespaces: Namespaces::Own,
                ..
            }
        ));
        assert!(
            matches!(&r.peers[1], Peer::Pods { namespaces: Namespaces::Matching(s), pods } if s.is_everything() && pods.is_everything())
        );
        assert!(
            matches!(&r.peers[2], Peer::Pods { namespaces: Namespaces::Matching(s), .. } if !s.is_everything())
        );
        assert!(matches!(&r.peers[3], Peer::Block { except, .. } if except.len() == 1));
        assert_eq!(
            r.ports[0],
            Port {
                proto: Proto::Tcp,
                port: PortMatch::Range(80, 80)
            }
        );
        assert_eq!(
            r.ports[1],
            Port {
                proto: Proto::Udp,
                port: PortMatch::Named("serve-81".into())
            }
        );
        assert_eq!(r.ports[2].port, PortMatch::Range(1000, 2000));
        assert_eq!(
            r.ports[3],
            Port {
                proto: Proto::Sctp,
                port: PortMatch::Any
            }
        );
    }

    #[test]
    fn what_the_api_server_refuses_is_refused_with_the_field_named() {
        let cases = [
            (
                r#"{"ingress":[{"from":[{"ipBlock":{"cidr":"10.0.0.0/33"}}]}]}"#,
                "spec.ingress[0].from[0].ipBlock.cidr",
            ),
            (
                r#"{"ingress":[{"from":[{"ipBlock":{"cidr":"not-a-cidr"}}]}]}"#,
                "spec.ingress[0].from[0].ipBlock.cidr",
            ),
            (
                r#"{"egress":[{"to":[{"ipBlock":{"cidr":"10.0.0.0/16","except":["10.1.0.0/24"]}}]}]}"#,
                "spec.egress[0].to[0].ipBlock.except[0]",
            ),
            (
                r#"{"egress":[{"to":[{"ipBlock":{"cidr":"10.0.0.0/16","except":["10.0.0.0/16"]}}]}]}"#,
                "strict subset",
            ),
            (
                r#"{"ingress":[{"ports":[{"port":"a-very-long-port-name"}]}]}"#,
                "spec.ingress[0].ports[0].port",
            ),
            (
                r#"{"ingress":[{"ports":[{"port":"UPPER"}]}]}"#,
                "not a valid port name",
            ),
            (
                r#"{"ingress":[{"ports":[{"port":90,"endPort":80}]}]}"#,
                "spec.ingress[0].ports[0].endPort",
            ),
            (
                r#"{"ingress":[{"ports":[{"endPort":80}]}]}"#,
                "without `port`",
            ),
            (
                r#"{"ingress":[{"ports":[{"port":"http","endPort":80}]}]}"#,
                "named port",
            ),
            (
                r#"{"ingress":[{"ports":[{"port":0}]}]}"#,
                "between 1 and 65535",
            ),
            (
                r#"{"ingress":[{"ports":[{"port":80,"protocol":"ICMP"}]}]}"#,
                "protocol",
            ),
            (r#"{"ingress":[{"from":[{}]}]}"#, "must specify a peer"),
            (
                r#"{"ingress":[{"from":[{"ipBlock":{"cidr":"10.0.0.0/8"},"podSelector":{}}]}]}"#,
                "more than 1 peer type",
            ),
            (r#"{"policyTypes":["Sideways"]}"#, "spec.policyTypes[0]"),
        ];
        for (s, want) in cases {
            let e = spec(s).unwrap_err();
            assert!(e.starts_with("NetworkPolicy x/p: "), "{e}");
            assert!(e.contains(want), "{s}: {e} lacks {want}");
        }
    }

    #[test]
    fn the_namespace_defaults_and_the_name_is_required() {
        let p = np(r#"{"metadata":{"name":"p"},"spec":{}}"#).unwrap();
        assert_eq!(&*p.namespace, "default");
        assert!(p.pod_selector.is_everything());
        assert!(np(r#"{"metadata":{},"spec":{}}"#)
            .unwrap_err()
            .contains("metadata.name"));
    }

    #[test]
    fn port_names_follow_iana() {
        for ok in ["http", "serve-80", "a1", "dns-tcp"] {
            assert!(check_port_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "80",
            "-http",
            "http-",
            "ht--tp",
            "Http",
            "abcdefghijklmnop",
        ] {
            assert!(check_port_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rules_read_as_sentences() {
        let p = spec(
            r#"{"podSelector":{},"ingress":[{}, {"from":[{"podSelector":{"matchLabels":{"pod":"b"}}},
                {"namespaceSelector":{}},{"ipBlock":{"cidr":"10.0.0.0/8","except":["10.1.0.0/16"]}}],
                "ports":[{"port":80,"endPort":81},{"port":"http"},{"protocol":"UDP"}]}]}"#,
        )
        .unwrap();
        let r = p.ingress.unwrap();
        assert_eq!(r[0].to_string(), "any peer, any port");
        assert_eq!(
            r[1].to_string(),
            "pods pod=b in the policy's namespace or pods {} in namespaces {} or ipBlock 10.0.0.0/8 except 10.1.0.0/16, TCP 80-81 or TCP http or UDP any port"
        );
    }
}
