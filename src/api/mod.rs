//! The daemon's HTTP/1.1 + JSON API over its Unix socket.
//!
//! Owns the wire between the CLI (and `curl --unix-socket`) and the daemon: `http`
//! is the pure codec for both sides. The routes, the server's connection handling
//! in the daemon's mio loop, and the CLI's blocking client build on it. Sandbox
//! semantics live in `model` and `daemon`, not here.

pub mod http;
