//! Sandboxes as real guests (default image, TCG): create, persist, stop,
//! start, revert, destroy, leases, several at once, and exits the guest
//! or the host cause.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Env, BOOT, SHORT};

#[test]
fn guest_writes_survive_stop_start_and_vanish_on_revert() {
    let mut env = Env::new("life", "");
    env.start_daemon();
    let vmid = env.new_ready(&[]);
    let sb = env.sandbox(vmid);
    assert_eq!(sb["state"], "READY");
    assert_eq!(sb["runtime"]["accel"], "tcg");
    let overlay = sb["disk"]["overlay_path"].as_str().unwrap().to_string();
    assert!(Path::new(&overlay).exists());

    assert!(env.console(
        vmid,
        "echo agentlab-$((40+2)) > /root/persist; sync; echo written-$((1+1))",
        "written-2",
        SHORT
    ));
    let first_pid = env.qemu_pid(vmid).unwrap();
    // Each sandbox's QEMU runs under a uid of its own.
    let status = std::fs::read_to_string(format!("/proc/{first_pid}/status")).unwrap();
    let uid_line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .to_string();
    assert!(
        uid_line.contains(&(200_000 + vmid).to_string()),
        "{uid_line}"
    );

    assert_eq!(
        env.ok(&["sandbox", "stop", &vmid.to_string()]).trim(),
        format!("sandbox {vmid} is STOPPED")
    );
    assert!(
        !Path::new(&format!("/proc/{first_pid}")).exists(),
        "qemu still runs after stop"
    );

    env.ok(&["sandbox", "start", "--wait", &vmid.to_string()]);
    assert!(
        env.console(vmid, "cat /root/persist", "agentlab-42", SHORT),
        "the file did not survive stop/start"
    );

    let out = env.ok(&["sandbox", "revert", "--wait", &vmid.to_string()]);
    assert!(
        out.contains("reverted to clean; restarted (READY)"),
        "{out}"
    );
    assert!(env.console(
        vmid,
        "cat /root/persist 2>/dev/null || echo gone-$((2+3))",
        "gone-5",
        SHORT
    ));

    env.ok(&["sandbox", "destroy", &vmid.to_string()]);
    assert_eq!(env.state(vmid), "DESTROYED");
    assert!(!Path::new(&overlay).exists());
    assert!(!env.path(&format!("run/vms/{vmid}")).exists());
    assert!(env.qemu_processes().is_empty());
}

#[test]
fn expired_lease_destroys_the_sandbox_and_records_timeout() {
    let mut env = Env::new("ttl", "");
    env.start_daemon();
    // Leases count from creation, however long the boot takes.
    let vmid: u32 = env
        .ok(&["sandbox", "new", "--ttl", "8s"])
        .trim()
        .parse()
        .unwrap();
    assert!(
        env.wait_state(vmid, "DESTROYED", Duration::from_secs(60)),
        "state {}",
        env.state(vmid)
    );
    let events = env
        .api()
        .get(&format!("/v1/sandboxes/{vmid}/events?tail=50"))
        .unwrap();
    let to: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["to"].as_str())
        .collect();
    assert!(to.ends_with(&["TIMEOUT", "DESTROYED"]), "{to:?}");
    assert!(env.qemu_processes().is_empty());
    assert!(!env.path(&format!("data/sandboxes/{vmid}")).exists());
}

#[test]
fn renewed_and_keepalive_leases_outlive_their_ttl() {
    let mut env = Env::new("renew", "");
    env.start_daemon();
    let renewed: u32 = env
        .ok(&["sandbox", "new", "--ttl", "10s"])
        .trim()
        .parse()
        .unwrap();
    let out = env.ok(&[
        "sandbox",
        "lease",
        "renew",
        "--ttl",
        "1h",
        &renewed.to_string(),
    ]);
    assert!(out.contains("lease renewed until"), "{out}");
    let kept: u32 = env
        .ok(&["sandbox", "new", "--ttl", "1s", "--keepalive"])
        .trim()
        .parse()
        .unwrap();
    std::thread::sleep(Duration::from_secs(14));
    assert!(
        env.wait_state(renewed, "READY", BOOT),
        "renewed: {}",
        env.state(renewed)
    );
    assert!(
        env.wait_state(kept, "READY", BOOT),
        "keepalive: {}",
        env.state(kept)
    );
}

#[test]
fn five_sandboxes_boot_at_once() {
    let mut env = Env::new("five", "");
    env.start_daemon();
    // Build the image once up front so five first uses do not race to build it.
    env.ok(&["image", "build-default"]);
    let vmids: Vec<u32> = (0..5)
        .map(|_| env.ok(&["sandbox", "new"]).trim().parse().unwrap())
        .collect();
    for v in &vmids {
        assert!(
            env.wait_state(*v, "READY", Duration::from_secs(240)),
            "sandbox {v}: {}",
            env.state(*v)
        );
    }
    let mut pids: Vec<u32> = vmids.iter().map(|v| env.qemu_pid(*v).unwrap()).collect();
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 5);
    let list = env.ok(&["sandbox", "list"]);
    assert_eq!(
        list.lines().filter(|l| l.contains("READY")).count(),
        5,
        "{list}"
    );
    for v in &vmids {
        env.ok(&["sandbox", "destroy", &v.to_string()]);
    }
    assert!(env.qemu_processes().is_empty());
}

#[test]
fn guest_poweroff_stops_and_killed_qemu_fails() {
    let mut env = Env::new("exits", "");
    env.start_daemon();
    let vmid = env.new_ready(&[]);
    env.api()
        .post(
            &format!("/v1/sandboxes/{vmid}/console"),
            &serde_json::json!({"data": "poweroff\n"}),
        )
        .unwrap();
    assert!(
        env.wait_state(vmid, "STOPPED", SHORT),
        "after poweroff: {}",
        env.state(vmid)
    );

    env.ok(&["sandbox", "start", "--wait", &vmid.to_string()]);
    let pid = env.qemu_pid(vmid).unwrap();
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(
        env.wait_state(vmid, "FAILED", SHORT),
        "after kill -9: {}",
        env.state(vmid)
    );
    let err = env.sandbox(vmid)["last_error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(err.contains("signal 9"), "{err}");
    // A failed sandbox keeps its disk and starts again.
    env.ok(&["sandbox", "start", "--wait", &vmid.to_string()]);
    assert_eq!(env.state(vmid), "READY");
}

#[test]
fn logs_show_events_and_console_and_follow() {
    let mut env = Env::new("logs", "");
    env.start_daemon();
    let vmid = env.new_ready(&[]);
    let out = env.ok(&["logs", &vmid.to_string(), "--tail", "500"]);
    assert!(out.contains("[BOOTING -> READY]"), "{out}");
    assert!(out.contains("console | AGENTLAB-READY"), "{out}");

    let mut follow = std::process::Command::new(common::BIN)
        .args([
            "logs",
            &vmid.to_string(),
            "--follow",
            "--tail",
            "0",
            "--json",
        ])
        .env("AGENTLAB_CONFIG", &env.config)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    env.ok(&["sandbox", "stop", &vmid.to_string()]);
    std::thread::sleep(Duration::from_millis(500));
    follow.kill().unwrap();
    let out = follow.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.iter().any(|l| l["to"] == "STOPPED"), "{text}");
}

#[test]
fn stop_while_booting_does_not_deadlock() {
    // A guest that ignores the power button gets stopped while booting; it
    // reports READY while stop holds the sandbox and waits out the grace
    // period. Stop must still end (quit after the grace) and leave it STOPPED.
    let mut env = Env::new("stopboot", "stop_timeout: 12s\n");
    env.start_daemon();
    env.ok(&["image", "build-default"]);
    let (from, to) = (env.path("images/default"), env.path("images/noacpi"));
    assert!(Command::new("cp")
        .args(["-a", "--sparse=always"])
        .arg(&from)
        .arg(&to)
        .status()
        .unwrap()
        .success());
    let disk = to.join("rootfs.raw");
    assert!(Command::new("chmod")
        .arg("u+w")
        .arg(&disk)
        .status()
        .unwrap()
        .success());
    let edited = Command::new("debugfs")
        .args(["-w", "-R", "rm /etc/acpi/PWRF/00000080"])
        .arg(&disk)
        .output()
        .unwrap();
    assert!(edited.status.success(), "{}", common::stderr(&edited));
    env.write_profile("noacpi.yaml", "name: noacpi\nimage: noacpi\n");

    let vmid: u32 = env
        .ok(&["sandbox", "new", "--profile", "noacpi"])
        .trim()
        .parse()
        .unwrap();
    let deadline = std::time::Instant::now() + BOOT;
    while env.qemu_pid(vmid).is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = env.cli(&["sandbox", "stop", &vmid.to_string()]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let events = env.ok(&["logs", &vmid.to_string(), "--tail", "1000"]);
    assert!(
        events.contains("console | AGENTLAB-READY"),
        "the guest never reported during the stop:\n{events}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(env.state(vmid), "STOPPED");
}
