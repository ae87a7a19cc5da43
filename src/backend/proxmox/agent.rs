//! The guest agent through the node's API (endpoints.md §8): ping after boot,
//! `agent/exec` + `agent/exec-status` (the final status is readable once, so
//! a poll is never repeated blindly), `agent/file-read` / `file-write` within
//! their size limits, and the guest's addresses by MAC.

use std::thread::sleep;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;

use super::pve::vm_path;
use crate::backend::ExecResult;
use crate::proxmox_api::{lenient, ApiError, Client, Form, Method};
use crate::qga::b64;
use crate::qga::fallback::{shell_quote, spawn_failure, wrap_for_qemu_ga};
use crate::qga::session::{ExecSpec, ExitStatus};

/// `input-data` limit (schema: maxLength 65536).
const MAX_INPUT: usize = 64 * 1024;
/// file-write `content` limit (61440 chars); base64 of 45 KiB fills it.
const WRITE_CHUNK: usize = 45 * 1024;

#[derive(Deserialize)]
struct Pid {
    #[serde(deserialize_with = "lenient::int")]
    pid: i64,
}

#[derive(Deserialize)]
struct Status {
    #[serde(deserialize_with = "lenient::bool")]
    exited: bool,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    exitcode: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    signal: Option<i64>,
    #[serde(default, rename = "out-data")]
    out_data: Option<String>,
    #[serde(default, rename = "err-data")]
    err_data: Option<String>,
    #[serde(default, rename = "out-truncated", deserialize_with = "lenient::bool")]
    out_truncated: bool,
    #[serde(default, rename = "err-truncated", deserialize_with = "lenient::bool")]
    err_truncated: bool,
}

#[derive(Deserialize)]
struct FileRead {
    content: String,
    #[serde(default, deserialize_with = "lenient::bool")]
    truncated: bool,
}

pub fn ping(api: &Client, node: &str, vmid: u32) -> Result<(), ApiError> {
    api.call(
        Method::Post,
        &vm_path(node, vmid, "/agent/ping"),
        &Form::new(),
    )
    .map(|_| ())
}

/// The command as PVE takes it. PVE ≥ 8 takes an array (`command` repeated);
/// PVE 7 takes one string that it splits on blanks, so there the command
/// goes to `/bin/sh` as its script on stdin (with any stdin inlined).
fn exec_form(spec: &ExecSpec, stdin: Option<&[u8]>, major: u32) -> Result<Form, String> {
    let argv = wrap_for_qemu_ga(spec);
    if major >= 8 {
        let mut form = Form::new().array("command", &argv);
        if let Some(d) = stdin {
            let text = std::str::from_utf8(d).map_err(|_| {
                "stdin through the Proxmox agent API must be UTF-8 text".to_string()
            })?;
            if text.len() > MAX_INPUT {
                return Err(format!(
                    "stdin through the Proxmox agent API is limited to {MAX_INPUT} bytes"
                ));
            }
            form = form.str("input-data", text);
        }
        return Ok(form);
    }
    let words: Vec<String> = argv.iter().map(|a| shell_quote(a)).collect();
    let script = match stdin {
        Some(d) => format!(
            "printf '%s' '{}' | base64 -d | {}\n",
            b64::encode(d),
            words.join(" ")
        ),
        None => format!("{} </dev/null\n", words.join(" ")),
    };
    if script.len() > MAX_INPUT {
        return Err(format!(
            "a command through the PVE 7 agent API is limited to {MAX_INPUT} bytes"
        ));
    }
    Ok(Form::new()
        .str("command", "/bin/sh")
        .str("input-data", script))
}

/// Runs `spec` to its end (or its timeout, when it is killed).
pub fn exec(
    api: &Client,
    node: &str,
    vmid: u32,
    major: u32,
    spec: &ExecSpec,
    stdin: Option<&[u8]>,
) -> Result<ExecResult, ApiError> {
    if spec.tty.is_some() {
        return Err(unsupported(
            vmid,
            "a terminal (-t) is not available through the Proxmox agent API",
        ));
    }
    let form = exec_form(spec, stdin, major).map_err(|why| unsupported(vmid, &why))?;
    let pid = match api.call(Method::Post, &vm_path(node, vmid, "/agent/exec"), &form) {
        Ok(v) => crate::proxmox_api::decode::<Pid>("POST agent/exec", v)?.pid,
        Err(e) if e.message().contains("Failed to execute child process") => {
            let program = spec.argv.first().cloned().unwrap_or_default();
            return Ok(ExecResult {
                status: spawn_failure(&program, e.message()),
                ..Default::default()
            });
        }
        Err(e) => return Err(e),
    };
    let deadline = spec.timeout.map(|t| Instant::now() + t);
    let mut delay = Duration::from_millis(50);
    let mut timed_out = false;
    loop {
        if let Some(st) = exec_status(api, node, vmid, pid)? {
            return Ok(result(st, timed_out));
        }
        if !timed_out && deadline.is_some_and(|d| Instant::now() >= d) {
            timed_out = true;
            let kill = Form::new().array("command", &["kill".into(), "-9".into(), pid.to_string()]);
            let _ = api.call(Method::Post, &vm_path(node, vmid, "/agent/exec"), &kill);
        }
        sleep(delay);
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

/// One exec-status poll: `None` while running. Sent once, never retried: the
/// agent forgets a process once it has reported its exit.
fn exec_status(api: &Client, node: &str, vmid: u32, pid: i64) -> Result<Option<Status>, ApiError> {
    let path = vm_path(node, vmid, "/agent/exec-status");
    let v = api
        .call_no_retry(Method::Get, &path, &Form::new().int("pid", pid))
        .map_err(|e| match e {
            ApiError::Connect { .. }
            | ApiError::Status {
                code: 595..=599, ..
            } => ApiError::Decode {
                endpoint: format!("GET {path}"),
                why: format!(
                    "the command's status was lost in transit ({e}); the guest agent reports \
                     an exit only once, so its output cannot be read again"
                ),
            },
            other => other,
        })?;
    let st: Status = crate::proxmox_api::decode(&format!("GET {path}"), v)?;
    Ok(st.exited.then_some(st))
}

fn result(st: Status, timed_out: bool) -> ExecResult {
    ExecResult {
        stdout: st.out_data.unwrap_or_default().into_bytes(),
        stderr: st.err_data.unwrap_or_default().into_bytes(),
        status: ExitStatus {
            code: st.exitcode.map(|c| c as i32),
            signal: st.signal.map(|s| s as i32),
            timed_out,
            error: None,
            truncated: st.out_truncated || st.err_truncated,
        },
    }
}

fn unsupported(vmid: u32, why: &str) -> ApiError {
    ApiError::Decode {
        endpoint: format!("sandbox VM {vmid}"),
        why: why.to_string(),
    }
}

/// A whole file. PVE hands the bytes out as a JSON string of one char per
/// byte (Perl's byte string, JSON-encoded), which maps back exactly.
pub fn file_read(api: &Client, node: &str, vmid: u32, file: &str) -> Result<Vec<u8>, ApiError> {
    let path = vm_path(node, vmid, "/agent/file-read");
    let r: FileRead = api.get(&path, &Form::new().str("file", file))?;
    if r.truncated {
        return Err(unsupported(
            vmid,
            &format!("{file} is larger than PVE's 16 MiB file-read limit"),
        ));
    }
    r.content
        .chars()
        .map(|c| u8::try_from(u32::from(c)).ok())
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(|| ApiError::Decode {
            endpoint: format!("GET {path}"),
            why: "file content had characters beyond one byte".into(),
        })
}

/// Writes a whole file: base64 (`encode=0`) in chunks under the 61440-char
/// `content` limit, joined in the guest when there is more than one.
pub fn file_write(
    api: &Client,
    node: &str,
    vmid: u32,
    file: &str,
    data: &[u8],
    major: u32,
) -> Result<(), ApiError> {
    let path = vm_path(node, vmid, "/agent/file-write");
    let write = |target: &str, chunk: &[u8]| {
        let form = Form::new()
            .str("file", target)
            .str("content", b64::encode(chunk))
            .bool("encode", false);
        api.call(Method::Post, &path, &form).map(|_| ())
    };
    if data.len() <= WRITE_CHUNK {
        return write(file, data);
    }
    let parts: Vec<String> = (0..data.len().div_ceil(WRITE_CHUNK))
        .map(|i| format!("{file}.part{i}"))
        .collect();
    for (chunk, part) in data.chunks(WRITE_CHUNK).zip(&parts) {
        write(part, chunk)?;
    }
    let quoted: Vec<String> = parts.iter().map(|p| shell_quote(p)).collect();
    let script = format!(
        "cat {q} > {f} && rm -f {q}",
        q = quoted.join(" "),
        f = shell_quote(file)
    );
    let spec = ExecSpec {
        argv: vec!["/bin/sh".into(), "-c".into(), script],
        ..Default::default()
    };
    let r = exec(api, node, vmid, major, &spec, None)?;
    if r.status.code != Some(0) {
        return Err(unsupported(
            vmid,
            &format!(
                "joining {file} failed: {}",
                String::from_utf8_lossy(&r.stderr).trim()
            ),
        ));
    }
    Ok(())
}

/// The guest's addresses on the NIC with `mac` (`10.0.0.5/24 (eth0)`).
pub fn addresses(api: &Client, node: &str, vmid: u32, mac: &str) -> Result<Vec<String>, ApiError> {
    let v = api.call(
        Method::Get,
        &vm_path(node, vmid, "/agent/network-get-interfaces"),
        &Form::new(),
    )?;
    let list = v
        .get("result")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut out = Vec::new();
    for iface in list {
        let hw = iface
            .get("hardware-address")
            .and_then(Value::as_str)
            .unwrap_or("");
        if !hw.eq_ignore_ascii_case(mac) {
            continue;
        }
        let name = iface.get("name").and_then(Value::as_str).unwrap_or("?");
        for a in iface
            .get("ip-addresses")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let ip = a.get("ip-address").and_then(Value::as_str).unwrap_or("");
            let prefix = a.get("prefix").and_then(lenient::to_int).unwrap_or(0);
            if !ip.is_empty() && !ip.starts_with("fe80") {
                out.push(format!("{ip}/{prefix} ({name})"));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pve8_exec_sends_the_argv_as_an_array() {
        let spec = ExecSpec {
            argv: vec!["echo".into(), "a b".into()],
            ..Default::default()
        };

        let f = exec_form(&spec, None, 8).unwrap();

        assert_eq!(f.encode(), "command=echo&command=a%20b");
    }

    #[test]
    fn pve7_exec_sends_sh_with_the_command_as_its_script() {
        let spec = ExecSpec {
            argv: vec!["echo".into(), "a b".into()],
            ..Default::default()
        };

        let f = exec_form(&spec, None, 7).unwrap();

        assert_eq!(
            f.0,
            vec![
                ("command".to_string(), "/bin/sh".to_string()),
                ("input-data".into(), "'echo' 'a b' </dev/null\n".into())
            ]
        );
    }
}
