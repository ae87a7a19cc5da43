//! What the daemon finds when it starts: sled's records against the host.
//!
//! - A sandbox whose VM should run and still does is adopted: QMP and the
//!   console are reconnected, and its lease keeps counting (leases live in
//!   sled, so `tick` re-arms them by itself). The backend finds the VM by its
//!   recorded pid, or, if the daemon died before recording it, by the VMID in
//!   QEMU's argv; a VM it cannot watch again is stopped.
//! - A sandbox whose VM vanished while the daemon was away is marked FAILED
//!   with that reason; its disk is kept, so `sandbox start` brings it back.
//! - A sandbox caught mid-provisioning is marked FAILED; overlays are written
//!   atomically, so there is either a whole one or none, and `revert` or
//!   `start` makes what is missing.
//! - The sandbox network is rebuilt from the sandboxes that are not
//!   destroyed: the nft table rendered whole (so no chain of a dead sandbox
//!   survives), the bridge checked, DHCP and DNS restarted. TAPs need no
//!   sweeping: they are not persistent and vanish with their QEMU.
//! - Orphans (QEMU processes and directories no record owns) are left alone
//!   and listed by `agentlab status`; `agentlab sandbox prune` removes them.
//!
//! Known gap: a BOOTING sandbox whose guest printed its ready line while no
//! daemon was listening stays BOOTING until its boot deadline (QEMU drops
//! console output nobody reads). Readiness through the guest agent, which
//! can be asked again at any time, closes this.

use serde_json::json;

use super::manager::Manager;
use crate::backend::Adoption;
use crate::model::{EventDraft, Sandbox, State};

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
    for sb in all {
        match sb.state {
            State::Requested | State::Provisioning => report.interrupted.push(interrupted(m, sb)),
            s if s.vm_expected() => match adopt(m, sb) {
                (vmid, true) => report.adopted.push(vmid),
                (vmid, false) => report.vanished.push(vmid),
            },
            State::Stopped | State::Failed if sb.runtime.is_some() => {
                let mut sb = sb;
                sb.runtime = None;
                let draft = EventDraft::new(
                    Some(sb.vmid),
                    "sandbox.reconcile",
                    "cleared a stale runtime record",
                );
                let _ = m.record(&sb, draft);
            }
            _ => {}
        }
    }
    // The network's members are the sandboxes still alive; the nft table is
    // rebuilt from them, so a dead sandbox's rules do not outlive it.
    if let Ok(net) = m.network() {
        let live: Vec<Sandbox> = m
            .store()
            .list()
            .unwrap_or_default()
            .into_iter()
            .filter(|s| s.state != State::Destroyed)
            .collect();
        net.reconcile(&live);
    }
    report.orphans = m
        .backend()
        .orphans(&m.list(false).unwrap_or_default())
        .len();
    let msg = format!(
        "agentlabd {} started: {} adopted, {} vanished, {} interrupted, {} orphans",
        env!("CARGO_PKG_VERSION"),
        report.adopted.len(),
        report.vanished.len(),
        report.interrupted.len(),
        report.orphans
    );
    crate::info!("{msg}");
    m.append(EventDraft::new(None, "daemon.start", msg));
    report
}

/// Marks a sandbox caught mid-provisioning FAILED; returns its VMID.
fn interrupted(m: &Manager, mut sb: Sandbox) -> u32 {
    sb.last_error = Some("interrupted: agentlabd stopped while provisioning".into());
    sb.runtime = None;
    let _ = m.transition(
        &mut sb,
        State::Failed,
        "provisioning interrupted by a daemon restart",
    );
    sb.vmid
}

/// Adopts the sandbox's VM or marks it FAILED; returns (vmid, adopted).
fn adopt(m: &Manager, mut sb: Sandbox) -> (u32, bool) {
    let vmid = sb.vmid;
    let why = match m.backend().adopt(&sb) {
        Ok(Adoption::Running(rt)) => {
            let draft = EventDraft::new(
                Some(vmid),
                "sandbox.adopted",
                format!("adopted after daemon restart (pid {})", rt.pid),
            )
            .with_data(json!({"pid": rt.pid}));
            sb.runtime = Some(rt);
            let _ = m.record(&sb, draft);
            // RUNNING counts the previous daemon's execs; none of them
            // survived it (the agent cancels a departed host's commands).
            if sb.state == State::Running {
                let _ = m.transition(
                    &mut sb,
                    State::Ready,
                    "idle: commands ended with the daemon",
                );
            }
            return (vmid, true);
        }
        Ok(Adoption::Gone) => "the hypervisor exited while agentlabd was not running".to_string(),
        Err(e) => {
            let why = format!(
                "cannot re-attach after daemon restart: {}",
                crate::log::error_chain(&e)
            );
            crate::error!("sandbox {vmid}: {why}");
            why
        }
    };
    sb.runtime = None;
    sb.last_error = Some(why.clone());
    let _ = m.transition(&mut sb, State::Failed, &why);
    (vmid, false)
}
