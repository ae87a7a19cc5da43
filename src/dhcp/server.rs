//! The socket driver: one thread per bridge reads requests on UDP port 67,
//! asks `lease` what to do, tells the [`Directory`], and sends the reply where
//! RFC 2131 §4.1 says. It owns no policy of its own.
//!
//! Replies to a client that has no address yet (no `ciaddr`, broadcast bit
//! clear) go out as a whole Ethernet frame on an `AF_PACKET` socket, addressed
//! to the client's MAC and `yiaddr`. The alternatives are worse: a broadcast
//! would show every sandbox on the bridge another one's address and hostname,
//! and a neighbour entry for `yiaddr` (what dnsmasq does with `SIOCSARP`)
//! leaves kernel state behind that outlives the lease. A frame reaches only
//! that client and changes nothing.
//!
//! Guests control every byte that arrives here, so per-packet work is bounded
//! (one datagram of at most `MAX_MESSAGE` bytes, one directory lookup, one
//! reply), a burst is served in batches so `stop` is never starved, and
//! errors are logged at most once a second.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use etherparse::PacketBuilder;
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};

use super::codec::{Message, MAX_MESSAGE};
use super::lease::{Destination, Leases, Outcome};
use super::{fmt_mac, Directory, LeaseEvent, LeaseInfo, ServerConfig};
use crate::log::{self, Level};
use crate::sys::packet::{self, FrameSender};
use crate::{debug, info, warn};

const SERVER_PORT: u16 = 67;
const CLIENT_PORT: u16 = 68;
const SOCKET: Token = Token(0);
const WAKER: Token = Token(1);
/// Datagrams served before checking for `stop` again.
const BATCH: usize = 64;
/// TTL of frames sent to clients without an address: they are on the bridge.
const LINK_TTL: u8 = 64;

/// Packet counters since the server started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Datagrams read from the socket.
    pub received: u64,
    /// Datagrams that got a reply.
    pub replied: u64,
    /// Datagrams that got none: undecodable, unknown MAC, not for us.
    pub dropped: u64,
    /// Replies the kernel refused to send.
    pub send_errors: u64,
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    replied: AtomicU64,
    dropped: AtomicU64,
    send_errors: AtomicU64,
}

struct Shared {
    leases: Mutex<Leases>,
    counters: Counters,
    stop: AtomicBool,
}

/// A running DHCP server; stopping it (or dropping it) ends its thread.
pub struct DhcpServer {
    shared: Arc<Shared>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl DhcpServer {
    /// Opens the sockets on `cfg.iface` in the calling thread's network
    /// namespace and starts serving from a thread of its own.
    pub fn spawn(cfg: ServerConfig, dir: Arc<dyn Directory>) -> io::Result<DhcpServer> {
        validate(&cfg)?;
        let context = |what: &str| {
            let iface = cfg.iface.clone();
            let what = what.to_owned();
            move |e: io::Error| io::Error::new(e.kind(), format!("dhcp on {iface}: {what}: {e}"))
        };
        let udp =
            packet::udp_on_device(&cfg.iface, SERVER_PORT).map_err(context("bind udp port 67"))?;
        let frames = FrameSender::open(&cfg.iface).map_err(context("open packet socket"))?;
        let own_mac = packet::hw_addr(&cfg.iface).map_err(context("read hardware address"))?;
        let mut udp = UdpSocket::from_std(udp);
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut udp, SOCKET, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let shared = Arc::new(Shared {
            leases: Mutex::new(Leases::new(cfg.clone())),
            counters: Counters::default(),
            stop: AtomicBool::new(false),
        });
        let driver = Driver {
            udp,
            frames,
            own_mac,
            server_ip: cfg.server_ip,
            iface: cfg.iface.clone(),
            dir,
            shared: shared.clone(),
            errors: RateLimit::new(Level::Warn),
            ignored: RateLimit::new(Level::Debug),
        };
        let thread = std::thread::Builder::new()
            .name(format!("dhcp-{}", cfg.iface))
            .spawn(move || driver.run(poll))?;
        info!("dhcp: serving {} as {}", cfg.iface, cfg.server_ip);
        Ok(DhcpServer {
            shared,
            waker,
            thread: Some(thread),
        })
    }

    /// Stops the thread and closes the sockets; returns once both are done.
    /// (Dropping the server does the same; this names the intent.)
    pub fn stop(self) {}

    /// The lease table as the server holds it now.
    pub fn leases(&self) -> Vec<LeaseInfo> {
        let leases = self
            .shared
            .leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        leases.snapshot(SystemTime::now())
    }

    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        Stats {
            received: c.received.load(Ordering::Relaxed),
            replied: c.replied.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            send_errors: c.send_errors.load(Ordering::Relaxed),
        }
    }
}

impl Drop for DhcpServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Refuses what the options cannot carry (one TLV holds 255 bytes).
fn validate(cfg: &ServerConfig) -> io::Result<()> {
    let bad = |msg: String| Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
    if cfg.prefix > 32 {
        return bad(format!(
            "dhcp: prefix /{} is not an IPv4 prefix",
            cfg.prefix
        ));
    }
    if cfg.dns.len() > 63 {
        return bad(format!(
            "dhcp: {} DNS servers, at most 63 fit",
            cfg.dns.len()
        ));
    }
    if cfg.domain.len() > 255 {
        return bad(format!("dhcp: domain {:?} exceeds 255 bytes", cfg.domain));
    }
    if cfg.lease_time < Duration::from_secs(1) {
        return bad("dhcp: lease time under one second".into());
    }
    Ok(())
}

struct Driver {
    udp: UdpSocket,
    frames: FrameSender,
    own_mac: [u8; 6],
    server_ip: Ipv4Addr,
    iface: String,
    dir: Arc<dyn Directory>,
    shared: Arc<Shared>,
    /// Garbage and strangers' requests: a guest can send these at line rate.
    errors: RateLimit,
    ignored: RateLimit,
}

impl Driver {
    fn run(mut self, mut poll: Poll) {
        let mut events = Events::with_capacity(8);
        let mut buf = vec![0u8; MAX_MESSAGE + 1];
        let mut backlog = false;
        while !self.shared.stop.load(Ordering::SeqCst) {
            // A batch that did not drain the socket polls without waiting,
            // so a flood is served in turns with `stop`.
            let timeout = backlog.then_some(Duration::ZERO);
            match poll.poll(&mut events, timeout) {
                Ok(()) => {}
                // A signal landed on this thread; nothing to do but wait again.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("dhcp on {}: poll failed, server stopped: {e}", self.iface);
                    return;
                }
            }
            backlog = self.serve_batch(&mut buf);
        }
        debug!("dhcp on {}: stopped", self.iface);
    }

    /// Serves up to [`BATCH`] datagrams; true if more may be waiting.
    fn serve_batch(&mut self, buf: &mut [u8]) -> bool {
        for _ in 0..BATCH {
            match self.udp.recv_from(buf) {
                Ok((n, from)) => {
                    self.count(|c| &c.received);
                    self.serve(&buf[..n], from);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.errors
                        .log(|| format!("dhcp on {}: recv: {e}", self.iface));
                    return false;
                }
            }
        }
        true
    }

    fn serve(&mut self, datagram: &[u8], from: std::net::SocketAddr) {
        let req = match Message::decode(datagram) {
            Ok(m) => m,
            Err(e) => {
                self.count(|c| &c.dropped);
                let iface = &self.iface;
                self.errors
                    .log(|| format!("dhcp on {iface}: from {from}: {e}"));
                return;
            }
        };
        let binding = req.mac().and_then(|mac| self.dir.lookup(mac));
        let outcome = {
            let mut leases = self
                .shared
                .leases
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            leases.handle(&req, binding.as_ref(), SystemTime::now())
        };
        self.act(outcome, &req);
    }

    fn act(&mut self, outcome: Outcome, req: &Message) {
        if let Some(why) = outcome.ignored {
            let mac = req.mac().map(fmt_mac).unwrap_or_default();
            let (iface, xid) = (&self.iface, req.xid);
            self.ignored
                .log(|| format!("dhcp on {iface}: ignored {mac} xid {xid:#x}: {why}"));
        }
        if let Some(ev) = outcome.event {
            log_event(&self.iface, &ev);
            self.dir.record(ev);
        }
        let Some(reply) = outcome.reply else {
            if outcome.ignored.is_some() {
                self.count(|c| &c.dropped);
            }
            return;
        };
        let mut payload = Vec::with_capacity(576);
        reply.message.encode(&mut payload);
        match self.send(reply.to, &payload) {
            Ok(()) => self.count(|c| &c.replied),
            Err(e) => {
                self.count(|c| &c.send_errors);
                let iface = &self.iface;
                let to = reply.to;
                self.errors
                    .log(|| format!("dhcp on {iface}: send to {to:?}: {e}"));
            }
        }
    }

    fn send(&self, to: Destination, payload: &[u8]) -> io::Result<()> {
        let udp_to = |ip: Ipv4Addr, port| SocketAddrV4::new(ip, port).into();
        match to {
            Destination::Relay(ip) => self.udp.send_to(payload, udp_to(ip, SERVER_PORT))?,
            Destination::Unicast(ip) => self.udp.send_to(payload, udp_to(ip, CLIENT_PORT))?,
            Destination::Broadcast => self
                .udp
                .send_to(payload, udp_to(Ipv4Addr::BROADCAST, CLIENT_PORT))?,
            Destination::Link { mac, ip } => {
                let frame = link_frame(self.own_mac, mac, self.server_ip, ip, payload)?;
                self.frames.send(mac, &frame)?;
                frame.len()
            }
        };
        Ok(())
    }

    fn count(&self, which: impl Fn(&Counters) -> &AtomicU64) {
        which(&self.shared.counters).fetch_add(1, Ordering::Relaxed);
    }
}

/// An Ethernet/IPv4/UDP frame from the server (port 67) to a client (port 68).
pub fn link_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src_ip: Ipv4Addr,
    dst_ip: Ipv4Addr,
    payload: &[u8],
) -> io::Result<Vec<u8>> {
    let builder = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src_ip.octets(), dst_ip.octets(), LINK_TTL)
        .udp(SERVER_PORT, CLIENT_PORT);
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut frame, payload)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    Ok(frame)
}

fn log_event(iface: &str, ev: &LeaseEvent) {
    match ev {
        LeaseEvent::Offered { mac, ip } => {
            debug!("dhcp on {iface}: offer {ip} to {}", fmt_mac(*mac))
        }
        LeaseEvent::Bound { mac, ip, .. } => info!("dhcp on {iface}: {} bound {ip}", fmt_mac(*mac)),
        LeaseEvent::Renewed { mac, ip, .. } => {
            debug!("dhcp on {iface}: {} renewed {ip}", fmt_mac(*mac))
        }
        LeaseEvent::Released { mac, ip } => {
            info!("dhcp on {iface}: {} released {ip}", fmt_mac(*mac))
        }
        LeaseEvent::Declined { mac, ip } => warn!(
            "dhcp on {iface}: {} declined {ip}: another host on the bridge answers ARP for it",
            fmt_mac(*mac)
        ),
        LeaseEvent::Nak { mac, requested } => {
            info!("dhcp on {iface}: NAK to {} for {requested}", fmt_mac(*mac))
        }
    }
}

/// At most one log line a second at `level`; the lines in between are
/// counted and the count rides on the next line.
struct RateLimit {
    level: Level,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    fn new(level: Level) -> RateLimit {
        RateLimit {
            level,
            last: None,
            suppressed: 0,
        }
    }

    fn log(&mut self, line: impl FnOnce() -> String) {
        if !log::enabled(self.level) {
            return;
        }
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return;
        }
        let more = std::mem::take(&mut self.suppressed);
        match more {
            0 => log::write(self.level, format_args!("{}", line())),
            n => log::write(
                self.level,
                format_args!("{} ({n} similar suppressed)", line()),
            ),
        }
        self.last = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_frame_carries_the_payload_to_the_client_mac_and_port() {
        let frame = link_frame(
            [2, 0, 0, 0, 0, 1],
            [0x52, 0x54, 0, 0, 0, 9],
            Ipv4Addr::new(10, 77, 0, 1),
            Ipv4Addr::new(10, 77, 0, 9),
            b"hello",
        )
        .unwrap();
        let p = etherparse::SlicedPacket::from_ethernet(&frame).unwrap();
        let Some(etherparse::LinkSlice::Ethernet2(eth)) = p.link else {
            panic!("no ethernet header")
        };
        assert_eq!(eth.destination(), [0x52, 0x54, 0, 0, 0, 9]);
        let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
            panic!("no ipv4 header")
        };
        assert_eq!(ip.header().destination_addr(), Ipv4Addr::new(10, 77, 0, 9));
        let Some(etherparse::TransportSlice::Udp(udp)) = p.transport else {
            panic!("no udp header")
        };
        assert_eq!((udp.source_port(), udp.destination_port()), (67, 68));
        assert_eq!(udp.payload(), b"hello");
    }

    #[test]
    fn config_with_too_many_dns_servers_is_refused() {
        let cfg = ServerConfig {
            iface: "x".into(),
            server_ip: Ipv4Addr::new(10, 77, 0, 1),
            prefix: 16,
            router: Ipv4Addr::new(10, 77, 0, 1),
            dns: vec![Ipv4Addr::new(10, 77, 0, 1); 64],
            domain: String::new(),
            lease_time: Duration::from_secs(60),
        };
        let e = validate(&cfg).unwrap_err();
        assert!(e.to_string().contains("64 DNS servers"), "{e}");
    }
}
