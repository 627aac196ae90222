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
//!
//! Headers the switch writes itself (ARP and ICMP replies, a TCP RST, a DNS answer, the outer
//! headers of a captured VXLAN datagram) are written by the `XxxRepr` types: `parse` reads a
//! view into plain fields, `emit` writes every header byte into a view over a buffer the caller
//! sized with `header_len`/`buffer_len`. An emitter is a fixed sequence of stores, no loop and
//! no allocation, so it costs what writing the fields by hand did. IPv6 follows the same shape.

/// A protocol number as a newtype rather than an enum, so that unknown values pass through (and
/// can be counted) without a lossy `Unknown` arm, with its known values as constants.
macro_rules! protocol_number {
    ($(#[$attr:meta])* $name:ident($int:ty) { $($known:ident = $value:expr),* $(,)? }) => {
        $(#[$attr])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub $int);

        impl $name {
            $(pub const $known: $name = $name($value);)*
        }
    };
}

/// The part every view shares: the struct around the buffer, the two constructors,
/// `into_inner` and `AsRef`. Each view writes its own `check_len`, the one place where its
/// lengths are proved.
macro_rules! view {
    ($(#[$attr:meta])* $name:ident) => {
        $(#[$attr])*
        #[derive(Debug, Clone)]
        pub struct $name<T: AsRef<[u8]>> {
            buffer: T,
        }

        impl<T: AsRef<[u8]>> $name<T> {
            /// Wraps a buffer without checking it; accessors may panic if it is too short for
            /// them. For a buffer the caller sized itself, as an emitter's output.
            pub const fn new_unchecked(buffer: T) -> $name<T> {
                $name { buffer }
            }

            /// Wraps a buffer after `check_len` has proved every accessor in bounds.
            pub fn new_checked(buffer: T) -> $crate::wire::Result<$name<T>> {
                let packet = Self::new_unchecked(buffer);
                packet.check_len()?;
                Ok(packet)
            }

            pub fn into_inner(self) -> T {
                self.buffer
            }
        }

        impl<T: AsRef<[u8]>> AsRef<[u8]> for $name<T> {
            fn as_ref(&self) -> &[u8] {
                self.buffer.as_ref()
            }
        }
    };
}

/// A TCP or UDP view: [`view!`] plus what the two share: the length of the fixed header
/// (`$fixed`, a constant named as given) and a `check_len` against the length the header
/// announces (`$announced`), the ports they both start with, the checksum field (at the
/// calling module's `field::CHECKSUM`) and the choice of pseudo header for it.
macro_rules! l4_view {
    ($(#[$attr:meta])* $name:ident, $fixed:ident = $len:expr, $announced:ident) => {
        view! {
            $(#[$attr])*
            $name
        }

        impl<T: AsRef<[u8]>> $name<T> {
            /// Length of the fixed header.
            pub const $fixed: usize = $len;

            /// Ensures every accessor is in bounds: the buffer holds the length the header
            /// announces, which is at least the fixed header.
            pub fn check_len(&self) -> $crate::wire::Result<()> {
                let len = self.buffer.as_ref().len();
                $crate::wire::check_lengths(len, Self::$fixed, || usize::from(self.$announced()))
            }

            pub fn src_port(&self) -> u16 {
                $crate::wire::be16(&self.buffer.as_ref()[$crate::wire::ports::SRC])
            }

            pub fn dst_port(&self) -> u16 {
                $crate::wire::be16(&self.buffer.as_ref()[$crate::wire::ports::DST])
            }

            pub fn checksum(&self) -> u16 {
                $crate::wire::be16(&self.buffer.as_ref()[field::CHECKSUM])
            }
        }

        impl<T: AsRef<[u8]> + AsMut<[u8]>> $name<T> {
            pub fn set_src_port(&mut self, port: u16) {
                $crate::wire::put_be16(&mut self.buffer.as_mut()[$crate::wire::ports::SRC], port);
            }

            pub fn set_dst_port(&mut self, port: u16) {
                $crate::wire::put_be16(&mut self.buffer.as_mut()[$crate::wire::ports::DST], port);
            }

            pub fn set_checksum(&mut self, csum: u16) {
                $crate::wire::put_be16(&mut self.buffer.as_mut()[field::CHECKSUM], csum);
            }

            /// Stores the checksum over this pseudo header (the payload must be in place), or
            /// zero for `L4Checksum::None`.
            pub fn fill_l4_checksum(&mut self, csum: $crate::wire::L4Checksum) {
                match csum {
                    $crate::wire::L4Checksum::None => self.set_checksum(0),
                    $crate::wire::L4Checksum::V4(src, dst) => self.fill_checksum(src, dst),
                    $crate::wire::L4Checksum::V6(src, dst) => self.fill_checksum_v6(src, dst),
                }
            }
        }
    };
}

/// `header_len` and `buffer_len` of a Repr with a fixed header of `$header` bytes and a
/// `payload_len` field: what the caller sizes the buffer for `emit` with.
macro_rules! repr_lengths {
    ($header:expr) => {
        /// Bytes of the header `emit` writes.
        pub const fn header_len(&self) -> usize {
            $header
        }

        /// Header and payload: the length of the buffer `emit` writes into.
        pub const fn buffer_len(&self) -> usize {
            $header + self.payload_len
        }
    };
}

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
pub use checksum::L4Checksum;
pub use ethernet::{
    EtherType, EthernetAddress, EthernetFrame, EthernetRepr, ParseEthernetAddressError,
    HEADER_LEN as ETHERNET_HEADER_LEN,
};
pub use icmpv4::{Icmpv4Message, Icmpv4Packet, Icmpv4Repr};
pub use ipv4::{IpProtocol, Ipv4Packet, Ipv4Repr};
pub use ipv6::{Ipv6Packet, Ipv6Repr};
pub use tcp::{TcpFlags, TcpPacket, TcpRepr};
pub use udp::{UdpPacket, UdpRepr};
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

/// Where TCP and UDP keep their ports: the first four bytes of either header.
pub(crate) mod ports {
    use super::Field;
    pub const SRC: Field = 0..2;
    pub const DST: Field = 2..4;
    pub const BOTH: Field = 0..4;
}

/// The length check of a header with a length field: the fixed part must be in the buffer
/// (`Truncated`), the length the header announces (read by `announced` only once the fixed part
/// is known to be there) must cover the fixed part (`Malformed`), and the buffer must hold it
/// (`Truncated`). A header with no length field announces its fixed length.
pub(crate) fn check_lengths(
    buf_len: usize,
    fixed: usize,
    announced: impl FnOnce() -> usize,
) -> Result<()> {
    if buf_len < fixed {
        return Err(WireError::Truncated);
    }
    let len = announced();
    if len < fixed {
        return Err(WireError::Malformed);
    }
    if buf_len < len {
        return Err(WireError::Truncated);
    }
    Ok(())
}

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
