//! Saved clusters and their forks.
//!
//! A snapshot directory holds, per node, its disk frozen into a layer
//! (`<node>/disk.layer`), its OVMF variable store and (with a TPM) its
//! swtpm state, and `cluster.json`: what was launched and each node's
//! chain of layers. Every file in it is read-only (0400) and is only ever
//! read again: a fork gets a fresh top overlay over the node's chain and
//! its own copies of the small state files, so any number of forks run
//! side by side and the snapshot stays byte-identical.
//!
//! `cluster.json` is written last, under a temporary name renamed into
//! place: a directory without it is not a snapshot.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{ClusterSpec, NodeSpec, OVERLAY_FILE, OVMF_VARS_FILE, TPM_STATE_DIR, TpmSpec};
use crate::overlay::OverlayError;
use crate::overlay::layer;

/// The snapshot's description, written last.
pub const SPEC_FILE: &str = "cluster.json";
/// A node's disk, frozen.
pub const LAYER_FILE: &str = "disk.layer";
/// Version of `cluster.json`'s format.
const SPEC_VERSION: u32 = 1;
/// Mode of every file in a snapshot, and of its directories.
const FILE_MODE: u32 = 0o400;
const DIR_MODE: u32 = 0o700;
/// Mode of a fork's copies of the small state files.
const PRIVATE_FILE_MODE: u32 = 0o600;

/// What a snapshot holds: enough to launch the cluster again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotSpec {
    pub version: u32,
    /// The OS image the nodes' disks are computed from: an absolute
    /// directory, or a registry reference pinned to its manifest digest.
    pub image: PathBuf,
    pub serve_args: Vec<String>,
    pub queues: u16,
    /// The nodes had a shared network (`--network`) and an uplink.
    pub network: bool,
    pub uplink: bool,
    /// The nodes had a TPM; its state is saved.
    pub tpm: bool,
    pub nodes: Vec<SnapshotNode>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotNode {
    pub name: String,
    pub serve_args: Vec<String>,
    /// The node's chain, bottom first, absolute; the last one is this
    /// snapshot's `<node>/disk.layer`, the others are earlier snapshots'.
    pub layers: Vec<PathBuf>,
}

/// Why a save or a fork failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {action}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("snapshot directory {0} exists and is not empty; a snapshot goes into a new directory")]
    NotEmpty(PathBuf),
    #[error("node {node}: freezing its overlay")]
    Freeze {
        node: String,
        #[source]
        source: OverlayError,
    },
    #[error("node {node}: creating the fork's overlay {path}")]
    CreateOverlay {
        node: String,
        path: PathBuf,
        #[source]
        source: OverlayError,
    },
    #[error("{path} is not a snapshot: {reason}")]
    BadSpec { path: PathBuf, reason: String },
    #[error("node {node}: {dir} already holds a node; a fork starts in a fresh state directory")]
    NodeExists { node: String, dir: PathBuf },
}

fn io_error(path: &Path, action: &'static str) -> impl FnOnce(io::Error) -> SnapshotError {
    let path = path.to_owned();
    move |source| SnapshotError::Io {
        path,
        action,
        source,
    }
}

/// Saves a stopped cluster launched from `spec` into the new directory
/// `snapshot_dir`: freezes every node's overlay into a layer there (the
/// node's overlay then sits over it, like after a fork), copies the OVMF
/// variable stores and TPM states, and writes `cluster.json`. The
/// cluster must be shut down (its backends exited: freezing refuses an
/// overlay in use).
pub fn save(spec: &ClusterSpec, snapshot_dir: &Path) -> Result<SnapshotSpec, SnapshotError> {
    if fs::read_dir(snapshot_dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(SnapshotError::NotEmpty(snapshot_dir.to_owned()));
    }
    fs::create_dir_all(snapshot_dir).map_err(io_error(snapshot_dir, "creating"))?;
    let snapshot_dir =
        std::path::absolute(snapshot_dir).map_err(io_error(snapshot_dir, "resolving"))?;
    let state_dir =
        std::path::absolute(&spec.state_dir).map_err(io_error(&spec.state_dir, "resolving"))?;
    // A registry reference (pinned to its digest by launch) is kept as it is.
    let image = if spec.image.is_dir() {
        std::path::absolute(&spec.image).map_err(io_error(&spec.image, "resolving"))?
    } else {
        spec.image.clone()
    };
    let mut nodes = Vec::with_capacity(spec.nodes.len());
    for node in &spec.nodes {
        let from = state_dir.join(&node.name);
        let to = snapshot_dir.join(&node.name);
        fs::create_dir(&to).map_err(io_error(&to, "creating"))?;
        let frozen =
            layer::freeze(&from.join(OVERLAY_FILE), &to.join(LAYER_FILE)).map_err(|source| {
                SnapshotError::Freeze {
                    node: node.name.clone(),
                    source,
                }
            })?;
        copy_firmware_state(&from, &to, spec.tpm.is_some(), FILE_MODE)?;
        set_mode(&to, DIR_MODE)?;
        nodes.push(SnapshotNode {
            name: node.name.clone(),
            serve_args: node.serve_args.clone(),
            layers: frozen.chain,
        });
    }
    set_mode(&snapshot_dir, DIR_MODE)?;
    let saved = SnapshotSpec {
        version: SPEC_VERSION,
        image,
        serve_args: spec.serve_args.clone(),
        queues: spec.queues,
        network: spec.network.is_some(),
        uplink: spec.network.as_ref().is_some_and(|n| n.uplink),
        tpm: spec.tpm.is_some(),
        nodes,
    };
    let json = serde_json::to_vec_pretty(&saved).map_err(|e| SnapshotError::BadSpec {
        path: snapshot_dir.join(SPEC_FILE),
        reason: e.to_string(),
    })?;
    let temp = snapshot_dir.join(format!(".{SPEC_FILE}.tmp"));
    let path = snapshot_dir.join(SPEC_FILE);
    fs::write(&temp, json)
        .and_then(|()| fs::set_permissions(&temp, fs::Permissions::from_mode(FILE_MODE)))
        .and_then(|()| fs::File::open(&temp)?.sync_all())
        .and_then(|()| fs::rename(&temp, &path))
        .and_then(|()| fs::File::open(&snapshot_dir)?.sync_all())
        .map_err(io_error(&path, "writing"))?;
    Ok(saved)
}

/// Reads `<snapshot_dir>/cluster.json`.
pub fn load(snapshot_dir: &Path) -> Result<SnapshotSpec, SnapshotError> {
    let path = snapshot_dir.join(SPEC_FILE);
    let text = fs::read(&path).map_err(io_error(&path, "reading"))?;
    let bad = |reason: String| SnapshotError::BadSpec {
        path: path.clone(),
        reason,
    };
    let spec: SnapshotSpec = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    if spec.version != SPEC_VERSION {
        return Err(bad(format!(
            "version {} (this ociblk reads version {SPEC_VERSION})",
            spec.version
        )));
    }
    if spec.nodes.is_empty() {
        return Err(bad("no nodes".into()));
    }
    if let Some(node) = spec.nodes.iter().find(|n| n.layers.is_empty()) {
        return Err(bad(format!("node {:?} has no layers", node.name)));
    }
    Ok(spec)
}

impl SnapshotSpec {
    /// A cluster spec for a fork into `state_dir`: the snapshot's image,
    /// nodes, serve arguments, queues and TPM; the network, if any, on a
    /// segment of its own. QEMU settings are the defaults, for the caller
    /// to adjust.
    pub fn cluster_spec(&self, state_dir: &Path) -> io::Result<ClusterSpec> {
        let nodes = self
            .nodes
            .iter()
            .map(|n| NodeSpec {
                name: n.name.clone(),
                serve_args: n.serve_args.clone(),
            })
            .collect();
        let mut spec = ClusterSpec::new(&self.image, state_dir, nodes);
        spec.serve_args = self.serve_args.clone();
        spec.queues = self.queues;
        spec.tpm = self.tpm.then(TpmSpec::default);
        if self.network {
            spec.network = Some(super::NetworkSpec::on_loopback(self.uplink)?);
        }
        Ok(spec)
    }
}

/// Prepares the node directories of a fork of `snapshot` (loaded from
/// `snapshot_dir`) under `state_dir`, which must not hold these nodes yet:
/// per node a new overlay over its chain and copies of the OVMF variable
/// store and TPM state. Nothing in the snapshot is written.
pub fn prepare_fork(
    snapshot: &SnapshotSpec,
    snapshot_dir: &Path,
    state_dir: &Path,
) -> Result<(), SnapshotError> {
    fs::create_dir_all(state_dir).map_err(io_error(state_dir, "creating"))?;
    for node in &snapshot.nodes {
        let from = snapshot_dir.join(&node.name);
        let to = state_dir.join(&node.name);
        if fs::symlink_metadata(&to).is_ok() {
            return Err(SnapshotError::NodeExists {
                node: node.name.clone(),
                dir: to,
            });
        }
        fs::create_dir(&to).map_err(io_error(&to, "creating"))?;
        let overlay = to.join(OVERLAY_FILE);
        layer::create_over(&overlay, &node.layers).map_err(|source| {
            SnapshotError::CreateOverlay {
                node: node.name.clone(),
                path: overlay.clone(),
                source,
            }
        })?;
        copy_firmware_state(&from, &to, snapshot.tpm, PRIVATE_FILE_MODE)?;
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<(), SnapshotError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(io_error(path, "setting the mode of"))
}

/// Copies a node's firmware state from its directory `from` to `to`: the
/// OVMF variable store and, with `tpm`, the TPM state; the files get `mode`.
fn copy_firmware_state(from: &Path, to: &Path, tpm: bool, mode: u32) -> Result<(), SnapshotError> {
    copy_file(&from.join(OVMF_VARS_FILE), &to.join(OVMF_VARS_FILE), mode)?;
    if tpm {
        copy_dir(&from.join(TPM_STATE_DIR), &to.join(TPM_STATE_DIR), mode)?;
    }
    Ok(())
}

/// Copies one file (contents only) to the new path `to` with `mode`, synced.
fn copy_file(from: &Path, to: &Path, mode: u32) -> Result<(), SnapshotError> {
    fs::copy(from, to).map_err(io_error(from, "copying"))?;
    set_mode(to, mode)?;
    fs::File::open(to)
        .and_then(|f| f.sync_all())
        .map_err(io_error(to, "syncing"))
}

/// Copies the regular files of the directory `from` (swtpm's state: flat)
/// into the new directory `to`, leaving out swtpm's lock file.
fn copy_dir(from: &Path, to: &Path, mode: u32) -> Result<(), SnapshotError> {
    fs::create_dir(to).map_err(io_error(to, "creating"))?;
    let entries = fs::read_dir(from).map_err(io_error(from, "reading"))?;
    for entry in entries {
        let entry = entry.map_err(io_error(from, "reading"))?;
        let name = entry.file_name();
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if !is_file || name == ".lock" {
            continue;
        }
        copy_file(&entry.path(), &to.join(&name), mode)?;
    }
    set_mode(to, DIR_MODE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SnapshotSpec {
        SnapshotSpec {
            version: SPEC_VERSION,
            image: "/img".into(),
            serve_args: vec!["--flush".into(), "unsafe".into()],
            queues: 2,
            network: true,
            uplink: false,
            tpm: true,
            nodes: vec![SnapshotNode {
                name: "node-1".into(),
                serve_args: vec![],
                layers: vec![
                    "/s1/node-1/disk.layer".into(),
                    "/s2/node-1/disk.layer".into(),
                ],
            }],
        }
    }

    #[test]
    fn a_spec_round_trips_and_gives_a_fork_its_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let spec = sample();
        fs::write(
            dir.path().join(SPEC_FILE),
            serde_json::to_vec(&spec).unwrap(),
        )
        .unwrap();
        let loaded = load(dir.path()).unwrap();
        assert_eq!(loaded, spec);
        let fork = loaded.cluster_spec(Path::new("/fork")).unwrap();
        assert_eq!(fork.nodes, [NodeSpec::new("node-1")]);
        assert_eq!(fork.serve_args, spec.serve_args);
        assert!(fork.tpm.is_some());
        assert!(fork.network.as_ref().is_some_and(|n| !n.uplink));
    }

    #[test]
    fn bad_specs_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(dir.path()).unwrap_err();
        assert!(err.to_string().contains(SPEC_FILE), "{err}");
        for (json, want) in [
            (
                serde_json::to_string(&SnapshotSpec {
                    version: 9,
                    ..sample()
                })
                .unwrap(),
                "version 9",
            ),
            (
                serde_json::to_string(&SnapshotSpec {
                    nodes: vec![],
                    ..sample()
                })
                .unwrap(),
                "no nodes",
            ),
            (r#"{"version": 1}"#.to_owned(), "missing field"),
        ] {
            fs::write(dir.path().join(SPEC_FILE), json).unwrap();
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
        use crate::overlay::{FlushMode, Overlay, OverlayConfig};
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

        prepare_fork(&saved, &snap, &fork).unwrap();
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

    #[test]
    fn saving_into_a_non_empty_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("x"), b"").unwrap();
        let spec = ClusterSpec::new("/img", "/state", NodeSpec::numbered("n", 1));
        let err = save(&spec, dir.path()).unwrap_err();
        assert!(matches!(err, SnapshotError::NotEmpty(_)), "{err}");
    }
}
