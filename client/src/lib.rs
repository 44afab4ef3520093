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
mod config;
mod memory;
mod queue;
mod request;
mod ring;
pub mod rng;

use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VHOST_USER_CONFIG_SIZE, VhostUserConfigFlags, VhostUserHeaderFlag,
};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VringConfigData};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_GEOMETRY, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

pub use config::{
    BlkConfig, DEFAULT_CONFIG_SIZE, DiscardLimits, Geometry, SECTOR_SIZE, Topology,
    WriteZeroesLimits,
};
pub use memory::{GUEST_MEMORY_BASE, GuestRam};
pub use queue::{BlkQueue, QueueStats};
pub use request::{
    BLK_HEADER_SIZE, BLK_ID_SIZE, BLK_SEGMENT_SIZE, BlkStatus, Completion, GuestBuffer,
    POISON_BYTE, RawCompletion, RawData, RawDesc, Request, Token, blk_header, blk_segment,
};
pub use ring::{DESC_SIZE, SplitRing};

use config::MIN_CONFIG_SIZE;
use memory::{BufferPool, PAGE_SIZE, SharedRam};
use queue::{QueueSettings, RingLayout};

/// Largest split virtqueue size allowed by the virtio spec.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Smallest buffer pool a queue gets; below this `memory_size` is rejected.
const MIN_POOL_SIZE: u64 = 64 * 1024;

/// Interval between connection attempts while the listener refuses connections.
const CONNECT_RETRY_INTERVAL: Duration = Duration::from_millis(10);

const fn bit(feature: u32) -> u64 {
    1 << feature
}

/// Virtio features the client understands and acks when offered.
pub const CLIENT_FEATURES: u64 = bit(VIRTIO_F_VERSION_1)
    | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    | bit(VIRTIO_RING_F_INDIRECT_DESC)
    | bit(VIRTIO_RING_F_EVENT_IDX)
    | bit(VIRTIO_BLK_F_SIZE_MAX)
    | bit(VIRTIO_BLK_F_SEG_MAX)
    | bit(VIRTIO_BLK_F_GEOMETRY)
    | bit(VIRTIO_BLK_F_RO)
    | bit(VIRTIO_BLK_F_BLK_SIZE)
    | bit(VIRTIO_BLK_F_FLUSH)
    | bit(VIRTIO_BLK_F_TOPOLOGY)
    | bit(VIRTIO_BLK_F_CONFIG_WCE)
    | bit(VIRTIO_BLK_F_MQ)
    | bit(VIRTIO_BLK_F_DISCARD)
    | bit(VIRTIO_BLK_F_WRITE_ZEROES);

/// Connection settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientOptions {
    /// Queues to set up (at most what the backend offers).
    pub queues: u16,
    /// Descriptors per queue: a power of two, at most [`MAX_QUEUE_SIZE`].
    pub queue_size: u16,
    /// Bytes of guest memory (rings and request buffers).
    pub memory_size: usize,
    /// Bound on each vhost-user exchange and each blocking request.
    pub timeout: Duration,
    /// Negotiate `VIRTIO_RING_F_EVENT_IDX` if offered.
    pub event_idx: bool,
    /// Put typed requests in an indirect table (one ring descriptor per request);
    /// needs `VIRTIO_RING_F_INDIRECT_DESC`.
    pub indirect: bool,
    /// Skip kicks the device suppressed (`avail_event` or `VRING_USED_F_NO_NOTIFY`);
    /// off means every submission kicks.
    pub kick_suppression: bool,
    /// Fill read buffers with [`POISON_BYTE`] before submitting (so data the device
    /// failed to write shows); benchmarks may turn it off.
    pub poison_buffers: bool,
    /// Bytes of config space to read.
    pub config_size: u32,
    /// Virtio features the client may ack, intersected with [`CLIENT_FEATURES`].
    pub feature_mask: u64,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            queues: 1,
            queue_size: 128,
            memory_size: 64 << 20,
            timeout: Duration::from_secs(10),
            event_idx: true,
            indirect: false,
            kick_suppression: false,
            poison_buffers: true,
            config_size: DEFAULT_CONFIG_SIZE,
            feature_mask: u64::MAX,
        }
    }
}

/// Transport-level failures. The device's per-request verdict is not an error: it is
/// the [`BlkStatus`] of a [`Completion`].
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

/// The vhost-user control channel: a [`Frontend`] plus a watchdog bounding each exchange.
struct Control {
    frontend: Frontend,
    sock: Arc<UnixStream>,
    timeout: Duration,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("sock", &self.sock)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Control {
    /// Runs one vhost-user exchange; if it takes longer than the timeout, a watchdog
    /// thread shuts the socket down, which makes the blocked send/receive return.
    fn call<T>(
        &mut self,
        message: impl Into<String>,
        exchange: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T, ClientError> {
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let fired = AtomicBool::new(false);
        let (sock, timeout, frontend) = (&*self.sock, self.timeout, &mut self.frontend);
        let fired_ref = &fired;
        let result = std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("vhost-user-watchdog".into())
                .spawn_scoped(scope, move || {
                    if let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(timeout) {
                        fired_ref.store(true, Ordering::SeqCst);
                        let _ = sock.shutdown(Shutdown::Both);
                    }
                })
                .map_err(ClientError::Watchdog)?;
            let result = exchange(frontend);
            drop(done_tx);
            Ok(result)
        })?;
        let message = message.into();
        if fired.load(Ordering::SeqCst) {
            return Err(ClientError::ControlTimeout { message, timeout });
        }
        result.map_err(|source| ClientError::VhostUser { message, source })
    }
}

fn connect_socket(path: &Path, timeout: Duration) -> Result<UnixStream, ClientError> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(sock) => return Ok(sock),
            // The listener exists but is not accepting yet: retry, bounded.
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(CONNECT_RETRY_INTERVAL);
            }
            Err(source) => {
                return Err(ClientError::Connect {
                    path: path.to_owned(),
                    source,
                });
            }
        }
    }
}

fn validate(opts: &ClientOptions) -> Result<(), ClientError> {
    let invalid = |why: String| Err(ClientError::InvalidOptions(why));
    if opts.queues == 0 {
        return invalid("at least one queue is needed".into());
    }
    if !opts.queue_size.is_power_of_two() || opts.queue_size > MAX_QUEUE_SIZE {
        return invalid(format!(
            "queue size {} is not a power of two up to {MAX_QUEUE_SIZE}",
            opts.queue_size
        ));
    }
    if opts.config_size < MIN_CONFIG_SIZE || opts.config_size > VHOST_USER_CONFIG_SIZE {
        return invalid(format!("config size {} out of range", opts.config_size));
    }
    if opts.timeout.is_zero() {
        return invalid("timeout must be positive".into());
    }
    Ok(())
}

/// A connection to a vhost-user-blk backend, with its guest memory and queues.
///
/// Dropping the client closes the socket; [`disconnect`](Self::disconnect) first stops
/// the rings the way a VMM does.
pub struct VhostBlkClient {
    control: Control,
    offered_features: u64,
    features: u64,
    protocol_features: VhostUserProtocolFeatures,
    backend_queues: Option<u64>,
    config_size: u32,
    config: BlkConfig,
    queues: Vec<BlkQueue>,
    ram: SharedRam,
}

impl std::fmt::Debug for VhostBlkClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostBlkClient")
            .field("control", &self.control)
            .field("features", &format_args!("{:#x}", self.features))
            .field("protocol_features", &self.protocol_features)
            .field("backend_queues", &self.backend_queues)
            .field("config", &self.config)
            .field("queues", &self.queues.len())
            .finish_non_exhaustive()
    }
}

impl VhostBlkClient {
    /// Connects to the backend listening on `socket` and sets up `opts.queues` queues.
    pub fn connect(socket: &Path, opts: ClientOptions) -> Result<Self, ClientError> {
        validate(&opts)?;
        let stream = connect_socket(socket, opts.timeout)?;
        let sock = Arc::new(stream.try_clone().map_err(|source| ClientError::Connect {
            path: socket.to_owned(),
            source,
        })?);
        let mut control = Control {
            frontend: Frontend::from_stream(stream, u64::from(opts.queues)),
            sock: Arc::clone(&sock),
            timeout: opts.timeout,
        };

        let offered_features = control.call("GET_FEATURES", |f| f.get_features())?;
        if offered_features & bit(VIRTIO_F_VERSION_1) == 0 {
            return Err(ClientError::MissingFeature("VIRTIO_F_VERSION_1"));
        }
        if offered_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(ClientError::MissingFeature(
                "VHOST_USER_F_PROTOCOL_FEATURES",
            ));
        }
        let mut wanted = CLIENT_FEATURES & opts.feature_mask;
        if !opts.event_idx {
            wanted &= !bit(VIRTIO_RING_F_EVENT_IDX);
        }
        // Version 1 and protocol features are not optional for this client.
        wanted |= bit(VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let features = offered_features & wanted;
        if opts.indirect && features & bit(VIRTIO_RING_F_INDIRECT_DESC) == 0 {
            return Err(ClientError::MissingFeature("VIRTIO_RING_F_INDIRECT_DESC"));
        }

        let offered_protocol =
            control.call("GET_PROTOCOL_FEATURES", |f| f.get_protocol_features())?;
        if !offered_protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(ClientError::MissingFeature("VHOST_USER_PROTOCOL_F_CONFIG"));
        }
        let protocol_features = offered_protocol
            & (VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK);
        control.call("SET_PROTOCOL_FEATURES", |f| {
            f.set_protocol_features(protocol_features)
        })?;
        if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // From now on every message without a reply of its own is acknowledged, so
            // the backend's errors surface on the message that caused them.
            control
                .frontend
                .set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }

        let backend_queues = if protocol_features.contains(VhostUserProtocolFeatures::MQ) {
            Some(control.call("GET_QUEUE_NUM", |f| f.get_queue_num())?)
        } else {
            None
        };
        let available = backend_queues.unwrap_or(1);
        if u64::from(opts.queues) > available {
            return Err(ClientError::TooManyQueues {
                requested: opts.queues,
                available,
            });
        }

        control.call("SET_OWNER", |f| f.set_owner())?;
        let config = read_config(&mut control, opts.config_size, features)?;
        if let Some(n) = config.num_queues
            && opts.queues > n
        {
            return Err(ClientError::TooManyQueues {
                requested: opts.queues,
                available: u64::from(n),
            });
        }
        control.call("SET_FEATURES", |f| f.set_features(features))?;

        let ram: SharedRam = Arc::new(GuestRam::new(opts.memory_size)?);
        let region = ram.region_info()?;
        control.call("SET_MEM_TABLE", |f| f.set_mem_table(&[region]).map(drop))?;

        let settings = QueueSettings {
            size: opts.queue_size,
            event_idx: features & bit(VIRTIO_RING_F_EVENT_IDX) != 0,
            kick_suppression: opts.kick_suppression,
            indirect: opts.indirect,
            poison: opts.poison_buffers,
            timeout: opts.timeout,
            // Like a driver that negotiated SIZE_MAX (Linux): data buffers
            // are split into descriptors of at most size_max.
            size_max: config.size_max.filter(|&m| m > 0),
        };
        let queues = setup_queues(&mut control, &ram, &sock, opts.queues, settings)?;

        Ok(Self {
            control,
            offered_features,
            features,
            protocol_features,
            backend_queues,
            config_size: opts.config_size,
            config,
            queues,
            ram,
        })
    }

    /// Virtio features the backend offered.
    pub fn offered_features(&self) -> u64 {
        self.offered_features
    }

    /// Virtio features negotiated (acked with `SET_FEATURES`).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Whether virtio feature `bit` was negotiated.
    pub fn has_feature(&self, bit: u32) -> bool {
        bit < u64::BITS && self.features & (1 << bit) != 0
    }

    /// vhost-user protocol features negotiated.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol_features
    }

    /// Queue count from `GET_QUEUE_NUM`, if the backend supports `MQ`.
    pub fn backend_queue_count(&self) -> Option<u64> {
        self.backend_queues
    }

    /// The config space read at connect (or by the last [`refresh_config`](Self::refresh_config)).
    pub fn config(&self) -> &BlkConfig {
        &self.config
    }

    /// Reads the config space again.
    pub fn refresh_config(&mut self) -> Result<&BlkConfig, ClientError> {
        self.config = read_config(&mut self.control, self.config_size, self.features)?;
        Ok(&self.config)
    }

    /// Switches the write cache mode (`VIRTIO_BLK_F_CONFIG_WCE`) with `SET_CONFIG`.
    pub fn set_writeback(&mut self, writeback: bool) -> Result<(), ClientError> {
        if !self.has_feature(VIRTIO_BLK_F_CONFIG_WCE) {
            return Err(ClientError::MissingFeature("VIRTIO_BLK_F_CONFIG_WCE"));
        }
        let value = [u8::from(writeback)];
        self.control.call("SET_CONFIG (wce)", |f| {
            f.set_config(BlkConfig::WCE_OFFSET, VhostUserConfigFlags::empty(), &value)
        })
    }

    /// Number of queues this client set up.
    pub fn num_queues(&self) -> u16 {
        self.queues.len() as u16
    }

    /// The bound used for control messages and blocking requests.
    pub fn timeout(&self) -> Duration {
        self.control.timeout
    }

    /// Bytes of guest memory.
    pub fn memory_size(&self) -> u64 {
        self.ram.size()
    }

    /// Queue `queue`.
    pub fn queue(&self, queue: u16) -> Result<&BlkQueue, ClientError> {
        let count = self.num_queues();
        self.queues
            .get(usize::from(queue))
            .ok_or(ClientError::NoSuchQueue { queue, count })
    }

    /// Queue `queue`, for submitting and reaping.
    pub fn queue_mut(&mut self, queue: u16) -> Result<&mut BlkQueue, ClientError> {
        let count = self.num_queues();
        self.queues
            .get_mut(usize::from(queue))
            .ok_or(ClientError::NoSuchQueue { queue, count })
    }

    /// All queues, e.g. to drive each from its own thread.
    pub fn queues_mut(&mut self) -> &mut [BlkQueue] {
        &mut self.queues
    }

    /// Submits a typed request on `queue`; see [`BlkQueue::submit`].
    pub fn submit(&mut self, queue: u16, request: Request<'_>) -> Result<Token, ClientError> {
        self.queue_mut(queue)?.submit(request)
    }

    /// Submits a raw descriptor chain on `queue`; see [`BlkQueue::submit_raw`].
    pub fn submit_raw(
        &mut self,
        queue: u16,
        descriptors: &[RawDesc],
    ) -> Result<Token, ClientError> {
        self.queue_mut(queue)?.submit_raw(descriptors)
    }

    /// Notifies the device of published requests; see [`BlkQueue::kick`].
    pub fn kick(&mut self, queue: u16) -> Result<(), ClientError> {
        self.queue_mut(queue)?.kick()
    }

    /// Reaps finished typed requests without blocking; see [`BlkQueue::poll_completions`].
    pub fn poll_completions(
        &mut self,
        queue: u16,
        out: &mut Vec<Completion>,
    ) -> Result<usize, ClientError> {
        self.queue_mut(queue)?.poll_completions(out)
    }

    /// Waits for typed request `token`; see [`BlkQueue::wait_completion`].
    pub fn wait_completion(
        &mut self,
        queue: u16,
        token: Token,
        deadline: Instant,
    ) -> Result<Completion, ClientError> {
        self.queue_mut(queue)?.wait_completion(token, deadline)
    }

    /// Waits for raw request `token`; see [`BlkQueue::wait`].
    pub fn wait(
        &mut self,
        queue: u16,
        token: Token,
        deadline: Instant,
    ) -> Result<RawCompletion, ClientError> {
        self.queue_mut(queue)?.wait(token, deadline)
    }

    /// Blocks on `queue`'s call eventfd; see [`BlkQueue::wait_call`].
    pub fn wait_call(&mut self, queue: u16, timeout: Duration) -> Result<bool, ClientError> {
        self.queue_mut(queue)?.wait_call(timeout)
    }

    /// Reads `len` bytes at byte `offset`; the data is in [`Completion::data`].
    pub fn read(&mut self, queue: u16, offset: u64, len: u32) -> Result<Completion, ClientError> {
        self.queue_mut(queue)?.read(offset, len)
    }

    /// Writes `data` at byte `offset`.
    pub fn write(
        &mut self,
        queue: u16,
        offset: u64,
        data: &[u8],
    ) -> Result<Completion, ClientError> {
        self.queue_mut(queue)?.write(offset, data)
    }

    /// Flushes the write cache.
    pub fn flush(&mut self, queue: u16) -> Result<Completion, ClientError> {
        self.queue_mut(queue)?.flush()
    }

    /// Discards `len` bytes at byte `offset`.
    pub fn discard(
        &mut self,
        queue: u16,
        offset: u64,
        len: u64,
    ) -> Result<Completion, ClientError> {
        self.queue_mut(queue)?.discard(offset, len)
    }

    /// Zeroes `len` bytes at byte `offset`, allowing unmapping if `unmap`.
    pub fn write_zeroes(
        &mut self,
        queue: u16,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<Completion, ClientError> {
        self.queue_mut(queue)?.write_zeroes(offset, len, unmap)
    }

    /// Fetches the device ID; the 20 bytes are in [`Completion::data`].
    pub fn get_id(&mut self, queue: u16) -> Result<Completion, ClientError> {
        self.queue_mut(queue)?.get_id()
    }

    /// Stops every ring with `GET_VRING_BASE` (as a VMM does before it lets go of a
    /// backend) and closes the connection. The socket is closed even if a ring fails
    /// to stop; the first error is returned.
    pub fn disconnect(mut self) -> Result<(), ClientError> {
        let mut result = Ok(());
        for queue in 0..self.queues.len() {
            let stopped = self
                .control
                .call(format!("GET_VRING_BASE (queue {queue})"), |f| {
                    f.get_vring_base(queue)
                });
            if let (Err(e), Ok(())) = (stopped, &result) {
                result = Err(e);
            }
        }
        let _ = self.control.sock.shutdown(Shutdown::Both);
        result
    }
}

impl Drop for VhostBlkClient {
    fn drop(&mut self) {
        // Makes the backend see the disconnect now, even while queue handles or the
        // frontend still hold descriptors of the socket.
        let _ = self.control.sock.shutdown(Shutdown::Both);
    }
}

fn read_config(control: &mut Control, size: u32, features: u64) -> Result<BlkConfig, ClientError> {
    let request = vec![0u8; size as usize];
    let (_, payload) = control.call("GET_CONFIG", |f| {
        f.get_config(0, size, VhostUserConfigFlags::empty(), &request)
    })?;
    BlkConfig::parse(&payload, features)
        .ok_or_else(|| ClientError::Config(format!("{} bytes is too short", payload.len())))
}

/// Lays out the rings and buffer pools in guest memory and hands every ring to the
/// backend.
fn setup_queues(
    control: &mut Control,
    ram: &SharedRam,
    sock: &Arc<UnixStream>,
    count: u16,
    settings: QueueSettings,
) -> Result<Vec<BlkQueue>, ClientError> {
    let mut next = GUEST_MEMORY_BASE;
    let rings: Vec<RingLayout> = (0..count)
        .map(|_| {
            let ring = RingLayout::new(next, settings.size);
            next = ring.end;
            ring
        })
        .collect();
    let end = GUEST_MEMORY_BASE + ram.size();
    let per_queue = end.saturating_sub(next) / u64::from(count) / PAGE_SIZE * PAGE_SIZE;
    if per_queue < MIN_POOL_SIZE {
        return Err(ClientError::InvalidOptions(format!(
            "memory size {} leaves {per_queue} bytes of buffers per queue",
            ram.size()
        )));
    }

    let mut queues = Vec::with_capacity(usize::from(count));
    for (i, ring) in rings.into_iter().enumerate() {
        let index = i as u16;
        let pool_start = next + per_queue * i as u64;
        let pool = BufferPool::new(pool_start, pool_start + per_queue);
        let queue = BlkQueue::new(
            index,
            settings,
            Arc::clone(ram),
            ring,
            pool,
            Arc::clone(sock),
        )?;
        let (desc, avail, used) = queue.ring_addresses();
        let addrs = VringConfigData {
            queue_max_size: settings.size,
            queue_size: settings.size,
            flags: 0,
            desc_table_addr: ram.host_address(desc)?,
            used_ring_addr: ram.host_address(used)?,
            avail_ring_addr: ram.host_address(avail)?,
            log_addr: None,
        };
        let msg = |name: &str| format!("{name} (queue {index})");
        control.call(msg("SET_VRING_NUM"), |f| f.set_vring_num(i, settings.size))?;
        control.call(msg("SET_VRING_BASE"), |f| f.set_vring_base(i, 0))?;
        control.call(msg("SET_VRING_ADDR"), |f| f.set_vring_addr(i, &addrs))?;
        control.call(msg("SET_VRING_CALL"), |f| {
            f.set_vring_call(i, queue.call_fd())
        })?;
        control.call(msg("SET_VRING_KICK"), |f| {
            f.set_vring_kick(i, queue.kick_fd())
        })?;
        control.call(msg("SET_VRING_ENABLE"), |f| f.set_vring_enable(i, true))?;
        queues.push(queue);
    }
    Ok(queues)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixListener;

    /// A "backend" that accepts one connection and runs `serve` on it.
    fn fake_backend(
        serve: impl FnOnce(UnixStream) + Send + 'static,
    ) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<()>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("backend.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let handle = std::thread::spawn(move || {
            if let Ok((stream, _)) = listener.accept() {
                serve(stream);
            }
        });
        (dir, path, handle)
    }

    fn short_timeout() -> ClientOptions {
        ClientOptions {
            timeout: Duration::from_millis(200),
            ..ClientOptions::default()
        }
    }

    #[test]
    fn silent_backend_hits_the_control_timeout() {
        // Reads everything, answers nothing, until the client goes away.
        let (_dir, path, server) = fake_backend(|mut stream| {
            let mut sink = Vec::new();
            let _ = stream.read_to_end(&mut sink);
        });
        let start = Instant::now();
        let err = VhostBlkClient::connect(&path, short_timeout()).expect_err("must time out");
        assert!(
            matches!(&err, ClientError::ControlTimeout { message, .. } if message == "GET_FEATURES"),
            "{err}"
        );
        assert!(start.elapsed() < Duration::from_secs(2));
        server.join().expect("server thread");
    }

    #[test]
    fn backend_hanging_up_names_the_message() {
        let (_dir, path, server) = fake_backend(drop);
        let err = VhostBlkClient::connect(&path, short_timeout()).expect_err("must fail");
        assert!(
            matches!(&err, ClientError::VhostUser { message, .. } if message == "GET_FEATURES"),
            "{err}"
        );
        server.join().expect("server thread");
    }

    #[test]
    fn missing_socket_is_a_connect_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let err = VhostBlkClient::connect(&dir.path().join("nothing"), short_timeout())
            .expect_err("must fail");
        assert!(matches!(err, ClientError::Connect { .. }), "{err}");
    }

    #[test]
    fn options_are_validated() {
        for opts in [
            ClientOptions {
                queues: 0,
                ..ClientOptions::default()
            },
            ClientOptions {
                queue_size: 100,
                ..ClientOptions::default()
            },
            ClientOptions {
                config_size: 0,
                ..ClientOptions::default()
            },
        ] {
            assert!(matches!(
                validate(&opts),
                Err(ClientError::InvalidOptions(_))
            ));
        }
        validate(&ClientOptions::default()).unwrap();
    }
}
