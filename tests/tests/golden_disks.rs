//! Whole-disk sha256 of `ociblk export` for fixed inputs and pinned IDs,
//! against disks that Monogon's installer code (`metropolis/installer`,
//! `osbase/gpt`, `osbase/fat32` at upstream commit 8b9bf216) wrote for the
//! very same inputs. Input files are generated from fixed seeds
//! (`pseudo_random`), so the hashes below are stable. The layout
//! fingerprint and the digests `inspect --json` reports are pinned too.

#![allow(clippy::unwrap_used)]

use std::fs::{self, File};
use std::io::Read;
use std::process::Command;

use ociblk_tests::node::PINNED_IDS;
use ociblk_tests::oci::{ImageBuilder, PayloadSpec, pseudo_random};
use ociblk_tests::support::{ociblk_bin, run_ok};
use sha2::{Digest, Sha256};

struct Golden {
    disk_size: u64,
    esp_mib: u64,
    system_mib: u64,
    kernel: usize,
    system: usize,
    loader: Option<usize>,
    params: Option<usize>,
    data: bool,
    sha256: &'static str,
}

fn check(g: &Golden) {
    let t = tempfile::tempdir().unwrap();
    let mut b = ImageBuilder::with_sizes(0, 0);
    b.payloads = vec![
        PayloadSpec::plain("system", pseudo_random(g.system, 1)),
        PayloadSpec::plain("kernel.efi", pseudo_random(g.kernel, 2)),
    ];
    let img = b.write(&t.path().join("img")).unwrap();
    let out = t.path().join("disk.raw");
    let mut cmd = Command::new(ociblk_bin());
    cmd.arg("export")
        .arg("--image")
        .arg(&img.dir)
        .arg("--output")
        .arg(&out)
        .args(["--disk-size", &g.disk_size.to_string()])
        .args(["--esp-size", &format!("{}MiB", g.esp_mib)])
        .args(["--system-size", &format!("{}MiB", g.system_mib)])
        .args(PINNED_IDS);
    if let Some(n) = g.loader {
        let p = t.path().join("loader.efi");
        fs::write(&p, pseudo_random(n, 9)).unwrap();
        cmd.arg("--abloader").arg(p);
    }
    if let Some(n) = g.params {
        let p = t.path().join("parameters.pb");
        fs::write(&p, pseudo_random(n, if n == 1 { 11 } else { 10 })).unwrap();
        cmd.arg("--node-parameters").arg(p);
    }
    if !g.data {
        cmd.arg("--no-data-partition");
    }
    run_ok(&mut cmd);
    let mut f = File::open(&out).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 16 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let got = hex::encode(h.finalize());
    assert_eq!(got, g.sha256, "disk differs from the upstream-written one");
}

#[test]
fn loader_parameters_and_data_partition_on_1_gib() {
    check(&Golden {
        disk_size: 1 << 30,
        esp_mib: 128,
        system_mib: 256,
        kernel: 18000123,
        system: (1 << 20) + 1,
        loader: Some(151234),
        params: Some(3000),
        data: true,
        sha256: "a6fd3f1c731ec717c86c8cdc7055d8ac00fcc5cdf2182ce74b56f55a7979289d",
    });
}

#[test]
fn ha_disk_size_without_data_partition_or_loader() {
    check(&Golden {
        disk_size: 2818572288,
        esp_mib: 128,
        system_mib: 1024,
        kernel: 513,
        system: 4096,
        loader: None,
        params: None,
        data: false,
        sha256: "c3a06a245e3dacce639397c71124164d5d0606d20252c41cbb376c5e1931a832",
    });
}

#[test]
fn smallest_esp_with_one_byte_of_parameters() {
    check(&Golden {
        disk_size: 1 << 30,
        esp_mib: 33,
        system_mib: 256,
        kernel: 4096,
        system: 1 << 20,
        loader: None,
        params: Some(1),
        data: true,
        sha256: "9b78b269d3c1f28759d2cab79599e0a6e5336414b03c0d7a5f5d39cec67823cd",
    });
}

/// What `inspect --json` says about the image's payloads and the disk's
/// source files, and the layout fingerprint (which overlays record to
/// refuse another base): pinned, for they must not change between
/// versions. Paths are left out, they lie in a temporary directory.
#[test]
fn inspect_digests_and_fingerprint_are_pinned() {
    let t = tempfile::tempdir().unwrap();
    let mut b = ImageBuilder::with_sizes(0, 0);
    b.payloads = vec![
        PayloadSpec::plain("system", pseudo_random(4096, 1)),
        PayloadSpec::plain("kernel.efi", pseudo_random(513, 2)),
    ];
    let img = b.write(&t.path().join("img")).unwrap();
    let loader = t.path().join("loader.efi");
    fs::write(&loader, pseudo_random(1000, 9)).unwrap();
    let params = t.path().join("parameters.pb");
    fs::write(&params, pseudo_random(100, 10)).unwrap();
    let out = run_ok(
        Command::new(ociblk_bin())
            .args(["inspect", "--json", "--image"])
            .arg(&img.dir)
            .args(["--disk-size", "1GiB", "--esp-size", "33MiB"])
            .args(["--system-size", "256MiB", "--abloader"])
            .arg(&loader)
            .arg("--node-parameters")
            .arg(&params)
            .args(PINNED_IDS),
    );
    let mut info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for list in ["payloads", "sources"] {
        for item in info[list].as_array_mut().unwrap() {
            item.as_object_mut().unwrap().remove("path").unwrap();
        }
    }
    let shown = serde_json::json!({
        "fingerprint": info["disk"]["fingerprint"],
        "payloads": info["payloads"],
        "sources": info["sources"],
    });
    let system = "50c0063da8615e73b67f88e4023b367bb4932fa0fe41b296115a8107cf8b08f4";
    let kernel = "333cbd0cc94845c982136c45e77228e617a115bd5b9ab1030c102b22027eceb4";
    assert_eq!(
        shown,
        serde_json::json!({
            "fingerprint": "1b565b84295f9e1a64dc8bfaef3885d02111843247359be3e7f13bc43e4cdf5c",
            "payloads": [
                {"name": "system", "size": 4096, "digest": system,
                 "media_type": "application/octet-stream", "hash_chunk_size": 1048576},
                {"name": "kernel.efi", "size": 513, "digest": kernel,
                 "media_type": "application/octet-stream", "hash_chunk_size": 1048576},
            ],
            "sources": [
                {"name": "system", "size": 4096, "sha256": system},
                {"name": "kernel.efi", "size": 513, "sha256": kernel},
                {"name": "abloader", "size": 1000,
                 "sha256": "e51c2e2115343f16ff66368141ce9b6aaa1135df5aaf9520e073b94affec8481"},
                {"name": "node-parameters", "size": 100,
                 "sha256": "f9df143b0fa5cc10700885794f8271831917216625f1f04d1a67dff67f03927d"},
            ],
        })
    );
}
