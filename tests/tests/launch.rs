#![allow(clippy::unwrap_used)]
//! The cluster launch harness end to end: sample-image nodes booting under
//! OVMF (TCG), their disks surviving a relaunch, Ctrl-C on `ociblk launch`,
//! and failures half-way through a launch. Every test checks that nothing
//! it started is left running and that no socket is left behind.
//!
//! Library-level tests use `ociblk_launch` directly; the signal test and
//! the failing forks run the `ociblk launch` binary.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{RecvTimeoutError, channel};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use ociblk_launch::process::Process;
use ociblk_launch::{
    Cluster, ClusterSpec, LaunchError, NodeSpec, OVERLAY_FILE, OVMF_VARS_FILE, QEMU_PID_FILE,
    SERVE_PID_FILE, SOCKET_FILE, TPM_PID_FILE, TPM_STATE_DIR, TpmSpec, snapshot,
};
use ociblk_tests::cluster::{
    GUEST_MEMORY_MIB, SAMPLE_DATA_PARTITION, SAMPLE_READY, configure_for_test,
};
use ociblk_tests::process::{Server, wait_exit};
use ociblk_tests::support::{ociblk_bin, poke_read_only, require_tool, run_bounded, sample_image};

/// Boot to the ready line takes ~8 s under TCG on an idle host; two
/// guests sharing two loaded cores take several times that.
const BOOT_TIMEOUT: Duration = Duration::from_secs(150);
/// How long a guest shell command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `ociblk launch` may take to stop after SIGINT.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Booting tests run one at a time: each guest gets a whole core.
static GUESTS: Mutex<()> = Mutex::new(());

fn one_guest_test_at_a_time() -> MutexGuard<'static, ()> {
    GUESTS.lock().unwrap_or_else(PoisonError::into_inner)
}

fn spec(state_dir: &Path, nodes: Vec<NodeSpec>) -> ClusterSpec {
    require_tool("qemu-system-x86_64");
    let mut spec = ClusterSpec::new(sample_image(), state_dir, nodes);
    configure_for_test(&mut spec);
    spec
}

/// A one-node cluster (`node-1`) in `state_dir`, booted: its console
/// showed the sample guest's ready line.
fn booted_node(state_dir: &Path) -> Cluster {
    let mut cluster = Cluster::launch(spec(state_dir, NodeSpec::numbered("node", 1))).unwrap();
    cluster
        .wait_for_console("node-1", SAMPLE_READY, BOOT_TIMEOUT)
        .unwrap();
    cluster
}

fn pid_t(pid: u32) -> libc::pid_t {
    libc::pid_t::try_from(pid).unwrap()
}

fn process_exists(pid: u32) -> bool {
    // SAFETY: signal 0 sends nothing; it only checks that the PID exists.
    let r = unsafe { libc::kill(pid_t(pid), 0) };
    let errno = std::io::Error::last_os_error().raw_os_error();
    assert!(
        r == 0 || errno == Some(libc::ESRCH),
        "kill({pid}, 0): {errno:?}"
    );
    r == 0
}

fn assert_gone(pids: &[u32]) {
    for &pid in pids {
        assert!(!process_exists(pid), "process {pid} is still there");
    }
}

/// Processes whose command line mentions `dir` (every serve and QEMU the
/// harness starts for a node in `dir` does).
fn processes_mentioning(dir: &Path) -> Vec<String> {
    let needle = dir.as_os_str().as_encoded_bytes();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline.windows(needle.len()).any(|w| w == needle) {
            found.push(String::from_utf8_lossy(&cmdline).replace('\0', " "));
        }
    }
    found
}

/// Everything under `dir` that is a socket.
fn sockets_under(dir: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::FileTypeExt;
    let mut found = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in fs::read_dir(&d).unwrap().filter_map(Result::ok) {
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                dirs.push(entry.path());
            } else if kind.is_socket() {
                found.push(entry.path());
            }
        }
    }
    found
}

/// Nothing of the cluster in `state_dir` runs, no socket and no PID file is left.
fn assert_torn_down(state_dir: &Path, pids: &[u32]) {
    assert_gone(pids);
    assert_eq!(processes_mentioning(state_dir), Vec::<String>::new());
    assert_eq!(sockets_under(state_dir), Vec::<PathBuf>::new());
    for node in fs::read_dir(state_dir).unwrap().filter_map(Result::ok) {
        for pid_file in [SERVE_PID_FILE, QEMU_PID_FILE, TPM_PID_FILE] {
            assert!(
                !node.path().join(pid_file).exists(),
                "{pid_file} left in {}",
                node.path().display()
            );
        }
    }
}

fn read_pid(path: &Path) -> u32 {
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn two_nodes_boot_and_teardown_leaves_nothing_running() {
    let _guests = one_guest_test_at_a_time();
    let state = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::launch(spec(state.path(), NodeSpec::numbered("node", 2))).unwrap();
    let matches = cluster
        .wait_all_for_console(SAMPLE_READY, BOOT_TIMEOUT)
        .unwrap();
    assert_eq!(matches.len(), 2);

    let mut pids = Vec::new();
    for node in cluster.nodes() {
        let times = node.times();
        eprintln!("{}: {times:?}", node.name());
        let backend = times.backend_ready.unwrap();
        let qemu = times.qemu_started.unwrap();
        let ready = times.console_ready.unwrap();
        assert!(backend <= qemu && qemu <= ready, "{times:?}");

        let serve_pid = node.serve_pid().unwrap();
        let qemu_pid = node.qemu_pid().unwrap();
        assert_eq!(read_pid(&node.dir().join(SERVE_PID_FILE)), serve_pid);
        assert_eq!(read_pid(&node.dir().join(QEMU_PID_FILE)), qemu_pid);
        assert!(process_exists(serve_pid) && process_exists(qemu_pid));
        pids.extend([serve_pid, qemu_pid]);

        assert!(node.socket().exists());
        let serve_log = fs::read_to_string(node.serve_log()).unwrap();
        assert!(serve_log.contains("frontend connected"), "{serve_log}");
        let console = fs::read_to_string(node.console_log()).unwrap();
        assert!(console.contains(SAMPLE_READY), "{console}");
    }

    // A second launch on the same state directory is refused and leaves
    // the running one alone.
    let err = Cluster::launch(spec(state.path(), NodeSpec::numbered("node", 2))).unwrap_err();
    assert!(
        matches!(&err, LaunchError::NodeInUse { node, .. } if node == "node-1"),
        "{err}"
    );
    assert!(cluster.nodes().iter().all(|n| n.socket().exists()));
    assert!(pids.iter().all(|&pid| process_exists(pid)));

    cluster.shutdown().unwrap();
    assert_torn_down(state.path(), &pids);
    for node in ["node-1", "node-2"] {
        let overlay = state.path().join(node).join(OVERLAY_FILE);
        assert!(overlay.is_file(), "{} is gone", overlay.display());
        assert!(!state.path().join(node).join(SOCKET_FILE).exists());
    }
}

fn guest_result(cluster: &mut Cluster, node: &str, command: &str) -> String {
    ociblk_tests::cluster::guest_result(cluster, node, command, COMMAND_TIMEOUT)
}

/// Sets `r` to whether the data partition starts with the marker.
fn read_marker() -> String {
    format!(
        "if head -c 12 {SAMPLE_DATA_PARTITION} | grep -q persisted-42; then r=found; else r=missing; fi"
    )
}

#[test]
fn relaunch_keeps_the_disk_and_a_fresh_state_dir_does_not() {
    let _guests = one_guest_test_at_a_time();
    let state = tempfile::tempdir().unwrap();
    let node = "node-1";

    let mut cluster = booted_node(state.path());
    let written = guest_result(
        &mut cluster,
        node,
        &format!(
            "printf 'persisted-%s\\n' $((6*7)) | dd of={SAMPLE_DATA_PARTITION} bs=512 conv=sync 2>/dev/null \
             && sync && r=written || r=failed"
        ),
    );
    assert_eq!(written, "written");
    cluster.shutdown().unwrap();

    // The same state directory, and beside it a fresh one with a node of
    // the same name (hence the same computed disk).
    let fresh = tempfile::tempdir().unwrap();
    let mut again = Cluster::launch(spec(state.path(), NodeSpec::numbered("node", 1))).unwrap();
    let mut other = Cluster::launch(spec(fresh.path(), NodeSpec::numbered("node", 1))).unwrap();
    again
        .wait_for_console(node, SAMPLE_READY, BOOT_TIMEOUT)
        .unwrap();
    other
        .wait_for_console(node, SAMPLE_READY, BOOT_TIMEOUT)
        .unwrap();
    assert_eq!(guest_result(&mut again, node, &read_marker()), "found");
    assert_eq!(guest_result(&mut other, node, &read_marker()), "missing");
    again.shutdown().unwrap();
    other.shutdown().unwrap();
    assert_torn_down(state.path(), &[]);
    assert_torn_down(fresh.path(), &[]);
}

#[test]
fn sigint_stops_ociblk_launch_and_everything_it_started() {
    let _guests = one_guest_test_at_a_time();
    require_tool("qemu-system-x86_64");
    let state = tempfile::tempdir().unwrap();
    let stderr = fs::File::create(state.path().join("launch.stderr")).unwrap();
    let mut cmd = Command::new(ociblk_bin());
    cmd.arg("launch")
        .arg("--image")
        .arg(sample_image())
        .args(["--nodes", "1", "--memory", &format!("{GUEST_MEMORY_MIB}M")])
        .arg("--state-dir")
        .arg(state.path())
        .args(["--wait-for", SAMPLE_READY, "--timeout", "150s"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr);
    // Dropping it (if the test fails first) kills it; its own children then
    // get their death signal.
    let mut launcher = Process::spawn(&mut cmd, libc::SIGKILL, None).unwrap();
    let stderr_text = || fs::read_to_string(state.path().join("launch.stderr")).unwrap_or_default();

    // The table row of node-1 appears once its console showed the ready line.
    let (tx, rx) = channel();
    let stdout = launcher.child_mut().stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.starts_with("node-1 ") => {
                eprintln!("{line}");
                break;
            }
            Ok(_) => {}
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                panic!("no ready row from ociblk launch:\n{}", stderr_text())
            }
        }
    }

    let node_dir = state.path().join("node-1");
    let pids = [
        read_pid(&node_dir.join(SERVE_PID_FILE)),
        read_pid(&node_dir.join(QEMU_PID_FILE)),
    ];
    assert!(pids.iter().all(|&pid| process_exists(pid)));
    assert!(node_dir.join(SOCKET_FILE).exists());

    let launcher_pid = pid_t(launcher.pid());
    // SAFETY: kill(2) on our own, not yet reaped child.
    let sent = unsafe { libc::kill(launcher_pid, libc::SIGINT) };
    assert_eq!(sent, 0);
    let status = wait_exit(&mut launcher, STOP_TIMEOUT)
        .unwrap_or_else(|| panic!("ociblk launch still runs after SIGINT:\n{}", stderr_text()));
    assert!(
        status.success(),
        "ociblk launch: {status}\n{}",
        stderr_text()
    );
    assert_torn_down(state.path(), &pids);
    assert!(node_dir.join(OVERLAY_FILE).is_file());
}

#[test]
fn a_backend_failing_half_way_names_its_node_and_stops_the_others() {
    let state = tempfile::tempdir().unwrap();
    let mut nodes = NodeSpec::numbered("node", 2);
    let missing = state.path().join("no-such-parameters.pb");
    nodes[1].serve_args = vec!["--node-parameters".into(), missing.display().to_string()];
    let err = Cluster::launch(spec(state.path(), nodes)).unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(&err, LaunchError::ServeExited { node, .. } if node == "node-2"),
        "{message}"
    );
    assert!(message.contains("no-such-parameters.pb"), "{message}");
    assert_torn_down(state.path(), &[]);
}

#[test]
fn a_qemu_exiting_at_once_names_its_node_and_leaves_nothing_behind() {
    let state = tempfile::tempdir().unwrap();
    let mut spec = spec(state.path(), NodeSpec::numbered("node", 2));
    spec.qemu.accel = "no-such-accelerator".into();
    let err = Cluster::launch(spec).unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(&err, LaunchError::QemuExited { node, .. } if node.starts_with("node-")),
        "{message}"
    );
    assert!(message.contains("no-such-accelerator"), "{message}");
    assert_torn_down(state.path(), &[]);
}

#[test]
fn a_tpm_that_cannot_start_names_its_node_and_leaves_nothing_behind() {
    let state = tempfile::tempdir().unwrap();
    let mut spec = spec(state.path(), NodeSpec::numbered("node", 2));
    // swtpm refuses a state directory it cannot use: here a file stands
    // where node-1's TPM state directory goes.
    fs::create_dir_all(state.path().join("node-1")).unwrap();
    fs::write(
        state.path().join("node-1").join(TPM_STATE_DIR),
        b"not a dir",
    )
    .unwrap();
    spec.tpm = Some(TpmSpec {
        binary: require_tool("swtpm"),
    });
    let err = Cluster::launch(spec).unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(&err, LaunchError::NodeFiles { node, .. } if node == "node-1"),
        "{message}"
    );
    assert_torn_down(state.path(), &[]);

    let mut spec = self::spec(state.path(), NodeSpec::numbered("node", 1));
    fs::remove_file(state.path().join("node-1").join(TPM_STATE_DIR)).unwrap();
    spec.tpm = Some(TpmSpec {
        binary: state.path().join("no-such-swtpm"),
    });
    let err = Cluster::launch(spec).unwrap_err();
    assert!(
        matches!(&err, LaunchError::Spawn { node, program: "swtpm", .. } if node == "node-1"),
        "{err}"
    );
    assert_torn_down(state.path(), &[]);
}

#[test]
fn launch_from_a_directory_that_is_no_snapshot_names_its_cluster_json() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("fork");
    let out = Command::new(ociblk_bin())
        .arg("launch")
        .arg("--from")
        .arg(dir.path())
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let spec = dir.path().join("cluster.json");
    assert!(stderr.contains(&spec.display().to_string()), "{stderr}");
    assert!(!state.exists(), "a failed fork created {}", state.display());
}

/// A saved two-node cluster of the sample image in `dir/snap`, made
/// without guests: each node's overlay made by a real `ociblk serve`,
/// stopped cleanly, then frozen by `snapshot::save`. Returns the snapshot
/// directory.
fn saved_without_guests(dir: &Path, serve_args: &[&str]) -> PathBuf {
    let state = dir.join("saved-state");
    let mut spec = ClusterSpec::new(sample_image(), &state, NodeSpec::numbered("node", 2));
    spec.serve_args = serve_args.iter().map(|a| (*a).to_owned()).collect();
    for node in &spec.nodes {
        let node_dir = state.join(&node.name);
        fs::create_dir_all(&node_dir).unwrap();
        let socket = node_dir.join(SOCKET_FILE);
        let overlay = node_dir.join(OVERLAY_FILE);
        let image = sample_image();
        let mut server = Server::start(
            &socket,
            &[
                "--image",
                image.to_str().unwrap(),
                "--seed",
                &node.name,
                "--overlay",
                overlay.to_str().unwrap(),
            ],
        );
        server.stop_cleanly(STOP_TIMEOUT, "making a node's overlay");
        fs::copy(&spec.qemu.ovmf_vars_template, node_dir.join(OVMF_VARS_FILE)).unwrap();
    }
    let snap = dir.join("snap");
    snapshot::save(&spec, &snap).unwrap();
    snap
}

/// `ociblk launch --from snap --state-dir fork` with `extra` arguments,
/// which must fail; its stderr.
fn failed_fork(snap: &Path, fork: &Path, extra: &[&str]) -> String {
    let out = run_bounded(
        Command::new(ociblk_bin())
            .arg("launch")
            .arg("--from")
            .arg(snap)
            .arg("--state-dir")
            .arg(fork)
            .args(["--memory", &format!("{GUEST_MEMORY_MIB}M")])
            .args(extra),
        STOP_TIMEOUT,
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the fork did not fail:\n{stderr}");
    stderr
}

#[test]
fn a_fork_with_a_missing_or_modified_layer_names_it_and_leaves_no_node_directory() {
    let dir = tempfile::tempdir().unwrap();
    let snap = saved_without_guests(dir.path(), &[]);
    // node-2's layer: its failure comes after node-1's directory was made.
    let layer = snap.join("node-2").join(snapshot::LAYER_FILE);
    let fresh = dir.path().join("new").join("fork");
    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let check = |want: &str| {
        for fork in [&fresh, &empty] {
            let stderr = failed_fork(&snap, fork, &[]);
            assert!(
                stderr.contains(&layer.display().to_string()) && stderr.contains(want),
                "{stderr}"
            );
        }
        assert!(
            !dir.path().join("new").exists(),
            "a failed fork left {}",
            dir.path().join("new").display()
        );
        let left: Vec<_> = fs::read_dir(&empty).unwrap().collect();
        assert!(left.is_empty(), "a failed fork left {left:?}");
    };

    let moved = dir.path().join("moved.layer");
    fs::rename(&layer, &moved).unwrap();
    check("is missing");
    fs::rename(&moved, &layer).unwrap();

    // One block's state in the layer's map changed: its digest fails.
    let mut first = vec![0; 4096];
    std::os::unix::fs::FileExt::read_exact_at(&fs::File::open(&layer).unwrap(), &mut first, 0)
        .unwrap();
    let header = ociblk_overlay::parse_header(&first).unwrap();
    let at = header.map_offset + 3;
    let old = poke_read_only(&layer, at, 2);
    if old == 2 {
        poke_read_only(&layer, at, 0);
    }
    check("was modified");
    poke_read_only(&layer, at, old);
}

#[test]
fn a_fork_whose_guests_cannot_start_stops_its_servers_and_leaves_no_node_directory() {
    require_tool("qemu-system-x86_64");
    let dir = tempfile::tempdir().unwrap();
    let records = dir.path().join("boot.access");
    let snap = saved_without_guests(dir.path(), &["--record-access", records.to_str().unwrap()]);
    let fork = dir.path().join("fork");
    let stderr = failed_fork(&snap, &fork, &["--accel", "no-such-accelerator"]);
    assert!(
        stderr.contains("no-such-accelerator") && stderr.contains("node node-"),
        "{stderr}"
    );
    assert!(!fork.exists(), "a failed fork left {}", fork.display());
    assert_eq!(processes_mentioning(&fork), Vec::<String>::new());
    // Both servers ran and wrote their own records on SIGTERM.
    for node in ["node-1", "node-2"] {
        let record = dir.path().join(format!("boot.access.{node}"));
        assert!(record.is_file(), "no {}:\n{stderr}", record.display());
    }
    assert!(!records.exists(), "the shared name was written too");
}

#[test]
fn a_serve_argument_serve_refuses_fails_a_launch_and_a_fork_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = run_bounded(
        Command::new(ociblk_bin())
            .arg("launch")
            .arg("--image")
            .arg(sample_image())
            .arg("--state-dir")
            .arg(&state)
            .args(["--", "--flsh", "unsafe"]),
        STOP_TIMEOUT,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the launch did not fail:\n{stderr}");
    assert!(
        stderr.contains("node node-1") && stderr.contains("'--flsh'"),
        "{stderr}"
    );
    assert!(
        !state.exists(),
        "a failed launch created {}",
        state.display()
    );

    // The same argument in a snapshot's cluster.json: its fork makes nothing.
    let snap = saved_without_guests(dir.path(), &["--flsh", "unsafe"]);
    let fork = dir.path().join("fork");
    let stderr = failed_fork(&snap, &fork, &[]);
    assert!(
        stderr.contains("node node-1") && stderr.contains("'--flsh'"),
        "{stderr}"
    );
    assert!(!fork.exists(), "a failed fork created {}", fork.display());
}

#[test]
fn a_killed_backend_is_restarted_and_the_guest_keeps_every_fsynced_byte() {
    let _guests = one_guest_test_at_a_time();
    let state = tempfile::tempdir().unwrap();
    let node = "node-1";
    let mut cluster = booted_node(state.path());
    // Eight files of 1 MiB on the data partition's file system, each
    // fsynced; the console says so after each (numbers computed, so that
    // the shell's echo of the command does not match).
    cluster
        .send_console(
            node,
            &format!(
                "mkdir -p /data && mount -t ext4 {SAMPLE_DATA_PARTITION} /data && \
                 (for k in 1 2 3 4 5 6 7 8; do dd if=/system/data/blob.bin of=/data/f$k bs=64k \
                 conv=fsync 2>/dev/null && echo \"fsynced-$((k+100))\" || echo \"failed-$((k+100))\"; \
                 done; echo \"writer-$((40+2))-done\") &"
            ),
        )
        .unwrap();
    cluster
        .wait_for_console(node, "fsynced-102", COMMAND_TIMEOUT)
        .unwrap();
    // The server dies while the guest writes and fsyncs.
    let first = cluster.node(node).unwrap().serve_pid().unwrap();
    // SAFETY: kill takes no pointers; the PID is our own child's.
    assert_eq!(unsafe { libc::kill(pid_t(first), libc::SIGKILL) }, 0);
    // Waiting on the console restarts it; QEMU reconnects; the writer ends.
    let done = cluster
        .wait_for_console(node, "writer-42-done", BOOT_TIMEOUT)
        .unwrap();
    assert!(!done.text.contains("failed-"), "{}", done.text);
    let n = cluster.node(node).unwrap();
    assert_eq!(n.serve_restarts(), 1);
    let second = n.serve_pid().unwrap();
    assert_ne!(first, second);
    let check = "want=$(sha256sum < /system/data/blob.bin) && r=ok && \
                 for k in 1 2 3 4 5 6 7 8; do \
                 [ \"$(sha256sum < /data/f$k)\" = \"$want\" ] || r=\"f$k differs\"; done";
    let drop_caches = "sync && echo 3 > /proc/sys/vm/drop_caches";
    assert_eq!(
        guest_result(&mut cluster, node, &format!("{drop_caches} && {check}")),
        "ok"
    );
    assert_eq!(
        guest_result(&mut cluster, node, "umount /data && r=unmounted"),
        "unmounted"
    );
    cluster.shutdown().unwrap();
    assert_torn_down(state.path(), &[first, second]);

    // A fresh boot on the same disk finds every file.
    let mut again = booted_node(state.path());
    assert_eq!(
        guest_result(
            &mut again,
            node,
            &format!(
                "mkdir -p /data && mount -t ext4 -o ro {SAMPLE_DATA_PARTITION} /data && {check}"
            )
        ),
        "ok"
    );
    again.shutdown().unwrap();
    assert_torn_down(state.path(), &[]);
}
