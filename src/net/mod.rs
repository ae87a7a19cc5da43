//! The sandbox network the daemon builds and polices itself (DESIGN.md §6):
//! the bridge and TAP devices (`link`), the DNS forwarder with per-sandbox
//! policy (`dns`), the nftables ruleset (`nft`), the rtnetlink messages
//! `link` sends (`rtnl`) and the host readiness report (`check`).

pub mod check;
pub mod dns;
pub mod link;
pub mod nft;
pub mod rtnl;
