//! `agentlab::tar` against real tar implementations: GNU tar and busybox
//! tar must extract what `pack_path` writes, `Extractor` must extract what
//! they write (GNU pax and gnu formats, busybox's ustar + GNU long names),
//! and our own round trip must be exact. The fixture tree has a symlink, an
//! empty directory, a 5 MB file, names with spaces and unicode, a 200-char
//! path, a name longer than ustar's 100 bytes, modes 0755/0600/0644 and set
//! mtimes.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use agentlab::tar::{pack_path, ExtractOptions, Extractor, Stats, TarWriter};

/// A unique directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "agentlab-tar-interop-{tag}-{}-{n}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

const BIG: usize = 5 * 1024 * 1024;

fn path_200() -> String {
    format!(
        "long/{}/{}/{}",
        "d".repeat(60),
        "e".repeat(60),
        "f".repeat(72)
    )
}

fn name_150() -> String {
    format!("long/{}.txt", "n".repeat(146))
}

fn set_mtime(path: &Path, secs: i64) {
    let times = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        path,
        &times,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .expect("set mtime");
}

fn write_file(path: &Path, data: &[u8], mode: u32, mtime: i64) {
    fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    fs::write(path, data).expect("write");
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
    set_mtime(path, mtime);
}

/// Deterministic incompressible-ish bytes (xorshift64).
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Builds `parent/top` and returns its path.
fn fixture(parent: &Path) -> PathBuf {
    let top = parent.join("top");
    fs::create_dir_all(top.join("empty")).expect("mkdir");
    write_file(
        &top.join("run.sh"),
        b"#!/bin/sh\necho hi\n",
        0o755,
        1_500_000_001,
    );
    write_file(&top.join("secret"), b"hunter2", 0o600, 1_500_000_002);
    write_file(&top.join("big.bin"), &noise(BIG), 0o644, 1_500_000_003);
    write_file(
        &top.join("é ñ 日本.txt"),
        "unicode ✓".as_bytes(),
        0o644,
        1_500_000_004,
    );
    write_file(
        &top.join("with space/file name.txt"),
        b"spaces",
        0o644,
        1_500_000_005,
    );
    write_file(&top.join(path_200()), b"two hundred", 0o644, 1_500_000_006);
    write_file(&top.join(name_150()), b"one fifty", 0o600, 1_500_000_007);
    std::os::unix::fs::symlink("é ñ 日本.txt", top.join("link")).expect("symlink");
    set_mtime(&top.join("link"), 1_500_000_008);
    std::os::unix::fs::symlink("/nonexistent/target", top.join("dangling")).expect("symlink");
    set_mtime(&top.join("dangling"), 1_500_000_009);
    // Directories last, deepest first, so their contents do not disturb them.
    let mut dirs = vec![top.clone()];
    let mut i = 0;
    while i < dirs.len() {
        let d = dirs[i].clone();
        for e in fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("entry").path();
            if fs::symlink_metadata(&p).expect("lstat").is_dir() {
                dirs.push(p);
            }
        }
        i += 1;
    }
    for (n, d) in dirs.iter().enumerate().rev() {
        fs::set_permissions(
            d,
            fs::Permissions::from_mode(if n == 1 { 0o700 } else { 0o755 }),
        )
        .expect("chmod");
        set_mtime(d, 1_400_000_000 + n as i64);
    }
    top
}

#[derive(Debug, PartialEq, Eq)]
enum Node {
    Dir {
        mode: u32,
        mtime: Option<i64>,
    },
    File {
        mode: u32,
        mtime: i64,
        data: Vec<u8>,
    },
    Symlink {
        target: PathBuf,
        mtime: Option<i64>,
    },
}

/// Which mtimes a given extractor is expected to restore.
#[derive(Clone, Copy)]
struct Checks {
    dir_mtimes: bool,
    symlink_mtimes: bool,
}

const ALL: Checks = Checks {
    dir_mtimes: true,
    symlink_mtimes: true,
};

/// Every node under `root` by relative path.
fn walk(root: &Path, checks: Checks) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    walk_into(root, root, checks, &mut out);
    out
}

fn walk_into(root: &Path, dir: &Path, checks: Checks, out: &mut BTreeMap<String, Node>) {
    for entry in fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("entry").path();
        let m = fs::symlink_metadata(&path).expect("lstat");
        let rel = path
            .strip_prefix(root)
            .expect("under root")
            .display()
            .to_string();
        let node = if m.is_symlink() {
            Node::Symlink {
                target: fs::read_link(&path).expect("readlink"),
                mtime: checks.symlink_mtimes.then(|| m.mtime()),
            }
        } else if m.is_dir() {
            walk_into(root, &path, checks, out);
            Node::Dir {
                mode: m.mode() & 0o7777,
                mtime: checks.dir_mtimes.then(|| m.mtime()),
            }
        } else {
            Node::File {
                mode: m.mode() & 0o7777,
                mtime: m.mtime(),
                data: fs::read(&path).expect("read"),
            }
        };
        out.insert(rel, node);
    }
}

fn assert_same_tree(expected: &Path, actual: &Path, checks: Checks) {
    let (want, got) = (walk(expected, checks), walk(actual, checks));
    assert_eq!(
        want.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>(),
        "paths differ"
    );
    for (path, node) in &want {
        assert!(
            got.get(path) == Some(node),
            "{path} differs: want {:?}, got {:?}",
            brief(node),
            got.get(path).map(brief)
        );
    }
    let top = |p: &Path| fs::metadata(p).expect("stat").mode() & 0o7777;
    assert_eq!(top(expected), top(actual), "mode of the root differs");
}

fn brief(n: &Node) -> String {
    match n {
        Node::File { mode, mtime, data } => format!("file {mode:o} {mtime} {} bytes", data.len()),
        other => format!("{other:?}"),
    }
}

fn pack(top: &Path, archive: &Path) -> Stats {
    let mut w = TarWriter::new(Vec::new());
    let (stats, skipped) = pack_path(top, "top", &mut w, &mut |_| {}).expect("pack");
    assert!(skipped.is_empty(), "{skipped:?}");
    fs::write(archive, w.finish().expect("finish")).expect("write archive");
    stats
}

/// Extracts `archive` with `Extractor` (untrusted, as the host does),
/// feeding it in 8 KiB chunks as a stream would.
fn extract(archive: &Path, dest: &Path) -> Stats {
    let mut x = Extractor::new(dest, ExtractOptions::default()).expect("extractor");
    let mut file = fs::File::open(archive).expect("open archive");
    let mut buf = [0u8; 8192];
    loop {
        let n = file.read(&mut buf).expect("read archive");
        if n == 0 {
            break;
        }
        x.feed(&buf[..n]).expect("feed");
    }
    x.finish().expect("finish")
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn gnu_tar_extracts_what_pack_path_writes() {
    let tmp = TempDir::new("to-gnu");
    let top = fixture(&tmp.path().join("src"));
    let (archive, out) = (tmp.path().join("a.tar"), tmp.path().join("out"));
    fs::create_dir(&out).expect("mkdir");

    pack(&top, &archive);
    run(Command::new("tar")
        .arg("-xpf")
        .arg(&archive)
        .arg("-C")
        .arg(&out));

    assert_same_tree(&top, &out.join("top"), ALL);
}

#[test]
fn busybox_tar_extracts_what_pack_path_writes() {
    let tmp = TempDir::new("to-busybox");
    let top = fixture(&tmp.path().join("src"));
    let (archive, out) = (tmp.path().join("a.tar"), tmp.path().join("out"));
    fs::create_dir(&out).expect("mkdir");

    pack(&top, &archive);
    run(Command::new("busybox")
        .args(["tar", "-xf"])
        .arg(&archive)
        .arg("-C")
        .arg(&out));

    // busybox sets a directory's mtime before filling it and leaves symlink
    // mtimes alone.
    let checks = Checks {
        dir_mtimes: false,
        symlink_mtimes: false,
    };
    assert_same_tree(&top, &out.join("top"), checks);
}

#[test]
fn extractor_reads_gnu_tar_pax_format() {
    let tmp = TempDir::new("from-gnu-pax");
    let top = fixture(&tmp.path().join("src"));
    let (archive, out) = (tmp.path().join("a.tar"), tmp.path().join("out"));
    fs::create_dir(&out).expect("mkdir");
    let src = tmp.path().join("src");
    run(Command::new("tar")
        .arg("--format=pax")
        .arg("-C")
        .arg(&src)
        .arg("-cf")
        .arg(&archive)
        .arg("top"));

    extract(&archive, &out);

    assert_same_tree(&top, &out.join("top"), ALL);
}

#[test]
fn extractor_reads_gnu_tar_gnu_format() {
    let tmp = TempDir::new("from-gnu-gnu");
    let top = fixture(&tmp.path().join("src"));
    let (archive, out) = (tmp.path().join("a.tar"), tmp.path().join("out"));
    fs::create_dir(&out).expect("mkdir");
    let src = tmp.path().join("src");
    run(Command::new("tar")
        .arg("--format=gnu")
        .arg("-C")
        .arg(&src)
        .arg("-cf")
        .arg(&archive)
        .arg("top"));

    extract(&archive, &out);

    assert_same_tree(&top, &out.join("top"), ALL);
}

#[test]
fn extractor_reads_busybox_tar() {
    let tmp = TempDir::new("from-busybox");
    let top = fixture(&tmp.path().join("src"));
    let (archive, out) = (tmp.path().join("a.tar"), tmp.path().join("out"));
    fs::create_dir(&out).expect("mkdir");
    let src = tmp.path().join("src");
    run(Command::new("busybox")
        .args(["tar", "-C"])
        .arg(&src)
        .arg("-cf")
        .arg(&archive)
        .arg("top"));

    extract(&archive, &out);

    assert_same_tree(&top, &out.join("top"), ALL);
}

#[test]
fn pack_path_and_extractor_round_trip_exactly() {
    let tmp = TempDir::new("round-trip");
    let top = fixture(&tmp.path().join("src"));
    let (archive, out) = (tmp.path().join("a.tar"), tmp.path().join("out"));
    fs::create_dir(&out).expect("mkdir");

    let packed = pack(&top, &archive);
    let extracted = extract(&archive, &out);

    assert_same_tree(&top, &out.join("top"), ALL);
    assert_eq!(packed, extracted);
    assert_eq!(packed.entries, 15);
}
