//! The daemon dies; the sandboxes do not. What the next daemon finds, and
//! what `prune` cleans.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{stderr, Env, SHORT};

#[test]
fn kill_9_daemon_then_restart_adopts_running_sandboxes() {
    let mut env = Env::new("adopt", "");
    env.start_daemon();
    let vmid = env.new_ready(&["--ttl", "1h"]);
    let pid = env.qemu_pid(vmid).unwrap();
    env.kill_daemon();
    assert!(!common::gone(pid), "qemu died with the daemon");

    env.start_daemon();
    assert_eq!(env.state(vmid), "READY");
    assert_eq!(env.qemu_pid(vmid), Some(pid));
    assert!(
        env.daemon_log().contains("1 adopted"),
        "{}",
        env.daemon_log()
    );
    // The console and QMP were reconnected: both still work.
    assert!(env.console(vmid, "echo back-$((3*3))", "back-9", SHORT));
    env.ok(&["sandbox", "stop", &vmid.to_string()]);
    assert_eq!(env.state(vmid), "STOPPED");
    assert!(common::gone(pid));
}

#[test]
fn qemu_that_died_while_the_daemon_was_down_is_failed_and_restartable() {
    let mut env = Env::new("vanish", "");
    env.start_daemon();
    let vmid = env.new_ready(&[]);
    let pid = env.qemu_pid(vmid).unwrap();
    env.kill_daemon();
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));

    env.start_daemon();
    assert_eq!(env.state(vmid), "FAILED");
    let err = env.sandbox(vmid)["last_error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(err.contains("while agentlabd was not running"), "{err}");
    env.ok(&["sandbox", "start", "--wait", &vmid.to_string()]);
    assert_eq!(env.state(vmid), "READY");
}

#[test]
fn orphan_qemu_and_files_are_listed_then_pruned() {
    let mut env = Env::new("orphan", "");
    env.start_daemon();
    // What an orphan looks like: a QEMU with its sockets in our run dir for a
    // VMID no record owns, and that VMID's directories.
    let run = env.path("run/vms/4242");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::create_dir_all(env.path("data/sandboxes/4242")).unwrap();
    let qmp = run.join("qmp.sock");
    let mut q = common::spawn_bare_qemu(&qmp);
    let status = env.ok(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    let orphans = v["orphans"].as_array().unwrap();
    assert!(orphans.iter().any(|o| o["pid"] == q.id()), "{status}");
    assert!(orphans.iter().any(|o| o["path"]
        .as_str()
        .is_some_and(|p| p.ends_with("sandboxes/4242"))));

    let dry = env.ok(&["sandbox", "prune", "--dry-run"]);
    assert!(dry.contains("would remove process"), "{dry}");
    assert!(q.try_wait().unwrap().is_none(), "dry run killed it");

    let out = env.ok(&["sandbox", "prune"]);
    assert!(
        out.contains(&format!("removed process {}", q.id())),
        "{out}"
    );
    let deadline = std::time::Instant::now() + SHORT;
    let mut exited = q.try_wait().unwrap();
    while exited.is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        exited = q.try_wait().unwrap();
    }
    assert!(exited.is_some(), "prune left the orphan qemu running");
    assert!(!env.path("data/sandboxes/4242").exists());
    assert!(!run.exists());
}

#[test]
fn prune_forgets_destroyed_records() {
    let mut env = Env::new("forget", "");
    env.start_daemon();
    // A sandbox destroyed straight away still leaves its record behind.
    env.write_profile(
        "p.yaml",
        "name: tiny\nresources: { cores: 1, memory_mb: 256 }\n",
    );
    let vmid: u32 = env
        .ok(&["sandbox", "new", "--profile", "tiny"])
        .trim()
        .parse()
        .unwrap();
    env.ok(&["sandbox", "destroy", "--force", &vmid.to_string()]);
    let out = env.ok(&["sandbox", "prune"]);
    assert!(out.contains("1 destroyed record(s) forgotten"), "{out}");
    let all = env.ok(&["sandbox", "list", "--all"]);
    assert!(!all.contains(&vmid.to_string()), "{all}");
    // VMIDs are never handed out twice.
    let next: u32 = env
        .ok(&["sandbox", "new", "--profile", "tiny"])
        .trim()
        .parse()
        .unwrap();
    assert!(next > vmid);
}

#[test]
fn a_second_daemon_on_the_same_data_dir_refuses_to_start() {
    let mut env = Env::new("twice", "");
    env.start_daemon();
    let out = Command::new(common::BIN)
        .arg("daemon")
        .env("AGENTLAB_CONFIG", &env.config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("already runs"), "{}", stderr(&out));
    // The first one is unharmed.
    env.ok(&["status"]);
}

#[test]
fn a_qemu_the_daemon_died_before_recording_is_still_adopted() {
    let mut env = Env::new("norecord", "");
    env.start_daemon();
    let vmid = env.new_ready(&[]);
    let pid = env.qemu_pid(vmid).unwrap();
    env.kill_daemon();
    // As if the daemon had died between spawning QEMU and recording it.
    {
        let store = agentlab::store::Store::open(&env.path("data/db")).unwrap();
        let mut sb = store.get(vmid).unwrap().unwrap();
        sb.runtime = None;
        sb.state = agentlab::model::State::Booting;
        let draft = agentlab::model::EventDraft::new(Some(vmid), "test", "runtime forgotten");
        store.write(&sb, None, draft).unwrap();
    }
    env.start_daemon();
    assert_eq!(env.qemu_pid(vmid), Some(pid));
    assert!(
        env.daemon_log().contains("1 adopted"),
        "{}",
        env.daemon_log()
    );
    assert!(env.console(vmid, "echo found-$((6*7))", "found-42", SHORT));
}
