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
//! booting ([`NodeSpec::vmstate`](crate::NodeSpec::vmstate)).
//!
//! Format version 1 (written by earlier ociblk: absolute layer paths, no
//! digests) is still read and forked: the node's own layer is taken from
//! the directory being forked (never from the recorded absolute path), the
//! layers below it are bound to it by their parent digests as in every
//! chain, and the OVMF variables and TPM state are copied unchecked (a
//! warning says so). Saving the fork again writes version 2.

mod check;
mod files;
mod fork;
mod json;
mod save;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use ociblk_overlay::OverlayError;
use serde::{Deserialize, Serialize};

use crate::LaunchError;

pub use fork::{Fork, prepare_fork};
pub use json::{load, parse};
pub use save::{save, save_live, save_running};

/// The snapshot's description, written last.
pub const SPEC_FILE: &str = "cluster.json";
/// A node's disk, frozen.
pub const LAYER_FILE: &str = "disk.layer";
/// Version of `cluster.json`'s format written.
pub const SPEC_VERSION: u32 = 2;
/// The version earlier ociblk wrote: absolute layer paths, no digests.
pub const SPEC_VERSION_UNCHECKED: u32 = 1;
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
    #[error("{}: reading the layers it records", path.display())]
    RecordedChain {
        path: PathBuf,
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

#[cfg(test)]
mod tests;
