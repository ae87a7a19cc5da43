//! The guest-agent protocol: the wire format both halves share (`wire`,
//! `b64`) and the host side (`client`). The guest side is `crate::guest`.

pub mod b64;
pub mod client;
pub mod frames;
pub mod session;
pub mod wire;
