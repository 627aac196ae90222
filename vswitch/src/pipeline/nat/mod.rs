//! Service translation: what kube-proxy does with iptables, done inline.
//!
//! A Service frontend (ClusterIP or external IP, protocol, port) maps to backends. The first
//! packet of a connection picks a backend (consistent hashing by default: rendezvous hashing up
//! to 16 backends, a Maglev table above, so most connections keep their backend when others
//! come and go; or random), is rewritten to it
//! (DNAT), and leaves an entry in the connection tracking table keyed both ways; later packets
//! of either direction find that entry and are rewritten the same way, so replies come back from
//! the ClusterIP. Checksums are patched incrementally, and for checksum-offloaded frames the
//! partial (pseudo-header) sum is patched instead, so a 64 KiB super-frame costs the same as a
//! small packet.
//!
//! A pod that reaches itself through its Service (hairpin) would answer itself directly and
//! never see the translation undone; such connections are also source-translated to the
//! gateway address, as kube-proxy masquerades them.
//!
//! Several datapath workers share one table, because the two directions of a connection may be
//! read by different workers (a client's packets on one TAP queue, the backend's replies on
//! another), yet no lock may sit on the per-packet path. So each worker holds a view: its own
//! index from both keys to the connection, which is one shared allocation whose state and
//! expiry are atomics any worker updates in place. The worker that sees a connection's first
//! packet creates and owns it, and announces it to the other views through a channel before
//! the packet is sent on, so a reply can only be read after the announcement was queued; a view
//! that misses a lookup drains its channel and looks again before concluding there is no
//! connection. Only the owner frees a connection (and announces that), so each index changes
//! only in its own thread; a removal never takes keys that a newer connection has taken over.
//! Expiry is lazy on lookup plus a bounded sweep of each worker's own connections driven by its
//! clock. The group has a hard size, counted together: when full, a connection close to expiry
//! among a small sample is evicted (counted), never unbounded growth.
//!
//! The parts: `services` (the Service table and the backend choice), `vip_index` (the
//! per-packet index of frontends, with a copy of their backends), `conntrack` (the per-worker
//! views of the shared connection table, backend choice and affinity included) and `translate`
//! (what a packet goes through: translation both ways, rewriting, ICMP errors).

mod conntrack;
mod services;
mod translate;
mod vip_index;

pub use conntrack::{Conntrack, CtConfig, CtCounters, CtEntry, CtState, Key};
pub use services::{backends_for, backends_in, Backend, Frontend, ServiceTable};
pub use translate::{
    rewrite, translate, translate_from, translate_icmp_error, untranslate_reply, Nat,
};

type Map<K, V> = hashbrown::HashMap<K, V, foldhash::fast::FixedState>;

#[cfg(test)]
mod tests;
