//! One node of a cluster: its state directory, its `ociblk serve` backend
//! and its QEMU guest.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ociblk_io::sys::try_lock_exclusive;
use tracing::{info, warn};

use super::console::{Console, ConsoleSearch};
use super::log::{Transcript, create_log_file, follow, open_log_file};
use super::process::{Process, Stopped};
use super::qemu::{
    QemuBoot, QemuCommand, QemuDisk, QemuNetwork, Reconnect, incoming_args, migrate_to_file_uri,
    qmp_args,
};
use super::{ClusterSpec, LaunchError, NodeSpec, TpmSpec, network};
use crate::qmp::{MigrationStatus, Qmp, QmpError};
use ociblk_server::daemon::{MAX_SOCKET_PATH, lock_path, temp_socket_prefix};

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

/// The `ociblk serve` command of a node.
#[derive(Debug, Clone)]
struct ServeCommand {
    binary: PathBuf,
    args: Vec<OsString>,
    /// Prefix of its output echoed to stderr, if echoing.
    echo: Option<String>,
}

/// How often a node's `ociblk serve` that exits unexpectedly is restarted
/// before its exit fails the launch.
pub const MAX_SERVE_RESTARTS: u32 = 3;

/// Bound of each QMP exchange with a node's QEMU.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a QEMU whose monitor failed may take to exit before the
/// monitor's error is reported instead of its exit.
const QMP_EXIT_GRACE: Duration = Duration::from_secs(2);

impl Node {
    /// Creates the node's state directory and its OVMF variable store
    /// (only if missing: the guest's boot entries survive relaunches).
    pub(super) fn prepare(spec: &ClusterSpec, node: &NodeSpec) -> Result<Node, LaunchError> {
        let dir = spec.node_dir(&node.name);
        let files_error = |action, path: &Path| {
            let node = node.name.clone();
            let path = path.to_owned();
            move |source| LaunchError::NodeFiles {
                node,
                action,
                path,
                source,
            }
        };
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
        let log = open_log_file(file, append).map_err(|source| LaunchError::NodeFiles {
            node: self.name.clone(),
            action: "creating",
            path: file.to_owned(),
            source,
        })?;
        let reader = follow(
            format!("{thread_name}-{}", self.name),
            source,
            Some(log),
            echo_prefix,
            Arc::clone(transcript),
        )
        .map_err(|source| LaunchError::NodeFiles {
            node: self.name.clone(),
            action: "starting the log copier for",
            path: file.to_owned(),
            source,
        })?;
        self.readers.push(reader);
        Ok(())
    }

    /// Starts `ociblk serve` for this node (seed: the node's name), with
    /// the arguments its spec renders or else [`ClusterSpec::node_serve_args`].
    pub(super) fn start_serve(
        &mut self,
        spec: &ClusterSpec,
        node: &NodeSpec,
    ) -> Result<(), LaunchError> {
        let mut args: Vec<OsString> = vec!["serve".into()];
        match &node.rendered_serve_args {
            Some(rendered) => args.extend(rendered.iter().cloned()),
            None => args.extend(spec.node_serve_args(node)),
        }
        self.serve_command = Some(ServeCommand {
            binary: spec.ociblk_binary.clone(),
            args,
            echo: spec.echo.then(|| format!("[{} serve] ", self.name)),
        });
        self.spawn_serve(false)
    }

    /// Starts the node's `ociblk serve` as [`Node::start_serve`] set it up;
    /// `again`: a restart, whose output goes on at the end of the log.
    fn spawn_serve(&mut self, again: bool) -> Result<(), LaunchError> {
        const PROGRAM: &str = "ociblk serve";
        let Some(command) = self.serve_command.clone() else {
            return Ok(());
        };
        let spawn_error = || self.spawn_error(PROGRAM, &command.binary);
        let (output, output_writer) = io::pipe().map_err(spawn_error())?;
        let mut cmd = Command::new(&command.binary);
        cmd.args(&command.args)
            .stdin(Stdio::null())
            .stdout(output_writer.try_clone().map_err(spawn_error())?)
            .stderr(output_writer);
        // SIGTERM if the harness dies: serve then still flushes the overlay
        // and removes its socket.
        let serve = Process::spawn(
            &mut cmd,
            libc::SIGTERM,
            Some(&self.dir.join(SERVE_PID_FILE)),
        )
        .map_err(spawn_error())?;
        // Our copies of the pipe's write end must go, or the copier would
        // never see the end of the output.
        drop(cmd);
        info!(node = %self.name, pid = serve.pid(), "started ociblk serve");
        self.serve = Some(serve);
        self.serve_exit_reported = false;
        let transcript = Arc::clone(&self.serve_output);
        let log = self.serve_log();
        self.follow_output_to(output, &log, again, &transcript, command.echo, "serve")
    }

    /// Restarts the node's `ociblk serve` if it exited while its guest
    /// runs: on the same overlay and socket, so that QEMU (which runs with
    /// `reconnect`) finds it again and the guest goes on. Every write the
    /// dead server completed is in its overlay's live map. At most
    /// [`MAX_SERVE_RESTARTS`] times; then its exit is an error. Returns
    /// whether it restarted the server.
    pub(super) fn restart_dead_serve(&mut self) -> Result<bool, LaunchError> {
        let Some(serve) = self.serve.as_mut() else {
            return Ok(false);
        };
        let status = match serve.try_exit() {
            Ok(None) => return Ok(false),
            Ok(Some(status)) => status,
            Err(source) => {
                return Err(LaunchError::Wait {
                    node: self.name.clone(),
                    program: "ociblk serve",
                    source,
                });
            }
        };
        if self.serve_exit_reported || !self.guest_running() {
            // Reported already, or nothing needs the disk: teardown tells.
            return Ok(false);
        }
        if self.serve_restarts >= MAX_SERVE_RESTARTS {
            self.serve_exit_reported = true;
            self.serve_output.wait_closed(Instant::now() + OUTPUT_DRAIN);
            return Err(LaunchError::ServeExited {
                node: self.name.clone(),
                status: format!("{status}, after {MAX_SERVE_RESTARTS} restarts"),
                log: self.serve_log(),
                tail: self.serve_output.tail(TAIL_LINES),
            });
        }
        self.serve_restarts += 1;
        warn!(
            node = %self.name,
            %status,
            restart = self.serve_restarts,
            of = MAX_SERVE_RESTARTS,
            "ociblk serve exited unexpectedly; restarting it on the same overlay and socket"
        );
        self.spawn_serve(true)?;
        Ok(true)
    }

    /// Times this node's `ociblk serve` was restarted.
    pub fn serve_restarts(&self) -> u32 {
        self.serve_restarts
    }

    /// Checks once whether the backend is ready: its socket accepts a
    /// connection (closed at once; the server then waits for the next one).
    /// Fails if the backend exited or `deadline` passed.
    pub(super) fn poll_backend(
        &mut self,
        started: Instant,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<bool, LaunchError> {
        let Some(serve) = self.serve.as_mut() else {
            return Ok(false);
        };
        let exited = serve.try_exit().map_err(|source| LaunchError::Wait {
            node: self.name.clone(),
            program: "ociblk serve",
            source,
        })?;
        if let Some(status) = exited {
            self.serve_exit_reported = true;
            self.serve_output.wait_closed(Instant::now() + OUTPUT_DRAIN);
            return Err(LaunchError::ServeExited {
                node: self.name.clone(),
                status: status.to_string(),
                log: self.serve_log(),
                tail: self.serve_output.tail(TAIL_LINES),
            });
        }
        if UnixStream::connect(self.socket()).is_ok() {
            let ready = started.elapsed();
            info!(node = %self.name, after = ?ready, "backend ready");
            self.times.backend_ready = Some(ready);
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Err(LaunchError::SocketTimeout {
                node: self.name.clone(),
                socket: self.socket(),
                timeout,
                log: self.serve_log(),
                tail: self.serve_output.tail(TAIL_LINES),
            });
        }
        Ok(false)
    }

    /// Starts QEMU with the node's disk as its only (boot) disk, the
    /// serial console on stdin/stdout.
    pub(super) fn start_qemu(
        &mut self,
        spec: &ClusterSpec,
        started: Instant,
        reconnect: Reconnect,
    ) -> Result<(), LaunchError> {
        if let Some(tpm) = &spec.tpm {
            self.start_tpm(tpm, spec.socket_timeout)?;
        }
        const PROGRAM: &str = "QEMU";
        let spawn_error = || self.spawn_error(PROGRAM, &spec.qemu.binary);
        let (output, output_writer) = io::pipe().map_err(spawn_error())?;
        let mut cmd = self.qemu_command(spec, reconnect)?;
        cmd.stdin(Stdio::piped())
            .stdout(output_writer.try_clone().map_err(spawn_error())?)
            .stderr(output_writer);
        // QEMU creates its monitor socket with the umask's mode. Whoever
        // can connect controls the guest and can run commands as this
        // user (`exec:` migrations): private to the user.
        // SAFETY: the closure runs between fork and exec and only calls
        // umask, which is async-signal-safe and cannot fail.
        unsafe {
            cmd.pre_exec(|| {
                libc::umask(0o077);
                Ok(())
            })
        };
        // The guest's disk state lives in the backend, so QEMU can simply
        // be killed if the harness dies.
        let mut qemu = Process::spawn(&mut cmd, libc::SIGKILL, Some(&self.dir.join(QEMU_PID_FILE)))
            .map_err(spawn_error())?;
        drop(cmd);
        let at = started.elapsed();
        info!(node = %self.name, pid = qemu.pid(), after = ?at, "started QEMU");
        self.times.qemu_started = Some(at);
        let transcript = Arc::new(Transcript::default());
        self.console = Console::new(Arc::clone(&transcript), qemu.child_mut().stdin.take());
        self.qemu = Some(qemu);
        let echo = spec.echo.then(|| format!("[{}] ", self.name));
        self.follow_output(output, &self.console_log(), &transcript, echo, "console")
    }

    /// Starts the node's swtpm and waits until its control socket exists
    /// (swtpm creates it before it serves, within milliseconds).
    fn start_tpm(&mut self, tpm: &TpmSpec, timeout: Duration) -> Result<(), LaunchError> {
        const PROGRAM: &str = "swtpm";
        let spawn_error = || self.spawn_error(PROGRAM, &tpm.binary);
        let state = self.dir.join(TPM_STATE_DIR);
        fs::create_dir_all(&state)
            .and_then(|()| fs::set_permissions(&state, fs::Permissions::from_mode(0o700)))
            .map_err(|source| LaunchError::NodeFiles {
                node: self.name.clone(),
                action: "creating",
                path: state.clone(),
                source,
            })?;
        let socket = self.tpm_socket();
        // A socket left by a killed swtpm: swtpm would refuse to bind.
        if fs::symlink_metadata(&socket).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = fs::remove_file(&socket);
        }
        let log = create_log_file(&self.dir.join(TPM_LOG_FILE)).map_err(spawn_error())?;
        let mut cmd = Command::new(&tpm.binary);
        cmd.args(["socket", "--tpm2"])
            .arg("--tpmstate")
            .arg(swtpm_option("dir=", &state))
            .arg("--ctrl")
            .arg(swtpm_option("type=unixio,path=", &socket))
            // Exit once QEMU closes the connection: a TPM outlives no guest.
            .arg("--terminate")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(spawn_error())?)
            .stderr(log);
        let mut swtpm = Process::spawn(&mut cmd, libc::SIGTERM, Some(&self.dir.join(TPM_PID_FILE)))
            .map_err(spawn_error())?;
        info!(node = %self.name, pid = swtpm.pid(), "started swtpm");
        let deadline = Instant::now() + timeout;
        let problem = loop {
            if fs::symlink_metadata(&socket).is_ok_and(|m| m.file_type().is_socket()) {
                self.tpm = Some(swtpm);
                return Ok(());
            }
            match swtpm.try_exit() {
                Ok(None) => {}
                Ok(Some(status)) => break format!("swtpm exited ({status})"),
                Err(e) => break format!("cannot wait for swtpm: {e}"),
            }
            if Instant::now() >= deadline {
                swtpm.kill();
                break format!(
                    "swtpm made no socket {} within {timeout:?}",
                    socket.display()
                );
            }
            thread::sleep(Duration::from_millis(10));
        };
        let log = fs::read_to_string(self.dir.join(TPM_LOG_FILE)).unwrap_or_default();
        Err(LaunchError::Tpm {
            node: self.name.clone(),
            problem,
            log: last_lines(&log, TAIL_LINES),
        })
    }

    /// The control socket of the node's swtpm.
    pub fn tpm_socket(&self) -> PathBuf {
        self.dir.join(TPM_SOCKET_FILE)
    }

    /// PID of the running swtpm, if any.
    pub fn tpm_pid(&self) -> Option<u32> {
        running_pid(self.tpm.as_ref())
    }

    /// Stops swtpm (after QEMU is gone): SIGTERM, bounded wait, SIGKILL.
    /// swtpm writes its state as the guest changes it, so a kill loses
    /// nothing the guest was told is stored.
    pub(super) fn finish_tpm(&mut self, deadline: Instant) -> Result<(), LaunchError> {
        let Some(tpm) = self.tpm.as_mut() else {
            return Ok(());
        };
        if matches!(tpm.try_exit(), Ok(None)) {
            tpm.signal(libc::SIGTERM);
        }
        match tpm.finish_by(deadline) {
            Ok(Stopped::Exited(_)) => {}
            Ok(Stopped::Killed) => {
                warn!(node = %self.name, "swtpm ignored SIGTERM and was killed")
            }
            Err(source) => {
                return Err(self.teardown_error(format!("cannot reap swtpm: {source}")));
            }
        }
        // swtpm leaves its control socket behind.
        let socket = self.tpm_socket();
        if fs::symlink_metadata(&socket).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = fs::remove_file(&socket);
        }
        Ok(())
    }

    fn qemu_command(
        &self,
        spec: &ClusterSpec,
        reconnect: Reconnect,
    ) -> Result<Command, LaunchError> {
        let qemu = &spec.qemu;
        let network = spec.network.as_ref().map(|network| QemuNetwork {
            group: network.group.to_string(),
            mac: network::format_mac(network::node_mac(&self.name)),
            uplink_mac: network
                .uplink
                .then(|| network::format_mac(network::uplink_mac(&self.name))),
        });
        let mut cmd = QemuCommand {
            binary: qemu.binary.clone(),
            name: Some(self.name.clone()),
            accel: qemu.accel.clone(),
            cpus: qemu.cpus,
            memory_mib: qemu.memory_mib,
            // A backend that dies is restarted (`restart_dead_serve`); the
            // guest keeps running across it.
            disk: QemuDisk::VhostUser {
                socket: self.socket(),
                reconnect,
            },
            queues: spec.queues,
            boot: QemuBoot::Uefi {
                code: qemu.ovmf_code.clone(),
                vars: self.ovmf_vars(),
            },
            network,
            tpm_socket: spec.tpm.is_some().then(|| self.tpm_socket()),
            extra_args: qemu.extra_args.clone(),
        }
        .command();
        cmd.args(qmp_args(&self.qmp_socket()));
        if let Some(vmstate) = &self.vmstate {
            // Checked with the spec; refused here too rather than quoted wrong.
            let args = incoming_args(vmstate).map_err(|reason| {
                LaunchError::InvalidSpec(format!("node {}: VM state {reason}", self.name))
            })?;
            cmd.args(args);
        }
        Ok(cmd)
    }

    /// Connects to QEMU's monitor once its socket is there, failing if
    /// QEMU exits first, `cancel` triggers or `deadline` passes.
    pub(super) fn connect_qmp(
        &mut self,
        deadline: Instant,
        cancel: Option<&ociblk_server::ShutdownSignal>,
    ) -> Result<Qmp, LaunchError> {
        let socket = self.qmp_socket();
        loop {
            self.check_qemu()?;
            if cancel.is_some_and(|c| c.is_triggered()) {
                return Err(LaunchError::Cancelled);
            }
            if fs::symlink_metadata(&socket).is_ok_and(|m| m.file_type().is_socket()) {
                return Qmp::connect(&socket, QMP_TIMEOUT).map_err(|e| self.qmp_error(e));
            }
            if Instant::now() >= deadline {
                return Err(LaunchError::VmState {
                    node: self.name.clone(),
                    problem: format!("QEMU made no monitor socket {}", socket.display()),
                });
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Runs a QMP command; a QEMU that exited is reported as such.
    pub(super) fn qmp_execute(
        &mut self,
        qmp: &mut Qmp,
        command: &str,
        arguments: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, LaunchError> {
        qmp.execute(command, arguments)
            .map_err(|e| self.qmp_error(e))
    }

    pub(super) fn qmp_query_migrate(
        &mut self,
        qmp: &mut Qmp,
    ) -> Result<MigrationStatus, LaunchError> {
        qmp.query_migrate().map_err(|e| self.qmp_error(e))
    }

    fn qmp_error(&mut self, source: QmpError) -> LaunchError {
        // A QEMU on its way out (a VM state it cannot load) closes its
        // monitor a moment before it can be reaped: its exit, with the
        // console's last lines, is the error to report.
        let grace = Instant::now() + QMP_EXIT_GRACE;
        if let Some(qemu) = self.qemu.as_mut() {
            let _ = qemu.wait_until(grace);
        }
        if let Err(exited) = self.check_qemu() {
            return exited;
        }
        LaunchError::Qmp {
            node: self.name.clone(),
            source,
        }
    }

    /// Where a VM state being saved is written until it is complete.
    fn vmstate_temp(&self) -> PathBuf {
        self.dir.join(format!(".{VMSTATE_FILE}.tmp"))
    }

    /// Starts writing the (paused) guest's VM state to a new private file.
    pub(super) fn start_saving_vmstate(&mut self, qmp: &mut Qmp) -> Result<(), LaunchError> {
        let temp = self.vmstate_temp();
        let files_error = |action| {
            let (node, path) = (self.name.clone(), temp.clone());
            move |source| LaunchError::NodeFiles {
                node,
                action,
                path,
                source,
            }
        };
        // Only an earlier save of ours, interrupted, leaves this name.
        match fs::remove_file(&temp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(files_error("removing the unfinished")(e));
            }
            _ => {}
        }
        // Created private before QEMU writes to it: the shell's `>` keeps
        // the mode of a file that exists.
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .map_err(files_error("creating"))?;
        let uri = migrate_to_file_uri(&temp).map_err(|reason| LaunchError::VmState {
            node: self.name.clone(),
            problem: format!("cannot save the VM state to {}: {reason}", temp.display()),
        })?;
        self.qmp_execute(qmp, "migrate", Some(serde_json::json!({ "uri": uri })))?;
        Ok(())
    }

    /// Once QEMU completed the save: syncs the VM state and gives it its name.
    pub(super) fn finish_saving_vmstate(&mut self) -> Result<(), LaunchError> {
        let temp = self.vmstate_temp();
        let vmstate = self.vmstate();
        File::open(&temp)
            .and_then(|f| f.sync_all())
            .and_then(|()| fs::rename(&temp, &vmstate))
            .map_err(|source| LaunchError::NodeFiles {
                node: self.name.clone(),
                action: "completing the VM state",
                path: vmstate,
                source,
            })
    }

    pub(super) fn mark_resumed(&mut self, at: Duration) {
        info!(node = %self.name, after = ?at, "guest resumed");
        self.times.resumed = Some(at);
    }

    /// Closes QEMU's console input (QEMU is ending and must not block on it).
    pub(super) fn close_console_input(&mut self) {
        self.console.close_input();
    }

    /// Fails if QEMU has exited, quoting the end of the console.
    pub(super) fn check_qemu(&mut self) -> Result<(), LaunchError> {
        let Some(qemu) = self.qemu.as_mut() else {
            return Ok(());
        };
        match qemu.try_exit() {
            Ok(None) => Ok(()),
            Ok(Some(_)) => Err(self.qemu_exited()),
            Err(source) => Err(LaunchError::Wait {
                node: self.name.clone(),
                program: "QEMU",
                source,
            }),
        }
    }

    /// The error for a QEMU whose console output ended.
    fn qemu_exited(&mut self) -> LaunchError {
        let deadline = Instant::now() + OUTPUT_DRAIN;
        let status = match self.qemu.as_mut().map(|qemu| qemu.wait_until(deadline)) {
            Some(Ok(Some(status))) => status.to_string(),
            _ => "its console output ended".to_owned(),
        };
        self.console.output().wait_closed(deadline);
        LaunchError::QemuExited {
            node: self.name.clone(),
            status,
            log: self.console_log(),
            tail: self.console_tail(TAIL_LINES),
        }
    }

    /// Looks for `pattern` in the console output after the previous match,
    /// waiting until `until`. `Ok(None)`: not there yet.
    pub(super) fn search_console(
        &mut self,
        pattern: &str,
        until: Instant,
        started: Instant,
    ) -> Result<Option<ConsoleMatch>, LaunchError> {
        match self.console.search(pattern, until) {
            ConsoleSearch::Found { at, text } => {
                let at = at.saturating_duration_since(started);
                self.times.console_ready.get_or_insert(at);
                Ok(Some(ConsoleMatch { at, text }))
            }
            ConsoleSearch::NotYet => Ok(None),
            ConsoleSearch::Closed => Err(self.qemu_exited()),
        }
    }

    pub(super) fn console_timeout(&self, pattern: &str, timeout: Duration) -> LaunchError {
        LaunchError::ConsoleTimeout {
            node: self.name.clone(),
            pattern: pattern.to_owned(),
            timeout,
            log: self.console_log(),
            tail: self.console_tail(TAIL_LINES),
        }
    }

    /// Types `line` and a newline into the console.
    pub(super) fn send_console(&mut self, line: &str) -> Result<(), LaunchError> {
        self.console
            .send(line)
            .map_err(|source| LaunchError::ConsoleInput {
                node: self.name.clone(),
                source,
            })
    }

    /// Reaps QEMU if it exited; returns its status the first time only.
    pub(super) fn poll_exit(&mut self) -> Option<ExitStatus> {
        let status = self.qemu.as_mut()?.try_exit().ok()??;
        if self.exit_reported {
            return None;
        }
        self.exit_reported = true;
        Some(status)
    }

    /// Whether QEMU is still running (or has not been reaped yet).
    pub(super) fn guest_running(&mut self) -> bool {
        self.qemu
            .as_mut()
            .is_some_and(|qemu| matches!(qemu.try_exit(), Ok(None)))
    }

    pub(super) fn signal_qemu(&mut self, signal: libc::c_int) {
        // Closing the console input first: QEMU must not block on it.
        self.console.close_input();
        if let Some(qemu) = self.qemu.as_mut() {
            qemu.signal(signal);
        }
    }

    pub(super) fn signal_serve(&mut self, signal: libc::c_int) {
        if let Some(serve) = self.serve.as_mut() {
            serve.signal(signal);
        }
    }

    /// Waits until `deadline` for QEMU to exit, then kills it.
    pub(super) fn finish_qemu(&mut self, deadline: Instant) -> Result<(), LaunchError> {
        let Some(qemu) = self.qemu.as_mut() else {
            return Ok(());
        };
        match qemu.finish_by(deadline) {
            Ok(Stopped::Exited(_)) => {}
            Ok(Stopped::Killed) => {
                // The guest's disk state is in the backend: nothing is lost.
                warn!(node = %self.name, "QEMU ignored SIGTERM and was killed");
            }
            Err(source) => {
                return Err(self.teardown_error(format!("cannot reap QEMU: {source}")));
            }
        }
        // QEMU leaves its monitor socket behind; nobody listens on it now.
        let qmp = self.qmp_socket();
        if fs::symlink_metadata(&qmp).is_ok_and(|m| m.file_type().is_socket())
            && UnixStream::connect(&qmp).is_err()
        {
            let _ = fs::remove_file(&qmp);
        }
        Ok(())
    }

    /// Waits until `deadline` for `ociblk serve` to exit, then kills it.
    /// Fails unless it exited cleanly: only then is the overlay surely flushed.
    pub(super) fn finish_serve(&mut self, deadline: Instant) -> Result<(), LaunchError> {
        let Some(serve) = self.serve.as_mut() else {
            return Ok(());
        };
        let problem = match serve.finish_by(deadline) {
            Ok(Stopped::Exited(status)) if status.success() => return Ok(()),
            Ok(Stopped::Exited(_)) if self.serve_exit_reported => return Ok(()),
            Ok(Stopped::Exited(status)) => format!("ociblk serve exited with {status}"),
            Ok(Stopped::Killed) => "ociblk serve did not stop after SIGTERM and was killed".into(),
            Err(source) => format!("cannot reap ociblk serve: {source}"),
        };
        self.serve_output.wait_closed(Instant::now() + OUTPUT_DRAIN);
        Err(self.teardown_error(format!(
            "{problem}; last lines of {}:\n{}",
            self.serve_log().display(),
            self.serve_output.tail(TAIL_LINES)
        )))
    }

    fn teardown_error(&self, problem: String) -> LaunchError {
        LaunchError::Teardown {
            node: self.name.clone(),
            problem,
        }
    }

    /// Waits (bounded) for the log copiers to reach the end of the output,
    /// after both children are gone.
    pub(super) fn finish_output(&mut self, deadline: Instant) {
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

    /// Removes the sockets (and the socket's lock file) of an `ociblk
    /// serve` that was killed before it could remove them itself. A serve that exited normally removed its
    /// socket, or never had one (e.g. because another server owns it).
    pub(super) fn remove_leftovers(&self) {
        let Some(serve) = self.serve.as_ref() else {
            return;
        };
        if serve.status().and_then(|s| s.signal()).is_none() {
            return;
        }
        let temp_prefix = temp_socket_prefix(serve.pid());
        let mut leftovers = vec![self.socket()];
        if let Ok(entries) = fs::read_dir(&self.dir) {
            leftovers.extend(
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_name().as_bytes().starts_with(temp_prefix.as_bytes()))
                    .map(|e| e.path()),
            );
        }
        for path in leftovers {
            // A socket someone listens on is not a leftover.
            if fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket())
                && UnixStream::connect(&path).is_err()
            {
                match fs::remove_file(&path) {
                    Ok(()) => {
                        info!(node = %self.name, socket = %path.display(), "removed a leftover socket")
                    }
                    Err(e) => {
                        warn!(node = %self.name, socket = %path.display(), "cannot remove a leftover socket: {e}")
                    }
                }
            }
        }
        // Harmless if left (the next server takes it), but not ours to
        // leave. Removed only if nobody holds it; a server that opened it
        // meanwhile notices the removal and takes a new one.
        let lock = lock_path(&self.socket());
        if let Ok(file) = File::open(&lock)
            && try_lock_exclusive(&file).unwrap_or(false)
            && let Err(e) = fs::remove_file(&lock)
        {
            warn!(node = %self.name, lock = %lock.display(), "cannot remove a leftover socket lock file: {e}");
        }
    }
}

fn running_pid(process: Option<&Process>) -> Option<u32> {
    process.filter(|p| p.status().is_none()).map(Process::pid)
}

/// The last `count` lines of `text`.
fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

/// swtpm's option values are comma-separated like QEMU's, but it has no
/// escape for a comma; such paths are refused when the spec is validated.
fn swtpm_option(prefix: &str, path: &Path) -> std::ffi::OsString {
    let mut value = std::ffi::OsString::from(prefix);
    value.push(path.as_os_str());
    value
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeSpec;

    /// A node whose backend was killed by a signal (a `sleep` stands in for
    /// `ociblk serve`, which is not needed to leave files behind).
    fn node_with_killed_backend(dir: &Path) -> Node {
        let mut spec = ClusterSpec::new("img", dir, NodeSpec::numbered("n", 1));
        let vars = dir.join("vars.fd");
        fs::write(&vars, b"vars").unwrap();
        spec.qemu.ovmf_vars_template = vars;
        let mut node = Node::prepare(&spec, &spec.nodes[0]).unwrap();
        let mut sleep = Command::new("sleep");
        sleep.arg("60");
        let mut serve = Process::spawn(
            &mut sleep,
            libc::SIGKILL,
            Some(&node.dir.join(SERVE_PID_FILE)),
        )
        .unwrap();
        serve.kill();
        node.serve = Some(serve);
        node
    }

    #[test]
    fn a_killed_backends_socket_and_lock_file_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let node = node_with_killed_backend(dir.path());
        // What `ociblk serve` leaves when killed: a stale socket and an
        // unlocked lock file.
        drop(std::os::unix::net::UnixListener::bind(node.socket()).unwrap());
        let lock = lock_path(&node.socket());
        fs::write(&lock, b"").unwrap();
        node.remove_leftovers();
        assert!(!node.socket().exists(), "socket left");
        assert!(!lock.exists(), "lock file left");
    }

    #[test]
    fn a_lock_file_someone_holds_is_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        let node = node_with_killed_backend(dir.path());
        let lock = lock_path(&node.socket());
        let held = File::create(&lock).unwrap();
        assert!(try_lock_exclusive(&held).unwrap());
        node.remove_leftovers();
        assert!(lock.exists(), "a held lock file was removed");
    }
}
