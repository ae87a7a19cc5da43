//! TEMPORARY stand-in with the contracted API; replaced at merge.
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub format: String,
    pub disk: String,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
    pub ready_on: String,
    pub virtual_size: u64,
    pub kernel_version: Option<String>,
    pub built_at: String,
    pub agentlab_version: String,
}
impl Manifest {
    pub fn load(dir: &Path) -> std::io::Result<Manifest> {
        let b = std::fs::read(dir.join("image.json"))?;
        serde_json::from_slice(&b)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}
