//! One node of a cluster: its state directory, its `ociblk serve` backend
//! and its QEMU guest.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ociblk_io::sys::try_lock_exclusive;
use ociblk_server::daemon::MAX_SOCKET_PATH;
use tracing::warn;

use crate::console::Console;
use crate::log::{Transcript, follow, open_log_file};
use crate::process::Process;
use crate::{ClusterSpec, LaunchError, NodeSpec};
use serve::ServeCommand;

/// The vhost-user socket `ociblk serve` listens on and QEMU connects to.
pub const SOCKET_FILE: &str = "node.sock";
/// The node's copy-on-write overlay: its disk's state across launches.
pub const OVERLAY_FILE: &str = "node.overlay";
/// The node's UEFI variable store, copied from the template once.
pub const OVMF_VARS_FILE: &str = "OVMF_VARS.fd";
/// What `ociblk serve` printed during the current launch.
pub const SERVE_LOG_FILE: &str = "serve.log";
/// The guest's serial console (and QEMU's own messages) during the current launch.
pub const CONSOLE_LOG_FILE: &str = "console.log";
/// PID of the running `ociblk serve`; removed once it is reaped.
pub const SERVE_PID_FILE: &str = "serve.pid";
/// PID of the running QEMU; removed once it is reaped.
pub const QEMU_PID_FILE: &str = "qemu.pid";
/// Locked while a cluster uses the node, so two launches never share it.
pub const LOCK_FILE: &str = "node.lock";
/// The node's TPM state (`swtpm --tpmstate dir=`), with `--tpm`.
pub const TPM_STATE_DIR: &str = "tpm";
/// The control socket QEMU talks to swtpm over.
pub const TPM_SOCKET_FILE: &str = "tpm.sock";
/// What swtpm logged during the current launch.
pub const TPM_LOG_FILE: &str = "swtpm.log";
/// PID of the running swtpm; removed once it is reaped.
pub const TPM_PID_FILE: &str = "swtpm.pid";
/// QEMU's QMP monitor socket (pausing, saving and resuming the guest).
pub const QMP_SOCKET_FILE: &str = "qmp.sock";
/// The guest's saved VM state (memory, CPUs, devices), written by a
/// running save and moved into the snapshot.
pub const VMSTATE_FILE: &str = "vmstate";

/// Lines of a log quoted in an error.
const TAIL_LINES: usize = 25;
/// How long the end of a dead child's output may take to reach its reader.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

/// When a node reached each launch milestone, counted from the start of
/// [`Cluster::launch`](super::Cluster::launch).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeTimes {
    /// Its `ociblk serve` socket accepted a connection.
    pub backend_ready: Option<Duration>,
    /// Its QEMU process was started.
    pub qemu_started: Option<Duration>,
    /// Its console showed the pattern of the first successful
    /// [`Cluster::wait_for_console`](super::Cluster::wait_for_console) on
    /// it (the boot milestone); later waits leave it alone.
    pub console_ready: Option<Duration>,
    /// A guest restored from a running snapshot: its VM state was loaded
    /// and it runs again (QMP `cont`).
    pub resumed: Option<Duration>,
}

/// A pattern found on a node's console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleMatch {
    /// When the end of the match arrived, counted from the start of the launch.
    pub at: Duration,
    /// Console output from the end of the previous match on this node up
    /// to the end of this one, carriage returns dropped.
    pub text: String,
}

/// One node: the backend and guest processes and the files in its state
/// directory.
#[derive(Debug)]
pub struct Node {
    name: String,
    dir: PathBuf,
    serve: Option<Process>,
    qemu: Option<Process>,
    tpm: Option<Process>,
    serve_output: Arc<Transcript>,
    console: Console,
    readers: Vec<JoinHandle<()>>,
    times: NodeTimes,
    /// Held while the cluster lives: one launch per state directory.
    _lock: File,
    /// QEMU's exit was already handed out by `poll_exit`.
    exit_reported: bool,
    /// The backend's early exit was already reported as a launch error.
    serve_exit_reported: bool,
    /// How `ociblk serve` was started, for restarts.
    serve_command: Option<ServeCommand>,
    /// Restarts of `ociblk serve` after it exited unexpectedly.
    serve_restarts: u32,
    /// The VM state QEMU loads instead of booting (a running snapshot's).
    vmstate: Option<PathBuf>,
}

mod guest;
mod monitor;
mod serve;
mod tpm;

impl Node {
    /// Creates the node's state directory and its OVMF variable store
    /// (only if missing: the guest's boot entries survive relaunches).
    pub(crate) fn prepare(spec: &ClusterSpec, node: &NodeSpec) -> Result<Node, LaunchError> {
        let dir = spec.node_dir(&node.name);
        let files_error = |action, path: &Path| LaunchError::node_files(&node.name, action, path);
        fs::create_dir_all(&dir).map_err(files_error("creating", &dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = File::create(&lock_path).map_err(files_error("creating", &lock_path))?;
        if !try_lock_exclusive(&lock).map_err(files_error("locking", &lock_path))? {
            return Err(LaunchError::NodeInUse {
                node: node.name.clone(),
                dir,
            });
        }
        let socket = dir.join(SOCKET_FILE);
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(LaunchError::SocketPathTooLong {
                node: node.name.clone(),
                path: socket,
                max: MAX_SOCKET_PATH,
            });
        }
        // Readiness is judged by the socket answering, so it must not
        // answer before our backend runs.
        if UnixStream::connect(&socket).is_ok() {
            return Err(LaunchError::SocketInUse {
                node: node.name.clone(),
                socket,
            });
        }
        let vars = dir.join(OVMF_VARS_FILE);
        if !vars.exists() {
            // Copied under a temporary name, so an interrupted copy is
            // never taken for a variable store.
            let temp = dir.join(format!(".{OVMF_VARS_FILE}.tmp"));
            // The store holds the guest's variables: private (0600), like
            // the overlay, whatever the template's mode.
            fs::copy(&spec.qemu.ovmf_vars_template, &temp)
                .and_then(|_| fs::set_permissions(&temp, fs::Permissions::from_mode(0o600)))
                .and_then(|()| fs::rename(&temp, &vars))
                .map_err(files_error("copying the OVMF variable store to", &vars))?;
        }
        Ok(Node {
            name: node.name.clone(),
            dir,
            serve: None,
            qemu: None,
            tpm: None,
            serve_output: Arc::default(),
            console: Console::new(Arc::default(), None),
            readers: Vec::new(),
            times: NodeTimes::default(),
            _lock: lock,
            exit_reported: false,
            serve_exit_reported: false,
            serve_command: None,
            serve_restarts: 0,
            vmstate: node.vmstate.clone(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join(SOCKET_FILE)
    }

    pub fn overlay(&self) -> PathBuf {
        self.dir.join(OVERLAY_FILE)
    }

    pub fn ovmf_vars(&self) -> PathBuf {
        self.dir.join(OVMF_VARS_FILE)
    }

    /// QEMU's QMP monitor socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join(QMP_SOCKET_FILE)
    }

    /// Where a running save writes the guest's VM state.
    pub fn vmstate(&self) -> PathBuf {
        self.dir.join(VMSTATE_FILE)
    }

    /// The VM state this node's QEMU was started from, if it was restored.
    pub fn restored_from(&self) -> Option<&Path> {
        self.vmstate.as_deref()
    }

    pub fn serve_log(&self) -> PathBuf {
        self.dir.join(SERVE_LOG_FILE)
    }

    pub fn console_log(&self) -> PathBuf {
        self.dir.join(CONSOLE_LOG_FILE)
    }

    /// PID of `ociblk serve` while it is running (or exited, not yet reaped).
    pub fn serve_pid(&self) -> Option<u32> {
        running_pid(self.serve.as_ref())
    }

    /// PID of QEMU while it is running (or exited, not yet reaped).
    pub fn qemu_pid(&self) -> Option<u32> {
        running_pid(self.qemu.as_ref())
    }

    /// QEMU's exit status once it has exited and been reaped.
    pub fn qemu_status(&self) -> Option<ExitStatus> {
        self.qemu.as_ref().and_then(Process::status)
    }

    pub fn times(&self) -> NodeTimes {
        self.times
    }

    /// The last `lines` lines of the console.
    pub fn console_tail(&self, lines: usize) -> String {
        self.console.output().tail(lines)
    }

    /// For `map_err`: `action` failing on the node's file `path`.
    fn files_error(
        &self,
        action: &'static str,
        path: &Path,
    ) -> impl FnOnce(io::Error) -> LaunchError + use<> {
        LaunchError::node_files(&self.name, action, path)
    }

    fn spawn_error(
        &self,
        program: &'static str,
        binary: &Path,
    ) -> impl FnOnce(io::Error) -> LaunchError {
        let node = self.name.clone();
        let binary = binary.to_owned();
        move |source| LaunchError::Spawn {
            node,
            program,
            binary,
            source,
        }
    }

    /// Starts the node's output copier: `source` to the log `file`, the
    /// transcript and (if echoing) stderr.
    fn follow_output(
        &mut self,
        source: io::PipeReader,
        file: &Path,
        transcript: &Arc<Transcript>,
        echo_prefix: Option<String>,
        thread_name: &str,
    ) -> Result<(), LaunchError> {
        self.follow_output_to(source, file, false, transcript, echo_prefix, thread_name)
    }

    /// [`Node::follow_output`], appending to the log with `append`.
    fn follow_output_to(
        &mut self,
        source: io::PipeReader,
        file: &Path,
        append: bool,
        transcript: &Arc<Transcript>,
        echo_prefix: Option<String>,
        thread_name: &str,
    ) -> Result<(), LaunchError> {
        let log = open_log_file(file, append).map_err(self.files_error("creating", file))?;
        let reader = follow(
            format!("{thread_name}-{}", self.name),
            source,
            Some(log),
            echo_prefix,
            Arc::clone(transcript),
        )
        .map_err(self.files_error("starting the log copier for", file))?;
        self.readers.push(reader);
        Ok(())
    }

    fn teardown_error(&self, problem: String) -> LaunchError {
        LaunchError::Teardown {
            node: self.name.clone(),
            problem,
        }
    }

    /// Waits (bounded) for the log copiers to reach the end of the output,
    /// after both children are gone.
    pub(crate) fn finish_output(&mut self, deadline: Instant) {
        for reader in self.readers.drain(..) {
            while !reader.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
            if reader.is_finished() {
                let _ = reader.join();
            } else {
                // Someone else still holds the pipe; the thread is left to
                // end with it.
                warn!(node = %self.name, "a log copier did not finish");
            }
        }
    }
}

fn running_pid(process: Option<&Process>) -> Option<u32> {
    process.filter(|p| p.status().is_none()).map(Process::pid)
}
