//! The sandbox network the daemon builds and polices itself (DESIGN.md §6):
//! the bridge and TAP devices (`link`), the DNS forwarder with per-sandbox
//! policy (`dns`), the nftables ruleset (`nft`), the rtnetlink messages
//! `link` sends (`rtnl`) and the host readiness report (`check`).

pub mod check;
pub mod dns;
pub mod link;
pub mod nft;
pub mod rtnl;

use std::collections::HashSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// The address for a new sandbox: the VMID's own slot in the subnet when it
/// is free, else the next free one after it. Never the network, gateway or
/// broadcast address; `None` when the subnet is full.
pub fn pick_ip(gateway: Ipv4Net, vmid: u32, used: &HashSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    let net = u32::from(gateway.network());
    let hosts = u32::from(gateway.broadcast()) - net - 1; // .1 ..= broadcast-1
    let start = vmid % hosts;
    (0..hosts)
        .map(|i| Ipv4Addr::from(net + 1 + (start + i) % hosts))
        .find(|ip| *ip != gateway.addr() && !used.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gw(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn a_vmid_keeps_its_slot_and_collisions_move_on() {
        let g = gw("10.77.0.1/16");
        let a = pick_ip(g, 1000, &HashSet::new()).unwrap();
        assert_eq!(a, pick_ip(g, 1000, &HashSet::new()).unwrap());
        assert_ne!(a, pick_ip(g, 1001, &HashSet::new()).unwrap());
        let b = pick_ip(g, 1000, &HashSet::from([a])).unwrap();
        assert_ne!(a, b);
        assert!(g.trunc().contains(&b));
    }

    #[test]
    fn never_the_network_gateway_or_broadcast_and_none_when_full() {
        let g = gw("192.168.5.1/29"); // .1 gateway, .2-.6 hosts
        let mut used = HashSet::new();
        for vmid in 1000..1005 {
            let ip = pick_ip(g, vmid, &used).unwrap();
            assert!(![0, 1, 7].contains(&ip.octets()[3]), "{ip}");
            assert!(used.insert(ip));
        }
        assert_eq!(pick_ip(g, 1005, &used), None);
    }
}
