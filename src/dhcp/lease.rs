//! The server's decisions (RFC 2131 §4.3): for one client message and that
//! client's static binding, what to answer, where to send it (§4.1), and
//! which lease change to record. Pure: no sockets, no clock (`now` is passed
//! in), so every path of the RFC is a plain unit test.
//!
//! Static leases make most of RFC 2131's address management moot: a MAC's
//! address never changes, so a DECLINE is recorded (something else on the
//! bridge holds a sandbox's address, which the daemon should hear about) but
//! the same address is offered again, as dnsmasq does for `dhcp-host`.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::SystemTime;

use super::codec::{option_code, wire_len, MIN_MAX_MESSAGE_SIZE};
use super::codec::{DhcpOption, Message, MessageType, Op, FLAG_BROADCAST, MAX_MESSAGE};
use super::{Binding, LeaseEvent, LeaseInfo, LeaseState, ServerConfig};

/// IPv4 (20) and UDP (8) headers: option 57 counts the whole IP datagram.
const IP_UDP_HEADERS: usize = 28;

/// Where a reply goes (RFC 2131 §4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// To the relay agent at `giaddr`, port 67.
    Relay(Ipv4Addr),
    /// To a client that has an address (`ciaddr`), port 68.
    Unicast(Ipv4Addr),
    /// To 255.255.255.255:68 on the bridge.
    Broadcast,
    /// To a client with no address yet: an Ethernet frame to `mac` carrying an
    /// IP datagram for `ip` (the client cannot answer ARP for it yet).
    Link { mac: [u8; 6], ip: Ipv4Addr },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub message: Message,
    pub to: Destination,
}

/// The decision for one message: an answer, a lease change, both or neither.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub reply: Option<Reply>,
    pub event: Option<LeaseEvent>,
    /// Why nothing was sent, for debug logs and the `dropped` counter.
    pub ignored: Option<&'static str>,
}

impl Outcome {
    fn ignore(why: &'static str) -> Outcome {
        Outcome {
            ignored: Some(why),
            ..Outcome::default()
        }
    }
}

struct Entry {
    ip: Ipv4Addr,
    hostname: String,
    state: LeaseState,
    expires: Option<SystemTime>,
}

/// The in-memory lease table: one entry per MAC that has a binding and has
/// spoken, so its size is bounded by the directory's, never by what guests send.
pub struct Leases {
    cfg: ServerConfig,
    table: HashMap<[u8; 6], Entry>,
}

/// Which §4.3.2 state a DHCPREQUEST comes from.
enum RequestKind {
    Selecting { server_id: Ipv4Addr },
    InitReboot { requested: Ipv4Addr },
    Renewing { ciaddr: Ipv4Addr },
}

impl Leases {
    pub fn new(cfg: ServerConfig) -> Leases {
        Leases {
            cfg,
            table: HashMap::new(),
        }
    }

    /// Decides the answer to `req`, from the client whose static binding is
    /// `binding` (None: unknown MAC, which is never answered).
    pub fn handle(&mut self, req: &Message, binding: Option<&Binding>, now: SystemTime) -> Outcome {
        if req.op != Op::Request {
            return Outcome::ignore("not a BOOTREQUEST");
        }
        let Some(mac) = req.mac() else {
            return Outcome::ignore("not an Ethernet client");
        };
        let Some(kind) = req.message_type() else {
            return Outcome::ignore("no DHCP message type");
        };
        let Some(b) = binding.filter(|b| b.mac == mac) else {
            return Outcome::ignore("unknown MAC");
        };
        match kind {
            MessageType::Discover => self.discover(req, b),
            MessageType::Request => self.request(req, b, now),
            MessageType::Decline => self.decline(req, b),
            MessageType::Release => self.release(req, b),
            MessageType::Inform => self.inform(req, b),
            MessageType::Offer | MessageType::Ack | MessageType::Nak => {
                Outcome::ignore("server message type from a client")
            }
        }
    }

    /// The lease table as of `now` (bound leases past their time show as expired).
    pub fn snapshot(&self, now: SystemTime) -> Vec<LeaseInfo> {
        let mut rows: Vec<LeaseInfo> = self
            .table
            .iter()
            .map(|(mac, e)| LeaseInfo {
                mac: *mac,
                ip: e.ip,
                hostname: e.hostname.clone(),
                state: match (e.state, e.expires) {
                    (LeaseState::Bound, Some(t)) if t <= now => LeaseState::Expired,
                    (s, _) => s,
                },
                expires: e.expires,
            })
            .collect();
        rows.sort_by_key(|r| r.ip);
        rows
    }

    fn discover(&mut self, req: &Message, b: &Binding) -> Outcome {
        let entry = self.entry(b);
        // A bound client rebooting into INIT keeps its lease; only a client
        // without one moves to OFFERED.
        if entry.state != LeaseState::Bound {
            entry.state = LeaseState::Offered;
            entry.expires = None;
        }
        Outcome {
            reply: Some(self.answer(req, MessageType::Offer, b)),
            event: Some(LeaseEvent::Offered {
                mac: b.mac,
                ip: b.ip,
            }),
            ignored: None,
        }
    }

    fn request(&mut self, req: &Message, b: &Binding, now: SystemTime) -> Outcome {
        let kind = match (req.server_id(), req.requested_ip()) {
            (Some(server_id), _) => RequestKind::Selecting { server_id },
            (None, Some(requested)) => RequestKind::InitReboot { requested },
            (None, None) if !req.ciaddr.is_unspecified() => {
                RequestKind::Renewing { ciaddr: req.ciaddr }
            }
            (None, None) => return Outcome::ignore("REQUEST with no server id, address or ciaddr"),
        };
        let asked = match kind {
            // §4.3.2: a client that chose another server's offer declines ours.
            RequestKind::Selecting { server_id } if server_id != self.cfg.server_ip => {
                return Outcome::ignore("REQUEST for another server");
            }
            RequestKind::Selecting { .. } => req.requested_ip().unwrap_or(Ipv4Addr::UNSPECIFIED),
            RequestKind::InitReboot { requested } => requested,
            RequestKind::Renewing { ciaddr } => ciaddr,
        };
        if asked != b.ip {
            return Outcome {
                reply: Some(self.answer(req, MessageType::Nak, b)),
                event: Some(LeaseEvent::Nak {
                    mac: b.mac,
                    requested: asked,
                }),
                ignored: None,
            };
        }
        let expires = now + self.cfg.lease_time;
        let entry = self.entry(b);
        let renewal = entry.state == LeaseState::Bound && entry.expires.is_some_and(|t| t > now);
        entry.state = LeaseState::Bound;
        entry.expires = Some(expires);
        let (mac, ip) = (b.mac, b.ip);
        let event = if renewal {
            LeaseEvent::Renewed { mac, ip, expires }
        } else {
            LeaseEvent::Bound { mac, ip, expires }
        };
        Outcome {
            reply: Some(self.answer(req, MessageType::Ack, b)),
            event: Some(event),
            ignored: None,
        }
    }

    fn decline(&mut self, req: &Message, b: &Binding) -> Outcome {
        if req.server_id().is_some_and(|s| s != self.cfg.server_ip) {
            return Outcome::ignore("DECLINE for another server");
        }
        if req.requested_ip() != Some(b.ip) {
            return Outcome::ignore("DECLINE of an address not offered");
        }
        let entry = self.entry(b);
        entry.state = LeaseState::Declined;
        entry.expires = None;
        Outcome {
            event: Some(LeaseEvent::Declined {
                mac: b.mac,
                ip: b.ip,
            }),
            ..Outcome::default()
        }
    }

    fn release(&mut self, req: &Message, b: &Binding) -> Outcome {
        if req.server_id().is_some_and(|s| s != self.cfg.server_ip) {
            return Outcome::ignore("RELEASE for another server");
        }
        if req.ciaddr != b.ip {
            return Outcome::ignore("RELEASE of an address not leased");
        }
        let entry = self.entry(b);
        entry.state = LeaseState::Released;
        entry.expires = None;
        Outcome {
            event: Some(LeaseEvent::Released {
                mac: b.mac,
                ip: b.ip,
            }),
            ..Outcome::default()
        }
    }

    /// §3.4: a client configured by other means asks for parameters only.
    fn inform(&mut self, req: &Message, b: &Binding) -> Outcome {
        if req.ciaddr.is_unspecified() {
            return Outcome::ignore("INFORM without ciaddr");
        }
        Outcome {
            reply: Some(self.answer(req, MessageType::Ack, b)),
            ..Outcome::default()
        }
    }

    /// The table row for a binding, refreshed if the directory changed it.
    fn entry(&mut self, b: &Binding) -> &mut Entry {
        let e = self.table.entry(b.mac).or_insert_with(|| Entry {
            ip: b.ip,
            hostname: b.hostname.clone(),
            state: LeaseState::Offered,
            expires: None,
        });
        if e.ip != b.ip {
            e.state = LeaseState::Offered;
            e.expires = None;
        }
        e.ip = b.ip;
        e.hostname.clone_from(&b.hostname);
        e
    }

    /// Builds the reply message (RFC 2131 §4.3.1 Table 3) and its destination.
    fn answer(&self, req: &Message, kind: MessageType, b: &Binding) -> Reply {
        let inform = req.message_type() == Some(MessageType::Inform);
        let yiaddr = match kind {
            MessageType::Nak => Ipv4Addr::UNSPECIFIED,
            _ if inform => Ipv4Addr::UNSPECIFIED,
            _ => b.ip,
        };
        let ciaddr = match kind {
            MessageType::Ack => req.ciaddr,
            _ => Ipv4Addr::UNSPECIFIED,
        };
        let to = destination(req, kind, yiaddr);
        let mut flags = req.flags;
        if kind == MessageType::Nak && matches!(to, Destination::Relay(_)) {
            // §4.3.2: a NAK through a relay asks it to broadcast.
            flags |= FLAG_BROADCAST;
        }
        let mut message = Message {
            op: Op::Reply,
            htype: req.htype,
            hlen: req.hlen,
            hops: 0,
            xid: req.xid,
            secs: 0,
            flags,
            ciaddr,
            yiaddr,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: req.giaddr,
            chaddr: req.chaddr,
            options: vec![
                DhcpOption::MessageType(kind),
                DhcpOption::ServerId(self.cfg.server_ip),
            ],
        };
        if kind != MessageType::Nak {
            let budget = reply_budget(req).saturating_sub(message.encoded_len());
            let params = self.parameters(b, !inform);
            message
                .options
                .extend(fit(params, req.param_request(), budget));
        }
        Reply { message, to }
    }

    /// The configuration options, in the order sent when the client lists none.
    fn parameters(&self, b: &Binding, with_lease: bool) -> Vec<DhcpOption> {
        let cfg = &self.cfg;
        let mut out = Vec::new();
        if with_lease {
            let secs = u32::try_from(cfg.lease_time.as_secs()).unwrap_or(u32::MAX);
            out.push(DhcpOption::LeaseTime(secs));
            out.push(DhcpOption::RenewalTime(secs / 2));
            out.push(DhcpOption::RebindingTime((u64::from(secs) * 7 / 8) as u32));
        }
        out.push(DhcpOption::SubnetMask(prefix_mask(cfg.prefix)));
        out.push(DhcpOption::Router(vec![cfg.router]));
        if !cfg.dns.is_empty() {
            out.push(DhcpOption::Dns(cfg.dns.iter().copied().take(63).collect()));
        }
        if !b.hostname.is_empty() && b.hostname.len() <= 255 {
            out.push(DhcpOption::Hostname(b.hostname.clone()));
        }
        if !cfg.domain.is_empty() && cfg.domain.len() <= 255 {
            out.push(DhcpOption::DomainName(cfg.domain.clone()));
        }
        out
    }
}

/// RFC 2131 §4.1, checked in its order: relay, NAK broadcast, `ciaddr`, the
/// broadcast bit, else a frame to the client's hardware address.
pub fn destination(req: &Message, kind: MessageType, yiaddr: Ipv4Addr) -> Destination {
    if !req.giaddr.is_unspecified() {
        return Destination::Relay(req.giaddr);
    }
    // "In all cases, when 'giaddr' is zero, the server broadcasts any DHCPNAK."
    if kind == MessageType::Nak {
        return Destination::Broadcast;
    }
    if !req.ciaddr.is_unspecified() {
        return Destination::Unicast(req.ciaddr);
    }
    match req.mac() {
        Some(mac) if !req.broadcast() && !yiaddr.is_unspecified() => {
            Destination::Link { mac, ip: yiaddr }
        }
        _ => Destination::Broadcast,
    }
}

/// How many bytes the reply may take: the client's option 57 (at least 576,
/// RFC 2132 §9.10) less the IP and UDP headers, capped at [`MAX_MESSAGE`].
fn reply_budget(req: &Message) -> usize {
    let max = req
        .max_message_size()
        .unwrap_or(MIN_MAX_MESSAGE_SIZE)
        .max(MIN_MAX_MESSAGE_SIZE);
    (usize::from(max) - IP_UDP_HEADERS).min(MAX_MESSAGE)
}

/// Orders `opts` by the client's parameter request list (55), listed codes
/// first and in its order, and keeps those that fit in `budget` bytes.
fn fit(mut opts: Vec<DhcpOption>, order: Option<&[u8]>, budget: usize) -> Vec<DhcpOption> {
    let rank = |o: &DhcpOption| {
        let c = option_code(o);
        order
            .and_then(|l| l.iter().position(|&x| x == c))
            .unwrap_or(usize::MAX)
    };
    opts.sort_by_key(rank);
    let mut used = 0;
    opts.retain(|o| {
        let len = wire_len(o);
        let keep = used + len <= budget;
        used += if keep { len } else { 0 };
        keep
    });
    opts
}

/// `/16` → 255.255.0.0.
pub fn prefix_mask(prefix: u8) -> Ipv4Addr {
    let bits = u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0);
    Ipv4Addr::from(bits)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::dhcp::codec::{code, HTYPE_ETHERNET};

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 7];
    const IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 7);
    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
    const OTHER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 99);

    fn cfg() -> ServerConfig {
        ServerConfig {
            iface: "dhbr0".into(),
            server_ip: SERVER,
            prefix: 16,
            router: SERVER,
            dns: vec![SERVER],
            domain: "sandbox.internal".into(),
            lease_time: Duration::from_secs(3600),
        }
    }

    fn binding() -> Binding {
        Binding {
            mac: MAC,
            ip: IP,
            hostname: "sbx-1007".into(),
        }
    }

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_000_000)
    }

    fn msg(kind: MessageType, options: Vec<DhcpOption>) -> Message {
        let mut chaddr = [0u8; 16];
        chaddr[..6].copy_from_slice(&MAC);
        let mut all = vec![DhcpOption::MessageType(kind)];
        all.extend(options);
        Message {
            op: Op::Request,
            htype: HTYPE_ETHERNET,
            hlen: 6,
            hops: 0,
            xid: 42,
            secs: 0,
            flags: 0,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr,
            options: all,
        }
    }

    fn selecting(server: Ipv4Addr, requested: Ipv4Addr) -> Message {
        msg(
            MessageType::Request,
            vec![
                DhcpOption::ServerId(server),
                DhcpOption::RequestedIp(requested),
            ],
        )
    }

    fn renewing(ciaddr: Ipv4Addr) -> Message {
        let mut m = msg(MessageType::Request, vec![]);
        m.ciaddr = ciaddr;
        m
    }

    fn run(leases: &mut Leases, m: &Message) -> Outcome {
        leases.handle(m, Some(&binding()), now())
    }

    fn reply_type(o: &Outcome) -> Option<MessageType> {
        o.reply.as_ref().and_then(|r| r.message.message_type())
    }

    fn bound_leases() -> Leases {
        let mut leases = Leases::new(cfg());
        run(&mut leases, &selecting(SERVER, IP));
        leases
    }

    #[test]
    fn discover_gets_an_offer_of_the_bound_address() {
        let out = run(&mut Leases::new(cfg()), &msg(MessageType::Discover, vec![]));
        let reply = out.reply.unwrap();
        assert_eq!(reply.message.message_type(), Some(MessageType::Offer));
        assert_eq!(reply.message.yiaddr, IP);
        assert_eq!(reply.message.op, Op::Reply);
        assert_eq!(reply.message.xid, 42);
        assert_eq!(out.event, Some(LeaseEvent::Offered { mac: MAC, ip: IP }));
    }

    #[test]
    fn offer_for_unknown_mac_is_ignored() {
        let out = Leases::new(cfg()).handle(&msg(MessageType::Discover, vec![]), None, now());
        assert_eq!(out.reply, None);
        assert_eq!(out.ignored, Some("unknown MAC"));
    }

    #[test]
    fn binding_for_a_different_mac_is_not_used() {
        let other = Binding {
            mac: [2, 2, 2, 2, 2, 2],
            ..binding()
        };
        let out =
            Leases::new(cfg()).handle(&msg(MessageType::Discover, vec![]), Some(&other), now());
        assert_eq!(out.ignored, Some("unknown MAC"));
    }

    #[test]
    fn offer_and_ack_carry_every_configured_option() {
        let out = run(&mut Leases::new(cfg()), &selecting(SERVER, IP));
        let m = out.reply.unwrap().message;
        let want = vec![
            DhcpOption::MessageType(MessageType::Ack),
            DhcpOption::ServerId(SERVER),
            DhcpOption::LeaseTime(3600),
            DhcpOption::RenewalTime(1800),
            DhcpOption::RebindingTime(3150),
            DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 0, 0)),
            DhcpOption::Router(vec![SERVER]),
            DhcpOption::Dns(vec![SERVER]),
            DhcpOption::Hostname("sbx-1007".into()),
            DhcpOption::DomainName("sandbox.internal".into()),
        ];
        assert_eq!(m.options, want);
    }

    #[test]
    fn parameter_request_list_orders_the_options() {
        let mut req = msg(MessageType::Discover, vec![]);
        req.options.push(DhcpOption::ParamRequest(vec![15, 6, 1]));
        let m = run(&mut Leases::new(cfg()), &req).reply.unwrap().message;
        let codes: Vec<u8> = m.options.iter().map(option_code).collect();
        assert_eq!(codes, vec![53, 54, 15, 6, 1, 51, 58, 59, 3, 12]);
    }

    #[test]
    fn request_in_selecting_for_our_server_is_acked_and_bound() {
        let out = run(&mut Leases::new(cfg()), &selecting(SERVER, IP));
        assert_eq!(reply_type(&out), Some(MessageType::Ack));
        let expires = now() + Duration::from_secs(3600);
        let want = LeaseEvent::Bound {
            mac: MAC,
            ip: IP,
            expires,
        };
        assert_eq!(out.event, Some(want));
    }

    #[test]
    fn request_in_selecting_for_another_server_is_ignored() {
        let out = run(&mut Leases::new(cfg()), &selecting(OTHER, IP));
        assert_eq!(out.reply, None);
        assert_eq!(out.event, None);
        assert_eq!(out.ignored, Some("REQUEST for another server"));
    }

    #[test]
    fn request_in_selecting_for_a_wrong_address_is_naked() {
        let out = run(&mut Leases::new(cfg()), &selecting(SERVER, OTHER));
        assert_eq!(reply_type(&out), Some(MessageType::Nak));
        let want = LeaseEvent::Nak {
            mac: MAC,
            requested: OTHER,
        };
        assert_eq!(out.event, Some(want));
    }

    #[test]
    fn init_reboot_with_the_right_address_is_acked() {
        let req = msg(MessageType::Request, vec![DhcpOption::RequestedIp(IP)]);
        let out = run(&mut Leases::new(cfg()), &req);
        assert_eq!(reply_type(&out), Some(MessageType::Ack));
        assert_eq!(out.reply.unwrap().message.yiaddr, IP);
    }

    #[test]
    fn init_reboot_with_a_wrong_address_is_naked_by_broadcast() {
        let req = msg(MessageType::Request, vec![DhcpOption::RequestedIp(OTHER)]);
        let reply = run(&mut Leases::new(cfg()), &req).reply.unwrap();
        assert_eq!(reply.message.message_type(), Some(MessageType::Nak));
        assert_eq!(reply.message.yiaddr, Ipv4Addr::UNSPECIFIED);
        assert_eq!(reply.to, Destination::Broadcast);
        assert_eq!(reply.message.options.len(), 2);
    }

    #[test]
    fn renewing_a_bound_lease_is_acked_by_unicast_and_recorded_as_renewal() {
        let mut leases = bound_leases();
        let out = run(&mut leases, &renewing(IP));
        let reply = out.reply.unwrap();
        assert_eq!(reply.message.message_type(), Some(MessageType::Ack));
        assert_eq!(reply.message.ciaddr, IP);
        assert_eq!(reply.to, Destination::Unicast(IP));
        assert!(matches!(out.event, Some(LeaseEvent::Renewed { .. })));
    }

    #[test]
    fn renewing_from_a_wrong_address_is_naked() {
        let out = run(&mut bound_leases(), &renewing(OTHER));
        assert_eq!(reply_type(&out), Some(MessageType::Nak));
    }

    #[test]
    fn request_with_nothing_to_identify_the_state_is_ignored() {
        let out = run(&mut Leases::new(cfg()), &msg(MessageType::Request, vec![]));
        assert_eq!(out.reply, None);
        assert!(out.ignored.is_some());
    }

    #[test]
    fn release_is_recorded_without_reply() {
        let mut leases = bound_leases();
        let mut req = msg(MessageType::Release, vec![DhcpOption::ServerId(SERVER)]);
        req.ciaddr = IP;
        let out = run(&mut leases, &req);
        assert_eq!(out.reply, None);
        assert_eq!(out.event, Some(LeaseEvent::Released { mac: MAC, ip: IP }));
        assert_eq!(leases.snapshot(now())[0].state, LeaseState::Released);
    }

    #[test]
    fn release_of_another_address_is_ignored() {
        let mut req = msg(MessageType::Release, vec![DhcpOption::ServerId(SERVER)]);
        req.ciaddr = OTHER;
        let out = run(&mut bound_leases(), &req);
        assert_eq!(out.event, None);
    }

    #[test]
    fn decline_marks_the_address_declined() {
        let mut leases = Leases::new(cfg());
        let req = msg(
            MessageType::Decline,
            vec![DhcpOption::ServerId(SERVER), DhcpOption::RequestedIp(IP)],
        );
        let out = run(&mut leases, &req);
        assert_eq!(out.reply, None);
        assert_eq!(out.event, Some(LeaseEvent::Declined { mac: MAC, ip: IP }));
        assert_eq!(leases.snapshot(now())[0].state, LeaseState::Declined);
    }

    #[test]
    fn decline_for_another_server_is_ignored() {
        let req = msg(
            MessageType::Decline,
            vec![DhcpOption::ServerId(OTHER), DhcpOption::RequestedIp(IP)],
        );
        let out = run(&mut Leases::new(cfg()), &req);
        assert_eq!(out.event, None);
    }

    #[test]
    fn inform_is_acked_to_ciaddr_without_lease_time_or_address() {
        let mut req = msg(MessageType::Inform, vec![]);
        req.ciaddr = IP;
        let out = run(&mut Leases::new(cfg()), &req);
        let reply = out.reply.unwrap();
        assert_eq!(reply.message.message_type(), Some(MessageType::Ack));
        assert_eq!(reply.message.yiaddr, Ipv4Addr::UNSPECIFIED);
        assert_eq!(reply.message.option(code::LEASE_TIME), None);
        assert_eq!(reply.message.option(code::RENEWAL_TIME), None);
        assert_eq!(reply.to, Destination::Unicast(IP));
        assert_eq!(out.event, None);
    }

    #[test]
    fn server_messages_from_a_client_are_ignored() {
        let out = run(&mut Leases::new(cfg()), &msg(MessageType::Offer, vec![]));
        assert_eq!(out.reply, None);
    }

    #[test]
    fn bootreply_is_ignored() {
        let mut req = msg(MessageType::Discover, vec![]);
        req.op = Op::Reply;
        let out = run(&mut Leases::new(cfg()), &req);
        assert_eq!(out.ignored, Some("not a BOOTREQUEST"));
    }

    #[test]
    fn reply_without_broadcast_bit_goes_to_the_client_mac() {
        let to = run(&mut Leases::new(cfg()), &msg(MessageType::Discover, vec![]))
            .reply
            .unwrap()
            .to;
        assert_eq!(to, Destination::Link { mac: MAC, ip: IP });
    }

    #[test]
    fn reply_with_broadcast_bit_is_broadcast() {
        let mut req = msg(MessageType::Discover, vec![]);
        req.flags = FLAG_BROADCAST;
        let reply = run(&mut Leases::new(cfg()), &req).reply.unwrap();
        assert_eq!(reply.to, Destination::Broadcast);
        assert_eq!(reply.message.flags, FLAG_BROADCAST);
    }

    #[test]
    fn reply_through_a_relay_goes_to_giaddr() {
        let relay = Ipv4Addr::new(192, 0, 2, 1);
        let mut req = msg(MessageType::Discover, vec![]);
        req.giaddr = relay;
        let reply = run(&mut Leases::new(cfg()), &req).reply.unwrap();
        assert_eq!(reply.to, Destination::Relay(relay));
        assert_eq!(reply.message.giaddr, relay);
    }

    #[test]
    fn nak_through_a_relay_sets_the_broadcast_bit() {
        let relay = Ipv4Addr::new(192, 0, 2, 1);
        let mut req = selecting(SERVER, OTHER);
        req.giaddr = relay;
        let reply = run(&mut Leases::new(cfg()), &req).reply.unwrap();
        assert_eq!(reply.to, Destination::Relay(relay));
        assert_eq!(reply.message.flags, FLAG_BROADCAST);
    }

    #[test]
    fn nak_to_a_renewing_client_is_still_broadcast() {
        let reply = run(&mut bound_leases(), &renewing(OTHER)).reply.unwrap();
        assert_eq!(reply.to, Destination::Broadcast);
    }

    #[test]
    fn small_max_message_size_drops_options_that_do_not_fit() {
        let mut config = cfg();
        config.domain = "d".repeat(255);
        config.dns = vec![SERVER; 63];
        let mut req = msg(MessageType::Discover, vec![DhcpOption::MaxMessageSize(576)]);
        req.options.push(DhcpOption::ParamRequest(vec![6, 1]));
        let m = Leases::new(config)
            .handle(&req, Some(&binding()), now())
            .reply
            .unwrap()
            .message;
        assert!(m.encoded_len() <= 576 - 28, "{}", m.encoded_len());
        assert_eq!(m.option(code::DOMAIN_NAME), None);
        assert!(m.option(code::DNS).is_some());
    }

    #[test]
    fn max_message_size_below_576_counts_as_576() {
        let mut config = cfg();
        config.domain = "d".repeat(250);
        let req = msg(MessageType::Discover, vec![DhcpOption::MaxMessageSize(100)]);
        let m = Leases::new(config)
            .handle(&req, Some(&binding()), now())
            .reply
            .unwrap()
            .message;
        assert!(m.option(code::DOMAIN_NAME).is_some());
    }

    #[test]
    fn lease_past_its_time_shows_as_expired() {
        let leases = bound_leases();
        let later = now() + Duration::from_secs(3601);
        assert_eq!(leases.snapshot(later)[0].state, LeaseState::Expired);
    }

    #[test]
    fn request_after_expiry_is_a_new_binding() {
        let mut leases = bound_leases();
        let later = now() + Duration::from_secs(3601);
        let out = leases.handle(&selecting(SERVER, IP), Some(&binding()), later);
        assert!(matches!(out.event, Some(LeaseEvent::Bound { .. })));
    }

    #[test]
    fn discover_from_a_bound_client_keeps_the_lease_bound() {
        let mut leases = bound_leases();
        run(&mut leases, &msg(MessageType::Discover, vec![]));
        assert_eq!(leases.snapshot(now())[0].state, LeaseState::Bound);
    }

    #[test]
    fn binding_moved_by_the_directory_naks_the_old_address() {
        let mut leases = bound_leases();
        let moved = Binding {
            ip: OTHER,
            ..binding()
        };
        let out = leases.handle(&renewing(IP), Some(&moved), now());
        assert_eq!(reply_type(&out), Some(MessageType::Nak));
    }

    #[test]
    fn prefix_mask_covers_the_edges() {
        assert_eq!(prefix_mask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(prefix_mask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(prefix_mask(32), Ipv4Addr::BROADCAST);
    }
}
