//! `agentlab proxmox fingerprint <url>`: the SHA-256 fingerprint of the
//! certificate a Proxmox VE server shows, in PVE's colon form, to pin as
//! `proxmox_tls_fingerprint` (compare it with the node's `ssl_fingerprint`
//! in the web UI or `pvenode cert info` before trusting it).

use std::time::Duration;

use argh::FromArgs;

use super::{CliError, Global};

#[derive(FromArgs)]
/// Proxmox VE helpers.
#[argh(
    subcommand,
    name = "proxmox",
    error_code(1, "bad URL"),
    error_code(2, "the server could not be reached")
)]
pub struct ProxmoxCmd {
    #[argh(subcommand)]
    cmd: ProxmoxSub,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum ProxmoxSub {
    Fingerprint(Fingerprint),
}

#[derive(FromArgs)]
/// Print the SHA-256 fingerprint of the server's TLS certificate.
#[argh(subcommand, name = "fingerprint")]
struct Fingerprint {
    /// the API URL, https://HOST[:PORT][/api2/json] (port 8006 by default)
    #[argh(positional)]
    url: String,
}

/// `https://host[:port][/...]` → (host, port).
fn host_port(url: &str) -> Result<(String, u16), String> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| format!("{url:?}: expected https://HOST[:PORT][/api2/json]"))?;
    let authority = rest.split('/').next().unwrap_or("");
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') && (h.starts_with('[') == h.ends_with(']')) => {
            (h, Some(p))
        }
        _ => (authority, None),
    };
    let port = match port {
        Some(p) => p.parse().map_err(|_| format!("{url:?}: bad port {p:?}"))?,
        None => 8006,
    };
    if host.is_empty() {
        return Err(format!("{url:?}: no host"));
    }
    Ok((host.to_string(), port))
}

pub fn run(_g: &Global, c: ProxmoxCmd) -> Result<(), CliError> {
    let ProxmoxSub::Fingerprint(f) = c.cmd;
    let (host, port) = host_port(&f.url).map_err(CliError::User)?;
    let fp = crate::proxmox_api::tls::fetch_fingerprint(&host, port, Duration::from_secs(10))
        .map_err(CliError::Host)?;
    println!("{fp}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_port_is_8006_and_ipv6_keeps_brackets() {
        assert_eq!(
            host_port("https://pve.example").unwrap(),
            ("pve.example".into(), 8006)
        );
        assert_eq!(
            host_port("https://[::1]:443/api2/json").unwrap(),
            ("[::1]".into(), 443)
        );
    }
}
