#![allow(clippy::unwrap_used)]
//! The files `ociblk launch` keeps in a node's state directory are
//! private: the console log (what the guest printed), the server's and
//! swtpm's logs are mode 0600, whatever the umask, also when an earlier
//! launch left them with another mode. No guest boots: QEMU is given an
//! accelerator that does not exist and exits at once, after every log
//! file was made.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use ociblk_launch::{
    CONSOLE_LOG_FILE, Cluster, ClusterSpec, LaunchError, NodeSpec, SERVE_LOG_FILE, TPM_LOG_FILE,
    TpmSpec,
};
use ociblk_tests::cluster::configure_for_test;
use ociblk_tests::support::{require_tool, sample_image};

#[test]
fn node_logs_are_private() {
    require_tool("qemu-system-x86_64");
    let state = tempfile::tempdir().unwrap();
    let node = state.path().join("node-1");
    // A log an earlier launch left, readable by everyone.
    fs::create_dir_all(&node).unwrap();
    let old = node.join(SERVE_LOG_FILE);
    fs::write(&old, b"an earlier launch").unwrap();
    fs::set_permissions(&old, fs::Permissions::from_mode(0o644)).unwrap();

    let mut spec = ClusterSpec::new(sample_image(), state.path(), NodeSpec::numbered("node", 1));
    configure_for_test(&mut spec);
    spec.tpm = Some(TpmSpec {
        binary: require_tool("swtpm"),
    });
    spec.qemu.accel = "no-such-accelerator".into();
    let err = Cluster::launch(spec).unwrap_err();
    assert!(matches!(err, LaunchError::QemuExited { .. }), "{err}");

    for name in [CONSOLE_LOG_FILE, SERVE_LOG_FILE, TPM_LOG_FILE] {
        let path = node.join(name);
        let mode = fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{} has mode {mode:o}", path.display());
    }
    let log = fs::read_to_string(&old).unwrap();
    assert!(!log.contains("an earlier launch"), "{log}");
}
