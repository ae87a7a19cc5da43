//! The guest kernel: which `/boot/vmlinuz-<version>` the default guest boots,
//! and which of its modules (from `/lib/modules/<version>`) it needs.
//!
//! Owns the choice of kernel on the host and the reading of its module
//! indexes; the dependency logic itself is pure and lives in `kmod`. It does
//! not copy anything into the image (`default_guest` does).

use std::cmp::Ordering;
use std::fs;
use std::path::{Path, PathBuf};

use super::kmod::{self, KmodError, ModulePath};

const BOOT_DIR: &str = "/boot";
const MODULES_DIR: &str = "/lib/modules";
const KERNEL_HINT: &str = "install a guest kernel: apt-get install linux-image-cloud-amd64";

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "no guest kernel: no {BOOT_DIR}/vmlinuz-* has modules in {MODULES_DIR}; {KERNEL_HINT}"
    )]
    NotFound,
    #[error("cannot tell the version of kernel {path}: name it vmlinuz-<version>, with its modules in {MODULES_DIR}/<version>")]
    Unversioned { path: PathBuf },
    #[error("kernel {version} has no {path}; install the kernel package with its modules, or {KERNEL_HINT}")]
    NoModules { version: String, path: PathBuf },
    #[error("kernel {version} cannot drive the default guest's devices; {KERNEL_HINT}")]
    Modules {
        version: String,
        #[source]
        source: KmodError,
    },
}

/// A kernel for the guest and where its modules are.
#[derive(Debug, PartialEq, Eq)]
pub struct GuestKernel {
    pub path: PathBuf,
    /// `uname -r` of that kernel: `6.1.0-56-cloud-amd64`.
    pub version: String,
    /// `/lib/modules/<version>`.
    pub modules_dir: PathBuf,
}

impl GuestKernel {
    /// The running kernel when its image and modules are installed, else the
    /// newest `/boot/vmlinuz-*` that has modules.
    pub fn detect() -> Result<GuestKernel, KernelError> {
        find(
            Path::new(BOOT_DIR),
            Path::new(MODULES_DIR),
            &running_release(),
        )
    }

    /// A kernel chosen by path; its version comes from its name,
    /// `vmlinuz-<version>`, as Debian and Ubuntu install them.
    pub fn at(path: &Path) -> Result<GuestKernel, KernelError> {
        at(path, Path::new(MODULES_DIR))
    }

    /// The modules to load for `wanted`, dependencies first, built-ins left out.
    pub fn modules(&self, wanted: &[&str]) -> Result<Vec<ModulePath>, KernelError> {
        let read = |name: &str| {
            let path = self.modules_dir.join(name);
            fs::read_to_string(&path).map_err(|_| KernelError::NoModules {
                version: self.version.clone(),
                path,
            })
        };
        let dep = read("modules.dep")?;
        // A kernel with every driver built in may ship no modules.builtin.
        let builtin = read("modules.builtin").unwrap_or_default();
        kmod::closure(wanted, &dep, &builtin).map_err(|source| KernelError::Modules {
            version: self.version.clone(),
            source,
        })
    }
}

fn find(boot: &Path, modules_root: &Path, running: &str) -> Result<GuestKernel, KernelError> {
    let usable = |version: &str| {
        let path = boot.join(format!("vmlinuz-{version}"));
        let modules_dir = modules_root.join(version);
        (path.is_file() && modules_dir.join("modules.dep").is_file()).then(|| GuestKernel {
            path,
            version: version.to_string(),
            modules_dir,
        })
    };
    if let Some(kernel) = usable(running) {
        return Ok(kernel);
    }
    let mut versions: Vec<String> = fs::read_dir(boot)
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            name.strip_prefix("vmlinuz-").map(str::to_string)
        })
        .collect();
    versions.sort_by(|a, b| version_cmp(a, b));
    versions
        .iter()
        .rev()
        .find_map(|v| usable(v))
        .ok_or(KernelError::NotFound)
}

fn at(path: &Path, modules_root: &Path) -> Result<GuestKernel, KernelError> {
    let version = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .filter(|v| !v.is_empty())
        .ok_or_else(|| KernelError::Unversioned {
            path: path.to_path_buf(),
        })?;
    Ok(GuestKernel {
        path: path.to_path_buf(),
        version: version.to_string(),
        modules_dir: modules_root.join(version),
    })
}

/// `uname -r` of the running kernel.
fn running_release() -> String {
    rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned()
}

/// Compares version strings the way `sort -V` roughly does: digit runs as
/// numbers, everything else as text, so `6.10.0` sorts after `6.9.0`.
fn version_cmp(a: &str, b: &str) -> Ordering {
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    for (x, y) in chunks(a).into_iter().zip(chunks(b)) {
        let order = if numeric(x) && numeric(y) {
            let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
            x.len().cmp(&y.len()).then_with(|| x.cmp(y))
        } else {
            x.cmp(y)
        };
        if order.is_ne() {
            return order;
        }
    }
    a.len().cmp(&b.len())
}

/// `6.1.0-56-cloud` → `6`, `.`, `1`, `.`, `0`, `-`, `56`, `-cloud`.
fn chunks(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let bytes = s.as_bytes();
    for i in 1..bytes.len() {
        if bytes[i - 1].is_ascii_digit() != bytes[i].is_ascii_digit() {
            out.push(&s[start..i]);
            start = i;
        }
    }
    out.push(&s[start..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `boot/vmlinuz-<v>` for each of `versions`, and modules for `with_modules`,
    /// in a scratch directory removed on drop.
    struct FakeHost(PathBuf);

    impl FakeHost {
        fn new(tag: &str, versions: &[&str], with_modules: &[&str]) -> FakeHost {
            let root =
                std::env::temp_dir().join(format!("agentlab-kernel-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(root.join("boot")).unwrap();
            for v in versions {
                fs::write(root.join("boot").join(format!("vmlinuz-{v}")), "k").unwrap();
            }
            for v in with_modules {
                fs::create_dir_all(root.join("modules").join(v)).unwrap();
                fs::write(root.join("modules").join(v).join("modules.dep"), "").unwrap();
            }
            FakeHost(root)
        }

        fn find(&self, running: &str) -> Result<GuestKernel, KernelError> {
            find(&self.0.join("boot"), &self.0.join("modules"), running)
        }
    }

    impl Drop for FakeHost {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn running_kernel_wins_when_it_has_modules() {
        let host = FakeHost::new(
            "running",
            &["6.1.0-9", "6.1.0-10"],
            &["6.1.0-9", "6.1.0-10"],
        );
        assert_eq!(host.find("6.1.0-9").unwrap().version, "6.1.0-9");
    }

    #[test]
    fn newest_kernel_with_modules_is_chosen_otherwise() {
        let host = FakeHost::new(
            "newest",
            &["6.1.0-9", "6.1.0-10", "6.2.0-1"],
            &["6.1.0-9", "6.1.0-10"],
        );
        let kernel = host.find("6.18.44-fc").unwrap();
        assert_eq!(kernel.path, host.0.join("boot/vmlinuz-6.1.0-10"));
        assert_eq!(kernel.modules_dir, host.0.join("modules/6.1.0-10"));
    }

    #[test]
    fn no_kernel_says_what_to_install() {
        let host = FakeHost::new("none", &["6.1.0-9"], &[]);
        let err = host.find("6.1.0-9").unwrap_err();
        assert!(err
            .to_string()
            .ends_with("install a guest kernel: apt-get install linux-image-cloud-amd64"));
    }

    #[test]
    fn explicit_kernel_takes_its_version_from_its_name() {
        let kernel = at(
            Path::new("/k/vmlinuz-6.1.0-56-cloud-amd64"),
            Path::new("/m"),
        )
        .unwrap();
        assert_eq!(kernel.version, "6.1.0-56-cloud-amd64");
        assert_eq!(kernel.modules_dir, Path::new("/m/6.1.0-56-cloud-amd64"));
    }

    #[test]
    fn kernel_without_a_version_in_its_name_is_refused() {
        let err = at(Path::new("/k/bzImage"), Path::new("/m")).unwrap_err();
        assert!(matches!(err, KernelError::Unversioned { .. }));
    }

    #[test]
    fn missing_module_names_the_kernel_and_the_package() {
        let host = FakeHost::new("nomod", &["6.1.0-9"], &["6.1.0-9"]);
        let err = host
            .find("6.1.0-9")
            .unwrap()
            .modules(&["virtio_blk"])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel 6.1.0-9 cannot drive the default guest's devices; \
             install a guest kernel: apt-get install linux-image-cloud-amd64"
        );
        assert!(matches!(
            err,
            KernelError::Modules {
                source: KmodError::NotFound { .. },
                ..
            }
        ));
    }

    #[test]
    fn versions_compare_numerically() {
        assert_eq!(version_cmp("6.10.0-1", "6.9.0-1"), Ordering::Greater);
        assert_eq!(
            version_cmp("6.1.0-56-cloud", "6.1.0-9-cloud"),
            Ordering::Greater
        );
        assert_eq!(version_cmp("6.1.0", "6.1.0-1"), Ordering::Less);
        assert_eq!(version_cmp("6.1.0-1", "6.1.0-1"), Ordering::Equal);
    }

    #[test]
    fn installed_kernel_has_the_default_guest_modules() {
        let kernel = GuestKernel::detect().expect("apt-get install linux-image-cloud-amd64");
        let mods = kernel.modules(&["virtio_pci", "virtio_blk"]).unwrap();
        assert_eq!(mods.last().map(|m| m.name.as_str()), Some("virtio_blk"));
    }
}
