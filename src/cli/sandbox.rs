//! `agentlab sandbox …`: create, inspect, stop, start, revert, destroy,
//! lease renewal and pruning. Each subcommand is one API call (plus, for
//! `--wait`, following the sandbox's events until it settles).

use std::time::Duration;

use argh::FromArgs;
use serde_json::{json, Value};

use super::connect::client;
use super::{output, CliError, Global};
use crate::api::client::Client;
use crate::api::http::percent_encode_component;
use crate::model::{Sandbox, State};
use crate::time::Timestamp;

#[derive(FromArgs)]
/// Create and manage sandboxes.
#[argh(
    subcommand,
    name = "sandbox",
    error_code(1, "the request was wrong: unknown sandbox, wrong state, bad input"),
    error_code(2, "the daemon or the host failed")
)]
pub struct SandboxCmd {
    #[argh(subcommand)]
    cmd: Sub,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Sub {
    New(NewCmd),
    List(ListCmd),
    Show(ShowCmd),
    Start(StartCmd),
    Stop(StopCmd),
    Destroy(DestroyCmd),
    Revert(RevertCmd),
    Lease(LeaseCmd),
    Prune(PruneCmd),
    Expose(super::expose::ExposeCmd),
    Exposed(super::expose::ExposedCmd),
    Unexpose(super::expose::UnexposeCmd),
}

#[derive(FromArgs)]
/// Create a sandbox and print its VMID.
#[argh(
    subcommand,
    name = "new",
    example = "agentlab sandbox new --wait",
    example = "agentlab sandbox new --profile yolo-ephemeral --ttl 30m --name fix-tests",
    example = "agentlab sandbox new +small +secure     # profile \"secure-small\"",
    note = "Without --wait it prints the VMID as soon as the sandbox is recorded; \
provisioning and boot continue in the daemon (follow them with `agentlab logs <vmid> --follow`)."
)]
struct NewCmd {
    /// profile name (default: "default")
    #[argh(option)]
    profile: Option<String>,
    /// name for the sandbox (default: sbx-<vmid>)
    #[argh(option)]
    name: Option<String>,
    /// boot this base image instead of the profile's (see `agentlab image list`)
    #[argh(option)]
    image: Option<String>,
    /// lease: destroy the sandbox after this long, e.g. 30m, 2h (default: the profile's)
    #[argh(option)]
    ttl: Option<String>,
    /// never expire the lease
    #[argh(switch)]
    keepalive: bool,
    /// return only once the sandbox is READY, showing progress on stderr
    #[argh(switch)]
    wait: bool,
    /// print JSON
    #[argh(switch)]
    json: bool,
    /// profile modifiers: +small +secure selects profile "secure-small"
    #[argh(positional, greedy)]
    modifiers: Vec<String>,
}

#[derive(FromArgs)]
/// List sandboxes.
#[argh(subcommand, name = "list")]
struct ListCmd {
    /// include destroyed sandboxes
    #[argh(switch)]
    all: bool,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
/// Show one sandbox in detail.
#[argh(subcommand, name = "show")]
struct ShowCmd {
    /// VMID or name
    #[argh(positional)]
    id: String,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
/// Start a stopped (or failed) sandbox.
#[argh(subcommand, name = "start")]
struct StartCmd {
    /// VMID or name
    #[argh(positional)]
    id: String,
    /// return only once it is READY
    #[argh(switch)]
    wait: bool,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
/// Stop a sandbox: ACPI power button, then a hard stop after the grace period.
#[argh(subcommand, name = "stop")]
struct StopCmd {
    /// VMID or name
    #[argh(positional)]
    id: String,
    /// stop at once, even while a job runs
    #[argh(switch)]
    force: bool,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
/// Destroy a sandbox: stop its VM and delete its disk and files.
#[argh(subcommand, name = "destroy")]
struct DestroyCmd {
    /// VMID or name
    #[argh(positional)]
    id: String,
    /// destroy even while a job runs, and record it destroyed even if cleanup fails
    #[argh(switch)]
    force: bool,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
/// Revert a sandbox's disk to its clean state (restarts it if it was running).
#[argh(subcommand, name = "revert")]
struct RevertCmd {
    /// VMID or name
    #[argh(positional)]
    id: String,
    /// leave it stopped afterwards
    #[argh(switch)]
    no_restart: bool,
    /// start it afterwards even if it was stopped
    #[argh(switch)]
    restart: bool,
    /// revert even while a job runs or it is booting
    #[argh(switch)]
    force: bool,
    /// return only once it is READY again
    #[argh(switch)]
    wait: bool,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
/// Manage a sandbox's lease.
#[argh(subcommand, name = "lease")]
struct LeaseCmd {
    #[argh(subcommand)]
    cmd: LeaseSub,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum LeaseSub {
    Renew(RenewCmd),
}

#[derive(FromArgs)]
/// Extend a sandbox's lease to end this long from now.
#[argh(
    subcommand,
    name = "renew",
    example = "agentlab sandbox lease renew --ttl 30m 1000"
)]
struct RenewCmd {
    /// new lease length from now, e.g. 30m, 2h
    #[argh(option)]
    ttl: String,
    /// VMID or name
    #[argh(positional)]
    id: String,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
/// Remove what no sandbox owns: orphan QEMU processes and files, and destroyed records.
#[argh(subcommand, name = "prune")]
struct PruneCmd {
    /// only list what would be removed
    #[argh(switch)]
    dry_run: bool,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

pub fn run(g: &Global, c: SandboxCmd) -> Result<(), CliError> {
    match c.cmd {
        Sub::New(c) => new(g, c),
        Sub::List(c) => list(g, c),
        Sub::Show(c) => show(g, c),
        Sub::Start(c) => {
            // The daemon waits server-side: no window between reply and watch.
            let sb = client(g)?.post(&path(&c.id, "start"), &json!({ "wait": c.wait }))?;
            if c.wait {
                settled_ok(&sb)?;
            }
            print_state(&sb, c.json)
        }
        Sub::Stop(c) => {
            let sb = client(g)?.post(&path(&c.id, "stop"), &json!({ "force": c.force }))?;
            print_state(&sb, c.json)
        }
        Sub::Destroy(c) => {
            let sb = client(g)?.post(&path(&c.id, "destroy"), &json!({ "force": c.force }))?;
            print_state(&sb, c.json)
        }
        Sub::Revert(c) => revert(g, c),
        Sub::Lease(LeaseCmd {
            cmd: LeaseSub::Renew(c),
        }) => {
            let r = client(g)?.post(&path(&c.id, "lease/renew"), &json!({ "ttl": c.ttl }))?;
            if c.json {
                return output::print_json(&r);
            }
            output::line(&format!(
                "sandbox {}: lease renewed until {}{}",
                r["vmid"],
                r["lease_expires_at"].as_str().unwrap_or("-"),
                if r["keepalive"] == true {
                    " (keepalive: it never expires)"
                } else {
                    ""
                }
            ))
        }
        Sub::Prune(c) => prune(g, c),
        Sub::Expose(c) => super::expose::expose(g, c),
        Sub::Exposed(c) => super::expose::exposed(g, c),
        Sub::Unexpose(c) => super::expose::unexpose(g, c),
    }
}

fn path(id: &str, action: &str) -> String {
    format!("/v1/sandboxes/{}/{action}", percent_encode_component(id))
}

fn vmid_of(v: &Value) -> Result<u32, CliError> {
    v["vmid"]
        .as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| CliError::Host("agentlabd answered without a vmid".into()))
}

fn new(g: &Global, c: NewCmd) -> Result<(), CliError> {
    if let Some(bad) = c.modifiers.iter().find(|m| !m.starts_with('+')) {
        return Err(CliError::User(format!(
            "unexpected argument {bad:?}: profile modifiers start with '+', e.g. +small"
        )));
    }
    let cl = client(g)?;
    let body = json!({
        "profile": c.profile,
        "modifiers": c.modifiers.iter().map(|m| m.trim_start_matches('+')).collect::<Vec<_>>(),
        "name": c.name,
        "image": c.image,
        "ttl": c.ttl,
        "keepalive": c.keepalive.then_some(true),
    });
    let body = strip_nulls(body);
    let sb = cl.post("/v1/sandboxes", &body)?;
    let vmid = vmid_of(&sb)?;
    if !c.wait {
        return if c.json {
            output::print_json(&sb)
        } else {
            output::line(&vmid.to_string())
        };
    }
    // The daemon fails a guest that misses its boot deadline; the CLI only
    // guards against a daemon that stops answering.
    let cfg = super::connect::load_config(g)?;
    let limit = g
        .timeout
        .unwrap_or(cfg.provisioning_timeout + cfg.boot_timeout + Duration::from_secs(60));
    let sb = wait_ready(&cl, vmid, c.json, limit)?;
    if c.json {
        output::print_json(&sb)
    } else {
        output::line(&vmid.to_string())
    }
}

fn strip_nulls(mut v: Value) -> Value {
    if let Value::Object(m) = &mut v {
        m.retain(|_, x| !x.is_null() && x.as_array().is_none_or(|a| !a.is_empty()));
    }
    v
}

/// Follows a new sandbox's events from its first until it is READY (Ok) or
/// cannot get there. Progress goes to stderr when stderr is a terminal.
/// `limit` bounds how long it may go without news.
fn wait_ready(cl: &Client, vmid: u32, quiet: bool, limit: Duration) -> Result<Value, CliError> {
    let started = std::time::Instant::now();
    let mut last_state = None;
    let streamed = cl.stream(
        &format!("/v1/sandboxes/{vmid}/events?follow=1&after=0"),
        Some(limit),
        |item| {
            if let Some(to) = item["to"].as_str() {
                last_state = State::parse(to);
            }
            if !quiet {
                let msg = item["msg"].as_str().unwrap_or("");
                output::progress(
                    &format!("[{:>5.1}s] {vmid}: {msg}", started.elapsed().as_secs_f64()),
                    false,
                );
            }
            !matches!(
                last_state,
                Some(
                    State::Ready
                        | State::Failed
                        | State::Stopped
                        | State::Timeout
                        | State::Destroyed
                )
            )
        },
    );
    if let Err(crate::api::client::ClientError::Io(e)) = &streamed {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            return Err(CliError::Host(format!(
                "sandbox {vmid} made no progress for {}; it is still {}; see `agentlab logs {vmid}`",
                crate::time::format_duration(limit),
                last_state.map_or("being created".to_string(), |s| s.to_string())
            )));
        }
    }
    streamed?;
    let sb = cl.get(&format!("/v1/sandboxes/{vmid}"))?;
    settled_ok(&sb)?;
    Ok(sb)
}

/// A sandbox that settled READY (or busier) is fine; anything else is why.
fn settled_ok(sb: &Value) -> Result<(), CliError> {
    let vmid = &sb["vmid"];
    match State::parse(sb["state"].as_str().unwrap_or("")) {
        Some(State::Ready | State::Running | State::Completed) => Ok(()),
        Some(state) => Err(CliError::Host(format!(
            "sandbox {vmid} is {state}{}; see `agentlab logs {vmid}`",
            sb["last_error"]
                .as_str()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ))),
        None => Err(CliError::Host(format!(
            "sandbox {vmid}: unexpected answer {sb}"
        ))),
    }
}

fn print_state(sb: &Value, json: bool) -> Result<(), CliError> {
    if json {
        return output::print_json(sb);
    }
    output::line(&format!(
        "sandbox {} is {}",
        sb["vmid"],
        sb["state"].as_str().unwrap_or("?")
    ))
}

fn list(g: &Global, c: ListCmd) -> Result<(), CliError> {
    let q = if c.all { "?all=1" } else { "" };
    let r = client(g)?.get(&format!("/v1/sandboxes{q}"))?;
    if c.json {
        return output::print_json(&r["sandboxes"]);
    }
    let sandboxes: Vec<Sandbox> = serde_json::from_value(r["sandboxes"].clone())
        .map_err(|e| CliError::Host(format!("unexpected answer from agentlabd: {e}")))?;
    let now = Timestamp::now();
    let rows: Vec<Vec<String>> = sandboxes
        .iter()
        .map(|s| {
            vec![
                s.vmid.to_string(),
                s.name.clone(),
                s.state.to_string(),
                s.profile.clone(),
                lease_text(s, now),
                output::relative(s.created_at, now),
            ]
        })
        .collect();
    output::table(
        &["VMID", "NAME", "STATE", "PROFILE", "LEASE", "CREATED"],
        &rows,
    )
}

fn lease_text(s: &Sandbox, now: Timestamp) -> String {
    match (s.keepalive, s.lease_expires_at) {
        (true, _) => "keepalive".into(),
        (false, Some(at)) if s.state.is_live() => format!("expires {}", output::relative(at, now)),
        (false, Some(_)) => "-".into(),
        (false, None) => "none".into(),
    }
}

fn show(g: &Global, c: ShowCmd) -> Result<(), CliError> {
    let v = client(g)?.get(&format!(
        "/v1/sandboxes/{}",
        percent_encode_component(&c.id)
    ))?;
    if c.json {
        return output::print_json(&v);
    }
    let s: Sandbox = serde_json::from_value(v)
        .map_err(|e| CliError::Host(format!("unexpected answer from agentlabd: {e}")))?;
    output::fields(&show_fields(&s, Timestamp::now()))
}

/// What `sandbox show` prints, in order.
fn show_fields(s: &Sandbox, now: Timestamp) -> Vec<(&'static str, String)> {
    let disk = s.disk.as_ref();
    let rt = s.runtime.as_ref();
    let lease = match s.lease_expires_at {
        Some(at) => format!("{at} ({})", output::relative(at, now)),
        None => "none".into(),
    };
    vec![
        ("vmid", s.vmid.to_string()),
        ("name", s.name.clone()),
        ("state", s.state.to_string()),
        ("profile", s.profile.clone()),
        ("backend", s.backend.clone()),
        (
            "lease expires",
            if s.keepalive {
                "never (keepalive)".into()
            } else {
                lease
            },
        ),
        (
            "resources",
            format!("{} vCPU, {} MiB", s.resources.cores, s.resources.memory_mb),
        ),
        ("image", disk.map(|d| d.image.clone()).unwrap_or_default()),
        (
            "base image",
            disk.map(|d| format!("{} ({})", d.base_path, d.base_format))
                .unwrap_or_default(),
        ),
        (
            "overlay",
            disk.map(|d| format!("{} ({})", d.overlay_path, output::bytes(d.virtual_size)))
                .unwrap_or_default(),
        ),
        (
            "qemu pid",
            rt.map(|r| r.pid.to_string()).unwrap_or_default(),
        ),
        (
            "accelerator",
            rt.map(|r| r.accel.clone()).unwrap_or_default(),
        ),
        ("run dir", rt.map(|r| r.run_dir.clone()).unwrap_or_default()),
        (
            "guest os",
            s.guest.as_ref().map(|g| g.os.clone()).unwrap_or_default(),
        ),
        (
            "guest kernel",
            s.guest
                .as_ref()
                .map(|g| g.kernel.clone())
                .unwrap_or_default(),
        ),
        (
            "guest agent",
            s.guest
                .as_ref()
                .map(|g| g.agent.clone())
                .unwrap_or_default(),
        ),
        (
            "addresses",
            s.guest
                .as_ref()
                .map(|g| g.addresses.join(", "))
                .unwrap_or_default(),
        ),
        ("mac", s.mac.clone()),
        ("ip", s.ip.clone().unwrap_or_default()),
        (
            "created",
            format!("{} ({})", s.created_at, output::relative(s.created_at, now)),
        ),
        (
            "updated",
            format!("{} ({})", s.updated_at, output::relative(s.updated_at, now)),
        ),
        ("last error", s.last_error.clone().unwrap_or_default()),
    ]
}

fn revert(g: &Global, c: RevertCmd) -> Result<(), CliError> {
    if c.no_restart && c.restart {
        return Err(CliError::User(
            "--restart and --no-restart exclude each other".into(),
        ));
    }
    let restart = match (c.restart, c.no_restart) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    };
    let mut body = json!({ "force": c.force, "wait": c.wait });
    if let Some(r) = restart {
        body["restart"] = json!(r);
    }
    let r = client(g)?.post(&path(&c.id, "revert"), &body)?;
    let vmid = vmid_of(&r["sandbox"])?;
    if c.wait && r["restarted"] == true {
        settled_ok(&r["sandbox"])?;
    }
    if c.json {
        return output::print_json(&r);
    }
    output::line(&format!(
        "sandbox {vmid}: disk reverted to clean; {}",
        if r["restarted"] == true {
            format!(
                "restarted ({})",
                r["sandbox"]["state"].as_str().unwrap_or("?")
            )
        } else {
            "left stopped".to_string()
        }
    ))
}

fn prune(g: &Global, c: PruneCmd) -> Result<(), CliError> {
    let r = client(g)?.post("/v1/sandboxes/prune", &json!({ "dry_run": c.dry_run }))?;
    if c.json {
        return output::print_json(&r);
    }
    let verb = if c.dry_run { "would remove" } else { "removed" };
    let orphans = r["orphans"].as_array().cloned().unwrap_or_default();
    for o in &orphans {
        let what = match (o["pid"].as_u64(), o["path"].as_str()) {
            (Some(pid), _) => format!("process {pid}"),
            (None, Some(p)) => p.to_string(),
            _ => "?".into(),
        };
        output::line(&format!(
            "{verb} {what}: {}",
            o["why"].as_str().unwrap_or("")
        ))?;
    }
    for f in r["failed"].as_array().cloned().unwrap_or_default() {
        output::line(&format!("could not remove: {}", f.as_str().unwrap_or("")))?;
    }
    let forgotten = r["forgotten"].as_array().map(Vec::len).unwrap_or(0);
    output::line(&format!(
        "{} orphan(s) {verb}; {forgotten} destroyed record(s) forgotten",
        orphans.len()
    ))?;
    if r["failed"].as_array().is_some_and(|f| !f.is_empty()) {
        return Err(CliError::Host("some orphans could not be removed".into()));
    }
    Ok(())
}
