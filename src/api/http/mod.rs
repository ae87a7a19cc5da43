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
//!
//! Layout: `head.rs` reads and writes the parts both kinds of message share (the
//! head, fields, `Content-Length`); `request.rs` owns requests (parsing on the
//! server, encoding on the client, percent-encoding of the target); `response.rs`
//! owns responses (encoding on the server, head parsing on the client) and the
//! chunked coding their streamed bodies use. This file holds the limits, the error
//! and the status codes.

mod head;
mod request;
mod response;

pub use request::{
    encode_request, encode_upgrade_request, parse_request, parse_request_head, percent_decode,
    percent_encode_component, Request,
};
pub use response::{
    encode_chunk, encode_last_chunk, encode_stream_head, parse_response_head, BodyKind,
    ChunkedDecoder, Response, ResponseHead,
};

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

#[cfg(test)]
mod test_support {
    //! Wire samples and helpers shared by the unit tests of this module's files.

    use super::{parse_request, ChunkedDecoder, HttpError, Limits, Request};

    /// `curl --unix-socket s 'http://localhost/v1/sandboxes?tail=10&follow=1'`, curl 7.88.1.
    pub(super) const CURL_GET: &[u8] = b"GET /v1/sandboxes?tail=10&follow=1 HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n";
    /// `curl -X POST -H 'Content-Type: application/json' -d '{"profile":"yolo","ttl":"30m"}'`.
    pub(super) const CURL_POST: &[u8] = b"POST /v1/sandboxes HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\nContent-Type: application/json\r\nContent-Length: 30\r\n\r\n{\"profile\":\"yolo\",\"ttl\":\"30m\"}";

    pub(super) fn parse(bytes: &[u8]) -> Result<Option<(Request, usize)>, HttpError> {
        parse_request(bytes, &Limits::default())
    }

    pub(super) fn decode_all(wire: &[u8]) -> (Result<bool, HttpError>, Vec<u8>) {
        let mut out = Vec::new();
        let done = ChunkedDecoder::new(1024).feed(wire, &mut out);
        (done, out)
    }

    pub(super) fn decode_split(wire: &[u8], at: usize) -> (Result<bool, HttpError>, Vec<u8>) {
        let (mut decoder, mut out) = (ChunkedDecoder::new(1024), Vec::new());
        let first = decoder.feed(&wire[..at], &mut out);
        let done = first.and_then(|_| decoder.feed(&wire[at..], &mut out));
        (done, out)
    }

    pub(super) const CHUNKED_WITH_EXTRAS: &[u8] =
        b"5;name=val;q=\"a;b\"\r\nhello\r\n001 ; x\r\n!\r\n0;last\r\nExpires: never\r\nX-Sum: 1\r\n\r\n";
}

#[cfg(test)]
mod tests {
    use super::test_support::{
        decode_all, decode_split, parse, CHUNKED_WITH_EXTRAS, CURL_GET, CURL_POST,
    };
    use super::*;

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

    use crate::testutil::XorShift;

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
