//! ociblk-launch: a test cluster, per node one `ociblk serve` backend and
//! one QEMU guest booting the node disk under OVMF.
//!
//! The harness knows `ociblk serve` only as a program it starts: it
//! depends on nothing of the `ociblk` crate (whose `ociblk launch` is built
//! on it), only on the server's socket conventions (`ociblk-server`), the
//! overlay (freezing and forking, `ociblk-overlay`) and the digest.
//!
//! Every node has a state directory `<state_dir>/<node>/` holding its
//! socket, its overlay, its OVMF variable store, the logs of the current
//! launch and the PIDs of its running processes (see the `*_FILE`
//! constants). Launching again with the same state directory gives the
//! nodes back their disks and UEFI variables; a fresh directory gives fresh
//! nodes. With a TPM ([`ClusterSpec::tpm`]) it also holds the node's swtpm
//! state; with a network ([`ClusterSpec::network`], see [`network`]) the
//! nodes share one Ethernet segment on loopback multicast. Each QEMU has a
//! QMP monitor socket there too, through which a running cluster is paused
//! and its VM states saved ([`Cluster::save_vm_states`]) and restored
//! guests are resumed. [`snapshot`] saves a stopped or a running cluster
//! and prepares forks of it; a fork of a running one loads each node's VM
//! state instead of booting ([`NodeSpec::vmstate`]).
//!
//! A launch starts every backend, starts each node's swtpm (if any) and
//! QEMU once its backend's socket accepts connections, and fails (stopping
//! whatever it started) if a backend, a swtpm or a QEMU gives up. Teardown,
//! on [`Cluster::shutdown`] or drop, stops the guests first (SIGTERM, then
//! SIGKILL after a grace period), then the swtpms, then the backends (SIGTERM: they flush
//! their overlays and remove their sockets; SIGKILL after a grace period),
//! reaps them and removes sockets left behind. Only processes the harness
//! started are signalled, and only by their PIDs.

pub mod console;
pub mod log;
pub mod network;
mod node;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod snapshot;

use std::collections::HashSet;
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use tracing::warn;

pub use node::{
    CONSOLE_LOG_FILE, ConsoleMatch, LOCK_FILE, Node, NodeTimes, OVERLAY_FILE, OVMF_VARS_FILE,
    QEMU_PID_FILE, QMP_SOCKET_FILE, SERVE_LOG_FILE, SERVE_PID_FILE, SOCKET_FILE, TPM_LOG_FILE,
    TPM_PID_FILE, TPM_SOCKET_FILE, TPM_STATE_DIR, VMSTATE_FILE,
};
pub use qemu::{QemuBoot, QemuCommand, QemuDisk, QemuNetwork, Reconnect, qemu_version};

pub use network::NetworkSpec;

use crate::qmp::QmpError;
use ociblk_server::ShutdownSignal;

pub const DEFAULT_QEMU_BINARY: &str = "qemu-system-x86_64";
pub const DEFAULT_SWTPM_BINARY: &str = "swtpm";
/// KVM is avoided by default: guests are known to hang under it on some hosts.
pub const DEFAULT_ACCEL: &str = "tcg";
pub const DEFAULT_MEMORY_MIB: u32 = 512;
/// One vCPU per node, so that two nodes fit two host cores.
pub const DEFAULT_CPUS: u32 = 1;
pub const DEFAULT_QUEUES: u16 = 2;
pub const DEFAULT_OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE.fd";
pub const DEFAULT_OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS.fd";
/// How long a backend may take until its socket accepts connections.
pub const DEFAULT_SOCKET_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest node name: it names a directory, a QEMU guest and log prefixes.
pub const MAX_NODE_NAME: usize = 64;

/// How long a fresh QEMU is watched for an early exit (bad option, missing
/// accelerator, unusable socket), which happens within milliseconds.
const QEMU_SETTLE: Duration = Duration::from_millis(500);
/// Grace period between SIGTERM and SIGKILL for QEMU.
const QEMU_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Grace period between SIGTERM and SIGKILL for swtpm.
const TPM_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Grace period between SIGTERM and SIGKILL for `ociblk serve`, which
/// finishes requests in flight and flushes its overlay first.
const SERVE_STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long log copiers may take to drain the pipes of stopped children.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);
/// Interval of polls for sockets, exits and cancellation.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Bound of each QMP exchange with a node's QEMU.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long restored guests may take to load their VM state.
const RESUME_TIMEOUT: Duration = Duration::from_secs(120);

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
    /// registry reference stays as it is). [`Cluster::launch`] does it
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

    fn validate(&self) -> Result<(), LaunchError> {
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
fn check_node_name(name: &str) -> Result<(), String> {
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

/// Why a launch, a wait or a teardown failed.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("invalid cluster spec: {0}")]
    InvalidSpec(String),
    #[error("cannot create the state directory {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("node {node}: {action} {path}")]
    NodeFiles {
        node: String,
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("node {node}: its state directory {dir} is in use by another launch")]
    NodeInUse { node: String, dir: PathBuf },
    #[error("node {node}: cannot start its TPM: {problem}; swtpm's log:\n{log}")]
    Tpm {
        node: String,
        problem: String,
        log: String,
    },
    #[error("guests still running {timeout:?} after the power-off command: {nodes}")]
    PowerOffTimeout { nodes: String, timeout: Duration },
    #[error("node {node}: another process is listening on {socket}")]
    SocketInUse { node: String, socket: PathBuf },
    #[error(
        "node {node}: socket path {path} is longer than the {max} bytes a Unix socket address holds"
    )]
    SocketPathTooLong {
        node: String,
        path: PathBuf,
        max: usize,
    },
    #[error("node {node}: cannot start {program} ({binary})")]
    Spawn {
        node: String,
        program: &'static str,
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("node {node}: waiting for {program}")]
    Wait {
        node: String,
        program: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "node {node}: ociblk serve exited ({status}) before its socket was ready; \
         last lines of {log}:\n{tail}"
    )]
    ServeExited {
        node: String,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error(
        "node {node}: socket {socket} did not accept a connection within {timeout:?}; \
         last lines of {log}:\n{tail}"
    )]
    SocketTimeout {
        node: String,
        socket: PathBuf,
        timeout: Duration,
        log: PathBuf,
        tail: String,
    },
    #[error("node {node}: QEMU exited ({status}); last lines of {log}:\n{tail}")]
    QemuExited {
        node: String,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error(
        "node {node}: the console did not show {pattern:?} within {timeout:?}; \
         last lines of {log}:\n{tail}"
    )]
    ConsoleTimeout {
        node: String,
        pattern: String,
        timeout: Duration,
        log: PathBuf,
        tail: String,
    },
    #[error("node {node}: cannot write to the console")]
    ConsoleInput {
        node: String,
        #[source]
        source: io::Error,
    },
    #[error("no node named {0:?}")]
    UnknownNode(String),
    #[error("node {node}: talking to QEMU's monitor")]
    Qmp {
        node: String,
        #[source]
        source: QmpError,
    },
    #[error("node {node}: {problem}")]
    VmState { node: String, problem: String },
    #[error("node {node}: teardown: {problem}")]
    Teardown { node: String, problem: String },
    #[error("interrupted")]
    Cancelled,
}

/// A running cluster. Dropping it tears it down; [`Cluster::shutdown`]
/// does the same and reports what went wrong.
///
/// The children are also ended if the thread that launched them exits
/// first (`PR_SET_PDEATHSIG`; QEMU: SIGKILL, `ociblk serve`: SIGTERM), so
/// keep the cluster in the thread that launched it.
#[derive(Debug)]
pub struct Cluster {
    nodes: Vec<Node>,
    started: Instant,
    state_dir: PathBuf,
    cancel: Option<ShutdownSignal>,
    torn_down: bool,
}

/// Restarts the `ociblk serve` of every node whose server exited while its
/// guest runs (see `Node::restart_dead_serve`).
fn restart_dead_servers(nodes: &mut [Node]) -> Result<(), LaunchError> {
    for node in nodes {
        node.restart_dead_serve()?;
    }
    Ok(())
}

impl Cluster {
    /// Starts every node's backend and, once its socket accepts a
    /// connection, its QEMU; returns when every QEMU survived its first
    /// moments. On error, whatever was started is stopped again.
    pub fn launch(mut spec: ClusterSpec) -> Result<Cluster, LaunchError> {
        let started = Instant::now();
        spec.validate()?;
        std::fs::create_dir_all(&spec.state_dir)
            .and_then(|()| spec.make_paths_absolute())
            .map_err(|source| LaunchError::StateDir {
                path: spec.state_dir.clone(),
                source,
            })?;
        let mut cluster = Cluster {
            nodes: Vec::with_capacity(spec.nodes.len()),
            started,
            state_dir: spec.state_dir.clone(),
            cancel: spec.cancel.clone(),
            torn_down: false,
        };
        // From here on an early return drops `cluster`, which stops
        // whatever was started.
        for node_spec in &spec.nodes {
            let mut node = Node::prepare(&spec, node_spec)?;
            let started = node.start_serve(&spec, node_spec);
            cluster.nodes.push(node);
            started?;
        }
        // QEMU reconnects to a restarted backend; the option's spelling
        // depends on its version.
        let reconnect = Reconnect::for_qemu(qemu_version(&spec.qemu.binary));
        cluster.start_guests(&spec, reconnect)?;
        if spec.nodes.iter().any(|n| n.vmstate.is_some()) {
            // Loading the state watches QEMU more closely than settling.
            cluster.resume()?;
        } else {
            cluster.settle()?;
        }
        Ok(cluster)
    }

    /// Starts each node's QEMU as soon as its backend is ready.
    fn start_guests(
        &mut self,
        spec: &ClusterSpec,
        reconnect: Reconnect,
    ) -> Result<(), LaunchError> {
        let deadline = Instant::now() + spec.socket_timeout;
        let mut waiting: Vec<usize> = (0..self.nodes.len()).collect();
        while !waiting.is_empty() {
            self.check_cancel()?;
            let mut still_waiting = Vec::with_capacity(waiting.len());
            for i in waiting {
                let node = &mut self.nodes[i];
                if node.poll_backend(self.started, deadline, spec.socket_timeout)? {
                    node.start_qemu(spec, self.started, reconnect)?;
                } else {
                    still_waiting.push(i);
                }
            }
            waiting = still_waiting;
            if !waiting.is_empty() {
                thread::sleep(POLL_INTERVAL);
            }
        }
        Ok(())
    }

    /// Watches the fresh QEMUs for an early exit.
    fn settle(&mut self) -> Result<(), LaunchError> {
        let deadline = Instant::now() + QEMU_SETTLE;
        loop {
            for node in &mut self.nodes {
                node.check_qemu()?;
            }
            restart_dead_servers(&mut self.nodes)?;
            self.check_cancel()?;
            if Instant::now() >= deadline {
                return Ok(());
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Restored guests: waits until every QEMU loaded its VM state (it is
    /// then paused, as it was saved), then lets them all continue (QMP
    /// `cont`) at once, so that the nodes meet again on their network as
    /// they left it. Fails if a QEMU exits (a state it cannot load) or
    /// [`RESUME_TIMEOUT`] passes.
    fn resume(&mut self) -> Result<(), LaunchError> {
        let deadline = Instant::now() + RESUME_TIMEOUT;
        let mut monitors = Vec::with_capacity(self.nodes.len());
        for node in &mut self.nodes {
            monitors.push(node.connect_qmp(deadline, self.cancel.as_ref())?);
        }
        let mut loading: Vec<usize> = (0..self.nodes.len()).collect();
        while !loading.is_empty() {
            self.check_cancel()?;
            let mut still = Vec::with_capacity(loading.len());
            for i in loading {
                let node = &mut self.nodes[i];
                let status = node.qmp_execute(&mut monitors[i], "query-status", None)?;
                match status.get("status").and_then(serde_json::Value::as_str) {
                    Some("inmigrate") => still.push(i),
                    Some("paused" | "prelaunch" | "running") => {}
                    other => {
                        return Err(LaunchError::VmState {
                            node: node.name().to_owned(),
                            problem: format!(
                                "QEMU is {} after loading the VM state {}",
                                other.unwrap_or("in no known state"),
                                node.restored_from().unwrap_or(Path::new("")).display()
                            ),
                        });
                    }
                }
            }
            loading = still;
            if loading.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                let node = &self.nodes[loading[0]];
                return Err(LaunchError::VmState {
                    node: node.name().to_owned(),
                    problem: format!(
                        "QEMU did not load its VM state {} within {RESUME_TIMEOUT:?}",
                        node.restored_from().unwrap_or(Path::new("")).display()
                    ),
                });
            }
            thread::sleep(POLL_INTERVAL);
        }
        for (node, qmp) in self.nodes.iter_mut().zip(&mut monitors) {
            node.qmp_execute(qmp, "cont", None)?;
            node.mark_resumed(self.started.elapsed());
        }
        Ok(())
    }

    /// Saves every guest's VM state for a running snapshot: pauses every
    /// guest (QMP `stop`: the nodes stop together and their disks see no
    /// more requests), writes each one's state (memory, CPUs, devices, the
    /// TPM's state and the OVMF variable store's contents) to
    /// `<node dir>/vmstate` (QMP `migrate` to a file, 0600, under a
    /// temporary name renamed once complete) and ends QEMU (QMP `quit`).
    /// Bounded by `timeout`. The backends and swtpms keep running until
    /// [`Cluster::shutdown`], which then finds the guests gone; the
    /// cluster does not run on.
    pub fn save_vm_states(&mut self, timeout: Duration) -> Result<(), LaunchError> {
        let deadline = Instant::now() + timeout;
        let mut monitors = Vec::with_capacity(self.nodes.len());
        for node in &mut self.nodes {
            monitors.push(node.connect_qmp(deadline, self.cancel.as_ref())?);
        }
        for (node, qmp) in self.nodes.iter_mut().zip(&mut monitors) {
            node.qmp_execute(qmp, "stop", None)?;
        }
        for (node, qmp) in self.nodes.iter_mut().zip(&mut monitors) {
            node.start_saving_vmstate(qmp)?;
        }
        let mut saving: Vec<usize> = (0..self.nodes.len()).collect();
        while !saving.is_empty() {
            self.check_cancel()?;
            let mut still = Vec::with_capacity(saving.len());
            for i in saving {
                let node = &mut self.nodes[i];
                let status = node.qmp_query_migrate(&mut monitors[i])?;
                match status.status.as_str() {
                    "completed" => node.finish_saving_vmstate()?,
                    "failed" | "cancelled" => {
                        return Err(LaunchError::VmState {
                            node: node.name().to_owned(),
                            problem: format!(
                                "saving the VM state {}: {}",
                                status.status,
                                status.error.as_deref().unwrap_or("QEMU gave no reason")
                            ),
                        });
                    }
                    _ => still.push(i),
                }
            }
            saving = still;
            if saving.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(LaunchError::VmState {
                    node: self.nodes[saving[0]].name().to_owned(),
                    problem: format!("saving the VM state took longer than {timeout:?}"),
                });
            }
            thread::sleep(POLL_INTERVAL);
        }
        for (node, qmp) in self.nodes.iter_mut().zip(&mut monitors) {
            // QEMU may close the connection before it answers.
            let _ = qmp.execute("quit", None);
            node.close_console_input();
        }
        Ok(())
    }

    fn check_cancel(&self) -> Result<(), LaunchError> {
        match &self.cancel {
            Some(cancel) if cancel.is_triggered() => Err(LaunchError::Cancelled),
            _ => Ok(()),
        }
    }

    /// The state directory holding the nodes' directories.
    pub fn state_dir(&self) -> &std::path::Path {
        &self.state_dir
    }

    /// The nodes, in the order of the spec.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn node(&self, name: &str) -> Result<&Node, LaunchError> {
        self.nodes
            .iter()
            .find(|n| n.name() == name)
            .ok_or_else(|| LaunchError::UnknownNode(name.to_owned()))
    }

    fn node_index(&self, name: &str) -> Result<usize, LaunchError> {
        self.nodes
            .iter()
            .position(|n| n.name() == name)
            .ok_or_else(|| LaunchError::UnknownNode(name.to_owned()))
    }

    /// Waits until `node`'s console shows `pattern` after the previous
    /// match on that node. Fails if QEMU exits first or `timeout` passes.
    pub fn wait_for_console(
        &mut self,
        node: &str,
        pattern: &str,
        timeout: Duration,
    ) -> Result<ConsoleMatch, LaunchError> {
        let i = self.node_index(node)?;
        let mut found = self.wait_nodes(&[i], pattern, timeout)?;
        found
            .pop()
            .ok_or_else(|| LaunchError::UnknownNode(node.to_owned()))
    }

    /// Waits until every node's console shows `pattern`; the matches come
    /// in node order. Fails as soon as one QEMU exits, or after `timeout`.
    pub fn wait_all_for_console(
        &mut self,
        pattern: &str,
        timeout: Duration,
    ) -> Result<Vec<ConsoleMatch>, LaunchError> {
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        self.wait_nodes(&all, pattern, timeout)
    }

    fn wait_nodes(
        &mut self,
        nodes: &[usize],
        pattern: &str,
        timeout: Duration,
    ) -> Result<Vec<ConsoleMatch>, LaunchError> {
        let deadline = Instant::now() + timeout;
        let mut found: Vec<Option<ConsoleMatch>> = vec![None; nodes.len()];
        loop {
            self.check_cancel()?;
            restart_dead_servers(&mut self.nodes)?;
            let mut missing = None;
            for (slot, &i) in found.iter_mut().zip(nodes) {
                if slot.is_some() {
                    continue;
                }
                // Match times come from the output's arrival, so a short
                // look at each node in turn loses no precision.
                let until = deadline.min(Instant::now() + POLL_INTERVAL);
                *slot = self.nodes[i].search_console(pattern, until, self.started)?;
                if slot.is_none() {
                    missing.get_or_insert(i);
                }
            }
            match missing {
                None => return Ok(found.into_iter().flatten().collect()),
                Some(i) if Instant::now() >= deadline => {
                    return Err(self.nodes[i].console_timeout(pattern, timeout));
                }
                Some(_) => {}
            }
        }
    }

    /// Types `line` and a newline into `node`'s serial console.
    pub fn send_console(&mut self, node: &str, line: &str) -> Result<(), LaunchError> {
        let i = self.node_index(node)?;
        self.nodes[i].send_console(line)
    }

    /// Reaps guests that exited (e.g. powered off) since the last call and
    /// returns their names and exit statuses.
    pub fn poll_exits(&mut self) -> Vec<(String, std::process::ExitStatus)> {
        self.nodes
            .iter_mut()
            .filter_map(|n| n.poll_exit().map(|status| (n.name().to_owned(), status)))
            .collect()
    }

    /// Restarts every node's `ociblk serve` that exited while its guest
    /// runs, on the same overlay and socket (QEMU reconnects; every write
    /// the server completed is kept), at most a few times per node. Waiting
    /// for a console and powering off do this on their own; a caller that
    /// only watches the cluster calls it every poll.
    pub fn restart_dead_servers(&mut self) -> Result<(), LaunchError> {
        restart_dead_servers(&mut self.nodes)
    }

    /// How many guests are still running.
    pub fn running_guests(&mut self) -> usize {
        self.nodes
            .iter_mut()
            .map(Node::guest_running)
            .filter(|&running| running)
            .count()
    }

    /// Shuts the guests down cleanly: types `command` (e.g. `sync &&
    /// poweroff -f`) on every running guest's console and waits until
    /// every QEMU has exited, at most `timeout`. The backends, which have
    /// then seen every write and flush, keep running until
    /// [`Cluster::shutdown`].
    pub fn power_off(&mut self, command: &str, timeout: Duration) -> Result<(), LaunchError> {
        let deadline = Instant::now() + timeout;
        for node in &mut self.nodes {
            if node.guest_running() {
                node.send_console(command)?;
            }
        }
        loop {
            self.check_cancel()?;
            restart_dead_servers(&mut self.nodes)?;
            let running: Vec<String> = self
                .nodes
                .iter_mut()
                .filter_map(|n| n.guest_running().then(|| n.name().to_owned()))
                .collect();
            if running.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LaunchError::PowerOffTimeout {
                    nodes: running.join(", "),
                    timeout,
                });
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Tears the cluster down; fails if a backend did not stop cleanly
    /// (its overlay may then miss the last writes).
    pub fn shutdown(mut self) -> Result<(), LaunchError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), LaunchError> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        let mut errors = Vec::new();
        // Guests first: a backend must outlive its frontend, which talks to
        // it while stopping.
        for node in &mut self.nodes {
            node.signal_qemu(libc::SIGTERM);
        }
        let deadline = Instant::now() + QEMU_STOP_TIMEOUT;
        for node in &mut self.nodes {
            errors.extend(node.finish_qemu(deadline).err());
        }
        let deadline = Instant::now() + TPM_STOP_TIMEOUT;
        for node in &mut self.nodes {
            errors.extend(node.finish_tpm(deadline).err());
        }
        for node in &mut self.nodes {
            node.signal_serve(libc::SIGTERM);
        }
        let deadline = Instant::now() + SERVE_STOP_TIMEOUT;
        for node in &mut self.nodes {
            errors.extend(node.finish_serve(deadline).err());
        }
        let deadline = Instant::now() + OUTPUT_DRAIN;
        for node in &mut self.nodes {
            node.finish_output(deadline);
            node.remove_leftovers();
        }
        let mut errors = errors.into_iter();
        let first = errors.next();
        for e in errors {
            warn!("{:#}", anyhow::Error::new(e));
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            warn!("{:#}", anyhow::Error::new(e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn a_node_directory_serves_one_launch_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = ClusterSpec::new("img", dir.path(), NodeSpec::numbered("n", 1));
        let fd = dir.path().join("fw.fd");
        std::fs::write(&fd, b"vars").unwrap();
        spec.qemu.ovmf_vars_template = fd;
        let node = Node::prepare(&spec, &spec.nodes[0]).unwrap();
        // The guest's variable store is private, whatever the template's mode.
        let vars = dir.path().join("n-1").join(OVMF_VARS_FILE);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&vars).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        let err = Node::prepare(&spec, &spec.nodes[0]).unwrap_err();
        assert!(
            matches!(&err, LaunchError::NodeInUse { node, .. } if node == "n-1"),
            "{err}"
        );
        drop(node);
        Node::prepare(&spec, &spec.nodes[0]).unwrap();
    }

    #[test]
    fn a_missing_backend_binary_names_the_node() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = ClusterSpec::new("img", dir.path(), NodeSpec::numbered("n", 1));
        // Firmware content does not matter before QEMU runs.
        let fd = dir.path().join("fw.fd");
        std::fs::write(&fd, b"").unwrap();
        spec.qemu.ovmf_code = fd.clone();
        spec.qemu.ovmf_vars_template = fd;
        spec.ociblk_binary = dir.path().join("no-such-ociblk");
        let err = Cluster::launch(spec).unwrap_err();
        assert!(
            matches!(&err, LaunchError::Spawn { node, .. } if node == "n-1"),
            "{err}"
        );
        // The state directory was prepared, nothing else left behind.
        assert!(dir.path().join("n-1").join(OVMF_VARS_FILE).is_file());
        assert!(!dir.path().join("n-1").join(SERVE_PID_FILE).exists());
    }
}
