//! The hand-written filter that libpcap's compiler replaced (vswitch/src/capture/filter.rs as
//! of d375bd8), kept only as this bench's baseline for the per-packet cost.
#![allow(dead_code)]
#![allow(clippy::all)]

use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// A compiled filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    expr: Expr,
    text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Expr {
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Prim(Prim),
}

/// Which addresses or ports of a packet a primitive looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Src,
    Dst,
    /// `src or dst` (the default).
    Either,
    /// `src and dst`.
    Both,
}

/// What a `host`/`net` primitive applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum L3 {
    /// IPv4 and ARP, as tcpdump's bare `host` does.
    Any,
    Ip,
    Arp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Prim {
    Net {
        dir: Dir,
        net: Ipv4Net,
        l3: L3,
    },
    Port {
        dir: Dir,
        lo: u16,
        hi: u16,
        proto: Option<u8>,
    },
    Ether {
        dir: Dir,
        mac: [u8; 6],
    },
    EtherType(u16),
    IpProto(u8),
    Vxlan(Option<u32>),
    Less(u32),
    Greater(u32),
}

const ETH_IPV4: u16 = 0x0800;
const ETH_ARP: u16 = 0x0806;
const ETH_IPV6: u16 = 0x86dd;
const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
/// The VXLAN ports the `vxlan` primitive knows: IANA's and the Linux/flannel default.
const VXLAN_PORTS: [u16; 2] = [4789, 8472];

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

/// The facts of a frame a filter can test, read once per frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fields {
    /// The packet's length on the wire.
    pub len: u32,
    pub eth_src: [u8; 6],
    pub eth_dst: [u8; 6],
    pub ethertype: u16,
    /// IPv4 source, destination and protocol.
    pub ip: Option<(Ipv4Addr, Ipv4Addr, u8)>,
    /// TCP/UDP source and destination port (first fragments and unfragmented packets only).
    pub ports: Option<(u16, u16)>,
    /// ARP sender and target protocol addresses.
    pub arp: Option<(Ipv4Addr, Ipv4Addr)>,
    /// The VNI of a VXLAN datagram.
    pub vxlan: Option<u32>,
}

fn ipv4_at(b: &[u8], at: usize) -> Option<Ipv4Addr> {
    let s = b.get(at..at + 4)?;
    Some(Ipv4Addr::new(s[0], s[1], s[2], s[3]))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at + 2)?;
    Some(u16::from_be_bytes([s[0], s[1]]))
}

impl Fields {
    /// Reads an Ethernet frame (one 802.1Q tag is looked through).
    pub fn parse(frame: &[u8]) -> Fields {
        let mut f = Fields {
            len: frame.len() as u32,
            ..Fields::default()
        };
        let (Some(dst), Some(src), Some(mut ethertype)) =
            (frame.get(0..6), frame.get(6..12), u16_at(frame, 12))
        else {
            return f;
        };
        f.eth_dst.copy_from_slice(dst);
        f.eth_src.copy_from_slice(src);
        let mut l3 = 14;
        if ethertype == 0x8100 {
            ethertype = u16_at(frame, 16).unwrap_or(0);
            l3 = 18;
        }
        f.ethertype = ethertype;
        let p = frame.get(l3..).unwrap_or_default();
        match ethertype {
            ETH_IPV4 => f.parse_ipv4(p),
            // Ethernet/IPv4 ARP: sender protocol address at 14, target at 24.
            ETH_ARP if p.get(4..6) == Some(&[6, 4]) => {
                if let (Some(s), Some(t)) = (ipv4_at(p, 14), ipv4_at(p, 24)) {
                    f.arp = Some((s, t));
                }
            }
            _ => {}
        }
        f
    }

    fn parse_ipv4(&mut self, p: &[u8]) {
        let Some(&vihl) = p.first() else { return };
        let ihl = usize::from(vihl & 0x0f) * 4;
        if vihl >> 4 != 4 || ihl < 20 {
            return;
        }
        let (Some(src), Some(dst), Some(&proto)) = (ipv4_at(p, 12), ipv4_at(p, 16), p.get(9))
        else {
            return;
        };
        self.ip = Some((src, dst, proto));
        let frag_off = u16_at(p, 6).unwrap_or(0) & 0x1fff;
        if frag_off != 0 || (proto != TCP && proto != UDP) {
            return;
        }
        let l4 = p.get(ihl..).unwrap_or_default();
        if let (Some(s), Some(d)) = (u16_at(l4, 0), u16_at(l4, 2)) {
            self.ports = Some((s, d));
            if proto == UDP && VXLAN_PORTS.contains(&d) {
                // The I flag says the VNI is valid.
                if let Some(h) = l4.get(8..16) {
                    if h[0] & 0x08 != 0 {
                        self.vxlan = Some(u32::from_be_bytes([0, h[4], h[5], h[6]]));
                    }
                }
            }
        }
    }

    /// The outer headers of a VXLAN datagram as the capture synthesises them.
    pub fn outer(
        src: std::net::SocketAddr,
        dst: std::net::SocketAddr,
        vni: Option<u32>,
        len: usize,
    ) -> Fields {
        let mut f = Fields {
            len: len as u32,
            ports: Some((src.port(), dst.port())),
            vxlan: vni,
            ..Fields::default()
        };
        match (src.ip(), dst.ip()) {
            (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => {
                f.ethertype = ETH_IPV4;
                f.ip = Some((s, d, UDP));
            }
            _ => f.ethertype = ETH_IPV6,
        }
        f
    }
}

impl Filter {
    /// Compiles a filter. An empty (all-blank) text is an error: say "no filter" with `None`.
    pub fn parse(text: &str) -> Result<Filter, FilterError> {
        let err = |msg: String| FilterError {
            text: text.to_string(),
            msg,
        };
        let tokens = tokenize(text).map_err(err)?;
        if tokens.is_empty() {
            return Err(err("empty filter".into()));
        }
        let mut p = Parser {
            tokens: &tokens,
            at: 0,
            last: None,
        };
        let expr = p.expr().map_err(err)?;
        if let Some(t) = p.peek() {
            return Err(err(match t {
                ")" => "unbalanced ')'".to_string(),
                t => format!("unexpected '{t}' after a complete expression"),
            }));
        }
        Ok(Filter {
            expr,
            text: tokens.join(" "),
        })
    }

    /// Whether a frame (Ethernet, no virtio-net header) matches.
    #[inline]
    pub fn matches(&self, frame: &[u8]) -> bool {
        self.matches_fields(&Fields::parse(frame))
    }

    pub fn matches_fields(&self, f: &Fields) -> bool {
        eval(&self.expr, f)
    }

    /// The filter as normalised text (tokens joined by single spaces).
    pub fn text(&self) -> &str {
        &self.text
    }
}

fn eval(e: &Expr, f: &Fields) -> bool {
    match e {
        Expr::And(a, b) => eval(a, f) && eval(b, f),
        Expr::Or(a, b) => eval(a, f) || eval(b, f),
        Expr::Not(a) => !eval(a, f),
        Expr::Prim(p) => prim(p, f),
    }
}

fn by_dir<T>(dir: Dir, s: T, d: T, test: impl Fn(T) -> bool) -> bool {
    match dir {
        Dir::Src => test(s),
        Dir::Dst => test(d),
        Dir::Either => test(s) || test(d),
        Dir::Both => test(s) && test(d),
    }
}

fn prim(p: &Prim, f: &Fields) -> bool {
    match *p {
        Prim::Net { dir, net, l3 } => {
            let ip = matches!(l3, L3::Any | L3::Ip)
                && f.ip
                    .is_some_and(|(s, d, _)| by_dir(dir, s, d, |a| net.contains(&a)));
            let arp = matches!(l3, L3::Any | L3::Arp)
                && f.arp
                    .is_some_and(|(s, d)| by_dir(dir, s, d, |a| net.contains(&a)));
            ip || arp
        }
        Prim::Port { dir, lo, hi, proto } => {
            let proto_ok = match (proto, f.ip) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(want), Some((_, _, got))) => want == got,
            };
            proto_ok
                && f.ports
                    .is_some_and(|(s, d)| by_dir(dir, s, d, |x| (lo..=hi).contains(&x)))
        }
        Prim::Ether { dir, mac } => by_dir(dir, f.eth_src, f.eth_dst, |m| m == mac),
        Prim::EtherType(t) => f.ethertype == t,
        Prim::IpProto(p) => f.ip.is_some_and(|(_, _, got)| got == p),
        Prim::Vxlan(vni) => match (vni, f.vxlan) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(want), Some(got)) => want == got,
        },
        Prim::Less(n) => f.len <= n,
        Prim::Greater(n) => f.len >= n,
    }
}

fn tokenize(text: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let b = text.as_bytes();
    let mut i = 0;
    let flush = |cur: &mut String, out: &mut Vec<String>| {
        if !cur.is_empty() {
            out.push(std::mem::take(cur));
        }
    };
    while i < b.len() {
        let c = b[i] as char;
        let two = text.get(i..i + 2);
        if c.is_ascii_whitespace() {
            flush(&mut cur, &mut out);
        } else if two == Some("&&") || two == Some("||") {
            flush(&mut cur, &mut out);
            out.push(two.unwrap_or_default().to_string());
            i += 1;
        } else if two == Some("!=") {
            return Err("unsupported syntax '!=' (comparisons are not supported)".into());
        } else if c == '(' || c == ')' || c == '!' {
            flush(&mut cur, &mut out);
            out.push(c.to_string());
        } else if c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '/' | '-' | '_') {
            cur.push(c);
        } else {
            // Show the whole word the odd character sits in: `tcp[13]`, `ip[0]`, `len>100`.
            let start = text[..i]
                .rfind(|ch: char| ch.is_ascii_whitespace() || ch == '(')
                .map_or(0, |s| s + 1);
            let end = text[i..]
                .find(|ch: char| ch.is_ascii_whitespace())
                .map_or(text.len(), |e| i + e);
            return Err(format!(
                "unsupported syntax '{}' (character '{c}'; byte offsets, arithmetic and \
                 comparisons are not supported)",
                &text[start..end]
            ));
        }
        i += 1;
    }
    flush(&mut cur, &mut out);
    Ok(out)
}

/// The qualifiers of the last primitive, for tcpdump's shorthand `port 53 or 80`.
#[derive(Debug, Clone, Copy)]
struct Quals {
    proto: Option<&'static str>,
    dir: Dir,
    kind: &'static str,
}

struct Parser<'a> {
    tokens: &'a [String],
    at: usize,
    last: Option<Quals>,
}

const PROTOS: &[&str] = &["ether", "ip", "arp", "tcp", "udp", "icmp"];
const KINDS: &[&str] = &["host", "net", "port", "portrange"];
/// Words of pcap-filter(7) that this subset does not implement, to name them as such.
const UNSUPPORTED: &[&str] = &[
    "gateway",
    "broadcast",
    "multicast",
    "vlan",
    "mpls",
    "pppoed",
    "pppoes",
    "geneve",
    "sctp",
    "rarp",
    "decnet",
    "inbound",
    "outbound",
    "ifname",
    "on",
    "rnr",
    "srnr",
    "reason",
    "rset",
    "action",
    "wlan",
    "type",
    "subtype",
    "dir",
    "atalk",
    "aarp",
    "iso",
    "stp",
    "ipx",
    "netbeui",
    "llc",
    "protochain",
    "len",
    "icmp6",
    "igmp",
    "mask",
    "ra",
    "ta",
    "addr1",
    "addr2",
    "addr3",
    "addr4",
];

impl Parser<'_> {
    fn peek(&self) -> Option<&str> {
        self.tokens.get(self.at).map(String::as_str)
    }

    fn next(&mut self) -> Option<&str> {
        let t = self.tokens.get(self.at).map(String::as_str);
        self.at += 1;
        t
    }

    fn expect_value(&mut self, after: &str) -> Result<String, String> {
        match self.next() {
            None => Err(format!("'{after}' needs a value after it")),
            Some(t) if is_keyword(t) => Err(format!("'{after}' needs a value, not '{t}'")),
            Some(t) => Ok(t.to_string()),
        }
    }

    /// expr := unary (('and'|'&&'|'or'|'||') unary)*, left to right at one precedence.
    fn expr(&mut self) -> Result<Expr, String> {
        let mut left = self.unary()?;
        loop {
            match self.peek() {
                Some("and" | "&&") => {
                    self.at += 1;
                    let right = self.unary()?;
                    left = Expr::And(Box::new(left), Box::new(right));
                }
                Some("or" | "||") => {
                    self.at += 1;
                    let right = self.unary()?;
                    left = Expr::Or(Box::new(left), Box::new(right));
                }
                _ => return Ok(left),
            }
        }
    }

    fn unary(&mut self) -> Result<Expr, String> {
        match self.peek() {
            None => Err("the expression ends where a term was expected".into()),
            Some("not" | "!") => {
                self.at += 1;
                Ok(Expr::Not(Box::new(self.unary()?)))
            }
            Some("(") => {
                self.at += 1;
                let e = self.expr()?;
                match self.next() {
                    Some(")") => Ok(e),
                    Some(t) => Err(format!("expected ')' but found '{t}'")),
                    None => Err("missing ')'".into()),
                }
            }
            Some(")") => Err("unexpected ')'".into()),
            Some(t @ ("and" | "&&" | "or" | "||")) => Err(format!("'{t}' needs a term before it")),
            Some(_) => self.primitive().map(Expr::Prim),
        }
    }

    fn primitive(&mut self) -> Result<Prim, String> {
        let first = self.peek().unwrap_or_default().to_string();
        if UNSUPPORTED.contains(&first.as_str()) {
            return Err(format!(
                "'{first}' is not supported by this switch's filters"
            ));
        }
        // A bare value continues the previous primitive's qualifiers.
        if !is_keyword(&first) {
            self.at += 1;
            let Some(q) = self.last else {
                return match first.parse::<Ipv4Addr>() {
                    Ok(a) => {
                        self.last = Some(Quals {
                            proto: None,
                            dir: Dir::Either,
                            kind: "host",
                        });
                        Ok(Prim::Net {
                            dir: Dir::Either,
                            net: host_net(a),
                            l3: L3::Any,
                        })
                    }
                    Err(_) => Err(format!(
                        "'{first}': expected a primitive (host, net, port, tcp, ...) here"
                    )),
                };
            };
            return self.finish(q, &first);
        }
        let mut proto: Option<&'static str> = None;
        if let Some(p) = PROTOS.iter().find(|p| **p == first) {
            proto = Some(p);
            self.at += 1;
        }
        let dir = match self.peek() {
            Some("src") | Some("dst") => {
                let d = if self.next() == Some("src") {
                    Dir::Src
                } else {
                    Dir::Dst
                };
                // `src or dst` / `src and dst`, when what follows is the other direction.
                let combined = matches!(self.peek(), Some("or" | "and"))
                    && matches!(
                        self.tokens.get(self.at + 1).map(String::as_str),
                        Some("src" | "dst")
                    );
                if combined {
                    let both = self.next() == Some("and");
                    self.at += 1;
                    if both {
                        Dir::Both
                    } else {
                        Dir::Either
                    }
                } else {
                    d
                }
            }
            _ => Dir::Either,
        };
        let kind = match self.peek() {
            Some(k) if KINDS.contains(&k) => {
                let k = KINDS.iter().find(|x| **x == k).copied().unwrap_or("host");
                self.at += 1;
                Some(k)
            }
            _ => None,
        };
        match (proto, kind) {
            // A protocol alone: `tcp`, `arp`, `ip`.
            (Some(p), None) if dir == Dir::Either && !self.value_follows() => {
                if p == "ether" {
                    return Err("'ether' needs 'host', 'src' or 'dst' and a MAC address".into());
                }
                if p == "ip" && self.peek() == Some("proto") {
                    self.at += 1;
                    let v = self
                        .next()
                        .map(str::to_string)
                        .ok_or("'ip proto' needs a protocol number or name after it")?;
                    let n = match v.as_str() {
                        "tcp" => TCP,
                        "udp" => UDP,
                        "icmp" => ICMP,
                        v => v
                            .parse::<u8>()
                            .map_err(|_| format!("'ip proto {v}': not a protocol number"))?,
                    };
                    return Ok(Prim::IpProto(n));
                }
                Ok(proto_prim(p))
            }
            (None, None) if dir == Dir::Either => self.keyword_prim(&first),
            // `ether src MAC`, `src 10.0.0.1` and `ether host MAC` imply `host`.
            (p, k) => {
                let kind = k.unwrap_or("host");
                let q = Quals {
                    proto: p,
                    dir,
                    kind,
                };
                let v = self.expect_value(self.tokens[self.at - 1].as_str())?;
                self.last = Some(q);
                self.finish(q, &v)
            }
        }
    }

    fn value_follows(&self) -> bool {
        self.peek()
            .is_some_and(|t| !is_keyword(t) && t != "(" && t != ")")
    }

    /// Primitives that are a keyword of their own: `vxlan`, `less N`, `greater N`, `ip6`.
    fn keyword_prim(&mut self, first: &str) -> Result<Prim, String> {
        self.at += 1;
        match first {
            "ip6" => Ok(Prim::EtherType(ETH_IPV6)),
            "vxlan" => {
                if self.value_follows() {
                    let v = self.expect_value("vxlan")?;
                    let vni = v
                        .parse::<u32>()
                        .ok()
                        .filter(|n| *n < 1 << 24)
                        .ok_or_else(|| format!("'vxlan {v}': a VNI is 0..16777215"))?;
                    Ok(Prim::Vxlan(Some(vni)))
                } else {
                    Ok(Prim::Vxlan(None))
                }
            }
            "less" | "greater" => {
                let v = self.expect_value(first)?;
                let n = v
                    .parse::<u32>()
                    .map_err(|_| format!("'{first} {v}': not a length"))?;
                Ok(if first == "less" {
                    Prim::Less(n)
                } else {
                    Prim::Greater(n)
                })
            }
            "proto" => Err("'proto' needs a protocol before it, as in 'ip proto 17'".into()),
            t => Err(format!("'{t}' is not supported by this switch's filters")),
        }
    }

    fn finish(&mut self, q: Quals, v: &str) -> Result<Prim, String> {
        let l3 = match q.proto {
            None => L3::Any,
            Some("ip") => L3::Ip,
            Some("arp") => L3::Arp,
            Some("ether") => {
                if q.kind != "host" {
                    return Err(format!(
                        "'ether {}' is not valid; use 'ether host MAC'",
                        q.kind
                    ));
                }
                return Ok(Prim::Ether {
                    dir: q.dir,
                    mac: parse_mac(v)?,
                });
            }
            Some(p) if q.kind == "host" || q.kind == "net" => {
                return Err(format!(
                    "'{p} {}' is not valid: {p} has no addresses",
                    q.kind
                ));
            }
            Some(_) => L3::Ip,
        };
        match q.kind {
            "host" => {
                let a = parse_ipv4(v)?;
                Ok(Prim::Net {
                    dir: q.dir,
                    net: host_net(a),
                    l3,
                })
            }
            "net" => {
                let net = if v.contains('/') {
                    v.parse::<Ipv4Net>()
                        .map_err(|_| format!("'{v}' is not an IPv4 network (A.B.C.D/len)"))?
                } else {
                    host_net(parse_ipv4(v)?)
                };
                if net.trunc() != net {
                    return Err(format!(
                        "'{v}' has host bits set; did you mean {}?",
                        net.trunc()
                    ));
                }
                Ok(Prim::Net {
                    dir: q.dir,
                    net,
                    l3,
                })
            }
            kind => {
                if q.proto == Some("arp") {
                    return Err(format!("'arp {kind}' is not valid: ARP has no ports"));
                }
                let proto = match q.proto {
                    Some("tcp") => Some(TCP),
                    Some("udp") => Some(UDP),
                    Some("icmp") => return Err("'icmp' has no ports".into()),
                    _ => None,
                };
                let (lo, hi) = if kind == "portrange" {
                    let (a, b) = v
                        .split_once('-')
                        .ok_or_else(|| format!("'portrange {v}': expected N-M"))?;
                    (parse_port(a)?, parse_port(b)?)
                } else {
                    let p = parse_port(v)?;
                    (p, p)
                };
                if lo > hi {
                    return Err(format!("'portrange {v}': the range is empty"));
                }
                Ok(Prim::Port {
                    dir: q.dir,
                    lo,
                    hi,
                    proto,
                })
            }
        }
    }
}

fn proto_prim(p: &str) -> Prim {
    match p {
        "ip" => Prim::EtherType(ETH_IPV4),
        "arp" => Prim::EtherType(ETH_ARP),
        "tcp" => Prim::IpProto(TCP),
        "udp" => Prim::IpProto(UDP),
        _ => Prim::IpProto(ICMP),
    }
}

fn is_keyword(t: &str) -> bool {
    PROTOS.contains(&t)
        || KINDS.contains(&t)
        || UNSUPPORTED.contains(&t)
        || matches!(
            t,
            "src"
                | "dst"
                | "and"
                | "or"
                | "not"
                | "&&"
                | "||"
                | "!"
                | "ip6"
                | "vxlan"
                | "less"
                | "greater"
                | "proto"
        )
}

fn host_net(a: Ipv4Addr) -> Ipv4Net {
    Ipv4Net::new(a, 32).unwrap_or_default()
}

fn parse_ipv4(v: &str) -> Result<Ipv4Addr, String> {
    if v.parse::<std::net::Ipv6Addr>().is_ok() {
        return Err(format!("'{v}': IPv6 addresses are not supported"));
    }
    v.parse()
        .map_err(|_| format!("'{v}' is not an IPv4 address (host names are not resolved)"))
}

fn parse_port(v: &str) -> Result<u16, String> {
    v.parse()
        .map_err(|_| format!("'{v}' is not a port number (service names are not resolved)"))
}

fn parse_mac(v: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = v.split([':', '-']).collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("'{v}' is not a MAC address (aa:bb:cc:dd:ee:ff)"));
    }
    for (m, p) in mac.iter_mut().zip(&parts) {
        *m = u8::from_str_radix(p, 16)
            .map_err(|_| format!("'{v}' is not a MAC address (aa:bb:cc:dd:ee:ff)"))?;
    }
    Ok(mac)
}
