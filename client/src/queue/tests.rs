// SPDX-License-Identifier: Apache-2.0

//! The queue against virtio-queue's own device side, over the client's rings.

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
use virtio_bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::memory::GuestRam;
use crate::request::{BlkStatus, POISON_BYTE, RawDesc, Request, blk_header};

const SIZE: u16 = 16;

/// A queue over fresh guest memory, plus the peer end of its "vhost-user socket".
fn queue(event_idx: bool, indirect: bool, kick_suppression: bool) -> (BlkQueue, UnixStream) {
    let ram: SharedRam = Arc::new(GuestRam::new(1 << 20).expect("guest ram"));
    let ring = RingLayout::new(GUEST_MEMORY_BASE, SIZE);
    let pool = BufferPool::new(ring.end, GUEST_MEMORY_BASE + (1 << 20));
    let (ours, peer) = UnixStream::pair().expect("socket pair");
    let settings = QueueSettings {
        size: SIZE,
        event_idx,
        kick_suppression,
        indirect,
        poison: true,
        timeout: Duration::from_secs(5),
        size_max: None,
    };
    let q = BlkQueue::new(0, settings, ram, ring, pool, Arc::new(ours)).expect("queue");
    (q, peer)
}

/// The device side: virtio-queue's own `Queue`, as a backend uses it, over the
/// client's rings.
struct Device {
    ram: SharedRam,
    queue: Queue,
    ring: SplitRing,
}

impl Device {
    fn new(q: &BlkQueue) -> Self {
        let mut queue = Queue::new(SIZE).expect("device queue");
        let split = |addr: u64| (Some(addr as u32), Some((addr >> 32) as u32));
        let (lo, hi) = split(q.ring.desc);
        queue.set_desc_table_address(lo, hi);
        let (lo, hi) = split(q.ring.avail);
        queue.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(q.ring.used);
        queue.set_used_ring_address(lo, hi);
        queue.set_event_idx(q.settings.event_idx);
        queue.set_ready(true);
        assert!(queue.is_valid(q.ram.mem()), "the client's rings are valid");
        Self {
            ram: Arc::clone(&q.ram),
            queue,
            ring: q.split,
        }
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.ram
            .mem()
            .read_slice(&mut buf, GuestAddress(addr))
            .expect("device read");
        buf
    }

    fn write(&self, addr: u64, bytes: &[u8]) {
        self.ram
            .mem()
            .write_slice(bytes, GuestAddress(addr))
            .expect("device write");
    }

    fn load(&self, addr: u64) -> u16 {
        self.ram
            .mem()
            .load(GuestAddress(addr), Ordering::Acquire)
            .expect("device load")
    }

    /// Descriptor `index` of the ring's own table.
    fn desc(&self, index: u16) -> Descriptor {
        self.ram
            .mem()
            .read_obj(GuestAddress(self.ring.desc_addr(index)))
            .expect("descriptor")
    }

    /// Pops the next available chain: (head, its descriptors, indirect tables
    /// followed).
    fn pop(&mut self) -> Option<(u16, Vec<Descriptor>)> {
        let chain = self.queue.pop_descriptor_chain(self.ram.mem())?;
        Some((chain.head_index(), chain.collect()))
    }

    /// Publishes a used entry for `id` (without signalling).
    fn push(&mut self, id: u16, len: u32) {
        self.queue
            .add_used(self.ram.mem(), id, len)
            .expect("used entry");
    }

    /// Publishes a used entry whatever its id, as a broken device would.
    fn push_raw(&mut self, id: u32, len: u32) {
        let next = self.queue.next_used();
        let entry = self.ring.used_elem_addr(next);
        let mem = self.ram.mem();
        mem.write_obj(id.to_le(), GuestAddress(entry))
            .expect("used id");
        mem.write_obj(len.to_le(), GuestAddress(entry + 4))
            .expect("used len");
        let next = next.wrapping_add(1);
        mem.store(
            next.to_le(),
            GuestAddress(self.ring.used_idx_addr()),
            Ordering::Release,
        )
        .expect("used idx");
        self.queue.set_next_used(next);
    }

    /// Pops one chain, writes `status` into its last descriptor and publishes it.
    fn complete_next(&mut self, status: u8) {
        let (head, chain) = self.pop().expect("a chain is available");
        let last = chain.last().expect("non-empty chain");
        self.write(last.addr().0 + u64::from(last.len()) - 1, &[status]);
        self.push(head, 1);
    }
}

/// Writes a ring field as the device would.
fn store_u16(q: &BlkQueue, addr: u64, value: u16) {
    q.ram
        .mem()
        .store(value.to_le(), GuestAddress(addr), Ordering::Release)
        .expect("ring field");
}

fn signal(q: &BlkQueue) {
    q.call_fd().write(1).expect("call");
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

#[test]
fn queue_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<BlkQueue>();
}

#[test]
fn read_chain_layout_and_out_of_order_completion() {
    let (mut q, _peer) = queue(false, false, false);
    let tokens: Vec<Token> = (0..3)
        .map(|i| {
            q.submit(Request::Read {
                offset: 512 * i,
                len: 1024,
            })
            .expect("submit")
        })
        .collect();
    assert_eq!(q.in_flight(), 3);
    assert_eq!(q.free_descriptors(), usize::from(SIZE) - 9);
    assert_eq!(q.stats().kicks, 3);

    let mut dev = Device::new(&q);
    let mut chains = Vec::new();
    while let Some(chain) = dev.pop() {
        chains.push(chain);
    }
    assert_eq!(chains.len(), 3);
    for (i, (_, chain)) in chains.iter().enumerate() {
        assert_eq!(chain.len(), 3);
        let hdr = dev.read(chain[0].addr().0, chain[0].len() as usize);
        assert_eq!(hdr, blk_header(VIRTIO_BLK_T_IN, i as u64));
        assert_eq!(chain[0].flags(), VRING_DESC_F_NEXT as u16);
        let data_flags = (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16;
        assert_eq!((chain[1].len(), chain[1].flags()), (1024, data_flags));
        assert_eq!(
            (chain[2].len(), chain[2].flags()),
            (1, VRING_DESC_F_WRITE as u16)
        );
        // Unwritten buffers carry the poison.
        assert_eq!(dev.read(chain[2].addr().0, 1), [POISON_BYTE]);
        dev.write(chain[1].addr().0, &[i as u8; 1024]);
        let status = if i == 1 {
            VIRTIO_BLK_S_IOERR
        } else {
            VIRTIO_BLK_S_OK
        };
        dev.write(chain[2].addr().0, &[status as u8]);
    }
    // Complete in the order 2, 0, 1.
    for &i in &[2usize, 0, 1] {
        dev.push(chains[i].0, 1025);
    }
    signal(&q);

    let mut out = Vec::new();
    assert_eq!(q.poll_completions(&mut out).expect("poll"), 3);
    let order: Vec<Token> = out.iter().map(|c| c.token).collect();
    assert_eq!(order, [tokens[2], tokens[0], tokens[1]]);
    assert_eq!(out[0].data, vec![2u8; 1024]);
    assert_eq!(out[1].status, BlkStatus::Ok);
    assert_eq!(out[2].status, BlkStatus::IoErr);
    assert_eq!(out[2].used_len, 1025);
    assert_eq!(q.in_flight(), 0);
    assert_eq!(q.free_descriptors(), usize::from(SIZE));
}

#[test]
fn read_into_reserved_buffers_leaves_the_data_in_guest_memory() {
    let (mut q, _peer) = queue(false, false, false);
    let buffers = q.reserve_buffers(2, 4096).expect("reserve");
    assert_ne!(buffers[0].addr(), buffers[1].addr());
    let mut dev = Device::new(&q);
    // The same two buffers, used in turn by four reads.
    for round in 0..4u8 {
        let buffer = buffers[usize::from(round % 2)];
        let token = q
            .submit(Request::ReadInto {
                offset: 4096 * u64::from(round),
                buffer,
            })
            .expect("submit");
        let (head, chain) = dev.pop().expect("chain");
        assert_eq!(chain.len(), 3);
        assert_eq!(
            dev.read(chain[0].addr().0, chain[0].len() as usize),
            blk_header(VIRTIO_BLK_T_IN, 8 * u64::from(round))
        );
        // The device writes straight into the caller's buffer.
        assert_eq!((chain[1].addr().0, chain[1].len()), (buffer.addr(), 4096));
        assert_eq!(
            chain[1].flags(),
            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16
        );
        dev.write(chain[1].addr().0, &[round + 1; 4096]);
        dev.write(chain[2].addr().0, &[VIRTIO_BLK_S_OK as u8]);
        dev.push(head, 4097);
        signal(&q);
        let done = q.wait_completion(token, soon()).expect("wait");
        assert!(done.is_ok());
        assert!(done.data.is_empty(), "nothing is copied out");
        assert_eq!(
            q.buffer_contents(&buffer).expect("contents"),
            vec![round + 1; 4096]
        );
    }
    assert_eq!(q.free_descriptors(), usize::from(SIZE));
    // Poisoning covers reserved buffers too.
    q.submit(Request::ReadInto {
        offset: 0,
        buffer: buffers[0],
    })
    .expect("submit");
    assert_eq!(
        q.buffer_contents(&buffers[0]).expect("contents"),
        vec![POISON_BYTE; 4096]
    );
}

#[test]
fn reserving_more_than_fits_reserves_nothing() {
    let (mut q, _peer) = queue(false, false, false);
    assert!(matches!(
        q.reserve_buffers(1000, 4096),
        Err(ClientError::OutOfBufferMemory { .. })
    ));
    // Everything came back: the pool still holds nearly all of its megabyte.
    assert_eq!(q.reserve_buffers(200, 4096).expect("reserve").len(), 200);
    assert!(matches!(
        q.reserve_buffers(1, 0),
        Err(ClientError::InvalidRequest(_))
    ));
}

#[test]
fn indirect_request_uses_one_ring_descriptor() {
    let (mut q, _peer) = queue(false, true, false);
    q.submit(Request::Write {
        offset: 4096,
        data: &[7; 512],
    })
    .expect("submit");
    assert_eq!(q.free_descriptors(), usize::from(SIZE) - 1);
    let mut dev = Device::new(&q);
    // The device follows the indirect table: three descriptors.
    let (head, table) = dev.pop().expect("chain");
    assert_eq!(table.len(), 3);
    let ring_desc = dev.desc(head);
    assert!(!ring_desc.has_next(), "one ring descriptor");
    assert_eq!(ring_desc.flags(), VRING_DESC_F_INDIRECT as u16);
    assert_eq!(ring_desc.len(), 48);
    assert_eq!(table[0].flags(), VRING_DESC_F_NEXT as u16);
    assert_eq!((table[0].next(), table[1].next()), (1, 2));
    assert_eq!(table[1].flags(), VRING_DESC_F_NEXT as u16);
    assert_eq!(dev.read(table[1].addr().0, 512), vec![7; 512]);
    assert_eq!(table[2].flags(), VRING_DESC_F_WRITE as u16);
}

#[test]
fn raw_chain_reports_writable_buffers() {
    let (mut q, _peer) = queue(false, false, false);
    let token = q
        .submit_raw(&[
            RawDesc::readable(vec![1, 2, 3]),
            RawDesc::writable(4),
            RawDesc::addr(0, 8, true),
            RawDesc::status(),
        ])
        .expect("submit");
    let mut dev = Device::new(&q);
    let (head, chain) = dev.pop().expect("chain");
    assert_eq!(chain.len(), 4);
    assert_eq!((chain[2].addr().0, chain[2].len()), (0, 8));
    dev.write(chain[1].addr().0, &[9, 9, 9, 9]);
    dev.write(chain[3].addr().0, &[0]);
    dev.push(head, 5);
    signal(&q);
    // Typed polling leaves raw completions for wait().
    let mut out = Vec::new();
    assert_eq!(q.poll_completions(&mut out).expect("poll"), 0);
    let done = q.wait(token, soon()).expect("wait");
    assert_eq!(done.used_len, 5);
    assert_eq!(done.writable, vec![vec![9, 9, 9, 9], vec![], vec![0]]);
    assert_eq!(done.status_byte(), Some(0));
    assert!(matches!(
        q.wait(token, soon()),
        Err(ClientError::UnknownToken { .. })
    ));
}

#[test]
fn completion_already_published_needs_no_call() {
    let (mut q, _peer) = queue(true, false, false);
    let token = q.submit(Request::Flush).expect("submit");
    let mut dev = Device::new(&q);
    dev.complete_next(0);
    assert!(q.wait_completion(token, soon()).expect("wait").is_ok());
}

#[test]
fn missed_notification_is_an_error() {
    let (mut q, _peer) = queue(true, false, false);
    let token = q.submit(Request::Flush).expect("submit");
    let mut dev = Device::new(&q);
    let used_event = q.split.used_event_addr();
    std::thread::scope(|s| {
        s.spawn(|| {
            // Complete while the client sleeps, and never signal.
            std::thread::sleep(Duration::from_millis(50));
            dev.complete_next(0);
        });
        let r = q.wait_completion(token, Instant::now() + Duration::from_secs(1));
        assert!(
            matches!(r, Err(ClientError::MissedNotification { .. })),
            "{r:?}"
        );
    });
    // EVENT_IDX asked for a call on the next completion after the one reaped.
    assert_eq!(dev.load(used_event), 1);
}

#[test]
fn signalled_completion_wakes_the_waiter() {
    let (mut q, _peer) = queue(true, false, false);
    let token = q.submit(Request::Flush).expect("submit");
    let mut dev = Device::new(&q);
    let call = q.call_fd().try_clone().expect("clone call");
    let start = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(50));
            dev.complete_next(0);
            call.write(1).expect("signal");
        });
        let done = q.wait_completion(token, soon()).expect("wait");
        assert!(done.is_ok());
    });
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(q.stats().calls, 1);
}

#[test]
fn bad_used_entries_are_errors_not_panics() {
    let (mut q, _peer) = queue(false, false, false);
    let token = q.submit(Request::Flush).expect("submit");
    let mut dev = Device::new(&q);
    dev.pop().expect("chain");
    // An id that heads nothing.
    dev.push(7, 1);
    signal(&q);
    assert!(matches!(
        q.wait_completion(token, soon()),
        Err(ClientError::BadUsedId { id: 7, .. })
    ));
    // An id far outside the table.
    dev.push_raw(u32::MAX, 1);
    let mut out = Vec::new();
    assert!(matches!(
        q.poll_completions(&mut out),
        Err(ClientError::BadUsedId { id: u32::MAX, .. })
    ));
    // A used index running ahead of what is in flight.
    store_u16(&q, q.split.used_idx_addr(), 100);
    assert!(matches!(
        q.poll_completions(&mut out),
        Err(ClientError::BadUsedIndex { used_idx: 100, .. })
    ));
}

#[test]
fn unanswered_request_times_out() {
    let (mut q, _peer) = queue(true, false, false);
    let token = q.submit(Request::Flush).expect("submit");
    let start = Instant::now();
    let r = q.wait_completion(token, start + Duration::from_millis(100));
    assert!(matches!(r, Err(ClientError::Timeout { .. })), "{r:?}");
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(q.in_flight(), 1);
}

#[test]
fn backend_disconnect_ends_the_wait() {
    let (mut q, peer) = queue(false, false, false);
    let token = q.submit(Request::Flush).expect("submit");
    drop(peer);
    let start = Instant::now();
    let r = q.wait_completion(token, start + Duration::from_secs(5));
    assert!(
        matches!(r, Err(ClientError::Disconnected { queue: 0 })),
        "{r:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(1));
}

#[test]
fn queue_full_and_pool_exhaustion_leave_no_trace() {
    let (mut q, _peer) = queue(false, false, false);
    for _ in 0..5 {
        q.submit(Request::Read {
            offset: 0,
            len: 512,
        })
        .expect("submit");
    }
    assert_eq!(q.free_descriptors(), 1);
    assert!(matches!(
        q.submit(Request::Flush),
        Err(ClientError::QueueFull {
            needed: 2,
            free: 1,
            ..
        })
    ));
    assert!(matches!(
        q.submit_raw(&[RawDesc::writable(u32::MAX)]),
        Err(ClientError::OutOfBufferMemory { .. })
    ));
    assert_eq!(q.free_descriptors(), 1);
    assert_eq!(q.in_flight(), 5);
}

#[test]
fn event_idx_kick_suppression() {
    let (mut q, _peer) = queue(true, false, true);
    // avail_event = 0: the device wants a kick when index 0 is published.
    q.submit(Request::Flush).expect("submit");
    assert_eq!(q.stats().kicks, 1);
    // avail_event still 0: index 1 does not cross it.
    q.submit(Request::Flush).expect("submit");
    assert_eq!(q.stats().kicks, 1);
    // The device asks for a kick at index 2.
    store_u16(&q, q.split.avail_event_addr(), 2);
    q.submit(Request::Flush).expect("submit");
    assert_eq!(q.stats().kicks, 2);
    assert_eq!(q.kick.read().expect("kick count"), 2);
}

#[test]
fn no_notify_flag_suppresses_kicks_without_event_idx() {
    let (mut q, _peer) = queue(false, false, true);
    store_u16(&q, q.split.used_flags_addr(), VRING_USED_F_NO_NOTIFY as u16);
    q.submit(Request::Flush).expect("submit");
    assert_eq!(q.stats().kicks, 0);
    store_u16(&q, q.split.used_flags_addr(), 0);
    q.submit(Request::Flush).expect("submit");
    assert_eq!(q.stats().kicks, 1);
}
