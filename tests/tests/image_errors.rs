//! Bad OS images and impossible disks get errors that name the file and
//! field at fault.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::Path;
use std::process::Command;

use ociblk_digest::Digest;
use ociblk_layout::{DiskParams, Layout, OsImage};
use ociblk_tests::oci::{ImageBuilder, PayloadSpec, WrittenImage};
use ociblk_tests::support::{ociblk_bin, run_err};
use serde_json::json;

fn image(dir: &Path) -> WrittenImage {
    ImageBuilder::with_sizes(3 << 20, 100_000)
        .write(dir)
        .unwrap()
}

/// The error of opening the image and laying out a default node disk,
/// with its causes, as the command line prints it.
fn layout_error(dir: &Path) -> String {
    let result = OsImage::open(dir).and_then(|img| Layout::build(&img, &DiskParams::new("n")));
    match result {
        Ok(_) => panic!("image in {} was accepted", dir.display()),
        Err(e) => {
            let mut msg = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                msg.push_str(": ");
                msg.push_str(&c.to_string());
                cause = c.source();
            }
            msg
        }
    }
}

fn assert_contains(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error {msg:?} does not mention {p:?}");
    }
}

/// The valid test image in a fresh temp directory (kept while the guard lives).
fn fresh_image() -> (tempfile::TempDir, WrittenImage) {
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path());
    (t, img)
}

/// Fails unless opening `img` fails with an error naming every one of `parts`.
fn assert_layout_error(img: &WrittenImage, parts: &[&str]) {
    assert_contains(&layout_error(&img.dir), parts);
}

#[test]
fn valid_image_is_accepted() {
    let (_t, img) = fresh_image();
    let os = OsImage::open(&img.dir).unwrap();
    assert_eq!(os.payloads.len(), 2);
    assert_eq!(os.product_info.architecture(), "x86_64");
    Layout::build(&os, &DiskParams::new("n")).unwrap();
}

#[test]
fn missing_index_json() {
    let (_t, img) = fresh_image();
    fs::remove_file(img.index_path()).unwrap();
    assert_layout_error(&img, &["index.json", "No such file"]);
}

#[test]
fn two_manifests() {
    let (_t, img) = fresh_image();
    img.edit_index(|v| {
        let m = v["manifests"][0].clone();
        v["manifests"].as_array_mut().unwrap().push(m);
    })
    .unwrap();
    assert_layout_error(
        &img,
        &["index.json", "manifests", "2 entries", "exactly one"],
    );
}

#[test]
fn wrong_artifact_type() {
    let (_t, mut img) = fresh_image();
    img.edit_manifest(|m| m["artifactType"] = json!("application/vnd.example.other"))
        .unwrap();
    assert_layout_error(
        &img,
        &[
            "artifactType",
            "application/vnd.example.other",
            "application/vnd.monogon.os.image.v1",
            &img.manifest_digest,
        ],
    );
}

#[test]
fn wrong_format_version() {
    let (_t, mut img) = fresh_image();
    img.edit_config(|c| c["format_version"] = json!("2"))
        .unwrap();
    assert_layout_error(&img, &["format_version", "\"2\"", &img.config_digest]);
}

#[test]
fn zstd_payload_is_refused() {
    let (_t, img) = ImageBuilder::with_compressed_system().write_temp();
    assert_layout_error(&img, &["\"system\"", "application/zstd", "uncompressed"]);
}

#[test]
fn missing_system_or_kernel_payload() {
    for missing in ["system", "kernel.efi"] {
        let t = tempfile::tempdir().unwrap();
        let mut b = ImageBuilder::with_sizes(1 << 20, 1000);
        b.payloads.retain(|p| p.name != missing);
        b.payloads.push(PayloadSpec::plain("extra", vec![1, 2, 3]));
        let img = b.write(t.path()).unwrap();
        assert_layout_error(&img, &["no payload", missing]);
    }
}

#[test]
fn blob_size_mismatch() {
    let (_t, img) = fresh_image();
    // Truncate the payload behind the symlink: the descriptor no longer fits.
    let target = fs::canonicalize(img.payload_blob("kernel.efi")).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&target)
        .unwrap()
        .set_len(99_999)
        .unwrap();
    let (_, digest) = &img.payload_digests[1];
    assert_layout_error(&img, &[digest, "99999 bytes", "100000"]);
}

#[test]
fn digests_that_are_paths_are_refused() {
    for bad in [
        "sha256:../../../etc/passwd",
        "sha256:abc/def",
        "sha256:..",
        "md5:0123",
    ] {
        let (_t, mut img) = fresh_image();
        img.edit_manifest(|m| m["layers"][1]["digest"] = json!(bad))
            .unwrap();
        assert_contains(
            &layout_error(&img.dir),
            &["layers[1].digest", &img.manifest_digest],
        );
        img.edit_index(|v| v["manifests"][0]["digest"] = json!(bad))
            .unwrap();
        assert_contains(
            &layout_error(&img.dir),
            &["index.json", "manifests[0].digest"],
        );
    }
}

/// Changes the first byte `from` of the blob `digest` picks to `to` (same
/// size, different content: only the hash can tell) and expects the error
/// to name the blob.
fn expect_sha256_mismatch(digest: impl Fn(&WrittenImage) -> String, from: u8, to: u8) {
    let (_t, img) = fresh_image();
    let digest = digest(&img);
    let path = img.blob(&digest);
    let mut bytes = fs::read(&path).unwrap();
    let i = bytes.iter().position(|&b| b == from).unwrap();
    bytes[i] = to;
    fs::write(&path, bytes).unwrap();
    assert_layout_error(&img, &[&digest, "sha256 of blob is"]);
}

#[test]
fn manifest_sha256_mismatch() {
    expect_sha256_mismatch(|img| img.manifest_digest.clone(), b'2', b'3');
}

#[test]
fn config_sha256_mismatch() {
    expect_sha256_mismatch(|img| img.config_digest.clone(), b'1', b'7');
}

#[test]
fn chunk_hash_count_and_chunk_size() {
    let (_t, mut img) = fresh_image();
    img.edit_config(|c| {
        c["payloads"][0]["chunk_hashes_sha256"]
            .as_array_mut()
            .unwrap()
            .truncate(1)
    })
    .unwrap();
    assert_contains(
        &layout_error(&img.dir),
        &["payloads[0].chunk_hashes_sha256", "has 1 hashes", "need 3"],
    );
    img.edit_config(|c| c["payloads"][0]["hash_chunk_size"] = json!(32 << 20))
        .unwrap();
    assert_contains(&layout_error(&img.dir), &["payloads[0].hash_chunk_size"]);
}

/// The error of computing the layout of node "n" of `img`, with `params`
/// changed from the defaults.
fn layout_build_error(img: &WrittenImage, params: impl FnOnce(&mut DiskParams)) -> String {
    let os = OsImage::open(&img.dir).unwrap();
    let mut p = DiskParams::new("n");
    params(&mut p);
    Layout::build(&os, &p).unwrap_err().to_string()
}

#[test]
fn chunk_hash_that_is_not_unpadded_base64_sha256() {
    for (bad, why) in [
        // Padded: upstream writes base64 without padding.
        ("{h}=", "43 characters"),
        // A sha1-sized digest.
        ("AAAAAAAAAAAAAAAAAAAAAAAAAAA", "43 characters"),
        ("{h43}", "not base64"),
        ("%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%", "not base64"),
    ] {
        let t = tempfile::tempdir().unwrap();
        let mut img = image(t.path());
        img.edit_config(|c| {
            let hashes = &mut c["payloads"][1]["chunk_hashes_sha256"];
            let good = hashes[0].as_str().unwrap().to_owned();
            let value = if bad == "{h43}" {
                // Same length, last character with its unused bits set.
                let last = if good.ends_with('B') { "C" } else { "B" };
                format!("{}{last}", &good[..42])
            } else {
                bad.replace("{h}", &good)
            };
            hashes[0] = json!(value);
        })
        .unwrap();
        let err = layout_error(&img.dir);
        assert_contains(&err, &["payloads[1].chunk_hashes_sha256[0]", why]);
    }
}

#[test]
fn payload_larger_than_its_partition() {
    let t = tempfile::tempdir().unwrap();
    let e = layout_build_error(&image(t.path()), |p| p.system_size = 2 << 20);
    let want = [
        "\"system\"",
        "3145728 bytes",
        "METROPOLIS-SYSTEM-A",
        "2097152",
    ];
    assert_contains(&e, &want);
}

#[test]
fn esp_content_too_large() {
    let t = tempfile::tempdir().unwrap();
    let img = ImageBuilder::with_sizes(1 << 20, 20 << 20)
        .write(t.path())
        .unwrap();
    // kernel twice (boot-a.efi and BOOTx64.EFI) does not fit
    let e = layout_build_error(&img, |p| p.esp_size = 40 << 20);
    assert_contains(&e, &["ESP content too large"]);
}

#[test]
fn disk_too_small_for_the_partitions() {
    let (_t, img) = fresh_image();
    let e = layout_build_error(&img, |p| p.disk_size = 1 << 30);
    assert_contains(
        &e,
        &[
            "disk too small",
            "METROPOLIS-SYSTEM-A",
            "needs 2097152 sectors",
            "1073741824 bytes",
        ],
    );
}

#[test]
fn cli_reports_errors_with_context_and_exit_status() {
    let (_t, img) = fresh_image();
    fs::remove_file(img.index_path()).unwrap();
    let err = run_err(
        Command::new(ociblk_bin())
            .arg("inspect")
            .arg("--image")
            .arg(&img.dir),
    );
    assert_contains(&err, &["ociblk: error: cannot read OS image", "index.json"]);
    let err =
        run_err(Command::new(ociblk_bin()).args(["inspect", "--image", "x", "--disk-size", "5Q"]));
    assert_contains(&err, &["--disk-size", "unknown suffix"]);
    let err = run_err(Command::new(ociblk_bin()).args([
        "inspect",
        "--image",
        "x",
        "--disk-guid",
        "nope",
    ]));
    assert_contains(&err, &["--disk-guid", "invalid GUID"]);
}

/// Opens the layout's image from its manifest and config bytes, as a
/// registry image is opened, with payload files resolved elsewhere.
fn from_verified(img: &WrittenImage) -> ociblk_layout::Result<OsImage> {
    let manifest = fs::read(img.blob(&img.manifest_digest)).unwrap();
    let config = fs::read(img.blob(&img.config_digest)).unwrap();
    OsImage::from_verified(
        "registry.example/os@sha256:x",
        &Digest::from_hex(&img.manifest_digest).unwrap(),
        &manifest,
        &config,
        &|digest| Path::new("/cache/blobs/sha256").join(digest.hex()),
    )
}

#[test]
fn verified_bytes_open_like_the_directory_with_the_same_checks() {
    let t = tempfile::tempdir().unwrap();
    let mut img = image(t.path());
    let from_dir = OsImage::open(&img.dir).unwrap();
    let from_bytes = from_verified(&img).unwrap();
    assert_eq!(from_bytes.manifest_digest, from_dir.manifest_digest);
    assert_eq!(from_bytes.product_info, from_dir.product_info);
    for (a, b) in from_bytes.payloads.iter().zip(&from_dir.payloads) {
        assert_eq!((&a.name, a.size, &a.digest), (&b.name, b.size, &b.digest));
        assert_eq!(a.chunk_hashes, b.chunk_hashes);
        assert_eq!(
            a.path,
            Path::new("/cache/blobs/sha256").join(a.digest.hex())
        );
    }
    // The checks are the directory's, naming the field.
    img.edit_manifest(|m| m["artifactType"] = json!("application/x-other"))
        .unwrap();
    let err = from_verified(&img).unwrap_err().to_string();
    assert_contains(
        &err,
        &["registry.example/os@sha256:x/manifest", "artifactType"],
    );
    // Manifest bytes that are not the digest's are refused.
    let manifest = fs::read(img.blob(&img.manifest_digest)).unwrap();
    let zeros = Digest::from_hex(&"0".repeat(64)).unwrap();
    let err = OsImage::from_verified("r", &zeros, &manifest, b"{}", &|d| d.hex().into())
        .unwrap_err()
        .to_string();
    assert_contains(&err, &["sha256 of blob is", &"0".repeat(64)]);
}
