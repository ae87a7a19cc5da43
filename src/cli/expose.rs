//! `agentlab sandbox expose|exposed|unexpose`: a sandbox's TCP port made
//! reachable on the host (a DNAT rule in the daemon's nft table, recorded in
//! sled and as an audit event).

use argh::FromArgs;
use serde_json::{json, Value};

use super::connect::client;
use super::{output, CliError, Global};
use crate::api::http::percent_encode_component;

#[derive(FromArgs)]
/// Make a sandbox's TCP port reachable from the host.
#[argh(
    subcommand,
    name = "expose",
    example = "agentlab sandbox expose 1001 :8080",
    example = "agentlab sandbox expose 1001 :8080 --host-port 18080 --bind 127.0.0.1",
    note = "The name defaults to sbx-<vmid>-<port>. The host port must be free on the host; \
connections to it (from the host itself or from elsewhere, per --bind) reach the guest port."
)]
pub struct ExposeCmd {
    /// VMID or name
    #[argh(positional)]
    id: String,
    /// the guest port, as :PORT or PORT
    #[argh(positional)]
    port: String,
    /// the host port (default: the guest port)
    #[argh(option)]
    host_port: Option<u16>,
    /// the host address to listen on (default 0.0.0.0: every address)
    #[argh(option)]
    bind: Option<String>,
    /// a name for the exposure
    #[argh(option)]
    name: Option<String>,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
/// List exposed sandbox ports.
#[argh(subcommand, name = "exposed")]
pub struct ExposedCmd {
    /// print JSON
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
/// Close an exposed port.
#[argh(
    subcommand,
    name = "unexpose",
    example = "agentlab sandbox unexpose sbx-1001-8080"
)]
pub struct UnexposeCmd {
    /// the exposure's name (see `agentlab sandbox exposed`)
    #[argh(positional)]
    name: String,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

pub fn expose(g: &Global, c: ExposeCmd) -> Result<(), CliError> {
    let port: u16 = c
        .port
        .trim_start_matches(':')
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| CliError::User(format!("{:?} is not a port; write :8080", c.port)))?;
    if let Some(b) = &c.bind {
        b.parse::<std::net::Ipv4Addr>().map_err(|_| {
            CliError::User(format!(
                "--bind {b:?} is not an IPv4 address; e.g. 127.0.0.1, or 0.0.0.0 for every address"
            ))
        })?;
    }
    let body = json!({
        "port": port,
        "host_port": c.host_port,
        "bind": c.bind,
        "name": c.name,
    });
    let path = format!("/v1/sandboxes/{}/expose", percent_encode_component(&c.id));
    let e = client(g)?.post(&path, &body)?;
    if c.json {
        return output::print_json(&e);
    }
    output::line(&format!(
        "{}: {}:{} → sandbox {} port {}",
        e["name"].as_str().unwrap_or("?"),
        e["bind"].as_str().unwrap_or("?"),
        e["host_port"],
        e["vmid"],
        e["guest_port"]
    ))
}

pub fn exposed(g: &Global, c: ExposedCmd) -> Result<(), CliError> {
    let v = client(g)?.get("/v1/exposures")?;
    if c.json {
        return output::print_json(&v);
    }
    let list = v["exposures"].as_array().cloned().unwrap_or_default();
    let rows: Vec<Vec<String>> = list.iter().map(row).collect();
    output::table(&["NAME", "VMID", "HOST", "GUEST PORT", "CREATED"], &rows)
}

fn row(e: &Value) -> Vec<String> {
    vec![
        e["name"].as_str().unwrap_or("").to_string(),
        e["vmid"].to_string(),
        format!("{}:{}", e["bind"].as_str().unwrap_or("?"), e["host_port"]),
        e["guest_port"].to_string(),
        e["created_at"].as_str().unwrap_or("").to_string(),
    ]
}

pub fn unexpose(g: &Global, c: UnexposeCmd) -> Result<(), CliError> {
    let path = format!("/v1/exposures/{}", percent_encode_component(&c.name));
    let e = client(g)?.request("DELETE", &path, None)?;
    if c.json {
        return output::print_json(&e);
    }
    output::line(&format!(
        "closed {} ({}:{} → sandbox {} port {})",
        c.name,
        e["bind"].as_str().unwrap_or("?"),
        e["host_port"],
        e["vmid"],
        e["guest_port"]
    ))
}
