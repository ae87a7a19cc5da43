//! The message syntax requests and responses share (RFC 9112 §2–§6): finding the
//! end of a head, splitting it into a start line and fields, tokens and field
//! values, the HTTP version, `Content-Length`, and writing one field safely.
//!
//! Owns no message type: `request.rs` and `response.rs` build theirs from these
//! pieces, and their tests exercise these rules through `parse_request` and
//! `parse_response_head`.

use super::{
    bad, HttpError, Limits, CONTENT_TOO_LARGE, CR, HEADER_FIELDS_TOO_LARGE, HT, LF, SP,
    VERSION_NOT_SUPPORTED,
};

pub(super) fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A complete message head: the start line, the parsed fields, and its length in
/// bytes including any leading blank lines and the terminating blank line.
pub(super) struct Head<'a> {
    pub(super) start_line: &'a [u8],
    pub(super) headers: Vec<(String, String)>,
    pub(super) len: usize,
}

pub(super) fn read_head<'a>(buf: &'a [u8], limits: &Limits) -> Result<Option<Head<'a>>, HttpError> {
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
pub(super) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// RFC 9110 §5.5 field-content: HT, SP, VCHAR and obs-text; no NUL, CR, LF or DEL.
pub(super) fn is_field_byte(b: u8) -> bool {
    b == HT || (b >= SP && b != 0x7f)
}

pub(super) fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [SP | HT, rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., SP | HT] = s {
        s = rest;
    }
    s
}

/// Accepts `HTTP/1.0` and `HTTP/1.1` (returning whether it is 1.0); other
/// well-formed versions are 505, anything else 400.
pub(super) fn parse_version(version: &[u8]) -> Result<bool, HttpError> {
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

pub(super) fn checked_body_length(length: u64, limits: &Limits) -> Result<usize, HttpError> {
    let max = limits.max_body;
    let too_large = || format!("body of {length} bytes exceeds the {max}-byte limit");
    usize::try_from(length)
        .ok()
        .filter(|&n| n <= max)
        .ok_or_else(|| HttpError::new(CONTENT_TOO_LARGE, too_large()))
}

/// The elements of every `name` field, as one comma-separated list (RFC 9110
/// §5.6.1 and §5.3: repeated fields combine into one list). `name` is lowercase.
pub(super) fn list_elements<'a>(
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
pub(super) fn content_length(headers: &[(String, String)]) -> Result<Option<u64>, HttpError> {
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

/// Writes one field, dropping non-token bytes from the name and turning control
/// characters in the value into spaces, so no header can split the response.
pub(super) fn push_header(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend(name.bytes().filter(|&b| is_tchar(b)));
    out.extend_from_slice(b": ");
    out.extend(value.bytes().map(|b| if is_field_byte(b) { b } else { SP }));
    out.extend_from_slice(b"\r\n");
}
