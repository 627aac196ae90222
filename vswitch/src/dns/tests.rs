//! Answers from a table built from Service fixtures, checked with an independent parser
//! (simple-dns), as a client would see them.

use std::net::IpAddr;

use conf::config::{EndpointSpec, Protocol, ServicePort, ServiceSpec, TrafficPolicy};
use ipnet::IpNet;
use proptest::prelude::*;
use simple_dns::rdata::RData;
use simple_dns::{Packet, PacketFlag, CLASS, RCODE, TYPE};

use super::*;

fn port(name: Option<&str>, protocol: Protocol, port: u16, target: Option<u16>) -> ServicePort {
    ServicePort {
        name: name.map(str::to_string),
        protocol,
        port,
        target_port: target,
        node_port: None,
    }
}

fn ep(ip: &str, hostname: Option<&str>, ready: bool) -> EndpointSpec {
    EndpointSpec {
        ip: ip.parse().unwrap(),
        node: None,
        ready,
        serving: ready,
        terminating: false,
        hostname: hostname.map(str::to_string),
        ports: None,
        for_zones: Vec::new(),
        for_nodes: Vec::new(),
    }
}

fn svc(
    ns: &str,
    name: &str,
    ips: &[&str],
    ports: Vec<ServicePort>,
    endpoints: Vec<EndpointSpec>,
) -> ServiceSpec {
    ServiceSpec {
        namespace: ns.into(),
        name: name.into(),
        cluster_ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
        ports,
        external_ips: vec![],
        session_affinity_timeout: None,
        internal_traffic_policy: TrafficPolicy::Cluster,
        external_traffic_policy: TrafficPolicy::Cluster,
        load_balancer_ips: Vec::new(),
        health_check_node_port: None,
        proxy_name: None,
        endpoints,
    }
}

fn zones() -> Vec<IpNet> {
    ["10.96.0.0/12", "10.244.0.0/16", "fd00::/108"]
        .iter()
        .map(|z| z.parse().unwrap())
        .collect()
}

fn table() -> DnsTable {
    let services = vec![
        svc(
            "default",
            "kubernetes",
            &["10.96.0.1"],
            vec![port(Some("https"), Protocol::Tcp, 443, Some(6443))],
            vec![ep("192.168.0.10", None, true)],
        ),
        svc(
            "prod",
            "web",
            &["10.96.0.20"],
            vec![
                port(Some("http"), Protocol::Tcp, 80, Some(8080)),
                port(Some("dns"), Protocol::Udp, 53, None),
                port(None, Protocol::Tcp, 9090, None),
            ],
            vec![ep("10.244.1.9", None, true)],
        ),
        svc(
            "prod",
            "db",
            &[],
            vec![port(Some("pg"), Protocol::Tcp, 5432, None)],
            vec![
                ep("10.244.1.5", Some("db-0"), true),
                ep("10.244.2.6", Some("db-1"), true),
                ep("10.244.2.7", Some("db-2"), false),
                ep("10.244.1.8", None, true),
            ],
        ),
        svc("prod", "dual", &["10.96.0.30", "fd00::30"], vec![], vec![]),
        svc("prod", "empty", &[], vec![], vec![]),
    ];
    let pods = vec![
        LocalPod {
            namespace: "prod".into(),
            name: "web-abc".into(),
            ip: "10.244.1.9".parse().unwrap(),
        },
        LocalPod {
            namespace: "prod".into(),
            name: "db-0".into(),
            ip: "10.244.1.5".parse().unwrap(),
        },
    ];
    DnsTable::new("cluster.local", &services, &pods, &zones()).unwrap()
}

/// A query built by hand, for what simple-dns cannot express (unknown types, the DO bit).
fn raw_query(id: u16, name: &str, qtype: u16, edns: Option<(u16, bool, u8)>) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend(id.to_be_bytes());
    m.extend(0x0100u16.to_be_bytes()); // RD, as stub resolvers send
    m.extend([0, 1, 0, 0, 0, 0, 0, u8::from(edns.is_some())]);
    for l in name.split('.').filter(|l| !l.is_empty()) {
        m.push(l.len() as u8);
        m.extend(l.as_bytes());
    }
    m.push(0);
    m.extend(qtype.to_be_bytes());
    m.extend(1u16.to_be_bytes());
    if let Some((size, dnssec_ok, version)) = edns {
        m.push(0);
        m.extend(41u16.to_be_bytes());
        m.extend(size.to_be_bytes());
        m.extend([0, version, if dnssec_ok { 0x80 } else { 0 }, 0, 0, 0]);
    }
    m
}

/// A query as simple-dns builds it.
fn query(name: &str, qtype: TYPE) -> Vec<u8> {
    let mut p = Packet::new_query(0x4242);
    p.set_flags(PacketFlag::RECURSION_DESIRED);
    p.questions.push(simple_dns::Question::new(
        simple_dns::Name::new(name).unwrap(),
        qtype.into(),
        CLASS::IN.into(),
        false,
    ));
    p.build_bytes_vec().unwrap()
}

struct Reply(Vec<u8>);

impl Reply {
    fn packet(&self) -> Packet<'_> {
        Packet::parse(&self.0).expect("the reply parses with simple-dns")
    }
}

fn ask_with(t: &DnsTable, q: &[u8], out_len: usize, transport: Transport) -> Reply {
    let mut out = vec![0u8; out_len];
    match answer_with(t, q, &mut out, transport) {
        Answer::Local(n) => {
            assert!(n <= out_len);
            out.truncate(n);
            Reply(out)
        }
        other => panic!("expected a local answer, got {other:?}"),
    }
}

fn ask(t: &DnsTable, q: &[u8]) -> Reply {
    let r = ask_with(t, q, 4096, Transport::Udp);
    assert!(r.0.len() <= 512 || q.len() > 12 && has_opt(q));
    r
}

fn has_opt(q: &[u8]) -> bool {
    q[11] > 0
}

fn text(n: &simple_dns::Name) -> String {
    n.to_string()
}

fn addrs(p: &Packet) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = p
        .answers
        .iter()
        .filter_map(|rr| match &rr.rdata {
            RData::A(a) => Some(IpAddr::V4(a.address.into())),
            RData::AAAA(a) => Some(IpAddr::V6(a.address.into())),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = list.iter().map(|i| i.parse().unwrap()).collect();
    v.sort();
    v
}

/// Checks a negative answer: the rcode, no answers, and the zone's SOA in authority.
fn assert_negative(r: &Reply, rcode: RCODE, apex: &str) {
    let p = r.packet();
    assert_eq!(p.rcode(), rcode);
    assert!(p.answers.is_empty(), "{:?}", p.answers);
    assert!(p.has_flags(PacketFlag::AUTHORITATIVE_ANSWER));
    assert_eq!(p.name_servers.len(), 1);
    let soa = &p.name_servers[0];
    assert_eq!(text(&soa.name), apex);
    assert_eq!(soa.ttl, CLUSTER_TTL);
    let RData::SOA(s) = &soa.rdata else {
        panic!("authority is not an SOA: {soa:?}")
    };
    assert_eq!(text(&s.mname), "ns.dns.cluster.local");
    assert_eq!(text(&s.rname), "hostmaster.cluster.local");
    assert_eq!(s.minimum, CLUSTER_TTL);
}

fn forwarded(t: &DnsTable, q: &[u8]) -> bool {
    let mut out = [0u8; 512];
    answer(t, q, &mut out) == Answer::Forward
}

#[test]
fn cluster_ip_service_has_an_a_record() {
    let t = table();
    let r = ask(&t, &query("kubernetes.default.svc.cluster.local", TYPE::A));
    let p = r.packet();
    assert_eq!(p.id(), 0x4242);
    assert!(p.has_flags(PacketFlag::RESPONSE | PacketFlag::AUTHORITATIVE_ANSWER));
    assert!(p.has_flags(PacketFlag::RECURSION_DESIRED | PacketFlag::RECURSION_AVAILABLE));
    assert!(!p.has_flags(PacketFlag::TRUNCATION));
    assert_eq!(p.rcode(), RCODE::NoError);
    assert_eq!(addrs(&p), ips(&["10.96.0.1"]));
    assert_eq!(p.answers[0].ttl, CLUSTER_TTL);
    assert_eq!(
        text(&p.answers[0].name),
        "kubernetes.default.svc.cluster.local"
    );
    assert!(p.name_servers.is_empty() && p.additional_records.is_empty());
}

#[test]
fn names_match_in_any_case_and_the_question_comes_back_as_asked() {
    let t = table();
    let name = "KuBeRnEtEs.Default.SVC.Cluster.Local";
    let r = ask(&t, &query(name, TYPE::A));
    let p = r.packet();
    assert_eq!(text(&p.questions[0].qname), name);
    assert_eq!(text(&p.answers[0].name), name);
    assert_eq!(addrs(&p), ips(&["10.96.0.1"]));
}

#[test]
fn aaaa_for_an_ipv4_only_name_is_nodata_with_soa() {
    let t = table();
    let r = ask(
        &t,
        &query("kubernetes.default.svc.cluster.local", TYPE::AAAA),
    );
    assert_negative(&r, RCODE::NoError, "cluster.local");
}

#[test]
fn dual_stack_service_answers_both_families() {
    let t = table();
    let a = ask(&t, &query("dual.prod.svc.cluster.local", TYPE::A));
    assert_eq!(addrs(&a.packet()), ips(&["10.96.0.30"]));
    let aaaa = ask(&t, &query("dual.prod.svc.cluster.local", TYPE::AAAA));
    assert_eq!(addrs(&aaaa.packet()), ips(&["fd00::30"]));
}

#[test]
fn headless_service_returns_its_ready_endpoints() {
    let t = table();
    let r = ask(&t, &query("db.prod.svc.cluster.local", TYPE::A));
    assert_eq!(
        addrs(&r.packet()),
        ips(&["10.244.1.5", "10.244.2.6", "10.244.1.8"])
    );
}

#[test]
fn headless_endpoints_are_named_by_hostname_or_address() {
    let t = table();
    let r = ask(&t, &query("db-0.db.prod.svc.cluster.local", TYPE::A));
    assert_eq!(addrs(&r.packet()), ips(&["10.244.1.5"]));
    let r = ask(&t, &query("10-244-1-8.db.prod.svc.cluster.local", TYPE::A));
    assert_eq!(addrs(&r.packet()), ips(&["10.244.1.8"]));
    // Not ready: not published.
    let r = ask(&t, &query("db-2.db.prod.svc.cluster.local", TYPE::A));
    assert_negative(&r, RCODE::NameError, "cluster.local");
}

#[test]
fn srv_for_a_named_port_of_a_cluster_ip_service() {
    let t = table();
    let r = ask(
        &t,
        &query(
            "_https._tcp.kubernetes.default.svc.cluster.local",
            TYPE::SRV,
        ),
    );
    let p = r.packet();
    assert_eq!(p.answers.len(), 1);
    let RData::SRV(srv) = &p.answers[0].rdata else {
        panic!("{:?}", p.answers)
    };
    assert_eq!(srv.port, 443, "the Service's port, not the target port");
    assert_eq!(text(&srv.target), "kubernetes.default.svc.cluster.local");
    // The target's address rides along.
    assert_eq!(p.additional_records.len(), 1);
    assert_eq!(
        text(&p.additional_records[0].name),
        "kubernetes.default.svc.cluster.local"
    );
    assert!(matches!(p.additional_records[0].rdata, RData::A(_)));

    let r = ask(
        &t,
        &query("_dns._udp.web.prod.svc.cluster.local", TYPE::SRV),
    );
    let RData::SRV(srv) = &r.packet().answers[0].rdata else {
        panic!()
    };
    assert_eq!(srv.port, 53);
    // The protocol is part of the name.
    let r = ask(
        &t,
        &query("_dns._tcp.web.prod.svc.cluster.local", TYPE::SRV),
    );
    assert_negative(&r, RCODE::NameError, "cluster.local");
}

#[test]
fn srv_for_a_headless_service_lists_each_ready_endpoint() {
    let t = table();
    let r = ask(&t, &query("_pg._tcp.db.prod.svc.cluster.local", TYPE::SRV));
    let p = r.packet();
    let mut targets: Vec<(String, u16)> = p
        .answers
        .iter()
        .map(|rr| match &rr.rdata {
            RData::SRV(s) => (text(&s.target), s.port),
            other => panic!("{other:?}"),
        })
        .collect();
    targets.sort();
    assert_eq!(
        targets,
        vec![
            ("10-244-1-8.db.prod.svc.cluster.local".to_string(), 5432),
            ("db-0.db.prod.svc.cluster.local".to_string(), 5432),
            ("db-1.db.prod.svc.cluster.local".to_string(), 5432),
        ]
    );
    assert_eq!(p.additional_records.len(), 3);
}

#[test]
fn unnamed_ports_have_no_srv() {
    let t = table();
    let r = ask(
        &t,
        &query("_9090._tcp.web.prod.svc.cluster.local", TYPE::SRV),
    );
    assert_negative(&r, RCODE::NameError, "cluster.local");
}

#[test]
fn ptr_for_cluster_ips() {
    let t = table();
    let r = ask(&t, &query("1.0.96.10.in-addr.arpa", TYPE::PTR));
    let p = r.packet();
    let RData::PTR(ptr) = &p.answers[0].rdata else {
        panic!("{:?}", p.answers)
    };
    assert_eq!(text(&ptr.0), "kubernetes.default.svc.cluster.local");
    assert!(p.has_flags(PacketFlag::AUTHORITATIVE_ANSWER));

    let v6 = "0.3.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa";
    let r = ask(&t, &query(v6, TYPE::PTR));
    let RData::PTR(ptr) = &r.packet().answers[0].rdata else {
        panic!()
    };
    assert_eq!(text(&ptr.0), "dual.prod.svc.cluster.local");
}

#[test]
fn ptr_for_pods_prefers_the_headless_hostname() {
    let t = table();
    let ptr_of = |name: &str| {
        let r = ask(&t, &query(name, TYPE::PTR));
        let p = r.packet();
        assert_eq!(p.answers.len(), 1, "{name}");
        match &p.answers[0].rdata {
            RData::PTR(ptr) => text(&ptr.0),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(
        ptr_of("5.1.244.10.in-addr.arpa"),
        "db-0.db.prod.svc.cluster.local"
    );
    assert_eq!(
        ptr_of("9.1.244.10.in-addr.arpa"),
        "10-244-1-9.prod.pod.cluster.local"
    );
}

#[test]
fn reverse_lookups_in_cluster_ranges_are_authoritative() {
    let t = table();
    let r = ask(&t, &query("99.3.244.10.in-addr.arpa", TYPE::PTR));
    assert_negative(&r, RCODE::NameError, "244.10.in-addr.arpa");
    // A /12 has no single apex name: the /16 around the name stands in.
    let r = ask(&t, &query("99.0.97.10.in-addr.arpa", TYPE::PTR));
    assert_negative(&r, RCODE::NameError, "97.10.in-addr.arpa");
    // Above an existing PTR: the name exists, without records.
    let r = ask(&t, &query("1.244.10.in-addr.arpa", TYPE::PTR));
    assert_negative(&r, RCODE::NoError, "244.10.in-addr.arpa");
    // An existing PTR name asked for another type.
    let r = ask(&t, &query("1.0.96.10.in-addr.arpa", TYPE::A));
    assert_negative(&r, RCODE::NoError, "96.10.in-addr.arpa");
    // Outside the cluster's ranges it is the upstream's business.
    assert!(forwarded(&t, &query("8.8.8.8.in-addr.arpa", TYPE::PTR)));
    assert!(forwarded(&t, &query("10.in-addr.arpa", TYPE::SOA)));
    assert!(forwarded(&t, &query("in-addr.arpa", TYPE::SOA)));
}

#[test]
fn pod_names_resolve_from_the_address_in_them() {
    let t = table();
    let r = ask(&t, &query("10-244-3-4.any-ns.pod.cluster.local", TYPE::A));
    assert_eq!(addrs(&r.packet()), ips(&["10.244.3.4"]));
    let r = ask(
        &t,
        &query("10-244-3-4.any-ns.pod.cluster.local", TYPE::AAAA),
    );
    assert_negative(&r, RCODE::NoError, "cluster.local");
    let r = ask(&t, &query("fd00--5.any-ns.pod.cluster.local", TYPE::AAAA));
    assert_eq!(addrs(&r.packet()), ips(&["fd00::5"]));
    let r = ask(&t, &query("not-an-ip.any-ns.pod.cluster.local", TYPE::A));
    assert_negative(&r, RCODE::NameError, "cluster.local");
    let r = ask(&t, &query("10-244-3-4.x.y.pod.cluster.local", TYPE::A));
    assert_negative(&r, RCODE::NameError, "cluster.local");
    let r = ask(&t, &query("any-ns.pod.cluster.local", TYPE::A));
    assert_negative(&r, RCODE::NoError, "cluster.local");
}

#[test]
fn missing_names_in_the_cluster_domain_are_nxdomain_with_soa() {
    let t = table();
    for name in [
        "missing.prod.svc.cluster.local",
        "kubernetes.nosuchns.svc.cluster.local",
        "nosuchns.svc.cluster.local",
        "foo.cluster.local",
    ] {
        let r = ask(&t, &query(name, TYPE::A));
        assert_negative(&r, RCODE::NameError, "cluster.local");
    }
}

#[test]
fn search_list_misses_get_nxdomain_without_forwarding() {
    let t = table();
    // What a pod in `prod` with ndots:5 tries for `web.prod.svc.cluster.local` and
    // `example.com` before the absolute name.
    for name in [
        "web.prod.svc.cluster.local.prod.svc.cluster.local",
        "web.prod.svc.cluster.local.svc.cluster.local",
        "web.prod.svc.cluster.local.cluster.local",
        "example.com.prod.svc.cluster.local",
        "example.com.svc.cluster.local",
        "example.com.cluster.local",
    ] {
        let r = ask(&t, &query(name, TYPE::A));
        assert_negative(&r, RCODE::NameError, "cluster.local");
    }
    // The search list's first try for a short name hits.
    let r = ask(&t, &query("web.prod.svc.cluster.local", TYPE::A));
    assert_eq!(addrs(&r.packet()), ips(&["10.96.0.20"]));
}

#[test]
fn names_outside_the_cluster_are_forwarded() {
    let t = table();
    for name in ["example.com", "cluster.local.example.com", "local", "."] {
        assert!(forwarded(&t, &query(name, TYPE::A)), "{name}");
    }
    // Unknown types and other classes outside the zone go upstream unchanged.
    assert!(forwarded(&t, &raw_query(1, "example.com", 65, None)));
    let mut chaos = raw_query(1, "version.bind", 16, None);
    let n = chaos.len();
    chaos[n - 1] = 3;
    assert!(forwarded(&t, &chaos));
}

#[test]
fn empty_non_terminals_are_nodata() {
    let t = table();
    for name in [
        "prod.svc.cluster.local",
        "svc.cluster.local",
        "empty.prod.svc.cluster.local",
        "_tcp.kubernetes.default.svc.cluster.local",
        "pod.cluster.local",
    ] {
        let r = ask(&t, &query(name, TYPE::A));
        assert_negative(&r, RCODE::NoError, "cluster.local");
    }
}

#[test]
fn the_zone_apex_has_an_soa_and_the_schema_version_is_published() {
    let t = table();
    let r = ask(&t, &query("cluster.local", TYPE::SOA));
    let p = r.packet();
    assert_eq!(p.answers.len(), 1);
    assert!(matches!(p.answers[0].rdata, RData::SOA(_)));

    let r = ask(&t, &query("dns-version.cluster.local", TYPE::TXT));
    let p = r.packet();
    let RData::TXT(txt) = p.answers[0].rdata.clone() else {
        panic!()
    };
    assert_eq!(String::try_from(txt).unwrap(), SPEC_VERSION);
}

#[test]
fn any_returns_every_record_and_unknown_types_are_nodata() {
    let t = table();
    let r = ask(&t, &raw_query(7, "dual.prod.svc.cluster.local", 255, None));
    assert_eq!(addrs(&r.packet()), ips(&["10.96.0.30", "fd00::30"]));
    // HTTPS (65) is asked for by browsers and curl for every name.
    let r = ask(&t, &raw_query(7, "web.prod.svc.cluster.local", 65, None));
    assert_negative(&r, RCODE::NoError, "cluster.local");
}

fn big_headless(n: usize) -> DnsTable {
    let eps = (0..n)
        .map(|i| {
            let ip = format!("10.244.{}.{}", i / 200, i % 200 + 2);
            let host = format!("db-{i:02}");
            ep(&ip, Some(&host), true)
        })
        .collect();
    let s = svc(
        "prod",
        "big",
        &[],
        vec![port(Some("pg"), Protocol::Tcp, 5432, None)],
        eps,
    );
    DnsTable::new("cluster.local", &[s], &[], &zones()).unwrap()
}

#[test]
fn answers_too_big_for_udp_are_truncated() {
    let t = big_headless(100);
    let name = "big.prod.svc.cluster.local";
    // No EDNS: 512 bytes.
    let r = ask(&t, &raw_query(9, name, 1, None));
    assert!(r.0.len() <= 512);
    let p = r.packet();
    assert!(p.has_flags(PacketFlag::TRUNCATION));
    // Whole records only, as many as fit (a client without TCP fallback can use them).
    let fit = p.answers.len();
    assert!(fit > 10 && fit < 100, "{fit} answers");
    assert!(r.0.len() + 16 > 512, "room was left for another record");
    assert!(p.name_servers.is_empty() && p.additional_records.is_empty());
    assert_eq!(p.questions.len(), 1);
    assert!(p.opt().is_none());

    // EDNS with room for all of them.
    let r = ask(&t, &raw_query(9, name, 1, Some((4096, false, 0))));
    let p = r.packet();
    assert!(!p.has_flags(PacketFlag::TRUNCATION));
    assert_eq!(p.answers.len(), 100);
    assert_eq!(p.opt().map(|o| o.udp_packet_size), Some(1232));

    // EDNS, but the caller's buffer is smaller: the buffer wins, the OPT stays.
    let r = ask_with(
        &t,
        &raw_query(9, name, 1, Some((4096, false, 0))),
        700,
        Transport::Udp,
    );
    assert!(r.0.len() <= 700);
    let p = r.packet();
    assert!(p.has_flags(PacketFlag::TRUNCATION));
    assert!(p.answers.len() > fit && p.answers.len() < 100);
    assert!(p.opt().is_some());

    // TCP has no such limit.
    let r = ask_with(&t, &raw_query(9, name, 1, None), 65535, Transport::Tcp);
    let p = r.packet();
    assert!(!p.has_flags(PacketFlag::TRUNCATION));
    assert_eq!(p.answers.len(), 100);
}

#[test]
fn srv_target_addresses_are_dropped_before_answers_are() {
    let t = big_headless(15);
    let q = raw_query(
        3,
        "_pg._tcp.big.prod.svc.cluster.local",
        33,
        Some((1232, false, 0)),
    );
    let r = ask(&t, &q);
    assert!(r.0.len() <= 1232);
    let p = r.packet();
    assert!(!p.has_flags(PacketFlag::TRUNCATION));
    assert_eq!(p.answers.len(), 15);
    let extra = p.additional_records.len();
    assert!(extra > 0 && extra < 15, "{extra} additional records");
}

/// The TTL field of the OPT record, which the switch always writes last. Read by hand:
/// simple-dns 0.13 takes the EDNS version and extended RCODE from the wrong bits of it.
fn opt_ttl(reply: &[u8]) -> u32 {
    let n = reply.len();
    assert_eq!(
        &reply[n - 11..n - 8],
        &[0, 0, 41],
        "the last record is an OPT"
    );
    u32::from_be_bytes(reply[n - 6..n - 2].try_into().unwrap())
}

#[test]
fn edns_is_echoed_with_the_do_bit() {
    let t = table();
    let name = "kubernetes.default.svc.cluster.local";
    for dnssec_ok in [false, true] {
        let r = ask(&t, &raw_query(5, name, 1, Some((1400, dnssec_ok, 0))));
        let p = r.packet();
        assert_eq!(addrs(&p), ips(&["10.96.0.1"]));
        assert_eq!(p.opt().map(|o| o.udp_packet_size), Some(1232));
        // Extended RCODE 0, version 0, DO as asked.
        let want = if dnssec_ok { 0x8000 } else { 0 };
        assert_eq!(opt_ttl(&r.0), want);
    }
    // No OPT in, none out.
    assert!(ask(&t, &raw_query(5, name, 1, None))
        .packet()
        .opt()
        .is_none());
    // EDNS versions past 0 get BADVERS (RFC 6891 §6.1.3): extended RCODE 1, header RCODE 0.
    let r = ask(&t, &raw_query(5, name, 1, Some((1400, false, 1))));
    let p = r.packet();
    assert!(p.answers.is_empty());
    assert_eq!(r.0[3] & 0xf, 0);
    assert_eq!(opt_ttl(&r.0) >> 24, 1);
}

#[test]
fn malformed_queries() {
    let t = table();
    let mut out = [0u8; 512];
    let good = query("kubernetes.default.svc.cluster.local", TYPE::A);
    // Nothing to reply to.
    assert_eq!(answer(&t, &good[..11], &mut out), Answer::Invalid);
    let mut response = good.clone();
    response[2] |= 0x80;
    assert_eq!(answer(&t, &response, &mut out), Answer::Invalid);
    assert_eq!(answer(&t, &good, &mut out[..20]), Answer::Invalid);

    // A readable header gets FORMERR with its ID.
    let formerr = |q: &[u8]| {
        let mut out = [0u8; 512];
        let Answer::Local(n) = answer(&t, q, &mut out) else {
            panic!("no reply")
        };
        let reply = Reply(out[..n].to_vec());
        let p = reply.packet();
        assert_eq!(p.id(), 0x4242);
        assert_eq!(p.rcode(), RCODE::FormatError);
    };
    formerr(&good[..good.len() - 1]);
    let mut no_question = good.clone();
    no_question[5] = 0;
    formerr(&no_question);
    let mut two_questions = good.clone();
    two_questions[5] = 2;
    formerr(&two_questions);
    let mut two_opts = raw_query(0x4242, "a.cluster.local", 1, Some((1232, false, 0)));
    let opt = two_opts[two_opts.len() - 11..].to_vec();
    two_opts.extend(opt);
    two_opts[11] = 2;
    formerr(&two_opts);

    // Readable, but not something the switch does.
    let rcode_of = |q: &[u8]| {
        let mut out = [0u8; 512];
        let Answer::Local(_) = answer(&t, q, &mut out) else {
            panic!("no reply")
        };
        out[3] & 0xf
    };
    let mut status = good.clone();
    status[2] |= 2 << 3;
    assert_eq!(rcode_of(&status), 4, "NOTIMP");
    let mut chaos = good.clone();
    let n = chaos.len();
    chaos[n - 1] = 3;
    assert_eq!(rcode_of(&chaos), 5, "REFUSED");
    assert_eq!(
        rcode_of(&raw_query(1, "cluster.local", 252, None)),
        5,
        "AXFR"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn never_panics_on_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        out_len in 0usize..1300,
        tcp in any::<bool>(),
    ) {
        let t = table();
        let mut out = vec![0u8; out_len];
        let transport = if tcp { Transport::Tcp } else { Transport::Udp };
        if let Answer::Local(n) = answer_with(&t, &bytes, &mut out, transport) {
            prop_assert!(n >= 12 && n <= out_len);
            prop_assert_eq!(&out[..2], &bytes[..2]);
            prop_assert!(out[2] & 0x80 != 0);
        }
    }

    #[test]
    fn never_panics_on_damaged_queries(
        which in 0usize..6,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        cut in any::<usize>(),
    ) {
        let t = table();
        let names = [
            "kubernetes.default.svc.cluster.local",
            "_pg._tcp.db.prod.svc.cluster.local",
            "1.0.96.10.in-addr.arpa",
            "10-244-3-4.x.pod.cluster.local",
            "missing.cluster.local",
            "example.com",
        ];
        let mut q = raw_query(0x4242, names[which], 33, Some((1232, true, 0)));
        for (at, v) in edits {
            let i = at % q.len();
            q[i] = v;
        }
        q.truncate(cut % (q.len() + 1));
        let mut out = [0u8; 1232];
        if let Answer::Local(n) = answer(&t, &q, &mut out) {
            prop_assert!(n >= 12 && n <= out.len());
        }
    }
}

#[test]
fn answers_parse_for_every_name_and_type() {
    // Every record kind the table has, every common type: each reply is well formed.
    let t = table();
    let names = [
        "cluster.local",
        "kubernetes.default.svc.cluster.local",
        "db.prod.svc.cluster.local",
        "_pg._tcp.db.prod.svc.cluster.local",
        "_https._tcp.kubernetes.default.svc.cluster.local",
        "1.0.96.10.in-addr.arpa",
        "5.1.244.10.in-addr.arpa",
        "10-244-3-4.prod.pod.cluster.local",
        "nope.cluster.local",
        "dns-version.cluster.local",
    ];
    for name in names {
        for qtype in [1u16, 2, 5, 6, 12, 16, 28, 33, 255] {
            for edns in [None, Some((1232, true, 0))] {
                let r = ask(&t, &raw_query(1, name, qtype, edns));
                let p = r.packet();
                assert_eq!(p.questions.len(), 1, "{name} {qtype}");
                for rr in p.answers.iter() {
                    assert!(rr.match_qclass(CLASS::IN.into()));
                }
            }
        }
    }
}
