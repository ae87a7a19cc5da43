//! The sandbox lifecycle manager: every state change goes through here.
//!
//! Each operation takes the sandbox's own lock, re-reads the record, checks
//! the action against the state machine (`model::check_action`), asks the
//! backend to do the work, and records the new state with its event in one
//! store write. Backends report what happens on their own (ready line, guest
//! poweroff, crash) through [`Manager::on_vm_event`], which takes the same
//! lock; every report names the VM process it came from, so an exit the
//! manager itself caused (the runtime is already cleared or replaced) is
//! not mistaken for a crash.
//!
//! Leases and boot deadlines are enforced by [`Manager::tick`]; what survives
//! a daemon restart is sorted out by `daemon::reconcile`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use super::bus::{Bus, BusItem};
use super::network::{NetError, Network};
use crate::api::types::{
    CreateRequest, ExposeRequest, PruneResponse, RenewResponse, RevertResponse, StatusResponse,
};
use crate::backend::{agent_api, Backend, BackendError, StopMode, VmEvent};
use crate::config::{Config, NetworkMode, Profile, Profiles};
use crate::image::default_guest::GuestAgent;
use crate::model::{self, check_action, Action, EventDraft, Exposure, Sandbox, State};
use crate::qga::client::AgentError;
use crate::qga::session::{Exec, ExecSpec, Session};
use crate::qga::wire::TarDone;
use crate::store::{Store, StoreError};
use crate::time::{parse_duration, Timestamp};

/// What went wrong, sorted by who must act: 4xx the caller, 5xx the host.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    WrongState(#[from] model::StateError),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    /// Try again shortly (the guest agent is restarting, or busy).
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Host(String),
}

impl OpError {
    pub fn status(&self) -> u16 {
        match self {
            OpError::NotFound(_) => 404,
            OpError::BadRequest(_) => 400,
            OpError::WrongState(_) | OpError::Conflict(_) => 409,
            OpError::MethodNotAllowed(_) => 405,
            OpError::Unavailable(_) => 503,
            OpError::Host(_) => 500,
        }
    }
}

impl From<StoreError> for OpError {
    fn from(e: StoreError) -> OpError {
        OpError::Host(crate::log::error_chain(&e))
    }
}

impl From<NetError> for OpError {
    fn from(e: NetError) -> OpError {
        match e {
            NetError::User(msg) => OpError::BadRequest(msg),
            other => OpError::Host(other.to_string()),
        }
    }
}

impl From<BackendError> for OpError {
    fn from(e: BackendError) -> OpError {
        let msg = crate::log::error_chain(&e);
        if e.is_user_error() {
            OpError::BadRequest(msg)
        } else {
            OpError::Host(msg)
        }
    }
}

pub struct Manager {
    cfg: Config,
    store: Store,
    backend: Arc<dyn Backend>,
    /// The local sandbox network; `None` when the backend brings its own.
    net: Option<Arc<Network>>,
    bus: Bus,
    locks: Mutex<HashMap<u32, Arc<Mutex<()>>>>,
    /// Execs running per sandbox (READY while none, RUNNING while some).
    execs: Mutex<HashMap<u32, usize>>,
    /// Serialises creates: name uniqueness and VMID allocation.
    create_lock: Mutex<()>,
    /// Held across event-id allocation, store write and publish, so live
    /// streams see events in id order and `?after=` polling misses none.
    log: Mutex<()>,
    /// Bumped on every record change; waiters sleep on it.
    changed: (Mutex<u64>, Condvar),
    started_at: Timestamp,
    started: Instant,
}

impl Manager {
    pub fn new(
        cfg: Config,
        store: Store,
        backend: Arc<dyn Backend>,
        net: Option<Arc<Network>>,
        bus: Bus,
    ) -> Manager {
        Manager {
            cfg,
            store,
            backend,
            net,
            bus,
            locks: Mutex::new(HashMap::new()),
            log: Mutex::new(()),
            create_lock: Mutex::new(()),
            execs: Mutex::new(HashMap::new()),
            changed: (Mutex::new(0), Condvar::new()),
            started_at: Timestamp::now(),
            started: Instant::now(),
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The sandbox network, or why there is none.
    pub fn network(&self) -> Result<&Arc<Network>, OpError> {
        self.net.as_ref().ok_or_else(|| {
            OpError::BadRequest(format!(
                "the {} backend has no agentlab-managed network",
                self.backend.kind()
            ))
        })
    }

    /// `sandbox expose`: the sandbox must exist and not be destroyed.
    pub fn expose(&self, id: &str, req: ExposeRequest) -> Result<Exposure, OpError> {
        let sb = self.find(id)?;
        if sb.state == State::Destroyed {
            return Err(OpError::Conflict(format!(
                "sandbox {} is destroyed",
                sb.vmid
            )));
        }
        let port = req
            .port
            .filter(|p| *p > 0)
            .ok_or_else(|| OpError::BadRequest("port: give the guest port, 1-65535".into()))?;
        Ok(self
            .network()?
            .expose(&sb, port, req.host_port, req.bind, req.name)?)
    }

    pub(crate) fn lock_of(&self, vmid: u32) -> Arc<Mutex<()>> {
        lock(&self.locks).entry(vmid).or_default().clone()
    }

    /// Writes the record and its event, then tells everyone who listens.
    pub(crate) fn record(&self, sb: &Sandbox, draft: EventDraft) -> Result<(), OpError> {
        let ev = {
            let _log = lock(&self.log);
            let ev = self.store.write(sb, None, draft)?;
            self.bus.publish(BusItem::Event(ev.clone()));
            ev
        };
        crate::info!("sandbox {}: {} ({})", sb.vmid, ev.msg, sb.state);
        let (m, cv) = &self.changed;
        *lock(m) += 1;
        cv.notify_all();
        Ok(())
    }

    /// Appends an event that changes no record (progress, daemon start…).
    pub(crate) fn append(&self, draft: EventDraft) {
        let _log = lock(&self.log);
        match self.store.append_event(draft) {
            Ok(ev) => self.bus.publish(BusItem::Event(ev)),
            Err(e) => crate::warn!("cannot record an event: {e}"),
        }
    }

    /// Moves `sb` to `to` and records it. Refuses transitions the table forbids.
    pub(crate) fn transition(&self, sb: &mut Sandbox, to: State, msg: &str) -> Result<(), OpError> {
        let from = sb.state;
        if from != to && !from.can_become(to) {
            return Err(OpError::Host(format!(
                "sandbox {}: internal error: {from} cannot become {to}",
                sb.vmid
            )));
        }
        sb.state = to;
        sb.updated_at = Timestamp::now();
        self.record(sb, EventDraft::transition(sb.vmid, from, to, msg))
    }

    pub(crate) fn note(&self, sb: &Sandbox, kind: &str, msg: &str, data: serde_json::Value) {
        self.append(EventDraft::new(Some(sb.vmid), kind, msg).with_data(data));
    }

    /// `1000` or a name → the sandbox record.
    pub fn find(&self, id: &str) -> Result<Sandbox, OpError> {
        let found = match id.parse::<u32>() {
            Ok(vmid) => self.store.get(vmid)?,
            Err(_) => self
                .store
                .list()?
                .into_iter()
                .filter(|s| s.name == id)
                .max_by_key(|s| (s.state != State::Destroyed, s.vmid)),
        };
        found.ok_or_else(|| {
            OpError::NotFound(format!(
                "no sandbox {id:?}; `agentlab sandbox list` shows the ones that exist"
            ))
        })
    }

    pub fn list(&self, all: bool) -> Result<Vec<Sandbox>, OpError> {
        Ok(self
            .store
            .list()?
            .into_iter()
            .filter(|s| all || s.state != State::Destroyed)
            .collect())
    }

    pub fn profiles(&self) -> Result<Profiles, OpError> {
        Profiles::load(&self.cfg.profiles_dir)
            .map_err(|e| OpError::BadRequest(crate::log::error_chain(&e)))
    }

    // ---- create -------------------------------------------------------

    pub fn create(self: &Arc<Self>, req: CreateRequest) -> Result<Sandbox, OpError> {
        let profiles = self.profiles()?;
        let profile = profiles
            .resolve(req.profile.as_deref(), &req.modifiers)
            .map_err(|e| OpError::BadRequest(crate::log::error_chain(&e)))?
            .clone();
        let profile = match &req.image {
            Some(image) => Profile {
                image: image.clone(),
                ..profile
            },
            None => profile,
        };
        let ttl = self.ttl_for(&req, &profile)?;
        if let Some(name) = &req.name {
            model::validate_name(name).map_err(OpError::BadRequest)?;
        }
        self.backend.check_profile(&profile)?;
        let sb = {
            // The name check and the record must not interleave with another create.
            let _g = lock(&self.create_lock);
            if let Some(name) = &req.name {
                if self.list(false)?.iter().any(|s| &s.name == name) {
                    return Err(OpError::Conflict(format!(
                        "a sandbox named {name:?} already exists"
                    )));
                }
            }
            let mut sb = new_record(
                self.store.allocate_vmid()?,
                &req,
                &profile,
                ttl,
                self.backend.kind(),
            );
            if self.net.is_some() && profile.network.mode != NetworkMode::Off {
                sb.ip = Some(self.allocate_ip(sb.vmid)?.to_string());
            }
            let data = json!({"profile": profile.name, "ttl_seconds": sb.ttl_seconds, "keepalive": sb.keepalive});
            let msg = format!("requested with profile {}", profile.name);
            self.record(
                &sb,
                EventDraft::new(Some(sb.vmid), "sandbox.state", msg).with_data(data),
            )?;
            sb
        };
        let (me, vmid) = (self.clone(), sb.vmid);
        std::thread::Builder::new()
            .name(format!("provision-{vmid}"))
            .spawn(move || me.provision_and_boot(vmid, &profile))
            .map_err(|e| OpError::Host(format!("cannot start provisioning: {e}")))?;
        if req.wait {
            let deadline = self.cfg.provisioning_timeout + self.cfg.boot_timeout;
            return self.wait_settled(vmid, deadline);
        }
        Ok(sb)
    }

    /// A free address in the sandbox subnet (caller holds `create_lock`).
    fn allocate_ip(&self, vmid: u32) -> Result<std::net::Ipv4Addr, OpError> {
        let used: std::collections::HashSet<std::net::Ipv4Addr> = self
            .list(false)?
            .iter()
            .filter_map(|s| s.ip.as_deref()?.parse().ok())
            .collect();
        crate::net::pick_ip(self.cfg.network.gateway, vmid, &used).ok_or_else(|| {
            OpError::Conflict(format!(
                "the sandbox subnet {} is full; destroy sandboxes or widen `subnet` in config.yaml",
                self.cfg.network.subnet()
            ))
        })
    }

    /// `ttl` or `ttl_minutes` from the request, else the profile's default,
    /// else the config's `default_ttl`, else none.
    fn ttl_for(&self, req: &CreateRequest, profile: &Profile) -> Result<Option<Duration>, OpError> {
        let ttl = match (&req.ttl, req.ttl_minutes) {
            (Some(_), Some(_)) => {
                return Err(OpError::BadRequest(
                    "give ttl or ttl_minutes, not both".into(),
                ))
            }
            (Some(t), None) => {
                Some(parse_duration(t).map_err(|e| OpError::BadRequest(format!("--ttl: {e}")))?)
            }
            (None, Some(m)) => Some(Duration::from_secs(m.saturating_mul(60))),
            (None, None) => profile
                .behavior
                .ttl_minutes_default
                .filter(|m| *m > 0)
                .map(|m| Duration::from_secs(u64::from(m) * 60))
                .or(self.cfg.default_ttl),
        };
        if ttl.is_some_and(|t| t.is_zero()) {
            return Err(OpError::BadRequest("a TTL must be longer than zero".into()));
        }
        Ok(ttl)
    }

    fn provision_and_boot(&self, vmid: u32, profile: &Profile) {
        let l = self.lock_of(vmid);
        let _g = lock(&l);
        let Ok(Some(mut sb)) = self.store.get(vmid) else {
            return;
        };
        if sb.state != State::Requested {
            return;
        }
        if let Err(e) = self.provision_locked(&mut sb, profile) {
            self.fail(&mut sb, &e.to_string());
            return;
        }
        if let Err(e) = self.boot_locked(&mut sb) {
            self.fail(&mut sb, &e.to_string());
        }
    }

    fn provision_locked(&self, sb: &mut Sandbox, profile: &Profile) -> Result<(), OpError> {
        self.transition(sb, State::Provisioning, "provisioning")?;
        let started = Instant::now();
        if let Some(net) = &self.net {
            net.join(sb)?;
        }
        let mut progress =
            |line: &str| self.note(sb, "sandbox.progress", line, serde_json::Value::Null);
        let made = self
            .backend
            .provision(&sb.clone(), profile, &mut progress)?;
        sb.disk = made.disk;
        sb.ready_on = made.ready_on;
        sb.updated_at = Timestamp::now();
        let data = json!({"duration_ms": started.elapsed().as_millis() as u64, "disk": sb.disk});
        self.record(
            sb,
            EventDraft::new(Some(sb.vmid), "sandbox.provisioned", "disk ready").with_data(data),
        )
    }

    /// Starts the VM of a sandbox whose lock the caller holds.
    fn boot_locked(&self, sb: &mut Sandbox) -> Result<(), OpError> {
        self.transition(sb, State::Booting, "booting")?;
        let rt = self.backend.start(sb)?;
        sb.runtime = Some(rt.clone());
        sb.last_error = None;
        sb.updated_at = Timestamp::now();
        let msg = format!("hypervisor started (pid {}, {})", rt.pid, rt.accel);
        self.record(
            sb,
            EventDraft::new(Some(sb.vmid), "sandbox.runtime", msg).with_data(json!(rt)),
        )?;
        if sb.ready_on == "running" {
            self.transition(
                sb,
                State::Ready,
                "ready (no readiness signal for this image: running counts)",
            )?;
        }
        Ok(())
    }

    pub(crate) fn fail(&self, sb: &mut Sandbox, why: &str) {
        crate::error!("sandbox {}: {why}", sb.vmid);
        // Whatever half-started must not keep running behind a FAILED record.
        if let Err(e) = self.backend.stop(sb, StopMode::Hard) {
            crate::warn!("sandbox {}: cleanup after failure: {e}", sb.vmid);
        }
        sb.runtime = None;
        sb.last_error = Some(why.to_string());
        if let Err(e) = self.transition(sb, State::Failed, why) {
            crate::error!("sandbox {}: cannot record failure: {e}", sb.vmid);
        }
    }

    /// Waits until the sandbox is READY or can no longer get there.
    pub fn wait_settled(&self, vmid: u32, timeout: Duration) -> Result<Sandbox, OpError> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &self.changed;
        let mut gen = lock(m);
        loop {
            let sb = self.find(&vmid.to_string())?;
            let settled = matches!(
                sb.state,
                State::Ready
                    | State::Running
                    | State::Completed
                    | State::Failed
                    | State::Stopped
                    | State::Timeout
                    | State::Destroyed
            );
            if settled {
                return Ok(sb);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(OpError::Host(format!(
                    "sandbox {vmid} is still {} after {timeout:?}; see `agentlab logs {vmid}`",
                    sb.state
                )));
            }
            gen = cv
                .wait_timeout(gen, left.min(Duration::from_secs(1)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    // ---- user operations on one sandbox -------------------------------

    pub fn start(&self, id: &str, wait: bool) -> Result<Sandbox, OpError> {
        let vmid = self.find(id)?.vmid;
        {
            let l = self.lock_of(vmid);
            let _g = lock(&l);
            let mut sb = self.find(id)?;
            check_action(vmid, sb.state, Action::Start, false)?;
            if sb.disk.is_none() {
                let profile: Profile = serde_json::from_value(sb.spec.clone()).map_err(|e| {
                    OpError::Host(format!("sandbox {vmid}: stored profile unreadable: {e}"))
                })?;
                self.provision_locked(&mut sb, &profile)
                    .inspect_err(|e| self.fail(&mut sb, &e.to_string()))?;
            }
            if let Err(e) = self.boot_locked(&mut sb) {
                self.fail(&mut sb, &e.to_string());
                return Err(e);
            }
        }
        self.maybe_wait(vmid, wait)
    }

    fn maybe_wait(&self, vmid: u32, wait: bool) -> Result<Sandbox, OpError> {
        if wait {
            self.wait_settled(vmid, self.cfg.boot_timeout)
        } else {
            self.find(&vmid.to_string())
        }
    }

    pub fn stop(&self, id: &str, force: bool) -> Result<Sandbox, OpError> {
        let vmid = self.find(id)?.vmid;
        let l = self.lock_of(vmid);
        let _g = lock(&l);
        let mut sb = self.find(id)?;
        check_action(vmid, sb.state, Action::Stop, force)?;
        let mode = if force {
            StopMode::Hard
        } else {
            StopMode::Graceful {
                grace: self.cfg.stop_timeout,
            }
        };
        let r = self.backend.stop(&sb, mode);
        r?;
        sb.runtime = None;
        self.transition(
            &mut sb,
            State::Stopped,
            if force { "stopped (forced)" } else { "stopped" },
        )?;
        Ok(sb)
    }

    pub fn destroy(&self, id: &str, force: bool) -> Result<Sandbox, OpError> {
        let vmid = self.find(id)?.vmid;
        let l = self.lock_of(vmid);
        let _g = lock(&l);
        let mut sb = self.find(id)?;
        check_action(vmid, sb.state, Action::Destroy, force)?;
        self.destroy_locked(&mut sb, force, "destroyed")?;
        Ok(sb)
    }

    pub(crate) fn destroy_locked(
        &self,
        sb: &mut Sandbox,
        force: bool,
        msg: &str,
    ) -> Result<(), OpError> {
        let r = self
            .backend
            .destroy(sb)
            .map_err(OpError::from)
            .and_then(|()| match &self.net {
                Some(net) => net.leave(sb.vmid).map_err(OpError::from),
                None => Ok(()),
            });
        match r {
            Ok(()) => {}
            Err(e) if force => {
                let why = e.to_string();
                crate::warn!("sandbox {}: destroy left something behind ({why}); `agentlab sandbox prune` removes it", sb.vmid);
                sb.last_error = Some(why);
            }
            Err(e) => return Err(e),
        }
        sb.runtime = None;
        sb.disk = None;
        self.transition(sb, State::Destroyed, msg)
    }

    pub fn revert(
        &self,
        id: &str,
        force: bool,
        restart: Option<bool>,
        wait: bool,
    ) -> Result<RevertResponse, OpError> {
        let vmid = self.find(id)?.vmid;
        let (was_running, restarted) = {
            let l = self.lock_of(vmid);
            let _g = lock(&l);
            let mut sb = self.find(id)?;
            check_action(vmid, sb.state, Action::Revert, force)?;
            self.revert_locked(&mut sb, restart)?
        };
        Ok(RevertResponse {
            snapshot: "clean".to_string(),
            was_running,
            restarted,
            sandbox: self.maybe_wait(vmid, wait && restarted)?,
        })
    }

    /// Stops the VM if it runs, puts a clean disk in place (a fresh overlay,
    /// or a first one for a sandbox that never got a disk), and restarts it
    /// if asked (default: if it was running). Returns (was_running, restarted).
    fn revert_locked(
        &self,
        sb: &mut Sandbox,
        restart: Option<bool>,
    ) -> Result<(bool, bool), OpError> {
        let was_running = sb.state.vm_expected();
        if was_running {
            self.backend.stop(sb, StopMode::Hard)?;
            sb.runtime = None;
            self.transition(sb, State::Stopped, "stopped for revert")?;
        }
        if sb.disk.is_none() {
            let profile: Profile = serde_json::from_value(sb.spec.clone()).map_err(|e| {
                OpError::Host(format!(
                    "sandbox {}: stored profile unreadable: {e}",
                    sb.vmid
                ))
            })?;
            if let Err(e) = self.provision_locked(sb, &profile) {
                self.fail(sb, &e.to_string());
                return Err(e);
            }
        } else {
            let started = Instant::now();
            self.backend.revert(sb)?;
            let us = started.elapsed().as_micros() as u64;
            self.note(
                sb,
                "sandbox.revert",
                "disk reverted to clean",
                json!({"duration_us": us}),
            );
        }
        if matches!(sb.state, State::Failed | State::Provisioning) {
            sb.last_error = None;
            self.transition(sb, State::Stopped, "reverted; ready to start")?;
        }
        let restart = restart.unwrap_or(was_running);
        if restart {
            if let Err(e) = self.boot_locked(sb) {
                self.fail(sb, &e.to_string());
                return Err(e);
            }
        }
        Ok((was_running, restart))
    }

    pub fn renew(&self, id: &str, ttl: Duration) -> Result<RenewResponse, OpError> {
        if ttl.is_zero() {
            return Err(OpError::BadRequest("a TTL must be longer than zero".into()));
        }
        let vmid = self.find(id)?.vmid;
        let l = self.lock_of(vmid);
        let _g = lock(&l);
        let mut sb = self.find(id)?;
        check_action(vmid, sb.state, Action::RenewLease, false)?;
        if !sb.state.is_live() {
            return Err(OpError::Conflict(format!(
                "sandbox {vmid} is {}; its lease cannot be renewed",
                sb.state
            )));
        }
        let at = Timestamp::now().plus(ttl);
        sb.lease_expires_at = Some(at);
        sb.ttl_seconds = Some(ttl.as_secs());
        sb.updated_at = Timestamp::now();
        self.record(
            &sb,
            EventDraft::new(
                Some(vmid),
                "sandbox.lease",
                format!("lease renewed until {at}"),
            )
            .with_data(json!({"ttl_seconds": ttl.as_secs()})),
        )?;
        Ok(RenewResponse {
            vmid,
            lease_expires_at: Some(at.to_string()),
            keepalive: sb.keepalive,
        })
    }

    /// Builds the default guest (or its variant running `agent`); a rebuild
    /// would swap the base under live overlays, so `force` is refused while
    /// any sandbox uses that image.
    pub fn build_default_image(
        &self,
        agent: GuestAgent,
        force: bool,
    ) -> Result<Vec<String>, OpError> {
        let image = agent.image_name();
        if force {
            let users: Vec<String> = self
                .list(false)?
                .iter()
                .filter(|s| s.disk.as_ref().is_some_and(|d| d.image == image))
                .map(|s| s.vmid.to_string())
                .collect();
            if !users.is_empty() {
                return Err(OpError::Conflict(format!(
                    "sandboxes {} use the {image} image; destroy them before rebuilding it",
                    users.join(", ")
                )));
            }
        }
        let mut lines = Vec::new();
        self.backend
            .build_default_image(agent, force, &mut |l| lines.push(l.to_string()))?;
        Ok(lines)
    }

    /// Starts a command in the guest. The sandbox is RUNNING until the
    /// returned `Busy` (and every other exec's) is dropped.
    pub fn exec_start(
        self: &Arc<Self>,
        id: &str,
        spec: &ExecSpec,
        stdin_data: Option<Vec<u8>>,
    ) -> Result<(Exec, Busy), OpError> {
        if let Some(vmid) = self.guest_api_of(id)? {
            let busy = self.busy(vmid)?;
            let r = self.backend.exec_simple(vmid, spec, stdin_data)?;
            return Ok((Exec::finished(r.into_outputs()), busy));
        }
        let (vmid, session) = self.guest_of(id)?;
        let busy = self.busy(vmid)?;
        let exec = session.exec(spec, stdin_data).map_err(agent_error)?;
        Ok((exec, busy))
    }

    /// Streams a tar of the guest's `path` into `sink`.
    pub fn tar_out(
        self: &Arc<Self>,
        id: &str,
        path: &str,
        sink: &mut dyn std::io::Write,
        progress: &mut dyn FnMut(u64),
    ) -> Result<TarDone, OpError> {
        if let Some(vmid) = self.guest_api_of(id)? {
            let _busy = self.busy(vmid)?;
            return Ok(agent_api::tar_out(&*self.backend, vmid, path, sink)?);
        }
        let (vmid, session) = self.guest_of(id)?;
        let _busy = self.busy(vmid)?;
        session.tar_out(path, sink, progress).map_err(agent_error)
    }

    /// Extracts the tar from `source` into the guest's `path` (docker-cp rules).
    pub fn tar_in(
        self: &Arc<Self>,
        id: &str,
        path: &str,
        root: &str,
        source: &mut dyn std::io::Read,
        progress: &mut dyn FnMut(u64),
    ) -> Result<TarDone, OpError> {
        if let Some(vmid) = self.guest_api_of(id)? {
            let _busy = self.busy(vmid)?;
            return Ok(agent_api::tar_in(&*self.backend, vmid, path, root, source)?);
        }
        let (vmid, session) = self.guest_of(id)?;
        let _busy = self.busy(vmid)?;
        session
            .tar_in(path, root, source, progress)
            .map_err(agent_error)
    }

    /// The serial console's raw output from now on (and the VMID).
    pub fn console_attach(
        &self,
        id: &str,
    ) -> Result<(u32, std::sync::mpsc::Receiver<Vec<u8>>), OpError> {
        let sb = self.find(id)?;
        if !sb.state.vm_expected() {
            return Err(OpError::Conflict(format!(
                "sandbox {} is {}; start it first",
                sb.vmid, sb.state
            )));
        }
        Ok((sb.vmid, self.backend.console_attach(sb.vmid)?))
    }

    /// For a backend that runs commands through its own agent API
    /// (`Backend::guest_api`, Proxmox): the sandbox, if it may exec now.
    fn guest_api_of(&self, id: &str) -> Result<Option<u32>, OpError> {
        if !self.backend.guest_api() {
            return Ok(None);
        }
        let sb = self.find(id)?;
        check_action(sb.vmid, sb.state, Action::Exec, false)?;
        Ok(Some(sb.vmid))
    }

    fn guest_of(&self, id: &str) -> Result<(u32, Arc<Session>), OpError> {
        let sb = self.find(id)?;
        check_action(sb.vmid, sb.state, Action::Exec, false)?;
        Ok((sb.vmid, self.backend.guest(sb.vmid)?))
    }

    /// Counts an exec in; the first makes the sandbox RUNNING.
    fn busy(self: &Arc<Self>, vmid: u32) -> Result<Busy, OpError> {
        let first = {
            let mut e = lock(&self.execs);
            let n = e.entry(vmid).or_insert(0);
            *n += 1;
            *n == 1
        };
        if first {
            self.set_running(vmid, true);
        }
        Ok(Busy {
            m: self.clone(),
            vmid,
        })
    }

    /// READY↔RUNNING around execs. Not flushed: after a crash it does not
    /// matter which of the two a sandbox was in.
    fn set_running(&self, vmid: u32, running: bool) {
        let l = self.lock_of(vmid);
        let _g = lock(&l);
        let Ok(Some(mut sb)) = self.store.get(vmid) else {
            return;
        };
        let (from, to, msg) = match (running, sb.state) {
            (true, State::Ready | State::Completed) => {
                (sb.state, State::Running, "running a command")
            }
            (false, State::Running) => (sb.state, State::Ready, "idle"),
            _ => return,
        };
        sb.state = to;
        sb.updated_at = Timestamp::now();
        let _log = lock(&self.log);
        if let Ok(ev) = self.store.write_with(
            &sb,
            None,
            EventDraft::transition(vmid, from, to, msg),
            false,
        ) {
            self.bus.publish(BusItem::Event(ev));
        }
    }

    /// Whether the sandbox runs agentlab's agent (streaming) or a stock qemu-ga.
    pub fn agent_extended(&self, id: &str) -> Result<bool, OpError> {
        if self.guest_api_of(id)?.is_some() {
            return Ok(false);
        }
        Ok(self.guest_of(id)?.1.info().extended)
    }

    /// Raw bytes typed into a sandbox's console (an attached session).
    pub fn console_bytes(&self, vmid: u32, data: &[u8]) -> Result<(), OpError> {
        self.backend.console_write(vmid, data)?;
        Ok(())
    }

    pub fn console_input(&self, id: &str, data: &str) -> Result<(), OpError> {
        let sb = self.find(id)?;
        if !sb.state.vm_expected() {
            return Err(OpError::Conflict(format!(
                "sandbox {} is {}; start it first",
                sb.vmid, sb.state
            )));
        }
        self.backend.console_write(sb.vmid, data.as_bytes())?;
        Ok(())
    }

    pub fn prune(&self, dry_run: bool) -> Result<PruneResponse, OpError> {
        let candidates = self.backend.orphans(&self.list(false)?);
        if dry_run {
            return Ok(PruneResponse {
                dry_run,
                orphans: candidates,
                failed: Vec::new(),
                forgotten: Vec::new(),
            });
        }
        let (mut removed, mut failed, mut forgotten) = (Vec::new(), Vec::new(), Vec::new());
        for o in candidates {
            // Re-check under the sandbox's lock: a sandbox created or booting
            // since the scan owns what looked orphaned. Busy ones wait for
            // the next prune.
            let l = o.vmid.map(|v| self.lock_of(v));
            let _g = match &l {
                Some(l) => match try_lock(l) {
                    Some(g) => Some(g),
                    None => continue,
                },
                None => None,
            };
            if !self.backend.orphans(&self.list(false)?).contains(&o) {
                continue;
            }
            match self.backend.remove_orphan(&o) {
                Ok(()) => removed.push(o),
                Err(e) => failed.push(crate::log::error_chain(&e)),
            }
        }
        for sb in self
            .list(true)?
            .into_iter()
            .filter(|s| s.state == State::Destroyed)
        {
            let l = self.lock_of(sb.vmid);
            let Some(_g) = try_lock(&l) else { continue };
            self.store.remove(sb.vmid)?;
            forgotten.push(sb.vmid);
        }
        let msg = format!(
            "pruned {} orphans, forgot {} destroyed sandboxes",
            removed.len(),
            forgotten.len()
        );
        self.append(EventDraft::new(None, "daemon.prune", msg));
        Ok(PruneResponse {
            dry_run,
            orphans: removed,
            failed,
            forgotten,
        })
    }

    pub fn status(&self, socket: &str) -> Result<StatusResponse, OpError> {
        let all = self.list(true)?;
        let mut counts = BTreeMap::new();
        for s in &all {
            *counts.entry(s.state.as_str().to_string()).or_insert(0) += 1;
        }
        let live: Vec<Sandbox> = all
            .into_iter()
            .filter(|s| s.state != State::Destroyed)
            .collect();
        Ok(StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            started_at: self.started_at.to_string(),
            uptime_seconds: self.started.elapsed().as_secs(),
            socket: socket.to_string(),
            data_dir: self.cfg.data_dir.display().to_string(),
            backend: self.backend.status(),
            sandboxes: counts,
            orphans: self.backend.orphans(&live),
            rss_bytes: crate::sys::process::rss_bytes(std::process::id()),
        })
    }

    // ---- what backends report -------------------------------------------

    pub fn on_vm_event(&self, vmid: u32, ev: VmEvent) {
        match ev {
            VmEvent::Console(line) => self.bus.publish(BusItem::Console {
                vmid,
                ts: Timestamp::now(),
                line,
            }),
            VmEvent::Agent { pid, facts } => {
                let l = self.lock_of(vmid);
                let _g = lock(&l);
                let Ok(Some(mut sb)) = self.store.get(vmid) else {
                    return;
                };
                if current_pid(&sb) != Some(pid) {
                    return;
                }
                let msg = format!(
                    "guest agent answers: {} on {} ({})",
                    facts.agent,
                    if facts.os.is_empty() {
                        "an unknown OS"
                    } else {
                        &facts.os
                    },
                    facts.kernel
                );
                sb.guest = Some(facts);
                sb.updated_at = Timestamp::now();
                let _ = self.record(&sb, EventDraft::new(Some(vmid), "sandbox.agent", msg));
            }
            VmEvent::Ready { pid } => {
                let l = self.lock_of(vmid);
                let _g = lock(&l);
                let Ok(Some(mut sb)) = self.store.get(vmid) else {
                    return;
                };
                if sb.state == State::Booting && current_pid(&sb) == Some(pid) {
                    let ms = sb
                        .runtime
                        .as_ref()
                        .map(|r| Timestamp::now().millis() - r.started_at.millis())
                        .unwrap_or(0);
                    let _ = self.transition(
                        &mut sb,
                        State::Ready,
                        &format!("ready (guest up in {ms} ms)"),
                    );
                }
            }
            VmEvent::Exited(info) => {
                let l = self.lock_of(vmid);
                let _g = lock(&l);
                let Ok(Some(mut sb)) = self.store.get(vmid) else {
                    return;
                };
                // An exit an operation caused (stop, revert, destroy) finds the
                // runtime already cleared or replaced by then: not news.
                if !sb.state.vm_expected() || current_pid(&sb) != Some(info.pid) {
                    return;
                }
                sb.runtime = None;
                self.note(
                    &sb,
                    "sandbox.exit",
                    &format!("hypervisor exited: {}", info.describe()),
                    json!(info),
                );
                let r = if info.clean_guest_shutdown() {
                    self.transition(&mut sb, State::Stopped, "guest powered off")
                } else {
                    let why = format!("hypervisor exited unexpectedly: {}", info.describe());
                    sb.last_error = Some(why.clone());
                    self.transition(&mut sb, State::Failed, &why)
                };
                if let Err(e) = r {
                    crate::error!("sandbox {vmid}: cannot record exit: {e}");
                }
            }
        }
    }
}

/// A freshly requested sandbox record.
fn new_record(
    vmid: u32,
    req: &CreateRequest,
    profile: &Profile,
    ttl: Option<Duration>,
    backend: &str,
) -> Sandbox {
    let now = Timestamp::now();
    Sandbox {
        vmid,
        name: req.name.clone().unwrap_or_else(|| format!("sbx-{vmid}")),
        profile: profile.name.clone(),
        state: State::Requested,
        backend: backend.to_string(),
        keepalive: req.keepalive.unwrap_or(profile.behavior.keepalive_default),
        ttl_seconds: ttl.map(|t| t.as_secs()),
        lease_expires_at: ttl.map(|t| now.plus(t)),
        created_at: now,
        updated_at: now,
        resources: model::Resources {
            cores: profile.resources.cores,
            memory_mb: profile.resources.memory_mb,
        },
        ready_on: String::new(),
        disk: None,
        runtime: None,
        mac: model::mac_for(vmid),
        ip: None,
        last_error: None,
        guest: None,
        spec: serde_json::to_value(profile).unwrap_or_default(),
    }
}

fn current_pid(sb: &Sandbox) -> Option<u32> {
    sb.runtime.as_ref().map(|r| r.pid)
}

/// The lock if nobody holds it (a poisoned lock is still usable).
pub(crate) fn try_lock<T>(m: &Mutex<T>) -> Option<std::sync::MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

/// Marks a sandbox busy with an exec or a copy until dropped.
pub struct Busy {
    m: Arc<Manager>,
    vmid: u32,
}

impl Drop for Busy {
    fn drop(&mut self) {
        let last = {
            let mut e = lock(&self.m.execs);
            let n = e.entry(self.vmid).or_insert(1);
            *n -= 1;
            let last = *n == 0;
            if last {
                e.remove(&self.vmid);
            }
            last
        };
        if last {
            self.m.set_running(self.vmid, false);
        }
    }
}

fn agent_error(e: AgentError) -> OpError {
    match e {
        AgentError::Command { .. } | AgentError::Unsupported(_) => {
            OpError::BadRequest(crate::log::error_chain(&e))
        }
        AgentError::Gone | AgentError::Timeout(_) => {
            OpError::Unavailable(crate::log::error_chain(&e))
        }
        _ => OpError::Host(crate::log::error_chain(&e)),
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
