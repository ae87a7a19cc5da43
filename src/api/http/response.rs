//! Responses: encoding them on the server (`Response`, and the head and chunks
//! of a streamed body), parsing their heads on the client (`parse_response_head`),
//! and decoding a chunked body (`ChunkedDecoder`, RFC 9112 §7.1).
//!
//! Owns status lines, response body framing (RFC 9112 §6.3) and the chunked
//! transfer coding, which only responses use here: requests must carry a
//! `Content-Length`. The head syntax it shares with requests is in `head.rs`.

use super::head::{
    checked_body_length, content_length, find_header, is_field_byte, list_elements, parse_version,
    push_header, read_head, trim_ows,
};
use super::{bad, reason_phrase, HttpError, Limits, CONTENT_TOO_LARGE, CR, LF, SP};

/// Longest chunk-size or trailer line the decoder accepts. RFC 9112 §7.1 sets no
/// bound; this one keeps a hostile stream from spinning on one endless line.
const MAX_CHUNK_LINE: usize = 4096;

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
    use crate::api::http::test_support::{decode_all, decode_split, CHUNKED_WITH_EXTRAS};
    use serde_json::json;

    fn response_head(bytes: &[u8]) -> Result<Option<(ResponseHead, usize)>, HttpError> {
        parse_response_head(bytes, &Limits::default())
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
}
