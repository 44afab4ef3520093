//! Why a launch, a wait or a teardown failed.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::qmp::QmpError;

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

impl LaunchError {
    /// For `map_err`: [`LaunchError::NodeFiles`], `action` failing on
    /// `node`'s file `path`.
    pub(crate) fn node_files(
        node: &str,
        action: &'static str,
        path: &Path,
    ) -> impl FnOnce(io::Error) -> LaunchError + use<> {
        let node = node.to_owned();
        let path = path.to_owned();
        move |source| LaunchError::NodeFiles {
            node,
            action,
            path,
            source,
        }
    }
}
