//! The `/v1` API between the CLI and the daemon: HTTP/1.1 with JSON bodies
//! on a Unix socket (`/run/agentlab/agentlabd.sock`).
//!
//! - `http`: the pure codec (requests, responses, chunked streams), fuzzed
//! - `types`: request and response bodies shared by both sides
//! - `routes`: which request calls which manager operation
//! - `server`: the daemon's mio loop
//! - `streaming`: exec, file trees and the console, on connections of their own
//! - `client`: the blocking client the CLI uses

pub mod client;
pub mod http;
pub mod routes;
pub mod server;
pub mod streaming;
pub mod types;
