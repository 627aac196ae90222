//! Capture filters in tcpdump's expression language, compiled by libpcap, plus `vxlan [VNI]`.
//!
//! pcap-filter(7) is whatever libpcap's compiler accepts, so the filter does not imitate it:
//! when a session starts, the text goes to `pcap_compile` ([`bpf`]) and comes back as a classic
//! BPF program for Ethernet frames; the datapath runs it on each frame in place, before anything
//! is copied, with libpcap's own interpreter, which allocates nothing and never reads past the
//! bytes it is given. Byte offsets and arithmetic (`tcp[13] & 2 != 0`), named fields and flags
//! (`tcp[tcpflags] & tcp-syn != 0`), `icmp6`, `ip6`, `vlan`, `len` and the rest are tcpdump's.
//!
//! This layer adds what tcpdump lacks and fixes what a scratch image cannot do:
//! - `vxlan [VNI]`: a VXLAN datagram (UDP to port 4789 or 8472, the I flag set, over IPv4 or an
//!   IPv6 header without extensions), optionally with that VNI. It is rewritten into tcpdump's
//!   language before compiling, so it combines with anything else.
//! - A filter that starts with a bare address (`10.244.1.2`) means `host 10.244.1.2`, as it
//!   always did here (libpcap wants a qualifier before the first value).
//! - `proto NAME` with an IP protocol name (`ip proto udp`): rewritten to the number, since
//!   libpcap asks /etc/protocols, which the image does not have (and tcpdump wants `\udp`).
//! - Errors: libpcap says only "syntax error"; [`Filter::parse`] finds the first word that no
//!   continuation can make valid and names it.
//!
//! At the overlay points the capture also offers the outer headers it synthesises
//! ([`Fields::outer`]), so one filter can select by the inner frame or by the outer datagram.

mod bpf;

use std::fmt;
use std::net::SocketAddr;

use ipnet::Ipv4Net;

/// A compiled filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    prog: bpf::Program,
    text: String,
}

/// A filter that could not be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("filter {text:?}: {msg}")]
pub struct FilterError {
    pub text: String,
    pub msg: String,
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The VXLAN ports `vxlan` knows: IANA's and the Linux/flannel default.
const VXLAN_PORTS: [u16; 2] = [4789, 8472];
/// Synthesised outer headers: Ethernet, IPv6 at most, UDP, and the VXLAN header.
const OUTER_LEN: usize = super::OUTER_MAX + 8;

/// The bytes of a packet a filter runs on, and its length on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fields<'a> {
    /// The packet's length on the wire (what `len`, `less` and `greater` test), which may be
    /// more than the bytes at hand.
    pub len: u32,
    bytes: &'a [u8],
    /// Headers [`Fields::outer`] wrote, used when `bytes` is empty.
    own: [u8; OUTER_LEN],
    own_len: u8,
}

impl<'a> Fields<'a> {
    /// A frame from its Ethernet header; the bytes are read in place when a filter runs.
    #[inline]
    pub fn parse(frame: &'a [u8]) -> Fields<'a> {
        Fields {
            len: frame.len().min(u32::MAX as usize) as u32,
            bytes: frame,
            own: [0; OUTER_LEN],
            own_len: 0,
        }
    }

    /// The outer headers of a VXLAN datagram as the capture synthesises them (zero MACs, the
    /// underlay addresses and ports) and its VXLAN header; `len` is the whole packet's.
    pub fn outer(src: SocketAddr, dst: SocketAddr, vni: Option<u32>, len: usize) -> Fields<'a> {
        let mut head = [0u8; super::OUTER_MAX];
        let ip_len = if src.is_ipv4() && dst.is_ipv4() {
            20
        } else {
            40
        };
        let hl = super::outer_headers(&mut head, src, dst, len.saturating_sub(14 + ip_len + 8));
        let mut own = [0u8; OUTER_LEN];
        own[..hl].copy_from_slice(&head[..hl]);
        if let Some(vni) = vni {
            own[hl] = 0x08;
            own[hl + 4..hl + 8].copy_from_slice(&(vni << 8).to_be_bytes());
        }
        Fields {
            len: len.min(u32::MAX as usize) as u32,
            bytes: &[],
            own,
            own_len: (hl + 8) as u8,
        }
    }

    #[inline]
    fn bytes(&self) -> &[u8] {
        if self.own_len > 0 {
            &self.own[..usize::from(self.own_len)]
        } else {
            self.bytes
        }
    }
}

impl Filter {
    /// Compiles a filter. An empty (all-blank) text is an error: say "no filter" with `None`.
    pub fn parse(text: &str) -> Result<Filter, FilterError> {
        let err = |msg: String| FilterError {
            text: text.to_string(),
            msg,
        };
        let tokens = tokenize(text);
        if tokens.is_empty() {
            return Err(err("empty filter".into()));
        }
        check_parens(&tokens).map_err(err)?;
        let pcap = rewrite(&tokens).map_err(err)?;
        match bpf::Program::compile(&pcap) {
            Ok(prog) => Ok(Filter {
                prog,
                text: tokens.join(" "),
            }),
            Err(e) => Err(err(explain(&tokens, e))),
        }
    }

    /// Whether a frame (Ethernet, no virtio-net header) matches.
    #[inline]
    pub fn matches(&self, frame: &[u8]) -> bool {
        self.matches_fields(&Fields::parse(frame))
    }

    #[inline]
    pub fn matches_fields(&self, f: &Fields<'_>) -> bool {
        self.prog.matches(f.bytes(), f.len)
    }

    /// The filter as normalised text (words joined by single spaces, parentheses and the
    /// logical operators `&&`, `||` and `!` apart).
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// Splits at blanks and around `(`, `)`, `&&`, `||` and `!` (not `!=`), the tokens that are
/// always tokens of their own in tcpdump's language; anything else stays one word (`tcp[13]&2`).
fn tokenize(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let next = chars.peek().copied();
        let op = match (c, next) {
            ('&', Some('&')) | ('|', Some('|')) => {
                chars.next();
                Some(format!("{c}{c}"))
            }
            ('!', n) if n != Some('=') => Some("!".into()),
            ('(' | ')', _) => Some(c.to_string()),
            _ => None,
        };
        if c.is_whitespace() || op.is_some() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            out.extend(op);
        } else {
            cur.push(c);
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn check_parens(tokens: &[String]) -> Result<(), String> {
    let mut depth = 0usize;
    for (i, t) in tokens.iter().enumerate() {
        match t.as_str() {
            "(" => depth += 1,
            ")" if depth == 0 => {
                return Err(if i + 1 == tokens.len() {
                    "unbalanced ')'".into()
                } else {
                    format!("unexpected ')' after '{}'", tokens[..i].join(" "))
                })
            }
            ")" => depth -= 1,
            _ => {}
        }
    }
    if depth > 0 {
        return Err("missing ')'".into());
    }
    Ok(())
}

/// Tokens after which a primitive starts.
fn starts_primitive(prev: Option<&str>) -> bool {
    matches!(
        prev,
        None | Some("(" | "!" | "not" | "and" | "or" | "&&" | "||")
    )
}

/// IP protocol names, as /etc/protocols and libpcap's keywords have them.
const IP_PROTOS: &[(&str, u8)] = &[
    ("icmp", 1),
    ("igmp", 2),
    ("tcp", 6),
    ("igrp", 9),
    ("udp", 17),
    ("gre", 47),
    ("esp", 50),
    ("ah", 51),
    ("icmp6", 58),
    ("pim", 103),
    ("vrrp", 112),
    ("sctp", 132),
];

/// The text libpcap compiles: `vxlan [VNI]` expanded, IP protocol names after `proto` made
/// numbers, the rest as given.
fn rewrite(tokens: &[String]) -> Result<String, String> {
    let mut out: Vec<String> = Vec::with_capacity(tokens.len());
    let mut i = 0;
    while i < tokens.len() {
        let t = tokens[i].as_str();
        let prev = i.checked_sub(1).map(|p| tokens[p].as_str());
        if t == "vxlan" && starts_primitive(prev) {
            let vni = match tokens.get(i + 1) {
                Some(v) if v.bytes().all(|b| b.is_ascii_digit()) => {
                    i += 1;
                    let n = v
                        .parse::<u32>()
                        .ok()
                        .filter(|n| *n < 1 << 24)
                        .ok_or_else(|| format!("'vxlan {v}': a VNI is 0..16777215"))?;
                    Some(n)
                }
                _ => None,
            };
            out.push(vxlan(vni));
        } else if tokens[..i]
            .iter()
            .all(|p| matches!(p.as_str(), "(" | "!" | "not"))
            && t.parse::<std::net::IpAddr>().is_ok()
        {
            // tcpdump wants a qualifier before the first value; this switch always took a bare
            // address as a host.
            out.push(format!("host {t}"));
        } else if matches!(prev, Some("proto" | "protochain")) && i >= 2 && tokens[i - 2] != "ether"
        {
            let name = t.strip_prefix('\\').unwrap_or(t);
            match IP_PROTOS.iter().find(|(n, _)| *n == name) {
                Some((_, num)) => out.push(num.to_string()),
                None => out.push(t.to_string()),
            }
        } else {
            out.push(t.to_string());
        }
        i += 1;
    }
    Ok(out.join(" "))
}

/// `vxlan [VNI]` in tcpdump's language: the VXLAN header is at `udp[8]` over IPv4 and at
/// `ip6[48]` over an IPv6 header without extensions (as the switch's own underlay sends).
fn vxlan(vni: Option<u32>) -> String {
    let ports = VXLAN_PORTS
        .iter()
        .map(|p| format!("udp dst port {p}"))
        .collect::<Vec<_>>()
        .join(" or ");
    let (v4, v6) = match vni {
        Some(n) => (
            format!(" and udp[12:4] >> 8 = {n}"),
            format!(" and ip6[52:4] >> 8 = {n}"),
        ),
        None => (String::new(), String::new()),
    };
    format!(
        "( ( {ports} ) and ( ( ip and udp[8] & 8 != 0{v4} ) \
         or ( ip6 and ip6[6] = 17 and ip6[48] & 8 != 0{v6} ) ) )"
    )
}

/// A clearer message than libpcap's for a filter it rejected.
fn explain(tokens: &[String], pcap_msg: String) -> String {
    if !is_syntax_error(&pcap_msg) {
        // `net 10.244.1.1/24`: libpcap says "non-network bits set in "10.244.1.1/24"".
        if let Some(net) = pcap_msg
            .strip_prefix("non-network bits set in \"")
            .and_then(|r| r.strip_suffix('"'))
            .and_then(|n| n.parse::<Ipv4Net>().ok())
        {
            return format!("{pcap_msg}; did you mean {}?", net.trunc());
        }
        return pcap_msg;
    }
    // The first word that no continuation of the words before it makes valid.
    for k in 1..=tokens.len() {
        if !viable(&tokens[..k]) {
            let at = &tokens[k - 1];
            return if k == 1 {
                format!("syntax error at '{at}'")
            } else {
                format!(
                    "syntax error at '{at}' (after '{}')",
                    tokens[..k - 1].join(" ")
                )
            };
        }
    }
    let last = tokens.last().map_or("", String::as_str);
    format!("the filter ends too early: '{last}' needs a value or an expression after it")
}

fn is_syntax_error(msg: &str) -> bool {
    msg.contains("can't parse filter expression: syntax error")
}

/// Whether some continuation makes the words a filter libpcap parses (it may still reject
/// it for what it means, as with an unknown host: that is not a syntax error).
fn viable(prefix: &[String]) -> bool {
    const ENDINGS: &[&str] = &["", " 1", " = 1", " 1 = 1", " ] = 1", " 1 ] = 1", " tcp"];
    let Ok(text) = rewrite(prefix) else {
        return true;
    };
    let opened = prefix.iter().filter(|t| *t == "(").count();
    let depth = opened.saturating_sub(prefix.iter().filter(|t| *t == ")").count());
    let close = " )".repeat(depth);
    ENDINGS.iter().any(
        |e| match bpf::Program::compile(&format!("{text}{e}{close}")) {
            Ok(_) => true,
            Err(m) => !is_syntax_error(&m),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const ETH_IPV4: u16 = 0x0800;
    const ETH_ARP: u16 = 0x0806;
    const TCP: u8 = 6;
    const UDP: u8 = 17;
    const ICMP: u8 = 1;

    /// Ethernet + IPv4 + L4 header bytes, enough for the filter.
    fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, sport: u16, dport: u16) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20];
        f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
        f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&ETH_IPV4.to_be_bytes());
        let ip = &mut f[14..];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&40u16.to_be_bytes());
        ip[8] = 64;
        ip[9] = proto;
        ip[12..16].copy_from_slice(&src);
        ip[16..20].copy_from_slice(&dst);
        ip[20..22].copy_from_slice(&sport.to_be_bytes());
        ip[22..24].copy_from_slice(&dport.to_be_bytes());
        f
    }

    fn arp(spa: [u8; 4], tpa: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 28];
        f[0..6].copy_from_slice(&[0xff; 6]);
        f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&ETH_ARP.to_be_bytes());
        let a = &mut f[14..];
        a[0..2].copy_from_slice(&1u16.to_be_bytes());
        a[2..4].copy_from_slice(&0x0800u16.to_be_bytes());
        a[4] = 6;
        a[5] = 4;
        a[7] = 1;
        a[14..18].copy_from_slice(&spa);
        a[24..28].copy_from_slice(&tpa);
        f
    }

    fn m(filter: &str, frame: &[u8]) -> bool {
        Filter::parse(filter)
            .unwrap_or_else(|e| panic!("{e}"))
            .matches(frame)
    }

    const A: [u8; 4] = [10, 244, 1, 2];
    const B: [u8; 4] = [10, 244, 2, 3];

    #[test]
    fn hosts_nets_and_directions() {
        let f = ipv4(A, B, TCP, 40000, 80);
        assert!(m("host 10.244.1.2", &f));
        assert!(m("host 10.244.2.3", &f));
        assert!(!m("host 10.244.9.9", &f));
        assert!(m("src host 10.244.1.2", &f));
        assert!(!m("dst host 10.244.1.2", &f));
        assert!(m("dst host 10.244.2.3", &f));
        assert!(m("src 10.244.1.2", &f), "src implies host");
        assert!(m("net 10.244.2.0/24", &f));
        assert!(!m("src net 10.244.2.0/24", &f));
        assert!(m("dst net 10.244.0.0/16", &f));
        assert!(m("src and dst net 10.244.0.0/16", &f));
        assert!(!m("src and dst net 10.244.1.0/24", &f));
        assert!(m("src or dst net 10.244.1.0/24", &f));
        assert!(m("ip host 10.244.1.2", &f));
        assert!(!m("arp host 10.244.1.2", &f));
        assert!(m("10.244.1.2", &f), "a bare address is a host");
    }

    #[test]
    fn ports_and_protocols() {
        let tcp = ipv4(A, B, TCP, 40000, 80);
        let udp = ipv4(A, B, UDP, 5353, 53);
        let icmp = ipv4(A, B, ICMP, 0x0800, 0);
        assert!(m("port 80", &tcp));
        assert!(m("tcp port 80", &tcp));
        assert!(!m("udp port 80", &tcp));
        assert!(m("dst port 80", &tcp));
        assert!(!m("src port 80", &tcp));
        assert!(m("src port 40000", &tcp));
        assert!(m("tcp dst port 80", &tcp));
        assert!(m("portrange 50-100", &tcp));
        assert!(!m("portrange 81-100", &tcp));
        assert!(m("udp and port 53", &udp));
        assert!(m("tcp", &tcp) && !m("tcp", &udp) && !m("tcp", &icmp));
        assert!(m("udp", &udp) && m("icmp", &icmp) && m("ip", &icmp));
        assert!(!m("port 0", &icmp), "ICMP has no ports");
        assert!(m("ip proto 17", &udp) && m("ip proto udp", &udp));
        assert!(!m("ip6", &tcp) && !m("arp", &tcp));
        // tcpdump's shorthand: the value inherits `udp dst port`.
        assert!(m("udp dst port 5353 or 53", &udp));
        assert!(!m("udp dst port 5353 or 54", &udp));
    }

    #[test]
    fn fragments_have_no_ports() {
        let mut f = ipv4(A, B, UDP, 1, 53);
        f[14 + 6..14 + 8].copy_from_slice(&0x0010u16.to_be_bytes());
        assert!(!m("port 53", &f));
        assert!(m("udp", &f));
    }

    #[test]
    fn arp_matches_host_and_arp() {
        let f = arp(A, B);
        assert!(m("arp", &f));
        assert!(m("host 10.244.2.3", &f), "tcpdump's host covers ARP");
        assert!(m("arp src host 10.244.1.2", &f));
        assert!(!m("ip host 10.244.1.2", &f));
        assert!(!m("port 53", &f) && !m("tcp", &f));
        assert!(m("ether dst ff:ff:ff:ff:ff:ff", &f));
        assert!(m("ether src 02:00:00:00:00:01", &f));
        assert!(!m("ether host 02:00:00:00:00:09", &f));
    }

    #[test]
    fn boolean_operators_precedence_and_parentheses() {
        let tcp = ipv4(A, B, TCP, 40000, 80);
        let udp = ipv4(A, B, UDP, 5353, 53);
        assert!(m("tcp and port 80", &tcp));
        assert!(m("tcp && port 80", &tcp));
        assert!(m("udp or port 80", &tcp));
        assert!(m("udp || port 80", &tcp));
        assert!(m("not udp", &tcp));
        assert!(m("!udp", &tcp));
        assert!(!m("! tcp", &tcp));
        assert!(m("host 10.244.1.2 and not port 22", &tcp));
        assert!(m("(udp or tcp) and dst host 10.244.2.3", &udp));
        assert!(!m("not (udp or tcp)", &udp));
        assert!(m("not not tcp", &tcp));
        // and/or are left-associative at one precedence, as in pcap-filter:
        // `udp or tcp and port 53` is `(udp or tcp) and port 53`.
        assert!(!m("udp or tcp and port 53", &tcp));
        assert!(m("udp or tcp and port 80", &tcp));
        // `not` binds tighter than `and`.
        assert!(m("not udp and tcp", &tcp));
        // The bare value after `not` inherits `host`.
        assert!(!m("host 10.9.9.9 or not 10.244.1.2", &tcp));
    }

    #[test]
    fn vxlan_and_lengths() {
        let mut f = ipv4([192, 168, 1, 1], [192, 168, 1, 2], UDP, 40000, 8472);
        f.extend_from_slice(&[0u8; 8]);
        // VXLAN header: flags 0x08 at UDP payload 0, VNI 1 at 4..7.
        let at = 14 + 20 + 8;
        f[at] = 0x08;
        f[at + 6] = 1;
        assert!(m("vxlan", &f));
        assert!(m("vxlan 1", &f));
        assert!(!m("vxlan 2", &f));
        assert!(!m("vxlan", &ipv4(A, B, UDP, 1, 53)));
        let n = f.len() as u32;
        assert!(m(&format!("less {n}"), &f) && !m(&format!("less {}", n - 1), &f));
        assert!(m(&format!("greater {n}"), &f) && !m(&format!("greater {}", n + 1), &f));
    }

    #[test]
    fn outer_fields_match_like_the_synthesised_headers() {
        let f = Fields::outer(
            "192.168.1.1:40000".parse().unwrap(),
            "192.168.1.2:8472".parse().unwrap(),
            Some(1),
            150,
        );
        let t = |s: &str| Filter::parse(s).unwrap().matches_fields(&f);
        assert!(t("udp port 8472") && t("vxlan 1") && t("src host 192.168.1.1"));
        assert!(!t("tcp") && !t("host 10.244.1.2"));
    }

    #[test]
    fn garbage_never_panics() {
        let f = Filter::parse("host 10.0.0.1 or port 53 or arp or vxlan").unwrap();
        for len in 0..80 {
            for byte in [0u8, 0x45, 0xff, 0x08] {
                let mut v = vec![byte; len];
                if len >= 14 {
                    v[12..14].copy_from_slice(&ETH_IPV4.to_be_bytes());
                }
                let _ = f.matches(&v);
                if len >= 14 {
                    v[12..14].copy_from_slice(&ETH_ARP.to_be_bytes());
                }
                let _ = f.matches(&v);
            }
        }
    }

    fn err(s: &str) -> String {
        match Filter::parse(s) {
            Ok(f) => panic!("{s:?} compiled to {f:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn errors_name_the_token() {
        assert!(err("host").contains("'host' needs a value"));
        assert!(err("host no-such-host.invalid").contains("'no-such-host.invalid'"));
        assert!(err("port no-such-service").contains("'no-such-service'"));
        assert!(err("net 10.244.1.1/24").contains("did you mean 10.244.1.0/24"));
        assert!(err("(tcp").contains("missing ')'"));
        assert!(err("tcp)").contains("')'"));
        assert!(err("tcp and").contains("ends"));
        assert!(err("and tcp").contains("'and'"));
        assert!(err("gateway 10.0.0.1").contains("'gateway'"));
        assert!(err("foo").contains("'foo'"));
        assert!(err("tcp udp").contains("'udp'"));
        assert!(err("").contains("empty"));
        assert!(err("icmp port 1").contains("'port'"));
        assert!(err("tcp host 10.0.0.1").contains("'tcp' modifier applied to host"));
        assert!(err("ether host 1:2:3").contains("ethernet address"));
        assert!(err("vxlan 16777216").contains("a VNI is 0..16777215"));
        assert!(err("tcp[13] & 2 !=").contains("ends too early: '!='"));
    }

    /// Frames etherparse builds, for what the hand-written filter could not say.
    mod tcpdump_language {
        use super::m;
        use etherparse::PacketBuilder;

        const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
        const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];

        fn tcp(syn: bool, ack: bool) -> Vec<u8> {
            let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
                .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
                .tcp(40000, 80, 1, 64240);
            let b = match (syn, ack) {
                (true, true) => b.syn().ack(1),
                (true, false) => b.syn(),
                (false, true) => b.ack(1),
                (false, false) => b,
            };
            let mut v = Vec::new();
            b.write(&mut v, &[]).unwrap();
            v
        }

        fn icmp6_echo() -> Vec<u8> {
            let a = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
            let b = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
            let mut v = Vec::new();
            PacketBuilder::ethernet2(MAC_A, MAC_B)
                .ipv6(a, b, 64)
                .icmpv6_echo_request(7, 1)
                .write(&mut v, b"ping")
                .unwrap();
            v
        }

        fn udp6(dport: u16) -> Vec<u8> {
            let a = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
            let b = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
            let mut v = Vec::new();
            PacketBuilder::ethernet2(MAC_A, MAC_B)
                .ipv6(a, b, 64)
                .udp(5353, dport)
                .write(&mut v, b"x")
                .unwrap();
            v
        }

        fn vlan_tcp() -> Vec<u8> {
            let mut v = Vec::new();
            PacketBuilder::ethernet2(MAC_A, MAC_B)
                .single_vlan(100.try_into().unwrap())
                .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
                .tcp(40000, 80, 1, 64240)
                .write(&mut v, &[])
                .unwrap();
            v
        }

        #[test]
        fn byte_offsets_and_tcp_flags() {
            let (syn, synack, ack) = (tcp(true, false), tcp(true, true), tcp(false, true));
            for f in ["tcp[13] & 2 != 0", "tcp[tcpflags] & tcp-syn != 0"] {
                assert!(m(f, &syn) && m(f, &synack) && !m(f, &ack), "{f}");
            }
            let only_syn = "tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-syn";
            assert!(m(only_syn, &syn) && !m(only_syn, &synack) && !m(only_syn, &ack));
            assert!(m("ip[0] = 0x45", &syn) && m("ip[9] = 6", &syn));
            assert!(m("ip[8] > 32 and tcp[2:2] = 80", &syn));
            assert!(!m("ip[8] < 32", &syn));
            assert!(m("len >= 54", &syn) && !m("len > 54", &syn));
            assert!(!m("tcp[13] & 2 != 0", &icmp6_echo()));
        }

        #[test]
        fn ipv6_and_icmp6() {
            let echo = icmp6_echo();
            assert!(m("icmp6", &echo) && m("ip6", &echo));
            assert!(m("icmp6 and ip6[40] = 128", &echo), "an echo request");
            assert!(m("ip6 host fd00::1", &echo) && m("host fd00::2", &echo));
            assert!(m("net fd00::/64", &echo) && !m("net fd01::/64", &echo));
            assert!(!m("ip", &echo) && !m("icmp", &echo) && !m("tcp", &echo));
            assert!(!m("icmp6", &tcp(true, false)) && !m("ip6", &tcp(true, false)));
            assert!(m("udp port 53", &udp6(53)) && m("ip6 and udp", &udp6(53)));
            assert!(!m("udp port 53", &udp6(54)));
            assert!(m("ip6 proto udp", &udp6(53)) && m("ip6 proto 17", &udp6(53)));
        }

        #[test]
        fn vlan_and_ether_proto() {
            let f = vlan_tcp();
            assert!(m("vlan 100 and tcp port 80", &f));
            assert!(
                !m("vlan 101", &f) && !m("tcp", &f),
                "tcpdump looks past a tag after `vlan` only"
            );
            assert!(m("ether proto 0x0800", &tcp(false, true)));
            assert!(m("ether proto \\ip", &tcp(false, true)));
        }

        #[test]
        fn vxlan_combines_with_the_language() {
            // An IPv6 underlay datagram to 4789 carrying VNI 42.
            let mut v = udp6(4789);
            v.truncate(v.len() - 1);
            v.extend_from_slice(&[0x08, 0, 0, 0, 0, 0, 42, 0]);
            assert!(m("vxlan 42 and ip6", &v) && m("vxlan", &v));
            assert!(!m("vxlan 43", &v) && !m("not vxlan", &v));
            assert!(m("udp[8] & 8 != 0 or vxlan 42", &v));
        }
    }

    #[test]
    fn text_is_normalised() {
        let f = Filter::parse("  tcp&&(port 80||port 443) ").unwrap();
        assert_eq!(f.text(), "tcp && ( port 80 || port 443 )");
        let f = Filter::parse("tcp[13]&2!=0 and !ip6").unwrap();
        assert_eq!(f.text(), "tcp[13]&2!=0 and ! ip6");
    }
}
