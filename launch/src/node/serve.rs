//! A node's `ociblk serve`: started, watched until its socket answers,
//! restarted if it dies under a running guest, stopped, and the sockets a
//! killed one left removed.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ociblk_io::sys::try_lock_exclusive;
use ociblk_server::daemon::{lock_path, temp_socket_prefix};
use tracing::{info, warn};

use super::{Node, OUTPUT_DRAIN, SERVE_PID_FILE, TAIL_LINES};
use crate::process::{Process, Stopped};
use crate::{ClusterSpec, LaunchError, NodeSpec};

/// The `ociblk serve` command of a node.
#[derive(Debug, Clone)]
pub(super) struct ServeCommand {
    binary: PathBuf,
    args: Vec<OsString>,
    /// Prefix of its output echoed to stderr, if echoing.
    echo: Option<String>,
}

/// How often a node's `ociblk serve` that exits unexpectedly is restarted
/// before its exit fails the launch.
pub const MAX_SERVE_RESTARTS: u32 = 3;

impl Node {
    /// Starts `ociblk serve` for this node (seed: the node's name), with
    /// the arguments its spec renders or else [`ClusterSpec::node_serve_args`].
    pub(crate) fn start_serve(
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
    pub(crate) fn restart_dead_serve(&mut self) -> Result<bool, LaunchError> {
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
    pub(crate) fn poll_backend(
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

    pub(crate) fn signal_serve(&mut self, signal: libc::c_int) {
        if let Some(serve) = self.serve.as_mut() {
            serve.signal(signal);
        }
    }

    /// Waits until `deadline` for `ociblk serve` to exit, then kills it.
    /// Fails unless it exited cleanly: only then is the overlay surely flushed.
    pub(crate) fn finish_serve(&mut self, deadline: Instant) -> Result<(), LaunchError> {
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

    /// Removes the sockets (and the socket's lock file) of an `ociblk
    /// serve` that was killed before it could remove them itself. A serve that exited normally removed its
    /// socket, or never had one (e.g. because another server owns it).
    pub(crate) fn remove_leftovers(&self) {
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

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
