//! Writing an empty qcow2 overlay: building the bytes that
//! `qemu-img create -f qcow2 -b B -F F` would write, and putting them on disk
//! atomically.
//!
//! Owns the overlay's layout (header, refcount table and blocks, L1 table)
//! and its durable creation. It does not read images or decide whether a
//! base is fit to sit under an overlay; that is `inspect.rs`. Spec: qcow2.rst
//! "Header", "Header extensions" and "Host cluster management".

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::{
    read_error, BaseFormat, QcowError, EXT_BACKING_FORMAT, EXT_HEADER_LEN, MAGIC, MAX_BACKING_NAME,
    OFF_BACKING_FILE_OFFSET, OFF_BACKING_FILE_SIZE, OFF_CLUSTER_BITS, OFF_HEADER_LENGTH,
    OFF_L1_SIZE, OFF_L1_TABLE_OFFSET, OFF_REFCOUNT_ORDER, OFF_REFCOUNT_TABLE_CLUSTERS,
    OFF_REFCOUNT_TABLE_OFFSET, OFF_SIZE, OFF_VERSION, QCOW_MAX_L1_SIZE, SECTOR, TABLE_ENTRY,
    V3_HEADER_LENGTH,
};

// What `overlay_image` writes: QEMU 7.2's `qemu-img create` defaults.
const OVERLAY_CLUSTER_BITS: u32 = 16;
/// refcount_order 4: 16-bit refcounts.
const OVERLAY_REFCOUNT_ORDER: u32 = 4;
const OVERLAY_REFCOUNT_BYTES: u64 = 2;

/// Where an empty overlay's clusters go: the header in cluster 0, then the
/// refcount table, the refcount blocks and the L1 table, all contiguous.
#[derive(Debug, PartialEq, Eq)]
struct OverlayLayout {
    cluster_size: u64,
    l1_entries: u64,
    reftable_clusters: u64,
    refblock_clusters: u64,
    l1_clusters: u64,
}

impl OverlayLayout {
    fn new(virtual_size: u64, cluster_bits: u32) -> OverlayLayout {
        let cs = 1u64 << cluster_bits;
        // qcow2.rst "Cluster mapping": one L1 entry maps cs/8 clusters.
        let l1_entries = virtual_size.div_ceil(cs * (cs / TABLE_ENTRY));
        let l1_clusters = (l1_entries * TABLE_ENTRY).div_ceil(cs);
        // The refcount blocks count every used cluster, themselves and the
        // table included: grow both until they cover the total. Neither
        // shrinks, so this settles in a step or two.
        let (mut table, mut blocks) = (1, 1);
        loop {
            let used = 1 + table + blocks + l1_clusters;
            let need_blocks = used.div_ceil(cs / OVERLAY_REFCOUNT_BYTES);
            let need_table = (need_blocks * TABLE_ENTRY).div_ceil(cs);
            if need_blocks <= blocks && need_table <= table {
                break;
            }
            (table, blocks) = (table.max(need_table), blocks.max(need_blocks));
        }
        OverlayLayout {
            cluster_size: cs,
            l1_entries,
            reftable_clusters: table,
            refblock_clusters: blocks,
            l1_clusters,
        }
    }

    fn refblocks_offset(&self) -> u64 {
        (1 + self.reftable_clusters) * self.cluster_size
    }

    fn l1_offset(&self) -> u64 {
        self.refblocks_offset() + self.refblock_clusters * self.cluster_size
    }

    fn used_clusters(&self) -> u64 {
        1 + self.reftable_clusters + self.refblock_clusters + self.l1_clusters
    }
}

fn put(buf: &mut [u8], at: u64, bytes: &[u8]) {
    let at = at as usize;
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

/// Returns the bytes of an empty qcow2 v3 overlay of `virtual_size` bytes
/// backed by `backing_name` (written as given; `write_overlay` passes an
/// absolute path) in `backing_format`, laid out as `qemu-img create` lays
/// it out with its defaults, less the optional feature-name table.
pub fn overlay_image(
    backing_name: &str,
    backing_format: BaseFormat,
    virtual_size: u64,
) -> Result<Vec<u8>, QcowError> {
    build_overlay(
        backing_name,
        backing_format,
        virtual_size,
        OVERLAY_CLUSTER_BITS,
    )
}

fn build_overlay(
    backing_name: &str,
    backing_format: BaseFormat,
    virtual_size: u64,
    cluster_bits: u32,
) -> Result<Vec<u8>, QcowError> {
    // qcow2.rst "Header extensions": the backing format, padded to 8 bytes,
    // then the end marker (type 0, length 0), then the backing file name.
    let format = backing_format.as_str().as_bytes();
    let ext_at = u64::from(V3_HEADER_LENGTH);
    let name_at = ext_at + 2 * EXT_HEADER_LEN + (format.len() as u64).next_multiple_of(8);
    check_overlay_params(backing_name, name_at, virtual_size, cluster_bits)
        .map_err(QcowError::BuildOverlay)?;
    let layout = OverlayLayout::new(virtual_size, cluster_bits);
    let cs = layout.cluster_size;
    // Like `qemu-img create`, end the file right after the L1 table.
    let mut buf = vec![0u8; (layout.l1_offset() + layout.l1_entries * TABLE_ENTRY) as usize];

    // qcow2.rst "Header". Fields not listed stay zero: crypt_method,
    // nb_snapshots, snapshots_offset, every feature bit, compression_type.
    for (at, bytes) in [
        (0, &MAGIC[..]),
        (OFF_VERSION, &3u32.to_be_bytes()),
        (OFF_BACKING_FILE_OFFSET, &name_at.to_be_bytes()),
        (
            OFF_BACKING_FILE_SIZE,
            &(backing_name.len() as u32).to_be_bytes(),
        ),
        (OFF_CLUSTER_BITS, &cluster_bits.to_be_bytes()),
        (OFF_SIZE, &virtual_size.to_be_bytes()),
        (OFF_L1_SIZE, &(layout.l1_entries as u32).to_be_bytes()),
        (OFF_L1_TABLE_OFFSET, &layout.l1_offset().to_be_bytes()),
        (OFF_REFCOUNT_TABLE_OFFSET, &cs.to_be_bytes()),
        (
            OFF_REFCOUNT_TABLE_CLUSTERS,
            &(layout.reftable_clusters as u32).to_be_bytes(),
        ),
        (OFF_REFCOUNT_ORDER, &OVERLAY_REFCOUNT_ORDER.to_be_bytes()),
        (OFF_HEADER_LENGTH, &V3_HEADER_LENGTH.to_be_bytes()),
        (ext_at as usize, &EXT_BACKING_FORMAT.to_be_bytes()),
        (ext_at as usize + 4, &(format.len() as u32).to_be_bytes()),
        ((ext_at + EXT_HEADER_LEN) as usize, format),
        (name_at as usize, backing_name.as_bytes()),
    ] {
        put(&mut buf, at as u64, bytes);
    }

    // qcow2.rst "Host cluster management": the table (cluster 1 on) points
    // at each block; the blocks are contiguous, so cluster c's 16-bit count
    // sits 2c bytes past the first one.
    for block in 0..layout.refblock_clusters {
        let block_at = layout.refblocks_offset() + block * cs;
        put(&mut buf, cs + block * TABLE_ENTRY, &block_at.to_be_bytes());
    }
    for cluster in 0..layout.used_clusters() {
        let count_at = layout.refblocks_offset() + cluster * OVERLAY_REFCOUNT_BYTES;
        put(&mut buf, count_at, &1u16.to_be_bytes());
    }
    // The L1 table stays zero: every read falls through to the backing file.
    Ok(buf)
}

fn check_overlay_params(
    backing_name: &str,
    name_at: u64,
    virtual_size: u64,
    cluster_bits: u32,
) -> Result<(), String> {
    let cs = 1u64 << cluster_bits;
    // The L1 table may not exceed QCOW_MAX_L1_SIZE: 2 PiB at 64 KiB clusters.
    let max_size = QCOW_MAX_L1_SIZE / TABLE_ENTRY * (cs * (cs / TABLE_ENTRY));
    // The name must also fit in cluster 0, which only binds small clusters.
    let max_name = (MAX_BACKING_NAME as u64).min(cs - name_at);
    let name_len = backing_name.len() as u64;
    if name_len == 0 || name_len > max_name {
        return Err(format!(
            "the backing file name is {name_len} bytes; it must be 1 to {max_name}"
        ));
    }
    if backing_name.contains('\0') {
        return Err("the backing file name contains a NUL byte".into());
    }
    if virtual_size == 0 || virtual_size % SECTOR != 0 {
        return Err(format!(
            "the virtual size {virtual_size} is not a positive multiple of {SECTOR} bytes"
        ));
    }
    if virtual_size > max_size {
        return Err(format!(
            "the virtual size {virtual_size} exceeds {max_size} bytes, the most a qcow2 \
             image with {cs}-byte clusters can address"
        ));
    }
    Ok(())
}

/// Writes an empty overlay at `path` backed by `backing` (recorded by its
/// canonical absolute path) with an explicit `backing_format`.
///
/// The caller passes the final `virtual_size`; it should be at least the
/// base's (see `inspect_base`). The file appears at `path` complete and
/// durable, or not at all: it is written beside `path` as `.<name>.tmp`,
/// fsynced, renamed over `path`, and the directory fsynced; any failure
/// removes what was written. The file is created mode 0600.
pub fn write_overlay(
    path: &Path,
    backing: &Path,
    backing_format: BaseFormat,
    virtual_size: u64,
) -> Result<(), QcowError> {
    let backing_abs = backing.canonicalize().map_err(read_error(backing))?;
    let backing_name = backing_abs.to_str().ok_or_else(|| {
        QcowError::BuildOverlay(format!(
            "the backing path {} is not UTF-8",
            backing_abs.display()
        ))
    })?;
    let bytes = overlay_image(backing_name, backing_format, virtual_size)?;
    let file_name = path.file_name().ok_or_else(|| {
        QcowError::BuildOverlay(format!("{} does not name a file", path.display()))
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = dir.join(format!(".{}.tmp", file_name.to_string_lossy()));

    let failed = |source| QcowError::WriteOverlay {
        path: path.to_path_buf(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(failed)?;
    let mut cleanup = RemoveOnDrop(Some(tmp.clone()));
    file.write_all(&bytes).map_err(failed)?;
    file.sync_all().map_err(failed)?;
    drop(file);
    fs::rename(&tmp, path).map_err(failed)?;
    // From here a failure must take the renamed file away instead.
    cleanup.0 = Some(path.to_path_buf());
    File::open(dir).and_then(|d| d.sync_all()).map_err(failed)?;
    cleanup.0 = None;
    Ok(())
}

/// Removes a half-written file unless disarmed by setting it to `None`.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            // Best effort: the write error that got us here is what matters.
            let _ = fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow::inspect::{check_base_header, parse_header};
    use crate::qcow::test_support::{TempDir, GIB, MIB};
    use crate::qcow::Header;

    // --- writing ---

    #[test]
    fn overlay_header_round_trips_through_parse_header() {
        let buf = overlay_image("/images/base.qcow2", BaseFormat::Qcow2, GIB).unwrap();

        let header = parse_header(&buf).unwrap();

        let expected = Header {
            version: 3,
            cluster_bits: 16,
            size: GIB,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 112,
            compression_type: 0,
            backing_file: Some("/images/base.qcow2".into()),
            backing_format: Some("qcow2".into()),
            external_data_file: false,
        };
        assert_eq!(header, expected);
    }

    #[test]
    fn overlay_of_1_gib_is_as_long_as_the_one_qemu_img_writes() {
        let buf = overlay_image("/images/base.raw", BaseFormat::Raw, GIB).unwrap();

        assert_eq!(buf.len(), 196_624);
    }

    #[test]
    fn overlay_passes_the_base_checks() {
        let buf = overlay_image("/images/base.raw", BaseFormat::Raw, 3 * GIB + 512).unwrap();
        let header = parse_header(&buf).unwrap();

        assert_eq!(check_base_header(&header, buf.len() as u64), Ok(()));
    }

    #[test]
    fn overlay_of_2_tib_keeps_its_4096_entry_l1_in_cluster_3() {
        let buf = overlay_image("/b", BaseFormat::Raw, 2 << 40).unwrap();

        let header = parse_header(&buf).unwrap();
        assert_eq!((header.l1_size, header.l1_table_offset), (4096, 0x30000));
        assert_eq!(buf.len(), 3 * 65536 + 32768);
    }

    #[test]
    fn overlay_of_2_pib_spans_512_l1_clusters_counted_in_one_refcount_block() {
        let size = 2 << 50;

        let buf = overlay_image("/b", BaseFormat::Raw, size).unwrap();

        let header = parse_header(&buf).unwrap();
        assert_eq!(OverlayLayout::new(size, 16).l1_clusters, 512);
        assert_eq!(check_base_header(&header, buf.len() as u64), Ok(()));
        let counts = &buf[0x20000..0x20000 + 2 * 516];
        assert!(counts[..2 * 515].chunks(2).all(|c| c == [0, 1]));
        assert_eq!(&counts[2 * 515..], [0, 0]);
    }

    #[test]
    fn layout_with_small_clusters_grows_several_refcount_blocks() {
        // 512-byte clusters: one block counts 256 clusters, one L1 entry
        // maps 32 KiB, so 1 GiB needs a 256 KiB L1 table of 512 clusters.
        let layout = OverlayLayout::new(GIB, 9);

        let expected = OverlayLayout {
            cluster_size: 512,
            l1_entries: 32768,
            reftable_clusters: 1,
            refblock_clusters: 3,
            l1_clusters: 512,
        };
        assert_eq!(layout, expected);
    }

    #[test]
    fn overlay_with_small_clusters_points_at_every_refcount_block() {
        let buf = build_overlay("/b", BaseFormat::Raw, GIB, 9).unwrap();

        let header = parse_header(&buf).unwrap();
        assert_eq!(check_base_header(&header, buf.len() as u64), Ok(()));
        let table: Vec<u64> = buf[512..512 + 4 * 8]
            .chunks(8)
            .map(|e| u64::from_be_bytes(e.try_into().unwrap()))
            .collect();
        assert_eq!(table, [1024, 1536, 2048, 0]);
        assert_eq!(header.l1_table_offset, 2560);
        let counts = &buf[1024..1024 + 2 * 518];
        assert!(counts[..2 * 517].chunks(2).all(|c| c == [0, 1]));
        assert_eq!(&counts[2 * 517..], [0, 0]);
    }

    #[test]
    fn overlay_image_refuses_size_zero() {
        let err = overlay_image("/b", BaseFormat::Raw, 0).unwrap_err();

        assert!(err.to_string().contains("virtual size 0"), "{err}");
    }

    #[test]
    fn overlay_image_refuses_a_size_that_is_not_whole_sectors() {
        let err = overlay_image("/b", BaseFormat::Raw, GIB + 1).unwrap_err();

        assert!(err.to_string().contains("multiple of 512"), "{err}");
    }

    #[test]
    fn overlay_image_refuses_more_than_2_pib() {
        let err = overlay_image("/b", BaseFormat::Raw, (2 << 50) + 512).unwrap_err();

        assert!(err.to_string().contains("exceeds"), "{err}");
    }

    #[test]
    fn overlay_image_refuses_a_backing_name_over_1023_bytes() {
        let name = format!("/{}", "a".repeat(1023));

        let err = overlay_image(&name, BaseFormat::Raw, MIB).unwrap_err();

        assert!(err.to_string().contains("1024 bytes"), "{err}");
    }

    #[test]
    fn overlay_image_accepts_a_backing_name_of_1023_bytes() {
        let name = format!("/{}", "a".repeat(1022));

        let buf = overlay_image(&name, BaseFormat::Raw, MIB).unwrap();

        assert_eq!(parse_header(&buf).unwrap().backing_file, Some(name));
    }

    // --- write_overlay ---

    #[test]
    fn write_overlay_writes_the_image_and_leaves_no_temp_file() {
        let dir = TempDir::new();
        let base = dir.file("base.raw", &[0; 512]);
        let ovl = dir.0.join("ovl.qcow2");

        write_overlay(&ovl, &base, BaseFormat::Raw, MIB).unwrap();

        let expected = overlay_image(base.to_str().unwrap(), BaseFormat::Raw, MIB).unwrap();
        assert_eq!(fs::read(&ovl).unwrap(), expected);
        let mut names: Vec<_> = fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["base.raw", "ovl.qcow2"]);
    }

    #[test]
    fn write_overlay_records_the_canonical_backing_path() {
        let dir = TempDir::new();
        dir.file("base.raw", &[0; 512]);
        let via_dotdot = dir.subdir("sub").join("../base.raw");
        let ovl = dir.0.join("ovl.qcow2");

        write_overlay(&ovl, &via_dotdot, BaseFormat::Raw, MIB).unwrap();

        let header = parse_header(&fs::read(&ovl).unwrap()).unwrap();
        let expected = dir.0.join("base.raw").to_str().unwrap().to_owned();
        assert_eq!(header.backing_file, Some(expected));
    }

    #[test]
    fn write_overlay_failing_to_rename_leaves_no_temp_file() {
        let dir = TempDir::new();
        let base = dir.file("base.raw", &[0; 512]);
        let occupied = dir.subdir("ovl.qcow2");
        fs::write(occupied.join("keep"), b"").unwrap();

        let err = write_overlay(&occupied, &base, BaseFormat::Raw, MIB).unwrap_err();

        assert!(matches!(err, QcowError::WriteOverlay { .. }), "{err:?}");
        assert!(!dir.0.join(".ovl.qcow2.tmp").exists());
        assert!(occupied.join("keep").exists());
    }

    #[test]
    fn write_overlay_refuses_a_missing_backing_file() {
        let dir = TempDir::new();
        let ovl = dir.0.join("ovl.qcow2");

        let err = write_overlay(&ovl, &dir.0.join("nope.raw"), BaseFormat::Raw, MIB).unwrap_err();

        assert!(matches!(err, QcowError::ReadImage { .. }), "{err:?}");
        assert!(!ovl.exists());
    }

    #[test]
    fn write_overlay_refuses_size_zero_and_writes_nothing() {
        let dir = TempDir::new();
        let base = dir.file("base.raw", &[0; 512]);
        let ovl = dir.0.join("ovl.qcow2");

        let err = write_overlay(&ovl, &base, BaseFormat::Raw, 0).unwrap_err();

        assert!(matches!(err, QcowError::BuildOverlay(_)), "{err:?}");
        assert!(!ovl.exists());
    }
}
