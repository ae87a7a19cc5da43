//! `agentlab bench`: figures, never assertions.
//!
//! - boot: the default guest booted `--runs` times through the daemon
//!   (`sandbox new --wait`, request to READY) and as many times by a bare
//!   `qemu-system-x86_64` line with the same kernel, initramfs, disk layering
//!   and accelerator, timed from spawn to the same ready line; medians and
//!   their ratio (goal: agentlab ≤ 1.10× bare QEMU);
//! - overlay: writing a sandbox disk natively vs `qemu-img create` (median of 50);
//! - memory: the daemon's RSS idle and with 5 sandboxes running.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use argh::FromArgs;
use serde_json::{json, Value};

use super::connect::{client, load_config};
use super::{output, CliError, Global};
use crate::api::client::Client;
use crate::image::store::{Boot, ImageStore, DEFAULT_IMAGE};
use crate::qcow;

#[derive(FromArgs)]
/// Measure boot time against bare QEMU, overlay creation and daemon memory.
#[argh(
    subcommand,
    name = "bench",
    note = "Boots real guests: takes about a minute under software emulation.",
    error_code(2, "a measurement could not be taken")
)]
pub struct BenchCmd {
    /// boots per side (default 5)
    #[argh(option, default = "5")]
    runs: usize,
    /// sandboxes for the memory figure (default 5)
    #[argh(option, default = "5")]
    concurrent: usize,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

pub fn run(g: &Global, c: BenchCmd) -> Result<(), CliError> {
    if c.runs == 0 {
        return Err(CliError::User("--runs must be at least 1".into()));
    }
    let cl = client(g)?;
    let cfg = load_config(g)?;
    // Make sure the image exists so the first agentlab boot is not a build.
    cl.post("/v1/images/default/build", &json!({}))?;
    let status = cl.get("/v1/status")?;
    let accel = status["backend"]["accel"]
        .as_str()
        .unwrap_or("tcg")
        .to_string();
    let qemu = cfg.qemu_binary.clone();
    let image = ImageStore::new(&cfg.images_dir)
        .resolve(DEFAULT_IMAGE)
        .map_err(|e| CliError::Host(crate::log::error_chain(&e)))?;
    let tmp = std::env::temp_dir().join(format!("agentlab-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| CliError::Host(e.to_string()))?;
    let result = measure(&cl, &c, &accel, &qemu, &image, &tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    let report = result?;
    if c.json {
        return output::print_json(&report);
    }
    print_report(&accel, &report)
}

/// The figures for people.
fn print_report(accel: &str, report: &Value) -> Result<(), CliError> {
    let ms = |v: &Value| format!("{:.0} ms", v.as_f64().unwrap_or(0.0));
    output::fields(&[
        ("accelerator", accel.to_string()),
        (
            "boot, agentlab (median)",
            ms(&report["boot"]["agentlab_median_ms"]),
        ),
        (
            "boot, bare qemu (median)",
            ms(&report["boot"]["bare_median_ms"]),
        ),
        (
            "boot ratio",
            format!(
                "{:.3}x (goal <= 1.10x)",
                report["boot"]["ratio"].as_f64().unwrap_or(0.0)
            ),
        ),
        (
            "overlay, native (median)",
            format!(
                "{:.1} us",
                report["overlay"]["native_median_us"]
                    .as_f64()
                    .unwrap_or(0.0)
            ),
        ),
        (
            "overlay, qemu-img (median)",
            format!(
                "{:.1} us",
                report["overlay"]["qemu_img_median_us"]
                    .as_f64()
                    .unwrap_or(0.0)
            ),
        ),
        (
            "daemon RSS, idle",
            output::bytes(report["memory"]["idle_rss_bytes"].as_u64().unwrap_or(0)),
        ),
        (
            "daemon RSS, busy",
            format!(
                "{} with {} sandboxes",
                output::bytes(report["memory"]["busy_rss_bytes"].as_u64().unwrap_or(0)),
                report["memory"]["sandboxes"]
            ),
        ),
    ])
}

fn measure(
    cl: &Client,
    c: &BenchCmd,
    accel: &str,
    qemu: &str,
    image: &crate::image::store::Image,
    tmp: &Path,
) -> Result<Value, CliError> {
    let idle_rss = cl.get("/v1/status")?["rss_bytes"].as_u64().unwrap_or(0);
    let mut ours = Vec::new();
    let mut bare = Vec::new();
    // Interleave the two sides so drift in host load hits both alike.
    for i in 0..c.runs {
        output::progress(&format!("bench: boot {}/{}", i + 1, c.runs), false);
        ours.push(boot_agentlab(cl)?);
        bare.push(boot_bare(qemu, accel, image, tmp)?);
    }
    let (native, qimg) = overlay_times(image, tmp)?;
    output::progress(
        &format!("bench: {} concurrent sandboxes", c.concurrent),
        false,
    );
    let mut vmids = Vec::new();
    let busy = (0..c.concurrent)
        .try_for_each(|_| {
            let sb = cl.post("/v1/sandboxes", &json!({ "wait": true, "ttl": "10m" }))?;
            vmids.push(sb["vmid"].as_u64().unwrap_or(0));
            Ok::<(), CliError>(())
        })
        .and_then(|()| Ok(cl.get("/v1/status")?["rss_bytes"].as_u64().unwrap_or(0)));
    // Whatever happened, leave no bench sandbox behind.
    for v in vmids {
        let _ = cl.post(
            &format!("/v1/sandboxes/{v}/destroy"),
            &json!({ "force": true }),
        );
    }
    let busy_rss = busy?;
    let (o, b) = (median(&ours), median(&bare));
    Ok(json!({
        "boot": {
            "runs": c.runs, "agentlab_ms": ours, "bare_ms": bare,
            "agentlab_median_ms": o, "bare_median_ms": b, "ratio": o / b,
        },
        "overlay": {
            "native_median_us": median(&native), "qemu_img_median_us": median(&qimg), "samples": native.len(),
        },
        "memory": { "idle_rss_bytes": idle_rss, "busy_rss_bytes": busy_rss, "sandboxes": c.concurrent },
    }))
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

/// The same guest by hand: overlay, kernel, initramfs, accelerator, ready line.
fn boot_bare(
    qemu: &str,
    accel: &str,
    image: &crate::image::store::Image,
    tmp: &Path,
) -> Result<f64, CliError> {
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
    let marker = image
        .ready_on
        .strip_prefix("console:")
        .unwrap_or("AGENTLAB-READY")
        .to_string();
    let overlay = tmp.join("bare.qcow2");
    let t = Instant::now();
    qcow::write_overlay(&overlay, &image.disk, image.format, image.virtual_size)
        .map_err(|e| CliError::Host(crate::log::error_chain(&e)))?;
    let mut child = bare_command(qemu, accel, image, &overlay, kernel, initrd, cmdline)
        .spawn()
        .map_err(|e| CliError::Host(format!("bench: cannot run {qemu}: {e}")))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| CliError::Host("bench: no stdout".into()))?;
    let found = BufReader::new(stdout)
        .split(b'\n')
        .map_while(Result::ok)
        .any(|l| String::from_utf8_lossy(&l).contains(&marker));
    let elapsed = t.elapsed().as_secs_f64() * 1000.0;
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&overlay);
    if found {
        Ok(elapsed)
    } else {
        Err(CliError::Host(
            "bench: bare qemu exited before the ready line".into(),
        ))
    }
}

/// The same guest as `sandbox new` boots, by hand: overlay on the base,
/// kernel, initramfs, accelerator, serial console on stdout.
fn bare_command(
    qemu: &str,
    accel: &str,
    image: &crate::image::store::Image,
    overlay: &Path,
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
) -> Command {
    let base = json!({"driver": image.format.as_str(), "node-name": "base0", "read-only": true,
        "file": {"driver": "file", "filename": image.disk.display().to_string(), "read-only": true}});
    let root = json!({"driver": "qcow2", "node-name": "root", "backing": "base0",
        "file": {"driver": "file", "filename": overlay.display().to_string()}});
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
    ])
    .args(["-device", "virtio-blk-pci,drive=root"])
    .arg("-kernel")
    .arg(kernel)
    .arg("-initrd")
    .arg(initrd)
    .args(["-append", cmdline, "-serial", "stdio"])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    cmd
}

fn overlay_times(
    image: &crate::image::store::Image,
    tmp: &Path,
) -> Result<(Vec<f64>, Vec<f64>), CliError> {
    let path = tmp.join("ovl.qcow2");
    let mut native = Vec::new();
    let mut qimg = Vec::new();
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
