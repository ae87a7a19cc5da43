//! The API socket under good and bad clients. No guest boots here.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{stdout, Env};

/// Sends raw bytes and returns the whole answer (the server closes after errors).
fn raw(env: &Env, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(&env.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn status_line(answer: &str) -> &str {
    answer.lines().next().unwrap_or("")
}

#[test]
fn curl_lists_sandboxes_over_the_socket() {
    let mut env = Env::new("curl", "");
    env.start_daemon();
    let out = Command::new("curl")
        .args(["-s", "--fail", "--unix-socket"])
        .arg(&env.socket)
        .arg("http://agentlab/v1/sandboxes")
        .output()
        .unwrap();
    assert!(out.status.success(), "curl failed: {:?}", out);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["sandboxes"], serde_json::json!([]));
}

#[test]
fn socket_is_mode_0660() {
    use std::os::unix::fs::PermissionsExt;
    let mut env = Env::new("mode", "");
    env.start_daemon();
    let mode = std::fs::metadata(&env.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
}

#[test]
fn malformed_request_is_400() {
    let mut env = Env::new("malformed", "");
    env.start_daemon();
    let a = raw(&env, b"GARBAGE\r\n\r\n");
    assert!(status_line(&a).starts_with("HTTP/1.1 400"), "{a}");
}

#[test]
fn oversized_body_is_413_before_it_is_sent() {
    let mut env = Env::new("big", "");
    env.start_daemon();
    let a = raw(
        &env,
        b"POST /v1/sandboxes HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n",
    );
    assert!(status_line(&a).starts_with("HTTP/1.1 413"), "{a}");
}

#[test]
fn oversized_head_is_431() {
    let mut env = Env::new("head", "");
    env.start_daemon();
    let mut req = b"GET /v1/status HTTP/1.1\r\nX-Pad: ".to_vec();
    req.extend(std::iter::repeat_n(b'a', 20_000));
    req.extend(b"\r\n\r\n");
    let a = raw(&env, &req);
    assert!(status_line(&a).starts_with("HTTP/1.1 431"), "{a}");
}

#[test]
fn unknown_route_is_404_and_wrong_method_405() {
    let mut env = Env::new("routes", "");
    env.start_daemon();
    let a = raw(
        &env,
        b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(status_line(&a).starts_with("HTTP/1.1 404"), "{a}");
    let b = raw(
        &env,
        b"DELETE /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(status_line(&b).starts_with("HTTP/1.1 405"), "{b}");
}

#[test]
fn unknown_json_field_is_400_naming_it() {
    let mut env = Env::new("field", "");
    env.start_daemon();
    let body = br#"{"profle":"default"}"#;
    let mut req = format!(
        "POST /v1/sandboxes HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend(body);
    let a = raw(&env, &req);
    assert!(status_line(&a).starts_with("HTTP/1.1 400"), "{a}");
    assert!(a.contains("unknown field `profle`"), "{a}");
}

#[test]
fn a_slow_client_gets_408_and_never_stalls_others() {
    let mut env = Env::new("slow", "");
    env.start_daemon();
    let mut slow = UnixStream::connect(&env.socket).unwrap();
    slow.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    // Meanwhile, others are served at once.
    let t = Instant::now();
    for _ in 0..20 {
        env.api().get("/healthz").unwrap();
    }
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "others waited {:?}",
        t.elapsed()
    );
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut out = Vec::new();
    let _ = slow.read_to_end(&mut out);
    let a = String::from_utf8_lossy(&out);
    assert!(status_line(&a).starts_with("HTTP/1.1 408"), "{a}");
}

#[test]
fn many_idle_connections_do_not_block_a_request() {
    let mut env = Env::new("idle", "");
    env.start_daemon();
    let idle: Vec<UnixStream> = (0..200)
        .map(|_| UnixStream::connect(&env.socket).unwrap())
        .collect();
    let status = env.api().get("/v1/status").unwrap();
    assert_eq!(status["backend"]["kind"], "qemu");
    drop(idle);
}

#[test]
fn pipelined_keep_alive_requests_are_all_answered() {
    let mut env = Env::new("pipeline", "");
    env.start_daemon();
    let a = raw(
        &env,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(a.matches("HTTP/1.1 200").count(), 2, "{a}");
}

#[test]
fn event_stream_delivers_new_events() {
    let mut env = Env::new("stream", "");
    env.start_daemon();
    let mut s = UnixStream::connect(&env.socket).unwrap();
    s.write_all(b"GET /v1/events?follow=1&tail=0 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    env.ok(&["sandbox", "prune"]);
    let mut got = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    while !got.contains("daemon.prune") && Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
    assert!(got.contains("Transfer-Encoding: chunked"), "{got}");
    assert!(got.contains("\"kind\":\"daemon.prune\""), "{got}");
}

#[test]
fn a_half_closed_client_still_gets_its_answer() {
    let mut env = Env::new("halfclose", "");
    env.start_daemon();
    let mut s = UnixStream::connect(&env.socket).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let a = String::from_utf8_lossy(&out);
    assert!(status_line(&a).starts_with("HTTP/1.1 200"), "{a:?}");
}
