//! The QMP client against a real `qemu-system-x86_64 -machine none`.

mod common;

use std::path::PathBuf;
use std::process::Child;
use std::sync::mpsc;
use std::time::Duration;

use agentlab::qmp::{ErrorClass, Notice, Qmp, QmpError};
use serde_json::json;

/// A QEMU with no machine, only a monitor; killed and cleaned up on drop.
struct BareQemu {
    child: Child,
    dir: PathBuf,
}

impl BareQemu {
    fn start(tag: &str) -> BareQemu {
        let dir = std::env::temp_dir().join(format!("agentlab-qmp-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let child = common::spawn_bare_qemu(&dir.join("qmp.sock"));
        BareQemu { child, dir }
    }

    fn sock(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
}

impl Drop for BareQemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const T: Duration = Duration::from_secs(10);

fn connect(q: &BareQemu) -> (Qmp, mpsc::Receiver<Notice>) {
    let (tx, rx) = mpsc::channel();
    let qmp = Qmp::connect(
        &q.sock(),
        T,
        Box::new(move |n| {
            let _ = tx.send(n);
        }),
    )
    .unwrap();
    (qmp, rx)
}

#[test]
fn greeting_reports_the_installed_qemu_version() {
    let q = BareQemu::start("greet");
    let (qmp, _rx) = connect(&q);
    assert!(qmp.greeting().version.major >= 7);
}

#[test]
fn query_status_returns_prelaunch_for_a_paused_start() {
    let q = BareQemu::start("status");
    let (qmp, _rx) = connect(&q);
    let st = qmp.execute("query-status", None, T).unwrap();
    assert_eq!(st["status"], "prelaunch");
}

#[test]
fn unknown_command_is_a_typed_command_not_found() {
    let q = BareQemu::start("unknown");
    let (qmp, _rx) = connect(&q);
    let err = qmp.execute("no-such-command", None, T).unwrap_err();
    assert!(matches!(
        err,
        QmpError::Command {
            class: ErrorClass::CommandNotFound,
            ..
        }
    ));
}

#[test]
fn bad_arguments_are_a_generic_error() {
    let q = BareQemu::start("badargs");
    let (qmp, _rx) = connect(&q);
    let err = qmp
        .execute("query-status", Some(json!({"bogus": 1})), T)
        .unwrap_err();
    assert!(matches!(
        err,
        QmpError::Command {
            class: ErrorClass::GenericError,
            ..
        }
    ));
}

#[test]
fn ids_increase_across_many_commands() {
    let q = BareQemu::start("many");
    let (qmp, _rx) = connect(&q);
    let ok = (0..50).all(|_| qmp.execute("query-status", None, T).is_ok());
    assert!(ok);
}

#[test]
fn cont_delivers_a_resume_event() {
    let q = BareQemu::start("resume");
    let (qmp, rx) = connect(&q);
    qmp.execute("cont", None, T).unwrap();
    let ev = rx.recv_timeout(T).unwrap();
    assert!(matches!(ev, Notice::Event(e) if e.name == "RESUME"));
}

#[test]
fn quit_sends_shutdown_then_closed() {
    let q = BareQemu::start("quit");
    let (qmp, rx) = connect(&q);
    qmp.execute("quit", None, T).unwrap();
    let first = rx.recv_timeout(T).unwrap();
    let second = rx.recv_timeout(T).unwrap();
    assert!(
        matches!(first, Notice::Event(e) if e.name == "SHUTDOWN" && e.data["reason"] == "host-qmp-quit")
    );
    assert_eq!(second, Notice::Closed);
}

#[test]
fn commands_after_exit_fail_as_disconnected() {
    let mut q = BareQemu::start("gone");
    let (qmp, rx) = connect(&q);
    q.child.kill().unwrap();
    let _ = q.child.wait();
    while rx.recv_timeout(T).unwrap() != Notice::Closed {}
    let err = qmp.execute("query-status", None, T).unwrap_err();
    assert!(matches!(err, QmpError::Disconnected));
}

#[test]
fn concurrent_callers_each_get_their_own_reply() {
    let q = BareQemu::start("concurrent");
    let (qmp, _rx) = connect(&q);
    let qmp = std::sync::Arc::new(qmp);
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let qmp = qmp.clone();
            std::thread::spawn(move || {
                (0..20).all(|_| qmp.execute("query-status", None, T).is_ok())
            })
        })
        .collect();
    assert!(handles.into_iter().all(|h| h.join().unwrap()));
}
