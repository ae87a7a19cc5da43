//! The host side of the guest-agent channel: one connection per sandbox to
//! the QEMU chardev socket behind `org.qemu.guest_agent.0`.
//!
//! A reader thread decodes frames (`wire::Decoder`) and routes them: replies
//! by request id to the caller waiting for them, the `guest-sync-delimited`
//! answer by its value, events and data frames by stream to a per-stream
//! queue, credit grants to the stream's sender. Everything the guest can send
//! is bounded: a stream that receives more than the credit it was granted is
//! cut off, and at most `MAX_STREAMS` streams exist at once.
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::wire::{self, Decoder, Frame, Message};

/// qemu-ga's own token limit is 64 MiB; its largest answers (exec output,
/// file reads) fit in that.
const MAX_JSON: usize = 64 << 20;
const MAX_STREAMS: usize = 256;
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

#[derive(Default)]
struct StreamState {
    tx: Option<Sender<Item>>,
    /// The receiver until the caller that opened the stream picks it up
    /// (data may arrive before the caller has seen the answer).
    rx: Option<Receiver<Item>>,
    /// Bytes the guest may still send us.
    recv_credit: i64,
    /// Bytes we may still send the guest.
    send_credit: u64,
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
    /// Set after a timeout or a port close: resync before the next request.
    needs_sync: AtomicBool,
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
            needs_sync: AtomicBool::new(true),
            reader: Some(reader),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Resets the channel: 0xFF, then `guest-sync-delimited` until its value
    /// comes back. Succeeds only when an agent is really answering.
    pub fn sync(&self, timeout: Duration) -> Result<(), AgentError> {
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
            Err(_) => {
                lock(&self.shared.routes).sync = None;
                self.needs_sync.store(true, Ordering::SeqCst);
                Err(AgentError::Timeout(timeout))
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
        if self.needs_sync.load(Ordering::SeqCst) {
            self.sync(timeout.min(Duration::from_secs(5)))?;
        }
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

    /// Picks up the queue of a stream the agent opened.
    pub fn take_stream(
        &self,
        stream: u32,
        recv_window: u32,
        send_window: u32,
    ) -> Result<Receiver<Item>, AgentError> {
        let mut r = lock(&self.shared.routes);
        let st = r.streams.entry(stream).or_insert_with(new_stream);
        // The stream started with the default window; bytes that arrived
        // before this pickup already count against it.
        st.recv_credit += i64::from(recv_window) - i64::from(wire::DEFAULT_WINDOW);
        st.send_credit += u64::from(send_window);
        st.rx
            .take()
            .ok_or_else(|| AgentError::Protocol(format!("stream {stream} was opened twice")))
    }

    /// Forgets a stream (its exit or eof was seen, or the caller gave up).
    pub fn close_stream(&self, stream: u32) {
        lock(&self.shared.routes).streams.remove(&stream);
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

fn new_stream() -> StreamState {
    let (tx, rx) = mpsc::channel();
    StreamState {
        tx: Some(tx),
        rx: Some(rx),
        recv_credit: i64::from(wire::DEFAULT_WINDOW),
        send_credit: 0,
    }
}

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
    if !r.streams.contains_key(&chan) && r.streams.len() >= MAX_STREAMS {
        return;
    }
    let st = r.streams.entry(chan).or_insert_with(new_stream);
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
    let Some(stream) = stream else { return };
    if !r.streams.contains_key(&stream) && r.streams.len() >= MAX_STREAMS {
        return;
    }
    let st = r.streams.entry(stream).or_insert_with(new_stream);
    match name {
        wire::EVENT_CREDIT => {
            let bytes = data["bytes"].as_u64().unwrap_or(0).min(u64::from(u32::MAX));
            st.send_credit = st.send_credit.saturating_add(bytes);
            shared.credit.notify_all();
        }
        wire::EVENT_EXIT => {
            if let (Some(tx), Ok(exit)) = (&st.tx, serde_json::from_value::<wire::Exit>(data)) {
                let _ = tx.send(Item::Exit(exit));
            }
        }
        wire::EVENT_EOF => {
            if let (Some(tx), Ok(done)) = (&st.tx, serde_json::from_value::<wire::TarDone>(data)) {
                let _ = tx.send(Item::Eof(done));
            }
        }
        _ => {}
    }
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

    #[test]
    fn data_before_the_caller_takes_the_stream_is_kept() {
        let (client, mut guest, dir) = pair();
        guest
            .write_all(&wire::encode_data(9, wire::kind::STDOUT, b"early"))
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let rx = client.take_stream(9, wire::DEFAULT_WINDOW, 0).unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            Item::Data {
                kind: 1,
                payload: b"early".to_vec()
            }
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_guest_overrunning_its_credit_is_cut_off() {
        let (client, mut guest, dir) = pair();
        let rx = client.take_stream(3, 10, 0).unwrap();
        guest
            .write_all(&wire::encode_data(3, wire::kind::STDOUT, &[1u8; 8]))
            .unwrap();
        guest
            .write_all(&wire::encode_data(3, wire::kind::STDOUT, &[1u8; 8]))
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
        let _rx = client.take_stream(4, 0, 4).unwrap();
        let client = Arc::new(client);
        let c = client.clone();
        let t = std::thread::spawn(move || {
            c.send_data(4, wire::kind::STDIN, b"12345678", Duration::from_secs(5))
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(!t.is_finished());
        let ev = Message::Event {
            name: wire::EVENT_CREDIT.into(),
            data: json!({"stream": 4, "bytes": 4}),
        };
        guest.write_all(&ev.encode()).unwrap();
        assert!(t.join().unwrap().is_ok());
        let _ = std::fs::remove_dir_all(dir);
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
