//! Helpers for tests that drive a whole `ociblk launch` cluster.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use ociblk_launch::snapshot;
use ociblk_launch::{Cluster, ClusterSpec};

use crate::support::{ociblk_bin, verbose};

/// Runs `command` in `node`'s guest shell; returns the value of `$r` it
/// set, announced by `result-42: ` (computed, so the shell's echo of the
/// command does not match). Each wait is bounded by `timeout`.
pub fn guest_result(cluster: &mut Cluster, node: &str, command: &str, timeout: Duration) -> String {
    cluster
        .send_console(node, &format!("{command}; echo \"result-$((40+2)): $r\""))
        .unwrap_or_else(|e| panic!("typing into {node}: {e}"));
    cluster
        .wait_for_console(node, "result-42: ", timeout)
        .unwrap_or_else(|e| panic!("{node}: {e}"));
    let line = cluster
        .wait_for_console(node, "\n", timeout)
        .unwrap_or_else(|e| panic!("{node}: {e}"));
    line.text.trim().to_owned()
}

/// Prepares a fork of the snapshot `snapshot_dir` in `state_dir` (as
/// `ociblk launch --from` does) and launches it, configured for tests.
pub fn launch_fork(snapshot_dir: &Path, state_dir: &Path) -> (ClusterSpec, Cluster) {
    let saved = snapshot::load(snapshot_dir).expect("loading the snapshot");
    let mut spec = saved
        .cluster_spec(state_dir)
        .expect("the snapshot's cluster spec");
    configure_for_test(&mut spec);
    snapshot::prepare_fork(&saved, snapshot_dir, state_dir)
        .expect("preparing the fork")
        .keep();
    let cluster = Cluster::launch(spec.clone()).expect("launching the fork");
    (spec, cluster)
}

/// What the sample guest prints on its console once it has booted.
pub const SAMPLE_READY: &str = "ociblk-sample: ready";
/// The sample guest's data partition. Its ext2 (holding /node-state)
/// leaves the first KiB, the boot block, alone: raw writes may go there.
pub const SAMPLE_DATA_PARTITION: &str = "/dev/vda4";
/// Guest memory of cluster tests: enough for the sample guest, kind to a
/// host running several.
pub const GUEST_MEMORY_MIB: u32 = 256;

/// Sets what every cluster test's spec shares: this build's `ociblk`,
/// [`GUEST_MEMORY_MIB`], and children's output echoed when verbose.
pub fn configure_for_test(spec: &mut ClusterSpec) {
    spec.ociblk_binary = ociblk_bin();
    spec.qemu.memory_mib = GUEST_MEMORY_MIB;
    spec.echo = verbose();
}

/// SHA-256 of a file's content, reading only its data extents (holes
/// read as zeros, so this is the hash of the whole content with the
/// holes' lengths mixed in): layers are sparse files of several GiB.
pub fn content_hash(path: &Path) -> String {
    let mut file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let size = file.metadata().expect("a file's metadata").len();
    let fd = file.as_raw_fd();
    let mut hash = Sha256::new();
    hash.update(size.to_le_bytes());
    let mut offset: u64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    while offset < size {
        // SAFETY: lseek on a file descriptor we own; no pointers.
        let data = unsafe {
            libc::lseek(
                fd,
                libc::off_t::try_from(offset).expect("an offset in a file"),
                libc::SEEK_DATA,
            )
        };
        if data < 0 {
            break; // ENXIO: only a hole up to the end.
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        assert!(hole >= data, "SEEK_HOLE on {}", path.display());
        // SAFETY: as above; positions the file for the reads below.
        unsafe { libc::lseek(fd, data, libc::SEEK_SET) };
        let (data, hole) = (data as u64, hole as u64);
        hash.update(data.to_le_bytes());
        let mut left = hole - data;
        while left > 0 {
            let n = buf
                .len()
                .min(usize::try_from(left).expect("a length in memory"));
            file.read_exact(&mut buf[..n])
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            hash.update(&buf[..n]);
            left -= n as u64;
        }
        offset = hole;
    }
    hex::encode(hash.finalize())
}

/// Every file under `dir` with its content hash and mode.
pub fn tree_hashes(dir: &Path) -> BTreeMap<PathBuf, (String, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut found = BTreeMap::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in fs::read_dir(&d)
            .unwrap_or_else(|e| panic!("{}: {e}", d.display()))
            .filter_map(Result::ok)
        {
            let path = entry.path();
            let meta = entry
                .metadata()
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if meta.is_dir() {
                dirs.push(path);
            } else {
                let mode = meta.permissions().mode() & 0o777;
                found.insert(path.clone(), (content_hash(&path), mode));
            }
        }
    }
    found
}
