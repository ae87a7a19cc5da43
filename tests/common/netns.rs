//! Network namespaces for tests: each is deleted when its guard drops (also
//! when the test panics), together with every process still running in it,
//! so a failing test leaves no namespace, veth or server behind.

use std::process::{Command, Output, Stdio};

/// A namespace named `al<tag>-<pid>`; short, because interface names in it are too.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("al{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.sh("ip link set lo up");
        ns
    }

    /// Runs `sh -c script` in the namespace; panics with its output on failure.
    pub fn sh(&self, script: &str) -> String {
        let out = self.try_sh(script);
        assert!(
            out.status.success(),
            "in {}: {script}: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn try_sh(&self, script: &str) -> Output {
        self.command("sh", &["-c", script]).output().unwrap()
    }

    /// `program args…` inside the namespace, not yet started.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]).args(args);
        c.stdin(Stdio::null());
        c
    }

    /// A veth pair `here` (in self) ↔ `there` (in `other`), both up.
    pub fn veth(&self, here: &str, other: &Netns, there: &str) {
        self.sh(&format!(
            "ip link add {here} type veth peer name {there} netns {} && ip link set {here} up",
            other.name
        ));
        other.sh(&format!("ip link set {there} up"));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes left in the namespace (servers, daemons, udhcpc) go first.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    /// A dnsmasq resolver in the namespace, in the foreground, answering on
    /// `listen` only, reading no host files; `extra` adds records or an
    /// upstream (`--server=…`). The caller kills it (or the guard does).
    pub fn dnsmasq(&self, listen: &str, extra: &[&str]) -> std::process::Child {
        let listen = format!("--listen-address={listen}");
        let mut args = vec![
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            &listen,
            "--user=root",
            "--pid-file=",
        ];
        args.extend_from_slice(extra);
        self.command("dnsmasq", &args).spawn().unwrap()
    }
}
