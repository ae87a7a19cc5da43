//! A typed reader over yaml-rust2's `Yaml` tree that remembers where it is.
//!
//! Owns turning YAML text into documents (a syntax error keeps its line and
//! column) and reading scalars, lists and mappings while tracking the dotted
//! key path (`resources.cores`, `network.allow[2]`), so every complaint names
//! the key, what was found and what is allowed. It knows no agentlab key:
//! `mod.rs` (config.yaml) and `profile.rs` (profiles) list the keys that exist
//! and check the values' meaning.
//!
//! yaml-rust2 implements the YAML 1.2 core schema: `off`, `no` and `none` are
//! strings, `~` and an empty value are null, and integers are `i64`.

use std::ops::RangeInclusive;
use std::time::Duration;

use yaml_rust2::{Yaml, YamlLoader};

/// What is wrong with a value and where: `key` is the dotted path from the
/// document's top (empty for the document itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Problem {
    pub key: String,
    pub message: String,
}

pub(super) type Read<T> = Result<T, Problem>;

/// A YAML syntax error; `line` and `column` count from 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SyntaxError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Parses every document in `text`. Empty documents come back as null.
pub(super) fn load(text: &str) -> Result<Vec<Yaml>, SyntaxError> {
    YamlLoader::load_from_str(text).map_err(|e| SyntaxError {
        line: e.marker().line(),
        // yaml-rust2's marker column counts from 0 (its own Display adds 1).
        column: e.marker().col() + 1,
        message: tidy_scan_message(e.info()),
    })
}

/// yaml-rust2 reports a repeated key as `String("a"): duplicated key in
/// mapping`; users never wrote `String(…)`.
fn tidy_scan_message(info: &str) -> String {
    info.strip_prefix("String(")
        .and_then(|rest| rest.split_once("): duplicated key in mapping"))
        .map(|(key, _)| format!("duplicate key {key}"))
        .unwrap_or_else(|| info.to_string())
}

/// A document holding nothing (`---` then only comments) has no keys to read.
pub(super) fn is_empty_document(doc: &Yaml) -> bool {
    matches!(doc, Yaml::Null | Yaml::BadValue)
}

/// One value in the tree and the key path that leads to it.
#[derive(Clone, Debug)]
pub(super) struct Node<'a> {
    value: &'a Yaml,
    key: String,
}

impl<'a> Node<'a> {
    pub fn root(value: &'a Yaml) -> Node<'a> {
        Node {
            value,
            key: String::new(),
        }
    }

    pub fn problem(&self, message: impl Into<String>) -> Problem {
        Problem {
            key: self.key.clone(),
            message: message.into(),
        }
    }

    fn expected(&self, what: &str) -> Problem {
        self.problem(format!("expected {what}, got {}", describe(self.value)))
    }

    /// Reads a mapping whose keys must all be in `allowed`.
    pub fn mapping(&self, allowed: &'static [&'static str]) -> Read<Mapping<'a>> {
        self.mapping_of(&[allowed])
    }

    /// A mapping whose keys may come from any of several groups (config.yaml's
    /// own keys and the `proxmox_*` ones, kept beside the code that reads them).
    pub fn mapping_of(&self, groups: &[&'static [&'static str]]) -> Read<Mapping<'a>> {
        let allowed: Vec<&str> = groups.iter().flat_map(|g| g.iter().copied()).collect();
        let Yaml::Hash(hash) = self.value else {
            return Err(self.expected("a mapping of keys"));
        };
        let mut entries = Vec::with_capacity(hash.len());
        for (k, v) in hash {
            let Yaml::String(name) = k else {
                return Err(self.problem(format!("key {} is not a string", describe(k))));
            };
            if !allowed.contains(&name.as_str()) {
                return Err(Problem {
                    key: join(&self.key, name),
                    message: unknown_key(&self.key, name, &allowed),
                });
            }
            entries.push((name.as_str(), v));
        }
        Ok(Mapping {
            entries,
            key: self.key.clone(),
        })
    }

    pub fn string(&self) -> Read<&'a str> {
        match self.value {
            Yaml::String(s) => Ok(s),
            _ => Err(self.expected("a string")),
        }
    }

    pub fn bool(&self) -> Read<bool> {
        match self.value {
            Yaml::Boolean(b) => Ok(*b),
            _ => Err(self.expected("true or false")),
        }
    }

    /// Reads a YAML integer (not a quoted one) within `range`.
    pub fn int_in(&self, range: RangeInclusive<u64>) -> Read<u64> {
        match self.value {
            Yaml::Integer(n) => match u64::try_from(*n) {
                Ok(n) if range.contains(&n) => Ok(n),
                _ => Err(self.expected(&int_range(&range))),
            },
            _ => Err(self.expected(&int_range(&range))),
        }
    }

    /// Reads a duration written with its unit (`90s`, `30m`, `2h`, `1h30m`),
    /// or `0`. A bare number is refused rather than guessed: `stop_timeout: 30`
    /// could mean seconds or minutes.
    pub fn duration(&self) -> Read<Duration> {
        const FORMS: &str = "a duration with a unit, like 90s, 30m or 2h";
        match self.value {
            Yaml::Integer(0) => Ok(Duration::ZERO),
            Yaml::String(s) if s.trim() == "0" => Ok(Duration::ZERO),
            Yaml::String(s) if !s.trim().bytes().all(|b| b.is_ascii_digit()) => {
                crate::time::parse_duration(s).map_err(|e| self.problem(e))
            }
            _ => Err(self.expected(FORMS)),
        }
    }

    /// Reads a list; each item's key is `key[i]`.
    pub fn list(&self) -> Read<Vec<Node<'a>>> {
        let Yaml::Array(items) = self.value else {
            return Err(self.expected("a list"));
        };
        Ok(items
            .iter()
            .enumerate()
            .map(|(i, value)| Node {
                value,
                key: format!("{}[{i}]", self.key),
            })
            .collect())
    }

    /// Reads one word out of `choices` (case and surrounding blanks ignored,
    /// as AgentLab does for `network.mode`). `noun` names the kind of value:
    /// `"nta" is not a network mode; allowed: off, nat, allowlist`.
    pub fn choice<T: Clone>(&self, noun: &str, choices: &[(&str, T)]) -> Read<T> {
        let names = choices
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", ");
        let Yaml::String(s) = self.value else {
            return Err(self.expected(&format!("one of {names}")));
        };
        let wanted = s.trim().to_ascii_lowercase();
        choices
            .iter()
            .find(|(n, _)| *n == wanted)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| self.problem(format!("{s:?} is not {noun}; allowed: {names}")))
    }
}

/// A mapping whose keys have been checked against the allowed set.
pub(super) struct Mapping<'a> {
    entries: Vec<(&'a str, &'a Yaml)>,
    key: String,
}

impl<'a> Mapping<'a> {
    /// The value under `name`; `None` when the key is absent or null
    /// (`bridge:` with nothing after it keeps the default).
    pub fn get(&self, name: &str) -> Option<Node<'a>> {
        self.entries
            .iter()
            .find(|(n, v)| *n == name && !matches!(v, Yaml::Null))
            .map(|(_, value)| Node {
                value,
                key: join(&self.key, name),
            })
    }

    /// Reads `name` with `read` when it is present.
    pub fn opt<T>(&self, name: &str, read: impl FnOnce(&Node<'a>) -> Read<T>) -> Read<Option<T>> {
        self.get(name).map(|n| read(&n)).transpose()
    }

    /// A problem about `name`, present or not (a missing key, a conflict).
    pub fn problem_at(&self, name: &str, message: impl Into<String>) -> Problem {
        Problem {
            key: join(&self.key, name),
            message: message.into(),
        }
    }
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}.{name}")
    }
}

fn int_range(range: &RangeInclusive<u64>) -> String {
    format!("an integer {}..={}", range.start(), range.end())
}

/// How a found value is shown in a message: strings quoted, containers by kind.
fn describe(value: &Yaml) -> String {
    match value {
        Yaml::String(s) => format!("{s:?}"),
        Yaml::Integer(n) => n.to_string(),
        Yaml::Real(r) => r.clone(),
        Yaml::Boolean(b) => b.to_string(),
        Yaml::Array(_) => "a list".into(),
        Yaml::Hash(_) => "a mapping".into(),
        Yaml::Null => "null".into(),
        Yaml::Alias(_) | Yaml::BadValue => "an unsupported value".into(),
    }
}

fn unknown_key(parent: &str, name: &str, allowed: &[&str]) -> String {
    let hint = allowed
        .iter()
        .filter(|a| edit_distance(a, name) <= 2)
        .min_by_key(|a| edit_distance(a, name))
        .map(|a| format!(" (did you mean {a}?)"))
        .unwrap_or_default();
    let scope = if parent.is_empty() {
        "top-level keys".to_string()
    } else {
        format!("keys in {parent}")
    };
    format!("unknown key{hint}; allowed {scope}: {}", allowed.join(", "))
}

/// Levenshtein distance, for "did you mean" hints on short key names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> Yaml {
        load(text).unwrap().remove(0)
    }

    #[test]
    fn syntax_error_reports_line_and_column_from_one() {
        let err = load("a: 1\n  b: 2\n").unwrap_err();

        assert_eq!((err.line, err.column), (2, 4));
    }

    #[test]
    fn duplicate_key_message_names_the_key_plainly() {
        let err = load("a: 1\na: 2\n").unwrap_err();

        assert_eq!(err.message, "duplicate key \"a\"");
    }

    #[test]
    fn comment_only_text_has_no_documents() {
        let docs = load("# nothing here\n").unwrap();

        assert!(docs.is_empty());
    }

    #[test]
    fn unknown_nested_key_suggests_the_close_one() {
        let y = doc("resources: { memroy_mb: 1 }");
        let top = Node::root(&y).mapping(&["resources"]).unwrap();

        let err = top
            .get("resources")
            .unwrap()
            .mapping(&["cores", "memory_mb"]);

        assert_eq!(
            err.err().unwrap(),
            Problem {
                key: "resources.memroy_mb".into(),
                message: "unknown key (did you mean memory_mb?); allowed keys in resources: cores, memory_mb".into(),
            }
        );
    }

    #[test]
    fn quoted_number_is_not_an_integer() {
        let y = doc("\"2\"");

        let err = Node::root(&y).int_in(1..=64).unwrap_err();

        assert_eq!(err.message, "expected an integer 1..=64, got \"2\"");
    }

    #[test]
    fn negative_integer_is_out_of_range() {
        let y = doc("-1");

        let err = Node::root(&y).int_in(0..=10).unwrap_err();

        assert_eq!(err.message, "expected an integer 0..=10, got -1");
    }

    #[test]
    fn duration_with_unit_parses() {
        let y = doc("1h30m");

        let d = Node::root(&y).duration().unwrap();

        assert_eq!(d, Duration::from_secs(5400));
    }

    #[test]
    fn duration_without_unit_is_refused() {
        let y = doc("30");

        let err = Node::root(&y).duration().unwrap_err();

        assert_eq!(
            err.message,
            "expected a duration with a unit, like 90s, 30m or 2h, got 30"
        );
    }

    #[test]
    fn list_items_carry_their_index_in_the_key() {
        let y = doc("allow: [a, b]");
        let top = Node::root(&y).mapping(&["allow"]).unwrap();

        let items = top.get("allow").unwrap().list().unwrap();

        assert_eq!(items[1].problem("x").key, "allow[1]");
    }

    #[test]
    fn null_value_reads_as_absent() {
        let y = doc("bridge:\n");
        let top = Node::root(&y).mapping(&["bridge"]).unwrap();

        assert!(top.get("bridge").is_none());
    }

    #[test]
    fn choice_ignores_case_and_lists_choices_on_error() {
        let y = doc("[NAT, nta]");
        let items = Node::root(&y).list().unwrap();
        let choices = [("off", 0), ("nat", 1), ("allowlist", 2)];

        let good = items[0].choice("a network mode", &choices);
        let bad = items[1].choice("a network mode", &choices);

        assert_eq!(good, Ok(1));
        assert_eq!(
            bad.unwrap_err().message,
            "\"nta\" is not a network mode; allowed: off, nat, allowlist"
        );
    }
}
