//! Reading and vetting qcow2 and raw images: parsing a header, deciding
//! whether an image may serve as a base, and walking its backing chain.
//!
//! Owns everything agentlab reads from an image file, and the policy that a
//! base and every link below it must follow (see the module doc in
//! `mod.rs` for the attacks it answers). It does not write images
//! (`overlay.rs`) and it does not walk L2 tables or refcounts. Spec:
//! qcow2.rst "Header" and "Header extensions", the limits in QEMU's
//! `block/qcow2.h`, and QEMU's backing-name rules (`path_has_protocol`).

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use super::{
    read_error, BaseFormat, BaseInfo, ChainLink, Header, QcowError, COMPRESSION_ZSTD,
    EXT_BACKING_FORMAT, EXT_END, EXT_EXTERNAL_DATA_FILE, EXT_HEADER_LEN, INCOMPAT_COMPRESSION_TYPE,
    INCOMPAT_CORRUPT, INCOMPAT_DIRTY, INCOMPAT_EXTERNAL_DATA, INCOMPAT_KNOWN, MAGIC,
    MAX_BACKING_FORMAT_LEN, MAX_BACKING_NAME, MAX_CHAIN_DEPTH, MAX_CLUSTER_BITS,
    MAX_REFCOUNT_ORDER, MIN_CLUSTER_BITS, OFF_AUTOCLEAR_FEATURES, OFF_BACKING_FILE_OFFSET,
    OFF_BACKING_FILE_SIZE, OFF_CLUSTER_BITS, OFF_COMPATIBLE_FEATURES, OFF_COMPRESSION_TYPE,
    OFF_CRYPT_METHOD, OFF_HEADER_LENGTH, OFF_INCOMPATIBLE_FEATURES, OFF_L1_SIZE,
    OFF_L1_TABLE_OFFSET, OFF_NB_SNAPSHOTS, OFF_REFCOUNT_ORDER, OFF_REFCOUNT_TABLE_CLUSTERS,
    OFF_REFCOUNT_TABLE_OFFSET, OFF_SIZE, OFF_SNAPSHOTS_OFFSET, OFF_VERSION, QCOW_MAX_L1_SIZE,
    QCOW_MAX_REFTABLE_SIZE, QCOW_MAX_SNAPSHOTS, SECTOR, SNAPSHOT_HEADER_MIN, TABLE_ENTRY,
    V2_HEADER_LENGTH, V3_MIN_HEADER_LENGTH,
};

// ---------------------------------------------------------------------------
// Parsing a header
// ---------------------------------------------------------------------------

fn be32(buf: &[u8], at: usize) -> Result<u32, QcowError> {
    buf.get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| truncated_header(at + 4, buf.len()))
}

fn be64(buf: &[u8], at: usize) -> Result<u64, QcowError> {
    buf.get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| truncated_header(at + 8, buf.len()))
}

fn truncated_header(needed: impl std::fmt::Display, have: usize) -> QcowError {
    QcowError::ParseHeader(format!(
        "truncated: the header needs {needed} bytes but only {have} are there"
    ))
}

/// Parses the header at the start of `buf`, its extensions and backing
/// name. `buf` should hold the image's first cluster (or the whole file if
/// shorter). Checks structure only; `inspect_base` applies the policy.
pub fn parse_header(buf: &[u8]) -> Result<Header, QcowError> {
    let bad = |msg: String| Err(QcowError::ParseHeader(msg));
    let mut h = parse_fixed_fields(buf)?;
    if h.version == 3 {
        parse_v3_fields(buf, &mut h)?;
    }
    let cluster_size = 1u64 << h.cluster_bits;
    if u64::from(h.header_length) > cluster_size {
        return bad(format!(
            "header_length {} exceeds the cluster size",
            h.header_length
        ));
    }
    let backing_offset = be64(buf, OFF_BACKING_FILE_OFFSET)?;
    if backing_offset > cluster_size {
        return bad(format!(
            "the backing file name at byte {backing_offset} is outside the first cluster"
        ));
    }
    // qcow2.rst: extensions run from header_length to the backing file name,
    // or to the end of cluster 0.
    let ext_end = if backing_offset != 0 {
        backing_offset
    } else {
        cluster_size
    };
    parse_extensions(buf, u64::from(h.header_length), ext_end, &mut h)?;
    if backing_offset != 0 {
        let size = u64::from(be32(buf, OFF_BACKING_FILE_SIZE)?);
        h.backing_file = parse_backing_name(buf, backing_offset, size, cluster_size)?;
    }
    Ok(h)
}

/// The magic, the version and the fields every version has, with the values
/// version 2 implies for the rest. The backing file offset and size are left
/// to `parse_header`, which reads them once the header length is known.
fn parse_fixed_fields(buf: &[u8]) -> Result<Header, QcowError> {
    let bad = |msg: String| Err(QcowError::ParseHeader(msg));
    if buf.get(..4) != Some(MAGIC.as_slice()) {
        return bad("no qcow2 magic (QFI\\xfb)".into());
    }
    let version = be32(buf, OFF_VERSION)?;
    if !(2..=3).contains(&version) {
        return bad(format!("unsupported qcow2 version {version}"));
    }
    let cluster_bits = be32(buf, OFF_CLUSTER_BITS)?;
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return bad(format!("unsupported cluster size 2^{cluster_bits}"));
    }
    Ok(Header {
        version,
        cluster_bits,
        size: be64(buf, OFF_SIZE)?,
        crypt_method: be32(buf, OFF_CRYPT_METHOD)?,
        l1_size: be32(buf, OFF_L1_SIZE)?,
        l1_table_offset: be64(buf, OFF_L1_TABLE_OFFSET)?,
        refcount_table_offset: be64(buf, OFF_REFCOUNT_TABLE_OFFSET)?,
        refcount_table_clusters: be32(buf, OFF_REFCOUNT_TABLE_CLUSTERS)?,
        nb_snapshots: be32(buf, OFF_NB_SNAPSHOTS)?,
        snapshots_offset: be64(buf, OFF_SNAPSHOTS_OFFSET)?,
        // qcow2.rst: version 2 implies these values.
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: 4,
        header_length: V2_HEADER_LENGTH,
        compression_type: 0,
        backing_file: None,
        backing_format: None,
        external_data_file: false,
    })
}

/// The version 3 fields: feature bits, refcount order, header length and,
/// in a header longer than 104 bytes, the compression type.
fn parse_v3_fields(buf: &[u8], h: &mut Header) -> Result<(), QcowError> {
    h.incompatible_features = be64(buf, OFF_INCOMPATIBLE_FEATURES)?;
    h.compatible_features = be64(buf, OFF_COMPATIBLE_FEATURES)?;
    h.autoclear_features = be64(buf, OFF_AUTOCLEAR_FEATURES)?;
    h.refcount_order = be32(buf, OFF_REFCOUNT_ORDER)?;
    h.header_length = be32(buf, OFF_HEADER_LENGTH)?;
    if h.header_length < V3_MIN_HEADER_LENGTH || h.header_length % 8 != 0 {
        return Err(QcowError::ParseHeader(format!(
            "header_length {} is not a multiple of 8 of at least {V3_MIN_HEADER_LENGTH}",
            h.header_length
        )));
    }
    if h.header_length > V3_MIN_HEADER_LENGTH {
        h.compression_type = *buf
            .get(OFF_COMPRESSION_TYPE)
            .ok_or_else(|| truncated_header(OFF_COMPRESSION_TYPE + 1, buf.len()))?;
    }
    Ok(())
}

fn parse_extensions(buf: &[u8], start: u64, end: u64, h: &mut Header) -> Result<(), QcowError> {
    let bad = |msg: String| Err(QcowError::ParseHeader(msg));
    let mut at = start;
    while at < end {
        let Some(data_at) = at.checked_add(EXT_HEADER_LEN).filter(|&d| d <= end) else {
            return bad(format!(
                "the header extension at byte {at} crosses byte {end}"
            ));
        };
        let kind = be32(buf, at as usize)?;
        let len = u64::from(be32(buf, at as usize + 4)?);
        if len > end - data_at {
            return bad(format!(
                "the header extension at byte {at} claims {len} bytes, past byte {end}"
            ));
        }
        let data = buf
            .get(data_at as usize..(data_at + len) as usize)
            .ok_or_else(|| truncated_header(data_at + len, buf.len()))?;
        match kind {
            EXT_END => return Ok(()),
            EXT_BACKING_FORMAT => {
                if len > MAX_BACKING_FORMAT_LEN {
                    return bad(format!("the backing format is {len} bytes long"));
                }
                match std::str::from_utf8(data) {
                    Ok(s) if !s.contains('\0') => h.backing_format = Some(s.to_owned()),
                    _ => return bad("the backing format is not a plain string".into()),
                }
            }
            EXT_EXTERNAL_DATA_FILE => h.external_data_file = true,
            _ => {} // qcow2.rst: unknown extensions may be ignored.
        }
        at = data_at + len.next_multiple_of(8);
    }
    Ok(())
}

fn parse_backing_name(
    buf: &[u8],
    offset: u64,
    size: u64,
    cluster_size: u64,
) -> Result<Option<String>, QcowError> {
    if size > MAX_BACKING_NAME as u64 || offset + size > cluster_size {
        return Err(QcowError::ParseHeader(format!(
            "the backing file name ({size} bytes at byte {offset}) is too long \
             or runs past the first cluster"
        )));
    }
    // QEMU reads an empty name as "no backing file".
    if size == 0 {
        return Ok(None);
    }
    let raw = buf
        .get(offset as usize..(offset + size) as usize)
        .ok_or_else(|| truncated_header(offset + size, buf.len()))?;
    match std::str::from_utf8(raw) {
        Ok(name) if !name.contains('\0') => Ok(Some(name.to_owned())),
        _ => Err(QcowError::ParseHeader(format!(
            "the backing file name is not a plain UTF-8 string: {}",
            raw.escape_ascii()
        ))),
    }
}

// ---------------------------------------------------------------------------
// Vetting base images
// ---------------------------------------------------------------------------

/// Decides whether `h`, from a file of `file_len` bytes, is safe to use as a
/// read-only base. Returns the reason it is not.
pub(super) fn check_base_header(h: &Header, file_len: u64) -> Result<(), String> {
    let cs = 1u64 << h.cluster_bits;
    if h.crypt_method != 0 {
        return Err(format!(
            "encrypted images are not supported (crypt_method {}); \
             convert it to a plain image with `qemu-img convert`",
            h.crypt_method
        ));
    }
    check_features(h)?;
    if h.refcount_order > MAX_REFCOUNT_ORDER {
        return Err(format!(
            "refcount_order {} is over 64 bits",
            h.refcount_order
        ));
    }
    if h.refcount_table_clusters == 0 {
        return Err("it has no refcount table".into());
    }
    let table = |what, offset, bytes, max| check_table(what, offset, bytes, max, cs, file_len);
    let reftable_bytes = u64::from(h.refcount_table_clusters) * cs;
    table(
        "refcount table",
        h.refcount_table_offset,
        reftable_bytes,
        QCOW_MAX_REFTABLE_SIZE,
    )?;
    let l1_bytes = u64::from(h.l1_size) * TABLE_ENTRY;
    table("L1 table", h.l1_table_offset, l1_bytes, QCOW_MAX_L1_SIZE)?;
    let l1_needed = h.size.div_ceil(cs * (cs / TABLE_ENTRY));
    if u64::from(h.l1_size) < l1_needed {
        return Err(format!(
            "its L1 table is too small: {} entries for a {}-byte disk that needs {l1_needed}",
            h.l1_size, h.size
        ));
    }
    if h.nb_snapshots > 0 {
        let bytes = u64::from(h.nb_snapshots) * SNAPSHOT_HEADER_MIN;
        let max = QCOW_MAX_SNAPSHOTS * SNAPSHOT_HEADER_MIN;
        table("snapshot table", h.snapshots_offset, bytes, max)?;
    }
    Ok(())
}

/// The dirty bit is refused, though QEMU opens dirty images read-only
/// without complaint: it is only ever set while a writer with lazy refcounts
/// has the image open, so a dirty base is either in use by a writer (its
/// data would change under every overlay) or left by a crash. Either way
/// `qemu-img check -r all` settles it, and a base should be settled.
fn check_features(h: &Header) -> Result<(), String> {
    let f = h.incompatible_features;
    if f & !INCOMPAT_KNOWN != 0 {
        return Err(format!(
            "it uses incompatible features this version does not know (bits {:#x})",
            f & !INCOMPAT_KNOWN
        ));
    }
    if f & INCOMPAT_CORRUPT != 0 {
        return Err("QEMU marked it corrupt; repair it with `qemu-img check -r all`".into());
    }
    if f & INCOMPAT_EXTERNAL_DATA != 0 || h.external_data_file {
        return Err("it keeps its data in an external data file, which is not supported".into());
    }
    if f & INCOMPAT_DIRTY != 0 {
        return Err(
            "it is marked dirty (open for writing, or its writer crashed); \
             stop any writer and run `qemu-img check -r all` on it"
                .into(),
        );
    }
    // Extended L2 (bit 4) only changes how clusters are mapped: fine to read.
    let zstd_flagged = f & INCOMPAT_COMPRESSION_TYPE != 0;
    match h.compression_type {
        0 if !zstd_flagged => Ok(()),
        COMPRESSION_ZSTD if zstd_flagged => Ok(()),
        t => Err(format!(
            "compression type {t} does not match its incompatible feature bit"
        )),
    }
}

/// A metadata table must be cluster-aligned, within QEMU's cap, and inside
/// the file.
fn check_table(
    what: &str,
    offset: u64,
    bytes: u64,
    max: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<(), String> {
    if bytes > max {
        return Err(format!("its {what} is {bytes} bytes; QEMU allows {max}"));
    }
    if offset % cluster_size != 0 {
        return Err(format!("its {what} offset {offset} is not cluster-aligned"));
    }
    match offset.checked_add(bytes) {
        Some(end) if end <= file_len => Ok(()),
        Some(end) => Err(format!(
            "it is truncated: its {what} ends at byte {end} but the file is {file_len} bytes"
        )),
        None => Err(format!("its {what} offset {offset} is out of range")),
    }
}

/// Vets `path` as a base image living in `images_dir` and follows its
/// backing chain, which must stay inside `images_dir`.
///
/// The top image's format comes from its name: `*.qcow2` must carry the
/// qcow2 magic; `*.raw` and `*.img` must not (a raw image that reads as
/// qcow2 is the format-probing attack). Links below the top take the format
/// their parent's header declares, and must match it the same way.
pub fn inspect_base(path: &Path, images_dir: &Path) -> Result<BaseInfo, QcowError> {
    let root = images_dir
        .canonicalize()
        .map_err(|source| QcowError::OpenImagesDir {
            path: images_dir.to_path_buf(),
            source,
        })?;
    let top = path.canonicalize().map_err(read_error(path))?;
    if !top.starts_with(&root) {
        return Err(QcowError::OutsideImagesDir {
            path: top,
            images_dir: root,
        });
    }
    let format = format_from_name(path).ok_or_else(|| {
        refusal(
            &top,
            "its name does not say its format; \
             name base images *.qcow2 (qcow2) or *.raw / *.img (raw)",
        )
    })?;
    let mut image = read_image(path, &top, format)?;
    let virtual_size = image.virtual_size;
    let mut chain: Vec<ChainLink> = Vec::new();
    while let Some((named, format)) = image.backing.take() {
        let parent = chain.last().map_or(&top, |link| &link.path).clone();
        if chain.len() == MAX_CHAIN_DEPTH {
            return Err(QcowError::BackingChainTooDeep { image: top });
        }
        let link = named.canonicalize().map_err(read_error(&named))?;
        if !link.starts_with(&root) {
            return Err(QcowError::BackingOutsideImagesDir {
                image: parent,
                backing: link,
                images_dir: root,
            });
        }
        if link == top || chain.iter().any(|c| c.path == link) {
            return Err(QcowError::BackingLoop {
                image: top,
                backing: link,
            });
        }
        image = read_image(&named, &link, format)?;
        chain.push(ChainLink { path: link, format });
    }
    Ok(BaseInfo {
        path: top,
        format,
        virtual_size,
        chain,
    })
}

fn refusal(path: &Path, reason: impl Into<String>) -> QcowError {
    QcowError::RefuseImage {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn format_from_name(path: &Path) -> Option<BaseFormat> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    match ext.as_str() {
        "qcow2" => Some(BaseFormat::Qcow2),
        "raw" | "img" => Some(BaseFormat::Raw),
        _ => None,
    }
}

/// What one image in a chain says about itself.
struct Image {
    virtual_size: u64,
    /// The backing file as QEMU would resolve it, and its declared format.
    backing: Option<(PathBuf, BaseFormat)>,
}

/// Reads and vets one image. `named` is the path as the chain names it
/// (relative backing names resolve against its directory, as in QEMU);
/// `canonical` is where it really is.
fn read_image(named: &Path, canonical: &Path, format: BaseFormat) -> Result<Image, QcowError> {
    let (head, file_len) = read_head(canonical)?;
    let refuse = |reason: String| refusal(canonical, reason);
    let has_magic = head.starts_with(MAGIC);
    match format {
        BaseFormat::Raw if has_magic => Err(refuse(
            "it is used as raw but starts with the qcow2 magic, which a probing tool \
             would obey; if it really is qcow2 (Ubuntu cloud images are, despite \
             .img), name it *.qcow2"
                .into(),
        )),
        BaseFormat::Raw if file_len == 0 || file_len % SECTOR != 0 => Err(refuse(format!(
            "a raw image must be a non-zero multiple of {SECTOR} bytes, this one is {file_len}"
        ))),
        BaseFormat::Raw => Ok(Image {
            virtual_size: file_len,
            backing: None,
        }),
        BaseFormat::Qcow2 if !has_magic => Err(refuse(format!(
            "it is not a qcow2 image (starts with \"{}\")",
            head[..head.len().min(MAGIC.len())].escape_ascii()
        ))),
        BaseFormat::Qcow2 => {
            let header = parse_header(&head).map_err(|e| refuse(e.to_string()))?;
            check_base_header(&header, file_len).map_err(refuse)?;
            let backing_format = header.backing_format.as_deref();
            let backing = (header.backing_file.as_deref())
                .map(|name| backing_of(named, name, backing_format))
                .transpose()
                .map_err(refuse)?;
            Ok(Image {
                virtual_size: header.size,
                backing,
            })
        }
    }
}

/// Returns the start of the file at `path` (cluster 0, which holds all that
/// `parse_header` reads; at most 2 MiB) and the file's length.
fn read_head(path: &Path) -> Result<(Vec<u8>, u64), QcowError> {
    // stat before open: opening a FIFO for reading would block.
    if !fs::metadata(path).map_err(read_error(path))?.is_file() {
        return Err(refusal(path, "it is not a regular file"));
    }
    let file = File::open(path).map_err(read_error(path))?;
    let file_len = file.metadata().map_err(read_error(path))?.len();
    let want = file_len.min(1 << MAX_CLUSTER_BITS);
    let mut head = Vec::with_capacity(want as usize);
    (&file)
        .take(want)
        .read_to_end(&mut head)
        .map_err(read_error(path))?;
    Ok((head, file_len))
}

/// Where the backing `name` recorded in `image` points, and in what format.
fn backing_of(
    image: &Path,
    name: &str,
    format: Option<&str>,
) -> Result<(PathBuf, BaseFormat), String> {
    if name.starts_with("json:") {
        return Err(format!(
            "its backing file is a json: specification ({name}), \
             which can open any driver or file"
        ));
    }
    // QEMU's path_has_protocol: a ':' before the first '/' selects a
    // protocol driver (nbd:, http:, ...) instead of a file.
    if name.split('/').next().is_some_and(|s| s.contains(':')) {
        return Err(format!(
            "its backing file {name} names a QEMU protocol, not a file"
        ));
    }
    let Some(format) = format else {
        return Err(format!(
            "it names its backing file ({name}) but not the backing format, so QEMU \
             would probe it; record it with `qemu-img rebase -u -b {name} -F qcow2|raw`"
        ));
    };
    let format = BaseFormat::from_qemu_name(format).ok_or_else(|| {
        format!("its backing format {format} is not supported; only qcow2 and raw are")
    })?;
    let dir = image.parent().unwrap_or(Path::new(""));
    Ok((dir.join(name), format))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow::overlay_image;
    use crate::qcow::test_support::{TempDir, GIB, MIB};

    fn overlay(backing: &str, format: BaseFormat) -> Vec<u8> {
        overlay_image(backing, format, MIB).unwrap()
    }

    fn patched(mut buf: Vec<u8>, at: usize, bytes: &[u8]) -> Vec<u8> {
        buf[at..at + bytes.len()].copy_from_slice(bytes);
        buf
    }

    fn parse_error(buf: &[u8]) -> String {
        match parse_header(buf) {
            Err(QcowError::ParseHeader(reason)) => reason,
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    fn check_error(buf: &[u8]) -> String {
        let header = parse_header(buf).unwrap();
        check_base_header(&header, buf.len() as u64).unwrap_err()
    }

    fn refusal(result: Result<BaseInfo, QcowError>) -> String {
        match result {
            Err(QcowError::RefuseImage { reason, .. }) => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// Writes `n` qcow2 images `0.qcow2`..: each backed by the next, the last by none.
    fn write_chain(dir: &TempDir, n: usize) -> PathBuf {
        dir.file(&format!("{}.raw", n), &vec![0; 512]);
        for i in 0..n {
            let next = format!("{}.{}", i + 1, if i + 1 == n { "raw" } else { "qcow2" });
            let format = if i + 1 == n {
                BaseFormat::Raw
            } else {
                BaseFormat::Qcow2
            };
            dir.file(&format!("{i}.qcow2"), &overlay(&next, format));
        }
        dir.0.join("0.qcow2")
    }

    // --- parsing ---

    #[test]
    fn parse_header_refuses_bad_magic() {
        let buf = patched(overlay("/b", BaseFormat::Raw), 0, b"QFI\0");

        assert!(parse_error(&buf).contains("magic"));
    }

    #[test]
    fn parse_header_refuses_version_1() {
        let buf = patched(
            overlay("/b", BaseFormat::Raw),
            OFF_VERSION,
            &1u32.to_be_bytes(),
        );

        assert!(parse_error(&buf).contains("version 1"));
    }

    #[test]
    fn parse_header_refuses_a_cluster_size_over_2_mib() {
        let buf = patched(
            overlay("/b", BaseFormat::Raw),
            OFF_CLUSTER_BITS,
            &22u32.to_be_bytes(),
        );

        assert!(parse_error(&buf).contains("2^22"));
    }

    #[test]
    fn parse_header_refuses_a_backing_name_running_past_cluster_0() {
        let at = OFF_BACKING_FILE_SIZE;
        let buf = patched(overlay("/b", BaseFormat::Raw), at, &1023u32.to_be_bytes());
        let buf = patched(buf, OFF_BACKING_FILE_OFFSET, &65000u64.to_be_bytes());

        assert!(parse_error(&buf).contains("past the first cluster"));
    }

    #[test]
    fn parse_header_refuses_an_extension_longer_than_its_area() {
        let buf = patched(
            overlay("/b", BaseFormat::Raw),
            116,
            &0xffff_fff0u32.to_be_bytes(),
        );

        assert!(parse_error(&buf).contains("claims"));
    }

    #[test]
    fn parse_header_reports_truncation_of_a_short_buffer() {
        let buf = overlay("/b", BaseFormat::Raw);

        assert!(parse_error(&buf[..50]).contains("truncated"));
    }

    #[test]
    fn parse_header_reads_no_backing_format_from_an_unknown_extension() {
        let buf = patched(
            overlay("/b", BaseFormat::Raw),
            112,
            &0x1234_5678u32.to_be_bytes(),
        );

        let header = parse_header(&buf).unwrap();

        assert_eq!(header.backing_format, None);
        assert_eq!(header.backing_file.as_deref(), Some("/b"));
    }

    // --- base checks ---

    #[test]
    fn base_check_refuses_encryption() {
        let buf = patched(
            overlay("/b", BaseFormat::Raw),
            OFF_CRYPT_METHOD,
            &2u32.to_be_bytes(),
        );

        assert!(check_error(&buf).contains("encrypted images are not supported"));
    }

    #[test]
    fn base_check_refuses_the_corrupt_bit() {
        let at = OFF_INCOMPATIBLE_FEATURES;
        let buf = patched(
            overlay("/b", BaseFormat::Raw),
            at,
            &INCOMPAT_CORRUPT.to_be_bytes(),
        );

        assert!(check_error(&buf).contains("corrupt"));
    }

    #[test]
    fn base_check_refuses_the_dirty_bit() {
        let at = OFF_INCOMPATIBLE_FEATURES;
        let buf = patched(
            overlay("/b", BaseFormat::Raw),
            at,
            &INCOMPAT_DIRTY.to_be_bytes(),
        );

        assert!(check_error(&buf).contains("dirty"));
    }

    #[test]
    fn base_check_refuses_an_external_data_file() {
        let bit = INCOMPAT_EXTERNAL_DATA.to_be_bytes();
        let buf = patched(
            overlay("/b", BaseFormat::Raw),
            OFF_INCOMPATIBLE_FEATURES,
            &bit,
        );

        assert!(check_error(&buf).contains("external data file"));
    }

    #[test]
    fn base_check_refuses_an_external_data_file_extension_without_its_bit() {
        let ext = EXT_EXTERNAL_DATA_FILE.to_be_bytes();
        let buf = patched(overlay("/b", BaseFormat::Raw), 112, &ext);

        assert!(check_error(&buf).contains("external data file"));
    }

    #[test]
    fn base_check_refuses_unknown_incompatible_features() {
        let at = OFF_INCOMPATIBLE_FEATURES;
        let buf = patched(
            overlay("/b", BaseFormat::Raw),
            at,
            &(1u64 << 40).to_be_bytes(),
        );

        assert!(check_error(&buf).contains("0x10000000000"));
    }

    #[test]
    fn base_check_refuses_a_truncated_l1_table() {
        let buf = overlay_image("/b", BaseFormat::Raw, GIB).unwrap();
        let header = parse_header(&buf).unwrap();

        let err = check_base_header(&header, buf.len() as u64 - 8).unwrap_err();

        assert_eq!(
            err,
            "it is truncated: its L1 table ends at byte 196624 but the file is 196616 bytes"
        );
    }

    #[test]
    fn base_check_refuses_an_l1_table_too_small_for_the_size() {
        let buf = patched(overlay("/b", BaseFormat::Raw), OFF_SIZE, &GIB.to_be_bytes());

        assert!(check_error(&buf).contains("L1 table is too small"));
    }

    #[test]
    fn base_check_refuses_a_misaligned_l1_table() {
        let at = OFF_L1_TABLE_OFFSET;
        let buf = patched(
            overlay("/b", BaseFormat::Raw),
            at,
            &0x30008u64.to_be_bytes(),
        );

        assert!(check_error(&buf).contains("not cluster-aligned"));
    }

    #[test]
    fn base_check_refuses_a_snapshot_table_past_the_end() {
        let buf = patched(
            overlay("/b", BaseFormat::Raw),
            OFF_NB_SNAPSHOTS,
            &1u32.to_be_bytes(),
        );
        let buf = patched(buf, OFF_SNAPSHOTS_OFFSET, &0x40000u64.to_be_bytes());

        assert!(check_error(&buf).contains("snapshot table ends at byte"));
    }

    use crate::testutil::XorShift as Rng;

    /// A fuzz loop by nature: thousands of mutants of a valid header (with
    /// extensions and a backing name) must each parse or fail, never panic.
    #[test]
    fn parse_header_and_base_checks_never_panic_on_mutated_headers() {
        let seed = overlay("/var/lib/agentlab/images/base.qcow2", BaseFormat::Qcow2);
        let seed = &seed[..1024];
        let interesting = [0x00, 0x01, 0x07, 0x08, 0x10, 0x7f, 0x80, 0xfe, 0xff];
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut parsed = 0;

        for _ in 0..50_000 {
            let mut buf = seed.to_vec();
            for _ in 0..1 + rng.below(8) {
                // Mostly the fixed header and extensions, sometimes anywhere.
                let at = if rng.below(4) == 0 {
                    rng.below(buf.len())
                } else {
                    rng.below(136)
                };
                buf[at] = match rng.below(3) {
                    0 => interesting[rng.below(interesting.len())],
                    1 => buf[at] ^ (1 << rng.below(8)),
                    _ => rng.next() as u8,
                };
            }
            buf.truncate(if rng.below(8) == 0 {
                rng.below(buf.len())
            } else {
                buf.len()
            });
            if let Ok(header) = parse_header(&buf) {
                parsed += 1;
                let _ = check_base_header(&header, rng.next() >> rng.below(64));
            }
        }

        assert!(
            parsed > 1000,
            "the mutants barely reached the checks: {parsed}"
        );
    }

    // --- inspect_base ---

    #[test]
    fn inspect_base_follows_a_chain_down_to_a_raw_image() {
        let dir = TempDir::new();
        let base = dir.file("base.raw", &vec![0; MIB as usize]);
        let mid = dir.file("mid.qcow2", &overlay("base.raw", BaseFormat::Raw));
        let top_bytes = overlay_image(mid.to_str().unwrap(), BaseFormat::Qcow2, 2 * MIB).unwrap();
        let top = dir.file("top.qcow2", &top_bytes);

        let info = inspect_base(&top, &dir.0).unwrap();

        let expected = BaseInfo {
            path: top,
            format: BaseFormat::Qcow2,
            virtual_size: 2 * MIB,
            chain: vec![
                ChainLink {
                    path: mid,
                    format: BaseFormat::Qcow2,
                },
                ChainLink {
                    path: base,
                    format: BaseFormat::Raw,
                },
            ],
        };
        assert_eq!(info, expected);
    }

    #[test]
    fn inspect_base_accepts_a_raw_image() {
        let dir = TempDir::new();
        let base = dir.file("base.img", &vec![0; 4096]);

        let info = inspect_base(&base, &dir.0).unwrap();

        let expected = BaseInfo {
            path: base,
            format: BaseFormat::Raw,
            virtual_size: 4096,
            chain: vec![],
        };
        assert_eq!(info, expected);
    }

    #[test]
    fn inspect_base_refuses_an_absolute_backing_file_outside_the_images_dir() {
        let dir = TempDir::new();
        let images = dir.subdir("images");
        let secret = dir.file("secret.raw", &[0; 512]);
        let evil = images.join("evil.qcow2");
        fs::write(&evil, overlay(secret.to_str().unwrap(), BaseFormat::Raw)).unwrap();

        let err = inspect_base(&evil, &images).unwrap_err();

        assert!(
            matches!(err, QcowError::BackingOutsideImagesDir { ref backing, .. }
            if *backing == secret)
        );
        let message = format!(
            "has a backing file outside {}: {}",
            images.display(),
            secret.display()
        );
        assert!(err.to_string().contains(&message), "{err}");
    }

    #[test]
    fn inspect_base_refuses_a_relative_backing_file_escaping_through_dotdot() {
        let dir = TempDir::new();
        let images = dir.subdir("images");
        let secret = dir.file("secret.raw", &[0; 512]);
        let evil = images.join("evil.qcow2");
        fs::write(&evil, overlay("../secret.raw", BaseFormat::Raw)).unwrap();

        let err = inspect_base(&evil, &images).unwrap_err();

        assert!(
            matches!(err, QcowError::BackingOutsideImagesDir { ref backing, .. }
            if *backing == secret)
        );
    }

    #[test]
    fn inspect_base_refuses_a_backing_symlink_pointing_outside() {
        let dir = TempDir::new();
        let images = dir.subdir("images");
        let secret = dir.file("secret.raw", &[0; 512]);
        std::os::unix::fs::symlink(&secret, images.join("link.raw")).unwrap();
        let evil = images.join("evil.qcow2");
        fs::write(&evil, overlay("link.raw", BaseFormat::Raw)).unwrap();

        let err = inspect_base(&evil, &images).unwrap_err();

        assert!(
            matches!(err, QcowError::BackingOutsideImagesDir { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn inspect_base_refuses_an_image_outside_the_images_dir() {
        let dir = TempDir::new();
        let images = dir.subdir("images");
        let stray = dir.file("stray.raw", &[0; 512]);

        let err = inspect_base(&stray, &images).unwrap_err();

        assert!(matches!(err, QcowError::OutsideImagesDir { .. }), "{err:?}");
    }

    #[test]
    fn inspect_base_refuses_a_json_backing_name() {
        let dir = TempDir::new();
        let name = r#"json:{"file":{"driver":"file","filename":"/etc/shadow"}}"#;
        let top = dir.file("top.qcow2", &overlay(name, BaseFormat::Raw));

        assert!(refusal(inspect_base(&top, &dir.0)).contains("json:"));
    }

    #[test]
    fn inspect_base_refuses_a_protocol_backing_name() {
        let dir = TempDir::new();
        let top = dir.file(
            "top.qcow2",
            &overlay("nbd:evil.example:10809", BaseFormat::Raw),
        );

        assert!(refusal(inspect_base(&top, &dir.0)).contains("protocol"));
    }

    #[test]
    fn inspect_base_refuses_a_backing_file_without_its_format() {
        let dir = TempDir::new();
        dir.file("base.raw", &[0; 512]);
        let unknown_ext = 0x1234_5678u32.to_be_bytes();
        let top = dir.file(
            "top.qcow2",
            &patched(overlay("base.raw", BaseFormat::Raw), 112, &unknown_ext),
        );

        assert!(refusal(inspect_base(&top, &dir.0)).contains("would probe"));
    }

    #[test]
    fn inspect_base_refuses_an_unsupported_backing_format() {
        let dir = TempDir::new();
        dir.file("base.raw", &[0; 512]);
        let buf = patched(overlay("base.raw", BaseFormat::Raw), 120, b"vmd");
        let top = dir.file("top.qcow2", &buf);

        assert!(refusal(inspect_base(&top, &dir.0)).contains("backing format vmd"));
    }

    #[test]
    fn inspect_base_refuses_a_backing_loop() {
        let dir = TempDir::new();
        dir.file("a.qcow2", &overlay("b.qcow2", BaseFormat::Qcow2));
        dir.file("b.qcow2", &overlay("a.qcow2", BaseFormat::Qcow2));

        let err = inspect_base(&dir.0.join("a.qcow2"), &dir.0).unwrap_err();

        assert!(matches!(err, QcowError::BackingLoop { .. }), "{err:?}");
    }

    #[test]
    fn inspect_base_refuses_an_image_backed_by_itself() {
        let dir = TempDir::new();
        let top = dir.file("a.qcow2", &overlay("a.qcow2", BaseFormat::Qcow2));

        let err = inspect_base(&top, &dir.0).unwrap_err();

        assert!(matches!(err, QcowError::BackingLoop { .. }), "{err:?}");
    }

    #[test]
    fn inspect_base_accepts_a_chain_of_16_links() {
        let dir = TempDir::new();
        let top = write_chain(&dir, MAX_CHAIN_DEPTH);

        let info = inspect_base(&top, &dir.0).unwrap();

        assert_eq!(info.chain.len(), MAX_CHAIN_DEPTH);
    }

    #[test]
    fn inspect_base_refuses_a_chain_of_17_links() {
        let dir = TempDir::new();
        let top = write_chain(&dir, MAX_CHAIN_DEPTH + 1);

        let err = inspect_base(&top, &dir.0).unwrap_err();

        assert!(
            matches!(err, QcowError::BackingChainTooDeep { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn inspect_base_refuses_a_raw_named_file_with_the_qcow2_magic() {
        let dir = TempDir::new();
        dir.file("base.raw", &[0; 512]);
        let disguised = dir.file("disguised.img", &overlay("base.raw", BaseFormat::Raw));

        assert!(refusal(inspect_base(&disguised, &dir.0)).contains("qcow2 magic"));
    }

    #[test]
    fn inspect_base_refuses_a_backing_declared_raw_that_has_the_qcow2_magic() {
        let dir = TempDir::new();
        dir.file("base.raw", &[0; 512]);
        dir.file("sneaky", &overlay("base.raw", BaseFormat::Raw));
        let top = dir.file("top.qcow2", &overlay("sneaky", BaseFormat::Raw));

        assert!(refusal(inspect_base(&top, &dir.0)).contains("qcow2 magic"));
    }

    #[test]
    fn inspect_base_refuses_a_qcow2_named_file_without_the_magic() {
        let dir = TempDir::new();
        let garbage = dir.file("garbage.qcow2", b"\x7fELF\x02\x01\x01\0 not an image");

        let reason = refusal(inspect_base(&garbage, &dir.0));

        assert_eq!(reason, r#"it is not a qcow2 image (starts with "\x7fELF")"#);
    }

    #[test]
    fn inspect_base_refuses_a_zero_length_raw_image() {
        let dir = TempDir::new();
        let empty = dir.file("empty.raw", b"");

        assert!(refusal(inspect_base(&empty, &dir.0)).contains("this one is 0"));
    }

    #[test]
    fn inspect_base_refuses_a_raw_image_that_is_not_whole_sectors() {
        let dir = TempDir::new();
        let odd = dir.file("odd.raw", &[0; 1000]);

        assert!(refusal(inspect_base(&odd, &dir.0)).contains("this one is 1000"));
    }

    #[test]
    fn inspect_base_refuses_an_unknown_file_extension() {
        let dir = TempDir::new();
        let vmdk = dir.file("disk.vmdk", &[0; 512]);

        assert!(refusal(inspect_base(&vmdk, &dir.0)).contains("*.qcow2"));
    }

    #[test]
    fn inspect_base_refuses_a_directory() {
        let dir = TempDir::new();
        let not_a_file = dir.subdir("dir.raw");

        assert!(refusal(inspect_base(&not_a_file, &dir.0)).contains("not a regular file"));
    }

    #[test]
    fn inspect_base_refuses_a_truncated_qcow2_image() {
        let dir = TempDir::new();
        dir.file("base.raw", &[0; 512]);
        let buf = overlay("base.raw", BaseFormat::Raw);
        let cut = dir.file("cut.qcow2", &buf[..0x30000]);

        assert!(refusal(inspect_base(&cut, &dir.0)).contains("ends at byte 196616"));
    }
}
