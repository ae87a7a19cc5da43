//! The `/v1` API: wire types, HTTP codec, server loop and client.
pub mod types;
