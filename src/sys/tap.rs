//! TAP devices (`Documentation/networking/tuntap.rst`; constants from
//! `include/uapi/linux/if_tun.h`): `/dev/net/tun` plus `TUNSETIFF`.
//! Non-persistent: the interface lives exactly as long as its last fd.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// `_IOW('T', 202, int)`.
const TUNSETIFF: u64 = 0x4004_54CA;
const IFF_TAP: u16 = 0x0002;
const IFF_NO_PI: u16 = 0x1000;
/// Frames carry a `virtio_net_hdr`, so QEMU can pass offloads through.
const IFF_VNET_HDR: u16 = 0x4000;
/// `IFNAMSIZ` (if.h), including the NUL.
pub const IFNAMSIZ: usize = 16;

/// `struct ifreq` as `TUNSETIFF` reads it: the name, then `ifr_flags` at the
/// start of the 24-byte union.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: u16,
    _pad: [u8; 22],
}

/// Creates (or attaches to) the TAP `name` with
/// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, returning its queue fd.
pub fn open(name: &str) -> io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= IFNAMSIZ {
        return Err(io::Error::from_raw_os_error(nix::libc::EINVAL));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq` (40 bytes), which
    // `IfReq` lays out with `repr(C)`; `req` outlives the call and `file`
    // keeps the fd open for it.
    let rc = unsafe { nix::libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(OwnedFd::from(file))
}

#[cfg(test)]
mod tests {
    #[test]
    fn ifreq_has_the_kernel_size() {
        assert_eq!(std::mem::size_of::<super::IfReq>(), 40);
    }

    #[test]
    fn overlong_name_is_refused_before_any_ioctl() {
        let err = super::open("a-name-of-16-chr").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(nix::libc::EINVAL));
    }
}
