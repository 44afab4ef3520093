//! `cluster.json`: the snapshot's description, read ([`load`], [`parse`],
//! both format versions) and written ([`SnapshotSpec::to_json`],
//! [`write_spec_file`]).

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ociblk_digest::Digest;
use ociblk_io::sys;
use serde::{Deserialize, Serialize};

use super::check::check_absolute;
use super::files::open_regular;
use super::{
    FILE_MODE, LAYER_FILE, NodeDigests, RunningMachine, SPEC_FILE, SPEC_VERSION,
    SPEC_VERSION_UNCHECKED, SnapshotError, SnapshotNode, SnapshotSpec, io_error,
};
use crate::VMSTATE_FILE;

/// Largest `cluster.json` read (a 64-node cluster's is a few KiB).
const MAX_SPEC_BYTES: u64 = 1 << 20;

/// `cluster.json`: what the cluster's nodes share, the same in both format
/// versions, and its nodes (`N`: a version's node record). Version 1
/// recorded no running snapshot: it has neither `running` nor `machine`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecFile<N> {
    version: u32,
    image: PathBuf,
    serve_args: Vec<String>,
    queues: u16,
    network: bool,
    uplink: bool,
    tpm: bool,
    /// A running snapshot (`true`): every node has a `vmstate`. Written
    /// only as `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    running: Option<bool>,
    /// The guests' machine, in a running snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    machine: Option<RunningMachine>,
    nodes: Vec<N>,
}

/// A node of `cluster.json`, format version 2.
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

/// A node of `cluster.json`, format version 1.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeFileV1 {
    name: String,
    serve_args: Vec<String>,
    /// Absolute, bottom first.
    layers: Vec<PathBuf>,
}

impl<N> SpecFile<N> {
    /// The spec of these fields, with its nodes read from `nodes`
    /// (format version 2) and the machine of a running snapshot.
    fn into_spec(self, running: Option<RunningMachine>, nodes: Vec<SnapshotNode>) -> SnapshotSpec {
        SnapshotSpec {
            version: self.version,
            image: self.image,
            serve_args: self.serve_args,
            queues: self.queues,
            network: self.network,
            uplink: self.uplink,
            tpm: self.tpm,
            running,
            nodes,
        }
    }
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

fn from_v2(mut file: SpecFile<NodeFile>, snapshot_dir: &Path) -> Result<SnapshotSpec, String> {
    let running = match (file.running == Some(true), file.machine) {
        (true, Some(machine)) => Some(machine),
        (false, None) => None,
        (true, None) => return Err("machine: missing: a running snapshot records it".into()),
        (false, Some(_)) => return Err("machine: only a running snapshot records it".into()),
    };
    // Whether each node's VM state goes with `running` is checked with
    // the rest of the spec ([`SnapshotSpec::check`]).
    let nodes = std::mem::take(&mut file.nodes)
        .into_iter()
        .enumerate()
        .map(|(i, node)| node_from_v2(node, i, snapshot_dir))
        .collect::<Result<_, _>>()?;
    Ok(file.into_spec(running, nodes))
}

/// Node `i` of a version 2 `cluster.json`: its own layer resolved against
/// `snapshot_dir`, every digest parsed.
fn node_from_v2(node: NodeFile, i: usize, snapshot_dir: &Path) -> Result<SnapshotNode, String> {
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
    let vmstate = node
        .vmstate
        .as_deref()
        .map(parse_digest)
        .transpose()
        .map_err(|e| format!("{}: {e}", field("vmstate")))?;
    let mut tpm_state = BTreeMap::new();
    for (name, digest) in node.tpm_state {
        let at = field(&format!("tpm_state[{name:?}]"));
        let digest = parse_digest(&digest).map_err(|e| format!("{at}: {e}"))?;
        tpm_state.insert(name, digest);
    }
    let vmstate_path = vmstate.map(|_| snapshot_dir.join(&node.name).join(VMSTATE_FILE));
    Ok(SnapshotNode {
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
    })
}

fn from_v1(mut file: SpecFile<NodeFileV1>, snapshot_dir: &Path) -> Result<SnapshotSpec, String> {
    if file.running.is_some() || file.machine.is_some() {
        return Err("running, machine: format version 1 records no running snapshot".into());
    }
    let nodes = std::mem::take(&mut file.nodes)
        .into_iter()
        .enumerate()
        .map(|(i, node)| node_from_v1(node, i, snapshot_dir))
        .collect::<Result<_, _>>()?;
    Ok(file.into_spec(None, nodes))
}

/// Node `i` of a version 1 `cluster.json`: absolute layer paths, no
/// digests.
fn node_from_v1(node: NodeFileV1, i: usize, snapshot_dir: &Path) -> Result<SnapshotNode, String> {
    let field = |name: &str| format!("nodes[{i}].{name}");
    crate::spec::check_node_name(&node.name).map_err(|e| format!("{}: {e}", field("name")))?;
    let mut layers = node.layers;
    for (k, layer) in layers.iter().enumerate() {
        check_absolute(layer).map_err(|e| format!("{}: {e}", field(&format!("layers[{k}]"))))?;
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
    Ok(SnapshotNode {
        name: node.name,
        serve_args: node.serve_args,
        layers,
        digests: None,
        vmstate: None,
    })
}

/// A digest as the spec records it (see [`Digest`]'s text form).
fn parse_digest(text: &str) -> Result<[u8; 32], String> {
    text.parse::<Digest>()
        .map(|d| *d.sha256())
        .map_err(|e| e.to_string())
}

pub(super) fn digest_text(digest: &[u8; 32]) -> String {
    Digest::from_sha256(digest).to_string()
}

impl SnapshotSpec {
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
        let file = SpecFile::<NodeFile> {
            version: SPEC_VERSION,
            image: self.image.clone(),
            serve_args: self.serve_args.clone(),
            queues: self.queues,
            network: self.network,
            uplink: self.uplink,
            tpm: self.tpm,
            running: self.running.is_some().then_some(true),
            machine: self.running,
            nodes,
        };
        serde_json::to_vec_pretty(&file).map_err(|e| e.to_string())
    }
}

/// Writes `saved`'s `cluster.json` into `snapshot_dir` (absolute): under a
/// temporary name, read-only and synced, then renamed into place and the
/// directory synced. A directory without it is no snapshot.
pub(super) fn write_spec_file(
    saved: &SnapshotSpec,
    snapshot_dir: &Path,
) -> Result<(), SnapshotError> {
    let path = snapshot_dir.join(SPEC_FILE);
    let json = saved
        .to_json(snapshot_dir)
        .map_err(|reason| SnapshotError::BadSpec {
            path: path.clone(),
            reason,
        })?;
    let temp = snapshot_dir.join(format!(".{SPEC_FILE}.tmp"));
    fs::write(&temp, json)
        .and_then(|()| fs::set_permissions(&temp, fs::Permissions::from_mode(FILE_MODE)))
        .and_then(|()| fs::File::open(&temp)?.sync_all())
        .and_then(|()| fs::rename(&temp, &path))
        .and_then(|()| sys::sync_dir(snapshot_dir))
        .map_err(|source| {
            let _ = fs::remove_file(&temp);
            io_error(&path, "writing")(source)
        })
}
