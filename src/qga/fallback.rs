//! The qemu-ga fallback: what `Session` does when the guest runs a stock
//! qemu-ga instead of agentlab's agent. Commands run through `guest-exec`
//! and `guest-exec-status` polling (output arrives at the end, capped by
//! qemu-ga at 16 MiB per stream; stdin only up front; no terminal), and
//! trees move through `tar` run in the guest plus `guest-file-read` and
//! `guest-file-write` of the archive in a temporary file.
//!
//! How qemu-ga 7.2 behaves, as relied on here: a program that cannot start
//! fails `guest-exec` itself with glib's spawn message; the first
//! `exited: true` status forgets the process; `env` replaces the whole
//! environment; a process killed by a signal reports `signal`, not `exitcode`.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use super::b64;
use super::client::{AgentClient, AgentError};
use super::session::{read_full, Exec, ExecSpec, ExitStatus, Inner, Output, Session, CALL_TIMEOUT};
use super::wire;

/// Chunk size for qemu-ga's guest-file-read/write.
const CHUNK: usize = 1 << 20;
/// How long a command killed for its timeout gets to be reaped (and give up
/// the output it printed) before the host stops asking.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// What qemu-ga's guest-exec answers when the program cannot start: glib's
/// `g_spawn` message, "Failed to execute child process “PROG” (strerror)".
const SPAWN_FAILED: &str = "Failed to execute child process";
/// Exit codes a shell gives a command it cannot find, or cannot run (POSIX
/// "Command Search and Execution"), as agentlab's agent does.
const NOT_FOUND: i32 = 127;
const CANNOT_RUN: i32 = 126;

/// Numbers the archives in the guest's /tmp: the daemon serves many copies
/// at once under one pid.
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// A command started with `guest-exec`, polled until it has exited.
pub(super) struct Poll {
    pid: i64,
    queue: VecDeque<Output>,
    done: bool,
    delay: Duration,
}

impl Poll {
    /// The next output or the exit; `Timeout` after `idle` without either.
    pub(super) fn next(
        &mut self,
        client: &AgentClient,
        deadline: Option<Instant>,
        idle: Duration,
    ) -> Result<Output, AgentError> {
        let give_up = Instant::now() + idle;
        loop {
            if let Some(o) = self.queue.pop_front() {
                return Ok(o);
            }
            if self.done {
                return Err(AgentError::Protocol("read past the exit".into()));
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                self.done = true;
                self.queue.extend(kill_and_reap(client, self.pid));
                continue;
            }
            let Some(st) = exec_status(client, self.pid)? else {
                if Instant::now() >= give_up {
                    return Err(AgentError::Timeout(idle));
                }
                std::thread::sleep(self.delay);
                self.delay = (self.delay * 2).min(Duration::from_millis(200));
                continue;
            };
            // The first `exited: true` reaps the process: read it once only.
            self.done = true;
            self.queue.extend(finished(&st)?);
        }
    }
}

impl Session {
    pub(super) fn exec_fallback(
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
            client: Some(self.client.clone()),
            stream: None,
            inner: Inner::Poll(Poll {
                pid,
                queue,
                done,
                delay: Duration::from_millis(5),
            }),
            deadline: spec.timeout.map(|t| Instant::now() + t),
        })
    }

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

    pub(super) fn tar_out_fallback(
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

    pub(super) fn tar_in_fallback(
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
                json!({ "handle": handle, "count": CHUNK }),
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
        let mut buf = vec![0u8; CHUNK];
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
    let give_up = Instant::now() + KILL_GRACE;
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

/// `/var/log/x.log` → (`/var/log`, `x.log`); `/` has no parent to name it by.
pub(crate) fn split_path(path: &str) -> (String, String) {
    let trimmed = path.trim_end_matches('/');
    match trimmed.rsplit_once('/') {
        Some(("", name)) => ("/".to_string(), name.to_string()),
        Some((parent, name)) => (parent.to_string(), name.to_string()),
        None => (".".to_string(), trimmed.to_string()),
    }
}

/// A unique archive path in the guest's /tmp for one fallback copy.
fn fallback_tmp() -> String {
    let n = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
    format!("/tmp/.agentlab-cp-{}-{n}.tar", std::process::id())
}

/// The exit of a command qemu-ga could not start, from its guest-exec error
/// (`…Failed to execute child process “PROG” (No such file or directory)…`):
/// 127 when the program is not there, 126 when it cannot run, with the
/// message a shell (and agentlab's agent) would give.
pub(crate) fn spawn_failure(program: &str, desc: &str) -> ExitStatus {
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
pub(crate) fn wrap_for_qemu_ga(spec: &ExecSpec) -> Vec<String> {
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

pub(crate) fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
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
}
