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
//! place: a directory without it is not a snapshot. A save or a fork that
//! fails half-way removes the directories it made (see [`save`] and
//! [`prepare_fork`]); nothing that existed before is removed.

use std::fs;
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{ClusterSpec, NodeSpec, OVERLAY_FILE, OVMF_VARS_FILE, TPM_STATE_DIR, TpmSpec};
use crate::overlay::OverlayError;
use crate::overlay::layer;
use crate::sys;

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
    #[error(
        "{dir} is incomplete and no snapshot (it has no cluster.json); the overlays of \
         nodes {nodes} now sit over its layers: keep it while their state directories are used"
    )]
    Incomplete {
        dir: PathBuf,
        nodes: String,
        #[source]
        source: Box<SnapshotError>,
    },
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
///
/// Every node's files are checked and its firmware state copied before
/// any overlay is frozen, so that most failures (a missing file, a
/// directory that cannot be written) leave nothing behind: what the save
/// made is removed again, and an empty `snapshot_dir` that existed stays.
/// Once an overlay was frozen its node sits on the new layer, which must
/// stay: a failure from then on leaves `snapshot_dir` without
/// `cluster.json` ([`SnapshotError::Incomplete`]), which is no snapshot.
pub fn save(spec: &ClusterSpec, snapshot_dir: &Path) -> Result<SnapshotSpec, SnapshotError> {
    if fs::read_dir(snapshot_dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(SnapshotError::NotEmpty(snapshot_dir.to_owned()));
    }
    let mut made = MadeDirs::default();
    let mut frozen = Vec::new();
    let saved = save_into(spec, snapshot_dir, &mut made, &mut frozen);
    match saved {
        Ok(saved) => {
            made.forget();
            Ok(saved)
        }
        Err(source) if frozen.is_empty() => {
            // Nothing depends on the directory yet: remove what we made.
            drop(made);
            Err(source)
        }
        Err(source) => {
            made.forget();
            Err(SnapshotError::Incomplete {
                dir: snapshot_dir.to_owned(),
                nodes: frozen.join(", "),
                source: Box::new(source),
            })
        }
    }
}

/// The body of [`save`]: records the directories it makes in `made` and
/// the nodes whose overlays it froze in `frozen`.
fn save_into(
    spec: &ClusterSpec,
    snapshot_dir: &Path,
    made: &mut MadeDirs,
    frozen: &mut Vec<String>,
) -> Result<SnapshotSpec, SnapshotError> {
    let state_dir =
        std::path::absolute(&spec.state_dir).map_err(io_error(&spec.state_dir, "resolving"))?;
    // Everything a node's save reads must be there before anything is made.
    for node in &spec.nodes {
        let from = state_dir.join(&node.name);
        let mut needed = vec![from.join(OVERLAY_FILE), from.join(OVMF_VARS_FILE)];
        if spec.tpm.is_some() {
            needed.push(from.join(TPM_STATE_DIR));
        }
        for path in needed {
            fs::metadata(&path).map_err(io_error(&path, "reading"))?;
        }
    }
    made.create_all(snapshot_dir)
        .map_err(io_error(snapshot_dir, "creating"))?;
    let snapshot_dir =
        std::path::absolute(snapshot_dir).map_err(io_error(snapshot_dir, "resolving"))?;
    // A registry reference (pinned to its digest by launch) is kept as it is.
    let image = if spec.image.is_dir() {
        std::path::absolute(&spec.image).map_err(io_error(&spec.image, "resolving"))?
    } else {
        spec.image.clone()
    };
    for node in &spec.nodes {
        let to = snapshot_dir.join(&node.name);
        made.create(&to).map_err(io_error(&to, "creating"))?;
        copy_firmware_state(
            &state_dir.join(&node.name),
            &to,
            spec.tpm.is_some(),
            FILE_MODE,
        )?;
    }
    let mut nodes = Vec::with_capacity(spec.nodes.len());
    for node in &spec.nodes {
        let from = state_dir.join(&node.name);
        let to = snapshot_dir.join(&node.name);
        let layers =
            layer::freeze(&from.join(OVERLAY_FILE), &to.join(LAYER_FILE)).map_err(|source| {
                SnapshotError::Freeze {
                    node: node.name.clone(),
                    source,
                }
            })?;
        frozen.push(node.name.clone());
        set_mode(&to, DIR_MODE)?;
        nodes.push(SnapshotNode {
            name: node.name.clone(),
            serve_args: node.serve_args.clone(),
            layers: layers.chain,
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
        .and_then(|()| sys::sync_dir(&snapshot_dir))
        .map_err(|source| {
            let _ = fs::remove_file(&temp);
            io_error(&path, "writing")(source)
        })?;
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
/// `snapshot_dir`) under `state_dir`, which must not hold these nodes yet
/// (it may exist and hold other things): per node a new overlay over its
/// chain and copies of the OVMF variable store and TPM state. Nothing in
/// the snapshot is written.
///
/// On an error nothing it made is left; on success the returned [`Fork`]
/// removes the node directories again when dropped, until
/// [`Fork::keep`]: keep it until the fork's cluster is running, so that
/// a launch failing half-way leaves nothing either.
pub fn prepare_fork(
    snapshot: &SnapshotSpec,
    snapshot_dir: &Path,
    state_dir: &Path,
) -> Result<Fork, SnapshotError> {
    for node in &snapshot.nodes {
        let to = state_dir.join(&node.name);
        if fs::symlink_metadata(&to).is_ok() {
            return Err(SnapshotError::NodeExists {
                node: node.name.clone(),
                dir: to,
            });
        }
    }
    let mut fork = Fork {
        made: MadeDirs::default(),
    };
    fork.made
        .create_all(state_dir)
        .map_err(io_error(state_dir, "creating"))?;
    for node in &snapshot.nodes {
        let from = snapshot_dir.join(&node.name);
        let to = state_dir.join(&node.name);
        fork.made.create(&to).map_err(io_error(&to, "creating"))?;
        let overlay = to.join(OVERLAY_FILE);
        layer::create_over(&overlay, &node.layers).map_err(|source| {
            SnapshotError::CreateOverlay {
                node: node.name.clone(),
                path: overlay.clone(),
                source,
            }
        })?;
        copy_firmware_state(&from, &to, snapshot.tpm, PRIVATE_FILE_MODE)?;
        sync_dir(&to)?;
    }
    // The node directories' own entries, so that a fork that returned
    // survives a host crash whole.
    sync_dir(state_dir)?;
    Ok(fork)
}

/// The directories [`prepare_fork`] made: the nodes' and, if it had to
/// create it, the state directory. Dropping it removes them (stop the
/// fork's processes first); [`Fork::keep`] keeps them.
#[derive(Debug)]
#[must_use = "dropping a Fork removes its node directories"]
pub struct Fork {
    made: MadeDirs,
}

impl Fork {
    /// Keeps the fork's directories: its cluster is running.
    pub fn keep(mut self) {
        self.made.forget();
    }
}

/// Directories made by a save or a fork, in the order they were made;
/// dropped, it removes them again, last first. A directory made as the
/// target itself ([`MadeDirs::create`]) goes with everything in it; a
/// parent made on the way ([`MadeDirs::create_all`]) only if it is empty
/// by then, so that nothing another process put there is lost.
#[derive(Debug, Default)]
struct MadeDirs {
    dirs: Vec<(PathBuf, bool)>,
}

impl MadeDirs {
    /// Creates the new directory `path`, to be removed with its contents.
    fn create(&mut self, path: &Path) -> io::Result<()> {
        fs::create_dir(path)?;
        self.dirs.push((path.to_owned(), true));
        Ok(())
    }

    /// Creates `path` and its missing parents, each to be removed only
    /// if empty; a directory that exists already is left alone.
    fn create_all(&mut self, path: &Path) -> io::Result<()> {
        let missing: Vec<&Path> = path
            .ancestors()
            .filter(|p| !p.as_os_str().is_empty())
            .take_while(|p| fs::symlink_metadata(p).is_err())
            .collect();
        for dir in missing.into_iter().rev() {
            match fs::create_dir(dir) {
                Ok(()) => self.dirs.push((dir.to_owned(), false)),
                // Made by someone else meanwhile: theirs.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn forget(&mut self) {
        self.dirs.clear();
    }
}

impl Drop for MadeDirs {
    fn drop(&mut self) {
        if self.dirs.is_empty() {
            return;
        }
        let mut removed = Vec::new();
        for (dir, with_contents) in self.dirs.drain(..).rev() {
            let result = if with_contents {
                fs::remove_dir_all(&dir)
            } else {
                fs::remove_dir(&dir)
            };
            match result {
                Ok(()) => removed.push(dir.display().to_string()),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), "cannot remove the unfinished directory: {e}")
                }
            }
        }
        if !removed.is_empty() {
            tracing::info!("removed the unfinished directories {}", removed.join(", "));
        }
    }
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
    let mut source = fs::File::open(from).map_err(io_error(from, "copying"))?;
    // Created with its final mode, so a guest's state is never readable by
    // others, not even for a moment; synced through the same handle.
    let mut dest = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(to)
        .map_err(io_error(to, "creating"))?;
    io::copy(&mut source, &mut dest).map_err(io_error(from, "copying"))?;
    dest.sync_all().map_err(io_error(to, "syncing"))
}

fn sync_dir(path: &Path) -> Result<(), SnapshotError> {
    sys::sync_dir(path).map_err(io_error(path, "syncing"))
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
    sync_dir(to)?;
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

    /// A stopped node `name` under `state`: a closed overlay, an OVMF
    /// store and a TPM state.
    fn stopped_node(state: &Path, name: &str) {
        use crate::overlay::{FlushMode, Overlay, OverlayConfig};
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
}
