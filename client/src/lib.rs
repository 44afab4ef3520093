// SPDX-License-Identifier: Apache-2.0

//! A vhost-user-blk frontend: connects to a vhost-user-blk backend over its Unix socket,
//! plays the part of the VMM and guest driver, and issues virtio-blk requests.
//!
//! [`VhostBlkClient::connect`] does the vhost-user handshake (features, protocol features,
//! queue count, owner, config space, memory table, rings), with memfd-backed guest memory
//! and split virtqueues laid out by the client. Then:
//!
//! * blocking typed requests: [`VhostBlkClient::read`], [`write`](VhostBlkClient::write),
//!   [`flush`](VhostBlkClient::flush), [`discard`](VhostBlkClient::discard),
//!   [`write_zeroes`](VhostBlkClient::write_zeroes), [`get_id`](VhostBlkClient::get_id),
//!   each returning a [`Completion`] whose [`BlkStatus`] is the device's verdict, while
//!   [`ClientError`] reports transport failures (timeouts, disconnects, bad rings);
//! * reads that leave their data in guest memory, as a benchmark wants them:
//!   [`BlkQueue::reserve_buffers`] once, then [`Request::ReadInto`] with those buffers
//!   in turn (no copy out, no allocation per completion);
//! * many requests in flight: [`VhostBlkClient::submit`] returns a [`Token`],
//!   [`VhostBlkClient::poll_completions`] reaps without blocking and
//!   [`VhostBlkClient::wait_call`] sleeps (bounded) on the call eventfd;
//! * arbitrary, also malformed, descriptor chains: [`VhostBlkClient::submit_raw`] with
//!   [`RawDesc`]s and [`VhostBlkClient::wait`] for a [`RawCompletion`].
//!
//! Every wait is bounded: control messages by [`ClientOptions::timeout`] (a watchdog shuts
//! the socket down if the backend does not answer), requests by a deadline. Nothing the
//! backend sends or writes into guest memory can make the client panic.
//!
//! ```no_run
//! use std::path::Path;
//! use std::time::Duration;
//! use ociblk_client::{BlkStatus, ClientOptions, Request, VhostBlkClient};
//!
//! let opts = ClientOptions { queues: 2, ..ClientOptions::default() };
//! let mut client = VhostBlkClient::connect(Path::new("/run/disk.sock"), opts)?;
//! assert_eq!(client.write(0, 4096, &[0xaa; 4096])?.status, BlkStatus::Ok);
//! assert_eq!(client.read(1, 4096, 4096)?.data, vec![0xaa; 4096]);
//!
//! // Eight reads in flight on queue 0, reaped in completion order.
//! let queue = client.queue_mut(0)?;
//! for i in 0..8 {
//!     queue.submit(Request::Read { offset: i * 4096, len: 4096 })?;
//! }
//! let mut done = Vec::new();
//! while done.len() < 8 {
//!     if queue.poll_completions(&mut done)? == 0 {
//!         queue.wait_call(Duration::from_secs(1))?;
//!     }
//! }
//! client.disconnect()?;
//! # Ok::<(), ociblk_client::ClientError>(())
//! ```

pub mod bench;
mod client;
mod config;
mod control;
mod error;
mod handshake;
mod memory;
mod options;
mod queue;
mod request;
mod ring;
pub mod rng;

pub use client::VhostBlkClient;
pub use config::{
    BlkConfig, DEFAULT_CONFIG_SIZE, DiscardLimits, Geometry, SECTOR_SIZE, Topology,
    WriteZeroesLimits,
};
pub use error::ClientError;
pub use handshake::CLIENT_FEATURES;
pub use memory::{GUEST_MEMORY_BASE, GuestRam};
pub use options::{ClientOptions, MAX_QUEUE_SIZE};
pub use queue::{BlkQueue, QueueStats};
pub use request::{
    BLK_HEADER_SIZE, BLK_ID_SIZE, BLK_SEGMENT_SIZE, BlkStatus, Completion, GuestBuffer,
    POISON_BYTE, RawCompletion, RawData, RawDesc, Request, Token, blk_header, blk_segment,
};
pub use ring::{DESC_SIZE, SplitRing};
