//! What the agentlab binary does inside a guest.
//!
//! - `agentlab agent` (`agent`, with `exec`, `files`, `sysinfo` and `stream`):
//!   the guest agent, a QGA server on the virtio-serial port.
//! - `agentlab guest grow-root <mountpoint>`, a duty of the initramfs's
//!   `/init` (this file): grows the root filesystem to fill its disk, so a
//!   sandbox whose overlay is bigger than the base image gets the space.
//!
//! Not here: the ext4 superblock and ioctl (`sys::ext4`), ptys and the
//! child setup (`sys::pty`), the wire format (`qga::wire`), the image these
//! run in (`image::default_guest`).

/// One line on the console (the agent's stderr): `agentlab-agent: …`.
macro_rules! note {
    ($($t:tt)*) => { eprintln!("agentlab-agent: {}", format_args!($($t)*)) }
}

pub mod agent;
pub mod exec;
pub mod files;
pub mod install;
pub mod stream;
pub mod sysinfo;

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use argh::FromArgs;

use crate::sys::ext4::{self, Geometry, EXT4_SUPER_MAGIC};

/// Sectors in `/sys/class/block/<dev>/size` are 512 bytes whatever the device's
/// own sector size (include/linux/blk_types.h, SECTOR_SHIFT).
const SYSFS_SECTOR: u64 = 512;

#[derive(FromArgs)]
/// Duties of the agentlab binary inside the default guest.
struct GuestArgs {
    #[argh(subcommand)]
    command: GuestCommand,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum GuestCommand {
    GrowRoot(GrowRootArgs),
}

#[derive(FromArgs)]
#[argh(subcommand, name = "grow-root")]
/// Grow the ext4 filesystem mounted at MOUNTPOINT to fill its block device.
struct GrowRootArgs {
    /// where the root filesystem is mounted, e.g. /newroot
    #[argh(positional)]
    mountpoint: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum GrowRootError {
    #[error("cannot inspect {path}")]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not an ext4 filesystem; grow-root grows ext4 only")]
    NotExt4 { path: PathBuf },
    #[error("cannot read the block device {dev} from sysfs ({path})")]
    Sysfs {
        dev: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the ext4 superblock on {device}")]
    Superblock {
        device: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot grow {path} to {blocks} blocks")]
    Resize {
        path: PathBuf,
        blocks: u64,
        #[source]
        source: io::Error,
    },
}

/// Runs `agentlab guest <args>`; 0 on success, 1 on failure, 2 on bad usage.
pub fn main(args: &[String]) -> ExitCode {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let parsed = match GuestArgs::from_args(&["agentlab guest"], &args) {
        Ok(parsed) => parsed,
        Err(early) => {
            return match early.status {
                Ok(()) => {
                    println!("{}", early.output);
                    ExitCode::SUCCESS
                }
                Err(()) => {
                    eprintln!("{}", early.output);
                    ExitCode::from(2)
                }
            };
        }
    };
    let GuestCommand::GrowRoot(grow) = parsed.command;
    // Growing a filesystem to fill its device is right for a fresh sandbox
    // disk and wrong on a host that happens to run this binary as root.
    if !running_in_initramfs() {
        eprintln!(
            "agentlab guest grow-root: refusing: this runs only in the default guest's initramfs, and / here is not one"
        );
        return ExitCode::from(2);
    }
    match grow_root(&grow.mountpoint) {
        Ok(report) => {
            println!("grow-root: {report}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!(
                "agentlab guest grow-root: {}",
                crate::log::error_chain(&err)
            );
            ExitCode::FAILURE
        }
    }
}

/// What grow-root did, as the one line it prints.
#[derive(Debug, PartialEq, Eq)]
pub enum GrowReport {
    Grown {
        mountpoint: PathBuf,
        device: String,
        from: Geometry,
        to_blocks: u64,
    },
    AlreadyFull {
        mountpoint: PathBuf,
        device: String,
        size: u64,
    },
}

impl std::fmt::Display for GrowReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GrowReport::Grown {
                mountpoint,
                device,
                from,
                to_blocks,
            } => write!(
                f,
                "grew {} on {device} from {} to {} ({} to {to_blocks} blocks of {} bytes)",
                mountpoint.display(),
                gib(from.bytes()),
                gib(to_blocks * from.block_size),
                from.blocks_count,
                from.block_size,
            ),
            GrowReport::AlreadyFull {
                mountpoint,
                device,
                size,
            } => write!(
                f,
                "{} already fills {device} ({}); nothing to do",
                mountpoint.display(),
                gib(*size)
            ),
        }
    }
}

/// Grows the ext4 filesystem at `mountpoint` to the size of its block device.
pub fn grow_root(mountpoint: &Path) -> Result<GrowReport, GrowRootError> {
    let inspect = |source| GrowRootError::Inspect {
        path: mountpoint.to_path_buf(),
        source,
    };
    let fs_type = rustix::fs::statfs(mountpoint)
        .map_err(|e| inspect(e.into()))?
        .f_type;
    if fs_type != i64::from(EXT4_SUPER_MAGIC) {
        return Err(GrowRootError::NotExt4 {
            path: mountpoint.to_path_buf(),
        });
    }
    let dev = std::fs::metadata(mountpoint).map_err(inspect)?.dev();
    let sysfs = PathBuf::from(format!(
        "/sys/dev/block/{}:{}",
        rustix::fs::major(dev),
        rustix::fs::minor(dev)
    ));
    let read_sysfs = |file: &str| {
        let path = sysfs.join(file);
        std::fs::read_to_string(&path).map_err(|source| GrowRootError::Sysfs {
            dev: format!("{}:{}", rustix::fs::major(dev), rustix::fs::minor(dev)),
            path,
            source,
        })
    };
    let device_bytes = parse_sectors(&read_sysfs("size")?) * SYSFS_SECTOR;
    let name = parse_devname(&read_sysfs("uevent")?).unwrap_or_default();
    let node = Path::new("/dev").join(&name);
    let geometry = ext4::read_geometry(&node).map_err(|source| GrowRootError::Superblock {
        device: node.clone(),
        source,
    })?;
    let Some(to_blocks) = grown_blocks(geometry, device_bytes) else {
        return Ok(GrowReport::AlreadyFull {
            mountpoint: mountpoint.to_path_buf(),
            device: name,
            size: geometry.bytes(),
        });
    };
    let resize_err = |source| GrowRootError::Resize {
        path: mountpoint.to_path_buf(),
        blocks: to_blocks,
        source,
    };
    let dir = File::open(mountpoint).map_err(resize_err)?;
    ext4::resize(&dir, to_blocks).map_err(resize_err)?;
    Ok(GrowReport::Grown {
        mountpoint: mountpoint.to_path_buf(),
        device: name,
        from: geometry,
        to_blocks,
    })
}

/// The block count that fills a device of `device_bytes`, when it is more
/// than the filesystem has; `None` when there is nothing to grow.
pub fn grown_blocks(fs: Geometry, device_bytes: u64) -> Option<u64> {
    let fits = device_bytes / fs.block_size;
    (fits > fs.blocks_count).then_some(fits)
}

/// `/sys/dev/block/M:m/size`: a count of 512-byte sectors. Garbage reads as 0,
/// which never grows anything.
fn parse_sectors(text: &str) -> u64 {
    text.trim().parse().unwrap_or(0)
}

/// `DEVNAME=vda` from a sysfs `uevent` file.
fn parse_devname(uevent: &str) -> Option<String> {
    uevent
        .lines()
        .find_map(|line| line.strip_prefix("DEVNAME="))
        .filter(|name| !name.is_empty() && !name.contains(".."))
        .map(str::to_string)
}

/// `4.0 GiB`.
fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}

/// `what failed: why: root cause`, for the one line on the console.
/// `statfs(2)` magic numbers of the filesystems an initramfs root can be
/// (`include/uapi/linux/magic.h`): grow-root refuses to run anywhere else.
const RAMFS_MAGIC: u64 = 0x8584_58f6;
const TMPFS_MAGIC: u64 = 0x0102_1994;

/// True when `/` is an initramfs (ramfs or tmpfs), as in the default guest's
/// early boot, and not a host's real root filesystem.
fn running_in_initramfs() -> bool {
    rustix::fs::statfs("/").is_ok_and(|st| matches!(st.f_type as u64, RAMFS_MAGIC | TMPFS_MAGIC))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_GIB_4K: Geometry = Geometry {
        block_size: 4096,
        blocks_count: 524_288,
    };

    #[test]
    fn bigger_device_grows_to_its_whole_blocks() {
        assert_eq!(grown_blocks(TWO_GIB_4K, (4 << 30) + 1000), Some(1_048_576));
    }

    #[test]
    fn same_size_device_is_a_no_op() {
        assert_eq!(grown_blocks(TWO_GIB_4K, 2 << 30), None);
    }

    #[test]
    fn smaller_device_is_never_a_shrink() {
        assert_eq!(grown_blocks(TWO_GIB_4K, 1 << 30), None);
    }

    #[test]
    fn less_than_a_block_more_is_a_no_op() {
        assert_eq!(grown_blocks(TWO_GIB_4K, (2 << 30) + 4095), None);
    }

    #[test]
    fn sysfs_size_is_sectors() {
        assert_eq!(parse_sectors("8388608\n"), 8_388_608);
        assert_eq!(parse_sectors("junk"), 0);
    }

    #[test]
    fn devname_comes_from_uevent() {
        let uevent = "MAJOR=254\nMINOR=0\nDEVNAME=vda\nDEVTYPE=disk\nDISKSEQ=1\n";
        assert_eq!(parse_devname(uevent).as_deref(), Some("vda"));
        assert_eq!(parse_devname("MAJOR=254\n"), None);
    }

    #[test]
    fn grown_report_reads_as_one_line() {
        let report = GrowReport::Grown {
            mountpoint: "/newroot".into(),
            device: "vda".into(),
            from: TWO_GIB_4K,
            to_blocks: 1_048_576,
        };
        assert_eq!(
            report.to_string(),
            "grew /newroot on vda from 2.0 GiB to 4.0 GiB (524288 to 1048576 blocks of 4096 bytes)"
        );
    }

    #[test]
    fn procfs_is_not_ext4() {
        let err = grow_root(Path::new("/proc")).unwrap_err();
        assert!(matches!(err, GrowRootError::NotExt4 { .. }));
    }

    #[test]
    fn unknown_subcommand_is_a_usage_error() {
        assert_eq!(main(&["shrink-root".to_string()]), ExitCode::from(2));
    }
}
