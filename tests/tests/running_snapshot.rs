#![allow(clippy::unwrap_used)]
//! Running snapshots end to end with real parts: a sample-image node under
//! OVMF (TCG) with its own swtpm boots once, keeps a marker in RAM (a
//! tmpfs) and another on its disk, and is saved running (`save_live`: VM
//! state by QEMU's migration to a file, overlay frozen). Two forks of the
//! snapshot run side by side: each continues the same boot (same boot id,
//! uptime continued, the RAM marker, a TPM that still answers) without
//! firmware or boot, sees the disk marker, and its writes stay its own.
//! One fork is saved running again and forked. The snapshots stay
//! byte-identical throughout.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ociblk_launch::network::{guest_address, node_mac};
use ociblk_launch::snapshot::{self, SnapshotSpec};
use ociblk_launch::{Cluster, ClusterSpec, NetworkSpec, NodeSpec, TpmSpec, VMSTATE_FILE};
use ociblk_tests::cluster::{
    SAMPLE_DATA_PARTITION, SAMPLE_READY, configure_for_test, launch_fork, tree_hashes,
};
use ociblk_tests::process::Server;
use ociblk_tests::support::{require_tool, run_bounded, sample_image};
use sha2::{Digest, Sha256};

const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(90);
const SAVE_TIMEOUT: Duration = Duration::from_secs(120);
const NODE: &str = "node-1";

fn guest_result(cluster: &mut Cluster, command: &str) -> String {
    ociblk_tests::cluster::guest_result(cluster, NODE, command, COMMAND_TIMEOUT)
}

/// A marker no earlier run left: hex of SHA-256 of the time and PID.
fn random_marker(tag: &str) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let hash = Sha256::digest(format!("{tag}:{}:{}", now.as_nanos(), std::process::id()));
    let hex = hex::encode(&hash[..8]);
    format!("{tag}-{hex}")
}

/// What the guest keeps in RAM: a tmpfs of its own.
const RAM_MARKER: &str = "/run/live-marker/marker";

fn write_ram_marker(cluster: &mut Cluster, value: &str) {
    let out = guest_result(
        cluster,
        &format!(
            "mkdir -p /run/live-marker && mount -t tmpfs none /run/live-marker && \
             echo {value} > {RAM_MARKER} && r=written || r=failed"
        ),
    );
    assert_eq!(out, "written");
}

fn read_ram_marker(cluster: &mut Cluster) -> String {
    guest_result(cluster, &format!("r=$(cat {RAM_MARKER} || echo none)"))
}

/// The disk marker: the first line of the data partition's boot block,
/// written and read with O_DIRECT, so that it is the disk's and not the
/// guest's page cache.
fn write_disk_marker(cluster: &mut Cluster, value: &str) {
    let out = guest_result(
        cluster,
        &format!(
            "printf '%s\\n' {value} | dd of={SAMPLE_DATA_PARTITION} bs=512 conv=sync \
             oflag=direct 2>/dev/null && r=written || r=failed"
        ),
    );
    assert_eq!(out, "written");
}

fn read_disk_marker(cluster: &mut Cluster) -> String {
    guest_result(
        cluster,
        &format!(
            "r=$(dd if={SAMPLE_DATA_PARTITION} bs=512 count=1 iflag=direct 2>/dev/null | head -n 1)"
        ),
    )
}

fn boot_id(cluster: &mut Cluster) -> String {
    node_boot_id(cluster, NODE)
}

fn uptime(cluster: &mut Cluster) -> f64 {
    guest_result(cluster, "r=$(cut -d ' ' -f 1 /proc/uptime)")
        .parse()
        .unwrap()
}

/// PCR 0 as the kernel reads it from the TPM: the firmware's measurement.
fn pcr0(cluster: &mut Cluster) -> String {
    guest_result(
        cluster,
        "r=$(cat /sys/class/tpm/tpm0/pcr-sha256/0 2>/dev/null || echo unreadable)",
    )
}

/// A temporary directory with the paths of a cluster's state and two
/// snapshots in it.
fn scratch() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let at = |name| tmp.path().join(name);
    let (state, snap1, snap2) = (at("state"), at("snap1"), at("snap2"));
    (tmp, state, snap1, snap2)
}

/// A cluster of `nodes` sample nodes with TPMs in `state_dir`, configured
/// for tests (QEMU and swtpm are required).
fn spec_with_tpms(state_dir: &Path, nodes: usize) -> ClusterSpec {
    require_tool("qemu-system-x86_64");
    let swtpm = require_tool("swtpm");
    let mut spec = ClusterSpec::new(sample_image(), state_dir, NodeSpec::numbered("node", nodes));
    configure_for_test(&mut spec);
    spec.tpm = Some(TpmSpec { binary: swtpm });
    spec
}

/// Forks `snapshot_dir` into `state_dir` and launches it; returns the
/// fork's spec, its cluster and the time from the start of the fork until
/// the node answered on its console.
fn fork(snapshot_dir: &Path, state_dir: &Path) -> (ClusterSpec, Cluster, Duration) {
    let started = Instant::now();
    let (spec, mut cluster) = launch_fork(snapshot_dir, state_dir);
    assert_eq!(guest_result(&mut cluster, "r=answering"), "answering");
    let answered = started.elapsed();
    let times = cluster.node(NODE).unwrap().times();
    eprintln!(
        "fork {}: resumed {:?} after the launch started, answered on its console {answered:?} \
         after the fork started",
        state_dir.display(),
        times.resumed
    );
    (spec, cluster, answered)
}

fn save_running(cluster: Cluster, spec: &ClusterSpec, snapshot_dir: &Path) -> SnapshotSpec {
    let started = Instant::now();
    let saved = snapshot::save_live(cluster, spec, snapshot_dir, SAVE_TIMEOUT).unwrap();
    eprintln!(
        "saved running into {} in {:?}",
        snapshot_dir.display(),
        started.elapsed()
    );
    assert!(saved.running.is_some());
    let vmstate = snapshot_dir.join(NODE).join(VMSTATE_FILE);
    let meta = fs::metadata(&vmstate).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o400);
    eprintln!("VM state: {} MiB", meta.len() >> 20);
    // Moved into the snapshot: no second copy in the state directory.
    assert!(!spec.state_dir.join(NODE).join(VMSTATE_FILE).exists());
    saved
}

#[test]
fn a_running_node_is_saved_and_its_forks_continue_where_it_was() {
    let (tmp, state, snap1, snap2) = scratch();
    let spec = spec_with_tpms(&state, 1);
    let mut cluster = Cluster::launch(spec.clone()).unwrap();
    cluster
        .wait_for_console(NODE, SAMPLE_READY, BOOT_TIMEOUT)
        .unwrap();
    // Whoever connects to QEMU's monitor controls it: the user only.
    let qmp = fs::metadata(cluster.node(NODE).unwrap().qmp_socket()).unwrap();
    assert_eq!(
        qmp.permissions().mode() & 0o077,
        0,
        "{:o}",
        qmp.permissions().mode()
    );
    let (ram, disk) = (random_marker("ram"), random_marker("disk"));
    write_ram_marker(&mut cluster, &ram);
    write_disk_marker(&mut cluster, &disk);
    let boot = boot_id(&mut cluster);
    let pcr = pcr0(&mut cluster);
    assert_ne!(pcr, "unreadable", "the guest reads no PCR before the save");
    let up = uptime(&mut cluster);
    save_running(cluster, &spec, &snap1);
    let json = fs::read_to_string(snap1.join(snapshot::SPEC_FILE)).unwrap();
    assert!(json.contains("\"running\": true"), "{json}");
    let snap1_files = tree_hashes(&snap1);

    // Two forks side by side, each continuing the saved boot.
    let (fork_a, fork_b) = (tmp.path().join("fork-a"), tmp.path().join("fork-b"));
    let (spec_a, mut a, _) = fork(&snap1, &fork_a);
    let (_, mut b, _) = fork(&snap1, &fork_b);
    for (name, cluster) in [("A", &mut a), ("B", &mut b)] {
        assert_eq!(read_ram_marker(cluster), ram, "fork {name}: RAM marker");
        assert_eq!(boot_id(cluster), boot, "fork {name} booted again");
        let continued = uptime(cluster);
        assert!(continued > up, "fork {name}: uptime {continued} after {up}");
        assert_eq!(read_disk_marker(cluster), disk, "fork {name}: disk marker");
        assert_eq!(pcr0(cluster), pcr, "fork {name}: the TPM's PCR 0");
        // No firmware ran: the console shows the shell only.
        let console = fs::read_to_string(cluster.node(NODE).unwrap().console_log()).unwrap();
        assert!(
            !console.contains(SAMPLE_READY) && !console.contains("Linux version"),
            "fork {name} booted:\n{console}"
        );
        let guest_now: u64 = guest_result(cluster, "r=$(date +%s)").parse().unwrap();
        let host_now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        eprintln!(
            "fork {name}: guest clock {guest_now}, host clock {host_now} ({} s behind)",
            host_now.saturating_sub(guest_now)
        );
    }
    // Each fork's writes are its own.
    write_disk_marker(&mut a, "fork-a");
    write_ram_marker(&mut a, "fork-a-ram");
    assert_eq!(read_disk_marker(&mut b), disk, "fork A's write in fork B");
    assert_eq!(read_ram_marker(&mut b), ram);
    write_disk_marker(&mut b, "fork-b");
    assert_eq!(
        read_disk_marker(&mut a),
        "fork-a",
        "fork B's write in fork A"
    );
    b.shutdown().unwrap();

    // Fork A saved running again, and forked: it goes on from fork A.
    save_running(a, &spec_a, &snap2);
    let snap2_files = tree_hashes(&snap2);
    let (_, mut c, _) = fork(&snap2, &tmp.path().join("fork-c"));
    assert_eq!(boot_id(&mut c), boot, "fork C booted again");
    assert_eq!(read_disk_marker(&mut c), "fork-a");
    c.shutdown().unwrap();

    assert_eq!(tree_hashes(&snap1), snap1_files, "snapshot 1 changed");
    assert_eq!(tree_hashes(&snap2), snap2_files, "snapshot 2 changed");
}

/// `node` pings `to` three times; whether every answer came, and only once.
fn ping(cluster: &mut Cluster, node: &str, to: &str) -> String {
    let address = guest_address(node_mac(to));
    ociblk_tests::cluster::guest_result(
        cluster,
        node,
        &format!(
            "o=$(ping -c 3 -W 20 {address} 2>&1); \
             if echo \"$o\" | grep -q DUP; then r=duplicates; \
             elif echo \"$o\" | grep -q ' 3 packets received'; then r=reached; \
             else r=unreachable; fi"
        ),
        COMMAND_TIMEOUT,
    )
}

/// A networked pair with TPMs, saved running: the forks' nodes reach each
/// other as before the save, each fork on a segment of its own (two forks
/// of the same nodes, same MACs and addresses, run side by side without
/// duplicate answers); `ociblk launch --from` resumes a running snapshot
/// without waiting for the boot's text again and saves it running again.
#[test]
fn a_networked_pair_resumes_on_segments_of_its_own_and_the_cli_saves_a_fork_running() {
    let (tmp, state, snap1, snap2) = scratch();
    let nodes = ["node-1", "node-2"];
    let mut spec = spec_with_tpms(&state, 2);
    spec.network = Some(NetworkSpec::on_loopback(false).unwrap());
    let mut cluster = Cluster::launch(spec.clone()).unwrap();
    cluster
        .wait_all_for_console(SAMPLE_READY, BOOT_TIMEOUT)
        .unwrap();
    assert_eq!(ping(&mut cluster, "node-1", "node-2"), "reached");
    let mut boots = Vec::new();
    for node in nodes {
        boots.push(node_boot_id(&mut cluster, node));
    }
    save_running_nodes(cluster, &spec, &snap1, &nodes);
    let snap1_files = tree_hashes(&snap1);

    let mut forks = Vec::new();
    for name in ["fork-a", "fork-b"] {
        let started = Instant::now();
        let (_, mut cluster) = launch_fork(&snap1, &tmp.path().join(name));
        for node in nodes {
            assert_eq!(
                ociblk_tests::cluster::guest_result(&mut cluster, node, "r=up", COMMAND_TIMEOUT),
                "up"
            );
        }
        eprintln!(
            "{name}: both nodes answered on their consoles {:?} after the fork started",
            started.elapsed()
        );
        forks.push(cluster);
    }
    for cluster in &mut forks {
        for (node, boot) in nodes.iter().zip(&boots) {
            assert_eq!(&node_boot_id(cluster, node), boot);
        }
        assert_eq!(ping(cluster, "node-1", "node-2"), "reached");
        assert_eq!(ping(cluster, "node-2", "node-1"), "reached");
    }
    for cluster in forks {
        cluster.shutdown().unwrap();
    }

    save_a_fork_with_the_cli(&snap1, &tmp.path().join("fork-cli"), &snap2);
    let (_, mut cluster) = launch_fork(&snap2, &tmp.path().join("fork-c"));
    assert_eq!(node_boot_id(&mut cluster, "node-2"), boots[1]);
    assert_eq!(ping(&mut cluster, "node-2", "node-1"), "reached");
    cluster.shutdown().unwrap();
    assert_eq!(tree_hashes(&snap1), snap1_files, "snapshot 1 changed");
}

/// The command line: a fork of the running snapshot `snap1` in
/// `state_dir` resumes (no --wait-for text shows again) and is saved
/// running again at once, into `snap2`.
fn save_a_fork_with_the_cli(snap1: &Path, state_dir: &Path, snap2: &Path) {
    let out = run_bounded(
        Command::new(ociblk_tests::support::ociblk_bin())
            .arg("launch")
            .arg("--from")
            .arg(snap1)
            .arg("--state-dir")
            .arg(state_dir)
            .args(["--wait-for", SAMPLE_READY, "--quiet", "--live", "--save"])
            .arg(snap2),
        SAVE_TIMEOUT,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("resumed"), "{stdout}");
    let saved = snapshot::load(snap2).unwrap();
    assert!(saved.running.is_some());
}

/// `node`'s boot id.
fn node_boot_id(cluster: &mut Cluster, node: &str) -> String {
    ociblk_tests::cluster::guest_result(
        cluster,
        node,
        "r=$(cat /proc/sys/kernel/random/boot_id)",
        COMMAND_TIMEOUT,
    )
}

fn save_running_nodes(cluster: Cluster, spec: &ClusterSpec, snapshot_dir: &Path, nodes: &[&str]) {
    let started = Instant::now();
    let saved = snapshot::save_live(cluster, spec, snapshot_dir, SAVE_TIMEOUT).unwrap();
    eprintln!(
        "saved {} running nodes in {:?}",
        nodes.len(),
        started.elapsed()
    );
    assert_eq!(saved.nodes.len(), nodes.len());
    assert!(saved.running.is_some() && saved.tpm && saved.network);
}

/// A VM state QEMU cannot load: the fork fails naming the node and QEMU's
/// complaint, stops what it started and leaves no node directory. The
/// running snapshot is made without guests: a real server's overlay and
/// a VM state file that holds no migration stream.
#[test]
fn a_vm_state_qemu_cannot_load_fails_the_fork_naming_its_node() {
    require_tool("qemu-system-x86_64");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("saved-state");
    let spec = ClusterSpec::new(sample_image(), &state, NodeSpec::numbered("node", 1));
    let node_dir = state.join(NODE);
    fs::create_dir_all(&node_dir).unwrap();
    let (socket, overlay, image) = (
        node_dir.join(ociblk_launch::SOCKET_FILE),
        node_dir.join(ociblk_launch::OVERLAY_FILE),
        sample_image(),
    );
    let mut server = Server::start(
        &socket,
        &[
            "--image",
            image.to_str().unwrap(),
            "--seed",
            NODE,
            "--overlay",
            overlay.to_str().unwrap(),
        ],
    );
    server.stop_cleanly(Duration::from_secs(30), "making the node's overlay");
    fs::copy(
        &spec.qemu.ovmf_vars_template,
        node_dir.join(ociblk_launch::OVMF_VARS_FILE),
    )
    .unwrap();
    fs::write(node_dir.join(VMSTATE_FILE), b"no migration stream").unwrap();
    let snap = dir.path().join("snap");
    snapshot::save_running(&spec, &snap).unwrap();

    let fork = dir.path().join("fork");
    let out = run_bounded(
        Command::new(ociblk_tests::support::ociblk_bin())
            .arg("launch")
            .arg("--from")
            .arg(&snap)
            .arg("--state-dir")
            .arg(&fork)
            .arg("--quiet"),
        SAVE_TIMEOUT,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the fork did not fail:\n{stderr}");
    assert!(
        stderr.contains("node node-1: QEMU exited") && stderr.contains("migration"),
        "{stderr}"
    );
    assert!(!fork.exists(), "a failed fork left {}", fork.display());
}
