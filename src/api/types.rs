//! Request and response bodies of the `/v1` API, shared by the daemon and
//! the CLI. Requests are ours to define, so unknown fields are refused
//! (`deny_unknown_fields`) and a typo is a 400, not a silently ignored field.
//! Shapes follow AgentLab's API (`V1SandboxCreateRequest`, …) where it has one.

use serde::{Deserialize, Serialize};

use crate::backend::{BackendStatus, Orphan};
use crate::model::Sandbox;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// `+small +secure` → profile `secure-small`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modifiers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Boot this base image instead of the profile's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// A duration such as `30m` or `2h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    /// AgentLab's spelling of the same thing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_minutes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive: Option<bool>,
    /// Answer only once the sandbox is READY (or has failed).
    #[serde(default)]
    pub wait: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    #[serde(default)]
    pub wait: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForceRequest {
    #[serde(default)]
    pub force: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevertRequest {
    #[serde(default)]
    pub force: bool,
    /// Omitted: restart only if it was running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<bool>,
    #[serde(default)]
    pub wait: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RevertResponse {
    pub snapshot: String,
    pub was_running: bool,
    pub restarted: bool,
    pub sandbox: Sandbox,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_minutes: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RenewResponse {
    pub vmid: u32,
    pub lease_expires_at: Option<String>,
    pub keepalive: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneRequest {
    #[serde(default)]
    pub dry_run: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PruneResponse {
    pub dry_run: bool,
    pub orphans: Vec<Orphan>,
    /// Orphans that could not be removed, with why.
    pub failed: Vec<String>,
    /// VMIDs of DESTROYED sandboxes whose records were forgotten.
    pub forgotten: Vec<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleInput {
    /// Text typed into the serial console (use "\n" for Enter).
    pub data: String,
}

/// `POST /v1/sandboxes/{id}/expose`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExposeRequest {
    /// The guest's TCP port.
    #[serde(default)]
    pub port: Option<u16>,
    /// The host port; default: the guest port.
    #[serde(default)]
    pub host_port: Option<u16>,
    /// The host address to listen on; default 0.0.0.0 (every address).
    #[serde(default)]
    pub bind: Option<std::net::Ipv4Addr>,
    /// Default `sbx-<vmid>-<port>`.
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildImageRequest {
    #[serde(default)]
    pub force: bool,
    /// Build `default-qemu-ga` (the stock qemu-ga as guest agent) instead.
    #[serde(default)]
    pub qemu_ga: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusResponse {
    pub version: String,
    pub pid: u32,
    pub started_at: String,
    pub uptime_seconds: u64,
    pub socket: String,
    pub data_dir: String,
    pub backend: BackendStatus,
    /// Sandboxes per state, only the states that have any.
    pub sandboxes: std::collections::BTreeMap<String, usize>,
    pub orphans: Vec<Orphan>,
    pub rss_bytes: Option<u64>,
}

/// The error body, as AgentLab sends it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// `POST /v1/sandboxes/{id}/exec`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The command and its arguments (no shell: `["sh", "-c", "…"]` for one).
    pub argv: Vec<String>,
    /// `KEY=VALUE` entries added to the guest's base environment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Kill the command after this long (`30s`, `5m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Run on a pseudo-terminal of this size (sessions only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<crate::qga::wire::TtySize>,
    /// Keep stdin open for the session's stdin frames.
    #[serde(default)]
    pub stdin: bool,
    /// Plain HTTP: all of stdin up front, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// Plain HTTP: NDJSON as output comes (default) or one JSON document at the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// With `"stream": false`: bytes kept per stream before truncating (default 16 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output: Option<u64>,
}

impl ExecRequest {
    pub fn to_spec(&self) -> Result<crate::qga::session::ExecSpec, String> {
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return Err("argv must name a command".into());
        }
        if let Some(bad) = self
            .env
            .iter()
            .find(|e| !e.contains('=') || e.starts_with('='))
        {
            return Err(format!("env entry {bad:?} is not KEY=VALUE"));
        }
        let timeout = self
            .timeout
            .as_deref()
            .map(crate::time::parse_duration)
            .transpose()
            .map_err(|e| format!("timeout: {e}"))?;
        Ok(crate::qga::session::ExecSpec {
            argv: self.argv.clone(),
            env: self.env.clone(),
            cwd: self.cwd.clone(),
            user: self.user.clone(),
            tty: self.tty,
            stdin: self.stdin,
            timeout,
        })
    }
}
