//! TEMPORARY stand-in with the contracted API; replaced by the real module at merge.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BaseFormat {
    Qcow2,
    Raw,
}
impl BaseFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            BaseFormat::Qcow2 => "qcow2",
            BaseFormat::Raw => "raw",
        }
    }
}
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainLink {
    pub path: PathBuf,
    pub format: BaseFormat,
}
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseInfo {
    pub path: PathBuf,
    pub format: BaseFormat,
    pub virtual_size: u64,
    pub chain: Vec<ChainLink>,
}
#[derive(Debug, thiserror::Error)]
pub enum QcowError {
    #[error("{0}")]
    Msg(String),
}
pub fn inspect_base(path: &Path, _images_dir: &Path) -> Result<BaseInfo, QcowError> {
    let len = std::fs::metadata(path)
        .map_err(|e| QcowError::Msg(e.to_string()))?
        .len();
    Ok(BaseInfo {
        path: path.into(),
        format: BaseFormat::Raw,
        virtual_size: len,
        chain: vec![],
    })
}
pub fn write_overlay(
    path: &Path,
    backing: &Path,
    fmt: BaseFormat,
    size: u64,
) -> Result<(), QcowError> {
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", fmt.as_str(), "-b"])
        .arg(backing)
        .arg(path)
        .arg(size.to_string())
        .status()
        .map_err(|e| QcowError::Msg(e.to_string()))?;
    if st.success() {
        Ok(())
    } else {
        Err(QcowError::Msg("qemu-img failed".into()))
    }
}
