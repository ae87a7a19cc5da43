//! DNS on the sandbox gateway (DESIGN.md §6): a small forwarding resolver
//! with a per-sandbox policy. It owns the DNS wire format (`codec`), the
//! per-client decision and allowlist matching (`policy`), the answer cache
//! (`cache`), the UDP/TCP server (`server`) and the upstream exchange
//! (`upstream`).
//! It does not own the nft sets: answers an allowlist lets through are handed
//! to [`Policy::allowed`], and the daemon adds them to the sandbox's set.
//!
//! What a client gets, by its source address ([`Policy::client`]):
//! - unknown source: REFUSED;
//! - names under the local domain (`<name>.<domain>`, `<vmid>.<domain>`,
//!   `host.<domain>`, `gateway.<domain>`, resolved by [`Policy::local`]): an
//!   answer only if the client has `see_local`, NXDOMAIN otherwise; never
//!   forwarded;
//! - [`ClientPolicy::Open`]: everything else is forwarded;
//! - [`ClientPolicy::Allowlist`]: only names matching a `Domain` rule are
//!   forwarded (`*.x.org` matches names under `x.org`, not `x.org` itself);
//!   others get NXDOMAIN. The A/AAAA addresses of an allowed answer (after
//!   its CNAME chain) go to [`Policy::allowed`] before the answer is sent,
//!   also when it comes from the cache, so the guest's first connection
//!   finds them in its set.
//!
//! Specs: RFC 1035 (messages, UDP and TCP transport), RFC 3596 (AAAA),
//! RFC 2308 (negative caching), RFC 6891 (EDNS0 payload size), RFC 5452
//! (forged answers: random id and source port, question check).

pub mod cache;
pub mod codec;
pub mod policy;
mod server;
mod upstream;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

pub use cache::CacheLimits;

use crate::config::AllowRule;

/// Port 53 (RFC 1035 §4.2).
pub const DNS_PORT: u16 = 53;

/// Where the server listens, whom it asks, and its bounds.
#[derive(Clone, Debug)]
pub struct DnsConfig {
    /// UDP and TCP listen addresses (the gateway's, port 53).
    pub listen: Vec<SocketAddr>,
    /// Resolvers asked in turn; see [`upstreams_from_resolv_conf`].
    pub upstream: Vec<SocketAddr>,
    /// The local domain, lowercase without dots at either end (`sbx.internal`).
    pub domain: String,
    /// Budget for one forwarded question, all retries included; past it the
    /// client gets SERVFAIL.
    pub timeout: Duration,
    pub cache: CacheLimits,
    pub limits: Limits,
}

impl DnsConfig {
    /// A config with a 2 s upstream budget and default bounds.
    pub fn new(listen: Vec<SocketAddr>, upstream: Vec<SocketAddr>, domain: &str) -> DnsConfig {
        DnsConfig {
            listen,
            upstream,
            domain: policy::normalize(domain),
            timeout: Duration::from_secs(2),
            cache: CacheLimits::default(),
            limits: Limits::default(),
        }
    }
}

/// Bounds that keep one client from starving the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Forwarded questions in flight, over all clients (further ones are dropped).
    pub in_flight: usize,
    /// Forwarded questions in flight from one source address.
    pub per_client: usize,
    /// Open TCP connections, over all clients.
    pub tcp_connections: usize,
    /// Open TCP connections from one source address.
    pub tcp_per_client: usize,
    /// A TCP connection with no complete query for this long is closed.
    pub tcp_idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            in_flight: 256,
            per_client: 32,
            tcp_connections: 64,
            tcp_per_client: 8,
            tcp_idle: Duration::from_secs(10),
        }
    }
}

/// What a sandbox's resolver may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientPolicy {
    /// `nat` mode: anything is forwarded.
    Open,
    /// `allowlist` mode: only names matching these rules (`Domain` variants;
    /// `Net` rules are ignored here, nft enforces them).
    Allowlist(Vec<AllowRule>),
}

/// A known client: the sandbox behind a source address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Client {
    pub vmid: u32,
    pub policy: ClientPolicy,
    /// Whether local names (other sandboxes, the host) resolve for it.
    pub see_local: bool,
}

/// One address an allowlist answer let through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub vmid: u32,
    pub addr: IpAddr,
    /// The record's remaining TTL, at least the cache's `min_ttl`: how long
    /// the nft set element should live.
    pub ttl: Duration,
    /// The matching rule's port; nft enforces it.
    pub port: Option<u16>,
    /// The name the guest asked for (normalized).
    pub name: String,
}

/// The daemon's side: who is asking, local names, and the allowlist feed.
/// Called from the server's threads, possibly concurrently.
pub trait Policy: Send + Sync + 'static {
    /// The sandbox behind `src`, or `None` (the question is REFUSED).
    fn client(&self, src: IpAddr) -> Option<Client>;
    /// The address of a local name, given without the domain suffix and in
    /// lowercase: a sandbox name, a VMID, or `host`/`gateway` (the gateway).
    fn local(&self, name: &str) -> Option<IpAddr>;
    /// Called before an allowed answer is sent; the answer waits for it.
    fn allowed(&self, r: &[Resolved]);
}

/// Counters since the server started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsStats {
    /// Well-formed queries received (UDP and TCP).
    pub queries: u64,
    /// Answered from local names.
    pub local: u64,
    /// Answered from the cache.
    pub cached: u64,
    /// Sent upstream.
    pub forwarded: u64,
    /// REFUSED (unknown client) or NOTIMP/FORMERR.
    pub refused: u64,
    /// NXDOMAIN by policy.
    pub denied: u64,
    /// SERVFAIL after the upstream budget ran out.
    pub servfail: u64,
    /// Datagrams dropped: malformed, not a query, or over an in-flight cap.
    pub dropped: u64,
}

/// A running server; [`DnsServer::stop`] or drop ends its threads.
pub struct DnsServer {
    inner: server::Server,
}

impl DnsServer {
    /// Binds every listen address (UDP and TCP) in the calling thread's
    /// network namespace and starts serving.
    pub fn spawn(cfg: DnsConfig, policy: Arc<dyn Policy>) -> io::Result<DnsServer> {
        server::Server::spawn(cfg, policy).map(|inner| DnsServer { inner })
    }

    /// The bound addresses, in `listen` order (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.inner.local_addrs()
    }

    pub fn stats(&self) -> DnsStats {
        self.inner.stats()
    }

    /// Stops listening and waits (briefly) for questions in flight.
    pub fn stop(self) {
        drop(self)
    }
}

/// The `nameserver` entries of a resolv.conf, as port-53 addresses, leaving
/// out any that is one of `ours` (forwarding to ourselves would loop) and
/// link-local IPv6 with a zone (`fe80::1%eth0`), which needs an interface.
pub fn upstreams_from_resolv_conf(text: &str, ours: &[SocketAddr]) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let line = line.split(['#', ';']).next()?;
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            let ip: IpAddr = words.next()?.parse().ok()?;
            Some(SocketAddr::new(ip, DNS_PORT))
        })
        .filter(|up| {
            !ours
                .iter()
                .any(|o| o.ip() == up.ip() && o.port() == up.port())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers_are_read_and_ours_skipped() {
        let text = "# generated\nsearch lan\nnameserver 10.77.0.1\nnameserver 192.0.2.53 ; main\n\
                    nameserver 2001:db8::53\nnameserver fe80::1%eth0\noptions edns0\n";
        let ours = ["10.77.0.1:53".parse().unwrap()];
        let got = upstreams_from_resolv_conf(text, &ours);
        let want: Vec<SocketAddr> = vec![
            "192.0.2.53:53".parse().unwrap(),
            "[2001:db8::53]:53".parse().unwrap(),
        ];
        assert_eq!(got, want);
    }
}
