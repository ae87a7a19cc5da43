//! Processes: spawn detached into their own session, read `/proc`, signal,
//! and wait for a process that is not our child (pidfd).
//!
//! QEMU runs in its own session so it outlives a daemon restart; afterwards the
//! daemon can no longer `waitpid` it, so exit is observed through a pidfd.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags};
use rustix::process::{pidfd_open, Pid, PidfdFlags};

/// Spawns `cmd` as the leader of a new session, detached from our terminal
/// and process group, so signals to the daemon do not reach it.
pub fn spawn_detached(cmd: &mut Command) -> io::Result<Child> {
    spawn_detached_keeping(cmd, &[])
}

/// As [`spawn_detached`], and the child inherits `keep` at their own numbers
/// (QEMU's `-netdev tap,fd=N`). They stay close-on-exec in the daemon, so no
/// other child started meanwhile inherits them.
pub fn spawn_detached_keeping(cmd: &mut Command, keep: &[BorrowedFd<'_>]) -> io::Result<Child> {
    let keep: Vec<i32> = keep.iter().map(|fd| fd.as_raw_fd()).collect();
    // SAFETY: the closure runs between fork and exec in the child; setsid(2),
    // pthread_sigmask(3) and fcntl(2) are async-signal-safe, and the closure
    // only reads `keep`, allocated before the fork. The daemon blocks
    // SIGTERM/SIGINT to read them from a signalfd; the mask is inherited
    // across exec, so it is cleared here or QEMU would ignore them. The fds
    // in `keep` are open: the caller borrows them for the whole call.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::setsid().map_err(io::Error::from)?;
            nix::sys::signal::SigSet::empty()
                .thread_set_mask()
                .map_err(io::Error::from)?;
            for &fd in &keep {
                let fd = BorrowedFd::borrow_raw(fd);
                rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())
                    .map_err(io::Error::from)?;
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// True when a process with this pid exists (it may be a zombie).
pub fn exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Field 22 of `/proc/<pid>/stat`: start time in clock ticks since boot.
/// Together with the pid it names one process, even after pid reuse.
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_ticks(&stat)
}

/// The comm field may hold spaces and parentheses; fields resume after the last ')'.
fn parse_start_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ')' come fields 3.. ; field 22 is the 20th of those.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The process's argv, or None when it is gone or a kernel thread.
pub fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if raw.is_empty() {
        return None;
    }
    Some(
        raw.split(|&b| b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect(),
    )
}

/// Every numeric entry of /proc.
pub fn all_pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Resident set size in bytes, from `/proc/<pid>/status`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Term,
    Kill,
}

/// Sends a signal; a process that is already gone is not an error.
pub fn signal(pid: u32, sig: Signal) -> io::Result<()> {
    let Some(p) = Pid::from_raw(pid as i32) else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "pid 0"));
    };
    let s = match sig {
        Signal::Term => rustix::process::Signal::TERM,
        Signal::Kill => rustix::process::Signal::KILL,
    };
    match rustix::process::kill_process(p, s) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A handle on a process that may not be our child.
pub struct PidFd(OwnedFd);

impl PidFd {
    pub fn open(pid: u32) -> io::Result<PidFd> {
        let p = Pid::from_raw(pid as i32)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "pid 0"))?;
        Ok(PidFd(pidfd_open(p, PidfdFlags::empty())?))
    }

    /// Waits until the process exits; true if it did within `timeout`.
    pub fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ts = rustix::time::Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: i64::from(left.subsec_nanos()),
            };
            let fd = self.0.as_fd();
            let mut fds = [PollFd::new(&fd, PollFlags::IN)];
            match poll(&mut fds, Some(&ts)) {
                Ok(n) if n > 0 => return true,
                Ok(_) => return false,
                // EINTR: a signal arrived; the deadline still holds.
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => return false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_ticks_survive_spaces_and_parens_in_comm() {
        let stat = "1234 (qemu (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 3 0 98765 123456 789";
        assert_eq!(parse_start_ticks(stat), Some(98765));
    }

    #[test]
    fn our_own_process_is_visible() {
        let me = std::process::id();
        assert!(exists(me));
        assert!(start_ticks(me).is_some());
        assert!(cmdline(me).is_some());
        assert!(rss_bytes(me).unwrap() > 0);
    }

    #[test]
    fn signalling_a_vanished_pid_is_fine() {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(signal(pid, Signal::Term).is_ok());
    }

    #[test]
    fn pidfd_sees_a_detached_process_exit() {
        let mut child = spawn_detached(Command::new("sleep").arg("0.2")).unwrap();
        let fd = PidFd::open(child.id()).unwrap();
        let exited = fd.wait_exit(Duration::from_secs(5));
        child.wait().unwrap();
        assert!(exited);
    }

    #[test]
    fn pidfd_times_out_on_a_live_process() {
        let mut child = spawn_detached(Command::new("sleep").arg("5")).unwrap();
        let fd = PidFd::open(child.id()).unwrap();
        assert!(!fd.wait_exit(Duration::from_millis(100)));
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
