//! Saved clusters and their forks.
//!
//! A snapshot directory holds, per node, its disk frozen into a layer
//! (`<node>/disk.layer`), its OVMF variable store and (with a TPM) its
//! swtpm state, and `cluster.json`: what was launched, each node's chain
//! of layers and what identifies every file of the node's saved state (the
//! layers' content digests, the sha256 of the OVMF variables and of each
//! TPM state file). Every file in it is read-only (0400) and is only ever
//! read again: a fork gets a fresh top overlay over the node's chain and
//! its own copies of the small state files, so any number of forks run
//! side by side and the snapshot stays byte-identical.
//!
//! `cluster.json` names a node's own layer relative to the snapshot
//! directory (`<node>/disk.layer`), so a snapshot directory moved or copied
//! as a whole forks from where it is; layers of earlier snapshots (a fork
//! saved again) are named by absolute path. A fork checks every layer and
//! file against the digest `cluster.json` records and refuses one that
//! differs, naming it. Every name and path in `cluster.json` is checked
//! when it is read, before anything is made: a node name is a plain file
//! name, never a path.
//!
//! `cluster.json` is written last, under a temporary name renamed into
//! place: a directory without it is not a snapshot. A save or a fork that
//! fails half-way removes the directories it made (see [`save`] and
//! [`prepare_fork`]); nothing that existed before is removed.
//!
//! A running snapshot (`cluster.json` says `"running": true`) also holds
//! each node's VM state (`<node>/vmstate`: memory, CPUs, devices, the TPM's
//! volatile state, written by QEMU's `migrate` while the guests were
//! paused) with its sha256, and the guests' memory size and vCPUs, which
//! the restoring QEMU must match. Its fork loads that state instead of
//! booting ([`NodeSpec::vmstate`]).
//!
//! Format version 1 (written by earlier ociblk: absolute layer paths, no
//! digests) is still read and forked: the node's own layer is taken from
//! the directory being forked (never from the recorded absolute path), the
//! layers below it are bound to it by their parent digests as in every
//! chain, and the OVMF variables and TPM state are copied unchecked (a
//! warning says so). Saving the fork again writes version 2.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use ociblk_digest::Digest;
use ociblk_io::sys;
use ociblk_overlay::format::{self, Kind};
use ociblk_overlay::layer;
use ociblk_overlay::{ChainEntry, OverlayError};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{
    Cluster, ClusterSpec, LaunchError, NodeSpec, OVERLAY_FILE, OVMF_VARS_FILE, TPM_STATE_DIR,
    TpmSpec, VMSTATE_FILE,
};

/// The snapshot's description, written last.
pub const SPEC_FILE: &str = "cluster.json";
/// A node's disk, frozen.
pub const LAYER_FILE: &str = "disk.layer";
/// Version of `cluster.json`'s format written.
pub const SPEC_VERSION: u32 = 2;
/// The version earlier ociblk wrote: absolute layer paths, no digests.
pub const SPEC_VERSION_UNCHECKED: u32 = 1;
/// Largest `cluster.json` read (a 64-node cluster's is a few KiB).
const MAX_SPEC_BYTES: u64 = 1 << 20;
/// Mode of every file in a snapshot, and of its directories.
const FILE_MODE: u32 = 0o400;
const DIR_MODE: u32 = 0o700;
/// Mode of a fork's copies of the small state files.
const PRIVATE_FILE_MODE: u32 = 0o600;
/// swtpm's lock file in its state directory: never saved.
const TPM_LOCK_FILE: &str = ".lock";

/// What a snapshot holds: enough to launch the cluster again. Layer paths
/// are resolved: absolute, the node's own layer in the directory the
/// snapshot was loaded from (or saved into).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotSpec {
    /// The format version of the `cluster.json` it was read from.
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
    /// A running snapshot: the guests' machine, which their VM states need.
    pub running: Option<RunningMachine>,
    pub nodes: Vec<SnapshotNode>,
}

/// What a restoring QEMU must match of the machine a running snapshot's
/// VM states were saved from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunningMachine {
    pub memory_mib: u32,
    pub cpus: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotNode {
    pub name: String,
    pub serve_args: Vec<String>,
    /// The node's chain, bottom first, absolute; the last one is the
    /// snapshot's `<node>/disk.layer`, the others are earlier snapshots'.
    pub layers: Vec<PathBuf>,
    /// What identifies the node's saved state, checked by a fork; `None`
    /// for a snapshot of format version 1, which recorded none.
    pub digests: Option<NodeDigests>,
    /// A running snapshot's `<node>/vmstate`, absolute.
    pub vmstate: Option<PathBuf>,
}

/// What identifies a node's saved state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeDigests {
    /// The content digest of each layer of the chain, bottom first (what
    /// `ociblk overlay info` shows and an overlay records).
    pub layers: Vec<[u8; 32]>,
    /// sha256 of `<node>/OVMF_VARS.fd`.
    pub ovmf_vars: [u8; 32],
    /// sha256 of every file of `<node>/tpm`, by name; empty without a TPM.
    pub tpm_state: BTreeMap<String, [u8; 32]>,
    /// sha256 of `<node>/vmstate`, in a running snapshot.
    pub vmstate: Option<[u8; 32]>,
}

/// `cluster.json`, format version 2.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecFile {
    version: u32,
    image: PathBuf,
    serve_args: Vec<String>,
    queues: u16,
    network: bool,
    uplink: bool,
    tpm: bool,
    /// A running snapshot: every node has a `vmstate`.
    #[serde(default, skip_serializing_if = "is_false")]
    running: bool,
    /// The guests' machine, in a running snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    machine: Option<RunningMachine>,
    nodes: Vec<NodeFile>,
}

fn is_false(value: &bool) -> bool {
    !value
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeFile {
    name: String,
    serve_args: Vec<String>,
    /// Bottom first; the last is `<name>/disk.layer` (relative to the
    /// snapshot directory), the others absolute.
    layers: Vec<LayerFile>,
    /// `sha256:<hex>` of `<name>/OVMF_VARS.fd`.
    ovmf_vars: String,
    /// `sha256:<hex>` of each file of `<name>/tpm`, by name.
    #[serde(default)]
    tpm_state: BTreeMap<String, String>,
    /// `sha256:<hex>` of `<name>/vmstate`, in a running snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vmstate: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LayerFile {
    path: PathBuf,
    /// `sha256:<hex>`: the layer's content digest.
    digest: String,
}

/// `cluster.json`, format version 1.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecFileV1 {
    version: u32,
    image: PathBuf,
    serve_args: Vec<String>,
    queues: u16,
    network: bool,
    uplink: bool,
    tpm: bool,
    nodes: Vec<NodeFileV1>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeFileV1 {
    name: String,
    serve_args: Vec<String>,
    /// Absolute, bottom first.
    layers: Vec<PathBuf>,
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
    #[error("{} is not a snapshot directory: {reason}", dir.display())]
    NotASnapshot { dir: PathBuf, reason: String },
    #[error("{path} is not a snapshot: {reason}")]
    BadSpec { path: PathBuf, reason: String },
    #[error(
        "node {node}: {} is not the {what} cluster.json records: its digest is {found}, \
         cluster.json records {recorded}; the snapshot was changed after it was saved",
        path.display()
    )]
    Mismatch {
        node: String,
        path: PathBuf,
        what: &'static str,
        found: String,
        recorded: String,
    },
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
    #[error("saving the running cluster")]
    Live(#[source] LaunchError),
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
    save_with(spec, snapshot_dir, None)
}

/// Saves a running cluster into the new directory `snapshot_dir`: pauses
/// every guest and saves its VM state ([`Cluster::save_vm_states`],
/// bounded by `timeout`), shuts the cluster down (the backends flush
/// their overlays) and saves it like [`save`], with each node's VM state
/// moved into the snapshot. The cluster does not run on: its forks do.
/// A snapshot directory that is not empty is refused before any guest
/// is paused.
pub fn save_live(
    mut cluster: Cluster,
    spec: &ClusterSpec,
    snapshot_dir: &Path,
    timeout: std::time::Duration,
) -> Result<SnapshotSpec, SnapshotError> {
    if fs::read_dir(snapshot_dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(SnapshotError::NotEmpty(snapshot_dir.to_owned()));
    }
    cluster
        .save_vm_states(timeout)
        .map_err(SnapshotError::Live)?;
    cluster.shutdown().map_err(SnapshotError::Live)?;
    save_running(spec, snapshot_dir)
}

/// [`save`] of a cluster whose VM states [`Cluster::save_vm_states`]
/// wrote (`<state dir>/<node>/vmstate`) before it was shut down: the
/// states are moved into the snapshot (`<node>/vmstate`, read-only, with
/// their sha256 in `cluster.json`, which says `"running": true`). Until
/// the snapshot is complete they stay in the state directory as well.
pub fn save_running(
    spec: &ClusterSpec,
    snapshot_dir: &Path,
) -> Result<SnapshotSpec, SnapshotError> {
    let machine = RunningMachine {
        memory_mib: spec.qemu.memory_mib,
        cpus: spec.qemu.cpus,
    };
    save_with(spec, snapshot_dir, Some(machine))
}

fn save_with(
    spec: &ClusterSpec,
    snapshot_dir: &Path,
    running: Option<RunningMachine>,
) -> Result<SnapshotSpec, SnapshotError> {
    if fs::read_dir(snapshot_dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(SnapshotError::NotEmpty(snapshot_dir.to_owned()));
    }
    let mut made = MadeDirs::default();
    let mut frozen = Vec::new();
    let saved = save_into(spec, snapshot_dir, running, &mut made, &mut frozen);
    match saved {
        Ok(saved) => {
            made.forget();
            if running.is_some() {
                // Moved into the snapshot: the state directory's link goes.
                let state_dir = std::path::absolute(&spec.state_dir)
                    .map_err(io_error(&spec.state_dir, "resolving"))?;
                for node in &spec.nodes {
                    let vmstate = state_dir.join(&node.name).join(VMSTATE_FILE);
                    if let Err(e) = fs::remove_file(&vmstate) {
                        tracing::warn!(path = %vmstate.display(), "cannot remove the saved VM state: {e}");
                    }
                }
            }
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
    running: Option<RunningMachine>,
    made: &mut MadeDirs,
    frozen: &mut Vec<String>,
) -> Result<SnapshotSpec, SnapshotError> {
    let state_dir =
        std::path::absolute(&spec.state_dir).map_err(io_error(&spec.state_dir, "resolving"))?;
    // Node names become directory names here: checked before anything is
    // made (a launched cluster's names were, a spec built in code may not be).
    for node in &spec.nodes {
        crate::spec::check_node_name(&node.name).map_err(|reason| SnapshotError::BadSpec {
            path: snapshot_dir.join(SPEC_FILE),
            reason,
        })?;
    }
    // Everything a node's save reads must be there before anything is made.
    for node in &spec.nodes {
        let from = state_dir.join(&node.name);
        let mut needed = vec![from.join(OVERLAY_FILE), from.join(OVMF_VARS_FILE)];
        if spec.tpm.is_some() {
            needed.push(from.join(TPM_STATE_DIR));
        }
        if running.is_some() {
            needed.push(from.join(VMSTATE_FILE));
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
    let mut firmware = Vec::with_capacity(spec.nodes.len());
    for node in &spec.nodes {
        let to = snapshot_dir.join(&node.name);
        made.create(&to).map_err(io_error(&to, "creating"))?;
        let from = state_dir.join(&node.name);
        let state = save_firmware_state(&from, &to, spec.tpm.is_some())?;
        let vmstate = match running {
            Some(_) => Some(link_vmstate(
                &from.join(VMSTATE_FILE),
                &to.join(VMSTATE_FILE),
            )?),
            None => None,
        };
        firmware.push((state, vmstate));
    }
    let mut nodes = Vec::with_capacity(spec.nodes.len());
    for (node, ((ovmf_vars, tpm_state), vmstate)) in spec.nodes.iter().zip(firmware) {
        let from = state_dir.join(&node.name);
        let to = snapshot_dir.join(&node.name);
        let overlay = from.join(OVERLAY_FILE);
        let layers = layer::freeze(&overlay, &to.join(LAYER_FILE)).map_err(|source| {
            SnapshotError::Freeze {
                node: node.name.clone(),
                source,
            }
        })?;
        frozen.push(node.name.clone());
        set_mode(&to, DIR_MODE)?;
        // The digests of the chain as the node's overlay now records it:
        // what its layers were checked against when it was frozen.
        let chain = recorded_chain(&overlay)?;
        let digests: Vec<[u8; 32]> = chain.iter().map(|e| e.digest).collect();
        if digests.len() != layers.chain.len() || digests.last() != Some(&layers.digest) {
            return Err(SnapshotError::BadSpec {
                path: overlay,
                reason: "the frozen overlay does not record the new layer on top".into(),
            });
        }
        nodes.push(SnapshotNode {
            name: node.name.clone(),
            serve_args: node.serve_args.clone(),
            layers: layers.chain,
            digests: Some(NodeDigests {
                layers: digests,
                ovmf_vars,
                tpm_state,
                vmstate,
            }),
            vmstate: vmstate.map(|_| to.join(VMSTATE_FILE)),
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
        running,
        nodes,
    };
    let path = snapshot_dir.join(SPEC_FILE);
    let json = saved
        .to_json(&snapshot_dir)
        .map_err(|reason| SnapshotError::BadSpec {
            path: path.clone(),
            reason,
        })?;
    let temp = snapshot_dir.join(format!(".{SPEC_FILE}.tmp"));
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

/// The chain the overlay at `path` records in its header, bottom first.
fn recorded_chain(path: &Path) -> Result<Vec<ChainEntry>, SnapshotError> {
    let bad = |reason: String| SnapshotError::BadSpec {
        path: path.to_owned(),
        reason,
    };
    let file = open_regular(path)?;
    let mut header = vec![0u8; format::HEADER_SIZE];
    file.read_exact_at(&mut header, 0)
        .map_err(io_error(path, "reading its header"))?;
    let header = format::parse_header(&header).map_err(|e| bad(e.to_string()))?;
    let Kind::Overlay {
        chain_len,
        chain_bytes,
        chain_crc,
    } = header.kind
    else {
        return Err(bad("a layer, not an overlay".into()));
    };
    if chain_len == 0 {
        return Ok(Vec::new());
    }
    let len = usize::try_from(chain_bytes).map_err(|_| bad("chain too long".into()))?;
    let mut chain = vec![0u8; len];
    file.read_exact_at(&mut chain, format::HEADER_SIZE as u64)
        .map_err(io_error(path, "reading its chain"))?;
    format::parse_chain(&chain, chain_len, chain_crc).map_err(|e| bad(e.to_string()))
}

/// Reads `<snapshot_dir>/cluster.json` and checks every name and path in
/// it; the node's own layers are resolved against `snapshot_dir`.
pub fn load(snapshot_dir: &Path) -> Result<SnapshotSpec, SnapshotError> {
    let dir = std::path::absolute(snapshot_dir).map_err(io_error(snapshot_dir, "resolving"))?;
    let path = dir.join(SPEC_FILE);
    let not_a_snapshot = |reason: String| SnapshotError::NotASnapshot {
        dir: snapshot_dir.to_owned(),
        reason,
    };
    if !dir.is_dir() {
        return Err(not_a_snapshot(
            "no such directory (`ociblk launch --save SNAPDIR` makes one)".into(),
        ));
    }
    let text = match read_spec_file(&path) {
        Err(SnapshotError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Err(not_a_snapshot(format!(
                "it has no {} (`ociblk launch --save` writes it last: a directory without it \
                 holds no complete snapshot)",
                path.display()
            )));
        }
        r => r?,
    };
    let spec = parse(&text, &dir).map_err(|reason| SnapshotError::BadSpec {
        path: path.clone(),
        reason,
    })?;
    if spec.version == SPEC_VERSION_UNCHECKED {
        tracing::warn!(
            snapshot = %snapshot_dir.display(),
            "cluster.json has format version 1 (an earlier ociblk): it records no digests, so the \
             OVMF variables and TPM state are not checked; each node's own layer is taken from \
             this directory. Save a fork of it again for a snapshot that is checked"
        );
    }
    Ok(spec)
}

/// Reads `cluster.json` at `path`: a regular file (a FIFO is refused, not
/// waited on) of at most [`MAX_SPEC_BYTES`].
fn read_spec_file(path: &Path) -> Result<Vec<u8>, SnapshotError> {
    let file = open_regular(path)?;
    let len = file.metadata().map_err(io_error(path, "reading"))?.len();
    if len > MAX_SPEC_BYTES {
        return Err(SnapshotError::BadSpec {
            path: path.to_owned(),
            reason: format!("{len} bytes, more than a cluster.json holds ({MAX_SPEC_BYTES})"),
        });
    }
    let mut text = Vec::new();
    file.take(MAX_SPEC_BYTES)
        .read_to_end(&mut text)
        .map_err(io_error(path, "reading"))?;
    Ok(text)
}

/// Opens `path` for reading if it is a regular file, without waiting on
/// a FIFO.
fn open_regular(path: &Path) -> Result<fs::File, SnapshotError> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_error(path, "reading"))?;
    let meta = file.metadata().map_err(io_error(path, "reading"))?;
    if !meta.file_type().is_file() {
        return Err(io_error(path, "reading")(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    Ok(file)
}

/// Parses the text of a `cluster.json` in `snapshot_dir` (absolute) and
/// checks every name and path in it; the reason names the field at fault.
/// No file is read: what `load` and the fuzzer share.
pub fn parse(text: &[u8], snapshot_dir: &Path) -> Result<SnapshotSpec, String> {
    #[derive(Deserialize)]
    struct Version {
        version: u32,
    }
    let Version { version } = serde_json::from_slice(text).map_err(|e| e.to_string())?;
    let spec = match version {
        SPEC_VERSION => from_v2(
            serde_json::from_slice(text).map_err(|e| e.to_string())?,
            snapshot_dir,
        )?,
        SPEC_VERSION_UNCHECKED => from_v1(
            serde_json::from_slice(text).map_err(|e| e.to_string())?,
            snapshot_dir,
        )?,
        other => {
            return Err(format!(
                "version {other} (this ociblk reads versions {SPEC_VERSION_UNCHECKED} and \
                 {SPEC_VERSION})"
            ));
        }
    };
    spec.check()?;
    Ok(spec)
}

fn from_v2(file: SpecFile, snapshot_dir: &Path) -> Result<SnapshotSpec, String> {
    let mut nodes = Vec::with_capacity(file.nodes.len());
    for (i, node) in file.nodes.into_iter().enumerate() {
        let field = |name: &str| format!("nodes[{i}].{name}");
        crate::spec::check_node_name(&node.name).map_err(|e| format!("{}: {e}", field("name")))?;
        let count = node.layers.len();
        if count == 0 {
            return Err(format!("{}: no layers", field("layers")));
        }
        let own = Path::new(&node.name).join(LAYER_FILE);
        let mut layers = Vec::with_capacity(count);
        let mut digests = Vec::with_capacity(count);
        for (k, layer) in node.layers.into_iter().enumerate() {
            let at = field(&format!("layers[{k}]"));
            if k + 1 == count {
                if layer.path != own {
                    return Err(format!(
                        "{at}.path: {:?} is not {:?}: a node's own layer is in its directory \
                         of the snapshot",
                        layer.path, own
                    ));
                }
                layers.push(snapshot_dir.join(&own));
            } else {
                check_absolute(&layer.path).map_err(|e| format!("{at}.path: {e}"))?;
                layers.push(layer.path);
            }
            digests.push(parse_digest(&layer.digest).map_err(|e| format!("{at}.digest: {e}"))?);
        }
        let ovmf_vars =
            parse_digest(&node.ovmf_vars).map_err(|e| format!("{}: {e}", field("ovmf_vars")))?;
        let vmstate = match (&node.vmstate, file.running) {
            (Some(digest), true) => {
                Some(parse_digest(digest).map_err(|e| format!("{}: {e}", field("vmstate")))?)
            }
            (None, false) => None,
            (Some(_), false) => {
                return Err(format!(
                    "{}: a VM state, but the snapshot is not running",
                    field("vmstate")
                ));
            }
            (None, true) => {
                return Err(format!(
                    "{}: missing: every node of a running snapshot has a VM state",
                    field("vmstate")
                ));
            }
        };
        let mut tpm_state = BTreeMap::new();
        for (name, digest) in node.tpm_state {
            let at = field(&format!("tpm_state[{name:?}]"));
            let digest = parse_digest(&digest).map_err(|e| format!("{at}: {e}"))?;
            tpm_state.insert(name, digest);
        }
        let vmstate_path = vmstate.map(|_| snapshot_dir.join(&node.name).join(VMSTATE_FILE));
        nodes.push(SnapshotNode {
            name: node.name,
            serve_args: node.serve_args,
            layers,
            digests: Some(NodeDigests {
                layers: digests,
                ovmf_vars,
                tpm_state,
                vmstate,
            }),
            vmstate: vmstate_path,
        });
    }
    let running = match (file.running, file.machine) {
        (true, Some(machine)) => Some(machine),
        (false, None) => None,
        (true, None) => return Err("machine: missing: a running snapshot records it".into()),
        (false, Some(_)) => return Err("machine: only a running snapshot records it".into()),
    };
    Ok(SnapshotSpec {
        version: file.version,
        image: file.image,
        serve_args: file.serve_args,
        queues: file.queues,
        network: file.network,
        uplink: file.uplink,
        tpm: file.tpm,
        running,
        nodes,
    })
}

fn from_v1(file: SpecFileV1, snapshot_dir: &Path) -> Result<SnapshotSpec, String> {
    let mut nodes = Vec::with_capacity(file.nodes.len());
    for (i, node) in file.nodes.into_iter().enumerate() {
        let field = |name: &str| format!("nodes[{i}].{name}");
        crate::spec::check_node_name(&node.name).map_err(|e| format!("{}: {e}", field("name")))?;
        let mut layers = node.layers;
        for (k, layer) in layers.iter().enumerate() {
            check_absolute(layer)
                .map_err(|e| format!("{}: {e}", field(&format!("layers[{k}]"))))?;
        }
        // The own layer as saved: <snapshot>/<name>/disk.layer; taken from
        // the directory being forked, wherever the snapshot is now.
        let top = layers.len().saturating_sub(1);
        let Some(own) = layers.last_mut() else {
            return Err(format!("{}: no layers", field("layers")));
        };
        let own_name = Path::new(&node.name).join(LAYER_FILE);
        if !own.ends_with(&own_name) {
            return Err(format!(
                "{}: {} is not a node's own layer (…/{})",
                field(&format!("layers[{top}]")),
                own.display(),
                own_name.display()
            ));
        }
        *own = snapshot_dir.join(own_name);
        nodes.push(SnapshotNode {
            name: node.name,
            serve_args: node.serve_args,
            layers,
            digests: None,
            vmstate: None,
        });
    }
    Ok(SnapshotSpec {
        version: file.version,
        image: file.image,
        serve_args: file.serve_args,
        queues: file.queues,
        network: file.network,
        uplink: file.uplink,
        tpm: file.tpm,
        running: None,
        nodes,
    })
}

/// A path recorded for a layer of an earlier snapshot: absolute, without
/// `.` or `..`, not longer than an overlay can record.
fn check_absolute(path: &Path) -> Result<(), String> {
    let bytes = path.as_os_str().as_bytes();
    if !path.is_absolute() {
        return Err(format!("{} is not an absolute path", path.display()));
    }
    if bytes.contains(&0) || bytes.len() > format::MAX_LAYER_PATH {
        return Err(format!(
            "{} holds a NUL byte or is longer than {} bytes",
            path.display(),
            format::MAX_LAYER_PATH
        ));
    }
    // Components drop "." on their own; "//" and a trailing "/" too.
    if path
        .components()
        .any(|c| !matches!(c, Component::RootDir | Component::Normal(_)))
        || bytes.split(|&b| b == b'/').skip(1).any(|c| c == b".")
    {
        return Err(format!("{} holds a '.' or '..' component", path.display()));
    }
    Ok(())
}

/// A file of a saved TPM state: a plain file name.
fn check_file_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 255
        || name == "."
        || name == ".."
        || name == TPM_LOCK_FILE
        || name.contains(['/', '\0'])
    {
        return Err(format!(
            "{name:?} is not the name of a saved TPM state file"
        ));
    }
    Ok(())
}

/// A digest as the spec records it (see [`Digest`]'s text form).
fn parse_digest(text: &str) -> Result<[u8; 32], String> {
    text.parse::<Digest>()
        .map(|d| *d.sha256())
        .map_err(|e| e.to_string())
}

fn digest_text(digest: &[u8; 32]) -> String {
    Digest::from_sha256(digest).to_string()
}

impl SnapshotSpec {
    /// Checks what a fork relies on, whether the spec was read or built
    /// in code: at least one node, node names that are plain file names
    /// (never paths) and unique, 1 to 64 layers per node, absolute layer
    /// paths without `.` or `..` ending in the node's own layer, and, when
    /// there are digests, one per layer and plain TPM file names (none
    /// without a TPM).
    pub fn check(&self) -> Result<(), String> {
        if self.nodes.is_empty() {
            return Err("no nodes".into());
        }
        if self.image.as_os_str().is_empty() {
            return Err("image: empty".into());
        }
        let mut names = HashSet::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let field = |name: &str| format!("nodes[{i}].{name}");
            crate::spec::check_node_name(&node.name)
                .map_err(|e| format!("{}: {e}", field("name")))?;
            if !names.insert(node.name.as_str()) {
                return Err(format!(
                    "{}: node {:?} appears twice",
                    field("name"),
                    node.name
                ));
            }
            if node.layers.is_empty() || node.layers.len() > format::MAX_CHAIN {
                return Err(format!(
                    "node {:?} has {} layers (1 to {} are possible)",
                    node.name,
                    node.layers.len(),
                    format::MAX_CHAIN
                ));
            }
            // The layers below the node's own: as recorded, absolute. The
            // own one: resolved against the snapshot directory, as given.
            let lower = &node.layers[..node.layers.len() - 1];
            for (k, layer) in lower.iter().enumerate() {
                check_absolute(layer)
                    .map_err(|e| format!("{}: {e}", field(&format!("layers[{k}]"))))?;
            }
            let own = Path::new(&node.name).join(LAYER_FILE);
            if node.layers.last().is_some_and(|l| !l.ends_with(&own)) {
                return Err(format!(
                    "{}: the top layer is not the node's own {}",
                    field("layers"),
                    own.display()
                ));
            }
            let own_vmstate = Path::new(&node.name).join(VMSTATE_FILE);
            match (&self.running, &node.vmstate) {
                (Some(machine), Some(vmstate)) => {
                    if !vmstate.ends_with(&own_vmstate) || !vmstate.is_absolute() {
                        return Err(format!(
                            "{}: {} is not the node's own {}",
                            field("vmstate"),
                            vmstate.display(),
                            own_vmstate.display()
                        ));
                    }
                    if machine.memory_mib == 0 || machine.cpus == 0 {
                        return Err("machine: no memory or no vCPU".into());
                    }
                    if node.digests.as_ref().is_some_and(|d| d.vmstate.is_none()) {
                        return Err(format!("{}: no digest", field("vmstate")));
                    }
                }
                (None, None) => {}
                (Some(_), None) => {
                    return Err(format!(
                        "{}: missing: every node of a running snapshot has a VM state",
                        field("vmstate")
                    ));
                }
                (None, Some(_)) => {
                    return Err(format!(
                        "{}: a VM state, but the snapshot is not running",
                        field("vmstate")
                    ));
                }
            }
            if let Some(digests) = &node.digests {
                if digests.layers.len() != node.layers.len() {
                    return Err(format!(
                        "{}: {} layers but {} digests",
                        field("layers"),
                        node.layers.len(),
                        digests.layers.len()
                    ));
                }
                if !self.tpm && !digests.tpm_state.is_empty() {
                    return Err(format!(
                        "{}: a TPM state, but the nodes have no TPM",
                        field("tpm_state")
                    ));
                }
                for name in digests.tpm_state.keys() {
                    check_file_name(name).map_err(|e| format!("{}: {e}", field("tpm_state")))?;
                }
            }
        }
        Ok(())
    }

    /// The text of `cluster.json` for this snapshot in `snapshot_dir`
    /// (format version 2): the nodes' own layers relative to it. Only a
    /// spec with digests can be written.
    pub fn to_json(&self, snapshot_dir: &Path) -> Result<Vec<u8>, String> {
        let mut nodes = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            let Some(digests) = &node.digests else {
                return Err(format!("node {:?}: no digests to record", node.name));
            };
            let own = snapshot_dir.join(&node.name).join(LAYER_FILE);
            let count = node.layers.len();
            let layers = node
                .layers
                .iter()
                .zip(&digests.layers)
                .enumerate()
                .map(|(k, (path, digest))| LayerFile {
                    path: if k + 1 == count && *path == own {
                        Path::new(&node.name).join(LAYER_FILE)
                    } else {
                        path.clone()
                    },
                    digest: digest_text(digest),
                })
                .collect();
            nodes.push(NodeFile {
                name: node.name.clone(),
                serve_args: node.serve_args.clone(),
                layers,
                ovmf_vars: digest_text(&digests.ovmf_vars),
                tpm_state: digests
                    .tpm_state
                    .iter()
                    .map(|(name, d)| (name.clone(), digest_text(d)))
                    .collect(),
                vmstate: digests.vmstate.as_ref().map(digest_text),
            });
        }
        let file = SpecFile {
            version: SPEC_VERSION,
            image: self.image.clone(),
            serve_args: self.serve_args.clone(),
            queues: self.queues,
            network: self.network,
            uplink: self.uplink,
            tpm: self.tpm,
            running: self.running.is_some(),
            machine: self.running,
            nodes,
        };
        serde_json::to_vec_pretty(&file).map_err(|e| e.to_string())
    }

    /// A cluster spec for a fork into `state_dir`: the snapshot's image,
    /// nodes, serve arguments, queues and TPM; the network, if any, on a
    /// segment of its own (the nodes keep their names, so their MACs and
    /// addresses). QEMU settings are the defaults, for the caller to adjust;
    /// a running snapshot's nodes load their VM states, and its memory size
    /// and vCPUs are set (a restoring QEMU must keep them).
    pub fn cluster_spec(&self, state_dir: &Path) -> io::Result<ClusterSpec> {
        let nodes = self
            .nodes
            .iter()
            .map(|n| NodeSpec {
                name: n.name.clone(),
                serve_args: n.serve_args.clone(),
                rendered_serve_args: None,
                vmstate: n.vmstate.clone(),
            })
            .collect();
        let mut spec = ClusterSpec::new(&self.image, state_dir, nodes);
        if let Some(machine) = self.running {
            spec.qemu.memory_mib = machine.memory_mib;
            spec.qemu.cpus = machine.cpus;
        }
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
/// the snapshot is written. The spec is checked ([`SnapshotSpec::check`])
/// before anything is made; with digests, each layer the new overlay sits
/// on and each copied file must have the digest recorded, or the fork is
/// refused naming it ([`SnapshotError::Mismatch`]).
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
    snapshot.check().map_err(|reason| SnapshotError::BadSpec {
        path: snapshot_dir.join(SPEC_FILE),
        reason,
    })?;
    for node in &snapshot.nodes {
        let to = state_dir.join(&node.name);
        if fs::symlink_metadata(&to).is_ok() {
            return Err(SnapshotError::NodeExists {
                node: node.name.clone(),
                dir: to,
            });
        }
    }
    // The VM states (hundreds of MiB each) are hashed side by side, before
    // any QEMU parses one.
    let vmstate_digests: Vec<Option<Result<[u8; 32], SnapshotError>>> = std::thread::scope(|s| {
        let hashing: Vec<_> = snapshot
            .nodes
            .iter()
            .map(|node| {
                let wanted = node.digests.as_ref().and_then(|d| d.vmstate.as_ref());
                node.vmstate
                    .as_ref()
                    .filter(|_| wanted.is_some())
                    .map(|path| s.spawn(move || file_digest(path)))
            })
            .collect();
        hashing
            .into_iter()
            .map(|h| {
                h.map(|h| {
                    h.join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                })
            })
            .collect()
    });
    let mut fork = Fork {
        made: MadeDirs::default(),
    };
    fork.made
        .create_all(state_dir)
        .map_err(io_error(state_dir, "creating"))?;
    for (node, vmstate_digest) in snapshot.nodes.iter().zip(vmstate_digests) {
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
        match &node.digests {
            Some(digests) => {
                check_chain(node, digests, &overlay)?;
                fork_firmware_state(node, digests, &from, &to, snapshot.tpm)?;
                if let (Some(path), Some(recorded), Some(found)) =
                    (&node.vmstate, &digests.vmstate, vmstate_digest)
                {
                    // Read by the fork's QEMU where it is, never written.
                    let found = found?;
                    if found != *recorded {
                        return Err(SnapshotError::Mismatch {
                            node: node.name.clone(),
                            path: path.clone(),
                            what: "VM state",
                            found: digest_text(&found),
                            recorded: digest_text(recorded),
                        });
                    }
                }
            }
            None => copy_firmware_state(&from, &to, snapshot.tpm, PRIVATE_FILE_MODE)?,
        }
        sync_dir(&to)?;
    }
    // The node directories' own entries, so that a fork that returned
    // survives a host crash whole.
    sync_dir(state_dir)?;
    Ok(fork)
}

/// Checks that the fork's new `overlay` sits on the layers `cluster.json`
/// records: the digests the overlay recorded as it opened them.
fn check_chain(
    node: &SnapshotNode,
    digests: &NodeDigests,
    overlay: &Path,
) -> Result<(), SnapshotError> {
    let chain = recorded_chain(overlay)?;
    for (k, path) in node.layers.iter().enumerate() {
        let found = chain.get(k).map(|e| e.digest);
        if found != Some(digests.layers[k]) {
            return Err(SnapshotError::Mismatch {
                node: node.name.clone(),
                path: path.clone(),
                what: "layer",
                found: found.map_or_else(|| "missing".into(), |d| digest_text(&d)),
                recorded: digest_text(&digests.layers[k]),
            });
        }
    }
    Ok(())
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

/// The sha256 of a node's OVMF variables, and of its TPM state files by name.
type FirmwareDigests = ([u8; 32], BTreeMap<String, [u8; 32]>);

/// Copies a node's firmware state from its state directory `from` into
/// the snapshot's node directory `to` (read-only files): the OVMF variable
/// store and, with `tpm`, the TPM state but its lock file. Returns their
/// digests.
fn save_firmware_state(
    from: &Path,
    to: &Path,
    tpm: bool,
) -> Result<FirmwareDigests, SnapshotError> {
    let ovmf_vars = copy_file(
        &from.join(OVMF_VARS_FILE),
        &to.join(OVMF_VARS_FILE),
        FILE_MODE,
    )?;
    let tpm_state = if tpm {
        copy_dir(
            &from.join(TPM_STATE_DIR),
            &to.join(TPM_STATE_DIR),
            FILE_MODE,
        )?
    } else {
        BTreeMap::new()
    };
    Ok((ovmf_vars, tpm_state))
}

/// Copies a node's firmware state from the snapshot's node directory
/// `from` into the fork's `to` (private files): the OVMF variable store
/// and the TPM state files `cluster.json` lists, each checked against its
/// recorded digest.
fn fork_firmware_state(
    node: &SnapshotNode,
    digests: &NodeDigests,
    from: &Path,
    to: &Path,
    tpm: bool,
) -> Result<(), SnapshotError> {
    let check = |path: PathBuf, what, found: [u8; 32], recorded: &[u8; 32]| {
        if found == *recorded {
            return Ok(());
        }
        Err(SnapshotError::Mismatch {
            node: node.name.clone(),
            path,
            what,
            found: digest_text(&found),
            recorded: digest_text(recorded),
        })
    };
    let vars = from.join(OVMF_VARS_FILE);
    let found = copy_file(&vars, &to.join(OVMF_VARS_FILE), PRIVATE_FILE_MODE)?;
    check(vars, "OVMF variable store", found, &digests.ovmf_vars)?;
    if tpm {
        let (from, to) = (from.join(TPM_STATE_DIR), to.join(TPM_STATE_DIR));
        fs::create_dir(&to).map_err(io_error(&to, "creating"))?;
        for (name, recorded) in &digests.tpm_state {
            let file = from.join(name);
            let found = copy_file(&file, &to.join(name), PRIVATE_FILE_MODE)?;
            check(file, "TPM state file", found, recorded)?;
        }
        sync_dir(&to)?;
        set_mode(&to, DIR_MODE)?;
    }
    Ok(())
}

/// Copies a node's firmware state from its directory `from` to `to`: the
/// OVMF variable store and, with `tpm`, the TPM state; the files get
/// `mode`. For a snapshot without digests (format version 1).
fn copy_firmware_state(from: &Path, to: &Path, tpm: bool, mode: u32) -> Result<(), SnapshotError> {
    copy_file(&from.join(OVMF_VARS_FILE), &to.join(OVMF_VARS_FILE), mode)?;
    if tpm {
        copy_dir(&from.join(TPM_STATE_DIR), &to.join(TPM_STATE_DIR), mode)?;
    }
    Ok(())
}

/// Copies one regular file (contents only) to the new path `to` with
/// `mode`, synced; returns the sha256 of what it copied.
fn copy_file(from: &Path, to: &Path, mode: u32) -> Result<[u8; 32], SnapshotError> {
    let mut source = open_regular(from).map_err(|e| match e {
        SnapshotError::Io { path, source, .. } => SnapshotError::Io {
            path,
            action: "copying",
            source,
        },
        e => e,
    })?;
    // Created with its final mode, so a guest's state is never readable by
    // others, not even for a moment; synced through the same handle.
    let mut dest = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(to)
        .map_err(io_error(to, "creating"))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match source.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error(from, "copying")(e)),
        };
        hasher.update(&buf[..n]);
        dest.write_all(&buf[..n]).map_err(io_error(to, "writing"))?;
    }
    dest.sync_all().map_err(io_error(to, "syncing"))?;
    Ok(hasher.finalize().into())
}

/// Puts the VM state `from` (in a node's state directory) into the
/// snapshot at `to`, read-only: a second link to the same file where the
/// file system allows (the state directory's link goes once the snapshot
/// is complete), else a copy. Returns its sha256.
fn link_vmstate(from: &Path, to: &Path) -> Result<[u8; 32], SnapshotError> {
    match fs::hard_link(from, to) {
        Ok(()) => {
            set_mode(to, FILE_MODE)?;
            file_digest(to)
        }
        Err(e) if e.kind() == io::ErrorKind::CrossesDevices => copy_file(from, to, FILE_MODE),
        Err(e) => Err(io_error(to, "linking the VM state to")(e)),
    }
}

/// The sha256 of a regular file's content.
fn file_digest(path: &Path) -> Result<[u8; 32], SnapshotError> {
    let mut file = open_regular(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(path, "reading")(e)),
        }
    }
    Ok(hasher.finalize().into())
}

fn sync_dir(path: &Path) -> Result<(), SnapshotError> {
    sys::sync_dir(path).map_err(io_error(path, "syncing"))
}

/// Copies the regular files of the directory `from` (swtpm's state: flat)
/// into the new directory `to`, leaving out swtpm's lock file; returns
/// each copied file's sha256 by name.
fn copy_dir(
    from: &Path,
    to: &Path,
    mode: u32,
) -> Result<BTreeMap<String, [u8; 32]>, SnapshotError> {
    fs::create_dir(to).map_err(io_error(to, "creating"))?;
    let entries = fs::read_dir(from).map_err(io_error(from, "reading"))?;
    let mut copied = BTreeMap::new();
    for entry in entries {
        let entry = entry.map_err(io_error(from, "reading"))?;
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if !is_file || check_file_name(&name).is_err() {
            continue;
        }
        let digest = copy_file(&entry.path(), &to.join(&name), mode)?;
        copied.insert(name, digest);
    }
    sync_dir(to)?;
    set_mode(to, DIR_MODE)?;
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut json: serde_json::Value =
            serde_json::from_slice(&spec.to_json(dir).unwrap()).unwrap();
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
        let fifo =
            std::ffi::CString::new(dir.path().join(SPEC_FILE).as_os_str().as_bytes()).unwrap();
        // SAFETY: `fifo` is a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let err = format!("{:#}", anyhow::Error::new(load(dir.path()).unwrap_err()));
        assert!(err.contains("not a regular file"), "{err}");
    }
}
