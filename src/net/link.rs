//! Bridge and TAP devices for sandboxes (DESIGN.md §6, reference
//! qemu-and-network.md §6.1–6.2): the bridge with the gateway address, one
//! non-persistent TAP per sandbox enslaved to it as an isolated port, IPv4
//! forwarding, and the host-route check a subnet must pass. Requests are
//! rtnetlink messages (`rtnl`) over a route socket (`sys::netlink`) in the
//! calling thread's network namespace; nothing shells out to `ip`.
//!
//! Firewalling is `nft`'s; addresses handed to guests are `dhcp`'s.

use std::fmt::Write as _;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;

use ipnet::Ipv4Net;

use super::rtnl::{self, Link, Reply, Request};
use crate::sys::{netlink, tap};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot open a route netlink socket")]
    Socket(#[source] io::Error),
    #[error("{action} {dev}")]
    Netlink {
        action: &'static str,
        dev: String,
        #[source]
        source: io::Error,
    },
    #[error("no network device named {dev}")]
    NoDevice { dev: String },
    #[error("{dev} exists but is a {kind}, not a bridge; pick another bridge name")]
    NotBridge { dev: String, kind: String },
    #[error("cannot open TAP device {dev}")]
    OpenTap {
        dev: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot set {path}")]
    Sysctl {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// Creates the bridge `name` if missing (STP off, forward delay 0, so ports
/// forward at once), gives it `gateway` (address and prefix) if it lacks it,
/// brings it up, and lets it route 127.0.0.1-sourced packets that a port
/// exposure DNATs to a guest (`route_localnet`, see `nft`). Idempotent.
pub fn ensure_bridge(name: &str, gateway: Ipv4Net) -> Result<(), LinkError> {
    let mut nl = Netlink::open()?;
    let link = match nl.link(name)? {
        Some(link) => link,
        None => {
            nl.create_bridge(name)?;
            nl.link(name)?
                .ok_or_else(|| LinkError::NoDevice { dev: name.into() })?
        }
    };
    match link.kind.as_deref() {
        Some("bridge") => {}
        other => {
            return Err(LinkError::NotBridge {
                dev: name.into(),
                kind: other.unwrap_or("device of unknown kind").into(),
            })
        }
    }
    let has_addr = nl.addresses()?.iter().any(|a| {
        a.index == link.index
            && a.local == Some(gateway.addr())
            && a.prefix_len == gateway.prefix_len()
    });
    if !has_addr {
        nl.add_address(&link, gateway)?;
    }
    nl.set_up(&link)?;
    write_sysctl(
        &format!("/proc/sys/net/ipv4/conf/{name}/route_localnet"),
        true,
    )
}

/// Deletes the device `name`; a device that is already gone is fine.
pub fn delete_link(name: &str) -> Result<(), LinkError> {
    let mut nl = Netlink::open()?;
    let req = Request::new(rtnl::RTM_DELLINK, rtnl::NLM_F_ACK)
        .ifinfo(rtnl::AF_UNSPEC, 0, 0, 0)
        .attr_str(rtnl::IFLA_IFNAME, name);
    match nl.ack(req) {
        Err(e) if e.raw_os_error() == Some(nix::libc::ENODEV) => Ok(()),
        r => r.map_err(|source| LinkError::Netlink {
            action: "cannot delete",
            dev: name.into(),
            source,
        }),
    }
}

/// Names of the devices whose name starts with `prefix` (TAPs the
/// reconciler may have to delete).
pub fn links_with_prefix(prefix: &str) -> Result<Vec<String>, LinkError> {
    let mut nl = Netlink::open()?;
    Ok(nl
        .links()?
        .into_iter()
        .map(|l| l.name)
        .filter(|n| n.starts_with(prefix))
        .collect())
}

/// Creates the TAP `name` (`IFF_TAP|IFF_NO_PI|IFF_VNET_HDR`, non-persistent:
/// it vanishes when the last fd closes), sets its MAC if given, makes it an
/// isolated port of `bridge` ([`attach_port`]) and returns its fd, for QEMU
/// to inherit. On error the fd is dropped, so no device is left behind.
pub fn open_tap(name: &str, bridge: &str, mac_hint: Option<[u8; 6]>) -> Result<OwnedFd, LinkError> {
    let fd = tap::open(name).map_err(|source| LinkError::OpenTap {
        dev: name.into(),
        source,
    })?;
    if let Some(mac) = mac_hint {
        let mut nl = Netlink::open()?;
        let link = nl.require(name)?;
        let req = Request::new(rtnl::RTM_NEWLINK, rtnl::NLM_F_ACK)
            .ifinfo(rtnl::AF_UNSPEC, link.index, 0, 0)
            .attr(rtnl::IFLA_ADDRESS, &mac);
        nl.ack(req).map_err(|source| LinkError::Netlink {
            action: "cannot set the MAC address of",
            dev: name.into(),
            source,
        })?;
    }
    attach_port(name, bridge)?;
    Ok(fd)
}

/// Enslaves `dev` to `bridge` as an isolated port (isolated ports cannot
/// exchange frames with each other, only with the bridge itself and
/// non-isolated ports; Linux ≥ 4.18) with MAC learning on, and brings it up.
/// `open_tap` uses it; tests use it on a veth standing in for a TAP.
pub fn attach_port(dev: &str, bridge: &str) -> Result<(), LinkError> {
    let mut nl = Netlink::open()?;
    let port = nl.require(dev)?;
    let br = nl.require(bridge)?;
    let fail = |action| {
        move |source| LinkError::Netlink {
            action,
            dev: dev.to_string(),
            source,
        }
    };
    let req = Request::new(rtnl::RTM_NEWLINK, rtnl::NLM_F_ACK)
        .ifinfo(rtnl::AF_UNSPEC, port.index, 0, 0)
        .attr_u32(rtnl::IFLA_MASTER, br.index);
    nl.ack(req).map_err(fail("cannot attach to the bridge"))?;
    // Bridge port flags are set on the port with family AF_BRIDGE.
    let req = Request::new(rtnl::RTM_SETLINK, rtnl::NLM_F_ACK)
        .ifinfo(rtnl::AF_BRIDGE, port.index, 0, 0)
        .begin(rtnl::IFLA_PROTINFO)
        .attr(rtnl::IFLA_BRPORT_ISOLATED, &[1])
        .attr(rtnl::IFLA_BRPORT_LEARNING, &[1])
        .end();
    nl.ack(req)
        .map_err(fail("cannot isolate the bridge port"))?;
    nl.set_up(&port)
}

/// Turns IPv4 forwarding on or off for the whole namespace.
pub fn set_ipv4_forwarding(on: bool) -> io::Result<()> {
    std::fs::write(
        "/proc/sys/net/ipv4/ip_forward",
        if on { "1\n" } else { "0\n" },
    )
}

/// Host routes that overlap `subnet`, other than those through
/// `ignore_dev` (the bridge itself) and the default route, as text naming
/// the route and its device (`10.0.0.0/8 via 192.168.1.1 dev wg0`).
pub fn route_conflicts(subnet: Ipv4Net, ignore_dev: &str) -> Result<Vec<String>, LinkError> {
    let mut nl = Netlink::open()?;
    let links = nl.links()?;
    let name_of = |index: Option<u32>| {
        index.and_then(|i| links.iter().find(|l| l.index == i).map(|l| l.name.clone()))
    };
    let mut out = vec![];
    for r in nl.routes()? {
        // The local table holds the host's own and broadcast addresses, which
        // the main table covers with the prefix routes that matter.
        if r.table == rtnl::RT_TABLE_LOCAL || r.dst_len == 0 {
            continue;
        }
        let Ok(net) = Ipv4Net::new(r.dst, r.dst_len) else {
            continue;
        };
        if !(net.contains(&subnet.network()) || subnet.trunc().contains(&net.network())) {
            continue;
        }
        let dev = name_of(r.oif);
        if dev.as_deref() == Some(ignore_dev) {
            continue;
        }
        out.push(describe_route(net, r.gateway, dev.as_deref()));
    }
    Ok(out)
}

fn describe_route(net: Ipv4Net, gateway: Option<Ipv4Addr>, dev: Option<&str>) -> String {
    let mut s = net.to_string();
    if let Some(gw) = gateway {
        let _ = write!(s, " via {gw}");
    }
    match dev {
        Some(d) => {
            let _ = write!(s, " dev {d}");
        }
        None => s.push_str(" (no device)"),
    }
    s
}

fn write_sysctl(path: &str, on: bool) -> Result<(), LinkError> {
    std::fs::write(path, if on { "1\n" } else { "0\n" }).map_err(|source| LinkError::Sysctl {
        path: path.into(),
        source,
    })
}

/// A route socket with the request/reply loop.
struct Netlink {
    sock: netlink::Socket,
    seq: u32,
}

impl Netlink {
    fn open() -> Result<Netlink, LinkError> {
        let sock = netlink::Socket::open().map_err(LinkError::Socket)?;
        Ok(Netlink { sock, seq: 0 })
    }

    /// Sends `req` and collects payload messages until the kernel acks or
    /// ends the dump; so every request that is not a dump asks for an ack.
    fn transact(&mut self, req: Request) -> io::Result<Vec<(u16, Vec<u8>)>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        self.sock.send(&req.finish(seq))?;
        let mut out = vec![];
        loop {
            let dgram = self.sock.recv()?;
            let replies =
                rtnl::replies(&dgram).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            for reply in replies {
                match reply {
                    Reply::Message { kind, seq: s, body } if s == seq => {
                        out.push((kind, body.to_vec()));
                    }
                    Reply::Ack { seq: s } | Reply::Done { seq: s } if s == seq => return Ok(out),
                    Reply::Error { seq: s, errno } if s == seq => {
                        return Err(io::Error::from_raw_os_error(errno))
                    }
                    // Leftovers of an earlier request; not ours to read.
                    _ => {}
                }
            }
        }
    }

    fn ack(&mut self, req: Request) -> io::Result<()> {
        self.transact(req).map(drop)
    }

    fn link(&mut self, name: &str) -> Result<Option<Link>, LinkError> {
        let req = Request::new(rtnl::RTM_GETLINK, rtnl::NLM_F_ACK)
            .ifinfo(rtnl::AF_UNSPEC, 0, 0, 0)
            .attr_str(rtnl::IFLA_IFNAME, name);
        match self.transact(req) {
            Ok(msgs) => Ok(msgs.first().and_then(|(_, b)| rtnl::parse_link(b).ok())),
            Err(e) if e.raw_os_error() == Some(nix::libc::ENODEV) => Ok(None),
            Err(source) => Err(LinkError::Netlink {
                action: "cannot look up",
                dev: name.into(),
                source,
            }),
        }
    }

    fn require(&mut self, name: &str) -> Result<Link, LinkError> {
        self.link(name)?
            .ok_or_else(|| LinkError::NoDevice { dev: name.into() })
    }

    fn links(&mut self) -> Result<Vec<Link>, LinkError> {
        let req =
            Request::new(rtnl::RTM_GETLINK, rtnl::NLM_F_DUMP).ifinfo(rtnl::AF_UNSPEC, 0, 0, 0);
        let msgs = self.dump(req, "cannot list")?;
        Ok(msgs
            .iter()
            .filter_map(|(_, b)| rtnl::parse_link(b).ok())
            .collect())
    }

    fn addresses(&mut self) -> Result<Vec<rtnl::Addr>, LinkError> {
        let req = Request::new(rtnl::RTM_GETADDR, rtnl::NLM_F_DUMP).ifaddr(rtnl::AF_INET, 0, 0);
        let msgs = self.dump(req, "cannot list the addresses of")?;
        Ok(msgs
            .iter()
            .filter_map(|(_, b)| rtnl::parse_addr(b).ok())
            .collect())
    }

    fn routes(&mut self) -> Result<Vec<rtnl::Route>, LinkError> {
        let req = Request::new(rtnl::RTM_GETROUTE, rtnl::NLM_F_DUMP).rtmsg(rtnl::AF_INET);
        let msgs = self.dump(req, "cannot list the routes of")?;
        Ok(msgs
            .iter()
            .filter(|(k, _)| *k == rtnl::RTM_NEWROUTE)
            .filter_map(|(_, b)| rtnl::parse_route(b).ok())
            .collect())
    }

    fn dump(
        &mut self,
        req: Request,
        action: &'static str,
    ) -> Result<Vec<(u16, Vec<u8>)>, LinkError> {
        self.transact(req).map_err(|source| LinkError::Netlink {
            action,
            dev: "all devices".into(),
            source,
        })
    }

    fn create_bridge(&mut self, name: &str) -> Result<(), LinkError> {
        let req = Request::new(
            rtnl::RTM_NEWLINK,
            rtnl::NLM_F_ACK | rtnl::NLM_F_CREATE | rtnl::NLM_F_EXCL,
        )
        .ifinfo(rtnl::AF_UNSPEC, 0, 0, 0)
        .attr_str(rtnl::IFLA_IFNAME, name)
        .begin(rtnl::IFLA_LINKINFO)
        .attr_str(rtnl::IFLA_INFO_KIND, "bridge")
        .begin(rtnl::IFLA_INFO_DATA)
        .attr_u32(rtnl::IFLA_BR_STP_STATE, 0)
        .attr_u32(rtnl::IFLA_BR_FORWARD_DELAY, 0)
        .end()
        .end();
        match self.ack(req) {
            // Another caller made it first: it is there, which is the point.
            Err(e) if e.raw_os_error() == Some(nix::libc::EEXIST) => Ok(()),
            r => r.map_err(|source| LinkError::Netlink {
                action: "cannot create the bridge",
                dev: name.into(),
                source,
            }),
        }
    }

    fn add_address(&mut self, link: &Link, net: Ipv4Net) -> Result<(), LinkError> {
        let addr = net.addr().octets();
        let req = Request::new(
            rtnl::RTM_NEWADDR,
            rtnl::NLM_F_ACK | rtnl::NLM_F_CREATE | rtnl::NLM_F_EXCL,
        )
        .ifaddr(rtnl::AF_INET, net.prefix_len(), link.index)
        .attr(rtnl::IFA_LOCAL, &addr)
        .attr(rtnl::IFA_ADDRESS, &addr);
        match self.ack(req) {
            Err(e) if e.raw_os_error() == Some(nix::libc::EEXIST) => Ok(()),
            r => r.map_err(|source| LinkError::Netlink {
                action: "cannot add the gateway address to",
                dev: link.name.clone(),
                source,
            }),
        }
    }

    fn set_up(&mut self, link: &Link) -> Result<(), LinkError> {
        let req = Request::new(rtnl::RTM_NEWLINK, rtnl::NLM_F_ACK).ifinfo(
            rtnl::AF_UNSPEC,
            link.index,
            rtnl::IFF_UP,
            rtnl::IFF_UP,
        );
        self.ack(req).map_err(|source| LinkError::Netlink {
            action: "cannot bring up",
            dev: link.name.clone(),
            source,
        })
    }
}
