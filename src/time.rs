//! Wall-clock timestamps and human durations.
//!
//! Owns the two time notations agentlab shows users and stores: RFC 3339 UTC
//! timestamps with millisecond precision (`2026-11-22T05:16:00.123Z`, as in
//! AgentLab's API) and short durations (`90s`, `30m`, `2h`, `1d`, `1h30m`).
//! Civil-date conversion follows Howard Hinnant's `days_from_civil` /
//! `civil_from_days` algorithms, so no calendar crate is needed.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Milliseconds since the Unix epoch, UTC. Serialized as RFC 3339.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn now() -> Timestamp {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        Timestamp(ms)
    }

    pub fn from_millis(ms: i64) -> Timestamp {
        Timestamp(ms)
    }

    pub fn from_system(t: std::time::SystemTime) -> Timestamp {
        let ms = match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => d.as_millis() as i64,
            Err(e) => -(e.duration().as_millis() as i64),
        };
        Timestamp::from_millis(ms)
    }

    pub fn millis(self) -> i64 {
        self.0
    }

    pub fn plus(self, d: Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_add(d.as_millis().min(i64::MAX as u128) as i64),
        )
    }

    /// Time left until `self`, or zero when it has passed.
    pub fn remaining_from(self, now: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(now.0).max(0) as u64)
    }

    /// Parses `YYYY-MM-DDTHH:MM:SS[.fff]Z` (the form this module writes).
    pub fn parse(s: &str) -> Option<Timestamp> {
        let b = s.as_bytes();
        if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
            return None;
        }
        if b[16] != b':' || *b.last()? != b'Z' {
            return None;
        }
        let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
        let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
        let frac = &s[19..s.len() - 1];
        let ms = match frac {
            "" => 0,
            f if f.starts_with('.')
                && f.len() > 1
                && f[1..].bytes().all(|c| c.is_ascii_digit()) =>
            {
                let digits = &f[1..f.len().min(4)];
                digits.parse::<i64>().ok()? * 10_i64.pow(3 - digits.len() as u32)
            }
            _ => return None,
        };
        if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
            return None;
        }
        let days = days_from_civil(y, mo, d);
        Some(Timestamp(
            ((days * 86_400 + h * 3600 + mi * 60 + sec) * 1000) + ms,
        ))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.div_euclid(1000);
        let ms = self.0.rem_euclid(1000);
        let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        let (y, mo, d) = civil_from_days(days);
        write!(
            f,
            "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
            rem / 3600,
            (rem / 60) % 60,
            rem % 60
        )
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Timestamp::parse(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("invalid timestamp {s:?}")))
    }
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Parses `90s`, `30m`, `2h`, `1d`, `1h30m`, `500ms`; a bare number is minutes,
/// as AgentLab's `ttl_minutes` is.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(mins) = t.parse::<u64>() {
        return mins
            .checked_mul(60)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("duration {s:?} is too large"));
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!(
                "invalid duration {s:?}: expected forms like 90s, 30m, 2h, 1d or 1h30m"
            ));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("duration {s:?} is too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit_ms: u64 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            other => {
                return Err(format!(
                    "invalid duration {s:?}: unknown unit {other:?} (use ms, s, m, h or d)"
                ))
            }
        };
        rest = &rest[unit_len..];
        let part = n
            .checked_mul(unit_ms)
            .ok_or_else(|| format!("duration {s:?} is too large"))?;
        total = total
            .checked_add(Duration::from_millis(part))
            .ok_or_else(|| format!("duration {s:?} is too large"))?;
    }
    Ok(total)
}

/// Renders a duration the way `parse_duration` reads it: `1h30m`, `45s`.
pub fn format_duration(d: Duration) -> String {
    let mut secs = d.as_secs();
    if secs == 0 {
        return format!("{}ms", d.as_millis());
    }
    let mut out = String::new();
    for (unit, len) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= len {
            out.push_str(&format!("{}{unit}", secs / len));
            secs %= len;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_formats_as_rfc3339() {
        assert_eq!(Timestamp(0).to_string(), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn leap_day_round_trips() {
        let ts = Timestamp::parse("2024-02-29T23:59:58.250Z").unwrap();
        assert_eq!(ts.to_string(), "2024-02-29T23:59:58.250Z");
    }

    #[test]
    fn parse_accepts_whole_seconds() {
        assert_eq!(
            Timestamp::parse("2026-01-29T23:45:00Z")
                .unwrap()
                .to_string(),
            "2026-01-29T23:45:00.000Z"
        );
    }

    #[test]
    fn parse_rejects_garbage() {
        assert_eq!(Timestamp::parse("2026-13-01T00:00:00Z"), None);
        assert_eq!(Timestamp::parse("yesterday"), None);
        assert_eq!(Timestamp::parse("2026-01-01T00:00:00.x1Z"), None);
    }

    #[test]
    fn durations_parse_in_each_unit() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172_800));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
    }

    #[test]
    fn bare_number_is_minutes() {
        assert_eq!(parse_duration("180").unwrap(), Duration::from_secs(10_800));
    }

    #[test]
    fn bad_durations_name_the_problem() {
        assert!(parse_duration("5x").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("m").unwrap_err().contains("expected forms"));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("99999999999999999999d")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn format_duration_is_compact() {
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format_duration(Duration::from_secs(45)), "45s");
    }
}
