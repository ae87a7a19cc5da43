//! The host side of the guest-agent channel: one connection per sandbox to
//! the QEMU chardev socket behind `org.qemu.guest_agent.0`.
//!
//! A reader thread decodes frames (`wire::Decoder`) and routes them: replies
//! by request id to the caller waiting for them, the `guest-sync-delimited`
//! answer by its value, events and data frames by stream to a per-stream
//! queue, credit grants to the stream's sender. Everything the guest can send
//! is bounded: the host numbers streams and registers each before asking for
//! it, so frames and events for any other number are dropped; a stream that
//! receives more than the credit it was granted is cut off; it takes one
//! terminal event (exit or eof), with its error text cut to `MAX_ERROR`; at
//! most `MAX_STREAMS` streams exist at once; and a message may hold at most
//! `wire::MAX_VALUES` JSON values, so parsing cannot balloon.
//!
//! virtio-serial has no connection: a new client may find stale bytes, and a
//! guest with no agent swallows requests silently. So every (re)connect, every
//! timeout and every "the agent went away" starts with a resync: 0xFF, then
//! `guest-sync-delimited` with a fresh value, discarding answers until that
//! value comes back (qmp-spec.rst, "QGA Synchronization").

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::wire::{self, Decoder, Frame, Message};

/// The largest answer qemu-ga gives is `guest-exec-status` with 16 MiB of
/// stdout and of stderr, base64: about 43 MiB.
const MAX_JSON: usize = 48 << 20;
const MAX_STREAMS: usize = 256;
/// Longest error text kept from a stream's exit or eof event.
const MAX_ERROR: usize = 4096;
/// How long one write may take before the channel is declared stuck.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot connect to the guest agent socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the guest agent did not answer within {0:?} (is it running in the guest?)")]
    Timeout(Duration),
    #[error("the guest agent went away (it is restarted by the guest's init; retry shortly)")]
    Gone,
    #[error("the guest agent channel failed")]
    Io(#[source] std::io::Error),
    #[error("guest agent command {command} failed ({class}): {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("the guest agent broke the protocol: {0}")]
    Protocol(String),
    #[error("{0}")]
    Unsupported(String),
}

/// What arrives on a stream.
#[derive(Debug, PartialEq)]
pub enum Item {
    Data {
        kind: u8,
        payload: Vec<u8>,
    },
    Exit(wire::Exit),
    Eof(wire::TarDone),
    /// The channel broke or the guest overran its credit.
    Broken(String),
}

type Reply = Result<Value, (String, String)>;

struct StreamState {
    tx: Option<Sender<Item>>,
    /// Bytes the guest may still send us.
    recv_credit: i64,
    /// Bytes we may still send the guest.
    send_credit: u64,
    /// Its exit or eof was delivered: nothing but credit may follow.
    finished: bool,
}

#[derive(Default)]
struct Routes {
    pending: HashMap<u64, SyncSender<Reply>>,
    streams: HashMap<u32, StreamState>,
    /// The value of the sync in flight, and who waits for it.
    sync: Option<(u64, SyncSender<()>)>,
    broken: bool,
}

struct Shared {
    routes: Mutex<Routes>,
    credit: Condvar,
    decode_errors: AtomicU64,
}

/// A connection to one guest's agent.
pub struct AgentClient {
    path: PathBuf,
    writer: Mutex<UnixStream>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    /// Stream numbers are ours to give (`ExecArgs::stream`).
    next_stream: AtomicU32,
    /// Set after a timeout or a port close: resync before the next request.
    needs_sync: AtomicBool,
    /// One resync at a time: a second would reset the first.
    sync_lock: Mutex<()>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl AgentClient {
    /// Connects to the chardev socket. Nothing is known about the guest yet:
    /// call `sync` before relying on answers.
    pub fn connect(path: &Path) -> Result<AgentClient, AgentError> {
        let stream = UnixStream::connect(path).map_err(|source| AgentError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        stream
            .set_write_timeout(Some(WRITE_TIMEOUT))
            .map_err(AgentError::Io)?;
        let read_half = stream.try_clone().map_err(AgentError::Io)?;
        let shared = Arc::new(Shared {
            routes: Mutex::new(Routes::default()),
            credit: Condvar::new(),
            decode_errors: AtomicU64::new(0),
        });
        let s = shared.clone();
        let reader = std::thread::Builder::new()
            .name("qga-reader".into())
            .spawn(move || reader_loop(read_half, &s))
            .map_err(AgentError::Io)?;
        Ok(AgentClient {
            path: path.to_path_buf(),
            writer: Mutex::new(stream),
            shared,
            next_id: AtomicU64::new(1),
            // A fresh range per connection, so a number still live in the
            // guest from an earlier connection is not reused at once.
            next_stream: AtomicU32::new((random_u64() as u32) >> 2),
            needs_sync: AtomicBool::new(true),
            sync_lock: Mutex::new(()),
            reader: Some(reader),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Resets the channel: 0xFF, then `guest-sync-delimited` until its value
    /// comes back. Succeeds only when an agent is really answering.
    pub fn sync(&self, timeout: Duration) -> Result<(), AgentError> {
        let _one = lock(&self.sync_lock);
        self.sync_locked(timeout)
    }

    /// Resyncs unless another caller just did.
    fn ensure_synced(&self, timeout: Duration) -> Result<(), AgentError> {
        if !self.needs_sync.load(Ordering::SeqCst) {
            return Ok(());
        }
        let _one = lock(&self.sync_lock);
        if !self.needs_sync.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.sync_locked(timeout)
    }

    fn sync_locked(&self, timeout: Duration) -> Result<(), AgentError> {
        let value = random_u64() >> 12; // qemu-ga takes an int; stay within JSON's exact range
        let (tx, rx) = mpsc::sync_channel(1);
        {
            let mut r = lock(&self.shared.routes);
            if r.broken {
                return Err(AgentError::Gone);
            }
            r.sync = Some((value, tx));
        }
        let mut bytes = vec![wire::SYNC];
        bytes.extend(
            Message::Request {
                execute: "guest-sync-delimited".into(),
                arguments: json!({ "id": value }),
                id: None,
            }
            .encode(),
        );
        self.write(&bytes)?;
        match rx.recv_timeout(timeout) {
            Ok(()) => {
                self.needs_sync.store(false, Ordering::SeqCst);
                Ok(())
            }
            Err(RecvTimeoutError::Timeout) => {
                let mut r = lock(&self.shared.routes);
                if matches!(r.sync, Some((v, _)) if v == value) {
                    r.sync = None;
                }
                self.needs_sync.store(true, Ordering::SeqCst);
                Err(AgentError::Timeout(timeout))
            }
            // The channel failed (fail_all dropped the sender).
            Err(RecvTimeoutError::Disconnected) => {
                self.needs_sync.store(true, Ordering::SeqCst);
                Err(AgentError::Gone)
            }
        }
    }

    /// Runs one command and waits for its answer.
    pub fn call(
        &self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value, AgentError> {
        self.ensure_synced(timeout.min(Duration::from_secs(5)))?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::sync_channel(1);
        {
            let mut r = lock(&self.shared.routes);
            if r.broken {
                return Err(AgentError::Gone);
            }
            r.pending.insert(id, tx);
        }
        let msg = Message::Request {
            execute: command.to_string(),
            arguments,
            id: Some(json!(id)),
        };
        if let Err(e) = self.write(&msg.encode()) {
            lock(&self.shared.routes).pending.remove(&id);
            return Err(e);
        }
        match rx.recv_timeout(timeout) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err((class, desc))) if class == GONE => {
                self.needs_sync.store(true, Ordering::SeqCst);
                let _ = desc;
                Err(AgentError::Gone)
            }
            Ok(Err((class, desc))) => Err(AgentError::Command {
                command: command.to_string(),
                class,
                desc,
            }),
            Err(RecvTimeoutError::Timeout) => {
                lock(&self.shared.routes).pending.remove(&id);
                self.needs_sync.store(true, Ordering::SeqCst);
                Err(AgentError::Timeout(timeout))
            }
            Err(RecvTimeoutError::Disconnected) => Err(AgentError::Gone),
        }
    }

    /// Sends a command whose success has no answer (`guest-shutdown`).
    pub fn send_no_reply(&self, command: &str, arguments: Value) -> Result<(), AgentError> {
        let msg = Message::Request {
            execute: command.to_string(),
            arguments,
            id: None,
        };
        self.write(&msg.encode())
    }

    /// The agent's port closed or reopened in the guest (QMP VSERPORT_CHANGE):
    /// whatever was in flight is lost; answers after a reopen need a resync.
    pub fn port_changed(&self, open: bool) {
        self.needs_sync.store(true, Ordering::SeqCst);
        if !open {
            fail_all(&self.shared, "the guest agent's port closed");
        }
    }

    /// Registers a new stream, before the command that starts it is sent
    /// (its frames may come before the answer), granting the guest
    /// `recv_window` bytes. Returns its number and its queue.
    pub fn open_stream(&self, recv_window: u32) -> Result<(u32, Receiver<Item>), AgentError> {
        let mut r = lock(&self.shared.routes);
        if r.broken {
            return Err(AgentError::Gone);
        }
        if r.streams.len() >= MAX_STREAMS {
            return Err(AgentError::Unsupported(format!(
                "{MAX_STREAMS} commands and copies are already running in this sandbox; \
                 wait for one to end"
            )));
        }
        let id = loop {
            let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
            if id != 0 && !r.streams.contains_key(&id) {
                break id;
            }
        };
        let (tx, rx) = mpsc::channel();
        let st = StreamState {
            tx: Some(tx),
            recv_credit: i64::from(recv_window),
            send_credit: 0,
            finished: false,
        };
        r.streams.insert(id, st);
        Ok((id, rx))
    }

    /// The guest granted `bytes` of input up front (`Started::window`).
    pub fn add_send_credit(&self, stream: u32, bytes: u32) {
        if let Some(st) = lock(&self.shared.routes).streams.get_mut(&stream) {
            st.send_credit += u64::from(bytes);
        }
        self.shared.credit.notify_all();
    }

    /// Forgets a stream (its exit or eof was seen, or the caller gave up):
    /// later frames for it are dropped, and a sender waiting for its credit
    /// wakes and fails.
    pub fn close_stream(&self, stream: u32) {
        lock(&self.shared.routes).streams.remove(&stream);
        self.shared.credit.notify_all();
    }

    /// Asks the agent to stop a stream (kill its command, end its copy), and
    /// forgets it. For a caller that gives up before the stream's end.
    pub fn cancel_stream(&self, stream: u32) {
        self.close_stream(stream);
        let _ = self.send_no_reply(
            wire::CMD_CANCEL,
            json!(wire::StreamCredit { stream, bytes: 0 }),
        );
    }

    /// Tells the agent it may send `bytes` more on `stream` (we consumed them).
    pub fn grant(&self, stream: u32, bytes: u32) -> Result<(), AgentError> {
        {
            let mut r = lock(&self.shared.routes);
            if let Some(st) = r.streams.get_mut(&stream) {
                st.recv_credit += i64::from(bytes);
            }
        }
        let msg = Message::Request {
            execute: wire::CMD_CREDIT.into(),
            arguments: json!(wire::StreamCredit { stream, bytes }),
            id: None,
        };
        self.write(&msg.encode())
    }

    /// Sends `data` on `stream`, waiting for credit as needed.
    pub fn send_data(
        &self,
        stream: u32,
        kind: u8,
        data: &[u8],
        timeout: Duration,
    ) -> Result<(), AgentError> {
        for chunk in data.chunks(wire::MAX_DATA) {
            self.wait_credit(stream, chunk.len() as u64, timeout)?;
            self.write(&wire::encode_data(stream, kind, chunk))?;
        }
        Ok(())
    }

    fn wait_credit(&self, stream: u32, need: u64, timeout: Duration) -> Result<(), AgentError> {
        let deadline = Instant::now() + timeout;
        let mut r = lock(&self.shared.routes);
        loop {
            if r.broken {
                return Err(AgentError::Gone);
            }
            match r.streams.get_mut(&stream) {
                None => return Err(AgentError::Protocol(format!("stream {stream} is gone"))),
                Some(st) if st.send_credit >= need => {
                    st.send_credit -= need;
                    return Ok(());
                }
                Some(_) => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(AgentError::Timeout(timeout));
            }
            r = self
                .shared
                .credit
                .wait_timeout(r, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn write(&self, bytes: &[u8]) -> Result<(), AgentError> {
        let mut w = lock(&self.writer);
        w.write_all(bytes).map_err(|e| {
            // A write cut short leaves half a frame in the channel.
            self.needs_sync.store(true, Ordering::SeqCst);
            AgentError::Io(e)
        })
    }

    /// Messages the agent sent that could not be decoded (for diagnostics).
    pub fn decode_errors(&self) -> u64 {
        self.shared.decode_errors.load(Ordering::Relaxed)
    }
}

impl Drop for AgentClient {
    fn drop(&mut self) {
        let _ = lock(&self.writer).shutdown(std::net::Shutdown::Both);
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
    }
}

/// The error class the reader gives to requests it fails itself.
const GONE: &str = "agentlab:gone";

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        return t ^ u64::from(std::process::id());
    }
    u64::from_ne_bytes(b)
}

fn fail_all(shared: &Shared, why: &str) {
    let mut r = lock(&shared.routes);
    for (_, tx) in r.pending.drain() {
        let _ = tx.try_send(Err((GONE.into(), why.into())));
    }
    r.sync = None;
    for (_, st) in r.streams.drain() {
        if let Some(tx) = st.tx {
            let _ = tx.send(Item::Broken(why.into()));
        }
    }
    shared.credit.notify_all();
}

fn reader_loop(mut stream: UnixStream, shared: &Shared) {
    let mut decoder = Decoder::new(MAX_JSON);
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        for frame in decoder.by_ref() {
            match frame {
                Ok(f) => route(shared, f),
                Err(e) => {
                    shared.decode_errors.fetch_add(1, Ordering::Relaxed);
                    crate::debug!("qga: {e}");
                }
            }
        }
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => decoder.push(&buf[..n]),
            // A signal interrupted the read; read again.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    fail_all(shared, "the guest agent channel closed");
    lock(&shared.routes).broken = true;
    shared.credit.notify_all();
}

fn route(shared: &Shared, frame: Frame) {
    match frame {
        // The agent's 0xFF precedes its sync answer; nothing to do.
        Frame::Sync => {}
        Frame::Data {
            chan,
            kind,
            payload,
        } => route_data(shared, chan, kind, payload),
        Frame::Json(bytes) => match Message::parse(&bytes) {
            Ok(m) => route_message(shared, m),
            Err(e) => {
                shared.decode_errors.fetch_add(1, Ordering::Relaxed);
                crate::debug!("qga: {e}");
            }
        },
    }
}

fn route_data(shared: &Shared, chan: u32, kind: u8, payload: Vec<u8>) {
    let mut r = lock(&shared.routes);
    // Not a stream we opened (or one already closed): nobody to give it to.
    let Some(st) = r.streams.get_mut(&chan).filter(|st| !st.finished) else {
        crate::debug!(
            "qga: dropped {} bytes for stream {chan}, not open",
            payload.len()
        );
        return;
    };
    st.recv_credit -= payload.len() as i64;
    if st.recv_credit < 0 {
        // More than we allowed: the guest ignores flow control. Cut it off
        // rather than buffer without bound.
        if let Some(tx) = st.tx.take() {
            let _ = tx.send(Item::Broken(format!("stream {chan} overran its credit")));
        }
        return;
    }
    if let Some(tx) = &st.tx {
        let _ = tx.send(Item::Data { kind, payload });
    }
}

fn route_message(shared: &Shared, m: Message) {
    let mut r = lock(&shared.routes);
    match m {
        Message::Return { value, id } => {
            if let Some(id) = id.as_ref().and_then(Value::as_u64) {
                if let Some(tx) = r.pending.remove(&id) {
                    let _ = tx.try_send(Ok(value));
                }
                return;
            }
            // No id: the answer to guest-sync-delimited, or stale.
            let matches = matches!(&r.sync, Some((want, _)) if value.as_u64() == Some(*want));
            if matches {
                if let Some((_, tx)) = r.sync.take() {
                    let _ = tx.try_send(());
                }
            }
        }
        Message::Error { class, desc, id } => {
            if let Some(tx) = id
                .as_ref()
                .and_then(Value::as_u64)
                .and_then(|id| r.pending.remove(&id))
            {
                let _ = tx.try_send(Err((class, desc)));
            }
        }
        Message::Event { name, data } => route_event(&mut r, shared, &name, data),
        Message::Request { .. } => {}
    }
}

fn route_event(r: &mut Routes, shared: &Shared, name: &str, data: Value) {
    let stream = data["stream"].as_u64().and_then(|s| u32::try_from(s).ok());
    // Late events of a stream we gave up on land here, as do made-up ones.
    let Some(st) = stream.and_then(|s| r.streams.get_mut(&s)) else {
        return;
    };
    let item = match name {
        wire::EVENT_CREDIT => {
            let bytes = data["bytes"].as_u64().unwrap_or(0).min(u64::from(u32::MAX));
            st.send_credit = st.send_credit.saturating_add(bytes);
            shared.credit.notify_all();
            return;
        }
        wire::EVENT_EXIT => serde_json::from_value::<wire::Exit>(data)
            .ok()
            .map(|mut e| {
                e.error = e.error.map(cut_error);
                Item::Exit(e)
            }),
        wire::EVENT_EOF => serde_json::from_value::<wire::TarDone>(data)
            .ok()
            .map(|mut d| {
                d.error = d.error.map(cut_error);
                Item::Eof(d)
            }),
        _ => None,
    };
    if let (Some(item), Some(tx), false) = (item, &st.tx, st.finished) {
        st.finished = true;
        let _ = tx.send(item);
    }
}

/// Guest-written text kept in a record or shown to a user: at most
/// `MAX_ERROR` bytes, cut on a character boundary.
pub fn cut_error(mut s: String) -> String {
    if s.len() > MAX_ERROR {
        let mut end = MAX_ERROR;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake agent on the other end of a socketpair-like Unix socket.
    fn pair() -> (AgentClient, UnixStream, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "agentlab-qgac-{}-{}",
            std::process::id(),
            random_u64()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("qga.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let client = AgentClient::connect(&sock).unwrap();
        let (guest, _) = listener.accept().unwrap();
        (client, guest, dir)
    }

    fn read_message(guest: &mut UnixStream, d: &mut Decoder) -> Frame {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(f) = d.next() {
                return f.unwrap();
            }
            let n = guest.read(&mut buf).unwrap();
            d.push(&buf[..n]);
        }
    }

    #[test]
    fn sync_discards_stale_answers_until_its_value_returns() {
        let (client, mut guest, dir) = pair();
        let t = std::thread::spawn(move || client.sync(Duration::from_secs(5)).map(|_| client));
        let mut d = Decoder::new(1 << 20);
        assert_eq!(read_message(&mut guest, &mut d), Frame::Sync);
        let Frame::Json(req) = read_message(&mut guest, &mut d) else {
            panic!()
        };
        let Message::Request { arguments, .. } = Message::parse(&req).unwrap() else {
            panic!()
        };
        guest.write_all(b"{\"return\": 12345}\xff").unwrap();
        guest
            .write_all(
                &Message::Return {
                    value: arguments["id"].clone(),
                    id: None,
                }
                .encode(),
            )
            .unwrap();
        assert!(t.join().unwrap().is_ok());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn silent_guest_times_out() {
        let (client, _guest, dir) = pair();
        let err = client.sync(Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, AgentError::Timeout(_)));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn replies_route_by_id_even_out_of_order() {
        let (client, mut guest, dir) = pair();
        client.needs_sync.store(false, Ordering::SeqCst);
        let client = Arc::new(client);
        let c1 = client.clone();
        let a = std::thread::spawn(move || c1.call("a", Value::Null, Duration::from_secs(5)));
        let mut d = Decoder::new(1 << 20);
        let Frame::Json(first) = read_message(&mut guest, &mut d) else {
            panic!()
        };
        let c2 = client.clone();
        let b = std::thread::spawn(move || c2.call("b", Value::Null, Duration::from_secs(5)));
        let Frame::Json(second) = read_message(&mut guest, &mut d) else {
            panic!()
        };
        let id = |raw: &[u8]| match Message::parse(raw).unwrap() {
            Message::Request { id, .. } => id,
            _ => panic!(),
        };
        guest
            .write_all(
                &Message::Return {
                    value: json!("B"),
                    id: id(&second),
                }
                .encode(),
            )
            .unwrap();
        guest
            .write_all(
                &Message::Return {
                    value: json!("A"),
                    id: id(&first),
                }
                .encode(),
            )
            .unwrap();
        assert_eq!(a.join().unwrap().unwrap(), json!("A"));
        assert_eq!(b.join().unwrap().unwrap(), json!("B"));
        let _ = std::fs::remove_dir_all(dir);
    }

    fn stream_count(client: &AgentClient) -> usize {
        lock(&client.shared.routes).streams.len()
    }

    fn settle() {
        std::thread::sleep(Duration::from_millis(100));
    }

    #[test]
    fn data_before_the_answer_is_kept_for_the_opened_stream() {
        let (client, mut guest, dir) = pair();
        let (id, rx) = client.open_stream(wire::DEFAULT_WINDOW).unwrap();
        guest
            .write_all(&wire::encode_data(id, wire::kind::STDOUT, b"early"))
            .unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            Item::Data {
                kind: 1,
                payload: b"early".to_vec()
            }
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A guest sending events and data for numbers nobody opened made the
    /// host keep a queue for each, unbounded and never read.
    #[test]
    fn frames_and_events_for_streams_never_opened_are_dropped() {
        let (client, mut guest, dir) = pair();
        for s in 0..300u32 {
            guest
                .write_all(&wire::encode_data(s, wire::kind::STDOUT, &[0u8; 1024]))
                .unwrap();
            let ev = Message::Event {
                name: wire::EVENT_EXIT.into(),
                data: json!({"stream": s, "error": "x".repeat(10_000)}),
            };
            guest.write_all(&ev.encode()).unwrap();
        }
        settle();
        assert_eq!(stream_count(&client), 0);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Late exit events re-created closed streams; after 256 of them a new
    /// command's output and exit were dropped and its exec hung forever.
    #[test]
    fn closed_streams_stay_closed_and_new_ones_still_work() {
        let (client, mut guest, dir) = pair();
        for _ in 0..300 {
            let (id, _rx) = client.open_stream(wire::DEFAULT_WINDOW).unwrap();
            client.close_stream(id);
            let ev = Message::Event {
                name: wire::EVENT_EXIT.into(),
                data: json!({"stream": id, "exitcode": 0}),
            };
            guest.write_all(&ev.encode()).unwrap();
        }
        settle();
        assert_eq!(stream_count(&client), 0);
        let (id, rx) = client.open_stream(wire::DEFAULT_WINDOW).unwrap();
        guest
            .write_all(&wire::encode_data(id, wire::kind::STDOUT, b"hi"))
            .unwrap();
        let ev = Message::Event {
            name: wire::EVENT_EXIT.into(),
            data: json!({"stream": id, "exitcode": 3}),
        };
        guest.write_all(&ev.encode()).unwrap();
        assert!(matches!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            Item::Data { .. }
        ));
        let Item::Exit(exit) = rx.recv_timeout(Duration::from_secs(5)).unwrap() else {
            panic!("expected the exit")
        };
        assert_eq!(exit.exitcode, Some(3));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_stream_takes_one_exit_with_its_error_text_cut() {
        let (client, mut guest, dir) = pair();
        let (id, rx) = client.open_stream(wire::DEFAULT_WINDOW).unwrap();
        for _ in 0..50 {
            let ev = Message::Event {
                name: wire::EVENT_EXIT.into(),
                data: json!({"stream": id, "error": "é".repeat(1 << 20)}),
            };
            guest.write_all(&ev.encode()).unwrap();
        }
        let Item::Exit(exit) = rx.recv_timeout(Duration::from_secs(5)).unwrap() else {
            panic!("expected the exit")
        };
        assert!(exit.error.unwrap().len() <= MAX_ERROR + '…'.len_utf8());
        settle();
        assert!(rx.try_recv().is_err(), "a second exit was queued");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_guest_overrunning_its_credit_is_cut_off() {
        let (client, mut guest, dir) = pair();
        let (id, rx) = client.open_stream(10).unwrap();
        guest
            .write_all(&wire::encode_data(id, wire::kind::STDOUT, &[1u8; 8]))
            .unwrap();
        guest
            .write_all(&wire::encode_data(id, wire::kind::STDOUT, &[1u8; 8]))
            .unwrap();
        assert!(matches!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            Item::Data { .. }
        ));
        assert!(matches!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            Item::Broken(_)
        ));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn sending_waits_for_credit_from_the_guest() {
        let (client, mut guest, dir) = pair();
        let (id, _rx) = client.open_stream(0).unwrap();
        client.add_send_credit(id, 4);
        let client = Arc::new(client);
        let c = client.clone();
        let t = std::thread::spawn(move || {
            c.send_data(id, wire::kind::STDIN, b"12345678", Duration::from_secs(5))
        });
        settle();
        assert!(!t.is_finished());
        let ev = Message::Event {
            name: wire::EVENT_CREDIT.into(),
            data: json!({"stream": id, "bytes": 4}),
        };
        guest.write_all(&ev.encode()).unwrap();
        assert!(t.join().unwrap().is_ok());
        let _ = std::fs::remove_dir_all(dir);
    }

    /// After `cat big | exec -- true`, the stdin forwarder sat an hour
    /// waiting for credit the guest would never give the ended stream.
    #[test]
    fn closing_a_stream_wakes_a_sender_waiting_for_credit() {
        let (client, _guest, dir) = pair();
        let (id, _rx) = client.open_stream(0).unwrap();
        let client = Arc::new(client);
        let c = client.clone();
        let t = std::thread::spawn(move || {
            c.send_data(id, wire::kind::STDIN, b"x", Duration::from_secs(3600))
        });
        settle();
        client.close_stream(id);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !t.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(t.is_finished(), "the sender still waits");
        assert!(t.join().unwrap().is_err());
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Resyncs racing after a port change reset each other: most callers
    /// failed with a timeout although the agent answered every sync.
    #[test]
    fn concurrent_callers_share_one_resync() {
        let (client, guest, dir) = pair();
        let client = Arc::new(client);
        let answered = std::thread::spawn(move || answer_everything(guest));
        let callers: Vec<_> = (0..6)
            .map(|_| {
                let c = client.clone();
                std::thread::spawn(move || {
                    c.call("guest-ping", Value::Null, Duration::from_secs(5))
                })
            })
            .collect();
        for c in callers {
            c.join().unwrap().unwrap();
        }
        drop(client);
        let syncs = answered.join().unwrap();
        assert_eq!(syncs, 1, "one resync serves every caller");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A fake agent: echoes syncs, answers other requests with `{}`; returns
    /// how many syncs it saw once the host hangs up.
    fn answer_everything(mut guest: UnixStream) -> usize {
        let mut d = Decoder::new(1 << 20);
        let mut buf = [0u8; 4096];
        let mut syncs = 0;
        loop {
            for f in d.by_ref() {
                let Ok(Frame::Json(j)) = f else { continue };
                let Ok(Message::Request {
                    execute,
                    arguments,
                    id,
                }) = Message::parse(&j)
                else {
                    continue;
                };
                let value = if execute == "guest-sync-delimited" {
                    syncs += 1;
                    arguments["id"].clone()
                } else {
                    json!({})
                };
                let _ = guest.write_all(&Message::Return { value, id }.encode());
            }
            match guest.read(&mut buf) {
                Ok(0) | Err(_) => return syncs,
                Ok(n) => d.push(&buf[..n]),
            }
        }
    }

    #[test]
    fn closed_channel_fails_pending_calls_as_gone() {
        let (client, guest, dir) = pair();
        client.needs_sync.store(false, Ordering::SeqCst);
        let client = Arc::new(client);
        let c = client.clone();
        let t =
            std::thread::spawn(move || c.call("guest-ping", Value::Null, Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(100));
        drop(guest);
        assert!(matches!(t.join().unwrap(), Err(AgentError::Gone)));
        let _ = std::fs::remove_dir_all(dir);
    }
}
