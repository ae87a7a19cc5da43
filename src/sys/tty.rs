//! The local terminal, for `agentlab exec -it` and `agentlab console`: raw
//! mode (restored on drop, also when the command fails), the window size, and
//! the signals an interactive session relays (window changes, Ctrl-C).

use std::io::IsTerminal;
use std::os::fd::{AsFd, BorrowedFd};

use nix::sys::signal::{SigSet, Signal};
use rustix::termios::{self, OptionalActions, Termios};

/// Puts a terminal in raw mode until dropped.
pub struct RawMode {
    fd: BorrowedFd<'static>,
    saved: Termios,
}

impl RawMode {
    /// Raw mode on stdin, when stdin is a terminal.
    pub fn stdin() -> Option<RawMode> {
        if !std::io::stdin().is_terminal() {
            return None;
        }
        let fd = stdin_fd();
        let saved = termios::tcgetattr(fd).ok()?;
        let mut raw = saved.clone();
        raw.make_raw();
        termios::tcsetattr(fd, OptionalActions::Now, &raw).ok()?;
        Some(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(self.fd, OptionalActions::Now, &self.saved);
    }
}

/// Stdin's file descriptor, borrowed for the life of the process.
fn stdin_fd() -> BorrowedFd<'static> {
    // SAFETY: fd 0 is stdin, opened before main and never closed by
    // agentlab, so it stays valid for the rest of the process.
    unsafe { BorrowedFd::borrow_raw(0) }
}

/// The terminal size of stdout (rows, cols), when stdout is a terminal.
pub fn window_size() -> Option<(u16, u16)> {
    let out = std::io::stdout();
    if !out.is_terminal() {
        return None;
    }
    let ws = termios::tcgetwinsize(out.as_fd()).ok()?;
    (ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

/// What an interactive session relays from the local terminal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relayed {
    Resize,
    Interrupt,
    Terminate,
}

/// Blocks SIGWINCH, SIGINT and SIGTERM in this thread (call it before
/// spawning others, which inherit the mask) and calls `on` for each from a
/// thread of its own, until `on` returns false.
pub fn relay_signals(mut on: impl FnMut(Relayed) -> bool + Send + 'static) -> std::io::Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGWINCH);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block().map_err(std::io::Error::from)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let Ok(sig) = set.wait() else { return };
            let what = match sig {
                Signal::SIGWINCH => Relayed::Resize,
                Signal::SIGINT => Relayed::Interrupt,
                _ => Relayed::Terminate,
            };
            if !on(what) {
                return;
            }
        })?;
    Ok(())
}
