//! `agentlab status`: is the daemon up, with which accelerator and QEMU,
//! how many sandboxes in each state, and what is orphaned.

use argh::FromArgs;

use super::connect::client;
use super::{output, CliError, Global};
use crate::api::types::StatusResponse;

#[derive(FromArgs)]
/// Show the daemon, accelerator, QEMU version and sandbox counts.
#[argh(
    subcommand,
    name = "status",
    error_code(2, "the daemon is not reachable or failed")
)]
pub struct StatusCmd {
    /// print JSON
    #[argh(switch)]
    json: bool,
}

pub fn run(g: &Global, c: StatusCmd) -> Result<(), CliError> {
    let v = client(g)?.get("/v1/status")?;
    if c.json {
        return output::print_json(&v);
    }
    let s: StatusResponse = serde_json::from_value(v)
        .map_err(|e| CliError::Host(format!("unexpected answer from agentlabd: {e}")))?;
    let counts = if s.sandboxes.is_empty() {
        "none".to_string()
    } else {
        s.sandboxes
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut rows = vec![
        (
            "daemon".to_string(),
            format!(
                "agentlabd {} (pid {}), up {}s",
                s.version, s.pid, s.uptime_seconds
            ),
        ),
        ("socket".into(), s.socket.clone()),
        ("data dir".into(), s.data_dir.clone()),
        ("backend".into(), s.backend.kind.clone()),
        (
            "accelerator".into(),
            format!("{} ({})", s.backend.accel, s.backend.accel_reason),
        ),
        ("hypervisor".into(), s.backend.hypervisor_version.clone()),
    ];
    rows.extend(s.backend.details.iter().cloned());
    rows.extend([
        ("sandboxes".into(), counts),
        (
            "daemon memory".into(),
            s.rss_bytes.map(output::bytes).unwrap_or_default(),
        ),
        (
            "orphans".into(),
            if s.orphans.is_empty() {
                "none".into()
            } else {
                format!("{} (remove with `agentlab sandbox prune`)", s.orphans.len())
            },
        ),
    ]);
    let refs: Vec<(&str, String)> = rows.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    output::fields(&refs)
}
