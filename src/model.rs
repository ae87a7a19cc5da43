//! Sandboxes, events and the sandbox state machine. Pure: no I/O.
//!
//! The states and their order follow AgentLab's model
//! (`REQUESTED → PROVISIONING → BOOTING → READY → RUNNING → COMPLETED|FAILED|TIMEOUT
//! → STOPPED → DESTROYED`). Every state change in the daemon goes through
//! [`State::can_become`], and every user command is checked by [`check_action`],
//! whose error names the state and the way out
//! (`sandbox 1012 is STOPPED; start it first, or use --force`).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;

/// VMIDs start where Proxmox starts numbering guests.
pub const FIRST_VMID: u32 = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum State {
    /// Recorded, nothing made yet.
    Requested,
    /// Disk, seed and network being prepared.
    Provisioning,
    /// The hypervisor runs; the guest has not reported in yet.
    Booting,
    /// The guest is up and idle.
    Ready,
    /// A job or exec is active.
    Running,
    /// The job finished; the VM may still run.
    Completed,
    /// Something went wrong; no VM process runs (see `last_error`).
    Failed,
    /// The lease expired; the sandbox is being torn down.
    Timeout,
    /// Powered off; the disk is kept.
    Stopped,
    /// Gone: VM, disk and files removed. Terminal.
    Destroyed,
}

impl State {
    pub const ALL: [State; 10] = [
        State::Requested,
        State::Provisioning,
        State::Booting,
        State::Ready,
        State::Running,
        State::Completed,
        State::Failed,
        State::Timeout,
        State::Stopped,
        State::Destroyed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Requested => "REQUESTED",
            State::Provisioning => "PROVISIONING",
            State::Booting => "BOOTING",
            State::Ready => "READY",
            State::Running => "RUNNING",
            State::Completed => "COMPLETED",
            State::Failed => "FAILED",
            State::Timeout => "TIMEOUT",
            State::Stopped => "STOPPED",
            State::Destroyed => "DESTROYED",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        State::ALL
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s))
    }

    /// True while a hypervisor process is expected to exist for the sandbox.
    pub fn vm_expected(self) -> bool {
        matches!(
            self,
            State::Booting | State::Ready | State::Running | State::Completed
        )
    }

    /// True for states a lease can still expire in.
    pub fn is_live(self) -> bool {
        !matches!(self, State::Timeout | State::Destroyed)
    }

    /// The transition table. Anything not listed is refused.
    pub fn can_become(self, to: State) -> bool {
        use State::*;
        if to == Destroyed {
            return self != Destroyed;
        }
        match self {
            Requested => matches!(to, Provisioning | Failed | Timeout),
            Provisioning => matches!(to, Booting | Stopped | Failed | Timeout),
            Booting => matches!(to, Ready | Stopped | Failed | Timeout),
            Ready => matches!(to, Running | Stopped | Failed | Timeout),
            Running => matches!(to, Ready | Completed | Stopped | Failed | Timeout),
            Completed => matches!(to, Running | Stopped | Failed | Timeout),
            Failed => matches!(to, Provisioning | Booting | Stopped | Timeout),
            Stopped => matches!(to, Provisioning | Booting | Failed | Timeout),
            Timeout => false,
            Destroyed => false,
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a user asks of a sandbox; checked against its state before anything runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Start,
    Stop,
    Destroy,
    Revert,
    RenewLease,
    Exec,
}

impl Action {
    pub fn verb(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Stop => "stop",
            Action::Destroy => "destroy",
            Action::Revert => "revert",
            Action::RenewLease => "renew the lease of",
            Action::Exec => "run commands in",
        }
    }
}

/// A refused action: the message names the state and what to do instead.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("sandbox {vmid} is {state}; {hint}")]
pub struct StateError {
    pub vmid: u32,
    pub state: State,
    pub action: Action,
    pub hint: String,
}

/// Decides whether `action` may run on a sandbox in `state`.
/// `force` lifts the guards that protect work in progress, not the impossible.
pub fn check_action(
    vmid: u32,
    state: State,
    action: Action,
    force: bool,
) -> Result<(), StateError> {
    use State::*;
    let refuse = |hint: &str| {
        Err(StateError {
            vmid,
            state,
            action,
            hint: hint.to_string(),
        })
    };
    match (action, state) {
        (_, Destroyed) => {
            refuse("it no longer exists; create a new one with `agentlab sandbox new`")
        }
        (Action::Destroy, Running) if !force => {
            refuse("a job or exec is active; wait for it, or use --force")
        }
        (Action::Destroy, Provisioning | Requested) if !force => {
            refuse("it is still being provisioned; wait a moment, or use --force")
        }
        (Action::Destroy, _) => Ok(()),
        (_, Timeout) => refuse("its lease expired and it is being removed; create a new one"),
        (Action::Start, Stopped | Failed) => Ok(()),
        (Action::Start, Booting | Ready | Running | Completed) => {
            refuse("it is already running; stop it first to restart it")
        }
        (Action::Start, _) => refuse("it is still being provisioned; wait for it to boot"),
        (Action::Stop, Booting | Ready | Completed) => Ok(()),
        (Action::Stop, Running) if force => Ok(()),
        (Action::Stop, Running) => refuse("a job or exec is active; wait for it, or use --force"),
        (Action::Stop, Stopped) => {
            refuse("it is already stopped; start it with `agentlab sandbox start`")
        }
        (Action::Stop, Failed) => refuse("it is not running; start it, or destroy it"),
        (Action::Stop, _) => {
            refuse("it is still being provisioned; wait for it to boot, or destroy it")
        }
        (Action::Revert, Ready | Completed | Stopped | Failed) => Ok(()),
        (Action::Revert, Running | Booting) if force => Ok(()),
        (Action::Revert, Running) => refuse("a job or exec is active; wait for it, or use --force"),
        (Action::Revert, Booting) => refuse("it is still booting; wait for READY, or use --force"),
        (Action::Revert, _) => refuse("it is still being provisioned; wait for it to boot"),
        (Action::RenewLease, _) => Ok(()),
        (Action::Exec, Ready | Running | Completed) => Ok(()),
        (Action::Exec, Stopped | Failed) => refuse("start it first, or use --force"),
        (Action::Exec, _) => {
            refuse("it is not ready yet; wait for READY (`agentlab sandbox new --wait`)")
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub cores: u32,
    pub memory_mb: u32,
}

/// The sandbox's disk as the local backend made it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// Image name from the profile (`default`, `ubuntu-24.04`).
    pub image: String,
    /// The read-only base the overlay sits on.
    pub base_path: String,
    /// `qcow2` or `raw`.
    pub base_format: String,
    pub overlay_path: String,
    pub virtual_size: u64,
}

/// What the guest's agent says about the guest, for `sandbox show`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestFacts {
    /// The agent's version string (`agentlab 0.1.0`, `qemu-ga 7.2.x`…).
    pub agent: String,
    pub os: String,
    pub kernel: String,
    pub hostname: String,
    /// `10.77.0.5/16 (eth0)`, loopback left out.
    pub addresses: Vec<String>,
}

/// The live hypervisor process, as far as the daemon knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Runtime {
    pub pid: u32,
    /// `/proc/<pid>/stat` field 22, to tell a reused pid from ours.
    pub pid_start_ticks: u64,
    /// `kvm` or `tcg`.
    pub accel: String,
    pub run_dir: String,
    pub started_at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sandbox {
    pub vmid: u32,
    pub name: String,
    pub profile: String,
    pub state: State,
    /// `qemu` or `proxmox`.
    pub backend: String,
    pub keepalive: bool,
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
    #[serde(default)]
    pub lease_expires_at: Option<Timestamp>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub resources: Resources,
    /// How readiness is decided for this sandbox's image (`console:<marker>`, `running`).
    pub ready_on: String,
    #[serde(default)]
    pub disk: Option<Disk>,
    #[serde(default)]
    pub runtime: Option<Runtime>,
    pub mac: String,
    #[serde(default)]
    pub ip: Option<String>,
    #[serde(default)]
    pub last_error: Option<String>,
    /// Set once the guest agent has answered.
    #[serde(default)]
    pub guest: Option<GuestFacts>,
    /// The resolved profile at creation, so later edits to the file do not
    /// change a sandbox that already exists.
    #[serde(default)]
    pub spec: serde_json::Value,
}

impl Sandbox {
    /// A lease has expired when it exists, is not kept alive, and lies in the past.
    pub fn lease_expired(&self, now: Timestamp) -> bool {
        !self.keepalive && self.state.is_live() && self.lease_expires_at.is_some_and(|at| at <= now)
    }
}

/// A sandbox port reachable from the host (`agentlab sandbox expose`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exposure {
    /// `sbx-<vmid>-<port>` unless the user named it.
    pub name: String,
    pub vmid: u32,
    pub guest_port: u16,
    pub host_port: u16,
    /// The host address it listens on; `0.0.0.0` for every address.
    pub bind: std::net::Ipv4Addr,
    pub created_at: Timestamp,
}

/// A MAC in QEMU's locally administered range, stable per VMID.
pub fn mac_for(vmid: u32) -> String {
    // FNV-1a of the VMID spreads neighbours apart while staying reproducible.
    let mut h: u32 = 0x811c_9dc5;
    for b in vmid.to_be_bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let [_, a, b, c] = h.to_be_bytes();
    format!("52:54:00:{a:02x}:{b:02x}:{c:02x}")
}

/// Names are how users refer to sandboxes besides the VMID.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok_len = (1..=63).contains(&name.len());
    let ok_chars = name
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.');
    let starts_ok = name.bytes().next().is_some_and(|c| c.is_ascii_alphabetic());
    if ok_len && ok_chars && starts_ok {
        Ok(())
    } else {
        Err(format!(
            "invalid sandbox name {name:?}: use 1-63 letters, digits, '-', '_' or '.', starting with a letter"
        ))
    }
}

/// One entry of the append-only event log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub id: u64,
    pub ts: Timestamp,
    #[serde(default)]
    pub vmid: Option<u32>,
    /// Dotted kind: `sandbox.state`, `sandbox.lease`, `sandbox.error`, `daemon.start`…
    pub kind: String,
    #[serde(default)]
    pub from: Option<State>,
    #[serde(default)]
    pub to: Option<State>,
    pub msg: String,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
}

/// An event before the store has given it an id and a time.
#[derive(Clone, Debug, PartialEq)]
pub struct EventDraft {
    pub vmid: Option<u32>,
    pub kind: String,
    pub from: Option<State>,
    pub to: Option<State>,
    pub msg: String,
    pub data: serde_json::Value,
}

impl EventDraft {
    pub fn new(vmid: Option<u32>, kind: &str, msg: impl Into<String>) -> EventDraft {
        EventDraft {
            vmid,
            kind: kind.to_string(),
            from: None,
            to: None,
            msg: msg.into(),
            data: serde_json::Value::Null,
        }
    }

    pub fn transition(vmid: u32, from: State, to: State, msg: impl Into<String>) -> EventDraft {
        EventDraft {
            vmid: Some(vmid),
            kind: "sandbox.state".to_string(),
            from: Some(from),
            to: Some(to),
            msg: msg.into(),
            data: serde_json::Value::Null,
        }
    }

    pub fn with_data(mut self, data: serde_json::Value) -> EventDraft {
        self.data = data;
        self
    }

    pub fn finish(self, id: u64, ts: Timestamp) -> Event {
        Event {
            id,
            ts,
            vmid: self.vmid,
            kind: self.kind,
            from: self.from,
            to: self.to,
            msg: self.msg,
            data: self.data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn happy_path_transitions_are_allowed() {
        let path = [
            State::Requested,
            State::Provisioning,
            State::Booting,
            State::Ready,
            State::Running,
            State::Completed,
            State::Stopped,
            State::Destroyed,
        ];
        assert!(path.windows(2).all(|w| w[0].can_become(w[1])));
    }

    #[test]
    fn stopped_sandbox_restarts_through_booting() {
        assert!(State::Stopped.can_become(State::Booting));
    }

    #[test]
    fn destroyed_is_terminal() {
        assert!(State::ALL.iter().all(|s| !State::Destroyed.can_become(*s)));
    }

    #[test]
    fn timeout_only_leads_to_destroyed() {
        let next: Vec<State> = State::ALL
            .into_iter()
            .filter(|s| State::Timeout.can_become(*s))
            .collect();
        assert_eq!(next, vec![State::Destroyed]);
    }

    #[test]
    fn requested_cannot_jump_to_ready() {
        assert!(!State::Requested.can_become(State::Ready));
    }

    #[test]
    fn every_live_state_can_be_destroyed() {
        let live = State::ALL.into_iter().filter(|s| *s != State::Destroyed);
        assert!(live.into_iter().all(|s| s.can_become(State::Destroyed)));
    }

    #[test]
    fn stop_on_stopped_names_state_and_way_out() {
        let err = check_action(1012, State::Stopped, Action::Stop, false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "sandbox 1012 is STOPPED; it is already stopped; start it with `agentlab sandbox start`"
        );
    }

    #[test]
    fn exec_on_stopped_suggests_start_or_force() {
        let err = check_action(1012, State::Stopped, Action::Exec, false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "sandbox 1012 is STOPPED; start it first, or use --force"
        );
    }

    #[test]
    fn destroy_running_needs_force() {
        assert!(check_action(1, State::Running, Action::Destroy, false).is_err());
        assert!(check_action(1, State::Running, Action::Destroy, true).is_ok());
    }

    #[test]
    fn revert_while_booting_needs_force() {
        assert!(check_action(1, State::Booting, Action::Revert, false).is_err());
        assert!(check_action(1, State::Booting, Action::Revert, true).is_ok());
    }

    #[test]
    fn nothing_acts_on_destroyed_not_even_with_force() {
        let actions = [Action::Start, Action::Stop, Action::Destroy, Action::Revert];
        assert!(actions
            .iter()
            .all(|a| check_action(1, State::Destroyed, *a, true).is_err()));
    }

    #[test]
    fn start_on_running_is_refused() {
        let err = check_action(7, State::Ready, Action::Start, false).unwrap_err();
        assert!(err.to_string().contains("already running"));
    }

    #[test]
    fn state_names_round_trip() {
        assert!(State::ALL
            .iter()
            .all(|s| State::parse(s.as_str()) == Some(*s)));
    }

    #[test]
    fn state_serializes_in_capitals() {
        assert_eq!(serde_json::to_string(&State::Ready).unwrap(), "\"READY\"");
    }

    #[test]
    fn macs_are_stable_and_local() {
        assert_eq!(mac_for(1000), mac_for(1000));
        assert_ne!(mac_for(1000), mac_for(1001));
        assert!(mac_for(1000).starts_with("52:54:00:"));
    }

    #[test]
    fn names_must_start_with_a_letter() {
        assert!(validate_name("web-1").is_ok());
        assert!(validate_name("1web").is_err());
        assert!(validate_name("a b").is_err());
        assert!(validate_name("").is_err());
    }

    #[test]
    fn keepalive_lease_never_expires() {
        let mut sb = sample();
        sb.keepalive = true;
        assert!(!sb.lease_expired(Timestamp(10_000)));
    }

    #[test]
    fn lease_expires_at_its_time() {
        let sb = sample();
        assert!(!sb.lease_expired(Timestamp(4_999)));
        assert!(sb.lease_expired(Timestamp(5_000)));
    }

    fn sample() -> Sandbox {
        Sandbox {
            vmid: 1000,
            name: "sbx-1000".into(),
            profile: "default".into(),
            state: State::Ready,
            backend: "qemu".into(),
            keepalive: false,
            ttl_seconds: Some(5),
            lease_expires_at: Some(Timestamp(5_000)),
            created_at: Timestamp(0),
            updated_at: Timestamp(0),
            resources: Resources {
                cores: 1,
                memory_mb: 512,
            },
            ready_on: "running".into(),
            disk: None,
            runtime: None,
            mac: mac_for(1000),
            ip: None,
            last_error: None,
            guest: None,
            spec: serde_json::Value::Null,
        }
    }
}
