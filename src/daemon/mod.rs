//! The daemon: owns the store, the backend, every sandbox and the API socket.
//!
//! `run` puts it together: one daemon per data dir (a lock file), the sled
//! store, the backend with the manager as its event sink, the reconciler,
//! then the API loop until SIGTERM, SIGINT or SIGHUP. Sandboxes keep running when the
//! daemon stops; the next daemon adopts them.

pub mod bus;
pub mod lease;
pub mod manager;
pub mod network;
pub mod reconcile;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::api::server::{Server, Shutdown};
use crate::backend::qemu::QemuBackend;
use crate::backend::{Backend, EventSink};
use crate::config::{BackendKind, Config};
use crate::store::Store;

use self::bus::Bus;
use self::manager::Manager;
use self::network::Network;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot create {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another agentlabd already runs on {0} (its lock is held)")]
    AlreadyRunning(PathBuf),
    #[error("cannot lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("an agentlabd already answers on {0}")]
    SocketInUse(PathBuf),
    #[error("cannot listen on {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("the {0:?} backend is not available in this build yet")]
    Backend(BackendKind),
    #[error("proxmox backend: {0}")]
    Proxmox(String),
    #[error("the API loop failed")]
    Serve(#[source] std::io::Error),
    #[error("cannot set up signal handling")]
    Signals(#[source] nix::Error),
}

/// A daemon that is set up and ready to serve; tests drive it directly.
pub struct Daemon {
    pub manager: Arc<Manager>,
    server: Server,
    socket: PathBuf,
    _lock: File,
}

impl Daemon {
    /// Everything up to serving: dirs, lock, store, backend, reconcile, socket.
    pub fn prepare(
        cfg: Config,
        signals: Option<nix::sys::signalfd::SignalFd>,
    ) -> Result<Daemon, DaemonError> {
        for dir in [
            &cfg.data_dir,
            &cfg.sandboxes_dir,
            &cfg.images_dir,
            &cfg.run_dir,
        ] {
            mkdir(dir, 0o711)?;
        }
        if let Some(parent) = cfg.socket_path.parent() {
            mkdir(parent, 0o755)?;
        }
        let lock = take_lock(&cfg.data_dir.join("agentlabd.lock"))?;
        let store = Store::open(&cfg.db_path)?;
        let bus = Bus::default();
        // The backend reports VM events to the manager, which owns the backend:
        // a weak link breaks the cycle.
        let slot: Arc<Mutex<Weak<Manager>>> = Arc::new(Mutex::new(Weak::new()));
        let sink_slot = slot.clone();
        let sink: EventSink = Arc::new(move |vmid, ev| {
            let m = sink_slot
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .upgrade();
            if let Some(m) = m {
                m.on_vm_event(vmid, ev);
            }
        });
        let event_slot = slot.clone();
        let events: network::EventFn = Arc::new(move |draft| {
            let m = event_slot
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .upgrade();
            if let Some(m) = m {
                m.append(draft);
            }
        });
        let (backend, net): (Arc<dyn Backend>, _) = match cfg.backend {
            BackendKind::Qemu => {
                let net = Network::new(
                    cfg.network.clone(),
                    store.clone(),
                    Box::new(crate::net::nft::NftCli::default()),
                    events,
                );
                let backend = QemuBackend::new(&cfg, sink).with_nics(net.clone());
                (Arc::new(backend), Some(net))
            }
            BackendKind::Proxmox => (
                Arc::new(
                    crate::backend::proxmox::ProxmoxBackend::new(&cfg, sink)
                        .map_err(DaemonError::Proxmox)?,
                ) as Arc<dyn Backend>,
                None,
            ),
        };
        let socket = cfg.socket_path.clone();
        let manager = Arc::new(Manager::new(cfg, store, backend, net, bus.clone()));
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Arc::downgrade(&manager);
        reconcile::reconcile(&manager);
        let listener = bind(&socket, manager.config().socket_group.as_deref())?;
        let server = Server::new(listener, signals).map_err(DaemonError::Serve)?;
        let waker = server.waker();
        bus.set_waker(Arc::new(move || {
            let _ = waker.wake();
        }));
        Ok(Daemon {
            manager,
            server,
            socket,
            _lock: lock,
        })
    }

    pub fn shutdown_handle(&self) -> Shutdown {
        self.server.shutdown_handle()
    }

    /// Serves until shut down; removes the socket on the way out.
    pub fn serve(self) -> Result<(), DaemonError> {
        let m = self.manager.clone();
        let ticking = Arc::new(AtomicBool::new(false));
        let tick = move || {
            // Lease expiry can take seconds (stopping VMs); keep it off the loop.
            if ticking.swap(true, Ordering::SeqCst) {
                return;
            }
            let (m, ticking) = (m.clone(), ticking.clone());
            let _ = std::thread::Builder::new()
                .name("tick".into())
                .spawn(move || {
                    m.tick();
                    ticking.store(false, Ordering::SeqCst);
                });
        };
        let label = self.socket.display().to_string();
        let r = self.server.run(self.manager.clone(), label, tick);
        let _ = std::fs::remove_file(&self.socket);
        let _ = self.manager.store().flush();
        r.map_err(DaemonError::Serve)
    }
}

/// `agentlab daemon`: blocks SIGTERM, SIGINT and SIGHUP into a signalfd and serves.
pub fn run(cfg: Config) -> Result<(), DaemonError> {
    let signals = block_signals()?;
    crate::info!(
        "agentlabd {} starting: data {}, socket {}",
        env!("CARGO_PKG_VERSION"),
        cfg.data_dir.display(),
        cfg.socket_path.display()
    );
    Daemon::prepare(cfg, Some(signals))?.serve()
}

fn block_signals() -> Result<nix::sys::signalfd::SignalFd, DaemonError> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    // Blocked here, before any thread starts, so every thread inherits the
    // mask and the signals arrive only through the signalfd.
    set.thread_block().map_err(DaemonError::Signals)?;
    nix::sys::signalfd::SignalFd::with_flags(
        &set,
        nix::sys::signalfd::SfdFlags::SFD_NONBLOCK | nix::sys::signalfd::SfdFlags::SFD_CLOEXEC,
    )
    .map_err(DaemonError::Signals)
}

fn mkdir(path: &Path, mode: u32) -> Result<(), DaemonError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(|source| DaemonError::CreateDir {
            path: path.to_path_buf(),
            source,
        })
}

fn take_lock(path: &Path) -> Result<File, DaemonError> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|source| DaemonError::Lock {
            path: path.to_path_buf(),
            source,
        })?;
    match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(f),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(DaemonError::AlreadyRunning(path.to_path_buf())),
        Err(e) => Err(DaemonError::Lock {
            path: path.to_path_buf(),
            source: e.into(),
        }),
    }
}

/// Binds the API socket, replacing a stale one, mode 0660 (group `agentlab`
/// when that group exists, so members can use the CLI without root).
fn bind(path: &Path, group: Option<&str>) -> Result<UnixListener, DaemonError> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::SocketInUse(path.to_path_buf()));
        }
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(|source| DaemonError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660));
    let group = group.unwrap_or("agentlab");
    if let Some(gid) = crate::sys::users::group_gid(group) {
        let _ = nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)));
    }
    Ok(listener)
}
