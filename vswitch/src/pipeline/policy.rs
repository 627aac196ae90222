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
use crate::policy::{Direction, End, PortPolicy};
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
            let quoted = Ipv4Packet::new_checked_quoted(icmp.data()).ok().map(|q| {
                let (sport, dport) = q.ports().unwrap_or((0, 0));
                Key {
                    src: q.src_addr(),
                    dst: q.dst_addr(),
                    sport,
                    dport,
                    proto: q.protocol().0,
                }
            });
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
    let verdict = pt.judge(
        End {
            ip: key.src.into(),
            local: sp,
        },
        End {
            ip: key.dst.into(),
            local: dp,
        },
        key.proto,
        key.dport,
    );
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
        cx.note(|| format!("policy: {} denied: no policy admits it", dir.name()));
        return Err(match dir {
            Direction::Ingress => DropReason::PolicyDeniedIngress,
            Direction::Egress => DropReason::PolicyDeniedEgress,
        });
    }
    cx.note(|| {
        let name = |j: crate::policy::Judgement| match j {
            crate::policy::Judgement::Allowed(i) => {
                pt.set.policy(i).map_or("?".to_string(), |p| p.id())
            }
            _ => "no policy selects the pod".to_string(),
        };
        format!(
            "policy: admitted (egress: {}; ingress: {})",
            name(verdict.egress),
            name(verdict.ingress)
        )
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

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
