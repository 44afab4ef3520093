//! A node's swtpm: started before QEMU (its state in the node's
//! directory), stopped after it.

use std::fs;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{
    Node, TAIL_LINES, TPM_LOG_FILE, TPM_PID_FILE, TPM_SOCKET_FILE, TPM_STATE_DIR, running_pid,
};
use crate::log::create_log_file;
use crate::process::{Process, Stopped};
use crate::{LaunchError, TpmSpec};

impl Node {
    /// Starts the node's swtpm and waits until its control socket exists
    /// (swtpm creates it before it serves, within milliseconds).
    pub(super) fn start_tpm(
        &mut self,
        tpm: &TpmSpec,
        timeout: Duration,
    ) -> Result<(), LaunchError> {
        const PROGRAM: &str = "swtpm";
        let spawn_error = || self.spawn_error(PROGRAM, &tpm.binary);
        let state = self.dir.join(TPM_STATE_DIR);
        fs::create_dir_all(&state)
            .and_then(|()| fs::set_permissions(&state, fs::Permissions::from_mode(0o700)))
            .map_err(self.files_error("creating", &state))?;
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
    pub(crate) fn finish_tpm(&mut self, deadline: Instant) -> Result<(), LaunchError> {
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
