//! The sandbox network end to end: the daemon in its own network namespace
//! (the "host"), real TCG guests on its bridge getting leases from its DHCP
//! server and names from its DNS, and its nft table deciding what they reach.
//!
//! Around the host namespace each test builds:
//! - `up`: the "internet" — HTTP on 198.51.100.10 and .11 (documentation
//!   addresses), a resolver (dnsmasq) on 198.51.100.53 answering
//!   `allowed.test` → .10 and `other.test` → .11; the host's default route;
//! - `intra`: a private network the host can reach, HTTP on 10.99.0.5.
//!
//! Every namespace, and every process in it, goes when its guard drops.

mod common;

use std::process::{Child, Output};
use std::time::{Duration, Instant};

use common::netns::Netns;
use common::{stderr, stdout, Env, SHORT};

/// The namespaces around `env`'s host namespace, and their servers.
struct World {
    up: Netns,
    _intra: Netns,
    _servers: Vec<ChildGuard>,
    dir: std::path::PathBuf,
}

struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const CONFIG: &str = "dns_upstream: [198.51.100.53]\n";

fn world(env: &Env, tag: &str) -> World {
    let host = &env.netns;
    let up = Netns::new(&format!("u{tag}"));
    let intra = Netns::new(&format!("i{tag}"));
    host.veth("alup0", &up, "eth0");
    host.sh("ip addr add 203.0.113.1/24 dev alup0 && ip route add default via 203.0.113.2");
    up.sh("ip addr add 203.0.113.2/24 dev eth0 && \
         ip addr add 198.51.100.10/32 dev lo && ip addr add 198.51.100.11/32 dev lo && \
         ip addr add 198.51.100.53/32 dev lo");
    host.veth("alin0", &intra, "eth0");
    host.sh("ip addr add 10.99.0.1/24 dev alin0");
    intra.sh("ip addr add 10.99.0.5/24 dev eth0 && ip route add default via 10.99.0.1");

    let dir = env.path("www");
    let mut servers = Vec::new();
    for (ns, addr, body) in [
        (&up, "198.51.100.10:80", "upstream-ok"),
        (&up, "198.51.100.11:80", "other-ok"),
        (&intra, "10.99.0.5:80", "intranet-ok"),
        (host, "0.0.0.0:2222", "host-port-ok"),
    ] {
        let root = dir.join(addr.replace([':', '.'], "_"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("index.html"), body).unwrap();
        let child = ns
            .command("busybox", &["httpd", "-f", "-p", addr, "-h"])
            .arg(&root)
            .spawn()
            .unwrap();
        servers.push(ChildGuard(child));
    }
    let dns = up.dnsmasq(
        "198.51.100.53",
        &[
            "--except-interface=eth0",
            "--local-ttl=60",
            "--host-record=allowed.test,198.51.100.10",
            "--host-record=other.test,198.51.100.11",
        ],
    );
    servers.push(ChildGuard(dns));
    World {
        up,
        _intra: intra,
        _servers: servers,
        dir,
    }
}

fn exec(env: &Env, vmid: u32, script: &str) -> Output {
    let id = vmid.to_string();
    env.cli(&["exec", "--timeout", "60s", &id, "--", "sh", "-c", script])
}

/// Polls `f` until true or `limit` passes.
fn until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    false
}

/// The guest's address on eth0 once DHCP gave it one; panics otherwise.
fn leased_ip(env: &Env, vmid: u32) -> String {
    let want = env.sandbox(vmid)["ip"].as_str().unwrap_or("").to_string();
    assert!(!want.is_empty(), "sandbox {vmid} has no address recorded");
    let got = until(SHORT, || {
        stdout(&exec(env, vmid, "ip -4 -o addr show dev eth0")).contains(&format!("{want}/"))
    });
    assert!(
        got,
        "guest never got {want}: {}\n{}",
        stdout(&exec(env, vmid, "ip addr; cat /run/udhcpc.log")),
        env.daemon_log()
    );
    want
}

/// `wget` from the guest: Some(body) when it connected, None otherwise.
fn fetch(env: &Env, vmid: u32, url: &str) -> Option<String> {
    let out = exec(env, vmid, &format!("timeout 5 wget -q -O - {url}"));
    out.status.success().then(|| stdout(&out))
}

fn nft_table(env: &Env) -> String {
    let out = env.netns.try_sh("nft list table inet agentlab");
    stdout(&out)
}

#[test]
fn nat_reaches_the_internet_and_nothing_private() {
    let mut env = Env::new("netnat", CONFIG);
    let w = world(&env, "nat");
    env.start_daemon();
    let vmid = env.new_ready(&[]);
    let ip = leased_ip(&env, vmid);
    assert!(ip.starts_with("10.77."), "{ip}");
    // The lease carried the router and our resolver.
    let conf = stdout(&exec(&env, vmid, "ip route; cat /etc/resolv.conf"));
    assert!(conf.contains("default via 10.77.0.1"), "{conf}");
    assert!(conf.contains("nameserver 10.77.0.1"), "{conf}");

    assert_eq!(
        fetch(&env, vmid, "http://198.51.100.10/").as_deref(),
        Some("upstream-ok")
    );
    // Sandbox names are not for a profile that did not ask for them.
    let own = exec(
        &env,
        vmid,
        &format!("nslookup sbx-{vmid}.agentlab.internal 10.77.0.1"),
    );
    assert!(!own.status.success(), "{}", stdout(&own));
    // Names resolve through the gateway, forwarded upstream.
    assert_eq!(
        fetch(&env, vmid, "http://allowed.test/").as_deref(),
        Some("upstream-ok")
    );
    for (url, what) in [
        ("http://10.99.0.5/", "an RFC 1918 network"),
        ("http://169.254.169.254/", "cloud metadata"),
        ("http://10.77.0.1:2222/", "another port of the host"),
        ("http://203.0.113.1:2222/", "the host on its uplink address"),
    ] {
        assert_eq!(fetch(&env, vmid, url), None, "{what} was reachable: {url}");
    }
    // The host namespace itself does reach the intranet: the block is ours.
    assert!(env
        .netns
        .sh("busybox timeout 5 busybox wget -q -O - http://10.99.0.5/")
        .contains("intranet-ok"));

    let show = env.ok(&["net", "show", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!(v["up"], true, "{show}");
    let me = &v["sandboxes"][0];
    assert_eq!(me["vmid"], vmid);
    assert_eq!(me["ip"], ip.as_str());
    assert_eq!(me["lease"], "bound", "{show}");
    assert!(me["dropped_packets"].as_u64().unwrap() > 0, "{show}");
    drop(w);
}

#[test]
fn off_has_no_interface_and_allowlist_reaches_only_what_it_lists() {
    let mut env = Env::new("netallow", CONFIG);
    let _w = world(&env, "alw");
    env.write_profile("off.yaml", "name: offline\nnetwork: { mode: off }\n");
    env.write_profile(
        "allow.yaml",
        "name: allow\nnetwork: { mode: allowlist, allow: [allowed.test, '198.51.100.53:53'] }\n",
    );
    env.start_daemon();
    let off = env.new_ready(&["--profile", "offline"]);
    let allow = env.new_ready(&["--profile", "allow"]);

    let links = stdout(&exec(&env, off, "ls /sys/class/net"));
    assert_eq!(links.split_whitespace().collect::<Vec<_>>(), ["lo"]);
    assert!(env.sandbox(off)["ip"].is_null());

    leased_ip(&env, allow);
    let ns = stdout(&exec(
        &env,
        allow,
        "nslookup other.test 10.77.0.1 2>&1; true",
    ));
    assert!(
        ns.contains("NXDOMAIN") || ns.contains("can't resolve"),
        "{ns}"
    );
    // No route around our resolver, even to one the allowlist names by IP:port
    // — DNS from an allowlist sandbox goes to the gateway or nowhere.
    let direct = exec(&env, allow, "nslookup allowed.test 198.51.100.53");
    assert!(!direct.status.success(), "{}", stdout(&direct));
    // Before any lookup the allowed name's address is closed.
    assert_eq!(fetch(&env, allow, "http://198.51.100.10/"), None);
    assert_eq!(
        fetch(&env, allow, "http://allowed.test/").as_deref(),
        Some("upstream-ok")
    );
    // other.test's address is reachable by nobody's lookup: closed.
    assert_eq!(fetch(&env, allow, "http://198.51.100.11/"), None);
    assert!(
        nft_table(&env).contains("198.51.100.10"),
        "{}",
        nft_table(&env)
    );
}

#[test]
fn sandboxes_cannot_reach_each_other_and_expose_opens_one_port() {
    let mut env = Env::new("netexpose", CONFIG);
    let w = world(&env, "exp");
    env.start_daemon();
    let a = env.new_ready(&[]);
    let b = env.new_ready(&[]);
    let ip_a = leased_ip(&env, a);
    let ip_b = leased_ip(&env, b);
    for vmid in [a, b] {
        let out = exec(
            &env,
            vmid,
            "mkdir -p /srv && echo guest-$(hostname) >/srv/index.html && busybox httpd -p 8080 -h /srv",
        );
        assert!(out.status.success(), "{}", stderr(&out));
    }
    assert_eq!(fetch(&env, a, &format!("http://{ip_b}:8080/")), None);
    assert_eq!(fetch(&env, b, &format!("http://{ip_a}:8080/")), None);
    let ping = exec(&env, a, &format!("ping -c 1 -W 2 {ip_b}"));
    assert!(!ping.status.success(), "A pinged B");

    let id = a.to_string();
    let name = env
        .ok(&["sandbox", "expose", &id, ":8080", "--host-port", "18080"])
        .split(':')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(name, format!("sbx-{a}-8080"));
    let from_up = || {
        w.up.try_sh("busybox timeout 5 busybox wget -q -O - http://203.0.113.1:18080/")
    };
    assert!(
        stdout(&from_up()).starts_with("guest-"),
        "{}",
        stderr(&from_up())
    );
    let listed = env.ok(&["sandbox", "exposed"]);
    assert!(
        listed.contains(&name) && listed.contains("18080"),
        "{listed}"
    );
    // A port already exposed cannot be taken twice.
    let again = env.cli(&[
        "sandbox",
        "expose",
        &b.to_string(),
        ":8080",
        "--host-port",
        "18080",
    ]);
    assert_eq!(again.status.code(), Some(1), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("already exposed"),
        "{}",
        stderr(&again)
    );

    env.ok(&["sandbox", "unexpose", &name]);
    assert!(
        !from_up().status.success(),
        "still reachable after unexpose"
    );
    let logs = env.ok(&["logs", &id, "--tail", "200"]);
    assert!(
        logs.contains("exposed guest port 8080") && logs.contains("closed"),
        "{logs}"
    );
    let _ = &w.dir;
}

#[test]
fn destroy_and_restart_leave_no_rules_for_the_dead() {
    let mut env = Env::new("netclean", CONFIG);
    let _w = world(&env, "cln");
    env.start_daemon();
    let a = env.new_ready(&[]);
    let b = env.new_ready(&[]);
    leased_ip(&env, a);
    let table = nft_table(&env);
    assert!(table.contains(&format!("out_{a}")), "{table}");
    env.ok(&["sandbox", "destroy", &a.to_string()]);
    let table = nft_table(&env);
    assert!(!table.contains(&format!("out_{a}")), "{table}");
    assert!(table.contains(&format!("out_{b}")), "{table}");
    assert!(!env.netns.sh("ip -o link").contains(&format!("altap{a}")));

    // b dies with the daemon away; the next daemon rebuilds the table from
    // the store, so b's rules go too, and b's live twin keeps working.
    let c = env.new_ready(&[]);
    let pid_b = env.qemu_pid(b).unwrap();
    env.kill_daemon();
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid_b.to_string()])
        .status();
    env.netns.sh(&format!(
        "nft add chain inet agentlab out_{}_leftover",
        b + 1000
    ));
    env.start_daemon();
    assert!(env.wait_state(b, "FAILED", SHORT), "{}", env.state(b));
    env.ok(&["sandbox", "destroy", &b.to_string()]);
    let table = nft_table(&env);
    assert!(!table.contains(&format!("out_{b}")), "{table}");
    assert!(!table.contains("leftover"), "{table}");
    leased_ip(&env, c);
    assert!(fetch(&env, c, "http://198.51.100.10/").is_some());
}

#[test]
fn a_subnet_overlapping_a_host_route_is_refused_with_the_route_named() {
    let mut env = Env::new("netroute", CONFIG);
    let _w = world(&env, "rte");
    // The host already routes part of the sandbox subnet somewhere else.
    env.netns.sh("ip route add 10.77.8.0/24 via 203.0.113.2");
    env.start_daemon();
    let out = env.cli(&["sandbox", "new", "--wait"]);
    assert!(!out.status.success());
    let vmid = env.ok(&["sandbox", "list", "--json"]);
    assert!(vmid.contains("FAILED"), "{vmid}");
    let logs = env.ok(&["logs", "--tail", "50", "1000"]);
    assert!(
        logs.contains("overlaps the host route 10.77.8.0/24 via 203.0.113.2"),
        "{logs}"
    );
    // Sandboxes without a network are unaffected.
    env.write_profile("off.yaml", "name: offline\nnetwork: { mode: off }\n");
    env.new_ready(&["--profile", "offline"]);
    let check = env.cli(&["net", "check"]);
    assert_eq!(check.status.code(), Some(2));
    assert!(
        stdout(&check).contains("10.77.8.0/24"),
        "{}",
        stdout(&check)
    );
}
