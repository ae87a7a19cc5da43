//! Bad input gets a clear error and loses nothing. One test per case.

mod common;

use std::process::Command;

use common::{stderr, stdout, Env};

fn code(o: &std::process::Output) -> Option<i32> {
    o.status.code()
}

#[test]
fn unknown_vmid_or_name_is_a_user_error() {
    let mut env = Env::new("unknown", "");
    env.start_daemon();
    let by_id = env.cli(&["sandbox", "show", "4321"]);
    assert_eq!(code(&by_id), Some(1));
    assert!(
        stderr(&by_id).contains("no sandbox \"4321\""),
        "{}",
        stderr(&by_id)
    );
    let by_name = env.cli(&["sandbox", "stop", "nope"]);
    assert_eq!(code(&by_name), Some(1));
    assert!(stderr(&by_name).contains("`agentlab sandbox list`"));
}

#[test]
fn json_errors_are_json_on_stdout() {
    let mut env = Env::new("jsonerr", "");
    env.start_daemon();
    let out = env.cli(&["sandbox", "show", "4321", "--json"]);
    assert_eq!(code(&out), Some(1));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(v["error"].as_str().unwrap().contains("4321"));
}

#[test]
fn command_in_the_wrong_state_names_state_and_way_out() {
    let mut env = Env::new("wrongstate", "");
    env.start_daemon();
    let vmid = env.new_ready(&[]);
    env.ok(&["sandbox", "stop", &vmid.to_string()]);
    let again = env.cli(&["sandbox", "stop", &vmid.to_string()]);
    assert_eq!(code(&again), Some(1));
    assert_eq!(
        stderr(&again).trim(),
        format!("agentlab: error: sandbox {vmid} is STOPPED; it is already stopped; start it with `agentlab sandbox start`")
    );
    let start = env.cli(&["sandbox", "start", &vmid.to_string()]);
    assert!(start.status.success());
    let twice = env.cli(&["sandbox", "start", &vmid.to_string()]);
    assert_eq!(code(&twice), Some(1));
    assert!(stderr(&twice).contains("already running"));
}

#[test]
fn profile_with_a_typo_names_file_key_and_allowed_keys() {
    let mut env = Env::new("typo", "");
    env.start_daemon();
    env.write_profile(
        "small.yaml",
        "name: small\nresources: { cores: 1, memroy_mb: 256 }\n",
    );
    let out = env.cli(&["sandbox", "new", "--profile", "small"]);
    assert_eq!(code(&out), Some(1));
    let err = stderr(&out);
    assert!(err.contains("small.yaml"), "{err}");
    assert!(err.contains("resources.memroy_mb"), "{err}");
    assert!(err.contains("memory_mb"), "{err}");
    assert!(
        env.ok(&["sandbox", "list", "--all"]).lines().count() == 1,
        "a record was made"
    );
    // profile list reports the same problem.
    let list = env.cli(&["profile", "list"]);
    assert_eq!(code(&list), Some(1));
}

#[test]
fn modifiers_resolve_to_the_sorted_joined_profile() {
    let mut env = Env::new("mods", "");
    env.start_daemon();
    env.write_profile("sec.yaml", "name: secure-small\nimage: not-there\n");
    let out = env.cli(&["sandbox", "new", "+small", "+secure"]);
    assert_eq!(code(&out), Some(1));
    // It found secure-small, whose image does not exist.
    assert!(
        stderr(&out).contains("image \"not-there\" not found"),
        "{}",
        stderr(&out)
    );
    let unknown = env.cli(&["sandbox", "new", "+huge"]);
    assert!(
        stderr(&unknown).contains("secure-small"),
        "known profiles are listed: {}",
        stderr(&unknown)
    );
}

#[test]
fn missing_qemu_names_the_package() {
    let mut env = Env::new("noqemu", "qemu_binary: /nonexistent/qemu-system-x86_64\n");
    env.start_daemon();
    let out = env.cli(&["sandbox", "new", "--wait"]);
    assert_eq!(code(&out), Some(2));
    assert!(
        stderr(&out).contains("apt-get install qemu-system-x86"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn missing_kernel_names_the_package() {
    let mut env = Env::new("nokernel", "kernel: /nonexistent/vmlinuz-9.9.9-nope\n");
    env.start_daemon();
    let out = env.cli(&["sandbox", "new", "--wait"]);
    assert_eq!(code(&out), Some(2));
    assert!(
        stderr(&out).contains("apt-get install linux-image-cloud-amd64"),
        "{}",
        stderr(&out)
    );
    assert!(
        !env.path("data/images/default").exists(),
        "half-built image left behind"
    );
}

/// A profile `p-<name>` that uses image `<name>`.
fn profile_for(env: &Env, image: &str) {
    env.write_profile(
        &format!("{image}.yaml"),
        &format!("name: p-{image}\nimage: {image}\n"),
    );
}

fn new_with_image(env: &Env, image: &str) -> std::process::Output {
    profile_for(env, image);
    env.cli(&["sandbox", "new", "--profile", &format!("p-{image}")])
}

#[test]
fn base_images_that_are_not_qcow2_or_raw_are_refused() {
    let mut env = Env::new("badimg", "");
    env.start_daemon();
    let images = env.path("images");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::write(
        images.join("garbage.qcow2"),
        b"\x7fELF not an image at all, honest",
    )
    .unwrap();
    let out = new_with_image(&env, "garbage");
    assert_eq!(code(&out), Some(1));
    assert!(
        stderr(&out).contains("not a qcow2 image"),
        "{}",
        stderr(&out)
    );

    // A "raw" image that is really qcow2 is the format-probing attack.
    let q = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(images.join("sneaky.raw"))
        .arg("16M")
        .status()
        .unwrap();
    assert!(q.success());
    let out = new_with_image(&env, "sneaky");
    assert_eq!(code(&out), Some(1));
    assert!(stderr(&out).contains("sneaky.raw"), "{}", stderr(&out));
    assert_eq!(
        env.ok(&["sandbox", "list", "--all"]).lines().count(),
        1,
        "records were made"
    );
}

#[test]
fn truncated_qcow2_base_is_refused() {
    let mut env = Env::new("trunc", "");
    env.start_daemon();
    let images = env.path("images");
    std::fs::create_dir_all(&images).unwrap();
    let img = images.join("cut.qcow2");
    assert!(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("1G")
        .status()
        .unwrap()
        .success());
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(100_000).unwrap();
    let out = new_with_image(&env, "cut");
    assert_eq!(code(&out), Some(1));
    assert!(stderr(&out).contains("truncated"), "{}", stderr(&out));
}

#[test]
fn backing_file_outside_the_images_dir_is_refused() {
    let mut env = Env::new("escape", "");
    env.start_daemon();
    let images = env.path("images");
    std::fs::create_dir_all(&images).unwrap();
    let outside = env.path("secret.raw");
    std::fs::write(&outside, vec![0u8; 1 << 20]).unwrap();
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&outside)
        .arg(images.join("escape.qcow2"))
        .status()
        .unwrap();
    assert!(ok.success());
    let out = new_with_image(&env, "escape");
    assert_eq!(code(&out), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("outside") && err.contains("secret.raw"),
        "{err}"
    );
}

#[test]
fn full_disk_while_writing_the_overlay_leaves_nothing_half_made_and_revert_recovers() {
    let mut env = Env::new("full", "");
    env.start_daemon();
    env.ok(&["image", "build-default"]);
    // The sandboxes dir on a tiny tmpfs, filled to the brim.
    let dir = env.path("data/sandboxes");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&dir)
        .status()
        .unwrap();
    assert!(mounted.success(), "mounting a tmpfs needs root");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=4k", "count=1000"])
        .arg(format!("of={}", dir.join("filler").display()))
        .stderr(std::process::Stdio::null())
        .status();
    let out = env.cli(&["sandbox", "new", "--wait"]);
    assert_eq!(code(&out), Some(2));
    assert!(
        stderr(&out).contains("No space left on device"),
        "{}",
        stderr(&out)
    );
    let entries: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        entries,
        vec!["filler".to_string()],
        "something half-made is left"
    );
    let v: serde_json::Value =
        serde_json::from_str(&env.ok(&["sandbox", "list", "--json"])).unwrap();
    let sb = &v.as_array().unwrap()[0];
    assert_eq!(sb["state"], "FAILED");
    assert!(sb["disk"].is_null());
    // With space back, revert makes the disk it never got, and it starts.
    let vmid = sb["vmid"].to_string();
    std::fs::remove_file(dir.join("filler")).unwrap();
    let grown = Command::new("mount")
        .args(["-o", "remount,size=8m"])
        .arg(&dir)
        .status()
        .unwrap();
    assert!(grown.success());
    let out = env.ok(&["sandbox", "revert", &vmid]);
    assert!(out.contains("left stopped"), "{out}");
    assert_eq!(env.state(vmid.parse().unwrap()), "STOPPED");
    env.ok(&["sandbox", "start", "--wait", &vmid]);
    env.ok(&["sandbox", "destroy", &vmid]);
    Command::new("umount").arg(&dir).status().unwrap();
}

#[test]
fn qemu_exiting_at_once_fails_with_its_stderr_in_logs() {
    let env0 = Env::new("fakeqemu", "");
    let fake = env0.path("fake-qemu");
    std::fs::write(
        &fake,
        "#!/bin/sh\nif [ \"$1\" = -version ]; then echo 'QEMU emulator version 7.2.0'; exit 0; fi\n\
         echo 'fake-qemu: cannot initialise the frobnicator' >&2\nexit 1\n",
    )
    .unwrap();
    Command::new("chmod").arg("+x").arg(&fake).status().unwrap();
    let config = std::fs::read_to_string(&env0.config).unwrap();
    std::fs::write(
        &env0.config,
        format!("{config}qemu_binary: {}\n", fake.display()),
    )
    .unwrap();
    let mut env = env0;
    env.start_daemon();
    let out = env.cli(&["sandbox", "new", "--wait"]);
    assert_eq!(code(&out), Some(2));
    assert!(stderr(&out).contains("FAILED"), "{}", stderr(&out));
    let logs = env.ok(&["logs", "1000"]);
    assert!(logs.contains("cannot initialise the frobnicator"), "{logs}");
    assert_eq!(env.state(1000), "FAILED");
}

#[test]
fn bad_ttl_and_names_are_refused() {
    let mut env = Env::new("badargs", "");
    env.start_daemon();
    let ttl = env.cli(&["sandbox", "new", "--ttl", "5x"]);
    assert_eq!(code(&ttl), Some(1));
    assert!(stderr(&ttl).contains("unknown unit"), "{}", stderr(&ttl));
    let name = env.cli(&["sandbox", "new", "--name", "bad name"]);
    assert_eq!(code(&name), Some(1));
    assert!(stderr(&name).contains("invalid sandbox name"));
    let stray = env.cli(&["sandbox", "new", "small"]);
    assert_eq!(code(&stray), Some(1));
    assert!(stderr(&stray).contains("modifiers start with '+'"));
    assert_eq!(env.ok(&["sandbox", "list", "--all"]).lines().count(), 1);
}
