//! Is hardware virtualisation usable? Opening `/dev/kvm` is not enough (the
//! node can exist without permission, or with a kernel module that refuses);
//! the `KVM_GET_API_VERSION` ioctl must answer 12 (`linux/kvm.h`).

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

/// `_IO(KVMIO, 0x00)` with `KVMIO = 0xAE` (`include/uapi/linux/kvm.h`).
const KVM_GET_API_VERSION: u64 = 0xAE00;
/// The only stable KVM API version there has ever been.
const KVM_API_VERSION: i32 = 12;

/// `Ok(())` when KVM can be used, else the reason a user can act on.
pub fn probe(dev: &str) -> Result<(), String> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .map_err(|e| format!("cannot open {dev}: {e}"))?;
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an int;
    // the fd is valid for the duration of the call because `f` owns it.
    let v = unsafe { nix::libc::ioctl(f.as_raw_fd(), KVM_GET_API_VERSION as _, 0) };
    if v == KVM_API_VERSION {
        Ok(())
    } else {
        Err(format!(
            "{dev} answered API version {v}, expected {KVM_API_VERSION}"
        ))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn missing_device_is_reported_with_its_path() {
        let err = super::probe("/nonexistent/kvm").unwrap_err();
        assert!(err.contains("/nonexistent/kvm"));
    }
}
