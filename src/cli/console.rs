//! `agentlab console <id>`: the sandbox's serial console, live. Ctrl-] detaches.

use std::io::{IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;

use argh::FromArgs;

use super::connect::client;
use super::{output, CliError, Global};
use crate::api::http::percent_encode_component;
use crate::qga::frames::FrameReader;
use crate::qga::wire::{self, kind, Frame, Message};
use crate::sys::tty::RawMode;

/// Ctrl-] (GS), as telnet and virsh console use it.
const DETACH: u8 = 0x1d;

#[derive(FromArgs)]
/// Attach to a sandbox's serial console (the default guest has a root shell there). Ctrl-] detaches.
#[argh(
    subcommand,
    name = "console",
    example = "agentlab console 1000",
    example = "agentlab console --ro 1000     # watch only",
    error_code(1, "unknown sandbox, or it is not running"),
    error_code(2, "the daemon or the host failed")
)]
pub struct ConsoleCmd {
    /// watch only: nothing typed reaches the guest
    #[argh(switch)]
    ro: bool,
    /// sandbox VMID or name
    #[argh(positional)]
    id: String,
}

pub fn run(g: &Global, c: ConsoleCmd) -> Result<(), CliError> {
    let q = if c.ro { "?ro=1" } else { "" };
    let path = format!(
        "/v1/sandboxes/{}/console{q}",
        percent_encode_component(&c.id)
    );
    let up = client(g)?.upgrade("GET", &path, None)?;
    output::progress(
        &format!(
            "Connected to the console of sandbox {}{}; press Ctrl-] to detach.",
            c.id,
            if c.ro { " (read-only)" } else { "" }
        ),
        true,
    );
    let raw = RawMode::stdin();
    let writer = up.stream.try_clone()?;
    let interactive = std::io::stdin().is_terminal();
    // Read-only still watches stdin for the detach key.
    std::thread::spawn(move || pump_keys(writer, c.ro, interactive));
    let mut frames = FrameReader::new(up.stream, &up.pending, 1 << 20);
    let mut out = std::io::stdout().lock();
    let end = loop {
        match frames.next_frame() {
            Ok(Some(Frame::Data {
                kind: kind::CONSOLE,
                payload,
                ..
            })) => {
                if out.write_all(&payload).and_then(|()| out.flush()).is_err() {
                    break None;
                }
            }
            Ok(Some(Frame::Json(j))) => {
                if let Ok(Message::Event { name, data }) = Message::parse(&j) {
                    if name == wire::EVENT_EOF {
                        break Some(
                            data["error"]
                                .as_str()
                                .unwrap_or("the console closed")
                                .to_string(),
                        );
                    }
                }
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break None,
        }
    };
    drop(raw);
    match end {
        Some(why) => output::progress(&format!("\r\nagentlab: {why}"), true),
        None => output::progress("\r\nagentlab: detached", true),
    }
    Ok(())
}

/// Keys to the guest until Ctrl-] (or end of input), then hang up.
fn pump_keys(mut w: UnixStream, read_only: bool, interactive: bool) {
    let mut buf = [0u8; 4096];
    let mut stdin = std::io::stdin().lock();
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let (keys, detach) = match buf[..n].iter().position(|&b| b == DETACH && interactive) {
            Some(i) => (&buf[..i], true),
            None => (&buf[..n], false),
        };
        if !read_only
            && !keys.is_empty()
            && w.write_all(&wire::encode_data(0, kind::STDIN, keys))
                .is_err()
        {
            break;
        }
        if detach {
            break;
        }
    }
    // Hanging up ends the session on both sides.
    let _ = w.shutdown(std::net::Shutdown::Both);
}
