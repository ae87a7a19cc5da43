//! A `NETLINK_ROUTE` socket (netlink(7)): datagrams in and out. What goes in
//! them is `net::rtnl`'s business; the request/reply loop is `net::link`'s.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    bind, recv, send, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};

/// Large enough for any single rtnetlink message the kernel sends (it sizes
/// dump datagrams to the page size, or 32 KiB at most).
const RECV_BUF: usize = 64 * 1024;

pub struct Socket {
    fd: OwnedFd,
}

impl Socket {
    /// A route socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Socket> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        // Extended ACKs would only add text we do not read; errors carry errno.
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        // Dumps of a busy host's routes come in bursts; a larger buffer keeps
        // the kernel from dropping them (ENOBUFS) before we read.
        let _ = setsockopt(&fd, sockopt::RcvBuf, &(1 << 20));
        Ok(Socket { fd })
    }

    pub fn send(&self, msg: &[u8]) -> io::Result<()> {
        let n = retry(|| send(self.fd.as_raw_fd(), msg, MsgFlags::empty()))?;
        if n == msg.len() {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short netlink send",
            ))
        }
    }

    /// The next datagram (one or more messages).
    pub fn recv(&self) -> io::Result<Vec<u8>> {
        let mut buf = vec![0; RECV_BUF];
        let n = retry(|| recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty()))?;
        buf.truncate(n);
        Ok(buf)
    }
}

/// A signal arriving mid-call is no failure; the call is simply repeated.
fn retry<T>(mut f: impl FnMut() -> nix::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(nix::errno::Errno::EINTR) => continue,
            other => return other.map_err(io::Error::from),
        }
    }
}
