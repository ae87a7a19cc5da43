//! Request parameters as PVE's API server decodes them
//! (`PVE::APIServer::AnyEvent::decode_urlencoded`, endpoints.md §0.1):
//! booleans only as `0`/`1`, arrays as a repeated key, and the `sshkeys`
//! value percent-encoded by the client before the form encoder encodes it
//! again (format `urlencoded`, `^[-%a-zA-Z0-9_.!~*'()]*$`). Pure: no I/O.

/// An ordered list of `key=value` pairs; a key may repeat (an array).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Form(pub Vec<(String, String)>);

impl Form {
    pub fn new() -> Form {
        Form::default()
    }

    pub fn str(mut self, key: &str, value: impl Into<String>) -> Form {
        self.0.push((key.to_string(), value.into()));
        self
    }

    pub fn int(self, key: &str, value: impl Into<i64>) -> Form {
        let v: i64 = value.into();
        self.str(key, v.to_string())
    }

    /// PVE refuses `true`/`false` in form and query encoding.
    pub fn bool(self, key: &str, value: bool) -> Form {
        self.str(key, if value { "1" } else { "0" })
    }

    /// An `array` parameter: one `key=item` pair per item.
    pub fn array(mut self, key: &str, items: &[String]) -> Form {
        for i in items {
            self.0.push((key.to_string(), i.clone()));
        }
        self
    }

    /// `sshkeys`: the keys, one a line, percent-encoded once here (space as
    /// `%20`, never `+`); the form encoder encodes the result again.
    pub fn sshkeys(self, keys: &[String]) -> Form {
        let joined = keys.join("\n");
        self.str("sshkeys", percent_encode(&joined))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `application/x-www-form-urlencoded` text (also a query string).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                out.push('&');
            }
            out.push_str(&percent_encode(k));
            out.push('=');
            out.push_str(&percent_encode(v));
        }
        out
    }
}

/// Percent-encodes every byte outside RFC 3986's unreserved set, so the
/// output passes PVE's `urlencoded` format and decodes back exactly
/// (a space is `%20`, which both `uri_unescape` and form decoding read).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes and, when `plus_is_space`, `+` (form encoding).
/// Malformed escapes are kept as text, as Perl's `uri_unescape` does.
pub fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' if plus_is_space => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Splits a form body or query string into pairs (`&` and `;` separate).
pub fn parse_pairs(s: &str) -> Vec<(String, String)> {
    s.split(['&', ';'])
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k, true), percent_decode(v, true))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn booleans_are_zero_and_one() {
        let f = Form::new().bool("full", true).bool("start", false);

        assert_eq!(f.encode(), "full=1&start=0");
    }

    #[test]
    fn arrays_repeat_the_key() {
        let argv = vec!["/bin/sh".to_string(), "-c".into(), "echo hi".into()];

        let f = Form::new().array("command", &argv);

        assert_eq!(
            f.encode(),
            "command=%2Fbin%2Fsh&command=-c&command=echo%20hi"
        );
    }

    #[test]
    fn sshkeys_are_encoded_twice_on_the_wire() {
        let keys = vec![
            "ssh-ed25519 AAAA+b/c= me@host".to_string(),
            "ssh-rsa X".into(),
        ];

        let f = Form::new().sshkeys(&keys);

        assert_eq!(
            f.encode(),
            "sshkeys=ssh-ed25519%2520AAAA%252Bb%252Fc%253D%2520me%2540host%250Assh-rsa%2520X"
        );
    }

    #[test]
    fn sshkeys_value_decodes_once_to_pve_urlencoded_format_and_twice_to_the_keys() {
        let keys = vec!["ssh-ed25519 AAAA+b/c= me@host".to_string()];
        let wire = Form::new().sshkeys(&keys).encode();

        let once = &parse_pairs(&wire)[0].1;

        assert!(once
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-%_.!~*'()".contains(&b)));
        assert_eq!(percent_decode(once, false), keys[0]);
    }

    #[test]
    fn parse_pairs_reads_repeats_plus_and_semicolons() {
        let pairs = parse_pairs("command=ls&command=-la;x=a+b%21");

        assert_eq!(
            pairs,
            vec![
                ("command".to_string(), "ls".to_string()),
                ("command".into(), "-la".into()),
                ("x".into(), "a b!".into())
            ]
        );
    }

    #[test]
    fn truncated_escape_is_kept_as_text() {
        assert_eq!(percent_decode("100%", true), "100%");
        assert_eq!(percent_decode("%4", true), "%4");
    }
}
