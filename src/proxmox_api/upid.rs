//! PVE task IDs: `UPID:<node>:<pid>:<pstart>:<starttime>:<type>:<id>:<user>:`
//! (pve-common `PVE::Tools::upid_decode`; note the trailing colon; `user`
//! may be `user@realm!tokenid`). The node in it is where the task must be
//! polled (endpoints.md §0.5). Pure: no I/O.

use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upid {
    pub node: String,
    pub pid: u32,
    pub starttime: u64,
    /// `qmclone`, `qmstart`, …
    pub kind: String,
    /// Usually the (source) VMID.
    pub id: String,
    pub user: String,
    raw: String,
}

impl Upid {
    pub fn parse(s: &str) -> Result<Upid, String> {
        let bad = |why: &str| format!("{s:?} is not a PVE task ID ({why})");
        let rest = s
            .strip_prefix("UPID:")
            .ok_or_else(|| bad("no UPID: prefix"))?;
        let f: Vec<&str> = rest.split(':').collect();
        // node, pid, pstart, starttime, type, id, user, "" (trailing colon).
        if f.len() != 8 || !f[7].is_empty() {
            return Err(bad("expected 7 fields and a trailing colon"));
        }
        if f[0].is_empty() {
            return Err(bad("empty node"));
        }
        let hex = |x: &str| u64::from_str_radix(x, 16).map_err(|_| bad("a field is not hex"));
        let pid = hex(f[1])?;
        hex(f[2])?;
        let starttime = hex(f[3])?;
        Ok(Upid {
            node: f[0].to_string(),
            pid: u32::try_from(pid).map_err(|_| bad("pid too large"))?,
            starttime,
            kind: f[4].to_string(),
            id: f[5].to_string(),
            user: f[6].to_string(),
            raw: s.to_string(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }
}

impl fmt::Display for Upid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

/// A stopped task's `exitstatus`: `OK` and `WARNINGS: n` are success
/// (`PVE::Tools::upid_status_is_error`); anything else is the error text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    Ok,
    Warnings(u32),
    Error(String),
}

impl ExitStatus {
    pub fn parse(s: &str) -> ExitStatus {
        let s = s.trim();
        if s == "OK" {
            return ExitStatus::Ok;
        }
        match s
            .strip_prefix("WARNINGS: ")
            .map(|n| n.trim().parse::<u32>())
        {
            Some(Ok(n)) => ExitStatus::Warnings(n),
            _ => ExitStatus::Error(s.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLONE: &str = "UPID:pve1:00001A2B:0010F00D:6650A1B2:qmclone:9000:root@pam!agentlab:";

    #[test]
    fn token_upid_parses_with_node_and_source_vmid() {
        let u = Upid::parse(CLONE).unwrap();

        assert_eq!(
            (
                u.node.as_str(),
                u.pid,
                u.kind.as_str(),
                u.id.as_str(),
                u.user.as_str()
            ),
            ("pve1", 0x1A2B, "qmclone", "9000", "root@pam!agentlab")
        );
        assert_eq!(u.to_string(), CLONE);
    }

    #[test]
    fn upid_without_trailing_colon_is_refused() {
        let e = Upid::parse(CLONE.trim_end_matches(':')).unwrap_err();

        assert!(e.contains("trailing colon"), "{e}");
    }

    #[test]
    fn warnings_are_success_and_other_text_is_an_error() {
        assert_eq!(ExitStatus::parse("OK"), ExitStatus::Ok);
        assert_eq!(ExitStatus::parse("WARNINGS: 1"), ExitStatus::Warnings(1));
        assert_eq!(
            ExitStatus::parse("VM 100 already running"),
            ExitStatus::Error("VM 100 already running".into())
        );
    }
}
