//! A writer for cpio archives in the "newc" format, the format the Linux
//! kernel unpacks as an initramfs.
//!
//! Owns the byte layout only: headers, name and data padding, the trailer. It
//! does not decide what goes into the default guest's initramfs (that is
//! `default_guest`) and it never reads archives (the kernel and `cpio -i` do).
//!
//! The format is the one in the kernel's
//! `Documentation/driver-api/early-userspace/buffer-format.rst` and in GNU
//! cpio's manual ("newc" / SVR4 without CRC): a 110-byte ASCII header of the
//! magic `070701` and thirteen 8-digit hex fields, the NUL-terminated name,
//! padding so the data starts on a 4-byte boundary, the data, padding to the
//! next 4-byte boundary. The archive ends with an entry named `TRAILER!!!`;
//! GNU cpio then pads to its 512-byte block, and so do we.
//!
//! Output is reproducible: uid and gid are 0, every entry gets the same mtime
//! and inode numbers are assigned in order from 1.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// `c_magic` of the newc format (buffer-format.rst).
const MAGIC: &[u8; 6] = b"070701";
/// Magic plus thirteen 8-digit hex fields.
const HEADER_LEN: usize = 110;
/// Name of the entry that ends an archive.
const TRAILER: &str = "TRAILER!!!";
/// GNU cpio writes whole 512-byte blocks; we pad the same way.
const BLOCK: u64 = 512;

/// `st_mode` file-type bits (`<sys/stat.h>`).
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;
/// Permission and set-id/sticky bits a caller may pass as `mode`.
const PERM_MASK: u32 = 0o7777;

#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    #[error("cannot write the cpio archive")]
    Write(#[source] io::Error),
    #[error("cannot put {name:?} into a cpio archive: names must be non-empty, relative after the leading '/', and free of NUL bytes")]
    BadName { name: String },
    #[error("{name} is {size} bytes; a newc archive holds files up to 4 GiB")]
    TooLarge { name: String, size: u64 },
    #[error("cannot read {path}")]
    ReadSource {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} changed while it was being archived: expected {expected} bytes, read {read}")]
    SourceChanged {
        path: PathBuf,
        expected: u64,
        read: u64,
    },
}

/// One header's worth of metadata; the fields GNU cpio fills, in order.
struct Header<'a> {
    name: &'a str,
    ino: u32,
    mode: u32,
    nlink: u32,
    filesize: u32,
    rdev_major: u32,
    rdev_minor: u32,
}

/// Writes a newc archive to `out`, one entry at a time.
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    mtime: u32,
}

impl<W: Write> CpioWriter<W> {
    /// An archive whose entries all carry mtime 0.
    pub fn new(out: W) -> CpioWriter<W> {
        CpioWriter::with_mtime(out, 0)
    }

    /// An archive whose entries all carry `mtime` (seconds since the epoch).
    pub fn with_mtime(out: W, mtime: u32) -> CpioWriter<W> {
        CpioWriter {
            out,
            written: 0,
            next_ino: 1,
            mtime,
        }
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.written
    }

    /// True before the first entry.
    pub fn is_empty(&self) -> bool {
        self.written == 0
    }

    pub fn add_dir(&mut self, path: &str, mode: u32) -> Result<(), CpioError> {
        self.add_entry(path, S_IFDIR | (mode & PERM_MASK), 2, b"")
    }

    /// A regular file whose contents are in memory.
    pub fn add_file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<(), CpioError> {
        self.add_entry(path, S_IFREG | (mode & PERM_MASK), 1, data)
    }

    /// A regular file streamed from `src` on the host, stored with `mode`.
    pub fn add_host_file(&mut self, path: &str, mode: u32, src: &Path) -> Result<(), CpioError> {
        let read_err = |source| CpioError::ReadSource {
            path: src.to_path_buf(),
            source,
        };
        let mut file = File::open(src).map_err(read_err)?;
        let size = file.metadata().map_err(read_err)?.len();
        // Errors about the source name the host file, not the archive entry.
        self.add_file_from_reader(path, mode, size, &mut file)
            .map_err(|err| match err {
                CpioError::ReadSource { source, .. } => read_err(source),
                CpioError::SourceChanged { expected, read, .. } => CpioError::SourceChanged {
                    path: src.to_path_buf(),
                    expected,
                    read,
                },
                other => other,
            })
    }

    /// A regular file of exactly `size` bytes read from `reader`.
    pub fn add_file_from_reader(
        &mut self,
        path: &str,
        mode: u32,
        size: u64,
        reader: &mut dyn Read,
    ) -> Result<(), CpioError> {
        let name = check_name(path)?;
        let filesize = u32::try_from(size).map_err(|_| CpioError::TooLarge {
            name: name.to_string(),
            size,
        })?;
        let ino = self.take_ino();
        self.write_header(&Header {
            name,
            ino,
            mode: S_IFREG | (mode & PERM_MASK),
            nlink: 1,
            filesize,
            rdev_major: 0,
            rdev_minor: 0,
        })?;
        let copied =
            self.copy_from(&mut reader.take(size))
                .map_err(|source| CpioError::ReadSource {
                    path: PathBuf::from(name),
                    source,
                })??;
        if copied != size {
            return Err(CpioError::SourceChanged {
                path: PathBuf::from(name),
                expected: size,
                read: copied,
            });
        }
        self.pad_to(4)
    }

    /// A symbolic link at `path` pointing at `target`; the target is the data.
    pub fn add_symlink(&mut self, path: &str, target: &str) -> Result<(), CpioError> {
        self.add_entry(path, S_IFLNK | 0o777, 1, target.as_bytes())
    }

    /// A character device node, such as `dev/console` (5, 1).
    pub fn add_char_device(
        &mut self,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        let name = check_name(path)?;
        let ino = self.take_ino();
        self.write_header(&Header {
            name,
            ino,
            mode: S_IFCHR | (mode & PERM_MASK),
            nlink: 1,
            filesize: 0,
            rdev_major: major,
            rdev_minor: minor,
        })
    }

    /// Writes the trailer, pads to a 512-byte block and hands back the writer.
    pub fn finish(mut self) -> Result<W, CpioError> {
        self.write_header(&Header {
            name: TRAILER,
            ino: 0,
            mode: 0,
            nlink: 1,
            filesize: 0,
            rdev_major: 0,
            rdev_minor: 0,
        })?;
        self.pad_to(BLOCK)?;
        self.out.flush().map_err(CpioError::Write)?;
        Ok(self.out)
    }

    fn add_entry(
        &mut self,
        path: &str,
        mode: u32,
        nlink: u32,
        data: &[u8],
    ) -> Result<(), CpioError> {
        let name = check_name(path)?;
        let filesize = u32::try_from(data.len()).map_err(|_| CpioError::TooLarge {
            name: name.to_string(),
            size: data.len() as u64,
        })?;
        let ino = self.take_ino();
        self.write_header(&Header {
            name,
            ino,
            mode,
            nlink,
            filesize,
            rdev_major: 0,
            rdev_minor: 0,
        })?;
        self.write(data)?;
        self.pad_to(4)
    }

    /// Copies `reader` to the archive until it ends. The outer error is the
    /// reader's, the inner one the archive's (io::copy would not tell them apart).
    fn copy_from(&mut self, reader: &mut dyn Read) -> io::Result<Result<u64, CpioError>> {
        let mut buf = vec![0u8; 64 << 10];
        let mut copied = 0;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => return Ok(Ok(copied)),
                Ok(n) => n,
                // A signal arrived before anything was read: read again.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if let Err(e) = self.write(&buf[..n]) {
                return Ok(Err(e));
            }
            copied += n as u64;
        }
    }

    fn take_ino(&mut self) -> u32 {
        let ino = self.next_ino;
        self.next_ino += 1;
        ino
    }

    /// Header, name, NUL, and padding so what follows is 4-byte aligned.
    fn write_header(&mut self, h: &Header<'_>) -> Result<(), CpioError> {
        let namesize = h.name.len() as u32 + 1;
        let fields = [
            h.ino,
            h.mode,
            0, // uid
            0, // gid
            h.nlink,
            self.mtime,
            h.filesize,
            0, // devmajor: of the archived file's filesystem; meaningless here
            0, // devminor
            h.rdev_major,
            h.rdev_minor,
            namesize,
            0, // check: only used by the "crc" variant (070702)
        ];
        let mut buf = Vec::with_capacity(HEADER_LEN + h.name.len() + 4);
        buf.extend_from_slice(MAGIC);
        for field in fields {
            buf.extend_from_slice(format!("{field:08X}").as_bytes());
        }
        buf.extend_from_slice(h.name.as_bytes());
        buf.push(0);
        self.write(&buf)?;
        self.pad_to(4)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), CpioError> {
        self.out.write_all(bytes).map_err(CpioError::Write)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad_to(&mut self, align: u64) -> Result<(), CpioError> {
        let pad = (align - self.written % align) % align;
        let zeros = [0u8; BLOCK as usize];
        self.write(&zeros[..pad as usize])
    }
}

/// Archive names are relative (`bin/busybox`); a leading `/` is dropped as
/// GNU cpio does, so callers may write the paths as the guest will see them.
fn check_name(path: &str) -> Result<&str, CpioError> {
    let name = path.trim_start_matches('/');
    if name.is_empty() || name.contains('\0') || name == TRAILER {
        return Err(CpioError::BadName {
            name: path.to_string(),
        });
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// One parsed entry: the fields a reader of the archive relies on.
    #[derive(Debug, PartialEq, Eq)]
    struct Entry {
        name: String,
        mode: u32,
        uid: u32,
        gid: u32,
        nlink: u32,
        mtime: u32,
        rdev: (u32, u32),
        data: Vec<u8>,
    }

    /// A test-only newc reader; panics on malformed input.
    fn parse(mut bytes: &[u8]) -> Vec<Entry> {
        let total = bytes.len();
        let mut entries = Vec::new();
        loop {
            assert_eq!(
                &bytes[..6],
                MAGIC,
                "magic at offset {}",
                total - bytes.len()
            );
            let field = |i: usize| {
                let s = std::str::from_utf8(&bytes[6 + 8 * i..14 + 8 * i]).unwrap();
                u32::from_str_radix(s, 16).unwrap()
            };
            let (mode, uid, gid, nlink, mtime) = (field(1), field(2), field(3), field(4), field(5));
            let (filesize, rdev, namesize) =
                (field(6) as usize, (field(9), field(10)), field(11) as usize);
            let name_end = HEADER_LEN + namesize;
            let name = std::str::from_utf8(&bytes[HEADER_LEN..name_end - 1]).unwrap();
            let data_start = name_end.next_multiple_of(4);
            let data_end = data_start + filesize;
            if name == TRAILER {
                return entries;
            }
            entries.push(Entry {
                name: name.to_string(),
                mode,
                uid,
                gid,
                nlink,
                mtime,
                rdev,
                data: bytes[data_start..data_end].to_vec(),
            });
            bytes = &bytes[data_end.next_multiple_of(4)..];
        }
    }

    fn tiny_archive() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        w.add_dir("d", 0o755).unwrap();
        w.add_file("d/f", 0o644, b"hello").unwrap();
        w.add_symlink("d/l", "f").unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn first_header_has_the_newc_field_layout() {
        let bytes = tiny_archive();
        let expected = concat!(
            "070701", "00000001", "000041ED", "00000000", "00000000", "00000002", "00000000",
            "00000000", "00000000", "00000000", "00000000", "00000000", "00000002", "00000000",
            "d\0",
        );
        // 110 + 2 name bytes is already a multiple of 4: no padding.
        assert_eq!(&bytes[..HEADER_LEN + 2], expected.as_bytes());
    }

    #[test]
    fn archive_is_padded_to_whole_blocks() {
        assert_eq!(tiny_archive().len(), 512);
    }

    #[test]
    fn entries_read_back_with_their_metadata() {
        let entries = parse(&tiny_archive());
        assert_eq!(
            entries[1],
            Entry {
                name: "d/f".into(),
                mode: 0o100_644,
                uid: 0,
                gid: 0,
                nlink: 1,
                mtime: 0,
                rdev: (0, 0),
                data: b"hello".to_vec(),
            }
        );
        assert_eq!(entries[2].mode, 0o120_777);
        assert_eq!(entries[2].data, b"f");
    }

    #[test]
    fn data_after_an_unaligned_name_is_aligned() {
        let mut w = CpioWriter::new(Vec::new());
        w.add_file("abc", 0o600, b"xyz12").unwrap();
        w.add_file("/de", 0o600, b"").unwrap();
        let entries = parse(&w.finish().unwrap());
        assert_eq!(entries[0].data, b"xyz12");
        assert_eq!(entries[1].name, "de");
    }

    #[test]
    fn inode_numbers_are_unique() {
        let bytes = tiny_archive();
        // Entries start at 0, 0x70 and 0xEC: 110-byte headers, names and
        // data each padded to 4 bytes.
        let inos: Vec<&[u8]> = [0usize, 0x70, 0xEC]
            .iter()
            .map(|off| &bytes[off + 6..off + 14])
            .collect();
        assert_eq!(inos, [&b"00000001"[..], b"00000002", b"00000003"]);
    }

    #[test]
    fn mtime_is_the_one_given() {
        let mut w = CpioWriter::with_mtime(Vec::new(), 1_700_000_000);
        w.add_dir("x", 0o700).unwrap();
        assert_eq!(parse(&w.finish().unwrap())[0].mtime, 1_700_000_000);
    }

    #[test]
    fn char_device_carries_its_numbers() {
        let mut w = CpioWriter::new(Vec::new());
        w.add_char_device("dev/console", 0o600, 5, 1).unwrap();
        let entry = &parse(&w.finish().unwrap())[0];
        assert_eq!((entry.mode, entry.rdev), (0o020_600, (5, 1)));
    }

    #[test]
    fn streamed_file_shorter_than_announced_is_an_error() {
        let mut w = CpioWriter::new(Vec::new());
        let err = w
            .add_file_from_reader("f", 0o644, 10, &mut &b"abc"[..])
            .unwrap_err();
        assert!(matches!(err, CpioError::SourceChanged { read: 3, .. }));
    }

    #[test]
    fn failing_source_is_a_read_error_not_a_write_error() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
        }
        let mut w = CpioWriter::new(Vec::new());
        let err = w
            .add_file_from_reader("x", 0o644, 3, &mut Broken)
            .unwrap_err();
        assert_eq!(err.to_string(), "cannot read x");
    }

    #[test]
    fn empty_and_nul_names_are_refused() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(w.add_dir("/", 0o755).is_err());
        assert!(w.add_dir("a\0b", 0o755).is_err());
    }

    /// GNU cpio, fed the same tree, writes an archive of the same length whose
    /// entries read back identically (it numbers inodes from 0, we from 1).
    #[test]
    fn matches_gnu_cpio_for_the_same_entries() {
        let dir = TempDir::new("gnu");
        std::fs::create_dir(dir.0.join("d")).unwrap();
        std::fs::write(dir.0.join("d/f"), "hello").unwrap();
        std::os::unix::fs::symlink("f", dir.0.join("d/l")).unwrap();
        let touched = Command::new("touch")
            .args(["-h", "-d", "@0", "d/f", "d/l", "d"])
            .current_dir(&dir.0)
            .status()
            .unwrap();
        let mut gnu = Command::new("cpio")
            .args(["-o", "-H", "newc", "--reproducible", "-R", "0:0", "--quiet"])
            .current_dir(&dir.0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("GNU cpio (apt-get install cpio)");
        gnu.stdin
            .take()
            .unwrap()
            .write_all(b"d\nd/f\nd/l\n")
            .unwrap();
        let theirs = gnu.wait_with_output().unwrap().stdout;
        let ours = tiny_archive();
        assert!(touched.success());
        assert_eq!(ours.len(), theirs.len());
        assert_eq!(parse(&ours), parse(&theirs));
    }

    #[test]
    fn busybox_cpio_extracts_what_we_write() {
        let dir = TempDir::new("bb");
        let mut child = Command::new("/bin/busybox")
            .args(["cpio", "-i", "-d"])
            .current_dir(&dir.0)
            .stdin(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&tiny_archive())
            .unwrap();
        assert!(child.wait().unwrap().success());
        assert_eq!(std::fs::read(dir.0.join("d/f")).unwrap(), b"hello");
        assert_eq!(
            std::fs::read_link(dir.0.join("d/l")).unwrap(),
            Path::new("f")
        );
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let path = std::env::temp_dir().join(format!(
                "agentlab-cpio-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
