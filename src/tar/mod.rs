//! Tar archives for `agentlab cp`: file trees travel between host and guest
//! as one tar stream over the guest-agent channel.
//!
//! Owns the tar format (writing POSIX ustar with PAX extended headers where
//! ustar falls short; reading ustar, PAX, GNU and v7 headers), packing a
//! host or guest tree into an archive, and extracting an archive that
//! arrives in chunks. It does not own the transport (`qga`), progress
//! display or the `cp` command's DEST rules beyond `rename_root`.
//!
//! Spec: POSIX.1-2017 `pax` "ustar Interchange Format" and "pax Extended
//! Header"; GNU tar's `tar.h` for `L`/`K` long names and base-256 numbers.
//!
//! The layout:
//! - `read`     the push parser: bytes in, entries and data out (pure)
//! - `write`    `TarWriter` (header encoding) and `pack_path` (tree walk)
//! - `extract`  `Extractor`, the safe writer of entries to disk
//!
//! On the host the archive comes from an untrusted guest: `extract` is a
//! security boundary, and `read` is a parser of untrusted bytes (fuzz target
//! `fuzz/fuzz_targets/tar_extract.rs`).

mod extract;
mod read;
mod write;

use std::io;

pub use extract::{ExtractOptions, Extractor};
pub use write::{pack_path, TarWriter};

/// Archives are made of 512-byte blocks (POSIX "ustar Interchange Format").
const BLOCK: usize = 512;
/// Longest entry path accepted on extraction (Linux `PATH_MAX`).
const MAX_PATH: usize = 4096;
/// Cap on a PAX extended header or a GNU long name/link record: the record
/// is buffered whole, so its size field is checked against this first.
const MAX_META_RECORD: u64 = 64 * 1024;

// Header field offsets and lengths (POSIX `pax`, "ustar Interchange Format",
// table "ustar Header Block").
const NAME: (usize, usize) = (0, 100);
const MODE: (usize, usize) = (100, 8);
const UID: (usize, usize) = (108, 8);
const GID: (usize, usize) = (116, 8);
const SIZE: (usize, usize) = (124, 12);
const MTIME: (usize, usize) = (136, 12);
const CHKSUM: (usize, usize) = (148, 8);
const TYPEFLAG: usize = 156;
const LINKNAME: (usize, usize) = (157, 100);
const MAGIC: (usize, usize) = (257, 6);
const VERSION: (usize, usize) = (263, 2);
const DEVMAJOR: (usize, usize) = (329, 8);
const DEVMINOR: (usize, usize) = (337, 8);
const PREFIX: (usize, usize) = (345, 155);

/// POSIX ustar magic and version.
const USTAR_MAGIC: &[u8; 6] = b"ustar\0";
const USTAR_VERSION: &[u8; 2] = b"00";

// Typeflags (POSIX, plus GNU `tar.h` for `L` and `K`).
const REGTYPE: u8 = b'0';
const AREGTYPE: u8 = b'\0';
const LNKTYPE: u8 = b'1';
const SYMTYPE: u8 = b'2';
const CHRTYPE: u8 = b'3';
const BLKTYPE: u8 = b'4';
const DIRTYPE: u8 = b'5';
const FIFOTYPE: u8 = b'6';
const CONTTYPE: u8 = b'7';
const PAX_EXTENDED: u8 = b'x';
const PAX_GLOBAL: u8 = b'g';
const GNU_LONGNAME: u8 = b'L';
const GNU_LONGLINK: u8 = b'K';

/// Largest value of an 11-digit octal field (`size`, `mtime`): 8 GiB - 1.
const MAX_OCTAL_11: u64 = 0o777_7777_7777;
/// Largest value of a 7-digit octal field (`mode`, `uid`, `gid`).
const MAX_OCTAL_7: u64 = 0o777_7777;

/// What an entry carries besides its name and data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits including setuid/setgid/sticky (`& 0o7777`).
    pub mode: u32,
    /// Modification time, Unix seconds.
    pub mtime: i64,
    pub uid: u32,
    pub gid: u32,
}

impl Meta {
    pub fn from_metadata(m: &std::fs::Metadata) -> Meta {
        use std::os::unix::fs::MetadataExt;
        Meta {
            mode: m.mode() & 0o7777,
            mtime: m.mtime(),
            uid: m.uid(),
            gid: m.gid(),
        }
    }
}

/// Entries and file-data bytes packed or extracted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub entries: u64,
    pub bytes: u64,
}

/// What went wrong packing or extracting. Archive paths come from the peer
/// and are shown through [`show_name`]; host paths through [`show_path`].
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("cannot write the archive entry {path}")]
    WriteArchive {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot add {path} to the archive: {reason}")]
    EncodeEntry { path: String, reason: String },
    #[error("cannot read {path}")]
    ReadTree {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the data for archive entry {path}")]
    ReadData {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path} changed while it was packed: expected {expected} bytes, {found}")]
    FileChanged {
        path: String,
        expected: u64,
        found: String,
    },
    #[error("bad tar header at byte {offset}: {reason}")]
    ParseHeader { offset: u64, reason: String },
    #[error("the archive ends in the middle of {what} (byte {offset}); the stream was cut short")]
    Truncated { offset: u64, what: String },
    #[error("refusing archive entry {path}: {reason}")]
    RefuseEntry { path: String, reason: String },
    #[error("the archive has more than {max} entries; refusing the rest")]
    TooManyEntries { max: u64 },
    #[error("cannot extract into {path}")]
    OpenDest {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("invalid extract option: {0}")]
    BadOption(String),
    #[error("cannot inspect {path}")]
    InspectPath {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove {path} to replace it")]
    RemoveExisting {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot create directory {path}")]
    CreateDir {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot create file {path}")]
    CreateFile {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot write file {path}")]
    WriteFile {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot create symlink {path}")]
    CreateSymlink {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot create hard link {path}")]
    CreateHardLink {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot create special file {path}")]
    CreateSpecial {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot set owner, mode or mtime of {path}")]
    SetMetadata {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("the extractor already failed; start a new one")]
    AfterError,
}

/// An archive name as bytes, made safe to print: lossy UTF-8, control and
/// bidi characters escaped (the peer chooses names; they must not drive the
/// user's terminal), cut at 256 characters.
pub(crate) fn show_name(name: &[u8]) -> String {
    const MAX_SHOWN: usize = 256;
    if name.is_empty() {
        return "(empty name)".into();
    }
    let mut out = String::new();
    for (i, c) in String::from_utf8_lossy(name).chars().enumerate() {
        if i == MAX_SHOWN {
            out.push('…');
            break;
        }
        let bidi = matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}');
        if c.is_control() || bidi {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A host path made safe to print; its tail came from the archive.
pub(crate) fn show_path(path: &std::path::Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    show_name(path.as_os_str().as_bytes())
}

#[cfg(test)]
pub(crate) mod testdir {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A unique directory under the system temp dir, removed on drop.
    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> TempDir {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path =
                std::env::temp_dir().join(format!("agentlab-tar-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).expect("create temp dir");
            TempDir(path)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            make_writable(&self.0);
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Extracted directories may be read-only; open them up so removal works
    /// for a non-root user too.
    fn make_writable(dir: &Path) {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                make_writable(&entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_name_escapes_control_and_bidi_characters() {
        let shown = show_name(b"a\x1b[31mb\xe2\x80\xaec\xff");

        assert_eq!(shown, "a\\u{1b}[31mb\\u{202e}c\u{FFFD}");
    }

    #[test]
    fn show_name_cuts_long_names() {
        let shown = show_name(&[b'a'; 300]);

        assert_eq!(shown.chars().count(), 257);
    }
}
