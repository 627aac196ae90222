//! The cluster's DNS records as one immutable snapshot.
//!
//! Records are computed once per change of Services or pods (the control plane builds a new
//! table and publishes it like every other table), so a query costs one hash lookup of its
//! lowercased wire name. Names are keyed in wire form rather than dotted text so that a label
//! holding a dot can never alias two labels. Every ancestor of a record inside an authoritative
//! zone is present with no records (an "empty non-terminal"), which is what makes
//! `prod.svc.cluster.local` NODATA instead of NXDOMAIN (RFC 8020: NXDOMAIN means nothing
//! exists below the name either).
//!
//! Pod records (`a-b-c-d.<ns>.pod.<zone>`) are not stored: they resolve by construction from
//! the name, as CoreDNS's `pods insecure` mode does, since the switch only knows its own node's
//! pods. Reverse zones are whatever ranges the caller says the cluster owns (service and pod
//! CIDRs); inside them a missing PTR is NXDOMAIN, outside them it is the upstream's business.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use conf::config::ServiceSpec;
use conf::config::{EndpointSpec, Protocol};
use ipnet::IpNet;

use super::message::{push_label, wire_name, QName};
use super::{DnsError, CLUSTER_TTL};

/// The version of the Kubernetes DNS specification served at `dns-version.<zone>`.
pub const SPEC_VERSION: &str = "1.1.0";

/// A pod on this node, for its PTR record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPod {
    pub namespace: String,
    /// Kept for diagnostics; the pod's DNS name is derived from its address, as Kubernetes
    /// does.
    pub name: String,
    pub ip: IpAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Record {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    /// Target in lowercase wire form.
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        target: Box<[u8]>,
    },
    Ptr(Box<[u8]>),
    Txt(&'static str),
}

impl Record {
    pub(crate) fn rtype(&self) -> u16 {
        use super::message::rtype;
        match self {
            Record::A(_) => rtype::A,
            Record::Aaaa(_) => rtype::AAAA,
            Record::Srv { .. } => rtype::SRV,
            Record::Ptr(_) => rtype::PTR,
            Record::Txt(_) => rtype::TXT,
        }
    }
}

/// Which authoritative zone a name falls in, and the label index of that zone's apex in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Zone {
    Cluster { apex: usize },
    Reverse { apex: usize },
    Outside,
}

/// What a name is.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Lookup<'t> {
    /// The name exists; an empty slice is an empty non-terminal.
    Records(&'t [Record]),
    /// A pod name, resolved from its first label.
    Pod(IpAddr),
    NxDomain,
}

/// Names and their records.
type Names = HashMap<Box<[u8]>, Vec<Record>>;

/// The cluster's DNS records. Immutable: build a new one when Services or pods change. The
/// Services' names are shared by every table built from one with [`DnsTable::with_pods`], so a
/// pod's ADD or DEL among 10,000 Services builds only the local pods' few names.
#[derive(Debug, Clone)]
pub struct DnsTable {
    zone: Box<[u8]>,
    /// `ns.dns.<zone>` and `hostmaster.<zone>`: the SOA's MNAME and RNAME.
    mname: Box<[u8]>,
    rname: Box<[u8]>,
    /// The Services' names (with the zone's fixed names and their ancestors).
    services: Arc<Names>,
    /// The local pods' PTRs and their ancestors, where the Services' names do not have them.
    names: Names,
    reverse_zones: Vec<IpNet>,
    serial: u32,
    ttl: u32,
}

const IN_ADDR_ARPA: &[u8] = b"\x07in-addr\x04arpa\x00";
const IP6_ARPA: &[u8] = b"\x03ip6\x04arpa\x00";

impl DnsTable {
    /// Builds the records of `services` and `pods` under `cluster_domain`.
    ///
    /// `reverse_zones` are the ranges the cluster owns (service CIDR, pod CIDRs): reverse
    /// lookups inside them are answered here, NXDOMAIN when nothing matches; PTRs for
    /// ClusterIPs and pods outside them are still answered, but any other reverse lookup there
    /// is forwarded. Services whose namespace or name is not a DNS label are skipped (config
    /// validation already rejects them).
    pub fn new<S: std::borrow::Borrow<ServiceSpec>>(
        cluster_domain: &str,
        services: &[S],
        pods: &[LocalPod],
        reverse_zones: &[IpNet],
    ) -> Result<DnsTable, DnsError> {
        let zone = wire_name(cluster_domain)
            .filter(|z| z.len() > 1 && is_hostname(z))
            .ok_or_else(|| DnsError::Domain(cluster_domain.to_string()))?;
        let serial = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_secs() as u32);
        let mut t = DnsTable {
            mname: Box::default(),
            rname: Box::default(),
            zone: zone.into_boxed_slice(),
            services: Arc::default(),
            names: HashMap::new(),
            reverse_zones: reverse_zones.iter().map(IpNet::trunc).collect(),
            serial,
            ttl: CLUSTER_TTL,
        };
        let domain = || DnsError::Domain(cluster_domain.into());
        t.mname = t.under(&[b"ns", b"dns"]).ok_or_else(domain)?;
        t.rname = t.under(&[b"hostmaster"]).ok_or_else(domain)?;
        t.add(t.zone.clone(), None);
        if let Some(n) = t.under(&[b"dns-version"]) {
            t.add(n, Some(Record::Txt(SPEC_VERSION)));
        }
        if let Some(n) = t.under(&[b"pod"]) {
            t.add(n, None);
        }
        for svc in services.iter().map(|s| s.borrow()) {
            if is_label(&svc.name) && is_label(&svc.namespace) {
                t.add_service(svc);
            }
        }
        t.add_ancestors();
        t.services = Arc::new(std::mem::take(&mut t.names));
        Ok(t.with_pods(pods))
    }

    /// This table's Services with `pods` as the local pods (in place of its own).
    pub fn with_pods(&self, pods: &[LocalPod]) -> DnsTable {
        let mut t = DnsTable {
            zone: self.zone.clone(),
            mname: self.mname.clone(),
            rname: self.rname.clone(),
            services: self.services.clone(),
            names: HashMap::new(),
            reverse_zones: self.reverse_zones.clone(),
            serial: self.serial,
            ttl: self.ttl,
        };
        for pod in pods {
            t.add_pod(pod);
        }
        t.add_ancestors();
        t
    }

    /// A name's records, from the Services' names or the pods'; None: no such name.
    fn get(&self, wire: &[u8]) -> Option<&[Record]> {
        match (self.services.get(wire), self.names.get(wire)) {
            (Some(s), Some(p)) if s.is_empty() => Some(p),
            (s, p) => s.or(p).map(Vec::as_slice),
        }
    }

    /// `labels` under the cluster zone, as a wire name; `None` when too long.
    fn under(&self, labels: &[&[u8]]) -> Option<Box<[u8]>> {
        let mut w = Vec::with_capacity(64);
        for l in labels {
            push_label(&mut w, l)?;
        }
        w.extend_from_slice(&self.zone);
        (w.len() <= super::message::MAX_NAME_LEN).then(|| w.into_boxed_slice())
    }

    /// A Service's name, its addresses (or a headless Service's endpoints) and SRV records.
    fn add_service(&mut self, svc: &ServiceSpec) {
        let (name, ns) = (svc.name.as_bytes(), svc.namespace.as_bytes());
        let Some(base) = self.under(&[name, ns, b"svc"]) else {
            return;
        };
        self.add(base.clone(), None);
        if svc.cluster_ips.is_empty() {
            return self.add_headless(svc, &base);
        }
        for ip in &svc.cluster_ips {
            self.add(base.clone(), Some(addr_record(*ip)));
            self.add(reverse_name(*ip), Some(Record::Ptr(base.clone())));
        }
        for p in &svc.ports {
            let Some(srv) = srv_name(p.name.as_deref(), p.protocol, &base) else {
                continue;
            };
            let target = base.clone();
            let rec = Record::Srv {
                priority: 0,
                weight: 100,
                port: p.port,
                target,
            };
            self.add(srv, Some(rec));
        }
    }

    /// Headless: the endpoints themselves, each under its hostname (or its dashed address, as
    /// CoreDNS does, so SRV targets always resolve).
    fn add_headless(&mut self, svc: &ServiceSpec, base: &[u8]) {
        let (name, ns) = (svc.name.as_bytes(), svc.namespace.as_bytes());
        let mut ready: Vec<&EndpointSpec> = Vec::new();
        for ep in svc.endpoints.iter().filter(|e| e.ready) {
            if !ready
                .iter()
                .any(|r| r.ip == ep.ip && r.hostname == ep.hostname)
            {
                ready.push(ep);
            }
        }
        let weight = (100 / ready.len().max(1)).max(1) as u16;
        for ep in &ready {
            let hostname = ep.hostname.as_deref().filter(|h| is_label(h));
            let host_label = match hostname {
                Some(h) => h.to_string(),
                None => dashed(ep.ip),
            };
            let Some(host) = self.under(&[host_label.as_bytes(), name, ns, b"svc"]) else {
                continue;
            };
            self.add(base.into(), Some(addr_record(ep.ip)));
            self.add(host.clone(), Some(addr_record(ep.ip)));
            if hostname.is_some() {
                self.add(reverse_name(ep.ip), Some(Record::Ptr(host.clone())));
            }
            for p in &svc.ports {
                let Some(srv) = srv_name(p.name.as_deref(), p.protocol, base) else {
                    continue;
                };
                // Each endpoint's own number; one that does not serve the port has no record.
                let Some(port) = ep.target_port(p) else {
                    continue;
                };
                let rec = Record::Srv {
                    priority: 0,
                    weight,
                    port,
                    target: host.clone(),
                };
                self.add(srv, Some(rec));
            }
        }
    }

    /// A local pod's PTR record, unless its address already has one (a Service endpoint's).
    fn add_pod(&mut self, pod: &LocalPod) {
        let rev = reverse_name(pod.ip);
        if self.get(&rev).is_some_and(|r| !r.is_empty()) || !is_label(&pod.namespace) {
            return;
        }
        let label = dashed(pod.ip);
        if let Some(name) = self.under(&[label.as_bytes(), pod.namespace.as_bytes(), b"pod"]) {
            self.add(rev, Some(Record::Ptr(name)));
        }
    }

    /// Adds a record (or just the name) without duplicates.
    fn add(&mut self, name: Box<[u8]>, record: Option<Record>) {
        let records = self.names.entry(name).or_default();
        if let Some(r) = record {
            if !records.contains(&r) {
                records.push(r);
            }
        }
    }

    /// Makes every ancestor of a name inside an authoritative zone exist.
    fn add_ancestors(&mut self) {
        let mut missing = Vec::new();
        for name in self.names.keys() {
            let Ok((q, _)) = QName::read(name, 0) else {
                continue;
            };
            let apex = match self.zone_of(&q, false) {
                Zone::Cluster { apex } | Zone::Reverse { apex } => apex,
                Zone::Outside => continue,
            };
            for i in 1..apex {
                let s = q.suffix(i);
                if self.get(s).is_none() {
                    missing.push(s.to_vec().into_boxed_slice());
                }
            }
        }
        for m in missing {
            self.names.entry(m).or_default();
        }
    }

    pub(crate) fn ttl(&self) -> u32 {
        self.ttl
    }

    pub(crate) fn serial(&self) -> u32 {
        self.serial
    }

    pub(crate) fn mname(&self) -> &[u8] {
        &self.mname
    }

    pub(crate) fn rname(&self) -> &[u8] {
        &self.rname
    }

    /// The records of a name, for SRV targets' addresses.
    pub(crate) fn records(&self, wire: &[u8]) -> &[Record] {
        self.get(wire).unwrap_or(&[])
    }

    /// Which zone a name is in. With `known_only`, a reverse name outside the configured
    /// reverse zones still counts as ours when the table has it (a ClusterIP's PTR).
    pub(crate) fn zone_of(&self, q: &QName, known_only: bool) -> Zone {
        if let Some(apex) = q.find_suffix(&self.zone) {
            return Zone::Cluster { apex };
        }
        let (arpa, octet_bits, max_labels) = if let Some(i) = q.find_suffix(IN_ADDR_ARPA) {
            (i, 8u8, 4usize)
        } else if let Some(i) = q.find_suffix(IP6_ARPA) {
            (i, 4, 32)
        } else {
            return Zone::Outside;
        };
        // Read the address prefix from the most significant label leftwards.
        let mut bytes = [0u8; 16];
        let mut known = 0usize;
        while known < max_labels && known < arpa {
            let label = q.label(arpa - 1 - known);
            let Some(v) = parse_reverse_label(label, octet_bits) else {
                break;
            };
            if octet_bits == 8 {
                bytes[known] = v;
            } else {
                bytes[known / 2] |= if known & 1 == 0 { v << 4 } else { v };
            }
            known += 1;
        }
        let addr = if octet_bits == 8 {
            IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
        } else {
            IpAddr::V6(Ipv6Addr::from(bytes))
        };
        let bits = known * usize::from(octet_bits);
        let zone = self
            .reverse_zones
            .iter()
            .filter(|z| {
                z.addr().is_ipv4() == addr.is_ipv4()
                    && usize::from(z.prefix_len()) <= bits
                    && z.contains(&addr)
            })
            .max_by_key(|z| z.prefix_len());
        let step = usize::from(octet_bits);
        if let Some(z) = zone {
            let apex_labels = usize::from(z.prefix_len()).div_ceil(step);
            return Zone::Reverse {
                apex: arpa - apex_labels,
            };
        }
        if known_only && self.get(q.wire()).is_some() {
            // Not a configured zone: claim only the /24 (or /64) around the record.
            let apex_labels = known.min(if octet_bits == 8 { 3 } else { 16 });
            return Zone::Reverse {
                apex: arpa - apex_labels,
            };
        }
        Zone::Outside
    }

    /// Looks a name up inside `zone`.
    pub(crate) fn lookup(&self, q: &QName, zone: Zone) -> Lookup<'_> {
        if let Some(records) = self.get(q.wire()) {
            return Lookup::Records(records);
        }
        // A zone's apex exists (it owns the SOA) even when nothing is below it yet.
        if matches!(zone, Zone::Cluster { apex: 0 } | Zone::Reverse { apex: 0 }) {
            return Lookup::Records(&[]);
        }
        if let Zone::Cluster { apex } = zone {
            let pod = |i: usize| q.label(i) == b"pod";
            if apex == 3 && pod(2) {
                if let Some(ip) = parse_dashed(q.label(0)) {
                    return Lookup::Pod(ip);
                }
            }
            // `<ns>.pod.<zone>` holds pod names for any namespace.
            if apex == 2 && pod(1) {
                return Lookup::Records(&[]);
            }
        }
        Lookup::NxDomain
    }
}

/// Whether a Service's change (None: absent before or after) changes the names it has in a
/// [`DnsTable`]: its name, addresses and ports, and a headless Service's endpoints. An
/// endpoint change of a ClusterIP Service does not.
pub fn dns_differs(a: Option<&ServiceSpec>, b: Option<&ServiceSpec>) -> bool {
    let (a, b) = match (a, b) {
        (None, None) => return false,
        (Some(a), Some(b)) => (a, b),
        _ => return true,
    };
    let ports = |s: &ServiceSpec| -> Vec<(Option<String>, Protocol, u16)> {
        s.ports
            .iter()
            .map(|p| (p.name.clone(), p.protocol, p.port))
            .collect()
    };
    let headless = a.cluster_ips.is_empty() || b.cluster_ips.is_empty();
    a.namespace != b.namespace
        || a.name != b.name
        || a.cluster_ips != b.cluster_ips
        || ports(a) != ports(b)
        || (headless && a.endpoints != b.endpoints)
}

fn addr_record(ip: IpAddr) -> Record {
    match ip {
        IpAddr::V4(v4) => Record::A(v4),
        IpAddr::V6(v6) => Record::Aaaa(v6),
    }
}

/// `_<port>._<proto>.<base>`, for named ports only.
fn srv_name(port: Option<&str>, proto: Protocol, base: &[u8]) -> Option<Box<[u8]>> {
    let port = port.filter(|p| !p.is_empty())?;
    let proto: &[u8] = match proto {
        Protocol::Tcp => b"_tcp",
        Protocol::Udp => b"_udp",
        Protocol::Sctp => b"_sctp",
    };
    let mut w = Vec::with_capacity(base.len() + port.len() + 8);
    let mut label = Vec::with_capacity(port.len() + 1);
    label.push(b'_');
    label.extend_from_slice(port.as_bytes());
    push_label(&mut w, &label)?;
    push_label(&mut w, proto)?;
    w.extend_from_slice(base);
    (w.len() <= super::message::MAX_NAME_LEN).then(|| w.into_boxed_slice())
}

/// `d.c.b.a.in-addr.arpa` or the 32 nibbles of `ip6.arpa`, in wire form.
pub(crate) fn reverse_name(ip: IpAddr) -> Box<[u8]> {
    let mut w = Vec::with_capacity(74);
    match ip {
        IpAddr::V4(v4) => {
            for o in v4.octets().iter().rev() {
                let s = o.to_string();
                w.push(s.len() as u8);
                w.extend_from_slice(s.as_bytes());
            }
            w.extend_from_slice(IN_ADDR_ARPA);
        }
        IpAddr::V6(v6) => {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            for o in v6.octets().iter().rev() {
                w.extend_from_slice(&[1, HEX[usize::from(o & 0xf)], 1, HEX[usize::from(o >> 4)]]);
            }
            w.extend_from_slice(IP6_ARPA);
        }
    }
    w.into_boxed_slice()
}

fn parse_reverse_label(label: &[u8], bits: u8) -> Option<u8> {
    if bits == 4 {
        return match label {
            [c] => (*c as char).to_digit(16).map(|d| d as u8),
            _ => None,
        };
    }
    // Canonical decimal only: "010" is not the octet 10.
    if label.is_empty() || label.len() > 3 || (label.len() > 1 && label[0] == b'0') {
        return None;
    }
    let mut v = 0u16;
    for c in label {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u16::from(c - b'0');
    }
    u8::try_from(v).ok()
}

/// `10-244-1-3` or `fd00--1`: an address as one DNS label.
pub(crate) fn dashed(ip: IpAddr) -> String {
    ip.to_string().replace(['.', ':'], "-")
}

/// The inverse of [`dashed`], without allocating.
pub(crate) fn parse_dashed(label: &[u8]) -> Option<IpAddr> {
    let mut buf = [0u8; 63];
    let text = buf.get_mut(..label.len())?;
    let dashes = label.iter().filter(|&&c| c == b'-').count();
    let sep = if dashes == 3 && label.iter().all(|c| c.is_ascii_digit() || *c == b'-') {
        b'.'
    } else {
        b':'
    };
    for (d, s) in text.iter_mut().zip(label) {
        *d = if *s == b'-' { sep } else { *s };
    }
    let text = std::str::from_utf8(text).ok()?;
    if sep == b'.' {
        text.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
    } else {
        // Only the pure IPv6 form: an embedded IPv4 suffix would need dots.
        text.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
    }
}

/// An RFC 1123 label as Kubernetes names are: lowercase letters, digits, inner hyphens.
fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Every label of a wire name is a hostname label (any case).
fn is_hostname(wire: &[u8]) -> bool {
    let Ok((q, _)) = QName::read(wire, 0) else {
        return false;
    };
    (0..q.label_count()).all(|i| {
        let l = q.label(i);
        l.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
            && l.first() != Some(&b'-')
            && l.last() != Some(&b'-')
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::message::display_name;

    #[test]
    fn dashed_addresses_round_trip() {
        for ip in ["10.244.1.3", "0.0.0.0", "fd00::1", "2001:db8:0:1::a:b"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(parse_dashed(dashed(ip).as_bytes()), Some(ip), "{ip}");
        }
        assert_eq!(dashed("fd00::1".parse().unwrap()), "fd00--1");
        for bad in [&b"10-244-1"[..], b"10-244-1-300", b"a-b-c-d", b"", b"-"] {
            assert_eq!(
                parse_dashed(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn reverse_names_are_spec_form() {
        let v4 = reverse_name("10.96.0.1".parse().unwrap());
        assert_eq!(display_name(&v4), "1.0.96.10.in-addr.arpa.");
        let v6 = reverse_name("fd00::30".parse().unwrap());
        assert!(display_name(&v6).starts_with("0.3.0.0.0.0.0.0."));
        assert!(display_name(&v6).ends_with("0.0.d.f.ip6.arpa."));
    }

    #[test]
    fn bad_cluster_domains_are_refused() {
        for d in ["", ".", "a..b", "under_score.local", "-a.local"] {
            assert!(
                DnsTable::new::<ServiceSpec>(d, &[], &[], &[]).is_err(),
                "{d:?}"
            );
        }
        assert!(DnsTable::new::<ServiceSpec>("Cluster.Local.", &[], &[], &[]).is_ok());
    }
}
