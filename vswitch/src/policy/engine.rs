//! The verdict: may this connection start? Pure, and taken once per connection (when its
//! conntrack entry is made), so its cost is per connection, not per packet.
//!
//! A connection passes when the source pod's egress and the destination pod's ingress both
//! admit it. Each side is judged by the switch of the pod it concerns: egress at the source's
//! switch, ingress at the destination's (after Service DNAT, so against the backend pod and its
//! target port). A pod that no policy of a direction selects is not isolated in that direction
//! and admits everything; a selected pod admits what any rule of any selecting policy admits.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use super::model::{Direction, Namespaces, Peer, Policy, PortMatch, Proto, Rule};
use super::selector::Labels;

/// The label every namespace carries with its own name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A container port with a name (what a named policy port resolves to).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NamedPort {
    pub name: Box<str>,
    pub proto: Proto,
    pub port: u16,
}

/// What policy needs to know of a pod, local or on another node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMeta {
    pub namespace: Arc<str>,
    pub name: Box<str>,
    pub labels: Arc<Labels>,
    pub ports: Arc<[NamedPort]>,
}

impl PodMeta {
    fn named_port(&self, name: &str, proto: Proto) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| &*p.name == name && p.proto == proto)
            .map(|p| p.port)
    }
}

/// The other end of a connection: its address, and the pod behind it when the switch knows one.
#[derive(Debug, Clone, Copy)]
pub struct Remote<'a> {
    pub ip: IpAddr,
    pub pod: Option<&'a PodMeta>,
}

/// The policies selecting one pod, per direction (indices into the [`PolicySet`] that made it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    pub ingress: Box<[u32]>,
    pub egress: Box<[u32]>,
}

impl Selection {
    pub fn get(&self, dir: Direction) -> &[u32] {
        match dir {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

/// One direction's judgement of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judgement {
    /// No policy selects the pod for this direction.
    NotIsolated,
    /// Admitted by the policy at this index (the first that admits it).
    Allowed(u32),
    /// The pod is isolated and no rule admits the connection.
    Denied,
}

impl Judgement {
    pub fn allows(self) -> bool {
        !matches!(self, Judgement::Denied)
    }
}

/// All NetworkPolicies and Namespaces in force, indexed for judging.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicySet {
    policies: Vec<Policy>,
    namespaces: HashMap<Arc<str>, Arc<Labels>>,
    by_namespace: HashMap<Box<str>, Vec<u32>>,
}

impl PolicySet {
    /// `namespaces`: each Namespace's name and labels (`kubernetes.io/metadata.name` is added).
    /// A namespace not listed still exists for policy, with only that label.
    pub fn new(
        mut policies: Vec<Policy>,
        namespaces: impl IntoIterator<Item = (Arc<str>, Labels)>,
    ) -> PolicySet {
        // One order however the sources listed them, so two switches agree on indices and
        // `Allowed` names the same policy.
        policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut by_namespace: HashMap<Box<str>, Vec<u32>> = HashMap::new();
        for (i, p) in policies.iter().enumerate() {
            by_namespace
                .entry(p.namespace.clone())
                .or_default()
                .push(i as u32);
        }
        let namespaces = namespaces
            .into_iter()
            .map(|(n, l)| {
                let l = Arc::new(l.with(NAMESPACE_NAME_LABEL, &n));
                (n, l)
            })
            .collect();
        PolicySet {
            policies,
            namespaces,
            by_namespace,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn policy(&self, i: u32) -> Option<&Policy> {
        self.policies.get(i as usize)
    }

    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// A namespace's labels, `kubernetes.io/metadata.name` included.
    pub fn namespace_labels(&self, ns: &str) -> Arc<Labels> {
        match self.namespaces.get(ns) {
            Some(l) => l.clone(),
            None => Arc::new(Labels::new([(NAMESPACE_NAME_LABEL, ns)])),
        }
    }

    /// The policies that select `pod`, per direction.
    pub fn select(&self, pod: &PodMeta) -> Selection {
        let mut ingress = Vec::new();
        let mut egress = Vec::new();
        for &i in self.by_namespace.get(&*pod.namespace).into_iter().flatten() {
            let p = &self.policies[i as usize];
            if !p.pod_selector.matches(&pod.labels) {
                continue;
            }
            if p.ingress.is_some() {
                ingress.push(i);
            }
            if p.egress.is_some() {
                egress.push(i);
            }
        }
        Selection {
            ingress: ingress.into(),
            egress: egress.into(),
        }
    }

    /// Judges one direction of a new connection for `local`, the pod that `selected` (from
    /// [`PolicySet::select`]) was made for: `dir` Ingress, `remote` is the source and
    /// `local` the destination; Egress, the reverse. `proto` is the IP protocol number and
    /// `port` the destination port (0 for a protocol without ports).
    pub fn judge(
        &self,
        selected: &[u32],
        dir: Direction,
        local: &PodMeta,
        remote: Remote<'_>,
        proto: u8,
        port: u16,
    ) -> Judgement {
        if selected.is_empty() {
            return Judgement::NotIsolated;
        }
        // Named ports resolve on the destination pod.
        let dest = match dir {
            Direction::Ingress => Some(local),
            Direction::Egress => remote.pod,
        };
        for &i in selected {
            let Some(p) = self.policies.get(i as usize) else {
                continue;
            };
            let rules = p.rules(dir).unwrap_or_default();
            if rules
                .iter()
                .any(|r| self.rule_admits(p, r, remote, dest, proto, port))
            {
                return Judgement::Allowed(i);
            }
        }
        Judgement::Denied
    }

    /// Every policy of `selected` that admits the connection (for `trace` and `policies`).
    pub fn admitting(
        &self,
        selected: &[u32],
        dir: Direction,
        local: &PodMeta,
        remote: Remote<'_>,
        proto: u8,
        port: u16,
    ) -> Vec<u32> {
        selected
            .iter()
            .copied()
            .filter(|&i| self.judge(&[i], dir, local, remote, proto, port) != Judgement::Denied)
            .collect()
    }

    fn rule_admits(
        &self,
        p: &Policy,
        r: &Rule,
        remote: Remote<'_>,
        dest: Option<&PodMeta>,
        proto: u8,
        port: u16,
    ) -> bool {
        // The ports first: integer compares that turn most rules down before a selector is
        // evaluated (a new connection meets every policy selecting either end).
        let port_ok = r.ports.is_empty()
            || r.ports.iter().any(|pm| {
                pm.proto.number() == proto
                    && match &pm.port {
                        PortMatch::Any => true,
                        PortMatch::Range(a, b) => (*a..=*b).contains(&port),
                        PortMatch::Named(n) => {
                            dest.and_then(|d| d.named_port(n, pm.proto)) == Some(port)
                        }
                    }
            });
        port_ok && (r.peers.is_empty() || r.peers.iter().any(|peer| self.peer_is(p, peer, remote)))
    }

    fn peer_is(&self, p: &Policy, peer: &Peer, remote: Remote<'_>) -> bool {
        match peer {
            Peer::Block { cidr, except } => Peer::block_contains(cidr, except, remote.ip),
            Peer::Pods { namespaces, pods } => {
                // Only a pod the switch knows can match a selector: an address it cannot place
                // is judged by ipBlocks alone (fail closed).
                let Some(pod) = remote.pod else {
                    return false;
                };
                let ns_ok = match namespaces {
                    Namespaces::Own => pod.namespace.as_ref() == p.namespace.as_ref(),
                    Namespaces::Matching(s) => {
                        s.is_everything() || s.matches(&self.namespace_labels(&pod.namespace))
                    }
                };
                ns_ok && pods.matches(&pod.labels)
            }
        }
    }
}
