//! The resolver's threads: one per UDP and per TCP listen socket, one per
//! open TCP connection, and one per forwarded UDP question, each bounded by
//! a cap (overall and per client) so a flood from one sandbox cannot starve
//! the others. Local answers, denials and cache hits are sent straight from
//! the UDP listener thread; only upstream work gets its own thread.
//!
//! Stopping: listeners are woken by `shutdown(2)` on their sockets; other
//! threads wait in slices of [`SLICE`] and look at the stop flag between.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::cache::{Cache, Key};
use super::codec::{self, Message, Rcode, OPCODE_QUERY};
use super::policy::{self, Decision};
use super::upstream::{read_framed, Upstream, MAX_UDP, SLICE};
use super::{DnsConfig, DnsStats, Policy, Resolved};

/// How long `stop` waits for threads still answering.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// TTL of local answers: short, sandboxes come and go.
const LOCAL_TTL: u32 = 5;

pub struct Server {
    shared: Arc<Shared>,
    udp: Vec<Arc<UdpSocket>>,
    tcp: Vec<Arc<TcpListener>>,
    threads: Vec<JoinHandle<()>>,
}

struct Shared {
    cfg: DnsConfig,
    policy: Arc<dyn Policy>,
    cache: Mutex<Cache>,
    stats: Counters,
    stopping: AtomicBool,
    /// Forwarded UDP questions in flight.
    queries: Permits,
    tcp_conns: Permits,
    /// Worker threads (forwarders and TCP connections) still running.
    workers: (Mutex<usize>, Condvar),
    upstream: Upstream,
}

#[derive(Default)]
struct Counters {
    queries: AtomicU64,
    local: AtomicU64,
    cached: AtomicU64,
    forwarded: AtomicU64,
    refused: AtomicU64,
    denied: AtomicU64,
    servfail: AtomicU64,
    dropped: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Server {
    pub fn spawn(mut cfg: DnsConfig, policy: Arc<dyn Policy>) -> io::Result<Server> {
        cfg.domain = policy::normalize(cfg.domain.trim_start_matches('.'));
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        for addr in &cfg.listen {
            udp.push(Arc::new(UdpSocket::bind(addr)?));
            tcp.push(Arc::new(TcpListener::bind(addr)?));
        }
        let upstream = Upstream::new(cfg.upstream.clone(), cfg.timeout)?;
        let shared = Arc::new(Shared {
            upstream,
            cache: Mutex::new(Cache::new(cfg.cache)),
            queries: Permits::new(cfg.limits.in_flight, cfg.limits.per_client),
            tcp_conns: Permits::new(cfg.limits.tcp_connections, cfg.limits.tcp_per_client),
            cfg,
            policy,
            stats: Counters::default(),
            stopping: AtomicBool::new(false),
            workers: (Mutex::new(0), Condvar::new()),
        });
        let mut threads = Vec::new();
        for sock in &udp {
            let (shared, sock) = (shared.clone(), sock.clone());
            threads.push(named("dns-udp").spawn(move || serve_udp(&shared, &sock))?);
        }
        for listener in &tcp {
            let (shared, listener) = (shared.clone(), listener.clone());
            threads.push(named("dns-tcp").spawn(move || serve_tcp(&shared, &listener))?);
        }
        Ok(Server {
            shared,
            udp,
            tcp,
            threads,
        })
    }

    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.udp
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect()
    }

    pub fn stats(&self) -> DnsStats {
        let c = &self.shared.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DnsStats {
            queries: get(&c.queries),
            local: get(&c.local),
            cached: get(&c.cached),
            forwarded: get(&c.forwarded),
            refused: get(&c.refused),
            denied: get(&c.denied),
            servfail: get(&c.servfail),
            dropped: get(&c.dropped),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // shutdown(2) wakes a thread blocked in recvfrom/accept on Linux,
        // also on an unconnected UDP socket (which reports ENOTCONN, ignored).
        for s in &self.udp {
            let _ = rustix::net::shutdown(&**s, rustix::net::Shutdown::Read);
        }
        for l in &self.tcp {
            let _ = rustix::net::shutdown(&**l, rustix::net::Shutdown::Read);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let (count, done) = &self.shared.workers;
        let guard = count.lock().unwrap_or_else(|e| e.into_inner());
        let _ = done.wait_timeout_while(guard, STOP_GRACE, |n| *n > 0);
    }
}

fn named(name: &str) -> thread::Builder {
    thread::Builder::new().name(name.into())
}

/// Runs `f` on a new worker thread that `Drop for Server` waits for.
fn spawn_worker(shared: &Arc<Shared>, name: &str, f: impl FnOnce(&Shared) + Send + 'static) {
    let (count, _) = &shared.workers;
    *count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    let s = shared.clone();
    let started = named(name).spawn(move || {
        f(&s);
        let (count, done) = &s.workers;
        *count.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        done.notify_all();
    });
    if let Err(e) = started {
        crate::warn!("dns: cannot start a worker thread: {e}");
        *count.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
    }
}

/// Counts of things in flight, overall and per source address.
struct Permits {
    total: usize,
    per_client: usize,
    held: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

struct Permit<'a> {
    permits: &'a Permits,
    ip: IpAddr,
}

impl Permits {
    fn new(total: usize, per_client: usize) -> Permits {
        Permits {
            total,
            per_client,
            held: Mutex::new((0, HashMap::new())),
        }
    }

    /// Takes one for `ip` unless a cap is reached; a [`Permit`] gives it back.
    fn try_acquire(&self, ip: IpAddr) -> bool {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let (total, per) = &mut *held;
        let mine = per.entry(ip).or_insert(0);
        if *total >= self.total || *mine >= self.per_client {
            if *mine == 0 {
                per.remove(&ip);
            }
            return false;
        }
        *mine += 1;
        *total += 1;
        true
    }

    fn release(&self, ip: IpAddr) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let (total, per) = &mut *held;
        *total = total.saturating_sub(1);
        if let Some(n) = per.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                per.remove(&ip);
            }
        }
    }
}

/// Gives back one acquired permit when dropped.
impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.permits.release(self.ip);
    }
}

/// A question that needs more than the listener thread should do.
struct Pending {
    query: Vec<u8>,
    msg: Message,
    key: Key,
    /// The allowlist report to make, for allowlist clients.
    report: Option<Report>,
    /// A cache hit that still has to be reported.
    cached: Option<Vec<u8>>,
}

struct Report {
    vmid: u32,
    ports: Vec<Option<u16>>,
}

enum Step {
    Reply(Vec<u8>),
    Drop,
    Work(Box<Pending>),
}

/// Everything that can be done without waiting: parse, decide, answer
/// locally or from the cache.
fn prepare(shared: &Shared, query: &[u8], src: IpAddr) -> Step {
    let Ok(msg) = Message::parse(query) else {
        bump(&shared.stats.dropped);
        return Step::Drop;
    };
    if msg.header.is_response() {
        bump(&shared.stats.dropped);
        return Step::Drop;
    }
    bump(&shared.stats.queries);
    let reply = |rcode, answers: &[codec::Record]| codec::build_reply(query, &msg, rcode, answers);
    let q = match msg.questions.as_slice() {
        [q] if msg.header.opcode() == OPCODE_QUERY => q.clone(),
        _ => {
            bump(&shared.stats.refused);
            let rcode = if msg.header.opcode() == OPCODE_QUERY {
                Rcode::FormErr
            } else {
                Rcode::NotImp
            };
            return Step::Reply(reply(rcode, &[]));
        }
    };
    let qname = policy::normalize(&q.name);
    let client = shared.policy.client(src);
    let local = |part: &str| shared.policy.local(part);
    let report = match policy::decide(client.as_ref(), &qname, &shared.cfg.domain, local) {
        Decision::Refuse => {
            bump(&shared.stats.refused);
            return Step::Reply(reply(Rcode::Refused, &[]));
        }
        Decision::Deny => {
            bump(&shared.stats.denied);
            return Step::Reply(reply(Rcode::NxDomain, &[]));
        }
        Decision::Local(ip) => {
            bump(&shared.stats.local);
            return Step::Reply(reply(Rcode::NoError, &local_answer(&q, ip)));
        }
        Decision::Forward { report } => report.map(|ports| Report {
            vmid: client.map_or(0, |c| c.vmid),
            ports,
        }),
    };
    let key = Key {
        name: qname,
        qtype: q.qtype,
        qclass: q.qclass,
    };
    let now = Instant::now();
    let cached = shared
        .cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key, query, &msg, now);
    if cached.is_some() {
        bump(&shared.stats.cached);
        if report.is_none() {
            return cached.map_or(Step::Drop, Step::Reply);
        }
    }
    Step::Work(Box::new(Pending {
        query: query.to_vec(),
        msg,
        key,
        report,
        cached,
    }))
}

fn local_answer(q: &codec::Question, ip: IpAddr) -> Vec<codec::Record> {
    let data = match (ip, q.qtype) {
        (IpAddr::V4(a), codec::TYPE_A) => codec::RData::A(a),
        (IpAddr::V6(a), codec::TYPE_AAAA) => codec::RData::Aaaa(a),
        _ => return Vec::new(), // NODATA: the name exists, not with this type
    };
    vec![codec::Record {
        name: q.name.clone(),
        rtype: q.qtype,
        class: codec::CLASS_IN,
        ttl: LOCAL_TTL,
        data,
        ttl_offset: 0,
    }]
}

/// The slow part: ask upstream (unless cached), cache, report, and return
/// the reply bytes with the client's id.
fn finish(shared: &Shared, p: Pending) -> Vec<u8> {
    let (reply, parsed) = match p.cached {
        Some(bytes) => match Message::parse(&bytes) {
            Ok(m) => (bytes, m),
            Err(_) => return codec::build_reply(&p.query, &p.msg, Rcode::ServFail, &[]),
        },
        None => {
            bump(&shared.stats.forwarded);
            let Some((mut bytes, m)) = shared.upstream.forward(&p.query, &shared.stopping) else {
                bump(&shared.stats.servfail);
                return codec::build_reply(&p.query, &p.msg, Rcode::ServFail, &[]);
            };
            let now = Instant::now();
            shared
                .cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(p.key.clone(), &bytes, &m, now);
            codec::set_id(&mut bytes, p.msg.header.id);
            (bytes, m)
        }
    };
    if let Some(report) = &p.report {
        let resolved = resolved(shared, report, &parsed, &p.key.name);
        if !resolved.is_empty() {
            shared.policy.allowed(&resolved);
        }
    }
    reply
}

fn resolved(shared: &Shared, report: &Report, answer: &Message, qname: &str) -> Vec<Resolved> {
    let limits = shared.cfg.cache;
    let mut out = Vec::new();
    for (addr, ttl) in policy::addresses_for(answer, qname) {
        let ttl = Duration::from_secs(u64::from(ttl))
            .clamp(limits.min_ttl, limits.max_ttl.max(limits.min_ttl));
        for &port in &report.ports {
            out.push(Resolved {
                vmid: report.vmid,
                addr,
                ttl,
                port,
                name: qname.to_owned(),
            });
        }
    }
    out
}

fn serve_udp(shared: &Arc<Shared>, sock: &Arc<UdpSocket>) {
    let mut buf = vec![0u8; MAX_UDP];
    while !shared.stopping.load(Ordering::SeqCst) {
        let (len, src) = match sock.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue, // a signal, not a failure
            Err(e) => {
                if !shared.stopping.load(Ordering::SeqCst) {
                    crate::warn!("dns: receiving on {:?}: {e}", sock.local_addr());
                    thread::sleep(SLICE);
                }
                continue;
            }
        };
        let query = &buf[..len];
        match prepare(shared, query, src.ip()) {
            Step::Reply(r) => send_udp(sock, &r, src, query),
            Step::Drop => {}
            Step::Work(p) => {
                if !shared.queries.try_acquire(src.ip()) {
                    bump(&shared.stats.dropped);
                    continue;
                }
                let sock = sock.clone();
                let s = shared.clone();
                spawn_worker(shared, "dns-fwd", move |shared| {
                    // Held for the whole exchange; taken above so a flood is
                    // refused before it costs a thread.
                    let _permit = Permit {
                        permits: &s.queries,
                        ip: src.ip(),
                    };
                    let max = p.msg.udp_payload_size();
                    let question_end = p.msg.question_end;
                    let reply = finish(shared, *p);
                    let reply = fit_udp(reply, max, question_end);
                    let _ = sock.send_to(&reply, src);
                });
            }
        }
    }
}

/// A reply too big for the client's UDP size becomes header + question
/// with TC set, and the client asks again over TCP (RFC 1035 §4.2.1).
fn fit_udp(reply: Vec<u8>, max: usize, question_end: usize) -> Vec<u8> {
    if reply.len() <= max {
        return reply;
    }
    codec::truncate_reply(&reply, question_end).unwrap_or_default()
}

fn send_udp(sock: &UdpSocket, reply: &[u8], to: SocketAddr, query: &[u8]) {
    let (max, qend) = Message::parse(query)
        .map_or((codec::CLASSIC_UDP_SIZE, codec::HEADER_LEN), |m| {
            (m.udp_payload_size(), m.question_end)
        });
    let _ = sock.send_to(&fit_udp(reply.to_vec(), max, qend), to);
}

fn serve_tcp(shared: &Arc<Shared>, listener: &Arc<TcpListener>) {
    while !shared.stopping.load(Ordering::SeqCst) {
        let (stream, src) = match listener.accept() {
            Ok(got) => got,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                if !shared.stopping.load(Ordering::SeqCst) {
                    crate::warn!("dns: accepting on {:?}: {e}", listener.local_addr());
                    thread::sleep(SLICE);
                }
                continue;
            }
        };
        if !shared.tcp_conns.try_acquire(src.ip()) {
            bump(&shared.stats.dropped);
            continue; // dropping the stream closes it
        }
        let s = shared.clone();
        spawn_worker(shared, "dns-tcp-conn", move |shared| {
            let _permit = Permit {
                permits: &s.tcp_conns,
                ip: src.ip(),
            };
            serve_tcp_conn(shared, stream, src.ip());
        });
    }
}

/// Answers length-prefixed queries (RFC 1035 §4.2.2) one after another
/// until the client closes, stays idle too long, or the server stops.
fn serve_tcp_conn(shared: &Shared, mut stream: TcpStream, src: IpAddr) {
    let idle = shared.cfg.limits.tcp_idle;
    loop {
        let deadline = Instant::now() + idle;
        let Some(query) = read_framed(&shared.stopping, &mut stream, deadline) else {
            return;
        };
        let reply = match prepare(shared, &query, src) {
            Step::Reply(r) => r,
            Step::Drop => return,
            Step::Work(p) => finish(shared, *p),
        };
        let Ok(len) = u16::try_from(reply.len()) else {
            return;
        };
        let mut framed = len.to_be_bytes().to_vec();
        framed.extend_from_slice(&reply);
        let _ = stream.set_write_timeout(Some(idle));
        if stream.write_all(&framed).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_client_cap_leaves_room_for_others() {
        let permits = Permits::new(3, 2);
        let a: IpAddr = "10.77.0.2".parse().unwrap();
        let b: IpAddr = "10.77.0.3".parse().unwrap();
        let held = [permits.try_acquire(a), permits.try_acquire(a)];
        let third_a = permits.try_acquire(a);
        let first_b = permits.try_acquire(b);
        permits.release(a);
        let after_release = permits.try_acquire(a);
        assert_eq!(held, [true, true]);
        assert!(!third_a);
        assert!(first_b);
        assert!(after_release);
    }
}
