//! Forking a snapshot: every node a new overlay over its chain and
//! copies of its firmware state, each checked against the digest
//! `cluster.json` records; a running snapshot's VM states are checked
//! where they are.

use std::fs;
use std::io;
use std::path::Path;

use ociblk_overlay::layer;

use super::files::{
    MadeDirs, copy_dir, copy_file, file_digest, recorded_chain, set_mode, sync_dir,
};
use super::json::digest_text;
use super::{
    DIR_MODE, NodeDigests, PRIVATE_FILE_MODE, SPEC_FILE, SnapshotError, SnapshotNode, SnapshotSpec,
    io_error,
};
use crate::{
    ClusterSpec, NetworkSpec, NodeSpec, OVERLAY_FILE, OVMF_VARS_FILE, TPM_STATE_DIR, TpmSpec,
};

impl SnapshotSpec {
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
            spec.network = Some(NetworkSpec::on_loopback(self.uplink)?);
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
    let vmstate_digests = hash_vmstates(snapshot);
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
                    check_digest(node, path, "VM state", found?, recorded)?;
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

/// The sha256 of each node's VM state that `cluster.json` records one of
/// (hundreds of MiB each): hashed side by side, before any QEMU parses one.
fn hash_vmstates(snapshot: &SnapshotSpec) -> Vec<Option<Result<[u8; 32], SnapshotError>>> {
    std::thread::scope(|s| {
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
    })
}

/// Refuses the file `path` of `node` (a `what`) unless its digest `found`
/// is the one `cluster.json` records.
fn check_digest(
    node: &SnapshotNode,
    path: &Path,
    what: &'static str,
    found: [u8; 32],
    recorded: &[u8; 32],
) -> Result<(), SnapshotError> {
    if found == *recorded {
        return Ok(());
    }
    Err(SnapshotError::Mismatch {
        node: node.name.clone(),
        path: path.to_owned(),
        what,
        found: digest_text(&found),
        recorded: digest_text(recorded),
    })
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
    let vars = from.join(OVMF_VARS_FILE);
    let found = copy_file(&vars, &to.join(OVMF_VARS_FILE), PRIVATE_FILE_MODE)?;
    check_digest(
        node,
        &vars,
        "OVMF variable store",
        found,
        &digests.ovmf_vars,
    )?;
    if tpm {
        let (from, to) = (from.join(TPM_STATE_DIR), to.join(TPM_STATE_DIR));
        fs::create_dir(&to).map_err(io_error(&to, "creating"))?;
        for (name, recorded) in &digests.tpm_state {
            let file = from.join(name);
            let found = copy_file(&file, &to.join(name), PRIVATE_FILE_MODE)?;
            check_digest(node, &file, "TPM state file", found, recorded)?;
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
