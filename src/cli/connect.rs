//! Finding the daemon: which config, which socket, and starting `agentlab
//! daemon` on demand when nothing answers (detached, logging to its log
//! file), so `agentlab sandbox new` works on a fresh host with no unit.

use std::fs::OpenOptions;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{output, CliError, Global};
use crate::api::client::Client;
use crate::config::{Config, DEFAULT_CONFIG_PATH};

const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(20);

/// The config the CLI (and a daemon it starts) uses.
pub fn load_config(g: &Global) -> Result<Config, CliError> {
    let (path, explicit) = match (&g.config, std::env::var_os("AGENTLAB_CONFIG")) {
        (Some(p), _) => (p.clone(), true),
        (None, Some(p)) => (PathBuf::from(p), true),
        (None, None) => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
    };
    let cfg =
        Config::load(&path, explicit).map_err(|e| CliError::User(crate::log::error_chain(&e)))?;
    Ok(match &g.state_dir {
        Some(d) => cfg.with_data_dir(d),
        None => cfg,
    })
}

fn socket_path(g: &Global, cfg: &Config) -> PathBuf {
    g.socket
        .clone()
        .or_else(|| std::env::var_os("AGENTLAB_SOCKET").map(PathBuf::from))
        .unwrap_or_else(|| cfg.socket_path.clone())
}

/// A client for a daemon that answers, starting one if none does.
pub fn client(g: &Global) -> Result<Client, CliError> {
    let cfg = load_config(g)?;
    let socket = socket_path(g, &cfg);
    let c = Client::new(&socket, g.timeout);
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        return Ok(c);
    }
    if std::env::var_os("AGENTLAB_NO_AUTOSTART").is_some() {
        return Err(CliError::Host(format!(
            "agentlabd is not running (no answer on {}); start it with `agentlab daemon`",
            socket.display()
        )));
    }
    start_daemon(g, &cfg, &socket)?;
    Ok(c)
}

fn start_daemon(g: &Global, cfg: &Config, socket: &Path) -> Result<(), CliError> {
    let exe = std::env::current_exe()
        .map_err(|e| CliError::Host(format!("cannot find my own binary: {e}")))?;
    if let Some(dir) = cfg.log_path.parent() {
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(dir);
    }
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&cfg.log_path)
        .map_err(|e| {
            CliError::Host(format!(
                "cannot open the daemon log {}: {e}",
                cfg.log_path.display()
            ))
        })?;
    let log_err = log.try_clone().map_err(|e| CliError::Host(e.to_string()))?;
    let mut cmd = Command::new(exe);
    if let Some(c) = &g.config {
        cmd.arg("--config").arg(c);
    }
    if let Some(d) = &g.state_dir {
        cmd.arg("--state-dir").arg(d);
    }
    if let Some(s) = &g.socket {
        cmd.arg("--socket").arg(s);
    }
    cmd.arg("daemon")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err));
    let child = crate::sys::process::spawn_detached(&mut cmd)
        .map_err(|e| CliError::Host(format!("cannot start agentlabd: {e}")))?;
    output::progress(
        &format!(
            "agentlab: started agentlabd (pid {}), logging to {}",
            child.id(),
            cfg.log_path.display()
        ),
        true,
    );
    wait_for_socket(child, socket, &cfg.log_path)
}

/// Waits until the new daemon answers, or says why it will not.
fn wait_for_socket(
    mut child: std::process::Child,
    socket: &Path,
    log: &Path,
) -> Result<(), CliError> {
    let deadline = Instant::now() + DAEMON_START_TIMEOUT;
    loop {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            // The daemon is meant to outlive this CLI: do not reap it.
            std::mem::forget(child);
            return Ok(());
        }
        if let Ok(Some(st)) = child.try_wait() {
            return Err(CliError::Host(format!(
                "agentlabd exited at once ({st}); its log {} says:\n{}",
                log.display(),
                log_tail(log, 10)
            )));
        }
        if Instant::now() > deadline {
            return Err(CliError::Host(format!(
                "agentlabd did not open {} within {DAEMON_START_TIMEOUT:?}; see {}",
                socket.display(),
                log.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
