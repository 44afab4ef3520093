//! A running cluster's VM states: saved for a running snapshot (every
//! guest paused, its state written through QEMU's migration over the
//! node's QMP socket), and loaded by a fork's guests, which then resume
//! together.

use std::path::Path;
use std::time::{Duration, Instant};

use super::Cluster;
use crate::{LaunchError, Node};

/// How long restored guests may take to load their VM state.
const RESUME_TIMEOUT: Duration = Duration::from_secs(120);

impl Cluster {
    /// Restored guests: waits until every QEMU loaded its VM state (it is
    /// then paused, as it was saved), then lets them all continue (QMP
    /// `cont`) at once, so that the nodes meet again on their network as
    /// they left it. Fails if a QEMU exits (a state it cannot load) or
    /// [`RESUME_TIMEOUT`] passes.
    pub(super) fn resume(&mut self) -> Result<(), LaunchError> {
        let deadline = Instant::now() + RESUME_TIMEOUT;
        let mut monitors = Vec::with_capacity(self.nodes.len());
        for node in &mut self.nodes {
            monitors.push(node.connect_qmp(deadline, self.cancel.as_ref())?);
        }
        let late = |node: &Node| LaunchError::VmState {
            node: node.name().to_owned(),
            problem: format!(
                "QEMU did not load its VM state {} within {RESUME_TIMEOUT:?}",
                node.restored_from().unwrap_or(Path::new("")).display()
            ),
        };
        self.poll_nodes(Some((deadline, &late)), |i, node| {
            let status = node.qmp_execute(&mut monitors[i], "query-status", None)?;
            match status.get("status").and_then(serde_json::Value::as_str) {
                Some("inmigrate") => Ok(false),
                Some("paused" | "prelaunch" | "running") => Ok(true),
                other => Err(LaunchError::VmState {
                    node: node.name().to_owned(),
                    problem: format!(
                        "QEMU is {} after loading the VM state {}",
                        other.unwrap_or("in no known state"),
                        node.restored_from().unwrap_or(Path::new("")).display()
                    ),
                }),
            }
        })?;
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
        let late = |node: &Node| LaunchError::VmState {
            node: node.name().to_owned(),
            problem: format!("saving the VM state took longer than {timeout:?}"),
        };
        self.poll_nodes(Some((deadline, &late)), |i, node| {
            let status = node.qmp_query_migrate(&mut monitors[i])?;
            match status.status.as_str() {
                "completed" => node.finish_saving_vmstate().map(|()| true),
                "failed" | "cancelled" => Err(LaunchError::VmState {
                    node: node.name().to_owned(),
                    problem: format!(
                        "saving the VM state {}: {}",
                        status.status,
                        status.error.as_deref().unwrap_or("QEMU gave no reason")
                    ),
                }),
                _ => Ok(false),
            }
        })?;
        for (node, qmp) in self.nodes.iter_mut().zip(&mut monitors) {
            // QEMU may close the connection before it answers.
            let _ = qmp.execute("quit", None);
            node.close_console_input();
        }
        Ok(())
    }
}
