//! Processes the guest agent starts: qemu-ga's `guest-exec` and
//! `guest-exec-status` (output captured in memory and polled, as qemu-ga's
//! `qga/commands.c` does), and agentlab's `agentlab-exec` (output streamed
//! under credit, stdin, a pty, signals, a timeout).
//!
//! Every child leads its own session, so a signal to its process group
//! reaches everything it started. A child that cannot start (not found, not
//! executable, bad cwd, unknown user) is reported the way a shell would:
//! exit code 127 for "not found", 126 for everything else.
//! Not here: the fork-to-exec setup and the pty ioctls (`sys::pty`), frames
//! and credit (`stream`).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::Pid;
use rustix::event::{poll, PollFd, PollFlags};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::guest::stream::{lock, Control, Credit, Input, Outbox, Stream, Streams, Then};
use crate::qga::b64;
use crate::qga::wire::{
    self, kind, ExecArgs, Exit, GuestExec, GuestExecStatus, Started, DEFAULT_WINDOW,
    GUEST_EXEC_MAX_OUTPUT, MAX_DATA,
};
use crate::sys::process::PidFd;
use crate::sys::pty::{self, Creds};
use crate::sys::users::{self, Passwd};

/// `PATH` of every child: Debian's default, for root and users alike.
pub const BASE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Between SIGTERM and SIGKILL when a timeout hits.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// What a shell exits with when a command is not found, or found and not
/// runnable (POSIX, "Command Search and Execution").
pub const NOT_FOUND: i32 = 127;
pub const CANNOT_RUN: i32 = 126;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("argv is empty; give at least the program to run")]
    EmptyArgv,
    #[error(transparent)]
    StreamInUse(#[from] crate::guest::stream::StreamInUse),
    #[error("input-data is not base64: {0}")]
    InputData(String),
    #[error("capture-output {0} is not a bool or one of none, stdout, stderr, separated, merged")]
    CaptureMode(Value),
    #[error("{0}")]
    Start(#[from] StartError),
    /// qemu-ga's words for a pid it does not know (or already reaped).
    #[error("Invalid parameter 'pid'")]
    UnknownPid,
    #[error("{0} is not a signal number")]
    BadSignal(i32),
    #[error("cannot signal process group {pgid}")]
    Signal {
        pgid: u32,
        #[source]
        source: Errno,
    },
    #[error("stream {0} has no terminal to resize (it was not started with tty)")]
    NoTty(u32),
    #[error("cannot resize the terminal of stream {stream}")]
    Resize {
        stream: u32,
        #[source]
        source: io::Error,
    },
}

/// Why a process did not start; `code` is what a shell would exit with.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StartError {
    pub code: i32,
    pub message: String,
}

impl StartError {
    fn cannot_run(message: String) -> StartError {
        StartError {
            code: CANNOT_RUN,
            message,
        }
    }
}

/// Everything resolved before the fork.
#[derive(Debug)]
struct Launch {
    program: PathBuf,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: PathBuf,
    creds: Option<Creds>,
}

/// The account a child runs as, and the credentials to switch to (none when
/// no user was asked for: the child stays who the agent is).
fn account(user: Option<&str>) -> Result<(Passwd, Option<Creds>), StartError> {
    let Some(who) = user else {
        let uid = rustix::process::getuid().as_raw();
        let me = users::find_user(&uid.to_string()).unwrap_or_else(|| Passwd {
            name: uid.to_string(),
            uid,
            gid: rustix::process::getgid().as_raw(),
            home: "/".into(),
            shell: "/bin/sh".into(),
        });
        return Ok((me, None));
    };
    let pw = users::find_user(who).ok_or_else(|| {
        StartError::cannot_run(format!("unknown user {who}: no such entry in /etc/passwd"))
    })?;
    let creds = Creds {
        uid: pw.uid,
        gid: pw.gid,
        groups: users::groups_of(&pw.name, pw.gid),
    };
    Ok((pw, Some(creds)))
}

/// PATH, HOME, USER, LOGNAME, SHELL from the account; TERM on a terminal.
pub fn base_env(pw: &Passwd, tty: bool) -> Vec<(String, String)> {
    let shell = if pw.shell.is_empty() {
        "/bin/sh"
    } else {
        &pw.shell
    };
    let mut env = vec![
        ("PATH".to_string(), BASE_PATH.to_string()),
        ("HOME".to_string(), pw.home.clone()),
        ("USER".to_string(), pw.name.clone()),
        ("LOGNAME".to_string(), pw.name.clone()),
        ("SHELL".to_string(), shell.to_string()),
    ];
    if tty {
        env.push(("TERM".to_string(), "xterm-256color".to_string()));
    }
    env
}

/// Applies `K=V` entries over `env` (replacing a variable in place); a bare
/// `K` removes the variable.
pub fn add_env(env: &mut Vec<(String, String)>, entries: &[String]) {
    for entry in entries {
        let (key, value) = match entry.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (entry.as_str(), None),
        };
        if key.is_empty() {
            continue;
        }
        let at = env.iter().position(|(k, _)| k == key);
        match (at, value) {
            (Some(i), Some(v)) => env[i].1 = v.to_string(),
            (None, Some(v)) => env.push((key.to_string(), v.to_string())),
            (Some(i), None) => {
                env.remove(i);
            }
            (None, None) => {}
        }
    }
}

/// The directory to start in: `cwd` (relative to `home`) when given, which
/// must exist; else `home` when it exists; else `/`.
fn working_dir(cwd: Option<&str>, home: &str) -> Result<PathBuf, StartError> {
    let Some(cwd) = cwd else {
        let home = Path::new(home);
        return Ok(if home.is_dir() { home } else { Path::new("/") }.to_path_buf());
    };
    let dir = Path::new(home).join(cwd);
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(StartError::cannot_run(format!(
            "cannot change to directory {cwd}: no such directory"
        )))
    }
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Finds `program` the way a shell does: a name with a slash is taken as a
/// path (relative to `cwd`), anything else is looked up in `path_var`.
pub fn resolve(program: &str, path_var: &str, cwd: &Path) -> Result<PathBuf, StartError> {
    if program.contains('/') {
        let path = cwd.join(program);
        return match path.metadata() {
            Err(_) => Err(StartError {
                code: NOT_FOUND,
                message: format!("{program}: no such file or directory"),
            }),
            Ok(_) if !is_executable(&path) => Err(StartError::cannot_run(format!(
                "{program}: permission denied (not an executable file)"
            ))),
            Ok(_) => Ok(path),
        };
    }
    let candidates = path_var
        .split(':')
        .filter(|dir| !dir.is_empty() && !program.is_empty())
        .map(|dir| Path::new(dir).join(program));
    let mut not_executable = false;
    for path in candidates {
        if is_executable(&path) {
            return Ok(path);
        }
        not_executable |= path.exists();
    }
    Err(if not_executable {
        StartError::cannot_run(format!("{program}: permission denied"))
    } else {
        StartError {
            code: NOT_FOUND,
            message: format!("{program}: command not found"),
        }
    })
}

fn prepare(
    argv: &[String],
    user: Option<&str>,
    cwd: Option<&str>,
    make_env: impl FnOnce(&Passwd) -> Vec<(String, String)>,
) -> Result<Launch, StartError> {
    let (pw, creds) = account(user)?;
    let cwd = working_dir(cwd, &pw.home)?;
    let env = make_env(&pw);
    let path_var = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map_or(BASE_PATH, |(_, v)| v.as_str());
    let program = resolve(&argv[0], path_var, &cwd)?;
    Ok(Launch {
        program,
        argv: argv.to_vec(),
        env,
        cwd,
        creds,
    })
}

/// Forks and execs; the `Command` (and with it the parent's copies of the
/// child's stdio) is gone when this returns.
fn spawn(launch: &Launch, stdio: [Stdio; 3], tty: bool) -> Result<Child, StartError> {
    let [stdin, stdout, stderr] = stdio;
    let mut cmd = Command::new(&launch.program);
    cmd.arg0(&launch.argv[0])
        .args(&launch.argv[1..])
        .env_clear()
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&launch.cwd)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(stderr);
    pty::child_setup(&mut cmd, launch.creds.clone(), tty);
    cmd.spawn().map_err(|e| StartError {
        code: if e.kind() == io::ErrorKind::NotFound {
            NOT_FOUND
        } else {
            CANNOT_RUN
        },
        message: format!("cannot run {}: {e}", launch.argv[0]),
    })
}

fn stdio_error(what: &str) -> impl Fn(io::Error) -> StartError + '_ {
    move |e| StartError::cannot_run(format!("cannot set up {what}: {e}"))
}

// ---- agentlab-exec --------------------------------------------------------

/// A running `agentlab-exec` child, for the commands that act on it.
#[derive(Debug)]
pub struct Process {
    pid: u32,
    /// Set, under this lock, in the same step that reaps the child: a signal
    /// sent while it is false cannot reach a recycled pid.
    reaped: Mutex<bool>,
    master: Option<File>,
}

impl Process {
    /// `agentlab-signal`: signal the whole process group.
    pub fn signal(&self, signal: i32) -> Result<(), ExecError> {
        let sig = Signal::try_from(signal).map_err(|_| ExecError::BadSignal(signal))?;
        self.signal_group(sig)
    }

    /// `agentlab-cancel`.
    pub fn kill(&self) {
        if let Err(e) = self.signal_group(Signal::SIGKILL) {
            note!("{}", crate::log::error_chain(&e));
        }
    }

    fn signal_group(&self, sig: Signal) -> Result<(), ExecError> {
        let reaped = lock(&self.reaped);
        if *reaped {
            return Ok(());
        }
        match killpg(Pid::from_raw(self.pid as i32), sig) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(source) => Err(ExecError::Signal {
                pgid: self.pid,
                source,
            }),
        }
    }

    /// `agentlab-resize`.
    pub fn resize(&self, stream: u32, rows: u16, cols: u16) -> Result<(), ExecError> {
        let master = self.master.as_ref().ok_or(ExecError::NoTty(stream))?;
        pty::set_size(master, rows, cols).map_err(|source| ExecError::Resize { stream, source })
    }
}

/// A started child and the agent's ends of its stdio.
struct Spawned {
    child: Child,
    /// What to read, and the kind of frame it goes out as.
    outputs: Vec<(File, u8)>,
    stdin: Option<File>,
    master: Option<File>,
}

fn spawn_streamed(launch: &Launch, args: &ExecArgs) -> Result<Spawned, StartError> {
    let Some(size) = args.tty else {
        let stdin = if args.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        };
        let mut child = spawn(launch, [stdin, Stdio::piped(), Stdio::piped()], false)?;
        let stdin = child.stdin.take().map(|s| File::from(OwnedFd::from(s)));
        let out = child.stdout.take().map(|s| File::from(OwnedFd::from(s)));
        let err = child.stderr.take().map(|s| File::from(OwnedFd::from(s)));
        let outputs = [(out, kind::STDOUT), (err, kind::STDERR)]
            .into_iter()
            .filter_map(|(f, k)| Some((f?, k)))
            .collect();
        return Ok(Spawned {
            child,
            outputs,
            stdin,
            master: None,
        });
    };
    let pty = pty::open(size.rows, size.cols).map_err(stdio_error("a pseudo-terminal"))?;
    let slave = || pty.slave.try_clone().map(Stdio::from);
    let stdio = [slave(), slave(), slave()].map(|s| s.map_err(stdio_error("the pty")));
    let [a, b, c] = stdio;
    let child = spawn(launch, [a?, b?, c?], true)?;
    drop(pty.slave);
    let clone = || pty.master.try_clone().map_err(stdio_error("the pty"));
    let stdin = if args.stdin { Some(clone()?) } else { None };
    Ok(Spawned {
        child,
        outputs: vec![(clone()?, kind::STDOUT)],
        stdin,
        master: Some(pty.master),
    })
}

/// `agentlab-exec`: the answer (`Started`), and what to run once it is
/// queued: the threads whose frames and events must follow it.
pub fn start_streamed(
    args: ExecArgs,
    streams: &Arc<Streams>,
    outbox: &Outbox,
) -> Result<(Value, Then), ExecError> {
    if args.argv.is_empty() {
        return Err(ExecError::EmptyArgv);
    }
    let id = streams.claim(args.stream)?;
    let user = args.user.as_deref();
    let launched = prepare(&args.argv, user, args.cwd.as_deref(), |pw| {
        let mut env = base_env(pw, args.tty.is_some());
        add_env(&mut env, &args.env);
        env
    })
    .and_then(|launch| spawn_streamed(&launch, &args));
    let spawned = match launched {
        Ok(spawned) => spawned,
        Err(e) => return Ok(failed_start(id, e, outbox)),
    };
    let pid = spawned.child.id();
    let window = if args.stdin { DEFAULT_WINDOW } else { 0 };
    let process = Arc::new(Process {
        pid,
        reaped: Mutex::new(false),
        master: spawned.master,
    });
    let credit = Arc::new(Credit::new(args.window));
    let input = spawned
        .stdin
        .map(|stdin| Input::start(id, window, outbox.clone(), stdin_sink(id, stdin)));
    let stream = Stream {
        output: Some(Arc::clone(&credit)),
        input,
        control: Control::Exec(Arc::clone(&process)),
    };
    streams.insert(id, stream);
    let started = Started {
        stream: id,
        pid: Some(pid),
        window,
    };
    let running = Running {
        id,
        child: spawned.child,
        outputs: spawned.outputs,
        process,
        credit,
        timeout: args
            .timeout_ms
            .filter(|&ms| ms > 0)
            .map(Duration::from_millis),
    };
    let (streams, outbox) = (Arc::clone(streams), outbox.clone());
    Ok((
        json!(started),
        Box::new(move || running.watch(streams, outbox)),
    ))
}

/// A child that could not start: a stream all the same, whose only event
/// is its exit, as a shell would report it.
fn failed_start(id: u32, e: StartError, outbox: &Outbox) -> (Value, Then) {
    note!("stream {id}: {e}");
    let started = Started {
        stream: id,
        pid: None,
        window: 0,
    };
    let exit = Exit {
        stream: id,
        exitcode: Some(e.code),
        error: Some(e.message),
        ..Exit::default()
    };
    let outbox = outbox.clone();
    (
        json!(started),
        Box::new(move || outbox.event(wire::EVENT_EXIT, &exit)),
    )
}

/// A started `agentlab-exec` child, before its threads run.
struct Running {
    id: u32,
    child: Child,
    outputs: Vec<(File, u8)>,
    process: Arc<Process>,
    credit: Arc<Credit>,
    timeout: Option<Duration>,
}

impl Running {
    /// Starts the output pump and the thread that waits for the child; the
    /// exit event follows the last output, then the stream leaves the table.
    fn watch(self, streams: Arc<Streams>, outbox: Outbox) {
        let Running {
            id,
            child,
            outputs,
            process,
            credit,
            timeout,
        } = self;
        let pump_outbox = outbox.clone();
        let pump = std::thread::spawn(move || pump_output(id, outputs, &credit, &pump_outbox));
        std::thread::spawn(move || {
            let (status, timed_out) = supervise(child, timeout, &process);
            let _ = pump.join();
            streams.remove(id);
            let exit = Exit {
                stream: id,
                exitcode: status.as_ref().ok().and_then(ExitStatus::code),
                signal: status.as_ref().ok().and_then(ExitStatus::signal),
                timed_out,
                error: status
                    .err()
                    .map(|e| format!("cannot wait for the process: {e}")),
            };
            outbox.event(wire::EVENT_EXIT, &exit);
        });
    }
}

/// Writes the host's stdin frames to the child; after the child stops
/// reading (EPIPE) the rest is dropped, still granting credit back.
fn stdin_sink(stream: u32, stdin: File) -> impl FnMut(&[u8]) + Send {
    let mut stdin = Some(stdin);
    move |chunk| {
        let Some(f) = stdin.as_mut() else { return };
        if let Err(e) = f.write_all(chunk) {
            if e.kind() != io::ErrorKind::BrokenPipe {
                note!("stream {stream}: cannot write to stdin: {e}");
            }
            stdin = None;
        }
    }
}

/// Indices of the sources that have data or hit end of file.
fn wait_readable(sources: &[(File, u8)]) -> io::Result<Vec<usize>> {
    let mut fds: Vec<PollFd<'_>> = sources
        .iter()
        .map(|(f, _)| PollFd::new(f, PollFlags::IN))
        .collect();
    loop {
        match poll(&mut fds, None) {
            Ok(_) => break,
            // A signal interrupted the wait; nothing changed, wait again.
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(fds
        .iter()
        .enumerate()
        .filter(|(_, fd)| !fd.revents().is_empty())
        .map(|(i, _)| i)
        .collect())
}

/// Sends the child's output as data frames, never beyond the credit: with
/// none left it stops reading, and the full pipe stops the child.
fn pump_output(stream: u32, mut sources: Vec<(File, u8)>, credit: &Credit, outbox: &Outbox) {
    let mut buf = vec![0u8; MAX_DATA];
    while !sources.is_empty() {
        let Some(mut budget) = credit.wait() else {
            return;
        };
        let ready = match wait_readable(&sources) {
            Ok(ready) => ready,
            Err(e) => {
                note!("stream {stream}: cannot poll the child's output: {e}");
                return;
            }
        };
        let mut ended = Vec::new();
        for i in ready {
            if budget == 0 {
                break;
            }
            let (file, kind) = &mut sources[i];
            match file.read(&mut buf[..budget]) {
                Ok(0) => ended.push(i),
                Ok(n) => {
                    outbox.data(stream, *kind, &buf[..n]);
                    credit.consume(n);
                    budget -= n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // EIO is how a pty master says every slave fd is closed.
                Err(_) => ended.push(i),
            }
        }
        for i in ended.into_iter().rev() {
            sources.remove(i);
        }
    }
}

/// Waits for the child (killing its group when `timeout` passes) and reaps
/// it; whether the timeout hit.
fn supervise(
    mut child: Child,
    timeout: Option<Duration>,
    process: &Process,
) -> (io::Result<ExitStatus>, bool) {
    let mut timed_out = false;
    if let Some(limit) = timeout {
        match PidFd::open(process.pid) {
            Ok(fd) if !fd.wait_exit(limit) => {
                timed_out = true;
                let _ = process.signal_group(Signal::SIGTERM);
                fd.wait_exit(KILL_GRACE);
                // The leader may be gone, not what it started; its unreaped
                // zombie still holds the group id, so this cannot hit others.
                let _ = process.signal_group(Signal::SIGKILL);
            }
            Ok(_) => {}
            Err(e) => note!("pid {}: no pidfd, so no timeout: {e}", process.pid),
        }
    }
    // Wait without reaping, then reap under the lock signals take.
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT;
    while let Err(Errno::EINTR) = waitid(Id::Pid(Pid::from_raw(process.pid as i32)), flags) {}
    let mut reaped = lock(&process.reaped);
    let status = child.wait();
    *reaped = true;
    (status, timed_out)
}

// ---- qemu-ga guest-exec ---------------------------------------------------

/// `guest-exec-status` arguments.
#[derive(Debug, Deserialize)]
pub struct PidArg {
    pub pid: i64,
}

/// Which streams `guest-exec` keeps (qemu-ga 8.0's `GuestExecCaptureOutputMode`;
/// `true` is `Separated`, `false` and absent are `None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaptureMode {
    None,
    Stdout,
    Stderr,
    Separated,
    Merged,
}

pub fn capture_mode(v: Option<&Value>) -> Result<CaptureMode, ExecError> {
    Ok(match v {
        None | Some(Value::Null) | Some(Value::Bool(false)) => CaptureMode::None,
        Some(Value::Bool(true)) => CaptureMode::Separated,
        Some(Value::String(s)) => match s.as_str() {
            "none" => CaptureMode::None,
            "stdout" => CaptureMode::Stdout,
            "stderr" => CaptureMode::Stderr,
            "separated" => CaptureMode::Separated,
            "merged" => CaptureMode::Merged,
            _ => return Err(ExecError::CaptureMode(Value::String(s.clone()))),
        },
        Some(other) => return Err(ExecError::CaptureMode(other.clone())),
    })
}

#[derive(Debug, Default)]
struct Captured {
    data: Vec<u8>,
    truncated: bool,
}

#[derive(Debug, Default)]
struct JobState {
    status: Option<ExitStatus>,
    out: Captured,
    err: Captured,
    /// Capture pipes not yet at end of file.
    open: usize,
}

/// `guest-exec` children until `guest-exec-status` reports them exited.
#[derive(Default)]
pub struct Jobs {
    map: Mutex<HashMap<u32, Arc<Mutex<JobState>>>>,
}

impl Jobs {
    /// `guest-exec`: `{"pid": N}`. As qemu-ga: `env`, when given, is the
    /// whole environment, and a child that cannot start is an error here.
    pub fn exec(&self, args: GuestExec) -> Result<Value, ExecError> {
        let input = args
            .input_data
            .as_deref()
            .map(b64::decode)
            .transpose()
            .map_err(ExecError::InputData)?;
        let mode = capture_mode(args.capture_output.as_ref())?;
        let mut argv = vec![args.path.clone()];
        argv.extend(args.arg.iter().cloned());
        let launch = prepare(&argv, None, Some("/"), |pw| {
            if args.env.is_empty() {
                base_env(pw, false)
            } else {
                let mut env = Vec::new();
                add_env(&mut env, &args.env);
                env
            }
        })?;
        let stdin = if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        };
        let (stdout, stderr, merged) = capture_stdio(mode)?;
        let mut child = spawn(&launch, [stdin, stdout, stderr], false)?;
        let pid = child.id();
        let job = Arc::new(Mutex::new(JobState::default()));
        if let (Some(mut pipe), Some(data)) = (child.stdin.take(), input) {
            std::thread::spawn(move || pipe.write_all(&data));
        }
        let out = child.stdout.take().map(OwnedFd::from).or(merged);
        let err = child.stderr.take().map(OwnedFd::from);
        for (fd, is_err) in [(out, false), (err, true)] {
            if let Some(fd) = fd {
                lock(&job).open += 1;
                let job = Arc::clone(&job);
                std::thread::spawn(move || capture(File::from(fd), &job, is_err));
            }
        }
        let waited = Arc::clone(&job);
        std::thread::spawn(move || {
            if let Ok(status) = child.wait() {
                lock(&waited).status = Some(status);
            }
        });
        lock(&self.map).insert(pid, job);
        Ok(json!({ "pid": pid }))
    }

    /// `guest-exec-status`. The first answer with `exited: true` forgets the
    /// process; asking again is an error, as with qemu-ga.
    pub fn status(&self, pid: i64) -> Result<GuestExecStatus, ExecError> {
        let pid = u32::try_from(pid).map_err(|_| ExecError::UnknownPid)?;
        let mut map = lock(&self.map);
        let job = Arc::clone(map.get(&pid).ok_or(ExecError::UnknownPid)?);
        let mut job = lock(&job);
        let Some(status) = job.status.filter(|_| job.open == 0) else {
            return Ok(GuestExecStatus::default());
        };
        map.remove(&pid);
        let data = |c: &mut Captured| (!c.data.is_empty()).then(|| b64::encode(&c.data));
        Ok(GuestExecStatus {
            exited: true,
            exitcode: status.code(),
            signal: status.signal(),
            out_data: data(&mut job.out),
            err_data: data(&mut job.err),
            out_truncated: job.out.truncated,
            err_truncated: job.err.truncated,
        })
    }
}

/// stdout, stderr, and for `Merged` the read end of the pipe both write to.
fn capture_stdio(mode: CaptureMode) -> Result<(Stdio, Stdio, Option<OwnedFd>), StartError> {
    use CaptureMode as M;
    let piped = |on: bool| if on { Stdio::piped() } else { Stdio::null() };
    Ok(match mode {
        M::None | M::Stdout | M::Stderr | M::Separated => (
            piped(matches!(mode, M::Stdout | M::Separated)),
            piped(matches!(mode, M::Stderr | M::Separated)),
            None,
        ),
        M::Merged => {
            let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| stdio_error("a pipe")(e.into()))?;
            let write2 = write.try_clone().map_err(stdio_error("a pipe"))?;
            (Stdio::from(write), Stdio::from(write2), Some(read))
        }
    })
}

/// Keeps up to `GUEST_EXEC_MAX_OUTPUT` bytes, reading (and dropping) the
/// rest so the child never blocks on a full pipe.
fn capture(mut pipe: File, job: &Mutex<JobState>, is_err: bool) {
    let mut buf = vec![0u8; MAX_DATA];
    loop {
        let n = match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let mut job = lock(job);
        let slot = if is_err { &mut job.err } else { &mut job.out };
        let room = GUEST_EXEC_MAX_OUTPUT - slot.data.len();
        slot.data.extend_from_slice(&buf[..n.min(room)]);
        slot.truncated |= n > room;
    }
    lock(job).open -= 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pw(home: &str) -> Passwd {
        Passwd {
            name: "alice".into(),
            uid: 1000,
            gid: 1000,
            home: home.into(),
            shell: String::new(),
        }
    }

    #[test]
    fn base_env_comes_from_the_account() {
        let env = base_env(&pw("/home/alice"), true);
        assert_eq!(
            env,
            vec![
                ("PATH".to_string(), BASE_PATH.to_string()),
                ("HOME".to_string(), "/home/alice".to_string()),
                ("USER".to_string(), "alice".to_string()),
                ("LOGNAME".to_string(), "alice".to_string()),
                ("SHELL".to_string(), "/bin/sh".to_string()),
                ("TERM".to_string(), "xterm-256color".to_string()),
            ]
        );
    }

    #[test]
    fn env_entries_add_replace_and_remove() {
        let mut env = vec![("A".to_string(), "1".to_string()), ("B".into(), "2".into())];
        add_env(&mut env, &["B=3".into(), "C=x=y".into(), "A".into()]);
        assert_eq!(
            env,
            vec![
                ("B".to_string(), "3".to_string()),
                ("C".into(), "x=y".into())
            ]
        );
    }

    #[test]
    fn missing_command_is_not_found() {
        let err = resolve("no-such-command-x", BASE_PATH, Path::new("/")).unwrap_err();
        assert_eq!(err.code, NOT_FOUND);
    }

    #[test]
    fn command_is_found_on_the_path() {
        assert_eq!(
            resolve("busybox", "/nonexistent:/bin", Path::new("/")).unwrap(),
            PathBuf::from("/bin/busybox")
        );
    }

    #[test]
    fn non_executable_file_cannot_run() {
        let err = resolve("/etc/passwd", BASE_PATH, Path::new("/")).unwrap_err();
        assert_eq!(err.code, CANNOT_RUN);
    }

    #[test]
    fn relative_path_is_taken_from_the_cwd() {
        assert_eq!(
            resolve("./busybox", BASE_PATH, Path::new("/bin")).unwrap(),
            PathBuf::from("/bin/./busybox")
        );
    }

    #[test]
    fn missing_cwd_cannot_run() {
        let err = working_dir(Some("/no/such/dir"), "/").unwrap_err();
        assert_eq!(err.code, CANNOT_RUN);
    }

    #[test]
    fn missing_home_falls_back_to_root() {
        assert_eq!(
            working_dir(None, "/nonexistent").unwrap(),
            PathBuf::from("/")
        );
    }

    #[test]
    fn unknown_user_cannot_run() {
        let err = account(Some("no-such-user-x")).unwrap_err();
        assert_eq!(err.code, CANNOT_RUN);
    }

    #[test]
    fn capture_output_takes_bools_and_modes() {
        assert_eq!(
            [json!(true), json!(false), json!("merged")]
                .iter()
                .map(|v| capture_mode(Some(v)).unwrap())
                .collect::<Vec<_>>(),
            vec![
                CaptureMode::Separated,
                CaptureMode::None,
                CaptureMode::Merged
            ]
        );
        assert!(capture_mode(Some(&json!("both"))).is_err());
    }

    fn wait_status(jobs: &Jobs, pid: i64) -> GuestExecStatus {
        for _ in 0..500 {
            let st = jobs.status(pid).unwrap();
            if st.exited {
                return st;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("pid {pid} never exited");
    }

    #[test]
    fn merged_capture_puts_both_streams_in_out_data() {
        let jobs = Jobs::default();
        let args = GuestExec {
            path: "/bin/sh".into(),
            arg: vec!["-c".into(), "echo a; echo b >&2".into()],
            capture_output: Some(json!("merged")),
            ..GuestExec::default()
        };
        let pid = jobs.exec(args).unwrap()["pid"].as_i64().unwrap();
        let st = wait_status(&jobs, pid);
        assert_eq!(
            (st.out_data.as_deref(), st.err_data),
            (Some(b64::encode(b"a\nb\n").as_str()), None)
        );
    }

    #[test]
    fn guest_exec_env_replaces_the_environment() {
        let jobs = Jobs::default();
        let args = GuestExec {
            path: "/usr/bin/env".into(),
            env: vec!["ONLY=1".into()],
            capture_output: Some(json!(true)),
            ..GuestExec::default()
        };
        let pid = jobs.exec(args).unwrap()["pid"].as_i64().unwrap();
        let st = wait_status(&jobs, pid);
        assert_eq!(st.out_data, Some(b64::encode(b"ONLY=1\n")));
    }
}
