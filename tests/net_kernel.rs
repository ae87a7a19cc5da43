//! The sandbox network against the real kernel: bridge and TAP devices over
//! rtnetlink, and the nftables ruleset with busybox peers, each test in
//! network namespaces it creates (and removes, also on failure).
//!
//! Topology of the policy tests:
//!
//! ```text
//!  nf-sa (10.77.0.11) ─veth─┐                        ┌─ nf-up 203.0.113.2, httpd on 198.51.100.10
//!  nf-sb (10.77.0.12) ─veth─┤ nfbr0 10.77.0.1/16     │
//!                           └── nf-host ── nfup ─────┘   (default route)
//!                                       └─ nfin ── nf-intra 10.99.0.5
//! ```

mod common;

use agentlab::net::link::{self, LinkError};
use agentlab::sys::netns::in_netns;
use common::netns::Netns;

/// Runs `f` inside `ns`.
fn inside<T>(ns: &Netns, f: impl FnOnce() -> T) -> T {
    in_netns(&ns.name, f).unwrap()
}

#[test]
fn bridge_is_created_once_with_its_address_and_no_stp() {
    let host = Netns::new("nfb");
    let gw = "10.77.0.1/16".parse().unwrap();
    inside(&host, || link::ensure_bridge("nfbr0", gw)).unwrap();
    inside(&host, || link::ensure_bridge("nfbr0", gw)).unwrap();
    let addrs = host.sh("ip -4 -o addr show dev nfbr0");
    assert_eq!(addrs.matches("10.77.0.1/16").count(), 1, "{addrs}");
    assert!(host.sh("ip -o link show dev nfbr0").contains(",UP"));
    assert_eq!(
        host.sh("cat /sys/class/net/nfbr0/bridge/stp_state").trim(),
        "0"
    );
    assert_eq!(
        host.sh("cat /sys/class/net/nfbr0/bridge/forward_delay")
            .trim(),
        "0"
    );
    assert_eq!(
        host.sh("cat /proc/sys/net/ipv4/conf/nfbr0/route_localnet")
            .trim(),
        "1"
    );
}

#[test]
fn existing_device_that_is_not_a_bridge_is_refused_by_name() {
    let host = Netns::new("nfn");
    host.sh("ip link add nfdum0 type veth peer name nfdum0p");
    let err = inside(&host, || {
        link::ensure_bridge("nfdum0", "10.77.0.1/16".parse().unwrap())
    })
    .unwrap_err();
    assert!(matches!(err, LinkError::NotBridge { .. }), "{err}");
    assert!(
        err.to_string().contains("nfdum0 exists but is a veth"),
        "{err}"
    );
}

#[test]
fn tap_is_an_isolated_bridge_port_and_vanishes_with_its_fd() {
    let host = Netns::new("nft");
    inside(&host, || {
        link::ensure_bridge("nfbr0", "10.77.0.1/16".parse().unwrap())
    })
    .unwrap();
    let mac = [0xfe, 0x54, 0, 0, 0, 0x0b];
    let fd = inside(&host, || link::open_tap("nftap11", "nfbr0", Some(mac))).unwrap();
    let port = host.sh("bridge -d link show dev nftap11");
    assert!(port.contains("master nfbr0"), "{port}");
    assert!(port.contains("isolated on"), "{port}");
    assert!(host
        .sh("ip link show dev nftap11")
        .contains("fe:54:00:00:00:0b"));
    assert_eq!(
        inside(&host, || link::links_with_prefix("nftap")).unwrap(),
        vec!["nftap11"]
    );
    drop(fd);
    assert!(!host.try_sh("ip link show dev nftap11").status.success());
}

#[test]
fn tap_on_a_missing_bridge_names_the_bridge_and_leaves_no_tap() {
    let host = Netns::new("nfm");
    let err = inside(&host, || link::open_tap("nftap12", "nfnobr", None)).unwrap_err();
    assert!(err.to_string().contains("nfnobr"), "{err}");
    assert!(!host.try_sh("ip link show dev nftap12").status.success());
}

#[test]
fn deleting_a_missing_link_is_fine_and_a_present_one_goes() {
    let host = Netns::new("nfd");
    host.sh("ip link add nfdum1 type veth peer name nfdum1p");
    inside(&host, || link::delete_link("nfdum1")).unwrap();
    inside(&host, || link::delete_link("nfdum1")).unwrap();
    assert!(!host.try_sh("ip link show dev nfdum1").status.success());
}

#[test]
fn overlapping_route_is_reported_with_its_device() {
    let host = Netns::new("nfr");
    host.sh(
        "ip link add nfdum2 type veth peer name nfdum2p && ip link set nfdum2 up && ip link set nfdum2p up && \
         ip addr add 192.168.9.1/24 dev nfdum2 && ip route add 10.0.0.0/8 via 192.168.9.254 dev nfdum2 && \
         ip route add 172.16.0.0/12 dev nfdum2 && ip route add default via 192.168.9.254",
    );
    inside(&host, || {
        link::ensure_bridge("nfbr0", "10.77.0.1/16".parse().unwrap())
    })
    .unwrap();
    let found = inside(&host, || {
        link::route_conflicts("10.77.0.0/16".parse().unwrap(), "nfbr0")
    })
    .unwrap();
    assert_eq!(found, vec!["10.0.0.0/8 via 192.168.9.254 dev nfdum2"]);
    let narrower = inside(&host, || {
        link::route_conflicts("10.0.0.0/7".parse().unwrap(), "nfbr0")
    })
    .unwrap();
    assert_eq!(narrower, vec!["10.0.0.0/8 via 192.168.9.254 dev nfdum2"]);
}
