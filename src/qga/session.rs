//! What the host does with a guest agent: run commands, move file trees,
//! ask about the guest. One `Session` per sandbox, over an `AgentClient`.
//!
//! With agentlab's agent (it lists `agentlab-exec` in `guest-info`), output
//! streams as it is produced, stdin and PTYs work, and trees move as a tar
//! stream, all under flow control. With a stock qemu-ga the same operations
//! fall back to its own commands (`qga::fallback`).
//!
//! Every stream is held by a `StreamGuard`: a caller that gives up before
//! the stream's end (its client hung up, a copy failed) cancels it in the
//! guest, so nothing runs on there for nobody.

use std::io::{Read, Write};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::client::{AgentClient, AgentError, Item};
use super::fallback::Poll;
use super::wire::{self, kind};
pub use crate::model::GuestFacts;

/// Ordinary commands (not long exec/transfer) get this long.
pub(super) const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub version: String,
    /// agentlab's own agent (streaming extensions available).
    pub extended: bool,
}

/// A command to run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSpec {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub tty: Option<wire::TtySize>,
    #[serde(default)]
    pub stdin: bool,
    #[serde(default)]
    pub timeout: Option<Duration>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// Why the command could not run at all.
    pub error: Option<String>,
    /// Output was cut by a cap (qemu-ga's 16 MiB per stream).
    pub truncated: bool,
}

#[derive(Debug, PartialEq)]
pub enum Output {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(ExitStatus),
}

pub struct Session {
    pub(super) client: Arc<AgentClient>,
    pub(super) info: AgentInfo,
}

impl Session {
    /// Syncs with the agent and learns what it can do.
    pub fn open(client: Arc<AgentClient>, timeout: Duration) -> Result<Session, AgentError> {
        client.sync(timeout)?;
        let v = client.call("guest-info", Value::Null, timeout)?;
        let extended = v["supported_commands"].as_array().is_some_and(|cmds| {
            cmds.iter()
                .any(|c| c["name"] == wire::CMD_EXEC && c["enabled"] != false)
        });
        let info = AgentInfo {
            version: v["version"].as_str().unwrap_or("unknown").to_string(),
            extended,
        };
        Ok(Session { client, info })
    }

    pub fn info(&self) -> &AgentInfo {
        &self.info
    }

    pub fn client(&self) -> &Arc<AgentClient> {
        &self.client
    }

    pub fn ping(&self, timeout: Duration) -> Result<(), AgentError> {
        self.client
            .call("guest-ping", Value::Null, timeout)
            .map(|_| ())
    }

    /// OS, kernel, hostname and addresses, as far as the agent answers.
    pub fn facts(&self) -> GuestFacts {
        let os = self
            .client
            .call("guest-get-osinfo", Value::Null, CALL_TIMEOUT)
            .unwrap_or_default();
        let host = self
            .client
            .call("guest-get-host-name", Value::Null, CALL_TIMEOUT)
            .unwrap_or_default();
        let ifaces = self
            .client
            .call("guest-network-get-interfaces", Value::Null, CALL_TIMEOUT)
            .unwrap_or_default();
        // Guest-written, and kept in the sandbox's record: keep it short.
        let text = |v: &Value| fact(v.as_str().unwrap_or(""));
        GuestFacts {
            agent: fact(&self.info.version),
            os: text(if os["pretty-name"].is_string() {
                &os["pretty-name"]
            } else {
                &os["name"]
            }),
            kernel: text(&os["kernel-release"]),
            hostname: text(&host["host-name"]),
            addresses: addresses(&ifaces),
        }
    }

    /// Starts a command. Streams with agentlab's agent; with qemu-ga the
    /// output comes all at once when the command ends, and stdin must be
    /// given up front (`stdin_data`).
    pub fn exec(&self, spec: &ExecSpec, stdin_data: Option<Vec<u8>>) -> Result<Exec, AgentError> {
        if spec.argv.is_empty() {
            return Err(AgentError::Unsupported("no command given".into()));
        }
        if self.info.extended {
            self.exec_stream(spec)
        } else {
            self.exec_fallback(spec, stdin_data)
        }
    }

    /// Opens a stream, then runs the command that starts it in the guest
    /// (`args` gets the stream's number). On failure the stream is forgotten.
    fn start_stream(
        &self,
        command: &str,
        args: impl FnOnce(u32) -> Value,
    ) -> Result<(StreamGuard, Receiver<Item>, wire::Started), AgentError> {
        let (id, rx) = self.client.open_stream(wire::DEFAULT_WINDOW)?;
        let guard = StreamGuard {
            client: self.client.clone(),
            stream: id,
            finished: false,
        };
        let v = self.client.call(command, args(id), CALL_TIMEOUT)?;
        let started: wire::Started = serde_json::from_value(v)
            .map_err(|e| AgentError::Protocol(format!("{command} answer: {e}")))?;
        if started.stream != id {
            return Err(AgentError::Protocol(format!(
                "{command}: asked for stream {id}, the agent answered {}",
                started.stream
            )));
        }
        self.client.add_send_credit(id, started.window);
        Ok((guard, rx, started))
    }

    fn exec_stream(&self, spec: &ExecSpec) -> Result<Exec, AgentError> {
        let mut args = wire::ExecArgs {
            argv: spec.argv.clone(),
            env: spec.env.clone(),
            cwd: spec.cwd.clone(),
            user: spec.user.clone(),
            tty: spec.tty,
            stdin: spec.stdin,
            timeout_ms: spec.timeout.map(|t| t.as_millis() as u64),
            window: wire::DEFAULT_WINDOW,
            stream: None,
        };
        let (guard, rx, _) = self.start_stream(wire::CMD_EXEC, |id| {
            args.stream = Some(id);
            json!(args)
        })?;
        Ok(Exec {
            client: Some(self.client.clone()),
            stream: Some(guard.stream),
            inner: Inner::Stream {
                rx,
                unacked: 0,
                guard,
            },
            deadline: spec
                .timeout
                .map(|t| Instant::now() + t + Duration::from_secs(10)),
        })
    }

    /// Streams a tar of the guest's `path` (root name: its basename) into `sink`.
    pub fn tar_out(
        &self,
        path: &str,
        sink: &mut dyn Write,
        progress: &mut dyn FnMut(u64),
    ) -> Result<wire::TarDone, AgentError> {
        if !self.info.extended {
            return self.tar_out_fallback(path, sink, progress);
        }
        let (mut guard, rx, started) = self.start_stream(wire::CMD_TAR_OUT, |id| {
            json!(wire::TarArgs {
                path: path.to_string(),
                window: wire::DEFAULT_WINDOW,
                stream: Some(id),
            })
        })?;
        let mut total = 0u64;
        let mut unacked = 0u32;
        loop {
            match recv(&rx, CALL_TIMEOUT)? {
                Item::Data { payload, .. } => {
                    sink.write_all(&payload).map_err(AgentError::Io)?;
                    total += payload.len() as u64;
                    progress(total);
                    unacked += payload.len() as u32;
                    if unacked >= wire::DEFAULT_WINDOW / 2 {
                        self.client.grant(started.stream, unacked)?;
                        unacked = 0;
                    }
                }
                Item::Eof(done) => {
                    guard.finished = true;
                    return match done.error {
                        Some(e) => Err(AgentError::Command {
                            command: wire::CMD_TAR_OUT.into(),
                            class: "GenericError".into(),
                            desc: e,
                        }),
                        None => Ok(done),
                    };
                }
                Item::Exit(_) => {}
                Item::Broken(why) => return Err(AgentError::Protocol(why)),
            }
        }
    }

    /// Extracts the tar read from `source` into the guest's `path`, with
    /// docker-cp semantics: into `path` if it is a directory, else as `path`.
    /// `root` is the archive's top-level name (needed by the qemu-ga fallback).
    pub fn tar_in(
        &self,
        path: &str,
        root: &str,
        source: &mut dyn Read,
        progress: &mut dyn FnMut(u64),
    ) -> Result<wire::TarDone, AgentError> {
        if !self.info.extended {
            return self.tar_in_fallback(path, root, source, progress);
        }
        let (mut guard, rx, started) = self.start_stream(wire::CMD_TAR_IN, |id| {
            json!(wire::TarArgs {
                path: path.to_string(),
                window: wire::DEFAULT_WINDOW,
                stream: Some(id),
            })
        })?;
        let mut buf = vec![0u8; wire::MAX_DATA];
        let mut total = 0u64;
        loop {
            // The guest reports an extraction failure as early as it can.
            match rx.try_recv() {
                Ok(Item::Eof(done)) => {
                    if let Some(e) = done_error(&done) {
                        return Err(e);
                    }
                }
                Ok(Item::Broken(why)) => return Err(AgentError::Protocol(why)),
                _ => {}
            }
            let n = read_full(source, &mut buf).map_err(AgentError::Io)?;
            if n == 0 {
                break;
            }
            self.client
                .send_data(started.stream, kind::TAR, &buf[..n], CALL_TIMEOUT)?;
            total += n as u64;
            progress(total);
        }
        let v = self.client.call(
            wire::CMD_TAR_IN_END,
            json!(wire::StreamCredit {
                stream: started.stream,
                bytes: 0
            }),
            Duration::from_secs(600),
        )?;
        let done: wire::TarDone = serde_json::from_value(v)
            .map_err(|e| AgentError::Protocol(format!("agentlab-tar-in-end answer: {e}")))?;
        // The agent forgets the stream once it has answered tar-in-end.
        guard.finished = true;
        match done_error(&done) {
            Some(e) => Err(e),
            None => Ok(done),
        }
    }

    /// Asks the guest to power off, halt or reboot (no answer on success).
    pub fn shutdown(&self, mode: &str) -> Result<(), AgentError> {
        self.client
            .send_no_reply("guest-shutdown", json!({ "mode": mode }))
    }
}

/// A running command, streamed or polled.
pub struct Exec {
    /// `None` for a command some other channel already ran ([`Exec::finished`]).
    pub(super) client: Option<Arc<AgentClient>>,
    pub(super) stream: Option<u32>,
    pub(super) inner: Inner,
    /// After this the host gives up on the guest's own timeout and kills.
    pub(super) deadline: Option<Instant>,
}

pub(super) enum Inner {
    Stream {
        rx: Receiver<Item>,
        unacked: u32,
        guard: StreamGuard,
    },
    Poll(Poll),
    /// Output gathered elsewhere (a hypervisor's agent API), replayed.
    Done(std::collections::VecDeque<Output>),
}

impl Exec {
    /// A command that has already run to its end elsewhere (e.g. through
    /// Proxmox's `agent/exec`): `next` replays `outputs`, the exit last.
    pub fn finished(outputs: Vec<Output>) -> Exec {
        Exec {
            client: None,
            stream: None,
            inner: Inner::Done(outputs.into()),
            deadline: None,
        }
    }

    pub fn streaming(&self) -> bool {
        matches!(self.inner, Inner::Stream { .. })
    }

    /// The next piece of output, or the exit (always last). `idle` bounds the
    /// wait for a streamed command that prints nothing.
    pub fn next(&mut self, idle: Duration) -> Result<Output, AgentError> {
        let stream = self.stream;
        let deadline = self.deadline;
        match &mut self.inner {
            Inner::Stream { rx, unacked, guard } => {
                let wait = deadline.map_or(idle, |d| {
                    d.saturating_duration_since(Instant::now()).min(idle)
                });
                let item = match rx.recv_timeout(wait) {
                    Ok(i) => i,
                    Err(RecvTimeoutError::Timeout)
                        if deadline.is_some_and(|d| Instant::now() >= d) =>
                    {
                        let s = stream.unwrap_or(0);
                        let _ = guard.client.call(
                            wire::CMD_SIGNAL,
                            json!(wire::SignalArgs {
                                stream: s,
                                signal: 9
                            }),
                            CALL_TIMEOUT,
                        );
                        return Ok(Output::Exit(ExitStatus {
                            timed_out: true,
                            signal: Some(9),
                            ..Default::default()
                        }));
                    }
                    Err(RecvTimeoutError::Timeout) => return Err(AgentError::Timeout(wait)),
                    Err(RecvTimeoutError::Disconnected) => return Err(AgentError::Gone),
                };
                match item {
                    Item::Data { kind, payload } => {
                        *unacked += payload.len() as u32;
                        if *unacked >= wire::DEFAULT_WINDOW / 2 {
                            guard.client.grant(stream.unwrap_or(0), *unacked)?;
                            *unacked = 0;
                        }
                        Ok(if kind == wire::kind::STDERR {
                            Output::Stderr(payload)
                        } else {
                            Output::Stdout(payload)
                        })
                    }
                    Item::Exit(e) => {
                        guard.finished = true;
                        Ok(Output::Exit(ExitStatus {
                            code: e.exitcode,
                            signal: e.signal,
                            timed_out: e.timed_out,
                            error: e.error,
                            truncated: false,
                        }))
                    }
                    Item::Eof(_) => Err(AgentError::Protocol(
                        "an exec stream ended like a tar stream".into(),
                    )),
                    Item::Broken(why) => Err(AgentError::Protocol(why)),
                }
            }
            Inner::Poll(poll) => match &self.client {
                Some(c) => poll.next(c, deadline, idle),
                None => Err(AgentError::Gone),
            },
            Inner::Done(queue) => queue.pop_front().ok_or(AgentError::Gone),
        }
    }

    /// A handle for input and control, usable from another thread.
    pub fn control(&self) -> Control {
        Control {
            client: self.client.clone(),
            stream: self.stream,
        }
    }
}

/// Stdin, window size and signals for a streamed command.
#[derive(Clone)]
pub struct Control {
    client: Option<Arc<AgentClient>>,
    stream: Option<u32>,
}

impl Control {
    fn target(&self) -> Result<(&AgentClient, u32), AgentError> {
        match (&self.client, self.stream) {
            (Some(c), Some(s)) => Ok((c, s)),
            _ => Err(AgentError::Unsupported(
                "the guest's agent takes stdin only up front (stock qemu-ga)".into(),
            )),
        }
    }

    pub fn stdin(&self, data: &[u8]) -> Result<(), AgentError> {
        let (c, s) = self.target()?;
        c.send_data(s, kind::STDIN, data, Duration::from_secs(3600))
    }

    pub fn close_stdin(&self) -> Result<(), AgentError> {
        let (c, s) = self.target()?;
        c.call(
            wire::CMD_STDIN_CLOSE,
            json!(wire::StreamCredit {
                stream: s,
                bytes: 0
            }),
            CALL_TIMEOUT,
        )
        .map(|_| ())
    }

    pub fn resize(&self, size: wire::TtySize) -> Result<(), AgentError> {
        let (c, s) = self.target()?;
        c.call(
            wire::CMD_RESIZE,
            json!(wire::Resize {
                stream: s,
                rows: size.rows,
                cols: size.cols
            }),
            CALL_TIMEOUT,
        )
        .map(|_| ())
    }

    pub fn signal(&self, signal: i32) -> Result<(), AgentError> {
        let (c, s) = self.target()?;
        c.call(
            wire::CMD_SIGNAL,
            json!(wire::SignalArgs { stream: s, signal }),
            CALL_TIMEOUT,
        )
        .map(|_| ())
    }
}

/// Forgets a stream when dropped; one dropped before the stream's end (the
/// caller gave up: its client hung up, a copy failed midway) is cancelled in
/// the guest too, so no command or copy runs on for nobody.
pub(super) struct StreamGuard {
    client: Arc<AgentClient>,
    stream: u32,
    finished: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.finished {
            self.client.close_stream(self.stream);
        } else {
            self.client.cancel_stream(self.stream);
        }
    }
}

fn recv(rx: &Receiver<Item>, timeout: Duration) -> Result<Item, AgentError> {
    rx.recv_timeout(timeout).map_err(|e| match e {
        RecvTimeoutError::Timeout => AgentError::Timeout(timeout),
        RecvTimeoutError::Disconnected => AgentError::Gone,
    })
}

fn done_error(done: &wire::TarDone) -> Option<AgentError> {
    done.error.clone().map(|desc| AgentError::Command {
        command: wire::CMD_TAR_IN.into(),
        class: "GenericError".into(),
        desc,
    })
}

/// Fills `buf` as far as the reader allows; 0 only at end of input.
pub(super) fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Longest fact kept from what the guest reports, and most addresses.
const MAX_FACT: usize = 256;
const MAX_ADDRESSES: usize = 32;

fn fact(s: &str) -> String {
    let mut end = s.len().min(MAX_FACT);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].chars().filter(|c| !c.is_control()).collect()
}

fn addresses(ifaces: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for i in ifaces.as_array().into_iter().flatten() {
        if out.len() >= MAX_ADDRESSES {
            break;
        }
        let name = &fact(i["name"].as_str().unwrap_or("?"));
        if name == "lo" {
            continue;
        }
        for a in i["ip-addresses"].as_array().into_iter().flatten() {
            if let (Some(ip), Some(prefix)) = (a["ip-address"].as_str(), a["prefix"].as_u64()) {
                out.push(format!("{}/{prefix} ({name})", fact(ip)));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_facts_are_cut_short_and_stripped_of_control_characters() {
        let long = "é".repeat(1000);
        assert!(fact(&long).len() <= MAX_FACT);
        assert_eq!(fact("Debian\x1b[2J 12\n"), "Debian[2J 12");
        let many: Vec<Value> = (0..100)
            .map(|i| json!({"name": format!("eth{i}"), "ip-addresses": [{"ip-address": "10.0.0.1", "prefix": 8}]}))
            .collect();
        assert_eq!(addresses(&json!(many)).len(), MAX_ADDRESSES);
    }

    #[test]
    fn addresses_skip_loopback_and_name_the_interface() {
        let v = json!([
            {"name": "lo", "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8}]},
            {"name": "eth0", "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "10.77.0.5", "prefix": 16}]}
        ]);
        assert_eq!(addresses(&v), vec!["10.77.0.5/16 (eth0)".to_string()]);
    }
}
