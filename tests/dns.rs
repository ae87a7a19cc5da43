//! The gateway resolver in real network namespaces: a fake upstream DNS
//! server in "up", `DnsServer` on 10.77.0.1 in "gw", and busybox `nslookup`
//! plus hand-made UDP/TCP clients in "guest" (10.77.0.2 and 10.77.0.3).
//! Each test builds its own three namespaces, so they run in parallel.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use agentlab::config::AllowRule;
use agentlab::net::dns::codec::{
    Header, Message, Question, RData, Rcode, Record, CLASS_IN, FLAG_QR, FLAG_RD, FLAG_TC, TYPE_A,
    TYPE_CNAME,
};
use agentlab::net::dns::{Client, ClientPolicy, DnsConfig, DnsServer, Policy, Resolved};
use agentlab::sys::netns::in_netns;
use common::netns::Netns;

const GATEWAY: &str = "10.77.0.1";
const GUEST: &str = "10.77.0.2";
const GUEST2: &str = "10.77.0.3";
const UPSTREAM: &str = "198.51.100.53";
const SANDBOX_WEB: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 9);
const TIMEOUT: Duration = Duration::from_secs(1);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The daemon's side, as a test sets it.
#[derive(Default)]
struct TestPolicy {
    clients: Mutex<HashMap<IpAddr, Client>>,
    allowed: Mutex<Vec<Resolved>>,
}

impl TestPolicy {
    fn set(&self, src: &str, policy: ClientPolicy, see_local: bool) {
        let client = Client {
            vmid: 1012,
            policy,
            see_local,
        };
        self.clients.lock().unwrap().insert(ip(src), client);
    }
}

impl Policy for TestPolicy {
    fn client(&self, src: IpAddr) -> Option<Client> {
        self.clients.lock().unwrap().get(&src).cloned()
    }
    fn local(&self, name: &str) -> Option<IpAddr> {
        match name {
            "web" | "1012" => Some(IpAddr::V4(SANDBOX_WEB)),
            "host" | "gateway" => Some(ip(GATEWAY)),
            _ => None,
        }
    }
    fn allowed(&self, r: &[Resolved]) {
        // Recorded late on purpose: if the server answered before this
        // returned, the guest would see its answer before the record exists.
        thread::sleep(Duration::from_millis(300));
        self.allowed.lock().unwrap().extend_from_slice(r);
    }
}

/// Three namespaces, a fake upstream and the server under test.
struct Lab {
    guest: Netns,
    gw: Netns,
    _up: Netns,
    upstream_stop: Arc<AtomicBool>,
    policy: Arc<TestPolicy>,
    server: Option<DnsServer>,
}

impl Lab {
    fn new(t: &str) -> Lab {
        let up = Netns::new(&format!("dn{t}u"));
        let gw = Netns::new(&format!("dn{t}g"));
        let guest = Netns::new(&format!("dn{t}c"));
        gw.veth("dn-up", &up, "dn-gw");
        gw.veth("dn-guest", &guest, "dn-gw");
        up.sh(&format!("ip addr add {UPSTREAM}/24 dev dn-gw"));
        gw.sh("ip addr add 198.51.100.1/24 dev dn-up");
        gw.sh(&format!("ip addr add {GATEWAY}/24 dev dn-guest"));
        guest.sh(&format!(
            "ip addr add {GUEST}/24 dev dn-gw && ip addr add {GUEST2}/24 dev dn-gw"
        ));
        let upstream_stop = Arc::new(AtomicBool::new(false));
        let stop = upstream_stop.clone();
        in_netns(&up.name, || fake_upstream(stop)).unwrap();
        let policy = Arc::new(TestPolicy::default());
        let mut cfg = DnsConfig::new(
            vec![format!("{GATEWAY}:53").parse().unwrap()],
            vec![format!("{UPSTREAM}:53").parse().unwrap()],
            "sbx.test",
        );
        cfg.timeout = TIMEOUT;
        let p: Arc<dyn Policy> = policy.clone();
        let server = in_netns(&gw.name, || DnsServer::spawn(cfg, p))
            .unwrap()
            .unwrap();
        Lab {
            guest,
            gw,
            _up: up,
            upstream_stop,
            policy,
            server: Some(server),
        }
    }

    fn server(&self) -> &DnsServer {
        self.server.as_ref().unwrap()
    }

    /// busybox nslookup from the guest: (success, output).
    fn nslookup(&self, name: &str) -> (bool, String) {
        let out = self
            .guest
            .command("busybox", &["nslookup", name, GATEWAY])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// One UDP question from the guest (from `src`), waiting up to `wait`.
    fn ask_udp(&self, src: &str, name: &str, wait: Duration) -> Option<Message> {
        let sock = in_netns(&self.guest.name, || UdpSocket::bind((ip(src), 0)).unwrap()).unwrap();
        sock.connect((ip(GATEWAY), 53)).unwrap();
        sock.set_read_timeout(Some(wait)).unwrap();
        sock.send(&query(0x4242, name)).unwrap();
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).ok()?;
        Some(Message::parse(&buf[..n]).unwrap())
    }

    /// One TCP question from the guest.
    fn ask_tcp(&self, name: &str) -> Message {
        let addr: SocketAddr = format!("{GATEWAY}:53").parse().unwrap();
        let mut s = in_netns(&self.guest.name, || TcpStream::connect(addr).unwrap()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let q = query(0x5151, name);
        let mut framed = (q.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&q);
        s.write_all(&framed).unwrap();
        let mut len = [0u8; 2];
        s.read_exact(&mut len).unwrap();
        let mut reply = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut reply).unwrap();
        Message::parse(&reply).unwrap()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop();
        }
        self.upstream_stop.store(true, Ordering::SeqCst);
    }
}

fn query(id: u16, name: &str) -> Vec<u8> {
    let m = Message {
        header: Header {
            id,
            flags: FLAG_RD,
            ..Header::default()
        },
        questions: vec![Question {
            name: name.into(),
            qtype: TYPE_A,
            qclass: CLASS_IN,
        }],
        ..Message::default()
    };
    let mut out = Vec::new();
    m.encode(&mut out).unwrap();
    out
}

fn a(name: &str, addr: [u8; 4]) -> Record {
    Record {
        name: name.into(),
        rtype: TYPE_A,
        class: CLASS_IN,
        ttl: 60,
        data: RData::A(Ipv4Addr::from(addr)),
        ttl_offset: 0,
    }
}

fn cname(name: &str, target: &str) -> Record {
    Record {
        name: name.into(),
        rtype: TYPE_CNAME,
        class: CLASS_IN,
        ttl: 60,
        data: RData::Cname(target.into()),
        ttl_offset: 0,
    }
}

/// The fake upstream's answers; `None` means it stays silent.
fn upstream_answer(q: &Message, tcp: bool) -> Option<Vec<u8>> {
    let question = q.questions.first()?;
    let name = question.name.to_ascii_lowercase();
    let mut flags = FLAG_QR | FLAG_RD;
    let (rcode, answers) = match (name.as_str(), question.qtype) {
        ("slow.test", _) => return None,
        (_, t) if t != TYPE_A => (Rcode::NoError, vec![]),
        ("allowed.test", _) => (Rcode::NoError, vec![a(&name, [198, 51, 100, 10])]),
        ("cdn.allowed.test", _) => (
            Rcode::NoError,
            vec![
                cname(&name, "edge.cdn.example"),
                a("edge.cdn.example", [198, 51, 100, 12]),
            ],
        ),
        ("other.test", _) => (Rcode::NoError, vec![a(&name, [198, 51, 100, 11])]),
        ("big.test", _) if !tcp => {
            flags |= FLAG_TC;
            (Rcode::NoError, vec![])
        }
        ("big.test", _) => (
            Rcode::NoError,
            (1..=40).map(|i| a(&name, [198, 51, 100, i])).collect(),
        ),
        _ => (Rcode::NxDomain, vec![]),
    };
    let reply = Message {
        header: Header {
            id: q.header.id,
            flags: flags | rcode as u16,
            ..Header::default()
        },
        questions: q.questions.clone(),
        answers,
        ..Message::default()
    };
    let mut out = Vec::new();
    reply.encode(&mut out).unwrap();
    Some(out)
}

/// UDP and TCP on 198.51.100.53:53, in the calling thread's namespace.
fn fake_upstream(stop: Arc<AtomicBool>) {
    let udp = UdpSocket::bind((ip(UPSTREAM), 53)).unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let tcp = TcpListener::bind((ip(UPSTREAM), 53)).unwrap();
    tcp.set_nonblocking(true).unwrap();
    let stop2 = stop.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while !stop.load(Ordering::SeqCst) {
            let Ok((n, from)) = udp.recv_from(&mut buf) else {
                continue;
            };
            let Ok(q) = Message::parse(&buf[..n]) else {
                continue;
            };
            if let Some(r) = upstream_answer(&q, false) {
                udp.send_to(&r, from).unwrap();
            }
        }
    });
    thread::spawn(move || {
        while !stop2.load(Ordering::SeqCst) {
            let Ok((mut s, _)) = tcp.accept() else {
                thread::sleep(Duration::from_millis(20));
                continue;
            };
            s.set_nonblocking(false).unwrap();
            let mut len = [0u8; 2];
            s.read_exact(&mut len).unwrap();
            let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
            s.read_exact(&mut q).unwrap();
            let r = upstream_answer(&Message::parse(&q).unwrap(), true).unwrap();
            let mut framed = (r.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&r);
            s.write_all(&framed).unwrap();
        }
    });
}

fn addrs(m: &Message) -> Vec<IpAddr> {
    m.answers
        .iter()
        .filter_map(|r| match r.data {
            RData::A(a) => Some(IpAddr::V4(a)),
            _ => None,
        })
        .collect()
}

#[test]
fn open_client_resolves_forwarded_names_and_repeats_come_from_the_cache() {
    let lab = Lab::new("o");
    lab.policy.set(GUEST, ClientPolicy::Open, false);
    let (ok1, out1) = lab.nslookup("allowed.test");
    let (ok2, out2) = lab.nslookup("other.test");
    let (ok3, out3) = lab.nslookup("allowed.test");
    assert!(ok1 && out1.contains("198.51.100.10"), "{out1}");
    assert!(ok2 && out2.contains("198.51.100.11"), "{out2}");
    assert!(ok3 && out3.contains("198.51.100.10"), "{out3}");
    assert!(
        lab.server().stats().cached >= 1,
        "{:?}",
        lab.server().stats()
    );
    assert!(lab.policy.allowed.lock().unwrap().is_empty());
}

#[test]
fn allowlist_client_gets_allowed_names_reported_first_and_nxdomain_for_others() {
    let lab = Lab::new("a");
    let rules = vec![
        AllowRule::parse("allowed.test:443").unwrap(),
        AllowRule::parse("*.allowed.test").unwrap(),
    ];
    lab.policy.set(GUEST, ClientPolicy::Allowlist(rules), false);
    let (ok, out) = lab.nslookup("allowed.test");
    let seen: Vec<Resolved> = lab.policy.allowed.lock().unwrap().clone();
    let (ok_cdn, out_cdn) = lab.nslookup("cdn.allowed.test");
    let (ok_other, out_other) = lab.nslookup("other.test");
    let (ok_again, _) = lab.nslookup("allowed.test");
    assert!(ok && out.contains("198.51.100.10"), "{out}");
    let first = seen
        .iter()
        .find(|r| r.addr == ip("198.51.100.10"))
        .expect("reported before the answer");
    assert_eq!(
        (first.vmid, first.port, first.name.as_str()),
        (1012, Some(443), "allowed.test")
    );
    assert!((55..=60).contains(&first.ttl.as_secs()), "{first:?}");
    assert!(ok_cdn && out_cdn.contains("198.51.100.12"), "{out_cdn}");
    assert!(lab
        .policy
        .allowed
        .lock()
        .unwrap()
        .iter()
        .any(|r| r.addr == ip("198.51.100.12")));
    assert!(!ok_other && out_other.contains("NXDOMAIN"), "{out_other}");
    assert!(!lab
        .policy
        .allowed
        .lock()
        .unwrap()
        .iter()
        .any(|r| r.addr == ip("198.51.100.11")));
    // A cache hit is reported again, so the nft element is refreshed.
    let reports = lab
        .policy
        .allowed
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.addr == ip("198.51.100.10"))
        .count();
    assert!(
        ok_again && reports == 2 && lab.server().stats().cached >= 1,
        "{reports}"
    );
}

#[test]
fn unknown_client_is_refused() {
    let lab = Lab::new("r");
    let m = lab
        .ask_udp(GUEST, "allowed.test", Duration::from_secs(3))
        .expect("an answer");
    assert_eq!(m.header.rcode(), Rcode::Refused as u8);
    assert_eq!(m.header.id, 0x4242);
}

#[test]
fn local_names_resolve_only_with_see_local() {
    let lab = Lab::new("l");
    lab.policy.set(GUEST, ClientPolicy::Open, false);
    lab.policy.set(GUEST2, ClientPolicy::Open, true);
    let hidden = lab
        .ask_udp(GUEST, "web.sbx.test", Duration::from_secs(3))
        .unwrap();
    let shown = lab
        .ask_udp(GUEST2, "web.sbx.test", Duration::from_secs(3))
        .unwrap();
    let by_vmid = lab
        .ask_udp(GUEST2, "1012.SBX.test.", Duration::from_secs(3))
        .unwrap();
    let host = lab
        .ask_udp(GUEST2, "host.sbx.test", Duration::from_secs(3))
        .unwrap();
    assert_eq!(hidden.header.rcode(), Rcode::NxDomain as u8);
    assert_eq!(addrs(&shown), vec![IpAddr::V4(SANDBOX_WEB)]);
    assert_eq!(addrs(&by_vmid), vec![IpAddr::V4(SANDBOX_WEB)]);
    assert_eq!(addrs(&host), vec![ip(GATEWAY)]);
    assert_eq!(lab.server().stats().forwarded, 0);
}

#[test]
fn tcp_queries_work_and_oversized_answers_move_to_tcp() {
    let lab = Lab::new("t");
    lab.policy.set(GUEST, ClientPolicy::Open, false);
    let other = lab.ask_tcp("other.test");
    let over_udp = lab
        .ask_udp(GUEST, "big.test", Duration::from_secs(3))
        .unwrap();
    let over_tcp = lab.ask_tcp("big.test");
    assert_eq!(addrs(&other), vec![ip("198.51.100.11")]);
    assert_eq!(other.header.id, 0x5151);
    assert!(over_udp.header.truncated(), "{over_udp:?}");
    assert_eq!(addrs(&over_tcp).len(), 40);
}

#[test]
fn floods_of_garbage_and_of_slow_queries_do_not_starve_a_legit_query() {
    let lab = Lab::new("f");
    lab.policy.set(GUEST, ClientPolicy::Open, false);
    lab.policy.set(GUEST2, ClientPolicy::Open, false);
    let flood = in_netns(&lab.guest.name, || {
        UdpSocket::bind((ip(GUEST2), 0)).unwrap()
    })
    .unwrap();
    flood.connect((ip(GATEWAY), 53)).unwrap();
    for i in 0..300u16 {
        let _ = flood.send(&query(i, "slow.test"));
    }
    let garbage = thread::spawn(move || {
        for i in 0..20_000u32 {
            // qdcount 1 and a name that points at itself.
            let junk = [
                i.to_be_bytes().as_slice(),
                &[0, 1, 0, 0, 0, 0, 0, 0, 0xC0, 0x0C],
            ]
            .concat();
            let _ = flood.send(&junk);
        }
    });
    let (ok, out) = lab.nslookup("allowed.test");
    garbage.join().unwrap();
    assert!(ok && out.contains("198.51.100.10"), "{out}");
    assert!(
        lab.server().stats().dropped > 0,
        "{:?}",
        lab.server().stats()
    );
}

#[test]
fn silent_upstream_gives_servfail_within_the_timeout() {
    let lab = Lab::new("s");
    lab.policy.set(GUEST, ClientPolicy::Open, false);
    let m = lab
        .ask_udp(GUEST, "slow.test", TIMEOUT + Duration::from_secs(2))
        .expect("SERVFAIL in time");
    assert_eq!(m.header.rcode(), Rcode::ServFail as u8);
    assert_eq!(lab.server().stats().servfail, 1);
}

#[test]
fn stop_releases_the_listen_address() {
    let mut lab = Lab::new("x");
    lab.server.take().unwrap().stop();
    let policy: Arc<dyn Policy> = lab.policy.clone();
    let cfg = DnsConfig::new(
        vec![format!("{GATEWAY}:53").parse().unwrap()],
        vec![],
        "sbx.test",
    );
    let again = in_netns(&lab.gw.name, || DnsServer::spawn(cfg, policy)).unwrap();
    assert!(again.is_ok(), "{:?}", again.err());
}
