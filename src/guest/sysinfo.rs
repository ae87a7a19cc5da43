//! What the guest is, and powering it off: qemu-ga's `guest-info`,
//! `guest-get-osinfo`, `guest-get-host-name`, `guest-network-get-interfaces`
//! and `guest-shutdown`, with the result shapes of `qga/qapi-schema.json`.
//!
//! Sources: uname(2), os-release(5), getifaddrs(3), reboot(2). Not here:
//! which commands exist (`agent` hands the list to `info`).

use std::ffi::CStr;
use std::io;

use nix::ifaddrs::getifaddrs;
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// Commands that, on success, send no answer (qemu-ga: `success-response: false`).
pub const NO_SUCCESS_RESPONSE: &[&str] = &["guest-shutdown"];

#[derive(Debug, thiserror::Error)]
pub enum SysInfoError {
    #[error("cannot list the network interfaces")]
    Interfaces(#[source] nix::Error),
    #[error("mode {0:?} is not one of powerdown, halt, reboot")]
    Mode(String),
    #[error("cannot {mode} the guest")]
    Power {
        mode: &'static str,
        #[source]
        source: io::Error,
    },
}

/// `guest-info`: our version and every command we answer.
pub fn info(commands: &[&str]) -> Value {
    let supported: Vec<Value> = commands
        .iter()
        .map(|name| {
            json!({
                "name": name,
                "enabled": true,
                "success-response": !NO_SUCCESS_RESPONSE.contains(name),
            })
        })
        .collect();
    json!({
        "version": format!("agentlab {}", env!("CARGO_PKG_VERSION")),
        "supported_commands": supported,
    })
}

fn text(s: &CStr) -> String {
    s.to_string_lossy().into_owned()
}

/// os-release(5): `KEY=value` lines, values optionally quoted; in double
/// quotes a backslash escapes `\`, `"`, `$` and `` ` ``.
pub fn parse_os_release(content: &str) -> Vec<(String, String)> {
    content
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), unquote(v.trim())))
        .collect()
}

fn unquote(v: &str) -> String {
    let bytes = v.as_bytes();
    let quoted = bytes.len() >= 2 && (bytes[0] == b'"' || bytes[0] == b'\'');
    if !quoted || bytes[bytes.len() - 1] != bytes[0] {
        return v.to_string();
    }
    let inner = &v[1..v.len() - 1];
    if bytes[0] == b'\'' {
        return inner.to_string();
    }
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match (c, chars.clone().next()) {
            ('\\', Some(n @ ('\\' | '"' | '$' | '`'))) => {
                out.push(n);
                chars.next();
            }
            _ => out.push(c),
        }
    }
    out
}

/// `guest-get-osinfo`: uname fields and os-release's identity; absent
/// fields are left out, as qemu-ga does.
pub fn osinfo() -> Value {
    let uts = rustix::system::uname();
    let mut info = Map::new();
    info.insert("kernel-release".into(), json!(text(uts.release())));
    info.insert("kernel-version".into(), json!(text(uts.version())));
    info.insert("machine".into(), json!(text(uts.machine())));
    let release = std::fs::read_to_string("/etc/os-release")
        .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        .unwrap_or_default();
    let fields = [
        ("ID", "id"),
        ("NAME", "name"),
        ("PRETTY_NAME", "pretty-name"),
        ("VERSION", "version"),
        ("VERSION_ID", "version-id"),
        ("VARIANT", "variant"),
        ("VARIANT_ID", "variant-id"),
    ];
    for (key, value) in parse_os_release(&release) {
        if let Some((_, name)) = fields.iter().find(|(k, _)| *k == key) {
            info.insert((*name).into(), json!(value));
        }
    }
    Value::Object(info)
}

/// `guest-get-host-name`.
pub fn host_name() -> Value {
    json!({ "host-name": text(rustix::system::uname().nodename()) })
}

/// `aa:bb:cc:dd:ee:ff`.
fn mac(addr: [u8; 6]) -> String {
    addr.map(|b| format!("{b:02x}")).join(":")
}

/// `guest-network-get-interfaces`: every interface with its hardware
/// address and IP addresses, loopback included, in the kernel's order.
pub fn interfaces() -> Result<Value, SysInfoError> {
    let mut out: Vec<(String, Option<String>, Vec<Value>)> = Vec::new();
    for ifa in getifaddrs().map_err(SysInfoError::Interfaces)? {
        let at = match out.iter().position(|(n, _, _)| *n == ifa.interface_name) {
            Some(at) => at,
            None => {
                out.push((ifa.interface_name.clone(), None, Vec::new()));
                out.len() - 1
            }
        };
        let Some(addr) = ifa.address else { continue };
        let netmask = ifa.netmask;
        let entry = &mut out[at];
        if let Some(link) = addr.as_link_addr().and_then(|l| l.addr()) {
            entry.1 = Some(mac(link));
        } else if let Some(v4) = addr.as_sockaddr_in() {
            let prefix =
                netmask.and_then(|m| m.as_sockaddr_in().map(|m| m.ip().to_bits().count_ones()));
            entry.2.push(json!({
                "ip-address-type": "ipv4",
                "ip-address": v4.ip().to_string(),
                "prefix": prefix.unwrap_or(32),
            }));
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            let prefix =
                netmask.and_then(|m| m.as_sockaddr_in6().map(|m| m.ip().to_bits().count_ones()));
            entry.2.push(json!({
                "ip-address-type": "ipv6",
                "ip-address": v6.ip().to_string(),
                "prefix": prefix.unwrap_or(128),
            }));
        }
    }
    let list: Vec<Value> = out
        .into_iter()
        .map(|(name, hw, ips)| {
            let mut v = json!({ "name": name, "ip-addresses": ips });
            if let Some(hw) = hw {
                v["hardware-address"] = json!(hw);
            }
            v
        })
        .collect();
    Ok(Value::Array(list))
}

/// `guest-shutdown` arguments.
#[derive(Debug, Default, Deserialize)]
pub struct ShutdownArgs {
    #[serde(default)]
    pub mode: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownMode {
    Powerdown,
    Halt,
    Reboot,
}

impl ShutdownMode {
    pub fn parse(args: &ShutdownArgs) -> Result<ShutdownMode, SysInfoError> {
        match args.mode.as_deref().unwrap_or("powerdown") {
            "powerdown" => Ok(ShutdownMode::Powerdown),
            "halt" => Ok(ShutdownMode::Halt),
            "reboot" => Ok(ShutdownMode::Reboot),
            other => Err(SysInfoError::Mode(other.to_string())),
        }
    }

    fn name(self) -> &'static str {
        match self {
            ShutdownMode::Powerdown => "power down",
            ShutdownMode::Halt => "halt",
            ShutdownMode::Reboot => "reboot",
        }
    }
}

/// Flushes the filesystems and powers off, halts or restarts at once;
/// returns only when the kernel refused.
pub fn power(mode: ShutdownMode) -> Result<(), SysInfoError> {
    rustix::fs::sync();
    let cmd = match mode {
        ShutdownMode::Powerdown => rustix::system::RebootCommand::PowerOff,
        ShutdownMode::Halt => rustix::system::RebootCommand::Halt,
        ShutdownMode::Reboot => rustix::system::RebootCommand::Restart,
    };
    rustix::system::reboot(cmd).map_err(|e| SysInfoError::Power {
        mode: mode.name(),
        source: e.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_values_are_unquoted() {
        let text = "# comment\nNAME=\"Debian GNU/Linux\"\nID=debian\nVERSION='12 (bookworm)'\nX=\"a \\\"b\\\" \\$c\"\n";
        assert_eq!(
            parse_os_release(text),
            vec![
                ("NAME".to_string(), "Debian GNU/Linux".to_string()),
                ("ID".into(), "debian".into()),
                ("VERSION".into(), "12 (bookworm)".into()),
                ("X".into(), "a \"b\" $c".into()),
            ]
        );
    }

    #[test]
    fn osinfo_has_the_kernel_release() {
        let release = text(rustix::system::uname().release());
        assert_eq!(osinfo()["kernel-release"], json!(release));
    }

    #[test]
    fn interfaces_include_loopback_with_its_addresses() {
        let list = interfaces().unwrap();
        let lo = list
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == "lo")
            .unwrap()
            .clone();
        assert_eq!(
            (
                &lo["hardware-address"],
                &lo["ip-addresses"][0]["ip-address"],
                &lo["ip-addresses"][0]["prefix"]
            ),
            (&json!("00:00:00:00:00:00"), &json!("127.0.0.1"), &json!(8))
        );
    }

    #[test]
    fn info_marks_shutdown_as_answerless() {
        let v = info(&["guest-ping", "guest-shutdown"]);
        assert_eq!(
            v["supported_commands"][1],
            json!({"name": "guest-shutdown", "enabled": true, "success-response": false})
        );
    }

    #[test]
    fn shutdown_mode_defaults_to_powerdown_and_refuses_others() {
        assert_eq!(
            ShutdownMode::parse(&ShutdownArgs::default()).unwrap(),
            ShutdownMode::Powerdown
        );
        let bad = ShutdownArgs {
            mode: Some("suspend".into()),
        };
        assert!(ShutdownMode::parse(&bad).is_err());
    }
}
