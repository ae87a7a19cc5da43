//! The answer cache: upstream replies kept as bytes for their TTL (clamped
//! between a floor and a ceiling), so a repeated question is answered
//! without a round trip. Pure: the caller passes the time, so tests drive
//! expiry with a fake clock.
//!
//! Positive answers live for their smallest answer TTL; NXDOMAIN and NODATA
//! for their smallest authority TTL (the SOA, RFC 2308 §5). A hit is served
//! with the asker's id and question bytes (its letter case) and every TTL
//! lowered by the time spent in the cache.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::codec::{self, Message, Rcode, HEADER_LEN, TYPE_OPT};

/// Bounds on what the cache keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheLimits {
    /// Entries live at least this long (also the least TTL reported to `Policy::allowed`).
    pub min_ttl: Duration,
    /// Entries live at most this long; zero turns the cache off.
    pub max_ttl: Duration,
    /// Most entries held.
    pub entries: usize,
    /// Larger replies are not cached.
    pub entry_bytes: usize,
}

impl Default for CacheLimits {
    fn default() -> Self {
        CacheLimits {
            min_ttl: Duration::from_secs(5),
            max_ttl: Duration::from_secs(3600),
            entries: 4096,
            entry_bytes: 4096,
        }
    }
}

/// A question as the cache files it: normalized name, type, class.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
}

struct Entry {
    reply: Vec<u8>,
    question_end: usize,
    /// Offsets of every record's TTL and the TTL that was there.
    ttls: Vec<(usize, u32)>,
    stored: Instant,
    expires: Instant,
}

pub struct Cache {
    limits: CacheLimits,
    map: HashMap<Key, Entry>,
}

impl Cache {
    pub fn new(limits: CacheLimits) -> Cache {
        Cache {
            limits,
            map: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Keeps `reply` (parsed as `parsed`) for `key`, if it is cacheable.
    pub fn insert(&mut self, key: Key, reply: &[u8], parsed: &Message, now: Instant) {
        let Some(ttl) = self.lifetime(parsed) else {
            return;
        };
        if reply.len() > self.limits.entry_bytes || self.limits.entries == 0 {
            return;
        }
        if self.map.len() >= self.limits.entries && !self.map.contains_key(&key) {
            self.map.retain(|_, e| e.expires > now);
            if self.map.len() >= self.limits.entries {
                let oldest = self
                    .map
                    .iter()
                    .min_by_key(|(_, e)| e.expires)
                    .map(|(k, _)| k.clone());
                oldest.map(|k| self.map.remove(&k));
            }
        }
        let ttls = parsed
            .answers
            .iter()
            .chain(&parsed.authority)
            .chain(&parsed.additional)
            .filter(|r| r.rtype != TYPE_OPT)
            .map(|r| (r.ttl_offset, r.ttl))
            .collect();
        let entry = Entry {
            reply: reply.to_vec(),
            question_end: parsed.question_end,
            ttls,
            stored: now,
            expires: now + ttl,
        };
        self.map.insert(key, entry);
    }

    /// How long `parsed` may be kept, or `None` when it must not be.
    fn lifetime(&self, parsed: &Message) -> Option<Duration> {
        let h = parsed.header;
        if h.truncated() || self.limits.max_ttl.is_zero() {
            return None;
        }
        let records = match h.rcode() {
            r if r == Rcode::NoError as u8 && !parsed.answers.is_empty() => &parsed.answers,
            r if r == Rcode::NoError as u8 || r == Rcode::NxDomain as u8 => &parsed.authority,
            _ => return None,
        };
        let secs = records.iter().map(|r| r.ttl).min()?;
        let ttl = Duration::from_secs(u64::from(secs));
        Some(ttl.clamp(
            self.limits.min_ttl,
            self.limits.max_ttl.max(self.limits.min_ttl),
        ))
    }

    /// The cached answer to `query` (parsed as `q`, filed under `key`),
    /// ready to send, or `None` on a miss or after expiry.
    pub fn get(&mut self, key: &Key, query: &[u8], q: &Message, now: Instant) -> Option<Vec<u8>> {
        let e = self.map.get(key)?;
        if e.expires <= now {
            self.map.remove(key);
            return None;
        }
        let elapsed = u32::try_from(now.duration_since(e.stored).as_secs()).unwrap_or(u32::MAX);
        let client_question = query.get(HEADER_LEN..q.question_end)?;
        if client_question.len() != e.question_end - HEADER_LEN {
            return None; // same name, other encoding: cannot splice safely
        }
        let mut out = e.reply.clone();
        out[HEADER_LEN..e.question_end].copy_from_slice(client_question);
        for &(at, ttl) in &e.ttls {
            if let Some(slot) = out.get_mut(at..at + 4) {
                slot.copy_from_slice(&ttl.saturating_sub(elapsed).to_be_bytes());
            }
        }
        codec::set_id(&mut out, q.header.id);
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::dns::codec::{
        build_reply, Header, Question, RData, Record, CLASS_IN, FLAG_RD, TYPE_A,
    };
    use std::net::Ipv4Addr;

    fn query(name: &str, id: u16) -> (Vec<u8>, Message) {
        let m = Message {
            header: Header {
                id,
                flags: FLAG_RD,
                ..Header::default()
            },
            questions: vec![Question {
                name: name.into(),
                qtype: TYPE_A,
                qclass: CLASS_IN,
            }],
            ..Message::default()
        };
        let mut out = Vec::new();
        m.encode(&mut out).unwrap();
        let parsed = Message::parse(&out).unwrap();
        (out, parsed)
    }

    fn reply_with_ttl(name: &str, ttl: u32) -> (Vec<u8>, Message) {
        let (q, qm) = query(name, 1);
        let rec = Record {
            name: name.into(),
            rtype: TYPE_A,
            class: CLASS_IN,
            ttl,
            data: RData::A(Ipv4Addr::new(198, 51, 100, 10)),
            ttl_offset: 0,
        };
        let bytes = build_reply(&q, &qm, Rcode::NoError, &[rec]);
        let parsed = Message::parse(&bytes).unwrap();
        (bytes, parsed)
    }

    fn key(name: &str) -> Key {
        Key {
            name: name.into(),
            qtype: TYPE_A,
            qclass: CLASS_IN,
        }
    }

    #[test]
    fn hit_lowers_ttl_and_takes_the_askers_id_and_case() {
        let mut cache = Cache::new(CacheLimits::default());
        let t0 = Instant::now();
        let (bytes, parsed) = reply_with_ttl("a.test", 60);
        cache.insert(key("a.test"), &bytes, &parsed, t0);
        let (q, qm) = query("A.Test", 99);
        let hit = cache
            .get(&key("a.test"), &q, &qm, t0 + Duration::from_secs(20))
            .unwrap();
        let m = Message::parse(&hit).unwrap();
        assert_eq!(m.header.id, 99);
        assert_eq!(m.questions[0].name, "A.Test");
        assert_eq!(m.answers[0].ttl, 40);
    }

    #[test]
    fn entry_expires_after_its_ttl() {
        let mut cache = Cache::new(CacheLimits::default());
        let t0 = Instant::now();
        let (bytes, parsed) = reply_with_ttl("a.test", 60);
        cache.insert(key("a.test"), &bytes, &parsed, t0);
        let (q, qm) = query("a.test", 2);
        assert!(cache
            .get(&key("a.test"), &q, &qm, t0 + Duration::from_secs(61))
            .is_none());
        assert!(cache.is_empty());
    }

    #[test]
    fn ttl_is_clamped_to_the_ceiling() {
        let limits = CacheLimits {
            max_ttl: Duration::from_secs(10),
            ..CacheLimits::default()
        };
        let mut cache = Cache::new(limits);
        let t0 = Instant::now();
        let (bytes, parsed) = reply_with_ttl("a.test", 86400);
        cache.insert(key("a.test"), &bytes, &parsed, t0);
        let (q, qm) = query("a.test", 2);
        assert!(cache
            .get(&key("a.test"), &q, &qm, t0 + Duration::from_secs(11))
            .is_none());
    }

    #[test]
    fn zero_ttl_is_raised_to_the_floor() {
        let mut cache = Cache::new(CacheLimits::default());
        let t0 = Instant::now();
        let (bytes, parsed) = reply_with_ttl("a.test", 0);
        cache.insert(key("a.test"), &bytes, &parsed, t0);
        let (q, qm) = query("a.test", 2);
        assert!(cache
            .get(&key("a.test"), &q, &qm, t0 + Duration::from_secs(4))
            .is_some());
    }

    #[test]
    fn servfail_is_not_cached() {
        let mut cache = Cache::new(CacheLimits::default());
        let (q, qm) = query("a.test", 1);
        let bytes = build_reply(&q, &qm, Rcode::ServFail, &[]);
        cache.insert(
            key("a.test"),
            &bytes,
            &Message::parse(&bytes).unwrap(),
            Instant::now(),
        );
        assert!(cache.is_empty());
    }

    #[test]
    fn full_cache_evicts_the_soonest_to_expire() {
        let limits = CacheLimits {
            entries: 2,
            ..CacheLimits::default()
        };
        let mut cache = Cache::new(limits);
        let t0 = Instant::now();
        for (name, ttl) in [("a.test", 30), ("b.test", 300), ("c.test", 300)] {
            let (bytes, parsed) = reply_with_ttl(name, ttl);
            cache.insert(key(name), &bytes, &parsed, t0);
        }
        let (q, qm) = query("a.test", 2);
        assert_eq!(cache.len(), 2);
        assert!(cache.get(&key("a.test"), &q, &qm, t0).is_none());
    }
}
