//! DNS messages at the byte level: the small part of RFC 1035 and RFC 6891 the switch needs.
//!
//! The resolver reads exactly one kind of message, a query, and writes a few shapes of answer,
//! so it does not build a general message tree (as a full DNS library does, one `Vec` per
//! section and per name). A query is read in place: its name is lowercased into a stack buffer
//! for lookups, and the question is echoed byte for byte so the client's letter case (0x20
//! randomisation) survives. A response is written straight into the caller's buffer with a
//! limit; running into the limit is an ordinary `Err(Full)` the caller turns into TC=1, never a
//! panic. The same reader walks upstream responses for the forwarder's cache (TTL offsets, SOA
//! minimum) without parsing record data it only passes through.

use std::ops::Range;

pub(crate) const HEADER_LEN: usize = 12;
/// Longest name on the wire, length bytes and the root label included (RFC 1035 §3.1).
pub(crate) const MAX_NAME_LEN: usize = 255;
const MAX_LABEL_LEN: usize = 63;
/// A name of at most 255 bytes has at most 127 labels besides the root.
const MAX_LABELS: usize = 127;
/// The UDP payload limit without EDNS0 (RFC 1035 §4.2.1).
pub(crate) const PLAIN_UDP_LIMIT: usize = 512;
/// What the switch advertises in its own OPT record: the DNS flag day 2020 size, which fits
/// every path MTU in a cluster without IP fragmentation.
pub(crate) const OWN_UDP_SIZE: u16 = 1232;
/// Wire size of an OPT record without options: root name, type, class, TTL, RDLENGTH.
pub(crate) const OPT_LEN: usize = 11;

pub(crate) mod flags {
    pub const QR: u16 = 0x8000;
    pub const OPCODE_MASK: u16 = 0x7800;
    pub const AA: u16 = 0x0400;
    pub const TC: u16 = 0x0200;
    pub const RD: u16 = 0x0100;
    pub const RA: u16 = 0x0080;
    pub const CD: u16 = 0x0010;
    pub const RCODE_MASK: u16 = 0x000f;
}

/// Record types the resolver knows by name; anything else is passed through as a number.
pub(crate) mod rtype {
    pub const A: u16 = 1;
    pub const SOA: u16 = 6;
    pub const PTR: u16 = 12;
    pub const TXT: u16 = 16;
    pub const AAAA: u16 = 28;
    pub const SRV: u16 = 33;
    pub const OPT: u16 = 41;
    pub const IXFR: u16 = 251;
    pub const AXFR: u16 = 252;
    pub const ANY: u16 = 255;
}

pub(crate) mod class {
    pub const IN: u16 = 1;
    pub const ANY: u16 = 255;
}

pub(crate) mod rcode {
    pub const NOERROR: u8 = 0;
    pub const FORMERR: u8 = 1;
    pub const SERVFAIL: u8 = 2;
    pub const NXDOMAIN: u8 = 3;
    pub const NOTIMP: u8 = 4;
    pub const REFUSED: u8 = 5;
    /// Extended RCODE 16 (RFC 6891 §9): upper 8 bits go in the OPT TTL, lower 4 in the header.
    pub const BADVERS: u16 = 16;
}

pub(crate) fn be16(msg: &[u8], at: usize) -> Option<u16> {
    let b = msg.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([b[0], b[1]]))
}

pub(crate) fn be32(msg: &[u8], at: usize) -> Option<u32> {
    let b = msg.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// A question name, lowercased, in wire form, with where each label starts.
///
/// Label offsets are relative to the start of the name; because a question name is never
/// compressed, they are also the offsets inside the echoed question, which is what lets answers
/// and the SOA owner be written as compression pointers into it.
#[derive(Clone)]
pub(crate) struct QName {
    wire: [u8; MAX_NAME_LEN],
    len: u8,
    starts: [u8; MAX_LABELS],
    labels: u8,
}

impl std::fmt::Debug for QName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QName({})", display_name(self.wire()))
    }
}

impl QName {
    /// Reads an uncompressed name at `at`; returns it and the offset just after it.
    pub(crate) fn read(msg: &[u8], mut at: usize) -> Result<(QName, usize), Malformed> {
        let mut name = QName {
            wire: [0; MAX_NAME_LEN],
            len: 0,
            starts: [0; MAX_LABELS],
            labels: 0,
        };
        let mut len = 0usize;
        loop {
            let n = usize::from(*msg.get(at).ok_or(Malformed)?);
            if n == 0 {
                if len >= MAX_NAME_LEN {
                    return Err(Malformed);
                }
                name.wire[len] = 0;
                name.len = (len + 1) as u8;
                return Ok((name, at + 1));
            }
            // Compression pointers (0xC0) in a question have nothing earlier to point at that
            // is a name; 0x40 and 0x80 are the obsolete extended label types.
            if n > MAX_LABEL_LEN {
                return Err(Malformed);
            }
            let label = msg.get(at + 1..at + 1 + n).ok_or(Malformed)?;
            // Room for this label and the root byte after it.
            if len + 1 + n + 1 > MAX_NAME_LEN || usize::from(name.labels) >= MAX_LABELS {
                return Err(Malformed);
            }
            name.starts[usize::from(name.labels)] = len as u8;
            name.labels += 1;
            name.wire[len] = n as u8;
            for (dst, src) in name.wire[len + 1..len + 1 + n].iter_mut().zip(label) {
                *dst = src.to_ascii_lowercase();
            }
            len += 1 + n;
            at += 1 + n;
        }
    }

    /// The lowercase wire form, root byte included.
    pub(crate) fn wire(&self) -> &[u8] {
        &self.wire[..usize::from(self.len)]
    }

    pub(crate) fn label_count(&self) -> usize {
        usize::from(self.labels)
    }

    /// Label `i` counted from the left, without its length byte.
    pub(crate) fn label(&self, i: usize) -> &[u8] {
        if i >= self.label_count() {
            return &[];
        }
        let start = usize::from(self.starts[i]);
        let n = usize::from(self.wire[start]);
        &self.wire[start + 1..start + 1 + n]
    }

    /// Offset of label `i` inside the name (the name's length when `i` is past the last label,
    /// which is where the root byte sits).
    pub(crate) fn offset(&self, i: usize) -> usize {
        if i >= self.label_count() {
            usize::from(self.len) - 1
        } else {
            usize::from(self.starts[i])
        }
    }

    /// The wire form of the name from label `i` on.
    pub(crate) fn suffix(&self, i: usize) -> &[u8] {
        &self.wire()[self.offset(i)..]
    }

    /// If the name is `zone` or below it, the index of the label where `zone` begins.
    pub(crate) fn find_suffix(&self, zone: &[u8]) -> Option<usize> {
        (0..=self.label_count()).find(|&i| self.suffix(i) == zone)
    }
}

/// The EDNS0 parameters of a query (RFC 6891).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Edns {
    pub udp_size: u16,
    pub version: u8,
    pub dnssec_ok: bool,
}

/// A query as read from the wire.
#[derive(Debug, Clone)]
pub(crate) struct Query<'a> {
    pub id: u16,
    pub flags: u16,
    pub qname: QName,
    /// The question exactly as the client sent it: name, type, class.
    pub question: &'a [u8],
    pub qtype: u16,
    pub qclass: u16,
    pub edns: Option<Edns>,
}

impl Query<'_> {
    pub(crate) fn opcode(&self) -> u16 {
        (self.flags & flags::OPCODE_MASK) >> 11
    }
}

/// Something in a message does not add up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Malformed;

/// Why a query cannot be answered normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueryError {
    /// Too short for a header, or a response rather than a query: nothing to reply to.
    Unreadable,
    /// The header is readable but the rest is not: reply FORMERR with this ID and flags.
    Format { id: u16, flags: u16 },
}

/// Reads a query: a header, exactly one question, and an OPT record if there is one.
pub(crate) fn parse_query(msg: &[u8]) -> Result<Query<'_>, QueryError> {
    let (Some(id), Some(fl)) = (be16(msg, 0), be16(msg, 2)) else {
        return Err(QueryError::Unreadable);
    };
    if msg.len() < HEADER_LEN || fl & flags::QR != 0 {
        return Err(QueryError::Unreadable);
    }
    let format = QueryError::Format { id, flags: fl };
    let count = |at| be16(msg, at).unwrap_or(0);
    let (qd, an, ns, ar) = (count(4), count(6), count(8), count(10));
    if qd != 1 {
        return Err(format);
    }
    let (qname, after_name) = QName::read(msg, HEADER_LEN).map_err(|_| format)?;
    let (Some(qtype), Some(qclass)) = (be16(msg, after_name), be16(msg, after_name + 2)) else {
        return Err(format);
    };
    let question = &msg[HEADER_LEN..after_name + 4];
    let mut at = after_name + 4;
    // Queries carry no answer or authority records, but a few tools send them; skip, don't fail.
    for _ in 0..u32::from(an) + u32::from(ns) {
        at = skip_record(msg, at).map_err(|_| format)?.end;
    }
    let mut edns = None;
    for _ in 0..ar {
        let rr = skip_record(msg, at).map_err(|_| format)?;
        at = rr.end;
        if rr.rtype == rtype::OPT {
            // RFC 6891 §6.1.1: a second OPT, or one not owned by the root, is a format error.
            if edns.is_some() || rr.owner_is_root.is_none_or(|root| !root) {
                return Err(format);
            }
            edns = Some(Edns {
                udp_size: rr.class,
                version: (rr.ttl >> 16) as u8,
                dnssec_ok: rr.ttl & 0x8000 != 0,
            });
        }
    }
    Ok(Query {
        id,
        flags: fl,
        qname,
        question,
        qtype,
        qclass,
        edns,
    })
}

/// One resource record found while walking a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RecordInfo {
    /// Whether the owner name is the root; `None` when it is compressed (unknown without
    /// following the pointer, which the walker has no need to do).
    pub owner_is_root: Option<bool>,
    pub rtype: u16,
    pub class: u16,
    pub ttl: u32,
    pub ttl_at: usize,
    pub rdata: Range<usize>,
    pub end: usize,
}

/// Skips a possibly compressed name; returns the offset after it and whether it was the root.
fn skip_name(msg: &[u8], mut at: usize) -> Result<(usize, Option<bool>), Malformed> {
    let mut first = true;
    loop {
        let n = *msg.get(at).ok_or(Malformed)?;
        match n {
            0 => return Ok((at + 1, Some(first))),
            n if n & 0xc0 == 0xc0 => {
                msg.get(at + 1).ok_or(Malformed)?;
                return Ok((at + 2, if first { None } else { Some(false) }));
            }
            n if n & 0xc0 != 0 => return Err(Malformed),
            n => {
                at += 1 + usize::from(n);
                first = false;
            }
        }
    }
}

/// Reads the fixed part of the record at `at` and skips its data.
pub(crate) fn skip_record(msg: &[u8], at: usize) -> Result<RecordInfo, Malformed> {
    let (at, owner_is_root) = skip_name(msg, at)?;
    let rtype = be16(msg, at).ok_or(Malformed)?;
    let class = be16(msg, at + 2).ok_or(Malformed)?;
    let ttl = be32(msg, at + 4).ok_or(Malformed)?;
    let rdlen = usize::from(be16(msg, at + 8).ok_or(Malformed)?);
    let start = at + 10;
    let end = start + rdlen;
    if end > msg.len() {
        return Err(Malformed);
    }
    Ok(RecordInfo {
        owner_is_root,
        rtype,
        class,
        ttl,
        ttl_at: at + 4,
        rdata: start..end,
        end,
    })
}

/// The header and every record of a response, for the forwarder's cache.
#[derive(Debug, Clone)]
pub(crate) struct ResponseInfo {
    pub flags: u16,
    pub answers: u16,
    /// Records in the answer, authority and additional sections, in order, with the section
    /// they are in (1, 2, 3).
    pub records: Vec<(u8, RecordInfo)>,
}

impl ResponseInfo {
    pub(crate) fn rcode(&self) -> u8 {
        (self.flags & flags::RCODE_MASK) as u8
    }
}

/// Walks a whole response without interpreting record data.
pub(crate) fn walk_response(msg: &[u8]) -> Result<ResponseInfo, Malformed> {
    let fl = be16(msg, 2).ok_or(Malformed)?;
    if msg.len() < HEADER_LEN {
        return Err(Malformed);
    }
    let count = |at| be16(msg, at).unwrap_or(0);
    let (qd, an, ns, ar) = (count(4), count(6), count(8), count(10));
    let mut at = HEADER_LEN;
    for _ in 0..qd {
        at = skip_name(msg, at)?.0 + 4;
        if at > msg.len() {
            return Err(Malformed);
        }
    }
    let mut records = Vec::with_capacity(usize::from(an) + usize::from(ns) + usize::from(ar));
    for (section, n) in [(1u8, an), (2, ns), (3, ar)] {
        for _ in 0..n {
            let rr = skip_record(msg, at)?;
            at = rr.end;
            records.push((section, rr));
        }
    }
    Ok(ResponseInfo {
        flags: fl,
        answers: an,
        records,
    })
}

/// Reads the question of a response: its name (lowercased), type and class, if it has one.
pub(crate) fn response_question(msg: &[u8]) -> Result<Option<(QName, u16, u16)>, Malformed> {
    match be16(msg, 4).ok_or(Malformed)? {
        0 => Ok(None),
        1 => {
            let (name, at) = QName::read(msg, HEADER_LEN)?;
            let t = be16(msg, at).ok_or(Malformed)?;
            let c = be16(msg, at + 2).ok_or(Malformed)?;
            Ok(Some((name, t, c)))
        }
        _ => Err(Malformed),
    }
}

/// The writer ran into its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Full;

/// Appends to a caller-owned buffer, never past `limit`.
pub(crate) struct Writer<'a> {
    buf: &'a mut [u8],
    len: usize,
    limit: usize,
}

impl<'a> Writer<'a> {
    pub(crate) fn new(buf: &'a mut [u8], limit: usize) -> Writer<'a> {
        let limit = limit.min(buf.len());
        Writer { buf, len: 0, limit }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Lowers (never raises past the buffer) the limit.
    pub(crate) fn set_limit(&mut self, limit: usize) {
        self.limit = limit.min(self.buf.len());
    }

    /// Drops everything written after `len`.
    pub(crate) fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub(crate) fn put(&mut self, bytes: &[u8]) -> Result<(), Full> {
        let end = self.len.checked_add(bytes.len()).ok_or(Full)?;
        if end > self.limit {
            return Err(Full);
        }
        self.buf[self.len..end].copy_from_slice(bytes);
        self.len = end;
        Ok(())
    }

    pub(crate) fn put_u16(&mut self, v: u16) -> Result<(), Full> {
        self.put(&v.to_be_bytes())
    }

    pub(crate) fn put_u32(&mut self, v: u32) -> Result<(), Full> {
        self.put(&v.to_be_bytes())
    }

    /// Overwrites two bytes already written.
    pub(crate) fn patch_u16(&mut self, at: usize, v: u16) {
        if at + 2 <= self.len {
            self.buf[at..at + 2].copy_from_slice(&v.to_be_bytes());
        }
    }

    /// A compression pointer to an earlier offset (RFC 1035 §4.1.4).
    pub(crate) fn put_pointer(&mut self, to: usize) -> Result<(), Full> {
        debug_assert!(to < 0x4000);
        self.put_u16(0xc000 | (to as u16 & 0x3fff))
    }

    /// Starts a record: owner (already written by the caller), type, class, TTL, and a
    /// placeholder RDLENGTH; returns where the data begins for [`Writer::end_rdata`].
    pub(crate) fn record_head(&mut self, rtype: u16, class: u16, ttl: u32) -> Result<usize, Full> {
        self.put_u16(rtype)?;
        self.put_u16(class)?;
        self.put_u32(ttl)?;
        self.put_u16(0)?;
        Ok(self.len)
    }

    pub(crate) fn end_rdata(&mut self, start: usize) {
        let n = self.len - start;
        self.patch_u16(start - 2, n as u16);
    }
}

/// Presentation form of a wire name, for messages and tests.
pub(crate) fn display_name(wire: &[u8]) -> String {
    let mut out = String::new();
    let mut at = 0;
    while let Some(&n) = wire.get(at) {
        if n == 0 || n & 0xc0 != 0 {
            break;
        }
        let label = wire.get(at + 1..at + 1 + usize::from(n)).unwrap_or(&[]);
        out.push_str(&String::from_utf8_lossy(label));
        out.push('.');
        at += 1 + usize::from(n);
    }
    if out.is_empty() {
        out.push('.');
    }
    out
}

/// Wire form of a dotted name; `None` for an empty label or one or a name too long. The
/// result is lowercased and ends with the root byte.
pub(crate) fn wire_name(dotted: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(dotted.len() + 2);
    let trimmed = dotted.strip_suffix('.').unwrap_or(dotted);
    if !trimmed.is_empty() {
        for label in trimmed.split('.') {
            push_label(&mut out, label.as_bytes())?;
        }
    }
    out.push(0);
    (out.len() <= MAX_NAME_LEN).then_some(out)
}

/// Appends one lowercased label; `None` if it is empty or too long.
pub(crate) fn push_label(out: &mut Vec<u8>, label: &[u8]) -> Option<()> {
    if label.is_empty() || label.len() > MAX_LABEL_LEN {
        return None;
    }
    out.push(label.len() as u8);
    out.extend(label.iter().map(u8::to_ascii_lowercase));
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qname_lowercases_and_indexes_labels() {
        let msg = b"\x03WwW\x07Example\x03com\x00rest";
        let (name, end) = QName::read(msg, 0).unwrap();
        assert_eq!(end, 17);
        assert_eq!(name.wire(), b"\x03www\x07example\x03com\x00");
        assert_eq!(name.label_count(), 3);
        assert_eq!(name.label(1), b"example");
        assert_eq!(name.label(7), b"");
        assert_eq!(name.suffix(2), b"\x03com\x00");
        assert_eq!(name.suffix(3), b"\x00");
        assert_eq!(name.find_suffix(b"\x07example\x03com\x00"), Some(1));
        assert_eq!(name.find_suffix(b"\x03com\x00"), Some(2));
        assert_eq!(name.find_suffix(b"\x00"), Some(3));
        assert_eq!(name.find_suffix(b"\x02om\x00"), None);
    }

    #[test]
    fn qname_rejects_pointers_and_overlong_names() {
        assert_eq!(QName::read(b"\xc0\x0c", 0).unwrap_err(), Malformed);
        assert_eq!(QName::read(b"\x03ab", 0).unwrap_err(), Malformed);
        let mut long = Vec::new();
        for _ in 0..5 {
            long.push(63);
            long.extend([b'a'; 63]);
        }
        long.push(0);
        assert_eq!(QName::read(&long, 0).unwrap_err(), Malformed);
        // 254 bytes of labels plus the root is the longest legal name.
        let mut max = Vec::new();
        for _ in 0..3 {
            max.push(63);
            max.extend([b'a'; 63]);
        }
        max.push(61);
        max.extend([b'b'; 61]);
        max.push(0);
        assert_eq!(max.len(), 255);
        assert!(QName::read(&max, 0).is_ok());
    }

    #[test]
    fn wire_name_round_trips_through_display() {
        let w = wire_name("Kubernetes.default.svc.cluster.local.").unwrap();
        assert_eq!(display_name(&w), "kubernetes.default.svc.cluster.local.");
        assert_eq!(wire_name("").unwrap(), vec![0]);
        assert!(wire_name("a..b").is_none());
    }

    #[test]
    fn writer_stops_at_its_limit() {
        let mut buf = [0u8; 8];
        let mut w = Writer::new(&mut buf, 6);
        w.put_u32(1).unwrap();
        assert_eq!(w.put_u32(2), Err(Full));
        w.put_u16(3).unwrap();
        assert_eq!(w.len(), 6);
        w.truncate(2);
        w.set_limit(100);
        assert_eq!(w.limit(), 8);
    }
}
