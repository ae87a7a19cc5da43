//! Base images: what a sandbox's disk and boot files come from.
//!
//! - `store`: the images directory: which names exist, validated for use
//! - `manifest`: `image.json`, what an image holds and how it boots
//! - `default_guest`: builds the default guest from the host's kernel, busybox
//!   and this binary (DESIGN.md §5)
//! - `kernel`: which host kernel the default guest boots, and its modules
//! - `cpio`: the newc archive writer (the initramfs format)
//! - `kmod`: the kernel module dependency closure, from `modules.dep`
//! - `elf`: tells a static x86-64 program from a dynamic one
//! - `guest_libs`: a dynamic host program's shared libraries, copied into a
//!   guest (the `default-qemu-ga` variant's qemu-ga)

pub mod cpio;
pub mod default_guest;
pub mod elf;
pub mod guest_libs;
pub mod kernel;
pub mod kmod;
pub mod manifest;
pub mod store;
