//! Which kernel modules the default guest must load, and in what order.
//!
//! Owns the reading of `modules.dep` and `modules.builtin` (the files `depmod`
//! writes into `/lib/modules/<version>/`, see depmod(8) and modules.dep(5))
//! and the dependency closure of a list of wanted modules. Pure: text in,
//! an ordered list out. It does not copy modules (that is `default_guest`) and
//! does not load them (the guest's `/init` does, with busybox `insmod`, which
//! resolves nothing itself — hence the order).
//!
//! `modules.dep` lines are `path: dep-path dep-path…`, paths relative to the
//! version directory, each listing the module's full set of dependencies.
//! Module names are file names without `.ko` and compression suffix, with `-`
//! and `_` equivalent, as the kernel treats them (`virtio-rng` = `virtio_rng`).

use std::collections::{HashMap, HashSet};

/// Suffixes a module file may carry. busybox insmod loads only plain `.ko`,
/// so the image builder decompresses the others.
const SUFFIXES: [&str; 4] = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"];

/// How a module file is compressed (Debian 13 uses xz, Ubuntu zstd).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Xz,
    Zstd,
    Gzip,
}

impl Compression {
    fn of(path: &str) -> Option<Compression> {
        match path.rsplit_once(".ko") {
            Some((_, ".xz")) => Some(Compression::Xz),
            Some((_, ".zst")) => Some(Compression::Zstd),
            Some((_, ".gz")) => Some(Compression::Gzip),
            _ => None,
        }
    }

    /// The program that decompresses it to stdout with `-dc`, and its package.
    pub fn tool(self) -> (&'static str, &'static str) {
        match self {
            Compression::Xz => ("xz", "xz-utils"),
            Compression::Zstd => ("zstd", "zstd"),
            Compression::Gzip => ("gzip", "gzip"),
        }
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum KmodError {
    #[error("module {module} is neither in modules.dep nor built in (modules.builtin)")]
    NotFound { module: String },
    #[error("modules.dep lists {dependency} as a dependency of {module} but has no entry for it; run depmod for this kernel")]
    MissingDependency { module: String, dependency: String },
    #[error("modules.dep has a dependency cycle through {module}")]
    Cycle { module: String },
}

/// One module to load: its canonical name and its path under `/lib/modules/<version>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModulePath {
    /// Name with `_` for `-`, as `lsmod` shows it: `virtio_rng`.
    pub name: String,
    /// As in modules.dep: `kernel/drivers/char/hw_random/virtio-rng.ko.xz`.
    pub path: String,
    /// Set when the file must be decompressed before insmod can load it.
    pub compression: Option<Compression>,
}

impl ModulePath {
    /// The loadable file name in the guest: `virtio-rng.ko`, compressed or not on the host.
    pub fn file_name(&self) -> &str {
        let base = self.path.rsplit('/').next().unwrap_or(&self.path);
        match base.rfind(".ko") {
            Some(i) => &base[..i + 3],
            None => base,
        }
    }
}

/// The modules to load, dependencies first and each once, for `wanted`.
/// Built-in modules are skipped; anything else not in `dep` is an error.
pub fn closure(wanted: &[&str], dep: &str, builtin: &str) -> Result<Vec<ModulePath>, KmodError> {
    let index = DepIndex::parse(dep);
    let builtin: HashSet<String> = builtin
        .lines()
        .filter_map(|line| module_name(line.trim()))
        .collect();
    let mut walk = Walk {
        index: &index,
        state: HashMap::new(),
        order: Vec::new(),
    };
    for want in wanted {
        let name = normalize(want);
        if builtin.contains(&name) {
            continue;
        }
        let path = index.path_of(&name).ok_or_else(|| KmodError::NotFound {
            module: name.clone(),
        })?;
        walk.visit(path)?;
    }
    walk.order
        .into_iter()
        .map(|path| {
            Ok(ModulePath {
                name: module_name(path).unwrap_or_default(),
                path: path.to_string(),
                compression: Compression::of(path),
            })
        })
        .collect()
}

/// Names from a module list: one per line, `#` starts a comment.
pub fn parse_list(text: &str) -> Vec<&str> {
    text.lines()
        .map(|line| line.split('#').next().unwrap_or("").trim())
        .filter(|line| !line.is_empty())
        .collect()
}

/// `modules.dep`, indexed by path and by module name.
struct DepIndex<'a> {
    deps: HashMap<&'a str, Vec<&'a str>>,
    by_name: HashMap<String, &'a str>,
}

impl<'a> DepIndex<'a> {
    /// Lines that do not look like `path: deps…` are ignored, as modprobe does.
    fn parse(text: &'a str) -> DepIndex<'a> {
        let mut deps = HashMap::new();
        let mut by_name = HashMap::new();
        for line in text.lines() {
            let Some((path, rest)) = line.split_once(':') else {
                continue;
            };
            let path = path.trim();
            let Some(name) = module_name(path) else {
                continue;
            };
            deps.insert(path, rest.split_whitespace().collect());
            by_name.insert(name, path);
        }
        DepIndex { deps, by_name }
    }

    fn path_of(&self, name: &str) -> Option<&'a str> {
        self.by_name.get(name).copied()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mark {
    Visiting,
    Done,
}

/// Depth-first walk that emits each module after all its dependencies.
struct Walk<'i, 'a> {
    index: &'i DepIndex<'a>,
    state: HashMap<&'a str, Mark>,
    order: Vec<&'a str>,
}

impl<'a> Walk<'_, 'a> {
    fn visit(&mut self, path: &'a str) -> Result<(), KmodError> {
        match self.state.get(path) {
            Some(Mark::Done) => return Ok(()),
            Some(Mark::Visiting) => {
                return Err(KmodError::Cycle {
                    module: module_name(path).unwrap_or_default(),
                })
            }
            None => {}
        }
        self.state.insert(path, Mark::Visiting);
        let deps = self.index.deps.get(path).cloned().unwrap_or_default();
        for dep in deps {
            if !self.index.deps.contains_key(dep) {
                return Err(KmodError::MissingDependency {
                    module: module_name(path).unwrap_or_default(),
                    dependency: dep.to_string(),
                });
            }
            self.visit(dep)?;
        }
        self.state.insert(path, Mark::Done);
        self.order.push(path);
        Ok(())
    }
}

/// `kernel/drivers/char/hw_random/virtio-rng.ko.xz` → `virtio_rng`;
/// `None` for anything that is not a module file.
fn module_name(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let stem = SUFFIXES
        .iter()
        .rev() // longest suffixes first, so `.ko.xz` is not read as `.ko`
        .find_map(|suffix| file.strip_suffix(suffix))?;
    (!stem.is_empty()).then(|| normalize(stem))
}

fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
";
    const BUILTIN: &str = "kernel/fs/ext4/ext4.ko\nkernel/fs/jbd2/jbd2.ko\n";

    fn names(mods: &[ModulePath]) -> Vec<&str> {
        mods.iter().map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn dependencies_come_first() {
        let mods = closure(&["virtio_pci"], DEP, BUILTIN).unwrap();
        assert_eq!(
            names(&mods),
            [
                "virtio_pci_legacy_dev",
                "virtio_pci_modern_dev",
                "virtio_ring",
                "virtio",
                "virtio_pci"
            ]
        );
    }

    #[test]
    fn shared_dependencies_appear_once() {
        let mods = closure(&["virtio_blk", "virtio_net", "virtio_blk"], DEP, "").unwrap();
        assert_eq!(
            names(&mods),
            [
                "virtio_ring",
                "virtio",
                "virtio_blk",
                "failover",
                "net_failover",
                "virtio_net"
            ]
        );
    }

    #[test]
    fn dash_and_underscore_are_the_same_name() {
        let mods = closure(&["virtio_rng"], DEP, "").unwrap();
        assert_eq!(mods[2].path, "kernel/drivers/char/hw_random/virtio-rng.ko");
        assert_eq!(mods[2].file_name(), "virtio-rng.ko");
        assert_eq!(
            names(&closure(&["virtio-blk"], DEP, "").unwrap())[2],
            "virtio_blk"
        );
    }

    #[test]
    fn builtin_modules_are_skipped() {
        assert_eq!(closure(&["ext4"], DEP, BUILTIN).unwrap(), []);
    }

    #[test]
    fn unknown_module_is_named() {
        let err = closure(&["virtio_gpu"], DEP, BUILTIN).unwrap_err();
        assert_eq!(
            err.to_string(),
            "module virtio_gpu is neither in modules.dep nor built in (modules.builtin)"
        );
    }

    #[test]
    fn compressed_modules_say_how_and_load_as_plain_ko() {
        let dep = "kernel/a.ko.xz: kernel/b.ko.zst\nkernel/b.ko.zst:\n";
        let mods = closure(&["a"], dep, "").unwrap();
        assert_eq!(mods[0].compression, Some(Compression::Zstd));
        assert_eq!(mods[0].file_name(), "b.ko");
        assert_eq!(mods[1].compression, Some(Compression::Xz));
        assert_eq!(mods[1].file_name(), "a.ko");
    }

    #[test]
    fn compressed_names_still_match() {
        let mods = closure(&["c"], "kernel/c.ko.gz:\n", "").unwrap();
        assert_eq!(
            (mods[0].name.as_str(), mods[0].compression),
            ("c", Some(Compression::Gzip))
        );
    }

    #[test]
    fn dependency_without_its_own_line_is_reported() {
        let err = closure(&["a"], "kernel/a.ko: kernel/gone.ko\n", "").unwrap_err();
        assert_eq!(
            err,
            KmodError::MissingDependency {
                module: "a".into(),
                dependency: "kernel/gone.ko".into()
            }
        );
    }

    #[test]
    fn cycle_is_an_error_not_a_hang() {
        let dep = "kernel/a.ko: kernel/b.ko\nkernel/b.ko: kernel/a.ko\n";
        assert!(matches!(
            closure(&["a"], dep, ""),
            Err(KmodError::Cycle { .. })
        ));
    }

    #[test]
    fn garbage_lines_are_ignored() {
        let dep = "not a module line\n:\nkernel/x.txt: y\nkernel/a.ko:\n";
        assert_eq!(names(&closure(&["a"], dep, "").unwrap()), ["a"]);
    }

    #[test]
    fn list_drops_comments_and_blanks() {
        assert_eq!(
            parse_list("# virtio\nvirtio_pci\n\n  virtio_blk  # disk\n"),
            ["virtio_pci", "virtio_blk"]
        );
    }
}
