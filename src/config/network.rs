//! The sandbox network's host side: the `bridge`, `subnet`, `dns_domain` and
//! `dns_upstream` keys of config.yaml (DESIGN.md §6). Profiles decide what a
//! sandbox may reach (`network.mode`); these keys decide where the network
//! lives on the host.

use std::net::{Ipv4Addr, SocketAddr};

use ipnet::Ipv4Net;
use serde::Serialize;

use super::is_host_name;
use super::yaml::{Mapping, Node, Read};

pub(super) const NETWORK_KEYS: &[&str] = &["bridge", "subnet", "dns_domain", "dns_upstream"];

/// Where sandboxes' network lives on this host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NetworkConfig {
    /// The bridge the daemon creates and owns (`agentlab0`).
    pub bridge: String,
    /// The gateway's address with the subnet's prefix (`10.77.0.1/16`).
    pub gateway: Ipv4Net,
    /// Sandboxes resolve `<name>.<dns_domain>` through the gateway's DNS.
    pub dns_domain: String,
    /// Resolvers the gateway forwards to; empty: the host's `/etc/resolv.conf`.
    pub dns_upstream: Vec<SocketAddr>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            bridge: "agentlab0".into(),
            gateway: Ipv4Net::new(Ipv4Addr::new(10, 77, 0, 1), 16).expect("valid prefix"),
            dns_domain: "agentlab.internal".into(),
            dns_upstream: Vec::new(),
        }
    }
}

impl NetworkConfig {
    /// The gateway's own address.
    pub fn gateway_ip(&self) -> Ipv4Addr {
        self.gateway.addr()
    }

    /// The subnet, host bits zero (`10.77.0.0/16`).
    pub fn subnet(&self) -> Ipv4Net {
        self.gateway.trunc()
    }
}

pub(super) fn read_network(m: &Mapping) -> Read<NetworkConfig> {
    let mut n = NetworkConfig::default();
    if let Some(b) = m.opt("bridge", super::profile::bridge_value)? {
        n.bridge = b;
    }
    if let Some(g) = m.opt("subnet", gateway_value)? {
        n.gateway = g;
    }
    if let Some(d) = m.opt("dns_domain", domain_value)? {
        n.dns_domain = d;
    }
    if let Some(list) = m.opt("dns_upstream", Node::list)? {
        n.dns_upstream = list.iter().map(resolver_value).collect::<Read<_>>()?;
    }
    Ok(n)
}

/// `10.77.0.1/16`: the gateway's address inside a private subnet of /8 to /28.
fn gateway_value(node: &Node) -> Read<Ipv4Net> {
    let s = node.string()?;
    let net: Ipv4Net = s.trim().parse().map_err(|_| {
        node.problem(format!(
            "{s:?} is not ADDRESS/PREFIX; write the gateway's address, e.g. 10.77.0.1/16"
        ))
    })?;
    let ip = net.addr();
    if !(8..=28).contains(&net.prefix_len()) {
        return Err(node.problem(format!("{s:?}: the prefix must be /8 to /28")));
    }
    if ip == net.network() || ip == net.broadcast() {
        return Err(node.problem(format!(
            "{s:?} names the network or broadcast address; give the gateway's, e.g. {}/{}",
            Ipv4Addr::from(u32::from(net.network()) + 1),
            net.prefix_len()
        )));
    }
    if !ip.is_private() && !net.trunc().contains(&Ipv4Addr::new(100, 64, 0, 1)) {
        return Err(node.problem(format!(
            "{s:?} is not a private range (10/8, 172.16/12, 192.168/16); sandboxes must not shadow public addresses"
        )));
    }
    Ok(net)
}

fn domain_value(node: &Node) -> Read<String> {
    let s = node
        .string()?
        .trim()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    if is_host_name(&s) && s.contains('.') {
        Ok(s)
    } else {
        Err(node.problem(format!(
            "{s:?} is not a DNS domain of at least two labels, e.g. agentlab.internal"
        )))
    }
}

/// `192.0.2.53` or `192.0.2.53:5353` (IPv6 as `[2001:db8::53]:53`).
fn resolver_value(node: &Node) -> Read<SocketAddr> {
    let s = node.string()?.trim();
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    s.parse::<SocketAddr>().map_err(|_| {
        node.problem(format!(
            "{s:?} is not a resolver address; e.g. 192.0.2.53, 192.0.2.53:5353, [2001:db8::53]:53"
        ))
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::parse_config_str;

    fn err(text: &str) -> String {
        crate::log::error_chain(&parse_config_str(text, Path::new("/c.yaml")).unwrap_err())
    }

    #[test]
    fn defaults_are_agentlab0_on_10_77() {
        let c = parse_config_str("", Path::new("/c.yaml")).unwrap();
        assert_eq!(c.network.bridge, "agentlab0");
        assert_eq!(c.network.gateway.to_string(), "10.77.0.1/16");
        assert_eq!(c.network.subnet().to_string(), "10.77.0.0/16");
        assert!(c.network.dns_upstream.is_empty());
    }

    #[test]
    fn keys_are_read() {
        let c = parse_config_str(
            "bridge: labbr0\nsubnet: 192.168.77.1/24\ndns_domain: Sbx.Example.\ndns_upstream: [192.0.2.53, '192.0.2.54:5353']\n",
            Path::new("/c.yaml"),
        )
        .unwrap();
        assert_eq!(c.network.bridge, "labbr0");
        assert_eq!(c.network.gateway_ip().to_string(), "192.168.77.1");
        assert_eq!(c.network.dns_domain, "sbx.example");
        assert_eq!(c.network.dns_upstream[1].to_string(), "192.0.2.54:5353");
    }

    #[test]
    fn bad_values_name_the_key_and_the_form() {
        for (text, want) in [
            ("subnet: 10.77.0.0/16\n", "network or broadcast"),
            ("subnet: 10.77.0.1\n", "ADDRESS/PREFIX"),
            ("subnet: 8.8.8.1/24\n", "not a private range"),
            ("subnet: 10.0.0.1/30\n", "/8 to /28"),
            ("dns_domain: local\n", "two labels"),
            ("dns_upstream: [resolver]\n", "not a resolver address"),
            ("bridge: 'a b'\n", "not a bridge name"),
        ] {
            let e = err(text);
            let key = text.split(':').next().unwrap();
            assert!(e.contains(key) && e.contains(want), "{text}: {e}");
        }
    }
}
