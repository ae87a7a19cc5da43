//! `agentlab exec <id> -- <cmd> [args…]`: run a command in a sandbox, with
//! its output streamed as it is produced and its exit code as ours.

use std::io::{IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use argh::FromArgs;
use serde_json::{json, Value};

use super::connect::client;
use super::{output, CliError, Global};
use crate::api::http::percent_encode_component;
use crate::api::types::ExecRequest;
use crate::qga::frames::FrameReader;
use crate::qga::session::ExitStatus;
use crate::qga::wire::{self, kind, Frame, Message, TtySize};
use crate::sys::tty::{self, RawMode, Relayed};

#[derive(FromArgs)]
/// Run a command in a sandbox. Output streams as it comes; the exit code is the command's.
#[argh(
    subcommand,
    name = "exec",
    example = "agentlab exec 1000 -- uname -a",
    example = "echo hi | agentlab exec 1000 -- cat",
    example = "agentlab exec -it 1000 -- /bin/sh",
    example = "agentlab exec --timeout 30s --cwd /work -e CI=1 1000 -- make test",
    note = "stdin is forwarded when it is not a terminal (or with -i). Exit codes: the command's own; \
124 when --timeout killed it; 128+N when signal N killed it; 127/126 when it could not run; \
1 or 2 (with a message) when agentlab itself failed before the command ran.",
    error_code(124, "the command ran past --timeout and was killed")
)]
pub struct ExecCmd {
    /// keep stdin open even when it is a terminal
    #[argh(switch, short = 'i')]
    interactive: bool,
    /// give the command a terminal (use with -i for shells and editors)
    #[argh(switch, short = 't')]
    tty: bool,
    /// an environment variable for the command, KEY=VALUE (repeatable)
    #[argh(option, short = 'e')]
    env: Vec<String>,
    /// working directory in the guest (default: the user's home)
    #[argh(option)]
    cwd: Option<String>,
    /// run as this guest user (name or uid)
    #[argh(option, short = 'u')]
    user: Option<String>,
    /// kill the command after this long, e.g. 30s (exit code 124)
    #[argh(option)]
    timeout: Option<String>,
    /// wait for the end and print one JSON document with exit code and output
    #[argh(switch)]
    json: bool,
    /// sandbox VMID or name
    #[argh(positional)]
    id: String,
    /// the command and its arguments (after --)
    #[argh(positional, greedy)]
    command: Vec<String>,
}

/// `-it` → `-i -t`: argh takes one short switch per argument.
pub fn split_short_switches(args: &mut Vec<String>) {
    let Some(at) = args.iter().position(|a| a == "exec") else {
        return;
    };
    let end = args.iter().position(|a| a == "--").unwrap_or(args.len());
    let mut i = at + 1;
    while i < end.min(args.len()) {
        let a = &args[i];
        let combined = a.len() > 2
            && a.starts_with('-')
            && !a.starts_with("--")
            && a[1..].chars().all(|c| c == 'i' || c == 't');
        if combined {
            let parts: Vec<String> = a[1..].chars().map(|c| format!("-{c}")).collect();
            let n = parts.len();
            args.splice(i..=i, parts);
            i += n;
        } else {
            i += 1;
        }
    }
}

pub fn run(g: &Global, c: ExecCmd) -> Result<(), CliError> {
    if c.command.is_empty() {
        return Err(CliError::User(
            "give the command after the sandbox: agentlab exec <id> -- <cmd> [args…]".into(),
        ));
    }
    let stdin_is_tty = std::io::stdin().is_terminal();
    let tty = match (c.tty, tty::window_size()) {
        (true, Some((rows, cols))) if stdin_is_tty => Some(TtySize { rows, cols }),
        (true, _) => {
            output::progress(
                "agentlab: -t: this is not a terminal; running without one",
                true,
            );
            None
        }
        (false, _) => None,
    };
    let req = ExecRequest {
        argv: c.command.clone(),
        env: c.env.clone(),
        cwd: c.cwd.clone(),
        user: c.user.clone(),
        timeout: c.timeout.clone(),
        tty,
        stdin: c.interactive || !stdin_is_tty,
        ..Default::default()
    };
    req.to_spec().map_err(CliError::User)?;
    let path = format!("/v1/sandboxes/{}/exec", percent_encode_component(&c.id));
    let cl = client(g)?;
    if c.json {
        return exec_json(&cl, &path, req);
    }
    let up = cl.upgrade("POST", &path, Some(&json!(req)))?;
    let status = session(up, req.stdin, tty.is_some())?;
    finish(&status)
}

/// `--json`: the daemon gathers the output; one document at the end.
fn exec_json(
    cl: &crate::api::client::Client,
    path: &str,
    mut req: ExecRequest,
) -> Result<(), CliError> {
    if req.stdin {
        let mut data = Vec::new();
        std::io::stdin().read_to_end(&mut data)?;
        if !data.is_empty() {
            req.input = Some(crate::qga::b64::encode(&data));
        }
        req.stdin = false;
    }
    req.stream = Some(false);
    let v = cl.post(path, &json!(req))?;
    output::print_json(&v)?;
    finish(&ExitStatus {
        code: v["exit_code"].as_i64().map(|c| c as i32),
        signal: v["signal"].as_i64().map(|s| s as i32),
        timed_out: v["timed_out"] == true,
        error: None,
        truncated: false,
    })
}

fn send(w: &Arc<Mutex<UnixStream>>, bytes: &[u8]) -> std::io::Result<()> {
    w.lock().unwrap_or_else(|e| e.into_inner()).write_all(bytes)
}

fn request(name: &str, args: Value) -> Vec<u8> {
    Message::Request {
        execute: name.into(),
        arguments: args,
        id: None,
    }
    .encode()
}

/// Streams the command's output here and our input (and signals) there.
fn session(
    up: crate::api::client::Upgraded,
    forward_stdin: bool,
    tty: bool,
) -> Result<ExitStatus, CliError> {
    let writer = Arc::new(Mutex::new(up.stream.try_clone()?));
    let w = writer.clone();
    tty::relay_signals(move |sig| {
        let msg = match sig {
            Relayed::Resize => match tty::window_size() {
                Some((rows, cols)) => request(
                    wire::CMD_RESIZE,
                    json!({ "stream": 0, "rows": rows, "cols": cols }),
                ),
                None => return true,
            },
            Relayed::Interrupt => request(wire::CMD_SIGNAL, json!({ "stream": 0, "signal": 2 })),
            Relayed::Terminate => request(wire::CMD_SIGNAL, json!({ "stream": 0, "signal": 15 })),
        };
        send(&w, &msg).is_ok()
    })?;
    let raw = if tty { RawMode::stdin() } else { None };
    if forward_stdin {
        let w = writer.clone();
        std::thread::spawn(move || pump_stdin(&w));
    }
    let mut frames = FrameReader::new(up.stream, &up.pending, 1 << 20);
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr());
    let result = loop {
        match frames.next_frame()? {
            Some(Frame::Data {
                kind: k, payload, ..
            }) => {
                let r = if k == kind::STDERR {
                    err.write_all(&payload)
                } else {
                    out.write_all(&payload).and_then(|()| out.flush())
                };
                if let Err(e) = r {
                    break Err(e.into());
                }
            }
            Some(Frame::Json(j)) => match Message::parse(&j) {
                Ok(Message::Event { name, data }) if name == wire::EVENT_EXIT => {
                    break serde_json::from_value::<ExitStatus>(data).map_err(|e| {
                        CliError::Host(format!("agentlabd sent a bad exit status: {e}"))
                    });
                }
                Ok(Message::Event { name, data }) if name == "agentlab-error" => {
                    let msg = data["error"].as_str().unwrap_or("exec failed").to_string();
                    let status = data["status"].as_u64().unwrap_or(500);
                    break Err(if (400..500).contains(&status) {
                        CliError::User(msg)
                    } else {
                        CliError::Host(msg)
                    });
                }
                _ => {}
            },
            Some(Frame::Sync) => {}
            None => {
                break Err(CliError::Host(
                    "agentlabd closed the session before the command ended".into(),
                ))
            }
        }
    };
    drop(raw);
    result
}

fn pump_stdin(w: &Arc<Mutex<UnixStream>>) {
    let mut buf = vec![0u8; wire::MAX_DATA];
    let mut stdin = std::io::stdin().lock();
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if send(w, &wire::encode_data(0, kind::STDIN, &buf[..n])).is_err() {
            return;
        }
    }
    let _ = send(w, &request(wire::CMD_STDIN_CLOSE, json!({ "stream": 0 })));
}

/// The command's exit code becomes ours.
fn finish(st: &ExitStatus) -> Result<(), CliError> {
    if let Some(e) = &st.error {
        eprintln!("agentlab: {e}");
    }
    let code = match (st.timed_out, st.code, st.signal) {
        (true, _, _) => {
            eprintln!("agentlab: the command ran past its timeout and was killed");
            124
        }
        (false, Some(c), _) => c,
        (false, None, Some(s)) => 128 + s,
        (false, None, None) => 1,
    };
    if code == 0 {
        Ok(())
    } else {
        Err(CliError::Exit(code.clamp(0, 255) as u8))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn combined_short_switches_split_before_the_command() {
        let mut a = args(&["agentlab", "exec", "-it", "1000", "--", "sh", "-it"]);
        split_short_switches(&mut a);
        assert_eq!(
            a,
            args(&["agentlab", "exec", "-i", "-t", "1000", "--", "sh", "-it"])
        );
    }

    #[test]
    fn other_arguments_are_left_alone() {
        let mut a = args(&["agentlab", "exec", "-e", "A=1", "1000", "--", "ls"]);
        split_short_switches(&mut a);
        assert_eq!(
            a,
            args(&["agentlab", "exec", "-e", "A=1", "1000", "--", "ls"])
        );
    }

    #[test]
    fn timeout_maps_to_124_and_signals_to_128_plus() {
        assert!(matches!(
            finish(&ExitStatus {
                timed_out: true,
                ..Default::default()
            }),
            Err(CliError::Exit(124))
        ));
        assert!(matches!(
            finish(&ExitStatus {
                signal: Some(9),
                ..Default::default()
            }),
            Err(CliError::Exit(137))
        ));
        assert!(finish(&ExitStatus {
            code: Some(0),
            ..Default::default()
        })
        .is_ok());
    }
}
