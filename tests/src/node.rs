//! One test node: a temp directory holding its socket, overlay and exports,
//! the OS image and the seed its disk is computed from, and the commands
//! tests run on it (`ociblk serve`, `inspect`, `export`, a client, a guest).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use ociblk_client::{ClientOptions, VhostBlkClient};
use ociblk_launch::{OVERLAY_FILE, SOCKET_FILE};
use serde_json::Value;

use crate::process::{Boot, GuestConfig, Server};
use crate::support::{copy_sample_image, ociblk_bin, run_ok, sample_image};

/// A small disk, so that whole-disk comparisons stay quick.
pub const SMALL_DISK: &[&str] = &["--disk-size", "512MiB", "--system-size", "64MiB"];

/// Fixed disk and partition GUIDs and FAT volume ID, for byte-exact disks.
pub const PINNED_IDS: &[&str] = &[
    "--disk-guid",
    "11111111-2222-4333-8444-555555555555",
    "--esp-guid",
    "A1111111-2222-4333-8444-555555555555",
    "--system-a-guid",
    "B1111111-2222-4333-8444-555555555555",
    "--system-b-guid",
    "C1111111-2222-4333-8444-555555555555",
    "--data-guid",
    "D1111111-2222-4333-8444-555555555555",
    "--fat-volume-id",
    "0xCAFEF00D",
];

/// Bytes per sector of the disk's LBAs.
const SECTOR: u64 = 512;

/// One node of a test.
#[derive(Debug)]
pub struct TestNode {
    dir: tempfile::TempDir,
    image: PathBuf,
    seed: String,
    /// Layout options after `--image` and `--seed`.
    layout: Vec<String>,
    /// The overlay, if not in the temp directory.
    overlay: Option<PathBuf>,
}

impl TestNode {
    /// A node of the sample image with the default (full-size) disk.
    pub fn new(seed: &str) -> TestNode {
        let image = sample_image()
            .canonicalize()
            .expect("the sample image path resolves");
        TestNode::with_image(&image, seed)
    }

    /// A node of the sample image on a [`SMALL_DISK`].
    pub fn small(seed: &str) -> TestNode {
        TestNode::new(seed).layout(SMALL_DISK)
    }

    /// A node of its own copy of the sample image (regular files, in the
    /// node's temp directory), which the test may change.
    pub fn with_sample_copy(seed: &str) -> TestNode {
        let mut node = TestNode::new(seed);
        node.image = copy_sample_image(node.dir());
        node
    }

    /// A node of `image`.
    pub fn with_image(image: &Path, seed: &str) -> TestNode {
        TestNode {
            dir: tempfile::tempdir().expect("temp dir"),
            image: image.to_owned(),
            seed: seed.to_owned(),
            layout: Vec::new(),
            overlay: None,
        }
    }

    /// Adds layout options (`--disk-size`, ...) to every command.
    pub fn layout(mut self, args: &[&str]) -> TestNode {
        self.layout.extend(args.iter().map(|s| s.to_string()));
        self
    }

    /// The OS image.
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// Keeps the overlay at `path` instead of in the temp directory.
    pub fn overlay_at(mut self, path: &Path) -> TestNode {
        self.overlay = Some(path.to_owned());
        self
    }

    /// The node's temp directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn socket(&self) -> PathBuf {
        self.dir().join(SOCKET_FILE)
    }

    pub fn overlay(&self) -> PathBuf {
        self.overlay
            .clone()
            .unwrap_or_else(|| self.dir().join(OVERLAY_FILE))
    }

    /// `--image`, `--seed` and the layout options.
    pub fn layout_args(&self) -> Vec<String> {
        let mut v = vec![
            "--image".to_owned(),
            self.image.display().to_string(),
            "--seed".to_owned(),
            self.seed.clone(),
        ];
        v.extend(self.layout.iter().cloned());
        v
    }

    /// Starts `ociblk serve` on the node's socket and overlay, with `extra`
    /// options.
    pub fn serve(&self, extra: &[&str]) -> Server {
        self.serve_on(&self.socket(), extra)
    }

    /// Starts `ociblk serve` on `socket` and the node's overlay, with `extra`
    /// options.
    pub fn serve_on(&self, socket: &Path, extra: &[&str]) -> Server {
        self.serve_files(socket, &self.overlay(), extra)
    }

    /// Starts `ociblk serve` on `socket` and `overlay`, with `extra` options.
    pub fn serve_files(&self, socket: &Path, overlay: &Path, extra: &[&str]) -> Server {
        self.serve_files_with_env(socket, overlay, extra, &[])
    }

    /// [`serve_files`](Self::serve_files) with `env` added to the
    /// server's environment.
    pub fn serve_files_with_env(
        &self,
        socket: &Path,
        overlay: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        let mut args = self.layout_args();
        args.push("--overlay".into());
        args.push(overlay.display().to_string());
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Server::start_with_env(socket, &args, env)
    }

    /// The `ociblk serve` command for the node on `socket` and `overlay`, not
    /// started: for runs expected to fail.
    pub fn serve_command(&self, socket: &Path, overlay: &Path) -> Command {
        let mut cmd = Command::new(ociblk_bin());
        cmd.arg("serve")
            .args(self.layout_args())
            .arg("--socket")
            .arg(socket)
            .arg("--overlay")
            .arg(overlay);
        cmd
    }

    /// Connects the vhost-user-blk client to the node's socket.
    pub fn connect(&self, opts: ClientOptions) -> VhostBlkClient {
        VhostBlkClient::connect(&self.socket(), opts)
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.socket().display()))
    }

    /// `ociblk inspect --json`.
    pub fn inspect(&self) -> Value {
        let out = run_ok(
            Command::new(ociblk_bin())
                .args(["inspect", "--json"])
                .args(self.layout_args()),
        );
        serde_json::from_slice(&out.stdout).expect("inspect --json prints JSON")
    }

    /// First byte of partition `index` (0-based).
    pub fn partition_offset(&self, index: usize) -> u64 {
        let info = self.inspect();
        let lba = info["partitions"][index]["first_lba"]
            .as_u64()
            .unwrap_or_else(|| panic!("inspect shows no partition {index}:\n{info:#}"));
        lba * SECTOR
    }

    /// `ociblk overlay info` of the node's overlay, as text.
    pub fn overlay_info(&self) -> String {
        let out = run_ok(
            Command::new(ociblk_bin())
                .args(["overlay", "info"])
                .arg(self.overlay()),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ociblk overlay info --json` of the node's overlay.
    pub fn overlay_info_json(&self) -> Value {
        let out = run_ok(
            Command::new(ociblk_bin())
                .args(["overlay", "info", "--json"])
                .arg(self.overlay()),
        );
        serde_json::from_slice(&out.stdout).expect("overlay info --json prints JSON")
    }

    /// `ociblk overlay freeze` of the node's overlay into `layer`.
    pub fn overlay_freeze(&self, layer: &Path) {
        run_ok(
            Command::new(ociblk_bin())
                .args(["overlay", "freeze"])
                .arg(self.overlay())
                .arg(layer),
        );
    }

    /// `ociblk overlay reset` of the node's overlay.
    pub fn overlay_reset(&self) {
        run_ok(
            Command::new(ociblk_bin())
                .args(["overlay", "reset"])
                .arg(self.overlay()),
        );
    }

    /// `ociblk export` (with the overlay, if asked) into the temp dir.
    pub fn export(&self, with_overlay: bool) -> PathBuf {
        let out = self.dir().join("export.raw");
        let mut cmd = Command::new(ociblk_bin());
        cmd.arg("export")
            .args(self.layout_args())
            .arg("--output")
            .arg(&out);
        if with_overlay {
            cmd.arg("--overlay").arg(self.overlay());
        }
        run_ok(&mut cmd);
        out
    }

    /// The bytes of [`export`](Self::export), the file removed again.
    pub fn export_bytes(&self, with_overlay: bool) -> Vec<u8> {
        let out = self.export(with_overlay);
        let bytes = fs::read(&out).expect("read the export");
        fs::remove_file(&out).expect("remove the export");
        bytes
    }

    /// A QEMU guest on the node's socket.
    pub fn guest_config(&self, boot: Boot) -> GuestConfig {
        GuestConfig::new(&self.socket(), boot)
    }
}
