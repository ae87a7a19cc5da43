//! DNS message codec (RFC 1035 §4, AAAA per RFC 3596, EDNS0 OPT per RFC 6891):
//! bytes in, typed values out, no I/O.
//!
//! It reads what the gateway resolver needs — the header, the questions, and
//! resource records with A, AAAA and CNAME data decoded (everything else kept
//! as raw bytes) — and builds the server's own small answers. Upstream
//! answers are never re-encoded: the server relays their bytes, so the parser
//! remembers where each record's TTL sits to let the cache patch it in place.
//!
//! Guest-controlled input: every read is bounds-checked, section counts are
//! capped, and a compression pointer must point strictly backwards (RFC 1035
//! §4.1.4 only allows "a prior occurrence"), which rules out loops.

use std::net::{Ipv4Addr, Ipv6Addr};

/// The fixed header (RFC 1035 §4.1.1).
pub const HEADER_LEN: usize = 12;
/// Longest name in wire form, length octets included (RFC 1035 §2.3.4).
pub const MAX_NAME_WIRE: usize = 255;
/// Longest label (RFC 1035 §2.3.4).
pub const MAX_LABEL: usize = 63;
/// Most questions accepted in one message; real clients send one.
pub const MAX_QUESTIONS: usize = 4;
/// Most records accepted per section: bounds the work done for one message.
pub const MAX_RECORDS: usize = 256;
/// A DNS message over UDP without EDNS0 (RFC 1035 §4.2.1).
pub const CLASSIC_UDP_SIZE: usize = 512;

// Header flag bits (RFC 1035 §4.1.1).
pub const FLAG_QR: u16 = 0x8000;
pub const FLAG_AA: u16 = 0x0400;
pub const FLAG_TC: u16 = 0x0200;
pub const FLAG_RD: u16 = 0x0100;
pub const FLAG_RA: u16 = 0x0080;
const OPCODE_SHIFT: u16 = 11;
const OPCODE_MASK: u16 = 0xF;
const RCODE_MASK: u16 = 0xF;

/// OPCODE 0, a standard query (RFC 1035 §4.1.1).
pub const OPCODE_QUERY: u8 = 0;

// Record types (RFC 1035 §3.2.2, RFC 3596, RFC 6891).
pub const TYPE_A: u16 = 1;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_SOA: u16 = 6;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_OPT: u16 = 41;
/// Class IN (RFC 1035 §3.2.4).
pub const CLASS_IN: u16 = 1;

// Label kinds: the two top bits of a length octet (RFC 1035 §4.1.4).
const LABEL_POINTER: u8 = 0xC0;
const POINTER_MASK: u16 = 0x3FFF;

/// Response codes (RFC 1035 §4.1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Rcode {
    NoError = 0,
    FormErr = 1,
    ServFail = 2,
    NxDomain = 3,
    NotImp = 4,
    Refused = 5,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("message ends inside {0}")]
    Truncated(&'static str),
    #[error("name longer than 255 octets")]
    NameTooLong,
    #[error("label type {0:#04x} is not supported")]
    BadLabel(u8),
    #[error("compression pointer to offset {0} does not point backwards")]
    BadPointer(usize),
    #[error("{0} records in one section (at most {MAX_RECORDS})")]
    TooManyRecords(usize),
    #[error("{0} questions (at most {MAX_QUESTIONS})")]
    TooManyQuestions(usize),
    #[error("{0} record data has the wrong length {1}")]
    BadRdata(&'static str, usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("label longer than 63 octets")]
    LabelTooLong,
    #[error("name longer than 255 octets")]
    NameTooLong,
    #[error("empty label")]
    EmptyLabel,
    #[error("record data longer than 65535 octets")]
    RdataTooLong,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Header {
    pub id: u16,
    pub flags: u16,
    pub qdcount: u16,
    pub ancount: u16,
    pub nscount: u16,
    pub arcount: u16,
}

impl Header {
    pub fn parse(buf: &[u8]) -> Result<Header, ParseError> {
        let b = buf
            .get(..HEADER_LEN)
            .ok_or(ParseError::Truncated("header"))?;
        let at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        Ok(Header {
            id: at(0),
            flags: at(2),
            qdcount: at(4),
            ancount: at(6),
            nscount: at(8),
            arcount: at(10),
        })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        for v in [
            self.id,
            self.flags,
            self.qdcount,
            self.ancount,
            self.nscount,
            self.arcount,
        ] {
            out.extend_from_slice(&v.to_be_bytes());
        }
    }

    pub fn is_response(&self) -> bool {
        self.flags & FLAG_QR != 0
    }
    pub fn truncated(&self) -> bool {
        self.flags & FLAG_TC != 0
    }
    pub fn opcode(&self) -> u8 {
        ((self.flags >> OPCODE_SHIFT) & OPCODE_MASK) as u8
    }
    pub fn rcode(&self) -> u8 {
        (self.flags & RCODE_MASK) as u8
    }
}

/// A question. `name` is dotted, without the trailing dot, in the case the
/// sender wrote it; octets that are not printable ASCII, and dots or
/// backslashes inside a label, are written `\DDD` so a name never passes for
/// another one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RData {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Cname(String),
    /// Any other type, as received (names inside may be compressed).
    Other(Vec<u8>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub name: String,
    pub rtype: u16,
    pub class: u16,
    pub ttl: u32,
    pub data: RData,
    /// Where the TTL sits in the parsed message (0 for records built here).
    pub ttl_offset: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Message {
    pub header: Header,
    pub questions: Vec<Question>,
    pub answers: Vec<Record>,
    pub authority: Vec<Record>,
    pub additional: Vec<Record>,
    /// Offset just past the question section in the parsed bytes.
    pub question_end: usize,
}

impl Message {
    /// Parses a whole message; trailing bytes after the counted records are ignored.
    pub fn parse(buf: &[u8]) -> Result<Message, ParseError> {
        let header = Header::parse(buf)?;
        let qd = usize::from(header.qdcount);
        if qd > MAX_QUESTIONS {
            return Err(ParseError::TooManyQuestions(qd));
        }
        let mut pos = HEADER_LEN;
        let mut questions = Vec::with_capacity(qd);
        for _ in 0..qd {
            let (name, next) = read_name(buf, pos)?;
            let fixed = buf
                .get(next..next + 4)
                .ok_or(ParseError::Truncated("question"))?;
            questions.push(Question {
                name,
                qtype: u16::from_be_bytes([fixed[0], fixed[1]]),
                qclass: u16::from_be_bytes([fixed[2], fixed[3]]),
            });
            pos = next + 4;
        }
        let question_end = pos;
        let answers = read_section(buf, &mut pos, header.ancount)?;
        let authority = read_section(buf, &mut pos, header.nscount)?;
        let additional = read_section(buf, &mut pos, header.arcount)?;
        Ok(Message {
            header,
            questions,
            answers,
            authority,
            additional,
            question_end,
        })
    }

    /// The largest UDP response the sender accepts: its EDNS0 OPT payload
    /// size (RFC 6891 §6.2.3, never below 512), or 512 without one.
    pub fn udp_payload_size(&self) -> usize {
        self.additional
            .iter()
            .find(|r| r.rtype == TYPE_OPT)
            .map_or(CLASSIC_UDP_SIZE, |r| {
                usize::from(r.class).max(CLASSIC_UDP_SIZE)
            })
    }

    /// Encodes without compression. `RData::Other` is written as held, so
    /// this is for messages built here, not for relaying parsed ones.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let count = |n: usize| u16::try_from(n).unwrap_or(u16::MAX);
        let header = Header {
            qdcount: count(self.questions.len()),
            ancount: count(self.answers.len()),
            nscount: count(self.authority.len()),
            arcount: count(self.additional.len()),
            ..self.header
        };
        header.encode(out);
        for q in &self.questions {
            encode_name(&q.name, out)?;
            out.extend_from_slice(&q.qtype.to_be_bytes());
            out.extend_from_slice(&q.qclass.to_be_bytes());
        }
        for r in self
            .answers
            .iter()
            .chain(&self.authority)
            .chain(&self.additional)
        {
            encode_name(&r.name, out)?;
            encode_record_tail(r, out)?;
        }
        Ok(())
    }
}

/// Writes a record's type, class, TTL and data (its owner name already written).
pub fn encode_record_tail(r: &Record, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    out.extend_from_slice(&r.rtype.to_be_bytes());
    out.extend_from_slice(&r.class.to_be_bytes());
    out.extend_from_slice(&r.ttl.to_be_bytes());
    let mut data = Vec::new();
    match &r.data {
        RData::A(a) => data.extend_from_slice(&a.octets()),
        RData::Aaaa(a) => data.extend_from_slice(&a.octets()),
        RData::Cname(n) => encode_name(n, &mut data)?,
        RData::Other(raw) => data.extend_from_slice(raw),
    }
    let len = u16::try_from(data.len()).map_err(|_| EncodeError::RdataTooLong)?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&data);
    Ok(())
}

/// Encodes a plain dotted name (no `\DDD` escapes; a trailing dot is allowed).
pub fn encode_name(name: &str, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let start = out.len();
    if !name.is_empty() {
        for label in name.split('.') {
            if label.is_empty() {
                return Err(EncodeError::EmptyLabel);
            }
            if label.len() > MAX_LABEL {
                return Err(EncodeError::LabelTooLong);
            }
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
    }
    out.push(0);
    if out.len() - start > MAX_NAME_WIRE {
        return Err(EncodeError::NameTooLong);
    }
    Ok(())
}

fn read_section(buf: &[u8], pos: &mut usize, count: u16) -> Result<Vec<Record>, ParseError> {
    let n = usize::from(count);
    if n > MAX_RECORDS {
        return Err(ParseError::TooManyRecords(n));
    }
    let mut records = Vec::with_capacity(n);
    for _ in 0..n {
        let (record, next) = read_record(buf, *pos)?;
        records.push(record);
        *pos = next;
    }
    Ok(records)
}

/// Type, class, TTL and RDLENGTH: the fixed part after a record's owner name.
const RR_FIXED: usize = 10;

fn read_record(buf: &[u8], pos: usize) -> Result<(Record, usize), ParseError> {
    let (name, at) = read_name(buf, pos)?;
    let f = buf
        .get(at..at + RR_FIXED)
        .ok_or(ParseError::Truncated("record"))?;
    let rtype = u16::from_be_bytes([f[0], f[1]]);
    let class = u16::from_be_bytes([f[2], f[3]]);
    let ttl = u32::from_be_bytes([f[4], f[5], f[6], f[7]]);
    let len = usize::from(u16::from_be_bytes([f[8], f[9]]));
    let start = at + RR_FIXED;
    let raw = buf
        .get(start..start + len)
        .ok_or(ParseError::Truncated("record data"))?;
    let data = match rtype {
        TYPE_A => RData::A(Ipv4Addr::from(
            <[u8; 4]>::try_from(raw).map_err(|_| ParseError::BadRdata("A", len))?,
        )),
        TYPE_AAAA => RData::Aaaa(Ipv6Addr::from(
            <[u8; 16]>::try_from(raw).map_err(|_| ParseError::BadRdata("AAAA", len))?,
        )),
        TYPE_CNAME => {
            let (target, end) = read_name(buf, start)?;
            if end != start + len {
                return Err(ParseError::BadRdata("CNAME", len));
            }
            RData::Cname(target)
        }
        _ => RData::Other(raw.to_vec()),
    };
    let record = Record {
        name,
        rtype,
        class,
        ttl,
        data,
        ttl_offset: at + 4,
    };
    Ok((record, start + len))
}

/// Reads a possibly compressed name at `pos`; returns it and the offset just
/// past its in-place part.
pub fn read_name(buf: &[u8], pos: usize) -> Result<(String, usize), ParseError> {
    let mut name = String::new();
    let mut wire_len = 1; // the root's zero octet
    let mut at = pos;
    // Every pointer must land before the label sequence it was found in, so
    // offsets strictly decrease and the walk ends.
    let mut floor = pos;
    let mut end = None;
    loop {
        let len = *buf.get(at).ok_or(ParseError::Truncated("name"))?;
        match len & LABEL_POINTER {
            0 if len == 0 => break,
            0 => {
                let l = usize::from(len);
                let label = buf
                    .get(at + 1..at + 1 + l)
                    .ok_or(ParseError::Truncated("label"))?;
                wire_len += 1 + l;
                if wire_len > MAX_NAME_WIRE {
                    return Err(ParseError::NameTooLong);
                }
                if !name.is_empty() {
                    name.push('.');
                }
                push_label(&mut name, label);
                at += 1 + l;
            }
            LABEL_POINTER => {
                let lo = *buf.get(at + 1).ok_or(ParseError::Truncated("pointer"))?;
                let target = usize::from(u16::from_be_bytes([len, lo]) & POINTER_MASK);
                // No name starts inside the header; allowing it would let a
                // reply built from a query's question bytes mean another name.
                if target >= floor || target < HEADER_LEN {
                    return Err(ParseError::BadPointer(target));
                }
                end.get_or_insert(at + 2);
                floor = target;
                at = target;
            }
            kind => return Err(ParseError::BadLabel(kind)),
        }
    }
    Ok((name, end.unwrap_or(at + 1)))
}

fn push_label(name: &mut String, label: &[u8]) {
    for &b in label {
        if b.is_ascii_graphic() && b != b'.' && b != b'\\' {
            name.push(char::from(b));
        } else {
            name.push_str(&format!("\\{b:03}"));
        }
    }
}

/// A reply to `query` (whose parsed form is `q`) carrying `rcode` and
/// `answers`, echoing the query's id, opcode, RD bit and question section.
/// Answer owner names equal to the question's are written as a pointer to it.
pub fn build_reply(query: &[u8], q: &Message, rcode: Rcode, answers: &[Record]) -> Vec<u8> {
    let qname = q.questions.first().map(|q| q.name.as_str());
    let questions = query.get(HEADER_LEN..q.question_end).unwrap_or(&[]);
    let keep = q.header.flags & ((OPCODE_MASK << OPCODE_SHIFT) | FLAG_RD);
    let header = Header {
        id: q.header.id,
        flags: FLAG_QR | FLAG_RA | keep | rcode as u16,
        qdcount: q.header.qdcount,
        ancount: 0,
        nscount: 0,
        arcount: 0,
    };
    let mut out = Vec::with_capacity(CLASSIC_UDP_SIZE);
    header.encode(&mut out);
    out.extend_from_slice(questions);
    let mut written = 0u16;
    for r in answers {
        let mark = out.len();
        let name_ok = if Some(r.name.as_str()) == qname {
            out.extend_from_slice(
                &(u16::from(LABEL_POINTER) << 8 | HEADER_LEN as u16).to_be_bytes(),
            );
            true
        } else {
            encode_name(&r.name, &mut out).is_ok()
        };
        if !name_ok || encode_record_tail(r, &mut out).is_err() {
            out.truncate(mark);
            continue;
        }
        written += 1;
    }
    out[6..8].copy_from_slice(&written.to_be_bytes());
    out
}

/// The header and question of `reply` with TC set and no records: what a UDP
/// client gets when the whole answer does not fit (RFC 1035 §4.2.1).
pub fn truncate_reply(reply: &[u8], question_end: usize) -> Option<Vec<u8>> {
    let mut out = reply.get(..question_end)?.to_vec();
    let flags = u16::from_be_bytes([out[2], out[3]]) | FLAG_TC;
    out[2..4].copy_from_slice(&flags.to_be_bytes());
    out[6..HEADER_LEN].fill(0);
    Some(out)
}

/// Sets a message's id in place.
pub fn set_id(msg: &mut [u8], id: u16) {
    if let Some(b) = msg.get_mut(..2) {
        b.copy_from_slice(&id.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let m = Message {
            header: Header {
                id: 0x1234,
                flags: FLAG_RD,
                ..Header::default()
            },
            questions: vec![Question {
                name: name.into(),
                qtype,
                qclass: CLASS_IN,
            }],
            ..Message::default()
        };
        let mut out = Vec::new();
        m.encode(&mut out).unwrap();
        out
    }

    fn a(name: &str, ip: [u8; 4], ttl: u32) -> Record {
        Record {
            name: name.into(),
            rtype: TYPE_A,
            class: CLASS_IN,
            ttl,
            data: RData::A(Ipv4Addr::from(ip)),
            ttl_offset: 0,
        }
    }

    #[test]
    fn query_round_trips() {
        let bytes = query("Example.COM", TYPE_AAAA);
        let m = Message::parse(&bytes).unwrap();
        assert_eq!(m.header.id, 0x1234);
        assert_eq!(m.questions[0].name, "Example.COM");
        assert_eq!(m.questions[0].qtype, TYPE_AAAA);
        assert_eq!(m.question_end, bytes.len());
    }

    #[test]
    fn reply_uses_a_pointer_to_the_question_and_parses_back() {
        let q = query("a.test", TYPE_A);
        let qm = Message::parse(&q).unwrap();
        let reply = build_reply(&q, &qm, Rcode::NoError, &[a("a.test", [10, 0, 0, 1], 60)]);
        let m = Message::parse(&reply).unwrap();
        assert!(m.header.is_response());
        assert_eq!(m.header.flags & FLAG_RD, FLAG_RD);
        assert_eq!(m.answers[0].name, "a.test");
        assert_eq!(m.answers[0].data, RData::A(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(&reply[m.answers[0].ttl_offset..][..4], &60u32.to_be_bytes());
        assert_eq!(reply[q.len()], 0xC0);
    }

    #[test]
    fn nxdomain_reply_carries_the_rcode() {
        let q = query("b.test", TYPE_A);
        let qm = Message::parse(&q).unwrap();
        let m = Message::parse(&build_reply(&q, &qm, Rcode::NxDomain, &[])).unwrap();
        assert_eq!(m.header.rcode(), Rcode::NxDomain as u8);
        assert_eq!(m.answers.len(), 0);
    }

    #[test]
    fn cname_with_compressed_target_is_followed() {
        let q = query("www.a.test", TYPE_A);
        let mut msg = q.clone();
        msg[2] |= 0x80;
        msg[7] = 1; // ancount
                    // owner: pointer to the question name; CNAME data "cdn" + pointer to "a.test" (offset 16)
        msg.extend_from_slice(&[
            0xC0, 12, 0, 5, 0, 1, 0, 0, 0, 30, 0, 6, 3, b'c', b'd', b'n', 0xC0, 16,
        ]);
        let m = Message::parse(&msg).unwrap();
        assert_eq!(m.answers[0].name, "www.a.test");
        assert_eq!(m.answers[0].data, RData::Cname("cdn.a.test".into()));
        assert_eq!(m.answers[0].ttl, 30);
    }

    #[test]
    fn pointer_to_itself_is_rejected() {
        let mut msg = query("x", TYPE_A);
        msg[5] = 0; // no questions
        msg[7] = 1;
        msg.truncate(HEADER_LEN);
        msg.extend_from_slice(&[0xC0, 12]);
        assert_eq!(Message::parse(&msg), Err(ParseError::BadPointer(12)));
    }

    #[test]
    fn pointer_into_the_header_is_rejected() {
        let mut msg = vec![0u8; HEADER_LEN];
        msg[5] = 1;
        msg.extend_from_slice(&[0xC0, 2, 0, 1, 0, 1]);
        assert_eq!(Message::parse(&msg), Err(ParseError::BadPointer(2)));
    }

    #[test]
    fn forward_pointer_is_rejected() {
        let mut msg = vec![0u8; HEADER_LEN];
        msg[5] = 1;
        msg.extend_from_slice(&[0xC0, 14, 1, b'a', 0, 0, 1, 0, 1]);
        assert_eq!(Message::parse(&msg), Err(ParseError::BadPointer(14)));
    }

    #[test]
    fn pointer_loop_between_two_names_is_rejected() {
        // Name at 12 is "a" + pointer to 17; name at 17 points back to 12.
        let mut msg = vec![0u8; HEADER_LEN];
        msg[5] = 2;
        msg.extend_from_slice(&[1, b'a', 0xC0, 17, 0, 0xC0, 12, 0, 1, 0, 1]);
        assert!(matches!(
            Message::parse(&msg),
            Err(ParseError::BadPointer(_))
        ));
    }

    #[test]
    fn truncated_messages_are_errors_at_every_length() {
        let q = query("a.test", TYPE_A);
        let qm = Message::parse(&q).unwrap();
        let reply = build_reply(&q, &qm, Rcode::NoError, &[a("a.test", [1, 2, 3, 4], 5)]);
        for len in 0..reply.len() {
            assert!(Message::parse(&reply[..len]).is_err(), "length {len}");
        }
    }

    #[test]
    fn oversize_name_is_rejected() {
        let mut msg = vec![0u8; HEADER_LEN];
        msg[5] = 1;
        for _ in 0..5 {
            msg.push(63);
            msg.extend_from_slice(&[b'a'; 63]);
        }
        msg.extend_from_slice(&[0, 0, 1, 0, 1]);
        assert_eq!(Message::parse(&msg), Err(ParseError::NameTooLong));
    }

    #[test]
    fn huge_record_count_is_rejected_before_reading() {
        let mut msg = vec![0u8; HEADER_LEN];
        msg[6] = 0xFF;
        msg[7] = 0xFF;
        assert_eq!(
            Message::parse(&msg),
            Err(ParseError::TooManyRecords(0xFFFF))
        );
    }

    #[test]
    fn extended_label_type_is_rejected() {
        let mut msg = vec![0u8; HEADER_LEN];
        msg[5] = 1;
        msg.extend_from_slice(&[0x41, 0, 0, 1, 0, 1]);
        assert_eq!(Message::parse(&msg), Err(ParseError::BadLabel(0x40)));
    }

    #[test]
    fn odd_octets_in_labels_are_escaped() {
        let mut msg = vec![0u8; HEADER_LEN];
        msg[5] = 1;
        msg.extend_from_slice(&[3, b'a', b'.', 0, 1, b'b', 0, 0, 1, 0, 1]);
        let m = Message::parse(&msg).unwrap();
        assert_eq!(m.questions[0].name, "a\\046\\000.b");
    }

    #[test]
    fn a_record_with_wrong_length_is_rejected() {
        let mut msg = vec![0u8; HEADER_LEN];
        msg[7] = 1;
        msg.extend_from_slice(&[0, 0, 1, 0, 1, 0, 0, 0, 1, 0, 3, 1, 2, 3]);
        assert_eq!(Message::parse(&msg), Err(ParseError::BadRdata("A", 3)));
    }

    #[test]
    fn edns_payload_size_is_read_from_opt() {
        let mut msg = query("a.test", TYPE_A);
        msg[11] = 1;
        msg.extend_from_slice(&[0, 0, 41, 0x04, 0xD0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(Message::parse(&msg).unwrap().udp_payload_size(), 1232);
    }

    #[test]
    fn truncated_reply_keeps_only_the_question() {
        let q = query("a.test", TYPE_A);
        let qm = Message::parse(&q).unwrap();
        let reply = build_reply(&q, &qm, Rcode::NoError, &[a("a.test", [1, 2, 3, 4], 5)]);
        let t = Message::parse(&truncate_reply(&reply, qm.question_end).unwrap()).unwrap();
        assert!(t.header.truncated());
        assert_eq!((t.questions.len(), t.answers.len()), (1, 0));
    }

    #[test]
    fn encode_refuses_long_labels() {
        let name = "a".repeat(64);
        assert_eq!(
            encode_name(&name, &mut Vec::new()),
            Err(EncodeError::LabelTooLong)
        );
    }
}
