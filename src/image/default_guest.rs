//! The default guest, built on the host from what its package manager
//! provides (DESIGN.md §5): the host's kernel and virtio modules, busybox-static,
//! and this very binary as the guest's agent.
//!
//! Owns the assembly of `<images_dir>/default/`: `vmlinuz` (the kernel, copied),
//! `initramfs.cpio` (`/init`, busybox, the modules, `/agentlab`), `rootfs.raw`
//! (a sparse ext4 disk made by `mke2fs -d` from busybox and the files under
//! `initramfs/rootfs/`) and `image.json`. The scripts and files come from the
//! repository's `initramfs/` directory, embedded at compile time, so a host
//! needs no checkout. It does not boot anything (the QEMU backend does) and
//! does not manage other images.
//!
//! A variant, `<images_dir>/default-qemu-ga/` ([`GuestAgent::QemuGa`]), is the
//! same guest with Debian's stock `qemu-ga` answering the host instead of
//! agentlab's agent (so the host's qemu-ga fallbacks can be exercised): the
//! host's `/usr/sbin/qemu-ga` and its shared libraries (`guest_libs`) go on
//! the root disk, and `initramfs/rootfs-qemu-ga/usr/sbin/run-qemu-ga` starts it.
//!
//! The image appears whole or not at all: it is built in
//! `<images_dir>/.<name>.tmp-<pid>` and renamed into place when complete. Its
//! files are then read-only, since sandboxes' qcow2 overlays sit on
//! `rootfs.raw`: rebuilding with `force` swaps in a new disk under any overlay
//! made on the old one, so callers rebuild only with no sandbox on it.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::cpio::{CpioError, CpioWriter};
use super::elf::{self, ElfError, Linkage};
use super::guest_libs::{self, LibsError};
use super::kernel::{GuestKernel, KernelError};
use super::kmod::{self, ModulePath};
use super::manifest::{self, Manifest, ManifestError};
use crate::time::Timestamp;

/// The image's name and its directory's name under `images_dir`.
pub const IMAGE_NAME: &str = "default";
/// The variant whose guest runs the stock qemu-ga.
pub const QEMU_GA_IMAGE_NAME: &str = "default-qemu-ga";
/// Where Debian's qemu-guest-agent puts qemu-ga; the guest has it there too.
pub const DEFAULT_QEMU_GA: &str = "/usr/sbin/qemu-ga";
/// The line the guest prints on its console when it is up (`/etc/init.d/rcS`).
pub const READY_MARKER: &str = "AGENTLAB-READY";
/// The kernel command line; the backend appends `agentlab.hostname=<name>`.
/// `panic=-1` reboots at once on a panic, which `-no-reboot` turns into an exit.
pub const CMDLINE: &str = "console=ttyS0 panic=-1 quiet";
pub const DEFAULT_DISK_SIZE: u64 = 2 << 30;
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";

/// Below this, an ext4 with its journal leaves no room to work in (the
/// `DiskTooSmall` message says 64 MiB).
const MIN_DISK_SIZE: u64 = 64 << 20;
const KERNEL_FILE: &str = "vmlinuz";
const INITRD_FILE: &str = "initramfs.cpio";
const DISK_FILE: &str = "rootfs.raw";
const DISK_LABEL: &str = "agentlab-root";
/// ext4 journal size in MiB: the guest writes little, and a small journal
/// keeps the base disk small (mke2fs writes it out in full).
const JOURNAL_MIB: &str = "8";

const INIT_SCRIPT: &str = include_str!("../../initramfs/init");
const MODULE_LIST: &str = include_str!("../../initramfs/modules");
/// The inittab line that runs agentlab's agent, and the one that replaces it
/// in the qemu-ga variant.
const INITTAB: &str = include_str!("../../initramfs/rootfs/etc/inittab");
const AGENT_LINE: &str = "::respawn:/run/agentlab/agentlab agent\n";
const QEMU_GA_LINE: &str = "::respawn:/usr/sbin/run-qemu-ga\n";
const RUN_QEMU_GA: (&str, u32, &str) = (
    "usr/sbin/run-qemu-ga",
    0o755,
    include_str!("../../initramfs/rootfs-qemu-ga/usr/sbin/run-qemu-ga"),
);

/// Directories of the root disk, with their modes.
const ROOTFS_DIRS: [(&str, u32); 17] = [
    ("bin", 0o755),
    ("sbin", 0o755),
    ("usr/bin", 0o755),
    ("usr/sbin", 0o755),
    ("etc", 0o755),
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("run", 0o755),
    ("mnt", 0o755),
    ("root", 0o700),
    ("home", 0o755),
    ("tmp", 0o1777),
    ("work", 0o755),
    ("var/log", 0o755),
    ("var/run", 0o755),
    ("var/tmp", 0o1777),
];

/// A file of the root disk from `initramfs/rootfs/`: path, mode, contents.
macro_rules! rootfs_file {
    ($path:literal, $mode:literal) => {
        (
            $path,
            $mode,
            include_str!(concat!("../../initramfs/rootfs/", $path)),
        )
    };
}

/// Files of the root disk (`etc/inittab` is [`inittab`]'s, since its agent
/// line depends on the variant).
const ROOTFS_FILES: [(&str, u32, &str); 10] = [
    rootfs_file!("etc/init.d/rcS", 0o755),
    rootfs_file!("etc/acpi/PWRF/00000080", 0o755),
    rootfs_file!("etc/passwd", 0o644),
    rootfs_file!("etc/shadow", 0o600),
    rootfs_file!("etc/group", 0o644),
    rootfs_file!("etc/hostname", 0o644),
    rootfs_file!("etc/hosts", 0o644),
    rootfs_file!("etc/os-release", 0o644),
    rootfs_file!("etc/profile", 0o644),
    rootfs_file!("usr/share/udhcpc/default.script", 0o755),
];

/// Symlinks of the root disk: path, target.
const ROOTFS_SYMLINKS: [(&str, &str); 1] = [("etc/mtab", "/proc/mounts")];

/// Which agent answers the host inside the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GuestAgent {
    /// `agentlab agent` (streaming exec, PTYs, tar streams): image `default`.
    #[default]
    Agentlab,
    /// Debian's stock qemu-ga: image `default-qemu-ga`.
    QemuGa,
}

impl GuestAgent {
    /// The image's name, which is also its directory's under `images_dir`.
    pub fn image_name(self) -> &'static str {
        match self {
            GuestAgent::Agentlab => IMAGE_NAME,
            GuestAgent::QemuGa => QEMU_GA_IMAGE_NAME,
        }
    }

    /// The variant an image name means, if it names one of ours.
    pub fn for_image(name: &str) -> Option<GuestAgent> {
        [GuestAgent::Agentlab, GuestAgent::QemuGa]
            .into_iter()
            .find(|a| a.image_name() == name)
    }
}

pub struct BuildOptions {
    /// Where images live; the guest goes to `<images_dir>/<agent's image name>/`.
    pub images_dir: PathBuf,
    /// `/boot/vmlinuz-<version>`; `None` picks one (see [`GuestKernel::detect`]).
    pub kernel: Option<PathBuf>,
    /// The agentlab binary to put in the guest; normally `current_exe()`.
    pub agent_binary: PathBuf,
    /// A statically linked busybox; it runs inside the guest.
    pub busybox: PathBuf,
    /// Size of the root disk in bytes; overlays may be bigger (the guest grows
    /// its filesystem to fit at boot).
    pub disk_size: u64,
    /// Replace an image that is already built.
    pub force: bool,
    /// The agent the guest runs; it picks the image's name.
    pub agent: GuestAgent,
    /// The host's qemu-ga, copied in for [`GuestAgent::QemuGa`].
    pub qemu_ga: PathBuf,
}

impl BuildOptions {
    /// The usual choices: auto-detected kernel, `/bin/busybox`, 2 GiB disk.
    pub fn new(images_dir: PathBuf, agent_binary: PathBuf) -> BuildOptions {
        BuildOptions {
            images_dir,
            kernel: None,
            agent_binary,
            busybox: PathBuf::from(DEFAULT_BUSYBOX),
            disk_size: DEFAULT_DISK_SIZE,
            force: false,
            agent: GuestAgent::Agentlab,
            qemu_ga: PathBuf::from(DEFAULT_QEMU_GA),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GuestImageError {
    #[error("the default guest is already built in {dir}; rebuild it with --force")]
    AlreadyBuilt { dir: PathBuf },
    #[error("busybox not found at {path}; install it: apt-get install busybox-static")]
    NoBusybox { path: PathBuf },
    #[error("{path} is dynamically linked but runs inside the guest, which has no libc; install the static one: apt-get install busybox-static")]
    BusyboxNotStatic { path: PathBuf },
    #[error("{path} is dynamically linked but runs inside the guest, which has no libc; use a static agentlab build (the default for this crate's target)")]
    AgentNotStatic { path: PathBuf },
    #[error("{path} cannot run in the guest")]
    NotAProgram {
        path: PathBuf,
        #[source]
        source: ElfError,
    },
    #[error("mke2fs not found; install it: apt-get install e2fsprogs")]
    NoMke2fs,
    #[error("qemu-ga not found at {path}; install it: apt-get install qemu-guest-agent")]
    NoQemuGa { path: PathBuf },
    #[error("kernel module {module} is compressed and {tool} cannot unpack it (install it: apt-get install {package})")]
    Decompress {
        module: String,
        tool: &'static str,
        package: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("a {size}-byte disk is too small; the default guest needs at least 64 MiB")]
    DiskTooSmall { size: u64 },
    #[error("cannot run {program}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{program} failed: {stderr}")]
    ToolFailed { program: String, stderr: String },
    #[error("cannot write the initramfs {path}")]
    Initramfs {
        path: PathBuf,
        #[source]
        source: CpioError,
    },
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Libs(#[from] LibsError),
}

/// `<images_dir>/default` or `<images_dir>/default-qemu-ga`.
pub fn image_dir(images_dir: &Path, agent: GuestAgent) -> PathBuf {
    images_dir.join(agent.image_name())
}

/// True when the variant's manifest exists and parses.
pub fn is_built(images_dir: &Path, agent: GuestAgent) -> bool {
    Manifest::load(&image_dir(images_dir, agent)).is_ok()
}

/// Builds `<images_dir>/<name>/`, reporting each stage to `progress`.
pub fn build(
    opts: &BuildOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Manifest, GuestImageError> {
    let name = opts.agent.image_name();
    let dir = image_dir(&opts.images_dir, opts.agent);
    if dir.exists() && !opts.force {
        return Err(GuestImageError::AlreadyBuilt { dir });
    }
    let inputs = Inputs::check(opts)?;
    progress(&format!(
        "building {name} guest: kernel {}",
        inputs.kernel.version
    ));
    create_dir(&opts.images_dir)?;
    remove_stale_builds(&opts.images_dir, name);
    let work = WorkDir::create(
        opts.images_dir
            .join(format!(".{name}.tmp-{}", std::process::id())),
    )?;
    copy_file(&inputs.kernel.path, &work.0.join(KERNEL_FILE))?;
    let initrd_size = write_initramfs(&work.0.join(INITRD_FILE), opts, &inputs)?;
    progress(&format!(
        "building {name} guest: initramfs ({:.1} MB)",
        initrd_size as f64 / 1e6
    ));
    make_root_disk(&work.0, opts, &inputs)?;
    if opts.agent == GuestAgent::QemuGa {
        progress(&format!(
            "building {name} guest: qemu-ga and {} shared libraries from the host",
            inputs.qemu_ga_libs.len()
        ));
    }
    progress(&format!(
        "building {name} guest: root disk ({}, ext4)",
        human_size(opts.disk_size)
    ));
    let manifest = Manifest {
        name: name.to_string(),
        format: "raw".to_string(),
        disk: DISK_FILE.to_string(),
        kernel: Some(KERNEL_FILE.to_string()),
        initrd: Some(INITRD_FILE.to_string()),
        cmdline: Some(CMDLINE.to_string()),
        // READY when the guest agent answers (it can be asked again after a
        // daemon restart, unlike a console line that may have gone unread).
        ready_on: "agent".to_string(),
        virtual_size: opts.disk_size,
        kernel_version: Some(inputs.kernel.version.clone()),
        built_at: Timestamp::now().to_string(),
        agentlab_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    manifest.store(&work.0)?;
    seal(&work.0)?;
    work.commit(&dir, name, opts.force)?;
    Ok(manifest)
}

/// What the build takes from the host, checked before anything is written.
struct Inputs {
    kernel: GuestKernel,
    modules: Vec<ModulePath>,
    mke2fs: PathBuf,
    /// What qemu-ga loads (for [`GuestAgent::QemuGa`]; else empty).
    qemu_ga_libs: Vec<PathBuf>,
}

impl Inputs {
    fn check(opts: &BuildOptions) -> Result<Inputs, GuestImageError> {
        if opts.disk_size < MIN_DISK_SIZE {
            return Err(GuestImageError::DiskTooSmall {
                size: opts.disk_size,
            });
        }
        if !opts.busybox.is_file() {
            return Err(GuestImageError::NoBusybox {
                path: opts.busybox.clone(),
            });
        }
        if linkage_of(&opts.busybox)? == Linkage::Dynamic {
            return Err(GuestImageError::BusyboxNotStatic {
                path: opts.busybox.clone(),
            });
        }
        if linkage_of(&opts.agent_binary)? == Linkage::Dynamic {
            return Err(GuestImageError::AgentNotStatic {
                path: opts.agent_binary.clone(),
            });
        }
        let qemu_ga_libs = match opts.agent {
            GuestAgent::Agentlab => Vec::new(),
            GuestAgent::QemuGa if !opts.qemu_ga.is_file() => {
                return Err(GuestImageError::NoQemuGa {
                    path: opts.qemu_ga.clone(),
                })
            }
            GuestAgent::QemuGa => guest_libs::needed(&opts.qemu_ga)?,
        };
        let mke2fs = find_program("mke2fs").ok_or(GuestImageError::NoMke2fs)?;
        let kernel = match &opts.kernel {
            Some(path) => GuestKernel::at(path)?,
            None => GuestKernel::detect()?,
        };
        let modules = kernel.modules(&kmod::parse_list(MODULE_LIST))?;
        Ok(Inputs {
            kernel,
            modules,
            mke2fs,
            qemu_ga_libs,
        })
    }
}

/// The guest's `/etc/inittab`: the one in `initramfs/rootfs/`, with the
/// qemu-ga variant's agent line in place of agentlab's.
fn inittab(agent: GuestAgent) -> String {
    match agent {
        GuestAgent::Agentlab => INITTAB.to_string(),
        GuestAgent::QemuGa => INITTAB.replace(AGENT_LINE, QEMU_GA_LINE),
    }
}

/// Static or dynamic; an error for anything that is not an x86-64 program.
fn linkage_of(path: &Path) -> Result<Linkage, GuestImageError> {
    let mut head = Vec::new();
    File::open(path)
        .and_then(|f| f.take(64 << 10).read_to_end(&mut head))
        .map_err(|source| io_err("read", path, source))?;
    elf::linkage(&head).map_err(|source| GuestImageError::NotAProgram {
        path: path.to_path_buf(),
        source,
    })
}

/// `name` on `PATH`, or in the sbin directories a non-root `PATH` often lacks.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Writes the initramfs and returns its size in bytes.
/// The module's plain bytes when it is compressed on the host, else None
/// (the file goes into the archive as it is).
fn decompress(m: &ModulePath, modules_dir: &Path) -> Result<Option<Vec<u8>>, GuestImageError> {
    let Some(c) = m.compression else {
        return Ok(None);
    };
    let (tool, package) = c.tool();
    let fail = |source: io::Error| GuestImageError::Decompress {
        module: m.name.clone(),
        tool,
        package,
        source,
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(modules_dir.join(&m.path))
        .stderr(Stdio::piped())
        .output()
        .map_err(fail)?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(fail(io::Error::other(why)));
    }
    Ok(Some(out.stdout))
}

fn write_initramfs(
    path: &Path,
    opts: &BuildOptions,
    inputs: &Inputs,
) -> Result<u64, GuestImageError> {
    let (kernel, modules) = (&inputs.kernel, &inputs.modules);
    let file = File::create(path).map_err(|source| io_err("create", path, source))?;
    let load_order: String = modules
        .iter()
        .map(|m| format!("{}\n", m.file_name()))
        .collect();
    // busybox insmod loads only plain .ko files: unpack compressed ones now.
    let unpacked: Vec<Option<Vec<u8>>> = modules
        .iter()
        .map(|m| decompress(m, &kernel.modules_dir))
        .collect::<Result<_, _>>()?;
    let write = || -> Result<File, CpioError> {
        let mut cpio = CpioWriter::new(BufWriter::new(file));
        for dir in ["bin", "dev", "lib", "lib/modules", "newroot", "proc", "sys"] {
            cpio.add_dir(dir, 0o755)?;
        }
        cpio.add_char_device("dev/console", 0o600, 5, 1)?;
        cpio.add_file("init", 0o755, INIT_SCRIPT.as_bytes())?;
        cpio.add_host_file("bin/busybox", 0o755, &opts.busybox)?;
        for (module, bytes) in modules.iter().zip(&unpacked) {
            let name = format!("lib/modules/{}", module.file_name());
            match bytes {
                Some(b) => cpio.add_file(&name, 0o644, b)?,
                None => cpio.add_host_file(&name, 0o644, &kernel.modules_dir.join(&module.path))?,
            }
        }
        cpio.add_file("lib/modules/load-order", 0o644, load_order.as_bytes())?;
        cpio.add_host_file("agentlab", 0o755, &opts.agent_binary)?;
        cpio.finish()?
            .into_inner()
            .map_err(|e| CpioError::Write(e.into_error()))
    };
    let file = write().map_err(|source| GuestImageError::Initramfs {
        path: path.to_path_buf(),
        source,
    })?;
    file.sync_all()
        .map_err(|source| io_err("write", path, source))?;
    file.metadata()
        .map(|m| m.len())
        .map_err(|source| io_err("read", path, source))
}

/// Stages the root filesystem in `<work>/rootfs.d` and turns it into a
/// sparse ext4 disk `<work>/rootfs.raw`.
fn make_root_disk(
    work: &Path,
    opts: &BuildOptions,
    inputs: &Inputs,
) -> Result<(), GuestImageError> {
    let mke2fs = &inputs.mke2fs;
    let staging = work.join("rootfs.d");
    stage_rootfs(&staging, &opts.busybox, opts.agent)?;
    if opts.agent == GuestAgent::QemuGa {
        stage_qemu_ga(&staging, &opts.qemu_ga, &inputs.qemu_ga_libs)?;
    }
    let disk = work.join(DISK_FILE);
    File::create(&disk)
        .and_then(|f| f.set_len(opts.disk_size))
        .map_err(|source| io_err("create", &disk, source))?;
    let mut cmd = Command::new(mke2fs);
    cmd.args(["-q", "-F", "-t", "ext4", "-L", DISK_LABEL, "-J"])
        .arg(format!("size={JOURNAL_MIB}"))
        .arg("-d")
        .arg(&staging)
        .arg(&disk);
    run(&mut cmd, mke2fs)?;
    File::open(&disk)
        .and_then(|f| f.sync_all())
        .map_err(|source| io_err("write", &disk, source))?;
    fs::remove_dir_all(&staging).map_err(|source| io_err("remove", &staging, source))
}

/// The root disk's tree: the directories and files above, busybox, and a
/// symlink to it for each applet at the path busybox names for it
/// (`bin/sh`, `sbin/init`, `usr/bin/env`…).
fn stage_rootfs(root: &Path, busybox: &Path, agent: GuestAgent) -> Result<(), GuestImageError> {
    for (dir, mode) in ROOTFS_DIRS {
        let path = root.join(dir);
        create_dir(&path)?;
        set_mode(&path, mode)?;
    }
    for (file, mode, contents) in ROOTFS_FILES {
        write_file(root, file, mode, contents)?;
    }
    write_file(root, "etc/inittab", 0o644, &inittab(agent))?;
    for (link, target) in ROOTFS_SYMLINKS {
        let path = root.join(link);
        symlink(target, &path).map_err(|source| io_err("create", &path, source))?;
    }
    let guest_busybox = root.join("bin/busybox");
    copy_file(busybox, &guest_busybox)?;
    set_mode(&guest_busybox, 0o755)?;
    let output = run(Command::new(busybox).arg("--list-full"), busybox)?;
    for applet in applet_paths(&output) {
        let link = root.join(applet);
        create_dir(link.parent().unwrap_or(root))?;
        symlink("/bin/busybox", &link).map_err(|source| io_err("create", &link, source))?;
    }
    Ok(())
}

/// qemu-ga at `/usr/sbin/qemu-ga`, the libraries it loads at their host
/// paths, and the script inittab starts it with.
fn stage_qemu_ga(root: &Path, qemu_ga: &Path, libs: &[PathBuf]) -> Result<(), GuestImageError> {
    guest_libs::install(qemu_ga, Path::new(DEFAULT_QEMU_GA), libs, root)?;
    let (file, mode, contents) = RUN_QEMU_GA;
    write_file(root, file, mode, contents)
}

/// Writes `root/file` (creating its directory) with `mode`.
fn write_file(root: &Path, file: &str, mode: u32, contents: &str) -> Result<(), GuestImageError> {
    let path = root.join(file);
    create_dir(path.parent().unwrap_or(root))?;
    fs::write(&path, contents).map_err(|source| io_err("write", &path, source))?;
    set_mode(&path, mode)
}

/// Applet paths from `busybox --list-full`, minus busybox itself and
/// `linuxrc` (an initrd-era name for init at the root).
fn applet_paths(list: &str) -> Vec<&str> {
    list.lines()
        .map(str::trim)
        .filter(|p| !p.is_empty() && *p != "bin/busybox" && *p != "linuxrc")
        .filter(|p| !p.starts_with('/') && !p.split('/').any(|c| c == ".." || c.is_empty()))
        .collect()
}

/// Runs a build tool; its stdout on success, its stderr in the error.
fn run(cmd: &mut Command, program: &Path) -> Result<String, GuestImageError> {
    let out = cmd.output().map_err(|source| GuestImageError::Spawn {
        program: program.to_path_buf(),
        source,
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(GuestImageError::ToolFailed {
            program: program.display().to_string(),
            stderr: format!("{stderr} ({})", out.status),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Makes every file of the finished image read-only.
fn seal(dir: &Path) -> Result<(), GuestImageError> {
    for name in [KERNEL_FILE, INITRD_FILE, DISK_FILE, manifest::FILE_NAME] {
        set_mode(&dir.join(name), 0o444)?;
    }
    Ok(())
}

/// Removes what builds of image `name` that died left behind:
/// `.<name>.tmp-<pid>` and `.<name>.old-<pid>` whose process is gone. Best effort.
fn remove_stale_builds(images_dir: &Path, name: &str) {
    let Ok(entries) = fs::read_dir(images_dir) else {
        return;
    };
    let prefix = format!(".{name}.");
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|n| n.strip_prefix("tmp-").or_else(|| n.strip_prefix("old-")))
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// The build's temporary directory, removed on drop unless committed.
struct WorkDir(PathBuf);

impl WorkDir {
    fn create(path: PathBuf) -> Result<WorkDir, GuestImageError> {
        let _ = fs::remove_dir_all(&path);
        fs::create_dir(&path).map_err(|source| io_err("create", &path, source))?;
        Ok(WorkDir(path))
    }

    /// Renames the finished build to `dir`; with `force`, an existing `dir`
    /// is moved aside first and removed once the new one is in place.
    fn commit(self, dir: &Path, name: &str, force: bool) -> Result<(), GuestImageError> {
        let parent = dir.parent().unwrap_or(Path::new("/"));
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        let replacing = force && dir.exists();
        if replacing {
            fs::rename(dir, &old).map_err(|source| io_err("move aside", dir, source))?;
        }
        if let Err(source) = fs::rename(&self.0, dir) {
            if replacing {
                let _ = fs::rename(&old, dir);
            }
            return Err(match source.kind() {
                io::ErrorKind::AlreadyExists | io::ErrorKind::DirectoryNotEmpty => {
                    GuestImageError::AlreadyBuilt {
                        dir: dir.to_path_buf(),
                    }
                }
                _ => io_err("move into place", dir, source),
            });
        }
        if replacing {
            let _ = fs::remove_dir_all(&old);
        }
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|source| io_err("sync", parent, source))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        // After a commit the path no longer exists and this does nothing.
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn create_dir(path: &Path) -> Result<(), GuestImageError> {
    fs::create_dir_all(path).map_err(|source| io_err("create directory", path, source))
}

fn copy_file(from: &Path, to: &Path) -> Result<(), GuestImageError> {
    fs::copy(from, to)
        .map(drop)
        .map_err(|source| io_err("copy", from, source))
}

fn set_mode(path: &Path, mode: u32) -> Result<(), GuestImageError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|source| io_err("set the mode of", path, source))
}

fn io_err(action: &'static str, path: &Path, source: io::Error) -> GuestImageError {
    GuestImageError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// `2 GiB`, `512 MiB`.
fn human_size(bytes: u64) -> String {
    if bytes % (1 << 30) == 0 {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let path =
                std::env::temp_dir().join(format!("agentlab-guest-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            Scratch(path)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// `busybox sh -n`: parses a script without running it; its complaint on error.
    fn sh_syntax(script: &str) -> Result<(), String> {
        let mut child = Command::new(DEFAULT_BUSYBOX)
            .args(["sh", "-n"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("busybox (apt-get install busybox-static)");
        io::Write::write_all(&mut child.stdin.take().unwrap(), script.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn rootfs_file(path: &str) -> &'static str {
        ROOTFS_FILES.iter().find(|f| f.0 == path).unwrap().2
    }

    #[test]
    fn init_script_is_valid_sh() {
        assert_eq!(sh_syntax(INIT_SCRIPT), Ok(()));
    }

    #[test]
    fn rcs_is_valid_sh() {
        assert_eq!(sh_syntax(rootfs_file("etc/init.d/rcS")), Ok(()));
    }

    #[test]
    fn power_button_handler_is_valid_sh() {
        assert_eq!(sh_syntax(rootfs_file("etc/acpi/PWRF/00000080")), Ok(()));
    }

    #[test]
    fn udhcpc_script_is_valid_sh() {
        assert_eq!(
            sh_syntax(rootfs_file("usr/share/udhcpc/default.script")),
            Ok(())
        );
    }

    #[test]
    fn syntax_check_catches_a_broken_script() {
        assert!(sh_syntax("if true; then echo\n")
            .unwrap_err()
            .contains("syntax error"));
    }

    #[test]
    fn ready_line_is_the_last_thing_rcs_does() {
        let last = rootfs_file("etc/init.d/rcS").trim_end().lines().last();
        assert_eq!(last, Some("echo AGENTLAB-READY >/dev/console"));
    }

    #[test]
    fn inittab_runs_the_agent() {
        assert!(
            inittab(GuestAgent::Agentlab).contains("\n::respawn:/run/agentlab/agentlab agent\n")
        );
    }

    #[test]
    fn qemu_ga_inittab_runs_qemu_ga_instead_of_the_agent() {
        let tab = inittab(GuestAgent::QemuGa);
        assert!(tab.contains("\n::respawn:/usr/sbin/run-qemu-ga\n"));
        assert!(!tab.contains("agentlab agent"));
        assert_eq!(tab.lines().count(), INITTAB.lines().count());
    }

    #[test]
    fn run_qemu_ga_is_valid_sh() {
        assert_eq!(sh_syntax(RUN_QEMU_GA.2), Ok(()));
    }

    #[test]
    fn variants_have_their_own_image_names() {
        assert_eq!(GuestAgent::default().image_name(), "default");
        assert_eq!(GuestAgent::QemuGa.image_name(), "default-qemu-ga");
        assert_eq!(
            GuestAgent::for_image("default-qemu-ga"),
            Some(GuestAgent::QemuGa)
        );
        assert_eq!(GuestAgent::for_image("debian-12"), None);
    }

    #[test]
    fn missing_qemu_ga_names_the_package() {
        let s = Scratch::new("noqemuga");
        let opts = BuildOptions {
            agent: GuestAgent::QemuGa,
            qemu_ga: s.0.join("qemu-ga"),
            ..BuildOptions::new(s.0.join("images"), PathBuf::from(DEFAULT_BUSYBOX))
        };
        let err = build(&opts, &mut |_| {}).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "qemu-ga not found at {}; install it: apt-get install qemu-guest-agent",
                opts.qemu_ga.display()
            )
        );
    }

    #[test]
    fn module_list_names_the_virtio_drivers() {
        let wanted = kmod::parse_list(MODULE_LIST);
        assert!(["virtio_pci", "virtio_blk", "virtio_console", "button"]
            .iter()
            .all(|m| wanted.contains(m)));
    }

    #[test]
    fn applet_list_skips_busybox_linuxrc_and_odd_paths() {
        let list = "bin/busybox\nbin/sh\nlinuxrc\nsbin/init\n/etc/passwd\n../x\nusr/bin/env\n";
        assert_eq!(applet_paths(list), ["bin/sh", "sbin/init", "usr/bin/env"]);
    }

    #[test]
    fn missing_busybox_names_the_package() {
        let s = Scratch::new("nobusybox");
        let opts = BuildOptions {
            busybox: s.0.join("busybox"),
            ..BuildOptions::new(s.0.join("images"), PathBuf::from(DEFAULT_BUSYBOX))
        };
        let err = build(&opts, &mut |_| {}).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "busybox not found at {}; install it: apt-get install busybox-static",
                opts.busybox.display()
            )
        );
    }

    #[test]
    fn dynamic_agent_is_refused() {
        let s = Scratch::new("dynamic");
        let opts = BuildOptions::new(s.0.join("images"), PathBuf::from("/bin/sh"));
        let err = build(&opts, &mut |_| {}).unwrap_err();
        assert!(matches!(err, GuestImageError::AgentNotStatic { .. }));
    }

    #[test]
    fn script_as_agent_is_not_a_program() {
        let s = Scratch::new("script");
        fs::write(s.0.join("agent"), "#!/bin/sh\n").unwrap();
        let opts = BuildOptions::new(s.0.join("images"), s.0.join("agent"));
        let err = build(&opts, &mut |_| {}).unwrap_err();
        assert!(matches!(
            err,
            GuestImageError::NotAProgram {
                source: ElfError::NotElf,
                ..
            }
        ));
    }

    #[test]
    fn existing_image_is_kept_without_force() {
        let s = Scratch::new("exists");
        fs::create_dir_all(s.0.join("images/default")).unwrap();
        let opts = BuildOptions::new(s.0.join("images"), PathBuf::from(DEFAULT_BUSYBOX));
        let err = build(&opts, &mut |_| {}).unwrap_err();
        assert!(err.to_string().ends_with("rebuild it with --force"));
    }

    #[test]
    fn stale_build_dirs_of_dead_processes_are_removed() {
        let s = Scratch::new("stale");
        let (dead, live) = (
            ".default.tmp-999999999",
            format!(".default.tmp-{}", std::process::id()),
        );
        fs::create_dir_all(s.0.join(dead)).unwrap();
        fs::create_dir_all(s.0.join(&live)).unwrap();
        remove_stale_builds(&s.0, IMAGE_NAME);
        assert!(!s.0.join(dead).exists());
        assert!(s.0.join(&live).exists());
    }

    #[test]
    fn failed_build_leaves_neither_image_nor_temp_dir() {
        let s = Scratch::new("midway");
        let real = GuestKernel::detect().unwrap();
        // A kernel file that is not there fails the copy into the work dir.
        let opts = BuildOptions {
            kernel: Some(s.0.join(format!("vmlinuz-{}", real.version))),
            ..BuildOptions::new(s.0.join("images"), PathBuf::from(DEFAULT_BUSYBOX))
        };
        let err = build(&opts, &mut |_| {}).unwrap_err();
        let left = fs::read_dir(s.0.join("images")).unwrap().count();
        assert!(matches!(err, GuestImageError::Io { action: "copy", .. }));
        assert_eq!(left, 0);
    }

    #[test]
    fn forced_rebuild_replaces_the_image_whole_and_read_only() {
        let s = Scratch::new("rebuild");
        let opts = BuildOptions {
            disk_size: MIN_DISK_SIZE,
            force: true,
            ..BuildOptions::new(s.0.join("images"), PathBuf::from(DEFAULT_BUSYBOX))
        };
        let mut lines = Vec::new();
        build(&opts, &mut |_| {}).unwrap();
        let manifest = build(&opts, &mut |line| lines.push(line.to_string())).unwrap();
        let entries: Vec<String> = fs::read_dir(s.0.join("images"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        let disk_mode = fs::metadata(s.0.join("images/default/rootfs.raw"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            Manifest::load(&s.0.join("images/default")).unwrap(),
            manifest
        );
        assert_eq!(entries, ["default"]);
        assert_eq!(disk_mode & 0o777, 0o444);
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[2], "building default guest: root disk (64 MiB, ext4)");
    }

    /// `debugfs -R 'stat PATH'` on an ext4 image: the inode listing or the complaint.
    fn debugfs_stat(disk: &Path, path: &str) -> String {
        let out = Command::new(find_program("debugfs").expect("debugfs (e2fsprogs)"))
            .arg("-R")
            .arg(format!("stat {path}"))
            .arg(disk)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    #[test]
    fn qemu_ga_variant_carries_qemu_ga_its_libraries_and_its_starter() {
        let s = Scratch::new("qemuga");
        let opts = BuildOptions {
            disk_size: MIN_DISK_SIZE,
            agent: GuestAgent::QemuGa,
            ..BuildOptions::new(s.0.join("images"), PathBuf::from(DEFAULT_BUSYBOX))
        };
        let manifest = build(&opts, &mut |_| {}).unwrap();
        let disk = s.0.join("images/default-qemu-ga/rootfs.raw");
        let libs = guest_libs::needed(Path::new(DEFAULT_QEMU_GA)).unwrap();
        let loader = libs
            .iter()
            .find(|l| l.to_string_lossy().contains("ld-linux"))
            .unwrap();
        assert_eq!(manifest.name, "default-qemu-ga");
        assert_eq!(manifest.ready_on, "agent");
        assert!(debugfs_stat(&disk, "/usr/sbin/qemu-ga").contains("Type: regular"));
        assert!(debugfs_stat(&disk, "/usr/sbin/run-qemu-ga").contains("Mode:  0755"));
        assert!(debugfs_stat(&disk, &loader.to_string_lossy()).contains("Type: regular"));
        assert!(!s.0.join("images/default").exists());
    }

    #[test]
    fn compressed_modules_are_unpacked_for_insmod() {
        let dir = std::env::temp_dir().join(format!("agentlab-kmod-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("kernel")).unwrap();
        let payload = b"\x7fELF pretend module bytes".to_vec();
        for (tool, file) in [("xz", "a.ko"), ("gzip", "b.ko")] {
            std::fs::write(dir.join("kernel").join(file), &payload).unwrap();
            let ok = Command::new(tool)
                .arg(dir.join("kernel").join(file))
                .status()
                .unwrap();
            assert!(ok.success());
        }
        let dep = "kernel/a.ko.xz: kernel/b.ko.gz\nkernel/b.ko.gz:\n";
        let mods = crate::image::kmod::closure(&["a"], dep, "").unwrap();
        let unpacked: Vec<Vec<u8>> = mods
            .iter()
            .map(|m| decompress(m, &dir).unwrap().unwrap())
            .collect();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(unpacked, vec![payload.clone(), payload]);
    }
}
