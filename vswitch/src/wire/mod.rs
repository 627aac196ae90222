//! Zero-copy packet views.
//!
//! Every header type here is a thin wrapper around a caller-owned buffer (`T: AsRef<[u8]>`), in
//! the style of smoltcp's wire module: the switch reads and rewrites frames in place, so a view
//! must cost nothing to build and must never copy or allocate. `new_checked` is the single place
//! where lengths are validated; once it has returned `Ok`, every getter is in bounds for any byte
//! content, so the fast path needs no further checks and a hostile pod cannot make the switch
//! panic. Lengths that come from the packet itself (IPv4 total length, UDP length, ...) are also
//! clamped to the buffer inside the payload accessors, so even a setter that writes a nonsensical
//! length cannot turn a later read into a panic.
//!
//! Checksums are kept separate (`checksum`) because NAT and TTL rewriting update them
//! incrementally (RFC 1624) instead of summing whole 64 KB super-frames again.

pub mod arp;
pub mod checksum;
pub mod ethernet;
pub mod icmpv4;
pub mod ipv4;
pub mod ipv6;
pub mod tcp;
pub mod udp;
pub mod virtio;

#[cfg(test)]
mod testdata;

pub use arp::{ArpOperation, ArpPacket, ArpRepr};
pub use ethernet::{EtherType, EthernetAddress, EthernetFrame, ParseEthernetAddressError};
pub use icmpv4::{Icmpv4Message, Icmpv4Packet};
pub use ipv4::{IpProtocol, Ipv4Packet};
pub use ipv6::Ipv6Packet;
pub use tcp::{TcpFlags, TcpPacket};
pub use udp::UdpPacket;
pub use virtio::VirtioNetHdr;

/// Why a buffer could not be viewed as a packet. Each variant maps to one drop reason, so a
/// counter can tell "short frames" (a broken sender or a truncated capture) from "garbage in a
/// header" and from "valid, but a variant this switch does not implement".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum WireError {
    /// The buffer ends before the header, or before the length the header claims.
    #[error("packet truncated: the buffer is shorter than the header or its length field")]
    Truncated,
    /// A header field holds a value the protocol does not allow (bad version, a length smaller
    /// than the header itself, an offset pointing outside the frame).
    #[error("malformed packet: a header field has a value the protocol does not allow")]
    Malformed,
    /// The packet is well formed but uses a variant this switch does not handle (for example
    /// ARP for a hardware type other than Ethernet).
    #[error("unsupported packet: valid, but a protocol variant this switch does not handle")]
    Unsupported,
}

/// Result of parsing a packet view.
pub type Result<T> = core::result::Result<T, WireError>;

/// A fixed byte range of a header.
pub(crate) type Field = core::ops::Range<usize>;

/// Reads a big-endian `u16` from the first two bytes of `b`.
#[inline]
pub(crate) fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// Reads a big-endian `u32` from the first four bytes of `b`.
#[inline]
pub(crate) fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Writes `v` big-endian into the first two bytes of `b`.
#[inline]
pub(crate) fn put_be16(b: &mut [u8], v: u16) {
    b[..2].copy_from_slice(&v.to_be_bytes());
}

/// Writes `v` big-endian into the first four bytes of `b`.
#[inline]
pub(crate) fn put_be32(b: &mut [u8], v: u32) {
    b[..4].copy_from_slice(&v.to_be_bytes());
}

/// `data[start..end]` with both ends clamped to the buffer, for payload ranges derived from
/// length fields: it never panics, whatever a setter wrote into the header.
#[inline]
pub(crate) fn clamped(data: &[u8], start: usize, end: usize) -> &[u8] {
    let end = end.min(data.len());
    let start = start.min(end);
    &data[start..end]
}

/// Mutable twin of [`clamped`].
#[inline]
pub(crate) fn clamped_mut(data: &mut [u8], start: usize, end: usize) -> &mut [u8] {
    let end = end.min(data.len());
    let start = start.min(end);
    &mut data[start..end]
}
