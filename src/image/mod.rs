//! Base images: what a sandbox's disk and boot files come from.
//!
//! - `cpio`: the newc archive writer (the initramfs format)

pub mod cpio;
