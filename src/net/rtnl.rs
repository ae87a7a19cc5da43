//! rtnetlink messages, built and parsed without I/O: just the links,
//! addresses and routes that `link` needs (rtnetlink(7), netlink(7); struct
//! layouts and attribute numbers from `include/uapi/linux/{netlink,
//! rtnetlink,if_link,if_addr}.h`). The socket itself is `sys::netlink`.
//!
//! Replies come from the kernel, not a guest, but the parser still checks
//! every length against the buffer and never panics.

use std::net::Ipv4Addr;

// Message types (rtnetlink.h).
pub const RTM_NEWLINK: u16 = 16;
pub const RTM_DELLINK: u16 = 17;
pub const RTM_GETLINK: u16 = 18;
pub const RTM_SETLINK: u16 = 19;
pub const RTM_NEWADDR: u16 = 20;
pub const RTM_GETADDR: u16 = 22;
pub const RTM_NEWROUTE: u16 = 24;
pub const RTM_GETROUTE: u16 = 26;
// Control messages (netlink.h).
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
// Request flags (netlink.h).
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_MULTI: u16 = 0x2;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
/// Set on a nested attribute's type (netlink.h).
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

// Address families (socket.h).
pub const AF_UNSPEC: u8 = 0;
pub const AF_INET: u8 = 2;
pub const AF_BRIDGE: u8 = 7;

// Link attributes (if_link.h).
pub const IFLA_ADDRESS: u16 = 1;
pub const IFLA_IFNAME: u16 = 3;
pub const IFLA_MASTER: u16 = 10;
pub const IFLA_PROTINFO: u16 = 12;
pub const IFLA_LINKINFO: u16 = 18;
pub const IFLA_INFO_KIND: u16 = 1;
pub const IFLA_INFO_DATA: u16 = 2;
pub const IFLA_BR_FORWARD_DELAY: u16 = 1;
pub const IFLA_BR_STP_STATE: u16 = 5;
pub const IFLA_BRPORT_LEARNING: u16 = 8;
pub const IFLA_BRPORT_ISOLATED: u16 = 33;
/// `IFF_UP` (if.h).
pub const IFF_UP: u32 = 0x1;

// Address attributes (if_addr.h).
pub const IFA_ADDRESS: u16 = 1;
pub const IFA_LOCAL: u16 = 2;

// Route attributes and values (rtnetlink.h).
pub const RTA_DST: u16 = 1;
pub const RTA_OIF: u16 = 4;
pub const RTA_GATEWAY: u16 = 5;
pub const RTA_TABLE: u16 = 15;
pub const RT_TABLE_LOCAL: u32 = 255;
pub const RTN_UNICAST: u8 = 1;

/// `struct nlmsghdr`: len u32, type u16, flags u16, seq u32, pid u32.
const NLMSG_HDRLEN: usize = 16;
/// `struct ifinfomsg`: family u8, pad u8, type u16, index i32, flags u32, change u32.
const IFINFOMSG_LEN: usize = 16;
/// `struct ifaddrmsg`: family, prefixlen, flags, scope (u8 each), index u32.
const IFADDRMSG_LEN: usize = 8;
/// `struct rtmsg`: family, dst_len, src_len, tos, table, protocol, scope,
/// type (u8 each), flags u32.
const RTMSG_LEN: usize = 12;
/// `struct rtattr`: len u16, type u16.
const RTA_HDRLEN: usize = 4;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A request being built: header, family header, then attributes.
#[derive(Debug)]
pub struct Request {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Request {
    pub fn new(kind: u16, flags: u16) -> Request {
        let mut buf = vec![0; NLMSG_HDRLEN];
        buf[4..6].copy_from_slice(&kind.to_ne_bytes());
        buf[6..8].copy_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        Request { buf, nests: vec![] }
    }

    /// Appends a `struct ifinfomsg`.
    pub fn ifinfo(mut self, family: u8, index: u32, flags: u32, change: u32) -> Request {
        let mut h = [0u8; IFINFOMSG_LEN];
        h[0] = family;
        h[4..8].copy_from_slice(&index.to_ne_bytes());
        h[8..12].copy_from_slice(&flags.to_ne_bytes());
        h[12..16].copy_from_slice(&change.to_ne_bytes());
        self.buf.extend_from_slice(&h);
        self
    }

    /// Appends a `struct ifaddrmsg`.
    pub fn ifaddr(mut self, family: u8, prefix_len: u8, index: u32) -> Request {
        let mut h = [0u8; IFADDRMSG_LEN];
        h[0] = family;
        h[1] = prefix_len;
        h[4..8].copy_from_slice(&index.to_ne_bytes());
        self.buf.extend_from_slice(&h);
        self
    }

    /// Appends a zeroed `struct rtmsg` of `family` (a dump filter).
    pub fn rtmsg(mut self, family: u8) -> Request {
        let mut h = [0u8; RTMSG_LEN];
        h[0] = family;
        self.buf.extend_from_slice(&h);
        self
    }

    pub fn attr(mut self, kind: u16, data: &[u8]) -> Request {
        self.push_attr(kind, data);
        self
    }

    /// A NUL-terminated string attribute, as the kernel wants names.
    pub fn attr_str(self, kind: u16, s: &str) -> Request {
        let mut data = s.as_bytes().to_vec();
        data.push(0);
        self.attr(kind, &data)
    }

    pub fn attr_u32(self, kind: u16, v: u32) -> Request {
        self.attr(kind, &v.to_ne_bytes())
    }

    /// Opens a nested attribute; attributes until [`Request::end`] go in it.
    pub fn begin(mut self, kind: u16) -> Request {
        self.nests.push(self.buf.len());
        self.push_attr(kind | NLA_F_NESTED, &[]);
        self
    }

    pub fn end(mut self) -> Request {
        if let Some(start) = self.nests.pop() {
            let len = (self.buf.len() - start) as u16;
            self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }

    /// The finished message, numbered `seq`.
    pub fn finish(mut self, seq: u32) -> Vec<u8> {
        while !self.nests.is_empty() {
            self = self.end();
        }
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }

    fn push_attr(&mut self, kind: u16, data: &[u8]) {
        let len = (RTA_HDRLEN + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align4(self.buf.len()), 0);
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("netlink message truncated")]
    Truncated,
}

/// One message of a reply datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply<'a> {
    /// A payload message (`RTM_NEWLINK`, …) answering request `seq`.
    Message { kind: u16, seq: u32, body: &'a [u8] },
    /// `NLMSG_ERROR` with error 0: the request succeeded.
    Ack { seq: u32 },
    /// `NLMSG_ERROR` with a (positive) errno.
    Error { seq: u32, errno: i32 },
    /// `NLMSG_DONE`: the end of a dump.
    Done { seq: u32 },
}

/// Splits a datagram from the kernel into its messages.
pub fn replies(mut buf: &[u8]) -> Result<Vec<Reply<'_>>, ParseError> {
    let mut out = vec![];
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32_at(buf, 0)? as usize;
        let kind = u16_at(buf, 4)?;
        let seq = u32_at(buf, 8)?;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(ParseError::Truncated);
        }
        let body = &buf[NLMSG_HDRLEN..len];
        out.push(match kind {
            NLMSG_DONE => Reply::Done { seq },
            NLMSG_ERROR => match i32_at(body, 0)? {
                0 => Reply::Ack { seq },
                // i32::MIN has no negation; no real errno is near it.
                e => Reply::Error {
                    seq,
                    errno: e.saturating_neg(),
                },
            },
            _ => Reply::Message { kind, seq, body },
        });
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(out)
}

/// The attributes in `buf`, as (type without flags, payload).
pub fn attrs(mut buf: &[u8]) -> Result<Vec<(u16, &[u8])>, ParseError> {
    let mut out = vec![];
    while buf.len() >= RTA_HDRLEN {
        let len = u16_at(buf, 0)? as usize;
        let kind = u16_at(buf, 2)? & NLA_TYPE_MASK;
        if len < RTA_HDRLEN || len > buf.len() {
            return Err(ParseError::Truncated);
        }
        out.push((kind, &buf[RTA_HDRLEN..len]));
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(out)
}

/// What `RTM_NEWLINK` says about a link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub flags: u32,
    pub master: Option<u32>,
    /// `IFLA_INFO_KIND` (`bridge`, `veth`, `tun`), if the driver reports one.
    pub kind: Option<String>,
}

pub fn parse_link(body: &[u8]) -> Result<Link, ParseError> {
    let index = u32_at(body, 4)?;
    let flags = u32_at(body, 8)?;
    let mut link = Link {
        index,
        name: String::new(),
        flags,
        master: None,
        kind: None,
    };
    for (kind, data) in attrs(body.get(IFINFOMSG_LEN..).ok_or(ParseError::Truncated)?)? {
        match kind {
            IFLA_IFNAME => link.name = c_string(data),
            IFLA_MASTER => link.master = Some(u32_at(data, 0)?),
            IFLA_LINKINFO => {
                for (k, d) in attrs(data)? {
                    if k == IFLA_INFO_KIND {
                        link.kind = Some(c_string(d));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(link)
}

/// What `RTM_NEWADDR` says about an IPv4 address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Addr {
    pub index: u32,
    pub prefix_len: u8,
    pub local: Option<Ipv4Addr>,
}

pub fn parse_addr(body: &[u8]) -> Result<Addr, ParseError> {
    let prefix_len = *body.get(1).ok_or(ParseError::Truncated)?;
    let index = u32_at(body, 4)?;
    let mut local = None;
    for (kind, data) in attrs(body.get(IFADDRMSG_LEN..).ok_or(ParseError::Truncated)?)? {
        // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer
        // on point-to-point links and the same address elsewhere.
        if kind == IFA_LOCAL || (kind == IFA_ADDRESS && local.is_none()) {
            local = ipv4(data);
        }
    }
    Ok(Addr {
        index,
        prefix_len,
        local,
    })
}

/// What `RTM_NEWROUTE` says about an IPv4 route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dst: Ipv4Addr,
    pub dst_len: u8,
    pub table: u32,
    /// `RTN_*`: unicast, local, broadcast, blackhole…
    pub kind: u8,
    pub oif: Option<u32>,
    pub gateway: Option<Ipv4Addr>,
}

pub fn parse_route(body: &[u8]) -> Result<Route, ParseError> {
    let head = body.get(..RTMSG_LEN).ok_or(ParseError::Truncated)?;
    let mut route = Route {
        dst: Ipv4Addr::UNSPECIFIED,
        dst_len: head[1],
        table: u32::from(head[4]),
        kind: head[7],
        oif: None,
        gateway: None,
    };
    for (kind, data) in attrs(&body[RTMSG_LEN..])? {
        match kind {
            RTA_DST => route.dst = ipv4(data).unwrap_or(Ipv4Addr::UNSPECIFIED),
            RTA_OIF => route.oif = Some(u32_at(data, 0)?),
            RTA_GATEWAY => route.gateway = ipv4(data),
            RTA_TABLE => route.table = u32_at(data, 0)?,
            _ => {}
        }
    }
    Ok(route)
}

fn c_string(data: &[u8]) -> String {
    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    String::from_utf8_lossy(&data[..end]).into_owned()
}

fn ipv4(data: &[u8]) -> Option<Ipv4Addr> {
    let b: [u8; 4] = data.get(..4)?.try_into().ok()?;
    Some(Ipv4Addr::from(b))
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, ParseError> {
    let s = b.get(at..at + 2).ok_or(ParseError::Truncated)?;
    Ok(u16::from_ne_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, ParseError> {
    let s = b.get(at..at + 4).ok_or(ParseError::Truncated)?;
    Ok(u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}

fn i32_at(b: &[u8], at: usize) -> Result<i32, ParseError> {
    u32_at(b, at).map(|v| v as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_counts_the_whole_message() {
        let msg = Request::new(RTM_GETLINK, NLM_F_DUMP)
            .ifinfo(AF_UNSPEC, 0, 0, 0)
            .finish(7);
        assert_eq!(msg.len(), 32);
        assert_eq!(u32_at(&msg, 0).unwrap(), 32);
        assert_eq!(u16_at(&msg, 4).unwrap(), RTM_GETLINK);
        assert_eq!(u16_at(&msg, 6).unwrap(), NLM_F_DUMP | NLM_F_REQUEST);
        assert_eq!(u32_at(&msg, 8).unwrap(), 7);
    }

    #[test]
    fn string_attribute_is_nul_terminated_and_padded() {
        let msg = Request::new(RTM_NEWLINK, 0)
            .attr_str(IFLA_IFNAME, "br0")
            .finish(1);
        assert_eq!(&msg[16..], &[8, 0, 3, 0, b'b', b'r', b'0', 0]);
        let msg = Request::new(RTM_NEWLINK, 0)
            .attr_str(IFLA_IFNAME, "br00")
            .finish(1);
        assert_eq!(
            &msg[16..],
            &[9, 0, 3, 0, b'b', b'r', b'0', b'0', 0, 0, 0, 0]
        );
    }

    #[test]
    fn nested_attribute_length_covers_its_children() {
        let msg = Request::new(RTM_NEWLINK, 0)
            .begin(IFLA_LINKINFO)
            .attr_str(IFLA_INFO_KIND, "bridge")
            .begin(IFLA_INFO_DATA)
            .attr_u32(IFLA_BR_STP_STATE, 0)
            .end()
            .end()
            .finish(1);
        let outer = attrs(&msg[16..]).unwrap();
        assert_eq!(outer.len(), 1);
        assert_eq!(outer[0].0, IFLA_LINKINFO);
        let inner = attrs(outer[0].1).unwrap();
        assert_eq!(inner[0], (IFLA_INFO_KIND, &b"bridge\0"[..]));
        assert_eq!(
            attrs(inner[1].1).unwrap(),
            vec![(IFLA_BR_STP_STATE, &[0u8; 4][..])]
        );
    }

    #[test]
    fn link_round_trips_through_the_parser() {
        let msg = Request::new(RTM_NEWLINK, 0)
            .ifinfo(AF_UNSPEC, 42, IFF_UP, 0)
            .attr_str(IFLA_IFNAME, "al1012")
            .attr_u32(IFLA_MASTER, 3)
            .begin(IFLA_LINKINFO)
            .attr_str(IFLA_INFO_KIND, "tun")
            .end()
            .finish(1);
        let link = parse_link(&msg[NLMSG_HDRLEN..]).unwrap();
        assert_eq!(
            link,
            Link {
                index: 42,
                name: "al1012".into(),
                flags: IFF_UP,
                master: Some(3),
                kind: Some("tun".into()),
            }
        );
    }

    #[test]
    fn address_prefers_local_over_peer() {
        let msg = Request::new(RTM_NEWADDR, 0)
            .ifaddr(AF_INET, 16, 5)
            .attr(IFA_ADDRESS, &[10, 0, 0, 2])
            .attr(IFA_LOCAL, &[10, 77, 0, 1])
            .finish(1);
        let a = parse_addr(&msg[NLMSG_HDRLEN..]).unwrap();
        assert_eq!((a.index, a.prefix_len), (5, 16));
        assert_eq!(a.local, Some(Ipv4Addr::new(10, 77, 0, 1)));
    }

    #[test]
    fn route_reads_destination_device_and_table() {
        let mut body = vec![AF_INET, 8, 0, 0, 254, 4, 0, RTN_UNICAST, 0, 0, 0, 0];
        let attrs_msg = Request::new(0, 0)
            .attr(RTA_DST, &[10, 0, 0, 0])
            .attr_u32(RTA_OIF, 9)
            .attr(RTA_GATEWAY, &[192, 168, 1, 1])
            .finish(0);
        body.extend_from_slice(&attrs_msg[NLMSG_HDRLEN..]);
        let r = parse_route(&body).unwrap();
        assert_eq!(
            (r.dst, r.dst_len, r.table),
            (Ipv4Addr::new(10, 0, 0, 0), 8, 254)
        );
        assert_eq!(
            (r.oif, r.gateway),
            (Some(9), Some(Ipv4Addr::new(192, 168, 1, 1)))
        );
    }

    #[test]
    fn error_reply_carries_a_positive_errno() {
        let mut msg = Request::new(NLMSG_ERROR, 0).finish(9);
        msg.extend_from_slice(&(-19i32).to_ne_bytes());
        msg.extend_from_slice(&[0; 16]);
        let len = msg.len() as u32;
        msg[0..4].copy_from_slice(&len.to_ne_bytes());
        assert_eq!(
            replies(&msg).unwrap(),
            vec![Reply::Error { seq: 9, errno: 19 }]
        );
    }

    #[test]
    fn several_messages_in_one_datagram_are_split() {
        let mut dgram = Request::new(RTM_NEWLINK, 0).ifinfo(0, 1, 0, 0).finish(4);
        dgram.extend(Request::new(NLMSG_DONE, 0).attr_u32(0, 0).finish(4));
        let r = replies(&dgram).unwrap();
        assert!(matches!(
            r[0],
            Reply::Message {
                kind: RTM_NEWLINK,
                seq: 4,
                ..
            }
        ));
        assert_eq!(r[1], Reply::Done { seq: 4 });
    }

    #[test]
    fn length_past_the_buffer_is_truncated_not_a_panic() {
        let mut msg = Request::new(RTM_NEWLINK, 0).ifinfo(0, 1, 0, 0).finish(1);
        msg[0] = 200;
        assert_eq!(replies(&msg), Err(ParseError::Truncated));
        assert_eq!(attrs(&[9, 0, 1, 0, 0]), Err(ParseError::Truncated));
        assert_eq!(parse_link(&[0; 3]), Err(ParseError::Truncated));
        assert_eq!(parse_route(&[0; 11]), Err(ParseError::Truncated));
    }

    #[test]
    fn error_code_of_i32_min_does_not_overflow() {
        let mut msg = Request::new(NLMSG_ERROR, 0).finish(3);
        msg.extend_from_slice(&i32::MIN.to_ne_bytes());
        let len = msg.len() as u32;
        msg[0..4].copy_from_slice(&len.to_ne_bytes());
        assert_eq!(
            replies(&msg).unwrap(),
            vec![Reply::Error {
                seq: 3,
                errno: i32::MAX
            }]
        );
    }

    #[test]
    fn attribute_shorter_than_its_header_is_refused() {
        assert_eq!(attrs(&[2, 0, 1, 0]), Err(ParseError::Truncated));
    }
}
