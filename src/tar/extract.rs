//! Extracting an archive that arrives in chunks, safely: on the host the
//! archive comes from an untrusted guest, so this is a security boundary.
//!
//! The rules (see `ExtractOptions` for what `untrusted` adds):
//! - an entry path must be relative, free of `..`, NUL and emptiness, and at
//!   most 4096 bytes; `./` and duplicate slashes are normalized away;
//! - nothing is written through a symlink: every parent component is checked
//!   with `lstat` and must be a real directory (missing ones are created
//!   0755); an existing symlink (or fifo, socket, device) where a file,
//!   directory or link is to go is unlinked first, never followed; files are
//!   opened `O_NOFOLLOW`; an existing directory where a non-directory is to
//!   go is an error;
//! - symlink entries become symlinks with whatever target text they carry;
//!   nothing created by the archive is followed during extraction.
//!
//! Checking parents with `lstat` is enough because the guest only controls
//! the stream, not the host filesystem: the only symlinks under `dest` are
//! the ones that were there before or that this extractor made.

use std::ffi::OsStr;
use std::fs::{self, DirBuilder, File, Permissions};
use std::io::{self, BufWriter, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Timespec, Timestamps, CWD, UTIME_OMIT};

use super::read::{Entry, Event, Kind, Reader};
use super::{show_name, show_path, Meta, Stats, TarError, MAX_PATH};

/// Buffer between the stream's small chunks and each file's writes.
const WRITE_BUFFER: usize = 64 * 1024;

/// How to extract.
#[derive(Clone, Debug)]
pub struct ExtractOptions {
    /// Replace the archive's first path component with this name (docker
    /// cp: copying `dir` to a DEST that does not exist yet creates DEST).
    pub rename_root: Option<String>,
    /// Host side (the archive comes from an untrusted guest): strip
    /// setuid/setgid/sticky bits, ignore uid/gid, refuse hard links and
    /// device/fifo entries with an error. Guest side (`false`): restore
    /// uid/gid when running as root, keep mode bits.
    pub untrusted: bool,
    /// Stop with an error once more than this many entries were seen.
    pub max_entries: u64,
}

impl Default for ExtractOptions {
    /// The host side's: untrusted, at most a million entries.
    fn default() -> ExtractOptions {
        ExtractOptions {
            rename_root: None,
            untrusted: true,
            max_entries: 1_000_000,
        }
    }
}

/// Push-based extraction: `feed` chunks as they arrive, then `finish`.
///
/// After an error the extractor refuses further input; what was extracted
/// so far stays on disk, including a partially written file when the
/// stream was cut short (as `tar` leaves it).
pub struct Extractor {
    dest: PathBuf,
    opts: ExtractOptions,
    reader: Reader,
    current: Option<OpenFile>,
    /// Directories whose mode and mtime are set at `finish`.
    dirs: Vec<PendingDir>,
    /// Components (under `dest`) of the last parent verified to be a chain
    /// of real directories. A verified directory is never replaced (a
    /// non-directory entry over a directory is an error), so the next
    /// entry need only check the components past the common prefix.
    verified: Vec<PathBuf>,
    stats: Stats,
    restore_owner: bool,
    failed: bool,
}

struct OpenFile {
    file: BufWriter<File>,
    path: PathBuf,
    meta: Meta,
}

struct PendingDir {
    path: PathBuf,
    depth: usize,
    meta: Meta,
}

impl Extractor {
    /// `dest` is an existing directory (it may itself be a symlink to one);
    /// entries land under it.
    pub fn new(dest: &Path, opts: ExtractOptions) -> Result<Extractor, TarError> {
        if let Some(root) = &opts.rename_root {
            if matches!(root.as_str(), "" | "." | "..") || root.contains(['/', '\0']) {
                return Err(TarError::BadOption(format!(
                    "rename_root {:?} must be a single file name",
                    show_name(root.as_bytes())
                )));
            }
        }
        let open_err = |source| TarError::OpenDest {
            path: show_path(dest),
            source,
        };
        let dest = fs::canonicalize(dest).map_err(open_err)?;
        if !fs::metadata(&dest).map_err(open_err)?.is_dir() {
            return Err(open_err(io::ErrorKind::NotADirectory.into()));
        }
        Ok(Extractor {
            dest,
            restore_owner: !opts.untrusted && rustix::process::geteuid().is_root(),
            opts,
            reader: Reader::default(),
            current: None,
            dirs: Vec::new(),
            verified: Vec::new(),
            stats: Stats::default(),
            failed: false,
        })
    }

    /// Takes the next chunk of the archive, writing what it completes.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), TarError> {
        if self.failed {
            return Err(TarError::AfterError);
        }
        let result = self.feed_events(bytes);
        self.failed = result.is_err();
        result
    }

    /// Requires the end-of-archive marker (or a clean end right after an
    /// entry); sets directory modes and mtimes last, deepest first, so
    /// writing their contents does not disturb them; returns the stats.
    /// A stream cut short is an error and leaves a partially written file.
    pub fn finish(mut self) -> Result<Stats, TarError> {
        if self.failed {
            return Err(TarError::AfterError);
        }
        self.reader.finish()?;
        self.close_file()?;
        let mut dirs = std::mem::take(&mut self.dirs);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.depth));
        for dir in dirs {
            self.set_dir_meta(&dir)?;
        }
        Ok(self.stats)
    }

    fn feed_events(&mut self, mut bytes: &[u8]) -> Result<(), TarError> {
        while !bytes.is_empty() {
            let (used, event) = self.reader.next(bytes)?;
            bytes = &bytes[used..];
            match event {
                None => {}
                Some(Event::Data(data)) => self.write_data(data)?,
                Some(Event::Entry(entry)) => {
                    self.close_file()?;
                    self.start(entry)?;
                }
                Some(Event::End) => self.close_file()?,
            }
        }
        Ok(())
    }

    fn start(&mut self, e: Entry) -> Result<(), TarError> {
        self.stats.entries += 1;
        if self.stats.entries > self.opts.max_entries {
            return Err(TarError::TooManyEntries {
                max: self.opts.max_entries,
            });
        }
        let refuse = |reason: &str| refuse(&e.path, reason);
        let rel = relative_path(&e.path, self.opts.rename_root.as_deref()).map_err(refuse)?;
        if rel.as_os_str().is_empty() {
            // `./`, the destination itself: leave its mode and mtime alone.
            return match e.kind {
                Kind::Dir => Ok(()),
                _ => Err(refuse("the name is empty")),
            };
        }
        if let Some(why) = refused_kind(e.kind, self.opts.untrusted) {
            return Err(refuse(&why));
        }
        let target = self.check_parents(&rel, &e.path)?;
        let meta = Meta {
            mode: e.meta.mode & if self.opts.untrusted { 0o777 } else { 0o7777 },
            ..e.meta
        };
        match e.kind {
            Kind::Dir => self.make_dir(target, rel.iter().count(), meta, &e.path),
            Kind::File => self.open_file(target, meta, &e.path),
            Kind::Symlink => self.make_symlink(&target, &e, meta),
            Kind::HardLink => self.make_hard_link(&target, &e),
            _ => self.make_special(&target, &e, meta),
        }
    }

    /// Checks (and creates) every parent of `rel` under `dest`; returns the
    /// host path of `rel` itself.
    fn check_parents(&mut self, rel: &Path, raw: &[u8]) -> Result<PathBuf, TarError> {
        let parents: Vec<&OsStr> = rel.parent().map(|p| p.iter().collect()).unwrap_or_default();
        let known = self
            .verified
            .iter()
            .zip(&parents)
            .take_while(|(a, b)| a.as_os_str() == **b)
            .count();
        self.verified.truncate(known);
        let mut at = self.dest.clone();
        at.extend(&parents[..known]);
        for &part in &parents[known..] {
            at.push(part);
            match fs::symlink_metadata(&at) {
                Ok(m) if m.is_dir() => {}
                Ok(m) => {
                    let what = if m.is_symlink() {
                        "a symlink"
                    } else {
                        "not a directory"
                    };
                    let shown = show_path(at.strip_prefix(&self.dest).unwrap_or(&at));
                    return Err(refuse(raw, &format!("its parent {shown} is {what}")));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => DirBuilder::new()
                    .mode(0o755)
                    .create(&at)
                    .map_err(|source| TarError::CreateDir {
                        path: show_path(&at),
                        source,
                    })?,
                Err(source) => {
                    return Err(TarError::InspectPath {
                        path: show_path(&at),
                        source,
                    })
                }
            }
            self.verified.push(part.into());
        }
        at.extend(rel.file_name());
        Ok(at)
    }

    fn make_dir(
        &mut self,
        path: PathBuf,
        depth: usize,
        meta: Meta,
        raw: &[u8],
    ) -> Result<(), TarError> {
        if !clear_for_non_dir(&path, Clear::KeepDir, raw)? {
            // Owner rwx until `finish` sets the archive's mode, so the
            // directory's contents can be written first.
            DirBuilder::new()
                .mode(meta.mode & 0o777 | 0o700)
                .create(&path)
                .map_err(|source| TarError::CreateDir {
                    path: show_path(&path),
                    source,
                })?;
        }
        self.dirs.push(PendingDir { path, depth, meta });
        Ok(())
    }

    /// Creates or truncates the file, never through a symlink. An existing
    /// file we may not write (a read-only `.git/objects` file copied twice)
    /// is unlinked and created afresh, as `tar` does.
    fn open_file(&mut self, path: PathBuf, meta: Meta, raw: &[u8]) -> Result<(), TarError> {
        let existed = clear_for_non_dir(&path, Clear::KeepRegular, raw)?;
        let open = || {
            File::options()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                .open(&path)
        };
        let file = match open() {
            Err(e) if existed && e.kind() == io::ErrorKind::PermissionDenied => {
                fs::remove_file(&path).map_err(|source| TarError::RemoveExisting {
                    path: show_path(&path),
                    source,
                })?;
                open()
            }
            other => other,
        }
        .map_err(|source| TarError::CreateFile {
            path: show_path(&path),
            source,
        })?;
        self.current = Some(OpenFile {
            file: BufWriter::with_capacity(WRITE_BUFFER, file),
            path,
            meta,
        });
        Ok(())
    }

    fn write_data(&mut self, data: &[u8]) -> Result<(), TarError> {
        if let Some(f) = &mut self.current {
            f.file
                .write_all(data)
                .map_err(|source| TarError::WriteFile {
                    path: show_path(&f.path),
                    source,
                })?;
            self.stats.bytes += data.len() as u64;
        }
        Ok(())
    }

    /// Flushes the current file, then sets owner, mode and mtime (in that
    /// order: `chown` clears setuid bits, `chmod` leaves mtime alone).
    fn close_file(&mut self) -> Result<(), TarError> {
        let Some(OpenFile { file, path, meta }) = self.current.take() else {
            return Ok(());
        };
        let file = file.into_inner().map_err(|e| TarError::WriteFile {
            path: show_path(&path),
            source: e.into_error(),
        })?;
        let set_err = |source| TarError::SetMetadata {
            path: show_path(&path),
            source,
        };
        if self.restore_owner {
            std::os::unix::fs::fchown(&file, Some(meta.uid), Some(meta.gid)).map_err(set_err)?;
        }
        file.set_permissions(Permissions::from_mode(meta.mode))
            .map_err(set_err)?;
        rustix::fs::futimens(&file, &mtime_only(meta.mtime)).map_err(|e| set_err(e.into()))
    }

    fn make_symlink(&mut self, path: &Path, e: &Entry, meta: Meta) -> Result<(), TarError> {
        if e.link.is_empty() || e.link.contains(&0) {
            return Err(refuse(
                &e.path,
                "the symlink target is empty or contains a NUL byte",
            ));
        }
        clear_for_non_dir(path, Clear::Nothing, &e.path)?;
        std::os::unix::fs::symlink(OsStr::from_bytes(&e.link), path).map_err(|source| {
            TarError::CreateSymlink {
                path: show_path(path),
                source,
            }
        })?;
        self.set_node_meta(path, meta, false)
    }

    /// Guest side only: a hard link to an earlier entry, under `dest` too.
    fn make_hard_link(&mut self, path: &Path, e: &Entry) -> Result<(), TarError> {
        let rel = relative_path(&e.link, self.opts.rename_root.as_deref())
            .map_err(|why| refuse(&e.path, &format!("its link target: {why}")))?;
        if rel.as_os_str().is_empty() {
            return Err(refuse(&e.path, "its link target is empty"));
        }
        let source = self.check_parents(&rel, &e.path)?;
        match fs::symlink_metadata(&source) {
            Ok(m) if m.is_dir() => return Err(refuse(&e.path, "it links to a directory")),
            Ok(_) => {}
            Err(source_err) => {
                return Err(TarError::InspectPath {
                    path: show_path(&source),
                    source: source_err,
                })
            }
        }
        clear_for_non_dir(path, Clear::Nothing, &e.path)?;
        // linkat(2) without AT_SYMLINK_FOLLOW: a symlink source is linked
        // itself, not followed.
        fs::hard_link(&source, path).map_err(|source| TarError::CreateHardLink {
            path: show_path(path),
            source,
        })
    }

    /// Guest side only: device and fifo nodes.
    fn make_special(&mut self, path: &Path, e: &Entry, meta: Meta) -> Result<(), TarError> {
        use rustix::fs::FileType;
        clear_for_non_dir(path, Clear::Nothing, &e.path)?;
        let file_type = match e.kind {
            Kind::CharDevice => FileType::CharacterDevice,
            Kind::BlockDevice => FileType::BlockDevice,
            _ => FileType::Fifo,
        };
        let (major, minor) = e.device;
        let mode = rustix::fs::Mode::from_raw_mode(meta.mode & 0o777);
        rustix::fs::mknodat(
            CWD,
            path,
            file_type,
            mode,
            rustix::fs::makedev(major, minor),
        )
        .map_err(|err| TarError::CreateSpecial {
            path: show_path(path),
            source: err.into(),
        })?;
        self.set_node_meta(path, meta, true)
    }

    /// Owner, mode and mtime by path, never following a symlink (Linux has
    /// no `lchmod`: `chmod` is only asked for nodes that are not symlinks).
    fn set_node_meta(&self, path: &Path, meta: Meta, chmod: bool) -> Result<(), TarError> {
        let set_err = |source| TarError::SetMetadata {
            path: show_path(path),
            source,
        };
        if self.restore_owner {
            std::os::unix::fs::lchown(path, Some(meta.uid), Some(meta.gid)).map_err(set_err)?;
        }
        if chmod {
            let mode = rustix::fs::Mode::from_raw_mode(meta.mode);
            rustix::fs::chmodat(CWD, path, mode, AtFlags::empty())
                .map_err(|e| set_err(e.into()))?;
        }
        rustix::fs::utimensat(
            CWD,
            path,
            &mtime_only(meta.mtime),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| set_err(e.into()))
    }

    fn set_dir_meta(&self, dir: &PendingDir) -> Result<(), TarError> {
        let is_dir = fs::symlink_metadata(&dir.path).is_ok_and(|m| m.is_dir());
        if !is_dir {
            return Err(TarError::SetMetadata {
                path: show_path(&dir.path),
                source: io::ErrorKind::NotADirectory.into(),
            });
        }
        self.set_node_meta(&dir.path, dir.meta, true)
    }
}

/// What `clear_for_non_dir` leaves in place.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Clear {
    /// An existing directory is kept (a directory entry over one).
    KeepDir,
    /// An existing regular file is kept, to be truncated.
    KeepRegular,
    Nothing,
}

/// Makes room at `path`: unlinks what is there unless `keep` says to keep
/// it (never following a symlink); an existing directory is an error unless
/// kept. Returns whether something was kept.
fn clear_for_non_dir(path: &Path, keep: Clear, raw: &[u8]) -> Result<bool, TarError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() && keep == Clear::KeepDir => Ok(true),
        Ok(m) if m.is_dir() => Err(refuse(raw, "a directory exists at that path")),
        Ok(m) if m.is_file() && keep == Clear::KeepRegular => Ok(true),
        Ok(_) => fs::remove_file(path)
            .map(|()| false)
            .map_err(|source| TarError::RemoveExisting {
                path: show_path(path),
                source,
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(TarError::InspectPath {
            path: show_path(path),
            source,
        }),
    }
}

/// Why entries of `kind` are not extracted, if they are not.
fn refused_kind(kind: Kind, untrusted: bool) -> Option<String> {
    match kind {
        Kind::HardLink if untrusted => {
            Some("hard links are not extracted from an untrusted archive".into())
        }
        Kind::CharDevice | Kind::BlockDevice | Kind::Fifo if untrusted => {
            Some("devices and fifos are not extracted from an untrusted archive".into())
        }
        Kind::Unsupported(t) => Some(format!("unsupported entry type {:?}", char::from(t))),
        _ => None,
    }
}

fn refuse(raw: &[u8], reason: &str) -> TarError {
    TarError::RefuseEntry {
        path: show_name(raw),
        reason: reason.into(),
    }
}

/// The checked, normalized relative path of an archive name, with the first
/// component replaced by `rename_root`. Empty for `./`.
fn relative_path(raw: &[u8], rename_root: Option<&str>) -> Result<PathBuf, &'static str> {
    if raw.is_empty() {
        return Err("the name is empty");
    }
    if raw.len() > MAX_PATH {
        return Err("the name is longer than 4096 bytes");
    }
    if raw.contains(&0) {
        return Err("the name contains a NUL byte");
    }
    if raw.starts_with(b"/") {
        return Err("the name is an absolute path");
    }
    let mut rel = PathBuf::new();
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("the name has a `..` component"),
            _ if rel.as_os_str().is_empty() && rename_root.is_some() => {
                rel.push(rename_root.unwrap_or_default());
            }
            _ => rel.push(OsStr::from_bytes(part)),
        }
    }
    Ok(rel)
}

/// Timestamps that set mtime and leave atime alone.
fn mtime_only(mtime: i64) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_OMIT,
        },
        last_modification: Timespec {
            tv_sec: mtime,
            tv_nsec: 0,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::super::testdir::TempDir;
    use super::super::write::{encode_headers, TarWriter};
    use super::super::{read::padding, BLOCK, CHKSUM, NAME};
    use super::*;
    use crate::testutil::XorShift;
    use std::os::unix::fs::MetadataExt;

    const META: Meta = Meta {
        mode: 0o644,
        mtime: 1_600_000_000,
        uid: 1234,
        gid: 5678,
    };
    const DIR: Meta = Meta {
        mode: 0o755,
        ..META
    };

    fn writer() -> TarWriter<Vec<u8>> {
        TarWriter::new(Vec::new())
    }

    fn file(w: &mut TarWriter<Vec<u8>>, path: &str, data: &[u8]) {
        w.append_file(path, &META, data.len() as u64, &mut &data[..])
            .unwrap();
    }

    /// A header that `TarWriter` would not write: any name bytes, any type.
    fn raw_entry(name: &[u8], typeflag: u8, link: &str) -> Vec<u8> {
        let mut b = encode_headers("placeholder", typeflag, &META, 0, link).unwrap();
        b[NAME.0..NAME.0 + NAME.1].fill(0);
        b[NAME.0..NAME.0 + name.len()].copy_from_slice(name);
        let block: &mut [u8; BLOCK] = (&mut b[..BLOCK]).try_into().unwrap();
        let (sum, _) = super::super::read::checksums(block);
        b[CHKSUM.0..CHKSUM.0 + 8].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        b
    }

    fn end() -> Vec<u8> {
        vec![0; 2 * BLOCK]
    }

    fn extract_with(archive: &[u8], dest: &Path, opts: ExtractOptions) -> Result<Stats, TarError> {
        let mut x = Extractor::new(dest, opts)?;
        x.feed(archive)?;
        x.finish()
    }

    fn extract(archive: &[u8], dest: &Path) -> Result<Stats, TarError> {
        extract_with(archive, dest, ExtractOptions::default())
    }

    /// (path, kind, mode, mtime, contents or target) for every node under `root`.
    fn tree(root: &Path) -> Vec<(String, String, u32, i64, Vec<u8>)> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let m = fs::symlink_metadata(&path).unwrap();
                let rel = path.strip_prefix(root).unwrap().display().to_string();
                let (kind, body) = if m.is_symlink() {
                    (
                        "symlink",
                        fs::read_link(&path).unwrap().into_os_string().into_vec(),
                    )
                } else if m.is_dir() {
                    stack.push(path.clone());
                    ("dir", Vec::new())
                } else {
                    ("file", fs::read(&path).unwrap())
                };
                out.push((rel, kind.to_string(), m.mode() & 0o7777, m.mtime(), body));
            }
        }
        out.sort();
        out
    }
    use std::os::unix::ffi::OsStringExt;

    #[test]
    fn extracts_dirs_files_and_symlinks_with_modes_and_mtimes() {
        let tmp = TempDir::new("basic");
        let mut w = writer();
        w.append_dir(
            "d",
            &Meta {
                mode: 0o750,
                mtime: 1000,
                ..META
            },
        )
        .unwrap();
        file(&mut w, "d/f", b"data");
        w.append_symlink(
            "d/l",
            "../nowhere",
            &Meta {
                mtime: 2000,
                ..META
            },
        )
        .unwrap();

        let stats = extract(&w.finish().unwrap(), tmp.path()).unwrap();

        assert_eq!(
            stats,
            Stats {
                entries: 3,
                bytes: 4
            }
        );
        assert_eq!(
            tree(tmp.path()),
            [
                ("d".into(), "dir".into(), 0o750, 1000, vec![]),
                (
                    "d/f".into(),
                    "file".into(),
                    0o644,
                    META.mtime,
                    b"data".to_vec()
                ),
                (
                    "d/l".into(),
                    "symlink".into(),
                    0o777,
                    2000,
                    b"../nowhere".to_vec()
                ),
            ]
        );
    }

    #[test]
    fn absolute_path_is_refused() {
        let tmp = TempDir::new("abs");
        let mut w = writer();
        file(&mut w, "/etc/evil", b"x");

        let err = extract(&w.finish().unwrap(), tmp.path()).unwrap_err();

        assert_eq!(
            err.to_string(),
            "refusing archive entry /etc/evil: the name is an absolute path"
        );
    }

    #[test]
    fn dotdot_component_is_refused() {
        let tmp = TempDir::new("dotdot");
        let mut w = writer();
        file(&mut w, "a/../../evil", b"x");

        let err = extract(&w.finish().unwrap(), tmp.path()).unwrap_err();

        assert_eq!(
            err.to_string(),
            "refusing archive entry a/../../evil: the name has a `..` component"
        );
    }

    #[test]
    fn empty_name_is_refused() {
        let tmp = TempDir::new("empty");
        let archive = [raw_entry(b"", b'0', ""), end()].concat();

        let err = extract(&archive, tmp.path()).unwrap_err();

        assert_eq!(
            err.to_string(),
            "refusing archive entry (empty name): the name is empty"
        );
    }

    #[test]
    fn nul_in_a_pax_path_is_refused() {
        let tmp = TempDir::new("nul");
        let records = b"14 path=a\0bcd\n";
        let mut pax = raw_entry(b"pax", b'x', "");
        pax[124..136].copy_from_slice(format!("{:011o}\0", records.len()).as_bytes());
        let fixed = raw_entry_fix(pax);
        let archive = [
            fixed,
            records.to_vec(),
            vec![0; padding(14) as usize],
            raw_entry(b"f", b'0', ""),
            end(),
        ]
        .concat();

        let err = extract(&archive, tmp.path()).unwrap_err();

        assert_eq!(
            err.to_string(),
            "refusing archive entry a\\u{0}bcd: the name contains a NUL byte"
        );
    }

    fn raw_entry_fix(mut b: Vec<u8>) -> Vec<u8> {
        let block: &mut [u8; BLOCK] = (&mut b[..BLOCK]).try_into().unwrap();
        let (sum, _) = super::super::read::checksums(block);
        b[CHKSUM.0..CHKSUM.0 + 8].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        b
    }

    #[test]
    fn name_longer_than_4096_bytes_is_refused() {
        let tmp = TempDir::new("long");
        let mut w = writer();
        file(&mut w, &format!("{}f", "a/".repeat(2100)), b"x");

        let err = extract(&w.finish().unwrap(), tmp.path()).unwrap_err();

        assert!(
            err.to_string()
                .ends_with("the name is longer than 4096 bytes"),
            "{err}"
        );
    }

    #[test]
    fn symlink_parent_traversal_is_refused() {
        let tmp = TempDir::new("traverse");
        let (dest, outside) = (tmp.path().join("dest"), tmp.path().join("outside"));
        fs::create_dir_all(&dest).unwrap();
        fs::create_dir_all(&outside).unwrap();
        let mut w = writer();
        w.append_symlink("link", outside.to_str().unwrap(), &META)
            .unwrap();
        file(&mut w, "link/evil", b"x");

        let err = extract(&w.finish().unwrap(), &dest).unwrap_err();

        assert_eq!(
            err.to_string(),
            "refusing archive entry link/evil: its parent link is a symlink"
        );
        assert!(!outside.join("evil").exists());
    }

    #[test]
    fn file_over_an_existing_symlink_replaces_the_link_and_does_not_follow_it() {
        let tmp = TempDir::new("oversym");
        let (dest, victim) = (tmp.path().join("dest"), tmp.path().join("victim"));
        fs::create_dir_all(&dest).unwrap();
        fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, dest.join("f")).unwrap();
        let mut w = writer();
        file(&mut w, "f", b"new");

        extract(&w.finish().unwrap(), &dest).unwrap();

        assert!(fs::symlink_metadata(dest.join("f")).unwrap().is_file());
        assert_eq!(
            (
                fs::read(dest.join("f")).unwrap(),
                fs::read(&victim).unwrap()
            ),
            (b"new".to_vec(), b"keep".to_vec())
        );
    }

    #[test]
    fn symlink_then_file_of_the_same_name_in_one_archive_does_not_follow() {
        let tmp = TempDir::new("symthenfile");
        let (dest, victim) = (tmp.path().join("dest"), tmp.path().join("victim"));
        fs::create_dir_all(&dest).unwrap();
        fs::write(&victim, b"keep").unwrap();
        let mut w = writer();
        w.append_symlink("f", victim.to_str().unwrap(), &META)
            .unwrap();
        file(&mut w, "f", b"new");

        extract(&w.finish().unwrap(), &dest).unwrap();

        assert_eq!(fs::read(&victim).unwrap(), b"keep");
    }

    #[test]
    fn read_only_existing_file_is_replaced() {
        let tmp = TempDir::new("readonly");
        let old = tmp.path().join("f");
        fs::write(&old, b"old contents").unwrap();
        fs::set_permissions(&old, Permissions::from_mode(0o444)).unwrap();
        let mut w = writer();
        file(&mut w, "f", b"new");

        extract(&w.finish().unwrap(), tmp.path()).unwrap();

        let m = fs::metadata(&old).unwrap();
        assert_eq!(
            (fs::read(&old).unwrap(), m.mode() & 0o777),
            (b"new".to_vec(), 0o644)
        );
    }

    #[test]
    fn file_over_an_existing_directory_is_refused() {
        let tmp = TempDir::new("overdir");
        fs::create_dir(tmp.path().join("d")).unwrap();
        let mut w = writer();
        file(&mut w, "d", b"x");

        let err = extract(&w.finish().unwrap(), tmp.path()).unwrap_err();

        assert_eq!(
            err.to_string(),
            "refusing archive entry d: a directory exists at that path"
        );
    }

    #[test]
    fn device_entry_is_refused_when_untrusted() {
        let tmp = TempDir::new("dev");
        let archive = [raw_entry(b"null", b'3', ""), end()].concat();

        let err = extract(&archive, tmp.path()).unwrap_err();

        assert_eq!(err.to_string(), "refusing archive entry null: devices and fifos are not extracted from an untrusted archive");
    }

    #[test]
    fn hard_link_is_refused_when_untrusted() {
        let tmp = TempDir::new("hardlink");
        let archive = [raw_entry(b"h", b'1', "f"), end()].concat();

        let err = extract(&archive, tmp.path()).unwrap_err();

        assert_eq!(
            err.to_string(),
            "refusing archive entry h: hard links are not extracted from an untrusted archive"
        );
    }

    #[test]
    fn hard_link_is_created_when_trusted() {
        let tmp = TempDir::new("hardlinkok");
        let mut w = writer();
        file(&mut w, "f", b"x");
        let archive = [
            w.finish().unwrap()[..2 * BLOCK].to_vec(),
            raw_entry(b"h", b'1', "f"),
            end(),
        ]
        .concat();
        let opts = ExtractOptions {
            untrusted: false,
            ..ExtractOptions::default()
        };

        extract_with(&archive, tmp.path(), opts).unwrap();

        assert_eq!(
            fs::metadata(tmp.path().join("h")).unwrap().ino(),
            fs::metadata(tmp.path().join("f")).unwrap().ino()
        );
    }

    #[test]
    fn unsupported_entry_type_is_refused() {
        let tmp = TempDir::new("sparse");
        let archive = [raw_entry(b"s", b'S', ""), end()].concat();

        let err = extract(&archive, tmp.path()).unwrap_err();

        assert_eq!(
            err.to_string(),
            "refusing archive entry s: unsupported entry type 'S'"
        );
    }

    #[test]
    fn too_many_entries_is_an_error() {
        let tmp = TempDir::new("many");
        let mut w = writer();
        file(&mut w, "a", b"");
        file(&mut w, "b", b"");
        file(&mut w, "c", b"");
        let opts = ExtractOptions {
            max_entries: 2,
            ..ExtractOptions::default()
        };

        let err = extract_with(&w.finish().unwrap(), tmp.path(), opts).unwrap_err();

        assert_eq!(
            err.to_string(),
            "the archive has more than 2 entries; refusing the rest"
        );
    }

    #[test]
    fn truncated_stream_is_an_error_and_keeps_the_partial_file() {
        let tmp = TempDir::new("trunc");
        let mut w = writer();
        file(&mut w, "f", &[7; 1000]);
        let archive = w.finish().unwrap();
        let mut x = Extractor::new(tmp.path(), ExtractOptions::default()).unwrap();
        x.feed(&archive[..BLOCK + 600]).unwrap();

        let err = x.finish().unwrap_err();

        assert_eq!(
            err.to_string(),
            "the archive ends in the middle of entry f (byte 1112); the stream was cut short"
        );
        assert!(fs::metadata(tmp.path().join("f")).unwrap().len() > 0);
    }

    #[test]
    fn feed_after_an_error_is_refused() {
        let tmp = TempDir::new("after");
        let mut x = Extractor::new(tmp.path(), ExtractOptions::default()).unwrap();
        let _ = x.feed(&raw_entry(b"/abs", b'0', ""));

        let err = x.feed(&end()).unwrap_err();

        assert!(matches!(err, TarError::AfterError), "{err}");
    }

    #[test]
    fn setuid_and_sticky_bits_are_stripped_when_untrusted() {
        let tmp = TempDir::new("suid");
        let mut w = writer();
        w.append_file(
            "f",
            &Meta {
                mode: 0o4755,
                ..META
            },
            0,
            &mut io::empty(),
        )
        .unwrap();
        w.append_dir(
            "d",
            &Meta {
                mode: 0o1777,
                ..META
            },
        )
        .unwrap();

        extract(&w.finish().unwrap(), tmp.path()).unwrap();

        let mode = |p: &str| fs::metadata(tmp.path().join(p)).unwrap().mode() & 0o7777;
        assert_eq!((mode("f"), mode("d")), (0o755, 0o777));
    }

    #[test]
    fn setuid_bit_is_kept_when_trusted() {
        let tmp = TempDir::new("suidok");
        let mut w = writer();
        w.append_file(
            "f",
            &Meta {
                mode: 0o4755,
                uid: rustix::process::geteuid().as_raw(),
                gid: rustix::process::getegid().as_raw(),
                ..META
            },
            0,
            &mut io::empty(),
        )
        .unwrap();
        let opts = ExtractOptions {
            untrusted: false,
            ..ExtractOptions::default()
        };

        extract_with(&w.finish().unwrap(), tmp.path(), opts).unwrap();

        assert_eq!(
            fs::metadata(tmp.path().join("f")).unwrap().mode() & 0o7777,
            0o4755
        );
    }

    #[test]
    fn read_only_directory_is_filled_before_its_mode_is_set() {
        let tmp = TempDir::new("rodir");
        let mut w = writer();
        w.append_dir(
            "ro",
            &Meta {
                mode: 0o555,
                ..META
            },
        )
        .unwrap();
        file(&mut w, "ro/f", b"x");

        extract(&w.finish().unwrap(), tmp.path()).unwrap();

        let m = fs::metadata(tmp.path().join("ro")).unwrap();
        assert_eq!((m.mode() & 0o777, m.mtime()), (0o555, META.mtime));
    }

    #[test]
    fn directory_mtime_survives_contents_that_come_after_it() {
        let tmp = TempDir::new("dirmtime");
        let mut w = writer();
        w.append_dir("d", &Meta { mtime: 42, ..DIR }).unwrap();
        w.append_dir("d/e", &Meta { mtime: 43, ..DIR }).unwrap();
        file(&mut w, "d/e/f", b"x");

        extract(&w.finish().unwrap(), tmp.path()).unwrap();

        let mtime = |p: &str| fs::metadata(tmp.path().join(p)).unwrap().mtime();
        assert_eq!((mtime("d"), mtime("d/e")), (42, 43));
    }

    #[test]
    fn rename_root_replaces_the_first_component() {
        let tmp = TempDir::new("rename");
        let mut w = writer();
        w.append_dir("./src", &DIR).unwrap();
        file(&mut w, "src/a", b"x");
        let opts = ExtractOptions {
            rename_root: Some("dst".into()),
            ..ExtractOptions::default()
        };

        extract_with(&w.finish().unwrap(), tmp.path(), opts).unwrap();

        assert_eq!(fs::read(tmp.path().join("dst/a")).unwrap(), b"x");
    }

    #[test]
    fn rename_root_with_a_slash_is_a_bad_option() {
        let tmp = TempDir::new("renamebad");
        let opts = ExtractOptions {
            rename_root: Some("../x".into()),
            ..ExtractOptions::default()
        };

        let err = Extractor::new(tmp.path(), opts).err().unwrap();

        assert!(matches!(err, TarError::BadOption(_)), "{err}");
    }

    #[test]
    fn dot_slash_entry_leaves_the_destination_alone() {
        let tmp = TempDir::new("dotslash");
        let before = fs::metadata(tmp.path()).unwrap().mode();
        let mut w = writer();
        w.append_dir(
            ".",
            &Meta {
                mode: 0o700,
                ..META
            },
        )
        .unwrap();
        file(&mut w, "./a//b", b"x");

        extract(&w.finish().unwrap(), tmp.path()).unwrap();

        assert_eq!(fs::metadata(tmp.path()).unwrap().mode(), before);
        assert_eq!(fs::read(tmp.path().join("a/b")).unwrap(), b"x");
    }

    #[test]
    fn feeding_one_byte_at_a_time_gives_the_same_tree_as_whole() {
        let (whole, bytewise) = (TempDir::new("whole"), TempDir::new("bytewise"));
        let mut w = writer();
        w.append_dir("日本 dir", &DIR).unwrap();
        file(&mut w, &format!("日本 dir/{}", "x".repeat(150)), &[9; 1500]);
        w.append_symlink("日本 dir/l", "target", &META).unwrap();
        let archive = w.finish().unwrap();
        let mut x = Extractor::new(bytewise.path(), ExtractOptions::default()).unwrap();

        extract(&archive, whole.path()).unwrap();
        archive
            .iter()
            .try_for_each(|b| x.feed(std::slice::from_ref(b)))
            .unwrap();
        let stats = x.finish().unwrap();

        assert_eq!(
            stats,
            Stats {
                entries: 3,
                bytes: 1500
            }
        );
        assert_eq!(tree(whole.path()), tree(bytewise.path()));
    }

    #[test]
    fn mutated_archives_never_panic_or_escape_the_destination() {
        let tmp = TempDir::new("mutate");
        let mut w = writer();
        w.append_dir("d", &META).unwrap();
        file(&mut w, "d/f", &[1; 700]);
        w.append_symlink("d/l", "..", &META).unwrap();
        w.append_symlink("up", "../outside", &META).unwrap();
        file(&mut w, &format!("d/{}", "é".repeat(80)), b"u");
        let base = w.finish().unwrap();
        let mut rng = XorShift(0x7a11_5eed);
        for round in 0..3000 {
            let mut archive = base.clone();
            for _ in 0..=rng.below(4) {
                let at = rng.below(archive.len());
                archive[at] = rng.next() as u8;
            }
            archive.truncate(archive.len() - rng.below(300));
            let dest = tmp.path().join(format!("r{round}"));
            fs::create_dir(&dest).unwrap();
            let mut x = Extractor::new(
                &dest,
                ExtractOptions {
                    max_entries: 50,
                    ..ExtractOptions::default()
                },
            )
            .unwrap();
            let cut = rng.below(archive.len());
            let _ = x
                .feed(&archive[..cut])
                .and_then(|()| x.feed(&archive[cut..]))
                .and_then(|()| x.finish());
        }

        let names: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            names.iter().all(|n| n.to_string_lossy().starts_with('r')),
            "{names:?}"
        );
        assert_eq!(names.len(), 3000);
    }
}
