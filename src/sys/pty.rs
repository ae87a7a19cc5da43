//! Pseudo-terminals (pty(7)) and the child-side setup of a process the guest
//! agent starts: new session, credentials, controlling terminal.
//!
//! Owns the ioctls (`TIOCGPTPEER`, `TIOCSWINSZ`, `TIOCSCTTY`) and the code that
//! runs between fork and exec. What runs, with which environment and where
//! its output goes is `guest::exec`'s business.

use std::fs::File;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::unistd::{Gid, Uid};
use rustix::fs::{Mode, OFlags};
use rustix::pty::OpenptFlags;
use rustix::termios::Winsize;

/// Both ends of a new pseudo-terminal, close-on-exec.
#[derive(Debug)]
pub struct Pty {
    /// The agent's end: what the child writes comes out here; what is
    /// written here is the child's input.
    pub master: File,
    /// The child's end, to become its stdin, stdout, stderr and controlling tty.
    pub slave: File,
}

/// Opens a new pty of `rows` x `cols`.
pub fn open(rows: u16, cols: u16) -> io::Result<Pty> {
    let flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
    let master = rustix::pty::openpt(flags)?;
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    // TIOCGPTPEER (Linux 4.13) opens the slave without a path lookup; the
    // path is the fallback for older kernels.
    let slave = match rustix::pty::ioctl_tiocgptpeer(&master, flags) {
        Ok(fd) => fd,
        Err(_) => {
            let name = rustix::pty::ptsname(&master, Vec::new())?;
            let oflags = OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC;
            rustix::fs::open(name.as_c_str(), oflags, Mode::empty())?
        }
    };
    set_size(&master, rows, cols)?;
    Ok(Pty {
        master: File::from(master),
        slave: File::from(slave),
    })
}

/// TIOCSWINSZ: the kernel sends SIGWINCH to the terminal's foreground group.
pub fn set_size(master: &impl std::os::fd::AsFd, rows: u16, cols: u16) -> io::Result<()> {
    let size = Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    rustix::termios::tcsetwinsize(master, size)?;
    Ok(())
}

/// Who the child runs as. Groups are resolved before the fork: nothing
/// between fork and exec may allocate or read files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (setgroups(2)), usually starting with `gid`.
    pub groups: Vec<u32>,
}

/// Makes `cmd`'s child the leader of a new session (so a signal to its
/// process group reaches everything it starts), with an empty signal mask,
/// running as `creds` when given, and, with `controlling_tty`, with its stdin
/// (a pty slave) as its controlling terminal.
pub fn child_setup(cmd: &mut Command, creds: Option<Creds>, controlling_tty: bool) {
    let ids = creds.map(|c| {
        let groups: Vec<Gid> = c.groups.iter().map(|&g| Gid::from_raw(g)).collect();
        (Uid::from_raw(c.uid), Gid::from_raw(c.gid), groups)
    });
    // SAFETY: the closure runs in the child between fork and exec, after std
    // has set up stdio. It calls only async-signal-safe functions
    // (pthread_sigmask, setgroups, setgid, setuid, setsid, ioctl) on values
    // built before the fork, allocates nothing and touches no lock. Groups go
    // first and the uid last: once the uid is dropped the others are refused.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::signal::SigSet::empty()
                .thread_set_mask()
                .map_err(io::Error::from)?;
            if let Some((uid, gid, groups)) = &ids {
                nix::unistd::setgroups(groups).map_err(io::Error::from)?;
                nix::unistd::setgid(*gid).map_err(io::Error::from)?;
                nix::unistd::setuid(*uid).map_err(io::Error::from)?;
            }
            rustix::process::setsid().map_err(io::Error::from)?;
            if controlling_tty {
                rustix::process::ioctl_tiocsctty(rustix::stdio::stdin())
                    .map_err(io::Error::from)?;
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::process::Stdio;

    fn run_on_pty(script: &str, rows: u16, cols: u16) -> String {
        let pty = open(rows, cols).unwrap();
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", script])
            .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
            .stdout(Stdio::from(pty.slave.try_clone().unwrap()))
            .stderr(Stdio::from(pty.slave));
        child_setup(&mut cmd, None, true);
        let mut child = cmd.spawn().unwrap();
        drop(cmd);
        let mut out = Vec::new();
        let mut master = pty.master;
        // EIO once the last slave fd closes is the pty's end of file.
        let _ = master.read_to_end(&mut out);
        child.wait().unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn child_sees_the_size_it_was_opened_with() {
        assert_eq!(run_on_pty("stty size", 33, 101).trim(), "33 101");
    }

    #[test]
    fn child_has_the_pty_as_controlling_terminal() {
        // Opening /dev/tty fails (ENXIO) without a controlling terminal.
        let out = run_on_pty("tty && : </dev/tty && echo ctty", 24, 80);
        assert!(out.starts_with("/dev/pts/"), "{out}");
        assert!(out.trim_end().ends_with("ctty"), "{out}");
    }

    #[test]
    fn resize_changes_what_the_child_reads() {
        let pty = open(24, 80).unwrap();
        set_size(&pty.master, 50, 132).unwrap();
        let size = rustix::termios::tcgetwinsize(&pty.slave).unwrap();
        assert_eq!((size.ws_row, size.ws_col), (50, 132));
    }

    #[test]
    fn child_leads_a_new_session() {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "cut -d' ' -f6 /proc/$$/stat"]);
        cmd.stdout(Stdio::piped());
        child_setup(&mut cmd, None, false);
        let child = cmd.spawn().unwrap();
        let pid = child.id();
        let out = child.wait_with_output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), pid.to_string());
    }

    #[test]
    fn child_runs_with_the_given_credentials() {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "id -u; id -g; id -G"]);
        cmd.stdout(Stdio::piped());
        let creds = Creds {
            uid: 65534,
            gid: 65534,
            groups: vec![65534, 5],
        };
        child_setup(&mut cmd, Some(creds), false);
        let out = cmd.spawn().unwrap().wait_with_output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "65534\n65534\n65534 5\n"
        );
    }
}
