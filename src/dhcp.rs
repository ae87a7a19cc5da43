//! DHCPv4 server for the sandbox bridge (DESIGN.md §6, RFC 2131 with the
//! options of RFC 2132): every sandbox MAC has one static address, which the
//! daemon keeps (sled) and hands this module through a [`Directory`].
//!
//! - `codec`: the BOOTP/DHCP message as bytes, pure and fuzzed.
//! - `lease`: what to answer and where to send it, pure, with `now` passed in.
//! - `server`: the socket driver, a thread owned by [`DhcpServer`].
//!
//! Not here: choosing addresses for new sandboxes and persisting them (the
//! daemon), the bridge itself (`net::link`), the firewall letting port 67
//! through (`net::nft`). A MAC the directory does not know gets no answer at
//! all, so a stray client or a second DHCP server on the segment is ignored.

pub mod codec;
pub mod lease;
mod server;

use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime};

pub use server::{DhcpServer, Stats};

/// What the server announces; the same for every client on the bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// The bridge to serve (`SO_BINDTODEVICE`), e.g. `agentlab0`.
    pub iface: String,
    /// The bridge's own address: source of replies and option 54.
    pub server_ip: Ipv4Addr,
    /// Prefix length of the sandbox subnet, for option 1.
    pub prefix: u8,
    /// Option 3.
    pub router: Ipv4Addr,
    /// Option 6; at most 63 servers (one option's worth).
    pub dns: Vec<Ipv4Addr>,
    /// Option 15, omitted when empty; at most 255 bytes.
    pub domain: String,
    /// Option 51; T1 and T2 (58, 59) are 1/2 and 7/8 of it.
    pub lease_time: Duration,
}

/// One sandbox's static lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
    /// Option 12, omitted when empty or longer than 255 bytes.
    pub hostname: String,
}

/// A change to a lease, reported to [`Directory::record`] on the server thread
/// as it happens (`Offered` as the DISCOVER is answered, `Bound` just before
/// the ACK is sent), so timestamps taken there measure the server's side of
/// DISCOVER→ACK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseEvent {
    Offered {
        mac: [u8; 6],
        ip: Ipv4Addr,
    },
    Bound {
        mac: [u8; 6],
        ip: Ipv4Addr,
        expires: SystemTime,
    },
    Renewed {
        mac: [u8; 6],
        ip: Ipv4Addr,
        expires: SystemTime,
    },
    Released {
        mac: [u8; 6],
        ip: Ipv4Addr,
    },
    /// The client found the address in use (ARP) and refused it: a sign that
    /// something on the bridge holds a sandbox's address.
    Declined {
        mac: [u8; 6],
        ip: Ipv4Addr,
    },
    /// The client asked for an address that is not its binding.
    Nak {
        mac: [u8; 6],
        requested: Ipv4Addr,
    },
}

/// The daemon's side: static bindings in, lease changes out. Both are called
/// on the server's thread for each packet, so they must be quick (an
/// in-memory map or a sled read; hand slow work to another thread).
pub trait Directory: Send + Sync + 'static {
    /// The static binding for this MAC; None → the server stays silent.
    fn lookup(&self, mac: [u8; 6]) -> Option<Binding>;
    /// Called on every lease change (for events, sled and `net show`).
    fn record(&self, ev: LeaseEvent);
}

/// Where a MAC's lease stands, as the server last saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseState {
    Offered,
    Bound,
    /// Was bound; the lease time ran out without a renewal.
    Expired,
    Released,
    Declined,
}

/// One row of [`DhcpServer::leases`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseInfo {
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
    pub hostname: String,
    pub state: LeaseState,
    /// When a bound lease runs out.
    pub expires: Option<SystemTime>,
}

/// `52:54:00:12:34:56`, for logs.
pub fn fmt_mac(mac: [u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}
