//! The only room with `unsafe`: process inspection and control, pidfds,
//! KVM probing, the route netlink socket and TAP devices (`netlink`, `tap`),
//! and, used in the guest, the online-resize ioctl (`ext4`) and
//! pseudo-terminals with the between-fork-and-exec setup of the agent's
//! children (`pty`); in the daemon, the DHCP server's interface-bound UDP
//! and raw Ethernet sockets (`packet`).
//!
//! Everything outside `sys` is `unsafe`-free; each `unsafe` block here says
//! why it is sound in a `// SAFETY:` comment.

pub mod ext4;
pub mod kvm;
pub mod netlink;
pub mod netns;
pub mod packet;
pub mod process;
pub mod pty;
pub mod tap;
pub mod tty;
pub mod users;
