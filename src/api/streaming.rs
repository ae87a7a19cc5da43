//! Routes that stream: exec, file trees, the serial console.
//!
//! The server loop hands these a connection of their own, in blocking mode,
//! once the request head is in (`server::hand_off`); the handler reads the
//! body itself and writes its answer as it goes, on its own thread, so a
//! long or slow session stalls nobody else. Backpressure is the socket's: a
//! client that reads slowly blocks the handler, which stops taking data from
//! the guest, whose agent then runs out of credit.
//!
//! Two ways to talk to each route:
//! - `Upgrade: agentlab` (what the CLI does): `101 Switching Protocols`, then
//!   the guest-agent wire format in both directions (`qga::wire`): data frames
//!   for stdin/stdout/stderr/tar/console bytes on channel 0, JSON for control
//!   (`agentlab-stdin-close`, `-resize`, `-signal`, `-tar-in-end` from the
//!   client; `agentlab-exit`, `agentlab-eof`, `agentlab-error` events back).
//! - Plain HTTP, for curl: exec answers NDJSON lines (or one JSON document
//!   with `"stream": false`), files come and go as tar bodies.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::http::{self, ChunkedDecoder, Request, Response};
use super::types::{ErrorBody, ExecRequest};
use crate::daemon::manager::{Manager, OpError};
use crate::qga::b64;
use crate::qga::client::AgentError;
use crate::qga::frames::{is_request, FrameReader as Frames};
use crate::qga::session::{ExecSpec, ExitStatus, Output};
use crate::qga::wire::{self, kind, Frame, Message};

/// The exec request body is small JSON.
const MAX_EXEC_BODY: usize = 1 << 20;
/// `"stream": false` exec: output kept per stream unless the request says otherwise.
const DEFAULT_OUTPUT_CAP: usize = 16 << 20;
const MAX_OUTPUT_CAP: usize = 256 << 20;
/// How long a streamed command may print nothing before we look again.
const IDLE: Duration = Duration::from_secs(3600);

/// Whether the route streams (and so takes the connection).
pub fn takes(req: &Request) -> bool {
    matches!(
        (req.method.as_str(), req.path_segments().as_slice()),
        ("POST", ["v1", "sandboxes", _, "exec"])
            | ("GET" | "PUT", ["v1", "sandboxes", _, "files"])
            | ("GET", ["v1", "sandboxes", _, "console"])
    )
}

pub fn serve(m: &Arc<Manager>, req: Request, leftover: Vec<u8>, stream: UnixStream) {
    let mut conn = Conn {
        stream,
        pending: leftover,
        started: false,
        upgraded: wants_upgrade(&req),
    };
    let seg = req.path_segments();
    let id = seg.get(2).copied().unwrap_or("").to_string();
    let r = match (req.method.as_str(), seg.get(3).copied()) {
        ("POST", Some("exec")) => exec(m, &id, &req, &mut conn),
        ("GET", Some("files")) => files_out(m, &id, &req, &mut conn),
        ("PUT", Some("files")) => files_in(m, &id, &req, &mut conn),
        ("GET", Some("console")) => console(m, &id, &req, &mut conn),
        _ => Err(OpError::NotFound(format!(
            "no such route: {} {}",
            req.method, req.path
        ))),
    };
    if let Err(e) = r {
        conn.fail(&e);
    }
    let _ = conn.stream.shutdown(std::net::Shutdown::Both);
}

fn wants_upgrade(req: &Request) -> bool {
    req.header("upgrade").is_some_and(|u| {
        u.split(',')
            .any(|p| p.trim().eq_ignore_ascii_case("agentlab"))
    })
}

/// A handed-off connection: the bytes read past the head, then the socket.
struct Conn {
    stream: UnixStream,
    pending: Vec<u8>,
    started: bool,
    upgraded: bool,
}

impl Conn {
    fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.pending.is_empty() {
            let n = buf.len().min(self.pending.len());
            buf[..n].copy_from_slice(&self.pending[..n]);
            self.pending.drain(..n);
            return Ok(n);
        }
        loop {
            match self.stream.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }

    /// A small `Content-Length` body (the exec request).
    fn small_body(&mut self, req: &Request) -> Result<Vec<u8>, OpError> {
        let len: usize = match req.header("content-length") {
            None => return Ok(Vec::new()),
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| OpError::BadRequest("bad Content-Length".into()))?,
        };
        if len > MAX_EXEC_BODY {
            return Err(OpError::BadRequest(format!(
                "request body over {MAX_EXEC_BODY} bytes"
            )));
        }
        let mut body = vec![0u8; len];
        let mut got = 0;
        while got < len {
            let n = self.read_some(&mut body[got..]).map_err(io_gone)?;
            if n == 0 {
                return Err(OpError::BadRequest("request body cut short".into()));
            }
            got += n;
        }
        Ok(body)
    }

    fn head(&mut self, status: u16, headers: &[(&str, &str)]) -> io::Result<()> {
        let mut h = format!("HTTP/1.1 {status} {}\r\n", http::reason_phrase(status));
        for (k, v) in headers {
            h.push_str(&format!("{k}: {v}\r\n"));
        }
        h.push_str("\r\n");
        self.started = true;
        self.stream.write_all(h.as_bytes())
    }

    fn switch(&mut self) -> io::Result<()> {
        self.head(101, &[("Upgrade", "agentlab"), ("Connection", "Upgrade")])
    }

    fn chunked(&mut self, content_type: &str) -> io::Result<()> {
        self.head(
            200,
            &[
                ("Content-Type", content_type),
                ("Transfer-Encoding", "chunked"),
                ("Connection", "close"),
            ],
        )
    }

    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    fn event(&mut self, name: &str, data: Value) -> io::Result<()> {
        let m = Message::Event {
            name: name.into(),
            data,
        };
        self.stream.write_all(&m.encode())
    }

    /// Reports an error the best way the conversation still allows.
    fn fail(&mut self, e: &OpError) {
        let msg = e.to_string();
        if !self.started {
            let resp = Response::json(e.status(), &json!(ErrorBody { error: msg }));
            let _ = self.stream.write_all(&resp.encode(false));
        } else if self.upgraded {
            let _ = self.event(
                "agentlab-error",
                json!({ "error": msg, "status": e.status() }),
            );
        }
        // A plain chunked body just ends without its last chunk: the client
        // sees a cut transfer, which is what it is.
    }
}

fn io_gone(e: io::Error) -> OpError {
    OpError::BadRequest(format!("client connection failed: {e}"))
}

// ---- exec -----------------------------------------------------------------

fn exec(m: &Arc<Manager>, id: &str, req: &Request, conn: &mut Conn) -> Result<(), OpError> {
    let body = conn.small_body(req)?;
    let r: ExecRequest = serde_json::from_slice(&body)
        .map_err(|e| OpError::BadRequest(format!("invalid request body: {e}")))?;
    let spec = r.to_spec().map_err(OpError::BadRequest)?;
    let input = r
        .input
        .as_deref()
        .map(b64::decode)
        .transpose()
        .map_err(|e| OpError::BadRequest(format!("input: {e}")))?;
    if conn.upgraded {
        return exec_session(m, id, spec, conn);
    }
    let cap = r
        .max_output
        .map_or(DEFAULT_OUTPUT_CAP, |c| (c as usize).min(MAX_OUTPUT_CAP));
    let spec = ExecSpec {
        stdin: input.is_some(),
        tty: None,
        ..spec
    };
    let (mut exec, _busy) = m.exec_start(id, &spec, input.clone())?;
    if exec.streaming() {
        if let Some(data) = input {
            let control = exec.control();
            std::thread::spawn(move || {
                let _ = control.stdin(&data).and_then(|()| control.close_stdin());
            });
        }
    }
    if r.stream.unwrap_or(true) {
        exec_ndjson(&mut exec, conn)
    } else {
        exec_buffered(&mut exec, conn, cap)
    }
}

/// The plain-HTTP client sent all it will; a quiet command is checked on
/// this often for a client that hung up.
const HANGUP_CHECK: Duration = Duration::from_secs(1);

/// The next output of a command whose plain-HTTP client may hang up while it
/// prints nothing: `None` once the client is gone (the command is then
/// cancelled when `exec` drops).
fn next_or_hangup(
    exec: &mut crate::qga::session::Exec,
    conn: &Conn,
) -> Option<Result<Output, AgentError>> {
    loop {
        match exec.next(HANGUP_CHECK) {
            Err(AgentError::Timeout(_)) if peer_hung_up(&conn.stream) => return None,
            Err(AgentError::Timeout(_)) => continue,
            other => return Some(other),
        }
    }
}

/// Whether the other end of `stream` has closed both ways (it exited, or
/// closed the socket). A client that only shut down its sending side
/// (`nc -N`) still waits for the answer: that is RDHUP, not HUP.
fn peer_hung_up(stream: &UnixStream) -> bool {
    use rustix::event::{poll, PollFd, PollFlags};
    let mut fds = [PollFd::new(stream, PollFlags::empty())];
    let zero = rustix::time::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(poll(&mut fds, Some(&zero)), Ok(n) if n > 0)
        && fds[0].revents().intersects(PollFlags::HUP | PollFlags::ERR)
}

/// NDJSON lines: `{"type":"stdout","data":"<base64>"}`…, then `{"type":"exit",…}`.
fn exec_ndjson(exec: &mut crate::qga::session::Exec, conn: &mut Conn) -> Result<(), OpError> {
    conn.chunked("application/x-ndjson").map_err(io_gone)?;
    loop {
        let (line, last) = match next_or_hangup(exec, conn) {
            None => return Ok(()),
            Some(Ok(Output::Stdout(d))) => {
                (json!({"type": "stdout", "data": b64::encode(&d)}), false)
            }
            Some(Ok(Output::Stderr(d))) => {
                (json!({"type": "stderr", "data": b64::encode(&d)}), false)
            }
            Some(Ok(Output::Exit(st))) => (exit_json(&st), true),
            Some(Err(e)) => return Err(OpError::Unavailable(crate::log::error_chain(&e))),
        };
        let mut bytes = line.to_string().into_bytes();
        bytes.push(b'\n');
        if conn.send(&http::encode_chunk(&bytes)).is_err() {
            return Ok(()); // the client is gone; dropping `exec` cancels the command
        }
        if last {
            let _ = conn.send(&http::encode_last_chunk());
            return Ok(());
        }
    }
}

/// One JSON document at the end, each stream cut at `cap` with a marker.
fn exec_buffered(
    exec: &mut crate::qga::session::Exec,
    conn: &mut Conn,
    cap: usize,
) -> Result<(), OpError> {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let (mut out_cut, mut err_cut) = (false, false);
    let keep = |buf: &mut Vec<u8>, cut: &mut bool, d: Vec<u8>| {
        let room = cap.saturating_sub(buf.len());
        buf.extend_from_slice(&d[..d.len().min(room)]);
        *cut |= d.len() > room;
    };
    let status = loop {
        match next_or_hangup(exec, conn) {
            None => return Ok(()),
            Some(Ok(Output::Stdout(d))) => keep(&mut out, &mut out_cut, d),
            Some(Ok(Output::Stderr(d))) => keep(&mut err, &mut err_cut, d),
            Some(Ok(Output::Exit(st))) => break st,
            Some(Err(e)) => return Err(OpError::Unavailable(crate::log::error_chain(&e))),
        }
    };
    let marker = |mut b: Vec<u8>, cut: bool| {
        if cut {
            b.extend_from_slice(
                format!("\n[agentlab: output truncated after {cap} bytes]\n").as_bytes(),
            );
        }
        String::from_utf8_lossy(&b).into_owned()
    };
    let mut v = exit_json(&status);
    v["stdout"] = json!(marker(out, out_cut));
    v["stderr"] = json!(marker(err, err_cut));
    v["truncated"] = json!(out_cut || err_cut || status.truncated);
    conn.send(&Response::json(200, &v).encode(false))
        .map_err(io_gone)
}

fn exit_json(st: &ExitStatus) -> Value {
    json!({
        "type": "exit",
        "exit_code": st.code,
        "signal": st.signal,
        "timed_out": st.timed_out,
        "error": st.error,
        "truncated": st.truncated,
    })
}

/// The CLI's session: frames both ways, stdin, TTY resizes and signals.
fn exec_session(
    m: &Arc<Manager>,
    id: &str,
    spec: ExecSpec,
    conn: &mut Conn,
) -> Result<(), OpError> {
    let extended = m.agent_extended(id)?;
    let mut frames = FrameReader::new(
        conn.stream.try_clone().map_err(io_gone)?,
        std::mem::take(&mut conn.pending),
    );
    // A stock qemu-ga takes stdin only up front: gather it first. Not for a
    // terminal, which qemu-ga refuses anyway (exec_start says so): a raw-mode
    // client never sends the end of its input, and would hang here.
    let stdin_data = if spec.stdin && !extended && spec.tty.is_none() {
        conn.switch().map_err(io_gone)?;
        Some(
            frames
                .collect_stdin(crate::qga::wire::GUEST_EXEC_MAX_OUTPUT)
                .map_err(io_gone)?,
        )
    } else {
        None
    };
    let (mut exec, _busy) = m.exec_start(id, &spec, stdin_data)?;
    if !conn.started {
        conn.switch().map_err(io_gone)?;
    }
    let done = Arc::new(AtomicBool::new(false));
    let input = exec.streaming().then(|| {
        let (control, done) = (exec.control(), done.clone());
        std::thread::spawn(move || frames.pump_exec(&control, &done))
    });
    let result = loop {
        let r = match exec.next(IDLE) {
            Ok(Output::Stdout(d)) => conn.send(&wire::encode_data(0, kind::STDOUT, &d)),
            Ok(Output::Stderr(d)) => conn.send(&wire::encode_data(0, kind::STDERR, &d)),
            Ok(Output::Exit(st)) => {
                // Before the client hears of the exit (and hangs up), so the
                // input pump does not take the hang-up for an abandoned command.
                done.store(true, Ordering::SeqCst);
                break conn.event(wire::EVENT_EXIT, json!(st)).map_err(io_gone);
            }
            Err(AgentError::Timeout(_)) => continue,
            Err(e) => break Err(OpError::Unavailable(crate::log::error_chain(&e))),
        };
        if r.is_err() {
            // The client is gone: do not leave its command running.
            let _ = exec.control().signal(9);
            break Ok(());
        }
    };
    done.store(true, Ordering::SeqCst);
    let _ = conn.stream.shutdown(std::net::Shutdown::Read);
    // Forgetting the stream (and cancelling it, if it did not end) wakes an
    // input pump waiting for stdin credit the guest will no longer give.
    drop(exec);
    if let Some(h) = input {
        let _ = h.join();
    }
    result
}

/// Frames from the client, and what the exec session does with them.
struct FrameReader(Frames<UnixStream>);

impl FrameReader {
    fn new(stream: UnixStream, pending: Vec<u8>) -> FrameReader {
        FrameReader(Frames::new(stream, &pending, 1 << 20))
    }

    fn next(&mut self) -> io::Result<Option<Frame>> {
        self.0.next_frame()
    }

    /// stdin frames until `agentlab-stdin-close`, at most `cap` bytes.
    fn collect_stdin(&mut self, cap: usize) -> io::Result<Vec<u8>> {
        let mut data = Vec::new();
        while let Some(f) = self.next()? {
            match f {
                Frame::Data { payload, .. } => {
                    if data.len() + payload.len() > cap {
                        return Err(io::Error::other(format!(
                            "stdin over {cap} bytes: the guest's qemu-ga takes input only up front"
                        )));
                    }
                    data.extend(payload);
                }
                Frame::Json(j) if is_request(&j, wire::CMD_STDIN_CLOSE) => break,
                _ => {}
            }
        }
        Ok(data)
    }

    /// Forwards stdin and control messages until the client closes; a client
    /// that vanishes mid-command gets its command killed.
    fn pump_exec(mut self, control: &crate::qga::session::Control, done: &AtomicBool) {
        loop {
            let frame = match self.next() {
                Ok(Some(f)) => f,
                Ok(None) | Err(_) => {
                    if !done.load(Ordering::SeqCst) {
                        let _ = control.signal(9);
                    }
                    return;
                }
            };
            let r = match frame {
                Frame::Data { payload, .. } => control.stdin(&payload),
                Frame::Json(j) => match Message::parse(&j) {
                    Ok(Message::Request {
                        execute, arguments, ..
                    }) => match execute.as_str() {
                        wire::CMD_STDIN_CLOSE => control.close_stdin(),
                        wire::CMD_RESIZE => match serde_json::from_value(arguments) {
                            Ok(size) => control.resize(size),
                            Err(_) => Ok(()),
                        },
                        wire::CMD_SIGNAL => {
                            control.signal(arguments["signal"].as_i64().unwrap_or(15) as i32)
                        }
                        _ => Ok(()),
                    },
                    _ => Ok(()),
                },
                Frame::Sync => Ok(()),
            };
            if let Err(e) = r {
                crate::debug!("api: exec input: {e}");
            }
        }
    }
}

// ---- files ------------------------------------------------------------------

fn query_path(req: &Request) -> Result<String, OpError> {
    match req.query_param("path") {
        Some(p) if p.starts_with('/') => Ok(p.to_string()),
        Some(p) => Err(OpError::BadRequest(format!(
            "path {p:?} must be absolute in the guest"
        ))),
        None => Err(OpError::BadRequest(
            "give the guest path as ?path=/…".into(),
        )),
    }
}

/// Writes tar bytes as data frames or HTTP chunks.
struct TarSink<'a> {
    conn: &'a mut Conn,
    frames: bool,
}

impl Write for TarSink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(wire::MAX_DATA);
        let bytes = if self.frames {
            wire::encode_data(0, kind::TAR, &buf[..n])
        } else {
            http::encode_chunk(&buf[..n])
        };
        self.conn.send(&bytes)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn files_out(m: &Arc<Manager>, id: &str, req: &Request, conn: &mut Conn) -> Result<(), OpError> {
    let path = query_path(req)?;
    let frames = conn.upgraded;
    // Check the sandbox before the answer starts, so errors get a status.
    m.agent_extended(id)?;
    if frames {
        conn.switch().map_err(io_gone)?;
    } else {
        conn.chunked("application/x-tar").map_err(io_gone)?;
    }
    let done = m.tar_out(id, &path, &mut TarSink { conn, frames }, &mut |_| {})?;
    if frames {
        conn.event(wire::EVENT_EOF, json!(done)).map_err(io_gone)
    } else {
        conn.send(&http::encode_last_chunk()).map_err(io_gone)
    }
}

/// The tar an upload carries: data frames until `agentlab-tar-in-end`, or
/// the HTTP body (by length or chunked).
enum TarSource<'a> {
    Frames {
        reader: FrameReader,
        buf: Vec<u8>,
        ended: bool,
    },
    Length {
        conn: &'a mut Conn,
        left: u64,
    },
    Chunked {
        conn: &'a mut Conn,
        decoder: ChunkedDecoder,
        buf: Vec<u8>,
        ended: bool,
    },
}

impl Read for TarSource<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        match self {
            TarSource::Frames { reader, buf, ended } => {
                while buf.is_empty() && !*ended {
                    match reader.next()? {
                        Some(Frame::Data { payload, .. }) => *buf = payload,
                        Some(Frame::Json(j)) if is_request(&j, wire::CMD_TAR_IN_END) => {
                            *ended = true
                        }
                        Some(_) => {}
                        None => {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "client left mid-upload",
                            ))
                        }
                    }
                }
                take(buf, out)
            }
            TarSource::Length { conn, left } => {
                if *left == 0 {
                    return Ok(0);
                }
                let cap = out.len().min(*left as usize);
                let n = conn.read_some(&mut out[..cap])?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "upload cut short",
                    ));
                }
                *left -= n as u64;
                Ok(n)
            }
            TarSource::Chunked {
                conn,
                decoder,
                buf,
                ended,
            } => {
                let mut raw = [0u8; 64 * 1024];
                while buf.is_empty() && !*ended {
                    let n = conn.read_some(&mut raw)?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "upload cut short",
                        ));
                    }
                    *ended = decoder
                        .feed(&raw[..n], buf)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.message))?;
                }
                take(buf, out)
            }
        }
    }
}

fn take(buf: &mut Vec<u8>, out: &mut [u8]) -> io::Result<usize> {
    let n = out.len().min(buf.len());
    out[..n].copy_from_slice(&buf[..n]);
    buf.drain(..n);
    Ok(n)
}

fn files_in(m: &Arc<Manager>, id: &str, req: &Request, conn: &mut Conn) -> Result<(), OpError> {
    let path = query_path(req)?;
    let root = req
        .query_param("root")
        .unwrap_or_else(|| path.rsplit('/').next().unwrap_or(""))
        .to_string();
    if root.is_empty() || root.contains('/') || root == ".." {
        return Err(OpError::BadRequest(format!(
            "root {root:?} must be one path component"
        )));
    }
    m.agent_extended(id)?;
    if conn.upgraded {
        conn.switch().map_err(io_gone)?;
        let reader = FrameReader::new(
            conn.stream.try_clone().map_err(io_gone)?,
            std::mem::take(&mut conn.pending),
        );
        let mut src = TarSource::Frames {
            reader,
            buf: Vec::new(),
            ended: false,
        };
        let done = m.tar_in(id, &path, &root, &mut src, &mut |_| {})?;
        return conn.event(wire::EVENT_EOF, json!(done)).map_err(io_gone);
    }
    let chunked = req
        .header("transfer-encoding")
        .is_some_and(|t| t.to_ascii_lowercase().contains("chunked"));
    let length: Option<u64> = req
        .header("content-length")
        .and_then(|v| v.trim().parse().ok());
    let done = if chunked {
        let mut src = TarSource::Chunked {
            conn,
            decoder: ChunkedDecoder::new(16 << 20),
            buf: Vec::new(),
            ended: false,
        };
        m.tar_in(id, &path, &root, &mut src, &mut |_| {})?
    } else {
        let left = length.ok_or_else(|| {
            OpError::BadRequest("upload needs Content-Length or chunked encoding".into())
        })?;
        let mut src = TarSource::Length { conn, left };
        m.tar_in(id, &path, &root, &mut src, &mut |_| {})?
    };
    conn.send(&Response::json(200, &json!(done)).encode(false))
        .map_err(io_gone)
}

// ---- console ----------------------------------------------------------------

fn console(m: &Arc<Manager>, id: &str, req: &Request, conn: &mut Conn) -> Result<(), OpError> {
    if !conn.upgraded {
        return Err(OpError::BadRequest(
            "the console is interactive: send `Upgrade: agentlab` (as `agentlab console` does)"
                .into(),
        ));
    }
    let read_only = matches!(req.query_param("ro"), Some("1" | "true" | ""));
    let (vmid, output) = m.console_attach(id)?;
    conn.switch().map_err(io_gone)?;
    let gone = Arc::new(AtomicBool::new(false));
    let mut frames = FrameReader::new(
        conn.stream.try_clone().map_err(io_gone)?,
        std::mem::take(&mut conn.pending),
    );
    let (m2, g2) = (m.clone(), gone.clone());
    let input = std::thread::spawn(move || {
        while let Ok(Some(f)) = frames.next() {
            if let (Frame::Data { payload, .. }, false) = (f, read_only) {
                let _ = m2.console_bytes(vmid, &payload);
            }
        }
        g2.store(true, Ordering::SeqCst);
    });
    loop {
        match output.recv_timeout(Duration::from_millis(500)) {
            Ok(bytes) => {
                if conn
                    .send(&wire::encode_data(0, kind::CONSOLE, &bytes))
                    .is_err()
                {
                    break;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if !gone.load(Ordering::SeqCst) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let _ = conn.event(
                    wire::EVENT_EOF,
                    json!({ "stream": 0, "error": "the sandbox stopped" }),
                );
                break;
            }
        }
    }
    let _ = conn.stream.shutdown(std::net::Shutdown::Both);
    let _ = input.join();
    Ok(())
}
