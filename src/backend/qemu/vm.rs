//! One running QEMU process and the threads that watch it.
//!
//! A [`Vm`] is made by [`Vm::launch`] (spawn QEMU in its own session, wait for
//! its QMP socket, negotiate) or [`Vm::attach`] (after a daemon restart: find
//! the sockets of a QEMU that kept running). Three threads then watch it:
//! - the QMP reader (in `qmp`), which records `SHUTDOWN` reasons and panics;
//! - the console reader, which logs the serial console and reports the ready line;
//! - the exit watcher, which waits for the process to end (`waitpid` for our
//!   own child, a pidfd for an adopted one) and reports how it ended.
//!
//! Operations wait on two things only: QMP replies (the QMP reader never calls
//! into the daemon) and the exit record (the exit watcher writes it first,
//! before joining the console reader, which may be blocked reporting READY
//! to a sandbox whose lock the waiting operation holds). So an operation
//! holding a sandbox's lock always gets its answer.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::cmdline::{AGENT_SOCK, CONSOLE_SOCK, PID_FILE, QMP_SOCK};
use super::console::{ConsoleLog, LineSplitter};
use crate::backend::{BackendError, EventSink, ExitInfo, VmEvent};
use crate::qga::client::{AgentClient, AgentError};
use crate::qga::session::Session;
use crate::qmp::{Notice, Qmp, QmpError};
use crate::sys::process::{self, PidFd, Signal};
use crate::time::Timestamp;

/// How long QEMU may take to open its QMP socket after exec.
const QMP_APPEAR_TIMEOUT: Duration = Duration::from_secs(30);
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// What the exit report quotes of QEMU's stderr.
const STDERR_TAIL: u64 = 4096;
/// Chunks of console output an attached session may lag behind.
const CONSOLE_SUB_QUEUE: usize = 1024;
/// The virtserialport's device id (cmdline.rs), as VSERPORT_CHANGE names it.
const AGENT_PORT_ID: &str = "qga-port";
/// One sync attempt; the agent answers in milliseconds once it runs.
const AGENT_SYNC_TIMEOUT: Duration = Duration::from_secs(2);
/// QEMU's own log stays small unless something is badly wrong; past this,
/// one previous generation is kept.
const QEMU_LOG_MAX: u64 = 1 << 20;
/// How long console input may wait for a guest that is not reading.
const CONSOLE_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// The kernel's panic banner; the console reader watches for it.
const PANIC_LINE: &str = "Kernel panic - not syncing";

/// Where one VM's files live.
#[derive(Clone, Debug)]
pub struct VmPaths {
    /// `/run/agentlab/vms/<vmid>`: sockets and pidfile.
    pub run_dir: PathBuf,
    /// `<sandboxes_dir>/<vmid>/qemu.log`: QEMU's stdout and stderr.
    pub qemu_log: PathBuf,
    /// `<sandboxes_dir>/<vmid>/console.log`.
    pub console_log: PathBuf,
}

/// What launching needs besides the argv.
pub struct LaunchSpec {
    pub vmid: u32,
    pub binary: String,
    pub argv: Vec<String>,
    pub paths: VmPaths,
    /// `console:<marker>` or `running`.
    pub ready_on: String,
    pub console_max: u64,
    /// Descriptors QEMU inherits (the TAP); closed here once it runs.
    pub inherit: Vec<std::os::fd::OwnedFd>,
}

#[derive(Default)]
struct Shared {
    shutdown_reason: Option<String>,
    panicked: bool,
    exit: Option<ExitInfo>,
    /// The guest has its end of the agent port open (QMP VSERPORT_CHANGE).
    agent_port_open: bool,
    /// Told when that changes, so in-flight agent work fails fast.
    agent_client: Option<Arc<AgentClient>>,
}

pub struct Vm {
    pub vmid: u32,
    pub pid: u32,
    qmp: Mutex<Option<Qmp>>,
    console_in: Mutex<Option<UnixStream>>,
    shared: Arc<(Mutex<Shared>, Condvar)>,
    agent: Mutex<Option<Arc<Session>>>,
    /// Attached `agentlab console` sessions: raw output, dropped if they lag.
    console_subs: Arc<Mutex<Vec<SyncSender<Vec<u8>>>>>,
}

impl Vm {
    pub fn launch(mut spec: LaunchSpec, sink: EventSink) -> Result<Arc<Vm>, BackendError> {
        prepare_run_dir(&spec.paths.run_dir)?;
        rotate_if_large(&spec.paths.qemu_log, QEMU_LOG_MAX);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.paths.qemu_log)
            .map_err(|e| {
                BackendError::host_with(format!("cannot open {}", spec.paths.qemu_log.display()), e)
            })?;
        let _ = writeln!(
            log,
            "=== {} starting {} {}",
            Timestamp::now(),
            spec.binary,
            spec.argv.join(" ")
        );
        let log_offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        let stderr = log
            .try_clone()
            .map_err(|e| BackendError::host_with("cannot dup the qemu log", e))?;
        let mut cmd = Command::new(&spec.binary);
        cmd.args(&spec.argv)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr));
        // QEMU holds its own copies from here on; ours must not keep the
        // TAP alive after QEMU exits.
        let inherit = std::mem::take(&mut spec.inherit);
        let keep: Vec<_> = inherit.iter().map(|fd| fd.as_fd()).collect();
        let spawned = process::spawn_detached_keeping(&mut cmd, &keep);
        drop(keep);
        drop(inherit);
        let mut child = spawned.map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => BackendError::host(format!(
                "{} not found; install it: apt-get install qemu-system-x86",
                spec.binary
            )),
            _ => BackendError::host_with(format!("cannot start {}", spec.binary), e),
        })?;
        let pid = child.id();
        let shared = Arc::new((Mutex::new(Shared::default()), Condvar::new()));
        let qmp = match wait_for_qmp(&spec, &mut child, &shared) {
            Ok(q) => q,
            Err(e) => {
                // A QEMU that aborts mid-handshake resets the socket first and
                // exits a moment later: report the exit, which says more.
                let e = match exited_soon(&mut child, Duration::from_secs(2)) {
                    Some(st) => LaunchError::Exited(st),
                    None => e,
                };
                let _ = child.kill();
                let _ = child.wait();
                let tail = read_tail(&spec.paths.qemu_log, log_offset);
                return Err(e.with_stderr(&tail));
            }
        };
        let run_dir = spec.paths.run_dir.clone();
        Vm::watch(spec, pid, qmp, shared, Exit::Child(child), log_offset, sink).inspect_err(|_| {
            // Without its console the sandbox could never report READY.
            let _ = process::signal(pid, Signal::Kill);
            clean_run_dir(&run_dir);
        })
    }

    /// Re-attaches to a QEMU that survived a daemon restart.
    pub fn attach(spec: LaunchSpec, pid: u32, sink: EventSink) -> Result<Arc<Vm>, BackendError> {
        let pidfd = PidFd::open(pid)
            .map_err(|e| BackendError::host_with(format!("cannot watch pid {pid}"), e))?;
        let shared = Arc::new((Mutex::new(Shared::default()), Condvar::new()));
        let qmp =
            connect_qmp(&spec.paths.run_dir.join(QMP_SOCK), spec.vmid, &shared).map_err(|e| {
                BackendError::host_with(format!("sandbox {}: cannot reconnect QMP", spec.vmid), e)
            })?;
        let log_offset = std::fs::metadata(&spec.paths.qemu_log)
            .map(|m| m.len())
            .unwrap_or(0);
        Vm::watch(
            spec,
            pid,
            qmp,
            shared,
            Exit::Adopted(pidfd),
            log_offset,
            sink,
        )
    }

    /// The common end of launch and attach: the console reader and exit watcher.
    fn watch(
        spec: LaunchSpec,
        pid: u32,
        qmp: Qmp,
        shared: Arc<(Mutex<Shared>, Condvar)>,
        exit: Exit,
        log_offset: u64,
        sink: EventSink,
    ) -> Result<Arc<Vm>, BackendError> {
        let vm = Arc::new(Vm {
            vmid: spec.vmid,
            pid,
            qmp: Mutex::new(Some(qmp)),
            console_in: Mutex::new(None),
            shared,
            agent: Mutex::new(None),
            console_subs: Arc::new(Mutex::new(Vec::new())),
        });
        let console =
            vm.start_console(&spec.paths, &spec.ready_on, spec.console_max, sink.clone())?;
        vm.start_agent(&spec.paths, &spec.ready_on, sink.clone());
        vm.start_exit_watcher(exit, console, spec.paths, log_offset, sink);
        Ok(vm)
    }

    /// Raw console output from now on; the channel closes when the VM exits.
    pub fn console_subscribe(&self) -> Receiver<Vec<u8>> {
        let (tx, rx) = std::sync::mpsc::sync_channel(CONSOLE_SUB_QUEUE);
        lock(&self.console_subs).push(tx);
        rx
    }

    /// The guest agent, once it has answered.
    pub fn session(&self) -> Option<Arc<Session>> {
        lock(&self.agent).clone()
    }

    /// Waits for the guest to open its agent port, syncs with the agent, and
    /// reports it (and READY, for images that are ready when their agent is).
    fn start_agent(self: &Arc<Self>, paths: &VmPaths, ready_on: &str, sink: EventSink) {
        let vm = self.clone();
        let sock = paths.run_dir.join(AGENT_SOCK);
        let ready_on_agent = ready_on == "agent";
        let spawned = std::thread::Builder::new()
            .name(format!("agent-{}", self.vmid))
            .spawn(move || {
                let client = match AgentClient::connect(&sock) {
                    Ok(c) => Arc::new(c),
                    Err(e) => return crate::warn!("sandbox {}: {e}", vm.vmid),
                };
                lock(&vm.shared.0).agent_client = Some(client.clone());
                // After an adoption the port may be open already: no event then.
                if let Ok(v) = vm.qmp("query-chardev", None, QMP_TIMEOUT) {
                    let open = v
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|c| c["label"] == "qga0" && c["frontend-open"] == true);
                    lock(&vm.shared.0).agent_port_open |= open;
                }
                let Some(session) = vm.wait_for_agent(&client) else {
                    return;
                };
                let facts = session.facts();
                *lock(&vm.agent) = Some(session);
                sink(vm.vmid, VmEvent::Agent { pid: vm.pid, facts });
                if ready_on_agent {
                    sink(vm.vmid, VmEvent::Ready { pid: vm.pid });
                }
            });
        if let Err(e) = spawned {
            crate::error!("sandbox {}: cannot start the agent prober: {e}", self.vmid);
        }
    }

    /// Syncs whenever the guest's port is open, until it answers or the VM ends.
    fn wait_for_agent(&self, client: &Arc<AgentClient>) -> Option<Arc<Session>> {
        let (m, cv) = &*self.shared;
        loop {
            {
                let mut s = lock(m);
                while !s.agent_port_open && s.exit.is_none() {
                    s = cv
                        .wait_timeout(s, Duration::from_secs(1))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                if s.exit.is_some() {
                    return None;
                }
            }
            match Session::open(client.clone(), AGENT_SYNC_TIMEOUT) {
                Ok(session) => return Some(Arc::new(session)),
                Err(AgentError::Gone) => return None,
                Err(e) => {
                    crate::debug!("sandbox {}: agent not answering yet: {e}", self.vmid);
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    pub fn qmp(
        &self,
        command: &str,
        args: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let guard = lock(&self.qmp);
        match guard.as_ref() {
            Some(q) => q.execute(command, args, timeout),
            None => Err(QmpError::Disconnected),
        }
    }

    /// Bytes typed into the serial console.
    pub fn console_write(&self, data: &[u8]) -> std::io::Result<()> {
        match lock(&self.console_in).as_mut() {
            Some(s) => s.write_all(data),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "console not connected",
            )),
        }
    }

    pub fn exited(&self) -> Option<ExitInfo> {
        lock(&self.shared.0).exit.clone()
    }

    /// Waits until the process has exited; true if it did within `timeout`.
    pub fn wait_exit(&self, timeout: Duration) -> bool {
        let (m, cv) = &*self.shared;
        let guard = lock(m);
        let (guard, _) = cv
            .wait_timeout_while(guard, timeout, |s| s.exit.is_none())
            .unwrap_or_else(|e| e.into_inner());
        guard.exit.is_some()
    }

    /// `quit` over QMP, then SIGKILL if QEMU does not go.
    pub fn hard_stop(&self) -> Result<(), BackendError> {
        if self.wait_exit(Duration::ZERO) {
            return Ok(());
        }
        match self.qmp("quit", None, Duration::from_secs(5)) {
            Ok(_) | Err(QmpError::Disconnected) => {}
            Err(e) => crate::warn!("sandbox {}: quit failed ({e}); killing qemu", self.vmid),
        }
        if self.wait_exit(Duration::from_secs(5)) {
            return Ok(());
        }
        crate::warn!(
            "sandbox {}: qemu (pid {}) ignored quit; sending SIGKILL",
            self.vmid,
            self.pid
        );
        let _ = process::signal(self.pid, Signal::Kill);
        if self.wait_exit(Duration::from_secs(10)) {
            Ok(())
        } else {
            Err(BackendError::host(format!(
                "sandbox {}: qemu (pid {}) was not seen to exit 10 s after SIGKILL",
                self.vmid, self.pid
            )))
        }
    }

    fn start_console(
        &self,
        paths: &VmPaths,
        ready_on: &str,
        max: u64,
        sink: EventSink,
    ) -> Result<JoinHandle<()>, BackendError> {
        let sock = paths.run_dir.join(CONSOLE_SOCK);
        let stream = UnixStream::connect(&sock).map_err(|e| {
            let msg = format!(
                "sandbox {}: cannot connect to its console {}",
                self.vmid,
                sock.display()
            );
            BackendError::host_with(msg, e)
        })?;
        // A guest that stops reading its serial port must not block the
        // daemon's writers for ever.
        let _ = stream.set_write_timeout(Some(CONSOLE_WRITE_TIMEOUT));
        *lock(&self.console_in) = stream.try_clone().ok();
        let marker = ready_on.strip_prefix("console:").map(str::to_string);
        let mut log = ConsoleLog::open(&paths.console_log, max);
        let (vmid, pid, shared, subs) = (
            self.vmid,
            self.pid,
            self.shared.clone(),
            self.console_subs.clone(),
        );
        std::thread::Builder::new()
            .name(format!("console-{vmid}"))
            .spawn(move || {
                console_loop(stream, (vmid, pid), marker, &mut log, &shared, &sink, &subs);
                // Closing the subscribers' channels ends their sessions.
                lock(&subs).clear();
            })
            .map_err(|e| BackendError::host_with("cannot start the console reader", e))
    }

    fn start_exit_watcher(
        self: &Arc<Self>,
        exit: Exit,
        console: JoinHandle<()>,
        paths: VmPaths,
        log_offset: u64,
        sink: EventSink,
    ) {
        let vm = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("exit-{}", self.vmid))
            .spawn(move || {
                let (code, signal) = exit.wait();
                // Record the exit before anything else: an operation holding
                // the sandbox's lock may be waiting for it, while the console
                // reader may be waiting for that lock to report READY.
                let info = {
                    let (m, cv) = &*vm.shared;
                    let mut s = lock(m);
                    let info = ExitInfo {
                        pid: vm.pid,
                        code,
                        signal,
                        reason: s.shutdown_reason.clone(),
                        panicked: s.panicked,
                        stderr_tail: read_tail(&paths.qemu_log, log_offset),
                    };
                    s.exit = Some(info.clone());
                    cv.notify_all();
                    info
                };
                // The console socket closes with QEMU; let its last lines land
                // before the exit is reported.
                let _ = console.join();
                // The panic banner may be among those last lines.
                let info = ExitInfo {
                    panicked: info.panicked || lock(&vm.shared.0).panicked,
                    ..info
                };
                *lock(&vm.qmp) = None;
                *lock(&vm.console_in) = None;
                clean_run_dir(&paths.run_dir);
                sink(vm.vmid, VmEvent::Exited(info));
            });
        if let Err(e) = spawned {
            crate::error!("sandbox {}: cannot start the exit watcher: {e}", self.vmid);
        }
    }
}

enum Exit {
    Child(Child),
    Adopted(PidFd),
}

impl Exit {
    fn wait(self) -> (Option<i32>, Option<i32>) {
        match self {
            Exit::Child(mut c) => match c.wait() {
                Ok(st) => (st.code(), st.signal()),
                Err(_) => (None, None),
            },
            Exit::Adopted(fd) => {
                while !fd.wait_exit(Duration::from_secs(3600)) {}
                (None, None)
            }
        }
    }
}

fn wait_for_qmp(
    spec: &LaunchSpec,
    child: &mut Child,
    shared: &Arc<(Mutex<Shared>, Condvar)>,
) -> Result<Qmp, LaunchError> {
    let sock = spec.paths.run_dir.join(QMP_SOCK);
    let deadline = Instant::now() + QMP_APPEAR_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(LaunchError::Exited(status));
        }
        if sock.exists() {
            match connect_qmp(&sock, spec.vmid, shared) {
                Ok(q) => return Ok(q),
                // Bound but not yet listening: try again shortly.
                Err(QmpError::Connect { .. }) => {}
                Err(e) => return Err(LaunchError::Qmp(e)),
            }
        }
        if Instant::now() > deadline {
            return Err(LaunchError::NoSocket(QMP_APPEAR_TIMEOUT));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn exited_soon(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn connect_qmp(
    sock: &Path,
    vmid: u32,
    shared: &Arc<(Mutex<Shared>, Condvar)>,
) -> Result<Qmp, QmpError> {
    let shared = shared.clone();
    Qmp::connect(
        sock,
        QMP_TIMEOUT,
        Box::new(move |n| {
            if let Notice::Event(ev) = n {
                crate::debug!("sandbox {vmid}: qmp event {} {}", ev.name, ev.data);
                let (m, cv) = &*shared;
                let mut s = lock(m);
                match ev.name.as_str() {
                    "SHUTDOWN" => s.shutdown_reason = ev.data["reason"].as_str().map(String::from),
                    "GUEST_PANICKED" => s.panicked = true,
                    "VSERPORT_CHANGE" if ev.data["id"] == AGENT_PORT_ID => {
                        let open = ev.data["open"] == true;
                        s.agent_port_open = open;
                        let client = s.agent_client.clone();
                        drop(s);
                        if let Some(c) = client {
                            c.port_changed(open);
                        }
                        cv.notify_all();
                    }
                    _ => {}
                }
            }
        }),
    )
}

enum LaunchError {
    Exited(std::process::ExitStatus),
    NoSocket(Duration),
    Qmp(QmpError),
}

impl LaunchError {
    fn with_stderr(self, stderr: &str) -> BackendError {
        let said = if stderr.trim().is_empty() {
            String::new()
        } else {
            format!(": {}", stderr.trim())
        };
        match self {
            LaunchError::Exited(st) => {
                BackendError::host(format!("qemu exited at once ({st}){said}"))
            }
            LaunchError::NoSocket(t) => BackendError::host(format!(
                "qemu did not open its QMP socket within {t:?}{said}"
            )),
            LaunchError::Qmp(e) => {
                BackendError::host_with(format!("QMP handshake with qemu failed{said}"), e)
            }
        }
    }
}

fn console_loop(
    mut stream: UnixStream,
    (vmid, pid): (u32, u32),
    marker: Option<String>,
    log: &mut ConsoleLog,
    shared: &Arc<(Mutex<Shared>, Condvar)>,
    sink: &EventSink,
    subs: &Mutex<Vec<SyncSender<Vec<u8>>>>,
) {
    let mut splitter = LineSplitter::default();
    let mut buf = [0u8; 16 * 1024];
    let mut ready_sent = false;
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        {
            // A subscriber that lags loses output rather than stalling the console.
            let mut subs = lock(subs);
            subs.retain(|tx| {
                !matches!(
                    tx.try_send(buf[..n].to_vec()),
                    Err(TrySendError::Disconnected(_))
                )
            });
        }
        for line in splitter.feed(&buf[..n]) {
            log.append(Timestamp::now(), &line);
            if line.contains(PANIC_LINE) {
                lock(&shared.0).panicked = true;
            }
            let is_ready = marker.as_deref().is_some_and(|m| line.contains(m));
            sink(vmid, VmEvent::Console(line));
            if is_ready && !ready_sent {
                ready_sent = true;
                sink(vmid, VmEvent::Ready { pid });
            }
        }
    }
    if let Some(rest) = splitter.pending() {
        log.append(Timestamp::now(), &rest);
    }
}

fn prepare_run_dir(dir: &Path) -> Result<(), BackendError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| BackendError::host_with(format!("cannot create {}", dir.display()), e))?;
    clean_run_dir(dir);
    Ok(())
}

fn rotate_if_large(path: &Path, max: u64) {
    if std::fs::metadata(path).is_ok_and(|m| m.len() > max) {
        let mut old = path.as_os_str().to_owned();
        old.push(".1");
        let _ = std::fs::rename(path, old);
    }
}

/// Removes the sockets and pidfile QEMU leaves behind.
pub fn clean_run_dir(dir: &Path) {
    for f in [QMP_SOCK, CONSOLE_SOCK, AGENT_SOCK, PID_FILE] {
        let _ = std::fs::remove_file(dir.join(f));
    }
}

/// The end of QEMU's log written after `offset`, minus our own header line.
fn read_tail(path: &Path, offset: u64) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = offset.max(len.saturating_sub(STDERR_TAIL));
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut raw = Vec::new();
    let _ = f.take(STDERR_TAIL).read_to_end(&mut raw);
    String::from_utf8_lossy(&raw)
        .lines()
        .filter(|l| !l.starts_with("=== "))
        .collect::<Vec<_>>()
        .join("\n")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
