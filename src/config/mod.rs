//! `/etc/agentlab/config.yaml` and profiles: parse → validate → typed.
//!
//! Owns the daemon's settings ([`Config`]: paths, backend, QEMU, timeouts;
//! the Proxmox API keys in `proxmox.rs`) and, in `profile.rs`, the profiles
//! ([`Profile`], [`Profiles`]). Nothing here acts on a setting; it only guarantees that a
//! value that reaches the rest of agentlab has been checked, and that a bad
//! one is reported with the file, the key path and what is allowed:
//! `/etc/agentlab/profiles/small.yaml: resources.memroy_mb: unknown key; …`.
//!
//! Key names and allowed values follow AgentLab (`internal/config/config.go`,
//! `internal/daemon/profile*.go`) where the two tools share a setting. Unknown
//! keys are errors, unlike AgentLab, which ignores them. The YAML tree comes
//! from yaml-rust2 and is walked by the small reader in `yaml.rs`.

mod network;
mod profile;
mod proxmox;
mod yaml;

pub use network::NetworkConfig;
pub use profile::{
    is_valid_name, parse_profile_str, AllowRule, Behavior, NetworkMode, NetworkProfile, NicModel,
    Profile, Profiles, Resources, Storage, BEHAVIOR_MODES, WORKSPACE_MODES,
};
pub use proxmox::{ApiToken, CloneMode, ProxmoxConfig, Sha256Fingerprint};

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

use yaml::{Mapping, Node, Problem, Read, SyntaxError};

/// Where `config.yaml` lives unless `--config` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/agentlab/config.yaml";
const DEFAULT_CONFIG_DIR: &str = "/etc/agentlab";
const DEFAULT_DATA_DIR: &str = "/var/lib/agentlab";
const DEFAULT_RUN_DIR: &str = "/run/agentlab";
// Leaf names under data_dir / run_dir (DESIGN.md §4 "Host layout").
const SOCKET_NAME: &str = "agentlabd.sock";
const IMAGES_NAME: &str = "images";
const SANDBOXES_NAME: &str = "sandboxes";
const DB_NAME: &str = "db";
const LOG_NAME: &str = "agentlabd.log";

const CONSOLE_LOG_MIN: u64 = 64 * 1024;
const CONSOLE_LOG_MAX: u64 = 1 << 40;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Qemu,
    Proxmox,
}

/// The QEMU accelerator: `auto` uses KVM when `/dev/kvm` works, else TCG.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Auto,
    Kvm,
    Tcg,
}

impl Accel {
    /// `auto`, `kvm` or `tcg`, in any case (also used for `AGENTLAB_ACCEL`).
    pub fn parse(s: &str) -> Option<Accel> {
        ACCELS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(s.trim()))
            .map(|(_, a)| *a)
    }
}

const ACCELS: &[(&str, Accel)] = &[
    ("auto", Accel::Auto),
    ("kvm", Accel::Kvm),
    ("tcg", Accel::Tcg),
];
const BACKENDS: &[(&str, BackendKind)] = &[
    ("qemu", BackendKind::Qemu),
    ("proxmox", BackendKind::Proxmox),
];

/// The daemon's settings, every default applied and every value checked.
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
    #[serde(serialize_with = "ser_duration")]
    pub provisioning_timeout: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub boot_timeout: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub stop_timeout: Duration,
    pub console_log_max_bytes: u64,
    /// Events kept in the log; older ones are dropped (an exec is two).
    pub event_log_max: u64,
    #[serde(serialize_with = "ser_opt_duration")]
    pub default_ttl: Option<Duration>,
    pub proxmox: Option<ProxmoxConfig>,
    pub network: NetworkConfig,
}

/// Why a config file or profile could not be used. `main` prints the chain.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read {}", path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("read profiles directory {}", path.display())]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: invalid YAML at line {line}, column {column}: {message}", path.display())]
    ParseYaml {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// A value is missing, of the wrong type, out of range or not allowed.
    /// `document` counts from 1 and is set when the file holds several.
    #[error("{}: {}", location(path, *document), detail(key, problem))]
    Validate {
        path: PathBuf,
        document: Option<usize>,
        key: String,
        problem: String,
    },
    #[error("profile {name:?} is defined twice, in {} and in {}; rename one", first.display(), second.display())]
    DuplicateProfile {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("unknown profile {name:?}; known profiles: {}", known.join(", "))]
    UnknownProfile { name: String, known: Vec<String> },
    #[error("give either --profile {profile} or modifiers ({}), not both", modifiers.join(" "))]
    ProfileAndModifiers {
        profile: String,
        modifiers: Vec<String>,
    },
}

fn location(path: &Path, document: Option<usize>) -> String {
    match document {
        Some(n) => format!("{} (document {n})", path.display()),
        None => path.display().to_string(),
    }
}

fn detail(key: &str, problem: &str) -> String {
    if key.is_empty() {
        problem.to_string()
    } else {
        format!("{key}: {problem}")
    }
}

impl ConfigError {
    fn syntax(path: &Path, e: SyntaxError) -> ConfigError {
        ConfigError::ParseYaml {
            path: path.to_path_buf(),
            line: e.line,
            column: e.column,
            message: e.message,
        }
    }

    fn invalid(path: &Path, document: Option<usize>, p: Problem) -> ConfigError {
        ConfigError::Validate {
            path: path.to_path_buf(),
            document,
            key: p.key,
            problem: p.message,
        }
    }
}

impl Config {
    /// Every default: `/etc/agentlab/profiles`, `/var/lib/agentlab`, QEMU backend.
    pub fn defaults() -> Config {
        Config::defaults_in(Path::new(DEFAULT_CONFIG_DIR))
    }

    /// Defaults for a config file kept in `config_dir` (profiles sit beside it).
    fn defaults_in(config_dir: &Path) -> Config {
        let data_dir = PathBuf::from(DEFAULT_DATA_DIR);
        let run_dir = PathBuf::from(DEFAULT_RUN_DIR);
        Config {
            source: None,
            backend: BackendKind::Qemu,
            socket_path: run_dir.join(SOCKET_NAME),
            socket_group: None,
            profiles_dir: config_dir.join("profiles"),
            images_dir: data_dir.join(IMAGES_NAME),
            sandboxes_dir: data_dir.join(SANDBOXES_NAME),
            db_path: data_dir.join(DB_NAME),
            log_path: data_dir.join(LOG_NAME),
            data_dir,
            run_dir,
            accel: Accel::Auto,
            qemu_binary: "qemu-system-x86_64".into(),
            qemu_user: None,
            kernel: None,
            provisioning_timeout: Duration::from_secs(10 * 60),
            boot_timeout: Duration::from_secs(5 * 60),
            stop_timeout: Duration::from_secs(30),
            console_log_max_bytes: 8 * 1024 * 1024,
            event_log_max: 200_000,
            default_ttl: None,
            proxmox: None,
            network: NetworkConfig::default(),
        }
    }

    /// Reads `path`. A missing file is not an error when `explicit` is false
    /// (the default path on a fresh host): defaults apply. When `explicit` is
    /// true a missing file is an error naming it.
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
        match fs::read_to_string(path) {
            Ok(text) => parse_config_str(&text, path),
            Err(e) if e.kind() == io::ErrorKind::NotFound && !explicit => {
                Ok(Config::defaults_in(config_dir(path)))
            }
            Err(source) => Err(ConfigError::ReadFile {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// `--state-dir`: replaces `data_dir` and moves every path that was
    /// derived from it. A path counts as derived when it still equals its
    /// default under the old `data_dir` (`<data_dir>/images`, …); one set in
    /// the file to somewhere else stays put. A defaulted `run_dir` becomes
    /// `<dir>/run` (and the socket with it).
    pub fn with_data_dir(mut self, dir: &Path) -> Config {
        let old = std::mem::replace(&mut self.data_dir, dir.to_path_buf());
        let derived = [
            (&mut self.images_dir, IMAGES_NAME),
            (&mut self.sandboxes_dir, SANDBOXES_NAME),
            (&mut self.db_path, DB_NAME),
            (&mut self.log_path, LOG_NAME),
        ];
        for (path, leaf) in derived {
            if *path == old.join(leaf) {
                *path = dir.join(leaf);
            }
        }
        // A state dir is a whole installation: unless the file put them
        // elsewhere, the run dir (sockets, VM run dirs) moves with it too, so
        // `--state-dir` never talks to, or shares VM sockets with, the
        // system daemon.
        if self.run_dir == Path::new(DEFAULT_RUN_DIR) {
            let old_socket = self.run_dir.join(SOCKET_NAME);
            self.run_dir = dir.join("run");
            if self.socket_path == old_socket {
                self.socket_path = self.run_dir.join(SOCKET_NAME);
            }
        }
        self
    }
}

/// The directory holding the config file; profiles default to `<it>/profiles`.
fn config_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

const CONFIG_KEYS: &[&str] = &[
    "backend",
    "data_dir",
    "run_dir",
    "socket_path",
    "socket_group",
    "profiles_dir",
    "images_dir",
    "sandboxes_dir",
    "db_path",
    "log_path",
    "accel",
    "qemu_binary",
    "qemu_user",
    "kernel",
    "provisioning_timeout",
    "boot_timeout",
    "stop_timeout",
    "console_log_max_bytes",
    "event_log_max",
    "default_ttl",
];

/// Parses config.yaml text. `origin` names the file in errors, becomes
/// `source`, and anchors the default `profiles_dir`. Empty text (or only
/// comments) gives the defaults.
pub fn parse_config_str(text: &str, origin: &Path) -> Result<Config, ConfigError> {
    let docs = yaml::load(text).map_err(|e| ConfigError::syntax(origin, e))?;
    let docs: Vec<_> = docs
        .iter()
        .filter(|d| !yaml::is_empty_document(d))
        .collect();
    let mut config = match docs.as_slice() {
        [] => Config::defaults_in(config_dir(origin)),
        [root] => config_from_yaml(&Node::root(root), config_dir(origin))
            .map_err(|p| ConfigError::invalid(origin, None, p))?,
        _ => {
            let problem = Problem {
                key: String::new(),
                message: format!(
                    "holds {} YAML documents; a config file holds one",
                    docs.len()
                ),
            };
            return Err(ConfigError::invalid(origin, None, problem));
        }
    };
    config.source = Some(origin.to_path_buf());
    Ok(config)
}

fn config_from_yaml(root: &Node, config_dir: &Path) -> Read<Config> {
    let m = root.mapping_of(&[CONFIG_KEYS, proxmox::PROXMOX_KEYS, network::NETWORK_KEYS])?;
    let mut c = Config::defaults_in(config_dir);
    read_paths(&m, &mut c)?;
    read_runtime(&m, &mut c)?;
    c.proxmox = proxmox::read_proxmox(&m, &c.backend)?;
    c.network = network::read_network(&m)?;
    Ok(c)
}

fn read_paths(m: &Mapping, c: &mut Config) -> Read<()> {
    if let Some(dir) = m.opt("data_dir", abs_path)? {
        c.data_dir = dir;
    }
    if let Some(dir) = m.opt("run_dir", abs_path)? {
        c.run_dir = dir;
    }
    if let Some(dir) = m.opt("profiles_dir", abs_path)? {
        c.profiles_dir = dir;
    }
    let under = |m: &Mapping, key: &str, base: &Path, leaf: &str| -> Read<PathBuf> {
        Ok(m.opt(key, abs_path)?.unwrap_or_else(|| base.join(leaf)))
    };
    c.socket_path = under(m, "socket_path", &c.run_dir, SOCKET_NAME)?;
    c.images_dir = under(m, "images_dir", &c.data_dir, IMAGES_NAME)?;
    c.sandboxes_dir = under(m, "sandboxes_dir", &c.data_dir, SANDBOXES_NAME)?;
    c.db_path = under(m, "db_path", &c.data_dir, DB_NAME)?;
    c.log_path = under(m, "log_path", &c.data_dir, LOG_NAME)?;
    c.kernel = m.opt("kernel", abs_path)?;
    Ok(())
}

fn read_runtime(m: &Mapping, c: &mut Config) -> Read<()> {
    if let Some(backend) = m.opt("backend", |n| n.choice("a backend", BACKENDS))? {
        c.backend = backend;
    }
    if let Some(accel) = m.opt("accel", |n| n.choice("an accelerator", ACCELS))? {
        c.accel = accel;
    }
    if let Some(binary) = m.opt("qemu_binary", program_value)? {
        c.qemu_binary = binary;
    }
    c.qemu_user = m.opt("qemu_user", account_value)?;
    c.socket_group = m.opt("socket_group", account_value)?;
    for (key, slot) in [
        ("provisioning_timeout", &mut c.provisioning_timeout),
        ("boot_timeout", &mut c.boot_timeout),
        ("stop_timeout", &mut c.stop_timeout),
    ] {
        if let Some(d) = m.opt(key, positive_duration)? {
            *slot = d;
        }
    }
    let bytes = m.opt("console_log_max_bytes", |n| {
        n.int_in(CONSOLE_LOG_MIN..=CONSOLE_LOG_MAX)
    })?;
    if let Some(bytes) = bytes {
        c.console_log_max_bytes = bytes;
    }
    if let Some(n) = m.opt("event_log_max", |n| n.int_in(1000..=100_000_000))? {
        c.event_log_max = n;
    }
    // 0 means "no expiry", the same as leaving the key out.
    c.default_ttl = m
        .opt("default_ttl", Node::duration)?
        .filter(|d| !d.is_zero());
    Ok(())
}

fn abs_path(node: &Node) -> Read<PathBuf> {
    let s = node.string()?;
    if s.starts_with('/') && !s.contains('\0') {
        Ok(PathBuf::from(s))
    } else {
        Err(node.problem(format!("{s:?} is not an absolute path")))
    }
}

fn positive_duration(node: &Node) -> Read<Duration> {
    let d = node.duration()?;
    if d.is_zero() {
        Err(node.problem("must be longer than 0"))
    } else {
        Ok(d)
    }
}

/// A program name looked up in PATH, or an absolute path to one.
fn program_value(node: &Node) -> Read<String> {
    let s = node.string()?;
    let ok = !s.is_empty() && !s.contains(['\0', ' ']) && (s.starts_with('/') || !s.contains('/'));
    if ok {
        Ok(s.to_string())
    } else {
        Err(node.problem(format!(
            "{s:?} is not a program; give a name found in PATH or an absolute path"
        )))
    }
}

/// A user or group name as useradd/groupadd accept them (at most 32 bytes).
fn account_value(node: &Node) -> Read<String> {
    let s = node.string()?;
    let mut bytes = s.bytes();
    let ok = matches!(bytes.next(), Some(b'a'..=b'z' | b'A'..=b'Z' | b'_'))
        && s.len() <= 32
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(s.to_string())
    } else {
        Err(node.problem(format!("{s:?} is not a user or group name")))
    }
}

/// RFC 1123 host name: dot-separated labels of letters, digits and inner
/// hyphens, 1..=63 bytes each, 253 in all. An all-digit last label is refused
/// (no top-level domain is numeric), so `10.0.0.300` is not a host name.
fn is_host_name(s: &str) -> bool {
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    let last = s.rsplit('.').next().unwrap_or("");
    s.len() <= 253 && s.split('.').all(label_ok) && !last.bytes().all(|b| b.is_ascii_digit())
}

fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&crate::time::format_duration(*d))
}

fn ser_opt_duration<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&crate::time::format_duration(*d)),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGIN: &str = "/etc/agentlab/config.yaml";
    const TOKEN: &str = "root@pam!agentlab=0123abcd-4567-89ef-0123-456789abcdef";
    const SECRET: &str = "0123abcd-4567-89ef-0123-456789abcdef";

    fn parse(text: &str) -> Result<Config, String> {
        parse_config_str(text, Path::new(ORIGIN)).map_err(|e| e.to_string())
    }

    fn proxmox_text(url: &str, token: &str) -> String {
        format!("backend: proxmox\nproxmox_api_url: {url}\nproxmox_api_token: '{token}'\n")
    }

    #[test]
    fn defaults_match_the_host_layout() {
        let c = Config::defaults();

        assert_eq!(
            c,
            Config {
                source: None,
                backend: BackendKind::Qemu,
                data_dir: "/var/lib/agentlab".into(),
                run_dir: "/run/agentlab".into(),
                socket_path: "/run/agentlab/agentlabd.sock".into(),
                socket_group: None,
                profiles_dir: "/etc/agentlab/profiles".into(),
                images_dir: "/var/lib/agentlab/images".into(),
                sandboxes_dir: "/var/lib/agentlab/sandboxes".into(),
                db_path: "/var/lib/agentlab/db".into(),
                log_path: "/var/lib/agentlab/agentlabd.log".into(),
                accel: Accel::Auto,
                qemu_binary: "qemu-system-x86_64".into(),
                qemu_user: None,
                kernel: None,
                provisioning_timeout: Duration::from_secs(600),
                boot_timeout: Duration::from_secs(300),
                stop_timeout: Duration::from_secs(30),
                console_log_max_bytes: 8 << 20,
                event_log_max: 200_000,
                default_ttl: None,
                proxmox: None,
                network: NetworkConfig::default(),
            }
        );
    }

    #[test]
    fn empty_file_gives_defaults_with_source() {
        let c = parse("").unwrap();

        assert_eq!(
            c,
            Config {
                source: Some(ORIGIN.into()),
                ..Config::defaults()
            }
        );
    }

    #[test]
    fn comment_only_file_gives_defaults() {
        let c = parse("# nothing configured yet\n").unwrap();

        assert_eq!(c.data_dir, Config::defaults().data_dir);
    }

    #[test]
    fn missing_default_file_gives_defaults_with_profiles_beside_it() {
        let c = Config::load(Path::new("/nonexistent/agentlab/config.yaml"), false).unwrap();

        assert_eq!(
            c,
            Config {
                profiles_dir: "/nonexistent/agentlab/profiles".into(),
                ..Config::defaults()
            }
        );
    }

    #[test]
    fn missing_explicit_file_is_an_error_naming_it() {
        let err = Config::load(Path::new("/nonexistent/agentlab/config.yaml"), true).unwrap_err();

        assert_eq!(err.to_string(), "read /nonexistent/agentlab/config.yaml");
    }

    #[test]
    fn data_dir_moves_the_paths_derived_from_it() {
        let c = parse("data_dir: /srv/al\nrun_dir: /tmp/alrun\n").unwrap();

        assert_eq!(
            (
                c.images_dir,
                c.sandboxes_dir,
                c.db_path,
                c.log_path,
                c.socket_path
            ),
            (
                "/srv/al/images".into(),
                "/srv/al/sandboxes".into(),
                "/srv/al/db".into(),
                "/srv/al/agentlabd.log".into(),
                "/tmp/alrun/agentlabd.sock".into(),
            )
        );
    }

    #[test]
    fn with_data_dir_recomputes_derived_paths_but_keeps_explicit_ones() {
        let c = parse("images_dir: /mnt/images\n").unwrap();

        let c = c.with_data_dir(Path::new("/tmp/state"));

        assert_eq!(
            (
                c.data_dir,
                c.images_dir,
                c.sandboxes_dir,
                c.db_path,
                c.log_path
            ),
            (
                "/tmp/state".into(),
                "/mnt/images".into(),
                "/tmp/state/sandboxes".into(),
                "/tmp/state/db".into(),
                "/tmp/state/agentlabd.log".into(),
            )
        );
    }

    #[test]
    fn durations_take_units() {
        let c = parse("boot_timeout: 90s\nstop_timeout: 1m\ndefault_ttl: 2h\n").unwrap();

        assert_eq!(
            (c.boot_timeout, c.stop_timeout, c.default_ttl),
            (
                Duration::from_secs(90),
                Duration::from_secs(60),
                Some(Duration::from_secs(7200))
            )
        );
    }

    #[test]
    fn zero_timeout_is_refused() {
        let err = parse("boot_timeout: 0s\n").unwrap_err();

        assert_eq!(
            err,
            "/etc/agentlab/config.yaml: boot_timeout: must be longer than 0"
        );
    }

    #[test]
    fn console_log_below_64_kib_is_out_of_range() {
        let err = parse("console_log_max_bytes: 1024\n").unwrap_err();

        assert_eq!(
            err,
            "/etc/agentlab/config.yaml: console_log_max_bytes: expected an integer 65536..=1099511627776, got 1024"
        );
    }

    #[test]
    fn typo_at_top_level_suggests_the_key() {
        let err = parse("data_dri: /srv\n").unwrap_err();

        assert!(
            err.starts_with("/etc/agentlab/config.yaml: data_dri: unknown key (did you mean data_dir?); allowed top-level keys: backend, data_dir,"),
            "{err}"
        );
    }

    #[test]
    fn relative_path_is_refused() {
        let err = parse("data_dir: var/lib/agentlab\n").unwrap_err();

        assert_eq!(
            err,
            "/etc/agentlab/config.yaml: data_dir: \"var/lib/agentlab\" is not an absolute path"
        );
    }

    #[test]
    fn bad_accel_lists_the_choices() {
        let err = parse("accel: hvf\n").unwrap_err();

        assert_eq!(err, "/etc/agentlab/config.yaml: accel: \"hvf\" is not an accelerator; allowed: auto, kvm, tcg");
    }

    #[test]
    fn top_level_scalar_is_an_error_naming_the_file() {
        let err = parse("just words\n").unwrap_err();

        assert_eq!(
            err,
            "/etc/agentlab/config.yaml: expected a mapping of keys, got \"just words\""
        );
    }

    #[test]
    fn yaml_syntax_error_includes_the_line_number() {
        let err = parse("backend: qemu\naccel: [kvm\n").unwrap_err();

        assert!(
            err.starts_with("/etc/agentlab/config.yaml: invalid YAML at line 3, column 1:"),
            "{err}"
        );
    }

    #[test]
    fn accel_parse_ignores_case() {
        assert_eq!(Accel::parse("TCG"), Some(Accel::Tcg));
        assert_eq!(Accel::parse("hvf"), None);
    }

    #[test]
    fn token_secret_never_appears_in_debug_or_json() {
        let c = parse(&proxmox_text("https://pve:8006", TOKEN)).unwrap();

        let debug = format!("{c:?}");
        let json = serde_json::to_string(&c).unwrap();

        assert!(!debug.contains(SECRET), "{debug}");
        assert!(!json.contains(SECRET), "{json}");
        assert!(debug.contains("root@pam!agentlab=<redacted>"), "{debug}");
    }

    #[test]
    fn durations_serialize_as_text() {
        let json = serde_json::to_value(Config::defaults()).unwrap();

        assert_eq!(json["stop_timeout"], "30s");
        assert_eq!(json["provisioning_timeout"], "10m");
    }

    #[test]
    fn state_dir_moves_a_defaulted_run_dir_and_socket() {
        let c = Config::defaults().with_data_dir(Path::new("/tmp/al"));
        assert_eq!(c.run_dir, PathBuf::from("/tmp/al/run"));
        assert_eq!(c.socket_path, PathBuf::from("/tmp/al/run/agentlabd.sock"));
    }

    #[test]
    fn state_dir_keeps_a_run_dir_set_in_the_file() {
        let c = parse("run_dir: /srv/run\n")
            .unwrap()
            .with_data_dir(Path::new("/tmp/al"));
        assert_eq!(c.run_dir, PathBuf::from("/srv/run"));
        assert_eq!(c.socket_path, PathBuf::from("/srv/run/agentlabd.sock"));
    }
}
