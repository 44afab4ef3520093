//! Helpers for tests that drive a whole `ociblk launch` cluster.

use std::time::Duration;

use ociblk::launch::Cluster;

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
