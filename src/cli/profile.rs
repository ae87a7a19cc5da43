//! `agentlab profile list` and `agentlab profile validate <name>`.

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
    Validate(ProfileValidate),
}

#[derive(FromArgs)]
/// Check a profile against the configured backend (Proxmox: the template
/// exists, is a template, has the guest agent; the firewall group exists).
#[argh(subcommand, name = "validate")]
struct ProfileValidate {
    /// the profile's name
    #[argh(positional)]
    name: String,
}

fn validate(g: &Global, c: ProfileValidate) -> Result<(), CliError> {
    let cfg = super::connect::load_config(g)?;
    let profiles = crate::config::Profiles::load(&cfg.profiles_dir)
        .map_err(|e| CliError::User(crate::log::error_chain(&e)))?;
    let p = profiles
        .get(&c.name)
        .ok_or_else(|| CliError::User(format!("no profile named {:?}", c.name)))?;
    if cfg.backend != crate::config::BackendKind::Proxmox {
        println!(
            "profile {}: valid (no backend checks for the {:?} backend)",
            p.name, cfg.backend
        );
        return Ok(());
    }
    let sink: crate::backend::EventSink = std::sync::Arc::new(|_, _| {});
    let b = crate::backend::proxmox::ProxmoxBackend::new(&cfg, sink).map_err(CliError::User)?;
    let lines = b.validate_profile(p).map_err(|e| {
        let msg = crate::log::error_chain(&e);
        if e.is_user_error() {
            CliError::User(msg)
        } else {
            CliError::Host(msg)
        }
    })?;
    for l in lines {
        println!("ok: {l}");
    }
    println!("profile {}: valid", p.name);
    Ok(())
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
    let c = match c.cmd {
        ProfileSub::List(c) => c,
        ProfileSub::Validate(v) => return validate(g, v),
    };
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
