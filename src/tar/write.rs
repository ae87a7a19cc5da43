//! Writing archives: `TarWriter` encodes POSIX ustar headers, adding a PAX
//! extended header (`x`) for what ustar cannot hold (a path or link target
//! that is not ASCII or does not fit the name/prefix split, a size of 8 GiB
//! or more, an mtime outside 0..=8^11-1, a uid/gid over 8^7-1), and streams
//! file data. `pack_path` walks a tree into a `TarWriter`.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use super::read::padding;
use super::{
    show_name, show_path, Meta, Stats, TarError, BLOCK, CHKSUM, DEVMAJOR, DEVMINOR, DIRTYPE, GID,
    LINKNAME, MAGIC, MAX_OCTAL_11, MAX_OCTAL_7, MODE, MTIME, NAME, PAX_EXTENDED, PREFIX, REGTYPE,
    SIZE, SYMTYPE, TYPEFLAG, UID, USTAR_MAGIC, USTAR_VERSION, VERSION,
};

/// Chunk size for streaming file data.
const COPY_CHUNK: usize = 64 * 1024;
/// Name of our PAX headers' own entries (what a reader without PAX shows).
const PAX_HEADER_NAME: &str = "././@PaxHeader";

/// Streams entries into `W` as a POSIX ustar (+PAX) archive.
pub struct TarWriter<W: Write> {
    w: W,
    buf: Vec<u8>,
}

impl<W: Write> TarWriter<W> {
    pub fn new(w: W) -> Self {
        TarWriter {
            w,
            buf: vec![0; COPY_CHUNK],
        }
    }

    /// Adds a directory; the archive name gets a trailing `/`.
    pub fn append_dir(&mut self, path: &str, meta: &Meta) -> Result<(), TarError> {
        let name = format!("{}/", path.trim_end_matches('/'));
        let headers = encode_headers(&name, DIRTYPE, meta, 0, "")?;
        self.put(&name, &headers)
    }

    /// Adds a regular file of `size` bytes read from `data`. Fails if `data`
    /// yields fewer or more bytes (a file that changed while it was packed);
    /// the archive is then unusable and should be abandoned.
    pub fn append_file(
        &mut self,
        path: &str,
        meta: &Meta,
        size: u64,
        data: &mut dyn Read,
    ) -> Result<(), TarError> {
        if path.ends_with('/') {
            return Err(encode_error(path, "a file name cannot end in '/'"));
        }
        let headers = encode_headers(path, REGTYPE, meta, size, "")?;
        self.put(path, &headers)?;
        let mut remaining = size;
        while remaining > 0 {
            let want = remaining.min(COPY_CHUNK as u64) as usize;
            let n = match data.read(&mut self.buf[..want]) {
                Ok(0) => {
                    return Err(changed(
                        path,
                        size,
                        format!("but it ended after {}", size - remaining),
                    ))
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_error(path, e)),
            };
            self.w
                .write_all(&self.buf[..n])
                .map_err(|e| write_error(path, e))?;
            remaining -= n as u64;
        }
        loop {
            match data.read(&mut self.buf[..1]) {
                Ok(0) => break,
                Ok(_) => return Err(changed(path, size, "but it has more".into())),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_error(path, e)),
            }
        }
        let zeros = [0u8; BLOCK];
        self.put(path, &zeros[..padding(size) as usize])
    }

    /// Adds a symlink to `target` (stored as text, never resolved).
    pub fn append_symlink(
        &mut self,
        path: &str,
        target: &str,
        meta: &Meta,
    ) -> Result<(), TarError> {
        if target.is_empty() {
            return Err(encode_error(path, "the symlink target is empty"));
        }
        let headers = encode_headers(path, SYMTYPE, meta, 0, target)?;
        self.put(path, &headers)
    }

    /// Writes the end-of-archive marker (two zero blocks), flushes, and
    /// returns the inner writer.
    pub fn finish(mut self) -> Result<W, TarError> {
        let end = "end-of-archive marker";
        self.put(end, &[0u8; 2 * BLOCK])?;
        self.w.flush().map_err(|e| write_error(end, e))?;
        Ok(self.w)
    }

    fn put(&mut self, path: &str, bytes: &[u8]) -> Result<(), TarError> {
        self.w.write_all(bytes).map_err(|e| write_error(path, e))
    }
}

fn write_error(path: &str, source: io::Error) -> TarError {
    TarError::WriteArchive {
        path: show_name(path.as_bytes()),
        source,
    }
}

fn read_error(path: &str, source: io::Error) -> TarError {
    TarError::ReadData {
        path: show_name(path.as_bytes()),
        source,
    }
}

fn encode_error(path: &str, reason: &str) -> TarError {
    TarError::EncodeEntry {
        path: show_name(path.as_bytes()),
        reason: reason.into(),
    }
}

fn changed(path: &str, expected: u64, found: String) -> TarError {
    TarError::FileChanged {
        path: show_name(path.as_bytes()),
        expected,
        found,
    }
}

/// The header blocks for one entry: a PAX `x` header with its records when
/// ustar cannot hold the values, then the ustar header. Pure.
pub(super) fn encode_headers(
    name: &str,
    typeflag: u8,
    meta: &Meta,
    size: u64,
    link: &str,
) -> Result<Vec<u8>, TarError> {
    if name.is_empty() || name == "/" {
        return Err(encode_error(name, "the name is empty"));
    }
    if name.contains('\0') || link.contains('\0') {
        return Err(encode_error(name, "a name cannot contain a NUL byte"));
    }
    let mut pax = Vec::new();
    let (name_field, prefix_field) = match split_ustar(name) {
        Some(split) => split,
        None => {
            pax_record(&mut pax, "path", name.as_bytes());
            (ascii_tail(name, NAME.1), String::new())
        }
    };
    let link_field = if link.is_ascii() && link.len() <= LINKNAME.1 {
        link.to_string()
    } else {
        pax_record(&mut pax, "linkpath", link.as_bytes());
        ascii_tail(link, LINKNAME.1)
    };
    let mut fields = Fields {
        name: name_field,
        prefix: prefix_field,
        link: link_field,
        typeflag,
        mode: meta.mode & 0o7777,
        uid: meta.uid,
        gid: meta.gid,
        size,
        mtime: meta.mtime,
    };
    fields.fit_numbers(&mut pax);
    let mut out = Vec::new();
    if !pax.is_empty() {
        let pax_fields = Fields {
            name: PAX_HEADER_NAME.into(),
            prefix: String::new(),
            link: String::new(),
            typeflag: PAX_EXTENDED,
            mode: 0o644,
            size: pax.len() as u64,
            ..fields.clone()
        };
        out.extend_from_slice(&pax_fields.encode());
        out.extend_from_slice(&pax);
        out.resize(out.len() + padding(pax.len() as u64) as usize, 0);
    }
    out.extend_from_slice(&fields.encode());
    Ok(out)
}

/// The values of one ustar header block, each within its field's range.
#[derive(Clone)]
struct Fields {
    name: String,
    prefix: String,
    link: String,
    typeflag: u8,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: i64,
}

impl Fields {
    /// Moves numbers that overflow their octal field into PAX records,
    /// leaving an in-range stand-in in the field.
    fn fit_numbers(&mut self, pax: &mut Vec<u8>) {
        if self.size > MAX_OCTAL_11 {
            pax_record(pax, "size", self.size.to_string().as_bytes());
            self.size = 0;
        }
        if !(0..=MAX_OCTAL_11 as i64).contains(&self.mtime) {
            pax_record(pax, "mtime", self.mtime.to_string().as_bytes());
            self.mtime = self.mtime.clamp(0, MAX_OCTAL_11 as i64);
        }
        if u64::from(self.uid) > MAX_OCTAL_7 {
            pax_record(pax, "uid", self.uid.to_string().as_bytes());
            self.uid = 0;
        }
        if u64::from(self.gid) > MAX_OCTAL_7 {
            pax_record(pax, "gid", self.gid.to_string().as_bytes());
            self.gid = 0;
        }
    }

    fn encode(&self) -> [u8; BLOCK] {
        let mut b = [0u8; BLOCK];
        put_text(&mut b, NAME, &self.name);
        put_octal(&mut b, MODE, u64::from(self.mode));
        put_octal(&mut b, UID, u64::from(self.uid));
        put_octal(&mut b, GID, u64::from(self.gid));
        put_octal(&mut b, SIZE, self.size);
        put_octal(&mut b, MTIME, self.mtime.max(0) as u64);
        b[TYPEFLAG] = self.typeflag;
        put_text(&mut b, LINKNAME, &self.link);
        b[MAGIC.0..MAGIC.0 + MAGIC.1].copy_from_slice(USTAR_MAGIC);
        b[VERSION.0..VERSION.0 + VERSION.1].copy_from_slice(USTAR_VERSION);
        put_octal(&mut b, DEVMAJOR, 0);
        put_octal(&mut b, DEVMINOR, 0);
        put_text(&mut b, PREFIX, &self.prefix);
        let (sum, _) = super::read::checksums(&b);
        // POSIX: six octal digits, then NUL and space.
        put_text(&mut b, CHKSUM, &format!("{sum:06o}\0 "));
        b
    }
}

/// Text into a field (callers keep it within the field; longer is cut).
fn put_text(b: &mut [u8; BLOCK], (at, len): (usize, usize), text: &str) {
    let n = text.len().min(len);
    b[at..at + n].copy_from_slice(&text.as_bytes()[..n]);
}

/// Zero-padded octal digits filling all but the last byte, then NUL.
fn put_octal(b: &mut [u8; BLOCK], (at, len): (usize, usize), value: u64) {
    let max = (1u64 << (3 * (len - 1))) - 1;
    let digits = format!("{:0width$o}\0", value.min(max), width = len - 1);
    b[at..at + len].copy_from_slice(digits.as_bytes());
}

/// `name` as ustar's (name, prefix) pair, or `None` if it needs PAX.
fn split_ustar(name: &str) -> Option<(String, String)> {
    if !name.is_ascii() {
        return None;
    }
    if name.len() <= NAME.1 {
        return Some((name.into(), String::new()));
    }
    name.match_indices('/')
        .map(|(i, _)| (&name[..i], &name[i + 1..]))
        .find(|(prefix, rest)| prefix.len() <= PREFIX.1 && !rest.is_empty() && rest.len() <= NAME.1)
        .map(|(prefix, rest)| (rest.into(), prefix.into()))
}

/// A stand-in for readers without PAX: the tail of `text` in ASCII.
fn ascii_tail(text: &str, max: usize) -> String {
    let ascii: String = text
        .chars()
        .map(|c| if c.is_ascii() { c } else { '_' })
        .collect();
    ascii[ascii.len().saturating_sub(max)..].to_string()
}

/// Appends `"%d %s=%s\n"`, the length counting the whole record with its
/// own digits (POSIX `pax` "pax Extended Header").
fn pax_record(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    let base = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = base;
    loop {
        let total = base + len.to_string().len();
        if total == len {
            break;
        }
        len = total;
    }
    out.extend_from_slice(format!("{len} {key}=").as_bytes());
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// Packs `src` (a regular file, a symlink — stored as a symlink, not
/// followed — or a directory tree, recursively, in sorted order, not
/// following symlinks anywhere) into `w`, with `root` as the archive name of
/// `src` itself (e.g. the basename). Sockets, fifos and devices, and names
/// or symlink targets that are not UTF-8, are skipped and listed in the
/// returned `skipped` list (host path + why). `progress` gets the running
/// count of file-data bytes.
pub fn pack_path<W: Write>(
    src: &Path,
    root: &str,
    w: &mut TarWriter<W>,
    progress: &mut dyn FnMut(u64),
) -> Result<(Stats, Vec<String>), TarError> {
    let root = root.trim_end_matches('/');
    if root.is_empty() {
        return Err(encode_error(root, "the archive root name is empty"));
    }
    let mut packer = Packer {
        w,
        stats: Stats::default(),
        skipped: Vec::new(),
        progress,
    };
    packer.add(src, root)?;
    Ok((packer.stats, packer.skipped))
}

struct Packer<'a, W: Write> {
    w: &'a mut TarWriter<W>,
    stats: Stats,
    skipped: Vec<String>,
    progress: &'a mut dyn FnMut(u64),
}

impl<W: Write> Packer<'_, W> {
    fn add(&mut self, host: &Path, name: &str) -> Result<(), TarError> {
        let read_err = |source| TarError::ReadTree {
            path: show_path(host),
            source,
        };
        let md = fs::symlink_metadata(host).map_err(read_err)?;
        let kind = md.file_type();
        if kind.is_dir() {
            self.w.append_dir(name, &Meta::from_metadata(&md))?;
            self.stats.entries += 1;
            let mut children = fs::read_dir(host)
                .and_then(|dir| {
                    dir.map(|e| e.map(|e| e.file_name()))
                        .collect::<io::Result<Vec<OsString>>>()
                })
                .map_err(read_err)?;
            children.sort();
            for child in children {
                let path = host.join(&child);
                match child.to_str() {
                    Some(s) => self.add(&path, &format!("{name}/{s}"))?,
                    None => self.skip(&path, "the name is not UTF-8"),
                }
            }
        } else if kind.is_file() {
            self.add_file(host, name)?;
        } else if kind.is_symlink() {
            let target = fs::read_link(host).map_err(read_err)?;
            match target.to_str() {
                Some(t) => {
                    self.w.append_symlink(name, t, &Meta::from_metadata(&md))?;
                    self.stats.entries += 1;
                }
                None => self.skip(host, "the symlink target is not UTF-8"),
            }
        } else if kind.is_socket() {
            self.skip(host, "a socket");
        } else if kind.is_fifo() {
            self.skip(host, "a fifo");
        } else {
            self.skip(host, "a device");
        }
        Ok(())
    }

    /// Opens without following a symlink swapped in since `lstat`, and takes
    /// size and metadata from the open file.
    fn add_file(&mut self, host: &Path, name: &str) -> Result<(), TarError> {
        let read_err = |source| TarError::ReadTree {
            path: show_path(host),
            source,
        };
        let file = File::options()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(host)
            .map_err(read_err)?;
        let md = file.metadata().map_err(read_err)?;
        if !md.is_file() {
            self.skip(host, "no longer a regular file");
            return Ok(());
        }
        let mut counting = Counting {
            inner: file,
            total: &mut self.stats.bytes,
            progress: &mut *self.progress,
        };
        self.w
            .append_file(name, &Meta::from_metadata(&md), md.len(), &mut counting)?;
        self.stats.entries += 1;
        Ok(())
    }

    fn skip(&mut self, host: &Path, why: &str) {
        self.skipped.push(format!("{}: {why}", show_path(host)));
    }
}

/// Counts bytes read into the running total and reports it.
struct Counting<'a, R> {
    inner: R,
    total: &'a mut u64,
    progress: &'a mut dyn FnMut(u64),
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            *self.total += n as u64;
            (self.progress)(*self.total);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::super::read::{Entry, Event, Kind, Reader};
    use super::super::testdir::TempDir;
    use super::*;

    const META: Meta = Meta {
        mode: 0o640,
        mtime: 1_700_000_000,
        uid: 1000,
        gid: 100,
    };

    /// Entries and their data, read back with the crate's reader.
    fn read_back(archive: &[u8]) -> Vec<(Entry, Vec<u8>)> {
        let (mut reader, mut rest, mut out) = (Reader::default(), archive, Vec::new());
        while !rest.is_empty() {
            let (used, event) = reader.next(rest).expect("archive parses");
            rest = &rest[used..];
            match event {
                Some(Event::Entry(e)) => out.push((e, Vec::new())),
                Some(Event::Data(d)) => out.last_mut().expect("entry").1.extend(d),
                _ => {}
            }
        }
        reader.finish().expect("archive ends cleanly");
        out
    }

    /// The first entry of `headers` (which may lack the entry's data).
    fn first_entry(headers: &[u8]) -> Entry {
        let (mut reader, mut rest) = (Reader::default(), headers);
        loop {
            let (used, event) = reader.next(rest).expect("headers parse");
            rest = &rest[used..];
            if let Some(Event::Entry(e)) = event {
                return e;
            }
        }
    }

    fn archive_of(add: impl FnOnce(&mut TarWriter<Vec<u8>>)) -> Vec<u8> {
        let mut w = TarWriter::new(Vec::new());
        add(&mut w);
        w.finish().expect("finish")
    }

    #[test]
    fn file_header_round_trips_through_the_reader() {
        let archive = archive_of(|w| {
            w.append_file("dir/file.txt", &META, 5, &mut &b"hello"[..])
                .unwrap()
        });

        let entries = read_back(&archive);

        let (entry, data) = &entries[0];
        assert_eq!(
            (&entry.path[..], entry.kind, entry.size, entry.meta),
            (&b"dir/file.txt"[..], Kind::File, 5, META)
        );
        assert_eq!(data, b"hello");
    }

    #[test]
    fn ustar_header_has_magic_version_and_checksum_per_posix() {
        let archive = archive_of(|w| w.append_dir("d", &META).unwrap());

        let (magic, chksum) = (&archive[257..265], &archive[148..156]);

        assert_eq!(magic, b"ustar\x0000");
        assert_eq!(chksum[6..], *b"\0 ");
        assert_eq!(archive.len(), 3 * BLOCK);
    }

    #[test]
    fn directory_names_end_in_a_slash() {
        let archive = archive_of(|w| w.append_dir("a/b", &META).unwrap());

        let entries = read_back(&archive);

        assert_eq!(
            (&entries[0].0.path[..], entries[0].0.kind),
            (&b"a/b/"[..], Kind::Dir)
        );
    }

    #[test]
    fn path_of_200_ascii_chars_uses_the_prefix_split_not_pax() {
        let path = format!("{}/{}", "p".repeat(120), "n".repeat(79));
        let archive = archive_of(|w| w.append_file(&path, &META, 0, &mut io::empty()).unwrap());

        let entries = read_back(&archive);

        assert_eq!(archive[156], REGTYPE);
        assert_eq!(entries[0].0.path, path.as_bytes());
    }

    #[test]
    fn long_path_is_stored_in_a_pax_record() {
        let path = format!("{}/{}", "d".repeat(200), "f".repeat(150));
        let archive = archive_of(|w| w.append_file(&path, &META, 2, &mut &b"hi"[..]).unwrap());

        let entries = read_back(&archive);

        assert_eq!(archive[156], PAX_EXTENDED);
        assert_eq!(
            (&entries[0].0.path, &entries[0].1),
            (&path.into_bytes(), &b"hi".to_vec())
        );
    }

    #[test]
    fn unicode_and_spaces_round_trip_exactly() {
        let path = "é ñ/日本 file.txt";
        let archive = archive_of(|w| w.append_file(path, &META, 0, &mut io::empty()).unwrap());

        let entries = read_back(&archive);

        assert_eq!(entries[0].0.path, path.as_bytes());
    }

    #[test]
    fn symlink_entry_stores_its_target() {
        let target = format!("../{}/日本", "t".repeat(120));
        let archive = archive_of(|w| w.append_symlink("link", &target, &META).unwrap());

        let entries = read_back(&archive);

        let entry = &entries[0].0;
        assert_eq!(
            (entry.kind, &entry.link[..], entry.size),
            (Kind::Symlink, target.as_bytes(), 0)
        );
    }

    #[test]
    fn size_over_8_gib_is_encoded_in_pax() {
        let size = MAX_OCTAL_11 + 1;

        let headers = encode_headers("big", REGTYPE, &META, size, "").unwrap();

        let (records, ustar) = (&headers[BLOCK..2 * BLOCK], &headers[2 * BLOCK..]);
        assert!(records.starts_with(b"19 size=8589934592\n"));
        assert_eq!(&ustar[SIZE.0..SIZE.0 + SIZE.1], b"00000000000\0");
        assert_eq!(first_entry(&headers).size, size);
    }

    #[test]
    fn negative_mtime_and_large_uid_are_encoded_in_pax() {
        let meta = Meta {
            mtime: -5,
            uid: 5_000_000,
            ..META
        };
        let archive = archive_of(|w| w.append_dir("d", &meta).unwrap());

        let entries = read_back(&archive);

        assert_eq!(entries[0].0.meta, meta);
    }

    #[test]
    fn pax_record_length_counts_its_own_digits() {
        let mut out = Vec::new();

        pax_record(&mut out, "path", &[b'a'; 95]);

        assert!(out.starts_with(b"105 path=aaa"));
        assert_eq!(out.len(), 105);
    }

    #[test]
    fn file_that_shrinks_while_packed_is_an_error() {
        let mut w = TarWriter::new(Vec::new());

        let err = w
            .append_file("f", &META, 10, &mut &b"short"[..])
            .unwrap_err();

        assert_eq!(
            err.to_string(),
            "f changed while it was packed: expected 10 bytes, but it ended after 5"
        );
    }

    #[test]
    fn file_that_grows_while_packed_is_an_error() {
        let mut w = TarWriter::new(Vec::new());

        let err = w
            .append_file("f", &META, 2, &mut &b"longer"[..])
            .unwrap_err();

        assert!(matches!(err, TarError::FileChanged { .. }), "{err}");
    }

    #[test]
    fn name_with_nul_is_refused() {
        let mut w = TarWriter::new(Vec::new());

        let err = w.append_dir("a\0b", &META).unwrap_err();

        assert!(matches!(err, TarError::EncodeEntry { .. }), "{err}");
    }

    #[test]
    fn pack_path_walks_in_sorted_order_skips_fifos_and_keeps_symlinks() {
        let tmp = TempDir::new("pack");
        let src = tmp.path().join("src");
        fs::create_dir_all(src.join("b")).unwrap();
        fs::write(src.join("b/z"), b"zz").unwrap();
        fs::write(src.join("a"), b"a").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", src.join("c")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            src.join("fifo"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let (mut w, mut last) = (TarWriter::new(Vec::new()), 0);

        let (stats, skipped) = pack_path(&src, "top", &mut w, &mut |n| last = n).unwrap();

        let entries = read_back(&w.finish().unwrap());
        let names: Vec<_> = entries
            .iter()
            .map(|(e, _)| String::from_utf8_lossy(&e.path).into_owned())
            .collect();
        assert_eq!(names, ["top/", "top/a", "top/b/", "top/b/z", "top/c"]);
        assert_eq!(
            (entries[4].0.kind, &entries[4].0.link[..]),
            (Kind::Symlink, &b"/etc/passwd"[..])
        );
        assert_eq!(
            (stats, last),
            (
                Stats {
                    entries: 5,
                    bytes: 3
                },
                3
            )
        );
        assert_eq!(skipped, [format!("{}: a fifo", src.join("fifo").display())]);
    }

    #[test]
    fn pack_path_of_a_symlink_stores_the_link_itself() {
        let tmp = TempDir::new("packlink");
        let link = tmp.path().join("l");
        std::os::unix::fs::symlink(tmp.path(), &link).unwrap();
        let mut w = TarWriter::new(Vec::new());

        pack_path(&link, "l", &mut w, &mut |_| {}).unwrap();

        let entries = read_back(&w.finish().unwrap());
        assert_eq!((entries.len(), entries[0].0.kind), (1, Kind::Symlink));
    }
}
