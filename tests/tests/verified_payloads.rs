//! Payload bytes are checked against the image's chunk hashes before any is
//! served (`ociblk serve`, through the Rust vhost-user client), exported
//! (`ociblk export`) or reported good (`ociblk verify`).

#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ociblk_client::{BlkStatus, ClientOptions, VhostBlkClient};
use ociblk_layout::{DiskParams, Layout, OsImage};
use ociblk_tests::node::TestNode;
use ociblk_tests::oci::{ImageBuilder, WrittenImage, sha256_hex};
use ociblk_tests::process::Server;
use ociblk_tests::support::{ociblk_bin, payload_disk_offsets, run_err, run_ok};

/// Small chunks keep the images small while still having many chunks.
const CHUNK: u64 = 64 << 10;
/// Five whole chunks and a short sixth one.
const SYSTEM_SIZE: usize = 5 * CHUNK as usize + 1000;
const KERNEL_SIZE: usize = 3 * CHUNK as usize + 123;
const SEED: &str = "verify";
const DISK: &[&str] = &["--disk-size", "256MiB", "--system-size", "16MiB"];

struct Fixture {
    /// Holds the image.
    dir: tempfile::TempDir,
    image: WrittenImage,
    node: TestNode,
    system: Vec<u8>,
    kernel: Vec<u8>,
    layout: Layout,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let mut builder = ImageBuilder::with_sizes(SYSTEM_SIZE, KERNEL_SIZE);
        builder.chunk_size = CHUNK;
        let system = builder.payloads[0].data.clone();
        let kernel = builder.payloads[1].data.clone();
        let image = builder.write(&dir.path().join("image")).unwrap();
        let os = OsImage::open(&image.dir).unwrap();
        let mut params = DiskParams::new(SEED);
        params.disk_size = 256 << 20;
        params.system_size = 16 << 20;
        let layout = Layout::build(&os, &params).unwrap();
        let node = TestNode::with_image(&image.dir, SEED).layout(DISK);
        Fixture {
            dir,
            image,
            node,
            system,
            kernel,
            layout,
        }
    }

    fn serve(&self, extra: &[&str]) -> Server {
        self.node.serve(extra)
    }

    fn connect(&self) -> VhostBlkClient {
        self.node.connect(ClientOptions::default())
    }

    fn blob(&self, payload: &str) -> PathBuf {
        self.image.payload_blob(payload)
    }

    /// Disk offsets where byte `at` of payload `name` is served (the kernel
    /// appears twice on the ESP: boot-a.efi and BOOTx64.EFI).
    fn disk_offsets(&self, name: &str, at: u64) -> Vec<u64> {
        payload_disk_offsets(&self.layout, name, at)
    }
}

/// Flips one bit of byte `at` of `path`, in place.
fn flip(path: &Path, at: u64) {
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x10;
    f.write_all_at(&b, at).unwrap();
}

fn read(c: &mut VhostBlkClient, offset: u64, len: u32) -> (BlkStatus, Vec<u8>) {
    let done = c.read(0, offset, len).unwrap();
    (done.status, done.data)
}

#[test]
fn flipped_system_byte_is_never_served_and_recovers_when_fixed() {
    let fx = Fixture::new();
    let k = 2u64;
    let bad_at = k * CHUNK + 777;
    flip(&fx.blob("system"), bad_at);
    let server = fx.serve(&[]);
    let mut c = fx.connect();
    let base = fx.disk_offsets("system", 0)[0];

    // The bad chunk: a read of one sector of it, and a read spanning it.
    let (status, _) = read(&mut c, base + k * CHUNK, 512);
    assert_eq!(status, BlkStatus::IoErr);
    let (status, _) = read(&mut c, base + CHUNK, 3 * CHUNK as u32);
    assert_eq!(status, BlkStatus::IoErr, "a read spanning the bad chunk");
    let expected = sha256_hex(&fx.system[(k * CHUNK) as usize..((k + 1) * CHUNK) as usize]);
    let line = server.wait_for_line(&[
        "failed verification",
        &format!("image={}", fx.image.dir.display()),
        "payload=system",
        &format!("blob={}", fx.blob("system").display()),
        "chunk=2",
        &format!("bytes={}..{}", k * CHUNK, (k + 1) * CHUNK),
        &format!("expected_sha256={expected}"),
        "actual_sha256=",
    ]);
    assert!(
        !line.contains(&format!("actual_sha256={expected}")),
        "{line}"
    );

    // Every other chunk, including the short last one, is served right.
    for chunk in (0..6u64).filter(|&c| c != k) {
        let start = chunk * CHUNK;
        let end = (start + CHUNK).min(SYSTEM_SIZE as u64);
        // Whole sectors: the last one runs into the partition's zeros.
        let len = (end - start).div_ceil(512) * 512;
        let (status, data) = read(&mut c, base + start, len as u32);
        assert_eq!(status, BlkStatus::Ok, "chunk {chunk}");
        assert!(
            data[..(end - start) as usize] == fx.system[start as usize..end as usize],
            "chunk {chunk} differs"
        );
        assert!(data[(end - start) as usize..].iter().all(|&b| b == 0));
    }
    // Still refused: a failed chunk is not remembered as good.
    assert_eq!(
        read(&mut c, base + k * CHUNK + 4096, 4096).0,
        BlkStatus::IoErr
    );
    // A write of part of an overlay block over the bad chunk needs the base
    // bytes around it: refused too, nothing written.
    let done = c
        .write(0, base + bad_at - bad_at % 512, &[0u8; 512])
        .unwrap();
    assert_eq!(
        done.status,
        BlkStatus::IoErr,
        "partial-block write over the bad chunk"
    );

    // Fixing the blob on disk makes the next read succeed, no restart.
    flip(&fx.blob("system"), bad_at);
    let (status, data) = read(&mut c, base + k * CHUNK, CHUNK as u32);
    assert_eq!(status, BlkStatus::Ok);
    assert!(data == fx.system[(k * CHUNK) as usize..((k + 1) * CHUNK) as usize]);

    // At exit the server says how much it verified.
    drop(c);
    let mut server = server;
    server.stop_cleanly(Duration::from_secs(30), "stopping");
    server.wait_for_line(&[
        "payload verification",
        "payload=system",
        "chunks=6",
        "verified=6",
    ]);
}

#[test]
fn flipped_kernel_byte_is_refused_in_both_esp_files() {
    let fx = Fixture::new();
    let bad_at = CHUNK + 5;
    flip(&fx.blob("kernel.efi"), bad_at);
    let server = fx.serve(&[]);
    let mut c = fx.connect();
    let copies = fx.disk_offsets("kernel.efi", bad_at);
    assert_eq!(copies.len(), 2, "boot-a.efi and BOOTx64.EFI map the kernel");
    for at in copies {
        let sector = at - at % 512;
        assert_eq!(read(&mut c, sector, 512).0, BlkStatus::IoErr, "at {at}");
    }
    server.wait_for_line(&["failed verification", "payload=kernel.efi", "chunk=1"]);
    // Chunk 0 and the short last chunk of the kernel are fine in both files.
    for at in [0, 3 * CHUNK] {
        for off in fx.disk_offsets("kernel.efi", at) {
            let (status, data) = read(&mut c, off, 512);
            assert_eq!(status, BlkStatus::Ok);
            let n = (KERNEL_SIZE as u64 - at).min(512) as usize;
            assert!(data[..n] == fx.kernel[at as usize..at as usize + n]);
        }
    }
}

#[test]
fn no_verify_serves_the_flipped_byte() {
    let fx = Fixture::new();
    let bad_at = 3 * CHUNK + 10;
    flip(&fx.blob("system"), bad_at);
    let server = fx.serve(&["--no-verify"]);
    server.wait_for_line(&["--no-verify"]);
    let mut c = fx.connect();
    let base = fx.disk_offsets("system", 0)[0];
    let (status, data) = read(&mut c, base + 3 * CHUNK, 512);
    assert_eq!(status, BlkStatus::Ok);
    assert_eq!(data[10], fx.system[bad_at as usize] ^ 0x10);
    assert!(!server.log.text().contains("failed verification"));
}

#[test]
fn blob_truncated_under_a_running_server() {
    let fx = Fixture::new();
    let server = fx.serve(&[]);
    let mut c = fx.connect();
    let base = fx.disk_offsets("system", 0)[0];
    assert_eq!(read(&mut c, base, 512).0, BlkStatus::Ok);
    let blob = fs::OpenOptions::new()
        .write(true)
        .open(fx.blob("system"))
        .unwrap();
    blob.set_len(2 * CHUNK + 100).unwrap();
    let (status, _) = read(&mut c, base + 4 * CHUNK, 512);
    assert_eq!(status, BlkStatus::IoErr);
    server.wait_for_line(&["failed verification", "chunk=4", "the blob ends at byte"]);
    let (status, _) = read(&mut c, base + 2 * CHUNK, 512);
    assert_eq!(status, BlkStatus::IoErr, "chunk 2 is cut short");
    // The chunk verified before the truncation is still served.
    let (status, data) = read(&mut c, base, 512);
    assert_eq!(status, BlkStatus::Ok);
    assert!(data == fx.system[..512]);
}

fn verify_cmd(image: &Path) -> Command {
    let mut cmd = Command::new(ociblk_bin());
    cmd.arg("verify").arg("--image").arg(image);
    cmd
}

#[test]
fn verify_command_lists_every_bad_chunk() {
    let fx = Fixture::new();
    let out = run_ok(&mut verify_cmd(&fx.image.dir));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("10 chunks")
            && stdout.contains(&format!("{} bytes", SYSTEM_SIZE + KERNEL_SIZE))
            && stdout.contains("all match")
            && stdout.contains("GB/s"),
        "{stdout}"
    );

    flip(&fx.blob("system"), 5 * CHUNK + 999);
    flip(&fx.blob("kernel.efi"), 7);
    let out = verify_cmd(&fx.image.dir).output().unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let bad: Vec<&str> = stdout.lines().filter(|l| l.starts_with("BAD ")).collect();
    assert_eq!(bad.len(), 2, "{stdout}");
    assert!(
        bad[0].contains("\"system\"")
            && bad[0].contains(&format!("chunk 5 (bytes {}..{SYSTEM_SIZE})", 5 * CHUNK)),
        "{stdout}"
    );
    assert!(
        bad[1].contains("\"kernel.efi\"") && bad[1].contains("chunk 0 (bytes 0.."),
        "{stdout}"
    );
    assert!(stdout.contains("2 bad"), "{stdout}");
    assert!(stderr.contains("2 of 10 chunks"), "{stderr}");
}

#[test]
fn verify_command_refuses_a_short_blob() {
    let fx = Fixture::new();
    let blob = fs::OpenOptions::new()
        .write(true)
        .open(fx.blob("system"))
        .unwrap();
    blob.set_len(SYSTEM_SIZE as u64 - 1).unwrap();
    let err = run_err(&mut verify_cmd(&fx.image.dir));
    assert!(
        err.contains(&format!("has {} bytes", SYSTEM_SIZE - 1)),
        "{err}"
    );
}

#[test]
fn verify_command_does_not_pass_a_compressed_payload() {
    let (_t, img) = ImageBuilder::with_compressed_system().write_temp();
    let out = verify_cmd(&img.dir).output().unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("payload \"system\": compressed (application/zstd)")
            && stderr.contains("1 compressed payloads were not checked"),
        "{stderr}"
    );
    assert!(
        stdout.contains("1 chunks, 1000 bytes of 1 payloads"),
        "{stdout}"
    );
}

fn export(fx: &Fixture, extra: &[&str]) -> (std::process::Output, PathBuf) {
    let out = fx.dir.path().join("disk.raw");
    let o = Command::new(ociblk_bin())
        .arg("export")
        .args(fx.node.layout_args())
        .arg("--output")
        .arg(&out)
        .args(extra)
        .output()
        .unwrap();
    (o, out)
}

#[test]
fn export_verifies_what_it_copies() {
    let fx = Fixture::new();
    let (o, out) = export(&fx, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("copied and verified"));
    let base = fx.disk_offsets("system", 0)[0] as usize;
    let disk = fs::read(&out).unwrap();
    assert!(disk[base..base + SYSTEM_SIZE] == fx.system[..]);

    // The disk of the export that failed is not left: its path is new
    // (an existing output stays as it was, see export_output.rs).
    fs::remove_file(&out).unwrap();
    flip(&fx.blob("kernel.efi"), 2 * CHUNK + 1);
    let (o, out) = export(&fx, &[]);
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("\"kernel.efi\"")
            && stderr.contains(&format!("chunk 2 (bytes {}..{})", 2 * CHUNK, 3 * CHUNK))
            && stderr.contains("the image config says"),
        "{stderr}"
    );
    assert!(!out.exists(), "a partial export is removed");

    let (o, out) = export(&fx, &["--no-verify"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--no-verify"));
    assert!(out.exists());
}
