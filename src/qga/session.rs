//! What the host does with a guest agent: run commands, move file trees,
//! ask about the guest. One `Session` per sandbox, over an `AgentClient`.
//!
//! With agentlab's agent (it lists `agentlab-exec` in `guest-info`), output
//! streams as it is produced, stdin and PTYs work, and trees move as a tar
//! stream, all under flow control. With a stock qemu-ga the same operations
//! fall back to its own commands: `guest-exec` then `guest-exec-status`
//! polling (output arrives at the end, capped by qemu-ga at 16 MiB per
//! stream), and trees through `tar` run in the guest plus
//! `guest-file-read`/`guest-file-write` of the archive.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::b64;
use super::client::{AgentClient, AgentError, Item};
use super::wire::{self, kind};
pub use crate::model::GuestFacts;

/// Ordinary commands (not long exec/transfer) get this long.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Chunk size for qemu-ga's guest-file-read/write in the fallback.
const FALLBACK_CHUNK: usize = 1 << 20;
/// How long a command killed for its timeout gets to be reaped (and give up
/// the output it printed) before the host stops asking.
const FALLBACK_KILL_GRACE: Duration = Duration::from_secs(2);
/// What qemu-ga's guest-exec answers when the program cannot start: glib's
/// `g_spawn` message, "Failed to execute child process “PROG” (strerror)".
const SPAWN_FAILED: &str = "Failed to execute child process";
/// Exit codes a shell gives a command it cannot find, or cannot run (POSIX
/// "Command Search and Execution"), as agentlab's agent does.
const NOT_FOUND: i32 = 127;
const CANNOT_RUN: i32 = 126;

/// Numbers the fallback's archives in the guest's /tmp: the daemon serves
/// many copies at once under one pid.
static FALLBACK_TMP: AtomicU64 = AtomicU64::new(0);

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
    client: Arc<AgentClient>,
    info: AgentInfo,
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
        GuestFacts {
            agent: self.info.version.clone(),
            os: os["pretty-name"]
                .as_str()
                .or(os["name"].as_str())
                .unwrap_or("")
                .to_string(),
            kernel: os["kernel-release"].as_str().unwrap_or("").to_string(),
            hostname: host["host-name"].as_str().unwrap_or("").to_string(),
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

    fn exec_stream(&self, spec: &ExecSpec) -> Result<Exec, AgentError> {
        let args = wire::ExecArgs {
            argv: spec.argv.clone(),
            env: spec.env.clone(),
            cwd: spec.cwd.clone(),
            user: spec.user.clone(),
            tty: spec.tty,
            stdin: spec.stdin,
            timeout_ms: spec.timeout.map(|t| t.as_millis() as u64),
            window: wire::DEFAULT_WINDOW,
        };
        let v = self
            .client
            .call(wire::CMD_EXEC, json!(args), CALL_TIMEOUT)?;
        let started: wire::Started = serde_json::from_value(v)
            .map_err(|e| AgentError::Protocol(format!("agentlab-exec answer: {e}")))?;
        let rx = self
            .client
            .take_stream(started.stream, wire::DEFAULT_WINDOW, started.window)?;
        Ok(Exec {
            client: self.client.clone(),
            stream: Some(started.stream),
            inner: Inner::Stream { rx, unacked: 0 },
            deadline: spec
                .timeout
                .map(|t| Instant::now() + t + Duration::from_secs(10)),
        })
    }

    fn exec_fallback(
        &self,
        spec: &ExecSpec,
        stdin_data: Option<Vec<u8>>,
    ) -> Result<Exec, AgentError> {
        if spec.tty.is_some() {
            return Err(AgentError::Unsupported(format!(
                "the guest's agent is a stock qemu-ga ({}), which cannot give a command a \
                 terminal; run it without -t (or use an image with agentlab's agent)",
                self.info.version
            )));
        }
        // qemu-ga has no cwd or user, and its env replaces the whole
        // environment; run through sh when any of them is asked for.
        let argv = wrap_for_qemu_ga(spec);
        let args = wire::GuestExec {
            path: argv[0].clone(),
            arg: argv[1..].to_vec(),
            env: Vec::new(),
            input_data: stdin_data.map(|d| b64::encode(&d)),
            capture_output: Some(json!(true)),
        };
        let (pid, queue) = match self.client.call("guest-exec", json!(args), CALL_TIMEOUT) {
            Ok(v) => {
                let pid = v["pid"]
                    .as_i64()
                    .ok_or_else(|| AgentError::Protocol(format!("guest-exec answered {v}")))?;
                (pid, VecDeque::new())
            }
            // A program that cannot start is the command's failure, told
            // with a shell's exit code, not the agent's.
            Err(AgentError::Command { desc, .. }) if desc.contains(SPAWN_FAILED) => (
                0,
                VecDeque::from([Output::Exit(spawn_failure(&argv[0], &desc))]),
            ),
            Err(e) => return Err(e),
        };
        let done = !queue.is_empty();
        Ok(Exec {
            client: self.client.clone(),
            stream: None,
            inner: Inner::Poll {
                pid,
                queue,
                done,
                delay: Duration::from_millis(5),
            },
            deadline: spec.timeout.map(|t| Instant::now() + t),
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
        let v = self.client.call(
            wire::CMD_TAR_OUT,
            json!(wire::TarArgs {
                path: path.to_string(),
                window: wire::DEFAULT_WINDOW
            }),
            CALL_TIMEOUT,
        )?;
        let started: wire::Started = serde_json::from_value(v)
            .map_err(|e| AgentError::Protocol(format!("agentlab-tar-out answer: {e}")))?;
        let rx = self
            .client
            .take_stream(started.stream, wire::DEFAULT_WINDOW, 0)?;
        let _close = CloseStream(&self.client, started.stream);
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
                    return match done.error {
                        Some(e) => Err(AgentError::Command {
                            command: wire::CMD_TAR_OUT.into(),
                            class: "GenericError".into(),
                            desc: e,
                        }),
                        None => Ok(done),
                    }
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
        let v = self.client.call(
            wire::CMD_TAR_IN,
            json!(wire::TarArgs {
                path: path.to_string(),
                window: wire::DEFAULT_WINDOW
            }),
            CALL_TIMEOUT,
        )?;
        let started: wire::Started = serde_json::from_value(v)
            .map_err(|e| AgentError::Protocol(format!("agentlab-tar-in answer: {e}")))?;
        let rx = self
            .client
            .take_stream(started.stream, wire::DEFAULT_WINDOW, started.window)?;
        let _close = CloseStream(&self.client, started.stream);
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

    // ---- qemu-ga fallbacks --------------------------------------------

    /// Runs a command to its end through qemu-ga and insists on exit 0.
    fn run_checked(&self, argv: &[&str]) -> Result<(), AgentError> {
        let spec = ExecSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let mut exec = self.exec_fallback(&spec, None)?;
        let mut err = Vec::new();
        loop {
            match exec.next(Duration::from_secs(600))? {
                Output::Stderr(d) => err.extend(d),
                Output::Stdout(_) => {}
                Output::Exit(st) if st.code == Some(0) => return Ok(()),
                Output::Exit(st) => {
                    return Err(AgentError::Command {
                        command: argv.join(" "),
                        class: "GenericError".into(),
                        desc: format!(
                            "exit {:?}: {}",
                            st.code,
                            String::from_utf8_lossy(&err).trim()
                        ),
                    })
                }
            }
        }
    }

    fn tar_out_fallback(
        &self,
        path: &str,
        sink: &mut dyn Write,
        progress: &mut dyn FnMut(u64),
    ) -> Result<wire::TarDone, AgentError> {
        let tmp = fallback_tmp();
        let (parent, name) = split_path(path);
        let script = "cd \"$1\" && tar -cf \"$3\" -- \"$2\"";
        self.run_checked(&["/bin/sh", "-c", script, "sh", &parent, &name, &tmp])?;
        let copied = self.read_file(&tmp, sink, progress);
        let _ = self.run_checked(&["/bin/rm", "-f", &tmp]);
        let bytes = copied?;
        Ok(wire::TarDone {
            stream: 0,
            entries: 0,
            bytes,
            error: None,
        })
    }

    fn tar_in_fallback(
        &self,
        path: &str,
        root: &str,
        source: &mut dyn Read,
        progress: &mut dyn FnMut(u64),
    ) -> Result<wire::TarDone, AgentError> {
        let tmp = fallback_tmp();
        let written = self.write_file(&tmp, source, progress);
        // docker cp: into DEST if it is a directory, else as DEST.
        let script = "set -e; if [ -d \"$1\" ]; then tar -C \"$1\" -xf \"$3\"; else \
                      p=$(dirname \"$1\"); mkdir -p \"$p\"; t=$(mktemp -d \"$p/.agentlab-cp.XXXXXX\"); \
                      tar -C \"$t\" -xf \"$3\"; rm -rf \"$1\"; mv \"$t/$2\" \"$1\"; rmdir \"$t\"; fi; rm -f \"$3\"";
        let extracted = written.and_then(|bytes| {
            self.run_checked(&["/bin/sh", "-c", script, "sh", path, root, &tmp])
                .map(|()| bytes)
        });
        if extracted.is_err() {
            let _ = self.run_checked(&["/bin/rm", "-f", &tmp]);
        }
        let bytes = extracted?;
        Ok(wire::TarDone {
            stream: 0,
            entries: 0,
            bytes,
            error: None,
        })
    }

    fn read_file(
        &self,
        path: &str,
        sink: &mut dyn Write,
        progress: &mut dyn FnMut(u64),
    ) -> Result<u64, AgentError> {
        let h = self.client.call(
            "guest-file-open",
            json!({ "path": path, "mode": "r" }),
            CALL_TIMEOUT,
        )?;
        let handle = h
            .as_i64()
            .ok_or_else(|| AgentError::Protocol(format!("guest-file-open answered {h}")))?;
        let mut total = 0u64;
        let result = loop {
            let v = match self.client.call(
                "guest-file-read",
                json!({ "handle": handle, "count": FALLBACK_CHUNK }),
                CALL_TIMEOUT,
            ) {
                Ok(v) => v,
                Err(e) => break Err(e),
            };
            let r: wire::GuestFileRead = match serde_json::from_value(v) {
                Ok(r) => r,
                Err(e) => break Err(AgentError::Protocol(format!("guest-file-read answer: {e}"))),
            };
            let data = match b64::decode(&r.buf_b64) {
                Ok(d) => d,
                Err(e) => break Err(AgentError::Protocol(format!("guest-file-read data: {e}"))),
            };
            if let Err(e) = sink.write_all(&data) {
                break Err(AgentError::Io(e));
            }
            total += data.len() as u64;
            progress(total);
            if r.eof || data.is_empty() {
                break Ok(total);
            }
        };
        let _ = self.client.call(
            "guest-file-close",
            json!({ "handle": handle }),
            CALL_TIMEOUT,
        );
        result
    }

    fn write_file(
        &self,
        path: &str,
        source: &mut dyn Read,
        progress: &mut dyn FnMut(u64),
    ) -> Result<u64, AgentError> {
        let h = self.client.call(
            "guest-file-open",
            json!({ "path": path, "mode": "w" }),
            CALL_TIMEOUT,
        )?;
        let handle = h
            .as_i64()
            .ok_or_else(|| AgentError::Protocol(format!("guest-file-open answered {h}")))?;
        let mut buf = vec![0u8; FALLBACK_CHUNK];
        let mut total = 0u64;
        let result = loop {
            let n = match read_full(source, &mut buf) {
                Ok(n) => n,
                Err(e) => break Err(AgentError::Io(e)),
            };
            if n == 0 {
                break Ok(total);
            }
            let args = json!({ "handle": handle, "buf-b64": b64::encode(&buf[..n]) });
            if let Err(e) = self.client.call("guest-file-write", args, CALL_TIMEOUT) {
                break Err(e);
            }
            total += n as u64;
            progress(total);
        };
        let _ = self.client.call(
            "guest-file-close",
            json!({ "handle": handle }),
            CALL_TIMEOUT,
        );
        result
    }
}

/// A running command, streamed or polled.
pub struct Exec {
    client: Arc<AgentClient>,
    stream: Option<u32>,
    inner: Inner,
    /// After this the host gives up on the guest's own timeout and kills.
    deadline: Option<Instant>,
}

enum Inner {
    Stream {
        rx: Receiver<Item>,
        unacked: u32,
    },
    Poll {
        pid: i64,
        queue: VecDeque<Output>,
        done: bool,
        delay: Duration,
    },
}

impl Exec {
    pub fn streaming(&self) -> bool {
        matches!(self.inner, Inner::Stream { .. })
    }

    /// The next piece of output, or the exit (always last). `idle` bounds the
    /// wait for a streamed command that prints nothing.
    pub fn next(&mut self, idle: Duration) -> Result<Output, AgentError> {
        let stream = self.stream;
        let deadline = self.deadline;
        match &mut self.inner {
            Inner::Stream { rx, unacked } => {
                let wait = deadline.map_or(idle, |d| {
                    d.saturating_duration_since(Instant::now()).min(idle)
                });
                let item = match rx.recv_timeout(wait) {
                    Ok(i) => i,
                    Err(RecvTimeoutError::Timeout)
                        if deadline.is_some_and(|d| Instant::now() >= d) =>
                    {
                        let s = stream.unwrap_or(0);
                        let _ = self.client.call(
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
                            self.client.grant(stream.unwrap_or(0), *unacked)?;
                            *unacked = 0;
                        }
                        Ok(if kind == wire::kind::STDERR {
                            Output::Stderr(payload)
                        } else {
                            Output::Stdout(payload)
                        })
                    }
                    Item::Exit(e) => Ok(Output::Exit(ExitStatus {
                        code: e.exitcode,
                        signal: e.signal,
                        timed_out: e.timed_out,
                        error: e.error,
                        truncated: false,
                    })),
                    Item::Eof(_) => Err(AgentError::Protocol(
                        "an exec stream ended like a tar stream".into(),
                    )),
                    Item::Broken(why) => Err(AgentError::Protocol(why)),
                }
            }
            Inner::Poll {
                pid,
                queue,
                done,
                delay,
            } => {
                loop {
                    if let Some(o) = queue.pop_front() {
                        return Ok(o);
                    }
                    if *done {
                        return Err(AgentError::Protocol("read past the exit".into()));
                    }
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        *done = true;
                        queue.extend(kill_and_reap(&self.client, *pid));
                        continue;
                    }
                    let Some(st) = exec_status(&self.client, *pid)? else {
                        std::thread::sleep(*delay);
                        *delay = (*delay * 2).min(Duration::from_millis(200));
                        continue;
                    };
                    // The first `exited: true` reaps the process: read it once only.
                    *done = true;
                    queue.extend(finished(&st)?);
                }
            }
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

/// `guest-exec-status`: the status once the process has exited (and its
/// output is all in), else None.
fn exec_status(
    client: &AgentClient,
    pid: i64,
) -> Result<Option<wire::GuestExecStatus>, AgentError> {
    let v = client.call("guest-exec-status", json!({ "pid": pid }), CALL_TIMEOUT)?;
    let st: wire::GuestExecStatus = serde_json::from_value(v)
        .map_err(|e| AgentError::Protocol(format!("guest-exec-status answer: {e}")))?;
    Ok(st.exited.then_some(st))
}

/// A polled command's output, then its exit.
fn finished(st: &wire::GuestExecStatus) -> Result<Vec<Output>, AgentError> {
    let decode = |d: &Option<String>| d.as_deref().map(b64::decode).transpose();
    let out = decode(&st.out_data).map_err(AgentError::Protocol)?;
    let err = decode(&st.err_data).map_err(AgentError::Protocol)?;
    let mut outputs: Vec<Output> = out
        .filter(|d| !d.is_empty())
        .map(Output::Stdout)
        .into_iter()
        .collect();
    outputs.extend(err.filter(|d| !d.is_empty()).map(Output::Stderr));
    outputs.push(Output::Exit(ExitStatus {
        code: st.exitcode,
        signal: st.signal,
        truncated: st.out_truncated || st.err_truncated,
        ..Default::default()
    }));
    Ok(outputs)
}

/// Ends a polled command that ran past its timeout. qemu-ga cannot signal
/// what it started, so it is asked to run `kill -9`; the command is then
/// polled a little longer, so that what it printed is not lost and qemu-ga
/// forgets it (it keeps a process until its exit has been read). Best
/// effort: a grandchild holding the output pipes keeps it from finishing.
fn kill_and_reap(client: &AgentClient, pid: i64) -> Vec<Output> {
    let kill = wire::GuestExec {
        path: "/bin/kill".into(),
        arg: vec!["-9".into(), pid.to_string()],
        ..Default::default()
    };
    let killer = client
        .call("guest-exec", json!(kill), CALL_TIMEOUT)
        .ok()
        .and_then(|v| v["pid"].as_i64());
    let give_up = Instant::now() + FALLBACK_KILL_GRACE;
    let mut outputs = Vec::new();
    while Instant::now() < give_up {
        match exec_status(client, pid) {
            Ok(Some(st)) => {
                outputs = finished(&st).unwrap_or_default();
                outputs.pop(); // its exit says "killed"; ours says why
                break;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(_) => break,
        }
    }
    if let Some(k) = killer {
        let _ = exec_status(client, k);
    }
    outputs.push(Output::Exit(ExitStatus {
        timed_out: true,
        signal: Some(9),
        ..Default::default()
    }));
    outputs
}

impl Drop for Exec {
    fn drop(&mut self) {
        if let Some(s) = self.stream {
            self.client.close_stream(s);
        }
    }
}

/// Stdin, window size and signals for a streamed command.
#[derive(Clone)]
pub struct Control {
    client: Arc<AgentClient>,
    stream: Option<u32>,
}

impl Control {
    fn stream(&self) -> Result<u32, AgentError> {
        self.stream.ok_or_else(|| {
            AgentError::Unsupported(
                "the guest's agent takes stdin only up front (stock qemu-ga)".into(),
            )
        })
    }

    pub fn stdin(&self, data: &[u8]) -> Result<(), AgentError> {
        self.client
            .send_data(self.stream()?, kind::STDIN, data, Duration::from_secs(3600))
    }

    pub fn close_stdin(&self) -> Result<(), AgentError> {
        let s = self.stream()?;
        self.client
            .call(
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
        let s = self.stream()?;
        self.client
            .call(
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
        let s = self.stream()?;
        self.client
            .call(
                wire::CMD_SIGNAL,
                json!(wire::SignalArgs { stream: s, signal }),
                CALL_TIMEOUT,
            )
            .map(|_| ())
    }
}

struct CloseStream<'a>(&'a Arc<AgentClient>, u32);

impl Drop for CloseStream<'_> {
    fn drop(&mut self) {
        self.0.close_stream(self.1);
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
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
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

/// `/var/log/x.log` → (`/var/log`, `x.log`); `/` has no parent to name it by.
fn split_path(path: &str) -> (String, String) {
    let trimmed = path.trim_end_matches('/');
    match trimmed.rsplit_once('/') {
        Some(("", name)) => ("/".to_string(), name.to_string()),
        Some((parent, name)) => (parent.to_string(), name.to_string()),
        None => (".".to_string(), trimmed.to_string()),
    }
}

/// A unique archive path in the guest's /tmp for one fallback copy.
fn fallback_tmp() -> String {
    let n = FALLBACK_TMP.fetch_add(1, Ordering::Relaxed);
    format!("/tmp/.agentlab-cp-{}-{n}.tar", std::process::id())
}

/// The exit of a command qemu-ga could not start, from its guest-exec error
/// (`…Failed to execute child process “PROG” (No such file or directory)…`):
/// 127 when the program is not there, 126 when it cannot run, with the
/// message a shell (and agentlab's agent) would give.
fn spawn_failure(program: &str, desc: &str) -> ExitStatus {
    let reason = desc
        .rsplit_once('(')
        .and_then(|(_, r)| r.split_once(')'))
        .map_or("cannot run it", |(r, _)| r);
    let (code, message) = match reason {
        "No such file or directory" if program.contains('/') => {
            (NOT_FOUND, format!("{program}: no such file or directory"))
        }
        "No such file or directory" => (NOT_FOUND, format!("{program}: command not found")),
        other => (CANNOT_RUN, format!("{program}: {}", other.to_lowercase())),
    };
    ExitStatus {
        code: Some(code),
        error: Some(message),
        ..Default::default()
    }
}

/// qemu-ga runs argv directly, and its env replaces the environment; env,
/// cwd and user go through `sh -c` (`export`, `cd`) and `su`.
fn wrap_for_qemu_ga(spec: &ExecSpec) -> Vec<String> {
    if spec.cwd.is_none() && spec.user.is_none() && spec.env.is_empty() {
        return spec.argv.clone();
    }
    let mut script = String::new();
    if !spec.env.is_empty() {
        let vars: Vec<String> = spec.env.iter().map(|e| shell_quote(e)).collect();
        script.push_str(&format!("export {} && ", vars.join(" ")));
    }
    if let Some(cwd) = &spec.cwd {
        script.push_str(&format!("cd {} && ", shell_quote(cwd)));
    }
    script.push_str("exec \"$@\"");
    let mut argv = vec!["/bin/sh".to_string(), "-c".into(), script, "sh".into()];
    argv.extend(spec.argv.iter().cloned());
    match &spec.user {
        Some(u) => {
            let inner: Vec<String> = argv.iter().map(|a| shell_quote(a)).collect();
            vec![
                "/bin/su".into(),
                "-s".into(),
                "/bin/sh".into(),
                u.clone(),
                "-c".into(),
                inner.join(" "),
            ]
        }
        None => argv,
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn addresses(ifaces: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for i in ifaces.as_array().into_iter().flatten() {
        let name = i["name"].as_str().unwrap_or("?");
        if name == "lo" {
            continue;
        }
        for a in i["ip-addresses"].as_array().into_iter().flatten() {
            if let (Some(ip), Some(prefix)) = (a["ip-address"].as_str(), a["prefix"].as_u64()) {
                out.push(format!("{ip}/{prefix} ({name})"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_parent_and_name() {
        assert_eq!(
            split_path("/var/log/x.log"),
            ("/var/log".into(), "x.log".into())
        );
        assert_eq!(split_path("/work/"), ("/".into(), "work".into()));
        assert_eq!(split_path("rel"), (".".into(), "rel".into()));
    }

    #[test]
    fn plain_commands_go_to_qemu_ga_unchanged() {
        let spec = ExecSpec {
            argv: vec!["ls".into(), "-l".into()],
            ..Default::default()
        };
        assert_eq!(wrap_for_qemu_ga(&spec), vec!["ls", "-l"]);
    }

    #[test]
    fn cwd_wraps_in_sh_with_quoting() {
        let spec = ExecSpec {
            argv: vec!["pwd".into()],
            cwd: Some("/tmp/it's".into()),
            ..Default::default()
        };
        let argv = wrap_for_qemu_ga(&spec);
        assert_eq!(
            argv[..3],
            [
                "/bin/sh".to_string(),
                "-c".into(),
                "cd '/tmp/it'\\''s' && exec \"$@\"".into()
            ]
        );
        assert_eq!(argv[4], "pwd");
    }

    #[test]
    fn env_is_exported_by_sh_rather_than_replacing_the_environment() {
        let spec = ExecSpec {
            argv: vec!["make".into()],
            env: vec!["CI=1".into(), "MSG=it's".into()],
            ..Default::default()
        };
        let argv = wrap_for_qemu_ga(&spec);
        assert_eq!(
            argv[2],
            "export 'CI=1' 'MSG=it'\\''s' && exec \"$@\"".to_string()
        );
        assert_eq!(argv[4], "make");
    }

    #[test]
    fn qemu_ga_spawn_failure_for_a_missing_command_is_127() {
        let desc = "Guest agent command failed, error was 'Failed to execute child process \
                    “nosuchcmd” (No such file or directory)'";
        let st = spawn_failure("nosuchcmd", desc);
        assert_eq!(st.code, Some(127));
        assert_eq!(st.error.as_deref(), Some("nosuchcmd: command not found"));
    }

    #[test]
    fn qemu_ga_spawn_failure_for_a_missing_path_is_127() {
        let desc = "Guest agent command failed, error was 'Failed to execute child process \
                    “/nonexist/x” (No such file or directory)'";
        let st = spawn_failure("/nonexist/x", desc);
        assert_eq!(st.code, Some(127));
        assert_eq!(
            st.error.as_deref(),
            Some("/nonexist/x: no such file or directory")
        );
    }

    #[test]
    fn qemu_ga_spawn_failure_for_a_file_that_cannot_run_is_126() {
        let desc = "Guest agent command failed, error was 'Failed to execute child process \
                    “/etc/passwd” (Permission denied)'";
        let st = spawn_failure("/etc/passwd", desc);
        assert_eq!(st.code, Some(126));
        assert_eq!(st.error.as_deref(), Some("/etc/passwd: permission denied"));
    }

    #[test]
    fn polled_status_gives_output_then_exit() {
        let st = wire::GuestExecStatus {
            exited: true,
            exitcode: Some(3),
            out_data: Some(b64::encode(b"out\n")),
            err_data: Some(String::new()),
            ..Default::default()
        };
        assert_eq!(
            finished(&st).unwrap(),
            vec![
                Output::Stdout(b"out\n".to_vec()),
                Output::Exit(ExitStatus {
                    code: Some(3),
                    ..Default::default()
                })
            ]
        );
    }

    #[test]
    fn fallback_archives_get_distinct_names() {
        assert_ne!(fallback_tmp(), fallback_tmp());
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
