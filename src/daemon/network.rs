//! The daemon's sandbox network: puts `net::link`, `dhcp`, `net::dns` and
//! `net::nft` together for the sandboxes the store holds (DESIGN.md §6).
//!
//! Owns which sandboxes are on the bridge ("members": a VMID, its MAC and
//! address, its mode and allowlist), brings the network up the first time a
//! sandbox needs it (so a host that only runs `off` sandboxes never gets a
//! bridge), answers the DHCP server's and DNS server's questions about
//! members, feeds DNS answers into nft sets, and keeps exposures. The whole
//! nft table is rebuilt from the store when the network comes up, so a daemon
//! restart, or a crash in the middle of a change, leaves no rule for a
//! sandbox that no longer exists.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::Serialize;

use crate::backend::{BackendError, Nic, NicSource};
use crate::config::{AllowRule, NetworkConfig, NetworkMode, NicModel, Profile};
use crate::dhcp::{self, Binding, DhcpServer, LeaseEvent};
use crate::model::{EventDraft, Exposure, Sandbox};
use crate::net::dns::{self, Client, ClientPolicy, DnsServer, Resolved};
use crate::net::{link, nft};
use crate::store::Store;
use crate::time::Timestamp;

/// TAP devices are `altap<vmid>`; the prefix marks them as ours.
pub const TAP_PREFIX: &str = "altap";
/// How long a DHCP lease lasts; renewals keep a running guest's address.
const LEASE_TIME: Duration = Duration::from_secs(3600);

pub type EventFn = Arc<dyn Fn(EventDraft) + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(
        "the sandbox network is not available: {0}; `agentlab net check` says what the host lacks"
    )]
    Down(String),
    #[error("{0}")]
    User(String),
    #[error("{0}")]
    Host(String),
}

/// A sandbox on the bridge.
#[derive(Clone, Debug)]
struct Member {
    vmid: u32,
    name: String,
    mac: [u8; 6],
    ip: Ipv4Addr,
    mode: NetworkMode,
    model: NicModel,
    allow: Vec<AllowRule>,
    local_names: bool,
}

impl Member {
    /// The member a sandbox record describes; `None` when it has no network.
    fn of(sb: &Sandbox) -> Option<Member> {
        let ip = sb.ip.as_deref()?.parse().ok()?;
        let profile: Profile = serde_json::from_value(sb.spec.clone()).ok()?;
        if profile.network.mode == NetworkMode::Off {
            return None;
        }
        Some(Member {
            vmid: sb.vmid,
            name: sb.name.clone(),
            mac: parse_mac(&sb.mac)?,
            ip,
            mode: profile.network.mode,
            model: profile.network.model,
            allow: profile.network.allow,
            local_names: profile.network.local_names,
        })
    }

    fn nft(&self) -> nft::SandboxNet {
        nft::SandboxNet {
            vmid: self.vmid,
            tap: tap_name(self.vmid),
            mac: self.mac,
            ip: self.ip,
            mode: self.mode,
            allow: nft::AllowNet::from_rules(&self.allow),
            see_sandboxes: false,
        }
    }
}

struct Running {
    dhcp: DhcpServer,
    _dns: DnsServer,
}

/// What `agentlab net show` prints.
#[derive(Clone, Debug, Serialize)]
pub struct NetShow {
    pub bridge: String,
    pub gateway: String,
    pub subnet: String,
    pub dns_domain: String,
    pub up: bool,
    pub error: Option<String>,
    pub sandboxes: Vec<MemberShow>,
    pub exposures: Vec<Exposure>,
}

#[derive(Clone, Debug, Serialize)]
pub struct MemberShow {
    pub vmid: u32,
    pub name: String,
    pub mac: String,
    pub ip: String,
    pub mode: NetworkMode,
    /// `bound`, `offered`, `released`, `declined`, or empty before DHCP.
    pub lease: String,
    pub lease_expires_at: Option<Timestamp>,
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
}

pub struct Network {
    cfg: NetworkConfig,
    store: Store,
    nft: Box<dyn nft::Nft>,
    events: EventFn,
    members: RwLock<BTreeMap<u32, Member>>,
    /// Serializes bring-up and every nft change.
    up: Mutex<Option<Running>>,
    last_error: Mutex<Option<String>>,
}

impl Network {
    pub fn new(
        cfg: NetworkConfig,
        store: Store,
        nft: Box<dyn nft::Nft>,
        events: EventFn,
    ) -> Arc<Network> {
        Arc::new(Network {
            cfg,
            store,
            nft,
            events,
            members: RwLock::new(BTreeMap::new()),
            up: Mutex::new(None),
            last_error: Mutex::new(None),
        })
    }

    pub fn config(&self) -> &NetworkConfig {
        &self.cfg
    }

    /// After a daemon restart: the live sandboxes become the members again,
    /// and if any has a network the table is rebuilt from them (dropping
    /// whatever a dead sandbox left), the bridge checked, DHCP and DNS
    /// restarted. Exposures of sandboxes that are gone are forgotten.
    pub fn reconcile(self: &Arc<Self>, live: &[Sandbox]) {
        {
            let mut m = self.members.write().unwrap_or_else(|e| e.into_inner());
            m.clear();
            for member in live.iter().filter_map(Member::of) {
                m.insert(member.vmid, member);
            }
        }
        let alive: HashSet<u32> = live.iter().map(|s| s.vmid).collect();
        for e in self.store.exposures().unwrap_or_default() {
            if !alive.contains(&e.vmid) {
                let _ = self.store.remove_exposure(&e.name);
            }
        }
        let bridge_exists = link::links_with_prefix(&self.cfg.bridge)
            .map(|l| l.iter().any(|n| *n == self.cfg.bridge))
            .unwrap_or(false);
        if self.has_members() || bridge_exists {
            if let Err(e) = self.ensure_up() {
                crate::warn!("sandbox network: {e}");
            }
        }
    }

    fn has_members(&self) -> bool {
        !self
            .members
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// Brings the network up unless it is: bridge, forwarding, the whole nft
    /// table from the members and exposures, DHCP and DNS.
    pub fn ensure_up(self: &Arc<Self>) -> Result<(), NetError> {
        let mut up = crate::daemon::manager::lock(&self.up);
        if up.is_some() {
            return Ok(());
        }
        match self.bring_up() {
            Ok(running) => {
                *up = Some(running);
                *crate::daemon::manager::lock(&self.last_error) = None;
                (self.events)(EventDraft::new(
                    None,
                    "net.up",
                    format!(
                        "sandbox network up: bridge {} gateway {}",
                        self.cfg.bridge, self.cfg.gateway
                    ),
                ));
                Ok(())
            }
            Err(why) => {
                *crate::daemon::manager::lock(&self.last_error) = Some(why.clone());
                Err(NetError::Down(why))
            }
        }
    }

    fn bring_up(self: &Arc<Self>) -> Result<Running, String> {
        let conflicts = link::route_conflicts(self.cfg.subnet(), &self.cfg.bridge)
            .map_err(|e| format!("cannot read the host's routes: {e}"))?;
        if let Some(route) = conflicts.first() {
            return Err(format!(
                "the sandbox subnet {} overlaps the host route {route}; set another `subnet` in config.yaml",
                self.cfg.subnet()
            ));
        }
        link::ensure_bridge(&self.cfg.bridge, self.cfg.gateway)
            .map_err(|e| format!("bridge {}: {e}", self.cfg.bridge))?;
        link::set_ipv4_forwarding(true).map_err(|e| format!("IPv4 forwarding: {e}"))?;
        self.nft
            .apply(&nft::render_table(&self.plan()))
            .map_err(|e| format!("nftables: {e}"))?;
        let dhcp = DhcpServer::spawn(
            dhcp::ServerConfig {
                iface: self.cfg.bridge.clone(),
                server_ip: self.cfg.gateway_ip(),
                prefix: self.cfg.gateway.prefix_len(),
                router: self.cfg.gateway_ip(),
                dns: vec![self.cfg.gateway_ip()],
                domain: self.cfg.dns_domain.clone(),
                lease_time: LEASE_TIME,
            },
            Arc::new(Directory(Arc::downgrade(self))),
        )
        .map_err(|e| format!("DHCP server on {}: {e}", self.cfg.bridge))?;
        let gw = IpAddr::V4(self.cfg.gateway_ip());
        let listen = vec![SocketAddr::new(gw, dns::DNS_PORT)];
        let upstream = if self.cfg.dns_upstream.is_empty() {
            let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
            dns::upstreams_from_resolv_conf(&text, &listen)
        } else {
            self.cfg.dns_upstream.clone()
        };
        if upstream.is_empty() {
            crate::warn!("no DNS resolver for sandboxes: /etc/resolv.conf names none; set dns_upstream in config.yaml");
        }
        let dns = DnsServer::spawn(
            dns::DnsConfig::new(listen, upstream, &self.cfg.dns_domain),
            Arc::new(Policy(Arc::downgrade(self))),
        )
        .map_err(|e| format!("DNS server on {gw}:53: {e}"))?;
        Ok(Running { dhcp, _dns: dns })
    }

    fn plan(&self) -> nft::Plan {
        let members = self.members.read().unwrap_or_else(|e| e.into_inner());
        let ips: HashMap<u32, Ipv4Addr> = members.values().map(|m| (m.vmid, m.ip)).collect();
        nft::Plan {
            bridge: self.cfg.bridge.clone(),
            gateway: self.cfg.gateway_ip(),
            subnet: self.cfg.subnet(),
            services: nft::Services::default(),
            sandboxes: members.values().map(Member::nft).collect(),
            exposures: self
                .store
                .exposures()
                .unwrap_or_default()
                .iter()
                .filter_map(|e| Some(nft_exposure(e, *ips.get(&e.vmid)?)))
                .collect(),
        }
    }

    /// PROVISIONING: the sandbox joins the network (its rules are in place
    /// before its VM exists). A sandbox without a network is left alone.
    pub fn join(self: &Arc<Self>, sb: &Sandbox) -> Result<(), NetError> {
        let Some(member) = Member::of(sb) else {
            return Ok(());
        };
        let script = nft::render_add_sandbox(&member.nft());
        self.members
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(member.vmid, member);
        let up = crate::daemon::manager::lock(&self.up);
        let r = if up.is_none() {
            drop(up);
            // Bringing the network up renders the table with this member in it.
            self.ensure_up()
        } else {
            self.nft
                .apply(&script)
                .map_err(|e| NetError::Host(format!("nftables: {e}")))
        };
        if r.is_err() {
            // No rules, no answers: DHCP and DNS must not serve a sandbox
            // whose rules never went in.
            self.members
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&sb.vmid);
        }
        r
    }

    /// Destroy: the sandbox's rules, sets and exposures go.
    pub fn leave(&self, vmid: u32) -> Result<(), NetError> {
        let was = self
            .members
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&vmid);
        for e in self.store.exposures().unwrap_or_default() {
            if e.vmid == vmid {
                let _ = self.unexpose(&e.name);
            }
        }
        let up = crate::daemon::manager::lock(&self.up);
        if was.is_none() || up.is_none() {
            return Ok(());
        }
        // The listing names every object of the sandbox, whatever made it.
        let listing = self
            .nft
            .list_json()
            .map_err(|e| NetError::Host(format!("nftables: {e}")))?;
        self.nft
            .apply(&nft::render_remove_sandbox(vmid, &listing))
            .map_err(|e| NetError::Host(format!("nftables: {e}")))
    }

    /// `sandbox expose`: DNAT `bind:host_port` to the sandbox's `guest_port`.
    pub fn expose(
        &self,
        sb: &Sandbox,
        guest_port: u16,
        host_port: Option<u16>,
        bind: Option<Ipv4Addr>,
        name: Option<String>,
    ) -> Result<Exposure, NetError> {
        let member = self.member(sb.vmid).ok_or_else(|| {
            NetError::User(format!(
                "sandbox {} has no network (its profile's network.mode is off)",
                sb.vmid
            ))
        })?;
        let host_port = host_port.unwrap_or(guest_port);
        let bind = bind.unwrap_or(Ipv4Addr::UNSPECIFIED);
        let name = name.unwrap_or_else(|| format!("sbx-{}-{guest_port}", sb.vmid));
        crate::model::validate_name(&name).map_err(NetError::User)?;
        let existing = self.store.exposures().map_err(host)?;
        if let Some(e) = existing.iter().find(|e| e.host_port == host_port) {
            return Err(NetError::User(format!(
                "host port {host_port} is already exposed as {} (sandbox {})",
                e.name, e.vmid
            )));
        }
        // A listener on the host already owns the port: DNAT would hide it.
        if let Err(e) = TcpListener::bind((bind, host_port)) {
            return Err(NetError::User(format!(
                "host port {bind}:{host_port} is in use on this host ({e}); pick another with --host-port"
            )));
        }
        let e = Exposure {
            name,
            vmid: sb.vmid,
            guest_port,
            host_port,
            bind,
            created_at: Timestamp::now(),
        };
        if !self.store.add_exposure(&e).map_err(host)? {
            return Err(NetError::User(format!(
                "an exposure named {} already exists",
                e.name
            )));
        }
        let up = crate::daemon::manager::lock(&self.up);
        if up.is_some() {
            let rule = nft_exposure(&e, member.ip);
            let applied = nft::render_add_exposure(&rule).and_then(|s| self.nft.apply(&s));
            if let Err(err) = applied {
                let _ = self.store.remove_exposure(&e.name);
                return Err(NetError::Host(format!("nftables: {err}")));
            }
        }
        drop(up);
        (self.events)(
            EventDraft::new(
                Some(sb.vmid),
                "sandbox.expose",
                format!(
                    "exposed guest port {guest_port} on {bind}:{host_port} as {}",
                    e.name
                ),
            )
            .with_data(serde_json::json!(e)),
        );
        Ok(e)
    }

    /// `sandbox unexpose`: removes the rule and the record.
    pub fn unexpose(&self, name: &str) -> Result<Exposure, NetError> {
        let e = self
            .store
            .remove_exposure(name)
            .map_err(host)?
            .ok_or_else(|| NetError::User(format!("no exposure named {name:?}")))?;
        let up = crate::daemon::manager::lock(&self.up);
        let member = self.member(e.vmid);
        if let (Some(_), Some(m)) = (up.as_ref(), member) {
            nft::render_remove_exposure(&nft_exposure(&e, m.ip))
                .and_then(|s| self.nft.apply(&s))
                .map_err(|err| NetError::Host(format!("nftables: {err}")))?;
        }
        drop(up);
        (self.events)(
            EventDraft::new(
                Some(e.vmid),
                "sandbox.unexpose",
                format!("closed {} ({}:{})", e.name, e.bind, e.host_port),
            )
            .with_data(serde_json::json!(e)),
        );
        Ok(e)
    }

    pub fn exposures(&self) -> Result<Vec<Exposure>, NetError> {
        self.store.exposures().map_err(host)
    }

    pub fn show(&self) -> NetShow {
        let (up, leases) = match &*crate::daemon::manager::lock(&self.up) {
            Some(r) => (true, r.dhcp.leases()),
            None => (false, Vec::new()),
        };
        let counters = if up {
            self.nft
                .list_json()
                .map(|j| nft::counters(&j))
                .unwrap_or_default()
        } else {
            BTreeMap::new()
        };
        let members = self.members.read().unwrap_or_else(|e| e.into_inner());
        NetShow {
            bridge: self.cfg.bridge.clone(),
            gateway: self.cfg.gateway_ip().to_string(),
            subnet: self.cfg.subnet().to_string(),
            dns_domain: self.cfg.dns_domain.clone(),
            up,
            error: crate::daemon::manager::lock(&self.last_error).clone(),
            sandboxes: members
                .values()
                .map(|m| {
                    let c = counters.get(&m.vmid).cloned().unwrap_or_default();
                    let lease = leases.iter().find(|l| l.mac == m.mac);
                    MemberShow {
                        vmid: m.vmid,
                        name: m.name.clone(),
                        mac: format_mac(m.mac),
                        ip: m.ip.to_string(),
                        mode: m.mode,
                        lease: lease
                            .map(|l| format!("{:?}", l.state).to_lowercase())
                            .unwrap_or_default(),
                        lease_expires_at: lease.and_then(|l| l.expires).map(Timestamp::from_system),
                        dropped_packets: c.dropped_packets,
                        dropped_bytes: c.dropped_bytes,
                    }
                })
                .collect(),
            exposures: self.store.exposures().unwrap_or_default(),
        }
    }

    /// `agentlab net check`: what this host lacks for the network.
    pub fn check(&self) -> Vec<crate::net::check::Finding> {
        crate::net::check::check(&crate::net::check::CheckInput {
            bridge: self.cfg.bridge.clone(),
            gateway: self.cfg.gateway_ip(),
            subnet: self.cfg.subnet(),
        })
    }

    fn member(&self, vmid: u32) -> Option<Member> {
        self.members
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&vmid)
            .cloned()
    }

    fn member_where(&self, f: impl Fn(&Member) -> bool) -> Option<Member> {
        self.members
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .find(|m| f(m))
            .cloned()
    }

    fn on_lease(&self, ev: LeaseEvent) {
        let (mac, ip, state) = match &ev {
            LeaseEvent::Bound { mac, ip, .. } => (*mac, *ip, "bound"),
            LeaseEvent::Released { mac, ip } => (*mac, *ip, "released"),
            LeaseEvent::Declined { mac, ip } => (*mac, *ip, "declined: the address is in use"),
            LeaseEvent::Nak { mac, requested } => (*mac, *requested, "refused (NAK)"),
            // Offers and renewals are routine; the rest is worth a line in the log.
            LeaseEvent::Offered { .. } | LeaseEvent::Renewed { .. } => return,
        };
        let vmid = self.member_where(|m| m.mac == mac).map(|m| m.vmid);
        (self.events)(
            EventDraft::new(
                vmid,
                "net.lease",
                format!("DHCP {state}: {ip} for {}", format_mac(mac)),
            )
            .with_data(serde_json::json!({"mac": format_mac(mac), "ip": ip})),
        );
    }

    fn on_resolved(&self, answers: &[Resolved]) {
        let up = crate::daemon::manager::lock(&self.up);
        if up.is_none() {
            return;
        }
        let script: String = answers
            .iter()
            .map(|r| nft::render_allow_resolved(r.vmid, r.addr, r.port, r.ttl))
            .collect();
        if let Err(e) = self.nft.apply(&script) {
            crate::warn!("cannot allow resolved addresses: {e}");
        }
    }
}

impl NicSource for Network {
    fn nic_for(&self, sb: &Sandbox) -> Result<Option<Nic>, BackendError> {
        let Some(member) = self.member(sb.vmid) else {
            return Ok(None);
        };
        if crate::daemon::manager::lock(&self.up).is_none() {
            let why = crate::daemon::manager::lock(&self.last_error)
                .clone()
                .unwrap_or_else(|| "it is not up".into());
            return Err(BackendError::host(format!(
                "sandbox {}: the sandbox network is down ({why})",
                sb.vmid
            )));
        }
        let tap = link::open_tap(&tap_name(sb.vmid), &self.cfg.bridge, Some(member.mac))
            .map_err(|e| BackendError::host(format!("sandbox {}: TAP: {e}", sb.vmid)))?;
        Ok(Some(Nic {
            tap,
            mac: sb.mac.clone(),
            model: member.model,
        }))
    }
}

/// The DHCP server's view of the members (weak: the server is the network's).
struct Directory(std::sync::Weak<Network>);

impl dhcp::Directory for Directory {
    fn lookup(&self, mac: [u8; 6]) -> Option<Binding> {
        let net = self.0.upgrade()?;
        let m = net.member_where(|m| m.mac == mac)?;
        Some(Binding {
            mac,
            ip: m.ip,
            hostname: m.name,
        })
    }

    fn record(&self, ev: LeaseEvent) {
        if let Some(net) = self.0.upgrade() {
            net.on_lease(ev);
        }
    }
}

/// The DNS server's view: who asks, what it may resolve, where answers go.
struct Policy(std::sync::Weak<Network>);

impl dns::Policy for Policy {
    fn client(&self, src: IpAddr) -> Option<Client> {
        let net = self.0.upgrade()?;
        let m = net.member_where(|m| IpAddr::V4(m.ip) == src)?;
        let policy = match m.mode {
            NetworkMode::Allowlist => ClientPolicy::Allowlist(
                m.allow
                    .iter()
                    .filter(|r| matches!(r, AllowRule::Domain { .. }))
                    .cloned()
                    .collect(),
            ),
            _ => ClientPolicy::Open,
        };
        Some(Client {
            vmid: m.vmid,
            policy,
            see_local: m.local_names,
        })
    }

    fn local(&self, name: &str) -> Option<IpAddr> {
        let net = self.0.upgrade()?;
        if name == "host" || name == "gateway" {
            return Some(IpAddr::V4(net.cfg.gateway_ip()));
        }
        let m = net.member_where(|m| m.name == name || m.vmid.to_string() == name)?;
        Some(IpAddr::V4(m.ip))
    }

    fn allowed(&self, r: &[Resolved]) {
        if let Some(net) = self.0.upgrade() {
            net.on_resolved(r);
        }
    }
}

pub fn tap_name(vmid: u32) -> String {
    format!("{TAP_PREFIX}{vmid}")
}

fn nft_exposure(e: &Exposure, guest_ip: Ipv4Addr) -> nft::Exposure {
    nft::Exposure {
        name: e.name.clone(),
        vmid: e.vmid,
        guest_ip,
        guest_port: e.guest_port,
        host_port: e.host_port,
        bind: IpAddr::V4(e.bind),
        proto: nft::Proto::Tcp,
    }
}

fn host(e: impl std::fmt::Display) -> NetError {
    NetError::Host(e.to_string())
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

pub fn format_mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_round_trip() {
        let m = parse_mac("52:54:00:ab:cd:ef").unwrap();
        assert_eq!(format_mac(m), "52:54:00:ab:cd:ef");
        assert_eq!(parse_mac("52:54:00:ab:cd"), None);
        assert_eq!(parse_mac("52:54:00:ab:cd:ef:01"), None);
        assert_eq!(parse_mac("52:54:00:ab:cd:zz"), None);
    }
}
