//! Helpers for tests that drive a whole `ociblk launch` cluster.

use std::time::Duration;

use ociblk::launch::{Cluster, ClusterSpec};

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
