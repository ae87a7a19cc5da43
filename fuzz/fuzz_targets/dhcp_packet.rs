//! What a guest sends the DHCP server: any datagram decodes or is refused,
//! never panics; whatever decodes re-encodes to a message that decodes to the
//! same options, and the lease logic answers it without panicking, with a
//! reply that fits the client's size limit.
#![no_main]

use std::net::Ipv4Addr;
use std::time::{Duration, UNIX_EPOCH};

use agentlab::dhcp::codec::Message;
use agentlab::dhcp::lease::Leases;
use agentlab::dhcp::{Binding, ServerConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Message::decode(data) else {
        return;
    };
    let mut again = Vec::new();
    m.encode(&mut again);
    let back = Message::decode(&again).expect("re-encoded message decodes");
    assert_eq!(back.options, m.options);

    let cfg = ServerConfig {
        iface: "fuzz0".into(),
        server_ip: Ipv4Addr::new(10, 77, 0, 1),
        prefix: 16,
        router: Ipv4Addr::new(10, 77, 0, 1),
        dns: vec![Ipv4Addr::new(10, 77, 0, 1)],
        domain: "sandbox.internal".into(),
        lease_time: Duration::from_secs(3600),
    };
    // The binding matches whatever MAC the input names, so every path runs.
    let binding = m.mac().map(|mac| Binding {
        mac,
        ip: Ipv4Addr::new(10, 77, 0, 9),
        hostname: "sbx-1009".into(),
    });
    let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
    let out = Leases::new(cfg).handle(&m, binding.as_ref(), now);
    if let Some(reply) = out.reply {
        assert!(reply.message.encoded_len() <= 1500);
        let mut bytes = Vec::new();
        reply.message.encode(&mut bytes);
        Message::decode(&bytes).expect("reply decodes");
    }
});
