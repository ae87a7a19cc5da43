//! What the daemon finds when it starts: sled's records against the host.
//!
//! - A sandbox whose VM should run and still does is adopted: QMP and the
//!   console are reconnected, and its lease keeps counting (leases live in
//!   sled, so `tick` re-arms them by itself).
//! - A sandbox whose VM vanished while the daemon was away is marked FAILED
//!   with that reason; its disk is kept, so `sandbox start` brings it back.
//! - A sandbox caught mid-provisioning is marked FAILED; overlays are written
//!   atomically, so there is either a whole one or none.
//! - Orphans (QEMU processes and directories no record owns) are left alone
//!   and listed by `agentlab status`; `agentlab sandbox prune` removes them.

use serde_json::json;

use super::manager::Manager;
use crate::backend::Adoption;
use crate::model::{EventDraft, State};

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub adopted: Vec<u32>,
    pub vanished: Vec<u32>,
    pub interrupted: Vec<u32>,
    pub orphans: usize,
}

pub fn reconcile(m: &Manager) -> Report {
    let mut report = Report::default();
    let Ok(all) = m.store().list() else {
        return report;
    };
    for mut sb in all {
        match sb.state {
            State::Requested | State::Provisioning => {
                sb.last_error = Some("interrupted: agentlabd stopped while provisioning".into());
                sb.runtime = None;
                let _ = m.transition(
                    &mut sb,
                    State::Failed,
                    "provisioning interrupted by a daemon restart",
                );
                report.interrupted.push(sb.vmid);
            }
            s if s.vm_expected() => match m.backend().adopt(&sb) {
                Ok(Adoption::Running(rt)) => {
                    m.note(
                        &sb,
                        "sandbox.adopted",
                        &format!("adopted after daemon restart (pid {})", rt.pid),
                        json!({"pid": rt.pid}),
                    );
                    report.adopted.push(sb.vmid);
                }
                Ok(Adoption::Gone) => {
                    sb.runtime = None;
                    let why = "the hypervisor exited while agentlabd was not running";
                    sb.last_error = Some(why.into());
                    let _ = m.transition(&mut sb, State::Failed, why);
                    report.vanished.push(sb.vmid);
                }
                Err(e) => {
                    let why = format!(
                        "cannot re-attach after daemon restart: {}",
                        crate::log::error_chain(&e)
                    );
                    crate::error!("sandbox {}: {why}", sb.vmid);
                    sb.runtime = None;
                    sb.last_error = Some(why.clone());
                    let _ = m.transition(&mut sb, State::Failed, &why);
                    report.vanished.push(sb.vmid);
                }
            },
            State::Stopped | State::Failed if sb.runtime.is_some() => {
                sb.runtime = None;
                let _ = m.store().write(
                    &sb,
                    None,
                    EventDraft::new(
                        Some(sb.vmid),
                        "sandbox.reconcile",
                        "cleared a stale runtime record",
                    ),
                );
            }
            _ => {}
        }
    }
    let live: Vec<_> = m.list(false).unwrap_or_default();
    report.orphans = m.backend().orphans(&live).len();
    let msg = format!(
        "agentlabd {} started: {} adopted, {} vanished, {} interrupted, {} orphans",
        env!("CARGO_PKG_VERSION"),
        report.adopted.len(),
        report.vanished.len(),
        report.interrupted.len(),
        report.orphans
    );
    crate::info!("{msg}");
    if let Ok(ev) = m
        .store()
        .append_event(EventDraft::new(None, "daemon.start", msg))
    {
        m.bus().publish(crate::daemon::bus::BusItem::Event(ev));
    }
    report
}
