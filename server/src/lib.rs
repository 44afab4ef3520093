//! The vhost-user-blk server: serves one [`BlockDevice`](crate::device::BlockDevice)
//! to a vhost-user frontend (QEMU's `vhost-user-blk-pci`) over a Unix socket.
//! It knows a disk only through that trait: nothing of images, payloads or
//! overlays.
//!
//! - [`device`]: the `BlockDevice` trait the server serves.
//! - [`config`]: server options, offered feature bits and the virtio-blk
//!   configuration space.
//! - [`request`]: parsing and executing one virtio-blk request.
//! - [`backend`]: the `VhostUserBackend` implementation, one worker thread
//!   per virtqueue that pops requests and polls the ring ([`poll`]).
//! - [`engine`]: per device, the I/O pool ([`io_pool`]) that runs a queue's
//!   requests concurrently and the flush thread ([`flusher`]) that merges
//!   flushes; [`completion`] publishes each queue's completions in order.
//! - [`dirty_log`]: marking the guest pages the server writes while QEMU
//!   migrates the VM.
//! - [`daemon`]: the accept loop, one connection at a time, until shutdown.
//! - `mem_disk`: an in-memory device for tests (with the `test-utils`
//!   feature).

use std::io;
use std::path::PathBuf;

pub mod backend;
pub mod completion;
pub mod config;
pub mod daemon;
pub mod device;
pub mod dirty_log;
pub mod engine;
pub mod flusher;
pub mod io_pool;
#[cfg(any(test, feature = "test-utils"))]
pub mod mem_disk;
pub mod poll;
pub mod request;
#[cfg(test)]
mod test_disk;

pub use backend::BlkBackend;
pub use config::ServerOptions;
pub use daemon::{ShutdownSignal, serve};
pub use device::BlockDevice;
pub use engine::DeviceEngine;
#[cfg(any(test, feature = "test-utils"))]
pub use mem_disk::MemDisk;

/// Errors of the vhost-user-blk server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("invalid queue count {0}: must be between 1 and {max}", max = config::MAX_QUEUES)]
    QueueCount(u16),
    #[error(
        "invalid queue size {0}: must be a power of two between {min} and {max}",
        min = config::MIN_QUEUE_SIZE,
        max = config::MAX_QUEUE_SIZE
    )]
    QueueSize(u16),
    #[error("{} exists and is not a socket; refusing to replace it", .0.display())]
    NotASocket(PathBuf),
    #[error(
        "socket {} is in use by another server (listening on it, or starting up)",
        .0.display()
    )]
    SocketInUse(PathBuf),
    #[error(
        "socket path {} is {len} bytes long, a Unix socket path holds at most {max} bytes",
        path.display(),
        max = daemon::MAX_SOCKET_PATH
    )]
    SocketPathTooLong { path: PathBuf, len: usize },
    // The cause is the source, not part of the message: `{:#}` prints
    // the chain, and would print it twice.
    #[error("socket {}", path.display())]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("socket lock file {}", path.display())]
    SocketLock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("creating an eventfd")]
    EventFd(#[source] io::Error),
    #[error("installing signal handlers")]
    Signal(#[source] io::Error),
    #[error("waiting for a connection or shutdown")]
    Poll(#[source] io::Error),
    // The vhost-user-backend error is neither Sync nor std::error::Error,
    // so only its message is kept.
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    #[error("invalid I/O thread count {0}: must be at most {max}", max = config::MAX_IO_THREADS)]
    IoThreads(usize),
    #[error("invalid poll window {0} us: must be at most {max}", max = config::MAX_POLL_US)]
    PollMax(u32),
    #[error("starting the device's I/O threads")]
    Threads(#[source] io::Error),
    #[error("flushing the device at shutdown")]
    Flush(#[source] io::Error),
    #[error("invalid handshake timeout: must be positive")]
    HandshakeTimeout,
}
