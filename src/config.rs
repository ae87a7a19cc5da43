//! TEMPORARY stand-in with the contracted API; replaced by the real loader at merge.
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Qemu,
    Proxmox,
}
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Auto,
    Kvm,
    Tcg,
}
impl Accel {
    pub fn parse(s: &str) -> Option<Accel> {
        match s {
            "auto" => Some(Accel::Auto),
            "kvm" => Some(Accel::Kvm),
            "tcg" => Some(Accel::Tcg),
            _ => None,
        }
    }
}
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Config {
    pub source: Option<PathBuf>,
    pub backend: BackendKind,
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
    pub socket_path: PathBuf,
    pub socket_group: Option<String>,
    pub profiles_dir: PathBuf,
    pub images_dir: PathBuf,
    pub sandboxes_dir: PathBuf,
    pub db_path: PathBuf,
    pub log_path: PathBuf,
    pub accel: Accel,
    pub qemu_binary: String,
    pub qemu_user: Option<String>,
    pub kernel: Option<PathBuf>,
    pub provisioning_timeout: Duration,
    pub boot_timeout: Duration,
    pub stop_timeout: Duration,
    pub console_log_max_bytes: u64,
    pub default_ttl: Option<Duration>,
}
impl Config {
    pub fn defaults() -> Config {
        let d = PathBuf::from("/var/lib/agentlab");
        Config {
            source: None,
            backend: BackendKind::Qemu,
            run_dir: "/run/agentlab".into(),
            socket_path: "/run/agentlab/agentlabd.sock".into(),
            socket_group: None,
            profiles_dir: "/etc/agentlab/profiles".into(),
            images_dir: d.join("images"),
            sandboxes_dir: d.join("sandboxes"),
            db_path: d.join("db"),
            log_path: d.join("agentlabd.log"),
            data_dir: d,
            accel: Accel::Auto,
            qemu_binary: "qemu-system-x86_64".into(),
            qemu_user: None,
            kernel: None,
            provisioning_timeout: Duration::from_secs(600),
            boot_timeout: Duration::from_secs(300),
            stop_timeout: Duration::from_secs(30),
            console_log_max_bytes: 8 << 20,
            default_ttl: None,
        }
    }
    pub fn load(_path: &Path, _explicit: bool) -> Result<Config, ConfigError> {
        Ok(Config::defaults())
    }
    pub fn with_data_dir(mut self, dir: &Path) -> Config {
        self.data_dir = dir.into();
        self.images_dir = dir.join("images");
        self.sandboxes_dir = dir.join("sandboxes");
        self.db_path = dir.join("db");
        self.log_path = dir.join("agentlabd.log");
        self
    }
}
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    Off,
    Nat,
    Allowlist,
}
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkProfile {
    pub bridge: String,
    pub model: String,
    pub mode: NetworkMode,
    pub allow: Vec<String>,
}
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub cores: u32,
    pub memory_mb: u32,
    pub balloon: bool,
}
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Storage {
    pub root_size_gb: Option<u32>,
    pub workspace: String,
}
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Behavior {
    pub mode: String,
    pub keepalive_default: bool,
    pub ttl_minutes_default: Option<u32>,
}
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    pub name: String,
    pub source: Option<PathBuf>,
    pub template_vmid: Option<u32>,
    pub image: String,
    pub network: NetworkProfile,
    pub resources: Resources,
    pub storage: Storage,
    pub behavior: Behavior,
}
pub struct Profiles {
    list: Vec<Profile>,
}
impl Profiles {
    pub fn load(_dir: &Path) -> Result<Profiles, ConfigError> {
        Ok(Profiles {
            list: vec![Profiles::builtin_default()],
        })
    }
    pub fn builtin_default() -> Profile {
        Profile {
            name: "default".into(),
            source: None,
            template_vmid: None,
            image: "default".into(),
            network: NetworkProfile {
                bridge: "agentlab0".into(),
                model: "virtio".into(),
                mode: NetworkMode::Nat,
                allow: vec![],
            },
            resources: Resources {
                cores: 1,
                memory_mb: 512,
                balloon: false,
            },
            storage: Storage {
                root_size_gb: None,
                workspace: "none".into(),
            },
            behavior: Behavior {
                mode: "dangerous".into(),
                keepalive_default: false,
                ttl_minutes_default: None,
            },
        }
    }
    pub fn get(&self, name: &str) -> Option<&Profile> {
        self.list.iter().find(|p| p.name == name)
    }
    pub fn list(&self) -> Vec<&Profile> {
        self.list.iter().collect()
    }
    pub fn resolve(
        &self,
        profile: Option<&str>,
        modifiers: &[String],
    ) -> Result<&Profile, ConfigError> {
        let name = match (profile, modifiers.is_empty()) {
            (Some(p), true) => p.to_string(),
            (None, true) => "default".to_string(),
            (None, false) => {
                let mut m: Vec<String> = modifiers
                    .iter()
                    .map(|s| s.trim_start_matches('+').to_string())
                    .collect();
                m.sort();
                m.join("-")
            }
            (Some(_), false) => {
                return Err(ConfigError::Msg(
                    "give --profile or +modifiers, not both".into(),
                ))
            }
        };
        self.get(&name)
            .ok_or(ConfigError::Msg(format!("unknown profile {name}")))
    }
}
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Msg(String),
}
