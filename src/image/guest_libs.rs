//! A dynamically linked host program made runnable in a guest that has no
//! libc of its own: the program and every shared object `ldd` names for it
//! (the dynamic loader included) are copied into the guest's root tree at
//! the paths the host has them, where the loader looks for them. The
//! `default-qemu-ga` image runs Debian's `/usr/sbin/qemu-ga` this way.
//!
//! Owns reading `ldd`'s listing (glibc's `ldd`, which prints the loader's
//! `LD_TRACE_LOADED_OBJECTS` output: `name => /path (0xaddr)`,
//! `/path (0xaddr)` for the loader, `name (0xaddr)` for the vDSO) and the
//! copying. It does not decide where the program goes in the guest or how
//! the guest starts it (`default_guest` does).

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use super::elf::{self, ElfError, Linkage};

#[derive(Debug, thiserror::Error)]
pub enum LibsError {
    #[error("cannot read {program}")]
    Read {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{program} cannot run in the guest")]
    NotAProgram {
        program: PathBuf,
        #[source]
        source: ElfError,
    },
    #[error("cannot run ldd on {program} (it comes with libc-bin)")]
    SpawnLdd {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("ldd {program} failed: {stderr}")]
    Ldd { program: PathBuf, stderr: String },
    #[error("{program} needs {library}, which this host does not have")]
    Missing { program: PathBuf, library: String },
    #[error(
        "ldd named {path} for {program}; only absolute paths without '..' can go into the guest"
    )]
    OddPath { program: PathBuf, path: String },
    #[error("cannot copy {from} into the guest as {to}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What one `ldd` line says.
#[derive(Debug, PartialEq, Eq)]
enum Entry<'a> {
    /// A file the program loads.
    Path(&'a str),
    /// A soname with no file behind it (`libfoo.so.1 => not found`).
    NotFound(&'a str),
    /// The vDSO, or anything else with no file to copy.
    Nothing,
}

fn entry(line: &str) -> Entry<'_> {
    let line = line.trim();
    let (name, target) = match line.split_once(" => ") {
        Some((name, target)) => (name.trim(), target.trim()),
        None => (line, line),
    };
    if target == "not found" {
        return Entry::NotFound(name);
    }
    // Drop the load address: `/lib/x.so (0x00007f…)`.
    let path = target.rsplit_once(" (").map_or(target, |(p, _)| p).trim();
    if path.starts_with('/') {
        Entry::Path(path)
    } else {
        Entry::Nothing
    }
}

/// The files `ldd`'s listing names, in its order; the first soname it could
/// not find is an error.
fn parse_ldd<'a>(listing: &'a str, program: &Path) -> Result<Vec<&'a str>, LibsError> {
    let mut paths = Vec::new();
    for line in listing.lines() {
        match entry(line) {
            Entry::Path(p) => paths.push(p),
            Entry::NotFound(library) => {
                return Err(LibsError::Missing {
                    program: program.to_path_buf(),
                    library: library.to_string(),
                })
            }
            Entry::Nothing => {}
        }
    }
    Ok(paths)
}

/// The shared objects `program` loads, as `ldd` resolves them on this host
/// (none for a static program).
pub fn needed(program: &Path) -> Result<Vec<PathBuf>, LibsError> {
    let mut head = Vec::new();
    File::open(program)
        .and_then(|f| f.take(64 << 10).read_to_end(&mut head))
        .map_err(|source| LibsError::Read {
            program: program.to_path_buf(),
            source,
        })?;
    let linkage = elf::linkage(&head).map_err(|source| LibsError::NotAProgram {
        program: program.to_path_buf(),
        source,
    })?;
    if linkage == Linkage::Static {
        return Ok(Vec::new());
    }
    let out = Command::new("ldd")
        .arg(program)
        .output()
        .map_err(|source| LibsError::SpawnLdd {
            program: program.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        return Err(LibsError::Ldd {
            program: program.to_path_buf(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let listing = String::from_utf8_lossy(&out.stdout);
    Ok(parse_ldd(&listing, program)?
        .into_iter()
        .map(PathBuf::from)
        .collect())
}

/// `root` + the absolute `path`, refusing `..` so nothing lands outside `root`.
fn inside(root: &Path, path: &Path) -> Option<PathBuf> {
    let rel = path.strip_prefix("/").ok()?;
    rel.components()
        .all(|c| matches!(c, Component::Normal(_)))
        .then(|| root.join(rel))
}

/// Copies `program` to `guest_path` under `root` (mode 0755), and each of
/// `libs` (from [`needed`]) to its own path under `root`, following host
/// symlinks: the guest gets a plain file under the name the loader asks for.
pub fn install(
    program: &Path,
    guest_path: &Path,
    libs: &[PathBuf],
    root: &Path,
) -> Result<(), LibsError> {
    let odd = |path: &Path| LibsError::OddPath {
        program: program.to_path_buf(),
        path: path.display().to_string(),
    };
    let to = inside(root, guest_path).ok_or_else(|| odd(guest_path))?;
    copy(program, &to, root)?;
    fs::set_permissions(&to, fs::Permissions::from_mode(0o755)).map_err(|source| {
        LibsError::Copy {
            from: program.to_path_buf(),
            to: to.clone(),
            source,
        }
    })?;
    for lib in libs {
        copy(lib, &inside(root, lib).ok_or_else(|| odd(lib))?, root)?;
    }
    Ok(())
}

fn copy(from: &Path, to: &Path, root: &Path) -> Result<(), LibsError> {
    fs::create_dir_all(to.parent().unwrap_or(root))
        .and_then(|()| fs::copy(from, to))
        .map(drop)
        .map_err(|source| LibsError::Copy {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ldd /usr/sbin/qemu-ga` on Debian 12.
    const QEMU_GA_LDD: &str = "\tlinux-vdso.so.1 (0x00007ffd5a3f2000)
\tlibudev.so.1 => /lib/x86_64-linux-gnu/libudev.so.1 (0x00007f2b18836000)
\tlibglib-2.0.so.0 => /lib/x86_64-linux-gnu/libglib-2.0.so.0 (0x00007f2b186ea000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2b18420000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f2b18971000)
\tlibpcre2-8.so.0 => /lib/x86_64-linux-gnu/libpcre2-8.so.0 (0x00007f2b18386000)
";

    #[test]
    fn ldd_listing_gives_libraries_and_loader_but_not_the_vdso() {
        let paths = parse_ldd(QEMU_GA_LDD, Path::new("/usr/sbin/qemu-ga")).unwrap();
        assert_eq!(
            paths,
            [
                "/lib/x86_64-linux-gnu/libudev.so.1",
                "/lib/x86_64-linux-gnu/libglib-2.0.so.0",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2",
                "/lib/x86_64-linux-gnu/libpcre2-8.so.0",
            ]
        );
    }

    #[test]
    fn missing_library_is_named() {
        let listing =
            "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x1)\n\tlibgone.so.3 => not found\n";
        let err = parse_ldd(listing, Path::new("/usr/sbin/x")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "/usr/sbin/x needs libgone.so.3, which this host does not have"
        );
    }

    #[test]
    fn paths_with_dotdot_stay_out_of_the_guest() {
        let root = Path::new("/build/rootfs.d");
        assert_eq!(
            inside(root, Path::new("/lib64/ld-linux-x86-64.so.2")),
            Some(PathBuf::from("/build/rootfs.d/lib64/ld-linux-x86-64.so.2"))
        );
        assert_eq!(inside(root, Path::new("/lib/../../etc/passwd")), None);
        assert_eq!(inside(root, Path::new("lib/x.so")), None);
    }

    #[test]
    fn static_program_needs_nothing() {
        assert_eq!(
            needed(Path::new("/bin/busybox")).unwrap(),
            Vec::<PathBuf>::new()
        );
    }

    #[test]
    fn host_qemu_ga_needs_libc_and_the_loader() {
        let libs = needed(Path::new("/usr/sbin/qemu-ga"))
            .expect("qemu-ga (apt-get install qemu-guest-agent)");
        assert!(libs.iter().any(|l| l.ends_with("libc.so.6")), "{libs:?}");
        assert!(
            libs.iter().any(|l| l.ends_with("ld-linux-x86-64.so.2")),
            "{libs:?}"
        );
    }
}
