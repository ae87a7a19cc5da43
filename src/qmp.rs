//! QEMU Machine Protocol client (`docs/interop/qmp-spec.rst`).
//!
//! Two halves. The pure half turns one line of JSON into a typed [`Message`]
//! (greeting, return, error, event) and a command into bytes. The socket half,
//! [`Qmp`], connects to a monitor socket, reads the greeting, negotiates
//! `qmp_capabilities`, and then runs a reader thread that routes replies to
//! the caller waiting on that id and hands asynchronous events to a callback
//! (the lifecycle manager). Command ids are integers that only increase.
//!
//! Not here: what the events mean for a sandbox (that is `backend::qemu`).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};

use crate::framing::LineFramer;

/// QMP messages are small; 16 MiB covers `query-qmp-schema` with room to spare.
const MAX_LINE: usize = 16 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Greeting {
    pub version: QemuVersion,
    pub package: String,
    pub capabilities: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
    /// Microseconds since the epoch, from the event's `timestamp`.
    pub timestamp_us: i64,
}

/// QMP error classes (`qapi/error.json`); unknown ones are kept verbatim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotFound,
    DeviceNotActive,
    KvmMissingCap,
    Other(String),
}

impl ErrorClass {
    fn parse(s: &str) -> ErrorClass {
        match s {
            "GenericError" => ErrorClass::GenericError,
            "CommandNotFound" => ErrorClass::CommandNotFound,
            "DeviceNotFound" => ErrorClass::DeviceNotFound,
            "DeviceNotActive" => ErrorClass::DeviceNotActive,
            "KVMMissingCap" => ErrorClass::KvmMissingCap,
            other => ErrorClass::Other(other.to_string()),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    Greeting(Greeting),
    Return {
        id: Option<u64>,
        value: Value,
    },
    Error {
        id: Option<u64>,
        class: ErrorClass,
        desc: String,
    },
    Event(QmpEvent),
}

/// Parses one QMP line. Tolerant of unknown keys (newer QEMU adds them).
pub fn parse_message(line: &[u8]) -> Result<Message, String> {
    let v: Value =
        serde_json::from_slice(line).map_err(|e| format!("invalid JSON from QMP: {e}"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| "QMP message is not a JSON object".to_string())?;
    let id = obj.get("id").and_then(Value::as_u64);
    if let Some(g) = obj.get("QMP") {
        let ver = &g["version"]["qemu"];
        let num = |k: &str| ver[k].as_u64().and_then(|n| u32::try_from(n).ok());
        let version = QemuVersion {
            major: num("major").ok_or("QMP greeting without version")?,
            minor: num("minor").unwrap_or(0),
            micro: num("micro").unwrap_or(0),
        };
        let capabilities = g["capabilities"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        return Ok(Message::Greeting(Greeting {
            version,
            package: g["version"]["package"].as_str().unwrap_or("").to_string(),
            capabilities,
        }));
    }
    if let Some(value) = obj.get("return") {
        return Ok(Message::Return {
            id,
            value: value.clone(),
        });
    }
    if let Some(err) = obj.get("error") {
        return Ok(Message::Error {
            id,
            class: ErrorClass::parse(err["class"].as_str().unwrap_or("GenericError")),
            desc: err["desc"].as_str().unwrap_or("").to_string(),
        });
    }
    if let Some(name) = obj.get("event").and_then(Value::as_str) {
        let ts = &obj["timestamp"];
        let timestamp_us = ts["seconds"].as_i64().unwrap_or(0) * 1_000_000
            + ts["microseconds"].as_i64().unwrap_or(0);
        return Ok(Message::Event(QmpEvent {
            name: name.to_string(),
            data: obj.get("data").cloned().unwrap_or(Value::Null),
            timestamp_us,
        }));
    }
    Err(format!("unrecognised QMP message: {}", truncate(line, 200)))
}

/// `{"execute":NAME,"arguments":ARGS,"id":ID}` plus the line terminator.
pub fn encode_command(id: u64, name: &str, args: Option<&Value>) -> Vec<u8> {
    let mut msg = json!({ "execute": name, "id": id });
    if let Some(a) = args {
        msg["arguments"] = a.clone();
    }
    let mut out = serde_json::to_vec(&msg).expect("a JSON value always serializes");
    out.push(b'\n');
    out
}

fn truncate(b: &[u8], n: usize) -> String {
    String::from_utf8_lossy(&b[..b.len().min(n)]).into_owned()
}

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP socket I/O failed")]
    Io(#[source] std::io::Error),
    #[error("QMP handshake failed: {0}")]
    Handshake(String),
    #[error("QMP command {command} got no answer within {after:?}")]
    Timeout { command: String, after: Duration },
    #[error("QEMU closed the QMP connection")]
    Disconnected,
    #[error("QMP command {command} failed ({class:?}): {desc}")]
    Command {
        command: String,
        class: ErrorClass,
        desc: String,
    },
}

/// What the reader thread reports besides replies.
#[derive(Clone, Debug, PartialEq)]
pub enum Notice {
    Event(QmpEvent),
    /// The socket closed: QEMU exited or is exiting.
    Closed,
}

type Reply = Result<Value, (ErrorClass, String)>;

#[derive(Default)]
struct Pending {
    waiters: HashMap<u64, SyncSender<Reply>>,
    closed: bool,
}

/// A connected, negotiated QMP session.
pub struct Qmp {
    writer: Mutex<UnixStream>,
    pending: Arc<Mutex<Pending>>,
    next_id: AtomicU64,
    greeting: Greeting,
    reader: Option<JoinHandle<()>>,
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities; then events
    /// go to `on_notice` from a reader thread until the socket closes.
    pub fn connect(
        path: &Path,
        timeout: Duration,
        on_notice: Box<dyn FnMut(Notice) + Send>,
    ) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path).map_err(|source| QmpError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(QmpError::Io)?;
        let mut framer = LineFramer::new(MAX_LINE);
        let mut reader = stream.try_clone().map_err(QmpError::Io)?;
        let greeting = match read_message(&mut reader, &mut framer)? {
            Message::Greeting(g) => g,
            other => {
                return Err(QmpError::Handshake(format!(
                    "expected greeting, got {other:?}"
                )))
            }
        };
        let mut writer = stream.try_clone().map_err(QmpError::Io)?;
        writer
            .write_all(&encode_command(0, "qmp_capabilities", None))
            .map_err(QmpError::Io)?;
        loop {
            match read_message(&mut reader, &mut framer)? {
                Message::Return { id: Some(0), .. } => break,
                Message::Error { desc, .. } => return Err(QmpError::Handshake(desc)),
                // Events cannot precede negotiation, but tolerate them.
                _ => continue,
            }
        }
        stream.set_read_timeout(None).map_err(QmpError::Io)?;
        let pending = Arc::new(Mutex::new(Pending::default()));
        let thread_pending = pending.clone();
        let reader = std::thread::Builder::new()
            .name("qmp-reader".into())
            .spawn(move || reader_loop(reader, framer, thread_pending, on_notice))
            .map_err(QmpError::Io)?;
        Ok(Qmp {
            writer: Mutex::new(writer),
            pending,
            next_id: AtomicU64::new(1),
            greeting,
            reader: Some(reader),
        })
    }

    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// Runs one command and waits up to `timeout` for its reply.
    pub fn execute(
        &self,
        command: &str,
        args: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::sync_channel(1);
        {
            let mut p = lock(&self.pending);
            if p.closed {
                return Err(QmpError::Disconnected);
            }
            p.waiters.insert(id, tx);
        }
        let bytes = encode_command(id, command, args.as_ref());
        if let Err(e) = lock(&self.writer).write_all(&bytes) {
            lock(&self.pending).waiters.remove(&id);
            return Err(if e.kind() == std::io::ErrorKind::BrokenPipe {
                QmpError::Disconnected
            } else {
                QmpError::Io(e)
            });
        }
        match rx.recv_timeout(timeout) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err((class, desc))) => Err(QmpError::Command {
                command: command.to_string(),
                class,
                desc,
            }),
            Err(RecvTimeoutError::Timeout) => {
                lock(&self.pending).waiters.remove(&id);
                Err(QmpError::Timeout {
                    command: command.to_string(),
                    after: timeout,
                })
            }
            Err(RecvTimeoutError::Disconnected) => Err(QmpError::Disconnected),
        }
    }

    pub fn is_closed(&self) -> bool {
        lock(&self.pending).closed
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        // Shutting the socket down ends the reader thread's blocking read.
        let _ = lock(&self.writer).shutdown(std::net::Shutdown::Both);
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere must not take QMP down with it; the data stays usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read_message(r: &mut UnixStream, framer: &mut LineFramer) -> Result<Message, QmpError> {
    let mut buf = [0u8; 8192];
    loop {
        match framer.next_line() {
            Ok(Some(line)) => return parse_message(&line).map_err(QmpError::Handshake),
            Ok(None) => {}
            Err(e) => return Err(QmpError::Handshake(e.to_string())),
        }
        match r.read(&mut buf) {
            Ok(0) => return Err(QmpError::Disconnected),
            Ok(n) => framer.push(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(QmpError::Handshake("no greeting from QEMU".into()))
            }
            Err(e) => return Err(QmpError::Io(e)),
        }
    }
}

fn reader_loop(
    mut stream: UnixStream,
    mut framer: LineFramer,
    pending: Arc<Mutex<Pending>>,
    mut on_notice: Box<dyn FnMut(Notice) + Send>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    'read: loop {
        loop {
            match framer.next_line() {
                Ok(Some(line)) => dispatch(&line, &pending, &mut on_notice),
                Ok(None) => break,
                Err(e) => crate::warn!("qmp: {e}"),
            }
        }
        match stream.read(&mut buf) {
            Ok(0) => break 'read,
            Ok(n) => framer.push(&buf[..n]),
            // A signal interrupted the read; nothing was lost, read again.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break 'read,
        }
    }
    {
        let mut p = lock(&pending);
        p.closed = true;
        // Dropping the senders wakes every waiter with Disconnected.
        p.waiters.clear();
    }
    on_notice(Notice::Closed);
}

fn dispatch(line: &[u8], pending: &Mutex<Pending>, on_notice: &mut Box<dyn FnMut(Notice) + Send>) {
    match parse_message(line) {
        Ok(Message::Return {
            id: Some(id),
            value,
        }) => reply(pending, id, Ok(value)),
        Ok(Message::Error {
            id: Some(id),
            class,
            desc,
        }) => reply(pending, id, Err((class, desc))),
        Ok(Message::Event(ev)) => on_notice(Notice::Event(ev)),
        // An error without an id is QEMU's parser resyncing, not a reply.
        Ok(other) => crate::debug!("qmp: ignoring {other:?}"),
        Err(e) => crate::warn!("qmp: {e}"),
    }
}

fn reply(pending: &Mutex<Pending>, id: u64, r: Reply) {
    if let Some(tx) = lock(pending).waiters.remove(&id) {
        let _ = tx.try_send(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_parses_version_and_capabilities() {
        let line = br#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7"}, "capabilities": ["oob"]}}"#;
        let Message::Greeting(g) = parse_message(line).unwrap() else {
            panic!("not a greeting")
        };
        assert_eq!(g.version.to_string(), "7.2.22");
        assert_eq!(g.capabilities, vec!["oob".to_string()]);
    }

    #[test]
    fn return_keeps_its_id() {
        let m = parse_message(br#"{"return": {"status": "running"}, "id": 7}"#).unwrap();
        assert_eq!(
            m,
            Message::Return {
                id: Some(7),
                value: json!({"status":"running"})
            }
        );
    }

    #[test]
    fn error_class_is_typed() {
        let m =
            parse_message(br#"{"error": {"class": "CommandNotFound", "desc": "nope"}, "id": 3}"#)
                .unwrap();
        assert_eq!(
            m,
            Message::Error {
                id: Some(3),
                class: ErrorClass::CommandNotFound,
                desc: "nope".into()
            }
        );
    }

    #[test]
    fn event_timestamp_is_in_microseconds() {
        let m = parse_message(
            br#"{"timestamp": {"seconds": 2, "microseconds": 5}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}"#,
        )
        .unwrap();
        let Message::Event(ev) = m else {
            panic!("not an event")
        };
        assert_eq!(ev.name, "SHUTDOWN");
        assert_eq!(ev.timestamp_us, 2_000_005);
        assert_eq!(ev.data["reason"], "guest-shutdown");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(parse_message(b"\xff\xfe{").is_err());
        assert!(parse_message(b"[1,2]").is_err());
        assert!(parse_message(b"{\"what\":1}").is_err());
    }

    #[test]
    fn unknown_error_class_is_kept() {
        let m = parse_message(br#"{"error": {"class": "NewClass", "desc": "x"}}"#).unwrap();
        assert!(
            matches!(m, Message::Error { class: ErrorClass::Other(c), id: None, .. } if c == "NewClass")
        );
    }

    #[test]
    fn command_encoding_is_one_line_with_id() {
        let bytes = encode_command(5, "query-status", None);
        assert_eq!(bytes.last(), Some(&b'\n'));
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v, json!({"execute": "query-status", "id": 5}));
    }

    #[test]
    fn command_arguments_are_included() {
        let bytes = encode_command(1, "balloon", Some(&json!({"value": 1})));
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["arguments"]["value"], 1);
    }
}
