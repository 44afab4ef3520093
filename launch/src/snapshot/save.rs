//! Saving a cluster: every node's overlay frozen into a layer of the
//! snapshot, its firmware state (and a running cluster's VM state) put
//! next to it, `cluster.json` written last.

use std::fs;
use std::io;
use std::path::Path;

use ociblk_overlay::layer;

use super::files::{MadeDirs, copy_dir, copy_file, file_digest, recorded_chain, set_mode};
use super::json::write_spec_file;
use super::{
    DIR_MODE, FILE_MODE, LAYER_FILE, NodeDigests, RunningMachine, SPEC_FILE, SPEC_VERSION,
    SnapshotError, SnapshotNode, SnapshotSpec, io_error,
};
use crate::{Cluster, ClusterSpec, OVERLAY_FILE, OVMF_VARS_FILE, TPM_STATE_DIR, VMSTATE_FILE};

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
    check_saveable(spec, &state_dir, snapshot_dir, running.is_some())?;
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
    let mut saved_state = Vec::with_capacity(spec.nodes.len());
    for node in &spec.nodes {
        let to = snapshot_dir.join(&node.name);
        made.create(&to).map_err(io_error(&to, "creating"))?;
        let from = state_dir.join(&node.name);
        saved_state.push(save_node_state(
            &from,
            &to,
            spec.tpm.is_some(),
            running.is_some(),
        )?);
    }
    let mut nodes = Vec::with_capacity(spec.nodes.len());
    for (node, state) in spec.nodes.iter().zip(saved_state) {
        let from = state_dir.join(&node.name);
        let to = snapshot_dir.join(&node.name);
        nodes.push(freeze_node(
            &node.name,
            &node.serve_args,
            &from,
            &to,
            state,
            frozen,
        )?);
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
    write_spec_file(&saved, &snapshot_dir)?;
    Ok(saved)
}

/// Checks, before anything is made, the node names (they become directory
/// names here: a launched cluster's were checked, a spec built in code's
/// may not be) and that every file a node's save reads is there.
fn check_saveable(
    spec: &ClusterSpec,
    state_dir: &Path,
    snapshot_dir: &Path,
    running: bool,
) -> Result<(), SnapshotError> {
    for node in &spec.nodes {
        crate::spec::check_node_name(&node.name).map_err(|reason| SnapshotError::BadSpec {
            path: snapshot_dir.join(SPEC_FILE),
            reason,
        })?;
    }
    for node in &spec.nodes {
        let from = state_dir.join(&node.name);
        let mut needed = vec![from.join(OVERLAY_FILE), from.join(OVMF_VARS_FILE)];
        if spec.tpm.is_some() {
            needed.push(from.join(TPM_STATE_DIR));
        }
        if running {
            needed.push(from.join(VMSTATE_FILE));
        }
        for path in needed {
            fs::metadata(&path).map_err(io_error(&path, "reading"))?;
        }
    }
    Ok(())
}

/// What identifies the state a node's save put into the snapshot, before
/// its overlay is frozen.
struct SavedState {
    /// sha256 of the OVMF variable store.
    ovmf_vars: [u8; 32],
    /// sha256 of each TPM state file, by name.
    tpm_state: std::collections::BTreeMap<String, [u8; 32]>,
    /// sha256 of the VM state, in a running save.
    vmstate: Option<[u8; 32]>,
}

/// Puts a node's firmware state from its state directory `from` into the
/// snapshot's node directory `to` (read-only files): the OVMF variable
/// store, with `tpm` the TPM state but its lock file, and with `running`
/// the VM state.
fn save_node_state(
    from: &Path,
    to: &Path,
    tpm: bool,
    running: bool,
) -> Result<SavedState, SnapshotError> {
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
        std::collections::BTreeMap::new()
    };
    let vmstate = if running {
        Some(link_vmstate(
            &from.join(VMSTATE_FILE),
            &to.join(VMSTATE_FILE),
        )?)
    } else {
        None
    };
    Ok(SavedState {
        ovmf_vars,
        tpm_state,
        vmstate,
    })
}

/// Freezes the overlay of node `name` (in `from`) into the snapshot's
/// `to/disk.layer`, notes the node in `frozen` (its overlay now sits on
/// the new layer) and returns what `cluster.json` records of it.
fn freeze_node(
    name: &str,
    serve_args: &[String],
    from: &Path,
    to: &Path,
    state: SavedState,
    frozen: &mut Vec<String>,
) -> Result<SnapshotNode, SnapshotError> {
    let overlay = from.join(OVERLAY_FILE);
    let layers =
        layer::freeze(&overlay, &to.join(LAYER_FILE)).map_err(|source| SnapshotError::Freeze {
            node: name.to_owned(),
            source,
        })?;
    frozen.push(name.to_owned());
    set_mode(to, DIR_MODE)?;
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
    Ok(SnapshotNode {
        name: name.to_owned(),
        serve_args: serve_args.to_vec(),
        layers: layers.chain,
        digests: Some(NodeDigests {
            layers: digests,
            ovmf_vars: state.ovmf_vars,
            tpm_state: state.tpm_state,
            vmstate: state.vmstate,
        }),
        vmstate: state.vmstate.map(|_| to.join(VMSTATE_FILE)),
    })
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
