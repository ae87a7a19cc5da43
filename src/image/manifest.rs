//! An image's manifest: `image.json` in the image's directory, saying what
//! the image is made of and how a sandbox boots it.
//!
//! Owns the file's fields, reading it, and replacing it atomically (write a
//! temporary file, fsync, rename). It does not decide where image directories
//! live (the image store does) or what a sandbox's command line looks like
//! (the QEMU backend does, from these fields).

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The manifest's file name inside an image directory.
pub const FILE_NAME: &str = "image.json";

/// Unknown fields are accepted rather than refused: an image built by a newer
/// agentlab stays usable by an older one as long as the fields here still mean
/// what they meant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// `default`, or the name an image was imported under.
    pub name: String,
    /// Format of `disk`: `raw` or `qcow2`; the base under sandboxes' overlays.
    pub format: String,
    /// The disk's file name, relative to the image directory: `rootfs.raw`.
    pub disk: String,
    /// Kernel for direct boot (`-kernel`), relative to the image directory.
    pub kernel: Option<String>,
    /// Initramfs for direct boot (`-initrd`), relative to the image directory.
    pub initrd: Option<String>,
    /// Kernel command line for direct boot; callers append their own arguments.
    pub cmdline: Option<String>,
    /// How readiness shows: `console:<marker>` is a line on the serial console.
    pub ready_on: String,
    /// The disk's size in bytes as the guest sees it.
    pub virtual_size: u64,
    /// `uname -r` of the kernel, when the image carries one.
    pub kernel_version: Option<String>,
    /// When the image was made, RFC 3339.
    pub built_at: String,
    /// The agentlab that made it.
    pub agentlab_version: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read the image manifest {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the image manifest {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write the image manifest {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl Manifest {
    /// Reads `<dir>/image.json`.
    pub fn load(dir: &Path) -> Result<Manifest, ManifestError> {
        let path = dir.join(FILE_NAME);
        let text = std::fs::read(&path).map_err(|source| ManifestError::Read {
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&text).map_err(|source| ManifestError::Parse { path, source })
    }

    /// Writes `<dir>/image.json` so that a reader sees the old file or the
    /// new one, never a part of either.
    pub fn store(&self, dir: &Path) -> Result<(), ManifestError> {
        let path = dir.join(FILE_NAME);
        let tmp = dir.join(format!(".{FILE_NAME}.tmp-{}", std::process::id()));
        let write = || -> io::Result<()> {
            let mut json = serde_json::to_vec_pretty(self)?;
            json.push(b'\n');
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&json)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|source| {
            let _ = std::fs::remove_file(&tmp);
            ManifestError::Write { path, source }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            name: "default".into(),
            format: "raw".into(),
            disk: "rootfs.raw".into(),
            kernel: Some("vmlinuz".into()),
            initrd: Some("initramfs.cpio".into()),
            cmdline: Some("console=ttyS0 panic=-1 quiet".into()),
            ready_on: "console:AGENTLAB-READY".into(),
            virtual_size: 2 << 30,
            kernel_version: Some("6.1.0-56-cloud-amd64".into()),
            built_at: "2026-11-22T05:16:00.123Z".into(),
            agentlab_version: "0.1.0".into(),
        }
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("agentlab-manifest-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn stored_manifest_loads_back_and_leaves_no_temp_file() {
        let dir = temp_dir("roundtrip");
        sample().store(&dir).unwrap();
        let loaded = Manifest::load(&dir);
        let files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(loaded.unwrap(), sample());
        assert_eq!(files, [FILE_NAME]);
    }

    #[test]
    fn store_replaces_an_existing_manifest() {
        let dir = temp_dir("replace");
        sample().store(&dir).unwrap();
        let newer = Manifest {
            virtual_size: 4 << 30,
            ..sample()
        };
        newer.store(&dir).unwrap();
        let loaded = Manifest::load(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(loaded.unwrap().virtual_size, 4 << 30);
    }

    #[test]
    fn missing_manifest_names_the_path() {
        let err = Manifest::load(Path::new("/nonexistent/agentlab-image")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot read the image manifest /nonexistent/agentlab-image/image.json"
        );
    }

    #[test]
    fn broken_manifest_is_a_parse_error() {
        let dir = temp_dir("broken");
        std::fs::write(dir.join(FILE_NAME), "{\"name\": 1}").unwrap();
        let err = Manifest::load(&dir).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(err, ManifestError::Parse { .. }));
    }

    #[test]
    fn optional_fields_serialize_as_null() {
        let m = Manifest {
            kernel: None,
            ..sample()
        };
        let json: serde_json::Value = serde_json::to_value(&m).unwrap();
        assert_eq!(json["kernel"], serde_json::Value::Null);
        assert_eq!(json["ready_on"], "console:AGENTLAB-READY");
    }
}
