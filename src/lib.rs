//! agentlab: disposable, isolated QEMU sandboxes for AI coding agents.
//!
//! One static binary plays three roles (see `DESIGN.md` §1): the CLI, the
//! daemon that owns every sandbox, and the agent inside each guest. The map:
//!
//! - `cli`      argument parsing and output for each command group
//! - `api`      HTTP/1.1 + JSON over the daemon's Unix socket (codec, server, client)
//! - `daemon`   the event loop, the sandbox lifecycle manager, leases, the reconciler
//! - `model`    sandboxes, events and the state machine (pure)
//! - `store`    sled trees and keys
//! - `config`   `config.yaml` and profiles (parse, validate, resolve)
//! - `backend`  `trait Backend`, the local QEMU backend and the Proxmox VE backend
//! - `proxmox_api` a blocking client for the Proxmox VE REST API (TLS, tasks, errors)
//! - `qmp`      QEMU Machine Protocol client
//! - `net`      bridge, TAPs, DNS and nftables for the sandbox network
//! - `dhcp`     the DHCPv4 server on the sandbox bridge
//! - `framing`  newline-delimited JSON framing shared by QMP and the guest agent
//! - `qcow`     qcow2 overlay writer and header validator
//! - `image`    base images and the default guest (kernel + busybox initramfs + ext4)
//! - `guest`    what the binary does inside the default guest
//! - `qga`      the guest-agent protocol: wire format, host client, sessions
//! - `tar`      tar streams for `cp`: writer, packer, safe extractor
//! - `sys`      the only place with `unsafe`: ioctls, pidfds, process inspection
//! - `time`     RFC 3339 timestamps and `30m`-style durations
//! - `log`      a small leveled logger for the daemon

// `unsafe` lives in `sys` alone (STYLE.md); the compiler holds everyone to it.
#![deny(unsafe_code)]

pub mod api;
pub mod backend;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dhcp;
pub mod framing;
pub mod guest;
pub mod image;
pub mod log;
pub mod model;
pub mod net;
pub mod proxmox_api;
pub mod qcow;
pub mod qga;
pub mod qmp;
pub mod store;
#[allow(unsafe_code)]
pub mod sys;
pub mod tar;
#[cfg(test)]
mod testutil;
pub mod time;
