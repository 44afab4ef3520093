//! `ociblk serve` checks its socket before it creates any file: a
//! `--socket` that is a regular file, in use by another server, in a
//! missing directory or too long fails the start and leaves no overlay
//! (and no lock file) behind.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::Path;
use std::time::Duration;

use ociblk_client::BlkStatus;
use ociblk_tests::node::TestNode;
use ociblk_tests::oci::ImageBuilder;
use ociblk_tests::support::run_bounded;

const DISK: &[&str] = &["--disk-size", "256MiB", "--system-size", "16MiB"];

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Runs `ociblk serve` on `socket` with a new overlay in the node's
/// directory, expects it to fail with `want`, and checks that it created
/// nothing there.
fn refused(node: &TestNode, socket: &Path, want: &str) {
    let before = names(node.dir());
    let overlay = node.dir().join("new.overlay");
    let out = run_bounded(
        &mut node.serve_command(socket, &overlay),
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve on {socket:?} started");
    assert!(stderr.contains(want), "{want:?} not in: {stderr}");
    assert!(!overlay.exists(), "{} was created", overlay.display());
    assert_eq!(names(node.dir()), before, "files left behind");
}

fn node() -> (tempfile::TempDir, TestNode) {
    let (dir, image) = ImageBuilder::with_sizes(100_000, 50_000).write_temp();
    let node = TestNode::with_image(&image.dir, "args").layout(DISK);
    (dir, node)
}

#[test]
fn a_socket_that_is_a_regular_file_is_refused_before_the_overlay_is_made() {
    let (_image, node) = node();
    let file = node.dir().join("file.sock");
    fs::write(&file, b"not a socket").unwrap();
    refused(&node, &file, "exists and is not a socket");
    assert_eq!(fs::read(&file).unwrap(), b"not a socket");
}

#[test]
fn a_socket_in_use_by_another_server_is_refused_before_the_overlay_is_made() {
    let (_image, node) = node();
    let mut server = node.serve(&[]);
    refused(&node, &node.socket(), "is in use by another server");
    // The first server still serves.
    let mut client = node.connect(Default::default());
    let done = client.read(0, 0, 512).unwrap();
    assert_eq!(done.status, BlkStatus::Ok);
    drop(client);
    server.stop_cleanly(Duration::from_secs(20), "after the refused second server");
}

#[test]
fn a_socket_in_a_missing_directory_is_refused_before_the_overlay_is_made() {
    let (_image, node) = node();
    let socket = node.dir().join("missing").join("node.sock");
    refused(&node, &socket, "does not exist");
    assert!(!node.dir().join("missing").exists());
}

#[test]
fn a_socket_path_too_long_is_refused_before_the_overlay_is_made() {
    let (_image, node) = node();
    let long = node.dir().join("s".repeat(120));
    refused(&node, &long, "a Unix socket path holds at most 107 bytes");
}
