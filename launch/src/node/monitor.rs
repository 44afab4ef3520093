//! A node's QMP monitor: connecting to QEMU's, commands run over it, and
//! the guest's VM state saved through it.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use tracing::info;

use super::{Node, VMSTATE_FILE};
use crate::LaunchError;
use crate::qemu::migrate_to_file_uri;
use crate::qmp::{MigrationStatus, Qmp, QmpError};

/// Bound of each QMP exchange with a node's QEMU.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a QEMU whose monitor failed may take to exit before the
/// monitor's error is reported instead of its exit.
const QMP_EXIT_GRACE: Duration = Duration::from_secs(2);

impl Node {
    /// Connects to QEMU's monitor once its socket is there, failing if
    /// QEMU exits first, `cancel` triggers or `deadline` passes.
    pub(crate) fn connect_qmp(
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
    pub(crate) fn qmp_execute(
        &mut self,
        qmp: &mut Qmp,
        command: &str,
        arguments: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, LaunchError> {
        qmp.execute(command, arguments)
            .map_err(|e| self.qmp_error(e))
    }

    pub(crate) fn qmp_query_migrate(
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
    pub(crate) fn start_saving_vmstate(&mut self, qmp: &mut Qmp) -> Result<(), LaunchError> {
        let temp = self.vmstate_temp();
        // Only an earlier save of ours, interrupted, leaves this name.
        match fs::remove_file(&temp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(self.files_error("removing the unfinished", &temp)(e));
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
            .map_err(self.files_error("creating", &temp))?;
        let uri = migrate_to_file_uri(&temp).map_err(|reason| LaunchError::VmState {
            node: self.name.clone(),
            problem: format!("cannot save the VM state to {}: {reason}", temp.display()),
        })?;
        self.qmp_execute(qmp, "migrate", Some(serde_json::json!({ "uri": uri })))?;
        Ok(())
    }

    /// Once QEMU completed the save: syncs the VM state and gives it its name.
    pub(crate) fn finish_saving_vmstate(&mut self) -> Result<(), LaunchError> {
        let temp = self.vmstate_temp();
        let vmstate = self.vmstate();
        File::open(&temp)
            .and_then(|f| f.sync_all())
            .and_then(|()| fs::rename(&temp, &vmstate))
            .map_err(self.files_error("completing the VM state", &vmstate))
    }

    pub(crate) fn mark_resumed(&mut self, at: Duration) {
        info!(node = %self.name, after = ?at, "guest resumed");
        self.times.resumed = Some(at);
    }
}
