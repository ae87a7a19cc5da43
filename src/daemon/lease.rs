//! Time: lease expiry and boot deadlines, checked about once a second.
//!
//! A sandbox whose lease has passed goes TIMEOUT (recorded at once) and is
//! then torn down to DESTROYED; teardown that fails is retried next second.
//! A sandbox still BOOTING past `boot_timeout` is FAILED and its VM stopped.
//! Leases live in sled, so they keep counting across daemon restarts.
//! The tick never waits for a sandbox another operation holds: that one is
//! looked at again next second, and every other lease stays on time.

use super::manager::{try_lock, Manager};
use crate::model::State;
use crate::time::Timestamp;

impl Manager {
    /// Expires leases and enforces boot deadlines. Called about once a second;
    /// never waits for a sandbox another operation holds.
    pub fn tick(&self) {
        // Two key lookups while the log is under its cap.
        match self.store().trim_events(self.config().event_log_max) {
            Ok(0) => {}
            Ok(n) => crate::debug!("event log: dropped the {n} oldest events"),
            Err(e) => crate::warn!("event log: cannot trim: {}", crate::log::error_chain(&e)),
        }
        let Ok(all) = self.store().list() else { return };
        let now = Timestamp::now();
        for sb in all {
            if sb.lease_expired(now) || sb.state == State::Timeout {
                self.expire(sb.vmid);
            } else if sb.state == State::Booting {
                let late = sb
                    .runtime
                    .as_ref()
                    .is_some_and(|r| r.started_at.plus(self.config().boot_timeout) <= now);
                if late {
                    self.boot_timed_out(sb.vmid);
                }
            }
        }
    }

    fn expire(&self, vmid: u32) {
        // A sandbox in the middle of an operation is looked at next second;
        // waiting here would hold up every other lease.
        let l = self.lock_of(vmid);
        let Some(_g) = try_lock(&l) else { return };
        let Ok(Some(mut sb)) = self.store().get(vmid) else {
            return;
        };
        let now = Timestamp::now();
        if sb.state != State::Timeout {
            if !sb.lease_expired(now) {
                return;
            }
            if self
                .transition(&mut sb, State::Timeout, "lease expired")
                .is_err()
            {
                return;
            }
        }
        if let Err(e) = self.destroy_locked(&mut sb, false, "destroyed after lease expiry") {
            crate::error!("sandbox {vmid}: teardown after lease expiry failed, will retry: {e}");
        }
    }

    fn boot_timed_out(&self, vmid: u32) {
        let l = self.lock_of(vmid);
        let Some(_g) = try_lock(&l) else { return };
        let Ok(Some(mut sb)) = self.store().get(vmid) else {
            return;
        };
        if sb.state != State::Booting {
            return;
        }
        let why = format!(
            "the guest did not become ready within {}; see `agentlab logs {vmid}`",
            crate::time::format_duration(self.config().boot_timeout)
        );
        self.fail(&mut sb, &why);
    }
}
