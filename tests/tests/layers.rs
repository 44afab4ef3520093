//! Frozen layers through the real `ociblk` binary: a node's overlay frozen
//! with `ociblk overlay freeze`, forks served over it with `--layer`,
//! written through the vhost-user client, restarted without `--layer`,
//! exported and verified; and every refusal with its message.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ociblk_client::{BlkStatus, ClientOptions, VhostBlkClient};
use ociblk_overlay::parse_header;
use ociblk_tests::node::{SMALL_DISK, TestNode};
use ociblk_tests::oci::sha256_hex;
use ociblk_tests::process::Server;
use ociblk_tests::support::{ociblk_bin, poke_read_only, run_err, run_ok};

/// Where the tests write: the data partition of the small disk, whose base
/// is zeros, and a block of system A, whose base is payload.
const DATA_AT: u64 = 300 << 20;
const STOP: Duration = Duration::from_secs(20);

/// The test's directory (the node's temp directory) and its node.
struct Env {
    node: TestNode,
}

impl Env {
    fn new() -> Env {
        Env {
            node: TestNode::small("node"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.node.dir().join(name)
    }

    /// `ociblk serve` of seed `node` on `overlay`, with `extra` arguments.
    fn serve(&self, overlay: &Path, extra: &[&str]) -> Server {
        self.node.serve_files(&self.node.socket(), overlay, extra)
    }

    /// Fails unless `ociblk serve` of `seed` on `overlay` fails before
    /// serving with an error holding `want`.
    fn refused(&self, seed: &str, overlay: &Path, extra: &[&str], want: &str) {
        let msg = self.serve_err(seed, overlay, extra);
        assert!(msg.contains(want), "{msg}");
    }

    /// `ociblk serve` that must fail before serving; its stderr.
    fn serve_err(&self, seed: &str, overlay: &Path, extra: &[&str]) -> String {
        let node = TestNode::with_image(self.node.image(), seed).layout(SMALL_DISK);
        run_err(
            node.serve_command(&self.path("refused.sock"), overlay)
                .args(extra)
                .current_dir(self.node.dir()),
        )
    }

    fn ociblk(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(ociblk_bin());
        cmd.args(args).current_dir(self.node.dir());
        cmd
    }

    fn ok(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&run_ok(&mut self.ociblk(args)).stdout).into_owned()
    }

    fn err(&self, args: &[&str]) -> String {
        run_err(&mut self.ociblk(args))
    }

    fn connect(&self) -> VhostBlkClient {
        self.node.connect(ClientOptions::default())
    }

    /// Serves `overlay`, writes `writes`, flushes, stops cleanly.
    fn write_node(&self, overlay: &Path, extra: &[&str], writes: &[(u64, Vec<u8>)]) {
        let mut server = self.serve(overlay, extra);
        let mut c = self.connect();
        for (off, data) in writes {
            let done = c.write(0, *off, data).unwrap();
            assert_eq!(done.status, BlkStatus::Ok, "write at {off}");
        }
        assert_eq!(c.flush(0).unwrap().status, BlkStatus::Ok);
        drop(c);
        server.stop_cleanly(STOP, "stopping");
    }

    /// Serves `overlay` (by its recorded chain) and reads `len` at each offset.
    fn read_node(&self, overlay: &Path, extra: &[&str], at: &[(u64, u32)]) -> Vec<Vec<u8>> {
        let mut server = self.serve(overlay, extra);
        let mut c = self.connect();
        let out = at
            .iter()
            .map(|&(off, len)| {
                let done = c.read(0, off, len).unwrap();
                assert_eq!(done.status, BlkStatus::Ok, "read at {off}");
                done.data
            })
            .collect();
        drop(c);
        server.stop_cleanly(STOP, "stopping");
        out
    }
}

fn sha(path: &Path) -> String {
    sha256_hex(&fs::read(path).unwrap())
}

fn fill(byte: u8, len: usize) -> Vec<u8> {
    vec![byte; len]
}

/// What freeze printed (`out`) and what `overlay info` says of the node
/// frozen into `layer` and of the layer.
fn check_frozen_node(env: &Env, out: &str, layer: &Path) {
    assert!(out.contains("Digest         sha256:"), "{out}");
    assert!(out.contains("Blocks         3 written, 0 zeroed"), "{out}");
    assert_eq!(
        fs::metadata(layer).unwrap().permissions().mode() & 0o777,
        0o400
    );
    let info = env.ok(&["overlay", "info", "node.overlay"]);
    assert!(info.contains("Written        0 blocks"), "{info}");
    assert!(
        info.contains("Layers         1 (bottom first)")
            && info.contains(&layer.display().to_string())
            && info.contains("Chain          ok"),
        "{info}"
    );
    let digest = out
        .lines()
        .find_map(|l| l.strip_prefix("Digest         "))
        .map(str::to_owned);
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["overlay", "info", "--json", "node.overlay"])).unwrap();
    assert_eq!(
        json["chain"][0]["digest"].as_str(),
        digest.as_deref(),
        "{json}"
    );
    assert_eq!(
        json["chain"][0]["path"],
        layer.display().to_string(),
        "{json}"
    );
    assert_eq!(json["chain_problem"], serde_json::Value::Null, "{json}");
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["overlay", "info", "--json", "snap.layer"])).unwrap();
    assert_eq!(json["kind"], "layer", "{json}");
    assert_eq!(json["digest"].as_str(), digest.as_deref(), "{json}");
    assert_eq!(json["parent"], serde_json::Value::Null, "{json}");
    let info = env.ok(&["overlay", "info", "snap.layer"]);
    assert!(info.starts_with("Layer "), "{info}");
    assert!(
        info.contains("Parent         none (the base disk)"),
        "{info}"
    );
}

/// Fork `name`, which wrote `byte` over the first sector of `sys_a` and the
/// second of [`DATA_AT`] over `layer` (where `sys_a` holds `expect_sys_a`),
/// read by its recorded chain, by the same chain given again and by export.
fn check_fork(env: &Env, name: &str, byte: u8, layer: &Path, sys_a: u64, expect_sys_a: &[u8]) {
    let fork = env.path(name);
    let info = env.ok(&["overlay", "info", name]);
    assert!(info.contains(&layer.display().to_string()), "{info}");
    // No --layer: the recorded chain.
    let got = env.read_node(&fork, &[], &[(DATA_AT, 8192), (sys_a, 4096)]);
    let mut want = fill(0xa1, 8192);
    want[512..1024].fill(byte);
    assert_eq!(got[0], want, "{name} keeps its own writes only");
    let mut want = expect_sys_a.to_vec();
    want[..512].fill(byte);
    assert_eq!(got[1], want, "{name} over the payload");
    // The same chain given again is accepted.
    env.read_node(&fork, &["--layer", "snap.layer"], &[(0, 512)]);
    // export --overlay reads through the chain.
    let raw = env.path("export.raw");
    let mut cmd = env.ociblk(&["export"]);
    cmd.args(env.node.layout_args())
        .arg("--output")
        .arg(&raw)
        .arg("--overlay")
        .arg(&fork);
    run_ok(&mut cmd);
    let f = fs::File::open(&raw).unwrap();
    let mut got = vec![0u8; 4096];
    f.read_exact_at(&mut got, sys_a).unwrap();
    assert_eq!(got, want, "export of {name}");
    let mut got = vec![0u8; 1024];
    f.read_exact_at(&mut got, DATA_AT).unwrap();
    assert_eq!(&got[..512], &fill(0xa1, 512)[..]);
    assert_eq!(&got[512..], &fill(byte, 512)[..]);
    fs::remove_file(&raw).unwrap();
}

#[test]
fn a_frozen_node_forks_twice_and_the_forks_diverge_leaving_the_layer_intact() {
    let env = Env::new();
    let node = env.path("node.overlay");
    // Whole blocks, and a sector in the middle of a payload block.
    let sys_a = (129 << 20) + 2 * 4096;
    env.write_node(
        &node,
        &[],
        &[(DATA_AT, fill(0xa1, 8192)), (sys_a + 512, fill(0xa2, 512))],
    );
    let base = env.read_node(&env.path("fresh.overlay"), &[], &[(sys_a, 4096)]);

    let out = env.ok(&["overlay", "freeze", "node.overlay", "snap.layer"]);
    let layer = env.path("snap.layer");
    let layer_sha = sha(&layer);
    check_frozen_node(&env, &out, &layer);

    // Two forks over the layer, given relative to the working directory
    // (which `ociblk serve` inherits; no other test of this file depends
    // on it): the chain records it absolute.
    std::env::set_current_dir(env.node.dir()).unwrap();
    let mut expect_sys_a = base[0].clone();
    expect_sys_a[512..1024].fill(0xa2);
    for (name, byte) in [("fork1.overlay", 0xb1u8), ("fork2.overlay", 0xb2)] {
        let fork = env.path(name);
        let got = env.read_node(
            &fork,
            &["--layer", "snap.layer"],
            &[(DATA_AT, 8192), (sys_a, 4096)],
        );
        assert_eq!(got[0], fill(0xa1, 8192), "{name} sees the frozen writes");
        assert_eq!(
            got[1], expect_sys_a,
            "{name}: a frozen sector over the payload"
        );
        // Partial writes over layer blocks keep the rest from the layer.
        env.write_node(
            &fork,
            &[],
            &[(DATA_AT + 512, fill(byte, 512)), (sys_a, fill(byte, 512))],
        );
    }
    for (name, byte) in [("fork1.overlay", 0xb1u8), ("fork2.overlay", 0xb2)] {
        check_fork(&env, name, byte, &layer, sys_a, &expect_sys_a);
    }
    // The original node goes on over the layer too.
    let got = env.read_node(&node, &[], &[(DATA_AT, 8192)]);
    assert_eq!(got[0], fill(0xa1, 8192));
    assert_eq!(sha(&layer), layer_sha, "the layer is byte-identical");
    let out = env.ok(&["overlay", "verify", "fork1.overlay"]);
    assert!(
        out.contains(&format!("verified {}", layer.display())),
        "{out}"
    );
    // reset forgets the fork's writes, not the chain.
    env.ok(&["overlay", "reset", "fork1.overlay"]);
    let got = env.read_node(&env.path("fork1.overlay"), &[], &[(DATA_AT, 8192)]);
    assert_eq!(got[0], fill(0xa1, 8192));
}

/// Freezing onto an existing file, a layer again, and an overlay in use:
/// refused naming the file (`node`'s overlay, frozen into `l1`).
fn freeze_refusals(env: &Env, node: &Path, l1: &Path) {
    // Freezing onto an existing file, and a layer again.
    let msg = env.err(&["overlay", "freeze", "node.overlay", "l1"]);
    assert!(
        msg.contains(&format!("layer {} already exists", l1.display())),
        "{msg}"
    );
    let msg = env.err(&["overlay", "freeze", "l1", "l3"]);
    assert!(msg.contains("is a frozen layer, not an overlay"), "{msg}");
    // Freezing an overlay in use.
    let mut server = env.serve(node, &[]);
    let msg = env.err(&["overlay", "freeze", "node.overlay", "l3"]);
    assert!(
        msg.contains(&format!(
            "overlay {} is in use by another process",
            node.display()
        )),
        "{msg}"
    );
    assert!(server.stop_with(libc::SIGTERM, STOP).success());
    assert!(!env.path("l3").exists());
}

/// A modified map of `l1`, under `node`, is caught at every start;
/// modified data by verify, which reads it all.
fn modified_layer_refusals(env: &Env, node: &Path, l1: &Path) {
    // A modified map: caught at every start.
    let header = parse_header(&fs::read(l1).unwrap()[..4096]).unwrap();
    let poke = |at: u64, v: u8| poke_read_only(l1, at, v);
    let old = poke(header.map_offset + 3, 2);
    env.refused(
        "node",
        node,
        &[],
        &format!("layer {} was modified", l1.display()),
    );
    let info = env.ok(&["overlay", "info", "node.overlay"]);
    assert!(info.contains("Chain          BROKEN: layer"), "{info}");
    poke(header.map_offset + 3, old);
    // Modified data: found by verify, which reads it all.
    let at = header.data_offset + DATA_AT + 10;
    let old = poke(at, 0x77);
    let msg = env.err(&["overlay", "verify", "node.overlay"]);
    assert!(
        msg.contains(&format!(
            "layer {} was modified: its data does not match its digest",
            l1.display()
        )),
        "{msg}"
    );
    poke(at, old);
    let out = env.ok(&["overlay", "verify", "l1"]);
    assert!(out.contains("verified"), "{out}");
}

#[test]
fn every_refusal_names_the_file() {
    let env = Env::new();
    let node = env.path("node.overlay");
    env.write_node(&node, &[], &[(DATA_AT, fill(1, 4096))]);
    env.ok(&["overlay", "freeze", "node.overlay", "l1"]);
    env.write_node(&node, &[], &[(DATA_AT + 4096, fill(2, 4096))]);
    env.ok(&["overlay", "freeze", "node.overlay", "l2"]);
    let (l1, l2) = (env.path("l1"), env.path("l2"));
    let new = env.path("new.overlay");

    // A layer for another disk: the seed changes the disk's IDs.
    env.refused(
        "other",
        &new,
        &["--layer", "l1"],
        &format!("layer {} was made for a different disk", l1.display()),
    );
    assert!(!new.exists(), "nothing is created for a refused chain");
    // Parents that do not match.
    env.refused(
        "node",
        &new,
        &["--layer", "l2"],
        &format!(
            "layer {} does not fit the chain: it was frozen over layer sha256:",
            l2.display()
        ),
    );
    env.refused(
        "node",
        &new,
        &["--layer", "l2", "--layer", "l1"],
        "does not fit the chain",
    );
    // A list that disagrees with the recorded chain.
    env.refused("node", &node, &["--layer", "l1"], &format!("overlay {} was made over another chain of layers: it records 2 layers, --layer gives 1 layer", node.display()));
    // A layer given where an overlay is wanted, and the other way round.
    env.refused(
        "node",
        &l1,
        &[],
        &format!("{} is a frozen layer, not an overlay", l1.display()),
    );
    env.refused(
        "node",
        &new,
        &["--layer", "node.overlay"],
        "is an overlay, not a frozen layer",
    );
    freeze_refusals(&env, &node, &l1);

    modified_layer_refusals(&env, &node, &l1);
    // A missing layer.
    fs::rename(&l1, env.path("moved")).unwrap();
    env.refused(
        "node",
        &node,
        &[],
        &format!(
            "layer {} is missing (recorded in overlay {})",
            l1.display(),
            node.display()
        ),
    );
    // Named where it is now, with the digest recorded: accepted.
    let moved = env.path("moved").display().to_string();
    let l2 = l2.display().to_string();
    env.read_node(&node, &["--layer", &moved, "--layer", &l2], &[(0, 512)]);
}
