//! ext4 as the guest's `grow-root` needs it: the filesystem's geometry read
//! from its superblock, and online growth with the `EXT4_IOC_RESIZE_FS` ioctl.
//!
//! Offsets follow the kernel's `Documentation/filesystems/ext4/super.rst` and
//! `fs/ext4/ext4.h`. Parsing is pure and bounds-checked; the ioctl is the one
//! `unsafe` call. Deciding whether to grow is the caller's business
//! (`guest::grow_root`).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The primary superblock starts 1024 bytes into the device (super.rst).
pub const SUPERBLOCK_OFFSET: u64 = 1024;
/// Bytes of the superblock that [`Geometry::parse`] reads.
pub const SUPERBLOCK_LEN: usize = 1024;
/// `s_magic`, also the `f_type` statfs(2) reports for ext2/3/4.
pub const EXT4_SUPER_MAGIC: u16 = 0xEF53;

/// Superblock fields (super.rst "The Super Block").
const S_BLOCKS_COUNT_LO: usize = 0x4;
const S_LOG_BLOCK_SIZE: usize = 0x18;
const S_MAGIC: usize = 0x38;
const S_FEATURE_INCOMPAT: usize = 0x60;
const S_BLOCKS_COUNT_HI: usize = 0x150;
/// `INCOMPAT_64BIT`: `s_blocks_count_hi` is valid.
const INCOMPAT_64BIT: u32 = 0x80;
/// ext4 blocks are 1 KiB to 64 KiB: `1024 << s_log_block_size`.
const MAX_LOG_BLOCK_SIZE: u32 = 6;

mod ioctl {
    // fs/ext4/ext4.h: #define EXT4_IOC_RESIZE_FS _IOW('f', 16, __u64)
    nix::ioctl_write_ptr!(ext4_ioc_resize_fs, b'f', 16, u64);
}

/// Size of an ext4 filesystem, in its own blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub block_size: u64,
    pub blocks_count: u64,
}

impl Geometry {
    /// Reads the geometry from the superblock's bytes; `None` when they are
    /// not an ext2/3/4 superblock.
    pub fn parse(sb: &[u8]) -> Option<Geometry> {
        if le16(sb, S_MAGIC)? != EXT4_SUPER_MAGIC {
            return None;
        }
        let log = le32(sb, S_LOG_BLOCK_SIZE)?;
        if log > MAX_LOG_BLOCK_SIZE {
            return None;
        }
        let lo = u64::from(le32(sb, S_BLOCKS_COUNT_LO)?);
        let hi = if le32(sb, S_FEATURE_INCOMPAT)? & INCOMPAT_64BIT != 0 {
            u64::from(le32(sb, S_BLOCKS_COUNT_HI)?)
        } else {
            0
        };
        Some(Geometry {
            block_size: 1024 << log,
            blocks_count: hi << 32 | lo,
        })
    }

    pub fn bytes(&self) -> u64 {
        self.block_size * self.blocks_count
    }
}

/// Reads the geometry of the ext4 filesystem on `device`.
pub fn read_geometry(device: &Path) -> io::Result<Geometry> {
    let mut sb = [0u8; SUPERBLOCK_LEN];
    File::open(device)?.read_exact_at(&mut sb, SUPERBLOCK_OFFSET)?;
    Geometry::parse(&sb).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "no ext4 superblock at offset 1024",
        )
    })
}

/// Grows the mounted ext4 filesystem that `fs` (any file or directory on it)
/// belongs to, to `new_blocks` blocks. Needs CAP_SYS_RESOURCE; the kernel
/// refuses to shrink and does nothing when the count is unchanged.
pub fn resize(fs: &File, new_blocks: u64) -> io::Result<()> {
    // SAFETY: the descriptor is open for the whole call, borrowed from `fs`;
    // the pointer is to `new_blocks`, a live u64 the kernel only reads
    // (copy_from_user of a __u64, the type the ioctl number encodes).
    unsafe { ioctl::ext4_ioc_resize_fs(fs.as_fd().as_raw_fd(), &new_blocks) }
        .map(drop)
        .map_err(io::Error::from)
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at + 2)?;
    Some(u16::from_le_bytes([s[0], s[1]]))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 4)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn superblock(log_block_size: u32, lo: u32, hi: u32, incompat: u32) -> Vec<u8> {
        let mut sb = vec![0u8; SUPERBLOCK_LEN];
        sb[S_MAGIC..S_MAGIC + 2].copy_from_slice(&EXT4_SUPER_MAGIC.to_le_bytes());
        sb[S_LOG_BLOCK_SIZE..S_LOG_BLOCK_SIZE + 4].copy_from_slice(&log_block_size.to_le_bytes());
        sb[S_BLOCKS_COUNT_LO..S_BLOCKS_COUNT_LO + 4].copy_from_slice(&lo.to_le_bytes());
        sb[S_BLOCKS_COUNT_HI..S_BLOCKS_COUNT_HI + 4].copy_from_slice(&hi.to_le_bytes());
        sb[S_FEATURE_INCOMPAT..S_FEATURE_INCOMPAT + 4].copy_from_slice(&incompat.to_le_bytes());
        sb
    }

    #[test]
    fn two_gib_of_4k_blocks() {
        let g = Geometry::parse(&superblock(2, 524_288, 0, INCOMPAT_64BIT)).unwrap();
        assert_eq!(g.block_size, 4096);
        assert_eq!(g.bytes(), 2 << 30);
    }

    #[test]
    fn high_count_counts_only_with_64bit_feature() {
        let with = Geometry::parse(&superblock(2, 1, 1, INCOMPAT_64BIT)).unwrap();
        let without = Geometry::parse(&superblock(2, 1, 1, 0)).unwrap();
        assert_eq!(with.blocks_count, (1 << 32) + 1);
        assert_eq!(without.blocks_count, 1);
    }

    #[test]
    fn wrong_magic_is_not_ext4() {
        let mut sb = superblock(2, 1, 0, 0);
        sb[S_MAGIC] = 0;
        assert_eq!(Geometry::parse(&sb), None);
    }

    #[test]
    fn absurd_block_size_is_refused() {
        assert_eq!(Geometry::parse(&superblock(40, 1, 0, 0)), None);
    }

    #[test]
    fn short_buffer_is_none_not_a_panic() {
        assert_eq!(Geometry::parse(&superblock(2, 1, 0, 0)[..0x40]), None);
    }

    #[test]
    fn reads_geometry_of_a_real_mke2fs_image() {
        let path = std::env::temp_dir().join(format!("agentlab-ext4-{}.raw", std::process::id()));
        File::create(&path).unwrap().set_len(64 << 20).unwrap();
        let made = std::process::Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-b", "4096"])
            .arg(&path)
            .status()
            .expect("mke2fs (apt-get install e2fsprogs)");
        let geometry = read_geometry(&path);
        std::fs::remove_file(&path).unwrap();
        assert!(made.success());
        assert_eq!(
            geometry.unwrap(),
            Geometry {
                block_size: 4096,
                blocks_count: 16384
            }
        );
    }
}
