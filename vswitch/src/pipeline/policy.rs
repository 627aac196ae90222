//! NetworkPolicy at the switch: a connection's first packet is judged, and an admitted
//! connection is tracked, so its later packets, its replies and ICMP errors about it pass
//! without being judged again (the verdict costs once per connection, not per packet).
//!
//! Only connections of pods that a policy selects (in either direction) are judged and
//! tracked; everything else takes the path it took before policies existed. Each switch judges
//! its own pods' side: egress for a local source, ingress for a local destination, after
//! Service translation (against the backend pod and its target port). The node itself is
//! always let in (kubelet's probes), as Calico and Cilium do.
//!
//! A connection keeps the verdict it was admitted with until it ends, as with Calico and
//! Cilium: a policy change applies to new connections. A connection that was open before a
//! policy selected its pod has no entry, so its next packet is judged as a new one.

use super::nat::{self, CtState, Key};
use super::{Ctx, DropReason, PortEntry};
use crate::policy::{Direction, End, PolicyTables, PortPolicy};
use crate::wire::{IpProtocol, Ipv4Packet, TcpFlags, TcpPacket};

/// What connection a packet belongs to, for policy.
enum Flow {
    /// A fragment after the first: it carries no ports, and without its first fragment (which
    /// was judged) it is never a datagram, so it passes.
    Fragment,
    /// A packet that opens or continues a connection: its key (ICMP echoes keyed by their
    /// identifier) and TCP flags.
    Conn(Key, TcpFlags),
    /// An ICMP error: related to the connection of the packet it quotes, if one is tracked.
    Error(Option<Key>),
}

fn flow_of(ip: &Ipv4Packet<&mut [u8]>) -> Flow {
    if ip.frag_offset() != 0 {
        return Flow::Fragment;
    }
    let (src, dst, proto) = (ip.src_addr(), ip.dst_addr(), ip.protocol());
    let key = |sport, dport| Key {
        src,
        dst,
        sport,
        dport,
        proto: proto.0,
    };
    if proto == IpProtocol::ICMP {
        use crate::wire::{Icmpv4Message, Icmpv4Packet};
        let Ok(icmp) = Icmpv4Packet::new_checked(ip.payload()) else {
            return Flow::Conn(key(0, 0), TcpFlags::empty());
        };
        let t = icmp.msg_type();
        if t == Icmpv4Message::ECHO_REQUEST || t == Icmpv4Message::ECHO_REPLY {
            let id = icmp.echo_ident();
            return Flow::Conn(key(id, id), TcpFlags::empty());
        }
        if t == Icmpv4Message::DST_UNREACHABLE || t == Icmpv4Message::TIME_EXCEEDED {
            let quoted = Key::of_quoted(icmp.data());
            return Flow::Error(quoted);
        }
        return Flow::Conn(key(0, 0), TcpFlags::empty());
    }
    let (sport, dport) = ip.ports().unwrap_or((0, 0));
    let flags = if proto == IpProtocol::TCP {
        TcpPacket::new_checked(ip.payload())
            .map(|t| t.flags())
            .unwrap_or(TcpFlags::empty())
    } else {
        TcpFlags::empty()
    };
    Flow::Conn(key(sport, dport), flags)
}

/// Where a packet comes from, for policy.
#[derive(Clone, Copy)]
pub(super) enum From<'a> {
    /// A pod of this switch.
    Pod(&'a PortEntry),
    /// The node itself (the host port): always let in.
    Node,
    /// Another node's pod, or the outside.
    Elsewhere,
}

/// Judges the packet in `ip` (after Service translation, whose outcome is `done`) from `src`
/// to `dst` (a pod of this switch, or `None`); an admitted new connection is tracked. `Err`
/// carries the drop reason.
pub(super) fn admit(
    cx: &mut Ctx<'_>,
    src: From<'_>,
    dst: Option<&PortEntry>,
    ip: &Ipv4Packet<&mut [u8]>,
    done: nat::Nat,
) -> Result<(), DropReason> {
    let Some(pt) = cx.t.policy.as_deref() else {
        return Ok(());
    };
    let sp = match src {
        From::Pod(p) => pt.local(p.id),
        From::Node | From::Elsewhere => None,
    };
    let dp = dst.and_then(|p| pt.local(p.id));
    if !sp.is_some_and(PortPolicy::isolated) && !dp.is_some_and(PortPolicy::isolated) {
        cx.note(|| "policy: no policy selects either end: not judged".into());
        return Ok(());
    }
    // A tracked connection's packet (translated or tracked for policy): admitted before.
    if matches!(done, nat::Nat::Translated | nat::Nat::Tracked) {
        return Ok(());
    }
    let now = cx.now_ms;
    let (key, flags) = match flow_of(ip) {
        Flow::Fragment => return Ok(()),
        Flow::Error(quoted) => {
            let related = quoted.is_some_and(|q| {
                cx.ct.touch(&q, now, TcpFlags::empty())
                    || cx.ct.touch(&q.reversed(), now, TcpFlags::empty())
            });
            if related {
                cx.note(|| "policy: an ICMP error about a tracked connection: passes".into());
                return Ok(());
            }
            let k = Key {
                src: ip.src_addr(),
                dst: ip.dst_addr(),
                sport: 0,
                dport: 0,
                proto: IpProtocol::ICMP.0,
            };
            (k, TcpFlags::empty())
        }
        Flow::Conn(key, flags) => {
            if done != nat::Nat::Opened && cx.ct.touch(&key, now, flags) {
                return Ok(());
            }
            (key, flags)
        }
    };
    let (src_end, dst_end) = (
        End {
            ip: key.src.into(),
            local: sp,
        },
        End {
            ip: key.dst.into(),
            local: dp,
        },
    );
    let verdict = pt.judge(src_end, dst_end, key.proto, key.dport);
    let says = |dir| Says {
        pt,
        ends: (src_end, dst_end),
        key: &key,
        from_node: matches!(src, From::Node),
        dir,
    };
    // The node itself is always let in.
    let from_node = matches!(src, From::Node);
    if let Some(dir) = verdict
        .denied()
        .filter(|d| *d == Direction::Egress || !from_node)
    {
        if done == nat::Nat::Opened {
            // The Service connection this packet opened goes with it.
            cx.ct.forget(&key.reversed());
        }
        cx.note(|| {
            let other = match dir {
                Direction::Ingress => Direction::Egress,
                Direction::Egress => Direction::Ingress,
            };
            let (d, o) = (says(dir), says(other));
            format!("policy: denied by {}: {d}; {o}", dir.name())
        });
        return Err(match dir {
            Direction::Ingress => DropReason::PolicyDeniedIngress,
            Direction::Egress => DropReason::PolicyDeniedEgress,
        });
    }
    cx.note(|| {
        let (e, i) = (says(Direction::Egress), says(Direction::Ingress));
        format!("policy: admitted: {e}; {i}")
    });
    if done == nat::Nat::Opened {
        // The Service connection tracks it already.
        return Ok(());
    }
    let state = if key.proto != IpProtocol::TCP.0 {
        CtState::UdpNew
    } else if flags.contains(TcpFlags::SYN) {
        CtState::SynSent
    } else {
        CtState::Established
    };
    if !cx.ct.track(key, state, now) {
        return Err(DropReason::ConntrackRefused);
    }
    Ok(())
}

/// One side of a verdict in words, for `trace` (built only when tracing).
struct Says<'a> {
    pt: &'a PolicyTables,
    ends: (End<'a>, End<'a>),
    key: &'a Key,
    from_node: bool,
    dir: Direction,
}

impl std::fmt::Display for Says<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (src, dst) = self.ends;
        let (me, remote) = match self.dir {
            Direction::Egress => (src, dst),
            Direction::Ingress => (dst, src),
        };
        let dir = self.dir.name();
        let Some(local) = me.local else {
            return write!(
                f,
                "{dir} not judged here ({} is not a pod of this switch)",
                me.ip
            );
        };
        let who = format!("{}/{}", local.pod.namespace, local.pod.name);
        let names = |ids: &[u32]| {
            let v: Vec<String> = ids
                .iter()
                .filter_map(|&i| self.pt.set.policy(i).map(|p| p.id()))
                .collect();
            v.join(", ")
        };
        let selected = local.selected.get(self.dir);
        if selected.is_empty() {
            return write!(f, "no policy selects {who} for {dir}");
        }
        if self.from_node && self.dir == Direction::Ingress {
            return write!(f, "{dir} of {who}: the node itself is always let in");
        }
        let k = self.key;
        let admitting = self.pt.admitting(self.dir, local, remote, k.proto, k.dport);
        if admitting.is_empty() {
            write!(
                f,
                "{who} is isolated for {dir} by {} and no rule of theirs admits {}",
                names(selected),
                Conn(k)
            )
        } else {
            write!(f, "{dir} of {who} admitted by {}", names(&admitting))
        }
    }
}

/// `TCP 10.244.1.2:40000 -> 10.244.1.3:80`, `ICMP 10.244.1.2 -> 10.244.1.3`.
struct Conn<'a>(&'a Key);

impl std::fmt::Display for Conn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let k = self.0;
        match crate::policy::Proto::from_number(k.proto) {
            Some(p) => write!(
                f,
                "{} {}:{} -> {}:{}",
                p.name(),
                k.src,
                k.sport,
                k.dst,
                k.dport
            ),
            None if k.proto == IpProtocol::ICMP.0 => write!(f, "ICMP {} -> {}", k.src, k.dst),
            None => write!(f, "IP protocol {} {} -> {}", k.proto, k.src, k.dst),
        }
    }
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
