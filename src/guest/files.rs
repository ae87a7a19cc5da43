//! Files through the guest agent: qemu-ga's `guest-file-*` commands (integer
//! handles on open files, `qga/commands-posix.c`), and agentlab's tar
//! streams, `agentlab-tar-out` (pack a path, send it under credit) and
//! `agentlab-tar-in` (extract what the host sends, with `docker cp`'s
//! naming).
//!
//! Not here: the tar format (`crate::tar`), frames and credit (`stream`).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::guest::stream::{
    lock, Control, Credit, CreditWriter, Input, Outbox, Stream, Streams, Then,
};
use crate::qga::b64;
use crate::qga::wire::{
    self, kind, GuestFileRead, Started, TarArgs, TarDone, DEFAULT_WINDOW, GUEST_FILE_READ_MAX,
};
use crate::tar;

/// qemu-ga's first handle (`QGA_PSTATE_DEFAULT_FD_COUNTER`).
const FIRST_HANDLE: i64 = 1000;
/// `guest-file-read` without `count` (qemu-ga's `QGA_READ_COUNT_DEFAULT`).
const READ_DEFAULT: i64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot open {path} with mode {mode}")]
    Open {
        path: String,
        mode: String,
        #[source]
        source: io::Error,
    },
    #[error("mode {0:?} is not one of r, w, a, r+, w+, a+ (each with an optional b)")]
    Mode(String),
    #[error(transparent)]
    StreamInUse(#[from] crate::guest::stream::StreamInUse),
    /// qemu-ga's words.
    #[error("handle '{0}' has not been found")]
    UnknownHandle(i64),
    /// qemu-ga's words.
    #[error("value '{0}' is invalid for argument count")]
    Count(i64),
    #[error("buf-b64 is not base64: {0}")]
    Base64(String),
    #[error("whence {0} is not set, cur, end or 0, 1, 2")]
    Whence(Value),
    #[error("cannot {action} handle {handle}")]
    Io {
        action: &'static str,
        handle: i64,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not an absolute path")]
    Relative { path: String },
    #[error("cannot read {path}")]
    Source {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot extract into {path}: its parent directory does not exist")]
    NoParent { path: String },
    #[error("cannot extract into {path}")]
    Extract {
        path: String,
        #[source]
        source: tar::TarError,
    },
    #[error("stream {0} is not a running tar-in stream")]
    NotTarIn(u32),
}

#[derive(Debug, Deserialize)]
pub struct OpenArgs {
    pub path: String,
    #[serde(default)]
    pub mode: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct HandleArgs {
    pub handle: i64,
}

#[derive(Debug, Deserialize)]
pub struct ReadArgs {
    pub handle: i64,
    #[serde(default)]
    pub count: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub struct WriteArgs {
    pub handle: i64,
    #[serde(rename = "buf-b64")]
    pub buf_b64: String,
    #[serde(default)]
    pub count: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub struct SeekArgs {
    pub handle: i64,
    pub offset: i64,
    pub whence: Value,
}

/// fopen(3) modes, as qemu-ga takes them.
fn open_options(mode: &str) -> Option<OpenOptions> {
    let base: String = mode.chars().filter(|&c| c != 'b').collect();
    if mode.len() - base.len() > 1 {
        return None;
    }
    let mut o = OpenOptions::new();
    match base.as_str() {
        "r" => o.read(true),
        "r+" => o.read(true).write(true),
        "w" => o.write(true).create(true).truncate(true),
        "w+" => o.read(true).write(true).create(true).truncate(true),
        "a" => o.append(true).create(true),
        "a+" => o.read(true).append(true).create(true),
        _ => return None,
    };
    Some(o)
}

/// Files opened by `guest-file-open`, by handle.
pub struct Files {
    next: AtomicI64,
    open: Mutex<HashMap<i64, Arc<Mutex<File>>>>,
}

impl Default for Files {
    fn default() -> Files {
        Files {
            next: AtomicI64::new(FIRST_HANDLE),
            open: Mutex::default(),
        }
    }
}

impl Files {
    fn get(&self, handle: i64) -> Result<Arc<Mutex<File>>, FileError> {
        lock(&self.open)
            .get(&handle)
            .cloned()
            .ok_or(FileError::UnknownHandle(handle))
    }

    pub fn open(&self, args: OpenArgs) -> Result<Value, FileError> {
        let mode = args.mode.unwrap_or_else(|| "r".into());
        let options = open_options(&mode).ok_or_else(|| FileError::Mode(mode.clone()))?;
        let file = options.open(&args.path).map_err(|source| FileError::Open {
            path: args.path,
            mode,
            source,
        })?;
        let handle = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.open).insert(handle, Arc::new(Mutex::new(file)));
        Ok(json!(handle))
    }

    pub fn read(&self, args: ReadArgs) -> Result<GuestFileRead, FileError> {
        let count = args.count.unwrap_or(READ_DEFAULT);
        let Ok(wanted) = u64::try_from(count) else {
            return Err(FileError::Count(count));
        };
        if wanted > GUEST_FILE_READ_MAX {
            return Err(FileError::Count(count));
        }
        let file = self.get(args.handle)?;
        let mut buf = Vec::new();
        let mut file = lock(&file);
        let got = Read::by_ref(&mut *file)
            .take(wanted)
            .read_to_end(&mut buf)
            .map_err(|source| FileError::Io {
                action: "read",
                handle: args.handle,
                source,
            })?;
        Ok(GuestFileRead {
            count: got as u64,
            buf_b64: b64::encode(&buf),
            // As fread(3)'s feof: the read stopped short of `count`.
            eof: (got as u64) < wanted,
        })
    }

    pub fn write(&self, args: WriteArgs) -> Result<Value, FileError> {
        let data = b64::decode(&args.buf_b64).map_err(FileError::Base64)?;
        let count = args.count.unwrap_or(data.len() as i64);
        let n = usize::try_from(count)
            .ok()
            .filter(|&n| n <= data.len())
            .ok_or(FileError::Count(count))?;
        let file = self.get(args.handle)?;
        lock(&file)
            .write_all(&data[..n])
            .map_err(|source| FileError::Io {
                action: "write",
                handle: args.handle,
                source,
            })?;
        Ok(json!({ "count": n, "eof": false }))
    }

    pub fn seek(&self, args: SeekArgs) -> Result<Value, FileError> {
        let pos = match &args.whence {
            Value::String(s) if s == "set" => None,
            Value::Number(n) if n.as_i64() == Some(0) => None,
            Value::String(s) if s == "cur" => Some(SeekFrom::Current(args.offset)),
            Value::Number(n) if n.as_i64() == Some(1) => Some(SeekFrom::Current(args.offset)),
            Value::String(s) if s == "end" => Some(SeekFrom::End(args.offset)),
            Value::Number(n) if n.as_i64() == Some(2) => Some(SeekFrom::End(args.offset)),
            other => return Err(FileError::Whence(other.clone())),
        };
        let pos = match pos {
            Some(pos) => pos,
            None => SeekFrom::Start(
                u64::try_from(args.offset).map_err(|_| FileError::Count(args.offset))?,
            ),
        };
        let file = self.get(args.handle)?;
        let position = lock(&file).seek(pos).map_err(|source| FileError::Io {
            action: "seek",
            handle: args.handle,
            source,
        })?;
        Ok(json!({ "position": position, "eof": false }))
    }

    /// As qemu-ga's fflush(3): written data is handed to the kernel (which
    /// unbuffered writes already did); not an fsync.
    pub fn flush(&self, args: HandleArgs) -> Result<Value, FileError> {
        let file = self.get(args.handle)?;
        let flushed = lock(&file).flush();
        flushed.map_err(|source| FileError::Io {
            action: "flush",
            handle: args.handle,
            source,
        })?;
        Ok(json!({}))
    }

    pub fn close(&self, args: HandleArgs) -> Result<Value, FileError> {
        lock(&self.open)
            .remove(&args.handle)
            .ok_or(FileError::UnknownHandle(args.handle))?;
        Ok(json!({}))
    }
}

// ---- agentlab tar streams -------------------------------------------------

/// The name `path` goes by inside the archive: its last component.
fn archive_root(path: &Path) -> String {
    path.file_name()
        .map_or_else(|| ".".to_string(), |n| n.to_string_lossy().into_owned())
}

/// `agentlab-tar-out`: the answer, and the packing thread to start once it
/// is queued.
pub fn start_tar_out(
    args: TarArgs,
    streams: &Arc<Streams>,
    outbox: &Outbox,
) -> Result<(Value, Then), FileError> {
    let path = PathBuf::from(&args.path);
    if !path.is_absolute() {
        return Err(FileError::Relative { path: args.path });
    }
    path.symlink_metadata()
        .map_err(|source| FileError::Source {
            path: args.path.clone(),
            source,
        })?;
    let id = streams.claim(args.stream)?;
    let credit = Arc::new(Credit::new(args.window));
    streams.insert(
        id,
        Stream {
            output: Some(Arc::clone(&credit)),
            input: None,
            control: Control::TarOut,
        },
    );
    let started = Started {
        stream: id,
        pid: None,
        window: 0,
    };
    let (streams, outbox) = (Arc::clone(streams), outbox.clone());
    let then = move || {
        std::thread::spawn(move || {
            let done = pack(id, &path, credit, &outbox);
            streams.remove(id);
            outbox.event(wire::EVENT_EOF, &done);
        });
    };
    Ok((json!(started), Box::new(then)))
}

fn pack(stream: u32, path: &Path, credit: Arc<Credit>, outbox: &Outbox) -> TarDone {
    let mut sink = CreditWriter::new(stream, kind::TAR, credit, outbox.clone());
    let packed = {
        let mut writer = tar::TarWriter::new(&mut sink);
        tar::pack_path(path, &archive_root(path), &mut writer, &mut |_| {})
            .and_then(|r| writer.finish().map(|_| r))
    };
    let flushed = sink.flush();
    match (packed, flushed) {
        (Ok((stats, skipped)), Ok(())) => {
            for why in &skipped {
                note!("stream {stream}: tar-out {}: {why}", path.display());
            }
            TarDone {
                stream,
                entries: stats.entries,
                bytes: stats.bytes,
                error: None,
            }
        }
        (Err(e), _) => tar_failed(stream, crate::log::error_chain(&e)),
        (_, Err(e)) => tar_failed(stream, e.to_string()),
    }
}

fn tar_failed(stream: u32, error: String) -> TarDone {
    note!("stream {stream}: {error}");
    TarDone {
        stream,
        error: Some(error),
        ..TarDone::default()
    }
}

/// Where `agentlab-tar-in` extracts, `docker cp` style: into `path` keeping
/// the archive's root name when `path` is a directory; else into its parent
/// with the root renamed to `path`'s last component.
pub fn tar_in_target(path: &str) -> Result<(PathBuf, Option<String>), FileError> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(FileError::Relative { path: path.into() });
    }
    if p.is_dir() {
        return Ok((p.to_path_buf(), None));
    }
    match (p.parent(), p.file_name()) {
        (Some(parent), Some(name)) if parent.is_dir() => Ok((
            parent.to_path_buf(),
            Some(name.to_string_lossy().into_owned()),
        )),
        _ => Err(FileError::NoParent { path: path.into() }),
    }
}

/// A tar-in stream's extractor and its first error. After an error the
/// rest of the stream is read and dropped (credit still flows back), and
/// `agentlab-tar-in-end` reports it.
pub struct TarIn {
    extractor: Option<tar::Extractor>,
    error: Option<String>,
}

/// `agentlab-tar-in`: `Started` with the input window.
pub fn start_tar_in(
    args: TarArgs,
    streams: &Arc<Streams>,
    outbox: &Outbox,
) -> Result<Value, FileError> {
    let (dest, rename_root) = tar_in_target(&args.path)?;
    let options = tar::ExtractOptions {
        rename_root,
        untrusted: false,
        max_entries: u64::MAX,
    };
    let extractor = tar::Extractor::new(&dest, options).map_err(|source| FileError::Extract {
        path: args.path.clone(),
        source,
    })?;
    let state = Arc::new(Mutex::new(TarIn {
        extractor: Some(extractor),
        error: None,
    }));
    let id = streams.claim(args.stream)?;
    let fed = Arc::clone(&state);
    let input = Input::start(id, DEFAULT_WINDOW, outbox.clone(), move |chunk| {
        let mut tar_in = lock(&fed);
        let TarIn { extractor, error } = &mut *tar_in;
        if let (Some(extractor), None) = (extractor.as_mut(), error.as_ref()) {
            if let Err(e) = extractor.feed(chunk) {
                *error = Some(crate::log::error_chain(&e));
            }
        }
    });
    streams.insert(
        id,
        Stream {
            output: None,
            input: Some(input),
            control: Control::TarIn(state),
        },
    );
    Ok(json!(Started {
        stream: id,
        pid: None,
        window: DEFAULT_WINDOW,
    }))
}

/// `agentlab-tar-in-end`: waits until all that was sent is extracted,
/// finishes, and answers `TarDone`.
pub fn end_tar_in(stream: u32, streams: &Streams) -> Result<TarDone, FileError> {
    let found = streams.get(stream);
    let (Some(s), Some(state)) = (
        found.as_ref(),
        found.as_ref().and_then(|s| match &s.control {
            Control::TarIn(state) => Some(Arc::clone(state)),
            _ => None,
        }),
    ) else {
        return Err(FileError::NotTarIn(stream));
    };
    if let Some(input) = &s.input {
        input.close_and_join();
    }
    streams.remove(stream);
    let mut tar_in = lock(&state);
    let finished = match (tar_in.extractor.take(), tar_in.error.take()) {
        (_, Some(error)) => Err(error),
        (Some(extractor), None) => extractor.finish().map_err(|e| crate::log::error_chain(&e)),
        (None, None) => Err("the extractor is gone".to_string()),
    };
    Ok(match finished {
        Ok(stats) => TarDone {
            stream,
            entries: stats.entries,
            bytes: stats.bytes,
            error: None,
        },
        Err(error) => tar_failed(stream, error),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::tar::testdir::TempDir;

    #[test]
    fn fopen_modes_map_to_open_options() {
        assert!(
            ["r", "rb", "r+", "rb+", "r+b", "w", "wb", "w+", "a", "ab", "a+"]
                .iter()
                .all(|m| open_options(m).is_some())
        );
        assert!(["", "x", "rw", "rbb", "b"]
            .iter()
            .all(|m| open_options(m).is_none()));
    }

    #[test]
    fn write_seek_read_round_trip() {
        let tmp = TempDir::new("files-rw");
        let dir = tmp.path().to_path_buf();
        let files = Files::default();
        let path = dir.join("f").to_string_lossy().into_owned();
        let handle = files
            .open(OpenArgs {
                path,
                mode: Some("w+".into()),
            })
            .unwrap()
            .as_i64()
            .unwrap();
        files
            .write(WriteArgs {
                handle,
                buf_b64: b64::encode(b"hello world"),
                count: Some(5),
            })
            .unwrap();
        let pos = files
            .seek(SeekArgs {
                handle,
                offset: 1,
                whence: json!("set"),
            })
            .unwrap();
        let read = files
            .read(ReadArgs {
                handle,
                count: None,
            })
            .unwrap();
        assert_eq!(
            (pos["position"].as_u64(), read.buf_b64, read.count, read.eof),
            (Some(1), b64::encode(b"ello"), 4, true)
        );
    }

    #[test]
    fn closed_handle_is_unknown() {
        let files = Files::default();
        let handle = files
            .open(OpenArgs {
                path: "/etc/passwd".into(),
                mode: None,
            })
            .unwrap()
            .as_i64()
            .unwrap();
        files.close(HandleArgs { handle }).unwrap();
        let err = files
            .read(ReadArgs {
                handle,
                count: None,
            })
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("handle '{handle}' has not been found")
        );
    }

    #[test]
    fn read_count_beyond_the_cap_is_refused() {
        let files = Files::default();
        let err = files
            .read(ReadArgs {
                handle: 1000,
                count: Some(GUEST_FILE_READ_MAX as i64 + 1),
            })
            .unwrap_err();
        assert!(matches!(err, FileError::Count(_)));
    }

    #[test]
    fn tar_in_into_an_existing_directory_keeps_the_root_name() {
        let tmp = TempDir::new("files-into");
        let dir = tmp.path().to_path_buf();
        let (dest, rename) = tar_in_target(dir.to_str().unwrap()).unwrap();
        assert_eq!((dest, rename), (dir, None));
    }

    #[test]
    fn tar_in_to_a_new_name_renames_the_root() {
        let tmp = TempDir::new("files-rename");
        let dir = tmp.path().to_path_buf();
        let target = dir.join("newname");
        let (dest, rename) = tar_in_target(target.to_str().unwrap()).unwrap();
        assert_eq!((dest, rename.as_deref()), (dir, Some("newname")));
    }

    #[test]
    fn tar_in_under_a_missing_parent_is_refused() {
        assert!(matches!(
            tar_in_target("/no/such/parent/x"),
            Err(FileError::NoParent { .. })
        ));
    }

    #[test]
    fn archive_root_is_the_last_component() {
        assert_eq!(
            (
                archive_root(Path::new("/work/src")),
                archive_root(Path::new("/"))
            ),
            ("src".to_string(), ".".to_string())
        );
    }
}
