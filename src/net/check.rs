//! `agentlab net check`: what this host lacks for the sandbox network, and
//! what to do about it. Gathering facts ([`Probe::gather`]) touches the
//! system; judging them ([`judge`]) is pure and unit-tested.
//!
//! It changes nothing: the daemon itself creates the bridge and turns on
//! forwarding; another table's FORWARD drop is for the administrator to
//! open, because agentlab never edits tables it does not own.

use std::fs::OpenOptions;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use ipnet::Ipv4Net;
use serde_json::Value;

use super::link;

/// What to check against: the configured bridge and its subnet.
#[derive(Clone, Debug)]
pub struct CheckInput {
    pub bridge: String,
    pub gateway: Ipv4Addr,
    pub subnet: Ipv4Net,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Error,
}

/// One line of the report; `fix` is empty when there is nothing to do.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    pub level: Level,
    pub what: String,
    pub fix: String,
}

/// The facts [`judge`] works from; each `Err` is why it could not be found.
#[derive(Clone, Debug)]
pub struct Probe {
    /// `nft --version`.
    pub nft_version: Result<String, String>,
    /// `nft -j list ruleset`.
    pub ruleset: Result<String, String>,
    /// Opening `/dev/net/tun` read-write.
    pub tun: Result<(), String>,
    pub ip_forward: Result<bool, String>,
    pub route_conflicts: Result<Vec<String>, String>,
    pub bridge_present: Result<bool, String>,
}

/// Checks this host (in the calling thread's network namespace).
pub fn check(cfg: &CheckInput) -> Vec<Finding> {
    judge(cfg, &Probe::gather(cfg))
}

impl Probe {
    pub fn gather(cfg: &CheckInput) -> Probe {
        Probe {
            nft_version: run("nft", &["--version"]),
            ruleset: run("nft", &["-j", "list", "ruleset"]),
            tun: OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .map(drop)
                .map_err(|e| e.to_string()),
            ip_forward: std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
                .map(|s| s.trim() == "1")
                .map_err(|e| e.to_string()),
            route_conflicts: link::route_conflicts(cfg.subnet, &cfg.bridge).map_err(chain),
            bridge_present: link::links_with_prefix(&cfg.bridge)
                .map(|names| names.contains(&cfg.bridge))
                .map_err(chain),
        }
    }
}

/// The report for `probe`, one finding per check, in a fixed order.
pub fn judge(cfg: &CheckInput, probe: &Probe) -> Vec<Finding> {
    let mut out = vec![];
    out.push(match &probe.nft_version {
        Ok(v) => ok(v.trim()),
        Err(e) => error(
            format!("nft is not usable: {e}"),
            "install nftables (apt-get install nftables); agentlab applies its rules with nft -f",
        ),
    });
    match &probe.ruleset {
        Ok(json) => out.extend(forward_drops(json, &cfg.bridge)),
        Err(e) if probe.nft_version.is_ok() => out.push(error(
            format!("nft cannot read the ruleset: {e}"),
            "run agentlab as root (nft needs CAP_NET_ADMIN)",
        )),
        Err(_) => {}
    }
    out.push(match &probe.tun {
        Ok(()) => ok("/dev/net/tun is usable"),
        Err(e) => error(
            format!("/dev/net/tun cannot be opened: {e}"),
            "load the tun module (modprobe tun) and run agentlab as root",
        ),
    });
    out.push(match &probe.ip_forward {
        Ok(true) => ok("IPv4 forwarding is on"),
        Ok(false) => warn(
            "IPv4 forwarding is off",
            "the daemon turns it on when it starts; to keep it across reboots, \
             put net.ipv4.ip_forward=1 in /etc/sysctl.d/",
        ),
        Err(e) => warn(format!("cannot read net.ipv4.ip_forward: {e}"), ""),
    });
    match &probe.route_conflicts {
        Ok(routes) if routes.is_empty() => {
            out.push(ok(&format!("no host route overlaps {}", cfg.subnet.trunc())))
        }
        Ok(routes) => out.extend(routes.iter().map(|r| {
            error(
                format!("the sandbox subnet {} overlaps the host route {r}", cfg.subnet.trunc()),
                "choose another subnet for the sandbox network in config.yaml, or remove that route",
            )
        })),
        Err(e) => out.push(warn(format!("cannot list host routes: {e}"), "")),
    }
    out.push(match &probe.bridge_present {
        Ok(true) => ok(&format!("bridge {} exists", cfg.bridge)),
        Ok(false) => warn(
            format!("bridge {} does not exist yet", cfg.bridge),
            format!("the daemon creates it with {}", gateway_text(cfg)),
        ),
        Err(e) => warn(format!("cannot list network devices: {e}"), ""),
    });
    out
}

/// Base chains of other tables on the forward hook whose policy is drop
/// (Docker's and ufw's iptables-nft `filter FORWARD`): they drop sandbox
/// traffic whatever our own forward chain accepts.
fn forward_drops(list_json: &str, bridge: &str) -> Vec<Finding> {
    let Ok(v) = serde_json::from_str::<Value>(list_json) else {
        return vec![warn("cannot parse nft -j list ruleset", "")];
    };
    let chains: Vec<&Value> = v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.get("chain"))
        .collect();
    let has_docker_user = chains.iter().any(|c| c["name"] == "DOCKER-USER");
    let drops: Vec<Finding> = chains
        .iter()
        .filter(|c| {
            c["hook"] == "forward" && c["policy"] == "drop" && c["table"] != super::nft::TABLE
        })
        .map(|c| {
            let name = format!(
                "table {} {} chain {}",
                c["family"].as_str().unwrap_or("?"),
                c["table"].as_str().unwrap_or("?"),
                c["name"].as_str().unwrap_or("?")
            );
            let (chain, how) = if has_docker_user {
                ("DOCKER-USER", "-I DOCKER-USER")
            } else {
                ("FORWARD", "-I FORWARD")
            };
            error(
                format!(
                    "{name} drops forwarded traffic by default (Docker or ufw); an accept in \
                     agentlab's own table does not override another table's drop"
                ),
                format!(
                    "let the bridge through in {chain}: iptables {how} -i {bridge} -j ACCEPT; \
                     iptables {how} -o {bridge} -j ACCEPT (agentlab's table still polices it)"
                ),
            )
        })
        .collect();
    if drops.is_empty() {
        vec![ok("no other table drops forwarded traffic")]
    } else {
        drops
    }
}

fn gateway_text(cfg: &CheckInput) -> String {
    format!("{}/{}", cfg.gateway, cfg.subnet.prefix_len())
}

fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// An error and its sources, one line.
fn chain(e: impl std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

fn ok(what: &str) -> Finding {
    Finding {
        level: Level::Ok,
        what: what.to_string(),
        fix: String::new(),
    }
}

fn warn(what: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding {
        level: Level::Warn,
        what: what.into(),
        fix: fix.into(),
    }
}

fn error(what: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding {
        level: Level::Error,
        what: what.into(),
        fix: fix.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> CheckInput {
        CheckInput {
            bridge: "agentlab0".into(),
            gateway: Ipv4Addr::new(10, 77, 0, 1),
            subnet: "10.77.0.1/16".parse().unwrap(),
        }
    }

    fn healthy() -> Probe {
        Probe {
            nft_version: Ok("nftables v1.0.6 (Lester Gooch #5)\n".into()),
            ruleset: Ok(r#"{"nftables": [{"metainfo": {}}]}"#.into()),
            tun: Ok(()),
            ip_forward: Ok(true),
            route_conflicts: Ok(vec![]),
            bridge_present: Ok(true),
        }
    }

    /// iptables-nft as Docker leaves it.
    const DOCKER: &str = r#"{"nftables": [
        {"chain": {"family": "ip", "table": "filter", "name": "FORWARD", "handle": 2,
                   "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}},
        {"chain": {"family": "ip", "table": "filter", "name": "DOCKER-USER", "handle": 9}},
        {"chain": {"family": "inet", "table": "agentlab", "name": "forward", "handle": 3,
                   "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}}
    ]}"#;

    #[test]
    fn healthy_host_has_only_ok_findings() {
        let f = judge(&input(), &healthy());
        assert!(f.iter().all(|x| x.level == Level::Ok), "{f:#?}");
        assert_eq!(f[0].what, "nftables v1.0.6 (Lester Gooch #5)");
    }

    #[test]
    fn docker_forward_drop_is_an_error_with_a_docker_user_fix() {
        let probe = Probe {
            ruleset: Ok(DOCKER.into()),
            ..healthy()
        };
        let f = judge(&input(), &probe);
        let drop = f.iter().find(|x| x.what.contains("FORWARD")).unwrap();
        assert_eq!(drop.level, Level::Error);
        assert!(
            drop.what.starts_with("table ip filter chain FORWARD drops"),
            "{}",
            drop.what
        );
        assert!(drop.what.contains("does not override"));
        assert!(
            drop.fix
                .contains("iptables -I DOCKER-USER -i agentlab0 -j ACCEPT"),
            "{}",
            drop.fix
        );
    }

    #[test]
    fn missing_nft_says_what_to_install() {
        let probe = Probe {
            nft_version: Err("cannot run nft: No such file or directory".into()),
            ruleset: Err("cannot run nft".into()),
            ..healthy()
        };
        let f = judge(&input(), &probe);
        assert_eq!(f[0].level, Level::Error);
        assert!(f[0].fix.contains("apt-get install nftables"));
        assert!(!f.iter().any(|x| x.what.contains("cannot read the ruleset")));
    }

    #[test]
    fn overlapping_route_is_an_error_naming_it() {
        let probe = Probe {
            route_conflicts: Ok(vec!["10.0.0.0/8 via 192.168.1.1 dev wg0".into()]),
            ..healthy()
        };
        let f = judge(&input(), &probe);
        let e = f.iter().find(|x| x.level == Level::Error).unwrap();
        assert_eq!(
            e.what,
            "the sandbox subnet 10.77.0.0/16 overlaps the host route 10.0.0.0/8 via 192.168.1.1 dev wg0"
        );
    }

    #[test]
    fn forwarding_off_and_missing_bridge_are_warnings_the_daemon_fixes() {
        let probe = Probe {
            ip_forward: Ok(false),
            bridge_present: Ok(false),
            ..healthy()
        };
        let f = judge(&input(), &probe);
        let warns: Vec<&Finding> = f.iter().filter(|x| x.level == Level::Warn).collect();
        assert_eq!(warns.len(), 2, "{f:#?}");
        assert!(warns[1].fix.contains("10.77.0.1/16"));
    }

    #[test]
    fn unusable_tun_is_an_error() {
        let probe = Probe {
            tun: Err("No such file or directory (os error 2)".into()),
            ..healthy()
        };
        let f = judge(&input(), &probe);
        assert!(f
            .iter()
            .any(|x| x.level == Level::Error && x.fix.contains("modprobe tun")));
    }
}
