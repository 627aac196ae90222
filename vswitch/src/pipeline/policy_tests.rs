//! NetworkPolicy on the pipeline's paths: switched, routed and from the node; replies and
//! ICMP errors of admitted connections; what is refused and why.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use etherparse::PacketBuilder;
use k8s_openapi::api::networking::v1::NetworkPolicy;

use super::super::tables::mac_for;
use super::super::*;
use crate::policy::selector::Interner;
use crate::policy::{Policy, PolicySet, PolicyTables};
use crate::wire::EthernetAddress;

const GW: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
/// A client pod (app=client) and a server pod (app=web), on ports 1 and 2.
const A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);
const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);

fn policy(spec: &str) -> Policy {
    let np: NetworkPolicy = serde_json::from_str(&format!(
        r#"{{"metadata":{{"name":"p","namespace":"default"}},"spec":{spec}}}"#
    ))
    .unwrap();
    Policy::from_k8s(&np, "default").unwrap()
}

fn tables(policies: &[&str]) -> Tables {
    let mut t = Tables::new("10.244.1.0/24".parse().unwrap(), GW, mac_for(GW)).with_ports([
        PortEntry {
            id: 1,
            mac: mac_for(A),
            ip: A,
        },
        PortEntry {
            id: 2,
            mac: mac_for(B),
            ip: B,
        },
    ]);
    t.host = Some(PortEntry {
        id: HOST_PORT,
        mac: EthernetAddress([0x0a, 0x58, 0, 0, 0, 1]),
        ip: GW,
    });
    let mut names = BTreeMap::new();
    let mut labels = Interner::default();
    let mut meta = |app: &str| {
        names.insert("app".to_string(), app.to_string());
        crate::control::policy::local_meta(Some(&format!("default/{app}")), &names, &mut labels)
    };
    let (a, b) = (meta("client"), meta("web"));
    let mut ps: Vec<Policy> = policies.iter().map(|s| policy(s)).collect();
    for (i, p) in ps.iter_mut().enumerate() {
        p.name = format!("p{i}").into();
    }
    let set = Arc::new(PolicySet::new(ps, []));
    let pt = PolicyTables::new(set, [])
        .with_local([(1, IpAddr::V4(A), Some(a)), (2, IpAddr::V4(B), Some(b))]);
    t.policy = Some(Arc::new(pt));
    t
}

/// Sends frames through one conntrack table, as a worker does.
struct Switch {
    t: Tables,
    ct: Conntrack,
    now: u64,
}

impl Switch {
    fn new(policies: &[&str]) -> Switch {
        Switch {
            t: tables(policies),
            ct: Conntrack::new(CtConfig::default()),
            now: 0,
        }
    }

    fn send(&mut self, port: PortId, f: &[u8]) -> Action {
        self.now += 1;
        let mut cx = Ctx {
            t: &self.t,
            ct: &mut self.ct,
            now_ms: self.now,
            trace: None,
        };
        let mut buf = f.to_vec();
        let len = buf.len();
        buf.resize(len + 128, 0);
        handle(&mut cx, port, &mut buf, len, Meta::default())
    }
}

fn mac_of(ip: Ipv4Addr) -> EthernetAddress {
    if ip == NODE {
        EthernetAddress([0x0a, 0x58, 0, 0, 0, 1])
    } else {
        mac_for(ip)
    }
}

/// A TCP segment between two addresses; `to` the MAC of `dst` (switched) or the gateway's
/// (routed).
fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), syn: bool, ack: bool, via_gw: bool) -> Vec<u8> {
    let to = if via_gw { mac_for(GW) } else { mac_of(dst.0) };
    let b = PacketBuilder::ethernet2(mac_of(src.0).0, to.0)
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .tcp(src.1, dst.1, 1000, 64000);
    let b = if syn { b.syn() } else { b };
    let b = if ack { b.ack(1) } else { b };
    let mut out = Vec::new();
    b.write(&mut out, &[]).unwrap();
    out
}

fn udp(src: Ipv4Addr, dst: (Ipv4Addr, u16)) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(mac_of(src).0, mac_of(dst.0).0)
        .ipv4(src.octets(), dst.0.octets(), 64)
        .udp(4000, dst.1);
    let mut out = Vec::new();
    b.write(&mut out, b"x").unwrap();
    out
}

fn echo(src: Ipv4Addr, dst: Ipv4Addr, reply: bool) -> Vec<u8> {
    let b =
        PacketBuilder::ethernet2(mac_of(src).0, mac_of(dst).0).ipv4(src.octets(), dst.octets(), 64);
    let b = if reply {
        b.icmpv4_echo_reply(7, 1)
    } else {
        b.icmpv4_echo_request(7, 1)
    };
    let mut out = Vec::new();
    b.write(&mut out, b"ping").unwrap();
    out
}

const WEB_FROM_CLIENT_80: &str = r#"{"podSelector":{"matchLabels":{"app":"web"}},
    "ingress":[{"from":[{"podSelector":{"matchLabels":{"app":"client"}}}],"ports":[{"port":80}]}]}"#;

#[test]
fn ingress_is_judged_on_the_first_packet_and_replies_follow() {
    for via_gw in [false, true] {
        let mut s = Switch::new(&[WEB_FROM_CLIENT_80]);
        assert_eq!(
            s.send(1, &tcp((A, 40000), (B, 80), true, false, via_gw)),
            Action::ToPort(2)
        );
        // The server's answer and the rest of the connection pass.
        assert_eq!(
            s.send(2, &tcp((B, 80), (A, 40000), true, true, via_gw)),
            Action::ToPort(1)
        );
        assert_eq!(
            s.send(1, &tcp((A, 40000), (B, 80), false, true, via_gw)),
            Action::ToPort(2)
        );
        // Port 81 is not admitted.
        assert_eq!(
            s.send(1, &tcp((A, 40001), (B, 81), true, false, via_gw)),
            Action::Drop(DropReason::PolicyDeniedIngress)
        );
        // Nor is a connection from the server to the client's port 80 a reply of anything:
        // but the client is not isolated and the server's egress is not either, so it passes.
        assert_eq!(
            s.send(2, &tcp((B, 5555), (A, 80), true, false, via_gw)),
            Action::ToPort(1)
        );
    }
}

#[test]
fn a_mid_stream_packet_without_an_entry_is_judged_as_new() {
    let mut s = Switch::new(&[WEB_FROM_CLIENT_80]);
    // The server's "reply" to a connection the switch never saw: from the server it passes
    // (its egress is not isolated); the client's next packet to a port not admitted does not.
    assert_eq!(
        s.send(1, &tcp((A, 40002), (B, 22), false, true, false)),
        Action::Drop(DropReason::PolicyDeniedIngress)
    );
}

#[test]
fn egress_deny_all_stops_tcp_udp_and_icmp() {
    let mut s = Switch::new(&[
        r#"{"podSelector":{"matchLabels":{"app":"client"}},"policyTypes":["Egress"]}"#,
    ]);
    let denied = Action::Drop(DropReason::PolicyDeniedEgress);
    assert_eq!(
        s.send(1, &tcp((A, 40000), (B, 80), true, false, false)),
        denied
    );
    assert_eq!(s.send(1, &udp(A, (B, 53))), denied);
    assert_eq!(s.send(1, &echo(A, B, false)), denied);
    // Others may still reach the client, and its answers go back.
    assert_eq!(s.send(2, &echo(B, A, false)), Action::ToPort(1));
    assert_eq!(s.send(1, &echo(A, B, true)), Action::ToPort(2));
    assert_eq!(s.send(2, &udp(B, (A, 5000))), Action::ToPort(1));
}

#[test]
fn the_node_is_always_let_in_and_its_answers_come_back() {
    // The server takes nothing and sends nothing.
    let mut s = Switch::new(&[
        r#"{"podSelector":{"matchLabels":{"app":"web"}},"policyTypes":["Ingress","Egress"]}"#,
    ]);
    let probe = tcp((NODE, 50000), (B, 8080), true, false, true);
    assert_eq!(s.send(HOST_PORT, &probe), Action::ToPort(2));
    // The probe's answer goes back through the gateway to the node.
    let answer = tcp((B, 8080), (NODE, 50000), true, true, true);
    assert_eq!(s.send(2, &answer), Action::ToPort(HOST_PORT));
    // The server's own connection to the node is egress, and denied.
    assert_eq!(
        s.send(2, &tcp((B, 40000), (NODE, 22), true, false, true)),
        Action::Drop(DropReason::PolicyDeniedEgress)
    );
    assert_eq!(
        s.send(1, &tcp((A, 40000), (B, 8080), true, false, false)),
        Action::Drop(DropReason::PolicyDeniedIngress)
    );
}

#[test]
fn without_a_policy_selecting_either_pod_nothing_is_tracked() {
    let mut s = Switch::new(&[r#"{"podSelector":{"matchLabels":{"app":"other"}}}"#]);
    assert_eq!(
        s.send(1, &tcp((A, 40000), (B, 80), true, false, false)),
        Action::ToPort(2)
    );
    assert!(s.ct.is_empty());
}

/// `vswitchctl trace` from port `from` to `dst`:`port` over TCP: the steps and the verdict.
fn trace(t: &Tables, from: PortId, dst: Ipv4Addr, port: u16) -> (Vec<String>, String) {
    let req = conf::api::TraceRequest {
        pod: None,
        port: Some(from),
        peer: None,
        src: None,
        dst,
        protocol: "tcp".into(),
        src_port: Some(40000),
        dst_port: Some(port),
    };
    let r = crate::control::trace::run(t, CtConfig::default(), &req, |_| None).unwrap();
    (r.steps, r.verdict)
}

fn policy_step(steps: &[String]) -> &str {
    steps
        .iter()
        .find(|s| s.starts_with("policy:"))
        .map(String::as_str)
        .unwrap_or_else(|| panic!("no policy step in {steps:#?}"))
}

#[test]
fn trace_names_the_admitting_policy_or_the_denying_direction() {
    let t = tables(&[WEB_FROM_CLIENT_80]);
    let (steps, verdict) = trace(&t, 1, B, 80);
    assert_eq!(verdict, format!("deliver to port 2 ({B})"));
    assert_eq!(
        policy_step(&steps),
        "policy: admitted: no policy selects default/client for egress; \
         ingress of default/web admitted by default/p0"
    );
    let (steps, verdict) = trace(&t, 1, B, 81);
    assert_eq!(verdict, "dropped: policy_denied_ingress");
    assert_eq!(
        policy_step(&steps),
        format!(
            "policy: denied by ingress: default/web is isolated for ingress by default/p0 and \
             no rule of theirs admits TCP {A}:40000 -> {B}:81; \
             no policy selects default/client for egress"
        )
    );
    // An egress deny names the egress side.
    let t =
        tables(&[r#"{"podSelector":{"matchLabels":{"app":"client"}},"policyTypes":["Egress"]}"#]);
    let (steps, verdict) = trace(&t, 1, B, 80);
    assert_eq!(verdict, "dropped: policy_denied_egress");
    assert!(
        policy_step(&steps).starts_with(
            "policy: denied by egress: default/client is isolated for egress by default/p0"
        ),
        "{steps:#?}"
    );
    // Neither end selected: said, and not judged.
    let t = tables(&[r#"{"podSelector":{"matchLabels":{"app":"other"}}}"#]);
    let (steps, _) = trace(&t, 1, B, 80);
    assert_eq!(
        policy_step(&steps),
        "policy: no policy selects either end: not judged"
    );
}

/// `f` addressed to the gateway's MAC (routed), as a pod sends to an address off its subnet.
fn routed(mut f: Vec<u8>) -> Vec<u8> {
    f[..6].copy_from_slice(&mac_for(GW).0);
    f
}

#[test]
fn egress_translation_takes_only_the_outside_and_only_what_policy_admits() {
    let mut s = Switch::new(&[
        r#"{"podSelector":{"matchLabels":{"app":"client"}},"policyTypes":["Egress"],
            "egress":[{"to":[{"ipBlock":{"cidr":"203.0.113.0/24"}}]}]}"#,
    ]);
    let outside = Ipv4Addr::new(203, 0, 113, 5);
    let other = Ipv4Addr::new(198, 51, 100, 7);
    // Off: the outside is reached through the node, as before.
    assert_eq!(
        s.send(2, &tcp((B, 40000), (other, 443), true, false, true)),
        Action::ToPort(HOST_PORT)
    );
    s.t.cluster_nets = vec!["10.96.0.0/12".parse().unwrap()];
    s.t.egress = Some(Arc::new(super::super::tables::Egress {
        no_masquerade: vec!["192.168.0.0/16".parse().unwrap()],
        node_ips: vec![Ipv4Addr::new(172, 16, 0, 1)],
    }));
    // On: TCP, UDP and ICMP echo to the outside go to the egress engine...
    assert_eq!(
        s.send(1, &tcp((A, 40000), (outside, 443), true, false, true)),
        Action::ToEgress
    );
    assert_eq!(s.send(2, &routed(udp(B, (other, 53)))), Action::ToEgress);
    assert_eq!(s.send(2, &routed(echo(B, other, false))), Action::ToEgress);
    // ... once NetworkPolicy has admitted them: the client may only reach 203.0.113.0/24.
    assert_eq!(
        s.send(1, &tcp((A, 40001), (other, 443), true, false, true)),
        Action::Drop(DropReason::PolicyDeniedEgress)
    );
    assert_eq!(
        s.send(1, &routed(udp(A, (other, 53)))),
        Action::Drop(DropReason::PolicyDeniedEgress)
    );
    // The no-masquerade list keeps the pod's address (routed through the node); the cluster's
    // ranges and the node's own pod CIDR are never translated.
    assert_eq!(
        s.send(2, &routed(udp(B, (Ipv4Addr::new(192, 168, 7, 1), 53)))),
        Action::ToPort(HOST_PORT)
    );
    assert_eq!(
        s.send(2, &routed(udp(B, (Ipv4Addr::new(10, 96, 0, 99), 53)))),
        Action::Drop(DropReason::NoRoute)
    );
    assert_ne!(
        s.send(2, &routed(udp(B, (Ipv4Addr::new(10, 244, 1, 99), 53)))),
        Action::ToEgress
    );
    // Nor is the node's own address (nor a peer node's).
    assert_eq!(
        s.send(2, &routed(udp(B, (Ipv4Addr::new(172, 16, 0, 1), 53)))),
        Action::ToPort(HOST_PORT)
    );
    // A connection the node opens from an outside client's address (a NodePort relay that
    // keeps it): the pod's answers go back to the node, not to the egress engine.
    let client = (Ipv4Addr::new(203, 0, 113, 9), 5555);
    let mut syn = tcp(client, (B, 8080), true, false, true);
    syn[6..12].copy_from_slice(&mac_of(NODE).0);
    assert_eq!(s.send(HOST_PORT, &syn), Action::ToPort(2));
    assert_eq!(
        s.send(2, &tcp((B, 8080), client, true, true, true)),
        Action::ToPort(HOST_PORT)
    );
    assert_eq!(
        s.send(2, &tcp((B, 8081), client, true, false, true)),
        Action::ToEgress,
        "a connection of the pod's own to the same client is translated"
    );
    // What the engine does not carry (an echo reply, here) goes to the node as before.
    assert_eq!(
        s.send(2, &routed(echo(B, other, true))),
        Action::ToPort(HOST_PORT)
    );
}
