//! `cp` for backends that reach the guest through a hypervisor's agent API
//! (`Backend::guest_api`, e.g. Proxmox's `agent/exec` and `agent/file-*`):
//! the tree is packed or unpacked by `tar` in the guest, and the archive
//! moves as a whole file. The same docker-cp rules as the qemu-ga fallback
//! (`qga::fallback`), whose shell snippets these are.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Backend, BackendError};
use crate::qga::fallback::split_path;
use crate::qga::session::ExecSpec;
use crate::qga::wire::TarDone;

/// Largest tree moved this way: the whole archive is held in memory and PVE's
/// file-read stops at 16 MiB.
pub const MAX_ARCHIVE: u64 = 16 << 20;

static SEQ: AtomicU64 = AtomicU64::new(0);

fn tmp_name() -> String {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("/tmp/.agentlab-cp-{}-{n}.tar", std::process::id())
}

/// Runs `argv` in the guest; a non-zero exit is an error with its stderr.
pub fn run_checked(b: &dyn Backend, vmid: u32, argv: &[&str]) -> Result<(), BackendError> {
    let spec = ExecSpec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let r = b.exec_simple(vmid, &spec, None)?;
    if r.status.code == Some(0) {
        return Ok(());
    }
    Err(BackendError::user(format!(
        "sandbox {vmid}: {} failed ({}): {}",
        argv.first().copied().unwrap_or(""),
        r.status.code.map_or_else(
            || format!("signal {:?}", r.status.signal),
            |c| format!("exit {c}")
        ),
        String::from_utf8_lossy(&r.stderr).trim()
    )))
}

/// Writes a tar of the guest's `path` (root name: its basename) into `sink`.
pub fn tar_out(
    b: &dyn Backend,
    vmid: u32,
    path: &str,
    sink: &mut dyn Write,
) -> Result<TarDone, BackendError> {
    let tmp = tmp_name();
    let (parent, name) = split_path(path);
    let script = "cd \"$1\" && tar -cf \"$3\" -- \"$2\"";
    run_checked(
        b,
        vmid,
        &["/bin/sh", "-c", script, "sh", &parent, &name, &tmp],
    )?;
    let data = b.file_read(vmid, &tmp);
    let _ = run_checked(b, vmid, &["/bin/rm", "-f", &tmp]);
    let data = data?;
    sink.write_all(&data)
        .map_err(|e| BackendError::host_with(format!("sandbox {vmid}: writing the archive"), e))?;
    Ok(TarDone {
        stream: 0,
        entries: 0,
        bytes: data.len() as u64,
        error: None,
    })
}

/// Extracts the tar read from `source` into the guest's `path` (into it if
/// it is a directory, else as it); `root` is the archive's top-level name.
pub fn tar_in(
    b: &dyn Backend,
    vmid: u32,
    path: &str,
    root: &str,
    source: &mut dyn Read,
) -> Result<TarDone, BackendError> {
    let mut data = Vec::new();
    source
        .take(MAX_ARCHIVE + 1)
        .read_to_end(&mut data)
        .map_err(|e| BackendError::host_with(format!("sandbox {vmid}: reading the archive"), e))?;
    if data.len() as u64 > MAX_ARCHIVE {
        return Err(BackendError::user(format!(
            "sandbox {vmid}: copies through the hypervisor's agent API are limited to {} MiB",
            MAX_ARCHIVE >> 20
        )));
    }
    let tmp = tmp_name();
    b.file_write(vmid, &tmp, &data)?;
    let script = "set -e; if [ -d \"$1\" ]; then tar -C \"$1\" -xf \"$3\"; else \
                  p=$(dirname \"$1\"); mkdir -p \"$p\"; t=$(mktemp -d \"$p/.agentlab-cp.XXXXXX\"); \
                  tar -C \"$t\" -xf \"$3\"; rm -rf \"$1\"; mv \"$t/$2\" \"$1\"; rmdir \"$t\"; fi; rm -f \"$3\"";
    let r = run_checked(b, vmid, &["/bin/sh", "-c", script, "sh", path, root, &tmp]);
    if r.is_err() {
        let _ = run_checked(b, vmid, &["/bin/rm", "-f", &tmp]);
    }
    r?;
    Ok(TarDone {
        stream: 0,
        entries: 0,
        bytes: data.len() as u64,
        error: None,
    })
}
