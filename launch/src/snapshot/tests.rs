//! Saves and forks of clusters' files, without guests, and every
//! refusal of a cluster.json.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ociblk_overlay::ChainEntry;
use sha2::{Digest as _, Sha256};

use super::files::recorded_chain;
use super::json::digest_text;
use super::*;
use crate::{
    ClusterSpec, NodeSpec, OVERLAY_FILE, OVMF_VARS_FILE, TPM_STATE_DIR, TpmSpec, VMSTATE_FILE,
};

type Json = serde_json::Value;
/// A change to a cluster.json, for a refusal.
type Edit = Box<dyn Fn(&mut Json)>;

/// A spec as loaded from `dir`: a chain of two layers, the top one
/// the node's own.
fn sample(dir: &Path) -> SnapshotSpec {
    SnapshotSpec {
        version: SPEC_VERSION,
        image: "/img".into(),
        serve_args: vec!["--flush".into(), "unsafe".into()],
        queues: 2,
        network: true,
        uplink: false,
        tpm: true,
        running: None,
        nodes: vec![SnapshotNode {
            name: "node-1".into(),
            serve_args: vec![],
            layers: vec![
                "/s1/node-1/disk.layer".into(),
                dir.join("node-1/disk.layer"),
            ],
            digests: Some(NodeDigests {
                layers: vec![[1; 32], [2; 32]],
                ovmf_vars: [3; 32],
                tpm_state: BTreeMap::from([("tpm2-00.permall".to_owned(), [4; 32])]),
                vmstate: None,
            }),
            vmstate: None,
        }],
    }
}

/// Writes `spec`'s cluster.json into `dir`, changed by `edit`.
fn write_spec(dir: &Path, spec: &SnapshotSpec, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut json: serde_json::Value = serde_json::from_slice(&spec.to_json(dir).unwrap()).unwrap();
    edit(&mut json);
    fs::write(dir.join(SPEC_FILE), serde_json::to_vec(&json).unwrap()).unwrap();
}

#[test]
fn a_spec_round_trips_and_gives_a_fork_its_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let spec = sample(dir.path());
    write_spec(dir.path(), &spec, |_| {});
    let loaded = load(dir.path()).unwrap();
    assert_eq!(loaded, spec);
    let fork = loaded.cluster_spec(Path::new("/fork")).unwrap();
    assert_eq!(fork.nodes, [NodeSpec::new("node-1")]);
    assert_eq!(fork.serve_args, spec.serve_args);
    assert!(fork.tpm.is_some());
    assert!(fork.network.as_ref().is_some_and(|n| !n.uplink));
    // The node's own layer is named relative to the snapshot, the
    // earlier snapshot's by its absolute path; every digest is there.
    let text = fs::read_to_string(dir.path().join(SPEC_FILE)).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let layers = &json["nodes"][0]["layers"];
    assert_eq!(layers[0]["path"], "/s1/node-1/disk.layer");
    assert_eq!(layers[1]["path"], "node-1/disk.layer");
    assert_eq!(layers[1]["digest"], digest_text(&[2; 32]));
    assert_eq!(json["nodes"][0]["ovmf_vars"], digest_text(&[3; 32]));
    assert_eq!(
        json["nodes"][0]["tpm_state"]["tpm2-00.permall"],
        digest_text(&[4; 32])
    );
}

#[test]
fn bad_specs_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(err.to_string().contains(SPEC_FILE), "{err}");
    let spec = sample(dir.path());
    let cases: [(Edit, &str); 3] = [
        (Box::new(|j| j["version"] = 9.into()), "version 9"),
        (Box::new(|j| j["nodes"] = serde_json::json!([])), "no nodes"),
        (
            Box::new(|j| *j = serde_json::json!({"version": 1})),
            "missing field",
        ),
    ];
    for (edit, want) in cases {
        write_spec(dir.path(), &spec, edit);
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.contains(SPEC_FILE) && err.contains(want), "{err}");
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Save and fork of a stopped cluster's files, without guests: an
/// overlay holding one written block, an OVMF store, a TPM state.
#[test]
fn save_freezes_and_copies_and_a_fork_gets_its_own_files_over_the_layer() {
    use ociblk_overlay::{FlushMode, Overlay, OverlayConfig};
    let dir = tempfile::tempdir().unwrap();
    let (state, snap, fork) = (
        dir.path().join("state"),
        dir.path().join("snap"),
        dir.path().join("fork"),
    );
    let node = state.join("n-1");
    fs::create_dir_all(node.join(TPM_STATE_DIR)).unwrap();
    let cfg = OverlayConfig {
        disk_size: 1 << 20,
        fingerprint: [7; 32],
        flush: FlushMode::Safe,
    };
    Overlay::open(node.join(OVERLAY_FILE), cfg.clone())
        .unwrap()
        .close()
        .unwrap();
    fs::write(node.join(OVMF_VARS_FILE), b"vars").unwrap();
    fs::write(node.join(TPM_STATE_DIR).join("tpm2-00.permall"), b"tpm").unwrap();
    fs::write(node.join(TPM_STATE_DIR).join(".lock"), b"").unwrap();
    let mut spec = ClusterSpec::new("/img", &state, NodeSpec::numbered("n", 1));
    spec.tpm = Some(TpmSpec::default());

    let saved = save(&spec, &snap).unwrap();
    let layer_path = snap.join("n-1").join(LAYER_FILE);
    assert_eq!(saved.nodes[0].layers, std::slice::from_ref(&layer_path));
    assert_eq!(load(&snap).unwrap(), saved);
    for file in [
        snap.join(SPEC_FILE),
        layer_path.clone(),
        snap.join("n-1").join(OVMF_VARS_FILE),
        snap.join("n-1/tpm/tpm2-00.permall"),
    ] {
        assert_eq!(mode(&file), FILE_MODE, "{}", file.display());
    }
    assert!(!snap.join("n-1/tpm/.lock").exists());
    // The node's own overlay now sits on the new layer.
    let own = Overlay::open(node.join(OVERLAY_FILE), cfg.clone()).unwrap();
    assert_eq!(own.chain().layers().len(), 1);
    own.close().unwrap();

    prepare_fork(&saved, &snap, &fork).unwrap().keep();
    let forked = Overlay::open(fork.join("n-1").join(OVERLAY_FILE), cfg).unwrap();
    assert_eq!(forked.chain().layers()[0].path(), layer_path);
    forked.close().unwrap();
    for (file, content) in [
        (OVMF_VARS_FILE, &b"vars"[..]),
        ("tpm/tpm2-00.permall", &b"tpm"[..]),
    ] {
        let copy = fork.join("n-1").join(file);
        assert_eq!(fs::read(&copy).unwrap(), content);
        assert_eq!(mode(&copy), PRIVATE_FILE_MODE, "{}", copy.display());
    }
    let err = prepare_fork(&saved, &snap, &fork).unwrap_err();
    assert!(
        matches!(&err, SnapshotError::NodeExists { node, .. } if node == "n-1"),
        "{err}"
    );
}

/// A running save's files without guests: the VM state moves into the
/// snapshot with its digest; a fork restores it and refuses one that
/// was changed; cluster.json's running fields are checked together.
#[test]
fn a_running_save_moves_the_vm_state_and_a_fork_restores_it() {
    let dir = tempfile::tempdir().unwrap();
    let (state, snap) = (dir.path().join("state"), dir.path().join("snap"));
    stopped_node(&state, "n-1");
    let vmstate = state.join("n-1").join(VMSTATE_FILE);
    fs::write(&vmstate, b"memory").unwrap();
    let mut spec = ClusterSpec::new("/img", &state, NodeSpec::numbered("n", 1));
    spec.tpm = Some(TpmSpec::default());
    spec.qemu.memory_mib = 300;
    spec.qemu.cpus = 3;

    let saved = save_running(&spec, &snap).unwrap();
    let moved = snap.join("n-1").join(VMSTATE_FILE);
    assert_eq!(fs::read(&moved).unwrap(), b"memory");
    assert_eq!(mode(&moved), FILE_MODE);
    assert!(!vmstate.exists(), "the state directory kept the VM state");
    let machine = RunningMachine {
        memory_mib: 300,
        cpus: 3,
    };
    assert_eq!(saved.running, Some(machine));
    assert_eq!(saved.nodes[0].vmstate.as_deref(), Some(moved.as_path()));
    assert_eq!(load(&snap).unwrap(), saved);
    let text = fs::read_to_string(snap.join(SPEC_FILE)).unwrap();
    let json: Json = serde_json::from_str(&text).unwrap();
    assert_eq!(json["running"], true);
    assert_eq!(json["machine"]["memory_mib"], 300);
    let digest: [u8; 32] = Sha256::digest(b"memory").into();
    assert_eq!(json["nodes"][0]["vmstate"], digest_text(&digest));

    let fork = saved.cluster_spec(&dir.path().join("fork")).unwrap();
    assert_eq!(fork.nodes[0].vmstate.as_deref(), Some(moved.as_path()));
    assert_eq!((fork.qemu.memory_mib, fork.qemu.cpus), (300, 3));
    prepare_fork(&saved, &snap, &dir.path().join("fork"))
        .unwrap()
        .keep();
    // A changed VM state is refused by name, and the fork leaves nothing.
    fs::set_permissions(&moved, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(&moved, b"other").unwrap();
    let other = dir.path().join("other");
    let err = prepare_fork(&saved, &snap, &other).unwrap_err();
    assert!(
        matches!(&err, SnapshotError::Mismatch { what: "VM state", path, .. } if *path == moved),
        "{err}"
    );
    assert!(!other.exists());

    let cases: [(Edit, &str); 4] = [
        (Box::new(|j| j["machine"] = Json::Null), "machine: missing"),
        (
            Box::new(|j| j["nodes"][0]["vmstate"] = Json::Null),
            "nodes[0].vmstate: missing",
        ),
        (
            Box::new(|j| {
                j["running"] = false.into();
                j["machine"] = Json::Null;
            }),
            "nodes[0].vmstate: a VM state, but the snapshot is not running",
        ),
        (
            Box::new(|j| j["machine"]["cpus"] = 0.into()),
            "machine: no memory or no vCPU",
        ),
    ];
    for (edit, want) in cases {
        fs::set_permissions(&snap, fs::Permissions::from_mode(0o700)).unwrap();
        let _ = fs::remove_file(snap.join(SPEC_FILE));
        write_spec(&snap, &saved, edit);
        let err = load(&snap).unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
    }
}

/// A stopped node `name` under `state`: a closed overlay, an OVMF
/// store and a TPM state.
fn stopped_node(state: &Path, name: &str) {
    use ociblk_overlay::{FlushMode, Overlay, OverlayConfig};
    let node = state.join(name);
    fs::create_dir_all(node.join(TPM_STATE_DIR)).unwrap();
    let cfg = OverlayConfig {
        disk_size: 1 << 20,
        fingerprint: [7; 32],
        flush: FlushMode::Safe,
    };
    Overlay::open(node.join(OVERLAY_FILE), cfg)
        .unwrap()
        .close()
        .unwrap();
    fs::write(node.join(OVMF_VARS_FILE), b"vars").unwrap();
    fs::write(node.join(TPM_STATE_DIR).join("tpm2-00.permall"), b"tpm").unwrap();
}

fn two_node_spec(state: &Path) -> ClusterSpec {
    let mut spec = ClusterSpec::new("/img", state, NodeSpec::numbered("n", 2));
    spec.tpm = Some(TpmSpec::default());
    spec
}

/// The names in `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_save_failing_before_freezing_leaves_nothing_and_freezes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    stopped_node(&state, "n-1");
    stopped_node(&state, "n-2");
    let missing = state.join("n-2").join(OVMF_VARS_FILE);
    fs::remove_file(&missing).unwrap();
    let spec = two_node_spec(&state);
    let overlay_before = fs::read(state.join("n-1").join(OVERLAY_FILE)).unwrap();

    // A new directory (and its new parent) go again.
    let snap = dir.path().join("new").join("snap");
    let err = save(&spec, &snap).unwrap_err().to_string();
    assert!(err.contains(&missing.display().to_string()), "{err}");
    assert!(!dir.path().join("new").exists());
    // n-1 was not frozen: its overlay sits on no layer.
    let overlay = state.join("n-1").join(OVERLAY_FILE);
    assert_eq!(fs::read(&overlay).unwrap(), overlay_before);

    // An empty directory that was there stays, empty; so does a
    // failure while copying (a TPM state that is a file).
    let snap = dir.path().join("empty");
    fs::create_dir(&snap).unwrap();
    let err = save(&spec, &snap).unwrap_err().to_string();
    assert!(err.contains("OVMF_VARS"), "{err}");
    assert!(entries(&snap).is_empty());
    fs::write(&missing, b"vars").unwrap();
    let tpm = state.join("n-2").join(TPM_STATE_DIR);
    fs::remove_dir_all(&tpm).unwrap();
    fs::write(&tpm, b"not a directory").unwrap();
    let err = save(&spec, &snap).unwrap_err().to_string();
    assert!(err.contains(&tpm.display().to_string()), "{err}");
    assert!(entries(&snap).is_empty(), "{:?}", entries(&snap));
    assert_eq!(fs::read(&overlay).unwrap(), overlay_before);
}

#[test]
fn a_save_failing_after_a_freeze_keeps_the_layer_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    stopped_node(&state, "n-1");
    stopped_node(&state, "n-2");
    // n-2's overlay is not one: its freeze fails, after n-1's.
    let bad = state.join("n-2").join(OVERLAY_FILE);
    fs::write(&bad, b"").unwrap();
    let snap = dir.path().join("snap");
    let err = save(&two_node_spec(&state), &snap).unwrap_err();
    assert!(
        matches!(&err, SnapshotError::Incomplete { nodes, source, .. }
            if nodes == "n-1" && matches!(**source, SnapshotError::Freeze { ref node, .. } if node == "n-2")),
        "{err}"
    );
    let message = format!("{:#}", anyhow::Error::new(err));
    assert!(
        message.contains("no snapshot") && message.contains("n-2"),
        "{message}"
    );
    assert!(snap.join("n-1").join(LAYER_FILE).is_file());
    assert!(!snap.join(SPEC_FILE).exists());
    load(&snap).unwrap_err();
}

#[test]
fn a_fork_failing_half_way_names_the_cause_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    stopped_node(&state, "n-1");
    stopped_node(&state, "n-2");
    let snap = dir.path().join("snap");
    let saved = save(&two_node_spec(&state), &snap).unwrap();
    let layer = snap.join("n-2").join(LAYER_FILE);
    let vars = snap.join("n-2").join(OVMF_VARS_FILE);
    let writable = |path: &Path| fs::set_permissions(path, fs::Permissions::from_mode(0o600));

    // n-2 fails after n-1's directory was made.
    let check = |what: &str, want: &Path| {
        for fork in [dir.path().join("new/fork"), dir.path().join("existing")] {
            let existed = fork.exists();
            let err = prepare_fork(&saved, &snap, &fork).unwrap_err();
            let message = format!("{:#}", anyhow::Error::new(err));
            assert!(
                message.contains(&want.display().to_string()) && message.contains(what),
                "{message}"
            );
            if existed {
                assert_eq!(entries(&fork), ["other"], "{}", fork.display());
            } else {
                assert!(!dir.path().join("new").exists(), "{message}");
            }
        }
    };
    fs::create_dir(dir.path().join("existing")).unwrap();
    fs::write(dir.path().join("existing/other"), b"").unwrap();

    let moved = dir.path().join("moved.layer");
    fs::rename(&layer, &moved).unwrap();
    check("missing", &layer);
    fs::rename(&moved, &layer).unwrap();

    writable(&layer).unwrap();
    let len = fs::metadata(&layer).unwrap().len();
    fs::OpenOptions::new()
        .append(true)
        .open(&layer)
        .and_then(|mut f| io::Write::write_all(&mut f, b"x"))
        .unwrap();
    check("modified", &layer);
    fs::OpenOptions::new()
        .write(true)
        .open(&layer)
        .and_then(|f| f.set_len(len))
        .unwrap();

    fs::rename(&vars, dir.path().join("moved.fd")).unwrap();
    check("copying", &vars);
    fs::rename(dir.path().join("moved.fd"), &vars).unwrap();

    // A fork not kept (its cluster failed to start) goes again; a
    // kept one stays.
    let fork_dir = dir.path().join("new/fork");
    drop(prepare_fork(&saved, &snap, &fork_dir).unwrap());
    assert!(!dir.path().join("new").exists());
    prepare_fork(&saved, &snap, &fork_dir).unwrap().keep();
    assert_eq!(entries(&fork_dir), ["n-1", "n-2"]);
}

#[test]
fn saving_into_a_non_empty_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("x"), b"").unwrap();
    let spec = ClusterSpec::new("/img", "/state", NodeSpec::numbered("n", 1));
    let err = save(&spec, dir.path()).unwrap_err();
    assert!(matches!(err, SnapshotError::NotEmpty(_)), "{err}");
}

/// A stopped node `name` under `state` whose disk has its block
/// `zeroed` zeroed: its frozen layer differs from an untouched node's.
fn stopped_node_zeroed(state: &Path, name: &str, zeroed: u64) {
    use ociblk_overlay::{FlushMode, Overlay, OverlayConfig};
    stopped_node(state, name);
    let cfg = OverlayConfig {
        disk_size: 1 << 20,
        fingerprint: [7; 32],
        flush: FlushMode::Safe,
    };
    let overlay = Overlay::open(state.join(name).join(OVERLAY_FILE), cfg).unwrap();
    let base = |_: u64, buf: &mut [u8]| {
        buf.fill(0);
        Ok(())
    };
    overlay.write_zeroes(zeroed * 4096, 4096, &base).unwrap();
    overlay.close().unwrap();
}

/// Copies the tree `from` to the new `to`, modes kept.
fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).unwrap();
        }
    }
    let mode = fs::metadata(from).unwrap().permissions();
    fs::set_permissions(to, mode).unwrap();
}

/// The digests of the chain the fork's overlay of `node` records.
fn fork_chain(fork: &Path, node: &str) -> Vec<ChainEntry> {
    recorded_chain(&fork.join(node).join(OVERLAY_FILE)).unwrap()
}

/// A saved one-node snapshot `snap` (node `n-1`, TPM) of an untouched
/// disk, and the layer of another save of the node with a block
/// zeroed: a valid layer of the same disk with another digest.
fn snapshot_and_other_layer(dir: &Path) -> (PathBuf, PathBuf) {
    let state = dir.join("state");
    stopped_node(&state, "n-1");
    let mut spec = ClusterSpec::new("/img", &state, NodeSpec::numbered("n", 1));
    spec.tpm = Some(TpmSpec::default());
    let snap = dir.join("snap");
    save(&spec, &snap).unwrap();
    let other_state = dir.join("other-state");
    stopped_node_zeroed(&other_state, "n-1", 3);
    spec.state_dir = other_state;
    let other = dir.join("other");
    save(&spec, &other).unwrap();
    (snap, other.join("n-1").join(LAYER_FILE))
}

/// Puts `replacement` in place of `path` (a read-only file).
fn replace(path: &Path, replacement: &Path) {
    let bytes = fs::read(replacement).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(path, bytes).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(FILE_MODE)).unwrap();
}

#[test]
fn a_copied_or_moved_snapshot_forks_its_own_layers_and_a_replaced_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (snap, other_layer) = snapshot_and_other_layer(dir.path());
    let own = snap.join("n-1").join(LAYER_FILE);
    let recorded = load(&snap).unwrap().nodes[0].digests.clone().unwrap();
    let copy = dir.path().join("copy");
    copy_tree(&snap, &copy);
    // The original's layer replaced by another valid layer of the disk.
    replace(&own, &other_layer);

    // The copy forks its own, unchanged layer.
    let fork = dir.path().join("fork-of-copy");
    let copied = load(&copy).unwrap();
    assert_eq!(copied.nodes[0].layers, [copy.join("n-1").join(LAYER_FILE)]);
    prepare_fork(&copied, &copy, &fork).unwrap().keep();
    let chain = fork_chain(&fork, "n-1");
    assert_eq!(chain.len(), 1);
    assert_eq!(chain[0].digest, recorded.layers[0]);
    assert_eq!(
        chain[0].path,
        copy.join("n-1").join(LAYER_FILE).as_os_str().as_bytes()
    );

    // The original is refused, naming its layer; nothing is left.
    let fork = dir.path().join("fork-of-original");
    let original = load(&snap).unwrap();
    let err = prepare_fork(&original, &snap, &fork).unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(&err, SnapshotError::Mismatch { path, what: "layer", .. } if *path == own),
        "{message}"
    );
    assert!(
        message.contains(&own.display().to_string())
            && message.contains(&digest_text(&recorded.layers[0])),
        "{message}"
    );
    assert!(!fork.exists());

    // Moved as a whole, the copy still forks.
    let moved = dir.path().join("moved");
    fs::rename(&copy, &moved).unwrap();
    let fork = dir.path().join("fork-of-moved");
    prepare_fork(&load(&moved).unwrap(), &moved, &fork)
        .unwrap()
        .keep();
    assert_eq!(fork_chain(&fork, "n-1")[0].digest, recorded.layers[0]);
}

#[test]
fn a_changed_ovmf_store_or_tpm_state_file_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let (snap, _) = snapshot_and_other_layer(dir.path());
    let saved = load(&snap).unwrap();
    let fork = dir.path().join("fork");
    for (file, what) in [
        (OVMF_VARS_FILE, "OVMF variable store"),
        ("tpm/tpm2-00.permall", "TPM state file"),
    ] {
        let path = snap.join("n-1").join(file);
        let before = fs::read(&path).unwrap();
        let changed = dir.path().join("changed");
        fs::write(&changed, b"changed").unwrap();
        replace(&path, &changed);
        let err = prepare_fork(&saved, &snap, &fork).unwrap_err();
        assert!(
            matches!(&err, SnapshotError::Mismatch { path: p, what: w, .. } if *p == path && *w == what),
            "{err}"
        );
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert!(!fork.exists());
        fs::write(&changed, before).unwrap();
        replace(&path, &changed);
    }
    // A TPM state file gone is named too.
    let tpm_file = snap.join("n-1/tpm/tpm2-00.permall");
    fs::remove_file(&tpm_file).unwrap();
    let err = prepare_fork(&saved, &snap, &fork).unwrap_err();
    assert!(
        err.to_string().contains(&tpm_file.display().to_string()),
        "{err}"
    );
    assert!(!fork.exists());
}

#[test]
fn names_and_paths_in_cluster_json_are_checked_before_anything_is_made() {
    let dir = tempfile::tempdir().unwrap();
    let (snap, _) = snapshot_and_other_layer(dir.path());
    let text = fs::read(snap.join(SPEC_FILE)).unwrap();
    let good: serde_json::Value = serde_json::from_slice(&text).unwrap();
    let state = dir.path().join("a").join("b").join("state");
    let edits: Vec<(&str, Edit)> = vec![
        (
            "nodes[0].name",
            Box::new(|j| j["nodes"][0]["name"] = "../../out".into()),
        ),
        (
            "nodes[0].name",
            Box::new(|j| j["nodes"][0]["name"] = "..".into()),
        ),
        (
            "nodes[0].name",
            Box::new(|j| j["nodes"][0]["name"] = "a/b".into()),
        ),
        (
            "nodes[0].name",
            Box::new(|j| j["nodes"][0]["name"] = "".into()),
        ),
        (
            "nodes[0].layers[0].path",
            Box::new(|j| j["nodes"][0]["layers"][0]["path"] = "../out/disk.layer".into()),
        ),
        (
            "nodes[0].layers[0].path",
            Box::new(|j| j["nodes"][0]["layers"][0]["path"] = "/abs/n-1/disk.layer".into()),
        ),
        (
            "nodes[0].layers[0].path",
            Box::new(|j| {
                let own = j["nodes"][0]["layers"][0].clone();
                j["nodes"][0]["layers"] = serde_json::json!([
                    {"path": "rel/disk.layer", "digest": own["digest"]}, own
                ]);
            }),
        ),
        (
            "nodes[0].layers[0].path",
            Box::new(|j| {
                let own = j["nodes"][0]["layers"][0].clone();
                j["nodes"][0]["layers"] = serde_json::json!([
                    {"path": "/a/../../etc/disk.layer", "digest": own["digest"]}, own
                ]);
            }),
        ),
        (
            "nodes[0].layers[0].digest",
            Box::new(|j| j["nodes"][0]["layers"][0]["digest"] = "sha256:AB".into()),
        ),
        (
            "nodes[0].tpm_state",
            Box::new(|j| {
                j["nodes"][0]["tpm_state"]["../../out"] = j["nodes"][0]["ovmf_vars"].clone();
            }),
        ),
        (
            "nodes[1].name: node \"n-1\" appears twice",
            Box::new(|j| {
                let node = j["nodes"][0].clone();
                j["nodes"].as_array_mut().unwrap().push(node);
            }),
        ),
        (
            "nodes[0].layers: no layers",
            Box::new(|j| j["nodes"][0]["layers"] = serde_json::json!([])),
        ),
    ];
    for (want, edit) in edits {
        let mut json = good.clone();
        edit(&mut json);
        let path = snap.join(SPEC_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
        let err = load(&snap).unwrap_err().to_string();
        assert!(
            err.contains(SPEC_FILE) && err.contains(want),
            "{want}: {err}"
        );
    }
    // A spec built in code is checked by prepare_fork itself.
    let mut spec = parse(&text, &std::path::absolute(&snap).unwrap()).unwrap();
    spec.nodes[0].name = "../../out".into();
    let err = prepare_fork(&spec, &snap, &state).unwrap_err().to_string();
    assert!(err.contains("node name \"../../out\""), "{err}");
    assert!(!dir.path().join("a").exists());
    assert!(!dir.path().join("out").exists());
}

#[test]
fn a_version_1_snapshot_still_forks_from_its_own_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (snap, other_layer) = snapshot_and_other_layer(dir.path());
    let saved = load(&snap).unwrap();
    let recorded = saved.nodes[0].digests.clone().unwrap();
    // cluster.json as an earlier ociblk wrote it: absolute paths only.
    let v1 = serde_json::json!({
        "version": 1,
        "image": "/img",
        "serve_args": [],
        "queues": 2,
        "network": false,
        "uplink": false,
        "tpm": true,
        "nodes": [{"name": "n-1", "serve_args": [], "layers": [snap.join("n-1").join(LAYER_FILE)]}],
    });
    let path = snap.join(SPEC_FILE);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(&path, serde_json::to_vec(&v1).unwrap()).unwrap();
    let copy = dir.path().join("copy");
    copy_tree(&snap, &copy);
    replace(&snap.join("n-1").join(LAYER_FILE), &other_layer);

    let loaded = load(&copy).unwrap();
    assert_eq!(loaded.version, SPEC_VERSION_UNCHECKED);
    assert_eq!(loaded.nodes[0].digests, None);
    assert_eq!(loaded.nodes[0].layers, [copy.join("n-1").join(LAYER_FILE)]);
    let fork = dir.path().join("fork");
    prepare_fork(&loaded, &copy, &fork).unwrap().keep();
    assert_eq!(fork_chain(&fork, "n-1")[0].digest, recorded.layers[0]);
    assert_eq!(
        fs::read(fork.join("n-1/tpm/tpm2-00.permall")).unwrap(),
        b"tpm"
    );
    // A recorded path that is no node's own layer is refused.
    let mut bad = v1.clone();
    bad["nodes"][0]["layers"] = serde_json::json!(["/elsewhere/x.layer"]);
    let err = parse(&serde_json::to_vec(&bad).unwrap(), &copy).unwrap_err();
    assert!(err.contains("nodes[0].layers[0]"), "{err}");
    // Version 1 knew no running snapshots.
    let machine = serde_json::json!({"memory_mib": 256, "cpus": 1});
    for (field, value) in [("running", Json::from(false)), ("machine", machine)] {
        let mut bad = v1.clone();
        bad[field] = value;
        let err = parse(&serde_json::to_vec(&bad).unwrap(), &copy).unwrap_err();
        assert!(
            err.contains("version 1 records no running snapshot"),
            "{err}"
        );
    }
}

#[test]
fn a_directory_without_cluster_json_is_not_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let err = load(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("is not a snapshot directory")
            && err.contains(&dir.path().join(SPEC_FILE).display().to_string()),
        "{err}"
    );
    let missing = dir.path().join("missing");
    let err = load(&missing).unwrap_err().to_string();
    assert!(
        err.contains("is not a snapshot directory") && err.contains("no such directory"),
        "{err}"
    );
    // A FIFO is refused, not waited on.
    let fifo = std::ffi::CString::new(dir.path().join(SPEC_FILE).as_os_str().as_bytes()).unwrap();
    // SAFETY: `fifo` is a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let err = format!("{:#}", anyhow::Error::new(load(dir.path()).unwrap_err()));
    assert!(err.contains("not a regular file"), "{err}");
}
