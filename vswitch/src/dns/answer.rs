//! Answering one query from a [`DnsTable`], without I/O.
//!
//! The pipeline calls this for a UDP datagram to the cluster DNS address and either sends the
//! bytes back, has the datapath hand the query to the [`Forwarder`](super::Forwarder), or
//! drops it. It writes
//! into the caller's buffer and allocates nothing, because it runs on a datapath thread.
//!
//! Answers are authoritative (AA) and reuse the question: every answer's owner is a
//! compression pointer to the question name, and the SOA's owner is a pointer into it at the
//! zone apex, so the reply carries the client's letter case exactly. When the answer does not
//! fit the client's UDP size, the reply has TC=1 and the whole answer records that fit, as
//! CoreDNS's replies do (RFC 2181 §9 leaves it to the client whether to use them); address
//! records for SRV targets are extra, so they are dropped silently when they don't fit
//! instead.

use super::message::{
    class, flags, parse_query, rcode, rtype, Full, Query, QueryError, Writer, HEADER_LEN, OPT_LEN,
    OWN_UDP_SIZE, PLAIN_UDP_LIMIT,
};
use super::table::{DnsTable, Lookup, Record, Zone};

/// What to do with a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The reply is the first `n` bytes of the output buffer.
    Local(usize),
    /// The name is outside the cluster's zones: hand the query to the upstream forwarder.
    Forward,
    /// Not a query, or too short to reply to (or the output buffer is too small for even the
    /// question): drop it and count it.
    Invalid,
}

/// The transport a query came over; it decides the size limit of the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// 512 bytes, or the client's EDNS0 size.
    Udp,
    /// Up to 65535 bytes (the message only, without the two-byte length prefix).
    Tcp,
}

/// SOA timers as CoreDNS sets them; only MINIMUM (the negative TTL) matters to stub resolvers.
const SOA_REFRESH: u32 = 7200;
const SOA_RETRY: u32 = 1800;
const SOA_EXPIRE: u32 = 86400;

/// Answers a query that arrived over UDP. `out` should hold at least 512 bytes; the reply
/// never exceeds `out.len()`.
pub fn answer(table: &DnsTable, query: &[u8], out: &mut [u8]) -> Answer {
    respond(table, query, out, Transport::Udp)
}

/// Answers a query with the size limit of `transport`.
pub fn answer_with(table: &DnsTable, query: &[u8], out: &mut [u8], transport: Transport) -> Answer {
    respond(table, query, out, transport)
}

fn respond(table: &DnsTable, msg: &[u8], out: &mut [u8], transport: Transport) -> Answer {
    let q = match parse_query(msg) {
        Ok(q) => q,
        Err(QueryError::Unreadable) => return Answer::Invalid,
        Err(QueryError::Format { id, flags }) => {
            return header_only(out, id, flags, rcode::FORMERR)
        }
    };
    let zone = table.zone_of(&q.qname, true);
    let apex = match zone {
        Zone::Outside => return Answer::Forward,
        Zone::Cluster { apex } | Zone::Reverse { apex } => apex,
    };
    let Some(mut r) = Reply::begin(out, &q, transport) else {
        return Answer::Invalid;
    };
    if q.opcode() != 0 {
        return r.finish(u16::from(rcode::NOTIMP));
    }
    if let Some(e) = q.edns {
        if e.version > 0 {
            return r.finish(rcode::BADVERS);
        }
    }
    if q.qclass != class::IN && q.qclass != class::ANY {
        return r.finish(u16::from(rcode::REFUSED));
    }
    if q.qtype == rtype::AXFR || q.qtype == rtype::IXFR {
        return r.finish(u16::from(rcode::REFUSED));
    }

    let pod;
    let records: &[Record] = match table.lookup(&q.qname, zone) {
        Lookup::NxDomain => {
            if r.soa(table, apex, 1).is_err() {
                r.truncated();
            }
            return r.finish(u16::from(rcode::NXDOMAIN));
        }
        Lookup::Pod(ip) => {
            pod = [match ip {
                std::net::IpAddr::V4(v4) => Record::A(v4),
                std::net::IpAddr::V6(v6) => Record::Aaaa(v6),
            }];
            &pod
        }
        Lookup::Records(records) => records,
    };

    let wants = |rt: u16| q.qtype == rtype::ANY || q.qtype == rt;
    let ttl = table.ttl();
    let mut fits = !(apex == 0 && wants(rtype::SOA)) || r.soa(table, apex, 0).is_ok();
    for rec in records.iter().filter(|rec| wants(rec.rtype())) {
        if !fits {
            break;
        }
        fits = r.record(Owner::Question, rec, ttl, 0).is_ok();
    }
    if !fits {
        // Keep the whole records that fit, as CoreDNS does: a client that retries over TCP
        // discards them, and one that cannot (musl before 1.2.4) can still use them.
        r.tc = true;
        return r.finish(u16::from(rcode::NOERROR));
    }
    if r.counts[0] == 0 {
        // NODATA: the name exists, not with this type (RFC 2308 §2.2).
        if r.soa(table, apex, 1).is_err() {
            r.truncated();
        }
        return r.finish(u16::from(rcode::NOERROR));
    }
    // Addresses of SRV targets save the client a round trip; optional, so they go while
    // they fit and stop at the first that doesn't.
    'extra: for rec in records.iter().filter(|rec| wants(rec.rtype())) {
        let Record::Srv { target, .. } = rec else {
            continue;
        };
        for addr in table.records(target) {
            if !matches!(addr, Record::A(_) | Record::Aaaa(_)) {
                continue;
            }
            if r.record(Owner::Name(target), addr, ttl, 2).is_err() {
                break 'extra;
            }
        }
    }
    r.finish(u16::from(rcode::NOERROR))
}

/// A reply with no question, for a query whose question could not be read.
fn header_only(out: &mut [u8], id: u16, query_flags: u16, rcode: u8) -> Answer {
    let mut w = Writer::new(out, HEADER_LEN);
    let fl = flags::QR | (query_flags & (flags::OPCODE_MASK | flags::RD)) | u16::from(rcode);
    let head = [id, fl, 0, 0, 0, 0];
    for v in head {
        if w.put_u16(v).is_err() {
            return Answer::Invalid;
        }
    }
    Answer::Local(w.len())
}

enum Owner<'n> {
    /// The question name, as a pointer to it.
    Question,
    /// A name in lowercase wire form, written out in full.
    Name(&'n [u8]),
}

struct Reply<'a, 'q> {
    w: Writer<'a>,
    q: &'q Query<'q>,
    /// Answer, authority and additional records written.
    counts: [u16; 3],
    tc: bool,
    question_end: usize,
}

impl<'a, 'q> Reply<'a, 'q> {
    /// Writes the header and the question; `None` if the buffer cannot hold them.
    fn begin(out: &'a mut [u8], q: &'q Query<'q>, transport: Transport) -> Option<Self> {
        let limit = match (transport, q.edns) {
            (Transport::Tcp, _) => usize::from(u16::MAX),
            (Transport::Udp, None) => PLAIN_UDP_LIMIT,
            (Transport::Udp, Some(e)) => usize::from(e.udp_size).max(PLAIN_UDP_LIMIT),
        };
        let mut w = Writer::new(out, limit);
        for v in [q.id, 0, 1, 0, 0, 0] {
            w.put_u16(v).ok()?;
        }
        w.put(q.question).ok()?;
        let question_end = w.len();
        if q.edns.is_some() {
            // The OPT record must always fit, so records stop short of its room.
            let room = w.limit().checked_sub(OPT_LEN)?;
            if room < question_end {
                return None;
            }
            w.set_limit(room);
        }
        Some(Reply {
            w,
            q,
            counts: [0; 3],
            tc: false,
            question_end,
        })
    }

    /// Writes one record into section `section` (0 answer, 1 authority, 2 additional), or
    /// nothing if it does not fit.
    fn record(&mut self, owner: Owner, rec: &Record, ttl: u32, section: usize) -> Result<(), Full> {
        let mark = self.w.len();
        let written = self.write_record(owner, rec, ttl);
        self.commit(mark, written, section)
    }

    /// Counts a record that was written, or takes back the part that was.
    fn commit(
        &mut self,
        mark: usize,
        written: Result<(), Full>,
        section: usize,
    ) -> Result<(), Full> {
        match written {
            Ok(()) => {
                self.counts[section] += 1;
                Ok(())
            }
            Err(full) => {
                self.w.truncate(mark);
                Err(full)
            }
        }
    }

    fn write_record(&mut self, owner: Owner, rec: &Record, ttl: u32) -> Result<(), Full> {
        let w = &mut self.w;
        match owner {
            Owner::Question => w.put_pointer(HEADER_LEN)?,
            Owner::Name(n) => w.put(n)?,
        }
        let start = w.record_head(rec.rtype(), class::IN, ttl)?;
        match rec {
            Record::A(a) => w.put(&a.octets())?,
            Record::Aaaa(a) => w.put(&a.octets())?,
            Record::Srv {
                priority,
                weight,
                port,
                target,
            } => {
                w.put_u16(*priority)?;
                w.put_u16(*weight)?;
                w.put_u16(*port)?;
                // RFC 2782: the target is never compressed.
                w.put(target)?;
            }
            Record::Ptr(target) => w.put(target)?,
            Record::Txt(text) => {
                let text = &text.as_bytes()[..text.len().min(255)];
                w.put(&[text.len() as u8])?;
                w.put(text)?;
            }
        }
        w.end_rdata(start);
        Ok(())
    }

    /// The zone's SOA, owned by the apex label of the question name, or nothing if it does
    /// not fit.
    fn soa(&mut self, table: &DnsTable, apex: usize, section: usize) -> Result<(), Full> {
        let mark = self.w.len();
        let written = self.write_soa(table, apex);
        self.commit(mark, written, section)
    }

    fn write_soa(&mut self, table: &DnsTable, apex: usize) -> Result<(), Full> {
        let w = &mut self.w;
        w.put_pointer(HEADER_LEN + self.q.qname.offset(apex))?;
        let ttl = table.ttl();
        let start = w.record_head(rtype::SOA, class::IN, ttl)?;
        w.put(table.mname())?;
        w.put(table.rname())?;
        for v in [table.serial(), SOA_REFRESH, SOA_RETRY, SOA_EXPIRE, ttl] {
            w.put_u32(v)?;
        }
        w.end_rdata(start);
        Ok(())
    }

    /// Drops every record (for a negative answer whose SOA does not fit).
    fn truncated(&mut self) {
        self.w.truncate(self.question_end);
        self.counts = [0; 3];
        self.tc = true;
    }

    /// Adds the OPT record when the query had one, fills in the header, and returns the length.
    fn finish(mut self, rcode: u16) -> Answer {
        let q = self.q;
        if let Some(e) = q.edns {
            self.w.set_limit(self.w.limit() + OPT_LEN);
            let ttl = (u32::from(rcode >> 4) << 24) | if e.dnssec_ok { 0x8000 } else { 0 };
            let opt = self
                .w
                .put(&[0])
                .and_then(|_| self.w.record_head(rtype::OPT, OWN_UDP_SIZE, ttl));
            if opt.is_err() {
                return Answer::Invalid;
            }
            self.counts[2] += 1;
        }
        let mut fl = flags::QR
            | flags::AA
            | flags::RA
            | (q.flags & (flags::OPCODE_MASK | flags::RD | flags::CD))
            | (rcode & flags::RCODE_MASK);
        if self.tc {
            fl |= flags::TC;
        }
        self.w.patch_u16(2, fl);
        self.w.patch_u16(6, self.counts[0]);
        self.w.patch_u16(8, self.counts[1]);
        self.w.patch_u16(10, self.counts[2]);
        Answer::Local(self.w.len())
    }
}
