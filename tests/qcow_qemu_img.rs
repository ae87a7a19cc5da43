//! `qcow` against the real thing: overlays written natively must satisfy
//! `qemu-img check`, read and write through `qemu-io`, and match what
//! `qemu-img create` writes; `inspect_base` must follow chains that
//! `qemu-img` made. Needs `qemu-img` and `qemu-io` (qemu-utils) on PATH.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use agentlab::qcow::{inspect_base, write_overlay, BaseFormat, BaseInfo, ChainLink};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// A scratch directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("agentlab-qcow-it-{}-{n}", std::process::id());
        let path = std::env::temp_dir().join(name);
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        TempDir(path.canonicalize().unwrap())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Runs a tool in `dir`, asserts it succeeded, returns its stdout.
fn run(dir: &Path, tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool} (install qemu-utils): {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn qemu_img_json(dir: &Path, args: &[&str]) -> Value {
    serde_json::from_str(&run(dir, "qemu-img", args)).unwrap()
}

fn check(dir: &Path, image: &Path) -> Value {
    let image = image.to_str().unwrap();
    qemu_img_json(dir, &["check", "-f", "qcow2", "--output=json", image])
}

fn info_chain(dir: &Path, image: &Path) -> Value {
    let image = image.to_str().unwrap();
    qemu_img_json(dir, &["info", "--backing-chain", "--output=json", image])
}

fn assert_check_clean(dir: &Path, image: &Path) {
    let report = check(dir, image);
    assert_eq!(report["check-errors"], 0, "{report}");
    assert!(report.get("leaks").is_none(), "{report}");
    assert!(report.get("corruptions").is_none(), "{report}");
}

/// A 1 MiB base image made by qemu-img, filled with 0xcd by qemu-io.
fn make_base(dir: &TempDir, format: BaseFormat) -> PathBuf {
    let base = dir.path(&format!("base.{}", format.as_str()));
    let name = base.to_str().unwrap();
    run(
        &dir.0,
        "qemu-img",
        &["create", "-q", "-f", format.as_str(), name, "1M"],
    );
    let fill = ["-f", format.as_str(), "-c", "write -q -P 0xcd 0 1M", name];
    run(&dir.0, "qemu-io", &fill);
    base
}

fn assert_overlay_checks_clean(format: BaseFormat, size: u64) {
    let dir = TempDir::new();
    let base = make_base(&dir, format);
    let ovl = dir.path("ovl.qcow2");

    write_overlay(&ovl, &base, format, size).unwrap();

    assert_check_clean(&dir.0, &ovl);
    let chain = info_chain(&dir.0, &ovl);
    assert_eq!(chain[0]["format"], "qcow2", "{chain}");
    assert_eq!(chain[0]["virtual-size"], size, "{chain}");
    assert_eq!(
        chain[0]["backing-filename"],
        base.to_str().unwrap(),
        "{chain}"
    );
    assert_eq!(
        chain[0]["backing-filename-format"],
        format.as_str(),
        "{chain}"
    );
    assert_eq!(chain[1]["format"], format.as_str(), "{chain}");
    assert_eq!(chain.as_array().unwrap().len(), 2, "{chain}");
}

macro_rules! overlay_checks_clean {
    ($($name:ident: $format:expr, $size:expr;)*) => {$(
        #[test]
        fn $name() {
            assert_overlay_checks_clean($format, $size);
        }
    )*};
}

overlay_checks_clean! {
    overlay_of_1_mib_on_qcow2_checks_clean: BaseFormat::Qcow2, MIB;
    overlay_of_1_mib_on_raw_checks_clean: BaseFormat::Raw, MIB;
    overlay_of_1_gib_on_qcow2_checks_clean: BaseFormat::Qcow2, GIB;
    overlay_of_1_gib_on_raw_checks_clean: BaseFormat::Raw, GIB;
    overlay_of_10_gib_on_qcow2_checks_clean: BaseFormat::Qcow2, 10 * GIB;
    overlay_of_10_gib_on_raw_checks_clean: BaseFormat::Raw, 10 * GIB;
    overlay_of_100_gib_on_qcow2_checks_clean: BaseFormat::Qcow2, 100 * GIB;
    overlay_of_100_gib_on_raw_checks_clean: BaseFormat::Raw, 100 * GIB;
    overlay_of_2_tib_on_qcow2_checks_clean: BaseFormat::Qcow2, 2 * TIB;
    overlay_of_2_tib_on_raw_checks_clean: BaseFormat::Raw, 2 * TIB;
    overlay_of_3_gib_and_a_sector_on_qcow2_checks_clean: BaseFormat::Qcow2, 3 * GIB + 512;
    overlay_of_3_gib_and_a_sector_on_raw_checks_clean: BaseFormat::Raw, 3 * GIB + 512;
}

/// Guest writes land in the overlay; unwritten ranges still read the base.
fn assert_overlay_reads_and_writes(format: BaseFormat) {
    let dir = TempDir::new();
    let base = make_base(&dir, format);
    let ovl = dir.path("ovl.qcow2");
    write_overlay(&ovl, &base, format, MIB).unwrap();
    let ovl_name = ovl.to_str().unwrap();

    run(
        &dir.0,
        "qemu-io",
        &["-f", "qcow2", "-c", "write -q -P 0xab 0 64k", ovl_name],
    );

    assert_check_clean(&dir.0, &ovl);
    // qemu-io exits 1 when a pattern does not match.
    let reads = ["read -q -P 0xab 0 64k", "read -q -P 0xcd 64k 960k"];
    run(
        &dir.0,
        "qemu-io",
        &["-f", "qcow2", "-c", reads[0], "-c", reads[1], ovl_name],
    );
    let base_args = ["-f", format.as_str(), "-c", "read -q -P 0xcd 0 1M"];
    run(
        &dir.0,
        "qemu-io",
        &[&base_args[..], &[base.to_str().unwrap()]].concat(),
    );
}

#[test]
fn overlay_on_qcow2_keeps_guest_writes_and_reads_the_base_elsewhere() {
    assert_overlay_reads_and_writes(BaseFormat::Qcow2);
}

#[test]
fn overlay_on_raw_keeps_guest_writes_and_reads_the_base_elsewhere() {
    assert_overlay_reads_and_writes(BaseFormat::Raw);
}

/// `qemu-img info` of ours and of `qemu-img create`'s, minus the fields
/// that name the file itself; and the bytes past cluster 0 (which holds the
/// feature-name table we leave out) must be identical.
fn assert_same_as_qemu_img_create(format: BaseFormat, size: u64) {
    let dir = TempDir::new();
    let base = make_base(&dir, format);
    let ours = dir.path("ours.qcow2");
    let theirs = dir.path("theirs.qcow2");
    write_overlay(&ours, &base, format, size).unwrap();
    let (b, f, s) = (base.to_str().unwrap(), format.as_str(), size.to_string());
    let create = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        b,
        "-F",
        f,
        "theirs.qcow2",
        &s,
    ];

    run(&dir.0, "qemu-img", &create);

    let strip = |mut info: Value| {
        let object = info.as_object_mut().unwrap();
        object.remove("filename");
        object.remove("actual-size");
        info
    };
    let ours_info = strip(qemu_img_json(
        &dir.0,
        &["info", "--output=json", "ours.qcow2"],
    ));
    let theirs_info = strip(qemu_img_json(
        &dir.0,
        &["info", "--output=json", "theirs.qcow2"],
    ));
    assert_eq!(ours_info, theirs_info);
    assert_eq!(ours_info["format-specific"]["data"]["compat"], "1.1");
    assert_eq!(ours_info["format-specific"]["data"]["refcount-bits"], 16);
    assert_eq!(ours_info["cluster-size"], 65536);
    let (ours_bytes, theirs_bytes) = (fs::read(&ours).unwrap(), fs::read(&theirs).unwrap());
    assert_eq!(ours_bytes.len(), theirs_bytes.len());
    assert!(
        ours_bytes[65536..] == theirs_bytes[65536..],
        "clusters 1.. differ"
    );
}

#[test]
fn overlay_of_1_gib_on_qcow2_matches_qemu_img_create() {
    assert_same_as_qemu_img_create(BaseFormat::Qcow2, GIB);
}

#[test]
fn overlay_of_1_gib_on_raw_matches_qemu_img_create() {
    assert_same_as_qemu_img_create(BaseFormat::Raw, GIB);
}

#[test]
fn overlay_of_2_tib_on_raw_matches_qemu_img_create() {
    assert_same_as_qemu_img_create(BaseFormat::Raw, 2 * TIB);
}

#[test]
fn overlay_of_3_gib_and_a_sector_on_qcow2_matches_qemu_img_create() {
    assert_same_as_qemu_img_create(BaseFormat::Qcow2, 3 * GIB + 512);
}

/// base → mid → top, made by qemu-img with relative backing names.
fn make_chain(dir: &TempDir, bottom: BaseFormat, extra_opts: &[&str]) -> PathBuf {
    let bottom_name = format!("base.{}", bottom.as_str());
    let create = |args: &[&str]| run(&dir.0, "qemu-img", &[&["create", "-q"], args].concat());
    create(&["-f", bottom.as_str(), &bottom_name, "1M"]);
    let mid = [
        &["-f", "qcow2", "-b", &bottom_name, "-F", bottom.as_str()],
        extra_opts,
    ]
    .concat();
    create(&[&mid[..], &["mid.qcow2"]].concat());
    let top = [
        &["-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2"],
        extra_opts,
    ]
    .concat();
    create(&[&top[..], &["top.qcow2", "2M"]].concat());
    dir.path("top.qcow2")
}

#[test]
fn inspect_base_follows_a_chain_made_by_qemu_img() {
    let dir = TempDir::new();
    let top = make_chain(&dir, BaseFormat::Qcow2, &[]);

    let info = inspect_base(&top, &dir.0).unwrap();

    let expected = BaseInfo {
        path: top,
        format: BaseFormat::Qcow2,
        virtual_size: 2 * MIB,
        chain: vec![
            ChainLink {
                path: dir.path("mid.qcow2"),
                format: BaseFormat::Qcow2,
            },
            ChainLink {
                path: dir.path("base.qcow2"),
                format: BaseFormat::Qcow2,
            },
        ],
    };
    assert_eq!(info, expected);
}

#[test]
fn inspect_base_follows_a_chain_made_by_qemu_img_down_to_raw() {
    let dir = TempDir::new();
    let top = make_chain(&dir, BaseFormat::Raw, &[]);

    let info = inspect_base(&top, &dir.0).unwrap();

    let bottom = ChainLink {
        path: dir.path("base.raw"),
        format: BaseFormat::Raw,
    };
    assert_eq!(info.chain.last(), Some(&bottom));
    assert_eq!(info.chain.len(), 2);
}

#[test]
fn inspect_base_reads_qcow2_version_2_images() {
    let dir = TempDir::new();
    let top = make_chain(&dir, BaseFormat::Qcow2, &["-o", "compat=0.10"]);

    let info = inspect_base(&top, &dir.0).unwrap();

    assert_eq!((info.virtual_size, info.chain.len()), (2 * MIB, 2));
}

#[test]
fn inspect_base_reads_images_with_other_cluster_sizes_and_extended_l2() {
    let dir = TempDir::new();
    let opts = ["-o", "cluster_size=2M,extended_l2=on,lazy_refcounts=on"];
    let top = make_chain(&dir, BaseFormat::Raw, &opts);

    let info = inspect_base(&top, &dir.0).unwrap();

    assert_eq!((info.virtual_size, info.chain.len()), (2 * MIB, 2));
}

#[test]
fn inspect_base_refuses_an_image_qemu_img_encrypted() {
    let dir = TempDir::new();
    let secret = "--object=secret,id=sec0,data=hunter22";
    // A short iter-time keeps LUKS key setup quick on a loaded machine.
    let opts = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10";
    let create = [
        "create",
        "-q",
        secret,
        "-f",
        "qcow2",
        "-o",
        opts,
        "luks.qcow2",
        "1M",
    ];
    // qemu-img times its PBKDF with getrusage and gives up with "Unable to
    // get accurate CPU usage" when the measurement reads zero, which happens
    // on a busy host; that is qemu-img's flake, not ours, so try again.
    let made = (0..5).any(|_| {
        Command::new("qemu-img")
            .args(create)
            .current_dir(&dir.0)
            .status()
            .is_ok_and(|s| s.success())
    });
    assert!(made, "qemu-img could not create a LUKS image in 5 tries");

    let err = inspect_base(&dir.path("luks.qcow2"), &dir.0).unwrap_err();

    assert!(
        err.to_string()
            .contains("encrypted images are not supported"),
        "{err}"
    );
}

#[test]
fn overlay_on_an_inspected_chain_opens_with_the_whole_chain() {
    let dir = TempDir::new();
    let top = make_chain(&dir, BaseFormat::Raw, &[]);
    let info = inspect_base(&top, &dir.0).unwrap();
    let ovl = dir.path("sandbox.qcow2");

    write_overlay(&ovl, &info.path, info.format, 4 * MIB).unwrap();

    assert_check_clean(&dir.0, &ovl);
    let chain = info_chain(&dir.0, &ovl);
    let formats: Vec<&str> = chain
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["format"].as_str().unwrap())
        .collect();
    assert_eq!(formats, ["qcow2", "qcow2", "qcow2", "raw"]);
}
