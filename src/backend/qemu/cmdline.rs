//! The QEMU command line for a sandbox. Pure: a [`VmSpec`] in, argv out.
//!
//! Choices (see the reference's §2):
//! - `q35`, `-nodefaults`, `-no-user-config`: nothing we did not ask for.
//! - Disks only through `-blockdev`, one node per file with an explicit driver
//!   and an explicit `backing` (a node name, or `null` at the bottom), so QEMU
//!   never probes a format nor follows a path written inside an image header.
//! - QMP, the serial console and the guest-agent port are Unix socket
//!   chardevs in the VM's run directory.
//! - `-sandbox` seccomp as Incus runs it; privileges dropped to `run_as` with
//!   `-runas` (QEMU < 9.1) or `-run-with user=` (≥ 9.1; `-runas` is gone in 10.0).
//! - `-no-reboot`: a guest reboot or panic ends the VM, and the daemon
//!   decides what that means; a sandbox never loops on a crashing kernel.

use std::path::Path;

use serde_json::json;

use crate::image::store::{Boot, Image};
use crate::qmp::QemuVersion;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccelKind {
    Kvm,
    Tcg,
}

impl AccelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AccelKind::Kvm => "kvm",
            AccelKind::Tcg => "tcg",
        }
    }
}

/// Socket and file names inside a VM's run directory.
pub const QMP_SOCK: &str = "qmp.sock";
pub const CONSOLE_SOCK: &str = "console.sock";
pub const AGENT_SOCK: &str = "qga.sock";
pub const PID_FILE: &str = "qemu.pid";

pub struct VmSpec<'a> {
    pub vmid: u32,
    pub hostname: &'a str,
    pub accel: AccelKind,
    pub cores: u32,
    pub memory_mb: u32,
    pub image: &'a Image,
    pub overlay: &'a Path,
    /// `/run/agentlab/vms/<vmid>`.
    pub run_dir: &'a Path,
    pub run_as: Option<&'a str>,
    pub version: &'a QemuVersion,
    /// The network card, if the sandbox has one.
    pub nic: Option<NicSpec<'a>>,
}

/// A NIC on a TAP the daemon opened: QEMU inherits the descriptor.
#[derive(Clone, Copy, Debug)]
pub struct NicSpec<'a> {
    /// The TAP's descriptor number in QEMU (it is inherited, not opened).
    pub fd: i32,
    pub mac: &'a str,
    /// `virtio-net-pci` or `e1000`.
    pub device: &'a str,
}

/// The marker every agentlab QEMU carries in its argv, so the daemon can
/// recognise its own processes (and no one else's) after a restart.
pub fn process_name(vmid: u32) -> String {
    format!("agentlab-{vmid}")
}

pub fn argv(spec: &VmSpec<'_>) -> Vec<String> {
    let mut a = Vec::new();
    machine(spec, &mut a);
    confinement(spec, &mut a);
    sockets(spec, &mut a);
    for node in blockdev_nodes(spec) {
        push(&mut a, &["-blockdev", &node]);
    }
    push(
        &mut a,
        &["-device", "virtio-blk-pci,drive=root,id=vda,bootindex=1"],
    );
    nic(spec, &mut a);
    direct_boot(spec, &mut a);
    a
}

/// The NIC on the inherited TAP (`vhost=off`: vhost-net needs /dev/vhost-net
/// opened by a privileged process and is a further kernel surface). Without
/// one, `-nodefaults` leaves the guest with no network at all.
fn nic(spec: &VmSpec<'_>, a: &mut Vec<String>) {
    let Some(n) = spec.nic else {
        return;
    };
    push(
        a,
        &["-netdev", &format!("tap,id=net0,fd={},vhost=off", n.fd)],
    );
    push(
        a,
        &[
            "-device",
            &format!("{},netdev=net0,mac={}", n.device, n.mac),
        ],
    );
}

fn push(a: &mut Vec<String>, items: &[&str]) {
    a.extend(items.iter().map(|s| s.to_string()));
}

/// Name, machine type, accelerator, CPU, memory; nothing QEMU adds by default.
fn machine(spec: &VmSpec<'_>, a: &mut Vec<String>) {
    let name = format!("guest={},debug-threads=on", process_name(spec.vmid));
    push(a, &["-name", &name]);
    push(
        a,
        &["-machine", "q35,smm=off,vmport=off,dump-guest-core=off"],
    );
    match spec.accel {
        AccelKind::Kvm => push(a, &["-accel", "kvm", "-cpu", "host"]),
        AccelKind::Tcg => push(a, &["-accel", "tcg", "-cpu", "max"]),
    }
    let (mem, smp) = (spec.memory_mb.to_string(), spec.cores.to_string());
    push(a, &["-m", &mem, "-smp", &smp]);
    push(
        a,
        &[
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-vga",
            "none",
        ],
    );
    push(a, &["-no-reboot", "-msg", "timestamp=on"]);
    push(a, &["-object", "rng-random,id=rng0,filename=/dev/urandom"]);
    push(a, &["-device", "virtio-rng-pci,rng=rng0"]);
}

/// Seccomp as Incus runs it, and the drop to an unprivileged user.
fn confinement(spec: &VmSpec<'_>, a: &mut Vec<String>) {
    push(
        a,
        &[
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny",
        ],
    );
    if let Some(user) = spec.run_as {
        if (spec.version.major, spec.version.minor) >= (9, 1) {
            push(a, &["-run-with", &format!("user={user}")]);
        } else {
            push(a, &["-runas", user]);
        }
    }
}

/// Pidfile, QMP, the serial console and the guest-agent port, all in the run dir.
fn sockets(spec: &VmSpec<'_>, a: &mut Vec<String>) {
    let sock = |name: &str| spec.run_dir.join(name).display().to_string();
    let server =
        |id: &str, name: &str| format!("socket,id={id},path={},server=on,wait=off", sock(name));
    push(a, &["-pidfile", &sock(PID_FILE)]);
    push(
        a,
        &[
            "-chardev",
            &server("qmp0", QMP_SOCK),
            "-mon",
            "chardev=qmp0,mode=control",
        ],
    );
    push(
        a,
        &[
            "-chardev",
            &server("con0", CONSOLE_SOCK),
            "-serial",
            "chardev:con0",
        ],
    );
    push(
        a,
        &[
            "-device",
            "virtio-serial-pci,id=vser0",
            "-chardev",
            &server("qga0", AGENT_SOCK),
        ],
    );
    push(
        a,
        &[
            "-device",
            "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0,id=qga-port",
        ],
    );
}

/// `-kernel`/`-initrd`/`-append` for images that boot a kernel directly.
fn direct_boot(spec: &VmSpec<'_>, a: &mut Vec<String>) {
    if let Boot::Kernel {
        kernel,
        initrd,
        cmdline,
    } = &spec.image.boot
    {
        let append = format!(
            "{cmdline} agentlab.hostname={} agentlab.vmid={}",
            spec.hostname, spec.vmid
        );
        let (k, i) = (kernel.display().to_string(), initrd.display().to_string());
        push(a, &["-kernel", &k, "-initrd", &i, "-append", append.trim()]);
    }
}

/// One `file` node and one format node per image, bottom-up, then the
/// writable overlay `root` on top. Base nodes are read-only.
fn blockdev_nodes(spec: &VmSpec<'_>) -> Vec<String> {
    // Bottom of the chain first: base0 is the image itself, base1 its backing…
    let mut layers = vec![(spec.image.disk.as_path(), spec.image.format)];
    layers.extend(
        spec.image
            .chain
            .iter()
            .map(|l| (l.path.as_path(), l.format)),
    );
    let mut nodes = Vec::new();
    for (i, (path, format)) in layers.iter().enumerate().rev() {
        let below = if i + 1 < layers.len() {
            json!(format!("base{}", i + 1))
        } else {
            serde_json::Value::Null
        };
        nodes.push(json!({
            "driver": "file", "node-name": format!("base{i}-file"),
            "filename": path.display().to_string(), "read-only": true,
        }));
        let mut fmt = json!({
            "driver": format.as_str(), "node-name": format!("base{i}"),
            "file": format!("base{i}-file"), "read-only": true,
        });
        if format.as_str() == "qcow2" {
            fmt["backing"] = below;
        }
        nodes.push(fmt);
    }
    nodes.push(json!({
        "driver": "file", "node-name": "root-file",
        "filename": spec.overlay.display().to_string(),
    }));
    nodes.push(json!({
        "driver": "qcow2", "node-name": "root", "file": "root-file", "backing": "base0",
    }));
    nodes.into_iter().map(|n| n.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow::{BaseFormat, ChainLink};
    use std::path::PathBuf;

    fn image(chain: Vec<ChainLink>) -> Image {
        Image {
            name: "default".into(),
            disk: PathBuf::from("/img/default/rootfs.raw"),
            format: BaseFormat::Raw,
            virtual_size: 1 << 31,
            chain,
            boot: Boot::Kernel {
                kernel: "/img/default/vmlinuz".into(),
                initrd: "/img/default/initramfs.cpio".into(),
                cmdline: "console=ttyS0 quiet".into(),
            },
            ready_on: "console:AGENTLAB-READY".into(),
        }
    }

    fn argv_for(img: &Image, version: (u32, u32), run_as: Option<&str>) -> Vec<String> {
        let v = QemuVersion {
            major: version.0,
            minor: version.1,
            micro: 0,
        };
        argv(&VmSpec {
            vmid: 1000,
            hostname: "sbx-1000",
            accel: AccelKind::Tcg,
            cores: 2,
            memory_mb: 512,
            image: img,
            overlay: Path::new("/var/lib/agentlab/sandboxes/1000/overlay.qcow2"),
            run_dir: Path::new("/run/agentlab/vms/1000"),
            run_as,
            version: &v,
            nic: None,
        })
    }

    #[test]
    fn no_nic_unless_asked_and_then_on_the_inherited_tap() {
        let img = image(vec![]);
        assert!(value_after(&argv_for(&img, (7, 2), None), "-netdev").is_empty());
        let v = QemuVersion {
            major: 7,
            minor: 2,
            micro: 0,
        };
        let a = argv(&VmSpec {
            vmid: 1000,
            hostname: "sbx-1000",
            accel: AccelKind::Tcg,
            cores: 1,
            memory_mb: 256,
            image: &img,
            overlay: Path::new("/o.qcow2"),
            run_dir: Path::new("/run/agentlab/vms/1000"),
            run_as: None,
            version: &v,
            nic: Some(NicSpec {
                fd: 7,
                mac: "52:54:00:aa:bb:cc",
                device: "virtio-net-pci",
            }),
        });
        assert_eq!(value_after(&a, "-netdev"), ["tap,id=net0,fd=7,vhost=off"]);
        assert!(value_after(&a, "-device")
            .contains(&"virtio-net-pci,netdev=net0,mac=52:54:00:aa:bb:cc".to_string()));
    }

    fn value_after(a: &[String], flag: &str) -> Vec<String> {
        a.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].clone())
            .collect()
    }

    #[test]
    fn disks_use_blockdev_never_drive() {
        let a = argv_for(&image(vec![]), (7, 2), None);
        assert!(!a.iter().any(|s| s == "-drive" || s == "-hda"));
        assert_eq!(value_after(&a, "-blockdev").len(), 4);
    }

    #[test]
    fn overlay_names_its_backing_node_explicitly() {
        let a = argv_for(&image(vec![]), (7, 2), None);
        let root: serde_json::Value =
            serde_json::from_str(value_after(&a, "-blockdev").last().unwrap()).unwrap();
        assert_eq!(root["backing"], "base0");
        assert_eq!(root["driver"], "qcow2");
    }

    #[test]
    fn qcow2_chain_ends_in_null_backing() {
        let mut img = image(vec![ChainLink {
            path: "/img/lower.qcow2".into(),
            format: BaseFormat::Qcow2,
        }]);
        img.format = BaseFormat::Qcow2;
        let a = argv_for(&img, (7, 2), None);
        let nodes: Vec<serde_json::Value> = value_after(&a, "-blockdev")
            .iter()
            .map(|s| serde_json::from_str(s).unwrap())
            .collect();
        let lower = nodes.iter().find(|n| n["node-name"] == "base1").unwrap();
        let upper = nodes.iter().find(|n| n["node-name"] == "base0").unwrap();
        assert_eq!(lower["backing"], serde_json::Value::Null);
        assert_eq!(upper["backing"], "base1");
        assert_eq!(upper["read-only"], true);
    }

    #[test]
    fn bases_are_declared_before_the_nodes_that_use_them() {
        let img = image(vec![ChainLink {
            path: "/img/lower.raw".into(),
            format: BaseFormat::Raw,
        }]);
        let a = argv_for(&img, (7, 2), None);
        let names: Vec<String> = value_after(&a, "-blockdev")
            .iter()
            .map(|s| {
                serde_json::from_str::<serde_json::Value>(s).unwrap()["node-name"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(
            names,
            vec![
                "base1-file",
                "base1",
                "base0-file",
                "base0",
                "root-file",
                "root"
            ]
        );
    }

    #[test]
    fn sockets_live_in_the_vm_run_dir() {
        let a = argv_for(&image(vec![]), (7, 2), None);
        let chardevs = value_after(&a, "-chardev").join(" ");
        assert!(chardevs.contains("path=/run/agentlab/vms/1000/qmp.sock,server=on,wait=off"));
        assert!(chardevs.contains("/run/agentlab/vms/1000/console.sock"));
        assert!(chardevs.contains("/run/agentlab/vms/1000/qga.sock"));
    }

    #[test]
    fn machine_is_q35_without_defaults() {
        let a = argv_for(&image(vec![]), (7, 2), None);
        assert!(value_after(&a, "-machine")[0].starts_with("q35"));
        assert!(a.contains(&"-nodefaults".to_string()));
    }

    #[test]
    fn old_qemu_drops_privileges_with_runas() {
        let a = argv_for(&image(vec![]), (7, 2), Some("nobody"));
        assert_eq!(value_after(&a, "-runas"), vec!["nobody"]);
    }

    #[test]
    fn new_qemu_drops_privileges_with_run_with() {
        let a = argv_for(&image(vec![]), (10, 0), Some("nobody"));
        assert_eq!(value_after(&a, "-run-with"), vec!["user=nobody"]);
        assert!(!a.contains(&"-runas".to_string()));
    }

    #[test]
    fn kernel_cmdline_carries_hostname_and_vmid() {
        let a = argv_for(&image(vec![]), (7, 2), None);
        let append = &value_after(&a, "-append")[0];
        assert!(append.ends_with("agentlab.hostname=sbx-1000 agentlab.vmid=1000"));
    }

    #[test]
    fn firmware_images_get_no_kernel() {
        let mut img = image(vec![]);
        img.boot = Boot::Firmware;
        let a = argv_for(&img, (7, 2), None);
        assert!(!a.contains(&"-kernel".to_string()));
    }

    #[test]
    fn process_name_marks_the_vmid() {
        let a = argv_for(&image(vec![]), (7, 2), None);
        assert_eq!(
            value_after(&a, "-name")[0],
            "guest=agentlab-1000,debug-threads=on"
        );
    }
}
