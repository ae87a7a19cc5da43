//! rtnetlink replies and the nft JSON listing: any bytes give messages,
//! attributes, links, addresses, routes or nothing, never a panic.
#![no_main]

use agentlab::net::{nft, rtnl};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(replies) = rtnl::replies(data) {
        for r in replies {
            if let rtnl::Reply::Message { body, .. } = r {
                let _ = rtnl::parse_link(body);
                let _ = rtnl::parse_addr(body);
                let _ = rtnl::parse_route(body);
            }
        }
    }
    let _ = rtnl::attrs(data);
    let text = String::from_utf8_lossy(data);
    let _ = nft::counters(&text);
    let _ = nft::sandboxes_in_table(&text);
    let _ = nft::render_remove_sandbox(7, &text);
});
