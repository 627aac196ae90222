//! What the datapath reads to judge a connection: the policies in force, every pod the switch
//! knows by address (its own and other nodes'), and for each local pod the policies that select
//! it. Built by the control plane whenever policies, namespaces, pods or ports change, and
//! swapped in whole with the other tables.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use super::engine::{Judgement, PodMeta, PolicySet, Remote, Selection};
use super::model::Direction;

/// A local pod as policy sees it: who it is, and which policies select it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortPolicy {
    pub pod: Arc<PodMeta>,
    pub selected: Selection,
}

impl PortPolicy {
    /// Whether any policy selects the pod, in either direction: then its connections are
    /// tracked so that the replies of what was admitted pass.
    pub fn isolated(&self) -> bool {
        !self.selected.ingress.is_empty() || !self.selected.egress.is_empty()
    }
}

/// The policy tables.
#[derive(Debug, Default)]
pub struct PolicyTables {
    pub set: Arc<PolicySet>,
    /// Every pod the inputs know, by address: shared by every table built from one reading
    /// (a CNI ADD among 100,000 pods does not index them again).
    pods: Arc<PodIndex>,
    /// Local pods the inputs do not know at their address, with their CNI ADD's identity.
    extra: HashMap<IpAddr, Arc<PodMeta>, foldhash::fast::RandomState>,
    /// This switch's pods, by port.
    local: HashMap<u32, PortPolicy, foldhash::fast::RandomState>,
}

/// The verdict on a new connection at one switch: each side that is a local pod of this switch
/// is judged here (egress for a local source, ingress for a local destination).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub egress: Judgement,
    pub ingress: Judgement,
}

impl Verdict {
    pub fn allows(&self) -> bool {
        self.egress.allows() && self.ingress.allows()
    }

    /// The direction that denied it, egress first.
    pub fn denied(&self) -> Option<Direction> {
        if !self.egress.allows() {
            Some(Direction::Egress)
        } else if !self.ingress.allows() {
            Some(Direction::Ingress)
        } else {
            None
        }
    }
}

/// One end of a connection as this switch sees it.
#[derive(Debug, Clone, Copy)]
pub struct End<'a> {
    pub ip: IpAddr,
    /// Set when the end is a pod on this switch.
    pub local: Option<&'a PortPolicy>,
}

pub use super::pods::PodIndex;

impl PolicyTables {
    /// `pods`: every pod known with its addresses (later entries for an address win).
    pub fn new(
        set: Arc<PolicySet>,
        pods: impl IntoIterator<Item = (IpAddr, Arc<PodMeta>)>,
    ) -> Self {
        PolicyTables::with_index(set, Arc::new(pods.into_iter().collect()))
    }

    /// [`PolicyTables::new`] with the pods indexed already.
    pub fn with_index(set: Arc<PolicySet>, pods: Arc<PodIndex>) -> Self {
        PolicyTables {
            set,
            pods,
            extra: HashMap::default(),
            local: HashMap::default(),
        }
    }

    /// Adds this switch's pods: port, address, and the identity from the CNI ADD for a pod
    /// the inputs do not know at that address. A pod of neither has no policy side and is
    /// never isolated.
    pub fn with_local(
        mut self,
        ports: impl IntoIterator<Item = (u32, IpAddr, Option<Arc<PodMeta>>)>,
    ) -> Self {
        for (id, ip, fallback) in ports {
            if let Some(p) = self.port(ip, fallback) {
                if !self.pods.contains_key(&ip) {
                    self.extra.entry(ip).or_insert_with(|| p.pod.clone());
                }
                self.local.insert(id, p);
            }
        }
        self
    }

    /// The policy side of the local pod on port `id`.
    pub fn local(&self, id: u32) -> Option<&PortPolicy> {
        self.local.get(&id)
    }

    /// The pod at `ip`, if the switch knows one there.
    pub fn pod(&self, ip: IpAddr) -> Option<&PodMeta> {
        self.pods
            .get(&ip)
            .or_else(|| self.extra.get(&ip))
            .map(|p| &**p)
    }

    pub fn pods(&self) -> usize {
        self.pods.len() + self.extra.len()
    }

    /// The policy side of a local pod: who it is (the pod known at its address, else `fallback`
    /// from the CNI ADD) and the policies selecting it.
    fn port(&self, ip: IpAddr, fallback: Option<Arc<PodMeta>>) -> Option<PortPolicy> {
        let known = self.pods.get(&ip).or_else(|| self.extra.get(&ip));
        let pod = known.cloned().or(fallback)?;
        let selected = self.set.select(&pod);
        Some(PortPolicy { pod, selected })
    }

    /// Every policy selecting `local` for `dir` that admits a connection with `remote` (the
    /// source for ingress, the destination for egress): for `trace`, not the datapath.
    pub fn admitting(
        &self,
        dir: Direction,
        local: &PortPolicy,
        remote: End<'_>,
        proto: u8,
        port: u16,
    ) -> Vec<u32> {
        let remote = Remote {
            ip: remote.ip,
            pod: remote
                .local
                .map(|r| &*r.pod)
                .or_else(|| self.pod(remote.ip)),
        };
        self.set.admitting(
            local.selected.get(dir),
            dir,
            &local.pod,
            remote,
            proto,
            port,
        )
    }

    /// Judges a new connection from `src` to `dst` on `proto`/`port` (the destination port
    /// after Service translation; 0 without ports).
    pub fn judge(&self, src: End<'_>, dst: End<'_>, proto: u8, port: u16) -> Verdict {
        let egress = match src.local {
            Some(l) => self.set.judge(
                l.selected.get(Direction::Egress),
                Direction::Egress,
                &l.pod,
                Remote {
                    ip: dst.ip,
                    pod: dst.local.map(|d| &*d.pod).or_else(|| self.pod(dst.ip)),
                },
                proto,
                port,
            ),
            None => Judgement::NotIsolated,
        };
        let ingress = match dst.local {
            Some(l) => self.set.judge(
                l.selected.get(Direction::Ingress),
                Direction::Ingress,
                &l.pod,
                Remote {
                    ip: src.ip,
                    pod: src.local.map(|s| &*s.pod).or_else(|| self.pod(src.ip)),
                },
                proto,
                port,
            ),
            None => Judgement::NotIsolated,
        };
        Verdict { egress, ingress }
    }
}
