//! exec, cp and console against the default guest and its agent (TCG).

mod common;

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{stderr, stdout, Env, BIN, SHORT};

fn exec(env: &Env, vmid: u32, args: &[&str]) -> std::process::Output {
    let mut all = vec!["exec", "--timeout", "60s"];
    let id = vmid.to_string();
    all.push(&id);
    all.push("--");
    all.extend_from_slice(args);
    env.cli(&all)
}

/// `agentlab <args>` against `env`, its stdio piped.
fn cli_command(env: &Env, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("AGENTLAB_CONFIG", &env.config)
        .env("AGENTLAB_NO_AUTOSTART", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// The CLI with stdin fed from `input`.
fn exec_with_input(env: &Env, vmid: u32, args: &[&str], input: &[u8]) -> std::process::Output {
    let id = vmid.to_string();
    let mut all = vec!["exec", id.as_str(), "--"];
    all.extend_from_slice(args);
    let mut child = cli_command(env, &all).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = input.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    out
}

#[test]
fn exec_reports_exit_codes_keeps_streams_apart_and_forwards_stdin() {
    let mut env = Env::new("exec", "");
    env.start_daemon();
    let vmid = env.new_ready(&[]);
    // READY came from the agent, and the guest introduced itself.
    let logs = env.ok(&["logs", &vmid.to_string(), "--tail", "500"]);
    let agent_at = logs.find("guest agent answers").expect("no agent event");
    let ready_at = logs.find("[BOOTING -> READY]").unwrap();
    assert!(agent_at < ready_at, "{logs}");
    let sb = env.sandbox(vmid);
    assert_eq!(sb["guest"]["os"], "agentlab default guest (busybox)");
    assert!(
        sb["guest"]["kernel"]
            .as_str()
            .unwrap()
            .contains("cloud-amd64"),
        "{sb}"
    );

    assert_eq!(exec(&env, vmid, &["true"]).status.code(), Some(0));
    assert_eq!(exec(&env, vmid, &["false"]).status.code(), Some(1));
    let missing = exec(&env, vmid, &["no-such-command"]);
    assert_eq!(missing.status.code(), Some(127));
    assert!(
        stderr(&missing).contains("command not found"),
        "{}",
        stderr(&missing)
    );

    let split = exec(
        &env,
        vmid,
        &[
            "sh",
            "-c",
            "echo o1; echo e1 >&2; echo o2; echo e2 >&2; exit 5",
        ],
    );
    assert_eq!(split.status.code(), Some(5));
    assert_eq!(stdout(&split), "o1\no2\n");
    assert_eq!(stderr(&split), "e1\ne2\n");

    let piped = exec_with_input(&env, vmid, &["cat"], b"hello through stdin\n");
    assert_eq!(stdout(&piped), "hello through stdin\n");

    let opts = env.cli(&[
        "exec",
        "-e",
        "GREETING=hi",
        "--cwd",
        "/tmp",
        "--user",
        "nobody",
        &vmid.to_string(),
        "--",
        "sh",
        "-c",
        "echo $GREETING $(pwd) $(id -u)",
    ]);
    assert_eq!(stdout(&opts).trim(), "hi /tmp 65534", "{}", stderr(&opts));

    let json = stdout(&env.cli(&[
        "exec",
        "--json",
        &vmid.to_string(),
        "--",
        "sh",
        "-c",
        "echo x; exit 3",
    ]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        (v["exit_code"].as_i64(), v["stdout"].as_str()),
        (Some(3), Some("x\n"))
    );
    // Exec leaves the sandbox READY again.
    assert_eq!(env.state(vmid), "READY");
}

#[test]
fn fifty_megabytes_stream_through_while_daemon_memory_stays_flat() {
    let mut env = Env::new("bigout", "");
    env.start_daemon();
    let vmid = env.new_ready(&[]);
    let daemon = env.daemon_pid().unwrap();
    let rss = |pid: u32| -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        s.lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    let before = rss(daemon);
    let sampler = std::thread::spawn(move || {
        let mut peak = 0;
        let end = Instant::now() + Duration::from_secs(120);
        while Instant::now() < end && !common::gone(daemon) {
            peak = peak.max(rss(daemon));
            std::thread::sleep(Duration::from_millis(100));
            if std::fs::metadata("/proc/self").is_err() {
                break;
            }
        }
        peak
    });
    let line = "0123456789abcdefghijklmnopqrstu"; // 31 chars + newline = 32 bytes
    let out = exec(
        &env,
        vmid,
        &["sh", "-c", &format!("yes {line} | head -c 52428800")],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(out.stdout.len(), 52_428_800);
    let expected: Vec<u8> = format!("{line}\n").into_bytes().repeat(52_428_800 / 32);
    assert!(
        out.stdout == expected,
        "the output was corrupted or reordered"
    );
    drop(env);
    let peak = sampler.join().unwrap();
    assert!(
        peak.saturating_sub(before) < 64 * 1024,
        "daemon RSS grew from {before} kB to {peak} kB"
    );
}

#[test]
fn timeout_kills_the_command_and_exits_124() {
    let mut env = Env::new("timeout", "");
    env.start_daemon();
    let vmid = env.new_ready(&[]);
    let t = Instant::now();
    let out = env.cli(&[
        "exec",
        "--timeout",
        "2s",
        &vmid.to_string(),
        "--",
        "sleep",
        "100",
    ]);
    assert_eq!(out.status.code(), Some(124), "{}", stderr(&out));
    assert!(t.elapsed() < Duration::from_secs(30));
    // Nothing of it is left in the guest.
    let ps = exec(&env, vmid, &["sh", "-c", "ps | grep -c '[s]leep 100'"]);
    assert_eq!(stdout(&ps).trim(), "0");
}

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux")
        .args(args)
        .output()
        .expect("tmux must be installed (apt-get install tmux)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls a tmux pane until it shows `needle`.
fn pane_shows(session: &str, needle: &str, timeout: Duration) -> Option<String> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        let pane = tmux(&["capture-pane", "-p", "-t", session]);
        if pane.contains(needle) {
            return Some(pane);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

struct TmuxSession(String);

impl Drop for TmuxSession {
    fn drop(&mut self) {
        tmux(&["kill-session", "-t", &self.0]);
    }
}

#[test]
fn interactive_exec_gets_a_pty_of_the_terminal_size() {
    let mut env = Env::new("pty", "");
    env.start_daemon();
    let vmid = env.new_ready(&[]);
    let name = format!("al-pty-{}", std::process::id());
    let cmd = format!(
        "AGENTLAB_CONFIG={} {BIN} exec -it {vmid} -- /bin/sh; echo SHELL-EXIT-$?; sleep 30",
        env.config.display()
    );
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &name,
        "-x",
        "132",
        "-y",
        "43",
        &cmd,
    ]);
    let _s = TmuxSession(name.clone());
    assert!(
        pane_shows(&name, "~ #", SHORT).is_some(),
        "no shell prompt; the pane shows:\n{}",
        tmux(&["capture-pane", "-p", "-t", &name])
    );
    tmux(&[
        "send-keys",
        "-t",
        &name,
        "tty; stty size; echo T=$TERM",
        "Enter",
    ]);
    let pane = pane_shows(&name, "T=xterm", SHORT).expect("no answer from the shell");
    assert!(pane.contains("/dev/pts/"), "{pane}");
    assert!(pane.contains("43 132"), "{pane}");
    tmux(&["send-keys", "-t", &name, "exit 7", "Enter"]);
    assert!(pane_shows(&name, "SHELL-EXIT-7", SHORT).is_some());
}

#[test]
fn console_attach_types_into_the_guest_and_detaches_on_ctrl_bracket() {
    let mut env = Env::new("console", "");
    env.start_daemon();
    let vmid = env.new_ready(&[]);
    let name = format!("al-con-{}", std::process::id());
    let cmd = format!(
        "AGENTLAB_CONFIG={} {BIN} console {vmid}; echo CONSOLE-EXIT-$?; sleep 30",
        env.config.display()
    );
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &name,
        "-x",
        "100",
        "-y",
        "30",
        &cmd,
    ]);
    let _s = TmuxSession(name.clone());
    assert!(pane_shows(&name, "press Ctrl-] to detach", SHORT).is_some());
    tmux(&["send-keys", "-t", &name, "echo typed-$((6*7))", "Enter"]);
    assert!(
        pane_shows(&name, "typed-42", SHORT).is_some(),
        "the console did not run it"
    );
    tmux(&["send-keys", "-t", &name, "C-]"]);
    let pane = pane_shows(&name, "CONSOLE-EXIT-0", SHORT).expect("did not detach");
    assert!(pane.contains("detached"), "{pane}");
    // Detaching leaves the sandbox running.
    assert_eq!(env.state(vmid), "READY");
}

/// Makes a tree with the awkward cases: symlink, empty dir, a big file,
/// spaces and non-ASCII names, set modes and mtimes.
fn awkward_tree(root: &Path, big: usize) {
    std::fs::create_dir_all(root.join("empty")).unwrap();
    std::fs::create_dir_all(root.join("with space/deeper")).unwrap();
    std::fs::write(root.join("with space/é ñ 日本.txt"), "unicode\n").unwrap();
    std::fs::write(
        root.join("with space/deeper/run.sh"),
        "#!/bin/sh\necho hi\n",
    )
    .unwrap();
    std::fs::set_permissions(
        root.join("with space/deeper/run.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("with space/é ñ 日本.txt", root.join("link")).unwrap();
    let mut data = Vec::with_capacity(big);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while data.len() < big {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(big);
    std::fs::write(root.join("big.bin"), &data).unwrap();
    std::fs::set_permissions(root.join("big.bin"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_577_934_245);
    std::fs::File::options()
        .write(true)
        .open(root.join("big.bin"))
        .unwrap()
        .set_modified(old)
        .unwrap();
}

/// Same entries, types, file bytes, permission bits, file mtimes and link targets.
fn assert_same_tree(a: &Path, b: &Path) {
    let mut names_a: Vec<_> = std::fs::read_dir(a)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let mut names_b: Vec<_> = std::fs::read_dir(b)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names_a.sort();
    names_b.sort();
    assert_eq!(
        names_a,
        names_b,
        "entries of {} and {}",
        a.display(),
        b.display()
    );
    for n in names_a {
        let (pa, pb) = (a.join(&n), b.join(&n));
        let (ma, mb) = (
            std::fs::symlink_metadata(&pa).unwrap(),
            std::fs::symlink_metadata(&pb).unwrap(),
        );
        assert_eq!(ma.file_type(), mb.file_type(), "{}", pa.display());
        if ma.file_type().is_symlink() {
            assert_eq!(
                std::fs::read_link(&pa).unwrap(),
                std::fs::read_link(&pb).unwrap()
            );
        } else if ma.is_dir() {
            assert_same_tree(&pa, &pb);
        } else {
            assert_eq!(
                ma.mode() & 0o777,
                mb.mode() & 0o777,
                "mode of {}",
                pa.display()
            );
            assert_eq!(ma.mtime(), mb.mtime(), "mtime of {}", pa.display());
            assert!(
                std::fs::read(&pa).unwrap() == std::fs::read(&pb).unwrap(),
                "bytes of {}",
                pa.display()
            );
        }
    }
}

#[test]
fn cp_moves_a_tree_both_ways_byte_for_byte() {
    let mut env = Env::new("cp", "");
    env.start_daemon();
    let vmid = env.new_ready(&["--name", "cpbox"]);
    let src = env.path("src/tree");
    awkward_tree(&src, 100 << 20);
    env.ok(&["cp", src.to_str().unwrap(), "cpbox:/work/tree"]);
    let sums = exec(
        &env,
        vmid,
        &[
            "sh",
            "-c",
            "cd /work/tree && sha256sum big.bin && cat link && stat -c %a big.bin",
        ],
    );
    let host_sum = Command::new("sha256sum")
        .arg(src.join("big.bin"))
        .output()
        .unwrap();
    let host_sum = stdout(&host_sum);
    assert!(
        stdout(&sums).starts_with(host_sum.split_whitespace().next().unwrap()),
        "{}",
        stdout(&sums)
    );
    assert!(stdout(&sums).contains("unicode\n600"), "{}", stdout(&sums));

    let back = env.path("back");
    std::fs::create_dir_all(&back).unwrap();
    env.ok(&["cp", &format!("{vmid}:/work/tree"), back.to_str().unwrap()]);
    assert_same_tree(&src, &back.join("tree"));
    // docker cp: a destination that does not exist becomes the copy.
    env.ok(&[
        "cp",
        &format!("{vmid}:/work/tree/with space"),
        back.join("renamed").to_str().unwrap(),
    ]);
    assert_same_tree(&src.join("with space"), &back.join("renamed"));
    // A guest path that does not exist is a clear user error.
    let missing = env.cli(&["cp", &format!("{vmid}:/nope"), back.to_str().unwrap()]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(stderr(&missing).contains("/nope"), "{}", stderr(&missing));
}

#[test]
fn a_killed_agent_fails_clearly_and_the_sandbox_recovers() {
    let mut env = Env::new("agentkill", "");
    env.start_daemon();
    let vmid = env.new_ready(&[]);
    // The agent kills itself mid-command: that command fails clearly.
    let out = exec(
        &env,
        vmid,
        &["sh", "-c", "killall -9 agentlab; sleep 5; echo never"],
    );
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("agent"), "{}", stderr(&out));
    // init restarts it; a new command works.
    let end = Instant::now() + SHORT;
    let mut last = String::new();
    while Instant::now() < end {
        let out = exec(&env, vmid, &["echo", "back"]);
        if out.status.success() && stdout(&out) == "back\n" {
            return;
        }
        last = stderr(&out);
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("exec never worked again: {last}");
}

#[test]
fn two_sandboxes_run_commands_at_once() {
    let mut env = Env::new("twoexec", "");
    env.start_daemon();
    env.ok(&["image", "build-default"]);
    let a: u32 = env.ok(&["sandbox", "new"]).trim().parse().unwrap();
    let b: u32 = env.ok(&["sandbox", "new"]).trim().parse().unwrap();
    assert!(env.wait_state(a, "READY", common::BOOT) && env.wait_state(b, "READY", common::BOOT));
    let script = "for i in 1 2 3 4 5; do echo $i; sleep 0.4; done";
    let t = Instant::now();
    let (ra, rb) = std::thread::scope(|s| {
        let ha = s.spawn(|| exec(&env, a, &["sh", "-c", script]));
        let hb = s.spawn(|| exec(&env, b, &["sh", "-c", script]));
        (ha.join().unwrap(), hb.join().unwrap())
    });
    assert_eq!(stdout(&ra), "1\n2\n3\n4\n5\n");
    assert_eq!(stdout(&rb), "1\n2\n3\n4\n5\n");
    // They overlapped: together well under twice one run (2 s each).
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
}

#[test]
fn exec_over_plain_http_streams_ndjson_and_truncates_buffered_output() {
    let mut env = Env::new("httpexec", "");
    env.start_daemon();
    let vmid = env.new_ready(&[]);
    let url = format!("http://agentlab/v1/sandboxes/{vmid}/exec");
    let curl = |body: &str| {
        let out = Command::new("curl")
            .args(["-s", "--unix-socket"])
            .arg(&env.socket)
            .arg(&url)
            .args(["-d", body])
            .output()
            .unwrap();
        stdout(&out)
    };
    let nd = curl(r#"{"argv":["sh","-c","echo out; echo err >&2; exit 2"]}"#);
    let lines: Vec<serde_json::Value> = nd
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["type"] == "stdout" && l["data"] == "b3V0Cg=="),
        "{nd}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["type"] == "stderr" && l["data"] == "ZXJyCg=="),
        "{nd}"
    );
    assert_eq!(lines.last().unwrap()["exit_code"], 2);
    let doc = curl(
        r#"{"argv":["sh","-c","head -c 5000 /dev/zero | tr '\\0' a"],"stream":false,"max_output":100}"#,
    );
    let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
    assert_eq!(v["truncated"], true, "{doc}");
    let out = v["stdout"].as_str().unwrap();
    assert!(
        out.starts_with(&"a".repeat(100))
            && out.contains("[agentlab: output truncated after 100 bytes]"),
        "{out}"
    );
}

#[test]
fn a_sandbox_adopted_while_booting_becomes_ready_through_its_agent() {
    let mut env = Env::new("bootadopt", "");
    env.start_daemon();
    env.ok(&["image", "build-default"]);
    let vmid: u32 = env.ok(&["sandbox", "new"]).trim().parse().unwrap();
    // Kill the daemon while the guest boots: its ready line goes unread.
    let end = Instant::now() + SHORT;
    while env.qemu_pid(vmid).is_none() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    env.kill_daemon();
    std::thread::sleep(Duration::from_secs(6));
    env.start_daemon();
    assert!(
        env.wait_state(vmid, "READY", SHORT),
        "state {}",
        env.state(vmid)
    );
    assert_eq!(stdout(&exec(&env, vmid, &["echo", "ok"])), "ok\n");
}

/// Whether a process whose command line contains `needle` runs in the guest.
fn guest_runs(env: &Env, vmid: u32, needle: &str) -> bool {
    // `[x]yz` keeps the grep from finding itself.
    let pattern = format!("[{}]{}", &needle[..1], &needle[1..]);
    let out = exec(
        env,
        vmid,
        &["sh", "-c", &format!("ps -o args | grep -q '{pattern}'")],
    );
    out.status.code() == Some(0)
}

fn until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    false
}

/// A command whose client went away must not run on in the guest, nor keep
/// the sandbox busy: the CLI killed, a plain-HTTP client that hung up while
/// the command printed nothing, the daemon itself killed. And stdin sent to
/// a command that has already ended must not hold the daemon's session.
#[test]
fn commands_do_not_outlive_their_client() {
    let mut env = Env::new("abandon", "");
    env.start_daemon();
    let vmid = env.new_ready(&[]);

    // `cat big | exec -- sleep 1` held the daemon's stdin pump (and
    // RUNNING) for an hour: the command never read its stdin, so the guest
    // stopped granting credit, and the ended stream never would again.
    let out = exec_with_input(&env, vmid, &["sleep", "1"], &vec![b'x'; 8 << 20]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(env.wait_state(vmid, "READY", SHORT), "{}", env.state(vmid));

    // The CLI killed outright (no chance to say goodbye).
    let id = vmid.to_string();
    let mut cli = cli_command(&env, &["exec", &id, "--", "sleep", "4321"])
        .spawn()
        .unwrap();
    assert!(until(SHORT, || guest_runs(&env, vmid, "sleep 4321")));
    cli.kill().unwrap();
    cli.wait().unwrap();
    assert!(
        until(SHORT, || !guest_runs(&env, vmid, "sleep 4321")),
        "the command outlived the killed CLI"
    );
    assert!(env.wait_state(vmid, "READY", SHORT), "{}", env.state(vmid));

    // A plain-HTTP client that gives up on a silent command.
    let url = format!("http://agentlab/v1/sandboxes/{vmid}/exec");
    for body in [
        r#"{"argv":["sleep","4322"]}"#,
        r#"{"argv":["sleep","4323"],"stream":false}"#,
    ] {
        let needle = if body.contains("4322") {
            "sleep 4322"
        } else {
            "sleep 4323"
        };
        let mut curl = Command::new("curl")
            .args(["-s", "--unix-socket"])
            .arg(&env.socket)
            .arg(&url)
            .args(["-d", body])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        assert!(until(SHORT, || guest_runs(&env, vmid, needle)));
        curl.kill().unwrap();
        curl.wait().unwrap();
        assert!(
            until(SHORT, || !guest_runs(&env, vmid, needle)),
            "{body}: the command outlived its HTTP client"
        );
    }
    assert!(env.wait_state(vmid, "READY", SHORT), "{}", env.state(vmid));

    // The daemon killed mid-command: the guest's agent sees its host go
    // and cancels what that host had running; the next daemon adopts a
    // sandbox that is not stuck.
    let argv = ["exec", "-i", &id, "--", "sh", "-c", "sleep 4324; cat"];
    let mut cli = cli_command(&env, &argv).spawn().unwrap();
    assert!(until(SHORT, || guest_runs(&env, vmid, "sleep 4324")));
    env.kill_daemon();
    let _ = cli.wait();
    env.start_daemon();
    assert!(env.wait_state(vmid, "READY", SHORT), "{}", env.state(vmid));
    assert!(
        until(SHORT, || !guest_runs(&env, vmid, "sleep 4324")),
        "the command outlived the daemon that started it"
    );
}
