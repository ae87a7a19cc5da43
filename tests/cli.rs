//! The binary as a user meets it: help text, JSON, exit codes, the daemon
//! starting on demand, the systemd unit, and the static link.

mod common;

use std::process::{Command, Stdio};

use common::{stderr, stdout, Env, BIN};

#[test]
fn binary_is_fully_static() {
    let out = Command::new("ldd").arg(BIN).output().unwrap();
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(text.contains("not a dynamic executable"), "{text}");
}

#[test]
fn help_documents_exit_codes() {
    let top = Command::new(BIN).arg("--help").output().unwrap();
    assert!(top.status.success());
    let text = stdout(&top);
    assert!(
        text.contains("Error codes:\n  1 the request was wrong"),
        "{text}"
    );
    assert!(text.contains("  2 the daemon or the host failed"), "{text}");
    let sub = Command::new(BIN)
        .args(["sandbox", "new", "--help"])
        .output()
        .unwrap();
    assert!(stdout(&sub).contains("--wait"), "{}", stdout(&sub));
}

#[test]
fn usage_error_exits_1() {
    let out = Command::new(BIN)
        .args(["sandbox", "frobnicate"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn expose_names_a_bad_port_or_address_before_asking_the_daemon() {
    let env = Env::new("exposebad", "");
    for (args, want) in [
        (&["1000", ":http"][..], "\":http\" is not a port"),
        (&["1000", ":0"][..], "is not a port"),
        (
            &["1000", ":8080", "--bind", "1.2.3"][..],
            "--bind \"1.2.3\" is not an IPv4 address",
        ),
    ] {
        let mut all = vec!["sandbox", "expose"];
        all.extend_from_slice(args);
        let out = env.cli(&all);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn no_daemon_and_no_autostart_is_a_clear_host_error() {
    let env = Env::new("nodaemon", "");
    let out = env.cli(&["sandbox", "list"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("agentlabd is not running"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn cli_starts_the_daemon_on_demand_and_says_so() {
    let env = Env::new("autostart", "");
    let out = Command::new(BIN)
        .args(["status", "--json"])
        .env("AGENTLAB_CONFIG", &env.config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("agentlab: started agentlabd (pid"),
        "{}",
        stderr(&out)
    );
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["backend"]["accel"], "tcg");
    assert!(env.path("data/agentlabd.log").exists());
    // The daemon it started is found again, not started twice.
    let again = env.cli(&["status"]);
    assert!(again.status.success());
    assert!(!stderr(&again).contains("started agentlabd"));
}

#[test]
fn json_output_parses_for_every_listing() {
    let mut env = Env::new("json", "");
    env.start_daemon();
    for args in [
        &["status", "--json"][..],
        &["sandbox", "list", "--json"][..],
        &["profile", "list", "--json"][..],
        &["image", "list", "--json"][..],
        &["version", "--json"][..],
    ] {
        let out = env.ok(args);
        serde_json::from_str::<serde_json::Value>(&out)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"));
    }
}

#[test]
fn profile_list_shows_files_and_the_builtin_default() {
    let mut env = Env::new("profiles", "");
    env.write_profile(
        "yolo.yaml",
        "name: yolo-ephemeral\ntemplate_vmid: 9000\nimage: default\nnetwork: { bridge: agentlab0, model: virtio, mode: nat }\n\
         resources: { cores: 2, memory_mb: 2048, balloon: false }\nstorage: { root_size_gb: 10, workspace: none }\n\
         behavior: { mode: dangerous, keepalive_default: false, ttl_minutes_default: 180 }\n",
    );
    env.start_daemon();
    let out = env.ok(&["profile", "list"]);
    assert!(out.contains("yolo-ephemeral"), "{out}");
    assert!(out.contains("2048 MiB"), "{out}");
    assert!(out.contains("180m"), "{out}");
    assert!(
        out.contains("default") && out.contains("(built in)"),
        "{out}"
    );
}

#[test]
fn daemon_install_writes_a_unit_that_keeps_sandboxes_alive() {
    let env = Env::new("unit", "");
    let units = env.path("units");
    let out = Command::new(BIN)
        .args(["daemon", "--install", "--no-enable", "--unit-dir"])
        .arg(&units)
        .env("AGENTLAB_CONFIG", &env.config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let unit = std::fs::read_to_string(units.join("agentlabd.service")).unwrap();
    assert!(unit.contains("KillMode=process"));
    assert!(unit.contains(&format!("ExecStart={BIN}")), "{unit}");
}

#[test]
fn broken_pipe_on_stdout_is_success() {
    // A pipe whose reader is already gone: every write gets EPIPE.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let status = Command::new(BIN)
        .args(["version"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_failing_command_with_stdout_closed_still_reports_its_code() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let status = Command::new(BIN)
        .args(["sandbox", "list"])
        .env("AGENTLAB_CONFIG", "/nonexistent/config.yaml")
        .stdout(writer)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(1));
}

#[test]
fn guest_grow_root_refuses_to_run_on_a_host() {
    let out = Command::new(BIN)
        .args(["guest", "grow-root", "/"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("refusing"), "{}", stderr(&out));
}
