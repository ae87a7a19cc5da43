//! `agentlab cp SRC DST`: files and directory trees between the host and a
//! sandbox, as `docker cp` does it (one side is `<id>:<absolute path>`).
//!
//! Trees travel as a tar stream through the daemon: packed here and extracted
//! in the guest, or packed in the guest and extracted here. What the guest
//! sends is untrusted: extraction refuses absolute paths, `..`, writing
//! through symlinks, devices and set-id bits.

use std::io::{IsTerminal, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Instant;

use argh::FromArgs;
use serde_json::{json, Value};

use super::connect::client;
use super::{output, CliError, Global};
use crate::api::client::Upgraded;
use crate::api::http::percent_encode_component;
use crate::qga::frames::FrameReader;
use crate::qga::wire::{self, kind, Frame, Message};
use crate::tar::{self, ExtractOptions, Extractor, TarWriter};

#[derive(FromArgs)]
/// Copy files or directory trees between the host and a sandbox (docker cp rules).
#[argh(
    subcommand,
    name = "cp",
    example = "agentlab cp ./src 1000:/work/src",
    example = "agentlab cp 1000:/var/log/build.log .",
    note = "One side is <vmid or name>:<absolute guest path>. A directory DEST receives SRC inside it; \
a DEST that does not exist becomes the copy. Modes and modification times are kept; symlinks are \
copied as symlinks.",
    error_code(1, "bad arguments, unknown sandbox, or a path that does not exist"),
    error_code(2, "the daemon, the guest agent or the host failed")
)]
pub struct CpCmd {
    /// print what was copied as JSON
    #[argh(switch)]
    json: bool,
    /// source: a local path or <id>:<guest path>
    #[argh(positional)]
    src: String,
    /// destination: a local path or <id>:<guest path>
    #[argh(positional)]
    dst: String,
}

/// `1000:/work` → Some(("1000", "/work")); local paths → None.
fn remote(spec: &str) -> Option<(&str, &str)> {
    let (id, path) = spec.split_once(':')?;
    let plausible_id = !id.is_empty() && !id.contains('/') && !id.starts_with('.');
    plausible_id.then_some((id, path))
}

pub fn run(g: &Global, c: CpCmd) -> Result<(), CliError> {
    let report =
        match (remote(&c.src), remote(&c.dst)) {
            (Some(_), Some(_)) => return Err(CliError::User(
                "copy between two sandboxes through the host: cp A:/x ./tmp, then cp ./tmp B:/y"
                    .into(),
            )),
            (None, None) => {
                return Err(CliError::User(
                    "one side must be <sandbox>:<path>, e.g. 1000:/work".into(),
                ))
            }
            (None, Some((id, path))) => upload(g, Path::new(&c.src), id, guest_path(path)?)?,
            (Some((id, path)), None) => download(g, id, guest_path(path)?, Path::new(&c.dst))?,
        };
    if c.json {
        output::print_json(&report)
    } else {
        Ok(())
    }
}

fn guest_path(p: &str) -> Result<&str, CliError> {
    if p.starts_with('/') {
        Ok(p)
    } else {
        Err(CliError::User(format!(
            "guest path {p:?} must be absolute, e.g. /work/{p}"
        )))
    }
}

/// The name `src` goes by in the archive: its last component.
fn root_name(src: &Path) -> Result<String, CliError> {
    let abs = if src.file_name().is_none() {
        src.canonicalize()?
    } else {
        src.to_path_buf()
    };
    abs.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| CliError::User(format!("cannot name {} in the copy", src.display())))
}

pub(super) fn upload(g: &Global, src: &Path, id: &str, dest: &str) -> Result<Value, CliError> {
    std::fs::symlink_metadata(src)
        .map_err(|e| CliError::User(format!("{}: {e}", src.display())))?;
    let root = root_name(src)?;
    let path = format!(
        "/v1/sandboxes/{}/files?path={}&root={}",
        percent_encode_component(id),
        percent_encode_component(dest),
        percent_encode_component(&root)
    );
    let up = client(g)?.upgrade("PUT", &path, None)?;
    let reader = up.stream.try_clone()?;
    let mut progress = Progress::new("copied");
    let sink = FrameSink { stream: up.stream };
    let mut w = TarWriter::new(sink);
    let packed = tar::pack_path(src, &root, &mut w, &mut |n| progress.show(n));
    // If packing failed, the daemon's error (if any) says more; read it first.
    let mut sink = match packed.and_then(|_| w.finish()) {
        Ok(s) => s,
        Err(e) => {
            progress.done();
            return Err(CliError::User(format!("reading {}: {e}", src.display())));
        }
    };
    let end = Message::Request {
        execute: wire::CMD_TAR_IN_END.into(),
        arguments: json!({ "stream": 0 }),
        id: None,
    };
    sink.stream.write_all(&end.encode())?;
    let done = wait_eof(Upgraded {
        stream: reader,
        pending: up.pending,
    });
    progress.done();
    let done = done?;
    Ok(
        json!({ "from": src.display().to_string(), "to": format!("{id}:{dest}"), "entries": done["entries"], "bytes": done["bytes"] }),
    )
}

/// The name a guest path's copy gets: `/var/log/x.log` → `x.log`.
fn guest_basename(src: &str) -> Result<String, CliError> {
    match src.trim_end_matches('/').rsplit('/').next() {
        Some(name) if !matches!(name, "" | "." | "..") => Ok(name.to_string()),
        _ => Err(CliError::User(format!(
            "{src}: copy a file or directory by its own name, not / or a path ending in . or .."
        ))),
    }
}

/// Where a download lands: the directory to extract in, and the one name
/// every entry of the archive is put under.
fn download_target(src: &str, dest: &Path) -> Result<(PathBuf, String), CliError> {
    let base = guest_basename(src)?;
    // docker cp: into DEST if it is a directory; else DEST is the copy's new
    // name. Either way every entry is put under that one name: the guest
    // chooses what the archive holds, and must not choose, say, a `.ssh/`
    // beside the copy in the user's home.
    if dest.is_dir() {
        return Ok((dest.to_path_buf(), base));
    }
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(CliError::User(format!(
            "{}: no such directory",
            parent.display()
        )));
    }
    let name = dest
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| CliError::User(format!("{}: not a usable file name", dest.display())))?;
    Ok((parent, name))
}

pub(super) fn download(g: &Global, id: &str, src: &str, dest: &Path) -> Result<Value, CliError> {
    let (dir, root) = download_target(src, dest)?;
    let path = format!(
        "/v1/sandboxes/{}/files?path={}",
        percent_encode_component(id),
        percent_encode_component(src)
    );
    let up = client(g)?.upgrade("GET", &path, None)?;
    let opts = ExtractOptions {
        rename_root: Some(root),
        untrusted: true,
        ..ExtractOptions::default()
    };
    let mut ex = Extractor::new(&dir, opts).map_err(|e| CliError::Host(e.to_string()))?;
    let mut progress = Progress::new("received");
    let mut frames = FrameReader::new(up.stream, &up.pending, 1 << 20);
    let mut total = 0u64;
    let result = loop {
        match frames.next_frame()? {
            Some(Frame::Data {
                kind: kind::TAR,
                payload,
                ..
            }) => {
                total += payload.len() as u64;
                progress.show(total);
                if let Err(e) = ex.feed(&payload) {
                    break Err(CliError::Host(format!(
                        "unpacking what the guest sent: {e}"
                    )));
                }
            }
            Some(Frame::Json(j)) => match event(&j) {
                Some(Ok(_)) => {
                    break ex
                        .finish()
                        .map_err(|e| CliError::Host(format!("unpacking: {e}")))
                }
                Some(Err(e)) => break Err(e),
                None => {}
            },
            Some(_) => {}
            None => {
                break Err(CliError::Host(
                    "agentlabd closed the copy before it ended".into(),
                ))
            }
        }
    };
    progress.done();
    let stats = result?;
    Ok(
        json!({ "from": format!("{id}:{src}"), "to": dest.display().to_string(), "entries": stats.entries, "bytes": stats.bytes }),
    )
}

/// `agentlab-eof` → Ok(data); `agentlab-error` → Err; anything else → None.
fn event(j: &[u8]) -> Option<Result<Value, CliError>> {
    match Message::parse(j) {
        Ok(Message::Event { name, data }) if name == wire::EVENT_EOF => {
            Some(match data["error"].as_str() {
                Some(e) => Err(CliError::User(e.to_string())),
                None => Ok(data),
            })
        }
        Ok(Message::Event { name, data }) if name == "agentlab-error" => {
            let msg = data["error"].as_str().unwrap_or("copy failed").to_string();
            let user = (400..500).contains(&data["status"].as_u64().unwrap_or(500));
            Some(Err(if user {
                CliError::User(msg)
            } else {
                CliError::Host(msg)
            }))
        }
        _ => None,
    }
}

fn wait_eof(up: Upgraded) -> Result<Value, CliError> {
    let mut frames = FrameReader::new(up.stream, &up.pending, 1 << 20);
    loop {
        match frames.next_frame()? {
            Some(Frame::Json(j)) => {
                if let Some(r) = event(&j) {
                    return r;
                }
            }
            Some(_) => {}
            None => {
                return Err(CliError::Host(
                    "agentlabd closed the copy before it ended".into(),
                ))
            }
        }
    }
}

/// Tar bytes out as data frames.
struct FrameSink {
    stream: UnixStream,
}

impl Write for FrameSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(wire::MAX_DATA);
        self.stream
            .write_all(&wire::encode_data(0, kind::TAR, &buf[..n]))?;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A progress line on stderr, only when stderr is a terminal.
struct Progress {
    verb: &'static str,
    start: Instant,
    last: Instant,
    shown: bool,
    on: bool,
}

impl Progress {
    fn new(verb: &'static str) -> Progress {
        let now = Instant::now();
        Progress {
            verb,
            start: now,
            last: now,
            shown: false,
            on: std::io::stderr().is_terminal(),
        }
    }

    fn show(&mut self, bytes: u64) {
        if !self.on || self.last.elapsed().as_millis() < 200 {
            return;
        }
        self.last = Instant::now();
        let secs = self.start.elapsed().as_secs_f64().max(0.001);
        eprint!(
            "\r{} {} ({}/s)   ",
            self.verb,
            output::bytes(bytes),
            output::bytes((bytes as f64 / secs) as u64)
        );
        self.shown = true;
    }

    fn done(&mut self) {
        if self.shown {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_specs_are_id_colon_path() {
        assert_eq!(remote("1000:/work"), Some(("1000", "/work")));
        assert_eq!(remote("web-1:/x"), Some(("web-1", "/x")));
    }

    #[test]
    fn local_paths_with_colons_stay_local() {
        assert_eq!(remote("./a:b"), None);
        assert_eq!(remote("/tmp/a:b"), None);
        assert_eq!(remote("plain"), None);
    }

    /// `cp sb:/tmp/result.json ~` let the guest's archive name the entries:
    /// it could send `.ssh/authorized_keys` and write into the real ~/.ssh.
    #[test]
    fn a_download_into_a_directory_is_held_under_the_source_name() {
        let dir = std::env::temp_dir();
        assert_eq!(
            download_target("/tmp/result.json", &dir).unwrap(),
            (dir.clone(), "result.json".to_string())
        );
        assert_eq!(
            download_target("/work/out/", &dir.join("renamed")).unwrap(),
            (dir.clone(), "renamed".to_string())
        );
        assert!(download_target("/", &dir).is_err());
        assert!(download_target("/a/..", &dir).is_err());
    }

    #[test]
    fn guest_paths_must_be_absolute() {
        assert!(guest_path("work").is_err());
        assert!(guest_path("/work").is_ok());
    }
}
