//! What the gateway resolver does with one question from one client: refuse
//! it, answer it locally, deny it, or forward it — and which addresses of a
//! forwarded answer the allowlist learns. Pure: names in, decisions out.
//!
//! Matching is on ASCII-lowercased names without the trailing dot (DNS case
//! folding is ASCII-only, RFC 4343). Internationalised names travel as
//! punycode (`xn--…`) and are compared as such; profiles write them that way.
//!
//! A wildcard rule `*.pypi.org` matches every name *under* `pypi.org`
//! (`files.pypi.org`, `a.b.pypi.org`) but not `pypi.org` itself, as a
//! wildcard certificate or an RFC 4592 wildcard record does; list the apex
//! as its own entry when it is wanted. This keeps `*.example.com` from
//! quietly allowing a different service hosted at the apex.

use std::collections::HashSet;
use std::net::IpAddr;

use super::codec::{Message, RData, TYPE_A, TYPE_AAAA};
use super::{Client, ClientPolicy};
use crate::config::AllowRule;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Unknown client: REFUSED.
    Refuse,
    /// A name this client may not see: NXDOMAIN.
    Deny,
    /// A local name: answer with this address (NODATA if the type differs).
    Local(IpAddr),
    /// Ask upstream. `report` holds the ports of the allowlist rules that
    /// matched (the answer's addresses go to `Policy::allowed` with each);
    /// `None` for an open client, whose answers nobody needs to learn.
    Forward { report: Option<Vec<Option<u16>>> },
}

/// Lowercase, without one trailing dot.
pub fn normalize(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// The part of `name` before `.domain`, if `name` is under `domain`; both normalized.
pub fn local_part<'a>(name: &'a str, domain: &str) -> Option<&'a str> {
    if domain.is_empty() {
        return None;
    }
    name.strip_suffix(domain)?.strip_suffix('.')
}

/// Whether `rule` (a `Domain` rule) covers the normalized `name`.
pub fn rule_matches(rule: &AllowRule, name: &str) -> bool {
    match rule {
        AllowRule::Domain {
            name: rule_name,
            wildcard: false,
            ..
        } => name == rule_name,
        AllowRule::Domain {
            name: rule_name,
            wildcard: true,
            ..
        } => name
            .strip_suffix(rule_name.as_str())
            .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        AllowRule::Net { .. } => false,
    }
}

/// Decides what to do with `qname` (normalized) asked by `client`.
/// `local` maps a local-part (`web`, `1012`, `host`) to an address.
pub fn decide(
    client: Option<&Client>,
    qname: &str,
    domain: &str,
    local: impl FnOnce(&str) -> Option<IpAddr>,
) -> Decision {
    let Some(client) = client else {
        return Decision::Refuse;
    };
    if let Some(part) = local_part(qname, domain).or((qname == domain).then_some("")) {
        if !client.see_local || part.is_empty() {
            return Decision::Deny;
        }
        return local(part).map_or(Decision::Deny, Decision::Local);
    }
    match &client.policy {
        ClientPolicy::Open => Decision::Forward { report: None },
        ClientPolicy::Allowlist(rules) => {
            let ports: Vec<Option<u16>> = rules
                .iter()
                .filter(|r| rule_matches(r, qname))
                .filter_map(|r| match r {
                    AllowRule::Domain { port, .. } => Some(*port),
                    AllowRule::Net { .. } => None,
                })
                .collect();
            if ports.is_empty() {
                Decision::Deny
            } else {
                Decision::Forward {
                    report: Some(ports),
                }
            }
        }
    }
}

/// Most CNAME links followed from the question name.
const MAX_CHAIN: usize = 16;

/// The A/AAAA addresses `answer` gives for `qname` (normalized), following
/// its CNAME chain inside the answer section, each with its record TTL.
pub fn addresses_for(answer: &Message, qname: &str) -> Vec<(IpAddr, u32)> {
    let mut chain: HashSet<String> = HashSet::from([qname.to_owned()]);
    for _ in 0..MAX_CHAIN {
        let before = chain.len();
        for r in &answer.answers {
            if let RData::Cname(target) = &r.data {
                if chain.contains(&normalize(&r.name)) {
                    chain.insert(normalize(target));
                }
            }
        }
        if chain.len() == before {
            break;
        }
    }
    answer
        .answers
        .iter()
        .filter(|r| chain.contains(&normalize(&r.name)))
        .filter_map(|r| match (&r.data, r.rtype) {
            (RData::A(a), TYPE_A) => Some((IpAddr::V4(*a), r.ttl)),
            (RData::Aaaa(a), TYPE_AAAA) => Some((IpAddr::V6(*a), r.ttl)),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::dns::codec::{Header, Record, CLASS_IN, TYPE_CNAME};
    use std::net::Ipv4Addr;

    fn rule(s: &str) -> AllowRule {
        AllowRule::parse(s).unwrap()
    }

    fn client(policy: ClientPolicy, see_local: bool) -> Client {
        Client {
            vmid: 7,
            policy,
            see_local,
        }
    }

    fn allow(rules: &[&str]) -> Client {
        client(
            ClientPolicy::Allowlist(rules.iter().map(|r| rule(r)).collect()),
            false,
        )
    }

    const GW: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 1));

    #[test]
    fn exact_rule_matches_only_the_name() {
        assert!(rule_matches(&rule("github.com"), "github.com"));
        assert!(!rule_matches(&rule("github.com"), "api.github.com"));
        assert!(!rule_matches(&rule("github.com"), "notgithub.com"));
    }

    #[test]
    fn wildcard_matches_subdomains_but_not_the_apex() {
        let r = rule("*.pypi.org");
        assert!(rule_matches(&r, "files.pypi.org"));
        assert!(rule_matches(&r, "a.b.pypi.org"));
        assert!(!rule_matches(&r, "pypi.org"));
        assert!(!rule_matches(&r, "evilpypi.org"));
    }

    #[test]
    fn case_and_trailing_dot_do_not_matter() {
        let c = allow(&["GitHub.com"]);
        let d = decide(Some(&c), &normalize("GITHUB.COM."), "sbx", |_| None);
        assert_eq!(
            d,
            Decision::Forward {
                report: Some(vec![None])
            }
        );
    }

    #[test]
    fn punycode_names_pass_through_unchanged() {
        let c = allow(&["xn--bcher-kva.example"]);
        let d = decide(
            Some(&c),
            &normalize("XN--BCHER-KVA.example."),
            "sbx",
            |_| None,
        );
        assert_eq!(
            d,
            Decision::Forward {
                report: Some(vec![None])
            }
        );
    }

    #[test]
    fn every_matching_rule_reports_its_port() {
        let c = allow(&["api.github.com:443", "*.github.com:22", "pypi.org"]);
        let d = decide(Some(&c), "api.github.com", "sbx", |_| None);
        assert_eq!(
            d,
            Decision::Forward {
                report: Some(vec![Some(443), Some(22)])
            }
        );
    }

    #[test]
    fn unlisted_name_is_denied_for_allowlist_clients() {
        assert_eq!(
            decide(Some(&allow(&["a.test"])), "b.test", "sbx", |_| None),
            Decision::Deny
        );
    }

    #[test]
    fn unknown_client_is_refused() {
        assert_eq!(decide(None, "a.test", "sbx", |_| None), Decision::Refuse);
    }

    #[test]
    fn open_client_forwards_without_reporting() {
        let c = client(ClientPolicy::Open, false);
        assert_eq!(
            decide(Some(&c), "a.test", "sbx", |_| None),
            Decision::Forward { report: None }
        );
    }

    #[test]
    fn local_names_need_see_local() {
        let hidden = client(ClientPolicy::Open, false);
        let shown = client(ClientPolicy::Open, true);
        assert_eq!(
            decide(Some(&hidden), "host.sbx", "sbx", |_| Some(GW)),
            Decision::Deny
        );
        assert_eq!(
            decide(Some(&shown), "host.sbx", "sbx", |_| Some(GW)),
            Decision::Local(GW)
        );
    }

    #[test]
    fn local_names_are_never_forwarded_even_when_unknown() {
        let c = client(ClientPolicy::Open, true);
        assert_eq!(
            decide(Some(&c), "nobody.sbx", "sbx", |_| None),
            Decision::Deny
        );
        assert_eq!(decide(Some(&c), "sbx", "sbx", |_| Some(GW)), Decision::Deny);
    }

    #[test]
    fn local_part_is_passed_without_the_domain() {
        let c = client(ClientPolicy::Open, true);
        let mut seen = String::new();
        decide(Some(&c), "web.lab.internal", "lab.internal", |n| {
            seen = n.to_owned();
            None
        });
        assert_eq!(seen, "web");
    }

    fn rec(name: &str, data: RData) -> Record {
        let rtype = match data {
            RData::A(_) => TYPE_A,
            RData::Cname(_) => TYPE_CNAME,
            _ => TYPE_AAAA,
        };
        Record {
            name: name.into(),
            rtype,
            class: CLASS_IN,
            ttl: 60,
            data,
            ttl_offset: 0,
        }
    }

    #[test]
    fn addresses_follow_the_cname_chain_and_skip_strangers() {
        let m = Message {
            header: Header::default(),
            answers: vec![
                rec("CDN.allowed.test", RData::Cname("edge.cdn.example".into())),
                rec("edge.cdn.example", RData::Cname("x.cdn.example.".into())),
                rec("x.cdn.example", RData::A(Ipv4Addr::new(198, 51, 100, 10))),
                rec("unrelated.example", RData::A(Ipv4Addr::new(203, 0, 113, 9))),
            ],
            ..Message::default()
        };
        let got = addresses_for(&m, "cdn.allowed.test");
        assert_eq!(got, vec![(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 10)), 60)]);
    }
}
