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

// ---- nftables policy, with veths standing in for TAPs ----

use agentlab::config::{AllowRule, NetworkMode};
use agentlab::net::nft::{
    self, AllowNet, Exposure, Nft, NftCli, Plan, Proto, SandboxNet, Services,
};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

const UPSTREAM: &str = "198.51.100.10";
const UPSTREAM_OTHER: &str = "198.51.100.20";
const INTRANET: &str = "10.99.0.5";

/// The whole topology of the module comment; `t` keeps concurrent tests'
/// namespace names apart.
struct Lab {
    host: Netns,
    up: Netns,
    intra: Netns,
    a: Netns,
    b: Netns,
    www: PathBuf,
}

impl Lab {
    fn new(t: &str) -> Lab {
        let www = std::env::temp_dir().join(format!("nf-www-{t}-{}", std::process::id()));
        std::fs::create_dir_all(&www).unwrap();
        std::fs::write(www.join("index.html"), "hello\n").unwrap();
        let lab = Lab {
            host: Netns::new(&format!("nfh{t}")),
            up: Netns::new(&format!("nfu{t}")),
            intra: Netns::new(&format!("nfi{t}")),
            a: Netns::new(&format!("nfa{t}")),
            b: Netns::new(&format!("nfb{t}")),
            www,
        };
        let gw = "10.77.0.1/16".parse().unwrap();
        inside(&lab.host, || link::ensure_bridge("nfbr0", gw)).unwrap();
        inside(&lab.host, || link::set_ipv4_forwarding(true)).unwrap();
        lab.host.veth("nfup", &lab.up, "nfupp");
        lab.host
            .sh("ip addr add 203.0.113.1/24 dev nfup && ip route add default via 203.0.113.2");
        // No route back to 10.77.0.0/16 upstream: sandbox traffic only
        // returns if it was masqueraded.
        lab.up.sh(&format!(
            "ip addr add 203.0.113.2/24 dev nfupp && ip addr add {UPSTREAM}/32 dev lo && \
             ip addr add {UPSTREAM_OTHER}/32 dev lo"
        ));
        lab.host.veth("nfin", &lab.intra, "nfinp");
        lab.host.sh("ip addr add 10.99.0.1/24 dev nfin");
        lab.intra.sh(&format!(
            "ip addr add {INTRANET}/24 dev nfinp && ip route add default via 10.99.0.1"
        ));
        lab.sandbox(&lab.a, "nfa0", 11);
        lab.sandbox(&lab.b, "nfb0", 12);
        lab.serve(&lab.up, "80");
        lab.serve(&lab.intra, "80");
        lab.serve(&lab.host, "10.77.0.1:2222");
        lab.serve(&lab.a, "8080");
        lab.serve(&lab.b, "80");
        lab
    }

    /// A veth standing in for sandbox `vmid`'s TAP, attached like one.
    fn sandbox(&self, ns: &Netns, port: &str, vmid: u8) {
        self.host.veth(port, ns, "eth0");
        inside(&self.host, || link::attach_port(port, "nfbr0")).unwrap();
        ns.sh(&format!(
            "ip link set eth0 address 52:54:00:00:00:{vmid:02x} && \
             ip addr add 10.77.0.{vmid}/16 dev eth0 && ip route add default via 10.77.0.1"
        ));
    }

    fn serve(&self, ns: &Netns, listen: &str) {
        ns.sh(&format!(
            "busybox httpd -p {listen} -h {}",
            self.www.display()
        ));
    }

    fn apply(&self, script: &str) {
        inside(&self.host, || NftCli::default().apply(script))
            .unwrap_or_else(|e| panic!("{e}\n{script}"));
    }

    fn listing(&self) -> String {
        inside(&self.host, || NftCli::default().list_json()).unwrap()
    }

    fn plan(&self, sandboxes: Vec<SandboxNet>) -> Plan {
        Plan {
            bridge: "nfbr0".into(),
            gateway: Ipv4Addr::new(10, 77, 0, 1),
            subnet: "10.77.0.0/16".parse().unwrap(),
            services: Services::default(),
            sandboxes,
            exposures: vec![],
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.www);
    }
}

fn sandbox_net(vmid: u8, tap: &str, mode: NetworkMode) -> SandboxNet {
    SandboxNet {
        vmid: u32::from(vmid),
        tap: tap.into(),
        mac: [0x52, 0x54, 0, 0, 0, vmid],
        ip: Ipv4Addr::new(10, 77, 0, vmid),
        mode,
        allow: vec![],
        see_sandboxes: false,
    }
}

/// Does an HTTP GET of `url` from `ns` succeed? (`timeout`, because this
/// busybox's `wget -T` segfaults.)
fn fetches(ns: &Netns, url: &str) -> bool {
    fetches_each(ns, &[url]) == [true]
}

/// [`fetches`] for several URLs at once, so that the dropped ones time out
/// together.
fn fetches_each(ns: &Netns, urls: &[&str]) -> Vec<bool> {
    let children: Vec<_> = urls
        .iter()
        .map(|u| {
            ns.command(
                "timeout",
                &["3", "busybox", "wget", "-q", "-O", "/dev/null", u],
            )
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|mut c| c.wait().unwrap().success())
        .collect()
}

#[test]
fn nat_reaches_upstream_but_not_private_ranges_or_host_ports() {
    let lab = Lab::new("n");
    lab.apply(&nft::render_table(&lab.plan(vec![sandbox_net(
        11,
        "nfa0",
        NetworkMode::Nat,
    )])));
    assert!(
        fetches(&lab.host, &format!("http://{INTRANET}/")),
        "the intranet is up"
    );
    let reached = fetches_each(
        &lab.a,
        &[
            &format!("http://{UPSTREAM}/"),
            &format!("http://{INTRANET}/"),
            "http://10.77.0.1:2222/",
            "http://203.0.113.1:2222/",
        ],
    );
    assert_eq!(reached, [true, false, false, false]);
    let c = nft::counters(&lab.listing());
    assert!(c[&11].dropped_packets >= 3, "{c:?}");
}

#[test]
fn allowlist_reaches_listed_networks_and_resolved_addresses_only() {
    let lab = Lab::new("l");
    let rules = [AllowRule::parse(&format!("{UPSTREAM}/32:80")).unwrap()];
    let sb = SandboxNet {
        allow: AllowNet::from_rules(&rules),
        ..sandbox_net(11, "nfa0", NetworkMode::Allowlist)
    };
    lab.apply(&nft::render_table(&lab.plan(vec![sb])));
    let before = fetches_each(
        &lab.a,
        &[
            &format!("http://{UPSTREAM}/"),
            &format!("http://{UPSTREAM_OTHER}/"),
            &format!("http://{INTRANET}/"),
        ],
    );
    assert_eq!(before, [true, false, false]);
    let other: IpAddr = UPSTREAM_OTHER.parse().unwrap();
    lab.apply(&nft::render_allow_resolved(
        11,
        other,
        Some(80),
        Duration::from_secs(60),
    ));
    assert!(fetches(&lab.a, &format!("http://{UPSTREAM_OTHER}/")));
    // Refreshing an element that is already there must not fail.
    lab.apply(&nft::render_allow_resolved(
        11,
        other,
        Some(80),
        Duration::from_secs(60),
    ));
    assert!(!fetches(&lab.a, &format!("http://{INTRANET}/")));
}

#[test]
fn off_sandbox_with_a_port_reaches_nothing() {
    let lab = Lab::new("o");
    lab.apply(&nft::render_table(&lab.plan(vec![sandbox_net(
        11,
        "nfa0",
        NetworkMode::Off,
    )])));
    let reached = fetches_each(
        &lab.a,
        &[
            &format!("http://{UPSTREAM}/"),
            &format!("http://{INTRANET}/"),
            "http://10.77.0.1:2222/",
        ],
    );
    assert_eq!(reached, [false, false, false]);
    assert!(nft::counters(&lab.listing())[&11].dropped_packets > 0);
}

#[test]
fn sandboxes_cannot_reach_each_other() {
    let lab = Lab::new("i");
    let sandboxes = vec![
        sandbox_net(11, "nfa0", NetworkMode::Nat),
        sandbox_net(12, "nfb0", NetworkMode::Nat),
    ];
    lab.apply(&nft::render_table(&lab.plan(sandboxes)));
    assert!(
        fetches(&lab.host, "http://10.77.0.12/"),
        "B serves the host"
    );
    assert!(
        fetches(&lab.b, &format!("http://{UPSTREAM}/")),
        "B is online"
    );
    assert!(!fetches(&lab.a, "http://10.77.0.12/"));
}

#[test]
fn spoofed_source_address_or_mac_is_dropped_and_counted() {
    let lab = Lab::new("s");
    lab.apply(&nft::render_table(&lab.plan(vec![sandbox_net(
        11,
        "nfa0",
        NetworkMode::Nat,
    )])));
    let url = format!("http://{UPSTREAM}/");
    assert!(fetches(&lab.a, &url));
    lab.a.sh("ip addr flush dev eth0 && ip addr add 10.77.0.99/16 dev eth0 && ip route add default via 10.77.0.1");
    assert!(!fetches(&lab.a, &url), "foreign IPv4 source");
    lab.a.sh(
        "ip addr flush dev eth0 && ip addr add 10.77.0.11/16 dev eth0 && ip route add default via 10.77.0.1 && \
         ip link set eth0 address 52:54:00:00:00:99",
    );
    assert!(!fetches(&lab.a, &url), "foreign MAC");
    assert!(nft::counters(&lab.listing())[&11].spoofed_packets > 0);
}

#[test]
fn exposure_forwards_a_host_port_until_removed() {
    let (lab, e) = exposure_lab("e", Ipv4Addr::UNSPECIFIED);
    lab.apply(&nft::render_add_exposure(&e).unwrap());
    let local = ["http://127.0.0.1:18080/", "http://10.77.0.1:18080/"];
    assert_eq!(fetches_each(&lab.host, &local), [true, true]);
    assert!(fetches(&lab.up, "http://203.0.113.1:18080/"));
    lab.apply(&nft::render_remove_exposure(&e).unwrap());
    assert_eq!(fetches_each(&lab.host, &local), [false, false]);
    assert!(!fetches(&lab.up, "http://203.0.113.1:18080/"));
}

#[test]
fn removed_sandbox_leaves_no_trace_and_others_keep_working() {
    let lab = Lab::new("r");
    lab.apply(&nft::render_table(&lab.plan(vec![])));
    lab.apply(&nft::render_add_sandbox(&sandbox_net(
        11,
        "nfa0",
        NetworkMode::Nat,
    )));
    lab.apply(&nft::render_add_sandbox(&sandbox_net(
        12,
        "nfb0",
        NetworkMode::Nat,
    )));
    let url = format!("http://{UPSTREAM}/");
    assert!(fetches(&lab.a, &url));
    assert_eq!(nft::sandboxes_in_table(&lab.listing()), vec![11, 12]);
    lab.apply(&nft::render_remove_sandbox(11, &lab.listing()));
    let text = lab
        .host
        .sh("nft list table inet agentlab; nft list table bridge agentlab");
    assert!(
        !text.contains("_11") && !text.contains("10.77.0.11") && !text.contains("nfa0"),
        "{text}"
    );
    assert_eq!(nft::sandboxes_in_table(&lab.listing()), vec![12]);
    assert!(!fetches(&lab.a, &url));
    assert!(fetches(&lab.b, &url));
}

#[test]
fn every_rendered_script_passes_the_kernel_check() {
    let host = Netns::new("nfc");
    let check = NftCli { check_only: true };
    let mut plan = Plan {
        bridge: "nfbr0".into(),
        gateway: Ipv4Addr::new(10, 77, 0, 1),
        subnet: "10.77.0.0/16".parse().unwrap(),
        services: Services::default(),
        sandboxes: vec![sandbox_net(11, "nfa0", NetworkMode::Nat)],
        exposures: vec![],
    };
    inside(&host, || NftCli::default().apply(&nft::render_table(&plan))).unwrap();
    let allowlisted = SandboxNet {
        allow: AllowNet::from_rules(&[AllowRule::parse("192.0.2.0/24:443").unwrap()]),
        see_sandboxes: true,
        ..sandbox_net(12, "nfb0", NetworkMode::Allowlist)
    };
    let e = Exposure {
        name: "x".into(),
        vmid: 11,
        guest_ip: Ipv4Addr::new(10, 77, 0, 11),
        guest_port: 53,
        host_port: 5353,
        bind: "127.0.0.1".parse().unwrap(),
        proto: Proto::Udp,
    };
    plan.sandboxes.push(allowlisted.clone());
    plan.exposures.push(e.clone());
    let scripts = [
        nft::render_table(&plan),
        nft::render_add_sandbox(&allowlisted),
        nft::render_add_sandbox(&sandbox_net(13, "nfc0", NetworkMode::Off)),
        nft::render_add_exposure(&e).unwrap(),
        nft::render_remove_sandbox(
            11,
            &inside(&host, || NftCli::default().list_json()).unwrap(),
        ),
    ];
    for s in &scripts {
        inside(&host, || check.apply(s)).unwrap_or_else(|e| panic!("{e}\n{s}"));
    }
    let bad = inside(&host, || {
        check.apply("add rule inet agentlab nosuchchain accept")
    })
    .unwrap_err();
    assert!(bad.to_string().contains("nosuchchain"), "{bad}");
}

#[test]
fn check_finds_a_foreign_forward_drop_and_the_missing_bridge() {
    use agentlab::net::check::{check, CheckInput, Level};
    let host = Netns::new("nfk");
    host.sh("nft add table ip filter && \
         nft 'add chain ip filter FORWARD { type filter hook forward priority 0; policy drop; }'");
    let cfg = CheckInput {
        bridge: "nfbr0".into(),
        gateway: Ipv4Addr::new(10, 77, 0, 1),
        subnet: "10.77.0.0/16".parse().unwrap(),
    };
    let findings = inside(&host, || check(&cfg));
    let drop = findings
        .iter()
        .find(|f| f.what.contains("chain FORWARD"))
        .unwrap();
    assert_eq!(drop.level, Level::Error);
    let bridge = findings.iter().find(|f| f.what.contains("nfbr0")).unwrap();
    assert_eq!(bridge.level, Level::Warn);
    inside(&host, || {
        link::ensure_bridge("nfbr0", "10.77.0.1/16".parse().unwrap())
    })
    .unwrap();
    let findings = inside(&host, || check(&cfg));
    let bridge = findings.iter().find(|f| f.what.contains("nfbr0")).unwrap();
    assert_eq!(bridge.level, Level::Ok);
}

// ---- attacks (review of issue 4) ----

/// Regression: the DNAT of an exposure bound to 127.0.0.1 ran in
/// `prerouting` before the kernel's martian check, so a neighbour on the
/// uplink that sent packets for 127.0.0.1 to the host's MAC reached the
/// guest port the operator meant to keep local.
#[test]
fn exposure_bound_to_loopback_is_not_reachable_from_the_uplink() {
    let (lab, e) = exposure_lab("x1", Ipv4Addr::LOCALHOST);
    lab.apply(&nft::render_add_exposure(&e).unwrap());
    assert!(
        fetches(&lab.host, "http://127.0.0.1:18080/"),
        "works locally"
    );
    // The neighbour routes 127.0.0.1 to the host, as a hostile LAN peer can.
    lab.up
        .sh("ip route del local 127.0.0.0/8 dev lo table local && \
         ip route del local 127.0.0.1 dev lo table local && \
         ip route add 127.0.0.1/32 via 203.0.113.1 dev nfupp src 203.0.113.2 && \
         sysctl -qw net.ipv4.conf.all.route_localnet=1 net.ipv4.conf.nfupp.route_localnet=1 \
            net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.nfupp.rp_filter=0");
    // Whether the handshake completes depends on the neighbour accepting
    // replies from 127.0.0.1; a raw socket does. The guest seeing the SYN is
    // the breach, so count what arrives there.
    lab.a.sh("nft add table ip rvseen && \
         nft add chain ip rvseen input '{ type filter hook input priority 0; }' && \
         nft add rule ip rvseen input ip saddr 203.0.113.2 tcp dport 8080 counter");
    fetches(&lab.up, "http://127.0.0.1:18080/");
    let seen = lab.a.sh("nft list chain ip rvseen input");
    assert!(
        seen.contains("counter packets 0 "),
        "a loopback-bound exposure let the uplink through: {seen}"
    );
}

/// Regression: in allowlist mode the addresses an allowed name resolved to
/// were accepted before any range check, so a name whose answer is private
/// (DNS rebinding: an allowed domain the attacker controls answering with
/// an intranet host, cloud metadata or another sandbox) opened it.
#[test]
fn allowlist_name_resolving_to_a_private_address_opens_nothing() {
    let lab = Lab::new("x2");
    let sandboxes = vec![
        sandbox_net(11, "nfa0", NetworkMode::Allowlist),
        sandbox_net(12, "nfb0", NetworkMode::Nat),
    ];
    lab.apply(&nft::render_table(&lab.plan(sandboxes)));
    // Cloud metadata, served by the intranet host.
    lab.intra.sh("ip addr add 169.254.169.254/32 dev lo");
    lab.host.sh("ip route add 169.254.169.254/32 via 10.99.0.5");
    assert!(
        fetches(&lab.host, "http://169.254.169.254/"),
        "metadata is up"
    );
    for addr in [INTRANET, "169.254.169.254", "10.77.0.12", UPSTREAM] {
        lab.apply(&nft::render_allow_resolved(
            11,
            addr.parse().unwrap(),
            None,
            Duration::from_secs(60),
        ));
    }
    let reached = fetches_each(
        &lab.a,
        &[
            &format!("http://{UPSTREAM}/"),
            &format!("http://{INTRANET}/"),
            "http://169.254.169.254/",
            "http://10.77.0.12/",
        ],
    );
    assert_eq!(
        reached,
        [true, false, false, false],
        "public, intranet, metadata, sandbox B"
    );
}

/// A guest that routes 127.0.0.1 to the gateway (the bridge has
/// `route_localnet`, for loopback exposures) still reaches no host service
/// but DHCP and DNS on the gateway address.
#[test]
fn loopback_through_the_gateway_reaches_no_host_service() {
    let lab = Lab::new("x3");
    lab.apply(&nft::render_table(&lab.plan(vec![sandbox_net(
        11,
        "nfa0",
        NetworkMode::Nat,
    )])));
    lab.serve(&lab.host, "127.0.0.1:2223");
    assert!(fetches(&lab.host, "http://127.0.0.1:2223/"), "it serves");
    lab.a
        .sh("ip route del local 127.0.0.0/8 dev lo table local && \
         ip route del local 127.0.0.1 dev lo table local && \
         ip route add 127.0.0.1/32 via 10.77.0.1 dev eth0 src 10.77.0.11 && \
         sysctl -qw net.ipv4.conf.all.route_localnet=1 net.ipv4.conf.eth0.route_localnet=1");
    let before = nft::counters(&lab.listing())
        .get(&11)
        .map_or(0, |c| c.dropped_packets);
    assert!(!fetches(&lab.a, "http://127.0.0.1:2223/"));
    let after = nft::counters(&lab.listing())[&11].dropped_packets;
    assert!(after > before, "the packets arrived and were refused");
}

/// A guest running a DHCP server answers nobody on the bridge but the host:
/// its port is isolated, so another sandbox's DISCOVER never meets it.
#[test]
fn rogue_dhcp_server_in_a_sandbox_leases_nothing_to_another() {
    let lab = Lab::new("x4");
    let dir = std::env::temp_dir().join(format!("rv-udhcpd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = Cleanup(dir.clone());
    let conf = dir.join("udhcpd.conf");
    std::fs::write(
        &conf,
        format!(
            "start 10.77.0.100\nend 10.77.0.110\ninterface eth0\nlease_file {}\nopt router 10.77.0.12\n",
            dir.join("leases").display()
        ),
    )
    .unwrap();
    std::fs::write(dir.join("leases"), "").unwrap();
    lab.b.sh(&format!("busybox udhcpd {}", conf.display()));
    let udhcpc = "timeout 8 busybox udhcpc -n -q -t 3 -T 1 -s /bin/true -i";
    // Control, before any ruleset: the bridge itself hears the rogue server.
    assert!(
        lab.host.try_sh(&format!("{udhcpc} nfbr0")).status.success(),
        "the rogue server answers"
    );
    assert!(
        !lab.a.try_sh(&format!("{udhcpc} eth0")).status.success(),
        "sandbox A took a lease from sandbox B"
    );
}

struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A lab with sandbox 11 on the bridge and its guest port 8080 described as
/// exposed on host port 18080 at `bind` (not yet applied).
fn exposure_lab(tag: &str, bind: Ipv4Addr) -> (Lab, Exposure) {
    let lab = Lab::new(tag);
    lab.apply(&nft::render_table(&lab.plan(vec![sandbox_net(
        11,
        "nfa0",
        NetworkMode::Off,
    )])));
    let e = Exposure {
        name: "sbx-11-8080".into(),
        vmid: 11,
        guest_ip: Ipv4Addr::new(10, 77, 0, 11),
        guest_port: 8080,
        host_port: 18080,
        bind: IpAddr::V4(bind),
        proto: Proto::Tcp,
    };
    (lab, e)
}
