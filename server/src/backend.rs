//! The vhost-user backend: device description for the frontend and the
//! request loop of each virtqueue.
//!
//! Every queue has its own worker thread (`queues_per_thread`). A worker
//! pops every available request, admits each into its queue's
//! publication order ([`Completions`]) and runs them on the device's I/O
//! pool, taking part itself ([`IoPool::run_batch`](super::io_pool::IoPool::run_batch)).
//! Requests that need a flush wait on the device's flush thread.
//! Whichever thread finishes a request publishes the used entries that
//! are ready, strictly in available-ring order: see [`super::completion`]
//! for why a restarted server depends on it. With `poll_max_us` set, the
//! worker then polls the ring for more ([`super::poll`]).
//!
//! Lock order: a queue's completion window, then its vring mutex. The
//! vring mutex is otherwise only taken by control messages for that vring.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringMutex, VringState, VringT};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SIZE_MAX};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use super::ServerError;
use super::completion::{Completions, Ticket, Used};
use super::config::{self, ConfigSpace, ID_BYTES, SECTOR_SHIFT, ServerOptions, WRITEBACK_OFFSET};
use super::dirty_log::{self, LogBitmap};
use super::engine::DeviceEngine;
use super::flusher::FlushHandle;
use super::io_pool::Job;
use super::poll::{CpuSample, Poller};
use super::request::{
    Completion, GuestMemoryMmap, Outcome, RequestContext, catch_panic, process_request,
};
use crate::device::BlockDevice;

/// Guest memory shared between the vhost-user handler and the backend.
pub type GuestMemoryAtomic = vm_memory::GuestMemoryAtomic<GuestMemoryMmap>;
/// The vring type: one mutex per vring.
pub type Vring = VringMutex<GuestMemoryAtomic>;

/// Per-queue counters.
#[derive(Debug, Default)]
struct QueueStats {
    requests: AtomicU64,
    errors: AtomicU64,
}

/// What running and completing a request needs, shared with the threads
/// that do it.
struct RequestShared {
    device: Arc<dyn BlockDevice>,
    flusher: FlushHandle,
    /// The guest memory of the connection, for publishing.
    mem: GuestMemoryAtomic,
    read_only: bool,
    device_id: [u8; ID_BYTES],
    queues: Box<[QueueShared]>,
}

#[derive(Default)]
struct QueueShared {
    stats: QueueStats,
    completions: Completions,
}

/// A vhost-user-blk backend for one frontend connection.
pub struct BlkBackend {
    engine: Arc<DeviceEngine>,
    shared: Arc<RequestShared>,
    mem: GuestMemoryAtomic,
    num_queues: u16,
    max_queue_size: u16,
    read_only: bool,
    /// Config space as first reported; the `writeback` byte is patched in
    /// from `writeback` on every read.
    config: ConfigSpace,
    /// The `writeback` config field, as the guest last set it.
    writeback: AtomicBool,
    /// Whether the driver acknowledged VIRTIO_BLK_F_FLUSH.
    flush_negotiated: AtomicBool,
    /// Whether the driver acknowledged VIRTIO_BLK_F_SIZE_MAX: it then
    /// keeps every descriptor within `size_max`, and longer ones are
    /// refused. A driver that did not (OVMF's) owes no such limit.
    size_max_negotiated: AtomicBool,
    /// Handshake requests seen so far (`HANDSHAKE_*` bits).
    handshake: AtomicU8,
    /// Written once every `HANDSHAKE_*` bit is set.
    handshake_event: EventFd,
    /// Each queue worker's polling state.
    pollers: Box<[Mutex<Poller>]>,
    /// One exit event per worker thread, created up front so that running
    /// out of descriptors fails `new` instead of leaving a worker that
    /// cannot be stopped.
    exit_events: Mutex<Vec<Option<ExitEvent>>>,
    /// Exit event consumers handed to vhost-user-backend, with their
    /// eventfd identity (see `exit_event` and `drop`).
    exit_fds: Mutex<Vec<(RawFd, String)>>,
}

type ExitEvent = (EventConsumer, EventNotifier);

/// The frontend asked for the virtio features (GET_FEATURES).
const HANDSHAKE_FEATURES: u8 = 1;
/// The frontend asked for the protocol features (GET_PROTOCOL_FEATURES).
const HANDSHAKE_PROTOCOL_FEATURES: u8 = 2;
const HANDSHAKE_DONE: u8 = HANDSHAKE_FEATURES | HANDSHAKE_PROTOCOL_FEATURES;

fn new_exit_event() -> io::Result<ExitEvent> {
    new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
}

impl std::fmt::Debug for BlkBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkBackend")
            .field("num_queues", &self.num_queues)
            .field("max_queue_size", &self.max_queue_size)
            .field("read_only", &self.read_only)
            .field("writeback", &self.writeback)
            .finish_non_exhaustive()
    }
}

/// A popped request on its way to the I/O pool.
type Chain = DescriptorChain<Arc<GuestMemoryMmap>>;

impl BlkBackend {
    /// A backend serving `engine`'s device. `mem` must be the same object
    /// given to `VhostUserDaemon::new`: the vhost-user handler replaces
    /// the memory map inside it, and the backend reads guest buffers
    /// through it.
    pub fn new(
        engine: Arc<DeviceEngine>,
        opts: &ServerOptions,
        mem: GuestMemoryAtomic,
    ) -> Result<Self, ServerError> {
        let device = Arc::clone(engine.device());
        let read_only = opts.read_only || device.read_only();
        let capacity = device.size() >> SECTOR_SHIFT;
        let exit_events = (0..opts.queues)
            .map(|_| new_exit_event().map(Some))
            .collect::<io::Result<_>>()
            .map_err(ServerError::EventFd)?;
        let poll_max = Duration::from_micros(u64::from(opts.poll_max_us));
        let shared = Arc::new(RequestShared {
            device,
            flusher: engine.flusher(),
            mem: mem.clone(),
            read_only,
            device_id: opts.device_id(),
            queues: (0..opts.queues).map(|_| QueueShared::default()).collect(),
        });
        Ok(BlkBackend {
            config: ConfigSpace::new(capacity, opts, opts.writeback),
            engine,
            shared,
            mem,
            num_queues: opts.queues,
            max_queue_size: opts.queue_size,
            read_only,
            writeback: AtomicBool::new(opts.writeback),
            flush_negotiated: AtomicBool::new(true),
            size_max_negotiated: AtomicBool::new(false),
            handshake: AtomicU8::new(0),
            handshake_event: EventFd::new(EFD_CLOEXEC | EFD_NONBLOCK)
                .map_err(ServerError::EventFd)?,
            pollers: (0..opts.queues)
                .map(|_| Mutex::new(Poller::new(poll_max)))
                .collect(),
            exit_events: Mutex::new(exit_events),
            exit_fds: Mutex::new(Vec::new()),
        })
    }

    /// Whether writes may stay cached until a flush. Write-through (every
    /// write flushed) when the guest cleared `writeback` or cannot flush.
    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Relaxed) && self.flush_negotiated.load(Ordering::Relaxed)
    }

    /// Readable once the frontend has asked for both its virtio and its
    /// protocol features: the first requests of every frontend (QEMU sends
    /// them as it connects, before the guest even starts).
    pub fn handshake_event(&self) -> &EventFd {
        &self.handshake_event
    }

    fn handshake_step(&self, step: u8) {
        let before = self.handshake.fetch_or(step, Ordering::AcqRel);
        if before != HANDSHAKE_DONE && before | step == HANDSHAKE_DONE {
            // Cannot fail: the counter is written once.
            let _ = self.handshake_event.write(1);
        }
    }

    /// Logs the request counters of each queue that saw requests.
    pub fn log_stats(&self) {
        for (queue, q) in self.shared.queues.iter().enumerate() {
            let requests = q.stats.requests.load(Ordering::Relaxed);
            if requests > 0 {
                let errors = q.stats.errors.load(Ordering::Relaxed);
                info!(queue, requests, errors, "queue statistics");
            }
        }
    }

    /// Waits until every request popped on any queue has completed and
    /// been published.
    pub fn drain(&self) {
        for q in &self.shared.queues {
            q.completions.wait_idle();
        }
    }

    /// Serves `vring` until it has nothing left: runs every available
    /// request, polls for more while the poll window is open, then
    /// re-enables kicks.
    fn process_queue(&self, vring: &Vring, queue: u16) {
        let Some(poller) = self.pollers.get(usize::from(queue)) else {
            return;
        };
        // Only this queue's worker takes it.
        let mut poller = poller.lock().unwrap_or_else(PoisonError::into_inner);
        poller.busy(Instant::now());
        // Work was announced (by a poll or by the ring index) but nothing
        // could be popped since.
        let mut announced = false;
        loop {
            let mem = self.mem.memory().into_inner();
            let Some(Batch { jobs, full }) = self.pop_batch(vring, queue, &mem) else {
                return;
            };
            if !jobs.is_empty() {
                announced = false;
                self.engine.pool().run_batch(jobs);
                continue;
            }
            if let Some(limit) = full {
                // A ring's worth of requests is in flight: only a guest
                // that reuses descriptors it has not got back gets here.
                // Wait for the oldest instead of growing without bound.
                self.shared.queues[usize::from(queue)]
                    .completions
                    .wait_below(limit);
                announced = false;
                continue;
            }
            if announced {
                // More is available but nothing could be popped: the
                // available ring is broken. Do not spin on it.
                warn!(queue, "available ring index is invalid");
                let _ = vring.get_mut().get_queue_mut().enable_notification(&*mem);
                return;
            }
            poller.idle(Instant::now());
            if self.poll_ring(vring, &mem, &mut poller) {
                poller.busy(Instant::now());
                announced = true;
                continue;
            }
            // Re-enable kicks and check again, so a request made available
            // just before is not left waiting for a kick.
            match vring.get_mut().get_queue_mut().enable_notification(&*mem) {
                Ok(true) => {
                    poller.busy(Instant::now());
                    announced = true;
                }
                Ok(false) => return,
                Err(e) => {
                    warn!(queue, "cannot enable vring notifications: {e}");
                    return;
                }
            }
        }
    }

    /// Pops every available request of `vring`, with kicks suppressed, and
    /// admits each into the queue's publication order, up to a ring's
    /// worth in flight. `None` when the vring is stopped or cannot be used.
    fn pop_batch(&self, vring: &Vring, queue: u16, mem: &Arc<GuestMemoryMmap>) -> Option<Batch> {
        let q = self.shared.queues.get(usize::from(queue))?;
        let mut window = q.completions.lock();
        let mut state = vring.get_mut();
        // A kick may race with GET_VRING_BASE stopping the ring.
        if !state.get_queue().ready() {
            debug!(queue, "kick on a stopped vring");
            return None;
        }
        // With EVENT_IDX this is a no-op, and enable_notification
        // publishes avail_event instead.
        if let Err(e) = state.get_queue_mut().disable_notification(&**mem) {
            warn!(queue, "cannot disable vring notifications: {e}");
            return None;
        }
        let writeback = self.writeback();
        let size_max = self
            .size_max_negotiated
            .load(Ordering::Relaxed)
            .then_some(config::SIZE_MAX);
        let limit = usize::from(state.get_queue().size()).max(1);
        let mut jobs = Vec::new();
        while window.in_flight() < limit
            && let Some(chain) = state.get_queue_mut().pop_descriptor_chain(Arc::clone(mem))
        {
            let ticket = window.admit();
            let request = PoppedRequest {
                shared: Arc::clone(&self.shared),
                vring: vring.clone(),
                queue,
                ticket,
                writeback,
                size_max,
            };
            let mem = Arc::clone(mem);
            jobs.push(Box::new(move || request.run(chain, mem)) as Job);
        }
        let full = (window.in_flight() >= limit).then_some(limit);
        Some(Batch { jobs, full })
    }

    /// Polls the available ring for the poller's window. Returns whether
    /// a request showed up.
    fn poll_ring(&self, vring: &Vring, mem: &GuestMemoryMmap, poller: &mut Poller) -> bool {
        let start = Instant::now();
        let window = poller.window(start);
        if window.is_zero() {
            return false;
        }
        let before = CpuSample::of_this_thread();
        let deadline = start + window;
        let found = loop {
            if has_available(vring, mem) {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
            std::hint::spin_loop();
        };
        if let (Ok(before), Ok(after)) = (before, CpuSample::of_this_thread()) {
            poller.window_ran(start, Instant::now(), before, after);
        }
        found
    }
}

/// What [`BlkBackend::pop_batch`] popped.
struct Batch {
    jobs: Vec<Job>,
    /// The in-flight limit when it was reached.
    full: Option<usize>,
}

/// Whether the (ready) ring has requests not yet popped.
fn has_available(vring: &Vring, mem: &GuestMemoryMmap) -> bool {
    let state = vring.get_ref();
    let queue = state.get_queue();
    queue.ready()
        && queue
            .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
            .is_ok_and(|idx| idx.0 != queue.next_avail())
}

/// A request popped from a queue, as it travels to the thread that runs it.
struct PoppedRequest {
    shared: Arc<RequestShared>,
    vring: Vring,
    queue: u16,
    ticket: Ticket,
    writeback: bool,
    /// `size_max`, when the driver negotiated it.
    size_max: Option<u32>,
}

impl PoppedRequest {
    /// Runs the request, and completes it now or after its flush.
    fn run(self, chain: Chain, mem: Arc<GuestMemoryMmap>) {
        let head = chain.head_index();
        let shared = &self.shared;
        let ctx = RequestContext {
            device: &*shared.device,
            queue: self.queue,
            read_only: shared.read_only,
            writeback: self.writeback,
            device_id: &shared.device_id,
            size_max: self.size_max,
        };
        // `process_request` turns a panic of the request itself into IOERR;
        // this is the net under the rest of it, so that the request still
        // gets its used entry (without a status) and its queue goes on.
        let outcome =
            catch_panic(|| process_request(&mem, chain, &ctx)).unwrap_or_else(|message| {
                error!(queue = self.queue, head, "request panicked: {message}");
                Outcome::Complete(Completion {
                    status: None,
                    used_len: 0,
                })
            });
        match outcome {
            Outcome::Complete(done) => self.finish(head, done),
            Outcome::AfterFlush(pending) => {
                let flusher = shared.flusher.clone();
                flusher.submit(Box::new(move |result| {
                    let done = pending.complete(&mem, result);
                    self.finish(head, done);
                }));
            }
        }
    }

    fn finish(self, head: u16, done: Completion) {
        let Some(q) = self.shared.queues.get(usize::from(self.queue)) else {
            return;
        };
        q.stats.requests.fetch_add(1, Ordering::Relaxed);
        if !done.is_ok() {
            q.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        let used = Used {
            head,
            len: done.used_len,
        };
        q.completions.complete(self.ticket, used, |ready| {
            publish(&self.vring, &self.shared.mem.memory(), self.queue, ready);
        });
    }
}

/// Puts `ready` into the used ring and notifies the guest once.
///
/// Invariant (see [`super::completion`]): `ready` holds completions in
/// the order their requests were made available, and every request made
/// available before them has already been published. Only
/// [`Completions::complete`] calls this, with its window locked, so the
/// used ring always counts a prefix of the available ring; QEMU relies on
/// that to resume a restarted server from the used index.
fn publish(vring: &Vring, mem: &GuestMemoryMmap, queue: u16, ready: &[Used]) {
    let mut state = vring.get_mut();
    for used in ready {
        if let Err(e) = state.get_queue_mut().add_used(mem, used.head, used.len) {
            warn!(queue, head = used.head, "cannot add to the used ring: {e}");
        }
    }
    signal_guest(&mut state, mem, queue);
}

/// Interrupts the guest unless EVENT_IDX (or NO_INTERRUPT) says it does not
/// need to hear about these completions yet.
fn signal_guest(state: &mut VringState<GuestMemoryAtomic>, mem: &GuestMemoryMmap, queue: u16) {
    let needed = state
        .get_queue_mut()
        .needs_notification(mem)
        .unwrap_or_else(|e| {
            warn!(queue, "cannot read the used event index: {e}");
            true
        });
    if needed && let Err(e) = state.signal_used_queue() {
        warn!(queue, "cannot signal the used queue: {e}");
    }
}

impl Drop for BlkBackend {
    fn drop(&mut self) {
        // vhost-user-backend 0.24 takes the exit event consumer with
        // `into_raw_fd()`, registers it with the worker's epoll and never
        // closes it. The last reference to the backend goes away only after
        // every worker has been joined and its epoll closed, so nothing uses
        // these descriptors any more. Close them, or each connection leaks
        // one per queue.
        let fds =
            std::mem::take(&mut *self.exit_fds.lock().unwrap_or_else(PoisonError::into_inner));
        for (fd, id) in fds {
            // Only close the very eventfd handed out, in case a later
            // library version closes it itself and the number was reused.
            if eventfd_id(fd).is_some_and(|now| now == id) {
                // SAFETY: `fd` is the exit consumer handed out by
                // `exit_event`, which nobody else owns or uses any more.
                unsafe { libc::close(fd) };
            }
        }
    }
}

/// Checks that the file behind each guest memory region covers it: a
/// mapping past the end of its file faults with SIGBUS when touched.
/// Regions of other descriptors (devices such as `/dev/zero`) have no size
/// to check.
fn check_backing_files(mem: &GuestMemoryMmap) -> io::Result<()> {
    for region in mem.iter() {
        let Some(backing) = region.file_offset() else {
            continue;
        };
        let meta = backing.file().metadata()?;
        if !meta.file_type().is_file() {
            continue;
        }
        let needed = backing.start().checked_add(region.len());
        if needed.is_none_or(|end| end > meta.len()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the region at guest address {:#x} maps {} bytes at offset {} of a {}-byte file",
                    region.start_addr().0,
                    region.len(),
                    backing.start(),
                    meta.len()
                ),
            ));
        }
    }
    Ok(())
}

/// Identifies the eventfd open as `fd`: its `eventfd-id` line from fdinfo
/// (Linux 5.16+), or a generic marker on older kernels. `None` when `fd` is
/// not an eventfd.
fn eventfd_id(fd: RawFd) -> Option<String> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    if !info.contains("eventfd-count:") {
        return None;
    }
    let id = info.lines().find(|line| line.starts_with("eventfd-id:"));
    Some(id.unwrap_or("eventfd").to_owned())
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = LogBitmap;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.max_queue_size)
    }

    fn features(&self) -> u64 {
        // Also called for SET_FEATURES, which only a frontend that knows
        // the features sends.
        self.handshake_step(HANDSHAKE_FEATURES);
        config::virtio_features(self.read_only)
    }

    fn acked_features(&self, features: u64) {
        // A driver without FLUSH cannot flush, so its writes must go
        // through. The `writeback` field itself is kept across drivers:
        // QEMU caches the config space and shows the guest's last write
        // to the next driver too.
        let flush = features & (1 << VIRTIO_BLK_F_FLUSH) != 0;
        self.flush_negotiated.store(flush, Ordering::Relaxed);
        let size_max = features & (1 << VIRTIO_BLK_F_SIZE_MAX) != 0;
        self.size_max_negotiated.store(size_max, Ordering::Relaxed);
        debug!(
            features = format_args!("{features:#x}"),
            "features acknowledged"
        );
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.handshake_step(HANDSHAKE_PROTOCOL_FEATURES);
        config::protocol_features()
    }

    fn set_event_idx(&self, enabled: bool) {
        // The vrings track EVENT_IDX themselves; the request loop is the
        // same with and without it.
        debug!(enabled, "EVENT_IDX");
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut space = self.config;
        space.set_writeback(self.writeback.load(Ordering::Relaxed));
        space.read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only `writeback` is writable. Anything else is ignored rather than
        // refused: an error here would end the whole connection.
        let start = offset as usize;
        if let Some(&wce) = WRITEBACK_OFFSET
            .checked_sub(start)
            .and_then(|at| buf.get(at))
        {
            let writeback = wce != 0;
            info!(writeback, "guest changed the write cache mode");
            self.writeback.store(writeback, Ordering::Relaxed);
        }
        if start != WRITEBACK_OFFSET || buf.len() != 1 {
            warn!(
                offset,
                len = buf.len(),
                "ignoring a config write outside the writeback field"
            );
        }
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic) -> io::Result<()> {
        // The handler has already put the new map into the GuestMemoryAtomic
        // shared with `self.mem`. A region larger than the file behind it
        // would raise SIGBUS, which ends the whole process, on the first
        // access to the missing part: drop such a map before anything reads
        // it, and refuse the message.
        if let Err(e) = check_backing_files(&mem.memory()) {
            warn!("refusing the guest memory table: {e}");
            mem.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .replace(GuestMemoryMmap::new());
            return Err(e);
        }
        // A table sent while a migration runs: the new regions need the log.
        dirty_log::relog_new_regions(&mem.memory()).inspect_err(|e| {
            warn!("cannot install the dirty log in the new memory table: {e}");
        })
    }

    /// RESET_DEVICE: the rings are disabled; let what was popped finish.
    fn reset_device(&self) {
        self.drain();
    }

    /// GET_VRING_BASE: the ring is already marked not ready, so nothing
    /// more is popped; wait until every request popped from it has been
    /// published, so that the index the frontend gets back (next
    /// available) equals the used index.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let queue = usize::try_from(queue_index).ok();
        if let Some(q) = queue.and_then(|i| self.shared.queues.get(i)) {
            q.completions.wait_idle();
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker thread per queue.
        (0..self.num_queues).map(|queue| 1u64 << queue).collect()
    }

    /// The exit event for worker `thread_index`, fresh for this backend
    /// (and so for this daemon). The consumer's descriptor becomes the
    /// backend's: vhost-user-backend keeps it as a raw fd, and the backend
    /// closes it when it is dropped.
    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let prepared = self
            .exit_events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(thread_index)
            .and_then(Option::take);
        match prepared.map_or_else(new_exit_event, Ok) {
            Ok((consumer, notifier)) => {
                let fd = consumer.as_raw_fd();
                if let Some(id) = eventfd_id(fd) {
                    self.exit_fds
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push((fd, id));
                }
                Some((consumer, notifier))
            }
            Err(e) => {
                // Only for calls beyond the prepared events, which
                // vhost-user-backend does not make.
                error!(thread_index, "cannot create an exit event: {e}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // Each thread owns exactly one vring, so the event is always 0 and
        // the thread index is the queue index. Returning an error would stop
        // the worker for good: log and carry on instead.
        let (Some(vring), Ok(queue)) = (
            vrings.get(usize::from(device_event)),
            u16::try_from(thread_id),
        ) else {
            warn!(device_event, thread_id, "event for an unknown vring");
            return Ok(());
        };
        self.process_queue(vring, queue);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::fd::{FromRawFd, IntoRawFd};
    use std::sync::Arc;

    use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    use super::*;
    use crate::mem_disk::MemDisk;
    use crate::test_disk::{GatedDisk, PanickingDisk};

    const QUEUE_SIZE: u16 = 16;
    /// The vrings' used ring. Not the mock's: virtio-queue 0.18's mock
    /// places its used ring over the second half of its available ring
    /// (it aligns the end of the ring's first `len` bytes, not entries).
    const USED_RING: GuestAddress = GuestAddress(0x8000);

    /// The size of the test disks: 64 sectors.
    const DISK_BYTES: usize = 64 * 512;

    struct Setup<D> {
        backend: BlkBackend,
        disk: Arc<D>,
        mem: GuestMemoryAtomic,
        /// The guest memory as first mapped (shared with `mem`).
        guest: GuestMemoryMmap,
    }

    impl<D> Setup<D> {
        /// Queue 0 as the guest driver sees it, and as the backend does.
        fn ring(&self, event_idx: bool) -> (MockSplitQueue<'_, GuestMemoryMmap>, Vring) {
            let queue = MockSplitQueue::new(&self.guest, QUEUE_SIZE);
            let vring = vring(&self.mem, &queue, event_idx);
            (queue, vring)
        }

        /// The worker's handling of the guest's kick on queue 0.
        fn kick(&self, vring: &Vring) {
            self.backend
                .handle_event(0, EventSet::IN, std::slice::from_ref(vring), 0)
                .unwrap();
        }
    }

    fn setup(opts: &ServerOptions) -> Setup<MemDisk> {
        setup_with(Arc::new(MemDisk::new(DISK_BYTES)), opts)
    }

    /// A backend over a disk whose requests the test holds and releases.
    fn gated_setup(opts: &ServerOptions) -> Setup<GatedDisk> {
        setup_with(Arc::new(GatedDisk::new(DISK_BYTES)), opts)
    }

    fn setup_with<D: BlockDevice + 'static>(disk: Arc<D>, opts: &ServerOptions) -> Setup<D> {
        let guest = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mem = GuestMemoryAtomic::new(guest.clone());
        let engine = Arc::new(DeviceEngine::new(disk.clone(), opts).unwrap());
        let backend = BlkBackend::new(engine, opts, mem.clone()).unwrap();
        Setup {
            backend,
            disk,
            mem,
            guest,
        }
    }

    /// A vring over `queue`, set up the way the vhost-user handler does.
    fn vring(
        mem: &GuestMemoryAtomic,
        queue: &MockSplitQueue<'_, GuestMemoryMmap>,
        event_idx: bool,
    ) -> Vring {
        let vring = Vring::new(mem.clone(), QUEUE_SIZE).unwrap();
        vring.set_queue_size(QUEUE_SIZE);
        vring
            .set_queue_info(queue.desc_table_addr().0, queue.avail_addr().0, USED_RING.0)
            .unwrap();
        vring.set_queue_event_idx(event_idx);
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        vring
    }

    /// Chains of (header, data, status) at descriptor indexes 3i..3i+2.
    fn add_requests(
        queue: &MockSplitQueue<'_, GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        requests: &[(u32, u64)],
    ) {
        let mut descs = Vec::new();
        for (i, &(request_type, sector)) in requests.iter().enumerate() {
            let base = 0x1_0000 + i as u64 * 0x1000;
            let mut header = [0u8; 16];
            header[..4].copy_from_slice(&request_type.to_le_bytes());
            header[8..].copy_from_slice(&sector.to_le_bytes());
            mem.write_slice(&header, GuestAddress(base)).unwrap();
            let data_flags = if request_type == VIRTIO_BLK_T_IN {
                VRING_DESC_F_WRITE
            } else {
                0
            };
            let next = |n: u64| (i as u64 * 3 + n) as u16;
            let f_next = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                base,
                16,
                f_next as u16,
                next(1),
            )));
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                base + 0x100,
                512,
                (data_flags | f_next) as u16,
                next(2),
            )));
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                base + 0x800,
                1,
                VRING_DESC_F_WRITE as u16,
                0,
            )));
        }
        queue.add_desc_chains(&descs, 0).unwrap();
    }

    fn used_idx(mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj::<u16>(USED_RING.unchecked_add(2)).unwrap()
    }

    fn used_elem(mem: &GuestMemoryMmap, i: u64) -> (u32, u32) {
        let at = USED_RING.unchecked_add(4 + 8 * i);
        (
            mem.read_obj::<u32>(at).unwrap(),
            mem.read_obj::<u32>(at.unchecked_add(4)).unwrap(),
        )
    }

    fn run_batch(event_idx: bool, opts: &ServerOptions) {
        let s = setup(opts);
        let (queue, vring) = s.ring(event_idx);
        let (consumer, notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK).unwrap();
        // SAFETY: the notifier's descriptor is owned by nobody else after
        // into_raw_fd; the File takes it over.
        let call = unsafe { File::from_raw_fd(notifier.into_raw_fd()) };
        vring.set_call(Some(call));

        s.guest
            .write_slice(&[0xcd; 512], GuestAddress(0x1_1100))
            .unwrap();
        add_requests(
            &queue,
            &s.guest,
            &[(VIRTIO_BLK_T_IN, 0), (VIRTIO_BLK_T_OUT, 3), (99, 0)],
        );
        s.kick(&vring);
        s.backend.drain();

        assert_eq!(used_idx(&s.guest), 3);
        assert_eq!(used_elem(&s.guest, 0), (0, 513));
        assert_eq!(used_elem(&s.guest, 1), (3, 1));
        assert_eq!(used_elem(&s.guest, 2), (6, 1));
        assert_eq!(s.disk.contents(3 * 512, 512), vec![0xcd; 512]);
        assert!(consumer.consume().is_ok(), "the guest was not notified");
        let stats = &s.backend.shared.queues[0].stats;
        assert_eq!(stats.requests.load(Ordering::Relaxed), 3);
        assert_eq!(stats.errors.load(Ordering::Relaxed), 1);

        // Nothing to do: no completion, no notification.
        s.kick(&vring);
        assert_eq!(used_idx(&s.guest), 3);
        assert!(consumer.consume().is_err());
    }

    #[test]
    fn batch_without_event_idx() {
        run_batch(false, &ServerOptions::default());
    }

    #[test]
    fn batch_with_event_idx() {
        run_batch(true, &ServerOptions::default());
    }

    #[test]
    fn batch_on_the_worker_alone() {
        let opts = ServerOptions {
            io_threads: 0,
            ..ServerOptions::default()
        };
        run_batch(false, &opts);
    }

    #[test]
    fn batch_with_polling() {
        // The worker polls for at most 1 ms after the batch, then sleeps.
        let opts = ServerOptions {
            poll_max_us: 1000,
            ..ServerOptions::default()
        };
        run_batch(true, &opts);
    }

    /// Waits until the used index reaches `n`.
    fn wait_for_used(mem: &GuestMemoryMmap, n: u16) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while used_idx(mem) < n {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {n} used entries"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    fn used_heads(mem: &GuestMemoryMmap) -> Vec<u32> {
        (0..u64::from(used_idx(mem)))
            .map(|i| used_elem(mem, i).0)
            .collect()
    }

    #[test]
    fn a_slow_request_is_published_before_faster_ones_behind_it() {
        let s = gated_setup(&ServerOptions::default());
        let (queue, vring) = s.ring(true);
        s.disk.close_reads_at(0);
        add_requests(
            &queue,
            &s.guest,
            &[
                (VIRTIO_BLK_T_IN, 0),
                (VIRTIO_BLK_T_IN, 1),
                (VIRTIO_BLK_T_OUT, 2),
                (VIRTIO_BLK_T_IN, 3),
            ],
        );
        std::thread::scope(|scope| {
            // Whichever thread runs the slow read stays in it.
            let worker = scope.spawn(|| {
                s.kick(&vring);
            });
            // The requests behind the slow read run and finish...
            s.disk.wait_for_io(2, 1);
            // ...but none is published ahead of it.
            assert_eq!(used_idx(&s.guest), 0);
            s.disk.open_reads();
            worker.join().unwrap();
        });
        s.backend.drain();
        assert_eq!(used_heads(&s.guest), [0, 3, 6, 9]);
        assert_eq!(used_elem(&s.guest, 0), (0, 513));
    }

    #[test]
    fn a_waiting_flush_holds_back_its_queue_but_not_the_writes_behind_it() {
        let s = gated_setup(&ServerOptions::default());
        let (queue, vring) = s.ring(false);
        s.guest
            .write_slice(&[0xab; 512], GuestAddress(0x1_2100))
            .unwrap();
        s.disk.close_flushes();
        add_requests(
            &queue,
            &s.guest,
            &[
                (VIRTIO_BLK_T_OUT, 0),
                (virtio_bindings::virtio_blk::VIRTIO_BLK_T_FLUSH, 0),
                (VIRTIO_BLK_T_OUT, 5),
            ],
        );
        // The worker hands the flush over and does not wait for it.
        s.kick(&vring);
        s.disk.wait_for_flush_started(1);
        s.disk.wait_for_io(0, 2);
        assert_eq!(s.disk.inner().contents(5 * 512, 512), [0xab; 512]);
        // Only the write ahead of the flush is published.
        wait_for_used(&s.guest, 1);
        assert_eq!(used_heads(&s.guest), [0]);

        // GET_VRING_BASE: the ring is stopped, and stop_vring returns only
        // once everything popped is published.
        vring.set_queue_ready(false);
        let used_at = USED_RING.unchecked_add(2);
        std::thread::scope(|scope| {
            let stop = scope.spawn(|| {
                s.backend.stop_vring(0).unwrap();
                s.mem.memory().read_obj::<u16>(used_at).unwrap()
            });
            s.disk.open_flushes();
            assert_eq!(stop.join().unwrap(), 3);
        });
        assert_eq!(used_heads(&s.guest), [0, 3, 6]);
        assert_eq!(used_elem(&s.guest, 1), (3, 1));
        assert_eq!(vring.queue_next_avail(), 3);
        assert_eq!(s.disk.flushes(), 1);
    }

    #[test]
    fn a_guest_reposting_descriptors_cannot_exceed_a_ring_of_requests_in_flight() {
        let s = gated_setup(&ServerOptions::default());
        let (queue, vring) = s.ring(false);
        s.disk.close_flushes();
        // A FLUSH that will wait, then reads (heads 3, 6, 9, 12)...
        add_requests(
            &queue,
            &s.guest,
            &[
                (virtio_bindings::virtio_blk::VIRTIO_BLK_T_FLUSH, 0),
                (VIRTIO_BLK_T_IN, 1),
                (VIRTIO_BLK_T_IN, 2),
                (VIRTIO_BLK_T_IN, 3),
                (VIRTIO_BLK_T_IN, 4),
            ],
        );
        // ...and head 3 posted again and again without having come back.
        let post = |from: u16, to: u16, head: u16| {
            for at in from..to {
                let slot = usize::from(at % QUEUE_SIZE);
                queue
                    .avail()
                    .ring()
                    .ref_at(slot)
                    .unwrap()
                    .store(head.to_le());
            }
            queue.avail().idx().store(to.to_le());
        };
        post(5, QUEUE_SIZE, 3);
        std::thread::scope(|scope| {
            let worker = scope.spawn(|| {
                s.kick(&vring);
            });
            s.disk.wait_for_flush_started(1);
            s.disk.wait_for_io(15, 0);
            // A ring's worth is in flight, held back by the FLUSH: the
            // worker must not pop these until something completes.
            post(QUEUE_SIZE, 2 * QUEUE_SIZE, 6);
            assert_eq!(s.disk.reads_done(), 15);
            s.disk.open_flushes();
            worker.join().unwrap();
        });
        s.backend.drain();
        // Everything completed; the ring now holds the second round.
        assert_eq!(used_idx(&s.guest), 2 * QUEUE_SIZE);
        let heads: Vec<_> = (0..u64::from(QUEUE_SIZE))
            .map(|i| used_elem(&s.guest, i).0)
            .collect();
        assert_eq!(heads, [6; QUEUE_SIZE as usize]);
        assert_eq!(s.disk.reads_done(), 31);
    }

    #[test]
    fn write_through_writes_complete_after_a_flush() {
        let s = gated_setup(&ServerOptions {
            writeback: false,
            ..ServerOptions::default()
        });
        let (queue, vring) = s.ring(false);
        s.disk.close_flushes();
        add_requests(
            &queue,
            &s.guest,
            &[(VIRTIO_BLK_T_OUT, 0), (VIRTIO_BLK_T_IN, 1)],
        );
        s.kick(&vring);
        s.disk.wait_for_io(1, 1);
        assert_eq!(used_idx(&s.guest), 0);
        s.disk.open_flushes();
        s.backend.drain();
        assert_eq!(used_heads(&s.guest), [0, 3]);
        assert_eq!(s.disk.flushes(), 1);
    }

    /// The status byte of the request at chain `i` of [`add_requests`].
    fn status_byte(mem: &GuestMemoryMmap, i: u64) -> u8 {
        mem.read_obj::<u8>(GuestAddress(0x1_0800 + i * 0x1000))
            .unwrap()
    }

    fn a_panic_behind_a_request_fails_it_and_the_queue_goes_on(opts: &ServerOptions) {
        let status_ok = virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK as u8;
        let status_ioerr = virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8;
        // Reads of sector 1 panic in the device.
        let s = setup_with(Arc::new(PanickingDisk::new(DISK_BYTES, 512)), opts);
        let (queue, vring) = s.ring(true);
        s.guest
            .write_slice(&[0x5a; 512], GuestAddress(0x1_2100))
            .unwrap();
        add_requests(
            &queue,
            &s.guest,
            &[
                (VIRTIO_BLK_T_IN, 0),
                (VIRTIO_BLK_T_IN, 1),
                (VIRTIO_BLK_T_OUT, 3),
            ],
        );
        s.kick(&vring);
        s.backend.drain();
        assert_eq!(used_heads(&s.guest), [0, 3, 6], "published in order");
        assert_eq!(used_elem(&s.guest, 1), (3, 1), "no data, a status");
        let statuses: Vec<u8> = (0..3).map(|i| status_byte(&s.guest, i)).collect();
        assert_eq!(statuses, [status_ok, status_ioerr, status_ok]);
        let stats = &s.backend.shared.queues[0].stats;
        assert_eq!(stats.errors.load(Ordering::Relaxed), 1);

        // The thread that ran it serves the next kick.
        add_requests(&queue, &s.guest, &[(VIRTIO_BLK_T_IN, 3)]);
        s.kick(&vring);
        s.backend.drain();
        assert_eq!(used_heads(&s.guest), [0, 3, 6, 0]);
        assert_eq!(status_byte(&s.guest, 0), status_ok);
        let mut read = [0u8; 512];
        s.guest
            .read_slice(&mut read, GuestAddress(0x1_0100))
            .unwrap();
        assert_eq!(read, [0x5a; 512]);
    }

    #[test]
    fn a_panic_behind_a_request_fails_it_on_the_io_pool() {
        a_panic_behind_a_request_fails_it_and_the_queue_goes_on(&ServerOptions::default());
    }

    #[test]
    fn a_panic_behind_a_request_fails_it_on_the_queue_worker() {
        let opts = ServerOptions {
            io_threads: 0,
            ..ServerOptions::default()
        };
        a_panic_behind_a_request_fails_it_and_the_queue_goes_on(&opts);
    }

    #[test]
    fn stopped_vring_is_left_alone() {
        let s = setup(&ServerOptions::default());
        let (queue, vring) = s.ring(false);
        add_requests(&queue, &s.guest, &[(VIRTIO_BLK_T_IN, 0)]);
        vring.set_queue_ready(false);
        s.kick(&vring);
        assert_eq!(used_idx(&s.guest), 0);
        // An unknown vring index is logged, not fatal to the worker.
        s.backend.handle_event(5, EventSet::IN, &[], 0).unwrap();
    }

    #[test]
    fn device_description() {
        let opts = ServerOptions {
            queues: 3,
            queue_size: 512,
            ..ServerOptions::default()
        };
        let s = setup(&opts);
        let b = &s.backend;
        assert_eq!(b.num_queues(), 3);
        assert_eq!(b.max_queue_size(), 512);
        assert_eq!(b.queues_per_thread(), [1, 2, 4]);
        assert_eq!(b.get_config(0, 8), 64u64.to_le_bytes());
        assert_eq!(b.get_config(0, 57).len(), 57);
        assert_eq!(
            b.features() & (1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_RO),
            0
        );

        let ro = setup(&ServerOptions {
            read_only: true,
            ..ServerOptions::default()
        });
        assert_ne!(
            ro.backend.features() & (1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_RO),
            0
        );
    }

    #[test]
    fn write_cache_mode() {
        let s = setup(&ServerOptions::default());
        let b = &s.backend;
        let wce = WRITEBACK_OFFSET as u32;
        assert_eq!(b.get_config(wce, 1), [1]);
        b.set_config(wce, &[0]).unwrap();
        assert_eq!(b.get_config(wce, 1), [0]);
        assert!(!b.writeback());
        // Writes elsewhere are ignored, not errors.
        b.set_config(0, &[0xff; 8]).unwrap();
        assert_eq!(b.get_config(0, 8), 64u64.to_le_bytes());
        // The guest's choice survives a new driver, as in QEMU's cached config.
        b.acked_features(b.features());
        assert!(!b.writeback());
        b.set_config(wce, &[1]).unwrap();
        assert!(b.writeback());
        // Without FLUSH, writes go through whatever the field says.
        b.acked_features(b.features() & !(1 << VIRTIO_BLK_F_FLUSH));
        assert!(!b.writeback());
        assert_eq!(b.get_config(wce, 1), [1]);
    }

    #[test]
    fn exit_events_are_fresh_and_closed_on_drop() {
        let s = setup(&ServerOptions::default());
        let (c0, n0) = s.backend.exit_event(0).unwrap();
        // A repeated call still gets an event of its own.
        let (c1, _n1) = s.backend.exit_event(0).unwrap();
        assert_ne!(c0.as_raw_fd(), c1.as_raw_fd());
        n0.notify().unwrap();
        c0.consume().unwrap();
        // Hand the consumers over the way vhost-user-backend does.
        let raw = [c0.into_raw_fd(), c1.into_raw_fd()];
        let ids: Vec<_> = raw.iter().map(|&fd| eventfd_id(fd).unwrap()).collect();
        drop(s);
        for (fd, id) in raw.iter().zip(ids) {
            assert_ne!(eventfd_id(*fd), Some(id), "exit event consumer {fd} leaked");
        }
    }

    #[test]
    fn memory_larger_than_its_file_is_refused() {
        use vm_memory::{FileOffset, GuestRegionMmap, MmapRegion};
        let table = |file_len: u64| {
            let file = tempfile::tempfile().unwrap();
            file.set_len(file_len).unwrap();
            // Mapping past the end of the file is allowed; touching it is not.
            let region = MmapRegion::from_file(FileOffset::new(file, 0), 0x10_0000).unwrap();
            let region = GuestRegionMmap::new(region, GuestAddress(0)).unwrap();
            GuestMemoryMmap::from_regions(vec![region]).unwrap()
        };
        let s = setup(&ServerOptions::default());
        s.mem.lock().unwrap().replace(table(0x10_0000));
        s.backend.update_memory(s.mem.clone()).unwrap();
        assert_eq!(s.mem.memory().num_regions(), 1);
        // The handler puts the table in place before telling the backend.
        s.mem.lock().unwrap().replace(table(0x1_0000));
        let err = s.backend.update_memory(s.mem.clone()).unwrap_err();
        assert!(err.to_string().contains("65536-byte file"), "{err}");
        assert_eq!(s.mem.memory().num_regions(), 0, "the table is dropped");
    }
}
