//! The sandbox network the daemon builds and polices itself (DESIGN.md §6):
//! the bridge and TAP devices (`link`), the DNS forwarder with per-sandbox
//! policy (`dns`), and the nftables ruleset (`nft`).

pub mod dns;
pub mod link;
pub mod nft;
