//! The DHCP server against busybox `udhcpc`, in network namespaces: a "host"
//! namespace with the bridge `dhbr0` (10.77.0.1/16) and the server, and one
//! namespace per client, joined to the bridge by a veth whose MAC the test
//! sets, so the static bindings match.
//!
//! Needs root, `ip` and `/bin/busybox`. Run: `cargo test --test dhcp`.

mod common;

use std::collections::HashMap;
use std::net::{Ipv4Addr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentlab::dhcp::{Binding, DhcpServer, Directory, LeaseEvent, LeaseState, ServerConfig};
use agentlab::sys::netns::in_netns;
use common::netns::Netns;

const BRIDGE: &str = "dhbr0";
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const MAC_1: [u8; 6] = [0x52, 0x54, 0x00, 0x77, 0x00, 0x07];
const IP_1: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 7);
const MAC_2: [u8; 6] = [0x52, 0x54, 0x00, 0x77, 0x00, 0x08];
const IP_2: Ipv4Addr = Ipv4Addr::new(10, 77, 3, 8);
const UNKNOWN_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x77, 0x00, 0x99];

/// Prints what udhcpc learned, and configures the address so that a RELEASE
/// or a renewal (sent from the leased address) can leave the client.
const SCRIPT: &str = r#"#!/bin/sh
case "$1" in
bound|renew)
    ip addr add "$ip/$mask" dev "$interface" 2>/dev/null
    echo "LEASE $1 ip=$ip subnet=$subnet router=$router dns=$dns domain=$domain hostname=$hostname lease=$lease serverid=$serverid"
    ;;
esac
"#;

/// The daemon's stand-in: fixed bindings, and every event with its time.
#[derive(Default)]
struct TestDirectory {
    bindings: HashMap<[u8; 6], Binding>,
    events: Mutex<Vec<(Instant, LeaseEvent)>>,
}

impl Directory for TestDirectory {
    fn lookup(&self, mac: [u8; 6]) -> Option<Binding> {
        self.bindings.get(&mac).cloned()
    }
    fn record(&self, ev: LeaseEvent) {
        self.events.lock().unwrap().push((Instant::now(), ev));
    }
}

impl TestDirectory {
    fn events(&self) -> Vec<LeaseEvent> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// Waits (up to a generous deadline, not a timing assertion) for an event.
    fn wait_for(&self, what: impl Fn(&LeaseEvent) -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.events().iter().any(&what) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

/// A bridge namespace with the server running, the script file, and the
/// client namespaces added with [`Lab::client`]. Fields drop in order: the
/// server stops before its namespace goes.
struct Lab {
    server: Option<DhcpServer>,
    dir: Arc<TestDirectory>,
    script: TempFile,
    clients: Vec<Netns>,
    host: Netns,
    tag: String,
}

impl Lab {
    fn new(tag: &str) -> Lab {
        let host = Netns::new(&format!("{tag}h"));
        host.sh(&format!(
            "ip link add {BRIDGE} type bridge && ip addr add {SERVER}/16 dev {BRIDGE} && ip link set {BRIDGE} up"
        ));
        let mut dir = TestDirectory::default();
        for (mac, ip, name) in [(MAC_1, IP_1, "sbx-1007"), (MAC_2, IP_2, "sbx-1008")] {
            let hostname = name.to_owned();
            dir.bindings.insert(mac, Binding { mac, ip, hostname });
        }
        let dir = Arc::new(dir);
        let server = in_netns(&host.name, || DhcpServer::spawn(config(), dir.clone()))
            .unwrap()
            .unwrap();
        let script = TempFile::new(&format!("{tag}-script.sh"), SCRIPT);
        std::process::Command::new("chmod")
            .args(["+x", script.0.to_str().unwrap()])
            .status()
            .unwrap();
        Lab {
            server: Some(server),
            dir,
            script,
            clients: Vec::new(),
            host,
            tag: tag.to_owned(),
        }
    }

    fn server(&self) -> &DhcpServer {
        self.server.as_ref().unwrap()
    }

    /// A client namespace whose `eth0` (MAC `mac`) is a port of the bridge.
    fn client(&mut self, mac: [u8; 6]) -> usize {
        let n = self.clients.len();
        let ns = Netns::new(&format!("{}c{n}", self.tag));
        let port = format!("dhp{n}");
        self.host.veth(&port, &ns, "eth0");
        self.host.sh(&format!("ip link set {port} master {BRIDGE}"));
        ns.sh(&format!("ip link set eth0 address {}", fmt_mac(mac)));
        self.clients.push(ns);
        n
    }

    /// Starts udhcpc in client `n`, staying in the foreground after the lease.
    fn start_udhcpc(&self, n: usize) -> Running {
        let script = self.script.0.to_str().unwrap();
        let args = [
            "udhcpc", "-f", "-t", "5", "-T", "1", "-i", "eth0", "-s", script,
        ];
        let mut child = self.clients[n]
            .command("busybox", &args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let output = Arc::new(Mutex::new(String::new()));
        let mut stdout = child.stdout.take().unwrap();
        let sink = output.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = std::io::Read::read(&mut stdout, &mut buf) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Running { child, output }
    }

    /// Waits until client `n`'s script has configured `ip`: udhcpc reads
    /// signals only after the script returns, so one sent now finds it bound
    /// (the server's Bound event comes before udhcpc has even seen the ACK).
    fn wait_configured(&self, n: usize, ip: Ipv4Addr) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let want = format!("inet {ip}/");
        while !self.clients[n]
            .sh("ip -4 addr show dev eth0")
            .contains(&want)
        {
            assert!(Instant::now() < deadline, "udhcpc never configured {ip}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs udhcpc to completion in client `n`; returns (success, output).
    fn udhcpc(&self, n: usize, extra: &[&str]) -> (bool, String) {
        let script = self.script.0.to_str().unwrap();
        let mut args = vec!["udhcpc", "-f", "-q", "-n", "-t", "5", "-T", "1"];
        args.extend(["-i", "eth0", "-s", script]);
        args.extend(extra);
        let out = self.clients[n].command("busybox", &args).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

fn config() -> ServerConfig {
    ServerConfig {
        iface: BRIDGE.into(),
        server_ip: SERVER,
        prefix: 16,
        router: SERVER,
        dns: vec![SERVER, Ipv4Addr::new(10, 77, 0, 2)],
        domain: "sandbox.internal".into(),
        lease_time: Duration::from_secs(3600),
    }
}

fn fmt_mac(mac: [u8; 6]) -> String {
    agentlab::dhcp::fmt_mac(mac)
}

/// The `LEASE bound …` line the script printed.
fn bound_line(output: &str) -> String {
    output
        .lines()
        .find(|l| l.starts_with("LEASE bound"))
        .unwrap_or_else(|| panic!("no lease in udhcpc output:\n{output}"))
        .to_owned()
}

struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, text: &str) -> TempFile {
        let path = std::env::temp_dir().join(format!("al-{}-{name}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn udhcpc_gets_its_binding_and_every_option() {
    let mut lab = Lab::new("dh1");
    let c = lab.client(MAC_1);

    let (ok, out) = lab.udhcpc(c, &[]);

    assert!(ok, "{out}");
    let want = "LEASE bound ip=10.77.0.7 subnet=255.255.0.0 router=10.77.0.1 \
                dns=10.77.0.1 10.77.0.2 domain=sandbox.internal hostname=sbx-1007 \
                lease=3600 serverid=10.77.0.1";
    assert_eq!(bound_line(&out), want);
    let leases = lab.server().leases();
    assert_eq!(leases.len(), 1);
    assert_eq!((leases[0].ip, leases[0].state), (IP_1, LeaseState::Bound));
    report_discover_to_ack(&lab.dir);
}

/// Not an assertion: the server's side of DISCOVER→ACK, for the benchmark.
fn report_discover_to_ack(dir: &TestDirectory) {
    let events = dir.events.lock().unwrap();
    let offered = events
        .iter()
        .find(|(_, e)| matches!(e, LeaseEvent::Offered { .. }));
    let bound = events
        .iter()
        .find(|(_, e)| matches!(e, LeaseEvent::Bound { .. }));
    if let (Some((t0, _)), Some((t1, _))) = (offered, bound) {
        eprintln!("dhcp: DISCOVER handled → ACK sent in {:?}", *t1 - *t0);
    }
}

#[test]
fn unknown_mac_gets_no_answer() {
    let mut lab = Lab::new("dh2");
    let c = lab.client(UNKNOWN_MAC);

    let (ok, out) = lab.udhcpc(c, &["-t", "2"]);

    assert!(!ok, "udhcpc got a lease for an unknown MAC:\n{out}");
    let stats = lab.server().stats();
    assert_eq!(stats.replied, 0);
    assert!(stats.dropped >= 2, "{stats:?}");
    assert_eq!(lab.dir.events(), vec![]);
}

#[test]
fn release_is_recorded() {
    let mut lab = Lab::new("dh3");
    let c = lab.client(MAC_1);
    let udhcpc = lab.start_udhcpc(c);
    lab.wait_configured(c, IP_1);

    // udhcpc releases on SIGUSR2 (`-q -R` quits before it counts as bound).
    udhcpc.signal("USR2");

    let released = LeaseEvent::Released {
        mac: MAC_1,
        ip: IP_1,
    };
    assert!(
        lab.dir.wait_for(|e| *e == released),
        "{:?}",
        lab.dir.events()
    );
    assert_eq!(lab.server().leases()[0].state, LeaseState::Released);
}

#[test]
fn second_client_gets_its_own_address_also_by_broadcast() {
    let mut lab = Lab::new("dh4");
    let first = lab.client(MAC_1);
    let second = lab.client(MAC_2);

    let (ok1, out1) = lab.udhcpc(first, &[]);
    let (ok2, out2) = lab.udhcpc(second, &["-B"]); // broadcast bit set

    assert!(ok1 && ok2, "{out1}\n{out2}");
    assert!(bound_line(&out1).contains("ip=10.77.0.7 "), "{out1}");
    assert!(bound_line(&out2).contains("ip=10.77.3.8 "), "{out2}");
    assert!(bound_line(&out2).contains("hostname=sbx-1008 "), "{out2}");
    let ips: Vec<Ipv4Addr> = lab.server().leases().iter().map(|l| l.ip).collect();
    assert_eq!(ips, vec![IP_1, IP_2]);
}

#[test]
fn reply_to_a_client_without_address_reaches_only_that_client() {
    let mut lab = Lab::new("dh9");
    let bystander = lab.client(UNKNOWN_MAC);
    let unicast = lab.client(MAC_1);
    let broadcast = lab.client(MAC_2);
    let ns = lab.clients[bystander].name.clone();
    lab.clients[bystander].sh("ip addr add 10.77.250.1/16 dev eth0");
    let ear = in_netns(&ns, || UdpSocket::bind("0.0.0.0:68"))
        .unwrap()
        .unwrap();
    ear.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 1500];

    let (ok, out) = lab.udhcpc(unicast, &[]);
    assert!(ok, "{out}");
    let heard_unicast = ear.recv_from(&mut buf).is_ok();
    let (ok, out) = lab.udhcpc(broadcast, &["-B"]);
    assert!(ok, "{out}");
    ear.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let heard_broadcast = ear.recv_from(&mut buf).is_ok();

    assert!(
        !heard_unicast,
        "a reply to a client without address leaked to the bridge"
    );
    assert!(
        heard_broadcast,
        "control: the bystander hears broadcast replies"
    );
}

#[test]
fn renewal_is_acked_by_unicast_to_the_client() {
    let mut lab = Lab::new("dh5");
    let c = lab.client(MAC_1);
    let udhcpc = lab.start_udhcpc(c);
    lab.wait_configured(c, IP_1);

    // udhcpc renews on SIGUSR1, with a unicast REQUEST from its address.
    udhcpc.signal("USR1");

    let renewed = lab.dir.wait_for(|e| {
        matches!(
            e,
            LeaseEvent::Renewed {
                mac: MAC_1,
                ip: IP_1,
                ..
            }
        )
    });
    assert!(renewed, "{:?}", lab.dir.events());
    udhcpc.wait_output("LEASE renew ip=10.77.0.7 ");
}

/// A udhcpc left running in the foreground, its output collected; killed
/// on drop.
struct Running {
    child: std::process::Child,
    output: Arc<Mutex<String>>,
}

impl Running {
    fn signal(&self, sig: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits (up to a generous deadline) for the script to print `line`.
    fn wait_output(&self, line: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.output.lock().unwrap().contains(line) {
            let out = self.output.lock().unwrap().clone();
            assert!(Instant::now() < deadline, "no {line:?} in:\n{out}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn garbage_flood_does_not_prevent_a_lease() {
    let mut lab = Lab::new("dh6");
    let c = lab.client(MAC_1);
    let client = lab.clients[c].name.clone();
    lab.clients[c].sh("ip addr add 10.77.250.250/16 dev eth0");
    let sock = in_netns(&client, || UdpSocket::bind("10.77.250.250:0"))
        .unwrap()
        .unwrap();
    sock.set_broadcast(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flood = std::thread::spawn({
        let stop = stop.clone();
        move || flood(&sock, &stop)
    });

    // The client asks only once the server is busy with garbage.
    while lab.server().stats().dropped < 1000 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let (ok, out) = lab.udhcpc(c, &[]);
    stop.store(true, Ordering::Relaxed);
    let sent = flood.join().unwrap();

    assert!(ok, "{out}");
    assert!(bound_line(&out).contains("ip=10.77.0.7 "), "{out}");
    let stats = lab.server().stats();
    eprintln!("dhcp flood: sent {sent}, server {stats:?}");
    assert!(stats.dropped > 0, "{stats:?}");
}

/// Sends garbage to port 67 until told to stop: random bytes, and DHCP
/// messages from unknown MACs. Returns how many datagrams went out.
fn flood(sock: &UdpSocket, stop: &AtomicBool) -> u64 {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut sent = 0u64;
    let mut buf = vec![0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        for b in buf.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *b = state as u8;
        }
        let len = (state as usize) % buf.len();
        if sent % 2 == 0 {
            // A plausible DISCOVER from a MAC nobody bound.
            buf[..4].copy_from_slice(&[1, 1, 6, 0]);
            buf[236..243].copy_from_slice(&[99, 130, 83, 99, 53, 1, 1]);
            buf[243] = 255;
        }
        let to = if sent % 3 == 0 {
            "255.255.255.255:67"
        } else {
            "10.77.0.1:67"
        };
        let n = if sent % 2 == 0 { 244 } else { len };
        if sock.send_to(&buf[..n], to).is_ok() {
            sent += 1;
        }
    }
    sent
}

#[test]
fn stop_ends_the_server_and_frees_its_port() {
    let mut lab = Lab::new("dh7");
    lab.server.take().unwrap().stop();

    // The socket is closed when `stop` returns, but a process another test
    // forks at that moment holds a copy of it until its exec (CLOEXEC), so
    // the port may stay taken for an instant: retry briefly.
    let deadline = Instant::now() + Duration::from_secs(5);
    let again = loop {
        let r = in_netns(&lab.host.name, || {
            DhcpServer::spawn(config(), lab.dir.clone())
        })
        .unwrap();
        match r {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => break other,
        }
    };

    assert!(again.is_ok(), "{:?}", again.err());
}

#[test]
fn second_server_on_the_same_bridge_is_refused() {
    let lab = Lab::new("dh8");

    let second = in_netns(&lab.host.name, || {
        DhcpServer::spawn(config(), lab.dir.clone())
    })
    .unwrap();

    let e = second
        .err()
        .expect("two servers bound port 67 on one bridge");
    assert!(
        e.to_string().contains("dhcp on dhbr0: bind udp port 67"),
        "{e}"
    );
}
