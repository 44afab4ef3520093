//! What a fork relies on, checked whether a spec was read or built in
//! code: names that are plain file names, absolute layer paths, and the
//! fields that go together.

use std::collections::HashSet;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use ociblk_overlay::format;

use super::{LAYER_FILE, SnapshotSpec, TPM_LOCK_FILE};
use crate::VMSTATE_FILE;

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
}

/// A path recorded for a layer of an earlier snapshot: absolute, without
/// `.` or `..`, not longer than an overlay can record.
pub(super) fn check_absolute(path: &Path) -> Result<(), String> {
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
pub(super) fn check_file_name(name: &str) -> Result<(), String> {
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
