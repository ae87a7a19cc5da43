//! The host extracts tar archives that a guest controls: any bytes, split
//! at a point taken from the first byte, fed to an untrusted `Extractor`
//! must not panic and must create nothing outside the destination. Each run
//! gets a fresh `area/` holding `dest/` (where the archive goes) and an
//! empty `outside/` (a target for `../outside` symlinks the fuzzer may
//! find); afterwards `area` must hold exactly those two, `outside` must be
//! empty, and every non-symlink under `dest` must resolve inside it.
#![no_main]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use agentlab::tar::{ExtractOptions, Extractor};
use libfuzzer_sys::fuzz_target;

fn fresh_area() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let area = std::env::temp_dir().join(format!("agentlab-fuzz-tar-{}-{n}", std::process::id()));
    fs::create_dir_all(area.join("dest")).expect("create dest");
    fs::create_dir_all(area.join("outside")).expect("create outside");
    area
}

/// Asserts every non-symlink under `dir` canonicalizes to a path under `root`.
fn assert_inside(root: &Path, dir: &Path) {
    for entry in fs::read_dir(dir).expect("read extracted dir") {
        let path = entry.expect("dir entry").path();
        let meta = fs::symlink_metadata(&path).expect("lstat extracted path");
        if meta.file_type().is_symlink() {
            continue;
        }
        let real = fs::canonicalize(&path).expect("canonicalize");
        assert!(real.starts_with(root), "{} escaped to {}", path.display(), real.display());
        if meta.is_dir() {
            assert_inside(root, &path);
        }
    }
}

/// Extracted directories may be read-only; open them up, then remove.
fn remove(area: &Path) {
    fn open_up(dir: &Path) {
        use std::os::unix::fs::PermissionsExt;
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                open_up(&entry.path());
            }
        }
    }
    open_up(area);
    fs::remove_dir_all(area).expect("remove fuzz area");
}

fuzz_target!(|data: &[u8]| {
    let area = fresh_area();
    let dest = fs::canonicalize(area.join("dest")).expect("canonical dest");
    let cut = data.first().map_or(0, |&b| usize::from(b) * data.len() / 256);
    let opts = ExtractOptions {
        max_entries: 1000,
        ..ExtractOptions::default()
    };
    let mut x = Extractor::new(&dest, opts).expect("extractor");
    let _ = x
        .feed(&data[..cut])
        .and_then(|()| x.feed(&data[cut..]))
        .and_then(|()| x.finish());

    let mut names: Vec<_> = fs::read_dir(&area)
        .expect("read area")
        .map(|e| e.expect("area entry").file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["dest", "outside"], "something was created beside dest");
    assert_eq!(fs::read_dir(area.join("outside")).expect("read outside").count(), 0);
    assert_inside(&dest, &dest);
    remove(&area);
});
