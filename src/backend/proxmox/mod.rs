//! The Proxmox VE backend: sandboxes as VMs cloned from a template on a PVE
//! cluster, driven over the REST API (`proxmox_api`). Owns the lifecycle on
//! PVE: clone (retrying VMID collisions), configure (name, cores, memory,
//! NIC firewall, agent), firewall security group per network mode, start,
//! readiness by agent ping, the `clean` snapshot taken when first ready,
//! revert by rollback, stop, destroy (stop, then purge), adoption after a
//! daemon restart, and orphans (VMs tagged `agentlab` that no sandbox owns).
//!
//! The sandbox's PVE VM is recorded in its `Disk` (`overlay_path` is
//! `pve:<node>/<vmid>`, `base_path` the template), and its `Runtime.pid` is
//! the PVE VMID. Trap-by-trap notes: shared/reference/proxmox/endpoints.md.

mod agent;
pub mod pve;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::{
    Adoption, Backend, BackendError, BackendStatus, EventSink, ExecResult, Orphan, Provisioned,
    StopMode, VmEvent,
};
use crate::config::{CloneMode, Config, NetworkMode, Profile, Profiles, ProxmoxConfig};
use crate::model::{Disk, GuestFacts, Runtime, Sandbox};
use crate::proxmox_api::{ApiError, Client, Form, Method, Timing};
use crate::qga::session::ExecSpec;
use crate::time::Timestamp;
use pve::{vm_path, CloneSpec, Ids};

/// Tag on every VM agentlab makes (orphan detection).
pub const TAG: &str = "agentlab";
/// The snapshot `revert` rolls back to.
pub const CLEAN_SNAPSHOT: &str = "clean";

/// AgentLab's security group for each network mode.
pub fn security_group(mode: NetworkMode) -> &'static str {
    match mode {
        NetworkMode::Off => "agent_nat_off",
        NetworkMode::Nat => "agent_nat_default",
        NetworkMode::Allowlist => "agent_nat_allowlist",
    }
}

/// How long things may take; tests shorten them.
#[derive(Clone, Debug)]
pub struct Limits {
    pub api: Timing,
    /// Retrying a VM lock (`VM is locked (clone)`, flock timeouts) stops here.
    pub lock_wait: Duration,
    pub task: Duration,
    /// Agent ping after start; then the VM is watched this often.
    pub watch_every: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            api: Timing::default(),
            lock_wait: Duration::from_secs(60),
            task: Duration::from_secs(600),
            watch_every: Duration::from_secs(2),
        }
    }
}

pub struct ProxmoxBackend {
    api: Arc<Client>,
    cfg: ProxmoxConfig,
    profiles_dir: std::path::PathBuf,
    limits: Limits,
    sink: EventSink,
    ids: Ids,
    /// PVE's major version, read once.
    major: Mutex<Option<u32>>,
    /// sandbox VMID → stop flag of its watcher thread.
    watchers: Mutex<HashMap<u32, Arc<AtomicBool>>>,
}

/// Where a sandbox lives on the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub node: String,
    pub vmid: u32,
}

impl Target {
    fn of(sb: &Sandbox) -> Option<Target> {
        parse_target(&sb.disk.as_ref()?.overlay_path)
    }

    fn path(&self, rest: &str) -> String {
        vm_path(&self.node, self.vmid, rest)
    }
}

fn parse_target(s: &str) -> Option<Target> {
    let (node, vmid) = s.strip_prefix("pve:")?.split_once('/')?;
    Some(Target {
        node: node.to_string(),
        vmid: vmid.parse().ok()?,
    })
}

fn api_err(e: ApiError) -> BackendError {
    let user = matches!(e, ApiError::Auth { .. })
        || matches!(e.code(), Some(400 | 403))
        || matches!(e, ApiError::Task { .. });
    let msg = crate::log::error_chain(&e);
    if user {
        BackendError::user(msg)
    } else {
        BackendError::host(msg)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Deserialize)]
struct Snapshot {
    name: String,
}

impl ProxmoxBackend {
    pub fn new(cfg: &Config, sink: EventSink) -> Result<ProxmoxBackend, String> {
        ProxmoxBackend::with_limits(cfg, sink, Limits::default())
    }

    pub fn with_limits(
        cfg: &Config,
        sink: EventSink,
        limits: Limits,
    ) -> Result<ProxmoxBackend, String> {
        let p = cfg
            .proxmox
            .clone()
            .ok_or("backend: proxmox needs proxmox_api_url and proxmox_api_token")?;
        let api = Client::new(&p, limits.api.clone())?;
        Ok(ProxmoxBackend {
            api: Arc::new(api),
            cfg: p,
            profiles_dir: cfg.profiles_dir.clone(),
            limits,
            sink,
            ids: Ids::default(),
            major: Mutex::new(None),
            watchers: Mutex::new(HashMap::new()),
        })
    }

    pub fn client(&self) -> &Client {
        &self.api
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.limits.lock_wait
    }

    fn major(&self) -> u32 {
        let mut m = lock(&self.major);
        if let Some(v) = *m {
            return v;
        }
        match self.api.get::<pve::Version>("/version", &Form::new()) {
            Ok(v) => {
                *m = Some(v.major());
                v.major()
            }
            Err(_) => 8,
        }
    }

    /// Checks `proxmox_node` names an online node of this cluster.
    fn check_node(&self) -> Result<(), BackendError> {
        let Some(want) = &self.cfg.node else {
            return Ok(());
        };
        let nodes: Vec<pve::Node> = self.api.get("/nodes", &Form::new()).map_err(api_err)?;
        if nodes.iter().any(|n| &n.node == want) {
            return Ok(());
        }
        let names: Vec<&str> = nodes.iter().map(|n| n.node.as_str()).collect();
        Err(BackendError::user(format!(
            "proxmox_node {want:?} is not a node of this cluster (nodes: {})",
            names.join(", ")
        )))
    }

    /// The template's node, after checking it is a template on the right node.
    fn find_template(&self, profile: &Profile) -> Result<(String, u32), BackendError> {
        let tpl = profile.template_vmid.ok_or_else(|| {
            BackendError::user(format!(
                "profile {} has no template_vmid; the proxmox backend clones a template VM",
                profile.name
            ))
        })?;
        self.check_node()?;
        let all = pve::resources(&self.api).map_err(api_err)?;
        let r = all
            .iter()
            .find(|r| r.vmid == i64::from(tpl))
            .ok_or_else(|| {
                BackendError::user(format!(
                    "profile {}: template VM {tpl} does not exist on the Proxmox cluster",
                    profile.name
                ))
            })?;
        if !r.template {
            return Err(BackendError::user(format!(
                "profile {}: VM {tpl} is not a template (convert it with `qm template {tpl}`)",
                profile.name
            )));
        }
        if let Some(want) = &self.cfg.node {
            if &r.node != want {
                return Err(BackendError::user(format!(
                    "profile {}: template VM {tpl} is on node {}, not on proxmox_node {want}",
                    profile.name, r.node
                )));
            }
        }
        Ok((r.node.clone(), tpl))
    }

    fn check_group(&self, mode: NetworkMode) -> Result<(), BackendError> {
        let group = security_group(mode);
        let groups: Vec<serde_json::Value> = self
            .api
            .get("/cluster/firewall/groups", &Form::new())
            .map_err(api_err)?;
        let found = groups
            .iter()
            .any(|g| g.get("group").and_then(|v| v.as_str()) == Some(group));
        if found {
            return Ok(());
        }
        Err(BackendError::user(format!(
            "network mode {} needs the Proxmox firewall security group {group}, which does not \
             exist; create it (Datacenter → Firewall → Security Group) before making sandboxes",
            mode.as_str()
        )))
    }

    /// Everything `profile validate` checks; one line per check.
    pub fn validate_profile(&self, profile: &Profile) -> Result<Vec<String>, BackendError> {
        let (node, tpl) = self.find_template(profile)?;
        let mut lines = vec![format!(
            "template VM {tpl} found on node {node}, and is a template"
        )];
        let cfg = pve::config(&self.api, &node, tpl).map_err(api_err)?;
        let agent_on = cfg
            .get("agent")
            .and_then(|a| {
                a.split(',')
                    .find(|p| !p.contains('=') || p.starts_with("enabled="))
            })
            .is_some_and(|v| v.trim_start_matches("enabled=") == "1");
        if !agent_on {
            return Err(BackendError::user(format!(
                "profile {}: template VM {tpl} does not enable the QEMU guest agent (set agent: 1)",
                profile.name
            )));
        }
        lines.push("guest agent enabled".into());
        let has_ci = cfg.values().any(|v| v.contains("cloudinit"));
        if has_ci {
            lines.push("cloud-init drive present".into());
        } else {
            lines.push(
                "no cloud-init drive (the profile sets no cloud-init keys, so none is needed)"
                    .into(),
            );
        }
        self.check_group(profile.network.mode)?;
        lines.push(format!(
            "firewall security group {} exists",
            security_group(profile.network.mode)
        ));
        Ok(lines)
    }

    fn configure(&self, t: &Target, sb: &Sandbox, profile: &Profile) -> Result<(), ApiError> {
        let current = pve::config(&self.api, &t.node, t.vmid)?;
        let net0 = pve::net0_with_firewall(
            current.get("net0").map_or("", String::as_str),
            &profile.network.bridge,
        );
        let form = Form::new()
            .str("name", format!("agentlab-{}", sb.vmid))
            .int("cores", profile.resources.cores)
            .str("memory", profile.resources.memory_mb.to_string())
            .str("net0", net0)
            .str("agent", "enabled=1")
            .str("tags", TAG)
            .str(
                "description",
                format!("agentlab sandbox {} ({})", sb.vmid, sb.name),
            );
        pve::configure(
            &self.api,
            &t.node,
            t.vmid,
            &form,
            self.deadline(),
            self.limits.task,
        )?;
        let fw = Form::new().bool("enable", true);
        self.api
            .call(Method::Put, &t.path("/firewall/options"), &fw)?;
        let rule = Form::new()
            .str("type", "group")
            .str("action", security_group(profile.network.mode))
            .int("enable", 1)
            .str("comment", "agentlab network mode");
        self.api
            .call(Method::Post, &t.path("/firewall/rules"), &rule)?;
        Ok(())
    }

    fn has_clean(&self, t: &Target) -> Result<bool, ApiError> {
        let snaps: Vec<Snapshot> = self.api.get(&t.path("/snapshot"), &Form::new())?;
        Ok(snaps.iter().any(|s| s.name == CLEAN_SNAPSHOT))
    }

    fn watch(&self, sbid: u32, t: Target) {
        let stop = Arc::new(AtomicBool::new(false));
        if let Some(old) = lock(&self.watchers).insert(sbid, stop.clone()) {
            old.store(true, Ordering::SeqCst);
        }
        let w = Watcher {
            api: self.api.clone(),
            sink: self.sink.clone(),
            every: self.limits.watch_every,
            task: self.limits.task,
            stop,
            sbid,
            t,
        };
        let _ = std::thread::Builder::new()
            .name(format!("pve-watch-{sbid}"))
            .spawn(move || w.run());
    }

    fn unwatch(&self, sbid: u32) {
        if let Some(w) = lock(&self.watchers).remove(&sbid) {
            w.store(true, Ordering::SeqCst);
        }
    }

    fn stop_vm(&self, t: &Target, mode: StopMode) -> Result<(), ApiError> {
        let (path, form) = match mode {
            StopMode::Hard => (t.path("/status/stop"), Form::new()),
            StopMode::Graceful { grace } => (
                t.path("/status/shutdown"),
                Form::new()
                    .int("timeout", grace.as_secs().max(1) as i64)
                    .bool("forceStop", true),
            ),
        };
        match pve::vm_task(
            &self.api,
            Method::Post,
            &path,
            &form,
            self.deadline(),
            self.limits.task,
        ) {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn destroy_vm(&self, t: &Target) -> Result<(), ApiError> {
        self.stop_vm(t, StopMode::Hard)?;
        let form = Form::new()
            .bool("purge", true)
            .bool("destroy-unreferenced-disks", true);
        match pve::vm_task(
            &self.api,
            Method::Delete,
            &t.path(""),
            &form,
            self.deadline(),
            self.limits.task,
        ) {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn target(&self, sb: &Sandbox) -> Result<Target, BackendError> {
        Target::of(sb).ok_or_else(|| {
            BackendError::user(format!(
                "sandbox {} has no Proxmox VM (it was never provisioned)",
                sb.vmid
            ))
        })
    }

    fn target_of_vmid(&self, sbid: u32) -> Result<Target, BackendError> {
        let all = pve::resources(&self.api).map_err(api_err)?;
        let name = format!("agentlab-{sbid}");
        all.iter()
            .find(|r| r.name.as_deref() == Some(name.as_str()) && !r.template)
            .map(|r| Target {
                node: r.node.clone(),
                vmid: r.vmid as u32,
            })
            .ok_or_else(|| {
                BackendError::user(format!("sandbox {sbid}: no Proxmox VM named {name}"))
            })
    }

    fn status_details(&self) -> (String, Vec<(String, String)>) {
        let mut d = Vec::new();
        let version = match self.api.get::<pve::Version>("/version", &Form::new()) {
            Ok(v) => {
                d.push((
                    "cluster".into(),
                    format!("reachable at {}", self.api.base()),
                ));
                format!("Proxmox VE {}", v.version)
            }
            Err(e) => {
                d.push(("cluster".into(), format!("NOT reachable: {e}")));
                return ("unavailable".into(), d);
            }
        };
        d.push((
            "node".into(),
            match self.check_node() {
                Ok(()) => self
                    .cfg
                    .node
                    .clone()
                    .unwrap_or_else(|| "(any; the template's)".into()),
                Err(e) => e.to_string(),
            },
        ));
        d.push(("token privileges".into(), self.privileges_report()));
        let templates = match Profiles::load(&self.profiles_dir) {
            Ok(ps) => ps
                .list()
                .iter()
                .filter(|p| p.template_vmid.is_some())
                .map(|p| match self.find_template(p) {
                    Ok((node, tpl)) => format!("{}: template {tpl} found on {node}", p.name),
                    Err(e) => format!("{}: {e}", p.name),
                })
                .collect::<Vec<_>>()
                .join("; "),
            Err(e) => format!("profiles unreadable: {e}"),
        };
        d.push((
            "templates".into(),
            if templates.is_empty() {
                "no profile names a template_vmid".into()
            } else {
                templates
            },
        ));
        (version, d)
    }

    /// Checks the token holds what sandboxes need on `/vms` (endpoints.md §0.3).
    fn privileges_report(&self) -> String {
        let perms: HashMap<String, HashMap<String, serde_json::Value>> =
            match self.api.get("/access/permissions", &Form::new()) {
                Ok(p) => p,
                Err(e) => return format!("cannot read: {e}"),
            };
        let has = |p: &str| {
            ["/vms", "/"]
                .iter()
                .any(|path| perms.get(*path).is_some_and(|m| m.contains_key(p)))
        };
        let mut needed = vec![
            "VM.Clone",
            "VM.Allocate",
            "VM.Config.Options",
            "VM.Config.CPU",
            "VM.Config.Memory",
            "VM.Config.Network",
            "VM.PowerMgmt",
            "VM.Snapshot",
            "VM.Snapshot.Rollback",
            "VM.Audit",
        ];
        if self.major() >= 9 {
            needed.extend([
                "VM.GuestAgent.Unrestricted",
                "VM.GuestAgent.FileRead",
                "VM.GuestAgent.FileWrite",
            ]);
        } else {
            needed.push("VM.Monitor");
        }
        let missing: Vec<&str> = needed.into_iter().filter(|p| !has(p)).collect();
        if missing.is_empty() {
            "sufficient".into()
        } else {
            format!("MISSING on /vms: {}", missing.join(", "))
        }
    }
}

impl Backend for ProxmoxBackend {
    fn kind(&self) -> &'static str {
        "proxmox"
    }

    fn status(&self) -> BackendStatus {
        let (hypervisor_version, details) = self.status_details();
        BackendStatus {
            kind: "proxmox".into(),
            accel: "proxmox".into(),
            accel_reason: format!("VMs on the Proxmox VE cluster at {}", self.api.base()),
            hypervisor_version,
            details,
        }
    }

    fn check_profile(&self, profile: &Profile) -> Result<(), BackendError> {
        self.find_template(profile)?;
        self.check_group(profile.network.mode)
    }

    fn provision(
        &self,
        sb: &Sandbox,
        profile: &Profile,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Provisioned, BackendError> {
        let (node, tpl) = self.find_template(profile)?;
        self.check_group(profile.network.mode)?;
        progress(&format!("cloning template {tpl} on {node}"));
        let name = format!("agentlab-{}", sb.vmid);
        let spec = CloneSpec {
            node: &node,
            template: tpl,
            name: &name,
            full: self.cfg.clone_mode == CloneMode::Full,
            storage: self.cfg.storage.as_deref(),
        };
        let newid = pve::clone(
            &self.api,
            &self.ids,
            &spec,
            self.deadline(),
            self.limits.task,
        )
        .map_err(api_err)?;
        let t = Target {
            node: node.clone(),
            vmid: newid,
        };
        progress(&format!("configuring VM {newid}"));
        if let Err(e) = self.configure(&t, sb, profile) {
            // Nothing records the VM yet: remove it rather than leak it.
            let _ = self.destroy_vm(&t);
            return Err(api_err(e));
        }
        Ok(Provisioned {
            disk: Some(Disk {
                image: format!("template {tpl}"),
                base_path: format!("pve:{node}/{tpl}"),
                base_format: "proxmox".into(),
                overlay_path: format!("pve:{node}/{newid}"),
                virtual_size: 0,
            }),
            ready_on: "agent".into(),
        })
    }

    fn start(&self, sb: &Sandbox) -> Result<Runtime, BackendError> {
        let t = self.target(sb)?;
        let r = pve::vm_task(
            &self.api,
            Method::Post,
            &t.path("/status/start"),
            &Form::new(),
            self.deadline(),
            self.limits.task,
        );
        match r {
            Ok(_) => {}
            Err(e) if e.message().contains("already running") => {}
            Err(e) => return Err(api_err(e)),
        }
        self.watch(sb.vmid, t.clone());
        Ok(runtime(&t))
    }

    fn stop(&self, sb: &Sandbox, mode: StopMode) -> Result<(), BackendError> {
        self.unwatch(sb.vmid);
        let Some(t) = Target::of(sb) else {
            return Ok(());
        };
        self.stop_vm(&t, mode).map_err(api_err)
    }

    fn revert(&self, sb: &Sandbox) -> Result<(), BackendError> {
        let t = self.target(sb)?;
        if !self.has_clean(&t).map_err(api_err)? {
            return Err(BackendError::user(format!(
                "sandbox {} has no {CLEAN_SNAPSHOT} snapshot to revert to (it never became READY)",
                sb.vmid
            )));
        }
        let path = t.path(&format!("/snapshot/{CLEAN_SNAPSHOT}/rollback"));
        pve::vm_task(
            &self.api,
            Method::Post,
            &path,
            &Form::new(),
            self.deadline(),
            self.limits.task,
        )
        .map(|_| ())
        .map_err(api_err)
    }

    fn destroy(&self, sb: &Sandbox) -> Result<(), BackendError> {
        self.unwatch(sb.vmid);
        let t = match Target::of(sb) {
            Some(t) => t,
            // Provisioning may have cloned before it was recorded.
            None => match self.target_of_vmid(sb.vmid) {
                Ok(t) => t,
                Err(_) => return Ok(()),
            },
        };
        self.destroy_vm(&t).map_err(api_err)
    }

    fn adopt(&self, sb: &Sandbox) -> Result<Adoption, BackendError> {
        let t = self.target(sb)?;
        match pve::status(&self.api, &t.node, t.vmid) {
            Ok(s) if s.status == "running" => {
                self.watch(sb.vmid, t.clone());
                Ok(Adoption::Running(runtime(&t)))
            }
            Ok(_) => Ok(Adoption::Gone),
            Err(e) if e.is_not_found() => Ok(Adoption::Gone),
            Err(e) => Err(api_err(e)),
        }
    }

    fn orphans(&self, live: &[Sandbox]) -> Vec<Orphan> {
        let Ok(all) = pve::resources(&self.api) else {
            return Vec::new();
        };
        let owned: Vec<Target> = live.iter().filter_map(Target::of).collect();
        all.iter()
            .filter(|r| !r.template)
            .filter(|r| {
                r.tags
                    .as_deref()
                    .is_some_and(|t| t.split([';', ',', ' ']).any(|x| x == TAG))
            })
            .filter(|r| {
                !owned
                    .iter()
                    .any(|o| i64::from(o.vmid) == r.vmid && o.node == r.node)
            })
            .filter(|r| {
                // A sandbox still provisioning owns its VM by name.
                let n = r.name.as_deref().unwrap_or("");
                !live.iter().any(|s| n == format!("agentlab-{}", s.vmid))
            })
            .map(|r| Orphan {
                kind: "proxmox-vm".into(),
                vmid: Some(r.vmid as u32),
                pid: None,
                path: Some(format!("pve:{}/{}", r.node, r.vmid)),
                why: format!(
                    "VM {} tagged {TAG} on {} belongs to no sandbox",
                    r.vmid, r.node
                ),
            })
            .collect()
    }

    fn remove_orphan(&self, orphan: &Orphan) -> Result<(), BackendError> {
        let t = orphan
            .path
            .as_deref()
            .and_then(parse_target)
            .ok_or_else(|| BackendError::user("not a Proxmox orphan"))?;
        self.destroy_vm(&t).map_err(api_err)
    }

    fn guest_api(&self) -> bool {
        true
    }

    fn exec_simple(
        &self,
        vmid: u32,
        spec: &ExecSpec,
        stdin: Option<Vec<u8>>,
    ) -> Result<ExecResult, BackendError> {
        let t = self.target_of_sandbox(vmid)?;
        agent::exec(
            &self.api,
            &t.node,
            t.vmid,
            self.major(),
            spec,
            stdin.as_deref(),
        )
        .map_err(api_err)
    }

    fn file_read(&self, vmid: u32, path: &str) -> Result<Vec<u8>, BackendError> {
        let t = self.target_of_sandbox(vmid)?;
        agent::file_read(&self.api, &t.node, t.vmid, path).map_err(api_err)
    }

    fn file_write(&self, vmid: u32, path: &str, data: &[u8]) -> Result<(), BackendError> {
        let t = self.target_of_sandbox(vmid)?;
        agent::file_write(&self.api, &t.node, t.vmid, path, data, self.major()).map_err(api_err)
    }
}

impl ProxmoxBackend {
    /// The VM of a running sandbox: its watcher knows it; else by name.
    fn target_of_sandbox(&self, sbid: u32) -> Result<Target, BackendError> {
        self.target_of_vmid(sbid)
    }
}

fn runtime(t: &Target) -> Runtime {
    Runtime {
        pid: t.vmid,
        pid_start_ticks: 0,
        accel: "proxmox".into(),
        run_dir: format!("pve:{}/{}", t.node, t.vmid),
        started_at: Timestamp::now(),
    }
}

/// Follows one running VM: pings its agent until it answers, takes the
/// `clean` snapshot the first time, reports ready, then reports the VM's end.
struct Watcher {
    api: Arc<Client>,
    sink: EventSink,
    every: Duration,
    task: Duration,
    stop: Arc<AtomicBool>,
    sbid: u32,
    t: Target,
}

impl Watcher {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn run(self) {
        let pid = self.t.vmid;
        while !self.stopped() {
            if agent::ping(&self.api, &self.t.node, self.t.vmid).is_ok() {
                break;
            }
            if self.vm_gone() {
                return;
            }
            sleep(self.every.min(Duration::from_millis(500)));
        }
        if self.stopped() {
            return;
        }
        if let Err(e) = self.ensure_clean() {
            crate::warn!(
                "sandbox {}: cannot take the {CLEAN_SNAPSHOT} snapshot: {e}",
                self.sbid
            );
        }
        if self.stopped() {
            return;
        }
        (self.sink)(
            self.sbid,
            VmEvent::Agent {
                pid,
                facts: self.facts(),
            },
        );
        (self.sink)(self.sbid, VmEvent::Ready { pid });
        while !self.stopped() {
            sleep(self.every);
            if !self.stopped() && self.vm_gone() {
                return;
            }
        }
    }

    /// True (after reporting it) when the VM no longer runs.
    fn vm_gone(&self) -> bool {
        let gone = match pve::status(&self.api, &self.t.node, self.t.vmid) {
            Ok(s) => s.status != "running",
            Err(e) => e.is_not_found(),
        };
        if gone && !self.stopped() {
            let info = super::ExitInfo {
                pid: self.t.vmid,
                reason: Some("the Proxmox VM is no longer running".into()),
                ..Default::default()
            };
            (self.sink)(self.sbid, VmEvent::Exited(info));
        }
        gone
    }

    fn ensure_clean(&self) -> Result<(), ApiError> {
        let snaps: Vec<Snapshot> = self.api.get(&self.t.path("/snapshot"), &Form::new())?;
        if snaps.iter().any(|s| s.name == CLEAN_SNAPSHOT) {
            return Ok(());
        }
        let form = Form::new()
            .str("snapname", CLEAN_SNAPSHOT)
            .str("description", "agentlab: state when first ready");
        let deadline = Instant::now() + Duration::from_secs(60);
        pve::vm_task(
            &self.api,
            Method::Post,
            &self.t.path("/snapshot"),
            &form,
            deadline,
            self.task,
        )
        .map(|_| ())
    }

    fn facts(&self) -> GuestFacts {
        let mac = pve::config(&self.api, &self.t.node, self.t.vmid)
            .ok()
            .and_then(|c| c.get("net0").and_then(|n| pve::mac_of(n)));
        let addresses = mac
            .and_then(|m| agent::addresses(&self.api, &self.t.node, self.t.vmid, &m).ok())
            .unwrap_or_default();
        GuestFacts {
            agent: "qemu-ga (through Proxmox)".into(),
            addresses,
            ..Default::default()
        }
    }
}
