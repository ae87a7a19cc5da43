//! The daemon's database: sled trees, their keys, and the schema version.
//!
//! Trees and keys (all integers big-endian, so sled's order is numeric order):
//! - `sandboxes`: vmid (u32) → `model::Sandbox` as JSON
//! - `events`: event id (u64) → `model::Event` as JSON (appended; the oldest
//!   are dropped beyond `event_log_max`)
//! - `events_by_vmid`: vmid (u32) ‖ event id (u64) → empty (index)
//! - `meta`: `schema_version` → u32, `next_vmid` → u32, `next_event` → u64
//!
//! A sandbox change and the event that records it are written in one sled
//! transaction and flushed before the call returns, so after a crash sled
//! holds either both or neither. What sled says exists on disk is reconciled
//! against the disk by the daemon's reconciler, not here.

use std::path::{Path, PathBuf};

use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use sled::Tree;

use crate::model::{Event, EventDraft, Exposure, Sandbox, FIRST_VMID};
use crate::time::Timestamp;

/// Bumped when the stored shapes change incompatibly.
pub const SCHEMA_VERSION: u32 = 1;

const KEY_SCHEMA: &[u8] = b"schema_version";
const KEY_NEXT_VMID: &[u8] = b"next_vmid";
const KEY_NEXT_EVENT: &[u8] = b"next_event";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database at {path} (is another agentlabd running?)")]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("the database at {path} has schema version {found}, newer than this agentlab ({supported}); upgrade agentlab")]
    SchemaTooNew {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("database operation failed")]
    Db(#[from] sled::Error),
    #[error("stored record {key} is corrupt")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("sandbox {0} changed concurrently; retry")]
    Conflict(u32),
}

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    sandboxes: Tree,
    events: Tree,
    by_vmid: Tree,
    meta: Tree,
    /// Exposed sandbox ports, by name.
    exposures: Tree,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = sled::Config::new()
            .path(path)
            // The working set is a few hundred records; sled's 1 GiB default
            // cache would only inflate the daemon's RSS.
            .cache_capacity(8 << 20)
            .flush_every_ms(Some(1000))
            .open()
            .map_err(|source| StoreError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let store = Store {
            sandboxes: db.open_tree("sandboxes")?,
            events: db.open_tree("events")?,
            by_vmid: db.open_tree("events_by_vmid")?,
            meta: db.open_tree("meta")?,
            exposures: db.open_tree("exposures")?,
            db,
        };
        match store.meta.get(KEY_SCHEMA)? {
            None => {
                store
                    .meta
                    .insert(KEY_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
                store.db.flush()?;
            }
            Some(v) => {
                let found = read_u32(&v);
                if found > SCHEMA_VERSION {
                    return Err(StoreError::SchemaTooNew {
                        path: path.to_path_buf(),
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
            }
        }
        Ok(store)
    }

    pub fn schema_version(&self) -> Result<u32, StoreError> {
        Ok(self
            .meta
            .get(KEY_SCHEMA)?
            .map(|v| read_u32(&v))
            .unwrap_or(0))
    }

    /// The next VMID: one past every VMID ever handed out (never reused,
    /// even after `prune` forgets a record), and at least 1000.
    pub fn allocate_vmid(&self) -> Result<u32, StoreError> {
        let highest_record = self
            .sandboxes
            .last()?
            .map(|(k, _)| read_u32(&k) + 1)
            .unwrap_or(FIRST_VMID);
        let mut out = FIRST_VMID;
        self.meta.fetch_and_update(KEY_NEXT_VMID, |old| {
            let counter = old.map(read_u32).unwrap_or(FIRST_VMID);
            out = counter.max(highest_record).max(FIRST_VMID);
            Some((out + 1).to_be_bytes().to_vec())
        })?;
        Ok(out)
    }

    /// Inserts a new sandbox with its first event.
    pub fn create(&self, sb: &Sandbox, draft: EventDraft) -> Result<Event, StoreError> {
        self.write(sb, None, draft)
    }

    /// Writes `sb` and appends `draft`, atomically. When `expect_updated` is
    /// given, the stored record must still carry that `updated_at` (optimistic
    /// concurrency: callers hold a per-sandbox lock, this catches mistakes).
    pub fn write(
        &self,
        sb: &Sandbox,
        expect_updated: Option<Timestamp>,
        draft: EventDraft,
    ) -> Result<Event, StoreError> {
        self.write_with(sb, expect_updated, draft, true)
    }

    /// `write`, with the flush to disk optional: for changes that matter
    /// little after a crash (READY↔RUNNING around an exec), sled's own
    /// periodic flush is enough and the caller saves an fsync.
    pub fn write_with(
        &self,
        sb: &Sandbox,
        expect_updated: Option<Timestamp>,
        draft: EventDraft,
        flush: bool,
    ) -> Result<Event, StoreError> {
        let id = self.next_event_id()?;
        let event = draft.finish(id, Timestamp::now());
        let sb_json = serde_json::to_vec(sb).expect("sandbox serializes");
        let ev_json = serde_json::to_vec(&event).expect("event serializes");
        let vmid = sb.vmid;
        let res = (&self.sandboxes, &self.events, &self.by_vmid).transaction(|(s, e, x)| {
            if let Some(expected) = expect_updated {
                let current = s.get(vmid.to_be_bytes())?;
                let matches = current
                    .as_deref()
                    .and_then(|b| serde_json::from_slice::<Sandbox>(b).ok())
                    .is_some_and(|cur| cur.updated_at == expected);
                if !matches {
                    return Err(ConflictableTransactionError::Abort(()));
                }
            }
            s.insert(&vmid.to_be_bytes(), sb_json.as_slice())?;
            e.insert(&id.to_be_bytes(), ev_json.as_slice())?;
            x.insert(index_key(vmid, id).as_slice(), &[] as &[u8])?;
            Ok(())
        });
        match res {
            Ok(()) => {}
            Err(TransactionError::Abort(())) => return Err(StoreError::Conflict(vmid)),
            Err(TransactionError::Storage(e)) => return Err(e.into()),
        }
        if flush {
            self.db.flush()?;
        }
        Ok(event)
    }

    /// Appends an event that changes no sandbox (daemon start, prune…).
    pub fn append_event(&self, draft: EventDraft) -> Result<Event, StoreError> {
        let id = self.next_event_id()?;
        let event = draft.finish(id, Timestamp::now());
        let ev_json = serde_json::to_vec(&event).expect("event serializes");
        let res = (&self.events, &self.by_vmid).transaction(|(e, x)| {
            e.insert(&id.to_be_bytes(), ev_json.as_slice())?;
            if let Some(vmid) = event.vmid {
                x.insert(index_key(vmid, id).as_slice(), &[] as &[u8])?;
            }
            Ok::<(), ConflictableTransactionError<()>>(())
        });
        res.map_err(|e| match e {
            TransactionError::Storage(e) => StoreError::Db(e),
            TransactionError::Abort(()) => StoreError::Conflict(event.vmid.unwrap_or(0)),
        })?;
        Ok(event)
    }

    pub fn get(&self, vmid: u32) -> Result<Option<Sandbox>, StoreError> {
        self.sandboxes
            .get(vmid.to_be_bytes())?
            .map(|v| decode(&v, &format!("sandbox {vmid}")))
            .transpose()
    }

    pub fn find_by_name(&self, name: &str) -> Result<Option<Sandbox>, StoreError> {
        Ok(self.list()?.into_iter().find(|s| s.name == name))
    }

    /// Every sandbox, in VMID order.
    pub fn list(&self) -> Result<Vec<Sandbox>, StoreError> {
        self.sandboxes
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(&v, &format!("sandbox {}", read_u32(&k)))
            })
            .collect()
    }

    /// Forgets a sandbox record; its events stay in the log.
    pub fn remove(&self, vmid: u32) -> Result<(), StoreError> {
        self.sandboxes.remove(vmid.to_be_bytes())?;
        self.db.flush()?;
        Ok(())
    }

    /// A sandbox's events after `after` (exclusive), oldest first, at most `limit`.
    pub fn events_for(
        &self,
        vmid: u32,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let start = index_key(vmid, after.saturating_add(1));
        let end = index_key(vmid, u64::MAX);
        let mut out = Vec::new();
        for kv in self.by_vmid.range(start..=end).take(limit) {
            let (k, _) = kv?;
            let id = read_u64(&k[4..]);
            if let Some(ev) = self.event(id)? {
                out.push(ev);
            }
        }
        Ok(out)
    }

    /// The last `n` events of a sandbox, oldest first.
    pub fn tail_for(&self, vmid: u32, n: usize) -> Result<Vec<Event>, StoreError> {
        let start = index_key(vmid, 0);
        let end = index_key(vmid, u64::MAX);
        let mut ids: Vec<u64> = Vec::with_capacity(n);
        for kv in self.by_vmid.range(start..=end).rev().take(n) {
            let (k, _) = kv?;
            ids.push(read_u64(&k[4..]));
        }
        ids.reverse();
        ids.into_iter()
            .filter_map(|id| self.event(id).transpose())
            .collect()
    }

    /// All events after `after`, oldest first, at most `limit`.
    pub fn events_after(&self, after: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        self.events
            .range(after.saturating_add(1).to_be_bytes()..)
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                decode(&v, &format!("event {}", read_u64(&k)))
            })
            .collect()
    }

    /// The last `n` events of the whole log, oldest first.
    pub fn tail(&self, n: usize) -> Result<Vec<Event>, StoreError> {
        let mut v: Vec<Event> = self
            .events
            .iter()
            .rev()
            .take(n)
            .map(|kv| {
                let (k, v) = kv?;
                decode(&v, &format!("event {}", read_u64(&k)))
            })
            .collect::<Result<_, _>>()?;
        v.reverse();
        Ok(v)
    }

    /// Drops the oldest events (and their index entries) so that at most
    /// `keep` remain; returns how many went. Event ids are dense, so the
    /// count is the id range.
    pub fn trim_events(&self, keep: u64) -> Result<u64, StoreError> {
        self.trim_events_batched(keep, 10_000)
    }

    fn trim_events_batched(&self, keep: u64, batch: usize) -> Result<u64, StoreError> {
        let Some((first, _)) = self.events.first()? else {
            return Ok(0);
        };
        let (first, last) = (read_u64(&first), self.last_event_id()?);
        if last - first < keep {
            return Ok(0);
        }
        let cut = (last + 1 - keep).to_be_bytes();
        let mut gone = 0;
        // In batches, so a first trim of a large log holds little at once.
        loop {
            let (mut events, mut index) = (sled::Batch::default(), sled::Batch::default());
            let mut n = 0;
            for kv in self.events.range(..cut).take(batch) {
                let (k, v) = kv?;
                if let Ok(Event {
                    vmid: Some(vmid), ..
                }) = serde_json::from_slice(&v)
                {
                    index.remove(index_key(vmid, read_u64(&k)).as_slice());
                }
                events.remove(k);
                n += 1;
            }
            if n == 0 {
                return Ok(gone);
            }
            self.by_vmid.apply_batch(index)?;
            self.events.apply_batch(events)?;
            gone += n;
        }
    }

    pub fn last_event_id(&self) -> Result<u64, StoreError> {
        Ok(self.events.last()?.map(|(k, _)| read_u64(&k)).unwrap_or(0))
    }

    fn event(&self, id: u64) -> Result<Option<Event>, StoreError> {
        self.events
            .get(id.to_be_bytes())?
            .map(|v| decode(&v, &format!("event {id}")))
            .transpose()
    }

    fn next_event_id(&self) -> Result<u64, StoreError> {
        let mut out = 1;
        self.meta.fetch_and_update(KEY_NEXT_EVENT, |old| {
            out = old.map(read_u64).unwrap_or(1);
            Some((out + 1).to_be_bytes().to_vec())
        })?;
        Ok(out)
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Records an exposure; false when the name is taken.
    pub fn add_exposure(&self, e: &Exposure) -> Result<bool, StoreError> {
        let value = serde_json::to_vec(e).expect("an exposure serializes");
        let fresh = self
            .exposures
            .compare_and_swap(e.name.as_bytes(), None as Option<&[u8]>, Some(value))?
            .is_ok();
        if fresh {
            self.db.flush()?;
        }
        Ok(fresh)
    }

    /// Forgets an exposure; returns it when it existed.
    pub fn remove_exposure(&self, name: &str) -> Result<Option<Exposure>, StoreError> {
        let old = self.exposures.remove(name.as_bytes())?;
        self.db.flush()?;
        old.map(|v| decode(&v, &format!("exposure {name}")))
            .transpose()
    }

    /// Every exposure, by name.
    pub fn exposures(&self) -> Result<Vec<Exposure>, StoreError> {
        self.exposures
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(&v, &format!("exposure {}", String::from_utf8_lossy(&k)))
            })
            .collect()
    }
}

fn index_key(vmid: u32, id: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&vmid.to_be_bytes());
    k[4..].copy_from_slice(&id.to_be_bytes());
    k
}

fn read_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    let n = b.len().min(4);
    a[4 - n..].copy_from_slice(&b[..n]);
    u32::from_be_bytes(a)
}

fn read_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    let n = b.len().min(8);
    a[8 - n..].copy_from_slice(&b[..n]);
    u64::from_be_bytes(a)
}

fn decode<T: serde::de::DeserializeOwned>(b: &[u8], key: &str) -> Result<T, StoreError> {
    serde_json::from_slice(b).map_err(|source| StoreError::Corrupt {
        key: key.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{mac_for, Resources, State};

    struct TempDb {
        dir: PathBuf,
        store: Store,
    }

    impl TempDb {
        fn new(tag: &str) -> TempDb {
            let dir =
                std::env::temp_dir().join(format!("agentlab-store-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let store = Store::open(&dir).unwrap();
            TempDb { dir, store }
        }
    }

    impl Drop for TempDb {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn sandbox(vmid: u32, state: State) -> Sandbox {
        Sandbox {
            vmid,
            name: format!("sbx-{vmid}"),
            profile: "default".into(),
            state,
            backend: "qemu".into(),
            keepalive: false,
            ttl_seconds: None,
            lease_expires_at: None,
            created_at: Timestamp(1),
            updated_at: Timestamp(1),
            resources: Resources {
                cores: 1,
                memory_mb: 512,
            },
            ready_on: "running".into(),
            disk: None,
            runtime: None,
            mac: mac_for(vmid),
            ip: None,
            last_error: None,
            guest: None,
            spec: serde_json::Value::Null,
        }
    }

    #[test]
    fn vmids_start_at_1000_and_increase() {
        let t = TempDb::new("vmid");
        assert_eq!(t.store.allocate_vmid().unwrap(), 1000);
        assert_eq!(t.store.allocate_vmid().unwrap(), 1001);
    }

    #[test]
    fn vmids_are_not_reused_after_remove() {
        let t = TempDb::new("reuse");
        let v = t.store.allocate_vmid().unwrap();
        t.store
            .create(
                &sandbox(v, State::Requested),
                EventDraft::new(Some(v), "sandbox.create", "x"),
            )
            .unwrap();
        t.store.remove(v).unwrap();
        assert_eq!(t.store.allocate_vmid().unwrap(), v + 1);
    }

    #[test]
    fn write_records_sandbox_and_event_together() {
        let t = TempDb::new("write");
        let sb = sandbox(1000, State::Ready);
        let ev = t
            .store
            .create(
                &sb,
                EventDraft::transition(1000, State::Booting, State::Ready, "ready"),
            )
            .unwrap();
        assert_eq!(t.store.get(1000).unwrap().unwrap(), sb);
        assert_eq!(t.store.tail_for(1000, 10).unwrap(), vec![ev]);
    }

    #[test]
    fn stale_update_is_a_conflict() {
        let t = TempDb::new("conflict");
        let sb = sandbox(1000, State::Ready);
        t.store
            .create(&sb, EventDraft::new(Some(1000), "k", "m"))
            .unwrap();
        let err = t
            .store
            .write(
                &sb,
                Some(Timestamp(999)),
                EventDraft::new(Some(1000), "k", "m"),
            )
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict(1000)));
    }

    #[test]
    fn events_are_per_sandbox_and_ordered() {
        let t = TempDb::new("events");
        for (vmid, msg) in [(1000, "a"), (1001, "b"), (1000, "c")] {
            t.store
                .append_event(EventDraft::new(Some(vmid), "k", msg))
                .unwrap();
        }
        let msgs: Vec<String> = t
            .store
            .events_for(1000, 0, 10)
            .unwrap()
            .into_iter()
            .map(|e| e.msg)
            .collect();
        assert_eq!(msgs, vec!["a", "c"]);
    }

    /// Two events per exec, kept forever: the log (and the daemon's memory)
    /// grew with every command run.
    #[test]
    fn the_event_log_keeps_only_the_newest_events() {
        let t = TempDb::new("trim");
        for i in 0..2500u32 {
            t.store
                .append_event(EventDraft::new(Some(1000 + i % 2), "k", i.to_string()))
                .unwrap();
        }
        assert_eq!(t.store.trim_events_batched(100, 300).unwrap(), 2400);
        assert_eq!(t.store.trim_events(100).unwrap(), 0);
        let all = t.store.events_after(0, 100_000).unwrap();
        assert_eq!(all.len(), 100);
        assert_eq!(all[0].msg, "2400");
        // The per-sandbox index went with them.
        assert_eq!(t.store.events_for(1000, 0, 100_000).unwrap().len(), 50);
        assert_eq!(t.store.by_vmid.len(), 100);
    }

    #[test]
    fn events_after_skips_seen_ids() {
        let t = TempDb::new("after");
        let first = t
            .store
            .append_event(EventDraft::new(None, "k", "1"))
            .unwrap();
        t.store
            .append_event(EventDraft::new(None, "k", "2"))
            .unwrap();
        let later = t.store.events_after(first.id, 10).unwrap();
        assert_eq!(later.len(), 1);
        assert_eq!(later[0].msg, "2");
    }

    #[test]
    fn tail_returns_the_last_n_oldest_first() {
        let t = TempDb::new("tail");
        for i in 0..5 {
            t.store
                .append_event(EventDraft::new(Some(7), "k", i.to_string()))
                .unwrap();
        }
        let msgs: Vec<String> = t
            .store
            .tail_for(7, 2)
            .unwrap()
            .into_iter()
            .map(|e| e.msg)
            .collect();
        assert_eq!(msgs, vec!["3", "4"]);
    }

    #[test]
    fn data_survives_reopen() {
        let dir =
            std::env::temp_dir().join(format!("agentlab-store-reopen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let s = Store::open(&dir).unwrap();
            s.create(
                &sandbox(1000, State::Stopped),
                EventDraft::new(Some(1000), "k", "m"),
            )
            .unwrap();
        }
        let s = reopen(&dir).unwrap();
        assert_eq!(s.get(1000).unwrap().unwrap().state, State::Stopped);
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir =
            std::env::temp_dir().join(format!("agentlab-store-schema-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let s = Store::open(&dir).unwrap();
            s.meta.insert(KEY_SCHEMA, &99u32.to_be_bytes()).unwrap();
            s.flush().unwrap();
        }
        let err = reopen(&dir).err().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            matches!(err, StoreError::SchemaTooNew { found: 99, .. }),
            "{err:?}"
        );
    }

    /// Opens a database a moment ago dropped: sled's flusher thread lets go
    /// of the file lock shortly after the last handle, not with it.
    fn reopen(dir: &Path) -> Result<Store, StoreError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match Store::open(dir) {
                Err(StoreError::Open { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                other => return other,
            }
        }
    }
}
