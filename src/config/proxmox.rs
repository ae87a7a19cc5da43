//! Proxmox VE API access settings: the `proxmox_*` keys of config.yaml.
//!
//! Owns checking the API URL, the API token (whose secret never reaches
//! `Debug`, `Display` or serialized output), the TLS trust settings and the
//! clone settings. It does not talk to Proxmox; `proxmox_api.rs` does.
//! Key names and the linked/full clone modes follow AgentLab
//! (`internal/config/config.go`); the token form and the fingerprint are
//! PVE's (`PVEAPIToken=USER@REALM!TOKENID=SECRET`, pveum.adoc; `ssl_fingerprint`
//! in `GET /nodes`), see `shared/reference/proxmox/endpoints.md` §0.3.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize, Serializer};

use super::yaml::{Mapping, Node, Read};
use super::{abs_path, is_host_name, BackendKind};

const CLONE_MODES: &[(&str, CloneMode)] =
    &[("linked", CloneMode::Linked), ("full", CloneMode::Full)];

/// `proxmox_clone_mode` (AgentLab `config.go`: linked or full, default linked).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CloneMode {
    Linked,
    Full,
}

/// How to reach a Proxmox VE cluster. Present when `backend: proxmox`, or when
/// any `proxmox_*` key is set.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProxmoxConfig {
    /// `https://HOST[:PORT]/api2/json` (the path is added when the file omits it).
    pub api_url: String,
    pub api_token: ApiToken,
    /// `None`: pick the node the API answers from.
    pub node: Option<String>,
    pub tls_ca_path: Option<PathBuf>,
    pub tls_fingerprint: Option<Sha256Fingerprint>,
    /// Never true together with a CA path or a fingerprint.
    pub tls_insecure: bool,
    pub clone_mode: CloneMode,
    /// Target storage for full clones; `None` keeps the template's.
    pub storage: Option<String>,
}

/// A Proxmox API token, `USER@REALM!TOKENID=SECRET`. The secret never appears
/// in `Debug`, `Display` or serialized output; [`ApiToken::secret`] and
/// [`ApiToken::authorization`] are the only ways to read it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken {
    pub user: String,
    pub realm: String,
    pub token_id: String,
    secret: String,
}

const TOKEN_FORM: &str =
    "expected USER@REALM!TOKENID=SECRET, e.g. root@pam!agentlab=0123abcd-4567-89ef-0123-456789abcdef";

impl ApiToken {
    /// Parses `USER@REALM!TOKENID=SECRET` (a leading `PVEAPIToken=` is
    /// accepted). The error shows the expected form, never the input.
    pub fn parse(s: &str) -> Result<ApiToken, String> {
        let bad = |why: &str| format!("not a Proxmox API token ({why}); {TOKEN_FORM}");
        let s = s.trim();
        let s = s.strip_prefix("PVEAPIToken=").unwrap_or(s);
        // PVE splits on the last '=' (AccessControl.pm verify_token).
        let (id, secret) = s
            .rsplit_once('=')
            .ok_or_else(|| bad("no '=' before the secret"))?;
        let (userid, token_id) = id
            .split_once('!')
            .ok_or_else(|| bad("no '!' before the token ID"))?;
        let (user, realm) = userid
            .rsplit_once('@')
            .ok_or_else(|| bad("no '@' before the realm"))?;
        let word = |w: &str| {
            !w.is_empty()
                && w.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        };
        if user.is_empty()
            || user
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b == b':' || b == b'/')
        {
            return Err(bad("bad user name"));
        }
        if !word(realm) || !word(token_id) {
            return Err(bad("realm and token ID take A-Z a-z 0-9 . _ -"));
        }
        if secret.is_empty() || secret.bytes().any(|b| b.is_ascii_whitespace() || b == b';') {
            return Err(bad("empty or malformed secret"));
        }
        Ok(ApiToken {
            user: user.into(),
            realm: realm.into(),
            token_id: token_id.into(),
            secret: secret.into(),
        })
    }

    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// The `Authorization` header value: `PVEAPIToken=USER@REALM!TOKENID=SECRET`.
    pub fn authorization(&self) -> String {
        format!(
            "PVEAPIToken={}@{}!{}={}",
            self.user, self.realm, self.token_id, self.secret
        )
    }
}

/// `USER@REALM!TOKENID=<redacted>`.
impl fmt::Display for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}@{}!{}=<redacted>",
            self.user, self.realm, self.token_id
        )
    }
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiToken({self})")
    }
}

impl Serialize for ApiToken {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A pinned SHA-256 certificate fingerprint (of the leaf's DER, as PVE shows
/// it in `GET /nodes` `ssl_fingerprint`). Displayed as upper-case colon hex.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Sha256Fingerprint(pub [u8; 32]);

const FINGERPRINT_FORM: &str = "expected 32 hex bytes, colon-separated (AB:CD:…) or not";

impl Sha256Fingerprint {
    pub fn parse(s: &str) -> Result<Sha256Fingerprint, String> {
        let s = s.trim();
        let bad = || format!("{s:?} is not a SHA-256 fingerprint; {FINGERPRINT_FORM}");
        let hex = if s.contains(':') {
            let pairs: Vec<&str> = s.split(':').collect();
            if pairs.len() != 32 || pairs.iter().any(|p| p.len() != 2) {
                return Err(bad());
            }
            pairs.concat()
        } else {
            s.to_string()
        };
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            let pair = hex.get(2 * i..2 * i + 2).ok_or_else(bad)?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
        }
        Ok(Sha256Fingerprint(out))
    }
}

impl fmt::Display for Sha256Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { ":" };
            write!(f, "{sep}{b:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Sha256Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256Fingerprint({self})")
    }
}

impl Serialize for Sha256Fingerprint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

pub(super) const PROXMOX_KEYS: &[&str] = &[
    "proxmox_api_url",
    "proxmox_api_token",
    "proxmox_node",
    "proxmox_tls_ca_path",
    "proxmox_tls_fingerprint",
    "proxmox_tls_insecure",
    "proxmox_clone_mode",
    "proxmox_storage",
];

pub(super) fn read_proxmox(m: &Mapping, backend: &BackendKind) -> Read<Option<ProxmoxConfig>> {
    let any_set = PROXMOX_KEYS.iter().any(|k| m.get(k).is_some());
    if *backend != BackendKind::Proxmox && !any_set {
        return Ok(None);
    }
    let why = match backend {
        BackendKind::Proxmox => "missing; required when backend is proxmox",
        BackendKind::Qemu => "missing; required when any proxmox_* key is set",
    };
    let required = |key: &str| m.get(key).ok_or_else(|| m.problem_at(key, why));
    let api_url = url_value(&required("proxmox_api_url")?)?;
    let token_node = required("proxmox_api_token")?;
    let api_token = ApiToken::parse(token_node.string()?).map_err(|e| token_node.problem(e))?;
    let cfg = ProxmoxConfig {
        api_url,
        api_token,
        node: m.opt("proxmox_node", host_value)?,
        tls_ca_path: m.opt("proxmox_tls_ca_path", abs_path)?,
        tls_fingerprint: m.opt("proxmox_tls_fingerprint", |n| {
            Sha256Fingerprint::parse(n.string()?).map_err(|e| n.problem(e))
        })?,
        tls_insecure: m.opt("proxmox_tls_insecure", Node::bool)?.unwrap_or(false),
        clone_mode: m
            .opt("proxmox_clone_mode", |n| {
                n.choice("a clone mode", CLONE_MODES)
            })?
            .unwrap_or(CloneMode::Linked),
        storage: m.opt("proxmox_storage", storage_id_value)?,
    };
    if cfg.tls_insecure && (cfg.tls_ca_path.is_some() || cfg.tls_fingerprint.is_some()) {
        let why = "cannot be true when proxmox_tls_ca_path or proxmox_tls_fingerprint is set";
        return Err(m.problem_at("proxmox_tls_insecure", why));
    }
    Ok(Some(cfg))
}

/// A Proxmox node name (format `pve-node`: a host name).
fn host_value(node: &Node) -> Read<String> {
    let s = node.string()?;
    if is_host_name(s) {
        Ok(s.to_string())
    } else {
        Err(node.problem(format!("{s:?} is not a node name")))
    }
}

/// A Proxmox storage ID (format `pve-storage-id`: a letter, then letters,
/// digits, `-`, `_`, `.`).
fn storage_id_value(node: &Node) -> Read<String> {
    let s = node.string()?;
    let ok = s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(s.to_string())
    } else {
        Err(node.problem(format!("{s:?} is not a Proxmox storage ID")))
    }
}

const API_URL_FORM: &str =
    "expected https://HOST[:PORT][/api2/json], e.g. https://pve.example.com:8006/api2/json";

fn url_value(node: &Node) -> Read<String> {
    let s = node.string()?;
    parse_api_url(s).map_err(|why| {
        node.problem(format!(
            "{s:?} is not a Proxmox API URL ({why}); {API_URL_FORM}"
        ))
    })
}

/// Checks `https://HOST[:PORT][/api2/json]` and returns it ending in `/api2/json`.
fn parse_api_url(s: &str) -> Result<String, &'static str> {
    let rest = s
        .strip_prefix("https://")
        .ok_or("it must start with https://")?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if !matches!(path.trim_end_matches('/'), "" | "/api2/json") {
        return Err("the only path allowed is /api2/json");
    }
    let (host_ok, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (host, after) = v6.split_once(']').ok_or("unclosed '['")?;
            let port = match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or("text after ']'")?),
            };
            (host.parse::<Ipv6Addr>().is_ok(), port)
        }
        None => {
            let (host, port) = match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            };
            (host.parse::<Ipv4Addr>().is_ok() || is_host_name(host), port)
        }
    };
    if !host_ok {
        return Err("bad host");
    }
    if port.is_some_and(|p| !matches!(p.parse::<u16>(), Ok(n) if n > 0)) {
        return Err("port must be 1..=65535");
    }
    Ok(format!("https://{authority}/api2/json"))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::parse_config_str;

    const TOKEN: &str = "root@pam!agentlab=0123abcd-4567-89ef-0123-456789abcdef";
    const SECRET: &str = "0123abcd-4567-89ef-0123-456789abcdef";

    fn parse(text: &str) -> Result<Option<ProxmoxConfig>, String> {
        parse_config_str(text, Path::new("/etc/agentlab/config.yaml"))
            .map(|c| c.proxmox)
            .map_err(|e| e.to_string())
    }

    fn proxmox_text(url: &str, token: &str) -> String {
        format!("backend: proxmox\nproxmox_api_url: {url}\nproxmox_api_token: '{token}'\n")
    }

    #[test]
    fn api_url_without_path_gets_api2_json() {
        let c = parse(&proxmox_text("https://[::1]:8006/", TOKEN)).unwrap();

        assert_eq!(c.unwrap().api_url, "https://[::1]:8006/api2/json");
    }

    #[test]
    fn http_api_url_error_shows_the_expected_form() {
        let err = parse(&proxmox_text("http://pve:8006", TOKEN)).unwrap_err();

        assert_eq!(
            err,
            "/etc/agentlab/config.yaml: proxmox_api_url: \"http://pve:8006\" is not a Proxmox API URL \
             (it must start with https://); expected https://HOST[:PORT][/api2/json], e.g. https://pve.example.com:8006/api2/json"
        );
    }

    #[test]
    fn api_url_with_other_path_is_refused() {
        let err = parse(&proxmox_text("https://pve:8006/json", TOKEN)).unwrap_err();

        assert!(
            err.contains("(the only path allowed is /api2/json)"),
            "{err}"
        );
    }

    #[test]
    fn malformed_token_shows_the_expected_form_without_the_input() {
        let err = parse(&proxmox_text("https://pve:8006", "root@pam=s3cr3t-value")).unwrap_err();

        assert_eq!(
            err,
            "/etc/agentlab/config.yaml: proxmox_api_token: not a Proxmox API token (no '!' before the token ID); \
             expected USER@REALM!TOKENID=SECRET, e.g. root@pam!agentlab=0123abcd-4567-89ef-0123-456789abcdef"
        );
    }

    #[test]
    fn token_with_header_prefix_parses() {
        let token = ApiToken::parse(&format!("PVEAPIToken={TOKEN}")).unwrap();

        assert_eq!(
            (
                token.user.as_str(),
                token.realm.as_str(),
                token.token_id.as_str(),
                token.secret()
            ),
            ("root", "pam", "agentlab", SECRET)
        );
    }

    #[test]
    fn fingerprint_parses_with_or_without_colons() {
        let plain = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");

        assert_eq!(
            Sha256Fingerprint::parse(&plain),
            Ok(Sha256Fingerprint([0xAB; 32]))
        );
        assert_eq!(
            Sha256Fingerprint::parse(&colons),
            Ok(Sha256Fingerprint([0xAB; 32]))
        );
    }

    #[test]
    fn short_fingerprint_is_refused_with_the_expected_form() {
        let err = Sha256Fingerprint::parse("AB:CD").unwrap_err();

        assert_eq!(
            err,
            "\"AB:CD\" is not a SHA-256 fingerprint; expected 32 hex bytes, colon-separated (AB:CD:…) or not"
        );
    }

    #[test]
    fn tls_insecure_with_ca_path_is_refused() {
        let text = proxmox_text("https://pve:8006", TOKEN)
            + "proxmox_tls_insecure: true\nproxmox_tls_ca_path: /etc/pve/pve-root-ca.pem\n";

        let err = parse(&text).unwrap_err();

        assert!(err.ends_with("proxmox_tls_insecure: cannot be true when proxmox_tls_ca_path or proxmox_tls_fingerprint is set"), "{err}");
    }

    #[test]
    fn proxmox_backend_without_token_names_the_missing_key() {
        let err = parse("backend: proxmox\nproxmox_api_url: https://pve:8006\n").unwrap_err();

        assert_eq!(
            err,
            "/etc/agentlab/config.yaml: proxmox_api_token: missing; required when backend is proxmox"
        );
    }

    #[test]
    fn proxmox_keys_with_qemu_backend_still_need_url_and_token() {
        let err = parse("proxmox_node: pve1\n").unwrap_err();

        assert_eq!(
            err,
            "/etc/agentlab/config.yaml: proxmox_api_url: missing; required when any proxmox_* key is set"
        );
    }

    #[test]
    fn proxmox_fixture_parses() {
        let text = include_str!("../../tests/fixtures/config/config-proxmox.yaml");

        let p = parse(text).unwrap().unwrap();

        assert_eq!(
            (
                p.api_url.as_str(),
                p.api_token.authorization(),
                p.node.as_deref(),
                p.clone_mode
            ),
            (
                "https://pve.example.com:8006/api2/json",
                format!("PVEAPIToken={TOKEN}"),
                Some("pve1"),
                CloneMode::Linked,
            )
        );
    }
}
