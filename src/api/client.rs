//! The blocking API client the CLI uses: one request per connection over the
//! daemon's Unix socket, JSON in and out, and NDJSON streams for `--follow`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::http::{self, BodyKind, ChunkedDecoder, Limits};

/// Largest whole response the CLI accepts (event histories can be long).
const MAX_RESPONSE: usize = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to agentlabd at {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to agentlabd failed")]
    Io(#[source] std::io::Error),
    #[error("agentlabd sent a malformed response: {0}")]
    Protocol(String),
    /// The daemon answered with an error status and message.
    #[error("{message}")]
    Api { status: u16, message: String },
}

impl ClientError {
    /// 4xx: the request was wrong (exit code 1). Everything else is 2.
    pub fn is_user_error(&self) -> bool {
        matches!(self, ClientError::Api { status, .. } if (400..500).contains(status))
    }
}

pub struct Client {
    socket: PathBuf,
    timeout: Option<Duration>,
}

impl Client {
    pub fn new(socket: &Path, timeout: Option<Duration>) -> Client {
        Client {
            socket: socket.to_path_buf(),
            timeout,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn connect(&self) -> Result<UnixStream, ClientError> {
        let s = UnixStream::connect(&self.socket).map_err(|source| ClientError::Connect {
            path: self.socket.clone(),
            source,
        })?;
        s.set_read_timeout(self.timeout).map_err(ClientError::Io)?;
        Ok(s)
    }

    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.request("GET", path, None)
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.request("POST", path, Some(body))
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let mut s = self.connect()?;
        let bytes = body.map(|b| b.to_string().into_bytes());
        s.write_all(&http::encode_request(method, path, bytes.as_deref()))
            .map_err(ClientError::Io)?;
        let mut reader = Reader::new(s);
        let (status, kind) = reader.head()?;
        let mut out = Vec::new();
        match kind {
            BodyKind::Length(n) => {
                if n > MAX_RESPONSE {
                    return Err(ClientError::Protocol(format!(
                        "response of {n} bytes is too large"
                    )));
                }
                reader.exact(n, &mut out)?;
            }
            BodyKind::Chunked => reader.chunked(|data| {
                out.extend_from_slice(data);
                out.len() <= MAX_RESPONSE
            })?,
            BodyKind::UntilClose => reader.read_to_close(&mut out)?,
        }
        decode(status, &out)
    }

    /// Reads an NDJSON stream, calling `on_item` per line until it returns
    /// false or the daemon ends the stream.
    /// `quiet_limit` bounds the silence between two items (None: wait for ever).
    pub fn stream(
        &self,
        path: &str,
        quiet_limit: Option<std::time::Duration>,
        mut on_item: impl FnMut(Value) -> bool,
    ) -> Result<(), ClientError> {
        let mut s = self.connect()?;
        // A stream may be quiet for a long time: only the silence is bounded.
        s.set_read_timeout(quiet_limit).map_err(ClientError::Io)?;
        s.write_all(&http::encode_request("GET", path, None))
            .map_err(ClientError::Io)?;
        let mut reader = Reader::new(s);
        let (status, kind) = reader.head()?;
        if !(200..300).contains(&status) || !matches!(kind, BodyKind::Chunked) {
            let mut out = Vec::new();
            if let BodyKind::Length(n) = kind {
                reader.exact(n.min(MAX_RESPONSE), &mut out)?;
            }
            decode(status, &out)?;
            return Err(ClientError::Protocol("expected a chunked stream".into()));
        }
        let mut line = Vec::new();
        let mut go_on = true;
        reader.chunked(|data| {
            for &b in data {
                if b != b'\n' {
                    line.push(b);
                    continue;
                }
                if let Ok(v) = serde_json::from_slice::<Value>(&line) {
                    go_on = on_item(v);
                }
                line.clear();
                if !go_on {
                    return false;
                }
            }
            true
        })
    }
}

/// A connection the daemon switched to agentlab's frame protocol (101).
pub struct Upgraded {
    pub stream: UnixStream,
    /// Bytes read past the 101 head: the first frames.
    pub pending: Vec<u8>,
}

impl Client {
    /// Sends a request asking for `Upgrade: agentlab`. A 101 gives the raw
    /// connection; any other answer is the error it carries.
    pub fn upgrade(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Upgraded, ClientError> {
        let mut s = self.connect()?;
        // A session may be quiet for hours; the caller decides how long to wait.
        s.set_read_timeout(None).map_err(ClientError::Io)?;
        let body = body.map(|b| b.to_string().into_bytes());
        s.write_all(&http::encode_upgrade_request(method, path, body.as_deref()))
            .map_err(ClientError::Io)?;
        let mut reader = Reader::new(s);
        let (status, kind) = reader.head()?;
        if status == 101 {
            return Ok(Upgraded {
                stream: reader.s,
                pending: reader.buf,
            });
        }
        let mut out = Vec::new();
        match kind {
            BodyKind::Length(n) => reader.exact(n.min(MAX_RESPONSE), &mut out)?,
            BodyKind::UntilClose => reader.read_to_close(&mut out)?,
            BodyKind::Chunked => {}
        }
        decode(status, &out)?;
        Err(ClientError::Protocol(format!(
            "expected 101 Switching Protocols, got {status}"
        )))
    }
}

fn decode(status: u16, body: &[u8]) -> Result<Value, ClientError> {
    let v: Value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ClientError::Protocol(format!("invalid JSON: {e}")))?
    };
    if (200..300).contains(&status) {
        Ok(v)
    } else {
        let message = v["error"].as_str().map(String::from).unwrap_or_else(|| {
            format!(
                "agentlabd answered {status} {}",
                http::reason_phrase(status)
            )
        });
        Err(ClientError::Api { status, message })
    }
}

/// The codec's default body cap is for requests; answers may be larger.
fn response_limits() -> Limits {
    Limits {
        max_body: MAX_RESPONSE,
        ..Limits::default()
    }
}

struct Reader {
    s: UnixStream,
    buf: Vec<u8>,
}

impl Reader {
    fn new(s: UnixStream) -> Reader {
        Reader { s, buf: Vec::new() }
    }

    fn fill(&mut self) -> Result<usize, ClientError> {
        let mut tmp = [0u8; 64 * 1024];
        loop {
            match self.s.read(&mut tmp) {
                Ok(n) => {
                    self.buf.extend_from_slice(&tmp[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ClientError::Io(e)),
            }
        }
    }

    fn head(&mut self) -> Result<(u16, BodyKind), ClientError> {
        loop {
            match http::parse_response_head(&self.buf, &response_limits()) {
                Ok(Some((head, used))) => {
                    self.buf.drain(..used);
                    return Ok((head.status, head.body_kind));
                }
                Ok(None) => {
                    if self.fill()? == 0 {
                        return Err(ClientError::Protocol(
                            "connection closed before a response".into(),
                        ));
                    }
                }
                Err(e) => return Err(ClientError::Protocol(e.message)),
            }
        }
    }

    fn exact(&mut self, n: usize, out: &mut Vec<u8>) -> Result<(), ClientError> {
        while self.buf.len() < n {
            if self.fill()? == 0 {
                return Err(ClientError::Protocol("response body cut short".into()));
            }
        }
        out.extend(self.buf.drain(..n));
        Ok(())
    }

    fn read_to_close(&mut self, out: &mut Vec<u8>) -> Result<(), ClientError> {
        while self.fill()? > 0 {
            if self.buf.len() > MAX_RESPONSE {
                return Err(ClientError::Protocol("response too large".into()));
            }
        }
        out.append(&mut self.buf);
        Ok(())
    }

    /// Decodes chunks, handing each piece of body to `sink` until it says stop.
    fn chunked(&mut self, mut sink: impl FnMut(&[u8]) -> bool) -> Result<(), ClientError> {
        let mut dec = ChunkedDecoder::new(16 << 20);
        let mut out = Vec::new();
        loop {
            let input = std::mem::take(&mut self.buf);
            let done = dec
                .feed(&input, &mut out)
                .map_err(|e| ClientError::Protocol(e.message))?;
            if !out.is_empty() {
                if !sink(&out) {
                    return Ok(());
                }
                out.clear();
            }
            if done {
                return Ok(());
            }
            if self.fill()? == 0 {
                return Err(ClientError::Protocol(
                    "stream ended without its last chunk".into(),
                ));
            }
        }
    }
}
