//! The default guest, built from this host's packages and booted under TCG
//! (software emulation, whatever `AGENTLAB_ACCEL` says): it reaches its ready
//! line, grows its root filesystem to a bigger overlay, keeps what is written
//! across a power cycle, and powers off cleanly on QMP `system_powerdown`
//! (which proves acpid and the power button work).
//!
//! Needs qemu-system-x86_64 and qemu-img, a guest kernel
//! (linux-image-cloud-amd64), busybox-static and e2fsprogs.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentlab::image::default_guest::{self, BuildOptions, READY_MARKER};
use agentlab::image::manifest::Manifest;

const READY_TIMEOUT: Duration = Duration::from_secs(120);
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(60);
const SHELL_TIMEOUT: Duration = Duration::from_secs(30);
/// Overlay bigger than the 2 GiB base, so the guest has something to grow into.
const OVERLAY_SIZE: &str = "4G";

/// A temp dir, removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The built image and a sandbox-like overlay on it in a temp dir, plus the
/// QEMU booted from them; QEMU is killed and the dir removed on drop.
struct Guest {
    qemu: Option<Child>,
    image_dir: PathBuf,
    manifest: Manifest,
    dir: Scratch,
}

impl Guest {
    /// Builds the default guest and an overlay on its disk.
    fn build(tag: &str) -> Guest {
        let dir = Scratch(
            std::env::temp_dir().join(format!("agentlab-boot-{tag}-{}", std::process::id())),
        );
        let _ = std::fs::remove_dir_all(&dir.0);
        std::fs::create_dir_all(&dir.0).unwrap();
        let images = dir.0.join("images");
        let opts = BuildOptions::new(
            images.clone(),
            PathBuf::from(env!("CARGO_BIN_EXE_agentlab")),
        );
        let manifest = default_guest::build(&opts, &mut |line| eprintln!("{line}")).unwrap();
        let image_dir = default_guest::image_dir(&images, default_guest::GuestAgent::Agentlab);
        let created = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(image_dir.join(&manifest.disk))
            .arg(dir.0.join("ovl.qcow2"))
            .arg(OVERLAY_SIZE)
            .status()
            .expect("qemu-img (apt-get install qemu-utils)");
        assert!(created.success(), "qemu-img create failed");
        Guest {
            qemu: None,
            image_dir,
            manifest,
            dir,
        }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.image_dir.join(name)
    }

    /// Starts QEMU paused, connects console and QMP, then lets it run.
    fn boot(&mut self) -> (Console, Qmp) {
        let run = self.dir.0.join("run");
        let _ = std::fs::remove_dir_all(&run);
        std::fs::create_dir_all(&run).unwrap();
        let (console_sock, qmp_sock) = (run.join("console.sock"), run.join("qmp.sock"));
        let m = &self.manifest;
        let base = self.file(&m.disk);
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-machine",
                "q35,accel=tcg",
                "-cpu",
                "max",
                "-m",
                "512",
                "-smp",
                "1",
            ])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
                "-S",
            ])
            .arg("-kernel")
            .arg(self.file(m.kernel.as_deref().unwrap()))
            .arg("-initrd")
            .arg(self.file(m.initrd.as_deref().unwrap()))
            .arg("-append")
            .arg(format!(
                "{} agentlab.hostname=boot-test",
                m.cmdline.as_deref().unwrap()
            ))
            .arg("-blockdev")
            .arg(format!(
                "driver=file,node-name=base-file,filename={},read-only=on",
                base.display()
            ))
            .args([
                "-blockdev",
                "driver=raw,node-name=base,file=base-file,read-only=on",
            ])
            .arg("-blockdev")
            .arg(format!(
                "driver=file,node-name=ovl-file,filename={}",
                self.dir.0.join("ovl.qcow2").display()
            ))
            .args([
                "-blockdev",
                "driver=qcow2,node-name=root,file=ovl-file,backing=base",
            ])
            .args(["-device", "virtio-blk-pci,drive=root"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=con,path={},server=on,wait=off,logfile={}",
                console_sock.display(),
                run.join("console.log").display()
            ))
            .args(["-serial", "chardev:con"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_sock.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("qemu-system-x86_64 (apt-get install qemu-system-x86)");
        self.qemu = Some(child);
        let console = Console::connect(&console_sock);
        let mut qmp = Qmp::connect(&qmp_sock);
        qmp.execute("cont");
        (console, qmp)
    }

    /// Waits for QEMU to exit by itself; true when it did within `timeout`.
    fn exits_within(&mut self, timeout: Duration) -> bool {
        let qemu = self.qemu.as_mut().unwrap();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if qemu.try_wait().unwrap().is_some() {
                self.qemu = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }
}

/// Kills QEMU first; the `dir` field, dropped after, removes the files.
impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(mut qemu) = self.qemu.take() {
            let _ = qemu.kill();
            let _ = qemu.wait();
        }
    }
}

/// Waits for a Unix socket QEMU creates and connects to it.
fn connect(path: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => return stream,
            Err(err) if Instant::now() > deadline => {
                panic!("cannot connect to {}: {err}", path.display())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The guest's serial console: everything it printed so far, and a way to
/// type into the root shell there.
struct Console {
    stream: UnixStream,
    seen: String,
}

impl Console {
    fn connect(path: &Path) -> Console {
        let stream = connect(path);
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Console {
            stream,
            seen: String::new(),
        }
    }

    /// Reads until `pattern` shows up after byte `from`; false on timeout.
    fn wait_for(&mut self, pattern: &str, from: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        while !self.seen[from..].contains(pattern) {
            if Instant::now() > deadline {
                return false;
            }
            match self.stream.read(&mut buf) {
                Ok(0) => return false,
                Ok(n) => self.seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => panic!("console read: {e}"),
            }
        }
        true
    }

    /// Types a line into the shell.
    fn type_line(&mut self, line: &str) {
        self.stream
            .write_all(format!("{line}\n").as_bytes())
            .unwrap();
    }

    /// Waits for the console shell to answer (it starts after the ready line,
    /// and the serial port drops what is typed before it opens).
    fn wait_for_shell(&mut self) {
        let deadline = Instant::now() + SHELL_TIMEOUT;
        loop {
            let from = self.seen.len();
            // The shell echoes the line as typed; only its output says 42.
            self.type_line("echo shell-$((40+2))");
            if self.wait_for("shell-42", from, Duration::from_secs(1)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no shell on the console:\n{}",
                self.seen
            );
        }
    }

    /// Runs `command` in the console shell and returns what appeared until it finished.
    fn run(&mut self, command: &str) -> String {
        let from = self.seen.len();
        self.type_line(&format!("{command}; echo done-$((6*7))"));
        assert!(
            self.wait_for("done-42", from, SHELL_TIMEOUT),
            "{command:?} did not finish:\n{}",
            &self.seen[from..]
        );
        self.seen[from..].to_string()
    }
}

/// Just enough QMP for this test: capabilities, then single commands.
struct Qmp {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let stream = connect(path);
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut qmp = Qmp {
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
        };
        let greeting = qmp.line();
        assert!(
            greeting.contains("\"QMP\""),
            "not a QMP greeting: {greeting}"
        );
        qmp.execute("qmp_capabilities");
        qmp
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        line
    }

    /// Sends a command and skips events until its answer, which must be a return.
    fn execute(&mut self, command: &str) {
        let request = format!("{{\"execute\":\"{command}\"}}\n");
        self.writer.write_all(request.as_bytes()).unwrap();
        let answer = loop {
            let line = self.line();
            if !line.contains("\"event\"") {
                break line;
            }
        };
        assert!(answer.contains("\"return\""), "{command}: {answer}");
    }
}

/// `size=<KiB>` as the guest's awk printed it; the typed command shows
/// `size=" $2`, so only the output has digits after the `=`.
fn df_size_kib(output: &str) -> u64 {
    output
        .split("size=")
        .skip(1)
        .find_map(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .unwrap_or(0)
}

#[test]
fn default_guest_boots_grows_its_disk_keeps_writes_and_powers_off() {
    let mut guest = Guest::build("tcg");
    let initramfs_mb = std::fs::metadata(guest.file("initramfs.cpio"))
        .unwrap()
        .len() as f64
        / 1e6;
    let agent_mb = std::fs::metadata(env!("CARGO_BIN_EXE_agentlab"))
        .unwrap()
        .len() as f64
        / 1e6;

    let started = Instant::now();
    let (mut console, mut qmp) = guest.boot();
    let ready = console.wait_for(READY_MARKER, 0, READY_TIMEOUT);
    let boot_time = started.elapsed();
    eprintln!(
        "default guest: ready in {:.2} s under TCG (initramfs {initramfs_mb:.1} MB, agentlab binary {agent_mb:.1} MB)",
        boot_time.as_secs_f64()
    );
    assert!(
        ready,
        "no {READY_MARKER} within {READY_TIMEOUT:?}:\n{}",
        console.seen
    );
    assert!(
        console
            .seen
            .contains("grow-root: grew /newroot on vda from 2.0 GiB to 4.0 GiB"),
        "{}",
        console.seen
    );

    console.wait_for_shell();
    let df = console.run("df -k / | tail -n 1 | awk '{print \"size=\" $2}'");
    let size_kib = df_size_kib(&df);
    eprintln!("default guest: / is {size_kib} KiB after grow-root");
    assert!(size_kib > 3_800_000 && size_kib <= 4 << 20, "{df}");
    let hostname = console.run("hostname | tr a-z A-Z");
    assert!(hostname.contains("BOOT-TEST"), "{hostname}");
    let write = console.run("echo kept-on-disk > /work/probe && sync && tr a-z A-Z < /work/probe");
    assert!(write.contains("KEPT-ON-DISK"), "{write}");

    qmp.execute("system_powerdown");
    let powered_off = guest.exits_within(POWEROFF_TIMEOUT);
    assert!(
        powered_off,
        "QEMU still runs after system_powerdown:\n{}",
        console.seen
    );

    let (mut console, mut qmp) = guest.boot();
    assert!(
        console.wait_for(READY_MARKER, 0, READY_TIMEOUT),
        "{}",
        console.seen
    );
    assert!(
        console
            .seen
            .contains("grow-root: /newroot already fills vda (4.0 GiB)"),
        "{}",
        console.seen
    );
    console.wait_for_shell();
    let kept = console.run("tr a-z A-Z < /work/probe");
    assert!(kept.contains("KEPT-ON-DISK"), "{kept}");
    qmp.execute("system_powerdown");
    assert!(guest.exits_within(POWEROFF_TIMEOUT), "{}", console.seen);
}
