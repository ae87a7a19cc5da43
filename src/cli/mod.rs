//! The command line: parse arguments (argh), talk to the daemon, print.
//!
//! One file per command group; `output` renders tables and `--json`, and
//! `connect` finds (or starts) the daemon. Exit codes: 0 success, 1 the
//! request was wrong (unknown sandbox, wrong state, bad input), 2 the daemon
//! or host failed. Writing to a closed pipe (`agentlab … | head`) is success.

mod bench;
mod connect;
mod console;
mod cp;
mod daemon;
mod exec;
mod expose;
mod image;
mod logs;
mod net;
pub mod output;
mod profile;
mod proxmox;
mod sandbox;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use argh::FromArgs;

use crate::api::client::ClientError;

#[derive(FromArgs)]
/// agentlab: disposable, isolated QEMU sandboxes for AI coding agents.
#[argh(
    note = "Environment: AGENTLAB_CONFIG (config file), AGENTLAB_SOCKET (daemon socket), \
AGENTLAB_ACCEL=kvm|tcg (daemon accelerator), AGENTLAB_NO_AUTOSTART=1 (never start the daemon).",
    error_code(1, "the request was wrong: unknown sandbox, wrong state, bad input"),
    error_code(2, "the daemon or the host failed")
)]
pub struct Cli {
    /// config file (default /etc/agentlab/config.yaml)
    #[argh(option)]
    config: Option<PathBuf>,
    /// state directory (default /var/lib/agentlab); overrides data_dir
    #[argh(option)]
    state_dir: Option<PathBuf>,
    /// daemon socket (default /run/agentlab/agentlabd.sock)
    #[argh(option)]
    socket: Option<PathBuf>,
    /// how long to wait for the daemon's answer, e.g. 30s (default: no limit)
    #[argh(option)]
    timeout: Option<String>,
    #[argh(subcommand)]
    cmd: Command,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Command {
    Sandbox(sandbox::SandboxCmd),
    Exec(exec::ExecCmd),
    Console(console::ConsoleCmd),
    Cp(cp::CpCmd),
    Profile(profile::ProfileCmd),
    Proxmox(proxmox::ProxmoxCmd),
    Image(image::ImageCmd),
    Status(status::StatusCmd),
    Net(net::NetCmd),
    Logs(logs::LogsCmd),
    Daemon(daemon::DaemonCmd),
    Bench(bench::BenchCmd),
    Version(VersionCmd),
}

#[derive(FromArgs)]
/// Print agentlab's version.
#[argh(subcommand, name = "version")]
struct VersionCmd {
    /// print JSON
    #[argh(switch)]
    json: bool,
}

/// Global options every command may need.
pub struct Global {
    pub config: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub timeout: Option<std::time::Duration>,
}

/// How a command failed; decides the exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The user asked for something wrong (exit 1).
    #[error("{0}")]
    User(String),
    /// The daemon or host failed (exit 2).
    #[error("{0}")]
    Host(String),
    /// stdout went away (`| head`): not a failure.
    #[error("broken pipe")]
    BrokenPipe,
    /// `exec`: the command's own exit code, passed on without a message.
    #[error("exit {0}")]
    Exit(u8),
}

impl CliError {
    pub fn code(&self) -> ExitCode {
        match self {
            CliError::User(_) => ExitCode::from(1),
            CliError::Host(_) => ExitCode::from(2),
            CliError::BrokenPipe => ExitCode::SUCCESS,
            CliError::Exit(c) => ExitCode::from(*c),
        }
    }
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> CliError {
        let msg = crate::log::error_chain(&e);
        if e.is_user_error() {
            CliError::User(msg)
        } else {
            CliError::Host(msg)
        }
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> CliError {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            CliError::BrokenPipe
        } else {
            CliError::Host(e.to_string())
        }
    }
}

pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    // Inside a guest the binary runs as init helper and agent; those argv
    // never go through the host CLI's parser.
    if args.get(1).map(String::as_str) == Some("guest") {
        return crate::guest::main(&args[2..]);
    }
    if args.get(1).map(String::as_str) == Some("agent") {
        return crate::guest::agent::main(&args[2..]);
    }
    let mut args = args;
    exec::split_short_switches(&mut args);
    let cli = match parse(&args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let json = wants_json(&args);
    let timeout = match cli
        .timeout
        .as_deref()
        .map(crate::time::parse_duration)
        .transpose()
    {
        Ok(t) => t,
        Err(e) => return report(&CliError::User(format!("--timeout: {e}")), json),
    };
    let global = Global {
        config: cli.config,
        state_dir: cli.state_dir,
        socket: cli.socket,
        timeout,
    };
    let r = match cli.cmd {
        Command::Sandbox(c) => sandbox::run(&global, c),
        Command::Exec(c) => exec::run(&global, c),
        Command::Console(c) => console::run(&global, c),
        Command::Cp(c) => cp::run(&global, c),
        Command::Profile(c) => profile::run_profile(&global, c),
        Command::Proxmox(c) => proxmox::run(&global, c),
        Command::Image(c) => image::run(&global, c),
        Command::Status(c) => status::run(&global, c),
        Command::Net(c) => net::run(&global, c),
        Command::Logs(c) => logs::run(&global, c),
        Command::Daemon(c) => daemon::run(&global, c),
        Command::Bench(c) => bench::run(&global, c),
        Command::Version(c) => version(c),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(&e, json),
    }
}

/// argh's `from_env`, on arguments we have already adjusted.
fn parse(args: &[String]) -> Result<Cli, ExitCode> {
    let strs: Vec<&str> = args.iter().map(String::as_str).collect();
    let name = ["agentlab"];
    match Cli::from_args(&name, strs.get(1..).unwrap_or_default()) {
        Ok(c) => Ok(c),
        Err(early) => match early.status {
            Ok(()) => {
                let _ = output::line(&early.output);
                Err(ExitCode::SUCCESS)
            }
            Err(()) => {
                eprintln!(
                    "{}\nRun agentlab --help for more information.",
                    early.output
                );
                Err(ExitCode::from(1))
            }
        },
    }
}

/// `--json` anywhere on the line asks for JSON errors too.
fn wants_json(args: &[String]) -> bool {
    args.iter().skip(1).any(|a| a == "--json")
}

fn report(e: &CliError, json: bool) -> ExitCode {
    match e {
        CliError::BrokenPipe | CliError::Exit(_) => {}
        _ if json => {
            let _ = output::print_json(&serde_json::json!({ "error": e.to_string() }));
        }
        _ => eprintln!("agentlab: error: {e}"),
    }
    e.code()
}

fn version(c: VersionCmd) -> Result<(), CliError> {
    let v = env!("CARGO_PKG_VERSION");
    if c.json {
        output::print_json(&serde_json::json!({ "version": v }))
    } else {
        output::line(&format!("agentlab {v}"))
    }
}
