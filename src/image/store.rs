//! The images directory: which names exist, and what booting each needs.
//!
//! Two shapes live in `images_dir`:
//! - a directory `<name>/` with an `image.json` manifest (the default guest:
//!   kernel, initramfs and a raw ext4 root disk, ready when the console prints
//!   its ready line);
//! - a bare disk `<name>.qcow2`, `<name>.raw` or `<name>.img`, booted through
//!   firmware.
//!
//! Every base is validated by `qcow::inspect_base` before a sandbox may sit on
//! it (format, truncation, backing chain confined to this directory). Building
//! the default guest is `image::default_guest`'s job, not this file's.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::image::manifest::Manifest;
use crate::qcow::{self, BaseFormat, ChainLink, QcowError};

/// The image a profile names when it names none.
pub const DEFAULT_IMAGE: &str = "default";

const DISK_EXTENSIONS: [&str; 3] = ["qcow2", "raw", "img"];

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Boot {
    /// SeaBIOS boots the disk.
    Firmware,
    /// Direct kernel boot.
    Kernel {
        kernel: PathBuf,
        initrd: PathBuf,
        cmdline: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub name: String,
    pub disk: PathBuf,
    pub format: BaseFormat,
    pub virtual_size: u64,
    /// The disk's own backing images, top-down (empty for a flat base).
    pub chain: Vec<ChainLink>,
    pub boot: Boot,
    /// `console:<marker>` or `running`.
    pub ready_on: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ImageSummary {
    pub name: String,
    pub path: String,
    pub format: Option<String>,
    pub virtual_size: Option<u64>,
    pub boot: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub built_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_version: Option<String>,
    /// Why the image cannot be used, when it cannot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("invalid image name {0:?}: use letters, digits, '-', '_' and '.'")]
    BadName(String),
    #[error("image {name:?} not found in {dir}{hint}")]
    NotFound {
        name: String,
        dir: PathBuf,
        hint: String,
    },
    #[error("image {name:?}: cannot read its manifest {path}")]
    Manifest {
        name: String,
        path: PathBuf,
        #[source]
        source: crate::image::manifest::ManifestError,
    },
    #[error("image {name:?}: {path} is missing")]
    MissingFile { name: String, path: PathBuf },
    #[error("image {name:?}: {path} leads to {target}, outside the images directory; images may only use files inside it")]
    Outside {
        name: String,
        path: PathBuf,
        target: PathBuf,
    },
    #[error("image {name:?} is not usable")]
    Invalid {
        name: String,
        #[source]
        source: QcowError,
    },
}

pub struct ImageStore {
    dir: PathBuf,
}

impl ImageStore {
    pub fn new(dir: &Path) -> ImageStore {
        ImageStore {
            dir: dir.to_path_buf(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// True when `name` would resolve to the default guest's directory.
    pub fn has_manifest(&self, name: &str) -> bool {
        self.dir.join(name).join("image.json").is_file()
    }

    pub fn resolve(&self, name: &str) -> Result<Image, ImageError> {
        check_name(name)?;
        let dir = self.dir.join(name);
        if dir.join("image.json").is_file() {
            return self.resolve_manifest(name, &dir);
        }
        for ext in DISK_EXTENSIONS {
            let path = self.dir.join(format!("{name}.{ext}"));
            if path.is_file() {
                let info =
                    qcow::inspect_base(&path, &self.dir).map_err(|source| ImageError::Invalid {
                        name: name.to_string(),
                        source,
                    })?;
                return Ok(Image {
                    name: name.to_string(),
                    disk: info.path,
                    format: info.format,
                    virtual_size: info.virtual_size,
                    chain: info.chain,
                    boot: Boot::Firmware,
                    ready_on: "running".to_string(),
                });
            }
        }
        let known: Vec<String> = self.list().into_iter().map(|s| s.name).collect();
        let hint = if name == DEFAULT_IMAGE {
            "; build it with `agentlab image build-default`".to_string()
        } else if known.is_empty() {
            format!("; put {name}.qcow2 or {name}.raw there")
        } else {
            format!("; available: {}", known.join(", "))
        };
        Err(ImageError::NotFound {
            name: name.to_string(),
            dir: self.dir.clone(),
            hint,
        })
    }

    fn resolve_manifest(&self, name: &str, dir: &Path) -> Result<Image, ImageError> {
        let m = Manifest::load(dir).map_err(|source| ImageError::Manifest {
            name: name.to_string(),
            path: dir.join("image.json"),
            source,
        })?;
        // A manifest may only name files beside it, and they must stay inside
        // the images directory once symlinks are followed: QEMU reads the
        // kernel and initrd before dropping privileges.
        let root = self
            .dir
            .canonicalize()
            .map_err(|_| ImageError::MissingFile {
                name: name.to_string(),
                path: self.dir.clone(),
            })?;
        let file = |rel: &str| -> Result<PathBuf, ImageError> {
            let p = dir.join(rel);
            let missing = || ImageError::MissingFile {
                name: name.to_string(),
                path: p.clone(),
            };
            if rel.contains('/') || !p.is_file() {
                return Err(missing());
            }
            let real = p.canonicalize().map_err(|_| missing())?;
            if !real.starts_with(&root) {
                return Err(ImageError::Outside {
                    name: name.to_string(),
                    path: p.clone(),
                    target: real,
                });
            }
            Ok(real)
        };
        let disk = file(&m.disk)?;
        let info = qcow::inspect_base(&disk, &self.dir).map_err(|source| ImageError::Invalid {
            name: name.to_string(),
            source,
        })?;
        let boot = match (&m.kernel, &m.initrd) {
            (Some(k), Some(i)) => Boot::Kernel {
                kernel: file(k)?,
                initrd: file(i)?,
                cmdline: m.cmdline.clone().unwrap_or_default(),
            },
            _ => Boot::Firmware,
        };
        Ok(Image {
            name: name.to_string(),
            disk: info.path,
            format: info.format,
            virtual_size: info.virtual_size,
            chain: info.chain,
            boot,
            ready_on: m.ready_on,
        })
    }

    /// Everything in the images directory that looks like an image, usable or not.
    pub fn list(&self) -> Vec<ImageSummary> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| {
                let e = e.ok()?;
                let fname = e.file_name().into_string().ok()?;
                if fname.starts_with('.') {
                    return None;
                }
                if e.path().join("image.json").is_file() {
                    return Some(fname);
                }
                let (stem, ext) = fname.rsplit_once('.')?;
                DISK_EXTENSIONS.contains(&ext).then(|| stem.to_string())
            })
            .collect();
        names.sort();
        names.dedup();
        names.into_iter().map(|n| self.summary(&n)).collect()
    }

    fn summary(&self, name: &str) -> ImageSummary {
        let manifest = Manifest::load(&self.dir.join(name)).ok();
        let mut s = ImageSummary {
            name: name.to_string(),
            path: String::new(),
            format: None,
            virtual_size: None,
            boot: "firmware",
            built_at: manifest.as_ref().map(|m| m.built_at.clone()),
            kernel_version: manifest.as_ref().and_then(|m| m.kernel_version.clone()),
            problem: None,
        };
        match self.resolve(name) {
            Ok(img) => {
                s.path = img.disk.display().to_string();
                s.format = Some(img.format.as_str().to_string());
                s.virtual_size = Some(img.virtual_size);
                if matches!(img.boot, Boot::Kernel { .. }) {
                    s.boot = "kernel";
                }
            }
            Err(e) => s.problem = Some(crate::log::error_chain(&e)),
        }
        s
    }
}

fn check_name(name: &str) -> Result<(), ImageError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(ImageError::BadName(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_slashes_are_refused() {
        let s = ImageStore::new(Path::new("/nonexistent"));
        assert!(matches!(s.resolve("../etc"), Err(ImageError::BadName(_))));
        assert!(matches!(s.resolve(".hidden"), Err(ImageError::BadName(_))));
    }

    #[test]
    fn manifest_files_may_not_point_outside_the_images_dir() {
        let dir = std::env::temp_dir().join(format!("agentlab-imgstore-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let img = dir.join("images/evil");
        std::fs::create_dir_all(&img).unwrap();
        std::fs::write(dir.join("secret"), b"x").unwrap();
        std::os::unix::fs::symlink(dir.join("secret"), img.join("initramfs.cpio")).unwrap();
        std::fs::write(img.join("vmlinuz"), b"k").unwrap();
        std::fs::write(img.join("rootfs.raw"), vec![0u8; 4096]).unwrap();
        let manifest = r#"{"name":"evil","format":"raw","disk":"rootfs.raw","kernel":"vmlinuz","initrd":"initramfs.cpio","cmdline":"","ready_on":"running","virtual_size":4096,"kernel_version":null,"built_at":"2026-01-01T00:00:00.000Z","agentlab_version":"0"}"#;
        std::fs::write(img.join("image.json"), manifest).unwrap();
        let err = ImageStore::new(&dir.join("images"))
            .resolve("evil")
            .unwrap_err();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(matches!(err, ImageError::Outside { .. }), "{err}");
    }

    #[test]
    fn missing_default_suggests_building_it() {
        let s = ImageStore::new(Path::new("/nonexistent"));
        let err = s.resolve(DEFAULT_IMAGE).unwrap_err();
        assert!(err.to_string().contains("agentlab image build-default"));
    }
}
