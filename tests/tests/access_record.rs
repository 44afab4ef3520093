//! `ociblk serve --record-access` and `--prefetch` on a local layout: the
//! record's format as the binary writes and refuses it, and prefetching a
//! local layout by verifying its recorded chunks ahead. The registry cases
//! are in `registry_serve.rs`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ociblk_client::{BlkStatus, ClientOptions};
use ociblk_layout::{DiskParams, Layout, OsImage};
use ociblk_tests::node::{SMALL_DISK, TestNode};
use ociblk_tests::support::{payload_disk_offsets, run_err};

/// `ociblk serve` of `node` with `extra`, expected to fail before serving.
fn serve_err(node: &TestNode, extra: &[&str]) -> String {
    let mut cmd: Command = node.serve_command(&node.socket(), &node.overlay());
    cmd.args(extra);
    let err = run_err(&mut cmd);
    assert!(!node.socket().exists(), "refused, yet the socket exists");
    err
}

fn manifest_digest(node: &TestNode) -> String {
    let image = OsImage::open(node.image()).expect("sample image");
    image.manifest_digest.to_string()
}

fn write(path: &Path, text: &str) -> String {
    std::fs::write(path, text).expect("write record");
    path.display().to_string()
}

#[test]
fn malformed_or_foreign_records_are_refused_naming_the_file_and_line() {
    let node = TestNode::small("rec");
    let manifest = manifest_digest(&node);
    let dir = node.dir();
    let blob = "sha256:".to_owned() + &"0".repeat(64);
    let cases = [
        ("empty", String::new(), "line 1: not an access record"),
        (
            "version",
            "ociblk-access-record 9\n".to_owned(),
            "line 1: \"ociblk-access-record 9\": unknown version",
        ),
        (
            "index",
            format!("ociblk-access-record 1\nmanifest {manifest}\n{blob} x\n"),
            "line 3: chunk index \"x\"",
        ),
        (
            "repeat",
            format!("ociblk-access-record 1\nmanifest {manifest}\n{blob} 1\n{blob} 1\n"),
            "line 4: chunk 1 of sha256:0000",
        ),
        (
            "other",
            format!("ociblk-access-record 1\nmanifest {blob}\n"),
            "made for the image with manifest sha256:0000",
        ),
    ];
    for (name, text, needle) in cases {
        let path = write(&dir.join(name), &text);
        let err = serve_err(&node, &["--prefetch", &path]);
        assert!(
            err.contains(&format!("access record {path}")) && err.contains(needle),
            "{name}: {err}"
        );
    }
    let fine = write(
        &dir.join("fine"),
        &format!("ociblk-access-record 1\nmanifest {manifest}\n"),
    );
    let err = serve_err(&node, &["--prefetch", &fine, "--no-verify"]);
    assert!(err.contains("--no-verify"), "{err}");
    let err = serve_err(&node, &["--record-access", dir.to_str().expect("utf-8")]);
    assert!(err.contains("is a directory"), "{err}");
}

#[test]
fn a_local_layout_records_first_reads_and_prefetches_by_verifying_ahead() {
    let node = TestNode::small("rec");
    let record = node.dir().join("boot.access");
    let record_arg = record.display().to_string();
    let mut server = node.serve(&["--record-access", &record_arg]);
    let mut params = DiskParams::new("rec");
    params.disk_size = 512 << 20;
    params.system_size = 64 << 20;
    assert_eq!(
        SMALL_DISK,
        ["--disk-size", "512MiB", "--system-size", "64MiB"]
    );
    let layout =
        Layout::build(&OsImage::open(node.image()).expect("image"), &params).expect("layout");
    let system0 = payload_disk_offsets(&layout, "system", 0)[0];
    let mut c = node.connect(ClientOptions::default());
    for _ in 0..3 {
        assert_eq!(
            c.read(0, system0, 4096).expect("read").status,
            BlkStatus::Ok
        );
    }
    drop(c);
    server.stop_cleanly(Duration::from_secs(20), "after recording");
    server.wait_for_line(&["access record written", "chunks=1"]);
    let text = std::fs::read_to_string(&record).expect("record");
    let system = layout
        .sources
        .iter()
        .find(|s| s.name == "system")
        .expect("system payload");
    assert!(
        text.starts_with(&format!(
            "ociblk-access-record 1\nmanifest {}\n",
            manifest_digest(&node)
        )) && text.ends_with(&format!("sha256:{} 0\n", system.digest.hex())),
        "{text}"
    );

    // Replayed: the chunk is verified before any guest read.
    let mut server = node.serve(&["--prefetch", &record_arg]);
    let line = server.wait_for_line(&["prefetch done"]);
    assert!(
        line.contains("chunks=1")
            && line.contains("already_present=1")
            && line.contains("failed=0"),
        "{line}"
    );
    server.stop_cleanly(Duration::from_secs(20), "after prefetching");
    server.wait_for_line(&[
        "payload verification",
        "payload=system",
        "verified=1",
        "hashed=1",
    ]);
}
