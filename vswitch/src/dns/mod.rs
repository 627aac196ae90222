//! Cluster DNS answered at the switch.
//!
//! Pods' queries to the cluster DNS address never leave the node: the datapath answers names
//! in the cluster domain (and the cluster's reverse zones) from a [`DnsTable`] snapshot, so a
//! lookup costs no network round trip, no conntrack entry, and none of the conntrack races
//! that give kube-dns users their five-second delays. Everything else goes to the node's own
//! resolvers through a [`Forwarder`] with a cache. The split follows the rest of the switch:
//! [`answer`] is pure and allocation-free and runs on a datapath thread; [`Forwarder`] does
//! I/O and runs on the control plane's tokio runtime.
//!
//! The records follow the Kubernetes DNS-based service discovery specification (v1.1.0),
//! with CoreDNS's choices where the specification leaves room: headless endpoints without a
//! hostname are named by their dashed address so their SRV records have resolvable targets,
//! and pod names `a-b-c-d.<ns>.pod.<zone>` resolve by construction (`pods insecure`).
//! The search list (`<ns>.svc.<zone> svc.<zone> <zone>`, ndots:5) is the client's business;
//! the misses it produces (`example.com.default.svc.cluster.local`) are inside the cluster
//! domain, so they get NXDOMAIN here at once rather than a trip upstream.
//!
//! Messages are read and written by a small hand-written codec (`message`) rather than a
//! general DNS library: a general parser allocates per section and per label and rejects
//! query types it does not know, where the switch needs to answer unknown types with NODATA
//! and forward them unchanged. Tests check every reply with an independent parser
//! (`simple-dns`).

mod answer;
mod cache;
mod forward;
mod message;
mod table;

#[cfg(test)]
mod forward_tests;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use answer::{answer, answer_with, Answer, Transport};
pub use forward::{Forwarder, ForwarderConfig, ForwarderStats, DEFAULT_RESOLV_CONF};
pub use table::{dns_differs, DnsTable, LocalPod, SPEC_VERSION};

/// TTL of every record the switch serves itself, and of its negative answers (the SOA
/// minimum). CoreDNS's `kubernetes` plugin defaults to 5 s: short enough that a changed
/// Service is seen almost at once, long enough to absorb a burst of identical lookups.
pub const CLUSTER_TTL: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error(
        "dns.cluster_domain: {0:?} is not a DNS name (dot-separated labels of letters, digits \
         and inner hyphens, at most 63 bytes each)"
    )]
    Domain(String),
    #[error("cannot read the upstream resolvers from {path}: {source}")]
    ResolvConf {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} lists no usable nameserver; names outside the cluster cannot be forwarded")]
    NoUpstreams { path: PathBuf },
}
