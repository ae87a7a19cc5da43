//! The nftables rules of the sandbox network (DESIGN.md §6, reference
//! qemu-and-network.md §6.5): agentlab owns exactly two tables, `inet
//! agentlab` (host input, forwarding policy per sandbox, NAT and port
//! exposure) and `bridge agentlab` (per-port MAC/IPv4 anti-spoofing), and
//! touches nothing else on the host.
//!
//! Everything here is text rendering from typed plans, plus parsers of
//! `nft -j list ruleset`; applying goes through the [`Nft`] trait, whose
//! real implementation pipes the script into `nft -f -` (one atomic
//! transaction per script) and whose [`Recording`] fake lets orchestration
//! be tested without root.
//!
//! Layout. Shared base chains dispatch through verdict maps keyed by the
//! sandbox's IPv4 address (`egress`, `host_access`) or its TAP name
//! (`ports`, bridge table), so adding or removing one sandbox only adds or
//! deletes map elements and that sandbox's own objects, all suffixed with
//! its VMID: chains `out_<vmid>`, `in_<vmid>`, `port_<vmid>`, sets
//! `allow4_<vmid>` and `allowp4_<vmid>`, counters `drop_<vmid>` (policy
//! drops) and `spoof_<vmid>` (anti-spoofing drops).
//!
//! The IP address is a safe dispatch key because the bridge table admits
//! only the sandbox's own MAC and IPv4 source on its port, and the port is
//! isolated (`link::attach_port`), so sandbox-to-sandbox frames never meet.
//! IPv6 from sandboxes is dropped entirely (no `ip6` key in any map, and the
//! bridge table drops IPv6 frames on sandbox ports).
//!
//! Allowlist. Static CIDR and `host:port` entries are accepted first, even
//! inside private ranges (the operator wrote them); addresses learned from
//! allowed names (sets `allow4_<vmid>`/`allowp4_<vmid>`) only after the
//! `blocked4` ranges are rejected, so a name that resolves to an intranet,
//! link-local (cloud metadata) or sandbox address opens nothing.
//!
//! Exposure. A DNAT in `prerouting` (traffic arriving from other hosts) and
//! in `output` (connections from the host itself, to any of its addresses
//! including 127.0.0.1), followed by `ct status dnat accept` on the way to
//! the bridge. For 127.0.0.1 the packet leaves with a loopback source, which
//! the kernel only routes out of a device with `route_localnet` set
//! (`link::ensure_bridge` sets it on the bridge) and which `postrouting`
//! masquerades to the gateway address so the guest can answer. `prerouting`
//! skips destinations in 127.0.0.0/8: its DNAT runs before the kernel's
//! martian check, so a neighbour routing 127.0.0.1 to the host would
//! otherwise reach an exposure bound to loopback.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net};
use serde_json::Value;

use crate::config::{AllowRule, NetworkMode};

/// The table name in both families.
pub const TABLE: &str = "agentlab";

/// Destinations a `nat` sandbox never reaches (besides the host itself,
/// which the input chain guards): "this network", RFC 1918, CGNAT, loopback,
/// link-local (cloud metadata), IETF protocol assignments, benchmarking,
/// multicast, reserved and limited broadcast (RFC 6890).
const BLOCKED4: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// The whole sandbox network as nftables sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub bridge: String,
    pub gateway: Ipv4Addr,
    pub subnet: Ipv4Net,
    pub services: Services,
    pub sandboxes: Vec<SandboxNet>,
    pub exposures: Vec<Exposure>,
}

/// Ports on the gateway address that sandboxes (other than `off` ones) may
/// reach. DHCP (udp 67) is always admitted from the bridge, because a client
/// without a lease has no address to dispatch on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Services {
    pub udp: Vec<u16>,
    pub tcp: Vec<u16>,
}

impl Default for Services {
    /// DHCP and DNS.
    fn default() -> Services {
        Services {
            udp: vec![53, 67],
            tcp: vec![53],
        }
    }
}

/// One sandbox's place on the bridge and what it may reach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxNet {
    pub vmid: u32,
    pub tap: String,
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
    pub mode: NetworkMode,
    /// Static allowlist entries (only used in `allowlist` mode).
    pub allow: Vec<AllowNet>,
    /// Routed traffic to other sandboxes with `see_sandboxes` is accepted.
    /// Frames between bridge ports stay blocked by port isolation, so this
    /// only helps a guest that routes peers through the gateway.
    pub see_sandboxes: bool,
}

/// A network (and optional TCP/UDP port) an allowlist sandbox may reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllowNet {
    pub net: IpNet,
    pub port: Option<u16>,
}

impl AllowNet {
    /// The `Net` entries of a profile's `network.allow`; domains are the DNS
    /// server's business (their answers arrive via [`render_allow_resolved`]).
    pub fn from_rules(rules: &[AllowRule]) -> Vec<AllowNet> {
        rules
            .iter()
            .filter_map(|r| match r {
                AllowRule::Net { addr, prefix, port } => Some(AllowNet {
                    net: IpNet::new(*addr, *prefix).ok()?,
                    port: *port,
                }),
                AllowRule::Domain { .. } => None,
            })
            .collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// A host port forwarded to a sandbox's guest port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exposure {
    pub name: String,
    pub vmid: u32,
    pub guest_ip: Ipv4Addr,
    pub guest_port: u16,
    pub host_port: u16,
    /// The host address it answers on; `0.0.0.0` (or `::`) means every
    /// address of the host. A specific IPv6 address is not supported.
    pub bind: IpAddr,
    pub proto: Proto,
}

/// Dropped traffic of one sandbox since its chains were created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Refused by its network mode (egress or host access).
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
    /// Refused for a foreign source MAC or address.
    pub spoofed_packets: u64,
    pub spoofed_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run nft")]
    Spawn(#[source] std::io::Error),
    #[error("nft refused the script: {stderr}")]
    Apply { stderr: String },
    #[error("nft -j list ruleset failed: {stderr}")]
    List { stderr: String },
    #[error("exposure {name}: binding to the IPv6 address {bind} is not supported")]
    Ipv6Bind { name: String, bind: IpAddr },
}

/// The whole table pair, from scratch: any previous `agentlab` tables are
/// replaced in the same transaction (each is created first, so deleting it
/// cannot fail when it is absent). Dynamic set elements are lost; the DNS
/// server re-learns them on the next lookup.
pub fn render_table(plan: &Plan) -> String {
    let mut s = String::new();
    for family in ["inet", "bridge"] {
        let _ = writeln!(s, "table {family} {TABLE} {{}}");
        let _ = writeln!(s, "delete table {family} {TABLE}");
    }
    render_inet_base(&mut s, plan);
    render_bridge_base(&mut s);
    for sb in &plan.sandboxes {
        s.push_str(&render_add_sandbox(sb));
    }
    for e in &plan.exposures {
        // An unsupported exposure is refused when it is added; a plan rebuilt
        // from the store can only hold ones that were accepted.
        if let Ok(text) = render_add_exposure(e) {
            s.push_str(&text);
        }
    }
    s
}

fn render_inet_base(s: &mut String, plan: &Plan) {
    let br = quote(&plan.bridge);
    let gw = plan.gateway;
    let udp = port_list(&plan.services.udp);
    let tcp = port_list(&plan.services.tcp);
    let blocked = BLOCKED4.join(", ");
    let subnet = plan.subnet.trunc();
    let _ = write!(
        s,
        "table inet {TABLE} {{
\tset blocked4 {{ type ipv4_addr; flags interval; elements = {{ {blocked} }}; }}
\tset peers {{ type ipv4_addr; }}
\tmap egress {{ type ipv4_addr : verdict; }}
\tmap host_access {{ type ipv4_addr : verdict; }}
\tmap expose_any {{ type inet_proto . inet_service : ipv4_addr . inet_service; }}
\tmap expose_bound {{ type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service; }}
\tcounter drop_unknown {{ }}
\tchain input {{
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname {br} jump host_from_bridge
\t}}
\tchain host_from_bridge {{
\t\tct state established,related accept
\t\tudp sport 68 udp dport 67 accept
\t\tip saddr vmap @host_access
\t\tcounter name \"drop_unknown\" drop
\t}}
\tchain host_services {{
"
    );
    if !udp.is_empty() {
        let _ = writeln!(s, "\t\tip daddr {gw} udp dport {udp} accept");
    }
    if !tcp.is_empty() {
        let _ = writeln!(s, "\t\tip daddr {gw} tcp dport {tcp} accept");
    }
    let _ = write!(
        s,
        "\t}}
\tchain forward {{
\t\ttype filter hook forward priority filter; policy accept;
\t\tiifname {br} jump from_sandbox
\t\toifname {br} jump to_sandbox
\t}}
\tchain from_sandbox {{
\t\tct state established,related accept
\t\tip saddr vmap @egress
\t\tcounter name \"drop_unknown\" drop
\t}}
\tchain to_sandbox {{
\t\tct state established,related accept
\t\tct status dnat accept
\t\tcounter name \"drop_unknown\" drop
\t}}
\tchain prerouting {{
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tiifname != {br} ip daddr != 127.0.0.0/8 jump expose
\t}}
\tchain output {{
\t\ttype nat hook output priority -100; policy accept;
\t\tjump expose
\t}}
\tchain expose {{
\t\tmeta nfproto ipv4 fib daddr type local dnat ip to meta l4proto . th dport map @expose_any
\t\tmeta nfproto ipv4 dnat ip to ip daddr . meta l4proto . th dport map @expose_bound
\t}}
\tchain postrouting {{
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tip saddr {subnet} oifname != {br} masquerade
\t\toifname {br} ip saddr 127.0.0.0/8 ct status dnat masquerade
\t}}
}}
"
    );
}

/// Frames from ports that are not sandbox TAPs pass: the bridge family
/// hook sees every bridge on the host, and matching on the bridge's name
/// (`meta ibrname`) needs `CONFIG_NFT_BRIDGE_META`, which kernels may lack.
fn render_bridge_base(s: &mut String) {
    let _ = write!(
        s,
        "table bridge {TABLE} {{
\tmap ports {{ type ifname : verdict; }}
\tchain prerouting {{
\t\ttype filter hook prerouting priority -200; policy accept;
\t\tiifname vmap @ports
\t}}
}}
"
    );
}

/// One sandbox's chains, sets, counters and dispatch-map elements, as an
/// incremental transaction against an existing table pair.
pub fn render_add_sandbox(sb: &SandboxNet) -> String {
    let v = sb.vmid;
    let ip = sb.ip;
    let mut s = String::new();
    let t = format!("inet {TABLE}");
    let _ = writeln!(s, "add counter {t} drop_{v}");
    let _ = writeln!(s, "add chain {t} in_{v}");
    let _ = writeln!(s, "add chain {t} out_{v}");
    let drop = format!("counter name \"drop_{v}\"");
    if sb.mode != NetworkMode::Off {
        let _ = writeln!(s, "add rule {t} in_{v} jump host_services");
    }
    let _ = writeln!(s, "add rule {t} in_{v} {drop} drop");
    let peers = sb.see_sandboxes && sb.mode != NetworkMode::Off;
    if peers {
        let _ = writeln!(s, "add rule {t} out_{v} ip daddr @peers accept");
    }
    let reject = format!("{drop} reject with icmpx type admin-prohibited");
    match sb.mode {
        NetworkMode::Off => {
            let _ = writeln!(s, "add rule {t} out_{v} {drop} drop");
        }
        NetworkMode::Nat => {
            let _ = writeln!(s, "add rule {t} out_{v} ip daddr @blocked4 {reject}");
            let _ = writeln!(s, "add rule {t} out_{v} accept");
        }
        NetworkMode::Allowlist => render_allowlist(&mut s, sb, &reject),
    }
    let _ = writeln!(s, "add element {t} egress {{ {ip} : jump out_{v} }}");
    let _ = writeln!(s, "add element {t} host_access {{ {ip} : jump in_{v} }}");
    if peers {
        let _ = writeln!(s, "add element {t} peers {{ {ip} }}");
    }
    render_port(&mut s, sb);
    s
}

fn render_allowlist(s: &mut String, sb: &SandboxNet, reject: &str) {
    let v = sb.vmid;
    let t = format!("inet {TABLE}");
    let _ = writeln!(
        s,
        "add set {t} allow4_{v} {{ type ipv4_addr; flags timeout; }}"
    );
    let _ = writeln!(
        s,
        "add set {t} allowp4_{v} {{ type ipv4_addr . inet_service; flags timeout; }}"
    );
    // The gateway is the only resolver (its DNS enforces the allowlist); DNS
    // and DNS-over-TLS to anyone else would bypass it.
    let _ = writeln!(
        s,
        "add rule {t} out_{v} meta l4proto {{ tcp, udp }} th dport 53 {reject}"
    );
    let _ = writeln!(s, "add rule {t} out_{v} tcp dport 853 {reject}");
    for a in &sb.allow {
        // IPv6 never leaves a sandbox, so IPv6 entries have nothing to open.
        let IpNet::V4(net) = a.net else { continue };
        let net = net.trunc();
        match a.port {
            None => {
                let _ = writeln!(s, "add rule {t} out_{v} ip daddr {net} accept");
            }
            Some(p) => {
                let _ = writeln!(
                    s,
                    "add rule {t} out_{v} ip daddr {net} meta l4proto {{ tcp, udp }} th dport {p} accept"
                );
            }
        }
    }
    // What names resolve to never opens a range `nat` refuses: an allowed
    // domain whose owner answers with 10.99.0.5, 169.254.169.254 or another
    // sandbox (DNS rebinding) must not reach it. A profile that wants an
    // intranet host lists its CIDR, which the rules above accept.
    let _ = writeln!(s, "add rule {t} out_{v} ip daddr @blocked4 {reject}");
    let _ = writeln!(s, "add rule {t} out_{v} ip daddr @allow4_{v} accept");
    let _ = writeln!(
        s,
        "add rule {t} out_{v} meta l4proto {{ tcp, udp }} ip daddr . th dport @allowp4_{v} accept"
    );
    let _ = writeln!(s, "add rule {t} out_{v} {reject}");
}

/// The bridge-table chain of the sandbox's port: only its own MAC, its own
/// IPv4 source (or 0.0.0.0 for DHCP) and truthful ARP get in.
fn render_port(s: &mut String, sb: &SandboxNet) {
    let v = sb.vmid;
    let ip = sb.ip;
    let mac = mac_text(&sb.mac);
    let t = format!("bridge {TABLE}");
    let spoof = format!("counter name \"spoof_{v}\" drop");
    let _ = writeln!(s, "add counter {t} spoof_{v}");
    let _ = writeln!(s, "add chain {t} port_{v}");
    let rules = [
        format!("ether saddr != {mac} {spoof}"),
        format!("ether type arp arp saddr ether != {mac} {spoof}"),
        // 0.0.0.0 is the sender address of an ARP probe (RFC 5227).
        format!("ether type arp arp saddr ip != {{ {ip}, 0.0.0.0 }} {spoof}"),
        "ether type arp accept".to_string(),
        format!("ether type ip ip saddr {ip} accept"),
        "ether type ip ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept".to_string(),
        // Router solicitations and the like: expected noise, not spoofing.
        "ether type ip6 drop".to_string(),
        spoof.clone(),
    ];
    for r in rules {
        let _ = writeln!(s, "add rule {t} port_{v} {r}");
    }
    let _ = writeln!(
        s,
        "add element {t} ports {{ {} : jump port_{v} }}",
        quote(&sb.tap)
    );
}

/// Removes every trace of sandbox `vmid` that `list_json` (the output of
/// [`Nft::list_json`]) shows: its map elements (found by the chain they jump
/// to, so the caller needs neither its address nor its TAP name, as when
/// the reconciler cleans up after a crash), its exposures, chains, sets
/// and counters. Empty when nothing of it is there.
pub fn render_remove_sandbox(vmid: u32, list_json: &str) -> String {
    let Ok(objects) = objects(list_json) else {
        return String::new();
    };
    let mut s = String::new();
    let mut ips = BTreeSet::new();
    for o in &objects {
        let Some((family, map)) = ours(o, "map") else {
            continue;
        };
        let name = map["name"].as_str().unwrap_or_default();
        for e in map["elem"].as_array().into_iter().flatten() {
            let target = e[1]["jump"]["target"].as_str().unwrap_or_default();
            if vmid_of(target) != Some(vmid) {
                continue;
            }
            let key = &e[0];
            if let Some(ip) = key.as_str().filter(|_| family == "inet") {
                ips.insert(ip.to_string());
            }
            let key = match key.as_str() {
                Some(k) if family == "bridge" => quote(k),
                Some(k) => k.to_string(),
                None => continue,
            };
            let _ = writeln!(s, "delete element {family} {TABLE} {name} {{ {key} }}");
        }
    }
    for ip in &ips {
        if set_has(&objects, "peers", ip) {
            let _ = writeln!(s, "delete element inet {TABLE} peers {{ {ip} }}");
        }
    }
    remove_exposures_to(&mut s, &objects, &ips);
    for kind in ["chain", "set", "counter"] {
        for o in &objects {
            let Some((family, obj)) = ours(o, kind) else {
                continue;
            };
            let name = obj["name"].as_str().unwrap_or_default();
            if vmid_of(name) != Some(vmid) {
                continue;
            }
            if kind == "chain" {
                let _ = writeln!(s, "flush chain {family} {TABLE} {name}");
            }
            let _ = writeln!(s, "delete {kind} {family} {TABLE} {name}");
        }
    }
    s
}

fn remove_exposures_to(s: &mut String, objects: &[Value], ips: &BTreeSet<String>) {
    for o in objects {
        let Some((_, map)) = ours(o, "map") else {
            continue;
        };
        let name = map["name"].as_str().unwrap_or_default();
        if !name.starts_with("expose_") {
            continue;
        }
        for e in map["elem"].as_array().into_iter().flatten() {
            let target = &e[1]["concat"][0];
            if !target.as_str().is_some_and(|ip| ips.contains(ip)) {
                continue;
            }
            let parts: Vec<String> = e[0]["concat"]
                .as_array()
                .into_iter()
                .flatten()
                .map(json_scalar)
                .collect();
            let _ = writeln!(
                s,
                "delete element inet {TABLE} {name} {{ {} }}",
                parts.join(" . ")
            );
        }
    }
}

/// The DNAT map element of a new exposure.
pub fn render_add_exposure(e: &Exposure) -> Result<String, NftError> {
    let (map, key) = exposure_key(e)?;
    Ok(format!(
        "add element inet {TABLE} {map} {{ {key} : {} . {} }}\n",
        e.guest_ip, e.guest_port
    ))
}

/// Deletes what [`render_add_exposure`] added for `e`. Existing connections
/// live on in conntrack; new ones are no longer forwarded.
pub fn render_remove_exposure(e: &Exposure) -> Result<String, NftError> {
    let (map, key) = exposure_key(e)?;
    Ok(format!("delete element inet {TABLE} {map} {{ {key} }}\n"))
}

fn exposure_key(e: &Exposure) -> Result<(&'static str, String), NftError> {
    let tail = format!("{} . {}", e.proto.as_str(), e.host_port);
    match e.bind {
        b if b.is_unspecified() => Ok(("expose_any", tail)),
        IpAddr::V4(b) => Ok(("expose_bound", format!("{b} . {tail}"))),
        IpAddr::V6(_) => Err(NftError::Ipv6Bind {
            name: e.name.clone(),
            bind: e.bind,
        }),
    }
}

/// Lets sandbox `vmid` reach `addr` (on `port`, TCP or UDP, if given) for
/// `ttl`, as the DNS server learned from an allowed name. Adding an address
/// that is already there restarts its timeout. Empty for IPv6, which never
/// leaves a sandbox, so there is nothing to open.
pub fn render_allow_resolved(vmid: u32, addr: IpAddr, port: Option<u16>, ttl: Duration) -> String {
    let IpAddr::V4(addr) = addr else {
        return String::new();
    };
    let (set, key) = match port {
        None => (format!("allow4_{vmid}"), addr.to_string()),
        Some(p) => (format!("allowp4_{vmid}"), format!("{addr} . {p}")),
    };
    // A zero timeout is refused by nft; one second is the floor.
    let secs = ttl.as_secs().max(1);
    let t = format!("inet {TABLE} {set}");
    // add, delete, add: the element exists whatever the state, so the delete
    // cannot fail, and the last add starts a fresh timeout.
    format!(
        "add element {t} {{ {key} }}\ndelete element {t} {{ {key} }}\nadd element {t} {{ {key} timeout {secs}s }}\n"
    )
}

/// Dropped-traffic counters per sandbox, from `nft -j list ruleset`.
pub fn counters(list_json: &str) -> BTreeMap<u32, Counters> {
    let mut out: BTreeMap<u32, Counters> = BTreeMap::new();
    for o in objects(list_json).unwrap_or_default() {
        let Some((_, c)) = ours(&o, "counter") else {
            continue;
        };
        let name = c["name"].as_str().unwrap_or_default();
        let Some(v) = vmid_of(name) else { continue };
        let packets = c["packets"].as_u64().unwrap_or(0);
        let bytes = c["bytes"].as_u64().unwrap_or(0);
        let entry = out.entry(v).or_default();
        if name.starts_with("spoof_") {
            entry.spoofed_packets += packets;
            entry.spoofed_bytes += bytes;
        } else {
            entry.dropped_packets += packets;
            entry.dropped_bytes += bytes;
        }
    }
    out
}

/// The VMIDs that own anything (chains, sets, counters) in our tables:
/// those no live sandbox owns are for [`render_remove_sandbox`].
pub fn sandboxes_in_table(list_json: &str) -> Vec<u32> {
    let mut found = BTreeSet::new();
    for o in objects(list_json).unwrap_or_default() {
        for kind in ["chain", "set", "counter"] {
            if let Some((_, obj)) = ours(&o, kind) {
                found.extend(vmid_of(obj["name"].as_str().unwrap_or_default()));
            }
        }
    }
    found.into_iter().collect()
}

/// Applies nft scripts and lists the ruleset; a trait so that orchestration
/// is testable without root.
pub trait Nft: Send + Sync {
    /// Applies `script` as one atomic transaction.
    fn apply(&self, script: &str) -> Result<(), NftError>;
    /// `nft -j list ruleset`, for [`counters`], [`sandboxes_in_table`] and
    /// [`render_remove_sandbox`].
    fn list_json(&self) -> Result<String, NftError>;
}

/// The real `nft` binary. With `check_only`, scripts are validated by the
/// kernel (`nft -c`) and nothing changes.
#[derive(Clone, Copy, Debug, Default)]
pub struct NftCli {
    pub check_only: bool,
}

impl Nft for NftCli {
    fn apply(&self, script: &str) -> Result<(), NftError> {
        let mut cmd = Command::new("nft");
        if self.check_only {
            cmd.arg("-c");
        }
        cmd.args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(NftError::Spawn)?;
        if let Some(mut stdin) = child.stdin.take() {
            // A write error means nft exited early; its stderr says why.
            let _ = stdin.write_all(script.as_bytes());
        }
        let out = child.wait_with_output().map_err(NftError::Spawn)?;
        if out.status.success() {
            Ok(())
        } else {
            Err(NftError::Apply {
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }

    fn list_json(&self) -> Result<String, NftError> {
        let out = Command::new("nft")
            .args(["-j", "list", "ruleset"])
            .stdin(Stdio::null())
            .output()
            .map_err(NftError::Spawn)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(NftError::List {
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }
}

/// A fake that keeps every applied script and answers `list_json` with a
/// canned listing.
#[derive(Debug, Default)]
pub struct Recording {
    pub scripts: Mutex<Vec<String>>,
    pub listing: Mutex<String>,
}

impl Recording {
    pub fn scripts(&self) -> Vec<String> {
        self.scripts.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Nft for Recording {
    fn apply(&self, script: &str) -> Result<(), NftError> {
        if let Ok(mut s) = self.scripts.lock() {
            s.push(script.to_string());
        }
        Ok(())
    }

    fn list_json(&self) -> Result<String, NftError> {
        Ok(self.listing.lock().map(|l| l.clone()).unwrap_or_default())
    }
}

/// The `nftables` array of a JSON listing.
fn objects(list_json: &str) -> Result<Vec<Value>, serde_json::Error> {
    let v: Value = serde_json::from_str(list_json)?;
    Ok(v["nftables"].as_array().cloned().unwrap_or_default())
}

/// `o`'s `kind` body when it belongs to one of our tables, with its family.
fn ours<'a>(o: &'a Value, kind: &str) -> Option<(&'a str, &'a Value)> {
    let body = o.get(kind)?;
    let family = body["family"].as_str()?;
    (body["table"] == TABLE && (family == "inet" || family == "bridge")).then_some((family, body))
}

fn set_has(objects: &[Value], set: &str, ip: &str) -> bool {
    objects.iter().any(|o| {
        ours(o, "set").is_some_and(|(f, s)| {
            f == "inet"
                && s["name"] == set
                && s["elem"]
                    .as_array()
                    .is_some_and(|e| e.iter().any(|x| x == ip))
        })
    })
}

/// The VMID suffix of a per-sandbox object name (`out_1012` → 1012).
fn vmid_of(name: &str) -> Option<u32> {
    let (prefix, v) = name.rsplit_once('_')?;
    const PER_SANDBOX: &[&str] = &["in", "out", "port", "allow4", "allowp4", "drop", "spoof"];
    PER_SANDBOX.contains(&prefix).then(|| v.parse().ok())?
}

fn json_scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// An interface name as an nft string literal. Interface names cannot hold
/// quotes (the kernel allows any byte but `/`, `:` and whitespace), but a
/// stray one must not end the literal.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', ""))
}

fn port_list(ports: &[u16]) -> String {
    let mut ports: Vec<u16> = ports.to_vec();
    ports.sort_unstable();
    ports.dedup();
    match ports.as_slice() {
        [] => String::new(),
        [one] => one.to_string(),
        many => {
            let list: Vec<String> = many.iter().map(u16::to_string).collect();
            format!("{{ {} }}", list.join(", "))
        }
    }
}

fn mac_text(mac: &[u8; 6]) -> String {
    let parts: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    parts.join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(vmid: u32, mode: NetworkMode) -> SandboxNet {
        SandboxNet {
            vmid,
            tap: format!("al{vmid}"),
            mac: [0x52, 0x54, 0, 0, 0, vmid as u8],
            ip: Ipv4Addr::new(10, 77, 0, vmid as u8),
            mode,
            allow: vec![],
            see_sandboxes: false,
        }
    }

    fn allowlisted() -> SandboxNet {
        SandboxNet {
            allow: AllowNet::from_rules(&[
                AllowRule::parse("198.51.100.0/24").unwrap(),
                AllowRule::parse("192.0.2.7:443").unwrap(),
                AllowRule::parse("2001:db8::/32").unwrap(),
                AllowRule::parse("github.com").unwrap(),
            ]),
            ..sandbox(12, NetworkMode::Allowlist)
        }
    }

    fn exposure() -> Exposure {
        Exposure {
            name: "sbx-11-8080".into(),
            vmid: 11,
            guest_ip: Ipv4Addr::new(10, 77, 0, 11),
            guest_port: 8080,
            host_port: 18080,
            bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            proto: Proto::Tcp,
        }
    }

    pub(crate) fn plan() -> Plan {
        Plan {
            bridge: "agentlab0".into(),
            gateway: Ipv4Addr::new(10, 77, 0, 1),
            subnet: "10.77.0.1/16".parse().unwrap(),
            services: Services::default(),
            sandboxes: vec![
                sandbox(10, NetworkMode::Off),
                SandboxNet {
                    see_sandboxes: true,
                    ..sandbox(11, NetworkMode::Nat)
                },
                allowlisted(),
            ],
            exposures: vec![
                exposure(),
                Exposure {
                    name: "dns".into(),
                    bind: "127.0.0.1".parse().unwrap(),
                    proto: Proto::Udp,
                    guest_port: 53,
                    host_port: 5353,
                    ..exposure()
                },
            ],
        }
    }

    #[test]
    fn whole_table_matches_the_golden_file() {
        let golden = include_str!("../../tests/fixtures/nft/table.nft");
        assert_eq!(render_table(&plan()), golden);
    }

    #[test]
    fn table_replaces_both_families_even_when_absent() {
        let text = render_table(&plan());
        assert!(text.starts_with(
            "table inet agentlab {}\ndelete table inet agentlab\n\
             table bridge agentlab {}\ndelete table bridge agentlab\n"
        ));
    }

    #[test]
    fn nat_sandbox_is_refused_private_ranges_then_accepted() {
        let text = render_add_sandbox(&sandbox(11, NetworkMode::Nat));
        assert!(text.contains(
            "add rule inet agentlab out_11 ip daddr @blocked4 counter name \"drop_11\" reject"
        ));
        assert!(text.contains("add rule inet agentlab out_11 accept\n"));
        assert!(text.contains("add element inet agentlab egress { 10.77.0.11 : jump out_11 }"));
    }

    #[test]
    fn off_sandbox_reaches_neither_the_world_nor_host_services() {
        let text = render_add_sandbox(&sandbox(10, NetworkMode::Off));
        assert!(text.contains("add rule inet agentlab out_10 counter name \"drop_10\" drop\n"));
        assert!(!text.contains("in_10 jump host_services"));
    }

    #[test]
    fn allowlist_skips_ipv6_and_domain_entries() {
        let text = render_add_sandbox(&allowlisted());
        assert!(text.contains("out_12 ip daddr 198.51.100.0/24 accept"));
        assert!(text.contains(
            "out_12 ip daddr 192.0.2.7/32 meta l4proto { tcp, udp } th dport 443 accept"
        ));
        assert!(!text.contains("2001:db8"));
        assert!(!text.contains("github"));
    }

    #[test]
    fn allowlist_blocks_foreign_resolvers() {
        let text = render_add_sandbox(&allowlisted());
        assert!(text.contains("out_12 meta l4proto { tcp, udp } th dport 53 counter"));
        assert!(text.contains("out_12 tcp dport 853 counter"));
    }

    #[test]
    fn allowlist_refuses_private_ranges_before_resolved_addresses() {
        let text = render_add_sandbox(&allowlisted());
        let listed = text.find("out_12 ip daddr 198.51.100.0/24 accept").unwrap();
        let blocked = text.find("out_12 ip daddr @blocked4 counter").unwrap();
        let resolved = text.find("out_12 ip daddr @allow4_12 accept").unwrap();
        let resolved_port = text.find("@allowp4_12 accept").unwrap();
        assert!(listed < blocked && blocked < resolved && blocked < resolved_port);
    }

    #[test]
    fn uplink_traffic_for_loopback_is_never_exposed() {
        let text = render_table(&plan());
        assert!(text.contains("iifname != \"agentlab0\" ip daddr != 127.0.0.0/8 jump expose"));
    }

    #[test]
    fn port_chain_pins_mac_and_address() {
        let text = render_add_sandbox(&sandbox(11, NetworkMode::Nat));
        assert!(text
            .contains("port_11 ether saddr != 52:54:00:00:00:0b counter name \"spoof_11\" drop"));
        assert!(text.contains("port_11 ether type ip ip saddr 10.77.0.11 accept"));
        assert!(text.contains("add element bridge agentlab ports { \"al11\" : jump port_11 }"));
    }

    #[test]
    fn peers_only_for_sandboxes_that_see_each_other() {
        let sb = SandboxNet {
            see_sandboxes: true,
            ..sandbox(11, NetworkMode::Nat)
        };
        let text = render_add_sandbox(&sb);
        assert!(text.contains("add rule inet agentlab out_11 ip daddr @peers accept"));
        assert!(text.contains("add element inet agentlab peers { 10.77.0.11 }"));
    }

    #[test]
    fn exposure_on_any_address_uses_the_unbound_map() {
        let add = render_add_exposure(&exposure()).unwrap();
        let del = render_remove_exposure(&exposure()).unwrap();
        assert_eq!(
            add,
            "add element inet agentlab expose_any { tcp . 18080 : 10.77.0.11 . 8080 }\n"
        );
        assert_eq!(
            del,
            "delete element inet agentlab expose_any { tcp . 18080 }\n"
        );
    }

    #[test]
    fn exposure_bound_to_loopback_keys_on_the_address() {
        let e = Exposure {
            bind: "127.0.0.1".parse().unwrap(),
            proto: Proto::Udp,
            ..exposure()
        };
        let add = render_add_exposure(&e).unwrap();
        assert_eq!(add, "add element inet agentlab expose_bound { 127.0.0.1 . udp . 18080 : 10.77.0.11 . 8080 }\n");
    }

    #[test]
    fn exposure_bound_to_an_ipv6_address_is_refused() {
        let e = Exposure {
            bind: "::1".parse().unwrap(),
            ..exposure()
        };
        let err = render_add_exposure(&e).unwrap_err();
        assert!(err.to_string().contains("sbx-11-8080"), "{err}");
    }

    #[test]
    fn resolved_address_restarts_its_timeout() {
        let text = render_allow_resolved(
            12,
            "192.0.2.9".parse().unwrap(),
            Some(443),
            Duration::from_secs(300),
        );
        assert_eq!(
            text,
            "add element inet agentlab allowp4_12 { 192.0.2.9 . 443 }\n\
             delete element inet agentlab allowp4_12 { 192.0.2.9 . 443 }\n\
             add element inet agentlab allowp4_12 { 192.0.2.9 . 443 timeout 300s }\n"
        );
    }

    #[test]
    fn resolved_address_with_zero_ttl_gets_one_second() {
        let text = render_allow_resolved(12, "192.0.2.9".parse().unwrap(), None, Duration::ZERO);
        assert!(
            text.ends_with("allow4_12 { 192.0.2.9 timeout 1s }\n"),
            "{text}"
        );
    }

    #[test]
    fn resolved_ipv6_address_opens_nothing() {
        let text = render_allow_resolved(
            12,
            "2001:db8::1".parse().unwrap(),
            None,
            Duration::from_secs(60),
        );
        assert_eq!(text, "");
    }

    const LISTING: &str = include_str!("../../tests/fixtures/nft/listing.json");

    #[test]
    fn counters_sum_policy_and_spoofing_drops_per_sandbox() {
        let c = counters(LISTING);
        assert_eq!(
            c[&11],
            Counters {
                dropped_packets: 3,
                dropped_bytes: 180,
                spoofed_packets: 2,
                spoofed_bytes: 84,
            }
        );
    }

    #[test]
    fn sandboxes_in_table_lists_every_owner_once() {
        assert_eq!(sandboxes_in_table(LISTING), vec![10, 11, 12]);
    }

    #[test]
    fn remove_sandbox_deletes_what_the_listing_shows_for_it() {
        let text = render_remove_sandbox(11, LISTING);
        let golden = include_str!("../../tests/fixtures/nft/remove_11.nft");
        assert_eq!(text, golden);
    }

    #[test]
    fn remove_unknown_sandbox_is_empty() {
        assert_eq!(render_remove_sandbox(99, LISTING), "");
    }

    #[test]
    fn garbage_listing_yields_nothing() {
        assert!(counters("not json").is_empty());
        assert!(sandboxes_in_table("{}").is_empty());
        assert_eq!(render_remove_sandbox(11, "[1,2"), "");
    }

    #[test]
    fn recording_keeps_scripts_in_order() {
        let r = Recording::default();
        r.apply("a").unwrap();
        r.apply("b").unwrap();
        assert_eq!(r.scripts(), vec!["a", "b"]);
    }
}
