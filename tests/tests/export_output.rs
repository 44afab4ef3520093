//! `ociblk export --output`: the disk is written to a new file beside the
//! output and renamed into place only when it is whole. Nothing that was
//! there before is truncated, changed or removed: not a file given as the
//! output when the export fails, not a device or FIFO, not the overlay, a
//! layer or a payload blob the export reads.

#![allow(clippy::unwrap_used)]

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use ociblk_layout::{DiskParams, Layout, OsImage};
use ociblk_overlay::{FlushMode, Overlay, OverlayConfig};
use ociblk_tests::node::TestNode;
use ociblk_tests::oci::{ImageBuilder, WrittenImage};
use ociblk_tests::support::{ociblk_bin, run_bounded, run_ok};

const CHUNK: u64 = 64 << 10;
const SEED: &str = "export";
const DISK: &[&str] = &["--disk-size", "256MiB", "--system-size", "16MiB"];

struct Fixture {
    dir: tempfile::TempDir,
    image: WrittenImage,
    node: TestNode,
    layout: Layout,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let mut builder = ImageBuilder::with_sizes(3 * CHUNK as usize + 10, 2 * CHUNK as usize);
        builder.chunk_size = CHUNK;
        let image = builder.write(&dir.path().join("image")).unwrap();
        let mut params = DiskParams::new(SEED);
        params.disk_size = 256 << 20;
        params.system_size = 16 << 20;
        let layout = Layout::build(&OsImage::open(&image.dir).unwrap(), &params).unwrap();
        let node = TestNode::with_image(&image.dir, SEED).layout(DISK);
        Fixture {
            dir,
            image,
            node,
            layout,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `ociblk export --output OUTPUT`, bounded: opening a FIFO for
    /// writing would wait for a reader forever.
    fn export(&self, output: &Path, extra: &[&str]) -> Output {
        run_bounded(
            Command::new(ociblk_bin())
                .arg("export")
                .args(self.node.layout_args())
                .arg("--output")
                .arg(output)
                .args(extra),
            Duration::from_secs(60),
        )
    }

    /// Fails unless the export to `output` fails with an error holding
    /// every one of `want`.
    fn refused(&self, output: &Path, extra: &[&str], want: &[&str]) {
        let o = self.export(output, extra);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "export to {output:?} succeeded");
        for w in want {
            assert!(stderr.contains(w), "{w:?} not in: {stderr}");
        }
    }

    /// A new, closed overlay of this disk.
    fn overlay(&self, name: &str) -> PathBuf {
        let path = self.path(name);
        let cfg = OverlayConfig {
            disk_size: self.layout.size,
            fingerprint: self.layout.fingerprint,
            flush: FlushMode::Safe,
        };
        Overlay::open(&path, cfg).unwrap().close().unwrap();
        path
    }

    /// Names in the fixture's directory: no temporary file may be left.
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

/// A file's content, mode and inode: what must not change.
fn state(path: &Path) -> (Vec<u8>, u32, u64) {
    let meta = fs::symlink_metadata(path).unwrap();
    let content = if meta.file_type().is_file() {
        fs::read(path).unwrap()
    } else {
        Vec::new()
    };
    (content, meta.mode(), meta.ino())
}

fn mknod(path: &Path, mode: libc::mode_t, dev: libc::dev_t) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    let rc = unsafe { libc::mknod(c.as_ptr(), mode, dev) };
    assert_eq!(
        rc,
        0,
        "mknod {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

#[test]
fn a_new_path_gets_the_disk_with_mode_0600_and_nothing_else_is_left() {
    let fx = Fixture::new();
    let before = fx.names();
    let out = fx.path("disk.raw");
    let o = fx.export(&out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let meta = fs::metadata(&out).unwrap();
    assert_eq!(meta.len(), 256 << 20);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let mut want = before;
    want.push("disk.raw".into());
    want.sort();
    assert_eq!(fx.names(), want, "no temporary file left");
}

#[test]
fn an_existing_regular_output_is_replaced_by_a_rename_never_changed() {
    let fx = Fixture::new();
    let out = fx.path("disk.raw");
    fs::write(&out, b"an old disk").unwrap();
    fs::set_permissions(&out, fs::Permissions::from_mode(0o644)).unwrap();
    // A second name keeps the old inode in view.
    let old = fx.path("old.raw");
    fs::hard_link(&out, &old).unwrap();
    let old_state = state(&old);

    let o = fx.export(&out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(fs::metadata(&out).unwrap().len(), 256 << 20);
    assert_eq!(
        fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_ne!(fs::metadata(&out).unwrap().ino(), old_state.2);
    assert_eq!(state(&old), old_state, "the old file was changed");
}

#[test]
fn a_failed_export_leaves_an_existing_output_as_it_was_and_no_new_file() {
    let fx = Fixture::new();
    let out = fx.path("disk.raw");
    fs::write(&out, b"an old disk").unwrap();
    fs::set_permissions(&out, fs::Permissions::from_mode(0o644)).unwrap();
    let before = state(&out);
    let names = fx.names();
    // A bad chunk in the kernel payload fails the export half-way.
    let blob = fx.image.payload_blob("kernel.efi");
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&blob)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, CHUNK + 5).unwrap();
    f.write_all_at(&[b[0] ^ 0xff], CHUNK + 5).unwrap();

    fx.refused(&out, &[], &["chunk 1", "disk.raw (left as it was)"]);
    assert_eq!(state(&out), before);
    assert_eq!(fx.names(), names, "no temporary file left");

    // A new path stays absent.
    let new = fx.path("new.raw");
    fx.refused(&new, &[], &["chunk 1"]);
    assert!(!new.exists());
    assert_eq!(fx.names(), names);
}

#[test]
fn devices_fifos_directories_and_symlinks_are_refused_untouched() {
    let fx = Fixture::new();
    let fifo = fx.path("fifo");
    mknod(&fifo, libc::S_IFIFO | 0o644, 0);
    // A null device of the test's own, never the machine's.
    let null = fx.path("null");
    mknod(&null, libc::S_IFCHR | 0o666, libc::makedev(1, 3));
    let dir = fx.path("dir");
    fs::create_dir(&dir).unwrap();
    let target = fx.path("target.raw");
    fs::write(&target, b"keep").unwrap();
    let link = fx.path("link.raw");
    std::os::unix::fs::symlink(&target, &link).unwrap();

    for (path, kind) in [
        (&fifo, "is a FIFO"),
        (&null, "is a character device"),
        (&dir, "is a directory"),
        (&link, "is a symbolic link"),
    ] {
        let before = state(path);
        let names = fx.names();
        fx.refused(path, &[], &[&path.display().to_string(), kind]);
        // The mode holds the file type: a FIFO is still one, a device too.
        assert_eq!(state(path), before, "{}", path.display());
        assert_eq!(fx.names(), names, "nothing made for {}", path.display());
    }
    assert_eq!(fs::read(&target).unwrap(), b"keep");
}

#[test]
fn the_overlay_a_layer_or_a_payload_blob_as_output_is_refused_untouched() {
    let fx = Fixture::new();
    let overlay = fx.overlay("node.overlay");
    let over = overlay.display().to_string();

    // --overlay F --output F.
    let before = state(&overlay);
    fx.refused(&overlay, &["--overlay", &over], &["is the overlay", &over]);
    assert_eq!(state(&overlay), before);
    run_ok(Command::new(ociblk_bin()).args(["overlay", "info", &over]));

    // The same file under another name.
    let alias = fx.path("alias.raw");
    fs::hard_link(&overlay, &alias).unwrap();
    fx.refused(&alias, &["--overlay", &over], &["is the overlay"]);
    assert_eq!(state(&overlay), before);
    fs::remove_file(&alias).unwrap();

    // A layer under the overlay.
    let layer = fx.path("node.layer");
    run_ok(Command::new(ociblk_bin()).args([
        "overlay",
        "freeze",
        &over,
        &layer.display().to_string(),
    ]));
    let layer_before = state(&layer);
    fx.refused(
        &layer,
        &["--overlay", &over],
        &["is a layer under the overlay"],
    );
    assert_eq!(state(&layer), layer_before);
    run_ok(Command::new(ociblk_bin()).args(["overlay", "verify", &over]));

    // A payload blob (the image's blobs are symbolic links to the
    // payload files, as upstream writes them), with and without --overlay.
    let link = fx.image.payload_blob("system");
    let blob = fs::canonicalize(&link).unwrap();
    let (link_before, blob_before) = (state(&link), state(&blob));
    fx.refused(&link, &[], &["is a symbolic link"]);
    fx.refused(&blob, &[], &["is the blob of payload \"system\""]);
    fx.refused(
        &blob,
        &["--overlay", &over],
        &["is the blob of payload \"system\""],
    );
    assert_eq!((state(&link), state(&blob)), (link_before, blob_before));
}
