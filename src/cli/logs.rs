//! `agentlab logs <id>`: a sandbox's events and console output, merged in
//! time order; `--follow` keeps streaming.

use argh::FromArgs;
use serde_json::Value;

use super::connect::client;
use super::{output, CliError, Global};
use crate::api::http::percent_encode_component;

#[derive(FromArgs)]
/// Show a sandbox's events and serial console output.
#[argh(
    subcommand,
    name = "logs",
    example = "agentlab logs 1000 --follow",
    error_code(1, "unknown sandbox"),
    error_code(2, "the daemon or the host failed")
)]
pub struct LogsCmd {
    /// VMID or name
    #[argh(positional)]
    id: String,
    /// keep printing new entries until interrupted
    #[argh(switch, short = 'f')]
    follow: bool,
    /// how many past entries to show (default 200)
    #[argh(option, default = "200")]
    tail: usize,
    /// one JSON object per line
    #[argh(switch)]
    json: bool,
}

pub fn run(g: &Global, c: LogsCmd) -> Result<(), CliError> {
    let id = percent_encode_component(&c.id);
    let cl = client(g)?;
    if !c.follow {
        let r = cl.get(&format!("/v1/sandboxes/{id}/logs?tail={}", c.tail))?;
        for e in r["entries"].as_array().cloned().unwrap_or_default() {
            print_entry(&e, c.json)?;
        }
        return Ok(());
    }
    let mut failed = None;
    cl.stream(
        &format!("/v1/sandboxes/{id}/logs?tail={}&follow=1", c.tail),
        None,
        |e| match print_entry(&e, c.json) {
            Ok(()) => true,
            Err(err) => {
                failed = Some(err);
                false
            }
        },
    )?;
    failed.map_or(Ok(()), Err)
}

fn print_entry(e: &Value, json: bool) -> Result<(), CliError> {
    if json {
        return output::print_json_line(e);
    }
    let ts = e["ts"].as_str().unwrap_or("");
    let text = match e["type"].as_str() {
        Some("console") => format!("{ts}  console | {}", e["line"].as_str().unwrap_or("")),
        _ => {
            let state = match (e["from"].as_str(), e["to"].as_str()) {
                (Some(f), Some(t)) => format!(" [{f} -> {t}]"),
                (None, Some(t)) => format!(" [{t}]"),
                _ => String::new(),
            };
            format!(
                "{ts}  {:<19} {}{state}",
                e["kind"].as_str().unwrap_or("event"),
                e["msg"].as_str().unwrap_or("")
            )
        }
    };
    output::line(&text)
}
