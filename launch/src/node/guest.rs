//! A node's QEMU: its command line, started with the serial console on
//! a pipe, the console searched and typed into, and stopped.

use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{Node, OUTPUT_DRAIN, QEMU_PID_FILE, TAIL_LINES};
use crate::console::{Console, ConsoleSearch};
use crate::log::Transcript;
use crate::network;
use crate::process::{Process, Stopped};
use crate::qemu::{
    QemuBoot, QemuCommand, QemuDisk, QemuNetwork, Reconnect, incoming_args, qmp_args,
};
use crate::{ClusterSpec, ConsoleMatch, LaunchError};

impl Node {
    /// Starts QEMU with the node's disk as its only (boot) disk, the
    /// serial console on stdin/stdout.
    pub(crate) fn start_qemu(
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

    /// Fails if QEMU has exited, quoting the end of the console.
    pub(crate) fn check_qemu(&mut self) -> Result<(), LaunchError> {
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
    pub(crate) fn search_console(
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

    pub(crate) fn console_timeout(&self, pattern: &str, timeout: Duration) -> LaunchError {
        LaunchError::ConsoleTimeout {
            node: self.name.clone(),
            pattern: pattern.to_owned(),
            timeout,
            log: self.console_log(),
            tail: self.console_tail(TAIL_LINES),
        }
    }

    /// Types `line` and a newline into the console.
    pub(crate) fn send_console(&mut self, line: &str) -> Result<(), LaunchError> {
        self.console
            .send(line)
            .map_err(|source| LaunchError::ConsoleInput {
                node: self.name.clone(),
                source,
            })
    }

    /// Closes QEMU's console input (QEMU is ending and must not block on it).
    pub(crate) fn close_console_input(&mut self) {
        self.console.close_input();
    }

    /// Reaps QEMU if it exited; returns its status the first time only.
    pub(crate) fn poll_exit(&mut self) -> Option<ExitStatus> {
        let status = self.qemu.as_mut()?.try_exit().ok()??;
        if self.exit_reported {
            return None;
        }
        self.exit_reported = true;
        Some(status)
    }

    /// Whether QEMU is still running (or has not been reaped yet).
    pub(crate) fn guest_running(&mut self) -> bool {
        self.qemu
            .as_mut()
            .is_some_and(|qemu| matches!(qemu.try_exit(), Ok(None)))
    }

    pub(crate) fn signal_qemu(&mut self, signal: libc::c_int) {
        // Closing the console input first: QEMU must not block on it.
        self.console.close_input();
        if let Some(qemu) = self.qemu.as_mut() {
            qemu.signal(signal);
        }
    }

    /// Waits until `deadline` for QEMU to exit, then kills it.
    pub(crate) fn finish_qemu(&mut self, deadline: Instant) -> Result<(), LaunchError> {
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
}
