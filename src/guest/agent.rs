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
struct AgentArgs {
    /// the port to serve instead of the virtio-serial one: a character
    /// device, a pty or a Unix socket to connect to
    #[argh(option)]
    device: Option<PathBuf>,
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
/// cancels the streams still running. Used by tests (a socketpair stands in
/// for the virtio port) and by anything that embeds the agent.
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
    pub fn set_writer(&self, writer: Box<dyn Write + Send>) {
        self.outbox.set_sink(writer);
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
            wire::CMD_CREDIT => {
                let arg: StreamCredit = parse(cmd, args)?;
                // Credit for a stream that just ended is a harmless race.
                let stream = self.streams.get(arg.stream);
                if let Some(credit) = stream.as_ref().and_then(|s| s.output.as_ref()) {
                    credit.grant(arg.bytes);
                }
                json!({})
            }
            wire::CMD_STDIN_CLOSE => {
                let arg: StreamCredit = parse(cmd, args)?;
                let stream = self.streams.get(arg.stream);
                if let Some(input) = stream.as_ref().and_then(|s| s.input.as_ref()) {
                    input.close();
                }
                json!({})
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
                json!({})
            }
            wire::CMD_RESIZE => {
                let arg: Resize = parse(cmd, args)?;
                self.process(arg.stream)?
                    .resize(arg.stream, arg.rows, arg.cols)?;
                json!({})
            }
            wire::CMD_SIGNAL => {
                let arg: SignalArgs = parse(cmd, args)?;
                self.process(arg.stream)?.signal(arg.signal)?;
                json!({})
            }
            _ => {
                return Err(CmdError {
                    class: "CommandNotFound",
                    desc: format!("The command {cmd} has not been found"),
                })
            }
        };
        Ok(Reply::Value(value))
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
            Ok(0) => std::thread::sleep(EOF_PAUSE),
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
