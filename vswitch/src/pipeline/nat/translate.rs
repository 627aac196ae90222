//! What a packet goes through: a Service's first packet opens a connection, later packets of
//! either direction are rewritten as it says, and ICMP errors about it are translated too.

use std::net::Ipv4Addr;

use super::conntrack::{advance, Conn, Conntrack, CtState, Dir, Key};
use super::services::ServiceTable;
use crate::wire::checksum;
use crate::wire::{IpProtocol, Ipv4Packet, TcpFlags, TcpPacket, UdpPacket};

/// What translation did to a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// Not a Service's, not a tracked connection's.
    None,
    /// Rewritten (either direction) as an existing connection says.
    Translated,
    /// The first packet of a connection to a Service: a backend chosen, a connection made,
    /// the packet rewritten.
    Opened,
    /// A connection tracked for NetworkPolicy only: nothing rewritten.
    Tracked,
    /// A Service frontend with no backend: the caller rejects it (TCP RST or ICMP port
    /// unreachable from the Service address).
    NoBackend,
    /// A table full of entries that could not be evicted, or a hairpin address clash.
    Refused,
}

/// L4 header facts of a TCP/UDP packet.
struct L4 {
    key: Key,
    flags: TcpFlags,
}

fn l4_of(ip: &Ipv4Packet<&mut [u8]>) -> Option<L4> {
    if ip.is_fragment() {
        return None;
    }
    let proto = ip.protocol();
    let p = ip.payload();
    let (sport, dport, flags) = if proto == IpProtocol::TCP {
        let t = TcpPacket::new_checked(p).ok()?;
        (t.src_port(), t.dst_port(), t.flags())
    } else if proto == IpProtocol::UDP {
        let u = UdpPacket::new_checked(p).ok()?;
        (u.src_port(), u.dst_port(), TcpFlags::empty())
    } else {
        return None;
    };
    Some(L4 {
        key: Key {
            src: ip.src_addr(),
            dst: ip.dst_addr(),
            sport,
            dport,
            proto: proto.0,
        },
        flags,
    })
}

/// Rewrites addresses and ports, patching the IP header checksum and the L4 checksum (or, for
/// a checksum-offloaded frame, its partial pseudo-header sum, which covers addresses but not
/// ports).
pub fn rewrite(
    ip: &mut Ipv4Packet<&mut [u8]>,
    src: Option<(Ipv4Addr, u16)>,
    dst: Option<(Ipv4Addr, u16)>,
    csum_partial: bool,
) {
    let (old_src, old_dst) = (ip.src_addr(), ip.dst_addr());
    if let Some((a, _)) = src {
        ip.set_src_addr_incremental(a);
    }
    if let Some((a, _)) = dst {
        ip.set_dst_addr_incremental(a);
    }
    let (Some(old_ports), Some(mut csum)) = (ip.ports(), ip.l4_checksum()) else {
        return;
    };
    let src_port = src.map_or(old_ports.0, |(_, p)| p);
    let dst_port = dst.map_or(old_ports.1, |(_, p)| p);
    ip.set_ports(src_port, dst_port);
    let udp = ip.protocol() == IpProtocol::UDP;
    if udp && csum == 0 {
        // "No checksum" stays so; only the ports change.
        return;
    }
    // A partial sum is the pseudo-header sum itself, not its complement.
    let update32 = |c: u16, old: Ipv4Addr, new: Ipv4Addr| {
        if csum_partial {
            !checksum::update_u32(!c, u32::from(old), u32::from(new))
        } else {
            checksum::update_u32(c, u32::from(old), u32::from(new))
        }
    };
    if let Some((a, p)) = src {
        csum = update32(csum, old_src, a);
        if !csum_partial {
            csum = checksum::update_u16(csum, old_ports.0, p);
        }
    }
    if let Some((a, p)) = dst {
        csum = update32(csum, old_dst, a);
        if !csum_partial {
            csum = checksum::update_u16(csum, old_ports.1, p);
        }
    }
    if udp && csum == 0 && !csum_partial {
        csum = 0xffff;
    }
    ip.set_l4_checksum(csum);
}

/// Rewrites a packet of this connection as its direction is translated: the client's
/// to the backend (and, hairpinned, from the gateway), the backend's back to the Service
/// address (and to the client's own address and port).
fn rewrite_conn(conn: &Conn, dir: Dir, ip: &mut Ipv4Packet<&mut [u8]>, csum_partial: bool) {
    match dir {
        Dir::Orig => {
            let to = (conn.backend.ip, conn.backend.port);
            rewrite(ip, conn.snat, Some(to), csum_partial);
        }
        Dir::Reply => {
            let from = (conn.orig.dst, conn.orig.dport);
            let to = conn.snat.map(|_| (conn.orig.src, conn.orig.sport));
            rewrite(ip, Some(from), to, csum_partial);
        }
    }
}

/// Translates a backend's reply of a tracked connection back to the Service address, and
/// nothing else. For frames switched at layer 2: a backend on the client's own subnet answers
/// the client directly, not through the gateway, yet the client must see the Service address.
pub fn untranslate_reply(
    ct: &mut Conntrack,
    now: u64,
    ip: &mut Ipv4Packet<&mut [u8]>,
    csum_partial: bool,
) -> bool {
    if ct.is_empty() {
        return false;
    }
    let Some(l4) = l4_of(ip) else {
        return false;
    };
    let cfg = ct.cfg;
    ct.with_conn(&l4.key, now, |e, dir| {
        if dir != Dir::Reply || e.policy_only {
            return false;
        }
        e.touch(&cfg, now, Dir::Reply, l4.flags);
        rewrite_conn(e, Dir::Reply, ip, csum_partial);
        true
    })
    .unwrap_or(false)
}

/// Translates a packet if it belongs to a tracked connection or opens one to a Service.
/// `gateway` is the address hairpinned clients are seen as.
pub fn translate(
    services: &ServiceTable,
    ct: &mut Conntrack,
    now: u64,
    ip: &mut Ipv4Packet<&mut [u8]>,
    gateway: Ipv4Addr,
    csum_partial: bool,
) -> Nat {
    translate_from(services, ct, now, ip, gateway, csum_partial, |_| true)
}

/// [`translate`], where `in_cluster(client)` says whether a client is inside the cluster
/// (a pod or a node), which decides the endpoints of an external address of a Service with
/// `externalTrafficPolicy: Local` (see `services`).
pub fn translate_from(
    services: &ServiceTable,
    ct: &mut Conntrack,
    now: u64,
    ip: &mut Ipv4Packet<&mut [u8]>,
    gateway: Ipv4Addr,
    csum_partial: bool,
    in_cluster: impl Fn(Ipv4Addr) -> bool,
) -> Nat {
    let Some(l4) = l4_of(ip) else {
        return Nat::None;
    };
    let key = l4.key;
    // A SYN opens a connection: its Service's index slot, which holds what choosing a backend
    // reads for most Services (see `VipIndex`), starts loading before the connection table is
    // looked up (the worker has usually started it already: `pipeline::prefetch`). Among
    // 10,000 Services that slot is not in cache. Other packets mostly belong to a connection:
    // they look up the Service only if the connection table has none.
    let opens = key.proto == IpProtocol::TCP.0 && l4.flags.opens();
    if opens {
        services.prefetch(key.dst, key.proto, key.dport);
    }
    let cfg = ct.cfg;
    let known = ct.with_conn(&key, now, |e, dir| {
        e.touch(&cfg, now, dir, l4.flags);
        if e.policy_only {
            return Nat::Tracked;
        }
        rewrite_conn(e, dir, ip, csum_partial);
        Nat::Translated
    });
    if let Some(n) = known {
        return n;
    }
    let Some(hit) = services.find(key.dst, key.proto, key.dport) else {
        return Nat::None;
    };
    let outside = (hit.has_internal() || hit.masquerade_outside()) && !in_cluster(key.src);
    // A non-SYN for an unknown connection (its entry expired or the switch restarted) is
    // tracked as established: consistent hashing (`Frontend::consistent_choice`) sends it to the
    // same backend as before whenever that backend is still there, which is what lets
    // connections survive a restart.
    let chosen = match hit.plain_choice(&key, services.lb) {
        Some(b) => b,
        None => {
            let fe = services.for_client(hit.fe, !outside);
            ct.pick(fe, &key, services.lb, now)
        }
    };
    let Some(backend) = chosen else {
        return Nat::NoBackend;
    };
    // A hairpin (the client is its own backend), or a client outside the cluster where the
    // backend must see the node (see `Frontend::masquerade_outside`): from the gateway.
    let mut snat = (backend.ip == key.src || (outside && hit.masquerade_outside()))
        .then_some((gateway, key.sport));
    let mut reply = Key {
        src: backend.ip,
        dst: snat.map_or(key.src, |s| s.0),
        sport: backend.port,
        dport: key.sport,
        proto: key.proto,
    };
    // The client may use one source port towards two addresses that lead to the same backend
    // (a ClusterIP and an external IP, two Services over the same pods): the replies would be
    // indistinguishable, so, as kernel NAT does, the second gets another source port. The
    // check sees every connection the other workers announced before this one's lookup; two
    // workers creating clashing connections within the same few microseconds can still both
    // pass it (the two views then agree on one connection for the shared reply key, and the
    // other's replies go to the wrong client until it expires). It takes one client sending
    // the first packets of two connections from one port at once, on two queues.
    if ct.taken(&reply, now) {
        use std::hash::BuildHasher;
        let h = foldhash::fast::FixedState::with_seed(0x736e_6174);
        let free = (0..32u64).find_map(|i| {
            let port = 32_768 + (h.hash_one((key, i)) % 28_232) as u16;
            let k = Key {
                dport: port,
                ..reply
            };
            (!ct.taken(&k, now)).then_some((port, k))
        });
        let Some((port, k)) = free else {
            return Nat::Refused;
        };
        snat = Some((snat.map_or(key.src, |s| s.0), port));
        reply = k;
    }
    let state = if key.proto == IpProtocol::TCP.0 {
        if l4.flags.contains(TcpFlags::SYN) {
            CtState::SynSent
        } else {
            advance(CtState::Established, Dir::Orig, l4.flags, key.proto)
        }
    } else {
        CtState::UdpNew
    };
    let to = (backend.ip, backend.port);
    if !ct.create(key, reply, backend, snat, state, now) {
        return Nat::Refused;
    }
    rewrite(ip, snat, Some(to), csum_partial);
    Nat::Opened
}

/// For an ICMP error about a translated connection (a backend's "port unreachable", a router's
/// "fragmentation needed" on the way back), rewrites the quoted packet and the error's own
/// source so the client sees them about the Service address. Returns whether it did.
pub fn translate_icmp_error(ct: &mut Conntrack, now: u64, ip: &mut Ipv4Packet<&mut [u8]>) -> bool {
    use crate::wire::{Icmpv4Message, Icmpv4Packet};
    if ip.protocol() != IpProtocol::ICMP || ip.is_fragment() {
        return false;
    }
    let (outer_src, outer_dst) = (ip.src_addr(), ip.dst_addr());
    let Ok(icmp) = Icmpv4Packet::new_checked(ip.payload_mut()) else {
        return false;
    };
    let t = icmp.msg_type();
    if t != Icmpv4Message::DST_UNREACHABLE && t != Icmpv4Message::TIME_EXCEEDED {
        return false;
    }
    // The quoted packet is one the backend's side sent: client -> backend after translation.
    // Only TCP and UDP connections are translated by port.
    let Some(quoted_key) = Key::of_quoted(icmp.data())
        .filter(|k| k.proto == IpProtocol::TCP.0 || k.proto == IpProtocol::UDP.0)
    else {
        return false;
    };
    // That packet, reversed, is what the backend would send: the reply key.
    let found = ct.with_conn(&quoted_key.reversed(), now, |e, dir| {
        (dir == Dir::Reply && !e.policy_only).then_some((
            e.orig,
            e.reply,
            e.backend.ip,
            e.snat.is_some(),
        ))
    });
    let Some((orig, reply, backend_ip, snat)) = found.flatten() else {
        return false;
    };
    let mut icmp = match Icmpv4Packet::new_checked(ip.payload_mut()) {
        Ok(i) => i,
        Err(_) => return false,
    };
    {
        let Ok(mut q) = Ipv4Packet::new_checked_quoted(icmp.data_mut()) else {
            return false;
        };
        q.set_dst_addr_incremental(orig.dst);
        if snat {
            q.set_src_addr_incremental(orig.src);
        }
        if let Some((sport, _)) = q.ports() {
            q.set_ports(if snat { orig.sport } else { sport }, orig.dport);
        }
    }
    icmp.fill_checksum();
    // An error from the backend itself comes from the Service address; one from a router on
    // the way keeps its source.
    if outer_src == backend_ip {
        ip.set_src_addr_incremental(orig.dst);
    }
    if snat && outer_dst == reply.dst {
        ip.set_dst_addr_incremental(orig.src);
    }
    true
}
