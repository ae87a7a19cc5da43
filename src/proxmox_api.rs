//! A small blocking client for the Proxmox VE REST API (`/api2/json`), run on
//! the daemon's worker threads. Owns the transport (HTTPS through `ureq` with
//! rustls, trust per `tls.rs`), the token header, the error envelope and task
//! waiting; it knows no sandbox. The protocol facts it follows, with their
//! sources in PVE's Perl code, are in `shared/reference/proxmox/endpoints.md`:
//! §0.1 encodings (`form.rs`) and loose typing (`lenient.rs`), §0.2 errors
//! (the message in the body's `message`, or only in the HTTP reason phrase
//! before libpve-http-server-perl 5.2.0), §0.5 tasks (`upid.rs`).
//!
//! Retries here are transport-level only: a 595–599 from pveproxy (it could
//! not forward the call) or a connection failure is retried for idempotent
//! calls (GET), never for calls that change something, which the caller
//! retries with knowledge of the state (`backend::proxmox`).

pub mod form;
pub mod lenient;
pub mod tls;
pub mod upid;

use std::io::Read;
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

pub use form::Form;
pub use tls::Trust;
pub use upid::{ExitStatus, Upid};

use crate::config::{ApiToken, ProxmoxConfig};

/// Largest answer read (file-read returns up to 16 MiB, as a JSON string).
const MAX_BODY: u64 = 64 << 20;
/// Attempts for an idempotent call that pveproxy could not forward.
const PROXY_ATTEMPTS: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{method} {endpoint}: cannot reach the Proxmox API at {base}: {detail}")]
    Connect {
        method: &'static str,
        endpoint: String,
        base: String,
        detail: String,
    },
    #[error(
        "{method} {endpoint}: Proxmox refused the API token {token} (401 {message}); \
         check proxmox_api_token: the token must exist, be unexpired, and its secret be right"
    )]
    Auth {
        method: &'static str,
        endpoint: String,
        token: String,
        message: String,
    },
    #[error("{method} {endpoint}: {code} {message}{}", errors_text(.errors))]
    Status {
        method: &'static str,
        endpoint: String,
        code: u16,
        message: String,
        /// Per-parameter reasons of a 400.
        errors: Vec<(String, String)>,
    },
    #[error("{endpoint}: unexpected answer from Proxmox: {why}")]
    Decode { endpoint: String, why: String },
    #[error("Proxmox task {upid} failed: {status}{}", log_text(.log_tail))]
    Task {
        upid: String,
        status: String,
        log_tail: Vec<String>,
    },
    #[error("{what}: no result after {}s", .waited.as_secs())]
    Timeout { what: String, waited: Duration },
}

fn errors_text(errors: &[(String, String)]) -> String {
    if errors.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = errors.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!(" ({})", parts.join("; "))
}

fn log_text(tail: &[String]) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("; task log ends: {}", tail.join(" | "))
    }
}

impl ApiError {
    /// The server's words (status message or task exit status).
    pub fn message(&self) -> &str {
        match self {
            ApiError::Status { message, .. } | ApiError::Auth { message, .. } => message,
            ApiError::Task { status, .. } => status,
            ApiError::Decode { why, .. } => why,
            ApiError::Connect { detail, .. } => detail,
            ApiError::Timeout { what, .. } => what,
        }
    }

    /// Whether the message or a parameter's reason contains `text`.
    pub fn mentions(&self, text: &str) -> bool {
        let in_errors = match self {
            ApiError::Status { errors, .. } => errors.iter().any(|(_, v)| v.contains(text)),
            _ => false,
        };
        in_errors || self.message().contains(text)
    }

    pub fn code(&self) -> Option<u16> {
        match self {
            ApiError::Status { code, .. } => Some(*code),
            ApiError::Auth { .. } => Some(401),
            _ => None,
        }
    }

    /// PVE says "not found" with a 500 and words (endpoints.md §0.2).
    pub fn is_not_found(&self) -> bool {
        let m = self.message();
        matches!(self, ApiError::Status { .. })
            && (m.contains("does not exist") || m.contains("no such") || m.contains("not found"))
    }

    /// A lock that goes away by itself: the config flock timing out, or a
    /// `lock:` property of an operation in progress (endpoints.md §0.6).
    pub fn is_transient_lock(&self) -> bool {
        let m = self.message();
        let transient = ["clone", "snapshot", "rollback", "snapshot-delete", "create"];
        (m.contains("can't lock file") && m.contains("got timeout"))
            || transient
                .iter()
                .any(|l| m.contains(&format!("VM is locked ({l})")))
    }
}

/// A stopped task that succeeded; `warnings` as in `WARNINGS: n`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskDone {
    pub upid: Upid,
    pub warnings: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Put,
    Delete,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
        }
    }
}

/// Timing knobs; tests shorten them.
#[derive(Clone, Debug)]
pub struct Timing {
    pub connect: Duration,
    /// Per request; PVE's proxy gives up on a silent backend after 30 s.
    pub request: Duration,
    pub task_poll: Duration,
    pub proxy_retry_delay: Duration,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            connect: Duration::from_secs(10),
            request: Duration::from_secs(60),
            task_poll: Duration::from_millis(500),
            proxy_retry_delay: Duration::from_millis(500),
        }
    }
}

pub struct Client {
    agent: ureq::Agent,
    base: String,
    token: ApiToken,
    timing: Timing,
}

#[derive(Deserialize)]
struct TaskStatus {
    status: String,
    #[serde(default, deserialize_with = "lenient::opt_text")]
    exitstatus: Option<String>,
}

#[derive(Deserialize)]
struct LogLine {
    #[serde(default, deserialize_with = "lenient::opt_text")]
    t: Option<String>,
}

impl Client {
    /// A client for `cfg`; the insecure switch logs a warning every time.
    pub fn new(cfg: &ProxmoxConfig, timing: Timing) -> Result<Client, String> {
        let trust = trust_of(cfg);
        if trust == Trust::Insecure {
            crate::warn!(
                "proxmox: proxmox_tls_insecure is set: the API server's certificate is NOT \
                 checked, so anyone on the path can read the API token; pin it with \
                 proxmox_tls_fingerprint (see `agentlab proxmox fingerprint`)"
            );
        }
        let tls = tls::client_config(&trust)?;
        let agent = ureq::AgentBuilder::new()
            .tls_config(tls)
            .timeout_connect(timing.connect)
            .timeout(timing.request)
            .max_idle_connections_per_host(4)
            .build();
        Ok(Client {
            agent,
            base: cfg.api_url.trim_end_matches('/').to_string(),
            token: cfg.api_token.clone(),
            timing,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn timing(&self) -> &Timing {
        &self.timing
    }

    /// One call; returns the answer's `data`. GETs that pveproxy could not
    /// forward (595–599) or that never reached the server are retried.
    pub fn call(&self, method: Method, path: &str, form: &Form) -> Result<Value, ApiError> {
        let idempotent = method == Method::Get;
        let mut attempt = 1;
        loop {
            match self.call_once(method, path, form) {
                Err(e) if idempotent && attempt < PROXY_ATTEMPTS && retryable(&e) => {
                    crate::debug!("proxmox: {e}; retrying");
                    sleep(self.timing.proxy_retry_delay * attempt);
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    /// One call, never retried (for reads that change state, such as the
    /// guest agent's exec-status, which forgets a process once it reported).
    pub fn call_no_retry(
        &self,
        method: Method,
        path: &str,
        form: &Form,
    ) -> Result<Value, ApiError> {
        self.call_once(method, path, form)
    }

    fn call_once(&self, method: Method, path: &str, form: &Form) -> Result<Value, ApiError> {
        let mut url = format!("{}{}", self.base, path);
        let body = match method {
            Method::Get | Method::Delete => {
                if !form.is_empty() {
                    url.push('?');
                    url.push_str(&form.encode());
                }
                None
            }
            Method::Post | Method::Put => Some(form.encode()),
        };
        let req = self
            .agent
            .request(method.as_str(), &url)
            .set("Authorization", &self.token.authorization())
            .set("Accept", "application/json");
        let r = match body {
            Some(b) => req
                .set("Content-Type", "application/x-www-form-urlencoded")
                .send_string(&b),
            None => req.call(),
        };
        let endpoint = path.split('?').next().unwrap_or(path).to_string();
        match r {
            Ok(resp) => {
                let v = read_json(resp).map_err(|why| ApiError::Decode {
                    endpoint: format!("{} {endpoint}", method.as_str()),
                    why,
                })?;
                Ok(v.get("data").cloned().unwrap_or(Value::Null))
            }
            Err(ureq::Error::Status(code, resp)) => {
                Err(self.status_error(method, endpoint, code, resp))
            }
            Err(ureq::Error::Transport(t)) => Err(ApiError::Connect {
                method: method.as_str(),
                endpoint,
                base: self.base.clone(),
                detail: transport_detail(&t),
            }),
        }
    }

    fn status_error(
        &self,
        method: Method,
        endpoint: String,
        code: u16,
        resp: ureq::Response,
    ) -> ApiError {
        let reason = resp.status_text().trim().to_string();
        let body = read_json(resp).unwrap_or(Value::Null);
        // libpve-http-server-perl ≥ 5.2.0 puts the message in the body; older
        // ones only in the reason phrase (endpoints.md §0.2).
        let message = body
            .get("message")
            .and_then(Value::as_str)
            .map(|m| m.trim().to_string())
            .filter(|m| !m.is_empty())
            .unwrap_or(reason);
        let errors = body
            .get("errors")
            .and_then(Value::as_object)
            .map(|o| {
                o.iter()
                    .map(|(k, v)| {
                        let t = lenient::to_text(v).unwrap_or_else(|| v.to_string());
                        (k.clone(), t.trim().to_string())
                    })
                    .collect()
            })
            .unwrap_or_default();
        if code == 401 {
            return ApiError::Auth {
                method: method.as_str(),
                endpoint,
                token: self.token.to_string(),
                message,
            };
        }
        ApiError::Status {
            method: method.as_str(),
            endpoint,
            code,
            message,
            errors,
        }
    }

    /// A GET decoded into `T`; a missing field names the endpoint.
    pub fn get<T: DeserializeOwned>(&self, path: &str, form: &Form) -> Result<T, ApiError> {
        let v = self.call(Method::Get, path, form)?;
        decode(&format!("GET {path}"), v)
    }

    /// Starts a task (a POST, PUT or DELETE answered with a UPID).
    pub fn start_task(&self, method: Method, path: &str, form: &Form) -> Result<Upid, ApiError> {
        let v = self.call(method, path, form)?;
        let endpoint = format!("{} {path}", method.as_str());
        let s = v.as_str().ok_or_else(|| ApiError::Decode {
            endpoint: endpoint.clone(),
            why: format!("expected a task ID (UPID), got {v}"),
        })?;
        Upid::parse(s).map_err(|why| ApiError::Decode { endpoint, why })
    }

    /// Starts a task and waits for it to stop.
    pub fn run_task(
        &self,
        method: Method,
        path: &str,
        form: &Form,
        timeout: Duration,
    ) -> Result<TaskDone, ApiError> {
        let upid = self.start_task(method, path, form)?;
        self.wait_task(&upid, timeout)
    }

    /// Polls the task on its own node until it stops. `OK` and `WARNINGS: n`
    /// are success; a failure carries the end of the task log. A `400 no
    /// such task` right after the start is PVE catching up, so it is retried.
    pub fn wait_task(&self, upid: &Upid, timeout: Duration) -> Result<TaskDone, ApiError> {
        let path = format!(
            "/nodes/{}/tasks/{}/status",
            seg(&upid.node),
            seg(upid.as_str())
        );
        let deadline = Instant::now() + timeout;
        let mut unknown = 0;
        loop {
            match self.get::<TaskStatus>(&path, &Form::new()) {
                Ok(st) if st.status != "running" => return self.task_outcome(upid, st),
                Ok(_) => {}
                Err(e) if e.code() == Some(400) && e.mentions("no such task") && unknown < 10 => {
                    unknown += 1;
                }
                Err(e) => return Err(e),
            }
            if Instant::now() >= deadline {
                return Err(ApiError::Timeout {
                    what: format!("Proxmox task {upid}"),
                    waited: timeout,
                });
            }
            sleep(self.timing.task_poll);
        }
    }

    fn task_outcome(&self, upid: &Upid, st: TaskStatus) -> Result<TaskDone, ApiError> {
        let status = st.exitstatus.unwrap_or_else(|| "unexpected status".into());
        match ExitStatus::parse(&status) {
            ExitStatus::Ok => Ok(TaskDone {
                upid: upid.clone(),
                warnings: 0,
            }),
            ExitStatus::Warnings(n) => {
                crate::info!("proxmox: task {upid} ended with {n} warning(s)");
                Ok(TaskDone {
                    upid: upid.clone(),
                    warnings: n,
                })
            }
            ExitStatus::Error(text) => Err(ApiError::Task {
                upid: upid.to_string(),
                status: text,
                log_tail: self.task_log_tail(upid, 5),
            }),
        }
    }

    /// The last `n` lines of a task's log (best effort).
    pub fn task_log_tail(&self, upid: &Upid, n: usize) -> Vec<String> {
        let path = format!(
            "/nodes/{}/tasks/{}/log",
            seg(&upid.node),
            seg(upid.as_str())
        );
        let form = Form::new().int("start", 0).int("limit", 1000);
        let lines: Vec<LogLine> = self.get(&path, &form).unwrap_or_default();
        let mut text: Vec<String> = lines.into_iter().filter_map(|l| l.t).collect();
        let skip = text.len().saturating_sub(n);
        text.drain(..skip);
        text
    }
}

/// Decodes `data` into `T`, naming the endpoint when a field is missing.
pub fn decode<T: DeserializeOwned>(endpoint: &str, v: Value) -> Result<T, ApiError> {
    serde_json::from_value(v).map_err(|e| ApiError::Decode {
        endpoint: endpoint.to_string(),
        why: e.to_string(),
    })
}

/// A path segment: everything but RFC 3986 `pchar` is percent-encoded
/// (UPIDs keep their `:`, `@` and `!`, as PVE's own clients send them).
pub fn seg(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn trust_of(cfg: &ProxmoxConfig) -> Trust {
    if let Some(fp) = cfg.tls_fingerprint {
        Trust::Pinned(fp)
    } else if let Some(ca) = &cfg.tls_ca_path {
        Trust::CaFile(ca.clone())
    } else if cfg.tls_insecure {
        Trust::Insecure
    } else {
        Trust::WebPki
    }
}

fn retryable(e: &ApiError) -> bool {
    match e {
        ApiError::Status { code, .. } => (595..=599).contains(code),
        ApiError::Connect { detail, .. } => !detail.contains("certificate"),
        _ => false,
    }
}

fn transport_detail(t: &ureq::Transport) -> String {
    let mut s = t.to_string();
    let mut src = std::error::Error::source(t);
    while let Some(e) = src {
        let m = e.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = e.source();
    }
    s
}

fn read_json(resp: ureq::Response) -> Result<Value, String> {
    let mut text = String::new();
    resp.into_reader()
        .take(MAX_BODY)
        .read_to_string(&mut text)
        .map_err(|e| format!("reading the answer: {e}"))?;
    if text.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&text).map_err(|e| format!("not JSON ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, message: &str) -> ApiError {
        ApiError::Status {
            method: "POST",
            endpoint: "/x".into(),
            code,
            message: message.into(),
            errors: Vec::new(),
        }
    }

    #[test]
    fn clone_lock_and_flock_timeout_are_transient() {
        assert!(status(500, "VM is locked (clone)").is_transient_lock());
        assert!(status(
            500,
            "can't lock file '/var/lock/qemu-server/lock-101.conf' - got timeout"
        )
        .is_transient_lock());
    }

    #[test]
    fn backup_lock_is_not_transient() {
        assert!(!status(500, "VM is locked (backup)").is_transient_lock());
    }

    #[test]
    fn only_proxy_statuses_are_retried() {
        assert!(retryable(&status(596, "Connection timed out")));
        assert!(!retryable(&status(500, "VM is locked (clone)")));
    }

    #[test]
    fn parameter_errors_are_listed_in_the_message() {
        let e = ApiError::Status {
            method: "POST",
            endpoint: "/nodes/pve1/qemu/9000/clone".into(),
            code: 400,
            message: "Parameter verification failed.".into(),
            errors: vec![(
                "name".into(),
                "value does not look like a valid DNS name".into(),
            )],
        };

        assert_eq!(
            e.to_string(),
            "POST /nodes/pve1/qemu/9000/clone: 400 Parameter verification failed. \
             (name: value does not look like a valid DNS name)"
        );
    }

    #[test]
    fn upid_path_segment_keeps_colons_and_token_marks() {
        assert_eq!(
            seg("UPID:pve1:0:0:0:qmstart:100:a@pam!t:"),
            "UPID:pve1:0:0:0:qmstart:100:a@pam!t:"
        );
        assert_eq!(seg("a b/c"), "a%20b%2Fc");
    }
}
