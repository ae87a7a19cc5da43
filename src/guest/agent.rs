//! `agentlab agent`: the guest agent. Finds the virtio-serial port the host
//! named `org.qemu.guest_agent.0`, and answers the QEMU guest-agent protocol
//! on it (`qga/qapi-schema.json`; framing, events, data frames and credit in
//! `qga::wire`), so the daemon — or libvirt's `virsh qemu-agent-command`, or
//! Proxmox's agent API — can run commands and move files, plus agentlab's
//! `agentlab-*` extensions: streamed output, stdin, a pty, signals, tar.
//!
//! One reader loop decodes and dispatches; long work runs on threads; one
//! writer thread owns the port's write side (`stream::run_writer`), so frames
//! never interleave. The host may come and go (virtio-serial has no
//! connections): reads then see end of file, writes fail, and the agent
//! carries on. Not here: the commands themselves (`exec`, `files`,
//! `sysinfo`) and stream plumbing (`stream`).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use argh::FromArgs;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::guest::exec::{self, Jobs, PidArg};
use crate::guest::files::{self, Files};
use crate::guest::stream::{run_writer, Control, Outbox, Streams, Then};
use crate::guest::sysinfo::{self, ShutdownArgs, ShutdownMode, SysInfoError};
use crate::qga::wire::{
    self, Decoder, Frame, Message, Resize, SignalArgs, StreamCredit, WireError, SYNC,
};

/// The port name QEMU gives the guest agent's channel (qemu-ga's default).
pub const PORT_NAME: &str = "org.qemu.guest_agent.0";
/// Where the kernel lists virtio-serial ports, one directory each with a `name`.
const VIRTIO_PORTS: &str = "/sys/class/virtio-ports";
/// Longest JSON message taken from the host.
pub const MAX_JSON: usize = 8 << 20;
/// The port may appear late (virtio_console loads after we start).
const FIND_EVERY: Duration = Duration::from_millis(200);
const FIND_FOR: Duration = Duration::from_secs(30);
/// A virtio port reads end of file while no host is connected; qemu-ga
/// pauses the same way rather than spin.
const EOF_PAUSE: Duration = Duration::from_millis(100);

/// The qemu-ga commands answered (`guest-info` lists these and `wire::EXTENSIONS`).
pub const QGA_COMMANDS: &[&str] = &[
    "guest-sync-delimited",
    "guest-sync",
    "guest-ping",
    "guest-info",
    "guest-get-osinfo",
    "guest-get-host-name",
    "guest-network-get-interfaces",
    "guest-exec",
    "guest-exec-status",
    "guest-file-open",
    "guest-file-read",
    "guest-file-write",
    "guest-file-seek",
    "guest-file-flush",
    "guest-file-close",
    "guest-shutdown",
];

#[derive(FromArgs)]
/// The guest agent: answers the QEMU guest-agent protocol (and agentlab's
/// extensions) on the virtio-serial port org.qemu.guest_agent.0.
#[argh(
    example = "agentlab agent                 # serve the port (init or systemd runs this)",
    example = "agentlab agent --install       # in a systemd guest: install and start the service",
    note = "--install writes /etc/systemd/system/agentlab-agent.service and a udev rule \
that starts it when QEMU's guest-agent port appears (as Debian's qemu-guest-agent \
does); it conflicts with qemu-guest-agent.service, since only one agent can hold the port."
)]
struct AgentArgs {
    /// the port to serve instead of the virtio-serial one: a character
    /// device, a pty or a Unix socket to connect to
    #[argh(option)]
    device: Option<PathBuf>,
    /// install the agent as a systemd service started with the port, and start it
    #[argh(switch)]
    install: bool,
    /// with --install: only write the files; run neither systemctl nor
    /// udevadm (for preparing an image offline)
    #[argh(switch)]
    no_enable: bool,
    /// with --install: unit directory (default /etc/systemd/system)
    #[argh(option, default = "PathBuf::from(\"/etc/systemd/system\")")]
    unit_dir: PathBuf,
    /// with --install: udev rules directory (default /etc/udev/rules.d)
    #[argh(option, default = "PathBuf::from(\"/etc/udev/rules.d\")")]
    udev_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("no virtio-serial port named {PORT_NAME} under {VIRTIO_PORTS} after {FIND_FOR:?}")]
    NoPort,
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A command's failure, as qemu-ga reports it: `{"error":{"class","desc"}}`.
#[derive(Debug)]
pub struct CmdError {
    class: &'static str,
    desc: String,
}

impl CmdError {
    fn generic(desc: String) -> CmdError {
        CmdError {
            class: "GenericError",
            desc,
        }
    }
}

impl<E: std::error::Error> From<E> for CmdError {
    fn from(e: E) -> CmdError {
        CmdError::generic(crate::log::error_chain(&e))
    }
}

/// What a command sends back.
enum Reply {
    Value(Value),
    /// The answer, then work whose frames must follow it.
    Then(Value, Then),
    /// `guest-sync-delimited`: 0xFF, then the answer.
    Delimited(Value),
    /// `guest-shutdown` succeeded: nothing, as qemu-ga.
    Nothing,
}

/// Turns the machine off; `sysinfo::power` in a guest, a fake in tests.
pub type PowerFn = Box<dyn Fn(ShutdownMode) -> Result<(), SysInfoError> + Send>;

/// The agent's state across host connections.
pub struct Server {
    decoder: Decoder,
    outbox: Outbox,
    streams: Arc<Streams>,
    jobs: Jobs,
    files: Files,
    power: PowerFn,
}

/// Serves one host over any byte pipe until it reads end of file, then
/// cancels the streams still running: the agent on a port of your choosing
/// (tests use `Server::new` with a fake power switch instead: here
/// `guest-shutdown` really powers the machine off).
pub fn serve<R: Read, W: Write + Send + 'static>(reader: R, writer: W) -> io::Result<()> {
    let mut server = Server::new(Box::new(writer), Box::new(sysinfo::power));
    let result = server.run(reader);
    server.stop();
    result
}

impl Server {
    /// Starts the writer thread on `writer`.
    pub fn new(writer: Box<dyn Write + Send>, power: PowerFn) -> Server {
        let (outbox, rx) = Outbox::new();
        std::thread::spawn(move || run_writer(rx, writer));
        Server {
            decoder: Decoder::new(MAX_JSON),
            outbox,
            streams: Arc::new(Streams::default()),
            jobs: Jobs::default(),
            files: Files::default(),
            power,
        }
    }

    /// The port was reopened: answers go to `writer` from now on.
    pub fn set_writer(&mut self, writer: Box<dyn Write + Send>) {
        self.host_gone();
        self.outbox.set_sink(writer);
    }

    /// The host went away: half a message it left is dropped, so the next
    /// host's first request parses even if it does not resync with 0xFF
    /// first, and its streams are cancelled: their frames had nowhere to go
    /// and no later host knows their numbers, so a command would otherwise
    /// block on credit forever.
    pub fn host_gone(&mut self) {
        self.decoder = Decoder::new(MAX_JSON);
        self.streams.cancel_all();
    }

    /// Reads and serves until end of file or a read error.
    pub fn run(&mut self, mut reader: impl Read) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => self.feed(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Cancels every stream: kills exec process groups, stops tar streams.
    pub fn stop(&self) {
        self.streams.cancel_all();
    }

    /// Decodes bytes from the host and acts on every whole frame in them.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.decoder.push(bytes);
        let mut stray = 0usize;
        while let Some(frame) = self.decoder.next() {
            match frame {
                // The host resynced; it expects nothing but a parser reset,
                // which the decoder did.
                Ok(Frame::Sync) => {}
                Ok(Frame::Json(bytes)) => self.message(&bytes),
                Ok(Frame::Data {
                    chan,
                    kind,
                    payload,
                }) => self.data(chan, kind, payload),
                Err(WireError::Garbage { .. }) => stray += 1,
                Err(e @ WireError::JsonTooLong { .. }) => {
                    note!("{e}");
                    self.answer(None, Err(CmdError::generic(e.to_string())));
                }
                Err(e) => note!("{e}"),
            }
        }
        if stray > 0 {
            note!("skipped {stray} stray bytes from the host");
        }
    }

    fn message(&mut self, bytes: &[u8]) {
        match Message::parse(bytes) {
            Ok(Message::Request {
                execute,
                arguments,
                id,
            }) => {
                let result = self.dispatch(&execute, arguments);
                if let Err(e) = &result {
                    note!("{execute}: {}", e.desc);
                }
                self.answer(id, result);
            }
            Ok(_) => note!("ignored a message that is not a request"),
            Err(desc) => {
                note!("{desc}");
                self.answer(None, Err(CmdError::generic(desc)));
            }
        }
    }

    fn answer(&self, id: Option<Value>, result: Result<Reply, CmdError>) {
        let ret = |value| {
            Message::Return {
                value,
                id: id.clone(),
            }
            .encode()
        };
        match result {
            Ok(Reply::Value(value)) => self.outbox.send(ret(value)),
            Ok(Reply::Then(value, then)) => {
                self.outbox.send(ret(value));
                then();
            }
            Ok(Reply::Delimited(value)) => {
                let mut bytes = vec![SYNC];
                bytes.extend(ret(value));
                self.outbox.send(bytes);
            }
            Ok(Reply::Nothing) => {}
            Err(e) => self.outbox.send(
                Message::Error {
                    class: e.class.to_string(),
                    desc: e.desc,
                    id,
                }
                .encode(),
            ),
        }
    }

    /// A data frame from the host: stdin of an exec, or tar-in bytes.
    fn data(&self, chan: u32, kind: u8, payload: Vec<u8>) {
        let Some(stream) = self.streams.get(chan) else {
            note!("dropped a data frame for stream {chan}, which is not running");
            return;
        };
        let expected = match stream.control {
            Control::Exec(_) => Some(wire::kind::STDIN),
            Control::TarIn(_) => Some(wire::kind::TAR),
            Control::TarOut => None,
        };
        match (&stream.input, expected == Some(kind)) {
            (Some(input), true) => {
                if let Err(e) = input.push(payload) {
                    note!("{e}");
                }
            }
            _ => {
                note!("stream {chan}: dropped a data frame of kind {kind}, which it does not take")
            }
        }
    }

    fn dispatch(&mut self, cmd: &str, args: Value) -> Result<Reply, CmdError> {
        let value = match cmd {
            "guest-sync-delimited" => return Ok(Reply::Delimited(sync_id(args)?)),
            "guest-sync" => sync_id(args)?,
            "guest-ping" => json!({}),
            "guest-info" => sysinfo::info(&all_commands()),
            "guest-get-osinfo" => sysinfo::osinfo(),
            "guest-get-host-name" => sysinfo::host_name(),
            "guest-network-get-interfaces" => sysinfo::interfaces()?,
            "guest-exec" => self.jobs.exec(parse(cmd, args)?)?,
            "guest-exec-status" => json!(self.jobs.status(parse::<PidArg>(cmd, args)?.pid)?),
            "guest-file-open" => self.files.open(parse(cmd, args)?)?,
            "guest-file-read" => json!(self.files.read(parse(cmd, args)?)?),
            "guest-file-write" => self.files.write(parse(cmd, args)?)?,
            "guest-file-seek" => self.files.seek(parse(cmd, args)?)?,
            "guest-file-flush" => self.files.flush(parse(cmd, args)?)?,
            "guest-file-close" => self.files.close(parse(cmd, args)?)?,
            "guest-shutdown" => {
                let mode = ShutdownMode::parse(&parse::<ShutdownArgs>(cmd, args)?)?;
                note!("guest-shutdown: {mode:?}");
                (self.power)(mode)?;
                return Ok(Reply::Nothing);
            }
            _ => return self.extension(cmd, args),
        };
        Ok(Reply::Value(value))
    }

    fn extension(&mut self, cmd: &str, args: Value) -> Result<Reply, CmdError> {
        let value = match cmd {
            wire::CMD_EXEC => {
                let (value, then) =
                    exec::start_streamed(parse(cmd, args)?, &self.streams, &self.outbox)?;
                return Ok(Reply::Then(value, then));
            }
            wire::CMD_TAR_OUT => {
                let (value, then) =
                    files::start_tar_out(parse(cmd, args)?, &self.streams, &self.outbox)?;
                return Ok(Reply::Then(value, then));
            }
            wire::CMD_TAR_IN => {
                files::start_tar_in(parse(cmd, args)?, &self.streams, &self.outbox)?
            }
            wire::CMD_TAR_IN_END => {
                let arg: StreamCredit = parse(cmd, args)?;
                json!(files::end_tar_in(arg.stream, &self.streams)?)
            }
            _ => return self.stream_command(cmd, args),
        };
        Ok(Reply::Value(value))
    }

    /// The commands that act on a running stream; `{}` on success.
    fn stream_command(&self, cmd: &str, args: Value) -> Result<Reply, CmdError> {
        match cmd {
            wire::CMD_CREDIT => {
                let arg: StreamCredit = parse(cmd, args)?;
                // Credit for a stream that just ended is a harmless race.
                let stream = self.streams.get(arg.stream);
                if let Some(credit) = stream.as_ref().and_then(|s| s.output.as_ref()) {
                    credit.grant(arg.bytes);
                }
            }
            wire::CMD_STDIN_CLOSE => {
                let arg: StreamCredit = parse(cmd, args)?;
                let stream = self.streams.get(arg.stream);
                if let Some(input) = stream.as_ref().and_then(|s| s.input.as_ref()) {
                    input.close();
                }
            }
            wire::CMD_CANCEL => {
                let arg: StreamCredit = parse(cmd, args)?;
                if let Some(stream) = self.streams.get(arg.stream) {
                    stream.cancel();
                    // An exec or tar-out stream leaves when its thread ends;
                    // tar-in has no thread of its own to do it.
                    if matches!(stream.control, Control::TarIn(_)) {
                        self.streams.remove(arg.stream);
                    }
                }
            }
            wire::CMD_RESIZE => {
                let arg: Resize = parse(cmd, args)?;
                self.process(arg.stream)?
                    .resize(arg.stream, arg.rows, arg.cols)?;
            }
            wire::CMD_SIGNAL => {
                let arg: SignalArgs = parse(cmd, args)?;
                self.process(arg.stream)?.signal(arg.signal)?;
            }
            _ => {
                return Err(CmdError {
                    class: "CommandNotFound",
                    desc: format!("The command {cmd} has not been found"),
                })
            }
        }
        Ok(Reply::Value(json!({})))
    }

    fn process(&self, stream: u32) -> Result<Arc<exec::Process>, CmdError> {
        match self.streams.get(stream).as_deref().map(|s| &s.control) {
            Some(Control::Exec(p)) => Ok(Arc::clone(p)),
            _ => Err(CmdError::generic(format!(
                "stream {stream} is not a running agentlab-exec"
            ))),
        }
    }
}

/// Every command, for `guest-info`.
fn all_commands() -> Vec<&'static str> {
    QGA_COMMANDS
        .iter()
        .chain(wire::EXTENSIONS)
        .copied()
        .collect()
}

/// Arguments into `T`; absent arguments are `{}`.
fn parse<T: DeserializeOwned>(cmd: &str, args: Value) -> Result<T, CmdError> {
    let args = if args.is_null() { json!({}) } else { args };
    serde_json::from_value(args)
        .map_err(|e| CmdError::generic(format!("invalid arguments for {cmd}: {e}")))
}

/// `guest-sync`'s `id`, an integer, given back as is.
fn sync_id(args: Value) -> Result<Value, CmdError> {
    match args.get("id") {
        Some(id) if id.is_i64() || id.is_u64() => Ok(id.clone()),
        Some(_) => Err(CmdError::generic(
            "Parameter 'id' expects an integer".into(),
        )),
        None => Err(CmdError::generic("Parameter 'id' is missing".into())),
    }
}

// ---- the port -------------------------------------------------------------

/// The `/dev` node of the virtio-serial port named `name`, from the port
/// directories under `ports` (`/sys/class/virtio-ports/vport0p1/name`).
pub fn find_port(ports: &Path, name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<_> = std::fs::read_dir(ports).ok()?.flatten().collect();
    dirs.sort_by_key(|d| d.file_name());
    dirs.into_iter()
        .find(|d| {
            std::fs::read_to_string(d.path().join("name")).is_ok_and(|n| n.trim_end() == name)
        })
        .map(|d| Path::new("/dev").join(d.file_name()))
}

/// An open port: both halves, and whether end of file means the peer is
/// gone for good (a socket) or only not connected yet (a virtio port).
struct Port {
    path: PathBuf,
    reader: Box<dyn Read + Send>,
    writer: Box<dyn Write + Send>,
    eof_is_hangup: bool,
}

fn open_path(path: &Path) -> io::Result<Port> {
    let is_socket = std::fs::metadata(path)?.file_type().is_socket();
    let (reader, writer): (Box<dyn Read + Send>, Box<dyn Write + Send>) = if is_socket {
        let sock = UnixStream::connect(path)?;
        (Box::new(sock.try_clone()?), Box::new(sock))
    } else {
        let file: File = OpenOptions::new().read(true).write(true).open(path)?;
        (Box::new(file.try_clone()?), Box::new(file))
    };
    Ok(Port {
        path: path.to_path_buf(),
        reader,
        writer,
        eof_is_hangup: is_socket,
    })
}

/// Opens `device`, or the virtio-serial port named `PORT_NAME`, retrying
/// for `FIND_FOR` while it is missing.
fn open_port(device: Option<&Path>) -> Result<Port, AgentError> {
    let deadline = Instant::now() + FIND_FOR;
    let mut said = false;
    loop {
        let path = match device {
            Some(d) => Some(d.to_path_buf()),
            None => find_port(Path::new(VIRTIO_PORTS), PORT_NAME),
        };
        let last_try = Instant::now() >= deadline;
        match path.map(|p| (open_path(&p), p)) {
            Some((Ok(port), _)) => return Ok(port),
            Some((Err(source), path)) if last_try => return Err(AgentError::Open { path, source }),
            None if last_try => return Err(AgentError::NoPort),
            _ if !said => {
                note!("waiting for the guest-agent port to appear");
                said = true;
            }
            _ => {}
        }
        std::thread::sleep(FIND_EVERY);
    }
}

/// Serves `port` until a read fails, or the socket peer hangs up.
fn serve_port(server: &mut Server, port: &mut Port) -> io::Error {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match port.reader.read(&mut buf) {
            Ok(0) if port.eof_is_hangup => return io::ErrorKind::UnexpectedEof.into(),
            Ok(0) => {
                server.host_gone();
                std::thread::sleep(EOF_PAUSE);
            }
            Ok(n) => server.feed(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return e,
        }
    }
}

/// Runs `agentlab agent [--device PATH]`; returns only when the port cannot
/// be found or reopened (init respawns the agent), with exit code 1, or on
/// bad usage, 2.
pub fn main(args: &[String]) -> ExitCode {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let parsed = match AgentArgs::from_args(&["agentlab agent"], &args) {
        Ok(parsed) => parsed,
        Err(early) => {
            let ok = early.status.is_ok();
            if ok {
                println!("{}", early.output);
            } else {
                eprintln!("{}", early.output);
            }
            return if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            };
        }
    };
    if parsed.install {
        return install(&parsed);
    }
    let device = parsed.device.as_deref();
    let mut port = match open_port(device) {
        Ok(port) => port,
        Err(e) => {
            note!("{}", crate::log::error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let writer = std::mem::replace(&mut port.writer, Box::new(io::sink()));
    let mut server = Server::new(writer, Box::new(sysinfo::power));
    loop {
        note!(
            "serving {} (agentlab {})",
            port.path.display(),
            env!("CARGO_PKG_VERSION")
        );
        let why = serve_port(&mut server, &mut port);
        note!("lost {} ({why}); reopening", port.path.display());
        std::thread::sleep(FIND_EVERY);
        port = match open_port(device) {
            Ok(port) => port,
            Err(e) => {
                note!("{}", crate::log::error_chain(&e));
                server.stop();
                return ExitCode::FAILURE;
            }
        };
        server.set_writer(std::mem::replace(&mut port.writer, Box::new(io::sink())));
    }
}

fn install(args: &AgentArgs) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            note!("cannot find my own binary: {e}");
            return ExitCode::FAILURE;
        }
    };
    let plan = crate::guest::install::InstallPlan {
        exe,
        unit_dir: args.unit_dir.clone(),
        udev_dir: args.udev_dir.clone(),
        enable: !args.no_enable,
    };
    match crate::guest::install::install(&plan) {
        Ok(wrote) => {
            for path in wrote {
                println!("wrote {}", path.display());
            }
            if plan.enable {
                println!("{} enabled", crate::guest::install::UNIT_NAME);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            note!("install failed: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::stream::lock;
    use crate::qga::b64;
    use crate::qga::wire::{kind, Exit, GuestExecStatus, Started, TarDone};
    use std::sync::Mutex;

    const WAIT: Duration = Duration::from_secs(20);

    /// The host's end of a socketpair standing in for the virtio port.
    struct Host {
        sock: UnixStream,
        decoder: Decoder,
        next_id: u64,
    }

    /// What one stream sent.
    #[derive(Debug, Default)]
    struct Output {
        stdout: Vec<u8>,
        stderr: Vec<u8>,
        credit_events: u64,
        exit: Option<Exit>,
    }

    fn no_power() -> PowerFn {
        Box::new(|_| {
            Err(SysInfoError::Power {
                mode: "test",
                source: io::ErrorKind::Unsupported.into(),
            })
        })
    }

    impl Host {
        fn start() -> Host {
            Host::with_power(no_power())
        }

        fn with_power(power: PowerFn) -> Host {
            let (host, agent) = UnixStream::pair().unwrap();
            let reader = agent.try_clone().unwrap();
            std::thread::spawn(move || {
                let mut server = Server::new(Box::new(agent), power);
                let _ = server.run(reader);
                server.stop();
            });
            host.set_read_timeout(Some(WAIT)).unwrap();
            Host {
                sock: host,
                decoder: Decoder::new(64 << 20),
                next_id: 0,
            }
        }

        fn send_raw(&mut self, bytes: &[u8]) {
            self.sock.write_all(bytes).unwrap();
        }

        fn send(&mut self, execute: &str, arguments: Value) -> Value {
            self.next_id += 1;
            let id = json!(self.next_id);
            let request = Message::Request {
                execute: execute.into(),
                arguments,
                id: Some(id.clone()),
            };
            self.send_raw(&request.encode());
            id
        }

        /// The next frame; `None` when nothing came for `patience`.
        fn try_frame(&mut self, patience: Duration) -> Option<Frame> {
            self.sock.set_read_timeout(Some(patience)).unwrap();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                if let Some(frame) = self.decoder.next() {
                    return Some(frame.unwrap());
                }
                match self.sock.read(&mut buf) {
                    Ok(0) => panic!("the agent closed the port"),
                    Ok(n) => self.decoder.push(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                    // With a receive timeout the kernel does not restart a
                    // read a signal woke, even one that is then ignored.
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => panic!("{e}"),
                }
            }
        }

        fn frame(&mut self) -> Frame {
            self.try_frame(WAIT).expect("the agent answered in time")
        }

        /// Sends a request and returns its answer, skipping other frames.
        fn call(&mut self, execute: &str, arguments: Value) -> Result<Value, (String, String)> {
            let id = Some(self.send(execute, arguments));
            loop {
                let Frame::Json(json) = self.frame() else {
                    continue;
                };
                match Message::parse(&json).unwrap() {
                    Message::Return { value, id: i } if i == id => return Ok(value),
                    Message::Error { class, desc, id: i } if i == id => return Err((class, desc)),
                    _ => {}
                }
            }
        }

        fn exec(&mut self, args: Value) -> Started {
            serde_json::from_value(self.call(wire::CMD_EXEC, args).unwrap()).unwrap()
        }

        /// Takes one frame into `out`; false when none came for `patience`.
        fn take(&mut self, out: &mut Output, stream: u32, patience: Duration) -> bool {
            let Some(frame) = self.try_frame(patience) else {
                return false;
            };
            match frame {
                Frame::Data {
                    chan,
                    kind: k,
                    payload,
                } if chan == stream => match k {
                    kind::STDOUT => out.stdout.extend(payload),
                    kind::STDERR => out.stderr.extend(payload),
                    other => panic!("unexpected data of kind {other}"),
                },
                Frame::Json(json) => {
                    if let Message::Event { name, data } = Message::parse(&json).unwrap() {
                        match name.as_str() {
                            wire::EVENT_EXIT => {
                                out.exit = Some(serde_json::from_value(data).unwrap())
                            }
                            wire::EVENT_CREDIT => out.credit_events += 1,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
            true
        }

        /// Everything a stream sends until its exit event.
        fn until_exit(&mut self, stream: u32, out: &mut Output) {
            while out.exit.is_none() {
                self.take(out, stream, WAIT);
            }
        }

        /// What arrives until the line goes quiet for `quiet`.
        fn until_quiet(&mut self, stream: u32, out: &mut Output, quiet: Duration) {
            while self.take(out, stream, quiet) {}
        }

        fn run(&mut self, args: Value) -> Output {
            let started = self.exec(args);
            let mut out = Output::default();
            self.until_exit(started.stream, &mut out);
            out
        }

        fn exec_status(&mut self, pid: i64) -> GuestExecStatus {
            let deadline = Instant::now() + WAIT;
            loop {
                let v = self
                    .call("guest-exec-status", json!({ "pid": pid }))
                    .unwrap();
                let status: GuestExecStatus = serde_json::from_value(v).unwrap();
                if status.exited || Instant::now() > deadline {
                    return status;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }

        fn guest_exec(&mut self, args: Value) -> GuestExecStatus {
            let pid = self.call("guest-exec", args).unwrap()["pid"]
                .as_i64()
                .unwrap();
            self.exec_status(pid)
        }
    }

    fn text(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    #[test]
    fn sync_delimited_answers_0xff_then_the_id() {
        let mut host = Host::start();
        host.send_raw(&[SYNC]);
        host.send_raw(br#"{"execute":"guest-sync-delimited","arguments":{"id":4242}}"#);
        let (first, second) = (host.frame(), host.frame());
        assert_eq!(
            (first, second),
            (Frame::Sync, Frame::Json(br#"{"return":4242}"#.to_vec()))
        );
    }

    #[test]
    fn ping_answers_empty_and_echoes_the_id() {
        let mut host = Host::start();
        host.send_raw(br#"{"execute":"guest-ping","id":"abc"}"#);
        let Frame::Json(answer) = host.frame() else {
            panic!("expected JSON")
        };
        assert_eq!(
            serde_json::from_slice::<Value>(&answer).unwrap(),
            json!({"return": {}, "id": "abc"})
        );
    }

    #[test]
    fn info_lists_every_extension() {
        let mut host = Host::start();
        let info = host.call("guest-info", Value::Null).unwrap();
        let names: Vec<&str> = info["supported_commands"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert!(
            wire::EXTENSIONS.iter().all(|e| names.contains(e)),
            "{names:?}"
        );
        assert!(info["version"].as_str().unwrap().starts_with("agentlab "));
    }

    #[test]
    fn every_listed_command_is_dispatched() {
        let mut host = Host::start();
        let not_found: Vec<&str> = all_commands()
            .into_iter()
            .filter(|c| *c != "guest-shutdown")
            .filter(|c| {
                matches!(host.call(c, json!({"__probe": 1})), Err((class, _)) if class == "CommandNotFound")
            })
            .collect();
        assert_eq!(not_found, Vec::<&str>::new());
    }

    #[test]
    fn unknown_command_is_command_not_found() {
        let mut host = Host::start();
        let err = host.call("guest-fsfreeze-freeze", Value::Null).unwrap_err();
        assert_eq!(
            err,
            (
                "CommandNotFound".to_string(),
                "The command guest-fsfreeze-freeze has not been found".to_string()
            )
        );
    }

    #[test]
    fn bad_arguments_are_a_generic_error() {
        let mut host = Host::start();
        let (class, desc) = host.call("guest-exec", json!({"arg": ["x"]})).unwrap_err();
        assert_eq!(class, "GenericError");
        assert!(desc.contains("missing field `path`"), "{desc}");
    }

    #[test]
    fn guest_exec_separates_stdout_stderr_and_exit_code() {
        let mut host = Host::start();
        let status = host.guest_exec(json!({
            "path": "sh", "arg": ["-c", "echo out; echo err >&2; exit 1"], "capture-output": true
        }));
        assert_eq!(
            (status.exitcode, status.out_data, status.err_data),
            (
                Some(1),
                Some(b64::encode(b"out\n")),
                Some(b64::encode(b"err\n"))
            )
        );
    }

    #[test]
    fn guest_exec_success_is_exit_code_0() {
        let mut host = Host::start();
        let status = host.guest_exec(json!({"path": "/bin/true"}));
        assert_eq!((status.exited, status.exitcode), (true, Some(0)));
    }

    #[test]
    fn guest_exec_of_a_missing_command_in_a_shell_is_127() {
        let mut host = Host::start();
        let status = host.guest_exec(json!({
            "path": "/bin/sh", "arg": ["-c", "no-such-command-x"], "capture-output": true
        }));
        assert_eq!(status.exitcode, Some(127));
    }

    #[test]
    fn guest_exec_of_a_missing_program_is_an_error() {
        let mut host = Host::start();
        let (_, desc) = host
            .call("guest-exec", json!({"path": "no-such-command-x"}))
            .unwrap_err();
        assert_eq!(desc, "no-such-command-x: command not found");
    }

    #[test]
    fn guest_exec_input_data_is_the_childs_stdin() {
        let mut host = Host::start();
        let status = host.guest_exec(json!({
            "path": "cat", "input-data": b64::encode(b"fed in"), "capture-output": true
        }));
        assert_eq!(status.out_data, Some(b64::encode(b"fed in")));
    }

    #[test]
    fn guest_exec_status_after_exited_is_an_error() {
        let mut host = Host::start();
        let pid = host.call("guest-exec", json!({"path": "true"})).unwrap()["pid"]
            .as_i64()
            .unwrap();
        host.exec_status(pid);
        let err = host
            .call("guest-exec-status", json!({ "pid": pid }))
            .unwrap_err();
        assert_eq!(err.1, "Invalid parameter 'pid'");
    }

    #[test]
    fn file_write_then_read_round_trips() {
        let mut host = Host::start();
        let path = std::env::temp_dir().join(format!("agentlab-agent-file-{}", std::process::id()));
        let path = path.to_string_lossy().into_owned();
        let w = host
            .call("guest-file-open", json!({"path": path, "mode": "w"}))
            .unwrap();
        host.call(
            "guest-file-write",
            json!({"handle": w, "buf-b64": b64::encode(b"round trip")}),
        )
        .unwrap();
        host.call("guest-file-close", json!({ "handle": w }))
            .unwrap();
        let r = host
            .call("guest-file-open", json!({ "path": path }))
            .unwrap();
        let read = host
            .call("guest-file-read", json!({"handle": r, "count": 100}))
            .unwrap();
        host.call("guest-file-close", json!({ "handle": r }))
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            read,
            json!({"count": 10, "buf-b64": b64::encode(b"round trip"), "eof": true})
        );
    }

    #[test]
    fn exec_streams_output_in_order_and_reports_the_exit() {
        let mut host = Host::start();
        let out = host.run(json!({
            "argv": ["sh", "-c", "i=0; while [ $i -lt 2000 ]; do echo line $i; i=$((i+1)); done; echo oops >&2; exit 3"]
        }));
        let expected: String = (0..2000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(text(&out.stdout), expected);
        assert_eq!(
            (text(&out.stderr), out.exit.unwrap().exitcode),
            ("oops\n".to_string(), Some(3))
        );
    }

    #[test]
    fn exec_sends_no_more_than_the_credit_granted() {
        let mut host = Host::start();
        let started = host.exec(json!({
            "argv": ["head", "-c", "1048576", "/dev/zero"], "window": 1024
        }));
        let mut out = Output::default();
        while out.stdout.is_empty() {
            host.take(&mut out, started.stream, WAIT);
        }
        host.until_quiet(started.stream, &mut out, Duration::from_millis(500));
        let before = out.stdout.len();
        host.send(
            wire::CMD_CREDIT,
            json!({"stream": started.stream, "bytes": 1 << 20}),
        );
        host.until_exit(started.stream, &mut out);
        assert_eq!((before, out.stdout.len()), (1024, 1 << 20));
    }

    #[test]
    fn exec_forwards_stdin_and_grants_credit_back() {
        let mut host = Host::start();
        let started = host.exec(json!({"argv": ["cat"], "stdin": true}));
        host.send_raw(&wire::encode_data(started.stream, kind::STDIN, b"hello\n"));
        host.send(wire::CMD_STDIN_CLOSE, json!({"stream": started.stream}));
        let mut out = Output::default();
        host.until_exit(started.stream, &mut out);
        assert_eq!(started.window, wire::DEFAULT_WINDOW);
        assert_eq!(
            (
                text(&out.stdout),
                out.credit_events,
                out.exit.unwrap().exitcode
            ),
            ("hello\n".to_string(), 1, Some(0))
        );
    }

    #[test]
    fn exec_on_a_pty_has_a_terminal_of_the_given_size() {
        let mut host = Host::start();
        let out = host.run(json!({
            "argv": ["sh", "-c", "tty; stty size; echo $TERM"], "tty": {"rows": 40, "cols": 100}
        }));
        let text = text(&out.stdout);
        assert!(text.starts_with("/dev/pts/"), "{text}");
        assert!(text.contains("40 100\r\nxterm-256color"), "{text}");
    }

    #[test]
    fn resize_reaches_the_pty() {
        let mut host = Host::start();
        let started = host.exec(json!({
            "argv": ["sh", "-c", "read x; stty size"], "tty": {"rows": 24, "cols": 80}, "stdin": true
        }));
        host.call(
            wire::CMD_RESIZE,
            json!({"stream": started.stream, "rows": 50, "cols": 120}),
        )
        .unwrap();
        host.send_raw(&wire::encode_data(started.stream, kind::STDIN, b"\n"));
        let mut out = Output::default();
        host.until_exit(started.stream, &mut out);
        assert!(
            text(&out.stdout).contains("50 120"),
            "{}",
            text(&out.stdout)
        );
    }

    #[test]
    fn timeout_kills_the_process_group() {
        let mut host = Host::start();
        let begun = Instant::now();
        let out =
            host.run(json!({"argv": ["sh", "-c", "sleep 100; echo never"], "timeout_ms": 300}));
        let exit = out.exit.unwrap();
        assert_eq!((exit.timed_out, exit.signal), (true, Some(15)));
        assert!(begun.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn signal_reaches_the_process() {
        let mut host = Host::start();
        let started = host.exec(json!({"argv": ["sleep", "100"]}));
        host.call(
            wire::CMD_SIGNAL,
            json!({"stream": started.stream, "signal": 9}),
        )
        .unwrap();
        let mut out = Output::default();
        host.until_exit(started.stream, &mut out);
        assert_eq!(out.exit.unwrap().signal, Some(9));
    }

    #[test]
    fn cancel_kills_an_exec() {
        let mut host = Host::start();
        let started = host.exec(json!({"argv": ["sleep", "100"]}));
        host.call(wire::CMD_CANCEL, json!({"stream": started.stream}))
            .unwrap();
        let mut out = Output::default();
        host.until_exit(started.stream, &mut out);
        assert_eq!(out.exit.unwrap().signal, Some(9));
    }

    #[test]
    fn exec_of_a_missing_command_exits_127_with_an_error() {
        let mut host = Host::start();
        let exit = host
            .run(json!({"argv": ["no-such-command-x"]}))
            .exit
            .unwrap();
        assert_eq!(
            (exit.exitcode, exit.error.as_deref()),
            (Some(127), Some("no-such-command-x: command not found"))
        );
    }

    #[test]
    fn exec_as_an_unknown_user_exits_126() {
        let mut host = Host::start();
        let exit = host
            .run(json!({"argv": ["true"], "user": "no-such-user-x"}))
            .exit
            .unwrap();
        assert_eq!(exit.exitcode, Some(126));
    }

    #[test]
    fn exec_runs_as_the_user_with_their_environment() {
        let mut host = Host::start();
        let out = host.run(json!({
            "argv": ["sh", "-c", "id -u; echo $USER $HOME $FOO; pwd"],
            "user": "nobody", "env": ["FOO=bar"]
        }));
        assert_eq!(text(&out.stdout), "65534\nnobody /nonexistent bar\n/\n");
    }

    #[test]
    fn exec_starts_in_the_given_cwd() {
        let mut host = Host::start();
        let out = host.run(json!({"argv": ["pwd"], "cwd": "/proc"}));
        assert_eq!(text(&out.stdout), "/proc\n");
    }

    #[test]
    fn tar_out_of_a_missing_path_is_an_error() {
        let mut host = Host::start();
        let (_, desc) = host
            .call(wire::CMD_TAR_OUT, json!({"path": "/no/such/path"}))
            .unwrap_err();
        assert!(desc.starts_with("cannot read /no/such/path"), "{desc}");
    }

    #[test]
    fn tar_out_ends_with_an_eof_event() {
        let mut host = Host::start();
        let started: Started = serde_json::from_value(
            host.call(wire::CMD_TAR_OUT, json!({"path": "/etc/hostname"}))
                .unwrap(),
        )
        .unwrap();
        let done = loop {
            if let Frame::Json(json) = host.frame() {
                if let Ok(Message::Event { name, data }) = Message::parse(&json) {
                    if name == wire::EVENT_EOF {
                        break serde_json::from_value::<TarDone>(data).unwrap();
                    }
                }
            }
        };
        assert_eq!(done.stream, started.stream);
    }

    #[test]
    fn garbage_does_not_stop_the_server() {
        let mut host = Host::start();
        host.send_raw(b"\x00\x01garbage}]\n");
        assert_eq!(host.call("guest-ping", Value::Null), Ok(json!({})));
    }

    #[test]
    fn overlong_message_is_skipped_until_the_next_sync() {
        let mut host = Host::start();
        let mut huge = br#"{"execute":"guest-ping","arguments":{"x":""#.to_vec();
        huge.resize(MAX_JSON + 1024, b'a');
        host.send_raw(&huge);
        host.send_raw(&[SYNC]);
        assert_eq!(host.call("guest-ping", Value::Null), Ok(json!({})));
    }

    #[test]
    fn shutdown_powers_off_without_an_answer() {
        let modes = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&modes);
        let mut host = Host::with_power(Box::new(move |mode| {
            lock(&seen).push(mode);
            Ok(())
        }));
        let shutdown_id = host.send("guest-shutdown", json!({"mode": "reboot"}));
        let ping_id = host.send("guest-ping", Value::Null);
        let Frame::Json(first) = host.frame() else {
            panic!("expected an answer")
        };
        let first_id = match Message::parse(&first).unwrap() {
            Message::Return { id, .. } | Message::Error { id, .. } => id,
            other => panic!("{other:?}"),
        };
        assert_ne!(first_id, Some(shutdown_id));
        assert_eq!(first_id, Some(ping_id));
        assert_eq!(*lock(&modes), vec![ShutdownMode::Reboot]);
    }

    /// A daemon killed mid-exec left `exec -i … cat` blocked on credit in the
    /// guest forever: no later host knew its stream to cancel it.
    #[test]
    fn a_host_that_left_has_its_streams_cancelled() {
        let (host, agent) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(WAIT)).unwrap();
        let mut server = Server::new(Box::new(agent), no_power());
        let request = Message::Request {
            execute: wire::CMD_EXEC.into(),
            arguments: json!({"argv": ["sleep", "100"], "stream": 77}),
            id: Some(json!(1)),
        };
        server.feed(&request.encode());
        let mut d = Decoder::new(1 << 20);
        let mut buf = [0u8; 4096];
        let answer = loop {
            if let Some(Ok(Frame::Json(j))) = d.next() {
                break j;
            }
            let n = (&host).read(&mut buf).unwrap();
            d.push(&buf[..n]);
        };
        let Message::Return { value, .. } = Message::parse(&answer).unwrap() else {
            panic!("{}", String::from_utf8_lossy(&answer))
        };
        let started: Started = serde_json::from_value(value).unwrap();
        assert_eq!(started.stream, 77, "the host's stream number is used");
        let pid = started.pid.unwrap();
        server.host_gone();
        let deadline = Instant::now() + WAIT;
        while crate::sys::process::start_ticks(pid).is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(crate::sys::process::start_ticks(pid).is_none());
    }

    #[test]
    fn host_hanging_up_kills_running_execs() {
        let mut host = Host::start();
        let started = host.exec(json!({"argv": ["sleep", "100"]}));
        let pid = started.pid.unwrap();
        drop(host);
        let deadline = Instant::now() + WAIT;
        while crate::sys::process::start_ticks(pid).is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(crate::sys::process::start_ticks(pid).is_none());
    }

    #[test]
    fn half_a_message_from_a_host_that_left_is_dropped() {
        let (host, agent) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(WAIT)).unwrap();
        let mut server = Server::new(Box::new(agent), no_power());
        server.feed(br#"{"execute":"guest-info","argu"#);
        server.host_gone();
        server.feed(br#"{"execute":"guest-ping","id":7}"#);
        let mut answer = [0u8; 64];
        let n = (&host).read(&mut answer).unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&answer[..n]).unwrap(),
            json!({"return": {}, "id": 7})
        );
    }

    #[test]
    fn port_is_found_by_its_name() {
        let dir = std::env::temp_dir().join(format!("agentlab-vports-{}", std::process::id()));
        for (port, name) in [("vport0p1", "org.qemu.console.0"), ("vport0p2", PORT_NAME)] {
            std::fs::create_dir_all(dir.join(port)).unwrap();
            std::fs::write(dir.join(port).join("name"), format!("{name}\n")).unwrap();
        }
        let found = find_port(&dir, PORT_NAME);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(found, Some(PathBuf::from("/dev/vport0p2")));
    }

    #[test]
    fn missing_ports_directory_finds_nothing() {
        assert_eq!(find_port(Path::new("/no/such/dir"), PORT_NAME), None);
    }
}
