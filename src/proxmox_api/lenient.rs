//! Lenient decoding of PVE's loosely typed answers (endpoints.md §0.1):
//! Perl hands out integers as numbers or strings (`/cluster/nextid` is
//! `"100"`, config `memory` is `"2048"` since qemu-server 8.0.8) and
//! booleans as `0`/`1`. Use these with `#[serde(deserialize_with)]`.

use serde::{Deserialize, Deserializer};
use serde_json::Value;

fn int_of(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) => s.trim().parse().ok(),
        Value::Bool(b) => Some(i64::from(*b)),
        _ => None,
    }
}

/// Reads a JSON value as an integer: `5`, `"5"`, `5.0`.
pub fn to_int(v: &Value) -> Option<i64> {
    int_of(v)
}

/// Reads a JSON value as a boolean: `true`, `1`, `"1"` (and their opposites).
pub fn to_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s == "true" => Some(true),
        Value::String(s) if s == "false" => Some(false),
        other => int_of(other).map(|i| i != 0),
    }
}

/// Reads a scalar as text: `"x"`, `5` → `"5"`.
pub fn to_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(if *b { "1" } else { "0" }.to_string()),
        _ => None,
    }
}

pub fn int<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    let v = Value::deserialize(d)?;
    int_of(&v).ok_or_else(|| serde::de::Error::custom(format!("expected an integer, got {v}")))
}

pub fn opt_int<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    let v = Option::<Value>::deserialize(d)?;
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => int_of(&v)
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom(format!("expected an integer, got {v}"))),
    }
}

pub fn bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    let v = Option::<Value>::deserialize(d)?;
    match v {
        None | Some(Value::Null) => Ok(false),
        Some(v) => to_bool(&v)
            .ok_or_else(|| serde::de::Error::custom(format!("expected a boolean, got {v}"))),
    }
}

pub fn opt_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let v = Option::<Value>::deserialize(d)?;
    Ok(v.as_ref().and_then(to_text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Deserialize, Debug, PartialEq)]
    struct T {
        #[serde(deserialize_with = "int")]
        n: i64,
        #[serde(default, deserialize_with = "bool")]
        b: bool,
        #[serde(default, deserialize_with = "opt_int")]
        o: Option<i64>,
    }

    #[test]
    fn perl_strings_and_ints_both_decode() {
        let a: T = serde_json::from_value(json!({"n": "100", "b": "1", "o": 7})).unwrap();
        let b: T = serde_json::from_value(json!({"n": 100, "b": 1, "o": "7"})).unwrap();

        assert_eq!(a, b);
        assert_eq!(
            a,
            T {
                n: 100,
                b: true,
                o: Some(7)
            }
        );
    }

    #[test]
    fn absent_optional_fields_and_extra_fields_are_fine() {
        let t: T = serde_json::from_value(json!({"n": 1, "surprise": [1, 2]})).unwrap();

        assert_eq!(
            t,
            T {
                n: 1,
                b: false,
                o: None
            }
        );
    }

    #[test]
    fn non_numeric_string_is_an_error() {
        let e = serde_json::from_value::<T>(json!({"n": "abc"})).unwrap_err();

        assert!(
            e.to_string().contains("expected an integer, got \"abc\""),
            "{e}"
        );
    }
}
