//! Rendering for people and for scripts: aligned tables, `key: value`
//! blocks, and `--json`. Every write reports a closed stdout as
//! `CliError::BrokenPipe`, which `main` turns into success.

use std::io::{IsTerminal, Write};

use serde::Serialize;

use super::CliError;
use crate::time::Timestamp;

pub fn line(s: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{s}")?;
    Ok(())
}

pub fn print_json<T: Serialize>(v: &T) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(v).map_err(|e| CliError::Host(e.to_string()))?;
    line(&text)
}

/// One JSON document per line, for streams (`logs --follow --json`).
pub fn print_json_line<T: Serialize>(v: &T) -> Result<(), CliError> {
    let text = serde_json::to_string(v).map_err(|e| CliError::Host(e.to_string()))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()?;
    Ok(())
}

/// A table with a header row; columns as wide as their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> Result<(), CliError> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let render = |cells: Vec<&str>| -> String {
        let last = cells.len().saturating_sub(1);
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == last {
                    c.to_string()
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", render(header.to_vec()))?;
    for r in rows {
        writeln!(out, "{}", render(r.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

/// `key: value` lines with the keys aligned; empty values are skipped.
pub fn fields(pairs: &[(&str, String)]) -> Result<(), CliError> {
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = std::io::stdout().lock();
    for (k, v) in pairs.iter().filter(|(_, v)| !v.is_empty()) {
        writeln!(out, "{:<w$}  {v}", format!("{k}:"), w = w + 1)?;
    }
    Ok(())
}

/// Progress for people: on stderr, and only when stderr is a terminal or
/// `always` is set, so scripts reading stdout see only the answer.
pub fn progress(msg: &str, always: bool) {
    if always || std::io::stderr().is_terminal() {
        eprintln!("{msg}");
    }
}

/// `in 29m`, `2h ago`, for lease expiries and ages.
pub fn relative(ts: Timestamp, now: Timestamp) -> String {
    let delta = ts.millis() - now.millis();
    let d = std::time::Duration::from_millis(delta.unsigned_abs());
    let secs = d.as_secs();
    let text = if secs < 60 {
        format!("{secs}s")
    } else {
        crate::time::format_duration(std::time::Duration::from_secs(secs - secs % 60))
    };
    if delta >= 0 {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_future_and_past() {
        assert_eq!(relative(Timestamp(90_000), Timestamp(0)), "in 1m");
        assert_eq!(relative(Timestamp(0), Timestamp(30_000)), "30s ago");
    }

    #[test]
    fn bytes_pick_a_unit() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
    }
}
