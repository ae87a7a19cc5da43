//! The Proxmox VE calls the backend makes, typed: one function per endpoint
//! use, with the retries each one needs (endpoints.md §2, §3, §6, §0.6).
//! Lifecycle decisions live in `mod.rs`; the guest agent in `agent.rs`.

use std::collections::HashSet;
use std::sync::Mutex;
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::proxmox_api::{lenient, seg, ApiError, Client, Form, Method, TaskDone};

/// One VM as `/cluster/resources?type=vm` lists it.
#[derive(Clone, Debug, Deserialize)]
pub struct Resource {
    #[serde(deserialize_with = "lenient::int")]
    pub vmid: i64,
    pub node: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "lenient::bool")]
    pub template: bool,
    #[serde(default, deserialize_with = "lenient::opt_text")]
    pub tags: Option<String>,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
}

/// `GET .../status/current`, the fields used.
#[derive(Clone, Debug, Deserialize)]
pub struct VmStatus {
    pub status: String,
    #[serde(default, deserialize_with = "lenient::opt_text")]
    pub lock: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    pub uptime: Option<i64>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Node {
    pub node: String,
    #[serde(default)]
    pub status: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Version {
    pub version: String,
    #[serde(default, deserialize_with = "lenient::opt_text")]
    pub release: Option<String>,
}

impl Version {
    /// `8.2.4` → 8.
    pub fn major(&self) -> u32 {
        self.version
            .split(['.', '-'])
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0)
    }
}

pub fn vm_path(node: &str, vmid: u32, rest: &str) -> String {
    format!("/nodes/{}/qemu/{vmid}{rest}", seg(node))
}

pub fn resources(api: &Client) -> Result<Vec<Resource>, ApiError> {
    let all: Vec<Resource> = api.get("/cluster/resources", &Form::new().str("type", "vm"))?;
    Ok(all
        .into_iter()
        .filter(|r| r.kind.as_deref().is_none_or(|k| k == "qemu"))
        .collect())
}

pub fn status(api: &Client, node: &str, vmid: u32) -> Result<VmStatus, ApiError> {
    api.get(&vm_path(node, vmid, "/status/current"), &Form::new())
}

/// Retries `op` while PVE reports a lock that goes away by itself, with
/// backoff, until `deadline` (endpoints.md §0.6: bpg and Telmate do alike).
pub fn retry_locked<T>(
    what: &str,
    deadline: Instant,
    mut op: impl FnMut() -> Result<T, ApiError>,
) -> Result<T, ApiError> {
    let mut delay = Duration::from_millis(200);
    loop {
        match op() {
            Err(e) if e.is_transient_lock() && Instant::now() + delay < deadline => {
                crate::debug!("proxmox: {what}: {}; retrying in {delay:?}", e.message());
                sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            r => return r,
        }
    }
}

/// Allocates VMIDs: `/cluster/nextid` reserves nothing, so IDs this process
/// handed out recently are skipped, and a clone that finds its ID taken
/// asks again (endpoints.md §2).
#[derive(Default)]
pub struct Ids {
    recent: Mutex<HashSet<u32>>,
}

impl Ids {
    pub fn next(&self, api: &Client) -> Result<u32, ApiError> {
        let mut probe: Option<u32> = None;
        for _ in 0..64 {
            let form = match probe {
                Some(p) => Form::new().int("vmid", p),
                None => Form::new(),
            };
            let got = api.call(Method::Get, "/cluster/nextid", &form);
            let id = match got {
                Ok(v) => lenient::to_int(&v).ok_or_else(|| ApiError::Decode {
                    endpoint: "GET /cluster/nextid".into(),
                    why: format!("expected a VMID, got {v}"),
                })? as u32,
                // `?vmid=` of a used ID: 400 "VM N already exists".
                Err(e) if probe.is_some() && e.code() == Some(400) => {
                    probe = probe.map(|p| p + 1);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            if recent.insert(id) {
                return Ok(id);
            }
            probe = Some(id + 1);
        }
        Err(ApiError::Decode {
            endpoint: "GET /cluster/nextid".into(),
            why: "no free VMID after 64 tries".into(),
        })
    }

    /// An ID found taken; keep skipping it.
    pub fn forget(&self, id: u32) {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }
}

pub struct CloneSpec<'a> {
    pub node: &'a str,
    pub template: u32,
    pub name: &'a str,
    pub full: bool,
    pub storage: Option<&'a str>,
}

/// Clones the template into a fresh VMID; returns it once the clone task
/// ended (so the new VM's `lock: clone` is gone, or going).
pub fn clone(
    api: &Client,
    ids: &Ids,
    spec: &CloneSpec,
    deadline: Instant,
    task_timeout: Duration,
) -> Result<u32, ApiError> {
    let path = vm_path(spec.node, spec.template, "/clone");
    let mut collisions = 0;
    loop {
        let newid = ids.next(api)?;
        let mut form = Form::new()
            .int("newid", newid)
            .str("name", spec.name)
            .bool("full", spec.full);
        if let (true, Some(s)) = (spec.full, spec.storage) {
            form = form.str("storage", s);
        }
        let r = retry_locked("clone", deadline, || {
            let upid = api.start_task(Method::Post, &path, &form)?;
            api.wait_task(&upid, task_timeout)
        });
        match r {
            Ok(_) => return Ok(newid),
            // Another client took the ID between nextid and clone.
            Err(e) if e.message().contains("already exists") && collisions < 20 => {
                crate::info!("proxmox: VMID {newid} was taken meanwhile; choosing another");
                collisions += 1;
            }
            Err(e) => {
                ids.forget(newid);
                return Err(e);
            }
        }
    }
}

/// A config change (POST: a `qmconfig` task), retried on transient locks.
pub fn configure(
    api: &Client,
    node: &str,
    vmid: u32,
    form: &Form,
    deadline: Instant,
    task_timeout: Duration,
) -> Result<(), ApiError> {
    let path = vm_path(node, vmid, "/config");
    retry_locked("configure", deadline, || {
        match api.call(Method::Post, &path, form)? {
            // `null`: done synchronously (background_delay, or an old server).
            serde_json::Value::Null => Ok(()),
            v => {
                let s = v.as_str().unwrap_or_default();
                let upid = crate::proxmox_api::Upid::parse(s).map_err(|why| ApiError::Decode {
                    endpoint: format!("POST {path}"),
                    why,
                })?;
                api.wait_task(&upid, task_timeout).map(|_| ())
            }
        }
    })
}

/// A task on the VM (start, stop, snapshot, rollback, destroy), retried on
/// transient locks.
pub fn vm_task(
    api: &Client,
    method: Method,
    path: &str,
    form: &Form,
    deadline: Instant,
    task_timeout: Duration,
) -> Result<TaskDone, ApiError> {
    retry_locked(path, deadline, || {
        let upid = api.start_task(method, path, form)?;
        api.wait_task(&upid, task_timeout)
    })
}

/// The config as `k → text` (values of any JSON type flattened to text).
pub fn config(
    api: &Client,
    node: &str,
    vmid: u32,
) -> Result<std::collections::BTreeMap<String, String>, ApiError> {
    let v: serde_json::Map<String, serde_json::Value> =
        api.get(&vm_path(node, vmid, "/config"), &Form::new())?;
    Ok(v.iter()
        .filter_map(|(k, v)| lenient::to_text(v).map(|t| (k.clone(), t)))
        .collect())
}

/// `net0` with `firewall=1`, keeping the model, MAC and bridge the clone got
/// (leaving the MAC out would make PVE pick a new one on every update).
pub fn net0_with_firewall(current: &str, bridge_default: &str) -> String {
    let mut parts: Vec<String> = current
        .split(',')
        .filter(|p| !p.is_empty() && !p.starts_with("firewall="))
        .map(str::to_string)
        .collect();
    if parts.is_empty() {
        parts.push("virtio".into());
    }
    if !parts.iter().any(|p| p.starts_with("bridge=")) {
        parts.push(format!("bridge={bridge_default}"));
    }
    parts.push("firewall=1".into());
    parts.join(",")
}

/// The MAC in a `net0` value (`virtio=BC:24:11:..,bridge=..` or `macaddr=..`).
pub fn mac_of(net0: &str) -> Option<String> {
    net0.split(',').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        let is_mac = v.len() == 17 && v.bytes().filter(|b| *b == b':').count() == 5;
        (k == "macaddr" || is_mac).then(|| v.to_ascii_lowercase())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net0_keeps_model_mac_and_bridge_and_gains_firewall() {
        let v = net0_with_firewall("virtio=BC:24:11:AA:BB:CC,bridge=vmbr1,firewall=0", "vmbr0");

        assert_eq!(v, "virtio=BC:24:11:AA:BB:CC,bridge=vmbr1,firewall=1");
    }

    #[test]
    fn mac_is_read_from_the_model_alias() {
        assert_eq!(
            mac_of("virtio=BC:24:11:AA:BB:CC,bridge=vmbr0").as_deref(),
            Some("bc:24:11:aa:bb:cc")
        );
    }

    #[test]
    fn version_major_is_the_first_number() {
        let v = Version {
            version: "8.2.4".into(),
            release: None,
        };

        assert_eq!(v.major(), 8);
    }
}
