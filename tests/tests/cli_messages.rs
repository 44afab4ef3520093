//! What the README shows the command line saying is what it says: errors
//! that tell the user what to do next, and `overlay info` answering for a
//! valid overlay that holds nothing yet.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use ociblk_layout::{DiskParams, Layout, OsImage};
use ociblk_overlay::{FlushMode, Overlay, OverlayConfig};
use ociblk_tests::node::TestNode;
use ociblk_tests::oci::{ImageBuilder, WrittenImage};
use ociblk_tests::support::{ociblk_bin, run_err, run_ok};
use serde_json::json;

const DISK: &[&str] = &["--disk-size", "256MiB", "--system-size", "16MiB"];

fn ociblk(args: &[&str]) -> Command {
    let mut cmd = Command::new(ociblk_bin());
    cmd.args(args);
    cmd
}

fn image(dir: &Path) -> WrittenImage {
    ImageBuilder::with_sizes(100_000, 50_000)
        .write(&dir.join("image"))
        .unwrap()
}

/// A new overlay for `seed`'s disk of `image` with one block zeroed (so
/// it holds a write), closed.
fn overlay_with_a_write(image: &Path, seed: &str, path: &Path) {
    let mut params = DiskParams::new(seed);
    params.disk_size = 256 << 20;
    params.system_size = 16 << 20;
    let layout = Layout::build(&OsImage::open(image).unwrap(), &params).unwrap();
    let cfg = OverlayConfig {
        disk_size: layout.size,
        fingerprint: layout.fingerprint,
        flush: FlushMode::Safe,
    };
    let overlay = Overlay::open(path, cfg).unwrap();
    let base = |_: u64, buf: &mut [u8]| {
        buf.fill(0);
        Ok(())
    };
    overlay.write_zeroes(200 << 20, 4096, &base).unwrap();
    overlay.close().unwrap();
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_bare_path_as_a_layer_digest_gets_the_message_the_readme_shows() {
    let dir = tempfile::tempdir().unwrap();
    let mut img = image(dir.path());
    img.edit_manifest(|m| m["layers"][1]["digest"] = json!("../../etc"))
        .unwrap();
    let image = img.dir.display().to_string();
    let err = run_err(&mut ociblk(&["inspect", "--image", &image]));
    let want = format!(
        "ociblk: error: cannot read OS image {image}: {image}/blobs/sha256/{}: \
         layers[1].digest: \"../../etc\" is not a sha256 digest (sha256:<64 hex digits>)",
        img.manifest_digest
    );
    assert!(err.contains(&want), "{err}");
}

#[test]
fn overlay_info_on_an_empty_file_answers_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("node.overlay");
    fs::write(&empty, b"").unwrap();
    let path = empty.display().to_string();
    let text = stdout(&run_ok(&mut ociblk(&["overlay", "info", &path])));
    assert!(
        text.contains("has no header yet") && text.contains("initialises it"),
        "{text}"
    );
    let out = run_ok(&mut ociblk(&["overlay", "info", "--json", &path]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["initialised"], json!(false), "{v}");
    assert_eq!(v["file"], json!(path));
    // Still empty: info only reads.
    assert_eq!(fs::metadata(&empty).unwrap().len(), 0);
    // A file that is no overlay is still an error.
    fs::write(&empty, b"not an overlay").unwrap();
    let err = run_err(&mut ociblk(&["overlay", "info", &path]));
    assert!(err.contains("is corrupt"), "{err}");
}

#[test]
fn an_overlay_of_another_disk_says_that_a_reset_discards_every_write() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let overlay = dir.path().join("node.overlay");
    overlay_with_a_write(&img.dir, "one", &overlay);
    let before = fs::read(&overlay).unwrap();
    // The disk of another seed, as after a tag moved to another image.
    let node = TestNode::with_image(&img.dir, "two").layout(DISK);
    let err = run_err(
        ociblk(&["export", "--output"])
            .arg(dir.path().join("disk.raw"))
            .arg("--overlay")
            .arg(&overlay)
            .args(node.layout_args()),
    );
    assert!(
        err.contains("was made for a different disk")
            && err.contains(&format!("ociblk overlay reset {}", overlay.display()))
            && err.contains("discards every write"),
        "{err}"
    );
    assert_eq!(fs::read(&overlay).unwrap(), before);
}

#[test]
fn a_missing_layer_says_how_to_name_it_where_it_is_now() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let node = TestNode::with_image(&img.dir, "node").layout(DISK);
    let overlay = node.overlay();
    overlay_with_a_write(&img.dir, "node", &overlay);
    let layer = dir.path().join("node.layer");
    node.overlay_freeze(&layer);
    let moved: PathBuf = dir.path().join("moved.layer");
    fs::rename(&layer, &moved).unwrap();

    let err = run_err(&mut node.serve_command(&node.socket(), &overlay));
    assert!(
        err.contains(&format!("layer {} is missing", layer.display()))
            && err.contains("--layer NEWPATH"),
        "{err}"
    );
    // And the hint holds: named where it is now, the layer serves.
    let moved_arg = moved.display().to_string();
    let mut server = node.serve(&["--layer", &moved_arg]);
    server.stop_cleanly(Duration::from_secs(20), "serving over the moved layer");
}

#[test]
fn launch_from_a_directory_that_is_no_snapshot_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("fork");
    let err = run_err(
        ociblk(&["launch", "--from"])
            .arg(dir.path())
            .arg("--state-dir")
            .arg(&state),
    );
    assert!(
        err.contains(&format!(
            "{} is not a snapshot directory",
            dir.path().display()
        )) && err.contains("cluster.json"),
        "{err}"
    );
    assert!(!state.exists());
}
