// SPDX-License-Identifier: Apache-2.0

//! `ociblk-bench`: a load generator for vhost-user-blk backends, built on
//! this crate's vhost-user-blk client.
//!
//! * [`args`]: the command line;
//! * [`cpu`]: CPU time of the client and of the server over a job;
//! * [`job`]: the workload runner, one thread per queue keeping `iodepth` requests in
//!   flight;
//! * [`histogram`]: the latency histogram;
//! * [`report`]: the results, as text or JSON;
//! * [`dump`]: reads a whole disk and hashes it;
//! * [`pattern`]: the write pattern; offsets come from [`crate::rng`].

pub mod args;
pub mod cpu;
pub mod dump;
pub mod histogram;
pub mod job;
pub mod pattern;
pub mod pread;
pub mod report;

use std::path::Path;
use std::time::Duration;

use virtio_bindings::virtio_blk::VIRTIO_BLK_F_RO;

use crate::{ClientError, ClientOptions, MAX_QUEUE_SIZE, SECTOR_SIZE, VhostBlkClient};

/// Failures of a benchmark or dump. Requests the device completes with an error status
/// are not failures of this kind: they are counted in the report (and make the command
/// fail after printing it).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The command line does not fit the device (or itself).
    #[error("{0}")]
    Invalid(String),
    /// The client failed: connecting, negotiating, submitting or waiting.
    ///
    /// The client's error is shown, not chained as a source: its messages already
    /// include their own sources, which an error chain would print twice.
    #[error("{context}: {error}")]
    Client {
        /// What was being done.
        context: String,
        /// The client's error.
        error: ClientError,
    },
    /// A request was not completed in time.
    #[error("queue {queue}: {what} not completed within {timeout:?}")]
    Timeout {
        /// The queue.
        queue: u16,
        /// The request, e.g. `read of 4096 bytes at 8192`.
        what: String,
        /// The bound.
        timeout: Duration,
    },
    /// The device completed a request of `dump` with an error status or short data.
    #[error("{0}")]
    ReadFailed(String),
    /// A local file operation failed (the I/O error is the source).
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// A worker thread panicked or could not be started.
    #[error("worker thread: {0}")]
    Thread(String),
}

impl BenchError {
    /// Wraps a client error with a fixed context.
    pub(crate) fn client(context: &'static str) -> impl FnOnce(ClientError) -> Self {
        move |error| Self::Client {
            context: context.into(),
            error,
        }
    }

    /// Wraps a client error of queue `queue` while doing `what`; nothing is formatted
    /// unless it fails, so this costs nothing on the hot path.
    pub(crate) fn on_queue(queue: u16, what: &'static str) -> impl FnOnce(ClientError) -> Self {
        move |error| Self::Client {
            context: format!("queue {queue}: {what}"),
            error,
        }
    }
}

/// Guest memory never exceeds this (the memfd is shared with the backend).
const MAX_MEMORY: u64 = 16 << 30;
/// Slack per queue for headers, status bytes and alignment.
const POOL_SLACK: u64 = 256 << 10;

/// Client options for `queues` queues each keeping `iodepth` requests of up to `bs`
/// bytes in flight and holding `reserved` more buffers of `bs` bytes for the caller
/// ([`crate::BlkQueue::reserve_buffers`]): a ring large enough for three descriptors
/// per request and guest memory for every buffer.
pub fn client_options(
    queues: u16,
    iodepth: u32,
    bs: u64,
    reserved: u32,
    timeout: Duration,
) -> Result<ClientOptions, BenchError> {
    let descriptors = u64::from(iodepth) * 3;
    let queue_size = descriptors.max(128).next_power_of_two();
    if queue_size > u64::from(MAX_QUEUE_SIZE) {
        return Err(BenchError::Invalid(format!(
            "iodepth {iodepth} needs {descriptors} descriptors per queue, more than {MAX_QUEUE_SIZE}"
        )));
    }
    // The client's buffer pool hands out power-of-two blocks; blocks of a page or more
    // are page aligned, and the small header and status blocks in between cost up to a
    // page of alignment each.
    let block = bs.max(4096).next_power_of_two();
    let ring = 32 * queue_size + 4 * 4096;
    let per_queue = u64::from(iodepth)
        .checked_mul(block + 8192)
        .and_then(|b| b.checked_add(u64::from(reserved).checked_mul(block)?))
        .and_then(|b| b.checked_add(ring + POOL_SLACK))
        .filter(|&b| b <= MAX_MEMORY);
    let memory = per_queue
        .and_then(|b| b.checked_mul(u64::from(queues)))
        .filter(|&m| m <= MAX_MEMORY)
        .ok_or_else(|| {
            BenchError::Invalid(format!(
                "{queues} queues x iodepth {iodepth} x bs {bs} needs more than {} GiB of \
                 guest memory",
                MAX_MEMORY >> 30
            ))
        })?;
    let memory = memory.max(4 << 20).next_multiple_of(2 << 20);
    Ok(ClientOptions {
        queues,
        queue_size: queue_size as u16,
        memory_size: usize::try_from(memory)
            .map_err(|_| BenchError::Invalid(format!("{memory} bytes of guest memory")))?,
        timeout,
        event_idx: true,
        indirect: false,
        kick_suppression: true,
        poison_buffers: false,
        ..ClientOptions::default()
    })
}

/// Connects and checks that one request of `bs` bytes fits the device's limits (the
/// client sends each request's data as one descriptor).
pub fn connect(socket: &Path, opts: ClientOptions, bs: u64) -> Result<VhostBlkClient, BenchError> {
    let client = VhostBlkClient::connect(socket, opts).map_err(|error| {
        let context = match error {
            ClientError::Connect { .. } => "socket unreachable",
            _ => "vhost-user negotiation failed",
        };
        BenchError::Client {
            context: context.into(),
            error,
        }
    })?;
    let config = client.config();
    let block = u64::from(config.block_size()).max(SECTOR_SIZE);
    if bs == 0 || !bs.is_multiple_of(block) {
        return Err(BenchError::Invalid(format!(
            "bs {bs} is not a positive multiple of the device's {block}-byte block"
        )));
    }
    if bs > u64::from(u32::MAX) {
        return Err(BenchError::Invalid(format!(
            "bs {bs} does not fit one request"
        )));
    }
    if let Some(max) = config.size_max.filter(|&m| m > 0)
        && bs > u64::from(max)
    {
        return Err(BenchError::Invalid(format!(
            "bs {bs} exceeds the device's size_max of {max} bytes per segment"
        )));
    }
    if config.capacity_bytes() == 0 {
        return Err(BenchError::Invalid("the device has no capacity".into()));
    }
    Ok(client)
}

/// Whether the device is read-only.
pub fn is_read_only(client: &VhostBlkClient) -> bool {
    client.has_feature(VIRTIO_BLK_F_RO)
}
