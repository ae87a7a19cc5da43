//! DNS messages from guests and upstreams: any bytes give a message or an
//! error, never a panic; a parsed query always yields a reply that parses.
#![no_main]

use agentlab::net::dns::codec::{build_reply, truncate_reply, Message, Rcode};
use agentlab::net::dns::policy::addresses_for;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Message::parse(data) else {
        return;
    };
    let _ = m.udp_payload_size();
    if let Some(q) = m.questions.first() {
        let _ = addresses_for(&m, &q.name.to_ascii_lowercase());
    }
    let reply = build_reply(data, &m, Rcode::NxDomain, &[]);
    let back = Message::parse(&reply).expect("our own reply parses");
    assert_eq!(back.questions, m.questions);
    let _ = truncate_reply(&reply, back.question_end);
    let mut out = Vec::new();
    let _ = m.encode(&mut out);
});
