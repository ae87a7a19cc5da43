//! STAND-IN — NOT THE REAL MODULE. The tar writer and extractor are being
//! written on another branch; this file only carries their public signatures
//! so the guest agent (`guest::files`) compiles and its tests run. Every body
//! fails with "tar not merged yet". The integrator replaces this whole file
//! with the real `src/tar.rs`.

use std::io::Write;
use std::path::Path;

/// Ownership, permissions and time of one entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    pub mode: u32,
    pub mtime: i64,
    pub uid: u32,
    pub gid: u32,
}

/// What an archive held.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub entries: u64,
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("tar not merged yet")]
    NotMerged,
}

pub struct TarWriter<W: Write> {
    _w: W,
}

impl<W: Write> TarWriter<W> {
    pub fn new(w: W) -> TarWriter<W> {
        TarWriter { _w: w }
    }
}

/// Writes `src` (a file or a tree) as entries under `root`.
pub fn pack_path<W: Write>(
    _src: &Path,
    _root: &str,
    _w: &mut TarWriter<W>,
    _progress: &mut dyn FnMut(u64),
) -> Result<(Stats, Vec<String>), TarError> {
    Err(TarError::NotMerged)
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExtractOptions {
    pub rename_root: Option<String>,
    pub untrusted: bool,
    pub max_entries: u64,
}

pub struct Extractor {
    _private: (),
}

impl Extractor {
    pub fn new(_dest: &Path, _opts: ExtractOptions) -> Result<Extractor, TarError> {
        Err(TarError::NotMerged)
    }

    pub fn feed(&mut self, _data: &[u8]) -> Result<(), TarError> {
        Err(TarError::NotMerged)
    }

    pub fn finish(self) -> Result<Stats, TarError> {
        Err(TarError::NotMerged)
    }
}
