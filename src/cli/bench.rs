//! `agentlab bench`: figures, never assertions.
//!
//! - boot: the default guest booted `--runs` times through the daemon
//!   (`sandbox new --wait`: request to READY, which is when its agent
//!   answers) and as many times by a bare `qemu-system-x86_64` line with the
//!   same kernel, initramfs, disk layering and accelerator, timed from spawn
//!   until the same agent answers `guest-sync-delimited`; medians and ratio
//!   (goal: agentlab ≤ 1.10× bare QEMU);
//! - agent: `exec -- true` round trip (median of 50) and a 100 MB file copied
//!   in and out, through agentlab's agent and through a stock qemu-ga (the
//!   `default-qemu-ga` image, built on the fly when the host has qemu-ga);
//! - overlay: writing a sandbox disk natively vs `qemu-img create` (median of 50);
//! - memory: the daemon's RSS idle and with `--concurrent` sandboxes running.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use argh::FromArgs;
use serde_json::{json, Value};

use super::connect::{client, load_config};
use super::{cp, output, CliError, Global};
use crate::api::client::Client;
use crate::image::store::{Boot, Image, ImageStore, DEFAULT_IMAGE};
use crate::qcow;
use crate::qga::client::AgentClient;
use crate::qga::frames::FrameReader;
use crate::qga::wire::{self, Frame, Message};

const QEMU_GA_IMAGE: &str = "default-qemu-ga";

#[derive(FromArgs)]
/// Measure boot, exec and copy against bare QEMU and stock qemu-ga, overlay creation and daemon memory.
#[argh(
    subcommand,
    name = "bench",
    note = "Boots real guests: a few minutes under software emulation. Figures only, no pass/fail.",
    error_code(2, "a measurement could not be taken")
)]
pub struct BenchCmd {
    /// boots per side (default 5)
    #[argh(option, default = "5")]
    runs: usize,
    /// exec round trips per agent (default 50)
    #[argh(option, default = "50")]
    execs: usize,
    /// megabytes copied each way per agent (default 100)
    #[argh(option, default = "100")]
    copy_mb: u64,
    /// sandboxes for the memory figure (default 5)
    #[argh(option, default = "5")]
    concurrent: usize,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

pub fn run(g: &Global, c: BenchCmd) -> Result<(), CliError> {
    if c.runs == 0 || c.execs == 0 {
        return Err(CliError::User(
            "--runs and --execs must be at least 1".into(),
        ));
    }
    let cl = client(g)?;
    let cfg = load_config(g)?;
    // The first agentlab boot must not include building the image.
    cl.post("/v1/images/default/build", &json!({}))?;
    let accel = cl.get("/v1/status")?["backend"]["accel"]
        .as_str()
        .unwrap_or("tcg")
        .to_string();
    let image = ImageStore::new(&cfg.images_dir)
        .resolve(DEFAULT_IMAGE)
        .map_err(|e| CliError::Host(crate::log::error_chain(&e)))?;
    let tmp = std::env::temp_dir().join(format!("agentlab-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let result = measure(g, &cl, &c, &accel, &cfg.qemu_binary, &image, &tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    let mut report = result?;
    report["accel"] = json!(accel);
    if c.json {
        output::print_json(&report)
    } else {
        print_report(&report)
    }
}

fn measure(
    g: &Global,
    cl: &Client,
    c: &BenchCmd,
    accel: &str,
    qemu: &str,
    image: &Image,
    tmp: &Path,
) -> Result<Value, CliError> {
    let idle_rss = cl.get("/v1/status")?["rss_bytes"].as_u64().unwrap_or(0);
    let (mut ours, mut bare) = (Vec::new(), Vec::new());
    // Interleave the sides so drift in host load hits both alike.
    for i in 0..c.runs {
        output::progress(&format!("bench: boot {}/{}", i + 1, c.runs), false);
        ours.push(boot_agentlab(cl)?);
        bare.push(boot_bare(qemu, accel, image, tmp)?);
    }
    let agentlab = agent_figures(g, cl, c, None, tmp)?;
    let qemu_ga = match cl.post("/v1/images/default/build", &json!({ "qemu_ga": true })) {
        Ok(_) => agent_figures(g, cl, c, Some(QEMU_GA_IMAGE), tmp)?,
        Err(e) => json!({ "skipped": crate::log::error_chain(&e) }),
    };
    let (native, qimg) = overlay_times(image, tmp)?;
    let busy_rss = busy_rss(cl, c.concurrent)?;
    let (o, b) = (median(&ours), median(&bare));
    Ok(json!({
        "boot": { "runs": c.runs, "agentlab_ms": ours, "bare_ms": bare, "agentlab_median_ms": o, "bare_median_ms": b, "ratio": o / b },
        "agents": { "agentlab": agentlab, "qemu_ga": qemu_ga },
        "overlay": { "native_median_us": median(&native), "qemu_img_median_us": median(&qimg), "samples": native.len() },
        "memory": { "idle_rss_bytes": idle_rss, "busy_rss_bytes": busy_rss, "sandboxes": c.concurrent },
    }))
}

/// Daemon RSS with `n` sandboxes running; they are removed whatever happens.
fn busy_rss(cl: &Client, n: usize) -> Result<u64, CliError> {
    output::progress(&format!("bench: {n} concurrent sandboxes"), false);
    let mut vmids = Vec::new();
    let busy = (0..n)
        .try_for_each(|_| {
            let sb = cl.post("/v1/sandboxes", &json!({ "wait": true, "ttl": "10m" }))?;
            vmids.push(sb["vmid"].as_u64().unwrap_or(0));
            Ok::<(), CliError>(())
        })
        .and_then(|()| Ok(cl.get("/v1/status")?["rss_bytes"].as_u64().unwrap_or(0)));
    for v in vmids {
        let _ = cl.post(
            &format!("/v1/sandboxes/{v}/destroy"),
            &json!({ "force": true }),
        );
    }
    busy
}

fn print_report(r: &Value) -> Result<(), CliError> {
    let ms = |v: &Value| format!("{:.0} ms", v.as_f64().unwrap_or(0.0));
    let rate = |v: &Value| match v.as_f64() {
        Some(x) => format!("{x:.1} MB/s"),
        None => "-".into(),
    };
    let mut f = vec![
        ("accelerator", r["accel"].as_str().unwrap_or("").to_string()),
        (
            "boot to agent, agentlab (median)",
            ms(&r["boot"]["agentlab_median_ms"]),
        ),
        (
            "boot to agent, bare qemu (median)",
            ms(&r["boot"]["bare_median_ms"]),
        ),
        (
            "boot ratio",
            format!(
                "{:.3}x (goal <= 1.10x)",
                r["boot"]["ratio"].as_f64().unwrap_or(0.0)
            ),
        ),
    ];
    for (label, key) in [("agentlab agent", "agentlab"), ("stock qemu-ga", "qemu_ga")] {
        let a = &r["agents"][key];
        if let Some(why) = a["skipped"].as_str() {
            f.push((label, format!("skipped: {why}")));
            continue;
        }
        f.push((
            label,
            format!(
                "exec -- true {:.1} ms (median of {}), copy in {}, copy out {}",
                a["exec_median_ms"].as_f64().unwrap_or(0.0),
                a["execs"],
                rate(&a["copy_in_mb_s"]),
                rate(&a["copy_out_mb_s"]),
            ),
        ));
    }
    f.push((
        "overlay, native (median)",
        format!(
            "{:.1} us",
            r["overlay"]["native_median_us"].as_f64().unwrap_or(0.0)
        ),
    ));
    f.push((
        "overlay, qemu-img (median)",
        format!(
            "{:.1} us",
            r["overlay"]["qemu_img_median_us"].as_f64().unwrap_or(0.0)
        ),
    ));
    f.push((
        "daemon RSS, idle",
        output::bytes(r["memory"]["idle_rss_bytes"].as_u64().unwrap_or(0)),
    ));
    f.push((
        "daemon RSS, busy",
        format!(
            "{} with {} sandboxes",
            output::bytes(r["memory"]["busy_rss_bytes"].as_u64().unwrap_or(0)),
            r["memory"]["sandboxes"]
        ),
    ));
    output::fields(&f)
}

fn boot_agentlab(cl: &Client) -> Result<f64, CliError> {
    let t = Instant::now();
    // A lease, so that a bench killed here leaves nothing running for long.
    let sb = cl.post("/v1/sandboxes", &json!({ "wait": true, "ttl": "10m" }))?;
    let elapsed = t.elapsed().as_secs_f64() * 1000.0;
    let vmid = sb["vmid"].as_u64().unwrap_or(0);
    let state = sb["state"].as_str().unwrap_or("").to_string();
    cl.post(
        &format!("/v1/sandboxes/{vmid}/destroy"),
        &json!({ "force": true }),
    )?;
    if state != "READY" {
        return Err(CliError::Host(format!(
            "bench: sandbox {vmid} ended {state}, not READY"
        )));
    }
    Ok(elapsed)
}

/// The same guest by hand, timed until its agent answers a sync.
fn boot_bare(qemu: &str, accel: &str, image: &Image, tmp: &Path) -> Result<f64, CliError> {
    let overlay = tmp.join("bare.qcow2");
    let sock = tmp.join("bare-qga.sock");
    let _ = std::fs::remove_file(&sock);
    let t = Instant::now();
    qcow::write_overlay(&overlay, &image.disk, image.format, image.virtual_size)
        .map_err(|e| CliError::Host(crate::log::error_chain(&e)))?;
    let mut child = bare_command(qemu, accel, image, &overlay, &sock)?
        .spawn()
        .map_err(|e| CliError::Host(format!("bench: cannot run {qemu}: {e}")))?;
    let answered = wait_for_agent(&mut child, &sock, Duration::from_secs(300));
    let elapsed = t.elapsed().as_secs_f64() * 1000.0;
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&overlay);
    answered.map(|()| elapsed)
}

fn wait_for_agent(child: &mut Child, sock: &Path, limit: Duration) -> Result<(), CliError> {
    let end = Instant::now() + limit;
    while !sock.exists() {
        if Instant::now() > end || child.try_wait().ok().flatten().is_some() {
            return Err(CliError::Host(
                "bench: bare qemu never opened its agent socket".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let agent = Arc::new(AgentClient::connect(sock).map_err(|e| CliError::Host(e.to_string()))?);
    while Instant::now() < end {
        if agent.sync(Duration::from_millis(100)).is_ok() {
            return Ok(());
        }
    }
    Err(CliError::Host(
        "bench: the bare guest's agent never answered".into(),
    ))
}

/// `-serial stdio` is left out: the console costs the guest time, and
/// agentlab's console reader takes it whether or not anyone looks.
fn bare_command(
    qemu: &str,
    accel: &str,
    image: &Image,
    overlay: &Path,
    sock: &Path,
) -> Result<Command, CliError> {
    let Boot::Kernel {
        kernel,
        initrd,
        cmdline,
    } = &image.boot
    else {
        return Err(CliError::Host(
            "bench: the default image does not boot a kernel".into(),
        ));
    };
    let base = json!({"driver": image.format.as_str(), "node-name": "base0", "read-only": true,
        "file": {"driver": "file", "filename": image.disk.display().to_string(), "read-only": true}});
    let root = json!({"driver": "qcow2", "node-name": "root", "backing": "base0",
        "file": {"driver": "file", "filename": overlay.display().to_string()}});
    let qga = format!("socket,id=qga0,path={},server=on,wait=off", sock.display());
    let cpu = if accel == "kvm" { "host" } else { "max" };
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-machine", "q35", "-accel", accel, "-cpu", cpu, "-m", "512", "-smp", "1",
    ])
    .args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ])
    .args([
        "-blockdev",
        &base.to_string(),
        "-blockdev",
        &root.to_string(),
        "-device",
        "virtio-blk-pci,drive=root",
    ])
    .args(["-device", "virtio-serial-pci", "-chardev", &qga])
    .args([
        "-device",
        "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
    ])
    .args(["-serial", "file:/dev/null"])
    .arg("-kernel")
    .arg(kernel)
    .arg("-initrd")
    .arg(initrd)
    .args(["-append", cmdline])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    Ok(cmd)
}

/// Exec round trips and copy throughput through one kind of agent.
fn agent_figures(
    g: &Global,
    cl: &Client,
    c: &BenchCmd,
    image: Option<&str>,
    tmp: &Path,
) -> Result<Value, CliError> {
    let mut body = json!({ "wait": true, "ttl": "30m" });
    if let Some(i) = image {
        body["image"] = json!(i);
    }
    output::progress(
        &format!("bench: agent figures ({})", image.unwrap_or("agentlab")),
        false,
    );
    let sb = cl.post("/v1/sandboxes", &body)?;
    let vmid = sb["vmid"].as_u64().unwrap_or(0).to_string();
    let r = agent_runs(g, cl, c, &vmid, tmp);
    let _ = cl.post(
        &format!("/v1/sandboxes/{vmid}/destroy"),
        &json!({ "force": true }),
    );
    r
}

fn agent_runs(
    g: &Global,
    cl: &Client,
    c: &BenchCmd,
    vmid: &str,
    tmp: &Path,
) -> Result<Value, CliError> {
    let mut times = Vec::new();
    for _ in 0..c.execs {
        let t = Instant::now();
        exec_true(cl, vmid)?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let file = tmp.join("payload.bin");
    let bytes = c.copy_mb << 20;
    write_payload(&file, bytes)?;
    let t = Instant::now();
    cp::upload(g, &file, vmid, "/tmp/payload.bin")?;
    let up = t.elapsed().as_secs_f64();
    let back = tmp.join("back.bin");
    let t = Instant::now();
    cp::download(g, vmid, "/tmp/payload.bin", &back)?;
    let down = t.elapsed().as_secs_f64();
    let same = std::fs::read(&file)? == std::fs::read(&back)?;
    let _ = std::fs::remove_file(&back);
    if !same {
        return Err(CliError::Host("bench: the copy came back different".into()));
    }
    let mb = bytes as f64 / 1e6;
    Ok(json!({
        "execs": c.execs, "exec_ms": times, "exec_median_ms": median(&times),
        "copy_bytes": bytes, "copy_in_mb_s": mb / up, "copy_out_mb_s": mb / down,
        "agent": cl.get(&format!("/v1/sandboxes/{vmid}"))?["guest"]["agent"],
    }))
}

/// One `exec -- true`, the way the CLI runs it (an upgraded session).
fn exec_true(cl: &Client, vmid: &str) -> Result<(), CliError> {
    let up = cl.upgrade(
        "POST",
        &format!("/v1/sandboxes/{vmid}/exec"),
        Some(&json!({ "argv": ["true"] })),
    )?;
    let mut frames = FrameReader::new(up.stream, &up.pending, 1 << 20);
    while let Some(f) = frames.next_frame()? {
        if let Frame::Json(j) = f {
            if let Ok(Message::Event { name, data }) = Message::parse(&j) {
                if name == wire::EVENT_EXIT && data["code"] == 0 {
                    return Ok(());
                }
                return Err(CliError::Host(format!("bench: exec true ended {data}")));
            }
        }
    }
    Err(CliError::Host(
        "bench: the exec session closed early".into(),
    ))
}

fn write_payload(path: &Path, bytes: u64) -> Result<(), CliError> {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut data = Vec::with_capacity(bytes as usize);
    while (data.len() as u64) < bytes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(bytes as usize);
    std::fs::write(path, data)?;
    Ok(())
}

fn overlay_times(image: &Image, tmp: &Path) -> Result<(Vec<f64>, Vec<f64>), CliError> {
    let path = tmp.join("ovl.qcow2");
    let (mut native, mut qimg) = (Vec::new(), Vec::new());
    for _ in 0..50 {
        let _ = std::fs::remove_file(&path);
        let t = Instant::now();
        qcow::write_overlay(&path, &image.disk, image.format, image.virtual_size)
            .map_err(|e| CliError::Host(crate::log::error_chain(&e)))?;
        native.push(t.elapsed().as_secs_f64() * 1e6);
        let _ = std::fs::remove_file(&path);
        let t = Instant::now();
        let st = Command::new("qemu-img")
            .args([
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                image.format.as_str(),
                "-b",
            ])
            .arg(&image.disk)
            .arg(&path)
            .status()
            .map_err(|e| CliError::Host(format!("bench: cannot run qemu-img: {e}")))?;
        qimg.push(t.elapsed().as_secs_f64() * 1e6);
        if !st.success() {
            return Err(CliError::Host("bench: qemu-img create failed".into()));
        }
    }
    Ok((native, qimg))
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}
