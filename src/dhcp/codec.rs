//! The BOOTP/DHCP message as bytes: decode what a guest sends, encode what the
//! server answers. Pure: bytes in, typed values out, no I/O.
//!
//! Implements the fixed header of RFC 2131 §2 (Figure 1), the magic cookie and
//! the option TLVs of RFC 2132. It does not choose leases (`lease`) or touch
//! sockets (`server`).
//!
//! Guest-controlled input: decoding never panics, checks every length against
//! the buffer before reading, and refuses datagrams over [`MAX_MESSAGE`].
//! Option overload (52) is recorded but the `sname`/`file` fields are never
//! read as options: every option the server acts on (53, 50, 54, 55, 57) is
//! one a client puts in the main options field. Options split across several
//! TLVs (RFC 3396) are kept as separate entries; the accessors read the first.

use std::net::Ipv4Addr;

use thiserror::Error;

/// RFC 2131 §3: "the 'options' field … a magic cookie 99.130.83.99".
pub const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];
/// Offset of the magic cookie: the fixed BOOTP header is 236 bytes (RFC 2131 Figure 1).
const COOKIE_OFFSET: usize = 236;
/// Where the options start, right after the cookie.
const OPTIONS_OFFSET: usize = COOKIE_OFFSET + 4;
/// The largest datagram accepted: an Ethernet MTU's worth of UDP payload, with
/// room to spare for clients that raise option 57. Larger is refused unread.
pub const MAX_MESSAGE: usize = 1500;
/// RFC 2131 §2: "a DHCP client must be prepared to receive DHCP messages with
/// an 'options' field of at least length 312 octets", i.e. 576-byte IP datagrams.
pub const MIN_MAX_MESSAGE_SIZE: u16 = 576;
/// RFC 1542 §3.4: BOOTP relays and old clients expect messages of at least 300 bytes.
const MIN_ENCODED_LEN: usize = 300;
/// The broadcast bit of `flags` (RFC 2131 §2, Figure 2).
pub const FLAG_BROADCAST: u16 = 0x8000;
/// `htype` for Ethernet (RFC 1700 "Hardware Type").
pub const HTYPE_ETHERNET: u8 = 1;

/// Option codes used by agentlab (RFC 2132).
pub mod code {
    pub const PAD: u8 = 0;
    pub const SUBNET_MASK: u8 = 1;
    pub const ROUTER: u8 = 3;
    pub const DNS: u8 = 6;
    pub const HOSTNAME: u8 = 12;
    pub const DOMAIN_NAME: u8 = 15;
    pub const REQUESTED_IP: u8 = 50;
    pub const LEASE_TIME: u8 = 51;
    pub const OVERLOAD: u8 = 52;
    pub const MESSAGE_TYPE: u8 = 53;
    pub const SERVER_ID: u8 = 54;
    pub const PARAM_REQUEST: u8 = 55;
    pub const MESSAGE: u8 = 56;
    pub const MAX_MESSAGE_SIZE: u8 = 57;
    pub const RENEWAL_TIME: u8 = 58;
    pub const REBINDING_TIME: u8 = 59;
    pub const CLIENT_ID: u8 = 61;
    pub const END: u8 = 255;
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("message of {0} bytes is shorter than the 240-byte BOOTP header and cookie")]
    TooShort(usize),
    #[error("message of {0} bytes exceeds the {MAX_MESSAGE}-byte limit")]
    TooLong(usize),
    #[error("op {0} is neither BOOTREQUEST (1) nor BOOTREPLY (2)")]
    BadOp(u8),
    #[error("hardware address length {0} exceeds the 16-byte chaddr field")]
    BadHlen(u8),
    #[error("no DHCP magic cookie (plain BOOTP is not served)")]
    NoMagicCookie,
    #[error("option {code} runs past the end of the message")]
    TruncatedOption { code: u8 },
    #[error("option {code} has invalid length {len}")]
    BadOptionLength { code: u8, len: usize },
    #[error("unknown DHCP message type {0}")]
    BadMessageType(u8),
}

/// BOOTP `op` (RFC 2131 §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Request = 1,
    Reply = 2,
}

/// Option 53 (RFC 2132 §9.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageType {
    Discover = 1,
    Offer = 2,
    Request = 3,
    Decline = 4,
    Ack = 5,
    Nak = 6,
    Release = 7,
    Inform = 8,
}

impl MessageType {
    fn from_u8(v: u8) -> Result<MessageType, DecodeError> {
        use MessageType::*;
        Ok(match v {
            1 => Discover,
            2 => Offer,
            3 => Request,
            4 => Decline,
            5 => Ack,
            6 => Nak,
            7 => Release,
            8 => Inform,
            other => return Err(DecodeError::BadMessageType(other)),
        })
    }
}

/// One option, typed where agentlab reads or writes it; anything else is kept
/// as its code and bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DhcpOption {
    SubnetMask(Ipv4Addr),
    Router(Vec<Ipv4Addr>),
    Dns(Vec<Ipv4Addr>),
    /// Option 12; non-UTF-8 names decode as [`DhcpOption::Other`].
    Hostname(String),
    DomainName(String),
    RequestedIp(Ipv4Addr),
    LeaseTime(u32),
    Overload(u8),
    MessageType(MessageType),
    ServerId(Ipv4Addr),
    ParamRequest(Vec<u8>),
    MaxMessageSize(u16),
    RenewalTime(u32),
    RebindingTime(u32),
    Other {
        code: u8,
        data: Vec<u8>,
    },
}

/// A BOOTP/DHCP message. `sname` and `file` are neither read nor written
/// (always zero in replies): agentlab boots nothing over BOOTP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub op: Op,
    pub htype: u8,
    pub hlen: u8,
    pub hops: u8,
    pub xid: u32,
    pub secs: u16,
    pub flags: u16,
    pub ciaddr: Ipv4Addr,
    pub yiaddr: Ipv4Addr,
    pub siaddr: Ipv4Addr,
    pub giaddr: Ipv4Addr,
    pub chaddr: [u8; 16],
    pub options: Vec<DhcpOption>,
}

impl Message {
    /// Decodes one datagram's payload.
    pub fn decode(buf: &[u8]) -> Result<Message, DecodeError> {
        if buf.len() > MAX_MESSAGE {
            return Err(DecodeError::TooLong(buf.len()));
        }
        if buf.len() < OPTIONS_OFFSET {
            return Err(DecodeError::TooShort(buf.len()));
        }
        let op = match buf[0] {
            1 => Op::Request,
            2 => Op::Reply,
            other => return Err(DecodeError::BadOp(other)),
        };
        let hlen = buf[2];
        if usize::from(hlen) > 16 {
            return Err(DecodeError::BadHlen(hlen));
        }
        if buf[COOKIE_OFFSET..OPTIONS_OFFSET] != MAGIC_COOKIE {
            return Err(DecodeError::NoMagicCookie);
        }
        let mut chaddr = [0u8; 16];
        chaddr.copy_from_slice(&buf[28..44]);
        Ok(Message {
            op,
            htype: buf[1],
            hlen,
            hops: buf[3],
            xid: be_u32(&buf[4..8]),
            secs: u16::from_be_bytes([buf[8], buf[9]]),
            flags: u16::from_be_bytes([buf[10], buf[11]]),
            ciaddr: ip_at(buf, 12),
            yiaddr: ip_at(buf, 16),
            siaddr: ip_at(buf, 20),
            giaddr: ip_at(buf, 24),
            chaddr,
            options: decode_options(&buf[OPTIONS_OFFSET..])?,
        })
    }

    /// Appends the encoded message to `out`, padded to the BOOTP minimum.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[self.op as u8, self.htype, self.hlen, self.hops]);
        out.extend_from_slice(&self.xid.to_be_bytes());
        out.extend_from_slice(&self.secs.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        for ip in [self.ciaddr, self.yiaddr, self.siaddr, self.giaddr] {
            out.extend_from_slice(&ip.octets());
        }
        out.extend_from_slice(&self.chaddr);
        out.resize(start + COOKIE_OFFSET, 0); // sname and file
        out.extend_from_slice(&MAGIC_COOKIE);
        for opt in &self.options {
            encode_option(opt, out);
        }
        out.push(code::END);
        if out.len() - start < MIN_ENCODED_LEN {
            out.resize(start + MIN_ENCODED_LEN, code::PAD);
        }
    }

    /// The encoded size before padding: header, cookie, options and END.
    pub fn encoded_len(&self) -> usize {
        OPTIONS_OFFSET + self.options.iter().map(wire_len).sum::<usize>() + 1
    }

    /// The client's MAC, for Ethernet (`htype` 1, `hlen` 6) messages only.
    pub fn mac(&self) -> Option<[u8; 6]> {
        if self.htype != HTYPE_ETHERNET || self.hlen != 6 {
            return None;
        }
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&self.chaddr[..6]);
        Some(mac)
    }

    pub fn broadcast(&self) -> bool {
        self.flags & FLAG_BROADCAST != 0
    }

    pub fn message_type(&self) -> Option<MessageType> {
        self.options.iter().find_map(|o| match o {
            DhcpOption::MessageType(t) => Some(*t),
            _ => None,
        })
    }

    pub fn server_id(&self) -> Option<Ipv4Addr> {
        self.options.iter().find_map(|o| match o {
            DhcpOption::ServerId(ip) => Some(*ip),
            _ => None,
        })
    }

    pub fn requested_ip(&self) -> Option<Ipv4Addr> {
        self.options.iter().find_map(|o| match o {
            DhcpOption::RequestedIp(ip) => Some(*ip),
            _ => None,
        })
    }

    pub fn param_request(&self) -> Option<&[u8]> {
        self.options.iter().find_map(|o| match o {
            DhcpOption::ParamRequest(p) => Some(p.as_slice()),
            _ => None,
        })
    }

    pub fn max_message_size(&self) -> Option<u16> {
        self.options.iter().find_map(|o| match o {
            DhcpOption::MaxMessageSize(n) => Some(*n),
            _ => None,
        })
    }

    /// The option of this code, if any.
    pub fn option(&self, code: u8) -> Option<&DhcpOption> {
        self.options.iter().find(|o| option_code(o) == code)
    }
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn ip_at(buf: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(buf[at], buf[at + 1], buf[at + 2], buf[at + 3])
}

/// Walks the TLVs up to END (or the end of the buffer, which lenient clients
/// rely on). The number of options is bounded by the buffer length.
fn decode_options(mut rest: &[u8]) -> Result<Vec<DhcpOption>, DecodeError> {
    let mut options = Vec::new();
    while let Some((&c, tail)) = rest.split_first() {
        match c {
            code::PAD => rest = tail,
            code::END => break,
            _ => {
                let Some((&len, tail)) = tail.split_first() else {
                    return Err(DecodeError::TruncatedOption { code: c });
                };
                let len = usize::from(len);
                if tail.len() < len {
                    return Err(DecodeError::TruncatedOption { code: c });
                }
                let (data, tail) = tail.split_at(len);
                options.push(decode_option(c, data)?);
                rest = tail;
            }
        }
    }
    Ok(options)
}

fn decode_option(c: u8, data: &[u8]) -> Result<DhcpOption, DecodeError> {
    let bad = || DecodeError::BadOptionLength {
        code: c,
        len: data.len(),
    };
    let ip = || -> Result<Ipv4Addr, DecodeError> {
        let b: [u8; 4] = data.try_into().map_err(|_| bad())?;
        Ok(Ipv4Addr::from(b))
    };
    let u32_ = || -> Result<u32, DecodeError> {
        let b: [u8; 4] = data.try_into().map_err(|_| bad())?;
        Ok(u32::from_be_bytes(b))
    };
    let ips = || -> Result<Vec<Ipv4Addr>, DecodeError> {
        if data.is_empty() || data.len() % 4 != 0 {
            return Err(bad());
        }
        Ok(data
            .chunks_exact(4)
            .map(|b| Ipv4Addr::new(b[0], b[1], b[2], b[3]))
            .collect())
    };
    let text = |wrap: fn(String) -> DhcpOption| match std::str::from_utf8(data) {
        Ok(s) => wrap(s.to_owned()),
        Err(_) => DhcpOption::Other {
            code: c,
            data: data.to_vec(),
        },
    };
    Ok(match c {
        code::SUBNET_MASK => DhcpOption::SubnetMask(ip()?),
        code::ROUTER => DhcpOption::Router(ips()?),
        code::DNS => DhcpOption::Dns(ips()?),
        code::HOSTNAME => text(DhcpOption::Hostname),
        code::DOMAIN_NAME => text(DhcpOption::DomainName),
        code::REQUESTED_IP => DhcpOption::RequestedIp(ip()?),
        code::LEASE_TIME => DhcpOption::LeaseTime(u32_()?),
        code::OVERLOAD => match data {
            [v] => DhcpOption::Overload(*v),
            _ => return Err(bad()),
        },
        code::MESSAGE_TYPE => match data {
            [v] => DhcpOption::MessageType(MessageType::from_u8(*v)?),
            _ => return Err(bad()),
        },
        code::SERVER_ID => DhcpOption::ServerId(ip()?),
        code::PARAM_REQUEST => DhcpOption::ParamRequest(data.to_vec()),
        code::MAX_MESSAGE_SIZE => match data {
            [a, b] => DhcpOption::MaxMessageSize(u16::from_be_bytes([*a, *b])),
            _ => return Err(bad()),
        },
        code::RENEWAL_TIME => DhcpOption::RenewalTime(u32_()?),
        code::REBINDING_TIME => DhcpOption::RebindingTime(u32_()?),
        _ => DhcpOption::Other {
            code: c,
            data: data.to_vec(),
        },
    })
}

/// The option's code on the wire.
pub fn option_code(opt: &DhcpOption) -> u8 {
    match opt {
        DhcpOption::SubnetMask(_) => code::SUBNET_MASK,
        DhcpOption::Router(_) => code::ROUTER,
        DhcpOption::Dns(_) => code::DNS,
        DhcpOption::Hostname(_) => code::HOSTNAME,
        DhcpOption::DomainName(_) => code::DOMAIN_NAME,
        DhcpOption::RequestedIp(_) => code::REQUESTED_IP,
        DhcpOption::LeaseTime(_) => code::LEASE_TIME,
        DhcpOption::Overload(_) => code::OVERLOAD,
        DhcpOption::MessageType(_) => code::MESSAGE_TYPE,
        DhcpOption::ServerId(_) => code::SERVER_ID,
        DhcpOption::ParamRequest(_) => code::PARAM_REQUEST,
        DhcpOption::MaxMessageSize(_) => code::MAX_MESSAGE_SIZE,
        DhcpOption::RenewalTime(_) => code::RENEWAL_TIME,
        DhcpOption::RebindingTime(_) => code::REBINDING_TIME,
        DhcpOption::Other { code, .. } => *code,
    }
}

/// The option's payload bytes.
fn option_data(opt: &DhcpOption) -> Vec<u8> {
    let ips = |v: &[Ipv4Addr]| v.iter().flat_map(|ip| ip.octets()).collect();
    match opt {
        DhcpOption::SubnetMask(ip) | DhcpOption::RequestedIp(ip) | DhcpOption::ServerId(ip) => {
            ip.octets().to_vec()
        }
        DhcpOption::Router(v) | DhcpOption::Dns(v) => ips(v),
        DhcpOption::Hostname(s) | DhcpOption::DomainName(s) => s.as_bytes().to_vec(),
        DhcpOption::LeaseTime(n) | DhcpOption::RenewalTime(n) | DhcpOption::RebindingTime(n) => {
            n.to_be_bytes().to_vec()
        }
        DhcpOption::Overload(v) => vec![*v],
        DhcpOption::MessageType(t) => vec![*t as u8],
        DhcpOption::ParamRequest(p) => p.clone(),
        DhcpOption::MaxMessageSize(n) => n.to_be_bytes().to_vec(),
        DhcpOption::Other { data, .. } => data.clone(),
    }
}

/// Bytes the option takes on the wire (code, length, at most 255 of data).
pub fn wire_len(opt: &DhcpOption) -> usize {
    2 + option_data(opt).len().min(255)
}

/// Writes one TLV. Data past 255 bytes is cut: the lease logic never builds
/// such an option (the server's config is checked at start), and a cut option
/// is better than a message whose lengths lie.
fn encode_option(opt: &DhcpOption, out: &mut Vec<u8>) {
    let data = option_data(opt);
    let len = data.len().min(255);
    out.push(option_code(opt));
    out.push(len as u8);
    out.extend_from_slice(&data[..len]);
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn discover(mac: [u8; 6]) -> Message {
        let mut chaddr = [0u8; 16];
        chaddr[..6].copy_from_slice(&mac);
        Message {
            op: Op::Request,
            htype: HTYPE_ETHERNET,
            hlen: 6,
            hops: 0,
            xid: 0xdead_beef,
            secs: 3,
            flags: FLAG_BROADCAST,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr,
            options: vec![
                DhcpOption::MessageType(MessageType::Discover),
                DhcpOption::ParamRequest(vec![1, 3, 6, 12, 15]),
                DhcpOption::MaxMessageSize(1500),
                DhcpOption::Hostname("guest".into()),
                DhcpOption::Other {
                    code: code::CLIENT_ID,
                    data: vec![1, 2, 3, 4, 5, 6, 7],
                },
            ],
        }
    }

    fn encoded(m: &Message) -> Vec<u8> {
        let mut out = Vec::new();
        m.encode(&mut out);
        out
    }

    #[test]
    fn discover_round_trips() {
        let m = discover([0x52, 0x54, 0, 1, 2, 3]);
        assert_eq!(Message::decode(&encoded(&m)), Ok(m));
    }

    #[test]
    fn reply_with_every_typed_option_round_trips() {
        let mut m = discover([0x52, 0x54, 0, 1, 2, 3]);
        m.op = Op::Reply;
        m.yiaddr = Ipv4Addr::new(10, 77, 0, 9);
        m.options = vec![
            DhcpOption::MessageType(MessageType::Ack),
            DhcpOption::ServerId(Ipv4Addr::new(10, 77, 0, 1)),
            DhcpOption::LeaseTime(3600),
            DhcpOption::RenewalTime(1800),
            DhcpOption::RebindingTime(3150),
            DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 0, 0)),
            DhcpOption::Router(vec![Ipv4Addr::new(10, 77, 0, 1)]),
            DhcpOption::Dns(vec![Ipv4Addr::new(10, 77, 0, 1), Ipv4Addr::new(1, 1, 1, 1)]),
            DhcpOption::Hostname("sbx-1000".into()),
            DhcpOption::DomainName("sandbox.internal".into()),
            DhcpOption::RequestedIp(Ipv4Addr::new(10, 77, 0, 9)),
            DhcpOption::Overload(3),
        ];
        assert_eq!(Message::decode(&encoded(&m)), Ok(m));
    }

    #[test]
    fn encoded_reply_is_padded_to_the_bootp_minimum() {
        let mut m = discover([1, 2, 3, 4, 5, 6]);
        m.options = vec![DhcpOption::MessageType(MessageType::Nak)];
        assert_eq!(m.encoded_len(), 244);
        assert_eq!(encoded(&m).len(), 300);
    }

    #[test]
    fn encoded_len_matches_unpadded_output() {
        let mut m = discover([1, 2, 3, 4, 5, 6]);
        m.options.push(DhcpOption::Other {
            code: 200,
            data: vec![7; 100],
        });
        assert_eq!(encoded(&m).len(), m.encoded_len());
    }

    #[test]
    fn header_fields_sit_at_rfc_offsets() {
        let mut m = discover([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff]);
        m.ciaddr = Ipv4Addr::new(1, 2, 3, 4);
        m.giaddr = Ipv4Addr::new(5, 6, 7, 8);
        let b = encoded(&m);
        assert_eq!(&b[4..8], &[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(&b[10..12], &[0x80, 0]);
        assert_eq!(&b[12..16], &[1, 2, 3, 4]);
        assert_eq!(&b[24..28], &[5, 6, 7, 8]);
        assert_eq!(&b[28..34], &[0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff]);
        assert_eq!(&b[236..240], &MAGIC_COOKIE);
        assert_eq!(&b[240..243], &[53, 1, 1]);
    }

    #[test]
    fn options_without_end_are_read_to_the_buffer_end() {
        let mut b = encoded(&discover([1, 2, 3, 4, 5, 6]));
        b.truncate(243); // cookie + option 53, no END
        let m = Message::decode(&b).unwrap();
        assert_eq!(m.message_type(), Some(MessageType::Discover));
    }

    #[test]
    fn pads_between_options_are_skipped() {
        let mut b = encoded(&discover([1, 2, 3, 4, 5, 6]));
        b.truncate(240);
        b.extend_from_slice(&[0, 0, 53, 1, 3, 0, 50, 4, 10, 0, 0, 7, 255]);
        let m = Message::decode(&b).unwrap();
        assert_eq!(m.message_type(), Some(MessageType::Request));
        assert_eq!(m.requested_ip(), Some(Ipv4Addr::new(10, 0, 0, 7)));
    }

    #[test]
    fn short_message_is_refused() {
        assert_eq!(Message::decode(&[1; 239]), Err(DecodeError::TooShort(239)));
    }

    #[test]
    fn oversized_message_is_refused_unread() {
        let b = vec![1u8; MAX_MESSAGE + 1];
        assert_eq!(
            Message::decode(&b),
            Err(DecodeError::TooLong(MAX_MESSAGE + 1))
        );
    }

    #[test]
    fn missing_cookie_is_refused() {
        let mut b = encoded(&discover([1, 2, 3, 4, 5, 6]));
        b[236] = 0;
        assert_eq!(Message::decode(&b), Err(DecodeError::NoMagicCookie));
    }

    #[test]
    fn bad_op_is_refused() {
        let mut b = encoded(&discover([1, 2, 3, 4, 5, 6]));
        b[0] = 3;
        assert_eq!(Message::decode(&b), Err(DecodeError::BadOp(3)));
    }

    #[test]
    fn hlen_beyond_chaddr_is_refused() {
        let mut b = encoded(&discover([1, 2, 3, 4, 5, 6]));
        b[2] = 17;
        assert_eq!(Message::decode(&b), Err(DecodeError::BadHlen(17)));
    }

    #[test]
    fn option_length_past_the_end_is_truncated() {
        let mut b = encoded(&discover([1, 2, 3, 4, 5, 6]));
        b.truncate(240);
        b.extend_from_slice(&[12, 10, b'a']);
        assert_eq!(
            Message::decode(&b),
            Err(DecodeError::TruncatedOption { code: 12 })
        );
    }

    #[test]
    fn option_code_without_length_is_truncated() {
        let mut b = encoded(&discover([1, 2, 3, 4, 5, 6]));
        b.truncate(240);
        b.push(53);
        assert_eq!(
            Message::decode(&b),
            Err(DecodeError::TruncatedOption { code: 53 })
        );
    }

    #[test]
    fn wrong_length_server_id_is_refused() {
        let mut b = encoded(&discover([1, 2, 3, 4, 5, 6]));
        b.truncate(240);
        b.extend_from_slice(&[54, 3, 1, 2, 3, 255]);
        assert_eq!(
            Message::decode(&b),
            Err(DecodeError::BadOptionLength { code: 54, len: 3 })
        );
    }

    #[test]
    fn unknown_message_type_is_refused() {
        let mut b = encoded(&discover([1, 2, 3, 4, 5, 6]));
        b[242] = 9;
        assert_eq!(Message::decode(&b), Err(DecodeError::BadMessageType(9)));
    }

    #[test]
    fn non_utf8_hostname_is_kept_as_bytes() {
        let mut b = encoded(&discover([1, 2, 3, 4, 5, 6]));
        b.truncate(240);
        b.extend_from_slice(&[12, 2, 0xff, 0xfe, 255]);
        let m = Message::decode(&b).unwrap();
        let want = DhcpOption::Other {
            code: 12,
            data: vec![0xff, 0xfe],
        };
        assert_eq!(m.options, vec![want]);
    }

    #[test]
    fn overload_is_recorded_and_sname_is_not_read_as_options() {
        let mut b = encoded(&discover([1, 2, 3, 4, 5, 6]));
        b[44..47].copy_from_slice(&[53, 1, 7]); // a RELEASE hidden in sname
        b.truncate(240);
        b.extend_from_slice(&[52, 1, 2, 53, 1, 1, 255]);
        let m = Message::decode(&b).unwrap();
        assert_eq!(m.message_type(), Some(MessageType::Discover));
        assert_eq!(m.option(code::OVERLOAD), Some(&DhcpOption::Overload(2)));
    }

    #[test]
    fn mac_needs_ethernet_htype_and_hlen() {
        let mut m = discover([1, 2, 3, 4, 5, 6]);
        assert_eq!(m.mac(), Some([1, 2, 3, 4, 5, 6]));
        m.hlen = 8;
        assert_eq!(m.mac(), None);
    }

    /// A deterministic xorshift, so failures reproduce without a rand crate.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn mutated_messages_never_panic_and_decoded_ones_reencode() {
        let base = encoded(&discover([0x52, 0x54, 0, 9, 9, 9]));
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            let mut b = base.clone();
            for _ in 0..(next(&mut state) % 8) {
                let at = (next(&mut state) as usize) % b.len();
                b[at] = next(&mut state) as u8;
            }
            b.truncate((next(&mut state) as usize) % (b.len() + 1));
            if let Ok(m) = Message::decode(&b) {
                let mut again = Vec::new();
                m.encode(&mut again);
                assert_eq!(Message::decode(&again).map(|x| x.options), Ok(m.options));
            }
        }
    }
}
