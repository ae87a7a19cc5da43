//! `trait Backend`: what sandbox orchestration needs from a hypervisor.
//!
//! The lifecycle manager (`daemon::manager`) owns states, leases and events;
//! a backend owns machines: it makes a sandbox's disk, runs and stops its VM,
//! reverts the disk, destroys everything it made, finds VMs again after a
//! daemon restart, and lists what it made that nobody owns any more. The local
//! backend is `qemu`; the Proxmox VE backend implements the same trait.
//!
//! Backends report what happens to a VM on their own (the guest became ready,
//! it powered off, QEMU died) through the [`EventSink`] they were built with.

pub mod agent_api;
pub mod proxmox;
pub mod qemu;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Profile;
use crate::model::{Disk, Runtime, Sandbox};

/// Something that happened to a running VM, reported by its backend.
#[derive(Clone, Debug, PartialEq)]
pub enum VmEvent {
    /// The guest reported in (its ready line, or its agent answered).
    /// `pid` names the VM process, so a late report from a VM that has since
    /// been replaced is recognised as stale.
    Ready { pid: u32 },
    /// One line of the guest's console, as it was written.
    Console(String),
    /// The hypervisor process is gone.
    Exited(ExitInfo),
    /// The guest agent answered; what the guest says about itself.
    Agent {
        pid: u32,
        facts: crate::qga::session::GuestFacts,
    },
}

#[derive(Clone, Debug, PartialEq, Default, Serialize)]
pub struct ExitInfo {
    /// The process that exited (a sandbox may have a newer one by now).
    pub pid: u32,
    /// Exit status when the process was our child.
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// QEMU's `SHUTDOWN` reason (`guest-shutdown`, `host-qmp-quit`, …).
    pub reason: Option<String>,
    /// The guest kernel panicked.
    pub panicked: bool,
    /// The end of QEMU's stderr for this run.
    pub stderr_tail: String,
}

impl ExitInfo {
    /// The guest powered itself off cleanly (`poweroff`, ACPI button).
    pub fn clean_guest_shutdown(&self) -> bool {
        !self.panicked
            && self.reason.as_deref() == Some("guest-shutdown")
            && self.code.unwrap_or(0) == 0
    }

    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.panicked {
            parts.push("the guest kernel panicked".to_string());
        }
        if let Some(r) = &self.reason {
            parts.push(format!("shutdown reason {r}"));
        }
        match (self.code, self.signal) {
            (Some(c), _) => parts.push(format!("exit status {c}")),
            (None, Some(s)) => parts.push(format!("killed by signal {s}")),
            _ => {}
        }
        if parts.is_empty() {
            parts.push("exited".into());
        }
        let mut s = parts.join(", ");
        let tail = self.stderr_tail.trim();
        if !tail.is_empty() {
            s.push_str("; qemu said: ");
            s.push_str(tail);
        }
        s
    }
}

pub type EventSink = Arc<dyn Fn(u32, VmEvent) + Send + Sync>;

/// A network card for a sandbox's VM: a TAP the daemon's network opened and
/// attached to its bridge. The VM inherits the descriptor; the TAP goes away
/// when the last holder closes it.
pub struct Nic {
    pub tap: std::os::fd::OwnedFd,
    pub mac: String,
    pub model: crate::config::NicModel,
}

/// Where a local backend gets NICs from (the daemon's network).
pub trait NicSource: Send + Sync {
    /// The NIC for this boot of `sb`, or `None` when it has no network.
    fn nic_for(&self, sb: &Sandbox) -> Result<Option<Nic>, BackendError>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// ACPI power button, then a hard stop after `grace`.
    Graceful { grace: Duration },
    /// Stop the VM now (the guest gets no chance to sync).
    Hard,
}

/// What provisioning made.
#[derive(Clone, Debug, PartialEq)]
pub struct Provisioned {
    pub disk: Option<Disk>,
    /// How readiness is decided (`console:<marker>`, `running`, `agent`).
    pub ready_on: String,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Adoption {
    /// The VM still runs and is monitored again.
    Running(Runtime),
    /// The VM is gone.
    Gone,
}

/// Something a backend made that no live sandbox owns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Orphan {
    /// `process` or `path`.
    pub kind: String,
    pub vmid: Option<u32>,
    pub pid: Option<u32>,
    pub path: Option<String>,
    pub why: String,
}

/// A command run to its end by [`Backend::exec_simple`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExecResult {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: crate::qga::session::ExitStatus,
}

impl ExecResult {
    /// As a stream of outputs would have delivered it, the exit last.
    pub fn into_outputs(self) -> Vec<crate::qga::session::Output> {
        use crate::qga::session::Output;
        let mut out = Vec::new();
        if !self.stdout.is_empty() {
            out.push(Output::Stdout(self.stdout));
        }
        if !self.stderr.is_empty() {
            out.push(Output::Stderr(self.stderr));
        }
        out.push(Output::Exit(self.status));
        out
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub kind: String,
    /// `kvm` or `tcg`, and why.
    pub accel: String,
    pub accel_reason: String,
    pub hypervisor_version: String,
    /// Backend-specific findings for `agentlab status` (the Proxmox backend:
    /// cluster reachable, node, token privileges, templates).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The request cannot work as asked; the user must change something.
    #[error("{0}")]
    User(String),
    /// The host could not do it.
    #[error("{msg}")]
    Host {
        msg: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl BackendError {
    pub fn user(msg: impl Into<String>) -> BackendError {
        BackendError::User(msg.into())
    }

    pub fn host(msg: impl Into<String>) -> BackendError {
        BackendError::Host {
            msg: msg.into(),
            source: None,
        }
    }

    pub fn host_with(
        msg: impl Into<String>,
        e: impl std::error::Error + Send + Sync + 'static,
    ) -> BackendError {
        BackendError::Host {
            msg: msg.into(),
            source: Some(Box::new(e)),
        }
    }

    pub fn is_user_error(&self) -> bool {
        matches!(self, BackendError::User(_))
    }
}

pub trait Backend: Send + Sync {
    fn kind(&self) -> &'static str;

    fn status(&self) -> BackendStatus;

    /// Makes the sandbox's disk (and whatever else it needs before boot).
    fn provision(
        &self,
        sb: &Sandbox,
        profile: &Profile,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Provisioned, BackendError>;

    /// Checks, before anything is recorded, that `profile` can be provisioned
    /// here (its image exists and is sound). Cheap; no side effects.
    fn check_profile(&self, _profile: &Profile) -> Result<(), BackendError> {
        Ok(())
    }

    /// Starts the VM; returns once the process runs and is monitored.
    fn start(&self, sb: &Sandbox) -> Result<Runtime, BackendError>;

    /// Stops the VM; returns once it is gone. A VM that is not running is not an error.
    fn stop(&self, sb: &Sandbox, mode: StopMode) -> Result<(), BackendError>;

    /// Puts the disk back to its state at provisioning. The VM must be stopped.
    fn revert(&self, sb: &Sandbox) -> Result<(), BackendError>;

    /// Stops the VM if needed and removes everything the sandbox made. Idempotent.
    fn destroy(&self, sb: &Sandbox) -> Result<(), BackendError>;

    /// After a daemon restart: is this sandbox's VM still running? If so, monitor it again.
    fn adopt(&self, sb: &Sandbox) -> Result<Adoption, BackendError>;

    /// What this backend made that none of `live` owns.
    fn orphans(&self, live: &[Sandbox]) -> Vec<Orphan>;

    fn remove_orphan(&self, orphan: &Orphan) -> Result<(), BackendError>;

    /// The last `n` lines of the guest's console, oldest first, for `agentlab logs`.
    fn console_tail(&self, _vmid: u32, _n: usize) -> Vec<(crate::time::Timestamp, String)> {
        Vec::new()
    }

    /// The guest agent of a running sandbox, once it has answered.
    fn guest(
        &self,
        vmid: u32,
    ) -> Result<std::sync::Arc<crate::qga::session::Session>, BackendError> {
        Err(BackendError::user(format!(
            "sandbox {vmid}: the {} backend has no guest agent channel",
            self.kind()
        )))
    }

    /// Whether exec and cp go through [`Backend::exec_simple`],
    /// [`Backend::file_read`] and [`Backend::file_write`] (a hypervisor's
    /// own guest-agent API, e.g. Proxmox's) rather than [`Backend::guest`].
    fn guest_api(&self) -> bool {
        false
    }

    /// Runs a command in the guest to its end: output arrives at the end,
    /// stdin only up front. For backends whose [`Backend::guest_api`] is true.
    fn exec_simple(
        &self,
        vmid: u32,
        _spec: &crate::qga::session::ExecSpec,
        _stdin: Option<Vec<u8>>,
    ) -> Result<ExecResult, BackendError> {
        Err(BackendError::user(format!(
            "sandbox {vmid}: the {} backend cannot run commands through a hypervisor agent API",
            self.kind()
        )))
    }

    /// A whole file from the guest.
    fn file_read(&self, vmid: u32, _path: &str) -> Result<Vec<u8>, BackendError> {
        Err(BackendError::user(format!(
            "sandbox {vmid}: the {} backend cannot read guest files through a hypervisor agent API",
            self.kind()
        )))
    }

    /// Writes a whole file in the guest (created or truncated).
    fn file_write(&self, vmid: u32, _path: &str, _data: &[u8]) -> Result<(), BackendError> {
        Err(BackendError::user(format!(
            "sandbox {vmid}: the {} backend cannot write guest files through a hypervisor agent API",
            self.kind()
        )))
    }

    /// The serial console's raw output from now on, until the VM exits.
    fn console_attach(
        &self,
        vmid: u32,
    ) -> Result<std::sync::mpsc::Receiver<Vec<u8>>, BackendError> {
        Err(BackendError::user(format!(
            "sandbox {vmid}: the {} backend has no serial console",
            self.kind()
        )))
    }

    /// Types bytes into a running sandbox's serial console.
    fn console_write(&self, vmid: u32, _data: &[u8]) -> Result<(), BackendError> {
        Err(BackendError::user(format!(
            "sandbox {vmid}: the {} backend has no serial console input",
            self.kind()
        )))
    }

    /// Images this backend can boot (name, path, problems).
    fn images(&self) -> Vec<crate::image::store::ImageSummary> {
        Vec::new()
    }

    /// Builds the default guest image, or its variant running `agent`;
    /// `force` rebuilds it.
    fn build_default_image(
        &self,
        _agent: crate::image::default_guest::GuestAgent,
        _force: bool,
        _progress: &mut dyn FnMut(&str),
    ) -> Result<(), BackendError> {
        Err(BackendError::user(format!(
            "the {} backend has no local images",
            self.kind()
        )))
    }
}
