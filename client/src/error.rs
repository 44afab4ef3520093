// SPDX-License-Identifier: Apache-2.0

//! The client's errors: transport failures only; the device's verdict on a request is
//! the [`BlkStatus`](crate::BlkStatus) of its completion.

use std::path::PathBuf;
use std::time::Duration;

use crate::request::Token;

/// Transport-level failures. The device's per-request verdict is not an error: it is
/// the [`BlkStatus`](crate::BlkStatus) of a [`Completion`](crate::Completion).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The options cannot work.
    #[error("invalid client options: {0}")]
    InvalidOptions(String),
    /// Connecting to the socket failed.
    #[error("connecting to {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A vhost-user message failed (rejected, malformed reply, broken socket).
    #[error("vhost-user {message} failed: {source}")]
    VhostUser {
        /// The message, e.g. `SET_VRING_ADDR (queue 1)`.
        message: String,
        /// The error from the vhost crate.
        source: vhost::Error,
    },
    /// The backend did not finish a vhost-user exchange in time; the connection was
    /// shut down.
    #[error("vhost-user {message}: no answer within {timeout:?}")]
    ControlTimeout {
        /// The message.
        message: String,
        /// The bound that passed.
        timeout: Duration,
    },
    /// The backend lacks something the client needs.
    #[error("backend does not offer {0}")]
    MissingFeature(&'static str),
    /// More queues were asked for than the backend has.
    #[error("{requested} queues requested, backend has {available}")]
    TooManyQueues {
        /// Queues requested.
        requested: u16,
        /// Queues the backend reported.
        available: u64,
    },
    /// The config space reply could not be used.
    #[error("config space: {0}")]
    Config(String),
    /// Setting up guest memory failed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// Accessing guest memory failed.
    #[error("queue {queue}: guest memory access at {addr:#x}: {source}")]
    GuestMemory {
        /// The queue.
        queue: u16,
        /// Guest physical address.
        addr: u64,
        /// The error.
        source: vm_memory::GuestMemoryError,
    },
    /// An eventfd operation failed.
    #[error("queue {queue}: {what} eventfd: {source}")]
    EventFd {
        /// The queue.
        queue: u16,
        /// `kick` or `call`.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// Polling the call eventfd failed.
    #[error("queue {queue}: poll: {source}")]
    Poll {
        /// The queue.
        queue: u16,
        /// The error.
        source: std::io::Error,
    },
    /// The watchdog thread could not be started.
    #[error("starting the vhost-user watchdog: {0}")]
    Watchdog(std::io::Error),
    /// No such queue on this client.
    #[error("queue {queue} does not exist (client has {count})")]
    NoSuchQueue {
        /// The queue asked for.
        queue: u16,
        /// Queues the client has.
        count: u16,
    },
    /// Not enough free descriptors for the chain.
    #[error("queue {queue} full: {needed} descriptors needed, {free} free")]
    QueueFull {
        /// The queue.
        queue: u16,
        /// Descriptors the chain needs.
        needed: usize,
        /// Descriptors free.
        free: usize,
    },
    /// The queue's buffer pool is exhausted.
    #[error("queue {queue}: no guest memory left for a {requested}-byte buffer")]
    OutOfBufferMemory {
        /// The queue.
        queue: u16,
        /// Bytes asked for.
        requested: u64,
    },
    /// The request cannot be expressed.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Waiting for a token that is neither in flight nor completed.
    #[error("queue {queue}: {token:?} is not in flight")]
    UnknownToken {
        /// The queue.
        queue: u16,
        /// The token.
        token: Token,
    },
    /// The request did not complete before the deadline.
    #[error("queue {queue}: {token:?} not completed after {waited:?}")]
    Timeout {
        /// The queue.
        queue: u16,
        /// The token.
        token: Token,
        /// How long the client waited.
        waited: Duration,
    },
    /// The request completed but the device never signalled the call eventfd.
    #[error("queue {queue}: {token:?} completed without a call notification")]
    MissedNotification {
        /// The queue.
        queue: u16,
        /// The token.
        token: Token,
    },
    /// The device put a descriptor id in the used ring that heads no request in flight.
    #[error("queue {queue}: used ring names descriptor {id}, which heads no request in flight")]
    BadUsedId {
        /// The queue.
        queue: u16,
        /// The id the device wrote.
        id: u32,
    },
    /// The device moved the used index further than there are requests in flight.
    #[error(
        "queue {queue}: used index moved from {last_used} to {used_idx} with {in_flight} in flight"
    )]
    BadUsedIndex {
        /// The queue.
        queue: u16,
        /// Index the client had reaped up to.
        last_used: u16,
        /// Index the device published.
        used_idx: u16,
        /// Requests in flight.
        in_flight: usize,
    },
    /// The backend closed the connection.
    #[error("queue {queue}: backend disconnected")]
    Disconnected {
        /// The queue being waited on.
        queue: u16,
    },
}
