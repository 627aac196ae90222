//! The verdict against the model of the upstream NetworkPolicy e2e suite: namespaces x, y and z,
//! pods a, b and c in each, serving ports 80 and 81 over TCP and UDP; each case states the
//! whole truth table of pod pairs that may connect.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use k8s_openapi::api::networking::v1::NetworkPolicy;

use super::*;

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];

struct Cluster {
    pods: Vec<(IpAddr, PodMeta)>,
    ns_labels: Vec<(Arc<str>, Labels)>,
    policies: Vec<Policy>,
}

fn ip_of(ns: usize, pod: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 244, ns as u8, 10 + pod as u8))
}

impl Cluster {
    fn new() -> Cluster {
        let ports: Arc<[NamedPort]> = [80u16, 81]
            .iter()
            .flat_map(|&p| {
                [(Proto::Tcp, "tcp"), (Proto::Udp, "udp")].map(|(proto, n)| NamedPort {
                    name: format!("serve-{p}-{n}").into(),
                    proto,
                    port: p,
                })
            })
            .collect();
        let mut pods = Vec::new();
        for (i, ns) in NAMESPACES.iter().enumerate() {
            for (j, pod) in PODS.iter().enumerate() {
                pods.push((
                    ip_of(i, j),
                    PodMeta {
                        namespace: (*ns).into(),
                        name: (*pod).into(),
                        labels: Arc::new(Labels::new([("pod", *pod)])),
                        ports: ports.clone(),
                    },
                ));
            }
        }
        let ns_labels = NAMESPACES
            .iter()
            .map(|n| (Arc::from(*n), Labels::new([("ns", *n)])))
            .collect();
        Cluster {
            pods,
            ns_labels,
            policies: Vec::new(),
        }
    }

    fn apply(&mut self, ns: &str, yaml_spec: &str) -> &mut Self {
        let name = format!("p{}", self.policies.len());
        let np: NetworkPolicy = serde_json::from_str(&format!(
            r#"{{"metadata":{{"name":"{name}","namespace":"{ns}"}},"spec":{yaml_spec}}}"#
        ))
        .unwrap();
        self.policies
            .push(Policy::from_k8s(&np, "default").unwrap());
        self
    }

    fn set(&self) -> PolicySet {
        PolicySet::new(self.policies.clone(), self.ns_labels.clone())
    }

    fn pod(&self, name: &str) -> &(IpAddr, PodMeta) {
        let (ns, pod) = name.split_once('/').unwrap();
        self.pods
            .iter()
            .find(|(_, m)| &*m.namespace == ns && &*m.name == pod)
            .unwrap()
    }

    /// Whether `from` may open a connection to `to` on `proto`/`port`: the source's egress
    /// (at its switch) and the destination's ingress (at its switch).
    fn allowed(&self, set: &PolicySet, from: &str, to: &str, proto: u8, port: u16) -> bool {
        let (sip, src) = self.pod(from);
        let (dip, dst) = self.pod(to);
        let out = set.judge(
            set.select(src).get(Direction::Egress),
            Direction::Egress,
            src,
            Remote {
                ip: *dip,
                pod: Some(dst),
            },
            proto,
            port,
        );
        let inn = set.judge(
            set.select(dst).get(Direction::Ingress),
            Direction::Ingress,
            dst,
            Remote {
                ip: *sip,
                pod: Some(src),
            },
            proto,
            port,
        );
        out.allows() && inn.allows()
    }

    /// The truth table, one row a source: `X` may connect, `.` may not; columns in the order
    /// x/a x/b x/c y/a ... z/c.
    fn table(&self, proto: u8, port: u16) -> String {
        let set = self.set();
        expect(|from, to| self.allowed(&set, from, to, proto, port))
    }
}

const TCP: u8 = 6;
const UDP: u8 = 17;

/// A table where everyone reaches everyone, except as `f(from, to)` says.
fn expect(f: impl Fn(&str, &str) -> bool) -> String {
    let names: Vec<String> = NAMESPACES
        .iter()
        .flat_map(|n| PODS.iter().map(move |p| format!("{n}/{p}")))
        .collect();
    let mut out = String::new();
    for from in &names {
        out.push_str(from);
        out.push(' ');
        for to in &names {
            out.push(if f(from, to) { 'X' } else { '.' });
        }
        out.push('\n');
    }
    out
}

#[test]
fn no_policy_admits_everything() {
    let c = Cluster::new();
    assert_eq!(c.table(TCP, 80), expect(|_, _| true));
}

#[test]
fn deny_all_ingress_isolates_the_namespace() {
    let mut c = Cluster::new();
    c.apply("x", r#"{"podSelector":{},"ingress":[]}"#);
    assert_eq!(c.table(TCP, 80), expect(|_, to| !to.starts_with("x/")));
    assert_eq!(c.table(UDP, 81), expect(|_, to| !to.starts_with("x/")));
}

#[test]
fn allow_all_ingress_beside_deny_all() {
    let mut c = Cluster::new();
    c.apply("x", r#"{"podSelector":{},"ingress":[]}"#)
        .apply("x", r#"{"podSelector":{},"ingress":[{}]}"#);
    assert_eq!(c.table(TCP, 80), expect(|_, _| true));
}

#[test]
fn deny_all_egress() {
    let mut c = Cluster::new();
    c.apply("x", r#"{"podSelector":{},"policyTypes":["Egress"]}"#);
    assert_eq!(c.table(TCP, 80), expect(|from, _| !from.starts_with("x/")));
}

#[test]
fn deny_all_both_ways() {
    let mut c = Cluster::new();
    c.apply(
        "x",
        r#"{"podSelector":{},"policyTypes":["Ingress","Egress"]}"#,
    );
    assert_eq!(
        c.table(TCP, 80),
        expect(|from, to| !from.starts_with("x/") && !to.starts_with("x/"))
    );
}

#[test]
fn ingress_from_pods_of_the_same_namespace_by_label() {
    let mut c = Cluster::new();
    c.apply(
        "x",
        r#"{"podSelector":{"matchLabels":{"pod":"a"}},"ingress":[{"from":[{"podSelector":{"matchLabels":{"pod":"b"}}}]}]}"#,
    );
    assert_eq!(
        c.table(TCP, 80),
        expect(|from, to| to != "x/a" || from == "x/b")
    );
}

#[test]
fn ingress_from_a_namespace_by_label() {
    let mut c = Cluster::new();
    c.apply(
        "x",
        r#"{"podSelector":{"matchLabels":{"pod":"a"}},"ingress":[{"from":[{"namespaceSelector":{"matchLabels":{"ns":"y"}}}]}]}"#,
    );
    assert_eq!(
        c.table(TCP, 80),
        expect(|from, to| to != "x/a" || from.starts_with("y/"))
    );
}

#[test]
fn ingress_from_a_namespace_by_its_automatic_name_label() {
    let mut c = Cluster::new();
    c.apply(
        "x",
        r#"{"podSelector":{"matchLabels":{"pod":"a"}},"ingress":[{"from":[{"namespaceSelector":{"matchExpressions":[{"key":"kubernetes.io/metadata.name","operator":"NotIn","values":["y"]}]}}]}]}"#,
    );
    assert_eq!(
        c.table(TCP, 80),
        expect(|from, to| to != "x/a" || !from.starts_with("y/"))
    );
}

#[test]
fn ingress_from_pods_and_namespaces_together_and_apart() {
    // Together in one peer: pod=b in namespace y only.
    let mut c = Cluster::new();
    c.apply(
        "x",
        r#"{"podSelector":{"matchLabels":{"pod":"a"}},"ingress":[{"from":[{"namespaceSelector":{"matchLabels":{"ns":"y"}},"podSelector":{"matchLabels":{"pod":"b"}}}]}]}"#,
    );
    assert_eq!(
        c.table(TCP, 80),
        expect(|from, to| to != "x/a" || from == "y/b")
    );
    // Two peers: anything in y, or pod=b in x.
    let mut c = Cluster::new();
    c.apply(
        "x",
        r#"{"podSelector":{"matchLabels":{"pod":"a"}},"ingress":[{"from":[{"namespaceSelector":{"matchLabels":{"ns":"y"}}},{"podSelector":{"matchLabels":{"pod":"b"}}}]}]}"#,
    );
    assert_eq!(
        c.table(TCP, 80),
        expect(|from, to| to != "x/a" || from.starts_with("y/") || from == "x/b")
    );
}

#[test]
fn ingress_from_every_namespace_by_pod_label() {
    let mut c = Cluster::new();
    c.apply(
        "x",
        r#"{"podSelector":{"matchLabels":{"pod":"a"}},"ingress":[{"from":[{"namespaceSelector":{},"podSelector":{"matchLabels":{"pod":"c"}}}]}]}"#,
    );
    assert_eq!(
        c.table(TCP, 80),
        expect(|from, to| to != "x/a" || from.ends_with("/c"))
    );
}

#[test]
fn match_expressions_select_pods() {
    let mut c = Cluster::new();
    c.apply(
        "x",
        r#"{"podSelector":{"matchExpressions":[{"key":"pod","operator":"In","values":["a","b"]}]},"ingress":[{"from":[{"podSelector":{"matchExpressions":[{"key":"pod","operator":"NotIn","values":["a"]}]}}]}]}"#,
    );
    assert_eq!(
        c.table(TCP, 80),
        expect(|from, to| !(to == "x/a" || to == "x/b") || from == "x/b" || from == "x/c")
    );
}

#[test]
fn ingress_on_a_port_number_only() {
    let mut c = Cluster::new();
    c.apply(
        "x",
        r#"{"podSelector":{"matchLabels":{"pod":"a"}},"ingress":[{"ports":[{"port":81}]}]}"#,
    );
    assert_eq!(c.table(TCP, 81), expect(|_, _| true));
    assert_eq!(c.table(TCP, 80), expect(|_, to| to != "x/a"));
    // TCP is the default protocol: UDP 81 is not admitted.
    assert_eq!(c.table(UDP, 81), expect(|_, to| to != "x/a"));
}

#[test]
fn ingress_on_a_named_port_resolves_on_the_destination() {
    let mut c = Cluster::new();
    c.apply(
        "x",
        r#"{"podSelector":{},"ingress":[{"ports":[{"port":"serve-80-udp","protocol":"UDP"}]}]}"#,
    );
    assert_eq!(c.table(UDP, 80), expect(|_, _| true));
    assert_eq!(c.table(UDP, 81), expect(|_, to| !to.starts_with("x/")));
    assert_eq!(c.table(TCP, 80), expect(|_, to| !to.starts_with("x/")));
}

#[test]
fn egress_on_a_named_port_resolves_on_the_destination_pod() {
    let mut c = Cluster::new();
    c.apply(
        "x",
        r#"{"podSelector":{"matchLabels":{"pod":"a"}},"policyTypes":["Egress"],"egress":[{"ports":[{"port":"serve-81-tcp"}]}]}"#,
    );
    assert_eq!(c.table(TCP, 81), expect(|_, _| true));
    assert_eq!(c.table(TCP, 80), expect(|from, _| from != "x/a"));
    // An address that is no pod has no named ports.
    let set = c.set();
    let (_, a) = c.pod("x/a");
    let sel = set.select(a);
    let outside = Remote {
        ip: "192.0.2.1".parse().unwrap(),
        pod: None,
    };
    assert_eq!(
        set.judge(
            sel.get(Direction::Egress),
            Direction::Egress,
            a,
            outside,
            TCP,
            81
        ),
        Judgement::Denied
    );
}

#[test]
fn end_port_ranges() {
    let mut c = Cluster::new();
    c.apply(
        "x",
        r#"{"podSelector":{},"ingress":[{"ports":[{"port":80,"endPort":81,"protocol":"UDP"}]}]}"#,
    );
    assert_eq!(c.table(UDP, 80), expect(|_, _| true));
    assert_eq!(c.table(UDP, 81), expect(|_, _| true));
    assert_eq!(c.table(TCP, 81), expect(|_, to| !to.starts_with("x/")));
}

#[test]
fn several_policies_add_up() {
    let mut c = Cluster::new();
    c.apply(
        "x",
        r#"{"podSelector":{"matchLabels":{"pod":"a"}},"ingress":[{"from":[{"podSelector":{"matchLabels":{"pod":"b"}}}]}]}"#,
    )
    .apply(
        "x",
        r#"{"podSelector":{"matchLabels":{"pod":"a"}},"ingress":[{"from":[{"namespaceSelector":{"matchLabels":{"ns":"z"}},"podSelector":{"matchLabels":{"pod":"c"}}}]}]}"#,
    );
    assert_eq!(
        c.table(TCP, 80),
        expect(|from, to| to != "x/a" || from == "x/b" || from == "z/c")
    );
}

#[test]
fn egress_and_ingress_must_both_admit() {
    let mut c = Cluster::new();
    // x/a may only send to y; y/b takes only from z. The first policy has egress rules and no
    // policyTypes, so it is both Ingress and Egress: x/a takes nothing at all.
    c.apply(
        "x",
        r#"{"podSelector":{"matchLabels":{"pod":"a"}},"egress":[{"to":[{"namespaceSelector":{"matchLabels":{"ns":"y"}}}]}]}"#,
    )
    .apply(
        "y",
        r#"{"podSelector":{"matchLabels":{"pod":"b"}},"ingress":[{"from":[{"namespaceSelector":{"matchLabels":{"ns":"z"}}}]}]}"#,
    );
    assert_eq!(
        c.table(TCP, 80),
        expect(|from, to| {
            let egress_ok = from != "x/a" || to.starts_with("y/");
            let ingress_ok = to != "y/b" || from.starts_with("z/");
            egress_ok && ingress_ok && to != "x/a"
        })
    );
}

#[test]
fn ip_blocks_with_except() {
    let mut c = Cluster::new();
    // All of namespace y's addresses (10.244.1.0/24) but y/b's.
    c.apply(
        "x",
        r#"{"podSelector":{"matchLabels":{"pod":"a"}},"ingress":[{"from":[{"ipBlock":{"cidr":"10.244.1.0/24","except":["10.244.1.11/32"]}}]}]}"#,
    );
    assert_eq!(
        c.table(TCP, 80),
        expect(|from, to| to != "x/a" || (from.starts_with("y/") && from != "y/b"))
    );
}

#[test]
fn egress_to_an_ip_block() {
    let mut c = Cluster::new();
    c.apply(
        "x",
        r#"{"podSelector":{"matchLabels":{"pod":"a"}},"policyTypes":["Egress"],"egress":[{"to":[{"ipBlock":{"cidr":"10.244.2.12/32"}}]}]}"#,
    );
    assert_eq!(
        c.table(TCP, 80),
        expect(|from, to| from != "x/a" || to == "z/c")
    );
}

#[test]
fn a_policy_in_another_namespace_selects_nothing_here() {
    let mut c = Cluster::new();
    c.apply("y", r#"{"podSelector":{"matchLabels":{"pod":"a"}}}"#);
    assert_eq!(c.table(TCP, 80), expect(|_, to| to != "y/a"));
}

#[test]
fn changed_pod_labels_change_the_table() {
    let mut c = Cluster::new();
    c.apply(
        "x",
        r#"{"podSelector":{"matchLabels":{"pod":"a"}},"ingress":[{"from":[{"podSelector":{"matchLabels":{"pod":"b"}}}]}]}"#,
    );
    // x/c takes the label pod=b.
    let idx = c
        .pods
        .iter()
        .position(|(_, m)| &*m.namespace == "x" && &*m.name == "c")
        .unwrap();
    c.pods[idx].1.labels = Arc::new(Labels::new([("pod", "b")]));
    assert_eq!(
        c.table(TCP, 80),
        expect(|from, to| to != "x/a" || from == "x/b" || from == "x/c")
    );
}

#[test]
fn changed_namespace_labels_change_the_table() {
    let mut c = Cluster::new();
    c.apply(
        "x",
        r#"{"podSelector":{},"ingress":[{"from":[{"namespaceSelector":{"matchLabels":{"team":"blue"}}}]}]}"#,
    );
    assert_eq!(c.table(TCP, 80), expect(|_, to| !to.starts_with("x/")));
    c.ns_labels[2].1 = Labels::new([("ns", "z"), ("team", "blue")]);
    assert_eq!(
        c.table(TCP, 80),
        expect(|from, to| !to.starts_with("x/") || from.starts_with("z/"))
    );
}

#[test]
fn a_source_the_switch_cannot_place_is_judged_by_ip_blocks_alone() {
    let mut c = Cluster::new();
    c.apply(
        "x",
        r#"{"podSelector":{},"ingress":[{"from":[{"namespaceSelector":{}},{"ipBlock":{"cidr":"192.0.2.0/24"}}]}]}"#,
    );
    let set = c.set();
    let (_, a) = c.pod("x/a");
    let sel = set.select(a);
    let judge = |ip: &str| {
        set.judge(
            sel.get(Direction::Ingress),
            Direction::Ingress,
            a,
            Remote {
                ip: ip.parse().unwrap(),
                pod: None,
            },
            TCP,
            80,
        )
    };
    assert_eq!(judge("192.0.2.7"), Judgement::Allowed(0));
    // A pod address whose labels are not known yet: denied until they are.
    assert_eq!(judge("10.244.1.10"), Judgement::Denied);
}

#[test]
fn icmp_passes_only_rules_without_ports() {
    let mut c = Cluster::new();
    c.apply(
        "x",
        r#"{"podSelector":{"matchLabels":{"pod":"a"}},"ingress":[{"ports":[{"port":80}]}]}"#,
    );
    assert_eq!(c.table(1, 0), expect(|_, to| to != "x/a"));
    c.apply(
        "x",
        r#"{"podSelector":{"matchLabels":{"pod":"a"}},"ingress":[{"from":[{"podSelector":{}}]}]}"#,
    );
    assert_eq!(
        c.table(1, 0),
        expect(|from, to| to != "x/a" || from.starts_with("x/"))
    );
}

#[test]
fn the_admitting_policies_are_named() {
    let mut c = Cluster::new();
    c.apply("x", r#"{"podSelector":{},"ingress":[{}]}"#)
        .apply(
            "x",
            r#"{"podSelector":{},"ingress":[{"ports":[{"port":81}]}]}"#,
        )
        .apply("x", r#"{"podSelector":{},"ingress":[]}"#);
    let set = c.set();
    let (_, a) = c.pod("x/a");
    let (bip, b) = c.pod("y/b");
    let sel = set.select(a);
    assert_eq!(sel.ingress.len(), 3);
    assert!(sel.egress.is_empty());
    let remote = Remote {
        ip: *bip,
        pod: Some(b),
    };
    let names = |port| -> Vec<String> {
        set.admitting(&sel.ingress, Direction::Ingress, a, remote, TCP, port)
            .into_iter()
            .map(|i| set.policy(i).unwrap().id())
            .collect()
    };
    assert_eq!(names(81), ["x/p0", "x/p1"]);
    assert_eq!(names(80), ["x/p0"]);
}
