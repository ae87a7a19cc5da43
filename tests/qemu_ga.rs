//! The host's fallbacks for a guest running Debian's stock qemu-ga rather
//! than agentlab's agent, against the real thing: the `default-qemu-ga`
//! image (`agentlab image build-default --qemu-ga`) booted under TCG. exec
//! goes through `guest-exec`/`guest-exec-status` polling, `cp` through `tar`
//! in the guest and `guest-file-read`/`-write`, and what qemu-ga cannot do
//! (a terminal) is refused with a message that says so.
//!
//! Needs what the default guest needs, plus qemu-guest-agent (the qemu-ga
//! copied into the guest) and tmux (a terminal for `exec -it`).

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{stderr, stdout, Env, BIN, SHORT};

/// Builds the variant, and boots a sandbox on it through a profile.
fn qemu_ga_sandbox(tag: &str) -> (Env, String) {
    let mut env = Env::new(tag, "");
    env.start_daemon();
    let built = env.ok(&["image", "build-default", "--qemu-ga"]);
    assert!(
        built.contains("default-qemu-ga guest image ready"),
        "{built}"
    );
    env.write_profile("qga.yaml", "name: qga\nimage: default-qemu-ga\n");
    let started = Instant::now();
    let vmid = env.new_ready(&["--profile", "qga"]);
    eprintln!(
        "{tag}: default-qemu-ga READY in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    (env, vmid.to_string())
}

/// `agentlab exec` with `input` on its stdin (a pipe, so it is forwarded).
fn exec_with_stdin(env: &Env, args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(BIN)
        .arg("exec")
        .args(args)
        .env("AGENTLAB_CONFIG", &env.config)
        .env("AGENTLAB_NO_AUTOSTART", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

/// What qemu-ga's `guest-info` says its version is: `QEMU Guest Agent 7.2.22`
/// from `qemu-ga --version` names the same release.
fn host_qemu_ga_version() -> String {
    let out = Command::new("/usr/sbin/qemu-ga")
        .arg("--version")
        .output()
        .expect("qemu-ga (apt-get install qemu-guest-agent)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_whitespace().last().unwrap_or("").to_string()
}

#[test]
fn qemu_ga_guest_is_ready_and_reports_qemu_ga_as_its_agent() {
    let (env, id) = qemu_ga_sandbox("qga-ready");
    let version = host_qemu_ga_version();

    let show: serde_json::Value =
        serde_json::from_str(&env.ok(&["sandbox", "show", "--json", &id])).unwrap();

    assert_eq!(show["state"], "READY");
    assert_eq!(show["disk"]["image"], "default-qemu-ga");
    assert!(!version.is_empty());
    let agent = show["guest"]["agent"].as_str().unwrap_or("");
    assert!(agent.starts_with(&version), "guest.agent {agent:?}");
    assert_eq!(show["guest"]["hostname"], show["name"]);
}

#[test]
fn exec_through_guest_exec_keeps_exit_codes_streams_stdin_timeout_and_cwd() {
    let (env, id) = qemu_ga_sandbox("qga-exec");

    let ok = env.cli(&["exec", &id, "--", "true"]);
    let failed = env.cli(&["exec", &id, "--", "false"]);
    let missing = env.cli(&["exec", &id, "--", "nosuchcmd"]);
    let not_a_program = env.cli(&["exec", &id, "--", "/etc/passwd"]);
    let streams = env.cli(&["exec", &id, "--", "sh", "-c", "echo out; echo err >&2"]);
    let piped = exec_with_stdin(&env, &[&id, "--", "cat"], b"hi\n");
    let started = Instant::now();
    let slow = env.cli(&["exec", "--timeout", "2s", &id, "--", "sleep", "100"]);
    let slow_took = started.elapsed();
    let chatty_slow = env.cli(&[
        "exec",
        "--timeout",
        "2s",
        &id,
        "--",
        "sh",
        "-c",
        "echo started; exec sleep 100",
    ]);
    let cwd = env.cli(&["exec", "--cwd", "/tmp", &id, "--", "pwd"]);
    let with_env = env.cli(&[
        "exec",
        "-e",
        "CI=1",
        &id,
        "--",
        "sh",
        "-c",
        "echo $CI $PATH",
    ]);

    assert_eq!(ok.status.code(), Some(0), "{}", stderr(&ok));
    assert_eq!(failed.status.code(), Some(1), "{}", stderr(&failed));
    assert_eq!(missing.status.code(), Some(127), "{}", stderr(&missing));
    assert_eq!(stderr(&missing), "agentlab: nosuchcmd: command not found\n");
    assert_eq!(not_a_program.status.code(), Some(126));
    assert_eq!(
        stderr(&not_a_program),
        "agentlab: /etc/passwd: permission denied\n"
    );
    assert_eq!(stdout(&streams), "out\n");
    assert_eq!(stderr(&streams), "err\n");
    assert_eq!(piped.status.code(), Some(0), "{}", stderr(&piped));
    assert_eq!(stdout(&piped), "hi\n");
    assert_eq!(slow.status.code(), Some(124), "{}", stderr(&slow));
    assert!(slow_took < SHORT, "the timeout took {slow_took:?}");
    // What a killed command printed before its timeout is not lost.
    assert_eq!(chatty_slow.status.code(), Some(124));
    assert_eq!(stdout(&chatty_slow), "started\n");
    assert_eq!(stdout(&cwd), "/tmp\n");
    // -e adds to the environment; qemu-ga's own env would replace it (no PATH).
    assert!(
        stdout(&with_env).starts_with("1 /"),
        "{}",
        stdout(&with_env)
    );
}

/// Path → what it is: file bytes, a symlink's target, or a directory.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let what = if meta.is_symlink() {
                format!("-> {}", std::fs::read_link(&path).unwrap().display())
            } else if meta.is_dir() {
                todo.push(path.clone());
                "dir".to_string()
            } else {
                format!("{:?}", std::fs::read(&path).unwrap())
            };
            out.insert(rel, what);
        }
    }
    out
}

#[test]
fn cp_moves_a_tree_both_ways_through_tar_in_the_guest() {
    let (env, id) = qemu_ga_sandbox("qga-cp");
    let tree = env.path("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("a.txt"), "hello from the host\n").unwrap();
    let bin: Vec<u8> = (0..100_000u32).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(tree.join("sub/b.bin"), &bin).unwrap();
    std::os::unix::fs::symlink("a.txt", tree.join("link")).unwrap();
    let host_sum = Command::new("sha256sum")
        .arg(tree.join("sub/b.bin"))
        .output()
        .unwrap();
    let back = env.path("back");

    env.ok(&["cp", tree.to_str().unwrap(), &format!("{id}:/work/tree")]);
    let guest_sum = env.ok(&["exec", &id, "--", "sha256sum", "/work/tree/sub/b.bin"]);
    let guest_link = env.ok(&["exec", &id, "--", "readlink", "/work/tree/link"]);
    env.ok(&["cp", &format!("{id}:/work/tree"), back.to_str().unwrap()]);

    let digest = |s: &str| s.split_whitespace().next().unwrap_or("").to_string();
    assert_eq!(digest(&guest_sum), digest(&stdout(&host_sum)));
    assert_eq!(guest_link, "a.txt\n");
    assert_eq!(snapshot(&back), snapshot(&tree));
    assert_eq!(snapshot(&tree).len(), 4);
}

/// A tmux server on a socket of its own, killed on drop.
struct Tmux(PathBuf);

impl Tmux {
    /// Runs `shell_cmd` in a detached 100×30 terminal.
    fn run(sock: PathBuf, shell_cmd: &str) -> Tmux {
        let started = Command::new("tmux")
            .arg("-S")
            .arg(&sock)
            .args(["new-session", "-d", "-x", "100", "-y", "30", shell_cmd])
            .env("TERM", "xterm")
            .status()
            .expect("tmux (apt-get install tmux)");
        assert!(started.success());
        Tmux(sock)
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.0)
            .arg("kill-server")
            .stderr(Stdio::null())
            .status();
    }
}

/// The contents of `path` once it is written, or "" after `timeout`.
fn wait_for_file(path: &Path, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(text) = std::fs::read_to_string(path) {
            if text.ends_with('\n') {
                return text;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    String::new()
}

#[test]
fn exec_with_a_terminal_is_refused_with_a_clear_message() {
    let (env, id) = qemu_ga_sandbox("qga-tty");
    let (rc, err) = (env.path("it.rc"), env.path("it.err"));
    // stdin and stdout on tmux's terminal (so -t asks for one), stderr to a file.
    let cmd = format!(
        "AGENTLAB_CONFIG={} AGENTLAB_NO_AUTOSTART=1 {BIN} exec -it {id} -- /bin/sh 2>{}; echo $? >{}; sleep 60",
        env.config.display(),
        err.display(),
        rc.display()
    );

    let _tmux = Tmux::run(env.path("tmux.sock"), &cmd);
    let code = wait_for_file(&rc, SHORT);

    assert_eq!(code, "1\n", "exec -it did not end by itself");
    let message = std::fs::read_to_string(&err).unwrap();
    assert!(
        message.contains("stock qemu-ga") && message.contains("cannot give a command a terminal"),
        "{message}"
    );
}
