//! A throwaway agentlab installation per test: its own config, data, run and
//! images directories under a temp dir, its own daemon, TCG guests. `Drop`
//! kills the daemon and every QEMU whose argv names the temp dir, then
//! removes it, so a failing test leaves nothing running.

#![allow(dead_code)]

pub mod fake_pve;
pub mod netns;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use agentlab::api::client::Client;
use serde_json::{json, Value};

pub const BIN: &str = env!("CARGO_BIN_EXE_agentlab");

pub struct Env {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    daemon: Option<Child>,
    /// The daemon's network namespace: its bridge, TAPs, nft table, DHCP
    /// and DNS live there and vanish with it, never touching the host's.
    pub netns: netns::Netns,
}

impl Env {
    /// A fresh installation; `extra` is appended to its config.yaml.
    pub fn new(tag: &str, extra: &str) -> Env {
        let dir = std::env::temp_dir().join(format!("al-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("profiles")).unwrap();
        let config = dir.join("config.yaml");
        let mut text = format!(
            "data_dir: {d}/data\nrun_dir: {d}/run\nimages_dir: {d}/images\nprofiles_dir: {d}/profiles\naccel: tcg\n{extra}",
            d = dir.display()
        );
        // Defaults a test may override (the config refuses a key twice).
        if !extra.contains("stop_timeout:") {
            text.push_str("stop_timeout: 20s\n");
        }
        std::fs::write(&config, text).unwrap();
        let socket = dir.join("run/agentlabd.sock");
        Env {
            dir,
            config,
            socket,
            daemon: None,
            netns: netns::Netns::new(&format!("e{}", &tag[..tag.len().min(8)])),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    pub fn write_profile(&self, file: &str, text: &str) {
        std::fs::write(self.dir.join("profiles").join(file), text).unwrap();
    }

    /// Starts `agentlab daemon` and waits for its socket.
    pub fn start_daemon(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .unwrap();
        // nsenter moves only the network namespace (`ip netns exec` would
        // also give the daemon a mount namespace of its own). A Proxmox
        // daemon builds no network and must reach the fake PVE on loopback.
        let netns = format!("--net=/run/netns/{}", self.netns.name);
        let own_net = !std::fs::read_to_string(&self.config)
            .unwrap_or_default()
            .contains("backend: proxmox");
        let mut cmd = Command::new("nsenter");
        if own_net {
            cmd.arg(netns);
        }
        let child = cmd
            .args(["--", BIN, "daemon"])
            .env("AGENTLAB_CONFIG", &self.config)
            .env("AGENTLAB_ACCEL", "tcg")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(st) = self.daemon.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited ({st}): {}", self.daemon_log());
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not listen: {}",
                self.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    /// `kill -9` the daemon (sandboxes keep running).
    pub fn kill_daemon(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Runs the CLI against this installation (never auto-starting a daemon).
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("AGENTLAB_CONFIG", &self.config)
            .env("AGENTLAB_NO_AUTOSTART", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Runs the CLI and insists on success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "agentlab {args:?} failed ({}):\nstdout: {}\nstderr: {}\ndaemon log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.daemon_log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn api(&self) -> Client {
        Client::new(&self.socket, Some(Duration::from_secs(300)))
    }

    pub fn sandbox(&self, vmid: u32) -> Value {
        self.api().get(&format!("/v1/sandboxes/{vmid}")).unwrap()
    }

    pub fn state(&self, vmid: u32) -> String {
        self.sandbox(vmid)["state"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// Creates a sandbox and waits for READY; returns its VMID.
    pub fn new_ready(&self, extra: &[&str]) -> u32 {
        let mut args = vec!["sandbox", "new", "--wait"];
        args.extend_from_slice(extra);
        self.ok(&args)
            .trim()
            .parse()
            .expect("sandbox new prints a vmid")
    }

    pub fn wait_state(&self, vmid: u32, want: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.state(vmid) == want {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }

    /// Types `cmd` into the guest's shell and waits for a console line
    /// containing `needle` logged after the command was sent.
    pub fn console(&self, vmid: u32, cmd: &str, needle: &str, timeout: Duration) -> bool {
        let since = self.console_lines(vmid).len();
        self.api()
            .post(
                &format!("/v1/sandboxes/{vmid}/console"),
                &json!({ "data": format!("{cmd}\n") }),
            )
            .unwrap();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self
                .console_lines(vmid)
                .iter()
                .skip(since)
                .any(|l| l.contains(needle))
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    pub fn console_lines(&self, vmid: u32) -> Vec<String> {
        let r = self
            .api()
            .get(&format!("/v1/sandboxes/{vmid}/logs?tail=10000"))
            .unwrap();
        r["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == "console")
            .map(|e| e["line"].as_str().unwrap_or("").to_string())
            .collect()
    }

    pub fn qemu_pid(&self, vmid: u32) -> Option<u32> {
        self.sandbox(vmid)["runtime"]["pid"]
            .as_u64()
            .map(|p| p as u32)
    }

    /// QEMU processes started for this installation.
    pub fn qemu_processes(&self) -> Vec<u32> {
        processes_mentioning(&self.dir, "qemu-system")
    }
}

/// Pids whose argv[0] contains `exe` and whose argv or environment mentions
/// `dir` (a daemon the CLI started finds its config through AGENTLAB_CONFIG,
/// so only its environment names the test's directory).
pub fn processes_mentioning(dir: &Path, exe: &str) -> Vec<u32> {
    let needle = dir.display().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|&b| b == 0)
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        if !args.first().is_some_and(|a| a.contains(exe)) {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let in_env = String::from_utf8_lossy(&env).contains(&needle);
        if in_env || args.iter().any(|a| a.contains(&needle)) {
            out.push(pid);
        }
    }
    out
}

impl Drop for Env {
    fn drop(&mut self) {
        self.kill_daemon();
        for pid in processes_mentioning(&self.dir, "agentlab") {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        for pid in self.qemu_processes() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        // Give QEMU a moment to release its files before removing them.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.qemu_processes().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.join("data/sandboxes"))
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub const BOOT: Duration = Duration::from_secs(120);
pub const SHORT: Duration = Duration::from_secs(30);

/// True once the process has exited (a zombie awaiting its reaper counts:
/// a QEMU adopted after a daemon restart is reaped by init, not by us).
pub fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

/// A QEMU with no machine, only a QMP monitor on `qmp_sock`; returns once the
/// socket exists. The caller kills it.
pub fn spawn_bare_qemu(qmp_sock: &Path) -> Child {
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", qmp_sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("qemu-system-x86_64 must be installed (apt-get install qemu-system-x86)");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !qmp_sock.exists() {
        assert!(
            Instant::now() < deadline,
            "QEMU never created {}",
            qmp_sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}
