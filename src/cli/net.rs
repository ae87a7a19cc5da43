//! `agentlab net show|check`: the sandbox network as the daemon runs it, and
//! what this host lacks for it.

use argh::FromArgs;
use serde_json::Value;

use super::connect::client;
use super::{output, CliError, Global};

#[derive(FromArgs)]
/// Inspect the sandbox network (bridge, DHCP leases, egress policy).
#[argh(
    subcommand,
    name = "net",
    error_code(1, "the request was wrong"),
    error_code(2, "the daemon or the host failed; `net check` found an error")
)]
pub struct NetCmd {
    #[argh(subcommand)]
    cmd: Sub,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Sub {
    Show(ShowCmd),
    Check(CheckCmd),
}

#[derive(FromArgs)]
/// Show the bridge, subnet, each sandbox's lease, mode and dropped packets, and exposures.
#[argh(subcommand, name = "show")]
struct ShowCmd {
    /// print JSON
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
/// Check what the host needs for the sandbox network, and say how to fix what is missing.
#[argh(
    subcommand,
    name = "check",
    note = "Checks nftables, /dev/net/tun, IPv4 forwarding, a FORWARD policy of drop set by \
Docker or ufw, and routes overlapping the sandbox subnet. Exits 2 when something is an error."
)]
struct CheckCmd {
    /// print JSON
    #[argh(switch)]
    json: bool,
}

pub fn run(g: &Global, c: NetCmd) -> Result<(), CliError> {
    match c.cmd {
        Sub::Show(c) => show(g, c.json),
        Sub::Check(c) => check(g, c.json),
    }
}

fn show(g: &Global, json: bool) -> Result<(), CliError> {
    let v = client(g)?.get("/v1/net")?;
    if json {
        return output::print_json(&v);
    }
    let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
    let state = match (v["up"].as_bool(), v["error"].as_str()) {
        (Some(true), _) => "up".to_string(),
        (_, Some(e)) => format!("down: {e}"),
        _ => "not set up yet (it comes up with the first sandbox that has a network)".into(),
    };
    output::fields(&[
        ("bridge", s("bridge")),
        (
            "gateway",
            format!("{} (subnet {})", s("gateway"), s("subnet")),
        ),
        ("dns domain", s("dns_domain")),
        ("state", state),
    ])?;
    let rows: Vec<Vec<String>> = list(&v, "sandboxes")
        .iter()
        .map(|m| {
            vec![
                m["vmid"].to_string(),
                m["name"].as_str().unwrap_or("").into(),
                m["mac"].as_str().unwrap_or("").into(),
                m["ip"].as_str().unwrap_or("").into(),
                m["mode"].as_str().unwrap_or("").into(),
                m["lease"]
                    .as_str()
                    .filter(|l| !l.is_empty())
                    .unwrap_or("-")
                    .into(),
                m["dropped_packets"].to_string(),
            ]
        })
        .collect();
    output::line("")?;
    output::table(
        &["VMID", "NAME", "MAC", "IP", "MODE", "LEASE", "DROPPED"],
        &rows,
    )?;
    let exposures = list(&v, "exposures");
    if !exposures.is_empty() {
        output::line("")?;
        for e in exposures {
            output::line(&format!(
                "exposed {}: {}:{} → sandbox {} port {}",
                e["name"].as_str().unwrap_or(""),
                e["bind"].as_str().unwrap_or(""),
                e["host_port"],
                e["vmid"],
                e["guest_port"]
            ))?;
        }
    }
    Ok(())
}

fn check(g: &Global, json: bool) -> Result<(), CliError> {
    let v = client(g)?.get("/v1/net/check")?;
    let findings = list(&v, "findings");
    if json {
        output::print_json(&v)?;
    } else {
        for f in &findings {
            let level = f["level"].as_str().unwrap_or("");
            let fix = f["fix"].as_str().unwrap_or("");
            output::line(&format!("{level:5} {}", f["what"].as_str().unwrap_or("")))?;
            if !fix.is_empty() && level != "ok" {
                output::line(&format!("      fix: {fix}"))?;
            }
        }
    }
    if findings.iter().any(|f| f["level"] == "error") {
        return Err(CliError::Host(
            "the sandbox network cannot work on this host as it is".into(),
        ));
    }
    Ok(())
}

fn list(v: &Value, key: &str) -> Vec<Value> {
    v[key].as_array().cloned().unwrap_or_default()
}
