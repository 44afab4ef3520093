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

mod cluster;
pub mod console;
mod error;
pub mod log;
pub mod network;
mod node;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod snapshot;
mod spec;

use std::time::Duration;

pub use cluster::Cluster;
pub use error::LaunchError;
pub use network::NetworkSpec;
pub use node::{
    CONSOLE_LOG_FILE, ConsoleMatch, LOCK_FILE, Node, NodeTimes, OVERLAY_FILE, OVMF_VARS_FILE,
    QEMU_PID_FILE, QMP_SOCKET_FILE, SERVE_LOG_FILE, SERVE_PID_FILE, SOCKET_FILE, TPM_LOG_FILE,
    TPM_PID_FILE, TPM_SOCKET_FILE, TPM_STATE_DIR, VMSTATE_FILE,
};
pub use qemu::{QemuBoot, QemuCommand, QemuDisk, QemuNetwork, Reconnect, qemu_version};
pub use spec::{ClusterSpec, NodeSpec, QemuSpec, TpmSpec};

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
