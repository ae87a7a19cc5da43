//! Newline-delimited framing for the JSON protocols QEMU speaks: QMP
//! (`qmp-spec.rst`: every server message is one JSON object followed by CRLF)
//! and the guest agent (`qga`, same framing plus a 0xFF resync sentinel).
//!
//! Owns only "where does one message end": bytes in, whole lines out, with a
//! cap on line length so a misbehaving peer (a guest, for QGA) cannot make the
//! daemon buffer without bound. Parsing the JSON is the protocol module's job.

/// A line longer than the cap; the framer has discarded it and resynced at
/// the next newline.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("peer sent a line longer than {max} bytes; discarded it")]
pub struct Overlong {
    pub max: usize,
}

/// Splits a byte stream into lines (without their `\n` or `\r\n`).
#[derive(Debug)]
pub struct LineFramer {
    buf: Vec<u8>,
    max: usize,
    /// Set while skipping the rest of an overlong line.
    discarding: bool,
    /// Bytes before `scanned` hold no newline; saves rescanning on each push.
    scanned: usize,
}

impl LineFramer {
    pub fn new(max_line: usize) -> LineFramer {
        LineFramer {
            buf: Vec::new(),
            max: max_line,
            discarding: false,
            scanned: 0,
        }
    }

    /// Appends bytes read from the peer.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole line, `Ok(None)` when more bytes are needed, or
    /// `Err(Overlong)` once per line that exceeded the cap.
    pub fn next_line(&mut self) -> Result<Option<Vec<u8>>, Overlong> {
        loop {
            let newline = self.buf[self.scanned..]
                .iter()
                .position(|&b| b == b'\n')
                .map(|i| i + self.scanned);
            match newline {
                Some(end) => {
                    let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                    self.scanned = 0;
                    line.pop();
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    if std::mem::take(&mut self.discarding) {
                        continue;
                    }
                    if line.len() > self.max {
                        return Err(Overlong { max: self.max });
                    }
                    return Ok(Some(line));
                }
                None if self.buf.len() > self.max => {
                    self.buf.clear();
                    self.scanned = 0;
                    if self.discarding {
                        return Ok(None);
                    }
                    self.discarding = true;
                    return Err(Overlong { max: self.max });
                }
                None => {
                    self.scanned = self.buf.len();
                    return Ok(None);
                }
            }
        }
    }

    /// Drops buffered bytes up to and including the first `sentinel`;
    /// returns whether it was found. The guest agent's resync uses 0xFF.
    pub fn skip_through(&mut self, sentinel: u8) -> bool {
        match self.buf.iter().position(|&b| b == sentinel) {
            Some(i) => {
                self.buf.drain(..=i);
                self.scanned = 0;
                self.discarding = false;
                true
            }
            None => {
                self.buf.clear();
                self.scanned = 0;
                false
            }
        }
    }

    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crlf_lines_come_out_without_terminator() {
        let mut f = LineFramer::new(64);
        f.push(b"{\"a\":1}\r\n{\"b\":2}\n");
        assert_eq!(f.next_line().unwrap().unwrap(), b"{\"a\":1}");
        assert_eq!(f.next_line().unwrap().unwrap(), b"{\"b\":2}");
        assert_eq!(f.next_line().unwrap(), None);
    }

    #[test]
    fn partial_line_waits_for_more() {
        let mut f = LineFramer::new(64);
        f.push(b"{\"ret");
        assert_eq!(f.next_line().unwrap(), None);
        f.push(b"urn\":{}}\r\n");
        assert_eq!(f.next_line().unwrap().unwrap(), b"{\"return\":{}}");
    }

    #[test]
    fn overlong_line_is_reported_once_and_skipped() {
        let mut f = LineFramer::new(8);
        f.push(b"0123456789");
        assert_eq!(f.next_line(), Err(Overlong { max: 8 }));
        f.push(b"abcdef\nok\n");
        assert_eq!(f.next_line().unwrap().unwrap(), b"ok");
    }

    #[test]
    fn overlong_complete_line_is_an_error_then_framing_continues() {
        let mut f = LineFramer::new(4);
        f.push(b"toolong\nfine\n");
        assert_eq!(f.next_line(), Err(Overlong { max: 4 }));
        assert_eq!(f.next_line().unwrap().unwrap(), b"fine");
    }

    #[test]
    fn skip_through_sentinel_drops_stale_bytes() {
        let mut f = LineFramer::new(64);
        f.push(b"stale garbage\xff{\"return\":7}\n");
        assert!(f.skip_through(0xff));
        assert_eq!(f.next_line().unwrap().unwrap(), b"{\"return\":7}");
    }

    #[test]
    fn buffer_never_exceeds_cap_while_discarding() {
        let mut f = LineFramer::new(16);
        f.push(&[b'x'; 100]);
        let _ = f.next_line();
        f.push(&[b'y'; 100]);
        let _ = f.next_line();
        assert!(f.buffered() <= 16);
    }
}
