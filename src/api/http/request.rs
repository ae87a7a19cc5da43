//! Requests: parsing them on the server (`parse_request`, `Request`), encoding
//! them on the client (`encode_request`), and the percent-encoding of the request
//! target (RFC 3986 §2.1).
//!
//! Owns the request line, the target's path and query, request body framing and
//! keep-alive. The head syntax it shares with responses is in `head.rs`.

use std::fmt::Write as _;

use super::head::{
    checked_body_length, content_length, find_header, is_tchar, list_elements, parse_version,
    push_header, read_head,
};
use super::{bad, HttpError, Limits, NOT_IMPLEMENTED, SP};

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

/// A whole request head at the front of `buf`, without its body: for routes
/// whose handler reads the body itself as it streams (file uploads may be
/// gigabytes, or chunked). The body limit does not apply; smuggling checks do.
/// `Ok(Some((request, head_len)))` has an empty `body`.
pub fn parse_request_head(
    buf: &[u8],
    limits: &Limits,
) -> Result<Option<(Request, usize)>, HttpError> {
    let Some(head) = read_head(buf, limits)? else {
        return Ok(None);
    };
    let (method, target, http10) = parse_request_line(head.start_line)?;
    let (path, query) = parse_target(target)?;
    if content_length(&head.headers)?.is_some()
        && find_header(&head.headers, "transfer-encoding").is_some()
    {
        return Err(bad("both Content-Length and Transfer-Encoding"));
    }
    let keep_alive = !http10 && !has_connection_token(&head.headers, "close");
    let request = Request {
        method,
        path,
        query,
        headers: head.headers,
        body: Vec::new(),
        keep_alive,
    };
    Ok(Some((request, head.len)))
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

/// A request from the CLI. Bytes of `path_and_query` that may not appear raw in a
/// request target (space, controls, non-ASCII) are percent-encoded; callers should
/// still build it with `percent_encode_component`.
pub fn encode_request(method: &str, path_and_query: &str, body: Option<&[u8]>) -> Vec<u8> {
    encode(method, path_and_query, body, false)
}

/// The same, asking the daemon to switch the connection to agentlab's frame
/// protocol (`Connection: Upgrade`, `Upgrade: agentlab`).
pub fn encode_upgrade_request(method: &str, path_and_query: &str, body: Option<&[u8]>) -> Vec<u8> {
    encode(method, path_and_query, body, true)
}

fn encode(method: &str, path_and_query: &str, body: Option<&[u8]>, upgrade: bool) -> Vec<u8> {
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
    if upgrade {
        push_header(&mut out, "Connection", "Upgrade");
        push_header(&mut out, "Upgrade", "agentlab");
    } else {
        push_header(&mut out, "Connection", "close");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.unwrap_or_default());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::http::test_support::{parse, CURL_GET, CURL_POST};

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

    #[test]
    fn head_only_parse_ignores_the_body_limit() {
        let req = b"PUT /v1/sandboxes/1/files?path=/x HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999\r\n\r\nabc";
        let (r, used) = parse_request_head(req, &Limits::default())
            .unwrap()
            .unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), used),
            ("PUT", "/v1/sandboxes/1/files", req.len() - 3)
        );
        assert!(r.body.is_empty());
    }

    #[test]
    fn head_only_parse_still_refuses_smuggling() {
        let req = b"PUT /x HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(
            parse_request_head(req, &Limits::default())
                .unwrap_err()
                .status,
            400
        );
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
}
