//! The guest-agent channel's wire format, shared by the host half
//! (`qga::client`) and the guest half (`guest::agent`). Pure: bytes in,
//! frames and typed messages out.
//!
//! The base is qemu-ga's protocol (`qga/qapi-schema.json`, `qmp-spec.rst`
//! "QGA Synchronization"): JSON objects in both directions, `{"execute":…}`
//! requests answered by `{"return":…}` or `{"error":…}`, and a 0xFF byte that
//! resets the peer's parser (the host sends it before `guest-sync-delimited`;
//! the agent sends it before that command's answer). JSON objects are split by
//! balanced braces, not newlines: `virsh qemu-agent-command` sends none.
//!
//! agentlab's agent adds, once it has announced `agentlab-*` commands in
//! `guest-info`:
//! - events, `{"event":NAME,"data":{…}}`, as QMP has them;
//! - binary data frames for stream payloads: `0xFE, chan u32 BE, kind u8,
//!   len u32 BE, payload`. 0xFE can never start or sit inside UTF-8 JSON;
//! - credit-based flow control per stream and direction: a sender may have at
//!   most the credit its receiver granted in flight, so a slow consumer slows
//!   only its own stream and nobody buffers without bound.
//!
//! The same frames carry the daemon↔CLI side of `exec -i`, `cp` and `console`.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Resets the peer's parser (qemu-ga: "the client should send 0xFF").
pub const SYNC: u8 = 0xFF;
/// Starts a binary data frame.
pub const DATA: u8 = 0xFE;
/// 0xFE, chan (4), kind (1), len (4).
pub const DATA_HEADER: usize = 10;
/// Largest payload in one data frame.
pub const MAX_DATA: usize = 64 * 1024;
/// Most JSON values (counted by their separators) one message may hold.
/// Parsed, each costs tens of bytes: `[0,0,…]` filling `max_json` would
/// otherwise cost twenty times its size. The largest real message (a
/// guest's interfaces and addresses) holds a few hundred.
pub const MAX_VALUES: usize = 1 << 16;
/// Credit granted up front to each stream direction.
pub const DEFAULT_WINDOW: u32 = 1 << 20;

/// What a data frame's payload is.
pub mod kind {
    pub const STDIN: u8 = 0;
    pub const STDOUT: u8 = 1;
    pub const STDERR: u8 = 2;
    pub const TAR: u8 = 3;
    pub const CONSOLE: u8 = 4;
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Sync,
    Json(Vec<u8>),
    Data {
        chan: u32,
        kind: u8,
        payload: Vec<u8>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("peer sent a JSON message longer than {max} bytes; skipped to the next sync")]
    JsonTooLong { max: usize },
    #[error("peer sent a JSON message of more than {MAX_VALUES} values; skipped to the next sync")]
    TooManyValues,
    #[error("peer sent a data frame of {len} bytes (at most {MAX_DATA})")]
    DataTooLong { len: usize },
    #[error("peer sent byte {byte:#04x} outside any message")]
    Garbage { byte: u8 },
}

/// Where the scan of a partial JSON object stands (so bytes are looked at once).
#[derive(Debug, Default)]
struct Scan {
    /// Next byte to look at, relative to `Decoder::start`.
    at: usize,
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// `{`, `[`, `,` and `:` seen outside strings.
    values: usize,
}

/// Splits a byte stream into frames. Never panics, never holds more than
/// about `max_json` bytes of one message.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    start: usize,
    max_json: usize,
    scan: Option<Scan>,
    /// After an overlong message: drop everything up to the next SYNC.
    skipping: bool,
}

impl Decoder {
    pub fn new(max_json: usize) -> Decoder {
        Decoder {
            buf: Vec::new(),
            start: 0,
            max_json,
            scan: None,
            skipping: false,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes held that do not yet make a whole frame.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    fn next_frame(&mut self) -> Option<Result<Frame, WireError>> {
        if self.skipping {
            match self.buf[self.start..].iter().position(|&b| b == SYNC) {
                Some(sync) => {
                    self.start += sync;
                    self.skipping = false;
                }
                None => {
                    // Nothing up to here is worth keeping.
                    self.start = self.buf.len();
                    return None;
                }
            }
        }
        if self.scan.is_some() {
            return self.scan_object();
        }
        while self
            .buf
            .get(self.start)
            .is_some_and(|b| b.is_ascii_whitespace())
        {
            self.start += 1;
        }
        let first = *self.buf.get(self.start)?;
        match first {
            SYNC => {
                self.start += 1;
                Some(Ok(Frame::Sync))
            }
            DATA => self.data_frame(),
            b'{' => {
                self.scan = Some(Scan::default());
                self.scan_object()
            }
            byte => {
                self.start += 1;
                Some(Err(WireError::Garbage { byte }))
            }
        }
    }

    fn data_frame(&mut self) -> Option<Result<Frame, WireError>> {
        let avail = &self.buf[self.start..];
        if avail.len() < DATA_HEADER {
            return None;
        }
        let chan = u32::from_be_bytes([avail[1], avail[2], avail[3], avail[4]]);
        let kind = avail[5];
        let len = u32::from_be_bytes([avail[6], avail[7], avail[8], avail[9]]) as usize;
        if len > MAX_DATA {
            // Skip the marker; what follows is garbage until the peer resyncs.
            self.start += 1;
            return Some(Err(WireError::DataTooLong { len }));
        }
        if avail.len() < DATA_HEADER + len {
            return None;
        }
        let payload = avail[DATA_HEADER..DATA_HEADER + len].to_vec();
        self.start += DATA_HEADER + len;
        Some(Ok(Frame::Data {
            chan,
            kind,
            payload,
        }))
    }

    fn scan_object(&mut self) -> Option<Result<Frame, WireError>> {
        let mut scan = self.scan.take().unwrap_or_default();
        let bytes = &self.buf[self.start..];
        while scan.at < bytes.len() {
            let b = bytes[scan.at];
            scan.at += 1;
            if b == SYNC {
                // The peer gave up on this message and resynced.
                self.start += scan.at - 1;
                return self.next_frame();
            }
            if scan.in_string {
                match (scan.escaped, b) {
                    (true, _) => scan.escaped = false,
                    (false, b'\\') => scan.escaped = true,
                    (false, b'"') => scan.in_string = false,
                    _ => {}
                }
                continue;
            }
            if matches!(b, b'{' | b'[' | b',' | b':') {
                scan.values += 1;
                if scan.values > MAX_VALUES {
                    self.start += scan.at;
                    self.skipping = true;
                    return Some(Err(WireError::TooManyValues));
                }
            }
            match b {
                b'"' => scan.in_string = true,
                b'{' | b'[' => scan.depth += 1,
                b'}' | b']' => {
                    scan.depth = scan.depth.saturating_sub(1);
                    if scan.depth == 0 {
                        let msg = bytes[..scan.at].to_vec();
                        self.start += scan.at;
                        return Some(Ok(Frame::Json(msg)));
                    }
                }
                _ => {}
            }
        }
        if bytes.len() > self.max_json {
            self.start = self.buf.len();
            self.skipping = true;
            return Some(Err(WireError::JsonTooLong { max: self.max_json }));
        }
        self.scan = Some(scan);
        None
    }
}

/// Frames as far as the bytes pushed so far allow; `None` means "push more".
impl Iterator for Decoder {
    type Item = Result<Frame, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_frame()
    }
}

/// A JSON message and its line terminator (qemu-ga ends its own with "\n").
pub fn encode_json(v: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec(v).expect("a JSON value always serializes");
    out.push(b'\n');
    out
}

pub fn encode_data(chan: u32, kind: u8, payload: &[u8]) -> Vec<u8> {
    debug_assert!(payload.len() <= MAX_DATA);
    let mut out = Vec::with_capacity(DATA_HEADER + payload.len());
    out.push(DATA);
    out.extend_from_slice(&chan.to_be_bytes());
    out.push(kind);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    Request {
        execute: String,
        arguments: Value,
        id: Option<Value>,
    },
    Return {
        value: Value,
        id: Option<Value>,
    },
    Error {
        class: String,
        desc: String,
        id: Option<Value>,
    },
    Event {
        name: String,
        data: Value,
    },
}

impl Message {
    pub fn parse(bytes: &[u8]) -> Result<Message, String> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("invalid JSON: {e}"))?;
        let Value::Object(mut o) = v else {
            return Err("message is not a JSON object".into());
        };
        let id = o.remove("id");
        if let Some(Value::String(execute)) = o.remove("execute") {
            let arguments = o.remove("arguments").unwrap_or(Value::Null);
            return Ok(Message::Request {
                execute,
                arguments,
                id,
            });
        }
        if let Some(value) = o.remove("return") {
            return Ok(Message::Return { value, id });
        }
        if let Some(err) = o.remove("error") {
            return Ok(Message::Error {
                class: err["class"].as_str().unwrap_or("GenericError").to_string(),
                desc: err["desc"].as_str().unwrap_or("").to_string(),
                id,
            });
        }
        if let Some(Value::String(name)) = o.remove("event") {
            let data = o.remove("data").unwrap_or(Value::Null);
            return Ok(Message::Event { name, data });
        }
        Err("message is neither a request, a reply nor an event".into())
    }

    pub fn encode(&self) -> Vec<u8> {
        let with_id = |mut v: Value, id: &Option<Value>| {
            if let Some(id) = id {
                v["id"] = id.clone();
            }
            v
        };
        let v = match self {
            Message::Request {
                execute,
                arguments,
                id,
            } => {
                let mut v = json!({ "execute": execute });
                if !arguments.is_null() {
                    v["arguments"] = arguments.clone();
                }
                with_id(v, id)
            }
            Message::Return { value, id } => with_id(json!({ "return": value }), id),
            Message::Error { class, desc, id } => {
                with_id(json!({ "error": { "class": class, "desc": desc } }), id)
            }
            Message::Event { name, data } => json!({ "event": name, "data": data }),
        };
        encode_json(&v)
    }
}

// ---- agentlab extension commands and events -------------------------------

pub const CMD_EXEC: &str = "agentlab-exec";
pub const CMD_CREDIT: &str = "agentlab-credit";
pub const CMD_STDIN_CLOSE: &str = "agentlab-stdin-close";
pub const CMD_RESIZE: &str = "agentlab-resize";
pub const CMD_SIGNAL: &str = "agentlab-signal";
pub const CMD_TAR_OUT: &str = "agentlab-tar-out";
pub const CMD_TAR_IN: &str = "agentlab-tar-in";
pub const CMD_TAR_IN_END: &str = "agentlab-tar-in-end";
pub const CMD_CANCEL: &str = "agentlab-cancel";
/// Every extension command; `guest-info` lists them when the agent has them.
pub const EXTENSIONS: &[&str] = &[
    CMD_EXEC,
    CMD_CREDIT,
    CMD_STDIN_CLOSE,
    CMD_RESIZE,
    CMD_SIGNAL,
    CMD_TAR_OUT,
    CMD_TAR_IN,
    CMD_TAR_IN_END,
    CMD_CANCEL,
];

pub const EVENT_EXIT: &str = "agentlab-exit";
pub const EVENT_CREDIT: &str = "agentlab-credit";
pub const EVENT_EOF: &str = "agentlab-eof";

fn default_window() -> u32 {
    DEFAULT_WINDOW
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TtySize {
    pub rows: u16,
    pub cols: u16,
}

/// `agentlab-exec`: run a process with streamed output (and input).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecArgs {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    /// Run on a pseudo-terminal of this size (stdout and stderr merge).
    #[serde(default)]
    pub tty: Option<TtySize>,
    /// Keep stdin open for `kind::STDIN` frames; else it is /dev/null.
    #[serde(default)]
    pub stdin: bool,
    /// The agent kills the process group after this long.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Credit for the output direction.
    #[serde(default = "default_window")]
    pub window: u32,
    /// The stream number to use (the host picks it, so it knows where
    /// frames belong before the answer comes); else the agent picks one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<u32>,
}

/// The answer to `agentlab-exec`, `agentlab-tar-out` and `agentlab-tar-in`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    pub stream: u32,
    #[serde(default)]
    pub pid: Option<u32>,
    /// Credit for the input direction (stdin, tar-in).
    #[serde(default)]
    pub window: u32,
}

/// `agentlab-exit` event: the process ended and all its output was sent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    pub stream: u32,
    #[serde(default)]
    pub exitcode: Option<i32>,
    #[serde(default)]
    pub signal: Option<i32>,
    #[serde(default)]
    pub timed_out: bool,
    /// The process could not be started (command not found, bad user…).
    #[serde(default)]
    pub error: Option<String>,
}

/// `agentlab-credit` both ways, and the stream argument of the small commands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamCredit {
    pub stream: u32,
    #[serde(default)]
    pub bytes: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resize {
    pub stream: u32,
    pub rows: u16,
    pub cols: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalArgs {
    pub stream: u32,
    pub signal: i32,
}

/// `agentlab-tar-out` (stream a tar of `path`) and `agentlab-tar-in`
/// (extract a streamed tar into directory `path`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TarArgs {
    pub path: String,
    #[serde(default = "default_window")]
    pub window: u32,
    /// As in `ExecArgs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<u32>,
}

/// `agentlab-eof` event (tar-out finished) and the answer to tar-in-end.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TarDone {
    pub stream: u32,
    #[serde(default)]
    pub entries: u64,
    #[serde(default)]
    pub bytes: u64,
    #[serde(default)]
    pub error: Option<String>,
}

// ---- qemu-ga commands both halves speak (qga/qapi-schema.json) ------------

/// `guest-exec` arguments.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestExec {
    pub path: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub arg: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(
        rename = "input-data",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub input_data: Option<String>,
    /// `true` (both streams) in every qemu-ga; newer ones also take a mode string.
    #[serde(
        rename = "capture-output",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub capture_output: Option<Value>,
}

/// `guest-exec-status` answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestExecStatus {
    pub exited: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exitcode: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(rename = "out-data", default, skip_serializing_if = "Option::is_none")]
    pub out_data: Option<String>,
    #[serde(rename = "err-data", default, skip_serializing_if = "Option::is_none")]
    pub err_data: Option<String>,
    #[serde(
        rename = "out-truncated",
        default,
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub out_truncated: bool,
    #[serde(
        rename = "err-truncated",
        default,
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub err_truncated: bool,
}

/// `guest-file-read` answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestFileRead {
    pub count: u64,
    #[serde(rename = "buf-b64")]
    pub buf_b64: String,
    pub eof: bool,
}

/// qemu-ga caps one `guest-file-read` at 48 MiB (`GUEST_FILE_READ_COUNT_MAX`).
pub const GUEST_FILE_READ_MAX: u64 = 48 << 20;
/// qemu-ga caps captured exec output at 16 MiB per stream (`GUEST_EXEC_MAX_OUTPUT`).
pub const GUEST_EXEC_MAX_OUTPUT: usize = 16 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(d: &mut Decoder) -> Vec<Result<Frame, WireError>> {
        std::iter::from_fn(|| d.next()).collect()
    }

    #[test]
    fn objects_split_without_newlines() {
        let mut d = Decoder::new(1024);
        d.push(br#"{"execute":"guest-ping"}{"execute":"guest-info"}"#);
        let got = frames(&mut d);
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[0],
            Ok(Frame::Json(br#"{"execute":"guest-ping"}"#.to_vec()))
        );
    }

    #[test]
    fn braces_inside_strings_do_not_count() {
        let mut d = Decoder::new(1024);
        d.push(br#"{"a":"}{\"}"} "#);
        assert_eq!(
            frames(&mut d),
            vec![Ok(Frame::Json(br#"{"a":"}{\"}"}"#.to_vec()))]
        );
    }

    #[test]
    fn partial_object_waits_for_the_rest() {
        let mut d = Decoder::new(1024);
        d.push(br#"{"return": {"pi"#);
        assert_eq!(d.next(), None);
        d.push(br#"d": 4}}"#);
        assert_eq!(
            d.next(),
            Some(Ok(Frame::Json(br#"{"return": {"pid": 4}}"#.to_vec())))
        );
    }

    #[test]
    fn sync_byte_inside_a_partial_object_restarts_parsing() {
        let mut d = Decoder::new(1024);
        d.push(b"{\"stale\": \xff{\"return\": 7}\n");
        assert_eq!(
            frames(&mut d),
            vec![
                Ok(Frame::Sync),
                Ok(Frame::Json(b"{\"return\": 7}".to_vec()))
            ]
        );
    }

    #[test]
    fn data_frames_round_trip_among_json() {
        let mut bytes = encode_json(&json!({"event": "x"}));
        bytes.extend(encode_data(7, kind::STDOUT, b"hello\n"));
        bytes.extend(encode_data(7, kind::STDERR, b""));
        let mut d = Decoder::new(1024);
        d.push(&bytes);
        let got = frames(&mut d);
        assert_eq!(
            got[1],
            Ok(Frame::Data {
                chan: 7,
                kind: kind::STDOUT,
                payload: b"hello\n".to_vec()
            })
        );
        assert_eq!(
            got[2],
            Ok(Frame::Data {
                chan: 7,
                kind: kind::STDERR,
                payload: vec![]
            })
        );
    }

    #[test]
    fn data_frame_split_at_every_byte() {
        let bytes = encode_data(3, kind::TAR, &[9u8; 300]);
        let mut d = Decoder::new(1024);
        let mut out = Vec::new();
        for b in &bytes {
            d.push(std::slice::from_ref(b));
            out.extend(frames(&mut d));
        }
        assert_eq!(
            out,
            vec![Ok(Frame::Data {
                chan: 3,
                kind: kind::TAR,
                payload: vec![9u8; 300]
            })]
        );
    }

    #[test]
    fn oversized_data_frame_is_refused_without_allocating() {
        let mut bytes = vec![DATA, 0, 0, 0, 1, kind::STDOUT];
        bytes.extend((u32::MAX).to_be_bytes());
        let mut d = Decoder::new(1024);
        d.push(&bytes);
        assert_eq!(
            d.next(),
            Some(Err(WireError::DataTooLong {
                len: u32::MAX as usize
            }))
        );
    }

    #[test]
    fn overlong_json_skips_to_the_next_sync() {
        let mut d = Decoder::new(16);
        d.push(br#"{"this object": "never ends and keeps going"#);
        assert_eq!(d.next(), Some(Err(WireError::JsonTooLong { max: 16 })));
        d.push(b"more more}\xff{\"ok\":1}");
        assert_eq!(
            frames(&mut d),
            vec![Ok(Frame::Sync), Ok(Frame::Json(b"{\"ok\":1}".to_vec()))]
        );
    }

    /// A guest sent `{"return":[0,0,0,…]}` of 64 MiB; parsed into a Value it
    /// took the daemon past 1 GiB.
    #[test]
    fn a_message_of_too_many_values_is_refused_before_parsing() {
        let mut d = Decoder::new(64 << 20);
        let mut msg = b"{\"return\":[".to_vec();
        msg.extend(b"0,".repeat(MAX_VALUES));
        msg.extend(b"0]}");
        d.push(&msg);
        assert_eq!(d.next(), Some(Err(WireError::TooManyValues)));
        d.push(b"\xff{\"return\":[1,2,3]}");
        assert_eq!(
            frames(&mut d),
            vec![
                Ok(Frame::Sync),
                Ok(Frame::Json(b"{\"return\":[1,2,3]}".to_vec()))
            ]
        );
        let mut d = Decoder::new(64 << 20);
        let mut fine = b"{\"return\":[".to_vec();
        fine.extend(b"0,".repeat(MAX_VALUES - 10));
        fine.extend(b"0]}");
        d.push(&fine);
        assert!(matches!(d.next(), Some(Ok(Frame::Json(_)))));
    }

    #[test]
    fn skipping_after_an_overlong_message_holds_nothing() {
        let mut d = Decoder::new(16);
        d.push(br#"{"this object": "never ends"#);
        assert_eq!(d.next(), Some(Err(WireError::JsonTooLong { max: 16 })));
        for _ in 0..100 {
            d.push(&[b'x'; 1000]);
            assert_eq!(d.next(), None);
        }
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn garbage_between_messages_is_reported_and_skipped() {
        let mut d = Decoder::new(64);
        d.push(b"x{}");
        assert_eq!(
            frames(&mut d),
            vec![
                Err(WireError::Garbage { byte: b'x' }),
                Ok(Frame::Json(b"{}".to_vec()))
            ]
        );
    }

    #[test]
    fn messages_parse_by_shape() {
        let req =
            Message::parse(br#"{"execute":"guest-sync-delimited","arguments":{"id":5},"id":1}"#)
                .unwrap();
        assert_eq!(
            req,
            Message::Request {
                execute: "guest-sync-delimited".into(),
                arguments: json!({"id":5}),
                id: Some(json!(1))
            }
        );
        let ev = Message::parse(br#"{"event":"agentlab-exit","data":{"stream":2,"exitcode":0}}"#)
            .unwrap();
        assert!(matches!(ev, Message::Event { ref name, .. } if name == EVENT_EXIT));
        let err = Message::parse(br#"{"error":{"class":"CommandNotFound","desc":"x"}}"#).unwrap();
        assert!(matches!(err, Message::Error { ref class, .. } if class == "CommandNotFound"));
    }

    #[test]
    fn messages_round_trip_through_encode() {
        let m = Message::Return {
            value: json!({"pid": 1}),
            id: Some(json!("abc")),
        };
        assert_eq!(Message::parse(&m.encode()).unwrap(), m);
    }

    #[test]
    fn exec_args_default_the_window() {
        let a: ExecArgs = serde_json::from_value(json!({"argv": ["true"]})).unwrap();
        assert_eq!(a.window, DEFAULT_WINDOW);
    }

    #[test]
    fn exec_status_uses_qemu_ga_field_names() {
        let s: GuestExecStatus = serde_json::from_value(
            json!({"exited": true, "exitcode": 3, "out-data": "aGk=", "out-truncated": true}),
        )
        .unwrap();
        assert_eq!(
            (s.exitcode, s.out_data.as_deref(), s.out_truncated),
            (Some(3), Some("aGk="), true)
        );
    }

    #[test]
    fn random_bytes_never_panic_and_stay_bounded() {
        let mut rng = crate::testutil::XorShift(42);
        for _ in 0..2000 {
            let mut d = Decoder::new(256);
            let len = rng.below(600);
            let bytes: Vec<u8> = (0..len)
                .map(|_| match rng.below(6) {
                    0 => b'{',
                    1 => b'}',
                    2 => b'"',
                    3 => SYNC,
                    4 => DATA,
                    _ => rng.next() as u8,
                })
                .collect();
            d.push(&bytes);
            while d.next().is_some() {}
            assert!(d.buffered() <= 600);
        }
    }
}
