#![allow(clippy::unwrap_used)]
//! Clusters that are saved and forked, end to end with real parts: two
//! sample-image nodes under OVMF (TCG) on a shared network (QEMU socket
//! netdevs over loopback multicast), each with its own swtpm; the nodes
//! ping each other and see their TPM. The cluster is powered off and saved;
//! two forks of the snapshot run side by side, boot with the saved node
//! state, and diverge; one fork is saved again (a chain of two layers) and
//! forked. Snapshots stay byte-identical throughout.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ociblk_launch::network::{guest_address, node_mac};
use ociblk_launch::snapshot::{self, SnapshotSpec};
use ociblk_launch::{
    Cluster, ClusterSpec, NetworkSpec, NodeSpec, TPM_PID_FILE, TPM_SOCKET_FILE, TpmSpec,
};
use ociblk_tests::cluster::{
    SAMPLE_DATA_PARTITION, SAMPLE_READY, configure_for_test, launch_fork, tree_hashes,
};
use ociblk_tests::support::{require_tool, sample_image};

/// Up to four guests share two cores here.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(90);
const POWER_OFF_TIMEOUT: Duration = Duration::from_secs(60);
const NODES: [&str; 2] = ["node-1", "node-2"];

fn fresh_spec(state_dir: &Path) -> ClusterSpec {
    require_tool("qemu-system-x86_64");
    let swtpm = require_tool("swtpm");
    let mut spec = ClusterSpec::new(sample_image(), state_dir, NodeSpec::numbered("node", 2));
    configure_for_test(&mut spec);
    spec.network = Some(NetworkSpec::on_loopback(false).unwrap());
    spec.tpm = Some(TpmSpec { binary: swtpm });
    spec
}

fn wait_ready(cluster: &mut Cluster) {
    for node in NODES {
        cluster
            .wait_for_console(node, SAMPLE_READY, BOOT_TIMEOUT)
            .unwrap();
    }
}

fn guest_result(cluster: &mut Cluster, node: &str, command: &str) -> String {
    ociblk_tests::cluster::guest_result(cluster, node, command, COMMAND_TIMEOUT)
}

/// The id in `node`'s console line `ociblk-sample: <what> <id>`.
fn console_id(cluster: &Cluster, node: &str, what: &str) -> Option<String> {
    let console = fs::read_to_string(cluster.node(node).unwrap().console_log()).unwrap();
    let prefix = format!("ociblk-sample: {what} ");
    console
        .lines()
        .find_map(|l| l.trim().strip_prefix(&prefix).map(str::to_owned))
}

/// Reads the marker file on the node's data file system.
fn read_marker(cluster: &mut Cluster, node: &str) -> String {
    guest_result(
        cluster,
        node,
        &format!(
            "mkdir -p /data && mount -t ext4 {SAMPLE_DATA_PARTITION} /data && \
             r=$(cat /data/marker 2>/dev/null || echo none); umount /data"
        ),
    )
}

fn write_marker(cluster: &mut Cluster, node: &str, value: &str) {
    let out = guest_result(
        cluster,
        node,
        &format!(
            "mkdir -p /data && mount -t ext4 {SAMPLE_DATA_PARTITION} /data && \
             echo {value} > /data/marker && umount /data && sync && r=written || r=failed"
        ),
    );
    assert_eq!(out, "written", "writing the marker on {node}");
}

fn save(mut cluster: Cluster, spec: &ClusterSpec, snapshot_dir: &Path) -> SnapshotSpec {
    cluster
        .power_off("sync && poweroff -f", POWER_OFF_TIMEOUT)
        .unwrap();
    cluster.shutdown().unwrap();
    snapshot::save(spec, snapshot_dir).unwrap()
}

/// `from`'s ping of `to`: "reached" or "unreachable".
fn ping(cluster: &mut Cluster, from: &str, to: &str) -> String {
    let address = guest_address(node_mac(to));
    let ping =
        format!("if ping -c 2 -W 20 {address} >/dev/null; then r=reached; else r=unreachable; fi");
    guest_result(cluster, from, &ping)
}

/// A fresh cluster's checks: every node bootstrapped with an id of its
/// own, has a TPM (its swtpm's PID file in the state directory) and
/// reaches the other. Returns the ids and the swtpm PIDs.
fn check_fresh_nodes(
    cluster: &mut Cluster,
    state: &Path,
) -> (BTreeMap<&'static str, String>, Vec<u32>) {
    let mut ids = BTreeMap::new();
    let mut tpm_pids = Vec::new();
    for node in NODES {
        let id = console_id(cluster, node, "bootstrapped")
            .unwrap_or_else(|| panic!("{node} did not bootstrap"));
        ids.insert(node, id);
        let tpm = cluster.node(node).unwrap().tpm_pid().unwrap();
        assert!(state.join(node).join(TPM_PID_FILE).exists(), "{tpm}");
        tpm_pids.push(tpm);
        assert_eq!(
            guest_result(
                cluster,
                node,
                "if [ -c /dev/tpm0 ] && [ -e /sys/class/tpm/tpm0 ]; then r=tpm; else r=none; fi"
            ),
            "tpm",
            "{node} sees no TPM"
        );
    }
    assert_ne!(ids["node-1"], ids["node-2"]);
    for (from, to) in [("node-1", "node-2"), ("node-2", "node-1")] {
        assert_eq!(
            ping(cluster, from, to),
            "reached",
            "{from} pinging {to} at {}",
            guest_address(node_mac(to))
        );
    }
    (ids, tpm_pids)
}

/// The save's checks: every swtpm stopped by PID, leaving no socket or PID
/// file; each node's layer and TPM state in the snapshot, every file
/// read-only. Returns the snapshot's file hashes.
fn check_saved(
    saved: &SnapshotSpec,
    snap: &Path,
    state: &Path,
    tpm_pids: &[u32],
) -> BTreeMap<PathBuf, (String, u32)> {
    for pid in tpm_pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "swtpm {pid} still runs"
        );
    }
    for node in NODES {
        assert!(!state.join(node).join(TPM_PID_FILE).exists());
        assert!(!state.join(node).join(TPM_SOCKET_FILE).exists());
    }
    assert!(saved.tpm && saved.network);
    for node in &saved.nodes {
        assert_eq!(node.layers, [snap.join(&node.name).join("disk.layer")]);
        assert!(
            snap.join(&node.name)
                .join("tpm")
                .read_dir()
                .unwrap()
                .count()
                > 0
        );
    }
    let files = tree_hashes(snap);
    assert!(files.values().all(|(_, mode)| *mode == 0o400), "{files:?}");
    files
}

/// Every node of `cluster` found the state saved with `ids` (and, with
/// `no_bootstrap`, did not bootstrap again).
fn check_found_state(cluster: &Cluster, ids: &BTreeMap<&str, String>, no_bootstrap: bool) {
    for node in NODES {
        assert_eq!(
            console_id(cluster, node, "found state"),
            Some(ids[node].clone())
        );
        if no_bootstrap {
            assert_eq!(console_id(cluster, node, "bootstrapped"), None);
        }
    }
}

#[test]
fn a_networked_cluster_with_tpms_is_saved_forked_twice_and_forked_again() {
    let tmp = tempfile::tempdir().unwrap();
    let (state, snap1, snap2) = (
        tmp.path().join("state"),
        tmp.path().join("snap1"),
        tmp.path().join("snap2"),
    );

    // A fresh cluster: every node bootstraps, reaches the other, has a TPM.
    let spec = fresh_spec(&state);
    let mut cluster = Cluster::launch(spec.clone()).unwrap();
    wait_ready(&mut cluster);
    let (ids, tpm_pids) = check_fresh_nodes(&mut cluster, &state);
    write_marker(&mut cluster, "node-1", "saved");
    let saved = save(cluster, &spec, &snap1);
    let snap1_files = check_saved(&saved, &snap1, &state, &tpm_pids);

    // Two forks side by side: both boot with the saved state, then diverge.
    let (fork_a, fork_b) = (tmp.path().join("fork-a"), tmp.path().join("fork-b"));
    let (spec_a, mut a) = launch_fork(&snap1, &fork_a);
    let (_, mut b) = launch_fork(&snap1, &fork_b);
    wait_ready(&mut a);
    wait_ready(&mut b);
    for cluster in [&a, &b] {
        check_found_state(cluster, &ids, true);
    }
    assert_eq!(read_marker(&mut a, "node-1"), "saved");
    write_marker(&mut a, "node-1", "fork-a");
    assert_eq!(read_marker(&mut b, "node-1"), "saved");
    write_marker(&mut b, "node-1", "fork-b");
    assert_eq!(read_marker(&mut a, "node-1"), "fork-a");
    // The forks' networks are separate segments; within one, nodes meet.
    assert_eq!(ping(&mut b, "node-1", "node-2"), "reached");
    b.shutdown().unwrap();

    // Fork A saved again: a chain of two layers; its fork sees fork A's writes.
    let saved2 = save(a, &spec_a, &snap2);
    for node in &saved2.nodes {
        assert_eq!(
            node.layers,
            [
                snap1.join(&node.name).join("disk.layer"),
                snap2.join(&node.name).join("disk.layer")
            ]
        );
    }
    let snap2_files = tree_hashes(&snap2);
    let (_, mut c) = launch_fork(&snap2, &tmp.path().join("fork-c"));
    wait_ready(&mut c);
    check_found_state(&c, &ids, false);
    assert_eq!(read_marker(&mut c, "node-1"), "fork-a");
    write_marker(&mut c, "node-1", "fork-c");
    c.shutdown().unwrap();

    assert_eq!(tree_hashes(&snap1), snap1_files, "snapshot 1 changed");
    assert_eq!(tree_hashes(&snap2), snap2_files, "snapshot 2 changed");
}
