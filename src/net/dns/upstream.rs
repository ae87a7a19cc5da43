//! Asking the upstream resolvers (RFC 1035 §4.2, RFC 5452): every forwarded
//! question goes out from a fresh UDP socket — a random ephemeral port the
//! kernel picks — connected to the upstream, so only its datagrams arrive,
//! with a random id; a reply counts only if id, QR and question all match.
//! A truncated reply is asked again over TCP. Upstreams are tried in turn
//! until the budget runs out. Waits happen in slices of [`SLICE`] so a
//! stopping server is never held up for long.

use std::fs::File;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::codec::{self, Message};

/// How long a blocked thread waits before it looks at the stop flag.
pub(super) const SLICE: Duration = Duration::from_millis(200);
/// Largest datagram read; queries forwarded offer no more (EDNS0).
pub(super) const MAX_UDP: usize = 4096;

/// The resolvers to ask and the budget for one question.
pub(super) struct Upstream {
    addrs: Vec<SocketAddr>,
    timeout: Duration,
    random: Mutex<File>,
}

impl Upstream {
    pub(super) fn new(addrs: Vec<SocketAddr>, timeout: Duration) -> io::Result<Upstream> {
        let random = Mutex::new(File::open("/dev/urandom")?);
        Ok(Upstream {
            addrs,
            timeout,
            random,
        })
    }

    /// The reply (carrying the forwarded id) and its parse, or `None` when
    /// no upstream answered within the budget or the server is stopping.
    pub(super) fn forward(
        &self,
        query: &[u8],
        stopping: &AtomicBool,
    ) -> Option<(Vec<u8>, Message)> {
        forward(self, query, stopping)
    }
}

/// Reads one length-prefixed message, waiting in slices; `None` on EOF,
/// error, deadline or stop.
pub(super) fn read_framed(
    stopping: &AtomicBool,
    stream: &mut TcpStream,
    deadline: Instant,
) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    read_exact_until(stopping, stream, &mut len, deadline)?;
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    read_exact_until(stopping, stream, &mut msg, deadline)?;
    Some(msg)
}

fn read_exact_until(
    stopping: &AtomicBool,
    stream: &mut TcpStream,
    buf: &mut [u8],
    deadline: Instant,
) -> Option<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let left = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())?;
        if stopping.load(Ordering::SeqCst) {
            return None;
        }
        stream.set_read_timeout(Some(left.min(SLICE))).ok()?;
        match stream.read(&mut buf[filled..]) {
            Ok(0) => return None,
            Ok(n) => filled += n,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => return None,
        }
    }
    Some(())
}

fn forward(up: &Upstream, query: &[u8], stopping: &AtomicBool) -> Option<(Vec<u8>, Message)> {
    let ups = &up.addrs;
    if ups.is_empty() {
        return None;
    }
    let start = Instant::now();
    let deadline = start + up.timeout;
    // At least two tries, so one lost datagram does not cost the answer.
    let tries = ups.len().max(2);
    let per_try = up.timeout / tries as u32;
    for i in 0..tries {
        let to = ups[i % ups.len()];
        let until = deadline.min(Instant::now() + per_try);
        let id = random_id(&up.random);
        let mut out = query.to_vec();
        codec::set_id(&mut out, id);
        cap_edns_payload(&mut out);
        match exchange_udp(stopping, &out, to, until) {
            Ok(Some(got)) if got.1.header.truncated() => {
                if let Ok(Some(full)) = exchange_tcp(stopping, &out, to, deadline) {
                    return Some(full);
                }
                return Some(got);
            }
            Ok(Some(got)) => return Some(got),
            Ok(None) => {}
            Err(e) => crate::debug!("dns: upstream {to}: {e}"),
        }
        if stopping.load(Ordering::SeqCst) || Instant::now() >= deadline {
            break;
        }
    }
    None
}

/// Lowers the EDNS0 payload size a client offered to what we read from
/// upstream, so a large answer comes back truncated (then over TCP) rather
/// than cut off by our receive buffer.
fn cap_edns_payload(query: &mut [u8]) {
    let Ok(m) = Message::parse(query) else {
        return;
    };
    let cap = MAX_UDP as u16;
    for r in m
        .additional
        .iter()
        .filter(|r| r.rtype == codec::TYPE_OPT && r.class > cap)
    {
        // The class field sits just before the TTL (RFC 6891 §6.1.2).
        if let Some(class) = r
            .ttl_offset
            .checked_sub(2)
            .and_then(|at| query.get_mut(at..at + 2))
        {
            class.copy_from_slice(&cap.to_be_bytes());
        }
    }
}

fn random_id(random: &Mutex<File>) -> u16 {
    let mut b = [0u8; 2];
    let mut f = random.lock().unwrap_or_else(|e| e.into_inner());
    if f.read_exact(&mut b).is_err() {
        // /dev/urandom does not fail once open; if it did, fall back to
        // the clock's low bits rather than a fixed id.
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        return now.map_or(0, |d| d.subsec_nanos() as u16);
    }
    u16::from_be_bytes(b)
}

/// Whether `reply` answers `query`: same id, QR set, same question (RFC 5452 §9.1).
pub fn matches(query: &Message, reply: &Message) -> bool {
    let same_q = |a: &codec::Question, b: &codec::Question| {
        a.name.eq_ignore_ascii_case(&b.name) && a.qtype == b.qtype && a.qclass == b.qclass
    };
    reply.header.is_response()
        && reply.header.id == query.header.id
        && reply.questions.len() == query.questions.len()
        && query
            .questions
            .iter()
            .zip(&reply.questions)
            .all(|(a, b)| same_q(a, b))
}

fn unspecified(like: SocketAddr) -> SocketAddr {
    match like {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    }
}

fn exchange_udp(
    stopping: &AtomicBool,
    query: &[u8],
    up: SocketAddr,
    until: Instant,
) -> io::Result<Option<(Vec<u8>, Message)>> {
    let q = Message::parse(query).map_err(|e| io::Error::new(ErrorKind::InvalidInput, e))?;
    let sock = UdpSocket::bind(unspecified(up))?;
    sock.connect(up)?;
    sock.send(query)?;
    let mut buf = vec![0u8; MAX_UDP];
    while let Some(left) = until
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
    {
        if stopping.load(Ordering::SeqCst) {
            break;
        }
        sock.set_read_timeout(Some(left.min(SLICE)))?;
        match sock.recv(&mut buf) {
            Ok(n) => {
                let reply = &buf[..n];
                if let Ok(m) = Message::parse(reply) {
                    if matches(&q, &m) {
                        return Ok(Some((reply.to_vec(), m)));
                    }
                }
                crate::debug!("dns: upstream {up}: ignored a reply that does not match");
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            // ICMP port unreachable from the upstream: try the next one.
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

fn exchange_tcp(
    stopping: &AtomicBool,
    query: &[u8],
    up: SocketAddr,
    deadline: Instant,
) -> io::Result<Option<(Vec<u8>, Message)>> {
    let q = Message::parse(query).map_err(|e| io::Error::new(ErrorKind::InvalidInput, e))?;
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Ok(None);
    }
    let mut stream = TcpStream::connect_timeout(&up, left)?;
    let len = u16::try_from(query.len()).map_err(|_| io::Error::from(ErrorKind::InvalidInput))?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(query);
    stream.set_write_timeout(Some(left))?;
    stream.write_all(&framed)?;
    let Some(reply) = read_framed(stopping, &mut stream, deadline) else {
        return Ok(None);
    };
    Ok(Message::parse(&reply)
        .ok()
        .filter(|m| matches(&q, m))
        .map(|m| (reply, m)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::dns::codec::{Header, Question, CLASS_IN, FLAG_QR, TYPE_A, TYPE_AAAA};

    fn msg(id: u16, flags: u16, name: &str, qtype: u16) -> Message {
        Message {
            header: Header {
                id,
                flags,
                qdcount: 1,
                ..Header::default()
            },
            questions: vec![Question {
                name: name.into(),
                qtype,
                qclass: CLASS_IN,
            }],
            ..Message::default()
        }
    }

    #[test]
    fn reply_with_same_id_and_question_matches_in_any_case() {
        assert!(matches(
            &msg(7, 0, "a.test", TYPE_A),
            &msg(7, FLAG_QR, "A.TEST", TYPE_A)
        ));
    }

    #[test]
    fn reply_with_other_id_does_not_match() {
        assert!(!matches(
            &msg(7, 0, "a.test", TYPE_A),
            &msg(8, FLAG_QR, "a.test", TYPE_A)
        ));
    }

    #[test]
    fn reply_to_another_question_does_not_match() {
        assert!(!matches(
            &msg(7, 0, "a.test", TYPE_A),
            &msg(7, FLAG_QR, "b.test", TYPE_A)
        ));
        assert!(!matches(
            &msg(7, 0, "a.test", TYPE_A),
            &msg(7, FLAG_QR, "a.test", TYPE_AAAA)
        ));
    }

    #[test]
    fn client_edns_size_above_our_buffer_is_lowered() {
        let mut m = msg(7, 0, "a.test", TYPE_A);
        m.additional.push(codec::Record {
            name: String::new(),
            rtype: codec::TYPE_OPT,
            class: 65000,
            ttl: 0,
            data: codec::RData::Other(Vec::new()),
            ttl_offset: 0,
        });
        let mut bytes = Vec::new();
        m.encode(&mut bytes).unwrap();
        cap_edns_payload(&mut bytes);
        assert_eq!(Message::parse(&bytes).unwrap().udp_payload_size(), MAX_UDP);
    }

    #[test]
    fn a_query_is_not_a_reply() {
        assert!(!matches(
            &msg(7, 0, "a.test", TYPE_A),
            &msg(7, 0, "a.test", TYPE_A)
        ));
    }
}
