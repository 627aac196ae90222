//! From a session's queue to a pcapng byte stream.
//!
//! The reader (a blocking thread of the admin API) owns a [`Stream`]: it waits for copies,
//! writes an Interface Description Block the first time a capture point shows up, then the
//! packets in Enhanced Packet Blocks, in chunks of whatever is queued so a live viewer sees
//! packets at once and a busy capture still costs one write per many packets. At the end
//! (a packet count reached, or the reader stops) it writes an Interface Statistics Block per
//! interface; the session's queue drops go on the first one (`isb_osdrop`), since they are
//! counted per session, not per point. Dropping the stream closes the session.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::{now_ns, pcapng, Captured, Hub, Point, Session, Stage};

/// Names a port for its interface (`pod:default/p1`, `host:vsw0`, `port:7`).
pub type PortNamer = Box<dyn Fn(crate::pipeline::PortId) -> String + Send>;

/// Most bytes gathered into one chunk before it is handed on.
const CHUNK_BYTES: usize = 1 << 20;

pub enum Next {
    /// Bytes to send.
    Data(Vec<u8>),
    /// Nothing arrived in the wait.
    Idle,
    /// The last bytes: the count was reached.
    End(Vec<u8>),
}

pub struct Stream {
    hub: Arc<Hub>,
    session: Arc<Session>,
    rx: Receiver<Captured>,
    namer: PortNamer,
    ifaces: HashMap<Point, u32>,
    per_iface: Vec<u64>,
    count: Option<u64>,
    written: u64,
    started_ns: u64,
    done: bool,
}

/// The interface name and description of a capture point.
pub fn interface_name(
    p: &Point,
    namer: &dyn Fn(crate::pipeline::PortId) -> String,
) -> (String, String) {
    let dir = if p.inbound { "in" } else { "out" };
    match p.stage {
        Stage::Port => (
            format!("{}:{dir}", namer(p.port)),
            if p.inbound {
                "frames read from the port's TAP, into the switch".into()
            } else {
                "frames written to the port's TAP, out of the switch".into()
            },
        ),
        Stage::Nat if p.inbound => (
            "nat:before".into(),
            "packets Service translation rewrote, before it".into(),
        ),
        Stage::Nat => (
            "nat:after".into(),
            "packets Service translation rewrote, after it and routing".into(),
        ),
        Stage::OverlayInner => (
            format!("overlay:inner:{dir}"),
            if p.inbound {
                "frames decapsulated from VXLAN".into()
            } else {
                "frames about to be encapsulated in VXLAN".into()
            },
        ),
        Stage::OverlayOuter => (
            format!("overlay:outer:{dir}"),
            "VXLAN datagrams with synthesised Ethernet/IP/UDP headers (zero MACs)".into(),
        ),
        Stage::Policy if p.inbound => (
            "policy:ingress".into(),
            "packets NetworkPolicy denied by the destination pod's ingress".into(),
        ),
        Stage::Policy => (
            "policy:egress".into(),
            "packets NetworkPolicy denied by the source pod's egress".into(),
        ),
        Stage::EgressPod => (
            format!("egress:pod:{dir}"),
            if p.inbound {
                "pods' packets the egress translation engine took".into()
            } else {
                "packets the egress translation engine wrote to pods".into()
            },
        ),
        Stage::EgressNode => (
            format!("egress:node:{dir}"),
            "egress translation's node sockets as the outside sees them, synthesised (zero MACs); \
             TCP is the stream bytes as the socket sees them, one segment per write or read, \
             not the wire's segmentation"
                .into(),
        ),
    }
}

impl Stream {
    /// A stream of `session`'s packets, ending after `count` packets if given. Returns the
    /// stream and its first bytes (the Section Header Block).
    pub fn new(
        hub: Arc<Hub>,
        session: Arc<Session>,
        rx: Receiver<Captured>,
        namer: PortNamer,
        count: Option<u64>,
    ) -> (Stream, Vec<u8>) {
        let mut head = Vec::new();
        pcapng::section_header(&mut head, concat!("vswitchd ", env!("CARGO_PKG_VERSION")));
        let s = Stream {
            hub,
            session,
            rx,
            namer,
            ifaces: HashMap::new(),
            per_iface: Vec::new(),
            count: count.filter(|&c| c > 0),
            written: 0,
            started_ns: now_ns(),
            done: false,
        };
        (s, head)
    }

    pub fn session_id(&self) -> u64 {
        self.session.id
    }

    /// Waits up to `wait` for packets and returns what arrived, as pcapng blocks.
    pub fn next(&mut self, wait: Duration) -> Next {
        if self.done {
            return Next::End(Vec::new());
        }
        let first = match self.rx.recv_timeout(wait) {
            Ok(c) => c,
            Err(RecvTimeoutError::Timeout) => return Next::Idle,
            Err(RecvTimeoutError::Disconnected) => return Next::End(self.finish()),
        };
        let mut out = Vec::with_capacity(first.data.len() + 256);
        self.write(&mut out, first);
        while out.len() < CHUNK_BYTES && !self.reached() {
            match self.rx.try_recv() {
                Ok(c) => self.write(&mut out, c),
                Err(_) => break,
            }
        }
        if self.reached() {
            let tail = self.finish();
            out.extend_from_slice(&tail);
            return Next::End(out);
        }
        Next::Data(out)
    }

    fn reached(&self) -> bool {
        self.count.is_some_and(|c| self.written >= c)
    }

    fn write(&mut self, out: &mut Vec<u8>, c: Captured) {
        let iface = match self.ifaces.get(&c.point) {
            Some(&i) => i,
            None => {
                let i = self.ifaces.len() as u32;
                let (name, descr) = interface_name(&c.point, &*self.namer);
                pcapng::interface(out, &name, &descr, self.session.snaplen as u32);
                self.ifaces.insert(c.point, i);
                self.per_iface.push(0);
                i
            }
        };
        pcapng::packet(
            out,
            iface,
            c.ts_ns,
            &c.data,
            c.orig_len,
            c.point.direction(),
        );
        self.per_iface[iface as usize] += 1;
        self.written += 1;
        self.session.stats.written.fetch_add(1, Relaxed);
    }

    /// Ends the session and returns the statistics blocks.
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        if self.done {
            return out;
        }
        self.done = true;
        self.hub.close(self.session.id);
        let end = now_ns();
        let dropped = self.session.stats.dropped.load(Relaxed);
        for (i, n) in self.per_iface.iter().enumerate() {
            let d = if i == 0 { dropped } else { 0 };
            pcapng::statistics(&mut out, i as u32, self.started_ns, end, *n, d);
        }
        out
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if !self.done {
            self.done = true;
            self.hub.close(self.session.id);
        }
    }
}
