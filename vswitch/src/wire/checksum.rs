//! The Internet checksum (RFC 1071) and its incremental update (RFC 1624).
//!
//! Sums are carried as a `u32` that is kept folded to at most 16 significant bits, so callers can
//! add a handful of partial sums (pseudo header + header + payload) with plain `+` and fold once
//! at the end. The bulk sum reads eight bytes at a time into a 64-bit accumulator: on a 64 KB
//! super-frame this is the difference between a checksum that shows up in a profile and one that
//! does not, and one's-complement addition is associative over any word size as long as the
//! carries are folded back in (RFC 1071 §2).
//!
//! NAT and TTL rewriting must not re-sum the packet: `update_u16`/`update_u32` implement
//! RFC 1624 equation 3, `HC' = ~(~HC + ~m + m')`, which, unlike equation 2, never produces the
//! `0x0000`/`0xFFFF` confusion. One caveat stays with the caller: a UDP-over-IPv4 checksum of
//! zero means "no checksum" and must be left at zero rather than updated.

use std::net::{Ipv4Addr, Ipv6Addr};

/// One's-complement sum of `data` taken as big-endian 16-bit words; an odd trailing byte is
/// padded with zero. The result is folded to at most `0xFFFF`, not complemented.
///
/// Partial sums of several pieces can be added together only if every piece but the last has
/// an even length (otherwise the byte pairing shifts).
pub fn sum(data: &[u8]) -> u32 {
    // One's-complement sums do not depend on byte order (RFC 1071 §2(B)): add native-endian
    // words, then swap the folded result once. Four accumulators let the CPU overlap the adds;
    // each takes 33 bits per step, so they cannot overflow below 2^31 steps (64 GB).
    let (blocks, rest) = data.as_chunks::<32>();
    let mut acc = [0u64; 4];
    for b in blocks {
        let (words, _) = b.as_chunks::<8>();
        for (a, w) in acc.iter_mut().zip(words) {
            let v = u64::from_ne_bytes(*w);
            *a += (v >> 32) + (v & 0xFFFF_FFFF);
        }
    }
    let mut total: u64 = acc.iter().map(|&a| fold64(a) as u64).sum();
    let (words, rest) = rest.as_chunks::<8>();
    for w in words {
        let v = u64::from_ne_bytes(*w);
        total += (v >> 32) + (v & 0xFFFF_FFFF);
    }
    let (pairs, rest) = rest.as_chunks::<2>();
    for p in pairs {
        total += u64::from(u16::from_ne_bytes(*p));
    }
    if let [last] = rest {
        // An odd byte is the high byte of a zero-padded big-endian word.
        total += u64::from(u16::from_ne_bytes([*last, 0]));
    }
    u32::from(u16::from_be(fold64(total)))
}

/// Folds the carries of a one's-complement sum back into 16 bits (not complemented).
#[inline]
pub fn fold(mut sum: u32) -> u16 {
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    sum as u16
}

#[inline]
fn fold64(mut sum: u64) -> u16 {
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    sum as u16
}

/// Adds several partial sums and folds the result (not complemented).
pub fn combine(sums: &[u32]) -> u16 {
    fold64(sums.iter().map(|&s| u64::from(s)).sum())
}

/// The value to store in a checksum field, given the sum over everything it covers with the
/// field itself counted as zero.
#[inline]
pub fn finish(sum: u32) -> u16 {
    !fold(sum)
}

/// Sum of the IPv4 pseudo header used by TCP and UDP (RFC 793 §3.1, RFC 768). `len` is the
/// length of the transport header plus payload.
pub fn pseudo_header_v4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: u16) -> u32 {
    let s = src.octets();
    let d = dst.octets();
    let words = [
        u16::from_be_bytes([s[0], s[1]]),
        u16::from_be_bytes([s[2], s[3]]),
        u16::from_be_bytes([d[0], d[1]]),
        u16::from_be_bytes([d[2], d[3]]),
        u16::from(proto),
        len,
    ];
    u32::from(fold(words.iter().map(|&w| u32::from(w)).sum()))
}

/// Sum of the IPv6 pseudo header (RFC 8200 §8.1). `len` is the upper-layer packet length.
pub fn pseudo_header_v6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, len: u32) -> u32 {
    let acc = u64::from(sum(&src.octets()))
        + u64::from(sum(&dst.octets()))
        + u64::from(len >> 16)
        + u64::from(len & 0xFFFF)
        + u64::from(next_header);
    u32::from(fold64(acc))
}

/// What an L4 emitter (`UdpRepr::emit`, `TcpRepr::emit`) does with the checksum field: sum
/// it over this pseudo header, or leave it zero (UDP over IPv4 only: "no checksum").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4Checksum {
    None,
    V4(Ipv4Addr, Ipv4Addr),
    V6(Ipv6Addr, Ipv6Addr),
}

/// New checksum after one 16-bit word covered by `old_csum` changed from `old_word` to
/// `new_word` (RFC 1624 eqn. 3).
#[inline]
pub fn update_u16(old_csum: u16, old_word: u16, new_word: u16) -> u16 {
    let acc = u32::from(!old_csum) + u32::from(!old_word) + u32::from(new_word);
    !fold(acc)
}

/// New checksum after an aligned 32-bit value (an IPv4 address, a TCP sequence number) covered
/// by `old_csum` changed from `old` to `new`.
#[inline]
pub fn update_u32(old_csum: u16, old: u32, new: u32) -> u16 {
    let acc = u32::from(!old_csum)
        + u32::from(!((old >> 16) as u16))
        + u32::from(!(old as u16))
        + (new >> 16)
        + (new & 0xFFFF);
    !fold(acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Word-at-a-time reference, written the obvious way.
    fn naive_sum(data: &[u8]) -> u16 {
        let mut acc: u64 = 0;
        for pair in data.chunks(2) {
            let hi = u64::from(pair[0]) << 8;
            let lo = pair.get(1).copied().map_or(0, u64::from);
            acc += hi | lo;
        }
        fold64(acc)
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to 0x2ddf0, folded 0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(sum(&data), 0xddf2);
        assert_eq!(finish(sum(&data)), !0xddf2);
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(sum(&[0xab]), 0xab00);
        assert_eq!(sum(&[0x12, 0x34, 0x56]), 0x1234 + 0x5600);
        assert_eq!(sum(&[]), 0);
    }

    #[test]
    fn fold_carries_repeatedly() {
        assert_eq!(fold(0x1_FFFF), 0x0001);
        assert_eq!(fold(0xFFFF_FFFF), 0xFFFF);
        assert_eq!(combine(&[0xFFFF, 0x0001]), 0x0001);
    }

    #[test]
    fn pseudo_header_v4_matches_bytes() {
        let src = Ipv4Addr::new(10, 244, 1, 5);
        let dst = Ipv4Addr::new(10, 96, 0, 10);
        let bytes = [10, 244, 1, 5, 10, 96, 0, 10, 0, 17, 0, 40];
        assert_eq!(pseudo_header_v4(src, dst, 17, 40), sum(&bytes));
    }

    #[test]
    fn rfc1624_example() {
        // RFC 1624 §4: HC = 0xdd2f, m = 0x5555 -> m' = 0x3285 gives HC' = 0x0000.
        assert_eq!(update_u16(0xdd2f, 0x5555, 0x3285), 0x0000);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn sum_matches_naive(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            prop_assert_eq!(sum(&data), u32::from(naive_sum(&data)));
        }

        #[test]
        fn pseudo_v6_matches_bytes(src in any::<[u8; 16]>(), dst in any::<[u8; 16]>(),
                                   nh in any::<u8>(), len in any::<u32>()) {
            let mut bytes = Vec::new();
            bytes.extend_from_slice(&src);
            bytes.extend_from_slice(&dst);
            bytes.extend_from_slice(&len.to_be_bytes());
            bytes.extend_from_slice(&[0, 0, 0, nh]);
            prop_assert_eq!(
                pseudo_header_v6(Ipv6Addr::from(src), Ipv6Addr::from(dst), nh, len),
                sum(&bytes)
            );
        }

        /// An incremental update must verify exactly like a recomputed checksum.
        #[test]
        fn update_u16_agrees_with_recompute(
            mut words in proptest::collection::vec(any::<u16>(), 2..40),
            idx in any::<prop::sample::Index>(),
            new_word in any::<u16>(),
        ) {
            // Word 0 is nonzero, as a real header's version field is, so the sum never is 0.
            words[0] |= 0x4000;
            let i = idx.index(words.len() - 1) + 1;
            let bytes = |w: &[u16]| w.iter().flat_map(|x| x.to_be_bytes()).collect::<Vec<u8>>();
            let before = finish(sum(&bytes(&words)));
            let old = words[i];
            words[i] = new_word;
            let after = finish(sum(&bytes(&words)));
            prop_assert_eq!(update_u16(before, old, new_word), after);
        }

        #[test]
        fn update_u32_agrees_with_recompute(
            mut words in proptest::collection::vec(any::<u32>(), 2..20),
            idx in any::<prop::sample::Index>(),
            new in any::<u32>(),
        ) {
            words[0] |= 0x4000_0000;
            let i = idx.index(words.len() - 1) + 1;
            let bytes = |w: &[u32]| w.iter().flat_map(|x| x.to_be_bytes()).collect::<Vec<u8>>();
            let before = finish(sum(&bytes(&words)));
            let old = words[i];
            words[i] = new;
            let after = finish(sum(&bytes(&words)));
            prop_assert_eq!(update_u32(before, old, new), after);
        }
    }
}
