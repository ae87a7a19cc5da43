//! The Proxmox VE backend against a fake PVE server (tests/common/fake_pve.rs):
//! the whole sandbox lifecycle through the real daemon and CLI, and the
//! races, locks, task outcomes, TLS and bad input that broke other clients.

mod common;

use std::time::{Duration, Instant};

use agentlab::config::parse_config_str;
use agentlab::proxmox_api::{Client, Form, Method, Timing};
use common::fake_pve::{FakePve, TOKEN};
use common::{stderr, Env};

const PROFILE: &str = "name: pve\ntemplate_vmid: 9000\nresources:\n  cores: 2\n  memory_mb: 2048\nnetwork:\n  mode: nat\n";

fn client_for(fake: &FakePve, extra: &str) -> Client {
    let text = fake.config_yaml() + extra;
    let cfg = parse_config_str(&text, std::path::Path::new("/x/config.yaml")).unwrap();
    let timing = Timing {
        task_poll: Duration::from_millis(50),
        proxy_retry_delay: Duration::from_millis(10),
        ..Timing::default()
    };
    Client::new(&cfg.proxmox.unwrap(), timing).unwrap()
}

fn env_with(tag: &str, fake: &FakePve) -> Env {
    let mut env = Env::new(tag, &fake.config_yaml());
    env.write_profile("pve.yaml", PROFILE);
    env.start_daemon();
    env
}

#[test]
fn sandbox_lifecycle_on_proxmox_through_daemon_and_cli() {
    let fake = FakePve::start("life", 8);
    let env = env_with("pvelife", &fake);

    let vmid = env.new_ready(&["--profile", "pve"]);
    let out = env.ok(&[
        "exec",
        &vmid.to_string(),
        "--",
        "sh",
        "-c",
        "echo hello; echo oops >&2",
    ]);
    std::fs::write(env.path("in.txt"), "payload\n").unwrap();
    env.ok(&[
        "cp",
        env.path("in.txt").to_str().unwrap(),
        &format!("{vmid}:/root/in.txt"),
    ]);
    let cat = env.ok(&["exec", &vmid.to_string(), "--", "cat", "/root/in.txt"]);
    env.ok(&[
        "cp",
        &format!("{vmid}:/root/in.txt"),
        env.path("back.txt").to_str().unwrap(),
    ]);
    env.ok(&["sandbox", "stop", &vmid.to_string()]);
    env.ok(&["sandbox", "start", &vmid.to_string()]);
    assert!(
        env.wait_state(vmid, "READY", Duration::from_secs(20)),
        "{}",
        env.daemon_log()
    );
    env.ok(&["sandbox", "revert", &vmid.to_string()]);
    assert!(
        env.wait_state(vmid, "READY", Duration::from_secs(20)),
        "{}",
        env.daemon_log()
    );
    let after_revert = env.cli(&["exec", &vmid.to_string(), "--", "cat", "/root/in.txt"]);
    let pve_vmid = *fake.with(|s| s.clones_seen.clone()).first().unwrap();
    let (fw, rules, snaps, tags) = fake.with(|s| {
        let vm = &s.vms[&pve_vmid];
        (
            vm.firewall,
            vm.rules.clone(),
            vm.snapshots.clone(),
            vm.config.get("tags").cloned(),
        )
    });
    env.ok(&["sandbox", "destroy", &vmid.to_string()]);

    assert_eq!(out, "hello\n");
    assert_eq!(cat, "payload\n");
    assert_eq!(
        std::fs::read_to_string(env.path("back.txt")).unwrap(),
        "payload\n"
    );
    assert!(
        !after_revert.status.success(),
        "the file written after `clean` survived revert"
    );
    assert_eq!(
        (fw, rules, snaps, tags.as_deref()),
        (
            true,
            vec!["group agent_nat_default".to_string()],
            vec!["clean".to_string()],
            Some("agentlab")
        )
    );
    assert!(
        !fake.with(|s| s.vms.contains_key(&pve_vmid)),
        "destroy left the VM"
    );
    assert_eq!(fake.with(|s| s.violations.clone()), Vec::<String>::new());
}

#[test]
fn two_parallel_sandboxes_colliding_on_nextid_both_get_made() {
    let fake = FakePve::start("race", 9);
    let env = env_with("pverace", &fake);

    let a = std::thread::scope(|sc| {
        let h = sc.spawn(|| env.cli(&["sandbox", "new", "--wait", "--profile", "pve"]));
        let b = env.cli(&["sandbox", "new", "--wait", "--profile", "pve"]);
        (h.join().unwrap(), b)
    });

    assert!(
        a.0.status.success() && a.1.status.success(),
        "{}\n{}\n{}",
        stderr(&a.0),
        stderr(&a.1),
        env.daemon_log()
    );
    let clones = fake.with(|s| s.clones_seen.clone());
    assert_eq!(clones.len(), 2);
    assert_ne!(clones[0], clones[1]);
    assert_eq!(fake.with(|s| s.violations.clone()), Vec::<String>::new());
}

#[test]
fn clone_lock_held_for_5s_is_waited_out() {
    let fake = FakePve::start("lock", 8);
    fake.with(|s| s.clone_lock_linger = Duration::from_secs(5));
    let env = env_with("pvelock", &fake);

    let vmid = env.new_ready(&["--profile", "pve"]);

    assert_eq!(env.state(vmid), "READY");
    let configs = fake.with(|s| {
        s.requests
            .iter()
            .filter(|r| r.starts_with("POST") && r.ends_with("/config"))
            .count()
    });
    assert!(
        configs >= 2,
        "configure was not retried while locked ({configs} calls)"
    );
}

#[test]
fn start_task_with_warnings_counts_as_success() {
    let fake = FakePve::start("warn", 8);
    fake.with(|s| {
        s.task_exit.insert("qmstart".into(), "WARNINGS: 1".into());
    });
    let env = env_with("pvewarn", &fake);

    let vmid = env.new_ready(&["--profile", "pve"]);

    assert_eq!(env.state(vmid), "READY");
}

#[test]
fn failed_clone_task_reports_its_message() {
    let fake = FakePve::start("fail", 8);
    fake.with(|s| {
        s.task_exit.insert(
            "qmclone".into(),
            "clone failed: storage 'local-lvm' is full".into(),
        );
    });
    let env = env_with("pvefail", &fake);

    let out = env.cli(&["sandbox", "new", "--wait", "--profile", "pve"]);

    let all = format!("{}{}", stderr(&out), common::stdout(&out));
    assert!(!out.status.success());
    assert!(
        all.contains("clone failed: storage 'local-lvm' is full")
            || env
                .daemon_log()
                .contains("clone failed: storage 'local-lvm' is full"),
        "{all}\n{}",
        env.daemon_log()
    );
}

#[test]
fn wrong_token_gets_a_clear_message_after_pves_delay() {
    let fake = FakePve::start("auth", 9);
    let text = fake.config_yaml().replace("11111111-", "99999999-");
    let cfg = parse_config_str(&text, std::path::Path::new("/x/config.yaml")).unwrap();
    let c = Client::new(&cfg.proxmox.unwrap(), Timing::default()).unwrap();

    let t = Instant::now();
    let e = c
        .call(Method::Get, "/version", &Form::new())
        .unwrap_err()
        .to_string();

    assert!(t.elapsed() >= Duration::from_secs(3));
    assert!(e.contains("Proxmox refused the API token root@pam!agentlab=<redacted> (401 Authentication failed!)"), "{e}");
    assert!(!e.contains("99999999"), "the secret leaked: {e}");
}

#[test]
fn wrong_fingerprint_is_refused() {
    let fake = FakePve::start("fp", 8);
    let wrong = vec!["AB"; 32].join(":");
    let text = fake.config_yaml().replace(&fake.fingerprint, &wrong);
    let cfg = parse_config_str(&text, std::path::Path::new("/x/config.yaml")).unwrap();
    let c = Client::new(&cfg.proxmox.unwrap(), Timing::default()).unwrap();

    let e = c
        .call(Method::Get, "/version", &Form::new())
        .unwrap_err()
        .to_string();

    assert!(e.contains("not the pinned proxmox_tls_fingerprint"), "{e}");
    assert_eq!(fake.with(|s| s.requests.len()), 0);
}

#[test]
fn fingerprint_command_prints_the_servers_pin() {
    let fake = FakePve::start("fpcmd", 8);
    let env = Env::new("pvefpcmd", "");

    let out = env.ok(&["proxmox", "fingerprint", &fake.url()]);

    assert_eq!(out.trim(), fake.fingerprint);
}

#[test]
fn proxy_596_is_retried_for_get_only() {
    let fake = FakePve::start("596", 8);
    let c = client_for(&fake, "");
    fake.with(|s| {
        s.inject.push_back((
            "GET".into(),
            "/version".into(),
            596,
            "Connection timed out".into(),
        ));
        s.inject.push_back((
            "POST".into(),
            "/agent/ping".into(),
            596,
            "Broken pipe".into(),
        ));
    });

    let get = c.call(Method::Get, "/version", &Form::new());
    let post = c.call(
        Method::Post,
        "/nodes/pve1/qemu/9001/agent/ping",
        &Form::new(),
    );

    assert!(get.is_ok(), "{get:?}");
    assert_eq!(post.unwrap_err().code(), Some(596));
    let posts = fake.with(|s| {
        s.requests
            .iter()
            .filter(|r| r.contains("agent/ping"))
            .count()
    });
    assert_eq!(posts, 1);
}

#[test]
fn legacy_error_message_is_read_from_the_reason_phrase() {
    let fake = FakePve::start("legacy", 7);
    let c = client_for(&fake, "");

    let e = c
        .call(Method::Get, "/nodes/pve1/qemu/4242/config", &Form::new())
        .unwrap_err();

    assert_eq!(
        e.message(),
        "Configuration file 'nodes/pve1/qemu-server/4242.conf' does not exist"
    );
    assert!(e.is_not_found());
}

#[test]
fn task_failure_carries_the_log_tail() {
    let fake = FakePve::start("tlog", 8);
    let c = client_for(&fake, "");
    fake.with(|s| {
        s.task_exit
            .insert("qmstart".into(), "VM 9001 qmp command failed".into());
    });

    let e = c
        .run_task(
            Method::Post,
            "/nodes/pve1/qemu/9001/status/start",
            &Form::new(),
            Duration::from_secs(10),
        )
        .unwrap_err();

    assert_eq!(e.message(), "VM 9001 qmp command failed");
    assert!(
        e.to_string()
            .contains("task log ends: starting | TASK ERROR: VM 9001 qmp command failed"),
        "{e}"
    );
}

#[test]
fn template_that_is_not_a_template_fails_at_sandbox_new() {
    let fake = FakePve::start("notpl", 8);
    let mut env = Env::new("pvenotpl", &fake.config_yaml());
    env.write_profile("pve.yaml", &PROFILE.replace("9000", "9001"));
    env.start_daemon();

    let out = env.cli(&["sandbox", "new", "--profile", "pve"]);

    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("VM 9001 is not a template"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn missing_security_group_fails_at_sandbox_new() {
    let fake = FakePve::start("nogrp", 8);
    let mut env = Env::new("pvenogrp", &fake.config_yaml());
    env.write_profile(
        "pve.yaml",
        &PROFILE.replace(
            "mode: nat",
            "mode: allowlist\n  allow: [\"example.com:443\"]",
        ),
    );
    env.start_daemon();

    let out = env.cli(&["sandbox", "new", "--profile", "pve"]);

    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("security group agent_nat_allowlist, which does not exist"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn unknown_node_is_named_with_the_real_ones() {
    let fake = FakePve::start("node", 8);
    let env = Env::new("pvenode", &(fake.config_yaml() + "proxmox_node: pve9\n"));
    env.write_profile("pve.yaml", PROFILE);

    let out = env.cli(&["profile", "validate", "pve"]);

    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("proxmox_node \"pve9\" is not a node of this cluster (nodes: pve1)"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn profile_validate_reports_each_check() {
    let fake = FakePve::start("valid", 9);
    let env = Env::new("pvevalid", &fake.config_yaml());
    env.write_profile("pve.yaml", PROFILE);

    let out = env.ok(&["profile", "validate", "pve"]);

    assert!(
        out.contains("ok: template VM 9000 found on node pve1, and is a template"),
        "{out}"
    );
    assert!(out.contains("ok: guest agent enabled"), "{out}");
    assert!(out.contains("profile pve: valid"), "{out}");
}

#[test]
fn missing_required_field_names_the_endpoint() {
    let fake = FakePve::start("missing", 8);
    let c = client_for(&fake, "");

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct NeedsRepoid {
        version: String,
        missing_key: String,
    }
    let e = c
        .get::<NeedsRepoid>("/version", &Form::new())
        .unwrap_err()
        .to_string();

    assert!(
        e.starts_with("GET /version: unexpected answer from Proxmox: missing field `missing_key`"),
        "{e}"
    );
}

#[test]
fn schema_fixture_matches_the_official_schema() {
    let flat = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/reference/proxmox/pve-api-flat.json");
    let Ok(text) = std::fs::read_to_string(&flat) else {
        eprintln!("{} not present; skipping the cross-check", flat.display());
        return;
    };
    let flat: serde_json::Value = serde_json::from_str(&text).unwrap();
    let subset: serde_json::Value = serde_json::from_str(common::fake_pve::SCHEMA).unwrap();
    let mut problems = Vec::new();

    for (key, params) in subset.as_object().unwrap() {
        let (method, path) = key.split_once(' ').unwrap();
        let official = &flat[path][method]["parameters"]["properties"];
        for (name, p) in params.as_object().unwrap() {
            let o = &official[name];
            if o.is_null() {
                problems.push(format!("{key}: {name} is not in the official schema"));
            } else if o["type"] != p["type"]
                || o.get("optional").and_then(|v| v.as_i64()).unwrap_or(0)
                    != p["optional"].as_i64().unwrap_or(0)
            {
                problems.push(format!("{key}: {name} differs: {o} vs {p}"));
            }
        }
    }

    assert_eq!(problems, Vec::<String>::new());
}

#[test]
fn request_with_true_boolean_is_refused_like_pve() {
    let r = common::fake_pve::validate(
        "DELETE /nodes/{node}/qemu/{vmid}",
        &[
            ("node".into(), "pve1".into()),
            ("vmid".into(), "100".into()),
            ("purge".into(), "true".into()),
        ],
    );

    assert_eq!(
        r,
        Err((
            "purge".to_string(),
            "type check ('boolean') failed - got 'true'".to_string()
        ))
    );
    let _ = TOKEN;
}

#[test]
fn a_daemon_restart_adopts_the_running_proxmox_vm() {
    let fake = FakePve::start("adopt", 8);
    let mut env = env_with("pveadopt", &fake);
    let vmid = env.new_ready(&["--profile", "pve"]);
    let id = vmid.to_string();
    env.ok(&["exec", &id, "--", "sh", "-c", "echo before >/root/mark"]);
    env.kill_daemon();
    env.start_daemon();
    assert!(
        env.wait_state(vmid, "READY", Duration::from_secs(30)),
        "{}\n{}",
        env.state(vmid),
        env.daemon_log()
    );
    assert!(
        env.daemon_log().contains("1 adopted"),
        "{}",
        env.daemon_log()
    );
    let out = env.ok(&["exec", &id, "--", "cat", "/root/mark"]);
    assert_eq!(out.trim(), "before");
    env.ok(&["sandbox", "destroy", &id]);
}

#[test]
fn a_vm_no_record_owns_is_an_orphan_that_prune_removes() {
    let fake = FakePve::start("orphan", 8);
    let mut env = env_with("pveorphan", &fake);
    let vmid = env.new_ready(&["--profile", "pve"]);
    let pve_vmid = env.sandbox(vmid)["runtime"]["pid"].as_u64().unwrap() as u32;
    // The daemon loses its database: the VM it made is nobody's now.
    env.kill_daemon();
    std::fs::remove_dir_all(env.path("data/db")).unwrap();
    env.start_daemon();
    let status = env.ok(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    let orphans = v["orphans"].as_array().unwrap();
    assert!(
        orphans
            .iter()
            .any(|o| o["kind"] == "proxmox-vm" && o["vmid"] == pve_vmid),
        "{status}"
    );
    // The template and the non-template VM the fake starts with are not ours.
    assert_eq!(orphans.len(), 1, "{status}");
    env.ok(&["sandbox", "prune"]);
    assert!(fake.with(|s| !s.vms.contains_key(&pve_vmid)));
    assert!(fake.with(|s| s.vms.contains_key(&9000) && s.vms.contains_key(&9001)));
}
