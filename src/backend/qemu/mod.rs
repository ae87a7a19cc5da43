//! The local backend: sandboxes as `qemu-system-x86_64` processes on this host.
//!
//! Per sandbox it owns `<sandboxes_dir>/<vmid>/` (the qcow2 overlay, QEMU's
//! log, the console log) and `<run_dir>/vms/<vmid>/` (QMP, console and agent
//! sockets, pidfile). The overlay sits on a read-only base from the images
//! directory; revert writes a fresh overlay, which takes well under a
//! millisecond. QEMU runs in its own session, so it outlives the daemon; after
//! a restart [`Backend::adopt`] finds it again by pid, start time and argv.

pub mod cmdline;
pub mod console;
pub mod vm;

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use self::cmdline::{AccelKind, NicSpec, VmSpec};
use self::vm::{LaunchSpec, Vm, VmPaths};
use super::{
    Adoption, Backend, BackendError, BackendStatus, EventSink, Nic, NicSource, Orphan, Provisioned,
    StopMode,
};
use crate::config::{Accel, Config, NicModel, Profile};
use crate::image::default_guest::{self, GuestAgent};
use crate::image::store::{Image, ImageStore};
use crate::model::{Disk, Runtime, Sandbox, State};
use crate::qcow;
use crate::qmp::QemuVersion;
use crate::sys::process::{self, Signal};
use crate::time::Timestamp;

const OVERLAY: &str = "overlay.qcow2";

pub struct QemuBackend {
    binary: String,
    accel: AccelKind,
    accel_reason: String,
    run_as: RunAs,
    images: ImageStore,
    images_dir: PathBuf,
    kernel: Option<PathBuf>,
    sandboxes_dir: PathBuf,
    vms_dir: PathBuf,
    console_max: u64,
    vms: Mutex<HashMap<u32, Arc<Vm>>>,
    /// One default-guest build at a time.
    build_lock: Mutex<()>,
    sink: EventSink,
    nics: Option<Arc<dyn NicSource>>,
}

impl QemuBackend {
    pub fn new(cfg: &Config, sink: EventSink) -> QemuBackend {
        let (accel, accel_reason) =
            choose_accel(cfg.accel, std::env::var("AGENTLAB_ACCEL").ok().as_deref());
        // Who QEMU runs as after it has opened its files: by default a uid of
        // its own per sandbox (200000 + VMID), so an escape from one guest
        // cannot signal or read another sandbox's QEMU. `qemu_user: <name>`
        // pins a named user; `root` keeps root.
        let run_as = match cfg.qemu_user.as_deref() {
            Some("root") => RunAs::Root,
            Some(u) => RunAs::User(u.to_string()),
            None => RunAs::PerSandbox,
        };
        if let Some(bad) = accel_env_typo() {
            crate::warn!("ignoring AGENTLAB_ACCEL={bad:?}: use kvm, tcg or auto");
        }
        QemuBackend {
            binary: cfg.qemu_binary.clone(),
            accel,
            accel_reason,
            run_as,
            images: ImageStore::new(&cfg.images_dir),
            images_dir: cfg.images_dir.clone(),
            kernel: cfg.kernel.clone(),
            sandboxes_dir: cfg.sandboxes_dir.clone(),
            vms_dir: cfg.run_dir.join("vms"),
            console_max: cfg.console_log_max_bytes,
            vms: Mutex::new(HashMap::new()),
            build_lock: Mutex::new(()),
            sink,
            nics: None,
        }
    }

    /// Sandboxes get their NICs from `nics` (the daemon's network).
    pub fn with_nics(mut self, nics: Arc<dyn NicSource>) -> QemuBackend {
        self.nics = Some(nics);
        self
    }

    /// Builds the default guest (or its qemu-ga variant) unless it exists
    /// (or `force`).
    fn build_default(
        &self,
        agent: GuestAgent,
        force: bool,
        progress: &mut dyn FnMut(&str),
    ) -> Result<(), BackendError> {
        let _guard = self.build_lock.lock().unwrap_or_else(|e| e.into_inner());
        if !force && default_guest::is_built(&self.images_dir, agent) {
            return Ok(());
        }
        let agent_binary = std::env::current_exe().map_err(|e| {
            BackendError::host_with("cannot find the agentlab binary to put in the guest", e)
        })?;
        let opts = default_guest::BuildOptions {
            images_dir: self.images_dir.clone(),
            kernel: self.kernel.clone(),
            agent_binary,
            busybox: PathBuf::from(default_guest::DEFAULT_BUSYBOX),
            disk_size: default_guest::DEFAULT_DISK_SIZE,
            force,
            agent,
            qemu_ga: PathBuf::from(default_guest::DEFAULT_QEMU_GA),
        };
        default_guest::build(&opts, progress)
            .map(|_| ())
            .map_err(|e| {
                BackendError::host_with(
                    format!("cannot build the {} guest image", agent.image_name()),
                    e,
                )
            })
    }

    /// The variant `image` names when it is one of the default guests and
    /// not built yet.
    fn unbuilt_default(&self, image: &str) -> Option<GuestAgent> {
        GuestAgent::for_image(image).filter(|_| !self.images.has_manifest(image))
    }

    /// QEMU's version, from `-version`; the error names the package to install.
    pub fn qemu_version(&self) -> Result<QemuVersion, BackendError> {
        let out = std::process::Command::new(&self.binary)
            .arg("-version")
            .output()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => BackendError::host(format!(
                    "{} not found; install it: apt-get install qemu-system-x86",
                    self.binary
                )),
                _ => BackendError::host_with(format!("cannot run {}", self.binary), e),
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        parse_version(&text).ok_or_else(|| {
            BackendError::host(format!(
                "cannot read the version of {}: {text:?}",
                self.binary
            ))
        })
    }

    fn paths(&self, vmid: u32) -> (PathBuf, VmPaths) {
        let dir = self.sandboxes_dir.join(vmid.to_string());
        let paths = VmPaths {
            run_dir: self.vms_dir.join(vmid.to_string()),
            qemu_log: dir.join("qemu.log"),
            console_log: dir.join("console.log"),
        };
        (dir, paths)
    }

    fn launch_spec(
        &self,
        sb: &Sandbox,
        image: &Image,
        version: &QemuVersion,
        nic: Option<Nic>,
    ) -> Result<LaunchSpec, BackendError> {
        let disk = sb.disk.as_ref().ok_or_else(|| {
            BackendError::host(format!(
                "sandbox {} has no disk; revert it to make one",
                sb.vmid
            ))
        })?;
        let (_, paths) = self.paths(sb.vmid);
        let overlay = PathBuf::from(&disk.overlay_path);
        let argv = cmdline::argv(&VmSpec {
            vmid: sb.vmid,
            hostname: &sb.name,
            accel: self.accel,
            cores: sb.resources.cores,
            memory_mb: sb.resources.memory_mb,
            image,
            overlay: &overlay,
            run_dir: &paths.run_dir,
            run_as: self.run_as.for_vmid(sb.vmid).as_deref(),
            version,
            nic: nic.as_ref().map(|n| NicSpec {
                fd: n.tap.as_raw_fd(),
                mac: &n.mac,
                device: match n.model {
                    NicModel::Virtio => "virtio-net-pci",
                    NicModel::E1000 => "e1000",
                },
            }),
        });
        Ok(LaunchSpec {
            vmid: sb.vmid,
            binary: self.binary.clone(),
            argv,
            paths,
            ready_on: sb.ready_on.clone(),
            console_max: self.console_max,
            inherit: nic.map(|n| n.tap).into_iter().collect(),
        })
    }

    /// The image a sandbox was made from, checked to be the same base file.
    fn image_of(&self, sb: &Sandbox) -> Result<Image, BackendError> {
        let disk = sb
            .disk
            .as_ref()
            .ok_or_else(|| BackendError::host(format!("sandbox {} has no disk", sb.vmid)))?;
        let image = self.images.resolve(&disk.image).map_err(image_error)?;
        if image.disk.display().to_string() != disk.base_path {
            return Err(BackendError::user(format!(
                "sandbox {}: image {:?} now lives at {} but the sandbox was made on {}; destroy and recreate it",
                sb.vmid,
                disk.image,
                image.disk.display(),
                disk.base_path
            )));
        }
        Ok(image)
    }

    fn vm(&self, vmid: u32) -> Option<Arc<Vm>> {
        self.vms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&vmid)
            .cloned()
    }

    fn forget(&self, vmid: u32) {
        self.vms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&vmid);
    }

    /// Our QEMU processes: (pid, vmid) for every process whose argv names a
    /// socket under our `vms` dir.
    fn our_processes(&self) -> Vec<(u32, u32)> {
        let marker = format!("{}/", self.vms_dir.display());
        process::all_pids()
            .into_iter()
            .filter_map(|pid| {
                let argv = process::cmdline(pid)?;
                if !argv.first()?.contains("qemu-system") {
                    return None;
                }
                let vmid = argv.iter().find_map(|a| vmid_in_arg(a, &marker))?;
                Some((pid, vmid))
            })
            .collect()
    }
}

/// Who a sandbox's QEMU runs as once it has opened its files.
#[derive(Clone, Debug, PartialEq, Eq)]
enum RunAs {
    Root,
    User(String),
    /// uid = gid = `SANDBOX_UID_BASE` + VMID.
    PerSandbox,
}

/// Sandbox uids start here: above the 16-bit range distributions hand out
/// and below the ranges container runtimes usually reserve (subuid 100000+
/// blocks are 65536 wide).
const SANDBOX_UID_BASE: u32 = 200_000;

impl RunAs {
    /// The `-runas`/`-run-with user=` argument, if privileges are dropped.
    fn for_vmid(&self, vmid: u32) -> Option<String> {
        match self {
            RunAs::Root => None,
            RunAs::User(u) => Some(u.clone()),
            RunAs::PerSandbox => {
                let id = SANDBOX_UID_BASE + vmid;
                Some(format!("{id}:{id}"))
            }
        }
    }
}

fn accel_env_typo() -> Option<String> {
    let v = std::env::var("AGENTLAB_ACCEL").ok()?;
    Accel::parse(&v).is_none().then_some(v)
}

/// `…path=/run/agentlab/vms/1000/qmp.sock,…` → 1000, when `marker` is the vms dir.
fn vmid_in_arg(arg: &str, marker: &str) -> Option<u32> {
    let rest = &arg[arg.find(marker)? + marker.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn image_error(e: crate::image::store::ImageError) -> BackendError {
    use crate::image::store::ImageError;
    match e {
        ImageError::Manifest { .. }
        | ImageError::MissingFile { .. }
        | ImageError::Outside { .. } => BackendError::host_with("the image is damaged", e),
        other => BackendError::User(crate::log::error_chain(&other)),
    }
}

/// `AGENTLAB_ACCEL` beats the config; `auto` uses KVM when it answers.
pub fn choose_accel(configured: Accel, env: Option<&str>) -> (AccelKind, String) {
    let (accel, source) = match env.and_then(Accel::parse) {
        Some(a) => (a, "AGENTLAB_ACCEL"),
        None => (configured, "config"),
    };
    match accel {
        Accel::Kvm => (AccelKind::Kvm, format!("kvm requested by {source}")),
        Accel::Tcg => (AccelKind::Tcg, format!("tcg requested by {source}")),
        Accel::Auto => match crate::sys::kvm::probe("/dev/kvm") {
            Ok(()) => (AccelKind::Kvm, "auto: /dev/kvm works".into()),
            Err(why) => (AccelKind::Tcg, format!("auto: software emulation ({why})")),
        },
    }
}

fn parse_version(text: &str) -> Option<QemuVersion> {
    let v = text.split("version ").nth(1)?.split_whitespace().next()?;
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    Some(QemuVersion {
        major: it.next()??,
        minor: it.next().flatten().unwrap_or(0),
        micro: it.next().flatten().unwrap_or(0),
    })
}

impl Backend for QemuBackend {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    fn status(&self) -> BackendStatus {
        BackendStatus {
            kind: "qemu".into(),
            accel: self.accel.as_str().to_string(),
            accel_reason: self.accel_reason.clone(),
            hypervisor_version: match self.qemu_version() {
                Ok(v) => format!("QEMU {v}"),
                Err(e) => format!("unavailable: {e}"),
            },
            details: Vec::new(),
        }
    }

    fn check_profile(&self, profile: &Profile) -> Result<(), BackendError> {
        // The default guest (and its qemu-ga variant) is built on first use;
        // anything else must exist.
        if self.unbuilt_default(&profile.image).is_some() {
            return Ok(());
        }
        self.images
            .resolve(&profile.image)
            .map(|_| ())
            .map_err(image_error)
    }

    fn provision(
        &self,
        sb: &Sandbox,
        profile: &Profile,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Provisioned, BackendError> {
        self.qemu_version()?;
        if let Some(agent) = self.unbuilt_default(&profile.image) {
            progress(&format!(
                "building the {} guest image (first use)",
                agent.image_name()
            ));
            self.build_default(agent, false, progress)?;
        }
        let image = self.images.resolve(&profile.image).map_err(image_error)?;
        let wanted = profile
            .storage
            .root_size_gb
            .map(|g| u64::from(g) << 30)
            .unwrap_or(0);
        let size = image.virtual_size.max(wanted);
        let (dir, _) = self.paths(sb.vmid);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| BackendError::host_with(format!("cannot create {}", dir.display()), e))?;
        let overlay = dir.join(OVERLAY);
        if let Err(e) = qcow::write_overlay(&overlay, &image.disk, image.format, size) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(BackendError::host_with(
                format!(
                    "sandbox {}: cannot write its overlay in {}",
                    sb.vmid,
                    dir.display()
                ),
                e,
            ));
        }
        Ok(Provisioned {
            disk: Some(Disk {
                image: image.name.clone(),
                base_path: image.disk.display().to_string(),
                base_format: image.format.as_str().to_string(),
                overlay_path: overlay.display().to_string(),
                virtual_size: size,
            }),
            ready_on: image.ready_on,
        })
    }

    fn start(&self, sb: &Sandbox) -> Result<Runtime, BackendError> {
        if let Some(vm) = self.vm(sb.vmid) {
            if vm.exited().is_none() {
                return Err(BackendError::user(format!(
                    "sandbox {} is already running (pid {})",
                    sb.vmid, vm.pid
                )));
            }
            self.forget(sb.vmid);
        }
        let version = self.qemu_version()?;
        let image = self.image_of(sb)?;
        let overlay = sb.disk.as_ref().map(|d| PathBuf::from(&d.overlay_path));
        if !overlay.as_deref().is_some_and(Path::exists) {
            return Err(BackendError::user(format!(
                "sandbox {}: its overlay is missing; `agentlab sandbox revert {}` makes a fresh one",
                sb.vmid, sb.vmid
            )));
        }
        let nic = match &self.nics {
            Some(source) => source.nic_for(sb)?,
            None => None,
        };
        let spec = self.launch_spec(sb, &image, &version, nic)?;
        let run_dir = spec.paths.run_dir.clone();
        let vm = Vm::launch(spec, self.sink.clone()).map_err(|e| match (self.accel, e) {
            // Nested or quirky KVM hosts can make QEMU abort where TCG works.
            (AccelKind::Kvm, BackendError::Host { msg, source }) => BackendError::Host {
                msg: format!(
                    "{msg}; if KVM misbehaves on this host (nested virtualisation), \
                     set `accel: tcg` in config.yaml or AGENTLAB_ACCEL=tcg"
                ),
                source,
            },
            (_, e) => e,
        })?;
        let runtime = Runtime {
            pid: vm.pid,
            pid_start_ticks: process::start_ticks(vm.pid).unwrap_or(0),
            accel: self.accel.as_str().to_string(),
            run_dir: run_dir.display().to_string(),
            started_at: Timestamp::now(),
        };
        self.vms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sb.vmid, vm);
        Ok(runtime)
    }

    fn stop(&self, sb: &Sandbox, mode: StopMode) -> Result<(), BackendError> {
        let Some(vm) = self.vm(sb.vmid) else {
            // Not ours to watch (or already gone): make sure no process is left.
            if let Some(rt) = &sb.runtime {
                if process::start_ticks(rt.pid) == Some(rt.pid_start_ticks) {
                    let _ = process::signal(rt.pid, Signal::Kill);
                }
            }
            return Ok(());
        };
        if let StopMode::Graceful { grace } = mode {
            match vm.qmp("system_powerdown", None, Duration::from_secs(5)) {
                Ok(_) if vm.wait_exit(grace) => {
                    self.forget(sb.vmid);
                    return Ok(());
                }
                Ok(_) => crate::warn!(
                    "sandbox {}: guest ignored the ACPI power button for {grace:?}; forcing it off",
                    sb.vmid
                ),
                Err(e) => crate::warn!(
                    "sandbox {}: system_powerdown failed ({e}); forcing it off",
                    sb.vmid
                ),
            }
        }
        let r = vm.hard_stop();
        self.forget(sb.vmid);
        r
    }

    fn revert(&self, sb: &Sandbox) -> Result<(), BackendError> {
        if self.vm(sb.vmid).is_some_and(|vm| vm.exited().is_none()) {
            return Err(BackendError::host(format!(
                "sandbox {} is still running; stop it before reverting",
                sb.vmid
            )));
        }
        let disk = sb.disk.as_ref().ok_or_else(|| {
            BackendError::host(format!("sandbox {} has no disk to revert", sb.vmid))
        })?;
        let image = self.image_of(sb)?;
        let overlay = PathBuf::from(&disk.overlay_path);
        if let Some(dir) = overlay.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| {
                    BackendError::host_with(format!("cannot create {}", dir.display()), e)
                })?;
        }
        qcow::write_overlay(&overlay, &image.disk, image.format, disk.virtual_size).map_err(|e| {
            BackendError::host_with(
                format!("sandbox {}: cannot write a fresh overlay", sb.vmid),
                e,
            )
        })
    }

    fn destroy(&self, sb: &Sandbox) -> Result<(), BackendError> {
        self.stop(sb, StopMode::Hard)?;
        let (dir, paths) = self.paths(sb.vmid);
        for d in [&dir, &paths.run_dir] {
            match std::fs::remove_dir_all(d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(BackendError::host_with(
                        format!("cannot remove {}", d.display()),
                        e,
                    ))
                }
            }
        }
        Ok(())
    }

    fn adopt(&self, sb: &Sandbox) -> Result<Adoption, BackendError> {
        // The recorded pid if it is still that process; otherwise any QEMU of
        // ours for this VMID (a daemon that died between spawning QEMU and
        // recording it leaves no usable runtime record).
        let mine: Vec<u32> = self
            .our_processes()
            .into_iter()
            .filter(|&(_, vmid)| vmid == sb.vmid)
            .map(|(pid, _)| pid)
            .collect();
        let recorded = sb.runtime.as_ref().filter(|rt| {
            mine.contains(&rt.pid) && process::start_ticks(rt.pid) == Some(rt.pid_start_ticks)
        });
        let pid = match (recorded, mine.first()) {
            (Some(rt), _) => rt.pid,
            (None, Some(&pid)) => pid,
            (None, None) => {
                let (_, paths) = self.paths(sb.vmid);
                vm::clean_run_dir(&paths.run_dir);
                return Ok(Adoption::Gone);
            }
        };
        // Two QEMUs on one sandbox cannot both be right; keep the one adopted.
        for &other in mine.iter().filter(|&&p| p != pid) {
            crate::warn!("sandbox {}: killing a second qemu (pid {other})", sb.vmid);
            let _ = process::signal(other, Signal::Kill);
        }
        let attached = self.image_of(sb).and_then(|image| {
            let version = self.qemu_version()?;
            let spec = self.launch_spec(sb, &image, &version, None)?;
            Vm::attach(spec, pid, self.sink.clone())
        });
        let vm = match attached {
            Ok(vm) => vm,
            Err(e) => {
                // A QEMU we cannot watch must not run on unseen.
                let _ = process::signal(pid, Signal::Kill);
                return Err(e);
            }
        };
        self.vms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sb.vmid, vm);
        let (_, paths) = self.paths(sb.vmid);
        Ok(Adoption::Running(Runtime {
            pid,
            pid_start_ticks: process::start_ticks(pid).unwrap_or(0),
            accel: sb
                .runtime
                .as_ref()
                .map(|r| r.accel.clone())
                .unwrap_or_else(|| self.accel.as_str().to_string()),
            run_dir: paths.run_dir.display().to_string(),
            started_at: sb
                .runtime
                .as_ref()
                .map(|r| r.started_at)
                .unwrap_or_else(Timestamp::now),
        }))
    }

    fn orphans(&self, live: &[Sandbox]) -> Vec<Orphan> {
        let mut out = Vec::new();
        // A QEMU belongs to a live sandbox if it is the recorded one, or if
        // the sandbox is still coming up and has no runtime recorded yet.
        let running = |vmid: u32, pid: u32| {
            live.iter().any(|s| {
                s.vmid == vmid
                    && match &s.runtime {
                        Some(r) => s.state.vm_expected() && r.pid == pid,
                        None => matches!(
                            s.state,
                            State::Requested | State::Provisioning | State::Booting
                        ),
                    }
            })
        };
        for (pid, vmid) in self.our_processes() {
            if !running(vmid, pid) {
                out.push(Orphan {
                    kind: "process".into(),
                    vmid: Some(vmid),
                    pid: Some(pid),
                    path: None,
                    why: format!("qemu for sandbox {vmid} runs but no live sandbox owns it"),
                });
            }
        }
        let known = |vmid: u32| live.iter().any(|s| s.vmid == vmid);
        for (base, what) in [(&self.sandboxes_dir, "files"), (&self.vms_dir, "sockets")] {
            let Ok(entries) = std::fs::read_dir(base) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let orphaned = match name.parse::<u32>() {
                    Ok(vmid) => !known(vmid),
                    Err(_) => name.starts_with('.'),
                };
                if orphaned {
                    out.push(Orphan {
                        kind: "path".into(),
                        vmid: name.parse().ok(),
                        pid: None,
                        path: Some(e.path().display().to_string()),
                        why: format!("{what} of a sandbox agentlab no longer knows"),
                    });
                }
            }
        }
        out
    }

    fn remove_orphan(&self, o: &Orphan) -> Result<(), BackendError> {
        if let Some(pid) = o.pid {
            let _ = process::signal(pid, Signal::Term);
            if let Ok(fd) = process::PidFd::open(pid) {
                if !fd.wait_exit(Duration::from_secs(5)) {
                    let _ = process::signal(pid, Signal::Kill);
                    fd.wait_exit(Duration::from_secs(5));
                }
            }
        }
        if let Some(p) = &o.path {
            let path = Path::new(p);
            let inside = path.starts_with(&self.sandboxes_dir) || path.starts_with(&self.vms_dir);
            if !inside {
                return Err(BackendError::host(format!(
                    "refusing to remove {p}: not under agentlab's directories"
                )));
            }
            let r = if path.is_dir() {
                std::fs::remove_dir_all(path)
            } else {
                std::fs::remove_file(path)
            };
            if let Err(e) = r {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(BackendError::host_with(format!("cannot remove {p}"), e));
                }
            }
        }
        Ok(())
    }

    fn console_tail(&self, vmid: u32, n: usize) -> Vec<(Timestamp, String)> {
        console::read_tail(&self.paths(vmid).1.console_log, n)
    }

    fn console_write(&self, vmid: u32, data: &[u8]) -> Result<(), BackendError> {
        let vm = self
            .vm(vmid)
            .ok_or_else(|| BackendError::user(format!("sandbox {vmid} is not running")))?;
        vm.console_write(data).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => BackendError::user(
                format!("sandbox {vmid}: the guest is not reading its console (input waited 5 s)"),
            ),
            _ => BackendError::host_with(format!("sandbox {vmid}: cannot write to the console"), e),
        })
    }

    fn guest(&self, vmid: u32) -> Result<Arc<crate::qga::session::Session>, BackendError> {
        let vm = self
            .vm(vmid)
            .ok_or_else(|| BackendError::user(format!("sandbox {vmid} is not running")))?;
        vm.session().ok_or_else(|| {
            BackendError::user(format!(
                "sandbox {vmid}: its guest agent has not answered yet (wait for READY, or the image has no agent)"
            ))
        })
    }

    fn console_attach(
        &self,
        vmid: u32,
    ) -> Result<std::sync::mpsc::Receiver<Vec<u8>>, BackendError> {
        let vm = self
            .vm(vmid)
            .ok_or_else(|| BackendError::user(format!("sandbox {vmid} is not running")))?;
        Ok(vm.console_subscribe())
    }

    fn images(&self) -> Vec<crate::image::store::ImageSummary> {
        self.images.list()
    }

    fn build_default_image(
        &self,
        agent: GuestAgent,
        force: bool,
        progress: &mut dyn FnMut(&str),
    ) -> Result<(), BackendError> {
        self.build_default(agent, force, progress)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_is_read_from_qemu_banner() {
        let v = parse_version(
            "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright",
        )
        .unwrap();
        assert_eq!(v.to_string(), "7.2.22");
    }

    #[test]
    fn env_overrides_configured_accel() {
        let (kind, why) = choose_accel(Accel::Kvm, Some("tcg"));
        assert_eq!(kind, AccelKind::Tcg);
        assert!(why.contains("AGENTLAB_ACCEL"));
    }

    #[test]
    fn invalid_env_accel_falls_back_to_config() {
        let (kind, _) = choose_accel(Accel::Tcg, Some("warp"));
        assert_eq!(kind, AccelKind::Tcg);
    }

    #[test]
    fn vmid_is_found_in_a_socket_argument() {
        let arg = "socket,id=qmp0,path=/run/agentlab/vms/1042/qmp.sock,server=on,wait=off";
        assert_eq!(vmid_in_arg(arg, "/run/agentlab/vms/"), Some(1042));
        assert_eq!(vmid_in_arg(arg, "/other/vms/"), None);
    }
}
