//! The HTTP/1.1 codec for the daemon's Unix-socket API, server side and client side.
//!
//! Owns the bytes of HTTP/1.1 messages: splitting "is a whole message here?" from
//! parsing it, request and response heads, `Content-Length` framing, the chunked
//! transfer coding (encoding for NDJSON event streams, decoding for the CLI), and
//! percent-encoding. It does no I/O, knows nothing about routes or JSON shapes beyond
//! `{"error": …}`, and never panics on untrusted bytes (see `fuzz/`).
//!
//! Implements the subset of RFC 9112 (HTTP/1.1 message syntax) and RFC 9110
//! (semantics) that a Unix-socket peer needs, with RFC 3986 percent-encoding.
//! Deliberate choices, each with its reason:
//! - A bare LF ends a line as well as CRLF (RFC 9112 §2.2 allows it). We are the only
//!   hop on a Unix socket, so the leniency cannot desynchronise a proxy; a bare CR is
//!   still rejected.
//! - Request bodies need `Content-Length`; any `Transfer-Encoding` on a request is 501.
//!   Our CLI and `curl -d` always send a length, and a stateless `parse_request` would
//!   have to re-decode a chunked body on every partial read.
//! - In the query string `+` means space (form encoding, as `curl -G --data-urlencode`
//!   and browsers produce); in the path it is a literal `+`. `percent_encode_component`
//!   never emits a bare `+`, so both readings agree on what this codebase sends.

use std::fmt::Write as _;

/// Longest chunk-size or trailer line the decoder accepts. RFC 9112 §7.1 sets no
/// bound; this one keeps a hostile stream from spinning on one endless line.
const MAX_CHUNK_LINE: usize = 4096;

// RFC 9110 §15 status codes this module produces itself.
const BAD_REQUEST: u16 = 400;
const CONTENT_TOO_LARGE: u16 = 413;
const HEADER_FIELDS_TOO_LARGE: u16 = 431;
const NOT_IMPLEMENTED: u16 = 501;
const VERSION_NOT_SUPPORTED: u16 = 505;

const CR: u8 = b'\r';
const LF: u8 = b'\n';
const SP: u8 = b' ';
const HT: u8 = b'\t';

/// Size caps applied before anything is allocated from a peer-supplied length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_head: usize,
    pub max_body: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        // 16 KiB for the request line and fields; API bodies are small JSON documents.
        Limits {
            max_head: 16 * 1024,
            max_body: 1024 * 1024,
        }
    }
}

/// A parse failure, carrying the status a server should answer with. On the client
/// side (`parse_response_head`, `ChunkedDecoder`) the status only classifies it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status} {reason}: {message}")]
pub struct HttpError {
    pub status: u16,
    pub reason: &'static str,
    pub message: String,
}

impl HttpError {
    fn new(status: u16, message: impl Into<String>) -> HttpError {
        HttpError {
            status,
            reason: reason_phrase(status),
            message: message.into(),
        }
    }

    /// The `{"error": …}` answer to send before closing the connection: after a parse
    /// error the framing is lost, so encode it with `keep_alive = false`.
    pub fn to_response(&self) -> Response {
        Response::error(self.status, &self.message)
    }
}

fn bad(message: impl Into<String>) -> HttpError {
    HttpError::new(BAD_REQUEST, message)
}

/// One parsed request. Header names are lowercased; values keep their case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// Percent-decoded, without the query. `%2F` decodes to `/` and so splits segments.
    pub path: String,
    /// Decoded pairs in order; `+` is a space; `flag` without `=` has value `""`.
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub keep_alive: bool,
}

impl Request {
    /// The first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The first query parameter called `name` (exact match).
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The non-empty path segments: `/v1/sandboxes/1000/stop/` gives
    /// `["v1", "sandboxes", "1000", "stop"]`. Dot segments are not resolved, so a
    /// segment must never be used as a filesystem path.
    pub fn path_segments(&self) -> Vec<&str> {
        self.path.split('/').filter(|s| !s.is_empty()).collect()
    }
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Is a whole request at the front of `buf`? `Ok(None)`: not yet, read more.
/// `Ok(Some((request, consumed)))`: one request; bytes after `consumed` (a pipelined
/// request) are left for the next call. Errors carry the status to answer with; the
/// body limit is enforced from the declared length, before the body arrives.
pub fn parse_request(buf: &[u8], limits: &Limits) -> Result<Option<(Request, usize)>, HttpError> {
    let Some(head) = read_head(buf, limits)? else {
        return Ok(None);
    };
    let (method, target, http10) = parse_request_line(head.start_line)?;
    let (path, query) = parse_target(target)?;
    let length = request_body_length(&head.headers, limits)?;
    let Some(end) = head.len.checked_add(length).filter(|&end| end <= buf.len()) else {
        return Ok(None);
    };
    let keep_alive = if http10 {
        has_connection_token(&head.headers, "keep-alive")
    } else {
        !has_connection_token(&head.headers, "close")
    };
    let request = Request {
        method,
        path,
        query,
        headers: head.headers,
        body: buf[head.len..end].to_vec(),
        keep_alive,
    };
    Ok(Some((request, end)))
}

/// A complete message head: the start line, the parsed fields, and its length in
/// bytes including any leading blank lines and the terminating blank line.
struct Head<'a> {
    start_line: &'a [u8],
    headers: Vec<(String, String)>,
    len: usize,
}

fn read_head<'a>(buf: &'a [u8], limits: &Limits) -> Result<Option<Head<'a>>, HttpError> {
    // RFC 9112 §2.2: a server SHOULD ignore blank lines before the request line
    // (some clients send a stray CRLF after a body).
    let skipped = leading_blank_lines(buf);
    let window = &buf[..buf.len().min(limits.max_head)];
    let Some(len) = window.get(skipped..).and_then(find_head_end) else {
        if buf.len() >= limits.max_head {
            let msg = format!("message head is larger than {} bytes", limits.max_head);
            return Err(HttpError::new(HEADER_FIELDS_TOO_LARGE, msg));
        }
        return Ok(None);
    };
    let len = skipped + len;
    let mut lines = buf[skipped..len]
        .split(|&b| b == LF)
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .take_while(|line| !line.is_empty());
    let start_line = lines.next().unwrap_or_default();
    if start_line.contains(&CR) {
        return Err(bad("bare CR in the start line"));
    }
    let headers = lines.map(parse_field).collect::<Result<Vec<_>, _>>()?;
    Ok(Some(Head {
        start_line,
        headers,
        len,
    }))
}

fn leading_blank_lines(buf: &[u8]) -> usize {
    let mut at = 0;
    loop {
        match buf.get(at..) {
            Some([CR, LF, ..]) => at += 2,
            Some([LF, ..]) => at += 1,
            _ => return at,
        }
    }
}

/// The index just past the blank line (`\n\r\n` or `\n\n`) that ends a head.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(offset) = buf.get(from..)?.iter().position(|&b| b == LF) {
        let lf = from + offset;
        match buf.get(lf + 1..) {
            Some([LF, ..]) => return Some(lf + 2),
            Some([CR, LF, ..]) => return Some(lf + 3),
            _ => from = lf + 1,
        }
    }
    None
}

/// `name: value` (RFC 9112 §5). The name is lowercased, the value trimmed of OWS.
fn parse_field(line: &[u8]) -> Result<(String, String), HttpError> {
    if line.first().is_some_and(|&b| b == SP || b == HT) {
        return Err(bad("obsolete line folding in a header"));
    }
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return Err(bad("header line without a colon"));
    };
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(bad("invalid header name"));
    }
    let value = trim_ows(value);
    if !value.iter().all(|&b| is_field_byte(b)) {
        return Err(bad("control character in a header value"));
    }
    let value = std::str::from_utf8(value).map_err(|_| bad("header value is not UTF-8"))?;
    // `name` is all tchar, hence ASCII.
    let name = String::from_utf8_lossy(name).to_ascii_lowercase();
    Ok((name, value.to_string()))
}

/// RFC 9110 §5.6.2 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// RFC 9110 §5.5 field-content: HT, SP, VCHAR and obs-text; no NUL, CR, LF or DEL.
fn is_field_byte(b: u8) -> bool {
    b == HT || (b >= SP && b != 0x7f)
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [SP | HT, rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., SP | HT] = s {
        s = rest;
    }
    s
}

/// `METHOD SP request-target SP HTTP-version` → (method, target, is HTTP/1.0).
fn parse_request_line(line: &[u8]) -> Result<(String, &[u8], bool), HttpError> {
    let mut parts = line.split(|&b| b == SP);
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("request line is not `METHOD target HTTP/1.1`"));
    };
    let http10 = parse_version(version)?;
    if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
        return Err(bad("invalid request method"));
    }
    Ok((String::from_utf8_lossy(method).into_owned(), target, http10))
}

/// Accepts `HTTP/1.0` and `HTTP/1.1` (returning whether it is 1.0); other
/// well-formed versions are 505, anything else 400.
fn parse_version(version: &[u8]) -> Result<bool, HttpError> {
    match version {
        b"HTTP/1.1" => Ok(false),
        b"HTTP/1.0" => Ok(true),
        [b'H', b'T', b'T', b'P', b'/', rest @ ..]
            if !rest.is_empty() && rest.iter().all(|&b| b.is_ascii_digit() || b == b'.') =>
        {
            let msg = format!(
                "{} is not supported; use HTTP/1.1",
                String::from_utf8_lossy(version)
            );
            Err(HttpError::new(VERSION_NOT_SUPPORTED, msg))
        }
        _ => Err(bad("invalid HTTP version")),
    }
}

/// The request body length: `Content-Length` or nothing. Checked against the limit
/// as soon as the head is complete, before any body byte is awaited.
fn request_body_length(headers: &[(String, String)], limits: &Limits) -> Result<usize, HttpError> {
    let length = content_length(headers)?;
    if find_header(headers, "transfer-encoding").is_some() {
        if length.is_some() {
            // RFC 9112 §6.3: the classic request-smuggling ambiguity.
            return Err(bad("both Content-Length and Transfer-Encoding"));
        }
        return Err(HttpError::new(
            NOT_IMPLEMENTED,
            "request bodies must be sent with Content-Length, not Transfer-Encoding",
        ));
    }
    checked_body_length(length.unwrap_or(0), limits)
}

fn checked_body_length(length: u64, limits: &Limits) -> Result<usize, HttpError> {
    let max = limits.max_body;
    let too_large = || format!("body of {length} bytes exceeds the {max}-byte limit");
    usize::try_from(length)
        .ok()
        .filter(|&n| n <= max)
        .ok_or_else(|| HttpError::new(CONTENT_TOO_LARGE, too_large()))
}

/// The elements of every `name` field, as one comma-separated list (RFC 9110
/// §5.6.1 and §5.3: repeated fields combine into one list). `name` is lowercase.
fn list_elements<'a>(
    headers: &'a [(String, String)],
    name: &'a str,
) -> impl DoubleEndedIterator<Item = &'a str> {
    headers
        .iter()
        .filter(move |(k, _)| k == name)
        .flat_map(|(_, v)| v.split(','))
        .map(|element| element.trim_matches([' ', '\t']))
}

/// Every `Content-Length` field and list element must be the same decimal number
/// (RFC 9112 §6.3 item 5).
fn content_length(headers: &[(String, String)]) -> Result<Option<u64>, HttpError> {
    let mut found = None;
    for element in list_elements(headers, "content-length") {
        if element.is_empty() || !element.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(format!("invalid Content-Length {element:?}")));
        }
        let n: u64 = element
            .parse()
            .map_err(|_| bad("Content-Length is too large"))?;
        if found.is_some_and(|prev| prev != n) {
            return Err(bad("conflicting Content-Length values"));
        }
        found = Some(n);
    }
    Ok(found)
}

/// Whether any `Connection` field lists `token` (case-insensitive).
fn has_connection_token(headers: &[(String, String)], token: &str) -> bool {
    list_elements(headers, "connection").any(|t| t.eq_ignore_ascii_case(token))
}

/// Origin-form `/path?query`, or absolute-form `http://host/path?query` (RFC 9112
/// §3.2), into the decoded path and query pairs. The host is ignored: there is one.
fn parse_target(target: &[u8]) -> Result<(String, Vec<(String, String)>), HttpError> {
    // Raw bytes must be visible ASCII; anything else has to be percent-encoded.
    if target.is_empty() || !target.iter().all(|&b| b.is_ascii_graphic() && b != b'#') {
        return Err(bad("invalid characters in the request target"));
    }
    let target = String::from_utf8_lossy(target);
    let origin_form = match target.get(..7) {
        _ if target.starts_with('/') => &target[..],
        Some(scheme) if scheme.eq_ignore_ascii_case("http://") => {
            let rest = &target[7..];
            let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
            &rest[authority_end..]
        }
        _ => return Err(bad("request target must be a path such as /v1/sandboxes")),
    };
    let (path, query) = origin_form.split_once('?').unwrap_or((origin_form, ""));
    let path = if path.is_empty() { "/" } else { path };
    Ok((percent_decode(path)?, parse_query(query)?))
}

/// `a=1&b=x+y&flag` → `[("a","1"), ("b","x y"), ("flag","")]`; empty pieces skipped.
fn parse_query(query: &str) -> Result<Vec<(String, String)>, HttpError> {
    let decode = |s: &str| percent_decode(&s.replace('+', " "));
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

/// Decodes `%XX` escapes (RFC 3986 §2.1). `+` is left alone. The result must be
/// UTF-8 and must not contain NUL, which no API name or value needs and which
/// truncates strings on their way to a syscall.
pub fn percent_decode(s: &str) -> Result<String, HttpError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b != b'%' {
            out.push(b);
            i += 1;
            continue;
        }
        let hex = |at: usize| bytes.get(at).and_then(|&c| (c as char).to_digit(16));
        let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2)) else {
            return Err(bad("invalid percent-escape"));
        };
        out.push((hi * 16 + lo) as u8);
        i += 3;
    }
    if out.contains(&0) {
        return Err(bad("percent-escape decodes to NUL"));
    }
    String::from_utf8(out).map_err(|_| bad("percent-escapes do not decode to UTF-8"))
}

/// Encodes everything but RFC 3986 unreserved characters, so the result is safe as
/// one path segment or one query name or value. Space becomes `%20`, `+` `%2B`.
pub fn percent_encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A response to encode. `Content-Length`, `Transfer-Encoding` and `Connection`
/// entries in `headers` are ignored: `encode` writes the framing itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// `value` as the body, with a trailing newline so `curl` output ends cleanly.
    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        let mut body = value.to_string().into_bytes();
        body.push(LF);
        Response {
            status,
            headers: vec![("Content-Type".to_string(), "application/json".to_string())],
            body,
        }
    }

    /// `{"error": message}`, the shape AgentLab's API uses for every failure.
    pub fn error(status: u16, message: &str) -> Response {
        Response::json(status, &serde_json::json!({ "error": message }))
    }

    /// The wire bytes. Adds `Content-Length`, a JSON `Content-Type` when there is a
    /// body and none is set, and `Connection`. 1xx, 204 and 304 carry no body
    /// (RFC 9110 §6.4.1), so for them the body and length are left out.
    pub fn encode(&self, keep_alive: bool) -> Vec<u8> {
        let bodiless = is_bodiless(self.status);
        let mut out = Vec::with_capacity(256 + self.body.len());
        push_status_line(&mut out, self.status);
        for (name, value) in &self.headers {
            let framing = ["content-length", "transfer-encoding", "connection"];
            if !framing.iter().any(|f| name.eq_ignore_ascii_case(f)) {
                push_header(&mut out, name, value);
            }
        }
        if !bodiless {
            if find_header(&self.headers, "content-type").is_none() && !self.body.is_empty() {
                push_header(&mut out, "Content-Type", "application/json");
            }
            push_header(&mut out, "Content-Length", &self.body.len().to_string());
        }
        let connection = if keep_alive { "keep-alive" } else { "close" };
        push_header(&mut out, "Connection", connection);
        out.extend_from_slice(b"\r\n");
        if !bodiless {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

/// 1xx, 204 and 304 responses never have a body (RFC 9112 §6.3 item 1).
fn is_bodiless(status: u16) -> bool {
    status < 200 || status == 204 || status == 304
}

fn push_status_line(out: &mut Vec<u8>, status: u16) {
    let line = format!("HTTP/1.1 {status:03} {}\r\n", reason_phrase(status));
    out.extend_from_slice(line.as_bytes());
}

/// Writes one field, dropping non-token bytes from the name and turning control
/// characters in the value into spaces, so no header can split the response.
fn push_header(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend(name.bytes().filter(|&b| is_tchar(b)));
    out.extend_from_slice(b": ");
    out.extend(value.bytes().map(|b| if is_field_byte(b) { b } else { SP }));
    out.extend_from_slice(b"\r\n");
}

/// The RFC 9110 §15 reason phrase for statuses an API daemon sends, else `"Unknown"`.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// The head of a streamed response (NDJSON events): `Transfer-Encoding: chunked`
/// and `Connection: close`, since the server closes once the stream ends. Follow it
/// with `encode_chunk`s and one `encode_last_chunk`. HTTP/1.0 clients cannot read
/// chunked bodies; a server should refuse streams to them.
pub fn encode_stream_head(status: u16, content_type: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    push_status_line(&mut out, status);
    push_header(&mut out, "Content-Type", content_type);
    push_header(&mut out, "Cache-Control", "no-cache");
    push_header(&mut out, "Transfer-Encoding", "chunked");
    push_header(&mut out, "Connection", "close");
    out.extend_from_slice(b"\r\n");
    out
}

/// One chunk (RFC 9112 §7.1). Empty `data` gives an empty Vec: a zero-size chunk
/// would end the stream.
pub fn encode_chunk(data: &[u8]) -> Vec<u8> {
    if data.is_empty() {
        return Vec::new();
    }
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

/// The zero-size last chunk with no trailers.
pub fn encode_last_chunk() -> Vec<u8> {
    b"0\r\n\r\n".to_vec()
}

/// A request from the CLI. Bytes of `path_and_query` that may not appear raw in a
/// request target (space, controls, non-ASCII) are percent-encoded; callers should
/// still build it with `percent_encode_component`.
pub fn encode_request(method: &str, path_and_query: &str, body: Option<&[u8]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + body.map_or(0, <[u8]>::len));
    out.extend(method.bytes().filter(|&b| is_tchar(b)));
    out.push(SP);
    for b in path_and_query.bytes() {
        if b.is_ascii_graphic() {
            out.push(b);
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    push_header(&mut out, "Host", "agentlab");
    push_header(
        &mut out,
        "User-Agent",
        concat!("agentlab/", env!("CARGO_PKG_VERSION")),
    );
    push_header(&mut out, "Accept", "application/json");
    match body {
        Some(body) => {
            push_header(&mut out, "Content-Type", "application/json");
            push_header(&mut out, "Content-Length", &body.len().to_string());
        }
        // RFC 9110 §8.6: a body-carrying method without a body says so explicitly.
        None if matches!(method, "POST" | "PUT" | "PATCH") => {
            push_header(&mut out, "Content-Length", "0");
        }
        None => {}
    }
    push_header(&mut out, "Connection", "close");
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.unwrap_or_default());
    out
}

/// A response's status line and fields, and how its body is framed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body_kind: BodyKind,
}

/// How to read a response body (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    /// Exactly this many bytes (already checked against `Limits::max_body`).
    Length(usize),
    /// Feed the bytes after the head to a `ChunkedDecoder`.
    Chunked,
    /// Read until the server closes the connection.
    UntilClose,
}

impl ResponseHead {
    /// The first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

/// Is a whole response head at the front of `buf`? Like `parse_request`, but only
/// the head: the body follows `consumed` and is framed as `body_kind` says. A 1xx
/// head is returned like any other; the caller reads the next head after it.
/// Responses to HEAD are not distinguished: the CLI never sends HEAD.
pub fn parse_response_head(
    buf: &[u8],
    limits: &Limits,
) -> Result<Option<(ResponseHead, usize)>, HttpError> {
    let Some(head) = read_head(buf, limits)? else {
        return Ok(None);
    };
    let status = parse_status_line(head.start_line)?;
    let length = content_length(&head.headers)?;
    let transfer_coded = find_header(&head.headers, "transfer-encoding").is_some();
    let body_kind = match (transfer_coded, length) {
        _ if is_bodiless(status) => BodyKind::Length(0),
        (true, Some(_)) => return Err(bad("both Content-Length and Transfer-Encoding")),
        (true, None) if is_chunked(&head.headers) => BodyKind::Chunked,
        (true, None) => BodyKind::UntilClose,
        (false, Some(n)) => BodyKind::Length(checked_body_length(n, limits)?),
        (false, None) => BodyKind::UntilClose,
    };
    let response = ResponseHead {
        status,
        headers: head.headers,
        body_kind,
    };
    Ok(Some((response, head.len)))
}

/// `HTTP/1.x SP 3DIGIT [SP reason]` → the status code.
fn parse_status_line(line: &[u8]) -> Result<u16, HttpError> {
    let (version, rest) = match line.iter().position(|&b| b == SP) {
        Some(sp) => (&line[..sp], &line[sp + 1..]),
        None => (line, &[][..]),
    };
    parse_version(version)?;
    let (code, reason) = rest.split_at(rest.len().min(3));
    let valid_code = code.len() == 3 && code.iter().all(u8::is_ascii_digit) && code[0] != b'0';
    if !valid_code || !matches!(reason.first(), None | Some(&SP)) {
        return Err(bad("invalid status line"));
    }
    if !reason.iter().all(|&b| is_field_byte(b)) {
        return Err(bad("control character in the reason phrase"));
    }
    Ok(code.iter().fold(0, |n, &d| n * 10 + u16::from(d - b'0')))
}

/// Whether the last transfer coding is `chunked` (RFC 9112 §6.3 items 4 and 7).
fn is_chunked(headers: &[(String, String)]) -> bool {
    list_elements(headers, "transfer-encoding")
        .rfind(|t| !t.is_empty())
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
}

/// Where the decoder is in `size [ext] CRLF data CRLF … 0 CRLF trailers CRLF`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChunkState {
    /// Collecting a chunk-size line (size and extensions).
    SizeLine,
    /// Copying this many more data bytes.
    Data(usize),
    /// Collecting the (empty) line that closes a chunk's data.
    DataEnd,
    /// Collecting a trailer line; an empty one ends the body.
    Trailer,
    Done,
    Failed,
}

/// Incremental decoder for a chunked body (RFC 9112 §7.1). Framing lines are
/// buffered up to `MAX_CHUNK_LINE` bytes; data is copied straight through.
/// Extensions and trailer fields are checked for line syntax and discarded.
#[derive(Clone, Debug)]
pub struct ChunkedDecoder {
    state: ChunkState,
    line: Vec<u8>,
    max_chunk: usize,
}

impl ChunkedDecoder {
    /// A decoder that rejects any single chunk larger than `max_chunk` bytes. The
    /// total is not capped here: the caller bounds what it keeps of `out`.
    pub fn new(max_chunk: usize) -> Self {
        ChunkedDecoder {
            state: ChunkState::SizeLine,
            line: Vec::new(),
            max_chunk,
        }
    }

    /// Decodes `input`, appending body bytes to `out`. Returns `Ok(true)` once the
    /// last chunk and trailers are consumed; bytes after that are ignored. After an
    /// error every later call fails too.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<bool, HttpError> {
        let mut rest = input;
        while !rest.is_empty() {
            match self.state {
                ChunkState::Done => break,
                ChunkState::Failed => return Err(bad("chunked body is already malformed")),
                ChunkState::Data(left) => {
                    let n = left.min(rest.len());
                    out.extend_from_slice(&rest[..n]);
                    rest = &rest[n..];
                    self.state = match left - n {
                        0 => ChunkState::DataEnd,
                        left => ChunkState::Data(left),
                    };
                }
                state => {
                    let lf = rest.iter().position(|&b| b == LF);
                    let piece = &rest[..lf.unwrap_or(rest.len())];
                    rest = &rest[lf.map_or(rest.len(), |i| i + 1)..];
                    if self.line.len() + piece.len() > MAX_CHUNK_LINE {
                        return self.fail(bad("chunk framing line is too long"));
                    }
                    self.line.extend_from_slice(piece);
                    if lf.is_some() {
                        let line = std::mem::take(&mut self.line);
                        match end_chunk_line(state, &line, self.max_chunk) {
                            Ok(next) => self.state = next,
                            Err(e) => return self.fail(e),
                        }
                    }
                }
            }
        }
        match self.state {
            ChunkState::Failed => Err(bad("chunked body is already malformed")),
            state => Ok(state == ChunkState::Done),
        }
    }

    fn fail(&mut self, e: HttpError) -> Result<bool, HttpError> {
        self.state = ChunkState::Failed;
        Err(e)
    }
}

/// The state after a complete framing `line` (its LF removed) read in `state`.
fn end_chunk_line(state: ChunkState, line: &[u8], max: usize) -> Result<ChunkState, HttpError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.contains(&CR) {
        return Err(bad("bare CR in chunked framing"));
    }
    match state {
        ChunkState::SizeLine => match parse_chunk_size(line, max)? {
            0 => Ok(ChunkState::Trailer),
            size => Ok(ChunkState::Data(size)),
        },
        ChunkState::DataEnd if line.is_empty() => Ok(ChunkState::SizeLine),
        ChunkState::DataEnd => Err(bad("chunk data is longer than its size")),
        ChunkState::Trailer if line.is_empty() => Ok(ChunkState::Done),
        ChunkState::Trailer if line.iter().all(|&b| is_field_byte(b)) => Ok(state),
        ChunkState::Trailer => Err(bad("control character in a trailer")),
        ChunkState::Data(_) | ChunkState::Done | ChunkState::Failed => Ok(state),
    }
}

/// `1*HEXDIG [BWS ";" extensions]` → the size, capped at `max` (413 beyond it,
/// before any of the chunk's data is read).
fn parse_chunk_size(line: &[u8], max: usize) -> Result<usize, HttpError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let (hex, ext) = line.split_at(digits);
    if hex.is_empty() {
        return Err(bad("chunk size is missing"));
    }
    let ext = trim_ows(ext);
    if ext.first().is_some_and(|&b| b != b';') || !ext.iter().all(|&b| is_field_byte(b)) {
        return Err(bad("invalid chunk extension"));
    }
    hex.iter()
        .try_fold(0usize, |n, &d| {
            let digit = (d as char).to_digit(16)? as usize;
            n.checked_mul(16)?.checked_add(digit)
        })
        .filter(|&size| size <= max)
        .ok_or_else(|| {
            let msg = format!("chunk larger than the {max}-byte limit");
            HttpError::new(CONTENT_TOO_LARGE, msg)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `curl --unix-socket s 'http://localhost/v1/sandboxes?tail=10&follow=1'`, curl 7.88.1.
    const CURL_GET: &[u8] = b"GET /v1/sandboxes?tail=10&follow=1 HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n";
    /// `curl -X POST -H 'Content-Type: application/json' -d '{"profile":"yolo","ttl":"30m"}'`.
    const CURL_POST: &[u8] = b"POST /v1/sandboxes HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\nContent-Type: application/json\r\nContent-Length: 30\r\n\r\n{\"profile\":\"yolo\",\"ttl\":\"30m\"}";

    fn parse(bytes: &[u8]) -> Result<Option<(Request, usize)>, HttpError> {
        parse_request(bytes, &Limits::default())
    }

    fn request(bytes: &[u8]) -> Request {
        parse(bytes).unwrap().unwrap().0
    }

    fn error_status(bytes: &[u8]) -> u16 {
        parse(bytes).unwrap_err().status
    }

    fn get(target: &str) -> Request {
        request(format!("GET {target} HTTP/1.1\r\n\r\n").as_bytes())
    }

    fn with_header(field: &str) -> Vec<u8> {
        format!("GET / HTTP/1.1\r\nHost: agentlab\r\n{field}\r\n\r\n").into_bytes()
    }

    fn response_head(bytes: &[u8]) -> Result<Option<(ResponseHead, usize)>, HttpError> {
        parse_response_head(bytes, &Limits::default())
    }

    fn decode_all(wire: &[u8]) -> (Result<bool, HttpError>, Vec<u8>) {
        let mut out = Vec::new();
        let done = ChunkedDecoder::new(1024).feed(wire, &mut out);
        (done, out)
    }

    fn decode_split(wire: &[u8], at: usize) -> (Result<bool, HttpError>, Vec<u8>) {
        let (mut decoder, mut out) = (ChunkedDecoder::new(1024), Vec::new());
        let first = decoder.feed(&wire[..at], &mut out);
        let done = first.and_then(|_| decoder.feed(&wire[at..], &mut out));
        (done, out)
    }

    #[test]
    fn curl_get_parses_method_path_query_and_headers() {
        let (req, consumed) = parse(CURL_GET).unwrap().unwrap();

        assert_eq!(consumed, CURL_GET.len());
        assert_eq!(req.method, "GET");
        assert_eq!(req.path, "/v1/sandboxes");
        assert_eq!(
            req.query,
            vec![
                ("tail".to_string(), "10".to_string()),
                ("follow".to_string(), "1".to_string())
            ]
        );
        assert_eq!(req.header("user-agent"), Some("curl/7.88.1"));
        assert_eq!(req.body, b"");
        assert!(req.keep_alive);
    }

    #[test]
    fn curl_post_parses_json_body() {
        let (req, consumed) = parse(CURL_POST).unwrap().unwrap();

        assert_eq!(consumed, CURL_POST.len());
        assert_eq!(req.method, "POST");
        assert_eq!(req.header("content-type"), Some("application/json"));
        assert_eq!(req.body, br#"{"profile":"yolo","ttl":"30m"}"#);
    }

    #[test]
    fn pipelined_requests_parse_one_at_a_time() {
        let both = [CURL_POST, CURL_GET].concat();

        let (first, consumed) = parse(&both).unwrap().unwrap();
        let (second, rest) = parse(&both[consumed..]).unwrap().unwrap();

        assert_eq!(first.method, "POST");
        assert_eq!(second.method, "GET");
        assert_eq!(consumed + rest, both.len());
    }

    #[test]
    fn every_proper_prefix_needs_more_bytes() {
        let prefixes_pending = (0..CURL_POST.len()).all(|n| parse(&CURL_POST[..n]) == Ok(None));

        assert!(prefixes_pending);
        assert_eq!(parse(CURL_POST).unwrap().unwrap().0.method, "POST");
    }

    #[test]
    fn header_names_are_lowercased_and_looked_up_in_any_case() {
        let req = request(&with_header("X-Request-ID:  abc 1 \t"));

        assert_eq!(
            req.headers[1],
            ("x-request-id".to_string(), "abc 1".to_string())
        );
        assert_eq!(req.header("X-REQUEST-ID"), Some("abc 1"));
    }

    #[test]
    fn query_plus_is_space_and_escapes_decode() {
        let req = get("/v1/x?cmd=ls+-l&path=%2Ftmp%2Fa%2Bb&flag&&empty=");

        assert_eq!(req.query_param("cmd"), Some("ls -l"));
        assert_eq!(req.query_param("path"), Some("/tmp/a+b"));
        assert_eq!(req.query_param("flag"), Some(""));
        assert_eq!(req.query_param("empty"), Some(""));
        assert_eq!(req.query.len(), 4);
    }

    #[test]
    fn path_plus_is_literal_and_escapes_decode() {
        let req = get("/v1/files/a+b%20c");

        assert_eq!(req.path, "/v1/files/a+b c");
    }

    #[test]
    fn encoded_slash_in_path_splits_segments() {
        let req = get("/v1/files/a%2Fb");

        assert_eq!(req.path_segments(), vec!["v1", "files", "a", "b"]);
    }

    #[test]
    fn path_segments_skip_empty_segments() {
        let req = get("//v1/sandboxes/1000/stop/");

        assert_eq!(req.path_segments(), vec!["v1", "sandboxes", "1000", "stop"]);
    }

    #[test]
    fn absolute_form_target_keeps_path_and_query() {
        let req = get("http://agentlab/v1/sandboxes?tail=5");

        assert_eq!(req.path, "/v1/sandboxes");
        assert_eq!(req.query_param("tail"), Some("5"));
    }

    #[test]
    fn absolute_form_without_path_is_root() {
        let req = get("HTTP://agentlab?x=1");

        assert_eq!(req.path, "/");
        assert_eq!(req.query_param("x"), Some("1"));
    }

    #[test]
    fn bare_lf_line_endings_are_accepted() {
        let bytes = b"POST /v1/x HTTP/1.1\nContent-Length: 2\n\nhi";

        let (req, consumed) = parse(bytes).unwrap().unwrap();

        assert_eq!(req.body, b"hi");
        assert_eq!(consumed, bytes.len());
    }

    #[test]
    fn blank_lines_before_a_request_are_skipped_and_consumed() {
        let bytes = [b"\r\n\n".as_slice(), CURL_GET].concat();

        let (req, consumed) = parse(&bytes).unwrap().unwrap();

        assert_eq!(req.path, "/v1/sandboxes");
        assert_eq!(consumed, bytes.len());
    }

    #[test]
    fn http11_keeps_alive_unless_connection_close() {
        let req = request(&with_header("Connection: Upgrade, Close"));

        assert!(!req.keep_alive);
    }

    #[test]
    fn http10_closes_unless_connection_keep_alive() {
        let default = request(b"GET / HTTP/1.0\r\n\r\n");
        let kept = request(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");

        assert!(!default.keep_alive);
        assert!(kept.keep_alive);
    }

    #[test]
    fn identical_duplicate_content_lengths_are_accepted() {
        let bytes = b"POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2, 2\r\n\r\nhi";

        assert_eq!(request(bytes).body, b"hi");
    }

    #[test]
    fn obs_fold_is_bad_request() {
        assert_eq!(error_status(&with_header("X-A: 1\r\n  folded")), 400);
    }

    #[test]
    fn nul_in_header_value_is_bad_request() {
        assert_eq!(error_status(&with_header("X-A: a\0b")), 400);
    }

    #[test]
    fn bare_cr_in_header_is_bad_request() {
        assert_eq!(error_status(&with_header("X-A: a\rb")), 400);
    }

    #[test]
    fn header_without_colon_is_bad_request() {
        assert_eq!(error_status(&with_header("X-A 1")), 400);
    }

    #[test]
    fn whitespace_before_colon_is_bad_request() {
        assert_eq!(error_status(&with_header("Content-Length : 0")), 400);
    }

    #[test]
    fn conflicting_content_lengths_are_bad_request() {
        let bytes = b"POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nhi!";

        assert_eq!(error_status(bytes), 400);
    }

    #[test]
    fn content_length_with_transfer_encoding_is_bad_request() {
        let head = "Content-Length: 5\r\nTransfer-Encoding: chunked";

        assert_eq!(error_status(&with_header(head)), 400);
    }

    #[test]
    fn chunked_request_body_is_not_implemented() {
        assert_eq!(
            error_status(&with_header("Transfer-Encoding: chunked")),
            501
        );
    }

    #[test]
    fn non_numeric_content_length_is_bad_request() {
        assert_eq!(error_status(&with_header("Content-Length: +5")), 400);
    }

    #[test]
    fn overflowing_content_length_is_bad_request() {
        let field = "Content-Length: 99999999999999999999999";

        assert_eq!(error_status(&with_header(field)), 400);
    }

    #[test]
    fn declared_body_over_limit_is_413_before_the_body_arrives() {
        let limits = Limits {
            max_body: 10,
            ..Limits::default()
        };

        let err = parse_request(&with_header("Content-Length: 11"), &limits).unwrap_err();

        assert_eq!(err.status, 413);
    }

    #[test]
    fn head_over_limit_without_end_is_431() {
        let limits = Limits {
            max_head: 32,
            ..Limits::default()
        };

        let err = parse_request(&CURL_GET[..40], &limits).unwrap_err();

        assert_eq!(err.status, 431);
        assert_eq!(err.reason, "Request Header Fields Too Large");
    }

    #[test]
    fn head_exactly_at_limit_parses() {
        let limits = Limits {
            max_head: CURL_GET.len(),
            ..Limits::default()
        };

        assert!(parse_request(CURL_GET, &limits).unwrap().is_some());
    }

    #[test]
    fn http2_version_is_505() {
        assert_eq!(error_status(b"GET / HTTP/2.0\r\n\r\n"), 505);
    }

    #[test]
    fn garbage_version_is_bad_request() {
        assert_eq!(error_status(b"GET / HTTQ/1.1\r\n\r\n"), 400);
    }

    #[test]
    fn double_space_in_request_line_is_bad_request() {
        assert_eq!(error_status(b"GET  / HTTP/1.1\r\n\r\n"), 400);
    }

    #[test]
    fn asterisk_form_target_is_bad_request() {
        assert_eq!(error_status(b"OPTIONS * HTTP/1.1\r\n\r\n"), 400);
    }

    #[test]
    fn invalid_percent_escape_is_bad_request() {
        assert_eq!(error_status(b"GET /a%2 HTTP/1.1\r\n\r\n"), 400);
    }

    #[test]
    fn percent_encoded_nul_is_bad_request() {
        assert_eq!(error_status(b"GET /a%00 HTTP/1.1\r\n\r\n"), 400);
    }

    #[test]
    fn percent_encoded_invalid_utf8_is_bad_request() {
        assert_eq!(error_status(b"GET /?a=%FF HTTP/1.1\r\n\r\n"), 400);
    }

    #[test]
    fn percent_encoding_round_trips_reserved_and_unicode() {
        let original = "a b+c/d?e&f=g%h~é";

        let encoded = percent_encode_component(original);

        assert_eq!(encoded, "a%20b%2Bc%2Fd%3Fe%26f%3Dg%25h~%C3%A9");
        assert_eq!(percent_decode(&encoded).unwrap(), original);
    }

    #[test]
    fn json_response_encodes_length_type_and_connection() {
        let bytes = Response::json(200, &json!({"ok": true})).encode(true);

        assert_eq!(
            bytes,
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\nConnection: keep-alive\r\n\r\n{\"ok\":true}\n"
        );
    }

    #[test]
    fn error_response_has_error_body_and_closes() {
        let response = Response::error(404, "sandbox 1012 not found");

        let bytes = response.encode(false);

        assert_eq!(response.body, b"{\"error\":\"sandbox 1012 not found\"}\n");
        assert!(bytes.starts_with(b"HTTP/1.1 404 Not Found\r\n"));
        assert!(
            bytes.ends_with(b"Connection: close\r\n\r\n{\"error\":\"sandbox 1012 not found\"}\n")
        );
    }

    #[test]
    fn no_content_response_has_no_length_or_body() {
        let response = Response {
            status: 204,
            headers: vec![],
            body: b"ignored".to_vec(),
        };

        assert_eq!(
            response.encode(true),
            b"HTTP/1.1 204 No Content\r\nConnection: keep-alive\r\n\r\n"
        );
    }

    #[test]
    fn response_ignores_caller_framing_and_strips_header_injection() {
        let response = Response {
            status: 200,
            headers: vec![
                ("Content-Length".to_string(), "999".to_string()),
                ("Content-Type".to_string(), "text/plain".to_string()),
                ("X-Note".to_string(), "a\r\nSet-Cookie: x".to_string()),
            ],
            body: b"hi".to_vec(),
        };

        assert_eq!(
            response.encode(false),
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Note: a  Set-Cookie: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
        );
    }

    #[test]
    fn parse_error_becomes_error_response() {
        let err = parse(b"GET / HTTP/3\r\n\r\n").unwrap_err();

        let response = err.to_response();

        assert_eq!(response.status, 505);
        assert_eq!(
            err.to_string(),
            "505 HTTP Version Not Supported: HTTP/3 is not supported; use HTTP/1.1"
        );
    }

    #[test]
    fn unknown_status_has_generic_reason() {
        assert_eq!(reason_phrase(599), "Unknown");
    }

    #[test]
    fn stream_head_is_chunked_and_closes() {
        assert_eq!(
            encode_stream_head(200, "application/x-ndjson"),
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn chunk_encodes_hex_length() {
        assert_eq!(
            encode_chunk(&[b'x'; 26]),
            [b"1a\r\n".as_slice(), &[b'x'; 26], b"\r\n"].concat()
        );
    }

    #[test]
    fn empty_chunk_encodes_to_nothing() {
        assert_eq!(encode_chunk(b""), b"");
    }

    #[test]
    fn get_request_encodes_host_and_close() {
        assert_eq!(
            encode_request("GET", "/v1/sandboxes?tail=10", None),
            format!("GET /v1/sandboxes?tail=10 HTTP/1.1\r\nHost: agentlab\r\nUser-Agent: agentlab/{}\r\nAccept: application/json\r\nConnection: close\r\n\r\n", env!("CARGO_PKG_VERSION")).into_bytes()
        );
    }

    #[test]
    fn post_request_round_trips_through_the_server_parser() {
        let bytes = encode_request("POST", "/v1/sandboxes", Some(br#"{"a":1}"#));

        let req = request(&bytes);

        assert_eq!(req.header("content-type"), Some("application/json"));
        assert_eq!(req.header("content-length"), Some("7"));
        assert_eq!(req.body, br#"{"a":1}"#);
        assert!(!req.keep_alive);
    }

    #[test]
    fn bodiless_post_request_sends_zero_length() {
        let req = request(&encode_request("POST", "/v1/sandboxes/1000/stop", None));

        assert_eq!(req.header("content-length"), Some("0"));
    }

    #[test]
    fn request_target_bytes_that_cannot_be_raw_are_escaped() {
        let req = request(&encode_request("GET", "/v1/x y\r\nEvil: 1", None));

        assert_eq!(req.path, "/v1/x y\r\nEvil: 1");
        assert_eq!(req.header("evil"), None);
    }

    #[test]
    fn response_head_with_length_reports_consumed_head() {
        let bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc";

        let (head, consumed) = response_head(bytes).unwrap().unwrap();

        assert_eq!(head.status, 200);
        assert_eq!(head.body_kind, BodyKind::Length(3));
        assert_eq!(&bytes[consumed..], b"abc");
    }

    #[test]
    fn response_head_of_stream_is_chunked() {
        let bytes = encode_stream_head(200, "application/x-ndjson");

        let (head, _) = response_head(&bytes).unwrap().unwrap();

        assert_eq!(head.body_kind, BodyKind::Chunked);
        assert_eq!(head.header("Content-Type"), Some("application/x-ndjson"));
    }

    #[test]
    fn response_head_without_framing_reads_until_close() {
        let (head, _) = response_head(b"HTTP/1.0 200\r\n\r\n").unwrap().unwrap();

        assert_eq!(head.body_kind, BodyKind::UntilClose);
    }

    #[test]
    fn response_with_non_chunked_final_coding_reads_until_close() {
        let bytes = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n";

        let (head, _) = response_head(bytes).unwrap().unwrap();

        assert_eq!(head.body_kind, BodyKind::UntilClose);
    }

    #[test]
    fn no_content_response_head_has_empty_body() {
        let bytes = b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n";

        let (head, _) = response_head(bytes).unwrap().unwrap();

        assert_eq!(head.body_kind, BodyKind::Length(0));
    }

    #[test]
    fn response_head_round_trips_an_encoded_response() {
        let bytes = Response::error(409, "busy").encode(false);

        let (head, consumed) = response_head(&bytes).unwrap().unwrap();

        assert_eq!(head.status, 409);
        assert_eq!(&bytes[consumed..], b"{\"error\":\"busy\"}\n");
    }

    #[test]
    fn response_length_over_limit_is_413() {
        let limits = Limits {
            max_body: 4,
            ..Limits::default()
        };
        let bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n";

        assert_eq!(parse_response_head(bytes, &limits).unwrap_err().status, 413);
    }

    #[test]
    fn response_with_length_and_chunked_is_rejected() {
        let bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";

        assert_eq!(response_head(bytes).unwrap_err().status, 400);
    }

    #[test]
    fn malformed_status_line_is_rejected() {
        assert_eq!(
            response_head(b"HTTP/1.1 20x OK\r\n\r\n")
                .unwrap_err()
                .status,
            400
        );
    }

    #[test]
    fn partial_response_head_needs_more_bytes() {
        assert_eq!(response_head(b"HTTP/1.1 200 OK\r\nContent-Le"), Ok(None));
    }

    #[test]
    fn chunked_encoding_round_trips() {
        let wire = [
            encode_stream_head(200, "application/x-ndjson"),
            encode_chunk(b"{\"event\":\"started\"}\n"),
            encode_chunk(b""),
            encode_chunk(b"{\"event\":\"stopped\"}\n"),
            encode_last_chunk(),
        ]
        .concat();
        let (_, head_len) = response_head(&wire).unwrap().unwrap();

        let (done, body) = decode_all(&wire[head_len..]);

        assert_eq!(done, Ok(true));
        assert_eq!(body, b"{\"event\":\"started\"}\n{\"event\":\"stopped\"}\n");
    }

    const CHUNKED_WITH_EXTRAS: &[u8] =
        b"5;name=val;q=\"a;b\"\r\nhello\r\n001 ; x\r\n!\r\n0;last\r\nExpires: never\r\nX-Sum: 1\r\n\r\n";

    #[test]
    fn chunk_extensions_and_trailers_are_skipped() {
        assert_eq!(
            decode_all(CHUNKED_WITH_EXTRAS),
            (Ok(true), b"hello!".to_vec())
        );
    }

    #[test]
    fn decoder_gives_the_same_result_split_at_every_byte() {
        let expected = decode_all(CHUNKED_WITH_EXTRAS);

        let all_same = (0..=CHUNKED_WITH_EXTRAS.len())
            .all(|at| decode_split(CHUNKED_WITH_EXTRAS, at) == expected);

        assert!(all_same);
    }

    #[test]
    fn decoder_is_not_done_before_the_final_blank_line() {
        assert_eq!(
            decode_all(b"2\r\nhi\r\n0\r\nX: 1\r\n"),
            (Ok(false), b"hi".to_vec())
        );
    }

    #[test]
    fn decoder_accepts_bare_lf_framing() {
        assert_eq!(decode_all(b"2\nhi\n0\n\n"), (Ok(true), b"hi".to_vec()));
    }

    #[test]
    fn decoder_ignores_bytes_after_the_end() {
        assert_eq!(decode_all(b"0\r\n\r\ngarbage"), (Ok(true), vec![]));
    }

    #[test]
    fn chunk_over_max_is_413_before_its_data() {
        let (done, _) = decode_all(b"401\r\n");

        assert_eq!(done.unwrap_err().status, 413);
    }

    #[test]
    fn chunk_size_overflowing_usize_is_rejected() {
        let mut decoder = ChunkedDecoder::new(usize::MAX);

        let err = decoder
            .feed(b"fffffffffffffffff\r\n", &mut Vec::new())
            .unwrap_err();

        assert_eq!(err.status, 413);
    }

    #[test]
    fn missing_chunk_size_is_rejected() {
        assert_eq!(decode_all(b";ext\r\n").0.unwrap_err().status, 400);
    }

    #[test]
    fn chunk_data_longer_than_its_size_is_rejected() {
        assert_eq!(decode_all(b"2\r\nhey\r\n").0.unwrap_err().status, 400);
    }

    #[test]
    fn bare_cr_in_chunk_framing_is_rejected() {
        assert_eq!(decode_all(b"2\rhi\r\n").0.unwrap_err().status, 400);
    }

    #[test]
    fn decoder_stays_failed_after_an_error() {
        let mut decoder = ChunkedDecoder::new(16);
        let _ = decoder.feed(b"zz", &mut Vec::new());

        assert!(decoder.feed(b"0\r\n\r\n", &mut Vec::new()).is_err());
    }

    /// xorshift64 (Marsaglia 2003): deterministic noise without a crate.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    fn mutate(rng: &mut XorShift, input: &mut Vec<u8>) {
        const INTERESTING: &[u8] = b"\r\n :;%+0123456789aAfF\t\0\x7f\xff-/?&=HTTP";
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(input.len() + 1);
            let byte = INTERESTING[rng.below(INTERESTING.len())];
            match rng.below(5) {
                0 if at < input.len() => input[at] = byte,
                1 => input.insert(at, byte),
                2 if at < input.len() => drop(input.remove(at)),
                3 => input.truncate(at),
                _ => {
                    let from = rng.below(input.len() + 1);
                    let piece = input[from..].iter().take(8).copied().collect::<Vec<_>>();
                    input.splice(at..at, piece);
                }
            }
        }
    }

    #[test]
    fn random_and_mutated_input_never_panics() {
        let seeds: [&[u8]; 6] = [
            CURL_GET,
            CURL_POST,
            CHUNKED_WITH_EXTRAS,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n",
            b"GET http://agentlab/v1/x?a=%41+b HTTP/1.0\nConnection: keep-alive\n\n",
            b"HTTP/1.1 204 No Content\r\nContent-Length: 1, 1\r\n\r\n",
        ];
        let small = Limits {
            max_head: 48,
            max_body: 8,
        };
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        for round in 0..5000 {
            let mut input = seeds[round % seeds.len()].to_vec();
            if round % 7 == 0 {
                input = (0..rng.below(80)).map(|_| rng.next() as u8).collect();
            }
            mutate(&mut rng, &mut input);
            for limits in [Limits::default(), small] {
                if let Ok(Some((_, consumed))) = parse_request(&input, &limits) {
                    assert!(consumed > 0 && consumed <= input.len(), "{input:?}");
                    let again = parse_request(&input[..consumed], &limits);
                    assert_eq!(again.unwrap().unwrap().1, consumed, "{input:?}");
                }
                if let Ok(Some((_, consumed))) = parse_response_head(&input, &limits) {
                    assert!(consumed > 0 && consumed <= input.len(), "{input:?}");
                }
            }
            let at = rng.below(input.len() + 1);
            assert_eq!(decode_all(&input), decode_split(&input, at), "{input:?}");
        }
    }
}
