//! Configuring a pod's interface over netlink, inside the pod's network namespace.
//!
//! Each operation runs on a throw-away thread that has joined the pod's namespace (see
//! `datapath::netns`): the TAP device is created there directly under its final name, so it
//! never appears in the node's namespace and needs no rename; then a netlink socket opened on
//! the same thread sets MAC, MTU, link up, the address and the default route via the node's
//! gateway. Any failure drops the TAP handle, and the kernel deletes the device with it: a
//! failed ADD leaves nothing behind.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::datapath::netns;
use crate::datapath::tap::Tap;
use crate::wire::EthernetAddress;

/// What an interface in a pod must look like.
#[derive(Debug, Clone)]
pub struct PodInterface {
    pub ifname: String,
    pub mac: EthernetAddress,
    /// The pod's address with the pod CIDR's prefix length.
    pub address: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub mtu: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum NetConfigError {
    #[error("interface {0} already exists in the pod's network namespace")]
    Exists(String),
    #[error("interface {name} exists on the node and cannot be taken as the host port: {source}")]
    HostExists { name: String, source: io::Error },
    #[error("{0}")]
    Netns(io::Error),
    #[error("creating TAP device {name}: {source}")]
    Tap { name: String, source: io::Error },
    #[error("netlink: {0}")]
    Netlink(String),
    #[error("{0}")]
    Mismatch(String),
}

/// Whether netlink refused because what was asked for is already there (EEXIST).
fn already_exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EEXIST)
}

fn netlink<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> NetConfigError {
    move |e| NetConfigError::Netlink(format!("{what}: {e}"))
}

/// Runs an async netlink job on the current (namespace) thread.
fn with_handle<T, F, Fut>(f: F) -> Result<T, NetConfigError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: std::future::Future<Output = Result<T, NetConfigError>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(netlink("starting netlink runtime"))?;
    rt.block_on(async move {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(netlink("opening netlink socket"))?;
        let task = tokio::spawn(conn);
        let r = f(handle).await;
        task.abort();
        r
    })
}

/// Adds `add` and removes `del`, routes through the host port `ifname` in this process's
/// namespace. A route the kernel already has counts as added and one it no longer has as
/// removed; the others that fail are returned with why.
pub fn sync_host_routes(
    ifname: &str,
    add: &[Ipv4Net],
    del: &[Ipv4Net],
) -> Result<Vec<(Ipv4Net, String)>, NetConfigError> {
    let index = crate::datapath::tap::interface_index(ifname)
        .ok_or_else(|| NetConfigError::Netlink(format!("no interface {ifname}")))?;
    let (add, del) = (add.to_vec(), del.to_vec());
    with_handle(|handle| async move {
        let route = |r: &Ipv4Net| {
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(r.network(), r.prefix_len())
                .output_interface(index)
                .build()
        };
        let mut failed = Vec::new();
        for r in &add {
            match handle.route().add(route(r)).execute().await {
                Err(e) if !already_exists(&e) => failed.push((*r, e.to_string())),
                _ => {}
            }
        }
        for r in &del {
            match handle.route().del(route(r)).execute().await {
                Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -libc::ESRCH => {}
                Err(e) => failed.push((*r, e.to_string())),
                Ok(()) => {}
            }
        }
        Ok(failed)
    })
}

/// Creates the pod's TAP interface in `netns_path` and configures it. The returned [`Tap`] is
/// the switch's end of the port; with it the TAP's kernel counters, or why they cannot be read
/// (which does not fail the port).
pub fn create_pod_interface(
    netns_path: &Path,
    want: PodInterface,
    offload: bool,
    queues: usize,
) -> Result<(Tap, io::Result<LinkStats>), NetConfigError> {
    netns::run_in(netns_path, move || {
        let mut tap = match Tap::create(&want.ifname, offload) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Ok(Err(NetConfigError::Exists(want.ifname.clone())))
            }
            Err(source) => {
                return Ok(Err(NetConfigError::Tap {
                    name: want.ifname.clone(),
                    source,
                }))
            }
        };
        // On error `tap` is dropped here, which deletes the device (it is not persistent yet).
        let configured = configure(&want).and_then(|()| {
            tap.add_queues(queues)
                .and_then(|()| tap.set_persist(true))
                .map_err(|source| NetConfigError::Tap {
                    name: want.ifname.clone(),
                    source,
                })
        });
        Ok(configured.map(|()| {
            let link = LinkStats::open(&want.ifname);
            (tap, link)
        }))
    })
    .map_err(NetConfigError::Netns)?
}

fn configure(want: &PodInterface) -> Result<(), NetConfigError> {
    let index = crate::datapath::tap::interface_index(&want.ifname)
        .ok_or_else(|| NetConfigError::Netlink(format!("{} vanished", want.ifname)))?;
    let want = want.clone();
    with_handle(|handle| async move {
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .address(want.mac.0.to_vec())
                    .mtu(want.mtu)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(netlink("setting MAC, MTU and link up"))?;
        handle
            .address()
            .add(
                index,
                IpAddr::V4(want.address.addr()),
                want.address.prefix_len(),
            )
            .execute()
            .await
            .map_err(netlink("adding address"))?;
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(want.gateway)
            .output_interface(index)
            .build();
        handle
            .route()
            .add(route)
            .execute()
            .await
            .map_err(netlink("adding default route"))?;
        Ok(())
    })
}

/// Takes back the persistent TAP `ifname` in `netns_path` after a restart of the switch, with
/// its kernel counters as [`create_pod_interface`] returns them.
pub fn reattach_pod_interface(
    netns_path: &Path,
    ifname: String,
    offload: bool,
    queues: usize,
) -> Result<(Tap, io::Result<LinkStats>), NetConfigError> {
    netns::run_in(netns_path, move || {
        Ok(Tap::attach(&ifname, offload)
            .and_then(|mut t| t.add_queues(queues).map(|()| t))
            .map(|t| (t, LinkStats::open(&ifname)))
            .map_err(|source| NetConfigError::Tap {
                name: ifname.clone(),
                source,
            }))
    })
    .map_err(NetConfigError::Netns)?
}

/// Deletes the persistent TAP `ifname` in `netns_path`, if it is there (DEL of a port the
/// switch did not hold).
pub fn delete_pod_interface(netns_path: &Path, ifname: String) {
    let _ = netns::run_in(netns_path, move || {
        if let Ok(t) = Tap::attach(&ifname, false) {
            t.destroy();
        }
        Ok(())
    });
}

/// Creates the host port, `name`, in the calling process's own network namespace: the
/// gateway address with the pod CIDR's prefix, and `routes` into the switch.
pub fn create_host_interface(
    name: &str,
    mac: EthernetAddress,
    address: Ipv4Net,
    mtu: u32,
    routes: Vec<Ipv4Net>,
    offload: bool,
    queues: usize,
) -> Result<Tap, NetConfigError> {
    let tap_err = |source| NetConfigError::Tap {
        name: name.to_string(),
        source,
    };
    // The host port is persistent, so it outlives a vswitchd that exits (an upgrade, a
    // restart): the node keeps its address and routes, and its probes find the device. A
    // vswitchd that starts takes the device back; an interface of that name that is no TAP
    // (or another kind of TAP) is refused.
    let mut tap = match Tap::create(name, offload) {
        Ok(t) => {
            t.set_persist(true).map_err(tap_err)?;
            t
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => match Tap::attach(name, offload) {
            Ok(t) => {
                tracing::info!("host port {name}: taken back from an earlier vswitchd");
                t
            }
            Err(source) => {
                return Err(NetConfigError::HostExists {
                    name: name.to_string(),
                    source,
                })
            }
        },
        Err(source) => return Err(tap_err(source)),
    };
    tap.add_queues(queues)
        .map_err(|source| NetConfigError::Tap {
            name: name.to_string(),
            source,
        })?;
    let index = crate::datapath::tap::interface_index(name)
        .ok_or_else(|| NetConfigError::Netlink(format!("{name} vanished")))?;
    with_handle(|handle| async move {
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .address(mac.0.to_vec())
                    .mtu(mtu)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(netlink("setting the host port's MAC, MTU and link up"))?;
        // A device taken back already has its address and routes.
        match handle
            .address()
            .add(index, IpAddr::V4(address.addr()), address.prefix_len())
            .execute()
            .await
        {
            Err(e) if already_exists(&e) => {}
            r => r.map_err(netlink("adding the host port's address"))?,
        }
        for r in routes {
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(r.network(), r.prefix_len())
                .output_interface(index)
                .build();
            match handle.route().add(route).execute().await {
                Ok(()) => {}
                Err(e) if already_exists(&e) => {}
                // A route the node already has through another device is not fatal.
                Err(e) => tracing::warn!("host port route {r}: {e}"),
            }
        }
        Ok(())
    })?;
    Ok(tap)
}

/// Checks the live interface in `netns_path` against what the switch gave it: present, up,
/// the right MAC, the address, and the default route via the gateway.
pub fn check_pod_interface(netns_path: &Path, want: PodInterface) -> Result<(), NetConfigError> {
    netns::run_in(netns_path, move || Ok(check(&want))).map_err(NetConfigError::Netns)?
}

fn check(want: &PodInterface) -> Result<(), NetConfigError> {
    let want = want.clone();
    with_handle(|handle| async move {
        let name = want.ifname.clone();
        let link = handle
            .link()
            .get()
            .match_name(name.clone())
            .execute()
            .try_next()
            .await
            .map_err(|_| NetConfigError::Mismatch(format!("interface {name} does not exist")))?
            .ok_or_else(|| NetConfigError::Mismatch(format!("interface {name} does not exist")))?;
        let index = link.header.index;
        if !link.header.flags.contains(LinkFlags::Up) {
            return Err(NetConfigError::Mismatch(format!(
                "interface {name} is down"
            )));
        }
        let mac = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Address(m) => Some(m.clone()),
            _ => None,
        });
        if mac.as_deref() != Some(&want.mac.0[..]) {
            return Err(NetConfigError::Mismatch(format!(
                "interface {name} has MAC {}, expected {}",
                mac.map(|m| format!("{m:02x?}")).unwrap_or_default(),
                want.mac
            )));
        }
        let mut addrs = handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut found = false;
        while let Some(a) = addrs
            .try_next()
            .await
            .map_err(netlink("listing addresses"))?
        {
            let has = a.attributes.iter().any(|attr| {
                matches!(attr, AddressAttribute::Address(IpAddr::V4(ip)) if *ip == want.address.addr())
            });
            if has && a.header.prefix_len == want.address.prefix_len() {
                found = true;
            }
        }
        if !found {
            return Err(NetConfigError::Mismatch(format!(
                "interface {name} does not have address {}",
                want.address
            )));
        }
        let mut routes = handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        let mut default_ok = false;
        while let Some(r) = routes.try_next().await.map_err(netlink("listing routes"))? {
            if r.header.destination_prefix_length != 0 {
                continue;
            }
            let gw = r.attributes.iter().any(|a| {
                matches!(a, RouteAttribute::Gateway(RouteAddress::Inet(g)) if *g == want.gateway)
            });
            let oif = r
                .attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == index));
            if gw && oif {
                default_ok = true;
            }
        }
        if !default_ok {
            return Err(NetConfigError::Mismatch(format!(
                "no default route via {} on {name}",
                want.gateway
            )));
        }
        Ok(())
    })
}

/// The kernel's own counters of a port's interface, read over a netlink socket that was opened
/// in the interface's namespace and stays bound to it (no thread has to enter the namespace
/// again to read them).
pub struct LinkStats {
    index: u32,
    /// One request at a time.
    conn: std::sync::Mutex<LinkConn>,
}

struct LinkConn {
    sock: rtnetlink::sys::Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl std::fmt::Debug for LinkStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkStats")
            .field("index", &self.index)
            .finish()
    }
}

impl LinkStats {
    /// For interface `ifname` of the calling thread's namespace: a pod's, on the thread that
    /// joined it, or the switch's own (the host port).
    pub fn open(ifname: &str) -> io::Result<LinkStats> {
        let index = crate::datapath::tap::interface_index(ifname)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no {ifname}")))?;
        let mut sock = rtnetlink::sys::Socket::new(rtnetlink::sys::protocols::NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&rtnetlink::sys::SocketAddr::new(0, 0))?;
        // A reply is a matter of microseconds; never hang a caller on a wedged socket.
        socket2::SockRef::from(&sock)
            .set_read_timeout(Some(std::time::Duration::from_millis(200)))?;
        Ok(LinkStats {
            index,
            conn: std::sync::Mutex::new(LinkConn {
                sock,
                seq: 0,
                buf: vec![0u8; 32_768],
            }),
        })
    }

    /// Frames sent on the interface that its driver dropped. For a TAP: frames the pod sent
    /// that the switch never read, because the TAP's queue was full (the switch fell behind,
    /// or was stopped), or, in the moment before the kernel takes the TAP's carrier down, no
    /// process held it (a restart of the switch; after that the kernel drops the pod's frames
    /// in its qdisc without counting them here).
    pub fn tx_dropped(&self) -> io::Result<u64> {
        use rtnetlink::packet_core::{
            NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST,
        };
        use rtnetlink::packet_route::link::LinkMessage;
        use rtnetlink::packet_route::RouteNetlinkMessage;

        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let LinkConn { sock, seq, buf } = &mut *conn;
        *seq = seq.wrapping_add(1);
        let seq = *seq;
        let mut link = LinkMessage::default();
        link.header.index = self.index;
        let mut req = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::from(RouteNetlinkMessage::GetLink(link)),
        );
        req.header.flags = NLM_F_REQUEST;
        req.header.sequence_number = seq;
        req.finalize();
        let mut out = vec![0u8; req.header.length as usize];
        req.serialize(&mut out);
        sock.send(&out, 0)?;
        // Skip late replies to earlier requests that timed out, by their header's sequence
        // number (bytes 8..12, host order) before parsing anything else.
        for _ in 0..8 {
            let n = sock.recv(&mut &mut buf[..], 0)?;
            let reply = &buf[..n];
            if reply
                .get(8..12)
                .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                != Some(seq)
            {
                continue;
            }
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(reply)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            return match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => m
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        LinkAttribute::Stats64(s) => Some(s.tx_dropped),
                        _ => None,
                    })
                    .ok_or_else(|| io::Error::other("the link has no 64-bit statistics")),
                NetlinkPayload::Error(e) => Err(io::Error::other(format!("netlink: {e}"))),
                _ => Err(io::Error::other("unexpected netlink reply")),
            };
        }
        Err(io::Error::other("no netlink reply to this request"))
    }
}
