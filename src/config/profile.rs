//! Profiles: the files in `/etc/agentlab/profiles/*.yaml` that say what a
//! sandbox gets (image, CPUs, memory, network mode, storage, TTL).
//!
//! Owns parsing and validating profile documents, loading a directory of them,
//! and resolving `--profile NAME` or `+modifier` arguments to one profile. It
//! does not apply a profile to a VM; the backends do that.
//!
//! The format is AgentLab's (`internal/daemon/profiles.go`: one profile per
//! YAML document, several documents per file allowed; `profile_resources.go`,
//! `profile_network_mode.go`, `profile_behavior.go` for the sections). Unlike
//! AgentLab, unknown keys are errors, so a typo cannot silently fall back to a
//! default.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::yaml::{self, Mapping, Node, Read};
use super::ConfigError;

/// `network.mode` (AgentLab `profile_network_mode.go`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Nothing leaves the sandbox.
    Off,
    /// Masqueraded egress to the Internet; private ranges and the host blocked.
    Nat,
    /// Egress only to the entries of `network.allow`.
    Allowlist,
}

/// `network.model`: the guest NIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NicModel {
    Virtio,
    E1000,
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

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkProfile {
    pub bridge: String,
    pub model: NicModel,
    pub mode: NetworkMode,
    /// Non-empty only when `mode` is `Allowlist`.
    pub allow: Vec<AllowRule>,
    /// The gateway's DNS answers other sandboxes' names (`<name>.<dns_domain>`)
    /// and `host`/`gateway` to this sandbox. Resolving is not reaching:
    /// sandboxes still cannot connect to each other.
    #[serde(default)]
    pub local_names: bool,
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
    /// One of [`WORKSPACE_MODES`].
    pub workspace: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Behavior {
    /// One of [`BEHAVIOR_MODES`].
    pub mode: String,
    pub keepalive_default: bool,
    /// `None` when the file says 0 or nothing: no expiry from the profile.
    pub ttl_minutes_default: Option<u32>,
}

/// `storage.workspace` values AgentLab documents (`PROXMOX_SPECS.md` §15:
/// `workspace: none  # or "attach"`; `scripts/profiles/defaults.yaml`).
pub const WORKSPACE_MODES: &[&str] = &["none", "attach"];

/// `behavior.mode` values. AgentLab does not validate this key; the only mode
/// its code and examples use is its default, `dangerous` (`internal/daemon/api.go`
/// `defaultJobMode`), so that is the only one accepted until another exists.
pub const BEHAVIOR_MODES: &[&str] = &["dangerous"];

const PROFILE_KEYS: &[&str] = &[
    "name",
    "template_vmid",
    "image",
    "network",
    "resources",
    "storage",
    "behavior",
];
const NETWORK_KEYS: &[&str] = &["bridge", "model", "mode", "allow", "local_names"];
const RESOURCE_KEYS: &[&str] = &["cores", "memory_mb", "balloon"];
const STORAGE_KEYS: &[&str] = &["root_size_gb", "workspace"];
const BEHAVIOR_KEYS: &[&str] = &["mode", "keepalive_default", "ttl_minutes_default"];

const NETWORK_MODES: &[(&str, NetworkMode)] = &[
    ("off", NetworkMode::Off),
    ("nat", NetworkMode::Nat),
    ("allowlist", NetworkMode::Allowlist),
];
const NIC_MODELS: &[(&str, NicModel)] = &[("virtio", NicModel::Virtio), ("e1000", NicModel::E1000)];

/// Profile names are used in file names, hostnames and CLI arguments.
const NAME_RULE: &str = "[a-z0-9][a-z0-9._-]*, at most 63 characters";
const NAME_MAX: usize = 63;

impl Default for NetworkProfile {
    fn default() -> Self {
        NetworkProfile {
            bridge: "agentlab0".into(),
            model: NicModel::Virtio,
            mode: NetworkMode::Nat,
            allow: Vec::new(),
            local_names: false,
        }
    }
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            cores: 1,
            memory_mb: 512,
            balloon: false,
        }
    }
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            root_size_gb: None,
            workspace: "none".into(),
        }
    }
}

impl Default for Behavior {
    fn default() -> Self {
        Behavior {
            mode: "dangerous".into(),
            keepalive_default: false,
            ttl_minutes_default: None,
        }
    }
}

impl NetworkMode {
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::Off => "off",
            NetworkMode::Nat => "nat",
            NetworkMode::Allowlist => "allowlist",
        }
    }
}

impl NicModel {
    pub fn as_str(self) -> &'static str {
        match self {
            NicModel::Virtio => "virtio",
            NicModel::E1000 => "e1000",
        }
    }
}

/// Parses every profile in `text` (one per YAML document). `origin` names the
/// file in errors and becomes each profile's `source`.
pub fn parse_profile_str(text: &str, origin: &Path) -> Result<Vec<Profile>, ConfigError> {
    let docs = yaml::load(text).map_err(|e| ConfigError::syntax(origin, e))?;
    let several = docs.len() > 1;
    let mut profiles = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        if yaml::is_empty_document(doc) {
            continue;
        }
        let document = several.then_some(i + 1);
        let mut profile = profile_from_yaml(&Node::root(doc))
            .map_err(|p| ConfigError::invalid(origin, document, p))?;
        profile.source = Some(origin.to_path_buf());
        profiles.push(profile);
    }
    Ok(profiles)
}

fn profile_from_yaml(root: &Node) -> Read<Profile> {
    let m = root.mapping(PROFILE_KEYS)?;
    let name = match m.get("name") {
        Some(n) => name_value(&n)?,
        None => {
            let why = format!("missing; every profile needs a name ({NAME_RULE})");
            return Err(m.problem_at("name", why));
        }
    };
    let template_vmid = m.opt("template_vmid", |n| n.int_in(100..=999_999_999))?;
    Ok(Profile {
        name,
        source: None,
        template_vmid: template_vmid.map(|v| v as u32),
        image: m
            .opt("image", name_value)?
            .unwrap_or_else(|| "default".into()),
        network: network_from(&m)?,
        resources: resources_from(&m)?,
        storage: storage_from(&m)?,
        behavior: behavior_from(&m)?,
    })
}

fn network_from(parent: &Mapping) -> Read<NetworkProfile> {
    let mut net = NetworkProfile::default();
    let Some(node) = parent.get("network") else {
        return Ok(net);
    };
    let m = node.mapping(NETWORK_KEYS)?;
    if let Some(bridge) = m.opt("bridge", bridge_value)? {
        net.bridge = bridge;
    }
    if let Some(model) = m.opt("model", |n| n.choice("a NIC model", NIC_MODELS))? {
        net.model = model;
    }
    if let Some(mode) = m.opt("mode", |n| n.choice("a network mode", NETWORK_MODES))? {
        net.mode = mode;
    }
    if let Some(items) = m.opt("allow", Node::list)? {
        if net.mode != NetworkMode::Allowlist {
            let why = format!(
                "allowed only when network.mode is allowlist (it is {})",
                net.mode.as_str()
            );
            return Err(m.problem_at("allow", why));
        }
        net.allow = items.iter().map(allow_value).collect::<Read<_>>()?;
    }
    if let Some(b) = m.opt("local_names", Node::bool)? {
        net.local_names = b;
    }
    Ok(net)
}

fn resources_from(parent: &Mapping) -> Read<Resources> {
    let mut res = Resources::default();
    let Some(node) = parent.get("resources") else {
        return Ok(res);
    };
    let m = node.mapping(RESOURCE_KEYS)?;
    if let Some(cores) = m.opt("cores", |n| n.int_in(1..=64))? {
        res.cores = cores as u32;
    }
    if let Some(mb) = m.opt("memory_mb", |n| n.int_in(128..=1_048_576))? {
        res.memory_mb = mb as u32;
    }
    if let Some(balloon) = m.opt("balloon", Node::bool)? {
        res.balloon = balloon;
    }
    Ok(res)
}

fn storage_from(parent: &Mapping) -> Read<Storage> {
    let mut storage = Storage::default();
    let Some(node) = parent.get("storage") else {
        return Ok(storage);
    };
    let m = node.mapping(STORAGE_KEYS)?;
    storage.root_size_gb = m
        .opt("root_size_gb", |n| n.int_in(1..=65_536))?
        .map(|v| v as u32);
    if let Some(ws) = m.opt("workspace", |n| {
        word_value(n, "a workspace mode", WORKSPACE_MODES)
    })? {
        storage.workspace = ws;
    }
    Ok(storage)
}

fn behavior_from(parent: &Mapping) -> Read<Behavior> {
    let mut behavior = Behavior::default();
    let Some(node) = parent.get("behavior") else {
        return Ok(behavior);
    };
    let m = node.mapping(BEHAVIOR_KEYS)?;
    if let Some(mode) = m.opt("mode", |n| word_value(n, "a behavior mode", BEHAVIOR_MODES))? {
        behavior.mode = mode;
    }
    if let Some(keepalive) = m.opt("keepalive_default", Node::bool)? {
        behavior.keepalive_default = keepalive;
    }
    let ttl = m.opt("ttl_minutes_default", |n| n.int_in(0..=u64::from(u32::MAX)))?;
    // AgentLab reads 0 (and below) as "no default TTL".
    behavior.ttl_minutes_default = ttl.filter(|&t| t > 0).map(|t| t as u32);
    Ok(behavior)
}

fn word_value(node: &Node, noun: &str, words: &[&'static str]) -> Read<String> {
    let choices: Vec<(&str, &str)> = words.iter().map(|w| (*w, *w)).collect();
    node.choice(noun, &choices).map(str::to_string)
}

fn name_value(node: &Node) -> Read<String> {
    let s = node.string()?;
    if is_valid_name(s) {
        Ok(s.to_string())
    } else {
        Err(node.problem(format!("{s:?} is not a valid name; use {NAME_RULE}")))
    }
}

/// `[a-z0-9][a-z0-9._-]*`, at most 63 bytes: safe as a file name, a DNS label
/// prefix and a CLI word.
pub fn is_valid_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    let first_ok = matches!(bytes.next(), Some(b'a'..=b'z' | b'0'..=b'9'));
    first_ok
        && s.len() <= NAME_MAX
        && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
}

/// A Linux interface name: 1..=15 bytes (IFNAMSIZ 16 with the NUL), no `/`,
/// blanks or `:`; kept to the characters `ip link` users actually type.
pub(super) fn bridge_value(node: &Node) -> Read<String> {
    let s = node.string()?;
    let chars_ok = s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if (1..=15).contains(&s.len()) && chars_ok && s != "." && s != ".." {
        Ok(s.to_string())
    } else {
        Err(node.problem(format!(
            "{s:?} is not a bridge name; use 1 to 15 of A-Z a-z 0-9 . _ -"
        )))
    }
}

fn allow_value(node: &Node) -> Read<AllowRule> {
    let s = node.string()?;
    AllowRule::parse(s).map_err(|why| node.problem(why))
}

/// One `network.allow` entry: where an allowlist-mode sandbox may connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllowRule {
    /// An address or network (`1.1.1.1`, `10.0.0.0/8`, `2001:db8::/32`), with
    /// an optional port (`10.0.0.0/8:443`, `[2001:db8::1]:443`). Host bits are zero.
    Net {
        addr: IpAddr,
        prefix: u8,
        port: Option<u16>,
    },
    /// A DNS name, or every name under it when `wildcard` (`*.github.com`),
    /// with an optional port. Lowercase, no trailing dot.
    Domain {
        name: String,
        wildcard: bool,
        port: Option<u16>,
    },
}

const ALLOW_FORMS: &str = "allowed forms: 10.0.0.0/8, 1.1.1.1:53, 2001:db8::/32, \
     [2001:db8::1]:443, example.com, *.example.com:443";

impl AllowRule {
    /// Parses one entry; the error says what is wrong with it and names it.
    pub fn parse(entry: &str) -> Result<AllowRule, String> {
        let t = entry.trim();
        parse_allow(t)
            .map_err(|why| format!("{entry:?} is not a valid allow entry: {why}; {ALLOW_FORMS}"))
    }
}

fn parse_allow(t: &str) -> Result<AllowRule, String> {
    if t.is_empty() {
        return Err("it is empty".into());
    }
    if let Some(rest) = t.strip_prefix('[') {
        // [IPv6[/prefix]]:port
        let (inner, after) = rest.split_once(']').ok_or("missing ']'")?;
        let port = after.strip_prefix(':').ok_or("expected :PORT after ']'")?;
        return parse_net(inner, Some(parse_port(port)?));
    }
    if t.matches(':').count() > 1 {
        // A bare IPv6 address or network; a port needs the bracket form.
        return parse_net(t, None);
    }
    let (host, port) = match t.rsplit_once(':') {
        Some(("", _)) => return Err("no host before the port".into()),
        Some((host, port)) => (host, Some(parse_port(port)?)),
        None => (t, None),
    };
    let last_label = host.rsplit('.').next().unwrap_or(host);
    if host.contains('/')
        || (!last_label.is_empty() && last_label.bytes().all(|b| b.is_ascii_digit()))
    {
        return parse_net(host, port);
    }
    parse_domain(host, port)
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("port {s:?} is not 1..=65535")),
    }
}

fn parse_net(s: &str, port: Option<u16>) -> Result<AllowRule, String> {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IP address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => match p.parse::<u8>() {
            Ok(n) if n <= max => n,
            _ => return Err(format!("prefix /{p} is not 0..={max}")),
        },
    };
    let host_bits_clear = match addr {
        IpAddr::V4(a) => u32::from(a).checked_shl(u32::from(prefix)).unwrap_or(0) == 0,
        IpAddr::V6(a) => u128::from(a).checked_shl(u32::from(prefix)).unwrap_or(0) == 0,
    };
    if !host_bits_clear {
        return Err(format!(
            "{addr}/{prefix} has host bits set after the prefix"
        ));
    }
    Ok(AllowRule::Net { addr, prefix, port })
}

fn parse_domain(s: &str, port: Option<u16>) -> Result<AllowRule, String> {
    let (wildcard, rest) = match s.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let name = rest.strip_suffix('.').unwrap_or(rest).to_ascii_lowercase();
    if !super::is_host_name(&name) {
        return Err(format!("{s:?} is not a domain name"));
    }
    if !wildcard && !name.contains('.') {
        return Err(format!(
            "{s:?} has no dot; write a full name like example.com"
        ));
    }
    Ok(AllowRule::Domain {
        name,
        wildcard,
        port,
    })
}

impl fmt::Display for AllowRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowRule::Net { addr, prefix, port } => {
                let full = if addr.is_ipv4() { 32 } else { 128 };
                let net = if *prefix == full {
                    addr.to_string()
                } else {
                    format!("{addr}/{prefix}")
                };
                match port {
                    Some(p) if addr.is_ipv6() => write!(f, "[{net}]:{p}"),
                    Some(p) => write!(f, "{net}:{p}"),
                    None => f.write_str(&net),
                }
            }
            AllowRule::Domain {
                name,
                wildcard,
                port,
            } => {
                let star = if *wildcard { "*." } else { "" };
                match port {
                    Some(p) => write!(f, "{star}{name}:{p}"),
                    None => write!(f, "{star}{name}"),
                }
            }
        }
    }
}

/// Written as the string a profile holds, so API clients see `*.github.com`.
impl Serialize for AllowRule {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for AllowRule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        AllowRule::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Every profile known to the daemon, ordered by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profiles {
    by_name: BTreeMap<String, Profile>,
}

/// Only the built-in `default`.
impl Default for Profiles {
    fn default() -> Self {
        let mut by_name = BTreeMap::new();
        by_name.insert("default".to_string(), Profiles::builtin_default());
        Profiles { by_name }
    }
}

impl Profiles {
    /// Every `*.yaml` / `*.yml` in `dir` (a file may hold several YAML
    /// documents, one profile each). A missing dir yields only the built-in
    /// `default`; so does a dir whose files define no `default`. Duplicate
    /// names are an error naming both files.
    pub fn load(dir: &Path) -> Result<Profiles, ConfigError> {
        let files = match profile_files(dir) {
            Ok(files) => files,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Profiles::default()),
            Err(source) => {
                return Err(ConfigError::ReadDir {
                    path: dir.to_path_buf(),
                    source,
                })
            }
        };
        let mut by_name: BTreeMap<String, Profile> = BTreeMap::new();
        for path in files {
            let text = fs::read_to_string(&path).map_err(|source| ConfigError::ReadFile {
                path: path.clone(),
                source,
            })?;
            for profile in parse_profile_str(&text, &path)? {
                if let Some(first) = by_name.get(&profile.name) {
                    return Err(ConfigError::DuplicateProfile {
                        name: profile.name,
                        first: first.source.clone().unwrap_or_default(),
                        second: path,
                    });
                }
                by_name.insert(profile.name.clone(), profile);
            }
        }
        by_name
            .entry("default".to_string())
            .or_insert_with(Profiles::builtin_default);
        Ok(Profiles { by_name })
    }

    /// The profile used when no file defines `default`: 1 core, 512 MiB, NAT.
    pub fn builtin_default() -> Profile {
        Profile {
            name: "default".into(),
            source: None,
            template_vmid: None,
            image: "default".into(),
            network: NetworkProfile::default(),
            resources: Resources::default(),
            storage: Storage::default(),
            behavior: Behavior::default(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Profile> {
        self.by_name.get(name)
    }

    pub fn list(&self) -> Vec<&Profile> {
        self.by_name.values().collect()
    }

    /// `--profile small` → "small"; modifiers `+small +secure` → sorted,
    /// joined with '-': "secure-small". Both forms → error; neither →
    /// "default". An unknown name is an error listing the known ones.
    pub fn resolve(
        &self,
        profile: Option<&str>,
        modifiers: &[String],
    ) -> Result<&Profile, ConfigError> {
        let name = match (profile, modifiers.is_empty()) {
            (Some(p), false) => {
                return Err(ConfigError::ProfileAndModifiers {
                    profile: p.to_string(),
                    modifiers: modifiers.to_vec(),
                })
            }
            (Some(p), true) => p.to_string(),
            (None, true) => "default".to_string(),
            (None, false) => modifier_name(modifiers),
        };
        self.get(&name).ok_or_else(|| ConfigError::UnknownProfile {
            name,
            known: self.by_name.keys().cloned().collect(),
        })
    }
}

/// `+small +secure` → `secure-small`: order on the command line does not matter.
fn modifier_name(modifiers: &[String]) -> String {
    let mut parts: Vec<&str> = modifiers
        .iter()
        .map(|m| m.strip_prefix('+').unwrap_or(m))
        .collect();
    parts.sort_unstable();
    parts.dedup();
    parts.join("-")
}

/// The profile files in `dir`, sorted so errors and duplicates are reported
/// in a stable order. Hidden files (editor locks, `.#x.yaml`) are skipped.
fn profile_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let lower = name.to_ascii_lowercase();
        let is_yaml = lower.ends_with(".yaml") || lower.ends_with(".yml");
        if is_yaml && !name.starts_with('.') && !path.is_dir() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGIN: &str = "/etc/agentlab/profiles/small.yaml";

    fn parse_one(text: &str) -> Result<Profile, String> {
        parse_profile_str(text, Path::new(ORIGIN))
            .map(|mut v| v.remove(0))
            .map_err(|e| e.to_string())
    }

    /// A directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let dir =
                std::env::temp_dir().join(format!("agentlab-config-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            fs::write(&path, text).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn profiles(names: &[&str]) -> Profiles {
        let mut by_name = BTreeMap::new();
        for name in names {
            let profile = Profile {
                name: name.to_string(),
                ..Profiles::builtin_default()
            };
            by_name.insert(name.to_string(), profile);
        }
        Profiles { by_name }
    }

    #[test]
    fn example_profile_parses_exactly() {
        let text = include_str!("../../tests/fixtures/config/yolo-ephemeral.yaml");

        let profile = parse_one(text).unwrap();

        assert_eq!(
            profile,
            Profile {
                name: "yolo-ephemeral".into(),
                source: Some(PathBuf::from(ORIGIN)),
                template_vmid: Some(9000),
                image: "default".into(),
                network: NetworkProfile {
                    bridge: "agentlab0".into(),
                    model: NicModel::Virtio,
                    mode: NetworkMode::Nat,
                    allow: vec![],
                    local_names: false,
                },
                resources: Resources {
                    cores: 2,
                    memory_mb: 2048,
                    balloon: false,
                },
                storage: Storage {
                    root_size_gb: Some(10),
                    workspace: "none".into(),
                },
                behavior: Behavior {
                    mode: "dangerous".into(),
                    keepalive_default: false,
                    ttl_minutes_default: Some(180),
                },
            }
        );
    }

    #[test]
    fn name_only_profile_takes_every_default() {
        let profile = parse_one("name: small\n").unwrap();

        assert_eq!(
            profile,
            Profile {
                name: "small".into(),
                source: Some(PathBuf::from(ORIGIN)),
                ..Profiles::builtin_default()
            }
        );
    }

    #[test]
    fn typo_at_top_level_names_file_key_and_allowed_keys() {
        let err = parse_one("name: small\nimgae: default\n").unwrap_err();

        assert_eq!(
            err,
            "/etc/agentlab/profiles/small.yaml: imgae: unknown key (did you mean image?); \
             allowed top-level keys: name, template_vmid, image, network, resources, storage, behavior"
        );
    }

    #[test]
    fn typo_in_nested_key_names_the_key_path() {
        let err = parse_one("name: small\nresources: { memroy_mb: 1024 }\n").unwrap_err();

        assert_eq!(
            err,
            "/etc/agentlab/profiles/small.yaml: resources.memroy_mb: unknown key (did you mean memory_mb?); \
             allowed keys in resources: cores, memory_mb, balloon"
        );
    }

    #[test]
    fn wrong_type_says_what_was_expected_and_found() {
        let err = parse_one("name: small\nresources: { cores: two }\n").unwrap_err();

        assert_eq!(
            err,
            "/etc/agentlab/profiles/small.yaml: resources.cores: expected an integer 1..=64, got \"two\""
        );
    }

    #[test]
    fn memory_below_minimum_is_out_of_range() {
        let err = parse_one("name: small\nresources: { memory_mb: 64 }\n").unwrap_err();

        assert_eq!(
            err,
            "/etc/agentlab/profiles/small.yaml: resources.memory_mb: expected an integer 128..=1048576, got 64"
        );
    }

    #[test]
    fn template_vmid_below_100_is_out_of_range() {
        let err = parse_one("name: small\ntemplate_vmid: 99\n").unwrap_err();

        assert!(
            err.ends_with("template_vmid: expected an integer 100..=999999999, got 99"),
            "{err}"
        );
    }

    #[test]
    fn bad_network_mode_lists_the_modes() {
        let err = parse_one("name: small\nnetwork: { mode: nta }\n").unwrap_err();

        assert_eq!(
            err,
            "/etc/agentlab/profiles/small.yaml: network.mode: \"nta\" is not a network mode; allowed: off, nat, allowlist"
        );
    }

    #[test]
    fn network_mode_off_is_a_word_not_a_boolean() {
        let profile = parse_one("name: small\nnetwork: { mode: off }\n").unwrap();

        assert_eq!(profile.network.mode, NetworkMode::Off);
    }

    #[test]
    fn local_names_are_off_unless_asked_for() {
        let plain = parse_one("name: a\nnetwork: { mode: nat }\n").unwrap();
        let asked = parse_one("name: b\nnetwork: { mode: nat, local_names: true }\n").unwrap();
        let bad = parse_one("name: c\nnetwork: { local_names: maybe }\n").unwrap_err();

        assert!(!plain.network.local_names);
        assert!(asked.network.local_names);
        assert!(bad.contains("network.local_names"), "{bad}");
    }

    #[test]
    fn unknown_nic_model_lists_the_models() {
        let err = parse_one("name: small\nnetwork: { model: rtl8139 }\n").unwrap_err();

        assert!(
            err.ends_with("network.model: \"rtl8139\" is not a NIC model; allowed: virtio, e1000"),
            "{err}"
        );
    }

    #[test]
    fn allowlist_entries_parse_into_rules() {
        let text = "name: small\nnetwork:\n  mode: allowlist\n  allow: [10.0.0.0/8, '1.1.1.1:53', '*.GitHub.com', 'pypi.org:443', '[2001:db8::]:443']\n";

        let allow = parse_one(text).unwrap().network.allow;

        let shown: Vec<String> = allow.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "10.0.0.0/8",
                "1.1.1.1:53",
                "*.github.com",
                "pypi.org:443",
                "[2001:db8::]:443"
            ]
        );
    }

    #[test]
    fn bad_cidr_in_allowlist_names_the_entry_and_its_index() {
        let text = "name: small\nnetwork: { mode: allowlist, allow: [example.com, 10.0.0.0/33] }\n";

        let err = parse_one(text).unwrap_err();

        assert!(
            err.starts_with(
                "/etc/agentlab/profiles/small.yaml: network.allow[1]: \"10.0.0.0/33\" is not a valid allow entry: prefix /33 is not 0..=32;"
            ),
            "{err}"
        );
    }

    #[test]
    fn allowlist_address_out_of_range_is_not_taken_for_a_domain() {
        let err = AllowRule::parse("10.0.0.300").unwrap_err();

        assert!(err.contains("\"10.0.0.300\" is not an IP address"), "{err}");
    }

    #[test]
    fn allowlist_network_with_host_bits_is_refused() {
        let err = AllowRule::parse("10.1.2.3/8").unwrap_err();

        assert!(err.contains("10.1.2.3/8 has host bits set"), "{err}");
    }

    #[test]
    fn allowlist_domain_with_bad_characters_is_refused() {
        let err = AllowRule::parse("exa_mple.com").unwrap_err();

        assert!(
            err.contains("\"exa_mple.com\" is not a domain name"),
            "{err}"
        );
    }

    #[test]
    fn allow_without_allowlist_mode_is_an_error() {
        let err = parse_one("name: small\nnetwork: { allow: [example.com] }\n").unwrap_err();

        assert_eq!(
            err,
            "/etc/agentlab/profiles/small.yaml: network.allow: allowed only when network.mode is allowlist (it is nat)"
        );
    }

    #[test]
    fn missing_name_is_an_error() {
        let err = parse_one("image: default\n").unwrap_err();

        assert!(
            err.contains(": name: missing; every profile needs a name"),
            "{err}"
        );
    }

    #[test]
    fn invalid_name_shows_the_rule() {
        let err = parse_one("name: Small Box\n").unwrap_err();

        assert!(err.ends_with("name: \"Small Box\" is not a valid name; use [a-z0-9][a-z0-9._-]*, at most 63 characters"), "{err}");
    }

    #[test]
    fn unknown_behavior_mode_lists_the_allowed_one() {
        let err = parse_one("name: small\nbehavior: { mode: safe }\n").unwrap_err();

        assert!(
            err.ends_with("behavior.mode: \"safe\" is not a behavior mode; allowed: dangerous"),
            "{err}"
        );
    }

    #[test]
    fn workspace_attach_is_accepted() {
        let profile = parse_one("name: small\nstorage: { workspace: attach }\n").unwrap();

        assert_eq!(profile.storage.workspace, "attach");
    }

    #[test]
    fn ttl_minutes_zero_means_no_default() {
        let profile = parse_one("name: small\nbehavior: { ttl_minutes_default: 0 }\n").unwrap();

        assert_eq!(profile.behavior.ttl_minutes_default, None);
    }

    #[test]
    fn multi_document_file_yields_one_profile_per_document() {
        let text =
            "# header comment\n---\nname: small\n---\nname: large\nresources: { cores: 8 }\n";

        let names: Vec<String> = parse_profile_str(text, Path::new(ORIGIN))
            .unwrap()
            .into_iter()
            .map(|p| p.name)
            .collect();

        assert_eq!(names, ["small", "large"]);
    }

    #[test]
    fn error_in_second_document_names_the_document() {
        let text = "name: small\n---\nname: large\nresources: { cores: 0 }\n";

        let err = parse_profile_str(text, Path::new(ORIGIN))
            .unwrap_err()
            .to_string();

        assert_eq!(
            err,
            "/etc/agentlab/profiles/small.yaml (document 2): resources.cores: expected an integer 1..=64, got 0"
        );
    }

    #[test]
    fn top_level_list_is_an_error_naming_the_file() {
        let err = parse_one("- name: small\n").unwrap_err();

        assert_eq!(
            err,
            "/etc/agentlab/profiles/small.yaml: expected a mapping of keys, got a list"
        );
    }

    #[test]
    fn yaml_syntax_error_includes_the_line() {
        let err = parse_one("name: small\nresources: { cores: 2\n").unwrap_err();

        assert!(
            err.starts_with("/etc/agentlab/profiles/small.yaml: invalid YAML at line 3"),
            "{err}"
        );
    }

    #[test]
    fn duplicate_names_across_files_name_both_files() {
        let dir = TempDir::new("dup");
        let first = dir.write("a.yaml", "name: small\n");
        let second = dir.write("b.yml", "name: small\n");

        let err = Profiles::load(&dir.0).unwrap_err().to_string();

        assert_eq!(
            err,
            format!(
                "profile \"small\" is defined twice, in {} and in {}; rename one",
                first.display(),
                second.display()
            )
        );
    }

    #[test]
    fn load_reads_yaml_files_and_adds_builtin_default() {
        let dir = TempDir::new("load");
        dir.write("small.yaml", "name: small\n---\nname: large\n");
        dir.write("notes.txt", "not a profile");
        dir.write(".#small.yaml", "junk: [");

        let profiles = Profiles::load(&dir.0).unwrap();

        let names: Vec<&str> = profiles.list().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["default", "large", "small"]);
    }

    #[test]
    fn file_defining_default_replaces_the_builtin() {
        let dir = TempDir::new("default");
        dir.write("default.yaml", "name: default\nresources: { cores: 4 }\n");

        let profiles = Profiles::load(&dir.0).unwrap();

        assert_eq!(profiles.get("default").unwrap().resources.cores, 4);
    }

    #[test]
    fn missing_dir_yields_only_builtin_default() {
        let profiles = Profiles::load(Path::new("/nonexistent/agentlab/profiles")).unwrap();

        assert_eq!(profiles.list(), vec![&Profiles::builtin_default()]);
    }

    #[test]
    fn modifiers_resolve_sorted_and_joined() {
        let profiles = profiles(&["default", "secure-small"]);
        let modifiers = ["+small".to_string(), "+secure".to_string()];

        let profile = profiles.resolve(None, &modifiers).unwrap();

        assert_eq!(profile.name, "secure-small");
    }

    #[test]
    fn profile_flag_resolves_by_name() {
        let profiles = profiles(&["default", "small"]);

        let profile = profiles.resolve(Some("small"), &[]).unwrap();

        assert_eq!(profile.name, "small");
    }

    #[test]
    fn neither_form_resolves_default() {
        let profiles = profiles(&["default", "small"]);

        let profile = profiles.resolve(None, &[]).unwrap();

        assert_eq!(profile.name, "default");
    }

    #[test]
    fn profile_flag_and_modifiers_together_is_an_error() {
        let profiles = profiles(&["default", "small"]);

        let err = profiles
            .resolve(Some("small"), &["+secure".to_string()])
            .unwrap_err();

        assert_eq!(
            err.to_string(),
            "give either --profile small or modifiers (+secure), not both"
        );
    }

    #[test]
    fn unknown_profile_lists_known_ones() {
        let profiles = profiles(&["default", "large", "small"]);

        let err = profiles.resolve(Some("medium"), &[]).unwrap_err();

        assert_eq!(
            err.to_string(),
            "unknown profile \"medium\"; known profiles: default, large, small"
        );
    }

    #[test]
    fn allow_rule_round_trips_through_json() {
        let rule = AllowRule::parse("*.example.com:443").unwrap();

        let json = serde_json::to_string(&rule).unwrap();

        assert_eq!(json, "\"*.example.com:443\"");
        assert_eq!(serde_json::from_str::<AllowRule>(&json).unwrap(), rule);
    }
}
