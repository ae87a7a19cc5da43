//! The API server: one mio loop over the listening socket and every client
//! connection. It only moves bytes and parses requests; handlers run on
//! worker threads and hand their reply back through a channel and the
//! loop's waker, so a slow operation (booting a VM) never stalls another
//! client. Defences against bad clients:
//! - a request head over 16 KiB (431) or body over 1 MiB (413) is refused
//!   before it is read in full; malformed requests get 400;
//! - a request that is not complete 10 s after its first byte gets 408;
//! - an idle keep-alive connection is closed after 60 s;
//! - a streaming client that lets 8 MiB of output pile up is dropped;
//! - at most 64 requests are handled at once (503 beyond), and at most
//!   1024 connections are open.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{UnixListener, UnixStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use super::http::{self, Limits, Request, Response};
use super::routes::{self, Reply};
use super::streaming;
use crate::daemon::bus::BusItem;
use crate::daemon::manager::Manager;

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const SIGNALS: Token = Token(2);
const FIRST_CONN: usize = 16;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_PENDING_OUTPUT: usize = 8 << 20;
const MAX_WORKERS: usize = 64;
const MAX_CONNS: usize = 1024;
/// Streaming sessions (exec, cp, console) at once, each on its own thread.
const MAX_HANDED_OFF: usize = 256;

/// Stops a running server from another thread.
#[derive(Clone)]
pub struct Shutdown {
    flag: Arc<AtomicBool>,
    waker: Arc<Waker>,
}

impl Shutdown {
    pub fn trigger(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }
}

enum Phase {
    Reading,
    Working,
    Streaming {
        live: Receiver<BusItem>,
        after_event: u64,
    },
    Closing,
    /// A streaming route took the request: the connection leaves the loop
    /// for a worker of its own (see `hand_off`).
    HandOff(Request),
}

struct Conn {
    stream: UnixStream,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    phase: Phase,
    keep_alive: bool,
    /// When the first byte of the current request arrived.
    request_started: Option<Instant>,
    last_io: Instant,
    /// Distinguishes this connection from a later one reusing its token.
    serial: u64,
    token: Token,
    /// The client shut its write side (`nc -N`, `socat` at EOF): answer
    /// what it sent, then close.
    read_closed: bool,
    writable_registered: bool,
}

struct Done {
    token: Token,
    serial: u64,
    reply: Reply,
    keep_alive: bool,
}

pub struct Server {
    poll: Poll,
    listener: UnixListener,
    waker: Arc<Waker>,
    flag: Arc<AtomicBool>,
    signals: Option<nix::sys::signalfd::SignalFd>,
}

impl Server {
    /// Takes a bound listener (tests bind their own). With `signals`, the
    /// signals in that signalfd (SIGTERM, SIGINT, SIGHUP, blocked by the
    /// caller) end the loop.
    pub fn new(
        listener: std::os::unix::net::UnixListener,
        signals: Option<nix::sys::signalfd::SignalFd>,
    ) -> io::Result<Server> {
        listener.set_nonblocking(true)?;
        let poll = Poll::new()?;
        let mut listener = UnixListener::from_std(listener);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        if let Some(sfd) = &signals {
            use std::os::fd::AsRawFd;
            poll.registry().register(
                &mut SourceFd(&sfd.as_raw_fd()),
                SIGNALS,
                Interest::READABLE,
            )?;
        }
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        Ok(Server {
            poll,
            listener,
            waker,
            flag: Arc::new(AtomicBool::new(false)),
            signals,
        })
    }

    pub fn shutdown_handle(&self) -> Shutdown {
        Shutdown {
            flag: self.flag.clone(),
            waker: self.waker.clone(),
        }
    }

    pub fn waker(&self) -> Arc<Waker> {
        self.waker.clone()
    }

    /// Serves until shut down. `tick` runs about once a second on the loop
    /// thread and must not block (it should hand work to a thread).
    pub fn run(
        mut self,
        manager: Arc<Manager>,
        socket_label: String,
        mut tick: impl FnMut(),
    ) -> io::Result<()> {
        let (done_tx, done_rx) = mpsc::channel::<Done>();
        let busy = Arc::new(AtomicUsize::new(0));
        let mut conns: HashMap<Token, Conn> = HashMap::new();
        let mut next_token = FIRST_CONN;
        let mut serial = 0u64;
        let mut events = Events::with_capacity(256);
        let limits = Limits::default();
        let mut last_tick = Instant::now();
        let socket_label = Arc::new(socket_label);
        let waker = self.waker.clone();
        let handed_off = Arc::new(AtomicUsize::new(0));
        let ctx = Ctx {
            manager: &manager,
            handed_off: &handed_off,
            socket: &socket_label,
            done_tx: &done_tx,
            busy: &busy,
            waker: &waker,
            limits: &limits,
        };
        while !self.flag.load(Ordering::SeqCst) {
            match self
                .poll
                .poll(&mut events, Some(Duration::from_millis(500)))
            {
                Ok(()) => {}
                // A signal interrupted the wait; nothing to do but wait again.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(&mut conns, &mut next_token, &mut serial),
                    WAKER => {}
                    SIGNALS => self.on_signal(),
                    token => {
                        if let Some(conn) = conns.get_mut(&token) {
                            on_io(token, conn, ev, &ctx);
                        }
                    }
                }
            }
            while let Ok(d) = done_rx.try_recv() {
                if let Some(conn) = conns.get_mut(&d.token).filter(|c| c.serial == d.serial) {
                    deliver(conn, d.reply, d.keep_alive);
                    advance(d.token, conn, &ctx);
                }
            }
            housekeeping(&mut conns, self.poll.registry(), &ctx);
            if last_tick.elapsed() >= Duration::from_secs(1) {
                last_tick = Instant::now();
                tick();
            }
        }
        Ok(())
    }

    fn on_signal(&self) {
        if let Some(sfd) = &self.signals {
            if let Ok(Some(info)) = sfd.read_signal() {
                crate::info!(
                    "agentlabd: signal {} received; shutting down (sandboxes keep running)",
                    info.ssi_signo
                );
                self.flag.store(true, Ordering::SeqCst);
            }
        }
    }

    fn accept(&mut self, conns: &mut HashMap<Token, Conn>, next: &mut usize, serial: &mut u64) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    if conns.len() >= MAX_CONNS {
                        crate::warn!("api: {MAX_CONNS} connections open; refusing another");
                        continue;
                    }
                    let token = Token(*next);
                    *next = if *next == usize::MAX {
                        FIRST_CONN
                    } else {
                        *next + 1
                    };
                    *serial += 1;
                    if self
                        .poll
                        .registry()
                        .register(&mut stream, token, Interest::READABLE)
                        .is_err()
                    {
                        continue;
                    }
                    conns.insert(
                        token,
                        Conn {
                            stream,
                            rbuf: Vec::new(),
                            wbuf: Vec::new(),
                            phase: Phase::Reading,
                            keep_alive: false,
                            request_started: None,
                            last_io: Instant::now(),
                            serial: *serial,
                            token,
                            read_closed: false,
                            writable_registered: false,
                        },
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    crate::warn!("api: accept failed: {e}");
                    return;
                }
            }
        }
    }
}

struct Ctx<'a> {
    manager: &'a Arc<Manager>,
    handed_off: &'a Arc<AtomicUsize>,
    socket: &'a Arc<String>,
    done_tx: &'a Sender<Done>,
    busy: &'a Arc<AtomicUsize>,
    waker: &'a Arc<Waker>,
    limits: &'a Limits,
}

/// A connection became readable or writable.
fn on_io(token: Token, conn: &mut Conn, ev: &mio::event::Event, ctx: &Ctx<'_>) {
    if ev.is_readable() || ev.is_read_closed() {
        read_some(conn);
    }
    if ev.is_writable() {
        flush(conn);
    }
    advance(token, conn, ctx);
}

/// After each round: feed streams, enforce timeouts, adjust write interest,
/// and drop connections that are done.
fn housekeeping(conns: &mut HashMap<Token, Conn>, registry: &mio::Registry, ctx: &Ctx<'_>) {
    let leaving: Vec<Token> = conns
        .iter()
        .filter(|(_, c)| matches!(c.phase, Phase::HandOff(_)))
        .map(|(t, _)| *t)
        .collect();
    for t in leaving {
        if let Some(c) = conns.remove(&t) {
            hand_off(c, registry, ctx);
        }
    }
    for conn in conns.values_mut() {
        pump_stream(conn);
    }
    let now = Instant::now();
    conns.retain(|_, c| {
        enforce_timeouts(c, now);
        update_interest(registry, c);
        let keep = !(matches!(c.phase, Phase::Closing) && c.wbuf.is_empty());
        if !keep {
            let _ = registry.deregister(&mut c.stream);
        }
        keep
    });
}

/// Gives a connection to a worker thread of its own, in blocking mode: an
/// exec or console session may last hours and must not tie up the loop or
/// the request workers. A slow or stuck client then stalls only that thread.
fn hand_off(mut conn: Conn, registry: &mio::Registry, ctx: &Ctx<'_>) {
    let _ = registry.deregister(&mut conn.stream);
    let Phase::HandOff(req) = std::mem::replace(&mut conn.phase, Phase::Closing) else {
        return;
    };
    let fd: std::os::fd::OwnedFd = conn.stream.into();
    let stream = std::os::unix::net::UnixStream::from(fd);
    if ctx.handed_off.fetch_add(1, Ordering::SeqCst) >= MAX_HANDED_OFF {
        ctx.handed_off.fetch_sub(1, Ordering::SeqCst);
        let _ = stream.set_nonblocking(false);
        let mut s = stream;
        let _ = s.write_all(
            &Response::error(503, "too many streaming sessions; retry later").encode(false),
        );
        return;
    }
    let (manager, count, leftover) = (ctx.manager.clone(), ctx.handed_off.clone(), conn.rbuf);
    let spawned = std::thread::Builder::new()
        .name("api-stream".into())
        .spawn(move || {
            if stream.set_nonblocking(false).is_ok() {
                streaming::serve(&manager, req, leftover, stream);
            }
            count.fetch_sub(1, Ordering::SeqCst);
        });
    if spawned.is_err() {
        ctx.handed_off.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Reads what the socket has (edge-triggered: until WouldBlock).
fn read_some(conn: &mut Conn) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match conn.stream.read(&mut buf) {
            Ok(0) => {
                // End of the client's input. A stream ends (nobody is left to
                // read it); a request already received is still answered.
                conn.read_closed = true;
                if matches!(conn.phase, Phase::Streaming { .. }) {
                    conn.phase = Phase::Closing;
                    conn.wbuf.clear();
                }
                return;
            }
            Ok(n) => {
                conn.last_io = Instant::now();
                if matches!(conn.phase, Phase::Streaming { .. }) {
                    continue; // nothing is expected from a streaming client
                }
                if conn.rbuf.is_empty() {
                    conn.request_started = Some(Instant::now());
                }
                conn.rbuf.extend_from_slice(&buf[..n]);
                // Never hold more than one maximal request; the parser will refuse it.
                if conn.rbuf.len() > (2 << 20) {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                conn.phase = Phase::Closing;
                conn.wbuf.clear();
                return;
            }
        }
    }
}

fn flush(conn: &mut Conn) {
    while !conn.wbuf.is_empty() {
        match conn.stream.write(&conn.wbuf) {
            Ok(0) => break,
            Ok(n) => {
                conn.wbuf.drain(..n);
                conn.last_io = Instant::now();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                conn.wbuf.clear();
                conn.phase = Phase::Closing;
                return;
            }
        }
    }
}

/// Parses a complete request, if any, and hands it to a worker.
fn advance(token: Token, conn: &mut Conn, ctx: &Ctx<'_>) {
    // Streaming routes (exec, files, console) read their own bodies.
    if matches!(conn.phase, Phase::Reading) && !conn.rbuf.is_empty() {
        if let Ok(Some((req, used))) = http::parse_request_head(&conn.rbuf, ctx.limits) {
            if streaming::takes(&req) {
                conn.rbuf.drain(..used);
                conn.phase = Phase::HandOff(req);
                return;
            }
        }
    }
    if matches!(conn.phase, Phase::Reading) && !conn.rbuf.is_empty() {
        match http::parse_request(&conn.rbuf, ctx.limits) {
            // Incomplete, and no more bytes will come.
            Ok(None) if conn.read_closed => conn.phase = Phase::Closing,
            Ok(None) => {}
            Ok(Some((req, used))) => {
                conn.rbuf.drain(..used);
                conn.request_started = (!conn.rbuf.is_empty()).then(Instant::now);
                dispatch(token, conn, req, ctx);
            }
            Err(e) => {
                crate::debug!("api: bad request: {}", e.message);
                conn.wbuf
                    .extend(Response::error(e.status, &e.message).encode(false));
                conn.rbuf.clear();
                conn.phase = Phase::Closing;
            }
        }
    }
    if matches!(conn.phase, Phase::Reading) && conn.rbuf.is_empty() && conn.read_closed {
        conn.phase = Phase::Closing;
    }
    flush(conn);
}

fn dispatch(token: Token, conn: &mut Conn, req: Request, ctx: &Ctx<'_>) {
    let keep_alive = req.keep_alive;
    if ctx.busy.fetch_add(1, Ordering::SeqCst) >= MAX_WORKERS {
        ctx.busy.fetch_sub(1, Ordering::SeqCst);
        conn.wbuf
            .extend(Response::error(503, "agentlabd is busy; retry shortly").encode(false));
        conn.phase = Phase::Closing;
        return;
    }
    conn.phase = Phase::Working;
    let (manager, socket, tx, busy, waker) = (
        ctx.manager.clone(),
        ctx.socket.clone(),
        ctx.done_tx.clone(),
        ctx.busy.clone(),
        ctx.waker.clone(),
    );
    let serial = conn.serial;
    let spawned = std::thread::Builder::new()
        .name("api-worker".into())
        .spawn(move || {
            crate::debug!("api: {} {}", req.method, req.path);
            let reply = routes::handle(&manager, &req, &socket);
            busy.fetch_sub(1, Ordering::SeqCst);
            let _ = tx.send(Done {
                token,
                serial,
                reply,
                keep_alive,
            });
            let _ = waker.wake();
        });
    if spawned.is_err() {
        ctx.busy.fetch_sub(1, Ordering::SeqCst);
        conn.wbuf.extend(
            Response::error(503, "agentlabd cannot start a worker; retry shortly").encode(false),
        );
        conn.phase = Phase::Closing;
    }
}

fn deliver(conn: &mut Conn, reply: Reply, keep_alive: bool) {
    if matches!(conn.phase, Phase::Closing) {
        return;
    }
    let keep_alive = keep_alive && !conn.read_closed;
    match reply {
        Reply::Whole(resp) => {
            conn.wbuf.extend(resp.encode(keep_alive));
            conn.keep_alive = keep_alive;
            conn.phase = if keep_alive {
                Phase::Reading
            } else {
                Phase::Closing
            };
        }
        Reply::Stream {
            history,
            live,
            after_event,
        } => {
            conn.wbuf
                .extend(http::encode_stream_head(200, "application/x-ndjson"));
            for v in history {
                let mut line = v.to_string().into_bytes();
                line.push(b'\n');
                conn.wbuf.extend(http::encode_chunk(&line));
            }
            conn.phase = Phase::Streaming { live, after_event };
        }
    }
}

/// Moves live bus items into a streaming connection's output.
fn pump_stream(conn: &mut Conn) {
    let Phase::Streaming { live, after_event } = &mut conn.phase else {
        return;
    };
    loop {
        match live.try_recv() {
            Ok(item) => {
                if let BusItem::Event(e) = &item {
                    if e.id <= *after_event {
                        continue;
                    }
                    *after_event = e.id;
                }
                let mut line = serde_json::to_vec(&item).unwrap_or_default();
                line.push(b'\n');
                conn.wbuf.extend(http::encode_chunk(&line));
            }
            Err(mpsc::TryRecvError::Empty) => break,
            Err(mpsc::TryRecvError::Disconnected) => {
                conn.wbuf.extend(http::encode_last_chunk());
                conn.phase = Phase::Closing;
                break;
            }
        }
    }
    if conn.wbuf.len() > MAX_PENDING_OUTPUT {
        crate::warn!("api: dropping a streaming client that stopped reading");
        conn.wbuf.clear();
        conn.phase = Phase::Closing;
        return;
    }
    flush(conn);
}

fn enforce_timeouts(conn: &mut Conn, now: Instant) {
    match conn.phase {
        Phase::Reading => {
            if let Some(t) = conn.request_started {
                if now.duration_since(t) > REQUEST_TIMEOUT {
                    conn.wbuf.extend(
                        Response::error(408, "request not complete within 10 s").encode(false),
                    );
                    conn.rbuf.clear();
                    conn.phase = Phase::Closing;
                    flush(conn);
                }
            } else if now.duration_since(conn.last_io) > IDLE_TIMEOUT {
                conn.phase = Phase::Closing;
            }
        }
        Phase::Closing if now.duration_since(conn.last_io) > REQUEST_TIMEOUT => {
            // A client that will not read its error: give up on it.
            conn.wbuf.clear();
        }
        _ => {}
    }
}

fn update_interest(registry: &mio::Registry, conn: &mut Conn) {
    let want_write = !conn.wbuf.is_empty();
    if want_write != conn.writable_registered {
        let interest = if want_write {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        conn.writable_registered = want_write;
        let _ = registry.reregister(&mut conn.stream, conn.token, interest);
    }
}
