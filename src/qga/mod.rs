//! The guest-agent protocol: the wire format both halves share (`wire`,
//! `b64`) and the host side: the channel (`client`), what is done over it
//! (`session`, with `fallback` for a stock qemu-ga), and frame reading for
//! the daemon↔CLI sessions (`frames`). The guest side is `crate::guest`.

pub mod b64;
pub mod client;
pub(crate) mod fallback;
pub mod frames;
pub mod session;
pub mod wire;
