//! Reading wire frames from a blocking byte stream: the daemon's streaming
//! routes read their clients with it, and the CLI reads the daemon.

use std::io::{self, Read};

use super::wire::{Decoder, Frame, Message};

pub struct FrameReader<R: Read> {
    inner: R,
    decoder: Decoder,
}

impl<R: Read> FrameReader<R> {
    /// `pending`: bytes already read from `inner` (past an HTTP head, say).
    pub fn new(inner: R, pending: &[u8], max_json: usize) -> FrameReader<R> {
        let mut decoder = Decoder::new(max_json);
        decoder.push(pending);
        FrameReader { inner, decoder }
    }

    /// The next frame; `Ok(None)` once the peer has closed.
    pub fn next_frame(&mut self) -> io::Result<Option<Frame>> {
        let mut buf = [0u8; 64 * 1024];
        loop {
            match self.decoder.next() {
                Some(Ok(f)) => return Ok(Some(f)),
                Some(Err(e)) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
                None => {}
            }
            let n = match self.inner.read(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => r?,
            };
            if n == 0 {
                return Ok(None);
            }
            self.decoder.push(&buf[..n]);
        }
    }
}

/// Whether a JSON frame is the request `name`.
pub fn is_request(json: &[u8], name: &str) -> bool {
    matches!(Message::parse(json), Ok(Message::Request { execute, .. }) if execute == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qga::wire;

    #[test]
    fn pending_bytes_come_first_then_the_stream() {
        let pending = wire::encode_data(0, wire::kind::STDOUT, b"a");
        let rest = wire::encode_data(0, wire::kind::STDOUT, b"b");
        let mut r = FrameReader::new(&rest[..], &pending, 1024);
        let first = r.next_frame().unwrap().unwrap();
        let second = r.next_frame().unwrap().unwrap();
        assert_eq!(
            first,
            Frame::Data {
                chan: 0,
                kind: 1,
                payload: b"a".to_vec()
            }
        );
        assert_eq!(
            second,
            Frame::Data {
                chan: 0,
                kind: 1,
                payload: b"b".to_vec()
            }
        );
        assert_eq!(r.next_frame().unwrap(), None);
    }

    #[test]
    fn requests_are_recognised_by_name() {
        let j = br#"{"execute":"agentlab-stdin-close"}"#;
        assert!(is_request(j, wire::CMD_STDIN_CLOSE));
        assert!(!is_request(j, wire::CMD_RESIZE));
    }
}
