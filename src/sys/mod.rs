//! The only room with `unsafe`: process inspection and control, pidfds,
//! KVM probing, and (in `ext4`) the online-resize ioctl used in the guest.
//!
//! Everything outside `sys` is `unsafe`-free; each `unsafe` block here says
//! why it is sound in a `// SAFETY:` comment.

pub mod ext4;
pub mod kvm;
pub mod process;
pub mod tty;
pub mod users;
