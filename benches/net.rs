//! The sandbox network's speed, next to dnsmasq (issue 4's benchmark).
//!
//! `sudo cargo bench --bench net` prints three comparisons, each measured the
//! same way against agentlab's server and against dnsmasq serving the same
//! client on the same bridge:
//! - DHCP: busybox `udhcpc` from start to bound lease (DISCOVER → ACK plus the
//!   client's own start-up, equal on both sides), median of 20;
//! - DNS: query round trips, forwarded (a fresh name each time, answered by an
//!   upstream resolver) and cached (the same name again), median and p99;
//! - throughput: `wget` of 200 MB from an upstream HTTP server through the
//!   gateway, with agentlab's nft table in place (nat mode) next to the bare
//!   masquerade rule a dnsmasq setup would use.
//!
//! The "guest" is a network namespace on a veth port of the bridge rather than
//! a VM, so the figures are the network's and not TCG's. Everything runs in
//! namespaces this program creates and removes (needs root, dnsmasq,
//! busybox-static, nftables).

#[path = "../tests/common/netns.rs"]
mod netns;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentlab::config::NetworkMode;
use agentlab::dhcp::{self, Binding, DhcpServer, LeaseEvent};
use agentlab::net::dns::codec::{Header, Message, Question};
use agentlab::net::dns::{self, Client, ClientPolicy, DnsServer, Resolved};
use agentlab::net::{link, nft};
use agentlab::sys::netns::in_netns;
use netns::Netns;

const CLIENT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x02];
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const UPSTREAM_DNS: &str = "198.51.100.53";
const DHCP_RUNS: usize = 20;
const DNS_QUERIES: usize = 300;

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes the scratch directory, also when a measurement panics.
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Topology {
    _scratch: Scratch,
    srv: Netns,
    cli: Netns,
    up: Netns,
    dir: std::path::PathBuf,
    _servers: Vec<Kill>,
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks; there is nothing to list.
    }
    for tool in ["dnsmasq", "busybox", "nft"] {
        if Command::new("which")
            .arg(tool)
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            eprintln!("bench net: {tool} is missing (apt-get install dnsmasq-base busybox-static nftables)");
            std::process::exit(2);
        }
    }
    let t = topology();
    println!(
        "agentlab network benchmark (same client, same bridge; lower is better except MB/s)\n"
    );
    let (ours, theirs) = (dhcp_ours(&t), dhcp_dnsmasq(&t));
    row("DHCP start → bound lease, median", ours, theirs, "ms");
    t.cli.sh(&format!(
        "ip addr add {CLIENT_IP}/16 dev eth0 && ip route add default via {GATEWAY}"
    ));
    let ours = dns_ours(&t);
    let theirs = dns_dnsmasq(&t);
    row("DNS forwarded, median", ours.0, theirs.0, "ms");
    row("DNS forwarded, p99", ours.1, theirs.1, "ms");
    row("DNS cached, median", ours.2, theirs.2, "ms");
    row("DNS cached, p99", ours.3, theirs.3, "ms");
    let (with_ours, bare) = throughput(&t);
    row("wget 200 MB guest → upstream", with_ours, bare, "MB/s");
}

fn row(what: &str, ours: f64, theirs: f64, unit: &str) {
    println!(
        "{what:<36} agentlab {ours:>8.3} {unit:<4}  dnsmasq/bare {theirs:>8.3} {unit:<4}  ratio {:.2}×",
        ours / theirs
    );
}

fn topology() -> Topology {
    let srv = Netns::new("bsrv");
    let cli = Netns::new("bcli");
    let up = Netns::new("bup");
    srv.veth("port0", &cli, "eth0");
    cli.sh(&format!(
        "ip link set eth0 address {}",
        agentlab::dhcp::fmt_mac(CLIENT_MAC)
    ));
    in_netns(&srv.name, || {
        link::ensure_bridge("albr0", format!("{GATEWAY}/16").parse().unwrap()).unwrap();
        link::attach_port("port0", "albr0").unwrap();
        link::set_ipv4_forwarding(true).unwrap();
    })
    .unwrap();
    srv.veth("up0", &up, "eth0");
    srv.sh("ip addr add 203.0.113.1/24 dev up0 && ip route add default via 203.0.113.2");
    up.sh(&format!(
        "ip addr add 203.0.113.2/24 dev eth0 && ip addr add 198.51.100.10/32 dev lo && \
         ip addr add {UPSTREAM_DNS}/32 dev lo"
    ));
    let dir = std::env::temp_dir().join(format!("al-benchnet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let big = std::fs::File::create(dir.join("big")).unwrap();
    big.set_len(200 << 20).unwrap();
    let httpd = up
        .command("busybox", &["httpd", "-f", "-p", "198.51.100.10:80", "-h"])
        .arg(&dir)
        .spawn()
        .unwrap();
    let resolver = up.dnsmasq(
        UPSTREAM_DNS,
        &[
            "--except-interface=eth0",
            "--address=/bench.test/198.51.100.10",
            "--local-ttl=300",
            "--cache-size=0",
        ],
    );
    Topology {
        _scratch: Scratch(dir.clone()),
        srv,
        cli,
        up,
        dir,
        _servers: vec![Kill(httpd), Kill(resolver)],
    }
}

// ---- DHCP -------------------------------------------------------------------

struct StaticLease;

impl dhcp::Directory for StaticLease {
    fn lookup(&self, mac: [u8; 6]) -> Option<Binding> {
        (mac == CLIENT_MAC).then(|| Binding {
            mac,
            ip: CLIENT_IP,
            hostname: "bench".into(),
        })
    }
    fn record(&self, _ev: LeaseEvent) {}
}

/// Median wall time of `udhcpc` getting its lease, in ms.
fn udhcpc_median(t: &Topology) -> f64 {
    let mut times = Vec::new();
    let mut failures = 0;
    while times.len() < DHCP_RUNS {
        let start = Instant::now();
        let ok = t
            .cli
            .command(
                "busybox",
                &[
                    "udhcpc",
                    "-q",
                    "-n",
                    "-f",
                    "-i",
                    "eth0",
                    "-s",
                    "/bin/true",
                    "-t",
                    "5",
                    "-T",
                    "1",
                ],
            )
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            times.push(start.elapsed().as_secs_f64() * 1000.0);
        } else {
            failures += 1;
            assert!(failures < 5, "udhcpc keeps failing");
        }
    }
    median(&mut times)
}

fn dhcp_ours(t: &Topology) -> f64 {
    let cfg = dhcp::ServerConfig {
        iface: "albr0".into(),
        server_ip: GATEWAY,
        prefix: 16,
        router: GATEWAY,
        dns: vec![GATEWAY],
        domain: "agentlab.internal".into(),
        lease_time: Duration::from_secs(3600),
    };
    let server = in_netns(&t.srv.name, || {
        DhcpServer::spawn(cfg, Arc::new(StaticLease))
    })
    .unwrap()
    .unwrap();
    let m = udhcpc_median(t);
    server.stop();
    m
}

fn dhcp_dnsmasq(t: &Topology) -> f64 {
    let leases = t.dir.join("dnsmasq.leases");
    let _d = Kill(
        t.srv
            .command(
                "dnsmasq",
                &[
                    "--keep-in-foreground",
                    "--conf-file=/dev/null",
                    "--port=0",
                    "--interface=albr0",
                    "--bind-interfaces",
                    "--dhcp-authoritative",
                    "--dhcp-range=10.77.0.0,static,255.255.0.0,1h",
                    &format!(
                        "--dhcp-host={},{CLIENT_IP}",
                        agentlab::dhcp::fmt_mac(CLIENT_MAC)
                    ),
                    &format!("--dhcp-leasefile={}", leases.display()),
                    "--user=root",
                    "--pid-file=",
                ],
            )
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(300));
    udhcpc_median(t)
}

// ---- DNS --------------------------------------------------------------------

struct OpenPolicy;

impl dns::Policy for OpenPolicy {
    fn client(&self, _src: IpAddr) -> Option<Client> {
        Some(Client {
            vmid: 1,
            policy: ClientPolicy::Open,
            see_local: false,
        })
    }
    fn local(&self, _name: &str) -> Option<IpAddr> {
        None
    }
    fn allowed(&self, _r: &[Resolved]) {}
}

/// (forwarded median, forwarded p99, cached median, cached p99), in ms.
fn dns_rtts(t: &Topology, tag: &str) -> (f64, f64, f64, f64) {
    let sock = in_netns(&t.cli.name, || UdpSocket::bind((CLIENT_IP, 0)))
        .unwrap()
        .unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let server = SocketAddr::new(IpAddr::V4(GATEWAY), 53);
    // Warm up (and make sure the server answers at all).
    for _ in 0..50 {
        if ask(&sock, server, 1, "warm.bench.test").is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut fwd = Vec::new();
    let mut cached = Vec::new();
    for i in 0..DNS_QUERIES {
        let name = format!("n{i}-{tag}.bench.test");
        fwd.push(ask(&sock, server, i as u16, &name).expect("no answer (forwarded)"));
        cached.push(ask(&sock, server, i as u16 ^ 0x8000, &name).expect("no answer (cached)"));
    }
    (
        median(&mut fwd),
        p99(&mut fwd),
        median(&mut cached),
        p99(&mut cached),
    )
}

fn ask(sock: &UdpSocket, server: SocketAddr, id: u16, name: &str) -> Option<f64> {
    let q = Message {
        header: Header {
            id,
            flags: 0x0100,
            ..Header::default()
        },
        questions: vec![Question {
            name: name.into(),
            qtype: 1,
            qclass: 1,
        }],
        ..Message::default()
    };
    let mut out = Vec::new();
    q.encode(&mut out).ok()?;
    let start = Instant::now();
    sock.send_to(&out, server).ok()?;
    let mut buf = [0u8; 1500];
    loop {
        let (n, _) = sock.recv_from(&mut buf).ok()?;
        let h = Header::parse(&buf[..n]).ok()?;
        if h.id == id && h.is_response() {
            return (h.rcode() == 0).then(|| start.elapsed().as_secs_f64() * 1000.0);
        }
    }
}

fn dns_ours(t: &Topology) -> (f64, f64, f64, f64) {
    let cfg = dns::DnsConfig::new(
        vec![SocketAddr::new(IpAddr::V4(GATEWAY), 53)],
        vec![format!("{UPSTREAM_DNS}:53").parse().unwrap()],
        "agentlab.internal",
    );
    let server = in_netns(&t.srv.name, || DnsServer::spawn(cfg, Arc::new(OpenPolicy)))
        .unwrap()
        .unwrap();
    let r = dns_rtts(t, "a");
    server.stop();
    r
}

fn dns_dnsmasq(t: &Topology) -> (f64, f64, f64, f64) {
    let upstream = format!("--server={UPSTREAM_DNS}");
    let _d = Kill(
        t.srv
            .dnsmasq(&GATEWAY.to_string(), &[&upstream, "--cache-size=10000"]),
    );
    dns_rtts(t, "d")
}

// ---- throughput ---------------------------------------------------------------

/// (with agentlab's table, with a bare masquerade), in MB/s.
fn throughput(t: &Topology) -> (f64, f64) {
    let plan = nft::Plan {
        bridge: "albr0".into(),
        gateway: GATEWAY,
        subnet: "10.77.0.0/16".parse().unwrap(),
        services: nft::Services::default(),
        sandboxes: vec![nft::SandboxNet {
            vmid: 1000,
            tap: "port0".into(),
            mac: CLIENT_MAC,
            ip: CLIENT_IP,
            mode: NetworkMode::Nat,
            allow: Vec::new(),
            see_sandboxes: false,
        }],
        exposures: Vec::new(),
    };
    apply(t, &nft::render_table(&plan));
    let ours = wget_rate(t);
    t.srv
        .sh("nft delete table inet agentlab; nft delete table bridge agentlab");
    apply(
        t,
        "table ip bench { chain post { type nat hook postrouting priority 100; oifname \"up0\" masquerade; }; }\n",
    );
    let bare = wget_rate(t);
    t.srv.sh("nft delete table ip bench");
    (ours, bare)
}

fn apply(t: &Topology, script: &str) {
    use std::io::Write;
    let mut c = t
        .srv
        .command("nft", &["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(c.wait().unwrap().success(), "nft refused:\n{script}");
}

fn wget_rate(t: &Topology) -> f64 {
    let mut rates = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        t.cli
            .sh("busybox wget -q -O /dev/null http://198.51.100.10/big");
        rates.push(200.0 * 1.048_576 / start.elapsed().as_secs_f64());
    }
    let _ = &t.up;
    median(&mut rates)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn p99(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}
