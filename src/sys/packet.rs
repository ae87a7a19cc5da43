//! The DHCP server's sockets: a UDP socket bound to one interface, and an
//! `AF_PACKET` socket that sends whole Ethernet frames out of it (packet(7)),
//! for replies to clients that have no IP address yet. Also the interface's
//! index and hardware address, which those frames need.
//!
//! Everything here acts in the calling thread's network namespace.

use std::ffi::OsString;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::libc;
use nix::net::if_::if_nametoindex;
use nix::sys::socket::{
    self, sockopt, AddressFamily, LinkAddr, MsgFlags, SockFlag, SockType, SockaddrIn, SockaddrLike,
};

/// A non-blocking UDP socket on `0.0.0.0:port` that only sees (and only
/// sends through) `iface`, with `SO_BROADCAST` on. No `SO_REUSEADDR`: a
/// second server on the same interface fails with `EADDRINUSE` instead of
/// splitting the traffic.
pub fn udp_on_device(iface: &str, port: u16) -> io::Result<UdpSocket> {
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // Before bind: the kernel's port-conflict check considers the device.
    socket::setsockopt(&fd, sockopt::BindToDevice, &OsString::from(iface))?;
    socket::setsockopt(&fd, sockopt::Broadcast, &true)?;
    let any = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
    socket::bind(fd.as_raw_fd(), &any)?;
    Ok(UdpSocket::from(fd))
}

/// Sends raw Ethernet frames out of one interface. Protocol 0: the socket
/// receives nothing, so it never queues the bridge's traffic.
pub struct FrameSender {
    fd: OwnedFd,
    ifindex: i32,
}

impl FrameSender {
    pub fn open(iface: &str) -> io::Result<FrameSender> {
        let ifindex = if_nametoindex(iface)?;
        let fd = socket::socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let ifindex = i32::try_from(ifindex)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "ifindex out of range"))?;
        Ok(FrameSender { fd, ifindex })
    }

    /// Sends one complete frame (Ethernet header included) to `dst`. Never
    /// blocks: a full transmit queue is `WouldBlock`, and the frame is lost.
    pub fn send(&self, dst: [u8; 6], frame: &[u8]) -> io::Result<()> {
        let mut sll_addr = [0u8; 8];
        sll_addr[..6].copy_from_slice(&dst);
        let sll = libc::sockaddr_ll {
            sll_family: libc::AF_PACKET as u16,
            sll_protocol: (libc::ETH_P_IP as u16).to_be(),
            sll_ifindex: self.ifindex,
            sll_hatype: 0,
            sll_pkttype: 0,
            sll_halen: 6,
            sll_addr,
        };
        let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `sll` is a fully initialised sockaddr_ll living on this
        // stack frame for the whole call, and `len` is exactly its size, which
        // is what LinkAddr::from_raw reads (it copies the struct).
        let addr = unsafe {
            LinkAddr::from_raw(std::ptr::from_ref(&sll).cast::<libc::sockaddr>(), Some(len))
        }
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad sockaddr_ll"))?;
        socket::sendto(self.fd.as_raw_fd(), frame, &addr, MsgFlags::empty())?;
        Ok(())
    }
}

/// The hardware (MAC) address of `iface`.
pub fn hw_addr(iface: &str) -> io::Result<[u8; 6]> {
    nix::ifaddrs::getifaddrs()?
        .filter(|a| a.interface_name == iface)
        .find_map(|a| a.address.as_ref()?.as_link_addr()?.addr())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{iface}: no such interface or no hardware address"),
            )
        })
}
