//! What to launch: the cluster, its nodes, their QEMU and TPM, and the
//! arguments each node's `ociblk serve` gets.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use ociblk_server::ShutdownSignal;

use crate::network::{self, NetworkSpec};
use crate::{
    DEFAULT_ACCEL, DEFAULT_CPUS, DEFAULT_MEMORY_MIB, DEFAULT_OVMF_CODE, DEFAULT_OVMF_VARS,
    DEFAULT_QEMU_BINARY, DEFAULT_QUEUES, DEFAULT_SOCKET_TIMEOUT, DEFAULT_SWTPM_BINARY, LaunchError,
    MAX_NODE_NAME, OVERLAY_FILE, SOCKET_FILE, qemu,
};

/// The QEMU side of every node.
#[derive(Debug, Clone)]
pub struct QemuSpec {
    pub binary: PathBuf,
    /// `-accel` value.
    pub accel: String,
    pub memory_mib: u32,
    /// vCPUs per node.
    pub cpus: u32,
    /// OVMF firmware, mapped read-only.
    pub ovmf_code: PathBuf,
    /// Copied to each node's state directory unless a copy exists there.
    pub ovmf_vars_template: PathBuf,
    /// Appended to QEMU's command line.
    pub extra_args: Vec<String>,
}

impl Default for QemuSpec {
    fn default() -> Self {
        QemuSpec {
            binary: DEFAULT_QEMU_BINARY.into(),
            accel: DEFAULT_ACCEL.into(),
            memory_mib: DEFAULT_MEMORY_MIB,
            cpus: DEFAULT_CPUS,
            ovmf_code: DEFAULT_OVMF_CODE.into(),
            ovmf_vars_template: DEFAULT_OVMF_VARS.into(),
            extra_args: Vec::new(),
        }
    }
}

/// One node: its name is its state directory's name and its disk's seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    pub name: String,
    /// Appended to this node's `ociblk serve` command line, after the
    /// cluster's (e.g. its own `--node-parameters`); what a snapshot
    /// records for the node.
    pub serve_args: Vec<String>,
    /// The arguments this node's `ociblk serve` runs with, after `serve`,
    /// in place of [`ClusterSpec::node_serve_args`]: the same arguments,
    /// parsed with serve's own option definitions and written back from
    /// serve's typed options, with what the caller set on them (`ociblk
    /// launch`: each node's own `--record-access` file, `--no-verify`).
    ///
    /// The harness does not parse or edit serve's arguments itself:
    /// serve's typed options live in the `ociblk` crate, which depends on
    /// this one. So the caller that has them renders each node's arguments
    /// before the launch, where a bad option fails before anything starts,
    /// and the harness runs what it is given. `None`: the arguments of
    /// [`ClusterSpec::node_serve_args`], as they are.
    pub rendered_serve_args: Option<Vec<OsString>>,
    /// The VM state (a running snapshot's `<node>/vmstate`) QEMU loads
    /// instead of booting: the guest continues where it was saved. Either
    /// every node of a cluster has one or none has.
    pub vmstate: Option<PathBuf>,
}

impl NodeSpec {
    pub fn new(name: impl Into<String>) -> Self {
        NodeSpec {
            name: name.into(),
            serve_args: Vec::new(),
            rendered_serve_args: None,
            vmstate: None,
        }
    }

    /// `count` nodes named `<prefix>-1` to `<prefix>-<count>`.
    pub fn numbered(prefix: &str, count: usize) -> Vec<NodeSpec> {
        (1..=count)
            .map(|i| NodeSpec::new(format!("{prefix}-{i}")))
            .collect()
    }
}

/// What to launch.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// OS image: an OCI image layout directory or a registry reference
    /// (registry options such as `--cache` go in `serve_args`).
    pub image: PathBuf,
    pub nodes: Vec<NodeSpec>,
    /// Parent of the nodes' state directories; created when missing.
    pub state_dir: PathBuf,
    pub qemu: QemuSpec,
    /// Appended to every `ociblk serve` command line: layout options,
    /// `--flush unsafe`, ... (`--image`, `--seed`, `--socket`,
    /// `--overlay` and `--queues` are set by the harness); what a snapshot
    /// records for the cluster. Passed on as they are (see
    /// [`NodeSpec::rendered_serve_args`]).
    pub serve_args: Vec<String>,
    /// The `ociblk` binary that serves the disks.
    pub ociblk_binary: PathBuf,
    /// Request queues of each disk (backend and QEMU).
    pub queues: u16,
    pub socket_timeout: Duration,
    /// Copy consoles and backend logs to stderr, lines prefixed with
    /// `[node] ` and `[node serve] `.
    pub echo: bool,
    /// Aborts a launch or a console wait with [`LaunchError::Cancelled`]
    /// once triggered (e.g. on SIGINT).
    pub cancel: Option<ShutdownSignal>,
    /// The L2 network the nodes share; `None`: no network devices.
    pub network: Option<NetworkSpec>,
    /// A TPM per node (swtpm); `None`: no TPM.
    pub tpm: Option<TpmSpec>,
}

/// The emulated TPM 2.0 of every node: one `swtpm socket` per node, its
/// state in `<node dir>/tpm`, started before QEMU and stopped after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmSpec {
    /// The swtpm binary.
    pub binary: PathBuf,
}

impl Default for TpmSpec {
    fn default() -> Self {
        TpmSpec {
            binary: DEFAULT_SWTPM_BINARY.into(),
        }
    }
}

impl ClusterSpec {
    /// A spec with default QEMU settings, serving with the running binary
    /// (or `ociblk` from `PATH` if its path is unknown).
    pub fn new(
        image: impl Into<PathBuf>,
        state_dir: impl Into<PathBuf>,
        nodes: Vec<NodeSpec>,
    ) -> Self {
        ClusterSpec {
            image: image.into(),
            nodes,
            state_dir: state_dir.into(),
            qemu: QemuSpec::default(),
            serve_args: Vec::new(),
            ociblk_binary: std::env::current_exe().unwrap_or_else(|_| "ociblk".into()),
            queues: DEFAULT_QUEUES,
            socket_timeout: DEFAULT_SOCKET_TIMEOUT,
            echo: false,
            cancel: None,
            network: None,
            tpm: None,
        }
    }

    /// The directory of the node `name`.
    pub fn node_dir(&self, name: &str) -> PathBuf {
        self.state_dir.join(name)
    }

    /// The arguments of `node`'s `ociblk serve`, after `serve`: those the
    /// harness sets (`--image`, `--seed` the node's name, `--socket` and
    /// `--overlay` in the node's directory, `--queues`), then the
    /// cluster's [`ClusterSpec::serve_args`] and the node's own, as they
    /// are.
    pub fn node_serve_args(&self, node: &NodeSpec) -> Vec<OsString> {
        let dir = self.node_dir(&node.name);
        let mut args: Vec<OsString> = vec!["--image".into(), self.image.clone().into()];
        args.extend(["--seed".into(), node.name.clone().into()]);
        args.extend(["--socket".into(), dir.join(SOCKET_FILE).into()]);
        args.extend(["--overlay".into(), dir.join(OVERLAY_FILE).into()]);
        args.extend(["--queues".into(), self.queues.to_string().into()]);
        args.extend(self.serve_args.iter().map(OsString::from));
        args.extend(node.serve_args.iter().map(OsString::from));
        args
    }

    /// Makes the state directory and a local image directory absolute, as
    /// the harness hands them to its children (clearer logs and errors; a
    /// registry reference stays as it is). [`Cluster::launch`](crate::Cluster::launch) does it
    /// first; a caller that renders the nodes' serve arguments before
    /// ([`NodeSpec::rendered_serve_args`]) does it before that.
    pub fn make_paths_absolute(&mut self) -> io::Result<()> {
        self.state_dir = std::path::absolute(&self.state_dir)?;
        if self.image.is_dir()
            && let Ok(image) = std::path::absolute(&self.image)
        {
            self.image = image;
        }
        Ok(())
    }

    pub(crate) fn validate(&self) -> Result<(), LaunchError> {
        let invalid = |reason: String| Err(LaunchError::InvalidSpec(reason));
        if self.nodes.is_empty() {
            return invalid("no nodes".into());
        }
        let mut names = HashSet::new();
        for node in &self.nodes {
            check_node_name(&node.name).map_err(LaunchError::InvalidSpec)?;
            if !names.insert(node.name.as_str()) {
                return invalid(format!("node name {:?} appears twice", node.name));
            }
        }
        if self.network.is_some() {
            network::check_addresses(self.nodes.iter().map(|n| n.name.as_str()))
                .map_err(LaunchError::InvalidSpec)?;
        }
        if self.tpm.is_some()
            && self
                .state_dir
                .as_os_str()
                .as_encoded_bytes()
                .contains(&b',')
        {
            return invalid(format!(
                "state directory {} holds a comma, which swtpm's options cannot carry",
                self.state_dir.display()
            ));
        }
        let restored = self.nodes.iter().filter(|n| n.vmstate.is_some()).count();
        if restored != 0 && restored != self.nodes.len() {
            return invalid(
                "either every node or none is restored from a VM state: the nodes of a \
                 running snapshot run together"
                    .into(),
            );
        }
        for node in &self.nodes {
            if let Some(vmstate) = &node.vmstate {
                qemu::shell_word(vmstate).map_err(|reason| {
                    LaunchError::InvalidSpec(format!(
                        "node {}: VM state {} cannot be handed to QEMU: {reason}",
                        node.name,
                        vmstate.display()
                    ))
                })?;
            }
        }
        if self.queues == 0 {
            return invalid("queues must be at least 1".into());
        }
        if self.qemu.cpus == 0 || self.qemu.memory_mib == 0 {
            return invalid("QEMU needs at least one vCPU and 1 MiB of memory".into());
        }
        for (what, path) in [
            ("OVMF firmware", &self.qemu.ovmf_code),
            (
                "OVMF variable store template",
                &self.qemu.ovmf_vars_template,
            ),
        ] {
            if !path.is_file() {
                return invalid(format!("{what} {} is not a file", path.display()));
            }
        }
        Ok(())
    }
}

/// Node names become directory names and QEMU option values: plain
/// letters, digits, `.`, `_` and `-`, not starting with a dot or dash.
pub(crate) fn check_node_name(name: &str) -> Result<(), String> {
    let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > MAX_NODE_NAME {
        return Err(format!(
            "node name {name:?} must have 1 to {MAX_NODE_NAME} characters"
        ));
    }
    if !name.chars().all(valid_char) || name.starts_with(['.', '-']) {
        return Err(format!(
            "node name {name:?} may only hold letters, digits, '.', '_' and '-', \
             and must not start with '.' or '-'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cluster;

    #[test]
    fn node_names() {
        assert_eq!(
            NodeSpec::numbered("node", 2),
            [NodeSpec::new("node-1"), NodeSpec::new("node-2")]
        );
        for good in ["node-1", "a", "n_1.x"] {
            assert!(check_node_name(good).is_ok(), "{good}");
        }
        let long = "x".repeat(MAX_NODE_NAME + 1);
        for bad in ["", ".hidden", "-x", "a/b", "a,b", "a b", long.as_str()] {
            assert!(check_node_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_node_is_served_the_harness_arguments_then_the_clusters_then_its_own() {
        let mut spec = ClusterSpec::new("/img", "/state", NodeSpec::numbered("n", 2));
        spec.queues = 3;
        spec.serve_args = vec!["--flush".into(), "unsafe".into()];
        spec.nodes[1].serve_args = vec!["--serial".into(), "s2".into()];
        assert_eq!(
            spec.node_serve_args(&spec.nodes[1]),
            [
                "--image",
                "/img",
                "--seed",
                "n-2",
                "--socket",
                "/state/n-2/node.sock",
                "--overlay",
                "/state/n-2/node.overlay",
                "--queues",
                "3",
                "--flush",
                "unsafe",
                "--serial",
                "s2"
            ]
        );
    }

    #[test]
    fn invalid_specs_are_refused_before_anything_starts() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let mut spec = ClusterSpec::new("img", &state, NodeSpec::numbered("n", 2));
        spec.nodes[1].name = "n-1".into();
        let err = Cluster::launch(spec).unwrap_err();
        assert!(matches!(err, LaunchError::InvalidSpec(_)), "{err}");
        assert!(!state.exists());

        let mut spec = ClusterSpec::new("img", &state, NodeSpec::numbered("n", 1));
        spec.qemu.ovmf_code = dir.path().join("missing.fd");
        let err = Cluster::launch(spec).unwrap_err();
        assert!(err.to_string().contains("missing.fd"), "{err}");
    }
}
