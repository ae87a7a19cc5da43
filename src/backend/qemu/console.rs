//! The guest's serial console, as the daemon records it.
//!
//! Guest-controlled bytes: lines are capped (a longer line is cut into
//! pieces), control characters other than tab are dropped before anything is
//! logged, and the log file rotates once it passes its cap (one previous
//! generation is kept as `console.log.1`). Each logged line is
//! `<RFC 3339 time>\t<text>`, which is what `agentlab logs` reads back.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use crate::time::Timestamp;

/// Longest console line kept as one entry.
pub const MAX_LINE: usize = 4096;

/// Splits console bytes into lines; pure.
#[derive(Default)]
pub struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    /// Feeds bytes; returns the complete lines they finish, cleaned.
    pub fn feed(&mut self, data: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        for &b in data {
            if b == b'\n' {
                out.push(clean(&std::mem::take(&mut self.partial)));
            } else {
                self.partial.push(b);
                if self.partial.len() >= MAX_LINE {
                    out.push(clean(&std::mem::take(&mut self.partial)));
                }
            }
        }
        out
    }

    /// Whatever is left without a newline (a shell prompt, say).
    pub fn pending(&self) -> Option<String> {
        (!self.partial.is_empty()).then(|| clean(&self.partial))
    }
}

/// Lossy UTF-8 with terminal escapes and control characters removed.
fn clean(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            // CSI sequences (colours, cursor queries): ESC [ params final-byte.
            '\u{1b}' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
            }
            '\t' => out.push(c),
            c if c.is_control() || is_invisible_format(c) => {}
            c => out.push(c),
        }
    }
    out
}

/// Bidirectional overrides and zero-width characters: a guest could use them
/// to make a logged line read differently from what it says (Trojan Source).
fn is_invisible_format(c: char) -> bool {
    matches!(c,
        '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
}

/// Appends timestamped lines to `console.log`, rotating at a size cap.
pub struct ConsoleLog {
    path: PathBuf,
    file: Option<File>,
    written: u64,
    max: u64,
}

impl ConsoleLog {
    pub fn open(path: &Path, max: u64) -> ConsoleLog {
        let file = OpenOptions::new().create(true).append(true).open(path).ok();
        let written = file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map(|m| m.len())
            .unwrap_or(0);
        ConsoleLog {
            path: path.to_path_buf(),
            file,
            written,
            max,
        }
    }

    pub fn append(&mut self, ts: Timestamp, line: &str) {
        let entry = format!("{ts}\t{line}\n");
        if self.written + entry.len() as u64 > self.max {
            self.rotate();
        }
        if let Some(f) = self.file.as_mut() {
            if f.write_all(entry.as_bytes()).is_ok() {
                self.written += entry.len() as u64;
            }
        }
    }

    fn rotate(&mut self) {
        self.file = None;
        let _ = std::fs::rename(&self.path, rotated(&self.path));
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .ok();
        self.written = 0;
    }
}

fn rotated(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".1");
    PathBuf::from(p)
}

/// Reads back the last `n` lines (both generations), oldest first.
pub fn read_tail(path: &Path, n: usize) -> Vec<(Timestamp, String)> {
    let mut lines = Vec::new();
    for p in [rotated(path), path.to_path_buf()] {
        if let Ok(f) = File::open(&p) {
            lines.extend(
                BufReader::new(f)
                    .lines()
                    .map_while(Result::ok)
                    .filter_map(|l| parse_entry(&l)),
            );
        }
    }
    let skip = lines.len().saturating_sub(n);
    lines.split_off(skip)
}

fn parse_entry(line: &str) -> Option<(Timestamp, String)> {
    let (ts, text) = line.split_once('\t')?;
    Some((Timestamp::parse(ts)?, text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_across_reads() {
        let mut s = LineSplitter::default();
        assert!(s.feed(b"Linux ver").is_empty());
        assert_eq!(s.feed(b"sion 6.1\r\nok\n"), vec!["Linux version 6.1", "ok"]);
    }

    #[test]
    fn overlong_line_is_cut_at_the_cap() {
        let mut s = LineSplitter::default();
        let lines = s.feed(&vec![b'x'; MAX_LINE + 10]);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].len(), MAX_LINE);
        assert_eq!(s.pending().unwrap().len(), 10);
    }

    #[test]
    fn escapes_and_controls_are_removed() {
        let mut s = LineSplitter::default();
        let lines = s.feed(b"\x1b[6n/ # ls\x07\tx\n");
        assert_eq!(lines, vec!["/ # ls\tx"]);
    }

    #[test]
    fn bidi_overrides_and_zero_width_characters_are_removed() {
        let mut s = LineSplitter::default();
        assert_eq!(
            s.feed("ok\u{202E}gnp.exe\u{200B}\n".as_bytes()),
            vec!["okgnp.exe"]
        );
    }

    #[test]
    fn invalid_utf8_is_replaced_not_fatal() {
        let mut s = LineSplitter::default();
        assert_eq!(s.feed(b"a\xffb\n"), vec!["a\u{fffd}b"]);
    }

    #[test]
    fn log_rotates_and_tail_reads_both_generations() {
        let dir = std::env::temp_dir().join(format!("agentlab-console-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        let mut log = ConsoleLog::open(&path, 200);
        for i in 0..10 {
            log.append(Timestamp(i * 1000), &format!("line {i}"));
        }
        let tail = read_tail(&path, 3);
        let size = std::fs::metadata(&path).unwrap().len();
        let _ = std::fs::remove_dir_all(&dir);
        let texts: Vec<&str> = tail.iter().map(|(_, t)| t.as_str()).collect();
        assert_eq!(texts, vec!["line 7", "line 8", "line 9"]);
        assert!(size <= 200);
    }
}
