//! TEMPORARY stand-in with the contracted API; replaced at merge.
use std::path::{Path, PathBuf};

use crate::image::manifest::Manifest;

pub struct BuildOptions {
    pub images_dir: PathBuf,
    pub kernel: Option<PathBuf>,
    pub agent_binary: PathBuf,
    pub busybox: PathBuf,
    pub disk_size: u64,
    pub force: bool,
}
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct GuestImageError(String);
pub fn build(
    _opts: &BuildOptions,
    _progress: &mut dyn FnMut(&str),
) -> Result<Manifest, GuestImageError> {
    Err(GuestImageError("not merged yet".into()))
}
pub fn is_built(images_dir: &Path) -> bool {
    images_dir.join("default/image.json").is_file()
}
