//! `agentlab profile list`.

use argh::FromArgs;

use super::connect::client;
use super::{output, CliError, Global};

#[derive(FromArgs)]
/// Inspect sandbox profiles (/etc/agentlab/profiles/*.yaml).
#[argh(
    subcommand,
    name = "profile",
    error_code(1, "a profile file is invalid"),
    error_code(2, "the daemon or the host failed")
)]
pub struct ProfileCmd {
    #[argh(subcommand)]
    cmd: ProfileSub,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum ProfileSub {
    List(ProfileList),
}

#[derive(FromArgs)]
/// List the profiles the daemon would use now.
#[argh(subcommand, name = "list")]
struct ProfileList {
    /// print JSON
    #[argh(switch)]
    json: bool,
}

pub fn run_profile(g: &Global, c: ProfileCmd) -> Result<(), CliError> {
    let ProfileSub::List(c) = c.cmd;
    let r = client(g)?.get("/v1/profiles")?;
    if c.json {
        return output::print_json(&r);
    }
    let rows: Vec<Vec<String>> = r["profiles"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|p| {
            let ttl = match p["behavior"]["ttl_minutes_default"].as_u64() {
                Some(m) if m > 0 => format!("{m}m"),
                _ => "none".into(),
            };
            vec![
                p["name"].as_str().unwrap_or("").to_string(),
                p["image"].as_str().unwrap_or("").to_string(),
                p["resources"]["cores"].to_string(),
                format!("{} MiB", p["resources"]["memory_mb"]),
                p["network"]["mode"].as_str().unwrap_or("").to_string(),
                ttl,
                p["source"].as_str().unwrap_or("(built in)").to_string(),
            ]
        })
        .collect();
    output::table(
        &[
            "NAME", "IMAGE", "CORES", "MEMORY", "NETWORK", "TTL", "SOURCE",
        ],
        &rows,
    )
}
