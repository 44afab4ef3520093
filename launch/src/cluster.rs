//! A running cluster: launching it, watching and driving its nodes, and
//! tearing it down (a running cluster's VM states: [`vm_state`]).

mod vm_state;

use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use ociblk_server::ShutdownSignal;
use tracing::warn;

use crate::node::Node;
use crate::qemu::{Reconnect, qemu_version};
use crate::{ClusterSpec, ConsoleMatch, LaunchError};

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
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A deadline of [`Cluster::poll_nodes`], and the error for the first node
/// not done when it passed.
type Deadline<'a> = (Instant, &'a dyn Fn(&Node) -> LaunchError);

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
        let started = self.started;
        let deadline = Instant::now() + spec.socket_timeout;
        // `poll_backend` fails once the deadline passed.
        self.poll_nodes(None, |_, node| {
            let ready = node.poll_backend(started, deadline, spec.socket_timeout)?;
            if ready {
                node.start_qemu(spec, started, reconnect)?;
            }
            Ok(ready)
        })
    }

    /// Calls `step` for every node (and its index) in rounds
    /// [`POLL_INTERVAL`] apart until it returned `true` (done) for each,
    /// checking for cancellation before every round. With a deadline, once
    /// it passed with nodes left, fails with its error for the first of
    /// them.
    fn poll_nodes(
        &mut self,
        deadline: Option<Deadline<'_>>,
        mut step: impl FnMut(usize, &mut Node) -> Result<bool, LaunchError>,
    ) -> Result<(), LaunchError> {
        let mut waiting: Vec<usize> = (0..self.nodes.len()).collect();
        while !waiting.is_empty() {
            self.check_cancel()?;
            let mut still_waiting = Vec::with_capacity(waiting.len());
            for i in waiting {
                if !step(i, &mut self.nodes[i])? {
                    still_waiting.push(i);
                }
            }
            waiting = still_waiting;
            if let (Some(&first), Some((deadline, late))) = (waiting.first(), deadline)
                && Instant::now() >= deadline
            {
                return Err(late(&self.nodes[first]));
            }
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
    use crate::{NodeSpec, OVMF_VARS_FILE, SERVE_PID_FILE};

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
