//! qcow2: write empty overlays natively, and read and vet base images.
//!
//! Owns the qcow2 byte layout as far as agentlab needs it: building the
//! three-and-a-bit-cluster file that `qemu-img create -f qcow2 -b B -F F`
//! would build (so creating a sandbox disk costs one small write, not a
//! process), parsing an image header, and deciding whether a file in the
//! images directory may serve as a base, following its backing chain.
//! It does not walk L2 tables or refcounts (that is `qemu-img check`'s job)
//! and it does not decide where images live (`image` does).
//!
//! Base images are a security boundary: guest-written data can end up in the
//! images directory, so every length field read here is bounds-checked before
//! use and nothing is allocated from one. Two attacks shape the rules:
//! format probing (a raw image whose contents say "qcow2, backed by
//! /etc/shadow"), answered by always writing and requiring an explicit
//! backing format; and backing names that escape the images directory,
//! answered by resolving every link and confining it there.
//!
//! Spec: QEMU `docs/interop/qcow2.txt` (7.2; `qcow2.rst` later), cited below
//! as `qcow2.rst`, and the limits in QEMU's `block/qcow2.h` and
//! `qcow2_do_open` in `block/qcow2.c`. All header fields are big-endian.
//!
//! The code is split by direction: `overlay.rs` writes an overlay,
//! `inspect.rs` parses headers and vets base images and their chains. This
//! file holds what both share: the header layout, the limits, the types and
//! the error.

mod inspect;
mod overlay;

pub use inspect::{inspect_base, parse_header};
pub use overlay::{overlay_image, write_overlay};

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

// qcow2.rst "Header": byte offsets of the fields.
const MAGIC: &[u8; 4] = b"QFI\xfb";
const OFF_VERSION: usize = 4;
const OFF_BACKING_FILE_OFFSET: usize = 8;
const OFF_BACKING_FILE_SIZE: usize = 16;
const OFF_CLUSTER_BITS: usize = 20;
const OFF_SIZE: usize = 24;
const OFF_CRYPT_METHOD: usize = 32;
const OFF_L1_SIZE: usize = 36;
const OFF_L1_TABLE_OFFSET: usize = 40;
const OFF_REFCOUNT_TABLE_OFFSET: usize = 48;
const OFF_REFCOUNT_TABLE_CLUSTERS: usize = 56;
const OFF_NB_SNAPSHOTS: usize = 60;
const OFF_SNAPSHOTS_OFFSET: usize = 64;
/// A version 2 header ends here; version 3 fields follow.
const V2_HEADER_LENGTH: u32 = 72;
const OFF_INCOMPATIBLE_FEATURES: usize = 72;
const OFF_COMPATIBLE_FEATURES: usize = 80;
const OFF_AUTOCLEAR_FEATURES: usize = 88;
const OFF_REFCOUNT_ORDER: usize = 96;
const OFF_HEADER_LENGTH: usize = 100;
/// qcow2.rst: a v3 header_length is at least 104 and a multiple of 8.
const V3_MIN_HEADER_LENGTH: u32 = 104;
/// Present only when header_length > 104 (QEMU >= 5.1).
const OFF_COMPRESSION_TYPE: usize = 104;
/// What QEMU >= 5.1 writes: 104 bytes of fields, compression_type, padding.
const V3_HEADER_LENGTH: u32 = 112;

// qcow2.rst "Header extensions": `{u32 type, u32 length, data padded to 8}`.
const EXT_HEADER_LEN: u64 = 8;
const EXT_END: u32 = 0x0000_0000;
const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
const EXT_EXTERNAL_DATA_FILE: u32 = 0x4441_5441;

// qcow2.rst "Header", incompatible_features bits.
const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_EXTERNAL_DATA: u64 = 1 << 2;
const INCOMPAT_COMPRESSION_TYPE: u64 = 1 << 3;
const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY
    | INCOMPAT_CORRUPT
    | INCOMPAT_EXTERNAL_DATA
    | INCOMPAT_COMPRESSION_TYPE
    | INCOMPAT_EXTENDED_L2;
/// qcow2.rst "Header", compression_type: 0 deflate (zlib), 1 zstd.
const COMPRESSION_ZSTD: u8 = 1;

// block/qcow2.h: the limits qcow2_do_open enforces.
const MIN_CLUSTER_BITS: u32 = 9;
const MAX_CLUSTER_BITS: u32 = 21;
const MAX_REFCOUNT_ORDER: u32 = 6;
const QCOW_MAX_L1_SIZE: u64 = 32 << 20;
const QCOW_MAX_REFTABLE_SIZE: u64 = 8 << 20;
const QCOW_MAX_SNAPSHOTS: u64 = 65_536;
/// `sizeof(QCowSnapshotHeader)`: the fixed part of a snapshot table entry.
const SNAPSHOT_HEADER_MIN: u64 = 40;
/// qcow2.rst: "Must not be longer than 1023 bytes".
const MAX_BACKING_NAME: usize = 1023;
/// `sizeof(bs->backing_format)` is 16, including the NUL QEMU appends.
const MAX_BACKING_FORMAT_LEN: u64 = 15;
/// qcow2.rst "Host cluster management": table entries are u64.
const TABLE_ENTRY: u64 = 8;
/// Guest-visible sizes are whole 512-byte sectors.
const SECTOR: u64 = 512;

/// Backing chains deeper than this are refused (QEMU itself allows more).
pub const MAX_CHAIN_DEPTH: usize = 16;

/// The formats a base image (or a link in its chain) may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BaseFormat {
    Qcow2,
    Raw,
}

impl BaseFormat {
    /// The name QEMU uses (`-F`, `"driver"`, the backing format extension).
    pub fn as_str(self) -> &'static str {
        match self {
            BaseFormat::Qcow2 => "qcow2",
            BaseFormat::Raw => "raw",
        }
    }

    fn from_qemu_name(name: &str) -> Option<BaseFormat> {
        match name {
            "qcow2" => Some(BaseFormat::Qcow2),
            "raw" => Some(BaseFormat::Raw),
            _ => None,
        }
    }
}

/// A parsed qcow2 header, its extensions and backing file name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
    /// The name as stored: may be relative, may be anything a writer chose.
    pub backing_file: Option<String>,
    /// From the 0xE2792ACA extension; absent means QEMU would probe.
    pub backing_format: Option<String>,
    /// The incompatible bit or the 0x44415441 extension is present.
    pub external_data_file: bool,
}

/// A vetted base image and the chain of images below it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseInfo {
    /// Canonical path: absolute, symlinks resolved.
    pub path: PathBuf,
    pub format: BaseFormat,
    pub virtual_size: u64,
    /// Backing images below `path`, top-down; empty for a standalone image.
    pub chain: Vec<ChainLink>,
}

/// One backing image: the QEMU backend declares one `-blockdev` node per link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainLink {
    /// Canonical path: absolute, symlinks resolved.
    pub path: PathBuf,
    pub format: BaseFormat,
}

#[derive(Debug, thiserror::Error)]
pub enum QcowError {
    #[error("cannot build a qcow2 overlay: {0}")]
    BuildOverlay(String),
    #[error("cannot write overlay {path}")]
    WriteOverlay {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid qcow2 header: {0}")]
    ParseHeader(String),
    #[error("cannot open the images directory {path}")]
    OpenImagesDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read image {path}")]
    ReadImage {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("refusing image {path}: {reason}")]
    RefuseImage { path: PathBuf, reason: String },
    #[error("image {path} is outside {images_dir}; base images must be in that directory")]
    OutsideImagesDir { path: PathBuf, images_dir: PathBuf },
    #[error(
        "{image} has a backing file outside {images_dir}: {backing}; \
         images may only be backed by images in that directory"
    )]
    BackingOutsideImagesDir {
        image: PathBuf,
        backing: PathBuf,
        images_dir: PathBuf,
    },
    #[error("the backing chain of {image} loops back to {backing}")]
    BackingLoop { image: PathBuf, backing: PathBuf },
    #[error(
        "the backing chain of {image} is deeper than {MAX_CHAIN_DEPTH} images; \
         flatten it with `qemu-img convert`"
    )]
    BackingChainTooDeep { image: PathBuf },
}

/// `ReadImage` for `path`: the error for an image, or an overlay's backing
/// file, that cannot be opened, read or resolved.
fn read_error(path: &Path) -> impl FnOnce(io::Error) -> QcowError + '_ {
    move |source| QcowError::ReadImage {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod test_support {
    //! Fixtures shared by the unit tests of `overlay.rs` and `inspect.rs`.

    use std::fs;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    pub(super) const MIB: u64 = 1 << 20;
    pub(super) const GIB: u64 = 1 << 30;

    /// A scratch directory under the system temp dir, removed on drop.
    pub(super) struct TempDir(pub(super) PathBuf);

    impl TempDir {
        pub(super) fn new() -> TempDir {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let name = format!("agentlab-qcow-unit-{}-{n}", std::process::id());
            let path = std::env::temp_dir().join(name);
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            TempDir(path.canonicalize().unwrap())
        }

        pub(super) fn subdir(&self, name: &str) -> PathBuf {
            let path = self.0.join(name);
            fs::create_dir_all(&path).unwrap();
            path
        }

        pub(super) fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
            let path = self.0.join(name);
            fs::write(&path, bytes).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_format_serializes_lowercase() {
        let json = serde_json::to_string(&[BaseFormat::Qcow2, BaseFormat::Raw]).unwrap();

        assert_eq!(json, r#"["qcow2","raw"]"#);
    }
}
